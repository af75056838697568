//! The primary side of a session: scan, fetch the standby's manifest, plan, then drive the
//! plan through the protocol: tree operations on the control stream, small files on a few
//! lanes, each large file on a stream of its own, with nothing waiting on a round trip
//! per file.

use crate::channel::Channel;
use crate::delta::{self, COARSE_HASH_LEN, DeltaEncoder, chunk_size};
use crate::error::Error;
use crate::filter::Filter;
use crate::fsroot::{Root, changed, meta_of};
use crate::guard::{self, Absences, Deletions, MassDelete};
use crate::heartbeat::{self, Beating, Pulse};
use crate::link::Link;
use crate::manifest::normalize_scopes;
use crate::manifest::{Entry, LinkKey, Manifest, Scope};
use crate::names::LinkIndex;
use crate::path::RelPath;
use crate::plan::{self, MetaFix, Method, Plan, PlanOptions, SymlinkOp, Transfer};
use crate::progress::Monitor;
use crate::protocol::{
    ErrorCode, FrameReader, FrameWriter, Message, OpError, ProtocolError, SMALL_FILE, SessionMode,
};
use crate::scan::{ScanOptions, scan_scopes};
use crate::standby::Position;
use crate::summary::{EntryError, Summary};
use crate::transport::{Connection, SendHalf, Stream};
use crate::walk::{Gate, Scopes};
use crate::xattr::{At, Policy, Xattrs};
use rustix::io::Errno;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

mod streamed;

/// What a `sync` may do.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    pub checksum: bool,
    pub delete: bool,
    /// Override the mass-delete guards.
    pub force: bool,
    pub dry_run: bool,
    pub excludes: Vec<String>,
    /// Refuse a plan that removes more than this percentage of the standby's entries.
    pub max_delete_percent: u32,
    /// Streams for small files.
    pub lanes: usize,
    /// Large files in flight at once.
    pub big_streams: usize,
    /// What a plan that trips the mass-delete guard does.
    pub on_mass_delete: MassDelete,
    /// Bytes per second hashing may read on each side, 0 for no limit (background verify).
    pub hash_rate: u64,
    /// The epoch this primary writes in (its tree's, see [`crate::primary`]).
    pub epoch: u64,
    /// The extended attributes and ACLs to mirror (what the standby can store of them).
    pub xattrs: crate::xattr::Policy,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            checksum: false,
            delete: true,
            force: false,
            dry_run: false,
            excludes: Vec::new(),
            max_delete_percent: 50,
            lanes: 2,
            big_streams: 2,
            on_mass_delete: MassDelete::Refuse,
            hash_rate: 0,
            epoch: 1,
            xattrs: crate::xattr::Policy::wanted(false, false),
        }
    }
}

/// The result of a sync: its summary, and the plan it carried out (or would, in a dry run).
#[derive(Debug)]
pub struct Outcome {
    pub summary: Summary,
    pub plan: Plan,
}

/// Mirrors the tree at `src` to the standby at the other end of `link`, then closes the
/// session.
pub fn sync(
    src: Arc<Root>,
    link: Link,
    opts: &SyncOptions,
    monitor: &dyn Monitor,
) -> Result<Outcome, Error> {
    let started = Instant::now();
    let mut session = Session::open(src, link, opts, monitor)?;
    let mut outcome = match session.sync_all() {
        Ok(o) => o,
        Err(e) => {
            if matches!(e, Error::Refused(_)) {
                let _ = session.close();
            }
            return Err(e);
        }
    };
    outcome.summary.bytes_on_wire = session.close()?;
    outcome.summary.elapsed_ms = started.elapsed().as_millis() as u64;
    monitor.finished();
    Ok(outcome)
}

/// One session with a standby over one connection: a full reconcile, any number of partial
/// ones (watch mode: only the paths that changed), then `close`. It owns its link: dropping
/// a session that was not closed aborts the connection.
pub struct Session<'m> {
    link: Link,
    /// The heartbeat: stopped before a clean close; on a failure, dropped after the link,
    /// whose abort unblocks it.
    beating: Option<Beating>,
    /// The last batch the standby holds durable, as it said when the session opened.
    pub position: Position,
    root: Arc<Root>,
    opts: SyncOptions,
    scan_opts: ScanOptions,
    monitor: &'m dyn Monitor,
    /// The control stream.
    ch: Channel,
    /// The protocol version both sides speak.
    pub version: u16,
    /// Whether the standby preserves owner and group (it runs as root).
    pub owners: bool,
    /// What goes with each entry besides its content.
    carry: Carry,
    next_id: AtomicU64,
    /// The standby's entries at the last full listing: the mass-delete guard's yardstick.
    remote_total: usize,
    /// What reading the primary's tree waits on (a watcher still setting up its watches).
    gate: Option<Arc<dyn Gate>>,
    /// Changes seen while a long reconcile runs, to copy early.
    early: Option<Arc<dyn Early>>,
    /// Where the absences of the next reconciles come from (what the mass-delete guard
    /// judges): inferred, unless a watch says otherwise.
    absences: Absences,
    /// The primary's files and symlinks with several names: a partial reconcile plans the
    /// whole group of each it meets.
    links: LinkIndex,
}

/// Changes seen while a long reconcile runs (a watch's), offered to it so they reach the
/// standby before it ends. Each is examined again by the batch after the reconcile: an
/// early copy is only a head start.
pub trait Early: Send + Sync {
    /// Paths changed and ready now, of those `accept` takes, each offered once per change.
    fn take(&self, accept: &dyn Fn(&RelPath) -> bool) -> Vec<RelPath>;
}

