//! Atomic, durable replacement of files on the standby, batched.
//!
//! Every file is received as a temp (written, attributes set), then a batch is committed:
//! make the temps' data durable, put each in place, make that durable, and only then
//! report success. A file's temp has no name at all ([`TempPlace`]): it is made unnamed
//! beside its target, linked at its name when that is new, or named in the standby's
//! area `.hotsync/tmp/` and renamed over the entry it replaces. Symlinks and hard links
//! are named in the area from the start. The area is where no user's name can collide
//! with a temp's; only a directory on another filesystem than the root (a mount point
//! inside the tree) gets its temps beside their targets.
//!
//! How the batch is made durable depends on the standby root's filesystem
//! ([`Durability`]). Where `syncfs` is known to write everything back (ext4, XFS, btrfs),
//! a small batch uses `fsync` per file and per directory (the fast path for a single
//! change) and a large one two `syncfs` calls instead of thousands of `fsync`s. Elsewhere
//! (FUSE, network filesystems, anything not known), `syncfs` may return 0 without reaching
//! the storage, so every staged file and every directory the batch changed is fsynced. A
//! `kill -9` at any moment leaves each target either old or new; leftover temps are
//! removed when the standby next opens the tree (and, beside their targets, by the next
//! scan).

use crate::error::OpError;
use crate::model::path::RelPath;
use crate::tree::undo::{self, Change, Journal};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

/// Up to this many files a batch is made durable file by file; beyond it, by `syncfs`.
pub(crate) const FSYNC_EACH: usize = 8;
/// A batch is committed once it holds this many files or bytes.
pub(crate) const BATCH_FILES: usize = 2048;
pub(crate) const BATCH_BYTES: u64 = 128 << 20;
/// ... or holds this many descriptors for the commit's `fsync`s (where `syncfs` is not
/// trusted every staged file keeps its own): several sessions' batches stay well within
/// even a 1,024 descriptor limit.
pub(crate) const BATCH_FDS: usize = 128;

/// Filesystems (`statfs` `f_type`) on which `syncfs` writes back everything they hold:
/// ext2/3/4, XFS, btrfs; and tmpfs, which has nothing to write back.
const SYNCFS_FLUSHES: [(u32, &str); 4] = [
    (0xEF53, "ext4"),
    (0x5846_5342, "xfs"),
    (0x9123_683E, "btrfs"),
    (0x0102_1994, "tmpfs"),
];

/// Others a log line may name.
const OTHER_FILESYSTEMS: [(u32, &str); 8] = [
    (0x6573_5546, "fuse"),
    (0x6969, "nfs"),
    (0xFF53_4D42, "cifs"),
    (0xFE53_4D42, "smb2"),
    (0x794C_7630, "overlayfs"),
    (0x2FC1_2FC1, "zfs"),
    (0xF2F5_2010, "f2fs"),
    (0x00C3_6400, "ceph"),
];

/// True when `syncfs` is known to write back everything on a filesystem of this `statfs`
/// type. Conservative: only the filesystems of [`SYNCFS_FLUSHES`]; FUSE and network
/// filesystems may answer `syncfs` without reaching their storage, and others are not
/// known to us.
pub(crate) fn trusts_syncfs(magic: u32) -> bool {
    SYNCFS_FLUSHES.iter().any(|&(m, _)| m == magic)
}

/// A filesystem's name for a log line, from its `statfs` type.
pub(crate) fn filesystem_name(magic: u32) -> String {
    SYNCFS_FLUSHES
        .iter()
        .chain(&OTHER_FILESYSTEMS)
        .find(|&&(m, _)| m == magic)
        .map_or_else(|| format!("type {magic:#x}"), |&(_, n)| n.to_string())
}

/// How batches are made durable on one standby root, decided once for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Durability {
    /// `syncfs` on the root is trusted to write back its filesystem.
    pub trusts_syncfs: bool,
    /// The root's filesystem (`st_dev`): a directory on another one (a mount inside the
    /// tree) is not covered by the root's `syncfs`, and is fsynced entry by entry.
    pub dev: u64,
}

impl Durability {
    /// The durability of the tree whose root is `root`, and its filesystem's name. A root
    /// whose filesystem cannot be told is not trusted.
    pub(crate) fn of(root: BorrowedFd<'_>) -> (Durability, String) {
        match (rustix::fs::fstatfs(root), rustix::fs::fstat(root)) {
            (Ok(fs), Ok(st)) => {
                let magic = fs.f_type as u32;
                (
                    Durability {
                        trusts_syncfs: trusts_syncfs(magic),
                        dev: st.st_dev,
                    },
                    filesystem_name(magic),
                )
            }
            (Err(e), _) | (_, Err(e)) => (Durability::default(), format!("unknown: {e}")),
        }
    }

    /// Whether the root's `syncfs` makes what is in directory `dir` durable.
    fn covers(&self, dir: &OwnedFd) -> bool {
        self.trusts_syncfs && rustix::fs::fstat(dir).is_ok_and(|st| st.st_dev == self.dev)
    }
}

