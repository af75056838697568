//! The streamed reconcile (protocol version 3): both sides walk their trees one directory
//! at a time in the same order ([`super::walk_both`]); the [`Merger`] compares them as they
//! come, and the operations they need are carried out window by window
//! ([`super::windows`]). Memory follows the largest directory and the window, not the
//! tree: a million files cost what a thousand do.
//!
//! Three threads and bounded queues between them: the local walk, the standby's walk, and
//! the window being carried out while the next one is planned. Deletions and directory
//! attributes wait (in a [`Spill`]) until everything else is durable: deletes last, and
//! a directory's mtime after its contents.

use super::acks::Op;
use super::attrs::set_meta;
use super::exec::Exec;
use super::hard_links::{LinkSearch, complete_links};
use super::mass_delete::{DeleteGuard, Removals};
use super::report::{count_planned, note_problems};
use super::session::Session;
use super::tree_ops::ControlOp;
use super::walk_both::{Walk, walk_both};
use super::windows::EarlyCopy;
use super::{Early, Outcome, SyncOptions};
use crate::error::Error;
use crate::error::ProtocolError;
use crate::model::listing::Unit;
use crate::model::merge::{Counts, Merger};
use crate::model::names::LinkIndex;
use crate::model::path::RelPath;
use crate::model::plan::{MetaFix, Plan, PlanOptions};
use crate::model::progress::Monitor;
use crate::model::summary::Summary;
use crate::tree::scan::ScanOptions;
use crate::tree::spill::Spill;
use crate::tree::walk::{Gate, Scopes};
use crate::wire::channel::Channel;
use crate::wire::protocol::Message;
use std::io;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Operations a window gathers before it is carried out.
const WINDOW_OPS: usize = 4 * 1024;
/// File bytes a window gathers before it is carried out.
const WINDOW_BYTES: u64 = 256 << 20;
/// How long a window that is not full waits for more, when the executor is idle: a change
/// found early in a long walk goes at once, not when the walk ends.
const WINDOW_AGE: Duration = Duration::from_millis(50);
/// Removals and attribute fixes sent per control batch at the end.
const FINAL_BATCH: usize = 16 * 1024;

impl Session<'_> {
    /// Reconciles what `scopes` cover (a whole tree, or subtrees and entries) by walking
    /// both sides together; `renamed` renames were applied just before.
    pub(super) fn reconcile_streamed(
        &mut self,
        scopes: Scopes,
        renamed: u64,
    ) -> Result<Outcome, Error> {
        let started = Instant::now();
        let wire_before = self.wire_bytes();
        let mut gathered = Gathered::new(self.plan_options(), self.ends.monitor);
        // The last directory planned: changes seen meanwhile up to it are copied early.
        let passed = Mutex::new(None);
        let mut run = Streamed::new(self, renamed);
        let temps_removed = run.walk(scopes.clone(), &mut gathered, &passed)?;
        run.every_name(&mut gathered.merger, &scopes)?;
        let counts = gathered.merger.counts;
        let tail = run.carry_out_the_rest(gathered, counts)?;
        let summary = run.ex.into_summary();
        Ok(self.streamed_outcome(Ended {
            summary,
            counts,
            temps_removed,
            whole: scopes.is_all(),
            tail,
            started,
            wire_before,
        }))
    }

    /// The outcome of a streamed reconcile that ended as `e` says; the guard's yardstick
    /// is counted whole by a whole walk, else kept up to date.
    fn streamed_outcome(&mut self, e: Ended<'_>) -> Outcome {
        let Ended {
            mut summary,
            counts,
            temps_removed,
            whole,
            tail: Tail { kept, refusal, dry },
            started,
            wire_before,
        } = e;
        summary.files_scanned = counts.local_entries;
        summary.bytes_total = counts.local_bytes;
        summary.temps_removed = temps_removed;
        let held = if whole {
            counts.remote_entries
        } else {
            self.remote_total as u64
        };
        let removed = counts.removed_entries - kept;
        summary.deletions_refused = kept;
        summary.refused = refusal;
        let mut dry = dry.end();
        if self.opts.dry_run {
            let planned = std::mem::take(&mut dry.planned);
            summary.files_transferred = planned.files_transferred;
            summary.dirs_created = planned.dirs_created;
            summary.symlinks_written = planned.symlinks_written;
            summary.metadata_updated = planned.metadata_updated;
            summary.hard_links_made = planned.hard_links_made;
            summary.files_deleted = removed;
            if whole {
                self.remote_total = counts.remote_entries as usize;
            }
        } else {
            summary.files_deleted += counts.cleared_beneath;
            self.remote_total = (held + counts.added).saturating_sub(removed) as usize;
        }
        dry.kept.removed_entries = removed as usize;
        dry.kept.remote_entries = counts.remote_entries as usize;
        tracing::debug!(
            "standby holds about {} entries (+{} -{removed})",
            self.remote_total,
            counts.added
        );
        summary.bytes_on_wire = self.wire_bytes() - wire_before;
        summary.elapsed_ms = started.elapsed().as_millis() as u64;
        Outcome {
            summary,
            plan: dry.kept,
        }
    }
}

