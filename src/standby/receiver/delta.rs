//! Receiving a file as a delta against the standby's version of it (`Delta`, or
//! `SparseDelta` for a file with holes): the standby hashes its base while it reads the
//! primary's chunk digests, answers with a signature of what differs (`BaseSig`) or with
//! `NoBase`, then applies the primary's ops into a temp, which is staged only if its digest
//! is the primary's.

use super::ops::{Indexing, Ops, Then, check_writable};
use super::session::{Dirs, op_error, reason};
use super::sparse::Holes;
use super::stage::{EntryResult, Held, Incoming, TempSink, TempTarget, verdict};
use super::whole::file_end;
use crate::error::{OpError, ProtocolError};
use crate::model::delta::{self, COARSE_HASH_LEN, MAX_CHUNKS, ReadAt, chunk_size};
use crate::model::manifest::Hash;
use crate::model::path::RelPath;
use crate::transport::SendHalf;
use crate::tree::atomic::Touched;
use crate::tree::fsroot;
use crate::tree::patch::Pending;
use crate::wire::protocol::{Chunking, DeltaHead, FrameReader, FrameWriter, Message};
use rustix::fs::{FileType, OFlags};
use rustix::io::Errno;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;

impl<R: Read, W: SendHalf> Ops<'_, R, W> {
    /// `Delta` or `SparseDelta`: the file is received against its base here and staged.
    pub(super) fn delta(&mut self, head: DeltaHead) -> Result<Then, ProtocolError> {
        check_writable(&head.path)?;
        let DeltaHead {
            id,
            path,
            meta,
            size,
            chunking,
        } = head;
        let file = self.incoming(id, path, meta, size);
        let Receipt {
            received,
            chunks: index,
            base: base_ino,
        } = receive(&mut self.dirs, self.r, self.w, &file, chunking)?;
        let ok = match received {
            Received::Staged(res) => {
                let ok = res.is_ok();
                self.stage(id, res);
                ok
            }
            Received::Patched(Ok((touched, pending))) => {
                self.dirs.session().wrote(file.size);
                self.batch.applied(id, touched);
                self.patches.push((id, file.path.clone(), pending));
                true
            }
            Received::Patched(Err(e)) => {
                self.batch.failed(id, e);
                false
            }
        };
        if ok && let Some(digests) = index {
            self.indexes.push(Indexing {
                id,
                path: file.path.clone(),
                chunk: chunking.chunk,
                digests,
                base: base_ino,
            });
        }
        Ok(Then::Commit)
    }
}

/// A delta received: what it came to, with the new version's chunk digests for a file
/// large enough to be indexed and the inode of its base.
struct Receipt {
    received: Received,
    chunks: Option<Vec<Hash>>,
    base: Option<u64>,
}

/// What receiving a delta came to for its file.
enum Received {
    /// A temp to stage, or the file's failure.
    Staged(EntryResult),
    /// The file patched in place, durable at the commit, its journal waiting for it; or
    /// the file's failure (nothing was changed).
    Patched(Result<(Touched, Pending), OpError>),
}

/// The standby's version of a file, the base of its delta.
struct Base {
    file: File,
    size: u64,
    /// Its inode and links: only a file of one name is patched in place.
    ino: u64,
    nlink: u64,
    /// It has holes: it is hashed reading only its data.
    holes: bool,
    /// Its chunk digests from its block index, when one holds: it is not read to hash.
    indexed: Option<Vec<Hash>>,
}

