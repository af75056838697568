//! Extended attributes and POSIX ACLs as part of an entry's metadata.
//!
//! Linux keeps ACLs (`system.posix_acl_access`, `system.posix_acl_default`), file
//! capabilities (`security.capability`) and SELinux labels (`security.selinux`) as extended
//! attributes, so one mechanism carries them all. A scan reads them with the entry and
//! keeps only a digest (`Sum`, in [`crate::model::manifest::Meta`]) for the quick check; the
//! sender reads the values again when it sends the entry, and the receiver sets exactly
//! that set on the temp file before the rename, so a file never appears with the wrong ACL.
//!
//! Which namespaces a session mirrors is a [`Policy`]: what the primary asks for
//! (`--no-xattrs`, `--no-acls`) and what the standby can store, agreed when it opens.

use rustix::fs::XattrFlags;
use rustix::io::Errno;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use crate::model::xattrs::{Policy, Xattr, Xattrs};

impl Policy {
    /// What a primary asks for: attributes unless `no_xattrs`, ACLs unless `no_acls`.
    pub fn wanted(no_xattrs: bool, no_acls: bool) -> Policy {
        Policy {
            user: !no_xattrs,
            trusted: !no_xattrs,
            security: !no_xattrs,
            selinux: !no_xattrs && selinux_enabled(),
            acls: !no_acls,
        }
    }
}

/// Warns that attributes are not mirrored, once in this process for each `about` (the
/// namespaces missing): a primary and its local standby in one process say it once
/// between them, and a second standby that lacks others still says so.
pub(crate) fn say_once(about: &str, message: &str) {
    static SAID: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
    if !said.iter().any(|a| a == about) {
        said.push(about.to_string());
        tracing::warn!("{message}");
    }
}

/// Whether this host runs SELinux (its labels are then worth carrying).
pub(crate) fn selinux_enabled() -> bool {
    std::path::Path::new("/sys/fs/selinux/enforce").exists()
}

/// Where attributes are read or set: an open file, or a name in an open directory (never
/// followed if it is a symlink).
#[derive(Clone, Copy)]
pub(crate) enum At<'a> {
    Fd(BorrowedFd<'a>),
    Name(BorrowedFd<'a>, &'a [u8]),
}

/// `/proc/self/fd/N/name`: the name in the directory open as N, reached without
/// resolving any path component that could be a symlink (the `l*xattr` calls do not
/// follow the last one).
fn proc_path(dir: BorrowedFd<'_>, name: &[u8]) -> Vec<u8> {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name);
    p
}

