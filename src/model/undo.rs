//! The standby's undo log, as pure decisions and a codec: what must be written down before
//! a change to the tree so that the tree can be put back, whatever the moment of a crash, at
//! its last consistent point (DESIGN §10).
//!
//! A *window* opens at a consistent point. Before each change of the tree in the window,
//! the records that undo it are appended to the log and made durable; the change follows.
//! Whatever the change destroys is not destroyed but moved into the undo area, under a
//! number of its own (`kept`): a replaced file is exchanged with its new version, a removed
//! entry is renamed there. Rolling back undoes the records from the last to the first;
//! each undo is correct whether its change happened or not (a crash between the record and
//! the change), because the tree has one writer and the later changes are undone first.
//! At the next consistent point the log and the area are dropped: the window closes.
//!
//! A file rewritten again and again in one window costs one kept copy: its first old
//! version. Once a path holds an entry made in the window (it is *fresh*), replacing it
//! needs no record, since rolling back removes or replaces it anyway.

use crate::model::epoch::Position;
use crate::model::manifest::{Meta, Mtime};
use crate::model::path::RelPath;
use crate::model::xattrs::{Policy, Xattrs};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashSet};

/// Most paths (and directory times) a window remembers: they are only an economy, and
/// memory must not grow with the tree.
const REMEMBERED: usize = 16_384;

/// One change's undo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Record {
    /// An entry made where there was none (a file, symlink, link or directory): undone by
    /// removing what is at `path`.
    Made { path: RelPath },
    /// The entry at `path` replaced by a new file (inode `new_ino`), the old one exchanged
    /// into the area as `kept`. If `kept` still is the new file the exchange never
    /// happened, and it is dropped; else it is the old entry, put back.
    Replaced {
        path: RelPath,
        kept: u64,
        new_ino: u64,
    },
    /// The entry at `path` (with everything beneath it) moved into the area as `kept`:
    /// put back if it is there.
    Removed { path: RelPath, kept: u64 },
    /// `from` renamed to `to`, where nothing was (a `Removed` of `to` comes first when
    /// something was): renamed back if `to` is there and `from` is not.
    Renamed { from: RelPath, to: RelPath },
    /// The attributes of `path` before they were set.
    Attrs { path: RelPath, old: OldAttrs },
    /// The modification time of the directory `path` before the window's first change of
    /// its entries: set again once everything after it is undone.
    DirTime { path: RelPath, mtime: Mtime },
    /// A change at `path` that could not be kept (what it destroyed lay on another
    /// filesystem than the undo area: a mount inside the tree). A roll-back past it cannot
    /// give back the consistent point, and says so.
    Unkept { path: RelPath },
    /// The file at `path` patched in place (a large file where the filesystem cannot
    /// clone it): `kept` is the patch's journal, what it overwrote, written back if there.
    Patched { path: RelPath, kept: u64 },
}

/// An entry's attributes as they were, and how to put them back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct OldAttrs {
    pub(crate) meta: Meta,
    /// Owner and group are set too (the standby runs as root).
    pub(crate) owners: bool,
    /// The mode is set too (not a symlink).
    pub(crate) with_mode: bool,
    /// Its extended attributes in the namespaces the session kept.
    pub(crate) xattrs: Option<(Xattrs, Policy)>,
}

/// The window's bookkeeping: which paths are fresh, which directories have their time
/// recorded, and the next number in the area.
#[derive(Debug, Default)]
pub(crate) struct Window {
    fresh: BTreeSet<RelPath>,
    timed: HashSet<RelPath>,
    next_kept: u64,
}

impl Window {
    /// A window with numbers in the area from `first` (the consistent point it follows is
    /// in the log's header).
    pub(crate) fn new(first: u64) -> Window {
        Window {
            next_kept: first,
            ..Window::default()
        }
    }

    /// The window as a log left it, to go on writing it (after a restart of `serve`). What
    /// was fresh is forgotten: it is only an economy.
    pub(crate) fn resume(records: &[Record]) -> Window {
        let mut w = Window::new(0);
        for r in records {
            match r {
                Record::Replaced { kept, .. } | Record::Removed { kept, .. } => {
                    w.next_kept = w.next_kept.max(kept + 1);
                }
                Record::DirTime { path, .. } => {
                    w.timed.insert(path.clone());
                }
                _ => {}
            }
        }
        w
    }

    fn kept(&mut self) -> u64 {
        let k = self.next_kept;
        self.next_kept += 1;
        k
    }

