//! The planner: a pure function from (primary manifest, standby manifest, options) to the
//! list of operations that make the standby equal to the primary. No I/O here.

use crate::model::manifest::{Entry, Hash, Kind, LinkKey, Manifest, Meta, MetaTarget, Special};
use crate::model::path::RelPath;
use std::collections::{BTreeSet, HashMap, HashSet};

use crate::model::manifest::SMALL_FILE;

/// Choices that change what counts as a difference.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PlanOptions {
    /// Compare file content by blake3 (both manifests carry hashes) instead of size + mtime.
    pub checksum: bool,
    /// Delete standby entries the primary does not have.
    pub delete: bool,
    /// The receiver preserves owner and group (it runs as root); otherwise they are ignored.
    pub owners: bool,
}

/// A regular file whose content must be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub path: RelPath,
    pub size: u64,
    pub meta: Meta,
    /// Size of the standby's current regular file at this path, a delta basis.
    pub basis: Option<u64>,
    pub hash: Option<Hash>,
}

/// How a file's content travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Whole and inline on a lane (a small file).
    Small,
    /// Whole, on a stream of its own.
    Whole,
    /// As a delta against the standby's version, on a stream of its own.
    Delta,
}

impl Transfer {
    /// How this file is sent: small files whole on a lane; larger ones as a delta when the
    /// standby has a non-empty version, else whole.
    pub fn method(&self) -> Method {
        if self.size <= SMALL_FILE {
            Method::Small
        } else if self.basis.is_some_and(|b| b > 0) {
            Method::Delta
        } else {
            Method::Whole
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SymlinkOp {
    pub path: RelPath,
    pub target: Vec<u8>,
    pub meta: Meta,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MetaFix {
    pub path: RelPath,
    pub meta: Meta,
    pub target: MetaTarget,
}

/// A hard link: `path` becomes another name of `target` (already on the standby).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkOp {
    pub path: RelPath,
    pub target: RelPath,
}

/// Operations in the order they must be applied: `clear`, `mkdirs` (parents first),
/// then `transfers`, `symlinks` and `metas` in any order, then `links` (their targets must be
/// durable first), then `deletes` (deepest first), then `dir_metas` (deepest first, root last).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Standby entries in the way of a type change, removed with everything beneath them.
    pub clear: Vec<RelPath>,
    pub mkdirs: Vec<RelPath>,
    pub transfers: Vec<Transfer>,
    pub symlinks: Vec<SymlinkOp>,
    pub metas: Vec<MetaFix>,
    pub links: Vec<LinkOp>,
    /// Top-most standby entries to delete (each with everything beneath it).
    pub deletes: Vec<RelPath>,
    pub dir_metas: Vec<MetaFix>,
    /// Standby entries removed by `clear` and `deletes`, descendants included.
    pub removed_entries: usize,
    /// Of those, the entries removed by `clear` (replaced by another type, not absent on
    /// the primary): the mass-delete guard does not count them.
    pub cleared_entries: usize,
    /// Standby entries (root excluded) the plan was made against.
    pub remote_entries: usize,
}

impl Plan {
    /// The operations a window of a streamed reconcile carries out as it goes (clears,
    /// directories, transfers, symlinks, attribute fixes); links, deletions and directory
    /// attributes wait for the end.
    pub(crate) fn op_count(&self) -> usize {
        self.clear.len()
            + self.mkdirs.len()
            + self.transfers.len()
            + self.symlinks.len()
            + self.metas.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.clear.is_empty()
            && self.mkdirs.is_empty()
            && self.transfers.is_empty()
            && self.symlinks.is_empty()
            && self.metas.is_empty()
            && self.links.is_empty()
            && self.deletes.is_empty()
            && self.dir_metas.is_empty()
    }

    /// Bytes of file content the plan will send (before delta compression).
    pub(crate) fn transfer_bytes(&self) -> u64 {
        self.transfers.iter().map(|t| t.size).sum()
    }
}

/// Whether the attributes the mirror keeps differ (`with_mode`: symlinks have none). The
/// extended attributes count too: both sides read those the session keeps.
pub(crate) fn meta_differs(a: &Meta, b: &Meta, owners: bool, with_mode: bool) -> bool {
    a.mtime != b.mtime
        || a.xattrs != b.xattrs
        || (with_mode && a.mode != b.mode)
        || (owners && (a.uid != b.uid || a.gid != b.gid))
}

/// Computes the operations that make `remote` equal `local`.
///
/// Entries under a path listed in `local.errors` are unknown on the primary, so their
/// standby counterparts are left alone. Special files are not mirrored: the standby's are
/// removed, unless the primary has the same one at the same path ([`Special::matches`]);
/// one in the way of a primary's entry is cleared like any entry of another type.
pub(crate) fn plan(local: &Manifest, remote: &Manifest, opts: PlanOptions) -> Plan {
    plan_with(local, remote, opts, None)
}

/// [`plan`], where `removed` says which of the standby's names (ones the primary lacks)
/// are removed elsewhere: the streamed planner plans files with several names apart from
/// the directories it deletes them in.
pub(crate) fn plan_with(
    local: &Manifest,
    remote: &Manifest,
    opts: PlanOptions,
    removed: Option<&dyn Fn(&RelPath) -> bool>,
) -> Plan {
    let mut p = Plan {
        remote_entries: remote.children().len() + remote.specials.len(),
        ..Plan::default()
    };
    let protected: Vec<&RelPath> = local.errors.iter().map(|e| &e.path).collect();
    let is_protected = |path: &RelPath| protected.iter().any(|pp| path.starts_with(pp));

    let remote_by_path: HashMap<&RelPath, &Entry> =
        remote.entries.iter().map(|e| (&e.path, e)).collect();
    let local_paths: HashSet<&RelPath> = local.entries.iter().map(|e| &e.path).collect();

    // Hard-link groups (files and symlinks), as sets of paths, on each side; and each
    // primary group's leader once chosen.
    let local_groups = link_groups(local);
    let remote_groups = link_groups(remote);
    let mut leaders: HashMap<LinkKey, (RelPath, bool)> = HashMap::new();
    let goes = |n: &RelPath| {
        !local_paths.contains(n)
            && match removed {
                Some(removed) => removed(n),
                None => opts.delete && !is_protected(n) && !n.is_reserved(),
            }
    };
    let fates = Fates {
        remote_groups: &remote_groups,
        goes: &goes,
        opts,
    };

    // Parents whose mtime changes because an entry inside them is created or removed.
    let mut touched: BTreeSet<RelPath> = BTreeSet::new();
    let touch = |touched: &mut BTreeSet<RelPath>, path: &RelPath| {
        touched.insert(path.split().0);
    };
    // Leaders whose content is rewritten this time; their other names must be re-linked.
    let mut rewritten: HashSet<RelPath> = HashSet::new();
    let mut pending_links: Vec<(RelPath, RelPath)> = Vec::new();

    for l in &local.entries {
        let r = remote_by_path.get(&l.path).copied();
        if l.path.is_root() {
            if let Some(r) = r
                && meta_differs(&l.meta, &r.meta, opts.owners, true)
            {
                touched.insert(RelPath::root());
            }
            continue;
        }
        // A standby entry of another type is in the way: clear it first, except when a
        // rename can replace it atomically (file or symlink over file or symlink).
        let replaceable = |r: &Entry| !r.is_dir() && !l.is_dir();
        if let Some(r) = r
            && std::mem::discriminant(&r.kind) != std::mem::discriminant(&l.kind)
            && !replaceable(r)
        {
            p.clear.push(l.path.clone());
        }
        let same_type =
            r.filter(|r| std::mem::discriminant(&r.kind) == std::mem::discriminant(&l.kind));
        if let Kind::Dir = l.kind {
            plan_dir(&mut p, l, same_type, opts.owners, &mut touched);
            continue;
        }
        // A file or a symlink: one name of its inode's group (alone, a group of one).
        let group = l.link.and_then(|k| local_groups.get(&k).map(|g| (k, g)));
        let (leader, keep) = match group {
            Some((k, g)) => leaders
                .entry(k)
                .or_insert_with(|| choose_leader(g, l, &remote_by_path, &fates))
                .clone(),
            None => {
                let alone = std::slice::from_ref(&l.path);
                let keep = r.is_some_and(|r| keepable(l, r, alone, &fates));
                (l.path.clone(), keep)
            }
        };
        if leader != l.path {
            pending_links.push((l.path.clone(), leader));
            continue;
        }
        if keep {
            // The standby's inode has only names of this group: a change in place reaches
            // no other name.
            let r = r.expect("a kept leader has a standby entry");
            p.metas.extend(fix_in_place(l, r, opts.owners));
            continue;
        }
        rewrite(&mut p, l, r);
        rewritten.insert(l.path.clone());
        touch(&mut touched, &l.path);
    }

    for (path, leader) in pending_links {
        let linked_already = !rewritten.contains(&leader)
            && match (remote_by_path.get(&path), remote_by_path.get(&leader)) {
                (Some(r), Some(rl)) => r.link.is_some() && r.link == rl.link,
                _ => false,
            };
        if !linked_already {
            touch(&mut touched, &path);
            p.links.push(LinkOp {
                path,
                target: leader,
            });
        }
    }
    plan_removals(
        &mut p,
        local,
        remote,
        &local_paths,
        opts,
        &is_protected,
        &mut touched,
    );
    p.dir_metas = dir_fixes(local, &touched);
    p
}

/// Plans the standby's removals into `p`: standby specials in the way of a primary's
/// entry are cleared; everything under a cleared path goes with it; extras are deleted
/// only when asked, and never under a path the primary could not read (`is_protected`).
/// Special files are extras unless the primary has the same one there. The parents of
/// what goes are `touched`.
fn plan_removals(
    p: &mut Plan,
    local: &Manifest,
    remote: &Manifest,
    local_paths: &HashSet<&RelPath>,
    opts: PlanOptions,
    is_protected: &dyn Fn(&RelPath) -> bool,
    touched: &mut BTreeSet<RelPath>,
) {
    let touch = |touched: &mut BTreeSet<RelPath>, path: &RelPath| {
        touched.insert(path.split().0);
    };
    // A standby special file where the primary has an entry is in the way, whatever the
    // entry's type.
    for s in &remote.specials {
        if local_paths.contains(&s.path) && !is_protected(&s.path) {
            p.clear.push(s.path.clone());
        }
    }

    // Removals: everything under a cleared path goes with it; extras are deleted only when
    // asked, and never under a path the primary could not read. Special files are extras
    // unless the primary has the same one there.
    let cleared: Vec<RelPath> = p.clear.clone();
    let mut removed_tops: Vec<&RelPath> = Vec::new();
    for (path, special) in by_path(remote.children(), &remote.specials) {
        if let Some(c) = cleared.iter().find(|c| path.starts_with(c)) {
            p.removed_entries += 1;
            p.cleared_entries += 1;
            if path == c {
                touch(touched, path);
            }
            continue;
        }
        let primary_has = match special {
            Some(theirs) => local.special(path).is_some_and(|s| s.matches(theirs)),
            None => local_paths.contains(path),
        };
        if primary_has || is_protected(path) || path.is_reserved() {
            continue;
        }
        if !opts.delete {
            continue;
        }
        p.removed_entries += 1;
        if removed_tops.last().is_some_and(|t| path.starts_with(t)) {
            continue;
        }
        removed_tops.push(path);
        touch(touched, path);
    }
    p.deletes = removed_tops.into_iter().rev().cloned().collect();
}

/// The attribute fixes of directories, deepest first: every directory whose own
/// attributes differ or whose contents changed (`touched`). Last, after what changes them.
fn dir_fixes(local: &Manifest, touched: &BTreeSet<RelPath>) -> Vec<MetaFix> {
    let mut dirs: Vec<&Entry> = local
        .entries
        .iter()
        .filter(|e| e.is_dir() && touched.contains(&e.path))
        .collect();
    dirs.sort_by(|a, b| {
        b.path
            .depth()
            .cmp(&a.path.depth())
            .then(b.path.cmp(&a.path))
    });
    dirs.into_iter()
        .map(|e| MetaFix {
            path: e.path.clone(),
            meta: e.meta,
            target: MetaTarget::Dir,
        })
        .collect()
}

/// Plans the directory `l` against the standby's directory there (`same_type`), if any:
/// made when missing; `touched` (its attributes fixed last) when new or they differ.
fn plan_dir(
    p: &mut Plan,
    l: &Entry,
    same_type: Option<&Entry>,
    owners: bool,
    touched: &mut BTreeSet<RelPath>,
) {
    match same_type {
        Some(r) => {
            if meta_differs(&l.meta, &r.meta, owners, true) {
                touched.insert(l.path.clone());
            }
        }
        None => {
            p.mkdirs.push(l.path.clone());
            touched.insert(l.path.clone());
            touched.insert(l.path.split().0);
        }
    }
}

/// The attribute fix of a file or symlink `l` kept in place as the standby's `r`, if its
/// attributes differ.
fn fix_in_place(l: &Entry, r: &Entry, owners: bool) -> Option<MetaFix> {
    let is_file = matches!(l.kind, Kind::File { .. });
    meta_differs(&l.meta, &r.meta, owners, is_file).then(|| MetaFix {
        path: l.path.clone(),
        meta: l.meta,
        target: if is_file {
            MetaTarget::File
        } else {
            MetaTarget::Symlink
        },
    })
}

/// Plans `l` (a file or symlink) written anew over the standby's `r`, if any.
fn rewrite(p: &mut Plan, l: &Entry, r: Option<&Entry>) {
    match &l.kind {
        Kind::File { size, hash } => p.transfers.push(Transfer {
            path: l.path.clone(),
            size: *size,
            meta: l.meta,
            basis: r.and_then(Entry::file_size),
            hash: *hash,
        }),
        Kind::Symlink { target } => p.symlinks.push(SymlinkOp {
            path: l.path.clone(),
            target: target.clone(),
            meta: l.meta,
        }),
        Kind::Dir => unreachable!("directories are planned apart"),
    }
}

/// The paths of `entries` and of `specials` (each sorted by path), in path order, each with
/// its special file if it is one.
fn by_path<'a>(
    entries: &'a [Entry],
    specials: &'a [Special],
) -> impl Iterator<Item = (&'a RelPath, Option<&'a Special>)> {
    let mut e = entries.iter().peekable();
    let mut s = specials.iter().peekable();
    std::iter::from_fn(move || match (e.peek(), s.peek()) {
        (Some(x), Some(y)) if y.path < x.path => s.next().map(|y| (&y.path, Some(y))),
        (Some(_), _) => e.next().map(|x| (&x.path, None)),
        (None, _) => s.next().map(|y| (&y.path, Some(y))),
    })
}

/// Whether the standby's `r` holds what the primary's `l` (a file or a symlink) holds: the
/// same type and content. Comparing by digest, a dense copy of a sparse file does not: it
/// is sent again, with its holes.
fn same_content(l: &Entry, r: &Entry, checksum: bool) -> bool {
    match (&l.kind, &r.kind) {
        (Kind::File { size, hash }, Kind::File { size: rs, hash: rh }) => {
            rs == size
                && if checksum {
                    hash.is_some()
                        && rh == hash
                        && !crate::model::holes::denser(*size, l.shape.blocks, r.shape.blocks)
                } else {
                    r.meta.mtime == l.meta.mtime
                }
        }
        (Kind::Symlink { target }, Kind::Symlink { target: rt }) => target == rt,
        _ => false,
    }
}

/// The names the standby's inode at `r` has, when all are known: those listed here, unless
/// its link count says there are more (beyond what was listed, or outside the tree).
fn standby_names<'a>(
    r: &'a Entry,
    groups: &'a HashMap<LinkKey, Vec<RelPath>>,
) -> Option<&'a [RelPath]> {
    let names: &[RelPath] = match r.link.and_then(|k| groups.get(&k)) {
        Some(g) => g,
        None => std::slice::from_ref(&r.path),
    };
    // A link count of 0 is a peer that does not say (before version 6): trust the listing.
    let complete = r.link.is_none() || r.shape.nlink <= names.len() as u64;
    complete.then_some(names)
}

