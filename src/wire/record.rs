//! The wire form of the engine's manifest types. A [`Message`](super::protocol::Message)
//! carries the engine's [`Meta`] and [`Entry`], but they are encoded through the records
//! here (`#[serde(with = ...)]`), so the engine's types may grow fields (digests, shapes,
//! versions) without changing the protocol: what a version carries is written down once,
//! in this file, and a new field travels only when a record of a new version says so.
//!
//! The records are laid out field for field as the protocol has always encoded them
//! (postcard: fields in order, enum variants by index); `protocol`'s golden test holds
//! them to it.

use crate::model::manifest::{Entry, Hash, Kind, LinkKey, Meta, Mtime, Shape};
use crate::model::path::RelPath;
use crate::model::xattrs::Sum;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A `Meta` as it travels: without the attribute digest (sent beside the entries, as
/// `XattrSums`).
#[derive(Serialize, Deserialize)]
struct MetaRecord {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: MtimeRecord,
}

#[derive(Serialize, Deserialize)]
struct MtimeRecord {
    sec: i64,
    nsec: u32,
}

/// An entry's kind as it travels; the variants keep their order (their index is the tag).
#[derive(Serialize)]
enum KindRef<'a> {
    File {
        size: u64,
        hash: Option<Hash>,
    },
    Dir,
    Symlink {
        #[serde(with = "crate::model::bytes")]
        target: &'a [u8],
    },
}

#[derive(Deserialize)]
enum KindRecord {
    File {
        size: u64,
        hash: Option<Hash>,
    },
    Dir,
    Symlink {
        #[serde(with = "crate::model::bytes")]
        target: Vec<u8>,
    },
}

#[derive(Serialize, Deserialize)]
struct LinkRecord {
    dev: u64,
    ino: u64,
}

/// An `Entry` as it is sent: without its shape (sent beside the entries, as `Shapes`).
#[derive(Serialize)]
struct EntryRef<'a> {
    path: &'a RelPath,
    kind: KindRef<'a>,
    meta: MetaRecord,
    link: Option<LinkRecord>,
}

#[derive(Deserialize)]
struct EntryRecord {
    path: RelPath,
    kind: KindRecord,
    meta: MetaRecord,
    link: Option<LinkRecord>,
}

impl From<&Meta> for MetaRecord {
    fn from(m: &Meta) -> Self {
        MetaRecord {
            mode: m.mode,
            uid: m.uid,
            gid: m.gid,
            mtime: MtimeRecord {
                sec: m.mtime.sec,
                nsec: m.mtime.nsec,
            },
        }
    }
}

impl From<MetaRecord> for Meta {
    /// The digest is filled in later from an `XattrSums`, if one came.
    fn from(m: MetaRecord) -> Self {
        Meta {
            mode: m.mode,
            uid: m.uid,
            gid: m.gid,
            mtime: Mtime {
                sec: m.mtime.sec,
                nsec: m.mtime.nsec,
            },
            xattrs: Sum::default(),
        }
    }
}

impl<'a> From<&'a Entry> for EntryRef<'a> {
    fn from(e: &'a Entry) -> Self {
        EntryRef {
            path: &e.path,
            kind: match &e.kind {
                Kind::File { size, hash } => KindRef::File {
                    size: *size,
                    hash: *hash,
                },
                Kind::Dir => KindRef::Dir,
                Kind::Symlink { target } => KindRef::Symlink { target },
            },
            meta: MetaRecord::from(&e.meta),
            link: e.link.map(|l| LinkRecord {
                dev: l.dev,
                ino: l.ino,
            }),
        }
    }
}

impl From<EntryRecord> for Entry {
    /// The shape is filled in later from a `Shapes`, if one came.
    fn from(e: EntryRecord) -> Self {
        Entry {
            path: e.path,
            kind: match e.kind {
                KindRecord::File { size, hash } => Kind::File { size, hash },
                KindRecord::Dir => Kind::Dir,
                KindRecord::Symlink { target } => Kind::Symlink { target },
            },
            meta: e.meta.into(),
            link: e.link.map(|l| LinkKey {
                dev: l.dev,
                ino: l.ino,
            }),
            shape: Shape::default(),
        }
    }
}

/// `#[serde(with = "record::meta")]` for a [`Meta`] field of a message.
pub(crate) mod meta {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(m: &Meta, s: S) -> Result<S::Ok, S::Error> {
        MetaRecord::from(m).serialize(s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Meta, D::Error> {
        MetaRecord::deserialize(d).map(Meta::from)
    }
}

/// `#[serde(with = "record::entry")]` for an [`Entry`] field of a message.
pub(crate) mod entry {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(e: &Entry, s: S) -> Result<S::Ok, S::Error> {
        EntryRef::from(e).serialize(s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Entry, D::Error> {
        EntryRecord::deserialize(d).map(Entry::from)
    }
}

/// `#[serde(with = "record::entries")]` for a list of entries.
pub(crate) mod entries {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(es: &[Entry], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(es.iter().map(EntryRef::from))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Entry>, D::Error> {
        // postcard bounds a sequence by the frame it sits in (at most `MAX_FRAME` bytes).
        Vec::<EntryRecord>::deserialize(d).map(|v| v.into_iter().map(Entry::from).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine's fields the wire does not carry are left for the side messages to fill,
    /// whatever they held on the sender.
    #[test]
    fn side_fields_stay_home() {
        let e = Entry {
            path: RelPath::new("a").unwrap(),
            kind: Kind::File {
                size: 9,
                hash: Some([3; 32]),
            },
            meta: Meta {
                mode: 0o600,
                uid: 1,
                gid: 2,
                mtime: Mtime { sec: 5, nsec: 6 },
                xattrs: [7; 16],
            },
            link: Some(LinkKey { dev: 1, ino: 2 }),
            shape: Shape {
                nlink: 2,
                blocks: 8,
            },
        };
        let bytes = postcard::to_stdvec(&EntryRef::from(&e)).unwrap();
        let back = Entry::from(postcard::from_bytes::<EntryRecord>(&bytes).unwrap());
        assert_eq!(back.meta.xattrs, Sum::default());
        assert_eq!(back.shape, Shape::default());
        assert_eq!(
            Entry {
                meta: Meta {
                    xattrs: Sum::default(),
                    ..e.meta
                },
                shape: Shape::default(),
                ..e
            },
            back
        );
    }
}
