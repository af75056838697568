//! The primary's files and symlinks with several names, by inode: what a partial reconcile
//! (a watch's batch, a repair) needs to plan a link group whose other names lie outside the
//! paths it looks at. `ln a b` shows the watcher only `b`; that `a` is the same inode is
//! known here, or found by a search of the tree (`crate::tree::walk::find_names`).
//!
//! Only inodes with more than one name are held, as the streamed reconcile holds them to
//! plan their links, and the index is rebuilt by every full reconcile. No I/O here.

use crate::model::manifest::{Entry, LinkKey};
use crate::model::path::RelPath;
use std::collections::{HashMap, HashSet};

/// The names of the primary's inodes with several names, as last seen.
#[derive(Debug, Default)]
pub(crate) struct LinkIndex {
    groups: HashMap<LinkKey, Known>,
    /// Inodes held after the last full reconcile: past a multiple of it (inodes whose
    /// names are all gone are never seen again to be dropped), the index starts over.
    rebuilt: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Known {
    /// Its names in the tree (not excluded), sorted; some may be gone since.
    names: Vec<RelPath>,
    /// Names it has that no walk of the tree shows: outside the tree, or excluded.
    outside: u64,
}

/// Inodes the index holds at most, however small the tree's last count.
const MIN_CAP: usize = 4096;

impl LinkIndex {
    /// Starts over from a walk of the whole tree: its files and symlinks with several names.
    pub(crate) fn rebuild<'a>(&mut self, linked: impl IntoIterator<Item = &'a Entry>) {
        self.groups.clear();
        let linked: Vec<&Entry> = linked.into_iter().collect();
        self.insert(&linked, &HashMap::new());
        self.rebuilt = self.groups.len();
    }

    /// The names the index knows for the inodes of `linked` (entries of a partial
    /// listing), other than those entries' own.
    pub(crate) fn others(&self, linked: &[&Entry]) -> Vec<RelPath> {
        let have: HashSet<&RelPath> = linked.iter().map(|e| &e.path).collect();
        let keys: HashSet<LinkKey> = linked.iter().filter_map(|e| e.link).collect();
        let mut out: Vec<RelPath> = keys
            .iter()
            .filter_map(|k| self.groups.get(k))
            .flat_map(|g| g.names.iter())
            .filter(|p| !have.contains(p))
            .cloned()
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The inodes among `seen` (every name found of them so far) that have more names than
    /// are found plus those known to lie outside the tree: their other names must be
    /// searched for. An inode met for the first time knows of none outside.
    pub(crate) fn short(&self, seen: &[&Entry]) -> HashSet<LinkKey> {
        tally(seen)
            .into_iter()
            .filter(|(k, (names, nlink))| {
                let outside = self.groups.get(k).map_or(0, |g| g.outside);
                *nlink > names.len() as u64 + outside
            })
            .map(|(k, _)| k)
            .collect()
    }

    /// Records what a look at the inodes of `seen` found: every name of each found so far,
    /// or, for an inode searched for, every name the search found in the tree (`found`);
    /// the rest of its link count is outside the tree.
    pub(crate) fn record<'a>(
        &mut self,
        seen: impl IntoIterator<Item = &'a Entry>,
        found: &HashMap<LinkKey, Vec<RelPath>>,
    ) {
        let seen: Vec<&Entry> = seen.into_iter().collect();
        self.insert(&seen, found);
        if self.groups.len() > (2 * self.rebuilt).max(MIN_CAP) {
            // Forgetting costs a search the next time an inode is met, never a wrong plan.
            self.groups.clear();
            self.rebuilt = 0;
        }
    }

    fn insert(&mut self, seen: &[&Entry], found: &HashMap<LinkKey, Vec<RelPath>>) {
        for (k, (names, nlink)) in tally(seen) {
            let mut names: Vec<RelPath> = match found.get(&k) {
                Some(f) => f.clone(),
                None => names.into_iter().cloned().collect(),
            };
            names.sort();
            names.dedup();
            let outside = nlink.saturating_sub(names.len() as u64);
            self.groups.insert(k, Known { names, outside });
        }
    }

