//! The full reconcile, streamed (protocol version 3): both sides walk their trees one
//! directory at a time in the same order, the standby's walk arriving on a stream of its
//! own while the primary walks its own; the [`Merger`] compares them as they come, and
//! the operations they need are carried out window by window. Memory follows the largest
//! directory and the window, not the tree: a million files cost what a thousand do.
//!
//! Three threads and bounded queues between them: the local walk, the standby's walk, and
//! the window being carried out while the next one is planned. Deletions and directory
//! attributes wait (in a [`Spill`]) until everything else is durable: deletes last, and
//! a directory's mtime after its contents.

use super::{Early, Exec, LaneItem, Outcome, Session, SyncOptions, peer_error};
use crate::error::Error;
use crate::model::guard::{self, Deletions, MassDelete};
use crate::model::manifest::Scope;
use crate::model::merge::{Merger, Side, next_side};
use crate::model::path::RelPath;
use crate::model::plan::{MetaFix, Method, Plan, PlanOptions, SymlinkOp, Transfer};
use crate::model::progress::{Monitor, Silent};
use crate::model::summary::Summary;
use crate::transport::Connection;
use crate::tree::fsroot::Root;
use crate::tree::scan::ScanOptions;
use crate::tree::spill::Spill;
use crate::tree::walk::{Gate, Scopes, Unit, Walker, walk_cmp};
use crate::wire::channel::Channel;
use crate::wire::protocol::{Message, ProtocolError};
use std::collections::VecDeque;
use std::io;
use std::sync::mpsc::{
    Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError, sync_channel,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Operations a window gathers before it is carried out.
const WINDOW_OPS: usize = 4 * 1024;
/// File bytes a window gathers before it is carried out.
const WINDOW_BYTES: u64 = 256 << 20;
/// How long a window that is not full waits for more, when the executor is idle: a change
/// found early in a long walk goes at once, not when the walk ends.
const WINDOW_AGE: Duration = Duration::from_millis(50);
/// How often the executor copies the changes seen since the walk passed them.
const EARLY_EVERY: Duration = Duration::from_millis(50);
/// Entries the local walk reads ahead of the planner.
const WALK_AHEAD: usize = 2048;
/// Removals and attribute fixes sent per control batch at the end.
const FINAL_BATCH: usize = 16 * 1024;

/// Small items one lane takes at least, in whole directories, before another lane takes the
/// next: files of one directory stay together on one lane.
const LANE_RUN: usize = 256;

/// Runs queued for the lanes.
const RUNS_QUEUED: usize = 32;

/// A lane's item, owned, to hand to its thread.
enum Work {
    File(Transfer),
    Symlink(SymlinkOp),
    Meta(MetaFix),
}

impl Work {
    /// The directory it is in.
    fn dir(&self) -> &[u8] {
        match self {
            Work::File(t) => t.path.parent_bytes(),
            Work::Symlink(l) => l.path.parent_bytes(),
            Work::Meta(m) => m.path.parent_bytes(),
        }
    }

    fn item(&self) -> LaneItem<'_> {
        match self {
            Work::File(t) => LaneItem::File(t),
            Work::Symlink(l) => LaneItem::Symlink(l),
            Work::Meta(m) => LaneItem::Meta(m),
        }
    }
}

