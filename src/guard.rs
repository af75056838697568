//! The mass-delete guards, as pure decisions: an empty source, or a plan removing a large
//! share of the standby, is refused unless `--force`. An unmounted disk must never wipe the
//! standby.

use crate::error::Error;
use crate::manifest::Manifest;
use crate::plan::Plan;

/// Below this many removals the percentage guard does not apply.
pub const GUARD_MIN_REMOVALS: usize = 10;

/// What to do when a plan would delete more than the guard allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MassDelete {
    /// Refuse the whole sync (exit 2): `sync`.
    Refuse,
    /// Carry out everything else and log the refusal: `watch`, which must keep replicating.
    SkipDeletes,
}

/// The limits a plan is held to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub force: bool,
    pub max_delete_percent: u32,
    pub on_mass_delete: MassDelete,
}

/// Checks `plan` against the guards. `source_empty` says whether the primary's tree holds
/// nothing; `remote_total` is the standby's size at the last full listing (the yardstick
/// for a partial plan); `src` names the source in messages.
///
/// # Errors
/// [`Error::Refused`] naming what the plan would remove and how to override it.
pub fn check(
    src: &str,
    source_empty: bool,
    plan: &Plan,
    remote_total: usize,
    limits: Limits,
) -> Result<(), Error> {
    let total = remote_total.max(plan.remote_entries);
    check_counts(src, source_empty, plan.removed_entries, total, limits)
}

/// [`check`] for a plan known only by its counts (a streamed reconcile): `removed` standby
/// entries of its `total`.
///
/// # Errors
/// As [`check`].
pub fn check_counts(
    src: &str,
    source_empty: bool,
    removed: usize,
    total: usize,
    limits: Limits,
) -> Result<(), Error> {
    if removed == 0 {
        return Ok(());
    }
    // Watch never empties the standby, even with --force: a disk that goes away must not
    // take the standby's copy with it.
    let watching = limits.on_mass_delete == MassDelete::SkipDeletes;
    if source_empty && (!limits.force || watching) {
        return Err(Error::Refused(format!(
            "SRC {src} is empty but the standby holds {} entries: refusing to delete them all \
             (is a disk not mounted?); use --force if the source really is empty",
            total
        )));
    }
    if limits.force {
        return Ok(());
    }
    let pct = limits.max_delete_percent as usize;
    if removed >= GUARD_MIN_REMOVALS && removed * 100 > pct * total {
        return Err(Error::Refused(format!(
            "the plan removes {removed} of the standby's {total} entries, more than --max-delete {pct}%: \
             refusing (is part of SRC {src} missing?); use --force to remove them"
        )));
    }
    Ok(())
}

/// Drops the deletions from `plan` (watch mode, after a refusal): everything else still
/// replicates.
pub fn skip_deletes(plan: &mut Plan, remote: &Manifest) {
    plan.removed_entries -= plan
        .deletes
        .iter()
        .map(|p| remote.count_under(p))
        .sum::<u64>() as usize;
    plan.deletes.clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::testing::{dir, file, manifest};
    use crate::path::RelPath;

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
    }

    #[test]
    fn the_percentage_applies_from_ten_removals_against_the_larger_yardstick() {
        let l = limits(false, MassDelete::Refuse);
        // 9 of 10: too few to judge.
        assert!(check("s", false, &plan_removing(9, 10), 10, l).is_ok());
        // 10 of 15 (66%) is refused; 10 of 25 (40%) is not.
        let e = check("s", false, &plan_removing(10, 15), 0, l).unwrap_err();
        assert!(
            e.to_string().contains("removes 10 of the standby's 15"),
            "{e}"
        );
        assert!(check("s", false, &plan_removing(10, 15), 25, l).is_ok());
        assert!(
            check(
                "s",
                false,
                &plan_removing(10, 15),
                0,
                limits(true, l.on_mass_delete)
            )
            .is_ok()
        );
        assert!(check("s", false, &plan_removing(0, 0), 0, l).is_ok());
    }

    #[test]
    fn skipping_deletes_keeps_the_count_of_what_is_still_removed() {
        let remote = manifest(vec![dir("a"), file("a/1", 1), file("a/2", 1), file("b", 1)]);
        let mut p = Plan {
            clear: vec![RelPath::new("b").unwrap()],
            deletes: vec![RelPath::new("a").unwrap()],
            removed_entries: 4,
            ..Plan::default()
        };
        skip_deletes(&mut p, &remote);
        assert!(p.deletes.is_empty());
        assert_eq!(p.removed_entries, 1);
    }
}
