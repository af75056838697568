//! Files and symlinks with several names, in a partial reconcile: a change to one name is
//! a change to all, so the reconcile is widened to every name of each inode it meets.

use super::listing::{list_both, with_parents};
use crate::error::Error;
use crate::model::manifest::{Entry, LinkKey, Manifest, Scope};
use crate::model::names::LinkIndex;
use crate::model::path::RelPath;
use crate::model::progress::Monitor;
use crate::tree::fsroot::Root;
use crate::tree::scan::{ScanOptions, scan_scopes};
use crate::tree::walk::Scopes;
use crate::wire::channel::Channel;
use std::collections::{HashMap, HashSet};
use std::time::Instant;

/// Where to look for the other names of inodes with several names.
pub(super) struct LinkSearch<'a> {
    /// The names known so far, kept up to date.
    pub index: &'a mut LinkIndex,
    /// The control stream, to list the names found on both sides.
    pub ch: &'a mut Channel,
    pub root: &'a Root,
    pub scan_opts: &'a ScanOptions,
    /// What the reconcile covers already.
    pub listed: &'a Scopes,
    pub monitor: &'a dyn Monitor,
}

/// Widens a partial reconcile to every name of the primary's files and symlinks with
/// several names it met (`linked`): the names the index knows (still names of the inode),
/// and, when the link count says some are still unknown, those a search of the tree finds.
/// Returns both sides' listings of those names (with their parent directories), to plan
/// with the rest; `None` when there are none.
///
/// # Errors
/// A failure to read SRC's root, or of the connection.
pub(super) fn complete_links(
    s: LinkSearch<'_>,
    linked: &[Entry],
) -> Result<Option<(Manifest, Manifest)>, Error> {
    if linked.is_empty() {
        return Ok(None);
    }
    let keys: HashSet<LinkKey> = linked.iter().filter_map(|e| e.link).collect();
    let mine: Vec<&Entry> = linked.iter().collect();
    let known = s.index.others(&mine);
    let known = known.into_iter().filter(|p| !s.listed.holds(p)).collect();
    let mut extra = names_of(&s, &keys, known)?;
    let seen: Vec<&Entry> = linked.iter().chain(&extra).collect();
    let short = s.index.short(&seen);
    let mut found = HashMap::new();
    if !short.is_empty() {
        let started = Instant::now();
        found = crate::tree::walk::find_names(s.root, &s.scan_opts.filter, &short)
            .map_err(|e| cannot_read(s.root, e))?;
        let have: HashSet<&RelPath> = seen.iter().map(|e| &e.path).collect();
        let new: Vec<RelPath> = found
            .values()
            .flatten()
            .filter(|p| !have.contains(p) && !s.listed.holds(p))
            .cloned()
            .collect();
        tracing::debug!(
            "searched the tree for the names of {} inode(s) with several names: {} more, {} ms",
            short.len(),
            new.len(),
            started.elapsed().as_millis()
        );
        extra.extend(names_of(&s, &keys, new)?);
    }
    s.index.record(linked.iter().chain(&extra), &found);
    if extra.is_empty() {
        return Ok(None);
    }
    list_names(s, &keys, &extra).map(Some)
}

/// Looks at `paths` on the primary: those still names of one of the inodes `keys`.
fn names_of(
    s: &LinkSearch<'_>,
    keys: &HashSet<LinkKey>,
    paths: Vec<RelPath>,
) -> Result<Vec<Entry>, Error> {
    if paths.is_empty() {
        return Ok(Vec::new());
    }
    let scopes: Vec<(RelPath, Scope)> = paths.into_iter().map(|p| (p, Scope::Entry)).collect();
    let opts = ScanOptions {
        checksum: false,
        ..s.scan_opts.clone()
    };
    let found = scan_scopes(s.root, &scopes, &opts, &|_| {}).map_err(|e| cannot_read(s.root, e))?;
    Ok(found
        .manifest
        .entries
        .into_iter()
        .filter(|e| e.link.is_some_and(|k| keys.contains(&k)))
        .collect())
}

/// Both sides' listings of the names `extra` of the inodes `keys`: only the names still of
/// the inode, and the directories leading to them.
fn list_names(
    s: LinkSearch<'_>,
    keys: &HashSet<LinkKey>,
    extra: &[Entry],
) -> Result<(Manifest, Manifest), Error> {
    let scopes: Vec<(RelPath, Scope)> = extra
        .iter()
        .map(|e| (e.path.clone(), Scope::Entry))
        .collect();
    let scopes = with_parents(&scopes);
    let (local, mut remote, _) = list_both(s.ch, s.root, &scopes, s.scan_opts, s.monitor)?;
    let mut local = local.manifest;
    let wanted: HashSet<&RelPath> = extra.iter().map(|e| &e.path).collect();
    local.entries.retain(|e| {
        e.is_dir() || (wanted.contains(&e.path) && e.link.is_some_and(|k| keys.contains(&k)))
    });
    local.specials.clear();
    let kept: HashSet<RelPath> = local.entries.iter().map(|e| e.path.clone()).collect();
    remote.entries.retain(|e| kept.contains(&e.path));
    remote.specials.retain(|s| kept.contains(&s.path));
    Ok((local, remote))
}

fn cannot_read(root: &Root, e: std::io::Error) -> Error {
    Error::io(format!("cannot read SRC {}", root.path().display()), e)
}
