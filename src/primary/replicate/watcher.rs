//! The filesystem watcher: inotify events turned into [`Hint`]s, read on a thread of its
//! own that never blocks on the replicator: hints go into a bounded channel, and a full
//! channel only raises a flag that becomes one full re-scan.
//!
//! Watches are set one directory at a time by a second thread, in the order a walk reads
//! the tree ([`crate::tree::walk`]), while events from the directories already watched flow: a
//! tree of 100,000 directories starts replicating at once, not after its whole watch set is
//! up. The first reconcile's walk follows the watches as they are set ([`SetupFront`] is
//! its [`Gate`]), so it reads no directory before changes there are seen, and no second
//! scan is needed. Each watch remembers only its parent's watch and its own name, so a
//! renamed directory (however large) is one update, and memory is a few dozen bytes per
//! directory.

use super::batcher::Hint;
use crate::model::listing::walk_key;
use crate::model::path::{RESERVED, RelPath, is_temp_name};
use crate::tree::walk::Gate;
use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use rustix::fs::{AtFlags, FileType};
use rustix::io::Errno;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, TrySendError, channel, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Hints buffered between the watcher and the replicator.
const QUEUE: usize = 1 << 16;

/// How far the first watch set has come: the last directory it reached, in walk order.
#[derive(Default)]
pub(crate) struct SetupFront {
    state: Mutex<Front>,
    moved: Condvar,
}

#[derive(Default)]
struct Front {
    /// The walk key ([`walk_key`]) of the last directory the set-up reached.
    at: Vec<u8>,
    /// Every directory there at the start is watched (or the watcher stopped).
    done: bool,
    watched: u64,
    since: Option<Instant>,
    took: Option<Duration>,
}

/// The watch set, as status shows it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SetupState {
    /// Directories watched so far.
    pub watched: u64,
    /// Every directory there at the start is watched.
    pub complete: bool,
    /// Seconds the first watch set took (or has taken so far).
    pub seconds: f64,
}

impl SetupFront {
    fn reached(&self, dir: &RelPath, watched: bool) {
        let mut f = self.state.lock().unwrap();
        f.at = walk_key(dir);
        f.watched += u64::from(watched);
        drop(f);
        self.moved.notify_all();
    }

    fn finish(&self) {
        let mut f = self.state.lock().unwrap();
        if !f.done {
            f.done = true;
            f.took = f.since.map(|s| s.elapsed());
        }
        drop(f);
        self.moved.notify_all();
    }

    pub(crate) fn state(&self) -> SetupState {
        let f = self.state.lock().unwrap();
        let seconds = f
            .took
            .or(f.since.map(|s| s.elapsed()))
            .unwrap_or_default()
            .as_secs_f64();
        SetupState {
            watched: f.watched,
            complete: f.done,
            seconds,
        }
    }

    fn wait_until(&self, passed: impl Fn(&Front) -> bool) {
        let mut f = self.state.lock().unwrap();
        while !f.done && !passed(&f) {
            f = self.moved.wait(f).unwrap();
        }
    }
}

impl Gate for SetupFront {
    fn wait_for(&self, dir: &RelPath) {
        let key = walk_key(dir);
        self.wait_until(|f| f.at >= key);
    }

    fn wait_all(&self) {
        self.wait_until(|_| false);
    }
}

/// Marks the set-up over however the set-up thread ends, so no walk waits for it forever.
struct Finished<'a>(&'a SetupFront);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// A running watch of one tree. Dropping it stops its threads.
pub(crate) struct Watcher {
    /// The hints, in order (one reader at a time: the replicator).
    pub hints: Mutex<Receiver<Hint>>,
    /// Set when hints were dropped (queue full, or the kernel's queue overflowed).
    pub overflowed: Arc<AtomicBool>,
    /// Set when the inotify watch limit was hit: parts of the tree are not watched.
    pub limited: Arc<AtomicBool>,
    /// How far the first watch set has come; a walk's [`Gate`].
    pub front: Arc<SetupFront>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What stops a watch from starting.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {path}: {reason}")]
pub(crate) struct WatchError {
    pub path: String,
    pub reason: String,
}

/// The message for the inotify watch limit, naming the sysctl to raise.
pub(crate) fn limit_message(root: &Path) -> String {
    let current = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_watches")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    format!(
        "the inotify watch limit (fs.inotify.max_user_watches = {current}) is too low to watch every \
         directory of {}: raise it (sysctl -w fs.inotify.max_user_watches=1048576); until then \
         hotsync re-scans the whole tree periodically instead of missing changes",
        root.display()
    )
}

