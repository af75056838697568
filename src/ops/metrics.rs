//! `--metrics ADDR`: the status snapshot as Prometheus metrics at `http://ADDR/metrics`,
//! encoded by the Prometheus project's Rust client (text format 0.0.4, or OpenMetrics when
//! the scraper asks for it), served by a small HTTP/1.1 responder on tokio. Names follow
//! Prometheus conventions: base units, `_total` counters, a `standby` label per replica.

use crate::model::epoch::Role;
use crate::model::status::{Instance, Space};
use crate::ops::control::Control;
use prometheus_client::encoding::{prometheus_text, text as openmetrics_text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Labels = Vec<(String, String)>;
type G = Family<Labels, Gauge<f64, AtomicU64>>;
type C = Family<Labels, Counter<u64>>;

/// The metrics of one registry, built from a snapshot.
struct Set {
    reg: Registry,
}

impl Set {
    fn gauge(&mut self, name: &str, help: &str) -> G {
        let g = G::default();
        self.reg.register(name, help, g.clone());
        g
    }
    fn counter(&mut self, name: &str, help: &str) -> C {
        let c = C::default();
        self.reg.register(name, help, c.clone());
        c
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn set(g: &G, l: &Labels, v: f64) {
    g.get_or_create(l).set(v);
}

fn add(c: &C, l: &Labels, v: u64) {
    c.get_or_create(l).inc_by(v);
}

/// Space gauges of one filesystem.
struct SpaceGauges {
    free: G,
    size: G,
    free_inodes: G,
    inodes: G,
}

impl SpaceGauges {
    fn new(s: &mut Set) -> SpaceGauges {
        SpaceGauges {
            free: s.gauge(
                "standby_free_bytes",
                "Bytes available to hotsync on the standby's filesystem",
            ),
            size: s.gauge("standby_size_bytes", "Size of the standby's filesystem"),
            free_inodes: s.gauge(
                "standby_free_inodes",
                "Inodes free on the standby's filesystem",
            ),
            inodes: s.gauge("standby_inodes", "Inodes of the standby's filesystem"),
        }
    }
    fn record(&self, l: &Labels, sp: &Space) {
        set(&self.free, l, sp.free_bytes as f64);
        set(&self.size, l, sp.total_bytes as f64);
        set(&self.free_inodes, l, sp.free_inodes as f64);
        set(&self.inodes, l, sp.total_inodes as f64);
    }
}

/// Encodes `inst` as Prometheus text (`openmetrics`: as OpenMetrics text instead).
pub(crate) fn render(inst: &Instance, openmetrics: bool) -> String {
    let mut s = Set {
        reg: Registry::with_prefix("hotsync"),
    };
    let role = match inst.role {
        Role::Primary => "primary",
        Role::Standby => "standby",
    };
    let info = s.gauge(
        "info",
        "This hotsync process: its command, role and protocol",
    );
    let protocol = inst.protocol.to_string();
    set(
        &info,
        &labels(&[
            ("command", &inst.command),
            ("role", role),
            ("tree", &inst.tree),
            ("version", env!("CARGO_PKG_VERSION")),
            ("protocol", &protocol),
        ]),
        1.0,
    );
    let epoch = s.gauge(
        "epoch",
        "The tree's epoch (it grows by one at every promotion)",
    );
    set(&epoch, &vec![], inst.epoch as f64);
    // A state set: one series per role, 1 for the tree's role, so a change of role shows
    // as a change of value, not as a series appearing.
    let roles = s.gauge(
        "role",
        "1 for the role the tree has (primary or standby), 0 for the other",
    );
    for r in ["primary", "standby"] {
        set(&roles, &labels(&[("role", r)]), f64::from(r == role));
    }
    if let Some(w) = &inst.watches {
        let dirs = s.gauge(
            "watched_directories",
            "Directories the watch has an inotify watch on",
        );
        set(&dirs, &vec![], w.directories as f64);
        let done = s.gauge(
            "watch_setup_complete",
            "1 once every directory there when the watch started is watched, else 0",
        );
        set(&done, &vec![], f64::from(w.complete));
    }
    let healthy = s.gauge("healthy", "1 when hotsync status would say healthy, else 0");
    set(
        &healthy,
        &vec![],
        f64::from(inst.health.state == crate::model::status::HealthState::Healthy),
    );
    let connected = s.gauge(
        "standby_connected",
        "1 while the standby is connected (and, on a standby, a primary is), else 0",
    );
    let lag = s.gauge(
        "replication_lag_seconds",
        "Age of the oldest change not yet durable on the standby: what a failover now would lose",
    );
    let pending = s.gauge(
        "pending_changes",
        "Changes seen on the primary, not yet durable on the standby",
    );
    let heartbeat = s.gauge(
        "heartbeat_age_seconds",
        "Time since the peer's last heartbeat",
    );
    let position = s.gauge(
        "position_seq",
        "The last batch known durable on the standby",
    );
    let files = s.counter(
        "replicated_files",
        "Files made durable on the standby by this process",
    );
    let bytes = s.counter(
        "replicated_bytes",
        "File content made durable on the standby by this process",
    );
    let reconnects = s.counter("reconnects", "Connections to the standby after the first");
    let consistent = s.gauge(
        "consistent_point_age_seconds",
        "How long ago the tree stood as the standby's last consistent point: what a failover to it loses",
    );
    let alert = s.gauge(
        "alert_firing",
        "1 for each alert of --alert-lag, --alert-free and the others now firing",
    );
    if let Some(c) = &inst.consistency
        && let Some(age) = c.age_seconds
    {
        let g = s.gauge(
            "standby_consistent_point_age_seconds",
            "How long ago the standby's last consistent point was, 0 while the tree is at it: what a failover to it loses",
        );
        set(&g, &vec![], age);
    }
    let space = SpaceGauges::new(&mut s);
    for r in &inst.replicas {
        let l = labels(&[("standby", &r.standby)]);
        set(&connected, &l, f64::from(r.connected));
        set(&lag, &l, r.lag_seconds);
        set(&pending, &l, r.pending_changes as f64);
        if let Some(age) = r.last_heartbeat_age_seconds {
            set(&heartbeat, &l, age);
        }
        set(&position, &l, r.position.seq as f64);
        if let Some(age) = r.consistent_point_age_seconds {
            set(&consistent, &l, age);
        }
        add(&files, &l, r.files_replicated);
        add(&bytes, &l, r.bytes_replicated);
        add(&reconnects, &l, r.reconnects);
        if let Some(sp) = &r.standby_space {
            space.record(&l, sp);
        }
    }
    if !inst.replicas.is_empty() {
        let wire = s.counter(
            "wire_bytes",
            "Protocol bytes to and from the standby, both ways",
        );
        let vanished = s.counter(
            "vanished_files",
            "Files that vanished between the event and the read (routine races)",
        );
        let verify_ok = s.gauge(
            "verify_last_success_timestamp_seconds",
            "When the last background verify (and its repair) succeeded, Unix time",
        );
        let verify_diff = s.gauge(
            "verify_differences",
            "Differences the last background verify found (before its repair)",
        );
        for r in &inst.replicas {
            let l = labels(&[("standby", &r.standby)]);
            add(&wire, &l, r.wire_bytes);
            add(&vanished, &l, r.vanished);
            if let Some(v) = &r.last_verify {
                set(&verify_diff, &l, v.differences as f64);
                if v.error.is_none() {
                    set(&verify_ok, &l, v.at_unix);
                }
            }
        }
    }
    if inst.command == "serve" {
        let me = labels(&[("standby", &inst.tree)]);
        if let Some(sp) = &inst.space {
            space.record(&me, sp);
        }
        set(
            &connected,
            &me,
            f64::from(inst.primaries.iter().any(|p| p.connected)),
        );
        let written = s.counter(
            "written_files",
            "Files made durable here for a primary, by this serve",
        );
        let written_bytes = s.counter(
            "written_bytes",
            "File content made durable here for a primary, by this serve",
        );
        let sessions = s.counter("sessions", "Sessions of a primary (its reconnects count)");
        for p in &inst.primaries {
            let l = labels(&[("standby", &inst.tree), ("primary", &p.primary)]);
            if let Some(v) = p.lag_seconds {
                set(&lag, &l, v);
            }
            if let Some(v) = p.pending_changes {
                set(&pending, &l, v as f64);
            }
            if let Some(age) = p.last_heartbeat_age_seconds {
                set(&heartbeat, &l, age);
            }
            set(&position, &l, p.position.seq as f64);
            add(&written, &l, p.files_written);
            add(&written_bytes, &l, p.bytes_written);
            add(&sessions, &l, p.sessions);
        }
    }
    for a in &inst.alerts {
        set(
            &alert,
            &labels(&[("alert", &a.alert), ("standby", &a.standby)]),
            1.0,
        );
    }
    let mut out = String::new();
    let encoded = if openmetrics {
        openmetrics_text::encode(&mut out, &s.reg)
    } else {
        prometheus_text::encode(&mut out, &s.reg)
    };
    encoded.expect("encoding into a String cannot fail");
    out
}

/// A running metrics endpoint; stops when dropped.
pub struct MetricsServer {
    pub addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A metrics address, bound and not yet serving: binding comes first, so a taken port is
/// refused before anything else starts.
pub struct Bound {
    listener: std::net::TcpListener,
    pub addr: std::net::SocketAddr,
}

/// Binds the metrics endpoint's address.
///
/// # Errors
/// [`crate::error::Error::Usage`] when `addr` is not an address or cannot be bound, saying which.
pub fn bind(addr: &str) -> crate::error::Result<Bound> {
    let bad = |e: String| crate::error::Error::Usage(format!("--metrics {addr}: {e}"));
    let sock = std::net::ToSocketAddrs::to_socket_addrs(addr)
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| bad("expected ADDR:PORT, e.g. 127.0.0.1:9478".into()))?;
    let listener = std::net::TcpListener::bind(sock).map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            bad("the address is already in use: choose another port".into())
        }
        _ => bad(e.to_string()),
    })?;
    let addr = listener.local_addr().map_err(|e| bad(e.to_string()))?;
    Ok(Bound { listener, addr })
}

