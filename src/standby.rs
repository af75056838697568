//! The standby's side of a tree. A [`Standby`] owns the root for the life of the process
//! (`serve`, or a primary's in-process receiver for a local DEST): the lock that keeps any
//! other hotsync from writing it, the durable state file `.hotsync/state`, and the registry
//! of the sessions it has admitted, which is what its status reports.

use crate::error::{Error, Result};
use crate::model::epoch::Admission as Admission2;
use crate::model::status::{PrimaryStatus, Space};
use crate::transport::identity::NodeId;
use crate::tree::fsroot::{self, Root};
use crate::tree::reserved::{Area, STANDBY_LOCK};
use crate::wire::heartbeat::{Pulse, silence};
use crate::wire::protocol::ErrorCode;
use crate::wire::protocol::Heartbeat;
use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
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

pub use crate::model::epoch::{Position, Role, TreeState};

/// Who is at the other end of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The primary's ID (QUIC); `None` for the in-process primary of a local DEST.
    pub id: Option<NodeId>,
    pub addr: Option<SocketAddr>,
}

impl Peer {
    /// The primary of a local DEST, in this very process.
    pub fn local() -> Peer {
        Peer {
            id: None,
            addr: None,
        }
    }

    pub fn describe(&self) -> String {
        match (&self.id, &self.addr) {
            (Some(id), Some(a)) => format!("primary {id} from {a}"),
            (Some(id), None) => format!("primary {id}"),
            _ => "the local primary".to_string(),
        }
    }
}

/// Counters of one session, updated as it goes.
#[derive(Debug, Default)]
pub struct SessionStats {
    pub files_written: AtomicU64,
    pub bytes_written: AtomicU64,
    pub entries_removed: AtomicU64,
    pub failed_ops: AtomicU64,
}

/// What one session did, for the standby's log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SessionReport {
    pub files_written: u64,
    pub bytes_written: u64,
    pub entries_removed: u64,
    pub failed_ops: u64,
}

impl std::ops::AddAssign for SessionReport {
    fn add_assign(&mut self, r: SessionReport) {
        self.files_written += r.files_written;
        self.bytes_written += r.bytes_written;
        self.entries_removed += r.entries_removed;
        self.failed_ops += r.failed_ops;
    }
}

impl SessionStats {
    pub fn report(&self) -> SessionReport {
        SessionReport {
            files_written: self.files_written.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            entries_removed: self.entries_removed.load(Ordering::Relaxed),
            failed_ops: self.failed_ops.load(Ordering::Relaxed),
        }
    }
}

/// What a session's heartbeats have told the standby.
#[derive(Debug, Default, Clone, Copy)]
pub struct Heard {
    pub last: Option<Instant>,
    /// The primary's last heartbeat, and when it arrived.
    pub beat: Option<(Heartbeat, Instant)>,
}

/// An admitted session, as the registry sees it.
pub struct SessionEntry {
    pub serial: u64,
    pub peer: Peer,
    /// A writing session (at most one at a time); the others only read.
    pub writer: bool,
    pub started: Instant,
    pub started_at: SystemTime,
    pub stats: SessionStats,
    pub heard: Mutex<Heard>,
    /// Ends the session's connection (promotion fences a stale primary through it).
    cut: Cut,
}

/// How a session's connection is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutKind {
    /// This side failed.
    Abort,
    /// The primary was fenced by a newer epoch (it must stop writing).
    Fence,
}

/// Cuts a session's connection, telling the peer why.
pub type Cut = Box<dyn Fn(CutKind, &str) + Send + Sync>;

impl SessionEntry {
    /// The lag the primary's last heartbeat reported, as it was then.
    pub fn reported_lag(&self) -> Option<Duration> {
        let (beat, _) = self.heard.lock().unwrap().beat?;
        Some(beat.oldest_pending_ms.map_or(Duration::ZERO, |oldest| {
            Duration::from_millis(beat.sent_at_ms.saturating_sub(oldest))
        }))
    }

    /// Cuts the session's connection, telling the peer `reason`.
    pub fn abort(&self, reason: &str) {
        (self.cut)(CutKind::Abort, reason)
    }

    /// Cuts the session because its primary has been fenced.
    pub fn fence(&self, reason: &str) {
        (self.cut)(CutKind::Fence, reason)
    }

