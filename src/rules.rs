//! Rules for files that belong together, written in the config file (or brought in by
//! a profile such as `dokuwiki`): bundles whose leader decides for its followers,
//! install order, and what to invalidate after installing. Generic mechanisms; the
//! DokuWiki profile (`examples/dokuwiki.toml`) is one use of them.

use bincode::{Decode, Encode};
use serde::Deserialize;

use crate::pattern::IdPattern;
use crate::relpath::RelPath;

/// A bundle as written:
///
/// ```toml
/// [[bundle]]
/// leader = "meta/{id}.changes"
/// followers = ["pages/{id}.txt", "meta/{id}.meta"]
/// install_with_leader = ["pages/{id}.txt"]
/// lock_dir = "locks"
/// ```
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleRule {
    /// The file whose newest change decides (a changelog, merged by a `[[merge]]`
    /// rule so that every replica's entries survive).
    pub leader: String,
    /// When several replicas changed a follower differently, the replica whose
    /// leader changed last wins it, absence included; the others keep theirs as
    /// conflict copies.
    #[serde(default)]
    pub followers: Vec<String>,
    /// Installed on a receiver in the same step as the leader, just before it.
    #[serde(default)]
    pub install_with_leader: Vec<String>,
    /// While installing that step, hold the lock directory
    /// `LOCK_DIR/md5(absolute path of the leader)`, as DokuWiki's `io_lock` does.
    pub lock_dir: Option<String>,
}

/// A checked bundle.
#[derive(Clone, Debug, PartialEq)]
pub struct Bundle {
    pub leader: IdPattern,
    pub followers: Vec<IdPattern>,
    pub together: Vec<IdPattern>,
    pub lock_dir: Option<RelPath>,
}

impl BundleRule {
    pub fn compile(&self) -> Result<Bundle, String> {
        let leader = IdPattern::parse(&self.leader)?;
        let list = |v: &[String]| -> Result<Vec<IdPattern>, String> {
            v.iter().map(|p| IdPattern::parse(p)).collect()
        };
        let followers = list(&self.followers)?;
        let together = list(&self.install_with_leader)?;
        if followers.iter().chain(&together).any(|p| *p == leader) {
            return Err(format!(
                "{} is the leader; it cannot follow itself",
                self.leader
            ));
        }
        let lock_dir =
            match &self.lock_dir {
                None => None,
                Some(d) => Some(RelPath::new(d.as_bytes()).map_err(|e| {
                    format!("lock_dir {d:?} must be a directory inside the root: {e}")
                })?),
            };
        Ok(Bundle {
            leader,
            followers,
            together,
            lock_dir,
        })
    }
}

impl Bundle {
    /// The bundle id of `path` if it is this bundle's leader.
    pub fn leader_id<'p>(&self, path: &'p RelPath) -> Option<&'p [u8]> {
        self.leader.capture(path)
    }

    /// If `path` is installed with its leader: the leader's path, and `path`'s
    /// place in the step (the leader comes last).
    pub fn together_with(&self, path: &RelPath) -> Option<(RelPath, usize)> {
        self.together.iter().enumerate().find_map(|(i, p)| {
            let id = p.capture(path)?;
            Some((self.leader.fill(id)?, i))
        })
    }
}

/// What to remove on a replica after installing (or removing) files there, so
/// that caches which trust mtime order do not keep serving the old content:
///
/// ```toml
/// [[after_install]]
/// when = "pages/{id}.txt"
/// remove = ["meta/{id}.indexed"]
/// remove_newer = ["cache/**"]
/// ```
#[derive(Clone, Debug, PartialEq, Deserialize, Encode, Decode)]
#[serde(deny_unknown_fields)]
pub struct AfterInstallRule {
    pub when: String,
    /// Files named after the installed one (same `{id}`).
    #[serde(default)]
    pub remove: Vec<String>,
    /// Files matching these globs whose mtime is at or after the installed file's
    /// mtime minus one second (caches made from the version it replaced).
    #[serde(default)]
    pub remove_newer: Vec<String>,
}