impl Bound {
    /// Serves `control`'s status as metrics until the returned server is dropped.
    ///
    /// # Errors
    /// The runtime or its thread could not be started.
    pub fn serve(self, control: Arc<dyn Control>) -> crate::error::Result<MetricsServer> {
        let io = |e| crate::error::Error::io("cannot start the metrics endpoint", e);
        self.listener.set_nonblocking(true).map_err(io)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io)?;
        let listener = {
            let _guard = rt.enter();
            tokio::net::TcpListener::from_std(self.listener).map_err(io)?
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // The thread owns the runtime: only `Runtime::block_on` drives a current-thread
        // runtime's I/O.
        std::thread::Builder::new()
            .name("hotsync-metrics".into())
            .spawn(move || {
                rt.block_on(async move {
                    let accepting = async {
                        let mut errors = crate::ops::control::AcceptErrors::default();
                        loop {
                            let conn = match listener.accept().await {
                                Ok((conn, _)) => {
                                    if let Some(n) = errors.succeeded() {
                                        tracing::info!(
                                            "metrics endpoint: accepting connections again \
                                             after {n} failed attempt(s)"
                                        );
                                    }
                                    conn
                                }
                                Err(e) => {
                                    let (wait, first) = errors.failed();
                                    if first {
                                        tracing::warn!(
                                            "metrics endpoint: cannot accept a connection \
                                             ({e}); retrying, less and less often (at most \
                                             every {} s), until it can",
                                            crate::ops::control::AcceptErrors::MAX.as_secs()
                                        );
                                    }
                                    tokio::time::sleep(wait).await;
                                    continue;
                                }
                            };
                            let control = control.clone();
                            tokio::spawn(async move {
                                let _ = tokio::time::timeout(
                                    Duration::from_secs(10),
                                    respond(conn, control),
                                )
                                .await;
                            });
                        }
                    };
                    tokio::select! {
                        _ = accepting => {}
                        _ = stopped => {}
                    }
                })
            })
            .map_err(io)?;
        Ok(MetricsServer {
            addr: self.addr,
            stop: Some(stop),
        })
    }
}

