//! The standby's undo area, `.hotsync/undo/`: the log of the open window (`log`) and what
//! its changes destroyed, kept under numbers (`k<n>`). The decisions (what to record, what
//! is fresh) are [`crate::model::undo`]'s; this is the I/O: making a record durable before
//! its change, making the change, and rolling a tree back to the window's consistent point.
//!
//! Every change is two steps, [`Journal::prepare`] (the records, durable) and [`make`] (the
//! change itself), so that a crash between them, the one moment a record exists for a
//! change that did not happen, can be made on purpose by the tests.

use crate::model::epoch::Position;
use crate::model::manifest::{Meta, Mtime};
use crate::model::path::RelPath;
use crate::model::undo::{self, Header, OldAttrs, Record, Window};
use crate::model::xattrs::{Policy, Xattrs};
use crate::tree::fsroot::{self, Root};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags, Timestamps};
use rustix::io::Errno;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// The undo area's name in `.hotsync/`.
pub(crate) const UNDO: &[u8] = b"undo";
const LOG: &[u8] = b"log";

/// Where a standby keeps its open window, if it has one: shared by every stream of every
/// session, which write through it, and replaced when a window closes and the next opens.
pub(crate) type Slot = std::sync::Arc<std::sync::Mutex<Option<Journal>>>;

/// The name of kept entry `n` in the undo area.
pub(crate) fn kept_name(n: u64) -> Vec<u8> {
    format!("k{n}").into_bytes()
}

