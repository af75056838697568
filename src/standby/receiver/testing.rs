//! A primary for the receiver's tests: a standby on a temporary directory, served by
//! [`super::serve`] over the in-process transport (as a local DEST is), and driven here
//! message by message.

use crate::error::Error;
use crate::error::OpError;
use crate::model::manifest::{Meta, Mtime};
use crate::model::path::RelPath;
use crate::model::xattrs::Policy;
use crate::standby::{Access, Peer, SessionReport, Standby};
use crate::transport::Connection;
use crate::transport::local::{self, LocalConnection};
use crate::wire::channel::Channel;
use crate::wire::handshake::{self, Hello};
use crate::wire::protocol::{Message, SessionMode};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

/// The primary's end of a session with a receiver serving a temporary tree.
pub(super) struct Primary {
    tree: tempfile::TempDir,
    conn: LocalConnection,
    /// The control stream.
    pub(super) ctrl: Channel,
    /// The standby the receiver writes.
    pub(super) standby: Arc<Standby>,
    served: Option<JoinHandle<Result<SessionReport, Error>>>,
}

impl Primary {
    /// Opens a session of `mode` with a receiver of a new, empty tree.
    pub(super) fn start(mode: SessionMode) -> Primary {
        Primary::start_with(mode, |_| {})
    }

    /// [`Primary::start`], with the tree prepared by `prepare` first.
    pub(super) fn start_with(mode: SessionMode, prepare: impl FnOnce(&Path)) -> Primary {
        let tree = tempfile::tempdir().unwrap();
        prepare(tree.path());
        let standby = Arc::new(Standby::open(tree.path(), Access::Write).unwrap());
        let (conn, end) = local::pair();
        let end: Arc<dyn Connection> = Arc::new(end);
        let serving = standby.clone();
        let served = std::thread::spawn(move || super::serve(end, &serving, Peer::local()));
        let mut ctrl = Channel::open(&conn).unwrap();
        let hello = Hello {
            excludes: vec![],
            mode,
            epoch: 1,
        };
        handshake::open(&mut ctrl, &hello, |_| Policy::none()).unwrap();
        Primary {
            tree,
            conn,
            ctrl,
            standby,
            served: Some(served),
        }
    }

    /// The standby's tree.
    pub(super) fn tree(&self) -> &Path {
        self.tree.path()
    }

    /// A new stream of the session (a lane, or one file's stream).
    pub(super) fn stream(&self) -> Channel {
        Channel::open(&self.conn).unwrap()
    }

    /// Closes the session cleanly; what the receiver's session came to.
    pub(super) fn close(mut self) -> Result<SessionReport, Error> {
        self.ctrl.send(&Message::Close).unwrap();
        self.ctrl.flush().unwrap();
        loop {
            match self.ctrl.recv() {
                Ok(Message::Closed) => break,
                Ok(Message::Ack { .. }) => continue,
                other => panic!("expected Closed, got {other:?}"),
            }
        }
        self.ended()
    }

    /// Waits for the receiver's session to end (after the primary broke the protocol, or
    /// closed it); what it came to.
    pub(super) fn ended(&mut self) -> Result<SessionReport, Error> {
        let served = self.served.take().expect("the session is waited for once");
        served.join().unwrap()
    }

    /// Why the connection ended, as the primary sees it.
    pub(super) fn failure(&self) -> Option<Error> {
        self.conn.failure()
    }
}

impl Drop for Primary {
    /// A test that ends early (or fails) leaves no receiver behind.
    fn drop(&mut self) {
        self.conn.abort("the test is over");
        if let Some(served) = self.served.take() {
            let _ = served.join();
        }
    }
}

/// `path` as a name the primary sends.
pub(super) fn path(p: &str) -> RelPath {
    RelPath::new(p).unwrap()
}

/// Attributes of a file: `mode`, and an mtime of `sec` seconds (and 5 ns).
pub(super) fn meta(mode: u32, sec: i64) -> Meta {
    Meta {
        mode,
        uid: rustix::process::getuid().as_raw(),
        gid: rustix::process::getgid().as_raw(),
        mtime: Mtime { sec, nsec: 5 },
        xattrs: Default::default(),
    }
}

/// Ends `ch`'s operations with a `Flush`: the acknowledgements of what was committed, by
/// ID, once `Flushed` arrives.
pub(super) fn flush(ch: &mut Channel, seq: u64) -> Vec<(u64, Option<OpError>)> {
    ch.send(&Message::Flush { seq }).unwrap();
    ch.flush().unwrap();
    let mut acks = Vec::new();
    loop {
        match ch.recv().unwrap() {
            Message::Ack { id, error } => acks.push((id, error)),
            Message::Flushed { seq: s } if s == seq => return acks,
            other => panic!("expected Ack or Flushed, got {other:?}"),
        }
    }
}

/// Ends a file's stream: our half is finished, then its one `Ack` is read.
pub(super) fn end_stream(mut ch: Channel) -> (u64, Option<OpError>) {
    ch.finish().unwrap();
    match ch.recv().unwrap() {
        Message::Ack { id, error } => (id, error),
        other => panic!("expected Ack, got {other:?}"),
    }
}

/// Whether the filesystem of `dir` keeps holes (a file extended with no data takes no
/// blocks): the tests of holes assert them only there.
pub(super) fn keeps_holes(dir: &Path) -> bool {
    let f = crate::tree::sparse::testing::rw(dir, "hole-probe");
    f.set_len(1 << 20).unwrap();
    let blocks = rustix::fs::fstat(&f).unwrap().st_blocks;
    std::fs::remove_file(dir.join("hole-probe")).unwrap();
    blocks == 0
}
