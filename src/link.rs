//! How the primary reaches one standby: a local directory served by an in-process receiver,
//! or a `hotsync serve` over QUIC. Either way the engine gets a [`Link`] that owns the
//! connection; the [`Connector`] holds what every new link needs (the network runtime).

use crate::error::{Error, Result};
use crate::identity::{Identity, NodeId};
use crate::standby::{Access, Peer, Standby};
use crate::transport::{self, Connection};
use std::path::PathBuf;
use std::sync::Arc;

/// Where a standby is.
#[derive(Clone)]
pub enum Target {
    /// A local directory (the receiver runs in this process).
    Local(PathBuf),
    /// `quic://HOST:PORT`, which must present the certificate of `server`; `me` is the
    /// identity this primary shows.
    Remote {
        dest: String,
        server: NodeId,
        me: Identity,
    },
}

/// What a DEST argument names, as its text tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestKind {
    /// A local directory.
    Local,
    /// `quic://HOST:PORT`, a `hotsync serve`.
    Quic,
}

/// Why a DEST argument names nothing hotsync can reach. Each message says what to write
/// instead; the caller says where the DEST came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DestError {
    /// `HOST:PATH` (rsync's remote form), `user@host:path`, `host::module`.
    #[error(
        "{dest} looks like rsync's HOST:PATH, which hotsync does not reach: run `hotsync \
         serve --root PATH` on {host} and give quic://{host}:PORT with --server-id; for a \
         local directory of that name, write ./{dest}"
    )]
    HostPath { dest: String, host: String },
    /// `HOST:PORT` without the scheme.
    #[error(
        "{dest} looks like HOST:PORT: write quic://{dest} (with --server-id); for a local \
         directory of that name, write ./{dest}"
    )]
    HostPort { dest: String },
    #[error(
        "{dest}: the tcp:// transport is not supported yet; use quic://HOST:PORT (with \
         --server-id)"
    )]
    Tcp { dest: String },
    /// Any other `SCHEME://`.
    #[error(
        "{dest}: hotsync does not reach {scheme}:// standbys; give a local directory, or \
         quic://HOST:PORT of a `hotsync serve` (with --server-id)"
    )]
    Scheme { dest: String, scheme: String },
    #[error(
        "{dest} has no port: write quic://{host}:PORT, the port of its `hotsync serve \
         --listen` (7878 by default)"
    )]
    NoPort { dest: String, host: String },
    #[error("{dest}: {why}; expected quic://HOST:PORT")]
    BadQuic { dest: String, why: String },
}

impl DestKind {
    /// Tells what the DEST argument `dest` names, by its text alone (nothing is resolved
    /// or opened). A first name (up to the first `/`) holding a colon is not taken for a
    /// local directory, as rsync does not take it: it is `quic://HOST:PORT`, or an error
    /// saying what to write instead (a local directory named so is `./NAME`, or an absolute
    /// path).
    ///
    /// # Errors
    /// [`DestError`]: rsync's `HOST:PATH`, a `HOST:PORT` without its scheme, another scheme
    /// (`tcp://` among them: not supported yet), or a `quic://` address without a port or
    /// otherwise malformed.
    pub fn of(dest: &str) -> Result<DestKind, DestError> {
        let first = dest.split('/').next().unwrap_or_default();
        let Some((head, rest)) = first.split_once(':') else {
            return Ok(DestKind::Local);
        };
        if let Some(after) = dest.strip_prefix(head).and_then(|d| d.strip_prefix("://"))
            && is_scheme(head)
        {
            return match head.to_ascii_lowercase().as_str() {
                "quic" => quic_address(dest, after).map(|_| DestKind::Quic),
                "tcp" => Err(DestError::Tcp { dest: dest.into() }),
                _ => Err(DestError::Scheme {
                    dest: dest.into(),
                    scheme: head.into(),
                }),
            };
        }
        if !head.is_empty()
            && dest.len() == first.len()
            && !rest.is_empty()
            && rest.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(DestError::HostPort { dest: dest.into() });
        }
        // `user@host:path`: the serve runs on `host`.
        let host = head.rsplit('@').next().unwrap_or_default();
        Err(DestError::HostPath {
            dest: dest.into(),
            host: if host.is_empty() { "HOST" } else { host }.into(),
        })
    }
}

/// A URL scheme's spelling (RFC 3986): a letter, then letters, digits, `+`, `-`, `.`.
fn is_scheme(s: &str) -> bool {
    let mut b = s.bytes();
    b.next().is_some_and(|c| c.is_ascii_alphabetic())
        && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.'))
}

