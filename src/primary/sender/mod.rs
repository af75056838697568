//! The primary side of a session: scan, fetch the standby's manifest, plan, then drive the
//! plan through the protocol: tree operations on the control stream, small files on a few
//! lanes, each large file on a stream of its own, with nothing waiting on a round trip
//! per file.
//!
//! - `session`: opening a session (the handshake) and its API;
//! - `listed` and `streamed`: the two reconciles, by listing both sides or by walking
//!   them together (`walk_both`, `windows`); `listing` and `hard_links` serve them,
//!   and `mass_delete` guards both;
//! - `exec`: carrying a plan out, on `tree_ops` (the control stream), `lanes` of
//!   `small` entries and attribute fixes (`attrs`), and a stream per large file, sent
//!   `whole` (with `extents` for holes) or as `deltas`;
//! - `acks`: the book of operations awaiting acknowledgement, and what each settles;
//! - `read`: reading files that may change while read.

use crate::error::Error;
use crate::model::guard::MassDelete;
use crate::model::path::RelPath;
use crate::model::plan::Plan;
use crate::model::progress::Monitor;
use crate::model::summary::Summary;
use crate::primary::link::Link;
use crate::tree::fsroot::Root;
use std::sync::Arc;
use std::time::Instant;

mod acks;
mod attrs;
mod deltas;
mod ends;
mod exec;
mod extents;
mod hard_links;
mod index;
mod lanes;
mod listed;
mod listing;
mod mass_delete;
mod read;
mod report;
mod session;
mod small;
mod streamed;
mod tree_ops;
mod walk_both;
mod whole;
mod windows;

#[cfg(test)]
mod tests;

pub(crate) use session::Session;

/// What a `sync` may do.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Compare files by content digest, not by size and modification time.
    pub checksum: bool,
    /// Remove from the standby what the primary does not have.
    pub delete: bool,
    /// Override the mass-delete guards.
    pub force: bool,
    /// Plan and report only: the standby is opened read-only and nothing is written.
    pub dry_run: bool,
    /// `--exclude` patterns ([`crate::model::filter`]): matching entries are neither sent nor
    /// removed on the standby.
    pub excludes: Vec<String>,
    /// Refuse a plan that removes more than this percentage of the standby's entries.
    pub max_delete_percent: u32,
    /// Streams for small files.
    pub lanes: usize,
    /// Large files in flight at once.
    pub big_streams: usize,
    /// What a plan that trips the mass-delete guard does.
    pub on_mass_delete: MassDelete,
    /// Bytes per second hashing may read on each side, 0 for no limit (background verify).
    pub hash_rate: u64,
    /// The epoch this primary writes in (its tree's, see [`crate::primary`]).
    pub epoch: u64,
    /// The extended attributes and ACLs to mirror (what the standby can store of them).
    pub xattrs: crate::model::xattrs::Policy,
    /// Run by a watch: a change while a file is read comes again as a hint.
    pub watching: bool,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            checksum: false,
            delete: true,
            force: false,
            dry_run: false,
            excludes: Vec::new(),
            max_delete_percent: 50,
            lanes: 2,
            big_streams: 2,
            on_mass_delete: MassDelete::Refuse,
            hash_rate: 0,
            epoch: 1,
            xattrs: crate::model::xattrs::Policy::wanted(false, false),
            watching: false,
        }
    }
}

/// The result of a sync: its summary, and the plan it carried out (or would, in a dry run).
#[derive(Debug)]
pub struct Outcome {
    /// What was done (or would be), as `--json` prints it.
    pub summary: Summary,
    /// The plan carried out, or that a dry run would carry out. A streamed reconcile plans
    /// as it goes: it keeps here only the parts a dry run's monitor did not show, and the
    /// counts of what it removed.
    pub plan: Plan,
}

/// Mirrors the tree at `src` to the standby at the other end of `link`, then closes the
/// session.
///
/// # Errors
/// [`Error::Refused`] for an empty source facing a standby that is not (the session is
/// still closed cleanly), or why the session failed. Errors with single entries are in the
/// summary.
pub(crate) fn sync(
    src: Arc<Root>,
    link: Link,
    opts: &SyncOptions,
    monitor: &dyn Monitor,
) -> Result<Outcome, Error> {
    let started = Instant::now();
    let mut session = Session::open(src, link, opts, monitor)?;
    let mut outcome = match session.sync_all() {
        Ok(o) => o,
        Err(e) => {
            if matches!(e, Error::SourceEmpty(_)) {
                let _ = session.close();
            }
            return Err(e);
        }
    };
    outcome.summary.bytes_on_wire = session.close()?;
    outcome.summary.elapsed_ms = started.elapsed().as_millis() as u64;
    monitor.finished();
    Ok(outcome)
}

/// Changes seen while a long reconcile runs (a watch's), offered to it so they reach the
/// standby before it ends. Each is examined again by the batch after the reconcile: an
/// early copy is only a head start.
pub(crate) trait Early: Send + Sync {
    /// Paths changed and ready now, of those `accept` takes, each offered once per change.
    fn take(&self, accept: &dyn Fn(&RelPath) -> bool) -> Vec<RelPath>;
}
