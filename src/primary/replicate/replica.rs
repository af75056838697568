//! The driver of one [`ReplicaMachine`]: a thread that carries out its actions (connect,
//! reconcile, send a batch, verify, repair) and reports the results back, plus what the
//! rest of the process needs from it (hints in, status and heartbeats out).

use super::Observer;
use super::batcher::Hint;
use super::consistency::CHECK_BARRIER;
use super::machine::{Action, Failure, Heard, ReplicaMachine};
use super::source::HintSource;
use crate::error::Error;
use crate::model::guard::{Absences, Continuity, Scan, Ticket};
use crate::model::progress::Silent;
use crate::model::status::{ReplicaStatus, VerifyStatus};
use crate::primary::link::Connector;
use crate::primary::sender::{Session, SyncOptions};
use crate::transport::Connection;
use crate::tree::fsroot::Root;
use crate::tree::mounts::Mounts;
use crate::wire::heartbeat::Pulse;
use crate::wire::protocol::Heartbeat;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// How long the driver sleeps at most when told to wait for nothing in particular (so a
/// lost wake-up costs this much, never a hang).
const IDLE_WAKE: Duration = Duration::from_millis(500);

/// Background verify settings.
#[derive(Debug, Clone)]
pub(crate) struct VerifyPlan {
    pub excludes: Vec<String>,
    /// Bytes per second each side may read.
    pub rate: u64,
}

impl crate::primary::sender::Early for Replica {
    fn take(
        &self,
        accept: &dyn Fn(&crate::model::path::RelPath) -> bool,
    ) -> Vec<crate::model::path::RelPath> {
        self.machine.lock().unwrap().early(Instant::now(), accept)
    }
}

/// The connection in use, and since when the action on it has been running (for the
/// shutdown watchdog).
struct Current {
    conn: Arc<dyn Connection>,
    busy_since: Option<Instant>,
}

/// What the replicator shares with every replica.
pub(crate) struct Shared {
    /// Told of every change to a machine (flushes wait on it).
    pub(crate) changed: Arc<super::Changed>,
    /// The source's hints, while one is open.
    pub(crate) source: Arc<Mutex<Option<Arc<dyn HintSource>>>>,
}

/// One standby: its machine, its connector, and the session the driver holds.
pub(crate) struct Replica {
    /// The standby as named on the command line.
    pub name: String,
    src: PathBuf,
    connector: Arc<Connector>,
    sync_opts: SyncOptions,
    verify: VerifyPlan,
    machine: Mutex<ReplicaMachine>,
    /// Set (under `machine`'s lock) when something the driver waits for happened, so a
    /// wake-up that comes between its `poll` and its wait is not lost.
    woken: std::sync::atomic::AtomicBool,
    wake: Condvar,
    /// The source root to read; replaced when the source comes back after a pause.
    root: Mutex<Option<Arc<Root>>>,
    current: Mutex<Option<Current>>,
    /// Why the source refused a batch, for the replicator to pause everything.
    source_refused: Mutex<Option<String>>,
    /// Protocol bytes of the sessions that ended, and the current session's version.
    wire: Mutex<(u64, Option<u16>)>,
    /// The epoch sessions open with (the source tree's).
    sync_epoch: std::sync::atomic::AtomicU64,
    /// Told of every change to the machine (flushes wait on it).
    changed: Arc<super::Changed>,
    /// What reading the source waits on: the current watcher's set-up.
    gate: Mutex<Option<Arc<dyn crate::tree::walk::Gate>>>,
    /// Whether the source root has been watched without a gap since a reconcile the
    /// mass-delete guard let through: what the guard judges of each scan.
    continuity: Mutex<Continuity>,
    /// The filesystems mounted in the source root, followed since it was opened (`None`:
    /// the mount table cannot be read, and every scan is judged as a new source's).
    mounts: Mutex<Option<Mounts>>,
    /// The source's hints, while one is open (consistency checks place barriers in it).
    source: Arc<Mutex<Option<Arc<dyn HintSource>>>>,
}