    /// The primary's replication lag as of `now`: what its last heartbeat reported, aged
    /// by the time since (the primary's own clock measured both ends of the first part, so
    /// a clock difference between the nodes does not enter). `None` before a heartbeat.
    pub fn lag(&self, now: Instant) -> Option<Duration> {
        let (beat, at) = self.heard.lock().unwrap().beat?;
        Some(match beat.oldest_pending_ms {
            None => Duration::ZERO,
            Some(oldest) => {
                Duration::from_millis(beat.sent_at_ms.saturating_sub(oldest))
                    + now.saturating_duration_since(at)
            }
        })
    }
}

/// What the standby keeps of each primary it has served (for `status`).
#[derive(Debug, Clone, Default)]
struct PeerRecord {
    key: String,
    addr: Option<SocketAddr>,
    sessions: u64,
    ended_at: Option<SystemTime>,
    last_error: Option<String>,
    /// Totals of the sessions that ended.
    totals: SessionReport,
    position: Position,
    /// The lag the primary reported in its last heartbeat (seconds).
    last_lag: Option<f64>,
}

/// Why a session was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

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
    xattrs: std::sync::OnceLock<crate::tree::xattr::Policy>,
    /// How batches are made durable here, found at the first session.
    durability: std::sync::OnceLock<crate::tree::atomic::Durability>,
}

/// Receives a standby's events: a name and its details.
pub type EventSink = Box<dyn Fn(&str, serde_json::Value) + Send + Sync>;

