//! hotsync keeps a standby copy of a directory tree identical to the primary's.
//!
//! One engine serves every mode: [`scan`] both trees, [`plan::plan`] the difference (pure),
//! then a [`sender`] drives the plan through the [`protocol`] to a [`receiver`], which
//! writes each file atomically and durably ([`atomic`]). A local DEST runs the receiver
//! in-process over [`transport::local`], the same bytes QUIC carries for a remote one.

pub mod atomic;
pub mod bytes;
pub mod delta;
pub mod error;
pub mod filter;
pub mod fsroot;
pub mod guard;
pub mod identity;
pub mod manifest;
pub mod path;
pub mod plan;
pub mod progress;
pub mod protocol;
pub mod receiver;
pub mod scan;
pub mod sender;
pub mod server;
pub mod summary;
pub mod transport;
pub mod verify;
pub mod watch;

pub use error::{Error, Result};
pub use progress::Monitor;
pub use sender::{Outcome, SyncOptions};

use std::path::{Path, PathBuf};

/// Opens SRC as a tree root, with a clear error for each way it can be wrong.
pub fn open_source(src: &Path) -> Result<fsroot::Root> {
    match std::fs::metadata(src) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::Usage(format!(
                "SRC {} does not exist",
                src.display()
            )));
        }
        Err(e) => {
            return Err(Error::Usage(format!(
                "cannot access SRC {}: {e}",
                src.display()
            )));
        }
        Ok(m) if !m.is_dir() => {
            return Err(Error::Usage(format!(
                "SRC {} is not a directory",
                src.display()
            )));
        }
        Ok(_) => {}
    }
    fsroot::Root::open(src)
        .map_err(|e| Error::Usage(format!("cannot open SRC {}: {e}", src.display())))
}

/// The absolute form of `p`, resolving symlinks of the part that exists.
fn absolute(p: &Path) -> std::io::Result<PathBuf> {
    match p.canonicalize() {
        Ok(c) => Ok(c),
        Err(_) => {
            let parent = p
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let name = p
                .file_name()
                .ok_or_else(|| std::io::Error::other("no file name"))?;
            Ok(parent.canonicalize()?.join(name))
        }
    }
}

/// Checks a local DEST against SRC and creates it when missing (its parent must exist).
pub fn prepare_local_dest(src: &Path, dest: &Path, create: bool) -> Result<()> {
    let s = absolute(src)
        .map_err(|e| Error::Usage(format!("cannot resolve SRC {}: {e}", src.display())))?;
    let d = absolute(dest).map_err(|_| {
        Error::Usage(format!(
            "DEST {}: its parent directory does not exist; create it first",
            dest.display()
        ))
    })?;
    if s == d {
        return Err(Error::Usage("SRC and DEST are the same directory".into()));
    }
    if d.starts_with(&s) {
        return Err(Error::Usage(format!(
            "DEST {} is inside SRC {}: the mirror would contain itself; choose a DEST outside SRC",
            dest.display(),
            src.display()
        )));
    }
    if s.starts_with(&d) {
        return Err(Error::Usage(format!(
            "SRC {} is inside DEST {}: mirroring would delete the source itself",
            src.display(),
            dest.display()
        )));
    }
    match std::fs::symlink_metadata(&d) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => match std::fs::metadata(&d) {
            Ok(m) if m.is_dir() => Ok(()),
            _ => Err(Error::Usage(format!(
                "DEST {} exists and is not a directory",
                dest.display()
            ))),
        },
        Err(_) if !create => Ok(()),
        Err(_) => std::fs::create_dir(&d)
            .map_err(|e| Error::Usage(format!("cannot create DEST {}: {e}", dest.display()))),
    }
}

/// Runs `f` as the primary against an in-process receiver serving the local directory
/// `dest`: the same protocol a remote standby speaks.
fn with_local<T>(
    dest: &Path,
    f: impl FnOnce(&dyn transport::Connection) -> Result<T>,
) -> Result<T> {
    use transport::Connection;
    let (primary, standby) = transport::local::pair();
    std::thread::scope(|s| {
        let receiver = s.spawn(|| {
            let r = receiver::serve(&standby, dest);
            if r.is_err() {
                // The primary may be waiting for an answer that will not come.
                standby.close("receiver failed");
            }
            r
        });
        let done = f(&primary);
        if done.is_err() {
            primary.close("primary failed");
        }
        let received = receiver.join().expect("receiver thread panicked");
        match (done, received) {
            (Ok(v), _) => Ok(v),
            // A refusal or failure on the standby side explains a broken connection best.
            (Err(e), Err(r)) if e.is_retryable() => Err(r),
            (Err(e), _) => Err(e),
        }
    })
}

/// Runs `f` as the primary against the standby at `dest` (`quic://HOST:PORT`), which must
/// present the certificate of `server`.
fn with_remote<T>(
    dest: &str,
    server: identity::NodeId,
    me: &identity::Identity,
    f: impl FnOnce(&dyn transport::Connection) -> Result<T>,
) -> Result<T> {
    use transport::Connection;
    let rt =
        transport::quic::runtime().map_err(|e| Error::io("cannot start the network runtime", e))?;
    let conn = transport::quic::connect(rt.handle(), dest, server, me)?;
    match f(&conn) {
        Ok(v) => Ok(v),
        Err(e) => {
            // Why the connection ended says more than the broken stream it caused.
            let err = match (&e, conn.failure()) {
                (Error::Protocol(p), Some(f)) if p.is_transport() => f,
                (Error::Unreachable(_) | Error::Io { .. }, Some(f)) => f,
                _ => e,
            };
            conn.abort("primary failed");
            Err(err)
        }
    }
}

/// Mirrors `src` into the local directory `dest`: the receiver runs in-process, behind the
/// same protocol a remote standby speaks.
pub fn sync_local(
    src: &Path,
    dest: &Path,
    opts: &SyncOptions,
    monitor: &dyn Monitor,
) -> Result<Outcome> {
    let root = open_source(src)?;
    prepare_local_dest(src, dest, !opts.dry_run)?;
    with_local(dest, |conn| sender::sync(&root, conn, opts, monitor))
}

/// Mirrors `src` to the standby at `dest` (`quic://HOST:PORT`), which must present the
/// certificate of `server`.
pub fn sync_remote(
    src: &Path,
    dest: &str,
    server: identity::NodeId,
    me: &identity::Identity,
    opts: &SyncOptions,
    monitor: &dyn Monitor,
) -> Result<Outcome> {
    let root = open_source(src)?;
    with_remote(dest, server, me, |conn| {
        sender::sync(&root, conn, opts, monitor)
    })
}

/// Verifies the local directory `dest` against `src`.
pub fn verify_local(src: &Path, dest: &Path, excludes: &[String]) -> Result<verify::Report> {
    let root = open_source(src)?;
    prepare_local_dest(src, dest, false)?;
    with_local(dest, |conn| verify::verify(&root, conn, excludes, 0))
}

/// Verifies the standby at `dest` (`quic://HOST:PORT`) against `src`.
pub fn verify_remote(
    src: &Path,
    dest: &str,
    server: identity::NodeId,
    me: &identity::Identity,
    excludes: &[String],
) -> Result<verify::Report> {
    let root = open_source(src)?;
    with_remote(dest, server, me, |conn| {
        verify::verify(&root, conn, excludes, 0)
    })
}
