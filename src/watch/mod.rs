//! `hotsync watch`: reconcile once, then replicate every change within milliseconds, over
//! one long-lived connection, through restarts, bursts, renames and network loss.
//!
//! The watcher's events are hints ([`batcher`]); each batch re-examines the paths they
//! name on both sides ([`Session::sync_paths`]), so a lost or odd event costs a re-scan,
//! never a wrong copy. When the standby goes away, changes keep queueing (bounded), the
//! connection is retried with backoff, and a full reconcile runs on return. A source root
//! that disappears, is replaced (an unmounted disk) or empties pauses replication: nothing
//! is ever deleted on the standby because of it.

pub mod batcher;
pub mod watcher;

use crate::error::Error;
use crate::fsroot::Root;
use crate::link::Connector;
use crate::progress::Silent;
use crate::sender::{Session, SyncOptions};
use crate::summary::Summary;
use crate::transport::Connection;
use crate::verify::Report;
use batcher::{Batcher, Hint};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use crate::link::Target;

#[derive(Clone)]
pub struct WatchOptions {
    pub sync: SyncOptions,
    pub batcher: batcher::Config,
    /// How often everything is re-scanned when the inotify watch limit leaves parts of the
    /// tree unwatched.
    pub fallback_rescan: Duration,
    /// Run a full verify this often, in the background, and repair what it finds.
    pub verify_every: Option<Duration>,
    /// Bytes per second the background verify may read on each side.
    pub verify_rate: u64,
}

/// Hears what a watch does: for a status line, logs, or a test.
pub trait Observer: Sync {
    fn connected(&self, _to: &str) {}
    fn disconnected(&self, _why: &str, _retry_in: Duration) {}
    /// A batch (or the initial reconcile, with `changes` 0) is durable on the standby.
    fn replicated(&self, _summary: &Summary, _changes: usize, _lag: Duration) {}
    /// Changes waiting, and how long the oldest has waited.
    fn queued(&self, _changes: usize, _oldest: Option<Duration>) {}
    /// Replication stopped for a reason someone must look at; it resumes by itself.
    fn paused(&self, _why: &str) {}
    /// A background verify finished: its report (changes still in flight left out), and
    /// how many differences were repaired.
    fn verified(&self, _report: &Report, _repaired: usize) {}
    /// A background verify could not run.
    fn verify_failed(&self, _why: &str) {}
}

/// How often the loop wakes when nothing happens.
const TICK: Duration = Duration::from_millis(250);
/// How long a batch in flight may run on after a shutdown request before it is abandoned.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1200);

/// Doubling delays between reconnection attempts, 100 ms to 10 s.
struct Backoff(Duration);

impl Backoff {
    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(10));
        d
    }
    fn reset(&mut self) {
        self.0 = Duration::from_millis(100);
    }
}

/// Sleeps `d`, or less if a shutdown is requested.
fn nap(d: Duration, shutdown: &AtomicBool) {
    let end = Instant::now() + d;
    while !shutdown.load(Ordering::Relaxed) && Instant::now() < end {
        std::thread::sleep(
            Duration::from_millis(20).min(end.saturating_duration_since(Instant::now())),
        );
    }
}

/// The source root's identity (device, inode), to notice it being unmounted or replaced.
type Identity2 = (u64, u64);

/// Opens the source root if it is usable: a directory with something in it.
fn usable_source(src: &Path) -> Result<(Arc<Root>, Identity2), String> {
    let shown = src.display();
    let root = crate::check::open_source(src).map_err(|e| e.to_string())?;
    let empty = root
        .is_empty()
        .map_err(|e| format!("cannot list SRC {shown}: {e}"))?;
    if empty {
        return Err(format!(
            "SRC {shown} is empty (is a disk not mounted?): replication paused, nothing is deleted on the standby"
        ));
    }
    let st = rustix::fs::fstat(root.fd()).map_err(|e| format!("cannot stat SRC {shown}: {e}"))?;
    Ok((Arc::new(root), (st.st_dev, st.st_ino)))
}

/// A full verify of `src` against `target` on a connection of its own (a read-only session:
/// it never competes for the standby's lock), reading at most `rate` bytes per second.
fn background_verify(
    src: &Path,
    connector: &Connector,
    excludes: &[String],
    rate: u64,
) -> Result<Report, Error> {
    let root = Arc::new(crate::check::open_source(src)?);
    crate::verify::verify(root, connector.connect()?, excludes, rate)
}