/// A change of the tree, as the receiver makes it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Change<'a> {
    /// A new regular file, named `temp` in the undo area, put at `path`.
    Put { path: &'a RelPath, temp: &'a [u8] },
    /// A directory made at `path`, where nothing is.
    Mkdir { path: &'a RelPath },
    /// The entry at `path` removed, with everything beneath it.
    Remove { path: &'a RelPath },
    /// `from` renamed to `to`, over whatever is there.
    Rename { from: &'a RelPath, to: &'a RelPath },
    /// The attributes of `path` set to `meta` (and `xattrs`, in their namespaces).
    Attrs {
        path: &'a RelPath,
        meta: &'a Meta,
        owners: bool,
        with_mode: bool,
        xattrs: Option<(&'a Xattrs, &'a Policy)>,
    },
}

/// What [`Journal::prepare`] decided for a change, for [`make`].
#[derive(Debug, Default)]
pub(crate) struct Prepared {
    /// The number the destroyed entry is kept under, if one is.
    kept: Option<u64>,
}

/// The open window: its log, appended to and made durable record by record.
pub(crate) struct Journal {
    root: Root,
    dir: OwnedFd,
    window: Window,
}

impl Journal {
    /// Opens a new window after the consistent point `base` (reached at `at_ms` on the
    /// primary), in the area `.hotsync/` open as `area`: anything an older window left is
    /// dropped first.
    pub(crate) fn begin(
        root: &Root,
        area: BorrowedFd<'_>,
        base: Position,
        at_ms: u64,
    ) -> io::Result<Journal> {
        close(area)?;
        let dir = open_or_make_dir(area)?;
        let mut bytes = undo::MAGIC.to_vec();
        undo::frame(&Header { base, at_ms }, &mut bytes);
        let fd = rustix::fs::openat(
            &dir,
            LOG,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::from_raw_mode(0o600),
        )?;
        let mut log = File::from(fd);
        log.write_all(&bytes)?;
        log.sync_all()?;
        rustix::fs::fsync(&dir)?;
        Ok(Journal {
            root: root.try_clone()?,
            dir,
            window: Window::new(0),
        })
    }

    /// Goes on with the window a log left in `area` (after a restart), if there is one.
    pub(crate) fn resume(root: &Root, area: BorrowedFd<'_>) -> io::Result<Option<Journal>> {
        let Some((header, records)) = read(area)? else {
            return Ok(None);
        };
        let dir = fsroot::open_subdir(area, UNDO)?;
        let fd = open_log(&dir)?;
        // A torn record at the end is cut off, so the next one follows the last whole one.
        let whole = whole_len(&header, &records);
        rustix::fs::ftruncate(&fd, whole as u64)?;
        Ok(Some(Journal {
            root: root.try_clone()?,
            dir,
            window: Window::resume(&records),
        }))
    }

    /// The undo area, where temps are made and kept entries lie.
    pub(crate) fn dir(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    /// Writes down what undoes `change` and makes it durable; the change may then be
    /// made ([`make`]).
    pub(crate) fn prepare(&mut self, change: &Change<'_>) -> io::Result<Prepared> {
        let mut records = Vec::new();
        let prepared = self.decide(change, &mut records)?;
        self.append(&records)?;
        Ok(prepared)
    }

    /// [`Journal::prepare`] for several changes, with one write to the log.
    pub(crate) fn prepare_all(&mut self, changes: &[Change<'_>]) -> io::Result<Vec<Prepared>> {
        let mut records = Vec::new();
        let prepared = changes
            .iter()
            .map(|c| self.decide(c, &mut records))
            .collect::<io::Result<Vec<_>>>()?;
        self.append(&records)?;
        Ok(prepared)
    }

    /// Writes down that the change at `path` could not be kept.
    pub(crate) fn unkept(&mut self, path: &RelPath) -> io::Result<()> {
        self.append(&[Record::Unkept { path: path.clone() }])
    }

    /// The records that undo `change`, and what its making needs.
    fn decide(&mut self, change: &Change<'_>, records: &mut Vec<Record>) -> io::Result<Prepared> {
        let root = &self.root;
        let mut prepared = Prepared::default();
        let touches: &[&RelPath] = match change {
            Change::Put { path, .. } | Change::Mkdir { path } | Change::Remove { path } => &[path],
            Change::Rename { from, to } => &[from, to],
            Change::Attrs { .. } => &[],
        };
        for path in touches {
            let dir = parent(path);
            if self.window.needs_time(&dir) {
                let st = root.stat(&dir)?;
                records.push(Record::DirTime {
                    path: dir,
                    mtime: Mtime {
                        sec: st.st_mtime,
                        nsec: st.st_mtime_nsec as u32,
                    },
                });
            }
        }
        match *change {
            Change::Put { path, temp } => {
                let exists = exists(root, path)?;
                let ino = rustix::fs::statat(&self.dir, temp, AtFlags::SYMLINK_NOFOLLOW)?.st_ino;
                if let Some(r) = self.window.put(path, exists, ino) {
                    if let Record::Replaced { kept, .. } = r {
                        // The new file waits under the number its old version will take.
                        let name = kept_name(kept);
                        rustix::fs::renameat(&self.dir, temp, &self.dir, name.as_slice())?;
                        prepared.kept = Some(kept);
                    }
                    records.push(r);
                }
            }
            Change::Mkdir { path } => records.push(self.window.made(path)),
            Change::Remove { path } => {
                if exists(root, path)? {
                    let r = self.window.remove(path);
                    if let Record::Removed { kept, .. } = r {
                        prepared.kept = Some(kept);
                    }
                    records.push(r);
                }
            }
            Change::Rename { from, to } => {
                let rs = self.window.rename(from, to, exists(root, to)?);
                for r in &rs {
                    if let Record::Removed { kept, .. } = r {
                        prepared.kept = Some(*kept);
                    }
                }
                records.extend(rs);
            }
            Change::Attrs {
                path,
                owners,
                with_mode,
                xattrs,
                ..
            } => {
                let (d, name) = root.parent_of(path)?;
                let st = rustix::fs::statat(&d, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW)?;
                let old_x = match xattrs {
                    Some((_, policy)) => Some((
                        crate::tree::xattr::read(
                            crate::tree::xattr::At::Name(d.as_fd(), &name),
                            policy,
                        )?,
                        *policy,
                    )),
                    None => None,
                };
                records.push(Record::Attrs {
                    path: path.clone(),
                    old: OldAttrs {
                        meta: fsroot::meta_of(&st),
                        owners,
                        with_mode,
                        xattrs: old_x,
                    },
                });
            }
        }
        Ok(prepared)
    }

    fn append(&mut self, records: &[Record]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut bytes = Vec::new();
        for r in records {
            undo::frame(r, &mut bytes);
        }
        // Opened for each append, never held: a standby's filesystem must stay free to be
        // remounted read-only (a file open for writing would keep it busy).
        let mut log = File::from(open_log(&self.dir)?);
        log.write_all(&bytes)?;
        log.sync_data()?;
        // A replaced file's new version, renamed within the area to the number its old
        // one takes, must be there too; no other record renamed anything before it.
        if records.iter().any(|r| matches!(r, Record::Replaced { .. })) {
            rustix::fs::fsync(&self.dir)?;
        }
        Ok(())
    }
}

impl Journal {
    /// The file at `path` was patched in place and the patch is durable: its journal
    /// `pending` (in the reserved area `area`) moves into the undo area, recorded in the
    /// log first, so that rolling back writes back what the patch overwrote.
    pub(crate) fn keep_patch(
        &mut self,
        area: BorrowedFd<'_>,
        path: &RelPath,
        pending: &crate::tree::patch::Pending,
    ) -> io::Result<()> {
        let (r, kept) = self.window.patched(path);
        self.append(&[r])?;
        crate::tree::patch::keep(area, pending, self.dir.as_fd(), &kept_name(kept))
    }

    /// Makes `change`, after [`Journal::prepare`] wrote down its undo.
    pub(crate) fn make(&self, change: &Change<'_>, prepared: &Prepared) -> io::Result<()> {
        make(&self.root, self, change, prepared)
    }
}

fn make(root: &Root, j: &Journal, change: &Change<'_>, prepared: &Prepared) -> io::Result<()> {
    match *change {
        Change::Put { path, temp } => {
            let (d, name) = root.parent_of(path)?;
            match prepared.kept {
                // Atomic for readers and for a crash: the old file takes the new one's
                // place in the area.
                Some(k) => exchange(j.dir(), &kept_name(k), d.as_fd(), &name),
                None => {
                    rustix::fs::renameat(j.dir(), temp, &d, name.as_slice()).map_err(Into::into)
                }
            }
        }
        Change::Mkdir { path } => {
            let (d, name) = root.parent_of(path)?;
            // As the receiver makes directories: their mode comes with their attributes.
            rustix::fs::mkdirat(&d, name.as_slice(), Mode::from_raw_mode(0o700))?;
            Ok(())
        }
        Change::Remove { path } => {
            let Some(k) = prepared.kept else {
                return Ok(());
            };
            let (d, name) = root.parent_of(path)?;
            rustix::fs::renameat(&d, name.as_slice(), j.dir(), kept_name(k).as_slice())?;
            Ok(())
        }
        Change::Rename { from, to } => {
            let (fd, fname) = root.parent_of(from)?;
            let (td, tname) = root.parent_of(to)?;
            if let Some(k) = prepared.kept {
                rustix::fs::renameat(&td, tname.as_slice(), j.dir(), kept_name(k).as_slice())?;
            }
            rustix::fs::renameat(&fd, fname.as_slice(), &td, tname.as_slice())?;
            Ok(())
        }
        Change::Attrs {
            path,
            meta,
            owners,
            with_mode,
            xattrs,
        } => {
            let (d, name) = root.parent_of(path)?;
            fsroot::set_meta_at(d.as_fd(), &name, meta, owners, with_mode, xattrs)
        }
    }
}

/// The log of the undo area `dir`, to append to.
fn open_log(dir: &OwnedFd) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        dir,
        LOG,
        OFlags::WRONLY | OFlags::APPEND | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )?)
}

