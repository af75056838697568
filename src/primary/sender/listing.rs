//! Listing both sides at once over the control stream: the primary scans its tree while
//! the standby's manifest arrives, checked as it comes.

use super::ends::peer_error;
use crate::error::Error;
use crate::error::ProtocolError;
use crate::model::manifest::{Manifest, Scope, Special, normalize_scopes};
use crate::model::path::RelPath;
use crate::model::progress::Monitor;
use crate::tree::fsroot::Root;
use crate::tree::scan::{ScanOptions, ScanOutcome, scan_scopes};
use crate::wire::channel::{Channel, Reader};
use crate::wire::protocol::Message;

/// Lists `scopes` on both sides at once, over the control stream: the primary's scan, the
/// standby's manifest, and the leftover temporary files its listing removed.
///
/// # Errors
/// A failure to read SRC, or of the connection.
pub(super) fn list_both(
    ch: &mut Channel,
    root: &Root,
    scopes: &[(RelPath, Scope)],
    scan_opts: &ScanOptions,
    monitor: &dyn Monitor,
) -> Result<(ScanOutcome, Manifest, u64), Error> {
    ch.send(&Message::List {
        scopes: scopes.to_vec(),
        checksum: scan_opts.checksum,
        hash_rate: scan_opts.hash_rate,
    })?;
    ch.flush()?;
    let r = &mut ch.r;
    let (local, remote) = std::thread::scope(|s| {
        let local = s.spawn(|| scan_scopes(root, scopes, scan_opts, &|n| monitor.scanned(n)));
        let remote = receive_listing(r);
        (local.join().expect("scan thread panicked"), remote)
    });
    let local =
        local.map_err(|e| Error::io(format!("cannot read SRC {}", root.path().display()), e))?;
    let (remote, temps_removed) = remote.map_err(peer_error)?;
    Ok((local, remote, temps_removed))
}

/// `scopes` with their parent directories (as single entries), normalized: a new path may
/// need its directory made, and a change inside a directory changes its mtime.
pub(super) fn with_parents(scopes: &[(RelPath, Scope)]) -> Vec<(RelPath, Scope)> {
    let mut wanted: Vec<(RelPath, Scope)> = scopes.to_vec();
    for (p, _) in scopes {
        let mut q = p.clone();
        while !q.is_root() {
            q = q.split().0;
            wanted.push((q.clone(), Scope::Entry));
        }
    }
    normalize_scopes(&wanted)
}

/// Reads one listing: the standby's entries (and special files), and the temps it cleaned
/// up meanwhile.
fn receive_listing(r: &mut Reader) -> Result<(Manifest, u64), ProtocolError> {
    let mut m = Manifest::default();
    let mut sums = None;
    let mut shapes = None;
    loop {
        match r.recv()? {
            Message::XattrSums { sums: s } if sums.is_none() => sums = Some(s),
            Message::Shapes { shapes: s } if shapes.is_none() => shapes = Some(s),
            Message::Specials { specials } => {
                for s in &specials {
                    check_special(s, None)?;
                }
                m.specials.extend(specials);
            }
            Message::Entries {
                mut entries,
                errors,
            } => {
                if let Some(s) = sums.take() {
                    crate::wire::protocol::put_xattr_sums(s, entries.iter_mut())?;
                }
                if let Some(s) = shapes.take() {
                    crate::wire::protocol::put_shapes(s, entries.iter_mut())?;
                }
                m.entries.extend(entries);
                m.errors.extend(errors);
            }
            Message::ListEnd {
                count,
                temps_removed,
            } => {
                if count != m.entries.len() as u64 {
                    return Err(ProtocolError::Invalid("manifest count mismatch".into()));
                }
                m.sort();
                return Ok((m, temps_removed));
            }
            other => {
                return Err(ProtocolError::unexpected(&other, "Entries"));
            }
        }
    }
}

/// Checks a special file a standby reported: never the root nor in the reserved area,
/// and, in a walk, a child of the directory `parent`.
pub(super) fn check_special(s: &Special, parent: Option<&RelPath>) -> Result<(), ProtocolError> {
    if s.path.is_root() || s.path.is_reserved() || parent.is_some_and(|d| s.path.split().0 != *d) {
        return Err(ProtocolError::Invalid(format!(
            "the standby reports a special file at {}",
            s.path
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_brings_its_parent_directories() {
        let p = |s: &str| RelPath::new(s).unwrap();
        let got = with_parents(&[(p("a/b/c"), Scope::Tree), (p("a/x"), Scope::Entry)]);
        for want in [
            (RelPath::root(), Scope::Entry),
            (p("a"), Scope::Entry),
            (p("a/b"), Scope::Entry),
            (p("a/b/c"), Scope::Tree),
            (p("a/x"), Scope::Entry),
        ] {
            assert!(got.contains(&want), "{want:?} missing from {got:?}");
        }
    }
}
