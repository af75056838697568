//! Atomic, durable replacement of files on the standby, batched.
//!
//! Every file lands as a temp in the standby's own area `.hotsync/tmp/` (written,
//! attributes set), then a batch is committed: make the temps' data durable, rename each
//! over its target, make the renames durable, and only then report success. The area is
//! where no user's name can collide with a temp's; only a directory on another filesystem
//! than the root (a mount point inside the tree) gets its temps beside their targets. A small batch uses `fsync` per file and per
//! directory (the fast path for a single change); a large one uses two `syncfs` calls for
//! the whole batch instead of thousands of `fsync`s. A `kill -9` at any moment leaves each
//! target either old or new; leftover temps are removed when the standby next opens the
//! tree (and, beside their targets, by the next scan).

use crate::protocol::OpError;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

/// Up to this many files a batch is made durable file by file; beyond it, by `syncfs`.
pub const FSYNC_EACH: usize = 8;
/// A batch is committed once it holds this many files or bytes.
pub const BATCH_FILES: usize = 2048;
pub const BATCH_BYTES: u64 = 128 << 20;

/// A temp file (or symlink, or hard link) `temp` in `temp_dir`, waiting to be renamed over
/// `name` in `dir`.
pub struct Staged {
    pub id: u64,
    pub dir: Arc<OwnedFd>,
    /// Where the temp is: the standby's area, or `dir` itself (see [`TempPlace`]).
    pub temp_dir: Arc<OwnedFd>,
    pub temp: Vec<u8>,
    pub name: Vec<u8>,
    /// Kept open for a per-file `fsync` while the batch is small; `None` otherwise.
    pub file: Option<File>,
    pub bytes: u64,
}

/// The outcome of one operation.
pub type Outcome = (u64, Result<(), OpError>);

/// True for the errors of a full disk (blocks, inodes or quota).
pub fn is_no_space(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(c) if c == rustix::io::Errno::NOSPC.raw_os_error() || c == rustix::io::Errno::DQUOT.raw_os_error()
    )
}

#[derive(Default)]
pub struct Batch {
    items: Vec<Staged>,
    /// Operations already applied in place (mkdir, delete, chmod…) that need a sync.
    applied: Vec<u64>,
    failed: Vec<Outcome>,
    bytes: u64,
}

impl Batch {
    pub fn new() -> Self {
        Batch::default()
    }

    pub fn stage(&mut self, s: Staged) {
        self.bytes += s.bytes;
        self.items.push(s);
    }

    pub fn applied(&mut self, id: u64) {
        self.applied.push(id);
    }

    pub fn failed(&mut self, id: u64, error: OpError) {
        self.failed.push((id, Err(error)));
    }

    /// Records an in-place operation's result: applied (awaiting the sync) or failed.
    pub fn record(&mut self, id: u64, result: Result<(), OpError>) {
        match result {
            Ok(()) => self.applied(id),
            Err(e) => self.failed(id, e),
        }
    }

    /// Whether the next staged file should keep its descriptor for a per-file `fsync`.
    pub fn keep_fd(&self) -> bool {
        self.items.len() < FSYNC_EACH
    }

    pub fn should_commit(&self) -> bool {
        self.items.len() >= BATCH_FILES || self.bytes >= BATCH_BYTES
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty() && self.applied.is_empty() && self.failed.is_empty()
    }

    /// Makes everything in the batch durable and visible; returns one outcome per operation.
    pub fn commit(&mut self, root: BorrowedFd<'_>) -> Vec<Outcome> {
        let mut out = std::mem::take(&mut self.failed);
        let items = std::mem::take(&mut self.items);
        let applied = std::mem::take(&mut self.applied);
        self.bytes = 0;
        if items.is_empty() && applied.is_empty() {
            return out;
        }
        let per_file = applied.is_empty() && items.iter().all(|i| i.file.is_some());
        let mut result: Vec<Result<(), OpError>> = vec![Ok(()); items.len()];
        // Not durable: never retry-and-trust, send it again (or wait for space).
        let not_durable = |what: &str, e: rustix::io::Errno| {
            let e = std::io::Error::from(e);
            OpError {
                message: format!("not durable: {what} failed: {e}"),
                retry: true,
                no_space: is_no_space(&e),
            }
        };

        // 1. The temps' data.
        if per_file {
            for (i, it) in items.iter().enumerate() {
                if let Err(e) = rustix::fs::fsync(it.file.as_ref().unwrap()) {
                    result[i] = Err(not_durable("fsync", e));
                }
            }
        } else if let Err(e) = rustix::fs::syncfs(root) {
            result
                .iter_mut()
                .for_each(|r| *r = Err(not_durable("syncfs", e)));
        }
        // 2. The renames.
        for (i, it) in items.iter().enumerate() {
            if result[i].is_ok()
                && let Err(e) = rename_into_place(it)
            {
                // A rename refused by the filesystem is not worth a resend.
                let e = std::io::Error::from(e);
                result[i] = Err(OpError {
                    message: format!("cannot rename into place: {e}"),
                    retry: false,
                    no_space: is_no_space(&e),
                });
            }
            if result[i].is_err() {
                it.discard();
            }
        }
        // 3. The directory entries (and in-place changes).
        if per_file {
            let mut synced: Vec<*const OwnedFd> = Vec::new();
            for (i, it) in items.iter().enumerate() {
                let key = Arc::as_ptr(&it.dir);
                if result[i].is_err() || synced.contains(&key) {
                    continue;
                }
                synced.push(key);
                if let Err(e) = rustix::fs::fsync(it.dir.as_fd()) {
                    for (j, other) in items.iter().enumerate() {
                        if Arc::ptr_eq(&other.dir, &it.dir) && result[j].is_ok() {
                            result[j] = Err(not_durable("directory fsync", e));
                        }
                    }
                }
            }
        } else if let Err(e) = rustix::fs::syncfs(root) {
            result
                .iter_mut()
                .filter(|r| r.is_ok())
                .for_each(|r| *r = Err(not_durable("syncfs", e)));
            let mut failed = not_durable("syncfs", e);
            failed.retry = false;
            out.extend(applied.iter().map(|&id| (id, Err(failed.clone()))));
            return finish(out, items, result);
        }
        out.extend(applied.into_iter().map(|id| (id, Ok(()))));
        finish(out, items, result)
    }
}