/// Receives `file` as a delta cut as `chunking` says, with its chunk digests when it is
/// large enough to be indexed. The outer error is fatal (the stream is unusable); the inner
/// one concerns this file only.
///
/// The new version goes into a temp, staged for the commit's rename; where the filesystem
/// can clone (XFS, btrfs) the temp is a clone of the base, written only where the file
/// changed. Where it cannot, a large file of one name whose change fits in memory is
/// patched in place instead, through a journal ([`crate::tree::patch`]).
fn receive<R: Read, W: Write>(
    dirs: &mut Dirs,
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
    file: &Incoming,
    chunking: Chunking,
) -> Result<Receipt, ProtocolError> {
    let size = file.size;
    if chunking.chunk != chunk_size(size)
        || chunking.chunks != size.div_ceil(chunking.chunk)
        || chunking.chunks > MAX_CHUNKS
    {
        return Err(ProtocolError::Invalid(
            "delta chunking does not match its size".into(),
        ));
    }
    let base = open_base(dirs, &file.path, chunking.chunk);
    let hashed = hash_while_reading(r, &base, chunking);
    let coarse = hashed.coarse?;
    let signed = hashed.base.and_then(|(b, digests)| {
        delta::sign_with(&b.file, b.size, chunking.chunk, &digests, &coarse)
            .map(|sig| (sig, digests))
    });
    let (base, base_size, one_name) = match base {
        Ok(b) => (Some((b.file, b.ino)), b.size, b.nlink == 1),
        Err(_) => (None, 0, false),
    };
    let known = answer(w, base_size, signed)?;
    let base_file = base.as_ref().map(|(f, _)| f);
    let patchable = !chunking.sparse
        && one_name
        && size >= crate::tree::blockindex::INDEXED
        && unmatched(&known, size, chunking.chunk) <= crate::model::patch::MOST_UNMATCHED;
    let standby = &dirs.session().standby;
    // Where the filesystem refused a clone once, a file to patch makes no temp to try.
    let sink = (!(patchable && standby.cannot_clone())).then(|| {
        let mut sink = TempSink::create(dirs, &file.path);
        sink.base = base_file.and_then(|f| f.try_clone().ok());
        if chunking.sparse {
            sink.holes = Some(Holes::default());
        } else if base_size >= 2 * chunking.chunk && sink.clone_base() == Err(Errno::OPNOTSUPP) {
            dirs.session().standby.refused_clone();
        }
        sink
    });
    let cloned = sink.as_ref().is_some_and(|s| s.cloned);
    if patchable
        && !cloned
        && let Some((f, ino)) = base
    {
        drop(sink);
        let mut patch = PatchSink::default();
        let applied = apply(r, Some(&f), base_size, &mut patch, size, &known, false)?;
        let (complete, proof) = delta_end(r, applied.0)?;
        let res = match verdict(complete, proof) {
            Ok(()) if patch.overflow => Err(OpError::new(
                "the change is too large to patch in place",
                true,
            )),
            Ok(()) => patch_in_place(dirs, file, ino, &patch.held.ranges),
            Err(e) => Err(e),
        };
        return Ok(Receipt {
            received: Received::Patched(res),
            chunks: applied.1,
            base: Some(ino),
        });
    }
    let mut sink = match sink {
        Some(s) => s,
        None => TempSink::create(dirs, &file.path),
    };
    let (ours, chunks) = apply(
        r,
        base_file,
        base_size,
        &mut sink,
        size,
        &known,
        chunking.sparse,
    )?;
    let (complete, proof) = delta_end(r, ours)?;
    if chunking.sparse || sink.cloned {
        sink.set_len(size);
    }
    let res = sink.finish(dirs.session(), file, complete, proof);
    Ok(Receipt {
        received: Received::Staged(res),
        chunks,
        base: base.map(|(_, ino)| ino),
    })
}

