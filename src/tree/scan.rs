//! Scanning a tree into a [`Manifest`], entirely through directory handles (`openat`,
//! `fstatat` with `AT_SYMLINK_NOFOLLOW`), so a symlink is recorded, never followed, and a
//! rename racing the scan cannot lead it outside the root.

use crate::model::delta::{chunk_size, hash_chunks_paced};
use crate::model::filter::Filter;
use crate::model::manifest::{
    Entry, Hash, Kind, Manifest, Meta, ScanError, Scope, Special, SpecialKind,
};
use crate::model::manifest::{RESERVED_AREA, RESERVED_TEMP, Skipped};
use crate::model::path::{RESERVED, RelPath, is_temp_name};
use crate::tree::fsroot::{Root, changed, link_key, meta_of, shape_of};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Clone, Default)]
pub(crate) struct ScanOptions {
    /// Hash every regular file (for `--checksum` and verify).
    pub checksum: bool,
    /// Bytes per second hashing may read, 0 for no limit. A limited scan also hashes on
    /// one thread at the lowest CPU priority: a background verify must not slow replication.
    pub hash_rate: u64,
    pub filter: Filter,
    /// Delete leftover temporary files (the standby does; the primary only skips them).
    pub remove_temps: bool,
    /// This is the primary's tree: names reserved for hotsync's own files are reported
    /// as not mirrored ([`Skipped`]), since a user's entry may carry one.
    pub primary: bool,
    /// The extended attributes and ACLs read with each entry (their digest goes in
    /// `Meta::xattrs`); none are read when it keeps nothing.
    pub xattrs: crate::model::xattrs::Policy,
    /// Leave symlinks out of hard-link groups: each is its own inode (for a standby older
    /// than protocol 6, which can neither report nor make a symlink with several names).
    pub split_symlinks: bool,
}

/// Whether `name` in the directory `dir` (at `dir_path`) belongs to hotsync rather than
/// to the tree: the root's `.hotsync`, or a name of the exact form of its temps. `None`
/// for any other name. For a reserved one, the entries the primary reports as not
/// mirrored (those a user may have put there); on the standby, a leftover temp is
/// removed here when `opts.remove_temps` (counted in `removed`).
pub(crate) fn reserved_name(
    dir: BorrowedFd<'_>,
    dir_path: &RelPath,
    name: &[u8],
    opts: &ScanOptions,
    removed: &mut u64,
) -> Option<Vec<Skipped>> {
    if dir_path.is_root() && name == RESERVED {
        return Some(if opts.primary {
            crate::tree::reserved::foreign_entries(dir)
                .into_iter()
                .map(|path| Skipped {
                    path,
                    kind: RESERVED_AREA,
                })
                .collect()
        } else {
            Vec::new()
        });
    }
    if !is_temp_name(name) {
        return None;
    }
    if opts.remove_temps && rustix::fs::unlinkat(dir, name, AtFlags::empty()).is_ok() {
        *removed += 1;
    }
    let path = dir_path.join(name).ok();
    Some(match path {
        Some(path) if opts.primary && !opts.filter.excludes(&path, false) => vec![Skipped {
            path,
            kind: RESERVED_TEMP,
        }],
        _ => Vec::new(),
    })
}

#[derive(Debug, Default)]
pub(crate) struct ScanOutcome {
    /// The entries, errors and special files (which the mirror skips) found.
    pub manifest: Manifest,
    /// Entries whose names are reserved for hotsync's own files (on the primary).
    pub skipped: Vec<Skipped>,
    pub temps_removed: u64,
    /// Bytes read to hash content.
    pub bytes_hashed: u64,
}

