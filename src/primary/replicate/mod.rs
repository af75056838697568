//! `hotsync watch`: reconcile once, then replicate every change within milliseconds, over
//! one long-lived connection per standby, through restarts, bursts, renames and network
//! loss.
//!
//! The [`Watch`] (the replicator) watches the source once and feeds every `Replica`: the
//! watcher's events are hints ([`batcher`]); each replica's batches re-examine the paths
//! they name on both sides, so a lost or odd event costs a re-scan, never a wrong copy.
//! Each replica is a pure state machine (`machine`) run by its own thread: when its
//! standby goes away, changes keep queueing (bounded), the connection is retried with
//! backoff, and a full reconcile runs on return. A source root that disappears, is replaced
//! (an unmounted disk) or empties pauses replication: nothing is ever deleted on the
//! standby because of it.

pub mod batcher;
mod consistency;
pub(crate) mod machine;
pub(crate) mod replica;
pub(crate) mod source;
pub(crate) mod watcher;

use crate::error::Error;
use crate::model::status::Instance;
use crate::ops::alert::{AlertConfig, Alerts};
use crate::primary::link::{Connector, Target};
use crate::primary::sender::SyncOptions;
use crate::primary::{Hold, PrimaryTree};
use crate::standby::{Access, Role};
use crate::tree::fsroot::Root;
pub use machine::Event;
use replica::{Replica, VerifyPlan};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

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
    /// What alerts fire on (and `status` judges by).
    pub alerts: AlertConfig,
    /// How many standbys a flush waits for by default (all when `None`).
    pub quorum: Option<usize>,
    /// Semi-synchronous replication: the longest a flush waits for its quorum before the
    /// watch is degraded (flushes then do not wait until the quorum is back).
    pub sync_timeout: Option<Duration>,
    /// Each standby's name in status, metrics and events, in the order of the targets
    /// (its address when absent).
    pub names: Vec<String>,
    /// What a promotion of a local DEST gives back (a remote standby's `serve` says its
    /// own).
    pub consistency: crate::model::epoch::Consistency,
}

/// Hears what a watch does: for logs, JSON lines, alerts, or a test.
pub trait Observer: Sync {
    /// Something happened to the replication to `standby`.
    fn event(&self, _standby: &str, _event: &Event) {}
}

/// Tells waiters that something changed: a generation under a lock, and a condvar.
#[derive(Debug, Default)]
pub(crate) struct Changed {
    generation: std::sync::Mutex<u64>,
    cv: std::sync::Condvar,
}

impl Changed {
    pub(crate) fn bump(&self) {
        *self.generation.lock().unwrap() += 1;
        self.cv.notify_all();
    }

    pub(crate) fn current(&self) -> u64 {
        *self.generation.lock().unwrap()
    }

    /// Waits until the generation has moved past `seen`, at most `limit`.
    pub(crate) fn wait_past(&self, seen: u64, limit: Duration) {
        let g = self.generation.lock().unwrap();
        let _ = self
            .cv
            .wait_timeout_while(g, limit, |g| *g == seen)
            .unwrap();
    }
}

/// How often the replicator wakes when nothing happens.
const TICK: Duration = Duration::from_millis(250);
/// How long a batch in flight may run on after a shutdown request before it is abandoned.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1200);

/// The source root's identity, to notice it being unmounted or replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SourceId {
    dev: u64,
    ino: u64,
}

/// Opens the source root if it is usable: a directory with something in it.
fn usable_source(src: &Path) -> Result<(Arc<Root>, SourceId), String> {
    let shown = src.display();
    let root = crate::tree::operand::open_source(src).map_err(|e| e.to_string())?;
    let empty = root
        .is_empty()
        .map_err(|e| format!("cannot list SRC {shown}: {e}"))?;
    if empty {
        return Err(format!(
            "SRC {shown} is empty (is a disk not mounted?): replication paused, nothing is deleted on the standby"
        ));
    }
    let st = rustix::fs::fstat(root.fd()).map_err(|e| format!("cannot stat SRC {shown}: {e}"))?;
    Ok((
        Arc::new(root),
        SourceId {
            dev: st.st_dev,
            ino: st.st_ino,
        },
    ))
}

/// Why the source root is no longer the one being watched, if it is not.
fn source_moved(src: &Path, id: SourceId) -> Option<String> {
    match std::fs::metadata(src) {
        Ok(md) if (md.dev(), md.ino()) == (id.dev, id.ino) => None,
        Ok(_) => Some(format!(
            "SRC {} was replaced (unmounted or remounted?)",
            src.display()
        )),
        Err(e) => Some(format!("SRC {} is gone ({e})", src.display())),
    }
}

