//! Errors that end a command. Problems with single entries are not errors here: they are
//! collected in the summary and make the exit code 1.

use serde::{Deserialize, Serialize};
use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad arguments or paths; nothing was done.
    #[error("{0}")]
    Usage(String),
    /// A safety guard refused; nothing was written.
    #[error("{0}")]
    Refused(String),
    /// The source is empty (an unmounted disk?) while the standby holds entries, or no
    /// source is open: nothing was done, and a watch waits for the source to come back.
    #[error("{0}")]
    SourceEmpty(String),
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
    pub(crate) fn io(context: impl Into<String>, cause: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            cause,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a peer's `Error` is about, so the other side can act on it without parsing prose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The session was refused (bad options, a tree that cannot be written).
    Refused,
    /// Another primary is writing this tree: try again later.
    Busy,
    /// The peers speak no common protocol version.
    Version,
    /// The primary's epoch is older than the standby's: it has been fenced.
    StaleEpoch,
    /// Both sides were primary in the same epoch: refused until the operator rejoins one.
    SplitBrain,
    /// The peer broke the protocol.
    Invalid,
    /// The peer failed on its side.
    Failed,
}

/// Why one operation failed on the standby.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpError {
    pub message: String,
    /// Send the file again, whole (it was not made durable, or a delta did not check out).
    pub retry: bool,
    /// The standby's disk is full (ENOSPC, EDQUOT): the change must wait for space.
    pub no_space: bool,
}

impl OpError {
    pub(crate) fn new(message: impl Into<String>, retry: bool) -> OpError {
        OpError {
            message: message.into(),
            retry,
            no_space: false,
        }
    }
}

/// The connection failed, or the peer broke (or spoke another version of) the protocol.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection lost: {0}")]
    Io(io::Error),
    #[error("peer closed the stream")]
    Closed,
    #[error("frame of {len} bytes exceeds the {limit}-byte limit")]
    FrameTooLarge { len: u64, limit: usize },
    #[error("undecodable message: {0}")]
    Decode(postcard::Error),
    #[error("unexpected {got} (expected {expected})")]
    Unexpected {
        got: &'static str,
        expected: &'static str,
    },
    #[error("invalid message: {0}")]
    Invalid(String),
    #[error("not a hotsync peer (bad greeting)")]
    BadMagic,
    #[error(
        "protocol version mismatch: this hotsync speaks protocol {ours} (accepts {ours_min} to {ours}), \
         the peer speaks {theirs} (accepts {theirs_min} to {theirs}): run the same hotsync \
         release on both nodes"
    )]
    Version {
        ours: u16,
        ours_min: u16,
        theirs: u16,
        theirs_min: u16,
    },
    #[error("peer reported: {message}")]
    Peer { code: ErrorCode, message: String },
}

impl From<postcard::Error> for ProtocolError {
    fn from(e: postcard::Error) -> Self {
        ProtocolError::Decode(e)
    }
}

impl From<io::Error> for ProtocolError {
    fn from(e: io::Error) -> Self {
        ProtocolError::Io(e)
    }
}

impl ProtocolError {
    /// True when the byte stream itself failed (the session may work again later), as
    /// opposed to a peer that sent something wrong.
    pub(crate) fn is_transport(&self) -> bool {
        matches!(self, ProtocolError::Io(_) | ProtocolError::Closed)
    }
}
