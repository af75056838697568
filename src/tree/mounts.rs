//! The filesystems mounted at or beneath a source root, from `/proc/self/mountinfo`. A disk
//! unmounted from inside the tree leaves its mount point empty, and the watcher's re-scan of
//! it would take that for deletions; a running watch asks `Mounts::changed` before each
//! scan, and judges a source whose mounts changed as a new one (see
//! `crate::model::guard::Continuity`).

use std::collections::BTreeSet;
use std::io::{self, Read, Seek};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Mounts at or beneath a directory: each mount point, with its device (`major:minor`).
pub(crate) type MountSet = BTreeSet<(Vec<u8>, Vec<u8>)>;

/// The mounts at or beneath `root` (an absolute path without a trailing `/`) in a
/// mountinfo table (proc(5)): a line's third field is the device, its fifth the mount
/// point, with space, tab, newline and backslash written as octal escapes. Malformed lines
/// are skipped.
pub(crate) fn parse(table: &[u8], root: &[u8]) -> MountSet {
    table
        .split(|b| *b == b'\n')
        .filter_map(|line| {
            let mut fields = line.split(|b| *b == b' ');
            let device = fields.nth(2)?;
            let point = unescape(fields.nth(1)?);
            let beneath = point == root
                || (point.starts_with(root) && point.get(root.len()) == Some(&b'/'))
                || root == b"/";
            beneath.then(|| (point, device.to_vec()))
        })
        .collect()
}

/// Undoes mountinfo's `\ooo` escapes.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field.get(i + 1..i + 4).filter(|d| {
            field[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)) && d[0] <= b'3'
        });
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}

/// The mounts at or beneath one directory, followed: the table is read again only when the
/// kernel says it changed (it flags `/proc/self/mountinfo` to `poll` after any mount or
/// unmount), so asking before every batch costs one system call.
#[derive(Debug)]
pub(crate) struct Mounts {
    table: std::fs::File,
    root: Vec<u8>,
    seen: MountSet,
}

impl Mounts {
    /// Starts following the mounts at or beneath `root`.
    ///
    /// # Errors
    /// Why the directory or the mount table cannot be read.
    pub(crate) fn open(root: &Path) -> io::Result<Mounts> {
        let root = std::fs::canonicalize(root)?.as_os_str().as_bytes().to_vec();
        let table = std::fs::File::open("/proc/self/mountinfo")?;
        let mut m = Mounts {
            table,
            root,
            seen: MountSet::new(),
        };
        m.seen = m.read()?;
        Ok(m)
    }

    fn read(&mut self) -> io::Result<MountSet> {
        self.table.rewind()?;
        let mut buf = Vec::new();
        self.table.read_to_end(&mut buf)?;
        Ok(parse(&buf, &self.root))
    }

    /// Whether the mounts at or beneath the root differ from those of the last call (or of
    /// `open`).
    ///
    /// # Errors
    /// Why the mount table cannot be read.
    pub(crate) fn changed(&mut self) -> io::Result<bool> {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let mut fds = [PollFd::new(&self.table, PollFlags::PRI)];
        let now = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        poll(&mut fds, Some(&now)).map_err(io::Error::from)?;
        if !fds[0].revents().intersects(PollFlags::PRI | PollFlags::ERR) {
            return Ok(false);
        }
        let now = self.read()?;
        if now == self.seen {
            return Ok(false);
        }
        self.seen = now;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &[u8] = b"\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
40 27 8:17 / /srv/data rw,relatime - ext4 /dev/sdb1 rw
41 40 8:33 / /srv/data/deep rw - xfs /dev/sdc1 rw
42 27 0:50 / /srv/data2 rw - tmpfs tmpfs rw
43 27 0:51 / /srv/with\\040space rw - tmpfs tmpfs rw
44 27 0:52 /sub /srvx rw - tmpfs tmpfs rw
garbage
";

    fn points(s: &MountSet) -> Vec<String> {
        s.iter()
            .map(|(p, d)| {
                format!(
                    "{} {}",
                    String::from_utf8_lossy(p),
                    String::from_utf8_lossy(d)
                )
            })
            .collect()
    }

    #[test]
    fn the_mounts_beneath_a_directory_are_read_with_their_devices() {
        assert_eq!(
            points(&parse(TABLE, b"/srv/data")),
            ["/srv/data 8:17", "/srv/data/deep 8:33"]
        );
        // A sibling whose name begins the same is not beneath it; escapes are undone.
        assert_eq!(
            points(&parse(TABLE, b"/srv")),
            [
                "/srv/data 8:17",
                "/srv/data/deep 8:33",
                "/srv/data2 0:50",
                "/srv/with space 0:51"
            ]
        );
        assert!(parse(TABLE, b"/home").is_empty());
        assert_eq!(parse(TABLE, b"/").len(), 7);
    }

    #[test]
    fn an_unmount_or_a_remount_changes_the_set() {
        let before = parse(TABLE, b"/srv");
        let unmounted: Vec<u8> = TABLE
            .split(|b| *b == b'\n')
            .filter(|l| !l.starts_with(b"41 "))
            .flat_map(|l| l.iter().copied().chain([b'\n']))
            .collect();
        assert_ne!(parse(&unmounted, b"/srv"), before);
        let other_disk = String::from_utf8_lossy(TABLE).replace("8:33", "8:49");
        assert_ne!(parse(other_disk.as_bytes(), b"/srv"), before);
        assert_eq!(parse(TABLE, b"/srv"), before);
    }

    #[test]
    fn the_kernel_tells_when_to_read_the_table_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Mounts::open(dir.path()).unwrap();
        assert!(!m.changed().unwrap(), "nothing happened");
        assert!(!m.changed().unwrap());
    }
}
