//! Filesystem access relative to a tree root's directory handle. Paths are resolved with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` (or a component walk with `O_NOFOLLOW`
//! on kernels without it), so no symlink anywhere in a path is followed and nothing
//! escapes the root. A symlink in the tree is data, never a door.

use crate::model::manifest::{LinkKey, Meta, Mtime, Shape};
use crate::model::path::{RelPath, TEMP_PREFIX};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat, Timestamps};
use rustix::io::Errno;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// An open tree root.
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
}

static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

impl Root {
    /// Opens `path` as a tree root. The root path itself may be reached through symlinks
    /// (the user named it); nothing beneath it will be.
    pub fn open(path: &Path) -> io::Result<Root> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Root {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Another handle on the same root.
    pub(crate) fn try_clone(&self) -> io::Result<Root> {
        Ok(Root {
            fd: rustix::io::fcntl_dupfd_cloexec(&self.fd, 0)?,
            path: self.path.clone(),
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the directory at `rel` (the root itself for the empty path).
    pub(crate) fn open_dir(&self, rel: &RelPath) -> io::Result<OwnedFd> {
        if rel.is_root() {
            return Ok(rustix::io::fcntl_dupfd_cloexec(&self.fd, 0)?);
        }
        resolve(self.fd(), rel.as_bytes(), DIR_FLAGS)
    }

    /// Opens the regular file at `rel` for reading.
    pub(crate) fn open_file(&self, rel: &RelPath) -> io::Result<File> {
        let fd = resolve(
            self.fd(),
            rel.as_bytes(),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
        )?;
        let st = rustix::fs::fstat(&fd)?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        // Clear O_NONBLOCK, which was only there so a fifo swapped in cannot hang us.
        rustix::fs::fcntl_setfl(&fd, OFlags::empty())?;
        Ok(File::from(fd))
    }

    /// The parent directory of `rel` and its last name. For the root, the root itself and ".".
    pub(crate) fn parent_of(&self, rel: &RelPath) -> io::Result<(OwnedFd, Vec<u8>)> {
        if rel.is_root() {
            return Ok((self.open_dir(rel)?, b".".to_vec()));
        }
        let (parent, name) = rel.split();
        Ok((self.open_dir(&parent)?, name.to_vec()))
    }

    /// Whether the root holds nothing that is mirrored (an unmounted disk looks so).
    pub fn is_empty(&self) -> io::Result<bool> {
        let names = list_dir(self.fd())?;
        Ok(names.iter().all(|n| {
            n.as_slice() == crate::model::path::RESERVED || crate::model::path::is_temp_name(n)
        }))
    }

    /// `lstat` of `rel`.
    pub(crate) fn stat(&self, rel: &RelPath) -> io::Result<Stat> {
        if rel.is_root() {
            return Ok(rustix::fs::fstat(&self.fd)?);
        }
        let (dir, name) = self.parent_of(rel)?;
        Ok(rustix::fs::statat(
            &dir,
            name.as_slice(),
            AtFlags::SYMLINK_NOFOLLOW,
        )?)
    }
}

/// Whether a process may still be writing the entry `rel` of `root`, asked when its
/// creation is seen: `Some(false)` when it is complete as it stands (not a regular file,
/// or a regular file that nobody holds open for writing: a name made by `link()`, or a
/// writer already done), `Some(true)` while a process holds it open for writing, `None`
/// when that cannot be told (it is gone, or the filesystem or the file's owner refuses a
/// lease to this process).
///
/// The kernel grants a read lease only on a file no one has open for writing (or mapped
/// writable), which is exactly the question; the lease is released at once. Were a writer
/// to open the file in between, its open waits those few microseconds, and the lease
/// break's signal is one whose default is to be ignored (`SIGURG`), so nothing in this
/// process reacts to it.
pub(crate) fn being_written(root: &Root, rel: &RelPath) -> Option<bool> {
    use std::os::fd::AsRawFd;
    // Linux's F_SETSIG (the same number on every architecture), which libc does not name.
    const F_SETSIG: libc::c_int = 10;
    let st = root.stat(rel).ok()?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Some(false);
    }
    let f = root.open_file(rel).ok()?;
    let fd = f.as_raw_fd();
    // SAFETY: `fd` is an open descriptor owned by `f` for the whole block; these fcntl
    // commands take integer arguments and touch no memory of ours.
    unsafe {
        if libc::fcntl(fd, F_SETSIG, libc::SIGURG) == -1 {
            return None;
        }
        if libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK) == 0 {
            libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK);
            return Some(false);
        }
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(c) if c == Errno::AGAIN.raw_os_error() => Some(true),
        _ => None,
    }
}

/// How a directory is opened to be walked: read-only, never through a symlink.
pub(crate) const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Opens the directory `name` of `dir`, made first (mode 0700) if it is missing; never
/// following a symlink. Its making is not flushed: callers that need it durable say so.
pub(crate) fn ensure_subdir(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<OwnedFd> {
    match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => return Err(e.into()),
    }
    open_subdir(dir, name)
}

/// Opens the directory `path` (relative, `/`-separated) beneath `dir` to walk it, without
/// following any symlink.
pub(crate) fn open_subdir(dir: BorrowedFd<'_>, path: &[u8]) -> io::Result<OwnedFd> {
    resolve(dir, path, DIR_FLAGS)
}

/// Opens `path` (relative, `/`-separated) beneath `dir` without following any symlink.
pub(crate) fn resolve(dir: BorrowedFd<'_>, path: &[u8], flags: OFlags) -> io::Result<OwnedFd> {
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        match rustix::fs::openat2(
            dir,
            path,
            flags,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        ) {
            Err(Errno::NOSYS) => NO_OPENAT2.store(true, Ordering::Relaxed),
            // EAGAIN: a concurrent rename could have fooled the lookup; the component walk
            // is just as safe, only slower.
            Err(Errno::AGAIN) => {
                return resolve_walk(dir, path, flags);
            }
            other => return Ok(other?),
        }
    }
    resolve_walk(dir, path, flags)
}

