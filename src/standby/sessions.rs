//! The registry of the sessions a standby has admitted: who they are, what they did and
//! last said, how to cut them; and the rules that admit one (one writer at a time, by
//! epoch). What ended sessions leave behind is kept per primary for the status view.

use super::{Access, Position, Standby};
use crate::error::ErrorCode;
use crate::model::epoch::{Decision, TreeState};
use crate::model::liveness::silence;
use crate::transport::identity::NodeId;
use crate::wire::heartbeat::Pulse;
use crate::wire::protocol::Heartbeat;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Who is at the other end of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Peer {
    /// The primary's ID (QUIC); `None` for the in-process primary of a local DEST.
    pub(crate) id: Option<NodeId>,
    /// Where it connects from (QUIC); `None` in process.
    pub(crate) addr: Option<SocketAddr>,
}

impl Peer {
    /// The primary of a local DEST, in this very process.
    pub(crate) fn local() -> Peer {
        Peer {
            id: None,
            addr: None,
        }
    }

    /// The peer as messages name it: its ID and address, or the local primary.
    pub(crate) fn describe(&self) -> String {
        match (&self.id, &self.addr) {
            (Some(id), Some(a)) => format!("primary {id} from {a}"),
            (Some(id), None) => format!("primary {id}"),
            _ => "the local primary".to_string(),
        }
    }
}

/// Counters of one session, updated as it goes.
#[derive(Debug, Default)]
pub(crate) struct SessionStats {
    /// Regular files received whole or by delta (symlinks and links are not counted).
    pub(crate) files_written: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    pub(crate) entries_removed: AtomicU64,
    pub(crate) failed_ops: AtomicU64,
}

/// What one session did, for the standby's log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct SessionReport {
    pub(crate) files_written: u64,
    pub(crate) bytes_written: u64,
    pub(crate) entries_removed: u64,
    pub(crate) failed_ops: u64,
}

impl std::ops::AddAssign for SessionReport {
    fn add_assign(&mut self, r: SessionReport) {
        self.files_written += r.files_written;
        self.bytes_written += r.bytes_written;
        self.entries_removed += r.entries_removed;
        self.failed_ops += r.failed_ops;
    }
}

impl SessionStats {
    /// The counters as they are now.
    pub(crate) fn report(&self) -> SessionReport {
        SessionReport {
            files_written: self.files_written.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            entries_removed: self.entries_removed.load(Ordering::Relaxed),
            failed_ops: self.failed_ops.load(Ordering::Relaxed),
        }
    }
}

/// What a session's heartbeats have told the standby.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Heard {
    /// When anything was last heard on the session's heartbeat stream.
    pub(crate) last: Option<Instant>,
    /// The primary's last heartbeat, and when it arrived.
    pub(crate) beat: Option<(Heartbeat, Instant)>,
}

/// An admitted session, as the registry sees it.
pub(crate) struct SessionEntry {
    /// Tells this session from any other of the process's life.
    pub(crate) serial: u64,
    /// Who the session serves.
    pub(crate) peer: Peer,
    /// A writing session (at most one at a time); the others only read.
    pub(crate) writer: bool,
    /// When it was admitted, for ageing and for showing.
    pub(crate) started: Instant,
    pub(crate) started_at: SystemTime,
    /// What it did so far (read live by the status view).
    pub(crate) stats: SessionStats,
    /// What its heartbeats said.
    pub(crate) heard: Mutex<Heard>,
    /// Ends the session's connection (promotion fences a stale primary through it).
    cut: Cut,
}

/// Cuts a session's connection because its primary has been fenced by a newer epoch,
/// telling the peer why (it must stop writing). The only cut the registry makes: a session
/// that fails on its own side ends its connection itself.
pub(crate) type Cut = Box<dyn Fn(&str) + Send + Sync>;

impl SessionEntry {
    /// The lag the primary's last heartbeat reported, as it was then.
    pub(crate) fn reported_lag(&self) -> Option<Duration> {
        let (beat, _) = self.heard.lock().unwrap().beat?;
        Some(beat.oldest_pending_ms.map_or(Duration::ZERO, |oldest| {
            Duration::from_millis(beat.sent_at_ms.saturating_sub(oldest))
        }))
    }

    /// Cuts the session because its primary has been fenced.
    pub(crate) fn fence(&self, reason: &str) {
        (self.cut)(reason)
    }

