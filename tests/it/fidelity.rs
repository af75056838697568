//! What a promoted standby needs to run the services as the primary did: POSIX ACLs, file
//! capabilities and extended attributes, local and over QUIC, by `sync` and by `watch`.

use crate::helpers::*;
use crate::verify::verify;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Runs a real tool (`setfacl`, `setcap`, `getfacl`) with a file name as an argument,
/// never through a shell; its stdout.
#[track_caller]
fn tool(name: &str, args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(name).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{name} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether the tools these tests drive are here; if not, says why (CI installs them).
fn tools_present() -> bool {
    for t in ["setfacl", "getfacl", "setcap", "getcap"] {
        if Command::new(t).arg("--help").output().is_err() {
            println!("SKIPPED: {t} is not installed (Debian: acl, libcap2-bin); CI has it");
            return false;
        }
    }
    true
}

fn os(p: &Path) -> &std::ffi::OsStr {
    p.as_os_str()
}

fn acl(spec: &str, path: &Path) {
    tool("setfacl", &["-m".as_ref(), spec.as_ref(), os(path)]);
}

/// The ACL as `getfacl` shows it, without the header naming the file.
fn getfacl(path: &Path) -> String {
    tool("getfacl", &["-cp".as_ref(), os(path)])
}

/// A tree with every kind of metadata the issue names.
fn build(t: &Pair) {
    write(&t.s("acl.txt"), b"shared with nobody\n");
    acl("u:nobody:rw-,g:nogroup:r--", &t.s("acl.txt"));
    std::fs::create_dir(t.s("shared")).unwrap();
    acl("d:u:nobody:rwx,d:g::r-x", &t.s("shared"));
    // Inherits the default ACL as its access ACL.
    write(&t.s("shared/inside.txt"), b"inherited\n");
    write(&t.s("tagged.txt"), b"tagged\n");
    set_xattr(&t.s("tagged.txt"), "user.mime_type", b"text/plain");
    set_xattr(&t.s("tagged.txt"), "user.checksum", &[0, 255, 7, 0]);
    set_xattr(&t.s("shared"), "user.owner", b"ops");
    write(&t.s("plain.txt"), b"nothing special\n");
    // Past the small-file size: sent whole on a stream of its own, later as a delta.
    write(&t.s("big.bin"), &noise(300_000, 4));
    set_xattr(&t.s("big.bin"), "user.kind", &[b'b'; 2000]);
    symlink(b"tagged.txt", &t.s("link"));
    if is_root() {
        write(&t.s("server"), b"#!/bin/sh\n");
        chmod(&t.s("server"), 0o755);
        tool(
            "setcap",
            &["cap_net_bind_service=+ep".as_ref(), os(&t.s("server"))],
        );
        set_xattr(&t.s("plain.txt"), "trusted.origin", b"build-42");
        // Linux allows trusted.* (not user.*) on a symlink itself.
        set_xattr(&t.s("link"), "trusted.link", b"kept");
    }
}

/// The mirror `sync`s (locally or to a QUIC server).
fn attributes_round_trip(m: &dyn Mirror, t: &Pair) {
    build(t);
    m.sync_ok(&t.src, &[]);
    assert_same_tree(&t.src, &t.dst);
    // As the operator checks them, with the real tools.
    assert!(getfacl(&t.d("acl.txt")).contains("user:nobody:rw-"));
    assert_eq!(getfacl(&t.d("acl.txt")), getfacl(&t.s("acl.txt")));
    assert!(getfacl(&t.d("shared")).contains("default:user:nobody:rwx"));
    assert_eq!(
        getfacl(&t.d("shared/inside.txt")),
        getfacl(&t.s("shared/inside.txt"))
    );
    if is_root() {
        let caps = tool("getcap", &[os(&t.d("server"))]);
        assert!(caps.contains("cap_net_bind_service=ep"), "{caps}");
        assert_eq!(
            xattrs(&t.d("link"))
                .get(&b"trusted.link"[..])
                .map(Vec::as_slice),
            Some(&b"kept"[..])
        );
    }

    // Edits of the metadata alone go as metadata, not as content.
    acl("u:nobody:r--", &t.s("acl.txt"));
    remove_xattr(&t.s("tagged.txt"), "user.checksum");
    tool(
        "setfacl",
        &["-x".as_ref(), "d:u:nobody".as_ref(), os(&t.s("shared"))],
    );
    // And a content edit with an attribute change goes as a delta with its attributes.
    let mut big = std::fs::read(t.s("big.bin")).unwrap();
    big[150_000..150_100].fill(9);
    let xattrs_before = xattrs(&t.s("big.bin"));
    std::fs::write(t.s("big.bin"), &big).unwrap();
    assert_eq!(xattrs(&t.s("big.bin")), xattrs_before);
    set_xattr(&t.s("big.bin"), "user.kind", b"bigger");
    let s = m.sync_ok(&t.src, &[]);
    assert_eq!(s["files_transferred"], 1, "{s}");
    assert!(s["metadata_updated"].as_u64().unwrap() >= 3, "{s}");
    assert_same_tree(&t.src, &t.dst);
    assert!(getfacl(&t.d("acl.txt")).contains("user:nobody:r--"));

    // An attribute only the standby has is a difference verify reports, under metadata,
    // and sync removes.
    set_xattr(&t.d("plain.txt"), "user.stray", b"1");
    let r = verify(m, &t.src, &[]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let v = r.json();
    assert_eq!(
        v["metadata_differs"],
        serde_json::json!(["plain.txt"]),
        "{v}"
    );
    assert!(
        v["details"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("extended attributes or ACL"),
        "{v}"
    );
    m.sync_ok(&t.src, &[]);
    assert_same_tree(&t.src, &t.dst);
    assert_eq!(verify(m, &t.src, &[]).code, 0);

    // `--no-xattrs --no-acls`: rsync's old default. A new file goes without them, and what
    // the standby has is left alone.
    write(&t.s("later.txt"), b"later\n");
    set_xattr(&t.s("later.txt"), "user.x", b"1");
    acl("u:nobody:rwx", &t.s("later.txt"));
    remove_xattr(&t.s("tagged.txt"), "user.mime_type");
    let s = m.sync_ok(&t.src, &["--no-xattrs", "--no-acls"]);
    assert_eq!(s["files_transferred"], 1, "{s}");
    assert!(xattrs(&t.d("later.txt")).is_empty());
    assert!(xattrs(&t.d("tagged.txt")).contains_key(&b"user.mime_type"[..]));
    let r = verify(m, &t.src, &["--no-xattrs", "--no-acls"]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert_eq!(verify(m, &t.src, &[]).code, 1);
    // Only ACLs: the user attribute stays as it was, the ACL comes.
    m.sync_ok(&t.src, &["--no-xattrs"]);
    assert!(getfacl(&t.d("later.txt")).contains("user:nobody:rwx"));
    assert!(!xattrs(&t.d("later.txt")).contains_key(&b"user.x"[..]));
    m.sync_ok(&t.src, &[]);
    assert_same_tree(&t.src, &t.dst);
}

#[test]
fn acls_capabilities_and_attributes_are_mirrored_to_a_local_standby() {
    if !tools_present() {
        return;
    }
    let t = Pair::new();
    attributes_round_trip(&LocalMirror(t.dst.clone()), &t);
}

#[test]
fn acls_capabilities_and_attributes_are_mirrored_over_quic() {
    if !tools_present() {
        return;
    }
    let t = Pair::new();
    let m = RemoteMirror::start(t.dir.path(), &t.dst);
    attributes_round_trip(&m, &t);
}

/// A watch sees attribute changes (`IN_ATTRIB`) and mirrors them.
fn watch_attribute_edits(
    t: &Pair,
    pre: &[std::ffi::OsString],
    dest: &std::ffi::OsStr,
    extra: &[&str],
) {
    build(t);
    let w = Watch::start(pre, &t.src, dest, extra);
    w.wait_ready();
    converge(&t.src, &t.dst, Duration::from_secs(20));
    acl("u:nobody:---", &t.s("acl.txt"));
    remove_xattr(&t.s("tagged.txt"), "user.mime_type");
    set_xattr(&t.s("shared/inside.txt"), "user.new", b"yes");
    set_xattr(&t.s("big.bin"), "user.kind", b"edited alone");
    acl("d:g:nogroup:rwx", &t.s("shared"));
    if is_root() {
        tool("setcap", &["-r".as_ref(), os(&t.s("server"))]);
    }
    converge(&t.src, &t.dst, Duration::from_secs(20));
    assert!(getfacl(&t.d("acl.txt")).contains("user:nobody:---"));
    // A new file in the directory inherits its new default ACL on both sides.
    write(&t.s("shared/born.txt"), b"born\n");
    converge(&t.src, &t.dst, Duration::from_secs(20));
    assert!(getfacl(&t.d("shared/born.txt")).contains("group:nogroup:rwx"));
    assert!(temps(&t.dst).is_empty());
}

#[test]
fn a_watch_mirrors_acl_and_attribute_edits_locally_and_over_quic() {
    if !tools_present() {
        return;
    }
    let _g = WATCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let t = Pair::new();
    watch_attribute_edits(&t, &[], t.dst.as_os_str(), &[]);
    let t = Pair::new();
    let m = RemoteMirror::start(t.dir.path(), &t.dst);
    let pre: Vec<std::ffi::OsString> = vec!["--home".into(), m.primary_home.clone().into()];
    let dest: std::ffi::OsString = m.server.url().into();
    watch_attribute_edits(&t, &pre, &dest, &["--server-id", m.server.id.as_str()]);
}

#[test]
fn a_standby_filesystem_without_attributes_says_so_once_and_mirrors_the_rest() {
    // ramfs keeps no extended attributes at all.
    let Some(fs) = Tmpfs::mount_as("ramfs", "mode=755") else {
        return;
    };
    let t = fs.pair();
    write(&t.s("tagged.txt"), b"tagged\n");
    set_xattr(&t.s("tagged.txt"), "user.mime_type", b"text/plain");
    let r = run([
        "sync".as_ref(),
        t.src.as_os_str(),
        t.dst.as_os_str(),
        "--json".as_ref(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(std::fs::read(t.d("tagged.txt")).unwrap(), b"tagged\n");
    assert_eq!(
        r.stderr.matches("cannot store").count(),
        1,
        "said once: {}",
        r.stderr
    );
    assert!(r.stderr.contains("user.*"), "{}", r.stderr);
    // What the standby cannot store is not compared: the next sync has nothing to do.
    let again = sync_ok(&t.src, &t.dst, &[]);
    assert_eq!(again["files_transferred"], 0, "{again}");
    assert_eq!(again["metadata_updated"], 0, "{again}");
}

/// Blocks used by `path`, as `du` counts them.
fn du(path: &Path) -> u64 {
    let out = tool("du", &["-B1".as_ref(), os(path)]);
    out.split_whitespace().next().unwrap().parse().unwrap()
}

/// Files with holes of several shapes, and a dense file of zeros.
fn build_sparse(t: &Pair) {
    use std::os::unix::fs::FileExt;
    let mib = 1u64 << 20;
    let make = |name: &str, len: u64, data: &[(u64, &[u8])]| {
        let f = std::fs::File::create(t.s(name)).unwrap();
        for (at, bytes) in data {
            f.write_all_at(bytes, *at).unwrap();
        }
        f.set_len(len).unwrap();
    };
    // A hole before, between and after the data.
    make(
        "image.raw",
        256 * mib,
        &[(3 * mib + 123, &[7; 10_000]), (200 * mib, &[8; 4096])],
    );
    // Data at both ends, a hole between.
    make(
        "ends.bin",
        64 * mib,
        &[(0, &[1; 70_000]), (64 * mib - 5, &[2; 5])],
    );
    // Nothing but a hole.
    make("empty.img", 32 * mib, &[]);
    // Zeros written out: it stays dense.
    write(&t.s("zeros.bin"), &vec![0; 3 * 1024 * 1024]);
}

fn assert_same_blocks(t: &Pair, names: &[&str]) {
    for name in names {
        // Written back first: ext4 counts a file's extent blocks once its delayed
        // allocation is done, and the primary's file may still be in the page cache.
        for p in [t.s(name), t.d(name)] {
            std::fs::File::open(p).unwrap().sync_all().unwrap();
        }
        let (a, b) = (du(&t.s(name)), du(&t.d(name)));
        assert_eq!(
            a, b,
            "{name}: {a} bytes of blocks on the primary, {b} on the standby"
        );
    }
}

fn sparse_round_trip(m: &dyn Mirror, t: &Pair) {
    build_sparse(t);
    let all = ["image.raw", "ends.bin", "empty.img", "zeros.bin"];
    let s = m.sync_ok(&t.src, &[]);
    assert_same_tree(&t.src, &t.dst);
    assert_same_blocks(t, &all);
    assert!(du(&t.d("image.raw")) < 1 << 20, "the holes stayed holes");
    assert_eq!(du(&t.d("zeros.bin")), 3 << 20, "a dense file stays dense");
    // 352 MiB in all, of which about 3.2 MiB is data: the holes are not sent.
    let wire = s["bytes_on_wire"].as_u64().unwrap();
    assert!(wire < 5 << 20, "{wire} bytes on the wire: {s}");
    let r = verify(m, &t.src, &[]);
    assert_eq!(r.code, 0, "{}", r.stdout);

    // Data written into a hole: the file keeps its other holes.
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(t.s("image.raw"))
        .unwrap();
    f.write_all_at(&[9; 8192], 100 << 20).unwrap();
    drop(f);
    let s = m.sync_ok(&t.src, &[]);
    assert_eq!(s["files_transferred"], 1, "{s}");
    // A delta: the chunk around the new data, not the file's 3 MiB of data.
    assert!(s["bytes_on_wire"].as_u64().unwrap() < 512 << 10, "{s}");
    assert!(s["bytes_matched"].as_u64().unwrap() > 0, "{s}");
    assert_same_tree(&t.src, &t.dst);
    assert_same_blocks(t, &all);
    assert_eq!(verify(m, &t.src, &[]).code, 0);

    // A hole punched into data on the primary is a hole on the standby too.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(t.s("ends.bin"))
        .unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: a valid descriptor; the call only changes the file's allocation.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            65536,
        )
    };
    assert_eq!(r, 0, "punch a hole: {}", std::io::Error::last_os_error());
    drop(f);
    let s = m.sync_ok(&t.src, &[]);
    assert_eq!(s["files_transferred"], 1, "{s}");
    assert_same_tree(&t.src, &t.dst);
    assert_same_blocks(t, &all);
}

#[test]
fn sparse_files_keep_their_holes_on_a_local_standby() {
    let t = Pair::new();
    sparse_round_trip(&LocalMirror(t.dst.clone()), &t);
}

#[test]
fn sparse_files_keep_their_holes_over_quic() {
    let t = Pair::new();
    let m = RemoteMirror::start(t.dir.path(), &t.dst);
    sparse_round_trip(&m, &t);
}

#[test]
fn a_watch_keeps_holes_as_a_sparse_file_is_written_into() {
    let _g = WATCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let t = Pair::new();
    build_sparse(&t);
    let w = Watch::start(&[], &t.src, t.dst.as_os_str(), &[]);
    w.wait_ready();
    converge(&t.src, &t.dst, Duration::from_secs(20));
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(t.s("image.raw"))
        .unwrap();
    for i in 0..5u64 {
        f.write_all_at(&[i as u8 + 1; 4096], (50 + 20 * i) << 20)
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    f.set_len(300 << 20).unwrap();
    drop(f);
    converge(&t.src, &t.dst, Duration::from_secs(20));
    assert_same_blocks(&t, &["image.raw", "ends.bin", "empty.img", "zeros.bin"]);
    assert!(temps(&t.dst).is_empty());
}
