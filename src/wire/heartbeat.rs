//! Heartbeats (protocol 2): on a stream of its own, each side of a session sends a
//! [`Heartbeat`] every [`INTERVAL`] and reads the other's, so an idle session still proves
//! both ends alive, the standby learns its lag and position even when nothing changes, and
//! the primary learns the standby's free space. A side that hears nothing for [`IDLE`]
//! declares the other gone and cuts the connection. What to say and when the peer is gone
//! are decided by a [`Pulse`] (pure logic, tested with explicit time); this module only
//! carries the beats.

use crate::model::liveness::{IDLE, INTERVAL, silence};
use crate::transport::Connection;
use crate::wire::channel::{Channel, Reader, Writer};
use crate::wire::protocol::{Heartbeat, Message};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How often silence is checked.
const CHECK: Duration = Duration::from_millis(250);

/// One side's heartbeat logic.
pub trait Pulse: Send + Sync {
    /// The heartbeat to send now.
    fn beat(&self, now: Instant) -> Heartbeat;
    /// Whether the peer has been silent too long, and if so why it is given up.
    fn silent(&self, now: Instant) -> Option<String>;
    /// The peer's heartbeat arrived at `now`.
    fn heard(&self, beat: &Heartbeat, now: Instant);
}

/// A flag a sleeping thread can be woken by.
#[derive(Default)]
struct Stop {
    stopped: Mutex<bool>,
    cv: Condvar,
}

impl Stop {
    fn set(&self) {
        *self.stopped.lock().unwrap() = true;
        self.cv.notify_all();
    }
    /// Sleeps `d`; true once stopped.
    fn wait(&self, d: Duration) -> bool {
        let g = self.stopped.lock().unwrap();
        let (g, _) = self.cv.wait_timeout_while(g, d, |s| !*s).unwrap();
        *g
    }
}

/// Sends beats until stopped, the stream fails, or the peer is silent too long (then the
/// connection is cut). A beat goes every [`INTERVAL`], and sooner when the position moved,
/// so the peer learns of a durable batch within a quarter of a second.
fn send_beats(w: &mut Writer, pulse: &dyn Pulse, conn: &dyn Connection, stop: &Stop) {
    let mut next = Instant::now();
    let mut sent: Option<(u64, u64)> = None;
    loop {
        let now = Instant::now();
        if let Some(why) = pulse.silent(now) {
            tracing::warn!("{why}");
            conn.give_up(&why);
            return;
        }
        let beat = pulse.beat(now);
        let position = (beat.epoch, beat.seq);
        if now >= next || sent.is_some_and(|s| s != position) {
            next = now + INTERVAL;
            sent = Some(position);
            if w.send(&Message::Heartbeat(beat)).is_err() || w.flush().is_err() {
                return;
            }
        }
        if stop.wait(CHECK) {
            let _ = w.get_mut().finish();
            return;
        }
    }
}

/// Reads the peer's beats until the stream ends.
fn hear_beats(r: &mut Reader, pulse: &dyn Pulse) {
    while let Ok(Some(msg)) = r.recv_opt() {
        match msg {
            Message::Heartbeat(b) => pulse.heard(&b, Instant::now()),
            other => {
                tracing::debug!("heartbeat stream: unexpected {}", other.name());
                return;
            }
        }
    }
}

