//! Turns watcher hints into batches of paths to examine again. Pure logic: time comes in as
//! an argument, so every rule is tested by stepping a clock.
//!
//! Rules:
//! - A file closed after writing or that appeared complete (made by `link()`), an
//!   attribute change, a removal, a new or moved-in directory, a rename: ready at once.
//! - A name moved away or moved in waits `rename_window` for the other half of a rename
//!   (inotify reports the halves as separate events): moved within the tree, it is a
//!   rename; out of it a removal, into it a new tree.
//! - A file written but not closed (or created and not yet closed) waits until it has been
//!   quiet for `quiet`, and never longer than `max_delay` after its first change, so a file
//!   written continuously is still replicated at a bounded delay.
//! - Many changes in one directory collapse into one re-scan of that directory; more
//!   queued changes than `max_queued`, or lost events, into one full re-scan. Memory stays
//!   bounded whatever the event rate.
//! - Renames are kept in order and come out with the batch that re-examines both names.
//! - A directory that appears is walked at once and walked again `settle` later: the
//!   watcher hands over its event before it has watched the new directory, so whatever is
//!   created in it between the first walk and the new watch is reported by nobody.

use crate::model::manifest::Scope;
use crate::model::path::RelPath;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What the watcher saw: a reason to look at a path again, never the truth about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Hint {
    /// Data written; the file may still be open.
    Modified(RelPath),
    /// A file appeared; it may still be being written.
    Created(RelPath),
    /// A file was closed after writing.
    Written(RelPath),
    /// A file appeared complete: nobody held it open for writing when its creation was
    /// seen (a name made by `link()`, as git makes its objects, or a writer already done).
    Appeared(RelPath),
    /// Attributes changed (mode, owner, times).
    Attrib(RelPath),
    Removed(RelPath),
    /// A directory appeared (made or moved in): walk it whole, since what was created in it
    /// before its watch existed was never reported.
    DirAppeared(RelPath),
    /// Moved away from here (out of the tree, or within it: then a `Renamed` follows).
    MovedFrom(RelPath),
    /// Moved here (from outside the tree, or within it).
    MovedTo(RelPath),
    Renamed {
        from: RelPath,
        to: RelPath,
    },
    /// Something under this directory changed in a way the watcher could not describe.
    RescanDir(RelPath),
    /// Events were lost: everything must be examined again.
    RescanAll,
    /// Flush `id`'s barrier: everything seen before it is wanted on the standby now
    /// (nothing waits for quiet or a rename's other half any more). A source reports it
    /// after every change it reported before the barrier was placed
    /// ([`super::source::HintSource::place_barrier`]).
    Barrier {
        id: u64,
    },
}

impl Hint {
    /// The one path whose contents or attributes this change was to, when that is all it
    /// was (no name came or went, nothing the watcher could not describe).
    pub(crate) fn changed_in_place(&self) -> Option<&RelPath> {
        match self {
            Hint::Modified(p) | Hint::Written(p) | Hint::Attrib(p) => Some(p),
            _ => None,
        }
    }

    /// Whether the change lies in the reserved area (`.hotsync/` at the root): hotsync's
    /// own files there (the primary's state, a flush's marker) are never mirrored.
    pub(crate) fn is_reserved(&self) -> bool {
        match self {
            Hint::Modified(p)
            | Hint::Created(p)
            | Hint::Written(p)
            | Hint::Appeared(p)
            | Hint::Attrib(p)
            | Hint::Removed(p)
            | Hint::DirAppeared(p)
            | Hint::MovedFrom(p)
            | Hint::MovedTo(p)
            | Hint::RescanDir(p) => p.is_reserved(),
            Hint::Renamed { from, to } => from.is_reserved() && to.is_reserved(),
            Hint::RescanAll | Hint::Barrier { .. } => false,
        }
    }
}

/// Tuning of the batcher.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// How long an unclosed file must be quiet before it is read.
    pub quiet: Duration,
    /// The longest a changing file waits.
    pub max_delay: Duration,
    /// Changes in one directory beyond which it is re-scanned whole.
    pub dir_burst: usize,
    /// Queued paths beyond which a full re-scan replaces them.
    pub max_queued: usize,
    /// How long a name moved away waits for the rename that may follow.
    pub rename_window: Duration,
    /// When a directory that appeared is walked the second time.
    pub settle: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            quiet: Duration::from_millis(50),
            max_delay: Duration::from_secs(1),
            dir_burst: 512,
            max_queued: 100_000,
            rename_window: Duration::from_millis(10),
            settle: Duration::from_millis(250),
        }
    }
}

