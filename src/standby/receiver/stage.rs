//! Staging: every entry a stream writes is first made as a temp (a file unnamed beside its
//! target, a symlink or link under a temporary name), its attributes set, then handed to
//! the stream's batch, which names it only at the commit. Files that arrive in pieces are
//! filled through a [`TempSink`].

use super::session::{Attrs, Dirs, StandbySession, op_error};
use super::sparse::Holes;
use crate::error::{OpError, ProtocolError};
use crate::model::manifest::Hash;
use crate::model::path::RelPath;
use crate::tree::atomic::{NewTemp, Staged, Temp};
use crate::tree::fsroot;
use crate::wire::protocol::FrameReader;
use rustix::fs::{AtFlags, FileType, Mode};
use rustix::io::Errno;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// A file a stream announced: where it goes, what it gets, and how large it is.
pub(super) struct Incoming {
    /// The operation's ID, which its `Ack` carries.
    pub(super) id: u64,
    /// Where it goes.
    pub(super) path: RelPath,
    /// What it gets besides its content.
    pub(super) attrs: Attrs,
    /// Its size in bytes, as announced.
    pub(super) size: u64,
    /// Keep the temp's descriptor open until the commit (see [`crate::tree::atomic::CommitGroup`]).
    pub(super) keep: bool,
}

/// What staging one received file came to: the staged temp, or why the file failed (told
/// to the primary in its `Ack`; the stream goes on).
pub(super) type EntryResult = Result<Staged, OpError>;

/// Whether a file the primary sent may be kept: it completed it and the content proof, if
/// any (`(theirs, ours)`), holds. Otherwise the primary is asked to send it again.
pub(super) fn verdict(complete: bool, proof: Option<(Hash, Hash)>) -> Result<(), OpError> {
    if !complete {
        Err(OpError::new(
            "the file changed on the primary while it was read",
            true,
        ))
    } else if proof.is_some_and(|(theirs, ours)| theirs != ours) {
        Err(OpError::new("content digest mismatch", true))
    } else {
        Ok(())
    }
}

/// Makes a file to receive an entry of `dir` into (unnamed beside it, see
/// [`crate::tree::atomic::TempPlace`]). A receiver that is not root gives itself write
/// permission on a read-only directory (its mode is restored with the directory's
/// attributes).
pub(super) fn temp_for(s: &StandbySession, dir: &Arc<OwnedFd>) -> io::Result<NewTemp> {
    let place = s.temps()?;
    match place.create(dir) {
        Err(e) if e.raw_os_error() == Some(Errno::ACCESS.raw_os_error()) => {
            let st = rustix::fs::fstat(&**dir)?;
            rustix::fs::fchmod(&**dir, Mode::from_raw_mode((st.st_mode & 0o7777) | 0o700))?;
            place.create(dir)
        }
        other => other,
    }
}

/// Stages `data`, all of a small file's content, as `file`.
pub(super) fn stage_bytes(dirs: &mut Dirs, file: &Incoming, data: &[u8]) -> io::Result<Staged> {
    let s = dirs.session();
    let (dir, name) = dirs.parent(&file.path)?;
    let t = temp_for(s, &dir)?;
    let res = (&t.file)
        .write_all(data)
        .and_then(|_| s.set_fd(t.file.as_fd(), &file.attrs));
    if let Err(e) = res {
        t.temp.discard();
        return Err(e);
    }
    s.wrote(data.len() as u64);
    Ok(staged(file, dir, name.to_vec(), t, data.len() as u64))
}

/// The complete file `t`, staged to become `name` in `dir`; its descriptor kept when
/// `keep` asks (or when it is all there is of an unnamed file).
fn staged(file: &Incoming, dir: Arc<OwnedFd>, name: Vec<u8>, t: NewTemp, bytes: u64) -> Staged {
    let keep = file.keep || matches!(t.temp, Temp::Unnamed { .. });
    Staged {
        id: file.id,
        path: file.path.clone(),
        dir,
        temp: t.temp,
        name,
        file: keep.then_some(t.file),
        bytes,
    }
}

