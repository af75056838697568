//! Alerts without Prometheus: conditions judged on the status snapshot (lag above
//! `--alert-lag`, free space below `--alert-free`, a standby disconnected or full, a verify
//! that found differences), each fired once when it has held for `HOLD` and resolved once
//! when it has been clear as long, so a value hovering at a threshold does not flap. A
//! transition runs the `--on-alert` program (never through a shell); its failure is logged
//! and never stops replication. The judging (`Alerts::evaluate`) is pure.

use crate::model::epoch::Role;
use crate::model::status::{AlertStatus, Instance, ReplicaState, Thresholds};
use crate::ops::control::Control;
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// How long a condition must hold (or stay clear) before the alert changes state.
pub(crate) const HOLD: Duration = Duration::from_secs(3);
/// How often conditions are judged.
const EVERY: Duration = Duration::from_millis(500);
/// How long the hook may run before it is killed.
const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// What alerts fire on.
#[derive(Debug, Clone, Default)]
pub struct AlertConfig {
    pub lag: Option<Duration>,
    pub free_percent: Option<f64>,
    /// The oldest a standby's last consistent point may be (while the tree has changed
    /// since): what a consistent failover would lose.
    pub consistency_window: Option<Duration>,
    /// The program and its arguments.
    pub hook: Option<Vec<String>>,
}

impl AlertConfig {
    /// Splits an `--on-alert` command into program and arguments (on spaces; no shell, no
    /// quoting, no expansion).
    ///
    /// # Errors
    /// An empty command.
    pub fn parse_hook(cmd: &str) -> Result<Vec<String>, String> {
        let argv: Vec<String> = cmd.split_whitespace().map(String::from).collect();
        if argv.is_empty() {
            return Err("--on-alert needs a program to run".into());
        }
        Ok(argv)
    }
}

/// A change of an alert's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fired {
    /// `lag`, `free`, `disconnected`, `disk_full`, `verify`, `consistency` or `fenced`.
    pub alert: &'static str,
    pub standby: String,
    pub firing: bool,
    /// The value that crossed (or cleared) the threshold, e.g. `12.3s`, `4.0%`.
    pub value: String,
    /// One line for people.
    pub message: String,
}

impl Fired {
    pub fn state(&self) -> &'static str {
        if self.firing { "firing" } else { "resolved" }
    }
}

/// One condition over time.
#[derive(Debug, Clone)]
struct Alarm {
    firing: bool,
    /// Since when the condition has disagreed with `firing`.
    changing_since: Option<Instant>,
    since: SystemTime,
    value: String,
    message: String,
}

/// The alerts of one instance.
#[derive(Debug)]
pub struct Alerts {
    cfg: AlertConfig,
    alarms: Mutex<BTreeMap<(&'static str, String), Alarm>>,
}

/// A condition as judged now: whether it holds, its value, and a line for people.
struct Judged {
    alert: &'static str,
    standby: String,
    holds: bool,
    value: String,
    message: String,
}

impl Alerts {
    pub(crate) fn new(cfg: AlertConfig) -> Alerts {
        Alerts {
            cfg,
            alarms: Mutex::new(BTreeMap::new()),
        }
    }

    /// The thresholds, as `status` shows them.
    pub(crate) fn thresholds(&self) -> Thresholds {
        Thresholds {
            alert_lag_seconds: self.cfg.lag.map(|d| d.as_secs_f64()),
            alert_free_percent: self.cfg.free_percent,
        }
    }

