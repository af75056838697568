//! The two ends every operation of a session goes between (the primary's tree and the
//! link to the standby), what goes with each entry, and what a broken exchange with the
//! standby means.

use crate::error::{Error, ErrorCode, ProtocolError};
use crate::model::progress::Monitor;
use crate::model::xattrs::Policy;
use crate::primary::link::Link;
use crate::transport::Connection;
use crate::tree::fsroot::Root;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// What goes with each entry besides its content, as agreed when the session opened.
#[derive(Debug, Clone, Copy)]
pub(super) struct Carry {
    /// The extended attributes and ACLs sent with each entry.
    pub xattrs: Policy,
    /// Files with holes go as `SparseFile` and `SparseDelta` (the standby speaks 5).
    pub holes: bool,
    /// A watch's session: a large file that changes while read is left to the batch its
    /// change comes in, instead of being sent again whole at once.
    pub watching: bool,
}

/// The two ends a plan goes between, the primary's tree and the link to the standby, with
/// what every operation on that link shares.
pub(super) struct Ends<'m> {
    pub link: Link,
    pub root: Arc<Root>,
    /// What goes with each entry besides its content.
    pub carry: Carry,
    pub monitor: &'m dyn Monitor,
    pub(super) next_id: AtomicU64,
}

impl Ends<'_> {
    pub(super) fn conn(&self) -> &dyn Connection {
        &**self.link.conn()
    }

    /// A new operation id, unique in the session.
    pub(super) fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// The error a broken exchange with the standby means: its coded refusals as what they
/// say (fenced, split brain, its own failure), anything else as a protocol error.
pub(super) fn peer_error(e: ProtocolError) -> Error {
    match e {
        ProtocolError::Peer {
            code: ErrorCode::StaleEpoch,
            message,
        } => Error::Fenced(message),
        ProtocolError::Peer {
            code: ErrorCode::SplitBrain,
            message,
        } => Error::SplitBrain(message),
        ProtocolError::Peer { message, .. } => Error::Standby(message),
        other => other.into(),
    }
}
