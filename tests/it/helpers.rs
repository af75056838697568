//! Test helpers: a tree builder, a full tree comparison, and running the binary with a
//! time limit.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hotsync"))
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A command for the binary; `unprivileged` runs it as nobody when we are root.
pub fn hotsync(unprivileged: bool) -> Command {
    if unprivileged && is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(bin());
        c
    } else {
        Command::new(bin())
    }
}

/// Runs to completion within `limit`, or kills it and panics. Its output is read as it
/// comes (a child writing more than a pipe holds must not block).
pub fn run_limited(cmd: &mut Command, limit: Duration) -> Output {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hotsync");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err.join().unwrap();
            panic!(
                "command did not finish within {limit:?}: {cmd:?}\nstderr: {}",
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("bad JSON ({e}): {}", self.stdout))
    }
}

pub fn run<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_as(false, args)
}

pub fn run_as<I, S>(unprivileged: bool, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = run_limited(hotsync(unprivileged).args(args), Duration::from_secs(120));
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `hotsync sync SRC DEST --json EXTRA...`, asserting the exit code.
pub fn sync_ok(src: &Path, dest: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args: Vec<&OsStr> = vec![
        "sync".as_ref(),
        src.as_os_str(),
        dest.as_os_str(),
        "--json".as_ref(),
    ];
    args.extend(extra.iter().map(|s| OsStr::new(*s)));
    let r = run(args);
    assert_eq!(
        r.code, 0,
        "sync failed\nstdout: {}\nstderr: {}",
        r.stdout, r.stderr
    );
    r.json()
}

/// A scratch area with a source and a destination, removed afterwards.
pub struct Pair {
    pub dir: tempfile::TempDir,
    pub src: PathBuf,
    pub dst: PathBuf,
}

impl Pair {
    pub fn new() -> Pair {
        let dir = tempfile::Builder::new()
            .prefix("hotsync-it")
            .tempdir()
            .unwrap();
        let src = dir.path().join("src");
        let dst = dir.path().join("dst");
        std::fs::create_dir(&src).unwrap();
        Pair { dir, src, dst }
    }

    /// Opens the scratch area to an unprivileged user.
    pub fn share(&self) {
        std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    }

    pub fn s(&self, rel: &str) -> PathBuf {
        self.src.join(rel)
    }

    pub fn d(&self, rel: &str) -> PathBuf {
        self.dst.join(rel)
    }
}

pub fn p(base: &Path, rel: &[u8]) -> PathBuf {
    base.join(OsStr::from_bytes(rel))
}

pub fn write(path: &Path, data: &[u8]) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, data).unwrap();
}

pub fn set_mtime(path: &Path, sec: i64, nsec: u32) {
    let t = rustix::fs::Timespec {
        tv_sec: sec,
        tv_nsec: nsec as _,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

pub fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

pub fn symlink(target: &[u8], path: &Path) {
    std::os::unix::fs::symlink(OsStr::from_bytes(target), path).unwrap();
}

/// Gives the file or symlink `existing` the name `new` too, never following a symlink
/// (`ln -P`).
pub fn hard_link(existing: &Path, new: &Path) {
    rustix::fs::linkat(
        rustix::fs::CWD,
        existing,
        rustix::fs::CWD,
        new,
        rustix::fs::AtFlags::empty(),
    )
    .unwrap_or_else(|e| panic!("link {} {}: {e}", existing.display(), new.display()));
}

/// The inode number and link count of `path`, never following it (`stat -c %i,%h`).
pub fn inode(path: &Path) -> (u64, u64) {
    let m = std::fs::symlink_metadata(path).unwrap();
    (m.ino(), m.nlink())
}

/// Makes a fifo at `path`.
pub fn mkfifo(path: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
}

/// Deterministic pseudo-random bytes.
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(Vec<u8>),
    /// A socket, fifo or device node: its file type bits and device number.
    Special(u32, u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, i64),
    pub ino: u64,
    /// Extended attributes (ACLs and capabilities among them), but SELinux labels, which
    /// each side's policy sets.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// The extended attributes of `path`, never following it.
pub fn xattrs(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut out = BTreeMap::new();
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return out;
    };
    let mut names = vec![0u8; 65536];
    // SAFETY: the buffers are as long as the lengths given.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n <= 0 {
        return out;
    }
    for name in names[..n as usize]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
    {
        if name == b"security.selinux" {
            continue;
        }
        let cn = std::ffi::CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        // SAFETY: as above.
        let m = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        if m >= 0 {
            v.truncate(m as usize);
            out.insert(name.to_vec(), v);
        }
    }
    out
}