impl<'m> Session<'m> {
    /// Opens the control stream and the session, with the heartbeat of a one-off session.
    ///
    /// # Errors
    /// The standby's refusal ([`Error::Standby`]), a version mismatch, or why the
    /// connection failed.
    pub fn open(
        root: Arc<Root>,
        link: Link,
        opts: &SyncOptions,
        monitor: &'m dyn Monitor,
    ) -> Result<Session<'m>, Error> {
        Session::open_with(
            root,
            link,
            opts,
            monitor,
            Arc::new(heartbeat::Simple::new(opts.epoch)),
        )
    }

    /// Opens the session with `pulse` deciding its heartbeats (a watch's replica).
    pub fn open_with(
        root: Arc<Root>,
        link: Link,
        opts: &SyncOptions,
        monitor: &'m dyn Monitor,
        pulse: Arc<dyn Pulse>,
    ) -> Result<Session<'m>, Error> {
        let filter = Filter::new(&opts.excludes).map_err(|e| Error::Usage(e.to_string()))?;
        let open = Message::Open {
            excludes: opts.excludes.clone(),
            mode: if opts.dry_run {
                SessionMode::ReadOnly
            } else {
                SessionMode::Write
            },
            epoch: opts.epoch,
        };
        type Opened = (Channel, u16, bool, Position, Policy, Option<Beating>);
        let handshake = || -> Result<Opened, Error> {
            let mut ch = Channel::open(&**link.conn())?;
            let version = ch.open_session(&open)?;
            let (owners, position) = match ch.recv().map_err(peer_error)? {
                Message::Opened { owners, position } => (owners, position),
                other => return Err(ProtocolError::unexpected(&other, "Opened").into()),
            };
            let mut xattrs = Policy::none();
            if version >= 5 {
                let can = match ch.recv().map_err(peer_error)? {
                    Message::Keeps { can } => can,
                    other => return Err(ProtocolError::unexpected(&other, "Keeps").into()),
                };
                xattrs = opts.xattrs.and(can);
                say_once_what_the_standby_lacks(&opts.xattrs, &can);
                ch.send(&Message::Keep { policy: xattrs })?;
                ch.flush()?;
            }
            let beating = (version >= 2)
                .then(|| heartbeat::start(link.conn().clone(), pulse.clone()))
                .transpose()?;
            Ok((ch, version, owners, position, xattrs, beating))
        };
        let (ch, version, owners, position, xattrs, beating) =
            handshake().map_err(|e| link.explain(e))?;
        if !owners {
            tracing::warn!(
                "the standby does not run as root: owner and group are not preserved there"
            );
        }
        if version < 6 {
            crate::xattr::say_once(
                "a standby before protocol 6",
                &format!(
                    "the standby runs an older hotsync (protocol {version}): symlinks with \
                     several names are mirrored there as separate symlinks, and special files \
                     on it are neither seen nor removed; upgrade it"
                ),
            );
        }
        Ok(Session {
            link,
            beating,
            position,
            root,
            opts: opts.clone(),
            scan_opts: ScanOptions {
                checksum: opts.checksum,
                hash_rate: opts.hash_rate,
                filter,
                remove_temps: false,
                primary: true,
                xattrs,
                split_symlinks: version < 6,
            },
            monitor,
            ch,
            version,
            owners,
            carry: Carry {
                xattrs,
                holes: version >= 5,
            },
            next_id: AtomicU64::new(1),
            remote_total: 0,
            gate: None,
            early: None,
            absences: Absences::Inferred,
            links: LinkIndex::default(),
        })
    }

    /// Says where the absences of every later reconcile come from: a watch's knowledge of
    /// its source root ([`guard::Continuity`]). A session starts with [`Absences::Inferred`].
    pub fn set_absences(&mut self, absences: Absences) {
        self.absences = absences;
    }

    /// Makes every later read of the primary's tree wait on `gate` first, directory by
    /// directory: a watch reads a directory only once its changes are seen.
    pub fn set_gate(&mut self, gate: Option<Arc<dyn Gate>>) {
        self.gate = gate;
    }

    /// Lets every later streamed reconcile copy the changes `early` offers while it runs,
    /// in the part of the tree it has passed.
    pub fn set_early(&mut self, early: Option<Arc<dyn Early>>) {
        self.early = early;
    }

    fn conn(&self) -> &dyn Connection {
        &**self.link.conn()
    }

    /// Encoded protocol bytes carried so far, both ways.
    pub fn wire_bytes(&self) -> u64 {
        self.conn().wire_bytes()
    }

    /// Reconciles the whole tree.
    pub fn sync_all(&mut self) -> Result<Outcome, Error> {
        let r = self.reconcile(&[], &[(RelPath::root(), Scope::Tree)], true);
        r.map_err(|e| self.link.explain(e))
    }

    /// Applies `renames` on the standby as renames, then reconciles only `scopes` (and their
    /// parent directories). A path that no longer exists on the primary is removed.
    pub fn sync_paths(
        &mut self,
        renames: &[(RelPath, RelPath)],
        scopes: &[(RelPath, Scope)],
    ) -> Result<Outcome, Error> {
        let r = self.reconcile(renames, scopes, false);
        r.map_err(|e| self.link.explain(e))
    }

    /// Reconciles `scopes` comparing content by digest, whatever `--checksum` says: the
    /// repair of what a verify found (same size and mtime, other bytes).
    pub fn repair(&mut self, scopes: &[(RelPath, Scope)]) -> Result<Outcome, Error> {
        let checksum = std::mem::replace(&mut self.opts.checksum, true);
        let out = self.reconcile(&[], scopes, false);
        self.opts.checksum = checksum;
        out.map_err(|e| self.link.explain(e))
    }

    /// Ends the session cleanly; returns the protocol bytes it carried, both ways.
    pub fn close(mut self) -> Result<u64, Error> {
        if let Err(e) = close_session(&mut self.ch).map_err(peer_error) {
            return Err(self.link.explain(e));
        }
        let bytes = self.wire_bytes();
        drop(self.beating.take());
        self.conn().close("session complete");
        self.link.closed_cleanly();
        Ok(bytes)
    }

    /// Lists `scopes` on both sides at once (hashing content when `checksum`): the primary's
    /// manifest and the standby's.
    pub fn list(
        &mut self,
        scopes: &[(RelPath, Scope)],
        checksum: bool,
    ) -> Result<(Manifest, Manifest), Error> {
        let listed = self.list_sides(&normalize_scopes(scopes), checksum);
        let (local, remote, _) = listed.map_err(|e| self.link.explain(e))?;
        Ok((local.manifest, remote))
    }

    fn list_sides(
        &mut self,
        scopes: &[(RelPath, Scope)],
        checksum: bool,
    ) -> Result<(crate::scan::ScanOutcome, Manifest, u64), Error> {
        if let Some(g) = &self.gate {
            // A listing reads directories in no order a watcher follows.
            g.wait_all();
        }
        let scan_opts = ScanOptions {
            checksum,
            hash_rate: self.opts.hash_rate,
            ..self.scan_opts.clone()
        };
        list_both(&mut self.ch, &self.root, scopes, &scan_opts, self.monitor)
    }

    /// Applies `renames` on the standby (not in a dry run); returns how many were made.
    fn rename(&mut self, renames: &[(RelPath, RelPath)]) -> Result<u64, Error> {
        if renames.is_empty() || self.opts.dry_run {
            return Ok(0);
        }
        let empty = Manifest::default();
        let conn = &**self.link.conn();
        let ex = Exec::new(
            conn,
            (&self.root, self.carry),
            Some(&empty),
            &self.next_id,
            self.monitor,
            Summary::default(),
        );
        let ops = renames
            .iter()
            .map(|(from, to)| {
                let msg = Message::Rename {
                    id: ex.id(),
                    from: from.clone(),
                    to: to.clone(),
                };
                (msg, to.clone(), Op::Rename)
            })
            .collect();
        ex.control_batch(&mut self.ch, ops, 1)?;
        Ok(ex.tally.into_inner().unwrap().renamed)
    }

    fn reconcile(
        &mut self,
        renames: &[(RelPath, RelPath)],
        scopes: &[(RelPath, Scope)],
        full: bool,
    ) -> Result<Outcome, Error> {
        let started = Instant::now();
        let wire_before = self.wire_bytes();
        let renamed = self.rename(renames)?;
        // Whole subtrees are walked, not listed: memory stays flat however large they are.
        // Single entries are listed (a batch's worth, at once).
        let normal = normalize_scopes(scopes);
        let whole = normal == [(RelPath::root(), Scope::Tree)];
        if (whole && self.version >= 3)
            || (self.version >= 4 && normal.iter().any(|(_, s)| *s == Scope::Tree))
        {
            return self.reconcile_streamed(Scopes::new(&normal), renamed);
        }
        let listed = with_parents(scopes);
        let (mut local, mut remote, temps_removed) =
            self.list_sides(&listed, self.opts.checksum)?;
        tracing::debug!("{} ms: both sides listed", started.elapsed().as_millis());
        let linked: Vec<&Entry> = local
            .manifest
            .entries
            .iter()
            .filter(|e| e.link.is_some())
            .collect();
        if full {
            self.links.rebuild(linked);
        } else {
            let linked: Vec<Entry> = linked.into_iter().cloned().collect();
            let scan_opts = ScanOptions {
                checksum: self.opts.checksum,
                hash_rate: self.opts.hash_rate,
                ..self.scan_opts.clone()
            };
            let more = complete_links(
                (&mut self.links, &mut self.ch, &self.root),
                &scan_opts,
                &Scopes::new(&listed),
                &linked,
                self.monitor,
            )?;
            if let Some((l, r)) = more {
                local.manifest.entries.extend(l.entries);
                local.manifest.errors.extend(l.errors);
                local.manifest.sort();
                remote.entries.extend(r.entries);
                remote.specials.extend(r.specials);
                remote.sort();
            }
        }

        let mut summary = Summary {
            files_scanned: local.manifest.children().len() as u64,
            bytes_total: local.manifest.file_bytes(),
            temps_removed,
            dry_run: self.opts.dry_run,
            renamed,
            ..Summary::default()
        };
        note_problems(
            &mut summary,
            &local.manifest.specials,
            &local.skipped,
            &local.manifest.errors,
        );
        let mut plan = plan::plan(
            &local.manifest,
            &remote,
            PlanOptions {
                checksum: self.opts.checksum,
                delete: self.opts.delete,
                owners: self.owners,
            },
        );
        if full {
            self.remote_total = remote.children().len();
        }
        // Keep the guard's yardstick current between full listings: the standby gains what
        // the primary has and it lacked.
        let added = local
            .manifest
            .children()
            .iter()
            .filter(|e| remote.get(&e.path).is_none())
            .count();
        // Only a plan that removes something needs to know (and a batch should not list
        // the whole source root for nothing).
        let source_empty = plan.removed_entries > 0
            && if full {
                local.manifest.children().is_empty()
            } else {
                self.root
                    .is_empty()
                    .map_err(|e| Error::io("cannot read SRC", e))?
            };
        let limits = self.limits();
        let shown = self.root.path().display().to_string();
        if let Deletions::Refused(why) =
            guard::check(&shown, source_empty, &plan, self.remote_total, limits)?
        {
            if self.opts.on_mass_delete == MassDelete::SkipDeletes {
                // Watch mode: replicate everything but the deletions, and say so loudly.
                tracing::error!("{why}; replicating other changes, not the deletions");
            }
            summary.deletions_refused = guard::skip_deletes(&mut plan, &remote);
            let replaced = !plan.clear.is_empty();
            summary.refused = Some(guard::refused_after_the_rest(&why, replaced));
        }
        self.monitor
            .planned(plan.transfers.len() as u64, plan.transfer_bytes());
        if self.opts.dry_run {
            count_planned(&mut summary, &plan);
            summary.files_deleted = plan.removed_entries as u64;
        } else {
            let conn = &**self.link.conn();
            let ex = Exec::new(
                conn,
                (&self.root, self.carry),
                Some(&remote),
                &self.next_id,
                self.monitor,
                summary,
            );
            ex.run(&plan, &mut self.ch, &self.opts)?;
            summary = ex.tally.into_inner().unwrap();
        }
        if !self.opts.dry_run {
            self.remote_total = (self.remote_total + added).saturating_sub(plan.removed_entries);
        }
        tracing::debug!(
            "standby holds about {} entries (+{added} -{})",
            self.remote_total,
            plan.removed_entries
        );
        summary.bytes_on_wire = self.wire_bytes() - wire_before;
        summary.elapsed_ms = started.elapsed().as_millis() as u64;
        tracing::debug!("{} ms: plan carried out", started.elapsed().as_millis());
        Ok(Outcome { summary, plan })
    }
}

