//! Changing a replica's tree: the only code that writes into a root.
//!
//! Every operation resolves its parent directory from the root one component at a
//! time with `O_NOFOLLOW|O_DIRECTORY`, and acts on the final name relative to that
//! directory without following it. A path from a hostile or buggy hub, or a symlink
//! planted in the tree, therefore cannot make us read or write outside the root.
//!
//! Why each destructive step is safe:
//! - a new file is written to a hidden temp file in the destination directory,
//!   checked against the expected size and hash, given its mode, owner and mtime,
//!   flushed to disk, and only then renamed over the real name: readers see the old
//!   content or the new, never a partial file;
//! - before anything is replaced or removed, the path is compared with what this
//!   replica's own scan saw (inode, size, mtime, ctime); if it changed during the run
//!   it is left alone ([`OpError::Changed`]) and syncs next run;
//! - a version that lost a conflict is hard-linked (or moved, for a directory) into
//!   `.hubsync/conflicts/` before the winner takes its name;
//! - a directory is only ever removed with `rmdir`, so it must already be empty.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags, Stat, Timespec, Timestamps};

use crate::archive::CacheEntry;
use crate::exclude::temp_name;
use crate::proto::OpError;
use crate::relpath::RelPath;
use crate::scan::StatKey;
use crate::version::{Hash, Kind, Mtime, Version};

fn io_err(e: impl std::fmt::Display) -> OpError {
    OpError::Io(e.to_string())
}

impl From<rustix::io::Errno> for OpError {
    fn from(e: rustix::io::Errno) -> OpError {
        OpError::Io(io::Error::from(e).to_string())
    }
}

/// An open replica root.
pub struct Root {
    path: PathBuf,
    fd: OwnedFd,
    state_dir: PathBuf,
    /// The most recently resolved directory: consecutive files mostly share one.
    cached_dir: Option<(Option<RelPath>, OwnedFd)>,
    as_root: bool,
    /// Names the conflict copy of something that changed in the instant between our
    /// check and our rename (so it is kept, not lost).
    pub fallback_suffix: String,
    /// Every losing version kept this session: (its path, where its copy is).
    pub kept: Vec<(RelPath, PathBuf)>,
}

/// A file being received. It holds no directory descriptor (thousands may wait
/// in a batch); its directory is resolved again, safely, when it is installed.
pub struct Incoming {
    pub path: RelPath,
    pub version: Version,
    file: File,
    temp: String,
    hasher: blake3::Hasher,
    written: u64,
    error: Option<OpError>,
}

/// A conflict copy made by a hard link before a replacement.
struct Aside {
    dir: OwnedFd,
    name: String,
    ino: u64,
}

/// A held application lock directory, removed when dropped.
pub struct IoLockGuard {
    dir: OwnedFd,
    name: String,
}

impl Drop for IoLockGuard {
    fn drop(&mut self) {
        let _ = rustix::fs::unlinkat(&self.dir, self.name.as_str(), AtFlags::REMOVEDIR);
    }
}

/// A received, verified file waiting to be renamed into place.
pub struct Ready {
    pub path: RelPath,
    pub version: Version,
    temp: String,
    ino: u64,
}

