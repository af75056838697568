//! One session with a standby: the handshake that opens it, its public API (full and
//! partial reconciles, repair, listing, close), and the choice of reconcile: walked
//! ([`super::streamed`]) or listed ([`super::listed`]).

use super::attrs::say_once_what_the_standby_lacks;
use super::ends::{Carry, Ends, peer_error};
use super::exec::Exec;
use super::mass_delete::DeleteGuard;
use super::{Early, Outcome, SyncOptions};
use crate::error::Error;
use crate::error::ProtocolError;
use crate::model::filter::Filter;
use crate::model::guard::{self, Absences};
use crate::model::manifest::{Manifest, Scope, normalize_scopes};
use crate::model::names::LinkIndex;
use crate::model::path::RelPath;
use crate::model::plan::PlanOptions;
use crate::model::progress::Monitor;
use crate::model::summary::Summary;
use crate::primary::link::Link;
use crate::standby::Position;
use crate::tree::fsroot::Root;
use crate::tree::scan::{ScanOptions, ScanOutcome};
use crate::tree::walk::{Gate, Scopes};
use crate::wire::channel::Channel;
use crate::wire::handshake::{self, Agreed, Hello, Welcome};
use crate::wire::heartbeat::{self, Beating, Pulse};
use crate::wire::protocol::{Caps, Message, SessionMode};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

/// One session with a standby over one connection: a full reconcile, any number of partial
/// ones (watch mode: only the paths that changed), then `close`. It owns its link: dropping
/// a session that was not closed aborts the connection.
pub(crate) struct Session<'m> {
    /// Declared first: dropped before the heartbeat, which the link's abort unblocks.
    pub(super) ends: Ends<'m>,
    /// The heartbeat: stopped before a clean close; on a failure, dropped after the link.
    beating: Option<Beating>,
    /// The last batch the standby holds durable, as it said when the session opened.
    pub position: Position,
    pub(super) opts: SyncOptions,
    pub(super) scan_opts: ScanOptions,
    /// The control stream.
    pub(super) ch: Channel,
    /// What both sides can do (the protocol version they speak, by capability).
    pub caps: Caps,
    /// Whether the standby preserves owner and group (it runs as root).
    pub owners: bool,
    /// The standby's entries at the last full listing: the mass-delete guard's yardstick.
    pub(super) remote_total: usize,
    /// What reading the primary's tree waits on (a watcher still setting up its watches).
    pub(super) gate: Option<Arc<dyn Gate>>,
    /// Changes seen while a long reconcile runs, to copy early.
    pub(super) early: Option<Arc<dyn Early>>,
    /// Where the absences of the next reconciles come from (what the mass-delete guard
    /// judges): inferred, unless a watch says otherwise.
    absences: Absences,
    /// The primary's files and symlinks with several names: a partial reconcile plans the
    /// whole group of each it meets.
    pub(super) links: LinkIndex,
}

/// The session as opened: its control stream, what both sides agreed, and its heartbeat.
struct Opened {
    ch: Channel,
    agreed: Agreed<Welcome>,
    beating: Option<Beating>,
}

/// The primary's side of the handshake on a new control stream of `link`: the session is
/// opened as `opts` say, the attributes to mirror agreed, and the heartbeat started.
fn handshake(link: &Link, opts: &SyncOptions, pulse: Arc<dyn Pulse>) -> Result<Opened, Error> {
    let hello = Hello {
        excludes: opts.excludes.clone(),
        mode: if opts.dry_run {
            SessionMode::ReadOnly
        } else {
            SessionMode::Write
        },
        epoch: opts.epoch,
    };
    let mut ch = Channel::open(&**link.conn())?;
    let agreed = handshake::open(&mut ch, &hello, |w| {
        say_once_what_the_standby_lacks(&opts.xattrs, &w.can);
        opts.xattrs
    })
    .map_err(peer_error)?;
    let beating = agreed
        .caps
        .heartbeats
        .then(|| heartbeat::start(link.conn().clone(), pulse))
        .transpose()?;
    Ok(Opened {
        ch,
        agreed,
        beating,
    })
}