#[cfg(test)]
/// Scans the tree under `root`. Per-entry problems land in `manifest.errors`; only a
/// failure to read the root itself is an error.
pub(crate) fn scan(
    root: &Root,
    opts: &ScanOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> io::Result<ScanOutcome> {
    scan_scopes(root, &[(RelPath::root(), Scope::Tree)], opts, progress)
}

/// Scans only the given paths: each one's own entry, and for a `Tree` scope everything
/// beneath it. A path that does not exist (or lies under an excluded or missing parent)
/// contributes nothing, which is how the caller learns it is gone.
pub(crate) fn scan_scopes(
    root: &Root,
    scopes: &[(RelPath, Scope)],
    opts: &ScanOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> io::Result<ScanOutcome> {
    let mut out = ScanOutcome::default();
    for (path, scope) in crate::model::manifest::normalize_scopes(scopes) {
        if path.is_root() {
            out.manifest.entries.push(root_entry(root.fd(), opts)?);
            if scope == Scope::Tree {
                walk(root.open_dir(&path)?, path, opts, &mut out, progress)?;
            }
            continue;
        }
        if path.is_reserved() || is_temp_name(path.name()) || excluded_ancestor(&opts.filter, &path)
        {
            continue;
        }
        let (parent, name) = path.split();
        let dir = match root.open_dir(&parent) {
            Ok(d) => d,
            // A parent that is gone or is not a directory: the path does not exist.
            Err(e) if is_absent(&e) => continue,
            Err(e) => {
                out.manifest.errors.push(ScanError {
                    path: parent,
                    error: format!("cannot open directory: {e}"),
                });
                continue;
            }
        };
        if let Some(sub) = visit(dir.as_fd(), name, &path, opts, &mut out)
            && scope == Scope::Tree
        {
            walk(sub, path, opts, &mut out, progress)?;
        }
    }
    out.manifest.sort();
    if opts.checksum {
        out.bytes_hashed = hash_all(root, &mut out.manifest, opts.hash_rate);
    }
    progress(out.manifest.entries.len() as u64);
    Ok(out)
}

/// Whether `e` says the path is not there (gone, or a parent is not a directory).
pub(crate) fn is_absent(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(c) if c == Errno::NOENT.raw_os_error() || c == Errno::NOTDIR.raw_os_error() || c == Errno::LOOP.raw_os_error()
    )
}

/// True when a directory above `path` is excluded (so `path` is never scanned).
fn excluded_ancestor(filter: &Filter, path: &RelPath) -> bool {
    let mut p = path.split().0;
    while !p.is_root() {
        if filter.excludes(&p, true) {
            return true;
        }
        p = p.split().0;
    }
    false
}

/// What one name in a directory is, as the mirror sees it.
pub(crate) enum Found {
    Entry(Entry),
    /// Excluded, or vanished since the listing.
    Nothing,
    /// A socket, fifo or device node: not mirrored, but seen.
    Special(Special),
    Error(ScanError),
}

/// Looks at the entry `name` in `dir` (at `path`), never following it.
pub(crate) fn stat_entry(
    dir: BorrowedFd<'_>,
    name: &[u8],
    path: &RelPath,
    opts: &ScanOptions,
) -> Found {
    let filter = &opts.filter;
    let error = |error: String| {
        Found::Error(ScanError {
            path: path.clone(),
            error,
        })
    };
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Found::Nothing, // vanished since the listing
        Err(e) => return error(io::Error::from(e).to_string()),
    };
    let ft = FileType::from_raw_mode(st.st_mode);
    if filter.excludes(path, ft == FileType::Directory) {
        return Found::Nothing;
    }
    let kind = match ft {
        FileType::RegularFile => Kind::File {
            size: st.st_size as u64,
            hash: None,
        },
        FileType::Directory => Kind::Dir,
        FileType::Symlink => match rustix::fs::readlinkat(dir, name, Vec::new()) {
            Ok(t) => Kind::Symlink {
                target: t.into_bytes(),
            },
            Err(e) => return error(format!("cannot read symlink: {}", io::Error::from(e))),
        },
        other => {
            let kind = match other {
                FileType::Socket => SpecialKind::Socket,
                FileType::Fifo => SpecialKind::Fifo,
                FileType::CharacterDevice => SpecialKind::CharDevice,
                FileType::BlockDevice => SpecialKind::BlockDevice,
                _ => return error(format!("unknown file type (mode {:o})", st.st_mode)),
            };
            return Found::Special(Special {
                path: path.clone(),
                kind,
                rdev: st.st_rdev,
            });
        }
    };
    let link = match ft {
        FileType::RegularFile => link_key(&st),
        FileType::Symlink if !opts.split_symlinks => link_key(&st),
        _ => None,
    };
    let mut meta = meta_of(&st);
    match crate::tree::xattr::read(crate::tree::xattr::At::Name(dir, name), &opts.xattrs) {
        Ok(x) => meta.xattrs = x.sum(),
        Err(e) if e.raw_os_error() == Some(Errno::NOENT.raw_os_error()) => return Found::Nothing,
        Err(e) => return error(format!("cannot read extended attributes: {e}")),
    }
    Found::Entry(Entry {
        path: path.clone(),
        kind,
        meta,
        link,
        shape: shape_of(&st),
    })
}

/// The entry of the tree's root directory, open as `fd`.
pub(crate) fn root_entry(fd: BorrowedFd<'_>, opts: &ScanOptions) -> io::Result<Entry> {
    let st = rustix::fs::fstat(fd)?;
    let xattrs = crate::tree::xattr::read(crate::tree::xattr::At::Fd(fd), &opts.xattrs)?;
    Ok(Entry {
        path: RelPath::root(),
        kind: Kind::Dir,
        meta: Meta {
            xattrs: xattrs.sum(),
            ..meta_of(&st)
        },
        link: None,
        shape: shape_of(&st),
    })
}

