//! Carrying out a streamed reconcile window by window, while the next window is planned.
//! The lanes and the large files' streams stay open across windows, so one window's last
//! files overlap the next one's first; only a window's directories are made (and durable)
//! before its files start. Changes a watch sees meanwhile, in the part of the tree the walk
//! has passed, are copied early between windows.

use super::exec::LaneItem;
use super::exec::{Exec, FirstFailure};
use super::listing::{list_both, with_parents};
use super::{Early, SyncOptions};
use crate::error::Error;
use crate::model::listing::walk_cmp;
use crate::model::manifest::Scope;
use crate::model::path::RelPath;
use crate::model::plan::{MetaFix, Method, Plan, PlanOptions, SymlinkOp, Transfer};
use crate::model::progress::Silent;
use crate::model::summary::Summary;
use crate::tree::scan::ScanOptions;
use crate::wire::channel::Channel;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, sync_channel};
use std::sync::{Mutex, TryLockError};
use std::time::{Duration, Instant};

/// How often the executor copies the changes seen since the walk passed them.
const EARLY_EVERY: Duration = Duration::from_millis(50);

/// Small items one lane takes at least, in whole directories, before another lane takes the
/// next: files of one directory stay together on one lane.
const LANE_RUN: usize = 256;

/// Runs queued for the lanes: enough (about 8,000 files) to keep them busy while the next
/// window's directories are made.
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

/// Runs of small items, queued for whichever lane is free.
type Runs = Mutex<Receiver<Vec<Work>>>;

/// What the executor needs to copy changes early while the walk goes on.
pub(super) struct EarlyCopy<'a> {
    pub source: &'a dyn Early,
    /// The last directory the planner compared. Both walks have read it and all before
    /// it: a change there is copied early; one further on, the walk itself will see.
    pub passed: &'a Mutex<Option<RelPath>>,
    pub scan_opts: ScanOptions,
    pub plan_opts: PlanOptions,
}

impl Exec<'_> {
    /// Carries out the windows `windows` brings until it ends, then sends again, whole,
    /// what must be.
    ///
    /// # Errors
    /// The first failure of any stream; the connection is then closed.
    pub(super) fn run_windows(
        &self,
        windows: Receiver<Plan>,
        ch: &mut Channel,
        opts: &SyncOptions,
        early: Option<&EarlyCopy<'_>>,
    ) -> Result<(), Error> {
        let failure = FirstFailure::new(self.conn());
        let (big_tx, big_rx) = sync_channel::<Transfer>(64);
        let big_rx = Mutex::new(big_rx);
        let (run_tx, run_rx) = sync_channel::<Vec<Work>>(RUNS_QUEUED);
        let run_rx = Mutex::new(run_rx);
        std::thread::scope(|s| {
            // One queue of runs for all lanes: whichever lane is free takes the next run, so
            // a lane busy making its batch durable holds no one up.
            for _ in 0..opts.lanes.max(1) {
                let (run_rx, failure) = (&run_rx, &failure);
                s.spawn(move || self.window_lane(run_rx, failure));
            }
            for _ in 0..opts.big_streams.max(1) {
                let (big_rx, failure) = (&big_rx, &failure);
                s.spawn(move || self.big_files(big_rx, failure));
            }
            // The feeder queues one window's files while the next window's directories are
            // made here: the lanes never wait for a directory batch to be durable.
            let (ready_tx, ready_rx) = sync_channel::<Plan>(1);
            let feeder = s.spawn(move || feed_lanes(ready_rx, big_tx, run_tx));
            let prepared = self.prepare_windows(windows, ready_tx, ch, opts, early);
            let _ = feeder.join();
            if let Err(e) = prepared {
                failure.fail(e, "reconcile failed");
            }
        });
        failure.result()?;
        self.retry()
    }

    /// Makes each window's directories on the control stream, then hands it on to be fed
    /// to the lanes; copies early changes between windows.
    fn prepare_windows(
        &self,
        windows: Receiver<Plan>,
        ready: SyncSender<Plan>,
        ch: &mut Channel,
        opts: &SyncOptions,
        early: Option<&EarlyCopy<'_>>,
    ) -> Result<(), Error> {
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
                window.op_count(),
                window.mkdirs.len(),
                t.elapsed().as_millis()
            );
            if ready.send(window).is_err() {
                break;
            }
        }
        Ok(())
    }

    /// One lane, taking runs from `runs` until there are no more.
    fn window_lane(&self, runs: &Runs, failure: &FirstFailure<'_>) {
        // No stream for a lane that never gets work (a small reconcile).
        let Ok(first) = runs.lock().unwrap().recv() else {
            return;
        };
        let mut first = Some(first);
        let fed = self.lane_with(|lane| {
            loop {
                let next = match first.take() {
                    Some(r) => Ok(r),
                    None => try_next_run(runs),
                };
                let run = match next {
                    Ok(r) => r,
                    Err(TryRecvError::Disconnected) => return Ok(()),
                    Err(TryRecvError::Empty) => {
                        // Idle: what is buffered goes now, then wait for more.
                        lane.idle()?;
                        match runs.lock().unwrap().recv() {
                            Ok(r) => r,
                            Err(_) => return Ok(()),
                        }
                    }
                };
                for w in &run {
                    lane.send(w.item())?;
                }
            }
        });
        if let Err(e) = fed {
            failure.fail(e, "lane failed");
            // The rest is only drained, so the feeder never waits on a full queue.
            while runs.lock().unwrap().recv().is_ok() {}
        }
    }

    /// One stream for large files, taking them from `big` until there are no more.
    fn big_files(&self, big: &Mutex<Receiver<Transfer>>, failure: &FirstFailure<'_>) {
        let mut broken = false;
        loop {
            let next = big.lock().unwrap().recv();
            let Ok(t) = next else { return };
            // After a failure the rest is only drained, so the feeder never waits on a full
            // queue.
            if broken {
                continue;
            }
            if let Err(e) = self.big_file(&t) {
                failure.fail(e, "transfer failed");
                broken = true;
            }
        }
    }

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
        let scopes = with_parents(&scopes);
        let root = &self.ends.root;
        let (local, remote, _) = list_both(ch, root, &scopes, &e.scan_opts, &Silent)?;
        let plan = additions_only(crate::model::plan::plan(
            &local.manifest,
            &remote,
            e.plan_opts,
        ));
        let ex = Exec::new(self.ends, Some(&remote), Summary::default());
        ex.run(&plan, ch, opts)?;
        ex.retry()?;
        let got = ex.into_summary();
        tracing::debug!(
            "{} changes seen during the reconcile copied early ({} files) in {} ms",
            paths.len(),
            got.files_transferred,
            started.elapsed().as_millis()
        );
        self.book().summary_mut().absorb(got);
        Ok(())
    }
}

