//! What `hotsync status`, the metrics endpoint and the `watch` status line show. The library
//! owns these snapshots; the command line only renders them. Field names are part of the
//! `status --json` contract.

use crate::model::epoch::{Position, Role};
use serde::{Deserialize, Serialize};

/// Free and total space of a standby's filesystem.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Space {
    pub free_bytes: u64,
    pub total_bytes: u64,
    pub free_inodes: u64,
    pub total_inodes: u64,
}

impl Space {
    /// Free space as a percentage: the smaller of bytes and inodes (a disk full of inodes is
    /// as full as one out of blocks). A filesystem that reports no inode count (btrfs) is
    /// judged by bytes.
    pub fn free_percent(&self) -> f64 {
        let pct = |free: u64, total: u64| (total > 0).then(|| free as f64 * 100.0 / total as f64);
        match (
            pct(self.free_bytes, self.total_bytes),
            pct(self.free_inodes, self.total_inodes),
        ) {
            (Some(b), Some(i)) => b.min(i),
            (Some(b), None) => b,
            (None, Some(i)) => i,
            (None, None) => 100.0,
        }
    }

    /// "1.2 GiB free of 64.0 GiB, 5000 of 4194304 inodes free".
    pub fn describe(&self) -> String {
        format!(
            "{} free of {}, {} of {} inodes free",
            human_bytes(self.free_bytes),
            human_bytes(self.total_bytes),
            self.free_inodes,
            self.total_inodes
        )
    }

    /// The space of the filesystem holding `fd`.
    pub(crate) fn of(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<Space> {
        let s = rustix::fs::fstatvfs(fd)?;
        Ok(Space {
            free_bytes: s.f_bavail.saturating_mul(s.f_frsize),
            total_bytes: s.f_blocks.saturating_mul(s.f_frsize),
            free_inodes: s.f_favail,
            total_inodes: s.f_files,
        })
    }
}

/// A byte count for people: `512 B`, `1.5 KiB`, `3.2 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Where one replica is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    /// Not connected; trying again (with backoff).
    Connecting,
    /// Connected, making the standby equal by a full reconcile.
    Reconciling,
    /// Connected and following changes.
    Streaming,
    /// Stopped for a reason someone must look at (the source); resumes by itself.
    Paused,
    /// Shutting down.
    Stopped,
}

/// The last background verify.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyStatus {
    /// When it finished (RFC 3339, and seconds since the Unix epoch).
    pub at: String,
    pub at_unix: f64,
    pub identical: bool,
    pub differences: u64,
    pub repaired: u64,
    /// Why it could not run or repair, if it failed.
    pub error: Option<String>,
}

/// One standby, as its primary (`watch`) sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// The standby as named on the command line (the `standby` label of the metrics).
    pub standby: String,
    pub server_id: Option<String>,
    pub state: ReplicaState,
    pub connected: bool,
    /// Since when `connected` has held (RFC 3339), and how long ago that was.
    pub since: String,
    pub since_seconds: f64,
    /// How long ago the standby's last heartbeat arrived (`None`: none on this connection).
    pub last_heartbeat_age_seconds: Option<f64>,
    /// How old the oldest change not yet durable on the standby is: what a failover now
    /// would lose (0 when caught up).
    pub lag_seconds: f64,
    /// Changes seen on the primary and not yet durable on the standby.
    pub pending_changes: u64,
    /// The last batch known durable on the standby.
    pub position: Position,
    pub files_replicated: u64,
    /// File content made durable on the standby (sent or rebuilt from its own data).
    pub bytes_replicated: u64,
    /// Protocol bytes both ways, all sessions.
    pub wire_bytes: u64,
    /// Connections made after the first.
    pub reconnects: u64,
    /// Files that vanished (or changed type) between the event and the read: routine
    /// races, counted rather than logged one by one.
    pub vanished: u64,
    pub last_replicated: Option<String>,
    pub last_error: Option<String>,
    pub last_verify: Option<VerifyStatus>,
    /// The standby's filesystem, from its heartbeats.
    pub standby_space: Option<Space>,
    /// The standby could not store the last batch: its disk is full (changes stay queued).
    pub standby_full: bool,
    /// The protocol version of the current connection.
    pub protocol: Option<u16>,
    /// How long ago the tree stood as the standby's last consistent point does (DESIGN
    /// §10): what a failover to it loses. 0 while nothing changed since; `None` before the
    /// standby holds one this process told it of.
    #[serde(default)]
    pub consistent_point_age_seconds: Option<f64>,
}

