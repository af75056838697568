//! `hotsync verify`, local and over QUIC.

use crate::helpers::*;

/// `hotsync verify SRC <standby> --json EXTRA...`, local or to the mirror's server.
pub fn verify(m: &dyn Mirror, src: &std::path::Path, extra: &[&str]) -> Run {
    let mut a = vec!["--json"];
    a.extend_from_slice(extra);
    m.verify(src, &a)
}

/// The standby of `t`: its directory, or a QUIC server for it (`remote`).
fn mirror(t: &Pair, remote: bool) -> Box<dyn Mirror> {
    if remote {
        Box::new(RemoteMirror::start(t.dir.path(), &t.dst))
    } else {
        Box::new(LocalMirror(t.dst.clone()))
    }
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn categories(remote: bool) {
    let t = Pair::new();
    build_awkward(&t.src);
    let m = &*mirror(&t, remote);
    m.sync_ok(&t.src, &[]);
    let v = verify(m, &t.src, &[]);
    assert_eq!(v.code, 0, "{}{}", v.stdout, v.stderr);
    let j = v.json();
    assert_eq!(j["identical"], true);
    assert!(j["files_checked"].as_u64().unwrap() > 40, "{j}");
    assert!(
        j["bytes_hashed"].as_u64().unwrap() >= 2 * (3 << 20),
        "both sides hashed: {j}"
    );

    // A byte flipped on the standby, size and mtime restored: only content can tell.
    let victim = t.d("dir/sub/big.bin");
    let meta = std::fs::metadata(&victim).unwrap();
    let mut data = std::fs::read(&victim).unwrap();
    data[1_234_567] ^= 0x01;
    std::fs::write(&victim, &data).unwrap();
    use std::os::unix::fs::MetadataExt;
    set_mtime(&victim, meta.mtime(), meta.mtime_nsec() as u32);
    let v = verify(m, &t.src, &[]);
    assert_eq!(v.code, 1);
    let j = v.json();
    assert_eq!(strings(&j["content_differs"]), ["dir/sub/big.bin"], "{j}");
    assert!(
        strings(&j["missing"]).is_empty()
            && strings(&j["extra"]).is_empty()
            && strings(&j["metadata_differs"]).is_empty(),
        "{j}"
    );

    // One of each other kind.
    write(&t.d("extra-file"), b"x");
    std::fs::remove_file(t.d("plain.txt")).unwrap();
    chmod(&t.d("exec"), 0o700);
    let j = verify(m, &t.src, &[]).json();
    assert_eq!(strings(&j["extra"]), ["extra-file"], "{j}");
    assert_eq!(strings(&j["missing"]), ["plain.txt"], "{j}");
    assert!(
        strings(&j["metadata_differs"]).contains(&"exec".to_string()),
        "{j}"
    );
    assert_eq!(j["identical"], false);

    // Repair fixes everything, proven by a second verify.
    let v = verify(m, &t.src, &["--repair"]);
    assert_eq!(v.code, 0, "{}{}", v.stdout, v.stderr);
    let j = v.json();
    assert_eq!(j["identical"], true, "{j}");
    assert_eq!(j["before"]["identical"], false);
    assert_same_tree(&t.src, &t.dst);
}

#[test]
fn local_verify_reports_each_category_and_repairs() {
    categories(false);
}

#[test]
fn remote_verify_reports_each_category_and_repairs() {
    categories(true);
}

/// Each shape a standby can differ in beyond entries and their content: verify reports it in
/// its category, and `--repair` makes it right.
fn blind_spots(remote: bool) {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let t = Pair::new();
    let m = &*mirror(&t, remote);
    // One file with three names, a symlink with two, two separate files alike, a sparse
    // file (4 MiB, one block of data).
    write(&t.s("a"), b"shared");
    std::fs::create_dir(t.s("sub")).unwrap();
    hard_link(&t.s("a"), &t.s("sub/b"));
    hard_link(&t.s("a"), &t.s("c"));
    symlink(b"a", &t.s("sl"));
    hard_link(&t.s("sl"), &t.s("sub/sl2"));
    write(&t.s("d"), b"alike");
    write(&t.s("e"), b"alike");
    let sparse = std::fs::File::create(t.s("sparse.img")).unwrap();
    sparse.write_all_at(&[7; 4096], 1 << 20).unwrap();
    sparse.set_len(4 << 20).unwrap();
    drop(sparse);
    for f in ["d", "e", "a"] {
        set_mtime(&t.s(f), 1_600_000_000, 0);
    }
    m.sync_ok(&t.src, &[]);
    assert_eq!(verify(m, &t.src, &[]).code, 0);
    // The standby's `rel` gets the primary's mtime back after a change made there.
    let same_time = |rel: &str| {
        let p = if rel.is_empty() {
            t.src.clone()
        } else {
            t.s(rel)
        };
        let m = std::fs::symlink_metadata(p).unwrap();
        let q = if rel.is_empty() {
            t.dst.clone()
        } else {
            t.d(rel)
        };
        set_mtime(&q, m.mtime(), m.mtime_nsec() as u32);
    };
    let check = |what: &str, category: &str, paths: &[&str], detail: &str| {
        let v = verify(m, &t.src, &[]);
        assert_eq!(v.code, 1, "{what}: {}{}", v.stdout, v.stderr);
        let j = v.json();
        let mut want: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
        want.sort();
        assert_eq!(strings(&j[category]), want, "{what}: {j}");
        for other in ["missing", "extra", "content_differs", "metadata_differs"] {
            if other != category {
                assert!(strings(&j[other]).is_empty(), "{what}: {j}");
            }
        }
        let details = j["details"].to_string();
        assert!(details.contains(detail), "{what}: {details}");
        let v = verify(m, &t.src, &["--repair"]);
        assert_eq!(v.code, 0, "{what}: {}{}", v.stdout, v.stderr);
        assert_eq!(v.json()["before"]["identical"], false);
        assert_same_tree(&t.src, &t.dst);
    };
    // A name split off its inode on the standby (a copy, alike in every attribute).
    let b = t.d("sub/b");
    std::fs::remove_file(&b).unwrap();
    write(&b, b"shared");
    same_time("sub/b");
    same_time("sub");
    check(
        "split link group",
        "metadata_differs",
        &["a", "c", "sub/b"],
        "on the primary it is one file with a, c; on the standby with no other name",
    );
    assert_eq!(inode(&t.d("sub/b")), (inode(&t.d("a")).0, 3));
    // Two separate files joined into one inode on the standby.
    std::fs::remove_file(t.d("e")).unwrap();
    hard_link(&t.d("d"), &t.d("e"));
    same_time("");
    check(
        "joined inodes",
        "metadata_differs",
        &["d", "e"],
        "on the primary it is one file with no other name; on the standby with",
    );
    assert_eq!(inode(&t.d("e")).1, 1);
    // A fifo on the standby only.
    mkfifo(&t.d("sub/fifo"));
    same_time("sub");
    check("extra fifo", "extra", &["sub/fifo"], "a fifo");
    // The sparse file made dense on the standby (its content, size and time unchanged).
    let img = t.d("sparse.img");
    let data = std::fs::read(&img).unwrap();
    std::fs::remove_file(&img).unwrap();
    write(&img, &data);
    same_time("sparse.img");
    same_time("");
    assert!(img.metadata().unwrap().blocks() * 512 >= 4 << 20);
    check(
        "dense copy",
        "metadata_differs",
        &["sparse.img"],
        "sparse on the primary",
    );
    assert!(
        img.metadata().unwrap().blocks() * 512 < 1 << 20,
        "sent again with its holes"
    );
}

#[test]
fn local_verify_sees_link_groups_specials_and_holes_and_repairs_them() {
    blind_spots(false);
}

#[test]
fn remote_verify_sees_link_groups_specials_and_holes_and_repairs_them() {
    blind_spots(true);
}

#[test]
fn verify_prints_a_summary_first_then_categories() {
    let t = Pair::new();
    write(&t.s("a"), b"a");
    write(&t.s("b"), b"b");
    sync_ok(&t.src, &t.dst, &[]);
    write(&t.d("b"), b"B!");
    let r = run(["verify".as_ref(), t.src.as_os_str(), t.dst.as_os_str()]);
    assert_eq!(r.code, 1);
    let first = r.stdout.lines().next().unwrap();
    assert!(
        first.starts_with("verify: DIFFERENT: 3 entries checked"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("content differs (1):\n  b: size 1 on the primary, 2 on the standby"),
        "{}",
        r.stdout
    );
}

#[test]
fn unreadable_entries_are_errors_and_nothing_readable_is_exit_2() {
    if !is_root() {
        return; // needs an unprivileged reader for permission errors
    }
    let t = Pair::new();
    t.share();
    chmod(&t.src, 0o755);
    write(&t.s("ok"), b"ok");
    write(&t.s("locked"), b"secret");
    sync_ok(&t.src, &t.dst, &[]);
    std::process::Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(&t.dst)
        .status()
        .unwrap();
    chmod(&t.s("locked"), 0o600);
    let v = run_as(
        true,
        [
            "verify".as_ref(),
            t.src.as_os_str(),
            t.dst.as_os_str(),
            "--json".as_ref(),
        ],
    );
    assert_eq!(v.code, 1, "{}{}", v.stdout, v.stderr);
    let j = v.json();
    let errs = j["errors"].as_array().unwrap();
    assert_eq!(errs.len(), 1, "{j}");
    assert_eq!(errs[0]["path"], "locked");
    assert!(
        errs[0]["error"]
            .as_str()
            .unwrap()
            .contains("ermission denied"),
        "{j}"
    );
    assert!(
        strings(&j["extra"]).is_empty(),
        "an unreadable file is not an extra: {j}"
    );
    // Nothing can be compared: SRC itself cannot be read.
    chmod(&t.src, 0o700);
    let v = run_as(
        true,
        ["verify".as_ref(), t.src.as_os_str(), t.dst.as_os_str()],
    );
    assert_eq!(v.code, 2, "{}{}", v.stdout, v.stderr);
    assert_eq!(v.stderr.trim().lines().count(), 1, "{}", v.stderr);
}
