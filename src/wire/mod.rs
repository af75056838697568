//! The wire: the protocol's messages and their codec, a framed channel over one
//! transport stream, and the heartbeat stream. Imports the model and the transport seam.

pub mod channel;
pub(crate) mod handshake;
pub mod heartbeat;
pub mod protocol;
pub(crate) mod record;
