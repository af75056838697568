//! The wire protocol: a version handshake, then length-prefixed postcard [`Message`]s, with
//! bulk bytes (file data, delta ops, signatures) as raw stream data after the message that
//! announces their length. Every length read off the wire is checked before allocation.
//!
//! Streams, all opened by the primary:
//! - the control stream (the first): handshake, `Open`, the standby's manifest, tree
//!   operations, `Flush` barriers and `Close`;
//! - the heartbeat stream (the second, from version 2): `Heartbeat`s both ways every second,
//!   so an idle session still proves each side alive and the standby knows its lag;
//! - lanes: small files, symlinks and metadata fixes, each acknowledged once
//!   durable, with `Flush` barriers;
//! - one stream per large file: `BigFile` or `Delta`, answered by one `Ack`.
//!
//! Versions: the greeting carries the newest and oldest version each side speaks; the
//! session uses the newest both speak. The QUIC ALPN name (`hotsync/1`) names the transport
//! and stays fixed, so a peer of another protocol version still reaches the greeting and
//! is told exactly which versions differ.

use crate::error::{ErrorCode, OpError, ProtocolError};
use crate::model::epoch::Position;
use crate::model::manifest::SMALL_FILE;
use crate::model::manifest::{Entry, Hash, Meta, MetaTarget, ScanError, Scope, Shape, Special};
use crate::model::path::RelPath;
use crate::model::status::Space;
use crate::model::xattrs::{Policy, Sum, Xattrs};
use serde::{Deserialize, Serialize};
use std::io::{self, BufReader, BufWriter, Read, Write};

/// Protocol version spoken by this build, and the oldest one it still accepts. Version 2
/// added heartbeats, coded errors, session modes and positions; version 3 the streamed walk
/// (`Walk`, `Dir`, `WalkEnd`; a version 2 peer is still listed whole with `List`), version 4
/// the walk of part of the tree (`WalkScopes`; a version 3 peer lists its parts with `List`),
/// version 5 extended attributes and holes, version 6 the shape of the standby's inodes
/// (`Shapes`: link counts and blocks) and its special files (`Specials`), and `Link` to a
/// symlink (a version 5 standby gets hard-linked symlinks as separate symlinks, and its
/// special files are not seen), version 7 consistent points (`Consistent`, answered by
/// `ConsistentHeld`; a version 6 standby has none, and says nothing of them). Version 1
/// peers are refused at the greeting with both versions named.
pub const VERSION: u16 = 7;
pub const MIN_VERSION: u16 = 2;
/// The first bytes each side sends, so a stray client is recognised at once.
pub const MAGIC: &[u8; 8] = b"hotsync\0";
/// Largest encoded control message.
pub(crate) const MAX_FRAME: usize = 1 << 20;
/// Most patterns a peer may send, and the longest pattern.
pub(crate) const MAX_EXCLUDES: usize = 4096;
pub(crate) const MAX_PATTERN: usize = 4096;

/// What a session may do on the standby.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionMode {
    /// Mirror into the tree (one writer at a time).
    Write,
    /// Only list and hash (a dry run, a verify): no clean-up, no writes, never busy.
    ReadOnly,
}

