//! The reserved area `.hotsync/` at the root of a tree (never mirrored, compared or
//! deleted): its lock files and its durable state file. Shared by the standby side (`serve`,
//! a local DEST) and the primary side (`watch`, `promote`, `rejoin`).

use crate::error::{Error, Result};
use crate::model::epoch::TreeState;
use crate::model::path::{RESERVED, RelPath};
use crate::tree::fsroot::{self, Root};
use rustix::fs::{AtFlags, FlockOperation, Mode, OFlags};
use rustix::io::Errno;
use std::ffi::CStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

/// The state file's name in the area.
pub(crate) const STATE_FILE: &[u8] = b"state";
/// The standby's temp area: files being received wait here until their batch commits.
pub(crate) const TEMPS: &[u8] = b"tmp";
/// Held by the one process that writes the tree as a standby (`serve`, a local DEST).
pub(crate) const STANDBY_LOCK: &CStr = c"lock";
/// Held by the one process that replicates the tree as a primary (`watch`).
pub(crate) const PRIMARY_LOCK: &CStr = c"primary.lock";

/// Whether `name` in `.hotsync/` is one hotsync makes there.
fn is_own(name: &[u8]) -> bool {
    [
        STATE_FILE,
        STANDBY_LOCK.to_bytes(),
        PRIMARY_LOCK.to_bytes(),
        TEMPS,
        crate::tree::undo::UNDO,
        b"diverged",
        b"write-probe",
    ]
    .contains(&name)
        || parse_marker(name).is_some()
        || crate::model::path::is_temp_name(name)
}

/// What a user put in the root's `.hotsync` of the tree open as `root`: the names there
/// that hotsync never makes, or `.hotsync` itself when it is not a directory. They are not
/// mirrored (the name is hotsync's), and the primary says so rather than mirroring around
/// them silently.
pub(crate) fn foreign_entries(root: BorrowedFd<'_>) -> Vec<RelPath> {
    let area = RelPath::new(RESERVED).unwrap();
    let st = match rustix::fs::statat(root, RESERVED, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(_) => return Vec::new(),
    };
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Directory {
        return vec![area];
    }
    let Ok(dir) = fsroot::open_subdir(root, RESERVED) else {
        return vec![area];
    };
    let mut names = fsroot::list_dir(dir.as_fd()).unwrap_or_default();
    names.retain(|n| !is_own(n));
    names.sort();
    names.iter().filter_map(|n| area.join(n).ok()).collect()
}

/// An open `.hotsync/` of one tree.
pub struct Area {
    dir: OwnedFd,
    /// The tree, for messages.
    shown: String,
}

