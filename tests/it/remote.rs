//! A standby behind `hotsync serve`, over real QUIC on 127.0.0.1.

use crate::helpers::*;
use crate::local::{
    edits_of_every_kind, every_kind_round_trips,
    only_reserved_names_are_left_out_and_each_is_reported, over_path_max,
};
use hotsync::transport::Connection;
use hotsync::transport::identity;
use hotsync::wire::protocol::{FrameReader, FrameWriter, Message};
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn remote_every_kind_round_trips() {
    let t = Pair::new();
    let m = RemoteMirror::start(t.dir.path(), &t.dst);
    every_kind_round_trips(&m, &t.src);
}

#[test]
fn remote_only_reserved_names_are_left_out_and_each_is_reported() {
    let t = Pair::new();
    let m = RemoteMirror::start(t.dir.path(), &t.dst);
    only_reserved_names_are_left_out_and_each_is_reported(&m, &t.src);
}

#[test]
fn remote_hard_linked_symlinks_stay_one_inode() {
    let t = Pair::new();
    let m = RemoteMirror::start(t.dir.path(), &t.dst);
    crate::local::hard_linked_symlinks(&m, &t.src);
}

#[test]
fn remote_standby_keeps_no_special_file_the_primary_lacks() {
    let t = Pair::new();
    let m = RemoteMirror::start(t.dir.path(), &t.dst);
    crate::local::standby_specials(&m, &t.src);
}

#[test]
fn remote_edits_of_every_kind() {
    let t = Pair::new();
    let m = RemoteMirror::start(t.dir.path(), &t.dst);
    edits_of_every_kind(&m, &t.src);
}

#[test]
fn remote_a_path_over_path_max_is_an_error_naming_the_limit() {
    let t = Pair::new();
    let m = RemoteMirror::start(t.dir.path(), &t.dst);
    over_path_max(&m, &t.src);
}

#[test]
fn an_unlisted_primary_is_refused_and_nothing_is_touched() {
    let t = Pair::new();
    write(&t.s("a"), b"a");
    std::fs::create_dir(&t.dst).unwrap();
    let m = RemoteMirror::start(t.dir.path(), &t.dst);
    let stranger_home = t.dir.path().join("stranger");
    let stranger = keygen(&stranger_home);
    let r = run([
        "--home".as_ref(),
        stranger_home.as_os_str(),
        "sync".as_ref(),
        t.src.as_os_str(),
        m.server.url().as_ref(),
        "--server-id".as_ref(),
        m.server.id.as_ref(),
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains(&stranger) && r.stderr.contains("not allowed"),
        "{}",
        r.stderr
    );
    // (`serve` keeps its lock and state in `.hotsync` from the start.)
    let written: Vec<_> = std::fs::read_dir(&t.dst)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != ".hotsync")
        .collect();
    assert!(
        written.is_empty(),
        "written for a refused peer: {written:?}"
    );
    assert!(
        m.server.log().contains(&format!("primary {stranger}")),
        "{}",
        m.server.log()
    );
    // The server is still there for the allowed primary.
    m.sync_ok(&t.src, &[]);
    assert_same_tree(&t.src, &t.dst);
}

#[test]
fn a_wrong_or_missing_server_id_is_refused() {
    let t = Pair::new();
    write(&t.s("a"), b"a");
    let m = RemoteMirror::start(t.dir.path(), &t.dst);
    let other = keygen(&t.dir.path().join("other"));
    let mut args = m.args(&t.src, &[]);
    args[6] = other.clone().into();
    let r = run(&args);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains(&m.server.id) && r.stderr.contains(&other),
        "names both IDs: {}",
        r.stderr
    );
    args.truncate(5);
    let r = run(&args);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("--server-id"), "{}", r.stderr);
    args.extend(["--server-id".into(), "nonsense".into()]);
    let r = run(&args);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("bad ID"), "{}", r.stderr);
    assert!(!t.d("a").exists());
}

