//! Side-by-side benchmark of hotsync against the tools people use today, on this machine.
//!
//!     cargo run --release --example bench            # full: 20,000 files, 1 GiB, 5 runs each
//!     cargo run --release --example bench -- --quick # smaller, a few minutes on 2 cores
//!
//! Options: `--reps N`, `--only initial,delta,...`, `--work DIR` (default target/bench/work),
//! `--keep` (leave the generated data and copies), `--scale` (also the scale rows: a tree of
//! 1,000,000 small files in 10,000 directories, generated once; `--scale-files N` for
//! another size; with `--only scale` nothing else runs).
//!
//! Each workload runs every tool on the same data in the same run, interleaved (A B C A B C
//! ...), and reports medians and hotsync/peer ratios. Peers are started here on 127.0.0.1
//! when installed: an rsync daemon (with and without --fsync), lsyncd (delay = 0), b3sum,
//! `cp -a && sync`. hotsync runs over QUIC to a `hotsync serve` on loopback. Results go to
//! the terminal and to target/bench/report.json.
//!
//! Trees of small files are never deleted while timing: ext4 makes file creation slower for
//! minutes after a mass delete, which would bias whichever tool runs next.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Config {
    quick: bool,
    reps: usize,
    only: Option<Vec<String>>,
    work: PathBuf,
    keep: bool,
    files: usize,
    dirs: usize,
    big: u64,
    /// Another hotsync build measured beside this one (before/after a change).
    baseline: Option<PathBuf>,
    /// Files in the scale tree, when the scale rows run.
    scale: Option<usize>,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut quick = false;
    let mut reps = None;
    let mut only = None;
    let mut work = None;
    let mut keep = false;
    let mut baseline = None;
    let mut scale = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--reps" => reps = args.next().and_then(|v| v.parse().ok()),
            "--only" => {
                only = args
                    .next()
                    .map(|v| v.split(',').map(String::from).collect())
            }
            "--work" => work = args.next().map(PathBuf::from),
            "--keep" => keep = true,
            "--baseline" => baseline = args.next().map(PathBuf::from),
            "--scale" => scale = scale.or(Some(1_000_000)),
            "--scale-files" => scale = args.next().and_then(|v| v.parse().ok()),
            "-h" | "--help" => {
                println!(
                    "usage: bench [--quick] [--reps N] [--only w1,w2] [--work DIR] [--keep] [--baseline HOTSYNC] [--scale] [--scale-files N]"
                );
                println!("workloads: initial noop new-1GiB delta latency verify scale");
                return;
            }
            other => {
                eprintln!("bench: unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    // Asking for the scale rows by name runs them at their default size.
    if scale.is_none()
        && only
            .as_ref()
            .is_some_and(|o: &Vec<String>| o.iter().any(|w| w == "scale"))
    {
        scale = Some(1_000_000);
    }
    let target = target_dir();
    let cfg = Config {
        quick,
        reps: reps.unwrap_or(if quick { 3 } else { 5 }),
        only,
        work: work.unwrap_or_else(|| target.join("bench/work")),
        keep,
        files: if quick { 4_000 } else { 20_000 },
        dirs: if quick { 40 } else { 200 },
        big: if quick { 256 << 20 } else { 1 << 30 },
        baseline,
        scale,
    };
    let hotsync = build_hotsync(&target);
    let mut b = Bench::new(cfg, hotsync);
    b.run_all();
    let report = b.report();
    let out = target.join("bench/report.json");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("\nreport: {}", out.display());
    b.cleanup();
}

/// target/ (the example runs from target/release/examples/).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target"))
}

/// Builds the hotsync binary this bench measures (release) and returns its path.
fn build_hotsync(target: &Path) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--quiet", "--bin", "hotsync"])
        .status()
        .expect("run cargo");
    assert!(status.success(), "building hotsync failed");
    target.join("release/hotsync")
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", "command -v \"$1\" >/dev/null", "sh", cmd])
        .status()
        .is_ok_and(|s| s.success())
}

/// One timed process: wall seconds, peak RSS (KiB) of the process itself, its output.
struct Timed {
    secs: f64,
    rss_kib: u64,
    stdout: String,
}

// The child is reaped by `wait4` in `wait_rusage`, for its rusage.
#[allow(clippy::zombie_processes)]
fn timed(cmd: &mut Command) -> Timed {
    // Flush earlier writes first, so they are not charged to this run.
    let _ = Command::new("sync").status();
    let start = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let mut stdout = String::new();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    let (status, rss) = wait_rusage(&child);
    let secs = start.elapsed().as_secs_f64();
    if status != 0 {
        panic!("{cmd:?} failed with status {status}\n{stdout}\n{stderr}");
    }
    Timed {
        secs,
        rss_kib: rss,
        stdout,
    }
}

/// Reaps `child` with wait4 to get its own peak RSS.
fn wait_rusage(child: &Child) -> (i32, u64) {
    let mut status = 0;
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    assert!(r > 0, "wait4 failed");
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    (code, ru.ru_maxrss as u64)
}

/// `cp -a SRC DEST && sync`: the local floor.
fn cp_sync(src: &Path, dest: &Path) -> Command {
    let mut c = Command::new("sh");
    c.args(["-c", "cp -a \"$1\" \"$2\" && sync", "sh"])
        .arg(src)
        .arg(dest);
    c
}

