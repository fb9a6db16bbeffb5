use super::*;
use crate::exclude::Excludes;
use crate::scan::scan;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

fn rp(s: &str) -> RelPath {
    RelPath::new(s).unwrap()
}

fn file_version(content: &[u8], mtime: Mtime, mode: u32) -> Version {
    Version {
        kind: Kind::File {
            size: content.len() as u64,
            hash: Hash::of(content),
        },
        mode,
        mtime,
        uid: rustix::process::geteuid().as_raw(),
        gid: rustix::process::getegid().as_raw(),
    }
}

fn root(dir: &Path) -> Root {
    Root::open(dir, dir.join(".hubsync")).unwrap()
}

fn scanned(dir: &Path, path: &str) -> Option<CacheEntry> {
    let snap = scan(dir, &Excludes::default(), None, Mtime::now(), false, None).unwrap();
    snap.get(&rp(path)).cloned()
}

fn put(
    r: &mut Root,
    path: &str,
    content: &[u8],
    v: &Version,
    scanned: Option<&CacheEntry>,
    keep: Option<&str>,
) -> Result<StatKey, OpError> {
    let mut inc = r.begin_put(&rp(path), v.clone())?;
    inc.write(content);
    let ready = r.finish_put(inc)?;
    r.start_sync().recv().expect("sync thread")?;
    r.install(ready, scanned, keep)
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn new_file_gets_exact_mtime_and_mode_and_no_temp_is_left() {
    let d = tempfile::tempdir().unwrap();
    let mut r = root(d.path());
    let mtime = Mtime::new(1_700_000_000, 123_456_789);
    let v = file_version(b"hello", mtime, 0o640);
    let mut inc = r.begin_put(&rp("f"), v.clone()).unwrap();
    inc.write(b"hello");
    // Before the rename, the real name does not exist.
    assert!(!d.path().join("f").exists());
    let ready = r.finish_put(inc).unwrap();
    assert!(!d.path().join("f").exists());
    r.install(ready, None, None).unwrap();
    let m = std::fs::metadata(d.path().join("f")).unwrap();
    assert_eq!(std::fs::read(d.path().join("f")).unwrap(), b"hello");
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_700_000_000, 123_456_789));
    assert_eq!(m.permissions().mode() & 0o7777, 0o640);
    assert_eq!(names(d.path()), ["f"]);
}

#[test]
fn wrong_bytes_never_become_visible() {
    let d = tempfile::tempdir().unwrap();
    let mut r = root(d.path());
    let v = file_version(b"expected", Mtime::new(1, 0), 0o644);
    let mut inc = r.begin_put(&rp("f"), v.clone()).unwrap();
    inc.write(b"EXPECTED");
    assert_eq!(r.finish_put(inc).err(), Some(OpError::SourceChanged));
    let mut inc = r.begin_put(&rp("f"), v).unwrap();
    inc.write(b"expected and more");
    assert_eq!(r.finish_put(inc).err(), Some(OpError::SourceChanged));
    assert!(names(d.path()).is_empty(), "{:?}", names(d.path()));
}

#[test]
fn a_file_changed_since_the_scan_is_not_clobbered() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("f"), "old").unwrap();
    let seen = scanned(d.path(), "f");
    std::fs::write(d.path().join("f"), "user's new edit").unwrap();
    let mut r = root(d.path());
    let v = file_version(b"from peer", Mtime::new(5, 0), 0o644);
    let err = put(&mut r, "f", b"from peer", &v, seen.as_ref(), None).unwrap_err();
    assert_eq!(err, OpError::Changed);
    assert_eq!(
        std::fs::read_to_string(d.path().join("f")).unwrap(),
        "user's new edit"
    );
    assert_eq!(names(d.path()), ["f"]);
    // And a file that appeared where we expected nothing is not overwritten either.
    let err = put(&mut r, "f", b"from peer", &v, None, None).unwrap_err();
    assert_eq!(err, OpError::Changed);
    assert_eq!(
        std::fs::read_to_string(d.path().join("f")).unwrap(),
        "user's new edit"
    );
}

