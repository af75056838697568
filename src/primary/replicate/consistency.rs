//! Whether a batch left the standby at a consistent point (DESIGN §10), as pure decisions
//! stepped by the replica machine.
//!
//! A batch (or a full reconcile) closes at a moment of the hint stream, the *close*; it
//! reads what it carries after that. Nothing seen before the close may be left queued
//! (every change before it is in the batch or already on the standby), and every path must
//! be carried (none failed, none vanished while read). Then, judged by the changes
//! reported from the close until a barrier placed after the batch's last read comes back
//! through the hints (which keep the kernel's order):
//!
//! - **None at all**: the tree still stood so when the barrier came back.
//! - **Only to paths the batch did not carry** (new files of a steady writer, say): the
//!   standby has every other path as it stood at the close, and the carried ones read as
//!   they stood at the close too, since nothing changed them: the tree as of the close.
//! - **Only to the contents or attributes of one carried file, and to nothing else** (a
//!   log appended every few milliseconds, one database file written all the time): every
//!   other path stood still, and the hot file was read in a single steady read (the sender
//!   reads again a file whose status changed meanwhile, and Linux 6.13 and later give a
//!   write after a `stat` a timestamp of its own): the tree as of that read.
//! - **Anything else** (two carried files changed, a carried file and any other path, a
//!   name of a carried path, or lost events): no point, since nothing tells in which order
//!   the reads and the writes fell.
//!
//! Then the standby is told it holds a consistent point, before the next batch begins: the
//! undo log there starts its next window from exactly that batch. A tree that never pauses
//! simply has no new point; the check then costs nothing.

use super::batcher::Hint;
use crate::model::manifest::Scope;
use crate::model::path::RelPath;
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// The bit that marks a barrier as a consistency check's (a flush's barriers are numbered
/// without it).
pub(crate) const CHECK_BARRIER: u64 = 1 << 63;

/// How long a check waits for its barrier before giving up (a lost marker); the next
/// batch waits meanwhile.
pub(crate) const BARRIER_WAIT: Duration = Duration::from_secs(1);

/// What the check wants done next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Place a barrier in the hints, and report [`Judge::placed`].
    Barrier,
    /// Nothing else may begin before this (the barrier is on its way).
    Wait(Instant),
    /// Tell the standby batch `seq` left it at the tree as it stood at `at`; report
    /// [`Judge::held`] or [`Judge::failed`].
    Hold { seq: u64, at: Instant },
    /// No check is going on.
    Nothing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The batch is being carried out.
    Sending,
    /// It is durable on the standby: a barrier is to be placed.
    Placing,
    /// Barrier `id` was placed at `since`.
    Barrier { id: u64, since: Instant },
    /// The barrier came back with nothing before it: consistent as of `at`.
    Ready { at: Instant },
}

#[derive(Debug, Clone)]
struct Check {
    seq: u64,
    /// Changes reported when the batch closed, and when that was.
    hints: u64,
    closed_at: Instant,
    /// What the batch carries.
    carried: Carried,
    /// The one carried file whose contents or attributes changed since the close, if one
    /// did.
    hot: Option<RelPath>,
    /// Paths the batch does not carry changed since the close.
    others: bool,
    phase: Phase,
}

/// The paths a batch carries, to tell whether a change touches one.
#[derive(Debug, Clone, Default)]
pub(crate) struct Carried {
    /// Everything (a full reconcile).
    all: bool,
    /// Entries examined alone, and the names of its renames.
    entries: HashSet<RelPath>,
    /// Subtrees examined whole.
    trees: HashSet<RelPath>,
    /// Every directory above an entry or subtree: renaming or removing one moves what the
    /// batch carries.
    above: HashSet<RelPath>,
}

impl Carried {
    /// Everything: a full reconcile reads the whole tree.
    pub(crate) fn everything() -> Carried {
        Carried {
            all: true,
            ..Carried::default()
        }
    }

    /// What a batch of `paths` (with their scopes) and `renames` carries.
    pub(crate) fn of<'a>(
        paths: impl IntoIterator<Item = (&'a RelPath, Scope)>,
        renames: impl IntoIterator<Item = &'a RelPath>,
    ) -> Carried {
        let mut c = Carried::default();
        let named = paths
            .into_iter()
            .chain(renames.into_iter().map(|p| (p, Scope::Entry)));
        for (p, scope) in named {
            let mut up = p.clone();
            while !up.is_root() {
                up = up.split().0;
                if !c.above.insert(up.clone()) {
                    break;
                }
            }
            match scope {
                Scope::Entry => c.entries.insert(p.clone()),
                Scope::Tree => c.trees.insert(p.clone()),
            };
        }
        c
    }

