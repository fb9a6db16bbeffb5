//! On-disk state: the scan cache and the agreed state of each pair, in one checked
//! container format.
//!
//! A state file is `MAGIC, kind, format version, header, entry count, entries…,
//! blake3 of all of that`. It is written atomically (temp, fsync, rename) and read as
//! a stream, so a 100,000-entry state never needs a second copy in memory. Any doubt —
//! missing, truncated, wrong checksum, another format version — is a [`StateError`],
//! and every caller treats that as "no agreed state": nothing is ever deleted on the
//! strength of a state file we could not fully verify.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use bincode::{Decode, Encode};

use crate::relpath::RelPath;
use crate::version::Version;

const MAGIC: &[u8; 14] = b"hubsync-state\n";
/// Bumped whenever the encoding of any state file changes.
pub const FORMAT_VERSION: u32 = 1;
const KIND_SCAN_CACHE: u8 = 1;
const KIND_PAIR: u8 = 3;
/// No single header or entry is larger than this; a corrupt length prefix cannot make
/// us allocate more.
const MAX_ITEM: usize = 16 << 20;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_ITEM>()
}

/// Why a state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{}: no state file yet", .path.display())]
    Missing { path: PathBuf },
    #[error(
        "{}: written in state format {found}, this hubsync reads format {expected}",
        .path.display()
    )]
    Foreign {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("{}: corrupt state file ({why})", .path.display())]
    Corrupt { path: PathBuf, why: String },
    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// A random replica identity, kept in `.hubsync/replica-id`. A replica that lost its
/// state directory gets a new one, which makes every hub treat it as a first sync.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Encode, Decode)]
pub struct ReplicaId(pub [u8; 16]);

impl ReplicaId {
    pub fn random() -> ReplicaId {
        let mut b = [0u8; 16];
        crate::util::random_bytes(&mut b);
        ReplicaId(b)
    }
    pub fn hex(&self) -> String {
        crate::util::hex(&self.0)
    }
    fn parse(s: &str) -> Option<ReplicaId> {
        let s = s.trim();
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut b = [0u8; 16];
        for (i, out) in b.iter_mut().enumerate() {
            *out = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(ReplicaId(b))
    }

    /// Reads the id of the replica whose state lives in `state_dir`, creating one if
    /// there is none (unless `create` is false). Returns the id and a warning when an
    /// unreadable id had to be replaced.
    pub fn load(state_dir: &Path, create: bool) -> io::Result<(Option<ReplicaId>, Option<String>)> {
        let path = state_dir.join("replica-id");
        let mut warning = None;
        let unreadable = |why: &str| {
            format!(
                "{}: unreadable replica id ({why}), making a new one (this replica will be treated as new by every hub)",
                path.display()
            )
        };
        match crate::util::read_state_file(&path) {
            Ok(s) => match ReplicaId::parse(&String::from_utf8_lossy(&s)) {
                Some(id) => return Ok((Some(id), None)),
                None => warning = Some(unreadable("not an id")),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            // A link or a special file planted there: replaced, never followed.
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                warning = Some(unreadable(&e.to_string()))
            }
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                warning = Some(unreadable(&e.to_string()))
            }
            Err(e) => return Err(e),
        }
        if !create {
            return Ok((None, warning));
        }
        let id = ReplicaId::random();
        crate::util::write_atomic(&path, |f| writeln!(f, "{}", id.hex()))?;
        Ok((Some(id), warning))
    }
}

impl std::fmt::Debug for ReplicaId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", &self.hex()[..8])
    }
}

/// Identifies one agreed state of a pair: a random number drawn at each commit, kept
/// by both sides. Equal tokens mean both sides applied the same commits.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Encode, Decode)]
pub struct Token(pub u64);

impl Token {
    pub fn new() -> Token {
        Token(crate::util::random_u64())
    }
}

impl Default for Token {
    fn default() -> Token {
        Token::new()
    }
}

/// The last state both sides of a pair agreed on, stored as its difference from
/// this replica's scan cache: in the steady state, what a pair agreed on is what
/// the tree holds, so the record is nearly empty and costs nothing to load or save.
///
/// The agreed version of a path is `diff[path]` if listed (`None`: agreed absent),
/// else the version in the scan cache whose generation is `base`. A record whose
/// `base` is not the generation of the cache on disk (a crash between saving the
/// two, a lost cache) cannot be read back, and counts as no agreed state at all.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PairRecord {
    pub peer_replica: Option<ReplicaId>,
    pub token: Token,
    pub base: u64,
    /// Files in the agreed state (for the unmounted-disk check).
    pub files: u64,
    pub diff: Vec<(RelPath, Option<Version>)>,
}

#[derive(Encode, Decode)]
struct PairHeader {
    peer_replica: Option<ReplicaId>,
    label: String,
    token: Token,
    base: u64,
    files: u64,
}

