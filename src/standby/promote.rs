//! Changing a tree's role: promotion of a standby to the primary of a new epoch (fencing
//! the sessions of the primary it replaces, then waiting for them to stop writing), and
//! rejoin of a former primary as a standby (keeping what it wrote that its standby lacks).

use super::{Access, Position, Role, SessionEntry, Standby, TreeState};
use crate::error::{Error, Result};
use crate::transport::identity::NodeId;
use crate::tree::fsroot;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a promotion did, and what the failover cost (its RPO).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PromoteReport {
    /// The tree promoted, as an absolute path.
    pub tree: String,
    /// When (RFC 3339).
    pub at: String,
    /// The epoch the tree is now the primary of.
    pub epoch: u64,
    /// The epoch it was in before, and that epoch's primary.
    pub previous_epoch: u64,
    pub previous_primary: Option<String>,
    /// It was a primary already: nothing was done.
    pub already: bool,
    /// The last position durable here.
    pub position: Position,
    /// How old the newest change made durable here is (when this process saw it).
    pub newest_change_age_seconds: Option<f64>,
    /// What the old primary last said: how long ago, and its lag and queue then.
    pub primary_last_heard_seconds_ago: Option<f64>,
    pub primary_last_lag_seconds: Option<f64>,
    pub primary_last_pending: Option<u64>,
    /// The failover's RPO: changes the old primary made in this many seconds before the
    /// promotion may be missing here (its last heartbeat's age plus the lag it reported;
    /// what it did after that heartbeat is unknown).
    pub rpo_seconds: Option<f64>,
    /// Sessions of the old primary cut with the fencing error.
    pub fenced_sessions: u64,
    /// The consistent point the promoted tree was given back (DESIGN §10): the primary's
    /// tree as it stood then (RFC 3339, the primary's clock), after batch
    /// `consistent_position`. `None`: the tree never had one (an older primary).
    pub consistent_point: Option<String>,
    pub consistent_position: Option<Position>,
    /// How long before the primary was last heard (or before the promotion, when it was
    /// not heard in this process) the consistent point was: what a consistent failover
    /// loses at most.
    pub consistent_point_age_seconds: Option<f64>,
    /// The promoted tree is the primary's tree at that point; false when changes came
    /// after it and were kept (`--consistency latest`) or could not be undone.
    pub consistent: bool,
    /// Changes after the consistent point that were undone.
    pub rolled_back: u64,
}

impl Standby {
    /// Makes this standby the primary of a new epoch, `me` (this node's ID) its primary:
    /// refused while a primary is still heartbeating (unless `force`), recorded durably,
    /// then every writing session is fenced. Running it again changes nothing.
    ///
    /// # Errors
    /// [`Error::Refused`]: a primary is alive and `force` was not given, or the state
    /// cannot be written (nothing changed then).
    pub fn promote(&self, force: bool, me: Option<NodeId>) -> Result<PromoteReport> {
        let now = Instant::now();
        let mut st = self.state.lock().unwrap();
        if st.role == Role::Primary
            && let Some(Ok(Some(disk))) = self.with_area(|a| a.read_state())
        {
            // A watch of this primary tree may have recorded a fence since.
            *st = disk;
        }
        if let (Role::Primary, Some(fence)) = (st.role, &st.fenced) {
            return Err(Error::Refused(format!(
                "refusing to promote {}: it is a fenced former primary ({}, at {}), so a newer \
                 epoch holds writes this tree lacks; run `hotsync rejoin` and let it catch up \
                 first",
                self.path.display(),
                fence.reason,
                fence.at
            )));
        }
        let writers: Vec<Arc<SessionEntry>> =
            self.sessions().into_iter().filter(|s| s.writer).collect();
        let mut report = self.promotion_report(&st, writers.first(), now);
        if report.already {
            return Ok(report);
        }
        if self.access != Access::Write {
            return Err(Error::Refused(format!(
                "{} is open read-only here",
                self.path.display()
            )));
        }
        if !force {
            self.refuse_if_alive(&writers, &report, now)?;
        }
        self.record_promotion(&mut st, me)?;
        report.epoch = st.epoch;
        drop(st);
        self.hand_over(&writers, &mut report);
        self.open_consistent_point(&mut report)?;
        Ok(report)
    }