/// Applies the delta's ops from `r` into `sink`: the new version's digest (`None` when the
/// primary aborted it) and, for a file large enough, its chunk digests.
fn apply<R: Read>(
    r: &mut FrameReader<R>,
    base: Option<&File>,
    base_size: u64,
    sink: &mut impl delta::DeltaSink,
    size: u64,
    known: &[Option<Hash>],
    sparse: bool,
) -> Result<(Option<Hash>, Option<Vec<Hash>>), ProtocolError> {
    match delta::apply(r.raw(), &SoftBase(base), base_size, sink, size, known) {
        Ok(applied) => {
            let index = size >= crate::tree::blockindex::INDEXED && !sparse;
            Ok((Some(applied.digest), index.then_some(applied.chunks)))
        }
        Err(delta::DeltaError::Aborted) => Ok((None, None)),
        Err(delta::DeltaError::Malformed(m)) => Err(ProtocolError::Invalid(format!("delta: {m}"))),
        Err(delta::DeltaError::Io(e)) => Err(ProtocolError::Io(e)),
    }
}

/// Reads a delta's end: whether the primary completed it and, if so, its digest with ours
/// (`(theirs, ours)`) for [`verdict`].
fn delta_end<R: Read>(
    r: &mut FrameReader<R>,
    ours: Option<Hash>,
) -> Result<(bool, Option<(Hash, Hash)>), ProtocolError> {
    let (complete, theirs) = file_end(r)?;
    match (complete, ours, theirs) {
        (true, Some(o), Some(t)) => Ok((true, Some((t, o)))),
        (false, _, _) => Ok((false, None)),
        _ => Err(ProtocolError::Invalid(
            "a completed delta needs its digest".into(),
        )),
    }
}

/// Bytes of a new version of `size` bytes (in chunks of `chunk`) that no base chunk at the
/// same offset matches: the most a patch in place writes.
fn unmatched(known: &[Option<Hash>], size: u64, chunk: u64) -> u64 {
    let matched: u64 = known
        .iter()
        .enumerate()
        .filter(|(_, k)| k.is_some())
        .map(|(i, _)| chunk.min(size.saturating_sub(i as u64 * chunk)))
        .sum();
    size.saturating_sub(matched)
}

/// Patches the standby's version of `file` (inode `ino`) in place with `ranges`, its new
/// bytes, through a journal; its attributes are the new version's.
fn patch_in_place(
    dirs: &mut Dirs,
    file: &Incoming,
    ino: u64,
    ranges: &[(u64, Vec<u8>)],
) -> Result<(Touched, Pending), OpError> {
    let s = dirs.session();
    let (dir, name) = dirs.parent(&file.path).map_err(|e| op_error(&e))?;
    let f = fsroot::resolve(
        dir.as_fd(),
        name,
        OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC,
    )
    .map(File::from)
    .map_err(|e| op_error(&e))?;
    let st = rustix::fs::fstat(&f).map_err(|e| op_error(&e.into()))?;
    if st.st_ino != ino {
        return Err(OpError::new(
            "the standby's version changed during the delta",
            true,
        ));
    }
    let xattrs = if s.xattrs.is_none() {
        None
    } else {
        let x = crate::tree::xattr::read(crate::tree::xattr::At::Fd(f.as_fd()), &s.xattrs)
            .map_err(|e| op_error(&e))?;
        Some((x, s.xattrs))
    };
    let old = crate::model::undo::OldAttrs {
        meta: fsroot::meta_of(&st),
        owners: s.owners(),
        with_mode: true,
        xattrs,
    };
    let pending = s
        .standby
        .in_area(|area| {
            crate::tree::patch::patch(area, &file.path, &f, ranges, file.size, old, |f| {
                s.set_fd(f.as_fd(), &file.attrs)
            })
        })
        .unwrap_or_else(|| Err(io::Error::other("the standby's reserved area is not open")))
        .map_err(|e| op_error(&e))?;
    Ok((Touched::entry(dir, name), pending))
}

/// A delta's output when the base is patched in place: the new bytes, where they go, held
/// until the delta is proven (the base is read meanwhile, and must not change). Past
/// [`crate::model::patch::MOST`] bytes it holds no more (`overflow`): the file is then
/// refused, and the primary sends it whole.
struct PatchSink {
    held: Held,
    overflow: bool,
}

impl Default for PatchSink {
    fn default() -> PatchSink {
        PatchSink {
            held: Held::new(crate::model::patch::MOST),
            overflow: false,
        }
    }
}

