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

/// Record `n` of writer file `f`: its numbers and a checksum of them, so a sampler can tell
/// a whole record from a torn or mixed one.
fn record(f: usize, n: u64) -> Vec<u8> {
    let body = format!("{f:03} {n:08}");
    let sum = blake3::hash(body.as_bytes()).to_hex();
    format!("{body} {}\n", &sum[..16]).into_bytes()
}

/// Checks that `d`, a standby copy of writer file `f`, is a state the writer had: whole
/// records, numbered from 0 without a gap, each with its checksum.
fn check_records(f: usize, d: &[u8]) -> Result<(), String> {
    if !d.is_empty() && !d.ends_with(b"\n") {
        return Err(format!("file {f}: a torn last record"));
    }
    for (n, line) in d.split_inclusive(|&b| b == b'\n').enumerate() {
        if line != record(f, n as u64).as_slice() {
            return Err(format!(
                "file {f}: record {n} is {:?}",
                String::from_utf8_lossy(line)
            ));
        }
    }
    Ok(())
}

/// Writer files under `w/`.
const RECORD_FILES: usize = 12;

/// Creates the writer files, empty (a state each had).
fn seed_records(src: &std::path::Path) {
    for f in 0..RECORD_FILES {
        write(&src.join(format!("w/f{f:03}")), b"");
    }
}

/// A writer appending self-checked records to the files under SRC's `w/`, and a sampler
/// reading the standby's copies all along, noting every state no writer ever had.
struct Records {
    stop_writing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop_sampling: std::sync::Arc<std::sync::atomic::AtomicBool>,
    written: std::sync::Arc<std::sync::atomic::AtomicU64>,
    samples: std::sync::Arc<std::sync::atomic::AtomicU64>,
    writer: std::thread::JoinHandle<()>,
    sampler: std::thread::JoinHandle<Vec<String>>,
}

impl Records {
    fn start(src: &std::path::Path, dst: &std::path::Path) -> Records {
        Records::start_with(src, dst, false)
    }

