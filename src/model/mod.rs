//! The pure core: what a tree is (paths, entries, listings), and the decisions made on
//! it (the plan, the merge of two listings, the guard, epochs, flushes, the comparison
//! behind verify, the rsync-style delta). No filesystem, no network, no clock but the one
//! passed in: everything here is a function of its inputs, tested without I/O.

pub(crate) mod blockindex;
pub mod bytes;
pub mod clock;
pub mod compare;
pub mod delta;
pub mod epoch;
pub mod filter;
pub mod flush;
pub mod guard;
pub mod holes;
pub mod listing;
pub(crate) mod livedb;
pub mod liveness;
pub mod manifest;
pub mod merge;
pub mod names;
pub(crate) mod patch;
pub mod path;
pub mod plan;
pub mod progress;
pub mod status;
pub mod summary;
pub(crate) mod undo;
pub mod xattrs;
