//! The filesystem watcher: notify (inotify) events turned into [`Hint`]s. The handler runs
//! on notify's thread and never blocks: hints go into a bounded channel, and a full channel
//! only raises a flag that becomes one full re-scan.

use super::batcher::Hint;
use crate::path::{RelPath, is_temp_name};
use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode};
use notify::{Event, EventKind, RecursiveMode, Watcher as _};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

/// Hints buffered between the watcher and the replicator.
const QUEUE: usize = 1 << 16;

/// A running watch of one tree.
pub struct Watcher {
    _inner: notify::RecommendedWatcher,
    pub hints: Receiver<Hint>,
    /// Set when hints were dropped (queue full, or the kernel's queue overflowed).
    pub overflowed: Arc<AtomicBool>,
    /// Set when the inotify watch limit was hit: parts of the tree are not watched.
    pub limited: Arc<AtomicBool>,
}

/// What stops a watch from starting.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {path}: {reason}")]
pub struct WatchError {
    pub path: String,
    pub reason: String,
}

/// The message for the inotify watch limit, naming the sysctl to raise.
pub fn limit_message(root: &Path) -> String {
    let current = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_watches")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    format!(
        "the inotify watch limit (fs.inotify.max_user_watches = {current}) is too low to watch every \
         directory of {}: raise it (sysctl -w fs.inotify.max_user_watches=1048576); until then \
         hotsync re-scans the whole tree periodically instead of missing changes",
        root.display()
    )
}

/// Starts watching `root` recursively.
pub fn start(root: &Path) -> Result<Watcher, WatchError> {
    let root = root.canonicalize().map_err(|e| WatchError {
        path: root.display().to_string(),
        reason: e.to_string(),
    })?;
    let (tx, rx) = sync_channel(QUEUE);
    let overflowed = Arc::new(AtomicBool::new(false));
    let limited = Arc::new(AtomicBool::new(false));
    let handler = {
        let root = root.clone();
        let overflowed = overflowed.clone();
        let limited = limited.clone();
        move |res: notify::Result<Event>| handle(&root, res, &tx, &overflowed, &limited)
    };
    let config = notify::Config::default().with_follow_symlinks(false);
    let mut inner = notify::RecommendedWatcher::new(handler, config).map_err(|e| WatchError {
        path: root.display().to_string(),
        reason: e.to_string(),
    })?;
    match inner.watch(&root, RecursiveMode::Recursive) {
        Ok(()) => {}
        Err(e) if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) => {
            tracing::error!("{}", limit_message(&root));
            limited.store(true, Ordering::Relaxed);
        }
        Err(e) => {
            return Err(WatchError {
                path: root.display().to_string(),
                reason: e.to_string(),
            });
        }
    }
    Ok(Watcher {
        _inner: inner,
        hints: rx,
        overflowed,
        limited,
    })
}

fn handle(
    root: &Path,
    res: notify::Result<Event>,
    tx: &SyncSender<Hint>,
    overflowed: &AtomicBool,
    limited: &AtomicBool,
) {
    let hints = match res {
        Ok(ev) => hints_of(root, &ev),
        Err(e) if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) => {
            if !limited.swap(true, Ordering::Relaxed) {
                tracing::error!("{}", limit_message(root));
            }
            return;
        }
        Err(e) => {
            tracing::warn!("watcher: {e}; re-scanning");
            vec![Hint::RescanAll]
        }
    };
    for h in hints {
        match tx.try_send(h) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => overflowed.store(true, Ordering::Relaxed),
            Err(TrySendError::Disconnected(_)) => return,
        }
    }
}

/// The path relative to the watched root, if it lies inside it.
fn rel(root: &Path, p: &Path) -> Option<RelPath> {
    let r = p.strip_prefix(root).ok()?;
    let rp = RelPath::new(r.as_os_str().as_bytes().to_vec()).ok()?;
    (!is_temp_name(rp.name())).then_some(rp)
}