/// Sets the extended attribute `name` of `path` (never followed) to `value`.
pub fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C strings and a buffer of the length given.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {name} on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Removes the extended attribute `name` of `path`.
pub fn remove_xattr(path: &Path, name: &str) {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C strings.
    let r = unsafe { libc::lremovexattr(c.as_ptr(), n.as_ptr()) };
    assert_eq!(
        r,
        0,
        "removexattr {name}: {}",
        std::io::Error::last_os_error()
    );
}

/// Every entry under `root` by relative path (the root itself is ""), without the
/// standby's reserved `.hotsync`.
pub fn snapshot(root: &Path) -> BTreeMap<Vec<u8>, Node> {
    let mut out = BTreeMap::new();
    walk(root, b"", &mut out);
    out
}

fn walk(root: &Path, rel: &[u8], out: &mut BTreeMap<Vec<u8>, Node>) {
    let path = if rel.is_empty() {
        root.to_path_buf()
    } else {
        p(root, rel)
    };
    // Entries may vanish while a watch is busy with the tree: skip them (the caller compares
    // again until the trees agree).
    let Ok(m) = std::fs::symlink_metadata(&path) else {
        return;
    };
    let ft = m.file_type();
    let kind = if ft.is_file() {
        let Ok(d) = std::fs::read(&path) else { return };
        Kind::File(d)
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        let Ok(t) = std::fs::read_link(&path) else {
            return;
        };
        Kind::Symlink(t.as_os_str().as_bytes().to_vec())
    } else {
        Kind::Special(m.mode() & 0o170000, m.rdev())
    };
    out.insert(
        rel.to_vec(),
        Node {
            kind: kind.clone(),
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ino: m.ino(),
            xattrs: xattrs(&path),
        },
    );
    if kind == Kind::Dir {
        let Ok(entries) = std::fs::read_dir(&path) else {
            return;
        };
        for e in entries {
            let Ok(e) = e else { continue };
            let name = e.file_name();
            let name = name.as_bytes();
            if rel.is_empty() && name == b".hotsync" {
                continue;
            }
            let mut child = rel.to_vec();
            if !child.is_empty() {
                child.push(b'/');
            }
            child.extend_from_slice(name);
            walk(root, &child, out);
        }
    }
}

fn describe(k: &Kind) -> String {
    match k {
        Kind::File(d) => format!("file of {} bytes", d.len()),
        other => format!("{other:?}"),
    }
}

fn show(rel: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(rel))
}

