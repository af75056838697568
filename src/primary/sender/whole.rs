//! Large files sent whole, each on a stream of its own (`BigFile`, or `SparseFile` for a
//! file with holes): a new file, one whose delta failed, or one that changed while read.

use super::acks::{Exchange, Op, Settled};
use super::attrs::send_xattrs;
use super::ends::peer_error;
use super::exec::Exec;
use super::read::{Problem, ReadError, read_error, read_through, xattrs_of};
use crate::error::Error;
use crate::error::{OpError, ProtocolError};
use crate::model::path::RelPath;
use crate::model::plan::{Method, Transfer};
use crate::tree::fsroot::{changed, meta_of};
use crate::tree::snapshot::Snapshot;
use crate::tree::xattr::At;
use crate::wire::channel::{Channel, Reader, Writer};
use crate::wire::protocol::Message;
use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

/// How long a file that changed while read may take to hold still for a snapshot.
const SNAPSHOT_BUDGET: Duration = Duration::from_millis(500);

impl Exec<'_> {
    /// A large file on a stream of its own: a delta when the standby has a version of it.
    pub(super) fn big_file(&self, t: &Transfer) -> Result<(), Error> {
        if t.method() == Method::Delta {
            self.delta_stream(t)
        } else {
            self.whole_stream(&t.path, true)
        }
    }

    /// Sends `path` whole on a stream of its own and accounts for its acknowledgement.
    /// Sends it again, up to twice, when it changed while read or the standby asks for it
    /// (`allow_retry`; without it, one more try, from a snapshot, is all it gets).
    pub(super) fn whole_stream(&self, path: &RelPath, allow_retry: bool) -> Result<(), Error> {
        // Set once it changed while read: from then on it is sent from a snapshot, which
        // takes a moment's local copy instead of a whole send's time to stay still.
        let mut unsteady = !allow_retry;
        for attempt in 0..3 {
            let snap = if unsteady {
                crate::tree::snapshot::take(&self.ends.root, path, SNAPSHOT_BUDGET)
                    .ok()
                    .flatten()
            } else {
                None
            };
            let Some(settled) = self.send_whole_once(path, snap.as_ref())? else {
                return Ok(());
            };
            if settled.wants_resend() && attempt < 2 && (allow_retry || attempt == 0) {
                unsteady |= matches!(settled.op, Op::Abandoned { .. });
                continue;
            }
            self.account(settled.last_try());
            return Ok(());
        }
        Ok(())
    }

    /// One try at [`Exec::whole_stream`]: the acknowledgement, not yet accounted for; `None`
    /// when nothing was sent (the file vanished or cannot be read: counted or reported).
    fn send_whole_once(
        &self,
        path: &RelPath,
        snap: Option<&Snapshot>,
    ) -> Result<Option<Settled>, Error> {
        let mut ch = Channel::open(self.conn())?;
        let x = self.book().open();
        let id = self.id();
        let acked = (|| {
            let sent = self.send_whole(&mut ch.w, x, id, path, snap)?;
            ch.finish()?;
            if !sent {
                return Ok(None);
            }
            let error = read_one_ack(&mut ch.r, id)?;
            self.book().ack(x, id, error).map(Some)
        })();
        self.book().close(x);
        acked.map_err(peer_error)
    }

    /// Sends a file whole on `w` as operation `id` of exchange `x`: `BigFile`, its bytes,
    /// `FileEnd` (or `SparseFile` and its extents, for a file with holes). A file that
    /// shrinks, grows or changes while read is abandoned (the standby discards it). With
    /// `snap`, the file as that snapshot holds it (its attributes as they were then; the
    /// extended ones, which the copy lacks, read from the file itself). False when nothing
    /// was sent: the file vanished or cannot be read (counted or reported).
    pub(super) fn send_whole(
        &self,
        w: &mut Writer,
        x: Exchange,
        id: u64,
        path: &RelPath,
        snap: Option<&Snapshot>,
    ) -> Result<bool, ProtocolError> {
        let live = match self.ends.root.open_file(path) {
            Ok(f) => f,
            Err(e) => {
                match read_error(e) {
                    ReadError::Vanished => self.vanished(path),
                    ReadError::Other(e) => self.error(path, format!("cannot read: {e}")),
                }
                return Ok(false);
            }
        };
        let f = snap.map_or(&live, |s| &s.file);
        let before = match snap {
            Some(s) => s.stat,
            None => rustix::fs::fstat(f).map_err(io::Error::from)?,
        };
        let size = before.st_size as u64;
        let attrs = match xattrs_of(At::Fd(live.as_fd()), &self.ends.carry.xattrs) {
            Ok(attrs) => attrs,
            Err(e) => {
                self.error(path, format!("cannot read: {e}"));
                return Ok(false);
            }
        };
        self.book()
            .expect(x, id, path.clone(), Op::Transfer { bytes: size });
        send_xattrs(w, attrs)?;
        let (path, meta) = (path.clone(), meta_of(&before));
        let mut problem = if self.ends.carry.holes && crate::tree::sparse::has_holes(&before) {
            w.send(&Message::SparseFile {
                id,
                path,
                meta,
                size,
            })?;
            self.send_extents(w, f, size)?
        } else {
            w.send(&Message::BigFile {
                id,
                path,
                meta,
                size,
            })?;
            self.book().summary_mut().bytes_literal += size;
            read_through(f, size, |piece| w.write_raw(piece))?
        };
        // A snapshot does not change; the file itself is checked.
        let after = rustix::fs::fstat(f).map_err(io::Error::from)?;
        if problem.is_none() && snap.is_none() && changed(&before, &after) {
            problem = Some(Problem::changed());
        }
        if let Some(Problem { reason, retry }) = problem {
            self.book().abandon(id, reason, retry);
            w.send(&Message::FileEnd {
                complete: false,
                digest: None,
            })?;
        } else {
            w.send(&Message::FileEnd {
                complete: true,
                digest: None,
            })?;
        }
        Ok(true)
    }
}

/// Reads the single `Ack` answering a per-file stream: the standby's error, if any.
pub(super) fn read_one_ack(r: &mut Reader, id: u64) -> Result<Option<OpError>, ProtocolError> {
    match r.recv()? {
        Message::Ack { id: got, error } if got == id => Ok(error),
        other => Err(ProtocolError::unexpected(&other, "Ack")),
    }
}
