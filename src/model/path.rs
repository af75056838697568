//! Relative paths inside a mirrored tree.
//!
//! Every name that crosses the wire or reaches the filesystem on the standby is a
//! [`RelPath`]: validated once, at construction, so the rest of the code can rely on
//! "no absolute path, no `..`, no NUL, no empty component". Any other byte is allowed,
//! because the OS allows it (spaces, newlines, leading `-`, non-UTF-8).

use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest relative path accepted (Linux PATH_MAX).
pub(crate) const MAX_PATH: usize = 4096;
/// Longest single name accepted (Linux NAME_MAX).
pub const MAX_NAME: usize = 255;

/// The name reserved at the root of both trees: the standby's marker, state and temp area.
pub(crate) const RESERVED: &[u8] = b".hotsync";
/// Prefix of the temporary files hotsync creates beside their targets: the standby's own
/// area `.hotsync/tmp/` holds them, except in a directory on another filesystem than the
/// root (a mount point inside the tree), where a rename from the area cannot reach.
pub(crate) const TEMP_PREFIX: &[u8] = b".hotsync-tmp.";
/// Hex digits after [`TEMP_PREFIX`] in a temporary name.
pub(crate) const TEMP_DIGITS: usize = 16;

/// Why a byte string is not a valid relative path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is absolute")]
    Absolute,
    #[error("path has an empty component")]
    EmptyComponent,
    #[error("path has a `.` or `..` component")]
    DotComponent,
    #[error("path contains a NUL byte")]
    Nul,
    #[error("path is longer than {MAX_PATH} bytes")]
    TooLong,
    #[error("a name in the path is longer than {MAX_NAME} bytes")]
    NameTooLong,
}

/// A validated path relative to a tree root, `/`-separated. The empty path is the root.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelPath(Vec<u8>);

impl RelPath {
    /// The root of the tree.
    pub fn root() -> Self {
        RelPath(Vec::new())
    }

    /// Validates `bytes` as a relative path; the empty string is the root.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, PathError> {
        let bytes = bytes.into();
        validate(&bytes)?;
        Ok(RelPath(bytes))
    }

    /// `self/name`, where `name` is one component.
    pub(crate) fn join(&self, name: &[u8]) -> Result<Self, PathError> {
        if name.contains(&b'/') {
            return Err(PathError::EmptyComponent);
        }
        let mut v = Vec::with_capacity(self.0.len() + 1 + name.len());
        v.extend_from_slice(&self.0);
        if !v.is_empty() {
            v.push(b'/');
        }
        v.extend_from_slice(name);
        RelPath::new(v)
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub(crate) fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The parent directory (the root's parent is the root) and the last name.
    pub(crate) fn split(&self) -> (RelPath, &[u8]) {
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => (RelPath(self.0[..i].to_vec()), &self.0[i + 1..]),
            None => (RelPath::root(), &self.0[..]),
        }
    }

    /// The parent directory as a byte slice (empty for top-level names).
    pub(crate) fn parent_bytes(&self) -> &[u8] {
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => &self.0[..i],
            None => &[],
        }
    }

    pub(crate) fn name(&self) -> &[u8] {
        self.split().1
    }

    /// Number of components (0 for the root).
    pub(crate) fn depth(&self) -> usize {
        if self.0.is_empty() {
            0
        } else {
            1 + self.0.iter().filter(|&&b| b == b'/').count()
        }
    }

    /// True when `self` is `other` or lies beneath it.
    pub(crate) fn starts_with(&self, other: &RelPath) -> bool {
        other.0.is_empty()
            || (self.0.starts_with(&other.0)
                && (self.0.len() == other.0.len() || self.0[other.0.len()] == b'/'))
    }

    /// True for the reserved top-level name `.hotsync` and anything under it.
    pub(crate) fn is_reserved(&self) -> bool {
        self.0.split(|&b| b == b'/').next() == Some(RESERVED)
    }

    /// A printable form: UTF-8 as is, other bytes as `\xNN`, control characters escaped,
    /// so a name with a newline cannot forge a line in a report.
    pub(crate) fn display(&self) -> String {
        if self.0.is_empty() {
            return ".".into();
        }
        escape_bytes(&self.0)
    }
}