/// Differences between two trees: type, bytes, mode, owner, mtime, link target and
/// hard-link structure. Special files are not mirrored: the standby may hold one only
/// where the primary has the same (an operator made it there).
pub fn tree_diff(primary: &Path, standby: &Path) -> Vec<String> {
    let a = snapshot(primary);
    let b = snapshot(standby);
    let mut diffs = Vec::new();
    for (rel, na) in &a {
        if let Kind::Special(..) = na.kind {
            if b.get(rel).is_some_and(|nb| nb.kind != na.kind) {
                diffs.push(format!(
                    "{}: {} on the standby",
                    show(rel),
                    describe(&b[rel].kind)
                ));
            }
            continue;
        }
        let Some(nb) = b.get(rel) else {
            diffs.push(format!("{}: missing on standby", show(rel)));
            continue;
        };
        if na.kind != nb.kind {
            let short = |k: &Kind| match k {
                Kind::File(d) => format!("file of {} bytes", d.len()),
                other => format!("{other:?}"),
            };
            diffs.push(format!(
                "{}: {} vs {}",
                show(rel),
                short(&na.kind),
                short(&nb.kind)
            ));
            continue;
        }
        if !matches!(na.kind, Kind::Symlink(_)) && na.mode != nb.mode {
            diffs.push(format!(
                "{}: mode {:o} vs {:o}",
                show(rel),
                na.mode,
                nb.mode
            ));
        }
        if is_root() && (na.uid, na.gid) != (nb.uid, nb.gid) {
            diffs.push(format!(
                "{}: owner {}:{} vs {}:{}",
                show(rel),
                na.uid,
                na.gid,
                nb.uid,
                nb.gid
            ));
        }
        if na.mtime != nb.mtime {
            diffs.push(format!(
                "{}: mtime {:?} vs {:?}",
                show(rel),
                na.mtime,
                nb.mtime
            ));
        }
        if na.xattrs != nb.xattrs {
            let names = |x: &BTreeMap<Vec<u8>, Vec<u8>>| -> Vec<String> {
                x.keys()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .collect()
            };
            diffs.push(format!(
                "{}: extended attributes {:?} vs {:?}{}",
                show(rel),
                names(&na.xattrs),
                names(&nb.xattrs),
                if names(&na.xattrs) == names(&nb.xattrs) {
                    " (values differ)"
                } else {
                    ""
                }
            ));
        }
    }
    for (rel, nb) in &b {
        if !a.contains_key(rel) {
            diffs.push(format!(
                "{}: extra on standby ({})",
                show(rel),
                describe(&nb.kind)
            ));
        }
    }
    // Hard links: the sets of names sharing an inode must be the same on both sides (a
    // symlink can have several names too).
    let groups = |s: &BTreeMap<Vec<u8>, Node>| {
        let mut g: HashMap<u64, Vec<Vec<u8>>> = HashMap::new();
        for (rel, n) in s {
            if matches!(n.kind, Kind::File(_) | Kind::Symlink(_)) {
                g.entry(n.ino).or_default().push(rel.clone());
            }
        }
        let mut v: Vec<Vec<Vec<u8>>> = g.into_values().filter(|g| g.len() > 1).collect();
        v.sort();
        v
    };
    let (ga, gb) = (groups(&a), groups(&b));
    if ga != gb {
        diffs.push(format!("hard links differ: {ga:?} vs {gb:?}"));
    }
    diffs
}

#[track_caller]
pub fn assert_same_tree(primary: &Path, standby: &Path) {
    let d = tree_diff(primary, standby);
    assert!(d.is_empty(), "trees differ:\n  {}", d.join("\n  "));
}

/// Names of leftover temporary files anywhere under `root`.
pub fn temps(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_name().as_bytes().starts_with(b".hotsync-tmp.") {
                out.push(e.path());
            } else if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    out
}

/// Whether `s` holds a file being received into `tree`: a named temp, or one it
/// receives unnamed (an open file under `tree` with no name yet).
pub fn receiving(s: &Server, tree: &Path) -> bool {
    if !temps(tree).is_empty() {
        return true;
    }
    let fds = format!("/proc/{}/fd", s.child.id());
    let Ok(dir) = std::fs::read_dir(fds) else {
        return false;
    };
    dir.flatten().any(|e| {
        std::fs::read_link(e.path())
            .is_ok_and(|t| t.starts_with(tree) && t.as_os_str().as_bytes().ends_with(b" (deleted)"))
    })
}

/// A way to reach a standby, so one suite runs against a local DEST and a remote one.
pub trait Mirror {
    /// The standby directory, for comparisons.
    fn standby(&self) -> &Path;
    /// Runs `hotsync sync SRC <DEST> EXTRA...`.
    fn sync(&self, src: &Path, extra: &[&str]) -> Run;
    /// Runs `hotsync verify SRC <DEST> EXTRA...`.
    fn verify(&self, src: &Path, extra: &[&str]) -> Run;

    #[track_caller]
    fn sync_ok(&self, src: &Path, extra: &[&str]) -> serde_json::Value {
        let mut args = vec!["--json"];
        args.extend_from_slice(extra);
        let r = self.sync(src, &args);
        assert_eq!(
            r.code, 0,
            "sync failed\nstdout: {}\nstderr: {}",
            r.stdout, r.stderr
        );
        r.json()
    }
}

/// A local directory as the standby.
pub struct LocalMirror(pub PathBuf);

impl Mirror for LocalMirror {
    fn standby(&self) -> &Path {
        &self.0
    }
    fn sync(&self, src: &Path, extra: &[&str]) -> Run {
        let mut args: Vec<&OsStr> = vec!["sync".as_ref(), src.as_os_str(), self.0.as_os_str()];
        args.extend(extra.iter().map(|s| OsStr::new(*s)));
        run(args)
    }
    fn verify(&self, src: &Path, extra: &[&str]) -> Run {
        let mut args: Vec<&OsStr> = vec!["verify".as_ref(), src.as_os_str(), self.0.as_os_str()];
        args.extend(extra.iter().map(|s| OsStr::new(*s)));
        run(args)
    }
}

