//! `hotsync status`: asks every running watch and serve of this home directory, renders
//! their snapshots (human or JSON), and exits 0 healthy, 1 degraded, 2 nothing running or
//! down.

use crate::args::{Cli, StatusArgs};
use hotsync::model::status::{HealthState, Instance, ReplicaState, human_bytes};
use hotsync::ops::control::{self, Answer};
use std::fmt::Write as _;

pub fn status(cli: &Cli, args: &StatusArgs) -> anyhow::Result<u8> {
    let home = hotsync::transport::identity::home_dir(cli.home.as_deref())?;
    let answers = control::status_all(&home);
    let mut instances = Vec::new();
    let mut unresponsive = Vec::new();
    for a in answers {
        match a {
            Answer::Status(i) => instances.push(*i),
            Answer::Unresponsive { socket, why } => unresponsive.push((socket, why)),
        }
    }
    let overall = if instances.is_empty() || !unresponsive.is_empty() {
        HealthState::Down
    } else {
        instances
            .iter()
            .map(|i| i.health.state)
            .max()
            .unwrap_or(HealthState::Down)
    };
    if args.json {
        let v = serde_json::json!({
            "health": overall,
            "instances": instances,
            "unresponsive": unresponsive.iter().map(|(s, why)| serde_json::json!({
                "socket": s.display().to_string(), "error": why
            })).collect::<Vec<_>>(),
        });
        println!("{v}");
    } else {
        if instances.is_empty() && unresponsive.is_empty() {
            println!(
                "no hotsync watch or serve is running with home {}",
                home.display()
            );
        }
        for i in &instances {
            print!("{}", render(i));
        }
        for (s, why) in &unresponsive {
            println!("DOWN: {} does not answer: {why}", s.display());
        }
    }
    Ok(overall.exit_code())
}

fn ago(secs: f64) -> String {
    let s = secs.max(0.0);
    if s < 10.0 {
        format!("{s:.1} s")
    } else if s < 120.0 {
        format!("{s:.0} s")
    } else if s < 7200.0 {
        format!("{:.0} min", s / 60.0)
    } else if s < 172_800.0 {
        format!("{:.1} h", s / 3600.0)
    } else {
        format!("{:.1} d", s / 86_400.0)
    }
}

fn health_word(h: HealthState) -> &'static str {
    match h {
        HealthState::Healthy => "HEALTHY",
        HealthState::Degraded => "DEGRADED",
        HealthState::Down => "DOWN",
    }
}

fn space_line(sp: &hotsync::model::status::Space) -> String {
    format!("{} ({:.0}% free)", sp.describe(), sp.free_percent())
}

