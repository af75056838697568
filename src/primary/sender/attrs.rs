//! Attributes: what goes with each entry besides its content (extended attributes and
//! ACLs, as agreed when the session opened), and attribute fixes of entries whose content
//! is already right.

use super::acks::{Exchange, Op};
use super::exec::Exec;
use super::read::{ReadError, read_error, xattrs_of};
use crate::error::ProtocolError;
use crate::model::path::RelPath;
use crate::model::plan::MetaFix;
use crate::model::xattrs::{Policy, Xattrs};
use crate::tree::xattr::At;
use crate::wire::channel::Writer;
use crate::wire::protocol::Message;
use std::os::fd::AsFd;

/// Sends the attributes of the entry the next message writes; none need no message.
pub(super) fn send_xattrs(w: &mut Writer, x: Xattrs) -> Result<(), ProtocolError> {
    if x.is_empty() {
        return Ok(());
    }
    w.send(&Message::Xattrs { attrs: x })
}

/// The message that sets `m`'s attributes, as operation `id`.
pub(super) fn set_meta(m: &MetaFix, id: u64) -> Message {
    Message::SetMeta {
        id,
        path: m.path.clone(),
        meta: m.meta,
        target: m.target,
    }
}

/// Warns, once in this process for each set of them, of attributes asked for that the
/// standby cannot store.
pub(super) fn say_once_what_the_standby_lacks(want: &Policy, can: &Policy) {
    let lacks = want.missing_in(can);
    if !lacks.is_empty() {
        let lacks = lacks.join(", ");
        crate::tree::xattr::say_once(
            &lacks,
            &format!("the standby cannot store {lacks}: they are not mirrored there"),
        );
    }
}

impl Exec<'_> {
    /// The attributes to send with the entry at `path` (never followed); `None` after
    /// reporting why they cannot be read.
    pub(super) fn xattrs_at(&self, path: &RelPath) -> Option<Xattrs> {
        let policy = &self.ends.carry.xattrs;
        if policy.is_none() {
            return Some(Xattrs::default());
        }
        let root = &self.ends.root;
        let read = if path.is_root() {
            xattrs_of(At::Fd(root.fd()), policy)
        } else {
            root.parent_of(path)
                .and_then(|(dir, name)| xattrs_of(At::Name(dir.as_fd(), &name), policy))
        };
        match read.map_err(read_error) {
            Ok(x) => Some(x),
            Err(ReadError::Vanished) => {
                self.vanished(path);
                None
            }
            Err(ReadError::Other(e)) => {
                self.error(path, format!("cannot read: {e}"));
                None
            }
        }
    }

    /// Sends, on a lane, the attribute fix `m` as operation `id` of exchange `x`.
    pub(super) fn send_meta(
        &self,
        w: &mut Writer,
        x: Exchange,
        id: u64,
        m: &MetaFix,
    ) -> Result<(), ProtocolError> {
        let Some(attrs) = self.xattrs_at(&m.path) else {
            return Ok(());
        };
        self.book().expect(x, id, m.path.clone(), Op::Meta);
        send_xattrs(w, attrs)?;
        w.send(&set_meta(m, id))
    }
}
