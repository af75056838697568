//! A large file patched in place on the standby, where its filesystem cannot clone it
//! (ext4): what the patch overwrites, written down and made durable before the file is
//! touched, so that a crash at any moment leaves the file as it was or as it became
//! (DESIGN §10). The codec and the arithmetic, no I/O.

use crate::model::path::RelPath;
use crate::model::undo::OldAttrs;
use serde::{Deserialize, Serialize};

/// Identifies a patch journal, and its format.
const MAGIC: &[u8; 8] = b"hspatch1";

/// Most bytes a patch may write: beyond, the new version is written whole (the journal and
/// the patch are held in memory).
pub(crate) const MOST: u64 = 64 << 20;
/// Most bytes of a new version no chunk of the old one matches for a patch to be tried:
/// scattered edits leave whole chunks unmatched for a few bytes changed in each.
pub(crate) const MOST_UNMATCHED: u64 = 1 << 30;

/// What a patch of the file at `path` (inode `ino`) overwrites.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Patch {
    pub(crate) path: RelPath,
    pub(crate) ino: u64,
    /// Its size before.
    pub(crate) size: u64,
    /// Its attributes before.
    pub(crate) old: OldAttrs,
    /// The bytes the patch overwrites, where they were (none past the old size).
    #[serde(with = "ranges")]
    pub(crate) ranges: Vec<(u64, Vec<u8>)>,
}

mod ranges {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct Range(u64, #[serde(with = "crate::model::bytes")] Vec<u8>);

    pub(super) fn serialize<S: Serializer>(v: &[(u64, Vec<u8>)], s: S) -> Result<S::Ok, S::Error> {
        let v: Vec<Range> = v.iter().map(|(o, b)| Range(*o, b.clone())).collect();
        v.serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<(u64, Vec<u8>)>, D::Error> {
        let v: Vec<Range> = Vec::deserialize(d)?;
        Ok(v.into_iter().map(|Range(o, b)| (o, b)).collect())
    }
}

impl Patch {
    /// The journal as stored: its magic, the patch, and a digest of both.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&postcard::to_allocvec(self).unwrap_or_default());
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// A journal as stored; `None` for one torn (a crash while it was written: the file was
    /// not touched yet), damaged or of another format.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Patch> {
        if bytes.len() < MAGIC.len() + 32 || &bytes[..8] != MAGIC {
            return None;
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if blake3::hash(body).as_bytes()[..] != sum[..] {
            return None;
        }
        postcard::from_bytes(&body[8..]).ok()
    }
}

/// The ranges of a file of `old_size` bytes that writing `new` (offset, length) overwrites:
/// the part of each that lies before the old end.
pub(crate) fn overwritten(new: &[(u64, u64)], old_size: u64) -> Vec<(u64, u64)> {
    new.iter()
        .filter(|(o, _)| *o < old_size)
        .map(|&(o, len)| (o, len.min(old_size - o)))
        .collect()
}

/// Adds `bytes` written at `offset` to `ranges`, sorted and apart, joining it to the last
/// one when it follows on (a delta writes in order).
pub(crate) fn push(ranges: &mut Vec<(u64, Vec<u8>)>, offset: u64, bytes: &[u8]) {
    if let Some((o, b)) = ranges.last_mut()
        && *o + b.len() as u64 == offset
    {
        b.extend_from_slice(bytes);
        return;
    }
    ranges.push((offset, bytes.to_vec()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::manifest::{Meta, Mtime};

    fn patch() -> Patch {
        Patch {
            path: RelPath::new("vm/disk.img").unwrap(),
            ino: 77,
            size: 1 << 30,
            old: OldAttrs {
                meta: Meta {
                    mode: 0o100644,
                    uid: 0,
                    gid: 0,
                    mtime: Mtime { sec: 1, nsec: 2 },
                    xattrs: Default::default(),
                },
                owners: true,
                with_mode: true,
                xattrs: None,
            },
            ranges: vec![(4096, vec![1; 4096]), (1 << 29, vec![2; 100])],
        }
    }

    #[test]
    fn a_journal_round_trips_and_a_torn_one_is_none() {
        let p = patch();
        let bytes = p.encode();
        assert_eq!(Patch::decode(&bytes), Some(p));
        for cut in [0, 8, bytes.len() / 2, bytes.len() - 1] {
            assert_eq!(Patch::decode(&bytes[..cut]), None, "cut at {cut}");
        }
        let mut bad = bytes.clone();
        bad[20] ^= 1;
        assert_eq!(Patch::decode(&bad), None);
    }

    #[test]
    fn what_a_patch_overwrites_stops_at_the_old_end() {
        assert_eq!(
            overwritten(&[(0, 10), (95, 10), (100, 50)], 100),
            vec![(0, 10), (95, 5)]
        );
        let mut r = Vec::new();
        push(&mut r, 10, b"ab");
        push(&mut r, 12, b"cd");
        push(&mut r, 20, b"x");
        assert_eq!(r, vec![(10, b"abcd".to_vec()), (20, b"x".to_vec())]);
    }
}