/// A checked `after_install` rule.
#[derive(Clone, Debug)]
pub struct AfterInstall {
    pub when: IdPattern,
    pub remove: Vec<IdPattern>,
    pub remove_newer: globset::GlobSet,
    /// The literal directories the globs start in (where to look).
    pub newer_roots: Vec<RelPath>,
}

impl AfterInstallRule {
    pub fn compile(&self) -> Result<AfterInstall, String> {
        let when = IdPattern::parse(&self.when)?;
        let remove = (self.remove.iter())
            .map(|p| IdPattern::parse(p))
            .collect::<Result<_, _>>()?;
        let mut set = globset::GlobSetBuilder::new();
        let mut newer_roots = Vec::new();
        for g in &self.remove_newer {
            let glob = globset::GlobBuilder::new(g)
                .literal_separator(true)
                .build()
                .map_err(|e| format!("remove_newer glob {g:?}: {e}"))?;
            set.add(glob);
            // The directory part before the first wildcard: only that is walked.
            let fixed: Vec<&str> = g
                .split('/')
                .take_while(|c| !c.contains(['*', '?', '[', '{']))
                .collect();
            let root = RelPath::new(fixed.join("/").into_bytes()).map_err(|_| {
                format!(
                    "remove_newer glob {g:?} must start with a directory inside the root, like cache/**"
                )
            })?;
            newer_roots.push(root);
        }
        let remove_newer = set
            .build()
            .map_err(|e| format!("remove_newer globs: {e}"))?;
        Ok(AfterInstall {
            when,
            remove,
            remove_newer,
            newer_roots,
        })
    }
}

/// The built-in profiles, by name: config fragments in the config file's own
/// format (only the keys that describe an application's files).
pub const PROFILES: &[(&str, &str)] = &[("dokuwiki", include_str!("../examples/dokuwiki.toml"))];

#[cfg(test)]
mod tests {
    use super::*;

    fn rp(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn bundles_pair_files_by_their_id() {
        let b = BundleRule {
            leader: "meta/{id}.changes".into(),
            followers: vec!["pages/{id}.txt".into(), "meta/{id}.meta".into()],
            install_with_leader: vec!["pages/{id}.txt".into()],
            lock_dir: Some("locks".into()),
        }
        .compile()
        .unwrap();
        assert_eq!(b.leader_id(&rp("meta/ns/p.changes")), Some(&b"ns/p"[..]));
        assert_eq!(
            b.together_with(&rp("pages/ns/p.txt")),
            Some((rp("meta/ns/p.changes"), 0))
        );
        assert_eq!(b.together_with(&rp("meta/ns/p.meta")), None);
        assert_eq!(b.lock_dir, Some(rp("locks")));
    }

    #[test]
    fn bad_rules_say_why() {
        let mut r = BundleRule {
            leader: "meta/{id}.changes".into(),
            followers: vec!["meta/{id}.changes".into()],
            install_with_leader: vec![],
            lock_dir: None,
        };
        assert!(r.compile().unwrap_err().contains("cannot follow itself"));
        r.followers.clear();
        r.lock_dir = Some("../locks".into());
        assert!(r.compile().unwrap_err().contains("inside the root"));
        let a = AfterInstallRule {
            when: "pages/{id}.txt".into(),
            remove: vec![],
            remove_newer: vec!["**/*.xhtml".into()],
        };
        assert!(a.compile().unwrap_err().contains("start with a directory"));
    }

    #[test]
    fn after_install_walks_only_below_the_glob_roots() {
        let a = AfterInstallRule {
            when: "pages/{id}.txt".into(),
            remove: vec!["meta/{id}.indexed".into()],
            remove_newer: vec!["cache/**".into()],
        }
        .compile()
        .unwrap();
        assert_eq!(a.newer_roots, vec![rp("cache")]);
        assert!(a.remove_newer.is_match("cache/a/b.xhtml"));
        assert!(!a.remove_newer.is_match("pages/cache/x"));
    }

    #[test]
    fn every_profile_parses() {
        for (name, text) in PROFILES {
            crate::config::check_profile(name, text).unwrap();
        }
    }
}
