//! Operations on names and attributes: renames, removals, directories, attribute fixes,
//! and the symlinks and hard links a stream stages. Each is recorded in the stream's batch,
//! and acknowledged once the batch is durable.

use super::ops::{Ops, Then, check_writable};
use super::session::{Attrs, op_error};
use super::stage::{stage_link, stage_symlink};
use crate::atomic::Touched;
use crate::fsroot::remove_tree;
use crate::manifest::{Meta, MetaTarget};
use crate::path::RelPath;
use crate::protocol::ProtocolError;
use crate::transport::SendHalf;
use rustix::fs::{AtFlags, FileType, Mode};
use rustix::io::Errno;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
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
        let res = dirs.parent(from).and_then(|(fd, fname)| {
            let (td, tname) = dirs.parent(to)?;
            rustix::fs::renameat(&*fd, fname, &*td, tname)?;
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
        match self
            .dirs
            .parent(path)
            .and_then(|(d, name)| Ok((remove_tree(d.as_fd(), name)?, d)))
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
        let res = self.dirs.parent(path).and_then(|(d, name)| {
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
            s.set_at(d.as_fd(), name, &a, target != MetaTarget::Symlink)?;
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
        if target.is_empty() || target.len() > crate::path::MAX_PATH || target.contains(&0) {
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