/// One side's heartbeat (the same message both ways; each side fills what it knows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub epoch: u64,
    /// Primary: the last batch durable on the standby. Standby: the last it was told of.
    pub seq: u64,
    /// When it was sent, in milliseconds since the Unix epoch (the sender's clock).
    pub sent_at_ms: u64,
    /// Primary: when the oldest change not yet durable on the standby was seen (sender's
    /// clock), `None` when caught up.
    pub oldest_pending_ms: Option<u64>,
    /// Primary: changes queued.
    pub pending: u64,
    /// Standby: its filesystem's free and total space.
    pub space: Option<Space>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Primary → standby, first message on the control stream, with the primary's epoch.
    Open {
        excludes: Vec<String>,
        mode: SessionMode,
        epoch: u64,
    },
    /// Standby → primary: the session is set up; `owners` says whether owner and group are
    /// preserved (the receiver runs as root); `position` is the last batch known durable
    /// there, from which the primary numbers on.
    Opened {
        owners: bool,
        position: Position,
    },
    Heartbeat(Heartbeat),
    /// Primary → standby on the control stream: list these paths (with content digests
    /// when `checksum`); answered by `Entries` batches and `ListEnd`.
    List {
        scopes: Vec<(RelPath, Scope)>,
        checksum: bool,
        /// Bytes per second the standby may read to hash, 0 for no limit.
        hash_rate: u64,
    },
    /// A batch of the standby's manifest.
    Entries {
        #[serde(with = "super::record::entries")]
        entries: Vec<Entry>,
        errors: Vec<ScanError>,
    },
    /// End of a listing; `temps_removed` counts leftover temporary files it cleaned up.
    ListEnd {
        count: u64,
        temps_removed: u64,
    },

    /// Remove an entry in the way of a type change, with everything beneath it.
    Clear {
        id: u64,
        path: RelPath,
    },
    Mkdir {
        id: u64,
        path: RelPath,
    },
    /// Delete an extra entry, with everything beneath it.
    Delete {
        id: u64,
        path: RelPath,
    },
    SetMeta {
        id: u64,
        path: RelPath,
        #[serde(with = "super::record::meta")]
        meta: Meta,
        target: MetaTarget,
    },
    Symlink {
        id: u64,
        path: RelPath,
        #[serde(with = "crate::model::bytes")]
        target: Vec<u8>,
        #[serde(with = "super::record::meta")]
        meta: Meta,
    },
    /// Rename `from` to `to` on the standby (a rename on the primary, not re-sent as data).
    Rename {
        id: u64,
        from: RelPath,
        to: RelPath,
    },
    /// Make `path` another name of the existing file `target` (from version 6, a symlink
    /// too: the link is made to the symlink itself, never to what it points at).
    Link {
        id: u64,
        path: RelPath,
        target: RelPath,
    },

    /// A whole file of `len` ≤ [`SMALL_FILE`] bytes; the bytes follow.
    SmallFile {
        id: u64,
        path: RelPath,
        #[serde(with = "super::record::meta")]
        meta: Meta,
        len: u64,
    },
    /// A whole file; `size` raw bytes follow, then `FileEnd`.
    BigFile {
        id: u64,
        path: RelPath,
        #[serde(with = "super::record::meta")]
        meta: Meta,
        size: u64,
    },
    /// A delta against the standby's file at `path`: `chunks` coarse hashes follow as raw
    /// bytes; the standby answers `BaseSig` or `NoBase`; then the op stream and `FileEnd`.
    Delta {
        id: u64,
        path: RelPath,
        #[serde(with = "super::record::meta")]
        meta: Meta,
        size: u64,
        chunk: u64,
        chunks: u64,
    },
    /// The standby's base: `matched_len` bitmap bytes then `fine_len` signature bytes follow.
    BaseSig {
        base_size: u64,
        block_size: u32,
        matched_len: u64,
        fine_len: u64,
    },
    /// The standby has no usable base; the sender sends literal ops only.
    NoBase {
        reason: String,
    },
    /// Ends a file's bytes. `complete` is false when the sender abandons the file (it
    /// changed while being read). A delta carries the digest of the result, which the
    /// standby must reproduce before anything is replaced; a whole file carries none.
    FileEnd {
        complete: bool,
        digest: Option<Hash>,
    },

    /// Outcome of one operation, sent once the change is durable (or has failed).
    Ack {
        id: u64,
        error: Option<OpError>,
    },
    /// Commit everything staged on this stream, then answer `Flushed`.
    Flush {
        seq: u64,
    },
    Flushed {
        seq: u64,
    },
    /// Ends the session cleanly.
    Close,
    Closed,
    /// A fatal error; the sender closes the connection after it.
    Error {
        code: ErrorCode,
        message: String,
    },
    /// Primary → standby, from version 3, as the first message of a stream of its own:
    /// walk the whole tree (hashing content when `checksum`) and answer on that stream with
    /// `Dir`s in walk order ([`crate::tree::walk`]), then `WalkEnd`. The primary reads them while
    /// it walks its own tree, so neither side holds the whole manifest.
    Walk {
        checksum: bool,
        /// Bytes per second the standby may read to hash, 0 for no limit.
        hash_rate: u64,
    },
    /// One directory of the standby's walk: the directory and its children, sorted by
    /// name. A large directory comes in parts: `more` says another part follows.
    Dir {
        #[serde(with = "super::record::entry")]
        dir: Entry,
        #[serde(with = "super::record::entries")]
        entries: Vec<Entry>,
        errors: Vec<ScanError>,
        more: bool,
    },
    /// The end of a walk: `count` entries in all (directories included, the root too), and
    /// the leftover temporary files it removed.
    WalkEnd {
        count: u64,
        temps_removed: u64,
    },
    /// Primary → standby, from version 4: as `Walk`, of the part of the tree `scopes` cover
    /// (`crate::tree::walk::Scopes`): whole subtrees, single entries, and the directories
    /// leading to them.
    WalkScopes {
        scopes: Vec<(RelPath, Scope)>,
        checksum: bool,
        hash_rate: u64,
    },
    /// Standby → primary, from version 5, right after `Opened`: the attribute namespaces
    /// its filesystem and privileges can store.
    Keeps {
        can: Policy,
    },
    /// Primary → standby, from version 5, the answer to `Keeps` and before any other
    /// stream is opened: the namespaces this session mirrors (what both want and can).
    Keep {
        policy: Policy,
    },
    /// From version 5: the extended attributes of the entry the next message on this
    /// stream writes (`SmallFile`, `BigFile`, `Delta`, `Symlink` or `SetMeta`). Without
    /// it, that entry has none of the namespaces the session keeps.
    Xattrs {
        attrs: Xattrs,
    },
    /// From version 5: a file with holes, of `size` bytes. Its data follows as `Extent`s
    /// in order, each followed by its raw bytes, then `FileEnd`; what no extent covers is
    /// a hole on the standby too.
    SparseFile {
        id: u64,
        path: RelPath,
        #[serde(with = "super::record::meta")]
        meta: Meta,
        size: u64,
    },
    /// From version 5: as `Delta`, of a file with holes. The standby keeps the holes: what
    /// the base has as a hole, and blocks of zeros in literal data, stay holes.
    SparseDelta {
        id: u64,
        path: RelPath,
        #[serde(with = "super::record::meta")]
        meta: Meta,
        size: u64,
        chunk: u64,
        chunks: u64,
    },
    /// `len` bytes of a sparse file's data at `offset`; the raw bytes follow.
    Extent {
        offset: u64,
        len: u64,
    },
    /// From version 5, before a `Dir` or `Entries`: the attribute digests of its entries
    /// that have any, by index (for a `Dir`, 0 is the directory and `i + 1` its entry `i`).
    XattrSums {
        sums: Vec<(u32, Sum)>,
    },
    /// From version 6, before a `Dir` or `Entries`: the [`Shape`] of its entries that have
    /// more than one name or are regular files larger than [`SMALL_FILE`] (the others' is
    /// not needed), by index as in `XattrSums`.
    Shapes {
        shapes: Vec<(u32, Shape)>,
    },
    /// From version 6, in a standby's walk before the `Dir` they are children of, and in a
    /// listing before `ListEnd`: its special files (sockets, fifos, devices). They are not
    /// entries (the mirror does not carry them), but the primary must see them to remove
    /// those it does not have.
    Specials {
        specials: Vec<Special>,
    },
    /// Primary → standby, from version 7, on the control stream: every change up to batch
    /// `seq` is durable there and the primary's tree stood still from that batch's start
    /// until `at_ms` (its clock): the standby's tree is the primary's as it was then, a
    /// consistent point (DESIGN §10). Answered by `ConsistentHeld` once recorded durably.
    Consistent {
        seq: u64,
        at_ms: u64,
    },
    /// Standby → primary, from version 7: the consistent point of batch `seq` is recorded;
    /// `kept`: a failover here goes back to it (the standby keeps an undo log), so only a
    /// point counts for a flush; otherwise it keeps the latest of every file.
    ConsistentHeld {
        seq: u64,
        kept: bool,
    },
}

