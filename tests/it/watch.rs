//! `hotsync watch`: a real watcher and a real receiver (local and over QUIC); every trap
//! ends in a full tree comparison.

use crate::helpers::*;
use std::ffi::OsString;
use std::time::{Duration, Instant};

const CONVERGE: Duration = Duration::from_secs(20);

/// A thread appending `record(n)` to a file every `every`, without closing it, until stopped.
struct Appender {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Appender {
    fn start(path: std::path::PathBuf, every: Duration, record: fn(u64) -> Vec<u8>) -> Appender {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap();
            let mut n = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                f.write_all(&record(n)).unwrap();
                n += 1;
                std::thread::sleep(every);
            }
        });
        Appender { stop, thread }
    }

    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap();
    }
}

/// A watch of `t.src` to a local DEST or a `hotsync serve` on loopback.
struct Rig {
    t: Pair,
    watch: Watch,
    server: Option<RemoteMirror>,
}

impl Rig {
    fn new(remote: bool, setup: impl FnOnce(&Pair), extra: &[&str]) -> Rig {
        let t = Pair::new();
        setup(&t);
        let (watch, server) = if remote {
            let m = RemoteMirror::start(t.dir.path(), &t.dst);
            let pre: Vec<OsString> = vec!["--home".into(), m.primary_home.clone().into()];
            let mut x = vec!["--server-id", &m.server.id];
            x.extend_from_slice(extra);
            let w = Watch::start(&pre, &t.src, m.server.url().as_ref(), &x);
            (w, Some(m))
        } else {
            (Watch::start(&[], &t.src, t.dst.as_os_str(), extra), None)
        };
        watch.wait_ready();
        Rig { t, watch, server }
    }

    fn s(&self, rel: &str) -> std::path::PathBuf {
        self.t.s(rel)
    }

