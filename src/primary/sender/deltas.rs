//! Large files the standby has a version of, sent as deltas on a stream of their own: the
//! new version's coarse hashes go first, the standby answers with a signature of its base
//! (or that it has none), and the op stream turning the base into the new version follows
//! (see [`crate::model::delta`]). A delta that does not work out is sent again whole.

use super::acks::{Op, Settled};
use super::attrs::send_xattrs;
use super::ends::peer_error;
use super::exec::Exec;
use super::index;
use super::read::{Problem, ReadError, read_error, read_pieces, read_through, xattrs_of};
use super::whole::read_one_ack;
use crate::error::Error;
use crate::error::{OpError, ProtocolError};
use crate::model::delta::{self, COARSE_HASH_LEN, DeltaEncoder, chunk_size};
use crate::model::manifest::Hash;
use crate::model::path::RelPath;
use crate::model::plan::Transfer;
use crate::model::xattrs::Xattrs;
use crate::tree::fsroot::{changed, meta_of};
use crate::tree::xattr::At;
use crate::wire::channel::{Channel, Reader, Writer};
use crate::wire::protocol::{Chunking, DeltaHead, Message};
use std::fs::File;
use std::io;
use std::os::fd::AsFd;

/// The new version of a file, opened to be sent as a delta, as it was when opened.
struct NewVersion {
    f: File,
    before: rustix::fs::Stat,
    size: u64,
    chunk: u64,
    /// Its holes are neither read nor hashed, and the standby keeps them.
    sparse: bool,
}

/// How a delta's exchange ended.
struct DeltaSent {
    /// The standby's error with the file.
    error: Option<OpError>,
    /// Our own problem with it: the standby was told to discard it.
    problem: Option<Problem>,
    /// It was sent as it was while written (it changed while read, no read was steady).
    torn: bool,
}