/// A file is paced once reading it costs this much.
const PACED_FROM: Duration = Duration::from_millis(50);
/// How long a paced file must be quiet to go at once.
const PACED_QUIET: Duration = Duration::from_millis(500);

/// One unit of work for the replicator.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Batch {
    /// Examine everything (events were lost or too many queued).
    pub full: bool,
    /// Renames to apply first, in the order they happened.
    pub renames: Vec<(RelPath, RelPath)>,
    /// Paths to examine, sorted.
    pub paths: Vec<(RelPath, Scope)>,
    /// When the oldest change the batch carries was first seen: the replication lag runs
    /// from there until the batch is durable.
    pub oldest: Option<Instant>,
}

impl Batch {
    pub(crate) fn len(&self) -> usize {
        self.renames.len() + self.paths.len() + self.full as usize
    }
}

#[derive(Debug, Clone)]
struct Item {
    scope: Scope,
    first: Instant,
    last: Instant,
    ready: bool,
    /// Not ready before then, unless made ready (a name moved away, awaiting its rename).
    hold: Option<Instant>,
    /// The change (its `last`) it was last offered early for ([`Batcher::early`]).
    early: Option<Instant>,
}

#[derive(Debug)]
pub(crate) struct Batcher {
    cfg: Config,
    items: BTreeMap<RelPath, Item>,
    /// Renames in order, with when they were seen.
    renames: Vec<(RelPath, RelPath, Instant)>,
    full: bool,
    /// When the pending full re-scan was asked for: what a reconcile started later covers.
    full_since: Option<Instant>,
    /// The oldest change the pending full re-scan stands for.
    full_oldest: Option<Instant>,
    /// Directories that appeared, to walk again when due.
    second_walks: BTreeMap<RelPath, Instant>,
    /// Large files whose last read was costly: not read again before then while they keep
    /// changing ([`Batcher::pace`]).
    paced: std::collections::HashMap<RelPath, Instant>,
}

impl Batcher {
    pub(crate) fn new(cfg: Config) -> Self {
        Batcher {
            cfg,
            items: BTreeMap::new(),
            renames: Vec::new(),
            full: false,
            full_since: None,
            full_oldest: None,
            second_walks: BTreeMap::new(),
            paced: std::collections::HashMap::new(),
        }
    }

    /// Changes waiting to be replicated.
    pub(crate) fn queued(&self) -> usize {
        if self.full {
            self.items.len().max(1)
        } else {
            self.items.len() + self.renames.len()
        }
    }

    /// When the oldest change still waiting was seen (the replication lag starts there);
    /// a pending full re-scan waits since the events were lost.
    pub(crate) fn oldest(&self) -> Option<Instant> {
        let items = self.items.values().map(|it| it.first).min();
        let renames = self.renames.iter().map(|r| r.2).min();
        [items, renames, self.full_oldest]
            .into_iter()
            .flatten()
            .min()
    }

    /// Whether a change to `path` is waiting (queued for it, or for a tree that covers it).
    pub(crate) fn pending(&self, path: &RelPath) -> bool {
        if self.full || self.items.contains_key(path) {
            return true;
        }
        let mut p = path.clone();
        while !p.is_root() {
            p = p.split().0;
            if self.items.get(&p).is_some_and(|it| it.scope == Scope::Tree) {
                return true;
            }
        }
        false
    }

    #[cfg(test)]
    /// Whether a full re-scan is pending.
    pub(crate) fn full_pending(&self) -> bool {
        self.full
    }

