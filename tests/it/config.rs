//! `--config FILE`: a config file drives sync, watch, flush and serve; the command line
//! overrides it; a bad file is one line naming its line and key.

use crate::helpers::*;
use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

fn h(home: &Path, args: &[&str]) -> Run {
    let mut a: Vec<OsString> = vec!["--home".into(), home.into()];
    a.extend(args.iter().map(OsString::from));
    run(a)
}

#[test]
fn a_config_file_drives_the_commands_and_the_command_line_overrides_it() {
    let base = tempfile::tempdir().unwrap();
    let base = base.path();
    let home = base.join("home");
    let me = keygen(&home);
    let src = base.join("data");
    write(&src.join("keep.txt"), b"kept\n");
    write(&src.join("skip.tmp"), b"scratch\n");
    write(&src.join("debug.log"), b"log\n");
    let t1 = base.join("t1");
    std::fs::create_dir_all(&t1).unwrap();
    // The standby's serve from the file's [serve] table.
    let shome = base.join("shome");
    let sid = keygen(&shome);
    let scfg = base.join("standby.toml");
    std::fs::write(
        &scfg,
        format!("[serve]\nroot = \"t1\"\nlisten = \"127.0.0.1:0\"\nallow = [\"{me}\"]\n"),
    )
    .unwrap();
    let server = Server::launch(&shome, &["--config".into(), scfg.into(), "serve".into()]);
    let cfg = base.join("hotsync.toml");
    std::fs::write(
        &cfg,
        format!(
            "source = \"data\"\nexclude = [\"*.tmp\"]\nmax-delay = \"100ms\"\n\n\
             [[standby]]\nname = \"near\"\naddress = \"copy\"\n\n\
             [[standby]]\nname = \"far\"\naddress = \"quic://127.0.0.1:{}\"\nserver-id = \"{sid}\"\n",
            server.port
        ),
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    let r = h(&home, &["--config", c, "sync", "--json"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let j = r.json();
    let names: Vec<&str> = j["standbys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["standby"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["near", "far"], "{j}");
    let copy = base.join("copy");
    for t in [&copy, &t1] {
        assert!(t.join("keep.txt").exists() && t.join("debug.log").exists());
        assert!(!t.join("skip.tmp").exists(), "the file's exclude");
    }
    // The command line's --exclude wins over the file's.
    write(&src.join("new.log"), b"log\n");
    let r = h(&home, &["--config", c, "sync", "--exclude", "*.log"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(copy.join("skip.tmp").exists() && !copy.join("new.log").exists());

    // watch from the file: the standbys carry the file's names; flush finds the tree.
    let pre: Vec<OsString> = vec![
        "--home".into(),
        home.clone().into(),
        "--config".into(),
        cfg.clone().into(),
    ];
    let mut w = watch_configured(&pre);
    wait_for("the watch's standbys", Duration::from_secs(20), || {
        let (_, v) = status(&home);
        let names: Vec<String> = v["instances"][0]["replicas"]
            .as_array()?
            .iter()
            .filter(|r| r["connected"] == true)
            .map(|r| r["standby"].as_str().unwrap().to_string())
            .collect();
        (names == ["near", "far"]).then_some(())
    });
    write(&src.join("later.txt"), b"later\n");
    let r = h(&home, &["--config", c, "flush"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("near, far"), "{}", r.stdout);
    assert_eq!(std::fs::read(t1.join("later.txt")).unwrap(), b"later\n");
    let _ = w.kill();
    let _ = w.wait();

    // A bad file: one line naming the file, the line and the key; nothing runs.
    std::fs::write(&cfg, "source = \"data\"\nquorum = 0\n").unwrap();
    let r = h(&home, &["--config", c, "watch"]);
    assert_eq!(r.code, 2);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("hotsync.toml:2: quorum: 0 is out of range"),
        "{}",
        r.stderr
    );
    std::fs::write(&cfg, "source = \"data\"\nmax-dleay = \"1s\"\n").unwrap();
    let r = h(&home, &["--config", c, "sync"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .contains("hotsync.toml:2: unknown field `max-dleay`"),
        "{}",
        r.stderr
    );
    drop(server);
}

/// `hotsync [pre...] watch` with only the config file's settings.
fn watch_configured(pre: &[OsString]) -> std::process::Child {
    std::process::Command::new(bin())
        .args(pre)
        .arg("watch")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}