/// Opens the directory `name` in `dir` without following a symlink.
pub(crate) fn open_child_dir(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Records the entry `name` in `dir` (at `path`), unless it is excluded, vanished or not
/// mirrorable. For a directory, returns its open handle to walk.
fn visit(
    dir: BorrowedFd<'_>,
    name: &[u8],
    path: &RelPath,
    opts: &ScanOptions,
    out: &mut ScanOutcome,
) -> Option<OwnedFd> {
    let entry = match stat_entry(dir, name, path, opts) {
        Found::Entry(e) => e,
        Found::Nothing => return None,
        Found::Special(s) => {
            out.manifest.specials.push(s);
            return None;
        }
        Found::Error(e) => {
            out.manifest.errors.push(e);
            return None;
        }
    };
    let mut sub = None;
    if entry.is_dir() {
        match open_child_dir(dir, name) {
            Ok(fd) => sub = Some(fd),
            Err(e) => out.manifest.errors.push(ScanError {
                path: path.clone(),
                error: format!("cannot open directory: {e}"),
            }),
        }
    }
    out.manifest.entries.push(entry);
    sub
}

/// Walks everything beneath the open directory `fd` (at `start`). Only a failure to list
/// the root is an error; other directories that cannot be listed are recorded.
fn walk(
    fd: OwnedFd,
    start: RelPath,
    opts: &ScanOptions,
    out: &mut ScanOutcome,
    progress: &(dyn Fn(u64) + Sync),
) -> io::Result<()> {
    let mut stack: Vec<(OwnedFd, RelPath)> = vec![(fd, start)];
    while let Some((fd, dir_path)) = stack.pop() {
        let names = match crate::tree::fsroot::list_dir(fd.as_fd()) {
            Ok(n) => n,
            Err(e) if dir_path.is_root() => return Err(e),
            Err(e) => {
                out.manifest.errors.push(ScanError {
                    path: dir_path,
                    error: format!("cannot list directory: {e}"),
                });
                continue;
            }
        };
        for name in names {
            if let Some(skipped) =
                reserved_name(fd.as_fd(), &dir_path, &name, opts, &mut out.temps_removed)
            {
                out.skipped.extend(skipped);
                continue;
            }
            let path = match dir_path.join(&name) {
                Ok(p) => p,
                Err(e) => {
                    out.manifest.errors.push(ScanError {
                        path: dir_path.clone(),
                        error: crate::model::path::unmirrorable(&dir_path, &name, &e),
                    });
                    continue;
                }
            };
            if let Some(sub) = visit(fd.as_fd(), &name, &path, opts, out) {
                stack.push((sub, path));
            }
            if out.manifest.entries.len().is_multiple_of(4096) {
                progress(out.manifest.entries.len() as u64);
            }
        }
    }
    Ok(())
}

/// Hashes every regular file in the manifest, in parallel; a file that cannot be read
/// moves to `errors` (and out of the entries, so it is neither sent nor deleted).
fn hash_all(root: &Root, m: &mut Manifest, rate: u64) -> u64 {
    let (bytes, mut failed) = hash_in_place(root, &mut m.entries, rate);
    failed.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
    for (i, err) in failed {
        m.entries.remove(i);
        m.errors.push(err);
    }
    bytes
}

/// Hashes the regular files among `entries` in parallel, updating their size and
/// attributes to what was hashed. Returns the bytes read and the entries (by index) that
/// could not be read, which the caller must drop: nothing about them is known.
pub(crate) fn hash_in_place(
    root: &Root,
    entries: &mut [Entry],
    rate: u64,
) -> (u64, Vec<(usize, ScanError)>) {
    let next = AtomicU64::new(0);
    let bytes = AtomicU64::new(0);
    let failed = Mutex::new(Vec::new());
    let todo: Vec<(usize, RelPath)> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e.kind, Kind::File { .. }))
        .map(|(i, e)| (i, e.path.clone()))
        .collect();
    let threads = if rate > 0 {
        1
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .min(4)
            .min(todo.len())
    };
    let pacer = Pacer::new(rate);
    let entries = Mutex::new(entries);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                if rate > 0 {
                    // Linux applies this to the calling thread only.
                    let _ = rustix::process::setpriority_process(None, 19);
                }
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some((i, path)) = todo.get(k) else { break };
                    match hash_file_paced(root, path, &|n| pacer.spend(n)) {
                        Ok((st, hash)) => {
                            bytes.fetch_add(st.st_size as u64, Ordering::Relaxed);
                            let mut e = entries.lock().unwrap();
                            let e = &mut e[*i];
                            e.kind = Kind::File {
                                size: st.st_size as u64,
                                hash: Some(hash),
                            };
                            e.meta = Meta {
                                xattrs: e.meta.xattrs,
                                ..meta_of(&st)
                            };
                            e.shape = shape_of(&st);
                        }
                        Err(err) => failed.lock().unwrap().push((
                            *i,
                            ScanError {
                                path: path.clone(),
                                error: err.to_string(),
                            },
                        )),
                    }
                }
            });
        }
    });
    (bytes.into_inner(), failed.into_inner().unwrap())
}

