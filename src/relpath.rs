//! `RelPath`: a path inside a replica root, as it travels between replicas.
//!
//! Every path that comes from a scan, a state file or the wire is a `RelPath`, and a
//! `RelPath` can only be built through [`RelPath::new`], which refuses anything that
//! could name a file outside the root: absolute paths, `..`, `.`, empty components and
//! NUL bytes. Paths are raw bytes (Linux file names need not be UTF-8) joined by `/`.
//! They sort component by component (as if `/` were the smallest byte), which is the
//! order of a depth-first walk with sorted directory listings, so a walk can be merged
//! with a sorted cache as it goes; every subtree is contiguous in that order.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use bincode::de::{BorrowDecoder, Decoder};
use bincode::enc::Encoder;
use bincode::error::{DecodeError, EncodeError};

/// A normalized, non-empty, `/`-separated path relative to a replica root.
///
/// Shared (`Arc`): one path appears in a scan, a plan, the operations that carry it
/// out and the agreed state; copies cost a reference count, not an allocation.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RelPath(Arc<[u8]>);

impl Ord for RelPath {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let (a, b) = (&self.0, &other.0);
        match a.iter().zip(b.iter()).position(|(x, y)| x != y) {
            // NUL never occurs in a path, so mapping '/' to 0 makes it the smallest byte.
            Some(i) => {
                let key = |c: u8| if c == b'/' { 0 } else { c };
                key(a[i]).cmp(&key(b[i]))
            }
            None => a.len().cmp(&b.len()),
        }
    }
}

impl PartialOrd for RelPath {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Why a byte string is not a valid [`RelPath`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("empty path")]
    Empty,
    #[error("absolute path {0:?}")]
    Absolute(String),
    #[error("path {0:?} has an empty, '.' or '..' component")]
    BadComponent(String),
    #[error("path {0:?} contains a NUL byte")]
    Nul(String),
}

impl RelPath {
    /// Checks and wraps `bytes`.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, PathError> {
        let bytes = bytes.into();
        let lossy = || String::from_utf8_lossy(&bytes).into_owned();
        if bytes.is_empty() {
            return Err(PathError::Empty);
        }
        if bytes[0] == b'/' {
            return Err(PathError::Absolute(lossy()));
        }
        if bytes.contains(&0) {
            return Err(PathError::Nul(lossy()));
        }
        if bytes
            .split(|&b| b == b'/')
            .any(|c| c.is_empty() || c == b"." || c == b"..")
        {
            return Err(PathError::BadComponent(lossy()));
        }
        Ok(RelPath(Arc::from(bytes)))
    }

    /// Builds a `RelPath` from a filesystem path relative to a root.
    pub fn from_path(p: &Path) -> Result<Self, PathError> {
        Self::new(p.as_os_str().as_bytes())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn as_path(&self) -> &Path {
        Path::new(OsStr::from_bytes(&self.0))
    }

    /// The last component.
    pub fn file_name(&self) -> &[u8] {
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => &self.0[i + 1..],
            None => &self.0,
        }
    }

    /// The parent, or `None` for a top-level entry.
    pub fn parent(&self) -> Option<RelPath> {
        self.0
            .iter()
            .rposition(|&b| b == b'/')
            .map(|i| RelPath(self.0[..i].into()))
    }

    /// Components from the top.
    pub fn components(&self) -> impl Iterator<Item = &[u8]> {
        self.0.split(|&b| b == b'/')
    }

    /// Number of components.
    pub fn depth(&self) -> usize {
        self.0.iter().filter(|&&b| b == b'/').count() + 1
    }

    /// True when `other` lies strictly below `self`.
    pub fn is_ancestor_of(&self, other: &RelPath) -> bool {
        other.0.len() > self.0.len() + 1
            && other.0.starts_with(&self.0)
            && other.0[self.0.len()] == b'/'
    }

    /// `self/name`; `name` must be a single valid component.
    pub fn join(&self, name: &[u8]) -> Result<RelPath, PathError> {
        let mut v = Vec::with_capacity(self.0.len() + 1 + name.len());
        v.extend_from_slice(&self.0);
        v.push(b'/');
        v.extend_from_slice(name);
        RelPath::new(v)
    }

    /// Lossy UTF-8, for JSON and globs.
    pub fn to_string_lossy(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

/// Human form: UTF-8 where possible, with control characters and invalid bytes escaped
/// so that a file name holding a newline cannot forge a line of output.
impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for chunk in self.0.utf8_chunks() {
            for c in chunk.valid().chars() {
                if c.is_control() {
                    write!(f, "{}", c.escape_default())?;
                } else {
                    write!(f, "{c}")?;
                }
            }
            for b in chunk.invalid() {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

impl serde::Serialize for RelPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string_lossy())
    }
}

