//! Walk a replica root and describe every path in it, hashing only what changed.
//!
//! The walk (sorted listings, symlinks never followed, each entry statted relative to
//! its open directory) yields paths already in [`RelPath`] order, so it merges with
//! the sorted scan cache as it goes: a file whose
//! size, mtime, inode and ctime match a trusted cache entry keeps its cached hash and
//! is not opened. Everything else is hashed with blake3 on all cores (rayon).
//!
//! A file that keeps changing while it is read (DokuWiki rewrites pages in place) is
//! reported as [`State::Skip`] rather than with a hash of a torn read; the run leaves it
//! alone and the next run picks it up. The same goes for a directory we cannot list:
//! its contents are unknown, not absent, so nothing under it may be deleted elsewhere.

use std::fs::{File, Metadata};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bincode::{Decode, Encode};
use rayon::prelude::*;

use crate::archive::CacheEntry;
use crate::exclude::{Excludes, is_temp_name};
use crate::relpath::RelPath;
use crate::version::{Hash, Kind, Mtime, Version};

/// How far back a file's last change must lie, when we hash it, for the hash to be
/// trusted later on stat alone: kernel timestamps advance in ticks of a few
/// milliseconds, so a second write inside the tick of our stat would go unseen.
/// Filesystems that keep whole seconds (ctime without nanoseconds) get a wider window.
fn trusted_at(now: Mtime, ctime: Mtime) -> bool {
    let window: i128 = if ctime.nanos == 0 {
        2_000_000_000
    } else {
        100_000_000
    };
    now.as_nanos() - ctime.as_nanos() > window
}
const HASH_ATTEMPTS: usize = 3;

/// How long a file that was just emptied stays suspect: an in-place rewrite
/// (DokuWiki's `fopen('w')` then `fwrite`) empties the file before it writes, and a
/// read in between is stable yet torn. Copied elsewhere it would show an empty page
/// there until the next run.
const EMPTY_SETTLE: Duration = Duration::from_millis(50);

/// Whether an empty file (as `meta` says) is empty for good: if it changed within
/// [`EMPTY_SETTLE`], waits out the rest of it and checks that nothing was written.
fn settled_empty(path: &Path, meta: &Metadata) -> bool {
    let age = Mtime::now().as_nanos() - StatKey::of(meta).ctime.as_nanos();
    let settle = EMPTY_SETTLE.as_nanos() as i128;
    if age >= settle {
        return true;
    }
    std::thread::sleep(Duration::from_nanos((settle - age.max(0)) as u64));
    std::fs::symlink_metadata(path)
        .is_ok_and(|now| now.ino() == meta.ino() && same_stat(&now, meta))
}

/// Same size, mtime and ctime: nothing was written in between.
fn same_stat(a: &Metadata, b: &Metadata) -> bool {
    a.len() == b.len()
        && a.mtime() == b.mtime()
        && a.mtime_nsec() == b.mtime_nsec()
        && a.ctime() == b.ctime()
        && a.ctime_nsec() == b.ctime_nsec()
}

/// The part of a file's stat that, together with size and mtime, says "unchanged".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct StatKey {
    pub dev: u64,
    pub ino: u64,
    pub ctime: Mtime,
}

impl StatKey {
    pub fn of(m: &Metadata) -> StatKey {
        StatKey {
            dev: m.dev(),
            ino: m.ino(),
            ctime: Mtime::new(m.ctime(), m.ctime_nsec() as u32),
        }
    }
}

/// What one scan found.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Present paths, sorted.
    pub entries: Vec<CacheEntry>,
    /// Paths whose state is unknown this run, with the reason; sorted.
    pub skipped: Vec<(RelPath, String)>,
    pub stats: ScanStats,
    /// The entries differ from the cache they were built from (so it needs saving).
    pub cache_changed: bool,
    /// Paths whose version differs from the cache's, with the cache's version
    /// (`None`: not in the cache), sorted. Agreed states are kept relative to the
    /// cache, so this is how a run knows them without reading them whole.
    pub changes: Vec<(RelPath, Option<Version>)>,
    /// The generation of the cache this scan was compared with (`None`: none).
    pub generation: Option<u64>,
}

