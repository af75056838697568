//! `hotsync check --role primary|standby`: whether this node is fit for a role, for
//! Keepalived's `vrrp_script` (exit 0 healthy). Pure verdicts over what the running
//! instance reports and what the tree records; the command gathers them.

use crate::model::epoch::{Role, TreeState};
use crate::model::status::{Instance, PrimaryStatus, ReplicaState};

/// What a check looks at.
pub struct Facts<'a> {
    /// The tree's recorded state (`None`: hotsync never wrote it).
    pub state: Option<&'a TreeState>,
    /// The running watch (primary) or serve (standby) of the tree, if one answers.
    pub instance: Option<&'a Instance>,
    /// Whether the tree is usable: a source with entries, or a writable standby root.
    pub usable: Result<(), String>,
    /// The largest acceptable lag, in seconds.
    pub max_lag: f64,
}

/// Healthy as the primary: a usable source, recorded as primary and not fenced, its watch
/// running, and each standby (or its `--quorum` of them) connected or (if not) behind by no
/// more than the lag limit.
pub fn primary(f: &Facts) -> Result<String, String> {
    f.usable.clone()?;
    if let Some(st) = f.state {
        if let Some(fence) = &st.fenced {
            return Err(format!(
                "fenced at {} ({}): rejoin it as a standby",
                fence.at, fence.reason
            ));
        }
        if st.role == Role::Standby {
            return Err(format!("the tree is a standby (epoch {})", st.epoch));
        }
    }
    let Some(i) = f.instance else {
        return Err("no hotsync watch runs for this tree".into());
    };
    let behind: Vec<String> = i
        .replicas
        .iter()
        .filter(|r| r.state != ReplicaState::Streaming && r.lag_seconds > f.max_lag)
        .map(|r| {
            format!(
                "standby {} is {} with a lag of {:.1} s (limit {:.1} s)",
                r.standby,
                state_word(r.state),
                r.lag_seconds,
                f.max_lag
            )
        })
        .collect();
    let n = i.replicas.len();
    let need = i.quorum.unwrap_or(n).min(n);
    let fit = n - behind.len();
    if fit < need {
        let quorum = match i.quorum {
            Some(k) => format!(" ({fit} of {n} fit, quorum {k})"),
            None => String::new(),
        };
        return Err(format!("{}{quorum}", behind.join("; ")));
    }
    Ok(format!(
        "primary of epoch {}, {fit} of {n} standby(s) within {:.1} s{}",
        i.epoch,
        f.max_lag,
        i.quorum
            .map(|k| format!(" (quorum {k})"))
            .unwrap_or_default()
    ))
}

/// Fit to hold the service address in the role the tree records (Keepalived's question):
/// a standby as [`standby`] judges it; a primary when its tree is usable, recorded as primary
/// and not fenced. A primary's standbys do not count here: one whose standby died or lags
/// still holds the newest data, and giving up the address would turn that failure into an
/// outage. [`primary`] answers the stricter question of whether it also replicates well.
pub fn current(f: &Facts) -> Result<String, String> {
    let Some(st) = f.state.filter(|st| st.role == Role::Primary) else {
        return standby(f);
    };
    f.usable.clone()?;
    if let Some(fence) = &st.fenced {
        return Err(format!(
            "fenced at {} ({}): rejoin it as a standby",
            fence.at, fence.reason
        ));
    }
    let replicating = match f.instance {
        None => "no watch runs".to_string(),
        Some(i) => {
            let up = i
                .replicas
                .iter()
                .filter(|r| r.state == ReplicaState::Streaming)
                .count();
            format!("{up} of {} standby(s) streaming", i.replicas.len())
        }
    };
    Ok(format!("primary of epoch {}, {replicating}", st.epoch))
}

fn state_word(s: ReplicaState) -> &'static str {
    match s {
        ReplicaState::Streaming => "streaming",
        ReplicaState::Reconciling => "reconciling",
        ReplicaState::Connecting => "disconnected",
        ReplicaState::Paused => "paused",
        ReplicaState::Stopped => "stopped",
    }
}

