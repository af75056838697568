//! One standby as its primary sees it, as a state machine: the connection and its backoff,
//! the queue of changes (a [`Batcher`]), the position and the lag, the verify schedule and
//! the standby's liveness. It does no I/O and reads no clock: like quinn-proto's
//! `Connection`, it takes time and results as arguments and answers with what to do next
//! ([`ReplicaMachine::poll`]) and what happened ([`ReplicaMachine::poll_event`]), so every
//! rule is unit-tested by stepping a clock. The driver in `replica.rs` does the I/O.

use super::batcher::{self, Batch, Batcher, Hint};
use super::consistency::{CHECK_BARRIER, Carried, Judge, Step};

/// How old a consistent point gets before everything queued goes at once (at most this
/// often) to give the tree a new one.
const SWEEP_AFTER: Duration = Duration::from_secs(1);
use crate::model::compare::Report;
use crate::model::epoch::Position;
use crate::model::manifest::Scope;
use crate::model::path::RelPath;
use crate::model::status::{ReplicaState, Space};
use crate::model::summary::Summary;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The rules one replica follows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Config {
    pub batcher: batcher::Config,
    /// Verify the whole standby this often (in the background).
    pub verify_every: Option<Duration>,
    /// A standby silent this long is gone.
    pub idle: Duration,
    /// Reconnection delays double from `backoff_min` to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            batcher: batcher::Config::default(),
            verify_every: None,
            idle: crate::model::liveness::IDLE,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
        }
    }
}

/// What the driver should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Connect and open a session; report [`ReplicaMachine::connected`] or
    /// [`ReplicaMachine::failed`].
    Connect,
    /// Reconcile the whole tree; report [`ReplicaMachine::done`] or `failed`.
    Reconcile,
    /// Replicate one batch; report `done` or `failed`.
    Send(Batch),
    /// Reconcile these paths by content (what a verify found); report `repaired`.
    Repair(Vec<(RelPath, Scope)>),
    /// Start a background verify; report [`ReplicaMachine::verified`] when it ends.
    StartVerify,
    /// Close the session (paused or stopping); report [`ReplicaMachine::disconnected`].
    Disconnect,
    /// Nothing to do until then (`None`: until something happens).
    Wait(Option<Instant>),
    /// Place a consistency check's barrier in the source's hints; report
    /// [`ReplicaMachine::barrier_placed`] (or `failed`).
    Barrier,
    /// Tell the standby batch `seq` left it at a consistent point, the tree as it stood
    /// at `at`; report [`ReplicaMachine::consistent_held`] or `failed`.
    Consistent { seq: u64, at: Instant },
    /// Stopped: the driver ends.
    Stop,
}

/// Why an action failed, as far as the replica's next step is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The connection or the standby failed: reconnect with backoff.
    Link(String),
    /// The source is not fit to mirror (it emptied: an unmounted disk?): pause until it is.
    Source(String),
    /// The standby could not store the changes (its disk is full): keep the connection,
    /// keep the changes queued, try again with backoff.
    StandbyFull(String),
    /// A newer epoch took over: stop at once and for good.
    Fenced(String),
}

/// What happened, for logs, JSON events and alerts.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Connected,
    Disconnected {
        why: String,
        retry_in: Duration,
    },
    /// A batch (or a full reconcile, with `changes` 0) is durable on the standby.
    Replicated {
        summary: Summary,
        changes: usize,
        lag: Duration,
    },
    /// The standby could not store a batch; it stays queued.
    Full {
        why: String,
        retry_in: Duration,
    },
    Paused {
        why: String,
    },
    Verified {
        report: Report,
        repaired: usize,
    },
    VerifyFailed {
        why: String,
    },
    /// A newer epoch took over: this primary stopped writing.
    Fenced {
        why: String,
    },
}

/// What the primary tells its standby in a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Beat {
    /// The last batch durable on the standby.
    pub position: Position,
    /// Changes seen and not yet durable there.
    pub pending: u64,
    /// How long the oldest of them has waited (`None`: caught up).
    pub lag: Option<Duration>,
}

/// What a standby's heartbeat says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Heard {
    pub space: Option<Space>,
    /// The standby's epoch: newer than ours means we have been fenced.
    pub epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Conn {
    /// Not connected; connect at `retry_at`.
    Down { retry_at: Instant },
    /// Connected since `since`; `reconciled` once a full reconcile has made it current.
    Up { reconciled: bool },
}

/// A batch being carried out.
#[derive(Debug, Clone)]
struct InFlight {
    batch: Option<Batch>,
    /// When the oldest change it carries was seen.
    oldest: Option<Instant>,
    started: Instant,
    seq: u64,
}

