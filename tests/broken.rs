//! Broken ground under a run: damaged or foreign state files, a state directory
//! with planted symlinks, a root that is a symlink, a root on a read-only
//! filesystem, a peer of another protocol version. Each must end in a clear
//! message naming the file or the replica, and lose nothing: a state file that
//! cannot be fully trusted means a first sync (a union), never a deletion.

mod common;

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const T0: i64 = 1_700_000_000;

/// Three replicas in step, holding `doomed` and `other` everywhere.
fn synced() -> Env {
    let e = Env::new(3);
    e.write(0, "doomed.txt", "d", T0);
    e.write(0, "other.txt", "o", T0);
    e.sync_ok(&[]);
    e.sync_ok(&[]);
    e
}

/// Ways to damage a state file.
#[derive(Debug, Clone, Copy)]
enum Damage {
    ForeignVersion,
    Truncated,
    Zeroed,
    Random,
    Empty,
}

const DAMAGES: [Damage; 5] = [
    Damage::ForeignVersion,
    Damage::Truncated,
    Damage::Zeroed,
    Damage::Random,
    Damage::Empty,
];

fn damage(p: &Path, how: Damage, seed: u64) {
    let mut b = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    match how {
        Damage::ForeignVersion if b.starts_with(b"hubsync-state\n") => {
            b[15..19].copy_from_slice(&2u32.to_le_bytes())
        }
        // The replica id is text: another "version" of it is another format.
        Damage::ForeignVersion => b = b"v2:0123456789abcdef\n".to_vec(),
        Damage::Truncated => b.truncate(b.len() / 2),
        Damage::Zeroed => b.iter_mut().for_each(|x| *x = 0),
        Damage::Random => {
            let mut x = seed | 1;
            for byte in b.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *byte = x as u8;
            }
        }
        Damage::Empty => b.clear(),
    }
    std::fs::write(p, b).unwrap();
}

/// The state files of replica `i` that decide what was agreed.
fn state_files(e: &Env, i: usize) -> Vec<PathBuf> {
    let state = e.p(i, ".hubsync");
    let mut files = vec![state.join("scan-cache"), state.join("replica-id")];
    let mut pairs: Vec<PathBuf> = std::fs::read_dir(state.join("pairs"))
        .unwrap()
        .map(|d| d.unwrap().path())
        .collect();
    pairs.sort();
    files.extend(pairs);
    files
}

fn damaged_state_loses_nothing(replica: usize) {
    let e = synced();
    let files = state_files(&e, replica);
    assert!(files.len() >= 3, "{files:?}");
    let mut seed = 1;
    for file in &files {
        for how in DAMAGES {
            seed += 1;
            // A deletion waits on r1; with its agreed state in doubt it must not
            // be carried out.
            std::fs::remove_file(e.p(1, "doomed.txt")).unwrap();
            damage(file, how, seed);
            let r = e.sync_expect(0, &["--json"]);
            let said = format!("{}{}", r.stdout(), r.stderr());
            let what = format!("{} {how:?}", file.display());
            assert!(
                said.contains(&file.display().to_string()),
                "{what}: the file is not named:\n{said}"
            );
            assert!(
                said.contains("first sync") || said.contains("hashing every file again"),
                "{what}:\n{said}"
            );
            for i in 0..3 {
                assert!(e.exists(i, "doomed.txt"), "{what}: deleted on r{i}\n{said}");
                assert_eq!(
                    e.read(i, "doomed.txt"),
                    "d",
                    "{what}: deleted on r{i}\n{said}"
                );
                assert_eq!(e.read(i, "other.txt"), "o", "{what}");
            }
            e.assert_converged();
            // The run rewrote its state: the next one is quiet.
            let again = e.sync_ok(&["--json"]).json();
            assert!(
                again["plan"].as_array().unwrap().is_empty(),
                "{what}: {again}"
            );
            assert!(
                again["warnings"].as_array().unwrap().is_empty(),
                "{what}: {again}"
            );
        }
    }
}

#[test]
fn damaged_hub_state_files_mean_a_first_sync_without_deletions() {
    damaged_state_loses_nothing(0);
}

#[test]
fn damaged_peer_state_files_mean_a_first_sync_without_deletions() {
    damaged_state_loses_nothing(1);
}