/// The calls that make data durable; a test counts them.
trait Flusher {
    fn fsync(&self, fd: BorrowedFd<'_>) -> Result<(), Errno>;
    fn syncfs(&self, fd: BorrowedFd<'_>) -> Result<(), Errno>;
}

/// The kernel's.
struct Kernel;

impl Flusher for Kernel {
    fn fsync(&self, fd: BorrowedFd<'_>) -> Result<(), Errno> {
        rustix::fs::fsync(fd)
    }
    fn syncfs(&self, fd: BorrowedFd<'_>) -> Result<(), Errno> {
        rustix::fs::syncfs(fd)
    }
}

/// Where a staged entry is until its commit (see [`TempPlace`]).
pub(crate) enum Temp {
    /// Named `.1` in `.0`: the standby's area, or the target's directory itself.
    Named(Arc<OwnedFd>, Vec<u8>),
    /// No name yet: the file is held by its descriptor alone. `via` is where it is named
    /// for the instant before it is renamed over an entry it replaces (the area, or the
    /// target's directory where the area cannot reach it).
    Unnamed { via: Arc<OwnedFd> },
}

impl Temp {
    /// Removes a named temp (a failed or abandoned operation); an unnamed file goes with
    /// its last descriptor.
    pub(crate) fn discard(&self) {
        if let Temp::Named(at, temp) = self {
            let _ = rustix::fs::unlinkat(&**at, temp.as_slice(), AtFlags::empty());
        }
    }
}

/// A file (or symlink, or hard link) waiting to be put in place as `name` in `dir`.
pub(crate) struct Staged {
    pub id: u64,
    /// Where it goes in the tree (`dir` and `name` are its parent and last name).
    pub path: RelPath,
    pub dir: Arc<OwnedFd>,
    pub temp: Temp,
    pub name: Vec<u8>,
    /// Its descriptor: always for an unnamed file, else kept open for a per-file `fsync`
    /// (see [`CommitGroup::keep_fd`]) or `None`.
    pub file: Option<File>,
    pub bytes: u64,
}

/// What an operation applied in place (mkdir, delete, rename, attributes) changed: what
/// must be fsynced where the root's `syncfs` does not cover it.
#[derive(Default)]
pub(crate) struct Touched {
    /// Directories whose entries changed.
    pub dirs: Vec<Arc<OwnedFd>>,
    /// An entry whose own attributes changed (not a symlink's, which cannot be fsynced):
    /// its directory and name, reopened at the commit without following a symlink.
    pub entry: Option<(Arc<OwnedFd>, Vec<u8>)>,
}

impl Touched {
    /// An entry made, removed or renamed in `dir`.
    pub(crate) fn dir(dir: Arc<OwnedFd>) -> Touched {
        Touched {
            dirs: vec![dir],
            entry: None,
        }
    }

    /// An entry renamed from `from` into `to`.
    pub(crate) fn dirs(from: Arc<OwnedFd>, to: Arc<OwnedFd>) -> Touched {
        Touched {
            dirs: vec![from, to],
            entry: None,
        }
    }

    /// The attributes of the file or directory `name` in `dir`.
    pub(crate) fn entry(dir: Arc<OwnedFd>, name: &[u8]) -> Touched {
        Touched {
            dirs: Vec::new(),
            entry: Some((dir, name.to_vec())),
        }
    }

    fn fds(&self) -> usize {
        self.dirs.len() + usize::from(self.entry.is_some())
    }
}

/// An operation applied in place, awaiting the commit.
struct Applied {
    id: u64,
    /// Some of it is left to the root's `syncfs`.
    covered: bool,
    /// The rest, to fsync one by one.
    touched: Touched,
}

impl Applied {
    /// Drops what the root's `syncfs` covers (where it is trusted): it need not be
    /// fsynced by itself.
    fn cover(&mut self, d: &Durability) {
        if !d.trusts_syncfs || self.covered {
            return;
        }
        let before = self.touched.fds();
        self.touched.dirs.retain(|dir| !d.covers(dir));
        if self
            .touched
            .entry
            .as_ref()
            .is_some_and(|(dir, _)| d.covers(dir))
        {
            self.touched.entry = None;
        }
        self.covered = self.touched.fds() < before || before == 0;
    }
}

/// The outcome of one operation.
pub(crate) type CommitResult = (u64, Result<(), OpError>);

/// True for the errors of a full disk (blocks, inodes or quota).
pub(crate) fn is_no_space(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(c) if c == rustix::io::Errno::NOSPC.raw_os_error() || c == rustix::io::Errno::DQUOT.raw_os_error()
    )
}

/// A batch of staged files and applied operations, made durable together.
#[derive(Default)]
pub(crate) struct CommitGroup {
    durability: Durability,
    items: Vec<Staged>,
    /// Operations already applied in place (mkdir, delete, chmod…) that need a sync.
    applied: Vec<Applied>,
    failed: Vec<CommitResult>,
    bytes: u64,
    /// Descriptors held for the commit (kept files, directories of applied operations).
    fds: usize,
    /// The standby's undo log: while a window is open, every entry is put in place
    /// through it (DESIGN §10).
    journal: Option<undo::Slot>,
}

impl CommitGroup {
    /// An empty batch for a standby root of `durability`.
    pub(crate) fn new(durability: Durability) -> Self {
        CommitGroup {
            durability,
            items: Vec::new(),
            applied: Vec::new(),
            failed: Vec::new(),
            bytes: 0,
            fds: 0,
            journal: None,
        }
    }

    /// The same, putting entries in place through the undo log in `slot` whenever a
    /// window is open there.
    pub(crate) fn journaled(mut self, slot: undo::Slot) -> Self {
        self.journal = Some(slot);
        self
    }

    pub(crate) fn stage(&mut self, s: Staged) {
        self.bytes += s.bytes;
        // An unnamed file's descriptor is the file itself, not one kept for an `fsync`:
        // such files are made only where descriptors are plenty ([`TempPlace::create`]).
        self.fds += usize::from(s.file.is_some() && matches!(s.temp, Temp::Named(..)));
        self.items.push(s);
    }

    /// An operation applied in place; what it `touched` is kept for the commit unless the
    /// root's `syncfs` covers it and the batch has more than a few such operations (a
    /// large file patched in place is fsynced by itself, without writing back everything
    /// else the filesystem holds).
    pub(crate) fn applied(&mut self, id: u64, touched: Touched) {
        let mut a = Applied {
            id,
            covered: false,
            touched,
        };
        if self.applied.len() >= FSYNC_EACH {
            a.cover(&self.durability);
        }
        self.fds += a.touched.fds();
        self.applied.push(a);
    }

    pub(crate) fn failed(&mut self, id: u64, error: OpError) {
        self.failed.push((id, Err(error)));
    }

    /// Records an in-place operation's result: applied (awaiting the sync, with what it
    /// touched) or failed.
    pub(crate) fn record(&mut self, id: u64, result: Result<Touched, OpError>) {
        match result {
            Ok(t) => self.applied(id, t),
            Err(e) => self.failed(id, e),
        }
    }

    /// Whether the next staged file should keep its descriptor for a per-file `fsync`:
    /// always where `syncfs` is not trusted, else while the batch is small.
    pub(crate) fn keep_fd(&self) -> bool {
        !self.durability.trusts_syncfs || self.items.len() < FSYNC_EACH
    }

    pub(crate) fn should_commit(&self) -> bool {
        self.items.len() >= BATCH_FILES || self.bytes >= BATCH_BYTES || self.fds >= BATCH_FDS
    }