/// Answers one HTTP request (and closes the connection).
async fn respond(
    mut conn: tokio::net::TcpStream,
    control: Arc<dyn Control>,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > 16 * 1024 {
            return write(
                &mut conn,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            )
            .await;
        }
    }
    let text = String::from_utf8_lossy(&head);
    let mut first = text.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let openmetrics = text.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("accept:") && l.contains("application/openmetrics-text")
    });
    match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => {
            // The snapshot takes locks and stats the tree: off the async thread.
            let inst = tokio::task::spawn_blocking(move || control.status())
                .await
                .map_err(std::io::Error::other)?;
            let (ctype, body) = if openmetrics {
                (
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    render(&inst, true),
                )
            } else {
                (prometheus_text::CONTENT_TYPE, render(&inst, false))
            };
            write(&mut conn, "200 OK", ctype, &body).await
        }
        ("GET", "/") => {
            let body = "hotsync: metrics at /metrics\n";
            write(&mut conn, "200 OK", "text/plain; charset=utf-8", body).await
        }
        ("GET", _) => write(&mut conn, "404 Not Found", "text/plain", "not found\n").await,
        _ => {
            write(
                &mut conn,
                "405 Method Not Allowed",
                "text/plain",
                "GET only\n",
            )
            .await
        }
    }
}

