//! hotsync keeps a standby copy of a directory tree identical to the primary's.
//!
//! One engine serves every mode: [`tree::scan`] both trees, [`model::plan`] the
//! difference (pure), then a [`primary::sender`] drives the plan through the
//! [`wire::protocol`] to a [`standby::receiver`], which writes each file atomically and
//! durably ([`tree::atomic`]). A local DEST runs the receiver in-process over
//! `transport::local`, the same bytes QUIC carries for a remote one; a
//! [`primary::link`] is either.
//!
//! The layers, bottom up; each imports only from those below it:
//! - [`error`]: the kinds of error that end a command, and the wire's;
//! - [`model`]: the pure core (paths, entries, the plan, the merge, the guard, epochs,
//!   flushes, the comparison, the delta), no I/O;
//! - [`transport`]: connections and streams (in-process, QUIC), dialers and acceptors;
//! - [`tree`]: the filesystem (scan, walk, attributes, holes, atomic durable writes);
//! - [`wire`]: the protocol's codec, the framed channel, heartbeats;
//! - [`ops`]: status, metrics, alerts, health, the configuration file;
//! - [`standby`]: the standby's tree, the receiver, `serve`, promote and rejoin;
//! - [`primary`]: the primary's tree, links to standbys, the sender, `watch`, `verify`.

pub mod error;
pub mod model;
pub mod ops;
pub mod primary;
pub mod standby;
pub mod transport;
pub mod tree;
pub mod wire;

pub use error::{Error, Result};
pub use model::progress::Monitor;
pub use primary::link::Target;
pub use primary::sender::{Outcome, SyncOptions};

use std::path::Path;
use std::sync::Arc;

/// Mirrors `src` to the standby `target` once, like `rsync -a --delete`.
///
/// # Errors
/// [`Error::Usage`] for a bad SRC or DEST, [`Error::SourceEmpty`] for an empty SRC facing a
/// standby that is not (nothing is touched), and the connection's errors (see
/// `primary::link::Connector::connect`). A plan whose deletions the mass-delete guard refuses is
/// carried out but for them, and returned: its summary's `refused` says why.
pub fn sync(
    src: &Path,
    target: &Target,
    opts: &SyncOptions,
    monitor: &dyn Monitor,
) -> Result<Outcome> {
    let root = Arc::new(tree::operand::open_source(src)?);
    // Its epoch is what the standby admits it by.
    let tree = primary::PrimaryTree::open(src, primary::Hold::Once, opts.force)?;
    let opts = &SyncOptions {
        epoch: tree.epoch(),
        ..opts.clone()
    };
    if let Target::Local(dest) = target {
        tree::operand::prepare_local_dest(src, dest, !opts.dry_run)?;
    }
    let access = if opts.dry_run {
        standby::Access::ReadOnly
    } else {
        standby::Access::Write
    };
    let link = primary::link::Connector::new(target.clone(), access)?.connect()?;
    let done = primary::sender::sync(root, link, opts, monitor);
    if let Err(Error::Fenced(why)) = &done {
        tree.fence(why);
    }
    done
}

/// Hashes both trees and compares them: the proof that the standby equals `src`.
///
/// # Errors
/// As [`sync`]: the report itself carries every difference.
/// `xattrs`: the extended attributes and ACLs compared (those `sync` mirrors).
pub fn verify(
    src: &Path,
    target: &Target,
    excludes: &[String],
    xattrs: model::xattrs::Policy,
) -> Result<model::compare::Report> {
    let root = Arc::new(tree::operand::open_source(src)?);
    if let Target::Local(dest) = target {
        tree::operand::prepare_local_dest(src, dest, false)?;
    }
    let link =
        primary::link::Connector::new(target.clone(), standby::Access::ReadOnly)?.connect()?;
    primary::verify::verify(root, link, excludes, 0, xattrs)
}
