//! The kept losers of conflicts, under `ROOT/.hubsync/conflicts/`, named
//! `<path>.conflict-<YYYYmmddTHHMMSSZ>-<replica>`: listing them, putting one back,
//! and removing those older than the retention.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::apply::conflict_time;
use crate::exclude::STATE_DIR;
use crate::version::Mtime;

const MARK: &str = ".conflict-";

/// One kept copy.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Copy {
    /// Where the copy is.
    pub copy: PathBuf,
    /// The path it was at, relative to the root.
    pub path: String,
    /// The replica whose version it was.
    pub replica: String,
    /// When it was set aside (UTC, `YYYYmmddTHHMMSSZ`).
    pub time: String,
    pub size: u64,
    pub is_dir: bool,
}

pub fn conflicts_dir(root: &Path) -> PathBuf {
    root.join(STATE_DIR).join("conflicts")
}

/// Splits `name.conflict-20261204T163424Z-web2` into (`name`, time, `web2`).
pub fn parse_name(name: &str) -> Option<(&str, &str, &str)> {
    let at = name.rfind(MARK)?;
    let rest = &name[at + MARK.len()..];
    let (time, replica) = (rest.get(..16)?, rest.get(17..)?);
    let valid = time.len() == 16
        && time.as_bytes()[8] == b'T'
        && time.ends_with('Z')
        && time[..8]
            .bytes()
            .chain(time[9..15].bytes())
            .all(|b| b.is_ascii_digit())
        && rest.as_bytes().get(16) == Some(&b'-');
    valid.then_some((&name[..at], time, replica))
}

/// Unix time of a `YYYYmmddTHHMMSSZ` stamp.
fn stamp_secs(t: &str) -> Option<i64> {
    let n = |r: std::ops::Range<usize>| t.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, s) = (
        n(0..4)?,
        n(4..6)?,
        n(6..8)?,
        n(9..11)?,
        n(11..13)?,
        n(13..15)?,
    );
    // Days from civil (inverse of version::civil_from_unix).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + s)
}

