//! Carrying out a plan: tree operations on the control stream first, then content on many
//! streams at once (small files on a few lanes, each large file on a stream of its own),
//! then hard links, removals and directory attributes. Nothing waits on a round trip per
//! file: acknowledgements are read beside the sending and settled in one [`AckBook`].

use super::SyncOptions;
use super::acks::{AckBook, Exchange, Settled, Verdict};
use super::ends::{Ends, peer_error};
use crate::error::Error;
use crate::error::ProtocolError;
use crate::model::manifest::Manifest;
use crate::model::path::RelPath;
use crate::model::plan::{MetaFix, SymlinkOp};
use crate::model::plan::{Method, Plan, Transfer};
use crate::model::summary::Summary;
use crate::transport::Connection;
use crate::wire::channel::{Channel, Reader};
use crate::wire::protocol::Message;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Carries out plans on the streams of one session, and keeps their book.
pub(super) struct Exec<'a> {
    pub ends: &'a Ends<'a>,
    /// The standby's listing, to count what a removal takes; a streamed reconcile has
    /// none and counts removals itself.
    pub remote: Option<&'a Manifest>,
    book: Mutex<AckBook>,
    /// Told when acknowledgements arrive, or when an exchange will get no more.
    acked: Condvar,
}

impl<'a> Exec<'a> {
    /// An executor on `ends` whose outcomes add to `summary`.
    pub(super) fn new(ends: &'a Ends<'a>, remote: Option<&'a Manifest>, summary: Summary) -> Self {
        Exec {
            ends,
            remote,
            book: Mutex::new(AckBook::new(summary)),
            acked: Condvar::new(),
        }
    }