    /// Whether the batch reads `p` (an entry of it, or in a subtree of it).
    fn reads(&self, p: &RelPath) -> bool {
        if self.all || self.entries.contains(p) {
            return true;
        }
        let mut up = p.clone();
        loop {
            if self.trees.contains(&up) {
                return true;
            }
            if up.is_root() {
                return false;
            }
            up = up.split().0;
        }
    }

    /// Whether a change of the name `p` moves or changes what the batch reads: `p` itself,
    /// a directory above it, or the directory whose entries `p` is among.
    fn named(&self, p: &RelPath) -> bool {
        self.reads(p) || self.above.contains(p) || (!p.is_root() && self.reads(&p.split().0))
    }
}

/// The check of the batch in flight, and what the standby holds.
#[derive(Debug, Default)]
pub(crate) struct Judge {
    /// Changes reported so far.
    hints: u64,
    check: Option<Check>,
    /// The last consistent point the standby holds: its batch, when this tree stood so,
    /// and the changes reported by then.
    held: Option<(u64, Instant, u64)>,
}

impl Judge {
    /// Batch `seq`, which carries `carried`, closes at `now`; `clean`: nothing seen before
    /// it was left queued.
    pub(crate) fn closed(&mut self, seq: u64, clean: bool, now: Instant, carried: Carried) {
        self.check = clean.then_some(Check {
            seq,
            hints: self.hints,
            closed_at: now,
            carried,
            hot: None,
            others: false,
            phase: Phase::Sending,
        });
    }

    /// A change was reported (not a barrier): the check goes on only as the rules of the
    /// module say.
    pub(crate) fn hint(&mut self, hint: &Hint) {
        self.hints += 1;
        let Some(c) = &mut self.check else {
            return;
        };
        let keep = match hint {
            Hint::Modified(p) | Hint::Written(p) | Hint::Attrib(p) if c.carried.reads(p) => {
                let same = c.hot.as_ref().is_none_or(|hot| hot == p);
                if same && !c.others {
                    c.hot = Some(p.clone());
                }
                same && !c.others
            }
            Hint::Modified(_) | Hint::Written(_) | Hint::Attrib(_) => {
                c.others = true;
                c.hot.is_none()
            }
            Hint::Created(p)
            | Hint::Appeared(p)
            | Hint::Removed(p)
            | Hint::DirAppeared(p)
            | Hint::MovedFrom(p)
            | Hint::MovedTo(p)
            | Hint::RescanDir(p) => {
                c.others = true;
                !c.carried.named(p) && c.hot.is_none()
            }
            Hint::Renamed { from, to } => {
                c.others = true;
                !c.carried.named(from) && !c.carried.named(to) && c.hot.is_none()
            }
            Hint::RescanAll => false,
            Hint::Barrier { .. } => true,
        };
        if !keep {
            self.check = None;
        }
    }

    /// Batch `seq` is durable on the standby; `whole`: every path of it was carried.
    pub(crate) fn done(&mut self, seq: u64, whole: bool) {
        match &mut self.check {
            Some(c) if c.seq == seq && whole => c.phase = Phase::Placing,
            _ => self.check = None,
        }
    }

    /// The batch, the barrier or the telling failed (or the connection went): no check.
    pub(crate) fn failed(&mut self) {
        self.check = None;
    }

    /// The check's barrier `id` was placed at `now`.
    pub(crate) fn placed(&mut self, id: u64, now: Instant) {
        if let Some(c) = &mut self.check
            && c.phase == Phase::Placing
        {
            c.phase = Phase::Barrier { id, since: now };
        }
    }

    /// Barrier `id` came back through the hints at `now`.
    pub(crate) fn barrier(&mut self, id: u64, now: Instant) {
        let Some(c) = &mut self.check else {
            return;
        };
        if !matches!(c.phase, Phase::Barrier { id: mine, .. } if mine == id) {
            return;
        }
        // `hint` ended any check the rules do not allow, so the tree stood as it is now
        // (nothing changed), as at the close (only paths not carried changed), or as at
        // the hot file's read, a moment since the close: say the close then, so that the
        // point's age is never understated.
        let at = if c.hot.is_some() || c.others {
            c.closed_at
        } else {
            now
        };
        c.phase = Phase::Ready { at };
    }

    /// What to do next at `now`.
    pub(crate) fn poll(&mut self, now: Instant) -> Step {
        let Some(c) = &self.check else {
            return Step::Nothing;
        };
        match c.phase {
            Phase::Sending => Step::Nothing,
            Phase::Placing => Step::Barrier,
            Phase::Barrier { since, .. } if now < since + BARRIER_WAIT => {
                Step::Wait(since + BARRIER_WAIT)
            }
            Phase::Barrier { .. } => {
                self.check = None;
                Step::Nothing
            }
            Phase::Ready { at } => Step::Hold { seq: c.seq, at },
        }
    }

