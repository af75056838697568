//! Consistent points through the real binaries (DESIGN §10): an application writes on the
//! primary, the primary node dies at a random moment (the writer and `watch` frozen in the
//! same instant with SIGSTOP, then SIGKILLed), the standby is promoted, and the
//! application's own checker runs on the promoted tree.

use crate::helpers::*;
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A node: its home (identity, control socket) and its tree.
struct Node {
    home: PathBuf,
    tree: PathBuf,
    id: String,
}

impl Node {
    fn new(base: &Path, name: &str) -> Node {
        let home = base.join(format!("{name}-home"));
        let tree = base.join(name);
        std::fs::create_dir_all(&tree).unwrap();
        let id = keygen(&home);
        Node { home, tree, id }
    }

    fn pre(&self) -> Vec<OsString> {
        vec!["--home".into(), self.home.clone().into()]
    }

    fn state(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.tree.join(".hotsync/state")).unwrap_or_default())
            .unwrap_or_default()
    }
}

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

fn have_git() -> bool {
    Command::new("git")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
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

/// The node's death: the writer's process group and the watch stopped in one instant,
/// then killed.
fn die(writer: &mut Child, watch: &mut Watch) {
    use rustix::process::{Pid, Signal, kill_process, kill_process_group};
    let group = Pid::from_raw(writer.id() as i32).unwrap();
    let w = Pid::from_raw(watch.child.id() as i32).unwrap();
    let _ = kill_process_group(group, Signal::STOP);
    let _ = kill_process(w, Signal::STOP);
    let _ = kill_process_group(group, Signal::KILL);
    let _ = kill_process(w, Signal::KILL);
    let _ = writer.wait();
    let _ = watch.child.wait();
}

/// A small deterministic generator for the moment of death.
fn moment(trial: u64) -> Duration {
    let x = (trial + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33;
    Duration::from_millis(250 + x % 700)
}

#[test]
fn git_is_usable_on_the_standby_after_a_sudden_primary_death() {
    if !have_git() {
        println!("skipped: git is not installed (Debian package git)");
        return;
    }
    const TRIALS: u64 = 5;
    let mut lost = Vec::new();
    for trial in 0..TRIALS {
        let base = tempfile::tempdir().unwrap();
        let a = Node::new(base.path(), "a");
        let b = Node::new(base.path(), "b");
        assert!(git(&a.tree, &["init", "-q"]).status.success());
        write(&a.tree.join("n"), b"0\n");
        assert!(git(&a.tree, &["add", "-A"]).status.success());
        assert!(git(&a.tree, &["commit", "-q", "-m", "c0"]).status.success());

        let _guard = WATCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let server = Server::start_with(
            &b.tree,
            &b.home,
            &[&a.id],
            &["--json", "--consistency", "consistent"],
        );
        let mut watch = Watch::start(
            &a.pre(),
            &a.tree,
            server.url().as_ref(),
            &["--server-id", &server.id],
        );
        watch.wait_ready();
        // The standby holds a first consistent point before the application starts.
        wait_for("a first consistent point", Duration::from_secs(10), || {
            b.state()["consistent"].is_object().then_some(())
        });
        let mut writer = commit_loop(&a.tree);
        std::thread::sleep(moment(trial));
        die(&mut writer, &mut watch);
        let commits_primary = count_commits(&a.tree);

        let started = Instant::now();
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

        let fsck = git(&b.tree, &["fsck", "--full"]);
        assert!(
            fsck.status.success(),
            "trial {trial}: git fsck on the promoted standby failed:\n{}\n{report}",
            String::from_utf8_lossy(&fsck.stderr)
        );
        let commits_standby = count_commits(&b.tree);
        assert!(commits_standby >= 1 && commits_standby <= commits_primary);
        lost.push((
            commits_primary - commits_standby,
            report["rolled_back"].as_u64().unwrap_or(0),
            started.elapsed(),
        ));
        drop(server);
    }
    println!(
        "git drill, {TRIALS} trials: (commits lost, changes rolled back, promote time) {lost:?}"
    );
}

fn count_commits(dir: &Path) -> u64 {
    let o = git(dir, &["rev-list", "--count", "HEAD"]);
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}
