//! Both trees walked together, one directory at a time in the same order: the primary's
//! walk here, the standby's arriving on a stream of its own and checked as it comes. The
//! caller gets each directory once, from either side or both.

use super::ends::peer_error;
use super::listing::check_special;
use super::session::Session;
use crate::error::Error;
use crate::error::ProtocolError;
use crate::model::listing::{Unit, walk_cmp};
use crate::model::manifest::Entry;
use crate::model::merge::{Side, next_side};
use crate::model::path::RelPath;
use crate::model::progress::Monitor;
use crate::transport::Connection;
use crate::tree::fsroot::Root;
use crate::tree::scan::ScanOptions;
use crate::tree::walk::{Gate, Scopes, Walker};
use crate::wire::channel::Channel;
use crate::wire::protocol::Message;
use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

/// Entries the local walk reads ahead of the caller.
const WALK_AHEAD: usize = 2048;

/// One item of the standby's walk.
enum Remote {
    Unit(Box<Unit>),
    End { temps_removed: u64 },
}

impl Session<'_> {
    /// Walks both trees together (hashing content when `checksum`), calling `each` with
    /// every directory in walk order: the primary's unit, the standby's, or both.
    ///
    /// # Errors
    /// `each`'s, either walk's, or why the connection failed.
    pub fn walk_both(
        &mut self,
        checksum: bool,
        each: impl FnMut(Option<Unit>, Option<Unit>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let walk = Walk {
            conn: self.ends.conn(),
            root: &self.ends.root,
            opts: self.scan_options(checksum),
            scopes: Scopes::all(),
            gate: self.gate.clone(),
            monitor: self.ends.monitor,
        };
        walk_both(walk, each)
            .map(drop)
            .map_err(|e| self.ends.link.explain(e))
    }
}

/// Walks the primary's tree and, on a stream of its own, the standby's, together: calls
/// `each` with every directory in walk order, the primary's unit, the standby's, or both.
/// Returns the leftover temporary files the standby's walk removed.
///
/// # Errors
/// `each`'s, the walks', or the connection's; after any but a guard's refusal the
/// connection is closed, as the standby may still be sending its walk.
pub(super) fn walk_both(
    w: Walk<'_>,
    mut each: impl FnMut(Option<Unit>, Option<Unit>) -> Result<(), Error>,
) -> Result<u64, Error> {
    let Walk {
        conn,
        root,
        opts,
        scopes,
        gate,
        monitor,
    } = w;
    let mut walk = Channel::open(conn)?;
    // The whole tree is asked for as version 3 peers know it.
    walk.send(&if scopes.is_all() {
        Message::Walk {
            checksum: opts.checksum,
            hash_rate: opts.hash_rate,
        }
    } else {
        Message::WalkScopes {
            scopes: scopes.as_slice().to_vec(),
            checksum: opts.checksum,
            hash_rate: opts.hash_rate,
        }
    })?;
    walk.flush()?;
    let done = std::thread::scope(|s| {
        let (ltx, lrx) = sync_channel::<io::Result<Vec<Unit>>>(2);
        let (rtx, rrx) = sync_channel::<Result<Remote, ProtocolError>>(8);
        let check = WalkCheck {
            scopes: scopes.clone(),
            ..WalkCheck::default()
        };
        s.spawn(move || walk_local(Walker::scoped(root, opts, scopes, gate), ltx, monitor));
        let walk = &mut walk;
        s.spawn(move || read_remote(walk, check, rtx));
        let mut local = Queue::Local(lrx, VecDeque::new(), false);
        let mut remote = Queue::Remote(rrx, None, None);
        let mut run = || -> Result<u64, Error> {
            loop {
                let (l, r) = (local.peek()?, remote.peek()?);
                let Some(side) = next_side(l, r) else { break };
                let lu = matches!(side, Side::Local | Side::Both).then(|| local.take());
                let ru = matches!(side, Side::Remote | Side::Both).then(|| remote.take());
                each(lu.flatten(), ru.flatten())?;
            }
            Ok(remote.temps_removed())
        };
        let done = run();
        if done
            .as_ref()
            .is_err_and(|e| !matches!(e, Error::SourceEmpty(_)))
        {
            // The walks' threads stop at their next send; the standby's may be waiting
            // to read: the session is over.
            conn.close("reconcile failed");
        }
        done
    });
    let _ = walk.finish();
    done
}

/// Where the planner takes units from: the local walk's batches, or the standby's stream.
enum Queue {
    Local(Receiver<io::Result<Vec<Unit>>>, VecDeque<Unit>, bool),
    /// The standby's walk, its next unit, and the temps it removed once it has ended.
    Remote(
        Receiver<Result<Remote, ProtocolError>>,
        Option<Box<Unit>>,
        Option<u64>,
    ),
}

