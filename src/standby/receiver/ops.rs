//! The operation loop every stream runs: it reads operations until the stream ends (or
//! `Close`, on the control stream), applies each, and acknowledges them in batches once
//! durable. A failure with one entry is answered in its `Ack`; a violation of the protocol
//! ends the stream with an error, and with it the session.

use super::session::{Attrs, Dirs, StandbySession};
use super::stage::Incoming;
use crate::error::{OpError, ProtocolError};
use crate::model::manifest::Meta;
use crate::model::path::RelPath;
use crate::model::status::Space;
use crate::model::xattrs::Xattrs;
use crate::transport::SendHalf;
use crate::tree::atomic::{CommitGroup, CommitResult, Staged};
use crate::wire::protocol::DeltaHead;
use crate::wire::protocol::{FrameReader, FrameWriter, Message};
use std::io::{Read, Write};
use std::sync::atomic::Ordering;

/// What the loop does after an operation.
pub(super) enum Then {
    /// Commits the batch if it is due, then reads on.
    Commit,
    /// Reads on at once.
    Read,
    /// The stream is done.
    End,
}

/// One stream's state while it applies operations.
pub(super) struct Ops<'a, R: Read, W: SendHalf> {
    /// The session, and the stream's two halves.
    pub(super) s: &'a StandbySession<'a>,
    pub(super) r: &'a mut FrameReader<R>,
    pub(super) w: &'a mut FrameWriter<W>,
    /// What was applied or staged and is not durable yet.
    pub(super) batch: CommitGroup,
    /// Parent directories the stream's operations used lately.
    pub(super) dirs: Dirs<'a>,
    /// The attributes of the entry the next operation writes.
    pub(super) xattrs: Option<Xattrs>,
    /// Holds a small file's bytes (reused).
    pub(super) buf: Vec<u8>,
    /// The control stream: it lists and closes the session; the others walk and write.
    control: bool,
    /// Large files of the batch with their chunk digests: indexed once committed.
    pub(super) indexes: Vec<Indexing>,
    /// Large files of the batch patched in place (operation, path, journal): their
    /// journals go once the commit made them durable.
    pub(super) patches: Vec<(u64, RelPath, crate::tree::patch::Pending)>,
}

/// Reads and applies operations until the stream ends (or `Close`, on the control stream).
/// `first` is a message already read off the stream (it said what the stream is).
///
/// # Errors
/// The protocol violation or transport failure that ended the stream.
pub(super) fn op_loop<R: Read, W: SendHalf>(
    s: &StandbySession,
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
    mut first: Option<Message>,
    control: bool,
) -> Result<(), ProtocolError> {
    let mut ops = Ops {
        s,
        r,
        w,
        batch: CommitGroup::new(s.standby.durability()).journaled(s.standby.journal()),
        dirs: Dirs::new(s),
        xattrs: None,
        buf: Vec::new(),
        control,
        indexes: Vec::new(),
        patches: Vec::new(),
    };
    loop {
        let next = match first.take() {
            Some(m) => Some(m),
            None => ops.r.recv_opt()?,
        };
        let Some(msg) = next else {
            return ops.end();
        };
        ops.check(&msg)?;
        match ops.apply(msg)? {
            Then::Commit if ops.batch.should_commit() => {
                ops.acknowledge()?;
                ops.w.flush()?;
            }
            Then::Commit | Then::Read => {}
            Then::End => return Ok(()),
        }
    }
}

/// Whether `msg` writes an entry that takes the extended attributes sent before it.
fn takes_xattrs(msg: &Message) -> bool {
    matches!(
        msg,
        Message::SmallFile { .. }
            | Message::BigFile { .. }
            | Message::SparseFile { .. }
            | Message::Delta { .. }
            | Message::SparseDelta { .. }
            | Message::Symlink { .. }
            | Message::SetMeta { .. }
    )
}

/// Nothing may be written at the root itself or into the reserved area.
pub(super) fn check_writable(path: &RelPath) -> Result<(), ProtocolError> {
    if path.is_root() || path.is_reserved() {
        return Err(ProtocolError::Invalid(format!("refusing to write {path}")));
    }
    Ok(())
}