/// The parts of a session a streamed reconcile works with, for its length.
struct Streamed<'s> {
    ex: Exec<'s>,
    ch: &'s mut Channel,
    links: &'s mut LinkIndex,
    opts: &'s SyncOptions,
    scan_opts: ScanOptions,
    plan_opts: PlanOptions,
    guard: DeleteGuard,
    /// The standby's entries at the last full listing.
    remote_total: usize,
    gate: Option<Arc<dyn Gate>>,
    /// Changes to copy early (never in a dry run).
    early: Option<Arc<dyn Early>>,
}

/// What planning a streamed reconcile gathers as both walks go.
struct Gathered<'a> {
    merger: Merger,
    /// Deletions and directory attributes wait until everything else is durable.
    deletes: Spill<(RelPath, u64)>,
    dir_metas: Spill<MetaFix>,
    dry: Dry<'a>,
    /// The primary's side of what is walked holds nothing.
    source_empty: bool,
}

/// How the end of a streamed reconcile went.
struct Tail<'a> {
    /// Standby entries left in place because the guard refused their deletion.
    kept: u64,
    /// Why it did.
    refusal: Option<String>,
    dry: Dry<'a>,
}

/// Everything a streamed reconcile's outcome is made of.
struct Ended<'a> {
    summary: Summary,
    counts: Counts,
    temps_removed: u64,
    whole: bool,
    tail: Tail<'a>,
    started: Instant,
    wire_before: u64,
}

impl<'a> Gathered<'a> {
    fn new(plan_opts: PlanOptions, monitor: &'a dyn Monitor) -> Self {
        Gathered {
            merger: Merger::new(plan_opts),
            deletes: Spill::new(),
            dir_metas: Spill::new(),
            dry: Dry {
                monitor,
                kept: Plan::default(),
                planned: Summary::default(),
                part: Plan::default(),
            },
            source_empty: false,
        }
    }
}