async fn write(
    conn: &mut tokio::net::TcpStream,
    status: &str,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::status::{Health, Thresholds};

    #[test]
    fn names_follow_prometheus_conventions() {
        let inst = Instance {
            pid: 1,
            command: "serve".into(),
            role: Role::Standby,
            tree: "/srv/standby".into(),
            node_id: None,
            listen: None,
            started_at: String::new(),
            uptime_seconds: 1.0,
            protocol: 2,
            epoch: 3,
            health: Health::default(),
            thresholds: Thresholds::default(),
            replicas: vec![],
            primaries: vec![crate::model::status::PrimaryStatus {
                primary: "P".into(),
                addr: None,
                connected: true,
                since: String::new(),
                since_seconds: 0.0,
                last_heartbeat_age_seconds: Some(0.5),
                lag_seconds: Some(0.25),
                reported_lag_seconds: Some(0.25),
                pending_changes: Some(1),
                position: crate::model::epoch::Position { epoch: 3, seq: 9 },
                sessions: 2,
                files_written: 5,
                bytes_written: 6,
                entries_removed: 0,
                failed_ops: 0,
                last_error: None,
            }],
            space: Some(Space {
                free_bytes: 10,
                total_bytes: 20,
                free_inodes: 1,
                total_inodes: 2,
            }),
            alerts: vec![],
            sync: None,
            quorum: None,
            watches: None,
            consistency: None,
        };
        let text = render(&inst, false);
        assert!(text.contains("hotsync_epoch 3.0"), "{text}");
        assert!(text.contains("hotsync_role{role=\"standby\"} 1"), "{text}");
        assert!(text.contains("hotsync_role{role=\"primary\"} 0"), "{text}");
        assert!(
            text.contains("hotsync_standby_free_bytes{standby=\"/srv/standby\"} 10.0"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE hotsync_sessions_total counter"),
            "{text}"
        );
        assert!(
            text.contains("hotsync_sessions_total{standby=\"/srv/standby\",primary=\"P\"} 2"),
            "{text}"
        );
        assert!(
            text.contains(
                "hotsync_replication_lag_seconds{standby=\"/srv/standby\",primary=\"P\"} 0.25"
            ),
            "{text}"
        );
        let om = render(&inst, true);
        assert!(om.ends_with("# EOF\n"), "{om}");
    }
}