    /// As `start`; `held_open`: the writer opens each file once and keeps appending to
    /// it (a log, a journal) instead of opening it for every record.
    fn start_with(src: &std::path::Path, dst: &std::path::Path, held_open: bool) -> Records {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop_writing = Arc::new(AtomicBool::new(false));
        let stop_sampling = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let samples = Arc::new(AtomicU64::new(0));
        let writer = {
            let (stop, written, src) = (stop_writing.clone(), written.clone(), src.to_path_buf());
            std::thread::spawn(move || {
                let mut next = [0u64; RECORD_FILES];
                let mut i = 0usize;
                let open = |f: usize| {
                    std::fs::OpenOptions::new()
                        .append(true)
                        .open(src.join(format!("w/f{f:03}")))
                        .unwrap()
                };
                let mut held: Vec<std::fs::File> = if held_open {
                    (0..RECORD_FILES).map(open).collect()
                } else {
                    Vec::new()
                };
                while !stop.load(Ordering::Relaxed) {
                    use std::io::Write;
                    let f = i % RECORD_FILES;
                    let mut once;
                    let file = if held_open {
                        &mut held[f]
                    } else {
                        once = open(f);
                        &mut once
                    };
                    file.write_all(&record(f, next[f])).unwrap();
                    next[f] += 1;
                    written.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                    std::thread::sleep(Duration::from_millis(3));
                }
            })
        };
        let sampler = {
            let (stop, samples, dst) = (stop_sampling.clone(), samples.clone(), dst.to_path_buf());
            std::thread::spawn(move || {
                let mut torn = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    for f in 0..RECORD_FILES {
                        if let Ok(d) = std::fs::read(dst.join(format!("w/f{f:03}"))) {
                            samples.fetch_add(1, Ordering::Relaxed);
                            if let Err(e) = check_records(f, &d) {
                                torn.push(e);
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                torn
            })
        };
        Records {
            stop_writing,
            stop_sampling,
            written,
            samples,
            writer,
            sampler,
        }
    }

    fn stop_writing(&self) {
        self.stop_writing
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Stops both: records written, samples taken, and the torn states seen.
    fn finish(self) -> (u64, u64, Vec<String>) {
        use std::sync::atomic::Ordering;
        self.stop_writing.store(true, Ordering::Relaxed);
        self.writer.join().unwrap();
        self.stop_sampling.store(true, Ordering::Relaxed);
        let torn = self.sampler.join().unwrap();
        (
            self.written.load(Ordering::Relaxed),
            self.samples.load(Ordering::Relaxed),
            torn,
        )
    }
}

/// `watch SRC URL` as `m`'s primary, `m`'s standby at `url` (its own, or a proxy's).
fn watch_to(m: &RemoteMirror, src: &std::path::Path, url: &str) -> Watch {
    let pre: Vec<std::ffi::OsString> = vec!["--home".into(), m.primary_home.clone().into()];
    Watch::start(&pre, src, url.as_ref(), &["--server-id", &m.server.id])
}

/// How every case ends: no torn state seen, the trees equal, no temporary file left.
#[track_caller]
fn ends_whole(t: &Pair, torn: &[String]) {
    assert!(torn.is_empty(), "torn states on the standby: {torn:?}");
    assert_same_tree(&t.src, &t.dst);
    assert!(temps(&t.dst).is_empty(), "{:?}", temps(&t.dst));
}

/// The writer's files seeded, a `serve` of DEST, and a watch to it past its first
/// reconcile.
fn watched(t: &Pair) -> (RemoteMirror, Watch) {
    seed_records(&t.src);
    let m = RemoteMirror::start(t.dir.path(), &t.dst);
    let w = watch_to(&m, &t.src, &m.server.url());
    w.wait_ready();
    (m, w)
}

/// Waits up to a minute for SRC and DEST to be equal.
#[track_caller]
fn converged(t: &Pair, w: &Watch) -> Duration {
    let start = std::time::Instant::now();
    while !tree_diff(&t.src, &t.dst).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "not converged:\n  {}\n{}",
            tree_diff(&t.src, &t.dst).join("\n  "),
            w.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// `watch` to a `serve` through a UDP proxy that loses 5% of datagrams, then all of them
/// for 15 s, then reorders and duplicates them, while writers append self-checked records
/// and a sampler reads the standby throughout: no standby file may ever hold a state its
/// writer never had, and the trees end equal with no temporary file left.
#[test]
fn a_bad_network_never_shows_the_standby_a_state_the_primary_never_had() {
    use std::sync::atomic::Ordering;
    let _g = WATCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let t = Pair::new();
    seed_records(&t.src);
    let m = RemoteMirror::start(t.dir.path(), &t.dst);
    let proxy = UdpProxy::start(m.server.port);
    let w = watch_to(&m, &t.src, &proxy.url());
    w.wait_ready();
    let records = Records::start(&t.src, &t.dst);
    let phases = [
        (Weather::Lossy(5), Duration::from_secs(4)),
        (Weather::Blackhole, Duration::from_secs(15)),
        (Weather::Shuffled, Duration::from_secs(4)),
        (Weather::Clear, Duration::from_secs(1)),
    ];
    for (weather, how_long) in phases {
        proxy.set(weather);
        std::thread::sleep(how_long);
    }
    records.stop_writing();
    let took = converged(&t, &w);
    let (written, samples, torn) = records.finish();
    let (carried, dropped) = (
        proxy.counts[0].load(Ordering::Relaxed),
        proxy.counts[1].load(Ordering::Relaxed),
    );
    let connects = w.of("connected").len();
    eprintln!(
        "bad network: {written} records written, {samples} standby samples, {} torn; \
         {carried} datagrams carried, {dropped} dropped; {} reconnection(s); converged \
         {:.1} s after",
        torn.len(),
        connects.saturating_sub(1),
        took.as_secs_f64()
    );
    assert!(torn.is_empty(), "torn states on the standby: {torn:?}");
    assert!(dropped > 0 && carried > 0);
    // 15 s of silence is past the heartbeat's limit: the watch gave the session up and
    // connected again.
    assert!(
        connects >= 2,
        "no reconnection after the blackhole\n{}",
        w.log()
    );
    assert_same_tree(&t.src, &t.dst);
    assert!(temps(&t.dst).is_empty(), "{:?}", temps(&t.dst));
}

/// `serve`, then `watch`, each killed with SIGKILL 20 times at random moments under a
/// steady writer, and started again: no standby file is ever seen torn or mixed, and the
/// trees end equal with no temporary file left.
#[test]
fn kill_9_of_serve_and_of_watch_under_a_steady_writer_never_tears_a_file() {
    let _g = WATCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let t = Pair::new();
    seed_records(&t.src);
    let mut m = RemoteMirror::start(t.dir.path(), &t.dst);
    let (port, id) = (m.server.port, m.server.id.clone());
    let pre: Vec<std::ffi::OsString> = vec!["--home".into(), m.primary_home.clone().into()];
    let url = m.server.url();
    let start_watch = || Watch::start(&pre, &t.src, url.as_ref(), &["--server-id", &id]);
    let mut w = start_watch();
    w.wait_ready();
    let records = Records::start(&t.src, &t.dst);
    let mut rng = 0x1234_5678_9abc_def1u64;
    let mut pause = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        Duration::from_millis(30 + rng % 350)
    };
    const CYCLES: usize = 20;
    let server_home = t.dir.path().join("server-home");
    let pid = keygen(&m.primary_home);
    for _ in 0..CYCLES {
        std::thread::sleep(pause());
        m.server.child.kill().unwrap();
        m.server.child.wait().unwrap();
        m.server = Server::start_on(&t.dst, &server_home, &[&pid], port);
    }
    for _ in 0..CYCLES {
        std::thread::sleep(pause());
        w.child.kill().unwrap();
        w.child.wait().unwrap();
        w = start_watch();
    }
    records.stop_writing();
    let took = converged(&t, &w);
    let (written, samples, torn) = records.finish();
    eprintln!(
        "kill -9: {CYCLES} of serve and {CYCLES} of watch; {written} records written, \
         {samples} standby samples, {} torn; converged {:.1} s after",
        torn.len(),
        took.as_secs_f64()
    );
    ends_whole(&t, &torn);
}

/// The standby's filesystem remounted read-only under a steady writer, then writable
/// again once the writer has stopped: nothing is ever torn, and what changed while it was
/// read-only reaches it afterwards without another change to prompt it.
#[test]
fn a_standby_remounted_read_only_and_back_catches_up_without_a_torn_file() {
    let _g = WATCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(fs) = Tmpfs::mount("64m") else {
        return;
    };
    let t = fs.pair();
    let (_m, w) = watched(&t);
    let records = Records::start(&t.src, &t.dst);
    // A read-only remount is refused (EBUSY) while the receiver has a file open for
    // writing, which under a steady writer is often: try again, as an operator would.
    let remount = |how: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let out = std::process::Command::new("mount")
                .args(["-o", &format!("remount,{how}")])
                .arg(&fs.path)
                .output()
                .unwrap();
            if out.status.success() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "mount -o remount,{how} failed for 10 s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    std::thread::sleep(Duration::from_millis(800));
    remount("ro");
    std::thread::sleep(Duration::from_secs(3));
    // Nothing changes after this: what the standby missed must come by itself.
    records.stop_writing();
    std::thread::sleep(Duration::from_millis(300));
    remount("rw");
    let took = converged(&t, &w);
    let (written, samples, torn) = records.finish();
    eprintln!(
        "read-only standby: {written} records written, {samples} standby samples, {} torn; \
         converged {:.1} s after it was writable again",
        torn.len(),
        took.as_secs_f64()
    );
    assert!(
        took < Duration::from_secs(15),
        "what failed while read-only waited {took:?} to be tried again\n{}",
        w.log()
    );
    ends_whole(&t, &torn);
}

/// The standby's disk filled to the last block (by a file beside its tree) under a steady
/// writer, then freed: changes wait while it is full, no file on the standby is ever torn,
/// and the standby catches up once there is room, with nothing changing to prompt it.
#[test]
fn a_standby_disk_filled_and_freed_under_a_steady_writer_never_tears_a_file() {
    let _g = WATCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(fs) = Tmpfs::mount("32m") else {
        return;
    };
    let t = fs.pair();
    let (_m, w) = watched(&t);
    let records = Records::start(&t.src, &t.dst);
    std::thread::sleep(Duration::from_millis(800));
    // Fill the disk, outside the standby tree.
    let filler = fs.path.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0x55u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        // The last partial block too.
        while f.write_all(&block[..512]).is_ok() {}
        let _ = f.sync_all();
    }
    let full_at = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    records.stop_writing();
    std::thread::sleep(Duration::from_millis(300));
    let behind = !tree_diff(&t.src, &t.dst).is_empty();
    std::fs::remove_file(&filler).unwrap();
    let held = full_at.elapsed();
    let took = converged(&t, &w);
    let (written, samples, torn) = records.finish();
    eprintln!(
        "full standby disk: {written} records written, {samples} standby samples, {} torn; \
         full for {:.1} s; converged {:.1} s after it was freed",
        torn.len(),
        held.as_secs_f64(),
        took.as_secs_f64()
    );
    assert!(
        behind,
        "the standby kept up with a full disk: the disk was not full"
    );
    assert!(
        took < Duration::from_secs(15),
        "what waited for space waited {took:?} more\n{}",
        w.log()
    );
    ends_whole(&t, &torn);
}

/// Files a writer keeps open and appends to (a log, a journal) are replicated while they
/// are written, and the standby only ever holds whole records.
#[test]
fn files_held_open_and_appended_to_are_replicated_as_whole_records() {
    let _g = WATCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let t = Pair::new();
    let (_m, w) = watched(&t);
    let records = Records::start_with(&t.src, &t.dst, true);
    // While they are written, the standby follows: it is never far behind.
    let mut seen = 0;
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(200));
        let n = std::fs::read(t.d("w/f000")).map_or(0, |d| d.len());
        assert!(n >= seen, "the standby's copy went back: {n} < {seen}");
        seen = n;
    }
    assert!(seen > 0, "nothing replicated while the file was held open");
    let took = {
        records.stop_writing();
        std::thread::sleep(Duration::from_millis(50));
        converged(&t, &w)
    };
    let (written, samples, torn) = records.finish();
    eprintln!(
        "files held open: {written} records written, {samples} standby samples, {} torn; \
         converged {:.1} s after the last record",
        torn.len(),
        took.as_secs_f64()
    );
    ends_whole(&t, &torn);
}
