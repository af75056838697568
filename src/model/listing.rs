//! The order both sides list a tree in, and the unit a listing comes in: one directory
//! with its children. The primary's walk, the standby's walk and the merge of the two
//! all agree on this order, so two listings are compared in one pass.

use crate::model::manifest::{Entry, ScanError, Skipped, Special};
use crate::model::path::RelPath;
use std::cmp::Ordering;

/// Orders paths as the walk visits directories: a path's own components first, `/` below
/// every byte a name can hold (names hold no NUL). `a` < `a/x` < `a-b`, where plain byte
/// order would put `a-b` first.
pub fn walk_cmp(a: &RelPath, b: &RelPath) -> Ordering {
    walk_bytes(a).cmp(walk_bytes(b))
}

/// The bytes of `p` as the walk orders them.
fn walk_bytes(p: &RelPath) -> impl Iterator<Item = u8> + '_ {
    p.as_bytes().iter().map(|&c| if c == b'/' { 0 } else { c })
}

/// A key that sorts as [`walk_cmp`] orders paths.
pub fn walk_key(p: &RelPath) -> Vec<u8> {
    walk_bytes(p).collect()
}

/// One directory as the walk found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    /// The directory itself (the root for the first unit).
    pub dir: Entry,
    /// Its direct children, sorted by name; excluded ones left out.
    pub entries: Vec<Entry>,
    /// Children (or the directory itself) that could not be read: nothing under them is
    /// known, so nothing there may be deleted on the other side.
    pub errors: Vec<ScanError>,
    /// Children the mirror cannot carry (sockets, fifos, devices), sorted by name.
    pub specials: Vec<Special>,
    /// Children whose names are reserved for hotsync's own files (on the primary).
    pub skipped: Vec<Skipped>,
}

impl Unit {
    /// Regular files' bytes in this directory.
    pub(crate) fn file_bytes(&self) -> u64 {
        self.entries.iter().filter_map(Entry::file_size).sum()
    }
}

/// Builders for units in unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::Unit;
    use crate::model::manifest::Entry;
    use crate::model::manifest::testing::dir;

    /// The directory `d` holding `entries`.
    pub fn unit(d: &str, entries: Vec<Entry>) -> Unit {
        Unit {
            dir: dir(d),
            entries,
            errors: vec![],
            specials: vec![],
            skipped: vec![],
        }
    }
}
