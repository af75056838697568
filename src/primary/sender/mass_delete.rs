//! The mass-delete guard as both reconciles apply it: an empty source facing a full
//! standby stops everything; too many deletions are left undone while the rest is carried
//! out, and the summary says why.

use crate::error::Error;
use crate::model::guard::{self, Deletions, Limits, MassDelete};

/// A plan's deletions, as the guard weighs them.
#[derive(Debug, Clone, Copy)]
pub(super) struct Removals {
    /// Standby entries the plan removes because the primary lacks them (not those
    /// replaced by an entry of another type: the primary has those).
    pub deleted: usize,
    /// The standby's entries, the yardstick.
    pub total: usize,
    /// The primary's side holds nothing.
    pub source_empty: bool,
    /// Standby entries of another type than the primary's are removed to make way.
    pub replaced: bool,
}

/// The guard one reconcile is held to.
pub(super) struct DeleteGuard {
    /// The source as messages name it.
    src: String,
    limits: Limits,
}

impl DeleteGuard {
    pub(super) fn new(src: String, limits: Limits) -> DeleteGuard {
        DeleteGuard { src, limits }
    }

    /// Judges a plan's removals: `Ok(None)` to carry them out, `Ok(Some(why))` to leave
    /// them, and only them, undone, `why` being what the summary says.
    ///
    /// # Errors
    /// [`Error::SourceEmpty`] for an empty source facing a standby that is not: nothing at all
    /// may be carried out.
    pub(super) fn judge(&self, r: Removals) -> Result<Option<String>, Error> {
        let verdict =
            guard::check_counts(&self.src, r.source_empty, r.deleted, r.total, self.limits)?;
        let Deletions::Refused(why) = verdict else {
            return Ok(None);
        };
        if self.limits.on_mass_delete == MassDelete::SkipDeletes {
            // Watch mode: replicate everything but the deletions, and say so loudly.
            tracing::error!("{why}; replicating other changes, not the deletions");
        }
        Ok(Some(guard::refused_after_the_rest(&why, r.replaced)))
    }

    /// Refuses, before anything is touched, an empty source facing a standby of `held`
    /// entries: an unmounted disk must never wipe the standby. What may be deleted
    /// otherwise is judged at the end, with the whole count.
    ///
    /// # Errors
    /// [`Error::SourceEmpty`], as [`DeleteGuard::judge`].
    pub(super) fn refuse_empty_source(&self, held: usize) -> Result<(), Error> {
        guard::check_counts(&self.src, true, held, held, self.limits).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::guard::Absences;

    fn guard(on_mass_delete: MassDelete) -> DeleteGuard {
        let limits = Limits {
            force: false,
            max_delete_percent: 50,
            on_mass_delete,
            absences: Absences::Inferred,
        };
        DeleteGuard::new("/src".into(), limits)
    }

    fn removals(deleted: usize, total: usize) -> Removals {
        Removals {
            deleted,
            total,
            source_empty: false,
            replaced: false,
        }
    }

    #[test]
    fn too_many_deletions_are_left_undone_and_the_rest_is_carried_out() {
        let g = guard(MassDelete::Refuse);
        assert_eq!(g.judge(removals(1, 1000)).unwrap(), None);
        let why = g.judge(removals(900, 1000)).unwrap().expect("refused");
        assert!(
            why.ends_with("(everything but the deletions was mirrored)"),
            "{why}"
        );
        let replaced = Removals {
            replaced: true,
            ..removals(900, 1000)
        };
        let why = g.judge(replaced).unwrap().expect("refused");
        assert!(why.contains("replacement of standby entries"), "{why}");
    }

    #[test]
    fn an_empty_source_stops_everything() {
        for g in [guard(MassDelete::Refuse), guard(MassDelete::SkipDeletes)] {
            let empty = Removals {
                source_empty: true,
                ..removals(10, 10)
            };
            assert!(matches!(g.judge(empty), Err(Error::SourceEmpty(_))));
            assert!(matches!(
                g.refuse_empty_source(10),
                Err(Error::SourceEmpty(_))
            ));
            assert!(g.refuse_empty_source(0).is_ok(), "nothing to wipe");
        }
    }
}
