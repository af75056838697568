//! A tree walked one directory at a time, in an order both sides can reproduce, so a
//! primary and a standby can stream their listings side by side and compare them as they
//! go: neither ever holds the whole tree's manifest, only its current directories.
//!
//! The order is depth first, each directory's names sorted by their bytes: a directory's
//! [`Unit`] (its own entry and its children) comes before the units of its subdirectories,
//! and `walk_cmp` is that order on paths.

use crate::model::listing::Unit;
use crate::model::manifest::{Entry, ScanError, Scope, normalize_scopes};
use crate::model::path::{RESERVED, RelPath, is_temp_name};
use crate::tree::fsroot::Root;
use crate::tree::scan::{Found, ScanOptions, hash_in_place, is_absent, open_child_dir, stat_entry};
use rustix::fs::AtFlags;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

/// The part of a tree a walk covers: whole subtrees (`Scope::Tree`) and single entries
/// (`Scope::Entry`), with the directories leading to them. A directory inside a whole
/// subtree is listed; one that only leads somewhere holds just the names that lead on,
/// looked up one by one, so a scope deep in a huge directory costs a few lookups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scopes {
    /// Normalized: sorted by path, nothing inside a listed subtree.
    scopes: Vec<(RelPath, Scope)>,
}

impl Scopes {
    pub(crate) fn new(scopes: &[(RelPath, Scope)]) -> Scopes {
        Scopes {
            scopes: normalize_scopes(scopes),
        }
    }

    /// The whole tree.
    pub(crate) fn all() -> Scopes {
        Scopes {
            scopes: vec![(RelPath::root(), Scope::Tree)],
        }
    }

    pub(crate) fn is_all(&self) -> bool {
        self.scopes == [(RelPath::root(), Scope::Tree)]
    }

    pub(crate) fn as_slice(&self) -> &[(RelPath, Scope)] {
        &self.scopes
    }

    /// True when everything in `dir` is covered: it lies in a whole subtree.
    pub(crate) fn lists(&self, dir: &RelPath) -> bool {
        if self.is_all() {
            return true;
        }
        let mut q = dir.clone();
        loop {
            let found = self.scopes.binary_search_by(|(p, _)| p.cmp(&q));
            if found.is_ok_and(|i| self.scopes[i].1 == Scope::Tree) {
                return true;
            }
            if q.is_root() {
                return false;
            }
            q = q.split().0;
        }
    }

    /// The scopes strictly beneath `dir`: in byte order, the paths starting `dir/` are
    /// contiguous.
    fn beneath(&self, dir: &RelPath) -> &[(RelPath, Scope)] {
        let mut prefix = dir.as_bytes().to_vec();
        if !dir.is_root() {
            prefix.push(b'/');
        }
        let start = self.scopes.partition_point(|(p, _)| {
            p.as_bytes() < prefix.as_slice() || (dir.is_root() && p.is_root())
        });
        let len = self.scopes[start..]
            .iter()
            .take_while(|(p, _)| p.as_bytes().starts_with(&prefix))
            .count();
        &self.scopes[start..start + len]
    }

