//! The sender against a standby in this process, one kind of stream at a time: the real
//! receiver on a temporary directory, or, for what a real one does only when its disk
//! fails (ask for a file again), a scripted standby speaking the protocol.

use super::{Session, SyncOptions};
use crate::error::{OpError, ProtocolError};
use crate::model::manifest::Scope;
use crate::model::path::RelPath;
use crate::model::progress::Silent;
use crate::model::summary::Summary;
use crate::primary::link::{Connector, Link, Target};
use crate::standby::{Access, Position};
use crate::transport::Connection;
use crate::tree::fsroot::Root;
use crate::wire::channel::Channel;
use crate::wire::protocol::{MAGIC, Message};
use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::sync::{Arc, Mutex};
use tempfile::TempDir;

/// A primary's tree and a standby on a local directory.
struct Pair {
    src: TempDir,
    dst: TempDir,
    standby: Connector,
}

impl Pair {
    fn new() -> Pair {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let standby = Connector::new(Target::Local(dst.path().into()), Access::Write).unwrap();
        Pair { src, dst, standby }
    }

    fn write(&self, rel: &str, data: &[u8]) {
        let path = self.src.path().join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, data).unwrap();
    }

    fn mirrored(&self, rel: &str) -> Vec<u8> {
        fs::read(self.dst.path().join(rel)).unwrap()
    }

    fn session(&self) -> Session<'static> {
        let root = Arc::new(Root::open(self.src.path()).unwrap());
        let link = self.standby.connect().unwrap();
        Session::open(root, link, &SyncOptions::default(), &Silent).unwrap()
    }

    /// A full reconcile in a session of its own.
    fn sync(&self) -> Summary {
        let mut s = self.session();
        let out = s.sync_all().unwrap();
        s.close().unwrap();
        assert!(out.summary.errors.is_empty(), "{:?}", out.summary.errors);
        out.summary
    }
}

/// `n` bytes that do not repeat (no chunk of one matches another).
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[test]
fn a_small_file_goes_inline_on_a_lane() {
    let t = Pair::new();
    t.write("d/small", b"hello");
    let s = t.sync();
    assert_eq!(t.mirrored("d/small"), b"hello");
    assert_eq!(s.files_transferred, 1);
    assert_eq!(s.dirs_created, 1);
    assert_eq!(s.bytes_literal, 5);
}

#[test]
fn a_changed_large_file_goes_as_a_delta_against_the_standby_version() {
    let t = Pair::new();
    let mut data = noise(3 << 20, 1);
    t.write("big", &data);
    let first = t.sync();
    assert_eq!(
        first.bytes_literal,
        data.len() as u64,
        "no base yet: sent whole"
    );
    data[1 << 20..(1 << 20) + 100].fill(7);
    t.write("big", &data);
    let s = t.sync();
    assert_eq!(t.mirrored("big"), data);
    assert_eq!(s.files_transferred, 1);
    assert!(
        s.bytes_matched >= 2 << 20,
        "most of it is the standby's: {s:?}"
    );
    assert!(s.bytes_literal < 1 << 20, "only the change is sent: {s:?}");
}

#[test]
fn a_sparse_file_goes_as_its_data_only() {
    let t = Pair::new();
    let size = 16u64 << 20;
    let path = t.src.path().join("sparse");
    let f = fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    f.write_all_at(&noise(64 << 10, 2), 8 << 20).unwrap();
    drop(f);
    if !crate::tree::sparse::has_holes(&rustix::fs::stat(&path).unwrap()) {
        // This filesystem keeps no holes: nothing to see here.
        return;
    }
    let s = t.sync();
    assert!(t.mirrored("sparse") == fs::read(&path).unwrap());
    assert!(s.bytes_literal < 1 << 20, "the holes are not sent: {s:?}");
    let mirrored = rustix::fs::stat(t.dst.path().join("sparse")).unwrap();
    assert!(
        crate::tree::sparse::has_holes(&mirrored),
        "the standby keeps them"
    );
}

#[test]
fn an_attribute_change_alone_sends_no_content() {
    let t = Pair::new();
    t.write("f", b"same");
    t.sync();
    let mode = |p: &std::path::Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let path = t.src.path().join("f");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    assert_ne!(mode(&t.dst.path().join("f")), 0o600);
    // One entry: the listed reconcile.
    let mut s = t.session();
    let out = s
        .sync_paths(&[], &[(RelPath::new("f").unwrap(), Scope::Entry)])
        .unwrap();
    s.close().unwrap();
    let s = out.summary;
    assert_eq!((s.files_transferred, s.bytes_literal), (0, 0), "{s:?}");
    assert!(s.metadata_updated >= 1, "{s:?}");
    assert_eq!(mode(&t.dst.path().join("f")), 0o600);
}

#[test]
fn what_the_primary_no_longer_has_is_removed() {
    let t = Pair::new();
    for name in ["keep/a", "keep/b", "gone/x", "gone/y"] {
        t.write(name, name.as_bytes());
    }
    t.sync();
    fs::remove_dir_all(t.src.path().join("gone")).unwrap();
    let s = t.sync();
    // The directory and what was in it.
    assert_eq!(s.files_deleted, 3, "{s:?}");
    assert!(!t.dst.path().join("gone").exists());
    assert_eq!(t.mirrored("keep/a"), b"keep/a");
}