#[test]
fn symlinks_planted_in_a_state_directory_are_not_followed() {
    let e = Env::new(2);
    let outside = e.dir.path().join("outside");
    for i in 0..2 {
        for f in ["lock", "replica-id", "scan-cache", "status.json"] {
            write_at(&outside.join(format!("r{i}-{f}")), b"outside\n", T0, 0);
        }
        std::fs::create_dir_all(outside.join(format!("r{i}-dir"))).unwrap();
    }
    let before = bytes_of(&outside, &[]);
    e.write(0, "sub/page.txt", "v0", T0);
    e.sync_ok(&[]);
    let plant = |i: usize, f: &str| {
        let p = e.p(i, &format!(".hubsync/{f}"));
        let _ = std::fs::remove_file(&p);
        symlink(outside.join(format!("r{i}-{f}")), &p).unwrap();
    };
    // The lock: a run that cannot take it safely does not start (the hub) or
    // leaves that peer out.
    plant(0, "lock");
    let r = e.sync_expect(1, &[]);
    assert!(
        r.stderr()
            .contains(&e.p(0, ".hubsync/lock").display().to_string()),
        "{}",
        r.stderr()
    );
    assert_eq!(bytes_of(&outside, &[]), before, "written outside");
    std::fs::remove_file(e.p(0, ".hubsync/lock")).unwrap();
    plant(1, "lock");
    let r = e.sync_expect(1, &[]);
    assert!(r.stderr().contains("peer r1:"), "{}", r.stderr());
    assert_eq!(bytes_of(&outside, &[]), before, "written outside");
    std::fs::remove_file(e.p(1, ".hubsync/lock")).unwrap();

    // The other state files lead to fifos: a run that followed a link to read
    // one would hang there (and is stopped by `timeout`); and a directory of
    // conflict copies.
    let fifos = e.dir.path().join("fifos");
    std::fs::create_dir(&fifos).unwrap();
    for i in 0..2 {
        for f in ["replica-id", "scan-cache", "status.json"] {
            let fifo = fifos.join(format!("r{i}-{f}"));
            rustix::fs::mkfifoat(
                rustix::fs::CWD,
                &fifo,
                rustix::fs::Mode::from_raw_mode(0o600),
            )
            .unwrap();
            let p = e.p(i, &format!(".hubsync/{f}"));
            let _ = std::fs::remove_file(&p);
            symlink(&fifo, &p).unwrap();
        }
        let conflicts = e.p(i, ".hubsync/conflicts");
        std::fs::create_dir_all(&conflicts).unwrap();
        symlink(outside.join(format!("r{i}-dir")), conflicts.join("sub")).unwrap();
    }
    // A conflict, so that a losing version is kept under conflicts/sub/.
    e.write(0, "sub/page.txt", "hub edit", T0 + 10);
    e.write(1, "sub/page.txt", "peer edit", T0 + 20);
    let mut c = Command::new("timeout");
    c.args(["30", BIN, "sync"]).arg(e.r(0)).arg(e.r(1));
    let r = run(c);
    let said = format!("{}{}", r.stdout(), r.stderr());
    assert_ne!(
        r.code(),
        124,
        "the run hung reading through a link:\n{said}"
    );
    assert_ne!(r.code(), 101, "{said}");
    assert_eq!(bytes_of(&outside, &[]), before, "written outside:\n{said}");
    for i in 0..2 {
        for f in ["replica-id", "scan-cache"] {
            let p = e.p(i, &format!(".hubsync/{f}"));
            assert!(
                said.contains(&p.display().to_string()),
                "{f} not named:\n{said}"
            );
        }
    }
    // Whatever the run did, the losing edit is not lost.
    let mut versions: Vec<String> = (0..2)
        .filter_map(|i| std::fs::read_to_string(e.p(i, "sub/page.txt")).ok())
        .collect();
    for i in 0..2 {
        for k in find(&e.p(i, ".hubsync"), "page.txt.conflict-") {
            versions.push(std::fs::read_to_string(k).unwrap());
        }
    }
    assert!(
        versions.contains(&"hub edit".to_string()),
        "{versions:?}\n{said}"
    );
    assert!(
        versions.contains(&"peer edit".to_string()),
        "{versions:?}\n{said}"
    );
}

/// The tree and state of every replica, bytes and mtimes (lock files aside).
fn everything(e: &Env) -> Vec<std::collections::BTreeMap<String, Vec<u8>>> {
    (0..e.n)
        .map(|i| bytes_of(&e.r(i), &[".hubsync/lock", ".hubsync/status.json"]))
        .collect()
}

