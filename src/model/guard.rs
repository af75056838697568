//! The mass-delete guards, as pure decisions: an empty source, or a plan deleting a large
//! share of the standby, is refused unless `--force`. An unmounted disk must never wipe the
//! standby.
//!
//! The percentage guard judges what it exists for: absences a scan infers in a source whose
//! continuity is not established (a disk that went away looks exactly like a tree whose
//! files were removed). Deletions a running watch saw happen, and scans of a root it has
//! watched without a gap since a reconcile the guard let through, are ordinary work
//! ([`Absences`], `Continuity`). Entries the standby holds with another type than the
//! primary's are not absences: the primary has them, so they are replaced, never guarded.

use crate::error::Error;
use crate::model::manifest::Manifest;
use crate::model::plan::Plan;

/// Below this many deletions the percentage guard does not apply.
pub(crate) const GUARD_MIN_REMOVALS: usize = 10;

/// What a plan whose deletions the percentage guard refuses does with the rest. Either way
/// everything else is carried out and the refusal is reported ([`Summary::refused`]).
///
/// [`Summary::refused`]: crate::model::summary::Summary::refused
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MassDelete {
    /// `sync`: the command ends with exit 2, the refusal on stderr and in its JSON.
    Refuse,
    /// `watch`, which must keep replicating: the refusal is logged, and an empty source is
    /// refused even with `--force`.
    SkipDeletes,
}

/// Where a plan's absences (standby entries the primary lacks, to be deleted) come from:
/// whether they may be a source that went away, which is what the percentage guard is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Absences {
    /// Inferred by a scan of a source whose continuity is not established: `sync`, a
    /// watch's first reconcile of a source root it has just opened (at start, or after a
    /// pause: the root vanished, was replaced, or emptied) or whose mounted filesystems
    /// changed (a disk unmounted inside it), and every scan of a watch whose reconcile the
    /// guard refused. Guarded.
    Inferred,
    /// Reported by a running watch's events (a file removed, a directory renamed or
    /// re-scanned after a burst) in a root it has watched without a gap since a reconcile
    /// the guard let through: `git gc`, `rm -r`. Not guarded.
    Observed,
    /// Found by a full re-scan of such a root: a reconnect, an event queue overflow, a
    /// periodic re-scan, a repair. Not guarded.
    Rescanned,
}

impl Absences {
    /// Whether the percentage guard judges these absences.
    pub(crate) fn guarded(self) -> bool {
        self == Absences::Inferred
    }
}

/// The limits a plan is held to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub force: bool,
    pub max_delete_percent: u32,
    pub on_mass_delete: MassDelete,
    pub absences: Absences,
}

/// The percentage guard's verdict on a plan's deletions.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub(crate) enum Deletions {
    /// Carry them out.
    Allowed,
    /// Leave them undone (everything else is carried out), for this reason.
    Refused(String),
}

#[cfg(test)]
/// Judges `plan`'s deletions. `source_empty` says whether the primary's tree holds
/// nothing; `remote_total` is the standby's size at the last full listing (the yardstick
/// for a partial plan); `src` names the source in messages. Entries replaced by another
/// type are not judged: the primary has them.
///
/// # Errors
/// [`Error::SourceEmpty`] for an empty source facing a standby that is not (nothing at all may
/// be carried out), naming what it would remove and how to override it.
pub(crate) fn check(
    src: &str,
    source_empty: bool,
    plan: &Plan,
    remote_total: usize,
    limits: Limits,
) -> Result<Deletions, Error> {
    let total = remote_total.max(plan.remote_entries);
    let deleted = plan.removed_entries - plan.cleared_entries;
    check_counts(src, source_empty, deleted, total, limits)
}

