//! Reading and rewriting a pair's agreed state, which is kept as a difference from
//! a replica's scan cache (see [`PairRecord`]). Pure functions over sorted lists.
//!
//! A run sees three versions of a replica's cache: the one loaded (`old`), the new
//! scan (`current`, with `changes` listing the paths where it differs from `old` and
//! what `old` held there), and the one saved at the end (`current` plus what the run
//! applied). The agreed version of a path is the record's entry if it has one, else
//! `old`'s; at the end it is rewritten against the saved cache, looking only at the
//! paths this run touched: everywhere else nothing moved.

use crate::archive::{CacheEntry, PairRecord};
use crate::relpath::RelPath;
use crate::version::Version;

/// Where an agreed state differs from a cache: path → agreed version (`None`:
/// agreed absent), sorted.
pub type Diff = Vec<(RelPath, Option<Version>)>;

fn find<'a, T>(list: &'a [T], path: &RelPath, key: impl Fn(&T) -> &RelPath) -> Option<&'a T> {
    list.binary_search_by(|e| key(e).cmp(path))
        .ok()
        .map(|i| &list[i])
}

/// A scan cache as it was loaded, seen through the new scan and its changes.
#[derive(Clone, Copy, Debug)]
pub struct OldCache<'a> {
    pub current: &'a [CacheEntry],
    /// Paths where `current` differs from the loaded cache, with the loaded version.
    pub changes: &'a [(RelPath, Option<Version>)],
}

impl<'a> OldCache<'a> {
    pub fn get(&self, path: &RelPath) -> Option<&'a Version> {
        match find(self.changes, path, |e| &e.0) {
            Some((_, old)) => old.as_ref(),
            None => find(self.current, path, |e| &e.path).map(|e| &e.version),
        }
    }
}

/// The agreed version of `path`, given a pair's difference from the old cache.
pub fn lookup<'a>(
    diff: &'a [(RelPath, Option<Version>)],
    old: &OldCache<'a>,
    path: &RelPath,
) -> Option<&'a Version> {
    match find(diff, path, |e| &e.0) {
        Some((_, v)) => v.as_ref(),
        None => old.get(path),
    }
}

fn same(a: Option<&Version>, b: Option<&Version>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => a.same(b),
        _ => false,
    }
}

/// The new difference of an agreed state from a new cache, looking at `touched`
/// paths only (sorted; duplicates allowed): elsewhere the agreed state and both
/// caches are the same, so nothing is listed.
pub fn rebase<'p, 'v>(
    touched: impl IntoIterator<Item = &'p RelPath>,
    agreed_after: impl Fn(&RelPath) -> Option<Version>,
    cache_after: impl Fn(&RelPath) -> Option<&'v Version>,
) -> Vec<(RelPath, Option<Version>)> {
    let mut out: Vec<(RelPath, Option<Version>)> = Vec::new();
    for p in touched {
        if out.last().is_some_and(|l| l.0 == *p) {
            continue;
        }
        let a = agreed_after(p);
        if !same(a.as_ref(), cache_after(p)) {
            out.push((p.clone(), a));
        }
    }
    out
}

/// Adjusts a record's file count for changes `(path, before, after)`.
pub fn count_files<'a>(
    files: u64,
    changes: impl IntoIterator<Item = (Option<&'a Version>, Option<&'a Version>)>,
) -> u64 {
    let mut n = files as i64;
    for (before, after) in changes {
        n -= i64::from(before.is_some_and(|v| !v.is_dir()));
        n += i64::from(after.is_some_and(|v| !v.is_dir()));
    }
    n.max(0) as u64
}