#[test]
fn an_unreachable_standby_fails_fast_and_clearly() {
    let t = Pair::new();
    write(&t.s("a"), b"a");
    let home = t.dir.path().join("p");
    keygen(&home);
    // A port nobody listens on: bind one and drop it.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let other = keygen(&t.dir.path().join("o"));
    let start = Instant::now();
    let r = run([
        "--home".as_ref(),
        home.as_os_str(),
        "sync".as_ref(),
        t.src.as_os_str(),
        format!("quic://127.0.0.1:{port}").as_ref(),
        "--server-id".as_ref(),
        other.as_ref(),
    ]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("cannot reach"), "{}", r.stderr);
    assert!(start.elapsed() < Duration::from_secs(15));
}

#[test]
fn a_receiver_killed_mid_transfer_fails_the_sync_in_bounded_time() {
    let t = Pair::new();
    write(&t.s("big.bin"), &noise(150 << 20, 1));
    for i in 0..400 {
        write(&t.s(&format!("small/f{i}")), &noise(3000 + i, i as u64));
    }
    let mut m = RemoteMirror::start(t.dir.path(), &t.dst);
    let mut child = hotsync(false)
        .args(m.args(&t.src, &["-q"]))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the standby once the big file is on its way.
    let start = Instant::now();
    while !receiving(&m.server, &t.dst) && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(2));
    }
    m.server.child.kill().unwrap();
    m.server.child.wait().unwrap();
    let killed_at = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(25),
            "sync hangs after the standby died"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("standby"), "{err}");
    // Whatever landed is whole.
    for f in walk_files(&t.dst) {
        let rel = f.strip_prefix(&t.dst).unwrap();
        if rel.starts_with(".hotsync")
            || f.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".hotsync-tmp.")
        {
            continue;
        }
        assert_eq!(
            std::fs::read(&f).unwrap(),
            std::fs::read(t.src.join(rel)).unwrap(),
            "{rel:?} is torn"
        );
    }
    // A new standby on the same root: the re-run converges and cleans up.
    let server = Server::start(
        &t.dst,
        &t.dir.path().join("server-home"),
        &[&keygen(&m.primary_home)],
    );
    m.server = server;
    m.sync_ok(&t.src, &[]);
    assert_same_tree(&t.src, &t.dst);
    assert!(temps(&t.dst).is_empty());
}