impl Message {
    /// The operation id of a message that is acknowledged, `None` for the others. No
    /// wildcard here: a new message must say which it is.
    pub(crate) fn op_id(&self) -> Option<u64> {
        match self {
            Message::Clear { id, .. }
            | Message::Mkdir { id, .. }
            | Message::Delete { id, .. }
            | Message::SetMeta { id, .. }
            | Message::Symlink { id, .. }
            | Message::Link { id, .. }
            | Message::Rename { id, .. }
            | Message::SmallFile { id, .. }
            | Message::BigFile { id, .. }
            | Message::Delta { id, .. }
            | Message::SparseFile { id, .. }
            | Message::SparseDelta { id, .. }
            | Message::Ack { id, .. } => Some(*id),
            Message::Open { .. }
            | Message::Opened { .. }
            | Message::Heartbeat(_)
            | Message::List { .. }
            | Message::Entries { .. }
            | Message::ListEnd { .. }
            | Message::Walk { .. }
            | Message::Dir { .. }
            | Message::WalkEnd { .. }
            | Message::WalkScopes { .. }
            | Message::Keeps { .. }
            | Message::Keep { .. }
            | Message::Xattrs { .. }
            | Message::XattrSums { .. }
            | Message::Shapes { .. }
            | Message::Specials { .. }
            | Message::Consistent { .. }
            | Message::ConsistentHeld { .. }
            | Message::Extent { .. }
            | Message::BaseSig { .. }
            | Message::NoBase { .. }
            | Message::FileEnd { .. }
            | Message::Flush { .. }
            | Message::Flushed { .. }
            | Message::Close
            | Message::Closed
            | Message::Error { .. } => None,
        }
    }

    /// True for the messages that change the standby tree: exactly those that carry an
    /// operation id, less the acknowledgement.
    pub(crate) fn writes_tree(&self) -> bool {
        matches!(self, Message::Consistent { .. })
            || !matches!(self, Message::Ack { .. }) && self.op_id().is_some()
    }

