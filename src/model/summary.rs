//! The result of a sync, as printed by `--json` (field names are part of the contract).

use crate::model::path::RelPath;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EntryError {
    /// The relative path, printable (non-UTF-8 bytes and control characters escaped).
    pub path: String,
    pub error: String,
    /// The path itself, to try it again.
    #[serde(skip)]
    pub rel: RelPath,
    /// The standby had no room for it (ENOSPC, EDQUOT): it waits for space, lost nothing.
    #[serde(skip)]
    pub no_space: bool,
}

impl EntryError {
    pub(crate) fn new(path: &RelPath, error: impl Into<String>) -> Self {
        EntryError {
            path: path.display(),
            error: error.into(),
            rel: path.clone(),
            no_space: false,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Entries (files, directories, symlinks) found on the primary, root excluded.
    pub files_scanned: u64,
    /// Regular files whose content was sent.
    pub files_transferred: u64,
    /// Standby entries removed (extras and entries in the way of a type change).
    pub files_deleted: u64,
    /// Total size of the primary's regular files.
    pub bytes_total: u64,
    /// File bytes sent as data.
    pub bytes_literal: u64,
    /// File bytes rebuilt from the standby's existing data.
    pub bytes_matched: u64,
    /// Encoded protocol bytes, both directions.
    pub bytes_on_wire: u64,
    pub errors: Vec<EntryError>,
    pub elapsed_ms: u64,
    pub dirs_created: u64,
    pub symlinks_written: u64,
    pub hard_links_made: u64,
    /// Renames on the primary carried out as renames on the standby (watch mode).
    pub renamed: u64,
    pub metadata_updated: u64,
    /// Leftover temporary files of an interrupted run, removed from the standby.
    pub temps_removed: u64,
    /// Entries the standby could not store because its disk is full (each also in
    /// `errors`).
    pub no_space: u64,
    /// Files that vanished or changed type between the scan (or event) and the read: routine
    /// races on a live tree, counted rather than reported one by one.
    pub vanished: u64,
    /// Entries skipped on the primary (sockets, fifos, devices).
    pub skipped: Vec<EntryError>,
    /// Standby entries the primary lacks that were left in place because the mass-delete
    /// guard refused their deletion (`refused` says why).
    pub deletions_refused: u64,
    /// Why the mass-delete guard refused the deletions, when it did: everything else was
    /// carried out, and the command exits 2.
    pub refused: Option<String>,
    pub dry_run: bool,
    /// Large files sent as deltas, with what reading and hashing each cost: a watch paces
    /// the next read of a file that keeps changing by it.
    #[serde(skip)]
    pub hashed: Vec<(crate::model::path::RelPath, std::time::Duration)>,
    /// Large files a watch sent as they were while written (changed while read, no read
    /// steady): on the standby, but the batch is no consistent point and the file goes
    /// again with its next change.
    #[serde(skip)]
    pub torn: u64,
}

impl Summary {
    /// Adds what another part of the same reconcile did.
    pub(crate) fn absorb(&mut self, o: Summary) {
        self.files_transferred += o.files_transferred;
        self.files_deleted += o.files_deleted;
        self.bytes_literal += o.bytes_literal;
        self.bytes_matched += o.bytes_matched;
        self.dirs_created += o.dirs_created;
        self.symlinks_written += o.symlinks_written;
        self.hard_links_made += o.hard_links_made;
        self.metadata_updated += o.metadata_updated;
        self.no_space += o.no_space;
        self.vanished += o.vanished;
        self.torn += o.torn;
        self.errors.extend(o.errors);
        self.skipped.extend(o.skipped);
    }

    /// Whether the run changed anything on the standby or met an error.
    pub fn did_something(&self) -> bool {
        self.files_transferred
            + self.files_deleted
            + self.renamed
            + self.metadata_updated
            + self.dirs_created
            + self.symlinks_written
            + self.hard_links_made
            > 0
            || !self.errors.is_empty()
    }

    /// Exit status by the contract: 0 all done, 1 some entries failed, 2 a guard refused
    /// the deletions.
    pub fn exit_code(&self) -> i32 {
        if self.refused.is_some() {
            2
        } else if self.errors.is_empty() {
            0
        } else {
            1
        }
    }
}