    /// Once nobody writes the tree any more: gives it back at its last consistent point
    /// when changes after it are kept in the undo log, and says what the tree is.
    fn open_consistent_point(&self, report: &mut PromoteReport) -> Result<()> {
        let rolled = self.roll_back().map_err(|e| {
            Error::Refused(format!(
                "{} is promoted, but cannot be rolled back to its consistent point: {e}; \
                 run `hotsync promote` again to retry before starting the application",
                self.path.display()
            ))
        })?;
        let st = self.state();
        let Some(point) = st.consistent else {
            return Ok(());
        };
        let at = std::time::UNIX_EPOCH + Duration::from_millis(point.at_ms);
        report.consistent_point = Some(crate::model::clock::rfc3339(at));
        report.consistent_position = Some(point.position);
        let now = std::time::SystemTime::now();
        let heard =
            now - Duration::from_secs_f64(report.primary_last_heard_seconds_ago.unwrap_or(0.0));
        report.consistent_point_age_seconds =
            Some(heard.duration_since(at).unwrap_or_default().as_secs_f64());
        match rolled {
            Some(r) => {
                report.rolled_back = r.undone as u64;
                report.consistent = r.unkept.is_empty();
                if !r.unkept.is_empty() {
                    tracing::warn!(
                        "{} changes could not be undone (another filesystem inside the tree, \
                         first {}): the promoted tree is not at its consistent point there",
                        r.unkept.len(),
                        r.unkept[0]
                    );
                }
            }
            None => report.consistent = !self.changed_since_point(),
        }
        Ok(())
    }

    /// What a promotion at `now` starts from: the tree's state, and what its writing
    /// session (if any) last heard from the primary it replaces.
    fn promotion_report(
        &self,
        st: &TreeState,
        writer: Option<&Arc<SessionEntry>>,
        now: Instant,
    ) -> PromoteReport {
        let mut report = PromoteReport {
            tree: crate::tree::operand::shown_absolute(&self.path),
            at: crate::model::clock::now_rfc3339(),
            epoch: st.epoch,
            previous_epoch: st.epoch,
            previous_primary: st.primary().map(String::from),
            already: st.role == Role::Primary,
            position: st.position,
            newest_change_age_seconds: self
                .committed_at
                .lock()
                .unwrap()
                .map(|(t, _)| now.duration_since(t).as_secs_f64()),
            primary_last_heard_seconds_ago: None,
            primary_last_lag_seconds: None,
            primary_last_pending: None,
            rpo_seconds: None,
            fenced_sessions: 0,
            consistent_point: None,
            consistent_position: None,
            consistent_point_age_seconds: None,
            consistent: false,
            rolled_back: 0,
        };
        if let Some(w) = writer {
            let heard = *w.heard.lock().unwrap();
            report.primary_last_heard_seconds_ago =
                heard.last.map(|t| now.duration_since(t).as_secs_f64());
            report.primary_last_lag_seconds = w.reported_lag().map(|d| d.as_secs_f64());
            report.primary_last_pending = heard.beat.map(|(b, _)| b.pending);
            report.rpo_seconds = heard
                .beat
                .map(|(_, at)| now.duration_since(at).as_secs_f64())
                .zip(report.primary_last_lag_seconds)
                .map(|(ago, lag)| ago + lag);
        }
        report
    }