impl<R: Read, W: SendHalf> Ops<'_, R, W> {
    /// Refuses what may not come next: a write in a read-only session, or extended
    /// attributes followed by an operation that takes none.
    fn check(&self, msg: &Message) -> Result<(), ProtocolError> {
        if self.s.read_only && msg.writes_tree() {
            return Err(ProtocolError::Invalid(format!(
                "{} in a dry run",
                msg.name()
            )));
        }
        if self.xattrs.is_some() && !takes_xattrs(msg) {
            return Err(ProtocolError::Invalid(format!(
                "extended attributes before {}, which takes none",
                msg.name()
            )));
        }
        Ok(())
    }

    /// Applies one operation.
    fn apply(&mut self, msg: Message) -> Result<Then, ProtocolError> {
        // Both kinds of delta are one operation here.
        let msg = match DeltaHead::try_from(msg) {
            Ok(head) => return self.delta(head),
            Err(msg) => msg,
        };
        match msg {
            Message::Xattrs { attrs } => {
                attrs
                    .check(&self.s.xattrs)
                    .map_err(ProtocolError::Invalid)?;
                self.xattrs = Some(attrs);
                Ok(Then::Read)
            }
            Message::List {
                scopes,
                checksum,
                hash_rate,
            } if self.control => {
                self.s.list(self.w, &scopes, checksum, hash_rate)?;
                Ok(Then::Read)
            }
            Message::Walk {
                checksum,
                hash_rate,
            } if !self.control => self.walk(crate::tree::walk::Scopes::all(), checksum, hash_rate),
            Message::WalkScopes {
                scopes,
                checksum,
                hash_rate,
            } if !self.control => {
                self.walk(crate::tree::walk::Scopes::new(&scopes), checksum, hash_rate)
            }
            Message::Rename { id, from, to } => self.rename(id, &from, &to),
            Message::Clear { id, path } | Message::Delete { id, path } => self.remove(id, &path),
            Message::Mkdir { id, path } => self.mkdir(id, &path),
            Message::SetMeta {
                id,
                path,
                meta,
                target,
            } => self.set_meta(id, &path, meta, target),
            Message::Symlink {
                id,
                path,
                target,
                meta,
            } => self.symlink(id, &path, &target, meta),
            Message::Link { id, path, target } => self.link(id, &path, &target),
            Message::SmallFile {
                id,
                path,
                meta,
                len,
            } => self.small_file(id, path, meta, len),
            Message::BigFile {
                id,
                path,
                meta,
                size,
            } => self.big_file(id, path, meta, size),
            Message::SparseFile {
                id,
                path,
                meta,
                size,
            } => self.sparse_file(id, path, meta, size),
            Message::Flush { seq } => {
                self.acknowledge()?;
                self.w.send(&Message::Flushed { seq })?;
                self.w.flush()?;
                Ok(Then::Read)
            }
            Message::Consistent { seq, at_ms } if self.control => self.consistent(seq, at_ms),
            Message::Close if self.control => self.close(),
            other => Err(ProtocolError::unexpected(&other, "an operation")),
        }
    }

    /// A walk for the primary, which ends the stream.
    fn walk(
        &mut self,
        scopes: crate::tree::walk::Scopes,
        checksum: bool,
        hash_rate: u64,
    ) -> Result<Then, ProtocolError> {
        match self.s.walk(self.w, scopes, checksum, hash_rate) {
            // The walk changes nothing: a primary that stopped reading it (a guard
            // refused, or it failed) leaves nothing to clean up or report here.
            Err(ProtocolError::Io(e)) => {
                tracing::debug!("the primary stopped reading the walk: {e}");
                Ok(Then::End)
            }
            other => other.map(|()| Then::End),
        }
    }

    /// `Consistent`: the tree is at a consistent point; recorded durably (a new window of
    /// the undo log opens), then `ConsistentHeld`. A standby that cannot record it says so
    /// and ends the session: the primary must not count on a point this tree lacks.
    fn consistent(&mut self, seq: u64, at_ms: u64) -> Result<Then, ProtocolError> {
        self.acknowledge()?;
        let kept = match self.s.standby.hold_consistent(seq, at_ms) {
            Ok(kept) => kept,
            Err(e) => {
                return Err(ProtocolError::Io(std::io::Error::new(
                    e.kind(),
                    format!("cannot record the consistent point of batch {seq}: {e}"),
                )));
            }
        };
        self.w.send(&Message::ConsistentHeld { seq, kept })?;
        self.w.flush()?;
        Ok(Then::Read)
    }

    /// `Close`: the last batch is committed and acknowledged, then `Closed` ends the
    /// session for both sides.
    fn close(&mut self) -> Result<Then, ProtocolError> {
        self.acknowledge()?;
        self.w.send(&Message::Closed)?;
        self.w.flush()?;
        // Once the primary has `Closed`, the session is over for both sides.
        self.w.get_mut().finish()?;
        self.w.get_mut().wait_delivered();
        Ok(Then::End)
    }

    /// The end of the stream: the last batch is committed and acknowledged.
    fn end(&mut self) -> Result<(), ProtocolError> {
        self.acknowledge()?;
        self.w.flush()?;
        self.w.get_mut().finish()?;
        Ok(())
    }

    /// The file an operation announced, with the attributes sent before it.
    pub(super) fn incoming(&mut self, id: u64, path: RelPath, meta: Meta, size: u64) -> Incoming {
        Incoming {
            id,
            path,
            keep: self.batch.keep_fd(),
            attrs: Attrs::new(meta, &mut self.xattrs),
            size,
        }
    }

    /// Hands what staging an entry came to to the batch: the staged temp, or the failure
    /// its `Ack` will carry.
    pub(super) fn stage(&mut self, id: u64, res: Result<Staged, OpError>) {
        match res {
            Ok(st) => self.batch.stage(st),
            Err(e) => self.batch.failed(id, e),
        }
    }

    /// Commits the batch and acknowledges each of its operations.
    fn acknowledge(&mut self) -> Result<(), ProtocolError> {
        let mut outcomes = commit(self.s, &mut self.batch);
        self.settle_patches(&mut outcomes);
        self.index_committed(&outcomes);
        send_acks(self.s, self.w, outcomes)
    }

    /// Drops the journals of the patches the commit made durable (or keeps them in the
    /// undo area while a window is open), before they are acknowledged: a journal left
    /// would put an acknowledged file back when the tree is next opened. A patch that did
    /// not commit is put back now. A journal that cannot be dropped fails its operation.
    fn settle_patches(&mut self, outcomes: &mut [crate::tree::atomic::CommitResult]) {
        let patches = std::mem::take(&mut self.patches);
        if patches.is_empty() {
            return;
        }
        let standby = self.s.standby;
        let (mut done_ids, mut done) = (Vec::new(), Vec::new());
        for (id, path, pending) in patches {
            let Some(slot) = outcomes.iter_mut().find(|(o, _)| *o == id) else {
                continue;
            };
            if slot.1.is_err() {
                let undone = match self.s.root() {
                    Ok(root) => standby
                        .in_area(|a| crate::tree::patch::undo(root, a, &pending))
                        .unwrap_or(Ok(())),
                    Err(e) => Err(e),
                };
                if let Err(e) = undone {
                    tracing::warn!("{path}: cannot put back a patch that did not commit: {e}");
                }
                continue;
            }
            let kept = standby.in_area(|area| {
                self.s
                    .with_journal(|j| j.keep_patch(area, &path, &pending))
                    .transpose()
            });
            match kept {
                Some(Ok(Some(()))) => {}
                Some(Ok(None)) => {
                    done_ids.push(id);
                    done.push(pending);
                }
                Some(Err(e)) => slot.1 = Err(super::session::op_error(&e)),
                // No area: its journal stays, and puts the file back at the next open; the
                // primary is told to send it again.
                None => {
                    slot.1 = Err(crate::error::OpError::new(
                        "the standby's reserved area is not open",
                        true,
                    ));
                }
            }
        }
        let finished = standby
            .in_area(|a| crate::tree::patch::finished(a, &done))
            .unwrap_or(Ok(()));
        if let Err(e) = finished {
            for id in &done_ids {
                if let Some(slot) = outcomes.iter_mut().find(|(o, _)| o == id) {
                    slot.1 = Err(super::session::op_error(&e));
                }
            }
        }
    }

    /// Records the block index of each large file the batch committed, as the file now is
    /// (its name given, its status-change time is final).
    fn index_committed(&mut self, outcomes: &[crate::tree::atomic::CommitResult]) {
        for Indexing {
            id,
            path,
            chunk,
            digests,
            base,
        } in std::mem::take(&mut self.indexes)
        {
            if !outcomes.iter().any(|(o, r)| *o == id && r.is_ok()) {
                continue;
            }
            let Ok((dir, name)) = self.dirs.parent(&path) else {
                continue;
            };
            if let Ok(st) = rustix::fs::statat(&*dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
                && rustix::fs::FileType::from_raw_mode(st.st_mode)
                    == rustix::fs::FileType::RegularFile
                && (st.st_size as u64).div_ceil(chunk) == digests.len() as u64
            {
                self.s.standby.index(&st, chunk, digests, base);
            }
        }
    }
}

