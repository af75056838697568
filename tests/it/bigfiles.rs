//! Big live files at the cost of their change (DESIGN §10): a large file edited in place or
//! appended to is not rewritten on the standby. Counted at the standby's block device, a
//! loop device of the filesystem under test.

use crate::helpers::*;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// A file of `mib` MiB of data that does not compress or repeat.
fn big_file(path: &Path, mib: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut block = vec![0u8; MIB as usize];
    for _ in 0..mib {
        for b in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block).unwrap();
    }
}

/// 4 KiB rewritten in the middle and 4 KiB appended: 8 KiB changed.
fn edit_and_append(path: &Path) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let size = f.metadata().unwrap().len();
    f.seek(SeekFrom::Start(size / 2 + 12_345)).unwrap();
    f.write_all(&[0xA5; 4096]).unwrap();
    f.seek(SeekFrom::End(0)).unwrap();
    f.write_all(&[0x5A; 4096]).unwrap();
}

/// A 256 MiB file on a standby whose filesystem is `fs`, edited and appended to: the
/// standby's device takes at most `max_written` bytes for the second sync, and the copy is
/// the primary's.
fn changed_in_place_costs_its_change(fs: &str, max_written: u64) {
    let Some(disk) = LoopFs::make(fs, 1024) else {
        return;
    };
    let src = tempfile::tempdir().unwrap();
    let dest = disk.path.join("standby");
    std::fs::create_dir(&dest).unwrap();
    let file = src.path().join("vm.img");
    big_file(&file, 256);
    let m = LocalMirror(dest.clone());
    let r = m.sync(src.path(), &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // What a sync with nothing to do writes (its state, the filesystem's journal).
    let before = disk.written();
    let r = m.sync(src.path(), &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let idle = disk.written() - before;
    edit_and_append(&file);
    let before = disk.written();
    let r = m.sync(src.path(), &["--json"]);
    let written = disk.written() - before;
    assert_eq!(r.code, 0, "{}", r.stderr);
    eprintln!(
        "{fs}: 8 KiB changed in a 256 MiB file; the standby's device wrote {} KiB ({} KiB \
         for a sync with nothing to do)",
        written / 1024,
        idle / 1024
    );
    assert!(
        std::fs::read(&file).unwrap() == std::fs::read(dest.join("vm.img")).unwrap(),
        "the standby's copy is the primary's"
    );
    assert!(
        written <= max_written,
        "{fs}: {written} bytes written for 8 KiB changed in 256 MiB"
    );
}

/// XFS shares the blocks of the standby's version with the new one (a reflink clone) and
/// writes only the changed ranges before the atomic rename.
#[test]
fn on_xfs_a_big_file_changed_in_place_is_cloned_and_patched() {
    // At most twice the change plus 64 KiB (the target), metadata and log included.
    changed_in_place_costs_its_change("xfs", 2 * 8192 + 64 * 1024);
}

/// ext4 cannot clone: the standby's version is patched in place through a journal of what
/// the patch overwrites: twice the change, plus ext4's own journal, which writes some
/// 20 KiB for each of the batch's durable steps (the patch's journal, the file, the undo
/// log, the state). Rewritten whole, it was the file's 256 MiB.
#[test]
fn on_ext4_a_big_file_changed_in_place_is_patched_through_a_journal() {
    changed_in_place_costs_its_change("ext4", 2 * 8192 + 448 * 1024);
}

/// A large file written in place all the time (a database, a VM image) reaches the standby
/// while it is written, each batch sending it as read and the next one again, rather than
/// only once its writer pauses; once it does, the copies are equal.
#[test]
fn a_big_file_written_all_the_time_reaches_the_standby_while_written() {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    let src = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    let file = src.path().join("db.img");
    big_file(&file, 24);
    let mut watch = Watch::start(&[], src.path(), dest.path().as_os_str(), &[]);
    watch.wait_ready();
    // Every few milliseconds: its generation at the start, and 4 KiB somewhere else.
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, file) = (stop.clone(), file.clone());
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
            let mut generation = 0u64;
            while !stop.load(Ordering::Relaxed) {
                generation += 1;
                let at = 4096 * (1 + generation.wrapping_mul(2_654_435_761) % 6000);
                f.write_all_at(&[generation as u8; 4096], at).unwrap();
                f.write_all_at(&generation.to_le_bytes(), 0).unwrap();
                std::thread::sleep(Duration::from_millis(3));
            }
            generation
        })
    };
    let copy = dest.path().join("db.img");
    let generation_there = || {
        let mut b = [0u8; 8];
        std::fs::File::open(&copy)
            .and_then(|f| f.read_exact_at(&mut b, 0))
            .map_or(0, |()| u64::from_le_bytes(b))
    };
    // The copy's first version, then at least one more, while the writer goes on (a
    // loaded machine reads the file slowly, and the reads are paced by their cost).
    let start = std::time::Instant::now();
    let mut reached = std::collections::BTreeSet::new();
    while reached.len() < 2 && start.elapsed() < Duration::from_secs(40) {
        reached.extend(Some(generation_there()).filter(|g| *g > 0));
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let last = writer.join().unwrap();
    assert!(
        reached.len() >= 2,
        "the standby's copy moved on while written ({reached:?} of {last} generations)\n{}",
        watch.log()
    );
    wait_for("the copies equal", Duration::from_secs(30), || {
        (std::fs::read(&file).unwrap() == std::fs::read(&copy).unwrap_or_default()).then_some(())
    });
    watch.stop(Duration::from_secs(10));
}
