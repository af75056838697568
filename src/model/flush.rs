//! Synchronous points (`hotsync flush`): the bookkeeping, with no I/O; time and each
//! standby's progress are passed in.
//!
//! A flush asked at some moment must not return before every change made on the primary
//! until then is durable on its quorum of standbys. Changes the kernel has reported but the
//! replicator has not yet taken are covered by a barrier: the flush drops a marker in the
//! source's `.hotsync/`, and inotify reports it after every earlier event; the moment the
//! replicator sees the marker is the flush's barrier. A standby confirms the flush once
//! everything seen before the barrier is durable on it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How long a flush waits for its marker before it takes the marker for lost (an event
/// queue that overflowed, a directory not watched yet) and asks for a full re-scan instead,
/// with the barrier at that moment.
pub(crate) const MARKER_WAIT: Duration = Duration::from_millis(250);

/// What a flush needs to know of one standby at a moment.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Progress {
    pub standby: String,
    pub connected: bool,
    /// Every change seen before this moment is durable on the standby.
    pub durable_before: Instant,
    /// Where the standby rolls back to its last consistent point at a failover (DESIGN
    /// §10): every change seen before this moment is in that point, so only then is a
    /// flush safe across a failover. `None`: it keeps the latest of every file, and
    /// durable is enough.
    pub consistent_before: Option<Instant>,
    /// Its replication lag then, to report a standby that did not confirm.
    pub lag: Duration,
}

/// A standby that had not confirmed when a flush ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Missing {
    pub standby: String,
    pub lag_seconds: f64,
    /// It had everything durable, but no consistent point since the barrier (the tree
    /// kept changing in more than one file): a failover would go back before the flush.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_consistent_point: bool,
}

/// How a flush ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlushReport {
    /// The quorum was reached.
    pub ok: bool,
    pub quorum: usize,
    pub standbys: usize,
    /// In the order of the watch's standbys.
    pub confirmed: Vec<String>,
    pub missing: Vec<Missing>,
    pub elapsed_ms: f64,
    /// Semi-synchronous replication is degraded (the quorum was not met within the watch's
    /// `--sync-timeout`): this flush did not wait, or was the one that found it so.
    #[serde(default)]
    pub degraded: bool,
    /// False when the watch was degraded when asked: the flush did not wait at all.
    #[serde(default = "yes")]
    pub waited: bool,
}

fn yes() -> bool {
    true
}

/// Why semi-synchronous replication is degraded, and since when.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Degraded {
    pub since: Instant,
    pub why: String,
}

#[derive(Debug)]
struct Waiting {
    quorum: usize,
    started: Instant,
    deadline: Instant,
    barrier: Option<Instant>,
    /// Bound by the semi-synchronous timeout: running out degrades the watch.
    semi_sync: bool,
    /// Asked while degraded: ends at its first look.
    degraded: bool,
}

/// The flushes of one watch. With semi-synchronous replication (`watch --sync-timeout D
/// --quorum K`) a flush waits at most D for K standbys; past that the watch is degraded and
/// flushes do not wait, until K standbys are connected and within D again.
#[derive(Debug, Default)]
pub(crate) struct Book {
    next: u64,
    waiting: BTreeMap<u64, Waiting>,
    done: BTreeMap<u64, FlushReport>,
    /// The watch's default quorum (`--quorum`), and its semi-synchronous timeout.
    quorum: Option<usize>,
    semi_sync: Option<Duration>,
    degraded: Option<Degraded>,
}

impl Book {
    /// The flushes of a watch with a default `quorum` and, if given, semi-synchronous
    /// replication with `sync_timeout`.
    pub(crate) fn new(quorum: Option<usize>, sync_timeout: Option<Duration>) -> Book {
        Book {
            quorum,
            semi_sync: sync_timeout,
            ..Book::default()
        }
    }

    /// Why semi-synchronous replication is degraded, if it is.
    pub(crate) fn degraded(&self) -> Option<&Degraded> {
        self.degraded.as_ref()
    }

