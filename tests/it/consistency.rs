//! Consistent points through the real binaries (DESIGN §10): an application writes on the
//! primary, the primary node dies at a random moment (the writer and `watch` frozen in the
//! same instant with SIGSTOP, then SIGKILLed), the standby is promoted, and the
//! application's own checker runs on the promoted tree.

use crate::helpers::*;
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// `git` with `args` in `dir`, as a checker: its status and output.
fn git(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new("git")
        .args([
            "-c",
            "safe.directory=*",
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
        ])
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Whether `prog` runs (asked with `arg`).
fn installed(prog: &str, arg: &str) -> bool {
    Command::new(prog)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether `prog` (of the Debian package of the same name) runs; says the case is skipped
/// when it does not.
fn have(prog: &str, arg: &str) -> bool {
    let ok = installed(prog, arg);
    if !ok {
        println!("skipped: {prog} is not installed (Debian package {prog})");
    }
    ok
}

/// A commit loop in the repository `dir`, as fast as git goes, in a process group of its
/// own (so it is frozen and killed whole). The script names no file of the test's.
fn commit_loop(dir: &Path) -> Child {
    Command::new("sh")
        .args([
            "-c",
            "i=0; while :; do i=$((i+1)); echo $i > n; echo $i >> log; \
             git -c user.name=t -c user.email=t@t add -A && \
             git -c user.name=t -c user.email=t@t commit -q -m c$i; done",
        ])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap()
}

/// The node's death: the writer's process group, the application's other processes
/// (`also`) and the watch stopped in one instant, then killed.
fn die(writer: &mut Child, also: &[i32], watch: &mut Watch) {
    use rustix::process::{Pid, Signal, kill_process, kill_process_group};
    let group = Pid::from_raw(writer.id() as i32).unwrap();
    let w = Pid::from_raw(watch.child.id() as i32).unwrap();
    let others: Vec<Pid> = also.iter().filter_map(|&p| Pid::from_raw(p)).collect();
    let _ = kill_process_group(group, Signal::STOP);
    for &p in &others {
        let _ = kill_process(p, Signal::STOP);
    }
    let _ = kill_process(w, Signal::STOP);
    let _ = kill_process_group(group, Signal::KILL);
    for &p in &others {
        let _ = kill_process(p, Signal::KILL);
    }
    let _ = kill_process(w, Signal::KILL);
    let _ = writer.wait();
    let _ = watch.child.wait();
}

/// A small deterministic generator for the moment of death.
fn moment(trial: u64) -> Duration {
    let x = (trial + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33;
    Duration::from_millis(250 + x % 700)
}

/// `serve` (with `extra`) on `b`'s tree and `watch` of `a`'s towards it, once the standby
/// holds a first consistent point.
fn at_a_point(a: &Peer, b: &Peer, extra: &[&str]) -> (Server, Watch) {
    let pre: Vec<OsString> = vec!["--home".into(), a.home.clone().into()];
    let server = Server::start_with(&b.tree, &b.home, &[&a.id], extra);
    let watch = Watch::start(
        &pre,
        &a.tree,
        server.url().as_ref(),
        &["--server-id", &server.id],
    );
    watch.wait_ready();
    wait_for("a first consistent point", Duration::from_secs(10), || {
        b.state()["consistent"].is_object().then_some(())
    });
    (server, watch)
}

/// An application on the primary, as a drill sees it.
trait App {
    /// Sets it up in the primary's tree.
    fn prepare(&self, tree: &Path);
    /// Its writer, running in `tree` until killed, in a process group of its own.
    fn writer(&self, tree: &Path) -> Child;
    /// Its own checker on the promoted tree: `Err` says what is broken. `Ok` carries the
    /// work it holds (commits, transactions), to tell what the failover lost.
    fn check(&self, tree: &Path) -> Result<u64, String>;
    /// Processes of the application besides its writer that die with the node (a
    /// database server), found in `tree`.
    fn freeze(&self, _tree: &Path) -> Vec<i32> {
        Vec::new()
    }
    /// The live database `watch` must warn of, once: the end of its warning's first words.
    fn database(&self) -> Option<String> {
        None
    }
}

/// `trials` failovers of `app`: each time the primary's node dies at a random moment
/// while the application writes, and the application must be usable on the promoted
/// standby. With `serve_dies`, the standby's `serve` is first SIGKILLed at a random moment
/// of the writing (its undo log in whatever state) and restarted, and the primary goes on
/// writing to it. Returns, per trial, the work lost and the changes rolled back.
fn drill(app: &dyn App, trials: u64, serve_dies: bool) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for trial in 0..trials {
        let base = tempfile::tempdir().unwrap();
        let a = Peer::new(base.path(), "a");
        let b = Peer::new(base.path(), "b");
        app.prepare(&a.tree);

        let _guard = WATCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        const SERVE: [&str; 3] = ["--json", "--consistency", "consistent"];
        // The standby holds a first consistent point before the application starts.
        let (mut server, mut watch) = at_a_point(&a, &b, &SERVE);
        // Its serve says so: the tree is at the point, which a failover would lose nothing of.
        let (_, st) = status(&b.home);
        let c = &st["instances"][0]["consistency"];
        assert_eq!(c["policy"], "consistent", "{st}");
        assert_eq!(
            (&c["at_point"], &c["age_seconds"]),
            (&true.into(), &0.0.into()),
            "{st}"
        );
        let mut writer = app.writer(&a.tree);
        if serve_dies {
            std::thread::sleep(moment(trial + 100) / 2);
            let _ = server.child.kill();
            let _ = server.child.wait();
            let port = server.port;
            drop(server);
            server = Server::start_on_with(&b.tree, &b.home, &[&a.id], port, &SERVE);
            // The primary is back with the restarted standby before it dies.
            wait_for("the primary to reconnect", Duration::from_secs(15), || {
                let (_, v) = status(&b.home);
                (v["instances"][0]["primaries"][0]["connected"] == true).then_some(())
            });
        }
        std::thread::sleep(moment(trial));
        let also = app.freeze(&a.tree);
        die(&mut writer, &also, &mut watch);
        let done_on_primary = app.check(&a.tree).unwrap_or(0);
        if let Some(db) = app.database() {
            let log = watch.log();
            assert_eq!(
                log.matches(&format!("/{db}")).count(),
                1,
                "the live database is named once:\n{log}"
            );
        }

        let r = run([
            OsString::from("--home"),
            b.home.clone().into(),
            "promote".into(),
            "--root".into(),
            b.tree.clone().into(),
            "--force".into(),
            "--json".into(),
        ]);
        assert_eq!(r.code, 0, "promote: {}", r.stderr);
        let report: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
        assert_eq!(report["consistent"], true, "{report}");
        assert!(report["consistent_point"].is_string(), "{report}");
        let held = app.check(&b.tree).unwrap_or_else(|why| {
            panic!(
                "trial {trial}: the application is broken on the promoted standby: {why}\n{report}"
            )
        });
        assert!(
            held <= done_on_primary,
            "the standby holds work the primary never did"
        );
        out.push((
            done_on_primary - held,
            report["rolled_back"].as_u64().unwrap_or(0),
        ));
        drop(server);
    }
    out
}

struct Git;

impl App for Git {
    fn prepare(&self, tree: &Path) {
        assert!(git(tree, &["init", "-q"]).status.success());
        write(&tree.join("n"), b"0\n");
        assert!(git(tree, &["add", "-A"]).status.success());
        assert!(git(tree, &["commit", "-q", "-m", "c0"]).status.success());
    }

    fn writer(&self, tree: &Path) -> Child {
        commit_loop(tree)
    }

    fn check(&self, tree: &Path) -> Result<u64, String> {
        let fsck = git(tree, &["fsck", "--full"]);
        if !fsck.status.success() {
            return Err(format!(
                "git fsck --full: {}",
                String::from_utf8_lossy(&fsck.stderr)
            ));
        }
        Ok(count_commits(tree))
    }
}

#[test]
fn git_is_usable_on_the_standby_after_a_sudden_primary_death() {
    if !have("git", "--version") {
        return;
    }
    let lost = drill(&Git, 5, false);
    println!("git drill: (commits lost, changes rolled back) per trial: {lost:?}");
}

/// A `serve` killed while it writes the tree through its undo log (mid-commit, mid-record,
/// mid-rename: wherever the moment falls) comes back with the log as it stood, goes on
/// with it, and a later failover still gives back a consistent point.
#[test]
fn git_is_usable_after_serve_was_killed_mid_window_and_then_the_primary_died() {
    if !have("git", "--version") {
        return;
    }
    let lost = drill(&Git, 3, true);
    println!("git drill with serve killed first: (commits lost, changes rolled back): {lost:?}");
}

/// A bank in SQLite: 100 accounts of 1000, transfers between them as fast as the `sqlite3`
/// shell goes, each one transaction that also counts itself. The invariant: the balances
/// always sum to 100000.
struct Bank {
    /// `wal` or `delete` (a rollback journal).
    journal: &'static str,
}

const BANK: &str = "bank.db";

fn sqlite(tree: &Path, sql: &str) -> std::process::Output {
    Command::new("sqlite3")
        .args(["-batch", BANK, sql])
        .current_dir(tree)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

impl App for Bank {
    fn database(&self) -> Option<String> {
        Some(format!("{BANK} is a live SQLite database"))
    }

    fn prepare(&self, tree: &Path) {
        let sql = format!(
            "PRAGMA journal_mode={}; CREATE TABLE acct(id INTEGER PRIMARY KEY, bal INTEGER); \
             CREATE TABLE done(n INTEGER); WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL \
             SELECT i+1 FROM k WHERE i<100) INSERT INTO acct SELECT i, 1000 FROM k;",
            self.journal
        );
        let o = sqlite(tree, &sql);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }

    fn writer(&self, tree: &Path) -> Child {
        Command::new("sh")
            .args([
                "-c",
                "while :; do sqlite3 -batch bank.db \"BEGIN IMMEDIATE; \
                 UPDATE acct SET bal=bal-7 WHERE id=abs(random())%100+1; \
                 UPDATE acct SET bal=bal+7 WHERE id=(SELECT id FROM acct ORDER BY random() LIMIT 1); \
                 INSERT INTO done VALUES(1); COMMIT;\" >/dev/null; done",
            ])
            .current_dir(tree)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap()
    }

    fn check(&self, tree: &Path) -> Result<u64, String> {
        let o = sqlite(
            tree,
            "PRAGMA integrity_check; SELECT sum(bal) FROM acct; SELECT count(*) FROM done;",
        );
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let lines: Vec<&str> = out.lines().collect();
        if !o.status.success() || lines.len() != 3 || lines[0] != "ok" {
            return Err(format!("{out}{}", String::from_utf8_lossy(&o.stderr)));
        }
        if lines[1] != "100000" {
            return Err(format!("the balances sum to {}, not 100000", lines[1]));
        }
        lines[2].parse().map_err(|e| format!("{e}: {out}"))
    }
}

#[test]
fn sqlite_is_usable_on_the_standby_after_a_sudden_primary_death() {
    if !have("sqlite3", "-version") {
        return;
    }
    for journal in ["wal", "delete"] {
        let lost = drill(&Bank { journal }, 3, false);
        println!(
            "SQLite ({journal}) drill: (transactions lost, changes rolled back) per trial: {lost:?}"
        );
    }
}

fn count_commits(dir: &Path) -> u64 {
    let o = git(dir, &["rev-list", "--count", "HEAD"]);
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// PostgreSQL from Debian (15 here), run as the unprivileged `postgres` user on loopback, with
/// pgbench as its client. The application here is the server and its client together:
/// both are frozen with the watch. The checker starts a server on the promoted copy and
/// asks pgbench's invariant: every table's balances sum to the history's deltas.
struct Postgres {
    bin: PathBuf,
    port: u16,
}

const PGDATA: &str = "pg";

impl Postgres {
    /// The newest PostgreSQL Debian installed, when this test can run it.
    fn find() -> Option<Postgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .max()
            .map(|v| PathBuf::from(format!("/usr/lib/postgresql/{v}/bin")))?;
        let ok = bin.join("postgres").exists()
            && bin.join("pgbench").exists()
            && rustix::process::getuid().is_root()
            && Command::new("id")
                .arg("postgres")
                .output()
                .is_ok_and(|o| o.status.success());
        ok.then(|| Postgres {
            bin,
            port: 20_000 + (std::process::id() % 20_000) as u16,
        })
    }

    /// `prog args...` as the `postgres` user, in `dir`.
    fn as_pg(&self, dir: &Path, prog: &str, args: &[&str]) -> Command {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(self.bin.join(prog))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null());
        c
    }

    fn ctl(&self, tree: &Path, args: &[&str]) -> std::process::Output {
        // TCP on loopback only; the server's log in its data directory (it must not hold
        // the test's pipes open).
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=on",
            self.port
        );
        let log = format!("{PGDATA}/server.log");
        let mut a = vec![
            "-D",
            PGDATA,
            "-o",
            opts.as_str(),
            "-l",
            log.as_str(),
            "-w",
            "-t",
            "20",
        ];
        a.extend_from_slice(args);
        self.as_pg(tree, "pg_ctl", &a).output().unwrap()
    }

    fn psql(&self, tree: &Path, sql: &str) -> std::process::Output {
        let port = self.port.to_string();
        self.as_pg(
            tree,
            "psql",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-AtX",
                "-d",
                "postgres",
                "-c",
                sql,
            ],
        )
        .output()
        .unwrap()
    }

    /// The postmaster's PID, from its pid file.
    fn postmaster(&self, tree: &Path) -> Option<i32> {
        let text = std::fs::read_to_string(tree.join(PGDATA).join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }
}

/// Every process whose parent is `pid`, and theirs.
fn descendants(pid: i32) -> Vec<i32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let parent = all[i];
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            // "pid (comm) state ppid ...": the comm may hold spaces; take what follows ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|s| s.parse::<i32>().ok());
            if ppid == Some(parent) && !all.contains(&p) {
                all.push(p);
            }
        }
        i += 1;
    }
    all
}