/// Healthy as a standby: its serve running, the root writable, recorded as a standby, and
/// either a primary heard recently with a lag within the limit, or (no primary) fit to be
/// promoted: it was replicated, and current within the limit when last heard. A node still
/// catching up fails, so it never takes over onto stale data.
pub fn standby(f: &Facts) -> Result<String, String> {
    f.usable.clone()?;
    let Some(i) = f.instance else {
        return Err("no hotsync serve runs for this tree".into());
    };
    if let Some(st) = f.state
        && st.role == Role::Primary
    {
        return Err(format!(
            "the tree is a primary (epoch {}): rejoin it to serve as a standby",
            st.epoch
        ));
    }
    // A primary silent for two heartbeats is taken for gone, as `promote` takes it: its
    // session lingers until the idle limit, but Keepalived must not wait that long.
    let silent = |p: &PrimaryStatus| {
        p.last_heartbeat_age_seconds
            .is_none_or(|a| a > 2.0 * crate::model::liveness::INTERVAL.as_secs_f64())
    };
    if let Some(p) = i.primaries.iter().find(|p| p.connected && !silent(p)) {
        let lag = p.lag_seconds.unwrap_or(f64::INFINITY);
        if lag > f.max_lag {
            return Err(format!(
                "still catching up: primary {} reports a lag of {lag:.1} s (limit {:.1} s)",
                p.primary, f.max_lag
            ));
        }
        return Ok(format!(
            "standby of {} in epoch {}, lag {lag:.1} s{}",
            p.primary,
            i.epoch,
            point_of(i)
        ));
    }
    let gone = |p: &PrimaryStatus| match p.last_heartbeat_age_seconds {
        Some(a) if p.connected => format!("primary {} silent for {a:.1} s", p.primary),
        _ => "no primary connected".to_string(),
    };
    let last = i
        .primaries
        .iter()
        .filter(|p| p.position.seq > 0)
        .filter_map(|p| p.reported_lag_seconds.map(|l| (p, l)))
        .min_by(|a, b| a.1.total_cmp(&b.1));
    match last {
        Some((p, lag)) if lag <= f.max_lag => Ok(format!(
            "{}; fit to be promoted: current within {lag:.1} s when {} was last heard, position \
             {}:{}{}",
            gone(p),
            p.primary,
            p.position.epoch,
            p.position.seq,
            point_of(i)
        )),
        Some((p, lag)) => Err(format!(
            "{}, and it was {lag:.1} s behind {} when last heard: not fit to be promoted",
            gone(p),
            p.primary
        )),
        None => Err("no primary has replicated to it yet: not fit to be promoted".into()),
    }
}

