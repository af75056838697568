//! The standby side of a session. Everything here acts on names that were validated when
//! they were decoded ([`RelPath`]), through the root's directory handle, never following a
//! symlink; a failure with one entry is answered with an error `Ack`, a protocol violation
//! ends the connection.

use crate::atomic::{Batch, NewTemp, Outcome, Staged, Temp, Touched};
use crate::channel::Channel;
use crate::delta::{self, COARSE_HASH_LEN, MAX_CHUNKS, chunk_size};
use crate::error::Error;
use crate::filter::Filter;
use crate::fsroot::{self, Root, remove_tree, set_meta_at, set_meta_fd};
use crate::heartbeat;
use crate::manifest::MetaTarget;
use crate::manifest::{Entry, Meta, ScanError, Scope};
use crate::path::RelPath;
use crate::protocol::{
    self, FrameReader, FrameWriter, Message, OpError, ProtocolError, SMALL_FILE,
};
use crate::protocol::{ErrorCode, SessionMode};
use crate::scan::{ScanOptions, scan_scopes};
use crate::standby::{Cut, Peer, SessionEntry, SessionPulse, Standby};
use crate::status::Space;
use crate::transport::{Connection, SendHalf};
use crate::xattr::Xattrs;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::standby::SessionReport;

/// The state shared by all streams of one session.
struct Session<'s> {
    standby: &'s Standby,
    /// A dry run or a verify: list, never write.
    read_only: bool,
    filter: Filter,
    /// The extended attributes and ACLs this session mirrors.
    xattrs: crate::xattr::Policy,
    /// The protocol version the session speaks: what a listing may carry.
    version: u16,
    /// Bumped whenever directories may have been removed, so cached handles are dropped.
    generation: AtomicU64,
    /// This session in the standby's registry (its counters are read live by `status`).
    entry: Arc<SessionEntry>,
    /// Where a writing session stages its temps.
    temps: Option<crate::atomic::TempPlace>,
}

/// Serves one connection from `peer` against `standby`, until the primary closes the
/// session or the connection fails.
///
/// # Errors
/// [`Error::Refused`] when the session was refused (the primary was told why), or the
/// protocol error that ended it.
pub(crate) fn serve(
    conn: Arc<dyn Connection>,
    standby: &Standby,
    peer: Peer,
) -> Result<SessionReport, Error> {
    let Some(ctrl) = conn.accept().map_err(ProtocolError::Io)? else {
        return Err(ProtocolError::Closed.into());
    };
    let mut ch = Channel::new(ctrl);
    let version = ch.accept_session()?;
    let (excludes, read_only, epoch) = match ch.recv()? {
        Message::Open {
            excludes,
            mode,
            epoch,
        } => (excludes, mode == SessionMode::ReadOnly, epoch),
        other => return Err(ProtocolError::unexpected(&other, "Open").into()),
    };
    let refuse = |ch: &mut Channel, code: ErrorCode, message: String| -> Error {
        let _ = ch.send(&Message::Error {
            code,
            message: message.clone(),
        });
        let _ = ch.flush();
        conn.refuse(code, &message);
        Error::Refused(message)
    };
    if let Err(e) = protocol::check_excludes(&excludes) {
        return Err(refuse(&mut ch, ErrorCode::Invalid, e.to_string()));
    }
    let filter = match Filter::new(&excludes) {
        Ok(f) => f,
        Err(e) => return Err(refuse(&mut ch, ErrorCode::Refused, e.to_string())),
    };
    let cut: Cut = {
        let conn = conn.clone();
        Box::new(move |why: &str| conn.fence(why))
    };
    let admission = match standby.admit(peer, (!read_only).then_some(epoch), cut) {
        Ok(a) => a,
        Err(r) => return Err(refuse(&mut ch, r.code, r.message)),
    };
    ch.send(&Message::Opened {
        owners: standby.owners(),
        position: standby.state().position,
    })?;
    // Agreed before any other stream is accepted: every walk and write of the session
    // keeps the same attributes.
    let mut xattrs = crate::xattr::Policy::none();
    if version >= 5 {
        let can = standby.xattrs_can();
        ch.send(&Message::Keeps { can })?;
        ch.flush()?;
        xattrs = match ch.recv()? {
            Message::Keep { policy } => policy.and(can),
            other => return Err(ProtocolError::unexpected(&other, "Keep").into()),
        };
    }
    ch.flush()?;
    let session = Session {
        standby,
        read_only,
        filter,
        xattrs,
        version,
        generation: AtomicU64::new(0),
        entry: admission.entry.clone(),
        temps: if read_only { None } else { standby.temps() },
    };
    let pulse = SessionPulse {
        standby,
        entry: admission.entry.clone(),
    };

    let fatal: Mutex<Option<ProtocolError>> = Mutex::new(None);
    // Set once the primary has closed the session cleanly: later stream errors are only the
    // primary tearing the connection down.
    let done = std::sync::atomic::AtomicBool::new(false);
    let fail = |e: ProtocolError| {
        if done.load(Ordering::Relaxed) {
            return;
        }
        tracing::warn!("closing the session: {e}");
        conn.abort(&e.to_string());
        fatal.lock().unwrap().get_or_insert(e);
    };
    std::thread::scope(|s| {
        let (session, fail, conn, pulse) = (&session, &fail, &conn, &pulse);
        s.spawn(move || {
            let mut handles = Vec::new();
            while let Ok(Some(stream)) = conn.accept() {
                handles.push(s.spawn(move || {
                    let mut ch = Channel::new(stream);
                    // A stream says what it is with its first message.
                    let first = match ch.recv_opt() {
                        Ok(Some(Message::Heartbeat(b))) => {
                            heartbeat::answer(&**conn, ch, &b, pulse);
                            return;
                        }
                        Ok(first) => first,
                        Err(e) => return fail(e),
                    };
                    let Channel { r, w } = &mut ch;
                    if let Err(e) = op_loop(session, r, w, first, false) {
                        fail(e);
                    }
                }));
            }
            for h in handles {
                let _ = h.join();
            }
        });
        // `Closed` has reached the primary: closing now ends the accept loop above
        // without making either side wait for the other's close.
        let Channel { r, w } = &mut ch;
        match op_loop(session, r, w, None, true) {
            Ok(()) => {
                done.store(true, Ordering::Relaxed);
                conn.close("session complete");
            }
            Err(e) => fail(e),
        }
    });
    let report = session.entry.stats.report();
    let fatal = fatal.into_inner().unwrap();
    admission.finish(fatal.as_ref().map(|e| e.to_string()));
    match fatal {
        Some(e) => Err(e.into()),
        None => Ok(report),
    }
}

