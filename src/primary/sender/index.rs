//! The primary's block index of its large files: per chunk, a fast checksum (xxh3) and
//! the chunk's digest (blake3), as of the last time the file was sent. Sending the file
//! again costs one pass of the fast checksum; only the chunks whose checksum changed (an
//! edit in place, the end that grew) are hashed with blake3 again (DESIGN §10).
//!
//! Kept in memory for the life of the process, for the files most recently sent: a cache,
//! which the first send after a start fills.

use crate::model::delta::ChunkedHasher;
use crate::model::manifest::Hash;
use std::collections::HashMap;
use std::sync::Mutex;

/// Files at least this large are indexed.
pub(super) const INDEXED: u64 = 16 << 20;
/// Most files indexed at once (a 4 GiB file's index is about 640 KiB).
const MOST: usize = 64;

/// What the last send of a file found, chunk by chunk.
#[derive(Debug, Clone, Default)]
pub(super) struct Chunks {
    /// The size of the file as read.
    size: u64,
    chunk: u64,
    fast: Vec<u64>,
    digests: Vec<Hash>,
}

static INDEXES: Mutex<Option<HashMap<(u64, u64), Chunks>>> = Mutex::new(None);

/// The index of the file that is inode `ino` of device `dev`, if one was made with chunks
/// of `chunk` bytes.
pub(super) fn take(dev: u64, ino: u64, chunk: u64) -> Option<Chunks> {
    let mut all = INDEXES.lock().unwrap();
    let c = all.get_or_insert_with(HashMap::new).remove(&(dev, ino))?;
    (c.chunk == chunk).then_some(c)
}

/// Keeps `chunks` as the index of inode `ino` of device `dev`.
pub(super) fn keep(dev: u64, ino: u64, chunks: Chunks) {
    let mut all = INDEXES.lock().unwrap();
    let all = all.get_or_insert_with(HashMap::new);
    if all.len() >= MOST {
        all.clear();
    }
    all.insert((dev, ino), chunks);
}

/// Hashes a file chunk by chunk into `hasher`, reusing the digest of every chunk whose
/// fast checksum is the one `prior` recorded for it; returns the new index.
pub(super) struct Indexer<'a> {
    prior: Option<&'a Chunks>,
    now: Chunks,
}