/// Set once `listxattrat` turned out missing (a kernel before 6.13).
static NO_LISTXATTRAT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `listxattrat(dir, name, AT_SYMLINK_NOFOLLOW, buf)`, Linux 6.13's call: no path through
/// `/proc`, which costs about as much as the rest of a scan's look at an entry. `None`
/// where the kernel lacks it.
fn listxattrat(dir: BorrowedFd<'_>, name: &[u8], buf: &mut [u8]) -> Option<Result<usize, Errno>> {
    use std::sync::atomic::Ordering;
    // The same number on every architecture (a call added after 5.1).
    const SYS_LISTXATTRAT: libc::c_long = 465;
    if NO_LISTXATTRAT.load(Ordering::Relaxed) {
        return None;
    }
    // A name is at most 255 bytes: NUL-terminated on the stack, not allocated.
    let mut z = [0u8; 256];
    if name.len() >= z.len() || name.contains(&0) {
        return Some(Err(Errno::NAMETOOLONG));
    }
    z[..name.len()].copy_from_slice(name);
    // SAFETY: `z` holds a NUL-terminated name and the buffer is valid for `buf.len()`
    // bytes; the kernel writes at most that many.
    let r = unsafe {
        libc::syscall(
            SYS_LISTXATTRAT,
            dir.as_raw_fd(),
            z.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    if r >= 0 {
        return Some(Ok(r as usize));
    }
    let e = Errno::from_raw_os_error(io::Error::last_os_error().raw_os_error().unwrap_or(0));
    if e == Errno::NOSYS {
        NO_LISTXATTRAT.store(true, Ordering::Relaxed);
        return None;
    }
    Some(Err(e))
}

impl At<'_> {
    fn list(&self, buf: &mut [u8]) -> Result<usize, Errno> {
        match *self {
            At::Fd(fd) => rustix::fs::flistxattr(fd, buf),
            At::Name(d, n) => listxattrat(d, n, buf)
                .unwrap_or_else(|| rustix::fs::llistxattr(proc_path(d, n).as_slice(), buf)),
        }
    }
    fn list_size(&self) -> Result<usize, Errno> {
        match *self {
            At::Fd(fd) => rustix::fs::flistxattr_query(fd),
            At::Name(d, n) => rustix::fs::llistxattr_query(proc_path(d, n).as_slice()),
        }
    }
    fn get(&self, name: &[u8], buf: &mut [u8]) -> Result<usize, Errno> {
        match *self {
            At::Fd(fd) => rustix::fs::fgetxattr(fd, name, buf),
            At::Name(d, n) => rustix::fs::lgetxattr(proc_path(d, n).as_slice(), name, buf),
        }
    }
    fn get_size(&self, name: &[u8]) -> Result<usize, Errno> {
        match *self {
            At::Fd(fd) => rustix::fs::fgetxattr_query(fd, name),
            At::Name(d, n) => rustix::fs::lgetxattr_query(proc_path(d, n).as_slice(), name),
        }
    }
    fn set(&self, name: &[u8], value: &[u8]) -> Result<(), Errno> {
        match *self {
            At::Fd(fd) => rustix::fs::fsetxattr(fd, name, value, XattrFlags::empty()),
            At::Name(d, n) => {
                rustix::fs::lsetxattr(proc_path(d, n).as_slice(), name, value, XattrFlags::empty())
            }
        }
    }
    fn remove(&self, name: &[u8]) -> Result<(), Errno> {
        match *self {
            At::Fd(fd) => rustix::fs::fremovexattr(fd, name),
            At::Name(d, n) => rustix::fs::lremovexattr(proc_path(d, n).as_slice(), name),
        }
    }
}

/// Calls `f` with a buffer large enough for what `size` says, growing it if the
/// attribute grew in between (`ERANGE`).
fn with_buffer(
    small: &mut [u8],
    mut f: impl FnMut(&mut [u8]) -> Result<usize, Errno>,
    size: impl Fn() -> Result<usize, Errno>,
) -> Result<Vec<u8>, Errno> {
    match f(small) {
        Ok(n) => return Ok(small[..n].to_vec()),
        Err(Errno::RANGE) => {}
        Err(e) => return Err(e),
    }
    for _ in 0..4 {
        let mut big = vec![0; size()?.max(1)];
        match f(&mut big) {
            Ok(n) => {
                big.truncate(n);
                return Ok(big);
            }
            Err(Errno::RANGE) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Errno::RANGE)
}

/// Reads the attributes of `at` that `policy` keeps. A filesystem without attributes has
/// none; an attribute removed while read is skipped.
pub(crate) fn read(at: At<'_>, policy: &Policy) -> io::Result<Xattrs> {
    if policy.is_none() {
        return Ok(Xattrs::default());
    }
    let mut small = [0u8; 1024];
    let names = match with_buffer(&mut small, |b| at.list(b), || at.list_size()) {
        Ok(n) => n,
        Err(Errno::NOTSUP) => return Ok(Xattrs::default()),
        Err(e) => return Err(io::Error::from(e)),
    };
    let mut wanted: Vec<&[u8]> = names
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty() && policy.keeps(n))
        .collect();
    if wanted.is_empty() {
        return Ok(Xattrs::default());
    }
    wanted.sort_unstable();
    wanted.dedup();
    let mut out = Vec::with_capacity(wanted.len());
    for name in wanted {
        match with_buffer(&mut small, |b| at.get(name, b), || at.get_size(name)) {
            Ok(value) => out.push(Xattr {
                name: name.to_vec(),
                value,
            }),
            Err(Errno::NODATA) => {}
            Err(e) => return Err(io::Error::from(e)),
        }
    }
    Ok(Xattrs(out))
}

/// Makes the kept attributes of `at` exactly `want`: removes the others `policy` keeps
/// (an ACL inherited from the directory, say) and sets what differs.
pub(crate) fn apply(at: At<'_>, want: &Xattrs, policy: &Policy) -> io::Result<()> {
    if policy.is_none() {
        return Ok(());
    }
    let have = read(at, policy)?;
    for h in &have.0 {
        if !want.0.iter().any(|w| w.name == h.name) {
            at.remove(&h.name).or_else(|e| match e {
                Errno::NODATA => Ok(()),
                e => Err(e),
            })?;
        }
    }
    for w in &want.0 {
        if !have.0.contains(w) {
            match at.set(&w.name, &w.value) {
                Ok(()) => {}
                // A filesystem mounted inside the tree that keeps no attributes: the rest
                // of the entry is still mirrored.
                Err(Errno::NOTSUP) => {
                    static SAID: std::sync::Once = std::sync::Once::new();
                    SAID.call_once(|| {
                        tracing::warn!(
                            "a filesystem in the standby tree does not support the extended \
                             attribute {}: such attributes are not mirrored there",
                            String::from_utf8_lossy(&w.name)
                        )
                    });
                }
                Err(e) => return Err(explain(e, &w.name)),
            }
        }
    }
    Ok(())
}

fn explain(e: Errno, name: &[u8]) -> io::Error {
    let err = io::Error::from(e);
    let shown = String::from_utf8_lossy(name);
    // Not a full disk: the attributes of one file do not fit (ext4 keeps one block).
    if matches!(e, Errno::NOSPC | Errno::TOOBIG) {
        return io::Error::other(format!(
            "cannot set {shown}: the standby's filesystem has no room for this file's \
             extended attributes ({err})"
        ));
    }
    io::Error::new(err.kind(), format!("cannot set {shown}: {err}"))
}

/// A minimal access ACL (owner rw, group r, other r): what setting an ACL is probed with.
fn minimal_acl() -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec(); // POSIX_ACL_XATTR_VERSION
    for (tag, perm) in [(0x01u16, 6u16), (0x04, 4), (0x20, 4)] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&u32::MAX.to_le_bytes());
    }
    v
}