#[test]
fn the_loser_of_a_conflict_is_kept() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("page.txt"), "alice").unwrap();
    let alice_ino = std::fs::metadata(d.path().join("page.txt")).unwrap().ino();
    let seen = scanned(d.path(), "page.txt");
    let mut r = root(d.path());
    let v = file_version(b"bob", Mtime::new(9, 0), 0o644);
    put(
        &mut r,
        "page.txt",
        b"bob",
        &v,
        seen.as_ref(),
        Some("20261204T000000Z-hub"),
    )
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(d.path().join("page.txt")).unwrap(),
        "bob"
    );
    let kept = d
        .path()
        .join(".hubsync/conflicts/page.txt.conflict-20261204T000000Z-hub");
    assert_eq!(std::fs::read_to_string(&kept).unwrap(), "alice");
    assert_eq!(
        std::fs::metadata(&kept).unwrap().ino(),
        alice_ino,
        "the file itself"
    );
    assert_eq!(names(d.path()), [".hubsync", "page.txt"], "no temp left");
}

#[test]
fn symlinked_directories_are_never_followed() {
    let d = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    symlink(outside.path(), d.path().join("evil")).unwrap();
    let mut r = root(d.path());
    let v = file_version(b"x", Mtime::new(1, 0), 0o644);
    let err = put(&mut r, "evil/passwd", b"x", &v, None, None).unwrap_err();
    assert!(matches!(err, OpError::Refused(_)), "{err:?}");
    assert!(names(outside.path()).is_empty());
    assert!(matches!(
        r.open_read(&rp("evil")),
        Err(OpError::SourceChanged)
    ));
    assert!(r.open_read(&rp("evil/x")).is_err());
}

#[test]
fn directories_are_removed_only_when_empty() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("ns")).unwrap();
    std::fs::write(d.path().join("ns/keep"), "x").unwrap();
    let seen = scanned(d.path(), "ns");
    let mut r = root(d.path());
    let err = r.remove(&rp("ns"), seen.as_ref(), None).unwrap_err();
    assert!(matches!(err, OpError::Refused(_)), "{err:?}");
    assert!(d.path().join("ns/keep").exists());
    std::fs::remove_file(d.path().join("ns/keep")).unwrap();
    r.remove(&rp("ns"), seen.as_ref(), None).unwrap();
    assert!(!d.path().join("ns").exists());
}

#[test]
fn type_changes_in_both_directions() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("x"), "file").unwrap();
    let seen = scanned(d.path(), "x");
    let mut r = root(d.path());
    let dir = Version {
        kind: Kind::Dir,
        mode: 0o750,
        mtime: Mtime::new(1, 0),
        uid: 0,
        gid: 0,
    };
    r.mkdir(&rp("x"), &dir, seen.as_ref(), None).unwrap();
    let m = std::fs::symlink_metadata(d.path().join("x")).unwrap();
    assert!(m.is_dir());
    assert_eq!(m.permissions().mode() & 0o7777, 0o750);
    let seen = scanned(d.path(), "x");
    let link = Version {
        kind: Kind::Symlink {
            target: b"elsewhere".to_vec(),
        },
        mode: 0o777,
        mtime: Mtime::new(1, 0),
        uid: 0,
        gid: 0,
    };
    r.symlink(&rp("x"), &link, seen.as_ref(), None).unwrap();
    assert_eq!(
        std::fs::read_link(d.path().join("x")).unwrap().to_str(),
        Some("elsewhere")
    );
    assert_eq!(names(d.path()), ["x"]);
}

#[test]
fn set_meta_changes_only_metadata() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("f"), "same").unwrap();
    let seen = scanned(d.path(), "f").unwrap();
    let mut r = root(d.path());
    let mut v = seen.version.clone();
    v.mode = 0o600;
    v.mtime = Mtime::new(1_234_567_890, 42);
    r.set_meta(&rp("f"), &v, Some(&seen)).unwrap();
    let m = std::fs::metadata(d.path().join("f")).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o600);
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_234_567_890, 42));
    assert_eq!(std::fs::read_to_string(d.path().join("f")).unwrap(), "same");
}