/// What a promotion did, and what the failover cost (its RPO).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PromoteReport {
    pub tree: String,
    /// When (RFC 3339).
    pub at: String,
    /// The epoch the tree is now the primary of.
    pub epoch: u64,
    pub previous_epoch: u64,
    pub previous_primary: Option<String>,
    /// It was a primary already: nothing was done.
    pub already: bool,
    /// The last position durable here.
    pub position: Position,
    /// How old the newest change made durable here is (when this process saw it).
    pub newest_change_age_seconds: Option<f64>,
    /// What the old primary last said: how long ago, and its lag and queue then.
    pub primary_last_heard_seconds_ago: Option<f64>,
    pub primary_last_lag_seconds: Option<f64>,
    pub primary_last_pending: Option<u64>,
    /// The failover's RPO: changes the old primary made in this many seconds before the
    /// promotion may be missing here (its last heartbeat's age plus the lag it reported;
    /// what it did after that heartbeat is unknown).
    pub rpo_seconds: Option<f64>,
    /// Sessions of the old primary cut with the fencing error.
    pub fenced_sessions: u64,
}

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
        }
        Ok(standby)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tree root; only a dry run against a missing DEST has none.
    pub fn root(&self) -> io::Result<&Root> {
        self.root
            .as_ref()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "DEST does not exist"))
    }

    /// How batches are made durable on this tree's filesystem, decided once (by its
    /// `statfs` type) and said once where `syncfs` is not trusted.
    pub fn durability(&self) -> crate::tree::atomic::Durability {
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
    pub fn owners(&self) -> bool {
        self.owners
    }

    /// The extended attributes and ACLs this tree can store, tried once on a scratch file
    /// in it. A tree that cannot be written now is taken to store what its privileges
    /// allow; one whose filesystem has no attributes is said so once.
    pub fn xattrs_can(&self) -> crate::tree::xattr::Policy {
        *self.xattrs.get_or_init(|| {
            let root = rustix::process::geteuid().is_root();
            let guess = crate::tree::xattr::Policy {
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
    pub fn state(&self) -> TreeState {
        self.state.lock().unwrap().clone()
    }

    /// Admits a session from `peer`. A writer needs the tree's lock, a writable tree, and
    /// no other writer; readers are always admitted. `cut` cuts the session's connection.
    /// The session stays in the registry until the returned guard is dropped.
    pub fn admit(
        &self,
        peer: Peer,
        writer: Option<u64>,
        cut: Cut,
    ) -> std::result::Result<Admission<'_>, Refusal> {
        let refused = |message: String| Refusal {
            code: ErrorCode::Refused,
            message,
        };
        let epoch = writer;
        let writer = writer.is_some();
        if writer {
            if self.access != Access::Write || self.root.is_none() {
                return Err(refused(format!(
                    "DEST {} is open read-only here",
                    self.path.display()
                )));
            }
            let locked = self.lock.lock().unwrap().is_some();
            if !locked {
                self.take_lock(Duration::ZERO)
                    .map_err(|e| refused(e.message()))?;
            }
            self.probe_writable().map_err(refused)?;
        }
        let mut sessions = self.sessions.lock().unwrap();
        if writer && let Some(w) = sessions.iter().find(|s| s.writer) {
            return Err(Refusal {
                code: ErrorCode::Busy,
                message: format!(
                    "DEST {} is in use by {} (since {}): one primary writes a tree at a time",
                    self.path.display(),
                    w.peer.describe(),
                    crate::model::clock::rfc3339(w.started_at)
                ),
            });
        }
        if let Some(epoch) = epoch {
            self.admit_epoch(epoch, &peer)?;
        }
        if writer {
            let key = peer_key(&peer);
            let mut peers = self.peers.lock().unwrap();
            let rec = match peers.iter_mut().position(|p| p.key == key) {
                Some(i) => &mut peers[i],
                None => {
                    peers.push(PeerRecord {
                        key,
                        ..PeerRecord::default()
                    });
                    peers.last_mut().unwrap()
                }
            };
            rec.sessions += 1;
            rec.addr = peer.addr;
        }
        let entry = Arc::new(SessionEntry {
            serial: self.next_serial.fetch_add(1, Ordering::Relaxed),
            peer,
            writer,
            started: Instant::now(),
            started_at: SystemTime::now(),
            stats: SessionStats::default(),
            heard: Mutex::new(Heard::default()),
            cut,
        });
        sessions.push(entry.clone());
        Ok(Admission {
            standby: self,
            entry,
            error: None,
        })
    }

    /// The sessions admitted now.
    pub fn sessions(&self) -> Vec<Arc<SessionEntry>> {
        self.sessions.lock().unwrap().clone()
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
        *self.temps.lock().unwrap() = Some(temps);
        *self.lock.lock().unwrap() = Some((area, lock));
        Ok(())
    }

    /// Where a writing session stages its temps (`None` before the lock is held).
    pub fn temps(&self) -> Option<crate::tree::atomic::TempPlace> {
        self.temps.lock().unwrap().clone()
    }

    /// Waits up to `limit` for the writing sessions in `writers` to end (their staged
    /// batches dropped, their temps removed), then empties the temp area of anything a
    /// session cut mid-write left. A promoted tree holds no temps.
    fn settle_writers(&self, writers: &[Arc<SessionEntry>], limit: Duration) {
        let start = Instant::now();
        while start.elapsed() < limit
            && self
                .sessions()
                .iter()
                .any(|s| writers.iter().any(|w| Arc::ptr_eq(s, w)))
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(t) = self.temps() {
            for name in fsroot::list_dir(t.area()).unwrap_or_default() {
                let _ = fsroot::remove_tree(t.area(), &name);
            }
        }
    }

    /// Runs `f` on the tree's `.hotsync/`, when this standby holds it.
    fn with_area<T>(&self, f: impl FnOnce(&Area) -> T) -> Option<T> {
        self.lock.lock().unwrap().as_ref().map(|(a, _)| f(a))
    }

    /// Applies the epoch rules to a writer at `epoch`; a newer epoch is adopted, durably,
    /// before the primary writes anything.
    fn admit_epoch(&self, epoch: u64, peer: &Peer) -> std::result::Result<(), Refusal> {
        let who = peer.id.map(|id| id.to_string());
        let shown = format!("the standby {}", self.path.display());
        let mut st = self.state.lock().unwrap();
        match crate::model::epoch::admit(&st, epoch, who.as_deref(), &shown) {
            Admission2::Refuse { code, message } => {
                if st.superseded_by(epoch) {
                    self.record_superseded(&mut st, epoch, peer);
                }
                Err(Refusal { code, message })
            }
            Admission2::Admit { adopt } => {
                let before = st.clone();
                st.adopt(epoch, who);
                if adopt || *st != before {
                    st.updated = crate::model::clock::now_rfc3339();
                    let written = self.with_area(|a| a.write_state(&st)).unwrap_or(Ok(()));
                    if let Err(e) = written {
                        *st = before;
                        return Err(Refusal {
                            code: ErrorCode::Refused,
                            message: format!(
                                "cannot record epoch {epoch} in {}/.hotsync/state: {e}",
                                self.path.display()
                            ),
                        });
                    }
                    if adopt {
                        tracing::info!("entered epoch {epoch} with {}", peer.describe());
                        self.event(
                            "epoch",
                            serde_json::json!({"epoch": epoch, "primary": st.primary()}),
                        );
                    }
                }
                Ok(())
            }
        }
    }

    /// Records on this primary tree that a primary of the newer `epoch` exists: the tree is
    /// fenced, so `check` calls it unfit and `rejoin --if-fenced` acts on it. Only while no
    /// watch holds the tree: a running watch owns the primary's record (and learns of the
    /// new epoch itself when it meets the new primary's standbys).
    fn record_superseded(&self, st: &mut TreeState, epoch: u64, peer: &Peer) {
        let reason = format!(
            "{} is the primary of epoch {epoch}, newer than this tree's {}",
            peer.describe(),
            st.epoch
        );
        let recorded = self.with_area(|a| -> io::Result<bool> {
            let Some(_watch) = a.try_lock(crate::tree::reserved::PRIMARY_LOCK)? else {
                return Ok(false);
            };
            // The watch that ran last may have recorded more than this process knows.
            let mut disk = match a.read_state() {
                Ok(Some(d)) => d,
                _ => st.clone(),
            };
            if disk.fenced.is_some() || !disk.superseded_by(epoch) {
                *st = disk;
                return Ok(false);
            }
            disk.fenced = Some(crate::model::epoch::Fence {
                at: crate::model::clock::now_rfc3339(),
                reason: reason.clone(),
            });
            disk.updated = crate::model::clock::now_rfc3339();
            a.write_state(&disk)?;
            *st = disk;
            Ok(true)
        });
        match recorded {
            Some(Ok(true)) => {
                tracing::warn!(
                    "{} is fenced: {reason}; run `hotsync rejoin` to make it a standby",
                    self.path.display()
                );
                self.event(
                    "superseded",
                    serde_json::json!({"epoch": epoch, "reason": reason}),
                );
            }
            Some(Err(e)) => {
                tracing::warn!("cannot record the fence in {}: {e}", self.state_shown())
            }
            _ => {}
        }
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

    fn state_shown(&self) -> String {
        format!("{}/.hotsync/state", self.path.display())
    }

    /// A writing session's primary says batch `pos` is durable here (its heartbeat): kept
    /// in memory at once, written to the state file at most once a second.
    pub fn note_position(&self, pos: Position, primary: Option<NodeId>, now: Instant) {
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
    pub fn save_if_due(&self, now: Instant, force: bool) {
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

    /// The primaries served since the process started, as `status` shows them.
    pub fn primaries(&self, now: Instant, wall: SystemTime) -> Vec<PrimaryStatus> {
        let at = |t: SystemTime| {
            (
                crate::model::clock::rfc3339(t),
                wall.duration_since(t).unwrap_or_default().as_secs_f64(),
            )
        };
        let live = self.sessions();
        self.peers
            .lock()
            .unwrap()
            .iter()
            .map(|rec| {
                let session = live
                    .iter()
                    .find(|s| s.writer && peer_key(&s.peer) == rec.key);
                let (since, since_seconds) = match (session, rec.ended_at) {
                    (Some(s), _) => at(s.started_at),
                    (None, Some(t)) => at(t),
                    (None, None) => at(wall),
                };
                let heard = session
                    .map(|s| *s.heard.lock().unwrap())
                    .unwrap_or_default();
                let mut totals = rec.totals.clone();
                if let Some(s) = session {
                    totals += s.stats.report();
                }
                PrimaryStatus {
                    primary: rec.key.clone(),
                    addr: rec.addr.map(|a| a.to_string()),
                    connected: session.is_some(),
                    since,
                    since_seconds,
                    last_heartbeat_age_seconds: heard
                        .last
                        .map(|t| now.saturating_duration_since(t).as_secs_f64()),
                    // Gone: the lag it last reported, for judging a promotion.
                    lag_seconds: match session {
                        Some(s) => s.lag(now).map(|d| d.as_secs_f64()),
                        None => rec.last_lag,
                    },
                    reported_lag_seconds: match session {
                        Some(s) => s.reported_lag().map(|d| d.as_secs_f64()),
                        None => rec.last_lag,
                    },
                    pending_changes: heard.beat.map(|(b, _)| b.pending),
                    position: heard
                        .beat
                        .map(|(b, _)| Position {
                            epoch: b.epoch,
                            seq: b.seq,
                        })
                        .unwrap_or(rec.position),
                    sessions: rec.sessions,
                    files_written: totals.files_written,
                    bytes_written: totals.bytes_written,
                    entries_removed: totals.entries_removed,
                    failed_ops: totals.failed_ops,
                    last_error: if session.is_some() {
                        None
                    } else {
                        rec.last_error.clone()
                    },
                }
            })
            .collect()
    }

    /// Sends this standby's events (sessions, epochs, promotion, fences, rejoin) to `sink`.
    pub fn on_events(&self, sink: EventSink) {
        let _ = self.events.set(sink);
    }

    /// Tells the event sink, if there is one.
    pub fn event(&self, name: &str, details: serde_json::Value) {
        if let Some(sink) = self.events.get() {
            sink(name, details);
        }
    }

    /// Changes were made durable here just now (for the age of the newest one).
    pub fn committed(&self) {
        *self.committed_at.lock().unwrap() = Some((Instant::now(), SystemTime::now()));
    }

    /// Makes this standby the primary of a new epoch, `me` (this node's ID) its primary:
    /// refused while a primary is still heartbeating (unless `force`), recorded durably,
    /// then every writing session is fenced. Running it again changes nothing.
    ///
    /// # Errors
    /// [`Error::Refused`]: a primary is alive and `force` was not given, or the state
    /// cannot be written (nothing changed then).
    pub fn promote(&self, force: bool, me: Option<NodeId>) -> Result<PromoteReport> {
        let now = Instant::now();
        let mut st = self.state.lock().unwrap();
        if st.role == Role::Primary
            && let Some(Ok(Some(disk))) = self.with_area(|a| a.read_state())
        {
            // A watch of this primary tree may have recorded a fence since.
            *st = disk;
        }
        if let (Role::Primary, Some(fence)) = (st.role, &st.fenced) {
            return Err(Error::Refused(format!(
                "refusing to promote {}: it is a fenced former primary ({}, at {}), so a newer \
                 epoch holds writes this tree lacks; run `hotsync rejoin` and let it catch up \
                 first",
                self.path.display(),
                fence.reason,
                fence.at
            )));
        }
        let writers: Vec<Arc<SessionEntry>> =
            self.sessions().into_iter().filter(|s| s.writer).collect();
        let shown = self.path.display();
        let mut report = PromoteReport {
            tree: crate::tree::operand::shown_absolute(&self.path),
            at: crate::model::clock::now_rfc3339(),
            epoch: st.epoch,
            previous_epoch: st.epoch,
            previous_primary: st.primary().map(String::from),
            already: st.role == Role::Primary,
            position: st.position,
            newest_change_age_seconds: self
                .committed_at
                .lock()
                .unwrap()
                .map(|(t, _)| now.duration_since(t).as_secs_f64()),
            primary_last_heard_seconds_ago: None,
            primary_last_lag_seconds: None,
            primary_last_pending: None,
            rpo_seconds: None,
            fenced_sessions: 0,
        };
        if let Some(w) = writers.first() {
            let heard = *w.heard.lock().unwrap();
            report.primary_last_heard_seconds_ago =
                heard.last.map(|t| now.duration_since(t).as_secs_f64());
            report.primary_last_lag_seconds = w.reported_lag().map(|d| d.as_secs_f64());
            report.primary_last_pending = heard.beat.map(|(b, _)| b.pending);
            report.rpo_seconds = heard
                .beat
                .map(|(_, at)| now.duration_since(at).as_secs_f64())
                .zip(report.primary_last_lag_seconds)
                .map(|(ago, lag)| ago + lag);
        }
        if report.already {
            return Ok(report);
        }
        if self.access != Access::Write {
            return Err(Error::Refused(format!("{shown} is open read-only here")));
        }
        // Two missed heartbeats: not heartbeating any more (Keepalived takes 3 s or more
        // to decide the primary is gone).
        let alive = writers.iter().find(|w| {
            let heard = w.heard.lock().unwrap().last;
            heard.is_some_and(|t| now.duration_since(t) < 2 * crate::wire::heartbeat::INTERVAL)
        });
        if let (Some(w), false) = (alive, force) {
            return Err(Error::Refused(format!(
                "refusing to promote {shown}: {} is still connected and heartbeating (last \
                 heartbeat {:.1} s ago): stop it first (a promotion must not race a live \
                 primary), or use --force to fence it",
                w.peer.describe(),
                report.primary_last_heard_seconds_ago.unwrap_or_default()
            )));
        }
        let before = st.clone();
        st.promote(me.map(|id| id.to_string()));
        st.updated = crate::model::clock::now_rfc3339();
        let written = self.with_area(|a| a.write_state(&st));
        match written {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                *st = before;
                return Err(Error::Refused(format!(
                    "cannot promote {shown}: cannot write {}: {e}",
                    self.state_shown()
                )));
            }
            None => {
                *st = before;
                return Err(Error::Refused(format!(
                    "cannot promote {shown}: it is not held for writing (is it writable?)"
                )));
            }
        }
        report.epoch = st.epoch;
        drop(st);
        for w in &writers {
            let why = format!(
                "the standby {shown} was promoted to primary at epoch {}: this primary (epoch \
                 {}) is fenced; make it a standby with `hotsync rejoin`",
                report.epoch, report.previous_epoch
            );
            w.fence(&why);
            report.fenced_sessions += 1;
            self.event(
                "fenced",
                serde_json::json!({"primary": w.peer.describe(), "reason": why}),
            );
        }
        // A fenced session may be mid-commit: the promoted tree is handed over only once
        // it has stopped writing, with nothing staged left behind.
        self.settle_writers(&writers, Duration::from_secs(5));
        self.event(
            "promoted",
            serde_json::to_value(&report).unwrap_or_default(),
        );
        tracing::warn!(
            "promoted {shown} to primary at epoch {} (was epoch {}{}); {} session(s) fenced",
            report.epoch,
            report.previous_epoch,
            report
                .previous_primary
                .as_ref()
                .map(|p| format!(", primary {p}"))
                .unwrap_or_default(),
            report.fenced_sessions
        );
        Ok(report)
    }

    /// Turns this tree, a former primary, into a standby: what it changed after its standby
    /// last confirmed it is moved to `.hotsync/diverged/EPOCH/` first (entries matching
    /// `excludes` stay), then the role is recorded. Safe to run again.
    ///
    /// # Errors
    /// [`Error::Refused`] while a watch still replicates the tree, or when moving or
    /// recording fails (the role is then unchanged).
    ///
    /// With `if_fenced`, only a tree known to be superseded (a watch or this serve met a
    /// newer epoch) is turned; another primary is left as it is (`still_primary`). That is
    /// what Keepalived's `notify_backup` runs, which also fires on the rightful primary
    /// every time Keepalived starts.
    pub fn rejoin(
        &self,
        excludes: &[String],
        if_fenced: bool,
    ) -> Result<crate::rejoin::RejoinReport> {
        let shown = self.path.display();
        let filter =
            crate::model::filter::Filter::new(excludes).map_err(|e| Error::Usage(e.to_string()))?;
        let mut st = self.state.lock().unwrap();
        let root = self
            .root()
            .map_err(|e| Error::io(format!("cannot open {shown}"), e))?;
        let nothing = |st: &TreeState, still_primary: bool| crate::rejoin::RejoinReport {
            tree: crate::tree::operand::shown_absolute(&self.path),
            already: !still_primary,
            epoch: st.epoch,
            kept_in: String::new(),
            diverged: vec![],
            changed_dirs: vec![],
            no_record: false,
            still_primary,
        };
        if st.role == Role::Standby {
            return Ok(nothing(&st, false));
        }
        let guard = self.lock.lock().unwrap();
        let Some((area, _)) = guard.as_ref() else {
            return Err(Error::Refused(format!(
                "cannot rejoin {shown}: it is not held for writing (is it writable?)"
            )));
        };
        // No watch may replicate the tree while it turns into a standby.
        let watch = area
            .try_lock(crate::tree::reserved::PRIMARY_LOCK)
            .map_err(|e| Error::io(format!("cannot lock {shown}/.hotsync/primary.lock"), e))?;
        if watch.is_none() && if_fenced {
            // A running watch is not fenced (one that is stops, and records it).
            return Ok(nothing(&st, true));
        }
        if watch.is_none() {
            return Err(Error::Refused(format!(
                "cannot rejoin {shown}: a hotsync watch still replicates it as a primary; stop it first"
            )));
        }
        // The watch that ran since this process read the state recorded more: its last
        // acknowledgement, perhaps a fence.
        match area.read_state() {
            Ok(Some(disk)) => *st = disk,
            Ok(None) => {}
            Err(e) => return Err(Error::Refused(format!("cannot rejoin {shown}: {e}"))),
        }
        if st.role == Role::Standby {
            return Ok(nothing(&st, false));
        }
        if if_fenced && st.fenced.is_none() {
            return Ok(nothing(&st, true));
        }
        let report = crate::rejoin::keep_diverged(root, area, &st, &filter).map_err(|e| {
            Error::Refused(format!(
                "cannot rejoin {shown}: keeping its diverged files failed: {e}"
            ))
        })?;
        let before = st.clone();
        st.rejoin();
        st.updated = crate::model::clock::now_rfc3339();
        if let Err(e) = area.write_state(&st) {
            *st = before;
            return Err(Error::Refused(format!(
                "cannot rejoin {shown}: cannot write {}: {e}",
                self.state_shown()
            )));
        }
        self.event(
            "rejoined",
            serde_json::to_value(&report).unwrap_or_default(),
        );
        tracing::warn!(
            "{shown} is a standby now (it was the primary of epoch {}); {} diverged entries kept in {}",
            report.epoch,
            report.diverged.len(),
            report.kept_in
        );
        Ok(report)
    }

    /// The tree's filesystem.
    pub fn space(&self) -> Option<Space> {
        self.root.as_ref().and_then(|r| Space::of(r.fd()).ok())
    }

    /// Writes `st` as the tree's state, atomically and durably.
    pub fn write_state(&self, st: &TreeState) -> io::Result<()> {
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

enum LockError {
    InUse(String),
    NotWritable(String),
}

impl LockError {
    fn message(self) -> String {
        match self {
            LockError::InUse(m) | LockError::NotWritable(m) => m,
        }
    }
}

/// The key a primary is recorded under: its ID, or `local`.
fn peer_key(peer: &Peer) -> String {
    peer.id
        .map_or_else(|| "local".to_string(), |id| id.to_string())
}

/// A session's place in the registry; dropping it ends the session there.
pub struct Admission<'s> {
    standby: &'s Standby,
    pub entry: Arc<SessionEntry>,
    /// Why the session failed, if it did (set by [`Admission::finish`]).
    error: Option<String>,
}

impl Admission<'_> {
    /// Ends the session, recording why it failed, if it did.
    pub fn finish(mut self, error: Option<String>) {
        self.error = error;
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        let e = &self.entry;
        self.standby
            .sessions
            .lock()
            .unwrap()
            .retain(|s| s.serial != e.serial);
        if e.writer {
            let key = peer_key(&e.peer);
            let mut peers = self.standby.peers.lock().unwrap();
            if let Some(rec) = peers.iter_mut().find(|p| p.key == key) {
                rec.totals += e.stats.report();
                rec.ended_at = Some(SystemTime::now());
                rec.last_error = self.error.take();
                rec.last_lag = e.reported_lag().map(|d| d.as_secs_f64()).or(rec.last_lag);
                if let Some((b, _)) = e.heard.lock().unwrap().beat {
                    rec.position = Position {
                        epoch: b.epoch,
                        seq: b.seq,
                    };
                }
            }
            drop(peers);
            self.standby.save_if_due(Instant::now(), true);
        }
    }
}

/// The standby's side of one session's heartbeat.
pub struct SessionPulse<'s> {
    pub standby: &'s Standby,
    pub entry: Arc<SessionEntry>,
}

impl Pulse for SessionPulse<'_> {
    fn beat(&self, _now: Instant) -> Heartbeat {
        let st = self.standby.state();
        Heartbeat {
            epoch: st.epoch,
            seq: st.position.seq,
            sent_at_ms: crate::model::clock::unix_ms(SystemTime::now()),
            oldest_pending_ms: None,
            pending: 0,
            space: self.standby.space(),
        }
    }

    fn silent(&self, now: Instant) -> Option<String> {
        let last = self.entry.heard.lock().unwrap().last;
        silence(
            last.unwrap_or(self.entry.started),
            now,
            crate::wire::heartbeat::IDLE,
            "the primary",
        )
    }

    fn heard(&self, beat: &Heartbeat, now: Instant) {
        *self.entry.heard.lock().unwrap() = Heard {
            last: Some(now),
            beat: Some((*beat, now)),
        };
        if self.entry.writer {
            let pos = Position {
                epoch: beat.epoch,
                seq: beat.seq,
            };
            self.standby.note_position(pos, self.entry.peer.id, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noop() -> Cut {
        Box::new(|_, _| {})
    }

    #[test]
    fn one_writer_at_a_time_and_any_number_of_readers() {
        let t = tempfile::tempdir().unwrap();
        let s = Standby::open(t.path(), Access::Write).unwrap();
        let a = s.admit(Peer::local(), Some(1), noop()).unwrap();
        let busy = s.admit(Peer::local(), Some(1), noop()).err().unwrap();
        assert!(
            busy.code == ErrorCode::Busy && busy.message.contains("in use"),
            "{busy:?}"
        );
        let _r1 = s.admit(Peer::local(), None, noop()).unwrap();
        let _r2 = s.admit(Peer::local(), None, noop()).unwrap();
        assert_eq!(s.sessions().len(), 3);
        drop(a);
        assert!(s.admit(Peer::local(), Some(1), noop()).is_ok());
    }

    #[test]
    fn writers_are_admitted_by_epoch_and_a_new_epoch_is_durable_first() {
        let t = tempfile::tempdir().unwrap();
        let s = Standby::open(t.path(), Access::Write).unwrap();
        let a = s.admit(Peer::local(), Some(3), noop()).unwrap();
        drop(a);
        // Entered epoch 3 on disk before the writer could write.
        let on_disk = Standby::open(t.path(), Access::ReadOnly).unwrap();
        let again = std::fs::read(t.path().join(".hotsync/state")).unwrap();
        let st = TreeState::parse(&again, "s").unwrap();
        assert_eq!((st.epoch, st.history.len()), (3, 2));
        drop(on_disk);
        let stale = s.admit(Peer::local(), Some(2), noop()).err().unwrap();
        assert_eq!(stale.code, ErrorCode::StaleEpoch, "{stale:?}");
        assert!(stale.message.contains("epoch 2") && stale.message.contains("epoch 3"));
        // Readers need no epoch.
        assert!(s.admit(Peer::local(), None, noop()).is_ok());
        assert!(s.admit(Peer::local(), Some(3), noop()).is_ok());
    }

    #[test]
    fn a_fenced_former_primary_is_refused_promotion_in_one_well_spaced_line() {
        let t = tempfile::tempdir().unwrap();
        let s = Standby::open(t.path(), Access::Write).unwrap();
        let mut st = s.state();
        st.promote(None);
        st.fenced = Some(crate::model::epoch::Fence {
            at: "2026-01-01T00:00:00Z".into(),
            reason: "a standby of epoch 3 took over".into(),
        });
        s.write_state(&st).unwrap();
        let e = s.promote(false, None).unwrap_err().to_string();
        assert!(
            e.contains("fenced former primary") && e.contains("run `hotsync rejoin`"),
            "{e}"
        );
        assert!(!e.contains("  ") && !e.contains('\n'), "{e:?}");
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
    fn the_standby_s_lag_is_the_primary_s_aged_by_the_time_since_its_heartbeat() {
        let t = tempfile::tempdir().unwrap();
        let s = Standby::open(t.path(), Access::Write).unwrap();
        let a = s.admit(Peer::local(), Some(1), noop()).unwrap();
        let t0 = Instant::now();
        assert_eq!(a.entry.lag(t0), None, "no heartbeat yet");
        let beat = |oldest: Option<u64>| Heartbeat {
            epoch: 1,
            seq: 7,
            // The primary's clock, far from ours: only differences of it are used.
            sent_at_ms: 5_000_000_000_000,
            oldest_pending_ms: oldest,
            pending: 3,
            space: None,
        };
        let pulse = SessionPulse {
            standby: &s,
            entry: a.entry.clone(),
        };
        pulse.heard(&beat(Some(5_000_000_000_000 - 1500)), t0);
        assert_eq!(a.entry.lag(t0), Some(Duration::from_millis(1500)));
        // Between heartbeats the pending change keeps ageing.
        let later = t0 + Duration::from_millis(700);
        assert_eq!(a.entry.lag(later), Some(Duration::from_millis(2200)));
        // Caught up: zero, however old the heartbeat.
        pulse.heard(&beat(None), t0);
        assert_eq!(a.entry.lag(later), Some(Duration::ZERO));
        // The writer's heartbeat carried its position.
        assert_eq!(s.state().position, Position { epoch: 1, seq: 7 });
        assert_eq!(pulse.silent(t0 + Duration::from_secs(5)), None);
        assert!(pulse.silent(t0 + Duration::from_secs(11)).is_some());
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