    /// What each condition says about `inst` now.
    fn judge(&self, inst: &Instance) -> Vec<Judged> {
        let mut out = Vec::new();
        let mut push = |alert, standby: &str, holds, value: String, message: String| {
            out.push(Judged {
                alert,
                standby: standby.to_string(),
                holds,
                value,
                message,
            })
        };
        let free = |pct: f64, min: f64| (pct < min, format!("{pct:.1}%"));
        if let Some(sync) = &inst.sync {
            push(
                "sync",
                "",
                sync.degraded,
                format!("quorum {}", sync.quorum),
                match &sync.reason {
                    Some(why) => format!("semi-synchronous replication degraded: {why}"),
                    None => format!(
                        "semi-synchronous replication: the quorum of {} is met",
                        sync.quorum
                    ),
                },
            );
        }
        let window = self.cfg.consistency_window;
        let mut point = |standby: &str, age: f64, max: Duration| {
            let v = format!("{age:.1}s");
            let whose = if standby.is_empty() {
                "this standby".to_string()
            } else {
                standby.to_string()
            };
            push(
                "consistency",
                standby,
                age > max.as_secs_f64(),
                v.clone(),
                format!(
                    "the last consistent point of {whose} is {v} old (window {:.1}s): a \
                     failover to it would lose what changed since",
                    max.as_secs_f64()
                ),
            );
        };
        if let (Some(max), Some(age)) = (
            window,
            inst.consistency.as_ref().and_then(|c| c.age_seconds),
        ) {
            point("", age, max);
        }
        for r in &inst.replicas {
            if let (Some(max), Some(age)) = (window, r.consistent_point_age_seconds) {
                point(&r.standby, age, max);
            }
        }
        for r in &inst.replicas {
            let s = &r.standby;
            if let Some(max) = self.cfg.lag {
                let holds = r.lag_seconds > max.as_secs_f64();
                let v = format!("{:.1}s", r.lag_seconds);
                push(
                    "lag",
                    s,
                    holds,
                    v.clone(),
                    format!(
                        "replication lag to {s} is {v} (threshold {:.1}s)",
                        max.as_secs_f64()
                    ),
                );
            }
            if let (Some(min), Some(sp)) = (self.cfg.free_percent, r.standby_space) {
                let (holds, v) = free(sp.free_percent(), min);
                push(
                    "free",
                    s,
                    holds,
                    v.clone(),
                    format!(
                        "standby {s} has {v} free ({}), threshold {min}%",
                        sp.describe()
                    ),
                );
            }
            let down = matches!(r.state, ReplicaState::Connecting | ReplicaState::Paused);
            let why = r
                .last_error
                .clone()
                .unwrap_or_else(|| "not connected".into());
            push(
                "disconnected",
                s,
                down,
                why.clone(),
                format!("standby {s} is not replicating: {why}"),
            );
            push(
                "disk_full",
                s,
                r.standby_full,
                why.clone(),
                format!("standby {s} is full: {why}"),
            );
            if let Some(v) = &r.last_verify {
                let holds = v.differences > v.repaired || v.error.is_some();
                let value = format!("{} differences", v.differences);
                push(
                    "verify",
                    s,
                    holds,
                    value.clone(),
                    format!(
                        "verify of {s} found {value}, {} repaired{}",
                        v.repaired,
                        v.error
                            .as_ref()
                            .map(|e| format!(" ({e})"))
                            .unwrap_or_default()
                    ),
                );
            }
        }
        if inst.role == Role::Standby && inst.command == "serve" {
            let me = &inst.tree;
            if let (Some(min), Some(sp)) = (self.cfg.free_percent, inst.space) {
                let (holds, v) = free(sp.free_percent(), min);
                push(
                    "free",
                    me,
                    holds,
                    v.clone(),
                    format!(
                        "standby {me} has {v} free ({}), threshold {min}%",
                        sp.describe()
                    ),
                );
            }
            for p in &inst.primaries {
                if let (Some(max), Some(lag)) = (self.cfg.lag, p.lag_seconds) {
                    let v = format!("{lag:.1}s");
                    push(
                        "lag",
                        me,
                        lag > max.as_secs_f64(),
                        v.clone(),
                        format!(
                            "primary {} reports a lag of {v} (threshold {:.1}s)",
                            p.primary,
                            max.as_secs_f64()
                        ),
                    );
                }
            }
            // Once a primary has been here: none connected is worth waking someone for.
            if !inst.primaries.is_empty() {
                let none = !inst.primaries.iter().any(|p| p.connected);
                push(
                    "disconnected",
                    me,
                    none,
                    "no primary".into(),
                    format!("no primary is connected to {me}"),
                );
            }
        }
        out
    }

    /// Judges `inst` at `now` and returns the alerts that changed state.
    pub(crate) fn evaluate(&self, inst: &Instance, now: Instant, wall: SystemTime) -> Vec<Fired> {
        let mut alarms = self.alarms.lock().unwrap();
        let mut fired = Vec::new();
        for j in self.judge(inst) {
            let a = alarms.entry((j.alert, j.standby.clone())).or_insert(Alarm {
                firing: false,
                changing_since: None,
                since: wall,
                value: j.value.clone(),
                message: j.message.clone(),
            });
            if j.holds == a.firing {
                a.changing_since = None;
                if a.firing {
                    a.value = j.value;
                    a.message = j.message;
                }
                continue;
            }
            let since = *a.changing_since.get_or_insert(now);
            if now.saturating_duration_since(since) < HOLD {
                continue;
            }
            a.firing = j.holds;
            a.changing_since = None;
            a.since = wall;
            a.value = j.value.clone();
            a.message = j.message.clone();
            fired.push(Fired {
                alert: j.alert,
                standby: j.standby,
                firing: j.holds,
                value: j.value,
                message: j.message,
            });
        }
        fired
    }