/// One primary, as its standby (`serve`) sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrimaryStatus {
    /// The primary's ID (`local` for an in-process primary).
    pub primary: String,
    pub addr: Option<String>,
    pub connected: bool,
    pub since: String,
    pub since_seconds: f64,
    pub last_heartbeat_age_seconds: Option<f64>,
    /// The lag the primary reports, aged by the time since its heartbeat; for a primary no
    /// longer connected, the lag its last heartbeat reported.
    pub lag_seconds: Option<f64>,
    /// The lag the primary's last heartbeat reported, as it was then (what a promotion
    /// would have lost had the primary died at that moment).
    pub reported_lag_seconds: Option<f64>,
    /// Changes the primary has queued, as of its last heartbeat.
    pub pending_changes: Option<u64>,
    pub position: Position,
    /// Whole sessions: the first, and every reconnect.
    pub sessions: u64,
    pub files_written: u64,
    pub bytes_written: u64,
    pub entries_removed: u64,
    pub failed_ops: u64,
    /// Why the last session ended, if it failed.
    pub last_error: Option<String>,
}

/// How an instance is doing, by the contract of `hotsync status`'s exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    Healthy,
    Degraded,
    Down,
}

impl HealthState {
    /// `hotsync status`'s exit code: 0 healthy, 1 degraded, 2 down.
    pub fn exit_code(self) -> u8 {
        match self {
            HealthState::Healthy => 0,
            HealthState::Degraded => 1,
            HealthState::Down => 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub state: HealthState,
    /// One line per problem.
    pub reasons: Vec<String>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            state: HealthState::Healthy,
            reasons: Vec::new(),
        }
    }
}

/// An alert's state, as the hook was last told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertStatus {
    pub alert: String,
    pub standby: String,
    pub firing: bool,
    pub since: String,
    pub value: String,
}

/// The thresholds an instance alerts on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    pub alert_lag_seconds: Option<f64>,
    pub alert_free_percent: Option<f64>,
}

/// One running `watch` or `serve`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub pid: u32,
    /// `watch` or `serve`.
    pub command: String,
    pub role: Role,
    /// The tree: SRC of a watch, the root of a serve.
    pub tree: String,
    pub node_id: Option<String>,
    pub listen: Option<String>,
    pub started_at: String,
    pub uptime_seconds: f64,
    /// The protocol version this build speaks.
    pub protocol: u16,
    pub epoch: u64,
    pub health: Health,
    pub thresholds: Thresholds,
    pub replicas: Vec<ReplicaStatus>,
    pub primaries: Vec<PrimaryStatus>,
    /// The tree's own filesystem (a standby's).
    pub space: Option<Space>,
    pub alerts: Vec<AlertStatus>,
    /// Semi-synchronous replication, on a watch with `--sync-timeout`.
    #[serde(default)]
    pub sync: Option<SyncStatus>,
    /// How many of a watch's standbys it needs (`--quorum`; all when absent).
    #[serde(default)]
    pub quorum: Option<usize>,
    /// A watch's inotify watch set.
    #[serde(default)]
    pub watches: Option<WatchSet>,
    /// A serve's consistent point (DESIGN §10).
    #[serde(default)]
    pub consistency: Option<ConsistencyStatus>,
}

/// A standby's consistent point, as its `serve` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsistencyStatus {
    /// `consistent` (a promotion rolls back to the point) or `latest`.
    pub policy: crate::model::epoch::Consistency,
    /// When the primary's tree stood as the point (RFC 3339, the primary's clock), and the
    /// batch it followed; `None`: the tree has none.
    pub point: Option<String>,
    pub position: Option<Position>,
    /// The tree is at the point now (nothing was made durable here since).
    pub at_point: bool,
    /// How long ago the point was (by this node's clock against the primary's), 0 while
    /// the tree is at it: what a failover to it loses.
    pub age_seconds: Option<f64>,
}

/// A watch's inotify watch set: set up in the background, directory by directory, while
/// replication goes on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WatchSet {
    /// Directories watched.
    pub directories: u64,
    /// Every directory there when the watcher started is watched.
    pub complete: bool,
    /// How long the first watch set took, or has taken so far.
    pub setup_seconds: f64,
}