impl Exec<'_> {
    /// Sends the file of `t` as a delta against the standby's version, and accounts for it;
    /// sends it whole instead when the delta does not work out (it changed while read, the
    /// standby could not check the result, a sparse file found no base).
    pub(super) fn delta_stream(&self, t: &Transfer) -> Result<(), Error> {
        let Some((new, attrs)) = self.open_new_version(&t.path)? else {
            return Ok(());
        };
        let mut ch = Channel::open(self.conn())?;
        let sent = self
            .send_delta(&mut ch, &t.path, &new, attrs)
            .map_err(peer_error)?;
        if sent.torn && sent.error.is_none() {
            tracing::debug!(
                "{}: changed while read; sent as read, again with its next change",
                t.path
            );
            self.book().torn();
        }
        match sent {
            // A large file a watch could not send as read (it shrank while read, or the
            // standby had no base) would be read whole again and again: it is left to the
            // batch of the change that came meanwhile (it counts as gone for now, so the
            // batch is no consistent point).
            DeltaSent {
                problem: Some(p), ..
            } if p.retry && self.ends.carry.watching && new.size >= index::INDEXED => {
                tracing::debug!("{}: changed while read; left to its next change", t.path);
                self.book().vanished();
                Ok(())
            }
            DeltaSent {
                problem: Some(p), ..
            } if p.retry => {
                tracing::debug!("{}: changed while read; sending it again", t.path);
                self.whole_stream(&t.path, true)
            }
            DeltaSent {
                error: Some(e),
                problem: None,
                ..
            } if e.retry && !e.no_space => {
                tracing::debug!("{}: delta not accepted; sending it whole", t.path);
                self.whole_stream(&t.path, true)
            }
            DeltaSent {
                problem: Some(p), ..
            } => {
                self.error(&t.path, p.reason);
                Ok(())
            }
            DeltaSent {
                error,
                problem: None,
                ..
            } => {
                let op = Op::Transfer { bytes: new.size };
                self.account(Settled {
                    path: t.path.clone(),
                    op,
                    error,
                });
                Ok(())
            }
        }
    }

    /// Opens the file at `path` to send, with the attributes that go with it; `None` after
    /// counting or reporting why it cannot be read.
    fn open_new_version(&self, path: &RelPath) -> Result<Option<(NewVersion, Xattrs)>, Error> {
        let f = match self.ends.root.open_file(path) {
            Ok(f) => f,
            Err(e) => {
                match read_error(e) {
                    ReadError::Vanished => self.vanished(path),
                    ReadError::Other(e) => self.error(path, format!("cannot read: {e}")),
                }
                return Ok(None);
            }
        };
        let before = rustix::fs::fstat(&f).map_err(|e| ProtocolError::Io(e.into()))?;
        let sparse = self.ends.carry.holes && crate::tree::sparse::has_holes(&before);
        let size = before.st_size as u64;
        let attrs = match xattrs_of(At::Fd(f.as_fd()), &self.ends.carry.xattrs) {
            Ok(x) => x,
            Err(e) => {
                self.error(path, format!("cannot read: {e}"));
                return Ok(None);
            }
        };
        let new = NewVersion {
            f,
            before,
            size,
            chunk: chunk_size(size),
            sparse,
        };
        Ok(Some((new, attrs)))
    }

    /// The whole exchange of one delta on `ch`, up to the standby's acknowledgement.
    fn send_delta(
        &self,
        ch: &mut Channel,
        path: &RelPath,
        new: &NewVersion,
        attrs: Xattrs,
    ) -> Result<DeltaSent, ProtocolError> {
        let id = self.id();
        send_xattrs(&mut ch.w, attrs)?;
        ch.send(&announcement(id, path, new))?;
        // The standby starts hashing its base now, while we hash the new version.
        ch.flush()?;
        let started = std::time::Instant::now();
        let Coarse {
            mut problem,
            mut digest,
            chunks,
            index,
            prior,
        } = send_coarse_hashes(&mut ch.w, new)?;
        // A watch takes a large file written all the time as it was read (the batch is no
        // consistent point, and the next change sends it again): else it would reach the
        // standby only once its writer paused.
        let as_read = self.ends.carry.watching && new.size >= index::INDEXED && !new.sparse;
        ch.flush()?;
        let encoder = receive_base(&mut ch.r, path, new.chunk)?;
        if encoder.is_none() && new.sparse && problem.is_none() {
            // Literal ops would carry the holes as zeros: it goes as its data.
            problem = Some(Problem {
                reason: "no delta basis for a sparse file".into(),
                retry: true,
            });
        }
        let mut made = None;
        if problem.is_none() {
            let proving = as_read.then_some(chunks.as_slice());
            (problem, made) = self.send_ops(&mut ch.w, new, encoder.as_ref(), proving)?;
        }
        let mut torn = false;
        if problem.is_some() {
            delta::write_abort(ch.w.raw())?;
        } else if changed(
            &new.before,
            &rustix::fs::fstat(&new.f).map_err(io::Error::from)?,
        ) && !index
            .as_ref()
            .is_some_and(|ix| index::steady(&new.f, new.size, ix, prior.as_ref()))
        {
            match made {
                Some(m) => {
                    digest = m;
                    torn = true;
                }
                None => problem = Some(Problem::changed()),
            }
        }
        // Kept even when the file changed while read: the next read proves what it had
        // at this one unchanged (a write made during this read shows then), whatever it
        // proves of this one.
        if let Some(ix) = index {
            index::keep(new.before.st_dev, new.before.st_ino, ix);
        }
        if new.size >= index::INDEXED {
            // What its reads cost: a watch paces the next by it.
            let cost = started.elapsed();
            self.book().summary_mut().hashed.push((path.clone(), cost));
        }
        ch.send(&Message::FileEnd {
            complete: problem.is_none(),
            digest: problem.is_none().then_some(digest),
        })?;
        ch.finish()?;
        let error = read_one_ack(&mut ch.r, id)?;
        Ok(DeltaSent {
            error,
            problem,
            torn,
        })
    }

    /// Writes the op stream of `new` against the base `encoder` was made for (literals
    /// only without one), counting its bytes. A failed read is returned as the problem.
    /// Given the chunk digests of its hashing (`proving`), and against a base, also the
    /// digest of what the ops make ([`DeltaEncoder::encode_proven`]).
    fn send_ops(
        &self,
        w: &mut Writer,
        new: &NewVersion,
        encoder: Option<&DeltaEncoder>,
        proving: Option<&[Hash]>,
    ) -> Result<(Option<Problem>, Option<Hash>), ProtocolError> {
        let stats = match (encoder, proving) {
            (Some(enc), Some(chunks)) => enc
                .encode_proven(&new.f, new.size, chunks, w.raw())
                .map(|(s, made)| (s, Some(made))),
            (Some(enc), None) => enc.encode(&new.f, new.size, w.raw()).map(|s| (s, None)),
            (None, _) => delta::encode_literal(&new.f, new.size, w.raw()).map(|s| (s, None)),
        };
        match stats {
            Ok((stats, made)) => {
                let mut book = self.book();
                let t = book.summary_mut();
                t.bytes_literal += stats.literal;
                t.bytes_matched += stats.matched;
                Ok((None, made))
            }
            // A read failed mid-way (a write failure shows again when the abort is sent).
            Err(delta::DeltaError::Io(e)) => Ok((Some(Problem::of_read(&e)), None)),
            Err(e) => Err(ProtocolError::Invalid(e.to_string())),
        }
    }
}