    /// Records a hint seen at `now`.
    pub(crate) fn push(&mut self, hint: Hint, now: Instant) {
        if self.full {
            return; // a full re-scan covers everything
        }
        match hint {
            Hint::Modified(p) | Hint::Created(p) => self.upsert(p, Scope::Entry, false, now, now),
            Hint::Written(p) | Hint::Appeared(p) | Hint::Attrib(p) | Hint::Removed(p) => {
                self.upsert(p, Scope::Entry, true, now, now)
            }
            // Either half of a rename waits for the other, which inotify reports apart.
            Hint::MovedFrom(p) => self.hold(p, Scope::Entry, now),
            Hint::MovedTo(p) => {
                self.walk_again(&p, now);
                self.hold(p, Scope::Tree, now)
            }
            Hint::DirAppeared(p) => {
                self.walk_again(&p, now);
                self.upsert(p, Scope::Tree, true, now, now)
            }
            Hint::Renamed { from, to } => {
                // Changes queued under the old name now live under the new one.
                let moved: Vec<RelPath> = self
                    .items
                    .range(from.clone()..)
                    .take_while(|(k, _)| k.starts_with(&from))
                    .map(|(k, _)| k.clone())
                    .collect();
                for old in moved {
                    let item = self.items.remove(&old).unwrap();
                    let suffix = &old.as_bytes()[from.as_bytes().len()..];
                    let mut new = to.as_bytes().to_vec();
                    new.extend_from_slice(suffix);
                    if let Ok(new) = RelPath::new(new) {
                        self.items.insert(new, item);
                    }
                }
                self.renames.push((from.clone(), to.clone(), now));
                self.upsert(from, Scope::Entry, true, now, now);
                self.upsert(to, Scope::Tree, true, now, now);
            }
            Hint::RescanDir(p) => self.upsert(p, Scope::Tree, false, now, now),
            Hint::RescanAll => self.go_full(now, now),
            Hint::Barrier { .. } => self.sweep(now),
        }
    }

    /// Makes everything waiting ready now: a flush wants it on the standby. Directories to
    /// walk a second time are queued now as changes (so the flush waits for them): what was
    /// made in them before their watch existed was never reported, and their watches are
    /// in place by the time a marker placed after them is reported.
    /// Everything queued is due now, as if a barrier had come: files still being written
    /// no longer wait for quiet, nor moves for their other half.
    pub(crate) fn sweep(&mut self, now: Instant) {
        self.sweep_but(now, false);
    }

    /// [`Batcher::sweep`], leaving paced files to their pace (`keep_paced`): a consistency
    /// check's sweep must not read a large file more often than its pace allows.
    pub(crate) fn sweep_but(&mut self, now: Instant, keep_paced: bool) {
        for (p, it) in self.items.iter_mut() {
            if keep_paced && self.paced.get(p).is_some_and(|t| *t > now) {
                continue;
            }
            it.ready = true;
            it.hold = None;
        }
        for (dir, _) in std::mem::take(&mut self.second_walks) {
            self.upsert(dir, Scope::Tree, true, now, now);
        }
    }

    /// Replaces everything queued by one full re-scan, requested at `now`, standing for
    /// changes since `oldest` at the latest.
    fn go_full(&mut self, now: Instant, oldest: Instant) {
        let oldest = self.oldest().map_or(oldest, |o| o.min(oldest));
        self.full = true;
        self.full_since.get_or_insert(now);
        self.full_oldest = Some(oldest);
        self.items.clear();
        self.renames.clear();
    }

    /// Forgets what a full reconcile that started at `start` has covered: everything seen
    /// before it started.
    pub(crate) fn forget_before(&mut self, start: Instant) {
        self.items.retain(|_, it| it.last >= start);
        self.renames.retain(|r| r.2 >= start);
        if self.full_since.is_some_and(|t| t < start) {
            self.full = false;
            self.full_since = None;
            self.full_oldest = None;
        }
    }

    /// Walks `dir` again `settle` after `now`, when its watch is surely in place.
    fn walk_again(&mut self, dir: &RelPath, now: Instant) {
        if !dir.is_reserved() {
            self.second_walks.insert(dir.clone(), now + self.cfg.settle);
        }
    }

    /// Queues `path` again after it failed, not ready before `at` (unless it changes
    /// again meanwhile, or a flush wants everything now). It is still not on the standby
    /// since its change was first seen at `first`: the lag keeps running from there.
    pub(crate) fn retry(&mut self, path: RelPath, at: Instant, first: Instant, now: Instant) {
        if self.full {
            // Covered by the full re-scan, which now stands for this older change too.
            self.full_oldest = Some(self.full_oldest.map_or(first, |o| o.min(first)));
            return;
        }
        if let Some(it) = self.items.get_mut(&path) {
            // Changed again meanwhile: it goes when that change is due, dated from the first.
            it.first = it.first.min(first);
            return;
        }
        self.upsert(path.clone(), Scope::Entry, false, first, now);
        if let Some(it) = self.items.get_mut(&path) {
            it.hold = Some(at);
        }
    }