#[test]
fn a_root_that_is_a_symlink_is_refused_and_its_target_left_alone() {
    // Documented in scan::check_root: a symlinked root could be swapped during a
    // run, so the real directory must be given.
    let e = synced();
    let link = e.dir.path().join("link-to-r1");
    symlink(e.r(1), &link).unwrap();
    let r1 = bytes_of(&e.r(1), &[]);
    let mut c = Command::new(BIN);
    c.arg("sync")
        .arg(e.r(0))
        .arg(&link)
        .arg(e.r(2))
        .arg("--json");
    let r = run(c);
    assert_eq!(r.code(), 2, "{}", r.stderr());
    let j = r.json();
    let why = j["replicas"][1]["error"].as_str().unwrap();
    assert!(
        why.contains("is a symlink") && why.contains(&e.r(1).display().to_string()),
        "{why}"
    );
    assert!(r.stderr().contains("peer link-to-r1:"), "{}", r.stderr());
    assert_eq!(bytes_of(&e.r(1), &[]), r1, "the link's target was touched");
    let before = everything(&e);
    // The hub's own root.
    let hub_link = e.dir.path().join("link-to-r0");
    symlink(e.r(0), &hub_link).unwrap();
    let mut c = Command::new(BIN);
    c.arg("sync").arg(&hub_link).arg(e.r(1)).arg(e.r(2));
    let r = run(c);
    assert_eq!(r.code(), 1, "{}", r.stderr());
    assert!(
        r.stderr().contains("is a symlink") && r.stderr().contains("hub's root"),
        "{}",
        r.stderr()
    );
    assert_eq!(everything(&e), before);
}

/// A small tmpfs, unmounted on drop; `None` (with a message) where mounting is not
/// possible (no root, no CAP_SYS_ADMIN).
struct Mount(PathBuf);

