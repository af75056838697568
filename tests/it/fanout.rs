//! One `watch` feeding several standbys at once: a local one and two `serve`s over QUIC on
//! loopback, under a steady writer; a standby stopped (SIGSTOP) stalls nobody else and
//! catches up after, one killed and restarted catches up too.

use crate::helpers::*;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Writes a new small file every 10 ms, and appends to a log, until `stop`.
fn writer(src: PathBuf, stop: Arc<AtomicBool>) -> usize {
    use std::io::Write as _;
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        write(
            &src.join(format!("w/{:03}/f{n:05}", n / 100)),
            format!("record {n}\n").as_bytes(),
        );
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(src.join("log"))
            .unwrap();
        log.write_all(format!("{n}\n").as_bytes()).unwrap();
        n += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    n
}

/// The writer below makes new files and appends a log without pause, so the tree has no
/// consistent point after its start: the standbys keep the latest of every file, and a
/// flush needs them durable only (flushes waiting for consistent points are in
/// `consistency`).
const LATEST: [&str; 2] = ["--consistency", "latest"];

/// A primary's tree and home in a fresh directory.
struct Rig {
    dir: tempfile::TempDir,
    src: PathBuf,
    home: PathBuf,
    me: String,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let home = dir.path().join("primary-home");
        let me = keygen(&home);
        Rig { dir, src, home, me }
    }

    fn base(&self) -> &Path {
        self.dir.path()
    }

    /// A standby tree `name`, served over QUIC on loopback to this primary.
    fn serve(&self, name: &str) -> (PathBuf, Server) {
        let t = self.base().join(name);
        std::fs::create_dir_all(&t).unwrap();
        let s = Server::start_with(
            &t,
            &self.base().join(format!("{name}-home")),
            &[&self.me],
            &LATEST,
        );
        (t, s)
    }
}

/// The watch's status of each standby, by name.
fn replicas(home: &Path) -> Vec<serde_json::Value> {
    let (_, v) = status(home);
    v["instances"]
        .as_array()
        .and_then(|is| is.iter().find(|i| i["command"] == "watch"))
        .map(|w| w["replicas"].as_array().cloned().unwrap_or_default())
        .unwrap_or_default()
}

fn lag_of(rs: &[serde_json::Value], name: &str) -> f64 {
    rs.iter()
        .find(|r| r["standby"] == name)
        .and_then(|r| r["lag_seconds"].as_f64())
        .unwrap_or_else(|| panic!("no standby {name} in {rs:?}"))
}

#[test]
fn one_watch_feeds_three_standbys_and_a_stalled_one_stalls_nobody() {
    let rig = Rig::new();
    let (src, home, me) = (rig.src.clone(), rig.home.clone(), rig.me.clone());
    write(&src.join("seed/a.txt"), b"seed\n");
    let local = rig.base().join("local");
    let (t1, s1) = rig.serve("t1");
    let (t2, mut s2) = rig.serve("t2");
    let h2 = rig.base().join("t2-home");
    let (u1, u2) = (s1.url(), s2.url());
    let pre: Vec<OsString> = vec!["--home".into(), home.clone().into()];
    let w = Watch::start(
        &pre,
        &src,
        local.as_os_str(),
        // The log is written every 10 ms, so it is never quiet: it goes every --max-delay,
        // which is then the healthy standbys' lag.
        &[
            &u1,
            &u2,
            "--server-id",
            &s1.id,
            "--server-id",
            &s2.id,
            "--max-delay",
            "200ms",
            "--consistency",
            "latest",
        ],
    );
    let names = [local.display().to_string(), u1.clone(), u2.clone()];
    w.wait_event("every standby reconciled", Duration::from_secs(30), |e| {
        names.iter().all(|n| {
            e.iter()
                .any(|e| e["event"] == "replicated" && e["standby"] == n.as_str())
        })
    });
    for t in [&local, &t1, &t2] {
        converge(&src, t, Duration::from_secs(10));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let wr = {
        let (src, stop) = (src.clone(), stop.clone());
        std::thread::spawn(move || writer(src, stop))
    };
    std::thread::sleep(Duration::from_millis(500));

    // One standby frozen for 10 s (longer than the heartbeat limit): the others keep up
    // (their lag stays near the 200 ms max-delay; 1.2 s leaves room for a loaded machine).
    s1.signal(rustix::process::Signal::STOP);
    let frozen = Instant::now();
    let mut worst = [0.0f64; 2];
    let mut stalled = 0.0f64;
    let mut flushed = false;
    while frozen.elapsed() < Duration::from_secs(10) {
        if !flushed && frozen.elapsed() > Duration::from_secs(2) {
            flushed = true;
            // Two of three have everything: a quorum of 2 is met at once, all 3 is not.
            let t = Instant::now();
            let r = flush(&home, &["--quorum", "2", "--json"]);
            assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
            assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
            let j = r.json();
            assert_eq!(j["confirmed"].as_array().unwrap().len(), 2, "{j}");
            assert_eq!(j["missing"][0]["standby"], u1.as_str(), "{j}");
            let r = flush(&home, &["--timeout", "1500ms"]);
            assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
            assert!(
                r.stderr.contains("flush timed out after 1.5 s")
                    && r.stderr.contains(&format!("not confirmed: {u1} (lag")),
                "{}",
                r.stderr
            );
        }
        let rs = replicas(&home);
        worst[0] = worst[0].max(lag_of(&rs, &names[0]));
        worst[1] = worst[1].max(lag_of(&rs, &names[2]));
        stalled = stalled.max(lag_of(&rs, &names[1]));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        worst[0] < 1.2 && worst[1] < 1.2,
        "the other standbys fell behind while one was stopped: lags {worst:?}\n{}",
        w.log()
    );
    assert!(
        stalled > 5.0,
        "the stopped standby's lag shows it: {stalled}"
    );
    s1.signal(rustix::process::Signal::CONT);

    // One standby killed and started again where it was: it catches up too.
    std::thread::sleep(Duration::from_millis(500));
    let port = s2.port;
    let _ = s2.child.kill();
    let _ = s2.child.wait();
    std::thread::sleep(Duration::from_millis(500));
    let s2 = Server::start_on_with(&t2, &h2, &[&me], port, &LATEST);

    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::SeqCst);
    let written = wr.join().unwrap();
    assert!(written > 500, "the writer wrote {written} files");
    for t in [&local, &t1, &t2] {
        converge(&src, t, Duration::from_secs(30));
    }
    let rs = replicas(&home);
    assert_eq!(rs.len(), 3, "{rs:?}");
    for r in &rs {
        assert_eq!(r["connected"], true, "{r}");
    }
    drop((s1, s2));
}

