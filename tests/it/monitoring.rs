//! Replication health through the real binaries over real QUIC on loopback: `status` on
//! both sides, the lag of a stopped standby, a killed primary given up, `/metrics` checked
//! by Prometheus's own `promtool`, the alert hook, and a standby whose disk fills up.

use crate::helpers::*;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A `watch` of `t.src` to a `serve` of `t.dst`, each side with a home of its own.
struct Link2 {
    t: Pair,
    server: Server,
    watch: Watch,
    primary_home: PathBuf,
    server_home: PathBuf,
}

impl Link2 {
    fn start(setup: impl FnOnce(&Pair), watch_extra: &[&str], serve_extra: &[&str]) -> Link2 {
        let t = Pair::new();
        setup(&t);
        std::fs::create_dir_all(&t.dst).unwrap();
        Link2::on(t, watch_extra, serve_extra)
    }

    fn on(t: Pair, watch_extra: &[&str], serve_extra: &[&str]) -> Link2 {
        let primary_home = t.dir.path().join("primary-home");
        let server_home = t.dir.path().join("server-home");
        let pid = keygen(&primary_home);
        let server = Server::start_with(&t.dst, &server_home, &[&pid], serve_extra);
        let pre: Vec<OsString> = vec!["--home".into(), primary_home.clone().into()];
        let mut x = vec!["--server-id", &server.id];
        x.extend_from_slice(watch_extra);
        let watch = Watch::start(&pre, &t.src, server.url().as_ref(), &x);
        watch.wait_ready();
        Link2 {
            t,
            server,
            watch,
            primary_home,
            server_home,
        }
    }

    /// The watch's view of its one standby.
    fn replica(&self) -> (i32, serde_json::Value) {
        let (code, v) = status(&self.primary_home);
        (code, v["instances"][0]["replicas"][0].clone())
    }