impl Queue {
    fn peek(&mut self) -> Result<Option<&RelPath>, Error> {
        match self {
            Queue::Local(rx, q, done) => {
                while q.is_empty() && !*done {
                    match rx.recv() {
                        Ok(Ok(batch)) => q.extend(batch),
                        Ok(Err(e)) => return Err(Error::io("cannot read SRC", e)),
                        Err(_) => *done = true,
                    }
                }
                Ok(q.front().map(|u| &u.dir.path))
            }
            Queue::Remote(rx, head, end) => {
                if head.is_none() && end.is_none() {
                    match rx.recv() {
                        Ok(Ok(Remote::Unit(u))) => *head = Some(u),
                        Ok(Ok(Remote::End { temps_removed })) => *end = Some(temps_removed),
                        Ok(Err(e)) => return Err(peer_error(e)),
                        Err(_) => {
                            return Err(Error::Protocol(ProtocolError::Invalid(
                                "the standby's walk ended early".into(),
                            )));
                        }
                    }
                }
                Ok(head.as_ref().map(|u| &u.dir.path))
            }
        }
    }

    fn take(&mut self) -> Option<Unit> {
        match self {
            Queue::Local(_, q, _) => q.pop_front(),
            Queue::Remote(_, head, _) => head.take().map(|u| *u),
        }
    }

    fn temps_removed(&self) -> u64 {
        match self {
            Queue::Remote(_, _, end) => end.unwrap_or(0),
            Queue::Local(..) => 0,
        }
    }
}

/// Walks the primary's tree into `tx`, a batch at a time.
fn walk_local(mut w: Walker<'_>, tx: SyncSender<io::Result<Vec<Unit>>>, monitor: &dyn Monitor) {
    let mut seen = 0u64;
    loop {
        let batch = w.next_batch(WALK_AHEAD);
        let end = matches!(batch, Ok(None) | Err(_));
        let item = match batch {
            Ok(Some(b)) => {
                seen += b.iter().map(|u| u.entries.len() as u64).sum::<u64>();
                monitor.scanned(seen);
                Ok(b)
            }
            Ok(None) => break,
            Err(e) => Err(e),
        };
        if tx.send(item).is_err() || end {
            break;
        }
    }
}

/// Reads the standby's walk into `tx`, checking it is the walk it claims to be: units in
/// walk order, each holding only its own children, sorted, the count as announced.
fn read_remote(
    walk: &mut Channel,
    mut check: WalkCheck,
    tx: SyncSender<Result<Remote, ProtocolError>>,
) {
    loop {
        let item = match walk.r.recv().and_then(|m| check.message(m)) {
            Ok(None) => continue,
            Ok(Some(r)) => Ok(r),
            Err(e) => Err(e),
        };
        let end = matches!(item, Ok(Remote::End { .. }) | Err(_));
        if tx.send(item).is_err() || end {
            return;
        }
    }
}

/// What both sides walk, and how.
pub(super) struct Walk<'a> {
    pub conn: &'a dyn Connection,
    pub root: &'a Root,
    pub opts: ScanOptions,
    pub scopes: Scopes,
    /// What the primary's walk waits on before each directory (a watcher setting up).
    pub gate: Option<Arc<dyn Gate>>,
    pub monitor: &'a dyn Monitor,
}

/// The checks a standby's walk must pass, message by message.
struct WalkCheck {
    /// What the walk may cover: a standby's entry outside it would be taken for one the
    /// primary lacks, and deleted.
    scopes: Scopes,
    /// The directory being received (a large one comes in parts).
    current: Option<Unit>,
    last_dir: Option<RelPath>,
    count: u64,
    /// The attribute digests for the next `Dir`.
    sums: Option<Vec<(u32, crate::model::xattrs::Sum)>>,
    /// The shapes for the next `Dir`.
    shapes: Option<Vec<(u32, crate::model::manifest::Shape)>>,
    /// Special files for the next `Dir`.
    specials: Vec<crate::model::manifest::Special>,
}

impl Default for WalkCheck {
    fn default() -> WalkCheck {
        WalkCheck {
            scopes: Scopes::all(),
            current: None,
            last_dir: None,
            count: 0,
            sums: None,
            shapes: None,
            specials: Vec::new(),
        }
    }
}