fn resolve_walk(dir: BorrowedFd<'_>, path: &[u8], flags: OFlags) -> io::Result<OwnedFd> {
    let comps: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
    let mut cur: Option<OwnedFd> = None;
    for (i, comp) in comps.iter().enumerate() {
        if comp.is_empty() || *comp == b"." || *comp == b".." {
            return Err(io::Error::from_raw_os_error(libc_exdev()));
        }
        let at = cur.as_ref().map(|f| f.as_fd()).unwrap_or(dir);
        let last = i + 1 == comps.len();
        let f = if last {
            flags | OFlags::NOFOLLOW
        } else {
            DIR_FLAGS
        };
        cur = Some(rustix::fs::openat(at, *comp, f, Mode::empty())?);
    }
    cur.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty path"))
}

fn libc_exdev() -> i32 {
    Errno::XDEV.raw_os_error()
}

/// Attributes of a stat result as the mirror compares them.
pub(crate) fn meta_of(st: &Stat) -> Meta {
    Meta {
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime: Mtime {
            sec: st.st_mtime,
            nsec: st.st_mtime_nsec as u32,
        },
        xattrs: Default::default(),
    }
}

/// How the inode of a stat result is laid out: its names and blocks.
pub(crate) fn shape_of(st: &Stat) -> Shape {
    // `st_nlink` is 32 bits wide on some architectures.
    #[allow(clippy::unnecessary_cast)]
    let nlink = st.st_nlink as u64;
    Shape {
        nlink,
        blocks: st.st_blocks as u64,
    }
}

/// The inode identity of an entry with more than one name.
pub(crate) fn link_key(st: &Stat) -> Option<LinkKey> {
    (st.st_nlink > 1).then_some(LinkKey {
        dev: st.st_dev,
        ino: st.st_ino,
    })
}

/// Whether the size, mtime or ctime changed between two stats of the same file: the
/// signal that a file was written while we read it.
pub(crate) fn changed(a: &Stat, b: &Stat) -> bool {
    a.st_size != b.st_size
        || a.st_mtime != b.st_mtime
        || a.st_mtime_nsec != b.st_mtime_nsec
        || a.st_ctime != b.st_ctime
        || a.st_ctime_nsec != b.st_ctime_nsec
        || a.st_ino != b.st_ino
}

