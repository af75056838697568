//! QUIC (quinn) transport. The engine's threads use streams through small blocking adapters
//! over the tokio runtime that drives quinn; every failure a user can meet (unreachable,
//! wrong server ID, primary not allowed, version mismatch, standby gone) becomes an error
//! that says which.

use super::tls::{self, PinnedServer};
use super::{
    Accepted, Acceptor, Admit, BoxFuture, Connection, Counted, Handshake, SendHalf, Stream,
};
use crate::error::{Error, ErrorCode};
use crate::transport::identity::{Identity, NodeId};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{
    ConnectionError, Endpoint, EndpointConfig, IdleTimeout, MtuDiscoveryConfig, TransportConfig,
    VarInt,
};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::runtime::Handle;

/// Application close codes.
pub(crate) const CLOSE_OK: u32 = 0;
/// The primary's ID is not in the standby's `--allow` list.
pub(crate) const CLOSE_REFUSED: u32 = 1;
/// The session failed on the standby (the reason says why).
pub(crate) const CLOSE_FAILED: u32 = 2;
/// The standby is shutting down.
pub(crate) const CLOSE_SHUTDOWN: u32 = 3;
/// The primary has been fenced: a newer epoch took over (the reason says which).
pub(crate) const CLOSE_FENCED: u32 = 4;
/// The primary was refused: it and the standby were both primary in one epoch.
pub(crate) const CLOSE_SPLIT_BRAIN: u32 = 5;

/// How long a silent peer is waited for before QUIC declares the connection lost: a
/// safety net behind the heartbeats, which give a silent peer up sooner
/// ([`crate::model::liveness::IDLE`]) and say so.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(15);
pub(crate) const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// How long the handshake with a standby may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// UDP socket buffers: the kernel's defaults drop packets at gigabit rates.
pub(crate) const SOCKET_BUFFER: usize = 4 << 20;

/// The runtime that drives quinn.
pub fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("hotsync-quic")
        .enable_all()
        .build()
}

/// Transport settings for both ends. Windows bound the memory a connection can hold
/// (receive window) while leaving loopback and LAN links full.
pub(crate) fn transport_config() -> TransportConfig {
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(64))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(8 << 20))
        .receive_window(VarInt::from_u32(16 << 20))
        .send_window(16 << 20)
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(
            IdleTimeout::try_from(IDLE_TIMEOUT).expect("15 s fits"),
        ));
    let mut mtu = MtuDiscoveryConfig::default();
    // Probe up to jumbo frames; paths with a smaller MTU stop the search where they must.
    mtu.upper_bound(1452);
    t.mtu_discovery_config(Some(mtu));
    t
}

/// Binds a UDP socket with large buffers; returns a warning when the kernel caps them.
fn udp_socket(addr: SocketAddr) -> io::Result<(UdpSocket, Option<String>)> {
    use rustix::net::sockopt as so;
    let sock = UdpSocket::bind(addr)?;
    // The forcing variants pass the sysctl caps when we may (CAP_NET_ADMIN).
    if so::set_socket_recv_buffer_size_force(&sock, SOCKET_BUFFER).is_err() {
        let _ = so::set_socket_recv_buffer_size(&sock, SOCKET_BUFFER);
    }
    if so::set_socket_send_buffer_size_force(&sock, SOCKET_BUFFER).is_err() {
        let _ = so::set_socket_send_buffer_size(&sock, SOCKET_BUFFER);
    }
    // Linux reports twice the size it was asked for.
    let recv = so::socket_recv_buffer_size(&sock).unwrap_or(0) / 2;
    let send = so::socket_send_buffer_size(&sock).unwrap_or(0) / 2;
    let warn = (recv < SOCKET_BUFFER || send < SOCKET_BUFFER).then(|| {
        format!(
            "UDP socket buffers are {} KiB (receive) and {} KiB (send), not {} KiB: raise \
             net.core.rmem_max and net.core.wmem_max to {} for full speed",
            recv / 1024,
            send / 1024,
            SOCKET_BUFFER / 1024,
            2 * SOCKET_BUFFER
        )
    });
    Ok((sock, warn))
}

fn endpoint(addr: SocketAddr, server: Option<quinn::ServerConfig>) -> io::Result<Endpoint> {
    let (sock, warn) = udp_socket(addr)?;
    if let Some(w) = warn {
        tracing::warn!("{w}");
    }
    // quinn's default datagram limit (1472 bytes) is kept on purpose: with jumbo datagrams
    // a burst overflowing the receiver's socket buffer looks like a black hole, and MTU
    // discovery then falls back to 1200 bytes for good (measured: 4x slower on loopback).
    Endpoint::new(
        EndpointConfig::default(),
        server,
        sock,
        Arc::new(quinn::TokioRuntime),
    )
}