impl WalkCheck {
    /// Takes one message: a finished unit, the end, or nothing yet.
    fn message(&mut self, m: Message) -> Result<Option<Remote>, ProtocolError> {
        match m {
            Message::XattrSums { sums } if self.sums.is_none() => {
                self.sums = Some(sums);
                Ok(None)
            }
            Message::Shapes { shapes } if self.shapes.is_none() => {
                self.shapes = Some(shapes);
                Ok(None)
            }
            Message::Specials { specials } if self.specials.is_empty() => {
                self.specials = specials;
                Ok(None)
            }
            Message::Dir {
                mut dir,
                mut entries,
                errors,
                more,
            } => {
                if let Some(s) = self.sums.take() {
                    let all = std::iter::once(&mut dir).chain(entries.iter_mut());
                    crate::wire::protocol::put_xattr_sums(s, all)?;
                }
                if let Some(s) = self.shapes.take() {
                    let all = std::iter::once(&mut dir).chain(entries.iter_mut());
                    crate::wire::protocol::put_shapes(s, all)?;
                }
                let mut unit = self.unit_of(dir)?;
                self.add_children(&mut unit, entries)?;
                unit.errors.extend(errors);
                if more {
                    self.current = Some(unit);
                    Ok(None)
                } else {
                    Ok(Some(Remote::Unit(Box::new(unit))))
                }
            }
            Message::WalkEnd {
                count,
                temps_removed,
            } => {
                if let Some(u) = &self.current {
                    return bad(format!("left {} unfinished", u.dir.path));
                }
                if count != self.count {
                    return bad(format!("announced {count} entries and sent {}", self.count));
                }
                Ok(Some(Remote::End { temps_removed }))
            }
            other => Err(ProtocolError::unexpected(&other, "Dir")),
        }
    }

    /// The unit `dir` continues (a large directory comes in parts), or the new unit it
    /// starts, in walk order and within the scopes.
    fn unit_of(&mut self, dir: Entry) -> Result<Unit, ProtocolError> {
        if !dir.is_dir() {
            return bad(format!("lists {} as a directory", dir.path));
        }
        match self.current.take() {
            Some(u) if u.dir.path == dir.path => return Ok(u),
            Some(u) => return bad(format!("left {} unfinished", u.dir.path)),
            None => {}
        }
        let in_order = match &self.last_dir {
            None => dir.path.is_root(),
            Some(last) => walk_cmp(last, &dir.path).is_lt(),
        };
        if !in_order {
            return bad(format!("is out of order at {}", dir.path));
        }
        if !dir.path.is_root() && !self.scopes.enters(&dir.path) {
            return bad(format!("strays outside its scope into {}", dir.path));
        }
        self.last_dir = Some(dir.path.clone());
        self.count += 1;
        Ok(Unit {
            dir,
            entries: Vec::new(),
            errors: Vec::new(),
            specials: Vec::new(),
            skipped: Vec::new(),
        })
    }

    /// Adds to `unit` its `entries`, sorted and its own, and the special files announced
    /// for it.
    fn add_children(&mut self, unit: &mut Unit, entries: Vec<Entry>) -> Result<(), ProtocolError> {
        for e in entries {
            if e.path.is_root() || e.path.split().0 != unit.dir.path {
                return bad(format!("puts {} in {}", e.path, unit.dir.path));
            }
            if unit.entries.last().is_some_and(|l| l.path >= e.path) {
                return bad(format!("is out of order at {}", e.path));
            }
            if !self.scopes.holds(&e.path) {
                return bad(format!("strays outside its scope to {}", e.path));
            }
            self.count += 1;
            unit.entries.push(e);
        }
        for sp in std::mem::take(&mut self.specials) {
            check_special(&sp, Some(&unit.dir.path))?;
            if !self.scopes.holds(&sp.path) {
                return bad(format!("strays outside its scope to {}", sp.path));
            }
            unit.specials.push(sp);
        }
        Ok(())
    }
}

/// A standby's walk that is not what it claims to be, and why.
fn bad<T>(why: String) -> Result<T, ProtocolError> {
    Err(ProtocolError::Invalid(format!("the standby's walk {why}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::manifest::Scope;
    use crate::model::manifest::testing::{dir, file};

    fn dir_msg(d: &str, entries: Vec<crate::model::manifest::Entry>) -> Message {
        Message::Dir {
            dir: dir(d),
            entries,
            errors: vec![],
            more: false,
        }
    }

    #[test]
    fn a_standby_walk_outside_its_scope_is_refused() {
        let scoped = || WalkCheck {
            scopes: Scopes::new(&[(RelPath::new("big").unwrap(), Scope::Tree)]),
            ..WalkCheck::default()
        };
        let mut c = scoped();
        assert!(c.message(dir_msg("", vec![dir("big")])).is_ok());
        assert!(c.message(dir_msg("big", vec![file("big/x", 1)])).is_ok());
        // A name beside the scope would look like one the primary lacks, and be deleted.
        let e = scoped()
            .message(dir_msg("", vec![dir("big"), dir("keep")]))
            .err()
            .unwrap();
        assert!(e.to_string().contains("outside its scope to keep"), "{e}");
        let mut c = scoped();
        c.message(dir_msg("", vec![dir("big")])).unwrap();
        let e = c.message(dir_msg("keep", vec![])).err().unwrap();
        assert!(e.to_string().contains("outside its scope into keep"), "{e}");
    }
}