impl bincode::Encode for RelPath {
    fn encode<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        bincode::Encode::encode(&self.0[..], e)
    }
}

// Decoding validates: a path from the wire or a state file is hostile until checked.
impl<C> bincode::Decode<C> for RelPath {
    fn decode<D: Decoder<Context = C>>(d: &mut D) -> Result<Self, DecodeError> {
        let bytes: Vec<u8> = bincode::Decode::decode(d)?;
        RelPath::new(bytes).map_err(|e| DecodeError::OtherString(format!("invalid path: {e}")))
    }
}

impl<'de, C> bincode::BorrowDecode<'de, C> for RelPath {
    fn borrow_decode<D: BorrowDecoder<'de, Context = C>>(d: &mut D) -> Result<Self, DecodeError> {
        bincode::Decode::decode(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_escapes() {
        for bad in [
            &b""[..],
            b"/etc/passwd",
            b"..",
            b"a/../b",
            b"a/./b",
            b"a//b",
            b"a/",
            b"./a",
            b"a\0b",
        ] {
            assert!(RelPath::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn accepts_odd_but_valid_names() {
        for good in [
            &b"a"[..],
            b"a b/c",
            b"...",
            b"a/..b",
            b"new\nline",
            b"\xff\xfe",
        ] {
            assert!(RelPath::new(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn parents_and_ancestors() {
        let p = RelPath::new("a/b/c").unwrap();
        assert_eq!(p.parent().unwrap().as_bytes(), b"a/b");
        assert_eq!(p.file_name(), b"c");
        assert_eq!(p.depth(), 3);
        let a = RelPath::new("a").unwrap();
        assert!(a.is_ancestor_of(&p));
        assert!(!RelPath::new("a/b/c").unwrap().is_ancestor_of(&p));
        assert!(RelPath::new("a/b/").is_err());
        assert!(!RelPath::new("a/bc").unwrap().is_ancestor_of(&p));
        assert!(RelPath::new("x").unwrap().parent().is_none());
    }

    #[test]
    fn order_is_depth_first() {
        let mut v: Vec<RelPath> = ["a.txt", "a/b", "a", "a-b", "b", "a/b/c", "a/a"]
            .iter()
            .map(|s| RelPath::new(*s).unwrap())
            .collect();
        v.sort();
        let s: Vec<String> = v.iter().map(|p| p.to_string()).collect();
        assert_eq!(s, ["a", "a/a", "a/b", "a/b/c", "a-b", "a.txt", "b"]);
    }

    #[test]
    fn display_escapes_control_characters() {
        let p = RelPath::new(&b"new\nline\xff"[..]).unwrap();
        assert_eq!(p.to_string(), "new\\nline\\xff");
    }

    #[test]
    fn decode_refuses_escaping_paths() {
        let cfg = bincode::config::standard();
        let bytes = bincode::encode_to_vec(&b"../x"[..], cfg).unwrap();
        let r: Result<(RelPath, usize), _> = bincode::decode_from_slice(&bytes, cfg);
        assert!(r.is_err());
    }
}
