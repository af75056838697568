//! The primary's side of a tree: its `.hotsync/state` as the primary of an epoch. A watch
//! holds it for its whole run (one replicator per tree), records there the last position
//! its standby acknowledged and the moment before which everything it saw is durable on
//! the standby (at least once a second, cheaply), and records a fence when a newer epoch
//! takes over. `rejoin` later reads these records, on this node's own clock.
//!
//! Around it, the primary's side of replication, the top of the engine:
//! - [`link`]: how one standby is reached (an in-process receiver, or a transport's dialer);
//! - [`sender`]: one session's work: scan, plan and drive the plan through the protocol;
//! - [`replicate`]: `hotsync watch`, a replicator feeding one state machine per standby;
//! - [`verify`]: `hotsync verify` over a read-only session.

pub mod link;
pub mod replicate;
pub mod sender;
pub mod verify;

use crate::error::{Error, Result};
use crate::model::epoch::{Fence, Position, Role, TreeState};
use crate::tree::fsroot::Root;
use crate::tree::reserved::{Area, PRIMARY_LOCK};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// How often acknowledgements are written down at most.
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// What `open` holds the tree for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hold {
    /// A watch: the one replicator of this tree (takes `primary.lock`).
    Replicate,
    /// A one-off sync or verify: reads the epoch, records a fence.
    Once,
}

struct Saved {
    state: TreeState,
    dirty: bool,
    last: Option<Instant>,
}

/// The source tree as its primary holds it.
pub(crate) struct PrimaryTree {
    path: PathBuf,
    root: Root,
    /// `None` when the tree cannot be written (a read-only source): the state then lives in
    /// memory only, and `rejoin` will not be able to tell what diverged.
    area: Mutex<Option<Area>>,
    _lock: Option<File>,
    saved: Mutex<Saved>,
}

impl PrimaryTree {
    /// Opens `src`'s state as its primary. `force` lets a standby's tree be used as a source
    /// anyway (a copy of it).
    ///
    /// # Errors
    /// [`Error::Usage`]: the state file is damaged, the tree is a standby (without
    /// `force`), or another watch replicates it. [`Error::Fenced`]: a newer epoch took over
    /// from this tree.
    pub(crate) fn open(src: &Path, hold: Hold, force: bool) -> Result<PrimaryTree> {
        let shown = src.display();
        let root =
            Root::open(src).map_err(|e| Error::Usage(format!("cannot open SRC {shown}: {e}")))?;
        // A one-off sync leaves a tree hotsync never wrote as it is.
        let opened = match hold {
            Hold::Replicate => Area::open(&root, src).map(Some),
            Hold::Once => Area::open_existing(&root, src),
        };
        let area = match opened {
            Ok(a) => a,
            Err(e) => {
                if hold == Hold::Replicate {
                    tracing::warn!(
                        "SRC {shown} is not writable ({e}): its epoch and acknowledged position \
                         are kept in memory only, so a later `hotsync rejoin` of it cannot tell \
                         which files diverged"
                    );
                }
                None
            }
        };
        let lock = match (&area, hold) {
            (Some(a), Hold::Replicate) => {
                let lock = a.try_lock(PRIMARY_LOCK).map_err(|e| {
                    Error::io(format!("cannot lock {shown}/.hotsync/primary.lock"), e)
                })?;
                let Some(lock) = lock else {
                    return Err(Error::Usage(format!(
                        "SRC {shown} is already replicated by another hotsync watch \
                         (lock {shown}/.hotsync/primary.lock): one watch per tree"
                    )));
                };
                a.remove_temps();
                Some(lock)
            }
            _ => None,
        };
        let state = match &area {
            Some(a) => a.read_state()?,
            None => None,
        };
        let fresh = state.is_none();
        let state = state.unwrap_or_else(|| TreeState::fresh(Role::Primary, None));
        if let Some(f) = &state.fenced {
            return Err(Error::Fenced(format!(
                "SRC {shown} was fenced at {}: {}; it must not replicate as a primary again: make \
                 it a standby of the new primary with `hotsync rejoin`",
                f.at, f.reason
            )));
        }
        if state.role == Role::Standby && !force {
            return Err(Error::Usage(format!(
                "SRC {shown} is a standby (epoch {}{}): promote it first (`hotsync promote --root \
                 {shown}`), or use --force to copy it as it is",
                state.epoch,
                state
                    .primary()
                    .map(|p| format!(", primary {p}"))
                    .unwrap_or_default()
            )));
        }
        let tree = PrimaryTree {
            path: src.to_path_buf(),
            root,
            area: Mutex::new(area),
            _lock: lock,
            saved: Mutex::new(Saved {
                state,
                dirty: false,
                last: None,
            }),
        };
        // A tree that becomes a primary says so at once: a `rejoin --if-fenced` or a check
        // that reads it before the first acknowledgement must not take it for a standby.
        if fresh && hold == Hold::Replicate {
            let s = tree.saved.lock().unwrap();
            tree.write(&s.state);
        }
        Ok(tree)
    }

    /// The epoch this primary writes in.
    pub(crate) fn epoch(&self) -> u64 {
        self.saved.lock().unwrap().state.epoch
    }