/// [`check`] for a plan known only by its counts (a streamed reconcile): `deleted` standby
/// entries of its `total`, entries replaced by another type excluded.
///
/// # Errors
/// As [`check`].
pub(crate) fn check_counts(
    src: &str,
    source_empty: bool,
    deleted: usize,
    total: usize,
    limits: Limits,
) -> Result<Deletions, Error> {
    if deleted == 0 {
        return Ok(Deletions::Allowed);
    }
    // Watch never empties the standby, even with --force or a root it watched all along:
    // a disk that goes away must not take the standby's copy with it.
    let watching = limits.on_mass_delete == MassDelete::SkipDeletes;
    if source_empty && (!limits.force || watching) {
        return Err(Error::SourceEmpty(format!(
            "SRC {src} is empty but the standby holds {} entries: refusing to delete them all \
             (is a disk not mounted?); use --force if the source really is empty",
            total
        )));
    }
    if limits.force || !limits.absences.guarded() {
        return Ok(Deletions::Allowed);
    }
    let pct = limits.max_delete_percent as usize;
    if deleted >= GUARD_MIN_REMOVALS && deleted * 100 > pct * total {
        return Ok(Deletions::Refused(format!(
            "the plan removes {deleted} of the standby's {total} entries, more than --max-delete {pct}%: \
             refusing (is part of SRC {src} missing?); use --force to remove them"
        )));
    }
    Ok(Deletions::Allowed)
}

/// What a refusal says once the rest of its plan is carried out: the deletions, and only
/// they, were left undone. `replaced`: standby entries of another type than the primary's
/// were removed to make way for them (the summary counts them in `files_deleted`).
pub(crate) fn refused_after_the_rest(why: &str, replaced: bool) -> String {
    if replaced {
        format!(
            "{why} (everything but the deletions was mirrored, the replacement of standby \
             entries of another type included)"
        )
    } else {
        format!("{why} (everything but the deletions was mirrored)")
    }
}

/// Drops the deletions from `plan` (after a refusal): everything else is still carried
/// out. Returns the standby entries kept.
pub(crate) fn skip_deletes(plan: &mut Plan, remote: &Manifest) -> u64 {
    let kept = plan
        .deletes
        .iter()
        .map(|p| remote.count_under(p))
        .sum::<u64>();
    plan.removed_entries -= kept as usize;
    plan.deletes.clear();
    kept
}

/// What a watch knows of its source root's continuity, to say where the absences of each
/// scan come from. Pure bookkeeping: the driver tells it when a root is opened and how each
/// full reconcile ended.
///
/// A root is continuous once a full reconcile begun after it was opened ended without a
/// refusal: from then on the watch has seen every change to it (the watcher runs from before
/// that reconcile, and any gap — a vanished, replaced or emptied root, a stopped watcher —
/// pauses the watch and opens the root anew; a change of the filesystems mounted inside it
/// counts as a new root too). A refused reconcile leaves it not continuous, so later scans
/// cannot carry out what the guard refused.
#[derive(Debug, Default, Clone)]
pub(crate) struct Continuity {
    /// Bumped each time a source root is opened.
    root: u64,
    /// The root a reconcile made continuous, if any.
    continuous: Option<u64>,
}

/// What a scan covers, for [`Continuity::absences`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scan {
    /// The paths a batch of events named (and the subtrees they cover).
    Events,
    /// The whole tree (a reconcile, a re-scan) or what a verify found.
    Full,
}

/// Which root a scan began under, to report its end with ([`Continuity::reconciled`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket(u64);

impl Continuity {
    /// A source root was opened (the first, or a new one after a pause), or the
    /// filesystems mounted in it changed: its continuity must be established again.
    pub(crate) fn opened(&mut self) {
        self.root += 1;
    }

    /// Where the absences of a `scan` begun now come from, and its ticket. `mounts_known`:
    /// whether the filesystems mounted in the source are followed (a change of them is a
    /// new root, [`Continuity::opened`]); if not, a disk unmounted from inside the tree
    /// could go unnoticed, and every scan is judged as a new source's.
    pub(crate) fn absences(&self, scan: Scan, mounts_known: bool) -> (Absences, Ticket) {
        let continuous = mounts_known && self.continuous == Some(self.root);
        let absences = match (continuous, scan) {
            (false, _) => Absences::Inferred,
            (true, Scan::Events) => Absences::Observed,
            (true, Scan::Full) => Absences::Rescanned,
        };
        (absences, Ticket(self.root))
    }