    /// The alerts that are firing, for `status`.
    pub(crate) fn statuses(&self) -> Vec<AlertStatus> {
        self.alarms
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, a)| a.firing)
            .map(|((alert, standby), a)| AlertStatus {
                alert: alert.to_string(),
                standby: standby.clone(),
                firing: true,
                since: crate::model::clock::rfc3339(a.since),
                value: a.value.clone(),
            })
            .collect()
    }

    /// Runs the hook for `f`, in the background; a failure is logged.
    pub(crate) fn run_hook(&self, f: &Fired) {
        let _ = self.spawn_hook(f);
    }

    /// Runs the hook for `f` and waits for it (bounded): for the last thing a process does
    /// before it exits, such as being fenced.
    pub fn run_hook_and_wait(&self, f: &Fired) {
        if let Some(t) = self.spawn_hook(f) {
            let _ = t.join();
        }
    }

    fn spawn_hook(&self, f: &Fired) -> Option<std::thread::JoinHandle<()>> {
        let argv = self.cfg.hook.clone()?;
        let f = f.clone();
        std::thread::Builder::new()
            .name("hotsync-alert-hook".into())
            .spawn(move || {
                let child = Command::new(&argv[0])
                    .args(&argv[1..])
                    .env("HOTSYNC_ALERT", f.alert)
                    .env("HOTSYNC_STATE", f.state())
                    .env("HOTSYNC_VALUE", &f.value)
                    .env("HOTSYNC_STANDBY", &f.standby)
                    .env("HOTSYNC_MESSAGE", &f.message)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn();
                let mut child = match child {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("--on-alert {}: cannot run it: {e}", argv[0]);
                        return;
                    }
                };
                let start = Instant::now();
                loop {
                    match child.try_wait() {
                        Ok(Some(s)) if s.success() => return,
                        Ok(Some(s)) => {
                            tracing::warn!(
                                "--on-alert {} ({} {}) failed: {s}",
                                argv[0],
                                f.alert,
                                f.state()
                            );
                            return;
                        }
                        Ok(None) if start.elapsed() > HOOK_TIMEOUT => {
                            let _ = child.kill();
                            let _ = child.wait();
                            tracing::warn!(
                                "--on-alert {} ran over {} s: killed",
                                argv[0],
                                HOOK_TIMEOUT.as_secs()
                            );
                            return;
                        }
                        Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                        Err(e) => {
                            tracing::warn!("--on-alert {}: {e}", argv[0]);
                            return;
                        }
                    }
                }
            })
            .ok()
    }
}

