//! The planner: a pure function from (primary manifest, standby manifest, options) to the
//! list of operations that make the standby equal to the primary. No I/O here.

use crate::manifest::{Entry, Hash, Kind, LinkKey, Manifest, Meta, MetaTarget};
use crate::path::RelPath;
use std::collections::{BTreeSet, HashMap, HashSet};

/// Choices that change what counts as a difference.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlanOptions {
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
        if self.size <= crate::protocol::SMALL_FILE {
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
    pub fn is_empty(&self) -> bool {
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
    pub fn transfer_bytes(&self) -> u64 {
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
/// standby counterparts are left alone.
pub fn plan(local: &Manifest, remote: &Manifest, opts: PlanOptions) -> Plan {
    let mut p = Plan {
        remote_entries: remote.children().len(),
        ..Plan::default()
    };
    let protected: Vec<&RelPath> = local.errors.iter().map(|e| &e.path).collect();
    let is_protected = |path: &RelPath| protected.iter().any(|pp| path.starts_with(pp));

    let remote_by_path: HashMap<&RelPath, &Entry> =
        remote.entries.iter().map(|e| (&e.path, e)).collect();
    let local_paths: HashSet<&RelPath> = local.entries.iter().map(|e| &e.path).collect();

    // Hard-link groups, as sets of paths, on each side.
    let local_groups = link_groups(local);
    let remote_groups = link_groups(remote);
    let group_of = |groups: &HashMap<LinkKey, Vec<RelPath>>, e: &Entry| -> Vec<RelPath> {
        match e.link.and_then(|k| groups.get(&k)) {
            Some(g) => g.clone(),
            None => vec![e.path.clone()],
        }
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
        match &l.kind {
            Kind::Dir => match same_type {
                Some(r) => {
                    if meta_differs(&l.meta, &r.meta, opts.owners, true) {
                        touched.insert(l.path.clone());
                    }
                }
                None => {
                    p.mkdirs.push(l.path.clone());
                    touched.insert(l.path.clone());
                    touch(&mut touched, &l.path);
                }
            },
            Kind::Symlink { target } => {
                let same = matches!(same_type, Some(Entry { kind: Kind::Symlink { target: t }, .. }) if t == target);
                if same {
                    let r = same_type.unwrap();
                    if meta_differs(&l.meta, &r.meta, opts.owners, false) {
                        p.metas.push(MetaFix {
                            path: l.path.clone(),
                            meta: l.meta,
                            target: MetaTarget::Symlink,
                        });
                    }
                } else {
                    p.symlinks.push(SymlinkOp {
                        path: l.path.clone(),
                        target: target.clone(),
                        meta: l.meta,
                    });
                    touch(&mut touched, &l.path);
                }
            }
            Kind::File { size, hash } => {
                let lgroup = group_of(&local_groups, l);
                let leader = &lgroup[0];
                if leader != &l.path {
                    pending_links.push((l.path.clone(), leader.clone()));
                    continue;
                }
                let rgroup = same_type.map(|r| group_of(&remote_groups, r));
                let same_content = match same_type {
                    Some(Entry {
                        kind: Kind::File { size: rs, hash: rh },
                        meta: rm,
                        ..
                    }) => {
                        rs == size
                            && if opts.checksum {
                                hash.is_some() && rh == hash
                            } else {
                                rm.mtime == l.meta.mtime
                            }
                    }
                    _ => false,
                };
                // Metadata is fixed in place only when the standby inode has exactly the
                // names the primary's has; otherwise a chmod would leak to other names.
                let same_links = rgroup.as_ref() == Some(&lgroup);
                if same_content && same_links {
                    let r = same_type.unwrap();
                    if meta_differs(&l.meta, &r.meta, opts.owners, true) {
                        p.metas.push(MetaFix {
                            path: l.path.clone(),
                            meta: l.meta,
                            target: MetaTarget::File,
                        });
                    }
                } else {
                    p.transfers.push(Transfer {
                        path: l.path.clone(),
                        size: *size,
                        meta: l.meta,
                        basis: r.and_then(Entry::file_size),
                        hash: *hash,
                    });
                    rewritten.insert(l.path.clone());
                    touch(&mut touched, &l.path);
                }
            }
        }
    }

    for (path, leader) in pending_links {
        let linked_already = !rewritten.contains(&leader)
            && match (remote_by_path.get(&path), remote_by_path.get(&leader)) {
                (Some(r), Some(rl)) => {
                    matches!(r.kind, Kind::File { .. }) && r.link.is_some() && r.link == rl.link
                }
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

    // Removals: everything under a cleared path goes with it; extras are deleted only when
    // asked, and never under a path the primary could not read.
    let cleared: Vec<RelPath> = p.clear.clone();
    let mut removed_tops: Vec<&RelPath> = Vec::new();
    for r in remote.children() {
        if let Some(c) = cleared.iter().find(|c| r.path.starts_with(c)) {
            p.removed_entries += 1;
            p.cleared_entries += 1;
            if &r.path == c {
                touch(&mut touched, &r.path);
            }
            continue;
        }
        if local_paths.contains(&r.path) || is_protected(&r.path) || r.path.is_reserved() {
            continue;
        }
        if !opts.delete {
            continue;
        }
        p.removed_entries += 1;
        if removed_tops.last().is_some_and(|t| r.path.starts_with(t)) {
            continue;
        }
        removed_tops.push(&r.path);
        touch(&mut touched, &r.path);
    }
    p.deletes = removed_tops.into_iter().rev().cloned().collect();

    // Directory attributes last, deepest first, for every directory whose own attributes
    // differ or whose contents changed.
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
    p.dir_metas = dirs
        .into_iter()
        .map(|e| MetaFix {
            path: e.path.clone(),
            meta: e.meta,
            target: MetaTarget::Dir,
        })
        .collect();
    p
}

/// Groups of paths sharing an inode, each sorted, for inodes with two or more names here.
fn link_groups(m: &Manifest) -> HashMap<LinkKey, Vec<RelPath>> {
    let mut groups: HashMap<LinkKey, Vec<RelPath>> = HashMap::new();
    for e in &m.entries {
        if let (Some(k), Kind::File { .. }) = (e.link, &e.kind) {
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
    use crate::manifest::ScanError;

    use crate::manifest::testing::{dir, manifest, meta};

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }
    fn file(path: &str, size: u64, t: i64) -> Entry {
        crate::manifest::testing::file_with(path, size, t, None)
    }
    fn link(path: &str, target: &str) -> Entry {
        Entry {
            path: p(path),
            kind: Kind::Symlink {
                target: target.as_bytes().to_vec(),
            },
            meta: meta(0o777, 1),
            link: None,
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
        // One more name on the primary: the group is rebuilt.
        let remote = manifest(vec![hard("a", 70), hard("b", 70), file("c", 4, 4)]);
        let pl = plan(&local, &remote, OPTS);
        assert_eq!(pl.links.len(), 2);
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