    /// A short name for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Open { .. } => "Open",
            Message::Opened { .. } => "Opened",
            Message::Heartbeat(_) => "Heartbeat",
            Message::Entries { .. } => "Entries",
            Message::ListEnd { .. } => "ListEnd",
            Message::Clear { .. } => "Clear",
            Message::Mkdir { .. } => "Mkdir",
            Message::Delete { .. } => "Delete",
            Message::SetMeta { .. } => "SetMeta",
            Message::Symlink { .. } => "Symlink",
            Message::Link { .. } => "Link",
            Message::Rename { .. } => "Rename",
            Message::List { .. } => "List",
            Message::SmallFile { .. } => "SmallFile",
            Message::BigFile { .. } => "BigFile",
            Message::Delta { .. } => "Delta",
            Message::BaseSig { .. } => "BaseSig",
            Message::NoBase { .. } => "NoBase",
            Message::FileEnd { .. } => "FileEnd",
            Message::Ack { .. } => "Ack",
            Message::Flush { .. } => "Flush",
            Message::Flushed { .. } => "Flushed",
            Message::Close => "Close",
            Message::Closed => "Closed",
            Message::Error { .. } => "Error",
            Message::Walk { .. } => "Walk",
            Message::Dir { .. } => "Dir",
            Message::WalkEnd { .. } => "WalkEnd",
            Message::WalkScopes { .. } => "WalkScopes",
            Message::Keeps { .. } => "Keeps",
            Message::Keep { .. } => "Keep",
            Message::Xattrs { .. } => "Xattrs",
            Message::XattrSums { .. } => "XattrSums",
            Message::Shapes { .. } => "Shapes",
            Message::Specials { .. } => "Specials",
            Message::Consistent { .. } => "Consistent",
            Message::ConsistentHeld { .. } => "ConsistentHeld",
            Message::SparseFile { .. } => "SparseFile",
            Message::SparseDelta { .. } => "SparseDelta",
            Message::Extent { .. } => "Extent",
        }
    }
}

/// The `XattrSums` for `entries` (in the order a `Dir` or `Entries` carries them); `None`
/// when none has attributes, so nothing is sent.
pub(crate) fn xattr_sums<'a>(entries: impl Iterator<Item = &'a Entry>) -> Option<Message> {
    let sums: Vec<(u32, Sum)> = entries
        .enumerate()
        .filter(|(_, e)| e.meta.xattrs != Sum::default())
        .map(|(i, e)| (i as u32, e.meta.xattrs))
        .collect();
    (!sums.is_empty()).then_some(Message::XattrSums { sums })
}

/// Puts the digests of an `XattrSums` into the entries of the message that followed it.
///
/// # Errors
/// An index past those entries.
pub(crate) fn put_xattr_sums<'a>(
    sums: Vec<(u32, Sum)>,
    entries: impl Iterator<Item = &'a mut Entry>,
) -> Result<(), ProtocolError> {
    put_by_index(sums, entries, "attribute digest", |e, sum| {
        e.meta.xattrs = sum
    })
}

/// The `Shapes` for `entries` (in the order a `Dir` or `Entries` carries them); `None` when
/// none needs its shape told: only an inode with several names (its link count tells
/// whether all its names were listed) and a file large enough to have holes (its blocks
/// tell a dense copy of a sparse file).
pub(crate) fn shapes<'a>(entries: impl Iterator<Item = &'a Entry>) -> Option<Message> {
    let shapes: Vec<(u32, Shape)> = entries
        .enumerate()
        .filter(|(_, e)| e.link.is_some() || e.file_size().is_some_and(|s| s > SMALL_FILE))
        .map(|(i, e)| (i as u32, e.shape))
        .collect();
    (!shapes.is_empty()).then_some(Message::Shapes { shapes })
}

/// Puts the shapes of a `Shapes` into the entries of the message that followed it.
///
/// # Errors
/// An index past those entries.
pub(crate) fn put_shapes<'a>(
    shapes: Vec<(u32, Shape)>,
    entries: impl Iterator<Item = &'a mut Entry>,
) -> Result<(), ProtocolError> {
    put_by_index(shapes, entries, "shape", |e, shape| e.shape = shape)
}

/// Puts each `(index, value)` of a side message into the entry of that index, by `put`;
/// an index past the entries is an error naming `what` was sent.
fn put_by_index<'a, T>(
    values: Vec<(u32, T)>,
    entries: impl Iterator<Item = &'a mut Entry>,
    what: &str,
    put: impl Fn(&mut Entry, T),
) -> Result<(), ProtocolError> {
    let mut entries: Vec<&mut Entry> = entries.collect();
    let n = entries.len();
    for (i, v) in values {
        let Some(e) = entries.get_mut(i as usize) else {
            return Err(ProtocolError::Invalid(format!(
                "{what} for entry {i} of {n}"
            )));
        };
        put(e, v);
    }
    Ok(())
}

impl ProtocolError {
    /// `got` arrived where `expected` should have.
    pub(crate) fn unexpected(got: &Message, expected: &'static str) -> Self {
        ProtocolError::Unexpected {
            got: got.name(),
            expected,
        }
    }
}

/// What both sides of a session can do, decided once from the protocol version they
/// agreed at the greeting: the one place that knows which version brought what, so the
/// engines ask for a capability by name and never compare versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Caps {
    /// The version both speak.
    pub(crate) version: u16,
    /// Heartbeats on a stream of their own (2).
    pub(crate) heartbeats: bool,
    /// The streamed walk of the whole tree: `Walk`, `Dir`, `WalkEnd` (3).
    pub(crate) walk: bool,
    /// The streamed walk of part of the tree: `WalkScopes` (4).
    pub(crate) walk_scopes: bool,
    /// Extended attributes (agreed by `Keeps`/`Keep` at open) and holes (5).
    pub(crate) xattrs: bool,
    pub(crate) holes: bool,
    /// The standby's inode shapes and special files, and links to symlinks (6).
    pub(crate) shapes: bool,
    /// Consistent points: `Consistent` and `ConsistentHeld` (7).
    pub(crate) consistent: bool,
}