impl Mount {
    fn new(at: &Path) -> Option<Mount> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
            .arg(at)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !ok {
            eprintln!(
                "SKIPPED: cannot mount a tmpfs at {} (needs root or CAP_SYS_ADMIN)",
                at.display()
            );
            return None;
        }
        Some(Mount(at.to_path_buf()))
    }

    fn remount(&self, mode: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_root_on_a_read_only_filesystem_is_reported_and_loses_nothing() {
    let e = Env::new(3);
    // r1 lives on its own filesystem.
    std::fs::remove_dir(e.r(1)).unwrap();
    let Some(m) = Mount::new(&e.r(1)) else {
        return;
    };
    e.write(0, "a.txt", "a", T0);
    e.write(1, "b.txt", "b", T0);
    e.sync_ok(&[]);
    e.assert_converged();
    m.remount("ro");
    e.write(0, "a.txt", "a2", T0 + 10);
    std::fs::remove_file(e.p(2, "b.txt")).unwrap();
    let r1_before = bytes_of(&e.r(1), &[]);
    let r = e.sync_expect(2, &["--json"]);
    let j = r.json();
    let why = j["replicas"][1]["error"].as_str().unwrap();
    assert!(why.contains("Read-only file system"), "{why}");
    assert!(why.contains(&e.r(1).display().to_string()), "{why}");
    assert_eq!(bytes_of(&e.r(1), &[]), r1_before);
    assert_eq!(e.read(2, "a.txt"), "a2");
    // Without r1 the deletion on r2 still went to the hub (the pair hub-r2 agreed
    // on b.txt); r1 keeps its copy and gets the deletion once it is writable.
    assert!(!e.exists(0, "b.txt") && e.exists(1, "b.txt"));
    m.remount("rw");
    e.sync_ok(&[]);
    e.assert_converged();
    assert_eq!(e.read(1, "a.txt"), "a2");
    assert!(!e.exists(1, "b.txt"));

    // The hub's own root read-only: nothing runs, nothing changes anywhere.
    let e = Env::new(2);
    std::fs::remove_dir(e.r(0)).unwrap();
    let Some(m) = Mount::new(&e.r(0)) else {
        return;
    };
    e.write(0, "a.txt", "a", T0);
    e.write(1, "b.txt", "b", T0);
    e.sync_ok(&[]);
    m.remount("ro");
    e.write(1, "c.txt", "c", T0);
    let before = everything(&e);
    let r = e.sync_expect(1, &[]);
    assert!(
        r.stderr().contains("Read-only file system")
            && r.stderr().contains(&e.r(0).display().to_string()),
        "{}",
        r.stderr()
    );
    assert_eq!(everything(&e), before);
    drop(m);
}

#[test]
fn a_peer_of_another_protocol_version_is_refused_and_loses_nothing() {
    let e = synced();
    // r1 answers with version 99; the others are the real thing.
    let fake = e.dir.path().join("remote.sh");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\ncase \"$2\" in\n*/r1) echo 'hubsync-protocol 99'; exec cat >/dev/null ;;\nesac\nexec '{BIN}' \"$@\"\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::remove_file(e.p(2, "doomed.txt")).unwrap();
    e.write(0, "new.txt", "new", T0 + 5);
    let r1_before = bytes_of(&e.r(1), &[]);
    let hub_pairs = bytes_of(&e.p(0, ".hubsync/pairs"), &[]);
    let sync = |args: &[&str]| {
        let mut c = Command::new(BIN);
        c.arg("sync")
            .arg(e.r(0))
            .arg(e.r(1))
            .arg(e.r(2))
            .arg("--remote-command")
            .arg(&fake)
            .args(args);
        run(c)
    };
    let r = sync(&["--json"]);
    assert_eq!(r.code(), 2, "{}", r.stderr());
    let j = r.json();
    let why = j["replicas"][1]["error"].as_str().unwrap();
    assert!(
        why.contains("version 99")
            && why.contains(&format!("version {}", hubsync::proto::PROTOCOL_VERSION))
            && why.contains("install the same"),
        "{why}"
    );
    assert!(r.stderr().contains("peer r1:"), "{}", r.stderr());
    assert_eq!(bytes_of(&e.r(1), &[]), r1_before, "r1 was touched");
    // The others synced; the hub's record of r1 only moved to its new cache.
    assert_eq!(e.read(2, "new.txt"), "new");
    assert!(!e.exists(0, "doomed.txt"));
    let pairs_after = bytes_of(&e.p(0, ".hubsync/pairs"), &[]);
    assert_eq!(pairs_after.len(), hub_pairs.len());
    // Back with the right version, r1 catches up and nothing is lost.
    e.sync_ok(&[]);
    e.assert_converged();
    assert_eq!(e.read(1, "new.txt"), "new");
    assert!(!e.exists(1, "doomed.txt"));
    assert_eq!(e.read(1, "other.txt"), "o");
}

#[test]
fn a_loser_that_cannot_be_kept_stays_where_it_was() {
    // On r1 the place for conflict copies cannot be made (a file is in the way):
    // its losing version must stay in place, not vanish with the temp file.
    let e = Env::new(2);
    e.write(0, "page.txt", "v0", T0);
    e.write(0, "dir/page.txt", "v0", T0);
    e.sync_ok(&[]);
    std::fs::write(e.p(1, ".hubsync/conflicts"), "in the way").unwrap();
    e.write(0, "page.txt", "hub edit", T0 + 20);
    e.write(1, "page.txt", "peer edit", T0 + 10);
    e.write(0, "dir/page.txt", "hub edit", T0 + 20);
    e.write(1, "dir/page.txt", "peer edit", T0 + 10);
    let r = e.sync(&[]);
    let said = format!("{}{}", r.stdout(), r.stderr());
    for p in ["page.txt", "dir/page.txt"] {
        assert_eq!(e.read(1, p), "peer edit", "{p}: the loser is gone\n{said}");
    }
    assert!(said.contains("conflicts"), "{said}");
    // Nor does the report claim a copy that was never made.
    assert!(
        !said.contains("version kept at") && !said.contains("losers kept"),
        "{said}"
    );
    // Once there is room, the conflict is settled and the loser kept.
    std::fs::remove_file(e.p(1, ".hubsync/conflicts")).unwrap();
    e.sync_ok(&[]);
    e.assert_converged();
    assert_eq!(e.read(1, "page.txt"), "hub edit");
    let kept = find(&e.p(1, ".hubsync/conflicts"), "page.txt.conflict-");
    assert_eq!(kept.len(), 2, "{}", e.dump());
}

#[test]
fn a_state_directory_that_is_a_symlink_is_refused() {
    let e = Env::new(3);
    e.write(0, "a.txt", "a", T0);
    e.sync_ok(&[]);
    let outside = e.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    for i in [1, 0] {
        let state = e.p(i, ".hubsync");
        std::fs::rename(&state, e.dir.path().join(format!("state-{i}"))).unwrap();
        symlink(&outside, &state).unwrap();
        e.write(2, "b.txt", &format!("b{i}"), T0 + i as i64);
        let r = e.sync(&[]);
        assert_eq!(r.code(), if i == 0 { 1 } else { 2 }, "{}", r.stderr());
        assert!(
            r.stderr().contains(&state.display().to_string()) && r.stderr().contains("symlink"),
            "{}",
            r.stderr()
        );
        assert!(
            listing_all(&outside).is_empty(),
            "state written through the link: {:?}",
            listing_all(&outside)
        );
    }
}