fn walk_files(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else if e.file_type().unwrap().is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

/// A primary that speaks the protocol by hand, to send what a correct one never would.
struct Hostile {
    rt: tokio::runtime::Runtime,
    me: identity::Identity,
    url: String,
    server: identity::NodeId,
}

impl Hostile {
    fn new(m: &RemoteMirror) -> Hostile {
        Hostile {
            rt: hotsync::transport::quic::runtime().unwrap(),
            me: identity::load(&m.primary_home).unwrap(),
            url: m.server.url(),
            server: identity::NodeId::parse(&m.server.id).unwrap(),
        }
    }

    /// Connects, opens a session (greeting, `Open`) unless `raw` (then only the greeting),
    /// then lets `f` misbehave on the control stream.
    fn session(
        &self,
        raw: bool,
        f: impl FnOnce(
            &mut FrameReader<Box<dyn std::io::Read + Send>>,
            &mut FrameWriter<Box<dyn hotsync::transport::SendHalf>>,
        ),
    ) {
        self.stream(Some(raw), f)
    }

    /// Connects and lets `f` speak first on the control stream, greeting included.
    fn bare(
        &self,
        f: impl FnOnce(
            &mut FrameReader<Box<dyn std::io::Read + Send>>,
            &mut FrameWriter<Box<dyn hotsync::transport::SendHalf>>,
        ),
    ) {
        self.stream(None, f)
    }

    fn stream(
        &self,
        raw: Option<bool>,
        f: impl FnOnce(
            &mut FrameReader<Box<dyn std::io::Read + Send>>,
            &mut FrameWriter<Box<dyn hotsync::transport::SendHalf>>,
        ),
    ) {
        let conn =
            hotsync::transport::quic::connect(self.rt.handle(), &self.url, self.server, &self.me)
                .unwrap();
        let mut ch = hotsync::wire::channel::Channel::open(&conn).unwrap();
        if raw == Some(true) {
            ch.w.greeting().unwrap();
        } else if raw == Some(false) {
            let open = Message::Open {
                excludes: vec![],
                mode: hotsync::wire::protocol::SessionMode::Write,
                epoch: 1,
            };
            ch.open_session(&open).unwrap();
            assert!(matches!(ch.recv().unwrap(), Message::Opened { .. }));
            // Whatever the standby can keep, this session asks for.
            let Message::Keeps { can } = ch.recv().unwrap() else {
                panic!("no Keeps")
            };
            ch.send(&Message::Keep { policy: can }).unwrap();
        }
        let hotsync::wire::channel::Channel { r, w } = &mut ch;
        f(r, w);
        let _ = ch.flush();
        // Give the standby a moment to react, then hang up.
        std::thread::sleep(Duration::from_millis(200));
        conn.abort("hostile test done");
    }
}

/// A frame carrying `msg` with the path placeholder `pp…` replaced by `bad`.
fn patched(msg: &Message, bad: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    hotsync::wire::protocol::encode(msg, &mut frame).unwrap();
    let at = frame
        .windows(bad.len())
        .position(|w| w.iter().all(|&b| b == b'p'))
        .unwrap();
    frame[at..at + bad.len()].copy_from_slice(bad);
    frame
}

#[test]
fn hostile_frames_are_rejected_and_the_standby_stays_up() {
    let t = Pair::new();
    let outside = t.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    write(&t.s("ok.txt"), b"fine");
    let m = RemoteMirror::start(t.dir.path(), &t.dst);
    m.sync_ok(&t.src, &[]);
    symlink(outside.as_os_str().as_encoded_bytes(), &t.d("door"));
    let h = Hostile::new(&m);
    let meta = hotsync::model::manifest::Meta {
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: hotsync::model::manifest::Mtime { sec: 1, nsec: 0 },
        xattrs: Default::default(),
    };
    let placeholder = |n: usize| hotsync::model::path::RelPath::new(vec![b'p'; n]).unwrap();

    // A frame length far beyond the limit.
    h.session(true, |_, w| {
        w.write_raw(&u32::MAX.to_le_bytes()).unwrap();
    });
    // Paths that try to leave the root.
    for bad in [&b"../evil"[..], b"/tmp/evil", b"a/../../x"] {
        h.session(false, |_, w| {
            let msg = Message::Mkdir {
                id: 1,
                path: placeholder(bad.len()),
            };
            w.write_raw(&patched(&msg, bad)).unwrap();
        });
    }
    // A path through a symlink on the standby: refused, nothing written outside.
    h.session(false, |r, w| {
        let path = hotsync::model::path::RelPath::new("door/evil").unwrap();
        w.send(&Message::SmallFile {
            id: 7,
            path,
            meta,
            len: 4,
        })
        .unwrap();
        w.write_raw(b"evil").unwrap();
        w.send(&Message::Flush { seq: 1 }).unwrap();
        w.flush().unwrap();
        match r.recv().unwrap() {
            Message::Ack {
                id: 7,
                error: Some(e),
            } => assert!(e.message.contains("symlink"), "{e:?}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    });
    // Extended attributes beyond what the session keeps, beyond the bounds, or before an
    // operation that takes none: each ends the session before anything is set.
    let attr = |name: &[u8], value: Vec<u8>| hotsync::model::xattrs::Xattr {
        name: name.to_vec(),
        value,
    };
    let too_many = (0..=hotsync::model::xattrs::MAX_COUNT)
        .map(|i| attr(format!("user.{i:05}").as_bytes(), vec![]))
        .collect();
    for (attrs, then_mkdir) in [
        (vec![attr(b"system.nfs4_acl", vec![1])], false),
        (too_many, false),
        (
            vec![attr(
                b"user.big",
                vec![0; hotsync::model::xattrs::MAX_VALUE + 1],
            )],
            false,
        ),
        (vec![attr(b"user.ok", vec![1])], true),
    ] {
        h.session(false, |_, w| {
            let path = hotsync::model::path::RelPath::new("attrs.txt").unwrap();
            w.send(&Message::Xattrs {
                attrs: hotsync::model::xattrs::Xattrs(attrs),
            })
            .unwrap();
            if then_mkdir {
                w.send(&Message::Mkdir { id: 3, path }).unwrap();
            } else {
                w.send(&Message::SmallFile {
                    id: 3,
                    path,
                    meta,
                    len: 1,
                })
                .unwrap();
                w.write_raw(b"x").unwrap();
            }
            w.send(&Message::Flush { seq: 1 }).unwrap();
        });
    }
    // A file cut off mid-way by a disconnect.
    h.session(false, |_, w| {
        let path = hotsync::model::path::RelPath::new("cut.bin").unwrap();
        w.send(&Message::BigFile {
            id: 9,
            path,
            meta,
            size: 1 << 20,
        })
        .unwrap();
        w.write_raw(&[7u8; 1000]).unwrap();
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "nothing written outside the root"
    );
    assert!(!t.d("cut.bin").exists());
    assert!(
        !t.d("attrs.txt").exists(),
        "no hostile attribute set was acted on"
    );
    assert!(
        temps(&t.dst).is_empty(),
        "the cut-off file's temp was removed"
    );
    let log = m.server.log();
    assert!(log.contains("exceeds"), "{log}");
    assert!(log.matches("failed").count() >= 4, "{log}");
    for why in [
        "outside what this session mirrors",
        "extended attributes on one entry (at most 1024)",
        "of 65537 bytes (at most 65536)",
        "extended attributes before Mkdir",
    ] {
        assert!(log.contains(why), "{why}: {log}");
    }
    // A well-behaved primary is served as ever.
    std::fs::remove_file(t.d("door")).unwrap();
    write(&t.s("more.txt"), b"more");
    m.sync_ok(&t.src, &[]);
    assert_same_tree(&t.src, &t.dst);
}

#[test]
fn two_primaries_on_one_root_do_not_interfere() {
    let t = Pair::new();
    for i in 0..300 {
        write(&t.s(&format!("f{i}")), &noise(20_000, i));
    }
    let m = RemoteMirror::start(t.dir.path(), &t.dst);
    let a = hotsync(false)
        .args(m.args(&t.src, &["-q"]))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let b = hotsync(false)
        .args(m.args(&t.src, &["-q"]))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let codes = [a.status.code(), b.status.code()];
    // Both finish; if they overlapped, the second was told the standby is busy.
    for o in [&a, &b] {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.code() == Some(0) || err.contains("in use"),
            "{codes:?}: {err}"
        );
    }
    m.sync_ok(&t.src, &[]);
    assert_same_tree(&t.src, &t.dst);
}

#[test]
fn serve_refuses_to_start_with_a_reason() {
    let t = Pair::new();
    let home = t.dir.path().join("h");
    let id = keygen(&home);
    write(&t.s("file"), b"f");
    let serve = |root: &std::path::Path, extra: &[&str]| {
        let mut a: Vec<std::ffi::OsString> = vec![
            "--home".into(),
            home.clone().into(),
            "serve".into(),
            "--root".into(),
            root.into(),
        ];
        a.extend(extra.iter().map(|s| (*s).into()));
        run(a)
    };
    let cases = [
        (
            serve(
                &t.dir.path().join("missing"),
                &["--allow", &id, "--listen", "127.0.0.1:0"],
            ),
            "does not exist",
        ),
        (
            serve(&t.s("file"), &["--allow", &id, "--listen", "127.0.0.1:0"]),
            "not a directory",
        ),
        (serve(&t.src, &["--listen", "127.0.0.1:0"]), "--allow"),
        (
            serve(&t.src, &["--allow", "xyz", "--listen", "127.0.0.1:0"]),
            "bad ID",
        ),
    ];
    for (r, needle) in cases {
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(r.stderr.contains(needle), "{needle}: {}", r.stderr);
        assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    }
    let running = Server::start(&t.src, &home, &[&id]);
    let r = serve(
        &t.src,
        &[
            "--allow",
            &id,
            "--listen",
            &format!("127.0.0.1:{}", running.port),
        ],
    );
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("already in use"), "{}", r.stderr);
}

#[test]
fn serve_stops_cleanly_on_sigterm() {
    let t = Pair::new();
    let home = t.dir.path().join("h");
    let pid = keygen(&t.dir.path().join("p"));
    let mut s = Server::start(&t.src, &home, &[&pid]);
    s.signal(rustix::process::Signal::TERM);
    let status = s
        .wait(Duration::from_secs(5))
        .expect("serve did not stop on SIGTERM");
    assert_eq!(status.code(), Some(0));
    assert!(s.log().contains("stopped"), "{}", s.log());
}

/// A greeting as a protocol-1 hotsync sends it.
fn v1_greeting() -> Vec<u8> {
    let mut g = hotsync::wire::protocol::MAGIC.to_vec();
    g.extend_from_slice(&1u16.to_le_bytes());
    g.extend_from_slice(&1u16.to_le_bytes());
    g
}

#[test]
fn a_version_5_primary_is_listed_as_it_was_before_shapes_and_specials() {
    // What a version 5 primary cannot decode (`Shapes`, `Specials`) or plan (a symlink
    // with a link key) never reaches it.
    let t = Pair::new();
    write(&t.s("f"), b"f");
    let m = RemoteMirror::start(t.dir.path(), &t.dst);
    m.sync_ok(&t.src, &[]);
    mkfifo(&t.d("fifo"));
    symlink(b"f", &t.d("sl"));
    hard_link(&t.d("sl"), &t.d("sl2"));
    write(&t.d("big"), &noise(100_000, 3));
    hard_link(&t.d("big"), &t.d("big2"));
    let h = Hostile::new(&m);
    let mut got = Vec::new();
    h.bare(|r, w| {
        let mut g = hotsync::wire::protocol::MAGIC.to_vec();
        g.extend_from_slice(&5u16.to_le_bytes());
        g.extend_from_slice(&2u16.to_le_bytes());
        w.write_raw(&g).unwrap();
        w.send(&Message::Open {
            excludes: vec![],
            mode: hotsync::wire::protocol::SessionMode::ReadOnly,
            epoch: 1,
        })
        .unwrap();
        w.flush().unwrap();
        // (Its greeting offers 6; the standby speaks the 5 this primary offered.)
        r.greeting().unwrap();
        assert!(matches!(r.recv().unwrap(), Message::Opened { .. }));
        let Message::Keeps { can } = r.recv().unwrap() else {
            panic!("no Keeps")
        };
        w.send(&Message::Keep { policy: can }).unwrap();
        w.send(&Message::List {
            scopes: vec![(
                hotsync::model::path::RelPath::root(),
                hotsync::model::manifest::Scope::Tree,
            )],
            checksum: false,
            hash_rate: 0,
        })
        .unwrap();
        w.flush().unwrap();
        loop {
            let msg = r.recv().unwrap();
            let end = matches!(msg, Message::ListEnd { .. });
            got.push(msg);
            if end {
                break;
            }
        }
    });
    let mut names = Vec::new();
    for msg in &got {
        match msg {
            Message::Entries { entries, .. } => {
                for e in entries {
                    names.push(e.path.to_string());
                    let symlink = matches!(e.kind, hotsync::model::manifest::Kind::Symlink { .. });
                    assert_eq!(
                        e.link.is_some(),
                        e.path.to_string().starts_with("big"),
                        "{e:?}"
                    );
                    assert!(!symlink || e.link.is_none());
                }
            }
            Message::ListEnd { .. } | Message::XattrSums { .. } => {}
            other => panic!("a version 5 primary got {}", other.name()),
        }
    }
    names.sort();
    assert_eq!(names, [".", "big", "big2", "f", "sl", "sl2"]);
}

#[test]
fn a_version_1_primary_is_refused_with_both_versions_named() {
    let t = Pair::new();
    write(&t.s("f"), b"f");
    let m = RemoteMirror::start(t.dir.path(), &t.dst);
    let h = Hostile::new(&m);
    h.bare(|r, w| {
        w.write_raw(&v1_greeting()).unwrap();
        w.flush().unwrap();
        // The standby's own greeting (what a version 1 peer reads, and refuses by itself),
        // unless its close, which names both versions too, overtook it.
        let mut g = [0u8; 12];
        match r.read_raw(&mut g) {
            Ok(()) => {
                assert_eq!(&g[..8], hotsync::wire::protocol::MAGIC);
                let ours = (
                    hotsync::wire::protocol::VERSION as u8,
                    hotsync::wire::protocol::MIN_VERSION as u8,
                );
                assert_eq!((g[8], g[10]), ours, "the standby's versions");
            }
            // (The reason is in the close, which only the error's Debug form shows.)
            Err(e) => assert!(format!("{e:?}").contains("the peer speaks 1"), "{e:?}"),
        }
    });
    let start = Instant::now();
    while !m.server.log().contains("protocol version mismatch") {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{}",
            m.server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = m.server.log();
    assert!(
        log.contains(&format!(
            "speaks protocol {}",
            hotsync::wire::protocol::VERSION
        )) && log.contains("the peer speaks 1"),
        "{log}"
    );
    // Nothing written, and a current primary is served as ever.
    assert!(!t.d("f").exists());
    m.sync_ok(&t.src, &[]);
    assert_same_tree(&t.src, &t.dst);
}

#[test]
fn a_version_1_standby_is_refused_with_both_versions_named() {
    let t = Pair::new();
    write(&t.s("f"), b"f");
    // A standby that answers as protocol 1 would: the real QUIC endpoint, a v1 greeting.
    let home = t.dir.path().join("old-standby");
    let standby_id = keygen(&home);
    let primary_home = t.dir.path().join("p");
    keygen(&primary_home);
    let rt = hotsync::transport::quic::runtime().unwrap();
    let me = identity::load(&home).unwrap();
    let server = hotsync::transport::quic::bind(rt.handle(), "127.0.0.1:0", &me).unwrap();
    let port = server.addr.port();
    let handle = rt.handle().clone();
    let old = std::thread::spawn(move || {
        let conn = handle.block_on(async {
            let inc = server.endpoint.accept().await.unwrap();
            inc.await.unwrap()
        });
        let qc = hotsync::transport::quic::QuicConnection::new(conn, handle.clone());
        let s = qc.accept().unwrap().unwrap();
        let mut w = FrameWriter::new(s.send);
        w.write_raw(&v1_greeting()).unwrap();
        w.flush().unwrap();
        let mut r = FrameReader::new(s.recv);
        let mut g = [0u8; 12];
        let _ = r.read_raw(&mut g);
        std::thread::sleep(Duration::from_millis(300));
        g
    });
    let r = run([
        "--home".as_ref(),
        primary_home.as_os_str(),
        "sync".as_ref(),
        t.src.as_os_str(),
        format!("quic://127.0.0.1:{port}").as_ref(),
        "--server-id".as_ref(),
        standby_id.as_ref(),
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "speaks protocol {}",
            hotsync::wire::protocol::VERSION
        )) && r.stderr.contains("the peer speaks 1"),
        "{}",
        r.stderr
    );
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    let g = old.join().unwrap();
    assert_eq!(
        (g[8], g[10]),
        (
            hotsync::wire::protocol::VERSION as u8,
            hotsync::wire::protocol::MIN_VERSION as u8
        ),
        "the old standby heard our versions too"
    );
}

#[test]
fn starting_serve_does_not_make_an_identical_copy_differ() {
    // serve keeps its lock and state in `.hotsync` from the start; making that directory must
    // not change the root's mtime, which is mirrored data.
    let t = Pair::new();
    write(&t.s("d/f"), b"f");
    write(&t.s("g"), b"g");
    set_mtime(&t.s("d"), 1_600_000_000, 1);
    set_mtime(&t.src, 1_600_000_000, 2);
    let ok = Command::new("cp")
        .arg("-a")
        .arg(&t.src)
        .arg(&t.dst)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    assert_same_tree(&t.src, &t.dst);
    let m = RemoteMirror::start(t.dir.path(), &t.dst);
    assert!(t.d(".hotsync/lock").exists());
    let r = run([
        "--home".as_ref(),
        m.primary_home.as_os_str(),
        "verify".as_ref(),
        t.src.as_os_str(),
        m.server.url().as_ref(),
        "--server-id".as_ref(),
        m.server.id.as_ref(),
        "--json".as_ref(),
    ]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(r.json()["identical"], true);
}