    /// A full reconcile begun with `ticket` ended, its deletions `refused` or not. One begun
    /// under a root since replaced says nothing of the new one.
    pub(crate) fn reconciled(&mut self, ticket: Ticket, refused: bool) {
        if ticket.0 == self.root {
            self.continuous = (!refused).then_some(self.root);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::manifest::testing::{dir, file, manifest};
    use crate::model::path::RelPath;

    fn plan_removing(n: usize, remote: usize) -> Plan {
        Plan {
            deletes: (0..n)
                .map(|i| RelPath::new(format!("x{i}")).unwrap())
                .collect(),
            removed_entries: n,
            remote_entries: remote,
            ..Plan::default()
        }
    }
    fn limits(force: bool, on: MassDelete) -> Limits {
        Limits {
            force,
            max_delete_percent: 50,
            on_mass_delete: on,
            absences: Absences::Inferred,
        }
    }
    fn refused(v: Result<Deletions, Error>) -> Option<String> {
        match v.unwrap() {
            Deletions::Allowed => None,
            Deletions::Refused(why) => Some(why),
        }
    }

    #[test]
    fn an_empty_source_is_refused_unless_forced_and_never_in_watch() {
        let p = plan_removing(3, 3);
        let sync = limits(false, MassDelete::Refuse);
        let e = check("/src", true, &p, 3, sync).unwrap_err().to_string();
        assert!(
            e.contains("SRC /src is empty") && e.contains("3 entries"),
            "{e}"
        );
        assert!(check("/src", true, &p, 3, limits(true, MassDelete::Refuse)).is_ok());
        assert!(check("/src", true, &p, 3, limits(true, MassDelete::SkipDeletes)).is_err());
        // A root the watch has watched all along is no exception: an emptied source pauses.
        for absences in [Absences::Observed, Absences::Rescanned] {
            let l = Limits {
                absences,
                ..limits(false, MassDelete::SkipDeletes)
            };
            assert!(check("/src", true, &p, 3, l).is_err(), "{absences:?}");
        }
    }

    #[test]
    fn the_percentage_applies_from_ten_removals_against_the_larger_yardstick() {
        let l = limits(false, MassDelete::Refuse);
        // 9 of 10: too few to judge.
        assert_eq!(
            refused(check("s", false, &plan_removing(9, 10), 10, l)),
            None
        );
        // 10 of 15 (66%) is refused; 10 of 25 (40%) is not.
        let why = refused(check("s", false, &plan_removing(10, 15), 0, l)).unwrap();
        assert!(why.contains("removes 10 of the standby's 15"), "{why}");
        assert_eq!(
            refused(check("s", false, &plan_removing(10, 15), 25, l)),
            None
        );
        let forced = limits(true, l.on_mass_delete);
        assert_eq!(
            refused(check("s", false, &plan_removing(10, 15), 0, forced)),
            None
        );
        assert_eq!(refused(check("s", false, &plan_removing(0, 0), 0, l)), None);
    }

    #[test]
    fn only_inferred_absences_are_guarded() {
        let decide = |absences, on| {
            let l = Limits {
                absences,
                ..limits(false, on)
            };
            refused(check("s", false, &plan_removing(60, 88), 88, l)).is_some()
        };
        for on in [MassDelete::Refuse, MassDelete::SkipDeletes] {
            assert!(decide(Absences::Inferred, on));
            assert!(!decide(Absences::Observed, on));
            assert!(!decide(Absences::Rescanned, on));
        }
    }

    #[test]
    fn entries_replaced_by_another_type_are_not_judged() {
        // 11 of 13 entries change type (4 of them directories with a child each), and two
        // are gone: the two deletions are all the guard counts.
        let mut p = plan_removing(2, 17);
        p.clear = (0..11)
            .map(|i| RelPath::new(format!("t{i}")).unwrap())
            .collect();
        p.cleared_entries = 15;
        p.removed_entries += 15;
        let l = limits(false, MassDelete::Refuse);
        assert_eq!(refused(check("s", false, &p, 17, l)), None);
        // With twelve more deletions, the deletions alone (14 of 29) stay under half...
        let mut q = p.clone();
        q.removed_entries += 12;
        assert_eq!(refused(check("s", false, &q, 29, l)), None);
        // ...and with 20 more they do not (22 of 37).
        p.removed_entries += 20;
        let why = refused(check("s", false, &p, 37, l)).unwrap();
        assert!(why.contains("removes 22 of the standby's 37"), "{why}");
        let said = refused_after_the_rest(&why, true);
        assert!(
            said.ends_with(
                "(everything but the deletions was mirrored, the replacement of \
                 standby entries of another type included)"
            ),
            "{said}"
        );
        let said = refused_after_the_rest(&why, false);
        assert!(
            said.ends_with(
                "use --force to remove them (everything but the deletions was \
                 mirrored)"
            ),
            "{said}"
        );
    }

    #[test]
    fn skipping_deletes_keeps_the_count_of_what_is_still_removed() {
        let remote = manifest(vec![dir("a"), file("a/1", 1), file("a/2", 1), file("b", 1)]);
        let mut p = Plan {
            clear: vec![RelPath::new("b").unwrap()],
            deletes: vec![RelPath::new("a").unwrap()],
            removed_entries: 4,
            cleared_entries: 1,
            ..Plan::default()
        };
        assert_eq!(skip_deletes(&mut p, &remote), 3);
        assert!(p.deletes.is_empty());
        assert_eq!(p.removed_entries, 1);
    }

    #[test]
    fn a_root_is_continuous_once_a_reconcile_it_began_under_was_not_refused() {
        let mut c = Continuity::default();
        c.opened();
        // The first reconcile of a root, and everything until one succeeds, is guarded.
        let (first, t1) = c.absences(Scan::Full, true);
        assert_eq!(first, Absences::Inferred);
        assert_eq!(c.absences(Scan::Events, true).0, Absences::Inferred);
        c.reconciled(t1, false);
        assert_eq!(c.absences(Scan::Events, true).0, Absences::Observed);
        assert_eq!(c.absences(Scan::Full, true).0, Absences::Rescanned);
        // A reconnect's reconcile that succeeds keeps it so.
        let (_, t2) = c.absences(Scan::Full, true);
        c.reconciled(t2, false);
        assert_eq!(c.absences(Scan::Full, true).0, Absences::Rescanned);
        // A new root (after a pause) starts over, and a reconcile begun under the old one
        // ends too late to vouch for it.
        let (_, stale) = c.absences(Scan::Full, true);
        c.opened();
        assert_eq!(c.absences(Scan::Full, true).0, Absences::Inferred);
        c.reconciled(stale, false);
        assert_eq!(c.absences(Scan::Events, true).0, Absences::Inferred);
        // A refused reconcile leaves it guarded: later scans must not carry out what the
        // guard refused.
        let (_, t3) = c.absences(Scan::Full, true);
        c.reconciled(t3, true);
        assert_eq!(c.absences(Scan::Full, true).0, Absences::Inferred);
        assert_eq!(c.absences(Scan::Events, true).0, Absences::Inferred);
        let (_, t4) = c.absences(Scan::Full, true);
        c.reconciled(t4, false);
        assert_eq!(c.absences(Scan::Events, true).0, Absences::Observed);
        // Without the mount table, a disk unmounted inside the tree could pass unseen.
        assert_eq!(c.absences(Scan::Events, false).0, Absences::Inferred);
        assert_eq!(c.absences(Scan::Full, false).0, Absences::Inferred);
        // A change of the mounts is a new root.
        c.opened();
        assert_eq!(c.absences(Scan::Events, true).0, Absences::Inferred);
    }
}