    /// The watch's default quorum among `standbys`.
    pub(crate) fn quorum_of(&self, standbys: usize) -> usize {
        self.quorum.unwrap_or(standbys).min(standbys)
    }

    /// While degraded: whether `standbys` bring the quorum back (that many connected, each
    /// within the semi-synchronous timeout); if so the watch is semi-synchronous again.
    /// True when it came back.
    pub(crate) fn observe(&mut self, standbys: &[Progress]) -> bool {
        let (Some(_), Some(limit)) = (&self.degraded, self.semi_sync) else {
            return false;
        };
        let back = standbys
            .iter()
            .filter(|p| p.connected && p.lag < limit)
            .count();
        if back >= self.quorum_of(standbys.len()) {
            self.degraded = None;
            return true;
        }
        false
    }
    /// A flush asked at `now` that must reach `quorum` of `standbys` within `timeout`; its
    /// id (the marker's name carries it).
    ///
    /// # Errors
    /// A quorum of 0 or above the number of standbys, in words.
    pub(crate) fn begin(
        &mut self,
        quorum: Option<usize>,
        standbys: usize,
        timeout: Duration,
        now: Instant,
    ) -> Result<u64, String> {
        let quorum = quorum.or(self.quorum).unwrap_or(standbys);
        if quorum == 0 || quorum > standbys {
            return Err(format!(
                "--quorum {quorum} cannot be met: this watch has {standbys} standby(s); give 1 to \
                 {standbys}"
            ));
        }
        let degraded = self.degraded.is_some();
        let deadline = match self.semi_sync {
            _ if degraded => now,
            Some(d) => now + d.min(timeout),
            None => now + timeout,
        };
        self.next += 1;
        self.waiting.insert(
            self.next,
            Waiting {
                quorum,
                started: now,
                deadline,
                barrier: None,
                semi_sync: self.semi_sync.is_some(),
                degraded,
            },
        );
        Ok(self.next)
    }

    /// The replicator saw flush `id`'s marker at `at`: everything seen before is in.
    pub(crate) fn barrier(&mut self, id: u64, at: Instant) {
        if let Some(w) = self.waiting.get_mut(&id) {
            w.barrier.get_or_insert(at);
        }
    }

    /// Whether a flush has waited [`MARKER_WAIT`] for its marker by `now`: the marker is
    /// taken for lost (an event queue that overflowed, a directory not watched yet), and the
    /// caller must ask for a full re-scan, then call [`Book::markers_lost`].
    pub(crate) fn marker_overdue(&self, now: Instant) -> bool {
        self.waiting.values().any(|w| overdue(w, now))
    }

    /// The flushes whose marker was overdue at `now` take `at` as their barrier: a moment
    /// after the full re-scan was asked for, so that re-scan must be durable first.
    pub(crate) fn markers_lost(&mut self, now: Instant, at: Instant) {
        for w in self.waiting.values_mut() {
            if overdue(w, now) {
                w.barrier = Some(at);
            }
        }
    }

    /// Forgets flush `id` (its marker could not be placed).
    pub(crate) fn cancel(&mut self, id: u64) {
        self.waiting.remove(&id);
        self.done.remove(&id);
    }