    pub(super) fn conn(&self) -> &'a dyn Connection {
        self.ends.conn()
    }

    /// A new operation id, unique in the session.
    pub(super) fn id(&self) -> u64 {
        self.ends.id()
    }

    pub(super) fn book(&self) -> MutexGuard<'_, AckBook> {
        self.book.lock().unwrap()
    }

    /// The summary of everything carried out.
    pub(super) fn into_summary(self) -> Summary {
        self.book.into_inner().unwrap().into_summary()
    }

    /// A file gone (or of another type) since the scan: a routine race on a live tree; the
    /// next look at the path sees its new state.
    pub(super) fn vanished(&self, path: &RelPath) {
        tracing::debug!("{path}: vanished or changed type since the scan; skipped");
        self.book().vanished();
    }

    /// A problem of ours with the entry at `path` (it cannot be read): reported, and the
    /// run goes on.
    pub(super) fn error(&self, path: &RelPath, msg: String) {
        tracing::warn!("{path}: {msg}");
        self.book().fail(path, msg);
    }

    /// Accounts for an acknowledged operation and tells whom it concerns.
    pub(super) fn account(&self, s: Settled) {
        let verdict = self.book().settle(s);
        match verdict {
            Verdict::Done {
                file_bytes: Some(bytes),
            } => self.ends.monitor.file_done(bytes),
            Verdict::Done { file_bytes: None } | Verdict::Resend => {}
            Verdict::Failed(e) => tracing::warn!("{}: {}", e.path, e.error),
            Verdict::RenameSkipped { to, reason } => {
                tracing::debug!("rename to {to} not applied ({reason}); rescanning")
            }
        }
    }

    /// Carries out `plan` whole, in its steps.
    pub(super) fn run(
        &self,
        plan: &Plan,
        ch: &mut Channel,
        opts: &SyncOptions,
    ) -> Result<(), Error> {
        self.prepare(plan, ch)?;
        self.transfer(plan, opts)?;
        self.link_and_remove(plan, ch)
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
        let failure = FirstFailure::new(self.conn());
        std::thread::scope(|s| {
            let per = items.len().div_ceil(lanes);
            for chunk in items.chunks(per.max(1)) {
                let failure = &failure;
                s.spawn(move || {
                    if let Err(e) = self.lane(chunk) {
                        failure.fail(e, "lane failed");
                    }
                });
            }
            for _ in 0..opts.big_streams.max(1).min(big.len()) {
                let (failure, big, next_big) = (&failure, &big, &next_big);
                s.spawn(move || {
                    while let Some(t) = big.get(next_big.fetch_add(1, Ordering::Relaxed)) {
                        if let Err(e) = self.big_file(t) {
                            failure.fail(e, "transfer failed");
                            break;
                        }
                    }
                });
            }
        });
        failure.result()?;
        tracing::debug!("{} ms: transfers done", t.elapsed().as_millis());
        self.retry()
    }

    /// Files the standby could not make durable, or that changed while read: once more, whole.
    pub(super) fn retry(&self) -> Result<(), Error> {
        let retries = self.book().take_retries();
        for path in retries {
            self.whole_stream(&path, false)?;
        }
        Ok(())
    }

    /// Runs `send`, which sends operations of exchange `x`, while another thread reads the
    /// acknowledgements they cause from `r`, so neither side ever waits on the other's
    /// buffers. The acknowledgements end at `Flushed { seq }`, or with the stream when
    /// `seq` is 0.
    pub(super) fn pipelined(
        &self,
        r: &mut Reader,
        x: Exchange,
        seq: u64,
        send: impl FnOnce() -> Result<(), ProtocolError>,
    ) -> Result<(), Error> {
        let done = std::thread::scope(|s| {
            let acks = s.spawn(|| {
                let read = self.read_acks(r, x, seq);
                self.book().end(x);
                self.acked.notify_all();
                read
            });
            let sent = send();
            if sent.is_err() {
                // The ack reader would wait for answers to what was never sent.
                self.conn().close("send failed");
            }
            let acked = acks.join().expect("ack reader panicked");
            // The ack reader's error explains a broken send best (the peer's reason).
            acked?;
            sent
        });
        self.book().close(x);
        done.map_err(peer_error)
    }

    /// Waits until fewer than `limit` operations of `x` are unacknowledged, or none will
    /// be acknowledged any more.
    pub(super) fn wait_below(&self, x: Exchange, limit: usize) {
        let mut book = self.book();
        while book.must_wait(x, limit) {
            book = self
                .acked
                .wait_timeout(book, Duration::from_millis(100))
                .unwrap()
                .0;
        }
    }

    /// Reads acknowledgements of `x` until `Flushed { seq }` (or the end of the stream when
    /// `seq` is 0, with `Flushed { seq: 0 }` along the way), accounting for each.
    fn read_acks(&self, r: &mut Reader, x: Exchange, seq: u64) -> Result<(), ProtocolError> {
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
                    let settled = self.book().ack(x, id, error);
                    self.acked.notify_all();
                    self.account(settled?);
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
}

/// The first failure of several threads working for one plan: it is the one reported, and
/// it closes the connection, so the others stop at their next send or read.
pub(super) struct FirstFailure<'c> {
    conn: &'c dyn Connection,
    first: Mutex<Option<Error>>,
}

impl<'c> FirstFailure<'c> {
    pub(super) fn new(conn: &'c dyn Connection) -> Self {
        FirstFailure {
            conn,
            first: Mutex::new(None),
        }
    }

    /// Records `e` if it is the first, and closes the connection for `why`.
    pub(super) fn fail(&self, e: Error, why: &str) {
        let mut first = self.first.lock().unwrap();
        if first.is_none() {
            *first = Some(e);
        }
        self.conn.close(why);
    }

    /// The first failure, if any.
    pub(super) fn result(self) -> Result<(), Error> {
        match self.first.into_inner().unwrap() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// One item a lane carries.
#[derive(Clone, Copy)]
pub(super) enum LaneItem<'p> {
    File(&'p Transfer),
    Symlink(&'p SymlinkOp),
    Meta(&'p MetaFix),
}