impl Write for PatchSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.overflow = self.overflow || !self.held.hold(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl delta::DeltaSink for PatchSink {
    fn holds_base(&self) -> bool {
        true
    }
    fn skip(&mut self, len: u64) -> io::Result<()> {
        self.held.skip(len);
        Ok(())
    }
}

/// Whether the standby signs a base of `base_size` bytes for a new version cut in chunks
/// of `chunk` bytes. A base far larger than the new file (which sets the chunk size) would
/// cost more to sign than to resend: the file then goes whole. The bound is the one the
/// primary holds a signature to ([`delta::MAX_BASE_CHUNKS`]).
fn signable(base_size: u64, chunk: u64) -> bool {
    base_size.div_ceil(chunk) <= delta::MAX_BASE_CHUNKS
}

/// Opens the standby's version of `path` as the base of a delta cut in chunks of `chunk`
/// bytes: a regular file, not too large to sign. The error says why there is none.
fn open_base(dirs: &mut Dirs, path: &RelPath, chunk: u64) -> io::Result<Base> {
    let (dir, name) = dirs.parent(path)?;
    let f = fsroot::resolve(
        dir.as_fd(),
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
    )?;
    let st = rustix::fs::fstat(&f)?;
    let indexed = dirs.session().standby.indexed(&st, chunk);
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if !signable(st.st_size as u64, chunk) {
        return Err(io::Error::other(
            "the standby's version is too large to serve as a delta base",
        ));
    }
    Ok(Base {
        file: File::from(f),
        size: st.st_size as u64,
        ino: st.st_ino,
        nlink: st.st_nlink as u64,
        holes: crate::tree::sparse::has_holes(&st),
        indexed,
    })
}

/// What the start of a delta yields.
struct Hashed<'b> {
    /// The primary's chunk digests, as sent.
    coarse: Result<Vec<[u8; COARSE_HASH_LEN]>, ProtocolError>,
    /// The base with its chunk digests, or why there is none.
    base: io::Result<(&'b Base, Vec<Hash>)>,
}

/// Reads the primary's chunk digests (as sent) while the base, if there is one, is hashed
/// beside: the primary is still hashing (and sending) its new version meanwhile. Returns
/// the digests read, and the base with its chunk digests or why it has none.
fn hash_while_reading<'b, R: Read>(
    r: &mut FrameReader<R>,
    base: &'b io::Result<Base>,
    chunking: Chunking,
) -> Hashed<'b> {
    std::thread::scope(|sc| {
        let hashing = base.as_ref().map(|b| {
            let hashing = sc.spawn(move || {
                if let Some(d) = &b.indexed {
                    Ok((d.clone(), [0; 32]))
                } else if b.holes {
                    delta::hash_chunks(&crate::tree::sparse::Holey(&b.file), b.size, chunking.chunk)
                } else {
                    delta::hash_chunks(&b.file, b.size, chunking.chunk)
                }
            });
            (b, hashing)
        });
        let mut coarse = vec![[0u8; COARSE_HASH_LEN]; chunking.chunks as usize];
        let read = coarse.iter_mut().try_for_each(|c| r.read_raw(c));
        let hashed = match hashing {
            Ok((b, h)) => h
                .join()
                .expect("hashing thread panicked")
                .map(|(digests, _)| (b, digests)),
            Err(e) => Err(io::Error::new(e.kind(), reason(e))),
        };
        Hashed {
            coarse: read.map(|_| coarse),
            base: hashed,
        }
    })
}

