//! What every stream of a session shares: the standby, what was agreed when the session
//! opened, and what every operation needs (attributes to set, cached directory handles,
//! where temps are made, how a failure with one entry is told to the primary).

use crate::error::OpError;
use crate::model::filter::Filter;
use crate::model::manifest::Meta;
use crate::model::path::RelPath;
use crate::model::xattrs::Xattrs;
use crate::standby::{SessionEntry, Standby};
use crate::tree::fsroot::{self, Root, set_meta_at, set_meta_fd};
use crate::wire::protocol::Caps;
use rustix::io::Errno;
use std::collections::HashMap;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The state shared by all streams of one session.
pub(super) struct StandbySession<'s> {
    /// The standby served.
    pub(super) standby: &'s Standby,
    /// A dry run or a verify: list, never write.
    pub(super) read_only: bool,
    /// What the session leaves alone (the primary's excludes).
    pub(super) filter: Filter,
    /// The extended attributes and ACLs this session mirrors.
    pub(super) xattrs: crate::model::xattrs::Policy,
    /// The protocol version the session speaks: what a listing may carry.
    /// What the session agreed it can do.
    pub(super) caps: Caps,
    /// Bumped whenever directories may have been removed, so cached handles are dropped.
    pub(super) generation: AtomicU64,
    /// This session in the standby's registry (its counters are read live by `status`).
    pub(super) entry: Arc<SessionEntry>,
    /// Where a writing session stages its temps.
    pub(super) temps: Option<crate::tree::atomic::TempPlace>,
}

/// What an entry gets besides its content: its attributes and its extended attributes.
pub(super) struct Attrs {
    pub(super) meta: Meta,
    /// Empty unless the stream sent `Xattrs` before the operation.
    pub(super) x: Xattrs,
}

impl Attrs {
    /// `meta` and the extended attributes the stream sent just before (none if it did not).
    pub(super) fn new(meta: Meta, sent: &mut Option<Xattrs>) -> Attrs {
        Attrs {
            meta,
            x: sent.take().unwrap_or_default(),
        }
    }
}

impl StandbySession<'_> {
    /// The tree root; only a dry run against a missing DEST has none.
    pub(super) fn root(&self) -> io::Result<&Root> {
        self.standby.root()
    }

    /// Whether owner and group are set (the standby runs as root).
    pub(super) fn owners(&self) -> bool {
        self.standby.owners()
    }

    /// The extended attributes to set, unless this session leaves them alone.
    pub(super) fn xattrs_to<'a>(&'a self, x: &'a Xattrs) -> Option<fsroot::XattrsTo<'a>> {
        (!self.xattrs.is_none()).then_some((x, &self.xattrs))
    }

    /// Sets `a` on the open file `fd`.
    pub(super) fn set_fd(&self, fd: BorrowedFd<'_>, a: &Attrs) -> io::Result<()> {
        set_meta_fd(fd, &a.meta, self.owners(), self.xattrs_to(&a.x))
    }

    /// Sets `a` on `name` in `dir`, never following it (`with_mode`: not a symlink).
    pub(super) fn set_at(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        a: &Attrs,
        with_mode: bool,
    ) -> io::Result<()> {
        set_meta_at(
            dir,
            name,
            &a.meta,
            self.owners(),
            with_mode,
            self.xattrs_to(&a.x),
        )
    }

    /// Counts a file of `bytes` received (the status shows it live).
    pub(super) fn wrote(&self, bytes: u64) {
        let st = &self.entry.stats;
        st.files_written.fetch_add(1, Ordering::Relaxed);
        st.bytes_written.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Directories may have moved or gone: every stream drops its cached handles.
    pub(super) fn tree_changed(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs `f` on the tree's open window of the undo log; `None` when no window is open
    /// (or the session only reads).
    pub(super) fn with_journal<T>(
        &self,
        f: impl FnOnce(&mut crate::tree::undo::Journal) -> T,
    ) -> Option<T> {
        if self.read_only {
            return None;
        }
        let slot = self.standby.journal();
        let mut j = slot.lock().unwrap();
        j.as_mut().map(f)
    }

    /// Where this writing session makes its temps.
    pub(super) fn temps(&self) -> io::Result<&crate::tree::atomic::TempPlace> {
        self.temps.as_ref().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                "this session does not write the standby",
            )
        })
    }

    /// Where a named temp (a symlink, a hard link) of an entry of `dir` is made: the
    /// standby's area, or (on another filesystem than the root) `dir` itself.
    pub(super) fn temp_dir(&self, dir: &Arc<OwnedFd>) -> io::Result<Arc<OwnedFd>> {
        self.temps()?.for_dir(dir)
    }
}

/// Cached handles of parent directories, dropped whenever directories may have moved.
pub(super) struct Dirs<'a> {
    s: &'a StandbySession<'a>,
    generation: u64,
    map: HashMap<Vec<u8>, Arc<OwnedFd>>,
}

impl<'a> Dirs<'a> {
    /// An empty cache for a stream of `s`.
    pub(super) fn new(s: &'a StandbySession<'a>) -> Self {
        Dirs {
            s,
            generation: s.generation.load(Ordering::Relaxed),
            map: HashMap::new(),
        }
    }

    /// The session the handles belong to.
    pub(super) fn session(&self) -> &'a StandbySession<'a> {
        self.s
    }

    /// The parent directory of `path` and the last name.
    pub(super) fn parent<'p>(&mut self, path: &'p RelPath) -> io::Result<(Arc<OwnedFd>, &'p [u8])> {
        if path.is_root() {
            return Ok((Arc::new(self.s.root()?.open_dir(path)?), b"."));
        }
        let g = self.s.generation.load(Ordering::Relaxed);
        if g != self.generation || self.map.len() > 256 {
            self.map.clear();
            self.generation = g;
        }
        let parent = path.parent_bytes();
        if let Some(fd) = self.map.get(parent) {
            return Ok((fd.clone(), path.name()));
        }
        let fd = Arc::new(
            self.s
                .root()?
                .open_dir(&RelPath::new(parent.to_vec()).unwrap())?,
        );
        self.map.insert(parent.to_vec(), fd.clone());
        Ok((fd, path.name()))
    }
}

/// An entry's failure as the primary is told it.
pub(super) fn op_error(e: &io::Error) -> OpError {
    OpError {
        message: reason(e),
        retry: false,
        no_space: crate::tree::atomic::is_no_space(e),
    }
}

/// A readable reason for an error with one entry.
pub(super) fn reason(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(c) if c == Errno::LOOP.raw_os_error() => {
            "the path goes through a symlink on the standby".into()
        }
        Some(c) if c == Errno::XDEV.raw_os_error() => "the path leaves the standby root".into(),
        // O_NOFOLLOW | O_DIRECTORY on a symlink says ENOTDIR.
        Some(c) if c == Errno::NOTDIR.raw_os_error() => {
            "a parent of the path on the standby is not a directory (a symlink there is never followed)"
                .into()
        }
        _ => e.to_string(),
    }
}