impl Staged {
    /// Removes the temp (a failed or abandoned operation).
    pub fn discard(&self) {
        let _ = rustix::fs::unlinkat(
            &*self.temp_dir,
            self.temp.as_slice(),
            rustix::fs::AtFlags::empty(),
        );
    }
}

/// A batch dropped before its commit (the session failed or was fenced) leaves no temps.
impl Drop for Batch {
    fn drop(&mut self) {
        for it in &self.items {
            it.discard();
        }
    }
}

/// Renames the temp over its target. A receiver that is not root gives itself write
/// permission on a read-only target directory (its mode is put back with the directory's
/// attributes, which the primary sends after the directory's entries).
fn rename_into_place(it: &Staged) -> Result<(), rustix::io::Errno> {
    let rename = || {
        rustix::fs::renameat(
            &*it.temp_dir,
            it.temp.as_slice(),
            &*it.dir,
            it.name.as_slice(),
        )
    };
    match rename() {
        Err(rustix::io::Errno::ACCESS) => {
            let st = rustix::fs::fstat(&*it.dir)?;
            rustix::fs::fchmod(
                &*it.dir,
                rustix::fs::Mode::from_raw_mode((st.st_mode & 0o7777) | 0o700),
            )?;
            rename()
        }
        other => other,
    }
}

/// Where a standby makes the temps of one target directory: its area `.hotsync/tmp/`
/// when the directory is on the root's filesystem (a rename reaches it from there), else
/// the directory itself.
#[derive(Clone)]
pub struct TempPlace {
    area: Arc<OwnedFd>,
    dev: u64,
}

impl TempPlace {
    /// The area `area` (open), on the filesystem it is on.
    pub fn new(area: Arc<OwnedFd>) -> std::io::Result<TempPlace> {
        let dev = rustix::fs::fstat(&*area)?.st_dev;
        Ok(TempPlace { area, dev })
    }

    /// The area itself (to clear it).
    pub fn area(&self) -> BorrowedFd<'_> {
        self.area.as_fd()
    }

    /// Where the temps of files in `dir` go.
    #[allow(clippy::useless_conversion)]
    pub fn for_dir(&self, dir: &Arc<OwnedFd>) -> std::io::Result<Arc<OwnedFd>> {
        let dev = rustix::fs::fstat(&**dir)?.st_dev;
        Ok(if u64::from(dev) == u64::from(self.dev) {
            self.area.clone()
        } else {
            dir.clone()
        })
    }
}

/// Replaces the file `name` in `dir` with `data`, atomically and durably: a temp beside it
/// is written and fsynced, renamed over `name`, then the directory is fsynced. A crash
/// leaves the old content or the new, never a mix (a leftover temp carries the usual
/// prefix).
pub fn replace_file(dir: BorrowedFd<'_>, name: &[u8], data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let (mut f, temp) = crate::fsroot::create_temp(dir)?;
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

fn finish(
    mut out: Vec<Outcome>,
    items: Vec<Staged>,
    result: Vec<Result<(), OpError>>,
) -> Vec<Outcome> {
    out.extend(items.into_iter().zip(result).map(|(it, r)| (it.id, r)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsroot::{Root, create_temp};
    use std::io::Write;

    fn stage(b: &mut Batch, root: &Root, id: u64, name: &str, data: &[u8]) {
        let dir = Arc::new(root.open_dir(&crate::path::RelPath::root()).unwrap());
        let (mut f, temp) = create_temp(dir.as_fd()).unwrap();
        f.write_all(data).unwrap();
        let keep = b.keep_fd();
        b.stage(Staged {
            id,
            temp_dir: dir.clone(),
            dir,
            temp,
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
        for n in [1usize, FSYNC_EACH + 5] {
            let mut b = Batch::new();
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
        let mut b = Batch::new();
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
}