impl PairRecord {
    /// The listed agreed version of `path`: `Some(None)` = agreed absent,
    /// `None` = not listed (then the cache has it).
    pub fn get(&self, path: &RelPath) -> Option<Option<&Version>> {
        self.diff
            .binary_search_by(|e| e.0.cmp(path))
            .ok()
            .map(|i| self.diff[i].1.as_ref())
    }

    pub fn load(path: &Path) -> Result<PairRecord, StateError> {
        let mut diff: Vec<(RelPath, Option<Version>)> = Vec::new();
        let header: PairHeader =
            read_container(path, KIND_PAIR, |e: (RelPath, Option<Version>)| {
                if diff.last().is_some_and(|l| l.0 >= e.0) {
                    return Err("entries out of order".to_string());
                }
                diff.push(e);
                Ok(())
            })?;
        Ok(PairRecord {
            peer_replica: header.peer_replica,
            token: header.token,
            base: header.base,
            files: header.files,
            diff,
        })
    }

    pub fn save(&self, path: &Path, label: &str) -> io::Result<()> {
        let header = PairHeader {
            peer_replica: self.peer_replica,
            label: label.to_string(),
            token: self.token,
            base: self.base,
            files: self.files,
        };
        write_container(path, KIND_PAIR, &header, self.diff.iter())
    }
}

/// What the scan remembers about a file so that an unchanged one is not read again.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct CacheEntry {
    pub path: RelPath,
    pub version: Version,
    pub stat: crate::scan::StatKey,
    /// False when the file changed so recently that a further write within the same
    /// timestamp tick could go unseen ("racy clean" in git's words); such an entry is
    /// hashed again next time whatever its stat says.
    pub trusted: bool,
}

#[derive(Encode, Decode)]
struct CacheHeader {
    generation: u64,
    root: String,
}

/// A scan cache as loaded: its generation (which pair records refer to) and entries.
pub type ScanCache = (u64, Vec<CacheEntry>);

pub fn load_scan_cache(path: &Path) -> Result<ScanCache, StateError> {
    let mut entries: Vec<CacheEntry> = Vec::new();
    let header: CacheHeader = read_container(path, KIND_SCAN_CACHE, |e: CacheEntry| {
        if entries.last().is_some_and(|l| l.path >= e.path) {
            return Err("entries out of order".to_string());
        }
        entries.push(e);
        Ok(())
    })?;
    Ok((header.generation, entries))
}

/// The generation of the scan cache at `path`, read from its header alone (the
/// full load checks the whole file later): lets a session decide early whether
/// its pair records are usable.
pub fn scan_cache_generation(path: &Path) -> Option<u64> {
    let mut head = [0u8; 64];
    let n = std::io::Read::read(&mut crate::util::open_state_file(path).ok()?, &mut head).ok()?;
    let head = &head[..n];
    if head.len() < 19 || &head[..MAGIC.len()] != MAGIC || head[14] != KIND_SCAN_CACHE {
        return None;
    }
    let (g, _): (u64, usize) = bincode::decode_from_slice(&head[19..], config()).ok()?;
    Some(g)
}

pub fn save_scan_cache(
    path: &Path,
    root: &Path,
    generation: u64,
    entries: &[CacheEntry],
) -> io::Result<()> {
    let header = CacheHeader {
        generation,
        root: root.display().to_string(),
    };
    write_container(path, KIND_SCAN_CACHE, &header, entries.iter())
}

fn write_container<'a, H: Encode, E: Encode + 'a>(
    path: &Path,
    kind: u8,
    header: &H,
    entries: impl ExactSizeIterator<Item = &'a E>,
) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let to_io = |e: bincode::error::EncodeError| io::Error::other(e.to_string());
    crate::util::write_atomic(path, |f| {
        // Encoded in large pieces: hashing and writing many tiny fields one by one
        // would cost more than the encoding itself.
        let mut hasher = blake3::Hasher::new();
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
        buf.extend_from_slice(MAGIC);
        buf.push(kind);
        buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bincode::encode_into_std_write(header, &mut buf, config()).map_err(to_io)?;
        buf.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        for e in entries {
            bincode::encode_into_std_write(e, &mut buf, config()).map_err(to_io)?;
            if buf.len() >= 1 << 20 {
                hasher.update(&buf);
                f.write_all(&buf)?;
                buf.clear();
            }
        }
        hasher.update(&buf);
        buf.extend_from_slice(hasher.finalize().as_bytes());
        f.write_all(&buf)
    })
}