/// What an entry gets besides its content: its attributes and its extended attributes.
struct Attrs {
    meta: Meta,
    x: Xattrs,
}

impl Attrs {
    /// `meta` and the extended attributes the stream sent just before (none if it did not).
    fn new(meta: Meta, sent: &mut Option<Xattrs>) -> Attrs {
        Attrs {
            meta,
            x: sent.take().unwrap_or_default(),
        }
    }
}

impl Session<'_> {
    /// The extended attributes to set, unless this session leaves them alone.
    fn xattrs_to<'a>(&'a self, x: &'a Xattrs) -> Option<fsroot::XattrsTo<'a>> {
        (!self.xattrs.is_none()).then_some((x, &self.xattrs))
    }

    /// Sets `a` on the open file `fd`.
    fn set_fd(&self, fd: std::os::fd::BorrowedFd<'_>, a: &Attrs) -> io::Result<()> {
        set_meta_fd(fd, &a.meta, self.owners(), self.xattrs_to(&a.x))
    }

    /// Sets `a` on `name` in `dir`, never following it (`with_mode`: not a symlink).
    fn set_at(
        &self,
        dir: std::os::fd::BorrowedFd<'_>,
        name: &[u8],
        a: &Attrs,
        with_mode: bool,
    ) -> io::Result<()> {
        set_meta_at(
            dir,
            name,
            &a.meta,
            self.owners(),
            with_mode,
            self.xattrs_to(&a.x),
        )
    }
}

/// Entries a walk hashes together, so small directories still keep every core busy.
pub const WALK_HASH_BATCH: usize = 4096;

/// Bytes of entries (roughly) in one `Entries` or `Dir` message, well under the frame limit.
const LIST_BATCH_BYTES: usize = 256 * 1024;

/// The encoded size of an entry, roughly, to keep messages under the frame limit.
pub fn entry_size(e: &Entry) -> usize {
    e.path.as_bytes().len()
        + 48
        + match &e.kind {
            crate::manifest::Kind::Symlink { target } => target.len(),
            _ => 0,
        }
}

/// Sends one directory of a walk, in parts if it is large. From version 6 each part is
/// preceded by the shapes of its entries and the directory's special files.
fn send_unit<W: Write>(
    w: &mut FrameWriter<W>,
    u: crate::walk::Unit,
    version: u16,
) -> Result<(), ProtocolError> {
    let mut parts: Vec<Vec<Entry>> = vec![Vec::new()];
    let mut size = 0;
    for e in u.entries {
        size += entry_size(&e);
        parts.last_mut().unwrap().push(e);
        if size >= LIST_BATCH_BYTES {
            parts.push(Vec::new());
            size = 0;
        }
    }
    let mut errors: Vec<Vec<ScanError>> = u.errors.chunks(512).map(<[_]>::to_vec).collect();
    let mut specials: Vec<Vec<crate::manifest::Special>> = if version >= 6 {
        u.specials.chunks(512).map(<[_]>::to_vec).collect()
    } else {
        Vec::new()
    };
    let n = parts.len().max(errors.len()).max(specials.len());
    parts.resize_with(n, Vec::new);
    errors.resize_with(n, Vec::new);
    specials.resize_with(n, Vec::new);
    let parts = parts.into_iter().zip(errors).zip(specials);
    for (i, ((entries, errors), specials)) in parts.enumerate() {
        if let Some(m) = protocol::xattr_sums(std::iter::once(&u.dir).chain(&entries)) {
            w.send(&m)?;
        }
        if version >= 6 {
            if let Some(m) = protocol::shapes(std::iter::once(&u.dir).chain(&entries)) {
                w.send(&m)?;
            }
            if !specials.is_empty() {
                w.send(&Message::Specials { specials })?;
            }
        }
        w.send(&Message::Dir {
            dir: u.dir.clone(),
            entries,
            errors,
            more: i + 1 < n,
        })?;
    }
    Ok(())
}

/// One `Entries` message, after the digests of its attributes (and from version 6 the
/// shapes of its entries).
fn send_entries<W: Write>(
    w: &mut FrameWriter<W>,
    entries: Vec<Entry>,
    version: u16,
) -> Result<(), ProtocolError> {
    if let Some(m) = protocol::xattr_sums(entries.iter()) {
        w.send(&m)?;
    }
    if version >= 6
        && let Some(m) = protocol::shapes(entries.iter())
    {
        w.send(&m)?;
    }
    w.send(&Message::Entries {
        entries,
        errors: vec![],
    })
}

/// Sends a listing: its entries, errors and (from version 6) special files, then
/// `ListEnd`.
fn send_manifest<W: Write>(
    w: &mut FrameWriter<W>,
    m: crate::manifest::Manifest,
    temps_removed: u64,
    version: u16,
) -> Result<(), ProtocolError> {
    let count = m.entries.len() as u64;
    let mut batch = Vec::new();
    let mut size = 0;
    for e in m.entries {
        size += entry_size(&e);
        batch.push(e);
        if size >= LIST_BATCH_BYTES {
            send_entries(w, std::mem::take(&mut batch), version)?;
            size = 0;
        }
    }
    send_entries(w, batch, version)?;
    for chunk in m.errors.chunks(512) {
        w.send(&Message::Entries {
            entries: vec![],
            errors: chunk.to_vec(),
        })?;
    }
    if version >= 6 {
        for chunk in m.specials.chunks(512) {
            w.send(&Message::Specials {
                specials: chunk.to_vec(),
            })?;
        }
    }
    w.send(&Message::ListEnd {
        count,
        temps_removed,
    })
}

