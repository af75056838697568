//! Mirror semantics against a local DEST: every entry kind, every kind of edit, options.

use crate::helpers::*;
use std::path::Path;

/// Every kind of edit a primary can make, applied to a tree from [`build_awkward`].
pub fn apply_edits(src: &Path) {
    let s = |rel: &str| src.join(rel);
    write(&s("plain.txt"), b"hello, longer now\n");
    // Same size, new content, new mtime.
    let mut d = std::fs::read(s("exactly-64k")).unwrap();
    d[100] ^= 0xff;
    write(&s("exactly-64k"), &d);
    set_mtime(&s("exactly-64k"), 1_700_000_000, 1);
    // A large file with scattered edits and an append: the delta path.
    let mut big = std::fs::read(s("dir/sub/big.bin")).unwrap();
    for k in 0..3 {
        let at = 500_000 + k * 900_000;
        big[at..at + 4096].copy_from_slice(&noise(4096, 90 + k as u64));
    }
    big.extend_from_slice(&noise(10_000, 99));
    write(&s("dir/sub/big.bin"), &big);
    std::fs::remove_file(s("empty")).unwrap();
    std::fs::remove_dir_all(s("deep")).unwrap();
    // Type changes: file -> dir, dir -> file, file -> symlink, symlink -> file, dir -> symlink.
    std::fs::remove_file(s("secret")).unwrap();
    write(&s("secret/now-a-dir"), b"inside");
    std::fs::remove_dir(s("empty-dir")).unwrap();
    write(&s("empty-dir"), b"now a file");
    std::fs::remove_file(s("exec")).unwrap();
    symlink(b"plain.txt", &s("exec"));
    std::fs::remove_file(s("link-rel")).unwrap();
    write(&s("link-rel"), b"was a symlink");
    std::fs::remove_dir_all(s("private")).unwrap();
    symlink(b"/nonexistent", &s("private"));
    // A symlink retargeted, a directory renamed.
    std::fs::remove_file(s("dangling")).unwrap();
    symlink(b"plain.txt", &s("dangling"));
    std::fs::rename(s("tree-to-rename"), s("renamed-tree")).unwrap();
    // Attributes only.
    chmod(&s("with space"), 0o640);
    chmod(&s("sticky"), 0o755);
    if is_root() {
        rustix::fs::chown(
            s("owned").as_path(),
            Some(rustix::fs::Uid::from_raw(1111)),
            Some(rustix::fs::Gid::from_raw(2222)),
        )
        .unwrap();
    }
    set_mtime(&s("link-abs"), 1_650_000_000, 42);
    // Hard links: one name added, one removed.
    std::fs::hard_link(s("hard-a"), s("hard-d")).unwrap();
    std::fs::remove_file(s("hard-c")).unwrap();
    // A new file inside a read-only directory.
    chmod(&s("readonly-dir"), 0o755);
    write(&s("readonly-dir/new"), b"added");
    chmod(&s("readonly-dir"), 0o555);
    write(&p(src, b"new\xff\nname"), b"fresh");
}

pub fn every_kind_round_trips(m: &dyn Mirror, src: &Path) {
    build_awkward(src);
    let j = m.sync_ok(src, &[]);
    assert_same_tree(src, m.standby());
    assert_eq!(
        j["skipped"].as_array().unwrap().len(),
        2,
        "fifo and socket: {j}"
    );
    assert_eq!(j["errors"].as_array().unwrap().len(), 0, "{j}");
    // The hard-linked trio went over once.
    assert!(j["hard_links_made"].as_u64().unwrap() >= 2, "{j}");
    // Nothing changed: nothing is sent, nothing is touched.
    let j = m.sync_ok(src, &[]);
    assert_eq!(j["files_transferred"], 0, "{j}");
    assert_eq!(j["metadata_updated"], 0, "{j}");
    assert_eq!(j["bytes_literal"], 0, "{j}");
    assert_eq!(j["files_deleted"], 0, "{j}");
    assert_same_tree(src, m.standby());
}

