//! When a peer counts as alive: how often each side of a session proves it is (a
//! heartbeat every [`INTERVAL`]) and the verdict on one that has been silent longer than
//! the idle limit. Pure: time is passed in. The wire side is in `heartbeat`.

use std::time::{Duration, Instant};

/// How often a heartbeat goes out.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// A peer silent this long is gone: the idle limit (QUIC's own idle timeout is longer, so
/// this clearer verdict comes first).
pub const IDLE: Duration = Duration::from_secs(10);

/// The verdict on a peer (`who`) last heard at `last`: gone after `idle` of silence.
pub fn silence(last: Instant, now: Instant, idle: Duration, who: &str) -> Option<String> {
    let silent = now.saturating_duration_since(last);
    (silent > idle).then(|| {
        format!(
            "{who} has been silent for {:.0} s (no heartbeat): giving it up",
            silent.as_secs_f64()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_is_judged_against_the_idle_limit() {
        let t0 = Instant::now();
        assert_eq!(silence(t0, t0 + IDLE, IDLE, "x"), None);
        let late = t0 + IDLE + Duration::from_millis(1);
        let why = silence(t0, late, IDLE, "the primary").unwrap();
        assert!(
            why.starts_with("the primary has been silent for 10 s"),
            "{why}"
        );
    }
}