impl Exec<'_> {
    /// Carries out windows as they come. The lanes and the large files' streams stay open
    /// across windows, so one window's last files overlap the next one's first; only a
    /// window's directories are made (and durable) before its files start.
    fn run_windows(
        &self,
        windows: Receiver<Plan>,
        ch: &mut Channel,
        opts: &SyncOptions,
        early: Option<&EarlyCopy<'_>>,
    ) -> Result<(), Error> {
        let failed: Mutex<Option<Error>> = Mutex::new(None);
        let fail = |e: Error, why: &str| {
            let mut f = failed.lock().unwrap();
            if f.is_none() {
                *f = Some(e);
            }
            self.conn.close(why);
        };
        let (big_tx, big_rx) = sync_channel::<Transfer>(64);
        let big_rx = Mutex::new(big_rx);
        // Enough runs queued (about 8,000 files) for the lanes to keep busy while the next
        // window's directories are made.
        let (run_tx, run_rx) = sync_channel::<Vec<Work>>(RUNS_QUEUED);
        let run_rx = Mutex::new(run_rx);
        std::thread::scope(|s| {
            // One queue of runs for all lanes: whichever lane is free takes the next run, so
            // a lane busy making its batch durable holds no one up.
            for _ in 0..opts.lanes.max(1) {
                let (run_rx, fail) = (&run_rx, &fail);
                s.spawn(move || {
                    // No stream for a lane that never gets work (a small reconcile).
                    let Ok(first) = run_rx.lock().unwrap().recv() else {
                        return;
                    };
                    let mut first = Some(first);
                    let fed = self.lane_with(|send| {
                        loop {
                            let next = match first.take() {
                                Some(r) => Ok(r),
                                // Another lane holds the queue only to wait on it: it is
                                // empty, and this lane must not wait for the lock before it
                                // has made what it sent durable (its idle flush below).
                                None => match run_rx.try_lock() {
                                    Ok(q) => q.try_recv(),
                                    Err(std::sync::TryLockError::WouldBlock) => {
                                        Err(TryRecvError::Empty)
                                    }
                                    Err(std::sync::TryLockError::Poisoned(q)) => {
                                        q.into_inner().try_recv()
                                    }
                                },
                            };
                            let run = match next {
                                Ok(r) => r,
                                Err(TryRecvError::Disconnected) => return Ok(()),
                                Err(TryRecvError::Empty) => {
                                    // Idle: what is buffered goes now, then wait for more.
                                    send(None)?;
                                    match run_rx.lock().unwrap().recv() {
                                        Ok(r) => r,
                                        Err(_) => return Ok(()),
                                    }
                                }
                            };
                            for w in &run {
                                send(Some(w.item()))?;
                            }
                        }
                    });
                    if let Err(e) = fed {
                        fail(e, "lane failed");
                        // The rest is only drained, so the feeder never waits on a full queue.
                        while run_rx.lock().unwrap().recv().is_ok() {}
                    }
                });
            }
            for _ in 0..opts.big_streams.max(1) {
                let (big_rx, fail) = (&big_rx, &fail);
                s.spawn(move || {
                    let mut broken = false;
                    loop {
                        let next = big_rx.lock().unwrap().recv();
                        let Ok(t) = next else { return };
                        // After a failure the rest is only drained, so the feeder never
                        // waits on a full queue.
                        if broken {
                            continue;
                        }
                        if let Err(e) = self.big_file(&t) {
                            fail(e, "transfer failed");
                            broken = true;
                        }
                    }
                });
            }
            // The feeder queues one window's files while the next window's directories are
            // made here: the lanes never wait for a directory batch to be durable.
            let (ready_tx, ready_rx) = sync_channel::<Plan>(1);
            let feeder = s.spawn(move || {
                let mut run = Vec::with_capacity(LANE_RUN);
                for mut window in ready_rx {
                    let small = window.transfers.drain(..).filter_map(|t| {
                        if t.method() == Method::Small {
                            Some(Work::File(t))
                        } else {
                            // A large file waits its turn on a stream of its own.
                            big_tx.send(t).ok();
                            None
                        }
                    });
                    let rest = window.symlinks.drain(..).map(Work::Symlink);
                    let works = small
                        .chain(rest)
                        .chain(window.metas.drain(..).map(Work::Meta));
                    for w in works {
                        // Runs end between directories: two lanes writing into one
                        // directory at once contend for it on the standby.
                        if run.len() >= LANE_RUN
                            && run.last().is_some_and(|l: &Work| l.dir() != w.dir())
                        {
                            let full = std::mem::replace(&mut run, Vec::with_capacity(LANE_RUN));
                            run_tx.send(full).ok();
                        }
                        run.push(w);
                    }
                    // A window's last run goes now: the next window may be a while.
                    if !run.is_empty() {
                        run_tx.send(std::mem::take(&mut run)).ok();
                    }
                }
            });
            let fed = (|| -> Result<(), Error> {
                let mut last_early = Instant::now();
                loop {
                    let window = match windows.recv_timeout(EARLY_EVERY) {
                        Ok(w) => Some(w),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => break,
                    };
                    if let Some(e) = early
                        && last_early.elapsed() >= EARLY_EVERY
                    {
                        self.copy_early(e, ch, opts)?;
                        last_early = Instant::now();
                    }
                    let Some(window) = window else { continue };
                    let t = Instant::now();
                    self.prepare(&window, ch)?;
                    tracing::debug!(
                        "window of {} operations: {} directories made in {} ms",
                        ops(&window),
                        window.mkdirs.len(),
                        t.elapsed().as_millis()
                    );
                    if ready_tx.send(window).is_err() {
                        break;
                    }
                }
                Ok(())
            })();
            drop(ready_tx);
            let _ = feeder.join();
            if let Err(e) = fed {
                fail(e, "reconcile failed");
            }
        });
        if let Some(e) = failed.into_inner().unwrap() {
            return Err(e);
        }
        self.retry()
    }
}