/// The message announcing the delta of `new` as operation `id`.
fn announcement(id: u64, path: &RelPath, new: &NewVersion) -> Message {
    Message::from(DeltaHead {
        id,
        path: path.clone(),
        meta: meta_of(&new.before),
        size: new.size,
        chunking: Chunking {
            chunk: new.chunk,
            chunks: new.size.div_ceil(new.chunk),
            sparse: new.sparse,
        },
    })
}

/// Sends the coarse hashes of `new`. A file without holes is hashed as it is read, each
/// chunk's hash sent when complete; a sparse one is hashed first, holes skipped, and its
/// hashes sent together. Returns its whole digest, and the problem if a read failed (the
/// hashes are then sent all the same, so the stream stays in step).
fn send_coarse_hashes(w: &mut Writer, new: &NewVersion) -> Result<Coarse, ProtocolError> {
    let (size, chunk) = (new.size, new.chunk);
    if new.sparse {
        let (digests, digest, problem) =
            match delta::hash_chunks(&crate::tree::sparse::Holey(&new.f), size, chunk) {
                Ok((d, h)) => (d, h, None),
                Err(e) => (
                    vec![[0; 32]; size.div_ceil(chunk) as usize],
                    [0; 32],
                    Some(Problem::of_read(&e)),
                ),
            };
        for c in &digests {
            w.write_raw(&c[..COARSE_HASH_LEN])?;
        }
        return Ok(Coarse {
            problem,
            digest,
            chunks: digests,
            index: None,
            prior: None,
        });
    }
    let mut hasher = delta::ChunkedHasher::new(chunk);
    let mut sent = 0;
    let mut send_completed = |hasher: &delta::ChunkedHasher| -> Result<(), ProtocolError> {
        for c in &hasher.completed()[sent..] {
            w.write_raw(&c[..COARSE_HASH_LEN])?;
        }
        sent = hasher.completed().len();
        Ok(())
    };
    let (dev, ino) = (new.before.st_dev, new.before.st_ino);
    let indexed = size >= index::INDEXED && !new.sparse;
    let prior = indexed.then(|| index::take(dev, ino, chunk)).flatten();
    let mut indexer = index::Indexer::new(chunk, prior.as_ref());
    let problem = if indexed {
        // Chunk by chunk: a chunk whose fast checksum is unchanged keeps its digest.
        read_pieces(&new.f, 0, size, chunk, &mut Vec::new(), |piece| {
            indexer.chunk(&mut hasher, piece);
            send_completed(&hasher)
        })?
    } else {
        read_through(&new.f, size, |piece| {
            hasher.update(piece);
            send_completed(&hasher)
        })?
    };
    let (digests, digest) = hasher.finish();
    for c in &digests[sent..] {
        w.write_raw(&c[..COARSE_HASH_LEN])?;
    }
    let index = (indexed && problem.is_none()).then(|| indexer.finish(size, &digests));
    Ok(Coarse {
        problem,
        digest,
        chunks: digests,
        index,
        prior,
    })
}

