//! A copy of a file as it stood at one moment, for a file that never holds still long
//! enough to be read in place (a database's log rewritten every few milliseconds, read
//! while its bytes cross the network). The copy is local, so it takes a fraction of the
//! time a send does: it shares the file's blocks where the filesystem can (`FICLONE`,
//! XFS and btrfs), and is made in the kernel elsewhere. It is kept only if the file did not
//! change from before the copy began to after it ended, and it has no name (`O_TMPFILE`
//! beside the file), so nothing is left behind however the process ends.

use crate::model::path::RelPath;
use crate::tree::fsroot::{Root, changed};
use rustix::fs::{Mode, OFlags, Stat};
use rustix::io::Errno;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

/// The largest file copied byte for byte where blocks cannot be shared: beyond it a copy
/// takes long enough for the file to change during it anyway.
pub(crate) const COPY_MAX: u64 = 64 << 20;

/// A private copy of a file, and the file's attributes at the moment it shows.
pub(crate) struct Snapshot {
    pub file: File,
    pub stat: Stat,
}

/// Takes a snapshot of the regular file `rel` in `root`, trying for at most `budget`.
/// `Ok(None)` when none could be taken: the file changed during every try, it is too
/// large to copy here, or its directory takes no unnamed files.
///
/// A change is seen by the file's size, times and inode. A write in the same clock tick
/// as the last change before the copy would leave the times as they were, so a copy
/// begins only once the clock has moved past the file's last change.
///
/// # Errors
/// The file cannot be opened or read (gone, not a regular file, unreadable).
pub(crate) fn take(root: &Root, rel: &RelPath, budget: Duration) -> io::Result<Option<Snapshot>> {
    let start = Instant::now();
    let (parent, _) = rel.split();
    let dir = root.open_dir(&parent)?;
    let mut tries = 0u32;
    while tries == 0 || start.elapsed() < budget {
        tries += 1;
        let live = root.open_file(rel)?;
        let before = rustix::fs::fstat(&live)?;
        if !before_this_tick(&before) {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let copy = match rustix::fs::openat(
            &dir,
            c".",
            OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        ) {
            Ok(fd) => File::from(fd),
            // A filesystem (or a directory) without unnamed files.
            Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::ACCESS | Errno::PERM | Errno::ROFS) => {
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let size = before.st_size as u64;
        match rustix::fs::ioctl_ficlone(&copy, &live) {
            Ok(()) => {}
            Err(_) if size > COPY_MAX => return Ok(None),
            Err(_) => copy_data(&live, &copy, size)?,
        }
        let after = rustix::fs::fstat(&live)?;
        if !changed(&before, &after) {
            return Ok(Some(Snapshot {
                file: copy,
                stat: before,
            }));
        }
    }
    tracing::debug!("{rel}: no snapshot in {tries} tries: it changed during each");
    Ok(None)
}

/// Whether the file's last change lies in an earlier tick of the clock that stamps file
/// times (the coarse real-time clock) than now, so any change from now on shows.
fn before_this_tick(st: &Stat) -> bool {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
    (st.st_ctime, st.st_ctime_nsec as i64) < (now.tv_sec, now.tv_nsec as i64)
}

/// Copies the data of `from` (its `size` bytes, holes kept as holes) into `to`, in the
/// kernel.
fn copy_data(from: &File, to: &File, size: u64) -> io::Result<()> {
    for extent in crate::tree::sparse::Extents::new(from.as_fd(), size) {
        let (mut at, end) = extent?;
        while at < end {
            let (mut i, mut o) = (at, at);
            let n = rustix::fs::copy_file_range(
                from,
                Some(&mut i),
                to,
                Some(&mut o),
                (end - at).min(1 << 30) as usize,
            )?;
            if n == 0 {
                // It shrank meanwhile: the check after the copy sees it.
                break;
            }
            at += n as u64;
        }
    }
    to.set_len(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_snapshot_holds_the_file_as_it_was_and_leaves_no_name() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("d")).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(t.path().join("d/wal"), &data).unwrap();
        let root = Root::open(t.path()).unwrap();
        let rel = RelPath::new("d/wal").unwrap();
        let snap = take(&root, &rel, Duration::from_secs(2)).unwrap().unwrap();
        assert_eq!(snap.stat.st_size as usize, data.len());
        // The file changes afterwards: the snapshot does not.
        std::fs::write(t.path().join("d/wal"), b"rewritten").unwrap();
        let mut got = Vec::new();
        (&snap.file).read_to_end(&mut got).unwrap();
        assert_eq!(got, data);
        let names: Vec<_> = std::fs::read_dir(t.path().join("d")).unwrap().collect();
        assert_eq!(names.len(), 1, "no name besides the file's own");
        // A file rewritten every few milliseconds still gets one, whole.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (stop, path) = (stop.clone(), t.path().join("d/wal"));
            std::thread::spawn(move || {
                let mut n = 0u8;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n = n.wrapping_add(1);
                    std::fs::write(&path, vec![n; 100_000]).unwrap();
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        for _ in 0..5 {
            let snap = take(&root, &rel, Duration::from_secs(2)).unwrap().unwrap();
            let mut got = Vec::new();
            (&snap.file).read_to_end(&mut got).unwrap();
            assert_eq!(got.len(), snap.stat.st_size as usize);
            assert!(
                got.iter().all(|&b| Some(&b) == got.first()),
                "one version, not a mix"
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();
    }
}
