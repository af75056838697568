//! The filesystem: opening a tree without following symlinks, scanning and walking it,
//! reading and writing attributes, holes and snapshots, and replacing files atomically
//! and durably on the standby. Imports only the model below it.

pub mod atomic;
pub(crate) mod blockindex;
pub mod fsroot;
pub mod mounts;
pub mod operand;
pub(crate) mod patch;
pub mod reserved;
pub mod scan;
pub mod snapshot;
pub mod sparse;
pub mod spill;
pub(crate) mod undo;
pub mod walk;
pub mod xattr;
