//! The acknowledgements a plan's operations wait for, and what each one settles. The
//! [`AckBook`] does no I/O: the streams record in it what they send and what the standby
//! answers, and act on what it tells them (count, report, send again).

use crate::error::{OpError, ProtocolError};
use crate::model::path::RelPath;
use crate::model::summary::{EntryError, Summary};
use std::collections::HashMap;

/// What an operation in flight was, to account for its acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Op {
    Transfer {
        bytes: u64,
    },
    /// The sender gave the file up after announcing it (it changed, or could not be read).
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

/// One exchange whose operations are acknowledged together: a lane, a large file's stream,
/// a batch on the control stream. An acknowledgement counts only on the exchange that
/// sent its operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Exchange(u64);

/// An operation acknowledged: what it was and what the standby said of it.
#[derive(Debug)]
pub(super) struct Settled {
    pub path: RelPath,
    pub op: Op,
    pub error: Option<OpError>,
}

impl Settled {
    /// Whether sending the file again, whole, may succeed: it changed while read, or the
    /// standby could not make it durable or check its delta. A full disk is not retried:
    /// the change waits for space.
    pub(super) fn wants_resend(&self) -> bool {
        match (&self.op, &self.error) {
            (Op::Abandoned { retry, .. }, _) => *retry,
            (Op::Transfer { .. }, Some(e)) => e.retry && !e.no_space,
            _ => false,
        }
    }

    /// The same outcome, final: nothing in it asks for another try.
    pub(super) fn last_try(self) -> Settled {
        let op = match self.op {
            Op::Abandoned { reason, .. } => Op::Abandoned {
                reason,
                retry: false,
            },
            other => other,
        };
        Settled {
            op,
            error: self.error.map(|e| OpError { retry: false, ..e }),
            ..self
        }
    }
}

/// What accounting for an acknowledgement leaves to the caller.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Counted in the summary; `file_bytes` for a file now durable on the standby.
    Done { file_bytes: Option<u64> },
    /// Queued to be sent again, whole (see [`AckBook::take_retries`]).
    Resend,
    /// Recorded as the entry's error.
    Failed(EntryError),
    /// A rename the standby did not apply, and why: the rescan after it sends what is
    /// needed, so it is no error.
    RenameSkipped { to: RelPath, reason: String },
}

#[derive(Debug, Default)]
struct ExchangeState {
    outstanding: usize,
    /// No acknowledgement will come any more (its stream ended or broke).
    ended: bool,
}

/// The book of one plan's operations: those sent and not yet acknowledged, exchange by
/// exchange, and the summary their outcomes add up to, with the files to send again.
#[derive(Debug, Default)]
pub(super) struct AckBook {
    awaited: HashMap<u64, (Exchange, RelPath, Op)>,
    exchanges: HashMap<Exchange, ExchangeState>,
    next_exchange: u64,
    summary: Summary,
    retries: Vec<RelPath>,
}

impl AckBook {
    /// A book whose outcomes add to `summary`.
    pub(super) fn new(summary: Summary) -> AckBook {
        AckBook {
            summary,
            ..AckBook::default()
        }
    }

    /// Starts an exchange; [`AckBook::close`] it once its stream is done.
    pub(super) fn open(&mut self) -> Exchange {
        let x = Exchange(self.next_exchange);
        self.next_exchange += 1;
        self.exchanges.insert(x, ExchangeState::default());
        x
    }

    /// Records that operation `id` on `path` was sent on `x` and awaits its
    /// acknowledgement.
    pub(super) fn expect(&mut self, x: Exchange, id: u64, path: RelPath, op: Op) {
        if let Some((old, ..)) = self.awaited.insert(id, (x, path, op)) {
            self.count(old, |n| n - 1);
        }
        self.count(x, |n| n + 1);
    }

    /// The file of operation `id` was given up after it was announced: its
    /// acknowledgement settles it as abandoned, for `reason`.
    pub(super) fn abandon(&mut self, id: u64, reason: String, retry: bool) {
        if let Some((_, _, op)) = self.awaited.get_mut(&id) {
            *op = Op::Abandoned { reason, retry };
        }
    }

    /// Operations sent on `x` and not yet acknowledged.
    pub(super) fn outstanding(&self, x: Exchange) -> usize {
        self.exchanges.get(&x).map_or(0, |s| s.outstanding)
    }

    /// Whether a sender on `x` must wait before sending more: `limit` operations are
    /// outstanding and acknowledgements may still come.
    pub(super) fn must_wait(&self, x: Exchange, limit: usize) -> bool {
        self.exchanges
            .get(&x)
            .is_some_and(|s| !s.ended && s.outstanding >= limit)
    }

    /// No more acknowledgements will come on `x`: nobody waits for them.
    pub(super) fn end(&mut self, x: Exchange) {
        if let Some(s) = self.exchanges.get_mut(&x) {
            s.ended = true;
        }
    }

    /// Forgets `x` and whatever it left unacknowledged (a stream that ended without
    /// acknowledging them never will).
    pub(super) fn close(&mut self, x: Exchange) {
        if self.exchanges.remove(&x).is_some_and(|s| s.outstanding > 0) {
            self.awaited.retain(|_, (of, ..)| *of != x);
        }
    }

