//! The standby's side of a tree. A [`Standby`] owns the root for the life of the process
//! (`serve`, or a primary's in-process receiver for a local DEST): the lock that keeps any
//! other hotsync from writing it, the durable state file `.hotsync/state`, and the registry
//! of the sessions it has admitted, which is what its status reports.
//!
//! - this module: opening the tree, its lock and reserved area, its durable state;
//! - `sessions`: the registry of admitted sessions and the epoch rules at admission;
//! - `promote`: promotion (with the hand-over of a fenced primary's sessions) and rejoin;
//! - `view`: what the standby's status shows of the primaries it served;
//! - [`receiver`]: one primary's session on the tree, stream by stream;
//! - [`server`]: `hotsync serve`, accepting primaries through a transport;
//! - [`rejoin`]: a former primary's tree made a standby again, its unconfirmed writes kept.
//!
//! This side imports only the layers below it (model, tree, transport, wire, ops); the
//! primary's side runs it in-process for a local DEST.

mod promote;
pub mod receiver;
pub mod rejoin;
pub mod server;
mod sessions;
mod view;

use crate::error::{Error, Result};
use crate::model::epoch::TreeState;
use crate::model::status::Space;
use crate::transport::identity::NodeId;
use crate::tree::fsroot::{self, Root};
use crate::tree::reserved::{Area, STANDBY_LOCK};
use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;
use sessions::PeerRecord;
use std::fs::File;
use std::io;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
/// What a process may do with a standby tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Receive a mirror (takes the tree's lock).
    Write,
    /// Only list and hash (verify, dry runs); a missing directory lists as empty.
    ReadOnly,
}

pub use crate::model::epoch::{Position, Role};
pub use promote::PromoteReport;
pub(crate) use sessions::{Admission, Cut, Peer, SessionEntry, SessionPulse, SessionReport};

/// A standby tree, open for the life of the process.
pub struct Standby {
    path: PathBuf,
    /// `None` only for a read-only standby whose directory does not exist yet (a dry run).
    root: Option<Root>,
    access: Access,
    /// Held while we may write: no other hotsync process writes this tree meanwhile. Taken
    /// at open, or at the first writing session if the tree was not writable then; with it,
    /// the tree's `.hotsync/`.
    lock: Mutex<Option<(Area, File)>>,
    /// Where writing sessions stage their temps, once the lock is held.
    temps: Mutex<Option<crate::tree::atomic::TempPlace>>,
    owners: bool,
    state: Mutex<TreeState>,
    /// Position changes not yet written to the state file, and when it was last written.
    unsaved: Mutex<(bool, Option<Instant>)>,
    sessions: Mutex<Vec<Arc<SessionEntry>>>,
    peers: Mutex<Vec<PeerRecord>>,
    next_serial: AtomicU64,
    /// When a change was last made durable here.
    committed_at: Mutex<Option<(Instant, SystemTime)>>,
    /// Told of what happens to the tree (a `serve --json` prints it).
    events: std::sync::OnceLock<EventSink>,
    /// The attribute namespaces this tree can store, found at the first session.
    xattrs: std::sync::OnceLock<crate::model::xattrs::Policy>,
    /// How batches are made durable here, found at the first session.
    durability: std::sync::OnceLock<crate::tree::atomic::Durability>,
    /// The tree's filesystem refused to clone a file (ext4): a large file changed in a
    /// few places is patched in place without trying again.
    no_clone: std::sync::atomic::AtomicBool,
    /// The open window of the undo log (DESIGN §10), when the tree has a consistent point
    /// to go back to.
    journal: crate::tree::undo::Slot,
    /// What a promotion gives back: the last consistent point (changes after it are kept
    /// in the undo log) or the latest state.
    consistency: Mutex<crate::model::epoch::Consistency>,
    /// A change was made durable here since the last consistent point (or since this
    /// process opened the tree, which cannot tell what came before).
    changed_since_point: std::sync::atomic::AtomicBool,
}

/// Receives a standby's events: a name and its details.
pub type EventSink = Box<dyn Fn(&str, serde_json::Value) + Send + Sync>;

impl Standby {
    /// Opens the tree at `path`. With [`Access::Write`] it takes the tree's lock for the
    /// life of this object (if the tree is read-only now, at the first writing session) and
    /// reads `.hotsync/state`.
    ///
    /// # Errors
    /// [`Error::Usage`]: the directory is missing or not one, another hotsync process holds
    /// its lock, or its state file is damaged.
    pub fn open(path: &Path, access: Access) -> Result<Standby> {
        Standby::open_within(path, access, Duration::ZERO)
    }

