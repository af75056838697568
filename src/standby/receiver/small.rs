//! Receiving a small file (`SmallFile`, up to [`SMALL_FILE`] bytes) inline on a lane: its
//! bytes follow the message and are staged at once.

use super::ops::{Ops, Then, check_writable};
use super::session::op_error;
use super::stage::stage_bytes;
use crate::error::ProtocolError;
use crate::model::manifest::Meta;
use crate::model::manifest::SMALL_FILE;
use crate::model::path::RelPath;
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

#[cfg(test)]
mod tests {
    use super::super::testing::{Primary, flush, meta, path};
    use crate::wire::protocol::{Message, SessionMode};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_small_file_is_staged_and_named_with_its_attributes_at_the_commit() {
        let p = Primary::start(SessionMode::Write);
        let mut lane = p.stream();
        lane.send(&Message::SmallFile {
            id: 7,
            path: path("a"),
            meta: meta(0o640, 1_600_000_000),
            len: 5,
        })
        .unwrap();
        lane.w.write_raw(b"hello").unwrap();
        assert_eq!(flush(&mut lane, 1), vec![(7, None)]);
        let file = p.tree().join("a");
        assert_eq!(std::fs::read(&file).unwrap(), b"hello");
        let st = std::fs::symlink_metadata(&file).unwrap();
        assert_eq!(st.mode() & 0o7777, 0o640);
        assert_eq!((st.mtime(), st.mtime_nsec()), (1_600_000_000, 5));
        // Nothing is left of the temp it was received into.
        let names: Vec<_> = std::fs::read_dir(p.tree()).unwrap().collect();
        assert_eq!(names.len(), 2, "a and .hotsync only: {names:?}");
        drop(lane);
        let report = p.close().unwrap();
        assert_eq!((report.files_written, report.bytes_written), (1, 5));
    }
}