impl Session<'_> {
    /// The tree root; only a dry run against a missing DEST has none.
    fn root(&self) -> io::Result<&Root> {
        self.standby.root()
    }

    fn owners(&self) -> bool {
        self.standby.owners()
    }

    /// Lists `scopes` for the primary: entries, then `ListEnd`.
    fn list<W: Write>(
        &self,
        w: &mut FrameWriter<W>,
        scopes: &[(RelPath, Scope)],
        checksum: bool,
        hash_rate: u64,
    ) -> Result<(), ProtocolError> {
        let listing = match self.standby.root().ok() {
            Some(root) => scan_scopes(
                root,
                scopes,
                &self.scan_options(checksum, hash_rate),
                &|_| {},
            )
            .map_err(|e| ProtocolError::Invalid(format!("cannot scan the standby tree: {e}")))?,
            None => Default::default(),
        };
        send_manifest(w, listing.manifest, listing.temps_removed, self.version)?;
        w.flush()
    }

    /// Walks what `scopes` cover for the primary: `Dir`s in walk order, then `WalkEnd`.
    fn walk<W: SendHalf>(
        &self,
        w: &mut FrameWriter<W>,
        scopes: crate::walk::Scopes,
        checksum: bool,
        hash_rate: u64,
    ) -> Result<(), ProtocolError> {
        let (mut count, mut temps_removed) = (0, 0);
        if let Ok(root) = self.standby.root() {
            let opts = self.scan_options(checksum, hash_rate);
            let mut walker = crate::walk::Walker::scoped(root, opts, scopes, None);
            let batch = if checksum { WALK_HASH_BATCH } else { 1 };
            let cannot =
                |e: io::Error| ProtocolError::Invalid(format!("cannot scan the standby tree: {e}"));
            while let Some(units) = walker.next_batch(batch).map_err(cannot)? {
                for u in units {
                    count += 1 + u.entries.len() as u64;
                    send_unit(w, u, self.version)?;
                }
            }
            temps_removed = walker.temps_removed;
        }
        w.send(&Message::WalkEnd {
            count,
            temps_removed,
        })?;
        w.flush()?;
        Ok(w.get_mut().finish()?)
    }

    /// How this session's listings and walks read the standby's tree.
    fn scan_options(&self, checksum: bool, hash_rate: u64) -> ScanOptions {
        ScanOptions {
            checksum,
            hash_rate,
            filter: self.filter.clone(),
            remove_temps: !self.read_only,
            primary: false,
            xattrs: self.xattrs,
            // A primary before version 6 sees each symlink alone, as it always did.
            split_symlinks: self.version < 6,
        }
    }

    fn wrote(&self, bytes: u64) {
        let st = &self.entry.stats;
        st.files_written.fetch_add(1, Ordering::Relaxed);
        st.bytes_written.fetch_add(bytes, Ordering::Relaxed);
    }

    fn tree_changed(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
    }
}

/// Cached handles of parent directories, dropped whenever directories may have moved.
struct Dirs<'a> {
    s: &'a Session<'a>,
    generation: u64,
    map: HashMap<Vec<u8>, Arc<OwnedFd>>,
}

impl<'a> Dirs<'a> {
    fn new(s: &'a Session<'a>) -> Self {
        Dirs {
            s,
            generation: s.generation.load(Ordering::Relaxed),
            map: HashMap::new(),
        }
    }

    /// The parent directory of `path` and the last name.
    fn parent<'p>(&mut self, path: &'p RelPath) -> io::Result<(Arc<OwnedFd>, &'p [u8])> {
        if path.is_root() {
            return Ok((Arc::new(self.s.root()?.open_dir(path)?), b"."));
        }
        let g = self.s.generation.load(Ordering::Relaxed);
        if g != self.generation || self.map.len() > 256 {
            self.map.clear();
            self.generation = g;
        }
        let parent = path.parent_bytes();
        if let Some(fd) = self.map.get(parent) {
            return Ok((fd.clone(), path.name()));
        }
        let fd = Arc::new(
            self.s
                .root()?
                .open_dir(&RelPath::new(parent.to_vec()).unwrap())?,
        );
        self.map.insert(parent.to_vec(), fd.clone());
        Ok((fd, path.name()))
    }
}

/// An entry's failure as the primary is told it.
fn op_error(e: &io::Error) -> OpError {
    OpError {
        message: reason(e),
        retry: false,
        no_space: crate::atomic::is_no_space(e),
    }
}

/// A readable reason for an error with one entry.
fn reason(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(c) if c == Errno::LOOP.raw_os_error() => {
            "the path goes through a symlink on the standby".into()
        }
        Some(c) if c == Errno::XDEV.raw_os_error() => "the path leaves the standby root".into(),
        // O_NOFOLLOW | O_DIRECTORY on a symlink says ENOTDIR.
        Some(c) if c == Errno::NOTDIR.raw_os_error() => {
            "a parent of the path on the standby is not a directory (a symlink there is never followed)"
                .into()
        }
        _ => e.to_string(),
    }
}

impl Session<'_> {
    /// Where this writing session makes its temps.
    fn temps(&self) -> io::Result<&crate::atomic::TempPlace> {
        self.temps.as_ref().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                "this session does not write the standby",
            )
        })
    }

    /// Where a named temp (a symlink, a hard link) of an entry of `dir` is made: the
    /// standby's area, or (on another filesystem than the root) `dir` itself.
    fn temp_dir(&self, dir: &Arc<OwnedFd>) -> io::Result<Arc<OwnedFd>> {
        self.temps()?.for_dir(dir)
    }
}

/// Makes a file to receive an entry of `dir` into (unnamed beside it, see
/// [`crate::atomic::TempPlace`]). A receiver that is not root gives itself write
/// permission on a read-only directory (its mode is restored with the directory's
/// attributes).
fn temp_for(s: &Session, dir: &Arc<OwnedFd>) -> io::Result<NewTemp> {
    let place = s.temps()?;
    match place.create(dir) {
        Err(e) if e.raw_os_error() == Some(Errno::ACCESS.raw_os_error()) => {
            let st = rustix::fs::fstat(&**dir)?;
            rustix::fs::fchmod(&**dir, Mode::from_raw_mode((st.st_mode & 0o7777) | 0o700))?;
            place.create(dir)
        }
        other => other,
    }
}

/// Commits a batch (nothing is ever staged in a dry run, which may have no root).
fn commit(s: &Session, batch: &mut Batch) -> Vec<Outcome> {
    match s.root() {
        Ok(root) => batch.commit(root.fd()),
        Err(_) => Vec::new(),
    }
}