/// What hashing the new version came to.
struct Coarse {
    /// Its read failed (the hashes were sent all the same).
    problem: Option<Problem>,
    /// Its whole digest.
    digest: Hash,
    /// The digest of each chunk.
    chunks: Vec<Hash>,
    /// Its block index, for a large file read whole, and the one it was hashed against.
    index: Option<index::Chunks>,
    prior: Option<index::Chunks>,
}

/// Reads the standby's answer to the coarse hashes: an encoder against its base, or `None`
/// when it has no base to offer.
fn receive_base(
    r: &mut Reader,
    path: &RelPath,
    chunk: u64,
) -> Result<Option<DeltaEncoder>, ProtocolError> {
    match r.recv()? {
        Message::BaseSig {
            base_size,
            block_size,
            matched_len,
            fine_len,
        } => {
            if !signature_fits(base_size, chunk, matched_len, fine_len) {
                return Err(ProtocolError::Invalid(
                    "base signature sizes do not fit the base".into(),
                ));
            }
            let mut matched = vec![0u8; matched_len as usize];
            r.read_raw(&mut matched)?;
            let mut fine = vec![0u8; fine_len as usize];
            r.read_raw(&mut fine)?;
            let sig = delta::BaseSignature {
                block_size,
                matched,
                fine,
            };
            let encoder = DeltaEncoder::new(base_size, chunk, sig)
                .map_err(|e| ProtocolError::Invalid(e.to_string()))?;
            Ok(Some(encoder))
        }
        Message::NoBase { reason } => {
            tracing::debug!("{path}: no delta basis on the standby ({reason})");
            Ok(None)
        }
        other => Err(ProtocolError::unexpected(&other, "BaseSig")),
    }
}

/// Whether the sizes a base signature announces fit its base, checked before anything is
/// allocated for them: a base no larger than a standby signs, one bit per base chunk, and
/// a fine signature of one entry per block of at least 512 bytes, 256 MiB at most.
fn signature_fits(base_size: u64, chunk: u64, matched_len: u64, fine_len: u64) -> bool {
    let base_chunks = base_size.div_ceil(chunk);
    let max_fine = ((base_size / 512 + 1) * 12).min(256 << 20);
    base_chunks <= delta::MAX_BASE_CHUNKS
        && matched_len == base_chunks.div_ceil(8)
        && fine_len <= max_fine
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_is_bounded_by_the_base_a_standby_signs() {
        let chunk = 256 * 1024;
        let bits = |chunks: u64| chunks.div_ceil(8);
        let most = delta::MAX_BASE_CHUNKS * chunk;
        assert!(signature_fits(most, chunk, bits(delta::MAX_BASE_CHUNKS), 0));
        let over = most + 1;
        assert!(!signature_fits(
            over,
            chunk,
            bits(delta::MAX_BASE_CHUNKS + 1),
            0
        ));
        // The bitmap has one bit per chunk, no more, no fewer.
        assert!(!signature_fits(10 * chunk, chunk, bits(10) + 1, 0));
        assert!(!signature_fits(10 * chunk, chunk, bits(10) - 1, 0));
        // A fine signature of one 12-byte entry per 512 bytes at most.
        let base = 10 * chunk;
        assert!(signature_fits(base, chunk, bits(10), (base / 512 + 1) * 12));
        assert!(!signature_fits(
            base,
            chunk,
            bits(10),
            (base / 512 + 1) * 12 + 1
        ));
    }
}