/// What the plan knows of the standby's names beyond one group.
struct Fates<'a> {
    remote_groups: &'a HashMap<LinkKey, Vec<RelPath>>,
    /// Whether this plan deletes the standby's name (the primary has none there). A name
    /// the primary has is not assumed to go: it may be kept the same way.
    goes: &'a dyn Fn(&RelPath) -> bool,
    opts: PlanOptions,
}

/// Whether the standby's `r` can stay as the inode of the primary's group `group` (sorted):
/// it holds `l`'s content, and every other name it has is one this plan deletes, so fixing
/// its attributes in place changes no name that should differ.
fn keepable(l: &Entry, r: &Entry, group: &[RelPath], f: &Fates<'_>) -> bool {
    same_content(l, r, f.opts.checksum)
        && standby_names(r, f.remote_groups).is_some_and(|names| {
            names
                .iter()
                .all(|n| group.binary_search(n).is_ok() || (f.goes)(n))
        })
}

/// The name of a primary group (sorted; `l` one of its entries, all alike) that carries its
/// content, and whether the standby's entry there is kept: the first the standby already
/// holds right (so a new name for a large file costs a link, not the file), else the first
/// name, written anew. The others become links to it.
fn choose_leader(
    group: &[RelPath],
    l: &Entry,
    remote_by_path: &HashMap<&RelPath, &Entry>,
    f: &Fates<'_>,
) -> (RelPath, bool) {
    for name in group {
        if let Some(r) = remote_by_path.get(name)
            && keepable(l, r, group, f)
        {
            return (name.clone(), true);
        }
    }
    (group[0].clone(), false)
}