/// Builds a tree with every entry kind and awkward names, modes, owners and mtimes.
pub fn build_awkward(src: &Path) {
    let mut t = 1_600_000_000i64;
    let mut stamp = |path: &Path| {
        t += 1;
        set_mtime(path, t, 123_456_789);
    };
    let f = |rel: &[u8], data: &[u8]| {
        let path = p(src, rel);
        write(&path, data);
        path
    };
    for (rel, data) in [
        (&b"plain.txt"[..], b"hello\n".to_vec()),
        (b"empty", vec![]),
        (b"exactly-64k", noise(65536, 1)),
        (b"just-over-64k", noise(65537, 2)),
        (b"dir/sub/big.bin", noise(3 << 20, 3)),
        (b"with space", b"spaces".to_vec()),
        (b"new\nline", b"newline".to_vec()),
        (b"-leading-dash", b"dash".to_vec()),
        (b"--", b"double dash".to_vec()),
        (b"\xff\xfe-not-utf8", b"bytes".to_vec()),
        ("ünïcödé 名前".as_bytes(), b"unicode".to_vec()),
        (b"tab\there", b"tab".to_vec()),
        (b"back\\slash", b"bs".to_vec()),
        (b"*glob?[x]", b"glob".to_vec()),
        (b".hidden", b"hidden".to_vec()),
        (&[b'x'; 255][..], b"long name".to_vec()),
        (b"deep/a/b/c/d/e/f.txt", b"deep".to_vec()),
        (b"tree-to-rename/a/b/c.txt", noise(5000, 4)),
        (b"tree-to-rename/a/d.txt", noise(70_000, 5)),
        (b"readonly-dir/inside", b"ro".to_vec()),
        (b"hard-a", b"shared inode".to_vec()),
        (b"secret", b"s3cret".to_vec()),
        (b"exec", b"#!/bin/sh\n".to_vec()),
        (b"setuid", b"suid".to_vec()),
        (b"none", b"no perms".to_vec()),
        (b"owned", b"owned".to_vec()),
        (b"private/x", b"x".to_vec()),
    ] {
        let path = f(rel, &data);
        stamp(&path);
    }
    std::fs::hard_link(src.join("hard-a"), src.join("dir/hard-b")).unwrap();
    std::fs::hard_link(src.join("hard-a"), src.join("hard-c")).unwrap();
    std::fs::create_dir_all(src.join("empty-dir")).unwrap();
    std::fs::create_dir_all(src.join("sticky")).unwrap();
    chmod(&src.join("secret"), 0o600);
    chmod(&src.join("exec"), 0o755);
    chmod(&src.join("setuid"), 0o4755);
    chmod(&src.join("none"), 0o000);
    chmod(&src.join("sticky"), 0o1777);
    symlink(b"plain.txt", &src.join("link-rel"));
    symlink(b"/etc/passwd", &src.join("link-abs"));
    symlink(b"no/such/target", &src.join("dangling"));
    symlink(b"dir", &src.join("link-dir"));
    symlink(b"target\xfe\nodd", &p(src, b"link\xff"));
    for l in [
        &b"link-rel"[..],
        b"link-abs",
        b"dangling",
        b"link-dir",
        b"link\xff",
    ] {
        stamp(&p(src, l));
    }
    if is_root() {
        rustix::fs::chown(
            src.join("owned").as_path(),
            Some(rustix::fs::Uid::from_raw(1234)),
            Some(rustix::fs::Gid::from_raw(5678)),
        )
        .unwrap();
        rustix::fs::chownat(
            rustix::fs::CWD,
            src.join("link-abs").as_path(),
            Some(rustix::fs::Uid::from_raw(4321)),
            Some(rustix::fs::Gid::from_raw(8765)),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .unwrap();
    }
    // Entries hotsync must skip, with a warning each.
    rustix::fs::mknodat(
        rustix::fs::CWD,
        src.join("a-fifo").as_path(),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    drop(std::os::unix::net::UnixListener::bind(src.join("a-socket")).unwrap());
    chmod(&src.join("readonly-dir"), 0o555);
    chmod(&src.join("private"), 0o700);
    // Directory mtimes last, deepest first, once their contents are final.
    for d in [
        &b"deep/a/b/c/d/e"[..],
        b"deep/a/b/c/d",
        b"deep",
        b"dir/sub",
        b"dir",
        b"empty-dir",
        b"sticky",
        b"readonly-dir",
        b"tree-to-rename/a/b",
        b"tree-to-rename",
        b"",
    ] {
        stamp(&p(src, d));
    }
}

/// Creates an identity in `home` and returns its ID.
pub fn keygen(home: &Path) -> String {
    let r = run(["--home".as_ref(), home.as_os_str(), "keygen".as_ref()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    r.stdout.trim().to_string()
}

/// A `hotsync serve` process on 127.0.0.1, killed when dropped.
pub struct Server {
    pub child: std::process::Child,
    pub port: u16,
    pub id: String,
    pub home: PathBuf,
    pub log: PathBuf,
    /// Its `--json` events, when started with `--json`.
    pub events: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl Server {
    /// Starts a server for `root` allowing `allow`; its identity lives in `home`.
    pub fn start(root: &Path, home: &Path, allow: &[&str]) -> Server {
        Server::spawn(root, home, allow, 0, &[])
    }

    /// Like [`Server::start`], with more `serve` options.
    pub fn start_with(root: &Path, home: &Path, allow: &[&str], extra: &[&str]) -> Server {
        Server::spawn(root, home, allow, 0, extra)
    }

    /// Like [`Server::start`], on a given port (to restart a standby where it was).
    pub fn start_on(root: &Path, home: &Path, allow: &[&str], port: u16) -> Server {
        Server::start_on_with(root, home, allow, port, &[])
    }

    /// [`Server::start_on`] with `extra` arguments.
    pub fn start_on_with(
        root: &Path,
        home: &Path,
        allow: &[&str],
        port: u16,
        extra: &[&str],
    ) -> Server {
        let s = Server::spawn(root, home, allow, port, extra);
        assert_eq!(s.port, port);
        s
    }

    fn spawn(root: &Path, home: &Path, allow: &[&str], port: u16, extra: &[&str]) -> Server {
        let mut args: Vec<std::ffi::OsString> = vec!["serve".into(), "--root".into(), root.into()];
        args.extend(["--listen".into(), format!("127.0.0.1:{port}").into()]);
        for a in allow {
            args.extend(["--allow".into(), a.into()]);
        }
        args.extend(extra.iter().map(Into::into));
        Server::launch(home, &args)
    }

    /// `hotsync --home HOME ARGS...`, a serve however its arguments say (a config file's
    /// [serve], say); it must print where it listens first.
    pub fn launch(home: &Path, args: &[std::ffi::OsString]) -> Server {
        let id = keygen(home);
        let log = home.join(format!(
            "serve-{}.log",
            std::process::id() as u64 * 1000 + rand_suffix()
        ));
        let mut cmd = Command::new(bin());
        cmd.arg("--home").arg(home).args(args);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        use std::io::BufRead;
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut line).unwrap();
        // "listening on ADDR as ID", or with --json {"event":"listening","addr":ADDR,...}.
        let addr = match serde_json::from_str::<serde_json::Value>(&line) {
            Ok(v) => v["addr"].as_str().map(String::from),
            Err(_) => line.split_whitespace().nth(2).map(String::from),
        };
        let port = addr
            .as_deref()
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no port in {line:?}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let ev = events.clone();
        std::thread::spawn(move || {
            for line in out.lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    ev.lock().unwrap().push(v);
                }
            }
        });
        Server {
            child,
            port,
            id,
            home: home.to_path_buf(),
            log,
            events,
        }
    }

    pub fn url(&self) -> String {
        format!("quic://127.0.0.1:{}", self.port)
    }

    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        let _ = rustix::process::kill_process(pid, sig);
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> rustix::process::Pid {
        rustix::process::Pid::from_raw(self.child.id() as i32).unwrap()
    }
}

/// `hotsync --home HOME status --json`: its exit code and answer.
pub fn status(home: &Path) -> (i32, serde_json::Value) {
    let r = run([
        "--home".as_ref(),
        home.as_os_str(),
        "status".as_ref(),
        "--json".as_ref(),
    ]);
    (r.code, r.json())
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `limit` with `what`.
#[track_caller]
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "no {what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The address a process logged for its metrics (`metrics at http://ADDR/metrics`).
pub fn metrics_addr(log: impl Fn() -> String) -> String {
    wait_for(
        "metrics address in the log",
        Duration::from_secs(10),
        || {
            let l = log();
            let at = l.find("metrics at http://")? + "metrics at http://".len();
            let end = l[at..].find("/metrics")?;
            Some(l[at..at + end].to_string())
        },
    )
}

/// `GET path` over plain HTTP/1.1: the status line and the body.
pub fn http_get(addr: &str, path: &str, accept: Option<&str>) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// An `--on-alert` program that appends its HOTSYNC_ environment to `alerts.log` beside it.
pub fn hook(dir: &Path) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let script = dir.join("on-alert");
    let log = dir.join("alerts.log");
    std::fs::write(
        &script,
        "#!/bin/sh\n\
         out=\"$(dirname \"$0\")/alerts.log\"\n\
         echo \"$HOTSYNC_ALERT|$HOTSYNC_STATE|$HOTSYNC_VALUE|$HOTSYNC_STANDBY\" >> \"$out\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    (script, log)
}

/// The hook's lines for `alert`: (state, value, standby).
pub fn hook_lines(log: &Path, alert: &str) -> Vec<(String, String, String)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let p: Vec<&str> = l.split('|').collect();
            (p.len() == 4 && p[0] == alert).then(|| (p[1].into(), p[2].into(), p[3].into()))
        })
        .collect()
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A standby behind `hotsync serve` on loopback.
pub struct RemoteMirror {
    pub server: Server,
    pub root: PathBuf,
    pub primary_home: PathBuf,
}

impl RemoteMirror {
    /// A server for `root` that allows a fresh primary identity.
    pub fn start(base: &Path, root: &Path) -> RemoteMirror {
        std::fs::create_dir_all(root).unwrap();
        let primary_home = base.join("primary-home");
        let pid = keygen(&primary_home);
        let server = Server::start(root, &base.join("server-home"), &[&pid]);
        RemoteMirror {
            server,
            root: root.to_path_buf(),
            primary_home,
        }
    }

    pub fn args<'a>(&'a self, src: &'a Path, extra: &[&'a str]) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = vec![
            "--home".into(),
            self.primary_home.clone().into(),
            "sync".into(),
            src.into(),
            self.server.url().into(),
            "--server-id".into(),
            self.server.id.clone().into(),
        ];
        a.extend(extra.iter().map(|s| (*s).into()));
        a
    }
}

