//! hotsync keeps a standby copy of a directory tree identical to the primary's.
//!
//! One engine serves every mode: [`scan`] both trees, [`plan::plan`] the difference (pure),
//! then a [`sender`] drives the plan through the [`protocol`] to a [`receiver`], which
//! writes each file atomically and durably ([`atomic`]). A local DEST runs the receiver
//! in-process over [`transport::local`], the same bytes QUIC carries for a remote one; a
//! [`link`] is either.

pub mod alert;
pub mod atomic;
pub mod bytes;
pub mod channel;
pub mod check;
pub mod clock;
pub mod compare;
pub mod config;
pub mod control;
pub mod delta;
pub mod epoch;
pub mod error;
pub mod filter;
pub mod flush;
pub mod fsroot;
pub mod guard;
pub mod health;
pub mod heartbeat;
pub mod holes;
pub mod identity;
pub mod link;
pub mod listing;
pub mod liveness;
pub mod manifest;
pub mod merge;
pub mod metrics;
pub mod mounts;
pub mod names;
pub mod path;
pub mod plan;
pub mod primary;
pub mod progress;
pub mod protocol;
pub mod receiver;
pub mod rejoin;
pub mod replicate;
pub mod reserved;
pub mod scan;
pub mod sender;
pub mod server;
pub mod snapshot;
pub mod sparse;
pub mod spill;
pub mod standby;
pub mod status;
pub mod summary;
pub mod transport;
pub mod verify;
pub mod walk;
pub mod xattr;

pub use error::{Error, Result};
pub use link::Target;
pub use progress::Monitor;
pub use sender::{Outcome, SyncOptions};

use std::path::Path;
use std::sync::Arc;

/// Mirrors `src` to the standby `target` once, like `rsync -a --delete`.
///
/// # Errors
/// [`Error::Usage`] for a bad SRC or DEST, [`Error::Refused`] for an empty SRC facing a
/// standby that is not (nothing is touched), and the connection's errors (see
/// [`link::Connector::connect`]). A plan whose deletions the mass-delete guard refuses is
/// carried out but for them, and returned: its summary's `refused` says why.
pub fn sync(
    src: &Path,
    target: &Target,
    opts: &SyncOptions,
    monitor: &dyn Monitor,
) -> Result<Outcome> {
    let root = Arc::new(check::open_source(src)?);
    // Its epoch is what the standby admits it by.
    let tree = primary::PrimaryTree::open(src, primary::Hold::Once, opts.force)?;
    let opts = &SyncOptions {
        epoch: tree.epoch(),
        ..opts.clone()
    };
    if let Target::Local(dest) = target {
        check::prepare_local_dest(src, dest, !opts.dry_run)?;
    }
    let access = if opts.dry_run {
        standby::Access::ReadOnly
    } else {
        standby::Access::Write
    };
    let link = link::Connector::new(target.clone(), access)?.connect()?;
    let done = sender::sync(root, link, opts, monitor);
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
    xattrs: xattr::Policy,
) -> Result<compare::Report> {
    let root = Arc::new(check::open_source(src)?);
    if let Target::Local(dest) = target {
        check::prepare_local_dest(src, dest, false)?;
    }
    let link = link::Connector::new(target.clone(), standby::Access::ReadOnly)?.connect()?;
    verify::verify(root, link, excludes, 0, xattrs)
}