/// Swaps the entries `a` in `ad` and `b` in `bd`.
fn exchange(ad: BorrowedFd<'_>, a: &[u8], bd: BorrowedFd<'_>, b: &[u8]) -> io::Result<()> {
    rustix::fs::renameat_with(ad, a, bd, b, RenameFlags::EXCHANGE)?;
    Ok(())
}

/// The log left in `area`: its header and whole records; `None` without one.
pub(crate) fn read(area: BorrowedFd<'_>) -> io::Result<Option<(Header, Vec<Record>)>> {
    let dir = match fsroot::open_subdir(area, UNDO) {
        Ok(d) => d,
        Err(e) if e.raw_os_error() == Some(Errno::NOENT.raw_os_error()) => return Ok(None),
        Err(e) => return Err(e),
    };
    let fd = match rustix::fs::openat(
        &dir,
        LOG,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut bytes = Vec::new();
    File::from(fd).read_to_end(&mut bytes)?;
    Ok(undo::parse(&bytes))
}

/// Bytes of a log holding `header` and `records`, all whole.
fn whole_len(header: &Header, records: &[Record]) -> usize {
    let mut bytes = undo::MAGIC.to_vec();
    undo::frame(header, &mut bytes);
    for r in records {
        undo::frame(r, &mut bytes);
    }
    bytes.len()
}

/// Closes the window of `area`: the log first (so no later open rolls back to it), then
/// what it kept.
pub(crate) fn close(area: BorrowedFd<'_>) -> io::Result<()> {
    let dir = match fsroot::open_subdir(area, UNDO) {
        Ok(d) => d,
        Err(e) if e.raw_os_error() == Some(Errno::NOENT.raw_os_error()) => return Ok(()),
        Err(e) => return Err(e),
    };
    match rustix::fs::unlinkat(&dir, LOG, AtFlags::empty()) {
        Ok(()) => rustix::fs::fsync(&dir)?,
        Err(Errno::NOENT) => {}
        Err(e) => return Err(e.into()),
    }
    for name in fsroot::list_dir(dir.as_fd())? {
        fsroot::remove_tree(dir.as_fd(), &name)?;
    }
    Ok(())
}

/// What a roll-back did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct RolledBack {
    /// Changes that could not be undone (see [`Record::Unkept`]): the tree is not at the
    /// consistent point where they lie.
    pub(crate) unkept: Vec<RelPath>,
    /// The consistent point the tree is at again.
    pub(crate) base: Position,
    /// When the primary was at it (ms since the Unix epoch).
    pub(crate) at_ms: u64,
    /// Records undone.
    pub(crate) undone: usize,
}