pub fn edits_of_every_kind(m: &dyn Mirror, src: &Path) {
    build_awkward(src);
    m.sync_ok(src, &[]);
    apply_edits(src);
    let j = m.sync_ok(src, &[]);
    assert_same_tree(src, m.standby());
    assert_eq!(j["errors"].as_array().unwrap().len(), 0, "{j}");
    // big.bin went as a delta: most of its 3 MiB was matched on the standby.
    assert!(j["bytes_matched"].as_u64().unwrap() > 2_500_000, "{j}");
    assert!(j["bytes_literal"].as_u64().unwrap() < 1_000_000, "{j}");
    let j = m.sync_ok(src, &[]);
    assert_eq!(j["files_transferred"], 0, "converged: {j}");
    assert_eq!(j["metadata_updated"], 0, "converged: {j}");
}

/// Symlinks with several names (`ln -P`), beside a regular file's group: one inode with
/// the same names on the standby, as `rsync -H` keeps them, through every rearrangement.
pub fn hard_linked_symlinks(m: &dyn Mirror, src: &Path) {
    let s = |rel: &str| src.join(rel);
    let d = |rel: &str| m.standby().join(rel);
    write(&s("f"), b"target");
    hard_link(&s("f"), &s("f2"));
    symlink(b"f", &s("sl"));
    std::fs::create_dir(s("B")).unwrap();
    hard_link(&s("sl"), &s("sl2"));
    hard_link(&s("sl"), &s("B/sl3"));
    // A symlink linked beside its target's group, and one that stays single.
    symlink(b"f2", &s("t"));
    hard_link(&s("t"), &s("f-and-t"));
    symlink(b"f", &s("single"));
    set_mtime(&s("sl"), 1_600_000_000, 5);
    let j = m.sync_ok(src, &[]);
    assert_same_tree(src, m.standby());
    let (ino, n) = inode(&d("sl"));
    assert_eq!(n, 3, "sl, sl2, B/sl3 are one inode");
    assert_eq!(inode(&d("sl2")), (ino, 3));
    assert_eq!(inode(&d("B/sl3")), (ino, 3));
    assert_eq!(inode(&d("t")).1, 2);
    assert_eq!(j["symlinks_written"], 3, "one per inode: {j}");
    assert_eq!(j["hard_links_made"], 4, "{j}");

    // A name added, a name removed: links only, nothing written again.
    hard_link(&s("sl"), &s("B/sl4"));
    std::fs::remove_file(s("sl2")).unwrap();
    let j = m.sync_ok(src, &[]);
    assert_same_tree(src, m.standby());
    assert_eq!(inode(&d("B/sl4")), (ino, 3));
    assert_eq!(j["symlinks_written"], 0, "{j}");
    assert_eq!(
        (&j["hard_links_made"], &j["files_deleted"]),
        (&1.into(), &1.into()),
        "{j}"
    );

    // One name split off on the primary (a new symlink of the same target and time).
    std::fs::remove_file(s("B/sl4")).unwrap();
    symlink(b"f", &s("B/sl4"));
    set_mtime(&s("B/sl4"), 1_600_000_000, 5);
    m.sync_ok(src, &[]);
    assert_same_tree(src, m.standby());
    assert_eq!(inode(&d("B/sl4")).1, 1);

    // A standby an older hotsync split (three separate symlinks): joined again.
    for name in ["sl", "B/sl3"] {
        std::fs::remove_file(d(name)).unwrap();
        symlink(b"f", &d(name));
        set_mtime(&d(name), 1_600_000_000, 5);
    }
    assert!(!tree_diff(src, m.standby()).is_empty());
    let j = m.sync_ok(src, &[]);
    assert_same_tree(src, m.standby());
    assert_eq!(
        j["symlinks_written"], 0,
        "the standby's symlink is kept: {j}"
    );
    assert_eq!(j["hard_links_made"], 1, "{j}");
}