impl Session<'_> {
    /// The limits the mass-delete guard holds the next plan to.
    fn limits(&self) -> guard::Limits {
        guard::Limits {
            force: self.opts.force,
            max_delete_percent: self.opts.max_delete_percent,
            on_mass_delete: self.opts.on_mass_delete,
            absences: self.absences,
        }
    }
}

/// Adds to `s` what carrying out `part` would add, operation by operation, as the real run's
/// acknowledgements count it (a dry run's summary). Removals are counted by the caller, in
/// standby entries.
fn count_planned(s: &mut Summary, part: &Plan) {
    s.files_transferred += part.transfers.len() as u64;
    s.dirs_created += part.mkdirs.len() as u64;
    s.symlinks_written += part.symlinks.len() as u64;
    s.metadata_updated += (part.metas.len() + part.dir_metas.len()) as u64;
    s.hard_links_made += part.links.len() as u64;
}

/// Lists `scopes` on both sides at once, over the control stream: the primary's scan, the
/// standby's manifest, and the leftover temporary files its listing removed.
fn list_both(
    ch: &mut Channel,
    root: &Root,
    scopes: &[(RelPath, Scope)],
    scan_opts: &ScanOptions,
    monitor: &dyn Monitor,
) -> Result<(crate::scan::ScanOutcome, Manifest, u64), Error> {
    ch.send(&Message::List {
        scopes: scopes.to_vec(),
        checksum: scan_opts.checksum,
        hash_rate: scan_opts.hash_rate,
    })?;
    ch.flush()?;
    let r = &mut ch.r;
    let (local, remote) = std::thread::scope(|s| {
        let local = s.spawn(|| scan_scopes(root, scopes, scan_opts, &|n| monitor.scanned(n)));
        let remote = receive_listing(r);
        (local.join().expect("scan thread panicked"), remote)
    });
    let local =
        local.map_err(|e| Error::io(format!("cannot read SRC {}", root.path().display()), e))?;
    let (remote, temps_removed) = remote.map_err(peer_error)?;
    Ok((local, remote, temps_removed))
}

/// Widens a partial reconcile to every name of the primary's files and symlinks with
/// several names it met (`linked`, from a listing of `listed`): the names the index knows
/// (still names of the inode), and, when the link count says some are still unknown, those
/// a search of the tree finds. Returns both sides' listings of those names (with their
/// parent directories), to plan with the rest; `None` when there are none.
///
/// # Errors
/// A failure to read SRC's root, or of the connection.
pub(crate) fn complete_links(
    (index, ch, root): (&mut LinkIndex, &mut Channel, &Root),
    scan_opts: &ScanOptions,
    listed: &Scopes,
    linked: &[Entry],
    monitor: &dyn Monitor,
) -> Result<Option<(Manifest, Manifest)>, Error> {
    if linked.is_empty() {
        return Ok(None);
    }
    let keys: std::collections::HashSet<LinkKey> = linked.iter().filter_map(|e| e.link).collect();
    let cannot = |e| Error::io(format!("cannot read SRC {}", root.path().display()), e);
    // Looks at `paths` on the primary: those still names of one of the inodes.
    let names_of = |paths: Vec<RelPath>| -> Result<Vec<Entry>, Error> {
        if paths.is_empty() {
            return Ok(Vec::new());
        }
        let scopes: Vec<(RelPath, Scope)> = paths.into_iter().map(|p| (p, Scope::Entry)).collect();
        let opts = ScanOptions {
            checksum: false,
            ..scan_opts.clone()
        };
        let found = scan_scopes(root, &scopes, &opts, &|_| {}).map_err(cannot)?;
        Ok(found
            .manifest
            .entries
            .into_iter()
            .filter(|e| e.link.is_some_and(|k| keys.contains(&k)))
            .collect())
    };
    let mine: Vec<&Entry> = linked.iter().collect();
    let known = index.others(&mine);
    let mut extra = names_of(known.into_iter().filter(|p| !listed.holds(p)).collect())?;
    let seen: Vec<&Entry> = linked.iter().chain(&extra).collect();
    let short = index.short(&seen);
    let mut found = std::collections::HashMap::new();
    if !short.is_empty() {
        let started = Instant::now();
        found = crate::walk::find_names(root, &scan_opts.filter, &short).map_err(cannot)?;
        let have: std::collections::HashSet<&RelPath> = seen.iter().map(|e| &e.path).collect();
        let new: Vec<RelPath> = found
            .values()
            .flatten()
            .filter(|p| !have.contains(p) && !listed.holds(p))
            .cloned()
            .collect();
        tracing::debug!(
            "searched the tree for the names of {} inode(s) with several names: {} more, {} ms",
            short.len(),
            new.len(),
            started.elapsed().as_millis()
        );
        extra.extend(names_of(new)?);
    }
    index.record(linked.iter().chain(&extra), &found);
    if extra.is_empty() {
        return Ok(None);
    }
    let scopes: Vec<(RelPath, Scope)> = extra
        .iter()
        .map(|e| (e.path.clone(), Scope::Entry))
        .collect();
    let (local, mut remote, _) = list_both(ch, root, &with_parents(&scopes), scan_opts, monitor)?;
    let mut local = local.manifest;
    // Only the names confirmed (still of the inode) and the directories leading to them.
    let wanted: std::collections::HashSet<&RelPath> = extra.iter().map(|e| &e.path).collect();
    local.entries.retain(|e| {
        e.is_dir() || (wanted.contains(&e.path) && e.link.is_some_and(|k| keys.contains(&k)))
    });
    local.specials.clear();
    let kept: std::collections::HashSet<RelPath> =
        local.entries.iter().map(|e| e.path.clone()).collect();
    remote.entries.retain(|e| kept.contains(&e.path));
    remote.specials.retain(|s| kept.contains(&s.path));
    Ok(Some((local, remote)))
}

