//! Reading the files being sent. A live tree changes under the reader: a file may vanish,
//! shrink, grow or be rewritten while it is read, and each reader says which, so that the
//! caller skips it, reports it, or sends it again.

use crate::error::ProtocolError;
use crate::model::delta::ReadAt;
use crate::model::manifest::SMALL_FILE;
use crate::model::path::RelPath;
use crate::model::xattrs::{Policy, Xattrs};
use crate::tree::fsroot::{Root, changed};
use crate::tree::xattr::At;
use rustix::io::Errno;
use std::io::{self, Read};
use std::os::fd::AsFd;

/// Why a file could not be read (before anything of it was sent).
pub(super) enum ReadError {
    /// It disappeared or changed type since the scan: the next sync sees the new state.
    Vanished,
    Other(String),
}

/// Tells a file gone since the scan (a routine race) from one that cannot be read.
pub(super) fn read_error(e: io::Error) -> ReadError {
    match e.raw_os_error() {
        Some(c) if c == Errno::NOENT.raw_os_error() || c == Errno::LOOP.raw_os_error() => {
            ReadError::Vanished
        }
        _ if e.kind() == io::ErrorKind::InvalidInput => ReadError::Vanished,
        _ => ReadError::Other(e.to_string()),
    }
}

/// Why a file already announced to the standby is abandoned there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Problem {
    pub reason: String,
    /// Another try may succeed: the file changed while it was read.
    pub retry: bool,
}

impl Problem {
    pub(super) fn changed() -> Problem {
        Problem {
            reason: "changed while being read".into(),
            retry: true,
        }
    }

    /// What a failed read of a file being sent means for it: a file that shrank changed
    /// while read (worth another try); anything else is an error to report.
    pub(super) fn of_read(e: &io::Error) -> Problem {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Problem::changed()
        } else {
            Problem {
                reason: format!("cannot read: {e}"),
                retry: false,
            }
        }
    }
}

/// Reads `size` bytes of `f` in pieces and hands each to `each`. After a failed read the
/// rest comes as zeros, so a stream promised `size` bytes still gets them; the failure is
/// returned, and the file must then be abandoned.
pub(super) fn read_through(
    f: &std::fs::File,
    size: u64,
    each: impl FnMut(&[u8]) -> Result<(), ProtocolError>,
) -> Result<Option<Problem>, ProtocolError> {
    read_range(f, 0, size, &mut Vec::new(), each)
}

/// [`read_through`] of the bytes `start..end`, in pieces of `buf` (sized here).
pub(super) fn read_range(
    f: &std::fs::File,
    start: u64,
    end: u64,
    buf: &mut Vec<u8>,
    each: impl FnMut(&[u8]) -> Result<(), ProtocolError>,
) -> Result<Option<Problem>, ProtocolError> {
    read_pieces(f, start, end, 1 << 20, buf, each)
}

/// [`read_range`] in pieces of `piece` bytes (the last one shorter).
pub(super) fn read_pieces(
    f: &std::fs::File,
    start: u64,
    end: u64,
    piece: u64,
    buf: &mut Vec<u8>,
    mut each: impl FnMut(&[u8]) -> Result<(), ProtocolError>,
) -> Result<Option<Problem>, ProtocolError> {
    buf.resize(piece.min(end - start).max(1) as usize, 0);
    let mut off = start;
    let mut problem = None;
    while off < end {
        let n = buf.len().min((end - off) as usize);
        if problem.is_none()
            && let Err(e) = f.read_exact_at(&mut buf[..n], off)
        {
            problem = Some(Problem::of_read(&e));
        }
        if problem.is_some() {
            buf[..n].fill(0);
        }
        each(&buf[..n])?;
        off += n as u64;
    }
    Ok(problem)
}

/// Reads a small file whole into `buf`, re-reading if it changed meanwhile, with the
/// attributes `policy` keeps. `Ok(None)`: it has grown past the small-file size.
pub(super) fn read_small(
    root: &Root,
    path: &RelPath,
    buf: &mut Vec<u8>,
    policy: &Policy,
) -> Result<Option<(rustix::fs::Stat, Xattrs)>, ReadError> {
    for _ in 0..5 {
        let mut f = root.open_file(path).map_err(read_error)?;
        let before = rustix::fs::fstat(&f).map_err(|e| read_error(e.into()))?;
        if before.st_size as u64 > SMALL_FILE {
            return Ok(None);
        }
        buf.clear();
        (&mut f)
            .take(SMALL_FILE + 1)
            .read_to_end(buf)
            .map_err(read_error)?;
        // Read before the second stat: a change of attributes meanwhile changes the ctime.
        let x = xattrs_of(At::Fd(f.as_fd()), policy).map_err(read_error)?;
        let after = rustix::fs::fstat(&f).map_err(|e| read_error(e.into()))?;
        if !changed(&before, &after) && buf.len() as u64 == after.st_size as u64 {
            return Ok(Some((after, x)));
        }
    }
    Err(ReadError::Other("keeps changing while being read".into()))
}

/// The attributes of `at` that `policy` keeps, if they fit what one entry may carry.
pub(super) fn xattrs_of(at: At<'_>, policy: &Policy) -> io::Result<Xattrs> {
    let x = crate::tree::xattr::read(at, policy)?;
    if x.0.len() > crate::model::xattrs::MAX_COUNT || x.bytes() > crate::model::xattrs::MAX_TOTAL {
        return Err(io::Error::other(format!(
            "{} extended attributes of {} bytes are more than hotsync mirrors \
             ({} and {} bytes at most)",
            x.0.len(),
            x.bytes(),
            crate::model::xattrs::MAX_COUNT,
            crate::model::xattrs::MAX_TOTAL
        )));
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_read_past_the_end_leaves_zeros_and_asks_for_another_try() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"abcdef").unwrap();
        let mut got = Vec::new();
        let problem = read_range(&f, 2, 10, &mut Vec::new(), |p| {
            got.extend_from_slice(p);
            Ok(())
        })
        .unwrap();
        // Promised bytes are always delivered, so the stream stays in step.
        assert_eq!(got.len(), 8);
        assert!(got.iter().all(|b| *b == 0), "{got:?}");
        assert_eq!(problem, Some(Problem::changed()));
    }

    #[test]
    fn a_whole_read_hands_on_every_byte() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
        f.write_all(&data).unwrap();
        let mut got = Vec::new();
        let problem = read_through(&f, data.len() as u64, |p| {
            got.extend_from_slice(p);
            Ok(())
        })
        .unwrap();
        assert_eq!(problem, None);
        assert!(got == data);
    }
}
