//! The comparison behind `hotsync verify`: a pure function of the two sides' listings
//! (only digests cross the network) that sorts every difference into a category, and
//! the check that a difference lasts, so a file that was changing while it was read is
//! not a false alarm.

use crate::model::listing::Unit;
use crate::model::manifest::{Entry, Kind, LinkKey, Manifest};
use crate::model::path::RelPath;
use crate::model::summary::EntryError;
use serde::Serialize;
use std::collections::BTreeSet;

/// One difference, with what differs, for the human report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    pub path: String,
    pub detail: String,
}

/// The verify report; `--json` prints it (field names are part of the contract).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    pub identical: bool,
    /// Entries of the primary compared (files, directories, symlinks, the root).
    pub files_checked: u64,
    /// File bytes hashed, both sides together.
    pub bytes_hashed: u64,
    /// On the primary, not on the standby.
    pub missing: Vec<String>,
    /// On the standby, not on the primary.
    pub extra: Vec<String>,
    /// Bytes (or symlink target, or type) differ.
    pub content_differs: Vec<String>,
    /// Same content; mode, owner or mtime differ.
    pub metadata_differs: Vec<String>,
    /// Entries that could not be read, on either side: not compared.
    pub errors: Vec<EntryError>,
    pub elapsed_ms: u64,
    /// What differs, path by path (content and metadata differences).
    pub details: Vec<Difference>,
    /// How many entries each category holds in all. Each list above shows at most
    /// [`MAX_LISTED`] of them (the first in walk order), so a standby that lost a million
    /// files gives a report of bounded size; `capped` says a list was cut short.
    pub missing_count: u64,
    pub extra_count: u64,
    pub content_differs_count: u64,
    pub metadata_differs_count: u64,
    pub errors_count: u64,
    pub capped: bool,
    /// On the primary and not mirrored by design (sockets, fifos, devices, names reserved
    /// for hotsync's own files), each with why: listed so that nothing is left out
    /// silently. They do not make the trees differ. At most [`MAX_LISTED`] are listed.
    pub skipped: Vec<EntryError>,
    pub skipped_count: u64,
}

/// Paths a category of a [`Report`] lists at most.
pub const MAX_LISTED: usize = 10_000;

impl Report {
    /// Exit status by the contract: 0 identical, 1 differences (or entries that could not
    /// be compared), 2 is for a verify that could not run at all.
    pub fn exit_code(&self) -> i32 {
        if self.identical { 0 } else { 1 }
    }

    /// Entries that differ (not errors), listed or not.
    pub(crate) fn differences(&self) -> u64 {
        self.missing_count
            + self.extra_count
            + self.content_differs_count
            + self.metadata_differs_count
    }

    /// Paths with a difference (not errors), sorted; only those listed (see `capped`).
    pub(crate) fn differing(&self) -> Vec<RelPath> {
        let mut v: BTreeSet<&String> = BTreeSet::new();
        v.extend(&self.missing);
        v.extend(&self.extra);
        v.extend(&self.content_differs);
        v.extend(&self.metadata_differs);
        v.into_iter().filter_map(|p| unescape(p)).collect()
    }

    /// The report without the paths `skip` names (changes still in flight, in watch).
    pub(crate) fn without(mut self, skip: impl Fn(&RelPath) -> bool) -> Report {
        self.count_at_least_lists();
        let drop = |p: &String| unescape(p).is_some_and(|p| skip(&p));
        for (l, n) in [
            (&mut self.missing, &mut self.missing_count),
            (&mut self.extra, &mut self.extra_count),
            (&mut self.content_differs, &mut self.content_differs_count),
            (&mut self.metadata_differs, &mut self.metadata_differs_count),
        ] {
            let before = l.len();
            l.retain(|p| !drop(p));
            *n -= (before - l.len()) as u64;
        }
        let before = self.errors.len();
        self.errors.retain(|e| !drop(&e.path));
        self.errors_count -= (before - self.errors.len()) as u64;
        self.details.retain(|d| !drop(&d.path));
        self.finish();
        self
    }