/// Counts bytes read through it.
struct CountedRead<R> {
    inner: R,
    counter: Arc<AtomicU64>,
}

impl<R: Read> Read for CountedRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

struct RecvHalf {
    rt: Handle,
    s: quinn::RecvStream,
}

impl Read for RecvHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.rt.block_on(self.s.read(buf)) {
            Ok(Some(n)) => Ok(n),
            Ok(None) => Ok(0),
            Err(e) => Err(io::Error::from(e)),
        }
    }
}

struct SendHalfQ {
    rt: Handle,
    s: quinn::SendStream,
}

impl Write for SendHalfQ {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.rt.block_on(self.s.write(buf)).map_err(io::Error::from)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl SendHalf for SendHalfQ {
    fn finish(&mut self) -> io::Result<()> {
        self.s
            .finish()
            .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e))
    }
    fn wait_delivered(&mut self) {
        let stopped = self.s.stopped();
        let _ = self
            .rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(2), stopped).await });
    }
}

/// An established QUIC connection, as the engine sees it.
pub struct QuicConnection {
    conn: quinn::Connection,
    /// How the peer or the network ended the connection, kept before any local close
    /// (which would otherwise be all `close_reason` reports).
    ended: std::sync::Mutex<Option<ConnectionError>>,
    /// Why this side gave the peer up (it fell silent).
    gave_up: std::sync::Mutex<Option<String>>,
    rt: Handle,
    bytes: Arc<AtomicU64>,
    /// The client's own endpoint, drained on close so the close reaches the peer.
    endpoint: Option<Endpoint>,
}

impl QuicConnection {
    pub fn new(conn: quinn::Connection, rt: Handle) -> Self {
        QuicConnection {
            conn,
            ended: Default::default(),
            gave_up: Default::default(),
            rt,
            bytes: Arc::new(AtomicU64::new(0)),
            endpoint: None,
        }
    }

    pub(crate) fn remote(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    fn stream(&self, (send, recv): (quinn::SendStream, quinn::RecvStream)) -> Stream {
        Stream {
            recv: Box::new(CountedRead {
                inner: RecvHalf {
                    rt: self.rt.clone(),
                    s: recv,
                },
                counter: self.bytes.clone(),
            }),
            send: Box::new(Counted::new(
                SendHalfQ {
                    rt: self.rt.clone(),
                    s: send,
                },
                self.bytes.clone(),
            )),
        }
    }

    fn remember_end(&self) {
        if let Some(r) = self.conn.close_reason() {
            self.ended.lock().unwrap().get_or_insert(r);
        }
    }
}

impl Connection for QuicConnection {
    fn open(&self) -> io::Result<Stream> {
        let pair = self
            .rt
            .block_on(self.conn.open_bi())
            .map_err(io::Error::from)?;
        Ok(self.stream(pair))
    }

    fn accept(&self) -> io::Result<Option<Stream>> {
        match self.rt.block_on(self.conn.accept_bi()) {
            Ok(pair) => Ok(Some(self.stream(pair))),
            Err(ConnectionError::ApplicationClosed(_) | ConnectionError::LocallyClosed) => Ok(None),
            Err(e) => Err(io::Error::from(e)),
        }
    }

    fn wire_bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// How the peer or the network ended the connection (kept before any local close).
    fn failure(&self) -> Option<Error> {
        if let Some(why) = self.gave_up.lock().unwrap().clone() {
            return Some(Error::Unreachable(why));
        }
        let addr = self.remote();
        let reason = self
            .ended
            .lock()
            .unwrap()
            .clone()
            .or_else(|| self.conn.close_reason())?;
        Some(match reason {
            ConnectionError::ApplicationClosed(c) => {
                let text = String::from_utf8_lossy(&c.reason).into_owned();
                match c.error_code.into_inner() as u32 {
                    CLOSE_REFUSED => Error::Auth(format!(
                        "the standby at {addr} refused this primary: {text}"
                    )),
                    CLOSE_SHUTDOWN => {
                        Error::Unreachable(format!("the standby at {addr} shut down"))
                    }
                    CLOSE_FENCED => Error::Fenced(text),
                    CLOSE_SPLIT_BRAIN => Error::SplitBrain(text),
                    CLOSE_OK => return None,
                    _ => Error::Standby(text),
                }
            }
            ConnectionError::LocallyClosed => return None,
            ConnectionError::TimedOut => Error::Unreachable(format!(
                "lost the standby at {addr}: no answer for {} s",
                IDLE_TIMEOUT.as_secs()
            )),
            ConnectionError::Reset => Error::Unreachable(format!(
                "the standby at {addr} restarted (connection reset)"
            )),
            other => Error::Unreachable(format!(
                "connection to the standby at {addr} failed: {other}"
            )),
        })
    }