    /// The standby holds the consistent point of batch `seq`, as the tree stood at `at`.
    pub(crate) fn held(&mut self, seq: u64, at: Instant) {
        let hints = self.check.as_ref().map_or(self.hints, |c| c.hints);
        self.check = None;
        self.held = Some((seq, at, hints));
    }

    /// The moment before which every change is in the standby's consistent point: `now`
    /// while no change was reported since. `None` before the standby holds one.
    pub(crate) fn stands_before(&self, now: Instant) -> Option<Instant> {
        self.held
            .map(|(_, at, hints)| if hints == self.hints { now } else { at })
    }

    /// How long ago the tree stood as the standby's consistent point does, at `now`: zero
    /// while no change was reported since (the tree still stands so). `None` before the
    /// standby holds one.
    pub(crate) fn age(&self, now: Instant) -> Option<Duration> {
        self.held.map(|(_, at, hints)| {
            if hints == self.hints {
                Duration::ZERO
            } else {
                now.saturating_duration_since(at)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    /// A steady writer of new files does not hold the tree back: what the batch did not
    /// carry changed, so the point is the tree as of the close. A change to what it
    /// carried, or to a name above or beside it, ends the check.
    #[test]
    fn changes_to_paths_not_carried_leave_the_tree_as_of_the_close() {
        let t = Instant::now();
        let batch = || {
            Carried::of(
                [(&p("mail/new/1"), Scope::Entry), (&p("logs"), Scope::Tree)],
                [&p("mail/tmp/0"), &p("mail/cur/0")],
            )
        };
        let mut j = Judge::default();
        j.closed(1, true, t, batch());
        j.hint(&Hint::Created(p("mail/new/2")));
        j.hint(&Hint::Written(p("mail/new/2")));
        j.hint(&Hint::Removed(p("mail/cur/7")));
        j.done(1, true);
        assert_eq!(j.poll(t), Step::Barrier);
        j.placed(CHECK_BARRIER | 1, t);
        j.hint(&Hint::Renamed {
            from: p("mail/tmp/9"),
            to: p("mail/new/9"),
        });
        j.barrier(CHECK_BARRIER | 1, t + ms(7));
        assert_eq!(j.poll(t + ms(7)), Step::Hold { seq: 1, at: t });
        // What ends it: two carried files, a name under a carried tree, a directory above
        // a carried path, a rename's other name, lost events; and a carried file changing
        // besides a path not carried.
        let ends = [
            vec![Hint::Attrib(p("mail/new/1")), Hint::Modified(p("logs/app"))],
            vec![Hint::Created(p("logs/today"))],
            vec![Hint::MovedFrom(p("mail"))],
            vec![Hint::Removed(p("mail/tmp/0"))],
            vec![Hint::RescanAll],
            vec![Hint::Modified(p("logs/app")), Hint::Created(p("x"))],
            vec![Hint::Created(p("x")), Hint::Modified(p("logs/app"))],
        ];
        for hints in ends {
            j.closed(2, true, t, batch());
            for h in &hints {
                j.hint(h);
            }
            j.done(2, true);
            assert_eq!(j.poll(t), Step::Nothing, "{hints:?}");
        }
    }

    /// A quiet tree: the batch closes, is carried, the barrier comes back with nothing
    /// before it, and the standby is told.
    #[test]
    fn a_batch_of_a_quiet_tree_is_a_consistent_point() {
        let t = Instant::now();
        let mut j = Judge::default();
        j.hint(&Hint::Created(p("new")));
        j.closed(1, true, t, Carried::everything());
        assert_eq!(j.poll(t), Step::Nothing, "nothing to do while it is sent");
        j.done(1, true);
        assert_eq!(j.poll(t), Step::Barrier);
        j.placed(CHECK_BARRIER | 7, t);
        assert_eq!(j.poll(t + ms(1)), Step::Wait(t + BARRIER_WAIT));
        j.barrier(CHECK_BARRIER | 7, t + ms(2));
        assert_eq!(
            j.poll(t + ms(2)),
            Step::Hold {
                seq: 1,
                at: t + ms(2)
            }
        );
        j.held(1, t + ms(2));
        assert_eq!(j.poll(t + ms(3)), Step::Nothing);
        // Still standing so: nothing would be lost.
        assert_eq!(j.age(t + ms(500)), Some(Duration::ZERO));
        // A change since: a failover now loses what came after the point.
        j.hint(&Hint::Created(p("new")));
        assert_eq!(j.age(t + ms(500)), Some(ms(498)));
    }

    /// One file written all the time (a log, a database file) does not hold the rest of
    /// the tree back: the point is the tree as of the close, or of the file's one steady
    /// read. A second changing path, or a change of names, ends the check.
    #[test]
    fn one_hot_file_does_not_hold_the_tree_back_but_two_do() {
        let t = Instant::now();
        let log = RelPath::new("var/log/app.log").unwrap();
        let db = RelPath::new("db/data").unwrap();
        let mut j = Judge::default();
        j.closed(1, true, t, Carried::everything());
        j.hint(&Hint::Modified(log.clone()));
        j.hint(&Hint::Modified(log.clone()));
        j.done(1, true);
        assert_eq!(j.poll(t + ms(5)), Step::Barrier);
        j.placed(CHECK_BARRIER | 1, t + ms(5));
        j.hint(&Hint::Modified(log.clone()));
        j.barrier(CHECK_BARRIER | 1, t + ms(9));
        assert_eq!(
            j.poll(t + ms(9)),
            Step::Hold { seq: 1, at: t },
            "as of the close, never later"
        );
        j.held(1, t);
        assert_eq!(j.age(t + ms(100)), Some(ms(100)), "the log went on");
        // A second file, before or after the batch is durable.
        j.closed(2, true, t, Carried::everything());
        j.hint(&Hint::Modified(log.clone()));
        j.hint(&Hint::Written(db.clone()));
        j.done(2, true);
        assert_eq!(j.poll(t), Step::Nothing);
        j.closed(3, true, t, Carried::everything());
        j.hint(&Hint::Written(db.clone()));
        j.done(3, true);
        j.poll(t);
        j.placed(CHECK_BARRIER | 2, t);
        j.hint(&Hint::Modified(log.clone()));
        j.barrier(CHECK_BARRIER | 2, t + ms(1));
        assert_eq!(j.poll(t + ms(1)), Step::Nothing);
        // A change of names.
        j.closed(4, true, t, Carried::everything());
        j.hint(&Hint::Modified(log.clone()));
        j.hint(&Hint::Created(p("new")));
        j.done(4, true);
        assert_eq!(j.poll(t), Step::Nothing);
    }

    /// Any change between the close and the barrier, anything left queued, a path not
    /// carried, a lost barrier: no consistent point, and nothing waits for one.
    #[test]
    fn a_change_while_it_is_judged_means_no_point() {
        let t = Instant::now();
        // Changed while sent.
        let mut j = Judge::default();
        j.closed(1, true, t, Carried::everything());
        j.hint(&Hint::Created(p("new")));
        j.done(1, true);
        assert_eq!(j.poll(t), Step::Nothing);
        // Changed while the barrier travels.
        j.closed(2, true, t, Carried::everything());
        j.done(2, true);
        assert_eq!(j.poll(t), Step::Barrier);
        j.placed(CHECK_BARRIER | 1, t);
        j.hint(&Hint::Created(p("new")));
        assert_eq!(j.poll(t), Step::Nothing, "the next batch need not wait");
        j.barrier(CHECK_BARRIER | 1, t);
        assert_eq!(j.poll(t), Step::Nothing);
        // Left queued at the close; a path not carried.
        j.closed(3, false, t, Carried::everything());
        j.done(3, true);
        assert_eq!(j.poll(t), Step::Nothing);
        j.closed(4, true, t, Carried::everything());
        j.done(4, false);
        assert_eq!(j.poll(t), Step::Nothing);
        // Another check's barrier is not this one's; a barrier lost is given up.
        j.closed(5, true, t, Carried::everything());
        j.done(5, true);
        j.poll(t);
        j.placed(CHECK_BARRIER | 2, t);
        j.barrier(CHECK_BARRIER | 3, t + ms(1));
        assert_eq!(j.poll(t + ms(1)), Step::Wait(t + BARRIER_WAIT));
        assert_eq!(j.poll(t + BARRIER_WAIT), Step::Nothing);
        assert_eq!(j.poll(t + BARRIER_WAIT), Step::Nothing);
        assert_eq!(j.age(t), None);
    }

    #[test]
    fn a_failure_ends_the_check() {
        let t = Instant::now();
        let mut j = Judge::default();
        j.closed(1, true, t, Carried::everything());
        j.done(1, true);
        j.failed();
        assert_eq!(j.poll(t), Step::Nothing);
        // A batch that is not the one checked.
        j.closed(2, true, t, Carried::everything());
        j.done(3, true);
        assert_eq!(j.poll(t), Step::Nothing);
    }
}
