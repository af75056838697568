//! Files with holes, sent as their data extents only: the holes are neither read nor sent,
//! and the standby leaves them holes.

use super::exec::Exec;
use super::read::{Problem, read_range};
use crate::error::ProtocolError;
use crate::wire::channel::Writer;
use crate::wire::protocol::Message;

impl Exec<'_> {
    /// Sends the data of `f` (of `size` bytes) as `Extent`s, each followed by its bytes. A
    /// problem reading it (it shrank, say) is returned, and the file is to be abandoned.
    pub(super) fn send_extents(
        &self,
        w: &mut Writer,
        f: &std::fs::File,
        size: u64,
    ) -> Result<Option<Problem>, ProtocolError> {
        let mut buf = Vec::new();
        for extent in crate::tree::sparse::Extents::new(f, size) {
            let (start, end) = match extent {
                Ok(e) => e,
                Err(e) => return Ok(Some(Problem::of_read(&e))),
            };
            w.send(&Message::Extent {
                offset: start,
                len: end - start,
            })?;
            let problem = read_range(f, start, end, &mut buf, |piece| w.write_raw(piece))?;
            self.book().summary_mut().bytes_literal += end - start;
            if problem.is_some() {
                return Ok(problem);
            }
        }
        Ok(None)
    }
}