impl App for Postgres {
    fn database(&self) -> Option<String> {
        Some(format!("{PGDATA} is a live PostgreSQL data directory"))
    }

    fn prepare(&self, tree: &Path) {
        use std::os::unix::fs::PermissionsExt;
        // The postgres user must reach the tree.
        let mut d = tree.to_path_buf();
        while let Some(p) = d.parent() {
            let _ = std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755));
            if p == Path::new("/tmp") || p == Path::new("/") {
                break;
            }
            d = p.to_path_buf();
        }
        let data = tree.join(PGDATA);
        std::fs::create_dir(&data).unwrap();
        let chown = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&data)
            .status()
            .unwrap();
        assert!(chown.success());
        let init = self
            .as_pg(
                tree,
                "initdb",
                &["-D", PGDATA, "-A", "trust", "-U", "postgres"],
            )
            .output()
            .unwrap();
        assert!(
            init.status.success(),
            "{}",
            String::from_utf8_lossy(&init.stderr)
        );
        let up = self.ctl(tree, &["start"]);
        assert!(
            up.status.success(),
            "{}",
            String::from_utf8_lossy(&up.stderr)
        );
        let port = self.port.to_string();
        let i = self
            .as_pg(
                tree,
                "pgbench",
                &["-h", "127.0.0.1", "-p", &port, "-i", "-q", "postgres"],
            )
            .output()
            .unwrap();
        assert!(i.status.success(), "{}", String::from_utf8_lossy(&i.stderr));
        assert!(self.psql(tree, "CHECKPOINT").status.success());
    }

    fn writer(&self, tree: &Path) -> Child {
        let port = self.port.to_string();
        self.as_pg(
            tree,
            "pgbench",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-c",
                "2",
                "-T",
                "60",
                "-n",
                "postgres",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap()
    }

    fn check(&self, tree: &Path) -> Result<u64, String> {
        // The primary's server is stopped, frozen or gone: a server starts on this copy as
        // it would after a power cut.
        let _ = self.ctl(tree, &["stop", "-m", "immediate"]);
        let up = self.ctl(tree, &["start"]);
        if !up.status.success() {
            let log =
                std::fs::read_to_string(tree.join(PGDATA).join("server.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(3).collect();
            return Err(format!("the server does not start: {tail:?}"));
        }
        let q = self.psql(
            tree,
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts) = (SELECT coalesce(sum(delta), 0) FROM pgbench_history) \
             AND (SELECT sum(bbalance) FROM pgbench_branches) = (SELECT coalesce(sum(delta), 0) FROM pgbench_history) \
             AND (SELECT sum(tbalance) FROM pgbench_tellers) = (SELECT coalesce(sum(delta), 0) FROM pgbench_history), \
             (SELECT count(*) FROM pgbench_history)",
        );
        let _ = self.ctl(tree, &["stop", "-m", "fast"]);
        let out = String::from_utf8_lossy(&q.stdout).trim().to_string();
        match out.split_once('|') {
            Some(("t", n)) => n.parse().map_err(|e| format!("{e}: {out}")),
            _ => Err(format!(
                "pgbench's invariant does not hold: {out} {}",
                String::from_utf8_lossy(&q.stderr)
            )),
        }
    }

    fn freeze(&self, tree: &Path) -> Vec<i32> {
        self.postmaster(tree).map(descendants).unwrap_or_default()
    }
}

#[test]
fn postgres_starts_on_the_standby_after_a_sudden_primary_death() {
    let Some(pg) = Postgres::find() else {
        println!(
            "skipped: needs root and PostgreSQL (Debian package postgresql, with pgbench) \
             and its postgres user"
        );
        return;
    };
    let lost = drill(&pg, 3, false);
    println!("PostgreSQL drill: (transactions lost, changes rolled back) per trial: {lost:?}");
}

/// What a writer of the flush test does, without pause.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Steady {
    /// New files, one after another: the batch's close is a point, whatever comes after.
    NewFiles,
    /// One log appended: the tree as of the log's read is a point.
    OneLog,
    /// Two logs appended in turn: no point, since nothing tells their order.
    TwoLogs,
}

