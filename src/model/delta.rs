//! Delta transfer of large files, in two levels so that scattered edits cost little.
//!
//! 1. The sender hashes its new file in coarse chunks (blake3 per chunk) and sends those.
//! 2. The receiver hashes its base file in the same chunks; chunks equal at the same offset
//!    need nothing more. Only for the other base chunks does it compute an rsync block
//!    signature (fast_rsync, MD4 + rolling CRC), with a block size chosen for the bytes that
//!    actually differ, and sends that back with a bitmap of matched chunks.
//! 3. The sender emits an op stream: copies for matched chunks, and for the rest the
//!    output of `fast_rsync::diff`, run window by window against the fine signature, with its
//!    copy offsets translated back to base offsets.
//! 4. The receiver applies the ops with bounds checks, reading the base with `pread`, and
//!    accepts the result only if its `ChunkedHasher` digest equals the sender's.
//!
//! Memory stays bounded by the window size and the signatures, never the file size.

use crate::model::manifest::Hash;
use std::io::{self, Read, Write};

/// Bytes of each coarse-chunk hash sent on the wire.
pub(crate) const COARSE_HASH_LEN: usize = 16;
/// Bytes of the MD4 prefix per fine block (plus 4 bytes of rolling CRC).
pub(crate) const FINE_HASH_LEN: u32 = 8;
const FINE_ENTRY: usize = 4 + FINE_HASH_LEN as usize;
/// Most coarse chunks a file is split into; bounds what a peer can make us hold.
pub(crate) const MAX_CHUNKS: u64 = 1 << 16;
/// Most coarse chunks (of the new file's chunk size) a delta base may span. A base far
/// larger than the new file costs more to sign than the file costs to resend: the receiver
/// sends such a file whole rather than sign its base, and the sender refuses, before
/// allocating for it, a [`BaseSignature`] of a larger base.
pub(crate) const MAX_BASE_CHUNKS: u64 = 4 * MAX_CHUNKS;
/// Largest window diffed at once.
pub(crate) const WINDOW: usize = 8 << 20;
const IO_BUF: usize = 1 << 20;

/// The coarse chunk size for a file of `size` bytes: a power of two, at least 256 KiB, and
/// large enough that there are at most [`MAX_CHUNKS`] chunks.
pub(crate) fn chunk_size(size: u64) -> u64 {
    let min = 256 * 1024u64;
    let need = size.div_ceil(MAX_CHUNKS).next_power_of_two();
    min.max(need)
}

/// The fine block size for `unmatched` differing bytes: about half their square root (a
/// power of two), at least 512 and at most 64 KiB or the chunk size.
pub(crate) fn fine_block(unmatched: u64, chunk: u64) -> u32 {
    let root = (unmatched as f64).sqrt() as u64;
    let b = if root < 2 {
        1
    } else {
        1u64 << (63 - root.leading_zeros())
    } / 2;
    b.clamp(512, (64 * 1024).min(chunk)) as u32
}

/// Reads at an offset without moving a cursor (pread), so a base file is never mapped.
pub(crate) trait ReadAt {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;

    /// The first byte at or after `offset` that may be data (`None`: zeros to the end).
    /// Everything is data unless the reader knows its holes ([`Holey`]).
    fn data_from(&self, offset: u64) -> io::Result<Option<u64>> {
        Ok(Some(offset))
    }

    /// Whether [`ReadAt::data_from`] knows holes (then reads stop at chunk boundaries).
    fn knows_holes(&self) -> bool {
        false
    }

    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "file shrank while being read",
                    ));
                }
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl ReadAt for std::fs::File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let start = (offset.min(self.len() as u64)) as usize;
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }
}

/// The content digest used to prove a transferred file: blake3 over the per-chunk blake3
/// digests and the size, so it falls out of the coarse hashing at no extra cost.
#[derive(Clone)]
pub(crate) struct ChunkedHasher {
    chunk: u64,
    in_chunk: u64,
    total: u64,
    current: blake3::Hasher,
    chunks: Vec<Hash>,
    /// The digest of a chunk of zeros of this length, once one was needed.
    zeros: Option<(u64, Hash)>,
}

impl ChunkedHasher {
    pub(crate) fn new(chunk: u64) -> Self {
        ChunkedHasher {
            chunk,
            in_chunk: 0,
            total: 0,
            current: blake3::Hasher::new(),
            chunks: Vec::new(),
            zeros: None,
        }
    }