/// `plan` without its removals, nor anything beneath what it would clear out of the way.
fn additions_only(mut plan: Plan) -> Plan {
    let cleared = std::mem::take(&mut plan.clear);
    let blocked = |p: &RelPath| cleared.iter().any(|c| p.starts_with(c));
    plan.mkdirs.retain(|p| !blocked(p));
    plan.transfers.retain(|t| !blocked(&t.path));
    plan.symlinks.retain(|l| !blocked(&l.path));
    plan.metas.retain(|m| !blocked(&m.path));
    plan.links.retain(|l| !blocked(&l.path));
    plan.dir_metas.retain(|m| !blocked(&m.path));
    plan.deletes.clear();
    plan
}

/// The next run if one is queued. Another lane holds the queue only to wait on it: it is
/// empty, and this lane must not wait for the lock before it has made what it sent durable
/// (its idle flush).
fn try_next_run(runs: &Runs) -> Result<Vec<Work>, TryRecvError> {
    match runs.try_lock() {
        Ok(q) => q.try_recv(),
        Err(TryLockError::WouldBlock) => Err(TryRecvError::Empty),
        Err(TryLockError::Poisoned(q)) => q.into_inner().try_recv(),
    }
}

/// Splits each window from `ready` into large files, each for a stream of its own (`big`),
/// and runs of small items for the lanes (`runs`). Runs end between directories: two lanes
/// writing into one directory at once contend for it on the standby.
fn feed_lanes(ready: Receiver<Plan>, big: SyncSender<Transfer>, runs: SyncSender<Vec<Work>>) {
    let mut run = Vec::with_capacity(LANE_RUN);
    for mut window in ready {
        let small = window.transfers.drain(..).filter_map(|t| {
            if t.method() == Method::Small {
                Some(Work::File(t))
            } else {
                // A large file waits its turn on a stream of its own.
                big.send(t).ok();
                None
            }
        });
        let rest = window.symlinks.drain(..).map(Work::Symlink);
        let works = small
            .chain(rest)
            .chain(window.metas.drain(..).map(Work::Meta));
        for w in works {
            if run.len() >= LANE_RUN && run.last().is_some_and(|l: &Work| l.dir() != w.dir()) {
                let full = std::mem::replace(&mut run, Vec::with_capacity(LANE_RUN));
                runs.send(full).ok();
            }
            run.push(w);
        }
        // A window's last run goes now: the next window may be a while.
        if !run.is_empty() {
            runs.send(std::mem::take(&mut run)).ok();
        }
    }
}
