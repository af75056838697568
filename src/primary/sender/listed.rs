//! The listed reconcile: both sides list what it covers at once, the plan is made whole
//! from the two manifests, judged by the mass-delete guard, then carried out. For single
//! entries (a watch's batch), and for whole trees on a standby that cannot walk.

use super::Outcome;
use super::exec::Exec;
use super::hard_links::{LinkSearch, complete_links};
use super::listing::with_parents;
use super::mass_delete::Removals;
use super::report::{count_planned, note_problems};
use super::session::{Listed, Session};
use crate::error::Error;
use crate::model::manifest::{Entry, Manifest, Scope};
use crate::model::path::RelPath;
use crate::model::plan::{self, Plan};
use crate::model::summary::Summary;
use crate::tree::scan::ScanOutcome;
use crate::tree::walk::Scopes;

impl Session<'_> {
    /// Reconciles what `run` covers, with the parent directories of each scope.
    pub(super) fn reconcile_listed(&mut self, run: Listed<'_>) -> Result<Outcome, Error> {
        let Listed { full, started, .. } = run;
        let listed = with_parents(run.scopes);
        let (mut local, mut remote, temps_removed) =
            self.list_sides(&listed, self.opts.checksum)?;
        tracing::debug!("{} ms: both sides listed", started.elapsed().as_millis());
        self.every_name(&listed, full, &mut local, &mut remote)?;
        let mut summary = Summary {
            files_scanned: local.manifest.children().len() as u64,
            bytes_total: local.manifest.file_bytes(),
            temps_removed,
            dry_run: self.opts.dry_run,
            renamed: run.renamed,
            ..Summary::default()
        };
        let l = &local;
        note_problems(
            &mut summary,
            &l.manifest.specials,
            &l.skipped,
            &l.manifest.errors,
        );
        let mut plan = plan::plan(&local.manifest, &remote, self.plan_options());
        if full {
            self.remote_total = remote.children().len();
        }
        // Keep the guard's yardstick current between full listings: the standby gains what
        // the primary has and it lacked.
        let added = local
            .manifest
            .children()
            .iter()
            .filter(|e| remote.get(&e.path).is_none())
            .count();
        self.guard_listed(&mut plan, &mut summary, &local, &remote, full)?;
        let monitor = self.ends.monitor;
        monitor.planned(plan.transfers.len() as u64, plan.transfer_bytes());
        if self.opts.dry_run {
            count_planned(&mut summary, &plan);
            summary.files_deleted = plan.removed_entries as u64;
        } else {
            let ex = Exec::new(&self.ends, Some(&remote), summary);
            ex.run(&plan, &mut self.ch, &self.opts)?;
            summary = ex.into_summary();
            self.remote_total = (self.remote_total + added).saturating_sub(plan.removed_entries);
        }
        tracing::debug!(
            "standby holds about {} entries (+{added} -{})",
            self.remote_total,
            plan.removed_entries
        );
        summary.bytes_on_wire = self.wire_bytes() - run.wire_before;
        summary.elapsed_ms = started.elapsed().as_millis() as u64;
        tracing::debug!("{} ms: plan carried out", started.elapsed().as_millis());
        Ok(Outcome { summary, plan })
    }

    /// Brings into both listings every name of the files and symlinks with several names
    /// the listing of `listed` met: a full listing has them all (and the index learns
    /// them); a partial one looks for the others.
    fn every_name(
        &mut self,
        listed: &[(RelPath, Scope)],
        full: bool,
        local: &mut ScanOutcome,
        remote: &mut Manifest,
    ) -> Result<(), Error> {
        let linked = local.manifest.entries.iter().filter(|e| e.link.is_some());
        if full {
            self.links.rebuild(linked);
            return Ok(());
        }
        let linked: Vec<Entry> = linked.cloned().collect();
        let scan_opts = self.scan_options(self.opts.checksum);
        let search = LinkSearch {
            index: &mut self.links,
            ch: &mut self.ch,
            root: &self.ends.root,
            scan_opts: &scan_opts,
            listed: &Scopes::new(listed),
            monitor: self.ends.monitor,
        };
        if let Some((l, r)) = complete_links(search, &linked)? {
            local.manifest.entries.extend(l.entries);
            local.manifest.errors.extend(l.errors);
            local.manifest.sort();
            remote.entries.extend(r.entries);
            remote.specials.extend(r.specials);
            remote.sort();
        }
        Ok(())
    }

    /// Holds `plan` to the mass-delete guard: a refusal drops its deletions (the summary
    /// says so and counts what they would have removed).
    fn guard_listed(
        &self,
        plan: &mut Plan,
        summary: &mut Summary,
        local: &ScanOutcome,
        remote: &Manifest,
        full: bool,
    ) -> Result<(), Error> {
        // Only a plan that removes something needs to know (and a batch should not list
        // the whole source root for nothing).
        let source_empty = plan.removed_entries > 0
            && if full {
                local.manifest.children().is_empty()
            } else {
                self.ends
                    .root
                    .is_empty()
                    .map_err(|e| Error::io("cannot read SRC", e))?
            };
        let removals = Removals {
            deleted: plan.removed_entries - plan.cleared_entries,
            total: self.remote_total.max(plan.remote_entries),
            source_empty,
            replaced: !plan.clear.is_empty(),
        };
        if let Some(refusal) = self.delete_guard().judge(removals)? {
            summary.deletions_refused = crate::model::guard::skip_deletes(plan, remote);
            summary.refused = Some(refusal);
        }
        Ok(())
    }
}
