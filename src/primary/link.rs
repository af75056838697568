//! How the primary reaches one standby: a local directory served by an in-process receiver,
//! or a `hotsync serve` through a transport's `Dialer`. Either way the engine gets a
//! [`Link`] that owns the connection; the `Connector` holds what every new link needs.

use crate::error::{Error, Result};
use crate::standby::{Access, Peer, Standby};
use crate::transport::identity::{Identity, NodeId};
use crate::transport::{self, Connection, Dialer};
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

impl Target {
    /// The standby as the user named it.
    pub fn describe(&self) -> String {
        match self {
            Target::Local(p) => p.display().to_string(),
            Target::Remote { dest, .. } => dest.clone(),
        }
    }

    /// The standby's pinned ID, for a remote one.
    pub(crate) fn server_id(&self) -> Option<NodeId> {
        match self {
            Target::Local(_) => None,
            Target::Remote { server, .. } => Some(*server),
        }
    }
}

/// Makes links to one standby, as often as needed (watch reconnects through it).
pub(crate) struct Connector {
    target: Target,
    /// Connects to a remote target (each link keeps it alive too: it drives the link).
    dialer: Option<Arc<dyn Dialer>>,
    /// A local DEST, held (and for writing, locked) as long as this connector lives.
    local: Option<Arc<Standby>>,
}

impl Connector {
    /// Prepares to reach `target`; a local DEST is opened here with `access` (for
    /// [`Access::Write`] its lock is held until the connector is dropped).
    ///
    /// # Errors
    /// [`Error::Usage`] for a local DEST another hotsync writes, or whose state is damaged.
    pub(crate) fn new(target: Target, access: Access) -> Result<Connector> {
        let (dialer, local) = match &target {
            Target::Remote { dest, server, me } => {
                (Some(transport::dialer(dest, *server, me)?), None)
            }
            Target::Local(dest) => (None, Some(Arc::new(Standby::open(dest, access)?))),
        };
        Ok(Connector {
            target,
            dialer,
            local,
        })
    }

    /// What a promotion of a local DEST gives back; nothing for a remote one, whose
    /// `serve` decides.
    pub(crate) fn set_consistency(&self, c: crate::model::epoch::Consistency) {
        if let Some(s) = &self.local {
            s.set_consistency(c);
        }
    }

    pub(crate) fn target(&self) -> &Target {
        &self.target
    }

    /// Connects: a new in-process receiver for a local directory, the transport's
    /// handshake with the pinned standby for a remote one.
    ///
    /// # Errors
    /// For a remote standby: [`Error::Unreachable`] (no answer, bad address),
    /// [`Error::Auth`] (wrong server ID, this primary not allowed).
    pub(crate) fn connect(&self) -> Result<Link> {
        match &self.target {
            Target::Local(_) => {
                let (primary, end) = transport::local::pair();
                let end: Arc<dyn Connection> = Arc::new(end);
                let standby = self.local.clone().expect("a local target has its standby");
                let receiver = std::thread::Builder::new()
                    .name("hotsync-receiver".into())
                    .spawn(move || {
                        let served =
                            crate::standby::receiver::serve(end.clone(), &standby, Peer::local());
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
                    _dialer: None,
                })
            }
            Target::Remote { .. } => {
                let dialer = self.dialer.as_ref().expect("a dialer for a remote target");
                Ok(Link {
                    conn: dialer.dial()?,
                    receiver: None,
                    clean: false,
                    _dialer: Some(dialer.clone()),
                })
            }
        }
    }
}

/// One connection to a standby, owned. Dropping it aborts the connection unless the session
/// on it ended cleanly (`Link::closed_cleanly`), and waits for a local receiver to finish.
pub struct Link {
    conn: Arc<dyn Connection>,
    receiver: Option<std::thread::JoinHandle<()>>,
    clean: bool,
    /// Declared last: dropped after the connection it drives.
    _dialer: Option<Arc<dyn Dialer>>,
}

impl Link {
    /// A link over `conn`, a connection whose other end a test serves itself.
    #[cfg(test)]
    pub(crate) fn over(conn: Arc<dyn Connection>) -> Link {
        Link {
            conn,
            receiver: None,
            clean: false,
            _dialer: None,
        }
    }

    pub(crate) fn conn(&self) -> &Arc<dyn Connection> {
        &self.conn
    }

    /// The better account of a failure: why the connection ended (the standby's reason, a
    /// timeout) says more than the broken stream it caused.
    pub(crate) fn explain(&self, e: Error) -> Error {
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
    pub(crate) fn closed_cleanly(&mut self) {
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