/// Why the source root is no longer the one being watched, if it is not.
fn source_moved(src: &Path, id: Identity2) -> Option<String> {
    match std::fs::metadata(src) {
        Ok(md) if (md.dev(), md.ino()) == id => None,
        Ok(_) => Some(format!(
            "SRC {} was replaced (unmounted or remounted?)",
            src.display()
        )),
        Err(e) => Some(format!("SRC {} is gone ({e})", src.display())),
    }
}

/// Watches `src` and replicates to `target` until `shutdown` is set. Returns `Ok` on a
/// clean shutdown; an error only for problems that retrying cannot fix.
pub fn watch(
    src: &Path,
    target: &Target,
    opts: &WatchOptions,
    shutdown: &AtomicBool,
    obs: &dyn Observer,
) -> Result<(), Error> {
    crate::fsroot::raise_fd_limit();
    if let Target::Local(dest) = target {
        crate::check::open_source(src)?;
        crate::check::prepare_local_dest(src, dest, true)?;
    }
    let connector = Arc::new(Connector::new(
        target.clone(),
        crate::standby::Access::Write,
    )?);
    let mut sync_opts = opts.sync.clone();
    sync_opts.on_mass_delete = crate::guard::MassDelete::SkipDeletes;
    let current: Mutex<Option<Arc<dyn Connection>>> = Mutex::new(None);
    let busy_since: Mutex<Option<Instant>> = Mutex::new(None);
    let finished = AtomicBool::new(false);
    std::thread::scope(|s| {
        // Abandons a batch still running well after a shutdown request.
        s.spawn(|| {
            while !finished.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                let overdue = busy_since
                    .lock()
                    .unwrap()
                    .is_some_and(|t| t.elapsed() > SHUTDOWN_GRACE);
                if shutdown.load(Ordering::Relaxed)
                    && overdue
                    && let Some(c) = current.lock().unwrap().as_ref()
                {
                    c.abort("primary shutting down");
                }
            }
        });
        let result = run(
            src,
            &connector,
            opts,
            &sync_opts,
            shutdown,
            obs,
            &current,
            &busy_since,
        );
        finished.store(true, Ordering::Relaxed);
        result
    })
}