/// Doubling delays between attempts.
#[derive(Debug, Clone)]
struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    fn take(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
    fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Paths that failed (the standby read-only for a while, a file unreadable) are tried again
/// after at least this, and at most this.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// One standby's replication, decisions only.
#[derive(Debug)]
pub(crate) struct ReplicaMachine {
    cfg: Config,
    conn: Conn,
    /// When `conn` last changed between up and down.
    conn_since: Instant,
    batcher: Batcher,
    backoff: Backoff,
    /// Paths that failed, and since when they have been failing: each is tried again
    /// later, less often the longer it has failed.
    failing: std::collections::HashMap<RelPath, Instant>,
    in_flight: Option<InFlight>,
    /// The standby's content is unknown since then (start, or events lost while paused),
    /// until a full reconcile that began after it succeeds.
    unsynced_since: Option<Instant>,
    /// A full reconcile of this process has been acknowledged: only from then on can it
    /// vouch for what is durable on the standby ([`ReplicaMachine::watermark`]). Before,
    /// what the standby holds is only what an earlier run recorded.
    vouched: bool,
    /// Held back from sending until then (the standby's disk was full).
    hold_until: Option<Instant>,
    /// The standby's disk was full at the last attempt.
    pub full: bool,
    paused: Option<String>,
    /// False until the replicator hands over a usable source ([`ReplicaMachine::resume`]).
    source_ready: bool,
    stopping: bool,
    /// Why a newer epoch took over, once one did: nothing is written any more.
    fenced: Option<String>,
    /// Position of the last batch durable on the standby, and the last one numbered.
    epoch: u64,
    durable: u64,
    seq: u64,
    verify_due: Option<Instant>,
    verifying: bool,
    /// A verify's findings waiting for their repair.
    to_repair: Option<(Report, Vec<RelPath>)>,
    last_heard: Option<Instant>,
    standby_space: Option<Space>,
    /// Why the connection is being cut, when this side decided it (silence): it explains
    /// the broken stream that follows.
    cut: Option<String>,
    ever_connected: bool,
    events: VecDeque<Event>,
    /// Whether the batch in flight leaves the standby at a consistent point.
    judge: Judge,
    /// The standby goes back to its last consistent point at a failover (it said so with
    /// its last point): then a flush needs a point.
    points_kept: bool,
    /// When this replica began: before the standby holds a point, nothing is in one.
    born: Instant,
    /// When everything queued last went at once for a consistent point.
    last_sweep: Option<Instant>,
    // Counters for the status.
    pub reconnects: u64,
    pub files_replicated: u64,
    pub bytes_replicated: u64,
    pub vanished: u64,
    pub last_replicated: Option<Instant>,
    pub last_error: Option<String>,
    pub last_verify: Option<(Instant, Report, usize, Option<String>)>,
}

impl ReplicaMachine {
    /// A replica that starts now, with nothing known about the standby.
    pub(crate) fn new(cfg: Config, now: Instant) -> ReplicaMachine {
        ReplicaMachine {
            cfg,
            conn: Conn::Down { retry_at: now },
            conn_since: now,
            batcher: Batcher::new(cfg.batcher),
            backoff: Backoff {
                next: cfg.backoff_min,
                min: cfg.backoff_min,
                max: cfg.backoff_max,
            },
            failing: std::collections::HashMap::new(),
            in_flight: None,
            unsynced_since: Some(now),
            vouched: false,
            hold_until: None,
            full: false,
            paused: None,
            source_ready: false,
            stopping: false,
            fenced: None,
            epoch: 1,
            durable: 0,
            seq: 0,
            verify_due: cfg.verify_every.map(|d| now + d),
            verifying: false,
            to_repair: None,
            last_heard: None,
            standby_space: None,
            cut: None,
            ever_connected: false,
            events: VecDeque::new(),
            reconnects: 0,
            files_replicated: 0,
            bytes_replicated: 0,
            vanished: 0,
            last_replicated: None,
            last_error: None,
            last_verify: None,
            judge: Judge::default(),
            points_kept: false,
            born: now,
            last_sweep: None,
        }
    }

    /// A change the watcher saw.
    pub(crate) fn push(&mut self, hint: Hint, now: Instant) {
        match hint {
            // A consistency check's barrier is no change, and no flush to hurry.
            Hint::Barrier { id } if id & CHECK_BARRIER != 0 => self.judge.barrier(id, now),
            Hint::Barrier { .. } => self.batcher.push(hint, now),
            // The primary's own state file changes as it records acknowledgements: no
            // change of the mirrored tree.
            _ if hint.is_reserved() => self.batcher.push(hint, now),
            _ => {
                self.judge.hint(&hint);
                self.batcher.push(hint, now);
            }
        }
    }

    /// The next event, if any.
    pub(crate) fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// What to do next.
    pub(crate) fn poll(&mut self, now: Instant) -> Action {
        // The driver is single-threaded: it asks only once the last action has reported.
        debug_assert!(
            self.in_flight.is_none(),
            "poll while an action is in flight"
        );
        let up = matches!(self.conn, Conn::Up { .. });
        let stopping = self.stopping || self.fenced.is_some();
        if stopping || self.paused.is_some() || !self.source_ready {
            return match (up, stopping) {
                (true, _) => Action::Disconnect,
                (false, true) => Action::Stop,
                (false, false) => Action::Wait(None),
            };
        }
        if let Some(t) = self.hold_until {
            if up && now < t {
                return Action::Wait(Some(t));
            }
            self.hold_until = None;
        }
        match self.conn {
            Conn::Down { retry_at } if now >= retry_at => Action::Connect,
            Conn::Down { retry_at } => Action::Wait(Some(retry_at)),
            Conn::Up { reconciled: false } => {
                let oldest = [self.batcher.oldest(), self.unsynced_since]
                    .into_iter()
                    .flatten()
                    .min();
                self.begin(None, oldest, now);
                Action::Reconcile
            }
            Conn::Up { reconciled: true } => {
                // A batch judged consistent is told before the next one begins: the
                // standby's undo log starts its next window from exactly that batch.
                match self.judge.poll(now) {
                    Step::Barrier => return Action::Barrier,
                    Step::Wait(t) => return Action::Wait(Some(t)),
                    Step::Hold { seq, at } => return Action::Consistent { seq, at },
                    Step::Nothing => {}
                }
                if let Some((report, paths)) = &self.to_repair {
                    // A capped report does not name every difference: repair it all.
                    let scopes = if report.capped {
                        vec![(RelPath::root(), Scope::Tree)]
                    } else {
                        paths.iter().map(|p| (p.clone(), Scope::Entry)).collect()
                    };
                    return Action::Repair(scopes);
                }
                if !self.verifying && self.verify_due.is_some_and(|t| now >= t) {
                    self.verifying = true;
                    return Action::StartVerify;
                }
                // A batch leaves a consistent point only if nothing was left queued at its
                // close; files still being written wait for quiet, so under a steady
                // writer something always is. Once the point is old, everything queued
                // goes at once now and then, to give the tree a chance of a new one.
                if self.judge.age(now).is_some_and(|a| a >= SWEEP_AFTER)
                    && self.last_sweep.is_none_or(|t| now >= t + SWEEP_AFTER)
                    && self.batcher.queued() > 0
                {
                    self.batcher.sweep_but(now, true);
                    self.last_sweep = Some(now);
                }
                match self.batcher.poll(now) {
                    Some(batch) => {
                        let oldest = batch.oldest;
                        self.begin(Some(batch.clone()), oldest, now);
                        Action::Send(batch)
                    }
                    None => {
                        let verify = (!self.verifying).then_some(self.verify_due).flatten();
                        Action::Wait(self.earliest([self.batcher.next_deadline(), verify]))
                    }
                }
            }
        }
    }

    fn earliest<const N: usize>(&self, ts: [Option<Instant>; N]) -> Option<Instant> {
        ts.into_iter().flatten().min()
    }

    fn begin(&mut self, batch: Option<Batch>, oldest: Option<Instant>, now: Instant) {
        self.seq += 1;
        // A full pass reads everything; a batch is whole only if nothing waits behind it.
        let clean = batch
            .as_ref()
            .is_none_or(|b| b.full || self.batcher.queued() == 0);
        let carried = match &batch {
            Some(b) if !b.full => Carried::of(
                b.paths.iter().map(|(p, s)| (p, *s)),
                b.renames.iter().flat_map(|(f, t)| [f, t]),
            ),
            _ => Carried::everything(),
        };
        self.judge.closed(self.seq, clean, now, carried);
        self.in_flight = Some(InFlight {
            batch,
            oldest,
            started: now,
            seq: self.seq,
        });
    }

    /// The check's barrier `id` is being placed in the source's hints (told before, since
    /// it may come back at once).
    pub(crate) fn barrier_placed(&mut self, id: u64, now: Instant) {
        self.judge.placed(id, now);
    }

    /// The check could not be completed (no barrier could be placed, or the standby has
    /// no consistent points): the next batch goes on.
    pub(crate) fn check_dropped(&mut self) {
        self.judge.failed();
    }

    /// The standby holds the consistent point of batch `seq`, as the tree stood at `at`;
    /// `kept`: it goes back to its last point at a failover.
    pub(crate) fn consistent_held(&mut self, seq: u64, at: Instant, kept: bool) {
        self.judge.held(seq, at);
        self.points_kept = kept;
    }

    /// Where the standby goes back to its last consistent point at a failover: the moment
    /// before which every change is in that point (`born` before it holds one). `None`
    /// where it keeps the latest of every file.
    pub(crate) fn consistent_before(&self, now: Instant) -> Option<Instant> {
        self.points_kept
            .then(|| self.judge.stands_before(now).unwrap_or(self.born))
    }

    /// How long ago the tree stood as the standby's last consistent point does (zero
    /// while it still does); `None` before the standby holds one.
    pub(crate) fn consistent_point_age(&self, now: Instant) -> Option<Duration> {
        self.judge.age(now)
    }

    /// The connection and session are up.
    pub(crate) fn connected(&mut self, now: Instant) {
        if self.ever_connected {
            self.reconnects += 1;
        }
        self.ever_connected = true;
        self.conn = Conn::Up { reconciled: false };
        self.conn_since = now;
        self.last_heard = Some(now);
        self.cut = None;
        self.events.push_back(Event::Connected);
    }

    /// The standby's last durable position, as it told us when the session opened: the
    /// sequence goes on from there.
    pub(crate) fn resume_from(&mut self, pos: Position) {
        if pos.epoch == self.epoch && pos.seq > self.seq {
            self.seq = pos.seq;
            self.durable = pos.seq;
        }
    }

    /// Paths the reconcile or batch in flight may copy early, of those `accept` takes
    /// ([`Batcher::early`]); nothing while paused or stopping.
    pub(crate) fn early(
        &mut self,
        now: Instant,
        accept: &dyn Fn(&RelPath) -> bool,
    ) -> Vec<RelPath> {
        if self.in_flight.is_none() || self.paused.is_some() || self.stopping {
            return Vec::new();
        }
        self.batcher.early(now, accept)
    }

    /// The last action succeeded: a batch or a reconcile is durable on the standby.
    pub(crate) fn done(&mut self, summary: Summary, now: Instant) {
        let Some(f) = self.in_flight.take() else {
            return;
        };
        self.durable = f.seq;
        self.full = false;
        self.judge.done(
            f.seq,
            summary.errors.is_empty() && summary.vanished == 0 && summary.torn == 0,
        );
        for (p, cost) in &summary.hashed {
            self.batcher.pace(p.clone(), *cost, now);
        }
        // What failed is not dropped: it is tried again later, by itself, until it works.
        let errored: std::collections::HashSet<&RelPath> =
            summary.errors.iter().map(|e| &e.rel).collect();
        match f.batch.as_ref().filter(|b| !b.full) {
            Some(b) => {
                for (p, _) in &b.paths {
                    if !errored.contains(p) {
                        self.failing.remove(p);
                    }
                }
            }
            None => self.failing.retain(|p, _| errored.contains(p)),
        }
        // Not on the standby yet, whatever the reason (unreadable, changing while read,
        // refused there): the lag runs on from the change that made it due.
        let first = f.oldest.unwrap_or(f.started);
        for p in errored {
            let since = *self.failing.entry(p.clone()).or_insert(first);
            // A quarter of how long it has failed: a read-only minute costs a few retries,
            // a path broken for hours one a minute.
            let wait = (now.saturating_duration_since(since) / 4).clamp(RETRY_MIN, RETRY_MAX);
            self.batcher
                .retry(p.clone(), now + wait, since.min(first), now);
        }
        self.files_replicated += summary.files_transferred;
        self.bytes_replicated += summary.bytes_literal + summary.bytes_matched;
        self.vanished += summary.vanished;
        self.last_replicated = Some(now);
        let full = f.batch.as_ref().is_none_or(|b| b.full);
        let changes = f.batch.as_ref().map_or(0, |b| b.len());
        if full {
            // Everything seen before it started is on the standby now.
            self.batcher.forget_before(f.started);
            if self.unsynced_since.is_some_and(|t| t <= f.started) {
                self.unsynced_since = None;
                self.vouched = true;
            }
        }
        if f.batch.is_none() {
            self.backoff.reset();
            self.last_error = None;
        }
        // Current now, unless changes may have been missed after it began (the watcher was
        // restarted meanwhile): then another full reconcile is owed.
        if f.batch.is_none() || self.unsynced_since.is_some() {
            self.conn = Conn::Up {
                reconciled: self.unsynced_since.is_none(),
            };
        }
        let lag = if f.batch.is_none() {
            Duration::ZERO
        } else {
            now.saturating_duration_since(f.oldest.unwrap_or(f.started))
        };
        self.events.push_back(Event::Replicated {
            summary,
            changes,
            lag,
        });
    }

    /// The last action (connect, reconcile, batch) failed. A batch goes back in the queue,
    /// still dated from its oldest change.
    pub(crate) fn failed(&mut self, failure: Failure, now: Instant) {
        self.judge.failed();
        if let Some(f) = self.in_flight.take()
            && let Some(b) = f.batch
        {
            self.batcher.requeue(b, now);
        }
        if self.fenced.is_some() {
            // Whatever broke, it broke because the standby fenced us.
            self.conn = Conn::Down { retry_at: now };
            return;
        }
        match failure {
            Failure::Fenced(why) => {
                self.fence(why);
                self.conn = Conn::Down { retry_at: now };
            }
            Failure::Link(why) => {
                let why = self.cut.take().unwrap_or(why);
                self.down(why, now);
            }
            Failure::Source(why) => self.pause(why),
            Failure::StandbyFull(why) => {
                let d = self.backoff.take();
                self.hold_until = Some(now + d);
                self.full = true;
                self.last_error = Some(why.clone());
                // A full reconcile that failed is still owed.
                self.events.push_back(Event::Full { why, retry_in: d });
            }
        }
    }

    fn down(&mut self, why: String, now: Instant) {
        let d = self.backoff.take();
        if matches!(self.conn, Conn::Up { .. }) {
            self.conn_since = now;
        }
        self.conn = Conn::Down { retry_at: now + d };
        self.last_heard = None;
        self.hold_until = None;
        self.last_error = Some(why.clone());
        self.events
            .push_back(Event::Disconnected { why, retry_in: d });
    }

    /// The session was closed as asked ([`Action::Disconnect`]).
    pub(crate) fn disconnected(&mut self, now: Instant) {
        if matches!(self.conn, Conn::Up { .. }) {
            self.conn_since = now;
        }
        self.conn = Conn::Down { retry_at: now };
        self.last_heard = None;
        self.judge.failed();
    }

    /// Stops replicating for a reason someone must look at (the source is unusable); the
    /// session is closed. Nothing is deleted on the standby meanwhile.
    pub(crate) fn pause(&mut self, why: String) {
        if self.paused.as_deref() != Some(why.as_str()) {
            self.events.push_back(Event::Paused { why: why.clone() });
        }
        self.last_error = Some(why.clone());
        self.paused = Some(why);
    }

    /// The source is usable again (a new watcher runs since `now`): reconnect, and
    /// reconcile everything, since changes made while paused may not have been seen.
    pub(crate) fn resume(&mut self, now: Instant, paused_since: Instant) {
        self.source_ready = true;
        if self.paused.take().is_some() || matches!(self.conn, Conn::Down { .. }) {
            self.unsynced_since = Some(
                self.unsynced_since
                    .map_or(paused_since, |t| t.min(paused_since)),
            );
        }
        if let Conn::Down { retry_at } = &mut self.conn {
            *retry_at = (*retry_at).min(now);
        } else {
            self.conn = Conn::Up { reconciled: false };
        }
        self.backoff.reset();
    }

    fn fence(&mut self, why: String) {
        if self.fenced.is_none() {
            self.last_error = Some(why.clone());
            self.events.push_back(Event::Fenced { why: why.clone() });
            self.fenced = Some(why);
        }
    }

    /// Why a newer epoch took over, if one did.
    pub(crate) fn fenced(&self) -> Option<&str> {
        self.fenced.as_deref()
    }

    /// The epoch this primary writes in (from its tree's state).
    pub(crate) fn set_epoch(&mut self, epoch: u64) {
        if epoch != self.epoch {
            self.epoch = epoch;
            self.seq = 0;
            self.durable = 0;
        }
    }

    /// The last durable position, and the moment before which every change seen is durable
    /// on the standby (what the primary's tree records for a later `rejoin`).
    pub(crate) fn acked(&self, now: Instant) -> (Position, Instant) {
        (self.position(), self.oldest_pending().unwrap_or(now))
    }

    /// The moment before which every change in the tree is durable on the standby, as
    /// this process can vouch for it: `None` until its first full reconcile has been
    /// acknowledged, since changes made before it started (while no watch ran, or that
    /// its reconcile had not yet carried) are durable only once that reconcile is. This is
    /// what the tree records for `rejoin`, which keeps aside everything changed after it.
    pub(crate) fn watermark(&self, now: Instant) -> Option<Instant> {
        self.vouched.then(|| self.acked(now).1)
    }

    #[cfg(test)]
    /// Whether replication is paused, and why.
    pub(crate) fn paused(&self) -> Option<&str> {
        self.paused.as_deref()
    }

    /// Ends the replica: the session is closed, then [`Action::Stop`].
    pub(crate) fn stop(&mut self) {
        self.stopping = true;
    }

    /// A repair asked for by [`Action::Repair`] ended.
    pub(crate) fn repaired(&mut self, result: Result<usize, Failure>, now: Instant) {
        let Some((report, _)) = self.to_repair.take() else {
            return;
        };
        match result {
            Ok(n) => {
                self.last_verify = Some((now, report.clone(), n, None));
                self.events.push_back(Event::Verified {
                    report,
                    repaired: n,
                });
            }
            Err(f) => {
                let why = match &f {
                    Failure::Link(w)
                    | Failure::Source(w)
                    | Failure::StandbyFull(w)
                    | Failure::Fenced(w) => w.clone(),
                };
                self.last_verify = Some((now, report, 0, Some(why.clone())));
                self.events.push_back(Event::VerifyFailed {
                    why: format!("repair failed: {why}"),
                });
                self.failed(f, now);
            }
        }
    }

    /// A background verify ended. Paths with a change still queued are left out of its
    /// report (they are not false alarms to report: they are on their way); the rest are
    /// repaired.
    pub(crate) fn verified(&mut self, result: Result<Report, String>, now: Instant) {
        self.verifying = false;
        self.verify_due = self.cfg.verify_every.map(|d| now + d);
        match result {
            Ok(report) => {
                let report = report.without(|p| self.batcher.pending(p));
                let diffs = report.differing();
                if diffs.is_empty() {
                    self.last_verify = Some((now, report.clone(), 0, None));
                    self.events.push_back(Event::Verified {
                        report,
                        repaired: 0,
                    });
                } else {
                    self.to_repair = Some((report, diffs));
                }
            }
            Err(why) => {
                self.events
                    .push_back(Event::VerifyFailed { why: why.clone() });
                if let Some((at, r, n, _)) = self.last_verify.take() {
                    self.last_verify = Some((at, r, n, Some(why)));
                }
            }
        }
    }

    /// A heartbeat arrived from the standby.
    pub(crate) fn heard(&mut self, heard: Heard, now: Instant) {
        if heard.epoch > self.epoch {
            self.fence(format!(
                "the standby is at epoch {}, newer than this primary's epoch {}: it was promoted",
                heard.epoch, self.epoch
            ));
        }
        if matches!(self.conn, Conn::Up { .. }) {
            self.last_heard = Some(now);
            if heard.space.is_some() {
                self.standby_space = heard.space;
            }
        }
    }

    /// Whether the standby has been silent longer than `idle` (then the connection is to be
    /// cut, for the reason returned, which also explains the failure that follows).
    pub(crate) fn silent(&mut self, now: Instant) -> Option<String> {
        if let Some(f) = &self.fenced {
            return Some(f.clone());
        }
        let why =
            crate::model::liveness::silence(self.last_heard?, now, self.cfg.idle, "the standby")?;
        self.cut = Some(why.clone());
        self.last_heard = None;
        Some(why)
    }

    /// This side's heartbeat.
    pub(crate) fn beat(&self, now: Instant) -> Beat {
        Beat {
            position: self.position(),
            pending: self.pending() as u64,
            lag: self
                .oldest_pending()
                .map(|t| now.saturating_duration_since(t)),
        }
    }

    /// The last batch durable on the standby.
    pub(crate) fn position(&self) -> Position {
        Position {
            epoch: self.epoch,
            seq: self.durable,
        }
    }

    /// When the oldest change not yet durable on the standby was seen.
    fn oldest_pending(&self) -> Option<Instant> {
        let in_flight = self.in_flight.as_ref().and_then(|f| f.oldest);
        [self.batcher.oldest(), in_flight, self.unsynced_since]
            .into_iter()
            .flatten()
            .min()
    }

    /// Replication lag: how old the oldest change not yet durable on the standby is (what
    /// a failover at `now` would lose); zero when caught up.
    pub(crate) fn lag(&self, now: Instant) -> Duration {
        self.oldest_pending()
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
    }

    /// Changes seen and not yet durable on the standby.
    pub(crate) fn pending(&self) -> usize {
        let in_flight = self
            .in_flight
            .as_ref()
            .and_then(|f| f.batch.as_ref())
            .map_or(0, |b| b.len());
        self.batcher.queued() + in_flight
    }

    pub(crate) fn state(&self) -> ReplicaState {
        if self.stopping || self.fenced.is_some() {
            return ReplicaState::Stopped;
        }
        if self.paused.is_some() {
            return ReplicaState::Paused;
        }
        match self.conn {
            Conn::Down { .. } => ReplicaState::Connecting,
            Conn::Up { reconciled: false } => ReplicaState::Reconciling,
            Conn::Up { reconciled: true } => ReplicaState::Streaming,
        }
    }

    pub(crate) fn is_connected(&self) -> bool {
        matches!(self.conn, Conn::Up { .. })
    }

    /// Since when the connection has been up (or down).
    pub(crate) fn conn_since(&self) -> Instant {
        self.conn_since
    }

    pub(crate) fn last_heard(&self) -> Option<Instant> {
        self.last_heard
    }

    pub(crate) fn standby_space(&self) -> Option<Space> {
        self.standby_space
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }
    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }
    fn machine(t0: Instant) -> ReplicaMachine {
        ReplicaMachine::new(Config::default(), t0)
    }
    fn events(m: &mut ReplicaMachine) -> Vec<Event> {
        std::iter::from_fn(|| m.poll_event()).collect()
    }
    /// Connects and completes the first full reconcile at `t`.
    fn streaming(m: &mut ReplicaMachine, t: Instant) {
        m.resume(t, t);
        assert_eq!(m.poll(t), Action::Connect);
        m.connected(t);
        assert_eq!(m.poll(t), Action::Reconcile);
        m.done(Summary::default(), t);
        assert_eq!(m.state(), ReplicaState::Streaming);
        // The reconcile's consistency is not checked here (see the batch's, below).
        assert_eq!(m.poll(t), Action::Barrier);
        m.check_dropped();
    }

    #[test]
    fn connect_reconcile_then_stream_batches() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        assert_eq!(m.state(), ReplicaState::Connecting);
        // Nothing is known about the standby yet: the lag runs from the start.
        assert_eq!(m.lag(t0 + ms(500)), ms(500));
        streaming(&mut m, t0 + ms(500));
        assert_eq!(m.lag(t0 + ms(600)), Duration::ZERO);
        assert_eq!(m.position().seq, 1);
        m.push(Hint::Written(p("a")), t0 + ms(700));
        assert_eq!(m.lag(t0 + ms(710)), ms(10));
        let Action::Send(b) = m.poll(t0 + ms(710)) else {
            panic!()
        };
        assert_eq!(b.paths, vec![(p("a"), Scope::Entry)]);
        // In flight, the change still counts as pending.
        assert_eq!((m.pending(), m.lag(t0 + ms(712))), (1, ms(12)));
        m.done(
            Summary {
                files_transferred: 1,
                bytes_literal: 4096,
                ..Summary::default()
            },
            t0 + ms(713),
        );
        assert_eq!(m.lag(t0 + ms(713)), Duration::ZERO);
        assert_eq!(m.position().seq, 2);
        assert_eq!((m.files_replicated, m.bytes_replicated), (1, 4096));
        let ev = events(&mut m);
        assert!(matches!(ev[0], Event::Connected));
        assert!(
            matches!(ev.last(), Some(Event::Replicated { changes: 1, lag, .. }) if *lag == ms(13))
        );
        // Nothing changed since: the batch's consistency is checked before anything else,
        // by a barrier through the hints, and the standby told.
        assert_eq!(m.consistent_point_age(t0 + ms(714)), None);
        assert_eq!(m.poll(t0 + ms(714)), Action::Barrier);
        let id = CHECK_BARRIER | 1;
        m.barrier_placed(id, t0 + ms(714));
        assert_eq!(
            m.poll(t0 + ms(714)),
            Action::Wait(Some(t0 + ms(714) + super::super::consistency::BARRIER_WAIT))
        );
        m.push(Hint::Barrier { id }, t0 + ms(715));
        let at = t0 + ms(715);
        assert_eq!(m.poll(at), Action::Consistent { seq: 2, at });
        assert_eq!(
            m.consistent_before(at),
            None,
            "a standby that keeps the latest"
        );
        m.consistent_held(2, at, true);
        assert_eq!(m.consistent_point_age(t0 + ms(900)), Some(Duration::ZERO));
        assert_eq!(m.poll(t0 + ms(716)), Action::Wait(None));
        // Still standing so: a flush now counts on it.
        assert_eq!(m.consistent_before(t0 + ms(799)), Some(t0 + ms(799)));
        // A change since: a failover to the point would lose it, and a flush waits for
        // the next one.
        m.push(Hint::Written(p("b")), t0 + ms(800));
        assert_eq!(m.consistent_point_age(t0 + ms(900)), Some(ms(185)));
        assert_eq!(m.consistent_before(t0 + ms(900)), Some(at));
        // A point a second old: what is queued goes at once, a file still being written
        // with it, so that nothing is left behind at the close.
        m.push(Hint::Created(p("c")), t0 + ms(1790));
        let Action::Send(b) = m.poll(t0 + ms(1800)) else {
            panic!("everything queued goes")
        };
        assert_eq!(
            b.paths,
            vec![(p("b"), Scope::Entry), (p("c"), Scope::Entry)]
        );
    }

    #[test]
    fn nothing_is_vouched_for_until_the_first_reconcile_is_acknowledged() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        assert_eq!(m.watermark(t0 + ms(100)), None);
        m.resume(t0, t0);
        assert_eq!(m.poll(t0 + ms(10)), Action::Connect);
        m.connected(t0 + ms(10));
        assert_eq!(m.poll(t0 + ms(20)), Action::Reconcile);
        // The reconcile runs, a change comes: still nothing to vouch for (the standby may
        // hold nothing of this tree yet, whatever the lag of this process says).
        m.push(Hint::Written(p("late")), t0 + ms(30));
        assert_eq!(m.watermark(t0 + ms(900)), None);
        m.failed(Failure::Link("the standby froze".into()), t0 + ms(1000));
        assert_eq!(
            m.watermark(t0 + ms(1100)),
            None,
            "a failed reconcile proves nothing"
        );
        assert_eq!(m.poll(t0 + ms(2000)), Action::Connect);
        m.connected(t0 + ms(2000));
        assert_eq!(m.poll(t0 + ms(2000)), Action::Reconcile);
        m.done(Summary::default(), t0 + ms(2100));
        // Vouched for: everything before the reconcile began is durable there.
        assert_eq!(m.watermark(t0 + ms(2200)), Some(t0 + ms(2200)));
        m.push(Hint::Written(p("next")), t0 + ms(2300));
        assert_eq!(m.watermark(t0 + ms(2400)), Some(t0 + ms(2300)));
    }

    #[test]
    fn a_path_that_failed_is_tried_again_later_less_often_the_longer_it_fails() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        streaming(&mut m, t0);
        let failed = |path: &str| Summary {
            errors: vec![crate::model::summary::EntryError::new(
                &p(path),
                "Read-only file system",
            )],
            ..Summary::default()
        };
        m.push(Hint::Written(p("a")), t0);
        assert!(matches!(m.poll(t0), Action::Send(_)));
        m.done(failed("a"), t0);
        // Not dropped: held back a second, then sent by itself.
        assert_eq!(m.poll(t0 + ms(999)), Action::Wait(Some(t0 + ms(1000))));
        let Action::Send(b) = m.poll(t0 + ms(1000)) else {
            panic!()
        };
        assert_eq!(b.paths, vec![(p("a"), Scope::Entry)]);
        // Failing for 20 s: the next try waits a quarter of that.
        let t1 = t0 + Duration::from_secs(20);
        m.done(failed("a"), t1);
        assert_eq!(m.poll(t1), Action::Wait(Some(t1 + Duration::from_secs(5))));
        // A change meanwhile goes at once; once it works, nothing more is retried.
        m.push(Hint::Written(p("a")), t1 + ms(10));
        assert!(matches!(m.poll(t1 + ms(10)), Action::Send(_)));
        m.done(Summary::default(), t1 + ms(20));
        assert!(m.failing.is_empty());
        // (No source to place a consistency check's barrier in here.)
        m.check_dropped();
        assert_eq!(m.poll(t1 + Duration::from_secs(60)), Action::Wait(None));
    }

    #[test]
    fn a_change_that_keeps_failing_counts_in_the_lag_from_its_first_event() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        streaming(&mut m, t0);
        let changing = Summary {
            errors: vec![crate::model::summary::EntryError::new(
                &p("wal"),
                "changed while being read",
            )],
            ..Summary::default()
        };
        m.push(Hint::Written(p("wal")), t0 + ms(100));
        assert!(matches!(m.poll(t0 + ms(100)), Action::Send(_)));
        m.done(changing.clone(), t0 + ms(300));
        assert_eq!(
            m.lag(t0 + ms(400)),
            ms(300),
            "from its event, not its retry"
        );
        // Written again while it waits to be retried: still dated from the first event.
        m.push(Hint::Written(p("wal")), t0 + ms(900));
        assert_eq!(m.lag(t0 + ms(1000)), ms(900));
        let Action::Send(b) = m.poll(t0 + ms(1000)) else {
            panic!()
        };
        assert_eq!(b.oldest, Some(t0 + ms(100)));
        m.done(changing, t0 + ms(1200));
        assert_eq!(m.lag(t0 + ms(5000)), ms(4900));
        assert_eq!(m.pending(), 1);
        // Once it is durable there, the lag is gone.
        let Action::Send(_) = m.poll(t0 + ms(5000)) else {
            panic!()
        };
        m.done(Summary::default(), t0 + ms(5100));
        assert_eq!(m.lag(t0 + ms(5200)), Duration::ZERO);
    }

    #[test]
    fn failures_back_off_doubling_and_reset_after_a_reconcile() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        assert_eq!(m.poll(t0), Action::Wait(None), "no source yet");
        m.resume(t0, t0);
        let mut t = t0;
        let mut delays = Vec::new();
        for _ in 0..9 {
            assert_eq!(m.poll(t), Action::Connect);
            m.failed(Failure::Link("unreachable".into()), t);
            let Some(Event::Disconnected { retry_in, .. }) = m.poll_event() else {
                panic!()
            };
            delays.push(retry_in.as_millis());
            // Not before the delay.
            assert_eq!(
                m.poll(t + retry_in - ms(1)),
                Action::Wait(Some(t + retry_in))
            );
            t += retry_in;
        }
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]
        );
        assert_eq!(m.last_error.as_deref(), Some("unreachable"));
        streaming(&mut m, t);
        assert_eq!(m.reconnects, 0, "the first connection is not a reconnect");
        assert!(m.last_error.is_none());
        // A broken batch: requeued, dated from its change, reconnect after the reset delay.
        m.push(Hint::Written(p("x")), t);
        assert!(matches!(m.poll(t), Action::Send(_)));
        m.failed(Failure::Link("connection lost".into()), t + ms(5));
        assert_eq!(m.state(), ReplicaState::Connecting);
        assert_eq!((m.pending(), m.lag(t + ms(50))), (1, ms(50)));
        assert_eq!(m.poll(t + ms(105)), Action::Connect);
        m.connected(t + ms(105));
        assert_eq!(m.reconnects, 1);
        // The reconnect's full reconcile covers the requeued change.
        assert_eq!(m.poll(t + ms(105)), Action::Reconcile);
        m.done(Summary::default(), t + ms(110));
        assert_eq!((m.pending(), m.lag(t + ms(110))), (0, Duration::ZERO));
    }

    #[test]
    fn a_silent_standby_is_given_up_after_the_idle_limit() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        assert_eq!(m.silent(t0 + ms(60_000)), None, "no connection, no silence");
        streaming(&mut m, t0);
        assert_eq!(m.silent(t0 + ms(1000)), None);
        m.heard(
            Heard {
                space: None,
                epoch: 1,
            },
            t0 + ms(5000),
        );
        assert_eq!(m.silent(t0 + ms(15_000)), None);
        let why = m.silent(t0 + ms(15_001)).unwrap();
        assert!(why.contains("silent for 10 s"), "{why}");
        // The broken stream that follows is explained by the silence.
        m.failed(
            Failure::Link("connection lost: closed".into()),
            t0 + ms(15_002),
        );
        assert!(matches!(
            m.poll_event().into_iter().chain(events(&mut m)).last(),
            Some(Event::Disconnected { why, .. }) if why.contains("silent")
        ));
        assert_eq!(
            m.silent(t0 + ms(25_003)),
            None,
            "silence is judged per connection"
        );
    }

    #[test]
    fn heartbeats_carry_position_pending_and_lag() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        streaming(&mut m, t0);
        m.push(Hint::Modified(p("log")), t0 + ms(100));
        let b = m.beat(t0 + ms(400));
        assert_eq!(b.position, Position { epoch: 1, seq: 1 });
        assert_eq!((b.pending, b.lag), (1, Some(ms(300))));
        m.heard(
            Heard {
                space: Some(Space {
                    free_bytes: 7,
                    ..Space::default()
                }),
                epoch: 1,
            },
            t0 + ms(401),
        );
        assert_eq!(m.standby_space().unwrap().free_bytes, 7);
        // A standby that restarted from a later position: numbering goes on from there.
        m.resume_from(Position { epoch: 1, seq: 40 });
        assert_eq!(m.position().seq, 40);
    }

    #[test]
    fn pause_closes_the_session_and_resume_reconciles_everything() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        streaming(&mut m, t0);
        m.pause("SRC is gone".into());
        m.pause("SRC is gone".into());
        assert_eq!(m.state(), ReplicaState::Paused);
        assert_eq!(m.poll(t0 + ms(1)), Action::Disconnect);
        m.disconnected(t0 + ms(1));
        assert_eq!(m.poll(t0 + ms(2)), Action::Wait(None));
        let paused: Vec<_> = events(&mut m)
            .into_iter()
            .filter(|e| matches!(e, Event::Paused { .. }))
            .collect();
        assert_eq!(paused.len(), 1, "one event per reason");
        // Changes made while paused may have been missed: the lag runs from the pause.
        m.resume(t0 + ms(3000), t0 + ms(1));
        assert_eq!(m.lag(t0 + ms(3000)), ms(2999));
        assert_eq!(m.poll(t0 + ms(3000)), Action::Connect);
        m.connected(t0 + ms(3000));
        assert_eq!(m.poll(t0 + ms(3000)), Action::Reconcile);
        m.done(Summary::default(), t0 + ms(3100));
        assert_eq!(m.lag(t0 + ms(3100)), Duration::ZERO);
        // An emptied source refuses a batch: paused, the batch kept.
        m.push(Hint::Removed(p("all")), t0 + ms(3200));
        assert!(matches!(m.poll(t0 + ms(3200)), Action::Send(_)));
        m.failed(Failure::Source("SRC is empty".into()), t0 + ms(3201));
        assert_eq!(m.paused(), Some("SRC is empty"));
        assert_eq!(m.pending(), 1);
    }

    #[test]
    fn a_reconcile_that_began_before_a_watcher_restart_is_followed_by_another() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        streaming(&mut m, t0);
        m.push(Hint::RescanAll, t0 + ms(10));
        let Action::Send(b) = m.poll(t0 + ms(10)) else {
            panic!()
        };
        assert!(b.full);
        // While it runs, the source is paused and resumed (a new watcher): events between
        // the two may be lost.
        m.pause("SRC was replaced".into());
        m.resume(t0 + ms(30), t0 + ms(20));
        m.done(Summary::default(), t0 + ms(40));
        assert_eq!(m.lag(t0 + ms(40)), ms(20), "still unsure since the pause");
        assert_eq!(m.poll(t0 + ms(40)), Action::Reconcile);
        m.done(Summary::default(), t0 + ms(50));
        assert_eq!(m.lag(t0 + ms(50)), Duration::ZERO);
        assert_eq!(m.state(), ReplicaState::Streaming);
    }

    #[test]
    fn a_full_standby_holds_batches_back_without_dropping_the_connection() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        streaming(&mut m, t0);
        m.push(Hint::Written(p("big")), t0 + ms(10));
        assert!(matches!(m.poll(t0 + ms(10)), Action::Send(_)));
        m.failed(Failure::StandbyFull("no space".into()), t0 + ms(20));
        assert_eq!(m.state(), ReplicaState::Streaming);
        assert!(
            matches!(events(&mut m).last(), Some(Event::Full { retry_in, .. }) if *retry_in == ms(100))
        );
        assert_eq!(m.poll(t0 + ms(50)), Action::Wait(Some(t0 + ms(120))));
        let Action::Send(again) = m.poll(t0 + ms(120)) else {
            panic!()
        };
        assert_eq!(again.oldest, Some(t0 + ms(10)));
        m.failed(Failure::StandbyFull("no space".into()), t0 + ms(130));
        assert_eq!(m.poll(t0 + ms(200)), Action::Wait(Some(t0 + ms(330))));
        assert_eq!(m.lag(t0 + ms(330)), ms(320));
        assert!(matches!(m.poll(t0 + ms(330)), Action::Send(_)));
        m.done(Summary::default(), t0 + ms(340));
        assert_eq!(m.lag(t0 + ms(340)), Duration::ZERO);
    }

    #[test]
    fn verify_on_schedule_leaves_out_pending_paths_and_repairs_the_rest() {
        let t0 = Instant::now();
        let cfg = Config {
            verify_every: Some(Duration::from_secs(60)),
            ..Config::default()
        };
        let mut m = ReplicaMachine::new(cfg, t0);
        streaming(&mut m, t0);
        assert_eq!(
            m.poll(t0 + ms(1)),
            Action::Wait(Some(t0 + Duration::from_secs(60)))
        );
        let t = t0 + Duration::from_secs(60);
        assert_eq!(m.poll(t), Action::StartVerify);
        m.push(Hint::Modified(p("busy")), t);
        let report = Report {
            content_differs: vec!["busy".into(), "rotten".into()],
            ..Report::default()
        };
        m.verified(Ok(report), t + ms(10));
        assert_eq!(
            m.poll(t + ms(10)),
            Action::Repair(vec![(p("rotten"), Scope::Entry)])
        );
        m.repaired(Ok(1), t + ms(20));
        let v = events(&mut m)
            .into_iter()
            .find_map(|e| match e {
                Event::Verified { report, repaired } => Some((report, repaired)),
                _ => None,
            })
            .unwrap();
        assert_eq!(v.0.content_differs, ["rotten"]);
        assert_eq!(v.1, 1);
        assert!(m.last_verify.is_some());
        // The next one is due a period after this one ended.
        assert!(matches!(
            m.poll(t + ms(100)),
            Action::Send(_) | Action::Wait(_)
        ));
    }

    #[test]
    fn a_newer_epoch_fences_the_primary_for_good() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        streaming(&mut m, t0);
        m.push(Hint::Written(p("late")), t0 + ms(1));
        // Told at connect or mid-session by the standby's refusal or cut.
        let Action::Send(_) = m.poll(t0 + ms(1)) else {
            panic!()
        };
        m.failed(Failure::Fenced("epoch 2 took over".into()), t0 + ms(2));
        assert_eq!(m.fenced(), Some("epoch 2 took over"));
        assert_eq!(m.poll(t0 + ms(4)), Action::Stop, "never reconnects");
        assert_eq!(
            m.pending(),
            1,
            "the change it could not send is still known"
        );
        m.resume(t0 + ms(5), t0 + ms(5));
        assert_eq!(m.poll(t0 + ms(6)), Action::Stop);
        assert_eq!(
            events(&mut m)
                .iter()
                .filter(|e| matches!(e, Event::Fenced { .. }))
                .count(),
            1
        );
        // Or told by a heartbeat: the standby's epoch is newer.
        let mut m = machine(t0);
        streaming(&mut m, t0);
        m.heard(
            Heard {
                space: None,
                epoch: 2,
            },
            t0 + ms(10),
        );
        let why = m.silent(t0 + ms(11)).unwrap();
        assert!(why.contains("epoch 2") && why.contains("epoch 1"), "{why}");
        m.failed(Failure::Link("connection lost".into()), t0 + ms(12));
        assert_eq!(m.poll(t0 + ms(13)), Action::Stop);
    }

    #[test]
    fn stopping_closes_the_session_first() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        streaming(&mut m, t0);
        m.stop();
        assert_eq!(m.poll(t0), Action::Disconnect);
        m.disconnected(t0);
        assert_eq!(m.poll(t0), Action::Stop);
        assert_eq!(m.state(), ReplicaState::Stopped);
    }
}