/// The host and port of the `quic://` DEST `dest`, whose part after the scheme is
/// `hostport` (a trailing `/` allowed). An IPv6 address is written in brackets.
///
/// # Errors
/// [`DestError::NoPort`] without a port, [`DestError::BadQuic`] for anything else that is
/// not `HOST:PORT`.
pub fn quic_address<'a>(dest: &str, hostport: &'a str) -> Result<(&'a str, u16), DestError> {
    let bad = |why: &str| DestError::BadQuic {
        dest: dest.into(),
        why: why.into(),
    };
    let hostport = hostport.trim_end_matches('/');
    if hostport.contains(['/', '?', '#', '@']) {
        return Err(bad(
            "only HOST:PORT may follow quic:// (no path, user or query)",
        ));
    }
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let Some((addr, after)) = v6.split_once(']') else {
            return Err(bad("an IPv6 address needs its closing `]`"));
        };
        if addr.is_empty() {
            return Err(bad("no host"));
        }
        match after.strip_prefix(':') {
            Some(port) => (&hostport[..addr.len() + 2], port),
            None if after.is_empty() => {
                return Err(DestError::NoPort {
                    dest: dest.into(),
                    host: hostport.into(),
                });
            }
            None => return Err(bad("only :PORT may follow an IPv6 address's `]`")),
        }
    } else {
        match hostport.split_once(':') {
            None => {
                if hostport.is_empty() {
                    return Err(bad("no host"));
                }
                return Err(DestError::NoPort {
                    dest: dest.into(),
                    host: hostport.into(),
                });
            }
            Some((_, port)) if port.contains(':') => {
                return Err(bad(
                    "write an IPv6 address in brackets: quic://[ADDRESS]:PORT",
                ));
            }
            Some((host, port)) => (host, port),
        }
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => Ok((host, p)),
        _ => Err(bad(&format!(
            "the port `{port}` is not a number from 1 to 65535"
        ))),
    }
}

impl Target {
    /// The standby as the user named it.
    pub fn describe(&self) -> String {
        match self {
            Target::Local(p) => p.display().to_string(),
            Target::Remote { dest, .. } => dest.clone(),
        }
    }

    /// The standby's pinned ID, for a remote one.
    pub fn server_id(&self) -> Option<NodeId> {
        match self {
            Target::Local(_) => None,
            Target::Remote { server, .. } => Some(*server),
        }
    }
}

/// Makes links to one standby, as often as needed (watch reconnects through it).
pub struct Connector {
    target: Target,
    /// Drives QUIC for a remote target (each link keeps it alive too).
    rt: Option<Arc<tokio::runtime::Runtime>>,
    /// A local DEST, held (and for writing, locked) as long as this connector lives.
    local: Option<Arc<Standby>>,
}

impl Connector {
    /// Prepares to reach `target`; a local DEST is opened here with `access` (for
    /// [`Access::Write`] its lock is held until the connector is dropped).
    ///
    /// # Errors
    /// [`Error::Usage`] for a local DEST another hotsync writes, or whose state is damaged.
    pub fn new(target: Target, access: Access) -> Result<Connector> {
        let (rt, local) = match &target {
            Target::Remote { .. } => (
                Some(Arc::new(transport::quic::runtime().map_err(|e| {
                    Error::io("cannot start the network runtime", e)
                })?)),
                None,
            ),
            Target::Local(dest) => (None, Some(Arc::new(Standby::open(dest, access)?))),
        };
        Ok(Connector { target, rt, local })
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Connects: a new in-process receiver for a local directory, a QUIC handshake with
    /// the pinned standby for a remote one.
    ///
    /// # Errors
    /// For a remote standby: [`Error::Unreachable`] (no answer, bad address),
    /// [`Error::Auth`] (wrong server ID, this primary not allowed).
    pub fn connect(&self) -> Result<Link> {
        match &self.target {
            Target::Local(_) => {
                let (primary, end) = transport::local::pair();
                let end: Arc<dyn Connection> = Arc::new(end);
                let standby = self.local.clone().expect("a local target has its standby");
                let receiver = std::thread::Builder::new()
                    .name("hotsync-receiver".into())
                    .spawn(move || {
                        let served = crate::receiver::serve(end.clone(), &standby, Peer::local());
                        if let Err(e) = served {
                            tracing::debug!("standby session ended: {e}");
                            // The primary may be waiting for an answer that will not come.
                            end.abort(&e.to_string());
                        }
                    })
                    .map_err(|e| Error::io("cannot start the receiver", e))?;
                Ok(Link {
                    conn: Arc::new(primary),
                    receiver: Some(receiver),
                    clean: false,
                    _rt: None,
                })
            }
            Target::Remote { dest, server, me } => {
                let rt = self.rt.as_ref().expect("a runtime for a remote target");
                let conn = transport::quic::connect(rt.handle(), dest, *server, me)?;
                Ok(Link {
                    conn: Arc::new(conn),
                    receiver: None,
                    clean: false,
                    _rt: Some(rt.clone()),
                })
            }
        }
    }
}

/// One connection to a standby, owned. Dropping it aborts the connection unless the session
/// on it ended cleanly ([`Link::closed_cleanly`]), and waits for a local receiver to finish.
pub struct Link {
    conn: Arc<dyn Connection>,
    receiver: Option<std::thread::JoinHandle<()>>,
    clean: bool,
    /// Declared last: dropped after the connection it drives.
    _rt: Option<Arc<tokio::runtime::Runtime>>,
}

impl Link {
    /// A link over `conn`, a connection whose other end a test serves itself.
    #[cfg(test)]
    pub(crate) fn over(conn: Arc<dyn Connection>) -> Link {
        Link {
            conn,
            receiver: None,
            clean: false,
            _rt: None,
        }
    }

