//! `rejoin`: a former primary becomes a standby of the new one. Before the new primary's
//! mirror may overwrite or delete anything, every entry this node changed after its standby
//! last confirmed it is moved to `.hotsync/diverged/EPOCH/<path>` and listed, so nothing it
//! accepted is lost silently. What changed is judged on this node's own clock and records
//! (the inode change time against the moment its state says everything before was
//! durable), so a clock difference between the nodes cannot hide a diverged file.

use crate::model::epoch::{Divergence, TreeState};
use crate::model::filter::Filter;
use crate::model::path::{RESERVED, RelPath, is_temp_name};
use crate::tree::fsroot::{Root, list_dir};
use crate::tree::reserved::Area;
use rustix::fs::{AtFlags, FileType, Mode};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// One entry kept aside.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diverged {
    /// The entry's path in the tree (escaped like every path hotsync prints).
    pub path: String,
    /// `file` or `symlink`.
    pub kind: String,
    pub size: u64,
    /// Its modification time, RFC 3339.
    pub modified: String,
}

/// What a rejoin did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RejoinReport {
    pub tree: String,
    /// It was a standby already: nothing was done.
    pub already: bool,
    /// The epoch this tree was the primary of.
    pub epoch: u64,
    /// Where the diverged entries are kept.
    pub kept_in: String,
    /// Entries moved aside (this run and earlier, interrupted ones).
    pub diverged: Vec<Diverged>,
    /// Directories changed after the last confirmation: an entry may have been deleted or
    /// renamed there, which the new primary's mirror will bring back.
    pub changed_dirs: Vec<String>,
    /// The tree had no record of what its standby confirmed: everything counted as diverged.
    pub no_record: bool,
    /// Asked to act only on a fenced tree, and this one is not: it is still the primary,
    /// and nothing was done.
    #[serde(default)]
    pub still_primary: bool,
}

const LIST: &[u8] = b"diverged.json";

/// What the walk found and did.
struct Walk<'a> {
    filter: &'a Filter,
    divergence: Option<Divergence>,
    keep: OwnedFd,
    dirs: Vec<String>,
}

// The stat fields' integer types differ between platforms.
#[allow(clippy::useless_conversion)]
fn ctime_ms(st: &rustix::fs::Stat) -> u64 {
    let secs = u64::try_from(st.st_ctime).unwrap_or(0);
    let nsecs = u64::try_from(st.st_ctime_nsec).unwrap_or(0);
    secs * 1000 + nsecs / 1_000_000
}