    /// [`Standby::open`], waiting up to `wait` for another process to let go of the lock
    /// (`promote` and `rejoin`, which Keepalived may run twice at once).
    pub fn open_within(path: &Path, access: Access, wait: Duration) -> Result<Standby> {
        let shown = path.display();
        let root = match Root::open(path) {
            Ok(r) => Some(r),
            Err(e) if access == Access::ReadOnly && e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(Error::Usage(match e.raw_os_error() {
                    Some(c) if c == Errno::NOENT.raw_os_error() => {
                        format!("DEST {shown} does not exist")
                    }
                    Some(c) if c == Errno::NOTDIR.raw_os_error() => {
                        format!("DEST {shown} is not a directory")
                    }
                    _ => format!("cannot open DEST {shown}: {e}"),
                }));
            }
        };
        fsroot::raise_fd_limit();
        let standby = Standby {
            path: path.to_path_buf(),
            root,
            access,
            lock: Mutex::new(None),
            temps: Mutex::new(None),
            owners: fsroot::can_chown(),
            state: Mutex::new(TreeState::fresh(Role::Standby, None)),
            unsaved: Mutex::new((false, None)),
            sessions: Mutex::new(Vec::new()),
            peers: Mutex::new(Vec::new()),
            next_serial: AtomicU64::new(1),
            committed_at: Mutex::new(None),
            events: std::sync::OnceLock::new(),
            xattrs: std::sync::OnceLock::new(),
            durability: std::sync::OnceLock::new(),
            no_clone: std::sync::atomic::AtomicBool::new(false),
            journal: Default::default(),
            consistency: Mutex::new(Default::default()),
            changed_since_point: std::sync::atomic::AtomicBool::new(true),
        };
        if access == Access::Write {
            match standby.take_lock(wait) {
                Ok(()) => {}
                Err(LockError::InUse(m)) => return Err(Error::Usage(m)),
                // A tree that cannot be written now may be later (a remount): each writing
                // session will try again, and be refused with this reason meanwhile.
                Err(LockError::NotWritable(m)) => tracing::warn!("{m}"),
            }
            let read = standby.with_area(|a| a.read_state());
            if let Some(st) = read.transpose()?.flatten() {
                *standby.state.lock().unwrap() = st;
            }
            // A promotion that ended before its roll-back: the tree is a primary now and
            // must stand at its consistent point before anything reads it.
            if standby.state().role == Role::Primary && standby.journal.lock().unwrap().is_some() {
                standby.roll_back().map_err(|e| {
                    Error::Usage(format!(
                        "cannot roll {} back to its consistent point: {e}",
                        path.display()
                    ))
                })?;
            }
        }
        Ok(standby)
    }

    /// The tree's path, as it was given.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The tree root; only a dry run against a missing DEST has none.
    pub(crate) fn root(&self) -> io::Result<&Root> {
        self.root
            .as_ref()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "DEST does not exist"))
    }

    /// How batches are made durable on this tree's filesystem, decided once (by its
    /// `statfs` type) and said once where `syncfs` is not trusted.
    pub(crate) fn durability(&self) -> crate::tree::atomic::Durability {
        *self.durability.get_or_init(|| {
            let Some(root) = &self.root else {
                // A dry run against a missing DEST: nothing is ever committed.
                return crate::tree::atomic::Durability::default();
            };
            let (d, fs) = crate::tree::atomic::Durability::of(root.fd());
            if !d.trusts_syncfs {
                tracing::info!(
                    "{}: its filesystem ({fs}) is not one whose syncfs is known to reach the \
                     disk: each file and directory a batch changes is fsynced one by one",
                    self.path.display()
                );
            }
            d
        })
    }

    /// Whether owner and group are preserved here (this process runs as root).
    pub(crate) fn owners(&self) -> bool {
        self.owners
    }

    /// The extended attributes and ACLs this tree can store, tried once on a scratch file
    /// in it. A tree that cannot be written now is taken to store what its privileges
    /// allow; one whose filesystem has no attributes is said so once.
    pub(crate) fn xattrs_can(&self) -> crate::model::xattrs::Policy {
        *self.xattrs.get_or_init(|| {
            let root = rustix::process::geteuid().is_root();
            let guess = crate::model::xattrs::Policy {
                user: true,
                trusted: root,
                security: root,
                selinux: crate::tree::xattr::selinux_enabled(),
                acls: true,
            };
            // In the reserved area: a scratch file in the tree would change its root's mtime.
            let probed = self.with_area(|a| {
                let (f, name) = fsroot::create_temp(a.fd()).ok()?;
                let can = crate::tree::xattr::probe(f.as_fd());
                drop(f);
                let _ = rustix::fs::unlinkat(a.fd(), name.as_slice(), rustix::fs::AtFlags::empty());
                Some(can)
            });
            let Some(can) = probed.flatten() else {
                return guess;
            };
            let lacks = guess.missing_in(&can);
            if !lacks.is_empty() {
                let lacks = lacks.join(", ");
                crate::tree::xattr::say_once(
                    &lacks,
                    &format!(
                        "the standby tree {} cannot store {lacks}: they are not mirrored there",
                        self.path.display(),
                    ),
                );
            }
            can
        })
    }

    /// The tree's durable state as last read or written.
    pub(crate) fn state(&self) -> TreeState {
        self.state.lock().unwrap().clone()
    }

    /// Takes the lock in `.hotsync/` (one writing process per tree).
    fn take_lock(&self, wait: Duration) -> std::result::Result<(), LockError> {
        let shown = self.path.display();
        let not_writable =
            |e: io::Error| LockError::NotWritable(format!("DEST {shown} is not writable: {e}"));
        let root = self
            .root
            .as_ref()
            .ok_or_else(|| LockError::NotWritable(format!("DEST {shown} does not exist")))?;
        let area = Area::open(root, &self.path).map_err(not_writable)?;
        let Some(lock) = area.lock_within(STANDBY_LOCK, wait).map_err(not_writable)? else {
            return Err(LockError::InUse(format!(
                "DEST {shown} is in use by another hotsync process (lock {shown}/.hotsync/lock)"
            )));
        };
        area.remove_temps();
        let temps = area
            .open_temps()
            .and_then(|fd| crate::tree::atomic::TempPlace::new(Arc::new(fd)))
            .map_err(|e| {
                LockError::NotWritable(format!(
                    "DEST {shown} is not writable: cannot prepare {shown}/.hotsync/tmp: {e}"
                ))
            })?;
        // A large file a crash caught mid-patch is put back as it was, before anything
        // reads the tree (or rolls it back).
        match crate::tree::patch::recover(root, area.fd()) {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                "{shown}: {n} large file(s) a crash caught while patched in place put back as \
                 they were"
            ),
            Err(e) => {
                return Err(LockError::NotWritable(format!(
                    "cannot put back the files patched in place ({shown}/.hotsync/patch): {e}"
                )));
            }
        }
        // A window a restart interrupted goes on: the tree is not at its consistent point
        // until the next one, and a promote rolls back to it. Taken up with the lock, so
        // that every window on disk is the one in memory.
        let window = crate::tree::undo::Journal::resume(root, area.fd()).map_err(|e| {
            LockError::NotWritable(format!(
                "cannot read the undo log in {shown}/.hotsync/undo: {e}"
            ))
        })?;
        *self.journal.lock().unwrap() = window;
        *self.temps.lock().unwrap() = Some(temps);
        *self.lock.lock().unwrap() = Some((area, lock));
        Ok(())
    }

    /// Where a writing session stages its temps (`None` before the lock is held).
    pub(crate) fn temps(&self) -> Option<crate::tree::atomic::TempPlace> {
        self.temps.lock().unwrap().clone()
    }

    /// The undo log's slot, for the sessions that write the tree.
    pub(crate) fn journal(&self) -> crate::tree::undo::Slot {
        self.journal.clone()
    }

    /// Chooses what a promotion gives back (see [`crate::model::epoch::Consistency`]); with
    /// `Latest`, no undo log is kept from the next consistent point on.
    pub fn set_consistency(&self, c: crate::model::epoch::Consistency) {
        *self.consistency.lock().unwrap() = c;
    }

    /// The writing session's primary says the tree is at a consistent point: every change
    /// of batch `seq` (of the current epoch) is durable here and the primary's tree stood
    /// so at `at_ms`. Recorded durably, then the undo log starts a new window from there
    /// (nothing before it can be undone any more).
    pub(crate) fn hold_consistent(&self, seq: u64, at_ms: u64) -> io::Result<bool> {
        let point = |st: &mut TreeState| {
            let position = Position {
                epoch: st.epoch,
                seq,
            };
            st.acknowledge(position);
            st.consistent = Some(crate::model::epoch::ConsistentPoint { position, at_ms });
            position
        };
        self.changed_since_point
            .store(false, std::sync::atomic::Ordering::Relaxed);
        match *self.consistency.lock().unwrap() {
            crate::model::epoch::Consistency::Consistent => {
                // Durable before the window moves: a crash between must find the point
                // the log goes back to.
                let mut st = self.state();
                let position = point(&mut st);
                st.updated = crate::model::clock::now_rfc3339();
                self.write_state(&st)?;
                self.open_window(position, at_ms).map(|()| true)
            }
            crate::model::epoch::Consistency::Latest => {
                // Only a record here (nothing is undone to it): written with the positions,
                // at most once a second, so the primary's next batch does not wait on it.
                point(&mut self.state.lock().unwrap());
                self.unsaved.lock().unwrap().0 = true;
                self.save_if_due(Instant::now(), false);
                self.close_window().map(|()| false)
            }
        }
    }

    /// The writing session's primary cannot tell consistent points (an older protocol):
    /// the tree has none from now on, and no undo log is kept.
    pub(crate) fn forget_consistency(&self) -> io::Result<()> {
        self.close_window()?;
        let mut st = self.state();
        if st.consistent.take().is_some() {
            tracing::warn!(
                "the primary speaks an older protocol, without consistent points: {} has no \
                 consistent point from now on (a failover gives each file as fresh as it got)",
                self.path.display()
            );
            st.updated = crate::model::clock::now_rfc3339();
            self.write_state(&st)?;
        }
        Ok(())
    }

    /// Closes the open window of the undo log, if any: what it kept is dropped.
    fn close_window(&self) -> io::Result<()> {
        let mut slot = self.journal.lock().unwrap();
        // No window in memory is none on disk either: one left by an earlier run is resumed
        // at open. Under `latest` this is every consistent point: no I/O for nothing.
        if slot.take().is_none() {
            return Ok(());
        }
        self.with_area(|a| crate::tree::undo::close(a.fd()))
            .unwrap_or(Ok(()))
    }

    /// Opens a new window of the undo log after the consistent point `base` (reached at
    /// `at_ms` on the primary): the last one closes, nothing before `base` can be undone
    /// any more.
    pub(crate) fn open_window(&self, base: Position, at_ms: u64) -> io::Result<()> {
        let root = self.root()?;
        let mut slot = self.journal.lock().unwrap();
        *slot = None;
        let j = self
            .with_area(|a| crate::tree::undo::Journal::begin(root, a.fd(), base, at_ms))
            .ok_or_else(|| io::Error::other("the tree's lock is not held"))??;
        *slot = Some(j);
        Ok(())
    }

    /// Puts the tree back at the consistent point of its open window, if it has one, and
    /// closes the window.
    pub(crate) fn roll_back(&self) -> io::Result<Option<crate::tree::undo::RolledBack>> {
        let root = self.root()?;
        let mut slot = self.journal.lock().unwrap();
        *slot = None;
        self.with_area(|a| crate::tree::undo::roll_back(root, a.fd()))
            .unwrap_or(Ok(None))
    }

    /// The chunk digests (in chunks of `chunk` bytes) of the tree's file that is `st` now,
    /// from its block index, if one holds: a delta against it need not read it whole.
    pub(crate) fn indexed(
        &self,
        st: &rustix::fs::Stat,
        chunk: u64,
    ) -> Option<Vec<crate::model::manifest::Hash>> {
        self.with_area(|a| crate::tree::blockindex::load(a.fd(), st, chunk))
            .flatten()
    }

    /// Whether the tree's filesystem refused to clone a file.
    pub(crate) fn cannot_clone(&self) -> bool {
        self.no_clone.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The tree's filesystem refused to clone a file: it cannot.
    pub(crate) fn refused_clone(&self) {
        self.no_clone
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Records the chunk digests of the tree's file that is `st` now, starting from the
    /// index of the inode `base` it replaced if there is one (a cache: a failure only
    /// costs the next delta a read of the file).
    pub(crate) fn index(
        &self,
        st: &rustix::fs::Stat,
        chunk: u64,
        digests: Vec<crate::model::manifest::Hash>,
        base: Option<u64>,
    ) {
        if let Some(Err(e)) =
            self.with_area(|a| crate::tree::blockindex::store(a.fd(), st, chunk, digests, base))
        {
            tracing::debug!("cannot record the block index of inode {}: {e}", st.st_ino);
        }
    }

    /// Runs `f` on the reserved area (`None` before the lock is held).
    pub(crate) fn in_area<T>(&self, f: impl FnOnce(std::os::fd::BorrowedFd<'_>) -> T) -> Option<T> {
        self.with_area(|a| f(a.fd()))
    }

    fn with_area<T>(&self, f: impl FnOnce(&Area) -> T) -> Option<T> {
        self.lock.lock().unwrap().as_ref().map(|(a, _)| f(a))
    }

    /// Finds a read-only tree now, with one clear message, rather than once per file.
    fn probe_writable(&self) -> std::result::Result<(), String> {
        let shown = self.path.display();
        let not_writable = |e: io::Error| format!("DEST {shown} is not writable: {e}");
        let root = self.root().map_err(not_writable)?;
        // Without touching the root, whose mtime is mirrored.
        rustix::fs::accessat(
            root.fd(),
            c".",
            rustix::fs::Access::WRITE_OK,
            AtFlags::EACCESS,
        )
        .map_err(|e| not_writable(e.into()))?;
        let area = Area::open(root, &self.path).map_err(not_writable)?;
        // A fixed name, under the lock: a probe left by a kill is reused, never piles up.
        rustix::fs::openat(
            area.fd(),
            c"write-probe",
            OFlags::WRONLY | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| not_writable(e.into()))?;
        let _ = rustix::fs::unlinkat(area.fd(), c"write-probe", AtFlags::empty());
        Ok(())
    }

    /// The state file's path, for messages.
    fn state_shown(&self) -> String {
        format!("{}/.hotsync/state", self.path.display())
    }

    /// A writing session's primary says batch `pos` is durable here (its heartbeat): kept
    /// in memory at once, written to the state file at most once a second.
    pub(crate) fn note_position(&self, pos: Position, primary: Option<NodeId>, now: Instant) {
        {
            let mut st = self.state.lock().unwrap();
            if pos.epoch != st.epoch || pos <= st.position || st.role != Role::Standby {
                return;
            }
            st.acknowledge(pos);
            st.adopt(pos.epoch, primary.map(|id| id.to_string()));
        }
        self.unsaved.lock().unwrap().0 = true;
        self.save_if_due(now, false);
    }

    /// Writes the state file if positions changed since it was last written, at most once
    /// a second unless `force`. A failure (a full or read-only disk) is logged: the file is
    /// a record, replication does not depend on it.
    pub(crate) fn save_if_due(&self, now: Instant, force: bool) {
        let mut unsaved = self.unsaved.lock().unwrap();
        let due = unsaved
            .1
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1));
        if !unsaved.0 || !(due || force) || self.access != Access::Write {
            return;
        }
        let mut st = self.state();
        st.updated = crate::model::clock::now_rfc3339();
        match self.write_state(&st) {
            Ok(()) => *unsaved = (false, Some(now)),
            Err(e) => tracing::warn!("cannot write {}: {e}", self.state_shown()),
        }
    }

    /// Sends this standby's events (sessions, epochs, promotion, fences, rejoin) to `sink`.
    pub fn on_events(&self, sink: EventSink) {
        let _ = self.events.set(sink);
    }

    /// Tells the event sink, if there is one.
    pub(crate) fn event(&self, name: &str, details: serde_json::Value) {
        if let Some(sink) = self.events.get() {
            sink(name, details);
        }
    }

    /// Changes were made durable here just now (for the age of the newest one).
    pub(crate) fn committed(&self) {
        *self.committed_at.lock().unwrap() = Some((Instant::now(), SystemTime::now()));
        self.changed_since_point
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The tree's consistent point as `status` shows it, at `wall`.
    pub(crate) fn consistency_status(
        &self,
        wall: SystemTime,
    ) -> crate::model::status::ConsistencyStatus {
        let point = self.state().consistent;
        let at_point = point.is_some() && !self.changed_since_point();
        let at = point.map(|p| std::time::UNIX_EPOCH + Duration::from_millis(p.at_ms));
        crate::model::status::ConsistencyStatus {
            policy: *self.consistency.lock().unwrap(),
            point: at.map(crate::model::clock::rfc3339),
            position: point.map(|p| p.position),
            at_point,
            age_seconds: at.map(|t| {
                if at_point {
                    0.0
                } else {
                    wall.duration_since(t).unwrap_or_default().as_secs_f64()
                }
            }),
        }
    }

    /// Whether a change may have been made here since the last consistent point.
    pub(crate) fn changed_since_point(&self) -> bool {
        self.changed_since_point
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The tree's filesystem.
    pub(crate) fn space(&self) -> Option<Space> {
        self.root.as_ref().and_then(|r| Space::of(r.fd()).ok())
    }

    /// Writes `st` as the tree's state, atomically and durably.
    pub(crate) fn write_state(&self, st: &TreeState) -> io::Result<()> {
        self.with_area(|a| a.write_state(st)).unwrap_or_else(|| {
            Err(io::Error::other(format!(
                "{} is not held for writing",
                self.path.display()
            )))
        })?;
        *self.state.lock().unwrap() = st.clone();
        Ok(())
    }
}

/// Why the tree's lock was not taken.
enum LockError {
    /// Another hotsync process holds it.
    InUse(String),
    /// The tree cannot be written now (it may be later: a remount).
    NotWritable(String),
}

impl LockError {
    /// The refusal's text.
    fn message(self) -> String {
        match self {
            LockError::InUse(m) | LockError::NotWritable(m) => m,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noop() -> Cut {
        Box::new(|_| {})
    }

    #[test]
    fn the_lock_keeps_a_second_process_out_for_the_standby_s_life() {
        let t = tempfile::tempdir().unwrap();
        let first = Standby::open(t.path(), Access::Write).unwrap();
        // flock is per open file description: a second open in this process stands in for
        // another process.
        let e = Standby::open(t.path(), Access::Write).err().unwrap();
        assert!(
            e.to_string().contains("in use by another hotsync process"),
            "{e}"
        );
        assert!(Standby::open(t.path(), Access::ReadOnly).is_ok());
        drop(first);
        assert!(Standby::open(t.path(), Access::Write).is_ok());
    }

    #[test]
    fn state_round_trips_and_damage_is_an_error_not_a_reset() {
        let t = tempfile::tempdir().unwrap();
        {
            let s = Standby::open(t.path(), Access::Write).unwrap();
            assert_eq!(s.state().epoch, 1);
            let mut st = s.state();
            st.acknowledge(Position { epoch: 1, seq: 42 });
            s.write_state(&st).unwrap();
        }
        let s = Standby::open(t.path(), Access::Write).unwrap();
        assert_eq!(s.state().position.seq, 42);
        drop(s);
        let file = t.path().join(".hotsync/state");
        let full = std::fs::read(&file).unwrap();
        std::fs::write(&file, &full[..full.len() / 2]).unwrap();
        let e = Standby::open(t.path(), Access::Write)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("state is damaged") && e.contains("move it away"),
            "{e}"
        );
        let newer = String::from_utf8(full)
            .unwrap()
            .replace("\"format\": 1", "\"format\": 9");
        std::fs::write(&file, newer).unwrap();
        let e = Standby::open(t.path(), Access::Write)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("format 9"), "{e}");
    }

    #[test]
    fn opening_a_tree_leaves_its_mtime_alone() {
        let t = tempfile::tempdir().unwrap();
        let at = rustix::fs::Timespec {
            tv_sec: 1_500_000_000,
            tv_nsec: 5,
        };
        rustix::fs::utimensat(
            rustix::fs::CWD,
            t.path(),
            &rustix::fs::Timestamps {
                last_access: at,
                last_modification: at,
            },
            AtFlags::empty(),
        )
        .unwrap();
        let _s = Standby::open(t.path(), Access::Write).unwrap();
        assert!(t.path().join(".hotsync/lock").exists());
        let st = rustix::fs::stat(t.path()).unwrap();
        assert_eq!((st.st_mtime, st.st_mtime_nsec), (1_500_000_000, 5));
    }

    #[test]
    fn a_missing_tree_is_an_error_unless_only_read() {
        let t = tempfile::tempdir().unwrap();
        let missing = t.path().join("nope");
        let e = Standby::open(&missing, Access::Write).err().unwrap();
        assert!(e.to_string().contains("does not exist"), "{e}");
        let s = Standby::open(&missing, Access::ReadOnly).unwrap();
        assert!(s.root().is_err(), "no tree yet");
        assert!(s.admit(Peer::local(), Some(1), noop()).is_err());
        assert!(s.admit(Peer::local(), None, noop()).is_ok());
    }
}
