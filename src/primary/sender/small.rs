//! Small entries, inline on a lane: files up to the small-file size (read whole, sent in
//! one message with their bytes) and symlinks.

use super::acks::{Exchange, Op};
use super::attrs::send_xattrs;
use super::exec::Exec;
use super::read::{ReadError, read_small};
use crate::error::ProtocolError;
use crate::model::plan::{SymlinkOp, Transfer};
use crate::tree::fsroot::meta_of;
use crate::wire::channel::Writer;
use crate::wire::protocol::Message;

impl Exec<'_> {
    /// Sends the small file `t` as operation `id` of exchange `x`, its bytes read into
    /// `buf`. One that grew past the small-file size since the scan goes whole, inline;
    /// one that vanished or cannot be read is counted or reported, and not sent.
    pub(super) fn send_small(
        &self,
        w: &mut Writer,
        x: Exchange,
        id: u64,
        t: &Transfer,
        buf: &mut Vec<u8>,
    ) -> Result<(), ProtocolError> {
        match read_small(&self.ends.root, &t.path, buf, &self.ends.carry.xattrs) {
            Ok(Some((st, attrs))) => {
                let len = buf.len() as u64;
                self.book()
                    .expect(x, id, t.path.clone(), Op::Transfer { bytes: len });
                send_xattrs(w, attrs)?;
                w.send(&Message::SmallFile {
                    id,
                    path: t.path.clone(),
                    meta: meta_of(&st),
                    len,
                })?;
                w.write_raw(buf)?;
                self.book().summary_mut().bytes_literal += len;
                Ok(())
            }
            Ok(None) => self.send_whole(w, x, id, &t.path, None).map(drop),
            Err(ReadError::Vanished) => {
                self.vanished(&t.path);
                Ok(())
            }
            Err(ReadError::Other(e)) => {
                self.error(&t.path, format!("cannot read: {e}"));
                Ok(())
            }
        }
    }

    /// Sends the symlink `l` as operation `id` of exchange `x`.
    pub(super) fn send_symlink(
        &self,
        w: &mut Writer,
        x: Exchange,
        id: u64,
        l: &SymlinkOp,
    ) -> Result<(), ProtocolError> {
        let Some(attrs) = self.xattrs_at(&l.path) else {
            return Ok(());
        };
        self.book().expect(x, id, l.path.clone(), Op::Symlink);
        send_xattrs(w, attrs)?;
        w.send(&Message::Symlink {
            id,
            path: l.path.clone(),
            target: l.target.clone(),
            meta: l.meta,
        })
    }
}