    /// Queues `path`, not ready before the rename window has passed.
    fn hold(&mut self, path: RelPath, scope: Scope, now: Instant) {
        let until = now + self.cfg.rename_window;
        self.upsert(path.clone(), scope, false, now, now);
        if let Some(it) = self.items.get_mut(&path) {
            it.hold = Some(until);
        }
    }

    /// Queues `path`, changed first at `first` and last at `now`.
    fn upsert(&mut self, path: RelPath, scope: Scope, ready: bool, first: Instant, now: Instant) {
        if path.is_reserved() {
            return;
        }
        let parent = path.split().0;
        match self.items.get_mut(&path) {
            Some(it) => {
                it.scope = it.scope.max(scope);
                it.first = it.first.min(first);
                it.last = now;
                it.ready |= ready;
            }
            None => {
                self.items.insert(
                    path,
                    Item {
                        scope,
                        first,
                        last: now,
                        ready,
                        hold: None,
                        early: None,
                    },
                );
                if self.items.len() > self.cfg.max_queued {
                    self.go_full(now, now);
                    return;
                }
                self.collapse_burst(&parent, now);
            }
        }
    }

    /// Replaces many queued entries of one directory by a re-scan of the directory.
    fn collapse_burst(&mut self, dir: &RelPath, now: Instant) {
        let children: Vec<RelPath> = self
            .items
            .range(dir.clone()..)
            .take_while(|(k, _)| k.starts_with(dir))
            .filter(|(k, _)| k.parent_bytes() == dir.as_bytes() && *k != dir)
            .map(|(k, _)| k.clone())
            .collect();
        if children.len() <= self.cfg.dir_burst {
            return;
        }
        let first = children
            .iter()
            .map(|k| self.items[k].first)
            .min()
            .unwrap_or(now);
        for k in &children {
            self.items.remove(k);
        }
        // A burst is usually still going on (an unpacking, a copy): wait for it to settle.
        let it = self.items.entry(dir.clone()).or_insert(Item {
            scope: Scope::Tree,
            first,
            last: now,
            ready: false,
            hold: None,
            early: None,
        });
        it.scope = Scope::Tree;
        it.last = now;
        it.first = it.first.min(first);
    }

    fn due(&self, path: &RelPath, it: &Item) -> Instant {
        if let (false, Some(h)) = (it.ready, it.hold) {
            return h;
        }
        if it.ready {
            return it.first.min(it.last);
        }
        let due = (it.last + self.cfg.quiet).min(it.first + self.cfg.max_delay);
        match self.paced.get(path) {
            // While it keeps changing, not before its pace allows; once quiet a moment, at
            // once (so the lag at the end is not the pace's).
            Some(until) => due.max((*until).min(it.last + PACED_QUIET)),
            None => due,
        }
    }

    /// The large file `path` took `cost` to read and hash at `now`: while it keeps
    /// changing it is read again no sooner than four times that later, so that reading
    /// it takes at most a fifth of a core (and the rest of the watch's work fits in a
    /// quarter).
    pub(crate) fn pace(&mut self, path: RelPath, cost: Duration, now: Instant) {
        self.paced.retain(|_, t| *t > now);
        if cost >= PACED_FROM {
            self.paced.insert(path, now + cost * 4);
        }
    }

