//! Scanning a tree into a [`Manifest`], entirely through directory handles (`openat`,
//! `fstatat` with `AT_SYMLINK_NOFOLLOW`), so a symlink is recorded, never followed, and a
//! rename racing the scan cannot lead it outside the root.

use crate::delta::{chunk_size, hash_chunks};
use crate::filter::Filter;
use crate::fsroot::{Root, changed, link_key, meta_of};
use crate::manifest::{Entry, Hash, Kind, Manifest, ScanError};
use crate::path::{RESERVED, RelPath, is_temp_name};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Clone, Default)]
pub struct ScanOptions {
    /// Hash every regular file (for `--checksum` and verify).
    pub checksum: bool,
    pub filter: Filter,
    /// Delete leftover temporary files (the standby does; the primary only skips them).
    pub remove_temps: bool,
}

/// An entry the mirror cannot carry (socket, fifo, device), skipped with a warning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub path: RelPath,
    pub kind: &'static str,
}

#[derive(Debug, Default)]
pub struct ScanOutcome {
    pub manifest: Manifest,
    pub skipped: Vec<Skipped>,
    pub temps_removed: u64,
    /// Bytes read to hash content.
    pub bytes_hashed: u64,
}

/// Scans the tree under `root`. Per-entry problems land in `manifest.errors`; only a
/// failure to read the root itself is an error.
pub fn scan(
    root: &Root,
    opts: &ScanOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> io::Result<ScanOutcome> {
    let mut out = ScanOutcome::default();
    let st = rustix::fs::fstat(root.fd())?;
    out.manifest.entries.push(Entry {
        path: RelPath::root(),
        kind: Kind::Dir,
        meta: meta_of(&st),
        link: None,
    });
    let mut stack: Vec<(OwnedFd, RelPath)> =
        vec![(root.open_dir(&RelPath::root())?, RelPath::root())];
    while let Some((fd, dir_path)) = stack.pop() {
        let names = match crate::fsroot::list_dir(fd.as_fd()) {
            Ok(n) => n,
            Err(e) => {
                if dir_path.is_root() {
                    return Err(e);
                }
                out.manifest.errors.push(ScanError {
                    path: dir_path,
                    error: format!("cannot list directory: {e}"),
                });
                continue;
            }
        };
        for name in names {
            if dir_path.is_root() && name == RESERVED {
                continue;
            }
            if is_temp_name(&name) {
                if opts.remove_temps
                    && rustix::fs::unlinkat(&fd, name.as_slice(), AtFlags::empty()).is_ok()
                {
                    out.temps_removed += 1;
                }
                continue;
            }
            let Ok(path) = dir_path.join(&name) else {
                out.manifest.errors.push(ScanError {
                    path: dir_path.clone(),
                    error: "a name in this directory is too long to mirror".into(),
                });
                continue;
            };
            let st = match rustix::fs::statat(&fd, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(Errno::NOENT) => continue, // vanished since the listing
                Err(e) => {
                    out.manifest.errors.push(ScanError {
                        path,
                        error: io::Error::from(e).to_string(),
                    });
                    continue;
                }
            };
            let ft = FileType::from_raw_mode(st.st_mode);
            if opts.filter.excludes(&path, ft == FileType::Directory) {
                continue;
            }
            let kind = match ft {
                FileType::RegularFile => Kind::File {
                    size: st.st_size as u64,
                    hash: None,
                },
                FileType::Directory => {
                    match rustix::fs::openat(
                        &fd,
                        name.as_slice(),
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    ) {
                        Ok(sub) => stack.push((sub, path.clone())),
                        Err(e) => out.manifest.errors.push(ScanError {
                            path: path.clone(),
                            error: format!("cannot open directory: {}", io::Error::from(e)),
                        }),
                    }
                    Kind::Dir
                }
                FileType::Symlink => match rustix::fs::readlinkat(&fd, name.as_slice(), Vec::new())
                {
                    Ok(t) => Kind::Symlink {
                        target: t.into_bytes(),
                    },
                    Err(e) => {
                        out.manifest.errors.push(ScanError {
                            path,
                            error: format!("cannot read symlink: {}", io::Error::from(e)),
                        });
                        continue;
                    }
                },
                other => {
                    out.skipped.push(Skipped {
                        path,
                        kind: match other {
                            FileType::Socket => "socket",
                            FileType::Fifo => "fifo",
                            FileType::CharacterDevice => "character device",
                            FileType::BlockDevice => "block device",
                            _ => "special file",
                        },
                    });
                    continue;
                }
            };
            let link = if ft == FileType::RegularFile {
                link_key(&st)
            } else {
                None
            };
            out.manifest.entries.push(Entry {
                path,
                kind,
                meta: meta_of(&st),
                link,
            });
            if out.manifest.entries.len() % 4096 == 0 {
                progress(out.manifest.entries.len() as u64);
            }
        }
    }
    out.manifest.sort();
    if opts.checksum {
        out.bytes_hashed = hash_all(root, &mut out.manifest);
    }
    progress(out.manifest.entries.len() as u64);
    Ok(out)
}

/// Hashes every regular file in the manifest, in parallel; a file that cannot be read
/// moves to `errors` (and out of the entries, so it is neither sent nor deleted).
fn hash_all(root: &Root, m: &mut Manifest) -> u64 {
    let next = AtomicU64::new(0);
    let bytes = AtomicU64::new(0);
    let failed = Mutex::new(Vec::new());
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .min(4);
    let entries = Mutex::new(&mut m.entries);
    let todo: Vec<(usize, RelPath)> = entries
        .lock()
        .unwrap()
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e.kind, Kind::File { .. }))
        .map(|(i, e)| (i, e.path.clone()))
        .collect();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some((i, path)) = todo.get(k) else { break };
                    match hash_file(root, path) {
                        Ok((st, hash)) => {
                            bytes.fetch_add(st.st_size as u64, Ordering::Relaxed);
                            let mut e = entries.lock().unwrap();
                            let e = &mut e[*i];
                            e.kind = Kind::File {
                                size: st.st_size as u64,
                                hash: Some(hash),
                            };
                            e.meta = meta_of(&st);
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
    let mut failed = failed.into_inner().unwrap();
    failed.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
    for (i, err) in failed {
        m.entries.remove(i);
        m.errors.push(err);
    }
    bytes.into_inner()
}

/// Hashes one file, re-reading it if it changed while being read.
pub fn hash_file(root: &Root, path: &RelPath) -> io::Result<(rustix::fs::Stat, Hash)> {
    let f = root.open_file(path)?;
    for _ in 0..5 {
        let before = rustix::fs::fstat(&f)?;
        let size = before.st_size as u64;
        let (_, digest) = hash_chunks(&f, size, chunk_size(size))?;
        let after = rustix::fs::fstat(&f)?;
        if !changed(&before, &after) {
            return Ok((after, digest));
        }
    }
    Err(io::Error::other("file keeps changing while being read"))
}