impl Snapshot {
    pub fn get(&self, path: &RelPath) -> Option<&CacheEntry> {
        self.entries
            .binary_search_by(|e| e.path.cmp(path))
            .ok()
            .map(|i| &self.entries[i])
    }
    pub fn get_mut(&mut self, path: &RelPath) -> Option<&mut CacheEntry> {
        match self.entries.binary_search_by(|e| e.path.cmp(path)) {
            Ok(i) => Some(&mut self.entries[i]),
            Err(_) => None,
        }
    }
    pub fn is_skipped(&self, path: &RelPath) -> bool {
        self.skipped
            .iter()
            .any(|(p, _)| p == path || p.is_ancestor_of(path))
    }
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct ScanStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    pub hashed_files: u64,
    pub hashed_bytes: u64,
    pub temps_removed: u64,
    #[serde(serialize_with = "secs")]
    pub took: Duration,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Counters a scan advances as it goes, for keep-alive and progress reports.
#[derive(Debug, Default)]
pub struct Progress {
    pub files: std::sync::atomic::AtomicU64,
    pub bytes: std::sync::atomic::AtomicU64,
}

/// Checks that `root` is a real directory (not a symlink to one, which could be
/// swapped under us) and says what to do if not.
pub fn check_root(root: &Path) -> Result<()> {
    match std::fs::symlink_metadata(root) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(m) if m.file_type().is_symlink() => bail!(
            "{} is a symlink; give the real directory it points to ({}) so that nothing can swap it during a run",
            root.display(),
            std::fs::canonicalize(root)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "a dangling target".into())
        ),
        Ok(_) => bail!("{} is not a directory", root.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => bail!(
            "{} does not exist; if it lives on a separate disk, check that the disk is mounted",
            root.display()
        ),
        Err(e) => Err(e).with_context(|| format!("cannot inspect {}", root.display())),
    }
}