    /// Makes everything in the batch durable and visible; returns one outcome per operation.
    pub(crate) fn commit(&mut self, root: BorrowedFd<'_>) -> Vec<CommitResult> {
        self.commit_with(root, &Kernel)
    }

    fn commit_with(&mut self, root: BorrowedFd<'_>, k: &dyn Flusher) -> Vec<CommitResult> {
        let mut out = std::mem::take(&mut self.failed);
        let items = std::mem::take(&mut self.items);
        let applied = std::mem::take(&mut self.applied);
        self.bytes = 0;
        self.fds = 0;
        if items.is_empty() && applied.is_empty() {
            return out;
        }
        // `syncfs` for the whole batch: on a trusted root, for a batch too large for a
        // per-file `fsync` (or with operations applied in place, whose directories were
        // not kept where the root's `syncfs` covers them).
        let batched = self.durability.trusts_syncfs
            && (applied.len() > FSYNC_EACH
                || items.len() > FSYNC_EACH
                || items.iter().any(|i| i.file.is_none()));
        let mut applied = applied;
        if batched {
            for a in &mut applied {
                a.cover(&self.durability);
            }
        }
        let mut dirs = DirKeys::default();
        let covered: Vec<bool> = items
            .iter()
            .map(|it| batched && dirs.covered(&it.dir, &self.durability))
            .collect();
        let mut result: Vec<Result<(), OpError>> = vec![Ok(()); items.len()];
        let mut applied_result: Vec<Result<(), OpError>> = vec![Ok(()); applied.len()];

        // Nothing for `syncfs` when everything lies on other filesystems than the root's.
        let batched = batched && (covered.contains(&true) || applied.iter().any(|a| a.covered));

        // 1. The temps' data (none to write back for a batch only applied in place).
        if batched
            && covered.contains(&true)
            && let Err(e) = k.syncfs(root)
        {
            for (r, _) in result.iter_mut().zip(&covered).filter(|(_, c)| **c) {
                *r = Err(not_durable("syncfs", e));
            }
        }
        for (i, it) in items.iter().enumerate() {
            if !covered[i]
                && let Err(e) = fsync_temp(it, k)
            {
                result[i] = Err(not_durable("fsync", e));
            }
        }
        // 2. The renames (through the undo log while a window is open).
        let mut journal = self.journal.as_ref().map(|s| s.lock().unwrap());
        match journal.as_mut().and_then(|j| j.as_mut()) {
            Some(j) => put_journaled(j, &items, &mut result),
            None => {
                for (i, it) in items.iter().enumerate() {
                    if result[i].is_ok()
                        && let Err(e) = put_in_place(it)
                    {
                        result[i] = Err(cannot_put(e.into()));
                    }
                }
            }
        }
        drop(journal);
        for (i, it) in items.iter().enumerate() {
            if result[i].is_err() {
                it.discard();
            }
        }
        // 3. The directory entries, and what was applied in place.
        if batched && let Err(e) = k.syncfs(root) {
            for (r, _) in result
                .iter_mut()
                .zip(&covered)
                .filter(|(r, c)| **c && r.is_ok())
            {
                *r = Err(not_durable("syncfs", e));
            }
            let mut failed = not_durable("syncfs", e);
            failed.retry = false;
            for (r, _) in applied_result
                .iter_mut()
                .zip(&applied)
                .filter(|(_, a)| a.covered)
            {
                *r = Err(failed.clone());
            }
        }
        // Each directory once, however many entries it holds and whatever handle names it.
        let mut synced: Vec<(DirKey, Result<(), Errno>)> = Vec::new();
        let mut sync_dir = |dir: &Arc<OwnedFd>, dirs: &mut DirKeys| -> Result<(), Errno> {
            let key = dirs.key(dir);
            if let Some((_, r)) = synced.iter().find(|(k2, _)| key.is_some() && *k2 == key) {
                return *r;
            }
            let r = k.fsync(dir.as_fd());
            synced.push((key, r));
            r
        };
        for (i, it) in items.iter().enumerate() {
            if !covered[i]
                && result[i].is_ok()
                && let Err(e) = sync_dir(&it.dir, &mut dirs)
            {
                result[i] = Err(not_durable("directory fsync", e));
            }
        }
        for (a, r) in applied.iter().zip(applied_result.iter_mut()) {
            let mut synced_all = Ok(());
            for d in &a.touched.dirs {
                if let Err(e) = sync_dir(d, &mut dirs) {
                    synced_all = Err(not_durable("directory fsync", e));
                }
            }
            if let Some((d, name)) = &a.touched.entry
                && let Err(e) = fsync_entry(d, name, k)
            {
                synced_all = Err(not_durable("fsync", e));
            }
            if r.is_ok()
                && let Err(mut e) = synced_all
            {
                e.retry = false;
                *r = Err(e);
            }
        }
        out.extend(applied.iter().map(|a| a.id).zip(applied_result));
        out.extend(items.into_iter().zip(result).map(|(it, r)| (it.id, r)));
        out
    }
}

/// A rename refused by the filesystem: not worth a resend.
fn cannot_put(e: std::io::Error) -> OpError {
    OpError {
        message: format!("cannot put into place: {e}"),
        retry: false,
        no_space: is_no_space(&e),
    }
}

/// Puts the staged entries whose `result` is still good in place through the open window
/// `j`: each temp is named in the undo area, what undoes them all is written down with
/// one sync of the log, then each is put (a replaced entry swapped into the area). An
/// entry whose temp lies on another filesystem than the area (a mount inside the tree)
/// is put as without a window, and the log says its change is not kept.
fn put_journaled(j: &mut Journal, items: &[Staged], result: &mut [Result<(), OpError>]) {
    let mut temps: Vec<Option<Vec<u8>>> = vec![None; items.len()];
    for (i, it) in items.iter().enumerate() {
        if result[i].is_err() {
            continue;
        }
        match into_undo_area(it, j.dir()) {
            Ok(name) => temps[i] = Some(name),
            Err(Errno::XDEV) => {
                let r = j
                    .unkept(&it.path)
                    .and_then(|()| put_in_place(it).map_err(Into::into));
                if let Err(e) = r {
                    result[i] = Err(cannot_put(e));
                }
            }
            Err(e) => result[i] = Err(cannot_put(e.into())),
        }
    }
    let (idx, changes): (Vec<usize>, Vec<Change<'_>>) = temps
        .iter()
        .enumerate()
        .filter_map(|(i, t)| {
            let temp = t.as_deref()?;
            Some((
                i,
                Change::Put {
                    path: &items[i].path,
                    temp,
                },
            ))
        })
        .unzip();
    let prepared = match j.prepare_all(&changes) {
        Ok(p) => p,
        Err(e) => {
            let e = not_durable_io("undo log", &e);
            for &i in &idx {
                result[i] = Err(e.clone());
            }
            return;
        }
    };
    for ((&i, change), prepared) in idx.iter().zip(&changes).zip(&prepared) {
        let made = with_write_access(&items[i].dir, || j.make(change, prepared));
        if let Err(e) = made {
            result[i] = Err(cannot_put(e));
        }
    }
    // The area lost the temps' names (or holds the old entries under theirs).
    if !idx.is_empty()
        && let Err(e) = rustix::fs::fsync(j.dir())
    {
        let e = not_durable("fsync of the undo area", e);
        for &i in &idx {
            if result[i].is_ok() {
                result[i] = Err(e.clone());
            }
        }
    }
}

/// Names the staged entry's temp in the undo area `area`: an unnamed file is linked there,
/// a named temp renamed there.
fn into_undo_area(it: &Staged, area: BorrowedFd<'_>) -> Result<Vec<u8>, Errno> {
    loop {
        let name = crate::tree::fsroot::temp_name();
        let r = match (&it.temp, &it.file) {
            (Temp::Named(at, temp), _) => rustix::fs::renameat_with(
                &**at,
                temp.as_slice(),
                area,
                name.as_slice(),
                rustix::fs::RenameFlags::NOREPLACE,
            ),
            (Temp::Unnamed { .. }, Some(f)) => link_fd(f, area, &name),
            (Temp::Unnamed { .. }, None) => Err(Errno::BADF),
        };
        match r {
            Ok(()) => return Ok(name),
            Err(Errno::EXIST) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Runs `f`; where it is refused for want of permission on `dir` (a receiver that is not
/// root, a read-only directory of the mirror), gives itself write permission there and
/// runs it again (the directory's mode is put back with its attributes).
fn with_write_access(dir: &OwnedFd, f: impl Fn() -> std::io::Result<()>) -> std::io::Result<()> {
    match f() {
        Err(e) if e.raw_os_error() == Some(Errno::ACCESS.raw_os_error()) => {
            let st = rustix::fs::fstat(dir)?;
            rustix::fs::fchmod(dir, Mode::from_raw_mode((st.st_mode & 0o7777) | 0o700))?;
            f()
        }
        other => other,
    }
}

fn not_durable_io(what: &str, e: &std::io::Error) -> OpError {
    OpError {
        message: format!("not durable: {what} failed: {e}"),
        retry: true,
        no_space: is_no_space(e),
    }
}

/// Not durable: never retry-and-trust, send it again (or wait for space).
fn not_durable(what: &str, e: Errno) -> OpError {
    let e = std::io::Error::from(e);
    OpError {
        message: format!("not durable: {what} failed: {e}"),
        retry: true,
        no_space: is_no_space(&e),
    }
}

/// Makes a staged temp's data durable: by its kept descriptor; else a regular temp of its
/// own (one name) is reopened by name, never through a symlink. A symlink or a hard link
/// of an inode already durable has nothing but its directory entry to make durable.
fn fsync_temp(it: &Staged, k: &dyn Flusher) -> Result<(), Errno> {
    if let Some(f) = &it.file {
        return k.fsync(f.as_fd());
    }
    let Temp::Named(at, temp) = &it.temp else {
        return Ok(());
    };
    let st = rustix::fs::statat(&**at, temp.as_slice(), AtFlags::SYMLINK_NOFOLLOW)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile || st.st_nlink > 1 {
        return Ok(());
    }
    let f = rustix::fs::openat(&**at, temp.as_slice(), READ_NOFOLLOW, Mode::empty())?;
    k.fsync(f.as_fd())
}

/// Makes the attributes of `name` in `dir` durable (reopened, never through a symlink).
/// One removed since, or replaced by a symlink, has nothing left to make durable here:
/// its directory's `fsync` covers it.
fn fsync_entry(dir: &OwnedFd, name: &[u8], k: &dyn Flusher) -> Result<(), Errno> {
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    let flags = match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => READ_NOFOLLOW,
        FileType::Directory => crate::tree::fsroot::DIR_FLAGS,
        _ => return Ok(()),
    };
    match rustix::fs::openat(dir, name, flags, Mode::empty()) {
        Ok(f) => k.fsync(f.as_fd()),
        Err(Errno::NOENT | Errno::LOOP | Errno::NOTDIR) => Ok(()),
        Err(e) => Err(e),
    }
}

/// How a file is reopened to be fsynced: never through a symlink, never waiting on a fifo
/// swapped in.
const READ_NOFOLLOW: OFlags = OFlags::RDONLY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC)
    .union(OFlags::NOCTTY)
    .union(OFlags::NONBLOCK);

/// A directory's identity (device, inode); `None` when it cannot be told.
type DirKey = Option<(u64, u64)>;

/// Directory identities and coverage, found once per handle in a commit.
#[derive(Default)]
struct DirKeys(Vec<(*const OwnedFd, DirKey)>);

impl DirKeys {
    fn key(&mut self, dir: &Arc<OwnedFd>) -> DirKey {
        let p = Arc::as_ptr(dir);
        if let Some((_, k)) = self.0.iter().find(|(q, _)| *q == p) {
            return *k;
        }
        let k = rustix::fs::fstat(dir.as_fd())
            .ok()
            .map(|st| (st.st_dev, st.st_ino));
        self.0.push((p, k));
        k
    }

    fn covered(&mut self, dir: &Arc<OwnedFd>, d: &Durability) -> bool {
        d.trusts_syncfs && self.key(dir).is_some_and(|(dev, _)| dev == d.dev)
    }
}

impl Staged {
    /// A symlink or a hard link staged as `temp` (a name in a directory), to become `name`
    /// in `dir`: nothing to keep open, no bytes of its own.
    pub(crate) fn named(
        id: u64,
        path: &RelPath,
        dir: Arc<OwnedFd>,
        (temp_dir, temp): (Arc<OwnedFd>, Vec<u8>),
        name: &[u8],
    ) -> Staged {
        Staged {
            id,
            path: path.clone(),
            dir,
            temp: Temp::Named(temp_dir, temp),
            name: name.to_vec(),
            file: None,
            bytes: 0,
        }
    }

    /// Removes the temp (a failed or abandoned operation); an unnamed file goes with its
    /// descriptor.
    pub(crate) fn discard(&self) {
        self.temp.discard();
    }
}

/// A batch dropped before its commit (the session failed or was fenced) leaves no temps.
impl Drop for CommitGroup {
    fn drop(&mut self) {
        for it in &self.items {
            it.discard();
        }
    }
}

/// Puts the staged entry in place: a named temp is renamed over its target; an unnamed
/// file is linked at its name at once when nothing is there (a new entry), else named in
/// its `via` directory (the area) and renamed over its target from there, so no temp's
/// name ever shows in a mirrored directory.
/// A receiver that is not root gives itself write permission on a read-only target
/// directory (its mode is put back with the directory's attributes, which the primary
/// sends after the directory's entries).
fn put_in_place(it: &Staged) -> Result<(), Errno> {
    let put = || match (&it.temp, &it.file) {
        (Temp::Named(at, temp), _) => {
            rustix::fs::renameat(&**at, temp.as_slice(), &*it.dir, it.name.as_slice())
        }
        (Temp::Unnamed { via }, Some(f)) => match link_fd(f, &it.dir, &it.name) {
            Err(Errno::EXIST) => loop {
                let temp = crate::tree::fsroot::temp_name();
                match link_fd(f, via, &temp) {
                    Ok(()) => {
                        let r = rustix::fs::renameat(
                            &**via,
                            temp.as_slice(),
                            &*it.dir,
                            it.name.as_slice(),
                        );
                        if r.is_err() {
                            let _ = rustix::fs::unlinkat(&**via, temp.as_slice(), AtFlags::empty());
                        }
                        break r;
                    }
                    Err(Errno::EXIST) => continue,
                    Err(e) => break Err(e),
                }
            },
            other => other,
        },
        (Temp::Unnamed { .. }, None) => Err(Errno::BADF),
    };
    match put() {
        Err(Errno::ACCESS) => {
            let st = rustix::fs::fstat(&*it.dir)?;
            rustix::fs::fchmod(&*it.dir, Mode::from_raw_mode((st.st_mode & 0o7777) | 0o700))?;
            put()
        }
        other => other,
    }
}

/// The open-file limit from which files are received unnamed: each holds a descriptor
/// until its batch commits, and the batches of a session's streams (two lanes of
/// [`BATCH_FILES`], and the large files in flight) must fit several times over.
const UNNAMED_FDS: u64 = 16_384;

/// Where a standby makes the temps of one target directory. A file is made unnamed
/// beside its target (`O_TMPFILE`: its blocks and inode where the target's go, no name a
/// user's could collide with, nothing left by a crash) and keeps no name until its batch
/// commits, when it is linked at its name (or, to replace an entry, named in the area
/// and renamed over it: see `put_in_place`). Symlinks and hard links, and files where
/// unnamed ones cannot be made, are named in the area `.hotsync/tmp/`. Where a directory
/// is on another filesystem than the area (a mount point inside the tree), a rename
/// cannot reach it from there: its temps are named beside their targets instead, under
/// the reserved form.
#[derive(Clone)]
pub struct TempPlace {
    area: Arc<OwnedFd>,
    dev: u64,
    /// This process may hold enough descriptors for unnamed files.
    unnamed: bool,
}

/// A file being received for an entry of a directory.
pub(crate) struct NewTemp {
    pub file: File,
    pub temp: Temp,
}

impl TempPlace {
    /// The area `area` (open), on the filesystem it is on. Files are received unnamed
    /// only if this process's open-file limit (raised, see [`crate::tree::fsroot::raise_fd_limit`])
    /// is at least [`UNNAMED_FDS`].
    pub(crate) fn new(area: Arc<OwnedFd>) -> std::io::Result<TempPlace> {
        let dev = rustix::fs::fstat(&*area)?.st_dev;
        let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        let unnamed = lim.current.is_none_or(|n| n >= UNNAMED_FDS);
        Ok(TempPlace { area, dev, unnamed })
    }

    /// The area itself (to clear it).
    pub(crate) fn area(&self) -> BorrowedFd<'_> {
        self.area.as_fd()
    }

    /// Where a named temp (a symlink, a hard link) of an entry of `dir` is made.
    #[allow(clippy::useless_conversion)]
    pub(crate) fn for_dir(&self, dir: &Arc<OwnedFd>) -> std::io::Result<Arc<OwnedFd>> {
        let dev = rustix::fs::fstat(&**dir)?.st_dev;
        Ok(if u64::from(dev) == u64::from(self.dev) {
            self.area.clone()
        } else {
            dir.clone()
        })
    }

    /// A new file to receive an entry of `dir` into: unnamed beside it, or, where the
    /// filesystem has no unnamed files (or this process may hold few descriptors: an
    /// unnamed file holds one until its batch commits), named in the area (or beside it)
    /// from the start.
    pub(crate) fn create(&self, dir: &Arc<OwnedFd>) -> std::io::Result<NewTemp> {
        let unnamed = if self.unnamed {
            rustix::fs::openat(
                &**dir,
                c".",
                OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
        } else {
            Err(Errno::OPNOTSUPP)
        };
        let at = self.for_dir(dir)?;
        match unnamed {
            Ok(fd) => {
                return Ok(NewTemp {
                    file: File::from(fd),
                    temp: Temp::Unnamed { via: at },
                });
            }
            Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => {}
            Err(e) => return Err(e.into()),
        }
        let (file, name) = crate::tree::fsroot::create_temp(at.as_fd())?;
        Ok(NewTemp {
            file,
            temp: Temp::Named(at, name),
        })
    }
}

/// Gives the open file `f` (unnamed) the name `name` in `at`. `AT_EMPTY_PATH` needs
/// `CAP_DAC_READ_SEARCH`; without it, the file's `/proc/self/fd` entry is linked.
fn link_fd(f: &File, at: impl AsFd, name: &[u8]) -> Result<(), Errno> {
    let at = at.as_fd();
    match rustix::fs::linkat(f, c"", at, name, AtFlags::EMPTY_PATH) {
        Err(Errno::NOENT | Errno::PERM) => {
            use std::os::fd::AsRawFd;
            let proc = format!("/proc/self/fd/{}", f.as_raw_fd());
            rustix::fs::linkat(
                rustix::fs::CWD,
                proc.as_str(),
                at,
                name,
                AtFlags::SYMLINK_FOLLOW,
            )
        }
        other => other,
    }
}

/// Replaces the file `name` in `dir` with `data`, atomically and durably: a temp beside it
/// is written and fsynced, renamed over `name`, then the directory is fsynced. A crash
/// leaves the old content or the new, never a mix (a leftover temp carries the usual
/// prefix).
pub(crate) fn replace_file(dir: BorrowedFd<'_>, name: &[u8], data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let (mut f, temp) = crate::tree::fsroot::create_temp(dir)?;
    let done = f
        .write_all(data)
        .and_then(|_| Ok(rustix::fs::fsync(&f)?))
        .and_then(|_| Ok(rustix::fs::renameat(dir, temp.as_slice(), dir, name)?));
    if let Err(e) = done {
        let _ = rustix::fs::unlinkat(dir, temp.as_slice(), rustix::fs::AtFlags::empty());
        return Err(e);
    }
    Ok(rustix::fs::fsync(dir)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::fsroot::{Root, create_temp};
    use std::io::Write;

    fn stage(b: &mut CommitGroup, root: &Root, id: u64, name: &str, data: &[u8]) {
        let dir = Arc::new(root.open_dir(&crate::model::path::RelPath::root()).unwrap());
        let (mut f, temp) = create_temp(dir.as_fd()).unwrap();
        f.write_all(data).unwrap();
        let keep = b.keep_fd();
        b.stage(Staged {
            id,
            path: RelPath::new(name).unwrap(),
            temp: Temp::Named(dir.clone(), temp),
            dir,
            name: name.as_bytes().to_vec(),
            file: keep.then_some(f),
            bytes: data.len() as u64,
        });
    }

    fn leftovers(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".hotsync-tmp.")
            })
            .count()
    }

    #[test]
    fn small_and_large_batches_land_whole() {
        let t = tempfile::tempdir().unwrap();
        let root = Root::open(t.path()).unwrap();
        let trusted = Durability::of(root.fd()).0;
        let untrusted = Durability::default();
        for (n, d) in [
            (1usize, trusted),
            (FSYNC_EACH + 5, trusted),
            (1, untrusted),
            (FSYNC_EACH + 5, untrusted),
        ] {
            let mut b = CommitGroup::new(d);
            for i in 0..n {
                stage(
                    &mut b,
                    &root,
                    i as u64,
                    &format!("f{i}"),
                    format!("v{n}").as_bytes(),
                );
            }
            let acks = b.commit(root.fd());
            assert_eq!(acks.len(), n);
            assert!(acks.iter().all(|(_, r)| r.is_ok()));
            for i in 0..n {
                assert_eq!(
                    std::fs::read(t.path().join(format!("f{i}"))).unwrap(),
                    format!("v{n}").as_bytes()
                );
            }
            assert_eq!(leftovers(t.path()), 0);
        }
    }

    #[test]
    fn files_are_received_unnamed_and_named_only_at_their_commit() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join(".hotsync/tmp")).unwrap();
        std::fs::create_dir(t.path().join("d")).unwrap();
        std::fs::write(t.path().join("d/old"), b"the old version").unwrap();
        let root = Root::open(t.path()).unwrap();
        let open = |rel: &str| {
            Arc::new(
                root.open_dir(&crate::model::path::RelPath::new(rel).unwrap())
                    .unwrap(),
            )
        };
        crate::tree::fsroot::raise_fd_limit();
        let place = TempPlace::new(open(".hotsync/tmp")).unwrap();
        let d = open("d");
        let names = |rel: &str| std::fs::read_dir(t.path().join(rel)).unwrap().count();
        for n in [1usize, FSYNC_EACH + 3] {
            let before = names("d");
            let mut b = CommitGroup::new(Durability::default());
            for i in 0..n {
                let tmp = place.create(&d).unwrap();
                assert!(
                    matches!(tmp.temp, Temp::Unnamed { .. }),
                    "a file is received unnamed"
                );
                (&tmp.file)
                    .write_all(format!("new {i}").as_bytes())
                    .unwrap();
                let name = if i == 0 {
                    "old".to_string()
                } else {
                    format!("f{n}-{i}")
                };
                b.stage(Staged {
                    id: i as u64,
                    path: RelPath::new(format!("d/{name}")).unwrap(),
                    dir: d.clone(),
                    temp: tmp.temp,
                    name: name.into_bytes(),
                    file: Some(tmp.file),
                    bytes: 5,
                });
            }
            // Staged: nothing named anywhere, in the tree or the area.
            assert_eq!((names("d"), names(".hotsync/tmp")), (before, 0));
            let acks = b.commit(root.fd());
            assert!(acks.iter().all(|(_, r)| r.is_ok()), "{acks:?}");
            assert_eq!(std::fs::read(t.path().join("d/old")).unwrap(), b"new 0");
            assert_eq!(leftovers(&t.path().join("d")), 0);
            assert_eq!(names(".hotsync/tmp"), 0, "the area is left empty");
        }
        // A batch given up leaves nothing behind.
        let mut b = CommitGroup::new(Durability::default());
        let tmp = place.create(&d).unwrap();
        (&tmp.file).write_all(b"never committed").unwrap();
        b.stage(Staged {
            id: 1,
            path: RelPath::new("d/ghost").unwrap(),
            dir: d.clone(),
            temp: tmp.temp,
            name: b"ghost".to_vec(),
            file: Some(tmp.file),
            bytes: 15,
        });
        drop(b);
        assert!(!t.path().join("d/ghost").exists());
        assert_eq!(leftovers(&t.path().join("d")), 0);
    }