/// The watched directories: each watch's parent watch and name (the root's parent is -1).
#[derive(Default)]
struct Table {
    dirs: HashMap<i32, (i32, Vec<u8>)>,
    by_name: HashMap<(i32, Vec<u8>), i32>,
    root: i32,
}

impl Table {
    /// The path of the directory watched as `wd`.
    fn path(&self, mut wd: i32) -> Option<RelPath> {
        let mut names: Vec<&[u8]> = Vec::new();
        while wd != self.root {
            let (parent, name) = self.dirs.get(&wd)?;
            names.push(name);
            wd = *parent;
        }
        let mut p = RelPath::root();
        for n in names.iter().rev() {
            p = p.join(n).ok()?;
        }
        Some(p)
    }

    fn insert(&mut self, wd: i32, parent: i32, name: Vec<u8>) {
        if let Some(old) = self.dirs.insert(wd, (parent, name.clone())) {
            self.by_name.remove(&old);
        }
        self.by_name.insert((parent, name), wd);
    }

    fn forget(&mut self, wd: i32) {
        if let Some(k) = self.dirs.remove(&wd) {
            self.by_name.remove(&k);
        }
    }

    /// A directory renamed within the tree: its watch (and so all beneath it) follows.
    fn rename(&mut self, from: (i32, Vec<u8>), to: (i32, Vec<u8>)) {
        if let Some(wd) = self.by_name.remove(&from) {
            self.dirs.insert(wd, to.clone());
            self.by_name.insert(to, wd);
        }
    }

    /// The watch of `name` in `parent` and every watch beneath it.
    fn subtree(&self, parent: i32, name: &[u8]) -> Vec<i32> {
        let Some(&top) = self.by_name.get(&(parent, name.to_vec())) else {
            return Vec::new();
        };
        let mut out = vec![top];
        let mut i = 0;
        while i < out.len() {
            let d = out[i];
            out.extend(
                self.dirs
                    .iter()
                    .filter(|(_, (p, _))| *p == d)
                    .map(|(w, _)| *w),
            );
            i += 1;
        }
        out
    }
}

/// What the two threads share.
struct Shared {
    fd: OwnedFd,
    root: PathBuf,
    /// The root, open, for listing directories beneath it.
    tree: crate::tree::fsroot::Root,
    table: Mutex<Table>,
    tx: SyncSender<Hint>,
    overflowed: Arc<AtomicBool>,
    limited: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Shared {
    fn send(&self, hints: impl IntoIterator<Item = Hint>) -> bool {
        for h in hints {
            match self.tx.try_send(h) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => self.overflowed.store(true, Ordering::Relaxed),
                Err(TrySendError::Disconnected(_)) => return false,
            }
        }
        true
    }

    /// Watches the directory `path` (under the watch `parent` as `name`), never following
    /// a symlink; `None` if it is gone or not a directory.
    fn watch(&self, path: &RelPath, parent: i32, name: &[u8]) -> Option<i32> {
        let abs = self.root.join(OsStr::from_bytes(path.as_bytes()));
        let flags = WatchFlags::CREATE
            | WatchFlags::DELETE
            | WatchFlags::MODIFY
            | WatchFlags::CLOSE_WRITE
            | WatchFlags::ATTRIB
            | WatchFlags::MOVED_FROM
            | WatchFlags::MOVED_TO
            | WatchFlags::DELETE_SELF
            | WatchFlags::MOVE_SELF
            | WatchFlags::ONLYDIR
            | WatchFlags::DONT_FOLLOW
            | WatchFlags::EXCL_UNLINK;
        // Added and recorded under the lock, so no event of the new watch is read before
        // its path is known.
        let mut table = self.table.lock().unwrap();
        match inotify::add_watch(&self.fd, &abs, flags) {
            Ok(wd) => {
                if path.is_root() {
                    table.root = wd;
                } else {
                    table.insert(wd, parent, name.to_vec());
                }
                Some(wd)
            }
            Err(Errno::NOSPC) => {
                if !self.limited.swap(true, Ordering::Relaxed) {
                    tracing::error!("{}", limit_message(&self.root));
                }
                None
            }
            Err(_) => None,
        }
    }