    /// The primary's replication lag as of `now`: what its last heartbeat reported, aged
    /// by the time since (the primary's own clock measured both ends of the first part, so
    /// a clock difference between the nodes does not enter). `None` before a heartbeat.
    pub(crate) fn lag(&self, now: Instant) -> Option<Duration> {
        let (beat, at) = self.heard.lock().unwrap().beat?;
        Some(match beat.oldest_pending_ms {
            None => Duration::ZERO,
            Some(oldest) => {
                Duration::from_millis(beat.sent_at_ms.saturating_sub(oldest))
                    + now.saturating_duration_since(at)
            }
        })
    }
}

/// What the standby keeps of each primary it has served (for `status`).
#[derive(Debug, Clone, Default)]
pub(super) struct PeerRecord {
    pub(super) key: String,
    pub(super) addr: Option<SocketAddr>,
    pub(super) sessions: u64,
    pub(super) ended_at: Option<SystemTime>,
    pub(super) last_error: Option<String>,
    /// Totals of the sessions that ended.
    pub(super) totals: SessionReport,
    pub(super) position: Position,
    /// The lag the primary reported in its last heartbeat (seconds).
    pub(super) last_lag: Option<f64>,
}

/// Why a session was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) code: ErrorCode,
    pub(crate) message: String,
}

impl Standby {
    /// Admits a session from `peer`. A writer needs the tree's lock, a writable tree, and
    /// no other writer; readers are always admitted. `cut` fences the session's connection.
    /// The session stays in the registry until the returned guard is dropped.
    pub(crate) fn admit(
        &self,
        peer: Peer,
        writer: Option<u64>,
        cut: Cut,
    ) -> std::result::Result<Admission<'_>, Refusal> {
        let refused = |message: String| Refusal {
            code: ErrorCode::Refused,
            message,
        };
        let epoch = writer;
        let writer = writer.is_some();
        if writer {
            if self.access != Access::Write || self.root.is_none() {
                return Err(refused(format!(
                    "DEST {} is open read-only here",
                    self.path.display()
                )));
            }
            let locked = self.lock.lock().unwrap().is_some();
            if !locked {
                self.take_lock(Duration::ZERO)
                    .map_err(|e| refused(e.message()))?;
            }
            self.probe_writable().map_err(refused)?;
        }
        let mut sessions = self.sessions.lock().unwrap();
        if writer && let Some(w) = sessions.iter().find(|s| s.writer) {
            return Err(Refusal {
                code: ErrorCode::Busy,
                message: format!(
                    "DEST {} is in use by {} (since {}): one primary writes a tree at a time",
                    self.path.display(),
                    w.peer.describe(),
                    crate::model::clock::rfc3339(w.started_at)
                ),
            });
        }
        if let Some(epoch) = epoch {
            self.admit_epoch(epoch, &peer)?;
        }
        if writer {
            let key = peer_key(&peer);
            let mut peers = self.peers.lock().unwrap();
            let rec = match peers.iter_mut().position(|p| p.key == key) {
                Some(i) => &mut peers[i],
                None => {
                    peers.push(PeerRecord {
                        key,
                        ..PeerRecord::default()
                    });
                    peers.last_mut().unwrap()
                }
            };
            rec.sessions += 1;
            rec.addr = peer.addr;
        }
        let entry = Arc::new(SessionEntry {
            serial: self.next_serial.fetch_add(1, Ordering::Relaxed),
            peer,
            writer,
            started: Instant::now(),
            started_at: SystemTime::now(),
            stats: SessionStats::default(),
            heard: Mutex::new(Heard::default()),
            cut,
        });
        sessions.push(entry.clone());
        Ok(Admission {
            standby: self,
            entry,
            error: None,
        })
    }

    /// The sessions admitted now.
    pub(crate) fn sessions(&self) -> Vec<Arc<SessionEntry>> {
        self.sessions.lock().unwrap().clone()
    }

    /// Applies the epoch rules to a writer at `epoch`; a newer epoch is adopted, durably,
    /// before the primary writes anything.
    fn admit_epoch(&self, epoch: u64, peer: &Peer) -> std::result::Result<(), Refusal> {
        let who = peer.id.map(|id| id.to_string());
        let shown = format!("the standby {}", self.path.display());
        let mut st = self.state.lock().unwrap();
        match crate::model::epoch::admit(&st, epoch, who.as_deref(), &shown) {
            Decision::Refuse { code, message } => {
                if st.superseded_by(epoch) {
                    self.record_superseded(&mut st, epoch, peer);
                }
                Err(Refusal { code, message })
            }
            Decision::Admit { adopt } => {
                let before = st.clone();
                st.adopt(epoch, who);
                if adopt || *st != before {
                    st.updated = crate::model::clock::now_rfc3339();
                    let written = self.with_area(|a| a.write_state(&st)).unwrap_or(Ok(()));
                    if let Err(e) = written {
                        *st = before;
                        return Err(Refusal {
                            code: ErrorCode::Refused,
                            message: format!(
                                "cannot record epoch {epoch} in {}/.hotsync/state: {e}",
                                self.path.display()
                            ),
                        });
                    }
                    if adopt {
                        tracing::info!("entered epoch {epoch} with {}", peer.describe());
                        self.event(
                            "epoch",
                            serde_json::json!({"epoch": epoch, "primary": st.primary()}),
                        );
                    }
                }
                Ok(())
            }
        }
    }

    /// Records on this primary tree that a primary of the newer `epoch` exists: the tree is
    /// fenced, so `check` calls it unfit and `rejoin --if-fenced` acts on it. Only while no
    /// watch holds the tree: a running watch owns the primary's record (and learns of the
    /// new epoch itself when it meets the new primary's standbys).
    fn record_superseded(&self, st: &mut TreeState, epoch: u64, peer: &Peer) {
        let reason = format!(
            "{} is the primary of epoch {epoch}, newer than this tree's {}",
            peer.describe(),
            st.epoch
        );
        let recorded = self.with_area(|a| -> io::Result<bool> {
            let Some(_watch) = a.try_lock(crate::tree::reserved::PRIMARY_LOCK)? else {
                return Ok(false);
            };
            // The watch that ran last may have recorded more than this process knows.
            let mut disk = match a.read_state() {
                Ok(Some(d)) => d,
                _ => st.clone(),
            };
            if disk.fenced.is_some() || !disk.superseded_by(epoch) {
                *st = disk;
                return Ok(false);
            }
            disk.fenced = Some(crate::model::epoch::Fence {
                at: crate::model::clock::now_rfc3339(),
                reason: reason.clone(),
            });
            disk.updated = crate::model::clock::now_rfc3339();
            a.write_state(&disk)?;
            *st = disk;
            Ok(true)
        });
        match recorded {
            Some(Ok(true)) => {
                tracing::warn!(
                    "{} is fenced: {reason}; run `hotsync rejoin` to make it a standby",
                    self.path.display()
                );
                self.event(
                    "superseded",
                    serde_json::json!({"epoch": epoch, "reason": reason}),
                );
            }
            Some(Err(e)) => {
                tracing::warn!("cannot record the fence in {}: {e}", self.state_shown())
            }
            _ => {}
        }
    }
}