/// Special files are not mirrored, and the standby keeps none the primary lacks: extras are
/// deleted like any extra (`--no-delete`, excludes and the guard apply), one in the way of a
/// primary's entry is replaced, and one the primary has the same of is left alone.
pub fn standby_specials(m: &dyn Mirror, src: &Path) {
    let s = |rel: &str| src.join(rel);
    let d = |rel: &str| m.standby().join(rel);
    let socket = |p: &Path| drop(std::os::unix::net::UnixListener::bind(p).unwrap());
    write(&s("file-here"), b"f");
    write(&s("dir-here/x"), b"x");
    write(&s("keep"), b"k");
    mkfifo(&s("same-fifo"));
    socket(&s("sock-vs-fifo"));
    let j = m.sync_ok(src, &[]);
    assert_eq!(j["skipped"].as_array().unwrap().len(), 2, "{j}");
    // What an operator, an application or an older mirror left on the standby.
    mkfifo(&d("extra-fifo"));
    mkfifo(&d("dir-here/inner-fifo"));
    socket(&d("extra-sock"));
    mkfifo(&d("same-fifo"));
    mkfifo(&d("sock-vs-fifo"));
    mkfifo(&d("skip.me"));
    std::fs::remove_file(d("file-here")).unwrap();
    mkfifo(&d("file-here"));
    std::fs::remove_dir_all(d("dir-here")).unwrap();
    socket(&d("dir-here"));

    // Without deletions, only what is in the way of the primary's entries goes.
    let j = m.sync_ok(src, &["--no-delete", "--exclude", "skip.me"]);
    assert_eq!(std::fs::read(d("file-here")).unwrap(), b"f", "{j}");
    assert_eq!(std::fs::read(d("dir-here/x")).unwrap(), b"x");
    for kept in [
        "extra-fifo",
        "extra-sock",
        "sock-vs-fifo",
        "same-fifo",
        "skip.me",
    ] {
        assert!(d(kept).symlink_metadata().is_ok(), "{kept}: {j}");
    }
    mkfifo(&d("dir-here/inner-fifo"));
    // Then every special the primary lacks goes, but the excluded one and the primary's own.
    let j = m.sync_ok(src, &["--exclude", "skip.me"]);
    assert_eq!(j["files_deleted"], 4, "{j}");
    for gone in [
        "extra-fifo",
        "extra-sock",
        "sock-vs-fifo",
        "dir-here/inner-fifo",
    ] {
        assert!(d(gone).symlink_metadata().is_err(), "{gone}: {j}");
    }
    use std::os::unix::fs::FileTypeExt;
    assert!(
        d("same-fifo")
            .symlink_metadata()
            .unwrap()
            .file_type()
            .is_fifo()
    );
    assert!(d("skip.me").symlink_metadata().is_ok());
    std::fs::remove_file(d("skip.me")).unwrap();
    let j = m.sync_ok(src, &[]);
    assert_eq!(j["files_deleted"], 0, "converged: {j}");
    assert_same_tree(src, m.standby());

    // Many at once trip the mass-delete guard, like any deletions.
    for i in 0..12 {
        mkfifo(&d(&format!("many-{i:02}")));
    }
    let r = m.sync(src, &[]);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("max-delete"), "{}", r.stderr);
    assert!(d("many-00").symlink_metadata().is_ok());
    let j = m.sync_ok(src, &["--force"]);
    assert_eq!(j["files_deleted"], 12, "{j}");
    assert_same_tree(src, m.standby());
}

#[test]
fn local_standby_keeps_no_special_file_the_primary_lacks() {
    let t = Pair::new();
    standby_specials(&LocalMirror(t.dst.clone()), &t.src);
}

#[test]
fn local_hard_linked_symlinks_stay_one_inode() {
    let t = Pair::new();
    hard_linked_symlinks(&LocalMirror(t.dst.clone()), &t.src);
}

#[test]
fn local_every_kind_round_trips() {
    let t = Pair::new();
    every_kind_round_trips(&LocalMirror(t.dst.clone()), &t.src);
}

#[test]
fn local_edits_of_every_kind() {
    let t = Pair::new();
    edits_of_every_kind(&LocalMirror(t.dst.clone()), &t.src);
}

#[test]
fn json_summary_has_the_contract_fields() {
    let t = Pair::new();
    write(&t.s("a"), b"abc");
    let j = sync_ok(&t.src, &t.dst, &[]);
    for k in [
        "files_scanned",
        "files_transferred",
        "files_deleted",
        "bytes_total",
        "bytes_literal",
        "bytes_matched",
        "bytes_on_wire",
        "errors",
        "elapsed_ms",
    ] {
        assert!(j.get(k).is_some(), "missing {k}: {j}");
    }
    assert_eq!(j["files_scanned"], 1);
    assert_eq!(j["files_transferred"], 1);
    assert_eq!(j["bytes_total"], 3);
    assert!(j["bytes_on_wire"].as_u64().unwrap() > 3);
}