fn steady(tree: PathBuf, how: Steady, stop: Arc<AtomicBool>) {
    use std::io::Write as _;
    let open = |name: &str| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(tree.join(name))
            .unwrap()
    };
    let (mut one, mut two) = (open("one.log"), open("two.log"));
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        match how {
            Steady::NewFiles => std::fs::write(tree.join(format!("new-{n}")), b"x").unwrap(),
            Steady::OneLog => one.write_all(format!("{n}\n").as_bytes()).unwrap(),
            Steady::TwoLogs => {
                one.write_all(format!("{n}\n").as_bytes()).unwrap();
                two.write_all(format!("{n}\n").as_bytes()).unwrap();
            }
        }
        n += 1;
        // Both logs change within any check's few milliseconds, and the standby keeps
        // up (a tight loop would keep it behind: no flush of it, point or not).
        let pause = if how == Steady::TwoLogs { 1 } else { 3 };
        std::thread::sleep(Duration::from_millis(pause));
    }
}

/// On a standby that keeps consistent points, a flush returns once the standby holds one
/// at or after the flush: under a steady writer of new files, or of one log, at once; while
/// two files are written without pause, never (it names the standby as durable without a
/// point); and at once again when they stop.
#[test]
fn a_flush_waits_for_a_consistent_point_that_covers_it() {
    let base = tempfile::tempdir().unwrap();
    let a = Peer::new(base.path(), "a");
    let b = Peer::new(base.path(), "b");
    std::fs::write(a.tree.join("seed"), b"seed").unwrap();
    let _guard = WATCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (server, watch) = at_a_point(&a, &b, &[]);
    for how in [Steady::NewFiles, Steady::OneLog, Steady::TwoLogs] {
        let stop = Arc::new(AtomicBool::new(false));
        let w = {
            let (tree, stop) = (a.tree.clone(), stop.clone());
            std::thread::spawn(move || steady(tree, how, stop))
        };
        // Long enough for the point to be over a second old.
        std::thread::sleep(Duration::from_millis(1500));
        let r = flush(&a.home, &["--timeout", "4s", "--json"]);
        stop.store(true, Ordering::SeqCst);
        w.join().unwrap();
        let j = r.json();
        if how == Steady::TwoLogs {
            assert_eq!(r.code, 1, "{how:?}: {j}{}", r.stderr);
            assert_eq!(j["missing"][0]["no_consistent_point"], true, "{j}");
        } else {
            assert_eq!(r.code, 0, "{how:?}: {j}{}\n{}", r.stderr, watch.log());
        }
    }
    let r = flush(&a.home, &["--timeout", "4s", "--json"]);
    assert_eq!(r.code, 0, "quiet again: {}{}", r.stdout, r.stderr);
    converge(&a.tree, &b.tree, Duration::from_secs(10));
    drop(server);
}
