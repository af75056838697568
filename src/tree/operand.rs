//! The checks a tree given on the command line must pass, each failure a clear one-line
//! error naming the path and what is wrong with it.

use crate::error::{Error, Result};
use crate::tree::fsroot;
use std::path::{Path, PathBuf};

/// Checks that `path` exists and is a directory; `what` names it in messages (`SRC`,
/// `--root`).
pub fn check_dir(what: &str, path: &Path) -> Result<()> {
    let shown = path.display();
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(Error::Usage(format!("{what} {shown} does not exist")))
        }
        Err(e) => Err(Error::Usage(format!("cannot access {what} {shown}: {e}"))),
        Ok(m) if !m.is_dir() => Err(Error::Usage(format!("{what} {shown} is not a directory"))),
        Ok(_) => Ok(()),
    }
}

/// Opens SRC as a tree root, with a clear error for each way it can be wrong.
pub(crate) fn open_source(src: &Path) -> Result<fsroot::Root> {
    check_dir("SRC", src)?;
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

/// `p` as an absolute path for people (as given when it cannot be resolved).
pub fn shown_absolute(p: &Path) -> String {
    absolute(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

/// Checks a local DEST against SRC and, when `create`, creates it if missing (its parent
/// must exist).
pub(crate) fn prepare_local_dest(src: &Path, dest: &Path, create: bool) -> Result<()> {
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