/// Why the entry `name` of the directory `dir` cannot be mirrored (`dir.join(name)`
/// failed), for a scan's error list, whose path is then `dir`: the entry's own path is not
/// a [`RelPath`]. Names the limit that is exceeded (a name's NAME_MAX, else the whole
/// path's PATH_MAX) with the lengths, the name (escaped; one over NAME_MAX shortened) and
/// what to do.
pub(crate) fn unmirrorable(dir: &RelPath, name: &[u8], err: &PathError) -> String {
    // A name within NAME_MAX is shown whole, so it can be found; a longer one recognisably.
    let shown = if name.len() > MAX_NAME {
        shorten(&escape_bytes(name), 100)
    } else {
        escape_bytes(name)
    };
    let path_len = dir.0.len() + usize::from(!dir.is_root()) + name.len();
    if name.len() > MAX_NAME {
        format!(
            "`{shown}` in this directory is not mirrored: its name is {} bytes, over the \
             {MAX_NAME}-byte limit on a name (NAME_MAX); rename it",
            name.len()
        )
    } else if path_len > MAX_PATH {
        format!(
            "`{shown}` in this directory is not mirrored: its path would be {path_len} bytes, \
             over the {MAX_PATH}-byte limit on a path (PATH_MAX), though no name in it is over \
             {MAX_NAME}; shorten the path (rename or move a directory above it)"
        )
    } else {
        format!("`{shown}` in this directory is not mirrored: {err}")
    }
}

/// `s` itself when it has at most `max` characters, else its start and end around `…`.
fn shorten(s: &str, max: usize) -> String {
    let n = s.chars().count();
    if n <= max {
        return s.to_string();
    }
    let head: String = s.chars().take(max * 3 / 4).collect();
    let tail: String = s.chars().skip(n - max / 4).collect();
    format!("{head}…{tail}")
}

