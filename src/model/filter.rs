//! `--exclude` patterns, rsync-style: a pattern without `/` matches a name at any depth; a
//! pattern with `/` matches the path from the root (a leading `/` is allowed); a trailing `/`
//! matches directories only. `*` stays within one name, `**` crosses directories. An
//! excluded directory is not descended into, and excluded entries are neither sent nor
//! deleted on the standby.

use crate::model::path::RelPath;
use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

#[derive(Debug, thiserror::Error)]
#[error("bad --exclude pattern {pattern:?}: {reason}")]
pub(crate) struct FilterError {
    pub pattern: String,
    pub reason: String,
}

#[derive(Clone, Default)]
pub(crate) struct Filter {
    patterns: Vec<String>,
    names: GlobSet,
    paths: GlobSet,
    dir_names: GlobSet,
    dir_paths: GlobSet,
}

impl Filter {
    pub(crate) fn new(patterns: &[String]) -> Result<Filter, FilterError> {
        let mut sets = [
            GlobSetBuilder::new(),
            GlobSetBuilder::new(),
            GlobSetBuilder::new(),
            GlobSetBuilder::new(),
        ];
        for pat in patterns {
            let err = |reason: String| FilterError {
                pattern: pat.clone(),
                reason,
            };
            let (body, dir_only) = match pat.strip_suffix('/') {
                Some(b) => (b, true),
                None => (pat.as_str(), false),
            };
            let anchored = body.contains('/');
            let body = body.strip_prefix('/').unwrap_or(body);
            if body.is_empty() {
                return Err(err("empty pattern".into()));
            }
            let glob: Glob = GlobBuilder::new(body)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| err(e.kind().to_string()))?;
            sets[(dir_only as usize) * 2 + anchored as usize].add(glob);
        }
        let [names, paths, dir_names, dir_paths] =
            sets.map(|b| b.build().expect("globs already validated"));
        Ok(Filter {
            patterns: patterns.to_vec(),
            names,
            paths,
            dir_names,
            dir_paths,
        })
    }

    /// Whether `path` (a directory when `is_dir`) is excluded.
    pub(crate) fn excludes(&self, path: &RelPath, is_dir: bool) -> bool {
        if self.patterns.is_empty() || path.is_root() {
            return false;
        }
        let full = OsStr::from_bytes(path.as_bytes());
        let name = OsStr::from_bytes(path.name());
        self.names.is_match(name)
            || self.paths.is_match(full)
            || (is_dir && (self.dir_names.is_match(name) || self.dir_paths.is_match(full)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(p: &[&str]) -> Filter {
        Filter::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }
    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn name_patterns_match_at_any_depth() {
        let flt = f(&["*.tmp"]);
        assert!(flt.excludes(&p("a.tmp"), false));
        assert!(flt.excludes(&p("x/y/a.tmp"), false));
        assert!(!flt.excludes(&p("a.tmpx"), false));
    }

    #[test]
    fn path_patterns_are_anchored() {
        let flt = f(&["/cache/*", "logs/**/*.gz"]);
        assert!(flt.excludes(&p("cache/a"), false));
        assert!(!flt.excludes(&p("x/cache/a"), false));
        assert!(
            !flt.excludes(&p("cache/a/b"), false),
            "* stays within one name"
        );
        assert!(flt.excludes(&p("logs/2024/01/x.gz"), false));
    }

    #[test]
    fn dir_only_patterns() {
        let flt = f(&["build/"]);
        assert!(flt.excludes(&p("x/build"), true));
        assert!(!flt.excludes(&p("x/build"), false));
    }

    #[test]
    fn non_utf8_names_match() {
        let flt = f(&["*.bak"]);
        assert!(flt.excludes(&RelPath::new(b"\xff\xfe.bak".to_vec()).unwrap(), false));
    }

    #[test]
    fn bad_patterns_are_named() {
        let e = Filter::new(&["a[".to_string()]).err().unwrap();
        assert!(e.to_string().contains("a["), "{e}");
        assert!(Filter::new(&["/".to_string()]).is_err());
    }
}