    /// Refuses the promotion while one of `writers` still heartbeats: a promotion must not
    /// race a live primary unless forced.
    fn refuse_if_alive(
        &self,
        writers: &[Arc<SessionEntry>],
        report: &PromoteReport,
        now: Instant,
    ) -> Result<()> {
        // Two missed heartbeats: not heartbeating any more (Keepalived takes 3 s or more
        // to decide the primary is gone).
        let alive = writers.iter().find(|w| {
            let heard = w.heard.lock().unwrap().last;
            heard.is_some_and(|t| now.duration_since(t) < 2 * crate::model::liveness::INTERVAL)
        });
        match alive {
            Some(w) => Err(Error::Refused(format!(
                "refusing to promote {}: {} is still connected and heartbeating (last \
                 heartbeat {:.1} s ago): stop it first (a promotion must not race a live \
                 primary), or use --force to fence it",
                self.path.display(),
                w.peer.describe(),
                report.primary_last_heard_seconds_ago.unwrap_or_default()
            ))),
            None => Ok(()),
        }
    }

    /// Enters the new epoch in `st` and writes it durably; on failure `st` is left as it
    /// was, so nothing has changed.
    fn record_promotion(&self, st: &mut TreeState, me: Option<NodeId>) -> Result<()> {
        let shown = self.path.display();
        let before = st.clone();
        st.promote(me.map(|id| id.to_string()));
        st.updated = crate::model::clock::now_rfc3339();
        let written = self.with_area(|a| a.write_state(st));
        match written {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => {
                *st = before;
                Err(Error::Refused(format!(
                    "cannot promote {shown}: cannot write {}: {e}",
                    self.state_shown()
                )))
            }
            None => {
                *st = before;
                Err(Error::Refused(format!(
                    "cannot promote {shown}: it is not held for writing (is it writable?)"
                )))
            }
        }
    }

    /// The hand-over, once the new epoch is durable: every session of the old primary is
    /// fenced, and the tree is handed over only once they have stopped writing.
    fn hand_over(&self, writers: &[Arc<SessionEntry>], report: &mut PromoteReport) {
        let shown = self.path.display();
        for w in writers {
            let why = format!(
                "the standby {shown} was promoted to primary at epoch {}: this primary (epoch \
                 {}) is fenced; make it a standby with `hotsync rejoin`",
                report.epoch, report.previous_epoch
            );
            w.fence(&why);
            report.fenced_sessions += 1;
            self.event(
                "fenced",
                serde_json::json!({"primary": w.peer.describe(), "reason": why}),
            );
        }
        // A fenced session may be mid-commit: the promoted tree is handed over only once
        // it has stopped writing, with nothing staged left behind.
        self.settle_writers(writers, Duration::from_secs(5));
        self.event(
            "promoted",
            serde_json::to_value(&*report).unwrap_or_default(),
        );
        tracing::warn!(
            "promoted {shown} to primary at epoch {} (was epoch {}{}); {} session(s) fenced",
            report.epoch,
            report.previous_epoch,
            report
                .previous_primary
                .as_ref()
                .map(|p| format!(", primary {p}"))
                .unwrap_or_default(),
            report.fenced_sessions
        );
    }

