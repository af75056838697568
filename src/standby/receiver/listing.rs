//! What the primary reads of the standby's tree: a listing of some paths (`List`, on the
//! control stream) or a walk of the tree or part of it (`Walk`, `WalkScopes`, on a stream
//! of its own), sent in messages well under the frame limit.

use super::session::StandbySession;
use crate::error::ProtocolError;
use crate::model::manifest::{Entry, ScanError, Scope};
use crate::model::path::RelPath;
use crate::transport::SendHalf;
use crate::tree::scan::{ScanOptions, scan_scopes};
use crate::wire::protocol::{self, Caps, FrameWriter, Message};
use std::io::{self, Write};

/// Entries a walk hashes together, so small directories still keep every core busy.
const WALK_HASH_BATCH: usize = 4096;

/// Bytes of entries (roughly) in one `Entries` or `Dir` message, well under the frame limit.
const LIST_BATCH_BYTES: usize = 256 * 1024;

/// The encoded size of an entry, roughly, to keep messages under the frame limit.
fn entry_size(e: &Entry) -> usize {
    e.path.as_bytes().len()
        + 48
        + match &e.kind {
            crate::model::manifest::Kind::Symlink { target } => target.len(),
            _ => 0,
        }
}

/// Sends one directory of a walk, in parts if it is large. From version 6 each part is
/// preceded by the shapes of its entries and the directory's special files.
fn send_unit<W: Write>(
    w: &mut FrameWriter<W>,
    u: crate::model::listing::Unit,
    caps: Caps,
) -> Result<(), ProtocolError> {
    let mut parts: Vec<Vec<Entry>> = vec![Vec::new()];
    let mut size = 0;
    for e in u.entries {
        size += entry_size(&e);
        parts.last_mut().unwrap().push(e);
        if size >= LIST_BATCH_BYTES {
            parts.push(Vec::new());
            size = 0;
        }
    }
    let mut errors: Vec<Vec<ScanError>> = u.errors.chunks(512).map(<[_]>::to_vec).collect();
    let mut specials: Vec<Vec<crate::model::manifest::Special>> = if caps.shapes {
        u.specials.chunks(512).map(<[_]>::to_vec).collect()
    } else {
        Vec::new()
    };
    let n = parts.len().max(errors.len()).max(specials.len());
    parts.resize_with(n, Vec::new);
    errors.resize_with(n, Vec::new);
    specials.resize_with(n, Vec::new);
    let parts = parts.into_iter().zip(errors).zip(specials);
    for (i, ((entries, errors), specials)) in parts.enumerate() {
        if let Some(m) = protocol::xattr_sums(std::iter::once(&u.dir).chain(&entries)) {
            w.send(&m)?;
        }
        if caps.shapes {
            if let Some(m) = protocol::shapes(std::iter::once(&u.dir).chain(&entries)) {
                w.send(&m)?;
            }
            if !specials.is_empty() {
                w.send(&Message::Specials { specials })?;
            }
        }
        w.send(&Message::Dir {
            dir: u.dir.clone(),
            entries,
            errors,
            more: i + 1 < n,
        })?;
    }
    Ok(())
}

/// One `Entries` message, after the digests of its attributes (and from version 6 the
/// shapes of its entries).
fn send_entries<W: Write>(
    w: &mut FrameWriter<W>,
    entries: Vec<Entry>,
    caps: Caps,
) -> Result<(), ProtocolError> {
    if let Some(m) = protocol::xattr_sums(entries.iter()) {
        w.send(&m)?;
    }
    if caps.shapes
        && let Some(m) = protocol::shapes(entries.iter())
    {
        w.send(&m)?;
    }
    w.send(&Message::Entries {
        entries,
        errors: vec![],
    })
}

/// Sends a listing: its entries, errors and (from version 6) special files, then
/// `ListEnd`.
fn send_manifest<W: Write>(
    w: &mut FrameWriter<W>,
    m: crate::model::manifest::Manifest,
    temps_removed: u64,
    caps: Caps,
) -> Result<(), ProtocolError> {
    let count = m.entries.len() as u64;
    let mut batch = Vec::new();
    let mut size = 0;
    for e in m.entries {
        size += entry_size(&e);
        batch.push(e);
        if size >= LIST_BATCH_BYTES {
            send_entries(w, std::mem::take(&mut batch), caps)?;
            size = 0;
        }
    }
    send_entries(w, batch, caps)?;
    for chunk in m.errors.chunks(512) {
        w.send(&Message::Entries {
            entries: vec![],
            errors: chunk.to_vec(),
        })?;
    }
    if caps.shapes {
        for chunk in m.specials.chunks(512) {
            w.send(&Message::Specials {
                specials: chunk.to_vec(),
            })?;
        }
    }
    w.send(&Message::ListEnd {
        count,
        temps_removed,
    })
}

impl StandbySession<'_> {
    /// Lists `scopes` for the primary: entries, then `ListEnd`.
    pub(super) fn list<W: Write>(
        &self,
        w: &mut FrameWriter<W>,
        scopes: &[(RelPath, Scope)],
        checksum: bool,
        hash_rate: u64,
    ) -> Result<(), ProtocolError> {
        let listing = match self.standby.root().ok() {
            Some(root) => scan_scopes(
                root,
                scopes,
                &self.scan_options(checksum, hash_rate),
                &|_| {},
            )
            .map_err(|e| ProtocolError::Invalid(format!("cannot scan the standby tree: {e}")))?,
            None => Default::default(),
        };
        send_manifest(w, listing.manifest, listing.temps_removed, self.caps)?;
        w.flush()
    }

    /// Walks what `scopes` cover for the primary: `Dir`s in walk order, then `WalkEnd`.
    pub(super) fn walk<W: SendHalf>(
        &self,
        w: &mut FrameWriter<W>,
        scopes: crate::tree::walk::Scopes,
        checksum: bool,
        hash_rate: u64,
    ) -> Result<(), ProtocolError> {
        let (mut count, mut temps_removed) = (0, 0);
        if let Ok(root) = self.standby.root() {
            let opts = self.scan_options(checksum, hash_rate);
            let mut walker = crate::tree::walk::Walker::scoped(root, opts, scopes, None);
            let batch = if checksum { WALK_HASH_BATCH } else { 1 };
            let cannot =
                |e: io::Error| ProtocolError::Invalid(format!("cannot scan the standby tree: {e}"));
            while let Some(units) = walker.next_batch(batch).map_err(cannot)? {
                for u in units {
                    count += 1 + u.entries.len() as u64;
                    send_unit(w, u, self.caps)?;
                }
            }
            temps_removed = walker.temps_removed;
        }
        w.send(&Message::WalkEnd {
            count,
            temps_removed,
        })?;
        w.flush()?;
        Ok(w.get_mut().finish()?)
    }

    /// How this session's listings and walks read the standby's tree.
    fn scan_options(&self, checksum: bool, hash_rate: u64) -> ScanOptions {
        ScanOptions {
            checksum,
            hash_rate,
            filter: self.filter.clone(),
            remove_temps: !self.read_only,
            primary: false,
            xattrs: self.xattrs,
            // A primary before version 6 sees each symlink alone, as it always did.
            split_symlinks: !self.caps.shapes,
        }
    }
}