    fn finish(&mut self) {
        for l in [
            &mut self.missing,
            &mut self.extra,
            &mut self.content_differs,
            &mut self.metadata_differs,
        ] {
            l.sort();
        }
        self.errors.sort_by(|a, b| a.path.cmp(&b.path));
        self.capped = self.missing_count > self.missing.len() as u64
            || self.extra_count > self.extra.len() as u64
            || self.content_differs_count > self.content_differs.len() as u64
            || self.metadata_differs_count > self.metadata_differs.len() as u64
            || self.errors_count > self.errors.len() as u64;
        self.identical = self.missing_count == 0
            && self.extra_count == 0
            && self.content_differs_count == 0
            && self.metadata_differs_count == 0
            && self.errors_count == 0;
    }

    /// Makes each count at least its list's length (a report built by hand lists all).
    fn count_at_least_lists(&mut self) {
        let at_least = |n: &mut u64, len: usize| *n = (*n).max(len as u64);
        at_least(&mut self.missing_count, self.missing.len());
        at_least(&mut self.extra_count, self.extra.len());
        at_least(&mut self.content_differs_count, self.content_differs.len());
        at_least(
            &mut self.metadata_differs_count,
            self.metadata_differs.len(),
        );
        at_least(&mut self.errors_count, self.errors.len());
    }

    /// Sets each count to its list's length (a report listing everything).
    fn count_lists(&mut self) {
        self.missing_count = self.missing.len() as u64;
        self.extra_count = self.extra.len() as u64;
        self.content_differs_count = self.content_differs.len() as u64;
        self.metadata_differs_count = self.metadata_differs.len() as u64;
        self.errors_count = self.errors.len() as u64;
    }

    /// Adds `part` (the comparison of one more directory) to this report, listing at most
    /// [`MAX_LISTED`] paths per category.
    fn absorb(&mut self, part: Report) {
        fn take<T>(into: &mut Vec<T>, n: &mut u64, from: Vec<T>) {
            *n += from.len() as u64;
            let room = MAX_LISTED.saturating_sub(into.len());
            into.extend(from.into_iter().take(room));
        }
        self.files_checked += part.files_checked;
        self.bytes_hashed += part.bytes_hashed;
        take(&mut self.missing, &mut self.missing_count, part.missing);
        take(&mut self.extra, &mut self.extra_count, part.extra);
        take(
            &mut self.content_differs,
            &mut self.content_differs_count,
            part.content_differs,
        );
        take(
            &mut self.metadata_differs,
            &mut self.metadata_differs_count,
            part.metadata_differs,
        );
        take(&mut self.errors, &mut self.errors_count, part.errors);
        let mut shown = 0;
        let room = 2 * MAX_LISTED - self.details.len().min(2 * MAX_LISTED);
        take(
            &mut self.details,
            &mut shown,
            part.details.into_iter().take(room).collect(),
        );
    }
}

/// The path of a report line back as a `RelPath` (reports escape control characters and
/// bytes that are not UTF-8).
fn unescape(s: &str) -> Option<RelPath> {
    if s == "." {
        return Some(RelPath::root());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            match b[i + 1] {
                b'n' => out.push(b'\n'),
                b't' => out.push(b'\t'),
                b'r' => out.push(b'\r'),
                b'\\' => out.push(b'\\'),
                b'x' if i + 3 < b.len() => {
                    let hex = std::str::from_utf8(&b[i + 2..i + 4]).ok()?;
                    out.push(u8::from_str_radix(hex, 16).ok()?);
                    i += 4;
                    continue;
                }
                _ => return None,
            }
            i += 2;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    RelPath::new(out).ok()
}

fn kind_word(e: &Entry) -> &'static str {
    match e.kind {
        Kind::File { .. } => "a file",
        Kind::Dir => "a directory",
        Kind::Symlink { .. } => "a symlink",
    }
}

/// Compares a primary manifest with a standby manifest, both hashed. `owners`: whether
/// owner and group count (the standby runs as root).
pub(crate) fn compare(local: &Manifest, remote: &Manifest, owners: bool) -> Report {
    let mut links = Links::default();
    let mut r = compare_known(local, remote, owners, &[], &mut links);
    let mut part = Report::default();
    for d in links.finish(&mut r.details) {
        part.metadata_differs.push(d.path.clone());
        part.details.push(d);
    }
    r.metadata_differs.append(&mut part.metadata_differs);
    r.details.append(&mut part.details);
    r.count_lists();
    r.finish();
    r
}