/// Reads and applies operations until the stream ends (or `Close`, on the control stream).
fn op_loop<R: Read, W: SendHalf>(
    s: &Session,
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
    mut first: Option<Message>,
    control: bool,
) -> Result<(), ProtocolError> {
    let mut batch = Batch::new(s.standby.durability());
    let mut dirs = Dirs::new(s);
    let mut buf = Vec::new();
    // The attributes of the entry the next operation writes.
    let mut xattrs: Option<Xattrs> = None;
    loop {
        let next = match first.take() {
            Some(m) => Some(m),
            None => r.recv_opt()?,
        };
        let Some(msg) = next else {
            send_acks(s, w, commit(s, &mut batch))?;
            w.flush()?;
            w.get_mut().finish()?;
            return Ok(());
        };
        if s.read_only && msg.writes_tree() {
            return Err(ProtocolError::Invalid(format!(
                "{} in a dry run",
                msg.name()
            )));
        }
        if xattrs.is_some()
            && !matches!(
                msg,
                Message::SmallFile { .. }
                    | Message::BigFile { .. }
                    | Message::SparseFile { .. }
                    | Message::Delta { .. }
                    | Message::SparseDelta { .. }
                    | Message::Symlink { .. }
                    | Message::SetMeta { .. }
            )
        {
            return Err(ProtocolError::Invalid(format!(
                "extended attributes before {}, which takes none",
                msg.name()
            )));
        }
        match msg {
            Message::Xattrs { attrs } => {
                attrs.check(&s.xattrs).map_err(ProtocolError::Invalid)?;
                xattrs = Some(attrs);
                continue;
            }
            Message::List {
                scopes,
                checksum,
                hash_rate,
            } if control => {
                s.list(w, &scopes, checksum, hash_rate)?;
                continue;
            }
            m @ (Message::Walk { .. } | Message::WalkScopes { .. }) if !control => {
                let (scopes, checksum, hash_rate) = match m {
                    Message::WalkScopes {
                        scopes,
                        checksum,
                        hash_rate,
                    } => (crate::walk::Scopes::new(&scopes), checksum, hash_rate),
                    Message::Walk {
                        checksum,
                        hash_rate,
                    } => (crate::walk::Scopes::all(), checksum, hash_rate),
                    _ => unreachable!(),
                };
                return match s.walk(w, scopes, checksum, hash_rate) {
                    // The walk changes nothing: a primary that stopped reading it (a guard
                    // refused, or it failed) leaves nothing to clean up or report here.
                    Err(ProtocolError::Io(e)) => {
                        tracing::debug!("the primary stopped reading the walk: {e}");
                        Ok(())
                    }
                    other => other,
                };
            }
            Message::Rename { id, from, to } => {
                check_writable(&from)?;
                check_writable(&to)?;
                let res = dirs.parent(&from).and_then(|(fd, fname)| {
                    let (td, tname) = dirs.parent(&to)?;
                    rustix::fs::renameat(&*fd, fname, &*td, tname)?;
                    Ok(Touched::dirs(fd, td))
                });
                batch.record(id, res.map_err(|e| op_error(&e)));
                s.tree_changed();
            }
            Message::Clear { id, path } | Message::Delete { id, path } => {
                if path.is_root() || path.is_reserved() {
                    return Err(ProtocolError::Invalid(format!("refusing to remove {path}")));
                }
                match dirs
                    .parent(&path)
                    .and_then(|(d, name)| Ok((remove_tree(d.as_fd(), name)?, d)))
                {
                    Ok((n, d)) => {
                        s.entry
                            .stats
                            .entries_removed
                            .fetch_add(n, Ordering::Relaxed);
                        batch.applied(id, Touched::dir(d));
                    }
                    Err(e) => batch.failed(id, op_error(&e)),
                }
                s.tree_changed();
            }
            Message::Mkdir { id, path } => {
                check_writable(&path)?;
                let res = dirs.parent(&path).and_then(|(d, name)| {
                    mkdir(&d, name)?;
                    Ok(Touched::dir(d))
                });
                batch.record(id, res.map_err(|e| op_error(&e)));
            }
            Message::SetMeta {
                id,
                path,
                meta,
                target,
            } => {
                if path.is_reserved() {
                    return Err(ProtocolError::Invalid(format!("refusing to change {path}")));
                }
                let a = Attrs::new(meta, &mut xattrs);
                let res = dirs.parent(&path).and_then(|(d, name)| {
                    check_type(&d, name, target)?;
                    s.set_at(d.as_fd(), name, &a, target != MetaTarget::Symlink)?;
                    // A symlink cannot be fsynced: its directory's fsync is all there is.
                    Ok(match target {
                        MetaTarget::Symlink => Touched::dir(d),
                        _ => Touched::entry(d, name),
                    })
                });
                batch.record(id, res.map_err(|e| op_error(&e)));
            }
            Message::Symlink {
                id,
                path,
                target,
                meta,
            } => {
                check_writable(&path)?;
                if target.is_empty() || target.len() > crate::path::MAX_PATH || target.contains(&0)
                {
                    return Err(ProtocolError::Invalid("bad symlink target".into()));
                }
                let a = Attrs::new(meta, &mut xattrs);
                match stage_symlink(s, &mut dirs, id, &path, &target, &a) {
                    Ok(st) => batch.stage(st),
                    Err(e) => batch.failed(id, op_error(&e)),
                }
            }
            Message::Link { id, path, target } => {
                check_writable(&path)?;
                check_writable(&target)?;
                match stage_link(s, &mut dirs, id, &path, &target) {
                    Ok(st) => batch.stage(st),
                    Err(e) => batch.failed(id, op_error(&e)),
                }
            }
            Message::SmallFile {
                id,
                path,
                meta,
                len,
            } => {
                check_writable(&path)?;
                if len > SMALL_FILE {
                    return Err(ProtocolError::Invalid(format!("small file of {len} bytes")));
                }
                buf.resize(len as usize, 0);
                r.read_raw(&mut buf)?;
                let keep = batch.keep_fd();
                let a = Attrs::new(meta, &mut xattrs);
                match stage_bytes(s, &mut dirs, id, &path, &a, &buf, keep) {
                    Ok(st) => batch.stage(st),
                    Err(e) => batch.failed(id, op_error(&e)),
                }
            }
            Message::BigFile {
                id,
                path,
                meta,
                size,
            } => {
                check_writable(&path)?;
                let keep = batch.keep_fd();
                let a = Attrs::new(meta, &mut xattrs);
                match receive_big(s, &mut dirs, r, id, &path, &a, size, keep)? {
                    Ok(st) => batch.stage(st),
                    Err(e) => batch.failed(id, e),
                }
            }
            Message::SparseFile {
                id,
                path,
                meta,
                size,
            } => {
                check_writable(&path)?;
                let keep = batch.keep_fd();
                let a = Attrs::new(meta, &mut xattrs);
                match receive_sparse(s, &mut dirs, r, id, &path, &a, size, keep)? {
                    Ok(st) => batch.stage(st),
                    Err(e) => batch.failed(id, e),
                }
            }
            m @ (Message::Delta { .. } | Message::SparseDelta { .. }) => {
                let sparse = matches!(m, Message::SparseDelta { .. });
                let (Message::Delta {
                    id,
                    path,
                    meta,
                    size,
                    chunk,
                    chunks,
                }
                | Message::SparseDelta {
                    id,
                    path,
                    meta,
                    size,
                    chunk,
                    chunks,
                }) = m
                else {
                    unreachable!()
                };
                check_writable(&path)?;
                let keep = batch.keep_fd();
                match receive_delta(
                    s,
                    &mut dirs,
                    r,
                    w,
                    id,
                    &path,
                    &Attrs::new(meta, &mut xattrs),
                    (size, chunk, chunks, sparse),
                    keep,
                )? {
                    Ok(st) => batch.stage(st),
                    Err(e) => batch.failed(id, e),
                }
            }
            Message::Flush { seq } => {
                send_acks(s, w, commit(s, &mut batch))?;
                w.send(&Message::Flushed { seq })?;
                w.flush()?;
                continue;
            }
            Message::Close if control => {
                send_acks(s, w, commit(s, &mut batch))?;
                w.send(&Message::Closed)?;
                w.flush()?;
                // Once the primary has `Closed`, the session is over for both sides.
                w.get_mut().finish()?;
                w.get_mut().wait_delivered();
                return Ok(());
            }
            other => return Err(ProtocolError::unexpected(&other, "an operation")),
        }
        if batch.should_commit() {
            send_acks(s, w, commit(s, &mut batch))?;
            w.flush()?;
        }
    }
}

