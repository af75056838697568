//! What a scan of one tree says: one [`Entry`] per name, sorted by path bytes so that a
//! directory always precedes what it contains.

use crate::model::path::RelPath;
use serde::{Deserialize, Serialize};

/// Files up to this size travel whole, inline on a lane, never as deltas.
pub const SMALL_FILE: u64 = 64 * 1024;

/// A blake3 digest.
pub(crate) type Hash = [u8; 32];

/// A modification time with nanoseconds, as the filesystem reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Mtime {
    pub sec: i64,
    pub nsec: u32,
}

/// Attributes the mirror preserves. `mode` holds the permission bits (`0o7777`) only.
/// Its serde form is the whole value, for this process's own spill files; on the wire a
/// `Meta` travels as `wire::record` writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Mtime,
    /// Digest of the extended attributes and ACLs the session keeps ([`crate::tree::xattr`]),
    /// zeros for none. It never travels inside `Meta`: a version 5 peer sends it beside
    /// the entries, and the values themselves beside each operation.
    pub xattrs: crate::model::xattrs::Sum,
}

/// The type of an entry and what its content is compared by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A regular file; `hash` is present only when the scan was asked to hash content.
    File {
        size: u64,
        hash: Option<Hash>,
    },
    Dir,
    /// A symbolic link, stored verbatim and never followed.
    Symlink {
        target: Vec<u8>,
    },
}

/// Identity of an inode within one tree, present when a regular file or a symlink has more
/// than one name (a symlink can: `link()` does not follow it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LinkKey {
    pub dev: u64,
    pub ino: u64,
}

/// How an entry's inode is laid out beyond its attributes: how many names it has and the
/// space it takes. Read with the entry on each side; it never travels inside an [`Entry`]
/// (a version 6 peer sends it beside the entries, as `Shapes`), and a zero means the peer
/// did not say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Shape {
    /// Names the inode has, inside the tree or not.
    pub nlink: u64,
    /// 512-byte blocks allocated to it.
    pub blocks: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: RelPath,
    pub kind: Kind,
    pub meta: Meta,
    /// Set for regular files and symlinks whose link count is above one.
    pub link: Option<LinkKey>,
    pub shape: Shape,
}

/// What kind of special file an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SpecialKind {
    Socket,
    Fifo,
    CharDevice,
    BlockDevice,
}

impl std::fmt::Display for SpecialKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SpecialKind::Socket => "socket",
            SpecialKind::Fifo => "fifo",
            SpecialKind::CharDevice => "character device",
            SpecialKind::BlockDevice => "block device",
        })
    }
}

/// A socket, fifo or device node. The mirror does not carry them (the primary's are
/// skipped, with a warning), but it sees them on both sides: the standby must not hold one
/// the primary lacks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Special {
    pub path: RelPath,
    pub kind: SpecialKind,
    /// The device number, for a device node.
    pub rdev: u64,
}

impl Special {
    /// Why it is not mirrored, for the report and the warning.
    pub(crate) fn reason(&self) -> String {
        format!(
            "{} skipped: hotsync mirrors files, directories and symlinks only",
            self.kind
        )
    }

    /// Whether `other` is the same special file as far as the mirror can tell: the same
    /// kind and, for a device node, the same device. A standby's special that matches the
    /// primary's at the same path is left alone (an operator made it, as hotsync cannot);
    /// any other is not the primary's and goes.
    pub(crate) fn matches(&self, other: &Special) -> bool {
        self.kind == other.kind
            && (!matches!(
                self.kind,
                SpecialKind::CharDevice | SpecialKind::BlockDevice
            ) || self.rdev == other.rdev)
    }
}

impl Entry {
    pub(crate) fn is_dir(&self) -> bool {
        matches!(self.kind, Kind::Dir)
    }
    pub(crate) fn file_size(&self) -> Option<u64> {
        match self.kind {
            Kind::File { size, .. } => Some(size),
            _ => None,
        }
    }
}

/// What kind of entry a metadata fix applies to (symlinks have no mode of their own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MetaTarget {
    File,
    Symlink,
    Dir,
}

/// How much of a path a scan covers: the entry alone, or it and everything beneath it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Scope {
    Entry,
    Tree,
}

/// Drops duplicates and scopes inside a `Tree` scope that is also listed; sorted.
pub(crate) fn normalize_scopes(scopes: &[(RelPath, Scope)]) -> Vec<(RelPath, Scope)> {
    let mut v: Vec<(RelPath, Scope)> = scopes.to_vec();
    // Sorted by path, a tree comes before what it covers; the widest scope of a path wins.
    v.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    v.dedup_by(|b, a| a.0 == b.0);
    let mut out: Vec<(RelPath, Scope)> = Vec::with_capacity(v.len());
    let mut trees: Vec<RelPath> = Vec::new();
    for (p, sc) in v {
        while trees.last().is_some_and(|t| !p.starts_with(t)) {
            trees.pop();
        }
        if trees.last().is_some_and(|t| p.starts_with(t)) {
            continue;
        }
        if sc == Scope::Tree {
            trees.push(p.clone());
        }
        out.push((p, sc));
    }
    out
}

/// A scan problem tied to one path: the entry (and, for a directory, everything under it)
/// is unknown, so nothing there may be deleted on the standby.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanError {
    pub path: RelPath,
    pub error: String,
}