impl Replica {
    pub(crate) fn new(
        name: String,
        src: PathBuf,
        connector: Arc<Connector>,
        sync_opts: SyncOptions,
        verify: VerifyPlan,
        machine: ReplicaMachine,
        shared: Shared,
    ) -> Replica {
        let Shared { changed, source } = shared;
        Replica {
            name,
            src,
            connector,
            sync_opts,
            verify,
            machine: Mutex::new(machine),
            woken: std::sync::atomic::AtomicBool::new(false),
            wake: Condvar::new(),
            root: Mutex::new(None),
            current: Mutex::new(None),
            source_refused: Mutex::new(None),
            wire: Mutex::new((0, None)),
            sync_epoch: std::sync::atomic::AtomicU64::new(1),
            changed,
            gate: Mutex::new(None),
            continuity: Mutex::new(Continuity::default()),
            mounts: Mutex::new(None),
            source,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut ReplicaMachine) -> T) -> T {
        let mut m = self.machine.lock().unwrap();
        let r = f(&mut m);
        self.woken.store(true, Ordering::Relaxed);
        drop(m);
        self.wake.notify_all();
        self.changed.bump();
        r
    }

    /// What a flush needs to know of this standby at `now`.
    pub(crate) fn progress(&self, now: Instant) -> crate::model::flush::Progress {
        let m = self.machine.lock().unwrap();
        crate::model::flush::Progress {
            standby: self.name.clone(),
            connected: m.is_connected(),
            durable_before: m.acked(now).1,
            consistent_before: m.consistent_before(now),
            lag: m.lag(now),
        }
    }

    /// Changes the watcher saw, all at once.
    pub(crate) fn push(&self, hints: Vec<Hint>, now: Instant) {
        self.with(|m| hints.into_iter().for_each(|h| m.push(h, now)));
    }

    /// Pauses replication (the source is unusable).
    pub(crate) fn pause(&self, why: &str) {
        self.with(|m| m.pause(why.to_string()));
    }