fn read_container<H: Decode<()>, E: Decode<()>>(
    path: &Path,
    kind: u8,
    mut each: impl FnMut(E) -> Result<(), String>,
) -> Result<H, StateError> {
    let corrupt = |why: String| StateError::Corrupt {
        path: path.to_path_buf(),
        why,
    };
    // The whole file at once: one read, one checksum over it, then decoding from
    // memory (much faster than feeding a hasher field by field).
    let bytes = match crate::util::read_state_file(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StateError::Missing {
                path: path.to_path_buf(),
            });
        }
        Err(source) => {
            return Err(StateError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    if bytes.len() < MAGIC.len() + 5 + 8 + 32 {
        return Err(corrupt("too short".into()));
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(corrupt("not a hubsync state file".into()));
    }
    let found = u32::from_le_bytes(bytes[15..19].try_into().expect("4 bytes"));
    if found != FORMAT_VERSION {
        return Err(StateError::Foreign {
            path: path.to_path_buf(),
            found,
            expected: FORMAT_VERSION,
        });
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err(corrupt("checksum mismatch".into()));
    }
    if body[14] != kind {
        return Err(corrupt(format!(
            "holds state of kind {}, expected {kind}",
            body[14]
        )));
    }
    let mut at = 19;
    let (header, used): (H, usize) = bincode::decode_from_slice(&body[at..], config())
        .map_err(|e| corrupt(format!("header: {e}")))?;
    at += used;
    let n = body
        .get(at..at + 8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .ok_or_else(|| corrupt("no entry count".into()))?;
    at += 8;
    for i in 0..n {
        let (e, used): (E, usize) = bincode::decode_from_slice(&body[at..], config())
            .map_err(|e| corrupt(format!("entry {i} of {n}: {e}")))?;
        at += used;
        each(e).map_err(|why| corrupt(format!("entry {i}: {why}")))?;
    }
    if at != body.len() {
        return Err(corrupt("trailing bytes after the entries".into()));
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::{Hash, Kind, Mtime};

    fn v(n: u8) -> Version {
        Version {
            kind: Kind::File {
                size: n as u64,
                hash: Hash([n; 32]),
            },
            mode: 0o644,
            mtime: Mtime::new(n as i64, 7),
            uid: 0,
            gid: 0,
        }
    }
    fn rp(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn sample() -> PairRecord {
        PairRecord {
            peer_replica: Some(ReplicaId([1; 16])),
            token: Token(42),
            base: 7,
            files: 3,
            diff: vec![
                (rp("a"), Some(v(1))),
                (rp("b"), None),
                (rp("c/d"), Some(v(3))),
            ],
        }
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pair.state");
        let a = sample();
        a.save(&p, "peer").unwrap();
        let b = PairRecord::load(&p).unwrap();
        assert_eq!(a.diff, b.diff);
        assert_eq!((a.token, a.base, a.files), (b.token, b.base, b.files));
        assert_eq!(b.get(&rp("b")), Some(None));
        assert_eq!(b.get(&rp("zz")), None);
    }

    #[test]
    fn every_truncation_and_bit_flip_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pair.state");
        sample().save(&p, "peer").unwrap();
        let good = std::fs::read(&p).unwrap();
        for len in 0..good.len() {
            std::fs::write(&p, &good[..len]).unwrap();
            assert!(PairRecord::load(&p).is_err(), "truncated at {len} accepted");
        }
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            std::fs::write(&p, &bad).unwrap();
            assert!(PairRecord::load(&p).is_err(), "flip at {i} accepted");
        }
        std::fs::write(&p, vec![0u8; good.len()]).unwrap();
        assert!(matches!(
            PairRecord::load(&p),
            Err(StateError::Corrupt { .. })
        ));
    }

    #[test]
    fn foreign_version_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pair.state");
        sample().save(&p, "peer").unwrap();
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[15..19].copy_from_slice(&99u32.to_le_bytes());
        std::fs::write(&p, &bytes).unwrap();
        let err = PairRecord::load(&p).unwrap_err();
        assert!(
            matches!(err, StateError::Foreign { found: 99, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("format 99"));
    }

    #[test]
    fn missing_is_distinct() {
        let err = PairRecord::load(Path::new("/nonexistent/x")).unwrap_err();
        assert!(matches!(err, StateError::Missing { .. }));
    }

    #[test]
    fn the_cache_generation_is_read_from_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("scan-cache");
        save_scan_cache(&p, dir.path(), 123_456_789, &[]).unwrap();
        assert_eq!(scan_cache_generation(&p), Some(123_456_789));
        assert_eq!(load_scan_cache(&p).unwrap().0, 123_456_789);
        assert_eq!(scan_cache_generation(&dir.path().join("none")), None);
    }

    #[test]
    fn replica_id_survives_and_regenerates() {
        let dir = tempfile::tempdir().unwrap();
        let (a, w) = ReplicaId::load(dir.path(), true).unwrap();
        assert!(w.is_none());
        let (b, _) = ReplicaId::load(dir.path(), true).unwrap();
        assert_eq!(a, b);
        std::fs::write(dir.path().join("replica-id"), "garbage").unwrap();
        let (c, w) = ReplicaId::load(dir.path(), true).unwrap();
        assert!(w.is_some());
        assert_ne!(a, c);
    }
}