fn send_acks<W: Write>(
    s: &Session,
    w: &mut FrameWriter<W>,
    outcomes: Vec<Outcome>,
) -> Result<(), ProtocolError> {
    let failed = outcomes.iter().filter(|(_, r)| r.is_err()).count() as u64;
    if (failed as usize) < outcomes.len() {
        s.standby.committed();
    }
    s.entry
        .stats
        .failed_ops
        .fetch_add(failed, Ordering::Relaxed);
    let mut space = None;
    for (id, res) in outcomes {
        let error = res.err().map(|mut e| {
            if e.no_space {
                // Say how full: the primary reports it, and waits for space.
                let sp = *space
                    .get_or_insert_with(|| s.root().ok().and_then(|r| Space::of(r.fd()).ok()));
                if let Some(sp) = sp {
                    e.message = format!("{} ({})", e.message, sp.describe());
                }
            }
            e
        });
        w.send(&Message::Ack { id, error })?;
    }
    Ok(())
}

/// Nothing may be written at the root itself or into the reserved area.
fn check_writable(path: &RelPath) -> Result<(), ProtocolError> {
    if path.is_root() || path.is_reserved() {
        return Err(ProtocolError::Invalid(format!("refusing to write {path}")));
    }
    Ok(())
}

fn mkdir(dir: &OwnedFd, name: &[u8]) -> io::Result<()> {
    match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700)) {
        Ok(()) => Ok(()),
        Err(Errno::EXIST) => {
            let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
            if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                Ok(())
            } else {
                Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "a non-directory is in the way",
                ))
            }
        }
        Err(Errno::ACCESS) => {
            let st = rustix::fs::fstat(dir)?;
            rustix::fs::fchmod(dir, Mode::from_raw_mode((st.st_mode & 0o7777) | 0o700))?;
            Ok(rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700))?)
        }
        Err(e) => Err(e.into()),
    }
}

/// Refuses a metadata change aimed at an entry of another type (it changed underneath).
fn check_type(dir: &OwnedFd, name: &[u8], target: MetaTarget) -> io::Result<()> {
    let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    let ft = FileType::from_raw_mode(st.st_mode);
    let ok = matches!(
        (target, ft),
        (MetaTarget::File, FileType::RegularFile)
            | (MetaTarget::Dir, FileType::Directory)
            | (MetaTarget::Symlink, FileType::Symlink)
    );
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the entry on the standby has another type",
        ))
    }
}

fn stage_bytes(
    s: &Session,
    dirs: &mut Dirs,
    id: u64,
    path: &RelPath,
    meta: &Attrs,
    data: &[u8],
    keep: bool,
) -> io::Result<Staged> {
    let (dir, name) = dirs.parent(path)?;
    let t = temp_for(s, &dir)?;
    let res = (&t.file)
        .write_all(data)
        .and_then(|_| s.set_fd(t.file.as_fd(), meta));
    if let Err(e) = res {
        t.temp.discard();
        return Err(e);
    }
    s.wrote(data.len() as u64);
    Ok(staged(id, dir, name.to_vec(), t, keep, data.len() as u64))
}

/// The complete file `t`, staged to become `name` in `dir`; its descriptor kept when
/// `keep` asks (or when it is all there is of an unnamed file).
fn staged(id: u64, dir: Arc<OwnedFd>, name: Vec<u8>, t: NewTemp, keep: bool, bytes: u64) -> Staged {
    let keep = keep || matches!(t.temp, Temp::Unnamed { .. });
    Staged {
        id,
        dir,
        temp: t.temp,
        name,
        file: keep.then_some(t.file),
        bytes,
    }
}