/// The primary's running heartbeat; dropping it stops the beats.
pub(crate) struct Beating {
    stop: Arc<Stop>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Beating {
    fn drop(&mut self) {
        self.stop.set();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// Opens the heartbeat stream of a session (the primary's side) and beats on it. The
/// reading thread ends with the connection.
///
/// # Errors
/// The stream could not be opened, or the first beat not sent.
pub(crate) fn start(
    conn: Arc<dyn Connection>,
    pulse: Arc<dyn Pulse>,
) -> Result<Beating, crate::error::ProtocolError> {
    let mut ch = Channel::open(&*conn)?;
    // The first beat opens the stream on the standby's side, so it knows what it is.
    ch.send(&Message::Heartbeat(pulse.beat(Instant::now())))?;
    ch.flush()?;
    let Channel { mut r, mut w } = ch;
    let stop = Arc::new(Stop::default());
    let hearing = pulse.clone();
    std::thread::Builder::new()
        .name("hotsync-heard".into())
        .spawn(move || hear_beats(&mut r, &*hearing))
        .map_err(crate::error::ProtocolError::Io)?;
    let stop2 = stop.clone();
    let writer = std::thread::Builder::new()
        .name("hotsync-beat".into())
        .spawn(move || send_beats(&mut w, &*pulse, &*conn, &stop2))
        .map_err(crate::error::ProtocolError::Io)?;
    Ok(Beating {
        stop,
        writer: Some(writer),
    })
}

/// The standby's side: answers a heartbeat stream whose first beat was `first`, until the
/// stream ends; beats back on it meanwhile.
pub(crate) fn answer(conn: &dyn Connection, ch: Channel, first: &Heartbeat, pulse: &dyn Pulse) {
    pulse.heard(first, Instant::now());
    let Channel { mut r, mut w } = ch;
    let stop = Stop::default();
    std::thread::scope(|s| {
        s.spawn(|| send_beats(&mut w, pulse, conn, &stop));
        hear_beats(&mut r, pulse);
        stop.set();
    });
}

/// The pulse of a one-off session (`sync`, `verify`): position 0, gone after [`IDLE`].
pub(crate) struct Simple {
    epoch: u64,
    last_heard: Mutex<Instant>,
}

impl Simple {
    pub(crate) fn new(epoch: u64) -> Simple {
        Simple {
            epoch,
            last_heard: Mutex::new(Instant::now()),
        }
    }
}

impl Pulse for Simple {
    fn beat(&self, _now: Instant) -> Heartbeat {
        Heartbeat {
            epoch: self.epoch,
            seq: 0,
            sent_at_ms: crate::model::clock::unix_ms(std::time::SystemTime::now()),
            oldest_pending_ms: None,
            pending: 0,
            space: None,
        }
    }
    fn silent(&self, now: Instant) -> Option<String> {
        silence(*self.last_heard.lock().unwrap(), now, IDLE, "the standby")
    }
    fn heard(&self, _beat: &Heartbeat, now: Instant) {
        *self.last_heard.lock().unwrap() = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beats_flow_both_ways_and_a_silent_peer_is_cut() {
        // Real streams (the in-process transport), real threads.
        let (a, b) = crate::transport::local::pair();
        let (a, b): (Arc<dyn Connection>, Arc<dyn Connection>) = (Arc::new(a), Arc::new(b));
        /// Counts beats heard; judges the peer gone after `cut_after` of them, once the
        /// peer (if given) has heard one of ours (so the cut cannot overtake our beat), or
        /// five beats later regardless.
        struct Count(Mutex<u32>, Option<u32>, Option<Arc<Count>>);
        impl Pulse for Count {
            fn beat(&self, _: Instant) -> Heartbeat {
                Simple::new(1).beat(Instant::now())
            }
            fn silent(&self, _: Instant) -> Option<String> {
                let n = *self.0.lock().unwrap();
                let answered = self.2.as_ref().is_none_or(|p| *p.0.lock().unwrap() >= 1);
                // Unanswered for long, cut anyway: the test then fails instead of hanging.
                self.1
                    .filter(|&k| (n >= k && answered) || n >= k + 5)
                    .map(|_| "heard enough".to_string())
            }
            fn heard(&self, _: &Heartbeat, _: Instant) {
                *self.0.lock().unwrap() += 1;
            }
        }
        let primary = Arc::new(Count(Mutex::new(0), None, None));
        let standby = Count(Mutex::new(0), Some(2), Some(primary.clone()));
        let b2 = b.clone();
        let answering = std::thread::spawn(move || {
            let s = b2.accept().unwrap().unwrap();
            let mut ch = Channel::new(s);
            let Ok(Message::Heartbeat(first)) = ch.recv() else {
                panic!("a heartbeat opens the stream")
            };
            answer(&*b2, ch, &first, &standby);
            *standby.0.lock().unwrap()
        });
        let beating = start(a.clone(), primary.clone()).unwrap();
        // The standby hears the first beat and the next one a second later, then judges
        // the primary silent and cuts the connection: both sides end.
        let heard = answering.join().unwrap();
        assert!(heard >= 2);
        assert!(*primary.0.lock().unwrap() >= 1, "the standby beat back");
        assert!(a.failure().is_some(), "the primary sees the cut");
        drop(beating);
    }
}