impl<'s> Streamed<'s> {
    fn new(s: &'s mut Session<'_>, renamed: u64) -> Streamed<'s> {
        let tally = Summary {
            dry_run: s.opts.dry_run,
            renamed,
            ..Summary::default()
        };
        Streamed {
            scan_opts: s.scan_options(s.opts.checksum),
            plan_opts: s.plan_options(),
            guard: s.delete_guard(),
            remote_total: s.remote_total,
            gate: s.gate.clone(),
            early: if s.opts.dry_run {
                None
            } else {
                s.early.clone()
            },
            ex: Exec::new(&s.ends, None, tally),
            ch: &mut s.ch,
            links: &mut s.links,
            opts: &s.opts,
        }
    }

    /// Walks both trees over `scopes`, planning into `g` directory by directory while the
    /// windows planned before are carried out, and changes seen meanwhile up to `passed`
    /// copied early. Returns the leftover temporary files the standby's walk removed.
    fn walk(
        &mut self,
        scopes: Scopes,
        g: &mut Gathered<'_>,
        passed: &Mutex<Option<RelPath>>,
    ) -> Result<u64, Error> {
        let early = self.early.as_deref().map(|source| EarlyCopy {
            source,
            passed,
            scan_opts: self.scan_opts.clone(),
            plan_opts: self.plan_opts,
        });
        let ends = self.ex.ends;
        let whole = scopes.is_all();
        let walk = Walk {
            conn: ends.conn(),
            root: &ends.root,
            opts: self.scan_opts.clone(),
            scopes,
            gate: self.gate.clone(),
            monitor: ends.monitor,
        };
        let (ex, ch, opts, guard) = (&self.ex, &mut *self.ch, self.opts, &self.guard);
        std::thread::scope(|s| {
            // The window being carried out while the next is planned.
            let (wtx, wrx) = sync_channel::<Plan>(1);
            let early = early.as_ref();
            let executor = s.spawn(move || ex.run_windows(wrx, ch, opts, early));
            let mut planner = Planner {
                g,
                window: Window::new(wtx, opts.dry_run, ends.monitor),
                first: true,
                passed,
                ex,
                guard,
                whole,
            };
            let walked = walk_both(walk, |lu, ru| planner.unit(lu, ru));
            if walked.is_ok() {
                planner.window.hand_on(&mut planner.g.dry, true);
            }
            // The executor ends with the windows.
            drop(planner);
            let executed = executor.join().expect("executor panicked");
            // The executor's error explains a stop best.
            executed.and(walked)
        })
    }

    /// Every name of the files and symlinks with several names: a whole walk saw them
    /// all; a walk of part of the tree (`scopes`) looks for the others now.
    fn every_name(&mut self, merger: &mut Merger, scopes: &Scopes) -> Result<(), Error> {
        if scopes.is_all() {
            self.links.rebuild(merger.linked_local());
            return Ok(());
        }
        let linked: Vec<_> = merger
            .linked_local()
            .iter()
            .filter(|e| e.link.is_some())
            .cloned()
            .collect();
        let search = LinkSearch {
            index: &mut *self.links,
            ch: &mut *self.ch,
            root: &self.ex.ends.root,
            scan_opts: &self.scan_opts,
            listed: scopes,
            monitor: self.ex.ends.monitor,
        };
        if let Some((l, r)) = complete_links(search, &linked)? {
            merger.add_linked(l, r);
        }
        Ok(())
    }

    /// After the walk (which ended with `counts`): the files with several names, now that
    /// every name of each is known; then the deletions, once the guard has seen the whole
    /// count (a refusal leaves them, and only them, undone); then directory attributes,
    /// after everything inside them.
    fn carry_out_the_rest<'a>(
        &mut self,
        g: Gathered<'a>,
        counts: Counts,
    ) -> Result<Tail<'a>, Error> {
        let Gathered {
            merger,
            mut deletes,
            mut dir_metas,
            mut dry,
            source_empty,
        } = g;
        let finish = merger.finish();
        if self.opts.dry_run {
            dry.show(finish.plan);
        } else if !finish.plan.is_empty() {
            self.ex.run(&finish.plan, self.ch, self.opts)?;
        }
        for d in finish.deletes {
            deletes.push(d).map_err(spill_error)?;
        }
        for m in finish.dir_metas {
            dir_metas.push(m).map_err(spill_error)?;
        }
        let refusal = self.guard.judge(Removals {
            deleted: counts.deleted_entries as usize,
            total: self.remote_total.max(counts.remote_entries as usize),
            source_empty,
            replaced: counts.replaced > 0,
        })?;
        let kept = self.remove(deletes, refusal.is_none(), &mut dry)?;
        self.set_dir_metas(dir_metas, &mut dry)?;
        Ok(Tail { kept, refusal, dry })
    }

    /// Removes what `deletes` holds, a batch at a time (a dry run shows it); when not
    /// `deleting`, leaves it all. Returns the standby entries left in place.
    fn remove(
        &mut self,
        deletes: Spill<(RelPath, u64)>,
        deleting: bool,
        dry: &mut Dry<'_>,
    ) -> Result<u64, Error> {
        let mut batch = Vec::new();
        let mut kept = 0;
        for d in deletes.drain().map_err(spill_error)? {
            let (path, entries) = d.map_err(spill_error)?;
            if !deleting {
                kept += entries;
                continue;
            }
            if self.opts.dry_run {
                dry.part.deletes.push(path);
                if dry.part.deletes.len() >= FINAL_BATCH {
                    dry.show_part();
                }
                continue;
            }
            let msg = Message::Delete {
                id: self.ex.id(),
                path: path.clone(),
            };
            let op = Op::Remove { entries };
            batch.push(ControlOp { msg, path, op });
            if batch.len() >= FINAL_BATCH {
                self.ex
                    .control_batch(self.ch, std::mem::take(&mut batch), 3)?;
            }
        }
        self.ex.control_batch(self.ch, batch, 3).map(|()| kept)
    }

    /// Sets the directory attributes `dir_metas` holds, a batch at a time (a dry run shows
    /// them).
    fn set_dir_metas(&mut self, dir_metas: Spill<MetaFix>, dry: &mut Dry<'_>) -> Result<(), Error> {
        let mut batch = Vec::new();
        for m in dir_metas.drain().map_err(spill_error)? {
            let m = m.map_err(spill_error)?;
            if self.opts.dry_run {
                dry.part.dir_metas.push(m);
                if dry.part.dir_metas.len() >= FINAL_BATCH {
                    dry.show_part();
                }
                continue;
            }
            let msg = set_meta(&m, self.ex.id());
            batch.push(ControlOp {
                msg,
                path: m.path,
                op: Op::Meta,
            });
            if batch.len() >= FINAL_BATCH {
                self.ex
                    .control_batch(self.ch, std::mem::take(&mut batch), 4)?;
            }
        }
        self.ex.control_batch(self.ch, batch, 4)
    }
}