#[allow(clippy::too_many_arguments)]
fn run(
    src: &Path,
    connector: &Arc<Connector>,
    opts: &WatchOptions,
    sync_opts: &SyncOptions,
    shutdown: &AtomicBool,
    obs: &dyn Observer,
    current: &Mutex<Option<Arc<dyn Connection>>>,
    busy_since: &Mutex<Option<Instant>>,
) -> Result<(), Error> {
    let mut backoff = Backoff(Duration::from_millis(100));
    let mut batcher = Batcher::new(opts.batcher);
    let mut paused: Option<String> = None;
    let silent = Silent;
    let (verified_tx, verified) = std::sync::mpsc::channel::<Result<Report, Error>>();
    let mut verify_due = opts.verify_every.map(|d| Instant::now() + d);
    let mut verifying = false;
    'outer: loop {
        if shutdown.load(Ordering::Relaxed) {
            return Ok(());
        }
        let (root, identity) = match usable_source(src) {
            Ok(x) => x,
            Err(why) => {
                if paused.as_deref() != Some(why.as_str()) {
                    obs.paused(&why);
                    paused = Some(why);
                }
                nap(Duration::from_secs(1), shutdown);
                continue;
            }
        };
        // Watch before reconciling, so nothing that changes meanwhile is missed.
        let watcher = match watcher::start(src) {
            Ok(w) => w,
            Err(e) => {
                obs.paused(&e.to_string());
                nap(Duration::from_secs(1), shutdown);
                continue;
            }
        };
        let link = match connector.connect() {
            Ok(l) => l,
            Err(e) if matches!(e, Error::Usage(_)) => return Err(e),
            Err(e) => {
                let d = backoff.next();
                obs.disconnected(&e.to_string(), d);
                nap(d, shutdown);
                continue;
            }
        };
        *current.lock().unwrap() = Some(link.conn().clone());
        let mut session = match Session::open(root.clone(), link, sync_opts, &silent) {
            Ok(s) => s,
            Err(e) => {
                let d = backoff.next();
                obs.disconnected(&e.to_string(), d);
                nap(d, shutdown);
                continue;
            }
        };
        obs.connected(&connector.target().describe());
        paused = None;
        let started = Instant::now();
        *busy_since.lock().unwrap() = Some(started);
        let first = session.sync_all();
        *busy_since.lock().unwrap() = None;
        match first {
            Ok(out) => {
                backoff.reset();
                batcher.forget_before(started);
                obs.replicated(&out.summary, 0, Duration::ZERO);
            }
            Err(Error::Refused(why)) => {
                obs.paused(&why);
                let _ = session.close();
                nap(Duration::from_secs(1), shutdown);
                continue;
            }
            Err(e) => {
                let d = backoff.next();
                obs.disconnected(&e.to_string(), d);
                drop(session);
                nap(d, shutdown);
                continue;
            }
        }
        let mut last_full = Instant::now();
        loop {
            if shutdown.load(Ordering::Relaxed) {
                let _ = session.close();
                return Ok(());
            }
            let now = Instant::now();
            let wait = batcher
                .next_deadline()
                .map(|d| d.saturating_duration_since(now))
                .unwrap_or(TICK)
                .min(TICK);
            match watcher.hints.recv_timeout(wait) {
                Ok(h) => {
                    batcher.push(h, Instant::now());
                    while let Ok(h) = watcher.hints.try_recv() {
                        batcher.push(h, Instant::now());
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => continue 'outer,
            }
            if watcher.overflowed.swap(false, Ordering::Relaxed) {
                tracing::warn!("the watcher lost events (queue overflow): re-scanning everything");
                batcher.push(Hint::RescanAll, Instant::now());
            }
            if watcher.limited.load(Ordering::Relaxed)
                && last_full.elapsed() >= opts.fallback_rescan
            {
                batcher.push(Hint::RescanAll, Instant::now());
            }
            if let Some(why) = source_moved(src, identity) {
                obs.paused(&why);
                paused = Some(why);
                let _ = session.close();
                continue 'outer;
            }
            if !verifying && verify_due.is_some_and(|t| Instant::now() >= t) {
                verifying = true;
                let (src, connector, tx) =
                    (src.to_path_buf(), connector.clone(), verified_tx.clone());
                let (excludes, rate) = (opts.sync.excludes.clone(), opts.verify_rate);
                std::thread::spawn(move || {
                    let _ = tx.send(background_verify(&src, &connector, &excludes, rate));
                });
            }
            if let Ok(result) = verified.try_recv() {
                verifying = false;
                verify_due = opts.verify_every.map(|d| Instant::now() + d);
                match result {
                    Ok(report) => {
                        // A path with a change still queued is not a false alarm to report.
                        let report = report.without(|p| batcher.pending(p));
                        let diffs = report.differing();
                        let repaired = if diffs.is_empty() {
                            Ok(0)
                        } else {
                            let scopes: Vec<_> = diffs
                                .iter()
                                .map(|p| (p.clone(), crate::manifest::Scope::Entry))
                                .collect();
                            session.repair(&scopes).map(|_| diffs.len())
                        };
                        match repaired {
                            Ok(n) => obs.verified(&report, n),
                            Err(e) => {
                                obs.verify_failed(&format!("repair failed: {e}"));
                                let d = backoff.next();
                                obs.disconnected(&e.to_string(), d);
                                drop(session);
                                nap(d, shutdown);
                                continue 'outer;
                            }
                        }
                    }
                    Err(e) => obs.verify_failed(&e.to_string()),
                }
            }
            let oldest = batcher.oldest();
            obs.queued(batcher.queued(), oldest.map(|t| t.elapsed()));
            let Some(batch) = batcher.poll(Instant::now()) else {
                continue;
            };
            let began = Instant::now();
            *busy_since.lock().unwrap() = Some(began);
            let result = if batch.full {
                session.sync_all()
            } else {
                session.sync_paths(&batch.renames, &batch.paths)
            };
            *busy_since.lock().unwrap() = None;
            match result {
                Ok(out) => {
                    if batch.full {
                        last_full = began;
                        batcher.forget_before(began);
                    }
                    let lag = oldest
                        .map(|t| t.elapsed())
                        .unwrap_or_else(|| began.elapsed());
                    obs.replicated(&out.summary, batch.len(), lag);
                }
                Err(Error::Refused(why)) => {
                    // Only an emptied source refuses a batch: wait for it to come back.
                    batcher.requeue(batch, Instant::now());
                    obs.paused(&why);
                    paused = Some(why);
                    let _ = session.close();
                    nap(Duration::from_secs(1), shutdown);
                    continue 'outer;
                }
                Err(e) => {
                    batcher.requeue(batch, Instant::now());
                    if shutdown.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    let d = backoff.next();
                    obs.disconnected(&e.to_string(), d);
                    drop(session);
                    nap(d, shutdown);
                    continue 'outer;
                }
            }
        }
    }
}