/// Says once what an older standby cannot mirror.
fn warn_of_the_standby(o: &Agreed<Welcome>) {
    if !o.said.owners {
        tracing::warn!("the standby does not run as root: owner and group are not preserved there");
    }
    if !o.caps.shapes {
        let version = o.caps.version;
        crate::tree::xattr::say_once(
            "a standby before protocol 6",
            &format!(
                "the standby runs an older hotsync (protocol {version}): symlinks with \
                 several names are mirrored there as separate symlinks, and special files \
                 on it are neither seen nor removed; upgrade it"
            ),
        );
    }
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
        let pulse = Arc::new(heartbeat::Simple::new(opts.epoch));
        Session::open_with(root, link, opts, monitor, pulse)
    }

    /// Opens the session with `pulse` deciding its heartbeats (a watch's replica).
    ///
    /// # Errors
    /// As [`Session::open`]; [`Error::Usage`] for an exclude pattern that does not parse.
    pub fn open_with(
        root: Arc<Root>,
        link: Link,
        opts: &SyncOptions,
        monitor: &'m dyn Monitor,
        pulse: Arc<dyn Pulse>,
    ) -> Result<Session<'m>, Error> {
        let filter = Filter::new(&opts.excludes).map_err(|e| Error::Usage(e.to_string()))?;
        let opened = handshake(&link, opts, pulse).map_err(|e| link.explain(e))?;
        let Opened {
            ch,
            agreed,
            beating,
        } = opened;
        warn_of_the_standby(&agreed);
        let (caps, xattrs) = (agreed.caps, agreed.xattrs);
        let Welcome {
            owners, position, ..
        } = agreed.said;
        Ok(Session {
            ends: Ends {
                link,
                root,
                carry: Carry {
                    xattrs,
                    holes: caps.holes,
                    watching: opts.watching,
                },
                monitor,
                next_id: AtomicU64::new(1),
            },
            beating,
            position,
            opts: opts.clone(),
            scan_opts: ScanOptions {
                checksum: opts.checksum,
                hash_rate: opts.hash_rate,
                filter,
                remove_temps: false,
                primary: true,
                xattrs,
                split_symlinks: !caps.shapes,
            },
            ch,
            caps,
            owners,
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

    /// Encoded protocol bytes carried so far, both ways.
    pub fn wire_bytes(&self) -> u64 {
        self.ends.conn().wire_bytes()
    }

    /// Reconciles the whole tree.
    ///
    /// # Errors
    /// [`Error::Refused`] for an empty source facing a standby that is not (nothing is
    /// touched), or why the session failed. Errors with single entries are in the summary.
    pub fn sync_all(&mut self) -> Result<Outcome, Error> {
        let r = self.reconcile(&[], &[(RelPath::root(), Scope::Tree)], true);
        r.map_err(|e| self.ends.link.explain(e))
    }

    /// Applies `renames` on the standby as renames, then reconciles only `scopes` (and their
    /// parent directories). A path that no longer exists on the primary is removed.
    ///
    /// # Errors
    /// As [`Session::sync_all`].
    pub fn sync_paths(
        &mut self,
        renames: &[(RelPath, RelPath)],
        scopes: &[(RelPath, Scope)],
    ) -> Result<Outcome, Error> {
        let r = self.reconcile(renames, scopes, false);
        r.map_err(|e| self.ends.link.explain(e))
    }

    /// Reconciles `scopes` comparing content by digest, whatever `--checksum` says: the
    /// repair of what a verify found (same size and mtime, other bytes).
    ///
    /// # Errors
    /// As [`Session::sync_all`].
    pub fn repair(&mut self, scopes: &[(RelPath, Scope)]) -> Result<Outcome, Error> {
        let checksum = std::mem::replace(&mut self.opts.checksum, true);
        let out = self.reconcile(&[], scopes, false);
        self.opts.checksum = checksum;
        out.map_err(|e| self.ends.link.explain(e))
    }

    /// Ends the session cleanly; returns the protocol bytes it carried, both ways.
    ///
    /// # Errors
    /// The standby's answer was not `Closed`, or the connection failed first.
    pub fn close(mut self) -> Result<u64, Error> {
        if let Err(e) = close_session(&mut self.ch).map_err(peer_error) {
            return Err(self.ends.link.explain(e));
        }
        let bytes = self.wire_bytes();
        drop(self.beating.take());
        self.ends.conn().close("session complete");
        self.ends.link.closed_cleanly();
        Ok(bytes)
    }

    /// Tells the standby its tree is at a consistent point: every change of batch `seq` is
    /// durable there and this tree stood so at `at_ms` (DESIGN §10). Returns once the
    /// standby has recorded it, with whether it goes back to that point at a failover; `None`
    /// from a standby before protocol 7, which has none.
    ///
    /// # Errors
    /// The standby could not record it, or the connection failed.
    pub fn consistent(&mut self, seq: u64, at_ms: u64) -> Result<Option<bool>, Error> {
        if !self.caps.consistent {
            return Ok(None);
        }
        let held = hold_consistent(&mut self.ch, seq, at_ms).map_err(peer_error);
        held.map(Some).map_err(|e| self.ends.link.explain(e))
    }

    /// Lists `scopes` on both sides at once (hashing content when `checksum`): the primary's
    /// manifest and the standby's.
    ///
    /// # Errors
    /// A failure to read SRC, or of the connection.
    pub fn list(
        &mut self,
        scopes: &[(RelPath, Scope)],
        checksum: bool,
    ) -> Result<(Manifest, Manifest), Error> {
        let listed = self.list_sides(&normalize_scopes(scopes), checksum);
        let (local, remote, _) = listed.map_err(|e| self.ends.link.explain(e))?;
        Ok((local.manifest, remote))
    }

    /// [`Session::list`], with the leftover temporary files the standby's listing removed.
    pub(super) fn list_sides(
        &mut self,
        scopes: &[(RelPath, Scope)],
        checksum: bool,
    ) -> Result<(ScanOutcome, Manifest, u64), Error> {
        if let Some(g) = &self.gate {
            // A listing reads directories in no order a watcher follows.
            g.wait_all();
        }
        let scan_opts = self.scan_options(checksum);
        let root = &self.ends.root;
        super::listing::list_both(&mut self.ch, root, scopes, &scan_opts, self.ends.monitor)
    }

    /// How the primary's tree is read, hashing content when `checksum`.
    pub(super) fn scan_options(&self, checksum: bool) -> ScanOptions {
        ScanOptions {
            checksum,
            hash_rate: self.opts.hash_rate,
            ..self.scan_opts.clone()
        }
    }

    /// How plans are made in this session.
    pub(super) fn plan_options(&self) -> PlanOptions {
        PlanOptions {
            checksum: self.opts.checksum,
            delete: self.opts.delete,
            owners: self.owners,
        }
    }

    /// The mass-delete guard the next plan is held to.
    pub(super) fn delete_guard(&self) -> DeleteGuard {
        let limits = guard::Limits {
            force: self.opts.force,
            max_delete_percent: self.opts.max_delete_percent,
            on_mass_delete: self.opts.on_mass_delete,
            absences: self.absences,
        };
        DeleteGuard::new(self.ends.root.path().display().to_string(), limits)
    }

    /// Applies `renames` on the standby (not in a dry run); returns how many were made.
    fn rename(&mut self, renames: &[(RelPath, RelPath)]) -> Result<u64, Error> {
        if renames.is_empty() || self.opts.dry_run {
            return Ok(0);
        }
        let empty = Manifest::default();
        let ex = Exec::new(&self.ends, Some(&empty), Summary::default());
        ex.control_batch(&mut self.ch, ex.renames(renames), 1)?;
        Ok(ex.into_summary().renamed)
    }

    /// Reconciles `scopes` (`full`: the whole tree) after applying `renames`. Whole
    /// subtrees are walked, not listed, when the standby can: memory stays flat however
    /// large they are. Single entries are listed (a batch's worth, at once).
    fn reconcile(
        &mut self,
        renames: &[(RelPath, RelPath)],
        scopes: &[(RelPath, Scope)],
        full: bool,
    ) -> Result<Outcome, Error> {
        let started = Instant::now();
        let wire_before = self.wire_bytes();
        let renamed = self.rename(renames)?;
        let normal = normalize_scopes(scopes);
        let whole = normal == [(RelPath::root(), Scope::Tree)];
        if (whole && self.caps.walk)
            || (self.caps.walk_scopes && normal.iter().any(|(_, s)| *s == Scope::Tree))
        {
            return self.reconcile_streamed(Scopes::new(&normal), renamed);
        }
        self.reconcile_listed(Listed {
            scopes,
            full,
            renamed,
            started,
            wire_before,
        })
    }
}

/// `Consistent` on the control stream, then wait for the standby to hold it.
fn hold_consistent(ch: &mut Channel, seq: u64, at_ms: u64) -> Result<bool, ProtocolError> {
    ch.send(&Message::Consistent { seq, at_ms })?;
    ch.flush()?;
    loop {
        match ch.recv()? {
            Message::ConsistentHeld { seq: s, kept } if s == seq => return Ok(kept),
            Message::Ack { .. } => {}
            other => return Err(ProtocolError::unexpected(&other, "ConsistentHeld")),
        }
    }
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

/// A listed reconcile to run.
pub(super) struct Listed<'a> {
    pub scopes: &'a [(RelPath, Scope)],
    /// It covers the whole tree.
    pub full: bool,
    /// Renames applied just before, for the summary.
    pub renamed: u64,
    /// When it started (the renames included), and the bytes carried by then.
    pub started: Instant,
    pub wire_before: u64,
}