    #[cfg(test)]
    /// Inodes held.
    pub(crate) fn len(&self) -> usize {
        self.groups.len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }
}

/// The names and the link count of each inode among `seen` (entries with a link key).
fn tally<'a>(seen: &[&'a Entry]) -> HashMap<LinkKey, (HashSet<&'a RelPath>, u64)> {
    let mut out: HashMap<LinkKey, (HashSet<&'a RelPath>, u64)> = HashMap::new();
    for e in seen {
        if let Some(k) = e.link {
            let t = out.entry(k).or_default();
            t.0.insert(&e.path);
            t.1 = t.1.max(e.shape.nlink);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::manifest::Shape;
    use crate::model::manifest::testing::file;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn named(path: &str, ino: u64, nlink: u64) -> Entry {
        Entry {
            link: Some(LinkKey { dev: 1, ino }),
            shape: Shape { nlink, blocks: 8 },
            ..file(path, 3)
        }
    }

    #[test]
    fn a_full_walk_tells_every_name_and_what_lies_outside() {
        let mut ix = LinkIndex::default();
        // 7: three names in the tree; 8: one name in the tree, one outside (or excluded).
        let all = [
            named("a", 7, 3),
            named("d/b", 7, 3),
            named("c", 7, 3),
            named("x", 8, 2),
        ];
        ix.rebuild(&all);
        assert_eq!(ix.len(), 2);
        // A batch sees only `d/b`: the index names the others.
        let batch = [&all[1]];
        assert_eq!(ix.others(&batch), [p("a"), p("c")]);
        // With them, nothing is short; nor is `x`, whose other name is outside.
        let seen = [&all[0], &all[1], &all[2]];
        assert!(ix.short(&seen).is_empty());
        assert!(ix.short(&[&all[3]]).is_empty());
    }

    #[test]
    fn a_new_name_of_a_single_file_sends_it_searching() {
        let mut ix = LinkIndex::default();
        ix.rebuild(&[named("x", 8, 2)]);
        // `ln a b`: `a` had one name at the last walk, so the index never held it.
        let b = named("b", 9, 2);
        assert!(ix.others(&[&b]).is_empty());
        assert_eq!(ix.short(&[&b]), HashSet::from([LinkKey { dev: 1, ino: 9 }]));
        // The search found both names: next time the index knows them.
        let found = HashMap::from([(LinkKey { dev: 1, ino: 9 }, vec![p("b"), p("a")])]);
        ix.record([&b], &found);
        assert_eq!(ix.others(&[&b]), [p("a")]);
        assert!(ix.short(&[&b, &named("a", 9, 2)]).is_empty());
        // One more name, made where no event shows it: short again.
        assert!(!ix.short(&[&named("b", 9, 3), &named("a", 9, 3)]).is_empty());
    }

    #[test]
    fn a_search_that_finds_fewer_names_than_the_count_remembers_the_rest_is_outside() {
        let mut ix = LinkIndex::default();
        let f = named("f", 5, 3);
        let found = HashMap::from([(LinkKey { dev: 1, ino: 5 }, vec![p("f")])]);
        ix.record([&f], &found);
        // Two names outside the tree: no search each time `f` changes.
        assert!(ix.short(&[&f]).is_empty());
    }

    #[test]
    fn the_index_starts_over_past_its_cap() {
        let mut ix = LinkIndex::default();
        ix.rebuild(&[named("x", 1, 2)]);
        let many: Vec<Entry> = (0..MIN_CAP as u64 + 1)
            .map(|i| named(&format!("f{i}"), 100 + i, 2))
            .collect();
        ix.record(&many, &HashMap::new());
        assert!(ix.is_empty());
    }
}
