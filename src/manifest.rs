//! What a scan of one tree says: one [`Entry`] per name, sorted by path bytes so that a
//! directory always precedes what it contains.

use crate::path::RelPath;
use serde::{Deserialize, Serialize};

/// A blake3 digest.
pub type Hash = [u8; 32];

/// A modification time with nanoseconds, as the filesystem reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Mtime {
    pub sec: i64,
    pub nsec: u32,
}

/// Attributes the mirror preserves. `mode` holds the permission bits (`0o7777`) only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Mtime,
}

/// The type of an entry and what its content is compared by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A regular file; `hash` is present only when the scan was asked to hash content.
    File {
        size: u64,
        hash: Option<Hash>,
    },
    Dir,
    /// A symbolic link, stored verbatim and never followed.
    Symlink {
        #[serde(with = "crate::bytes")]
        target: Vec<u8>,
    },
}

/// Identity of a file's inode within one tree, present when the file has more than one name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LinkKey {
    pub dev: u64,
    pub ino: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: RelPath,
    pub kind: Kind,
    pub meta: Meta,
    /// Set for regular files whose link count is above one.
    pub link: Option<LinkKey>,
}

impl Entry {
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, Kind::Dir)
    }
    pub fn file_size(&self) -> Option<u64> {
        match self.kind {
            Kind::File { size, .. } => Some(size),
            _ => None,
        }
    }
}

/// How much of a path a scan covers: the entry alone, or it and everything beneath it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Scope {
    Entry,
    Tree,
}

/// A scan problem tied to one path: the entry (and, for a directory, everything under it)
/// is unknown, so nothing there may be deleted on the standby.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanError {
    pub path: RelPath,
    pub error: String,
}

/// The result of scanning one tree: entries sorted by path (the root itself is entry 0),
/// plus the paths that could not be read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    pub entries: Vec<Entry>,
    pub errors: Vec<ScanError>,
}

impl Manifest {
    /// Sorts entries by path bytes and drops duplicates; call after building by hand.
    pub fn sort(&mut self) {
        self.entries.sort_by(|a, b| a.path.cmp(&b.path));
        self.entries.dedup_by(|a, b| a.path == b.path);
    }

    /// The root directory's entry, if the scan recorded it.
    pub fn root(&self) -> Option<&Entry> {
        self.entries.first().filter(|e| e.path.is_root())
    }

    /// Entries other than the root.
    pub fn children(&self) -> &[Entry] {
        match self.root() {
            Some(_) => &self.entries[1..],
            None => &self.entries,
        }
    }

    pub fn get(&self, path: &RelPath) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.path.cmp(path))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// Total size of regular files.
    pub fn file_bytes(&self) -> u64 {
        self.entries.iter().filter_map(Entry::file_size).sum()
    }
}
