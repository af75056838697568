//! Safety rules: nothing escapes the standby root, no standby is wiped by an empty or
//! half-missing source, and every user error is one clear line with exit 2.

use crate::helpers::*;
use std::ffi::OsStr;

fn sync_args<'a>(t: &'a Pair, extra: &[&'a str]) -> Vec<&'a OsStr> {
    let mut a: Vec<&OsStr> = vec!["sync".as_ref(), t.src.as_os_str(), t.dst.as_os_str()];
    a.extend(extra.iter().map(|s| OsStr::new(*s)));
    a
}

#[test]
fn symlinks_on_the_standby_are_replaced_never_followed() {
    let t = Pair::new();
    let outside = t.dir.path().join("outside");
    write(&outside.join("precious"), b"do not touch");
    write(&t.s("d/x"), b"x");
    write(&t.s("f"), b"f");
    write(&t.s("a/b/c"), b"c");
    write(&t.s("precious"), b"new");
    std::fs::create_dir_all(&t.dst).unwrap();
    // The standby was tampered with: names the primary uses are symlinks pointing out.
    symlink(outside.as_os_str().as_encoded_bytes(), &t.d("d"));
    symlink(
        outside.join("precious").as_os_str().as_encoded_bytes(),
        &t.d("f"),
    );
    std::fs::create_dir(t.d("a")).unwrap();
    symlink(outside.as_os_str().as_encoded_bytes(), &t.d("a/b"));
    sync_ok(&t.src, &t.dst, &[]);
    assert_same_tree(&t.src, &t.dst);
    assert_eq!(
        std::fs::read(outside.join("precious")).unwrap(),
        b"do not touch"
    );
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        1,
        "nothing was written outside"
    );
}