impl Area {
    /// Opens `.hotsync/` in `root` (shown as `tree`), making it if missing. Making it would
    /// change the root's mtime, which is mirrored data: it is put back.
    pub(crate) fn open(root: &Root, tree: &Path) -> io::Result<Area> {
        let before = rustix::fs::fstat(root.fd())?;
        match rustix::fs::mkdirat(root.fd(), RESERVED, Mode::from_raw_mode(0o700)) {
            Ok(()) => {
                let at = |sec, nsec| rustix::fs::Timespec {
                    tv_sec: sec,
                    tv_nsec: nsec as _,
                };
                let ts = rustix::fs::Timestamps {
                    last_access: at(before.st_atime, before.st_atime_nsec),
                    last_modification: at(before.st_mtime, before.st_mtime_nsec),
                };
                let _ = rustix::fs::futimens(root.fd(), &ts);
            }
            Err(Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(Area {
            dir: root.open_dir(&RelPath::new(RESERVED).unwrap())?,
            shown: tree.display().to_string(),
        })
    }

    /// Opens `.hotsync/` in `root` if it exists (a tree hotsync has never written has none).
    pub fn open_existing(root: &Root, tree: &Path) -> io::Result<Option<Area>> {
        match root.open_dir(&RelPath::new(RESERVED).unwrap()) {
            Ok(dir) => Ok(Some(Area {
                dir,
                shown: tree.display().to_string(),
            })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    /// The state file, for messages.
    pub(crate) fn state_shown(&self) -> String {
        format!("{}/.hotsync/state", self.shown)
    }

    /// Opened read-only (flock needs no more): a lock holder keeps no file open for writing,
    /// so the filesystem can still be remounted read-only under it.
    fn lock_file(&self, name: &CStr) -> io::Result<OwnedFd> {
        Ok(rustix::fs::openat(
            &self.dir,
            name,
            OFlags::RDONLY | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?)
    }

    /// Takes the lock `name` without waiting: `None` while another process holds it.
    pub(crate) fn try_lock(&self, name: &CStr) -> io::Result<Option<File>> {
        let f = self.lock_file(name)?;
        match rustix::fs::flock(&f, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(File::from(f))),
            Err(Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Takes the lock `name`, waiting up to `limit` for another holder to let go.
    pub(crate) fn lock_within(&self, name: &CStr, limit: Duration) -> io::Result<Option<File>> {
        let start = Instant::now();
        loop {
            if let Some(f) = self.try_lock(name)? {
                return Ok(Some(f));
            }
            if start.elapsed() >= limit {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Opens the standby's temp area `.hotsync/tmp/` (made if missing) and empties it:
    /// what it holds was staged by a writer that is gone (call under the standby's lock).
    pub(crate) fn open_temps(&self) -> io::Result<OwnedFd> {
        let dir = fsroot::ensure_subdir(self.fd(), TEMPS)?;
        for name in fsroot::list_dir(dir.as_fd())? {
            // A temp is a file, a symlink or a hard link; never a directory (a tree is
            // removed whole all the same, never followed).
            fsroot::remove_tree(dir.as_fd(), &name)?;
        }
        Ok(dir)
    }

    /// Removes the temps of a state file write cut short by a kill (call under a lock).
    pub(crate) fn remove_temps(&self) {
        for name in fsroot::list_dir(self.fd()).unwrap_or_default() {
            if crate::model::path::is_temp_name(&name) {
                let _ = rustix::fs::unlinkat(&self.dir, name.as_slice(), AtFlags::empty());
            }
        }
    }

    /// Reads the state file; `None` when there is none yet.
    ///
    /// # Errors
    /// A damaged or foreign state file ([`Error::Usage`]), or a read failure.
    pub fn read_state(&self) -> Result<Option<TreeState>> {
        let shown = self.state_shown();
        let fd = match rustix::fs::openat(
            &self.dir,
            STATE_FILE,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(Error::io(format!("cannot read {shown}"), e.into())),
        };
        let mut bytes = Vec::new();
        File::from(fd)
            .take(1 << 20)
            .read_to_end(&mut bytes)
            .map_err(|e| Error::io(format!("cannot read {shown}"), e))?;
        TreeState::parse(&bytes, &shown).map(Some)
    }

    /// Writes `st` as the state, atomically and durably.
    pub(crate) fn write_state(&self, st: &TreeState) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(st).map_err(io::Error::other)?;
        crate::tree::atomic::replace_file(self.fd(), STATE_FILE, &json)
    }
}

/// The name of flush `id`'s marker in the source's `.hotsync/`, placed by process `owner`.
pub(crate) fn marker_name(owner: u32, id: u64) -> String {
    format!("flush-{owner}-{id}")
}

/// The owner and id a marker's name (under `.hotsync/`) carries, if it is one.
pub(crate) fn parse_marker(name: &[u8]) -> Option<(u32, u64)> {
    let rest = std::str::from_utf8(name).ok()?.strip_prefix("flush-")?;
    let (owner, id) = rest.split_once('-')?;
    Some((owner.parse().ok()?, id.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_names_round_trip() {
        assert_eq!(parse_marker(marker_name(42, 7).as_bytes()), Some((42, 7)));
        assert_eq!(parse_marker(b"flush-x-7"), None);
        assert_eq!(parse_marker(b"state"), None);
    }

    #[test]
    fn locks_exclude_other_holders_until_released() {
        let t = tempfile::tempdir().unwrap();
        let root = Root::open(t.path()).unwrap();
        let a = Area::open(&root, t.path()).unwrap();
        let held = a.try_lock(PRIMARY_LOCK).unwrap().unwrap();
        assert!(a.try_lock(PRIMARY_LOCK).unwrap().is_none());
        assert!(
            a.try_lock(STANDBY_LOCK).unwrap().is_some(),
            "another lock is free"
        );
        let start = Instant::now();
        assert!(
            a.lock_within(PRIMARY_LOCK, Duration::from_millis(100))
                .unwrap()
                .is_none()
        );
        assert!(start.elapsed() >= Duration::from_millis(100));
        drop(held);
        assert!(
            a.lock_within(PRIMARY_LOCK, Duration::from_secs(1))
                .unwrap()
                .is_some()
        );
    }
}