impl Caps {
    /// The capabilities of protocol `version`.
    pub(crate) fn of(version: u16) -> Caps {
        Caps {
            version,
            heartbeats: version >= 2,
            walk: version >= 3,
            walk_scopes: version >= 4,
            xattrs: version >= 5,
            holes: version >= 5,
            shapes: version >= 6,
            consistent: version >= 7,
        }
    }
}

/// A delta's announcement. `Delta` and `SparseDelta` carry the same record and differ only
/// in whether the file's holes are kept; both sides handle them as this one struct, and
/// only the codec knows the two messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeltaHead {
    /// The operation's ID, the file's name and its attributes.
    pub(crate) id: u64,
    pub(crate) path: RelPath,
    pub(crate) meta: Meta,
    /// The new version's size, which sets its chunk size.
    pub(crate) size: u64,
    /// How it is cut, and whether its holes are kept.
    pub(crate) chunking: Chunking,
}

/// How the new version is cut into chunks, and whether its holes are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Chunking {
    /// Bytes per chunk: [`crate::model::delta::chunk_size`] of the file's size.
    pub(crate) chunk: u64,
    /// How many chunks the file has, each with a digest the primary sends.
    pub(crate) chunks: u64,
    /// `SparseDelta`: the temp keeps the file's holes.
    pub(crate) sparse: bool,
}

impl TryFrom<Message> for DeltaHead {
    /// Any other message, given back untouched.
    type Error = Message;

    fn try_from(m: Message) -> Result<DeltaHead, Message> {
        let (id, path, meta, size, chunk, chunks, sparse) = match m {
            Message::Delta {
                id,
                path,
                meta,
                size,
                chunk,
                chunks,
            } => (id, path, meta, size, chunk, chunks, false),
            Message::SparseDelta {
                id,
                path,
                meta,
                size,
                chunk,
                chunks,
            } => (id, path, meta, size, chunk, chunks, true),
            other => return Err(other),
        };
        Ok(DeltaHead {
            id,
            path,
            meta,
            size,
            chunking: Chunking {
                chunk,
                chunks,
                sparse,
            },
        })
    }
}

impl From<DeltaHead> for Message {
    fn from(h: DeltaHead) -> Message {
        let DeltaHead {
            id,
            path,
            meta,
            size,
            chunking:
                Chunking {
                    chunk,
                    chunks,
                    sparse,
                },
        } = h;
        if sparse {
            Message::SparseDelta {
                id,
                path,
                meta,
                size,
                chunk,
                chunks,
            }
        } else {
            Message::Delta {
                id,
                path,
                meta,
                size,
                chunk,
                chunks,
            }
        }
    }
}

/// Sends our greeting; call [`read_greeting`] after it.
pub(crate) fn write_greeting(w: &mut impl Write) -> io::Result<()> {
    let mut g = [0u8; 12];
    g[..8].copy_from_slice(MAGIC);
    g[8..10].copy_from_slice(&VERSION.to_le_bytes());
    g[10..12].copy_from_slice(&MIN_VERSION.to_le_bytes());
    w.write_all(&g)?;
    w.flush()
}

/// Reads the peer's greeting and picks the version both speak.
pub(crate) fn read_greeting(r: &mut impl Read) -> Result<u16, ProtocolError> {
    let mut g = [0u8; 12];
    r.read_exact(&mut g).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ProtocolError::Closed
        } else {
            ProtocolError::Io(e)
        }
    })?;
    if &g[..8] != MAGIC {
        return Err(ProtocolError::BadMagic);
    }
    let theirs = u16::from_le_bytes([g[8], g[9]]);
    let theirs_min = u16::from_le_bytes([g[10], g[11]]);
    negotiate(theirs, theirs_min)
}

/// The highest version both sides speak.
pub(crate) fn negotiate(theirs: u16, theirs_min: u16) -> Result<u16, ProtocolError> {
    let v = VERSION.min(theirs);
    if v < MIN_VERSION || v < theirs_min {
        return Err(ProtocolError::Version {
            ours: VERSION,
            ours_min: MIN_VERSION,
            theirs,
            theirs_min,
        });
    }
    Ok(v)
}