/// The key a primary is recorded under: its ID, or `local`.
pub(super) fn peer_key(peer: &Peer) -> String {
    peer.id
        .map_or_else(|| "local".to_string(), |id| id.to_string())
}

/// A session's place in the registry; dropping it ends the session there.
pub(crate) struct Admission<'s> {
    standby: &'s Standby,
    pub(crate) entry: Arc<SessionEntry>,
    /// Why the session failed, if it did (set by [`Admission::finish`]).
    error: Option<String>,
}

impl Admission<'_> {
    /// Ends the session, recording why it failed, if it did.
    pub(crate) fn finish(mut self, error: Option<String>) {
        self.error = error;
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        let e = &self.entry;
        self.standby
            .sessions
            .lock()
            .unwrap()
            .retain(|s| s.serial != e.serial);
        if e.writer {
            let key = peer_key(&e.peer);
            let mut peers = self.standby.peers.lock().unwrap();
            if let Some(rec) = peers.iter_mut().find(|p| p.key == key) {
                rec.totals += e.stats.report();
                rec.ended_at = Some(SystemTime::now());
                rec.last_error = self.error.take();
                rec.last_lag = e.reported_lag().map(|d| d.as_secs_f64()).or(rec.last_lag);
                if let Some((b, _)) = e.heard.lock().unwrap().beat {
                    rec.position = Position {
                        epoch: b.epoch,
                        seq: b.seq,
                    };
                }
            }
            drop(peers);
            self.standby.save_if_due(Instant::now(), true);
        }
    }
}

/// The standby's side of one session's heartbeat.
pub(crate) struct SessionPulse<'s> {
    pub(crate) standby: &'s Standby,
    pub(crate) entry: Arc<SessionEntry>,
}