/// The hard-link structure of both trees, as far as verify must compare it: each path that
/// has several names on either side, with its inode on each side. Only such paths are
/// held, so a tree of a million single files costs nothing here.
#[derive(Default)]
struct Links {
    pairs: Vec<LinkPair>,
}

struct LinkPair {
    path: RelPath,
    local: Option<LinkKey>,
    remote: Option<LinkKey>,
    /// Already listed under metadata for another reason: the link difference is added to
    /// its detail.
    listed: bool,
}

impl Links {
    /// Notes `x` (the primary's) and `y` (the standby's), alike in type and content.
    fn note(&mut self, x: &Entry, y: &Entry, listed: bool) {
        if x.link.is_some() || y.link.is_some() {
            self.pairs.push(LinkPair {
                path: x.path.clone(),
                local: x.link,
                remote: y.link,
                listed,
            });
        }
    }

    /// The paths whose inode has other names (among the paths both sides hold) on one side
    /// than on the other: a link split on the standby, or two files joined there into one
    /// inode. Those already listed under metadata have it added to their entry in
    /// `details`; the others are returned, to be listed.
    fn finish(self, details: &mut [Difference]) -> Vec<Difference> {
        let mut out = Vec::new();
        use std::collections::HashMap;
        let mut local: HashMap<LinkKey, Vec<usize>> = HashMap::new();
        let mut remote: HashMap<LinkKey, Vec<usize>> = HashMap::new();
        for (i, p) in self.pairs.iter().enumerate() {
            if let Some(k) = p.local {
                local.entry(k).or_default().push(i);
            }
            if let Some(k) = p.remote {
                remote.entry(k).or_default().push(i);
            }
        }
        fn group<'a>(
            groups: &'a HashMap<LinkKey, Vec<usize>>,
            k: Option<LinkKey>,
            alone: &'a [usize],
        ) -> &'a [usize] {
            k.and_then(|k| groups.get(&k)).map_or(alone, Vec::as_slice)
        }
        // Groups are compared once per pair of groups, not once per name.
        let mut same: HashMap<(Option<LinkKey>, Option<LinkKey>), bool> = HashMap::new();
        let names = |g: &[usize], me: usize| -> String {
            let others: Vec<String> = g
                .iter()
                .filter(|&&j| j != me)
                .map(|&j| self.pairs[j].path.display())
                .collect();
            match others.len() {
                0 => "no other name".to_string(),
                n if n <= 3 => others.join(", "),
                n => format!("{} and {} more", others[..3].join(", "), n - 3),
            }
        };
        for (i, p) in self.pairs.iter().enumerate() {
            let me = [i];
            let (gl, gr) = (group(&local, p.local, &me), group(&remote, p.remote, &me));
            // A name alone on one side is compared by itself; the pairs of groups once.
            let equal = match (p.local, p.remote) {
                (Some(_), Some(_)) => *same.entry((p.local, p.remote)).or_insert_with(|| gl == gr),
                _ => gl == gr,
            };
            if equal {
                continue;
            }
            let path = p.path.display();
            let detail = format!(
                "hard links differ: on the primary it is one file with {}; on the standby with {}",
                names(gl, i),
                names(gr, i)
            );
            if p.listed {
                if let Some(d) = details.iter_mut().find(|d| d.path == path) {
                    d.detail = format!("{}, {detail}", d.detail);
                }
                continue;
            }
            out.push(Difference { path, detail });
        }
        out
    }
}