/// Records what the primary holds that is not mirrored (special files, names reserved for
/// hotsync), each with a warning once, and its read errors.
fn note_problems(
    summary: &mut Summary,
    specials: &[crate::manifest::Special],
    skipped: &[crate::scan::Skipped],
    errors: &[crate::manifest::ScanError],
) {
    let not_mirrored = specials
        .iter()
        .map(|s| (&s.path, s.reason()))
        .chain(skipped.iter().map(|s| (&s.path, s.reason())));
    for (path, why) in not_mirrored {
        say_once(path, &format!("{path}: {why}"));
        summary.skipped.push(EntryError::new(path, why));
    }
    for e in errors {
        summary
            .errors
            .push(EntryError::new(&e.path, e.error.clone()));
    }
}

/// Warns of `path` once in this process: a watch reconciles the same unmirrored entry
/// again and again, and says so the first time (status and every `--json` list it).
fn say_once(path: &RelPath, message: &str) {
    static SAID: Mutex<Option<std::collections::HashSet<RelPath>>> = Mutex::new(None);
    let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
    let said = said.get_or_insert_with(Default::default);
    // Bounded: past this many, each is said again rather than remembered.
    if said.contains(path) {
        return;
    }
    if said.len() < 100_000 {
        said.insert(path.clone());
    }
    tracing::warn!("{message}");
}

/// Ends the session on the control stream: `Close`, then wait for `Closed`.
fn close_session(ch: &mut Channel) -> Result<(), ProtocolError> {
    ch.send(&Message::Close)?;
    ch.flush()?;
    loop {
        match ch.recv()? {
            Message::Closed => break,
            Message::Ack { .. } => {}
            other => {
                return Err(ProtocolError::unexpected(&other, "Closed"));
            }
        }
    }
    // The standby may already have closed the connection after `Closed`.
    let _ = ch.finish();
    Ok(())
}

fn peer_error(e: ProtocolError) -> Error {
    match e {
        ProtocolError::Peer {
            code: ErrorCode::StaleEpoch,
            message,
        } => Error::Fenced(message),
        ProtocolError::Peer {
            code: ErrorCode::SplitBrain,
            message,
        } => Error::SplitBrain(message),
        ProtocolError::Peer { message, .. } => Error::Standby(message),
        other => other.into(),
    }
}

/// Reads one listing: the standby's entries (and special files), and the temps it cleaned
/// up meanwhile.
fn receive_listing<R: Read>(r: &mut FrameReader<R>) -> Result<(Manifest, u64), ProtocolError> {
    let mut m = Manifest::default();
    let mut sums = None;
    let mut shapes = None;
    loop {
        match r.recv()? {
            Message::XattrSums { sums: s } if sums.is_none() => sums = Some(s),
            Message::Shapes { shapes: s } if shapes.is_none() => shapes = Some(s),
            Message::Specials { specials } => {
                for s in &specials {
                    check_special(s, None)?;
                }
                m.specials.extend(specials);
            }
            Message::Entries {
                mut entries,
                errors,
            } => {
                if let Some(s) = sums.take() {
                    crate::protocol::put_xattr_sums(s, entries.iter_mut())?;
                }
                if let Some(s) = shapes.take() {
                    crate::protocol::put_shapes(s, entries.iter_mut())?;
                }
                m.entries.extend(entries);
                m.errors.extend(errors);
            }
            Message::ListEnd {
                count,
                temps_removed,
            } => {
                if count != m.entries.len() as u64 {
                    return Err(ProtocolError::Invalid("manifest count mismatch".into()));
                }
                m.sort();
                return Ok((m, temps_removed));
            }
            other => {
                return Err(ProtocolError::unexpected(&other, "Entries"));
            }
        }
    }
}

/// Checks a special file a standby reported: never the root nor in the reserved area,
/// and, in a walk, a child of the directory `parent`.
fn check_special(
    s: &crate::manifest::Special,
    parent: Option<&RelPath>,
) -> Result<(), ProtocolError> {
    if s.path.is_root() || s.path.is_reserved() || parent.is_some_and(|d| s.path.split().0 != *d) {
        return Err(ProtocolError::Invalid(format!(
            "the standby reports a special file at {}",
            s.path
        )));
    }
    Ok(())
}

/// What an operation in flight was, to account for its acknowledgement.
#[derive(Debug, Clone)]
enum Op {
    Transfer {
        bytes: u64,
    },
    /// The sender gave the file up after sending it (it changed, or could not be read).
    Abandoned {
        reason: String,
        retry: bool,
    },
    Mkdir,
    Remove {
        entries: u64,
    },
    Meta,
    Symlink,
    Link,
    /// A rename; if it fails, the rescan that follows sends what is needed.
    Rename,
}

/// Operations sent on a stream and not yet acknowledged.
#[derive(Default)]
struct Pending {
    ops: Mutex<HashMap<u64, (RelPath, Op)>>,
    /// Told when acknowledgements arrive, or when no more will.
    acked: std::sync::Condvar,
    over: std::sync::atomic::AtomicBool,
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (RelPath, Op)>> {
        self.ops.lock().unwrap()
    }

    /// Waits until fewer than `n` are unacknowledged, or no acknowledgement will come.
    fn wait_below(&self, n: usize) {
        let mut ops = self.ops.lock().unwrap();
        while ops.len() >= n && !self.over.load(Ordering::Relaxed) {
            ops = self
                .acked
                .wait_timeout(ops, std::time::Duration::from_millis(100))
                .unwrap()
                .0;
        }
    }

    fn end(&self) {
        self.over.store(true, Ordering::Relaxed);
        self.acked.notify_all();
    }
}

/// Operations a lane leaves unacknowledged at most. Past it, the lane asks the standby to
/// commit and waits: what is in flight (and remembered here) stays bounded however fast
/// small files are read, not just by the transport's buffers.
const LANE_IN_FLIGHT: usize = 4 * crate::atomic::BATCH_FILES;

/// How long a file that changed while read may take to hold still for a snapshot.
const SNAPSHOT_BUDGET: std::time::Duration = std::time::Duration::from_millis(500);

struct Exec<'a> {
    conn: &'a dyn Connection,
    root: &'a Root,
    /// The standby's listing, to count what a removal takes; a streamed reconcile has
    /// none and counts removals itself.
    remote: Option<&'a Manifest>,
    tally: Mutex<Summary>,
    /// Files to send again, whole.
    retries: Mutex<Vec<RelPath>>,
    next_id: &'a AtomicU64,
    monitor: &'a dyn Monitor,
    carry: Carry,
}

/// What goes with each entry besides its content, as agreed when the session opened.
#[derive(Debug, Clone, Copy)]
struct Carry {
    /// The extended attributes and ACLs sent with each entry.
    xattrs: Policy,
    /// Files with holes go as `SparseFile` and `SparseDelta` (the standby speaks 5).
    holes: bool,
}

impl<'a> Exec<'a> {
    fn new(
        conn: &'a dyn Connection,
        (root, carry): (&'a Root, Carry),
        remote: Option<&'a Manifest>,
        next_id: &'a AtomicU64,
        monitor: &'a dyn Monitor,
        tally: Summary,
    ) -> Exec<'a> {
        Exec {
            conn,
            root,
            remote,
            tally: Mutex::new(tally),
            retries: Mutex::new(Vec::new()),
            next_id,
            monitor,
            carry,
        }
    }
}

/// `scopes` with their parent directories (as single entries), normalized: a new path may
/// need its directory made, and a change inside a directory changes its mtime.
fn with_parents(scopes: &[(RelPath, Scope)]) -> Vec<(RelPath, Scope)> {
    let mut wanted: Vec<(RelPath, Scope)> = scopes.to_vec();
    for (p, _) in scopes {
        let mut q = p.clone();
        while !q.is_root() {
            q = q.split().0;
            wanted.push((q.clone(), Scope::Entry));
        }
    }
    normalize_scopes(&wanted)
}

/// Why a file could not be read.
enum ReadError {
    /// It disappeared or changed type since the scan: the next sync sees the new state.
    Vanished,
    Other(String),
}