impl Walk<'_> {
    fn diverged(&self, st: &rustix::fs::Stat) -> bool {
        self.divergence.is_none_or(|d| d.diverged(ctime_ms(st)))
    }

    /// Walks the directory `dir` (at `rel`), moving diverged files and symlinks aside.
    fn dir(&mut self, dir: BorrowedFd<'_>, rel: &RelPath) -> io::Result<()> {
        for name in list_dir(dir)? {
            if (rel.is_root() && name == RESERVED) || is_temp_name(&name) {
                continue;
            }
            let path = child_path(rel, &name)?;
            let st = match rustix::fs::statat(dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(e.into()),
            };
            let ft = FileType::from_raw_mode(st.st_mode);
            let is_dir = ft == FileType::Directory;
            if self.filter.excludes(&path, is_dir) {
                continue;
            }
            match ft {
                FileType::Directory => {
                    if self.diverged(&st) {
                        self.dirs.push(path.display());
                    }
                    let sub = crate::tree::fsroot::open_subdir(dir, &name)?;
                    self.dir(sub.as_fd(), &path)?;
                }
                FileType::RegularFile | FileType::Symlink if self.diverged(&st) => {
                    self.keep_aside(dir, &name, &path)?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Moves `name` in `dir` to the same relative path under the keeping directory.
    fn keep_aside(&self, dir: BorrowedFd<'_>, name: &[u8], path: &RelPath) -> io::Result<()> {
        let mut at = rustix::io::fcntl_dupfd_cloexec(&self.keep, 0)?;
        let (parent, _) = path.split();
        for part in parent
            .as_bytes()
            .split(|&b| b == b'/')
            .filter(|p| !p.is_empty())
        {
            match rustix::fs::mkdirat(&at, part, Mode::from_raw_mode(0o700)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
            at = crate::tree::fsroot::open_subdir(at.as_fd(), part)?;
        }
        // A name kept by an earlier rejoin of the same epoch is not overwritten.
        let mut target = name.to_vec();
        let mut n = 1;
        loop {
            match rustix::fs::renameat_with(
                dir,
                name,
                &at,
                target.as_slice(),
                rustix::fs::RenameFlags::NOREPLACE,
            ) {
                Ok(()) => return Ok(()),
                Err(Errno::EXIST) => {
                    target = [name, format!(".{n}").as_bytes()].concat();
                    n += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Moves aside what this former primary changed after its standby last confirmed it, as
/// recorded in `state`, into `.hotsync/diverged/EPOCH/`; entries matching `filter` stay.
/// Safe to run again after an interruption: what was moved stays listed.
pub(crate) fn keep_diverged(
    root: &Root,
    area: &Area,
    state: &TreeState,
    filter: &Filter,
) -> io::Result<RejoinReport> {
    // A moment recorded in an epoch where the standby never acknowledged a position
    // proves nothing (an earlier release recorded one before its first reconcile was
    // acknowledged): everything is unconfirmed.
    let acked_in_epoch = state
        .history
        .last()
        .is_some_and(|h| h.epoch == state.epoch && h.last_acked.is_some());
    let divergence = state
        .acked_before_ms
        .filter(|_| acked_in_epoch)
        .map(|ms| Divergence {
            acked_before_ms: ms,
            margin_ms: Divergence::MARGIN_MS,
        });
    let epoch_dir = state.epoch.to_string();
    let base = crate::tree::fsroot::ensure_subdir(area.fd(), b"diverged")?;
    let keep = crate::tree::fsroot::ensure_subdir(base.as_fd(), epoch_dir.as_bytes())?;
    let mut w = Walk {
        filter,
        divergence,
        keep,
        dirs: Vec::new(),
    };
    w.dir(root.fd(), &RelPath::root())?;
    // The list is what is kept, however many runs (a rejoin killed mid-way) put it there.
    let mut kept = Vec::new();
    list_kept(w.keep.as_fd(), &RelPath::root(), &mut kept)?;
    kept.sort_by(|a, b| a.path.cmp(&b.path));
    let list = serde_json::to_vec_pretty(&kept).map_err(io::Error::other)?;
    crate::tree::atomic::replace_file(w.keep.as_fd(), LIST, &list)?;
    Ok(RejoinReport {
        tree: crate::tree::operand::shown_absolute(root.path()),
        already: false,
        epoch: state.epoch,
        kept_in: format!(
            "{}/.hotsync/diverged/{epoch_dir}",
            crate::tree::operand::shown_absolute(root.path())
        ),
        diverged: kept,
        changed_dirs: w.dirs,
        no_record: divergence.is_none(),
        still_primary: false,
    })
}

/// The path of `name` in the directory at `rel`, or why it cannot be one (too long).
fn child_path(rel: &RelPath, name: &[u8]) -> io::Result<RelPath> {
    rel.join(name).map_err(|e| {
        io::Error::other(format!(
            "{rel}: {}",
            crate::model::path::unmirrorable(rel, name, &e)
        ))
    })
}

/// Every file and symlink under the keeping directory `dir` (at `rel`).
fn list_kept(dir: BorrowedFd<'_>, rel: &RelPath, out: &mut Vec<Diverged>) -> io::Result<()> {
    for name in list_dir(dir)? {
        if (rel.is_root() && name == LIST) || is_temp_name(&name) {
            continue;
        }
        let path = child_path(rel, &name)?;
        let st = rustix::fs::statat(dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW)?;
        let modified = crate::tree::fsroot::meta_of(&st).mtime;
        let kind = match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                let sub = crate::tree::fsroot::open_subdir(dir, &name)?;
                list_kept(sub.as_fd(), &path, out)?;
                continue;
            }
            FileType::Symlink => "symlink",
            _ => "file",
        };
        out.push(Diverged {
            path: path.display(),
            kind: kind.into(),
            size: u64::try_from(st.st_size).unwrap_or(0),
            modified: crate::model::clock::rfc3339(
                std::time::UNIX_EPOCH
                    + std::time::Duration::new(
                        u64::try_from(modified.sec).unwrap_or(0),
                        modified.nsec,
                    ),
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::epoch::Role;

    #[test]
    fn entries_changed_after_the_watermark_are_kept_aside_and_listed() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path();
        std::fs::create_dir_all(p.join("d/e")).unwrap();
        std::fs::write(p.join("old"), b"confirmed").unwrap();
        std::fs::write(p.join("d/e/old2"), b"confirmed").unwrap();
        // (ctime cannot be set back: the test moves the watermark instead.) Everything so
        // far was confirmed: the watermark is after it, beyond the margin.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let watermark = crate::model::clock::unix_ms(std::time::SystemTime::now());
        let mut state = TreeState::fresh(Role::Primary, None);
        state.acknowledge(crate::model::epoch::Position { epoch: 1, seq: 3 });
        state.acked_before_ms = Some(watermark + Divergence::MARGIN_MS);
        let root = Root::open(p).unwrap();
        let area = Area::open(&root, p).unwrap();
        let none = Filter::new(&[]).unwrap();
        let r = keep_diverged(&root, &area, &state, &none).unwrap();
        assert!(r.diverged.is_empty(), "{:?}", r.diverged);
        std::fs::write(p.join("d/new"), b"unconfirmed").unwrap();
        std::os::unix::fs::symlink("old", p.join("d/e/link")).unwrap();
        std::fs::write(p.join("skip.tmp"), b"excluded").unwrap();
        state.acked_before_ms = Some(watermark);
        let filter = Filter::new(&["*.tmp".to_string()]).unwrap();
        let r = keep_diverged(&root, &area, &state, &filter).unwrap();
        let mut got: Vec<_> = r.diverged.iter().map(|d| d.path.as_str()).collect();
        got.sort();
        // (Within the margin, the confirmed ones count too: a false alarm costs a resend.)
        assert!(
            got.contains(&"d/new") && got.contains(&"d/e/link"),
            "{got:?}"
        );
        assert!(!got.contains(&"skip.tmp"));
        let kept = p.join(".hotsync/diverged/1");
        assert_eq!(std::fs::read(kept.join("d/new")).unwrap(), b"unconfirmed");
        assert!(!p.join("d/new").exists());
        assert!(kept.join("diverged.json").exists());
        assert!(
            r.changed_dirs.contains(&"d".to_string()),
            "{:?}",
            r.changed_dirs
        );
        // Again (an interrupted rejoin rerun): nothing new, the list kept.
        let again = keep_diverged(&root, &area, &state, &filter).unwrap();
        assert!(again.diverged.len() >= r.diverged.len());
        // A moment but no acknowledged position in the epoch: it proves nothing.
        let mut unacked = TreeState::fresh(Role::Primary, None);
        unacked.acked_before_ms = Some(watermark + Divergence::MARGIN_MS);
        std::fs::write(p.join("old3"), b"never acknowledged").unwrap();
        let r = keep_diverged(&root, &area, &unacked, &filter).unwrap();
        assert!(r.no_record);
        assert!(
            r.diverged.iter().any(|d| d.path == "old3"),
            "{:?}",
            r.diverged
        );
        // No record at all: everything is kept aside.
        state.acked_before_ms = None;
        let all = keep_diverged(&root, &area, &state, &filter).unwrap();
        assert!(all.no_record);
        assert!(!p.join("old").exists());
    }
}