    #[test]
    fn replace_file_swaps_content_whole_and_leaves_no_temp() {
        let t = tempfile::tempdir().unwrap();
        let root = Root::open(t.path()).unwrap();
        for data in [&b"first version"[..], b"2nd", b""] {
            replace_file(root.fd(), b"state", data).unwrap();
            assert_eq!(std::fs::read(t.path().join("state")).unwrap(), data);
        }
        assert_eq!(leftovers(t.path()), 0);
    }

    #[test]
    fn a_failed_rename_reports_and_cleans_its_temp() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("d")).unwrap();
        std::fs::write(t.path().join("d/x"), b"x").unwrap();
        let root = Root::open(t.path()).unwrap();
        let mut b = CommitGroup::new(Durability::of(root.fd()).0);
        stage(&mut b, &root, 1, "d", b"file over a non-empty dir");
        stage(&mut b, &root, 2, "ok", b"fine");
        b.failed(3, OpError::new("unreadable", false));
        let acks = b.commit(root.fd());
        assert_eq!(acks.len(), 3);
        let get = |id| acks.iter().find(|(i, _)| *i == id).unwrap().1.clone();
        assert!(get(1).is_err());
        assert!(get(2).is_ok());
        assert!(get(3).is_err());
        assert_eq!(leftovers(t.path()), 0);
        assert!(t.path().join("d/x").exists());
    }

    #[test]
    fn syncfs_is_trusted_only_where_it_is_known_to_flush() {
        for (magic, fs) in [
            (0xEF53, "ext4"),
            (0x5846_5342, "xfs"),
            (0x9123_683E, "btrfs"),
            (0x0102_1994, "tmpfs"),
        ] {
            assert!(trusts_syncfs(magic), "{fs}");
            assert_eq!(filesystem_name(magic), fs);
        }
        for (magic, fs) in OTHER_FILESYSTEMS {
            assert!(!trusts_syncfs(magic), "{fs}");
            assert_eq!(filesystem_name(magic), fs);
        }
        assert!(!trusts_syncfs(0x1234_5678));
        assert_eq!(filesystem_name(0x1234_5678), "type 0x12345678");
        // A root that cannot be told is not trusted.
        assert!(!Durability::default().trusts_syncfs);
    }

    /// The kernel's calls, counted: how many `syncfs`, and which inodes were fsynced.
    #[derive(Default)]
    struct Counting {
        syncfs: std::sync::atomic::AtomicUsize,
        fsynced: std::sync::Mutex<Vec<(u64, u64)>>,
        /// An inode whose fsync fails (EIO), as a disk's error would.
        fail: Option<(u64, u64)>,
    }

    impl Flusher for Counting {
        fn fsync(&self, fd: BorrowedFd<'_>) -> Result<(), Errno> {
            let st = rustix::fs::fstat(fd)?;
            let key = (st.st_dev, st.st_ino);
            self.fsynced.lock().unwrap().push(key);
            if self.fail == Some(key) {
                return Err(Errno::IO);
            }
            Kernel.fsync(fd)
        }
        fn syncfs(&self, fd: BorrowedFd<'_>) -> Result<(), Errno> {
            self.syncfs
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Kernel.syncfs(fd)
        }
    }

    fn key(p: &std::path::Path) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(p).unwrap();
        (m.dev(), m.ino())
    }

    /// A tree with directories `a` and `b`, `b/old` (to delete), `a/mv` (to rename) and
    /// `attr.txt` (to chmod).
    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        for d in ["a", "b"] {
            std::fs::create_dir(t.path().join(d)).unwrap();
        }
        for f in ["b/old", "a/mv", "attr.txt"] {
            std::fs::write(t.path().join(f), f).unwrap();
        }
        t
    }

    /// Stages `n` files across the root, `a` and `b` (ids 0..n) and a symlink in `a`
    /// (id 100); with `in_place`, applies a mkdir (101), a delete (102), a rename (103) and
    /// a chmod (104) as the receiver does, each through a handle of its own (as after the
    /// receiver's cache of handles is dropped). Returns the staged files' final paths.
    fn fill(b: &mut CommitGroup, root: &Root, n: usize, in_place: bool) -> Vec<std::path::PathBuf> {
        let open = |rel: &str| {
            Arc::new(
                root.open_dir(&crate::model::path::RelPath::new(rel).unwrap())
                    .unwrap(),
            )
        };
        let dirs = [open(""), open("a"), open("b")];
        let mut paths = Vec::new();
        for i in 0..n {
            let (rel, dir) = [("", &dirs[0]), ("a/", &dirs[1]), ("b/", &dirs[2])][i % 3];
            let (mut f, temp) = create_temp(dir.as_fd()).unwrap();
            f.write_all(format!("file {i}").as_bytes()).unwrap();
            let keep = b.keep_fd();
            b.stage(Staged {
                id: i as u64,
                path: RelPath::new(format!("{rel}f{i}")).unwrap(),
                dir: dir.clone(),
                temp: Temp::Named(dir.clone(), temp),
                name: format!("f{i}").into_bytes(),
                file: keep.then_some(f),
                bytes: 6,
            });
            paths.push(root.path().join(format!("{rel}f{i}")));
        }
        if !in_place {
            return paths;
        }
        let temp = crate::tree::fsroot::temp_name();
        rustix::fs::symlinkat("f1", &*dirs[1], temp.as_slice()).unwrap();
        b.stage(Staged {
            id: 100,
            path: RelPath::new("a/sl").unwrap(),
            dir: dirs[1].clone(),
            temp: Temp::Named(dirs[1].clone(), temp),
            name: b"sl".to_vec(),
            file: None,
            bytes: 0,
        });
        let r = open("");
        rustix::fs::mkdirat(&*r, "newdir", Mode::from_raw_mode(0o700)).unwrap();
        b.applied(101, Touched::dir(r));
        let d = open("b");
        crate::tree::fsroot::remove_tree(d.as_fd(), b"old").unwrap();
        b.applied(102, Touched::dir(d));
        let (from, to) = (open("a"), open("b"));
        rustix::fs::renameat(&*from, "mv", &*to, "mv2").unwrap();
        b.applied(103, Touched::dirs(from, to));
        let r = open("");
        rustix::fs::chmodat(
            &*r,
            "attr.txt",
            Mode::from_raw_mode(0o600),
            AtFlags::empty(),
        )
        .unwrap();
        b.applied(104, Touched::entry(r, b"attr.txt"));
        paths
    }

    fn sorted(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
        v.sort_unstable();
        v
    }

    #[test]
    fn where_syncfs_is_not_trusted_every_file_and_touched_directory_is_fsynced_once() {
        let t = tree();
        let root = Root::open(t.path()).unwrap();
        let mut b = CommitGroup::new(Durability::default());
        let files = fill(&mut b, &root, 20, true);
        let k = Counting::default();
        let acks = b.commit_with(root.fd(), &k);
        assert_eq!(acks.len(), 25);
        assert!(acks.iter().all(|(_, r)| r.is_ok()), "{acks:?}");
        assert_eq!(k.syncfs.load(std::sync::atomic::Ordering::Relaxed), 0);
        // One fsync per file, per directory (the root, a, b: for the files, the symlink,
        // the mkdir, the delete, the rename) and for the chmodded file; nothing twice.
        let mut want: Vec<(u64, u64)> = files.iter().map(|p| key(p)).collect();
        want.extend(["", "a", "b", "attr.txt"].map(|p| key(&t.path().join(p))));
        assert_eq!(sorted(k.fsynced.lock().unwrap().clone()), sorted(want));
        assert_eq!(std::fs::read(t.path().join("b/f2")).unwrap(), b"file 2");
        assert_eq!(
            std::fs::read_link(t.path().join("a/sl"))
                .unwrap()
                .as_os_str(),
            "f1"
        );
        assert!(t.path().join("b/mv2").exists() && !t.path().join("b/old").exists());
        assert_eq!(leftovers(t.path()) + leftovers(&t.path().join("a")), 0);
    }

    #[test]
    fn where_syncfs_is_trusted_a_large_batch_uses_it_and_a_small_one_fsyncs() {
        let t = tree();
        let root = Root::open(t.path()).unwrap();
        let trusted = Durability::of(root.fd()).0;
        assert!(
            trusted.trusts_syncfs,
            "the tests' tree is on ext4, XFS, btrfs or tmpfs"
        );
        // Large, with operations applied in place: two syncfs, no fsync.
        let mut b = CommitGroup::new(trusted);
        fill(&mut b, &root, 20, true);
        let k = Counting::default();
        let acks = b.commit_with(root.fd(), &k);
        assert!(
            acks.len() == 25 && acks.iter().all(|(_, r)| r.is_ok()),
            "{acks:?}"
        );
        assert_eq!(k.syncfs.load(std::sync::atomic::Ordering::Relaxed), 2);
        assert_eq!(k.fsynced.lock().unwrap().len(), 0);
        // Small: each file and its directory.
        let mut b = CommitGroup::new(trusted);
        let files = fill(&mut b, &root, 3, false);
        let k = Counting::default();
        assert!(b.commit_with(root.fd(), &k).iter().all(|(_, r)| r.is_ok()));
        assert_eq!(k.syncfs.load(std::sync::atomic::Ordering::Relaxed), 0);
        let mut want: Vec<(u64, u64)> = files.iter().map(|p| key(p)).collect();
        want.extend(["", "a", "b"].map(|p| key(&t.path().join(p))));
        assert_eq!(sorted(k.fsynced.lock().unwrap().clone()), sorted(want));
        // A few operations applied in place (a large file patched): each fsynced, not the
        // whole filesystem written back.
        let mut b = CommitGroup::new(trusted);
        let r = Arc::new(
            rustix::fs::open(t.path(), OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap(),
        );
        rustix::fs::chmodat(&*r, "a", Mode::from_raw_mode(0o700), AtFlags::empty()).unwrap();
        b.applied(7, Touched::entry(r, b"a"));
        let k = Counting::default();
        assert!(b.commit_with(root.fd(), &k).iter().all(|(_, r)| r.is_ok()));
        assert_eq!(k.syncfs.load(std::sync::atomic::Ordering::Relaxed), 0);
        assert_eq!(
            k.fsynced.lock().unwrap().clone(),
            vec![key(&t.path().join("a"))]
        );
    }

    #[test]
    fn what_lies_on_another_filesystem_than_the_trusted_root_is_fsynced_one_by_one() {
        let t = tree();
        let root = Root::open(t.path()).unwrap();
        // As if every directory were a mount inside the tree: the root's syncfs covers
        // none of them. The files staged past FSYNC_EACH kept no descriptor: reopened.
        let mut elsewhere = Durability::of(root.fd()).0;
        elsewhere.dev ^= 1;
        let mut b = CommitGroup::new(elsewhere);
        let files = fill(&mut b, &root, 20, true);
        let k = Counting::default();
        let acks = b.commit_with(root.fd(), &k);
        assert!(
            acks.len() == 25 && acks.iter().all(|(_, r)| r.is_ok()),
            "{acks:?}"
        );
        let mut want: Vec<(u64, u64)> = files.iter().map(|p| key(p)).collect();
        want.extend(["", "a", "b", "attr.txt"].map(|p| key(&t.path().join(p))));
        assert_eq!(sorted(k.fsynced.lock().unwrap().clone()), sorted(want));
        assert_eq!(k.syncfs.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    #[test]
    fn a_failed_fsync_is_not_durable_for_what_it_covers() {
        let t = tree();
        let root = Root::open(t.path()).unwrap();
        let mut b = CommitGroup::new(Durability::default());
        fill(&mut b, &root, 6, true);
        let k = Counting {
            fail: Some(key(&t.path().join("b"))),
            ..Counting::default()
        };
        let acks = b.commit_with(root.fd(), &k);
        let get = |id| acks.iter().find(|(i, _)| *i == id).unwrap().1.clone();
        // The files in b, and the delete and the rename there, are not durable.
        for id in [2, 5, 102, 103] {
            let e = get(id).unwrap_err();
            assert!(
                e.message.contains("not durable: directory fsync"),
                "{id}: {e:?}"
            );
        }
        assert!(get(2).unwrap_err().retry, "a file is sent again");
        for id in [0, 1, 3, 4, 100, 101, 104] {
            assert!(get(id).is_ok(), "{id}");
        }
    }

    #[test]
    fn where_syncfs_is_not_trusted_every_file_keeps_its_descriptor_within_a_bound() {
        let t = tree();
        let root = Root::open(t.path()).unwrap();
        let trusted = Durability::of(root.fd()).0;
        let mut b = CommitGroup::new(trusted);
        fill(&mut b, &root, FSYNC_EACH + 1, false);
        assert!(!b.keep_fd() && !b.should_commit());
        let mut b = CommitGroup::new(Durability::default());
        fill(&mut b, &root, BATCH_FDS - 1, false);
        assert!(b.keep_fd() && !b.should_commit());
        fill(&mut b, &root, 1, false);
        assert!(
            b.should_commit(),
            "committed before it holds more descriptors"
        );
        assert!(b.commit(root.fd()).iter().all(|(_, r)| r.is_ok()));
    }
}