fn stage_symlink(
    s: &Session,
    dirs: &mut Dirs,
    id: u64,
    path: &RelPath,
    target: &[u8],
    meta: &Attrs,
) -> io::Result<Staged> {
    let (dir, name) = dirs.parent(path)?;
    let temp_dir = s.temp_dir(&dir)?;
    let temp = loop {
        let t = fsroot::temp_name();
        match rustix::fs::symlinkat(target, &*temp_dir, t.as_slice()) {
            Ok(()) => break t,
            Err(Errno::EXIST) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    if let Err(e) = s.set_at(temp_dir.as_fd(), &temp, meta, false) {
        let _ = rustix::fs::unlinkat(&*temp_dir, temp.as_slice(), AtFlags::empty());
        return Err(e);
    }
    Ok(Staged {
        id,
        dir,
        temp: Temp::Named(temp_dir, temp),
        name: name.to_vec(),
        file: None,
        bytes: 0,
    })
}

/// Stages another name for the regular file or symlink `target`. A symlink is linked
/// itself: `linkat` without `AT_SYMLINK_FOLLOW` never follows the last name, and the
/// directories on the way are resolved without following any symlink.
fn stage_link(
    s: &Session,
    dirs: &mut Dirs,
    id: u64,
    path: &RelPath,
    target: &RelPath,
) -> io::Result<Staged> {
    let (tdir, tname) = dirs.parent(target)?;
    let st = rustix::fs::statat(&*tdir, tname, AtFlags::SYMLINK_NOFOLLOW)?;
    if !matches!(
        FileType::from_raw_mode(st.st_mode),
        FileType::RegularFile | FileType::Symlink
    ) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "link target is not a regular file or a symlink",
        ));
    }
    let (dir, name) = dirs.parent(path)?;
    let temp_dir = s.temp_dir(&dir)?;
    let temp = loop {
        let t = fsroot::temp_name();
        // No AT_SYMLINK_FOLLOW: a symlink target gets a name of its own inode.
        match rustix::fs::linkat(&*tdir, tname, &*temp_dir, t.as_slice(), AtFlags::empty()) {
            Ok(()) => break t,
            Err(Errno::EXIST) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    Ok(Staged {
        id,
        dir,
        temp: Temp::Named(temp_dir, temp),
        name: name.to_vec(),
        file: None,
        bytes: 0,
    })
}

type EntryResult = Result<Staged, OpError>;

/// A temp being written for the entry `name` of `dir` (see [`crate::atomic::Temp`]).
struct TempTarget {
    dir: Arc<OwnedFd>,
    name: Vec<u8>,
    w: BufWriter<File>,
    temp: Temp,
}

/// A temp file being filled. Write failures are remembered, not returned, so the stream is
/// always read to the end of the file and stays in step; the file is then reported failed.
struct TempSink {
    target: Option<TempTarget>,
    err: Option<OpError>,
    /// The delta's base, for copying unchanged chunks in the kernel.
    base: Option<File>,
    /// Set for a sparse file: its holes are kept.
    holes: Option<Holes>,
}

/// Where a sparse temp is being written: the block being filled (blocks are aligned), and
/// the zeros not written yet (a hole to leave).
#[derive(Default)]
struct Holes {
    skip: u64,
    block: Vec<u8>,
}

/// Blocks of zeros this large, aligned, become holes in a sparse file.
const HOLE_BLOCK: usize = 4096;

impl Holes {
    /// Leaves the zeros skipped so far as a hole, before data is written after them.
    fn leave(&mut self, w: &mut BufWriter<File>) -> io::Result<()> {
        if self.skip > 0 {
            io::Seek::seek(w, io::SeekFrom::Current(self.skip as i64))?;
            self.skip = 0;
        }
        Ok(())
    }

    /// One whole block, or the last part of the file: a hole if it is all zeros.
    fn put(&mut self, w: &mut BufWriter<File>, block: &[u8]) -> io::Result<()> {
        if block.iter().all(|&b| b == 0) {
            self.skip += block.len() as u64;
            Ok(())
        } else {
            self.leave(w)?;
            w.write_all(block)
        }
    }

    /// Writes `buf`, leaving its aligned blocks of zeros as holes.
    fn write(&mut self, w: &mut BufWriter<File>, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            if self.block.is_empty() && buf.len() >= HOLE_BLOCK {
                let (piece, rest) = buf.split_at(HOLE_BLOCK);
                self.put(w, piece)?;
                buf = rest;
                continue;
            }
            let take = (HOLE_BLOCK - self.block.len()).min(buf.len());
            self.block.extend_from_slice(&buf[..take]);
            buf = &buf[take..];
            if self.block.len() == HOLE_BLOCK {
                let block = std::mem::take(&mut self.block);
                self.put(w, &block)?;
                self.block = block;
                self.block.clear();
            }
        }
        Ok(())
    }

    /// `n` zeros (a hole of the base): whole blocks of them are skipped, not written.
    fn zeros(&mut self, w: &mut BufWriter<File>, mut n: u64) -> io::Result<()> {
        const Z: [u8; HOLE_BLOCK] = [0; HOLE_BLOCK];
        if !self.block.is_empty() {
            let take = ((HOLE_BLOCK - self.block.len()) as u64).min(n);
            self.write(w, &Z[..take as usize])?;
            n -= take;
        }
        let whole = n - n % HOLE_BLOCK as u64;
        self.skip += whole;
        self.write(w, &Z[..(n - whole) as usize])
    }

    /// The end of the file: the last part of a block is written, unless it is zeros.
    fn finish(&mut self, w: &mut BufWriter<File>) -> io::Result<()> {
        let block = std::mem::take(&mut self.block);
        self.put(w, &block)
    }

    /// Copies `len` bytes of `base` at `offset`: its holes stay holes, its data is read.
    fn copy(
        &mut self,
        w: &mut BufWriter<File>,
        base: &File,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let end = offset + len;
        let mut off = offset;
        let mut buf = Vec::new();
        while off < end {
            let data = crate::sparse::next_data(base, off)?.unwrap_or(end).min(end);
            if data > off {
                self.zeros(w, data - off)?;
                off = data;
                continue;
            }
            let stop = crate::sparse::next_hole(base, off, end)?.clamp(off + 1, end);
            buf.resize(((stop - off) as usize).min(1 << 20), 0);
            delta::ReadAt::read_exact_at(base, &mut buf, off)?;
            self.write(w, &buf)?;
            off += buf.len() as u64;
        }
        Ok(())
    }
}

impl TempSink {
    fn create(dirs: &mut Dirs, path: &RelPath) -> TempSink {
        let s = dirs.s;
        let target = dirs.parent(path).and_then(|(dir, name)| {
            let t = temp_for(s, &dir)?;
            Ok(TempTarget {
                dir,
                name: name.to_vec(),
                w: BufWriter::with_capacity(1 << 20, t.file),
                temp: t.temp,
            })
        });
        match target {
            Ok(t) => TempSink {
                target: Some(t),
                err: None,
                base: None,
                holes: None,
            },
            Err(e) => TempSink {
                target: None,
                err: Some(op_error(&e)),
                base: None,
                holes: None,
            },
        }
    }

    /// Stages the temp when the primary completed the file and the content proof, if any
    /// (`(theirs, ours)`), holds; otherwise removes it. An incomplete file or a failed
    /// proof asks the primary to send the file again.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        mut self,
        s: &Session,
        complete: bool,
        proof: Option<(crate::manifest::Hash, crate::manifest::Hash)>,
        id: u64,
        meta: &Attrs,
        size: u64,
        keep: bool,
    ) -> EntryResult {
        if self.err.is_none() {
            if !complete {
                self.err = Some(OpError::new(
                    "the file changed on the primary while it was read",
                    true,
                ));
            } else if proof.is_some_and(|(theirs, ours)| theirs != ours) {
                self.err = Some(OpError::new("content digest mismatch", true));
            }
        }
        let Some(TempTarget { dir, name, w, temp }) = self.target.take() else {
            return Err(self
                .err
                .take()
                .unwrap_or_else(|| OpError::new("no temp file", false)));
        };
        let file = match self.err.take() {
            None => w.into_inner().map_err(|e| op_error(&e.into_error())),
            Some(e) => Err(e),
        };
        let t = match file {
            Ok(file) => NewTemp { file, temp },
            Err(e) => {
                temp.discard();
                return Err(e);
            }
        };
        match s.set_fd(t.file.as_fd(), meta) {
            Ok(()) => {
                s.wrote(size);
                Ok(staged(id, dir, name, t, keep, size))
            }
            Err(e) => {
                t.temp.discard();
                Err(op_error(&e))
            }
        }
    }
}