    #[cfg(test)]
    /// Whether any flush is waiting.
    pub(crate) fn is_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Ends the flushes that have their quorum at `now`, or have run out of time.
    pub(crate) fn step(&mut self, standbys: &[Progress], now: Instant) {
        let ended: Vec<u64> = self
            .waiting
            .iter()
            .filter(|(_, w)| now >= w.deadline || confirmed(w, standbys).count() >= w.quorum)
            .map(|(id, _)| *id)
            .collect();
        for id in ended {
            let w = self.waiting.remove(&id).unwrap();
            let confirmed: Vec<String> =
                confirmed(&w, standbys).map(|p| p.standby.clone()).collect();
            let ok = confirmed.len() >= w.quorum;
            // Only the watch's own quorum degrades it (a flush may ask for more).
            let watch_quorum = self.quorum_of(standbys.len());
            if !ok
                && w.semi_sync
                && !w.degraded
                && w.quorum <= watch_quorum
                && self.degraded.is_none()
            {
                self.degraded = Some(Degraded {
                    since: now,
                    why: format!(
                        "{} of {} standby(s) confirmed a flush within the sync timeout (quorum {})",
                        confirmed.len(),
                        standbys.len(),
                        w.quorum
                    ),
                });
            }
            let missing = standbys
                .iter()
                .filter(|p| !confirmed.contains(&p.standby))
                .map(|p| Missing {
                    standby: p.standby.clone(),
                    lag_seconds: p.lag.as_secs_f64(),
                    no_consistent_point: w.barrier.is_some_and(|b| durable(p, b)),
                })
                .collect();
            self.done.insert(
                id,
                FlushReport {
                    ok,
                    quorum: w.quorum,
                    standbys: standbys.len(),
                    confirmed,
                    missing,
                    elapsed_ms: now.saturating_duration_since(w.started).as_secs_f64() * 1e3,
                    degraded: w.degraded || (!ok && w.semi_sync),
                    waited: !w.degraded,
                },
            );
        }
    }

    /// The outcome of flush `id`, once it has ended.
    pub(crate) fn take(&mut self, id: u64) -> Option<FlushReport> {
        self.done.remove(&id)
    }

    /// When the next waiting flush runs out of time.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.waiting.values().map(|w| w.deadline).min()
    }
}

fn overdue(w: &Waiting, now: Instant) -> bool {
    w.barrier.is_none() && now.saturating_duration_since(w.started) >= MARKER_WAIT
}

/// The standbys that confirm `w`: all it waited for is durable there. Strictly after the
/// barrier: a change seen at the barrier's very instant may belong before it.
fn confirmed<'a>(w: &Waiting, standbys: &'a [Progress]) -> impl Iterator<Item = &'a Progress> {
    let barrier = w.barrier;
    standbys.iter().filter(move |p| {
        barrier.is_some_and(|b| durable(p, b) && p.consistent_before.is_none_or(|c| c >= b))
    })
}

