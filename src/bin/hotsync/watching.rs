//! What `watch` shows: a status line on a terminal (rendered from the library's status
//! snapshot), one log line per event otherwise, one JSON object per event with `--json`.

use crate::args::Cli;
use crate::report::human_bytes;
use hotsync::model::status::{Instance, ReplicaState, ReplicaStatus};
use hotsync::ops::alert::Fired;
use hotsync::primary::replicate::{Event, Observer};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};

pub struct WatchView {
    bar: Option<ProgressBar>,
    json: bool,
    /// Several standbys: log lines name theirs.
    many: bool,
}

impl WatchView {
    pub fn new(cli: &Cli, json: bool, many: bool) -> WatchView {
        let bar = (!cli.quiet && !json && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(4));
            b.set_style(ProgressStyle::with_template("{spinner} {msg}").unwrap());
            b.enable_steady_tick(std::time::Duration::from_millis(250));
            b
        });
        WatchView { bar, json, many }
    }

    /// Whether a status line is shown (then [`WatchView::show`] should be fed).
    pub fn has_status_line(&self) -> bool {
        self.bar.is_some()
    }

    /// Renders the status line from a snapshot.
    pub fn show(&self, status: &Instance) {
        if let Some(b) = &self.bar {
            let line: Vec<String> = status.replicas.iter().map(status_line).collect();
            b.set_message(line.join("  ‖  "));
        }
    }

    fn emit(&self, standby: &str, mut value: serde_json::Value) {
        if self.json {
            value["ts"] = hotsync::model::clock::now_rfc3339().into();
            value["standby"] = standby.into();
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{value}");
            let _ = out.flush();
        }
    }

    fn line(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(msg),
            None => tracing::info!("{msg}"),
        }
    }

    fn warn(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(msg),
            None => tracing::warn!("{msg}"),
        }
    }

    /// An alert changed state: a JSON event and a log line.
    pub fn alert(&self, f: &Fired) {
        self.emit(
            &f.standby,
            serde_json::json!({"event": "alert", "alert": f.alert, "state": f.state(),
                "value": f.value, "message": f.message}),
        );
        match &self.bar {
            Some(b) => b.println(format!("ALERT {} {}: {}", f.alert, f.state(), f.message)),
            None => log_alert(f),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// An alert changed state: a log line.
pub fn log_alert(f: &Fired) {
    if f.firing {
        tracing::warn!("ALERT {} firing: {}", f.alert, f.message);
    } else {
        tracing::info!("alert {} resolved: {}", f.alert, f.message);
    }
}

/// One standby's part of the status line.
fn status_line(r: &ReplicaStatus) -> String {
    let state = match r.state {
        ReplicaState::Streaming => format!("connected to {}", r.standby),
        ReplicaState::Reconciling => format!("reconciling {}", r.standby),
        ReplicaState::Connecting => format!("{}: disconnected", r.standby),
        ReplicaState::Paused => format!("{}: PAUSED", r.standby),
        ReplicaState::Stopped => format!("{}: stopping", r.standby),
    };
    let last = match &r.last_replicated {
        Some(_) => format!("{} files sent", r.files_replicated),
        None => "nothing replicated yet".into(),
    };
    format!(
        "{state} | {} queued | {last} | lag {:.0} ms",
        r.pending_changes,
        r.lag_seconds * 1000.0
    )
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Observer for WatchView {
    fn event(&self, standby: &str, event: &Event) {
        match event {
            Event::Connected => {
                self.emit(standby, serde_json::json!({"event": "connected"}));
                self.line(&format!("connected to {standby}"));
            }
            Event::Disconnected { why, retry_in } => {
                self.emit(
                    standby,
                    serde_json::json!({"event": "disconnected", "error": why,
                        "retry_in_ms": retry_in.as_millis() as u64}),
                );
                self.warn(&format!(
                    "standby {standby} unavailable: {why}; retrying in {:.1} s",
                    retry_in.as_secs_f64()
                ));
            }
            Event::Full { why, retry_in } => {
                self.emit(
                    standby,
                    serde_json::json!({"event": "standby_full", "error": why,
                        "retry_in_ms": retry_in.as_millis() as u64}),
                );
                self.warn(&format!(
                    "{why}; changes stay queued, retrying in {:.1} s",
                    retry_in.as_secs_f64()
                ));
            }
            Event::Replicated {
                summary: s,
                changes,
                lag,
            } => {
                if self.json {
                    let mut v = serde_json::to_value(s).unwrap_or_default();
                    v["event"] = "replicated".into();
                    v["changes"] = (*changes).into();
                    v["lag_ms"] = ms(*lag).into();
                    self.emit(standby, v);
                }
                for e in &s.errors {
                    tracing::warn!("{}: {}", e.path, e.error);
                }
                // A look that found nothing to do (a second walk of a new directory) is not news.
                let busy = s.did_something();
                if self.bar.is_none() && busy {
                    let what = if *changes == 0 {
                        "reconciled".to_string()
                    } else {
                        format!("{changes} change(s)")
                    };
                    let to = if self.many {
                        format!("{standby}: ")
                    } else {
                        String::new()
                    };
                    tracing::info!(
                        "{to}{what}: {} files sent ({}), {} removed, {} renamed, {} errors, {} ms (lag {:.1} ms)",
                        s.files_transferred,
                        human_bytes(s.bytes_literal),
                        s.files_deleted,
                        s.renamed,
                        s.errors.len(),
                        s.elapsed_ms,
                        ms(*lag)
                    );
                }
            }
            Event::Paused { why } => {
                self.emit(
                    standby,
                    serde_json::json!({"event": "paused", "reason": why}),
                );
                match &self.bar {
                    Some(b) => b.println(format!("PAUSED: {why}")),
                    None => tracing::error!("paused: {why}"),
                }
            }
            Event::Verified {
                report: r,
                repaired,
            } => {
                if self.json {
                    let mut v = serde_json::to_value(r).unwrap_or_default();
                    v["event"] = "verified".into();
                    v["repaired"] = (*repaired).into();
                    self.emit(standby, v);
                }
                let secs = r.elapsed_ms as f64 / 1000.0;
                if r.identical {
                    self.line(&format!(
                        "verify: identical ({} entries, {} hashed in {secs:.1} s)",
                        r.files_checked,
                        human_bytes(r.bytes_hashed)
                    ));
                    return;
                }
                self.warn(&format!(
                    "verify: {} missing, {} extra, {} content differs, {} metadata differs, {} errors; {repaired} repaired",
                    r.missing_count,
                    r.extra_count,
                    r.content_differs_count,
                    r.metadata_differs_count,
                    r.errors_count
                ));
                for d in &r.details {
                    tracing::warn!("verify: {}: {}", d.path, d.detail);
                }
                for p in r.missing.iter().chain(&r.extra) {
                    tracing::warn!("verify: {p}: missing or extra on the standby");
                }
                for e in &r.errors {
                    tracing::warn!("verify: {}: {}", e.path, e.error);
                }
            }
            Event::Fenced { why } => {
                self.emit(
                    standby,
                    serde_json::json!({"event": "fenced", "reason": why}),
                );
                match &self.bar {
                    Some(b) => b.println(format!("FENCED: {why}")),
                    None => tracing::error!("fenced: {why}"),
                }
            }
            Event::VerifyFailed { why } => {
                self.emit(
                    standby,
                    serde_json::json!({"event": "verify_failed", "error": why}),
                );
                tracing::warn!("background verify failed: {why}");
            }
        }
    }
}