impl<'a> Indexer<'a> {
    pub(super) fn new(chunk: u64, prior: Option<&'a Chunks>) -> Indexer<'a> {
        Indexer {
            prior,
            now: Chunks {
                chunk,
                ..Chunks::default()
            },
        }
    }

    /// Chunk `i` (all of it: the chunk size, or the file's last part) is `bytes`.
    pub(super) fn chunk(&mut self, hasher: &mut ChunkedHasher, bytes: &[u8]) {
        let i = self.now.fast.len();
        let fast = xxhash_rust::xxh3::xxh3_64(bytes);
        // Equal checksums mean equal bytes (xxh3 folds the length in too), but for a
        // chance of 2^-64 per chunk.
        let same = self
            .prior
            .and_then(|p| (p.fast.get(i) == Some(&fast)).then(|| p.digests.get(i).copied()))
            .flatten();
        match same {
            Some(d) if hasher.push_known(d, bytes.len() as u64) => {}
            _ => hasher.update(bytes),
        }
        self.now.fast.push(fast);
    }

    /// The index of a file of `size` bytes, once every chunk went through `chunk` and
    /// `digests` are the hasher's.
    pub(super) fn finish(mut self, size: u64, digests: &[Hash]) -> Chunks {
        self.now.size = size;
        self.now.digests = digests.to_vec();
        self.now
    }
}

/// Whether the first `size` bytes of `f`, read as `read` says (its index of this send),
/// are a state the file had, though it changed while read (DESIGN §10):
///
/// - it is read again, checksum by checksum, and nothing changed since the first read:
///   each chunk was the same at both reads, so the bytes are those of the moment between;
/// - and either its size is still `size` (edited in place: that moment's file), or it grew
///   and everything it had at its previous send (`prior`) is unchanged: a file that only
///   grows, sent as it was when `size` bytes long.
///
/// A read that fails is no proof.
pub(super) fn steady(f: &std::fs::File, size: u64, read: &Chunks, prior: Option<&Chunks>) -> bool {
    use crate::model::delta::ReadAt;
    let chunk = read.chunk;
    let mut buf = vec![0u8; chunk.min(size).max(1) as usize];
    for (i, fast) in read.fast.iter().enumerate() {
        let off = i as u64 * chunk;
        let n = chunk.min(size - off) as usize;
        if f.read_exact_at(&mut buf[..n], off).is_err()
            || xxhash_rust::xxh3::xxh3_64(&buf[..n]) != *fast
        {
            tracing::debug!("changed while read: chunk {i} differs when read again");
            return false;
        }
    }
    let Ok(now) = rustix::fs::fstat(f) else {
        return false;
    };
    let now = now.st_size as u64;
    if now == size {
        return true;
    }
    let Some(prior) = prior.filter(|p| now > size && p.chunk == chunk && p.size <= size) else {
        tracing::debug!(
            "changed while read: {size} bytes then {now} now, and nothing (of {:?}) to prove \
             its start by",
            prior.map(|p| (p.size, p.chunk))
        );
        return false;
    };
    // Every whole chunk it had, unchanged; and its last, partial one, read again.
    let whole = (prior.size / chunk) as usize;
    if read.fast.get(..whole) != prior.fast.get(..whole) {
        tracing::debug!("changed while read: what it had at its last read changed");
        return false;
    }
    let tail = prior.size % chunk;
    tail == 0 || {
        let off = whole as u64 * chunk;
        f.read_exact_at(&mut buf[..tail as usize], off).is_ok()
            && prior.fast.get(whole) == Some(&xxhash_rust::xxh3::xxh3_64(&buf[..tail as usize]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(data: &[u8], chunk: u64, prior: Option<&Chunks>) -> (Chunks, Hash) {
        let mut h = ChunkedHasher::new(chunk);
        let mut ix = Indexer::new(chunk, prior);
        for c in data.chunks(chunk as usize) {
            ix.chunk(&mut h, c);
        }
        let (digests, digest) = h.finish();
        (ix.finish(data.len() as u64, &digests), digest)
    }

    /// A file changed while read counts as read when a second read finds every chunk as
    /// the first did and it kept its size, or it grew and kept what it had before.
    #[test]
    fn a_steady_read_is_told_from_a_torn_one() {
        use std::io::Write as _;
        use std::os::unix::fs::FileExt;
        let chunk = 1024;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&path, &data[..6000]).unwrap();
        let prior = hash(&data[..6000], chunk, None).0;
        std::fs::write(&path, &data).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .unwrap();
        let (read, _) = hash(&data, chunk, Some(&prior));
        assert!(
            steady(&f, 10_000, &read, Some(&prior)),
            "nothing changed since"
        );
        (&f).write_all(b"more").unwrap();
        assert!(
            steady(&f, 10_000, &read, Some(&prior)),
            "grown, what it had kept"
        );
        assert!(
            !steady(&f, 10_000, &read, None),
            "grown, nothing to prove its start by"
        );
        let mut other = data[..6000].to_vec();
        other[100] ^= 1;
        let changed_before = hash(&other, chunk, None).0;
        assert!(
            !steady(&f, 10_000, &read, Some(&changed_before)),
            "its start changed"
        );
        let mut tail = data[..5500].to_vec();
        tail[5200] ^= 1;
        let tail_changed = hash(&tail, chunk, None).0;
        assert!(
            !steady(&f, 10_000, &read, Some(&tail_changed)),
            "its partial end changed"
        );
        // (Not through `f`: with O_APPEND a positioned write appends.)
        let w = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        w.write_all_at(b"x", 3000).unwrap();
        assert!(
            !steady(&f, 10_000, &read, Some(&prior)),
            "written since the read"
        );
    }

    /// An index gives the same digests as hashing everything, for a file edited in place,
    /// grown or shrunk.
    #[test]
    fn the_index_gives_the_digest_of_a_full_pass() {
        let chunk = 1024;
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let (ix, _) = hash(&data, chunk, None);
        let mut edited = data.clone();
        edited[5000] ^= 1;
        edited.extend_from_slice(b"grown");
        let shrunk = &data[..7000];
        for new in [&edited[..], shrunk, &data[..]] {
            let full = hash(new, chunk, None).1;
            assert_eq!(hash(new, chunk, Some(&ix)).1, full);
        }
    }
}