/// A running watch of one source and its replicas.
pub struct Watch {
    src: PathBuf,
    /// The source tree's state, while a source is open.
    primary: std::sync::Mutex<Option<Arc<PrimaryTree>>>,
    /// How a source root is watched ([`source::Inotify`] unless told otherwise).
    open_source: source::Opener,
    /// The current source's hints, while one is open (flushes place barriers in it).
    source: Arc<std::sync::Mutex<Option<Arc<dyn source::HintSource>>>>,
    /// SRC as an absolute path, for status.
    tree: String,
    opts: WatchOptions,
    replicas: Vec<Arc<Replica>>,
    alerts: Arc<Alerts>,
    started: Instant,
    started_at: SystemTime,
    /// Flushes waiting, and what wakes them (a replica's progress, a marker seen).
    flushes: std::sync::Mutex<crate::model::flush::Book>,
    /// The live databases already named in a warning.
    databases: std::sync::Mutex<crate::model::livedb::Named>,
    changed: Arc<Changed>,
}

impl Watch {
    /// Sets up a watch of `src` towards `targets`: checks the source and every local DEST
    /// (a local DEST is locked for the life of the watch).
    ///
    /// # Errors
    /// [`Error::Usage`] for a bad SRC or DEST.
    pub fn new(src: &Path, targets: Vec<Target>, opts: WatchOptions) -> Result<Watch, Error> {
        crate::tree::fsroot::raise_fd_limit();
        let now = Instant::now();
        let mut sync = opts.sync.clone();
        sync.on_mass_delete = crate::model::guard::MassDelete::SkipDeletes;
        sync.watching = true;
        let mut replicas = Vec::new();
        let changed = Arc::new(Changed::default());
        let source: Arc<std::sync::Mutex<Option<Arc<dyn source::HintSource>>>> = Arc::default();
        for (i, target) in targets.into_iter().enumerate() {
            if let Target::Local(dest) = &target {
                crate::tree::operand::open_source(src)?;
                crate::tree::operand::prepare_local_dest(src, dest, true)?;
            }
            let name = opts
                .names
                .get(i)
                .cloned()
                .unwrap_or_else(|| target.describe());
            let connector = Arc::new(Connector::new(target, Access::Write)?);
            connector.set_consistency(opts.consistency);
            let cfg = machine::Config {
                batcher: opts.batcher,
                verify_every: opts.verify_every,
                ..machine::Config::default()
            };
            replicas.push(Arc::new(Replica::new(
                name,
                src.to_path_buf(),
                connector,
                sync.clone(),
                VerifyPlan {
                    excludes: opts.sync.excludes.clone(),
                    rate: opts.verify_rate,
                },
                machine::ReplicaMachine::new(cfg, now),
                replica::Shared {
                    changed: changed.clone(),
                    source: source.clone(),
                },
            )));
        }
        if let Some(k) = opts.quorum
            && (k == 0 || k > replicas.len())
        {
            return Err(Error::Usage(format!(
                "--quorum {k} cannot be met: the watch has {} standby(s); give 1 to {}",
                replicas.len(),
                replicas.len()
            )));
        }
        let book = crate::model::flush::Book::new(opts.quorum, opts.sync_timeout);
        Ok(Watch {
            src: src.to_path_buf(),
            primary: std::sync::Mutex::new(None),
            open_source: source::Inotify::open,
            source,
            tree: crate::tree::operand::shown_absolute(src),
            alerts: Arc::new(Alerts::new(opts.alerts.clone())),
            opts,
            replicas,
            started: now,
            started_at: SystemTime::now(),
            flushes: std::sync::Mutex::new(book),
            databases: std::sync::Mutex::default(),
            changed,
        })
    }

    /// The watch's alerts (judged by an [`crate::ops::alert::Evaluator`]).
    pub fn alerts(&self) -> Arc<Alerts> {
        self.alerts.clone()
    }
}