/// Whether everything seen before `barrier` is durable on the standby.
fn durable(p: &Progress, barrier: Instant) -> bool {
    p.durable_before > barrier
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }
    fn progress(t0: Instant, name: &str, durable_ms: u64, lag_ms: u64) -> Progress {
        Progress {
            standby: name.into(),
            connected: true,
            durable_before: t0 + ms(durable_ms),
            consistent_before: None,
            lag: ms(lag_ms),
        }
    }

    /// A standby that rolls back to its consistent points at a failover confirms a flush
    /// only with a point at or after the barrier; one that keeps the latest, once durable.
    #[test]
    fn where_the_standby_keeps_consistent_points_a_flush_waits_for_one() {
        let t0 = Instant::now();
        let mut b = Book::default();
        let id = b.begin(None, 2, ms(1000), t0).unwrap();
        b.barrier(id, t0 + ms(10));
        let at_point = |point_ms| Progress {
            consistent_before: Some(t0 + ms(point_ms)),
            ..progress(t0, "consistent", 20, 0)
        };
        let p = vec![at_point(9), progress(t0, "latest", 20, 0)];
        b.step(&p, t0 + ms(20));
        assert_eq!(
            b.take(id),
            None,
            "durable, but its point is before the barrier"
        );
        // The point of the batch that closed at the barrier itself counts.
        let p = vec![at_point(10), progress(t0, "latest", 20, 0)];
        b.step(&p, t0 + ms(21));
        assert!(b.take(id).unwrap().ok);
        // At the timeout, one durable without a point is named as such.
        let id = b.begin(None, 2, ms(100), t0).unwrap();
        b.barrier(id, t0 + ms(10));
        let p = vec![at_point(9), progress(t0, "latest", 5, 700)];
        b.step(&p, t0 + ms(100));
        let o = b.take(id).unwrap();
        assert!(!o.ok);
        assert_eq!(
            o.missing,
            vec![
                Missing {
                    standby: "consistent".into(),
                    lag_seconds: 0.0,
                    no_consistent_point: true,
                },
                Missing {
                    standby: "latest".into(),
                    lag_seconds: 0.7,
                    no_consistent_point: false,
                }
            ]
        );
    }

    #[test]
    fn a_flush_ends_when_its_quorum_has_everything_seen_before_its_barrier() {
        let t0 = Instant::now();
        let mut b = Book::default();
        let id = b.begin(Some(2), 3, ms(1000), t0).unwrap();
        // Before the marker arrives nothing confirms, however current the standbys are.
        let current = |at| {
            vec![
                progress(t0, "a", at, 0),
                progress(t0, "b", at, 0),
                progress(t0, "c", at, 0),
            ]
        };
        b.step(&current(5), t0 + ms(5));
        assert_eq!(b.take(id), None);
        b.barrier(id, t0 + ms(10));
        // Durable exactly up to the barrier is not enough (strictly after).
        b.step(&current(10), t0 + ms(11));
        assert_eq!(b.take(id), None);
        // Two of three past the barrier: the quorum of 2.
        let p = vec![
            progress(t0, "a", 12, 0),
            progress(t0, "b", 9, 3_000),
            progress(t0, "c", 13, 0),
        ];
        b.step(&p, t0 + ms(13));
        let o = b.take(id).unwrap();
        assert!(o.ok);
        assert_eq!(o.confirmed, vec!["a".to_string(), "c".to_string()]);
        assert_eq!(
            o.missing,
            vec![Missing {
                standby: "b".into(),
                lag_seconds: 3.0,
                no_consistent_point: false,
            }]
        );
        assert_eq!(o.elapsed_ms, 13.0);
        assert!(!b.is_waiting());
    }

    #[test]
    fn at_its_timeout_a_flush_names_the_standbys_that_did_not_confirm() {
        let t0 = Instant::now();
        let mut b = Book::default();
        // The default quorum is every standby.
        let id = b.begin(None, 2, ms(200), t0).unwrap();
        b.barrier(id, t0 + ms(1));
        let p = vec![progress(t0, "a", 50, 0), progress(t0, "b", 0, 9_500)];
        b.step(&p, t0 + ms(100));
        assert_eq!(b.take(id), None, "still in time");
        assert_eq!(b.next_deadline(), Some(t0 + ms(200)));
        b.step(&p, t0 + ms(200));
        let o = b.take(id).unwrap();
        assert!(!o.ok);
        assert_eq!((o.quorum, o.standbys), (2, 2));
        assert_eq!(o.confirmed, vec!["a".to_string()]);
        assert_eq!(o.missing[0].standby, "b");
        assert_eq!(o.missing[0].lag_seconds, 9.5);
    }

    #[test]
    fn a_lost_marker_becomes_a_barrier_at_the_moment_it_is_given_up() {
        let t0 = Instant::now();
        let mut b = Book::default();
        let id = b.begin(None, 1, ms(5000), t0).unwrap();
        assert!(!b.marker_overdue(t0 + ms(100)));
        assert!(b.marker_overdue(t0 + MARKER_WAIT));
        b.markers_lost(t0 + MARKER_WAIT, t0 + ms(250));
        assert!(!b.marker_overdue(t0 + ms(300)));
        // Durable past the moment it was given up: confirmed.
        let p = |at| vec![progress(t0, "a", at, 0)];
        b.step(&p(250), t0 + ms(300));
        assert_eq!(b.take(id), None);
        b.step(&p(251), t0 + ms(300));
        assert!(b.take(id).unwrap().ok);
        // A marker that came in time is kept.
        let id = b.begin(None, 1, ms(5000), t0).unwrap();
        b.barrier(id, t0 + ms(2));
        assert!(!b.marker_overdue(t0 + ms(400)));
        b.markers_lost(t0 + ms(400), t0 + ms(400));
        b.step(&p(3), t0 + ms(400));
        assert!(b.take(id).unwrap().ok);
    }

    #[test]
    fn semi_sync_degrades_at_its_timeout_and_waits_again_once_the_quorum_is_back() {
        let t0 = Instant::now();
        let mut b = Book::new(Some(2), Some(ms(1000)));
        let behind = |at| {
            vec![
                progress(t0, "a", at, 0),
                progress(t0, "b", at, 0),
                progress(t0, "c", 0, 9_000),
            ]
        };
        // The watch's quorum of 2 out of 3: met by a and b.
        let id = b.begin(None, 3, ms(30_000), t0).unwrap();
        b.barrier(id, t0 + ms(1));
        b.step(&behind(5), t0 + ms(5));
        assert!(b.take(id).unwrap().ok);
        // Asked for all 3 with a longer timeout of its own: the sync timeout bounds it, but
        // more than the watch's quorum degrades nothing.
        let id = b.begin(Some(3), 3, ms(30_000), t0 + ms(10)).unwrap();
        b.barrier(id, t0 + ms(11));
        b.step(&behind(20), t0 + ms(900));
        assert_eq!(b.take(id), None);
        b.step(&behind(20), t0 + ms(1010));
        assert!(!b.take(id).unwrap().ok);
        assert!(b.degraded().is_none());
        // b falls behind too: the watch's quorum of 2 is not met within 1 s.
        let two_behind = |at| {
            vec![
                progress(t0, "a", at, 0),
                progress(t0, "b", 0, 9_000),
                progress(t0, "c", 0, 9_000),
            ]
        };
        let id = b.begin(None, 3, ms(30_000), t0 + ms(1020)).unwrap();
        b.barrier(id, t0 + ms(1021));
        b.step(&two_behind(1030), t0 + ms(2020));
        let o = b.take(id).unwrap();
        assert_eq!((o.ok, o.degraded), (false, true));
        let d = b.degraded().unwrap();
        assert_eq!(d.since, t0 + ms(2020));
        assert!(d.why.contains("1 of 3"), "{}", d.why);
        // Degraded: a flush does not wait, even one that the standbys could meet.
        let id = b.begin(Some(1), 3, ms(30_000), t0 + ms(2100)).unwrap();
        b.step(&two_behind(2100), t0 + ms(2100));
        let o = b.take(id).unwrap();
        assert_eq!((o.ok, o.degraded, o.waited), (false, true, false));
        // b reconnects but is still far behind: still degraded. Within the timeout: back.
        let mut p = two_behind(2200);
        assert!(!b.observe(&p));
        p[1].lag = ms(400);
        p[1].connected = false;
        assert!(!b.observe(&p), "within the timeout but not connected");
        p[1].connected = true;
        assert!(b.observe(&p));
        assert!(b.degraded().is_none());
        let id = b.begin(None, 3, ms(30_000), t0 + ms(2300)).unwrap();
        b.barrier(id, t0 + ms(2301));
        b.step(&two_behind(2300), t0 + ms(2350));
        assert_eq!(b.take(id), None, "waits again");
        // Without semi-sync a timed-out flush degrades nothing.
        let mut plain = Book::new(None, None);
        let id = plain.begin(None, 1, ms(10), t0).unwrap();
        plain.step(&[progress(t0, "a", 0, 5_000)], t0 + ms(10));
        assert!(!plain.take(id).unwrap().degraded);
        assert!(plain.degraded().is_none());
    }

    #[test]
    fn a_quorum_that_cannot_be_met_is_refused() {
        let mut b = Book::default();
        let now = Instant::now();
        let e = b.begin(Some(4), 3, ms(1), now).unwrap_err();
        assert!(e.contains("3 standby(s)"), "{e}");
        assert!(b.begin(Some(0), 3, ms(1), now).is_err());
        assert!(b.begin(Some(3), 3, ms(1), now).is_ok());
    }
}
