//! The chunk digests of a large file, kept beside the tree so that a delta against it need
//! not read it whole (DESIGN §10): the codec and when an index holds, no I/O.
//!
//! An index is valid for the file it was made of while the file's inode, size, modification
//! time and status-change time are those it records: any write, truncation, change of
//! attributes or new name changes the status-change time, which no one can set. Its
//! digests are guarded by one digest of their own, so an index torn by a crash, or
//! damaged, is not used.

use crate::model::manifest::Hash;

/// Identifies an index, and its format.
const MAGIC: &[u8; 8] = b"hsidx01\n";
/// Bytes before the digests.
pub(crate) const HEADER: usize = 8 + 8 * 8 + 32;

/// What a file was when its index was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Key {
    pub(crate) ino: u64,
    pub(crate) size: u64,
    pub(crate) mtime: (i64, u32),
    pub(crate) ctime: (i64, u32),
}

/// The chunk digests of a file as it was (`key`), cut in chunks of `chunk` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BlockIndex {
    pub(crate) key: Key,
    pub(crate) chunk: u64,
    pub(crate) digests: Vec<Hash>,
}

/// The guard of a set of digests.
fn sum(digests: &[Hash]) -> Hash {
    let mut h = blake3::Hasher::new();
    for d in digests {
        h.update(d);
    }
    *h.finalize().as_bytes()
}

impl BlockIndex {
    /// The header of the index: its key and chunking, and the guard of `digests`.
    pub(crate) fn header(&self) -> [u8; HEADER] {
        let mut out = [0u8; HEADER];
        out[..8].copy_from_slice(MAGIC);
        let fields = [
            self.key.ino,
            self.key.size,
            self.key.mtime.0 as u64,
            u64::from(self.key.mtime.1),
            self.key.ctime.0 as u64,
            u64::from(self.key.ctime.1),
            self.chunk,
            self.digests.len() as u64,
        ];
        for (i, f) in fields.iter().enumerate() {
            out[8 + 8 * i..16 + 8 * i].copy_from_slice(&f.to_le_bytes());
        }
        out[8 + 64..].copy_from_slice(&sum(&self.digests));
        out
    }

    /// The whole index as it is stored.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + 32 * self.digests.len());
        out.extend_from_slice(&self.header());
        for d in &self.digests {
            out.extend_from_slice(d);
        }
        out
    }

    /// An index as stored; `None` for anything torn, damaged or of another format.
    pub(crate) fn decode(bytes: &[u8]) -> Option<BlockIndex> {
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return None;
        }
        let field = |i: usize| u64::from_le_bytes(bytes[8 + 8 * i..16 + 8 * i].try_into().unwrap());
        let (chunk, count) = (field(6), field(7));
        let key = Key {
            ino: field(0),
            size: field(1),
            mtime: (field(2) as i64, u32::try_from(field(3)).ok()?),
            ctime: (field(4) as i64, u32::try_from(field(5)).ok()?),
        };
        if chunk == 0 || key.size.div_ceil(chunk) != count {
            return None;
        }
        let body = &bytes[HEADER..];
        if body.len() as u64 != count.checked_mul(32)? {
            return None;
        }
        let digests: Vec<Hash> = body
            .chunks_exact(32)
            .map(|c| c.try_into().unwrap())
            .collect();
        if sum(&digests)[..] != bytes[8 + 64..HEADER] {
            return None;
        }
        Some(BlockIndex {
            key,
            chunk,
            digests,
        })
    }

    /// Its digests, if it describes the file that is `key` now, cut in chunks of `chunk`.
    pub(crate) fn digests_for(self, key: &Key, chunk: u64) -> Option<Vec<Hash>> {
        (self.key == *key && self.chunk == chunk).then_some(self.digests)
    }

    /// The digests that differ from `old`'s (same chunking), by index: what an update in
    /// place writes.
    pub(crate) fn changed_from(&self, old: &BlockIndex) -> Vec<usize> {
        self.digests
            .iter()
            .enumerate()
            .filter(|(i, d)| old.digests.get(*i) != Some(d))
            .map(|(i, _)| i)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(size: u64) -> BlockIndex {
        let chunk = 1 << 18;
        BlockIndex {
            key: Key {
                ino: 42,
                size,
                mtime: (1_700_000_000, 5),
                ctime: (1_700_000_001, 6),
            },
            chunk,
            digests: (0..size.div_ceil(chunk)).map(|i| [i as u8; 32]).collect(),
        }
    }

    #[test]
    fn an_index_round_trips_and_holds_only_for_its_file() {
        let ix = index(10 << 20);
        let back = BlockIndex::decode(&ix.encode()).unwrap();
        assert_eq!(back, ix);
        let key = ix.key;
        assert_eq!(
            back.clone().digests_for(&key, ix.chunk),
            Some(ix.digests.clone())
        );
        let touched = Key {
            ctime: (1_700_000_009, 0),
            ..key
        };
        assert_eq!(back.clone().digests_for(&touched, ix.chunk), None);
        assert_eq!(back.digests_for(&key, ix.chunk * 2), None);
    }

    #[test]
    fn a_torn_or_damaged_index_is_not_used() {
        let bytes = index(10 << 20).encode();
        assert!(BlockIndex::decode(&bytes[..bytes.len() - 1]).is_none());
        let mut bad = bytes.clone();
        bad[HEADER + 40] ^= 1;
        assert!(BlockIndex::decode(&bad).is_none(), "a digest changed");
        let mut bad = bytes.clone();
        bad[9] ^= 1;
        assert!(
            BlockIndex::decode(&bad).is_some_and(|ix| ix.key.ino != 42),
            "a key changed is another file's index"
        );
        assert!(BlockIndex::decode(b"short").is_none());
    }

    #[test]
    fn an_update_in_place_writes_the_digests_that_changed() {
        let old = index(10 << 20);
        let mut new = old.clone();
        new.digests[7] = [0xFF; 32];
        new.digests.push([1; 32]);
        assert_eq!(new.changed_from(&old), vec![7, 40]);
    }
}
