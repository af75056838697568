//! Real faults: SIGKILL mid-sync, files rewritten while they are read.

use crate::helpers::*;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

/// Content of file `i` at version `v`: sizes vary so versions differ in length too, and
/// some files are large enough for the delta and whole-stream paths.
fn content(i: usize, v: u64) -> Vec<u8> {
    let size = match i % 10 {
        0 => 300_000 + i * 10,
        1 => 80_000,
        _ => 1_000 + (i * 37 + v as usize * 11) % 20_000,
    };
    let mut d = noise(size, i as u64 * 1000 + v);
    d[..8].copy_from_slice(&v.to_le_bytes());
    d
}

#[test]
fn kill_9_at_any_moment_leaves_no_torn_file() {
    let t = Pair::new();
    let n = 200;
    for i in 0..n {
        write(&t.s(&format!("d{}/f{i}", i % 7)), &content(i, 0));
    }
    sync_ok(&t.src, &t.dst, &[]);
    let (mut killed, mut half_done) = (0, 0);
    for round in 1..=12u64 {
        for i in 0..n {
            // Large files keep most of their bytes, so the delta path runs too.
            let mut c = content(i, if i % 10 == 0 { 0 } else { round });
            if i % 10 == 0 {
                c[..8].copy_from_slice(&round.to_le_bytes());
            }
            write(&t.s(&format!("d{}/f{i}", i % 7)), &c);
        }
        let mut child = hotsync(false)
            .args([
                "sync".as_ref(),
                t.src.as_os_str(),
                t.dst.as_os_str(),
                "-q".as_ref(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        if round % 2 == 0 {
            // Right after the first new version lands: mid-transfer, whatever the load.
            let start = std::time::Instant::now();
            while start.elapsed() < Duration::from_secs(20) && child.try_wait().unwrap().is_none() {
                let landed = (0..n).any(|i| {
                    std::fs::read(t.d(&format!("d{}/f{i}", i % 7))).is_ok_and(|d| {
                        d.len() >= 8 && u64::from_le_bytes(d[..8].try_into().unwrap()) == round
                    })
                });
                if landed {
                    break;
                }
            }
        } else {
            std::thread::sleep(Duration::from_millis(3 + (round * 7) % 60));
        }
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        assert!(status.success() || status.signal() == Some(9), "{status:?}");
        killed += (status.signal() == Some(9)) as usize;
        let mut versions = std::collections::HashSet::new();
        // Every standby file is exactly the previous or the new version, never a mix.
        for i in 0..n {
            let got = std::fs::read(t.d(&format!("d{}/f{i}", i % 7))).unwrap();
            let v = u64::from_le_bytes(got[..8].try_into().unwrap());
            let mut want = content(i, if i % 10 == 0 { 0 } else { v });
            if i % 10 == 0 {
                want[..8].copy_from_slice(&v.to_le_bytes());
            }
            assert!(v <= round, "file {i}: version {v} in round {round}");
            assert!(
                got == want,
                "file {i} is torn in round {round} (claims version {v})"
            );
            versions.insert(v == round);
        }
        half_done += (versions.len() == 2) as usize;
    }
    eprintln!("killed {killed} of 12 runs, {half_done} mid-transfer");
    assert!(
        killed >= 6,
        "the kills came too late to test anything ({killed} of 12)"
    );
    assert!(half_done >= 1, "no run was killed mid-transfer");
    let j = sync_ok(&t.src, &t.dst, &[]);
    assert_eq!(j["errors"].as_array().unwrap().len(), 0);
    assert_same_tree(&t.src, &t.dst);
    assert!(
        temps(&t.dst).is_empty(),
        "leftover temps: {:?}",
        temps(&t.dst)
    );
}

#[test]
fn a_file_rewritten_while_read_is_never_sent_mixed() {
    let t = Pair::new();
    let size = 4 << 20;
    write(&t.s("hot"), &vec![b'a'; size]);
    write(&t.s("calm"), b"calm");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let path = t.s("hot");
    let stop2 = stop.clone();
    // Rewrites the file in place, all 'a' then all 'b', in 64 KiB writes: a reader that
    // does not notice the writes during its read sends a state that never existed.
    let writer = std::thread::spawn(move || {
        use std::io::{Seek, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let mut fill = b'a';
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            fill = if fill == b'a' { b'b' } else { b'a' };
            f.seek(std::io::SeekFrom::Start(0)).unwrap();
            for _ in 0..size / 65536 {
                f.write_all(&[fill; 65536]).unwrap();
            }
        }
    });
    for _ in 0..8 {
        let r = run([
            "sync".as_ref(),
            t.src.as_os_str(),
            t.dst.as_os_str(),
            "--json".as_ref(),
        ]);
        assert!(r.code == 0 || r.code == 1, "{}", r.stderr);
        if let Ok(d) = std::fs::read(t.d("hot")) {
            // The writer rewrites front to back, so at any instant the primary's file is a
            // prefix of the new version and a suffix of the old: at most one transition.
            // A read that spanned writes would show more.
            assert_eq!(d.len(), size);
            let transitions = d.windows(2).filter(|w| w[0] != w[1]).count();
            assert!(
                transitions <= 1,
                "the standby holds a state that never existed ({transitions} transitions)"
            );
        }
        assert_eq!(std::fs::read(t.d("calm")).unwrap(), b"calm");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    sync_ok(&t.src, &t.dst, &[]);
    assert_same_tree(&t.src, &t.dst);
}