impl crate::ops::control::Control for Watch {
    /// A snapshot of this watch and its replicas.
    fn status(&self) -> Instance {
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut i = Instance {
            pid: std::process::id(),
            command: "watch".into(),
            role: Role::Primary,
            tree: self.tree.clone(),
            node_id: None,
            listen: None,
            started_at: crate::model::clock::rfc3339(self.started_at),
            uptime_seconds: now.duration_since(self.started).as_secs_f64(),
            protocol: crate::wire::protocol::VERSION,
            epoch: self
                .primary
                .lock()
                .unwrap()
                .as_ref()
                .map_or(1, |t| t.epoch()),
            health: crate::model::status::Health::default(),
            thresholds: self.alerts.thresholds(),
            replicas: self.replicas.iter().map(|r| r.status(now, wall)).collect(),
            primaries: vec![],
            space: None,
            alerts: self.alerts.statuses(),
            sync: self.opts.sync_timeout.map(|d| {
                let book = self.flushes.lock().unwrap();
                let degraded = book.degraded();
                crate::model::status::SyncStatus {
                    quorum: book.quorum_of(self.replicas.len()),
                    timeout_seconds: d.as_secs_f64(),
                    degraded: degraded.is_some(),
                    degraded_since: degraded.map(|g| {
                        crate::model::clock::rfc3339(wall - now.saturating_duration_since(g.since))
                    }),
                    reason: degraded.map(|g| g.why.clone()),
                }
            }),
            quorum: self.opts.quorum,
            watches: self.source.lock().unwrap().as_ref().map(|s| {
                let st = s.setup();
                crate::model::status::WatchSet {
                    directories: st.watched,
                    complete: st.complete,
                    setup_seconds: st.seconds,
                }
            }),
            consistency: None,
        };
        i.assess();
        i
    }

    /// Places a barrier in the source's hints (it comes after every change reported
    /// before it), then waits until the quorum has everything seen before the barrier.
    fn flush(
        &self,
        quorum: Option<usize>,
        timeout: Duration,
    ) -> crate::error::Result<serde_json::Value> {
        let started = Instant::now();
        // A watch still starting (or paused on its source) gets until the timeout.
        let source = loop {
            let seen = self.changed.current();
            if let Some(s) = self.source.lock().unwrap().clone() {
                break s;
            }
            if started.elapsed() >= timeout {
                return Err(Error::Refused(format!(
                    "the watch of {} has had no usable source for the flush's {:.1} s: nothing \
                     could be flushed",
                    self.tree,
                    timeout.as_secs_f64()
                )));
            }
            self.changed.wait_past(seen, TICK);
        };
        let id = self
            .flushes
            .lock()
            .unwrap()
            .begin(quorum, self.replicas.len(), timeout, started)
            .map_err(Error::Usage)?;
        // Degraded: the answer is now, without a marker.
        if self.flushes.lock().unwrap().degraded().is_some() {
            let now = Instant::now();
            let progress = self.progress(now);
            let mut book = self.flushes.lock().unwrap();
            book.step(&progress, now);
            if let Some(o) = book.take(id) {
                return serde_json::to_value(&o).map_err(|e| Error::Usage(e.to_string()));
            }
        }
        if let Err(e) = source.place_barrier(id) {
            // Without its barrier the flush would only be as good as a full re-scan: say so.
            self.flushes.lock().unwrap().cancel(id);
            return Err(Error::io(format!("cannot flush {}", self.tree), e));
        }
        let was_degraded = self.flushes.lock().unwrap().degraded().is_some();
        let outcome = loop {
            let seen = self.changed.current();
            let now = Instant::now();
            let progress = self.progress(now);
            let mut book = self.flushes.lock().unwrap();
            book.step(&progress, now);
            if let Some(o) = book.take(id) {
                break o;
            }
            let until = book.next_deadline().unwrap_or(now + TICK);
            drop(book);
            self.changed
                .wait_past(seen, until.saturating_duration_since(now).min(TICK));
        };
        source.clear_barrier(id);
        if !was_degraded && let Some(d) = self.flushes.lock().unwrap().degraded() {
            tracing::warn!(
                "semi-synchronous replication degraded: {}; flushes do not wait until the \
                 quorum is back",
                d.why
            );
        }
        serde_json::to_value(&outcome).map_err(|e| Error::Usage(e.to_string()))
    }
}

impl Watch {
    /// Every standby's progress at `now`, as a flush judges it.
    fn progress(&self, now: Instant) -> Vec<crate::model::flush::Progress> {
        self.replicas.iter().map(|r| r.progress(now)).collect()
    }

