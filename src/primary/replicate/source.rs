//! Where the replicator learns what changed in the source tree: the seam between the
//! [`Watch`](super::Watch) and whatever reports changes. inotify ([`Inotify`]) is the one
//! source today; a layer that intercepts writes is another.
//!
//! What a source must do is small, because hints are never the truth (each batch
//! re-examines the paths they name on both sides): report every change eventually, say
//! when it lost some (a full re-scan follows), and report a flush's barrier after every
//! change it reported before the barrier was placed. That ordering is what a flush's
//! promise rests on.

use super::batcher::Hint;
use super::watcher::{self, SetupState, WatchError, Watcher};
use crate::tree::walk::Gate;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The source stopped reporting (its threads ended): it must be opened again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stopped;

/// Reports the changes of one source tree, from when it is opened until it is dropped.
pub(crate) trait HintSource: Send + Sync {
    /// The hints that arrive within `limit`: all that came together, in order (a
    /// rename's two halves travel in one call), or none. [`Stopped`] once the source has
    /// stopped for good.
    fn recv(&self, limit: Duration) -> Result<Vec<Hint>, Stopped>;

    /// True once for each spell in which changes were lost (a full re-scan is then due).
    fn take_lost(&self) -> bool;

    /// Whether part of the tree is not covered (a kernel limit), so periodic full
    /// re-scans must stand in for the hints it cannot give.
    fn partial(&self) -> bool;

    /// How far the source's coverage of the tree has come. A walk made while it is still
    /// being set up waits at each directory until it is covered, so no change made there
    /// after the walk passed it goes unreported.
    fn gate(&self) -> Arc<dyn Gate>;

    /// Its setup, for status.
    fn setup(&self) -> SetupState;

    /// Places flush `id`'s barrier: [`Hint::Barrier`] with this id comes after every
    /// change reported before this call.
    ///
    /// # Errors
    /// When the barrier cannot be placed (the flush then cannot promise anything).
    fn place_barrier(&self, id: u64) -> std::io::Result<()>;

    /// Flush `id` is over: whatever placing its barrier left is removed.
    fn clear_barrier(&self, id: u64);
}

/// Opens the hint source of a source tree: how a [`Watch`](super::Watch) starts watching
/// each source root it opens (again after a remount).
pub(crate) type Opener = fn(&Path) -> Result<Arc<dyn HintSource>, WatchError>;

/// inotify on every directory of the tree. A barrier is a marker file in the tree's
/// `.hotsync/`: its creation event follows every event the kernel queued before it.
pub(crate) struct Inotify {
    watcher: Watcher,
    /// The tree's `.hotsync/`, where markers go.
    area: PathBuf,
}

impl Inotify {
    /// Starts watching the tree at `root` (an [`Opener`]).
    ///
    /// # Errors
    /// When the tree cannot be watched at all.
    pub(crate) fn open(root: &Path) -> Result<Arc<dyn HintSource>, WatchError> {
        Ok(Arc::new(Inotify {
            watcher: watcher::start(root)?,
            area: root.join(OsStr::from_bytes(crate::model::path::RESERVED)),
        }))
    }

    fn marker(&self, id: u64) -> PathBuf {
        self.area
            .join(crate::tree::reserved::marker_name(std::process::id(), id))
    }
}

impl HintSource for Inotify {
    fn recv(&self, limit: Duration) -> Result<Vec<Hint>, Stopped> {
        use std::sync::mpsc::RecvTimeoutError;
        let rx = self.watcher.hints.lock().unwrap_or_else(|e| e.into_inner());
        match rx.recv_timeout(limit) {
            Ok(h) => {
                let mut hints = vec![h];
                hints.extend(rx.try_iter());
                Ok(hints)
            }
            Err(RecvTimeoutError::Timeout) => Ok(vec![]),
            Err(RecvTimeoutError::Disconnected) => Err(Stopped),
        }
    }

    fn take_lost(&self) -> bool {
        self.watcher.overflowed.swap(false, Ordering::Relaxed)
    }

    fn partial(&self) -> bool {
        self.watcher.limited.load(Ordering::Relaxed)
    }

    fn gate(&self) -> Arc<dyn Gate> {
        self.watcher.front.clone()
    }

    fn setup(&self) -> SetupState {
        self.watcher.front.state()
    }

    fn place_barrier(&self, id: u64) -> std::io::Result<()> {
        let marker = self.marker(id);
        std::fs::File::create_new(&marker).map(drop).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot place the flush marker {}: {e}", marker.display()),
            )
        })
    }

    fn clear_barrier(&self, id: u64) {
        let _ = std::fs::remove_file(self.marker(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_barrier_comes_after_the_changes_reported_before_it_and_leaves_nothing() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join(".hotsync")).unwrap();
        let src = Inotify::open(t.path()).unwrap();
        src.gate().wait_all();
        std::fs::write(t.path().join("a"), b"x").unwrap();
        src.place_barrier(9).unwrap();
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !seen.contains(&Hint::Barrier { id: 9 }) {
            assert!(std::time::Instant::now() < deadline, "no barrier: {seen:?}");
            seen.extend(src.recv(Duration::from_millis(100)).unwrap());
        }
        let barrier = seen.iter().position(|h| *h == Hint::Barrier { id: 9 });
        let write = seen.iter().position(|h| {
            matches!(h, Hint::Created(p) | Hint::Written(p) | Hint::Modified(p)
                if p.as_bytes() == b"a")
        });
        assert!(write.is_some() && write < barrier, "{seen:?}");
        src.clear_barrier(9);
        assert_eq!(
            std::fs::read_dir(t.path().join(".hotsync"))
                .unwrap()
                .count(),
            0
        );
    }
}