/// Keeps reading at or below a byte rate, by sleeping.
struct Pacer {
    rate: u64,
    start: std::time::Instant,
    done: AtomicU64,
}

impl Pacer {
    fn new(rate: u64) -> Self {
        Pacer {
            rate,
            start: std::time::Instant::now(),
            done: AtomicU64::new(0),
        }
    }

    fn spend(&self, n: usize) {
        if self.rate == 0 {
            return;
        }
        let done = self.done.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        let due = std::time::Duration::from_secs_f64(done as f64 / self.rate as f64);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

fn hash_file_paced(
    root: &Root,
    path: &RelPath,
    pace: &dyn Fn(usize),
) -> io::Result<(rustix::fs::Stat, Hash)> {
    let f = root.open_file(path)?;
    for _ in 0..5 {
        let before = rustix::fs::fstat(&f)?;
        let size = before.st_size as u64;
        let (_, digest) = if crate::tree::sparse::has_holes(&before) {
            hash_chunks_paced(
                &crate::tree::sparse::Holey(&f),
                size,
                chunk_size(size),
                pace,
            )?
        } else {
            hash_chunks_paced(&f, size, chunk_size(size), pace)?
        };
        let after = rustix::fs::fstat(&f)?;
        if !changed(&before, &after) {
            return Ok((after, digest));
        }
    }
    Err(io::Error::other("file keeps changing while being read"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn a_symlink_with_several_names_has_a_link_key_unless_split() {
        let t = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("x", t.path().join("sl")).unwrap();
        rustix::fs::linkat(
            rustix::fs::CWD,
            t.path().join("sl").as_path(),
            rustix::fs::CWD,
            t.path().join("sl2").as_path(),
            AtFlags::empty(),
        )
        .unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            t.path().join("fifo").as_path(),
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let root = Root::open(t.path()).unwrap();
        let scan_with = |split_symlinks| {
            let o = ScanOptions {
                split_symlinks,
                ..Default::default()
            };
            scan(&root, &o, &|_| {}).unwrap().manifest
        };
        let m = scan_with(false);
        let (a, b) = (m.get(&p("sl")).unwrap(), m.get(&p("sl2")).unwrap());
        assert!(a.link.is_some() && a.link == b.link);
        assert_eq!(a.shape.nlink, 2);
        assert_eq!(m.specials.len(), 1);
        assert_eq!(m.specials[0].kind, SpecialKind::Fifo);
        // For a standby before protocol 6: each symlink alone.
        let m = scan_with(true);
        assert!(m.get(&p("sl")).unwrap().link.is_none());
    }

    #[test]
    fn scoped_scans_see_only_their_paths() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("d/e")).unwrap();
        std::fs::write(t.path().join("d/e/f"), b"f").unwrap();
        std::fs::write(t.path().join("g"), b"g").unwrap();
        let root = Root::open(t.path()).unwrap();
        let o = ScanOptions::default();
        let got = |scopes: &[(RelPath, Scope)]| -> Vec<String> {
            scan_scopes(&root, scopes, &o, &|_| {})
                .unwrap()
                .manifest
                .entries
                .iter()
                .map(|e| e.path.display())
                .collect()
        };
        assert_eq!(got(&[(p("d"), Scope::Entry)]), ["d"]);
        assert_eq!(got(&[(p("d"), Scope::Tree)]), ["d", "d/e", "d/e/f"]);
        assert_eq!(
            got(&[(p("d/e/f"), Scope::Entry), (RelPath::root(), Scope::Entry)]),
            [".", "d/e/f"]
        );
        assert!(got(&[(p("missing/x"), Scope::Tree), (p("g/x"), Scope::Entry)]).is_empty());
        assert_eq!(got(&[(RelPath::root(), Scope::Tree)]).len(), 5);
    }
}
