//! The streamed planner: compares the primary's and the standby's walks one directory at a
//! time ([`crate::tree::walk`]), so a reconcile of millions of files holds only the directories
//! it is comparing. No I/O here: units in, operations out.
//!
//! Each directory is planned with `plan::plan` over its children. What cannot be decided
//! there is carried, in memory that grows only with what it needs:
//! - removals: a standby directory that goes is counted as the rest of its walk streams
//!   in (the mass-delete guard needs the whole count), and its deletion is handed back to
//!   run last, when that count is final;
//! - hard links: only files and symlinks with more than one name are kept, and planned
//!   together at the end, when every name of every inode is known;
//! - directory attributes: one fix per changed directory, to apply after everything else.

use crate::model::listing::{Unit, walk_cmp, walk_key};
use crate::model::manifest::{Entry, Kind, Manifest, Meta, MetaTarget};
use crate::model::path::RelPath;
use crate::model::plan::{self, MetaFix, Plan, PlanOptions};
use std::collections::{BTreeMap, HashMap, HashSet};

/// What one directory's comparison asks for.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Step {
    /// To carry out now: `clear`, `mkdirs`, `transfers`, `symlinks` and `metas` (never links,
    /// deletes or directory attributes).
    pub plan: Plan,
    /// Standby entries to delete last (each with everything beneath it) and how many
    /// entries each removes; only removals whose count is final.
    pub deletes: Vec<(RelPath, u64)>,
    /// Directory attributes to set after everything else.
    pub dir_metas: Vec<MetaFix>,
}

/// Totals over the whole walk, for the summary and the mass-delete guard.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    /// The primary's entries, root excluded.
    pub local_entries: u64,
    pub local_bytes: u64,
    /// The standby's entries, root excluded.
    pub remote_entries: u64,
    /// Standby entries the plan removes, descendants included.
    pub removed_entries: u64,
    /// Of those, the entries the primary lacks (the mass-delete guard's count): not those
    /// replaced by another type.
    pub deleted_entries: u64,
    /// Type changes: standby entries cleared to make way for the primary's (each with what
    /// is beneath it, counted in `cleared_beneath`).
    pub replaced: u64,
    /// Entries beneath cleared paths (the clears themselves count one each as they run).
    pub cleared_beneath: u64,
    /// Primary entries the standby lacked.
    pub added: u64,
}

/// What remains once both walks are over.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Finish {
    /// The files and symlinks with several names, planned together: `clear` (what is in
    /// the way of a name added late), `transfers`, `symlinks`, `metas` and `links`.
    pub plan: Plan,
    pub deletes: Vec<(RelPath, u64)>,
    pub dir_metas: Vec<MetaFix>,
}

/// A standby directory being removed, while its contents still stream in.
struct Removing {
    path: RelPath,
    entries: u64,
    delete: bool,
}

/// The streamed planner's state between directories.
pub(crate) struct Merger {
    opts: PlanOptions,
    /// Keyed in walk order, so the ones the walk has passed come first.
    removing: BTreeMap<Vec<u8>, Removing>,
    linked_local: Vec<Entry>,
    linked_remote: Vec<Entry>,
    /// The attributes of directories holding a file or symlink with several names.
    linked_parents: HashMap<RelPath, Meta>,
    /// Standby entries in the way of names added by [`Merger::add_linked`].
    late_clears: Vec<RelPath>,
    /// The standby's names in `linked_remote` the primary lacks that are removed (with
    /// their directory, or by themselves): the others' inodes are not theirs alone.
    removed_linked: HashSet<RelPath>,
    last: Option<RelPath>,
    pub counts: Counts,
}

