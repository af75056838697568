//! One framed stream of a connection: the reading and writing halves together, and the
//! session handshake that opens the control stream. Like mini-redis's `Connection`, it owns
//! the buffers; its halves are public so an acknowledgement reader can run beside a sender.

use crate::error::ProtocolError;
use crate::transport::{Connection, SendHalf, Stream};
use crate::wire::protocol::{FrameReader, FrameWriter, Message};
use std::io::Read;

pub(crate) type Reader = FrameReader<Box<dyn Read + Send>>;
pub(crate) type Writer = FrameWriter<Box<dyn SendHalf>>;

/// A framed bidirectional stream.
pub struct Channel {
    pub r: Reader,
    pub w: Writer,
}

impl Channel {
    pub(crate) fn new(s: Stream) -> Channel {
        Channel {
            r: FrameReader::new(s.recv),
            w: FrameWriter::new(s.send),
        }
    }

    /// Opens a new stream on `conn` (blocking; see [`Connection::open`]).
    pub fn open(conn: &dyn Connection) -> Result<Channel, ProtocolError> {
        Ok(Channel::new(conn.open().map_err(ProtocolError::Io)?))
    }

    /// Queues `msg` (sent at the next [`Channel::flush`] or when the buffer fills).
    pub fn send(&mut self, msg: &Message) -> Result<(), ProtocolError> {
        self.w.send(msg)
    }

    pub fn flush(&mut self) -> Result<(), ProtocolError> {
        self.w.flush()
    }

    /// The next message; the end of the stream is an error.
    pub fn recv(&mut self) -> Result<Message, ProtocolError> {
        self.r.recv()
    }

    /// The next message, or `None` at a clean end of the stream.
    pub(crate) fn recv_opt(&mut self) -> Result<Option<Message>, ProtocolError> {
        self.r.recv_opt()
    }

    /// Flushes and ends our half of the stream.
    pub(crate) fn finish(&mut self) -> Result<(), ProtocolError> {
        self.w.flush()?;
        self.w.get_mut().finish()?;
        Ok(())
    }

    /// The primary's side of the session handshake on a new control stream: our greeting
    /// and `open` in one write, then the standby's greeting. Returns the version both speak.
    ///
    /// # Errors
    /// [`ProtocolError::Version`] naming both sides' versions, [`ProtocolError::BadMagic`]
    /// for a peer that is not hotsync, or the transport's error.
    pub fn open_session(&mut self, open: &Message) -> Result<u16, ProtocolError> {
        self.w.greeting()?;
        self.w.send(open)?;
        self.w.flush()?;
        self.r.greeting()
    }

    /// The standby's side: our greeting, then the primary's. Returns the version both speak.
    pub(crate) fn accept_session(&mut self) -> Result<u16, ProtocolError> {
        self.w.greeting()?;
        self.w.flush()?;
        self.r.greeting()
    }
}