/// Every kept copy under `root`, oldest first.
pub fn list(root: &Path) -> Result<Vec<Copy>> {
    let base = conflicts_dir(root);
    let mut out = Vec::new();
    if !base.exists() {
        return Ok(out);
    }
    let mut walk = walkdir::WalkDir::new(&base).min_depth(1).into_iter();
    while let Some(e) = walk.next() {
        let e = e.with_context(|| format!("cannot read {}", base.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((orig, time, replica)) = parse_name(&name) else {
            continue;
        };
        let is_dir = e.file_type().is_dir();
        if is_dir {
            walk.skip_current_dir();
        }
        let rel_parent = e
            .path()
            .parent()
            .and_then(|p| p.strip_prefix(&base).ok())
            .map(Path::to_path_buf)
            .unwrap_or_default();
        out.push(Copy {
            copy: e.path().to_path_buf(),
            path: rel_parent.join(orig).display().to_string(),
            replica: replica.to_string(),
            time: time.to_string(),
            size: e.metadata().map(|m| m.len()).unwrap_or(0),
            is_dir,
        });
    }
    out.sort_by(|a, b| a.time.cmp(&b.time).then(a.path.cmp(&b.path)));
    Ok(out)
}

pub fn print(list: &[Copy], json: bool) {
    if json {
        let _ = serde_json::to_writer_pretty(std::io::stdout().lock(), list);
        println!();
        return;
    }
    if list.is_empty() {
        println!("no conflict copies are kept");
        return;
    }
    for c in list {
        let t = stamp_secs(&c.time).map_or(c.time.clone(), |s| Mtime::new(s, 0).to_string());
        println!(
            "{t}  {:>10}  {}  (version of {})\n    kept at {}",
            if c.is_dir {
                "dir".to_string()
            } else {
                crate::util::Bytes(c.size).to_string()
            },
            c.path,
            c.replica,
            c.copy.display()
        );
    }
    println!(
        "{} conflict copies; restore one with: hubsync conflicts --restore COPY",
        list.len()
    );
}

/// Puts `copy` back at its path in `root`. Whatever is there now is kept as a
/// conflict copy in turn, so restoring loses nothing either.
pub fn restore(root: &Path, copy: &Path) -> Result<String> {
    let base = conflicts_dir(root);
    let copy = crate::config::absolute(copy)?;
    let rel = copy.strip_prefix(&base).map_err(|_| {
        anyhow::anyhow!(
            "{} is not a conflict copy under {}",
            copy.display(),
            base.display()
        )
    })?;
    let name = copy
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let Some((orig, _, _)) = parse_name(&name) else {
        bail!(
            "{} is not named like a conflict copy (NAME.conflict-TIME-REPLICA)",
            copy.display()
        );
    };
    let target_rel = rel.parent().unwrap_or(Path::new("")).join(orig);
    crate::relpath::RelPath::from_path(&target_rel)
        .map_err(|e| anyhow::anyhow!("{}: {e}", target_rel.display()))?;
    let target = root.join(&target_rel);
    let mut note = String::new();
    if std::fs::symlink_metadata(&target).is_ok() {
        let aside = base
            .join(rel.parent().unwrap_or(Path::new("")))
            .join(format!(
                "{orig}{MARK}{}-replaced-by-restore",
                conflict_time(Mtime::now())
            ));
        std::fs::rename(&target, &aside)
            .with_context(|| format!("cannot move {} aside", target.display()))?;
        note = format!(
            "; the version that was there is kept at {}",
            aside.display()
        );
    }
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::rename(&copy, &target)
        .with_context(|| format!("cannot move {} to {}", copy.display(), target.display()))?;
    Ok(format!(
        "restored {}{note}; the next sync spreads it to the other replicas",
        target.display()
    ))
}

/// Removes copies set aside more than `retention` ago; returns how many.
pub fn prune(root: &Path, retention: Duration) -> usize {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let mut removed = 0;
    for c in list(root).unwrap_or_default() {
        let Some(t) = stamp_secs(&c.time) else {
            continue;
        };
        if now - t > retention.as_secs() as i64 {
            let r = if c.is_dir {
                std::fs::remove_dir_all(&c.copy)
            } else {
                std::fs::remove_file(&c.copy)
            };
            removed += usize::from(r.is_ok());
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        assert_eq!(
            parse_name("start.txt.conflict-20261204T163424Z-web-2"),
            Some(("start.txt", "20261204T163424Z", "web-2"))
        );
        assert_eq!(parse_name("start.txt"), None);
        assert_eq!(parse_name("a.conflict-2026120XT163424Z-x"), None);
        assert_eq!(stamp_secs("20261204T151743Z"), Some(1_796_397_463));
        assert_eq!(stamp_secs("19700101T000000Z"), Some(0));
    }

    #[test]
    fn list_restore_and_prune() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let cdir = conflicts_dir(root).join("wiki");
        std::fs::create_dir_all(&cdir).unwrap();
        std::fs::write(cdir.join("p.txt.conflict-20261204T163424Z-hub"), "alice").unwrap();
        std::fs::write(cdir.join("p.txt.conflict-20000101T000000Z-web2"), "ancient").unwrap();
        std::fs::create_dir_all(root.join("wiki")).unwrap();
        std::fs::write(root.join("wiki/p.txt"), "bob").unwrap();
        let l = list(root).unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[1].path, "wiki/p.txt");
        assert_eq!(l[1].replica, "hub");
        let msg = restore(root, &l[1].copy).unwrap();
        assert!(msg.contains("kept at"), "{msg}");
        assert_eq!(
            std::fs::read_to_string(root.join("wiki/p.txt")).unwrap(),
            "alice"
        );
        let after = list(root).unwrap();
        assert!(
            after
                .iter()
                .any(|c| std::fs::read_to_string(&c.copy).ok().as_deref() == Some("bob"))
        );
        assert_eq!(prune(root, Duration::from_secs(365 * 86_400)), 1);
        assert!(
            list(root)
                .unwrap()
                .iter()
                .all(|c| !c.time.starts_with("2000"))
        );
        assert!(restore(root, &root.join("wiki/p.txt")).is_err());
    }
}