    /// A clean end: the standby closes too once the session is over, so nothing waits
    /// for the close to drain.
    fn close(&self, reason: &str) {
        self.remember_end();
        if self.endpoint.is_some() {
            // The primary: the standby closes once it knows we have `Closed`; wait for
            // that (briefly), or our own close might never leave before we exit.
            let closed = self.conn.closed();
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_millis(250), closed).await });
        }
        self.conn
            .close(VarInt::from_u32(CLOSE_OK), reason.as_bytes());
    }

    fn fence(&self, reason: &str) {
        self.remember_end();
        let r = &reason.as_bytes()[..reason.len().min(512)];
        self.conn.close(VarInt::from_u32(CLOSE_FENCED), r);
    }

    fn refuse(&self, code: ErrorCode, reason: &str) {
        match code {
            ErrorCode::StaleEpoch => self.fence(reason),
            ErrorCode::SplitBrain => {
                self.remember_end();
                let r = &reason.as_bytes()[..reason.len().min(512)];
                self.conn.close(VarInt::from_u32(CLOSE_SPLIT_BRAIN), r);
            }
            _ => self.abort(reason),
        }
    }

    fn give_up(&self, reason: &str) {
        self.gave_up
            .lock()
            .unwrap()
            .get_or_insert_with(|| reason.to_string());
        self.abort(reason);
    }

    fn abort(&self, reason: &str) {
        self.remember_end();
        let mut r = reason.as_bytes();
        r = &r[..r.len().min(512)];
        self.conn.close(VarInt::from_u32(CLOSE_FAILED), r);
        // Let the close reach the peer (briefly), so a standby stops waiting for us and
        // frees its session lock at once.
        if let Some(ep) = &self.endpoint {
            let _ = self.rt.block_on(async {
                tokio::time::timeout(Duration::from_millis(300), ep.wait_idle()).await
            });
        }
    }
}

/// Resolves `quic://HOST:PORT` (or `HOST:PORT`).
pub(crate) fn parse_dest(dest: &str) -> Result<(String, SocketAddr), Error> {
    let after = dest.split_once("://").map_or(dest, |(_, a)| a);
    let (host, port) = super::dest::quic_address(dest, after)
        .map_err(|e| Error::Usage(format!("bad DEST {e}")))?;
    let hostport = format!("{host}:{port}");
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| Error::Unreachable(format!("cannot resolve {hostport}: {e}")))?
        .next()
        .ok_or_else(|| Error::Unreachable(format!("{hostport} resolves to no address")))?;
    Ok((hostport, addr))
}

/// Dials one standby over QUIC, with the runtime that drives its connections.
pub(crate) struct Dialer {
    rt: tokio::runtime::Runtime,
    dest: String,
    server: NodeId,
    me: Identity,
}

impl Dialer {
    /// A dialer of the `quic://` DEST `dest`.
    ///
    /// # Errors
    /// When the runtime cannot start.
    pub(crate) fn new(dest: &str, server: NodeId, me: Identity) -> Result<Dialer, Error> {
        let rt = runtime().map_err(|e| Error::io("cannot start the network runtime", e))?;
        Ok(Dialer {
            rt,
            dest: dest.to_string(),
            server,
            me,
        })
    }
}

impl super::Dialer for Dialer {
    fn dial(&self) -> Result<Arc<dyn Connection>, Error> {
        Ok(Arc::new(connect(
            self.rt.handle(),
            &self.dest,
            self.server,
            &self.me,
        )?))
    }
}

/// Connects to the standby at `dest`, which must present `server`'s certificate.
pub fn connect(
    rt: &Handle,
    dest: &str,
    server: NodeId,
    me: &Identity,
) -> Result<QuicConnection, Error> {
    let (shown, addr) = parse_dest(dest)?;
    let verifier = PinnedServer::new(server);
    let tls = tls::client_config(me, verifier.clone())
        .map_err(|e| Error::Usage(format!("TLS setup: {e}")))?;
    let crypto =
        QuicClientConfig::try_from(tls).map_err(|e| Error::Usage(format!("TLS setup: {e}")))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport_config()));
    let bind: SocketAddr = if addr.is_ipv6() {
        "[::]:0".parse().unwrap()
    } else {
        "0.0.0.0:0".parse().unwrap()
    };
    let _guard = rt.enter();
    let ep = endpoint(bind, None).map_err(|e| Error::io("cannot open a UDP socket", e))?;
    let connecting = ep
        .connect_with(cfg, addr, "hotsync")
        .map_err(|e| Error::Unreachable(format!("cannot connect to {shown}: {e}")))?;
    let t = std::time::Instant::now();
    let result = rt.block_on(async { tokio::time::timeout(CONNECT_TIMEOUT, connecting).await });
    tracing::debug!("{} ms: handshake", t.elapsed().as_millis());
    let conn = match result {
        Err(_) => {
            return Err(Error::Unreachable(format!(
                "cannot reach the standby at {shown}: no answer within {} s (is `hotsync serve` running there, and UDP port {} open?)",
                CONNECT_TIMEOUT.as_secs(),
                addr.port()
            )));
        }
        Ok(Err(e)) => return Err(handshake_error(&shown, &verifier, e)),
        Ok(Ok(c)) => c,
    };
    Ok(QuicConnection {
        conn,
        ended: Default::default(),
        gave_up: Default::default(),
        rt: rt.clone(),
        bytes: Arc::new(AtomicU64::new(0)),
        endpoint: Some(ep),
    })
}