    /// Whether the time of directory `dir` must be recorded before its entries change
    /// (the first time in the window); it is then taken as recorded.
    pub(crate) fn needs_time(&mut self, dir: &RelPath) -> bool {
        if self.timed.contains(dir) {
            return false;
        }
        // Past the bound, a time is recorded again: the first record is undone last.
        if self.timed.len() < REMEMBERED {
            self.timed.insert(dir.clone());
        }
        true
    }

    /// A new file (inode `new_ino`) is put at `path`, where an entry is (`exists`) or not.
    /// `None`: nothing to record (the path is fresh).
    pub(crate) fn put(&mut self, path: &RelPath, exists: bool, new_ino: u64) -> Option<Record> {
        if exists && self.fresh.contains(path) {
            return None;
        }
        // Past the bound, a path is not remembered: replacing it again keeps one more copy.
        if self.fresh.len() < REMEMBERED {
            self.fresh.insert(path.clone());
        }
        Some(if exists {
            Record::Replaced {
                path: path.clone(),
                kept: self.kept(),
                new_ino,
            }
        } else {
            Record::Made { path: path.clone() }
        })
    }

    /// The file at `path` was patched in place; its journal is to be kept under the
    /// number returned.
    pub(crate) fn patched(&mut self, path: &RelPath) -> (Record, u64) {
        let kept = self.kept();
        let r = Record::Patched {
            path: path.clone(),
            kept,
        };
        (r, kept)
    }

    /// An entry is made at `path`, where there is none, that later puts must not count as
    /// fresh (a directory, a symlink, a hard link of an older file).
    pub(crate) fn made(&mut self, path: &RelPath) -> Record {
        self.forget(path);
        Record::Made { path: path.clone() }
    }

    /// The entry at `path` is removed, with everything beneath it.
    pub(crate) fn remove(&mut self, path: &RelPath) -> Record {
        self.forget(path);
        Record::Removed {
            path: path.clone(),
            kept: self.kept(),
        }
    }

    /// `from` is renamed to `to`, over an entry there (`to_exists`) or not.
    pub(crate) fn rename(&mut self, from: &RelPath, to: &RelPath, to_exists: bool) -> Vec<Record> {
        let mut out = Vec::new();
        if to_exists {
            out.push(self.remove(to));
        }
        self.forget(from);
        self.forget(to);
        out.push(Record::Renamed {
            from: from.clone(),
            to: to.clone(),
        });
        out
    }

    /// Nothing at or below `path` is fresh any more (it moved or went).
    fn forget(&mut self, path: &RelPath) {
        if path.is_root() {
            self.fresh.clear();
            return;
        }
        // What lies beneath sorts right after it, among the names its bytes begin.
        let under: Vec<RelPath> = self
            .fresh
            .range(path.clone()..)
            .take_while(|p| p.as_bytes().starts_with(path.as_bytes()))
            .filter(|p| p.starts_with(path))
            .cloned()
            .collect();
        for p in under {
            self.fresh.remove(&p);
        }
    }
}

/// The log's first frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Header {
    /// The consistent point the window follows.
    pub(crate) base: Position,
    /// When the primary's tree was at that point (ms since the Unix epoch, its clock).
    pub(crate) at_ms: u64,
}

/// Identifies an undo log, and its format.
pub(crate) const MAGIC: &[u8; 8] = b"hsundo1\n";

/// Bytes of the digest that guards each frame.
const SUM: usize = 8;

/// One frame: length, digest, payload. A frame cut short or altered (a crash while it was
/// appended) ends the log there: its change never happened, since a change waits until
/// its record is durable.
pub(crate) fn frame<T: Serialize>(value: &T, out: &mut Vec<u8>) {
    let body = postcard::to_stdvec(value).expect("undo records always encode");
    out.extend((body.len() as u32).to_le_bytes());
    out.extend(&blake3::hash(&body).as_bytes()[..SUM]);
    out.extend(body);
}

/// A log's contents: its header and every whole record, or `None` for a log that does not
/// start with a whole header (nothing was ever recorded in it).
pub(crate) fn parse(bytes: &[u8]) -> Option<(Header, Vec<Record>)> {
    let mut rest = bytes.strip_prefix(MAGIC.as_slice())?;
    let header: Header = next_frame(&mut rest)?;
    let mut records = Vec::new();
    while let Some(r) = next_frame(&mut rest) {
        records.push(r);
    }
    Some((header, records))
}