/// Scans `root`, reusing hashes from `cache` (sorted, as loaded; `None` when there
/// is none). `now` is the scan's
/// start time, used only to decide which hashes are safe to trust next time.
/// `clean_temps` removes temp files a crashed run left behind.
pub fn scan(
    root: &Path,
    excludes: &Excludes,
    cache: Option<Vec<CacheEntry>>,
    now: Mtime,
    clean_temps: bool,
    progress: Option<&Progress>,
) -> Result<Snapshot> {
    use std::sync::atomic::Ordering::Relaxed;
    let started = Instant::now();
    check_root(root)?;
    let mut snap = Snapshot::default();
    let mut todo: Vec<usize> = Vec::new();
    // Without a cache there is nothing to be different from (and no agreed state
    // can refer to it): a first scan lists no changes rather than every path.
    let track_changes = cache.is_some();
    let cache = cache.unwrap_or_default();
    let cache_len = cache.len();
    let mut reused_exact = 0usize;
    // Cache entries not carried over unchanged, and paths new to the cache: where
    // `changes` can come from.
    let mut olds: Vec<(RelPath, Version)> = Vec::new();
    let mut news: Vec<RelPath> = Vec::new();
    let mut cache = cache.into_iter().peekable();

    // The walk: one open directory per level, children listed with getdents,
    // sorted bytewise (which is RelPath order), and each one statted relative to its
    // directory. (walkdir resolves every path from the root again for its stat and
    // parses paths to sort; this does neither, which makes it as fast as find.)
    struct Frame {
        fd: OwnedFd,
        /// Length of this directory's path in `buf` (0 for the root).
        len: usize,
        names: Vec<(Vec<u8>, FileType)>,
        next: usize,
    }
    let mut buf: Vec<u8> = Vec::with_capacity(256);
    let root_fd = rustix::fs::open(
        root,
        OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("cannot open {}", root.display()))?;
    let names = list_dir(&root_fd).with_context(|| format!("cannot list {}", root.display()))?;
    let mut stack = vec![Frame {
        fd: root_fd,
        len: 0,
        names,
        next: 0,
    }];
    while let Some(top) = stack.last_mut() {
        let Some((name, dtype)) = top
            .names
            .get_mut(top.next)
            .map(|(n, t)| (std::mem::take(n), *t))
        else {
            stack.pop();
            continue;
        };
        top.next += 1;
        buf.truncate(top.len);
        if top.len > 0 {
            buf.push(b'/');
        }
        buf.extend_from_slice(&name);
        let dir_fd = top.fd.as_fd();
        if let Some(p) = progress {
            p.files.fetch_add(1, Relaxed);
        }
        if is_temp_name(&name) {
            if clean_temps
                && dtype != FileType::Directory
                && rustix::fs::unlinkat(dir_fd, name.as_slice(), AtFlags::empty()).is_ok()
            {
                snap.stats.temps_removed += 1;
            }
            continue;
        }
        // Catch up with the cache without allocating: it is in the same order.
        while let Some(gone) = cache.next_if(|c| cmp_bytes(c.path.as_bytes(), &buf).is_lt()) {
            olds.push((gone.path, gone.version));
        }
        let cached = cache.next_if(|c| c.path.as_bytes() == buf.as_slice());
        // A cache entry that does not come through unchanged goes to `olds`.
        let forget = |c: Option<CacheEntry>, olds: &mut Vec<(RelPath, Version)>| {
            if let Some(c) = c {
                olds.push((c.path, c.version));
            }
        };
        let rel = match &cached {
            Some(c) => c.path.clone(),
            None => match RelPath::new(buf.clone()) {
                Ok(r) => r,
                Err(_) => continue,
            },
        };
        if excludes.matches(&rel) {
            forget(cached, &mut olds);
            continue;
        }
        let st = match rustix::fs::statat(dir_fd, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            // Vanished between listing and stat: it is simply absent.
            Err(rustix::io::Errno::NOENT) => {
                forget(cached, &mut olds);
                continue;
            }
            Err(e) => {
                forget(cached, &mut olds);
                snap.skipped
                    .push((rel, format!("cannot stat: {}", io::Error::from(e))));
                continue;
            }
        };
        let ft = FileType::from_raw_mode(st.st_mode);
        let version = |kind| Version {
            kind,
            mode: st.st_mode & 0o7777,
            mtime: Mtime::new(st.st_mtime, st.st_mtime_nsec as u32),
            uid: st.st_uid,
            gid: st.st_gid,
        };
        let stat = StatKey {
            dev: st.st_dev,
            ino: st.st_ino,
            ctime: Mtime::new(st.st_ctime, st.st_ctime_nsec as u32),
        };
        let trusted = trusted_at(now, stat.ctime);
        let kind = match ft {
            FileType::Directory => {
                snap.stats.dirs += 1;
                let child = rustix::fs::openat(
                    dir_fd,
                    name.as_slice(),
                    OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(io::Error::from)
                .and_then(|fd| list_dir(&fd).map(|names| (fd, names)));
                match child {
                    Ok((fd, names)) => {
                        let e = CacheEntry {
                            path: rel,
                            version: version(Kind::Dir),
                            stat,
                            trusted,
                        };
                        reused_exact += usize::from(cached.as_ref() == Some(&e));
                        match cached {
                            Some(c) if c.version.same(&e.version) => {}
                            Some(c) => olds.push((c.path, c.version)),
                            None => news.push(e.path.clone()),
                        }
                        snap.entries.push(e);
                        let len = buf.len();
                        stack.push(Frame {
                            fd,
                            len,
                            names,
                            next: 0,
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => forget(cached, &mut olds),
                    // We could not list it: its contents are unknown, not absent.
                    Err(e) => {
                        forget(cached, &mut olds);
                        snap.skipped.push((rel, format!("cannot read: {e}")));
                    }
                }
                continue;
            }
            FileType::Symlink => {
                snap.stats.symlinks += 1;
                match rustix::fs::readlinkat(dir_fd, name.as_slice(), Vec::new()) {
                    Ok(t) => Kind::Symlink {
                        target: t.into_bytes(),
                    },
                    Err(rustix::io::Errno::NOENT) => {
                        forget(cached, &mut olds);
                        continue;
                    }
                    Err(e) => {
                        forget(cached, &mut olds);
                        snap.skipped
                            .push((rel, format!("cannot read link: {}", io::Error::from(e))));
                        continue;
                    }
                }
            }
            FileType::RegularFile => {
                let len = st.st_size as u64;
                snap.stats.files += 1;
                snap.stats.bytes += len;
                let v = version(Kind::File {
                    size: len,
                    hash: Hash([0; 32]),
                });
                let reusable = cached.as_ref().is_some_and(|c| {
                    c.trusted
                        && c.stat == stat
                        && c.version.is_file()
                        && c.version.size() == len
                        && c.version.mtime == v.mtime
                });
                match cached {
                    Some(c) if reusable => {
                        if c.version.mode != v.mode {
                            olds.push((c.path.clone(), c.version.clone()));
                        }
                        // Size, mtime and stat key matched, and the hash was trusted
                        // when taken: it stays trusted.
                        let exact = c.version.mode == v.mode
                            && c.version.uid == v.uid
                            && c.version.gid == v.gid;
                        reused_exact += usize::from(exact);
                        snap.entries.push(CacheEntry {
                            path: c.path,
                            version: Version {
                                kind: c.version.kind,
                                ..v
                            },
                            stat,
                            trusted: true,
                        });
                    }
                    other => {
                        // Hashed below; compared with what the cache had afterwards.
                        match other {
                            Some(c) => olds.push((c.path, c.version)),
                            None => news.push(rel.clone()),
                        }
                        todo.push(snap.entries.len());
                        snap.entries.push(CacheEntry {
                            path: rel,
                            version: v,
                            stat,
                            trusted,
                        });
                    }
                }
                continue;
            }
            _ => {
                forget(cached, &mut olds);
                snap.skipped
                    .push((rel, "not a regular file, directory or symlink".into()));
                continue;
            }
        };
        let e = CacheEntry {
            path: rel,
            version: version(kind),
            stat,
            trusted,
        };
        reused_exact += usize::from(cached.as_ref() == Some(&e));
        match cached {
            Some(c) if c.version.same(&e.version) => {}
            Some(c) => olds.push((c.path, c.version)),
            None => news.push(e.path.clone()),
        }
        snap.entries.push(e);
    }
    // Whatever is left in the cache is gone from the tree.
    for c in cache {
        olds.push((c.path, c.version));
    }

    let hashed: Vec<(usize, HashOutcome)> = todo
        .par_iter()
        .map(|&i| {
            let outcome = hash_file(&root.join(snap.entries[i].path.as_path()));
            if let (Some(p), HashOutcome::Hashed { meta, .. }) = (progress, &outcome) {
                p.bytes.fetch_add(meta.len(), Relaxed);
            }
            (i, outcome)
        })
        .collect();
    let mut gone = Vec::new();
    for (i, outcome) in hashed {
        let e = &mut snap.entries[i];
        match outcome {
            HashOutcome::Hashed { hash, meta } => {
                snap.stats.hashed_files += 1;
                snap.stats.hashed_bytes += meta.len();
                e.version.kind = Kind::File {
                    size: meta.len(),
                    hash,
                };
                e.version.mode = meta.mode() & 0o7777;
                e.version.mtime = Mtime::new(meta.mtime(), meta.mtime_nsec() as u32);
                e.stat = StatKey::of(&meta);
                e.trusted = trusted_at(Mtime::now(), e.stat.ctime);
            }
            HashOutcome::Gone => gone.push(i),
            HashOutcome::Unstable(why) => {
                snap.skipped.push((e.path.clone(), why));
                gone.push(i);
            }
        }
    }
    if !gone.is_empty() {
        let mut i = 0;
        snap.entries.retain(|_| {
            i += 1;
            gone.binary_search(&(i - 1)).is_err()
        });
    }
    // Paths are unique: an unstable sort needs no second copy of the entries.
    if !snap.entries.is_sorted_by(|a, b| a.path < b.path) {
        snap.entries.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    }
    snap.skipped.sort_by(|a, b| a.0.cmp(&b.0));
    snap.cache_changed = reused_exact != snap.entries.len() || cache_len != snap.entries.len();
    if track_changes {
        for (p, old) in olds {
            if !snap.get(&p).is_some_and(|e| e.version.same(&old)) {
                snap.changes.push((p, Some(old)));
            }
        }
        for p in news {
            if snap.get(&p).is_some() {
                snap.changes.push((p, None));
            }
        }
    }
    snap.changes.sort_by(|a, b| a.0.cmp(&b.0));
    snap.changes.dedup_by(|a, b| a.0 == b.0);
    snap.stats.took = started.elapsed();
    Ok(snap)
}

/// A directory's entries (without `.` and `..`), sorted bytewise.
pub(crate) fn list_dir(fd: &OwnedFd) -> io::Result<Vec<(Vec<u8>, FileType)>> {
    let mut dir = rustix::fs::Dir::read_from(fd)?;
    let mut names = Vec::new();
    while let Some(e) = dir.read() {
        let e = e?;
        let name = e.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push((name.to_vec(), e.file_type()));
        }
    }
    names.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok(names)
}

/// `RelPath` order on raw bytes (`/` sorts first).
fn cmp_bytes(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    let key = |c: u8| if c == b'/' { 0 } else { c };
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => key(a[i]).cmp(&key(b[i])),
        None => a.len().cmp(&b.len()),
    }
}

enum HashOutcome {
    Hashed { hash: Hash, meta: Metadata },
    Gone,
    Unstable(String),
}

/// Hashes a file, making sure the bytes read belong to one consistent version: the
/// stat before and after reading must agree, else we try again, and give up (Skip)
/// after a few attempts rather than report a torn read.
fn hash_file(path: &Path) -> HashOutcome {
    let mut last_err = String::new();
    for _ in 0..HASH_ATTEMPTS {
        let file = match File::options()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return HashOutcome::Gone,
            Err(e) => {
                last_err = format!("cannot open: {e}");
                continue;
            }
        };
        let result = (|| -> io::Result<Option<(Hash, Metadata)>> {
            let before = file.metadata()?;
            if !before.is_file() {
                return Ok(None);
            }
            let mut h = blake3::Hasher::new();
            h.update_reader(&file)?;
            let after = file.metadata()?;
            let stable = same_stat(&before, &after) && h.count() == after.len();
            if stable && after.len() == 0 && !settled_empty(path, &after) {
                return Ok(None);
            }
            Ok(stable.then(|| (Hash(*h.finalize().as_bytes()), after)))
        })();
        match result {
            Ok(Some((hash, meta))) => return HashOutcome::Hashed { hash, meta },
            Ok(None) => last_err = "changed while being read".into(),
            Err(e) => last_err = format!("cannot read: {e}"),
        }
    }
    HashOutcome::Unstable(last_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn scan_dir(root: &Path, cache: Vec<CacheEntry>) -> Snapshot {
        scan(
            root,
            &Excludes::default(),
            Some(cache),
            Mtime::now(),
            true,
            None,
        )
        .unwrap()
    }

    #[test]
    fn finds_everything_in_order() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("a/b")).unwrap();
        std::fs::write(r.join("a/b/f"), "x").unwrap();
        std::fs::write(r.join("a.txt"), "y").unwrap();
        std::fs::write(r.join("a-b"), "z").unwrap();
        symlink("/etc/passwd", r.join("link")).unwrap();
        std::fs::create_dir(r.join(".hubsync")).unwrap();
        std::fs::write(r.join(".hubsync/lock"), "").unwrap();
        std::fs::write(r.join("a/.hubsync.0123456789abcdef.tmp"), "stale").unwrap();
        let s = scan_dir(r, vec![]);
        let paths: Vec<String> = s.entries.iter().map(|e| e.path.to_string()).collect();
        assert_eq!(paths, ["a", "a/b", "a/b/f", "a-b", "a.txt", "link"]);
        assert_eq!(s.stats.temps_removed, 1);
        assert!(!r.join("a/.hubsync.0123456789abcdef.tmp").exists());
        let link = s.get(&RelPath::new("link").unwrap()).unwrap();
        assert_eq!(
            link.version.kind,
            Kind::Symlink {
                target: b"/etc/passwd".to_vec()
            }
        );
        let f = s.get(&RelPath::new("a/b/f").unwrap()).unwrap();
        assert_eq!(
            f.version.kind,
            Kind::File {
                size: 1,
                hash: Hash::of(b"x")
            }
        );
    }

    #[test]
    fn a_file_emptied_by_an_in_place_rewrite_is_not_taken_for_empty() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("page.txt");
        std::fs::write(&p, "old text").unwrap();
        // fopen('w'): the file is empty now; the rewrite lands a few ms later.
        let f = File::options().write(true).truncate(true).open(&p).unwrap();
        let emptied = std::fs::metadata(&p).unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            std::io::Write::write_all(&mut &f, b"new text").unwrap();
        });
        let settled = settled_empty(&p, &emptied);
        writer.join().unwrap();
        let written = std::fs::metadata(&p).unwrap();
        let gap = StatKey::of(&written).ctime.as_nanos() - StatKey::of(&emptied).ctime.as_nanos();
        // Only meaningful if the writer made it within the window (a loaded
        // machine may delay it past; then "empty" was the truth for a while).
        if gap < EMPTY_SETTLE.as_nanos() as i128 {
            assert!(
                !settled,
                "an empty file rewritten {gap} ns later was taken as settled"
            );
            match hash_file(&p) {
                HashOutcome::Hashed { meta, .. } => assert_eq!(meta.len(), 8),
                HashOutcome::Unstable(_) => {}
                HashOutcome::Gone => panic!("gone"),
            }
        }
        // An empty file left alone is empty.
        let q = d.path().join("empty.txt");
        std::fs::write(&q, "").unwrap();
        assert!(matches!(hash_file(&q), HashOutcome::Hashed { ref meta, .. } if meta.len() == 0));
    }

    #[test]
    fn trusted_cache_entries_are_not_reread() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::write(r.join("f"), "content").unwrap();
        let first = scan_dir(r, vec![]);
        assert_eq!(first.stats.hashed_files, 1);
        // Pretend the hash we cached was of other bytes: if the scan reuses it, it did
        // not read the file.
        let mut cache = first.entries.clone();
        cache[0].trusted = true;
        cache[0].version.kind = Kind::File {
            size: 7,
            hash: Hash([9; 32]),
        };
        let second = scan_dir(r, cache.clone());
        assert_eq!(second.stats.hashed_files, 0);
        assert_eq!(second.entries[0].version.kind, cache[0].version.kind);
        // An untrusted (racy) entry is read again even when stat matches.
        cache[0].trusted = false;
        let third = scan_dir(r, cache);
        assert_eq!(third.stats.hashed_files, 1);
        assert_eq!(
            third.entries[0].version.kind,
            Kind::File {
                size: 7,
                hash: Hash::of(b"content")
            }
        );
    }

    #[test]
    fn excluded_subtrees_are_pruned() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("cache/x")).unwrap();
        std::fs::write(r.join("cache/x/f"), "x").unwrap();
        std::fs::write(r.join("keep"), "x").unwrap();
        let ex = Excludes::new(&["cache".to_string()]).unwrap();
        let s = scan(r, &ex, None, Mtime::now(), false, None).unwrap();
        let paths: Vec<String> = s.entries.iter().map(|e| e.path.to_string()).collect();
        assert_eq!(paths, ["keep"]);
    }

    #[test]
    fn root_checks() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("nope");
        let e = check_root(&missing).unwrap_err().to_string();
        assert!(e.contains("mounted"), "{e}");
        symlink(d.path(), d.path().join("ln")).unwrap();
        let e = check_root(&d.path().join("ln")).unwrap_err().to_string();
        assert!(e.contains("symlink"), "{e}");
    }
}
