//! Block indexes of a tree's large files in its reserved area (`.hotsync/index/`, one file
//! per inode; see [`crate::model::blockindex`]). They are a cache: never fsynced, and any
//! that is torn, damaged, or of a file that changed since is not used.

use crate::model::blockindex::{BlockIndex, HEADER, Key};
use crate::model::manifest::Hash;
use crate::tree::fsroot;
use rustix::fs::{Mode, OFlags};
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;

/// The directory of the indexes in the reserved area.
const DIR: &[u8] = b"index";

/// Files at least this large get an index.
pub(crate) const INDEXED: u64 = 16 << 20;

/// What a file is now, as an index records it.
pub(crate) fn key_of(st: &rustix::fs::Stat) -> Key {
    Key {
        ino: st.st_ino,
        size: st.st_size as u64,
        mtime: (st.st_mtime, st.st_mtime_nsec as u32),
        ctime: (st.st_ctime, st.st_ctime_nsec as u32),
    }
}

fn name(ino: u64) -> Vec<u8> {
    format!("{ino:x}").into_bytes()
}

fn read(area: BorrowedFd<'_>, ino: u64) -> Option<(std::fs::File, Option<BlockIndex>)> {
    let dir = fsroot::open_subdir(area, DIR).ok()?;
    let f = fsroot::resolve(
        dir.as_fd(),
        &name(ino),
        OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC,
    )
    .ok()?;
    let mut f = std::fs::File::from(f);
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).ok()?;
    let ix = BlockIndex::decode(&bytes);
    Some((f, ix))
}

/// The chunk digests of the file that is `st` now, cut in chunks of `chunk` bytes, if its
/// index holds.
pub(crate) fn load(area: BorrowedFd<'_>, st: &rustix::fs::Stat, chunk: u64) -> Option<Vec<Hash>> {
    let (_, ix) = read(area, st.st_ino)?;
    ix?.digests_for(&key_of(st), chunk)
}

/// Records `digests` (in chunks of `chunk` bytes) as those of the file that is `st` now.
/// An index of the same chunking is updated where it differs (a few pages for a file
/// changed in a few places), else written whole. A file that has none yet but replaced the
/// inode `base` (a new version cloned from it) takes over the index of `base`, so that a
/// large file changed in a few places costs a few pages here whatever its size.
pub(crate) fn store(
    area: BorrowedFd<'_>,
    st: &rustix::fs::Stat,
    chunk: u64,
    digests: Vec<Hash>,
    base: Option<u64>,
) -> io::Result<()> {
    let new = BlockIndex {
        key: key_of(st),
        chunk,
        digests,
    };
    if let Some(base) = base.filter(|b| *b != st.st_ino)
        && let Ok(dir) = fsroot::open_subdir(area, DIR)
    {
        // The base's index is of no use once its file is replaced; should the name be taken
        // meanwhile, the index found there is only trusted if its key holds.
        let _ = rustix::fs::renameat_with(
            &dir,
            name(base).as_slice(),
            &dir,
            name(st.st_ino).as_slice(),
            rustix::fs::RenameFlags::NOREPLACE,
        );
    }
    if let Some((f, Some(old))) = read(area, st.st_ino)
        && old.chunk == new.chunk
    {
        for i in new.changed_from(&old) {
            f.write_all_at(&new.digests[i], (HEADER + 32 * i) as u64)?;
        }
        f.set_len((HEADER + 32 * new.digests.len()) as u64)?;
        // Last: until the header is whole its guard does not match, and the index is unused.
        return f.write_all_at(&new.header(), 0);
    }
    let dir = fsroot::ensure_subdir(area, DIR)?;
    let f = rustix::fs::openat(
        &dir,
        name(st.st_ino).as_slice(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    std::fs::File::from(f).write_all_at(&new.encode(), 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn an_index_is_used_only_while_its_file_is_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let area = dir.path().join(".hotsync");
        std::fs::create_dir(&area).unwrap();
        let area = std::fs::File::open(&area).unwrap();
        let file = dir.path().join("big");
        std::fs::write(&file, vec![7u8; 3 << 18]).unwrap();
        let st = rustix::fs::stat(&file).unwrap();
        let digests = vec![[1u8; 32], [2; 32], [3; 32]];
        assert_eq!(load(area.as_fd(), &st, 1 << 18), None, "none yet");
        store(area.as_fd(), &st, 1 << 18, digests.clone(), None).unwrap();
        assert_eq!(load(area.as_fd(), &st, 1 << 18), Some(digests.clone()));
        // Updated in place where it differs.
        let mut changed = digests.clone();
        changed[1] = [9; 32];
        store(area.as_fd(), &st, 1 << 18, changed.clone(), None).unwrap();
        assert_eq!(load(area.as_fd(), &st, 1 << 18), Some(changed));
        // The file written since: its status-change time moved on.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .write_all_at(b"x", 5)
            .unwrap();
        let now = rustix::fs::stat(&file).unwrap();
        assert_eq!(load(area.as_fd(), &now, 1 << 18), None);
    }

    #[test]
    fn a_new_version_takes_over_the_index_of_the_file_it_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let area = dir.path().join(".hotsync");
        std::fs::create_dir(&area).unwrap();
        let index_dir = area.join("index");
        let area = std::fs::File::open(&area).unwrap();
        let file = dir.path().join("big");
        std::fs::write(&file, vec![7u8; 3 << 18]).unwrap();
        let old = rustix::fs::stat(&file).unwrap();
        let digests = vec![[1u8; 32], [2; 32], [3; 32]];
        store(area.as_fd(), &old, 1 << 18, digests.clone(), None).unwrap();
        let old_index = index_dir.join(format!("{:x}", old.st_ino));
        let written = std::fs::metadata(&old_index).unwrap().ino();
        // The new version, renamed over the old one.
        let temp = dir.path().join("temp");
        std::fs::write(&temp, vec![7u8; 3 << 18]).unwrap();
        std::fs::rename(&temp, &file).unwrap();
        let new = rustix::fs::stat(&file).unwrap();
        assert_ne!(new.st_ino, old.st_ino);
        let mut changed = digests;
        changed[2] = [9; 32];
        store(
            area.as_fd(),
            &new,
            1 << 18,
            changed.clone(),
            Some(old.st_ino),
        )
        .unwrap();
        assert_eq!(load(area.as_fd(), &new, 1 << 18), Some(changed));
        assert_eq!(
            load(area.as_fd(), &old, 1 << 18),
            None,
            "the old one is gone"
        );
        assert!(!old_index.exists());
        let taken = index_dir.join(format!("{:x}", new.st_ino));
        assert_eq!(
            std::fs::metadata(taken).unwrap().ino(),
            written,
            "updated where it differs, not written anew"
        );
    }
}