impl Mirror for RemoteMirror {
    fn standby(&self) -> &Path {
        &self.root
    }
    fn sync(&self, src: &Path, extra: &[&str]) -> Run {
        run(self.args(src, extra))
    }
    fn verify(&self, src: &Path, extra: &[&str]) -> Run {
        let mut a = self.args(src, extra);
        a[2] = "verify".into();
        run(a)
    }
}

/// Watch tests share the inotify limits of the machine (and one test changes them).
pub static WATCH_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A running `hotsync watch --json`, its events collected as they come.
pub struct Watch {
    pub child: std::process::Child,
    pub events: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    pub stderr: PathBuf,
}

impl Watch {
    /// Starts `hotsync [pre...] watch SRC DEST --json [extra...]`.
    pub fn start(
        pre: &[std::ffi::OsString],
        src: &Path,
        dest: &std::ffi::OsStr,
        extra: &[&str],
    ) -> Watch {
        let stderr = src.with_extension(format!("watch-{}.log", rand_suffix()));
        let mut cmd = Command::new(bin());
        cmd.args(pre)
            .arg("watch")
            .arg(src)
            .arg(dest)
            .arg("--json")
            .args(extra);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let ev = events.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    ev.lock().unwrap().push(v);
                }
            }
        });
        Watch {
            child,
            events,
            stderr,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Events of one kind so far.
    pub fn of(&self, kind: &str) -> Vec<serde_json::Value> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["event"] == kind)
            .cloned()
            .collect()
    }

    /// Waits until `pred` holds for the events so far.
    #[track_caller]
    pub fn wait_event(
        &self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&[serde_json::Value]) -> bool,
    ) {
        let start = Instant::now();
        while start.elapsed() < limit {
            if pred(&self.events.lock().unwrap()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "no {what} within {limit:?}; events: {:?}\nlog: {}",
            self.events.lock().unwrap(),
            self.log()
        );
    }

    /// Waits for the initial reconcile.
    #[track_caller]
    pub fn wait_ready(&self) {
        self.wait_event("initial reconcile", Duration::from_secs(30), |e| {
            e.iter().any(|e| e["event"] == "replicated")
        });
    }

    /// SIGTERM, then the exit status within `limit`.
    pub fn stop(&mut self, limit: Duration) -> std::process::ExitStatus {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                start.elapsed() < limit,
                "watch did not stop within {limit:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the standby equals the primary (full comparison), or panics with the
/// differences left.
#[track_caller]
pub fn converge(primary: &Path, standby: &Path, limit: Duration) {
    let start = Instant::now();
    loop {
        let d = tree_diff(primary, standby);
        if d.is_empty() {
            return;
        }
        if start.elapsed() > limit {
            panic!("not converged within {limit:?}:\n  {}", d.join("\n  "));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// What a [`UdpProxy`] does to the datagrams it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weather {
    /// Everything through.
    Clear,
    /// Drops this many percent, at random.
    Lossy(u8),
    /// Drops everything.
    Blackhole,
    /// Holds one datagram back and sends it after the next, and sends some twice.
    Shuffled,
}

/// A UDP proxy on loopback between a client and `upstream`, with [`Weather`] set as it
/// runs: what a bad network does to QUIC, without a network namespace.
pub struct UdpProxy {
    pub port: u16,
    weather: std::sync::Arc<std::sync::Mutex<Weather>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Datagrams carried and dropped.
    pub counts: std::sync::Arc<[std::sync::atomic::AtomicU64; 2]>,
}

impl UdpProxy {
    pub fn start(upstream: u16) -> UdpProxy {
        use std::net::UdpSocket;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        let back = UdpSocket::bind("127.0.0.1:0").unwrap();
        back.connect(("127.0.0.1", upstream)).unwrap();
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        }
        let port = front.local_addr().unwrap().port();
        let weather = Arc::new(Mutex::new(Weather::Clear));
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let client: Arc<Mutex<Option<std::net::SocketAddr>>> = Arc::new(Mutex::new(None));
        let (front, back) = (Arc::new(front), Arc::new(back));
        let mut threads = Vec::new();
        for upward in [true, false] {
            let (front, back, weather, stop, counts, client) = (
                front.clone(),
                back.clone(),
                weather.clone(),
                stop.clone(),
                counts.clone(),
                client.clone(),
            );
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                let mut held: Option<Vec<u8>> = None;
                let mut rng = if upward {
                    0x9e37_79b9_7f4a_7c15u64
                } else {
                    0x2545_f491_4f6c_dd1d
                };
                let mut roll = move || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng % 100
                };
                while !stop.load(Ordering::Relaxed) {
                    let got = if upward {
                        front.recv_from(&mut buf).map(|(n, from)| {
                            *client.lock().unwrap() = Some(from);
                            n
                        })
                    } else {
                        back.recv(&mut buf)
                    };
                    let Ok(n) = got else { continue };
                    let send = |d: &[u8]| {
                        if upward {
                            let _ = back.send(d);
                        } else if let Some(to) = *client.lock().unwrap() {
                            let _ = front.send_to(d, to);
                        }
                    };
                    let w = *weather.lock().unwrap();
                    let drop = match w {
                        Weather::Clear | Weather::Shuffled => false,
                        Weather::Lossy(p) => roll() < u64::from(p),
                        Weather::Blackhole => true,
                    };
                    if drop {
                        counts[1].fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    counts[0].fetch_add(1, Ordering::Relaxed);
                    if w == Weather::Shuffled {
                        let now = buf[..n].to_vec();
                        match held.take() {
                            Some(earlier) => {
                                send(&now);
                                send(&earlier);
                            }
                            None if roll() < 30 => held = Some(now),
                            None => send(&now),
                        }
                        if roll() < 5 {
                            send(&buf[..n]);
                        }
                    } else {
                        if let Some(earlier) = held.take() {
                            send(&earlier);
                        }
                        send(&buf[..n]);
                    }
                }
            }));
        }
        UdpProxy {
            port,
            weather,
            stop,
            threads,
            counts,
        }
    }

    pub fn set(&self, w: Weather) {
        *self.weather.lock().unwrap() = w;
    }

    pub fn url(&self) -> String {
        format!("quic://127.0.0.1:{}", self.port)
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A small tmpfs mounted for the test in a directory of its own, unmounted (then its
/// directory removed) when dropped.
pub struct Tmpfs {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    /// A tmpfs of `size` (`16m`); `None`, saying why, where it cannot be mounted (it needs
    /// root, which CI has).
    pub fn mount(size: &str) -> Option<Tmpfs> {
        Tmpfs::mount_as("tmpfs", &format!("size={size}"))
    }

    /// A filesystem of type `fs` (`ramfs`, which keeps no extended attributes) with
    /// `options`; `None`, saying why, where it cannot be mounted.
    pub fn mount_as(fs: &str, options: &str) -> Option<Tmpfs> {
        if !is_root() {
            println!("SKIPPED: mounting a {fs} needs root; CI runs this as root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::create_dir_all(&path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", fs, "-o", options, fs])
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            println!("SKIPPED: cannot mount a {fs} here (needs root); CI runs this as root");
        }
        ok.then_some(Tmpfs { path, _dir: dir })
    }

    /// A pair whose standby root is `standby` on this filesystem.
    pub fn pair(&self) -> Pair {
        let mut t = Pair::new();
        t.dst = self.path.join("standby");
        std::fs::create_dir_all(&t.dst).unwrap();
        t
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// A node of a failover test: its home (identity, control sockets) and its tree.
pub struct Peer {
    pub home: PathBuf,
    pub tree: PathBuf,
    pub id: String,
}

impl Peer {
    /// A node `name` under `base`, with an identity of its own.
    pub fn new(base: &Path, name: &str) -> Peer {
        let home = base.join(format!("{name}-home"));
        let tree = base.join(name);
        std::fs::create_dir_all(&tree).unwrap();
        let id = keygen(&home);
        Peer { home, tree, id }
    }

    /// Its tree's `.hotsync/state` (`null` while there is none).
    pub fn state(&self) -> serde_json::Value {
        std::fs::read(self.tree.join(".hotsync/state"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }
}

/// `hotsync --home HOME flush ARGS...`.
pub fn flush(home: &Path, args: &[&str]) -> Run {
    let mut a: Vec<std::ffi::OsString> = vec!["--home".into(), home.into(), "flush".into()];
    a.extend(args.iter().map(std::ffi::OsString::from));
    run(a)
}

/// A filesystem of type `fs` (`xfs`, `ext4`) made on a loop device of `mib` MiB, mounted at
/// `path`; its device's writes can be counted. `None`, saying why, where it cannot be made
/// (it needs root and the filesystem's `mkfs`, which CI has).
pub struct LoopFs {
    pub path: PathBuf,
    device: String,
    _dir: tempfile::TempDir,
}

impl LoopFs {
    pub fn make(fs: &str, mib: u64) -> Option<LoopFs> {
        if !is_root() {
            println!("SKIPPED: a {fs} loop device needs root; CI runs this as root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        let mkfs = Command::new(format!("mkfs.{fs}"))
            .arg("-q")
            .arg(&image)
            .output();
        if !mkfs.as_ref().is_ok_and(|o| o.status.success()) {
            println!("SKIPPED: mkfs.{fs} is not installed here ({mkfs:?}); CI installs it");
            return None;
        }
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).unwrap();
        let ok = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            println!("SKIPPED: cannot mount a loop device here; CI can");
            return None;
        }
        let found = Command::new("findmnt")
            .args(["-n", "-o", "SOURCE"])
            .arg(&path)
            .output()
            .unwrap();
        let device = String::from_utf8_lossy(&found.stdout)
            .trim()
            .trim_start_matches("/dev/")
            .to_string();
        Some(LoopFs {
            path,
            device,
            _dir: dir,
        })
    }

    /// Bytes written to the device so far (after `sync`, so that what is cached counts).
    pub fn written(&self) -> u64 {
        let _ = Command::new("sync").arg("-f").arg(&self.path).status();
        let stat =
            std::fs::read_to_string(format!("/sys/block/{}/stat", self.device)).unwrap_or_default();
        // The seventh field: sectors written, of 512 bytes.
        stat.split_whitespace()
            .nth(6)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
            * 512
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}
