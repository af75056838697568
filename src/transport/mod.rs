//! Byte transports between a primary and a standby. The engine sees only [`Connection`]
//! and [`Stream`]: the in-process pipe of a local DEST and QUIC carry the same bytes.
//! A transport plugs in at two seams: a `Dialer` on the primary (chosen by the DEST's
//! form, `dialer`) and an [`Acceptor`] on the standby; neither the primary's link nor
//! the standby's server knows which transport it drives.

pub mod dest;
pub mod identity;
pub(crate) mod local;
pub mod quic;
pub(crate) mod tls;

use crate::error::{Error, ErrorCode};
use identity::{Identity, NodeId};
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::pin::Pin;
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

/// Opens connections to one standby, as often as asked (a watch reconnects through it).
/// It owns what its connections need to run (QUIC's runtime): keep it alive as long as
/// any of them.
pub(crate) trait Dialer: Send + Sync {
    /// Connects and authenticates: the standby must present the pinned ID.
    ///
    /// # Errors
    /// [`Error::Unreachable`] (no answer, bad address), [`Error::Auth`] (wrong server ID,
    /// this primary not allowed).
    fn dial(&self) -> Result<Arc<dyn Connection>, Error>;
}

/// The dialer for the remote DEST `dest` (its form decides the transport), reaching the
/// standby `server` as `me`.
///
/// # Errors
/// [`Error::Usage`] for a DEST no transport serves; the transport's own setup errors.
pub(crate) fn dialer(dest: &str, server: NodeId, me: &Identity) -> Result<Arc<dyn Dialer>, Error> {
    match dest::DestKind::of(dest) {
        Ok(dest::DestKind::Quic) => Ok(Arc::new(quic::Dialer::new(dest, server, me.clone())?)),
        Ok(dest::DestKind::Local) => Err(Error::Usage(format!(
            "DEST {dest} is a local directory, not a standby to connect to"
        ))),
        Err(e) => Err(Error::Usage(e.to_string())),
    }
}

/// A future a seam returns (the standby's accept loop is async).
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Decides whether an authenticated primary may open a session: `None` to admit it, or
/// the reason it is refused (told to the peer).
pub(crate) type Admit = Arc<dyn Fn(&NodeId) -> Option<String> + Send + Sync>;

/// A primary's connection, handshake done and identity proven.
pub struct Accepted {
    pub conn: Arc<dyn Connection>,
    pub id: NodeId,
    pub addr: SocketAddr,
}

/// Where a standby accepts primaries: one listening address of one transport.
pub trait Acceptor: Send + Sync {
    /// The address it listens on.
    fn local_addr(&self) -> SocketAddr;
    /// The next connection attempt; `None` once the acceptor is closed. Its handshake is
    /// completed apart ([`Handshake::complete`]), so a slow one holds up no other.
    fn next(&self) -> BoxFuture<'_, Option<Box<dyn Handshake>>>;
    /// Closes every connection and stops accepting: the standby is shutting down.
    fn close(&self, reason: &str);
    /// Resolves once every connection is closed.
    fn wait_idle(&self) -> BoxFuture<'_, ()>;
}

/// One primary's connection attempt.
pub trait Handshake: Send {
    /// Completes the handshake, proves the primary's identity and asks `admit`; a primary
    /// without an identity or refused by `admit` is told why here.
    ///
    /// # Errors
    /// Why it did not become a session, as one line for the log.
    fn complete(self: Box<Self>, admit: Admit) -> BoxFuture<'static, Result<Accepted, String>>;
}

/// Counts bytes written through it into a shared counter.
pub(crate) struct Counted<W> {
    inner: W,
    counter: Arc<AtomicU64>,
}

impl<W> Counted<W> {
    pub(crate) fn new(inner: W, counter: Arc<AtomicU64>) -> Self {
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