fn md5_hex(s: &str) -> String {
    use md5::Digest;
    crate::util::hex(&md5::Md5::digest(s.as_bytes()))
}

#[test]
fn io_lock_is_dokuwikis_lock_directory_and_waits_for_a_holder() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("locks")).unwrap();
    let mut r = root(d.path());
    let lock = crate::proto::IoLock {
        dir: rp("locks"),
        of: rp("meta/wiki/start.changes"),
    };
    // DokuWiki names it by the md5 of the file's absolute path.
    let abs = format!("{}/meta/wiki/start.changes", d.path().display());
    let name = d.path().join("locks").join(md5_hex(&abs));
    let guard = r.io_lock(&lock).expect("a free lock is taken");
    assert!(name.is_dir());
    drop(guard);
    assert!(!name.exists(), "released on drop");

    // Held by DokuWiki: we wait until it lets go.
    std::fs::create_dir(&name).unwrap();
    let holder = {
        let name = name.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            std::fs::remove_dir(&name).unwrap();
        })
    };
    let start = std::time::Instant::now();
    let guard = r.io_lock(&lock).expect("taken once the holder is done");
    assert!(start.elapsed() >= std::time::Duration::from_millis(250));
    holder.join().unwrap();
    drop(guard);

    // No lock directory at all: nothing to take, no waiting.
    std::fs::remove_dir(d.path().join("locks")).unwrap();
    assert!(r.io_lock(&lock).is_none());
}

#[test]
fn remove_newer_removes_only_recent_matching_files_below_its_root() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    for f in [
        "cache/a/old.xhtml",
        "cache/a/new.xhtml",
        "cache/b/new.i",
        "pages/new.txt",
    ] {
        std::fs::create_dir_all(p.join(f).parent().unwrap()).unwrap();
        std::fs::write(p.join(f), f).unwrap();
    }
    let set = |path: &str, secs: i64| {
        let t = times(Mtime::new(secs, 0));
        rustix::fs::utimensat(rustix::fs::CWD, p.join(path), &t, AtFlags::empty()).unwrap()
    };
    set("cache/a/old.xhtml", 1_000);
    set("cache/a/new.xhtml", 2_000);
    set("cache/b/new.i", 2_000);
    set("pages/new.txt", 2_000);
    // A symlink in the cache pointing outside is not followed.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("keep.xhtml"), "x").unwrap();
    symlink(outside.path(), p.join("cache/out")).unwrap();

    let mut r = root(p);
    let xhtml = |rel: &RelPath| rel.as_bytes().ends_with(b".xhtml");
    let n = r.remove_newer(&rp("cache"), &xhtml, Mtime::new(1_500, 0));
    assert_eq!(n, 1);
    assert!(
        p.join("cache/a/old.xhtml").exists(),
        "older than the revision"
    );
    assert!(!p.join("cache/a/new.xhtml").exists());
    assert!(p.join("cache/b/new.i").exists(), "not matched");
    assert!(p.join("pages/new.txt").exists(), "outside the walked root");
    assert!(
        outside.path().join("keep.xhtml").exists(),
        "behind a symlink"
    );
    // A regular file only: a directory or symlink of that name stays.
    assert!(!r.remove_derived(&rp("cache/out")));
    assert!(r.remove_derived(&rp("cache/b/new.i")));
    assert!(!p.join("cache/b/new.i").exists());
}

#[test]
fn remove_with_keep_moves_the_losing_change_to_the_conflicts() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    std::fs::create_dir(p.join("pages")).unwrap();
    std::fs::write(p.join("pages/p.txt"), "bob's edit").unwrap();
    let seen = scanned(p, "pages/p.txt");
    let mut r = root(p);
    r.remove(
        &rp("pages/p.txt"),
        seen.as_ref(),
        Some("20260101T000000Z-web2"),
    )
    .unwrap();
    assert!(!p.join("pages/p.txt").exists());
    let kept = p.join(".hubsync/conflicts/pages/p.txt.conflict-20260101T000000Z-web2");
    assert_eq!(std::fs::read(kept).unwrap(), b"bob's edit");
}