fn next_frame<T: for<'de> Deserialize<'de>>(rest: &mut &[u8]) -> Option<T> {
    let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let sum = rest.get(4..4 + SUM)?;
    let body = rest.get(4 + SUM..(4 + SUM).checked_add(len)?)?;
    if &blake3::hash(body).as_bytes()[..SUM] != sum {
        return None;
    }
    let value = postcard::from_bytes(body).ok()?;
    *rest = &rest[4 + SUM + len..];
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn a_file_rewritten_in_a_window_is_kept_once() {
        let mut w = Window::new(0);
        assert!(matches!(
            w.put(&p("a"), true, 10),
            Some(Record::Replaced { kept: 0, .. })
        ));
        assert_eq!(w.put(&p("a"), true, 11), None);
        assert_eq!(w.put(&p("a"), true, 12), None);
        // A new name is made, and then fresh too.
        assert_eq!(
            w.put(&p("b"), false, 13),
            Some(Record::Made { path: p("b") })
        );
        assert_eq!(w.put(&p("b"), true, 14), None);
    }

    #[test]
    fn what_moves_or_goes_is_no_longer_fresh() {
        let mut w = Window::new(5);
        w.put(&p("d/a"), false, 1);
        w.put(&p("e"), false, 2);
        let r = w.rename(&p("d"), &p("x"), false);
        assert_eq!(
            r,
            vec![Record::Renamed {
                from: p("d"),
                to: p("x")
            }]
        );
        // `d/a` was renamed away: a new `d/a` replaces nothing made in the window... and
        // whatever is later put at `d/a` over an entry is kept.
        assert!(matches!(
            w.put(&p("d/a"), true, 3),
            Some(Record::Replaced { kept: 5, .. })
        ));
        let r = w.rename(&p("e"), &p("f"), true);
        assert!(matches!(r[0], Record::Removed { kept: 6, .. }));
        assert!(matches!(w.remove(&p("f")), Record::Removed { kept: 7, .. }));
        assert!(w.put(&p("f"), true, 4).is_some());
    }

    /// Memory does not grow with the tree: past the bound a path is not remembered as
    /// fresh (replacing it again keeps a copy, which is correct, only dearer).
    #[test]
    fn a_window_remembers_a_bounded_number_of_paths() {
        let mut w = Window::new(0);
        for i in 0..REMEMBERED + 10 {
            w.put(&p(&format!("f{i}")), false, i as u64);
        }
        assert!(w.put(&p("f0"), true, 1).is_none());
        assert!(
            w.put(&p(&format!("f{}", REMEMBERED + 5)), true, 1)
                .is_some()
        );
        for i in 0..REMEMBERED + 10 {
            w.needs_time(&p(&format!("d{i}")));
        }
        assert!(!w.needs_time(&p("d0")));
        assert!(w.needs_time(&p(&format!("d{}", REMEMBERED + 5))));
    }

    #[test]
    fn directory_times_are_recorded_once() {
        let mut w = Window::new(0);
        assert!(w.needs_time(&p("d")));
        assert!(!w.needs_time(&p("d")));
        assert!(w.needs_time(&RelPath::root()));
    }

    #[test]
    fn a_resumed_window_numbers_on_and_remembers_its_times() {
        let recs = vec![
            Record::DirTime {
                path: p("d"),
                mtime: Mtime { sec: 1, nsec: 2 },
            },
            Record::Removed {
                path: p("d/x"),
                kept: 7,
            },
        ];
        let mut w = Window::resume(&recs);
        assert!(!w.needs_time(&p("d")));
        assert!(matches!(w.remove(&p("y")), Record::Removed { kept: 8, .. }));
    }

    #[test]
    fn a_torn_or_damaged_tail_ends_the_log_there() {
        let header = Header {
            base: Position { epoch: 2, seq: 9 },
            at_ms: 123,
        };
        let recs = vec![
            Record::Made { path: p("a") },
            Record::Removed {
                path: p("b"),
                kept: 0,
            },
            Record::Renamed {
                from: p("c"),
                to: p("d"),
            },
        ];
        let mut log = MAGIC.to_vec();
        frame(&header, &mut log);
        let mut ends = vec![log.len()];
        for r in &recs {
            frame(r, &mut log);
            ends.push(log.len());
        }
        assert_eq!(parse(&log), Some((header, recs.clone())));
        // Cut anywhere: the whole records before the cut survive, nothing else.
        for cut in ends[0]..log.len() {
            let whole = ends.iter().filter(|&&e| e <= cut).count() - 1;
            let (h, got) = parse(&log[..cut]).unwrap();
            assert_eq!(h, header);
            assert_eq!(got, recs[..whole], "cut at {cut}");
        }
        // A flipped byte in the last record drops it.
        let mut bad = log.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x40;
        assert_eq!(parse(&bad).unwrap().1, recs[..2]);
        // No whole header: nothing.
        assert_eq!(parse(&log[..ends[0] - 1]), None);
        assert_eq!(parse(b"garbage"), None);
    }
}
