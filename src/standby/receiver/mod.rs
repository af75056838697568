//! The standby side of a session. Everything here acts on names that were validated when
//! they were decoded ([`RelPath`](crate::model::path::RelPath)), through the root's directory
//! handle, never following a symlink; a failure with one entry is answered with an error
//! `Ack`, a protocol violation ends the connection.
//!
//! - this module: the session's opening (admission, agreed options) and its streams;
//! - `session`: what all streams of a session share;
//! - `ops`: the operation loop each stream runs; `tree`: the operations on names and
//!   attributes; `listing`: listings and walks of the standby's tree;
//! - `stage`: entries made as temps and staged for the commit, and the sink files are
//!   received into; `sparse`: writing a temp that keeps its holes;
//! - `small`, `whole`, `delta`: the files received (inline small files, whole files with
//!   or without holes, deltas against the standby's version).

mod delta;
mod listing;
mod ops;
mod session;
mod small;
mod sparse;
mod stage;
#[cfg(test)]
mod testing;
mod tree;
mod whole;

use crate::error::Error;
use crate::error::{ErrorCode, ProtocolError};
use crate::model::filter::Filter;
use crate::standby::{Admission, Cut, Peer, SessionPulse, SessionReport, Standby};
use crate::transport::{Connection, Stream};
use crate::wire::channel::Channel;
use crate::wire::handshake::{self, Hello, NotAccepted, Refusal, Welcome};
use crate::wire::heartbeat;
use crate::wire::protocol::{Caps, Message, SessionMode};
use session::StandbySession;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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
    let (admission, session) = open(&conn, &mut ch, standby, peer)?;
    let pulse = SessionPulse {
        standby,
        entry: admission.entry.clone(),
    };
    let fatal = run(&conn, ch, &session, &pulse);
    let report = session.entry.stats.report();
    admission.finish(fatal.as_ref().map(|e| e.to_string()));
    match fatal {
        Some(e) => Err(e.into()),
        None => Ok(report),
    }
}

/// Opens the session on the control stream `ch` ([`handshake::accept`]): admission by the
/// standby (a refusal is told to the primary, then the connection is closed), and the
/// extended attributes both sides keep.
fn open<'s>(
    conn: &Arc<dyn Connection>,
    ch: &mut Channel,
    standby: &'s Standby,
    peer: Peer,
) -> Result<(Admission<'s>, StandbySession<'s>), Error> {
    let admit = |_caps: Caps, hello: &Hello| {
        let filter = Filter::new(&hello.excludes).map_err(|e| Refusal {
            code: ErrorCode::Refused,
            message: e.to_string(),
        })?;
        let read_only = hello.mode == SessionMode::ReadOnly;
        let cut: Cut = {
            let conn = conn.clone();
            Box::new(move |why: &str| conn.fence(why))
        };
        let admission = standby
            .admit(peer, (!read_only).then_some(hello.epoch), cut)
            .map_err(|r| Refusal {
                code: r.code,
                message: r.message,
            })?;
        let welcome = Welcome {
            owners: standby.owners(),
            position: standby.state().position,
            can: standby.xattrs_can(),
        };
        Ok((welcome, (admission, filter)))
    };
    let (agreed, (admission, filter)) = match handshake::accept(ch, admit) {
        Ok(a) => a,
        Err(NotAccepted::Protocol(e)) => return Err(e.into()),
        Err(NotAccepted::Refused(r)) => {
            conn.refuse(r.code, &r.message);
            return Err(Error::Refused(r.message));
        }
    };
    let read_only = agreed.said.mode == SessionMode::ReadOnly;
    if !read_only && !agreed.caps.consistent {
        standby
            .forget_consistency()
            .map_err(|e| Error::io("cannot drop the consistent point", e))?;
    }
    let session = StandbySession {
        standby,
        read_only,
        filter,
        xattrs: agreed.xattrs,
        caps: agreed.caps,
        generation: AtomicU64::new(0),
        entry: admission.entry.clone(),
        temps: if read_only { None } else { standby.temps() },
    };
    Ok((admission, session))
}

/// Serves the session's streams, each on a thread of its own, until the control stream
/// `ch` ends the session. Returns the protocol error that ended it, if one did (the
/// connection is then aborted, which ends every other stream).
fn run(
    conn: &Arc<dyn Connection>,
    mut ch: Channel,
    session: &StandbySession,
    pulse: &SessionPulse,
) -> Option<ProtocolError> {
    let fatal: Mutex<Option<ProtocolError>> = Mutex::new(None);
    // Set once the primary has closed the session cleanly: later stream errors are only the
    // primary tearing the connection down.
    let done = AtomicBool::new(false);
    let fail = |e: ProtocolError| {
        if done.load(Ordering::Relaxed) {
            return;
        }
        tracing::warn!("closing the session: {e}");
        let reason = e.to_string();
        // Kept before the connection is aborted: the abort fails every other stream too,
        // and those failures (a lost connection) are only its consequence.
        fatal.lock().unwrap().get_or_insert(e);
        conn.abort(&reason);
    };
    std::thread::scope(|s| {
        let fail = &fail;
        s.spawn(move || {
            let mut handles = Vec::new();
            while let Ok(Some(stream)) = conn.accept() {
                handles.push(s.spawn(move || serve_stream(conn, stream, session, pulse, fail)));
            }
            for h in handles {
                let _ = h.join();
            }
        });
        // `Closed` has reached the primary: closing now ends the accept loop above
        // without making either side wait for the other's close.
        let Channel { r, w } = &mut ch;
        match ops::op_loop(session, r, w, None, true) {
            Ok(()) => {
                done.store(true, Ordering::Relaxed);
                conn.close("session complete");
            }
            Err(e) => fail(e),
        }
    });
    fatal.into_inner().unwrap()
}

/// Serves a stream other than the control stream. It says what it is with its first
/// message: a heartbeat stream is answered beat for beat, any other runs the operation
/// loop; its failure goes to `fail`.
fn serve_stream(
    conn: &Arc<dyn Connection>,
    stream: Stream,
    session: &StandbySession,
    pulse: &SessionPulse,
    fail: &(dyn Fn(ProtocolError) + Sync),
) {
    let mut ch = Channel::new(stream);
    let first = match ch.recv_opt() {
        Ok(Some(Message::Heartbeat(b))) => {
            heartbeat::answer(&**conn, ch, &b, pulse);
            return;
        }
        Ok(first) => first,
        Err(e) => return fail(e),
    };
    let Channel { r, w } = &mut ch;
    if let Err(e) = ops::op_loop(session, r, w, first, false) {
        fail(e);
    }
}