    /// The standby acknowledged `pos` as durable, and (when `before` is known) every change
    /// in the tree made before `before` (this node's clock) is durable there. `None` leaves
    /// the recorded moment as it is: a watch that has not had its first reconcile
    /// acknowledged cannot vouch for anything an earlier run did not. Written down at most
    /// once a second; call [`PrimaryTree::flush`] regularly so the last one is not left in
    /// memory.
    pub(crate) fn acknowledged(&self, pos: Position, before: Option<SystemTime>, now: Instant) {
        {
            let mut s = self.saved.lock().unwrap();
            let st = &mut s.state;
            let vouched = |st: &TreeState| {
                st.acked_before_ms.is_some()
                    && st.history.last().is_some_and(|h| h.last_acked.is_some())
            };
            let was = vouched(st);
            st.acknowledge(pos);
            if let Some(before) = before.map(crate::model::clock::unix_ms)
                && st.acked_before_ms.is_none_or(|b| before > b)
            {
                st.acked_before_ms = Some(before);
            }
            s.dirty = true;
            // The first moment vouched for in the epoch is written at once: until it is,
            // a rejoin keeps the whole tree aside.
            if !was && vouched(&s.state) {
                s.last = None;
            }
        }
        self.flush(now);
    }

    /// Writes down what changed, if a second has passed since the last write.
    pub(crate) fn flush(&self, now: Instant) {
        let mut s = self.saved.lock().unwrap();
        let due = s
            .last
            .is_none_or(|t| now.saturating_duration_since(t) >= SAVE_EVERY);
        if s.dirty && due {
            s.state.updated = crate::model::clock::now_rfc3339();
            if self.write(&s.state) {
                s.dirty = false;
                s.last = Some(now);
            }
        }
    }

    /// A newer epoch took over from this tree: recorded at once, so nothing replicates
    /// from it again before `rejoin`.
    pub(crate) fn fence(&self, reason: &str) {
        {
            let mut area = self.area.lock().unwrap();
            if area.is_none() {
                *area = Area::open(&self.root, &self.path).ok();
            }
        }
        let mut s = self.saved.lock().unwrap();
        s.state.fenced = Some(Fence {
            at: crate::model::clock::now_rfc3339(),
            reason: reason.to_string(),
        });
        s.state.updated = crate::model::clock::now_rfc3339();
        self.write(&s.state);
        s.dirty = false;
    }

    fn write(&self, st: &TreeState) -> bool {
        let area = self.area.lock().unwrap();
        let Some(a) = area.as_ref() else { return false };
        match a.write_state(st) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("cannot write {}: {e}", a.state_shown());
                false
            }
        }
    }
}

impl Drop for PrimaryTree {
    fn drop(&mut self) {
        let mut s = self.saved.lock().unwrap();
        if s.dirty {
            s.state.updated = crate::model::clock::now_rfc3339();
            self.write(&s.state);
            s.dirty = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledgements_are_recorded_at_most_once_a_second_and_kept() {
        let t = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let file = t.path().join(".hotsync/state");
        let read = || TreeState::parse(&std::fs::read(&file).unwrap(), "s").unwrap();
        {
            let p = PrimaryTree::open(t.path(), Hold::Replicate, false).unwrap();
            assert_eq!(p.epoch(), 1);
            let e = PrimaryTree::open(t.path(), Hold::Replicate, false)
                .err()
                .unwrap();
            assert!(e.to_string().contains("another hotsync watch"), "{e}");
            let w = Some(SystemTime::now());
            p.acknowledged(Position { epoch: 1, seq: 1 }, w, t0);
            assert_eq!(read().position.seq, 1);
            p.acknowledged(
                Position { epoch: 1, seq: 2 },
                w,
                t0 + Duration::from_millis(10),
            );
            assert_eq!(read().position.seq, 1, "not twice within a second");
            p.flush(t0 + Duration::from_millis(1010));
            assert_eq!(read().position.seq, 2);
            p.acknowledged(
                Position { epoch: 1, seq: 3 },
                w,
                t0 + Duration::from_millis(1020),
            );
        }
        // Dropped with one unwritten: written on the way out.
        let st = read();
        assert_eq!((st.role, st.position.seq), (Role::Primary, 3));
        assert!(st.acked_before_ms.is_some());
        assert_eq!(
            st.history[0].last_acked,
            Some(Position { epoch: 1, seq: 3 })
        );
    }

    #[test]
    fn a_fenced_tree_and_a_standby_tree_refuse_to_replicate() {
        let t = tempfile::tempdir().unwrap();
        PrimaryTree::open(t.path(), Hold::Once, false)
            .unwrap()
            .fence("epoch 2 took over");
        let e = PrimaryTree::open(t.path(), Hold::Replicate, false)
            .err()
            .unwrap();
        assert!(
            matches!(e, Error::Fenced(_)) && e.to_string().contains("rejoin"),
            "{e}"
        );
        let s = tempfile::tempdir().unwrap();
        let root = Root::open(s.path()).unwrap();
        let area = Area::open(&root, s.path()).unwrap();
        area.write_state(&TreeState::fresh(Role::Standby, Some("P".into())))
            .unwrap();
        let e = PrimaryTree::open(s.path(), Hold::Replicate, false)
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("is a standby") && e.to_string().contains("promote"),
            "{e}"
        );
        assert!(PrimaryTree::open(s.path(), Hold::Once, true).is_ok());
    }
}