fn handshake_error(shown: &str, verifier: &PinnedServer, e: ConnectionError) -> Error {
    if let Some(seen) = *verifier.seen.lock().unwrap()
        && seen != verifier.expected
    {
        return Error::Auth(format!(
            "the standby at {shown} has ID {seen}, not the pinned --server-id {}: refusing to talk to it",
            verifier.expected
        ));
    }
    let text = e.to_string();
    match e {
        ConnectionError::ConnectionClosed(ref c)
            if text.contains("no_application_protocol")
                || c.error_code == quinn::TransportErrorCode::crypto(120) =>
        {
            Error::Unreachable(format!(
                "version mismatch: the peer at {shown} does not speak hotsync/1"
            ))
        }
        ConnectionError::TimedOut => {
            Error::Unreachable(format!("cannot reach the standby at {shown}: timed out"))
        }
        ConnectionError::ApplicationClosed(c)
            if c.error_code.into_inner() as u32 == CLOSE_REFUSED =>
        {
            Error::Auth(format!(
                "the standby at {shown} refused this primary: {}",
                String::from_utf8_lossy(&c.reason)
            ))
        }
        other => Error::Unreachable(format!("TLS/QUIC handshake with {shown} failed: {other}")),
    }
}

/// A bound standby endpoint.
pub struct Server {
    pub endpoint: Endpoint,
    pub addr: SocketAddr,
}

/// Binds the standby's endpoint on `listen`.
pub fn bind(rt: &Handle, listen: &str, me: &Identity) -> Result<Server, Error> {
    let addr = listen
        .to_socket_addrs()
        .map_err(|e| Error::Usage(format!("bad --listen {listen}: {e}")))?
        .next()
        .ok_or_else(|| Error::Usage(format!("bad --listen {listen}: no address")))?;
    let tls = tls::server_config(me).map_err(|e| Error::Usage(format!("TLS setup: {e}")))?;
    let crypto =
        QuicServerConfig::try_from(tls).map_err(|e| Error::Usage(format!("TLS setup: {e}")))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport_config()));
    let _guard = rt.enter();
    let endpoint = endpoint(addr, Some(cfg)).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            Error::Usage(format!(
                "cannot listen on {listen}: the address is already in use"
            ))
        } else {
            Error::Usage(format!("cannot listen on {listen}: {e}"))
        }
    })?;
    let addr = endpoint
        .local_addr()
        .map_err(|e| Error::io("local address", e))?;
    Ok(Server { endpoint, addr })
}

impl Acceptor for Server {
    fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    fn next(&self) -> BoxFuture<'_, Option<Box<dyn Handshake>>> {
        Box::pin(async move {
            let incoming = self.endpoint.accept().await?;
            Some(Box::new(QuicHandshake(incoming)) as Box<dyn Handshake>)
        })
    }

    fn close(&self, reason: &str) {
        self.endpoint
            .close(VarInt::from_u32(CLOSE_SHUTDOWN), reason.as_bytes());
    }

    fn wait_idle(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.endpoint.wait_idle())
    }
}

/// A primary's QUIC connection attempt.
struct QuicHandshake(quinn::Incoming);

impl Handshake for QuicHandshake {
    fn complete(self: Box<Self>, admit: Admit) -> BoxFuture<'static, Result<Accepted, String>> {
        Box::pin(async move {
            let addr = self.0.remote_address();
            let conn = self
                .0
                .await
                .map_err(|e| format!("connection from {addr}: handshake failed: {e}"))?;
            let Some(id) = tls::peer_id(&conn) else {
                conn.close(
                    VarInt::from_u32(CLOSE_REFUSED),
                    b"a client certificate is required",
                );
                return Err(format!(
                    "connection from {addr}: refused: no client certificate"
                ));
            };
            if let Some(reason) = admit(&id) {
                conn.close(VarInt::from_u32(CLOSE_REFUSED), reason.as_bytes());
                return Err(format!("primary {id} from {addr}: refused: {reason}"));
            }
            let conn = QuicConnection::new(conn, tokio::runtime::Handle::current());
            Ok(Accepted {
                conn: Arc::new(conn),
                id,
                addr,
            })
        })
    }
}