fn read_error(e: io::Error) -> ReadError {
    match e.raw_os_error() {
        Some(c) if c == Errno::NOENT.raw_os_error() || c == Errno::LOOP.raw_os_error() => {
            ReadError::Vanished
        }
        _ if e.kind() == io::ErrorKind::InvalidInput => ReadError::Vanished,
        _ => ReadError::Other(e.to_string()),
    }
}

impl<'a> Exec<'a> {
    /// The attributes to send with the entry at `path` (never followed); `None` after
    /// reporting why they cannot be read.
    fn xattrs_at(&self, path: &RelPath) -> Option<Xattrs> {
        if self.carry.xattrs.is_none() {
            return Some(Xattrs::default());
        }
        let read = if path.is_root() {
            xattrs_of(At::Fd(self.root.fd()), &self.carry.xattrs)
        } else {
            self.root
                .parent_of(path)
                .and_then(|(dir, name)| xattrs_of(At::Name(dir.as_fd(), &name), &self.carry.xattrs))
        };
        match read.map_err(read_error) {
            Ok(x) => Some(x),
            Err(ReadError::Vanished) => {
                self.vanished(path);
                None
            }
            Err(ReadError::Other(e)) => {
                self.error(path, format!("cannot read: {e}"));
                None
            }
        }
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A file gone (or of another type) since the scan: a routine race on a live tree; the
    /// next look at the path sees its new state.
    fn vanished(&self, path: &RelPath) {
        tracing::debug!("{path}: vanished or changed type since the scan; skipped");
        self.tally.lock().unwrap().vanished += 1;
    }

    fn error(&self, path: &RelPath, msg: String) {
        tracing::warn!("{path}: {msg}");
        self.tally
            .lock()
            .unwrap()
            .errors
            .push(EntryError::new(path, msg));
    }

    fn run(&self, plan: &Plan, ch: &mut Channel, opts: &SyncOptions) -> Result<(), Error> {
        self.prepare(plan, ch)?;
        self.transfer(plan, opts)?;
        self.link_and_remove(plan, ch)
    }

    /// Step 1 of a plan: what is in the way out of it, then directories, parents first.
    fn prepare(&self, plan: &Plan, ch: &mut Channel) -> Result<(), Error> {
        let mut ops = Vec::new();
        for p in &plan.clear {
            ops.push(self.removal(
                Message::Clear {
                    id: self.id(),
                    path: p.clone(),
                },
                p,
            ));
        }
        for p in &plan.mkdirs {
            ops.push((
                Message::Mkdir {
                    id: self.id(),
                    path: p.clone(),
                },
                p.clone(),
                Op::Mkdir,
            ));
        }
        self.control_batch(ch, ops, 1)
    }

    /// Step 2 of a plan: content and attributes, many streams at once.
    fn transfer(&self, plan: &Plan, opts: &SyncOptions) -> Result<(), Error> {
        let t = std::time::Instant::now();
        let (small, big): (Vec<&Transfer>, Vec<&Transfer>) = plan
            .transfers
            .iter()
            .partition(|t| t.method() == Method::Small);
        let mut items: Vec<LaneItem> = small.into_iter().map(LaneItem::File).collect();
        items.extend(plan.symlinks.iter().map(LaneItem::Symlink));
        items.extend(plan.metas.iter().map(LaneItem::Meta));
        let lanes = opts.lanes.max(1).min(items.len().max(1));
        let next_big = AtomicUsize::new(0);
        let result: Mutex<Result<(), Error>> = Mutex::new(Ok(()));
        std::thread::scope(|s| {
            let per = items.len().div_ceil(lanes);
            for chunk in items.chunks(per.max(1)) {
                let result = &result;
                s.spawn(move || {
                    if let Err(e) = self.lane(chunk) {
                        let mut r = result.lock().unwrap();
                        if r.is_ok() {
                            *r = Err(e);
                        }
                        self.conn.close("lane failed");
                    }
                });
            }
            for _ in 0..opts.big_streams.max(1).min(big.len()) {
                let (result, big, next_big) = (&result, &big, &next_big);
                s.spawn(move || {
                    while let Some(t) = big.get(next_big.fetch_add(1, Ordering::Relaxed)) {
                        if let Err(e) = self.big_file(t) {
                            let mut r = result.lock().unwrap();
                            if r.is_ok() {
                                *r = Err(e);
                            }
                            self.conn.close("transfer failed");
                            break;
                        }
                    }
                });
            }
        });
        result.into_inner().unwrap()?;
        tracing::debug!("{} ms: transfers done", t.elapsed().as_millis());
        self.retry()
    }

    /// Files the standby could not make durable, or that changed while read: once more, whole.
    fn retry(&self) -> Result<(), Error> {
        for path in std::mem::take(&mut *self.retries.lock().unwrap()) {
            self.whole_stream(&path, false)?;
        }
        Ok(())
    }

    /// Steps 3 and 4 of a plan: hard links, now that their targets are durable; then
    /// deletes, and directory attributes last.
    fn link_and_remove(&self, plan: &Plan, ch: &mut Channel) -> Result<(), Error> {
        let ops = plan
            .links
            .iter()
            .map(|l| {
                (
                    Message::Link {
                        id: self.id(),
                        path: l.path.clone(),
                        target: l.target.clone(),
                    },
                    l.path.clone(),
                    Op::Link,
                )
            })
            .collect();
        self.control_batch(ch, ops, 2)?;

        // 4. Deletes, deepest first, then directory attributes, deepest first.
        let mut ops = Vec::new();
        for p in &plan.deletes {
            ops.push(self.removal(
                Message::Delete {
                    id: self.id(),
                    path: p.clone(),
                },
                p,
            ));
        }
        for m in &plan.dir_metas {
            ops.push((set_meta(m, self.id()), m.path.clone(), Op::Meta));
        }
        self.control_batch(ch, ops, 3)
    }

    /// A removal to send, accounted as the standby entries it takes away.
    fn removal(&self, msg: Message, p: &RelPath) -> (Message, RelPath, Op) {
        let entries = self.remote.map_or(1, |r| r.count_under(p));
        (msg, p.clone(), Op::Remove { entries })
    }

    /// Sends operations on the control stream and waits until they are durable.
    fn control_batch(
        &self,
        ch: &mut Channel,
        ops: Vec<(Message, RelPath, Op)>,
        seq: u64,
    ) -> Result<(), Error> {
        if ops.is_empty() {
            return Ok(());
        }
        let pending = Pending::default();
        let Channel { r, w } = ch;
        self.pipelined(r, &pending, seq, || {
            for (msg, path, op) in ops {
                let id = msg.op_id().expect("control operations carry an id");
                if let Message::SetMeta { path, .. } = &msg {
                    // Read now, as the message goes: a directory's attributes are set
                    // after everything inside it.
                    let Some(x) = self.xattrs_at(path) else {
                        continue;
                    };
                    send_xattrs(w, x)?;
                }
                pending.lock().insert(id, (path, op));
                w.send(&msg)?;
            }
            w.send(&Message::Flush { seq })?;
            w.flush()
        })
    }

    /// Runs `send` while another thread reads the acknowledgements it causes, so neither
    /// side ever waits on the other's buffers.
    fn pipelined<R: Read + Send>(
        &self,
        r: &mut FrameReader<R>,
        pending: &Pending,
        seq: u64,
        send: impl FnOnce() -> Result<(), ProtocolError>,
    ) -> Result<(), Error> {
        std::thread::scope(|s| {
            let acks = s.spawn(|| {
                let read = self.read_acks(r, pending, seq);
                pending.end();
                read
            });
            let sent = send();
            if sent.is_err() {
                // The ack reader would wait for answers to what was never sent.
                self.conn.close("send failed");
            }
            let acked = acks.join().expect("ack reader panicked");
            // The ack reader's error explains a broken send best (the peer's reason).
            acked?;
            sent
        })
        .map_err(peer_error)
    }

    /// Reads acknowledgements until `Flushed { seq }` (or the end of the stream when
    /// `seq` is 0, with `Flushed { seq: 0 }` along the way), accounting for each.
    fn read_acks<R: Read>(
        &self,
        r: &mut FrameReader<R>,
        pending: &Pending,
        seq: u64,
    ) -> Result<(), ProtocolError> {
        loop {
            let msg = if seq == 0 {
                match r.recv_opt()? {
                    Some(m) => m,
                    None => return Ok(()),
                }
            } else {
                r.recv()?
            };
            match msg {
                Message::Ack { id, error } => {
                    let found = pending.lock().remove(&id);
                    pending.acked.notify_all();
                    let Some((path, op)) = found else {
                        return Err(ProtocolError::Invalid(format!(
                            "ack for unknown operation {id}"
                        )));
                    };
                    self.account(path, op, error);
                }
                // A lane's commits along the way (it ends with its stream).
                Message::Flushed { seq: 0 } if seq == 0 => {}
                Message::Flushed { seq: s } if s == seq => return Ok(()),
                other => {
                    return Err(ProtocolError::unexpected(&other, "Ack"));
                }
            }
        }
    }

    fn account(&self, path: RelPath, op: Op, error: Option<OpError>) {
        match (op, error) {
            (Op::Abandoned { retry: true, .. }, _) => self.retries.lock().unwrap().push(path),
            (Op::Abandoned { reason, .. }, _) => self.error(&path, reason),
            (Op::Rename, Some(e)) => {
                tracing::debug!("rename to {path} not applied ({}); rescanning", e.message)
            }
            (Op::Transfer { .. }, Some(e)) if e.retry && !e.no_space => {
                self.retries.lock().unwrap().push(path)
            }
            (op, Some(e)) => {
                if e.no_space {
                    self.tally.lock().unwrap().no_space += 1;
                }
                let e = e.message;
                let what = match op {
                    Op::Transfer { .. } | Op::Abandoned { .. } => "cannot write on the standby",
                    Op::Mkdir => "cannot create directory on the standby",
                    Op::Remove { .. } => "cannot remove on the standby",
                    Op::Meta => "cannot set attributes on the standby",
                    Op::Symlink => "cannot write symlink on the standby",
                    Op::Link => "cannot make hard link on the standby",
                    Op::Rename => "cannot rename on the standby",
                };
                self.error(&path, format!("{what}: {e}"));
            }
            (op, None) => {
                let mut t = self.tally.lock().unwrap();
                match op {
                    Op::Transfer { bytes } => {
                        t.files_transferred += 1;
                        drop(t);
                        self.monitor.file_done(bytes);
                    }
                    Op::Mkdir => t.dirs_created += 1,
                    Op::Remove { entries } => t.files_deleted += entries,
                    Op::Meta => t.metadata_updated += 1,
                    Op::Symlink => t.symlinks_written += 1,
                    Op::Link => t.hard_links_made += 1,
                    Op::Rename => t.renamed += 1,
                    Op::Abandoned { .. } => {}
                }
            }
        }
    }

    /// One lane: small files, symlinks and attribute fixes, pipelined; acks read alongside.
    fn lane(&self, items: &[LaneItem]) -> Result<(), Error> {
        self.lane_with(|send| items.iter().try_for_each(|i| send(Some(*i))))
    }

    /// A lane fed by `feed`, which hands each item to the function it is given (`None`:
    /// nothing more for now, send what is buffered).
    fn lane_with(
        &self,
        feed: impl FnOnce(
            &mut dyn FnMut(Option<LaneItem>) -> Result<(), ProtocolError>,
        ) -> Result<(), ProtocolError>,
    ) -> Result<(), Error> {
        let Stream { recv, send } = self.conn.open().map_err(ProtocolError::Io)?;
        let mut r = FrameReader::new(recv);
        let mut w = FrameWriter::new(send);
        let pending = Pending::default();
        self.pipelined(&mut r, &pending, 0, || {
            let mut buf = Vec::new();
            let mut staged = false;
            feed(&mut |item| {
                let Some(item) = item else {
                    // Idle: what the standby holds staged is made durable and visible now,
                    // not when more comes (a change found early in a long walk).
                    if std::mem::take(&mut staged) {
                        w.send(&Message::Flush { seq: 0 })?;
                    }
                    return w.flush();
                };
                if pending.lock().len() >= LANE_IN_FLIGHT {
                    if std::mem::take(&mut staged) {
                        w.send(&Message::Flush { seq: 0 })?;
                    }
                    w.flush()?;
                    // Resumed after one batch's acknowledgements: the standby still has
                    // others to commit meanwhile.
                    pending.wait_below(LANE_IN_FLIGHT - crate::atomic::BATCH_FILES);
                }
                staged = true;
                let id = self.id();
                match item {
                    LaneItem::File(t) => self.send_small(&mut w, &pending, id, t, &mut buf)?,
                    LaneItem::Symlink(l) => {
                        let Some(x) = self.xattrs_at(&l.path) else {
                            return Ok(());
                        };
                        pending.lock().insert(id, (l.path.clone(), Op::Symlink));
                        send_xattrs(&mut w, x)?;
                        w.send(&Message::Symlink {
                            id,
                            path: l.path.clone(),
                            target: l.target.clone(),
                            meta: l.meta,
                        })?;
                    }
                    LaneItem::Meta(m) => {
                        let Some(x) = self.xattrs_at(&m.path) else {
                            return Ok(());
                        };
                        pending.lock().insert(id, (m.path.clone(), Op::Meta));
                        send_xattrs(&mut w, x)?;
                        w.send(&set_meta(m, id))?;
                    }
                }
                Ok(())
            })?;
            w.flush()?;
            w.get_mut().finish()?;
            Ok(())
        })
    }

    fn send_small<W: Write>(
        &self,
        w: &mut FrameWriter<W>,
        pending: &Pending,
        id: u64,
        t: &Transfer,
        buf: &mut Vec<u8>,
    ) -> Result<(), ProtocolError> {
        match read_small(self.root, &t.path, buf, &self.carry.xattrs) {
            Ok(Some((st, x))) => {
                let meta = meta_of(&st);
                pending.lock().insert(
                    id,
                    (
                        t.path.clone(),
                        Op::Transfer {
                            bytes: buf.len() as u64,
                        },
                    ),
                );
                send_xattrs(w, x)?;
                w.send(&Message::SmallFile {
                    id,
                    path: t.path.clone(),
                    meta,
                    len: buf.len() as u64,
                })?;
                w.write_raw(buf)?;
                self.tally.lock().unwrap().bytes_literal += buf.len() as u64;
                Ok(())
            }
            // It grew past the small-file size since the scan: send it whole, inline.
            Ok(None) => self.send_whole(w, pending, id, &t.path, None).map(|_| ()),
            Err(ReadError::Vanished) => {
                self.vanished(&t.path);
                Ok(())
            }
            Err(ReadError::Other(e)) => {
                self.error(&t.path, format!("cannot read: {e}"));
                Ok(())
            }
        }
    }

    /// Sends a file whole on `w`: `BigFile`, its bytes, `FileEnd`. A file that shrinks,
    /// grows or changes while read is abandoned (the standby discards it). With `snap`,
    /// the file as that snapshot holds it (its attributes as they were then; the extended
    /// ones, which the copy lacks, read from the file itself).
    fn send_whole<W: Write>(
        &self,
        w: &mut FrameWriter<W>,
        pending: &Pending,
        id: u64,
        path: &RelPath,
        snap: Option<&crate::snapshot::Snapshot>,
    ) -> Result<bool, ProtocolError> {
        let live = match self.root.open_file(path) {
            Ok(f) => f,
            Err(e) => {
                match read_error(e) {
                    ReadError::Vanished => self.vanished(path),
                    ReadError::Other(e) => self.error(path, format!("cannot read: {e}")),
                }
                return Ok(false);
            }
        };
        let f = snap.map_or(&live, |s| &s.file);
        let before = match snap {
            Some(s) => s.stat,
            None => rustix::fs::fstat(f).map_err(io::Error::from)?,
        };
        let size = before.st_size as u64;
        let meta = meta_of(&before);
        let x = match xattrs_of(At::Fd(live.as_fd()), &self.carry.xattrs) {
            Ok(x) => x,
            Err(e) => {
                self.error(path, format!("cannot read: {e}"));
                return Ok(false);
            }
        };
        pending
            .lock()
            .insert(id, (path.clone(), Op::Transfer { bytes: size }));
        send_xattrs(w, x)?;
        let sparse = self.carry.holes && crate::sparse::has_holes(&before);
        let mut problem = if sparse {
            w.send(&Message::SparseFile {
                id,
                path: path.clone(),
                meta,
                size,
            })?;
            self.send_extents(w, f, size)?
        } else {
            w.send(&Message::BigFile {
                id,
                path: path.clone(),
                meta,
                size,
            })?;
            self.tally.lock().unwrap().bytes_literal += size;
            read_through(f, size, |piece| w.write_raw(piece))?
        };
        // A snapshot does not change; the file itself is checked.
        let after = rustix::fs::fstat(f).map_err(io::Error::from)?;
        if problem.is_none() && snap.is_none() && changed(&before, &after) {
            problem = Some(("changed while being read".into(), true));
        }
        match problem {
            None => w.send(&Message::FileEnd {
                complete: true,
                digest: None,
            })?,
            Some((reason, retry)) => {
                pending
                    .lock()
                    .insert(id, (path.clone(), Op::Abandoned { reason, retry }));
                w.send(&Message::FileEnd {
                    complete: false,
                    digest: None,
                })?;
            }
        }
        Ok(true)
    }

    /// Sends the data of a file with holes as `Extent`s, each with its bytes: the holes
    /// are not sent. A problem reading it (it shrank, say) is returned, and the file
    /// abandoned by the caller.
    fn send_extents<W: Write>(
        &self,
        w: &mut FrameWriter<W>,
        f: &std::fs::File,
        size: u64,
    ) -> Result<Option<(String, bool)>, ProtocolError> {
        let mut buf = Vec::new();
        for extent in crate::sparse::Extents::new(f, size) {
            let (start, end) = match extent {
                Ok(e) => e,
                Err(e) => return Ok(Some(read_problem(&e))),
            };
            w.send(&Message::Extent {
                offset: start,
                len: end - start,
            })?;
            let problem = read_range(f, start, end, &mut buf, |piece| w.write_raw(piece))?;
            self.tally.lock().unwrap().bytes_literal += end - start;
            if problem.is_some() {
                return Ok(problem);
            }
        }
        Ok(None)
    }

    /// A large file on a stream of its own: a delta when the standby has a version of it.
    fn big_file(&self, t: &Transfer) -> Result<(), Error> {
        if t.method() == Method::Delta {
            self.delta_stream(t)
        } else {
            self.whole_stream(&t.path, true)
        }
    }

    /// Sends one file whole on a new stream and waits for its acknowledgement; retries a
    /// file that changed while read (`allow_retry`) a few times.
    fn whole_stream(&self, path: &RelPath, allow_retry: bool) -> Result<(), Error> {
        // Set once it changed while read: from then on it is sent from a snapshot, which
        // takes a moment's local copy instead of a whole send's time to stay still.
        let mut unsteady = !allow_retry;
        for attempt in 0..3 {
            let snap = if unsteady {
                crate::snapshot::take(self.root, path, SNAPSHOT_BUDGET)
                    .ok()
                    .flatten()
            } else {
                None
            };
            let Stream { recv, send } = self.conn.open().map_err(ProtocolError::Io)?;
            let mut r = FrameReader::new(recv);
            let mut w = FrameWriter::new(send);
            let pending = Pending::default();
            let id = self.id();
            let sent = self
                .send_whole(&mut w, &pending, id, path, snap.as_ref())
                .and_then(|sent| {
                    w.flush()?;
                    w.get_mut().finish()?;
                    Ok(sent)
                });
            if !sent.map_err(peer_error)? {
                return Ok(());
            }
            let (p, op) = pending.lock().remove(&id).expect("registered above");
            let error = read_one_ack(&mut r, id).map_err(peer_error)?;
            let again = match &op {
                Op::Abandoned { retry, .. } => {
                    unsteady = true;
                    *retry
                }
                Op::Transfer { .. } => error.as_ref().is_some_and(|e| e.retry && !e.no_space),
                _ => false,
            };
            if again && attempt < 2 && (allow_retry || attempt == 0) {
                continue;
            }
            let op = match op {
                Op::Abandoned { reason, .. } => Op::Abandoned {
                    reason,
                    retry: false,
                },
                other => other,
            };
            let error = error.map(|e| OpError { retry: false, ..e });
            self.account(p, op, error);
            return Ok(());
        }
        Ok(())
    }

    fn delta_stream(&self, t: &Transfer) -> Result<(), Error> {
        let f = match self.root.open_file(&t.path) {
            Ok(f) => f,
            Err(e) => {
                match read_error(e) {
                    ReadError::Vanished => self.vanished(&t.path),
                    ReadError::Other(e) => self.error(&t.path, format!("cannot read: {e}")),
                }
                return Ok(());
            }
        };
        let before = rustix::fs::fstat(&f).map_err(|e| ProtocolError::Io(e.into()))?;
        // Its holes are neither read nor hashed, and the standby keeps them.
        let sparse = self.carry.holes && crate::sparse::has_holes(&before);
        let size = before.st_size as u64;
        let meta = meta_of(&before);
        let x = match xattrs_of(At::Fd(f.as_fd()), &self.carry.xattrs) {
            Ok(x) => x,
            Err(e) => {
                self.error(&t.path, format!("cannot read: {e}"));
                return Ok(());
            }
        };
        let chunk = chunk_size(size);
        let Stream { recv, send } = self.conn.open().map_err(ProtocolError::Io)?;
        let mut r = FrameReader::new(recv);
        let mut w = FrameWriter::new(send);
        let id = self.id();
        // (the standby's error, its retry request, our own problem with the file)
        // (the standby's error, our own problem with the file and whether to retry it)
        type Exchange = (Option<OpError>, Option<(String, bool)>);
        let exchange = (|| -> Result<Exchange, ProtocolError> {
            send_xattrs(&mut w, x)?;
            let chunks = size.div_ceil(chunk);
            w.send(&if sparse {
                Message::SparseDelta {
                    id,
                    path: t.path.clone(),
                    meta,
                    size,
                    chunk,
                    chunks,
                }
            } else {
                Message::Delta {
                    id,
                    path: t.path.clone(),
                    meta,
                    size,
                    chunk,
                    chunks,
                }
            })?;
            // The standby starts hashing its base now, while we hash the new version.
            w.flush()?;
            let (mut problem, digest) = if sparse {
                // Hashed first, holes skipped, then the chunk digests sent together.
                let (digests, digest, problem) =
                    match delta::hash_chunks(&delta::Holey(&f), size, chunk) {
                        Ok((d, h)) => (d, h, None),
                        Err(e) => (
                            vec![[0; 32]; chunks as usize],
                            [0; 32],
                            Some(read_problem(&e)),
                        ),
                    };
                for c in &digests {
                    w.write_raw(&c[..COARSE_HASH_LEN])?;
                }
                (problem, digest)
            } else {
                let mut hasher = delta::ChunkedHasher::new(chunk);
                let mut sent = 0;
                let problem = read_through(&f, size, |piece| {
                    hasher.update(piece);
                    for c in &hasher.completed()[sent..] {
                        w.write_raw(&c[..COARSE_HASH_LEN])?;
                    }
                    sent = hasher.completed().len();
                    Ok(())
                })?;
                let (digests, digest) = hasher.finish();
                for c in &digests[sent..] {
                    w.write_raw(&c[..COARSE_HASH_LEN])?;
                }
                (problem, digest)
            };
            w.flush()?;
            let encoder = match r.recv()? {
                Message::BaseSig {
                    base_size,
                    block_size,
                    matched_len,
                    fine_len,
                } => {
                    // Bounded before anything is allocated: a base no larger than a standby
                    // signs, and a fine signature (one entry per block of at least 512
                    // bytes) of at most 256 MiB.
                    let expect_matched = base_size.div_ceil(chunk).div_ceil(8);
                    let max_fine = ((base_size / 512 + 1) * 12).min(256 << 20);
                    if base_size.div_ceil(chunk) > delta::MAX_BASE_CHUNKS
                        || matched_len != expect_matched
                        || fine_len > max_fine
                    {
                        return Err(ProtocolError::Invalid(
                            "base signature sizes do not fit the base".into(),
                        ));
                    }
                    let mut matched = vec![0u8; matched_len as usize];
                    r.read_raw(&mut matched)?;
                    let mut fine = vec![0u8; fine_len as usize];
                    r.read_raw(&mut fine)?;
                    let sig = delta::BaseSignature {
                        block_size,
                        matched,
                        fine,
                    };
                    Some(
                        DeltaEncoder::new(base_size, chunk, sig)
                            .map_err(|e| ProtocolError::Invalid(e.to_string()))?,
                    )
                }
                Message::NoBase { reason } => {
                    tracing::debug!("{}: no delta basis on the standby ({reason})", t.path);
                    if sparse && problem.is_none() {
                        // Literal ops would carry the holes as zeros: it goes as its data.
                        problem = Some(("no delta basis for a sparse file".into(), true));
                    }
                    None
                }
                other => {
                    return Err(ProtocolError::unexpected(&other, "BaseSig"));
                }
            };
            if problem.is_none() {
                let stats = match &encoder {
                    Some(enc) => enc.encode(&f, size, w.raw()),
                    None => delta::encode_literal(&f, size, w.raw()),
                };
                match stats {
                    Ok(stats) => {
                        let mut tl = self.tally.lock().unwrap();
                        tl.bytes_literal += stats.literal;
                        tl.bytes_matched += stats.matched;
                    }
                    // A read failed mid-way (a write failure shows again below).
                    Err(delta::DeltaError::Io(e)) => problem = Some(read_problem(&e)),
                    Err(e) => return Err(ProtocolError::Invalid(e.to_string())),
                }
            }
            if problem.is_some() {
                delta::write_abort(w.raw())?;
            } else if changed(&before, &rustix::fs::fstat(&f).map_err(io::Error::from)?) {
                problem = Some(("changed while being read".to_string(), true));
            }
            w.send(&Message::FileEnd {
                complete: problem.is_none(),
                digest: problem.is_none().then_some(digest),
            })?;
            w.flush()?;
            w.get_mut().finish()?;
            let error = read_one_ack(&mut r, id)?;
            Ok((error, problem))
        })();
        match exchange {
            Ok((_, Some((_, true)))) => {
                tracing::debug!("{}: changed while read; sending it again", t.path);
                self.whole_stream(&t.path, true)
            }
            Ok((Some(e), None)) if e.retry && !e.no_space => {
                tracing::debug!("{}: delta not accepted; sending it whole", t.path);
                self.whole_stream(&t.path, true)
            }
            Ok((_, Some((p, false)))) => {
                self.error(&t.path, p);
                Ok(())
            }
            Ok((error, None)) => {
                self.account(t.path.clone(), Op::Transfer { bytes: size }, error);
                Ok(())
            }
            Err(e) => Err(peer_error(e)),
        }
    }
}

/// Reads `size` bytes of `f` in pieces and hands each to `each`. After a failed read the
/// rest comes as zeros, so a stream promised `size` bytes still gets them; the failure is
/// returned, and the file must then be abandoned.
fn read_through(
    f: &std::fs::File,
    size: u64,
    each: impl FnMut(&[u8]) -> Result<(), ProtocolError>,
) -> Result<Option<(String, bool)>, ProtocolError> {
    read_range(f, 0, size, &mut Vec::new(), each)
}

/// [`read_through`] of the bytes `start..end`, in pieces of `buf` (sized here).
fn read_range(
    f: &std::fs::File,
    start: u64,
    end: u64,
    buf: &mut Vec<u8>,
    mut each: impl FnMut(&[u8]) -> Result<(), ProtocolError>,
) -> Result<Option<(String, bool)>, ProtocolError> {
    buf.resize((1 << 20).min(end - start).max(1) as usize, 0);
    let mut off = start;
    let mut problem = None;
    while off < end {
        let n = buf.len().min((end - off) as usize);
        if problem.is_none()
            && let Err(e) = delta::ReadAt::read_exact_at(f, &mut buf[..n], off)
        {
            problem = Some(read_problem(&e));
        }
        if problem.is_some() {
            buf[..n].fill(0);
        }
        each(&buf[..n])?;
        off += n as u64;
    }
    Ok(problem)
}

/// What a failed read of a file being sent means for it: a file that shrank changed while
/// read (worth another try); anything else is an error to report.
fn read_problem(e: &io::Error) -> (String, bool) {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        ("changed while being read".into(), true)
    } else {
        (format!("cannot read: {e}"), false)
    }
}