    /// The names in `dir` that are covered or lead to something covered, sorted: what a
    /// directory that [`Scopes::lists`] does not list holds.
    pub(crate) fn names_in(&self, dir: &RelPath) -> Vec<Vec<u8>> {
        let skip = if dir.is_root() {
            0
        } else {
            dir.as_bytes().len() + 1
        };
        let mut out: Vec<Vec<u8>> = self
            .beneath(dir)
            .iter()
            .map(|(p, _)| {
                let rest = &p.as_bytes()[skip..];
                let end = rest.iter().position(|&b| b == b'/').unwrap_or(rest.len());
                rest[..end].to_vec()
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// True when the walk goes into the directory `dir` (one its parent holds): it is
    /// covered whole, or leads to something covered.
    pub(crate) fn enters(&self, dir: &RelPath) -> bool {
        self.lists(dir) || !self.beneath(dir).is_empty()
    }

    /// True when `path` belongs in its parent's unit.
    pub(crate) fn holds(&self, path: &RelPath) -> bool {
        path.is_root()
            || self.lists(&path.split().0)
            || self.scopes.binary_search_by(|(p, _)| p.cmp(path)).is_ok()
            || !self.beneath(path).is_empty()
    }
}

/// What a walk waits on before it reads a directory: a watcher still setting up its watches,
/// so that every directory the walk reads is already watched and no change made after the
/// read goes unseen.
pub trait Gate: Send + Sync {
    /// Returns once changes in `dir` are watched (or never will be: the watcher stopped).
    fn wait_for(&self, dir: &RelPath);
    /// Returns once every directory that was there when the watcher started is watched.
    fn wait_all(&self);
}

struct Frame {
    fd: OwnedFd,
    /// Subdirectories still to walk, last first.
    subdirs: Vec<Entry>,
}

/// Walks a tree (or the part [`Scopes`] cover) one [`Unit`] at a time. It holds open only
/// the directories on the path from the root to where it is, and the names of their
/// subdirectories still to visit.
pub(crate) struct Walker<'r> {
    root: &'r Root,
    opts: ScanOptions,
    scopes: Scopes,
    gate: Option<Arc<dyn Gate>>,
    stack: Vec<Frame>,
    started: bool,
    /// Leftover temporary files removed so far (when `remove_temps`).
    pub temps_removed: u64,
    /// Bytes read to hash content so far.
    pub bytes_hashed: u64,
}

impl<'r> Walker<'r> {
    #[cfg(test)]
    /// A walk of the whole tree.
    pub(crate) fn new(root: &'r Root, opts: ScanOptions) -> Walker<'r> {
        Walker::scoped(root, opts, Scopes::all(), None)
    }

    /// A walk of what `scopes` cover, reading each directory only once `gate` lets it.
    pub(crate) fn scoped(
        root: &'r Root,
        opts: ScanOptions,
        scopes: Scopes,
        gate: Option<Arc<dyn Gate>>,
    ) -> Walker<'r> {
        Walker {
            root,
            opts,
            scopes,
            gate,
            stack: Vec::new(),
            started: false,
            temps_removed: 0,
            bytes_hashed: 0,
        }
    }

    /// The next directory, or `None` at the end.
    ///
    /// # Errors
    /// Only a failure to read the root itself; any other directory that cannot be read
    /// is a unit carrying the error.
    pub(crate) fn next_unit(&mut self) -> io::Result<Option<Unit>> {
        if !self.started {
            self.started = true;
            if let Some(g) = &self.gate {
                g.wait_for(&RelPath::root());
            }
            let fd = self.root.open_dir(&RelPath::root())?;
            let dir = crate::tree::scan::root_entry(fd.as_fd(), &self.opts)?;
            let names = self.names(fd.as_fd(), &dir.path)?;
            return Ok(Some(self.read(fd, dir, names)));
        }
        loop {
            let Some(top) = self.stack.last_mut() else {
                return Ok(None);
            };
            let Some(dir) = top.subdirs.pop() else {
                self.stack.pop();
                continue;
            };
            let failed = |dir: Entry, what: &str, e: io::Error| Unit {
                errors: vec![ScanError {
                    path: dir.path.clone(),
                    error: format!("cannot {what} directory: {e}"),
                }],
                dir,
                entries: Vec::new(),
                specials: Vec::new(),
                skipped: Vec::new(),
            };
            if let Some(g) = &self.gate {
                g.wait_for(&dir.path);
            }
            let fd = match open_child_dir(top.fd.as_fd(), dir.path.name()) {
                Ok(fd) => fd,
                // Gone (or replaced by something else) since its parent was listed.
                Err(e) if is_absent(&e) => continue,
                Err(e) => return Ok(Some(failed(dir, "open", e))),
            };
            match self.names(fd.as_fd(), &dir.path) {
                Ok(names) => return Ok(Some(self.read(fd, dir, names))),
                Err(e) => return Ok(Some(failed(dir, "list", e))),
            }
        }
    }

    /// The next units holding at least `min_entries` entries between them (fewer only at
    /// the end), with content hashed when the options ask for it; `None` at the end.
    ///
    /// # Errors
    /// As [`Walker::next_unit`].
    pub(crate) fn next_batch(&mut self, min_entries: usize) -> io::Result<Option<Vec<Unit>>> {
        let mut units = Vec::new();
        let mut n = 0;
        while n < min_entries {
            match self.next_unit()? {
                Some(u) => {
                    n += u.entries.len() + 1;
                    units.push(u);
                }
                None => break,
            }
        }
        if units.is_empty() {
            return Ok(None);
        }
        if self.opts.checksum {
            self.hash(&mut units);
        }
        Ok(Some(units))
    }

    /// Hashes the batch's files together, so small directories still keep every core busy.
    fn hash(&mut self, units: &mut [Unit]) {
        let mut all = Vec::new();
        let mut lens = Vec::with_capacity(units.len());
        for u in units.iter_mut() {
            lens.push(u.entries.len());
            all.append(&mut u.entries);
        }
        let (bytes, mut failed) = hash_in_place(self.root, &mut all, self.opts.hash_rate);
        failed.sort_by_key(|(i, _)| *i);
        self.bytes_hashed += bytes;
        let mut failed = failed.into_iter().peekable();
        let mut all = all.into_iter().enumerate();
        for (u, len) in units.iter_mut().zip(lens) {
            for (i, e) in all.by_ref().take(len) {
                match failed.next_if(|(f, _)| *f == i) {
                    Some((_, err)) => u.errors.push(err),
                    None => u.entries.push(e),
                }
            }
        }
    }

    /// The names to look at in `dir`: all it holds, or only those the scopes lead to.
    fn names(&self, fd: std::os::fd::BorrowedFd<'_>, dir: &RelPath) -> io::Result<Vec<Vec<u8>>> {
        if self.scopes.lists(dir) {
            crate::tree::fsroot::list_dir(fd)
        } else {
            Ok(self.scopes.names_in(dir))
        }
    }

    /// Reads the directory `dir` (open as `fd`, holding `names`) into a unit, and makes it
    /// the place the walk goes on from.
    fn read(&mut self, fd: OwnedFd, dir: Entry, mut names: Vec<Vec<u8>>) -> Unit {
        names.sort_unstable();
        let mut unit = Unit {
            dir,
            entries: Vec::with_capacity(names.len()),
            errors: Vec::new(),
            specials: Vec::new(),
            skipped: Vec::new(),
        };
        for name in names {
            if let Some(skipped) = crate::tree::scan::reserved_name(
                fd.as_fd(),
                &unit.dir.path,
                &name,
                &self.opts,
                &mut self.temps_removed,
            ) {
                unit.skipped.extend(skipped);
                continue;
            }
            let path = match unit.dir.path.join(&name) {
                Ok(p) => p,
                Err(e) => {
                    unit.errors.push(ScanError {
                        path: unit.dir.path.clone(),
                        error: crate::model::path::unmirrorable(&unit.dir.path, &name, &e),
                    });
                    continue;
                }
            };
            match stat_entry(fd.as_fd(), &name, &path, &self.opts) {
                Found::Entry(e) => unit.entries.push(e),
                Found::Nothing => {}
                Found::Special(s) => unit.specials.push(s),
                Found::Error(e) => unit.errors.push(e),
            }
        }
        let subdirs = unit
            .entries
            .iter()
            .rev()
            .filter(|e| e.is_dir() && self.scopes.enters(&e.path))
            .cloned()
            .collect();
        self.stack.push(Frame { fd, subdirs });
        unit
    }
}

/// Finds every name in the tree of the inodes `wanted`: the other names of a file or
/// symlink with several names, which no event told of (`ln a b` shows only `b`). It reads
/// directories and looks closer only at names whose inode number matches (a directory
/// entry carries it), so it costs about a listing of the tree, never its content; it
/// holds only the directories on its path. It skips what a walk skips (the reserved name
/// at the root, temporary names, excluded entries) and follows no symlink.
///
/// # Errors
/// Only a failure to read the root; a directory that cannot be read is passed over (its
/// names stay unknown, which costs a link made as a copy, never a wrong one).
pub(crate) fn find_names(
    root: &Root,
    filter: &crate::model::filter::Filter,
    wanted: &std::collections::HashSet<crate::model::manifest::LinkKey>,
) -> io::Result<std::collections::HashMap<crate::model::manifest::LinkKey, Vec<RelPath>>> {
    use rustix::fs::FileType;
    let mut found: std::collections::HashMap<crate::model::manifest::LinkKey, Vec<RelPath>> =
        Default::default();
    if wanted.is_empty() {
        return Ok(found);
    }
    let inos: std::collections::HashSet<u64> = wanted.iter().map(|k| k.ino).collect();
    let mut stack: Vec<(OwnedFd, RelPath)> =
        vec![(root.open_dir(&RelPath::root())?, RelPath::root())];
    while let Some((fd, dir)) = stack.pop() {
        let listing = rustix::fs::openat(
            &fd,
            c".",
            rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .and_then(rustix::fs::Dir::new);
        let mut d = match listing {
            Ok(d) => d,
            Err(e) if dir.is_root() => return Err(e.into()),
            Err(_) => continue,
        };
        while let Some(ent) = d.read() {
            let Ok(ent) = ent else { break };
            let name = ent.file_name().to_bytes();
            if name == b"." || name == b".." || (dir.is_root() && name == RESERVED) {
                continue;
            }
            if is_temp_name(name) {
                continue;
            }
            let Ok(path) = dir.join(name) else { continue };
            let mut ft = ent.file_type();
            let mut st = None;
            if inos.contains(&ent.ino()) || ft == FileType::Unknown {
                let Ok(s) = rustix::fs::statat(&fd, name, AtFlags::SYMLINK_NOFOLLOW) else {
                    continue;
                };
                ft = FileType::from_raw_mode(s.st_mode);
                st = Some(s);
            }
            if ft == FileType::Directory {
                if !filter.excludes(&path, true)
                    && let Ok(sub) = open_child_dir(fd.as_fd(), name)
                {
                    stack.push((sub, path));
                }
                continue;
            }
            if let Some(st) = st
                && let Some(key) = crate::tree::fsroot::link_key(&st)
                && wanted.contains(&key)
                && !filter.excludes(&path, false)
            {
                found.entry(key).or_default().push(path);
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::listing::walk_cmp;
    use crate::model::manifest::Kind;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn walk_order_puts_a_directory_before_its_contents_and_its_contents_together() {
        let mut v = [
            p("a0"),
            p("a-b"),
            p("a/x"),
            p("a"),
            p(""),
            p("a/x/y"),
            p("b"),
        ];
        v.sort_by(walk_cmp);
        let s: Vec<&[u8]> = v.iter().map(|p| p.as_bytes()).collect();
        assert_eq!(
            s,
            [&b""[..], b"a", b"a/x", b"a/x/y", b"a-b", b"a0", b"b"].to_vec()
        );
    }

    #[test]
    fn units_come_in_walk_order_with_sorted_children() {
        let t = tempfile::tempdir().unwrap();
        for d in ["a", "a/x", "a-b", "b", ".hotsync"] {
            std::fs::create_dir(t.path().join(d)).unwrap();
        }
        for f in ["a/f", "a-b/g", "z", "a/x/h", "b/.hotsync"] {
            std::fs::write(t.path().join(f), b"1").unwrap();
        }
        std::fs::write(t.path().join("a/.hotsync-tmp.0123456789abcdef"), b"t").unwrap();
        let root = Root::open(t.path()).unwrap();
        let mut w = Walker::new(
            &root,
            ScanOptions {
                checksum: true,
                remove_temps: true,
                ..Default::default()
            },
        );
        let units = w.next_batch(usize::MAX).unwrap().unwrap();
        let dirs: Vec<&[u8]> = units.iter().map(|u| u.dir.path.as_bytes()).collect();
        assert_eq!(dirs, [&b""[..], b"a", b"a/x", b"a-b", b"b"].to_vec());
        let names = |u: &Unit| -> Vec<Vec<u8>> {
            u.entries
                .iter()
                .map(|e| e.path.as_bytes().to_vec())
                .collect()
        };
        assert_eq!(
            names(&units[0]),
            [b"a".to_vec(), b"a-b".to_vec(), b"b".to_vec(), b"z".to_vec()]
        );
        assert_eq!(names(&units[1]), [b"a/f".to_vec(), b"a/x".to_vec()]);
        // The reserved name is reserved at the root only.
        assert_eq!(names(&units[4]), [b"b/.hotsync".to_vec()]);
        assert!(matches!(
            units[1].entries[0].kind,
            Kind::File { hash: Some(_), .. }
        ));
        assert_eq!(w.temps_removed, 1);
        assert!(w.next_unit().unwrap().is_none());
    }

    fn scopes(list: &[(&str, Scope)]) -> Scopes {
        let v: Vec<(RelPath, Scope)> = list.iter().map(|(s, sc)| (p(s), *sc)).collect();
        Scopes::new(&v)
    }

    #[test]
    fn scopes_cover_subtrees_entries_and_the_way_to_them() {
        let s = scopes(&[
            ("a/b", Scope::Tree),
            ("a/b/c", Scope::Entry), // inside a subtree: dropped
            ("a-z/f", Scope::Entry),
            ("m", Scope::Entry),
            ("m/n/o", Scope::Entry),
        ]);
        assert!(!s.is_all());
        assert!(s.lists(&p("a/b")) && s.lists(&p("a/b/x/y")));
        assert!(!s.lists(&p("")) && !s.lists(&p("a")) && !s.lists(&p("a-z")));
        assert_eq!(
            s.names_in(&p("")),
            [b"a".to_vec(), b"a-z".to_vec(), b"m".to_vec()]
        );
        assert_eq!(s.names_in(&p("a")), [b"b".to_vec()]);
        assert_eq!(s.names_in(&p("m")), [b"n".to_vec()]);
        assert!(s.names_in(&p("a/b/x")).is_empty());
        // Entered: subtrees, and directories that lead on; not an entry scope alone.
        assert!(s.enters(&p("a")) && s.enters(&p("a/b")) && s.enters(&p("a/b/x")));
        assert!(s.enters(&p("m")) && s.enters(&p("m/n")));
        assert!(!s.enters(&p("m/n/o")) && !s.enters(&p("b")) && !s.enters(&p("a-z/f")));
        for held in [
            "a",
            "a/b",
            "a/b/anything",
            "a-z",
            "a-z/f",
            "m",
            "m/n",
            "m/n/o",
        ] {
            assert!(s.holds(&p(held)), "{held}");
        }
        for not in ["b", "a/c", "a-z/g", "m/x", "m/n/p", "a-"] {
            assert!(!s.holds(&p(not)), "{not}");
        }
        let all = Scopes::all();
        assert!(all.is_all() && all.lists(&p("")) && all.holds(&p("x/y")));
    }

    #[test]
    fn a_scoped_walk_reads_only_what_its_scopes_cover() {
        let t = tempfile::tempdir().unwrap();
        for d in ["big", "big/sub", "keep", "keep/inner", "deep", "deep/er"] {
            std::fs::create_dir(t.path().join(d)).unwrap();
        }
        for f in [
            "big/x",
            "big/sub/y",
            "keep/k",
            "keep/inner/i",
            "deep/er/f",
            "top",
        ] {
            std::fs::write(t.path().join(f), b"1").unwrap();
        }
        let root = Root::open(t.path()).unwrap();
        let s = scopes(&[
            ("big", Scope::Tree),
            ("deep/er/f", Scope::Entry),
            ("deep/er/gone", Scope::Entry),
        ]);
        let mut w = Walker::scoped(&root, ScanOptions::default(), s, None);
        let units = w.next_batch(usize::MAX).unwrap().unwrap();
        let got: Vec<(String, Vec<String>)> = units
            .iter()
            .map(|u| {
                let names = u.entries.iter().map(|e| e.path.to_string()).collect();
                (u.dir.path.to_string(), names)
            })
            .collect();
        let want = [
            (".", vec!["big", "deep"]),
            ("big", vec!["big/sub", "big/x"]),
            ("big/sub", vec!["big/sub/y"]),
            ("deep", vec!["deep/er"]),
            ("deep/er", vec!["deep/er/f"]),
        ];
        let want: Vec<(String, Vec<String>)> = want
            .iter()
            .map(|(d, n)| (d.to_string(), n.iter().map(|s| s.to_string()).collect()))
            .collect();
        assert_eq!(got, want);
    }

    /// A gate that records what the walk asks it.
    struct Recording(std::sync::Mutex<Vec<String>>);

    impl Gate for Recording {
        fn wait_for(&self, dir: &RelPath) {
            self.0.lock().unwrap().push(dir.to_string());
        }
        fn wait_all(&self) {}
    }

    #[test]
    fn every_name_of_a_wanted_inode_is_found_and_nothing_else() {
        let t = tempfile::tempdir().unwrap();
        for d in ["a", "a/b", "skip", ".hotsync"] {
            std::fs::create_dir(t.path().join(d)).unwrap();
        }
        std::fs::write(t.path().join("f"), b"1").unwrap();
        for l in [
            "a/f2",
            "a/b/f3",
            "skip/f4",
            ".hotsync/f5",
            "a/.hotsync-tmp.0123456789abcdef",
        ] {
            std::fs::hard_link(t.path().join("f"), t.path().join(l)).unwrap();
        }
        std::fs::write(t.path().join("other"), b"2").unwrap();
        std::os::unix::fs::symlink("f", t.path().join("sl")).unwrap();
        rustix::fs::linkat(
            rustix::fs::CWD,
            t.path().join("sl").as_path(),
            rustix::fs::CWD,
            t.path().join("a/sl2").as_path(),
            AtFlags::empty(),
        )
        .unwrap();
        let root = Root::open(t.path()).unwrap();
        let key = |p: &str| {
            let st = root.stat(&RelPath::new(p).unwrap()).unwrap();
            crate::tree::fsroot::link_key(&st).unwrap()
        };
        let (file, link) = (key("f"), key("sl"));
        let filter = crate::model::filter::Filter::new(&["skip/".to_string()]).unwrap();
        let found = find_names(&root, &filter, &[file, link].into()).unwrap();
        let mut names: Vec<String> = found[&file].iter().map(|p| p.to_string()).collect();
        names.sort();
        assert_eq!(names, ["a/b/f3", "a/f2", "f"]);
        let names: Vec<String> = found[&link].iter().map(|p| p.to_string()).collect();
        assert_eq!(names.len(), 2);
        assert!(names.contains(&"sl".to_string()) && names.contains(&"a/sl2".to_string()));
    }

    #[test]
    fn a_walk_asks_its_gate_before_every_directory_it_reads() {
        let t = tempfile::tempdir().unwrap();
        for d in ["a", "a/x", "b"] {
            std::fs::create_dir(t.path().join(d)).unwrap();
        }
        let root = Root::open(t.path()).unwrap();
        let gate = Arc::new(Recording(Default::default()));
        let mut w = Walker::scoped(
            &root,
            ScanOptions::default(),
            Scopes::all(),
            Some(gate.clone()),
        );
        while w.next_unit().unwrap().is_some() {}
        assert_eq!(*gate.0.lock().unwrap(), [".", "a", "a/x", "b"]);
    }
}