    /// The acknowledgement of `id` on `x`, with the standby's `error`.
    ///
    /// # Errors
    /// [`ProtocolError::Invalid`] when `x` awaits no operation `id`.
    pub(super) fn ack(
        &mut self,
        x: Exchange,
        id: u64,
        error: Option<OpError>,
    ) -> Result<Settled, ProtocolError> {
        match self.awaited.remove(&id) {
            Some((of, path, op)) if of == x => {
                self.count(x, |n| n - 1);
                Ok(Settled { path, op, error })
            }
            other => {
                if let Some(put_back) = other {
                    self.awaited.insert(id, put_back);
                }
                Err(ProtocolError::Invalid(format!(
                    "ack for unknown operation {id}"
                )))
            }
        }
    }

    /// Accounts for an acknowledged operation.
    pub(super) fn settle(&mut self, s: Settled) -> Verdict {
        if s.wants_resend() {
            self.retries.push(s.path);
            return Verdict::Resend;
        }
        let Settled { path, op, error } = s;
        let failed = match (op, error) {
            (Op::Abandoned { reason, .. }, _) => reason,
            (Op::Rename, Some(e)) => {
                return Verdict::RenameSkipped {
                    to: path,
                    reason: e.message,
                };
            }
            (op, Some(e)) => {
                let mut failed =
                    EntryError::new(&path, format!("{}: {}", failure_of(&op), e.message));
                // Kept by kind: a full standby is waited for, not retried as a failure.
                failed.no_space = e.no_space;
                self.summary.no_space += u64::from(e.no_space);
                self.summary.errors.push(failed.clone());
                return Verdict::Failed(failed);
            }
            (op, None) => {
                return Verdict::Done {
                    file_bytes: self.done(op),
                };
            }
        };
        Verdict::Failed(self.fail(&path, failed))
    }

    /// Counts an operation the standby carried out; the bytes of a file.
    fn done(&mut self, op: Op) -> Option<u64> {
        let t = &mut self.summary;
        match op {
            Op::Transfer { bytes } => {
                t.files_transferred += 1;
                return Some(bytes);
            }
            Op::Mkdir => t.dirs_created += 1,
            Op::Remove { entries } => t.files_deleted += entries,
            Op::Meta => t.metadata_updated += 1,
            Op::Symlink => t.symlinks_written += 1,
            Op::Link => t.hard_links_made += 1,
            Op::Rename => t.renamed += 1,
            Op::Abandoned { .. } => {}
        }
        None
    }

    /// Records an error with the entry at `path`.
    pub(super) fn fail(&mut self, path: &RelPath, message: String) -> EntryError {
        let e = EntryError::new(path, message);
        self.summary.errors.push(e.clone());
        e
    }

    /// Counts a file gone (or of another type) since the scan.
    pub(super) fn vanished(&mut self) {
        self.summary.vanished += 1;
    }

    /// Counts a large file sent as it was while written (see [`Summary::torn`]).
    pub(super) fn torn(&mut self) {
        self.summary.torn += 1;
    }

    /// The files to send again, whole, since the last call.
    pub(super) fn take_retries(&mut self) -> Vec<RelPath> {
        std::mem::take(&mut self.retries)
    }

    /// The summary, for what is counted outside acknowledgements (bytes read and sent).
    pub(super) fn summary_mut(&mut self) -> &mut Summary {
        &mut self.summary
    }

    pub(super) fn into_summary(self) -> Summary {
        self.summary
    }

    fn count(&mut self, x: Exchange, f: impl FnOnce(usize) -> usize) {
        if let Some(s) = self.exchanges.get_mut(&x) {
            s.outstanding = f(s.outstanding);
        }
    }
}

