//! Operations on names and attributes: renames, removals, directories, attribute fixes,
//! and the symlinks and hard links a stream stages. Each is recorded in the stream's batch,
//! and acknowledged once the batch is durable.

use super::ops::{Ops, Then, check_writable};
use super::session::{Attrs, StandbySession, op_error};
use super::stage::{stage_link, stage_symlink};
use crate::error::ProtocolError;
use crate::model::manifest::{Meta, MetaTarget};
use crate::model::path::RelPath;
use crate::transport::SendHalf;
use crate::tree::atomic::Touched;
use crate::tree::fsroot::remove_tree;
use crate::tree::undo::Change;
use rustix::fs::{AtFlags, FileType, Mode};
use rustix::io::Errno;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;

impl<R: Read, W: SendHalf> Ops<'_, R, W> {
    /// `Rename`: `from` becomes `to` (a rename on the primary, not sent again as data).
    pub(super) fn rename(
        &mut self,
        id: u64,
        from: &RelPath,
        to: &RelPath,
    ) -> Result<Then, ProtocolError> {
        check_writable(from)?;
        check_writable(to)?;
        let dirs = &mut self.dirs;
        let s = self.s;
        let res = dirs.parent(from).and_then(|(fd, fname)| {
            let (td, tname) = dirs.parent(to)?;
            let change = Change::Rename { from, to };
            match s.with_journal(|j| j.prepare(&change).and_then(|p| j.make(&change, &p))) {
                Some(r) => r?,
                None => rustix::fs::renameat(&*fd, fname, &*td, tname)?,
            }
            Ok(Touched::dirs(fd, td))
        });
        self.batch.record(id, res.map_err(|e| op_error(&e)));
        self.s.tree_changed();
        Ok(Then::Commit)
    }

    /// `Clear` or `Delete`: `path` is removed with everything beneath it.
    pub(super) fn remove(&mut self, id: u64, path: &RelPath) -> Result<Then, ProtocolError> {
        if path.is_root() || path.is_reserved() {
            return Err(ProtocolError::Invalid(format!("refusing to remove {path}")));
        }
        let s = self.s;
        match self
            .dirs
            .parent(path)
            .and_then(|(d, name)| Ok((remove(s, path, d.as_fd(), name)?, d)))
        {
            Ok((n, d)) => {
                self.s
                    .entry
                    .stats
                    .entries_removed
                    .fetch_add(n, Ordering::Relaxed);
                self.batch.applied(id, Touched::dir(d));
            }
            Err(e) => self.batch.failed(id, op_error(&e)),
        }
        self.s.tree_changed();
        Ok(Then::Commit)
    }

    /// `Mkdir`: a directory at `path`, unless one is there already.
    pub(super) fn mkdir(&mut self, id: u64, path: &RelPath) -> Result<Then, ProtocolError> {
        check_writable(path)?;
        let s = self.s;
        let res = self.dirs.parent(path).and_then(|(d, name)| {
            if rustix::fs::statat(&*d, name, AtFlags::SYMLINK_NOFOLLOW).is_err() {
                s.with_journal(|j| j.prepare(&Change::Mkdir { path }))
                    .transpose()?;
            }
            make_dir(&d, name)?;
            Ok(Touched::dir(d))
        });
        self.batch.record(id, res.map_err(|e| op_error(&e)));
        Ok(Then::Commit)
    }

    /// `SetMeta`: the attributes of the entry at `path`, which must still be a `target`.
    pub(super) fn set_meta(
        &mut self,
        id: u64,
        path: &RelPath,
        meta: Meta,
        target: MetaTarget,
    ) -> Result<Then, ProtocolError> {
        if path.is_reserved() {
            return Err(ProtocolError::Invalid(format!("refusing to change {path}")));
        }
        let a = Attrs::new(meta, &mut self.xattrs);
        let s = self.s;
        let res = self.dirs.parent(path).and_then(|(d, name)| {
            check_type(&d, name, target)?;
            let with_mode = target != MetaTarget::Symlink;
            s.with_journal(|j| {
                j.prepare(&Change::Attrs {
                    path,
                    meta: &a.meta,
                    owners: s.owners(),
                    with_mode,
                    xattrs: s.xattrs_to(&a.x),
                })
            })
            .transpose()?;
            s.set_at(d.as_fd(), name, &a, with_mode)?;
            // A symlink cannot be fsynced: its directory's fsync is all there is.
            Ok(match target {
                MetaTarget::Symlink => Touched::dir(d),
                _ => Touched::entry(d, name),
            })
        });
        self.batch.record(id, res.map_err(|e| op_error(&e)));
        Ok(Then::Commit)
    }

    /// `Symlink`: a symlink to `target` at `path`, staged.
    pub(super) fn symlink(
        &mut self,
        id: u64,
        path: &RelPath,
        target: &[u8],
        meta: Meta,
    ) -> Result<Then, ProtocolError> {
        check_writable(path)?;
        if target.is_empty() || target.len() > crate::model::path::MAX_PATH || target.contains(&0) {
            return Err(ProtocolError::Invalid("bad symlink target".into()));
        }
        let a = Attrs::new(meta, &mut self.xattrs);
        let res = stage_symlink(&mut self.dirs, id, path, target, &a);
        self.stage(id, res.map_err(|e| op_error(&e)));
        Ok(Then::Commit)
    }

    /// `Link`: `path` staged as another name of the file or symlink `target`.
    pub(super) fn link(
        &mut self,
        id: u64,
        path: &RelPath,
        target: &RelPath,
    ) -> Result<Then, ProtocolError> {
        check_writable(path)?;
        check_writable(target)?;
        let res = stage_link(&mut self.dirs, id, path, target);
        self.stage(id, res.map_err(|e| op_error(&e)));
        Ok(Then::Commit)
    }
}