impl TempSink {
    /// Reads `len` raw bytes off the stream into the temp, in pieces of `buf` (sized here).
    fn take_raw<R: Read>(
        &mut self,
        r: &mut FrameReader<R>,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), ProtocolError> {
        buf.resize((1 << 20).min(len).max(1) as usize, 0);
        let mut left = len;
        while left > 0 {
            let n = (left as usize).min(buf.len());
            r.read_raw(&mut buf[..n])?;
            self.write_all(&buf[..n])?;
            left -= n as u64;
        }
        Ok(())
    }

    /// Goes on writing at `offset`, leaving a hole behind.
    fn seek_to(&mut self, offset: u64) {
        if self.err.is_none()
            && let Some(TempTarget { w, .. }) = self.target.as_mut()
            && let Err(e) = io::Seek::seek(w, io::SeekFrom::Start(offset))
        {
            self.err = Some(op_error(&e));
        }
    }

    /// Makes the temp `size` bytes long: a hole to the end if the data ends before.
    fn set_len(&mut self, size: u64) {
        if self.err.is_none()
            && let Some(TempTarget { w, .. }) = self.target.as_mut()
        {
            let done = match self.holes.as_mut() {
                Some(h) => h.finish(w),
                None => Ok(()),
            };
            if let Err(e) = done
                .and_then(|_| w.flush())
                .and_then(|_| w.get_ref().set_len(size))
            {
                self.err = Some(op_error(&e));
            }
        }
    }
}

impl Drop for TempSink {
    fn drop(&mut self) {
        // Reached with a target only when the stream failed mid-file.
        if let Some(t) = self.target.take() {
            t.temp.discard();
        }
    }
}

impl Write for TempSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.err.is_none()
            && let Some(TempTarget { w, .. }) = self.target.as_mut()
        {
            let written = match self.holes.as_mut() {
                Some(h) => h.write(w, buf),
                None => w.write_all(buf),
            };
            if let Err(e) = written {
                self.err = Some(op_error(&e));
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl delta::DeltaSink for TempSink {
    /// Unchanged chunks of a delta go from the base to the temp with `copy_file_range`,
    /// never through user space.
    fn copy_range(&mut self, offset: u64, len: u64) -> io::Result<bool> {
        if self.err.is_some() {
            return Ok(true); // the file has failed already; skip the work
        }
        let (Some(base), Some(TempTarget { w, .. })) = (self.base.as_ref(), self.target.as_mut())
        else {
            return Ok(false);
        };
        if let Some(h) = self.holes.as_mut() {
            if let Err(e) = h.copy(w, base, offset, len) {
                self.err = Some(op_error(&e));
            }
            return Ok(true);
        }
        if let Err(e) = w.flush() {
            self.err = Some(op_error(&e));
            return Ok(true);
        }
        let (mut off, mut left, mut first) = (offset, len, true);
        while left > 0 {
            match rustix::fs::copy_file_range(
                base,
                Some(&mut off),
                w.get_ref(),
                None,
                left as usize,
            ) {
                Ok(0) => {
                    self.err = Some(OpError::new("the base file shrank during the delta", false));
                    return Ok(true);
                }
                Ok(n) => left -= n as u64,
                // Not supported here: let the caller copy through user space.
                Err(Errno::XDEV | Errno::NOSYS | Errno::OPNOTSUPP | Errno::INVAL) if first => {
                    return Ok(false);
                }
                Err(e) => {
                    self.err = Some(op_error(&e.into()));
                    return Ok(true);
                }
            }
            first = false;
        }
        Ok(true)
    }
}

/// The standby's base file for a delta. A read failure yields zeros (and a digest
/// mismatch, so the primary resends the file whole) instead of desynchronising the stream.
struct SoftBase<'a>(Option<&'a File>);

impl delta::ReadAt for SoftBase<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if let Some(f) = self.0
            && let Ok(n @ 1..) = delta::ReadAt::read_at(f, buf, offset)
        {
            return Ok(n);
        }
        buf.fill(0);
        Ok(buf.len())
    }
}

/// Reads the `FileEnd` that closes a file's bytes: whether the primary completed the file,
/// and its digest.
fn file_end<R: Read>(
    r: &mut FrameReader<R>,
) -> Result<(bool, Option<crate::manifest::Hash>), ProtocolError> {
    match r.recv()? {
        Message::FileEnd { complete, digest } => Ok((complete, digest)),
        other => Err(ProtocolError::unexpected(&other, "FileEnd")),
    }
}

/// Receives a whole file into a temp. The outer error is fatal (the stream is unusable);
/// the inner one concerns this file only. Whole files carry no digest: QUIC's AEAD
/// already proves the bytes on the wire, and `verify` proves the copies.
#[allow(clippy::too_many_arguments)]
fn receive_big<R: Read>(
    s: &Session,
    dirs: &mut Dirs,
    r: &mut FrameReader<R>,
    id: u64,
    path: &RelPath,
    meta: &Attrs,
    size: u64,
    keep: bool,
) -> Result<EntryResult, ProtocolError> {
    let mut sink = TempSink::create(dirs, path);
    sink.take_raw(r, size, &mut Vec::new())?;
    let (complete, digest) = file_end(r)?;
    if digest.is_some() {
        return Err(ProtocolError::Invalid(
            "a whole file carries no digest".into(),
        ));
    }
    Ok(sink.finish(s, complete, None, id, meta, size, keep))
}

