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
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Encode, Decode)]
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
    /// Where a replaced conflict loser matching `when` is also written as an old
    /// revision, unless something is there already (`{rev}`: its mtime in seconds;
    /// gzip-compressed when the name ends in `.gz`). With `loser_changelog` and
    /// `loser_line`: the line (`{rev}`, `{id}`, and `{id:}` for the id with `:` for
    /// `/`) is inserted into that log, which must be sorted by leading number.
    #[serde(default)]
    pub loser_revision: Option<String>,
    #[serde(default)]
    pub loser_changelog: Option<String>,
    #[serde(default)]
    pub loser_line: Option<String>,
    /// The application's lock directory (as in bundles), held while the log is
    /// rewritten so that none of the application's own appends is lost.
    #[serde(default)]
    pub lock_dir: Option<String>,
}

/// A conflict loser that becomes an old revision with its line in a log.
#[derive(Clone, Debug)]
pub struct LoserRevision {
    revision: String,
    pub changelog: IdPattern,
    line: String,
    pub lock_dir: Option<RelPath>,
}

impl LoserRevision {
    /// The revision's path for `id` and `rev`.
    pub fn revision(&self, id: &[u8], rev: i64) -> Option<RelPath> {
        IdPattern::parse(&self.revision.replace("{rev}", &rev.to_string()))
            .ok()?
            .fill(id)
    }

    pub fn compressed(&self) -> bool {
        self.revision.ends_with(".gz")
    }

    /// The log line for `id` and `rev`, with its newline.
    pub fn line(&self, id: &[u8], rev: i64) -> Vec<u8> {
        let id = String::from_utf8_lossy(id);
        let mut l = (self.line.replace("{rev}", &rev.to_string()))
            .replace("{id:}", &id.replace('/', ":"))
            .replace("{id}", &id)
            .into_bytes();
        l.push(b'\n');
        l
    }
}

/// `line` inserted into `log` (lines sorted by their leading number) after every
/// line whose number is not greater; `None` if the last line's number is not
/// greater than the new one's, because the last line names the current version.
pub fn insert_by_leading_number(log: &[u8], line: &[u8]) -> Option<Vec<u8>> {
    let lead = |l: &[u8]| -> Option<i64> {
        let n = l.iter().take_while(|b| b.is_ascii_digit()).count();
        std::str::from_utf8(&l[..n]).ok()?.parse().ok()
    };
    let new = lead(line)?;
    let lines: Vec<&[u8]> = log.split_inclusive(|&b| b == b'\n').collect();
    if lines
        .last()
        .and_then(|l| lead(l))
        .is_none_or(|last| last <= new)
    {
        return None;
    }
    let at = lines
        .iter()
        .position(|l| lead(l).is_some_and(|n| n > new))
        .unwrap_or(lines.len());
    let mut out = Vec::with_capacity(log.len() + line.len());
    for l in &lines[..at] {
        out.extend_from_slice(l);
    }
    out.extend_from_slice(line);
    for l in &lines[at..] {
        out.extend_from_slice(l);
    }
    Some(out)
}

/// A checked `after_install` rule.
#[derive(Clone, Debug)]
pub struct AfterInstall {
    pub when: IdPattern,
    pub remove: Vec<IdPattern>,
    pub remove_newer: globset::GlobSet,
    /// The literal directories the globs start in (where to look).
    pub newer_roots: Vec<RelPath>,
    pub loser: Option<LoserRevision>,
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
        let loser = match (
            &self.loser_revision,
            &self.loser_changelog,
            &self.loser_line,
        ) {
            (None, None, None) => None,
            (Some(revision), Some(changelog), Some(line)) => {
                if !revision.contains("{rev}") {
                    return Err(format!("loser_revision {revision:?} has no {{rev}}"));
                }
                IdPattern::parse(&revision.replace("{rev}", "1"))
                    .map_err(|e| format!("loser_revision: {e}"))?;
                if !line.starts_with("{rev}") || line.contains('\n') {
                    return Err(format!(
                        "loser_line {line:?} must start with {{rev}} and be one line"
                    ));
                }
                let lock_dir = (self.lock_dir.as_ref())
                    .map(|d| {
                        RelPath::new(d.as_bytes())
                            .map_err(|_| format!("lock_dir {d:?} must be inside the root"))
                    })
                    .transpose()?;
                Some(LoserRevision {
                    revision: revision.clone(),
                    changelog: IdPattern::parse(changelog)?,
                    line: line.clone(),
                    lock_dir,
                })
            }
            _ => {
                return Err("loser_revision, loser_changelog and loser_line go together".into());
            }
        };
        Ok(AfterInstall {
            when,
            remove,
            remove_newer,
            newer_roots,
            loser,
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
            ..Default::default()
        };
        assert!(a.compile().unwrap_err().contains("start with a directory"));
    }