    #[track_caller]
    fn converge(&self) {
        let start = Instant::now();
        while !tree_diff(&self.t.src, &self.t.dst).is_empty() {
            if start.elapsed() > CONVERGE {
                panic!(
                    "not converged within {CONVERGE:?}:\n  {}\nwatch log:\n{}",
                    tree_diff(&self.t.src, &self.t.dst).join("\n  "),
                    self.watch.log()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Bytes sent as data by the batches after event `from`.
    fn literal_since(&self, from: usize) -> u64 {
        self.watch.events.lock().unwrap()[from..]
            .iter()
            .filter(|e| e["event"] == "replicated")
            .map(|e| e["bytes_literal"].as_u64().unwrap())
            .sum()
    }

    fn events(&self) -> usize {
        self.watch.events.lock().unwrap().len()
    }
}

fn traps(remote: bool) {
    let _g = WATCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let r = Rig::new(
        remote,
        |t| {
            write(&t.s("keep.txt"), b"keep");
            for i in 0..40 {
                write(&t.s(&format!("big-dir/f{i}")), &noise(20_000, i));
            }
            write(&t.s("renamed-file"), &noise(100_000, 99));
            // Enough else that deleting big-dir later is an ordinary delete, not a mass one.
            for i in 0..60 {
                write(&t.s(&format!("other/o{i}")), b"o");
            }
        },
        &[],
    );
    r.converge();

    // A directory created and filled faster than its watch could be added.
    std::fs::create_dir_all(r.s("fresh/a/b/c")).unwrap();
    for i in 0..30 {
        write(
            &r.s(&format!("fresh/a/b/c/f{i}")),
            format!("{i}").as_bytes(),
        );
        write(&r.s(&format!("fresh/a/g{i}")), b"g");
    }
    r.converge();

    // Renames of a file and of a whole directory arrive as renames: no data re-sent.
    let mark = r.events();
    std::fs::rename(r.s("renamed-file"), r.s("now-named")).unwrap();
    std::fs::rename(r.s("big-dir"), r.s("moved-dir")).unwrap();
    r.converge();
    assert!(
        r.literal_since(mark) < 20_000,
        "renames re-sent data: {:?}",
        &r.watch.events.lock().unwrap()[mark..]
    );
    r.watch.wait_event("renames", Duration::from_secs(5), |e| {
        e[mark..]
            .iter()
            .map(|e| e["renamed"].as_u64().unwrap_or(0))
            .sum::<u64>()
            >= 2
    });

    // Out of the tree is a delete, into it a create.
    let outside = r.t.dir.path().join("outside");
    std::fs::create_dir_all(outside.join("incoming")).unwrap();
    write(&outside.join("incoming/x"), b"from outside");
    std::fs::rename(r.s("keep.txt"), outside.join("keep.txt")).unwrap();
    std::fs::rename(outside.join("incoming"), r.s("incoming")).unwrap();
    r.converge();

    // Type changes.
    std::fs::remove_file(r.s("now-named")).unwrap();
    write(&r.s("now-named/inside"), b"was a file");
    std::fs::remove_dir_all(r.s("fresh/a/b")).unwrap();
    write(&r.s("fresh/a/b"), b"was a dir");
    symlink(b"incoming", &r.s("link"));
    r.converge();
    std::fs::remove_file(r.s("link")).unwrap();
    write(&r.s("link/now-dir"), b"was a symlink");
    r.converge();

    // Attributes only, and a whole tree deleted.
    chmod(&r.s("incoming/x"), 0o600);
    set_mtime(&r.s("fresh/a/g1"), 1_500_000_000, 7);
    std::fs::remove_dir_all(r.s("moved-dir")).unwrap();
    r.converge();
    let mut w = r.watch;
    assert_eq!(w.stop(Duration::from_secs(2)).code(), Some(0));
}

#[test]
fn local_watch_handles_every_trap() {
    traps(false);
}

#[test]
fn remote_watch_handles_every_trap() {
    traps(true);
}

/// `ln -P` while watching: a symlink (and a file) that gains names is one inode with those
/// names on the standby, a new name costs a link, not a copy, and a name removed leaves
/// the others linked.
fn links_made_while_watching(remote: bool) {
    let _g = WATCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let r = Rig::new(
        remote,
        |t| {
            write(&t.s("f"), b"target");
            symlink(b"f", &t.s("sl"));
            write(&t.s("B/big"), &noise(300_000, 1));
            write(&t.s("other"), b"o");
        },
        &[],
    );
    r.converge();
    // A symlink that had one name gains one (nothing told the watch of `sl` itself).
    hard_link(&r.s("sl"), &r.s("sl2"));
    r.converge();
    // And another, in another directory; a large file gains a name too.
    let mark = r.events();
    hard_link(&r.s("sl"), &r.s("B/sl3"));
    hard_link(&r.s("B/big"), &r.s("big-too"));
    r.converge();
    assert!(
        r.literal_since(mark) < 1000,
        "a new name was sent as a copy: {:?}",
        &r.watch.events.lock().unwrap()[mark..]
    );
    let (ino, n) = inode(&r.t.d("sl"));
    assert_eq!((n, inode(&r.t.d("B/sl3")).0), (3, ino));
    // A name removed: the others stay one inode.
    std::fs::remove_file(r.s("sl2")).unwrap();
    r.converge();
    assert_eq!(inode(&r.t.d("sl")), (ino, 2));
    let mut w = r.watch;
    assert_eq!(w.stop(Duration::from_secs(2)).code(), Some(0));
}

#[test]
fn local_watch_keeps_names_made_with_ln_one_inode() {
    links_made_while_watching(false);
}

#[test]
fn remote_watch_keeps_names_made_with_ln_one_inode() {
    links_made_while_watching(true);
}

#[test]
fn a_slow_appender_is_only_ever_seen_in_states_it_had() {
    let _g = WATCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let r = Rig::new(
        false,
        |t| write(&t.s("log"), b""),
        &["--max-delay", "200ms"],
    );
    // One whole record per write, never closing the file in between.
    let writer = Appender::start(r.s("log"), Duration::from_millis(3), |n| {
        format!("record {n:06}\n").into_bytes()
    });
    let standby = r.t.d("log");
    let start = Instant::now();
    let mut seen = 0;
    let mut last_len = 0;
    while start.elapsed() < Duration::from_secs(3) {
        if let Ok(d) = std::fs::read(&standby) {
            // Whole records, numbered from 0 without a gap: a state the primary had.
            assert!(
                d.is_empty() || d.ends_with(b"\n"),
                "a torn record on the standby"
            );
            for (i, line) in d
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .enumerate()
            {
                assert_eq!(line, format!("record {i:06}").as_bytes());
            }
            if d.len() != last_len {
                seen += 1;
                last_len = d.len();
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    writer.stop();
    assert!(
        seen >= 3,
        "the file was replicated while written only {seen} times (max delay 200 ms over 3 s)"
    );
    r.converge();
}

#[test]
fn a_standby_killed_and_restarted_while_changes_keep_coming() {
    let _g = WATCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut r = Rig::new(true, |t| write(&t.s("seed"), b"seed"), &[]);
    let src = r.t.src.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let writer = std::thread::spawn(move || {
        let mut i = 0;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            write(&src.join(format!("d{}/f{i}", i % 5)), &noise(3000, i));
            i += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        i
    });
    std::thread::sleep(Duration::from_millis(700));
    let m = r.server.as_mut().unwrap();
    let port = m.server.port;
    m.server.child.kill().unwrap();
    m.server.child.wait().unwrap();
    r.watch
        .wait_event("a disconnect", Duration::from_secs(15), |e| {
            e.iter().any(|e| e["event"] == "disconnected")
        });
    std::thread::sleep(Duration::from_millis(700));
    let pid = keygen(&m.primary_home);
    m.server = Server::start_on(&r.t.dst, &r.t.dir.path().join("server-home"), &[&pid], port);
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert!(written > 100, "{written}");
    converge(&r.t.src, &r.t.dst, Duration::from_secs(40));
    assert!(temps(&r.t.dst).is_empty());
    assert!(r.watch.of("connected").len() >= 2);
    assert_eq!(r.watch.stop(Duration::from_secs(2)).code(), Some(0));
}

#[test]
fn sigterm_stops_watch_within_two_seconds_even_mid_transfer() {
    let _g = WATCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut r = Rig::new(true, |t| write(&t.s("a"), b"a"), &[]);
    write(&r.s("huge.bin"), &noise(300 << 20, 3));
    // Let the transfer start, then ask to stop.
    let start = Instant::now();
    while temps(&r.t.dst).is_empty() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = r.watch.stop(Duration::from_secs(2));
    assert_eq!(status.code(), Some(0), "{}", r.watch.log());
    // No torn file: the big file is whole or absent.
    if let Ok(d) = std::fs::read(r.t.d("huge.bin")) {
        assert_eq!(d.len(), 300 << 20);
    }
}

#[test]
fn an_emptied_source_never_empties_the_standby() {
    let _g = WATCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let r = Rig::new(
        false,
        |t| {
            for i in 0..20 {
                write(&t.s(&format!("f{i}")), b"data");
            }
        },
        &[],
    );
    r.converge();
    // Deleting files one by one is ordinary work, until the source is left empty.
    for i in 0..20 {
        std::fs::remove_file(r.s(&format!("f{i}"))).unwrap();
    }
    r.watch.wait_event("a pause", Duration::from_secs(10), |e| {
        e.iter().any(|e| e["event"] == "paused")
    });
    std::thread::sleep(Duration::from_millis(500));
    let left = std::fs::read_dir(&r.t.dst).unwrap().count() - 1;
    assert!(left >= 1, "the standby was emptied");
    assert!(r.watch.log().contains("is empty"), "{}", r.watch.log());
    // The source has content again: replication resumes, but removing nearly all of the
    // standby still takes an explicit --force.
    write(&r.s("back"), b"back");
    let start = Instant::now();
    while !r.t.d("back").exists() {
        assert!(
            start.elapsed() < CONVERGE,
            "did not resume: {}",
            r.watch.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    r.watch
        .wait_event("a refusal", Duration::from_secs(5), |_| {
            r.watch.log().contains("--force")
        });
    let mut w = r.watch;
    assert_eq!(w.stop(Duration::from_secs(2)).code(), Some(0));
    sync_ok(&r.t.src, &r.t.dst, &["--force"]);
    assert_same_tree(&r.t.src, &r.t.dst);
}

#[test]
fn an_unmounted_source_pauses_and_resumes_when_mounted_again() {
    let _g = WATCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if !is_root() {
        return; // mounting needs root
    }
    let r = Rig::new(
        false,
        |t| {
            for i in 0..20 {
                write(&t.s(&format!("d/f{i}")), b"precious");
            }
        },
        &[],
    );
    r.converge();
    // An empty filesystem over SRC: what the watch sees when the real disk goes away.
    let src = r.t.src.to_str().unwrap().to_string();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs", &src])
        .status();
    if !mounted.is_ok_and(|s| s.success()) {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    }
    struct Unmount(String);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let guard = Unmount(src);
    r.watch.wait_event("a pause", Duration::from_secs(10), |e| {
        e.iter().any(|e| e["event"] == "paused")
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        std::fs::read_dir(r.t.d("d")).unwrap().count(),
        20,
        "nothing deleted on the standby"
    );
    drop(guard);
    // The disk is back: a change made now replicates.
    write(&r.s("d/after"), b"after");
    r.converge();
}

/// A disk mounted inside the source, unmounted under a running watch: its empty mount point
/// is not deletions the watch saw happen. The watch judges the source as a new one, and the
/// guard keeps the standby's copy.
#[test]
fn a_disk_unmounted_inside_the_source_is_kept_on_the_standby() {
    let _g = WATCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if !is_root() {
        return; // mounting needs root
    }
    let t = Pair::new();
    for i in 0..5 {
        write(&t.s(&format!("other/o{i}")), b"o");
    }
    std::fs::create_dir(t.s("data")).unwrap();
    let data = t.s("data");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(&data)
        .status();
    if !mounted.is_ok_and(|s| s.success()) {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let disk = Unmount(data);
    for i in 0..40 {
        write(&t.s(&format!("data/d{i}")), b"precious");
    }
    let w = Watch::start(&[], &t.src, t.dst.as_os_str(), &[]);
    w.wait_ready();
    converge(&t.src, &t.dst, CONVERGE);
    drop(disk);
    wait_for("the refusal", Duration::from_secs(10), || {
        w.log().contains("refusing").then_some(())
    });
    assert!(w.log().contains("mounted in SRC"), "{}", w.log());
    assert_eq!(
        std::fs::read_dir(t.d("data")).unwrap().count(),
        40,
        "the standby kept the disk's copy: {}",
        w.log()
    );
}

#[test]
fn a_replaced_source_root_pauses_then_resumes() {
    let _g = WATCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let r = Rig::new(false, |t| write(&t.s("a"), b"a"), &[]);
    r.converge();
    let old = r.t.dir.path().join("src-old");
    std::fs::rename(&r.t.src, &old).unwrap();
    std::fs::create_dir(&r.t.src).unwrap();
    r.watch.wait_event("a pause", Duration::from_secs(10), |e| {
        e.iter().any(|e| e["event"] == "paused")
    });
    assert!(
        r.t.d("a").exists(),
        "nothing deleted while the source was away"
    );
    // A new, non-empty source root at the same path: it is the primary now.
    write(&r.s("b"), b"b");
    write(&r.s("a"), b"a");
    r.converge();
}

/// Runs `git ARGS` in `repo`, which must succeed.
#[track_caller]
fn git(repo: &std::path::Path, args: &[&std::ffi::OsStr]) {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .output()
        .expect("git is installed");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `git gc` removes most of a small repository's files (its loose objects, and the
/// directories they were in): deletions the running watch saw happen, ordinary work the
/// mass-delete guard must not hold back.
#[test]
fn git_gc_under_a_watch_is_replicated_deletions_included() {
    let _g = WATCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let r = Rig::new(
        false,
        |t| {
            git(&t.src, &["init".as_ref(), "-q".as_ref()]);
            // 150 loose objects, none reachable: `gc --prune=now` removes them all.
            let loose = t.dir.path().join("loose");
            let mut args: Vec<std::ffi::OsString> = vec!["hash-object".into(), "-w".into()];
            for i in 0..150 {
                let f = loose.join(format!("o{i}"));
                write(&f, format!("object {i}").as_bytes());
                args.push(f.into());
            }
            let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
            git(&t.src, &args);
        },
        &[],
    );
    r.converge();
    let before = snapshot(&r.t.dst).len();
    git(
        &r.s(""),
        &["gc".as_ref(), "--prune=now".as_ref(), "-q".as_ref()],
    );
    r.converge();
    let after = snapshot(&r.t.dst).len();
    assert!(
        after * 2 < before,
        "gc removed most of the tree (the guard's case): {before} entries, then {after}"
    );
    assert!(!r.watch.log().contains("refusing"), "{}", r.watch.log());
}

/// A directory of 60 entries, of 88, renamed while the standby is down: the watch saw it go;
/// the reconcile on reconnect removes the old name without `--force`.
#[test]
fn a_directory_renamed_while_the_standby_is_down_is_mirrored_on_reconnect() {
    let _g = WATCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut r = Rig::new(
        true,
        |t| {
            for i in 0..59 {
                write(&t.s(&format!("big/f{i}")), b"f");
            }
            for i in 0..28 {
                write(&t.s(&format!("o{i}")), b"o");
            }
        },
        &[],
    );
    r.converge();
    assert_eq!(snapshot(&r.t.dst).len(), 89, "88 entries and the root");
    let m = r.server.as_mut().unwrap();
    let port = m.server.port;
    m.server.signal(rustix::process::Signal::TERM);
    assert!(
        m.server.wait(Duration::from_secs(5)).is_some(),
        "serve did not stop"
    );
    std::fs::rename(r.t.s("big"), r.t.s("moved")).unwrap();
    // The watch sees the rename, and cannot send it.
    r.watch
        .wait_event("a disconnect", Duration::from_secs(15), |e| {
            e.iter().any(|e| e["event"] == "disconnected")
        });
    let pid = keygen(&m.primary_home);
    m.server = Server::start_on(&r.t.dst, &r.t.dir.path().join("server-home"), &[&pid], port);
    // The reconcile after the reconnect finds the old name gone.
    converge(&r.t.src, &r.t.dst, Duration::from_secs(30));
    assert!(r.watch.of("connected").len() >= 2, "{}", r.watch.log());
    assert!(!r.watch.log().contains("refusing"), "{}", r.watch.log());
}

#[test]
fn the_inotify_watch_limit_is_named_and_periodic_rescans_fill_the_gap() {
    let _g = WATCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let sysctl = "/proc/sys/fs/inotify/max_user_watches";
    let Ok(old) = std::fs::read_to_string(sysctl) else {
        return;
    };
    if std::fs::write(sysctl, old.trim()).is_err() {
        eprintln!("skipped: {sysctl} is not writable here");
        return;
    }
    struct Restore(String);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = std::fs::write("/proc/sys/fs/inotify/max_user_watches", self.0.trim());
        }
    }
    let _restore = Restore(old);
    // Room for a few watches only (others on the machine may hold some too).
    let t = Pair::new();
    for i in 0..30 {
        write(&t.s(&format!("d{i}/f")), b"x");
    }
    std::fs::write(sysctl, "8").unwrap();
    let w = Watch::start(&[], &t.src, t.dst.as_os_str(), &["--rescan-every", "1s"]);
    w.wait_ready();
    converge(&t.src, &t.dst, CONVERGE);
    assert!(
        w.log().contains("fs.inotify.max_user_watches"),
        "{}",
        w.log()
    );
    // A change in a directory that has no watch still reaches the standby.
    write(&t.s("d29/new"), b"new");
    converge(&t.src, &t.dst, CONVERGE);
}

fn background_verify_repairs(remote: bool) {
    let _g = WATCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let r = Rig::new(
        remote,
        |t| {
            write(&t.s("data.bin"), &noise(200_000, 5));
            write(&t.s("other"), b"other");
        },
        &["--verify-every", "500ms"],
    );
    r.converge();
    // Rot on the standby that no event reports: size and mtime kept.
    let victim = r.t.d("data.bin");
    let meta = std::fs::metadata(&victim).unwrap();
    let mut d = std::fs::read(&victim).unwrap();
    d[77_777] ^= 0x80;
    std::fs::write(&victim, &d).unwrap();
    use std::os::unix::fs::MetadataExt;
    set_mtime(&victim, meta.mtime(), meta.mtime_nsec() as u32);
    r.watch
        .wait_event("a verify that repaired", Duration::from_secs(15), |e| {
            e.iter().any(|e| {
                e["event"] == "verified"
                    && e["content_differs"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|p| p == "data.bin"))
                    && e["repaired"].as_u64() >= Some(1)
            })
        });
    r.converge();
    assert!(r.watch.log().contains("data.bin"), "{}", r.watch.log());
}

#[test]
fn a_background_verify_finds_and_repairs_silent_corruption() {
    background_verify_repairs(false);
}

#[test]
fn a_background_verify_over_quic_finds_and_repairs_silent_corruption() {
    background_verify_repairs(true);
}

#[test]
fn a_background_verify_does_not_report_a_file_being_written() {
    let _g = WATCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let r = Rig::new(
        false,
        |t| write(&t.s("busy.log"), b""),
        &["--verify-every", "300ms"],
    );
    let writer = Appender::start(r.s("busy.log"), Duration::from_millis(2), |_| {
        noise(4096, 1)
    });
    r.watch
        .wait_event("several verifies", Duration::from_secs(20), |e| {
            e.iter().filter(|e| e["event"] == "verified").count() >= 4
        });
    writer.stop();
    for v in r.watch.of("verified") {
        let named = |k: &str| v[k].to_string().contains("busy.log");
        assert!(
            !named("content_differs")
                && !named("errors")
                && !named("missing")
                && !named("metadata_differs"),
            "a file being written was reported: {v}"
        );
    }
    r.converge();
}

/// A directory tree moved into the source is reconciled as that subtree alone (walked on
/// both sides, over QUIC): what the standby holds beside it is left alone, what it holds
/// inside it and the primary does not is removed.
#[test]
fn a_moved_in_tree_is_reconciled_alone() {
    let _g = WATCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let r = Rig::new(
        true,
        |t| {
            write(&t.s("keep/k"), b"k");
        },
        &[],
    );
    r.converge();
    // The standby's own files, one beside the tree to come and one inside it.
    write(&r.t.d("keep/extra"), b"standby only");
    write(&r.t.d("big/stale"), b"standby only");
    let outside = r.t.dir.path().join("outside");
    for i in 0..30 {
        write(
            &outside.join(format!("d{i}/e/f{i}")),
            format!("{i}").as_bytes(),
        );
    }
    std::fs::rename(&outside, r.s("big")).unwrap();
    let start = Instant::now();
    while !r.t.d("big/d29/e/f29").exists() || r.t.d("big/stale").exists() {
        assert!(
            start.elapsed() < CONVERGE,
            "the moved-in tree was not mirrored: {}",
            r.watch.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Everything but the standby's file beside the tree is as on the primary.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        std::fs::read(r.t.d("keep/extra")).unwrap(),
        b"standby only",
        "a reconcile of big/ touched keep/"
    );
    // Put back as it was (its removal moved keep/'s mtime on).
    std::fs::remove_file(r.t.d("keep/extra")).unwrap();
    let m = std::fs::metadata(r.s("keep")).unwrap();
    use std::os::unix::fs::MetadataExt;
    set_mtime(&r.t.d("keep"), m.mtime(), m.mtime_nsec() as u32);
    assert_same_tree(&r.t.src, &r.t.dst);
    assert!(temps(&r.t.dst).is_empty());
}

/// A watch of a tree of many directories replicates before its watch set is up, and before
/// its first reconcile is over: a change made as it starts is on the standby while
/// `status` still says the set-up is running, and one made where the first walk has
/// already been is there while that walk still goes on.
#[test]
fn a_watch_replicates_while_its_watch_set_and_first_reconcile_are_still_running() {
    let _g = WATCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let t = Pair::new();
    let home = t.dir.path().join("home");
    // 40,000 directories on both sides, so the first reconcile has nothing to copy.
    for side in [&t.src, &t.dst] {
        for i in 0..40 {
            for j in 0..1000 {
                std::fs::create_dir_all(side.join(format!("d{i:02}/{j:03}"))).unwrap();
            }
        }
    }
    std::fs::create_dir(t.dst.join(".hotsync")).ok();
    let pre: Vec<OsString> = vec!["--home".into(), home.clone().into()];
    let spawned = std::time::SystemTime::now();
    let w = Watch::start(&pre, &t.src, t.dst.as_os_str(), &[]);
    // Early in the walk (its twelfth directory of 40,042), so the first reconcile comes to
    // it while watches are still set. (A lane that had sent it once waited for the queue's
    // lock, held by a lane waiting for work, before it made it durable: on a busy machine
    // it landed only as the watch set ended.)
    write(&t.s("d00/010/new"), b"new");
    wait_for("the new file on the standby", CONVERGE, || {
        t.d("d00/010/new").exists().then_some(())
    });
    // Behind the first walk now (d00/005 comes before d00/010): copied early, not after
    // the walk.
    write(&t.s("d00/005/late"), b"late");
    wait_for("the late file on the standby", CONVERGE, || {
        t.d("d00/005/late").exists().then_some(())
    });
    // When each landed: its inode's last change, the rename that made it visible.
    let born = |rel: &str| {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(t.d(rel)).unwrap();
        std::time::UNIX_EPOCH + Duration::new(m.ctime() as u64, m.ctime_nsec() as u32)
    };
    // The set-up finishes, with every directory watched.
    let ws = wait_for("the watch set", CONVERGE, || {
        let (_, st) = status(&home);
        let ws = st["instances"][0]["watches"].clone();
        (ws["complete"] == true).then_some(ws)
    });
    assert!(
        ws["directories"].as_u64().unwrap() >= 40_041,
        "{ws}\n{}",
        w.log()
    );
    // It began after the spawn, so it ended after spawn + its length.
    let setup_over = spawned + Duration::from_secs_f64(ws["setup_seconds"].as_f64().unwrap());
    assert!(
        born("d00/010/new") < setup_over,
        "the change landed after the watch set was up ({ws})\n{}",
        w.log()
    );
    w.wait_event("the first reconcile", CONVERGE, |e| {
        e.iter().any(|e| e["event"] == "replicated")
    });
    let reconciled = w
        .events
        .lock()
        .unwrap()
        .iter()
        .find(|e| e["event"] == "replicated")
        .unwrap()["ts"]
        .as_str()
        .unwrap()
        .to_string();
    let late = hotsync::model::clock::rfc3339(born("d00/005/late"));
    assert!(
        late < reconciled,
        "the late change landed at {late}, after the first reconcile ended at {reconciled}\n{}",
        w.log()
    );
    converge(&t.src, &t.dst, CONVERGE);
}