/// Puts the tree at `root` back at the consistent point of the window `area` holds, makes
/// that durable, and closes the window. `None` when there is no window.
///
/// # Errors
/// A change that cannot be undone (the filesystem refuses it): the window is left as it
/// is, so that the roll-back can be tried again.
pub(crate) fn roll_back(root: &Root, area: BorrowedFd<'_>) -> io::Result<Option<RolledBack>> {
    let Some((header, records)) = read(area)? else {
        return Ok(None);
    };
    let kept = fsroot::open_subdir(area, UNDO)?;
    let mut unkept = Vec::new();
    for r in records.iter().rev() {
        if let Record::Unkept { path } = r {
            unkept.push(path.clone());
        }
        undo_one(root, kept.as_fd(), r)?;
    }
    rustix::fs::syncfs(root.fd())?;
    close(area)?;
    Ok(Some(RolledBack {
        unkept,
        base: header.base,
        at_ms: header.at_ms,
        undone: records.len(),
    }))
}

/// Undoes one record, given that every later one is undone (or never happened).
fn undo_one(root: &Root, kept: BorrowedFd<'_>, r: &Record) -> io::Result<()> {
    match r {
        Record::Patched { kept: k, .. } => {
            // Not there: the record was written, the journal not yet moved; the patch was
            // put back when the tree was opened.
            if let Some(p) = crate::tree::patch::read(kept, &kept_name(*k)) {
                crate::tree::patch::restore(root, &p)?;
            }
        }
        Record::Made { path } => {
            let (d, name) = root.parent_of(path)?;
            fsroot::remove_tree(d.as_fd(), &name)?;
        }
        Record::Replaced {
            path,
            kept: k,
            new_ino,
        } => {
            let k = kept_name(*k);
            let Some(st) = stat_opt(kept, &k)? else {
                return Ok(());
            };
            if st.st_ino == *new_ino {
                // The exchange never happened: the new file is still waiting.
                rustix::fs::unlinkat(kept, k.as_slice(), AtFlags::empty())?;
            } else {
                let (d, name) = root.parent_of(path)?;
                rustix::fs::renameat(kept, k.as_slice(), &d, name.as_slice())?;
            }
        }
        Record::Removed { path, kept: k } => {
            let k = kept_name(*k);
            if stat_opt(kept, &k)?.is_some() {
                let (d, name) = root.parent_of(path)?;
                // Whatever stands there was made later in the window.
                fsroot::remove_tree(d.as_fd(), &name)?;
                rustix::fs::renameat(kept, k.as_slice(), &d, name.as_slice())?;
            }
        }
        Record::Renamed { from, to } => {
            let (td, tname) = root.parent_of(to)?;
            let (fd, fname) = root.parent_of(from)?;
            if stat_opt(td.as_fd(), &tname)?.is_some() && stat_opt(fd.as_fd(), &fname)?.is_none() {
                rustix::fs::renameat(&td, tname.as_slice(), &fd, fname.as_slice())?;
            }
        }
        Record::Attrs { path, old } => {
            let (d, name) = root.parent_of(path)?;
            if stat_opt(d.as_fd(), &name)?.is_some() {
                let x = old.xattrs.as_ref().map(|(x, p)| (x, p));
                fsroot::set_meta_at(d.as_fd(), &name, &old.meta, old.owners, old.with_mode, x)?;
            }
        }
        Record::Unkept { .. } => {}
        Record::DirTime { path, mtime } => {
            let d = if path.is_root() {
                rustix::io::dup(root.fd())?
            } else {
                root.open_dir(path)?
            };
            let times = Timestamps {
                last_access: rustix::fs::Timespec {
                    tv_sec: 0,
                    tv_nsec: rustix::fs::UTIME_OMIT,
                },
                last_modification: rustix::fs::Timespec {
                    tv_sec: mtime.sec,
                    tv_nsec: mtime.nsec as _,
                },
            };
            rustix::fs::futimens(&d, &times)?;
        }
    }
    Ok(())
}

