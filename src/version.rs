//! What one path holds on one replica: a [`Version`], and the [`State`] a scan reports.
//!
//! Equality here decides what counts as a change, so it is spelled out in
//! [`Version::same`] rather than derived: a file is its content, permission bits and
//! mtime (DokuWiki uses the mtime as the revision id, so an mtime-only change must
//! travel); a directory is its permission bits; a symlink is its target. Ownership and
//! the mtimes of directories and symlinks are carried along but never make a change.

use std::cmp::Ordering;
use std::fmt;

use bincode::{Decode, Encode};
use serde::Serialize;

use crate::relpath::RelPath;

/// A blake3 content hash.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Encode, Decode)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    pub fn of(bytes: &[u8]) -> Hash {
        Hash(*blake3::hash(bytes).as_bytes())
    }
    pub fn short(&self) -> String {
        self.0[..6].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.short())
    }
}

impl Serialize for Hash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&blake3::Hash::from(self.0).to_hex())
    }
}

/// A timestamp with nanoseconds, as the kernel keeps it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Encode, Decode)]
pub struct Mtime {
    pub secs: i64,
    pub nanos: u32,
}

impl Mtime {
    pub fn new(secs: i64, nanos: u32) -> Mtime {
        Mtime { secs, nanos }
    }
    pub fn now() -> Mtime {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Mtime::new(d.as_secs() as i64, d.subsec_nanos())
    }
    pub fn as_nanos(&self) -> i128 {
        self.secs as i128 * 1_000_000_000 + self.nanos as i128
    }
}

impl fmt::Debug for Mtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:09}", self.secs, self.nanos)
    }
}

impl fmt::Display for Mtime {
    /// UTC, to the second, plus nanoseconds when present: what an admin compares.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, mo, d, h, mi, s) = civil_from_unix(self.secs);
        write!(f, "{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}")?;
        if self.nanos != 0 {
            write!(f, ".{:09}", self.nanos)?;
        }
        write!(f, "Z")
    }
}

impl Serialize for Mtime {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}.{:09}", self.secs, self.nanos))
    }
}

/// Days-to-civil conversion (proleptic Gregorian, UTC), so that we need no date crate
/// just to print a time.
pub fn civil_from_unix(t: i64) -> (i64, u32, u32, u32, u32, u32) {
    let days = t.div_euclid(86_400);
    let rem = t.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        (rem / 60 % 60) as u32,
        (rem % 60) as u32,
    )
}

/// The kind of a path and what identifies its content.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Encode, Decode, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Kind {
    File {
        size: u64,
        hash: Hash,
    },
    Dir,
    Symlink {
        #[serde(serialize_with = "lossy_bytes")]
        target: Vec<u8>,
    },
}

fn lossy_bytes<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(b))
}

impl Kind {
    pub fn name(&self) -> &'static str {
        match self {
            Kind::File { .. } => "file",
            Kind::Dir => "directory",
            Kind::Symlink { .. } => "symlink",
        }
    }
    fn rank(&self) -> u8 {
        match self {
            Kind::Dir => 0,
            Kind::Symlink { .. } => 1,
            Kind::File { .. } => 2,
        }
    }
}

/// One version of one path.
#[derive(Clone, PartialEq, Eq, Hash, Encode, Decode, Serialize)]
pub struct Version {
    #[serde(flatten)]
    pub kind: Kind,
    /// Permission bits (`mode & 0o7777`).
    pub mode: u32,
    pub mtime: Mtime,
    pub uid: u32,
    pub gid: u32,
}

impl Version {
    /// Whether two versions are the same for synchronization purposes.
    pub fn same(&self, other: &Version) -> bool {
        match (&self.kind, &other.kind) {
            (Kind::File { .. }, Kind::File { .. }) => {
                self.kind == other.kind && self.mode == other.mode && self.mtime == other.mtime
            }
            (Kind::Dir, Kind::Dir) => self.mode == other.mode,
            (Kind::Symlink { target: a }, Kind::Symlink { target: b }) => a == b,
            _ => false,
        }
    }

