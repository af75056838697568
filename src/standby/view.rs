//! What a standby's status shows of the primaries it has served: live sessions first, what
//! ended ones left behind otherwise.

use super::sessions::peer_key;
use super::{Position, Standby};
use crate::model::status::PrimaryStatus;
use std::time::{Instant, SystemTime};

impl Standby {
    /// The primaries served since the process started, as `status` shows them.
    pub(crate) fn primaries(&self, now: Instant, wall: SystemTime) -> Vec<PrimaryStatus> {
        let at = |t: SystemTime| {
            (
                crate::model::clock::rfc3339(t),
                wall.duration_since(t).unwrap_or_default().as_secs_f64(),
            )
        };
        let live = self.sessions();
        self.peers
            .lock()
            .unwrap()
            .iter()
            .map(|rec| {
                let session = live
                    .iter()
                    .find(|s| s.writer && peer_key(&s.peer) == rec.key);
                let (since, since_seconds) = match (session, rec.ended_at) {
                    (Some(s), _) => at(s.started_at),
                    (None, Some(t)) => at(t),
                    (None, None) => at(wall),
                };
                let heard = session
                    .map(|s| *s.heard.lock().unwrap())
                    .unwrap_or_default();
                let mut totals = rec.totals.clone();
                if let Some(s) = session {
                    totals += s.stats.report();
                }
                PrimaryStatus {
                    primary: rec.key.clone(),
                    addr: rec.addr.map(|a| a.to_string()),
                    connected: session.is_some(),
                    since,
                    since_seconds,
                    last_heartbeat_age_seconds: heard
                        .last
                        .map(|t| now.saturating_duration_since(t).as_secs_f64()),
                    // Gone: the lag it last reported, for judging a promotion.
                    lag_seconds: match session {
                        Some(s) => s.lag(now).map(|d| d.as_secs_f64()),
                        None => rec.last_lag,
                    },
                    reported_lag_seconds: match session {
                        Some(s) => s.reported_lag().map(|d| d.as_secs_f64()),
                        None => rec.last_lag,
                    },
                    pending_changes: heard.beat.map(|(b, _)| b.pending),
                    position: heard
                        .beat
                        .map(|(b, _)| Position {
                            epoch: b.epoch,
                            seq: b.seq,
                        })
                        .unwrap_or(rec.position),
                    sessions: rec.sessions,
                    files_written: totals.files_written,
                    bytes_written: totals.bytes_written,
                    entries_removed: totals.entries_removed,
                    failed_ops: totals.failed_ops,
                    last_error: if session.is_some() {
                        None
                    } else {
                        rec.last_error.clone()
                    },
                }
            })
            .collect()
    }
}