    pub(crate) fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let room = (self.chunk - self.in_chunk) as usize;
            let take = room.min(data.len());
            self.current.update(&data[..take]);
            self.in_chunk += take as u64;
            self.total += take as u64;
            data = &data[take..];
            if self.in_chunk == self.chunk {
                self.chunks.push(*self.current.finalize().as_bytes());
                self.current.reset();
                self.in_chunk = 0;
            }
        }
    }

    /// Bytes hashed so far.
    pub(crate) fn len(&self) -> u64 {
        self.total
    }

    /// Digests of the chunks completed so far.
    pub(crate) fn completed(&self) -> &[Hash] {
        &self.chunks
    }

    /// Accounts for a whole chunk (of `len` bytes, the chunk size or the file's last part)
    /// whose digest is already known, without its bytes. Returns false, changing nothing,
    /// when not at a chunk boundary.
    pub(crate) fn push_known(&mut self, digest: Hash, len: u64) -> bool {
        if self.in_chunk != 0 || len == 0 || len > self.chunk {
            return false;
        }
        self.chunks.push(digest);
        self.total += len;
        true
    }

    /// Accounts for a whole chunk of `len` zeros (a hole) without reading it: the digest
    /// of a chunk of zeros is computed once. False, changing nothing, off a boundary.
    pub(crate) fn push_zeros(&mut self, len: u64) -> bool {
        let digest = match self.zeros {
            Some((l, d)) if l == len => d,
            _ => {
                if self.in_chunk != 0 || len == 0 || len > self.chunk {
                    return false;
                }
                let mut h = blake3::Hasher::new();
                let block = [0u8; 16 * 1024];
                let mut left = len;
                while left > 0 {
                    let n = left.min(block.len() as u64) as usize;
                    h.update(&block[..n]);
                    left -= n as u64;
                }
                let d = *h.finalize().as_bytes();
                self.zeros = Some((len, d));
                d
            }
        };
        self.push_known(digest, len)
    }

    /// The per-chunk digests and the file digest.
    pub(crate) fn finish(mut self) -> (Vec<Hash>, Hash) {
        if self.in_chunk > 0 {
            self.chunks.push(*self.current.finalize().as_bytes());
            self.in_chunk = 0;
        }
        let mut h = blake3::Hasher::new();
        h.update(b"hotsync chunked digest v1");
        h.update(&self.total.to_le_bytes());
        h.update(&self.chunk.to_le_bytes());
        for c in &self.chunks {
            h.update(c);
        }
        (self.chunks, *h.finalize().as_bytes())
    }
}

/// Reads `size` bytes of `r` from the start, returning the per-chunk digests and the
/// chunked digest (pass 1 on the sender, and the receiver's look at its base).
pub(crate) fn hash_chunks<R: ReadAt + ?Sized>(
    r: &R,
    size: u64,
    chunk: u64,
) -> io::Result<(Vec<Hash>, Hash)> {
    hash_chunks_paced(r, size, chunk, &|_| {})
}

/// [`hash_chunks`], calling `pace` with the bytes of each read (to slow a background
/// verify down to a rate).
pub(crate) fn hash_chunks_paced<R: ReadAt + ?Sized>(
    r: &R,
    size: u64,
    chunk: u64,
    pace: &dyn Fn(usize),
) -> io::Result<(Vec<Hash>, Hash)> {
    let mut h = ChunkedHasher::new(chunk);
    let mut buf = vec![0u8; IO_BUF.min(size as usize).max(1)];
    let mut off = 0u64;
    let holes = r.knows_holes();
    while off < size {
        let mut n = buf.len().min((size - off) as usize);
        if holes {
            let end = (off - off % chunk + chunk).min(size);
            // A chunk that lies in a hole is zeros: neither read nor hashed.
            if off.is_multiple_of(chunk)
                && r.data_from(off)?.is_none_or(|d| d >= end)
                && h.push_zeros(end - off)
            {
                off = end;
                continue;
            }
            n = n.min((end - off) as usize);
        }
        r.read_exact_at(&mut buf[..n], off)?;
        h.update(&buf[..n]);
        off += n as u64;
        pace(n);
    }
    Ok(h.finish())
}

/// The receiver's answer to a coarse-hash list: which base chunks are equal to the new
/// file's chunk at the same index, and a fine signature of every other base chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BaseSignature {
    pub block_size: u32,
    /// One bit per base chunk, LSB first; set when the chunk needs no data.
    pub matched: Vec<u8>,
    /// Concatenated fine signature entries (CRC + MD4 prefix) of the unmatched base chunks, in order.
    pub fine: Vec<u8>,
}