fn stat_opt(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Option<rustix::fs::Stat>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn exists(root: &Root, path: &RelPath) -> io::Result<bool> {
    let (d, name) = root.parent_of(path)?;
    Ok(stat_opt(d.as_fd(), &name)?.is_some())
}

fn parent(path: &RelPath) -> RelPath {
    RelPath::new(path.parent_bytes().to_vec()).unwrap_or_else(|_| RelPath::root())
}

fn open_or_make_dir(area: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    match rustix::fs::mkdirat(area, UNDO, Mode::from_raw_mode(0o700)) {
        Ok(()) => rustix::fs::fsync(area)?,
        Err(Errno::EXIST) => {}
        Err(e) => return Err(e.into()),
    }
    let dir = fsroot::open_subdir(area, UNDO)?;
    let st = rustix::fs::fstat(&dir)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return Err(io::Error::other("the undo area is not a directory"));
    }
    Ok(dir)
}

/// What the tests of a roll-back compare.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::BTreeMap;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;

    /// An entry as a roll-back must give it back: type, content, mode and mtime.
    pub(crate) type Seen = (char, Vec<u8>, u32, i64, i64);

    /// Every entry but the reserved area: type, content, mode and mtime (directories too).
    pub(crate) fn snapshot(root: &Path) -> BTreeMap<String, Seen> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Seen>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let e = e.unwrap();
                let path = e.path();
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                if rel == ".hotsync" {
                    continue;
                }
                let m = std::fs::symlink_metadata(&path).unwrap();
                let (kind, data) = if m.is_dir() {
                    walk(root, &path, out);
                    ('d', Vec::new())
                } else {
                    ('f', std::fs::read(&path).unwrap())
                };
                out.insert(
                    rel,
                    (kind, data, m.mode() & 0o7777, m.mtime(), m.mtime_nsec()),
                );
            }
        }
        let mut out = BTreeMap::new();
        let m = std::fs::metadata(root).unwrap();
        out.insert(
            String::new(),
            (
                'd',
                Vec::new(),
                m.mode() & 0o7777,
                m.mtime(),
                m.mtime_nsec(),
            ),
        );
        walk(root, root, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::testing::snapshot;
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn initial(root: &Path) {
        std::fs::create_dir(root.join(".hotsync")).unwrap();
        std::fs::write(root.join("a"), b"a0").unwrap();
        std::fs::write(root.join("m"), b"m0").unwrap();
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(root.join("d/x"), b"x0").unwrap();
        std::fs::write(root.join("d/y"), b"y0").unwrap();
        std::fs::create_dir_all(root.join("e/deep")).unwrap();
        std::fs::write(root.join("e/deep/z"), b"z0").unwrap();
        // Times in the past, so a change made now would show.
        for (f, t) in [
            ("a", 1),
            ("m", 2),
            ("d/x", 3),
            ("d/y", 4),
            ("e/deep/z", 5),
            ("e/deep", 6),
            ("e", 7),
            ("d", 8),
            ("", 9),
        ] {
            let f = std::fs::File::open(root.join(f)).unwrap();
            f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000 + t))
                .unwrap();
        }
    }

    /// What the script does at step `i`.
    enum Step {
        Put(&'static str, &'static [u8]),
        Mkdir(&'static str),
        Remove(&'static str),
        Rename(&'static str, &'static str),
        Chmod(&'static str, u32),
    }

    fn script() -> Vec<Step> {
        vec![
            Step::Put("a", b"a1"),
            Step::Put("a", b"a2"),
            Step::Put("n", b"n1"),
            Step::Mkdir("f"),
            Step::Put("f/g", b"g1"),
            Step::Rename("d", "h"),
            Step::Remove("e"),
            Step::Rename("m", "a"),
            Step::Chmod("h/x", 0o600),
            Step::Put("h/y", b"y1"),
            Step::Remove("n"),
            Step::Put("n", b"n2"),
        ]
    }

    /// Runs the script's first `made` steps, and prepares (but does not make) the next.
    fn run(root: &Root, area: BorrowedFd<'_>, made: usize) {
        let mut j = Journal::begin(root, area, Position { epoch: 1, seq: 4 }, 77).unwrap();
        for (i, step) in script().into_iter().enumerate().take(made + 1) {
            let temp = format!("t{i}").into_bytes();
            let (a, b);
            let meta;
            let change = match step {
                Step::Put(path, data) => {
                    std::fs::write(
                        root.path()
                            .join(".hotsync/undo")
                            .join(std::str::from_utf8(&temp).unwrap()),
                        data,
                    )
                    .unwrap();
                    a = p(path);
                    Change::Put {
                        path: &a,
                        temp: &temp,
                    }
                }
                Step::Mkdir(path) => {
                    a = p(path);
                    Change::Mkdir { path: &a }
                }
                Step::Remove(path) => {
                    a = p(path);
                    Change::Remove { path: &a }
                }
                Step::Rename(from, to) => {
                    a = p(from);
                    b = p(to);
                    Change::Rename { from: &a, to: &b }
                }
                Step::Chmod(path, mode) => {
                    a = p(path);
                    let st = root.stat(&a).unwrap();
                    meta = Meta {
                        mode,
                        ..fsroot::meta_of(&st)
                    };
                    Change::Attrs {
                        path: &a,
                        meta: &meta,
                        owners: false,
                        with_mode: true,
                        xattrs: None,
                    }
                }
            };
            let prepared = j.prepare(&change).unwrap();
            if i < made {
                j.make(&change, &prepared).unwrap();
            }
        }
    }

    #[test]
    fn a_crash_at_any_point_rolls_back_to_the_consistent_point() {
        let n = script().len();
        for made in 0..=n {
            let dir = tempfile::tempdir().unwrap();
            initial(dir.path());
            let before = snapshot(dir.path());
            let root = Root::open(dir.path()).unwrap();
            let area = fsroot::open_subdir(root.fd(), b".hotsync").unwrap();
            run(&root, area.as_fd(), made);
            if made == n {
                // Everything was made: the tree is the new one.
                let after = snapshot(dir.path());
                assert_eq!(after["a"].1, b"m0");
                assert_eq!(after["h/y"].1, b"y1");
                assert_eq!(after["n"].1, b"n2");
                assert!(!after.contains_key("e"));
                assert_eq!(after["h/x"].2, 0o600);
            }
            // The process dies here; whoever opens the tree next rolls it back.
            let rolled = roll_back(&root, area.as_fd()).unwrap().unwrap();
            assert_eq!(rolled.base, Position { epoch: 1, seq: 4 });
            assert_eq!(rolled.at_ms, 77);
            assert_eq!(snapshot(dir.path()), before, "crash after {made} changes");
            // The window is closed: nothing kept, nothing to roll back again.
            assert!(read(area.as_fd()).unwrap().is_none());
            assert_eq!(
                fsroot::list_dir(fsroot::open_subdir(area.as_fd(), UNDO).unwrap().as_fd())
                    .unwrap()
                    .len(),
                0
            );
            assert!(roll_back(&root, area.as_fd()).unwrap().is_none());
        }
    }

    /// A file patched in place in a window, twice, is written back as it was at the
    /// point: each patch's journal is kept, and the later one undone first.
    #[test]
    fn a_file_patched_in_place_rolls_back_to_the_consistent_point() {
        let dir = tempfile::tempdir().unwrap();
        initial(dir.path());
        let before = snapshot(dir.path());
        let root = Root::open(dir.path()).unwrap();
        let area = fsroot::open_subdir(root.fd(), b".hotsync").unwrap();
        let mut j = Journal::begin(&root, area.as_fd(), Position { epoch: 1, seq: 4 }, 77).unwrap();
        let a = p("a");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.path().join("a"))
            .unwrap();
        for (n, bytes) in [(1u64, b"XY".to_vec()), (0, b"Q".to_vec())] {
            let st = rustix::fs::fstat(&f).unwrap();
            let old = OldAttrs {
                meta: fsroot::meta_of(&st),
                owners: false,
                with_mode: true,
                xattrs: None,
            };
            let pending =
                crate::tree::patch::patch(area.as_fd(), &a, &f, &[(n, bytes)], 3, old, |_| Ok(()))
                    .unwrap();
            j.keep_patch(area.as_fd(), &a, &pending).unwrap();
        }
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), b"QXY");
        roll_back(&root, area.as_fd()).unwrap().unwrap();
        assert_eq!(snapshot(dir.path()), before);
    }

    #[test]
    fn a_resumed_window_keeps_every_record_and_cuts_a_torn_one() {
        let dir = tempfile::tempdir().unwrap();
        initial(dir.path());
        let before = snapshot(dir.path());
        let root = Root::open(dir.path()).unwrap();
        let area = fsroot::open_subdir(root.fd(), b".hotsync").unwrap();
        run(&root, area.as_fd(), 4);
        // A torn record at the end, as a crash mid-append leaves it.
        let log = dir.path().join(".hotsync/undo/log");
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let mut j = Journal::resume(&root, area.as_fd()).unwrap().unwrap();
        // Another change after the restart: removing what the window made and what it had.
        for path in ["f", "d"] {
            let a = p(path);
            let c = Change::Remove { path: &a };
            let pr = j.prepare(&c).unwrap();
            j.make(&c, &pr).unwrap();
        }
        assert!(!dir.path().join("d").exists());
        roll_back(&root, area.as_fd()).unwrap().unwrap();
        assert_eq!(snapshot(dir.path()), before);
        let mode = std::fs::metadata(dir.path().join("d/x"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, before["d/x"].2);
    }
}
