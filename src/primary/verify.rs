//! `verify`: both sides hash their trees over a read-only session, the walks are compared
//! one directory at a time ([`crate::model::compare`]), and what differs is listed again to
//! tell a lasting difference from a change in flight.

use crate::error::Error;
use crate::model::compare::{Comparer, Report, compare, persisting};
use crate::model::manifest::Scope;
use crate::model::path::RelPath;
use crate::model::progress::Silent;
use crate::primary::link::Link;
use crate::primary::sender::{Session, SyncOptions};
use crate::tree::fsroot::Root;
use std::sync::Arc;
use std::time::Instant;

/// Verifies the standby at the other end of `conn` against `root`. `hash_rate` bounds the
/// bytes per second each side reads to hash (0: as fast as it can).
pub(crate) fn verify(
    root: Arc<Root>,
    link: Link,
    excludes: &[String],
    hash_rate: u64,
    xattrs: crate::model::xattrs::Policy,
) -> Result<Report, Error> {
    let started = Instant::now();
    let opts = SyncOptions {
        dry_run: true, // a read-only session: verify never takes the standby's lock
        checksum: true,
        excludes: excludes.to_vec(),
        hash_rate,
        xattrs,
        ..SyncOptions::default()
    };
    let mut session = Session::open(root, link, &opts, &Silent)?;
    let mut report = if session.caps.walk {
        let mut c = Comparer::new(session.owners);
        session.walk_both(true, |l, r| {
            c.step(l, r);
            Ok(())
        })?;
        c.finish()
    } else {
        let (local, remote) = session.list(&[(RelPath::root(), Scope::Tree)], true)?;
        compare(&local, &remote, session.owners)
    };
    if !report.identical {
        let again: Vec<(RelPath, Scope)> = report
            .differing()
            .into_iter()
            .map(|p| (p, Scope::Entry))
            .collect();
        if !again.is_empty() {
            let (l2, r2) = session.list(&again, true)?;
            report = persisting(report, &compare(&l2, &r2, session.owners));
        }
    }
    session.close()?;
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}