    /// Turns this tree, a former primary, into a standby: what it changed after its standby
    /// last confirmed it is moved to `.hotsync/diverged/EPOCH/` first (entries matching
    /// `excludes` stay), then the role is recorded. Safe to run again.
    ///
    /// # Errors
    /// [`Error::Refused`] while a watch still replicates the tree, or when moving or
    /// recording fails (the role is then unchanged).
    ///
    /// With `if_fenced`, only a tree known to be superseded (a watch or this serve met a
    /// newer epoch) is turned; another primary is left as it is (`still_primary`). That is
    /// what Keepalived's `notify_backup` runs, which also fires on the rightful primary
    /// every time Keepalived starts.
    pub fn rejoin(
        &self,
        excludes: &[String],
        if_fenced: bool,
    ) -> Result<crate::standby::rejoin::RejoinReport> {
        let shown = self.path.display();
        let filter =
            crate::model::filter::Filter::new(excludes).map_err(|e| Error::Usage(e.to_string()))?;
        let mut st = self.state.lock().unwrap();
        let root = self
            .root()
            .map_err(|e| Error::io(format!("cannot open {shown}"), e))?;
        let nothing = |st: &TreeState, still_primary: bool| crate::standby::rejoin::RejoinReport {
            tree: crate::tree::operand::shown_absolute(&self.path),
            already: !still_primary,
            epoch: st.epoch,
            kept_in: String::new(),
            diverged: vec![],
            changed_dirs: vec![],
            no_record: false,
            still_primary,
        };
        if st.role == Role::Standby {
            return Ok(nothing(&st, false));
        }
        let guard = self.lock.lock().unwrap();
        let Some((area, _)) = guard.as_ref() else {
            return Err(Error::Refused(format!(
                "cannot rejoin {shown}: it is not held for writing (is it writable?)"
            )));
        };
        // No watch may replicate the tree while it turns into a standby.
        let watch = area
            .try_lock(crate::tree::reserved::PRIMARY_LOCK)
            .map_err(|e| Error::io(format!("cannot lock {shown}/.hotsync/primary.lock"), e))?;
        if watch.is_none() && if_fenced {
            // A running watch is not fenced (one that is stops, and records it).
            return Ok(nothing(&st, true));
        }
        if watch.is_none() {
            return Err(Error::Refused(format!(
                "cannot rejoin {shown}: a hotsync watch still replicates it as a primary; stop it first"
            )));
        }
        // The watch that ran since this process read the state recorded more: its last
        // acknowledgement, perhaps a fence.
        match area.read_state() {
            Ok(Some(disk)) => *st = disk,
            Ok(None) => {}
            Err(e) => return Err(Error::Refused(format!("cannot rejoin {shown}: {e}"))),
        }
        if st.role == Role::Standby {
            return Ok(nothing(&st, false));
        }
        if if_fenced && st.fenced.is_none() {
            return Ok(nothing(&st, true));
        }
        let report =
            crate::standby::rejoin::keep_diverged(root, area, &st, &filter).map_err(|e| {
                Error::Refused(format!(
                    "cannot rejoin {shown}: keeping its diverged files failed: {e}"
                ))
            })?;
        let before = st.clone();
        st.rejoin();
        st.updated = crate::model::clock::now_rfc3339();
        if let Err(e) = area.write_state(&st) {
            *st = before;
            return Err(Error::Refused(format!(
                "cannot rejoin {shown}: cannot write {}: {e}",
                self.state_shown()
            )));
        }
        self.event(
            "rejoined",
            serde_json::to_value(&report).unwrap_or_default(),
        );
        tracing::warn!(
            "{shown} is a standby now (it was the primary of epoch {}); {} diverged entries kept in {}",
            report.epoch,
            report.diverged.len(),
            report.kept_in
        );
        Ok(report)
    }

    /// Waits up to `limit` for the writing sessions in `writers` to end (their staged
    /// batches dropped, their temps removed), then empties the temp area of anything a
    /// session cut mid-write left. A promoted tree holds no temps.
    fn settle_writers(&self, writers: &[Arc<SessionEntry>], limit: Duration) {
        let start = Instant::now();
        while start.elapsed() < limit
            && self
                .sessions()
                .iter()
                .any(|s| writers.iter().any(|w| Arc::ptr_eq(s, w)))
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(t) = self.temps() {
            for name in fsroot::list_dir(t.area()).unwrap_or_default() {
                let _ = fsroot::remove_tree(t.area(), &name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fenced_former_primary_is_refused_promotion_in_one_well_spaced_line() {
        let t = tempfile::tempdir().unwrap();
        let s = Standby::open(t.path(), Access::Write).unwrap();
        let mut st = s.state();
        st.promote(None);
        st.fenced = Some(crate::model::epoch::Fence {
            at: "2026-01-01T00:00:00Z".into(),
            reason: "a standby of epoch 3 took over".into(),
        });
        s.write_state(&st).unwrap();
        let e = s.promote(false, None).unwrap_err().to_string();
        assert!(
            e.contains("fenced former primary") && e.contains("run `hotsync rejoin`"),
            "{e}"
        );
        assert!(!e.contains("  ") && !e.contains('\n'), "{e:?}");
    }
}