    /// Watches `path` and every directory beneath it, depth first in walk order; between
    /// directories it serves `urgent` first (directories that just appeared), so a long
    /// first walk never delays them. The first walk (`front` given) moves the front on.
    fn watch_tree(
        &self,
        path: RelPath,
        parent: i32,
        urgent: &Receiver<(RelPath, i32)>,
        front: Option<&SetupFront>,
    ) {
        // The bool: part of the first walk (urgent ones are not, and come out of order).
        let mut stack = vec![(path, parent, front.is_some())];
        while let Some((p, parent, first)) = stack.pop() {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            let wd = self.watch(&p, parent, p.name());
            // Listed after its watch is set: a subdirectory made meanwhile is seen either
            // way, by the listing or as an event.
            let children = wd.map(|_| subdirs(&self.tree, &p)).unwrap_or_default();
            if let Some(f) = front.filter(|_| first) {
                f.reached(&p, wd.is_some());
            }
            if let Some(wd) = wd {
                for name in children.into_iter().rev() {
                    if let Ok(child) = p.join(&name) {
                        stack.push((child, wd, first));
                    }
                }
            }
            while let Ok((q, qparent)) = urgent.try_recv() {
                stack.push((q, qparent, false));
            }
        }
    }
}

/// The subdirectories of `rel` in `root`, sorted; empty if it cannot be read.
fn subdirs(root: &crate::tree::fsroot::Root, rel: &RelPath) -> Vec<Vec<u8>> {
    let Ok(fd) = root.open_dir(rel) else {
        return Vec::new();
    };
    let Ok(mut dir) = rustix::fs::Dir::read_from(&fd) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    while let Some(Ok(e)) = dir.read() {
        let name = e.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let is_dir = match e.file_type() {
            FileType::Directory => true,
            FileType::Unknown => rustix::fs::statat(&fd, name, AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory),
            _ => false,
        };
        if is_dir {
            out.push(name.to_vec());
        }
    }
    out.sort();
    out
}

/// Starts watching `root` recursively. The watch set is built in the background, in walk
/// order; a walk that waits on [`Watcher::front`] reads only directories already watched.
pub(crate) fn start(root: &Path) -> Result<Watcher, WatchError> {
    let root = root.canonicalize().map_err(|e| WatchError {
        path: root.display().to_string(),
        reason: e.to_string(),
    })?;
    let fail = |reason: String| WatchError {
        path: root.display().to_string(),
        reason,
    };
    let fd = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)
        .map_err(|e| fail(io_reason(e)))?;
    let (tx, rx) = sync_channel(QUEUE);
    let tree = crate::tree::fsroot::Root::open(&root).map_err(|e| fail(e.to_string()))?;
    let shared = Arc::new(Shared {
        fd,
        root: root.clone(),
        tree,
        table: Mutex::new(Table::default()),
        tx,
        overflowed: Arc::new(AtomicBool::new(false)),
        limited: Arc::new(AtomicBool::new(false)),
        stop: Arc::new(AtomicBool::new(false)),
    });
    if shared.watch(&RelPath::root(), -1, b"").is_none() && !shared.limited.load(Ordering::Relaxed)
    {
        return Err(fail("it is not a directory that can be watched".into()));
    }
    let front = Arc::new(SetupFront::default());
    front.state.lock().unwrap().since = Some(Instant::now());
    let (urgent_tx, urgent_rx) = channel::<(RelPath, i32)>();
    let setup = {
        let (shared, front) = (shared.clone(), front.clone());
        std::thread::Builder::new()
            .name("hotsync-watches".into())
            .spawn(move || set_up(&shared, &front, urgent_rx))
            .map_err(|e| fail(e.to_string()))?
    };
    let reader = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("hotsync-inotify".into())
            .spawn(move || read_events(&shared, &urgent_tx))
            .map_err(|e| fail(e.to_string()))?
    };
    Ok(Watcher {
        hints: Mutex::new(rx),
        overflowed: shared.overflowed.clone(),
        limited: shared.limited.clone(),
        front,
        stop: shared.stop.clone(),
        threads: vec![setup, reader],
    })
}