/// The differences of `local` and `remote`, except beneath the paths `unknown` names
/// (or those either manifest could not read); lists unsorted, counts not set. Paths with
/// several names on either side are noted in `links`, to compare their groups when both
/// walks are over.
fn compare_known(
    local: &Manifest,
    remote: &Manifest,
    owners: bool,
    unknown: &[RelPath],
    links: &mut Links,
) -> Report {
    let mut r = Report::default();
    // Paths that could not be read on either side are reported once, and nothing under
    // them is called missing or extra.
    let mut unknown: Vec<RelPath> = unknown.to_vec();
    for (side, m) in [("primary", local), ("standby", remote)] {
        for e in &m.errors {
            r.errors
                .push(EntryError::new(&e.path, format!("{side}: {}", e.error)));
            unknown.push(e.path.clone());
        }
    }
    let unknown_at = |p: &RelPath| unknown.iter().any(|u| p.starts_with(u));
    let (mut i, mut j) = (0, 0);
    let (a, b) = (&local.entries, &remote.entries);
    while i < a.len() || j < b.len() {
        let order = match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) => x.path.cmp(&y.path),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, _) => std::cmp::Ordering::Greater,
        };
        match order {
            std::cmp::Ordering::Less => {
                let x = &a[i];
                r.files_checked += 1;
                if unknown_at(&x.path) {
                } else if let Some(sp) = remote.special(&x.path) {
                    // Not missing: something else is there.
                    let path = x.path.display();
                    r.content_differs.push(path.clone());
                    r.details.push(Difference {
                        path,
                        detail: format!(
                            "{} on the primary, a {} on the standby",
                            kind_word(x),
                            sp.kind
                        ),
                    });
                } else {
                    r.missing.push(x.path.display());
                }
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                let y = &b[j];
                if !unknown_at(&y.path) && !y.path.is_reserved() {
                    r.extra.push(y.path.display());
                }
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                r.files_checked += 1;
                compare_entry(&a[i], &b[j], owners, &mut r, links);
                i += 1;
                j += 1;
            }
        }
    }
    // Special files are not mirrored: one on the standby is extra unless the primary has
    // the same there (one where the primary has an entry was reported above).
    for sp in &remote.specials {
        if unknown_at(&sp.path) || sp.path.is_reserved() {
            continue;
        }
        let mine = local.special(&sp.path);
        if mine.is_some_and(|m| m.matches(sp)) || local.get(&sp.path).is_some() {
            continue;
        }
        let path = sp.path.display();
        r.extra.push(path.clone());
        r.details.push(Difference {
            path,
            detail: match mine {
                Some(m) => format!(
                    "a {} on the standby, a {} on the primary (special files are not mirrored)",
                    sp.kind, m.kind
                ),
                None => format!("a {} (special files are not mirrored)", sp.kind),
            },
        });
    }
    for m in [local, remote] {
        r.bytes_hashed += m
            .entries
            .iter()
            .filter_map(|e| match e.kind {
                Kind::File {
                    size,
                    hash: Some(_),
                } => Some(size),
                _ => None,
            })
            .sum::<u64>();
    }
    r
}

/// The verify comparison of two walks, one directory at a time ([`crate::tree::walk`]): only
/// the report, capped, grows, and the paths with several names (their groups are compared
/// at the end), never with the size of the trees.
pub(crate) struct Comparer {
    owners: bool,
    /// Paths either side could not read: nothing beneath them is compared.
    unknown: Vec<RelPath>,
    report: Report,
    links: Links,
}

impl Comparer {
    pub(crate) fn new(owners: bool) -> Comparer {
        Comparer {
            owners,
            unknown: Vec::new(),
            report: Report::default(),
            links: Links::default(),
        }
    }

    /// Compares one directory: the primary's unit, the standby's, or both.
    pub(crate) fn step(&mut self, local: Option<Unit>, remote: Option<Unit>) {
        let at_root = local
            .as_ref()
            .or(remote.as_ref())
            .is_some_and(|u| u.dir.path.is_root());
        if let Some(u) = &local {
            let not_mirrored = u
                .specials
                .iter()
                .map(|s| (&s.path, s.reason()))
                .chain(u.skipped.iter().map(|s| (&s.path, s.reason())));
            for (path, why) in not_mirrored {
                self.report.skipped_count += 1;
                if self.report.skipped.len() < MAX_LISTED {
                    self.report.skipped.push(EntryError::new(path, why));
                }
            }
        }
        // A directory's own entry is compared among its parent's children; the root's here.
        let side = |u: Option<Unit>| match u {
            Some(u) => {
                let mut entries = Vec::with_capacity(u.entries.len() + 1);
                if at_root {
                    entries.push(u.dir);
                }
                entries.extend(u.entries);
                let mut specials = u.specials;
                specials.sort_by(|a, b| a.path.cmp(&b.path));
                Manifest {
                    entries,
                    errors: u.errors,
                    specials,
                }
            }
            None => Manifest::default(),
        };
        let (local, remote) = (side(local), side(remote));
        let part = compare_known(&local, &remote, self.owners, &self.unknown, &mut self.links);
        for m in [&local, &remote] {
            self.unknown.extend(m.errors.iter().map(|e| e.path.clone()));
        }
        self.report.absorb(part);
    }