    /// Watches and replicates until `shutdown` is set. Returns `Ok` on a clean shutdown;
    /// an error only for problems that retrying cannot fix.
    pub fn run(&self, shutdown: &AtomicBool, obs: &dyn Observer) -> Result<(), Error> {
        let fatal = AtomicBool::new(false);
        let finished = AtomicBool::new(false);
        std::thread::scope(|s| {
            let (fatal, finished) = (&fatal, &finished);
            let drivers: Vec<_> = self
                .replicas
                .iter()
                .map(|r| {
                    s.spawn(move || {
                        let result = r.run(obs);
                        if result.is_err() {
                            fatal.store(true, Ordering::Relaxed);
                        }
                        result
                    })
                })
                .collect();
            // Abandons a batch still running well after a shutdown request.
            s.spawn(|| {
                while !finished.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                    if shutdown.load(Ordering::Relaxed) {
                        for r in &self.replicas {
                            r.abort_if_busy(SHUTDOWN_GRACE);
                        }
                    }
                }
            });
            let pumped = self.pump(shutdown, fatal);
            for r in &self.replicas {
                r.stop();
            }
            let mut result = pumped;
            for d in drivers {
                let r = d.join().expect("replica thread panicked");
                if result.is_ok() {
                    result = r;
                }
            }
            finished.store(true, Ordering::Relaxed);
            let tree = self.primary.lock().unwrap().take();
            if let (Err(Error::Fenced(why)), Some(tree)) = (&result, &tree) {
                // Recorded before anything else: this tree must not replicate again.
                tree.fence(why);
            }
            result
        })
    }

    /// The replicator: keeps the source healthy and watched, and feeds every replica, until
    /// `shutdown`, or until a replica has failed for good (`fatal`: a bad DEST).
    fn pump(&self, shutdown: &AtomicBool, fatal: &AtomicBool) -> Result<(), Error> {
        let stop = || shutdown.load(Ordering::Relaxed) || fatal.load(Ordering::Relaxed);
        let mut paused: Option<(String, Instant)> = None;
        let pause = |why: String, paused: &mut Option<(String, Instant)>| {
            if paused.as_ref().map(|p| p.0.as_str()) != Some(why.as_str()) {
                for r in &self.replicas {
                    r.pause(&why);
                }
            }
            let since = paused.as_ref().map_or_else(Instant::now, |p| p.1);
            *paused = Some((why, since));
        };
        let nap = |d: Duration| {
            let end = Instant::now() + d;
            while !stop() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        'outer: loop {
            if stop() {
                return Ok(());
            }
            let (root, id) = match usable_source(&self.src) {
                Ok(x) => x,
                Err(why) => {
                    pause(why, &mut paused);
                    nap(Duration::from_secs(1));
                    continue;
                }
            };
            // The tree's own state, opened anew with each source root (a remounted disk is
            // another tree): its epoch, and where acknowledgements are recorded. Before the
            // watcher starts, so the `.hotsync/` it makes (flush markers go there) is watched.
            *self.primary.lock().unwrap() = None; // its lock first
            let tree = match PrimaryTree::open(&self.src, Hold::Replicate, self.opts.sync.force) {
                Ok(t) => Arc::new(t),
                Err(e) => return Err(e),
            };
            // Watch before reconciling, so nothing that changes meanwhile is missed.
            let source = match (self.open_source)(&self.src) {
                Ok(s) => s,
                Err(e) => {
                    drop(tree);
                    pause(e.to_string(), &mut paused);
                    nap(Duration::from_secs(1));
                    continue;
                }
            };
            *self.primary.lock().unwrap() = Some(tree.clone());
            *self.source.lock().unwrap() = Some(source.clone());
            self.changed.bump();
            let now = Instant::now();
            let since = paused.take().map_or(now, |p| p.1);
            for r in &self.replicas {
                r.resume(root.clone(), source.gate(), tree.epoch(), now, since);
            }
            let mut last_rescan = Instant::now();
            loop {
                if stop() {
                    return Ok(());
                }
                match source.recv(TICK) {
                    // Everything that came together goes in together: a rename's
                    // MovedFrom must not leave as a delete before its Renamed arrives.
                    Ok(hints) if !hints.is_empty() => self.take_hints(hints),
                    Ok(_) => {}
                    Err(source::Stopped) => {
                        pause("the watcher stopped".into(), &mut paused);
                        continue 'outer;
                    }
                }
                let now = Instant::now();
                if self.flushes.lock().unwrap().degraded().is_some() {
                    let progress = self.progress(now);
                    if self.flushes.lock().unwrap().observe(&progress) {
                        tracing::info!("semi-synchronous replication is back: the quorum is met");
                    }
                }
                if self.flushes.lock().unwrap().marker_overdue(now) {
                    tracing::debug!("a flush marker was not reported: re-scanning everything");
                    self.push(vec![batcher::Hint::RescanAll], now);
                    self.flushes
                        .lock()
                        .unwrap()
                        .markers_lost(now, Instant::now());
                    self.changed.bump();
                }
                if source.take_lost() {
                    tracing::warn!(
                        "the watcher lost events (queue overflow): re-scanning everything"
                    );
                    self.push(vec![batcher::Hint::RescanAll], Instant::now());
                }
                if source.partial() && last_rescan.elapsed() >= self.opts.fallback_rescan {
                    last_rescan = Instant::now();
                    self.push(vec![batcher::Hint::RescanAll], last_rescan);
                }
                if let Some(why) = source_moved(&self.src, id) {
                    pause(why, &mut paused);
                    continue 'outer;
                }
                self.record_acks(&tree);
                if let Some(why) = self.replicas.iter().find_map(|r| r.source_refused()) {
                    // Only an emptied source refuses a batch: wait for it to come back.
                    pause(why, &mut paused);
                    nap(Duration::from_secs(1));
                    continue 'outer;
                }
            }
        }
    }

    /// Feeds `hints` to every replica; a barrier among them is then noted in the flush
    /// book (after the push: everything reported before it is in).
    fn take_hints(&self, hints: Vec<batcher::Hint>) {
        self.name_live_databases(&hints);
        let barriers: Vec<u64> = hints
            .iter()
            .filter_map(|h| match h {
                batcher::Hint::Barrier { id } => Some(*id),
                _ => None,
            })
            .collect();
        self.push(hints, Instant::now());
        // A consistency check's barrier has done its work once every replica has it.
        let (checks, barriers): (Vec<u64>, Vec<u64>) = barriers
            .into_iter()
            .partition(|id| id & consistency::CHECK_BARRIER != 0);
        if !checks.is_empty()
            && let Some(source) = self.source.lock().unwrap().clone()
        {
            for id in checks {
                source.clear_barrier(id);
            }
        }
        if !barriers.is_empty() {
            let at = Instant::now();
            let mut book = self.flushes.lock().unwrap();
            for id in barriers {
                book.barrier(id, at);
            }
            drop(book);
            self.changed.bump();
        }
    }

    /// Warns, once for each, of a database whose engine is writing it in the tree (told by
    /// the names of the files it writes all the time, and confirmed by its other file).
    fn name_live_databases(&self, hints: &[batcher::Hint]) {
        use std::os::unix::ffi::OsStrExt;
        for h in hints {
            let Some(db) = h
                .changed_in_place()
                .and_then(crate::model::livedb::classify)
            else {
                continue;
            };
            // A database's log is written all the time: once named, no more looking.
            if self.databases.lock().unwrap().has(&db) {
                continue;
            }
            let confirmed = db.confirm.as_ref().is_none_or(|c| {
                let p = self.src.join(std::ffi::OsStr::from_bytes(c.as_bytes()));
                std::fs::symlink_metadata(p).is_ok()
            });
            if confirmed && self.databases.lock().unwrap().first(&db) {
                let shown = self.src.join(std::ffi::OsStr::from_bytes(db.at.as_bytes()));
                tracing::warn!(
                    "{}",
                    crate::model::livedb::warning(&db, &shown.display().to_string())
                );
            }
        }
    }

    /// Writes down (at most once a second) what every standby has acknowledged: the least
    /// advanced one's position, and the moment before which all changes are durable on all.
    fn record_acks(&self, tree: &PrimaryTree) {
        let (now, wall) = (Instant::now(), SystemTime::now());
        let acked: Vec<_> = self.replicas.iter().map(|r| r.acked(now, wall)).collect();
        let Some(pos) = acked.iter().map(|a| a.0).min() else {
            return;
        };
        // Vouched for only when every standby vouches: the least of them.
        let before = acked
            .iter()
            .map(|a| a.1)
            .collect::<Option<Vec<_>>>()
            .and_then(|b| b.into_iter().min());
        tree.acknowledged(pos, before, now);
    }

    fn push(&self, hints: Vec<batcher::Hint>, now: Instant) {
        if let Some((last, rest)) = self.replicas.split_last() {
            for r in rest {
                r.push(hints.clone(), now);
            }
            last.push(hints, now);
        }
    }
}