/// Bit `i` of a bitmap, LSB first (as in [`BaseSignature::matched`]).
pub(crate) fn bit(bits: &[u8], i: usize) -> bool {
    bits.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

fn chunk_len(size: u64, chunk: u64, i: u64) -> u64 {
    chunk.min(size - i * chunk)
}

#[cfg(test)]
/// Computes the [`BaseSignature`] of a base file against the sender's coarse hashes.
pub(crate) fn sign_base<R: ReadAt + ?Sized>(
    base: &R,
    base_size: u64,
    chunk: u64,
    new_coarse: &[[u8; COARSE_HASH_LEN]],
) -> io::Result<BaseSignature> {
    let (base_chunks, _) = hash_chunks(base, base_size, chunk)?;
    sign_with(base, base_size, chunk, &base_chunks, new_coarse)
}

/// [`sign_base`] with the base's chunk digests already computed (the receiver hashes its
/// base while the sender is still hashing the new file).
pub(crate) fn sign_with<R: ReadAt + ?Sized>(
    base: &R,
    base_size: u64,
    chunk: u64,
    base_chunks: &[Hash],
    new_coarse: &[[u8; COARSE_HASH_LEN]],
) -> io::Result<BaseSignature> {
    let nbase = base_size.div_ceil(chunk);
    if base_chunks.len() as u64 != nbase {
        return Err(io::Error::other("base chunk digests do not match its size"));
    }
    let mut matched = vec![0u8; (nbase as usize).div_ceil(8)];
    let mut unmatched = 0u64;
    for i in 0..nbase {
        let same = new_coarse
            .get(i as usize)
            .is_some_and(|h| h[..] == base_chunks[i as usize][..COARSE_HASH_LEN]);
        if same {
            matched[i as usize / 8] |= 1 << (i % 8);
        } else {
            unmatched += chunk_len(base_size, chunk, i);
        }
    }
    let block_size = fine_block(unmatched, chunk);
    let opts = fast_rsync::SignatureOptions {
        block_size,
        crypto_hash_size: FINE_HASH_LEN,
    };
    let mut fine = Vec::with_capacity((unmatched / block_size as u64 + 1) as usize * FINE_ENTRY);
    let mut buf = vec![0u8; chunk.min(base_size) as usize];
    for i in 0..nbase {
        if bit(&matched, i as usize) {
            continue;
        }
        let len = chunk_len(base_size, chunk, i) as usize;
        base.read_exact_at(&mut buf[..len], i * chunk)?;
        let sig = fast_rsync::Signature::calculate(&buf[..len], opts);
        fine.extend_from_slice(&sig.serialized()[12..]);
    }
    Ok(BaseSignature {
        block_size,
        matched,
        fine,
    })
}

/// Why a delta could not be built or applied.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DeltaError {
    #[error("malformed delta: {0}")]
    Malformed(&'static str),
    /// The sender gave the file up mid-stream (it changed while being read).
    #[error("the sender abandoned the file")]
    Aborted,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Totals of one encoded delta.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DeltaStats {
    pub literal: u64,
    pub matched: u64,
}

const OP_END: u8 = 0;
const OP_LITERAL: u8 = 1;
const OP_COPY: u8 = 2;
const OP_ABORT: u8 = 3;

/// Ends an op stream early: the file is abandoned (see [`DeltaError::Aborted`]).
pub(crate) fn write_abort(out: &mut impl Write) -> io::Result<()> {
    out.write_all(&[OP_ABORT])
}

/// An op stream of literals only: the whole file, for a receiver without a usable base.
pub(crate) fn encode_literal<R: ReadAt + ?Sized>(
    f: &R,
    size: u64,
    out: &mut impl Write,
) -> Result<DeltaStats, DeltaError> {
    let mut buf = vec![0u8; IO_BUF.min(size as usize).max(1)];
    let mut off = 0;
    while off < size {
        let n = buf.len().min((size - off) as usize);
        f.read_exact_at(&mut buf[..n], off)?;
        out.write_all(&[OP_LITERAL])?;
        write_varint(out, n as u64)?;
        out.write_all(&buf[..n])?;
        off += n as u64;
    }
    out.write_all(&[OP_END])?;
    Ok(DeltaStats {
        literal: size,
        matched: 0,
    })
}

/// Where an applied delta goes. `copy_range` may copy `len` bytes of the base at `offset`
/// by itself (in the kernel, say) and return true; the default declines.
pub(crate) trait DeltaSink: Write {
    fn copy_range(&mut self, _offset: u64, _len: u64) -> io::Result<bool> {
        Ok(false)
    }

    /// Whether the output already holds the base at the same offsets (a clone of it, or
    /// the base itself, patched): then what a delta copies from where it stands is
    /// [`DeltaSink::skip`]ped, never written again.
    fn holds_base(&self) -> bool {
        false
    }

    /// Moves on `len` bytes, which the output already holds. Only asked of a sink that
    /// [`DeltaSink::holds_base`].
    fn skip(&mut self, _len: u64) -> io::Result<()> {
        Err(io::Error::other("this output does not hold the base"))
    }
}

impl DeltaSink for Vec<u8> {}
impl DeltaSink for io::Sink {}

fn write_varint(out: &mut impl Write, mut v: u64) -> io::Result<()> {
    let mut buf = [0u8; 10];
    let mut n = 0;
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            buf[n] = b;
            n += 1;
            break;
        }
        buf[n] = b | 0x80;
        n += 1;
    }
    out.write_all(&buf[..n])
}