fn noise(mut x: u64, out: &mut [u8]) {
    x = x.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

#[derive(Default, serde::Serialize)]
struct Workload {
    name: String,
    unit: String,
    /// Median per tool (`null`: not installed or not applicable).
    results: BTreeMap<String, Option<f64>>,
    /// hotsync / reference peer.
    ratio: Option<f64>,
    reference: Option<String>,
    ratios: BTreeMap<String, f64>,
    runs: BTreeMap<String, Vec<f64>>,
    /// Peak RSS of hotsync's processes (KiB), the largest over the runs.
    hotsync_rss_kib: BTreeMap<String, u64>,
    note: Option<String>,
}

struct Bench {
    cfg: Config,
    hotsync: PathBuf,
    rsync: bool,
    lsyncd: bool,
    b3sum: bool,
    rsyncd: Option<(Child, u16)>,
    keys: PathBuf,
    server_id: String,
    primary_id: String,
    workloads: Vec<Workload>,
    seq: usize,
}

const HS: &str = "hotsync";
/// The build given with `--baseline`, run exactly as `hotsync` is.
const BASE: &str = "hotsync (baseline)";
const CP: &str = "cp -a && sync";
const RSYNC: &str = "rsync (daemon)";
const RSYNC_FSYNC: &str = "rsync --fsync (daemon)";
const LSYNCD: &str = "lsyncd delay=0 + rsync (daemon)";
const RSYNC_CHECKSUM: &str = "rsync -a -c -n (daemon)";
const RSYNC_MD5: &str = "rsync -a -c -n md5 (daemon)";
const B3SUM: &str = "b3sum, both trees";

impl Bench {
    fn new(cfg: Config, hotsync: PathBuf) -> Bench {
        std::fs::create_dir_all(&cfg.work).unwrap();
        let keys = cfg.work.join("keys");
        let id = |who: &str| {
            let out = Command::new(&hotsync)
                .arg("--home")
                .arg(keys.join(who))
                .arg("keygen")
                .stderr(Stdio::null())
                .output()
                .unwrap();
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        };
        let server_id = id("standby");
        let primary_id = id("primary");
        let mut b = Bench {
            rsync: have("rsync"),
            lsyncd: have("lsyncd"),
            b3sum: have("b3sum"),
            cfg,
            hotsync,
            rsyncd: None,
            keys,
            server_id,
            primary_id,
            workloads: Vec::new(),
            seq: 0,
        };
        b.print_header();
        b.generate();
        if b.rsync {
            b.start_rsyncd();
        }
        b
    }

    /// Generated data, apart for quick and full runs so neither regenerates the other's.
    fn data(&self) -> PathBuf {
        self.cfg.work.join(if self.cfg.quick {
            "data-quick"
        } else {
            "data-full"
        })
    }

    fn wants(&self, w: &str) -> bool {
        self.cfg
            .only
            .as_ref()
            .is_none_or(|o| o.iter().any(|x| x == w))
    }

    /// A destination no run has used: names left by an interrupted bench are skipped (not
    /// deleted now, which would slow the file creation being timed).
    fn fresh(&mut self, what: &str) -> PathBuf {
        loop {
            self.seq += 1;
            let name = format!("{what}-{}", self.seq);
            let p = self.cfg.work.join("runs").join(&name);
            if p.exists() || self.cfg.work.join("rsd").join(&name).exists() {
                continue;
            }
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            return p;
        }
    }

    fn print_header(&self) {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0);
        println!(
            "hotsync bench ({}; {} runs per tool): {cores} cores, {} files, {} MiB big file",
            if self.cfg.quick { "quick" } else { "full" },
            self.cfg.reps,
            self.cfg.files,
            self.cfg.big >> 20
        );
        let peer = |ok: bool, name: &str| {
            println!(
                "  {name}: {}",
                if ok { "installed" } else { "not installed" }
            )
        };
        peer(self.rsync, "rsync");
        peer(self.lsyncd, "lsyncd");
        peer(self.b3sum, "b3sum");
    }

    /// Deterministic data: a tree of small files and a base/new pair of big files.
    fn generate(&self) {
        let data = self.data();
        let stamp = data.join(format!(
            "stamp-{}-{}-{}",
            self.cfg.files, self.cfg.dirs, self.cfg.big
        ));
        if stamp.exists() {
            return;
        }
        let _ = std::fs::remove_dir_all(&data);
        print!("generating data ...");
        std::io::stdout().flush().unwrap();
        let tree = data.join("tree");
        let per_dir = self.cfg.files / self.cfg.dirs;
        let mut buf = vec![0u8; 16384];
        for d in 0..self.cfg.dirs {
            let dir = tree.join(format!("dir{d:03}"));
            std::fs::create_dir_all(&dir).unwrap();
            for f in 0..per_dir {
                let seed = (d * per_dir + f) as u64;
                let size = 1024 + (seed.wrapping_mul(2654435761) % (15 * 1024 + 1)) as usize;
                noise(seed, &mut buf[..size]);
                std::fs::write(dir.join(format!("file{f:04}.dat")), &buf[..size]).unwrap();
            }
        }
        // The big file, and its edited version: 100 scattered 4 KiB overwrites and 1 MiB appended.
        let base_dir = data.join("big-base");
        let new_dir = data.join("big-new");
        std::fs::create_dir_all(&base_dir).unwrap();
        std::fs::create_dir_all(&new_dir).unwrap();
        let mut base = std::fs::File::create(base_dir.join("data.bin")).unwrap();
        let mut chunk = vec![0u8; 8 << 20];
        for i in 0..self.cfg.big / chunk.len() as u64 {
            noise(1_000_000 + i, &mut chunk);
            base.write_all(&chunk).unwrap();
        }
        drop(base);
        std::fs::copy(base_dir.join("data.bin"), new_dir.join("data.bin")).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(new_dir.join("data.bin"))
            .unwrap();
        let mut edit = vec![0u8; 4096];
        for k in 0..100u64 {
            let at = (k.wrapping_mul(0x9E3779B97F4A7C15) >> 11) % (self.cfg.big - 4096);
            noise(5_000_000 + k, &mut edit);
            std::os::unix::fs::FileExt::write_at(&f, &edit, at).unwrap();
        }
        let mut tail = vec![0u8; 1 << 20];
        noise(9_999, &mut tail);
        std::os::unix::fs::FileExt::write_at(&f, &tail, self.cfg.big).unwrap();
        drop(f);
        std::fs::write(&stamp, b"").unwrap();
        let _ = Command::new("sync").status();
        println!(" done");
    }

    fn start_rsyncd(&mut self) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let module = self.cfg.work.join("rsd");
        std::fs::create_dir_all(&module).unwrap();
        let conf = self.cfg.work.join("rsyncd.conf");
        let root = rustix::process::geteuid().is_root();
        let mut c = format!(
            "port = {port}\naddress = 127.0.0.1\nuse chroot = no\npid file = {}\n[bench]\npath = {}\nread only = false\n",
            self.cfg.work.join("rsyncd.pid").display(),
            module.display()
        );
        if root {
            c.push_str("uid = root\ngid = root\n");
        }
        std::fs::write(&conf, c).unwrap();
        let _ = std::fs::remove_file(self.cfg.work.join("rsyncd.pid"));
        let child = Command::new("rsync")
            .args(["--daemon", "--no-detach"])
            .arg(format!("--config={}", conf.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "rsync daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.rsyncd = Some((child, port));
    }

    /// `rsync -a [--fsync] [--stats] SRC/` to the daemon module named like `dest`.
    fn rsync(&self, src: &Path, dest: &Path, tool: &str, stats: bool) -> Command {
        let sub = dest.file_name().unwrap().to_string_lossy().into_owned();
        let mut c = Command::new("rsync");
        c.arg("-a")
            .args((tool == RSYNC_FSYNC).then_some("--fsync"))
            .args(stats.then_some("--stats"))
            .arg(format!("{}/", src.display()))
            .arg(self.rsync_url(&sub));
        c
    }

    fn rsync_url(&self, sub: &str) -> String {
        format!(
            "rsync://127.0.0.1:{}/bench/{sub}/",
            self.rsyncd.as_ref().unwrap().1
        )
    }

    /// The binary behind a hotsync tool name.
    fn bin(&self, tool: &str) -> &Path {
        match (tool, &self.cfg.baseline) {
            (BASE, Some(b)) => b,
            _ => &self.hotsync,
        }
    }

    /// The hotsync builds under test: this one, and the baseline if given.
    fn hotsyncs(&self) -> Vec<&'static str> {
        let mut t = vec![HS];
        if self.cfg.baseline.is_some() {
            t.push(BASE);
        }
        t
    }

    /// A `hotsync serve` of `tool`'s build for `root`, returned with its port.
    fn serve_with(&self, tool: &str, root: &Path) -> (Child, u16) {
        std::fs::create_dir_all(root).unwrap();
        let mut child = Command::new(self.bin(tool))
            .arg("--home")
            .arg(self.keys.join("standby"))
            .args([
                "-q",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--allow",
                &self.primary_id,
                "--root",
            ])
            .arg(root)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .split_whitespace()
            .nth(2)
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .expect("serve port");
        (child, port)
    }

    /// Peak RSS of a running process, then stops it.
    fn stop_serve(&self, mut child: Child) -> u64 {
        let hwm = std::fs::read_to_string(format!("/proc/{}/status", child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0);
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
            rustix::process::Signal::TERM,
        );
        let _ = child.wait();
        hwm
    }

    /// A `hotsync serve` for `root`, returned with its port.
    fn serve(&self, root: &Path) -> (Child, u16) {
        self.serve_with(HS, root)
    }

    fn hotsync_sync(&self, tool: &str, src: &Path, port: u16) -> Command {
        let mut c = Command::new(self.bin(tool));
        c.arg("--home")
            .arg(self.keys.join("primary"))
            .arg("sync")
            .arg(src)
            .arg(format!("quic://127.0.0.1:{port}"))
            .args(["--server-id", &self.server_id, "--json", "-q"]);
        c
    }

    /// `hotsync watch SRC quic://... --json` of `tool`, started, its events on stdout.
    fn hotsync_watch(&self, tool: &str, src: &Path, port: u16) -> Child {
        Command::new(self.bin(tool))
            .arg("--home")
            .arg(self.keys.join("primary"))
            .arg("watch")
            .arg(src)
            .arg(format!("quic://127.0.0.1:{port}"))
            .args(["--server-id", &self.server_id, "--json", "-q"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// `hotsync verify SRC quic://...` of this build, with a JSON report.
    fn hotsync_verify(&self, src: &Path, port: u16) -> Command {
        let mut c = Command::new(&self.hotsync);
        c.arg("--home")
            .arg(self.keys.join("primary"))
            .arg("verify")
            .arg(src)
            .arg(format!("quic://127.0.0.1:{port}"))
            .args(["--server-id", &self.server_id, "--json"]);
        c
    }

    fn run_all(&mut self) {
        if self.wants("initial") || self.wants("noop") {
            self.tree_workloads();
        }
        if self.wants("new-1GiB") {
            self.new_big();
        }
        if self.wants("delta") {
            self.delta();
        }
        if self.wants("latency") {
            self.latency();
        }
        if self.wants("verify") {
            self.verify();
        }
        if self.cfg.scale.is_some() && self.wants("scale") {
            self.scale();
        }
    }

    /// The scale tree: small files (64 B to 2 KiB) in directories of 100, generated once.
    fn scale_tree(&self, files: usize) -> PathBuf {
        let dirs = files.div_ceil(100);
        let data = self.cfg.work.join(format!("data-scale-{files}"));
        let tree = data.join("tree");
        let stamp = data.join("stamp");
        if stamp.exists() {
            return tree;
        }
        let _ = std::fs::remove_dir_all(&data);
        print!("generating the scale tree ({files} files in {dirs} directories) ...");
        std::io::stdout().flush().unwrap();
        let mut buf = vec![0u8; 2048];
        for d in 0..dirs {
            let dir = tree.join(format!("d{:02}/d{d:05}", d % 100));
            std::fs::create_dir_all(&dir).unwrap();
            for f in 0..100.min(files - d * 100) {
                let seed = (d * 100 + f) as u64;
                let size = 64 + (seed.wrapping_mul(2654435761) % (2048 - 64 + 1)) as usize;
                noise(seed, &mut buf[..size]);
                std::fs::write(dir.join(format!("m{f:02}")), &buf[..size]).unwrap();
            }
        }
        std::fs::write(&stamp, b"").unwrap();
        let _ = Command::new("sync").status();
        println!(" done");
        tree
    }

    /// scale: the initial durable mirror, a no-op re-sync and a verify of a tree of a
    /// million small files, hotsync over QUIC against the rsync daemon, with the peak RSS
    /// of each side (the daemon's forked child sampled from /proc).
    fn scale(&mut self) {
        if !self.rsync {
            println!("scale: skipped (needs rsync)");
            return;
        }
        let files = self.cfg.scale.unwrap();
        let src = self.scale_tree(files);
        let daemon = self.rsyncd.as_ref().unwrap().0.id();
        let (mut initial, mut noop, mut verify) =
            (Runs::default(), Runs::default(), Runs::default());
        let (mut watch, mut watch_first) = (Runs::default(), Runs::default());
        let reps = self.cfg.reps.min(2);
        for rep in 0..reps {
            for tool in in_turn(&[HS, RSYNC_FSYNC], rep) {
                let dest = self.fresh("scale");
                if tool == HS {
                    let (srv, port) = self.serve(&dest);
                    let t = timed(&mut self.hotsync_sync(HS, &src, port));
                    initial.add(HS, t.secs, Some(("sync", t.rss_kib)));
                    let n = timed(&mut self.hotsync_sync(HS, &src, port));
                    noop.add(HS, n.secs, Some(("sync (no-op)", n.rss_kib)));
                    let v = timed(&mut self.hotsync_verify(&src, port));
                    let j: serde_json::Value = serde_json::from_str(v.stdout.trim()).unwrap();
                    assert_eq!(j["identical"], true, "the scale copy must verify: {j}");
                    verify.add(HS, v.secs, Some(("verify", v.rss_kib)));
                    let (ready, first, hwm) = self.watch_scale(&src, &dest, port);
                    watch.add(HS, ready, Some(("watch", hwm)));
                    watch_first.add(HS, first, None);
                    initial.rss("serve", self.stop_serve(srv));
                } else {
                    let sampler = ChildPeak::start(daemon);
                    let t = timed(&mut self.rsync(&src, &dest, RSYNC_FSYNC, false));
                    initial.add(RSYNC_FSYNC, t.secs, Some(("rsync client", t.rss_kib)));
                    initial.rss("rsync daemon child", sampler.stop());
                    let sampler = ChildPeak::start(daemon);
                    let n = timed(&mut self.rsync(&src, &dest, RSYNC, false));
                    noop.add(RSYNC, n.secs, Some(("rsync client", n.rss_kib)));
                    noop.rss("rsync daemon child", sampler.stop());
                    let sub = dest.file_name().unwrap().to_string_lossy().into_owned();
                    let mut c = Command::new("rsync");
                    c.args(["-a", "-c", "-n"])
                        .arg(format!("{}/", src.display()))
                        .arg(self.rsync_url(&sub));
                    let sampler = ChildPeak::start(daemon);
                    let v = timed(&mut c);
                    verify.add(RSYNC_CHECKSUM, v.secs, Some(("rsync client", v.rss_kib)));
                    verify.rss("rsync daemon child", sampler.stop());
                }
                self.progress();
            }
        }
        println!();
        self.finish(
            &format!("scale-initial ({files} files)"),
            "s",
            initial,
            Some(RSYNC_FSYNC),
        );
        self.finish(
            &format!("scale-noop ({files} files)"),
            "s",
            noop,
            Some(RSYNC),
        );
        self.finish(
            &format!("scale-verify ({files} files)"),
            "s",
            verify,
            Some(RSYNC_CHECKSUM),
        );
        self.finish(
            &format!("scale-watch-ready ({files} files)"),
            "s",
            watch,
            None,
        );
        self.finish(
            &format!("scale-watch-first-change ({files} files)"),
            "s",
            watch_first,
            None,
        );
    }

    /// A watch of the scale tree: seconds until its first reconcile is done, seconds from
    /// its start until a change made at its start is on the standby, and its peak RSS.
    fn watch_scale(&self, src: &Path, dest: &Path, port: u16) -> (f64, f64, u64) {
        let mark = src.join("d00").join("d00000").join("watch-mark");
        let _ = std::fs::remove_file(&mark);
        let start = Instant::now();
        let mut w = self.hotsync_watch(HS, src, port);
        std::fs::write(&mark, b"mark").unwrap();
        let copy = dest.join("d00").join("d00000").join("watch-mark");
        let waiter = std::thread::spawn(move || {
            while !copy.exists() && start.elapsed() < Duration::from_secs(120) {
                std::thread::sleep(Duration::from_millis(2));
            }
            start.elapsed().as_secs_f64()
        });
        let mut out = std::io::BufReader::new(w.stdout.take().unwrap());
        let mut line = String::new();
        while out.read_line(&mut line).unwrap() > 0 && !line.contains("\"replicated\"") {
            line.clear();
        }
        let ready = start.elapsed().as_secs_f64();
        if let Ok(Some(status)) = w.try_wait() {
            panic!("the scale watch ended early ({status}): is another watch of the tree running?");
        }
        let first = waiter.join().unwrap();
        let hwm = proc_hwm(w.id());
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(w.id() as i32).unwrap(),
            rustix::process::Signal::TERM,
        );
        let _ = w.wait();
        let _ = std::fs::remove_file(&mark);
        (ready, first, hwm)
    }

    fn tools_for_copy(&self) -> Vec<&'static str> {
        let mut t = self.hotsyncs();
        t.push(CP);
        if self.rsync {
            t.extend([RSYNC, RSYNC_FSYNC]);
        }
        t
    }

    /// initial: the small-file tree into an empty standby; noop: the same again.
    fn tree_workloads(&mut self) {
        let src = self.data().join("tree");
        let tools = self.tools_for_copy();
        let mut initial = Runs::default();
        let mut noop = Runs::default();
        for rep in 0..self.cfg.reps {
            for tool in in_turn(&tools, rep) {
                let dest = self.fresh("tree");
                match tool {
                    HS | BASE => {
                        let (srv, port) = self.serve_with(tool, &dest);
                        let t = timed(&mut self.hotsync_sync(tool, &src, port));
                        initial.add(tool, t.secs, rss_of(tool, "sync", t.rss_kib));
                        let n = timed(&mut self.hotsync_sync(tool, &src, port));
                        noop.add(tool, n.secs, rss_of(tool, "sync", n.rss_kib));
                        let hwm = self.stop_serve(srv);
                        initial.rss(rss_name(tool, "serve"), hwm);
                    }
                    CP => {
                        let t = timed(&mut cp_sync(&src, &dest));
                        initial.add(tool, t.secs, None);
                    }
                    _ => {
                        initial.add(
                            tool,
                            timed(&mut self.rsync(&src, &dest, tool, false)).secs,
                            None,
                        );
                        noop.add(
                            tool,
                            timed(&mut self.rsync(&src, &dest, tool, false)).secs,
                            None,
                        );
                    }
                }
                self.progress();
            }
        }
        println!();
        if self.wants("initial") {
            self.finish("initial", "s", initial, Some(CP));
        }
        if self.wants("noop") {
            self.finish("noop", "s", noop, Some(RSYNC));
        }
    }

    /// new-1GiB: one new big file into an empty standby.
    fn new_big(&mut self) {
        let src = self.data().join("big-base");
        let mut runs = Runs::default();
        let tools = self.tools_for_copy();
        for rep in 0..self.cfg.reps {
            for tool in in_turn(&tools, rep) {
                let dest = self.fresh("big");
                match tool {
                    HS | BASE => {
                        let (srv, port) = self.serve_with(tool, &dest);
                        let t = timed(&mut self.hotsync_sync(tool, &src, port));
                        runs.add(tool, t.secs, rss_of(tool, "sync", t.rss_kib));
                        let hwm = self.stop_serve(srv);
                        runs.rss(rss_name(tool, "serve"), hwm);
                    }
                    CP => {
                        let t = timed(&mut cp_sync(&src, &dest));
                        runs.add(tool, t.secs, None);
                    }
                    _ => {
                        runs.add(
                            tool,
                            timed(&mut self.rsync(&src, &dest, tool, false)).secs,
                            None,
                        );
                    }
                }
                // One inode each: deleting big files does not slow later creates.
                let _ = std::fs::remove_dir_all(&dest);
                let _ = std::fs::remove_dir_all(
                    self.cfg.work.join("rsd").join(dest.file_name().unwrap()),
                );
                self.progress();
            }
        }
        println!();
        self.finish("new-1GiB", "s", runs, Some(CP));
    }

    /// delta: the edited big file against a standby holding the base version.
    fn delta(&mut self) {
        let src = self.data().join("big-new");
        let base = self.data().join("big-base/data.bin");
        let mut time = Runs::default();
        let mut bytes = Runs::default();
        let mut tools = self.hotsyncs();
        if self.rsync {
            tools.extend([RSYNC_FSYNC, RSYNC]);
        }
        for rep in 0..self.cfg.reps {
            for tool in in_turn(&tools, rep) {
                let dest = self.fresh("delta");
                let standby_dir = if tool == HS || tool == BASE {
                    dest.clone()
                } else {
                    self.cfg.work.join("rsd").join(dest.file_name().unwrap())
                };
                std::fs::create_dir_all(&standby_dir).unwrap();
                std::fs::copy(&base, standby_dir.join("data.bin")).unwrap();
                match tool {
                    HS | BASE => {
                        let (srv, port) = self.serve_with(tool, &dest);
                        let t = timed(&mut self.hotsync_sync(tool, &src, port));
                        let j: serde_json::Value = serde_json::from_str(t.stdout.trim()).unwrap();
                        time.add(tool, t.secs, rss_of(tool, "sync", t.rss_kib));
                        bytes.add(tool, j["bytes_on_wire"].as_f64().unwrap(), None);
                        let hwm = self.stop_serve(srv);
                        time.rss(rss_name(tool, "serve"), hwm);
                    }
                    _ => {
                        let t = timed(&mut self.rsync(&src, &dest, tool, true));
                        time.add(tool, t.secs, None);
                        bytes.add(tool, rsync_total_bytes(&t.stdout), None);
                    }
                }
                let _ = std::fs::remove_dir_all(&standby_dir);
                self.progress();
            }
        }
        println!();
        self.finish("delta", "s", time, Some(RSYNC_FSYNC));
        self.finish("delta-bytes-on-wire", "bytes", bytes, Some(RSYNC_FSYNC));
    }

    /// latency: watch mode, a 4 KiB file written on the primary until it is whole on the
    /// standby (seen by inotify there), one write at a time; and the time to mirror the
    /// rename of a 2,000-file directory.
    fn latency(&mut self) {
        let writes = if self.cfg.quick { 30 } else { 100 };
        let mut lat: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        let mut rename: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        let mut rss = Runs::default();
        let mut tools = self.hotsyncs();
        if self.lsyncd && self.rsync {
            tools.push(LSYNCD);
        }
        for &tool in &tools {
            let src = self.fresh("lat-src");
            std::fs::create_dir_all(&src).unwrap();
            std::fs::write(src.join("seed"), b"seed").unwrap();
            let dest = self.fresh("lat-dest");
            let hotsync = tool == HS || tool == BASE;
            let standby = if hotsync {
                dest.clone()
            } else {
                self.cfg.work.join("rsd").join(dest.file_name().unwrap())
            };
            std::fs::create_dir_all(&standby).unwrap();
            let (mut procs, serve) = match tool {
                HS | BASE => {
                    let (srv, port) = self.serve_with(tool, &standby);
                    let mut w = self.hotsync_watch(tool, &src, port);
                    // Ready after the first reconcile.
                    let mut out = std::io::BufReader::new(w.stdout.take().unwrap());
                    let mut line = String::new();
                    while out.read_line(&mut line).unwrap() > 0 && !line.contains("\"replicated\"")
                    {
                        line.clear();
                    }
                    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
                    (vec![w], Some(srv))
                }
                _ => (vec![self.start_lsyncd(&src, &dest)], None),
            };
            wait_for(&standby.join("seed"), 4, Duration::from_secs(30));
            let seen = StandbyEvents::new(&standby);
            let data = vec![7u8; 4096];
            for i in 0..writes {
                let name = format!("f{i:03}");
                let start = Instant::now();
                std::fs::write(src.join(&name), &data).unwrap();
                let ok = seen.wait(&name, &standby, 4096, Duration::from_secs(10));
                let ms = start.elapsed().as_secs_f64() * 1000.0;
                lat.entry(tool)
                    .or_default()
                    .push(if ok { ms } else { f64::INFINITY });
                std::thread::sleep(Duration::from_millis(15));
                if i % 10 == 0 {
                    self.progress();
                }
            }
            // A directory of 2,000 files, replicated, then renamed.
            let dir = src.join("many");
            std::fs::create_dir(&dir).unwrap();
            for k in 0..2000 {
                std::fs::write(dir.join(format!("m{k:04}")), b"small file").unwrap();
            }
            wait_for_count(&standby.join("many"), 2000, Duration::from_secs(60));
            let start = Instant::now();
            std::fs::rename(&dir, src.join("renamed")).unwrap();
            wait_for_count(&standby.join("renamed"), 2000, Duration::from_secs(60));
            rename
                .entry(tool)
                .or_default()
                .push(start.elapsed().as_secs_f64() * 1000.0);
            if let Some(srv) = serve {
                rss.rss(rss_name(tool, "serve"), self.stop_serve(srv));
            }
            for p in &mut procs {
                if hotsync {
                    let hwm = proc_hwm(p.id());
                    rss.rss(rss_name(tool, "watch"), hwm);
                }
                let _ = rustix::process::kill_process(
                    rustix::process::Pid::from_raw(p.id() as i32).unwrap(),
                    rustix::process::Signal::TERM,
                );
                let _ = p.wait();
            }
        }
        println!();
        let pct = |v: &Vec<f64>, q: f64| {
            let mut s = v.clone();
            s.sort_by(|a, b| a.partial_cmp(b).unwrap());
            s[((s.len() as f64 - 1.0) * q).round() as usize]
        };
        for (name, q) in [("latency-p50", 0.5), ("latency-p99", 0.99)] {
            let mut runs = Runs::default();
            for (tool, v) in &lat {
                runs.add(tool, pct(v, q), None);
            }
            if name == "latency-p50" {
                runs.rss = rss.rss.clone();
            }
            self.finish(name, "ms", runs, Some(LSYNCD));
        }
        let mut runs = Runs::default();
        for (tool, v) in &rename {
            runs.add(tool, v[0], None);
        }
        self.finish("rename-2000-files", "ms", runs, Some(LSYNCD));
    }

    /// verify: the small-file tree plus the big file, identical on both sides; hotsync
    /// verify over QUIC against `rsync -a -c -n` to the daemon and b3sum over both trees.
    fn verify(&mut self) {
        let src = self.data().join("verify-src");
        let copy = |from: &Path, to: &Path| {
            let ok = Command::new("cp")
                .arg("-a")
                .arg(from)
                .arg(to)
                .status()
                .unwrap()
                .success();
            assert!(ok, "cp -a {} {}", from.display(), to.display());
        };
        if !src.exists() {
            std::fs::create_dir_all(&src).unwrap();
            copy(&self.data().join("tree"), &src.join("tree"));
            copy(
                &self.data().join("big-base/data.bin"),
                &src.join("data.bin"),
            );
        }
        let standby = self.fresh("verify-standby");
        copy(&src, &standby);
        let module_copy = self.cfg.work.join("rsd").join(standby.file_name().unwrap());
        if self.rsync {
            copy(&src, &module_copy);
        }
        let (srv, port) = self.serve(&standby);
        let mut tools = vec![HS];
        if self.rsync {
            tools.extend([RSYNC_CHECKSUM, RSYNC_MD5]);
        }
        if self.b3sum {
            tools.push(B3SUM);
        }
        let mut runs = Runs::default();
        for rep in 0..self.cfg.reps {
            for tool in in_turn(&tools, rep) {
                match tool {
                    HS => {
                        let t = timed(&mut self.hotsync_verify(&src, port));
                        let j: serde_json::Value = serde_json::from_str(t.stdout.trim()).unwrap();
                        assert_eq!(j["identical"], true, "the bench copies must verify: {j}");
                        runs.add(tool, t.secs, Some(("verify", t.rss_kib)));
                    }
                    RSYNC_CHECKSUM | RSYNC_MD5 => {
                        let sub = standby.file_name().unwrap().to_string_lossy().into_owned();
                        let mut c = Command::new("rsync");
                        c.args(["-a", "-c", "-n"]);
                        if tool == RSYNC_MD5 {
                            c.arg("--checksum-choice=md5");
                        }
                        c.arg(format!("{}/", src.display()))
                            .arg(self.rsync_url(&sub));
                        runs.add(tool, timed(&mut c).secs, None);
                    }
                    _ => {
                        // Both trees at once, as hotsync hashes both sides at once.
                        let script = "find \"$1\" -type f -print0 | xargs -0 b3sum >/dev/null & \
                                      find \"$2\" -type f -print0 | xargs -0 b3sum >/dev/null; wait";
                        let mut c = Command::new("sh");
                        c.args(["-c", script, "sh"]).arg(&src).arg(&standby);
                        runs.add(tool, timed(&mut c).secs, None);
                    }
                }
                self.progress();
            }
        }
        runs.rss("serve", self.stop_serve(srv));
        println!();
        self.finish("verify", "s", runs, Some(RSYNC_CHECKSUM));
    }

    /// lsyncd with `delay = 0`, syncing `src` through rsync to the daemon module `dest`.
    fn start_lsyncd(&self, src: &Path, dest: &Path) -> Child {
        let sub = dest.file_name().unwrap().to_string_lossy().into_owned();
        let conf = self.cfg.work.join(format!("lsyncd-{sub}.lua"));
        std::fs::write(
            &conf,
            format!(
                "settings {{ nodaemon = true, logfile = \"{log}\", statusFile = \"{status}\", insist = true }}\n\
                 sync {{ default.rsync, source = \"{src}\", target = \"{url}\", delay = 0,\n\
                   rsync = {{ archive = true }} }}\n",
                log = self.cfg.work.join(format!("lsyncd-{sub}.log")).display(),
                status = self.cfg.work.join(format!("lsyncd-{sub}.status")).display(),
                src = src.display(),
                url = self.rsync_url(&sub),
            ),
        )
        .unwrap();
        Command::new("lsyncd")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    fn progress(&self) {
        print!(".");
        std::io::stdout().flush().unwrap();
    }

    fn finish(&mut self, name: &str, unit: &str, runs: Runs, reference: Option<&str>) {
        let mut w = Workload {
            name: name.into(),
            unit: unit.into(),
            reference: reference.map(String::from),
            hotsync_rss_kib: runs.rss,
            ..Default::default()
        };
        for (tool, v) in &runs.values {
            w.results.insert(tool.clone(), Some(median(v)));
            w.runs.insert(tool.clone(), v.clone());
        }
        if let Some(Some(h)) = w.results.get(HS).cloned() {
            for (tool, m) in &w.results {
                if tool != HS
                    && let Some(m) = m
                    && *m > 0.0
                {
                    w.ratios.insert(tool.clone(), h / m);
                }
            }
        }
        w.ratio = reference.and_then(|r| w.ratios.get(r).copied());
        print_workload(&w);
        self.workloads.push(w);
    }

    fn report(&self) -> serde_json::Value {
        let uname = Command::new("uname")
            .arg("-sr")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let mem = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| s.lines().next().map(String::from))
            .unwrap_or_default();
        serde_json::json!({
            "workloads": self.workloads,
            "machine": {
                "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                "memory": mem,
                "kernel": uname,
                "mode": if self.cfg.quick { "quick" } else { "full" },
                "runs_per_tool": self.cfg.reps,
                "files": self.cfg.files,
                "big_file_bytes": self.cfg.big,
            },
        })
    }

    fn cleanup(&mut self) {
        if let Some((mut c, _)) = self.rsyncd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if !self.cfg.keep {
            let _ = std::fs::remove_dir_all(self.cfg.work.join("runs"));
            let _ = std::fs::remove_dir_all(self.cfg.work.join("rsd"));
        }
    }
}

#[derive(Default)]
struct Runs {
    values: BTreeMap<String, Vec<f64>>,
    rss: BTreeMap<String, u64>,
}

impl Runs {
    fn add(&mut self, tool: &str, v: f64, rss: Option<(&str, u64)>) {
        self.values.entry(tool.into()).or_default().push(v);
        if let Some((which, kib)) = rss {
            self.rss(which, kib);
        }
    }
    fn rss(&mut self, which: &str, kib: u64) {
        let e = self.rss.entry(which.into()).or_default();
        *e = (*e).max(kib);
    }
}

/// The peak-RSS entry of a hotsync process: `which` for this build, `which (baseline)` for
/// the other.
fn rss_of(tool: &str, which: &'static str, kib: u64) -> Option<(&'static str, u64)> {
    Some((rss_name(tool, which), kib))
}

fn rss_name(tool: &str, which: &'static str) -> &'static str {
    match (tool, which) {
        (BASE, "sync") => "sync (baseline)",
        (BASE, "serve") => "serve (baseline)",
        (BASE, "watch") => "watch (baseline)",
        _ => which,
    }
}

/// The tools of one round, in alternating order (A B C, then C B A, ...), so no tool always
/// runs right after the same other one.
fn in_turn(tools: &[&'static str], rep: usize) -> Vec<&'static str> {
    let mut t = tools.to_vec();
    if rep % 2 == 1 {
        t.reverse();
    }
    t
}

/// Peak RSS (KiB) of a running process.
/// Samples the peak RSS of the children of a process (the rsync daemon forks one per
/// connection) until stopped: VmHWM only grows, so the last sample before a child exits
/// is its peak within the sampling interval.
struct ChildPeak {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl ChildPeak {
    fn start(parent: u32) -> ChildPeak {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let children =
                    std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
                        .unwrap_or_default();
                for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                    peak = peak.max(proc_hwm(c));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        ChildPeak { stop, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

fn proc_hwm(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Waits until `path` is a file of `len` bytes.
fn wait_for(path: &Path, len: u64, limit: Duration) {
    let start = Instant::now();
    while std::fs::metadata(path).map(|m| m.len()).ok() != Some(len) {
        assert!(start.elapsed() < limit, "{} did not appear", path.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until directory `dir` holds `n` entries.
fn wait_for_count(dir: &Path, n: usize, limit: Duration) {
    let start = Instant::now();
    while std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0) < n {
        assert!(start.elapsed() < limit, "{} did not fill", dir.display());
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Names appearing in a standby directory, from inotify (no polling delay).
struct StandbyEvents {
    _w: notify::RecommendedWatcher,
    rx: std::sync::mpsc::Receiver<notify::Result<notify::Event>>,
}

impl StandbyEvents {
    fn new(dir: &Path) -> Self {
        use notify::Watcher;
        let (tx, rx) = std::sync::mpsc::channel();
        let mut w = notify::recommended_watcher(tx).unwrap();
        w.watch(dir, notify::RecursiveMode::NonRecursive).unwrap();
        StandbyEvents { _w: w, rx }
    }

    /// Waits until `name` in `dir` is a file of `len` bytes (it arrives by rename or write).
    fn wait(&self, name: &str, dir: &Path, len: u64, limit: Duration) -> bool {
        let path = dir.join(name);
        let start = Instant::now();
        loop {
            if std::fs::metadata(&path).map(|m| m.len()).ok() == Some(len) {
                return true;
            }
            let left = limit.saturating_sub(start.elapsed());
            if left.is_zero() {
                return false;
            }
            let _ = self.rx.recv_timeout(left.min(Duration::from_millis(50)));
        }
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// "Total bytes sent" + "Total bytes received" from `rsync --stats`.
fn rsync_total_bytes(stats: &str) -> f64 {
    let grab = |key: &str| -> f64 {
        stats
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| {
                l[key.len()..]
                    .split_whitespace()
                    .next()
                    .map(|n| n.replace(',', ""))
            })
            .and_then(|n| n.parse().ok())
            .unwrap_or(f64::NAN)
    };
    grab("Total bytes sent:") + grab("Total bytes received:")
}

fn print_workload(w: &Workload) {
    let fmt = |v: f64| match w.unit.as_str() {
        "bytes" => format!("{:.2} MB", v / 1e6),
        "s" => format!("{v:.3} s"),
        _ => format!("{v:.2} {}", w.unit),
    };
    println!("{}:", w.name);
    for (tool, m) in &w.results {
        let Some(m) = m else { continue };
        let runs = &w.runs[tool];
        let lo = runs.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = runs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let ratio = w
            .ratios
            .get(tool)
            .map(|r| format!("   hotsync/this = {r:.3}"))
            .unwrap_or_default();
        println!(
            "  {tool:24} {:>12}  (min {}, max {}){ratio}",
            fmt(*m),
            fmt(lo),
            fmt(hi)
        );
    }
    if !w.hotsync_rss_kib.is_empty() {
        let parts: Vec<String> = w
            .hotsync_rss_kib
            .iter()
            .map(|(k, v)| format!("{k} {:.1} MiB", *v as f64 / 1024.0))
            .collect();
        println!("  peak RSS: {}", parts.join(", "));
    }
    if let Some(n) = &w.note {
        println!("  {n}");
    }
}
