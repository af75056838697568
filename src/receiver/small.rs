//! Receiving a small file (`SmallFile`, up to [`SMALL_FILE`] bytes) inline on a lane: its
//! bytes follow the message and are staged at once.

use super::ops::{Ops, Then, check_writable};
use super::session::op_error;
use super::stage::stage_bytes;
use crate::manifest::Meta;
use crate::path::RelPath;
use crate::protocol::{ProtocolError, SMALL_FILE};
use crate::transport::SendHalf;
use std::io::Read;

impl<R: Read, W: SendHalf> Ops<'_, R, W> {
    /// `SmallFile`: `len` bytes follow, all of the file.
    pub(super) fn small_file(
        &mut self,
        id: u64,
        path: RelPath,
        meta: Meta,
        len: u64,
    ) -> Result<Then, ProtocolError> {
        check_writable(&path)?;
        if len > SMALL_FILE {
            return Err(ProtocolError::Invalid(format!("small file of {len} bytes")));
        }
        self.buf.resize(len as usize, 0);
        self.r.read_raw(&mut self.buf)?;
        let file = self.incoming(id, path, meta, len);
        let res = stage_bytes(&mut self.dirs, &file, &self.buf);
        self.stage(id, res.map_err(|e| op_error(&e)));
        Ok(Then::Commit)
    }
}