    /// Resumes with the source `root` at `epoch`, watched since `now` (reads of it wait on
    /// `gate`, the watcher setting up); changes since `paused_since` may have been missed.
    pub(crate) fn resume(
        &self,
        root: Arc<Root>,
        gate: Arc<dyn crate::tree::walk::Gate>,
        epoch: u64,
        now: Instant,
        paused_since: Instant,
    ) {
        *self.root.lock().unwrap() = Some(root);
        *self.gate.lock().unwrap() = Some(gate);
        // Another root, or the same after a gap: its deletions are judged again until a
        // reconcile of it gets through.
        self.continuity.lock().unwrap().opened();
        *self.mounts.lock().unwrap() = match Mounts::open(&self.src) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(
                    "cannot read the filesystems mounted in SRC {} ({e}): every deletion is \
                     judged by --max-delete",
                    self.src.display()
                );
                None
            }
        };
        *self.source_refused.lock().unwrap() = None;
        self.sync_epoch.store(epoch, Ordering::Relaxed);
        self.with(|m| {
            m.set_epoch(epoch);
            m.resume(now, paused_since)
        });
    }

    /// The last position the standby acknowledged, and the moment (this node's clock) before
    /// which every change is durable on it, once this process can vouch for one
    /// ([`ReplicaMachine::watermark`]).
    pub(crate) fn acked(
        &self,
        now: Instant,
        wall: SystemTime,
    ) -> (crate::model::epoch::Position, Option<SystemTime>) {
        let m = self.machine.lock().unwrap();
        let before = m.watermark(now);
        (
            m.acked(now).0,
            before.map(|b| wall - now.saturating_duration_since(b)),
        )
    }

    pub(crate) fn stop(&self) {
        self.with(|m| m.stop());
    }

    /// Why the source refused a batch since the last resume (an emptied source).
    pub(crate) fn source_refused(&self) -> Option<String> {
        self.source_refused.lock().unwrap().clone()
    }

    /// Aborts the connection if an action has run on it longer than `grace` (shutdown).
    pub(crate) fn abort_if_busy(&self, grace: Duration) {
        if let Some(Current {
            conn,
            busy_since: Some(since),
        }) = &*self.current.lock().unwrap()
            && since.elapsed() > grace
        {
            conn.abort("primary shutting down");
        }
    }

    /// A snapshot for `status`, metrics and the status line.
    pub(crate) fn status(&self, now: Instant, wall: SystemTime) -> ReplicaStatus {
        let m = self.machine.lock().unwrap();
        let at = |t: Instant| crate::model::clock::rfc3339(wall - now.saturating_duration_since(t));
        let since = m.conn_since();
        let (ended_wire, protocol) = *self.wire.lock().unwrap();
        let live_wire = self
            .current
            .lock()
            .unwrap()
            .as_ref()
            .map_or(0, |c| c.conn.wire_bytes());
        ReplicaStatus {
            standby: self.name.clone(),
            server_id: self.connector.target().server_id().map(|id| id.to_string()),
            state: m.state(),
            connected: m.is_connected(),
            since: at(since),
            since_seconds: now.saturating_duration_since(since).as_secs_f64(),
            last_heartbeat_age_seconds: m
                .last_heard()
                .map(|t| now.saturating_duration_since(t).as_secs_f64()),
            lag_seconds: m.lag(now).as_secs_f64(),
            pending_changes: m.pending() as u64,
            position: m.position(),
            files_replicated: m.files_replicated,
            bytes_replicated: m.bytes_replicated,
            wire_bytes: ended_wire + live_wire,
            reconnects: m.reconnects,
            vanished: m.vanished,
            last_replicated: m.last_replicated.map(at),
            last_error: m.last_error.clone(),
            last_verify: m.last_verify.as_ref().map(|(t, r, n, e)| VerifyStatus {
                at: at(*t),
                at_unix: crate::model::clock::unix_ms(wall - now.saturating_duration_since(*t))
                    as f64
                    / 1000.0,
                identical: r.identical && e.is_none(),
                differences: r.differences(),
                repaired: *n as u64,
                error: e.clone(),
            }),
            standby_space: m.standby_space(),
            standby_full: m.full,
            protocol: m.is_connected().then_some(protocol).flatten(),
            consistent_point_age_seconds: m.consistent_point_age(now).map(|d| d.as_secs_f64()),
        }
    }

    /// Runs the replica until it is stopped. Returns an error only for a problem retrying
    /// cannot fix (a bad DEST).
    pub(crate) fn run(self: &Arc<Self>, obs: &dyn Observer) -> Result<(), Error> {
        let mut session: Option<Session<'static>> = None;
        loop {
            let (action, events) = {
                let mut m = self.machine.lock().unwrap();
                self.woken.store(false, Ordering::Relaxed);
                let a = m.poll(Instant::now());
                (a, std::iter::from_fn(|| m.poll_event()).collect::<Vec<_>>())
            };
            for e in &events {
                obs.event(&self.name, e);
            }
            match action {
                Action::Stop => {
                    self.close(session.take());
                    self.drain(obs);
                    let fenced = self.machine.lock().unwrap().fenced().map(String::from);
                    return match fenced {
                        Some(why) => Err(Error::Fenced(why)),
                        None => Ok(()),
                    };
                }
                Action::Wait(until) => {
                    let m = self.machine.lock().unwrap();
                    let d = until.map_or(IDLE_WAKE, |t| {
                        t.saturating_duration_since(Instant::now()).min(IDLE_WAKE)
                    });
                    let _ = self
                        .wake
                        .wait_timeout_while(m, d, |_| !self.woken.load(Ordering::Relaxed))
                        .unwrap();
                }
                Action::Disconnect => {
                    self.close(session.take());
                    self.with(|m| m.disconnected(Instant::now()));
                }
                Action::Connect => match self.connect() {
                    Ok(s) => {
                        let now = Instant::now();
                        self.wire.lock().unwrap().1 = Some(s.caps.version);
                        let position = s.position;
                        session = Some(s);
                        self.with(|m| {
                            m.connected(now);
                            m.resume_from(position);
                        });
                    }
                    // Retrying cannot help: a bad DEST, two primaries of one epoch.
                    Err(e @ (Error::Usage(_) | Error::SplitBrain(_))) => return Err(e),
                    Err(e) => self.report(Err(e), &mut session),
                },
                Action::Reconcile => {
                    let r = self.reconcile(&mut session, Scan::Full, |s| s.sync_all());
                    self.report(r, &mut session);
                }
                Action::Send(batch) => {
                    let r = if batch.full {
                        self.reconcile(&mut session, Scan::Full, |s| s.sync_all())
                    } else {
                        self.reconcile(&mut session, Scan::Events, |s| {
                            s.sync_paths(&batch.renames, &batch.paths)
                        })
                    };
                    self.report(r, &mut session);
                }
                Action::Repair(scopes) => {
                    // What a verify found missing on the primary is judged as a re-scan's.
                    let (absences, _) = self.absences(Scan::Full);
                    let r = self.busy(&mut session, |s| {
                        s.set_absences(absences);
                        s.repair(&scopes).map(|_| scopes.len())
                    });
                    let now = Instant::now();
                    let failure = r.as_ref().err().map(failure_of);
                    if failure.is_some() {
                        self.close_broken(session.take());
                    }
                    self.with(|m| m.repaired(r.map_err(|e| failure_of(&e)), now));
                }
                Action::StartVerify => self.start_verify(),
                Action::Barrier => self.place_check_barrier(),
                Action::Consistent { seq, at } => {
                    let wall = SystemTime::now() - Instant::now().saturating_duration_since(at);
                    let at_ms = crate::model::clock::unix_ms(wall);
                    let told = match session.as_mut() {
                        Some(s) => s.consistent(seq, at_ms),
                        None => Ok(None),
                    };
                    tracing::debug!("consistency check: batch {seq} told: {told:?}");
                    match told {
                        Ok(Some(kept)) => self.with(|m| m.consistent_held(seq, at, kept)),
                        Ok(None) => self.with(|m| m.check_dropped()),
                        Err(e) => self.report(Err(e), &mut session),
                    }
                }
            }
        }
    }

    /// Places the barrier of a consistency check in the source's hints (numbered apart
    /// from the flushes'); without a source the check is dropped. The machine is told
    /// first: the barrier may come back before `place_barrier` returns.
    fn place_check_barrier(&self) {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = CHECK_BARRIER | NEXT.fetch_add(1, Ordering::Relaxed);
        let Some(source) = self.source.lock().unwrap().clone() else {
            self.with(|m| m.check_dropped());
            return;
        };
        self.with(|m| m.barrier_placed(id, Instant::now()));
        if let Err(e) = source.place_barrier(id) {
            tracing::debug!("cannot place a consistency check's barrier: {e}");
            self.with(|m| m.check_dropped());
        }
    }

    /// Forwards what is left to tell.
    fn drain(&self, obs: &dyn Observer) {
        let events: Vec<_> = {
            let mut m = self.machine.lock().unwrap();
            std::iter::from_fn(|| m.poll_event()).collect()
        };
        for e in &events {
            obs.event(&self.name, e);
        }
    }

    fn connect(self: &Arc<Self>) -> Result<Session<'static>, Error> {
        let root = self
            .root
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| Error::SourceEmpty("no usable source".into()))?;
        let link = self.connector.connect()?;
        *self.current.lock().unwrap() = Some(Current {
            conn: link.conn().clone(),
            busy_since: Some(Instant::now()),
        });
        let pulse: Arc<dyn Pulse> = self.clone();
        let opts = SyncOptions {
            epoch: self.sync_epoch.load(Ordering::Relaxed),
            ..self.sync_opts.clone()
        };
        let mut s = Session::open_with(root, link, &opts, &Silent, pulse);
        if let Ok(s) = &mut s {
            // Changes seen during a long reconcile reach the standby before it ends.
            s.set_early(Some(self.clone()));
        }
        if let Some(c) = &mut *self.current.lock().unwrap() {
            c.busy_since = None;
        }
        if s.is_err() {
            *self.current.lock().unwrap() = None;
        }
        s
    }

    /// Runs `f` on the session, marked busy for the shutdown watchdog.
    fn busy<T>(
        &self,
        session: &mut Option<Session<'static>>,
        f: impl FnOnce(&mut Session<'static>) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let Some(s) = session.as_mut() else {
            return Err(Error::Unreachable("not connected".into()));
        };
        let mark = |v: Option<Instant>| {
            if let Some(c) = &mut *self.current.lock().unwrap() {
                c.busy_since = v;
            }
        };
        mark(Some(Instant::now()));
        s.set_gate(self.gate.lock().unwrap().clone());
        let r = f(s);
        mark(None);
        r
    }

    /// Runs `f`, a reconcile of what `scan` covers, on the session, with the mass-delete
    /// guard told where its absences come from. A reconcile of the whole tree tells the
    /// guard, by its outcome, whether the root is continuous from then on.
    fn reconcile(
        &self,
        session: &mut Option<Session<'static>>,
        scan: Scan,
        f: impl FnOnce(&mut Session<'static>) -> Result<crate::primary::sender::Outcome, Error>,
    ) -> Result<crate::primary::sender::Outcome, Error> {
        let (absences, ticket) = self.absences(scan);
        let r = self.busy(session, |s| {
            s.set_absences(absences);
            f(s)
        });
        if scan == Scan::Full
            && let Ok(out) = &r
        {
            let refused = out.summary.refused.is_some();
            self.continuity.lock().unwrap().reconciled(ticket, refused);
        }
        r
    }

    /// Where the absences of a `scan` begun now come from, and its ticket. A change of the
    /// filesystems mounted in the source (a disk unmounted from inside it: its mount point
    /// is empty now) makes it a new source, as a replaced root does: guarded until a
    /// reconcile of it gets through, which a full re-scan is asked for at once.
    fn absences(&self, scan: Scan) -> (Absences, Ticket) {
        let mut continuity = self.continuity.lock().unwrap();
        let mut mounts = self.mounts.lock().unwrap();
        let mut rescan = false;
        let known = match mounts.as_mut().map(Mounts::changed) {
            Some(Ok(changed)) => {
                if changed {
                    tracing::warn!(
                        "the filesystems mounted in SRC {} changed: its deletions are judged \
                         by --max-delete until a full re-scan of it gets through",
                        self.src.display()
                    );
                    continuity.opened();
                    rescan = true;
                }
                true
            }
            Some(Err(e)) => {
                tracing::warn!(
                    "cannot read the filesystems mounted in SRC {} ({e}): every deletion is \
                     judged by --max-delete",
                    self.src.display()
                );
                *mounts = None;
                false
            }
            None => false,
        };
        let answer = continuity.absences(scan, known);
        drop((continuity, mounts));
        if rescan {
            self.push(vec![Hint::RescanAll], Instant::now());
        }
        answer
    }

    /// Reports a reconcile's or a batch's outcome to the machine.
    fn report(
        &self,
        r: Result<crate::primary::sender::Outcome, Error>,
        session: &mut Option<Session<'static>>,
    ) {
        let now = Instant::now();
        match r {
            Ok(out) if out.summary.no_space > 0 => {
                // Nothing is lost: the changes stay queued until the standby has room.
                let s = &out.summary;
                let why = format!(
                    "the standby {} is full: {} change(s) could not be stored ({})",
                    self.name,
                    s.no_space,
                    s.errors
                        .iter()
                        .find(|e| e.no_space)
                        .map_or("no space left", |e| e.error.as_str())
                );
                self.with(|m| m.failed(Failure::StandbyFull(why), now));
            }
            Ok(out) => self.with(|m| m.done(out.summary, now)),
            Err(e) => {
                let f = failure_of(&e);
                match &f {
                    Failure::Source(why) => {
                        *self.source_refused.lock().unwrap() = Some(why.clone());
                    }
                    Failure::Link(_) | Failure::Fenced(_) => self.close_broken(session.take()),
                    Failure::StandbyFull(_) => {}
                }
                self.with(|m| m.failed(f, now));
            }
        }
    }

    fn close(&self, session: Option<Session<'static>>) {
        if let Some(s) = session {
            let bytes = s.wire_bytes();
            let _ = s.close();
            self.ended(bytes);
        }
    }

    /// Drops a session whose connection failed (its link aborts).
    fn close_broken(&self, session: Option<Session<'static>>) {
        if let Some(s) = session {
            self.ended(s.wire_bytes());
        }
    }

    fn ended(&self, bytes: u64) {
        *self.current.lock().unwrap() = None;
        let mut w = self.wire.lock().unwrap();
        w.0 += bytes;
        w.1 = None;
    }

    /// A full verify on a connection of its own (a read-only session, which never competes
    /// with replication for the standby's lock), reading at most the verify rate.
    fn start_verify(self: &Arc<Self>) {
        let me = self.clone();
        std::thread::spawn(move || {
            let result = (|| {
                let root = Arc::new(crate::tree::operand::open_source(&me.src)?);
                let link = me.connector.connect()?;
                let x = me.sync_opts.xattrs;
                crate::primary::verify::verify(root, link, &me.verify.excludes, me.verify.rate, x)
            })();
            me.with(|m| m.verified(result.map_err(|e| e.to_string()), Instant::now()));
        });
    }
}

/// How a failed action affects the replica.
fn failure_of(e: &Error) -> Failure {
    match e {
        Error::SourceEmpty(why) => Failure::Source(why.clone()),
        Error::Fenced(why) => Failure::Fenced(why.clone()),
        other => Failure::Link(other.to_string()),
    }
}

/// The replica's heartbeat: its position, queue and lag go to the standby; the standby's
/// free space comes back; its silence cuts the connection.
impl Pulse for Replica {
    fn beat(&self, now: Instant) -> Heartbeat {
        let b = self.machine.lock().unwrap().beat(now);
        let wall = SystemTime::now();
        Heartbeat {
            epoch: b.position.epoch,
            seq: b.position.seq,
            sent_at_ms: crate::model::clock::unix_ms(wall),
            oldest_pending_ms: b.lag.map(|l| crate::model::clock::unix_ms(wall - l)),
            pending: b.pending,
            space: None,
        }
    }

    fn silent(&self, now: Instant) -> Option<String> {
        self.machine.lock().unwrap().silent(now)
    }

    fn heard(&self, beat: &Heartbeat, now: Instant) {
        let heard = Heard {
            space: beat.space,
            epoch: beat.epoch,
        };
        self.machine.lock().unwrap().heard(heard, now);
    }
}