/// What the executor needs to copy changes early while the walk goes on.
pub(super) struct EarlyCopy<'a> {
    source: &'a dyn Early,
    /// The last directory the planner compared. Both walks have read it and all before
    /// it: a change there is copied early; one further on, the walk itself will see.
    passed: &'a Mutex<Option<RelPath>>,
    scan_opts: ScanOptions,
    plan_opts: PlanOptions,
}

impl Exec<'_> {
    /// Copies the changes `e` offers in the part of the tree the walk has passed: additions
    /// and updates only. Removals (even of what is in the way of a new entry) wait for the
    /// batch after the reconcile, which examines every one of these paths again.
    fn copy_early(
        &self,
        e: &EarlyCopy<'_>,
        ch: &mut Channel,
        opts: &SyncOptions,
    ) -> Result<(), Error> {
        let Some(passed) = e.passed.lock().unwrap().clone() else {
            return Ok(());
        };
        let paths = e.source.take(&|p| walk_cmp(&p.split().0, &passed).is_le());
        if paths.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let scopes: Vec<(RelPath, Scope)> =
            paths.iter().map(|p| (p.clone(), Scope::Entry)).collect();
        let scopes = super::with_parents(&scopes);
        let (local, remote, _) = super::list_both(ch, self.root, &scopes, &e.scan_opts, &Silent)?;
        let mut plan = crate::model::plan::plan(&local.manifest, &remote, e.plan_opts);
        let cleared = std::mem::take(&mut plan.clear);
        let blocked = |p: &RelPath| cleared.iter().any(|c| p.starts_with(c));
        plan.mkdirs.retain(|p| !blocked(p));
        plan.transfers.retain(|t| !blocked(&t.path));
        plan.symlinks.retain(|l| !blocked(&l.path));
        plan.metas.retain(|m| !blocked(&m.path));
        plan.links.retain(|l| !blocked(&l.path));
        plan.dir_metas.retain(|m| !blocked(&m.path));
        plan.deletes.clear();
        let ex = Exec::new(
            self.conn,
            (self.root, self.carry),
            Some(&remote),
            self.next_id,
            self.monitor,
            Summary::default(),
        );
        ex.run(&plan, ch, opts)?;
        ex.retry()?;
        let got = ex.tally.into_inner().unwrap();
        tracing::debug!(
            "{} changes seen during the reconcile copied early ({} files) in {} ms",
            paths.len(),
            got.files_transferred,
            started.elapsed().as_millis()
        );
        self.tally.lock().unwrap().absorb(got);
        Ok(())
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
        if ops(&part) == 0
            && part.links.is_empty()
            && part.deletes.is_empty()
            && part.dir_metas.is_empty()
        {
            return;
        }
        super::count_planned(&mut self.planned, &part);
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

/// One item of the standby's walk.
enum Remote {
    Unit(Box<Unit>),
    End { temps_removed: u64 },
}

impl Session<'_> {
    /// Walks both trees together (hashing content when `checksum`), calling `each` with
    /// every directory in walk order: the primary's unit, the standby's, or both.
    ///
    /// # Errors
    /// `each`'s, either walk's, or why the connection failed.
    pub fn walk_both(
        &mut self,
        checksum: bool,
        each: impl FnMut(Option<Unit>, Option<Unit>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let opts = ScanOptions {
            checksum,
            hash_rate: self.opts.hash_rate,
            ..self.scan_opts.clone()
        };
        let walk = Walk {
            conn: &**self.link.conn(),
            root: &self.root,
            opts,
            scopes: Scopes::all(),
            gate: self.gate.clone(),
            monitor: self.monitor,
        };
        walk_both(walk, each)
            .map(drop)
            .map_err(|e| self.link.explain(e))
    }

    /// Reconciles what `scopes` cover (a whole tree, or subtrees and entries) by walking
    /// both sides together; `renamed` renames were applied just before.
    pub(super) fn reconcile_streamed(
        &mut self,
        scopes: Scopes,
        renamed: u64,
    ) -> Result<Outcome, Error> {
        let started = Instant::now();
        let wire_before = self.wire_bytes();
        let checksum = self.opts.checksum;
        let scan_opts = ScanOptions {
            checksum,
            hash_rate: self.opts.hash_rate,
            ..self.scan_opts.clone()
        };
        let plan_opts = PlanOptions {
            checksum,
            delete: self.opts.delete,
            owners: self.owners,
        };
        let limits = self.limits();
        let shown = self.root.path().display().to_string();
        let dry_run = self.opts.dry_run;
        let remote_total = self.remote_total;
        let whole = scopes.is_all();
        let listed = scopes.clone();
        let gate = self.gate.clone();

        let (root, monitor) = (&*self.root, self.monitor);
        let conn = &**self.link.conn();
        let tally = Summary {
            dry_run,
            renamed,
            ..Summary::default()
        };
        let ex = Exec::new(
            conn,
            (root, self.carry),
            None,
            &self.next_id,
            monitor,
            tally,
        );
        let opts = &self.opts;
        let mut merger = Merger::new(plan_opts);
        let mut deletes: Spill<(RelPath, u64)> = Spill::new();
        let mut dir_metas: Spill<MetaFix> = Spill::new();
        let mut dry = Dry {
            monitor,
            kept: Plan::default(),
            planned: Summary::default(),
            part: Plan::default(),
        };
        let mut source_empty = false;

        // Changes seen meanwhile, in what the walk has passed, are copied early.
        let passed: Mutex<Option<RelPath>> = Mutex::new(None);
        let early_source = if dry_run { None } else { self.early.clone() };
        let early = early_source.as_deref().map(|source| EarlyCopy {
            source,
            passed: &passed,
            scan_opts: scan_opts.clone(),
            plan_opts,
        });

        let walked: Result<u64, Error> = std::thread::scope(|s| {
            // The window being carried out while the next is planned.
            let (wtx, wrx) = sync_channel::<Plan>(1);
            let (ex, ch) = (&ex, &mut self.ch);
            let early = early.as_ref();
            let executor = s.spawn(move || ex.run_windows(wrx, ch, opts, early));
            let mut window = Plan::default();
            let mut window_since = Instant::now();
            let mut planned = (0u64, 0u64);
            let mut first = true;
            // Hands the window on: waiting for the executor when `wait`, else only if it is
            // idle. False when the executor stopped.
            let mut send = |window: &mut Plan, dry: &mut Dry, wait: bool| -> bool {
                let w = std::mem::take(window);
                let (files, bytes) = (w.transfers.len() as u64, w.transfer_bytes());
                if dry_run {
                    dry.show(w);
                } else if wait {
                    if wtx.send(w).is_err() {
                        return false;
                    }
                } else {
                    match wtx.try_send(w) {
                        Ok(()) => {}
                        Err(TrySendError::Full(w)) => {
                            *window = w;
                            return true;
                        }
                        Err(TrySendError::Disconnected(_)) => return false,
                    }
                }
                planned.0 += files;
                planned.1 += bytes;
                monitor.planned(planned.0, planned.1);
                true
            };
            let walk = Walk {
                conn,
                root,
                opts: scan_opts,
                scopes,
                gate,
                monitor,
            };
            let walked = walk_both(walk, |lu, ru| {
                if std::mem::take(&mut first) {
                    // An empty source facing a full standby is refused before anything is
                    // touched: an unmounted disk must never wipe the standby. (A part of
                    // the tree may be empty; then the root itself is looked at.)
                    if let Some(lu) = &lu
                        && lu.entries.is_empty()
                        && lu.errors.is_empty()
                        && (whole
                            || root
                                .is_empty()
                                .map_err(|e| Error::io("cannot read SRC", e))?)
                    {
                        let held = ru.as_ref().map_or(0, |r| r.entries.len());
                        source_empty = true;
                        // Only a refusal matters now; what may be deleted is judged at the
                        // end, with the whole count.
                        let _ = guard::check_counts(&shown, true, held, held, limits)?;
                    }
                }
                if let Some(lu) = &lu {
                    let mut t = ex.tally.lock().unwrap();
                    super::note_problems(&mut t, &lu.specials, &lu.skipped, &lu.errors);
                }
                let at = lu.as_ref().or(ru.as_ref()).map(|u| u.dir.path.clone());
                *passed.lock().unwrap() = at;
                let step = merger.step(lu, ru);
                for d in step.deletes {
                    deletes.push(d).map_err(spill_error)?;
                }
                for m in step.dir_metas {
                    dir_metas.push(m).map_err(spill_error)?;
                }
                if ops(&window) == 0 {
                    window_since = Instant::now();
                }
                append(&mut window, step.plan);
                let n = ops(&window);
                let full = n >= WINDOW_OPS || window.transfer_bytes() >= WINDOW_BYTES;
                let aged = n > 0 && window_since.elapsed() >= WINDOW_AGE;
                if (full || aged) && !send(&mut window, &mut dry, full) {
                    // The executor stopped: its error says why.
                    return Err(Error::Protocol(ProtocolError::Invalid("stopped".into())));
                }
                Ok(())
            });
            if walked.is_ok() {
                send(&mut window, &mut dry, true);
            }
            drop(wtx);
            let executed = executor.join().expect("executor panicked");
            // The executor's error explains a stop best.
            executed.and(walked)
        });
        let temps_removed = walked?;
        // Every name of the files and symlinks with several names: a whole walk saw them
        // all; a walk of part of the tree looks for the others now.
        if whole {
            self.links.rebuild(merger.linked_local());
        } else {
            let linked: Vec<_> = merger
                .linked_local()
                .iter()
                .filter(|e| e.link.is_some())
                .cloned()
                .collect();
            let scan_opts = ScanOptions {
                checksum,
                hash_rate: self.opts.hash_rate,
                ..self.scan_opts.clone()
            };
            let more = super::complete_links(
                (&mut self.links, &mut self.ch, root),
                &scan_opts,
                &listed,
                &linked,
                monitor,
            )?;
            if let Some((l, r)) = more {
                merger.add_linked(l, r);
            }
        }
        let counts = merger.counts;
        let finish = merger.finish();

        // The files with several names, now that every name of each is known.
        if dry_run {
            dry.show(finish.plan);
        } else if !finish.plan.is_empty() {
            ex.run(&finish.plan, &mut self.ch, &self.opts)?;
        }
        for d in finish.deletes {
            deletes.push(d).map_err(spill_error)?;
        }
        for m in finish.dir_metas {
            dir_metas.push(m).map_err(spill_error)?;
        }

        // Deletions last, once the guard has seen the whole count. A refusal leaves them,
        // and only them, undone: directory attributes are still set below.
        let total = remote_total.max(counts.remote_entries as usize);
        let mut deleting = true;
        let mut refusal = None;
        let verdict = guard::check_counts(
            &shown,
            source_empty,
            counts.deleted_entries as usize,
            total,
            limits,
        )?;
        if let Deletions::Refused(why) = verdict {
            if self.opts.on_mass_delete == MassDelete::SkipDeletes {
                // Watch mode: replicate everything but the deletions, and say so loudly.
                tracing::error!("{why}; replicating other changes, not the deletions");
            }
            refusal = Some(guard::refused_after_the_rest(&why, counts.replaced > 0));
            deleting = false;
        }
        let mut batch = Vec::new();
        let mut kept = 0;
        for d in deletes.drain().map_err(spill_error)? {
            let (path, entries) = d.map_err(spill_error)?;
            if !deleting {
                kept += entries;
                continue;
            }
            if dry_run {
                dry.part.deletes.push(path);
                if dry.part.deletes.len() >= FINAL_BATCH {
                    dry.show_part();
                }
                continue;
            }
            let msg = Message::Delete {
                id: ex.id(),
                path: path.clone(),
            };
            batch.push((msg, path, super::Op::Remove { entries }));
            if batch.len() >= FINAL_BATCH {
                ex.control_batch(&mut self.ch, std::mem::take(&mut batch), 3)?;
            }
        }
        ex.control_batch(&mut self.ch, std::mem::take(&mut batch), 3)?;
        // Directory attributes after everything inside them.
        for m in dir_metas.drain().map_err(spill_error)? {
            let m = m.map_err(spill_error)?;
            if dry_run {
                dry.part.dir_metas.push(m);
                if dry.part.dir_metas.len() >= FINAL_BATCH {
                    dry.show_part();
                }
                continue;
            }
            let id = ex.id();
            batch.push((super::set_meta(&m, id), m.path, super::Op::Meta));
            if batch.len() >= FINAL_BATCH {
                ex.control_batch(&mut self.ch, std::mem::take(&mut batch), 4)?;
            }
        }
        ex.control_batch(&mut self.ch, batch, 4)?;

        let mut summary = ex.tally.into_inner().unwrap();
        summary.files_scanned = counts.local_entries;
        summary.bytes_total = counts.local_bytes;
        summary.temps_removed = temps_removed;
        // The guard's yardstick: counted whole by a whole walk, else kept up to date.
        let held = if whole {
            counts.remote_entries
        } else {
            self.remote_total as u64
        };
        let removed = counts.removed_entries - kept;
        summary.deletions_refused = kept;
        summary.refused = refusal;
        let mut dry = dry.end();
        if dry_run {
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
        Ok(Outcome {
            summary,
            plan: dry.kept,
        })
    }
}

/// Walks the primary's tree and, on a stream of its own, the standby's, together: calls
/// `each` with every directory in walk order, the primary's unit, the standby's, or both.
/// Returns the leftover temporary files the standby's walk removed.
///
/// # Errors
/// `each`'s, the walks', or the connection's; after any but a guard's refusal the
/// connection is closed, as the standby may still be sending its walk.
pub(crate) fn walk_both(
    w: Walk<'_>,
    mut each: impl FnMut(Option<Unit>, Option<Unit>) -> Result<(), Error>,
) -> Result<u64, Error> {
    let Walk {
        conn,
        root,
        opts,
        scopes,
        gate,
        monitor,
    } = w;
    let mut walk = Channel::new(conn.open().map_err(ProtocolError::Io)?);
    // The whole tree is asked for as version 3 peers know it.
    walk.send(&if scopes.is_all() {
        Message::Walk {
            checksum: opts.checksum,
            hash_rate: opts.hash_rate,
        }
    } else {
        Message::WalkScopes {
            scopes: scopes.as_slice().to_vec(),
            checksum: opts.checksum,
            hash_rate: opts.hash_rate,
        }
    })?;
    walk.flush()?;
    let done = std::thread::scope(|s| {
        let (ltx, lrx) = sync_channel::<io::Result<Vec<Unit>>>(2);
        let (rtx, rrx) = sync_channel::<Result<Remote, ProtocolError>>(8);
        let check = WalkCheck {
            scopes: scopes.clone(),
            ..WalkCheck::default()
        };
        s.spawn(move || walk_local(Walker::scoped(root, opts, scopes, gate), ltx, monitor));
        let walk = &mut walk;
        s.spawn(move || read_remote(walk, check, rtx));
        let mut local = Queue::Local(lrx, VecDeque::new(), false);
        let mut remote = Queue::Remote(rrx, None, None);
        let mut run = || -> Result<u64, Error> {
            loop {
                let (l, r) = (local.peek()?, remote.peek()?);
                let Some(side) = next_side(l, r) else { break };
                let lu = matches!(side, Side::Local | Side::Both).then(|| local.take());
                let ru = matches!(side, Side::Remote | Side::Both).then(|| remote.take());
                each(lu.flatten(), ru.flatten())?;
            }
            Ok(remote.temps_removed())
        };
        let done = run();
        if done
            .as_ref()
            .is_err_and(|e| !matches!(e, Error::Refused(_)))
        {
            // The walks' threads stop at their next send; the standby's may be waiting
            // to read: the session is over.
            conn.close("reconcile failed");
        }
        done
    });
    let _ = walk.finish();
    done
}

/// Where the planner takes units from: the local walk's batches, or the standby's stream.
enum Queue {
    Local(Receiver<io::Result<Vec<Unit>>>, VecDeque<Unit>, bool),
    /// The standby's walk, its next unit, and the temps it removed once it has ended.
    Remote(
        Receiver<Result<Remote, ProtocolError>>,
        Option<Box<Unit>>,
        Option<u64>,
    ),
}

impl Queue {
    fn peek(&mut self) -> Result<Option<&RelPath>, Error> {
        match self {
            Queue::Local(rx, q, done) => {
                while q.is_empty() && !*done {
                    match rx.recv() {
                        Ok(Ok(batch)) => q.extend(batch),
                        Ok(Err(e)) => return Err(Error::io("cannot read SRC", e)),
                        Err(_) => *done = true,
                    }
                }
                Ok(q.front().map(|u| &u.dir.path))
            }
            Queue::Remote(rx, head, end) => {
                if head.is_none() && end.is_none() {
                    match rx.recv() {
                        Ok(Ok(Remote::Unit(u))) => *head = Some(u),
                        Ok(Ok(Remote::End { temps_removed })) => *end = Some(temps_removed),
                        Ok(Err(e)) => return Err(peer_error(e)),
                        Err(_) => {
                            return Err(Error::Protocol(ProtocolError::Invalid(
                                "the standby's walk ended early".into(),
                            )));
                        }
                    }
                }
                Ok(head.as_ref().map(|u| &u.dir.path))
            }
        }
    }

    fn take(&mut self) -> Option<Unit> {
        match self {
            Queue::Local(_, q, _) => q.pop_front(),
            Queue::Remote(_, head, _) => head.take().map(|u| *u),
        }
    }

    fn temps_removed(&self) -> u64 {
        match self {
            Queue::Remote(_, _, end) => end.unwrap_or(0),
            Queue::Local(..) => 0,
        }
    }
}

/// Walks the primary's tree into `tx`, a batch at a time.
fn walk_local(mut w: Walker<'_>, tx: SyncSender<io::Result<Vec<Unit>>>, monitor: &dyn Monitor) {
    let mut seen = 0u64;
    loop {
        let batch = w.next_batch(WALK_AHEAD);
        let end = matches!(batch, Ok(None) | Err(_));
        let item = match batch {
            Ok(Some(b)) => {
                seen += b.iter().map(|u| u.entries.len() as u64).sum::<u64>();
                monitor.scanned(seen);
                Ok(b)
            }
            Ok(None) => break,
            Err(e) => Err(e),
        };
        if tx.send(item).is_err() || end {
            break;
        }
    }
}

/// Reads the standby's walk into `tx`, checking it is the walk it claims to be: units in
/// walk order, each holding only its own children, sorted, the count as announced.
fn read_remote(
    walk: &mut Channel,
    mut check: WalkCheck,
    tx: SyncSender<Result<Remote, ProtocolError>>,
) {
    loop {
        let item = match walk.r.recv().and_then(|m| check.message(m)) {
            Ok(None) => continue,
            Ok(Some(r)) => Ok(r),
            Err(e) => Err(e),
        };
        let end = matches!(item, Ok(Remote::End { .. }) | Err(_));
        if tx.send(item).is_err() || end {
            return;
        }
    }
}

/// What both sides walk, and how.
pub(crate) struct Walk<'a> {
    pub conn: &'a dyn Connection,
    pub root: &'a Root,
    pub opts: ScanOptions,
    pub scopes: Scopes,
    /// What the primary's walk waits on before each directory (a watcher setting up).
    pub gate: Option<Arc<dyn Gate>>,
    pub monitor: &'a dyn Monitor,
}

/// The checks a standby's walk must pass, message by message.
struct WalkCheck {
    /// What the walk may cover: a standby's entry outside it would be taken for one the
    /// primary lacks, and deleted.
    scopes: Scopes,
    /// The directory being received (a large one comes in parts).
    current: Option<Unit>,
    last_dir: Option<RelPath>,
    count: u64,
    /// The attribute digests for the next `Dir`.
    sums: Option<Vec<(u32, crate::tree::xattr::Sum)>>,
    /// The shapes for the next `Dir`.
    shapes: Option<Vec<(u32, crate::model::manifest::Shape)>>,
    /// Special files for the next `Dir`.
    specials: Vec<crate::model::manifest::Special>,
}

impl Default for WalkCheck {
    fn default() -> WalkCheck {
        WalkCheck {
            scopes: Scopes::all(),
            current: None,
            last_dir: None,
            count: 0,
            sums: None,
            shapes: None,
            specials: Vec::new(),
        }
    }
}

impl WalkCheck {
    /// Takes one message: a finished unit, the end, or nothing yet.
    fn message(&mut self, m: Message) -> Result<Option<Remote>, ProtocolError> {
        let bad = |why: String| Err(ProtocolError::Invalid(format!("the standby's walk {why}")));
        match m {
            Message::XattrSums { sums } if self.sums.is_none() => {
                self.sums = Some(sums);
                Ok(None)
            }
            Message::Shapes { shapes } if self.shapes.is_none() => {
                self.shapes = Some(shapes);
                Ok(None)
            }
            Message::Specials { specials } if self.specials.is_empty() => {
                self.specials = specials;
                Ok(None)
            }
            Message::Dir {
                mut dir,
                mut entries,
                errors,
                more,
            } => {
                if let Some(s) = self.sums.take() {
                    let all = std::iter::once(&mut dir).chain(entries.iter_mut());
                    crate::wire::protocol::put_xattr_sums(s, all)?;
                }
                if let Some(s) = self.shapes.take() {
                    let all = std::iter::once(&mut dir).chain(entries.iter_mut());
                    crate::wire::protocol::put_shapes(s, all)?;
                }
                let specials = std::mem::take(&mut self.specials);
                if !dir.is_dir() {
                    return bad(format!("lists {} as a directory", dir.path));
                }
                let unit = match self.current.take() {
                    Some(u) if u.dir.path == dir.path => u,
                    Some(u) => return bad(format!("left {} unfinished", u.dir.path)),
                    None => {
                        let in_order = match &self.last_dir {
                            None => dir.path.is_root(),
                            Some(last) => walk_cmp(last, &dir.path).is_lt(),
                        };
                        if !in_order {
                            return bad(format!("is out of order at {}", dir.path));
                        }
                        if !dir.path.is_root() && !self.scopes.enters(&dir.path) {
                            return bad(format!("strays outside its scope into {}", dir.path));
                        }
                        self.last_dir = Some(dir.path.clone());
                        self.count += 1;
                        Unit {
                            dir,
                            entries: Vec::new(),
                            errors: Vec::new(),
                            specials: Vec::new(),
                            skipped: Vec::new(),
                        }
                    }
                };
                let mut unit = unit;
                for e in entries {
                    if e.path.is_root() || e.path.split().0 != unit.dir.path {
                        return bad(format!("puts {} in {}", e.path, unit.dir.path));
                    }
                    if unit.entries.last().is_some_and(|l| l.path >= e.path) {
                        return bad(format!("is out of order at {}", e.path));
                    }
                    if !self.scopes.holds(&e.path) {
                        return bad(format!("strays outside its scope to {}", e.path));
                    }
                    self.count += 1;
                    unit.entries.push(e);
                }
                for sp in specials {
                    super::check_special(&sp, Some(&unit.dir.path))?;
                    if !self.scopes.holds(&sp.path) {
                        return bad(format!("strays outside its scope to {}", sp.path));
                    }
                    unit.specials.push(sp);
                }
                unit.errors.extend(errors);
                if more {
                    self.current = Some(unit);
                    Ok(None)
                } else {
                    Ok(Some(Remote::Unit(Box::new(unit))))
                }
            }
            Message::WalkEnd {
                count,
                temps_removed,
            } => {
                if let Some(u) = &self.current {
                    return bad(format!("left {} unfinished", u.dir.path));
                }
                if count != self.count {
                    return bad(format!("announced {count} entries and sent {}", self.count));
                }
                Ok(Some(Remote::End { temps_removed }))
            }
            other => Err(ProtocolError::unexpected(&other, "Dir")),
        }
    }
}

fn spill_error(e: io::Error) -> Error {
    Error::io(
        "cannot keep the reconcile's pending work in the temporary directory",
        e,
    )
}

/// Operations in a window.
fn ops(p: &Plan) -> usize {
    p.clear.len() + p.mkdirs.len() + p.transfers.len() + p.symlinks.len() + p.metas.len()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::manifest::Scope;
    use crate::model::manifest::testing::{dir, file};

    fn dir_msg(d: &str, entries: Vec<crate::model::manifest::Entry>) -> Message {
        Message::Dir {
            dir: dir(d),
            entries,
            errors: vec![],
            more: false,
        }
    }

    #[test]
    fn a_standby_walk_outside_its_scope_is_refused() {
        let scoped = || WalkCheck {
            scopes: Scopes::new(&[(RelPath::new("big").unwrap(), Scope::Tree)]),
            ..WalkCheck::default()
        };
        let mut c = scoped();
        assert!(c.message(dir_msg("", vec![dir("big")])).is_ok());
        assert!(c.message(dir_msg("big", vec![file("big/x", 1)])).is_ok());
        // A name beside the scope would look like one the primary lacks, and be deleted.
        let e = scoped()
            .message(dir_msg("", vec![dir("big"), dir("keep")]))
            .err()
            .unwrap();
        assert!(e.to_string().contains("outside its scope to keep"), "{e}");
        let mut c = scoped();
        c.message(dir_msg("", vec![dir("big")])).unwrap();
        let e = c.message(dir_msg("keep", vec![])).err().unwrap();
        assert!(e.to_string().contains("outside its scope into keep"), "{e}");
    }
}
