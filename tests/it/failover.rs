//! Failover and failback through the real binaries over QUIC on loopback: promote refused
//! while the primary lives, a dead primary fenced when it returns, its late writes kept by
//! rejoin, a failback, kills during promote and rejoin, damaged state, a split brain.

use crate::helpers::*;
use std::ffi::OsString;
use std::time::{Duration, Instant};

impl Peer {
    /// `hotsync --home HOME ARGS...`.
    fn run(&self, args: &[&str]) -> Run {
        let mut a: Vec<OsString> = vec!["--home".into(), self.home.clone().into()];
        a.extend(args.iter().map(OsString::from));
        run(a)
    }

    /// `serve --root TREE --json` allowing `primary`.
    fn serve(&self, primary: &Peer) -> Server {
        Server::start_with(&self.tree, &self.home, &[&primary.id], &["--json"])
    }

    /// `watch TREE quic://... --json` to `standby`.
    fn watch(&self, standby: &Server, extra: &[&str]) -> Watch {
        let pre: Vec<OsString> = vec!["--home".into(), self.home.clone().into()];
        let mut x = vec!["--server-id", &standby.id];
        x.extend_from_slice(extra);
        Watch::start(&pre, &self.tree, standby.url().as_ref(), &x)
    }

    fn tree_arg(&self) -> &str {
        self.tree.to_str().unwrap()
    }

    fn promote(&self, extra: &[&str]) -> Run {
        let mut a = vec!["promote", "--root", self.tree_arg(), "--json"];
        a.extend_from_slice(extra);
        self.run(&a)
    }

    fn rejoin(&self) -> Run {
        self.run(&["rejoin", "--root", self.tree_arg(), "--json"])
    }
}

/// Waits until the serve of `n` has heard its primary's position, with nothing pending.
fn heard_caught_up(n: &Peer) {
    wait_for(
        "the standby to hear its primary caught up",
        Duration::from_secs(5),
        || {
            let (_, v) = status(&n.home);
            let p = &v["instances"][0]["primaries"][0];
            (p["pending_changes"] == 0 && p["position"]["seq"].as_u64() >= Some(1)).then_some(())
        },
    );
}