/// A watch's semi-synchronous replication (`--sync-timeout D --quorum K`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncStatus {
    pub quorum: usize,
    pub timeout_seconds: f64,
    /// The quorum was not met within the timeout: flushes do not wait until it is back.
    pub degraded: bool,
    pub degraded_since: Option<String>,
    pub reason: Option<String>,
}

impl Instance {
    /// Judges the instance: degraded when a standby is not connected and streaming, a
    /// threshold is crossed or an alert fires; for a standby, when no primary is connected.
    pub(crate) fn assess(&mut self) {
        let mut reasons = Vec::new();
        let t = self.thresholds;
        // Three missed heartbeats are worth a look long before the idle limit gives up.
        let stale = |age: Option<f64>| age.is_some_and(|a| a > 3.0);
        for r in &self.replicas {
            if r.connected && stale(r.last_heartbeat_age_seconds) {
                reasons.push(format!(
                    "{}: no heartbeat for {:.1} s",
                    r.standby,
                    r.last_heartbeat_age_seconds.unwrap_or_default()
                ));
            }
            match r.state {
                ReplicaState::Streaming => {}
                ReplicaState::Paused => reasons.push(format!(
                    "{}: paused: {}",
                    r.standby,
                    r.last_error.as_deref().unwrap_or("see the log")
                )),
                s => reasons.push(format!(
                    "{}: {}{}",
                    r.standby,
                    match s {
                        ReplicaState::Reconciling => "reconciling",
                        ReplicaState::Stopped => "stopped",
                        _ => "disconnected, retrying",
                    },
                    r.last_error
                        .as_ref()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                )),
            }
            if let Some(max) = t.alert_lag_seconds
                && r.lag_seconds > max
            {
                reasons.push(format!(
                    "{}: lag {:.1} s is above --alert-lag {max} s",
                    r.standby, r.lag_seconds
                ));
            }
            if let (Some(min), Some(sp)) = (t.alert_free_percent, r.standby_space)
                && sp.free_percent() < min
            {
                reasons.push(format!(
                    "{}: {:.1}% free on the standby, below --alert-free {min}%",
                    r.standby,
                    sp.free_percent()
                ));
            }
        }
        if let Some(s) = &self.sync
            && s.degraded
        {
            reasons.push(format!(
                "semi-synchronous replication degraded since {}: {}",
                s.degraded_since.as_deref().unwrap_or("?"),
                s.reason.as_deref().unwrap_or("the quorum was not met")
            ));
        }
        if self.role == Role::Standby && self.command == "serve" {
            if !self.primaries.iter().any(|p| p.connected) {
                reasons.push("no primary connected".into());
            }
            for p in self.primaries.iter().filter(|p| p.connected) {
                if stale(p.last_heartbeat_age_seconds) {
                    reasons.push(format!(
                        "primary {}: no heartbeat for {:.1} s",
                        p.primary,
                        p.last_heartbeat_age_seconds.unwrap_or_default()
                    ));
                }
                if let (Some(max), Some(lag)) = (t.alert_lag_seconds, p.lag_seconds)
                    && lag > max
                {
                    reasons.push(format!(
                        "primary {}: lag {lag:.1} s is above --alert-lag {max} s",
                        p.primary
                    ));
                }
            }
            if let (Some(min), Some(sp)) = (t.alert_free_percent, self.space)
                && sp.free_percent() < min
            {
                reasons.push(format!(
                    "{:.1}% free, below --alert-free {min}%",
                    sp.free_percent()
                ));
            }
        }
        for a in self.alerts.iter().filter(|a| a.firing) {
            let line = format!("alert {} firing for {} ({})", a.alert, a.standby, a.value);
            if !reasons.contains(&line) {
                reasons.push(line);
            }
        }
        self.health = Health {
            state: if reasons.is_empty() {
                HealthState::Healthy
            } else {
                HealthState::Degraded
            },
            reasons,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_percent_is_the_scarcer_of_bytes_and_inodes() {
        let s = Space {
            free_bytes: 50,
            total_bytes: 100,
            free_inodes: 5,
            total_inodes: 100,
        };
        assert_eq!(s.free_percent(), 5.0);
        let btrfs = Space {
            free_inodes: 0,
            total_inodes: 0,
            ..s
        };
        assert_eq!(btrfs.free_percent(), 50.0);
    }
}