/// Encodes one frame (length prefix + postcard body) into `out`.
pub fn encode(msg: &Message, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    let body = postcard::to_extend(msg, std::mem::take(out))?;
    *out = body;
    let len = out.len() - start - 4;
    if len > MAX_FRAME {
        out.truncate(start);
        return Err(ProtocolError::FrameTooLarge {
            len: len as u64,
            limit: MAX_FRAME,
        });
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// Decodes one frame body.
pub(crate) fn decode(body: &[u8]) -> Result<Message, ProtocolError> {
    Ok(postcard::from_bytes(body)?)
}

/// The reading half of a stream: frames and the raw bytes between them.
pub struct FrameReader<R: Read> {
    r: BufReader<R>,
    body: Vec<u8>,
}

impl<R: Read> FrameReader<R> {
    pub fn new(r: R) -> Self {
        FrameReader {
            r: BufReader::with_capacity(256 * 1024, r),
            body: Vec::new(),
        }
    }

    /// The next message, or `None` at a clean end of stream between frames.
    pub(crate) fn recv_opt(&mut self) -> Result<Option<Message>, ProtocolError> {
        let mut len = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match self.r.read(&mut len[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(ProtocolError::Closed),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(ProtocolError::FrameTooLarge {
                len: len as u64,
                limit: MAX_FRAME,
            });
        }
        self.body.resize(len, 0);
        self.r.read_exact(&mut self.body).map_err(eof_is_closed)?;
        let msg = decode(&self.body)?;
        if let Message::Error { code, message } = msg {
            return Err(ProtocolError::Peer { code, message });
        }
        Ok(Some(msg))
    }

    /// The next message; end of stream is an error.
    pub fn recv(&mut self) -> Result<Message, ProtocolError> {
        self.recv_opt()?.ok_or(ProtocolError::Closed)
    }

    /// Reads exactly `buf.len()` raw bytes.
    pub fn read_raw(&mut self, buf: &mut [u8]) -> Result<(), ProtocolError> {
        self.r.read_exact(buf).map_err(eof_is_closed)
    }

    /// Raw access for streaming bulk bytes (delta ops).
    pub(crate) fn raw(&mut self) -> &mut BufReader<R> {
        &mut self.r
    }

    pub fn greeting(&mut self) -> Result<u16, ProtocolError> {
        read_greeting(&mut self.r)
    }
}

fn eof_is_closed(e: io::Error) -> ProtocolError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        ProtocolError::Closed
    } else {
        ProtocolError::Io(e)
    }
}

/// The writing half of a stream, buffered; call [`FrameWriter::flush`] at barriers.
pub struct FrameWriter<W: Write> {
    w: BufWriter<W>,
    frame: Vec<u8>,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(w: W) -> Self {
        FrameWriter {
            w: BufWriter::with_capacity(256 * 1024, w),
            frame: Vec::new(),
        }
    }

    pub fn send(&mut self, msg: &Message) -> Result<(), ProtocolError> {
        self.frame.clear();
        encode(msg, &mut self.frame)?;
        self.w.write_all(&self.frame)?;
        Ok(())
    }

    pub fn write_raw(&mut self, data: &[u8]) -> Result<(), ProtocolError> {
        self.w.write_all(data)?;
        Ok(())
    }

    pub(crate) fn raw(&mut self) -> &mut BufWriter<W> {
        &mut self.w
    }

    pub fn flush(&mut self) -> Result<(), ProtocolError> {
        self.w.flush()?;
        Ok(())
    }

    pub fn greeting(&mut self) -> Result<(), ProtocolError> {
        write_greeting(&mut self.w)?;
        Ok(())
    }

    pub(crate) fn get_mut(&mut self) -> &mut W {
        self.w.get_mut()
    }
}

/// Checks that a peer's exclude patterns are within bounds.
pub(crate) fn check_excludes(excludes: &[String]) -> Result<(), ProtocolError> {
    if excludes.len() > MAX_EXCLUDES || excludes.iter().any(|p| p.len() > MAX_PATTERN) {
        return Err(ProtocolError::Invalid(
            "too many or too long exclude patterns".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_capability_comes_with_the_version_that_brought_it() {
        let on = |v: u16| {
            let c = Caps::of(v);
            [
                c.heartbeats,
                c.walk,
                c.walk_scopes,
                c.xattrs,
                c.holes,
                c.shapes,
            ]
        };
        assert_eq!(on(2), [true, false, false, false, false, false]);
        assert_eq!(on(3), [true, true, false, false, false, false]);
        assert_eq!(on(4), [true, true, true, false, false, false]);
        assert_eq!(on(5), [true, true, true, true, true, false]);
        assert_eq!(on(VERSION), [true; 6]);
        assert_eq!(Caps::of(MIN_VERSION).version, MIN_VERSION);
    }

    #[test]
    fn a_delta_head_is_one_of_two_messages_and_comes_back_from_either() {
        for sparse in [false, true] {
            let head = DeltaHead {
                id: 7,
                path: RelPath::new("d/f").unwrap(),
                meta: crate::model::manifest::testing::meta(0o644, 1),
                size: 3 << 20,
                chunking: Chunking {
                    chunk: 1 << 20,
                    chunks: 3,
                    sparse,
                },
            };
            let m = Message::from(head.clone());
            assert_eq!(matches!(m, Message::SparseDelta { .. }), sparse);
            assert_eq!(DeltaHead::try_from(m), Ok(head));
        }
        // Any other message is given back untouched.
        assert_eq!(DeltaHead::try_from(Message::Close), Err(Message::Close));
    }
    use crate::model::manifest::{Kind, Mtime};

    fn meta() -> Meta {
        Meta {
            mode: 0o644,
            uid: 1,
            gid: 2,
            mtime: Mtime {
                sec: -5,
                nsec: 999_999_999,
            },
            xattrs: Default::default(),
        }
    }

    fn samples() -> Vec<Message> {
        let p = RelPath::new(b"dir/-name with\nnewline\xff".to_vec()).unwrap();
        vec![
            Message::Open {
                excludes: vec!["*.tmp".into()],
                mode: SessionMode::Write,
                epoch: 3,
            },
            Message::Heartbeat(Heartbeat {
                epoch: 2,
                seq: u64::MAX,
                sent_at_ms: 1_764_572_297_123,
                oldest_pending_ms: Some(1_764_572_297_000),
                pending: 7,
                space: Some(Space {
                    free_bytes: 1,
                    total_bytes: 2,
                    free_inodes: 3,
                    total_inodes: 4,
                }),
            }),
            Message::List {
                scopes: vec![(p.clone(), Scope::Tree)],
                checksum: true,
                hash_rate: 0,
            },
            Message::Walk {
                checksum: true,
                hash_rate: 5,
            },
            Message::Dir {
                dir: Entry {
                    path: p.clone(),
                    kind: Kind::Dir,
                    meta: meta(),
                    link: None,
                    shape: Default::default(),
                },
                entries: vec![],
                errors: vec![],
                more: true,
            },
            Message::WalkEnd {
                count: 3,
                temps_removed: 1,
            },
            Message::WalkScopes {
                scopes: vec![(p.clone(), Scope::Tree), (RelPath::root(), Scope::Entry)],
                checksum: false,
                hash_rate: 7,
            },
            Message::Keeps {
                can: Policy::wanted(false, true),
            },
            Message::Keep {
                policy: Policy::wanted(true, false),
            },
            Message::Xattrs {
                attrs: Xattrs(vec![crate::model::xattrs::Xattr {
                    name: b"user.a".to_vec(),
                    value: vec![0, 255, 7],
                }]),
            },
            Message::XattrSums {
                sums: vec![(0, [1; 16]), (u32::MAX, [9; 16])],
            },
            Message::Shapes {
                shapes: vec![(
                    3,
                    Shape {
                        nlink: 2,
                        blocks: u64::MAX,
                    },
                )],
            },
            Message::Specials {
                specials: vec![Special {
                    path: p.clone(),
                    kind: crate::model::manifest::SpecialKind::CharDevice,
                    rdev: 0x103,
                }],
            },
            Message::SparseFile {
                id: 8,
                path: p.clone(),
                meta: meta(),
                size: 1 << 40,
            },
            Message::Extent {
                offset: 1 << 30,
                len: 4096,
            },
            Message::SparseDelta {
                id: 9,
                path: p.clone(),
                meta: meta(),
                size: 1 << 33,
                chunk: 1 << 18,
                chunks: 1 << 15,
            },
            Message::Entries {
                entries: vec![Entry {
                    path: p.clone(),
                    kind: Kind::Symlink {
                        target: b"../x\xfe".to_vec(),
                    },
                    meta: meta(),
                    link: Some(crate::model::manifest::LinkKey { dev: 1, ino: 2 }),
                    shape: Default::default(),
                }],
                errors: vec![ScanError {
                    path: p.clone(),
                    error: "denied".into(),
                }],
            },
            Message::SmallFile {
                id: 7,
                path: p.clone(),
                meta: meta(),
                len: 3,
            },
            Message::Delta {
                id: 1,
                path: p.clone(),
                meta: meta(),
                size: 1 << 40,
                chunk: 1 << 20,
                chunks: 3,
            },
            Message::Ack {
                id: u64::MAX,
                error: Some(OpError {
                    message: "x".into(),
                    retry: true,
                    no_space: true,
                }),
            },
            Message::FileEnd {
                complete: true,
                digest: Some([9; 32]),
            },
            Message::Close,
        ]
    }

    #[test]
    fn frames_round_trip() {
        let mut wire = Vec::new();
        let mut w = FrameWriter::new(&mut wire);
        for m in samples() {
            w.send(&m).unwrap();
        }
        w.write_raw(b"raw").unwrap();
        w.flush().unwrap();
        drop(w);
        let mut r = FrameReader::new(&wire[..]);
        for m in samples() {
            assert_eq!(r.recv().unwrap(), m);
        }
        let mut raw = [0u8; 3];
        r.read_raw(&mut raw).unwrap();
        assert_eq!(&raw, b"raw");
        assert!(r.recv_opt().unwrap().is_none());
    }

    /// The encoding is the protocol: a change to any type a message carries (the engine's
    /// or the wire's) that alters these bytes breaks every peer of the same version.
    #[test]
    fn encoding_is_unchanged() {
        let mut wire = Vec::new();
        for m in samples() {
            encode(&m, &mut wire).unwrap();
        }
        assert_eq!(
            blake3::hash(&wire).to_hex().as_str(),
            "1136bee9d919d7076fa897644a07912051adfd33f212497f3164585e83d39193"
        );
    }

    #[test]
    fn consistent_points_round_trip() {
        let mut wire = Vec::new();
        let msgs = [
            Message::Consistent {
                seq: 9,
                at_ms: 1_764_572_297_123,
            },
            Message::ConsistentHeld { seq: 9, kept: true },
        ];
        for m in &msgs {
            encode(m, &mut wire).unwrap();
        }
        let mut r = FrameReader::new(&wire[..]);
        for m in msgs {
            assert_eq!(r.recv().unwrap(), m);
        }
    }

    #[test]
    fn oversized_frame_is_refused_before_allocation() {
        let wire = (u32::MAX).to_le_bytes();
        let err = FrameReader::new(&wire[..]).recv().unwrap_err();
        assert!(matches!(err, ProtocolError::FrameTooLarge { .. }), "{err}");
        let big = Message::Error {
            code: ErrorCode::Failed,
            message: "x".repeat(MAX_FRAME + 1),
        };
        assert!(matches!(
            encode(&big, &mut Vec::new()),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn malformed_frames_error_without_panic() {
        // Every truncation and every single-byte corruption of valid frames.
        let mut wire = Vec::new();
        for m in samples() {
            encode(&m, &mut wire).unwrap();
        }
        for cut in 0..wire.len() {
            let mut r = FrameReader::new(&wire[..cut]);
            while let Ok(Some(_)) = r.recv_opt() {}
        }
        for i in 0..wire.len() {
            for v in [0u8, 0x7f, 0x80, 0xff] {
                let mut w = wire.clone();
                w[i] = v;
                let mut r = FrameReader::new(&w[..]);
                while let Ok(Some(_)) = r.recv_opt() {}
            }
        }
    }

    #[test]
    fn hostile_paths_do_not_decode() {
        for bad in [
            &b"../etc/passwd"[..],
            b"/etc/passwd",
            b"a/../../b",
            b"a\0b",
            b"a//b",
        ] {
            // Encode with a valid placeholder of the same length, then swap the bytes in.
            let placeholder = RelPath::new(vec![b'p'; bad.len()]).unwrap();
            let msg = Message::SmallFile {
                id: 7,
                path: placeholder,
                meta: meta(),
                len: 3,
            };
            let mut frame = Vec::new();
            encode(&msg, &mut frame).unwrap();
            let at = frame
                .windows(bad.len())
                .position(|w| w.iter().all(|&b| b == b'p'))
                .unwrap();
            frame[at..at + bad.len()].copy_from_slice(bad);
            assert!(FrameReader::new(&frame[..]).recv().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn greeting_and_versions() {
        let mut wire = Vec::new();
        write_greeting(&mut wire).unwrap();
        assert_eq!(read_greeting(&mut &wire[..]).unwrap(), VERSION);
        assert!(matches!(
            read_greeting(&mut &b"GET / HTTP/1.1\r\n"[..]),
            Err(ProtocolError::BadMagic)
        ));
        assert!(matches!(
            negotiate(VERSION + 5, VERSION + 1),
            Err(ProtocolError::Version { .. })
        ));
        assert_eq!(negotiate(VERSION + 5, 1).unwrap(), VERSION);
        assert!(matches!(
            negotiate(0, 0),
            Err(ProtocolError::Version { .. })
        ));
        // A version 1 peer is refused, and told both sides' versions.
        let e = negotiate(1, 1).unwrap_err().to_string();
        assert!(
            e.contains("speaks protocol 7 (accepts 2 to 7)") && e.contains("the peer speaks 1"),
            "{e}"
        );
        // A version 2 peer is still served, at version 2 (it is listed whole).
        assert_eq!(negotiate(2, 2).unwrap(), 2);
        // A version 3 peer too, at version 3 (parts of the tree are listed).
        assert_eq!(negotiate(3, 2).unwrap(), 3);
        // A version 5 peer at version 5: no shapes, no specials, no linked symlinks.
        assert_eq!(negotiate(5, 2).unwrap(), 5);
        // A version 6 peer at version 6: no consistent points.
        assert_eq!(negotiate(6, 2).unwrap(), 6);
        assert!(!Caps::of(6).consistent && Caps::of(7).consistent);
    }

    #[test]
    fn peer_error_surfaces() {
        let mut wire = Vec::new();
        encode(
            &Message::Error {
                code: ErrorCode::Busy,
                message: "in use".into(),
            },
            &mut wire,
        )
        .unwrap();
        let err = FrameReader::new(&wire[..]).recv().unwrap_err();
        assert_eq!(err.to_string(), "peer reported: in use");
        assert!(matches!(
            err,
            ProtocolError::Peer {
                code: ErrorCode::Busy,
                ..
            }
        ));
    }
}
