//! `hotsync verify`, local and over QUIC.

use crate::helpers::*;
use std::ffi::OsString;

/// `hotsync verify SRC <standby> --json EXTRA...`, local or to the mirror's server.
pub fn verify(
    m: &dyn Mirror,
    remote: Option<&RemoteMirror>,
    src: &std::path::Path,
    extra: &[&str],
) -> Run {
    let mut a: Vec<OsString> = Vec::new();
    match remote {
        Some(r) => {
            a.extend([
                "--home".into(),
                r.primary_home.clone().into(),
                "verify".into(),
                src.into(),
            ]);
            a.extend([
                r.server.url().into(),
                "--server-id".into(),
                r.server.id.clone().into(),
            ]);
        }
        None => a.extend(["verify".into(), src.into(), m.standby().into()]),
    }
    a.push("--json".into());
    a.extend(extra.iter().map(|s| (*s).into()));
    run(a)
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
    let rm;
    let local;
    let (m, r): (&dyn Mirror, Option<&RemoteMirror>) = if remote {
        rm = RemoteMirror::start(t.dir.path(), &t.dst);
        (&rm, Some(&rm))
    } else {
        local = LocalMirror(t.dst.clone());
        (&local, None)
    };
    m.sync_ok(&t.src, &[]);
    let v = verify(m, r, &t.src, &[]);
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
    let v = verify(m, r, &t.src, &[]);
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
    let j = verify(m, r, &t.src, &[]).json();
    assert_eq!(strings(&j["extra"]), ["extra-file"], "{j}");
    assert_eq!(strings(&j["missing"]), ["plain.txt"], "{j}");
    assert!(
        strings(&j["metadata_differs"]).contains(&"exec".to_string()),
        "{j}"
    );
    assert_eq!(j["identical"], false);

    // Repair fixes everything, proven by a second verify.
    let v = verify(m, r, &t.src, &["--repair"]);
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