/// The paths a `rejoin --json` report kept aside.
fn diverged_paths(j: &serde_json::Value) -> Vec<&str> {
    j["diverged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["path"].as_str().unwrap())
        .collect()
}

/// Waits until `w` has exited; its exit code.
fn exited(w: &mut Watch, limit: Duration) -> i32 {
    let start = std::time::Instant::now();
    loop {
        if let Some(s) = w.child.try_wait().unwrap() {
            return s.code().unwrap_or(-1);
        }
        assert!(
            start.elapsed() < limit,
            "the watch still runs after {limit:?}:\n{}",
            w.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `s` has reported event `name`.
fn server_event(s: &Server, name: &str) -> serde_json::Value {
    wait_for(name, Duration::from_secs(10), || {
        s.events
            .lock()
            .unwrap()
            .iter()
            .find(|e| e["event"] == name)
            .cloned()
    })
}

/// Files to replicate, then a pause: rejoin counts changes within a margin of the last
/// confirmation as unconfirmed, and these are meant to be confirmed.
fn seed(n: &Peer) {
    for i in 0..30 {
        write(&n.tree.join(format!("d{}/f{i}", i % 3)), &noise(3000, i));
    }
    write(&n.tree.join("keep.txt"), b"version 1\n");
    std::thread::sleep(Duration::from_millis(2500));
}

#[test]
fn failover_fences_the_old_primary_and_failback_keeps_what_it_wrote_late() {
    let base = tempfile::tempdir().unwrap();
    let base = base.path();
    let a = Peer::new(base, "a");
    let b = Peer::new(base, "b");
    seed(&a);
    let (hook_script, hook_log) = hook(base);
    let hook_script = hook_script.to_str().unwrap().to_string();
    let on_alert = ["--on-alert", hook_script.as_str()];

    // A replicates to B.
    let sb = b.serve(&a);
    let mut wa = a.watch(&sb, &on_alert);
    wa.wait_ready();
    converge(&a.tree, &b.tree, Duration::from_secs(20));

    // Promotion while A heartbeats is refused, and changes nothing.
    let r = b.promote(&[]);
    assert_eq!(r.code, 2, "{}", r.stdout);
    assert!(
        r.stderr.contains("still connected and heartbeating"),
        "{}",
        r.stderr
    );
    assert_eq!(b.state()["role"], "standby");

    // A dies. Its last writes made it (and B heard of the position); B is promoted once A
    // has stopped heartbeating.
    write(&a.tree.join("d0/last-before-death"), b"made it");
    converge(&a.tree, &b.tree, Duration::from_secs(10));
    heard_caught_up(&b);
    wa.child.kill().unwrap();
    wa.child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(2200));
    let r = b.promote(&[]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let p = r.json();
    assert_eq!(
        (p["epoch"].as_u64(), p["previous_epoch"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(p["already"], false);
    assert!(p["position"]["seq"].as_u64().unwrap() >= 1, "{p}");
    assert_eq!(
        p["primary_last_pending"], 0,
        "A had nothing pending: nothing lost: {p}"
    );
    assert!(p["newest_change_age_seconds"].as_f64().is_some(), "{p}");
    // Nothing pending when last heard (about 2.2 s ago), so what may be missing is what A
    // did since that heartbeat: the RPO is its age.
    let (lag, rpo) = (
        p["primary_last_lag_seconds"].as_f64().unwrap(),
        p["rpo_seconds"].as_f64().unwrap(),
    );
    assert!(lag < 0.5 && (2.0..6.0).contains(&rpo), "{p}");
    assert_eq!(server_event(&sb, "promoted")["epoch"], 2);
    let st = b.state();
    assert_eq!(
        (st["role"].as_str(), st["epoch"].as_u64()),
        (Some("primary"), Some(2))
    );
    assert_eq!(st["history"][1]["primary"], b.id);
    // The running serve says so too.
    let (_, v) = status(&b.home);
    let me = &v["instances"][0];
    assert_eq!(
        (me["role"].as_str(), me["epoch"].as_u64()),
        (Some("primary"), Some(2)),
        "{v}"
    );
    // Twice is the same as once (Keepalived may run it again).
    let again = b.promote(&[]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(
        (
            again.json()["already"].as_bool(),
            again.json()["epoch"].as_u64()
        ),
        (Some(true), Some(2))
    );

    // A comes back with its old watch: refused, fenced, nothing written; it exits 2.
    write(&a.tree.join("late.txt"), b"written after the failover\n");
    write(&a.tree.join("keep.txt"), b"version 2, after the failover\n");
    let before = snapshot(&b.tree);
    let mut wa = a.watch(&sb, &on_alert);
    assert_eq!(exited(&mut wa, Duration::from_secs(15)), 2, "{}", wa.log());
    assert!(wa.log().contains("fenced"), "{}", wa.log());
    let fenced = wa.of("fenced");
    assert_eq!(fenced.len(), 1, "{:?}", wa.events.lock().unwrap());
    assert!(fenced[0]["ts"].as_str().is_some());
    let hooked = hook_lines(&hook_log, "fenced");
    assert_eq!(
        hooked.len(),
        1,
        "the hook ran with HOTSYNC_ALERT=fenced: {hooked:?}"
    );
    let after = snapshot(&b.tree);
    assert_eq!(before.len(), after.len());
    assert!(
        !b.tree.join("late.txt").exists(),
        "a fenced primary wrote nothing"
    );
    assert!(a.state()["fenced"].is_object(), "{}", a.state());
    // Even at start now: the fence is on record.
    let mut wa2 = a.watch(&sb, &[]);
    assert_eq!(exited(&mut wa2, Duration::from_secs(10)), 2);

    // B is the primary now; A rejoins as its standby, keeping what it wrote late.
    let r = a.rejoin();
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let j = r.json();
    let diverged = diverged_paths(&j);
    assert!(
        diverged.contains(&"late.txt") && diverged.contains(&"keep.txt"),
        "{j}"
    );
    let kept = a.tree.join(".hotsync/diverged/1");
    assert_eq!(
        std::fs::read(kept.join("late.txt")).unwrap(),
        b"written after the failover\n"
    );
    assert_eq!(
        std::fs::read(kept.join("keep.txt")).unwrap(),
        b"version 2, after the failover\n"
    );
    assert_eq!(a.state()["role"], "standby");
    drop(sb); // B's serve goes; B keeps its tree as the new primary.
    let sa = a.serve(&b);
    let mut wb = b.watch(&sa, &[]);
    wb.wait_ready();
    converge(&b.tree, &a.tree, Duration::from_secs(20));
    // Reconciled by delta: only what differed travelled.
    let first = wb.of("replicated")[0].clone();
    assert!(first["files_transferred"].as_u64().unwrap() <= 3, "{first}");
    assert_eq!(a.state()["epoch"], 2);
    assert_eq!(
        std::fs::read(a.tree.join("keep.txt")).unwrap(),
        b"version 1\n"
    );

    // Failback: A becomes the primary again (epoch 3), B rejoins through its own serve.
    write(&b.tree.join("written-on-b"), b"while b was primary\n");
    converge(&b.tree, &a.tree, Duration::from_secs(10));
    assert_eq!(wb.stop(Duration::from_secs(3)).code(), Some(0));
    let r = a.promote(&[]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(r.json()["epoch"], 3);
    let sb = b.serve(&a);
    let r = b.rejoin();
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let mut wa = a.watch(&sb, &[]);
    wa.wait_ready();
    write(&a.tree.join("after-failback"), b"a again\n");
    converge(&a.tree, &b.tree, Duration::from_secs(20));
    assert_eq!(
        (a.state()["role"].as_str(), a.state()["epoch"].as_u64()),
        (Some("primary"), Some(3))
    );
    assert_eq!(
        (b.state()["role"].as_str(), b.state()["epoch"].as_u64()),
        (Some("standby"), Some(3))
    );
    assert_eq!(
        std::fs::read(b.tree.join("written-on-b")).unwrap(),
        b"while b was primary\n"
    );
    assert_eq!(wa.stop(Duration::from_secs(3)).code(), Some(0));
    drop(sa);
}

#[test]
fn kill_9_during_promote_or_rejoin_leaves_the_old_or_the_new_epoch() {
    let base = tempfile::tempdir().unwrap();
    let base = base.path();
    let a = Peer::new(base, "a");
    let b = Peer::new(base, "b");
    seed(&a);
    // B: a standby of A at epoch 1 (through a one-off sync and its serve).
    let sb = b.serve(&a);
    let r = a.run(&["sync", a.tree_arg(), &sb.url(), "--server-id", &sb.id]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    drop(sb);
    let epoch_of = |n: &Peer| -> (String, u64) {
        let st = n.state();
        (
            st["role"].as_str().unwrap().into(),
            st["epoch"].as_u64().unwrap(),
        )
    };
    // Promote on the tree itself (no serve), killed at varied moments.
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..20u64 {
        let mut c = hotsync(false)
            .args(["--home".as_ref(), b.home.as_os_str()])
            .args(["promote", "--root", b.tree_arg()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(300 * i));
        let _ = c.kill();
        let _ = c.wait();
        let (role, epoch) = epoch_of(&b);
        assert!(
            (role == "standby" && epoch == 1) || (role == "primary" && epoch == 2),
            "a mix: {role} at epoch {epoch}"
        );
        seen.insert((role, epoch));
    }
    let r = b.promote(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(epoch_of(&b), ("primary".into(), 2));
    println!("promote killed 20 times; states seen: {seen:?}");

    // Rejoin of a former primary with many late files, killed mid-way, then run again. Its
    // record says its standby confirmed everything before 1970-01-01T00:00:01Z: all of it
    // is late.
    std::fs::create_dir_all(a.tree.join(".hotsync")).unwrap();
    let st = serde_json::json!({"format": 1, "role": "primary", "epoch": 1,
        "history": [{"epoch": 1, "primary": null, "started": "2026-12-01T00:00:00.000Z",
                     "last_acked": {"epoch": 1, "seq": 5}}],
        "position": {"epoch": 1, "seq": 5}, "acked_before_ms": 1000, "fenced": null,
        "updated": "2026-12-01T00:00:00.000Z"});
    std::fs::write(
        a.tree.join(".hotsync/state"),
        serde_json::to_vec(&st).unwrap(),
    )
    .unwrap();
    for i in 0..3000 {
        write(&a.tree.join(format!("late/l{i:04}")), b"late");
    }
    let files: Vec<Vec<u8>> = snapshot(&a.tree)
        .into_iter()
        .filter(|(_, n)| matches!(n.kind, Kind::File(_)))
        .map(|(p, _)| p)
        .collect();
    let mut c = hotsync(false)
        .args(["--home".as_ref(), a.home.as_os_str()])
        .args(["rejoin", "--root", a.tree_arg()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(40));
    let _ = c.kill();
    let _ = c.wait();
    let (role, epoch) = epoch_of(&a);
    assert_eq!(epoch, 1);
    assert!(role == "primary" || role == "standby");
    let r = a.rejoin();
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(epoch_of(&a), ("standby".into(), 1));
    // Nothing lost: every file is in the tree or kept aside; here, all aside.
    let kept = a.tree.join(".hotsync/diverged/1");
    for f in &files {
        assert!(
            p(&kept, f).exists() || p(&a.tree, f).exists(),
            "lost {:?}",
            String::from_utf8_lossy(f)
        );
        assert!(
            !p(&a.tree, f).exists(),
            "{:?} left in place",
            String::from_utf8_lossy(f)
        );
    }
    let listed = std::fs::read_to_string(kept.join("diverged.json")).unwrap();
    assert!(listed.contains("late/l2999") && listed.contains("late/l0000"));
}

#[test]
fn a_torn_or_garbage_state_file_is_a_clear_error_everywhere() {
    let base = tempfile::tempdir().unwrap();
    let base = base.path();
    let a = Peer::new(base, "a");
    let b = Peer::new(base, "b");
    seed(&a);
    for (what, bytes) in [
        ("torn", &b"{\"format\": 1, \"role\": \"sta"[..]),
        ("garbage", b"\x00\x01 not json at all"),
        ("unknown", b"{\"format\": 7}"),
    ] {
        std::fs::create_dir_all(b.tree.join(".hotsync")).unwrap();
        std::fs::write(b.tree.join(".hotsync/state"), bytes).unwrap();
        let r = b.run(&[
            "serve",
            "--root",
            b.tree_arg(),
            "--allow",
            &a.id,
            "--listen",
            "127.0.0.1:0",
        ]);
        assert_eq!(r.code, 2, "{what}: {}", r.stderr);
        assert!(r.stderr.contains(".hotsync/state"), "{what}: {}", r.stderr);
        assert_eq!(r.stderr.trim().lines().count(), 1, "{what}: {}", r.stderr);
        let r = b.promote(&[]);
        assert_eq!(r.code, 2, "{what}: {}", r.stderr);
        assert!(r.stderr.contains(".hotsync/state"), "{what}: {}", r.stderr);
        // As a source too.
        std::fs::create_dir_all(a.tree.join(".hotsync")).unwrap();
        std::fs::write(a.tree.join(".hotsync/state"), bytes).unwrap();
        let r = a.run(&["sync", a.tree_arg(), b.tree_arg()]);
        assert_eq!(r.code, 2, "{what}: {}", r.stderr);
        assert!(r.stderr.contains(".hotsync/state"), "{what}: {}", r.stderr);
        std::fs::remove_file(a.tree.join(".hotsync/state")).unwrap();
    }
}

#[test]
fn two_primaries_of_one_epoch_are_refused_until_one_is_rejoined() {
    let base = tempfile::tempdir().unwrap();
    let base = base.path();
    let a = Peer::new(base, "a");
    let b = Peer::new(base, "b");
    let c = Peer::new(base, "c");
    seed(&a);
    // B and C: both standbys of A at epoch 1; both promoted to epoch 2 (A gone, and two
    // operators each promoted one).
    for n in [&b, &c] {
        let s = n.serve(&a);
        let r = a.run(&["sync", a.tree_arg(), &s.url(), "--server-id", &s.id]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        drop(s);
        let r = n.promote(&[]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    write(&c.tree.join("only-on-c"), b"c's write in epoch 2");
    // B's watch to C's serve: a split brain, refused; the watch exits 2 saying so.
    let sc = c.serve(&b);
    let mut wb = b.watch(&sc, &[]);
    assert_eq!(exited(&mut wb, Duration::from_secs(15)), 2, "{}", wb.log());
    assert!(wb.log().contains("split brain"), "{}", wb.log());
    let ended = server_event(&sc, "session");
    assert!(
        ended["error"]
            .as_str()
            .unwrap_or("")
            .contains("split brain"),
        "{ended}"
    );
    assert!(c.tree.join("only-on-c").exists(), "nothing was overwritten");
    // The operator discards C's side: C rejoins (through its serve), B then writes it.
    let r = c.rejoin();
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        r.json()["diverged"].to_string().contains("only-on-c"),
        "{}",
        r.stdout
    );
    let mut wb = b.watch(&sc, &[]);
    wb.wait_ready();
    converge(&b.tree, &c.tree, Duration::from_secs(20));
    assert_eq!(wb.stop(Duration::from_secs(3)).code(), Some(0));
}

#[test]
fn check_says_which_node_is_fit_for_which_role() {
    let base = tempfile::tempdir().unwrap();
    let base = base.path();
    let a = Peer::new(base, "a");
    let b = Peer::new(base, "b");
    seed(&a);
    let check = |n: &Peer, role: &str| {
        let r = n.run(&["check", "--role", role, "--root", n.tree_arg()]);
        assert_eq!(r.stdout.trim().lines().count(), 1, "{}", r.stdout);
        (r.code, r.stdout)
    };
    assert_eq!(check(&a, "primary").0, 1, "no watch yet");
    assert_eq!(check(&b, "standby").0, 1, "no serve yet");
    let sb = b.serve(&a);
    let mut wa = a.watch(&sb, &[]);
    wa.wait_ready();
    let (code, out) = check(&a, "primary");
    assert_eq!(code, 0, "{out}");
    let (code, out) = wait_for("a healthy standby", Duration::from_secs(5), || {
        let r = check(&b, "standby");
        (r.0 == 0).then_some(r)
    });
    assert_eq!(code, 0, "{out}");
    assert_eq!(check(&b, "primary").0, 1, "a standby is not a primary");
    // The primary dies: the standby is still fit, to be promoted.
    heard_caught_up(&b);
    wa.child.kill().unwrap();
    wa.child.wait().unwrap();
    let (code, out) = wait_for("the primary gone", Duration::from_secs(15), || {
        let r = check(&b, "standby");
        r.1.contains("no primary connected").then_some(r)
    });
    assert!(out.contains("fit to be promoted"), "{out}");
    assert_eq!(code, 0, "{out}");
    drop(sb);
    let start = Instant::now();
    assert_eq!(b.promote(&[]).code, 0);
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(check(&b, "standby").0, 1);
}

#[test]
fn a_returning_primary_learns_it_was_superseded_and_only_then_rejoins_if_fenced() {
    let base = tempfile::tempdir().unwrap();
    let base = base.path();
    let a = Peer::new(base, "a");
    let b = Peer::new(base, "b");
    seed(&a);
    let check = |n: &Peer| {
        let r = n.run(&["check", "--role", "auto", "--root", n.tree_arg()]);
        assert_eq!(r.stdout.trim().lines().count(), 1, "{}", r.stdout);
        (r.code, r.stdout)
    };
    let rejoin_if_fenced = |n: &Peer| {
        let r = n.run(&["rejoin", "--root", n.tree_arg(), "--if-fenced", "--json"]);
        assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
        r.json()
    };
    let sb = b.serve(&a);
    let mut wa = a.watch(&sb, &[]);
    wa.wait_ready();
    // Keepalived runs notify_backup on the rightful primary whenever it starts: nothing
    // happens to it.
    let j = rejoin_if_fenced(&a);
    assert_eq!(j["still_primary"], true, "{j}");
    assert_eq!(a.state()["role"], "primary");
    let (code, out) = check(&a);
    assert_eq!(
        (code, out.contains("primary of epoch 1")),
        (0, true),
        "{out}"
    );

    heard_caught_up(&b);
    wa.child.kill().unwrap();
    wa.child.wait().unwrap();
    write(&a.tree.join("late.txt"), b"written while cut off\n");
    std::thread::sleep(Duration::from_millis(2200));
    assert_eq!(b.promote(&[]).code, 0);
    drop(sb);

    // A comes back as Keepalived's backup: its serve runs, it does not yet know.
    let sa = a.serve(&b);
    assert_eq!(rejoin_if_fenced(&a)["still_primary"], true);
    assert_eq!(check(&a).0, 0);
    // The new primary's watch knocks: refused (A has not rejoined), and A now knows.
    let mut wb = b.watch(&sa, &[]);
    let ev = server_event(&sa, "superseded");
    assert_eq!(ev["epoch"], 2, "{ev}");
    assert!(
        a.state()["fenced"]["reason"]
            .as_str()
            .unwrap()
            .contains("epoch 2")
    );
    assert!(!b.tree.join("late.txt").exists());
    let (code, out) = check(&a);
    assert_eq!((code, out.contains("fenced")), (1, true), "{out}");
    // Were B to die now, Keepalived's notify_master on A must not bring the stale tree back.
    let r = a.promote(&[]);
    assert_eq!(r.code, 2, "{}", r.stdout);
    assert!(r.stderr.contains("fenced former primary"), "{}", r.stderr);
    assert!(
        !r.stderr.contains("  "),
        "one well-spaced line: {:?}",
        r.stderr
    );
    // notify_fault's rejoin acts now, keeping the late write; B's watch then gets in.
    let j = rejoin_if_fenced(&a);
    assert_eq!(
        (j["still_primary"].as_bool(), j["already"].as_bool()),
        (Some(false), Some(false)),
        "{j}"
    );
    assert!(j["diverged"].to_string().contains("late.txt"), "{j}");
    converge(&b.tree, &a.tree, Duration::from_secs(20));
    assert_eq!(a.state()["epoch"], 2);
    let (code, out) = wait_for("A fit as a standby", Duration::from_secs(10), || {
        let r = check(&a);
        (r.0 == 0).then_some(r)
    });
    assert!(out.contains("standby of"), "{code} {out}");
    assert_eq!(rejoin_if_fenced(&a)["already"], true);
    assert_eq!(wb.stop(Duration::from_secs(3)).code(), Some(0));
}

/// The primary dies with its serve frozen, either before its first reconcile was
/// acknowledged (`before_first_ack`) or after it; in both a write the standby never
/// received is kept by `rejoin` under `.hotsync/diverged/` and listed, and the promoted
/// standby holds no temps.
fn failback_keeps_an_unacknowledged_write(before_first_ack: bool) {
    let base = tempfile::tempdir().unwrap();
    let base = base.path();
    let a = Peer::new(base, "a");
    let b = Peer::new(base, "b");
    for i in 0..400 {
        write(&a.tree.join(format!("d{}/f{i}", i % 10)), &noise(3000, i));
    }
    for i in 0..4 {
        write(
            &a.tree.join(format!("big/b{i}")),
            &noise(16 << 20, 1000 + i),
        );
    }
    // Written well before the watch starts: older than any margin around its start.
    write(
        &a.tree.join("early.txt"),
        b"written before the watch started\n",
    );
    std::thread::sleep(Duration::from_millis(2500));
    let sb = b.serve(&a);
    let mut wa = a.watch(&sb, &[]);
    let freeze = rustix::process::Signal::STOP;
    if before_first_ack {
        // Frozen while the first reconcile is being received (files staged, none
        // acknowledged).
        wait_for(
            "the standby to stage files",
            Duration::from_secs(30),
            || receiving(&sb, &b.tree).then_some(()),
        );
        sb.signal(freeze);
    } else {
        wa.wait_ready();
        converge(&a.tree, &b.tree, Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(2000));
        sb.signal(freeze);
    }
    write(&a.tree.join("late.txt"), b"the standby never got this\n");
    std::thread::sleep(Duration::from_millis(1000));
    wa.child.kill().unwrap();
    wa.child.wait().unwrap();
    sb.signal(rustix::process::Signal::CONT);
    let st = a.state();
    if before_first_ack {
        assert_eq!(st["position"]["seq"], 0, "{st}");
        assert!(
            st["acked_before_ms"].is_null(),
            "nothing was acknowledged, so nothing is vouched for: {st}"
        );
    }
    // B is promoted once A's heartbeats have stopped (its session may still be open).
    std::thread::sleep(Duration::from_millis(2200));
    let r = b.promote(&[]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let left = temps(&b.tree);
    assert!(left.is_empty(), "the promoted tree holds temps: {left:?}");
    drop(sb);
    let r = a.rejoin();
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let j = r.json();
    let diverged = diverged_paths(&j);
    let kept = a.tree.join(".hotsync/diverged/1");
    assert!(diverged.contains(&"late.txt"), "{j}");
    assert_eq!(
        std::fs::read(kept.join("late.txt")).unwrap(),
        b"the standby never got this\n"
    );
    if before_first_ack {
        // Nothing was confirmed: everything, the write made before the watch started
        // included, is kept (and the new primary sends the whole tree).
        assert_eq!(j["no_record"], true, "{j}");
        assert!(diverged.contains(&"early.txt"), "{j}");
        assert!(kept.join("early.txt").exists());
    } else {
        // Only what came after the acknowledged reconcile.
        assert_eq!(j["no_record"], false, "{j}");
        assert_eq!(diverged, ["late.txt"], "{j}");
        assert!(a.tree.join("early.txt").exists());
    }
    // The new primary mirrors onto A: late.txt stays kept aside.
    let sa = a.serve(&b);
    let url = sa.url();
    let mut args = vec!["sync", b.tree_arg(), &url, "--server-id", &sa.id];
    if before_first_ack {
        // B never committed anything of A's: it is empty, and says so.
        args.push("--force");
    }
    let r = b.run(&args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_same_tree(&b.tree, &a.tree);
    assert!(kept.join("late.txt").exists());
}

#[test]
fn failback_keeps_a_write_made_before_the_first_reconcile_was_acknowledged() {
    failback_keeps_an_unacknowledged_write(true);
}

#[test]
fn failback_keeps_a_write_made_after_the_first_reconcile_was_acknowledged() {
    failback_keeps_an_unacknowledged_write(false);
}
