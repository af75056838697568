//! Whether a batch left the standby at a consistent point (DESIGN §10), as pure decisions
//! stepped by the replica machine.
//!
//! A batch (or a full reconcile) closes at a moment of the hint stream; it reads what it
//! carries after that. The standby's tree is the primary's tree as it stood at one instant
//! when, from the batch's close until a barrier placed after its last read comes back
//! through the hints, no change was reported (the hint stream keeps the kernel's order, so
//! nothing changed meanwhile), nothing was left queued at the close (every change seen
//! before it is in the batch or already on the standby), and every path was carried
//! (none failed, none vanished while read). Then the standby is told it holds a
//! consistent point, before the next batch begins: the undo log there starts its next
//! window from exactly that batch. A tree that never pauses simply has no new point; the
//! check then costs nothing, since the first change after the close ends it.

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

#[derive(Debug, Clone, Copy)]
struct Check {
    seq: u64,
    /// Changes reported when the batch closed.
    hints: u64,
    phase: Phase,
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
    /// Batch `seq` closes now; `clean`: nothing seen before it was left queued.
    pub(crate) fn closed(&mut self, seq: u64, clean: bool) {
        self.check = clean.then_some(Check {
            seq,
            hints: self.hints,
            phase: Phase::Sending,
        });
    }

    /// A change was reported: a batch closed before it cannot be consistent any more.
    pub(crate) fn hint(&mut self) {
        self.hints += 1;
        if self
            .check
            .is_some_and(|c| !matches!(c.phase, Phase::Sending))
        {
            self.check = None;
        }
    }

    /// Batch `seq` is durable on the standby; `whole`: every path of it was carried.
    pub(crate) fn done(&mut self, seq: u64, whole: bool) {
        match &mut self.check {
            Some(c) if c.seq == seq && whole && c.hints == self.hints => c.phase = Phase::Placing,
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
        // `hint` ends a check whose barrier is out, so no change came before this one.
        c.phase = Phase::Ready { at: now };
    }

    /// What to do next at `now`.
    pub(crate) fn poll(&mut self, now: Instant) -> Step {
        let Some(c) = self.check else {
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
        let hints = self.check.map_or(self.hints, |c| c.hints);
        self.check = None;
        self.held = Some((seq, at, hints));
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

    /// A quiet tree: the batch closes, is carried, the barrier comes back with nothing
    /// before it, and the standby is told.
    #[test]
    fn a_batch_of_a_quiet_tree_is_a_consistent_point() {
        let t = Instant::now();
        let mut j = Judge::default();
        j.hint();
        j.closed(1, true);
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
        j.hint();
        assert_eq!(j.age(t + ms(500)), Some(ms(498)));
    }

    /// Any change between the close and the barrier, anything left queued, a path not
    /// carried, a lost barrier: no consistent point, and nothing waits for one.
    #[test]
    fn a_change_while_it_is_judged_means_no_point() {
        let t = Instant::now();
        // Changed while sent.
        let mut j = Judge::default();
        j.closed(1, true);
        j.hint();
        j.done(1, true);
        assert_eq!(j.poll(t), Step::Nothing);
        // Changed while the barrier travels.
        j.closed(2, true);
        j.done(2, true);
        assert_eq!(j.poll(t), Step::Barrier);
        j.placed(CHECK_BARRIER | 1, t);
        j.hint();
        assert_eq!(j.poll(t), Step::Nothing, "the next batch need not wait");
        j.barrier(CHECK_BARRIER | 1, t);
        assert_eq!(j.poll(t), Step::Nothing);
        // Left queued at the close; a path not carried.
        j.closed(3, false);
        j.done(3, true);
        assert_eq!(j.poll(t), Step::Nothing);
        j.closed(4, true);
        j.done(4, false);
        assert_eq!(j.poll(t), Step::Nothing);
        // Another check's barrier is not this one's; a barrier lost is given up.
        j.closed(5, true);
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
        j.closed(1, true);
        j.done(1, true);
        j.failed();
        assert_eq!(j.poll(t), Step::Nothing);
        // A batch that is not the one checked.
        j.closed(2, true);
        j.done(3, true);
        assert_eq!(j.poll(t), Step::Nothing);
    }
}