pub(crate) fn timestamps(m: &Meta) -> Timestamps {
    let t = rustix::fs::Timespec {
        tv_sec: m.mtime.sec,
        tv_nsec: m.mtime.nsec as _,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Applies owner (when `owners`), mode and mtime to an open regular file, in the order that
/// keeps set-id bits (chown clears them, so chmod comes after).
pub(crate) fn set_meta_fd(
    fd: BorrowedFd<'_>,
    meta: &Meta,
    owners: bool,
    xattrs: Option<XattrsTo<'_>>,
) -> io::Result<()> {
    if owners {
        rustix::fs::fchown(
            fd,
            Some(rustix::fs::Uid::from_raw(meta.uid)),
            Some(rustix::fs::Gid::from_raw(meta.gid)),
        )?;
    }
    // After the owner (a chown drops file capabilities), before the mode (an ACL sets the
    // group bits, which the mode then states exactly).
    if let Some((x, policy)) = xattrs {
        crate::tree::xattr::apply(crate::tree::xattr::At::Fd(fd), x, policy)?;
    }
    rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.mode))?;
    rustix::fs::futimens(fd, &timestamps(meta))?;
    Ok(())
}

/// The extended attributes an entry gets, and the namespaces they replace.
pub(crate) type XattrsTo<'a> = (
    &'a crate::model::xattrs::Xattrs,
    &'a crate::model::xattrs::Policy,
);

