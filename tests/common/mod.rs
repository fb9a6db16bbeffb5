//! Integration-test helpers: temp replicas, the real binary, and listings that make a
//! failure readable (the command, its output and every replica's tree).

#![allow(dead_code)]

pub mod sshd;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const BIN: &str = env!("CARGO_BIN_EXE_hubsync");

/// A set of replica roots: `r(0)` is the hub.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub n: usize,
}

/// What one path holds, in a form that compares and prints well.
pub type Listing = BTreeMap<String, String>;

pub struct Run {
    pub cmd: String,
    pub out: Output,
}

impl Run {
    pub fn code(&self) -> i32 {
        self.out.status.code().unwrap_or(-1)
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.out.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", self.stdout()))
    }
}

impl Env {
    pub fn new(n: usize) -> Env {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..n {
            std::fs::create_dir(dir.path().join(format!("r{i}"))).unwrap();
        }
        Env { dir, n }
    }

    pub fn r(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("r{i}"))
    }

    pub fn p(&self, i: usize, rel: &str) -> PathBuf {
        self.r(i).join(rel)
    }

    /// Writes a file (creating parents) with the given mtime in seconds.
    pub fn write(&self, i: usize, rel: &str, content: &str, mtime: i64) {
        write_at(&self.p(i, rel), content.as_bytes(), mtime, 0);
    }

    pub fn read(&self, i: usize, rel: &str) -> String {
        std::fs::read_to_string(self.p(i, rel))
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", self.p(i, rel).display(), self.dump()))
    }

    pub fn exists(&self, i: usize, rel: &str) -> bool {
        std::fs::symlink_metadata(self.p(i, rel)).is_ok()
    }

    /// `hubsync sync r0 r1 ... rn-1 ARGS`.
    pub fn sync(&self, args: &[&str]) -> Run {
        let mut cmd = Command::new(BIN);
        cmd.arg("sync");
        for i in 0..self.n {
            cmd.arg(self.r(i));
        }
        cmd.args(args);
        run(cmd)
    }

    /// Runs a sync that must exit with `code`, showing everything if it does not.
    #[track_caller]
    pub fn sync_ok(&self, args: &[&str]) -> Run {
        self.sync_expect(0, args)
    }

    #[track_caller]
    pub fn sync_expect(&self, code: i32, args: &[&str]) -> Run {
        let r = self.sync(args);
        if r.code() != code {
            panic!(
                "expected exit {code}, got {}\n$ {}\n--- stdout\n{}--- stderr\n{}{}",
                r.code(),
                r.cmd,
                r.stdout(),
                r.stderr(),
                self.dump()
            );
        }
        r
    }

    pub fn listing(&self, i: usize) -> Listing {
        listing(&self.r(i))
    }

    /// Asserts that every replica holds the same tree (state directories aside).
    #[track_caller]
    pub fn assert_converged(&self) {
        let first = self.listing(0);
        for i in 1..self.n {
            if self.listing(i) != first {
                panic!("replicas differ\n{}", self.dump());
            }
        }
    }

    /// Every replica's tree, for failure messages.
    pub fn dump(&self) -> String {
        let mut s = String::new();
        for i in 0..self.n {
            let _ = writeln!(s, "--- r{i}");
            for (p, d) in listing_all(&self.r(i)) {
                let _ = writeln!(s, "  {p:?}: {d}");
            }
        }
        s
    }
}

pub fn run(mut cmd: Command) -> Run {
    let desc = format!("{cmd:?}");
    let out = cmd.output().expect("running hubsync");
    Run { cmd: desc, out }
}

pub fn write_at(p: &Path, content: &[u8], secs: i64, nanos: u32) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
    set_mtime(p, secs, nanos);
}

pub fn set_mtime(p: &Path, secs: i64, nanos: u32) {
    let t = UNIX_EPOCH + Duration::new(secs as u64, nanos);
    std::fs::File::options()
        .write(true)
        .open(p)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

pub fn mtime_ns(p: &Path) -> (i64, i64) {
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.mtime(), m.mtime_nsec())
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn describe(p: &Path) -> String {
    let m = std::fs::symlink_metadata(p).unwrap();
    let ft = m.file_type();
    if ft.is_symlink() {
        format!("link -> {}", std::fs::read_link(p).unwrap().display())
    } else if ft.is_dir() {
        format!("dir {:o}", m.permissions().mode() & 0o7777)
    } else {
        let content = std::fs::read(p).unwrap();
        let shown = if content.len() <= 40 {
            format!("{:?}", String::from_utf8_lossy(&content))
        } else {
            format!(
                "{} bytes {}",
                content.len(),
                &blake3::hash(&content).to_hex()[..12]
            )
        };
        format!(
            "file {shown} {:o} mtime {}.{:09}",
            m.permissions().mode() & 0o7777,
            m.mtime(),
            m.mtime_nsec()
        )
    }
}

fn walk(root: &Path, rel: &Path, out: &mut Listing, skip_state: bool) {
    let mut names: Vec<_> = std::fs::read_dir(root.join(rel))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    for name in names {
        let r = rel.join(&name);
        if skip_state && r == Path::new(".hubsync") {
            continue;
        }
        let p = root.join(&r);
        out.insert(r.to_string_lossy().into_owned(), describe(&p));
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            walk(root, &r, out, skip_state);
        }
    }
}

/// The tree under `root`, without the state directory.
pub fn listing(root: &Path) -> Listing {
    let mut out = Listing::new();
    if root.is_dir() {
        walk(root, Path::new(""), &mut out, true);
    }
    out
}

/// The tree under `root`, state directory included.
pub fn listing_all(root: &Path) -> Listing {
    let mut out = Listing::new();
    if root.is_dir() {
        walk(root, Path::new(""), &mut out, false);
    }
    out
}

/// Every byte of every file under `root` (state included), for "nothing changed".
pub fn bytes_of(root: &Path, skip: &[&str]) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for (p, d) in listing_all(root) {
        if skip.iter().any(|s| p == *s) {
            continue;
        }
        let full = root.join(&p);
        let data = if d.starts_with("file") {
            std::fs::read(&full).unwrap()
        } else {
            d.into_bytes()
        };
        let m = std::fs::symlink_metadata(&full).unwrap();
        let mut key = data;
        key.extend_from_slice(format!("|{}.{}", m.mtime(), m.mtime_nsec()).as_bytes());
        out.insert(p, key);
    }
    out
}

/// Files under `dir` whose path below it contains `needle`.
///
/// Tests also poll with this while a run writes under `dir`, so entries that
/// vanish between listing and looking (temp files renamed, the lock removed) are
/// skipped rather than fatal.
pub fn find(dir: &Path, needle: &str) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .min_depth(1)
        .sort_by_file_name()
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| {
            let rel = e.path().strip_prefix(dir).unwrap_or(e.path());
            rel.to_string_lossy().contains(needle)
        })
        .map(walkdir::DirEntry::into_path)
        .collect()
}