    /// The serve's view of its one primary.
    fn primary(&self) -> (i32, serde_json::Value) {
        let (code, v) = status(&self.server_home);
        (code, v["instances"][0]["primaries"][0].clone())
    }
}

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn status_on_both_sides_idle_and_under_load() {
    let l = Link2::start(|t| write(&t.s("seed"), b"seed"), &[], &[]);
    let (code, v) = status(&l.primary_home);
    assert_eq!(code, 0, "{v:#}");
    let w = &v["instances"][0];
    assert_eq!(
        (w["command"].as_str(), w["role"].as_str()),
        (Some("watch"), Some("primary"))
    );
    assert_eq!(w["health"]["state"], "healthy");
    assert_eq!(w["protocol"], hotsync::wire::protocol::VERSION);
    let r = &w["replicas"][0];
    assert_eq!(r["standby"], l.server.url());
    assert_eq!(r["server_id"], l.server.id);
    assert_eq!(
        (r["state"].as_str(), r["connected"].as_bool()),
        (Some("streaming"), Some(true))
    );
    assert_eq!(f(&r["lag_seconds"]), 0.0);
    assert!(
        r["standby_space"]["free_bytes"].as_u64().unwrap() > 0,
        "{r}"
    );
    // Heartbeats arrive even though nothing changes.
    let age = wait_for("a heartbeat", Duration::from_secs(5), || {
        let (_, r) = l.replica();
        r["last_heartbeat_age_seconds"].as_f64()
    });
    assert!(age < 2.0, "{age}");

    let (code, v) = status(&l.server_home);
    assert_eq!(code, 0, "{v:#}");
    let s = &v["instances"][0];
    assert_eq!(
        (s["command"].as_str(), s["role"].as_str()),
        (Some("serve"), Some("standby"))
    );
    assert_eq!(s["node_id"], l.server.id);
    let p = &s["primaries"][0];
    assert_eq!(p["primary"], keygen(&l.primary_home));
    assert_eq!(p["connected"], true);
    // The standby learns the lag from heartbeats: caught up within one.
    let p = wait_for("the standby seeing no lag", Duration::from_secs(3), || {
        let (_, p) = l.primary();
        (p["lag_seconds"].as_f64() == Some(0.0)).then_some(p)
    });
    assert!(f(&p["last_heartbeat_age_seconds"]) < 2.0, "{p}");

    // Under load: both sides keep a live, small lag and count what moves.
    let src = l.t.src.clone();
    let writer = std::thread::spawn(move || {
        for i in 0..400u64 {
            write(&src.join(format!("load/f{i}")), &noise(2000, i));
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let mut samples = 0;
    while !writer.is_finished() {
        let (code, r) = l.replica();
        assert!(code <= 1, "{r}");
        assert_eq!(r["connected"], true, "{r}");
        assert!(f(&r["lag_seconds"]) < 5.0, "{r}");
        let (_, p) = l.primary();
        assert_eq!(p["connected"], true, "{p}");
        assert!(f(&p["last_heartbeat_age_seconds"]) < 3.0, "{p}");
        samples += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    writer.join().unwrap();
    assert!(samples >= 5, "{samples}");
    converge(&l.t.src, &l.t.dst, Duration::from_secs(20));
    let (_, r) = wait_for("the lag back at zero", Duration::from_secs(10), || {
        let (c, r) = l.replica();
        (f(&r["lag_seconds"]) == 0.0 && r["pending_changes"] == 0).then_some((c, r))
    });
    assert!(r["files_replicated"].as_u64().unwrap() >= 400, "{r}");
    assert!(r["position"]["seq"].as_u64().unwrap() >= 2, "{r}");
    // The standby hears the position at the next heartbeat.
    let p = wait_for(
        "both sides agreeing on the position",
        Duration::from_secs(3),
        || {
            let (_, p) = l.primary();
            (p["position"] == r["position"]).then_some(p)
        },
    );
    assert!(p["files_written"].as_u64().unwrap() >= 401, "{p}");
    // Every event line carries an RFC 3339 timestamp.
    for e in l.watch.events.lock().unwrap().iter() {
        let ts = e["ts"].as_str().unwrap_or_else(|| panic!("no ts: {e}"));
        assert!(
            ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
            "{ts}"
        );
    }
}

#[test]
fn lag_grows_while_the_standby_is_stopped_and_returns_to_zero_after() {
    let l = Link2::start(|t| write(&t.s("seed"), b"seed"), &[], &[]);
    l.server.signal(rustix::process::Signal::STOP);
    let stopped = Instant::now();
    write(&l.t.s("while-stopped"), b"waiting");
    let (code, r) = wait_for("a lag of 3.5 s", Duration::from_secs(8), || {
        let (c, r) = l.replica();
        (f(&r["lag_seconds"]) >= 3.5).then_some((c, r))
    });
    assert!(
        f(&r["lag_seconds"]) <= stopped.elapsed().as_secs_f64(),
        "{r}"
    );
    assert!(r["pending_changes"].as_u64().unwrap() >= 1, "{r}");
    assert!(f(&r["last_heartbeat_age_seconds"]) >= 3.0, "{r}");
    assert_eq!(code, 1, "missed heartbeats are degraded: {r}");
    l.server.signal(rustix::process::Signal::CONT);
    wait_for("the lag back at zero", Duration::from_secs(10), || {
        let (c, r) = l.replica();
        (c == 0 && f(&r["lag_seconds"]) == 0.0 && r["pending_changes"] == 0).then_some(())
    });
    assert_same_tree(&l.t.src, &l.t.dst);
}

#[test]
fn a_killed_primary_is_reported_gone_by_serve_within_the_idle_limit() {
    let mut l = Link2::start(|t| write(&t.s("seed"), b"seed"), &[], &[]);
    wait_for(
        "the primary's first heartbeat",
        Duration::from_secs(5),
        || l.primary().1["last_heartbeat_age_seconds"].as_f64(),
    );
    l.watch.child.kill().unwrap();
    l.watch.child.wait().unwrap();
    let killed = Instant::now();
    let p = wait_for("the primary reported gone", Duration::from_secs(15), || {
        let (_, p) = l.primary();
        (p["connected"] == false).then_some(p)
    });
    let took = killed.elapsed();
    assert!(took <= Duration::from_secs(11), "gone after {took:?}: {p}");
    assert!(
        took >= Duration::from_secs(5),
        "judged gone too fast ({took:?}): {p}"
    );
    let (code, v) = status(&l.server_home);
    assert_eq!(code, 1, "{v:#}");
    let reasons = v["instances"][0]["health"]["reasons"].to_string();
    assert!(reasons.contains("no primary connected"), "{reasons}");
    assert!(
        l.server.log().contains("silent"),
        "the serve log says why: {}",
        l.server.log()
    );
    // The killed watch left its socket: status cleans it up and says nothing runs.
    let (code, v) = status(&l.primary_home);
    assert_eq!(code, 2, "{v:#}");
    assert_eq!(v["instances"].as_array().unwrap().len(), 0);
    let run = l.primary_home.join("run");
    assert_eq!(std::fs::read_dir(run).unwrap().count(), 0);
}

/// Where Prometheus's own checker is; CI installs it (Debian package `prometheus`).
fn promtool() -> Option<PathBuf> {
    let found = Command::new("promtool").arg("--version").output().is_ok();
    if !found {
        println!("SKIPPED: promtool is not installed (Debian package prometheus); CI runs this");
    }
    found.then(|| PathBuf::from("promtool"))
}

fn promtool_check(tool: &Path, args: &[&str], stdin: Option<&str>) {
    use std::io::Write;
    let mut c = Command::new(tool)
        .arg("check")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(s) = stdin {
        c.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    drop(c.stdin.take());
    let out = c.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool check {args:?}: {said}");
    if args[0] == "metrics" {
        // A lint finding is printed even when the exit code is 0.
        assert!(said.trim().is_empty(), "promtool check metrics: {said}");
    }
}

#[test]
fn metrics_are_valid_prometheus_and_so_are_the_shipped_rules() {
    let Some(tool) = promtool() else { return };
    let l = Link2::start(
        |t| write(&t.s("seed"), b"seed"),
        &["--metrics", "127.0.0.1:0"],
        &["--metrics", "127.0.0.1:0"],
    );
    let watch_at = metrics_addr(|| l.watch.log());
    let serve_at = metrics_addr(|| l.server.log());
    wait_for("a heartbeat both ways", Duration::from_secs(5), || {
        l.primary().1["last_heartbeat_age_seconds"].as_f64()?;
        l.replica().1["last_heartbeat_age_seconds"].as_f64()
    });
    for (at, must) in [
        (
            &watch_at,
            &[
                "hotsync_replication_lag_seconds{standby=",
                "hotsync_standby_connected{standby=",
                "hotsync_pending_changes{",
                "hotsync_heartbeat_age_seconds{",
                "hotsync_replicated_files_total{",
                "hotsync_replicated_bytes_total{",
                "hotsync_reconnects_total{",
                "hotsync_standby_free_bytes{",
                "hotsync_epoch 1",
            ][..],
        ),
        (
            &serve_at,
            &[
                "hotsync_standby_connected{standby=",
                "hotsync_replication_lag_seconds{standby=",
                "primary=",
                "hotsync_standby_free_bytes{",
                "hotsync_sessions_total{",
            ][..],
        ),
    ] {
        let (status_line, body) = http_get(at, "/metrics", None);
        assert!(status_line.contains("200"), "{status_line}");
        for m in must {
            assert!(body.contains(m), "{m} missing at {at}:\n{body}");
        }
        promtool_check(&tool, &["metrics"], Some(&body));
        let (_, om) = http_get(at, "/metrics", Some("application/openmetrics-text"));
        assert!(om.ends_with("# EOF\n"), "{om}");
        let (nf, _) = http_get(at, "/nowhere", None);
        assert!(nf.contains("404"), "{nf}");
    }
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/prometheus");
    promtool_check(
        &tool,
        &["rules", ex.join("hotsync-alerts.yml").to_str().unwrap()],
        None,
    );
    promtool_check(
        &tool,
        &["config", ex.join("prometheus.yml").to_str().unwrap()],
        None,
    );
}

#[test]
fn the_alert_hook_fires_once_and_clears_once_on_a_lag_threshold() {
    let t = Pair::new();
    write(&t.s("seed"), b"seed");
    std::fs::create_dir_all(&t.dst).unwrap();
    let (script, log) = hook(t.dir.path());
    let script = script.to_str().unwrap().to_string();
    let l = Link2::on(t, &["--alert-lag", "1s", "--on-alert", &script], &[]);
    l.server.signal(rustix::process::Signal::STOP);
    write(&l.t.s("late"), b"late");
    let fired = wait_for("the lag alert", Duration::from_secs(9), || {
        let v = hook_lines(&log, "lag");
        (!v.is_empty()).then_some(v)
    });
    assert_eq!(fired[0].0, "firing");
    assert!(
        fired[0].1.trim_end_matches('s').parse::<f64>().unwrap() > 1.0,
        "{fired:?}"
    );
    assert_eq!(fired[0].2, l.server.url());
    let (code, v) = status(&l.primary_home);
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(v["instances"][0]["alerts"][0]["alert"], "lag", "{v:#}");
    l.server.signal(rustix::process::Signal::CONT);
    let all = wait_for("the lag alert cleared", Duration::from_secs(10), || {
        let v = hook_lines(&log, "lag");
        (v.len() >= 2).then_some(v)
    });
    // Held, not flapping: exactly one of each, the standby replicated meanwhile.
    std::thread::sleep(Duration::from_secs(4));
    let all2 = hook_lines(&log, "lag");
    assert_eq!(all2.len(), 2, "{all2:?}");
    assert_eq!(
        (all[0].0.as_str(), all[1].0.as_str()),
        ("firing", "resolved")
    );
    let events: Vec<_> = l
        .watch
        .of("alert")
        .into_iter()
        .filter(|e| e["alert"] == "lag")
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_same_tree(&l.t.src, &l.t.dst);
    assert_eq!(status(&l.primary_home).0, 0);
}

#[test]
fn a_full_standby_disk_keeps_changes_queued_and_resumes_when_space_returns() {
    let Some(fs) = Tmpfs::mount("16m") else {
        return;
    };
    // The standby's root on the small disk, most of it taken by ballast.
    let t = fs.pair();
    let ballast = fs.path.join("ballast");
    std::fs::write(&ballast, vec![1u8; 12 << 20]).unwrap();
    for i in 0..20 {
        write(&t.s(&format!("small/f{i}")), &noise(1000, i));
    }
    let v1 = noise(100_000, 1);
    write(&t.s("grows"), &v1);
    let (script, log) = hook(t.dir.path());
    let script = script.to_str().unwrap().to_string();
    let l = Link2::on(t, &["--alert-free", "50", "--on-alert", &script], &[]);
    converge(&l.t.src, &l.t.dst, Duration::from_secs(20));

    // Changes that do not fit: a big new file, and a file that grows past what is left.
    let big = noise(6 << 20, 2);
    let v2 = noise(5 << 20, 3);
    write(&l.t.s("big.bin"), &big);
    write(&l.t.s("grows"), &v2);
    write(&l.t.s("small/after"), b"small change");
    // A sampler: no file on the standby is ever anything but a version the primary had.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (stop, dst) = (stop.clone(), l.t.dst.clone());
        let (big, v1, v2) = (big.clone(), v1.clone(), v2.clone());
        std::thread::spawn(move || {
            let mut samples = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(d) = std::fs::read(dst.join("big.bin")) {
                    assert!(d == big, "big.bin torn on the standby ({} bytes)", d.len());
                }
                if let Ok(d) = std::fs::read(dst.join("grows")) {
                    assert!(
                        d == v1 || d == v2,
                        "grows torn on the standby ({} bytes)",
                        d.len()
                    );
                }
                samples += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            samples
        })
    };
    let full = wait_for("a standby_full event", Duration::from_secs(15), || {
        l.watch.of("standby_full").into_iter().next()
    });
    let why = full["error"].as_str().unwrap();
    assert!(
        why.contains(&l.server.url()) && why.contains("full") && why.contains("free of"),
        "the message names the standby and its free space: {why}"
    );
    wait_for("the disk_full alert", Duration::from_secs(10), || {
        let v = hook_lines(&log, "disk_full");
        (!v.is_empty()).then_some(())
    });
    // Fired in the same pass as disk_full, its hook runs just after: wait for it too.
    wait_for(
        "the free alert (free space under 50%)",
        Duration::from_secs(10),
        || (!hook_lines(&log, "free").is_empty()).then_some(()),
    );
    let (code, r) = l.replica();
    assert_eq!(code, 1, "{r}");
    assert!(
        r["pending_changes"].as_u64().unwrap() >= 1,
        "kept queued: {r}"
    );
    assert_eq!(r["standby_full"], true, "{r}");
    // Space returns: replication resumes by itself.
    std::fs::remove_file(&ballast).unwrap();
    converge(&l.t.src, &l.t.dst, Duration::from_secs(30));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(sampler.join().unwrap() > 10);
    wait_for(
        "the disk_full alert resolved",
        Duration::from_secs(10),
        || {
            let v = hook_lines(&log, "disk_full");
            (v.iter().any(|x| x.0 == "resolved")).then_some(())
        },
    );
    assert!(temps(&l.t.dst).is_empty(), "{:?}", temps(&l.t.dst));
    let mut w = l.watch;
    assert_eq!(
        w.stop(Duration::from_secs(3)).code(),
        Some(0),
        "{}",
        w.log()
    );
}

/// A file rewritten in place every 5 ms (a database's log) never holds still for a whole
/// send: it still reaches the standby within a bound (a snapshot of one moment), never
/// torn, and the lag reported is never less than the age of what the standby holds.
#[test]
fn the_lag_counts_a_file_that_never_holds_still_and_the_standby_keeps_up() {
    const SIZE: usize = 512 << 10;
    const BLOCK: usize = 4096;
    let l = Link2::start(|t| write(&t.s("seed"), b"seed"), &[], &[]);
    let wal = l.t.s("wal");
    // Each version: every block starts with its sequence number; the writer keeps when
    // each version was written (wall clock, ms).
    let version = |seq: u64| {
        let mut v = vec![(seq % 251) as u8; SIZE];
        for b in v.chunks_mut(BLOCK) {
            b[..8].copy_from_slice(&seq.to_le_bytes());
        }
        v
    };
    write(&wal, &version(0));
    let written: std::sync::Arc<std::sync::Mutex<Vec<u128>>> = Default::default();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    };
    let writer = {
        let (written, stop, wal) = (written.clone(), stop.clone(), wal.clone());
        std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&wal).unwrap();
            let mut seq = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                seq += 1;
                f.write_all_at(&version(seq), 0).unwrap();
                written.lock().unwrap().push(now_ms());
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let start = Instant::now();
    let mut worst_age = 0u128;
    let mut samples = 0;
    while start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
        let asked = now_ms();
        let (_, r) = l.replica();
        let lag_ms = (f(&r["lag_seconds"]) * 1000.0) as u128;
        let Ok(copy) = std::fs::read(l.t.d("wal")) else {
            continue;
        };
        let seq = u64::from_le_bytes(copy[..8].try_into().unwrap());
        assert!(
            copy.len() == SIZE
                && copy.chunks(BLOCK).all(|b| b[..8] == seq.to_le_bytes()
                    && b[8..].iter().all(|&x| x == (seq % 251) as u8)),
            "the standby holds a torn version"
        );
        // The standby's version stopped being the primary's when the next was written: at
        // the moment the lag was asked, what it lacks is at least that old. (The watch
        // dates a change from its event, a few ms after the write.)
        let next = written.lock().unwrap().get(seq as usize).copied();
        if let Some(next) = next
            && asked > next
        {
            let age = asked - next;
            assert!(
                lag_ms + 150 >= age,
                "lag {lag_ms} ms reported while the standby's copy was superseded {age} ms before"
            );
        }
        if start.elapsed() > Duration::from_secs(2) {
            let written_at = if seq == 0 {
                0
            } else {
                written.lock().unwrap()[seq as usize - 1]
            };
            worst_age = worst_age.max(now_ms().saturating_sub(written_at));
            samples += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    assert!(samples > 20, "{samples}");
    assert!(
        worst_age < 3000,
        "the standby's copy was {worst_age} ms old at worst: the file was never sent"
    );
    println!(
        "a file rewritten every 5 ms: {} versions, the standby's copy at most {worst_age} ms old",
        written.lock().unwrap().len()
    );
}

/// CPU time (user + system, in clock ticks) `pid` has used so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name (which may hold spaces) in parentheses; utime and
    // stime are the 14th and 15th of the whole line.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// A lasting accept error (EMFILE: every descriptor the serve may have is taken) neither
/// spins a core nor floods the log, on the metrics endpoint and the control socket: one
/// warning each, retries backing off, and serving again once descriptors are free.
#[test]
fn accept_errors_back_off_and_are_said_once() {
    use std::os::unix::process::CommandExt;
    let base = tempfile::tempdir().unwrap();
    let (root, home) = (base.path().join("root"), base.path().join("home"));
    std::fs::create_dir(&root).unwrap();
    let id = keygen(&home);
    let log = base.path().join("serve.log");
    let mut cmd = Command::new(bin());
    cmd.arg("--home")
        .arg(&home)
        .arg("serve")
        .arg("--root")
        .arg(&root);
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--allow",
        &id,
        "--metrics",
        "127.0.0.1:0",
    ]);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    // Few descriptors, soft and hard: it cannot raise its limit past them.
    let limit = rustix::process::Rlimit {
        current: Some(48),
        maximum: Some(48),
    };
    // SAFETY: setrlimit is async-signal-safe and nothing else runs in the child.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::setrlimit(rustix::process::Resource::Nofile, limit)
                .map_err(std::io::Error::from)
        });
    }
    let child = Reaped(cmd.spawn().unwrap());
    let child = &child.0;
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let at = metrics_addr(log_text);
    assert!(http_get(&at, "/metrics", None).0.contains("200"));
    let sock = wait_for("the control socket", Duration::from_secs(10), || {
        let s = hotsync::ops::control::run_dir(&home).join(format!("serve-{}.sock", child.id()));
        s.exists().then_some(s)
    });

    // Connections it accepts and holds, waiting for a request, until there is no
    // descriptor left; the rest wait in the listeners' backlogs.
    let mut held: Vec<std::net::TcpStream> = (0..64)
        .map(|_| std::net::TcpStream::connect(&at).unwrap())
        .collect();
    wait_for(
        "the metrics endpoint's warning",
        Duration::from_secs(10),
        || {
            log_text()
                .contains("metrics endpoint: cannot accept a connection")
                .then_some(())
        },
    );
    let waiting: Vec<std::os::unix::net::UnixStream> = (0..4)
        .map(|_| std::os::unix::net::UnixStream::connect(&sock).unwrap())
        .collect();
    wait_for(
        "the control socket's warning",
        Duration::from_secs(10),
        || {
            log_text()
                .contains("control socket: cannot accept a connection")
                .then_some(())
        },
    );
    // While the error lasts: nearly idle (a retry at once would take a whole core), and
    // said once each.
    let before = cpu_ticks(child.id());
    std::thread::sleep(Duration::from_millis(1500));
    let used = cpu_ticks(child.id()) - before;
    assert!(
        used < 40,
        "{used} ticks of CPU in 1.5 s while accepting failed"
    );
    let text = log_text();
    assert_eq!(text.matches("cannot accept").count(), 2, "{text}");
    assert!(text.contains("Too many open files"), "{text}");

    // Descriptors freed: both accept again, and say so once.
    held.clear();
    drop(waiting);
    wait_for("accepting again", Duration::from_secs(10), || {
        let t = log_text();
        (t.contains("metrics endpoint: accepting connections again")
            && t.contains("control socket: accepting connections again"))
        .then_some(())
    });
    assert!(http_get(&at, "/metrics", None).0.contains("200"));
    // The control socket answers (degraded: no primary is connected).
    let (_, v) = status(&home);
    assert_eq!(v["instances"][0]["pid"], child.id(), "{v}");
}

/// A child process, killed and reaped when dropped (a failed assertion included).
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