/// What the summary says an operation of this kind could not do.
fn failure_of(op: &Op) -> &'static str {
    match op {
        Op::Transfer { .. } | Op::Abandoned { .. } => "cannot write on the standby",
        Op::Mkdir => "cannot create directory on the standby",
        Op::Remove { .. } => "cannot remove on the standby",
        Op::Meta => "cannot set attributes on the standby",
        Op::Symlink => "cannot write symlink on the standby",
        Op::Link => "cannot make hard link on the standby",
        Op::Rename => "cannot rename on the standby",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn error(retry: bool, no_space: bool) -> Option<OpError> {
        Some(OpError {
            message: "disk trouble".into(),
            retry,
            no_space,
        })
    }

    #[test]
    fn acknowledged_operations_are_counted_by_kind() {
        let mut b = AckBook::new(Summary::default());
        let x = b.open();
        b.expect(x, 1, p("f"), Op::Transfer { bytes: 10 });
        b.expect(x, 2, p("d"), Op::Mkdir);
        b.expect(x, 3, p("old"), Op::Remove { entries: 4 });
        b.expect(x, 4, p("l"), Op::Symlink);
        assert_eq!(b.outstanding(x), 4);
        let mut verdicts = Vec::new();
        for id in [2, 1, 4, 3] {
            let s = b.ack(x, id, None).unwrap();
            verdicts.push(b.settle(s));
        }
        assert_eq!(
            verdicts[1],
            Verdict::Done {
                file_bytes: Some(10)
            }
        );
        assert_eq!(verdicts[0], Verdict::Done { file_bytes: None });
        assert_eq!(b.outstanding(x), 0);
        let s = b.into_summary();
        assert_eq!(
            (s.files_transferred, s.dirs_created, s.files_deleted),
            (1, 1, 4)
        );
        assert_eq!(s.symlinks_written, 1);
        assert!(s.errors.is_empty());
    }

    #[test]
    fn a_file_not_made_durable_is_queued_to_be_sent_again() {
        let mut b = AckBook::new(Summary::default());
        let x = b.open();
        b.expect(x, 7, p("f"), Op::Transfer { bytes: 1 });
        let s = b.ack(x, 7, error(true, false)).unwrap();
        assert!(s.wants_resend());
        assert_eq!(b.settle(s), Verdict::Resend);
        assert_eq!(b.take_retries(), vec![p("f")]);
        assert!(b.take_retries().is_empty());
        // Nothing is reported while another try is coming.
        assert!(b.into_summary().errors.is_empty());
    }

    #[test]
    fn a_full_disk_is_reported_not_retried() {
        let mut b = AckBook::new(Summary::default());
        let x = b.open();
        b.expect(x, 1, p("f"), Op::Transfer { bytes: 1 });
        let s = b.ack(x, 1, error(true, true)).unwrap();
        assert!(!s.wants_resend());
        let Verdict::Failed(e) = b.settle(s) else {
            panic!("a full disk is an error")
        };
        assert_eq!(e.error, "cannot write on the standby: disk trouble");
        assert!(b.take_retries().is_empty());
        let s = b.into_summary();
        assert_eq!((s.no_space, s.errors.len()), (1, 1));
        // Known by its kind, whatever the message says ("disk trouble" names no space).
        assert!(e.no_space && s.errors[0].no_space);
    }

    #[test]
    fn an_abandoned_file_is_retried_until_its_last_try() {
        let mut b = AckBook::new(Summary::default());
        let x = b.open();
        b.expect(x, 1, p("f"), Op::Transfer { bytes: 1 });
        b.abandon(1, "changed while being read".into(), true);
        let s = b.ack(x, 1, None).unwrap();
        assert!(s.wants_resend());
        // The last try reports it instead.
        let last = s.last_try();
        assert!(!last.wants_resend());
        let Verdict::Failed(e) = b.settle(last) else {
            panic!("abandoned for good is an error")
        };
        assert_eq!(e.error, "changed while being read");
        assert_eq!(e.rel, p("f"));
    }

    #[test]
    fn an_ack_counts_only_on_the_exchange_that_sent_it() {
        let mut b = AckBook::new(Summary::default());
        let (x, y) = (b.open(), b.open());
        b.expect(x, 1, p("f"), Op::Meta);
        assert!(b.ack(y, 1, None).is_err());
        assert!(b.ack(x, 2, None).is_err());
        // A refused ack leaves the operation awaited where it was.
        assert_eq!(b.outstanding(x), 1);
        assert!(b.ack(x, 1, None).is_ok());
        assert!(b.ack(x, 1, None).is_err(), "acknowledged twice");
    }

    #[test]
    fn a_full_window_waits_until_acks_come_or_cannot() {
        let mut b = AckBook::new(Summary::default());
        let x = b.open();
        for id in 0..3 {
            b.expect(x, id, p("f"), Op::Meta);
        }
        assert!(b.must_wait(x, 3));
        assert!(!b.must_wait(x, 4));
        b.ack(x, 0, None).unwrap();
        assert!(!b.must_wait(x, 3));
        b.expect(x, 3, p("g"), Op::Meta);
        assert!(b.must_wait(x, 3));
        b.end(x);
        assert!(!b.must_wait(x, 3), "no ack will come on an ended exchange");
        b.close(x);
        assert_eq!(b.outstanding(x), 0);
        assert!(b.ack(x, 1, None).is_err(), "forgotten with its exchange");
    }

    #[test]
    fn failures_say_what_could_not_be_done_and_a_failed_rename_is_no_error() {
        let mut b = AckBook::new(Summary::default());
        let x = b.open();
        b.expect(x, 1, p("d"), Op::Mkdir);
        b.expect(x, 2, p("to"), Op::Rename);
        let s = b.ack(x, 1, error(false, false)).unwrap();
        let Verdict::Failed(e) = b.settle(s) else {
            panic!("a failed mkdir is an error")
        };
        assert_eq!(
            e.error,
            "cannot create directory on the standby: disk trouble"
        );
        let s = b.ack(x, 2, error(false, false)).unwrap();
        assert_eq!(
            b.settle(s),
            Verdict::RenameSkipped {
                to: p("to"),
                reason: "disk trouble".into()
            }
        );
        let s = b.into_summary();
        assert_eq!((s.errors.len(), s.renamed), (1, 0));
    }
}