    pub(crate) fn finish(mut self) -> Report {
        let links = std::mem::take(&mut self.links);
        let mut part = Report::default();
        for d in links.finish(&mut self.report.details) {
            part.metadata_differs.push(d.path.clone());
            part.details.push(d);
        }
        self.report.absorb(part);
        self.report.finish();
        self.report
    }
}

fn compare_entry(x: &Entry, y: &Entry, owners: bool, r: &mut Report, links: &mut Links) {
    let path = x.path.display();
    let mut content = None;
    match (&x.kind, &y.kind) {
        (Kind::File { size: s1, hash: h1 }, Kind::File { size: s2, hash: h2 }) => {
            if s1 != s2 {
                content = Some(format!("size {s1} on the primary, {s2} on the standby"));
            } else if h1 != h2 || h1.is_none() {
                content = Some("content differs (blake3)".into());
            }
        }
        (Kind::Symlink { target: t1 }, Kind::Symlink { target: t2 }) => {
            if t1 != t2 {
                content = Some(format!(
                    "symlink to {} on the primary, to {} on the standby",
                    crate::model::path::escape_bytes(t1),
                    crate::model::path::escape_bytes(t2)
                ));
            }
        }
        (Kind::Dir, Kind::Dir) => {}
        _ => {
            content = Some(format!(
                "{} on the primary, {} on the standby",
                kind_word(x),
                kind_word(y)
            ))
        }
    }
    if let Some(detail) = content {
        r.content_differs.push(path.clone());
        r.details.push(Difference { path, detail });
        return;
    }
    let mut what = Vec::new();
    if !matches!(x.kind, Kind::Symlink { .. }) && x.meta.mode != y.meta.mode {
        what.push(format!("mode {:o} vs {:o}", x.meta.mode, y.meta.mode));
    }
    if owners && (x.meta.uid, x.meta.gid) != (y.meta.uid, y.meta.gid) {
        what.push(format!(
            "owner {}:{} vs {}:{}",
            x.meta.uid, x.meta.gid, y.meta.uid, y.meta.gid
        ));
    }
    if x.meta.mtime != y.meta.mtime {
        what.push(format!(
            "mtime {}.{:09} vs {}.{:09}",
            x.meta.mtime.sec, x.meta.mtime.nsec, y.meta.mtime.sec, y.meta.mtime.nsec
        ));
    }
    if let (Kind::File { size, .. }, Kind::File { .. }) = (&x.kind, &y.kind)
        && crate::model::holes::denser(*size, x.shape.blocks, y.shape.blocks)
    {
        what.push(format!(
            "sparse on the primary ({} allocated), dense on the standby ({} allocated, \
             more than the primary's by over {})",
            crate::model::status::human_bytes(x.shape.blocks.saturating_mul(512)),
            crate::model::status::human_bytes(y.shape.blocks.saturating_mul(512)),
            crate::model::status::human_bytes(crate::model::holes::slack(
                x.shape.blocks.saturating_mul(512)
            )),
        ));
    }
    if x.meta.xattrs != y.meta.xattrs {
        let none = crate::model::xattrs::Sum::default();
        what.push(
            match (x.meta.xattrs == none, y.meta.xattrs == none) {
                (false, true) => "extended attributes or ACL missing on the standby",
                (true, false) => "extended attributes or ACL only on the standby",
                _ => "extended attributes or ACL differ",
            }
            .to_string(),
        );
    }
    let listed = !what.is_empty();
    links.note(x, y, listed);
    if listed {
        r.metadata_differs.push(path.clone());
        r.details.push(Difference {
            path,
            detail: what.join(", "),
        });
    }
}