#[test]
fn an_empty_source_never_wipes_the_standby() {
    let t = Pair::new();
    write(&t.s("a"), b"a");
    write(&t.s("b/c"), b"c");
    sync_ok(&t.src, &t.dst, &[]);
    std::fs::remove_file(t.s("a")).unwrap();
    std::fs::remove_dir_all(t.s("b")).unwrap();
    let r = run(sync_args(&t, &[]));
    assert_eq!(r.code, 2, "{}", r.stdout);
    assert!(r.stderr.contains("is empty"), "{}", r.stderr);
    assert!(r.stderr.contains("--force"), "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "one line: {}", r.stderr);
    assert!(t.d("a").exists() && t.d("b/c").exists());
    let r = run(sync_args(&t, &["--force"]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_same_tree(&t.src, &t.dst);
}

#[test]
fn a_plan_deleting_most_of_the_standby_is_refused() {
    let t = Pair::new();
    for i in 0..40 {
        write(&t.s(&format!("f{i}")), b"x");
    }
    sync_ok(&t.src, &t.dst, &[]);
    for i in 0..30 {
        std::fs::remove_file(t.s(&format!("f{i}"))).unwrap();
    }
    write(&t.s("added"), b"new");
    let r = run(sync_args(&t, &[]));
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("removes 30 of the standby's 40")
            && r.stderr
                .contains("everything but the deletions was mirrored"),
        "{}",
        r.stderr
    );
    // Deletions go last: the refusal takes them only.
    assert_eq!(std::fs::read_dir(&t.dst).unwrap().count(), 42);
    assert_eq!(std::fs::read(t.d("added")).unwrap(), b"new");
    let r = run(sync_args(&t, &["--max-delete", "80"]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_same_tree(&t.src, &t.dst);
}

/// 13 entries, 11 of which then change type (file to directory, directory to file or
/// symlink, symlink to file or directory...), and a directory `gone` of 20 files the
/// primary then loses: the deletions trip the guard, the type changes are replacements
/// (the primary has those entries), carried out and counted. After the refusal the standby
/// holds exactly the primary's tree plus `gone`: every type, mode and mtime mirrored, the
/// new directories' and the root's included.
fn type_changes_beside_a_refused_deletion(m: &dyn Mirror, t: &Pair) {
    for f in ["f1", "f2", "f3", "f4", "keep"] {
        write(&t.s(f), f.as_bytes());
    }
    for d in ["d1/x", "d2/y", "d4/w"] {
        write(&t.s(d), d.as_bytes());
    }
    std::fs::create_dir(t.s("d3")).unwrap();
    std::fs::create_dir(t.s("keepdir")).unwrap();
    for (l, target) in [("s1", b"t1"), ("s2", b"t2"), ("s3", b"t3")] {
        symlink(target, &t.s(l));
    }
    for i in 0..20 {
        write(&t.s(&format!("gone/g{i}")), b"g");
    }
    m.sync_ok(&t.src, &[]);

    // 11 of the 13 change type; `keep` and `keepdir` stay.
    std::fs::remove_dir_all(t.s("gone")).unwrap();
    for f in ["f1", "f2", "f3", "f4", "s1", "s2", "s3"] {
        std::fs::remove_file(t.s(f)).unwrap();
    }
    for d in ["d1", "d2", "d3", "d4"] {
        std::fs::remove_dir_all(t.s(d)).unwrap();
    }
    let modes = [
        ("f1", 0o750),
        ("f2", 0o705),
        ("f4", 0o711),
        ("s1", 0o770),
        ("s3", 0o500),
    ];
    write(&t.s("f1/in"), b"in");
    write(&t.s("s1/z"), b"z");
    for (d, _) in modes {
        std::fs::create_dir_all(t.s(d)).unwrap();
    }
    write(&t.s("d1"), b"now a file");
    symlink(b"x", &t.s("d2"));
    symlink(b"y", &t.s("d3"));
    write(&t.s("d4"), b"now a file too");
    write(&t.s("s2"), b"was a symlink");
    symlink(b"q", &t.s("f3"));
    let mut stamp = 1_500_000_000;
    for (d, mode) in modes {
        chmod(&t.s(d), mode);
        stamp += 1000;
        set_mtime(&t.s(d), stamp, 7);
    }
    set_mtime(&t.src, 1_400_000_000, 9);

    let r = m.sync(&t.src, &["--json"]);
    assert_eq!(r.code, 2, "{}\n{}", r.stdout, r.stderr);
    let said = "the plan removes 21 of the standby's 37 entries, more than --max-delete 50%: \
                refusing (is part of SRC";
    let done = "use --force to remove them (everything but the deletions was mirrored, the \
                replacement of standby entries of another type included)";
    assert!(
        r.stderr.contains(said) && r.stderr.contains(done),
        "{}",
        r.stderr
    );
    assert_eq!(r.stderr.trim().lines().count(), 1, "one line: {}", r.stderr);
    let j = r.json();
    assert!(j["refused"].as_str().unwrap().ends_with(done), "{j}");
    assert_eq!(j["deletions_refused"], 21, "{j}");
    // Removed: the 9 entries a rename could not replace, and the 3 files in them.
    assert_eq!(j["files_deleted"], 12, "{j}");
    assert_eq!(j["dirs_created"], 5, "{j}");
    assert_eq!(j["symlinks_written"], 3, "{j}");
    assert_eq!(j["files_transferred"], 5, "{j}");

    // Entry by entry: the primary's tree, plus what was not deleted, and nothing else.
    let diff = tree_diff(&t.src, m.standby());
    let mut expected: Vec<String> = (0..20)
        .map(|i| format!("\"gone/g{i}\": extra on standby (file of 1 bytes)"))
        .collect();
    expected.push("\"gone\": extra on standby (Dir)".into());
    let (mut diff, mut expected) = (diff, expected);
    diff.sort();
    expected.sort();
    assert_eq!(diff, expected);
    let (a, b) = (snapshot(&t.src), snapshot(m.standby()));
    for (rel, want) in &a {
        let got = &b[rel];
        assert_eq!(got.kind, want.kind, "{rel:?}");
        assert_eq!(got.mtime, want.mtime, "{rel:?}");
        if !matches!(want.kind, Kind::Symlink(_)) {
            assert_eq!(got.mode, want.mode, "{rel:?}");
        }
    }
    assert_eq!(b[&b"f1"[..]].mode, 0o750);
    assert_eq!(b[&b""[..]].mtime, (1_400_000_000, 9));
    assert_eq!(b[&b"d2"[..]].kind, Kind::Symlink(b"x".to_vec()));

    // Asked for, the deletions go too.
    m.sync_ok(&t.src, &["--force"]);
    assert_same_tree(&t.src, m.standby());
}

#[test]
fn type_changes_are_mirrored_whole_when_the_guard_refuses_deletions() {
    let t = Pair::new();
    type_changes_beside_a_refused_deletion(&LocalMirror(t.dst.clone()), &t);
}

#[test]
fn type_changes_are_mirrored_whole_when_the_guard_refuses_deletions_over_quic() {
    let t = Pair::new();
    let m = RemoteMirror::start(t.dir.path(), &t.dst);
    type_changes_beside_a_refused_deletion(&m, &t);
}

#[test]
fn user_errors_are_one_clear_line() {
    let t = Pair::new();
    write(&t.s("a"), b"a");
    let cases: Vec<(Vec<std::ffi::OsString>, &str)> = vec![
        (
            vec![
                "sync".into(),
                t.dir.path().join("nope").into(),
                t.dst.clone().into(),
            ],
            "does not exist",
        ),
        (
            vec!["sync".into(), t.s("a").into(), t.dst.clone().into()],
            "is not a directory",
        ),
        (
            vec!["sync".into(), t.src.clone().into(), t.s("inside").into()],
            "inside SRC",
        ),
        (
            vec!["sync".into(), t.src.clone().into(), t.dir.path().into()],
            "inside DEST",
        ),
        (
            vec![
                "sync".into(),
                t.src.clone().into(),
                t.dir.path().join("x/y/z").into(),
            ],
            "parent directory does not exist",
        ),
        (
            vec!["sync".into(), t.src.clone().into(), t.s("a").into()],
            "inside SRC",
        ),
        (
            vec!["sync".into(), t.src.clone().into(), t.src.clone().into()],
            "same directory",
        ),
    ];
    for (args, needle) in cases {
        let r = run(&args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr.contains(needle),
            "{args:?}: expected {needle:?} in {}",
            r.stderr
        );
        assert_eq!(r.stderr.trim().lines().count(), 1, "{args:?}: {}", r.stderr);
    }
    let file = t.dir.path().join("plainfile");
    write(&file, b"f");
    let r = run(["sync".as_ref(), t.src.as_os_str(), file.as_os_str()]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("not a directory"), "{}", r.stderr);
}

/// rsync's `HOST:PATH`, a `HOST:PORT` without its scheme, another scheme, a `quic://`
/// without its port: one line saying what to write instead (exit 2), for each command
/// that takes a DEST and from a config file; nothing is made where a local directory of
/// that name would be. `./NAME` is the local directory.
#[test]
fn a_dest_hotsync_does_not_reach_is_one_line_saying_what_to_write() {
    let t = Pair::new();
    write(&t.s("a"), b"a");
    let base = t.dir.path();
    let home = base.join("home");
    let cases = [
        ("standby:copy", "looks like rsync's HOST:PATH"),
        ("root@standby:/srv/copy", "give quic://standby:PORT"),
        ("standby:7878", "write quic://standby:7878"),
        (
            "tcp://standby",
            "the tcp:// transport is not supported yet; use quic://HOST:PORT",
        ),
        ("rsync://standby/copy", "does not reach rsync:// standbys"),
        (
            "quic://localhost",
            "has no port: write quic://localhost:PORT",
        ),
        ("quic://localhost:http", "the port `http` is not a number"),
    ];
    let in_base = |args: &[&std::ffi::OsStr]| {
        let out = run_limited(
            hotsync(false)
                .current_dir(base)
                .arg("--home")
                .arg(&home)
                .args(args),
            std::time::Duration::from_secs(20),
        );
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let listing = || {
        let mut v: Vec<_> = std::fs::read_dir(base)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let before = listing();
    for cmd in ["sync", "watch", "verify"] {
        for (dest, says) in cases {
            let (code, err) = in_base(&[cmd.as_ref(), "src".as_ref(), dest.as_ref()]);
            assert_eq!(code, Some(2), "{cmd} {dest}: {err}");
            assert!(
                err.contains(&format!("DEST {dest}")) && err.contains(says),
                "{cmd} {dest}: expected {says:?} in {err}"
            );
            assert_eq!(err.trim().lines().count(), 1, "{cmd} {dest}: {err}");
            assert!(!err.contains("  "), "{err}");
        }
    }
    assert_eq!(listing(), before, "nothing was made");
    // From a config file: its line and key.
    let cfg = base.join("hotsync.toml");
    std::fs::write(
        &cfg,
        "source = \"src\"\n[[standby]]\nname = \"s\"\naddress = \"standby:copy\"\n",
    )
    .unwrap();
    let before = listing();
    let (code, err) = in_base(&["--config".as_ref(), cfg.as_os_str(), "sync".as_ref()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("hotsync.toml:4: address: standby:copy looks like rsync's HOST:PATH")
            && err.contains("write ./standby:copy"),
        "{err}"
    );
    assert_eq!(listing(), before, "nothing was made");
    // The local directory of that name, as the message says to write it.
    let (code, err) = in_base(&["sync".as_ref(), "src".as_ref(), "./standby:copy".as_ref()]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(std::fs::read(base.join("standby:copy/a")).unwrap(), b"a");
}

#[test]
fn an_unwritable_dest_is_refused_with_a_clear_message() {
    if !is_root() {
        return; // needs a user that cannot write where root can
    }
    let t = Pair::new();
    t.share();
    write(&t.s("a"), b"a");
    chmod(&t.src, 0o755);
    std::fs::create_dir(&t.dst).unwrap(); // root's, 0755: nobody may not write
    let r = run_as(
        true,
        ["sync".as_ref(), t.src.as_os_str(), t.dst.as_os_str()],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("not writable"), "{}", r.stderr);
}

#[test]
fn unreadable_source_entries_are_reported_and_the_rest_syncs() {
    if !is_root() {
        return; // an unprivileged reader is needed for permission errors
    }
    let t = Pair::new();
    t.share();
    chmod(&t.src, 0o755);
    write(&t.s("ok"), b"fine");
    write(&t.s("locked"), b"secret");
    write(&t.s("closed/inner"), b"inner");
    write(&t.s("big-locked"), &noise(200_000, 1));
    // First a full mirror, as root; then the primary loses read access to some entries.
    let r = run_as(
        false,
        ["sync".as_ref(), t.src.as_os_str(), t.dst.as_os_str()],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    rustix::fs::chown(
        t.dst.as_path(),
        Some(rustix::fs::Uid::from_raw(65534)),
        None,
    )
    .unwrap();
    for e in walk_paths(&t.dst) {
        let _ = rustix::fs::chownat(
            rustix::fs::CWD,
            e.as_path(),
            Some(rustix::fs::Uid::from_raw(65534)),
            Some(rustix::fs::Gid::from_raw(65534)),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        );
    }
    write(&t.s("ok"), b"fine, changed");
    write(&t.s("locked"), b"secret, changed");
    write(&t.s("big-locked"), &noise(200_001, 2));
    chmod(&t.s("locked"), 0o600);
    chmod(&t.s("big-locked"), 0o600);
    chmod(&t.s("closed"), 0o700);
    let r = run_as(
        true,
        [
            "sync".as_ref(),
            t.src.as_os_str(),
            t.dst.as_os_str(),
            "--json".as_ref(),
        ],
    );
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let j = r.json();
    let errs: Vec<String> = j["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap().to_string())
        .collect();
    for p in ["locked", "big-locked", "closed"] {
        assert!(errs.iter().any(|e| e == p), "{p} not in {errs:?}");
    }
    assert!(j["errors"].to_string().contains("ermission denied"), "{j}");
    assert_eq!(std::fs::read(t.d("ok")).unwrap(), b"fine, changed");
    // What could not be read is left as it was on the standby, not deleted.
    assert_eq!(std::fs::read(t.d("locked")).unwrap(), b"secret");
    assert_eq!(std::fs::read(t.d("closed/inner")).unwrap(), b"inner");
    // The standby ran without root: it said so, once.
    assert_eq!(
        r.stderr
            .matches("owner and group are not preserved")
            .count(),
        1,
        "{}",
        r.stderr
    );
}

fn walk_paths(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            out.push(e.path());
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    out
}
