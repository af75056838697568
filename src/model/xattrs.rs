//! The extended attributes (and so the ACLs, capabilities and SELinux labels) an entry
//! carries, as values: the set, its digest, the bounds a peer's set must keep, and the
//! namespaces a session mirrors. Reading and setting them is `tree::xattr`.

use serde::{Deserialize, Serialize};

/// Digest of an entry's kept attributes; all zeros when it has none.
pub type Sum = [u8; 16];

/// Longest attribute name Linux accepts (`XATTR_NAME_MAX`).
pub const MAX_NAME: usize = 255;
/// Largest attribute value Linux accepts (`XATTR_SIZE_MAX`).
pub const MAX_VALUE: usize = 64 * 1024;
/// Most attributes one entry may carry on the wire.
pub const MAX_COUNT: usize = 1024;
/// Most bytes of names and values one entry may carry: well inside a frame.
pub const MAX_TOTAL: usize = 512 * 1024;

/// The attribute namespaces a session mirrors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// `user.*`
    pub user: bool,
    /// `trusted.*` (only root can read or set them)
    pub trusted: bool,
    /// `security.*` other than `security.selinux`: capabilities, IMA/EVM.
    pub security: bool,
    /// `security.selinux`, mirrored only when both sides run SELinux.
    pub selinux: bool,
    /// `system.posix_acl_access` and `system.posix_acl_default`.
    pub acls: bool,
}

impl Policy {
    /// Nothing: attributes are left alone (an older peer, or both flags given).
    pub(crate) fn none() -> Policy {
        Policy::default()
    }

    pub(crate) fn is_none(&self) -> bool {
        *self == Policy::none()
    }

    /// The namespaces both keep.
    pub(crate) fn and(self, o: Policy) -> Policy {
        Policy {
            user: self.user && o.user,
            trusted: self.trusted && o.trusted,
            security: self.security && o.security,
            selinux: self.selinux && o.selinux,
            acls: self.acls && o.acls,
        }
    }

    /// Whether the attribute `name` is mirrored.
    pub(crate) fn keeps(&self, name: &[u8]) -> bool {
        if name == b"security.selinux" {
            self.selinux
        } else if name == b"system.posix_acl_access" || name == b"system.posix_acl_default" {
            self.acls
        } else if name.starts_with(b"user.") {
            self.user
        } else if name.starts_with(b"trusted.") {
            self.trusted
        } else if name.starts_with(b"security.") {
            self.security
        } else {
            false
        }
    }

    /// The namespaces `self` asks for that `can` lacks, for a one-line notice.
    pub(crate) fn missing_in(&self, can: &Policy) -> Vec<&'static str> {
        let mut v = Vec::new();
        let mut miss = |want: bool, have: bool, what: &'static str| {
            if want && !have {
                v.push(what);
            }
        };
        miss(self.user, can.user, "user.*");
        miss(self.trusted, can.trusted, "trusted.*");
        miss(
            self.security,
            can.security,
            "security.* (file capabilities)",
        );
        miss(self.selinux, can.selinux, "security.selinux");
        miss(self.acls, can.acls, "POSIX ACLs");
        v
    }
}

/// An entry's kept attributes: (name, value) pairs sorted by name, names unique.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattrs(pub Vec<Xattr>);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    #[serde(with = "crate::model::bytes")]
    pub name: Vec<u8>,
    #[serde(with = "crate::model::bytes")]
    pub value: Vec<u8>,
}

impl Xattrs {
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The digest the quick check compares; zeros for no attributes.
    pub(crate) fn sum(&self) -> Sum {
        if self.0.is_empty() {
            return Sum::default();
        }
        let mut h = blake3::Hasher::new();
        h.update(&(self.0.len() as u64).to_le_bytes());
        for x in &self.0 {
            h.update(&(x.name.len() as u64).to_le_bytes());
            h.update(&x.name);
            h.update(&(x.value.len() as u64).to_le_bytes());
            h.update(&x.value);
        }
        let mut s = Sum::default();
        s.copy_from_slice(&h.finalize().as_bytes()[..16]);
        // A real set never sums to "none".
        if s == Sum::default() {
            s[0] = 1;
        }
        s
    }

    /// Bytes of names and values.
    pub(crate) fn bytes(&self) -> usize {
        self.0.iter().map(|x| x.name.len() + x.value.len()).sum()
    }

    /// Checks a set that came off the wire against the OS's bounds and `policy`: a peer
    /// may set only the namespaces the session agreed on.
    pub(crate) fn check(&self, policy: &Policy) -> Result<(), String> {
        if self.0.len() > MAX_COUNT {
            return Err(format!(
                "{} extended attributes on one entry (at most {MAX_COUNT})",
                self.0.len()
            ));
        }
        if self.bytes() > MAX_TOTAL {
            return Err(format!(
                "{} bytes of extended attributes on one entry (at most {MAX_TOTAL})",
                self.bytes()
            ));
        }
        for (i, x) in self.0.iter().enumerate() {
            let shown = String::from_utf8_lossy(&x.name);
            if x.name.is_empty() || x.name.len() > MAX_NAME || x.name.contains(&0) {
                return Err(format!("bad extended attribute name {shown:?}"));
            }
            if x.value.len() > MAX_VALUE {
                return Err(format!(
                    "extended attribute {shown} of {} bytes (at most {MAX_VALUE})",
                    x.value.len()
                ));
            }
            if !policy.keeps(&x.name) {
                return Err(format!(
                    "extended attribute {shown} is outside what this session mirrors"
                ));
            }
            if i > 0 && self.0[i - 1].name >= x.name {
                return Err("extended attributes out of order".into());
            }
        }
        Ok(())
    }
}