/// The hints an event carries. Access events (reads, opens) carry none.
pub fn hints_of(root: &Path, ev: &Event) -> Vec<Hint> {
    if ev.need_rescan() {
        return vec![Hint::RescanAll];
    }
    let paths: Vec<RelPath> = ev.paths.iter().filter_map(|p| rel(root, p)).collect();
    // A flush's marker: its creation is the barrier; anything else done to it is nothing.
    let markers: Vec<(u32, u64)> = paths
        .iter()
        .filter(|p| p.parent_bytes() == crate::path::RESERVED)
        .filter_map(|p| super::batcher::parse_marker(p.name()))
        .collect();
    if !markers.is_empty() {
        return match ev.kind {
            EventKind::Create(_) => markers
                .into_iter()
                .map(|(owner, id)| Hint::Barrier { owner, id })
                .collect(),
            _ => vec![],
        };
    }
    let one = |f: fn(RelPath) -> Hint| paths.iter().cloned().map(f).collect::<Vec<_>>();
    // The root itself removed or moved: what is left must be looked at again.
    if ev.paths.iter().any(|p| p == root)
        && matches!(
            ev.kind,
            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
        )
    {
        return vec![Hint::RescanAll];
    }
    match &ev.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => one(Hint::Written),
        EventKind::Access(_) => vec![],
        EventKind::Create(CreateKind::Folder) => one(Hint::DirAppeared),
        EventKind::Create(_) => one(Hint::Created),
        EventKind::Modify(ModifyKind::Data(_)) => one(Hint::Modified),
        EventKind::Modify(ModifyKind::Metadata(_)) => one(Hint::Attrib),
        EventKind::Modify(ModifyKind::Name(RenameMode::From)) => one(Hint::MovedFrom),
        EventKind::Modify(ModifyKind::Name(RenameMode::To)) => one(Hint::MovedTo),
        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
            // Only a rename with both ends inside the tree is a rename for the standby.
            match (
                ev.paths.first().and_then(|p| rel(root, p)),
                ev.paths.get(1).and_then(|p| rel(root, p)),
            ) {
                (Some(from), Some(to)) => vec![Hint::Renamed { from, to }],
                _ => vec![],
            }
        }
        EventKind::Modify(_) => one(Hint::Modified),
        EventKind::Remove(_) => one(Hint::Removed),
        EventKind::Any | EventKind::Other => {
            if paths.is_empty() {
                vec![Hint::RescanAll]
            } else {
                paths.iter().map(|p| Hint::RescanDir(p.split().0)).collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{DataChange, MetadataKind, RemoveKind};

    fn ev(kind: EventKind, paths: &[&str]) -> Event {
        let mut e = Event::new(kind);
        for p in paths {
            e = e.add_path(std::path::PathBuf::from(p));
        }
        e
    }
    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn a_flush_marker_is_a_barrier_when_made_and_nothing_after() {
        let root = Path::new("/src");
        let h = |k, ps: &[&str]| hints_of(root, &ev(k, ps));
        let m = "/src/.hotsync/flush-7-3";
        assert_eq!(
            h(EventKind::Create(CreateKind::File), &[m]),
            vec![Hint::Barrier { owner: 7, id: 3 }]
        );
        assert_eq!(
            h(
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                &[m]
            ),
            vec![]
        );
        assert_eq!(h(EventKind::Remove(RemoveKind::File), &[m]), vec![]);
        // Elsewhere a file of that name is a file.
        assert_eq!(
            h(EventKind::Create(CreateKind::File), &["/src/d/flush-7-3"]),
            vec![Hint::Created(p("d/flush-7-3"))]
        );
    }

    #[test]
    fn events_become_hints() {
        let root = Path::new("/src");
        let h = |k, ps: &[&str]| hints_of(root, &ev(k, ps));
        assert_eq!(
            h(
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                &["/src/a"]
            ),
            vec![Hint::Written(p("a"))]
        );
        assert_eq!(
            h(
                EventKind::Access(AccessKind::Close(AccessMode::Read)),
                &["/src/a"]
            ),
            vec![]
        );
        assert_eq!(
            h(EventKind::Create(CreateKind::Folder), &["/src/d"]),
            vec![Hint::DirAppeared(p("d"))]
        );
        assert_eq!(
            h(
                EventKind::Modify(ModifyKind::Data(DataChange::Any)),
                &["/src/a"]
            ),
            vec![Hint::Modified(p("a"))]
        );
        assert_eq!(
            h(
                EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)),
                &["/src/a"]
            ),
            vec![Hint::Attrib(p("a"))]
        );
        assert_eq!(
            h(EventKind::Remove(RemoveKind::File), &["/src/a"]),
            vec![Hint::Removed(p("a"))]
        );
        assert_eq!(
            h(
                EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
                &["/src/a", "/src/b/c"]
            ),
            vec![Hint::Renamed {
                from: p("a"),
                to: p("b/c")
            }]
        );
        // Out of the tree: only the side inside counts (as MovedFrom / MovedTo).
        assert_eq!(
            h(
                EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
                &["/src/a", "/elsewhere/a"]
            ),
            vec![]
        );
        assert_eq!(
            h(
                EventKind::Modify(ModifyKind::Name(RenameMode::From)),
                &["/src/a"]
            ),
            vec![Hint::MovedFrom(p("a"))]
        );
        assert_eq!(h(EventKind::Other, &[]), vec![Hint::RescanAll]);
        assert_eq!(
            h(EventKind::Remove(RemoveKind::Folder), &["/src"]),
            vec![Hint::RescanAll]
        );
        assert_eq!(
            h(
                EventKind::Create(CreateKind::File),
                &["/src/.hotsync-tmp.0123456789abcdef"]
            ),
            vec![]
        );
        let overflow = Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        assert_eq!(hints_of(root, &overflow), vec![Hint::RescanAll]);
    }
}