    /// Same bytes (or same target, or both directories): replacing one by the other
    /// loses nothing, so no conflict copy is needed.
    pub fn same_content(&self, other: &Version) -> bool {
        self.kind == other.kind
    }

    pub fn is_dir(&self) -> bool {
        matches!(self.kind, Kind::Dir)
    }

    pub fn is_file(&self) -> bool {
        matches!(self.kind, Kind::File { .. })
    }

    /// Bytes a copy of this version moves.
    pub fn size(&self) -> u64 {
        match &self.kind {
            Kind::File { size, .. } => *size,
            _ => 0,
        }
    }

    /// The documented order of conflict resolution: newest mtime first; on equal mtimes
    /// the greater content (kind, then hash or target bytes) wins. Replica order never
    /// plays a part, so every hub reaches the same verdict.
    pub fn precedence(&self, other: &Version) -> Ordering {
        self.mtime
            .cmp(&other.mtime)
            .then_with(|| self.kind.rank().cmp(&other.kind.rank()))
            .then_with(|| match (&self.kind, &other.kind) {
                (Kind::File { hash: a, size: sa }, Kind::File { hash: b, size: sb }) => {
                    a.cmp(b).then(sa.cmp(sb))
                }
                (Kind::Symlink { target: a }, Kind::Symlink { target: b }) => a.cmp(b),
                _ => Ordering::Equal,
            })
            .then_with(|| self.mode.cmp(&other.mode))
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::File { size, hash } => write!(
                f,
                "file({size}B {hash:?} {:o} @{:?})",
                self.mode, self.mtime
            ),
            Kind::Dir => write!(f, "dir({:o})", self.mode),
            Kind::Symlink { target } => {
                write!(f, "symlink(->{})", String::from_utf8_lossy(target))
            }
        }
    }
}

/// What a scan reports for one path.
#[derive(Clone, PartialEq, Eq, Debug, Encode, Decode)]
pub enum State {
    Absent,
    Present(Version),
    /// The path exists but cannot be judged this run (it kept changing while being
    /// hashed, or is a socket, fifo or device). Reconciliation leaves such a path alone
    /// on every replica, and its agreed state stays as it was.
    Skip(String),
}

impl State {
    pub fn version(&self) -> Option<&Version> {
        match self {
            State::Present(v) => Some(v),
            _ => None,
        }
    }
}

/// One line of a scan as it crosses the wire.
#[derive(Clone, PartialEq, Eq, Debug, Encode, Decode)]
pub struct Entry {
    pub path: RelPath,
    pub state: State,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_unix(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(civil_from_unix(1_796_397_463), (2026, 12, 4, 15, 17, 43));
        assert_eq!(civil_from_unix(951_782_400), (2000, 2, 29, 0, 0, 0));
        assert_eq!(civil_from_unix(-1), (1969, 12, 31, 23, 59, 59));
    }

    fn file(content: &[u8], mtime: i64) -> Version {
        Version {
            kind: Kind::File {
                size: content.len() as u64,
                hash: Hash::of(content),
            },
            mode: 0o644,
            mtime: Mtime::new(mtime, 0),
            uid: 0,
            gid: 0,
        }
    }

    #[test]
    fn sameness() {
        let a = file(b"x", 10);
        let mut b = a.clone();
        b.uid = 5;
        assert!(a.same(&b), "ownership is not a change");
        b.mtime = Mtime::new(11, 0);
        assert!(!a.same(&b), "mtime is a change for files");
        assert!(a.same_content(&b));
        let mut d1 = a.clone();
        d1.kind = Kind::Dir;
        let mut d2 = d1.clone();
        d2.mtime = Mtime::new(99, 0);
        assert!(d1.same(&d2), "directory mtimes are not changes");
    }

    #[test]
    fn precedence_is_newest_then_content() {
        assert_eq!(file(b"a", 2).precedence(&file(b"b", 1)), Ordering::Greater);
        let (x, y) = (file(b"a", 1), file(b"b", 1));
        assert_ne!(x.precedence(&y), Ordering::Equal);
        assert_eq!(x.precedence(&y), y.precedence(&x).reverse());
    }
}
