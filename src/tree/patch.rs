//! Patching a large file of the standby in place, where its filesystem cannot clone it
//! (ext4), atomic across crashes (see [`crate::model::patch`]): what the patch overwrites
//! goes to a journal in `.hotsync/patch/`, made durable before the file is touched; once the
//! commit has made the patched file durable the journal is dropped, or kept in the undo
//! area while a window of consistent points is open. A journal found when the tree is
//! opened is a patch that did not finish: its file is put back as it was.
//!
//! A reader of the standby may see the file part-way through a patch; after a crash it
//! sees it whole, old or new.

use crate::model::patch::{Patch, overwritten};
use crate::model::path::RelPath;
use crate::model::undo::OldAttrs;
use crate::tree::fsroot::{self, Root};
use rustix::fs::{AtFlags, Mode, OFlags};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

/// The directory of the journals in the reserved area.
const DIR: &[u8] = b"patch";

/// A patch made, whose journal waits for the commit.
#[derive(Debug)]
pub(crate) struct Pending {
    /// The journal's name in the directory of journals.
    pub(crate) name: Vec<u8>,
}

fn journals(area: BorrowedFd<'_>, make: bool) -> io::Result<OwnedFd> {
    if make {
        fsroot::ensure_subdir(area, DIR)
    } else {
        fsroot::open_subdir(area, DIR)
    }
}