/// Which walk's next unit comes first: the primary's, the standby's, or both (the same
/// directory). `None` when both walks are over.
pub(crate) fn next_side(local: Option<&RelPath>, remote: Option<&RelPath>) -> Option<Side> {
    match (local, remote) {
        (None, None) => None,
        (Some(_), None) => Some(Side::Local),
        (None, Some(_)) => Some(Side::Remote),
        (Some(l), Some(r)) => Some(match walk_cmp(l, r) {
            std::cmp::Ordering::Less => Side::Local,
            std::cmp::Ordering::Greater => Side::Remote,
            std::cmp::Ordering::Equal => Side::Both,
        }),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Local,
    Remote,
    Both,
}

/// A file or symlink with more than one name: planned with its inode's other names.
fn is_linked(e: &Entry) -> bool {
    linkable(e) && e.link.is_some()
}

/// A file or a symlink: what can have several names.
fn linkable(e: &Entry) -> bool {
    matches!(e.kind, Kind::File { .. } | Kind::Symlink { .. })
}

impl Merger {
    pub(crate) fn new(opts: PlanOptions) -> Merger {
        Merger {
            opts,
            removing: BTreeMap::new(),
            linked_local: Vec::new(),
            linked_remote: Vec::new(),
            linked_parents: HashMap::new(),
            late_clears: Vec::new(),
            removed_linked: HashSet::new(),
            last: None,
            counts: Counts::default(),
        }
    }

    /// Plans one directory: the primary's unit, the standby's, or both (the same
    /// directory). Units must come in walk order.
    ///
    /// # Panics
    /// If neither is given, or two are given for different directories.
    pub(crate) fn step(&mut self, local: Option<Unit>, remote: Option<Unit>) -> Step {
        let at = match (&local, &remote) {
            (Some(l), Some(r)) => {
                assert_eq!(l.dir.path, r.dir.path, "units of different directories");
                l.dir.path.clone()
            }
            (Some(u), None) | (None, Some(u)) => u.dir.path.clone(),
            (None, None) => panic!("a step needs a unit"),
        };
        debug_assert!(self.last.as_ref().is_none_or(|l| walk_cmp(l, &at).is_lt()));
        let mut step = Step {
            deletes: self.passed(&at),
            ..Step::default()
        };
        self.last = Some(at);
        match (local, remote) {
            (Some(l), r) => self.compare(l, r, &mut step),
            (None, Some(r)) => {
                // A directory the primary does not have: its contents (special files among
                // them) go with it, if it goes.
                let n = (r.entries.len() + r.specials.len()) as u64;
                self.counts.remote_entries += n;
                let removed = match self.removing_above(&r.dir.path) {
                    Some(top) => {
                        top.entries += n;
                        let delete = top.delete;
                        self.counts.removed_entries += n;
                        if delete {
                            self.counts.deleted_entries += n;
                        } else {
                            self.counts.cleared_beneath += n;
                        }
                        true
                    }
                    None => false,
                };
                for re in r.entries.into_iter().filter(is_linked) {
                    if removed {
                        self.removed_linked.insert(re.path.clone());
                    }
                    self.linked_remote.push(re);
                }
            }
            (None, None) => unreachable!(),
        }
        step
    }

    /// The primary's files and symlinks with several names seen so far.
    pub(crate) fn linked_local(&self) -> &[Entry] {
        &self.linked_local
    }

    /// Adds names of the primary's inodes with several names that the walk did not cover
    /// (a watch's batch covers only what changed): `local`, each a file or symlink with its
    /// link key, and the standby's entries at those paths, `remote`; each with its parent
    /// directories. They are planned with the others when the walk ends.
    pub(crate) fn add_linked(&mut self, local: Manifest, remote: Manifest) {
        let mut remote_at: HashMap<RelPath, Entry> = remote
            .entries
            .into_iter()
            .map(|e| (e.path.clone(), e))
            .collect();
        let mut have_local: HashSet<RelPath> =
            self.linked_local.iter().map(|e| e.path.clone()).collect();
        let have_remote: HashSet<RelPath> =
            self.linked_remote.iter().map(|e| e.path.clone()).collect();
        for le in local.entries {
            if le.is_dir() {
                self.linked_parents
                    .entry(le.path.clone())
                    .or_insert(le.meta);
                continue;
            }
            if !is_linked(&le) || !have_local.insert(le.path.clone()) {
                continue;
            }
            match remote_at.remove(&le.path) {
                Some(re) if re.is_dir() => {
                    self.late_clears.push(re.path);
                    self.counts.removed_entries += 1;
                }
                Some(re) if !have_remote.contains(&re.path) => self.linked_remote.push(re),
                _ => {}
            }
            self.linked_local.push(le);
        }
        for sp in remote.specials {
            if have_local.contains(&sp.path) {
                self.late_clears.push(sp.path);
                self.counts.removed_entries += 1;
            }
        }
    }

    /// Ends the walk: the files and symlinks with several names, and what is left to run
    /// last.
    pub(crate) fn finish(mut self) -> Finish {
        let deletes = self.passed_all();
        let mut local = Manifest {
            entries: std::mem::take(&mut self.linked_local),
            ..Manifest::default()
        };
        let mut remote = Manifest {
            entries: std::mem::take(&mut self.linked_remote),
            ..Manifest::default()
        };
        local.sort();
        remote.sort();
        // Deletions were decided directory by directory; here only what the primary has.
        let removed = std::mem::take(&mut self.removed_linked);
        let mut p = plan::plan_with(
            &local,
            &remote,
            PlanOptions {
                delete: false,
                ..self.opts
            },
            Some(&|n: &RelPath| removed.contains(n)),
        );
        p.clear.append(&mut self.late_clears);
        let mut parents: Vec<RelPath> = p
            .transfers
            .iter()
            .map(|t| t.path.split().0)
            .chain(p.symlinks.iter().map(|l| l.path.split().0))
            .chain(p.links.iter().map(|l| l.path.split().0))
            .chain(p.clear.iter().map(|c| c.split().0))
            .collect();
        parents.sort();
        parents.dedup();
        let dir_metas = parents
            .into_iter()
            .filter_map(|d| {
                let meta = *self.linked_parents.get(&d)?;
                Some(MetaFix {
                    path: d,
                    meta,
                    target: MetaTarget::Dir,
                })
            })
            .collect();
        p.dir_metas.clear();
        Finish {
            plan: p,
            deletes,
            dir_metas,
        }
    }

    /// Removals the walk has passed (their counts are final), in walk order.
    fn passed(&mut self, at: &RelPath) -> Vec<(RelPath, u64)> {
        let key = walk_key(at);
        let mut out = Vec::new();
        while let Some(entry) = self.removing.first_entry() {
            if entry.key() >= &key || at.starts_with(&entry.get().path) {
                break;
            }
            let r = entry.remove();
            if r.delete {
                out.push((r.path, r.entries));
            }
        }
        out
    }

    fn passed_all(&mut self) -> Vec<(RelPath, u64)> {
        std::mem::take(&mut self.removing)
            .into_values()
            .filter(|r| r.delete)
            .map(|r| (r.path, r.entries))
            .collect()
    }

    /// The removal `path` lies in, if any.
    fn removing_above(&mut self, path: &RelPath) -> Option<&mut Removing> {
        let mut p = path.clone();
        loop {
            if self.removing.contains_key(&walk_key(&p)) {
                return self.removing.get_mut(&walk_key(&p));
            }
            if p.is_root() {
                return None;
            }
            p = p.split().0;
        }
    }

    /// Compares a directory of the primary with the standby's (`None`: the standby has no
    /// such directory, it is being made).
    fn compare(&mut self, l: Unit, r: Option<Unit>, step: &mut Step) {
        let dir = l.dir.clone();
        self.counts.local_entries += l.entries.len() as u64;
        self.counts.local_bytes += l.file_bytes();
        let (r_dir, r_entries, r_specials) = match r {
            Some(r) => (Some(r.dir), r.entries, r.specials),
            None => (None, Vec::new(), Vec::new()),
        };
        self.counts.remote_entries += (r_entries.len() + r_specials.len()) as u64;

        // Pair the children by name (both sorted), setting aside the files and symlinks
        // with several names on either side.
        let mut local = Manifest {
            entries: Vec::with_capacity(l.entries.len()),
            errors: l.errors,
            specials: l.specials,
        };
        let mut remote = Manifest {
            entries: Vec::with_capacity(r_entries.len()),
            ..Manifest::default()
        };
        let mut r_specials = r_specials;
        let mut deferred: Vec<RelPath> = Vec::new();
        let mut linked_here = false;
        let mut rs = r_entries.into_iter().peekable();
        for le in l.entries {
            while let Some(re) = rs.next_if(|re| re.path < le.path) {
                self.remote_only_child(re, &mut remote);
            }
            let re = rs.next_if(|re| re.path == le.path);
            if re.is_none() {
                self.counts.added += 1;
            }
            // A standby name of a linked inode is planned with the rest of that inode: a
            // change in place there would reach its other names.
            let defer = is_linked(&le) || (linkable(&le) && re.as_ref().is_some_and(is_linked));
            if !defer {
                local.entries.push(le);
                remote.entries.extend(re);
                continue;
            }
            linked_here = true;
            deferred.push(le.path.clone());
            match re {
                // A directory in the way is cleared here, where its contents are counted.
                Some(re) if re.is_dir() => {
                    step.plan.clear.push(re.path.clone());
                    self.counts.removed_entries += 1;
                    self.counts.replaced += 1;
                    self.start_removing(&re.path, false);
                }
                Some(re) => self.linked_remote.push(re),
                None => {}
            }
            self.linked_local.push(le);
        }
        for re in rs {
            self.remote_only_child(re, &mut remote);
        }
        // A standby special file where a deferred name goes is cleared here; the others are
        // planned with this directory.
        r_specials.sort_by(|a, b| a.path.cmp(&b.path));
        for sp in r_specials {
            if deferred.binary_search(&sp.path).is_ok() {
                step.plan.clear.push(sp.path);
                self.counts.removed_entries += 1;
            } else {
                remote.specials.push(sp);
            }
        }
        local.specials.sort_by(|a, b| a.path.cmp(&b.path));
        if linked_here {
            self.linked_parents.insert(dir.path.clone(), dir.meta);
        }

        let p = plan::plan(&local, &remote, self.opts);
        for path in &p.deletes {
            if remote.get(path).is_some_and(is_linked) {
                self.removed_linked.insert(path.clone());
            }
        }
        for path in &p.clear {
            if remote.get(path).is_some_and(Entry::is_dir) {
                self.start_removing(path, false);
            }
        }
        for path in p.deletes.iter().rev() {
            if remote.get(path).is_some_and(Entry::is_dir) {
                self.start_removing(path, true);
            } else {
                step.deletes.push((path.clone(), 1));
            }
        }
        self.counts.removed_entries += p.removed_entries as u64;
        self.counts.deleted_entries += (p.removed_entries - p.cleared_entries) as u64;
        self.counts.replaced += p.clear.len() as u64;
        let attrs_differ = match &r_dir {
            Some(rd) => plan::meta_differs(&dir.meta, &rd.meta, self.opts.owners, true),
            None => !dir.path.is_root(),
        };
        // Creating or removing a name changes the directory's mtime: set it again after.
        let contents_changed = !p.clear.is_empty()
            || !p.mkdirs.is_empty()
            || !p.transfers.is_empty()
            || !p.symlinks.is_empty()
            || !p.links.is_empty()
            || !p.deletes.is_empty()
            || !step.plan.clear.is_empty();
        if attrs_differ || contents_changed {
            step.dir_metas.push(MetaFix {
                path: dir.path.clone(),
                meta: dir.meta,
                target: MetaTarget::Dir,
            });
        }
        let mut clear = std::mem::take(&mut step.plan.clear);
        clear.extend(p.clear);
        step.plan = Plan {
            clear,
            mkdirs: p.mkdirs,
            transfers: p.transfers,
            symlinks: p.symlinks,
            metas: p.metas,
            remote_entries: p.remote_entries,
            ..Plan::default()
        };
    }

    /// A standby child the primary lacks: planned (deleted) with the others; a file with
    /// several names is also remembered, as its inode's other names may still be wanted.
    fn remote_only_child(&mut self, re: Entry, remote: &mut Manifest) {
        if is_linked(&re) {
            self.linked_remote.push(re.clone());
        }
        remote.entries.push(re);
    }

    fn start_removing(&mut self, path: &RelPath, delete: bool) {
        self.removing.insert(
            walk_key(path),
            Removing {
                path: path.clone(),
                entries: 1,
                delete,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::listing::testing::unit;
    use crate::model::manifest::testing::{dir, file, meta};
    use crate::model::manifest::{LinkKey, ScanError};

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn hard(path: &str, ino: u64) -> Entry {
        Entry {
            link: Some(LinkKey { dev: 1, ino }),
            ..file(path, 3)
        }
    }

    /// Runs both walks through a merger, pairing units as the sender does.
    fn run(local: Vec<Unit>, remote: Vec<Unit>, opts: PlanOptions) -> (Vec<Step>, Finish, Counts) {
        let mut m = Merger::new(opts);
        let (mut l, mut r) = (local.into_iter().peekable(), remote.into_iter().peekable());
        let mut steps = Vec::new();
        while let Some(side) =
            next_side(l.peek().map(|u| &u.dir.path), r.peek().map(|u| &u.dir.path))
        {
            let (lu, ru) = match side {
                Side::Local => (l.next(), None),
                Side::Remote => (None, r.next()),
                Side::Both => (l.next(), r.next()),
            };
            steps.push(m.step(lu, ru));
        }
        let counts = m.counts;
        (steps, m.finish(), counts)
    }

    fn opts() -> PlanOptions {
        PlanOptions {
            checksum: false,
            delete: true,
            owners: false,
        }
    }

    fn paths<'a>(v: impl IntoIterator<Item = &'a RelPath>) -> Vec<&'a str> {
        v.into_iter()
            .map(|p| std::str::from_utf8(p.as_bytes()).unwrap())
            .collect()
    }

    #[test]
    fn equal_trees_need_nothing() {
        let tree = || {
            vec![
                unit("", vec![dir("a"), file("f", 1)]),
                unit("a", vec![file("a/g", 2)]),
            ]
        };
        let (steps, fin, c) = run(tree(), tree(), opts());
        assert!(steps.iter().all(|s| *s
            == Step {
                plan: Plan {
                    remote_entries: s.plan.remote_entries,
                    ..Plan::default()
                },
                ..Step::default()
            }));
        assert_eq!(fin, Finish::default());
        assert_eq!(
            (c.local_entries, c.remote_entries, c.removed_entries),
            (3, 3, 0)
        );
    }

    #[test]
    fn a_new_directory_is_made_filled_and_its_attributes_set_after() {
        let local = vec![
            unit("", vec![dir("a")]),
            unit("a", vec![file("a/f", 1), dir("a/b")]),
            unit("a/b", vec![file("a/b/g", 1)]),
        ];
        let remote = vec![unit("", vec![])];
        let (steps, _, c) = run(local, remote, opts());
        assert_eq!(paths(&steps[0].plan.mkdirs), ["a"]);
        assert_eq!(paths(&steps[1].plan.mkdirs), ["a/b"]);
        assert_eq!(
            paths(steps[1].plan.transfers.iter().map(|t| &t.path)),
            ["a/f"]
        );
        assert_eq!(
            paths(steps[2].plan.transfers.iter().map(|t| &t.path)),
            ["a/b/g"]
        );
        let metas: Vec<&str> = steps
            .iter()
            .flat_map(|s| paths(s.dir_metas.iter().map(|m| &m.path)))
            .collect();
        assert_eq!(metas, ["", "a", "a/b"]);
        assert_eq!(c.added, 4);
    }

    #[test]
    fn a_removed_directory_is_counted_whole_and_deleted_once_the_walk_has_passed_it() {
        let local = vec![unit("", vec![dir("b")]), unit("b", vec![])];
        let remote = vec![
            unit("", vec![dir("a"), dir("b")]),
            unit("a", vec![dir("a/x"), file("a/f", 1)]),
            unit("a/x", vec![file("a/x/g", 1), file("a/x/h", 1)]),
            unit("b", vec![file("b/old", 1)]),
        ];
        let (steps, fin, c) = run(local, remote, opts());
        // Nothing deleted before "a"'s walk is over; then with its five entries.
        assert!(steps[..3].iter().all(|s| s.deletes.is_empty()));
        let all: Vec<(RelPath, u64)> = steps
            .iter()
            .flat_map(|s| s.deletes.clone())
            .chain(fin.deletes)
            .collect();
        assert_eq!(all, vec![(p("a"), 5), (p("b/old"), 1)]);
        assert_eq!((c.removed_entries, c.deleted_entries), (6, 6));
        assert_eq!(c.remote_entries, 7);
    }

    #[test]
    fn without_delete_extras_stay_but_a_type_change_still_clears() {
        let o = PlanOptions {
            delete: false,
            ..opts()
        };
        let local = vec![unit("", vec![file("x", 1)])];
        let remote = vec![
            unit("", vec![dir("extra"), dir("x")]),
            unit("extra", vec![file("extra/f", 1)]),
            unit("x", vec![file("x/f", 1), file("x/g", 1)]),
        ];
        let (steps, fin, c) = run(local, remote, o);
        assert_eq!(paths(&steps[0].plan.clear), ["x"]);
        assert!(steps.iter().all(|s| s.deletes.is_empty()) && fin.deletes.is_empty());
        assert_eq!((c.removed_entries, c.cleared_beneath), (3, 2));
        // A type change is a replacement, not an absence: the guard does not count it.
        assert_eq!((c.deleted_entries, c.replaced), (0, 1));
    }

    #[test]
    fn an_unreadable_primary_directory_protects_the_standby_copy() {
        let mut broken = unit("a", vec![]);
        broken.errors.push(ScanError {
            path: p("a"),
            error: "denied".into(),
        });
        let local = vec![unit("", vec![dir("a")]), broken];
        let remote = vec![
            unit("", vec![dir("a")]),
            unit("a", vec![dir("a/d"), file("a/f", 1)]),
            unit("a/d", vec![file("a/d/g", 1)]),
        ];
        let (steps, fin, c) = run(local, remote, opts());
        assert!(
            steps
                .iter()
                .all(|s| s.deletes.is_empty() && s.plan.is_empty())
        );
        assert!(fin.deletes.is_empty());
        assert_eq!(c.removed_entries, 0);
    }

    #[test]
    fn hard_links_across_directories_are_planned_together_at_the_end() {
        let local = vec![
            unit("", vec![dir("a"), dir("b")]),
            unit("a", vec![hard("a/one", 7)]),
            unit("b", vec![hard("b/two", 7)]),
        ];
        let remote = vec![unit("", vec![])];
        let (steps, fin, _) = run(local, remote, opts());
        assert!(steps[1..].iter().all(|s| s.plan.transfers.is_empty()));
        assert_eq!(paths(fin.plan.transfers.iter().map(|t| &t.path)), ["a/one"]);
        assert_eq!(fin.plan.links.len(), 1);
        assert_eq!(
            (
                fin.plan.links[0].path.clone(),
                fin.plan.links[0].target.clone()
            ),
            (p("b/two"), p("a/one"))
        );
        assert_eq!(paths(fin.dir_metas.iter().map(|m| &m.path)), ["a", "b"]);
        // Already linked the same way on the standby: nothing to do.
        let tree = || {
            vec![
                unit("", vec![dir("a"), dir("b")]),
                unit("a", vec![hard("a/one", 7)]),
                unit("b", vec![hard("b/two", 7)]),
            ]
        };
        let (_, fin, _) = run(tree(), tree(), opts());
        assert!(fin.plan.is_empty() && fin.dir_metas.is_empty());
    }

    #[test]
    fn a_standby_link_the_primary_broke_is_rewritten() {
        // The standby's two names share an inode; the primary's no longer do.
        let local = vec![unit("", vec![file("x", 3), file("y", 3)])];
        let remote = vec![unit("", vec![hard("x", 9), hard("y", 9)])];
        let (steps, fin, _) = run(local, remote, opts());
        assert!(steps[0].plan.transfers.is_empty());
        assert_eq!(
            paths(fin.plan.transfers.iter().map(|t| &t.path)),
            ["x", "y"]
        );
    }

    fn linked_symlink(path: &str, ino: u64) -> Entry {
        Entry {
            kind: Kind::Symlink {
                target: b"f".to_vec(),
            },
            ..hard(path, ino)
        }
    }

    #[test]
    fn symlinks_with_several_names_across_directories_are_planned_together() {
        let local = vec![
            unit(
                "",
                vec![dir("B"), linked_symlink("sl", 7), linked_symlink("sl2", 7)],
            ),
            unit("B", vec![linked_symlink("B/sl3", 7)]),
        ];
        // The standby has them as three separate symlinks.
        let remote = vec![
            unit(
                "",
                vec![dir("B"), linked_symlink("sl", 1), linked_symlink("sl2", 2)],
            ),
            unit("B", vec![linked_symlink("B/sl3", 3)]),
        ];
        let (steps, fin, _) = run(local, remote, opts());
        assert!(steps.iter().all(|s| s.plan.symlinks.is_empty()));
        // The standby's links are single-named inodes here (nlink unknown: trusted).
        assert!(fin.plan.symlinks.is_empty(), "{:?}", fin.plan);
        let links: Vec<_> = fin
            .plan
            .links
            .iter()
            .map(|l| (l.path.to_string(), l.target.to_string()))
            .collect();
        let to = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(links, [to("sl", "B/sl3"), to("sl2", "B/sl3")]);
        // Only the root gains names.
        assert_eq!(paths(fin.dir_metas.iter().map(|m| &m.path)), [""]);
    }

    #[test]
    fn the_standby_special_files_are_counted_and_removed_with_their_directory() {
        use crate::model::manifest::{Special, SpecialKind};
        let fifo = |path: &str| Special {
            path: p(path),
            kind: SpecialKind::Fifo,
            rdev: 0,
        };
        let local = vec![unit("", vec![hard("x", 4), file("y", 1)])];
        let mut top = unit("", vec![dir("old"), file("y", 1)]);
        // One where a name of a linked file goes, one extra.
        top.specials = vec![fifo("x"), fifo("z")];
        let mut old = unit("old", vec![file("old/f", 1)]);
        old.specials = vec![fifo("old/p")];
        let (steps, fin, c) = run(local, vec![top, old], opts());
        assert_eq!(paths(&steps[0].plan.clear), ["x"]);
        let all: Vec<(RelPath, u64)> = steps
            .iter()
            .flat_map(|s| s.deletes.clone())
            .chain(fin.deletes)
            .collect();
        assert_eq!(all, vec![(p("z"), 1), (p("old"), 3)]);
        assert_eq!(c.remote_entries, 6);
        assert_eq!(c.removed_entries, 5);
        assert_eq!(paths(fin.plan.transfers.iter().map(|t| &t.path)), ["x"]);
    }

    #[test]
    fn names_added_after_the_walk_join_their_group() {
        // A batch walked only `new`; the index named `a` (and its directory) as the other
        // name of its inode.
        let local = [unit("", vec![hard("new", 7)])];
        let remote = [unit("", vec![])];
        let mut m = Merger::new(opts());
        let s = m.step(Some(local[0].clone()), Some(remote[0].clone()));
        assert!(s.plan.transfers.is_empty());
        assert_eq!(m.linked_local().len(), 1);
        let extra_local = crate::model::manifest::testing::manifest(vec![hard("a", 7)]);
        let extra_remote = crate::model::manifest::testing::manifest(vec![file("a", 3)]);
        m.add_linked(extra_local, extra_remote);
        let fin = m.finish();
        assert!(fin.plan.transfers.is_empty(), "{:?}", fin.plan);
        assert_eq!(fin.plan.links.len(), 1);
        assert_eq!(
            (
                fin.plan.links[0].path.clone(),
                fin.plan.links[0].target.clone()
            ),
            (p("new"), p("a"))
        );
    }

    #[test]
    fn directory_attributes_are_fixed_when_only_they_differ() {
        let mut changed = dir("a");
        changed.meta = meta(0o700, 99);
        let local = vec![
            unit("", vec![changed.clone()]),
            Unit {
                dir: changed,
                ..unit("a", vec![])
            },
        ];
        let remote = vec![unit("", vec![dir("a")]), unit("a", vec![])];
        let (steps, _, _) = run(local, remote, opts());
        assert!(steps[0].dir_metas.is_empty());
        assert_eq!(paths(steps[1].dir_metas.iter().map(|m| &m.path)), ["a"]);
    }
}
