//! Byte transports between a primary and a standby. The engine sees only [`Connection`]
//! and [`Stream`]: the in-process pipe of a local DEST and QUIC carry the same bytes.

pub mod dest;
pub mod identity;
pub mod local;
pub mod quic;
pub mod tls;

use crate::error::{Error, ErrorCode};
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The sending half of a stream. Dropping it, or `finish`, ends the stream cleanly.
pub trait SendHalf: Write + Send {
    fn finish(&mut self) -> io::Result<()>;
    /// After `finish`: waits (bounded) until the peer has received everything sent.
    fn wait_delivered(&mut self) {}
}

impl<T: SendHalf + ?Sized> SendHalf for Box<T> {
    fn finish(&mut self) -> io::Result<()> {
        (**self).finish()
    }
    fn wait_delivered(&mut self) {
        (**self).wait_delivered()
    }
}

/// One bidirectional stream of a connection.
pub struct Stream {
    pub recv: Box<dyn Read + Send>,
    pub send: Box<dyn SendHalf>,
}

/// A connection carrying many independent streams. Every method may block (the QUIC
/// transport drives an async runtime underneath): never call one from async code.
pub trait Connection: Send + Sync {
    /// Opens a new stream (the primary does this).
    fn open(&self) -> io::Result<Stream>;
    /// Waits for the next stream the peer opened; `None` once the connection is closed.
    fn accept(&self) -> io::Result<Option<Stream>>;
    /// Bytes carried so far, both directions, all streams.
    fn wire_bytes(&self) -> u64;
    /// Closes the connection; pending and future stream operations fail.
    fn close(&self, reason: &str);
    /// Closes the connection because this side failed; `reason` may reach the peer.
    fn abort(&self, reason: &str) {
        self.close(reason)
    }
    /// Closes the connection because the peer (a primary) has been fenced by a newer epoch;
    /// the peer's [`Connection::failure`] is then [`Error::Fenced`] with `reason`.
    fn fence(&self, reason: &str) {
        self.abort(reason)
    }
    /// Closes the connection after refusing the peer's session with `code`: the close says
    /// what the refusal said, since it may reach the peer before the refusal's message
    /// does (a fenced primary must learn it is fenced, not that something failed).
    fn refuse(&self, code: ErrorCode, reason: &str) {
        let _ = code;
        self.abort(reason)
    }
    /// Closes the connection because the peer is gone (silent too long); from then on
    /// [`Connection::failure`] says so.
    fn give_up(&self, reason: &str) {
        self.abort(reason)
    }
    /// Why the peer or the network ended the connection (or this side gave the peer up), as
    /// an error for the user; `None` while it is open, or when this side closed it. It
    /// explains a broken stream better than the stream's own error.
    fn failure(&self) -> Option<Error> {
        None
    }
}

/// Counts bytes written through it into a shared counter.
pub struct Counted<W> {
    inner: W,
    counter: Arc<AtomicU64>,
}

impl<W> Counted<W> {
    pub fn new(inner: W, counter: Arc<AtomicU64>) -> Self {
        Counted { inner, counter }
    }
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.counter.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W: SendHalf> SendHalf for Counted<W> {
    fn finish(&mut self) -> io::Result<()> {
        self.inner.finish()
    }
    fn wait_delivered(&mut self) {
        self.inner.wait_delivered()
    }
}