/// Merges sorted path lists into one sorted list without duplicates.
pub fn sorted_union<'a>(
    mut lists: Vec<Box<dyn Iterator<Item = &'a RelPath> + 'a>>,
) -> Vec<&'a RelPath> {
    let mut heads: Vec<Option<&'a RelPath>> = lists.iter_mut().map(|l| l.next()).collect();
    let mut out: Vec<&'a RelPath> = Vec::new();
    while let Some(min) = heads.iter().flatten().min().copied() {
        if out.last() != Some(&min) {
            out.push(min);
        }
        for (h, l) in heads.iter_mut().zip(lists.iter_mut()) {
            while h.is_some_and(|x| x == min) {
                *h = l.next();
            }
        }
    }
    out
}

/// A pair record's agreed version of `path` relative to `old`.
pub fn record_lookup<'a>(
    rec: &'a PairRecord,
    old: &OldCache<'a>,
    path: &RelPath,
) -> Option<&'a Version> {
    lookup(&rec.diff, old, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::StatKey;
    use crate::version::{Hash, Kind, Mtime};

    fn v(n: u8) -> Version {
        Version {
            kind: Kind::File {
                size: 1,
                hash: Hash([n; 32]),
            },
            mode: 0o644,
            mtime: Mtime::new(n as i64, 0),
            uid: 0,
            gid: 0,
        }
    }
    fn rp(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }
    fn ce(p: &str, n: u8) -> CacheEntry {
        CacheEntry {
            path: rp(p),
            version: v(n),
            stat: StatKey {
                dev: 0,
                ino: 0,
                ctime: Mtime::default(),
            },
            trusted: true,
        }
    }

    #[test]
    fn lookups_go_through_diff_then_changes_then_current() {
        let current = vec![ce("a", 2), ce("b", 1), ce("new", 9)];
        // The scan changed a (1 -> 2), added new, removed gone.
        let changes = vec![
            (rp("a"), Some(v(1))),
            (rp("gone"), Some(v(5))),
            (rp("new"), None),
        ];
        let old = OldCache {
            current: &current,
            changes: &changes,
        };
        assert_eq!(old.get(&rp("a")), Some(&v(1)));
        assert_eq!(old.get(&rp("b")), Some(&v(1)));
        assert_eq!(old.get(&rp("gone")), Some(&v(5)));
        assert_eq!(old.get(&rp("new")), None);
        let diff = vec![(rp("b"), Some(v(7))), (rp("x"), None)];
        assert_eq!(lookup(&diff, &old, &rp("b")), Some(&v(7)));
        assert_eq!(lookup(&diff, &old, &rp("a")), Some(&v(1)));
        assert_eq!(lookup(&diff, &old, &rp("x")), None);
    }

    #[test]
    fn rebase_lists_only_real_differences() {
        let touched = [rp("a"), rp("a"), rp("b"), rp("c")];
        let cache = [(rp("a"), v(1)), (rp("b"), v(2))];
        let get = |p: &RelPath| cache.iter().find(|e| e.0 == *p).map(|e| &e.1);
        let diff = rebase(
            touched.iter(),
            |p| match p.as_bytes() {
                b"a" => Some(v(1)),
                b"b" => Some(v(3)),
                _ => None,
            },
            get,
        );
        assert_eq!(diff, vec![(rp("b"), Some(v(3)))]);
    }

    #[test]
    fn unions_are_sorted_and_unique() {
        let a = [rp("a"), rp("c"), rp("d")];
        let b = [rp("b"), rp("c")];
        let u = sorted_union(vec![
            Box::new(a.iter()),
            Box::new(b.iter()),
            Box::new([].iter()),
        ]);
        let s: Vec<String> = u.iter().map(|p| p.to_string()).collect();
        assert_eq!(s, ["a", "b", "c", "d"]);
    }

    #[test]
    fn file_counts() {
        let d = Version {
            kind: Kind::Dir,
            ..v(0)
        };
        assert_eq!(
            count_files(
                5,
                [(None, Some(&v(1))), (Some(&v(1)), None), (None, Some(&d))]
            ),
            5
        );
        assert_eq!(count_files(0, [(Some(&v(1)), None)]), 0);
    }
}