/// Keeps only the differences of `first` that `second` (a re-check of those paths) still
/// shows: the others were changes caught in flight.
pub(crate) fn persisting(mut first: Report, second: &Report) -> Report {
    first.count_at_least_lists();
    let keep = |l: Vec<String>, again: &Vec<String>| -> Vec<String> {
        l.into_iter().filter(|p| again.contains(p)).collect()
    };
    // Differences beyond the lists were not checked again: they still count.
    let gone = |a: &Vec<String>, b: &Vec<String>| (a.len() - b.len()) as u64;
    let missing = keep(first.missing.clone(), &second.missing);
    let extra = keep(first.extra.clone(), &second.extra);
    let content_differs = keep(first.content_differs.clone(), &second.content_differs);
    let metadata_differs = keep(first.metadata_differs.clone(), &second.metadata_differs);
    let mut r = Report {
        missing_count: first.missing_count - gone(&first.missing, &missing),
        extra_count: first.extra_count - gone(&first.extra, &extra),
        content_differs_count: first.content_differs_count
            - gone(&first.content_differs, &content_differs),
        metadata_differs_count: first.metadata_differs_count
            - gone(&first.metadata_differs, &metadata_differs),
        errors_count: first.errors_count,
        missing,
        extra,
        content_differs,
        metadata_differs,
        errors: first.errors,
        skipped: first.skipped,
        skipped_count: first.skipped_count,
        files_checked: first.files_checked,
        bytes_hashed: first.bytes_hashed + second.bytes_hashed,
        elapsed_ms: first.elapsed_ms,
        identical: false,
        capped: false,
        details: Vec::new(),
    };
    let still: BTreeSet<&String> = r
        .missing
        .iter()
        .chain(&r.extra)
        .chain(&r.content_differs)
        .chain(&r.metadata_differs)
        .collect();
    r.details = second
        .details
        .iter()
        .filter(|d| still.contains(&d.path))
        .cloned()
        .collect();
    r.finish();
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::listing::testing::unit;
    use crate::model::manifest::ScanError;

    use crate::model::manifest::testing::{dir, file_with, manifest as m};

    fn file(p: &str, size: u64, h: u8) -> Entry {
        file_with(p, size, 1, Some([h; 32]))
    }

    /// The detail the report gives for `path`.
    fn detail_of(r: &Report, path: &str) -> String {
        r.details
            .iter()
            .find(|d| d.path == path)
            .unwrap()
            .detail
            .clone()
    }

    #[test]
    fn identical_trees() {
        let a = m(vec![dir("d"), file("d/f", 3, 1)]);
        let r = compare(&a, &a.clone(), true);
        assert!(r.identical);
        assert_eq!(r.files_checked, 3);
        assert_eq!(r.bytes_hashed, 6);
        assert_eq!(r.exit_code(), 0);
    }

    #[test]
    fn every_category() {
        let mut chmod = file("chmod", 1, 5);
        chmod.meta.mode = 0o600;
        let a = m(vec![
            file("missing", 1, 1),
            file("flipped", 4, 2),
            chmod,
            dir("typed"),
            file("same", 1, 9),
        ]);
        let b = m(vec![
            file("extra", 1, 1),
            file("flipped", 4, 3),
            file("chmod", 1, 5),
            file("typed", 1, 1),
            file("same", 1, 9),
        ]);
        let r = compare(&a, &b, true);
        assert_eq!(r.missing, ["missing"]);
        assert_eq!(r.extra, ["extra"]);
        assert_eq!(r.content_differs, ["flipped", "typed"]);
        assert_eq!(r.metadata_differs, ["chmod"]);
        assert!(!r.identical);
        assert_eq!(r.exit_code(), 1);
        assert!(
            r.details
                .iter()
                .any(|d| d.path == "chmod" && d.detail.contains("mode 600 vs 644"))
        );
        assert!(
            r.details
                .iter()
                .any(|d| d.path == "typed" && d.detail.contains("a directory on the primary"))
        );
    }

    #[test]
    fn unreadable_entries_are_errors_not_missing() {
        let mut a = m(vec![dir("locked")]);
        a.errors.push(ScanError {
            path: RelPath::new("locked").unwrap(),
            error: "permission denied".into(),
        });
        let b = m(vec![dir("locked"), file("locked/inner", 1, 1)]);
        let r = compare(&a, &b, true);
        assert!(r.extra.is_empty() && r.missing.is_empty());
        assert_eq!(r.errors.len(), 1);
        assert!(r.errors[0].error.starts_with("primary:"));
        assert!(!r.identical);
    }

    #[test]
    fn the_recheck_drops_changes_caught_in_flight() {
        let a = m(vec![file("busy", 1, 1), file("broken", 1, 1)]);
        let b = m(vec![file("busy", 1, 2), file("broken", 1, 2)]);
        let first = compare(&a, &b, true);
        let a2 = m(vec![file("busy", 1, 3), file("broken", 1, 1)]);
        let b2 = m(vec![file("busy", 1, 3), file("broken", 1, 2)]);
        let r = persisting(first, &compare(&a2, &b2, true));
        assert_eq!(r.content_differs, ["broken"]);
    }

    #[test]
    fn the_streamed_comparison_agrees_with_the_whole_one() {
        let local = vec![
            unit("", vec![dir("a"), file("f", 1, 1), dir("new")]),
            unit("a", vec![file("a/same", 2, 2), file("a/flipped", 2, 2)]),
            unit("new", vec![file("new/x", 1, 1)]),
        ];
        let remote = vec![
            unit("", vec![dir("a"), file("f", 1, 1), dir("old")]),
            unit("a", vec![file("a/same", 2, 2), file("a/flipped", 2, 3)]),
            unit("old", vec![file("old/y", 1, 1)]),
        ];
        let whole = |units: &[Unit]| {
            let mut entries = vec![units[0].dir.clone()];
            for u in units {
                entries.extend(u.entries.iter().cloned());
            }
            m(entries)
        };
        let expected = compare(&whole(&local), &whole(&remote), true);
        let mut c = Comparer::new(true);
        c.step(Some(local[0].clone()), Some(remote[0].clone()));
        c.step(Some(local[1].clone()), Some(remote[1].clone()));
        c.step(Some(local[2].clone()), None);
        c.step(None, Some(remote[2].clone()));
        let got = c.finish();
        assert_eq!(got, expected);
        assert_eq!(got.missing, ["new", "new/x"]);
        assert_eq!(got.extra, ["old", "old/y"]);
        assert_eq!(got.content_differs, ["a/flipped"]);
        assert_eq!(got.files_checked, 7);
    }

    #[test]
    fn a_long_list_is_capped_and_counted() {
        let files: Vec<Entry> = (0..MAX_LISTED + 5)
            .map(|i| file(&format!("f{i:06}"), 1, 1))
            .collect();
        let mut c = Comparer::new(true);
        c.step(Some(unit("", files)), Some(unit("", vec![])));
        let r = c.finish();
        assert_eq!(r.missing.len(), MAX_LISTED);
        assert_eq!(r.missing_count, MAX_LISTED as u64 + 5);
        assert!(r.capped && !r.identical);
        assert_eq!(r.differences(), MAX_LISTED as u64 + 5);
        // A re-check that clears the listed ones leaves the unlisted still counted.
        let again = persisting(r, &Report::default());
        assert_eq!((again.missing.len(), again.missing_count), (0, 5));
        assert!(!again.identical);
    }

    #[test]
    fn nothing_beneath_an_unreadable_directory_is_extra_in_later_directories() {
        let mut top = unit("", vec![dir("locked")]);
        top.errors.push(ScanError {
            path: RelPath::new("locked").unwrap(),
            error: "permission denied".into(),
        });
        let mut c = Comparer::new(true);
        c.step(Some(top), Some(unit("", vec![dir("locked")])));
        c.step(None, Some(unit("locked", vec![file("locked/inner", 1, 1)])));
        let r = c.finish();
        assert!(r.extra.is_empty() && r.missing.is_empty());
        assert_eq!(r.errors_count, 1);
    }

    fn linked(path: &str, ino: u64) -> Entry {
        Entry {
            link: Some(LinkKey { dev: 1, ino }),
            ..file(path, 3, 7)
        }
    }

    #[test]
    fn link_groups_are_compared_both_ways() {
        // Split on the standby: a, b, c one inode on the primary; c apart on the standby.
        let a = m(vec![
            linked("a", 1),
            linked("b", 1),
            linked("c", 1),
            file("d", 3, 7),
            file("e", 3, 7),
        ]);
        let b = m(vec![
            linked("a", 9),
            linked("b", 9),
            file("c", 3, 7),
            linked("d", 8),
            linked("e", 8),
        ]);
        let r = compare(&a, &b, true);
        // Joined on the standby: d and e, separate on the primary.
        assert_eq!(r.metadata_differs, ["a", "b", "c", "d", "e"], "{r:?}");
        let detail = |p: &str| detail_of(&r, p);
        assert!(
            detail("c").contains(
                "on the primary it is one file with a, b; on the standby with no other name"
            ),
            "{}",
            detail("c")
        );
        assert!(
            detail("d").contains(
                "on the primary it is one file with no other name; on the standby with e"
            ),
            "{}",
            detail("d")
        );
        assert!(r.content_differs.is_empty() && r.missing.is_empty() && r.extra.is_empty());
        // The same groups under other inode numbers: identical.
        let same = m(vec![
            linked("a", 5),
            linked("b", 5),
            linked("c", 5),
            file("d", 3, 7),
            file("e", 3, 7),
        ]);
        assert!(compare(&a, &same, true).identical);
        // A name missing on the standby is missing, not a link difference of the others.
        let fewer = m(vec![
            linked("a", 5),
            linked("b", 5),
            file("d", 3, 7),
            file("e", 3, 7),
        ]);
        let r = compare(&a, &fewer, true);
        assert_eq!(
            (r.missing.clone(), r.metadata_differs.len()),
            (vec!["c".to_string()], 0),
            "{r:?}"
        );
    }

    #[test]
    fn the_streamed_comparison_sees_links_across_directories() {
        let local = [
            unit("", vec![dir("B"), linked("sl", 1)]),
            unit("B", vec![linked("B/sl3", 1)]),
        ];
        let remote = [
            unit("", vec![dir("B"), file("sl", 3, 7)]),
            unit("B", vec![file("B/sl3", 3, 7)]),
        ];
        let mut c = Comparer::new(true);
        c.step(Some(local[0].clone()), Some(remote[0].clone()));
        c.step(Some(local[1].clone()), Some(remote[1].clone()));
        let r = c.finish();
        assert_eq!(r.metadata_differs, ["B/sl3", "sl"]);
        assert_eq!(r.metadata_differs_count, 2);
        assert!(!r.identical);
    }

    #[test]
    fn a_special_file_only_on_the_standby_is_extra() {
        use crate::model::manifest::{Special, SpecialKind};
        let sp = |p: &str, kind| Special {
            path: RelPath::new(p).unwrap(),
            kind,
            rdev: 0,
        };
        let mut a = m(vec![file("f", 1, 1)]);
        a.specials = vec![
            sp("same", SpecialKind::Fifo),
            sp("other", SpecialKind::Socket),
        ];
        let mut b = m(vec![]);
        b.specials = vec![
            sp("f", SpecialKind::Fifo),
            sp("other", SpecialKind::Fifo),
            sp("p", SpecialKind::Fifo),
            sp("same", SpecialKind::Fifo),
        ];
        a.sort();
        b.sort();
        let r = compare(&a, &b, true);
        assert_eq!(r.extra, ["other", "p"]);
        assert_eq!(r.content_differs, ["f"]);
        assert!(r.missing.is_empty());
        let detail = |p: &str| detail_of(&r, p);
        assert_eq!(detail("f"), "a file on the primary, a fifo on the standby");
        assert!(detail("p").starts_with("a fifo"), "{}", detail("p"));
    }

    #[test]
    fn a_dense_copy_of_a_sparse_file_is_a_metadata_difference() {
        let size = 8 << 20;
        let img = |blocks| Entry {
            shape: crate::model::manifest::Shape { nlink: 1, blocks },
            ..file("img", size, 4)
        };
        let r = compare(&m(vec![img(1024)]), &m(vec![img(size / 512)]), true);
        assert_eq!(r.metadata_differs, ["img"]);
        assert!(
            r.details[0].detail.starts_with("sparse on the primary (512.0 KiB allocated), dense on the standby (8.0 MiB allocated"),
            "{}",
            r.details[0].detail
        );
        // Rounding between filesystems, or a standby that did not say: not a difference.
        assert!(compare(&m(vec![img(1024)]), &m(vec![img(1024 + 64)]), true).identical);
        assert!(compare(&m(vec![img(1024)]), &m(vec![img(0)]), true).identical);
        // A dense file on the primary is no sparse file made dense.
        assert!(
            compare(
                &m(vec![img(size / 512)]),
                &m(vec![img(size / 512 + 8)]),
                true
            )
            .identical
        );
    }

    #[test]
    fn report_paths_round_trip() {
        for raw in [
            &b"plain"[..],
            b"new\nline",
            b"\xff\xfe",
            b"back\\slash",
            b"",
        ] {
            let p = RelPath::new(raw.to_vec()).unwrap();
            assert_eq!(unescape(&p.display()), Some(p));
        }
    }
}