impl Pulse for SessionPulse<'_> {
    fn beat(&self, _now: Instant) -> Heartbeat {
        let st = self.standby.state();
        Heartbeat {
            epoch: st.epoch,
            seq: st.position.seq,
            sent_at_ms: crate::model::clock::unix_ms(SystemTime::now()),
            oldest_pending_ms: None,
            pending: 0,
            space: self.standby.space(),
        }
    }

    fn silent(&self, now: Instant) -> Option<String> {
        let last = self.entry.heard.lock().unwrap().last;
        silence(
            last.unwrap_or(self.entry.started),
            now,
            crate::model::liveness::IDLE,
            "the primary",
        )
    }

    fn heard(&self, beat: &Heartbeat, now: Instant) {
        *self.entry.heard.lock().unwrap() = Heard {
            last: Some(now),
            beat: Some((*beat, now)),
        };
        if self.entry.writer {
            let pos = Position {
                epoch: beat.epoch,
                seq: beat.seq,
            };
            self.standby.note_position(pos, self.entry.peer.id, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noop() -> Cut {
        Box::new(|_| {})
    }

    #[test]
    fn one_writer_at_a_time_and_any_number_of_readers() {
        let t = tempfile::tempdir().unwrap();
        let s = Standby::open(t.path(), Access::Write).unwrap();
        let a = s.admit(Peer::local(), Some(1), noop()).unwrap();
        let busy = s.admit(Peer::local(), Some(1), noop()).err().unwrap();
        assert!(
            busy.code == ErrorCode::Busy && busy.message.contains("in use"),
            "{busy:?}"
        );
        let _r1 = s.admit(Peer::local(), None, noop()).unwrap();
        let _r2 = s.admit(Peer::local(), None, noop()).unwrap();
        assert_eq!(s.sessions().len(), 3);
        drop(a);
        assert!(s.admit(Peer::local(), Some(1), noop()).is_ok());
    }

    #[test]
    fn writers_are_admitted_by_epoch_and_a_new_epoch_is_durable_first() {
        let t = tempfile::tempdir().unwrap();
        let s = Standby::open(t.path(), Access::Write).unwrap();
        let a = s.admit(Peer::local(), Some(3), noop()).unwrap();
        drop(a);
        // Entered epoch 3 on disk before the writer could write.
        let on_disk = Standby::open(t.path(), Access::ReadOnly).unwrap();
        let again = std::fs::read(t.path().join(".hotsync/state")).unwrap();
        let st = TreeState::parse(&again, "s").unwrap();
        assert_eq!((st.epoch, st.history.len()), (3, 2));
        drop(on_disk);
        let stale = s.admit(Peer::local(), Some(2), noop()).err().unwrap();
        assert_eq!(stale.code, ErrorCode::StaleEpoch, "{stale:?}");
        assert!(stale.message.contains("epoch 2") && stale.message.contains("epoch 3"));
        // Readers need no epoch.
        assert!(s.admit(Peer::local(), None, noop()).is_ok());
        assert!(s.admit(Peer::local(), Some(3), noop()).is_ok());
    }

    #[test]
    fn the_standby_s_lag_is_the_primary_s_aged_by_the_time_since_its_heartbeat() {
        let t = tempfile::tempdir().unwrap();
        let s = Standby::open(t.path(), Access::Write).unwrap();
        let a = s.admit(Peer::local(), Some(1), noop()).unwrap();
        let t0 = Instant::now();
        assert_eq!(a.entry.lag(t0), None, "no heartbeat yet");
        let beat = |oldest: Option<u64>| Heartbeat {
            epoch: 1,
            seq: 7,
            // The primary's clock, far from ours: only differences of it are used.
            sent_at_ms: 5_000_000_000_000,
            oldest_pending_ms: oldest,
            pending: 3,
            space: None,
        };
        let pulse = SessionPulse {
            standby: &s,
            entry: a.entry.clone(),
        };
        pulse.heard(&beat(Some(5_000_000_000_000 - 1500)), t0);
        assert_eq!(a.entry.lag(t0), Some(Duration::from_millis(1500)));
        // Between heartbeats the pending change keeps ageing.
        let later = t0 + Duration::from_millis(700);
        assert_eq!(a.entry.lag(later), Some(Duration::from_millis(2200)));
        // Caught up: zero, however old the heartbeat.
        pulse.heard(&beat(None), t0);
        assert_eq!(a.entry.lag(later), Some(Duration::ZERO));
        // The writer's heartbeat carried its position.
        assert_eq!(s.state().position, Position { epoch: 1, seq: 7 });
        assert_eq!(pulse.silent(t0 + Duration::from_secs(5)), None);
        assert!(pulse.silent(t0 + Duration::from_secs(11)).is_some());
    }
}