#[test]
fn a_file_the_standby_could_not_make_durable_is_sent_again_whole() {
    let (link, standby) = scripted(|nth| (nth == 0).then(not_durable));
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("f"), b"data").unwrap();
    let summary = sync_to(&src, link);
    assert_eq!(summary.files_transferred, 1, "{summary:?}");
    assert!(summary.errors.is_empty(), "{:?}", summary.errors);
    let seen = standby.join().unwrap();
    let files: Vec<&String> = seen.iter().filter(|s| s.ends_with(" f")).collect();
    assert_eq!(files, ["SmallFile f", "BigFile f"]);
}

#[test]
fn a_file_never_made_durable_is_reported_after_its_last_try() {
    let (link, standby) = scripted(|_| Some(not_durable()));
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("f"), b"data").unwrap();
    let summary = sync_to(&src, link);
    assert_eq!(summary.files_transferred, 0);
    assert_eq!(summary.errors.len(), 1, "{:?}", summary.errors);
    assert_eq!(summary.errors[0].rel, RelPath::new("f").unwrap());
    // Inline, then whole twice: the second whole try is from a snapshot, and the last.
    let seen = standby.join().unwrap();
    let files: Vec<&String> = seen.iter().filter(|s| s.ends_with(" f")).collect();
    assert_eq!(files, ["SmallFile f", "BigFile f", "BigFile f"]);
}

fn not_durable() -> OpError {
    OpError::new("not durable: fsync failed", true)
}

fn sync_to(src: &TempDir, link: Link) -> Summary {
    let root = Arc::new(Root::open(src.path()).unwrap());
    super::sync(root, link, &SyncOptions::default(), &Silent)
        .unwrap()
        .summary
}

/// The other end of a link: a standby speaking protocol 2 that keeps nothing, lists itself
/// empty, and acknowledges the `nth` file it is sent (counting from 0) as `answer` says,
/// every other operation as done. Returns what it was sent, message and path, once the
/// session is over.
fn scripted(
    answer: impl Fn(usize) -> Option<OpError> + Send + Sync + 'static,
) -> (Link, std::thread::JoinHandle<Vec<String>>) {
    let (primary, end) = crate::transport::local::pair();
    let script = Script {
        answer: Box::new(answer),
        seen: Mutex::new(Vec::new()),
    };
    let standby = std::thread::spawn(move || {
        std::thread::scope(|s| {
            let mut control = true;
            while let Ok(Some(stream)) = end.accept() {
                let (script, first) = (&script, std::mem::take(&mut control));
                s.spawn(move || script.serve(Channel::new(stream), first));
            }
        });
        script.seen.into_inner().unwrap()
    });
    (Link::over(Arc::new(primary)), standby)
}

struct Script {
    answer: Box<dyn Fn(usize) -> Option<OpError> + Send + Sync>,
    seen: Mutex<Vec<String>>,
}

impl Script {
    /// Serves one stream until it ends; `control`: the first, with the handshake.
    fn serve(&self, mut ch: Channel, control: bool) -> Result<(), ProtocolError> {
        if control {
            ch.r.greeting()?;
            ch.recv()?;
            let mut greeting = MAGIC.to_vec();
            greeting.extend(2u16.to_le_bytes());
            greeting.extend(2u16.to_le_bytes());
            ch.w.write_raw(&greeting)?;
            let position = Position::default();
            ch.send(&Message::Opened {
                owners: false,
                position,
            })?;
            ch.flush()?;
        }
        while let Some(msg) = ch.recv_opt()? {
            if !self.answer(&mut ch, msg)? {
                break;
            }
            ch.flush()?;
        }
        ch.finish()
    }

    /// Answers `msg`; false once the session is closed.
    fn answer(&self, ch: &mut Channel, msg: Message) -> Result<bool, ProtocolError> {
        let name = msg.name();
        let reply = match msg {
            Message::List { .. } => {
                ch.send(&Message::Entries {
                    entries: Vec::new(),
                    errors: Vec::new(),
                })?;
                Message::ListEnd {
                    count: 0,
                    temps_removed: 0,
                }
            }
            Message::Heartbeat(beat) => Message::Heartbeat(beat),
            Message::Flush { seq } => Message::Flushed { seq },
            Message::Close => {
                ch.send(&Message::Closed)?;
                return Ok(false);
            }
            Message::SmallFile { id, path, len, .. } => {
                ch.r.read_raw(&mut vec![0; len as usize])?;
                self.file(id, name, &path)
            }
            Message::BigFile { id, path, size, .. } => {
                ch.r.read_raw(&mut vec![0; size as usize])?;
                match ch.recv()? {
                    Message::FileEnd { .. } => self.file(id, name, &path),
                    other => return Err(ProtocolError::unexpected(&other, "FileEnd")),
                }
            }
            other => {
                let Some(id) = other.op_id() else {
                    return Err(ProtocolError::unexpected(&other, "an operation"));
                };
                self.seen.lock().unwrap().push(name.into());
                Message::Ack { id, error: None }
            }
        };
        ch.send(&reply)?;
        Ok(true)
    }

    /// The acknowledgement of a file sent as operation `id` in a `kind` message.
    fn file(&self, id: u64, kind: &str, path: &RelPath) -> Message {
        let mut seen = self.seen.lock().unwrap();
        let nth = seen.iter().filter(|s| s.contains(' ')).count();
        seen.push(format!("{kind} {path}"));
        Message::Ack {
            id,
            error: (self.answer)(nth),
        }
    }
}
