//! The control socket: every running `watch` and `serve` answers on a Unix socket in the
//! home directory (`run/<command>-<pid>.sock`, mode 0600 in a 0700 directory), one JSON
//! request line in, one JSON answer line out. `hotsync status` asks each of them; later
//! `flush`, `promote` and `check` speak the same way.

use crate::error::{Error, Result};
use crate::model::status::Instance;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Longest request or answer line.
const MAX_LINE: u64 = 16 << 20;
/// How long a peer on the socket may take to speak.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Status,
    /// Promote the standby tree this `serve` holds.
    Promote {
        force: bool,
    },
    /// Turn the former primary tree this `serve` holds into a standby.
    Rejoin {
        excludes: Vec<String>,
        /// Only if the tree is fenced.
        #[serde(default)]
        if_fenced: bool,
    },
    /// Answer once every change made before now is durable on `quorum` standbys (default:
    /// all), or at `timeout_ms`.
    Flush {
        quorum: Option<usize>,
        timeout_ms: u64,
    },
}

/// What a running instance answers to.
pub trait Control: Send + Sync {
    fn status(&self) -> Instance;
    /// Promotes the tree this instance holds (only a `serve` can).
    fn promote(&self, _force: bool) -> Result<serde_json::Value> {
        Err(Error::Usage(
            "only a running serve can promote its tree".into(),
        ))
    }
    /// Waits until every change made before the call is durable on `quorum` standbys (only
    /// a `watch` can); the outcome, also when the timeout ended it.
    fn flush(&self, _quorum: Option<usize>, _timeout: Duration) -> Result<serde_json::Value> {
        Err(Error::Usage("only a running watch can flush".into()))
    }
    /// Rejoins the tree this instance holds (only a `serve` can).
    fn rejoin(&self, _excludes: &[String], _if_fenced: bool) -> Result<serde_json::Value> {
        Err(Error::Usage(
            "only a running serve can rejoin its tree".into(),
        ))
    }
}

/// Paces a server's accept loop (the control socket's, the metrics endpoint's) through a
/// spell of errors. An error such as EMFILE lasts until descriptors are freed, and the
/// listener stays ready meanwhile: retried at once, the loop would spin a core. The first
/// retry waits [`AcceptErrors::FIRST`], each next one twice as long, up to
/// [`AcceptErrors::MAX`]; an accepted connection ends the spell. Pure: the caller sleeps,
/// and logs once per spell, at its start and at its end.
#[derive(Debug, Default)]
pub(crate) struct AcceptErrors {
    /// Failed accepts since the last success.
    failures: u32,
}

impl AcceptErrors {
    pub(crate) const FIRST: Duration = Duration::from_millis(10);
    pub(crate) const MAX: Duration = Duration::from_secs(1);

    /// An accept failed: how long to wait before the next, and whether this failure starts
    /// a spell (the one to log).
    pub(crate) fn failed(&mut self) -> (Duration, bool) {
        self.failures = self.failures.saturating_add(1);
        let doublings = (self.failures - 1).min(16);
        let wait = Self::FIRST.saturating_mul(1 << doublings).min(Self::MAX);
        (wait, self.failures == 1)
    }

    /// An accept succeeded: the number of failures in the spell it ends, if one did.
    pub(crate) fn succeeded(&mut self) -> Option<u32> {
        Some(std::mem::take(&mut self.failures)).filter(|&n| n > 0)
    }
}

/// The directory holding the sockets of a home directory.
pub fn run_dir(home: &Path) -> PathBuf {
    home.join("run")
}

/// A listening control socket; the socket file is removed when this is dropped.
pub struct ControlSocket {
    path: PathBuf,
}

impl ControlSocket {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Starts answering on `<home>/run/<command>-<pid>.sock`.
///
/// # Errors
/// [`Error::Usage`] when the socket cannot be made (a home path too long for a Unix
/// socket, an unwritable home), naming the path.
pub fn listen(home: &Path, command: &str, control: Arc<dyn Control>) -> Result<ControlSocket> {
    let dir = run_dir(home);
    let made = std::fs::create_dir_all(&dir)
        .and_then(|_| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)));
    if let Err(e) = made {
        return Err(Error::Usage(format!(
            "cannot make the control directory {}: {e}",
            dir.display()
        )));
    }
    let path = dir.join(format!("{command}-{}.sock", std::process::id()));
    // A socket left by an earlier process with our pid is stale.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|e| {
        Error::Usage(format!(
            "cannot listen on the control socket {} ({e}): use a shorter --home path",
            path.display()
        ))
    })?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("cannot restrict {}", path.display()), e))?;
    std::thread::Builder::new()
        .name("hotsync-control".into())
        .spawn(move || {
            let mut errors = AcceptErrors::default();
            for conn in listener.incoming() {
                let conn = match conn {
                    Ok(c) => {
                        if let Some(n) = errors.succeeded() {
                            tracing::info!(
                                "control socket: accepting connections again after {n} failed \
                                 attempt(s)"
                            );
                        }
                        c
                    }
                    Err(e) => {
                        let (wait, first) = errors.failed();
                        if first {
                            tracing::warn!(
                                "control socket: cannot accept a connection ({e}); retrying, \
                                 less and less often (at most every {} s), until it can",
                                AcceptErrors::MAX.as_secs()
                            );
                        }
                        std::thread::sleep(wait);
                        continue;
                    }
                };
                let control = control.clone();
                // One thread per client: a slow one never holds up the next.
                let _ = std::thread::Builder::new()
                    .name("hotsync-control-client".into())
                    .spawn(move || {
                        if let Err(e) = answer(conn, &*control) {
                            tracing::debug!("control socket client: {e}");
                        }
                    });
            }
        })
        .map_err(|e| Error::io("cannot start the control socket thread", e))?;
    Ok(ControlSocket { path })
}