/// Plans each directory as both walks bring it, into windows for the executor.
struct Planner<'p, 'a> {
    g: &'p mut Gathered<'a>,
    window: Window<'p>,
    /// No directory planned yet.
    first: bool,
    passed: &'p Mutex<Option<RelPath>>,
    ex: &'p Exec<'p>,
    guard: &'p DeleteGuard,
    /// The whole tree is walked.
    whole: bool,
}

impl Planner<'_, '_> {
    /// Plans one directory: the primary's unit `lu`, the standby's `ru`, or both.
    fn unit(&mut self, lu: Option<Unit>, ru: Option<Unit>) -> Result<(), Error> {
        if std::mem::take(&mut self.first) {
            self.refuse_an_empty_source(lu.as_ref(), ru.as_ref())?;
        }
        if let Some(lu) = &lu {
            let mut book = self.ex.book();
            note_problems(book.summary_mut(), &lu.specials, &lu.skipped, &lu.errors);
        }
        let at = lu.as_ref().or(ru.as_ref()).map(|u| u.dir.path.clone());
        *self.passed.lock().unwrap() = at;
        let step = self.g.merger.step(lu, ru);
        for d in step.deletes {
            self.g.deletes.push(d).map_err(spill_error)?;
        }
        for m in step.dir_metas {
            self.g.dir_metas.push(m).map_err(spill_error)?;
        }
        if !self.window.add(step.plan, &mut self.g.dry) {
            // The executor stopped: its error says why.
            return Err(Error::Protocol(ProtocolError::Invalid("stopped".into())));
        }
        Ok(())
    }

    /// An empty source facing a full standby is refused before anything is touched: an
    /// unmounted disk must never wipe the standby. (A part of the tree may be empty; then
    /// the root itself is looked at.) `lu` and `ru` are the first directory's units.
    fn refuse_an_empty_source(
        &mut self,
        lu: Option<&Unit>,
        ru: Option<&Unit>,
    ) -> Result<(), Error> {
        if let Some(lu) = lu
            && lu.entries.is_empty()
            && lu.errors.is_empty()
            && (self.whole
                || self
                    .ex
                    .ends
                    .root
                    .is_empty()
                    .map_err(|e| Error::io("cannot read SRC", e))?)
        {
            let held = ru.map_or(0, |r| r.entries.len());
            self.g.source_empty = true;
            self.guard.refuse_empty_source(held)?;
        }
        Ok(())
    }
}