/// Receives a file with holes: its data extents, in order, written where they belong;
/// what none covers stays a hole in the temp, whose size is then set.
#[allow(clippy::too_many_arguments)]
fn receive_sparse<R: Read>(
    s: &Session,
    dirs: &mut Dirs,
    r: &mut FrameReader<R>,
    id: u64,
    path: &RelPath,
    meta: &Attrs,
    size: u64,
    keep: bool,
) -> Result<EntryResult, ProtocolError> {
    let mut sink = TempSink::create(dirs, path);
    let mut buf = Vec::new();
    let mut at = 0u64;
    loop {
        match r.recv()? {
            Message::Extent { offset, len } => {
                if offset < at || offset.checked_add(len).is_none_or(|end| end > size) {
                    return Err(ProtocolError::Invalid(format!(
                        "an extent of {len} bytes at {offset} in a sparse file of {size} \
                         bytes, after {at}"
                    )));
                }
                sink.seek_to(offset);
                sink.take_raw(r, len, &mut buf)?;
                at = offset + len;
            }
            Message::FileEnd { complete, digest } => {
                if digest.is_some() {
                    return Err(ProtocolError::Invalid(
                        "a sparse file carries no digest".into(),
                    ));
                }
                sink.set_len(size);
                return Ok(sink.finish(s, complete, None, id, meta, size, keep));
            }
            other => return Err(ProtocolError::unexpected(&other, "Extent")),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn receive_delta<R: Read, W: Write>(
    s: &Session,
    dirs: &mut Dirs,
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
    id: u64,
    path: &RelPath,
    meta: &Attrs,
    (size, chunk, chunks, sparse): (u64, u64, u64, bool),
    keep: bool,
) -> Result<EntryResult, ProtocolError> {
    if chunk != chunk_size(size) || chunks != size.div_ceil(chunk) || chunks > MAX_CHUNKS {
        return Err(ProtocolError::Invalid(
            "delta chunking does not match its size".into(),
        ));
    }
    let base = dirs.parent(path).and_then(|(dir, name)| {
        let f = fsroot::resolve(
            dir.as_fd(),
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        )?;
        let st = rustix::fs::fstat(&f)?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        // A base far larger than the new file (which sets the chunk size) would cost more
        // to sign than to resend: the file goes whole.
        if (st.st_size as u64).div_ceil(chunk) > 4 * MAX_CHUNKS {
            return Err(io::Error::other(
                "the standby's version is too large to serve as a delta base",
            ));
        }
        let holes = crate::sparse::has_holes(&st);
        Ok((File::from(f), st.st_size as u64, holes))
    });
    // Hash the base while the primary is still hashing (and sending) its new version.
    let (coarse, base_chunks) = std::thread::scope(|sc| {
        let hashing = base.as_ref().ok().map(|(f, n, holes)| {
            sc.spawn(move || {
                if *holes {
                    delta::hash_chunks(&delta::Holey(f), *n, chunk)
                } else {
                    delta::hash_chunks(f, *n, chunk)
                }
            })
        });
        let mut coarse = vec![[0u8; COARSE_HASH_LEN]; chunks as usize];
        let read = coarse.iter_mut().try_for_each(|c| r.read_raw(c));
        let base_chunks = hashing.map(|h| h.join().expect("hashing thread panicked"));
        (read.map(|_| coarse), base_chunks)
    });
    let coarse = coarse?;
    let signed = match (&base, base_chunks) {
        (Ok((f, n, _)), Some(Ok((digests, _)))) => {
            delta::sign_with(f, *n, chunk, &digests, &coarse).map(|sig| (sig, digests))
        }
        (Err(e), _) => Err(io::Error::new(e.kind(), reason(e))),
        (_, Some(Err(e))) => Err(e),
        (Ok(_), None) => unreachable!("a base is always hashed"),
    };
    let (base, base_size) = match base {
        Ok((f, n, _)) => (Some(f), n),
        Err(_) => (None, 0),
    };
    let mut known: Vec<Option<crate::manifest::Hash>> = Vec::new();
    match signed {
        Ok((sig, digests)) => {
            w.send(&Message::BaseSig {
                base_size,
                block_size: sig.block_size,
                matched_len: sig.matched.len() as u64,
                fine_len: sig.fine.len() as u64,
            })?;
            w.write_raw(&sig.matched)?;
            w.write_raw(&sig.fine)?;
            known = digests
                .into_iter()
                .enumerate()
                .map(|(i, d)| delta::bit(&sig.matched, i).then_some(d))
                .collect();
        }
        Err(e) => w.send(&Message::NoBase {
            reason: e.to_string(),
        })?,
    }
    w.flush()?;
    let mut sink = TempSink::create(dirs, path);
    sink.base = base.as_ref().and_then(|f| f.try_clone().ok());
    if sparse {
        sink.holes = Some(Holes::default());
    }
    let ours = match delta::apply(
        r.raw(),
        &SoftBase(base.as_ref()),
        base_size,
        &mut sink,
        size,
        &known,
    ) {
        Ok((digest, _)) => Some(digest),
        Err(delta::DeltaError::Aborted) => None,
        Err(delta::DeltaError::Malformed(m)) => {
            return Err(ProtocolError::Invalid(format!("delta: {m}")));
        }
        Err(delta::DeltaError::Io(e)) => return Err(ProtocolError::Io(e)),
    };
    let (complete, theirs) = file_end(r)?;
    let proof = match (complete, ours, theirs) {
        (true, Some(o), Some(t)) => Some((t, o)),
        (false, _, _) => None,
        _ => {
            return Err(ProtocolError::Invalid(
                "a completed delta needs its digest".into(),
            ));
        }
    };
    if sparse {
        sink.set_len(size);
    }
    Ok(sink.finish(s, complete, proof, id, meta, size, keep))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_temp_leaves_aligned_zeros_and_base_holes_as_holes() {
        let dir = tempfile::tempdir().unwrap();
        let open = |name: &str| crate::sparse::testing::rw(dir.path(), name);
        // A base: data in its first block, a hole of 1 MiB, data again.
        let base = open("base");
        std::os::unix::fs::FileExt::write_all_at(&base, &[5; 4096], 0).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&base, &[6; 4096], (1 << 20) + 4096).unwrap();
        let mut w = BufWriter::new(open("out"));
        let mut h = Holes::default();
        let mut want = Vec::new();
        // Data and zeros in small pieces that straddle block boundaries.
        for piece in [
            &[1u8; 100][..],
            &[0; 3996],
            &[0; 4096 * 3],
            &[2; 10],
            &[0; 8182],
        ] {
            h.write(&mut w, piece).unwrap();
            want.extend_from_slice(piece);
        }
        h.zeros(&mut w, 10_000).unwrap();
        want.resize(want.len() + 10_000, 0);
        h.copy(&mut w, &base, 0, (1 << 20) + 8192).unwrap();
        want.extend_from_slice(&[5; 4096]);
        want.resize(want.len() + (1 << 20), 0);
        want.extend_from_slice(&[6; 4096]);
        h.write(&mut w, &[0; 300]).unwrap();
        want.resize(want.len() + 300, 0);
        h.finish(&mut w).unwrap();
        w.flush().unwrap();
        let f = w.into_inner().unwrap();
        f.set_len(want.len() as u64).unwrap();
        assert_eq!(std::fs::read(dir.path().join("out")).unwrap(), want);
        let st = rustix::fs::fstat(&f).unwrap();
        if crate::sparse::has_holes(&rustix::fs::fstat(&base).unwrap()) {
            // Blocks with data: the one of 1s, the one of 2s, and two each for the copied
            // 5s and 6s (they straddle blocks of the output). Of 1 MiB + 45 KiB.
            assert!(
                st.st_blocks as u64 * 512 <= 6 * 4096,
                "{} bytes of blocks for 6 of data",
                st.st_blocks * 512
            );
        }
    }
}
