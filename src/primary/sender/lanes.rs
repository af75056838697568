//! Lanes: streams that carry many small items (small files, symlinks, attribute fixes)
//! one after another, pipelined, their acknowledgements read alongside. The standby commits
//! a lane's items in batches; the lane bounds how many wait for it.

use super::acks::Exchange;
use super::exec::{Exec, LaneItem};
use crate::error::Error;
use crate::error::ProtocolError;
use crate::wire::channel::{Channel, Writer};
use crate::wire::protocol::Message;

/// Operations a lane leaves unacknowledged at most. Past it, the lane asks the standby to
/// commit and waits: what is in flight (and remembered) stays bounded however fast small
/// files are read, not just by the transport's buffers.
const LANE_IN_FLIGHT: usize = 4 * crate::tree::atomic::BATCH_FILES;

/// A lane being fed: where its items go, and what the standby holds of them uncommitted.
pub(super) struct LaneFeed<'f> {
    ex: &'f Exec<'f>,
    w: &'f mut Writer,
    x: Exchange,
    /// A small file's bytes, reused from one file to the next.
    buf: Vec<u8>,
    /// Items sent since the last commit asked for.
    staged: bool,
}

impl LaneFeed<'_> {
    /// Sends `item`, after waiting, when too many of the lane's items are unacknowledged,
    /// for a batch of them.
    pub(super) fn send(&mut self, item: LaneItem<'_>) -> Result<(), ProtocolError> {
        if self.ex.book().outstanding(self.x) >= LANE_IN_FLIGHT {
            self.commit_staged()?;
            self.w.flush()?;
            // Resumed after one batch's acknowledgements: the standby still has others to
            // commit meanwhile.
            self.ex
                .wait_below(self.x, LANE_IN_FLIGHT - crate::tree::atomic::BATCH_FILES);
        }
        self.staged = true;
        let id = self.ex.id();
        match item {
            LaneItem::File(t) => self.ex.send_small(self.w, self.x, id, t, &mut self.buf),
            LaneItem::Symlink(l) => self.ex.send_symlink(self.w, self.x, id, l),
            LaneItem::Meta(m) => self.ex.send_meta(self.w, self.x, id, m),
        }
    }

    /// Nothing more for now: what is buffered goes, and what the standby holds staged is
    /// made durable and visible now, not when more comes (a change found early in a long
    /// walk).
    pub(super) fn idle(&mut self) -> Result<(), ProtocolError> {
        self.commit_staged()?;
        self.w.flush()
    }

    fn commit_staged(&mut self) -> Result<(), ProtocolError> {
        if std::mem::take(&mut self.staged) {
            self.w.send(&Message::Flush { seq: 0 })?;
        }
        Ok(())
    }
}

impl Exec<'_> {
    /// One lane carrying `items`.
    pub(super) fn lane(&self, items: &[LaneItem]) -> Result<(), Error> {
        self.lane_with(|lane| items.iter().try_for_each(|i| lane.send(*i)))
    }

    /// A lane on a stream of its own, fed by `feed`; it ends (and the standby commits the
    /// rest) when `feed` returns.
    pub(super) fn lane_with(
        &self,
        feed: impl FnOnce(&mut LaneFeed<'_>) -> Result<(), ProtocolError>,
    ) -> Result<(), Error> {
        let mut ch = Channel::open(self.conn())?;
        let x = self.book().open();
        let Channel { r, w } = &mut ch;
        self.pipelined(r, x, 0, || {
            let mut lane = LaneFeed {
                ex: self,
                w,
                x,
                buf: Vec::new(),
                staged: false,
            };
            feed(&mut lane)?;
            finish_sending(lane.w)
        })
    }
}

/// Flushes and ends the sending half of a stream.
fn finish_sending(w: &mut Writer) -> Result<(), ProtocolError> {
    w.flush()?;
    w.get_mut().finish()?;
    Ok(())
}
