//! The standby's side of a tree. A [`Standby`] owns the root for the life of the process
//! (`serve`, or a primary's in-process receiver for a local DEST): the lock that keeps any
//! other hotsync from writing it, the durable state file `.hotsync/state`, and the registry
//! of the sessions it has admitted, which is what its status reports.

use crate::error::{Error, Result};
use crate::fsroot::{self, Root};
use crate::heartbeat::{Pulse, silence};
use crate::identity::NodeId;
use crate::path::{RESERVED, RelPath};
use crate::protocol::Heartbeat;
use crate::status::{PrimaryStatus, Space};
use rustix::fs::{AtFlags, FlockOperation, Mode, OFlags};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
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

/// A position in the primary's sequence of changes: batch `seq` of `epoch`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    pub epoch: u64,
    pub seq: u64,
}

/// The role a node has for a tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Standby,
}

/// The durable state of a tree, `.hotsync/state` (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TreeState {
    /// The file's format; a newer one is refused rather than misread.
    pub format: u32,
    pub role: Role,
    /// Grows by one at every promotion; a fresh tree is at epoch 1.
    pub epoch: u64,
    /// The last position known durable here.
    pub position: Position,
    /// The ID of the primary that last wrote here, when it came over QUIC.
    pub primary: Option<String>,
    /// When this was written (RFC 3339).
    pub updated: String,
}

/// The state file format this build writes and reads.
pub const STATE_FORMAT: u32 = 1;
const STATE_FILE: &[u8] = b"state";

impl TreeState {
    /// A tree that has never been written by hotsync.
    pub fn fresh(role: Role) -> TreeState {
        TreeState {
            format: STATE_FORMAT,
            role,
            epoch: 1,
            position: Position { epoch: 1, seq: 0 },
            primary: None,
            updated: crate::clock::now_rfc3339(),
        }
    }

    /// Parses a state file; `shown` names it in errors.
    ///
    /// # Errors
    /// [`Error::Usage`]: the file is torn, from a newer hotsync, or not hotsync's; the
    /// message says what to do. Never a silent reset.
    pub fn parse(bytes: &[u8], shown: &str) -> Result<TreeState> {
        let st: TreeState = serde_json::from_slice(bytes).map_err(|e| {
            Error::Usage(format!(
                "{shown} is damaged ({e}): hotsync will not guess this tree's role and epoch; \
                 check it, or move it away to start this tree afresh at epoch 1"
            ))
        })?;
        if st.format != STATE_FORMAT {
            return Err(Error::Usage(format!(
                "{shown} has format {}, this hotsync reads format {STATE_FORMAT}: \
                 run the hotsync release that wrote it",
                st.format
            )));
        }
        Ok(st)
    }
}

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
    abort: Box<dyn Fn(&str) + Send + Sync>,
}

impl SessionEntry {
    /// Cuts the session's connection, telling the peer `reason`.
    pub fn abort(&self, reason: &str) {
        (self.abort)(reason)
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
}

/// Why a session was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub busy: bool,
    pub message: String,
}