    #[test]
    fn after_install_walks_only_below_the_glob_roots() {
        let a = AfterInstallRule {
            when: "pages/{id}.txt".into(),
            remove: vec!["meta/{id}.indexed".into()],
            remove_newer: vec!["cache/**".into()],
            ..Default::default()
        }
        .compile()
        .unwrap();
        assert_eq!(a.newer_roots, vec![rp("cache")]);
        assert!(a.remove_newer.is_match("cache/a/b.xhtml"));
        assert!(!a.remove_newer.is_match("pages/cache/x"));
    }

    #[test]
    fn a_losers_line_goes_in_date_order_and_never_last() {
        let log = b"10\ta\n20\tb\n30\tc\n";
        let table: &[(&[u8], Option<&[u8]>)] = &[
            (b"15\tx\n", Some(b"10\ta\n15\tx\n20\tb\n30\tc\n")),
            (b"5\tx\n", Some(b"5\tx\n10\ta\n20\tb\n30\tc\n")),
            (b"20\tx\n", Some(b"10\ta\n20\tb\n20\tx\n30\tc\n")),
            // At or after the last line it would become the current version.
            (b"30\tx\n", None),
            (b"40\tx\n", None),
            (b"junk\n", None),
        ];
        for (line, want) in table {
            let got = insert_by_leading_number(log, line);
            assert_eq!(got.as_deref(), *want, "{}", String::from_utf8_lossy(line));
        }
        assert_eq!(insert_by_leading_number(b"", b"1\tx\n"), None);
    }

    #[test]
    fn a_loser_revision_is_named_by_id_and_date() {
        let mut a = AfterInstallRule {
            when: "pages/{id}.txt".into(),
            loser_revision: Some("attic/{id}.{rev}.txt.gz".into()),
            loser_changelog: Some("meta/{id}.changes".into()),
            loser_line: Some("{rev}\t127.0.0.1\tE\t{id:}\t\texternal edit\t\t".into()),
            lock_dir: Some("locks".into()),
            ..Default::default()
        };
        let l = a.compile().unwrap().loser.unwrap();
        assert_eq!(l.revision(b"ns/p", 42), Some(rp("attic/ns/p.42.txt.gz")));
        assert!(l.compressed());
        assert_eq!(
            l.line(b"ns/p", 42),
            b"42\t127.0.0.1\tE\tns:p\t\texternal edit\t\t\n"
        );
        assert_eq!(l.changelog.fill(b"ns/p"), Some(rp("meta/ns/p.changes")));
        a.loser_line = None;
        assert!(a.compile().unwrap_err().contains("go together"));
        a.loser_line = Some("x {rev}".into());
        assert!(a.compile().unwrap_err().contains("start with {rev}"));
        a.loser_line = Some("{rev}".into());
        a.loser_revision = Some("attic/{id}.txt".into());
        assert!(a.compile().unwrap_err().contains("no {rev}"));
    }

    #[test]
    fn every_profile_parses() {
        for (name, text) in PROFILES {
            crate::config::check_profile(name, text).unwrap();
        }
    }
}