/// Judges an instance's status every half second until dropped, running the hook and
/// telling `on_fired` of every change.
pub struct Evaluator {
    stop: Arc<(Mutex<bool>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Evaluator {
    pub fn start(
        control: Arc<dyn Control>,
        alerts: Arc<Alerts>,
        on_fired: Box<dyn Fn(&Fired) + Send>,
    ) -> Evaluator {
        let stop = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("hotsync-alerts".into())
            .spawn(move || {
                loop {
                    let inst = control.status();
                    for f in alerts.evaluate(&inst, Instant::now(), SystemTime::now()) {
                        on_fired(&f);
                        alerts.run_hook(&f);
                    }
                    let (flag, cv) = &*stop2;
                    let g = flag.lock().unwrap();
                    let (g, _) = cv.wait_timeout_while(g, EVERY, |s| !*s).unwrap();
                    if *g {
                        return;
                    }
                }
            })
            .ok();
        Evaluator { stop, thread }
    }
}

impl Drop for Evaluator {
    fn drop(&mut self) {
        *self.stop.0.lock().unwrap() = true;
        self.stop.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Status builders for unit tests.
#[cfg(test)]
pub(crate) mod tests_support {
    use crate::model::epoch::Position;
    use crate::model::status::{ReplicaState, ReplicaStatus, Space};

    /// A streaming replica with `lag` and half its disk free.
    pub fn replica(lag: f64) -> ReplicaStatus {
        build(lag, 50)
    }

    pub(super) fn build(lag: f64, free: u64) -> ReplicaStatus {
        ReplicaStatus {
            standby: "s1".into(),
            server_id: None,
            state: ReplicaState::Streaming,
            connected: true,
            since: String::new(),
            since_seconds: 0.0,
            last_heartbeat_age_seconds: Some(0.1),
            lag_seconds: lag,
            pending_changes: 0,
            position: Position::default(),
            files_replicated: 0,
            bytes_replicated: 0,
            wire_bytes: 0,
            reconnects: 0,
            vanished: 0,
            last_replicated: None,
            last_error: None,
            last_verify: None,
            standby_space: Some(Space {
                free_bytes: free,
                total_bytes: 100,
                free_inodes: 100,
                total_inodes: 100,
            }),
            standby_full: false,
            protocol: Some(2),
            consistent_point_age_seconds: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::status::{Health, ReplicaStatus};

    pub(crate) fn replica(lag: f64, free: u64) -> ReplicaStatus {
        super::tests_support::build(lag, free)
    }
    fn instance(r: ReplicaStatus) -> Instance {
        Instance {
            pid: 1,
            command: "watch".into(),
            role: Role::Primary,
            tree: "/src".into(),
            node_id: None,
            listen: None,
            started_at: String::new(),
            uptime_seconds: 0.0,
            protocol: 2,
            epoch: 1,
            health: Health::default(),
            thresholds: Thresholds::default(),
            replicas: vec![r],
            primaries: vec![],
            space: None,
            alerts: vec![],
            sync: None,
            quorum: None,
            watches: None,
            consistency: None,
        }
    }
    fn alerts() -> Alerts {
        Alerts::new(AlertConfig {
            lag: Some(Duration::from_secs(1)),
            free_percent: Some(10.0),
            consistency_window: Some(Duration::from_secs(2)),
            hook: None,
        })
    }
    fn s(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn an_alert_fires_once_when_held_and_resolves_once_when_clear() {
        let a = alerts();
        let (t0, w) = (Instant::now(), SystemTime::now());
        let mut events = Vec::new();
        // The lag hovers around the threshold for a while: no flapping.
        for (ms, lag) in [(0, 2.0), (1000, 0.5), (2000, 2.0), (3000, 0.2), (4000, 3.0)] {
            events.extend(a.evaluate(&instance(replica(lag, 50)), t0 + s(ms), w));
        }
        assert!(events.is_empty(), "{events:?}");
        // Above it steadily: fires once, after the hold.
        for ms in (5000..12_000).step_by(500) {
            events.extend(a.evaluate(&instance(replica(5.0, 50)), t0 + s(ms), w));
        }
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!((events[0].alert, events[0].firing), ("lag", true));
        assert_eq!(events[0].value, "5.0s");
        assert!(events[0].message.contains("threshold 1.0s"));
        assert_eq!(a.statuses().len(), 1);
        // Back to zero: resolves once, after the hold.
        let mut later = Vec::new();
        for ms in (12_000..20_000).step_by(500) {
            later.extend(a.evaluate(&instance(replica(0.0, 50)), t0 + s(ms), w));
        }
        assert_eq!(later.len(), 1, "{later:?}");
        assert_eq!((later[0].alert, later[0].firing), ("lag", false));
        assert!(a.statuses().is_empty());
    }

    #[test]
    fn free_space_disconnection_and_fullness_each_alert() {
        let a = alerts();
        let (t0, w) = (Instant::now(), SystemTime::now());
        let mut r = replica(0.0, 5);
        r.state = ReplicaState::Connecting;
        r.connected = false;
        r.standby_full = true;
        r.last_error = Some("the standby is full".into());
        let mut fired = a.evaluate(&instance(r.clone()), t0, w);
        fired.extend(a.evaluate(&instance(r), t0 + HOLD, w));
        let mut names: Vec<_> = fired.iter().map(|f| f.alert).collect();
        names.sort();
        assert_eq!(names, ["disconnected", "disk_full", "free"]);
        let free = fired.iter().find(|f| f.alert == "free").unwrap();
        assert_eq!(free.value, "5.0%");
    }

    /// A standby whose last consistent point grows old while the tree changes fires
    /// `consistency`; one at its point (age 0) or with none told yet does not.
    #[test]
    fn an_old_consistent_point_alerts() {
        let a = alerts();
        let (t0, w) = (Instant::now(), SystemTime::now());
        let with_age = |age: Option<f64>| {
            let mut r = replica(0.0, 50);
            r.consistent_point_age_seconds = age;
            instance(r)
        };
        let mut fired = Vec::new();
        for (ms, age) in [(0, Some(0.0)), (3000, None), (6000, Some(1.5))] {
            fired.extend(a.evaluate(&with_age(age), t0 + s(ms), w));
        }
        assert!(fired.is_empty(), "{fired:?}");
        for ms in (7000..11_000).step_by(500) {
            fired.extend(a.evaluate(&with_age(Some(9.0)), t0 + s(ms), w));
        }
        assert_eq!(fired.len(), 1, "{fired:?}");
        assert_eq!((fired[0].alert, fired[0].firing), ("consistency", true));
        assert_eq!(fired[0].value, "9.0s");
        assert!(
            fired[0].message.contains("window 2.0s"),
            "{}",
            fired[0].message
        );
    }

    #[test]
    fn hooks_are_split_without_a_shell() {
        assert_eq!(
            AlertConfig::parse_hook("/usr/bin/logger -t hotsync").unwrap(),
            ["/usr/bin/logger", "-t", "hotsync"]
        );
        assert!(AlertConfig::parse_hook("  ").is_err());
    }
}
