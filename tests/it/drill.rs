//! The failover drill: two network namespaces joined by a veth pair, real Keepalived and
//! hotsync in each, run with the shipped `examples/keepalived` files (only the site
//! settings rewritten). A writer appends numbered records on the primary; the primary's
//! namespace is killed (every process in it SIGKILLed); the standby must take the address,
//! be promoted and accept writes, having lost no record older than the last lag the
//! primary reported. The old primary then comes back as Keepalived's backup, is fenced by
//! the new primary, rejoins keeping what it wrote late, and catches up; a planned failback
//! through Keepalived moves the primary back.

use crate::helpers::*;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/keepalived");
const VIP: &str = "10.213.7.100";
const PORT: u16 = 7878;
/// The bound of every wait in the drill (Keepalived moves in whole seconds).
const LIMIT: Duration = Duration::from_secs(40);

/// Why the drill cannot run here, if it cannot.
fn unavailable() -> Option<String> {
    if !is_root() {
        return Some("it needs root (network namespaces, Keepalived)".into());
    }
    let found = |prog: &str, arg: &str| {
        Command::new(prog)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !found("keepalived", "--version") {
        return Some("keepalived is not installed (Debian package keepalived)".into());
    }
    if !found("ip", "-V") || !found("flock", "--version") {
        return Some("ip (iproute2) or flock (util-linux) is not installed".into());
    }
    None
}

/// Runs a command to completion; its stdout, or why it failed.
fn cmd<S: AsRef<OsStr>>(prog: &str, args: &[S]) -> Result<String, String> {
    let o = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{prog}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "{prog} {:?}: {}",
            args.iter().map(|a| a.as_ref()).collect::<Vec<_>>(),
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// One node: a network namespace with its address, a hotsync home and tree, and the
/// processes the drill started in it.
struct Node {
    name: &'static str,
    ns: String,
    addr: String,
    home: PathBuf,
    tree: PathBuf,
    id: String,
    dir: PathBuf,
    children: Vec<Child>,
    /// Processes started so far (numbers their logs).
    started: usize,
}

impl Node {
    fn pids(&self) -> Vec<rustix::process::Pid> {
        cmd("ip", &["netns", "pids", &self.ns])
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .filter_map(rustix::process::Pid::from_raw)
            .collect()
    }

    /// Freezes every process in the namespace (SIGSTOP, until no new one appears): the
    /// first half of a power loss. Killed one by one instead, the first deaths would be
    /// seen by the rest: Keepalived's VRRP process turns its parent's death into a SIGTERM,
    /// gives the address up cleanly and runs notify_stop.
    fn freeze(&self) {
        let mut stopped = Vec::new();
        for _ in 0..50 {
            let now = self.pids();
            if now.iter().all(|p| stopped.contains(p)) {
                break;
            }
            for &p in &now {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::STOP);
            }
            stopped = now;
        }
    }

    /// Every process in the namespace dies at once, as in a power loss: frozen, then
    /// SIGKILLed.
    fn kill_all(&mut self) {
        self.freeze();
        for _ in 0..50 {
            let now = self.pids();
            if now.is_empty() {
                break;
            }
            for p in now {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for mut c in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts `prog ARGS` inside the namespace, its output to `log` in the node's dir.
    fn spawn(&mut self, log: &str, prog: &Path, args: &[&OsStr]) {
        self.started += 1;
        let out = File::create(self.dir.join(format!("{log}-{}.log", self.started))).unwrap();
        let err = out.try_clone().unwrap();
        let c = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(prog)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap();
        self.children.push(c);
    }

    /// Starts the node as an operator's systemd would: `serve` always, and Keepalived.
    fn start(&mut self, peer_id: &str, conf: &Path) {
        let listen = format!("0.0.0.0:{PORT}");
        let (home, tree) = (self.home.clone(), self.tree.clone());
        let args: Vec<&OsStr> = [
            OsStr::new("--home"),
            home.as_os_str(),
            OsStr::new("serve"),
            OsStr::new("--root"),
            tree.as_os_str(),
            OsStr::new("--listen"),
            OsStr::new(&listen),
            OsStr::new("--allow"),
            OsStr::new(peer_id),
            // Four logs appended in turn every 2 ms never stand still together, so they
            // have no consistent point after the first: the drill holds the latest policy
            // to its promise (nothing older than the reported lag lost). The consistent
            // policy's drills are in `consistency`.
            OsStr::new("--consistency"),
            OsStr::new("latest"),
            OsStr::new("--json"),
        ]
        .to_vec();
        self.spawn("serve", &bin(), &args);
        self.start_keepalived(conf);
    }

    /// Starts Keepalived in the namespace with the drill's configuration.
    fn start_keepalived(&mut self, conf: &Path) {
        let pid = self.dir.join("keepalived.pid");
        let vrrp_pid = self.dir.join("keepalived-vrrp.pid");
        let args: Vec<&OsStr> = [
            OsStr::new("--dont-fork"),
            OsStr::new("--log-console"),
            OsStr::new("--log-detail"),
            OsStr::new("--vrrp"),
            OsStr::new("--use-file"),
            conf.as_os_str(),
            OsStr::new("--config-id"),
            OsStr::new(self.name),
            OsStr::new("--pid"),
            pid.as_os_str(),
            OsStr::new("--vrrp_pid"),
            vrrp_pid.as_os_str(),
        ]
        .to_vec();
        self.spawn("keepalived", Path::new("keepalived"), &args);
    }

    /// Whether the node holds the virtual address.
    fn holds_vip(&self) -> bool {
        cmd("ip", &["-n", &self.ns, "-o", "addr", "show"])
            .is_ok_and(|o| o.contains(&format!(" {VIP}/")))
    }

    fn state(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&std::fs::read(self.tree.join(".hotsync/state")).ok()?).ok()
    }

    fn role_epoch(&self) -> (String, u64) {
        let s = self.state().unwrap_or_default();
        (
            s["role"].as_str().unwrap_or("?").to_string(),
            s["epoch"].as_u64().unwrap_or(0),
        )
    }

    /// Stops Keepalived as `systemctl stop keepalived` would (SIGTERM: it gives the address
    /// up and runs notify_stop).
    fn stop_keepalived(&mut self) {
        let pid: u32 = std::fs::read_to_string(self.dir.join("keepalived.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // `ip netns exec` execs keepalived, which runs in the foreground: it is our child.
        let i = self
            .children
            .iter()
            .position(|c| c.id() == pid)
            .expect("keepalived is a child of the drill");
        let mut c = self.children.remove(i);
        let p = rustix::process::Pid::from_raw(pid as i32).unwrap();
        rustix::process::kill_process(p, rustix::process::Signal::TERM).unwrap();
        wait_for("keepalived to stop", LIMIT, || {
            c.try_wait().unwrap().map(|_| ())
        });
    }

    /// What the drill left in the node's logs, for a failure message.
    fn logs(&self) -> String {
        let mut out = String::new();
        let mut names: Vec<_> = std::fs::read_dir(&self.dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        names.sort();
        for p in names {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out += &format!("\n--- {} (node {}) ---\n", p.display(), self.name);
            for l in tail.into_iter().rev() {
                out += l;
                out.push('\n');
            }
        }
        out
    }
}

/// The two namespaces and what runs in them; all of it is torn down on drop.
struct Lab {
    nodes: Vec<Node>,
}

impl Lab {
    fn logs(&self) -> String {
        self.nodes.iter().map(Node::logs).collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill_all();
            let _ = cmd("ip", &["netns", "del", &n.ns]);
        }
    }
}

/// Builds the lab: namespaces `hs<pid>a` and `hs<pid>b`, each with an interface `hs0`
/// (the same name on both nodes, as the example's one `$INTERFACE` expects) on a veth pair.
fn lab(base: &Path) -> Result<Lab, String> {
    let tag = format!("hs{}", std::process::id());
    remove_stale_labs();
    let mut lab = Lab { nodes: Vec::new() };
    for (i, name) in ["a", "b"].into_iter().enumerate() {
        let ns = format!("{tag}{name}");
        let _ = cmd("ip", &["netns", "del", &ns]);
        cmd("ip", &["netns", "add", &ns])?;
        let dir = base.join(format!("node-{name}"));
        let home = dir.join("home");
        let tree = dir.join("tree");
        std::fs::create_dir_all(&tree).unwrap();
        let id = keygen(&home);
        lab.nodes.push(Node {
            name,
            ns,
            addr: format!("10.213.7.{}", i + 1),
            home,
            tree,
            id,
            dir,
            children: Vec::new(),
            started: 0,
        });
    }
    let (va, vb) = (format!("{tag}va"), format!("{tag}vb"));
    cmd(
        "ip",
        &["link", "add", &va, "type", "veth", "peer", "name", &vb],
    )?;
    for (n, v) in lab.nodes.iter().zip([&va, &vb]) {
        cmd("ip", &["link", "set", v, "netns", &n.ns])?;
        cmd("ip", &["-n", &n.ns, "link", "set", v, "name", "hs0"])?;
        cmd(
            "ip",
            &[
                "-n",
                &n.ns,
                "addr",
                "add",
                &format!("{}/24", n.addr),
                "dev",
                "hs0",
            ],
        )?;
        cmd("ip", &["-n", &n.ns, "link", "set", "hs0", "up"])?;
        cmd("ip", &["-n", &n.ns, "link", "set", "lo", "up"])?;
    }
    Ok(lab)
}

/// Removes the namespaces (and what runs in them) of drills whose test process is gone: one
/// killed from outside never ran its teardown.
fn remove_stale_labs() {
    let list = cmd("ip", &["netns", "list"]).unwrap_or_default();
    for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = ns
            .strip_prefix("hs")
            .and_then(|r| r.strip_suffix(['a', 'b']))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let pids = cmd("ip", &["netns", "pids", ns]).unwrap_or_default();
        for p in pids.split_whitespace().filter_map(|p| p.parse().ok()) {
            if let Some(p) = rustix::process::Pid::from_raw(p) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
        let _ = cmd("ip", &["netns", "del", ns]);
    }
}

/// The example's `keepalived.conf` with its site block set for the lab; every setting it
/// rewrites must be there (the example must not drift from what the drill runs).
fn keepalived_conf(lab: &Lab, helper: &Path) -> String {
    let text = std::fs::read_to_string(Path::new(EXAMPLES).join("keepalived.conf")).unwrap();
    let env = |n: &Node| n.dir.join("keepalived.env").display().to_string();
    let site = [
        ("$INTERFACE=", "hs0".to_string()),
        ("$VIP=", format!("{VIP}/24")),
        ("$ADDR_A=", lab.nodes[0].addr.clone()),
        ("$ADDR_B=", lab.nodes[1].addr.clone()),
        ("$HELPER=", helper.display().to_string()),
        ("@a $ENV=", env(&lab.nodes[0])),
        ("@b $ENV=", env(&lab.nodes[1])),
    ];
    rewrite(&text, &site)
}

/// Replaces the value of each `KEY...` line; panics if a key is missing.
fn rewrite(text: &str, settings: &[(&str, String)]) -> String {
    let mut out = String::new();
    let mut seen = vec![false; settings.len()];
    for line in text.lines() {
        match settings.iter().position(|(k, _)| line.starts_with(k)) {
            Some(i) => {
                seen[i] = true;
                out += &format!("{}{}\n", settings[i].0, settings[i].1);
            }
            None => {
                out += line;
                out.push('\n');
            }
        }
    }
    for ((k, _), s) in settings.iter().zip(seen) {
        assert!(s, "the example has no `{k}` line");
    }
    out
}

/// The value of a shell assignment `KEY=VALUE` or `KEY="VALUE"` in `text`.
fn value_of(text: &str, key: &str) -> String {
    let line = text
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("the example has no `{key}` line"));
    line[key.len()..].trim_matches('"').to_string()
}

/// The example's env file for `node`, set for the lab.
fn env_file(node: &Node, peer: &Node) -> String {
    let text =
        std::fs::read_to_string(Path::new(EXAMPLES).join(format!("keepalived-{}.env", node.name)))
            .unwrap();
    let settings = [
        ("HOTSYNC=", bin().display().to_string()),
        ("HOTSYNC_HOME=", node.home.display().to_string()),
        ("ROOT=", node.tree.display().to_string()),
        ("VIP=", VIP.to_string()),
        ("PEER_URL=", format!("quic://{}:{PORT}", peer.addr)),
        ("PEER_ID=", peer.id.clone()),
        // The example's watch options (its metrics address is the namespace's own
        // loopback), events on the log, and HOTSYNC_DRILL_WATCH_ARGS to measure with.
        (
            "WATCH_ARGS=",
            format!(
                "\"{} --json {}\"",
                value_of(&text, "WATCH_ARGS="),
                std::env::var("HOTSYNC_DRILL_WATCH_ARGS").unwrap_or_default()
            ),
        ),
        ("RUN_DIR=", node.dir.join("run").display().to_string()),
        ("LOG=", node.dir.join("helper.log").display().to_string()),
    ];
    rewrite(&text, &settings)
}

/// The lines containing `needle` in `path`, or in the `.log` files of directory `path`.
fn lines_with(path: &Path, needle: &str) -> Vec<String> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(needle))
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Milliseconds since midnight of an RFC 3339 UTC stamp (`2026-12-01T10:29:33.869Z`).
fn ms_of_day(ts: &str) -> i64 {
    let t = &ts[11..23];
    let n = |r: std::ops::Range<usize>| t[r].parse::<i64>().unwrap();
    ((n(0..2) * 60 + n(3..5)) * 60 + n(6..8)) * 1000 + n(9..12)
}

/// What the writer wrote: per file, each record's write time.
type Written = Vec<Vec<Instant>>;

const FILES: usize = 4;

/// One record: its file, its number, and a checksum of both (a torn or foreign record
/// does not parse).
fn record(file: usize, seq: usize) -> String {
    let body = format!("{file} {seq:08}");
    format!("{body} {}\n", &blake3::hash(body.as_bytes()).to_hex()[..12])
}

/// Appends a record to each file in turn every 2 ms until `stop`.
fn writer(tree: PathBuf, stop: Arc<AtomicBool>) -> Written {
    let mut files: Vec<File> = (0..FILES)
        .map(|f| {
            std::fs::OpenOptions::new()
                .append(true)
                .open(tree.join(format!("records-{f}")))
                .unwrap()
        })
        .collect();
    let mut written: Written = vec![Vec::new(); FILES];
    let mut seq = 0;
    while !stop.load(Ordering::SeqCst) {
        let f = seq % FILES;
        let n = written[f].len();
        // One write(2) per record: the file on the primary is always whole records.
        files[f].write_all(record(f, n).as_bytes()).unwrap();
        written[f].push(Instant::now());
        seq += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    written
}

/// The records in a standby's copy of file `f`; panics on anything but whole, valid records
/// numbered from 0 (a state the primary never had).
fn records_on(tree: &Path, f: usize) -> usize {
    let text = std::fs::read_to_string(tree.join(format!("records-{f}"))).unwrap_or_default();
    let mut n = 0;
    for line in text.split_inclusive('\n') {
        assert_eq!(
            line,
            record(f, n),
            "record {n} of records-{f} on the standby"
        );
        n += 1;
    }
    n
}

/// The primary's last `status` reply before the kill: when it was asked, and its lag.
#[derive(Clone, Copy)]
struct Sample {
    asked: Instant,
    lag: f64,
    pending: u64,
}

fn sampler(home: PathBuf, stop: Arc<AtomicBool>, last: Arc<Mutex<Option<Sample>>>) {
    while !stop.load(Ordering::SeqCst) {
        let asked = Instant::now();
        let (_, v) = status(&home);
        let watch = v["instances"]
            .as_array()
            .and_then(|is| is.iter().find(|i| i["command"] == "watch").cloned());
        if let Some(r) = watch.map(|w| w["replicas"][0].clone())
            && let (Some(lag), Some(pending)) =
                (r["lag_seconds"].as_f64(), r["pending_changes"].as_u64())
            && r["connected"] == true
        {
            *last.lock().unwrap() = Some(Sample {
                asked,
                lag,
                pending,
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn failover_drill_with_keepalived() {
    if let Some(why) = unavailable() {
        eprintln!("failover drill skipped: {why}");
        return;
    }
    let base = tempfile::tempdir().unwrap();
    // HOTSYNC_DRILL_KEEP=1 keeps the drill's files and logs to look at.
    let base = match std::env::var_os("HOTSYNC_DRILL_KEEP") {
        Some(_) => base.keep(),
        None => base.path().to_path_buf(),
    };
    let base = base.as_path();
    let mut lab = match lab(base) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("failover drill skipped: cannot build network namespaces: {e}");
            return;
        }
    };
    let helper = base.join("hotsync-keepalived");
    std::fs::copy(Path::new(EXAMPLES).join("hotsync-keepalived"), &helper).unwrap();
    let conf = base.join("keepalived.conf");
    std::fs::write(&conf, keepalived_conf(&lab, &helper)).unwrap();
    for (i, j) in [(0, 1), (1, 0)] {
        let text = env_file(&lab.nodes[i], &lab.nodes[j]);
        std::fs::write(lab.nodes[i].dir.join("keepalived.env"), text).unwrap();
    }
    let ids = [lab.nodes[0].id.clone(), lab.nodes[1].id.clone()];

    // First deployment, as the README says: the data on A, `promote` once there.
    for f in 0..FILES {
        write(&lab.nodes[0].tree.join(format!("records-{f}")), b"");
    }
    write(
        &lab.nodes[0].tree.join("docs/readme.txt"),
        b"the service's data\n",
    );
    let r = run([
        OsStr::new("--home"),
        lab.nodes[0].home.as_os_str(),
        OsStr::new("promote"),
        OsStr::new("--root"),
        lab.nodes[0].tree.as_os_str(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    lab.nodes[0].start(&ids[1], &conf);
    lab.nodes[1].start(&ids[0], &conf);

    // A takes the address (B is not fit until it has caught up), starts its watch, and B
    // catches up and becomes fit.
    let settle = |lab: &Lab, what: &str, f: &dyn Fn(&Lab) -> bool| {
        let start = Instant::now();
        while !f(lab) {
            if start.elapsed() > LIMIT {
                panic!("drill: {what} not within {LIMIT:?}{}", lab.logs());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    settle(&lab, "A holds the address", &|l| l.nodes[0].holds_vip());
    settle(&lab, "B caught up", &|l| {
        tree_diff(&l.nodes[0].tree, &l.nodes[1].tree).is_empty()
    });
    let fit = |n: &Node| {
        run([
            OsStr::new("--home"),
            n.home.as_os_str(),
            OsStr::new("check"),
            OsStr::new("--role"),
            OsStr::new("auto"),
            OsStr::new("--root"),
            n.tree.as_os_str(),
        ])
        .code
            == 0
    };
    settle(&lab, "B fit as a standby", &|l| fit(&l.nodes[1]));
    assert!(!lab.nodes[1].holds_vip());

    // The writer, and the primary's status sampled as an operator's monitoring would.
    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (tree, stop) = (lab.nodes[0].tree.clone(), stop.clone());
        std::thread::spawn(move || writer(tree, stop))
    };
    let last = Arc::new(Mutex::new(None));
    let s = {
        let (home, stop, last) = (lab.nodes[0].home.clone(), stop.clone(), last.clone());
        std::thread::spawn(move || sampler(home, stop, last))
    };
    std::thread::sleep(Duration::from_secs(3));

    // The primary's node dies under the writer: every process in A's namespace frozen,
    // then SIGKILLed. The writer (this process, outside the namespace) stops just after;
    // what it wrote after the freeze could never have been replicated.
    lab.nodes[0].freeze();
    let killed = Instant::now();
    stop.store(true, Ordering::SeqCst);
    let written = w.join().unwrap();
    lab.nodes[0].kill_all();
    s.join().unwrap();
    let sample = last
        .lock()
        .unwrap()
        .expect("a status of A's watch while writing");

    // B takes the address, is promoted, and accepts writes.
    settle(&lab, "B holds the address", &|l| l.nodes[1].holds_vip());
    let vip_at = Instant::now();
    settle(&lab, "B promoted", &|l| {
        l.nodes[1].role_epoch() == ("primary".into(), 3)
    });
    let promoted_at = Instant::now();
    write(
        &lab.nodes[1].tree.join("after-failover.txt"),
        b"written on B\n",
    );
    let accepted_at = Instant::now();
    // Finer than polling: from the notify that Keepalived ran once it had set the address
    // (the helper logs it) to the promotion (the serve's event), both stamped in ms. The
    // role can show in status before either line reaches its log.
    settle(&lab, "the notify and the promotion logged", &|l| {
        !lines_with(&l.nodes[1].dir.join("helper.log"), "notify master").is_empty()
            && !lines_with(&l.nodes[1].dir, "\"event\":\"promoted\"").is_empty()
    });
    let notified = lines_with(&lab.nodes[1].dir.join("helper.log"), "notify master")
        .last()
        .map(|l| ms_of_day(&l[..24]));
    let promoted = lines_with(&lab.nodes[1].dir, "\"event\":\"promoted\"")
        .last()
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| ms_of_day(v["ts"].as_str().unwrap()));
    let (Some(notified), Some(promoted)) = (notified, promoted) else {
        panic!("no notify master or promoted event{}", lab.logs());
    };

    // What B has: whole records only, each file a prefix of A's; nothing lost that was
    // older than the last lag A reported (plus the time from that report to the kill, and
    // inotify's delivery).
    let (mut lost, mut after) = (0, 0);
    let mut oldest_lost: Option<Instant> = None;
    for (f, times) in written.iter().enumerate() {
        let on_b = records_on(&lab.nodes[1].tree, f);
        assert!(on_b <= times.len());
        let late = times.iter().filter(|&&t| t > killed).count();
        after += late;
        lost += (times.len() - late).saturating_sub(on_b);
        if on_b < times.len() && times[on_b] <= killed {
            let t = times[on_b];
            oldest_lost = Some(oldest_lost.map_or(t, |o| o.min(t)));
        }
    }
    let total: usize = written.iter().map(Vec::len).sum::<usize>() - after;
    let window = oldest_lost.map_or(0.0, |t| (killed - t).as_secs_f64());
    let bound = sample.lag + (killed - sample.asked).as_secs_f64() + 0.25;
    eprintln!(
        "failover drill: B held the address {:.3} s after the kill; promoted {:.1} ms after \
         that ({} ms from the notify to the promotion), writable {:.1} ms after that; {lost} of {total} records lost, the oldest \
         written {window:.3} s before the kill ({after} more written after it); A's last \
         status ({:.3} s before the kill) reported a lag of {:.3} s with {} pending",
        (vip_at - killed).as_secs_f64(),
        (promoted_at - vip_at).as_secs_f64() * 1e3,
        promoted - notified,
        (accepted_at - promoted_at).as_secs_f64() * 1e3,
        (killed - sample.asked).as_secs_f64(),
        sample.lag,
        sample.pending,
    );
    assert!(
        window <= bound,
        "records written {window:.3} s before the kill were lost, beyond the lag A reported \
         ({bound:.3} s){}",
        lab.logs()
    );

    // A comes back as the operator restarts its node: Keepalived's backup, fenced by B's
    // watch, rejoined by notify_fault keeping what B never got, then caught up.
    lab.nodes[0].start(&ids[1], &conf);
    settle(&lab, "A rejoined as a standby", &|l| {
        l.nodes[0].role_epoch() == ("standby".into(), 3)
    });
    let late: Vec<usize> = (0..FILES)
        .filter(|&f| records_on(&lab.nodes[1].tree, f) < written[f].len())
        .collect();
    let diverged = lab.nodes[0].tree.join(".hotsync/diverged/2");
    for &f in &late {
        let kept = diverged.join(format!("records-{f}"));
        assert_eq!(
            records_on(&diverged, f),
            written[f].len(),
            "{} holds every record A wrote{}",
            kept.display(),
            lab.logs()
        );
    }
    settle(&lab, "A caught up with B", &|l| {
        tree_diff(&l.nodes[1].tree, &l.nodes[0].tree).is_empty()
    });
    settle(&lab, "A fit as a standby", &|l| fit(&l.nodes[0]));
    assert!(lab.nodes[1].holds_vip() && !lab.nodes[0].holds_vip());

    // A planned failback: Keepalived stopped on B gives up the address; A takes it and is
    // promoted; B's Keepalived back, B is fenced, rejoins and catches up.
    write(
        &lab.nodes[1].tree.join("before-failback.txt"),
        b"on B, replicated\n",
    );
    settle(&lab, "A has B's last write", &|l| {
        tree_diff(&l.nodes[1].tree, &l.nodes[0].tree).is_empty()
    });
    // An operator stops writing and waits for the standby; rejoin takes anything changed
    // within 2 s of the last acknowledgement for unconfirmed (events may come late), so a
    // switchover that must keep everything in place waits that long too.
    std::thread::sleep(Duration::from_millis(2500));
    lab.nodes[1].stop_keepalived();
    settle(&lab, "A promoted again", &|l| {
        l.nodes[0].holds_vip() && l.nodes[0].role_epoch() == ("primary".into(), 4)
    });
    write(
        &lab.nodes[0].tree.join("after-failback.txt"),
        b"on A again\n",
    );
    // Only Keepalived restarts on B (its serve kept running).
    lab.nodes[1].start_keepalived(&conf);
    settle(&lab, "B rejoined and caught up", &|l| {
        l.nodes[1].role_epoch() == ("standby".into(), 4)
            && tree_diff(&l.nodes[0].tree, &l.nodes[1].tree).is_empty()
    });
    settle(&lab, "B fit as a standby", &|l| fit(&l.nodes[1]));
    assert!(lab.nodes[0].holds_vip() && !lab.nodes[1].holds_vip());
    let list = lab.nodes[1].tree.join(".hotsync/diverged/3/diverged.json");
    let list: serde_json::Value = serde_json::from_slice(&std::fs::read(list).unwrap()).unwrap();
    assert_eq!(
        list,
        serde_json::json!([]),
        "a planned failback diverges nothing{}",
        lab.logs()
    );
}