#[test]
fn a_flush_right_after_a_write_returns_only_once_the_write_is_on_every_standby() {
    let rig = Rig::new();
    let (src, home) = (rig.src.clone(), rig.home.clone());
    write(&src.join("seed"), b"seed\n");

    // No watch yet: nothing to flush.
    let r = flush(&home, &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("no hotsync watch runs"), "{}", r.stderr);

    let local = rig.base().join("local");
    let (t1, s1) = rig.serve("t1");
    let (t2, s2) = rig.serve("t2");
    let pre: Vec<OsString> = vec!["--home".into(), home.clone().into()];
    let w = Watch::start(
        &pre,
        &src,
        local.as_os_str(),
        &[
            &s1.url(),
            &s2.url(),
            "--server-id",
            &s1.id,
            "--server-id",
            &s2.id,
        ],
    );
    // As soon as the watch answers (before its first reconcile is done), a flush waits
    // for the whole initial mirror.
    wait_for(
        "the watch's control socket",
        Duration::from_secs(10),
        || (!replicas(&home).is_empty()).then_some(()),
    );
    let r = flush(&home, &["--timeout", "20s"]);
    assert_eq!(r.code, 0, "{}{}\n{}", r.stdout, r.stderr, w.log());
    for t in [&local, &t1, &t2] {
        assert_eq!(std::fs::read(t.join("seed")).unwrap(), b"seed\n");
    }
    assert!(r.stdout.contains("durable on 3 of 3"), "{}", r.stdout);

    // Each write is followed at once by a flush: when it returns, every standby holds the
    // write, in place and whole. New files, rewrites of one file, and a new directory.
    for k in 0..40 {
        let (rel, body) = match k % 3 {
            0 => (format!("new/f{k}"), format!("new file {k}\n")),
            1 => ("same".to_string(), format!("version {k}\n").repeat(k + 1)),
            _ => (format!("d{k}/inner/g"), format!("fresh dir {k}\n")),
        };
        write(&src.join(&rel), body.as_bytes());
        let r = flush(&home, &["--json"]);
        assert_eq!(r.code, 0, "{}{}\n{}", r.stdout, r.stderr, w.log());
        for t in [&local, &t1, &t2] {
            let got = std::fs::read(t.join(&rel)).unwrap_or_default();
            assert_eq!(
                String::from_utf8_lossy(&got),
                body,
                "{rel} on {} when flush returned",
                t.display()
            );
        }
    }

    // A quorum the watch cannot meet is refused, as one line.
    let r = flush(&home, &["--quorum", "4"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("this watch has 3 standby(s)"),
        "{}",
        r.stderr
    );
    drop((s1, s2));
}

#[test]
fn semi_sync_degrades_when_the_quorum_is_missed_and_waits_again_once_it_is_back() {
    let rig = Rig::new();
    let (src, home) = (rig.src.clone(), rig.home.clone());
    write(&src.join("seed"), b"seed\n");
    let (t1, s1) = rig.serve("t1");
    let (t2, s2) = rig.serve("t2");
    let (script, alerts) = hook(rig.base());
    let pre: Vec<OsString> = vec!["--home".into(), home.clone().into()];
    let w = Watch::start(
        &pre,
        &src,
        s1.url().as_ref(),
        &[
            &s2.url(),
            "--server-id",
            &s1.id,
            "--server-id",
            &s2.id,
            "--sync-timeout",
            "1s",
            "--quorum",
            "2",
            "--on-alert",
            script.to_str().unwrap(),
        ],
    );
    w.wait_ready();
    wait_for(
        "the watch's control socket",
        Duration::from_secs(10),
        || (replicas(&home).len() == 2).then_some(()),
    );
    assert_eq!(flush(&home, &[]).code, 0);

    // One of the two stops: the next flush waits the sync timeout, then degrades the watch.
    s1.signal(rustix::process::Signal::STOP);
    write(&src.join("during"), b"while s1 was stopped\n");
    let t = Instant::now();
    let r = flush(&home, &["--json"]);
    let took = t.elapsed();
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    let j = r.json();
    assert_eq!(
        (j["degraded"].as_bool(), j["ok"].as_bool()),
        (Some(true), Some(false))
    );
    let (code, st) = status(&home);
    assert_eq!(code, 1, "{st}");
    assert_eq!(st["instances"][0]["sync"]["degraded"], true, "{st}");
    // Degraded: flushes do not wait.
    let t = Instant::now();
    let r = flush(&home, &[]);
    assert_eq!(r.code, 1);
    assert!(
        t.elapsed() < Duration::from_millis(800),
        "{:?}",
        t.elapsed()
    );
    assert!(
        r.stderr
            .contains("semi-synchronous replication is degraded"),
        "{}",
        r.stderr
    );
    wait_for("the sync alert", Duration::from_secs(10), || {
        hook_lines(&alerts, "sync")
            .iter()
            .any(|l| l.0 == "firing")
            .then_some(())
    });

    // Back: the quorum returns, the alert resolves, and a flush waits (and succeeds) again.
    s1.signal(rustix::process::Signal::CONT);
    wait_for("semi-sync back", Duration::from_secs(20), || {
        let (_, st) = status(&home);
        (st["instances"][0]["sync"]["degraded"] == false).then_some(())
    });
    write(&src.join("after"), b"after s1 came back\n");
    let r = flush(&home, &["--json"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(r.json()["confirmed"].as_array().unwrap().len(), 2);
    for t in [&t1, &t2] {
        assert_eq!(
            std::fs::read(t.join("after")).unwrap(),
            b"after s1 came back\n"
        );
        assert_eq!(
            std::fs::read(t.join("during")).unwrap(),
            b"while s1 was stopped\n"
        );
    }
    wait_for("the sync alert resolved", Duration::from_secs(10), || {
        hook_lines(&alerts, "sync")
            .iter()
            .any(|l| l.0 == "resolved")
            .then_some(())
    });
    drop((s1, s2));
}

#[test]
fn sync_and_verify_take_several_standbys_and_report_each() {
    let rig = Rig::new();
    let (src, home) = (rig.src.clone(), rig.home.clone());
    build_awkward(&src);
    let local = rig.base().join("local");
    let (t1, s1) = rig.serve("t1");
    let h = |args: &[&str]| {
        let mut a: Vec<OsString> = vec!["--home".into(), home.clone().into()];
        a.extend(args.iter().map(OsString::from));
        run(a)
    };
    let (srcs, locals, u1) = (src.to_str().unwrap(), local.to_str().unwrap(), s1.url());
    let r = h(&["sync", srcs, locals, &u1, "--server-id", &s1.id, "--json"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let j = r.json();
    let each = j["standbys"].as_array().unwrap();
    assert_eq!(each.len(), 2, "{j}");
    assert_eq!(each[0]["standby"], locals);
    assert_eq!(each[1]["standby"], u1.as_str());
    assert!(
        each.iter()
            .all(|s| s["files_transferred"].as_u64() > Some(0)),
        "{j}"
    );
    assert_same_tree(&src, &local);
    assert_same_tree(&src, &t1);

    // One standby drifts: verify names it, and only it.
    write(&t1.join("drifted"), b"not on the primary\n");
    let r = h(&["verify", srcs, locals, &u1, "--server-id", &s1.id, "--json"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    let j = r.json();
    let each = j["standbys"].as_array().unwrap();
    assert_eq!(each[0]["identical"], true, "{j}");
    assert_eq!(each[1]["identical"], false, "{j}");
    assert_eq!(each[1]["extra"], serde_json::json!(["drifted"]), "{j}");
    let r = h(&["verify", srcs, locals, &u1, "--server-id", &s1.id]);
    assert_eq!(r.code, 1);
    assert!(
        r.stdout.contains(&format!("{locals}:")) && r.stdout.contains(&format!("{u1}:")),
        "{}",
        r.stdout
    );

    // A standby that cannot be reached fails alone: the others are still mirrored.
    let gone = "quic://127.0.0.1:9";
    write(&src.join("new-file"), b"new\n");
    let r = h(&["sync", srcs, gone, locals, "--server-id", &s1.id, "--json"]);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    let j = r.json();
    assert!(j["standbys"][0]["error"].is_string(), "{j}");
    assert!(r.stderr.contains(gone), "{}", r.stderr);
    assert_eq!(std::fs::read(local.join("new-file")).unwrap(), b"new\n");

    // One --server-id too few is one line, before anything is done.
    let r = h(&["sync", srcs, &u1, gone]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("2 quic:// DEST(s) but 0 --server-id"),
        "{}",
        r.stderr
    );
}
