//! Which paths are never synchronized.
//!
//! Patterns follow the convention admins know from rsync and gitignore: a pattern
//! without `/` matches a name at any depth (`*.indexed`), a pattern with `/` is anchored
//! at the root (`data/cache/**`, a leading `/` is allowed), `*` stays within one
//! component and `**` crosses them. A path is excluded when it or any of its ancestors
//! matches, so `data/cache` alone excludes that whole subtree.
//!
//! hubsync's own state directory and its temporary files are always excluded: they are
//! per-replica and must never travel.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{Context, Result, bail};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use crate::relpath::RelPath;

/// Name of the per-replica state directory at the top of each root.
pub const STATE_DIR: &str = ".hubsync";
const TEMP_PREFIX: &[u8] = b".hubsync.";
const TEMP_SUFFIX: &[u8] = b".tmp";

/// A temp file name in a destination directory: hidden (DokuWiki's `search()` skips
/// names starting with `.`), recognizable so a crashed run's leftovers can be removed,
/// and short enough for any NAME_MAX whatever the final name is.
pub fn temp_name() -> String {
    let mut b = [0u8; 8];
    crate::util::random_bytes(&mut b);
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(".hubsync.{hex}.tmp")
}

/// True for names made by [`temp_name`].
pub fn is_temp_name(name: &[u8]) -> bool {
    name.len() == TEMP_PREFIX.len() + 16 + TEMP_SUFFIX.len()
        && name.starts_with(TEMP_PREFIX)
        && name.ends_with(TEMP_SUFFIX)
        && name[TEMP_PREFIX.len()..TEMP_PREFIX.len() + 16]
            .iter()
            .all(u8::is_ascii_hexdigit)
}

/// A compiled set of exclude patterns.
#[derive(Clone, Debug)]
pub struct Excludes {
    anchored: GlobSet,
    basename: GlobSet,
    patterns: Vec<String>,
}

impl Default for Excludes {
    fn default() -> Self {
        Excludes::new(&[]).expect("empty pattern list compiles")
    }
}

impl Excludes {
    /// Compiles `patterns`; a bad glob is an error naming it.
    pub fn new(patterns: &[String]) -> Result<Excludes> {
        let mut anchored = GlobSetBuilder::new();
        let mut basename = GlobSetBuilder::new();
        for p in patterns {
            let trimmed = p.trim_start_matches('/');
            let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
            if trimmed.is_empty() {
                bail!("exclude pattern {p:?} is empty");
            }
            let glob = GlobBuilder::new(trimmed)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .with_context(|| format!("exclude pattern {p:?} is not a valid glob"))?;
            if p.contains('/') {
                anchored.add(glob);
            } else {
                basename.add(glob);
            }
        }
        Ok(Excludes {
            anchored: anchored.build()?,
            basename: basename.build()?,
            patterns: patterns.to_vec(),
        })
    }

    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// Whether `path` itself matches (the walk prunes excluded directories, so their
    /// contents are never asked about).
    pub fn matches(&self, path: &RelPath) -> bool {
        self.matches_bytes(path.as_bytes())
    }

    fn matches_bytes(&self, path: &[u8]) -> bool {
        if is_internal_bytes(path) {
            return true;
        }
        if self.patterns.is_empty() {
            return false;
        }
        let name = path.rsplit(|&b| b == b'/').next().unwrap_or(path);
        (!self.basename.is_empty() && self.basename.is_match(Path::new(OsStr::from_bytes(name))))
            || (!self.anchored.is_empty()
                && self.anchored.is_match(Path::new(OsStr::from_bytes(path))))
    }

    /// Whether `path` or any of its ancestors matches: for paths that did not come
    /// from our own walk.
    pub fn excludes(&self, path: &RelPath) -> bool {
        let bytes = path.as_bytes();
        if self.patterns.is_empty() {
            return is_internal_bytes(bytes);
        }
        // The path itself, then each ancestor (every prefix ending before a '/').
        self.matches_bytes(bytes)
            || bytes
                .iter()
                .enumerate()
                .any(|(i, &b)| b == b'/' && self.matches_bytes(&bytes[..i]))
    }
}

/// hubsync's own files: the top-level state directory and temp files anywhere.
pub fn is_internal(path: &RelPath) -> bool {
    is_internal_bytes(path.as_bytes())
}

fn is_internal_bytes(path: &[u8]) -> bool {
    let top = path.split(|&b| b == b'/').next().unwrap_or(path);
    let name = path.rsplit(|&b| b == b'/').next().unwrap_or(path);
    top == STATE_DIR.as_bytes() || is_temp_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(p: &[&str]) -> Excludes {
        Excludes::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }
    fn rp(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn basename_patterns_match_at_any_depth() {
        let e = ex(&["*.indexed", "_tmp"]);
        assert!(e.excludes(&rp("meta/wiki/page.indexed")));
        assert!(e.excludes(&rp("x.indexed")));
        assert!(e.excludes(&rp("a/_tmp/b")));
        assert!(!e.excludes(&rp("meta/wiki/page.meta")));
    }

    #[test]
    fn anchored_patterns() {
        let e = ex(&["data/cache/**", "/tmp", "log/"]);
        assert!(e.excludes(&rp("data/cache/a/b.xhtml")));
        assert!(!e.excludes(&rp("data/cache")));
        assert!(!e.excludes(&rp("x/data/cache/a")));
        assert!(e.excludes(&rp("tmp/x")));
        assert!(e.excludes(&rp("log")));
        assert!(e.excludes(&rp("log/error/x.log")));
        assert!(!e.excludes(&rp("a/log")));
        let star = ex(&["pages/*.txt"]);
        assert!(star.excludes(&rp("pages/a.txt")));
        assert!(!star.excludes(&rp("pages/ns/a.txt")), "* must not cross /");
    }

    #[test]
    fn internal_paths_always_excluded() {
        let e = Excludes::default();
        assert!(e.excludes(&rp(".hubsync/lock")));
        assert!(e.excludes(&rp("a/.hubsync.0123456789abcdef.tmp")));
        assert!(!e.excludes(&rp("a/.hubsync")));
        assert!(!e.excludes(&rp("a/.hubsync.notatemp.tmp")));
        assert!(is_temp_name(temp_name().as_bytes()));
    }

    #[test]
    fn bad_glob_is_an_error() {
        let err = Excludes::new(&["a/[".to_string()]).unwrap_err();
        assert!(format!("{err:#}").contains("a/["));
    }
}