/// One instance, human-readable.
fn render(i: &Instance) -> String {
    let mut o = String::new();
    let role = match i.role {
        hotsync::standby::Role::Primary => "primary",
        hotsync::standby::Role::Standby => "standby",
    };
    let _ = write!(
        o,
        "{} (pid {}): {role} of {}, epoch {}, up {}",
        i.command,
        i.pid,
        i.tree,
        i.epoch,
        ago(i.uptime_seconds)
    );
    if let Some(l) = &i.listen {
        let _ = write!(o, ", listening on {l}");
    }
    let _ = writeln!(o, ": {}", health_word(i.health.state));
    if let Some(w) = &i.watches {
        let _ = writeln!(
            o,
            "  watching {} directories{}",
            w.directories,
            if w.complete {
                format!(" (set up in {:.1} s)", w.setup_seconds)
            } else {
                format!(", still setting up ({:.1} s so far)", w.setup_seconds)
            }
        );
    }
    for r in &i.replicas {
        let state = match r.state {
            ReplicaState::Streaming => "streaming",
            ReplicaState::Reconciling => "reconciling",
            ReplicaState::Connecting => "DISCONNECTED, retrying",
            ReplicaState::Paused => "PAUSED",
            ReplicaState::Stopped => "stopping",
        };
        let _ = writeln!(
            o,
            "  standby {}{}: {state} since {} ({} ago)",
            r.standby,
            r.server_id
                .as_ref()
                .map(|s| format!(" (ID {s})"))
                .unwrap_or_default(),
            r.since,
            ago(r.since_seconds)
        );
        let beat = r
            .last_heartbeat_age_seconds
            .map(|a| format!("last heartbeat {} ago", ago(a)))
            .unwrap_or_else(|| "no heartbeat".into());
        let _ = writeln!(
            o,
            "    lag {:.3} s, {} change(s) pending, {beat}, position {}:{}",
            r.lag_seconds, r.pending_changes, r.position.epoch, r.position.seq
        );
        let _ = writeln!(
            o,
            "    replicated {} files ({}), {} reconnect(s), {} vanished while read",
            r.files_replicated,
            human_bytes(r.bytes_replicated),
            r.reconnects,
            r.vanished
        );
        match &r.last_verify {
            Some(v) => {
                let what = match (&v.error, v.identical) {
                    (Some(e), _) => format!("failed: {e}"),
                    (None, true) => "identical".to_string(),
                    (None, false) => {
                        format!("{} difference(s), {} repaired", v.differences, v.repaired)
                    }
                };
                let _ = writeln!(o, "    last verify {}: {what}", v.at);
            }
            None => {
                let _ = writeln!(o, "    no background verify yet");
            }
        }
        match r.consistent_point_age_seconds {
            Some(0.0) => {
                let _ = writeln!(o, "    at a consistent point (nothing changed since)");
            }
            Some(a) => {
                let _ = writeln!(o, "    last consistent point {} ago", ago(a));
            }
            None => {}
        }
        if let Some(sp) = &r.standby_space {
            let _ = writeln!(o, "    standby disk: {}", space_line(sp));
        }
        if let Some(e) = &r.last_error {
            let _ = writeln!(o, "    last error: {e}");
        }
    }
    if let Some(c) = &i.consistency {
        let policy = match c.policy {
            hotsync::model::epoch::Consistency::Consistent => "a failover rolls back to it",
            hotsync::model::epoch::Consistency::Latest => "--consistency latest",
        };
        let _ = match (&c.point, c.age_seconds) {
            (Some(at), _) if c.at_point => {
                writeln!(o, "  at the consistent point of {at} ({policy})")
            }
            (Some(at), Some(age)) => writeln!(
                o,
                "  last consistent point {at}, {} ago ({policy})",
                ago(age)
            ),
            _ => writeln!(o, "  no consistent point yet ({policy})"),
        };
    }
    for p in &i.primaries {
        let _ = writeln!(
            o,
            "  primary {}{}: {} since {} ({} ago)",
            p.primary,
            p.addr
                .as_ref()
                .map(|a| format!(" from {a}"))
                .unwrap_or_default(),
            if p.connected {
                "connected"
            } else {
                "DISCONNECTED"
            },
            p.since,
            ago(p.since_seconds)
        );
        if p.connected {
            let beat = p
                .last_heartbeat_age_seconds
                .map(|a| format!("last heartbeat {} ago", ago(a)))
                .unwrap_or_else(|| "no heartbeat yet".into());
            let lag = p
                .lag_seconds
                .map(|l| format!("lag {l:.3} s"))
                .unwrap_or_else(|| "lag unknown".into());
            let _ = writeln!(
                o,
                "    {lag}, {} change(s) pending on the primary, {beat}, position {}:{}",
                p.pending_changes.unwrap_or(0),
                p.position.epoch,
                p.position.seq
            );
        }
        let _ = writeln!(
            o,
            "    wrote {} files ({}), removed {} entries, {} session(s){}",
            p.files_written,
            human_bytes(p.bytes_written),
            p.entries_removed,
            p.sessions,
            p.last_error
                .as_ref()
                .map(|e| format!("; last session ended: {e}"))
                .unwrap_or_default()
        );
    }
    if let Some(sp) = &i.space {
        let _ = writeln!(o, "  disk: {}", space_line(sp));
    }
    for a in &i.alerts {
        let _ = writeln!(
            o,
            "  ALERT {} firing for {} since {}: {}",
            a.alert, a.standby, a.since, a.value
        );
    }
    for r in &i.health.reasons {
        let _ = writeln!(o, "  ! {r}");
    }
    o
}