fn io_reason(e: Errno) -> String {
    std::io::Error::from(e).to_string()
}

/// The setup thread: the whole tree first, then each directory that appears.
fn set_up(shared: &Shared, front: &SetupFront, urgent: Receiver<(RelPath, i32)>) {
    let finished = Finished(front);
    let root_wd = shared.table.lock().unwrap().root;
    front.reached(&RelPath::root(), true);
    for name in subdirs(&shared.tree, &RelPath::root()) {
        if let Ok(p) = RelPath::root().join(&name) {
            shared.watch_tree(p, root_wd, &urgent, Some(front));
        }
    }
    drop(finished);
    let st = front.state();
    tracing::debug!(
        "watching {} directories ({} ms to set up)",
        st.watched,
        (st.seconds * 1000.0) as u64
    );
    while !shared.stop.load(Ordering::Relaxed) {
        match urgent.recv_timeout(Duration::from_millis(100)) {
            Ok((p, parent)) => {
                shared.watch_tree(p, parent, &urgent, None);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => return,
        }
    }
}

/// A rename's first half, waiting for its second.
struct MovedFrom {
    cookie: u32,
    parent: i32,
    name: Vec<u8>,
    path: RelPath,
    is_dir: bool,
}

/// The reader thread: events in, hints out.
fn read_events(shared: &Shared, urgent: &Sender<(RelPath, i32)>) {
    let mut buf = vec![MaybeUninit::<u8>::uninit(); 64 * 1024];
    let mut reader = inotify::Reader::new(&shared.fd, &mut buf);
    let mut pending: Option<MovedFrom> = None;
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let ev = match reader.next() {
            Ok(ev) => ev,
            Err(Errno::AGAIN) => {
                // The batch is over: a move with no second half left the tree.
                if let Some(m) = pending.take() {
                    moved_out(shared, &m);
                }
                let mut fds = [rustix::event::PollFd::new(
                    &shared.fd,
                    rustix::event::PollFlags::IN,
                )];
                let timeout = rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 100_000_000,
                };
                let _ = rustix::event::poll(&mut fds, Some(&timeout));
                continue;
            }
            Err(Errno::INTR) => continue,
            Err(e) => {
                tracing::warn!("watcher: {}; re-scanning", io_reason(e));
                shared.send([Hint::RescanAll]);
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let (wd, mask, cookie) = (ev.wd(), ev.events(), ev.cookie());
        let name = ev.file_name().map(|n| n.to_bytes().to_vec());
        let ev = Ev {
            wd,
            mask,
            cookie,
            name,
        };
        let hints = hints_of(shared, urgent, &mut pending, ev);
        // A file made whole (by `link()`, as git makes its objects) is ready at once, as a
        // renamed one is; one being written waits to be closed or quiet. Asked outside the
        // table's lock.
        let hints = hints.into_iter().map(|h| match h {
            Hint::Created(p)
                if !p.is_reserved()
                    && crate::tree::fsroot::being_written(&shared.tree, &p) == Some(false) =>
            {
                Hint::Appeared(p)
            }
            h => h,
        });
        if !shared.send(hints) {
            return;
        }
    }
}

/// One inotify event, as read.
struct Ev {
    wd: i32,
    mask: ReadFlags,
    cookie: u32,
    name: Option<Vec<u8>>,
}

/// The hints of one event. A move's first half waits in `pending` for its second (the
/// same cookie next); a directory made or moved in is sent to `urgent` to be watched.
fn hints_of(
    shared: &Shared,
    urgent: &Sender<(RelPath, i32)>,
    pending: &mut Option<MovedFrom>,
    ev: Ev,
) -> Vec<Hint> {
    let Ev {
        wd,
        mask,
        cookie,
        name,
    } = ev;
    let mut table = shared.table.lock().unwrap();
    if mask.contains(ReadFlags::QUEUE_OVERFLOW) {
        vec![Hint::RescanAll]
    } else if mask.contains(ReadFlags::IGNORED) {
        let root_gone = wd == table.root;
        table.forget(wd);
        if root_gone {
            vec![Hint::RescanAll]
        } else {
            vec![]
        }
    } else if wd == table.root
        && name.is_none()
        && mask.intersects(ReadFlags::DELETE_SELF | ReadFlags::MOVE_SELF | ReadFlags::UNMOUNT)
    {
        // The root itself removed or moved: what is left must be looked at again.
        vec![Hint::RescanAll]
    } else if let Some(dir) = table.path(wd) {
        let is_dir = mask.contains(ReadFlags::ISDIR);
        let path = match &name {
            Some(n) => dir.join(n).ok(),
            None => Some(dir),
        };
        match (path, name) {
            (None, _) => vec![],
            // Its parent's event said it already.
            (Some(_), None) if mask.intersects(ReadFlags::DELETE_SELF | ReadFlags::MOVE_SELF) => {
                vec![]
            }
            (Some(path), name) => {
                let kind = Kind::of(mask);
                if let (Kind::MovedTo, Some(m)) = (kind, pending.as_ref())
                    && m.cookie == cookie
                {
                    let m = pending.take().unwrap();
                    if m.is_dir {
                        table.rename((m.parent, m.name), (wd, name.clone().unwrap_or_default()));
                    }
                    let mut h = translate(Kind::MovedTo, &path, false);
                    if !is_temp_name(m.path.name()) && !is_temp_name(path.name()) {
                        h.push(Hint::Renamed {
                            from: m.path,
                            to: path,
                        });
                    }
                    h
                } else {
                    if let Some(m) = pending.take() {
                        drop(table);
                        moved_out(shared, &m);
                    }
                    if kind == Kind::MovedFrom {
                        *pending = Some(MovedFrom {
                            cookie,
                            parent: wd,
                            name: name.clone().unwrap_or_default(),
                            path: path.clone(),
                            is_dir,
                        });
                    }
                    // A directory made or moved in: watch it (and what it holds).
                    if is_dir && matches!(kind, Kind::Created | Kind::MovedTo) {
                        let _ = urgent.send((path.clone(), wd));
                    }
                    translate(kind, &path, is_dir)
                }
            }
        }
    } else {
        vec![]
    }
}

/// A directory moved out of the tree: its watches (and those beneath) go.
fn moved_out(shared: &Shared, m: &MovedFrom) {
    if !m.is_dir {
        return;
    }
    let mut table = shared.table.lock().unwrap();
    for wd in table.subtree(m.parent, &m.name) {
        let _ = inotify::remove_watch(&shared.fd, wd);
        table.forget(wd);
    }
}

/// What an inotify event says happened, before its path is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Created,
    Modified,
    Written,
    Attrib,
    Removed,
    MovedFrom,
    MovedTo,
    Other,
}

