//! Errors that end a command. Problems with single entries are not errors here: they are
//! collected in the summary and make the exit code 1.

use crate::protocol::ProtocolError;
use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad arguments or paths; nothing was done.
    #[error("{0}")]
    Usage(String),
    /// A safety guard refused; nothing was written.
    #[error("{0}")]
    Refused(String),
    /// The peer's identity was refused, or it refused ours.
    #[error("{0}")]
    Auth(String),
    /// The peer cannot be reached, or the connection to it was lost.
    #[error("{0}")]
    Unreachable(String),
    /// The standby reported a fatal problem of its own (its message is in the text).
    #[error("standby: {0}")]
    Standby(String),
    /// A newer epoch took over: this primary must stop writing (and be rejoined).
    #[error("fenced: {0}")]
    Fenced(String),
    /// Two nodes were primary in the same epoch: refused until one is rejoined.
    #[error("{0}")]
    SplitBrain(String),
    /// The connection failed or the peer broke the protocol.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("{context}: {cause}")]
    Io { context: String, cause: io::Error },
}

impl Error {
    pub fn io(context: impl Into<String>, cause: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            cause,
        }
    }

    /// True when trying again later may succeed (network loss, a standby restarting), as
    /// opposed to a problem someone must fix.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Protocol(p) => p.is_transport(),
            Error::Io { .. } | Error::Unreachable(_) => true,
            _ => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