    pub fn conn(&self) -> &Arc<dyn Connection> {
        &self.conn
    }

    /// The better account of a failure: why the connection ended (the standby's reason, a
    /// timeout) says more than the broken stream it caused.
    pub fn explain(&self, e: Error) -> Error {
        let broken = match &e {
            Error::Protocol(p) => p.is_transport(),
            Error::Unreachable(_) | Error::Io { .. } => true,
            _ => false,
        };
        match self.conn.failure() {
            Some(f) if broken => f,
            _ => e,
        }
    }

    /// The session on this link has ended cleanly: drop without aborting.
    pub fn closed_cleanly(&mut self) {
        self.clean = true;
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if !self.clean {
            self.conn.abort("primary closing the connection");
        }
        if let Some(r) = self.receiver.take() {
            let _ = r.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(dest: &str) -> String {
        DestKind::of(dest).unwrap_err().to_string()
    }

    #[test]
    fn local_paths_and_quic_addresses_are_told_apart_by_their_text() {
        for local in [
            "copy",
            "./standby:copy",
            "/srv/standby:copy",
            "../a:b",
            "dir/x:y",
            "dir/quic://x",
            "-",
        ] {
            assert_eq!(DestKind::of(local), Ok(DestKind::Local), "{local}");
        }
        for quic in [
            "quic://standby:7878",
            "quic://10.0.0.2:1/",
            "quic://[::1]:7878",
            "QUIC://h:65535",
        ] {
            assert_eq!(DestKind::of(quic), Ok(DestKind::Quic), "{quic}");
        }
        assert_eq!(quic_address("d", "[::1]:7878"), Ok(("[::1]", 7878)));
        assert_eq!(quic_address("d", "h:9/"), Ok(("h", 9)));
    }

    #[test]
    fn forms_hotsync_does_not_reach_say_what_to_write_instead() {
        let e = err("standby:copy");
        assert!(
            e.contains("rsync's HOST:PATH")
                && e.contains("quic://standby:PORT")
                && e.contains("write ./standby:copy"),
            "{e}"
        );
        let e = err("root@standby:/srv/copy");
        assert!(
            e.contains("on standby and give quic://standby:PORT")
                && e.contains("./root@standby:/srv/copy"),
            "{e}"
        );
        assert!(err("standby::module").contains("HOST:PATH"));
        let e = err("standby:7878");
        assert!(
            e.contains("write quic://standby:7878") && e.contains("./standby:7878"),
            "{e}"
        );
        let e = err("tcp://standby");
        assert!(
            e.contains("tcp:// transport is not supported yet") && e.contains("quic://HOST:PORT"),
            "{e}"
        );
        for other in ["ssh://standby/srv", "rsync://standby/mod", "hotsync://h:1"] {
            let e = err(other);
            assert!(
                e.contains("does not reach") && e.contains("quic://HOST:PORT"),
                "{e}"
            );
        }
        let e = err("quic://localhost");
        assert!(
            e.contains("has no port") && e.contains("write quic://localhost:PORT"),
            "{e}"
        );
        assert!(err("quic://[::1]").contains("quic://[::1]:PORT"));
        for (bad, why) in [
            ("quic://", "no host"),
            ("quic://:7878", "no host"),
            ("quic://h:0", "not a number from 1 to 65535"),
            ("quic://h:+1", "not a number"),
            ("quic://h:70000", "not a number"),
            ("quic://h:1/path", "no path"),
            ("quic://u@h:1", "no path, user"),
            ("quic://::1:7878", "in brackets"),
            ("quic://[::1", "closing"),
        ] {
            let e = err(bad);
            assert!(
                e.contains(why) && e.contains("expected quic://HOST:PORT"),
                "{bad}: {e}"
            );
        }
        // One line each.
        for d in ["standby:copy", "tcp://x", "quic://x", "quic://h:0"] {
            assert!(!err(d).contains('\n') && !err(d).contains("  "), "{d}");
        }
    }
}
