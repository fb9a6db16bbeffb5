//! One run per replica root at a time.
//!
//! An OS lock (`flock` through std's `File::try_lock`) on `.hubsync/lock`, taken
//! without waiting by the hub for its root and by every `serve` for its own. The
//! kernel drops it when the process dies, so a crashed run never leaves a lock to
//! clean up by hand. The holder writes its pid into the file so that a refused run can
//! say who holds it.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A held lock; released on drop (or when the process ends, however it ends).
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{} is locked by another hubsync run{}", .root.display(), pid_note(.pid))]
    Held { root: PathBuf, pid: Option<u32> },
    // Not a `source`: the message already says it, and `{:#}` would repeat it.
    #[error("cannot lock {}: {error}", .path.display())]
    Io { path: PathBuf, error: io::Error },
}

fn pid_note(pid: &Option<u32>) -> String {
    match pid {
        Some(p) => format!(" (pid {p})"),
        None => String::new(),
    }
}

impl Lock {
    /// Takes the lock for the replica whose state directory is `state_dir`; `root`
    /// only names it in messages.
    pub fn acquire(root: &Path, state_dir: &Path) -> Result<Lock, LockError> {
        let path = state_dir.join("lock");
        let io_err = |error| LockError::Io {
            path: path.clone(),
            error,
        };
        // A root's own state directory stays in the root: a link there (planted
        // by whoever can rename entries of the root) would carry the lock, the
        // state files and the conflict copies elsewhere. A state directory given
        // with --state-dir is the admin's choice and may be anywhere.
        if state_dir == root.join(crate::exclude::STATE_DIR)
            && std::fs::symlink_metadata(state_dir).is_ok_and(|m| m.file_type().is_symlink())
        {
            return Err(io_err(io::Error::other(format!(
                "{} is a symlink; refusing to keep state through it",
                state_dir.display()
            ))));
        }
        std::fs::create_dir_all(state_dir).map_err(io_err)?;
        // Never through a symlink: the pid written below would truncate and
        // overwrite whatever a link planted here points to.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io_err)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut s = String::new();
                let _ = file.read_to_string(&mut s);
                return Err(LockError::Held {
                    root: root.to_path_buf(),
                    pid: s.trim().parse().ok(),
                });
            }
            Err(TryLockError::Error(e)) => return Err(io_err(e)),
        }
        file.set_len(0).map_err(io_err)?;
        file.rewind().map_err(io_err)?;
        writeln!(file, "{}", std::process::id()).map_err(io_err)?;
        Ok(Lock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_with_pid_and_released_on_drop() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join(".hubsync");
        let held = Lock::acquire(d.path(), &state).unwrap();
        match Lock::acquire(d.path(), &state) {
            Err(LockError::Held { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("expected Held, got {other:?}"),
        }
        drop(held);
        Lock::acquire(d.path(), &state).unwrap();
    }
}