/// Stages a symlink to `target` as `path`, with its attributes.
pub(super) fn stage_symlink(
    dirs: &mut Dirs,
    id: u64,
    path: &RelPath,
    target: &[u8],
    meta: &Attrs,
) -> io::Result<Staged> {
    let s = dirs.session();
    let (dir, name) = dirs.parent(path)?;
    let temp_dir = s.temp_dir(&dir)?;
    let temp = loop {
        let t = fsroot::temp_name();
        match rustix::fs::symlinkat(target, &*temp_dir, t.as_slice()) {
            Ok(()) => break t,
            Err(Errno::EXIST) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    if let Err(e) = s.set_at(temp_dir.as_fd(), &temp, meta, false) {
        let _ = rustix::fs::unlinkat(&*temp_dir, temp.as_slice(), AtFlags::empty());
        return Err(e);
    }
    Ok(Staged::named(id, path, dir, (temp_dir, temp), name))
}

/// Stages another name for the regular file or symlink `target`. A symlink is linked
/// itself: `linkat` without `AT_SYMLINK_FOLLOW` never follows the last name, and the
/// directories on the way are resolved without following any symlink.
pub(super) fn stage_link(
    dirs: &mut Dirs,
    id: u64,
    path: &RelPath,
    target: &RelPath,
) -> io::Result<Staged> {
    let (tdir, tname) = dirs.parent(target)?;
    let st = rustix::fs::statat(&*tdir, tname, AtFlags::SYMLINK_NOFOLLOW)?;
    if !matches!(
        FileType::from_raw_mode(st.st_mode),
        FileType::RegularFile | FileType::Symlink
    ) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "link target is not a regular file or a symlink",
        ));
    }
    let s = dirs.session();
    let (dir, name) = dirs.parent(path)?;
    let temp_dir = s.temp_dir(&dir)?;
    let temp = loop {
        let t = fsroot::temp_name();
        // No AT_SYMLINK_FOLLOW: a symlink target gets a name of its own inode.
        match rustix::fs::linkat(&*tdir, tname, &*temp_dir, t.as_slice(), AtFlags::empty()) {
            Ok(()) => break t,
            Err(Errno::EXIST) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    Ok(Staged::named(id, path, dir, (temp_dir, temp), name))
}

/// A temp being written for the entry `name` of `dir` (see [`crate::tree::atomic::Temp`]).
pub(super) struct TempTarget {
    dir: Arc<OwnedFd>,
    name: Vec<u8>,
    /// The temp, buffered.
    pub(super) w: BufWriter<File>,
    temp: Temp,
}

/// A temp file being filled. Write failures are remembered, not returned, so the stream is
/// always read to the end of the file and stays in step; the file is then reported failed.
pub(super) struct TempSink {
    /// The temp, unless none could be made.
    pub(super) target: Option<TempTarget>,
    /// The file's first failure: what follows of its bytes is read and dropped.
    pub(super) err: Option<OpError>,
    /// The delta's base, for copying unchanged chunks in the kernel.
    pub(super) base: Option<File>,
    /// Set for a sparse file: its holes are kept.
    pub(super) holes: Option<Holes>,
    /// The temp is a clone of the base: a delta writes only what changed.
    pub(super) cloned: bool,
    /// What a delta changed in a cloned temp, held until the delta proves whole so that a
    /// delta the primary aborts (its file changed while read) writes nothing; `None` once
    /// more than [`crate::model::patch::MOST`] bytes came, which are then written as
    /// they come.
    held: Option<Held>,
}

/// What a delta wrote, as ranges sorted and apart (a cloned temp's changes, or a patch in
/// place), with the offset the next byte goes to, up to a bound.
pub(super) struct Held {
    pub(super) ranges: Vec<(u64, Vec<u8>)>,
    bytes: u64,
    pos: u64,
    /// Most bytes held.
    most: u64,
}

impl Held {
    pub(super) fn new(most: u64) -> Held {
        Held {
            ranges: Vec::new(),
            bytes: 0,
            pos: 0,
            most,
        }
    }

    /// Holds `buf` as the next bytes; false (nothing held) when it would pass the bound.
    pub(super) fn hold(&mut self, buf: &[u8]) -> bool {
        if self.bytes + buf.len() as u64 > self.most {
            return false;
        }
        crate::model::patch::push(&mut self.ranges, self.pos, buf);
        self.bytes += buf.len() as u64;
        self.pos += buf.len() as u64;
        true
    }

    /// The next `len` bytes stay as they are.
    pub(super) fn skip(&mut self, len: u64) {
        self.pos += len;
    }

    /// Writes what is held into `f`, at its offsets.
    fn write_to(&self, f: &File) -> io::Result<()> {
        self.ranges
            .iter()
            .try_for_each(|(offset, bytes)| f.write_all_at(bytes, *offset))
    }
}

impl TempSink {
    /// A sink into a new temp for `path`; when none can be made, a sink that takes the
    /// file's bytes (so the stream stays in step) and reports the failure at the end.
    pub(super) fn create(dirs: &mut Dirs, path: &RelPath) -> TempSink {
        let s = dirs.session();
        let target = dirs.parent(path).and_then(|(dir, name)| {
            let t = temp_for(s, &dir)?;
            Ok(TempTarget {
                dir,
                name: name.to_vec(),
                w: BufWriter::with_capacity(1 << 20, t.file),
                temp: t.temp,
            })
        });
        match target {
            Ok(t) => TempSink {
                target: Some(t),
                err: None,
                base: None,
                holes: None,
                cloned: false,
                held: None,
            },
            Err(e) => TempSink {
                target: None,
                err: Some(op_error(&e)),
                base: None,
                holes: None,
                cloned: false,
                held: None,
            },
        }
    }

    /// Stages the temp as `file` when the primary completed it and the content proof, if
    /// any (`(theirs, ours)`), holds (see [`verdict`]); otherwise removes it.
    pub(super) fn finish(
        mut self,
        s: &StandbySession,
        file: &Incoming,
        complete: bool,
        proof: Option<(Hash, Hash)>,
    ) -> EntryResult {
        if self.err.is_none() {
            self.err = verdict(complete, proof).err();
        }
        let Some(TempTarget { dir, name, w, temp }) = self.target.take() else {
            return Err(self
                .err
                .take()
                .unwrap_or_else(|| OpError::new("no temp file", false)));
        };
        let written = match self.err.take() {
            None => w
                .into_inner()
                .map_err(|e| op_error(&e.into_error()))
                .and_then(|f| match self.held.take() {
                    Some(h) => h.write_to(&f).map(|()| f).map_err(|e| op_error(&e)),
                    None => Ok(f),
                }),
            Some(e) => Err(e),
        };
        let t = match written {
            Ok(f) => NewTemp { file: f, temp },
            Err(e) => {
                temp.discard();
                return Err(e);
            }
        };
        match s.set_fd(t.file.as_fd(), &file.attrs) {
            Ok(()) => {
                s.wrote(file.size);
                Ok(staged(file, dir, name, t, file.size))
            }
            Err(e) => {
                t.temp.discard();
                Err(op_error(&e))
            }
        }
    }
}

impl TempSink {
    /// Reads `len` raw bytes off the stream into the temp, in pieces of `buf` (sized here).
    pub(super) fn take_raw<R: Read>(
        &mut self,
        r: &mut FrameReader<R>,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), ProtocolError> {
        buf.resize((1 << 20).min(len).max(1) as usize, 0);
        let mut left = len;
        while left > 0 {
            let n = (left as usize).min(buf.len());
            r.read_raw(&mut buf[..n])?;
            self.write_all(&buf[..n])?;
            left -= n as u64;
        }
        Ok(())
    }

    /// Makes the temp a clone of the base (`FICLONE`: XFS, btrfs; the blocks are shared, not
    /// copied), so that a delta writes only what changed. Not for a sparse file, whose
    /// holes are kept otherwise. The error is the filesystem's refusal.
    pub(super) fn clone_base(&mut self) -> Result<(), Errno> {
        let (Some(base), Some(TempTarget { w, .. })) = (self.base.as_ref(), self.target.as_ref())
        else {
            return Err(Errno::BADF);
        };
        if self.err.is_some() || self.holes.is_some() {
            return Err(Errno::INVAL);
        }
        rustix::fs::ioctl_ficlone(w.get_ref(), base)?;
        self.cloned = true;
        self.held = Some(Held::new(crate::model::patch::MOST));
        Ok(())
    }

    /// Goes on writing at `offset`, leaving a hole behind.
    pub(super) fn seek_to(&mut self, offset: u64) {
        if self.err.is_none()
            && let Some(TempTarget { w, .. }) = self.target.as_mut()
            && let Err(e) = io::Seek::seek(w, io::SeekFrom::Start(offset))
        {
            self.err = Some(op_error(&e));
        }
    }

    /// Makes the temp `size` bytes long: a hole to the end if the data ends before.
    pub(super) fn set_len(&mut self, size: u64) {
        if self.err.is_none()
            && let Some(TempTarget { w, .. }) = self.target.as_mut()
        {
            let done = match self.holes.as_mut() {
                Some(h) => h.finish(w),
                None => Ok(()),
            };
            if let Err(e) = done
                .and_then(|_| w.flush())
                .and_then(|_| w.get_ref().set_len(size))
            {
                self.err = Some(op_error(&e));
            }
        }
    }
}

impl Drop for TempSink {
    fn drop(&mut self) {
        // Reached with a target only when the stream failed mid-file.
        if let Some(t) = self.target.take() {
            t.temp.discard();
        }
    }
}

impl crate::model::delta::DeltaSink for TempSink {
    fn copy_range(&mut self, offset: u64, len: u64) -> io::Result<bool> {
        self.copy_base_range(offset, len)
    }

    fn holds_base(&self) -> bool {
        self.cloned
    }

    fn skip(&mut self, len: u64) -> io::Result<()> {
        if let Some(h) = self.held.as_mut() {
            h.skip(len);
            return Ok(());
        }
        if self.err.is_none()
            && let Some(TempTarget { w, .. }) = self.target.as_mut()
            && let Err(e) = io::Seek::seek(w, io::SeekFrom::Current(len as i64))
        {
            self.err = Some(op_error(&e));
        }
        Ok(())
    }
}

impl TempSink {
    /// Holds `buf` if the sink holds what it is given; false once it no longer does. Past
    /// the bound, what was held is written and the temp goes on from where it got to.
    fn hold(&mut self, buf: &[u8]) -> bool {
        let Some(h) = self.held.as_mut() else {
            return false;
        };
        if h.hold(buf) {
            return true;
        }
        let Some(h) = self.held.take() else {
            return false;
        };
        if self.err.is_none()
            && let Some(TempTarget { w, .. }) = self.target.as_mut()
        {
            let written = h
                .write_to(w.get_ref())
                .and_then(|()| io::Seek::seek(w, io::SeekFrom::Start(h.pos)).map(drop));
            if let Err(e) = written {
                self.err = Some(op_error(&e));
            }
        }
        false
    }
}

impl Write for TempSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.hold(buf) {
            return Ok(buf.len());
        }
        if self.err.is_none()
            && let Some(TempTarget { w, .. }) = self.target.as_mut()
        {
            let written = match self.holes.as_mut() {
                Some(h) => h.write(w, buf),
                None => w.write_all(buf),
            };
            if let Err(e) = written {
                self.err = Some(op_error(&e));
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cloned_temp_is_written_only_with_what_changed_and_only_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clone");
        std::fs::write(&path, vec![1u8; 64]).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut h = Held::new(16);
        h.skip(8);
        assert!(h.hold(&[2; 4]));
        assert!(h.hold(&[3; 4]), "joined to the range before");
        h.skip(40);
        assert!(h.hold(&[4; 8]));
        assert!(!h.hold(&[5; 1]), "past the bound nothing more is held");
        assert_eq!(h.ranges.len(), 2);
        assert_eq!(std::fs::read(&path).unwrap(), vec![1u8; 64], "nothing yet");
        h.write_to(&f).unwrap();
        let mut want = vec![1u8; 64];
        want[8..12].fill(2);
        want[12..16].fill(3);
        want[56..64].fill(4);
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }
}