/// What the filesystem of the open file `fd` can store, found by trying each namespace
/// on it (a scratch file the caller removes after).
pub(crate) fn probe(fd: BorrowedFd<'_>) -> Policy {
    let at = At::Fd(fd);
    let can = |name: &[u8], value: &[u8]| {
        let ok = at.set(name, value).is_ok();
        if ok {
            let _ = at.remove(name);
        }
        ok
    };
    Policy {
        user: can(b"user.hotsync-probe", b"1"),
        trusted: can(b"trusted.hotsync-probe", b"1"),
        security: can(b"security.hotsync-probe", b"1"),
        selinux: selinux_enabled(),
        acls: at.set(b"system.posix_acl_access", &minimal_acl()).is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::xattrs::{MAX_COUNT, MAX_VALUE, Sum};

    fn x(name: &str, value: &[u8]) -> Xattr {
        Xattr {
            name: name.as_bytes().to_vec(),
            value: value.to_vec(),
        }
    }

    #[test]
    fn the_policy_keeps_its_namespaces_only() {
        let all = Policy {
            user: true,
            trusted: true,
            security: true,
            selinux: false,
            acls: true,
        };
        assert!(all.keeps(b"user.mime_type"));
        assert!(all.keeps(b"security.capability"));
        assert!(!all.keeps(b"security.selinux"));
        assert!(all.keeps(b"system.posix_acl_default"));
        assert!(!all.keeps(b"system.nfs4_acl"));
        assert!(!all.keeps(b"userx"));
        let acls_only = Policy::wanted(true, false);
        assert!(acls_only.keeps(b"system.posix_acl_access"));
        assert!(!acls_only.keeps(b"user.a"));
        assert!(Policy::wanted(true, true).is_none());
        let nonroot = Policy {
            trusted: false,
            security: false,
            ..all
        };
        assert_eq!(
            all.missing_in(&nonroot),
            ["trusted.*", "security.* (file capabilities)"]
        );
        assert!(!all.and(nonroot).keeps(b"trusted.a"));
    }

    #[test]
    fn sums_tell_sets_apart_and_none_is_zero() {
        assert_eq!(Xattrs::default().sum(), Sum::default());
        let a = Xattrs(vec![x("user.a", b"1")]);
        let b = Xattrs(vec![x("user.a", b"2")]);
        let c = Xattrs(vec![x("user.a", b""), x("user.b", b"")]);
        assert_ne!(a.sum(), Sum::default());
        assert_ne!(a.sum(), b.sum());
        // Names and values are length-prefixed: moving a byte between them changes the sum.
        let d = Xattrs(vec![x("user.a1", b"")]);
        let e = Xattrs(vec![x("user.a", b"1")]);
        assert_ne!(d.sum(), e.sum());
        assert_ne!(c.sum(), a.sum());
        assert_eq!(a.sum(), a.clone().sum());
    }

    #[test]
    fn a_hostile_set_is_refused() {
        let p = Policy::wanted(false, false);
        assert!(
            Xattrs(vec![x("user.a", b"1"), x("user.b", b"")])
                .check(&p)
                .is_ok()
        );
        let bad = [
            Xattrs(vec![x("user.b", b""), x("user.a", b"")]),
            Xattrs(vec![x("user.a", b""), x("user.a", b"")]),
            Xattrs(vec![x("system.nfs4_acl", b"")]),
            Xattrs(vec![x("", b"")]),
            Xattrs(vec![x("user.a\0b", b"")]),
            Xattrs(vec![x(&format!("user.{}", "n".repeat(300)), b"")]),
            Xattrs(vec![x("user.a", &vec![0; MAX_VALUE + 1])]),
            Xattrs(
                (0..=MAX_COUNT)
                    .map(|i| x(&format!("user.{i:05}"), b""))
                    .collect(),
            ),
            Xattrs(
                (0..9)
                    .map(|i| x(&format!("user.{i}"), &vec![0; MAX_VALUE]))
                    .collect(),
            ),
        ];
        for b in bad {
            assert!(b.check(&p).is_err(), "{:?}", b.0.first().map(|x| &x.name));
        }
        let user_only = Policy {
            user: true,
            ..Policy::none()
        };
        let e = Xattrs(vec![x("security.capability", b"")])
            .check(&user_only)
            .unwrap_err();
        assert!(e.contains("outside what this session mirrors"), "{e}");
    }

    #[test]
    fn attributes_are_read_and_set_exactly_on_a_real_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(dir.path().join("f")).unwrap();
        use std::os::fd::AsFd;
        let p = Policy::wanted(false, false);
        if !probe(f.as_fd()).user {
            eprintln!("this filesystem keeps no user attributes; skipped");
            return;
        }
        let want = Xattrs(vec![x("user.a", b"one"), x("user.big", &vec![7; 3000])]);
        apply(At::Fd(f.as_fd()), &want, &p).unwrap();
        assert_eq!(read(At::Fd(f.as_fd()), &p).unwrap(), want);
        let d = rustix::fs::open(
            dir.path(),
            rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::RDONLY,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        let by_name = At::Name(d.as_fd(), b"f");
        assert_eq!(read(by_name, &p).unwrap(), want);
        // A kernel without listxattrat: the path through /proc says the same.
        NO_LISTXATTRAT.store(true, std::sync::atomic::Ordering::Relaxed);
        let through_proc = read(by_name, &p);
        NO_LISTXATTRAT.store(false, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(through_proc.unwrap(), want);
        // Only `user.a` is wanted now: `user.big` goes, `user.a` changes.
        let next = Xattrs(vec![x("user.a", b"two")]);
        apply(by_name, &next, &p).unwrap();
        assert_eq!(read(At::Fd(f.as_fd()), &p).unwrap(), next);
        // A policy without user attributes neither sees nor removes them.
        let acls = Policy::wanted(true, false);
        assert!(read(by_name, &acls).unwrap().is_empty());
        apply(by_name, &Xattrs::default(), &acls).unwrap();
        assert_eq!(read(by_name, &p).unwrap(), next);
    }
}
