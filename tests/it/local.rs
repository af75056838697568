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

/// Only the exact temp form `.hotsync-tmp.<16 hex digits>` and the root's `.hotsync` are
/// hotsync's: every other name is mirrored, and what is not mirrored is said (a warning,
/// `skipped` with its reason, verify), never dropped silently.
pub fn only_reserved_names_are_left_out_and_each_is_reported(m: &dyn Mirror, src: &Path) {
    let users = [
        ".hotsync-tmp.",
        ".hotsync-tmp.x",
        ".hotsync-tmp.0123456789abcdef.txt",
        ".hotsync-tmp.0123456789ABCDEF",
        "sub/.hotsync-tmp.ABCDEF0123456789/inner",
        "sub/.hotsync-tmp.ABCDEF0123456789/deeper/f",
        "sub/.hotsync",
        ".hotsyncx",
    ];
    for (i, rel) in users.iter().enumerate() {
        write(&src.join(rel), format!("user data {i}").as_bytes());
    }
    // Exactly the temps' form, anywhere; and a user's file in the root's .hotsync.
    write(
        &src.join(".hotsync-tmp.0123456789abcdef"),
        b"a user's, alas",
    );
    write(&src.join("sub/.hotsync-tmp.fedcba9876543210"), b"also");
    write(&src.join(".hotsync/notes.txt"), b"not hotsync's");
    let r = m.sync(src, &["--json"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let j = r.json();
    for (i, rel) in users.iter().enumerate() {
        assert_eq!(
            std::fs::read(m.standby().join(rel)).ok(),
            Some(format!("user data {i}").into_bytes()),
            "{rel} must be mirrored: {j}"
        );
    }
    let mut skipped: Vec<(String, String)> = j["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["path"].as_str().unwrap().to_string(),
                s["error"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    skipped.sort();
    let names: Vec<&str> = skipped.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        names,
        [
            ".hotsync-tmp.0123456789abcdef",
            ".hotsync/notes.txt",
            "sub/.hotsync-tmp.fedcba9876543210"
        ],
        "{j}"
    );
    assert!(skipped[0].1.contains("reserved"), "{skipped:?}");
    assert!(skipped[1].1.contains(".hotsync"), "{skipped:?}");
    for (p, _) in &skipped {
        assert_eq!(
            r.stderr.matches(p.as_str()).count(),
            1,
            "one warning for {p}:\n{}",
            r.stderr
        );
    }
    assert!(!m.standby().join(".hotsync/notes.txt").exists());
    assert!(!m.standby().join(".hotsync-tmp.0123456789abcdef").exists());
    // verify lists them, and the trees are identical otherwise.
    let v = m.verify(src, &["--json"]);
    assert_eq!(v.code, 0, "{}{}", v.stdout, v.stderr);
    let vj = v.json();
    assert_eq!(vj["identical"], true, "{vj}");
    assert_eq!(vj["skipped_count"], 3, "{vj}");
    let human = m.verify(src, &[]);
    assert!(
        human.stdout.contains("not mirrored") && human.stdout.contains(".hotsync/notes.txt"),
        "{}",
        human.stdout
    );
    // A second run has nothing to do for the user's names.
    let j = m.sync_ok(src, &[]);
    assert_eq!(j["files_transferred"], 0, "{j}");
    // The standby's temps live in its own area, which is left empty.
    let area = m.standby().join(".hotsync/tmp");
    assert!(area.is_dir());
    assert_eq!(std::fs::read_dir(&area).unwrap().count(), 0);
}

#[test]
fn local_only_reserved_names_are_left_out_and_each_is_reported() {
    let t = Pair::new();
    only_reserved_names_are_left_out_and_each_is_reported(&LocalMirror(t.dst.clone()), &t.src);
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

/// Names in the deep directory of [`over_path_max`], and their length: 20 names of 203
/// bytes make a 4079-byte relative path, itself within PATH_MAX.
const DEEP: (usize, usize) = (20, 203);

/// The deep directory's relative path.
fn deep_rel() -> Vec<u8> {
    vec![vec![b'd'; DEEP.1]; DEEP.0].join(&b'/')
}

/// Opens the deep directory under `root` one name at a time (making it if `make`): its
/// absolute path is longer than PATH_MAX, so no path-based call reaches it.
fn open_deep(root: &Path, make: bool) -> std::io::Result<std::os::fd::OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut fd = rustix::fs::open(root, flags, Mode::empty())?;
    let name = vec![b'd'; DEEP.1];
    for _ in 0..DEEP.0 {
        if make {
            rustix::fs::mkdirat(&fd, name.as_slice(), Mode::from_raw_mode(0o755))?;
        }
        fd = rustix::fs::openat(&fd, name.as_slice(), flags, Mode::empty())?;
    }
    Ok(fd)
}

fn write_at(dir: &std::os::fd::OwnedFd, name: &str, data: &[u8]) {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )
    .unwrap();
    std::io::Write::write_all(&mut std::fs::File::from(fd), data).unwrap();
}

fn read_at(dir: &std::os::fd::OwnedFd, name: &str) -> std::io::Result<Vec<u8>> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::openat(dir, name, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
    let mut v = Vec::new();
    std::io::Read::read_to_end(&mut std::fs::File::from(fd), &mut v)?;
    Ok(v)
}

/// An entry whose relative path is over PATH_MAX (no name in it over NAME_MAX) is an error
/// naming that limit, the entry and its directory; everything else is mirrored.
pub fn over_path_max(m: &dyn Mirror, src: &Path) {
    write(&src.join("top.txt"), b"top\n");
    let deep = open_deep(src, true).unwrap();
    // 4079 + 1 + 4 bytes: fits. 4079 + 1 + 20 bytes: 4 over.
    write_at(&deep, "fits", b"just within\n");
    write_at(&deep, "leaf-of-the-tree.txt", b"over by 4\n");
    let r = m.sync(src, &["--json"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    let j = r.json();
    let errors = j["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{j}");
    assert_eq!(
        errors[0]["path"].as_str().unwrap().as_bytes(),
        deep_rel(),
        "the directory holding it"
    );
    let msg = errors[0]["error"].as_str().unwrap();
    assert!(
        msg.contains("`leaf-of-the-tree.txt`")
            && msg.contains("4100 bytes")
            && msg.contains("4096-byte limit on a path (PATH_MAX)")
            && !msg.contains("NAME_MAX"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read(m.standby().join("top.txt")).unwrap(),
        b"top\n"
    );
    let mirrored = open_deep(m.standby(), false).unwrap();
    assert_eq!(read_at(&mirrored, "fits").unwrap(), b"just within\n");
    assert!(read_at(&mirrored, "leaf-of-the-tree.txt").is_err());
    // Said again at the next run, as one line of the human report.
    let r = m.sync(src, &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let said: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.contains("PATH_MAX"))
        .collect();
    assert_eq!(said.len(), 1, "{}", r.stderr);
    assert!(said[0].contains("leaf-of-the-tree.txt"), "{}", said[0]);
}

#[test]
fn local_a_path_over_path_max_is_an_error_naming_the_limit() {
    let t = Pair::new();
    over_path_max(&LocalMirror(t.dst.clone()), &t.src);
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

/// Fields a dry run cannot know without doing the run: time, and the bytes that travel
/// (the protocol's, and what a delta sends as data or rebuilds from the standby's copy:
/// known only by reading both copies of each changed file), and the flag itself.
const NOT_PLANNED: [&str; 5] = [
    "elapsed_ms",
    "bytes_on_wire",
    "bytes_literal",
    "bytes_matched",
    "dry_run",
];

/// A change of every kind, then `--dry-run` (its listing, and its JSON) against the real run
/// that follows: the listing holds each operation the real run counts, the counts are
/// equal field by field, and the dry run changed nothing on the standby.
fn dry_run_matches_the_real_run(m: &dyn Mirror, t: &Pair) {
    write(&t.s("sub/a"), b"a");
    write(&t.s("content.txt"), b"version one");
    write(&t.s("meta.txt"), b"meta");
    write(&t.s("del.txt"), b"deleted");
    write(&t.s("dirdel/x"), b"x");
    write(&t.s("dirdel/y/z"), b"z");
    write(&t.s("tc"), b"a file, then a directory");
    write(&t.s("hl_a"), b"linked");
    m.sync_ok(&t.src, &[]);

    write(&t.s("newd/inner"), b"new");
    symlink(b"sub", &t.s("ln"));
    chmod(&t.s("sub"), 0o700);
    write(&t.s("content.txt"), b"version two, longer");
    // Metadata only: the mode (a new mtime would send the content again, as rsync does).
    chmod(&t.s("meta.txt"), 0o600);
    std::fs::remove_file(t.s("del.txt")).unwrap();
    std::fs::remove_dir_all(t.s("dirdel")).unwrap();
    std::fs::remove_file(t.s("tc")).unwrap();
    write(&t.s("tc/in"), b"in");
    std::fs::hard_link(t.s("hl_a"), t.s("hl_b")).unwrap();

    let before = snapshot(m.standby());
    let listing = m.sync(&t.src, &["--dry-run"]);
    assert_eq!(listing.code, 0, "{}", listing.stderr);
    let dry = m.sync(&t.src, &["--dry-run", "--json"]);
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    assert_eq!(
        snapshot(m.standby()),
        before,
        "the dry run changed the standby"
    );
    let real = m.sync_ok(&t.src, &[]);
    assert_same_tree(&t.src, m.standby());

    let (dry, real) = (dry.json(), real);
    let (d, r) = (dry.as_object().unwrap(), real.as_object().unwrap());
    assert_eq!(d.keys().collect::<Vec<_>>(), r.keys().collect::<Vec<_>>());
    for (k, v) in r {
        if !NOT_PLANNED.contains(&k.as_str()) {
            assert_eq!(&d[k], v, "{k}: dry run {dry} vs real run {real}");
        }
    }

    // The listing: one line per operation the real run counts.
    let lines: Vec<&str> = listing.stdout.lines().collect();
    let count = |verb: &str| lines.iter().filter(|l| l.starts_with(verb)).count() as u64;
    for (verb, field) in [
        ("send ", "files_transferred"),
        ("mkdir ", "dirs_created"),
        ("symlink ", "symlinks_written"),
        ("attrs ", "metadata_updated"),
        ("hardlink ", "hard_links_made"),
    ] {
        assert_eq!(count(verb), real[field], "{verb}: {}", listing.stdout);
    }
    // Removals are listed top-most; the real run counts every entry they take.
    let removed: usize = lines
        .iter()
        .filter_map(|l| {
            l.strip_prefix("delete")
                .or_else(|| l.strip_prefix("replace"))
        })
        .map(|p| {
            let p = p.trim().as_bytes().to_vec();
            let mut under = p.clone();
            under.push(b'/');
            before
                .keys()
                .filter(|k| **k == p || k.starts_with(&under))
                .count()
        })
        .sum();
    assert_eq!(removed as u64, real["files_deleted"], "{}", listing.stdout);
    for want in [
        "mkdir     newd",
        "send      newd/inner",
        "symlink   ln -> sub",
        "attrs     sub/",
        "send      content.txt",
        "attrs     meta.txt",
        "delete    del.txt",
        "delete    dirdel",
        "replace   tc",
        "mkdir     tc",
        "hardlink  hl_b => hl_a",
        "attrs     ./",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(want)),
            "no {want:?} in:\n{}",
            listing.stdout
        );
    }
}

#[test]
fn a_dry_run_lists_and_counts_what_the_real_run_does() {
    let t = Pair::new();
    dry_run_matches_the_real_run(&LocalMirror(t.dst.clone()), &t);
}

#[test]
fn a_dry_run_over_quic_lists_and_counts_what_the_real_run_does() {
    let t = Pair::new();
    let m = RemoteMirror::start(t.dir.path(), &t.dst);
    dry_run_matches_the_real_run(&m, &t);
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

#[test]
fn a_mount_point_inside_the_standby_gets_its_temps_beside_their_targets() {
    // The area `.hotsync/tmp` is on the root's filesystem; a rename cannot leave it for
    // another one, so a directory there is written through temps of its own.
    let Some(fs) = Tmpfs::mount("16m") else {
        return;
    };
    let t = Pair::new();
    write(&t.s("top.txt"), b"on the root's filesystem");
    write(&t.s("mnt/a.txt"), b"on the mounted one");
    write(&t.s("mnt/sub/b.bin"), &noise(200_000, 7));
    symlink(b"a.txt", &t.s("mnt/link"));
    std::fs::hard_link(t.s("mnt/a.txt"), t.s("mnt/sub/a-again")).unwrap();
    std::fs::create_dir_all(t.d("mnt")).unwrap();
    let bound = std::process::Command::new("mount")
        .arg("--bind")
        .arg(&fs.path)
        .arg(t.d("mnt"))
        .status()
        .is_ok_and(|s| s.success());
    assert!(bound, "bind mount");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(t.d("mnt"));
    let j = sync_ok(&t.src, &t.dst, &[]);
    assert_eq!(j["errors"].as_array().unwrap().len(), 0, "{j}");
    assert_same_tree(&t.src, &t.dst);
    write(&t.s("mnt/sub/b.bin"), &noise(200_000, 8));
    let j = sync_ok(&t.src, &t.dst, &[]);
    assert_eq!(j["files_transferred"], 1, "{j}");
    assert_same_tree(&t.src, &t.dst);
    assert!(temps(&t.dst).is_empty(), "{:?}", temps(&t.dst));
}