/// Patches `f`, the file at `path`, in place: `new` (offset, bytes) written, its length
/// made `size`, then `set_attrs` run on it. Its journal (with `old`, the attributes it had)
/// is durable first. A failure after the journal puts the file back before it returns.
pub(crate) fn patch(
    area: BorrowedFd<'_>,
    path: &RelPath,
    f: &File,
    new: &[(u64, Vec<u8>)],
    size: u64,
    old: OldAttrs,
    set_attrs: impl FnOnce(&File) -> io::Result<()>,
) -> io::Result<Pending> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let st = rustix::fs::fstat(f)?;
    let old_size = st.st_size as u64;
    let spans: Vec<(u64, u64)> = new.iter().map(|(o, b)| (*o, b.len() as u64)).collect();
    let mut ranges = Vec::new();
    for (o, len) in overwritten(&spans, old_size) {
        let mut b = vec![0u8; len as usize];
        f.read_exact_at(&mut b, o)?;
        ranges.push((o, b));
    }
    let journal = Patch {
        path: path.clone(),
        ino: st.st_ino,
        size: old_size,
        old,
        ranges,
    };
    let dir = journals(area, true)?;
    let name = format!(
        "{:x}-{}-{}",
        st.st_ino,
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
    .into_bytes();
    let j = rustix::fs::openat(
        &dir,
        name.as_slice(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    let j = File::from(j);
    let written = j
        .write_all_at(&journal.encode(), 0)
        .and_then(|()| j.sync_all())
        .and_then(|()| rustix::fs::fsync(&dir).map_err(io::Error::from));
    if let Err(e) = written {
        let _ = rustix::fs::unlinkat(&dir, name.as_slice(), AtFlags::empty());
        return Err(e);
    }
    let applied = (|| {
        for (o, b) in new {
            f.write_all_at(b, *o)?;
        }
        if size != old_size {
            f.set_len(size)?;
        }
        set_attrs(f)
    })();
    if let Err(e) = applied {
        let _ = put_back(f, &journal).and_then(|()| {
            rustix::fs::unlinkat(&dir, name.as_slice(), AtFlags::empty()).map_err(Into::into)
        });
        return Err(e);
    }
    Ok(Pending { name })
}

/// Writes back what `p` says `f` had, and its length and attributes, durably.
fn put_back(f: &File, p: &Patch) -> io::Result<()> {
    for (o, b) in &p.ranges {
        f.write_all_at(b, *o)?;
    }
    f.set_len(p.size)?;
    let x = p.old.xattrs.as_ref().map(|(x, pol)| (x, pol));
    fsroot::set_meta_fd(f.as_fd(), &p.old.meta, p.old.owners, x)?;
    f.sync_all()
}

/// Puts the file of `p` back as it was before the patch, if it is still that file.
pub(crate) fn restore(root: &Root, p: &Patch) -> io::Result<()> {
    let (d, name) = root.parent_of(&p.path)?;
    let f = match fsroot::resolve(
        d.as_fd(),
        &name,
        OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC,
    ) {
        Ok(f) => File::from(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if rustix::fs::fstat(&f)?.st_ino != p.ino {
        return Ok(());
    }
    put_back(&f, p)
}

/// The patches of a commit are durable: their journals go (one `fsync` of their directory,
/// before the commit is acknowledged: a journal left would undo an acknowledged patch).
pub(crate) fn finished(area: BorrowedFd<'_>, done: &[Pending]) -> io::Result<()> {
    if done.is_empty() {
        return Ok(());
    }
    let dir = journals(area, false)?;
    for p in done {
        rustix::fs::unlinkat(&dir, p.name.as_slice(), AtFlags::empty())?;
    }
    rustix::fs::fsync(&dir)?;
    Ok(())
}

/// The patch `p` failed to commit: its file is put back now, and its journal goes.
pub(crate) fn undo(root: &Root, area: BorrowedFd<'_>, p: &Pending) -> io::Result<()> {
    let dir = journals(area, false)?;
    if let Some(journal) = read(dir.as_fd(), &p.name) {
        restore(root, &journal)?;
    }
    rustix::fs::unlinkat(&dir, p.name.as_slice(), AtFlags::empty())?;
    Ok(())
}

/// Moves the journal of `p` to `to` in `dir` (the undo area keeps it until its window
/// closes), durably.
pub(crate) fn keep(
    area: BorrowedFd<'_>,
    p: &Pending,
    dir: BorrowedFd<'_>,
    to: &[u8],
) -> io::Result<()> {
    let from = journals(area, false)?;
    rustix::fs::renameat(&from, p.name.as_slice(), dir, to)?;
    rustix::fs::fsync(dir)?;
    rustix::fs::fsync(&from)?;
    Ok(())
}

/// The journal `name` in `dir`, if it is whole.
pub(crate) fn read(dir: BorrowedFd<'_>, name: &[u8]) -> Option<Patch> {
    let f = fsroot::resolve(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
    )
    .ok()?;
    let mut bytes = Vec::new();
    File::from(f).read_to_end(&mut bytes).ok()?;
    Patch::decode(&bytes)
}

/// When the tree is opened: every file whose patch did not finish is put back as it was
/// (a torn journal means its file was never touched). Returns how many were.
pub(crate) fn recover(root: &Root, area: BorrowedFd<'_>) -> io::Result<usize> {
    let dir = match journals(area, false) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    for e in rustix::fs::Dir::read_from(&dir)? {
        let name = e?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(name);
        }
    }
    let mut restored = 0;
    for name in names {
        if let Some(p) = read(dir.as_fd(), &name) {
            restore(root, &p)?;
            restored += 1;
        }
        rustix::fs::unlinkat(&dir, name.as_slice(), AtFlags::empty())?;
    }
    rustix::fs::fsync(&dir)?;
    Ok(restored)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::manifest::Mtime;

    fn old_attrs(f: &File) -> OldAttrs {
        OldAttrs {
            meta: fsroot::meta_of(&rustix::fs::fstat(f).unwrap()),
            owners: false,
            with_mode: true,
            xattrs: None,
        }
    }

    fn setup() -> (tempfile::TempDir, Root, OwnedFd, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(".hotsync")).unwrap();
        let data: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(dir.path().join("img"), &data).unwrap();
        let root = Root::open(dir.path()).unwrap();
        let area = fsroot::open_subdir(root.fd(), b".hotsync").unwrap();
        (dir, root, area, data)
    }

    fn open(dir: &std::path::Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("img"))
            .unwrap()
    }

    /// A patch in place, then the journal dropped: the new version. A crash before the
    /// journal went (the journal found when the tree is opened): the old one, whole,
    /// with its length and time.
    #[test]
    fn a_patch_not_finished_is_put_back_when_the_tree_is_opened() {
        let (dir, root, area, data) = setup();
        let path = RelPath::new("img").unwrap();
        let f = open(dir.path());
        let mtime_before = rustix::fs::fstat(&f).unwrap().st_mtime;
        let new = vec![
            (4096u64, vec![0xEE; 5000]),
            ((1 << 20) - 10, vec![0xDD; 30]),
        ];
        let p = patch(
            area.as_fd(),
            &path,
            &f,
            &new,
            (1 << 20) + 20,
            old_attrs(&f),
            |f| {
                fsroot::set_meta_fd(
                    f.as_fd(),
                    &crate::model::manifest::Meta {
                        mtime: Mtime {
                            sec: 1_000_000,
                            nsec: 0,
                        },
                        ..fsroot::meta_of(&rustix::fs::fstat(f)?)
                    },
                    false,
                    None,
                )
            },
        )
        .unwrap();
        let mut want = data.clone();
        want[4096..9096].fill(0xEE);
        want.truncate((1 << 20) - 10);
        want.extend_from_slice(&[0xDD; 30]);
        assert!(std::fs::read(dir.path().join("img")).unwrap() == want);
        // The crash: nothing dropped the journal.
        drop(p);
        assert_eq!(recover(&root, area.as_fd()).unwrap(), 1);
        assert!(
            std::fs::read(dir.path().join("img")).unwrap() == data,
            "the old version"
        );
        let st = rustix::fs::stat(dir.path().join("img")).unwrap();
        assert_eq!(st.st_mtime, mtime_before);
        assert_eq!(recover(&root, area.as_fd()).unwrap(), 0, "nothing left");
        // Finished: the journal goes, and opening the tree leaves the new version.
        let p = patch(
            area.as_fd(),
            &path,
            &f,
            &new,
            1 << 20,
            old_attrs(&f),
            |_| Ok(()),
        )
        .unwrap();
        finished(area.as_fd(), &[p]).unwrap();
        assert_eq!(recover(&root, area.as_fd()).unwrap(), 0);
        assert_eq!(std::fs::read(dir.path().join("img")).unwrap()[4096], 0xEE);
    }

    /// A journal torn by a crash while it was written: the file was never touched, and
    /// the journal is dropped.
    #[test]
    fn a_torn_journal_leaves_the_file_alone() {
        let (dir, root, area, data) = setup();
        let path = RelPath::new("img").unwrap();
        let f = open(dir.path());
        let p = patch(
            area.as_fd(),
            &path,
            &f,
            &[(0, vec![1; 10])],
            1 << 20,
            old_attrs(&f),
            |_| Ok(()),
        )
        .unwrap();
        let jdir = dir.path().join(".hotsync/patch");
        let jpath = jdir.join(std::str::from_utf8(&p.name).unwrap());
        let bytes = std::fs::read(&jpath).unwrap();
        std::fs::write(&jpath, &bytes[..bytes.len() - 5]).unwrap();
        assert_eq!(recover(&root, area.as_fd()).unwrap(), 0);
        assert_eq!(
            std::fs::read(dir.path().join("img")).unwrap()[..10],
            [1; 10]
        );
        assert_eq!(
            std::fs::read(dir.path().join("img")).unwrap()[10..],
            data[10..]
        );
        assert_eq!(std::fs::read_dir(&jdir).unwrap().count(), 0);
    }
}