fn read_varint(r: &mut impl Read) -> Result<u64, DeltaError> {
    let mut v = 0u64;
    for i in 0..10 {
        let mut b = [0u8];
        r.read_exact(&mut b)?;
        let part = (b[0] & 0x7f) as u64;
        if i == 9 && part > 1 {
            return Err(DeltaError::Malformed("varint overflows 64 bits"));
        }
        v |= part << (7 * i);
        if b[0] & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(DeltaError::Malformed("varint too long"))
}

/// Builds op streams on the sender from a [`BaseSignature`].
pub(crate) struct DeltaEncoder {
    base_size: u64,
    chunk: u64,
    matched: Vec<u8>,
    block_size: u32,
    signature: fast_rsync::Signature,
    /// Base offset of each fine block, in signature order.
    block_offsets: Vec<u64>,
}

impl DeltaEncoder {
    /// Checks the receiver's signature against the base size it announced.
    pub(crate) fn new(base_size: u64, chunk: u64, sig: BaseSignature) -> Result<Self, DeltaError> {
        let nbase = base_size.div_ceil(chunk);
        if sig.matched.len() != (nbase as usize).div_ceil(8) {
            return Err(DeltaError::Malformed("matched bitmap has the wrong length"));
        }
        if sig.block_size < 256
            || !sig.block_size.is_power_of_two()
            || sig.block_size as u64 > chunk
        {
            return Err(DeltaError::Malformed("bad block size"));
        }
        let b = sig.block_size as u64;
        let mut block_offsets = Vec::new();
        for i in 0..nbase {
            if bit(&sig.matched, i as usize) {
                continue;
            }
            let len = chunk_len(base_size, chunk, i);
            let mut off = i * chunk;
            while off < i * chunk + len {
                block_offsets.push(off);
                off += b;
            }
        }
        if sig.fine.len() != block_offsets.len() * FINE_ENTRY {
            return Err(DeltaError::Malformed("fine signature has the wrong length"));
        }
        let mut serialized = Vec::with_capacity(12 + sig.fine.len());
        serialized.extend_from_slice(&0x72730136u32.to_be_bytes());
        serialized.extend_from_slice(&sig.block_size.to_be_bytes());
        serialized.extend_from_slice(&FINE_HASH_LEN.to_be_bytes());
        serialized.extend_from_slice(&sig.fine);
        let signature = fast_rsync::Signature::deserialize(serialized)
            .map_err(|_| DeltaError::Malformed("fine signature does not parse"))?;
        Ok(DeltaEncoder {
            base_size,
            chunk,
            matched: sig.matched,
            block_size: sig.block_size,
            signature,
            block_offsets,
        })
    }

    /// Writes the op stream turning the base into `new` (of `new_size` bytes), ending with
    /// the end op. Only chunks that differ from the base are read.
    pub(crate) fn encode<R: ReadAt + ?Sized>(
        &self,
        new: &R,
        new_size: u64,
        out: &mut impl Write,
    ) -> Result<DeltaStats, DeltaError> {
        self.encode_with(new, new_size, None, out).map(|(s, _)| s)
    }

    /// [`DeltaEncoder::encode`], and the digest ([`ChunkedHasher`]) of what the ops make:
    /// each chunk the base has as `chunks` (the chunk digests of an earlier read of `new`)
    /// say, the others as they were read now. It is what the receiver finds when `new`
    /// changed since that earlier read, so that such a version can still be proven whole.
    pub(crate) fn encode_proven<R: ReadAt + ?Sized>(
        &self,
        new: &R,
        new_size: u64,
        chunks: &[Hash],
        out: &mut impl Write,
    ) -> Result<(DeltaStats, Hash), DeltaError> {
        if chunks.len() as u64 != new_size.div_ceil(self.chunk) {
            return Err(DeltaError::Malformed("chunk digests do not match the size"));
        }
        let (stats, made) = self.encode_with(new, new_size, Some(chunks), out)?;
        let made = made.ok_or(DeltaError::Malformed("no digest of what was made"))?;
        Ok((stats, made))
    }

    fn encode_with<R: ReadAt + ?Sized>(
        &self,
        new: &R,
        new_size: u64,
        chunks: Option<&[Hash]>,
        out: &mut impl Write,
    ) -> Result<(DeltaStats, Option<Hash>), DeltaError> {
        let mut made = chunks.map(|_| ChunkedHasher::new(self.chunk));
        let index = self.signature.index();
        let mut stats = DeltaStats::default();
        let mut pending: Option<(u64, u64)> = None; // merged copy (offset, len)
        let nnew = new_size.div_ceil(self.chunk);
        let nbase = self.base_size.div_ceil(self.chunk);
        let mut i = 0u64;
        let mut window = Vec::new();
        let mut raw = Vec::new();
        while i < nnew {
            let same = i < nbase
                && bit(&self.matched, i as usize)
                && chunk_len(new_size, self.chunk, i) == chunk_len(self.base_size, self.chunk, i);
            if same {
                let len = chunk_len(new_size, self.chunk, i);
                copy(&mut pending, i * self.chunk, len, out, &mut stats)?;
                if let (Some(h), Some(c)) = (made.as_mut(), chunks) {
                    h.push_known(c[i as usize], len);
                }
                i += 1;
                continue;
            }
            // A run of differing chunks, diffed in windows.
            let start = i * self.chunk;
            while i < nnew
                && !(i < nbase
                    && bit(&self.matched, i as usize)
                    && chunk_len(new_size, self.chunk, i)
                        == chunk_len(self.base_size, self.chunk, i))
            {
                i += 1;
            }
            let end = (i * self.chunk).min(new_size);
            let mut off = start;
            while off < end {
                let n = WINDOW.min((end - off) as usize);
                window.resize(n, 0);
                new.read_exact_at(&mut window, off)?;
                if let Some(h) = made.as_mut() {
                    h.update(&window);
                }
                raw.clear();
                fast_rsync::diff(&index, &window, &mut raw)
                    .map_err(|_| DeltaError::Malformed("diff failed"))?;
                self.translate(&raw, &window, &mut pending, out, &mut stats)?;
                off += n as u64;
            }
        }
        if let Some((o, l)) = pending.take() {
            write_copy(out, o, l)?;
        }
        out.write_all(&[OP_END])?;
        Ok((stats, made.map(|h| h.finish().1)))
    }

    /// Re-expresses a fast_rsync delta (whose copy offsets index the fine signature) as ops
    /// with base offsets.
    fn translate(
        &self,
        raw: &[u8],
        window: &[u8],
        pending: &mut Option<(u64, u64)>,
        out: &mut impl Write,
        stats: &mut DeltaStats,
    ) -> Result<(), DeltaError> {
        let bad = || DeltaError::Malformed("unexpected fast_rsync output");
        let mut r = raw.get(4..).ok_or_else(bad)?;
        let mut emitted = 0usize; // bytes of `window` produced so far
        let take = |r: &mut &[u8], n: usize| -> Result<u64, DeltaError> {
            if r.len() < n {
                return Err(bad());
            }
            let mut v = 0u64;
            for &b in &r[..n] {
                v = (v << 8) | b as u64;
            }
            *r = &r[n..];
            Ok(v)
        };
        loop {
            let op = take(&mut r, 1)? as u8;
            match op {
                0 => break,
                1..=0x44 => {
                    let len = if op <= 0x40 {
                        op as usize
                    } else {
                        take(&mut r, 1 << (op - 0x41))? as usize
                    };
                    if r.len() < len || emitted + len > window.len() {
                        return Err(bad());
                    }
                    if let Some((o, l)) = pending.take() {
                        write_copy(out, o, l)?;
                    }
                    out.write_all(&[OP_LITERAL])?;
                    write_varint(out, len as u64)?;
                    out.write_all(&r[..len])?;
                    stats.literal += len as u64;
                    r = &r[len..];
                    emitted += len;
                }
                0x45..=0x54 => {
                    let class = op - 0x45;
                    let offset = take(&mut r, 1 << (class / 4))?;
                    let len = take(&mut r, 1 << (class % 4))?;
                    let b = self.block_size as u64;
                    if offset % b != 0 || len % b != 0 {
                        return Err(bad());
                    }
                    let first = (offset / b) as usize;
                    let count = (len / b) as usize;
                    for k in first..first + count {
                        let base_off = *self.block_offsets.get(k).ok_or_else(bad)?;
                        copy(pending, base_off, b, out, stats)?;
                    }
                    emitted += len as usize;
                }
                _ => return Err(bad()),
            }
        }
        if emitted != window.len() {
            return Err(bad());
        }
        Ok(())
    }
}

fn write_copy(out: &mut impl Write, offset: u64, len: u64) -> io::Result<()> {
    out.write_all(&[OP_COPY])?;
    write_varint(out, offset)?;
    write_varint(out, len)
}

fn copy(
    pending: &mut Option<(u64, u64)>,
    offset: u64,
    len: u64,
    out: &mut impl Write,
    stats: &mut DeltaStats,
) -> io::Result<()> {
    stats.matched += len;
    match pending {
        Some((o, l)) if *o + *l == offset => *l += len,
        _ => {
            if let Some((o, l)) = pending.take() {
                write_copy(out, o, l)?;
            }
            *pending = Some((offset, len));
        }
    }
    Ok(())
}

/// Applies an op stream read from `ops` to `base` (of `base_size` bytes), writing exactly
/// `size` bytes to `out`. Every offset and length is checked before use: a copy must lie
/// inside the base, and the output may not exceed `size`. Returns the output's chunked
/// digest and the bytes that came as literals.
///
/// `known[i]`, when set, is the digest of base chunk `i` as the sender's chunk `i` too: a
/// copy of that whole chunk to the same offset is then left to `out.copy_range` and not
/// hashed again.
pub(crate) fn apply<R: ReadAt + ?Sized>(
    ops: &mut impl Read,
    base: &R,
    base_size: u64,
    out: &mut impl DeltaSink,
    size: u64,
    known: &[Option<Hash>],
) -> Result<Applied, DeltaError> {
    let chunk = chunk_size(size);
    let mut hasher = ChunkedHasher::new(chunk);
    let mut buf = vec![0u8; IO_BUF];
    loop {
        let mut op = [0u8];
        ops.read_exact(&mut op)?;
        match op[0] {
            OP_END => break,
            OP_LITERAL => {
                let len = read_varint(ops)?;
                if len > size - hasher.len() {
                    return Err(DeltaError::Malformed("literal runs past the file size"));
                }
                let mut left = len;
                while left > 0 {
                    let n = (left as usize).min(buf.len());
                    ops.read_exact(&mut buf[..n])?;
                    hasher.update(&buf[..n]);
                    out.write_all(&buf[..n])?;
                    left -= n as u64;
                }
            }
            OP_COPY => {
                let offset = read_varint(ops)?;
                let len = read_varint(ops)?;
                if offset.checked_add(len).is_none_or(|end| end > base_size) {
                    return Err(DeltaError::Malformed("copy reaches outside the base file"));
                }
                if len > size - hasher.len() {
                    return Err(DeltaError::Malformed("copy runs past the file size"));
                }
                let mut done = 0u64;
                while done < len {
                    let pos = hasher.len();
                    let in_place = offset + done == pos;
                    if pos.is_multiple_of(chunk) && in_place {
                        let clen = chunk.min(size - pos);
                        if let Some(Some(d)) = known.get((pos / chunk) as usize)
                            && len - done >= clen
                        {
                            let copied = if out.holds_base() {
                                out.skip(clen)?;
                                true
                            } else {
                                out.copy_range(pos, clen)?
                            };
                            if copied {
                                hasher.push_known(*d, clen);
                                done += clen;
                                continue;
                            }
                        }
                    }
                    // Up to the next chunk boundary, so whole known chunks are seen there.
                    let to_boundary = chunk - pos % chunk;
                    let n = ((len - done).min(to_boundary) as usize).min(buf.len());
                    base.read_exact_at(&mut buf[..n], offset + done)?;
                    hasher.update(&buf[..n]);
                    if in_place && out.holds_base() {
                        out.skip(n as u64)?;
                    } else {
                        out.write_all(&buf[..n])?;
                    }
                    done += n as u64;
                }
            }
            OP_ABORT => return Err(DeltaError::Aborted),
            _ => return Err(DeltaError::Malformed("unknown op")),
        }
    }
    if hasher.len() != size {
        return Err(DeltaError::Malformed("delta ends before the file size"));
    }
    let (chunks, digest) = hasher.finish();
    Ok(Applied { digest, chunks })
}

/// What applying a delta made.
#[derive(Debug)]
pub(crate) struct Applied {
    /// The new version's digest ([`ChunkedHasher`]).
    pub(crate) digest: Hash,
    /// The new version's chunk digests.
    pub(crate) chunks: Vec<Hash>,
}

#[cfg(test)]
/// Truncates per-chunk digests to the form sent on the wire.
pub(crate) fn coarse_wire(chunks: &[Hash]) -> Vec<[u8; COARSE_HASH_LEN]> {
    chunks
        .iter()
        .map(|h| {
            let mut c = [0u8; COARSE_HASH_LEN];
            c.copy_from_slice(&h[..COARSE_HASH_LEN]);
            c
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// The whole exchange in memory; returns the bytes of ops and the stats.
    fn round_trip(base: &[u8], new: &[u8]) -> (usize, DeltaStats) {
        let chunk = chunk_size(new.len() as u64);
        let (chunks, digest) = hash_chunks(new, new.len() as u64, chunk).unwrap();
        let sig = sign_base(base, base.len() as u64, chunk, &coarse_wire(&chunks)).unwrap();
        let enc = DeltaEncoder::new(base.len() as u64, chunk, sig).unwrap();
        let mut ops = Vec::new();
        let stats = enc.encode(new, new.len() as u64, &mut ops).unwrap();
        let mut out = Vec::new();
        let Applied { digest: got, .. } = apply(
            &mut &ops[..],
            base,
            base.len() as u64,
            &mut out,
            new.len() as u64,
            &[],
        )
        .unwrap();
        assert_eq!(out, new);
        assert_eq!(got, digest);
        assert_eq!(stats.literal + stats.matched, new.len() as u64);
        (ops.len(), stats)
    }

    #[test]
    fn scattered_edits_send_little() {
        let base = pseudo_random(8 << 20, 1);
        let mut new = base.clone();
        for k in 0..20 {
            let at = (k * 397_127) % (new.len() - 4096);
            new[at..at + 4096].copy_from_slice(&pseudo_random(4096, k as u64 + 100));
        }
        new.extend_from_slice(&pseudo_random(100_000, 7));
        let (ops, stats) = round_trip(&base, &new);
        assert!(stats.literal < 20 * 8192 + 100_000 + 8192, "{stats:?}");
        assert!(ops < 400_000, "{ops}");
    }

    #[test]
    fn shifted_data_still_matches() {
        let base = pseudo_random(3 << 20, 2);
        let mut new = b"inserted at the front".to_vec();
        new.extend_from_slice(&base);
        let (_, stats) = round_trip(&base, &new);
        assert!(stats.literal < 64 * 1024, "{stats:?}");
    }

    #[test]
    fn a_literal_only_stream_rebuilds_the_file_without_a_base() {
        for new in [pseudo_random(IO_BUF * 2 + 17, 9), Vec::new()] {
            let mut ops = Vec::new();
            let stats = encode_literal(&new[..], new.len() as u64, &mut ops).unwrap();
            assert_eq!((stats.literal, stats.matched), (new.len() as u64, 0));
            let mut out = Vec::new();
            let Applied { digest, .. } =
                apply(&mut &ops[..], &[][..], 0, &mut out, new.len() as u64, &[]).unwrap();
            assert_eq!(out, new);
            assert_eq!(
                digest,
                hash_chunks(&new[..], new.len() as u64, chunk_size(new.len() as u64))
                    .unwrap()
                    .1
            );
        }
    }

    #[test]
    fn shrink_grow_empty() {
        let base = pseudo_random(1 << 20, 3);
        round_trip(&base, &base[..700_000]);
        round_trip(&base[..10], &base);
        round_trip(&[], &base);
        round_trip(&base, &[]);
    }

    #[test]
    fn hostile_ops_are_rejected() {
        let base = vec![1u8; 1000];
        let cases: Vec<(Vec<u8>, u64)> = vec![
            (vec![OP_COPY, 0xe8, 0x07, 0x01, OP_END], 1), // offset 1000 + 1 > base
            (vec![OP_COPY, 0x00, 0xff, 0xff, 0x03], 100_000), // len past base
            (vec![OP_LITERAL, 0xff, 0xff, 0xff, 0xff, 0x0f], 10), // literal past size
            (
                vec![
                    OP_COPY, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 1,
                ],
                1,
            ), // overflow
            (vec![OP_COPY, 0x00, 0x05, OP_END], 10),      // ends short
            (vec![9], 1),                                 // unknown op
            (vec![OP_LITERAL, 5, 1, 2], 5),               // truncated
        ];
        for (ops, size) in cases {
            let mut out = Vec::new();
            assert!(
                apply(&mut &ops[..], &base[..], 1000, &mut out, size, &[]).is_err(),
                "{ops:?}"
            );
            assert!(out.len() as u64 <= size);
        }
    }

    #[test]
    fn encoder_rejects_bad_signatures() {
        let sig = BaseSignature {
            block_size: 1024,
            matched: vec![0],
            fine: vec![0; 5],
        };
        assert!(DeltaEncoder::new(1000, 262_144, sig).is_err());
        let sig = BaseSignature {
            block_size: 1000,
            matched: vec![0],
            fine: vec![],
        };
        assert!(DeltaEncoder::new(1000, 262_144, sig).is_err());
        let sig = BaseSignature {
            block_size: 1024,
            matched: vec![],
            fine: vec![],
        };
        assert!(DeltaEncoder::new(1000, 262_144, sig).is_err());
    }

    /// A sink that copies ranges itself, as the receiver does with copy_file_range.
    struct CopyingSink<'a> {
        base: &'a [u8],
        out: Vec<u8>,
        copied: u64,
    }
    impl Write for CopyingSink<'_> {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.out.write(b)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl DeltaSink for CopyingSink<'_> {
        fn copy_range(&mut self, offset: u64, len: u64) -> io::Result<bool> {
            self.out
                .extend_from_slice(&self.base[offset as usize..(offset + len) as usize]);
            self.copied += len;
            Ok(true)
        }
    }

    /// A sink that already holds the base (a clone, or the base patched in place): it is
    /// written only where the new version differs.
    struct PatchingSink {
        out: Vec<u8>,
        pos: usize,
        written: usize,
    }
    impl Write for PatchingSink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let end = self.pos + b.len();
            if self.out.len() < end {
                self.out.resize(end, 0);
            }
            self.out[self.pos..end].copy_from_slice(b);
            self.pos = end;
            self.written += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl DeltaSink for PatchingSink {
        fn holds_base(&self) -> bool {
            true
        }
        fn skip(&mut self, len: u64) -> io::Result<()> {
            self.pos += len as usize;
            Ok(())
        }
    }

    /// The encoder of `new` against `base` once the receiver signed it, with the digests
    /// of the base chunks the new version matches, and the new version's chunk digests
    /// and digest.
    fn signed(base: &[u8], new: &[u8]) -> (DeltaEncoder, Vec<Option<Hash>>, Vec<Hash>, Hash) {
        let chunk = chunk_size(new.len() as u64);
        let (chunks, digest) = hash_chunks(new, new.len() as u64, chunk).unwrap();
        let (base_chunks, _) = hash_chunks(base, base.len() as u64, chunk).unwrap();
        let sig = sign_with(
            base,
            base.len() as u64,
            chunk,
            &base_chunks,
            &coarse_wire(&chunks),
        )
        .unwrap();
        let known: Vec<Option<Hash>> = base_chunks
            .iter()
            .enumerate()
            .map(|(i, d)| bit(&sig.matched, i).then_some(*d))
            .collect();
        let enc = DeltaEncoder::new(base.len() as u64, chunk, sig).unwrap();
        (enc, known, chunks, digest)
    }

    /// The ops turning `base` into `new` as the receiver gets them, with the digests of
    /// the base chunks the new version matches, and the new version's digest.
    fn exchange(base: &[u8], new: &[u8]) -> (Vec<u8>, Vec<Option<Hash>>, Hash) {
        let (enc, known, _, digest) = signed(base, new);
        let mut ops = Vec::new();
        enc.encode(new, new.len() as u64, &mut ops).unwrap();
        (ops, known, digest)
    }

    /// A file that changed again between its hashing and its diff: what the ops make is
    /// proven by the digest of what was sent (the base where a chunk matched at hashing,
    /// the second read elsewhere), and the receiver's digest is that one.
    #[test]
    fn a_version_read_twice_is_proven_by_what_was_sent() {
        let base = pseudo_random(5 << 20, 21);
        let mut first = base.clone();
        first[1_000_000..1_004_096].copy_from_slice(&pseudo_random(4096, 22));
        let (enc, known, chunks, first_digest) = signed(&base, &first);
        // Written again after the hashing: in the chunk that differed, and in one that did
        // not (which the ops leave as the base has it).
        let mut second = first.clone();
        second[1_010_000..1_010_100].fill(0x33);
        second[4_000_000..4_000_100].fill(0x44);
        let mut ops = Vec::new();
        let (_, made) = enc
            .encode_proven(&second[..], second.len() as u64, &chunks, &mut ops)
            .unwrap();
        assert_ne!(made, first_digest, "not the version hashed first");
        let mut out = Vec::new();
        let got = apply(
            &mut &ops[..],
            &base[..],
            base.len() as u64,
            &mut out,
            first.len() as u64,
            &known,
        )
        .unwrap();
        assert_eq!(got.digest, made, "the receiver finds what was sent");
        let mut want = second.clone();
        want[4_000_000..4_000_100].copy_from_slice(&base[4_000_000..4_000_100]);
        assert!(out == want);
        assert!(
            enc.encode_proven(
                &second[..],
                second.len() as u64,
                &chunks[1..],
                &mut Vec::new()
            )
            .is_err(),
            "digests of another size"
        );
    }

    /// Edited in place and appended to: an output that holds the base is written only
    /// where the file changed, and comes out as the new version.
    #[test]
    fn an_output_holding_the_base_is_written_only_where_the_file_changed() {
        let base = pseudo_random(5 << 20, 12);
        let mut new = base.clone();
        new[3_000_000..3_004_096].copy_from_slice(&pseudo_random(4096, 13));
        new.extend_from_slice(&pseudo_random(4096, 14));
        let (ops, known, digest) = exchange(&base, &new);
        let mut sink = PatchingSink {
            out: base.clone(),
            pos: 0,
            written: 0,
        };
        let size = new.len() as u64;
        let Applied { digest: got, .. } = apply(
            &mut &ops[..],
            &base[..],
            base.len() as u64,
            &mut sink,
            size,
            &known,
        )
        .unwrap();
        assert_eq!(got, digest);
        assert!(sink.out == new, "the patched output is the new version");
        assert!(
            sink.written <= 4096 + 4096 + 2 * 8192,
            "{} bytes written for 8 KiB changed",
            sink.written
        );
        // Data shifted by an insertion at the front is written where it now lies.
        let mut shifted = b"front".to_vec();
        shifted.extend_from_slice(&base[..1 << 20]);
        let (ops, known, digest) = exchange(&base[..1 << 20], &shifted);
        let mut sink = PatchingSink {
            out: base[..1 << 20].to_vec(),
            pos: 0,
            written: 0,
        };
        let size = shifted.len() as u64;
        let Applied { digest: got, .. } = apply(
            &mut &ops[..],
            &base[..1 << 20],
            1 << 20,
            &mut sink,
            size,
            &known,
        )
        .unwrap();
        assert_eq!(got, digest);
        assert!(sink.out == shifted);
    }

    #[test]
    fn known_chunks_are_copied_by_the_sink_and_not_rehashed() {
        let base = pseudo_random(5 << 20, 11);
        let mut new = base.clone();
        new[3_000_000] ^= 1;
        new.extend_from_slice(b"tail");
        let chunk = chunk_size(new.len() as u64);
        let (ops, known, digest) = exchange(&base, &new);
        let mut sink = CopyingSink {
            base: &base,
            out: Vec::new(),
            copied: 0,
        };
        let Applied { digest: got, .. } = apply(
            &mut &ops[..],
            &base[..],
            base.len() as u64,
            &mut sink,
            new.len() as u64,
            &known,
        )
        .unwrap();
        assert_eq!(sink.out, new);
        assert_eq!(got, digest, "known digests give the same file digest");
        assert!(
            sink.copied >= (5 << 20) - 2 * chunk,
            "unchanged chunks went through the sink: {}",
            sink.copied
        );
    }

    #[test]
    fn an_aborted_stream_is_not_an_error_of_the_peer() {
        let mut ops = vec![OP_LITERAL, 3, 1, 2, 3];
        write_abort(&mut ops).unwrap();
        let mut out = Vec::new();
        let e = apply(&mut &ops[..], &[][..], 0, &mut out, 10, &[]).unwrap_err();
        assert!(matches!(e, DeltaError::Aborted), "{e}");
    }

    #[test]
    fn parameters() {
        assert_eq!(chunk_size(0), 256 * 1024);
        assert_eq!(chunk_size(1 << 30), 256 * 1024);
        assert_eq!(chunk_size(1 << 40), 16 << 20);
        assert!(fine_block(1 << 30, 256 * 1024) >= 8192);
        assert_eq!(fine_block(10, 256 * 1024), 512);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn any_edit_round_trips(
            len in 0usize..600_000,
            seed in any::<u64>(),
            edits in prop::collection::vec((0usize..600_000, 0usize..5000, any::<u8>()), 0..6),
            cut in 0usize..600_000,
            append in 0usize..5000,
        ) {
            let base = pseudo_random(len, seed);
            let mut new = base.clone();
            for (at, n, v) in edits {
                if new.is_empty() { break; }
                let at = at % new.len();
                let end = (at + n).min(new.len());
                for b in &mut new[at..end] { *b = v; }
            }
            new.truncate(cut.max(new.len() / 2));
            new.extend(pseudo_random(append, seed ^ 1));
            round_trip(&base, &new);
        }
    }
}