/// The window being gathered, and where it goes when due.
struct Window<'a> {
    plan: Plan,
    /// When it got its first operation.
    since: Instant,
    /// Files and bytes planned so far, for the monitor.
    planned: (u64, u64),
    /// To the executor; a dry run shows its windows instead.
    tx: SyncSender<Plan>,
    dry_run: bool,
    monitor: &'a dyn Monitor,
}

impl<'a> Window<'a> {
    fn new(tx: SyncSender<Plan>, dry_run: bool, monitor: &'a dyn Monitor) -> Self {
        Window {
            plan: Plan::default(),
            since: Instant::now(),
            planned: (0, 0),
            tx,
            dry_run,
            monitor,
        }
    }

    /// Adds `part`, and hands the window on when it is full (waiting for the executor) or
    /// has waited long enough (if the executor is idle). False when the executor stopped.
    fn add(&mut self, part: Plan, dry: &mut Dry<'_>) -> bool {
        if self.plan.op_count() == 0 {
            self.since = Instant::now();
        }
        append(&mut self.plan, part);
        let n = self.plan.op_count();
        let full = n >= WINDOW_OPS || self.plan.transfer_bytes() >= WINDOW_BYTES;
        let aged = n > 0 && self.since.elapsed() >= WINDOW_AGE;
        !(full || aged) || self.hand_on(dry, full)
    }

    /// Hands the window on: waiting for the executor when `wait`, else only if it is
    /// idle. False when the executor stopped.
    fn hand_on(&mut self, dry: &mut Dry<'_>, wait: bool) -> bool {
        let w = std::mem::take(&mut self.plan);
        let (files, bytes) = (w.transfers.len() as u64, w.transfer_bytes());
        if self.dry_run {
            dry.show(w);
        } else if wait {
            if self.tx.send(w).is_err() {
                return false;
            }
        } else {
            match self.tx.try_send(w) {
                Ok(()) => {}
                Err(TrySendError::Full(w)) => {
                    self.plan = w;
                    return true;
                }
                Err(TrySendError::Disconnected(_)) => return false,
            }
        }
        self.planned.0 += files;
        self.planned.1 += bytes;
        self.monitor.planned(self.planned.0, self.planned.1);
        true
    }
}

/// A dry run's plan: each part shown to the monitor as it is made, and kept only if the
/// monitor did not show it.
struct Dry<'a> {
    monitor: &'a dyn Monitor,
    kept: Plan,
    /// What carrying the parts out would count, operation by operation (removals aside).
    planned: Summary,
    /// Deletions and attributes gathered at the end, shown a batch at a time.
    part: Plan,
}

impl Dry<'_> {
    fn show(&mut self, part: Plan) {
        if part.op_count() == 0
            && part.links.is_empty()
            && part.deletes.is_empty()
            && part.dir_metas.is_empty()
        {
            return;
        }
        count_planned(&mut self.planned, &part);
        if !self.monitor.dry_run_part(&part) {
            append(&mut self.kept, part);
        }
    }

    fn show_part(&mut self) {
        let part = std::mem::take(&mut self.part);
        self.show(part);
    }

    fn end(mut self) -> Self {
        self.show_part();
        self
    }
}

fn spill_error(e: io::Error) -> Error {
    Error::io(
        "cannot keep the reconcile's pending work in the temporary directory",
        e,
    )
}

/// Adds `more` to `into`, in order.
fn append(into: &mut Plan, mut more: Plan) {
    into.clear.append(&mut more.clear);
    into.mkdirs.append(&mut more.mkdirs);
    into.transfers.append(&mut more.transfers);
    into.symlinks.append(&mut more.symlinks);
    into.metas.append(&mut more.metas);
    into.links.append(&mut more.links);
    into.deletes.append(&mut more.deletes);
    into.dir_metas.append(&mut more.dir_metas);
    into.removed_entries += more.removed_entries;
    into.remote_entries += more.remote_entries;
}