/// Answers the primary's chunk digests: the base's signature of what differs (`BaseSig`),
/// or why there is no base (`NoBase`). Returns, per chunk, the digest of a base chunk the
/// primary's matches at the same offset, so its copy need not be hashed again.
fn answer<W: Write>(
    w: &mut FrameWriter<W>,
    base_size: u64,
    signed: io::Result<(delta::BaseSignature, Vec<Hash>)>,
) -> Result<Vec<Option<Hash>>, ProtocolError> {
    let mut known: Vec<Option<Hash>> = Vec::new();
    match signed {
        Ok((sig, digests)) => {
            w.send(&Message::BaseSig {
                base_size,
                block_size: sig.block_size,
                matched_len: sig.matched.len() as u64,
                fine_len: sig.fine.len() as u64,
            })?;
            w.write_raw(&sig.matched)?;
            w.write_raw(&sig.fine)?;
            known = digests
                .into_iter()
                .enumerate()
                .map(|(i, d)| delta::bit(&sig.matched, i).then_some(d))
                .collect();
        }
        Err(e) => w.send(&Message::NoBase {
            reason: e.to_string(),
        })?,
    }
    w.flush()?;
    Ok(known)
}

/// The standby's base file for a delta. A read failure yields zeros (and a digest
/// mismatch, so the primary resends the file whole) instead of desynchronising the stream.
struct SoftBase<'a>(Option<&'a File>);

impl ReadAt for SoftBase<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if let Some(f) = self.0
            && let Ok(n @ 1..) = ReadAt::read_at(f, buf, offset)
        {
            return Ok(n);
        }
        buf.fill(0);
        Ok(buf.len())
    }
}