/// Groups of paths sharing an inode (files or symlinks), each sorted, for inodes with two
/// or more names here.
fn link_groups(m: &Manifest) -> HashMap<LinkKey, Vec<RelPath>> {
    let mut groups: HashMap<LinkKey, Vec<RelPath>> = HashMap::new();
    for e in &m.entries {
        if let (Some(k), Kind::File { .. } | Kind::Symlink { .. }) = (e.link, &e.kind) {
            groups.entry(k).or_default().push(e.path.clone());
        }
    }
    groups.retain(|_, g| g.len() > 1);
    for g in groups.values_mut() {
        g.sort();
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::manifest::ScanError;

    use crate::model::manifest::testing::{dir, manifest, meta};

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }
    fn file(path: &str, size: u64, t: i64) -> Entry {
        crate::model::manifest::testing::file_with(path, size, t, None)
    }
    fn link(path: &str, target: &str) -> Entry {
        Entry {
            path: p(path),
            kind: Kind::Symlink {
                target: target.as_bytes().to_vec(),
            },
            meta: meta(0o777, 1),
            link: None,
            shape: Default::default(),
        }
    }
    const OPTS: PlanOptions = PlanOptions {
        checksum: false,
        delete: true,
        owners: true,
    };
    fn paths(v: &[RelPath]) -> Vec<&str> {
        v.iter()
            .map(|p| std::str::from_utf8(p.as_bytes()).unwrap())
            .collect()
    }

    #[test]
    fn equal_trees_need_nothing() {
        let m = manifest(vec![dir("d"), file("d/a", 3, 9), link("l", "d/a")]);
        let pl = plan(&m, &m, OPTS);
        assert!(pl.is_empty(), "{pl:?}");
    }

    #[test]
    fn new_changed_and_deleted() {
        let local = manifest(vec![dir("d"), file("d/a", 3, 9), file("d/new", 1, 1)]);
        let remote = manifest(vec![
            dir("d"),
            file("d/a", 3, 8),
            dir("old"),
            file("old/x", 1, 1),
        ]);
        let pl = plan(&local, &remote, OPTS);
        let sent: Vec<_> = pl.transfers.iter().map(|t| t.path.clone()).collect();
        assert_eq!(paths(&sent), ["d/a", "d/new"]);
        assert_eq!(pl.transfers[0].basis, Some(3));
        assert_eq!(pl.transfers[1].basis, None);
        assert_eq!(paths(&pl.deletes), ["old"]);
        assert_eq!((pl.removed_entries, pl.cleared_entries), (2, 0));
        let dm: Vec<_> = pl.dir_metas.iter().map(|m| m.path.clone()).collect();
        assert_eq!(paths(&dm), ["d", ""]);
    }

    #[test]
    fn no_delete_keeps_extras() {
        let local = manifest(vec![]);
        let remote = manifest(vec![file("x", 1, 1)]);
        let pl = plan(
            &local,
            &remote,
            PlanOptions {
                delete: false,
                ..OPTS
            },
        );
        assert!(pl.deletes.is_empty());
        assert_eq!(pl.removed_entries, 0);
    }

    #[test]
    fn metadata_only_changes_are_fixed_in_place() {
        let mut l = file("a", 3, 9);
        l.meta.mode = 0o600;
        let local = manifest(vec![l]);
        let remote = manifest(vec![file("a", 3, 9)]);
        let pl = plan(&local, &remote, OPTS);
        assert!(pl.transfers.is_empty());
        assert_eq!(pl.metas.len(), 1);
        assert_eq!(pl.metas[0].meta.mode, 0o600);
        // Owner differences count only when the receiver can preserve owners.
        let mut l = file("a", 3, 9);
        l.meta.uid = 1000;
        let pl = plan(
            &manifest(vec![l.clone()]),
            &remote,
            PlanOptions {
                owners: false,
                ..OPTS
            },
        );
        assert!(pl.is_empty());
        let pl = plan(&manifest(vec![l]), &remote, OPTS);
        assert_eq!(pl.metas.len(), 1);
    }

    #[test]
    fn checksum_mode_compares_hashes_not_mtimes() {
        let mut l = file("a", 3, 9);
        let mut r = file("a", 3, 9);
        l.kind = Kind::File {
            size: 3,
            hash: Some([1; 32]),
        };
        r.kind = Kind::File {
            size: 3,
            hash: Some([2; 32]),
        };
        let opts = PlanOptions {
            checksum: true,
            ..OPTS
        };
        let pl = plan(&manifest(vec![l.clone()]), &manifest(vec![r.clone()]), opts);
        assert_eq!(pl.transfers.len(), 1);
        r.kind = l.kind.clone();
        r.meta.mtime.sec = 1;
        let pl = plan(&manifest(vec![l]), &manifest(vec![r]), opts);
        assert!(pl.transfers.is_empty());
        assert_eq!(
            pl.metas.len(),
            1,
            "same content, other mtime: fix the mtime only"
        );
    }

    #[test]
    fn type_changes_clear_what_is_in_the_way() {
        // file -> dir, dir -> file, symlink -> file, dir -> symlink
        let local = manifest(vec![
            dir("a"),
            file("a/in", 1, 1),
            file("b", 1, 1),
            file("c", 1, 1),
            link("d", "x"),
        ]);
        let remote = manifest(vec![
            file("a", 1, 1),
            dir("b"),
            file("b/x", 1, 1),
            link("c", "y"),
            dir("d"),
            dir("d/e"),
        ]);
        let pl = plan(&local, &remote, OPTS);
        assert_eq!(paths(&pl.clear), ["a", "b", "d"]);
        assert_eq!(paths(&pl.mkdirs), ["a"]);
        let sent: Vec<_> = pl.transfers.iter().map(|t| t.path.clone()).collect();
        assert_eq!(paths(&sent), ["a/in", "b", "c"]);
        assert_eq!(pl.transfers[1].basis, None, "a directory is no delta basis");
        assert_eq!(pl.symlinks.len(), 1);
        assert!(
            pl.deletes.is_empty(),
            "children of cleared entries go with them"
        );
        assert_eq!((pl.removed_entries, pl.cleared_entries), (5, 5));
    }

    #[test]
    fn unreadable_primary_paths_protect_the_standby() {
        let mut local = manifest(vec![dir("d")]);
        local.errors.push(ScanError {
            path: p("d"),
            error: "permission denied".into(),
        });
        let remote = manifest(vec![dir("d"), file("d/keep", 1, 1), file("gone", 1, 1)]);
        let pl = plan(&local, &remote, OPTS);
        assert_eq!(paths(&pl.deletes), ["gone"]);
    }

    #[test]
    fn deletes_are_deepest_first_and_top_most_only() {
        let local = manifest(vec![]);
        let remote = manifest(vec![
            dir("a"),
            dir("a/b"),
            file("a/b/c", 1, 1),
            file("z", 1, 1),
        ]);
        let pl = plan(&local, &remote, OPTS);
        assert_eq!(paths(&pl.deletes), ["z", "a"]);
        assert_eq!(pl.removed_entries, 4);
    }

    #[test]
    fn reserved_name_is_never_deleted() {
        let remote = manifest(vec![dir(".hotsync"), file(".hotsync/x", 1, 1)]);
        let pl = plan(&manifest(vec![]), &remote, OPTS);
        assert!(pl.deletes.is_empty());
    }

    fn hard(path: &str, ino: u64) -> Entry {
        let mut e = file(path, 4, 4);
        e.link = Some(LinkKey { dev: 1, ino });
        e
    }

    #[test]
    fn hard_links_send_data_once() {
        let local = manifest(vec![hard("a", 7), hard("b", 7), hard("c", 7)]);
        let pl = plan(&local, &manifest(vec![]), OPTS);
        assert_eq!(pl.transfers.len(), 1);
        assert_eq!(pl.transfers[0].path, p("a"));
        let links: Vec<_> = pl
            .links
            .iter()
            .map(|l| (l.path.clone(), l.target.clone()))
            .collect();
        assert_eq!(links, vec![(p("b"), p("a")), (p("c"), p("a"))]);
        // Already linked the same way on the standby: nothing to do.
        let remote = manifest(vec![hard("a", 70), hard("b", 70), hard("c", 70)]);
        assert!(plan(&local, &remote, OPTS).is_empty());
        // One more name on the primary: linked to the standby's inode, which already holds
        // the content; nothing is sent again.
        let remote = manifest(vec![hard("a", 70), hard("b", 70), file("c", 4, 4)]);
        let pl = plan(&local, &remote, OPTS);
        assert!(pl.transfers.is_empty() && pl.metas.is_empty(), "{pl:?}");
        let links: Vec<_> = pl
            .links
            .iter()
            .map(|l| (l.path.clone(), l.target.clone()))
            .collect();
        assert_eq!(links, vec![(p("c"), p("a"))]);
    }

    fn linked(mut e: Entry, ino: u64, nlink: u64) -> Entry {
        e.link = Some(LinkKey { dev: 1, ino });
        e.shape.nlink = nlink;
        e
    }

    #[test]
    fn symlinks_with_several_names_are_one_symlink_and_links() {
        let group = |ino| {
            vec![
                dir("B"),
                linked(link("B/sl3", "f"), ino, 3),
                linked(link("sl", "f"), ino, 3),
                linked(link("sl2", "f"), ino, 3),
            ]
        };
        let local = manifest(group(7));
        let pl = plan(&local, &manifest(vec![dir("B")]), OPTS);
        assert_eq!(pl.symlinks.len(), 1, "{pl:?}");
        let leader = pl.symlinks[0].path.clone();
        assert_eq!(leader, p("B/sl3"));
        let links: Vec<_> = pl
            .links
            .iter()
            .map(|l| (l.path.clone(), l.target.clone()))
            .collect();
        assert_eq!(links, vec![(p("sl"), leader.clone()), (p("sl2"), leader)]);
        // Linked the same way on the standby: nothing.
        assert!(plan(&local, &manifest(group(70)), OPTS).is_empty());
        // Three separate symlinks on the standby (what hotsync made before): the first is
        // kept, the others become its names.
        let remote = manifest(vec![
            dir("B"),
            link("B/sl3", "f"),
            link("sl", "f"),
            link("sl2", "f"),
        ]);
        let pl = plan(&local, &remote, OPTS);
        assert!(pl.symlinks.is_empty() && pl.transfers.is_empty(), "{pl:?}");
        assert_eq!(pl.links.len(), 2);
        // A name less on the primary: the standby's goes, the others stay linked.
        let mut fewer = group(7);
        fewer.pop();
        let pl = plan(&manifest(fewer), &manifest(group(70)), OPTS);
        assert!(pl.symlinks.is_empty() && pl.links.is_empty(), "{pl:?}");
        assert_eq!(paths(&pl.deletes), ["sl2"]);
        // Split on the primary (sl2 made anew): the standby's inode is left to sl2 alone
        // only by writing the group anew (a change in place would reach sl2).
        let mut split = group(7);
        split[3] = link("sl2", "f");
        let pl = plan(&manifest(split), &manifest(group(70)), OPTS);
        let written: Vec<_> = pl.symlinks.iter().map(|l| l.path.clone()).collect();
        assert_eq!(paths(&written), ["B/sl3", "sl2"]);
        assert_eq!(pl.links.len(), 1);
    }

    #[test]
    fn a_standby_inode_with_names_the_listing_lacks_is_not_changed_in_place() {
        // The standby's `a` has two more names than the listing shows (a partial listing):
        // a chmod in place would reach them.
        let mut a = file("a", 4, 4);
        a.meta.mode = 0o600;
        let remote = manifest(vec![linked(file("a", 4, 4), 70, 3)]);
        let pl = plan(&manifest(vec![a.clone()]), &remote, OPTS);
        assert!(pl.metas.is_empty());
        assert_eq!(pl.transfers.len(), 1);
        // All its names listed: fixed in place.
        let remote = manifest(vec![linked(file("a", 4, 4), 70, 1)]);
        let pl = plan(&manifest(vec![a]), &remote, OPTS);
        assert_eq!((pl.metas.len(), pl.transfers.len()), (1, 0));
    }

    fn special(path: &str, kind: crate::model::manifest::SpecialKind, rdev: u64) -> Special {
        Special {
            path: p(path),
            kind,
            rdev,
        }
    }

    #[test]
    fn the_standby_keeps_no_special_file_the_primary_lacks() {
        use crate::model::manifest::SpecialKind::*;
        let mut local = manifest(vec![file("file-here", 1, 1), dir("dir-here")]);
        local.specials = vec![
            special("dev-other", CharDevice, 0x101),
            special("dev-same", CharDevice, 0x103),
            special("fifo-same", Fifo, 0),
            special("sock-vs-fifo", Socket, 0),
        ];
        let mut remote = manifest(vec![dir("gone")]);
        remote.specials = vec![
            special("dev-other", CharDevice, 0x102),
            special("dev-same", CharDevice, 0x103),
            special("dir-here", Fifo, 0),
            special("fifo-extra", Fifo, 0),
            special("fifo-same", Fifo, 0),
            special("file-here", Socket, 0),
            special("gone/inner", Fifo, 0),
            special("sock-vs-fifo", Fifo, 0),
        ];
        local.sort();
        remote.sort();
        let pl = plan(&local, &remote, OPTS);
        // In the way of the primary's entries: cleared, whatever --no-delete says.
        assert_eq!(paths(&pl.clear), ["dir-here", "file-here"]);
        assert_eq!(paths(&pl.mkdirs), ["dir-here"]);
        assert_eq!(pl.transfers.len(), 1);
        // Extras; the same special as the primary's stays.
        assert_eq!(
            paths(&pl.deletes),
            ["sock-vs-fifo", "gone", "fifo-extra", "dev-other"]
        );
        assert_eq!(pl.removed_entries, 2 + 3 + 2);
        assert_eq!(pl.remote_entries, 1 + 8);
        let pl = plan(
            &local,
            &remote,
            PlanOptions {
                delete: false,
                ..OPTS
            },
        );
        assert_eq!(paths(&pl.clear), ["dir-here", "file-here"]);
        assert!(pl.deletes.is_empty());
        assert_eq!(pl.removed_entries, 2);
    }

    #[test]
    fn comparing_by_digest_a_dense_copy_of_a_sparse_file_is_sent_again() {
        let size = 10 << 20;
        let sparse = |blocks| Entry {
            kind: Kind::File {
                size,
                hash: Some([3; 32]),
            },
            shape: crate::model::manifest::Shape { nlink: 1, blocks },
            ..file("img", size, 5)
        };
        let local = manifest(vec![sparse(2048)]); // 1 MiB of data
        let dense = manifest(vec![sparse(size / 512)]);
        let checksum = PlanOptions {
            checksum: true,
            ..OPTS
        };
        let pl = plan(&local, &dense, checksum);
        assert_eq!(pl.transfers.len(), 1);
        assert_eq!(pl.transfers[0].basis, Some(size), "a delta keeps the holes");
        // Within the filesystems' rounding: the same file.
        assert!(plan(&local, &manifest(vec![sparse(2048 + 100)]), checksum).is_empty());
        // The quick check looks at size and mtime only.
        assert!(plan(&local, &dense, OPTS).is_empty());
    }

    #[test]
    fn standby_links_the_primary_broke_are_rewritten() {
        // On the standby a and b share an inode; on the primary they are separate files,
        // and a's mode changed. A chmod in place would change b too, so a is rewritten.
        let mut a = file("a", 4, 4);
        a.meta.mode = 0o600;
        let local = manifest(vec![a, file("b", 4, 4)]);
        let remote = manifest(vec![hard("a", 70), hard("b", 70)]);
        let pl = plan(&local, &remote, OPTS);
        let sent: Vec<_> = pl.transfers.iter().map(|t| t.path.clone()).collect();
        assert_eq!(paths(&sent), ["a", "b"]);
        assert!(pl.metas.is_empty());
    }
}