impl Root {
    pub fn open(path: &Path, state_dir: PathBuf) -> io::Result<Root> {
        let fd = rustix::fs::open(
            path,
            OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Root {
            path: path.to_path_buf(),
            fd,
            state_dir,
            cached_dir: None,
            as_root: rustix::process::geteuid().is_root(),
            fallback_suffix: format!("{}-changed-during-sync", conflict_time(Mtime::now())),
            kept: Vec::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the directory `rel` (the root for `None`) without following symlinks.
    fn dir(&mut self, rel: Option<&RelPath>) -> Result<BorrowedFd<'_>, OpError> {
        let hit = matches!(&self.cached_dir, Some((p, _)) if p.as_ref() == rel);
        if !hit {
            let mut fd = rustix::fs::openat(
                &self.fd,
                ".",
                OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            if let Some(rel) = rel {
                for comp in rel.components() {
                    fd = rustix::fs::openat(
                        &fd,
                        comp,
                        OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| match e {
                        rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => {
                            OpError::Refused(format!(
                                "{rel}: a component is a symlink or not a directory; refusing to follow it"
                            ))
                        }
                        rustix::io::Errno::NOENT => OpError::Changed,
                        e => e.into(),
                    })?;
                }
            }
            self.cached_dir = Some((rel.cloned(), fd));
        }
        Ok(self.cached_dir.as_ref().expect("just filled").1.as_fd())
    }

    fn forget_dirs(&mut self) {
        self.cached_dir = None;
    }

    fn parent_fd(&mut self, path: &RelPath) -> Result<OwnedFd, OpError> {
        let parent = path.parent();
        let fd = self.dir(parent.as_ref())?;
        fd.try_clone_to_owned().map_err(io_err)
    }

    /// lstat of `path`, `None` if absent.
    pub fn lstat(&mut self, path: &RelPath) -> Result<Option<Stat>, OpError> {
        let dir = match self.dir(path.parent().as_ref()) {
            Ok(d) => d,
            Err(OpError::Changed) => return Ok(None),
            Err(e) => return Err(e),
        };
        match rustix::fs::statat(dir, path.file_name(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(s) => Ok(Some(s)),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Opens a regular file for reading (never through a symlink).
    pub fn open_read(&mut self, path: &RelPath) -> Result<File, OpError> {
        let dir = self.dir(path.parent().as_ref())?;
        let fd = rustix::fs::openat(
            dir,
            path.file_name(),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
        )
        .map_err(|e| match e {
            rustix::io::Errno::NOENT | rustix::io::Errno::LOOP => OpError::SourceChanged,
            e => e.into(),
        })?;
        let st = rustix::fs::fstat(&fd)?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(OpError::SourceChanged);
        }
        Ok(File::from(fd))
    }

    /// Whether `path` still holds what `scanned` describes (`None`: nothing).
    pub fn check(
        &mut self,
        path: &RelPath,
        scanned: Option<&CacheEntry>,
    ) -> Result<Option<Stat>, OpError> {
        let now = self.lstat(path)?;
        let ok = match (&now, scanned) {
            (None, None) => true,
            (Some(st), Some(e)) => matches_scan(st, e),
            _ => false,
        };
        if ok { Ok(now) } else { Err(OpError::Changed) }
    }

    /// Starts receiving a file for `path`.
    pub fn begin_put(&mut self, path: &RelPath, version: Version) -> Result<Incoming, OpError> {
        let dir = self.parent_fd(path)?;
        let (file, temp) = create_temp(&dir)?;
        Ok(Incoming {
            path: path.clone(),
            version,
            file,
            temp,
            hasher: blake3::Hasher::new(),
            written: 0,
            error: None,
        })
    }

    /// Checks a received file and gives it its metadata; it is not visible yet.
    pub fn finish_put(&mut self, mut inc: Incoming) -> Result<Ready, OpError> {
        let result = (|| {
            if let Some(e) = inc.error.take() {
                return Err(e);
            }
            let Kind::File { size, hash } = inc.version.kind else {
                return Err(OpError::Refused("not a file".into()));
            };
            if inc.written != size || Hash(*inc.hasher.finalize().as_bytes()) != hash {
                return Err(OpError::SourceChanged);
            }
            self.set_owner_fd(inc.file.as_fd(), &inc.version)?;
            rustix::fs::fchmod(&inc.file, Mode::from_raw_mode(inc.version.mode))?;
            rustix::fs::futimens(&inc.file, &times(inc.version.mtime))?;
            let ino = rustix::fs::fstat(&inc.file)?.st_ino;
            Ok(ino)
        })();
        match result {
            Ok(ino) => Ok(Ready {
                path: inc.path,
                version: inc.version,
                temp: inc.temp,
                ino,
            }),
            Err(e) => {
                self.unlink_temp(&inc.path, &inc.temp);
                Err(e)
            }
        }
    }

    fn unlink_temp(&mut self, path: &RelPath, temp: &str) {
        if let Ok(dir) = self.dir(path.parent().as_ref()) {
            let _ = rustix::fs::unlinkat(dir, temp, AtFlags::empty());
        }
    }

    /// Drops a file being received.
    pub fn abort_put(&mut self, inc: Incoming) {
        drop(inc.file);
        self.unlink_temp(&inc.path, &inc.temp);
    }

    /// Drops a ready file that will not be installed.
    pub fn discard(&mut self, ready: Ready) {
        self.unlink_temp(&ready.path, &ready.temp);
    }

    /// Makes received data durable: one `syncfs` for a whole batch of files costs
    /// about what one `fsync` does, and it must happen before any rename exposes
    /// them.
    /// Starts making everything written so far durable, which must be done before
    /// a rename exposes a received file. One `syncfs` for a batch costs about what
    /// one `fsync` does; it runs on another thread so that receiving goes on
    /// meanwhile. The answer arrives on the returned channel.
    pub fn start_sync(&self) -> mpsc::Receiver<Result<(), OpError>> {
        let (tx, rx) = mpsc::channel();
        match self.fd.try_clone() {
            Ok(fd) => {
                let spawned = std::thread::Builder::new()
                    .name("syncfs".into())
                    .spawn(move || {
                        let _ = tx.send(rustix::fs::syncfs(&fd).map_err(OpError::from));
                    });
                if let Err(e) = spawned {
                    // The sender went with the closure: answer here instead.
                    let (tx, rx2) = mpsc::channel();
                    let _ = tx.send(Err(OpError::Io(format!("cannot start a thread: {e}"))));
                    return rx2;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(OpError::Io(format!("cannot sync: {e}"))));
            }
        }
        rx
    }

    /// Renames a ready file into place after checking the destination.
    pub fn install(
        &mut self,
        ready: Ready,
        scanned: Option<&CacheEntry>,
        keep: Option<&str>,
    ) -> Result<StatKey, OpError> {
        let dir = match self.parent_fd(&ready.path) {
            Ok(d) => d,
            Err(e) => {
                self.discard(ready);
                return Err(e);
            }
        };
        let result = self.replace_with(&ready.path, &dir, &ready.temp, scanned, keep);
        if result.is_err() {
            let _ = rustix::fs::unlinkat(&dir, ready.temp.as_str(), AtFlags::empty());
        }
        result?;
        let st = rustix::fs::statat(&dir, ready.path.file_name(), AtFlags::SYMLINK_NOFOLLOW)?;
        if st.st_ino != ready.ino {
            // Someone replaced it right after us; let the next scan look at it.
            return Err(OpError::Changed);
        }
        Ok(stat_key(&st))
    }

    /// Puts the entry `temp` (in `dir`, the parent of `path`) at `path`.
    ///
    /// - Nothing there: a rename that refuses to replace, so something that appeared
    ///   meanwhile is never overwritten.
    /// - A file or symlink: an atomic exchange, then a look at what came out: if it is
    ///   not what the scan saw (changed in the instant since the check) or it lost a
    ///   conflict, it goes to the conflicts directory, else it is deleted.
    /// - A directory: moved to the conflicts directory if it lost, else removed with
    ///   `rmdir` (its contents were removed earlier in the run, or this fails).
    fn replace_with(
        &mut self,
        path: &RelPath,
        dir: &OwnedFd,
        temp: &str,
        scanned: Option<&CacheEntry>,
        keep: Option<&str>,
    ) -> Result<(), OpError> {
        let name = path.file_name();
        let Some(current) = self.check(path, scanned)? else {
            return rename_noreplace(dir, temp, name);
        };
        if FileType::from_raw_mode(current.st_mode) == FileType::Directory {
            match keep {
                Some(suffix) => {
                    self.keep_at(dir, name, path, suffix)?;
                }
                None => remove_dir(dir, name)?,
            }
            self.forget_dirs();
            return rename_noreplace(dir, temp, name);
        }
        // A losing version is linked among the conflict copies before anything
        // moves: after the exchange it sits under the temp name, which the next
        // scan removes, so a crash right then must not be its only copy.
        let aside = match keep {
            Some(suffix) => self.link_aside(dir, name, path, suffix)?,
            None => None,
        };
        let drop_aside = |aside: &Option<Aside>| {
            if let Some(a) = aside {
                let _ = rustix::fs::unlinkat(&a.dir, a.name.as_str(), AtFlags::empty());
            }
        };
        match rustix::fs::renameat_with(dir, temp, dir, name, RenameFlags::EXCHANGE) {
            Ok(()) => {
                // Test hook: a crash at the worst moment for a conflict's loser.
                if keep.is_some() && std::env::var_os("HUBSYNC_TEST_ABORT_AFTER_EXCHANGE").is_some()
                {
                    std::process::abort();
                }
                // The old version now has the temp name, which the caller removes
                // on error: if it cannot be kept, it goes back to its own name.
                let kept = (|| {
                    let old = rustix::fs::statat(dir, temp, AtFlags::SYMLINK_NOFOLLOW)?;
                    // The exchange itself moved its ctime; inode, size and mtime remain.
                    let as_scanned = scanned.is_some_and(|e| matches_identity(&old, e));
                    match (keep, &aside) {
                        // Kept already (what was linked is what was swapped out).
                        (Some(_), Some(a)) if a.ino == old.st_ino => {
                            rustix::fs::unlinkat(dir, temp, AtFlags::empty())?;
                            self.kept
                                .push((path.clone(), self.conflict_path(path, &a.name)));
                        }
                        // Replaced in between, or the link was impossible: keep it too.
                        (Some(suffix), _) => {
                            self.keep_at(dir, temp.as_bytes(), path, suffix)?;
                        }
                        (None, _) if !as_scanned => {
                            let suffix = self.fallback_suffix.clone();
                            self.keep_at(dir, temp.as_bytes(), path, &suffix)?;
                        }
                        (None, _) => rustix::fs::unlinkat(dir, temp, AtFlags::empty())?,
                    }
                    Ok(())
                })();
                if kept.is_err() {
                    let _ = rustix::fs::renameat_with(dir, temp, dir, name, RenameFlags::EXCHANGE);
                    drop_aside(&aside);
                }
                kept
            }
            // Filesystems without RENAME_EXCHANGE: the hard link is the kept copy.
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
                if keep.is_some() && aside.is_none() {
                    return Err(OpError::Io(format!(
                        "cannot keep the losing version of {path} on this filesystem"
                    )));
                }
                let r = rustix::fs::renameat(dir, temp, dir, name);
                match (&r, &aside) {
                    (Err(_), _) => drop_aside(&aside),
                    (Ok(()), Some(a)) => {
                        self.kept
                            .push((path.clone(), self.conflict_path(path, &a.name)));
                    }
                    (Ok(()), None) => {}
                }
                Ok(r?)
            }
            Err(e) => {
                drop_aside(&aside);
                Err(e.into())
            }
        }
    }

    /// Hard-links `name` (in `dir`) among the conflict copies of `path`; `None` when
    /// the conflicts directory is on another filesystem (then it is moved there
    /// after the exchange instead).
    fn link_aside(
        &mut self,
        dir: &OwnedFd,
        name: &[u8],
        path: &RelPath,
        suffix: &str,
    ) -> Result<Option<Aside>, OpError> {
        let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
        let cdir = self.conflicts_dir(path)?;
        let base = String::from_utf8_lossy(path.file_name()).into_owned();
        for n in 1..1000 {
            let cname = if n == 1 {
                format!("{base}.conflict-{suffix}")
            } else {
                format!("{base}.conflict-{suffix}-{n}")
            };
            match rustix::fs::linkat(dir, name, &cdir, cname.as_str(), AtFlags::empty()) {
                Ok(()) => {
                    return Ok(Some(Aside {
                        dir: cdir,
                        name: cname,
                        ino: st.st_ino,
                    }));
                }
                Err(rustix::io::Errno::EXIST) => continue,
                Err(rustix::io::Errno::XDEV | rustix::io::Errno::PERM) => return Ok(None),
                Err(e) => {
                    return Err(OpError::Io(format!(
                        "cannot keep the losing version of {path}: {}",
                        io::Error::from(e)
                    )));
                }
            }
        }
        Err(OpError::Io(format!("too many conflict copies of {path}")))
    }

    /// Creates a directory (replacing a file or symlink if the plan says so).
    pub fn mkdir(
        &mut self,
        path: &RelPath,
        version: &Version,
        scanned: Option<&CacheEntry>,
        keep: Option<&str>,
    ) -> Result<StatKey, OpError> {
        let dir = self.parent_fd(path)?;
        let temp = temp_name();
        rustix::fs::mkdirat(&dir, temp.as_str(), Mode::from_raw_mode(0o700))?;
        let result = (|| {
            let fd = rustix::fs::openat(
                &dir,
                temp.as_str(),
                OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            self.set_owner_fd(fd.as_fd(), version)?;
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(version.mode))?;
            self.replace_with(path, &dir, &temp, scanned, keep)?;
            Ok(stat_key(&rustix::fs::fstat(&fd)?))
        })();
        if result.is_err() {
            let _ = rustix::fs::unlinkat(&dir, temp.as_str(), AtFlags::REMOVEDIR);
        }
        result
    }

    /// Creates or replaces a symlink.
    pub fn symlink(
        &mut self,
        path: &RelPath,
        version: &Version,
        scanned: Option<&CacheEntry>,
        keep: Option<&str>,
    ) -> Result<StatKey, OpError> {
        let Kind::Symlink { target } = &version.kind else {
            return Err(OpError::Refused("not a symlink".into()));
        };
        let dir = self.parent_fd(path)?;
        let temp = temp_name();
        rustix::fs::symlinkat(target.as_slice(), &dir, temp.as_str())?;
        let result = (|| {
            if self.as_root {
                rustix::fs::chownat(
                    &dir,
                    temp.as_str(),
                    Some(rustix::fs::Uid::from_raw(version.uid)),
                    Some(rustix::fs::Gid::from_raw(version.gid)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )?;
            }
            rustix::fs::utimensat(
                &dir,
                temp.as_str(),
                &times(version.mtime),
                AtFlags::SYMLINK_NOFOLLOW,
            )?;
            self.replace_with(path, &dir, &temp, scanned, keep)
        })();
        if let Err(e) = result {
            let _ = rustix::fs::unlinkat(&dir, temp.as_str(), AtFlags::empty());
            return Err(e);
        }
        Ok(stat_key(&rustix::fs::statat(
            &dir,
            path.file_name(),
            AtFlags::SYMLINK_NOFOLLOW,
        )?))
    }

    /// Takes the lock an application holds while it writes `lock.of`: the directory
    /// `lock.dir/md5(absolute path of lock.of)` (DokuWiki's `io_lock`). Like
    /// DokuWiki, waits at most 3 s for a holder and then goes ahead without it;
    /// without the lock directory there is no lock to take.
    pub fn io_lock(&mut self, lock: &crate::proto::IoLock) -> Option<IoLockGuard> {
        use md5::Digest;
        let abs = self.path.join(lock.of.as_path());
        let name = crate::util::hex(&md5::Md5::digest(abs.as_os_str().as_encoded_bytes()));
        let dir = self.dir(Some(&lock.dir)).ok()?.try_clone_to_owned().ok()?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        loop {
            match rustix::fs::mkdirat(&dir, name.as_str(), Mode::from_raw_mode(0o755)) {
                Ok(()) => return Some(IoLockGuard { dir, name }),
                Err(rustix::io::Errno::EXIST) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                Err(_) => return None,
            }
        }
    }

    /// Makes the directory `rel` and its missing parents, each owned and permitted
    /// like its parent, so that the application can write where we created.
    fn make_dirs(&mut self, rel: &RelPath) -> Result<(), OpError> {
        let flags = OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC;
        let mut fd = rustix::fs::openat(&self.fd, ".", flags, Mode::empty())?;
        for comp in rel.components() {
            let next = match rustix::fs::openat(&fd, comp, flags, Mode::empty()) {
                Err(rustix::io::Errno::NOENT) => {
                    let up = rustix::fs::fstat(&fd)?;
                    let mode = Mode::from_raw_mode(up.st_mode & 0o7777);
                    match rustix::fs::mkdirat(&fd, comp, mode) {
                        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                        Err(e) => return Err(e.into()),
                    }
                    let next = rustix::fs::openat(&fd, comp, flags, Mode::empty())?;
                    if self.as_root {
                        rustix::fs::fchown(
                            &next,
                            Some(rustix::fs::Uid::from_raw(up.st_uid)),
                            Some(rustix::fs::Gid::from_raw(up.st_gid)),
                        )?;
                    }
                    rustix::fs::fchmod(&next, mode)?;
                    next
                }
                Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => {
                    return Err(OpError::Refused(format!(
                        "{rel}: a component is a symlink or not a directory; refusing to follow it"
                    )));
                }
                r => r?,
            };
            fd = next;
        }
        self.forget_dirs();
        Ok(())
    }

    /// Writes `bytes` as the new file `path`, where nothing may be (an existing
    /// file is never replaced), owned and permitted like `like`, with `mtime`. It
    /// appears under its name whole and synced, or not at all.
    pub fn create_file(
        &mut self,
        path: &RelPath,
        bytes: &[u8],
        like: &Stat,
        mtime: Mtime,
    ) -> Result<(), OpError> {
        if let Some(parent) = path.parent() {
            self.make_dirs(&parent)?;
        }
        self.write_then(path, bytes, like, Some(mtime), |dir, temp| {
            rename_noreplace(dir, temp, path.file_name())
        })
    }

    /// Replaces the regular file `path` with `bytes`, keeping its owner and
    /// permissions, only while it is still `was` (same inode, size and mtime).
    /// Callers replace a file only with content that contains all of the old.
    pub fn rewrite_file(
        &mut self,
        path: &RelPath,
        bytes: &[u8],
        was: &Stat,
    ) -> Result<(), OpError> {
        self.write_then(path, bytes, was, None, |dir, temp| {
            let now = rustix::fs::statat(dir, path.file_name(), AtFlags::SYMLINK_NOFOLLOW)?;
            let same = (now.st_ino, now.st_size, now.st_mtime, now.st_mtime_nsec)
                == (was.st_ino, was.st_size, was.st_mtime, was.st_mtime_nsec);
            if !same {
                return Err(OpError::Changed);
            }
            Ok(rustix::fs::renameat(dir, temp, dir, path.file_name())?)
        })
    }

    /// Writes `bytes` to a synced temp file beside `path`, owned and permitted like
    /// `like`, then lets `place` put it under its name; the temp file goes on error.
    fn write_then(
        &mut self,
        path: &RelPath,
        bytes: &[u8],
        like: &Stat,
        mtime: Option<Mtime>,
        place: impl FnOnce(&OwnedFd, &str) -> Result<(), OpError>,
    ) -> Result<(), OpError> {
        let dir = self.parent_fd(path)?;
        let (mut file, temp) = create_temp(&dir)?;
        let r = (|| {
            file.write_all(bytes).map_err(io_err)?;
            self.set_owner(file.as_fd(), like.st_uid, like.st_gid)?;
            rustix::fs::fchmod(&file, Mode::from_raw_mode(like.st_mode & 0o7777))?;
            if let Some(m) = mtime {
                rustix::fs::futimens(&file, &times(m))?;
            }
            file.sync_all().map_err(io_err)?;
            place(&dir, &temp)
        })();
        if r.is_err() {
            let _ = rustix::fs::unlinkat(&dir, temp.as_str(), AtFlags::empty());
        }
        r
    }

    /// Removes the regular file `path` if there is one (derived data, like a
    /// cache, that an application rebuilds): never a directory or a symlink.
    pub fn remove_derived(&mut self, path: &RelPath) -> bool {
        let Ok(dir) = self.parent_fd(path) else {
            return false;
        };
        match rustix::fs::statat(&dir, path.file_name(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile => {
                rustix::fs::unlinkat(&dir, path.file_name(), AtFlags::empty()).is_ok()
            }
            _ => false,
        }
    }

    /// Removes the regular files below `top` that `matches` accepts and whose
    /// mtime is `since` or later (caches made after a revision that was just
    /// installed with its older mtime). Symlinks are not followed. Returns how
    /// many went.
    pub fn remove_newer(
        &mut self,
        top: &RelPath,
        matches: &dyn Fn(&RelPath) -> bool,
        since: Mtime,
    ) -> usize {
        let Ok(fd) = self
            .dir(Some(top))
            .and_then(|d| d.try_clone_to_owned().map_err(io_err))
        else {
            return 0;
        };
        let mut removed = 0;
        let mut stack = vec![(fd, top.clone())];
        while let Some((fd, rel)) = stack.pop() {
            let Ok(names) = crate::scan::list_dir(&fd) else {
                continue;
            };
            for (name, _) in names {
                let Ok(child) = rel.join(&name) else {
                    continue;
                };
                let Ok(st) = rustix::fs::statat(&fd, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW)
                else {
                    continue;
                };
                match FileType::from_raw_mode(st.st_mode) {
                    FileType::Directory => {
                        let flags =
                            OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC;
                        if let Ok(sub) =
                            rustix::fs::openat(&fd, name.as_slice(), flags, Mode::empty())
                        {
                            stack.push((sub, child));
                        }
                    }
                    FileType::RegularFile => {
                        let mtime = Mtime::new(st.st_mtime, st.st_mtime_nsec as u32);
                        if mtime >= since
                            && matches(&child)
                            && rustix::fs::unlinkat(&fd, name.as_slice(), AtFlags::empty()).is_ok()
                        {
                            removed += 1;
                        }
                    }
                    _ => {}
                }
            }
        }
        removed
    }

    /// Removes `path`; with `keep`, a file or symlink is moved among the conflict
    /// copies instead (a change that lost to a deletion).
    pub fn remove(
        &mut self,
        path: &RelPath,
        scanned: Option<&CacheEntry>,
        keep: Option<&str>,
    ) -> Result<(), OpError> {
        let Some(st) = self.check(path, scanned)? else {
            return Ok(());
        };
        let dir = self.parent_fd(path)?;
        if let Some(suffix) = keep
            && FileType::from_raw_mode(st.st_mode) != FileType::Directory
        {
            // Whatever is there now moves aside whole: a write that raced our check
            // is kept too, not unlinked.
            self.keep_at(&dir, path.file_name(), path, suffix)?;
            return Ok(());
        }
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            remove_dir(&dir, path.file_name())?;
            self.forget_dirs();
            Ok(())
        } else {
            Ok(rustix::fs::unlinkat(
                &dir,
                path.file_name(),
                AtFlags::empty(),
            )?)
        }
    }

    /// Gives `path` new permission bits, mtime and owner without touching content.
    pub fn set_meta(
        &mut self,
        path: &RelPath,
        version: &Version,
        scanned: Option<&CacheEntry>,
    ) -> Result<StatKey, OpError> {
        let st = self.check(path, scanned)?.ok_or(OpError::Changed)?;
        let dir = self.parent_fd(path)?;
        let name = path.file_name();
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Symlink => {}
            ft => {
                let flags = if ft == FileType::Directory {
                    OFlags::DIRECTORY
                } else {
                    OFlags::NONBLOCK
                };
                // Through an fd opened without following links, so that a symlink
                // swapped in after the check cannot redirect the chmod.
                let fd = rustix::fs::openat(
                    &dir,
                    name,
                    flags | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                if rustix::fs::fstat(&fd)?.st_ino != st.st_ino {
                    return Err(OpError::Changed);
                }
                self.set_owner_fd(fd.as_fd(), version)?;
                rustix::fs::fchmod(&fd, Mode::from_raw_mode(version.mode))?;
                if ft != FileType::Directory {
                    rustix::fs::futimens(&fd, &times(version.mtime))?;
                }
            }
        }
        Ok(stat_key(&rustix::fs::statat(
            &dir,
            name,
            AtFlags::SYMLINK_NOFOLLOW,
        )?))
    }

    fn set_owner_fd(&self, fd: BorrowedFd<'_>, v: &Version) -> Result<(), OpError> {
        self.set_owner(fd, v.uid, v.gid)
    }

    /// Ownership is kept only when running as root (nobody else may give it away).
    fn set_owner(&self, fd: BorrowedFd<'_>, uid: u32, gid: u32) -> Result<(), OpError> {
        if self.as_root {
            rustix::fs::fchown(
                fd,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
            )?;
        }
        Ok(())
    }

    /// The directory under `.hubsync/conflicts/` that mirrors `path`'s parent,
    /// made where missing. Resolved from the root one component at a time without
    /// following links, like every other path: a link planted in the state
    /// directory must not carry a losing version out of the root.
    fn conflicts_dir(&self, path: &RelPath) -> Result<OwnedFd, OpError> {
        let conflicts = self.state_dir.join("conflicts");
        let shown = |e: rustix::io::Errno| match e {
            rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => OpError::Refused(format!(
                "{}: a component is a symlink or not a directory; refusing to follow it",
                conflicts.display()
            )),
            e => OpError::Io(format!(
                "cannot create {}: {}",
                conflicts.display(),
                io::Error::from(e)
            )),
        };
        let (mut fd, inside) = match self.state_dir.strip_prefix(&self.path) {
            Ok(rel) => (
                rustix::fs::openat(
                    &self.fd,
                    ".",
                    OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(shown)?,
                rel.to_path_buf(),
            ),
            // A state directory of the admin's choosing, elsewhere: from there on.
            Err(_) => (
                rustix::fs::open(
                    &self.state_dir,
                    OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(shown)?,
                PathBuf::new(),
            ),
        };
        let below = path.parent();
        let comps = inside
            .iter()
            .map(|c| c.as_encoded_bytes())
            .chain(std::iter::once(&b"conflicts"[..]))
            .chain(below.iter().flat_map(|p| p.components()));
        for comp in comps {
            match rustix::fs::mkdirat(&fd, comp, Mode::from_raw_mode(0o777)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(shown(e)),
            }
            fd = rustix::fs::openat(
                &fd,
                comp,
                OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(shown)?;
        }
        Ok(fd)
    }

    /// Where the conflict copy `name` of `path` is.
    fn conflict_path(&self, path: &RelPath, name: &str) -> PathBuf {
        let rel = path
            .parent()
            .map(|p| p.as_path().join(name))
            .unwrap_or_else(|| name.into());
        self.state_dir.join("conflicts").join(rel)
    }

    /// Moves the entry `from` (in `dir`) to
    /// `.hubsync/conflicts/<path>.conflict-<suffix>`, never over an existing copy.
    /// Returns where it went.
    fn keep_at(
        &mut self,
        dir: &OwnedFd,
        from: &[u8],
        path: &RelPath,
        suffix: &str,
    ) -> Result<PathBuf, OpError> {
        let cdir = self.conflicts_dir(path)?;
        let base = String::from_utf8_lossy(path.file_name()).into_owned();
        let mut where_ = |name: &str| {
            let at = self.conflict_path(path, name);
            self.kept.push((path.clone(), at.clone()));
            at
        };
        for n in 1..1000 {
            let name = if n == 1 {
                format!("{base}.conflict-{suffix}")
            } else {
                format!("{base}.conflict-{suffix}-{n}")
            };
            match rustix::fs::renameat_with(dir, from, &cdir, name.as_str(), RenameFlags::NOREPLACE)
            {
                Ok(()) => return Ok(where_(&name)),
                Err(rustix::io::Errno::EXIST) => continue,
                Err(rustix::io::Errno::XDEV) => {
                    copy_aside(dir, from, &cdir, &name)?;
                    rustix::fs::unlinkat(dir, from, AtFlags::empty())?;
                    return Ok(where_(&name));
                }
                Err(e) => {
                    return Err(OpError::Io(format!(
                        "cannot keep the losing version of {path}: {}",
                        io::Error::from(e)
                    )));
                }
            }
        }
        Err(OpError::Io(format!("too many conflict copies of {path}")))
    }
}

impl Incoming {
    pub fn write(&mut self, bytes: &[u8]) {
        if self.error.is_some() {
            return;
        }
        self.written += bytes.len() as u64;
        if self.written > self.version.size() {
            self.error = Some(OpError::SourceChanged);
            return;
        }
        self.hasher.update(bytes);
        if let Err(e) = self.file.write_all(bytes) {
            self.error = Some(OpError::Io(format!("cannot write {}: {e}", self.path)));
        }
    }
}

impl Ready {
    pub fn into_parts(self) -> (RelPath, Version) {
        (self.path, self.version)
    }
}

/// Compares a fresh lstat with what the scan recorded.
pub fn matches_scan(st: &Stat, e: &CacheEntry) -> bool {
    matches_identity(st, e) && {
        // A directory's ctime moves whenever an entry is added or removed inside it,
        // which our own operations do; its identity is enough.
        FileType::from_raw_mode(st.st_mode) == FileType::Directory
            || Mtime::new(st.st_ctime, st.st_ctime_nsec as u32) == e.stat.ctime
    }
}

/// Same inode, kind, size and mtime as scanned.
fn matches_identity(st: &Stat, e: &CacheEntry) -> bool {
    let ft = FileType::from_raw_mode(st.st_mode);
    let kind_ok = match &e.version.kind {
        Kind::File { size, .. } => {
            ft == FileType::RegularFile
                && st.st_size as u64 == *size
                && Mtime::new(st.st_mtime, st.st_mtime_nsec as u32) == e.version.mtime
        }
        Kind::Dir => ft == FileType::Directory,
        Kind::Symlink { .. } => ft == FileType::Symlink,
    };
    kind_ok && st.st_ino == e.stat.ino && st.st_dev == e.stat.dev
}

/// The time part of conflict-copy names: `20261204T163424Z`.
pub fn conflict_time(t: Mtime) -> String {
    let (y, mo, d, h, mi, s) = crate::version::civil_from_unix(t.secs);
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z")
}

pub fn stat_key(st: &Stat) -> StatKey {
    StatKey {
        dev: st.st_dev,
        ino: st.st_ino,
        ctime: Mtime::new(st.st_ctime, st.st_ctime_nsec as u32),
    }
}

fn times(mtime: Mtime) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_NOW,
        },
        last_modification: Timespec {
            tv_sec: mtime.secs,
            tv_nsec: mtime.nanos as _,
        },
    }
}

fn create_temp(dir: &OwnedFd) -> Result<(File, String), OpError> {
    loop {
        let temp = temp_name();
        match rustix::fs::openat(
            dir,
            temp.as_str(),
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        ) {
            Ok(fd) => return Ok((File::from(fd), temp)),
            Err(rustix::io::Errno::EXIST) => continue,
            Err(e) => {
                return Err(OpError::Io(format!(
                    "cannot create a temp file: {}",
                    io::Error::from(e)
                )));
            }
        }
    }
}

fn remove_dir(dir: &OwnedFd, name: &[u8]) -> Result<(), OpError> {
    rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR).map_err(|e| match e {
        rustix::io::Errno::NOTEMPTY | rustix::io::Errno::EXIST => OpError::Refused(
            "directory not empty (it holds excluded or new files); left in place".into(),
        ),
        e => e.into(),
    })
}

/// Renames without replacing: fails with `Changed` if the name was taken meanwhile.
fn rename_noreplace(dir: &OwnedFd, from: &str, to: &[u8]) -> Result<(), OpError> {
    match rustix::fs::renameat_with(dir, from, dir, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::EXIST) => Err(OpError::Changed),
        // Filesystems without RENAME_NOREPLACE: link() also refuses to replace.
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
            rustix::fs::linkat(dir, from, dir, to, AtFlags::empty()).map_err(|e| match e {
                rustix::io::Errno::EXIST => OpError::Changed,
                e => e.into(),
            })?;
            Ok(rustix::fs::unlinkat(dir, from, AtFlags::empty())?)
        }
        Err(e) => Err(e.into()),
    }
}

/// Copies a file or symlink into the conflicts directory when a hard link is not
/// possible (the state directory on another filesystem).
fn copy_aside(src_dir: &OwnedFd, name: &[u8], cdir: &OwnedFd, to: &str) -> Result<(), OpError> {
    let st = rustix::fs::statat(src_dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
        return Err(OpError::Refused(
            "cannot keep a losing directory across filesystems; put the state directory on the replica's filesystem".into(),
        ));
    }
    if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
        let target = rustix::fs::readlinkat(src_dir, name, Vec::new())?;
        rustix::fs::symlinkat(target.as_bytes(), cdir, to)?;
        return Ok(());
    }
    let mut src = File::from(rustix::fs::openat(
        src_dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?);
    let mut dst = File::from(rustix::fs::openat(
        cdir,
        to,
        OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::from_raw_mode(st.st_mode & 0o777),
    )?);
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = src.read(&mut buf).map_err(io_err)?;
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n]).map_err(io_err)?;
    }
    rustix::fs::futimens(
        &dst,
        &times(Mtime::new(st.st_mtime, st.st_mtime_nsec as u32)),
    )?;
    dst.sync_all().map_err(io_err)?;
    Ok(())
}

#[cfg(test)]
mod tests;