/// A standby tree, open for the life of the process.
pub struct Standby {
    path: PathBuf,
    /// `None` only for a read-only standby whose directory does not exist yet (a dry run).
    root: Option<Root>,
    access: Access,
    /// Held while we may write: no other hotsync process writes this tree meanwhile. Taken
    /// at open, or at the first writing session if the tree was not writable then.
    lock: Mutex<Option<File>>,
    owners: bool,
    state: Mutex<TreeState>,
    /// Position changes not yet written to the state file, and when it was last written.
    unsaved: Mutex<(bool, Option<Instant>)>,
    sessions: Mutex<Vec<Arc<SessionEntry>>>,
    peers: Mutex<Vec<PeerRecord>>,
    next_serial: AtomicU64,
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
            owners: fsroot::can_chown(),
            state: Mutex::new(TreeState::fresh(Role::Standby)),
            unsaved: Mutex::new((false, None)),
            sessions: Mutex::new(Vec::new()),
            peers: Mutex::new(Vec::new()),
            next_serial: AtomicU64::new(1),
        };
        if access == Access::Write {
            match standby.take_lock() {
                Ok(()) => {}
                Err(LockError::InUse(m)) => return Err(Error::Usage(m)),
                // A tree that cannot be written now may be later (a remount): each writing
                // session will try again, and be refused with this reason meanwhile.
                Err(LockError::NotWritable(m)) => tracing::warn!("{m}"),
            }
            if let Some(st) = standby.read_state()? {
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

    /// Whether owner and group are preserved here (this process runs as root).
    pub fn owners(&self) -> bool {
        self.owners
    }

    /// The tree's durable state as last read or written.
    pub fn state(&self) -> TreeState {
        self.state.lock().unwrap().clone()
    }

    /// Admits a session from `peer`. A writer needs the tree's lock, a writable tree, and
    /// no other writer; readers are always admitted. `abort` cuts the session's connection.
    /// The session stays in the registry until the returned guard is dropped.
    pub fn admit(
        &self,
        peer: Peer,
        writer: bool,
        abort: Box<dyn Fn(&str) + Send + Sync>,
    ) -> std::result::Result<Admission<'_>, Refusal> {
        let refused = |message: String| Refusal {
            busy: false,
            message,
        };
        if writer {
            if self.access != Access::Write || self.root.is_none() {
                return Err(refused(format!(
                    "DEST {} is open read-only here",
                    self.path.display()
                )));
            }
            let locked = self.lock.lock().unwrap().is_some();
            if !locked {
                self.take_lock().map_err(|e| refused(e.message()))?;
            }
            self.probe_writable().map_err(refused)?;
        }
        let mut sessions = self.sessions.lock().unwrap();
        if writer && let Some(w) = sessions.iter().find(|s| s.writer) {
            return Err(Refusal {
                busy: true,
                message: format!(
                    "DEST {} is in use by {} (since {}): one primary writes a tree at a time",
                    self.path.display(),
                    w.peer.describe(),
                    crate::clock::rfc3339(w.started_at)
                ),
            });
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
            abort,
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
    fn take_lock(&self) -> std::result::Result<(), LockError> {
        let shown = self.path.display();
        let not_writable =
            |e: io::Error| LockError::NotWritable(format!("DEST {shown} is not writable: {e}"));
        let root = self
            .root
            .as_ref()
            .ok_or_else(|| LockError::NotWritable(format!("DEST {shown} does not exist")))?;
        let state = self.state_dir(root).map_err(not_writable)?;
        let lock = rustix::fs::openat(
            &state,
            c"lock",
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| not_writable(e.into()))?;
        rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive).map_err(|_| {
            LockError::InUse(format!(
                "DEST {shown} is in use by another hotsync process (lock {shown}/.hotsync/lock)"
            ))
        })?;
        // Temps of a state file write cut short by a kill (the tree's scans never look here).
        for name in fsroot::list_dir(state.as_fd()).unwrap_or_default() {
            if crate::path::is_temp_name(&name) {
                let _ = rustix::fs::unlinkat(&state, name.as_slice(), AtFlags::empty());
            }
        }
        *self.lock.lock().unwrap() = Some(File::from(lock));
        Ok(())
    }

    /// `.hotsync/`, made if missing.
    fn state_dir(&self, root: &Root) -> io::Result<OwnedFd> {
        let before = rustix::fs::fstat(root.fd())?;
        match rustix::fs::mkdirat(root.fd(), RESERVED, Mode::from_raw_mode(0o700)) {
            // Making it changed the root's mtime, which is mirrored data: a `serve` that
            // starts must not make a verify see a difference. Put it back.
            Ok(()) => {
                let ts = rustix::fs::Timestamps {
                    last_access: rustix::fs::Timespec {
                        tv_sec: before.st_atime,
                        tv_nsec: before.st_atime_nsec as _,
                    },
                    last_modification: rustix::fs::Timespec {
                        tv_sec: before.st_mtime,
                        tv_nsec: before.st_mtime_nsec as _,
                    },
                };
                let _ = rustix::fs::futimens(root.fd(), &ts);
            }
            Err(Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        root.open_dir(&RelPath::new(RESERVED).unwrap())
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
        let state = self.state_dir(root).map_err(not_writable)?;
        // A fixed name, under the lock: a probe left by a kill is reused, never piles up.
        rustix::fs::openat(
            &state,
            c"write-probe",
            OFlags::WRONLY | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| not_writable(e.into()))?;
        let _ = rustix::fs::unlinkat(&state, c"write-probe", AtFlags::empty());
        Ok(())
    }

    fn state_shown(&self) -> String {
        format!("{}/.hotsync/state", self.path.display())
    }

    /// Reads `.hotsync/state`; `None` when there is none yet.
    fn read_state(&self) -> Result<Option<TreeState>> {
        let Some(root) = &self.root else {
            return Ok(None);
        };
        let path = RelPath::new(format!("{}/state", String::from_utf8_lossy(RESERVED))).unwrap();
        let mut f = match root.open_file(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Error::io(format!("cannot read {}", self.state_shown()), e));
            }
        };
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut f, &mut bytes)
            .map_err(|e| Error::io(format!("cannot read {}", self.state_shown()), e))?;
        TreeState::parse(&bytes, &self.state_shown()).map(Some)
    }

    /// A writing session's primary says batch `pos` is durable here (its heartbeat): kept
    /// in memory at once, written to the state file at most once a second.
    pub fn note_position(&self, pos: Position, primary: Option<NodeId>, now: Instant) {
        {
            let mut st = self.state.lock().unwrap();
            if pos.epoch != st.epoch || pos <= st.position {
                return;
            }
            st.position = pos;
            st.primary = primary.map(|id| id.to_string()).or(st.primary.take());
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
        st.updated = crate::clock::now_rfc3339();
        match self.write_state(&st) {
            Ok(()) => *unsaved = (false, Some(now)),
            Err(e) => tracing::warn!("cannot write {}: {e}", self.state_shown()),
        }
    }

    /// The primaries served since the process started, as `status` shows them.
    pub fn primaries(&self, now: Instant, wall: SystemTime) -> Vec<PrimaryStatus> {
        let at = |t: SystemTime| {
            (
                crate::clock::rfc3339(t),
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
                    lag_seconds: session.and_then(|s| s.lag(now)).map(|d| d.as_secs_f64()),
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

    /// The tree's filesystem.
    pub fn space(&self) -> Option<Space> {
        self.root.as_ref().and_then(|r| Space::of(r.fd()).ok())
    }

    /// Writes `st` as the tree's state, atomically and durably.
    pub fn write_state(&self, st: &TreeState) -> io::Result<()> {
        let root = self.root()?;
        let dir = self.state_dir(root)?;
        let json = serde_json::to_vec_pretty(st).map_err(io::Error::other)?;
        crate::atomic::replace_file(dir.as_fd(), STATE_FILE, &json)?;
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
            sent_at_ms: crate::clock::unix_ms(SystemTime::now()),
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
            crate::heartbeat::IDLE,
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

    fn noop() -> Box<dyn Fn(&str) + Send + Sync> {
        Box::new(|_| {})
    }

    #[test]
    fn one_writer_at_a_time_and_any_number_of_readers() {
        let t = tempfile::tempdir().unwrap();
        let s = Standby::open(t.path(), Access::Write).unwrap();
        let a = s.admit(Peer::local(), true, noop()).unwrap();
        let busy = s.admit(Peer::local(), true, noop()).err().unwrap();
        assert!(busy.busy && busy.message.contains("in use"), "{busy:?}");
        let _r1 = s.admit(Peer::local(), false, noop()).unwrap();
        let _r2 = s.admit(Peer::local(), false, noop()).unwrap();
        assert_eq!(s.sessions().len(), 3);
        drop(a);
        assert!(s.admit(Peer::local(), true, noop()).is_ok());
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
            st.position = Position { epoch: 1, seq: 42 };
            st.primary = Some("P".into());
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
        let a = s.admit(Peer::local(), true, noop()).unwrap();
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
        assert!(s.admit(Peer::local(), true, noop()).is_err());
        assert!(s.admit(Peer::local(), false, noop()).is_ok());
    }
}