/// True when `name` has exactly the form of hotsync's temporary files:
/// `.hotsync-tmp.` and 16 lowercase hex digits, nothing more. Only such names are reserved
/// (skipped on the primary and reported, removed from the standby as leftovers of a
/// kill); any other name, `.hotsync-tmp.x` included, is a user's and is mirrored.
pub(crate) fn is_temp_name(name: &[u8]) -> bool {
    name.len() == TEMP_PREFIX.len() + TEMP_DIGITS
        && name.starts_with(TEMP_PREFIX)
        && name[TEMP_PREFIX.len()..]
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

/// Escapes bytes for display: valid UTF-8 stays, control bytes and invalid bytes become
/// `\n`, `\t`, `\\` or `\xNN`.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

fn validate(bytes: &[u8]) -> Result<(), PathError> {
    if bytes.is_empty() {
        return Ok(());
    }
    if bytes.len() > MAX_PATH {
        return Err(PathError::TooLong);
    }
    if bytes[0] == b'/' {
        return Err(PathError::Absolute);
    }
    if bytes.contains(&0) {
        return Err(PathError::Nul);
    }
    for comp in bytes.split(|&b| b == b'/') {
        if comp.is_empty() {
            return Err(PathError::EmptyComponent);
        }
        if comp == b"." || comp == b".." {
            return Err(PathError::DotComponent);
        }
        if comp.len() > MAX_NAME {
            return Err(PathError::NameTooLong);
        }
    }
    Ok(())
}

impl Serialize for RelPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

/// Deserialising a path validates it, so no unchecked `RelPath` can come off the wire.
impl<'de> Deserialize<'de> for RelPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = crate::model::bytes::deserialize(d)?;
        RelPath::new(bytes).map_err(serde::de::Error::custom)
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.display())
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn only_the_exact_temp_form_is_reserved() {
        assert!(is_temp_name(b".hotsync-tmp.0123456789abcdef"));
        for user in [
            &b".hotsync-tmp."[..],
            b".hotsync-tmp.x",
            b".hotsync-tmp.0123456789abcdef.txt",
            b".hotsync-tmp.ABCDEF0123456789",
            b".hotsync-tmp.0123456789abcde",
            b".hotsync-tmp.0123456789abcdefa",
            b"x.hotsync-tmp.0123456789abcdef",
            b".hotsync",
        ] {
            assert!(!is_temp_name(user), "{}", escape_bytes(user));
        }
    }

    #[test]
    fn rejects_escapes() {
        assert_eq!(RelPath::new("/etc"), Err(PathError::Absolute));
        assert_eq!(RelPath::new("a/../b"), Err(PathError::DotComponent));
        assert_eq!(RelPath::new(".."), Err(PathError::DotComponent));
        assert_eq!(RelPath::new("a/./b"), Err(PathError::DotComponent));
        assert_eq!(RelPath::new("a//b"), Err(PathError::EmptyComponent));
        assert_eq!(RelPath::new("a/"), Err(PathError::EmptyComponent));
        assert_eq!(RelPath::new(b"a\0b".to_vec()), Err(PathError::Nul));
        assert_eq!(RelPath::new(vec![b'x'; 256]), Err(PathError::NameTooLong));
        assert!(RelPath::new(b"-rf/ sp\nace/\xff\xfe".to_vec()).is_ok());
        assert!(RelPath::new("...").is_ok());
    }

    #[test]
    fn split_join_and_prefix() {
        let p = RelPath::new("a/b/c").unwrap();
        let (parent, name) = p.split();
        assert_eq!(parent.as_bytes(), b"a/b");
        assert_eq!(name, b"c");
        assert_eq!(parent.join(b"c").unwrap(), p);
        assert_eq!(RelPath::root().join(b"x").unwrap().as_bytes(), b"x");
        assert!(p.starts_with(&RelPath::new("a/b").unwrap()));
        assert!(
            !RelPath::new("a/bc")
                .unwrap()
                .starts_with(&RelPath::new("a/b").unwrap())
        );
        assert!(p.starts_with(&RelPath::root()));
        assert_eq!(p.depth(), 3);
        assert!(RelPath::new(".hotsync/x").unwrap().is_reserved());
        assert!(!RelPath::new("a/.hotsync").unwrap().is_reserved());
        assert!(RelPath::root().join(b"a/b").is_err());
    }

    #[test]
    fn an_unmirrorable_entry_names_the_limit_it_exceeds_and_itself() {
        // A path over PATH_MAX whose every name is short: the path limit, not the name's.
        let dir = RelPath::new(vec![b"d".repeat(203); 20].join(&b'/')).unwrap();
        let name = b"leaf-of-the-tree\n.txt";
        let err = dir.join(name).unwrap_err();
        assert_eq!(err, PathError::TooLong);
        let m = unmirrorable(&dir, name, &err);
        assert!(
            m.contains("PATH_MAX")
                && m.contains("4101 bytes")
                && m.contains("4096-byte limit on a path")
                && m.contains("`leaf-of-the-tree\\n.txt`")
                && !m.contains("NAME_MAX")
                && !m.contains('\n'),
            "{m}"
        );
        // A name over NAME_MAX: the name's limit, with the name shortened but recognisable.
        let long: Vec<u8> = [&b"start-"[..], &[b'x'; 290], b"-end"].concat();
        let err = RelPath::new("a").unwrap().join(&long).unwrap_err();
        assert_eq!(err, PathError::NameTooLong);
        let m = unmirrorable(&RelPath::new("a").unwrap(), &long, &err);
        assert!(
            m.contains("NAME_MAX")
                && m.contains("300 bytes")
                && m.contains("`start-xxx")
                && m.contains("x-end`")
                && m.contains('…')
                && !m.contains("PATH_MAX")
                && m.len() < 250,
            "{m}"
        );
        // Both over: the name is what to fix first.
        let m = unmirrorable(&dir, &long, &PathError::TooLong);
        assert!(m.contains("NAME_MAX") && !m.contains("PATH_MAX"), "{m}");
    }

    #[test]
    fn display_escapes_controls_and_invalid_bytes() {
        let p = RelPath::new(b"a\nb\xffc\\".to_vec()).unwrap();
        assert_eq!(p.display(), "a\\nb\\xffc\\\\");
    }

    #[test]
    fn wire_decoding_validates() {
        let bad = postcard::to_stdvec(&b"../x".to_vec()).unwrap();
        assert!(postcard::from_bytes::<RelPath>(&bad).is_err());
        let good = postcard::to_stdvec(&RelPath::new("a/b").unwrap()).unwrap();
        assert_eq!(
            postcard::from_bytes::<RelPath>(&good).unwrap().as_bytes(),
            b"a/b"
        );
    }

    proptest! {
        #[test]
        fn valid_paths_round_trip(comps in prop::collection::vec(
            prop::collection::vec(1u8..=255, 1..20).prop_filter("no slash or dots", |c| {
                !c.contains(&b'/') && c != b"." && c != b".."
            }), 1..6))
        {
            let joined = comps.join(&b'/');
            let p = RelPath::new(joined.clone()).unwrap();
            prop_assert_eq!(p.as_bytes(), &joined[..]);
            let enc = postcard::to_stdvec(&p).unwrap();
            prop_assert_eq!(postcard::from_bytes::<RelPath>(&enc).unwrap(), p.clone());
            prop_assert_eq!(p.depth(), comps.len());
        }

        #[test]
        fn any_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(p) = RelPath::new(bytes) {
                prop_assert!(!p.as_bytes().starts_with(b"/"));
                prop_assert!(p.as_bytes().split(|&b| b == b'/').all(|c| p.is_root() || (!c.is_empty() && c != b".." && c != b".")));
            }
        }
    }
}