impl TempSink {
    /// Unchanged chunks of a delta go from the base to the temp with `copy_file_range`,
    /// never through user space.
    pub(super) fn copy_base_range(&mut self, offset: u64, len: u64) -> io::Result<bool> {
        if self.err.is_some() {
            return Ok(true); // the file has failed already; skip the work
        }
        let (Some(base), Some(TempTarget { w, .. })) = (self.base.as_ref(), self.target.as_mut())
        else {
            return Ok(false);
        };
        if let Some(h) = self.holes.as_mut() {
            if let Err(e) = h.copy(w, base, offset, len) {
                self.err = Some(op_error(&e));
            }
            return Ok(true);
        }
        if let Err(e) = w.flush() {
            self.err = Some(op_error(&e));
            return Ok(true);
        }
        let (mut off, mut left, mut first) = (offset, len, true);
        while left > 0 {
            match rustix::fs::copy_file_range(
                base,
                Some(&mut off),
                w.get_ref(),
                None,
                left as usize,
            ) {
                Ok(0) => {
                    self.err = Some(OpError::new("the base file shrank during the delta", false));
                    return Ok(true);
                }
                Ok(n) => left -= n as u64,
                // Not supported here: let the caller copy through user space.
                Err(Errno::XDEV | Errno::NOSYS | Errno::OPNOTSUPP | Errno::INVAL) if first => {
                    return Ok(false);
                }
                Err(e) => {
                    self.err = Some(op_error(&e.into()));
                    return Ok(true);
                }
            }
            first = false;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{Primary, end_stream, meta, path};
    use crate::error::OpError;
    use crate::model::delta::{
        self, BaseSignature, DeltaEncoder, chunk_size, coarse_wire, hash_chunks,
    };
    use crate::model::manifest::Hash;
    use crate::wire::protocol::{Message, SessionMode};

    fn pseudo_random(n: usize, mut x: u64) -> Vec<u8> {
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 33) as u8
            })
            .collect()
    }

    /// What the primary saw of a delta it sent.
    struct Sent {
        /// The standby offered its version as a base.
        based: bool,
        /// Bytes that went as literals.
        literal: u64,
        ack: (u64, Option<OpError>),
    }

    /// Sends `new` as a delta to `name`, as the primary does, with `digest` as its proof
    /// (the true one if `None`).
    fn send_delta(p: &Primary, id: u64, name: &str, new: &[u8], digest: Option<Hash>) -> Sent {
        let size = new.len() as u64;
        let chunk = chunk_size(size);
        let (digests, ours) = hash_chunks(new, size, chunk).unwrap();
        let mut s = p.stream();
        s.send(&Message::Delta {
            id,
            path: path(name),
            meta: meta(0o644, 1_700_000_000),
            size,
            chunk,
            chunks: digests.len() as u64,
        })
        .unwrap();
        for c in coarse_wire(&digests) {
            s.w.write_raw(&c).unwrap();
        }
        s.flush().unwrap();
        let encoder = match s.recv().unwrap() {
            Message::BaseSig {
                base_size,
                block_size,
                matched_len,
                fine_len,
            } => {
                let mut matched = vec![0; matched_len as usize];
                s.r.read_raw(&mut matched).unwrap();
                let mut fine = vec![0; fine_len as usize];
                s.r.read_raw(&mut fine).unwrap();
                let sig = BaseSignature {
                    block_size,
                    matched,
                    fine,
                };
                Some(DeltaEncoder::new(base_size, chunk, sig).unwrap())
            }
            Message::NoBase { .. } => None,
            other => panic!("expected BaseSig or NoBase, got {other:?}"),
        };
        let stats = match &encoder {
            Some(e) => e.encode(new, size, s.w.raw()),
            None => delta::encode_literal(new, size, s.w.raw()),
        }
        .unwrap();
        s.send(&Message::FileEnd {
            complete: true,
            digest: Some(digest.unwrap_or(ours)),
        })
        .unwrap();
        Sent {
            based: encoder.is_some(),
            literal: stats.literal,
            ack: end_stream(s),
        }
    }

    /// A base of 1.5 MiB on the standby, and a new version with a few bytes changed in the
    /// middle and some appended.
    fn versions() -> (Vec<u8>, Vec<u8>) {
        let base = pseudo_random(1536 * 1024, 1);
        let mut new = base.clone();
        new[700_000..700_100].fill(0xAB);
        new.extend_from_slice(&pseudo_random(1000, 2));
        (base, new)
    }

    #[test]
    fn a_delta_is_applied_against_the_standby_s_version() {
        let (base, new) = versions();
        let p = Primary::start_with(SessionMode::Write, |t| {
            std::fs::write(t.join("f"), &base).unwrap();
        });
        let sent = send_delta(&p, 9, "f", &new, None);
        assert_eq!(sent.ack, (9, None));
        assert!(sent.based, "the standby's version is the base");
        assert!(
            sent.literal < 64 * 1024,
            "{} bytes sent as literals",
            sent.literal
        );
        assert!(std::fs::read(p.tree().join("f")).unwrap() == new);
        p.close().unwrap();
    }

    #[test]
    fn a_delta_that_does_not_check_out_is_refused_and_the_base_kept() {
        let (base, new) = versions();
        let p = Primary::start_with(SessionMode::Write, |t| {
            std::fs::write(t.join("f"), &base).unwrap();
        });
        let sent = send_delta(&p, 9, "f", &new, Some([7; 32]));
        let (id, error) = sent.ack;
        assert_eq!(id, 9);
        assert!(
            error.is_some_and(|e| e.retry),
            "the primary is asked to resend it"
        );
        assert!(std::fs::read(p.tree().join("f")).unwrap() == base);
        p.close().unwrap();
    }

    #[test]
    fn without_a_base_the_delta_is_all_literals() {
        let (_, new) = versions();
        let p = Primary::start(SessionMode::Write);
        let sent = send_delta(&p, 2, "new", &new, None);
        assert_eq!(sent.ack, (2, None));
        assert!(!sent.based);
        assert!(std::fs::read(p.tree().join("new")).unwrap() == new);
        p.close().unwrap();
    }

    #[test]
    fn the_standby_signs_a_base_of_up_to_four_times_the_chunks_of_a_file() {
        let chunk = chunk_size(1);
        assert!(super::signable(delta::MAX_BASE_CHUNKS * chunk, chunk));
        assert!(!super::signable(delta::MAX_BASE_CHUNKS * chunk + 1, chunk));
    }
}