fn answer(conn: UnixStream, control: &dyn Control) -> std::io::Result<()> {
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new((&conn).take(MAX_LINE)).read_line(&mut line)?;
    let reply = match serde_json::from_str::<Request>(line.trim()) {
        Ok(Request::Status) => serde_json::to_value(control.status())?,
        Ok(Request::Promote { force }) => match control.promote(force) {
            Ok(v) => v,
            Err(e) => serde_json::json!({"error": e.to_string()}),
        },
        Ok(Request::Rejoin {
            excludes,
            if_fenced,
        }) => match control.rejoin(&excludes, if_fenced) {
            Ok(v) => v,
            Err(e) => serde_json::json!({"error": e.to_string()}),
        },
        Ok(Request::Flush { quorum, timeout_ms }) => {
            match control.flush(quorum, Duration::from_millis(timeout_ms)) {
                Ok(v) => v,
                Err(e) => serde_json::json!({"error": e.to_string()}),
            }
        }
        Err(e) => serde_json::json!({"error": format!("bad request: {e}")}),
    };
    let mut out = serde_json::to_vec(&reply)?;
    out.push(b'\n');
    (&conn).write_all(&out)
}

/// What one socket said.
#[derive(Debug)]
pub enum Answer {
    /// The instance's answer.
    Status(Box<Instance>),
    /// The socket exists and its process lives, but it did not answer properly.
    Unresponsive { socket: PathBuf, why: String },
}

/// Asks every instance running with this home directory for its status. Sockets left by
/// processes that are gone are removed.
pub fn status_all(home: &Path) -> Vec<Answer> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(run_dir(home)) else {
        return out;
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .collect();
    paths.sort();
    for p in paths {
        match ask(&p, &Request::Status) {
            Ok(v) => match serde_json::from_value::<Instance>(v) {
                Ok(i) => out.push(Answer::Status(Box::new(i))),
                Err(e) => out.push(Answer::Unresponsive {
                    socket: p,
                    why: format!("an answer this hotsync does not understand ({e})"),
                }),
            },
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                // Nobody listens: the process died without cleaning up.
                let _ = std::fs::remove_file(&p);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => out.push(Answer::Unresponsive {
                socket: p,
                why: e.to_string(),
            }),
        }
    }
    out
}

/// The sockets of the running instances of `command` (`watch` or `serve`), with their
/// status, asked one by one as the caller goes.
fn instances(home: &Path, command: &str) -> impl Iterator<Item = (PathBuf, Box<Instance>)> {
    let prefix = format!("{command}-");
    std::fs::read_dir(run_dir(home))
        .into_iter()
        .flatten()
        .flatten()
        .filter(move |e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(&prefix) && name.ends_with(".sock")
        })
        .filter_map(|e| {
            let p = e.path();
            let i = serde_json::from_value::<Instance>(ask(&p, &Request::Status).ok()?).ok()?;
            Some((p, Box::new(i)))
        })
}

/// The sockets of the running instances of `command`, with their status, by socket name.
pub fn find_all(home: &Path, command: &str) -> Vec<(PathBuf, Box<Instance>)> {
    let mut out: Vec<_> = instances(home, command).collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The socket of the running instance whose tree is `tree` (by canonical path), with its
/// status.
pub fn find(home: &Path, command: &str, tree: &Path) -> Option<(PathBuf, Box<Instance>)> {
    let want = crate::tree::operand::shown_absolute(tree);
    instances(home, command).find(|(_, i)| i.tree == want)
}

/// Sends `req` to the socket at `path` and reads the answer.
pub fn ask(path: &Path, req: &Request) -> std::io::Result<serde_json::Value> {
    ask_within(path, req, IO_TIMEOUT)
}

/// Like [`ask`], waiting up to `limit` for the answer (a flush takes as long as it takes).
pub fn ask_within(
    path: &Path,
    req: &Request,
    limit: Duration,
) -> std::io::Result<serde_json::Value> {
    let conn = UnixStream::connect(path)?;
    conn.set_read_timeout(Some(limit))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    (&conn).write_all(&line)?;
    let mut answer = String::new();
    BufReader::new((&conn).take(MAX_LINE)).read_line(&mut answer)?;
    if answer.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "no answer",
        ));
    }
    Ok(serde_json::from_str(answer.trim())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_errors_back_off_doubling_to_a_second_and_are_said_once_per_spell() {
        let mut e = AcceptErrors::default();
        assert_eq!(e.succeeded(), None, "no spell, nothing to say");
        let waits: Vec<(u64, bool)> = (0..10)
            .map(|_| {
                let (w, first) = e.failed();
                (w.as_millis() as u64, first)
            })
            .collect();
        assert_eq!(
            waits,
            [
                (10, true),
                (20, false),
                (40, false),
                (80, false),
                (160, false),
                (320, false),
                (640, false),
                (1000, false),
                (1000, false),
                (1000, false),
            ]
        );
        // A lasting error stays at the cap, however long it lasts.
        for _ in 0..100_000 {
            assert_eq!(e.failed(), (AcceptErrors::MAX, false));
        }
        // A success ends the spell (said once) and the next error starts over.
        assert_eq!(e.succeeded(), Some(100_010));
        assert_eq!(e.succeeded(), None);
        assert_eq!(e.failed(), (AcceptErrors::FIRST, true));
    }
}