/// The result of scanning one tree: entries sorted by path (the root itself is entry 0),
/// the paths that could not be read, and the special files (not mirrored), sorted too.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    pub entries: Vec<Entry>,
    pub errors: Vec<ScanError>,
    pub specials: Vec<Special>,
}

impl Manifest {
    /// Sorts entries and specials by path bytes and drops duplicates; call after building
    /// by hand.
    pub(crate) fn sort(&mut self) {
        self.entries.sort_by(|a, b| a.path.cmp(&b.path));
        self.entries.dedup_by(|a, b| a.path == b.path);
        self.specials.sort_by(|a, b| a.path.cmp(&b.path));
        self.specials.dedup_by(|a, b| a.path == b.path);
    }

    /// The special file at `path`, if this side has one there.
    pub(crate) fn special(&self, path: &RelPath) -> Option<&Special> {
        self.specials
            .binary_search_by(|s| s.path.cmp(path))
            .ok()
            .map(|i| &self.specials[i])
    }

    /// The root directory's entry, if the scan recorded it.
    pub(crate) fn root(&self) -> Option<&Entry> {
        self.entries.first().filter(|e| e.path.is_root())
    }

    /// Entries other than the root.
    pub(crate) fn children(&self) -> &[Entry] {
        match self.root() {
            Some(_) => &self.entries[1..],
            None => &self.entries,
        }
    }

    pub(crate) fn get(&self, path: &RelPath) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.path.cmp(path))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// Total size of regular files.
    pub(crate) fn file_bytes(&self) -> u64 {
        self.entries.iter().filter_map(Entry::file_size).sum()
    }
}

impl Manifest {
    /// Entries (special files among them) at or under `p`.
    pub(crate) fn count_under(&self, p: &RelPath) -> u64 {
        // The paths beginning with p's bytes are contiguous; `p-x` sorts among them,
        // before `p/x`, and is no descendant.
        fn under<'a>(paths: impl Iterator<Item = &'a RelPath>, p: &RelPath) -> usize {
            paths
                .take_while(|q| q.as_bytes().starts_with(p.as_bytes()))
                .filter(|q| q.starts_with(p))
                .count()
        }
        let start = self.entries.partition_point(|e| e.path < *p);
        let entries = under(self.entries[start..].iter().map(|e| &e.path), p);
        let start = self.specials.partition_point(|s| s.path < *p);
        let specials = under(self.specials[start..].iter().map(|s| &s.path), p);
        (entries + specials) as u64
    }
}

/// Builders for manifests in unit tests.
/// An entry whose name is reserved for hotsync's own files (a temp's exact form, or an
/// entry in the root's `.hotsync`), skipped and reported as not mirrored. (Special files
/// are [`crate::model::manifest::Special`]s.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub path: RelPath,
    pub kind: &'static str,
}

/// [`Skipped::kind`] of a name of the exact form of hotsync's temporary files.
pub const RESERVED_TEMP: &str = "reserved name";
/// [`Skipped::kind`] of a user's entry in the root's `.hotsync` (or a `.hotsync` that is
/// not hotsync's directory).
pub const RESERVED_AREA: &str = "entry in the reserved .hotsync";

impl Skipped {
    /// Why it is not mirrored and what to do, for the report and the warning.
    pub(crate) fn reason(&self) -> String {
        match self.kind {
            RESERVED_TEMP => "not mirrored: names of the form .hotsync-tmp.<16 hex digits> are \
                              reserved for hotsync's temporary files; rename it to mirror it"
                .into(),
            RESERVED_AREA => "not mirrored: the root's .hotsync is reserved for hotsync's own \
                              state; move it out of .hotsync to mirror it"
                .into(),
            kind => format!("{kind} skipped: hotsync mirrors files, directories and symlinks only"),
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub fn meta(mode: u32, t: i64) -> Meta {
        Meta {
            mode,
            uid: 0,
            gid: 0,
            mtime: Mtime { sec: t, nsec: 5 },
            xattrs: Default::default(),
        }
    }
    /// A regular file of `size` bytes with mtime `t` and content digest `hash`.
    pub fn file_with(path: &str, size: u64, t: i64, hash: Option<Hash>) -> Entry {
        Entry {
            path: RelPath::new(path).unwrap(),
            kind: Kind::File { size, hash },
            meta: meta(0o644, t),
            link: None,
            shape: Default::default(),
        }
    }
    pub fn file(path: &str, size: u64) -> Entry {
        file_with(path, size, 1, None)
    }
    pub fn dir(path: &str) -> Entry {
        Entry {
            path: RelPath::new(path).unwrap(),
            kind: Kind::Dir,
            meta: meta(0o755, 1),
            link: None,
            shape: Default::default(),
        }
    }
    /// A sorted manifest of `entries` and the root directory.
    pub fn manifest(mut entries: Vec<Entry>) -> Manifest {
        entries.push(dir(""));
        let mut m = Manifest {
            entries,
            ..Manifest::default()
        };
        m.sort();
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn scopes_are_normalised() {
        let n = normalize_scopes(&[
            (p("a/b"), Scope::Entry),
            (p("a"), Scope::Tree),
            (p("c"), Scope::Entry),
            (p("c"), Scope::Tree),
            (p("ab"), Scope::Entry),
            (p("c/d"), Scope::Tree),
        ]);
        assert_eq!(
            n,
            vec![
                (p("a"), Scope::Tree),
                (p("ab"), Scope::Entry),
                (p("c"), Scope::Tree)
            ]
        );
    }
}