#[test]
fn quick_check_misses_what_checksum_finds() {
    let t = Pair::new();
    write(&t.s("f"), b"version one");
    set_mtime(&t.s("f"), 1_600_000_000, 5);
    sync_ok(&t.src, &t.dst, &[]);
    // Same size, same mtime, other bytes: invisible to size + mtime (as with rsync).
    write(&t.s("f"), b"version two");
    set_mtime(&t.s("f"), 1_600_000_000, 5);
    let j = sync_ok(&t.src, &t.dst, &[]);
    assert_eq!(j["files_transferred"], 0);
    assert_eq!(std::fs::read(t.d("f")).unwrap(), b"version one");
    let j = sync_ok(&t.src, &t.dst, &["--checksum"]);
    assert_eq!(j["files_transferred"], 1, "{j}");
    assert_same_tree(&t.src, &t.dst);
}

#[test]
fn dry_run_prints_the_plan_and_changes_nothing() {
    let t = Pair::new();
    write(&t.s("keep"), b"k");
    write(&t.s("gone"), b"g");
    sync_ok(&t.src, &t.dst, &[]);
    std::fs::remove_file(t.s("gone")).unwrap();
    write(&t.s("new file"), b"n");
    let before = snapshot(&t.dst);
    let r = run([
        "sync".as_ref(),
        t.src.as_os_str(),
        t.dst.as_os_str(),
        "--dry-run".as_ref(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("send      new file"), "{}", r.stdout);
    assert!(r.stdout.contains("delete    gone"), "{}", r.stdout);
    let after = snapshot(&t.dst);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    // A dry run into a DEST that does not exist creates nothing.
    let nowhere = t.dir.path().join("not-yet");
    let r = run([
        "sync".as_ref(),
        t.src.as_os_str(),
        nowhere.as_os_str(),
        "-n".as_ref(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!nowhere.exists());
}

#[test]
fn excluded_paths_are_neither_sent_nor_deleted() {
    let t = Pair::new();
    write(&t.s("app.log"), b"log");
    write(&t.s("cache/blob"), b"c");
    write(&t.s("data/keep.txt"), b"k");
    write(&t.d("old.log"), b"standby's own log");
    let j = sync_ok(
        &t.src,
        &t.dst,
        &["--exclude", "*.log", "--exclude", "cache/"],
    );
    assert_eq!(j["files_transferred"], 1, "{j}");
    assert!(!t.d("app.log").exists());
    assert!(!t.d("cache").exists());
    assert!(
        t.d("old.log").exists(),
        "excluded entries on the standby are kept"
    );
    assert_eq!(std::fs::read(t.d("data/keep.txt")).unwrap(), b"k");
    let r = run([
        "sync".as_ref(),
        t.src.as_os_str(),
        t.dst.as_os_str(),
        "--exclude".as_ref(),
        "a[".as_ref(),
    ]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("a["), "{}", r.stderr);
}

#[test]
fn no_delete_keeps_extras() {
    let t = Pair::new();
    write(&t.s("a"), b"a");
    write(&t.d("extra"), b"x");
    let j = sync_ok(&t.src, &t.dst, &["--no-delete"]);
    assert_eq!(j["files_deleted"], 0);
    assert!(t.d("extra").exists());
    let j = sync_ok(&t.src, &t.dst, &[]);
    assert_eq!(j["files_deleted"], 1);
    assert_same_tree(&t.src, &t.dst);
}

#[test]
fn leftover_temps_are_removed() {
    let t = Pair::new();
    write(&t.s("d/f"), b"f");
    sync_ok(&t.src, &t.dst, &[]);
    write(&t.d("d/.hotsync-tmp.0123456789abcdef"), b"torn");
    write(&t.d(".hotsync-tmp.fedcba9876543210"), b"torn");
    let j = sync_ok(&t.src, &t.dst, &[]);
    assert_eq!(j["temps_removed"], 2, "{j}");
    assert!(temps(&t.dst).is_empty());
    assert_same_tree(&t.src, &t.dst);
}

#[test]
fn a_missing_dest_is_created() {
    let t = Pair::new();
    write(&t.s("a"), b"a");
    sync_ok(&t.src, &t.dst, &[]);
    assert_same_tree(&t.src, &t.dst);
}

#[test]
fn many_files_in_many_directories() {
    // Enough files for several durability batches, in both lanes.
    let t = Pair::new();
    for d in 0..20 {
        for f in 0..300 {
            write(
                &t.s(&format!("d{d:02}/f{f:03}")),
                &noise(100 + f * 7, (d * 1000 + f) as u64),
            );
        }
    }
    let j = sync_ok(&t.src, &t.dst, &[]);
    assert_eq!(j["files_transferred"], 6000);
    assert_same_tree(&t.src, &t.dst);
}