/// Reads the single `Ack` answering a per-file stream.
fn read_one_ack<R: Read>(
    r: &mut FrameReader<R>,
    id: u64,
) -> Result<Option<OpError>, ProtocolError> {
    match r.recv()? {
        Message::Ack { id: got, error } if got == id => Ok(error),
        other => Err(ProtocolError::unexpected(&other, "Ack")),
    }
}

#[derive(Clone, Copy)]
enum LaneItem<'p> {
    File(&'p Transfer),
    Symlink(&'p SymlinkOp),
    Meta(&'p MetaFix),
}

/// The attributes of `at` that `policy` keeps, if they fit what one entry may carry.
fn xattrs_of(at: At<'_>, policy: &Policy) -> io::Result<Xattrs> {
    let x = crate::xattr::read(at, policy)?;
    if x.0.len() > crate::xattr::MAX_COUNT || x.bytes() > crate::xattr::MAX_TOTAL {
        return Err(io::Error::other(format!(
            "{} extended attributes of {} bytes are more than hotsync mirrors \
             ({} and {} bytes at most)",
            x.0.len(),
            x.bytes(),
            crate::xattr::MAX_COUNT,
            crate::xattr::MAX_TOTAL
        )));
    }
    Ok(x)
}

/// Sends the attributes of the entry the next message writes; none need no message.
fn send_xattrs<W: Write>(w: &mut FrameWriter<W>, x: Xattrs) -> Result<(), ProtocolError> {
    if x.is_empty() {
        return Ok(());
    }
    w.send(&Message::Xattrs { attrs: x })
}

/// Warns, once in this process for each set of them, of attributes asked for that the
/// standby cannot store.
fn say_once_what_the_standby_lacks(want: &Policy, can: &Policy) {
    let lacks = want.missing_in(can);
    if !lacks.is_empty() {
        let lacks = lacks.join(", ");
        crate::xattr::say_once(
            &lacks,
            &format!("the standby cannot store {lacks}: they are not mirrored there"),
        );
    }
}

fn set_meta(m: &MetaFix, id: u64) -> Message {
    Message::SetMeta {
        id,
        path: m.path.clone(),
        meta: m.meta,
        target: m.target,
    }
}

/// Reads a small file whole into `buf`, re-reading if it changed meanwhile. `Ok(None)`:
/// it has grown past the small-file size.
fn read_small(
    root: &Root,
    path: &RelPath,
    buf: &mut Vec<u8>,
    policy: &Policy,
) -> Result<Option<(rustix::fs::Stat, Xattrs)>, ReadError> {
    for _ in 0..5 {
        let mut f = root.open_file(path).map_err(read_error)?;
        let before = rustix::fs::fstat(&f).map_err(|e| read_error(e.into()))?;
        if before.st_size as u64 > SMALL_FILE {
            return Ok(None);
        }
        buf.clear();
        (&mut f)
            .take(SMALL_FILE + 1)
            .read_to_end(buf)
            .map_err(read_error)?;
        // Read before the second stat: a change of attributes meanwhile changes the ctime.
        let x = xattrs_of(At::Fd(f.as_fd()), policy).map_err(read_error)?;
        let after = rustix::fs::fstat(&f).map_err(|e| read_error(e.into()))?;
        if !changed(&before, &after) && buf.len() as u64 == after.st_size as u64 {
            return Ok(Some((after, x)));
        }
    }
    Err(ReadError::Other("keeps changing while being read".into()))
}