impl Kind {
    fn of(mask: ReadFlags) -> Kind {
        if mask.contains(ReadFlags::CREATE) {
            Kind::Created
        } else if mask.contains(ReadFlags::CLOSE_WRITE) {
            Kind::Written
        } else if mask.contains(ReadFlags::MODIFY) {
            Kind::Modified
        } else if mask.contains(ReadFlags::ATTRIB) {
            Kind::Attrib
        } else if mask.contains(ReadFlags::DELETE) {
            Kind::Removed
        } else if mask.contains(ReadFlags::MOVED_FROM) {
            Kind::MovedFrom
        } else if mask.contains(ReadFlags::MOVED_TO) {
            Kind::MovedTo
        } else {
            Kind::Other
        }
    }
}

/// The hints one event on `path` carries.
fn translate(kind: Kind, path: &RelPath, is_dir: bool) -> Vec<Hint> {
    if is_temp_name(path.name()) {
        return vec![];
    }
    // A flush's marker: its creation is the barrier; anything else done to it is nothing,
    // and so is another process's marker (one that died mid-flush).
    if path.parent_bytes() == RESERVED
        && let Some((owner, id)) = crate::tree::reserved::parse_marker(path.name())
    {
        return match kind {
            Kind::Created if owner == std::process::id() => vec![Hint::Barrier { id }],
            _ => vec![],
        };
    }
    let p = path.clone();
    vec![match kind {
        Kind::Created if is_dir => Hint::DirAppeared(p),
        Kind::Created => Hint::Created(p),
        Kind::Modified => Hint::Modified(p),
        Kind::Written => Hint::Written(p),
        Kind::Attrib => Hint::Attrib(p),
        Kind::Removed => Hint::Removed(p),
        Kind::MovedFrom => Hint::MovedFrom(p),
        Kind::MovedTo => Hint::MovedTo(p),
        Kind::Other => Hint::RescanDir(p.split().0),
    }]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn a_flush_marker_is_a_barrier_when_made_and_nothing_after() {
        let m = p(&format!(".hotsync/flush-{}-3", std::process::id()));
        assert_eq!(
            translate(Kind::Created, &m, false),
            vec![Hint::Barrier { id: 3 }]
        );
        // Another process's marker is nothing to this one.
        let other = std::process::id().wrapping_add(1);
        let theirs = p(&format!(".hotsync/flush-{other}-3"));
        assert_eq!(translate(Kind::Created, &theirs, false), vec![]);
        assert_eq!(translate(Kind::Written, &m, false), vec![]);
        assert_eq!(translate(Kind::Removed, &m, false), vec![]);
        // Elsewhere a file of that name is a file.
        assert_eq!(
            translate(Kind::Created, &p("d/flush-7-3"), false),
            vec![Hint::Created(p("d/flush-7-3"))]
        );
    }

    #[test]
    fn events_become_hints() {
        let a = p("a");
        let of = |m: ReadFlags| Kind::of(m);
        assert_eq!(
            translate(of(ReadFlags::CLOSE_WRITE), &a, false),
            vec![Hint::Written(a.clone())]
        );
        assert_eq!(
            translate(of(ReadFlags::CREATE | ReadFlags::ISDIR), &p("d"), true),
            vec![Hint::DirAppeared(p("d"))]
        );
        assert_eq!(
            translate(of(ReadFlags::MODIFY), &a, false),
            vec![Hint::Modified(a.clone())]
        );
        assert_eq!(
            translate(of(ReadFlags::ATTRIB), &a, false),
            vec![Hint::Attrib(a.clone())]
        );
        assert_eq!(
            translate(of(ReadFlags::DELETE), &a, false),
            vec![Hint::Removed(a.clone())]
        );
        assert_eq!(
            translate(of(ReadFlags::MOVED_FROM), &a, false),
            vec![Hint::MovedFrom(a.clone())]
        );
        assert_eq!(
            translate(of(ReadFlags::MOVED_TO), &a, false),
            vec![Hint::MovedTo(a.clone())]
        );
        assert_eq!(
            translate(Kind::Created, &p(".hotsync-tmp.0123456789abcdef"), false),
            vec![]
        );
    }

    #[test]
    fn a_renamed_directory_moves_everything_beneath_it() {
        let mut t = Table {
            root: 1,
            ..Table::default()
        };
        t.insert(2, 1, b"a".to_vec());
        t.insert(3, 2, b"b".to_vec());
        t.insert(4, 1, b"c".to_vec());
        assert_eq!(t.path(3), Some(p("a/b")));
        t.rename((1, b"a".to_vec()), (4, b"x".to_vec()));
        assert_eq!(t.path(3), Some(p("c/x/b")));
        let mut sub = t.subtree(4, b"x");
        sub.sort();
        assert_eq!(sub, [2, 3]);
        t.forget(2);
        assert_eq!(t.path(3), None);
    }

    fn wait_hint(w: &Watcher, want: impl Fn(&Hint) -> bool) -> bool {
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(h) = w
                .hints
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_millis(50))
                && want(&h)
            {
                return true;
            }
        }
        false
    }

    #[test]
    fn the_setup_front_lets_a_walk_read_only_what_is_watched() {
        let f = Arc::new(SetupFront::default());
        f.reached(&p("b"), true);
        // Behind the front (in walk order): no wait.
        f.wait_for(&p(""));
        f.wait_for(&p("a/deep/x"));
        f.wait_for(&p("b"));
        let (tx, rx) = std::sync::mpsc::channel();
        let waiting = {
            let f = f.clone();
            std::thread::spawn(move || {
                f.wait_for(&p("b/x"));
                tx.send("b/x").unwrap();
                f.wait_all();
                tx.send("all").unwrap();
            })
        };
        f.reached(&p("b/x"), false);
        assert_eq!(rx.recv().unwrap(), "b/x");
        f.finish();
        assert_eq!(rx.recv().unwrap(), "all");
        waiting.join().unwrap();
        let st = f.state();
        assert!(st.complete);
        assert_eq!(st.watched, 1);
    }

    #[test]
    fn a_file_made_by_link_is_complete_at_once_and_one_held_open_is_not() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("objects")).unwrap();
        let w = start(t.path()).unwrap();
        w.front.wait_all();
        // As git makes an object: a temp written and closed, linked to its name, unlinked.
        std::fs::write(t.path().join("objects/tmp_obj"), b"blob").unwrap();
        std::fs::hard_link(
            t.path().join("objects/tmp_obj"),
            t.path().join("objects/ab12"),
        )
        .unwrap();
        std::fs::remove_file(t.path().join("objects/tmp_obj")).unwrap();
        assert!(wait_hint(&w, |h| *h == Hint::Appeared(p("objects/ab12"))));
        // A symlink is whole when made.
        std::os::unix::fs::symlink("ab12", t.path().join("objects/sym")).unwrap();
        assert!(wait_hint(&w, |h| *h == Hint::Appeared(p("objects/sym"))));
        // A file still open for writing may be half written: it waits as before.
        let mut open = std::fs::File::create(t.path().join("log")).unwrap();
        assert!(wait_hint(&w, |h| {
            assert_ne!(*h, Hint::Appeared(p("log")), "an open file is not complete");
            *h == Hint::Created(p("log"))
        }));
        std::io::Write::write_all(&mut open, b"line\n").unwrap();
        drop(open);
        assert!(wait_hint(&w, |h| *h == Hint::Written(p("log"))));
    }

    #[test]
    fn a_real_tree_is_watched_through_renames_and_new_directories() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("a/b")).unwrap();
        let w = start(t.path()).unwrap();
        w.front.wait_all();
        let st = w.front.state();
        assert!(st.complete && st.watched == 3, "{st:?}");
        std::fs::write(t.path().join("a/b/f"), b"1").unwrap();
        assert!(wait_hint(&w, |h| *h == Hint::Written(p("a/b/f"))));
        // A renamed directory's contents are reported at their new path.
        std::fs::rename(t.path().join("a"), t.path().join("z")).unwrap();
        assert!(wait_hint(&w, |h| *h
            == Hint::Renamed {
                from: p("a"),
                to: p("z")
            }));
        std::fs::write(t.path().join("z/b/g"), b"1").unwrap();
        assert!(wait_hint(&w, |h| *h == Hint::Written(p("z/b/g"))));
        // A new directory, and one made inside it at once, are watched.
        std::fs::create_dir_all(t.path().join("n/m")).unwrap();
        assert!(wait_hint(&w, |h| *h == Hint::DirAppeared(p("n"))));
        std::thread::sleep(Duration::from_millis(100));
        std::fs::write(t.path().join("n/m/h"), b"1").unwrap();
        assert!(wait_hint(&w, |h| *h == Hint::Written(p("n/m/h"))));
        // Moved out of the tree: no longer watched, and reported as gone.
        let out = tempfile::tempdir().unwrap();
        std::fs::rename(t.path().join("n"), out.path().join("n")).unwrap();
        assert!(wait_hint(&w, |h| *h == Hint::MovedFrom(p("n"))));
        std::thread::sleep(Duration::from_millis(300));
        std::fs::write(out.path().join("n/m/lost"), b"1").unwrap();
        std::fs::write(t.path().join("after"), b"1").unwrap();
        assert!(wait_hint(&w, |h| {
            assert!(
                !matches!(h, Hint::Written(q) if q.name() == b"lost"),
                "{h:?}"
            );
            *h == Hint::Written(p("after"))
        }));
    }
}