/// Applies metadata to `name` in `dir` without following it if it is a symlink.
/// `with_mode` is false for symlinks, which have no mode of their own on Linux.
pub(crate) fn set_meta_at(
    dir: BorrowedFd<'_>,
    name: &[u8],
    meta: &Meta,
    owners: bool,
    with_mode: bool,
    xattrs: Option<XattrsTo<'_>>,
) -> io::Result<()> {
    if owners {
        rustix::fs::chownat(
            dir,
            name,
            Some(rustix::fs::Uid::from_raw(meta.uid)),
            Some(rustix::fs::Gid::from_raw(meta.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
    }
    if let Some((x, policy)) = xattrs {
        crate::tree::xattr::apply(crate::tree::xattr::At::Name(dir, name), x, policy)?;
    }
    if with_mode {
        match rustix::fs::chmodat(
            dir,
            name,
            Mode::from_raw_mode(meta.mode),
            AtFlags::SYMLINK_NOFOLLOW,
        ) {
            Err(Errno::NOSYS | Errno::NOTSUP | Errno::INVAL) => {
                // Kernels before fchmodat2: check the type, then chmod (the name is in a
                // directory only we write to, and we never chmod a symlink).
                let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
                if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
                    return Err(io::Error::new(io::ErrorKind::InvalidInput, "is a symlink"));
                }
                rustix::fs::chmodat(dir, name, Mode::from_raw_mode(meta.mode), AtFlags::empty())?;
            }
            other => other?,
        }
    }
    rustix::fs::utimensat(dir, name, &timestamps(meta), AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}

/// Removes `name` in `dir` and, if it is a directory, everything beneath it, never
/// following symlinks. Returns the number of entries removed; a missing name is 0.
pub(crate) fn remove_tree(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<u64> {
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
        return Ok(1);
    }
    let sub = match rustix::fs::openat(dir, name, DIR_FLAGS, Mode::empty()) {
        Err(Errno::ACCESS) => {
            // A directory we may not read (non-root receiver): make it ours to empty.
            rustix::fs::chmodat(dir, name, Mode::from_raw_mode(0o700), AtFlags::empty())?;
            rustix::fs::openat(dir, name, DIR_FLAGS, Mode::empty())?
        }
        other => other?,
    };
    let mut n = 0;
    let names = list_dir(sub.as_fd())?;
    for child in names {
        match remove_tree(sub.as_fd(), &child) {
            Err(e) if e.raw_os_error() == Some(Errno::ACCESS.raw_os_error()) => {
                rustix::fs::fchmod(&sub, Mode::from_raw_mode(0o700))?;
                n += remove_tree(sub.as_fd(), &child)?;
            }
            other => n += other?,
        }
    }
    rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?;
    Ok(n + 1)
}

/// The names in a directory, without `.` and `..`.
pub(crate) fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    let dup = rustix::fs::openat(
        dir,
        c".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut d = rustix::fs::Dir::new(dup)?;
    let mut names = Vec::new();
    while let Some(ent) = d.read() {
        let ent = ent?;
        let name = ent.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    Ok(names)
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh temporary name: the recognisable prefix and 16 hex digits.
pub(crate) fn temp_name() -> Vec<u8> {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut h = blake3::Hasher::new();
    h.update(&std::process::id().to_le_bytes());
    h.update(&n.to_le_bytes());
    h.update(&now.to_le_bytes());
    let d = h.finalize();
    let mut name = TEMP_PREFIX.to_vec();
    for b in &d.as_bytes()[..8] {
        name.extend_from_slice(format!("{b:02x}").as_bytes());
    }
    name
}

/// Creates a new temporary file in `dir` (exclusive, never through a symlink).
pub(crate) fn create_temp(dir: BorrowedFd<'_>) -> io::Result<(File, Vec<u8>)> {
    loop {
        let name = temp_name();
        match rustix::fs::openat(
            dir,
            name.as_slice(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        ) {
            Ok(fd) => return Ok((File::from(fd), name)),
            Err(Errno::EXIST) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// True when this process may give files away (`chown` to any owner).
pub(crate) fn can_chown() -> bool {
    rustix::process::geteuid().is_root()
}

/// Raises the soft open-file limit to the hard limit; batches keep many temps open.
pub(crate) fn raise_fd_limit() {
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    if lim.current < lim.maximum {
        let _ = rustix::process::setrlimit(
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_in_paths_are_never_followed() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(outside.path(), t.path().join("door")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), t.path().join("f")).unwrap();
        let root = Root::open(t.path()).unwrap();
        assert!(root.open_dir(&RelPath::new("door").unwrap()).is_err());
        assert!(
            root.open_file(&RelPath::new("door/secret").unwrap())
                .is_err()
        );
        assert!(root.open_file(&RelPath::new("f").unwrap()).is_err());
        assert!(resolve_walk(root.fd(), b"door/secret", OFlags::RDONLY).is_err());
        assert!(resolve_walk(root.fd(), b"f", OFlags::RDONLY).is_err());
    }

    #[test]
    fn remove_tree_does_not_follow_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"k").unwrap();
        std::fs::create_dir_all(t.path().join("d/e")).unwrap();
        std::fs::write(t.path().join("d/e/f"), b"f").unwrap();
        std::os::unix::fs::symlink(outside.path(), t.path().join("d/link")).unwrap();
        let root = Root::open(t.path()).unwrap();
        assert_eq!(remove_tree(root.fd(), b"d").unwrap(), 4);
        assert!(outside.path().join("keep").exists());
        assert!(!t.path().join("d").exists());
        assert_eq!(remove_tree(root.fd(), b"d").unwrap(), 0);
    }

    #[test]
    fn a_file_is_being_written_only_while_someone_holds_it_open_for_writing() {
        let t = tempfile::tempdir().unwrap();
        let root = Root::open(t.path()).unwrap();
        let rel = |s: &str| RelPath::new(s).unwrap();
        let w = std::fs::File::create(t.path().join("open")).unwrap();
        std::fs::write(t.path().join("done"), b"written and closed").unwrap();
        std::fs::hard_link(t.path().join("done"), t.path().join("linked")).unwrap();
        std::os::unix::fs::symlink("done", t.path().join("sym")).unwrap();
        // Leases need the file's owner (or CAP_LEASE): the test's own files are.
        assert_eq!(being_written(&root, &rel("open")), Some(true));
        assert_eq!(being_written(&root, &rel("done")), Some(false));
        assert_eq!(being_written(&root, &rel("linked")), Some(false));
        assert_eq!(being_written(&root, &rel("sym")), Some(false));
        assert_eq!(being_written(&root, &rel("gone")), None);
        // A reader does not count; a second name of an open file does.
        let _r = std::fs::File::open(t.path().join("done")).unwrap();
        assert_eq!(being_written(&root, &rel("done")), Some(false));
        std::fs::hard_link(t.path().join("open"), t.path().join("open2")).unwrap();
        assert_eq!(being_written(&root, &rel("open2")), Some(true));
        drop(w);
        assert_eq!(being_written(&root, &rel("open2")), Some(false));
        // The probe leaves no lease behind: a writer opens at once.
        let start = std::time::Instant::now();
        std::fs::OpenOptions::new()
            .write(true)
            .open(t.path().join("done"))
            .unwrap();
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn temp_names_are_unique_and_recognisable() {
        let a = temp_name();
        let b = temp_name();
        assert_ne!(a, b);
        assert!(crate::model::path::is_temp_name(&a));
        assert_eq!(a.len(), TEMP_PREFIX.len() + 16);
    }
}