/// What a standby's consistent point is, for the end of its line: at it, or how old the
/// last one is (what a failover to it loses); nothing before it has one.
fn point_of(i: &Instance) -> String {
    match &i.consistency {
        Some(c) if c.at_point => "; at its consistent point".into(),
        Some(c) => match c.age_seconds {
            Some(age) => format!("; last consistent point {age:.1} s old"),
            None => String::new(),
        },
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::epoch::Position;
    use crate::model::status::{Health, PrimaryStatus, ReplicaStatus, Thresholds};

    fn instance(command: &str) -> Instance {
        Instance {
            pid: 1,
            command: command.into(),
            role: if command == "watch" {
                Role::Primary
            } else {
                Role::Standby
            },
            tree: "/t".into(),
            node_id: None,
            listen: None,
            started_at: String::new(),
            uptime_seconds: 1.0,
            protocol: 2,
            epoch: 2,
            health: Health::default(),
            thresholds: Thresholds::default(),
            replicas: vec![],
            primaries: vec![],
            space: None,
            alerts: vec![],
            sync: None,
            quorum: None,
            watches: None,
            consistency: None,
        }
    }
    fn replica(state: ReplicaState, lag: f64) -> ReplicaStatus {
        let mut r = crate::ops::alert::tests_support::replica(lag);
        r.state = state;
        r.connected = state == ReplicaState::Streaming;
        r
    }
    fn primary_seen(connected: bool, lag: Option<f64>, heard: f64, seq: u64) -> PrimaryStatus {
        PrimaryStatus {
            primary: "P".into(),
            addr: None,
            connected,
            since: String::new(),
            since_seconds: 0.0,
            last_heartbeat_age_seconds: connected.then_some(heard),
            lag_seconds: lag,
            reported_lag_seconds: lag,
            pending_changes: None,
            position: Position { epoch: 1, seq },
            sessions: 1,
            files_written: 0,
            bytes_written: 0,
            entries_removed: 0,
            failed_ops: 0,
            last_error: None,
        }
    }
    fn facts<'a>(i: Option<&'a Instance>, st: Option<&'a TreeState>) -> Facts<'a> {
        Facts {
            state: st,
            instance: i,
            usable: Ok(()),
            max_lag: 10.0,
        }
    }

    #[test]
    fn a_primary_is_healthy_with_its_standbys_connected_or_close() {
        let mut i = instance("watch");
        assert!(primary(&facts(Some(&i), None)).is_ok());
        i.replicas = vec![replica(ReplicaState::Streaming, 50.0)];
        assert!(
            primary(&facts(Some(&i), None)).is_ok(),
            "connected, catching up"
        );
        i.replicas = vec![replica(ReplicaState::Connecting, 5.0)];
        assert!(primary(&facts(Some(&i), None)).is_ok(), "down, but close");
        i.replicas = vec![replica(ReplicaState::Connecting, 50.0)];
        assert!(
            primary(&facts(Some(&i), None))
                .unwrap_err()
                .contains("lag of 50.0 s")
        );
        // With a quorum, the standbys beyond it may be down.
        i.replicas = vec![
            replica(ReplicaState::Streaming, 0.0),
            replica(ReplicaState::Connecting, 50.0),
            replica(ReplicaState::Streaming, 0.0),
        ];
        assert!(primary(&facts(Some(&i), None)).is_err(), "all three needed");
        i.quorum = Some(2);
        let ok = primary(&facts(Some(&i), None)).unwrap();
        assert!(
            ok.contains("2 of 3 standby(s)") && ok.contains("quorum 2"),
            "{ok}"
        );
        i.replicas[2] = replica(ReplicaState::Connecting, 60.0);
        let err = primary(&facts(Some(&i), None)).unwrap_err();
        assert!(err.contains("(1 of 3 fit, quorum 2)"), "{err}");
        i.quorum = None;
        assert!(
            primary(&facts(None, None))
                .unwrap_err()
                .contains("no hotsync watch")
        );
        let mut fenced = TreeState::fresh(Role::Primary, None);
        fenced.fenced = Some(crate::model::epoch::Fence {
            at: "t".into(),
            reason: "epoch 2".into(),
        });
        let i = instance("watch");
        assert!(
            primary(&facts(Some(&i), Some(&fenced)))
                .unwrap_err()
                .contains("fenced")
        );
        let mut f = facts(Some(&i), None);
        f.usable = Err("SRC is empty".into());
        assert_eq!(primary(&f).unwrap_err(), "SRC is empty");
    }

    #[test]
    fn a_standby_is_healthy_when_current_or_fit_to_be_promoted() {
        let mut i = instance("serve");
        i.primaries = vec![primary_seen(true, Some(0.2), 0.5, 9)];
        assert!(standby(&facts(Some(&i), None)).is_ok());
        i.primaries = vec![primary_seen(true, Some(40.0), 0.5, 9)];
        assert!(
            standby(&facts(Some(&i), None))
                .unwrap_err()
                .contains("catching up")
        );
        // Silent for two heartbeats: gone, as for promote (its session lingers until the
        // idle limit), and judged by the lag it reported then, not the lag aged since.
        let mut silent = primary_seen(true, Some(5.2), 5.0, 9);
        silent.reported_lag_seconds = Some(0.2);
        i.primaries = vec![silent.clone()];
        let ok = standby(&facts(Some(&i), None)).unwrap();
        assert!(
            ok.contains("silent for 5.0 s; fit to be promoted: current within 0.2 s"),
            "{ok}"
        );
        silent.reported_lag_seconds = Some(30.0);
        i.primaries = vec![silent];
        let err = standby(&facts(Some(&i), None)).unwrap_err();
        assert!(
            err.contains("silent for 5.0 s, and it was 30.0 s behind"),
            "{err}"
        );
        // The primary is gone: fit if it was current when last heard.
        i.primaries = vec![primary_seen(false, Some(0.3), 0.0, 9)];
        assert!(
            standby(&facts(Some(&i), None))
                .unwrap()
                .contains("fit to be promoted")
        );
        i.primaries = vec![primary_seen(false, Some(30.0), 0.0, 9)];
        assert!(
            standby(&facts(Some(&i), None))
                .unwrap_err()
                .contains("not fit")
        );
        i.primaries = vec![];
        assert!(
            standby(&facts(Some(&i), None))
                .unwrap_err()
                .contains("no primary has replicated")
        );
        let promoted = {
            let mut t = TreeState::fresh(Role::Standby, None);
            t.promote(None);
            t
        };
        assert!(
            standby(&facts(Some(&i), Some(&promoted)))
                .unwrap_err()
                .contains("rejoin")
        );
    }

    #[test]
    fn a_standby_says_how_old_its_consistent_point_is() {
        let mut i = instance("serve");
        i.primaries = vec![primary_seen(false, Some(0.3), 0.0, 9)];
        let point = |at_point, age| crate::model::status::ConsistencyStatus {
            policy: crate::model::epoch::Consistency::Consistent,
            point: Some("2026-12-07T23:16:53.589Z".into()),
            position: Some(Position { epoch: 1, seq: 9 }),
            at_point,
            age_seconds: Some(age),
        };
        i.consistency = Some(point(true, 0.0));
        let ok = standby(&facts(Some(&i), None)).unwrap();
        assert!(ok.ends_with("; at its consistent point"), "{ok}");
        i.consistency = Some(point(false, 4.25));
        let ok = standby(&facts(Some(&i), None)).unwrap();
        assert!(ok.ends_with("; last consistent point 4.2 s old"), "{ok}");
    }

    #[test]
    fn the_current_role_is_judged_as_keepalived_needs_it() {
        let mut prim = TreeState::fresh(Role::Standby, None);
        prim.promote(Some("A".into()));
        // A primary whose standby is gone keeps the address; no watch is needed yet either
        // (Keepalived starts it once the node holds the address).
        let mut w = instance("watch");
        w.replicas = vec![replica(ReplicaState::Connecting, 500.0)];
        let ok = current(&facts(Some(&w), Some(&prim))).unwrap();
        assert!(ok.contains("0 of 1 standby(s) streaming"), "{ok}");
        assert!(current(&facts(None, Some(&prim))).is_ok());
        let mut f = facts(None, Some(&prim));
        f.usable = Err("SRC is empty".into());
        assert_eq!(current(&f).unwrap_err(), "SRC is empty");
        let mut fenced = prim.clone();
        fenced.fenced = Some(crate::model::epoch::Fence {
            at: "t".into(),
            reason: "epoch 3".into(),
        });
        assert!(
            current(&facts(None, Some(&fenced)))
                .unwrap_err()
                .contains("rejoin")
        );
        // A standby, or a tree hotsync never recorded, is judged as a standby.
        let mut s = instance("serve");
        s.primaries = vec![primary_seen(true, Some(40.0), 0.5, 9)];
        let stb = TreeState::fresh(Role::Standby, None);
        assert!(
            current(&facts(Some(&s), Some(&stb)))
                .unwrap_err()
                .contains("catching up")
        );
        s.primaries = vec![primary_seen(false, Some(0.1), 0.0, 9)];
        assert!(current(&facts(Some(&s), None)).is_ok());
    }
}