    /// When the next not-yet-ready path becomes ready, if any is waiting.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let walks = self.second_walks.values().min().copied();
        if self.full {
            return walks;
        }
        let items = self.items.iter().map(|(k, it)| self.due(k, it)).min();
        items.into_iter().chain(walks).min()
    }

    /// The batch of everything ready at `now`, if anything is.
    pub(crate) fn poll(&mut self, now: Instant) -> Option<Batch> {
        let due: Vec<RelPath> = self
            .second_walks
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(p, _)| p.clone())
            .collect();
        for p in due {
            self.second_walks.remove(&p);
            if !self.full {
                self.upsert(p, Scope::Tree, true, now, now);
            }
        }
        if self.full {
            self.full = false;
            self.full_since = None;
            return Some(Batch {
                full: true,
                oldest: self.full_oldest.take(),
                ..Batch::default()
            });
        }
        let ready: Vec<RelPath> = self
            .items
            .iter()
            .filter(|(k, it)| self.due(k, it) <= now)
            .map(|(k, _)| k.clone())
            .collect();
        if ready.is_empty() && self.renames.is_empty() {
            return None;
        }
        let mut paths: Vec<(RelPath, Scope)> = Vec::with_capacity(ready.len());
        let mut oldest = self.renames.iter().map(|r| r.2).min();
        for k in ready {
            let it = self.items.remove(&k).unwrap();
            oldest = Some(oldest.map_or(it.first, |o| o.min(it.first)));
            paths.push((k, it.scope));
        }
        // A tree that is examined now covers whatever waits beneath it.
        let trees: Vec<RelPath> = paths
            .iter()
            .filter(|(_, s)| *s == Scope::Tree)
            .map(|(p, _)| p.clone())
            .collect();
        for t in &trees {
            let under: Vec<RelPath> = self
                .items
                .range(t.clone()..)
                .take_while(|(k, _)| k.starts_with(t))
                .map(|(k, _)| k.clone())
                .collect();
            for k in under {
                let it = self.items.remove(&k).unwrap();
                oldest = Some(oldest.map_or(it.first, |o| o.min(it.first)));
            }
        }
        Some(Batch {
            full: false,
            oldest,
            renames: std::mem::take(&mut self.renames)
                .into_iter()
                .map(|(f, t, _)| (f, t))
                .collect(),
            paths: crate::model::manifest::normalize_scopes(&paths),
        })
    }

    /// Paths ready at `now` that a reconcile still running may copy early, of those
    /// `accept` takes: single entries (changed files, mostly), each offered once per change.
    /// They stay queued, so the batch after the reconcile examines them again and an early
    /// copy is only ever a head start. Subtrees (possibly large), the names of renames, and
    /// anything while a full re-scan is pending are left to that batch.
    pub(crate) fn early(
        &mut self,
        now: Instant,
        accept: &dyn Fn(&RelPath) -> bool,
    ) -> Vec<RelPath> {
        if self.full {
            return Vec::new();
        }
        let renamed = |k: &RelPath| {
            self.renames
                .iter()
                .any(|(f, t, _)| k.starts_with(f) || k.starts_with(t))
        };
        let picked: Vec<RelPath> = self
            .items
            .iter()
            .filter(|(k, it)| {
                it.scope == Scope::Entry
                    && it.early != Some(it.last)
                    && self.due(k, it) <= now
                    && !renamed(k)
                    && accept(k)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in &picked {
            if let Some(it) = self.items.get_mut(k) {
                it.early = Some(it.last);
            }
        }
        picked
    }

    /// Puts a batch that could not be carried out back in the queue (ready again), still
    /// dated from its oldest change.
    pub(crate) fn requeue(&mut self, batch: Batch, now: Instant) {
        let first = batch.oldest.unwrap_or(now).min(now);
        if batch.full {
            self.go_full(now, first);
            return;
        }
        // Renames that did not happen: the re-scan of both names covers them.
        for (p, scope) in batch.paths {
            self.upsert(p, scope, true, first, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }
    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }
    fn cfg() -> Config {
        Config {
            quiet: ms(50),
            max_delay: ms(1000),
            dir_burst: 4,
            max_queued: 100,
            rename_window: ms(10),
            settle: ms(200),
        }
    }

    /// A large file whose read cost 300 ms and that is written every 100 ms is read again
    /// no sooner than 1.2 s later; once quiet for half a second, at once. A flush does
    /// not wait for its pace; a consistency check's sweep does.
    #[test]
    fn a_costly_file_that_keeps_changing_is_paced_by_its_cost() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg());
        let img = p("vm.img");
        b.pace(img.clone(), ms(300), t0);
        let mut t = t0;
        while t < t0 + ms(1100) {
            t += ms(100);
            b.push(Hint::Modified(img.clone()), t);
            assert_eq!(b.poll(t + ms(60)), None, "paced at {:?}", t - t0);
        }
        b.push(Hint::Modified(img.clone()), t0 + ms(1150));
        assert!(b.poll(t0 + ms(1199)).is_none());
        assert!(b.poll(t0 + ms(1200)).is_some(), "its pace is over");
        // Paced again, then quiet: it goes half a second after its last change.
        b.pace(img.clone(), ms(1500), t0 + ms(1300));
        b.push(Hint::Modified(img.clone()), t0 + ms(1400));
        assert!(b.poll(t0 + ms(1899)).is_none());
        assert!(b.poll(t0 + ms(1900)).is_some());
        // A consistency check's sweep leaves it to its pace; a flush's takes it.
        b.push(Hint::Modified(img.clone()), t0 + ms(2000));
        b.sweep_but(t0 + ms(2001), true);
        assert!(b.poll(t0 + ms(2001)).is_none());
        b.sweep(t0 + ms(2002));
        assert!(b.poll(t0 + ms(2002)).is_some());
        // A cheap read is not paced.
        b.pace(p("small"), ms(10), t0 + ms(3000));
        b.push(Hint::Modified(p("small")), t0 + ms(3000));
        assert!(b.poll(t0 + ms(3050)).is_some());
    }

    #[test]
    fn a_closed_file_is_ready_at_once() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg());
        b.push(Hint::Created(p("a")), t0);
        b.push(Hint::Modified(p("a")), t0);
        assert_eq!(b.poll(t0), None, "still open: wait");
        b.push(Hint::Written(p("a")), t0 + ms(1));
        let batch = b.poll(t0 + ms(1)).unwrap();
        assert_eq!(batch.paths, vec![(p("a"), Scope::Entry)]);
        assert_eq!(b.poll(t0 + ms(2)), None);
        assert_eq!(b.queued(), 0);
    }

    #[test]
    fn a_file_that_appeared_complete_is_ready_at_once() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg());
        b.push(Hint::Appeared(p("objects/ab12")), t0);
        let batch = b.poll(t0).unwrap();
        assert_eq!(batch.paths, vec![(p("objects/ab12"), Scope::Entry)]);
        // One still being written waits to be closed or quiet.
        b.push(Hint::Created(p("x")), t0 + ms(1));
        assert_eq!(b.poll(t0 + ms(2)), None, "still open: wait");
    }

    #[test]
    fn early_copies_are_offered_once_per_change_and_stay_queued() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg());
        let all = |_: &RelPath| true;
        b.push(Hint::Written(p("d/a")), t0);
        b.push(Hint::Modified(p("d/open")), t0); // not quiet yet
        b.push(Hint::DirAppeared(p("new")), t0); // a subtree: left to the batch
        b.push(Hint::Written(p("z/far")), t0);
        b.push(
            Hint::Renamed {
                from: p("r/old"),
                to: p("r/new"),
            },
            t0,
        );
        // Only what the reconcile takes (here: what its walk has passed).
        let got = b.early(t0, &|q: &RelPath| q.as_bytes() < &b"e"[..]);
        assert_eq!(got, vec![p("d/a")]);
        assert!(b.early(t0 + ms(1), &all).contains(&p("z/far")));
        // Once per change: again only after another change.
        assert!(b.early(t0 + ms(2), &all).is_empty());
        b.push(Hint::Written(p("d/a")), t0 + ms(3));
        assert_eq!(b.early(t0 + ms(3), &all), vec![p("d/a")]);
        assert_eq!(b.early(t0 + ms(60), &all), vec![p("d/open")]);
        // All of them still go in the batch after the reconcile.
        let batch = b.poll(t0 + ms(60)).unwrap();
        for q in ["d/a", "d/open", "new", "z/far"] {
            assert!(
                batch.paths.iter().any(|(x, _)| *x == p(q)),
                "{q}: {batch:?}"
            );
        }
        // Nothing while a full re-scan is pending.
        b.push(Hint::Written(p("d/b")), t0 + ms(61));
        b.push(Hint::RescanAll, t0 + ms(61));
        assert!(b.early(t0 + ms(62), &all).is_empty());
    }

    #[test]
    fn an_unclosed_file_waits_for_quiet() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg());
        b.push(Hint::Modified(p("a")), t0);
        assert_eq!(b.next_deadline(), Some(t0 + ms(50)));
        assert_eq!(b.poll(t0 + ms(49)), None);
        assert!(b.poll(t0 + ms(50)).is_some());
    }

    #[test]
    fn a_file_written_forever_still_goes_within_max_delay() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg());
        let mut t = t0;
        let mut sent_at = None;
        while t < t0 + ms(3000) {
            b.push(Hint::Modified(p("log")), t);
            if b.poll(t).is_some() {
                sent_at.get_or_insert(t);
            }
            t += ms(10);
        }
        let sent = sent_at.expect("never replicated") - t0;
        assert!(sent >= ms(1000) && sent <= ms(1010), "{sent:?}");
    }

    #[test]
    fn removals_attributes_and_new_dirs_are_ready_at_once() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg());
        b.push(Hint::Removed(p("gone")), t0);
        b.push(Hint::Attrib(p("chmod")), t0);
        b.push(Hint::DirAppeared(p("newdir")), t0);
        let batch = b.poll(t0).unwrap();
        assert_eq!(
            batch.paths,
            vec![
                (p("chmod"), Scope::Entry),
                (p("gone"), Scope::Entry),
                (p("newdir"), Scope::Tree)
            ]
        );
    }

    #[test]
    fn a_new_dir_is_walked_again_once_its_watch_is_surely_there() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg());
        b.push(Hint::DirAppeared(p("new")), t0);
        b.push(Hint::MovedTo(p("moved-in")), t0);
        let first = b.poll(t0 + ms(10)).unwrap();
        assert_eq!(
            first.paths,
            vec![(p("moved-in"), Scope::Tree), (p("new"), Scope::Tree)]
        );
        assert_eq!(b.queued(), 0, "a second walk is not a change waiting");
        assert_eq!(b.next_deadline(), Some(t0 + ms(200)));
        assert_eq!(b.poll(t0 + ms(199)), None);
        let second = b.poll(t0 + ms(200)).unwrap();
        assert_eq!(
            second.paths,
            vec![(p("moved-in"), Scope::Tree), (p("new"), Scope::Tree)]
        );
        assert_eq!(b.next_deadline(), None, "once");
        assert_eq!(b.poll(t0 + ms(5000)), None);
    }

    #[test]
    fn renames_carry_pending_changes_and_come_first() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg());
        b.push(Hint::Modified(p("d/f")), t0);
        b.push(Hint::MovedFrom(p("d")), t0);
        b.push(Hint::MovedTo(p("e")), t0);
        b.push(
            Hint::Renamed {
                from: p("d"),
                to: p("e"),
            },
            t0,
        );
        let batch = b.poll(t0).unwrap();
        assert_eq!(batch.renames, vec![(p("d"), p("e"))]);
        // e is walked whole, which covers the change queued as d/f (now e/f).
        assert_eq!(
            batch.paths,
            vec![(p("d"), Scope::Entry), (p("e"), Scope::Tree)]
        );
        assert_eq!(b.queued(), 0);
    }

    #[test]
    fn a_name_moved_away_waits_briefly_for_its_rename() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg());
        b.push(Hint::MovedFrom(p("a")), t0);
        assert_eq!(b.poll(t0 + ms(5)), None, "the other half may be on its way");
        b.push(Hint::MovedTo(p("b")), t0 + ms(6));
        assert_eq!(
            b.poll(t0 + ms(6)),
            None,
            "nor is a name moved in a new tree yet"
        );
        b.push(
            Hint::Renamed {
                from: p("a"),
                to: p("b"),
            },
            t0 + ms(6),
        );
        let batch = b.poll(t0 + ms(6)).unwrap();
        assert_eq!(batch.renames, vec![(p("a"), p("b"))]);
        // Moved out of the tree: a removal once the window has passed.
        b.push(Hint::MovedFrom(p("gone")), t0 + ms(20));
        assert_eq!(b.next_deadline(), Some(t0 + ms(30)));
        assert_eq!(b.poll(t0 + ms(29)), None);
        assert_eq!(
            b.poll(t0 + ms(30)).unwrap().paths,
            vec![(p("gone"), Scope::Entry)]
        );
        b.push(Hint::MovedTo(p("came")), t0 + ms(40));
        assert_eq!(
            b.poll(t0 + ms(50)).unwrap().paths,
            vec![(p("came"), Scope::Tree)]
        );
    }

    #[test]
    fn a_burst_in_one_directory_collapses_to_a_rescan() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg());
        for i in 0..10 {
            b.push(Hint::Written(p(&format!("big/f{i}"))), t0 + ms(i));
        }
        b.push(Hint::Written(p("other")), t0 + ms(10));
        assert_eq!(b.queued(), 2);
        // The lone file goes now; the busy directory once it has been quiet.
        let first = b.poll(t0 + ms(10)).unwrap();
        assert_eq!(first.paths, vec![(p("other"), Scope::Entry)]);
        assert_eq!(b.poll(t0 + ms(30)), None);
        let second = b.poll(t0 + ms(60)).unwrap();
        assert_eq!(second.paths, vec![(p("big"), Scope::Tree)]);
    }

    #[test]
    fn overflow_and_lost_events_become_one_full_rescan() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg());
        for i in 0..101 {
            b.push(Hint::Written(p(&format!("d{i}/f"))), t0);
        }
        assert!(b.full_pending());
        let batch = b.poll(t0).unwrap();
        assert!(batch.full && batch.paths.is_empty());
        assert_eq!(b.poll(t0), None);
        b.push(Hint::Written(p("x")), t0);
        b.push(Hint::RescanAll, t0);
        assert!(b.poll(t0).unwrap().full);
    }

    #[test]
    fn a_failed_batch_can_be_requeued_and_keeps_its_age() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg());
        b.push(Hint::Written(p("a")), t0);
        let batch = b.poll(t0).unwrap();
        assert_eq!(batch.oldest, Some(t0));
        assert_eq!(b.oldest(), None);
        b.requeue(batch.clone(), t0 + ms(5));
        assert_eq!(
            b.oldest(),
            Some(t0),
            "the lag still runs from the first change"
        );
        let again = b.poll(t0 + ms(5)).unwrap();
        assert_eq!((again.paths, again.oldest), (batch.paths, Some(t0)));
        // A full re-scan that failed is dated from what it replaced.
        b.push(Hint::Written(p("b")), t0 + ms(6));
        b.push(Hint::RescanAll, t0 + ms(7));
        assert_eq!(b.oldest(), Some(t0 + ms(6)));
        let full = b.poll(t0 + ms(8)).unwrap();
        assert_eq!(full.oldest, Some(t0 + ms(6)));
        b.requeue(full, t0 + ms(9));
        assert!(b.full_pending());
        assert_eq!(b.oldest(), Some(t0 + ms(6)));
    }

    #[test]
    fn events_lost_after_a_reconcile_started_are_not_forgotten_by_it() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg());
        b.push(Hint::Written(p("old")), t0);
        // A reconcile starts at t0+10; the queue overflows at t0+20, after it started.
        b.push(Hint::RescanAll, t0 + ms(20));
        b.forget_before(t0 + ms(10));
        assert!(
            b.full_pending(),
            "the overflow came after the reconcile began"
        );
        assert_eq!(b.oldest(), Some(t0));
    }

    #[test]
    fn a_full_reconcile_covers_what_was_seen_before_it() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg());
        b.push(Hint::Written(p("old")), t0);
        b.push(Hint::RescanAll, t0);
        b.forget_before(t0 + ms(10));
        b.push(Hint::Written(p("new")), t0 + ms(20));
        let batch = b.poll(t0 + ms(20)).unwrap();
        assert!(!batch.full);
        assert_eq!(batch.paths, vec![(p("new"), Scope::Entry)]);
    }

    #[test]
    fn the_reserved_name_is_ignored() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg());
        b.push(Hint::Written(p(".hotsync/lock")), t0);
        assert_eq!(b.poll(t0), None);
    }

    #[test]
    fn a_flush_barrier_makes_everything_waiting_ready_at_once() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg());
        b.push(Hint::Modified(p("open.log")), t0);
        b.push(Hint::MovedFrom(p("gone")), t0);
        b.push(Hint::DirAppeared(p("new")), t0);
        let first = b.poll(t0 + ms(1)).unwrap();
        assert_eq!(first.paths, vec![(p("new"), Scope::Tree)]);
        // Still open, still held, and the second walk not due: nothing until the barrier.
        assert_eq!(b.poll(t0 + ms(2)), None);
        b.push(Hint::Barrier { id: 1 }, t0 + ms(2));
        // The second walk counts as waiting (a flush must wait for it).
        assert_eq!(b.queued(), 3);
        let batch = b.poll(t0 + ms(2)).unwrap();
        let paths: Vec<&RelPath> = batch.paths.iter().map(|(p, _)| p).collect();
        assert_eq!(paths, vec![&p("gone"), &p("new"), &p("open.log")]);
        assert_eq!(batch.oldest, Some(t0));
        assert_eq!(b.poll(t0 + ms(300)), None, "the second walk was done early");
    }
}