/// A large file received in the batch, to be indexed once committed.
pub(super) struct Indexing {
    pub(super) id: u64,
    pub(super) path: RelPath,
    pub(super) chunk: u64,
    /// Its chunk digests.
    pub(super) digests: Vec<crate::model::manifest::Hash>,
    /// The inode of its base, whose index the new version's starts from.
    pub(super) base: Option<u64>,
}

/// Commits a batch (nothing is ever staged in a dry run, which may have no root).
fn commit(s: &StandbySession, batch: &mut CommitGroup) -> Vec<CommitResult> {
    match s.root() {
        Ok(root) => batch.commit(root.fd()),
        Err(_) => Vec::new(),
    }
}

/// Tells the primary how each operation of a committed batch went; a failure for want of
/// space says how full the standby is.
fn send_acks<W: Write>(
    s: &StandbySession,
    w: &mut FrameWriter<W>,
    outcomes: Vec<CommitResult>,
) -> Result<(), ProtocolError> {
    let failed = outcomes.iter().filter(|(_, r)| r.is_err()).count() as u64;
    if (failed as usize) < outcomes.len() {
        s.standby.committed();
    }
    s.entry
        .stats
        .failed_ops
        .fetch_add(failed, Ordering::Relaxed);
    let mut space = None;
    for (id, res) in outcomes {
        let error = res.err().map(|mut e| {
            if e.no_space {
                // Say how full: the primary reports it, and waits for space.
                let sp = *space
                    .get_or_insert_with(|| s.root().ok().and_then(|r| Space::of(r.fd()).ok()));
                if let Some(sp) = sp {
                    e.message = format!("{} ({})", e.message, sp.describe());
                }
            }
            e
        });
        w.send(&Message::Ack { id, error })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testing::{Primary, flush, meta, path};
    use crate::error::Error;
    use crate::error::ProtocolError;
    use crate::model::epoch::Position;
    use crate::model::manifest::MetaTarget;
    use crate::tree::undo::testing::snapshot;
    use crate::wire::protocol::{Message, SessionMode};

    #[test]
    fn writing_into_the_reserved_area_ends_the_session_with_a_protocol_error() {
        let mut p = Primary::start(SessionMode::Write);
        let mut lane = p.stream();
        lane.send(&Message::SmallFile {
            id: 1,
            path: path(".hotsync/x"),
            meta: meta(0o644, 1),
            len: 1,
        })
        .unwrap();
        lane.w.write_raw(b"x").unwrap();
        lane.flush().unwrap();
        let e = p.ended().unwrap_err();
        assert!(
            matches!(e, Error::Protocol(ProtocolError::Invalid(_))),
            "{e}"
        );
        // The primary learns why from the connection, and nothing was written.
        assert!(matches!(p.failure(), Some(Error::Standby(_))));
        assert!(!p.tree().join(".hotsync/x").exists());
    }

    #[test]
    fn a_message_out_of_place_ends_the_session() {
        let mut p = Primary::start(SessionMode::Write);
        let mut lane = p.stream();
        lane.send(&Message::Flushed { seq: 1 }).unwrap();
        lane.flush().unwrap();
        let e = p.ended().unwrap_err();
        assert!(
            matches!(e, Error::Protocol(ProtocolError::Unexpected { .. })),
            "{e}"
        );
    }

    #[test]
    fn a_read_only_session_lists_but_refuses_to_write() {
        let mut p = Primary::start_with(SessionMode::ReadOnly, |t| {
            std::fs::write(t.join("a"), b"a").unwrap();
        });
        p.ctrl
            .send(&Message::List {
                scopes: vec![(
                    crate::model::path::RelPath::root(),
                    crate::model::manifest::Scope::Tree,
                )],
                checksum: false,
                hash_rate: 0,
            })
            .unwrap();
        p.ctrl.flush().unwrap();
        let mut listed = 0;
        loop {
            match p.ctrl.recv().unwrap() {
                Message::Entries { entries, .. } => listed += entries.len(),
                Message::ListEnd { .. } => break,
                _ => {}
            }
        }
        assert!(listed >= 1, "the tree is listed");
        let mut lane = p.stream();
        lane.send(&Message::Mkdir {
            id: 1,
            path: path("d"),
        })
        .unwrap();
        lane.flush().unwrap();
        let e = p.ended().unwrap_err();
        assert!(
            matches!(e, Error::Protocol(ProtocolError::Invalid(_))),
            "{e}"
        );
        assert!(!p.tree().join("d").exists());
    }

    /// Everything a session writes while a window of the undo log is open (files new and
    /// replaced, a directory and a file in it, a directory renamed, a subtree deleted, an
    /// attribute fix) is undone by the roll-back: the tree is again what it was at the
    /// window's consistent point, to the directories' times.
    #[test]
    fn a_window_rolls_the_sessions_writes_back_to_the_consistent_point() {
        let p = Primary::start_with(SessionMode::Write, |t| {
            std::fs::write(t.join("a"), b"a0").unwrap();
            std::fs::create_dir_all(t.join("d")).unwrap();
            std::fs::write(t.join("d/x"), b"x0").unwrap();
            std::fs::create_dir_all(t.join("e/deep")).unwrap();
            std::fs::write(t.join("e/deep/z"), b"z0").unwrap();
            for (f, s) in [
                ("a", 1),
                ("d/x", 2),
                ("e/deep/z", 3),
                ("e/deep", 4),
                ("e", 5),
                ("d", 6),
            ] {
                let f = std::fs::File::open(t.join(f)).unwrap();
                f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(s))
                    .unwrap();
            }
        });
        p.standby
            .open_window(Position { epoch: 1, seq: 3 }, 55)
            .unwrap();
        let before = snapshot(p.tree());
        let mut lane = p.stream();
        let small = |lane: &mut crate::wire::channel::Channel, id, to: &str, data: &[u8]| {
            lane.send(&Message::SmallFile {
                id,
                path: path(to),
                meta: meta(0o644, 1_700_000_000),
                len: data.len() as u64,
            })
            .unwrap();
            lane.w.write_raw(data).unwrap();
        };
        small(&mut lane, 1, "a", b"a1");
        small(&mut lane, 2, "n", b"n1");
        lane.send(&Message::Mkdir {
            id: 3,
            path: path("f"),
        })
        .unwrap();
        small(&mut lane, 4, "f/g", b"g1");
        let ops = [
            Message::Rename {
                id: 5,
                from: path("d"),
                to: path("h"),
            },
            Message::Delete {
                id: 6,
                path: path("e"),
            },
            Message::SetMeta {
                id: 7,
                path: path("h/x"),
                meta: meta(0o600, 9),
                target: MetaTarget::File,
            },
        ];
        for m in &ops {
            lane.send(m).unwrap();
        }
        small(&mut lane, 8, "a", b"a2");
        let acks = flush(&mut lane, 1);
        assert_eq!(acks.len(), 8, "{acks:?}");
        assert!(acks.iter().all(|(_, e)| e.is_none()), "{acks:?}");
        let t = p.tree();
        assert_eq!(std::fs::read(t.join("a")).unwrap(), b"a2");
        assert_eq!(std::fs::read(t.join("h/x")).unwrap(), b"x0");
        assert!(!t.join("e").exists() && !t.join("d").exists());
        // What a change destroyed waits in the undo area, not in the tree.
        assert!(t.join(".hotsync/undo/log").exists());

        let rolled = p.standby.roll_back().unwrap().unwrap();
        assert_eq!(rolled.base, Position { epoch: 1, seq: 3 });
        assert!(rolled.unkept.is_empty());
        assert_eq!(snapshot(t), before);
        assert!(
            p.standby.roll_back().unwrap().is_none(),
            "the window is closed"
        );
        drop(lane);
        p.close().unwrap();
    }
}