/// Makes the directory `name` in `dir`; one already there will do. A receiver that is not
/// root gives itself write permission on a read-only parent (its mode is restored with the
/// parent's attributes).
/// Removes `name` in `dir` (the entry at `path`) with everything beneath it: into the undo
/// area while a window is open (then, across filesystems, for good and said so in the
/// log), else for good. Returns the number of entries removed.
fn remove(s: &StandbySession, path: &RelPath, dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<u64> {
    let moved = s.with_journal(|j| {
        let n = count_entries(dir, name)?;
        let change = Change::Remove { path };
        let prepared = j.prepare(&change)?;
        match j.make(&change, &prepared) {
            Err(e) if e.raw_os_error() == Some(Errno::XDEV.raw_os_error()) => {
                j.unkept(path)?;
                remove_tree(dir, name)
            }
            other => other.map(|()| n),
        }
    });
    match moved {
        Some(r) => r,
        None => remove_tree(dir, name),
    }
}

/// How many entries `name` in `dir` is, with everything beneath it (never following a
/// symlink); 0 when it is missing.
fn count_entries(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<u64> {
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return Ok(1);
    }
    let sub = crate::tree::fsroot::open_subdir(dir, name)?;
    let mut n = 1;
    for child in crate::tree::fsroot::list_dir(sub.as_fd())? {
        n += count_entries(sub.as_fd(), &child)?;
    }
    Ok(n)
}

fn make_dir(dir: &OwnedFd, name: &[u8]) -> io::Result<()> {
    match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700)) {
        Ok(()) => Ok(()),
        Err(Errno::EXIST) => {
            let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
            if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                Ok(())
            } else {
                Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "a non-directory is in the way",
                ))
            }
        }
        Err(Errno::ACCESS) => {
            let st = rustix::fs::fstat(dir)?;
            rustix::fs::fchmod(dir, Mode::from_raw_mode((st.st_mode & 0o7777) | 0o700))?;
            Ok(rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700))?)
        }
        Err(e) => Err(e.into()),
    }
}

/// Refuses a metadata change aimed at an entry of another type (it changed underneath).
fn check_type(dir: &OwnedFd, name: &[u8], target: MetaTarget) -> io::Result<()> {
    let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    let ft = FileType::from_raw_mode(st.st_mode);
    let ok = matches!(
        (target, ft),
        (MetaTarget::File, FileType::RegularFile)
            | (MetaTarget::Dir, FileType::Directory)
            | (MetaTarget::Symlink, FileType::Symlink)
    );
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the entry on the standby has another type",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{Primary, flush, meta, path};
    use crate::wire::protocol::{Message, SessionMode};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_symlink_and_hard_links_are_staged_and_named_at_the_commit() {
        let p = Primary::start(SessionMode::Write);
        let mut lane = p.stream();
        lane.send(&Message::SmallFile {
            id: 1,
            path: path("f"),
            meta: meta(0o644, 1_600_000_000),
            len: 4,
        })
        .unwrap();
        lane.w.write_raw(b"data").unwrap();
        lane.send(&Message::Symlink {
            id: 2,
            path: path("s"),
            target: b"f".to_vec(),
            meta: meta(0o777, 1_600_000_001),
        })
        .unwrap();
        let mut acks = flush(&mut lane, 1);
        acks.sort_by_key(|(id, _)| *id);
        assert_eq!(acks, vec![(1, None), (2, None)]);
        // A link is made to what is there: the file, and the symlink itself.
        for (id, name, target) in [(3, "h", "f"), (4, "s2", "s")] {
            lane.send(&Message::Link {
                id,
                path: path(name),
                target: path(target),
            })
            .unwrap();
        }
        let mut acks = flush(&mut lane, 2);
        acks.sort_by_key(|(id, _)| *id);
        assert_eq!(acks, vec![(3, None), (4, None)]);
        let t = p.tree();
        assert_eq!(
            std::fs::read_link(t.join("s")).unwrap(),
            t.join("f").strip_prefix(t).unwrap()
        );
        let s = std::fs::symlink_metadata(t.join("s")).unwrap();
        assert_eq!(s.mtime(), 1_600_000_001);
        let f = std::fs::metadata(t.join("f")).unwrap();
        assert_eq!(
            (f.ino(), f.nlink()),
            (std::fs::metadata(t.join("h")).unwrap().ino(), 2)
        );
        let s2 = std::fs::symlink_metadata(t.join("s2")).unwrap();
        assert!(s2.file_type().is_symlink());
        assert_eq!((s2.ino(), s2.nlink()), (s.ino(), 2));
        drop(lane);
        p.close().unwrap();
    }

    #[test]
    fn a_link_to_a_missing_file_fails_that_link_only() {
        let p = Primary::start(SessionMode::Write);
        let mut lane = p.stream();
        lane.send(&Message::Link {
            id: 1,
            path: path("h"),
            target: path("missing"),
        })
        .unwrap();
        lane.send(&Message::Mkdir {
            id: 2,
            path: path("d"),
        })
        .unwrap();
        let mut acks = flush(&mut lane, 1);
        acks.sort_by_key(|(id, _)| *id);
        assert!(acks[0].0 == 1 && acks[0].1.is_some(), "{acks:?}");
        assert_eq!(acks[1], (2, None));
        assert!(p.tree().join("d").is_dir());
        assert!(!p.tree().join("h").exists());
        drop(lane);
        p.close().unwrap();
    }
}
