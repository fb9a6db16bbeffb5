//! A malicious or buggy replica on either end of the wire.
//!
//! - A fake peer: the hub runs `--remote-command RELAY`, a four-line script that
//!   hands the peer called `evil` to this test process through two FIFOs and starts
//!   a real `hubsync serve` for every other peer. A thread of the test then speaks
//!   the protocol with `hubsync::proto`, answering with whatever the scenario wants
//!   (escaping paths, wrong bytes, silence, absurd numbers) and recording what the
//!   hub sent it. It runs in step with the hub, so a scenario can also change a tree
//!   at an exact moment (`HUBSYNC_TEST_BEFORE_APPLY` for "between scan and apply").
//! - A fake hub: the test runs a real `hubsync serve ROOT` on pipes and sends it
//!   requests with escaping paths, paths through planted symlinks, internal paths
//!   and lies about what is there.
//!
//! In every case: files outside the roots (a directory of our own and /etc/passwd)
//! keep their bytes, mode and mtime; nothing is read through a symlink; the run
//! names the culprit; and nothing panics.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hubsync::archive::{ReplicaId, Token};
use hubsync::proto::{
    self, Expect, Op, OpError, Open, Opened, PairStatus, Request, Response, ScanSummary,
};
use hubsync::relpath::RelPath;
use hubsync::version::{Entry, Hash, Kind, Mtime, State, Version};

use common::*;

const T0: i64 = 1_700_000_000;
const SECRET: &str = "TOP SECRET: outside every root\n";
/// How long any one hub run may take before the test calls it a hang.
const HANG: Duration = Duration::from_secs(30);

// ------------------------------------------------------------------ the scene

/// A hub root `r0`, the fake peer `evil`, a real peer `r2`, and `outside`: files
/// that no run may touch.
struct Scene {
    dir: tempfile::TempDir,
    relay: PathBuf,
}

impl Scene {
    fn new() -> Scene {
        let dir = tempfile::tempdir().unwrap();
        for d in ["r0", "evil", "r2", "outside", "fifo"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        let s = Scene {
            relay: dir.path().join("relay.sh"),
            dir,
        };
        write_at(&s.outside().join("secret.txt"), SECRET.as_bytes(), T0, 0);
        write_at(&s.outside().join("victim.txt"), b"victim\n", T0, 0);
        std::fs::set_permissions(
            s.outside().join("secret.txt"),
            PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        for f in ["to-peer", "to-hub"] {
            rustix::fs::mkfifoat(
                rustix::fs::CWD,
                s.fifo().join(f).as_path(),
                rustix::fs::Mode::from_raw_mode(0o600),
            )
            .unwrap();
        }
        // `hubsync sync` runs `RELAY serve PATH` for each local peer. For the fake
        // one, the process the hub started is the one writing to the hub, so that
        // the hub sees the end of the stream when the fake peer closes.
        let script = format!(
            "#!/bin/sh\ncase \"$2\" in\n*/evil) exec 3<&0\n  cat <&3 > '{fifo}/to-peer' &\n  exec cat '{fifo}/to-hub' ;;\nesac\nexec '{bin}' \"$@\"\n",
            fifo = s.fifo().display(),
            bin = BIN
        );
        std::fs::write(&s.relay, script).unwrap();
        std::fs::set_permissions(&s.relay, PermissionsExt::from_mode(0o755)).unwrap();
        s
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn hub(&self) -> PathBuf {
        self.p("r0")
    }
    fn good(&self) -> PathBuf {
        self.p("r2")
    }
    fn outside(&self) -> PathBuf {
        self.p("outside")
    }
    fn fifo(&self) -> PathBuf {
        self.p("fifo")
    }

    /// Everything that must never change: the outside directory and /etc/passwd,
    /// with content, mode and mtime.
    fn untouchable(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        for (p, bytes) in bytes_of(&self.outside(), &[]) {
            m.insert(
                format!("outside/{p}"),
                String::from_utf8_lossy(&bytes).into(),
            );
        }
        for (p, d) in listing_all(&self.outside()) {
            m.insert(format!("outside/{p} (listing)"), d);
        }
        let md = std::fs::metadata("/etc/passwd").unwrap();
        m.insert(
            "/etc/passwd".into(),
            format!(
                "{} {:o} {}.{}",
                blake3::hash(&std::fs::read("/etc/passwd").unwrap()).to_hex(),
                md.mode(),
                md.mtime(),
                md.mtime_nsec()
            ),
        );
        m
    }

    /// Runs `hubsync sync r0 evil r2 ARGS` with the fake peer playing `peer`.
    fn sync(
        &self,
        args: &[&str],
        env: &[(&str, String)],
        peer: impl FnOnce(&mut Evil) + Send + 'static,
    ) -> (Run, Log) {
        self.sync_peers(&["evil", "r2"], args, env, peer)
    }

    fn sync_peers(
        &self,
        peers: &[&str],
        args: &[&str],
        env: &[(&str, String)],
        peer: impl FnOnce(&mut Evil) + Send + 'static,
    ) -> (Run, Log) {
        let log: Log = Default::default();
        let fifo = self.fifo();
        let hub_gone = Arc::new(AtomicBool::new(false));
        let evil = peers.contains(&"evil").then(|| {
            let (log, hub_gone) = (log.clone(), hub_gone.clone());
            std::thread::spawn(move || {
                let Some(mut e) = Evil::connect(&fifo, log, &hub_gone) else {
                    return;
                };
                peer(&mut e);
                e.drain();
            })
        });
        let mut cmd = Command::new(BIN);
        cmd.arg("sync").arg(self.hub());
        for p in peers {
            cmd.arg(self.p(p));
        }
        cmd.args(["--remote-command", self.relay.to_str().unwrap()])
            .args(["--timeout", "3s", "--json"])
            .args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let run = run_bounded(cmd);
        // If the relay never started (the hub failed before), this ends the wait.
        hub_gone.store(true, Ordering::Relaxed);
        if let Some(t) = evil {
            let _ = t.join();
        }
        assert_ne!(run.code(), 101, "the hub panicked:\n{}", run.stderr());
        assert!(
            !run.stderr().contains("panicked"),
            "the hub panicked:\n{}",
            run.stderr()
        );
        (run, log)
    }
}

/// Runs `cmd`, killing it (and failing the test) if it outlives [`HANG`].
fn run_bounded(mut cmd: Command) -> Run {
    let desc = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let deadline = Instant::now() + HANG;
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let out = child.wait_with_output();
        let _ = tx.send(());
        out
    });
    if rx.recv_timeout(deadline - Instant::now()).is_err() {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid as i32).unwrap(),
            rustix::process::Signal::KILL,
        );
        let out = waiter.join().unwrap().unwrap();
        panic!(
            "the hub hung for {HANG:?} and was killed\n$ {desc}\n--- stderr\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = waiter.join().unwrap().unwrap();
    Run { cmd: desc, out }
}

/// Everything a run said: the JSON report (warnings are only there with `--json`)
/// and stderr.
fn said(run: &Run) -> String {
    format!("{}{}", run.stdout(), run.stderr())
}

fn replica<'a>(j: &'a serde_json::Value, label: &str) -> &'a serde_json::Value {
    j["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["label"] == label)
        .unwrap_or_else(|| panic!("no replica {label} in {j}"))
}

/// The run went on without the fake peer and says why it dropped it.
#[track_caller]
fn evil_failed(run: &Run, needle: &str) {
    let j = run.json();
    let evil = replica(&j, "evil");
    assert_eq!(evil["status"], "failed", "{j}");
    let why = evil["error"].as_str().unwrap_or_default();
    assert!(why.contains(needle), "{needle:?} not in {why:?}");
    assert!(
        said(run).contains("peer evil:"),
        "the peer is not named: {}",
        said(run)
    );
    assert_eq!(replica(&j, "hub")["status"], "ok", "{j}");
    assert_eq!(replica(&j, "r2")["status"], "ok", "{j}");
    assert_eq!(run.code(), 2, "{}", said(run));
}

// ------------------------------------------------------------------ the fake peer

/// What the hub sent the fake peer.
type Log = Arc<Mutex<Vec<String>>>;

struct Evil {
    r: BufReader<File>,
    w: File,
    log: Log,
    /// File bytes the hub sent, all together (to look for leaked secrets).
    data: Arc<Mutex<Vec<u8>>>,
}

impl Evil {
    /// Opens the relay's FIFOs once the hub has started it (or gives up).
    fn connect(fifo: &Path, log: Log, hub_gone: &AtomicBool) -> Option<Evil> {
        // Opening the write end without blocking fails until the relay's reader
        // is there (or waiting to open it); this way a hub that never starts the
        // relay cannot hang us.
        let w = loop {
            match File::options()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(fifo.join("to-hub"))
            {
                Ok(f) => break f,
                Err(_) if !hub_gone.load(Ordering::Relaxed) => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(_) => return None,
            }
        };
        rustix::fs::fcntl_setfl(&w, rustix::fs::OFlags::empty()).unwrap();
        let r = BufReader::new(File::open(fifo.join("to-peer")).ok()?);
        let mut e = Evil {
            r,
            w,
            log,
            data: Default::default(),
        };
        proto::read_greeting(&mut e.r).ok()?;
        Some(e)
    }

    fn greet(&mut self) {
        self.raw(proto::greeting().as_bytes());
    }

    fn raw(&mut self, bytes: &[u8]) {
        let _ = self.w.write_all(bytes);
    }

    fn send(&mut self, r: &Response) {
        let _ = proto::write_frame(&mut self.w, r);
    }

    /// A frame around any payload.
    fn frame(&mut self, payload: &[u8]) {
        let mut b = (payload.len() as u32).to_le_bytes().to_vec();
        b.extend_from_slice(payload);
        self.raw(&b);
    }

    fn recv(&mut self) -> Option<Request> {
        let (req, _) = proto::read_frame::<Request>(&mut self.r).ok()?;
        if let Request::Data { bytes, .. } = &req {
            self.data.lock().unwrap().extend_from_slice(bytes);
            self.log
                .lock()
                .unwrap()
                .push(format!("Data {:?}", String::from_utf8_lossy(bytes)));
        } else {
            self.log.lock().unwrap().push(format!("{req:?}"));
        }
        Some(req)
    }

    /// Reads until the hub closes, answering nothing.
    fn drain(&mut self) {
        while self.recv().is_some() {}
    }

    fn opened(&mut self) {
        self.send(&Response::Opened(Opened {
            replica: ReplicaId([0xee; 16]),
            hostname: "evil".into(),
            time: Mtime::now(),
            pair: PairStatus::None,
            root_was_empty: false,
            writable: None,
        }));
    }
}

/// A scan entry with a path that `RelPath` would refuse: encoded exactly like
/// [`Entry`] (a `RelPath` encodes as its bytes).
#[derive(bincode::Encode)]
struct RawEntry {
    path: Vec<u8>,
    state: State,
}

/// The payload of a `Response::Entries` holding `entries` as given.
fn entries_payload(entries: &[RawEntry]) -> Vec<u8> {
    // `Entries` is variant 1 of `Response`; a small index is one varint byte.
    let mut b = vec![1u8];
    b.extend(bincode::encode_to_vec(entries, bincode::config::standard()).unwrap());
    b
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

fn dir(mtime: i64) -> Version {
    Version {
        kind: Kind::Dir,
        mode: 0o755,
        mtime: Mtime::new(mtime, 0),
        uid: 0,
        gid: 0,
    }
}

fn link(target: &str) -> Version {
    Version {
        kind: Kind::Symlink {
            target: target.as_bytes().to_vec(),
        },
        mode: 0o777,
        mtime: Mtime::new(T0, 0),
        uid: 0,
        gid: 0,
    }
}

fn raw(path: &[u8], v: Version) -> RawEntry {
    RawEntry {
        path: path.to_vec(),
        state: State::Present(v),
    }
}

/// How the fake peer behaves in a session that otherwise follows the protocol.
struct Script {
    /// What its scan claims, in this order, as raw paths.
    entries: Vec<RawEntry>,
    summary: ScanSummary,
    /// What a `Read` of a path returns (a missing path answers with an error).
    contents: HashMap<Vec<u8>, Vec<u8>>,
    /// Bytes added to every `Data` answer.
    read_extra: usize,
    /// Whether a received file is confirmed with `Done` at its `End`.
    confirm_puts: bool,
}

impl Default for Script {
    fn default() -> Script {
        Script {
            entries: Vec::new(),
            summary: ScanSummary::default(),
            contents: HashMap::new(),
            read_extra: 0,
            confirm_puts: true,
        }
    }
}

impl Script {
    /// Puts the claimed entries in the order a real scan sends them.
    fn sorted(mut self) -> Script {
        self.entries.sort_by(|a, b| {
            let key = |p: &[u8]| {
                p.iter()
                    .map(|&c| if c == b'/' { 0 } else { c })
                    .collect::<Vec<u8>>()
            };
            key(&a.path).cmp(&key(&b.path))
        });
        self
    }

    fn with_file(mut self, path: &str, content: &[u8], mtime: i64) -> Script {
        self.entries
            .push(raw(path.as_bytes(), file(content, mtime)));
        self.contents
            .insert(path.as_bytes().to_vec(), content.to_vec());
        self
    }
}

/// Plays `s` until the hub closes the session.
fn play(e: &mut Evil, s: Script) {
    e.greet();
    let mut putting: HashMap<u32, ()> = HashMap::new();
    while let Some(req) = e.recv() {
        match req {
            Request::Open(_) => e.opened(),
            Request::Scan { .. } => {
                if !s.entries.is_empty() {
                    e.frame(&entries_payload(&s.entries));
                }
                e.send(&Response::ScanDone(s.summary));
            }
            Request::Read {
                id,
                path,
                offset,
                len,
            } => match s.contents.get(path.as_bytes()) {
                Some(c) => {
                    let from = (offset as usize).min(c.len());
                    let to = (from + len as usize).min(c.len());
                    let mut bytes = c[from..to].to_vec();
                    bytes.extend(std::iter::repeat_n(b'!', s.read_extra));
                    e.send(&Response::Data { id, bytes });
                }
                None => e.send(&Response::Done {
                    id,
                    result: Err(OpError::Io("no such file here".into())),
                }),
            },
            Request::Op {
                id,
                op: Op::PutFile { .. },
            } => {
                putting.insert(id, ());
            }
            Request::Op { id, .. } => e.send(&Response::Done { id, result: Ok(()) }),
            Request::End { id } => {
                if putting.remove(&id).is_some() && s.confirm_puts {
                    e.send(&Response::Done { id, result: Ok(()) });
                }
            }
            Request::Abort { id } => {
                putting.remove(&id);
                e.send(&Response::Done {
                    id,
                    result: Err(OpError::SourceChanged),
                });
            }
            Request::Commit { token, .. } => {
                if token.is_some() {
                    e.send(&Response::Committed);
                }
            }
            Request::Data { .. } | Request::GroupEnd { .. } => {}
            Request::Close => return,
        }
    }
}

/// The fake peer must come through `entries_payload` exactly as a real `Entries`.
#[test]
fn raw_entries_encode_like_real_ones() {
    let real = Response::Entries(vec![
        Entry {
            path: RelPath::new("a/b").unwrap(),
            state: State::Present(file(b"x", T0)),
        },
        Entry {
            path: RelPath::new("c").unwrap(),
            state: State::Absent,
        },
    ]);
    let ours = entries_payload(&[
        raw(b"a/b", file(b"x", T0)),
        RawEntry {
            path: b"c".to_vec(),
            state: State::Absent,
        },
    ]);
    assert_eq!(
        bincode::encode_to_vec(&real, bincode::config::standard()).unwrap(),
        ours
    );
}

/// The harness itself: a hub that fails before it starts any peer leaves no
/// fake peer waiting.
#[test]
fn a_hub_that_never_starts_the_fake_peer_does_not_hang_the_test() {
    let s = Scene::new();
    let started = Instant::now();
    let (run, log) = s.sync(&["--exclude", "a/["], &[], |e| play(e, Script::default()));
    assert_eq!(run.code(), 1, "{}", said(&run));
    assert!(log.lock().unwrap().is_empty());
    assert!(started.elapsed() < Duration::from_secs(10));
}

// ------------------------------------------------------------------ a hostile peer

#[test]
fn escaping_paths_in_a_peer_scan_drop_that_peer_and_touch_nothing() {
    let s = Scene::new();
    write_at(&s.hub().join("hub.txt"), b"hub", T0, 0);
    write_at(&s.good().join("good.txt"), b"good", T0, 0);
    let before = s.untouchable();
    let outside_victim = s.outside().join("victim.txt");
    let bad: Vec<Vec<u8>> = vec![
        b"..".to_vec(),
        b"../outside/victim.txt".to_vec(),
        b"ok/../../outside/victim.txt".to_vec(),
        b"/etc/passwd".to_vec(),
        outside_victim.as_os_str().as_encoded_bytes().to_vec(),
        b"a//b".to_vec(),
        b"a/./b".to_vec(),
        b"./a".to_vec(),
        b"a/".to_vec(),
        b"".to_vec(),
        b"a\0b".to_vec(),
        b"victim.txt\0.png".to_vec(),
    ];
    for path in bad {
        let (run, _) = s.sync(&[], &[], move |e| {
            play(
                e,
                Script {
                    entries: vec![
                        raw(b"fine.txt", file(b"ok", T0)),
                        raw(&path, file(b"x", T0)),
                    ],
                    ..Default::default()
                },
            )
        });
        evil_failed(&run, "invalid path");
        assert_eq!(s.untouchable(), before, "something outside changed");
        // The others synced without it, and nothing of its scan was believed.
        assert_eq!(std::fs::read(s.hub().join("good.txt")).unwrap(), b"good");
        assert_eq!(std::fs::read(s.good().join("hub.txt")).unwrap(), b"hub");
        assert!(!s.hub().join("fine.txt").exists());
    }
}

#[test]
fn an_unsorted_or_repeated_scan_drops_the_peer() {
    let s = Scene::new();
    write_at(&s.hub().join("keep.txt"), b"keep", T0, 0);
    for entries in [
        vec![raw(b"b", file(b"1", T0)), raw(b"a", file(b"2", T0))],
        vec![raw(b"a", file(b"1", T0)), raw(b"a", file(b"2", T0))],
        vec![raw(b"a/b", file(b"1", T0)), raw(b"a", dir(T0))],
    ] {
        let (run, _) = s.sync(&[], &[], move |e| {
            play(
                e,
                Script {
                    entries,
                    ..Default::default()
                },
            )
        });
        evil_failed(&run, "out of order");
        assert!(!s.hub().join("a").exists());
        assert_eq!(std::fs::read(s.good().join("keep.txt")).unwrap(), b"keep");
    }
}

#[test]
fn a_symlink_a_peer_plants_never_redirects_a_write() {
    let s = Scene::new();
    let before = s.untouchable();
    let abs = s.outside().display().to_string();
    let links = move |sc: &mut Script| {
        // Links are data and may point anywhere; what matters is that nothing is
        // then written or read through them.
        sc.entries.push(raw(b"rel", link("../outside")));
        sc.entries.push(raw(b"up", link("..")));
        sc.entries.push(raw(b"abs", link(&abs)));
    };
    // First the links alone: they arrive as links.
    let plant = links.clone();
    let (run, _) = s.sync(&[], &[], move |e| {
        let mut sc = Script::default();
        plant(&mut sc);
        play(e, sc.sorted())
    });
    assert_eq!(run.code(), 0, "{}", said(&run));
    for root in [s.hub(), s.good()] {
        for name in ["rel", "up", "abs"] {
            let m = std::fs::symlink_metadata(root.join(name)).unwrap();
            assert!(m.file_type().is_symlink(), "{name}");
        }
    }
    // Then files "below" them, on the links' own paths and on the targets'.
    let (run, _) = s.sync(&[], &[], move |e| {
        let mut sc = Script::default();
        links(&mut sc);
        sc = sc
            .with_file("rel/planted.txt", b"planted", T0)
            .with_file("up/outside/victim.txt", b"overwritten", T0 + 999)
            .with_file("abs/victim.txt", b"overwritten", T0 + 999)
            .with_file("abs/secret.txt", b"overwritten", T0 + 999);
        play(e, sc.sorted())
    });
    assert_eq!(s.untouchable(), before, "{}", said(&run));
    assert!(!s.outside().join("planted.txt").exists());
    for root in [s.hub(), s.good()] {
        // A link with content below it became a real directory of the replica
        // (the link is kept as a conflict copy or was agreed); it is never
        // followed.
        for (p, d) in listing(&root) {
            assert!(!d.starts_with("link") || !p.contains('/'), "{p}: {d}");
            if p == "rel/planted.txt" {
                assert!(
                    std::fs::symlink_metadata(root.join("rel"))
                        .unwrap()
                        .is_dir()
                );
            }
        }
    }
}

#[test]
fn a_directory_swapped_for_a_symlink_between_scan_and_apply_is_not_followed() {
    let s = Scene::new();
    for root in [s.hub(), s.good()] {
        write_at(&root.join("d/keep.txt"), b"keep", T0, 0);
    }
    let before = s.untouchable();
    // After the plan is made, `d` on the hub and on the real peer becomes a link
    // to the outside directory; the new file planned for `d/` must not land there.
    let hook = format!(
        "for r in '{}' '{}'; do mv \"$r/d\" \"$r/d.moved\" && ln -s '{}' \"$r/d\"; done",
        s.hub().display(),
        s.good().display(),
        s.outside().display()
    );
    let (run, _) = s.sync(&[], &[("HUBSYNC_TEST_BEFORE_APPLY", hook)], move |e| {
        let mut sc = Script::default();
        sc.entries.push(raw(b"d", dir(T0)));
        sc = sc.with_file("d/keep.txt", b"keep", T0);
        sc = sc.with_file("d/new.txt", b"new from evil", T0 + 5);
        play(e, sc.sorted())
    });
    assert_eq!(s.untouchable(), before, "{}", said(&run));
    assert!(!s.outside().join("new.txt").exists());
    let j = run.json();
    let errors = j["errors"].to_string();
    assert!(errors.contains("d/new.txt"), "{errors}");
    assert!(errors.contains("symlink"), "{errors}");
}

#[test]
fn a_source_file_swapped_for_a_symlink_to_a_secret_is_never_read() {
    let s = Scene::new();
    write_at(&s.hub().join("page.txt"), b"public page", T0, 0);
    write_at(&s.hub().join("users.txt"), b"public users", T0, 0);
    let before = s.untouchable();
    let passwd = std::fs::read("/etc/passwd").unwrap();
    let hook = format!(
        "cd '{}' && ln -sf '{}' page.txt && ln -sf /etc/passwd users.txt",
        s.hub().display(),
        s.outside().join("secret.txt").display()
    );
    let data: Arc<Mutex<Vec<u8>>> = Default::default();
    let seen = data.clone();
    let (run, _) = s.sync(&[], &[("HUBSYNC_TEST_BEFORE_APPLY", hook)], move |e| {
        e.data = seen;
        play(e, Script::default())
    });
    let data = data.lock().unwrap().clone();
    let leaked = |needle: &[u8]| {
        data.windows(needle.len().min(24))
            .any(|w| w == &needle[..needle.len().min(24)])
    };
    assert!(!leaked(SECRET.as_bytes()), "the secret reached the peer");
    assert!(!leaked(&passwd), "/etc/passwd reached the peer");
    for name in ["page.txt", "users.txt"] {
        let p = s.good().join(name);
        if let Ok(m) = std::fs::symlink_metadata(&p) {
            assert!(m.file_type().is_symlink(), "{name} arrived as a file");
        }
    }
    assert_eq!(s.untouchable(), before);
    assert!(
        said(&run).contains("page.txt") && said(&run).contains("source changed"),
        "{}",
        said(&run)
    );
}

#[test]
fn a_destination_swapped_for_a_symlink_is_never_written_through() {
    let s = Scene::new();
    // `page.txt` loses a conflict on the hub and on r2 (replaced, kept); `new.txt`
    // is created there. Both become links to outside files after the plan.
    for root in [s.hub(), s.good()] {
        write_at(&root.join("page.txt"), b"old page", T0, 0);
    }
    write_at(&s.outside().join("victim2.txt"), b"victim 2\n", T0, 0);
    let before = s.untouchable();
    let hook = format!(
        "for r in '{}' '{}'; do ln -sf '{}' \"$r/page.txt\"; ln -s '{}' \"$r/new.txt\"; done",
        s.hub().display(),
        s.good().display(),
        s.outside().join("victim.txt").display(),
        s.outside().join("victim2.txt").display(),
    );
    let (run, _) = s.sync(&[], &[("HUBSYNC_TEST_BEFORE_APPLY", hook)], move |e| {
        let sc = Script::default()
            .with_file("new.txt", b"evil new", T0 + 100)
            .with_file("page.txt", b"evil page", T0 + 100);
        play(e, sc)
    });
    assert_eq!(s.untouchable(), before, "{}", said(&run));
    assert!(
        said(&run).contains("changed since it was scanned"),
        "{}",
        said(&run)
    );
    // The user's links are still there: left alone for the next run.
    for root in [s.hub(), s.good()] {
        for name in ["page.txt", "new.txt"] {
            let m = std::fs::symlink_metadata(root.join(name)).unwrap();
            assert!(m.file_type().is_symlink(), "{}", root.join(name).display());
        }
    }
}

/// Every file content under `root`, conflict copies included.
fn contents_under(root: &Path) -> Vec<Vec<u8>> {
    listing_all(root)
        .into_iter()
        .filter(|(_, d)| d.starts_with("file"))
        .map(|(p, _)| std::fs::read(root.join(p)).unwrap())
        .collect()
}

#[test]
fn a_peer_claiming_a_directory_where_a_file_is_loses_nothing() {
    let s = Scene::new();
    write_at(&s.hub().join("x"), b"hub's file x", T0, 0);
    write_at(&s.hub().join("y/a.txt"), b"hub's y/a.txt", T0, 0);
    write_at(&s.good().join("z"), b"r2's file z", T0, 0);
    let (run, _) = s.sync(&[], &[], move |e| {
        let mut sc = Script::default();
        sc.entries.push(raw(b"x", dir(T0 + 100)));
        sc = sc.with_file("x/inner.txt", b"evil inner", T0 + 100);
        sc = sc.with_file("y", b"evil file y", T0 + 100);
        sc.entries.push(raw(b"z", dir(T0 + 100)));
        play(e, sc)
    });
    assert_ne!(run.code(), 1, "{}", said(&run));
    // Its newer directory won over the hub's file, which is kept; the hub's
    // directory with content won over its file.
    assert!(s.hub().join("x").is_dir() && s.good().join("x/inner.txt").is_file());
    let kept = find(&s.hub().join(".hubsync/conflicts"), "x.conflict-");
    assert_eq!(std::fs::read(&kept[0]).unwrap(), b"hub's file x");
    assert_eq!(
        std::fs::read(s.good().join("y/a.txt")).unwrap(),
        b"hub's y/a.txt"
    );
    let hub = contents_under(&s.hub());
    let good = contents_under(&s.good());
    for (what, content) in [
        ("the hub's x", &b"hub's file x"[..]),
        ("the hub's y/a.txt", b"hub's y/a.txt"),
    ] {
        assert!(hub.iter().any(|c| c == content), "{what} is lost");
    }
    assert!(
        good.iter().any(|c| c == b"r2's file z"),
        "r2's z is lost\n{}",
        said(&run)
    );
}

#[test]
fn wrong_bytes_from_a_peer_never_become_a_file() {
    let s = Scene::new();
    let (run, _) = s.sync(&[], &[], move |e| {
        let mut sc = Script::default().with_file("f.txt", b"hello", T0);
        // It claims "hello" and sends something else of the same length.
        sc.contents.insert(b"f.txt".to_vec(), b"HELLO".to_vec());
        play(e, sc)
    });
    for root in [s.hub(), s.good()] {
        assert!(!root.join("f.txt").exists(), "{}", said(&run));
        assert!(
            find(&root, ".tmp").is_empty(),
            "a temp file is left: {:?}",
            listing_all(&root)
        );
    }
    assert!(said(&run).contains("source changed"), "{}", said(&run));
}

#[test]
fn a_peer_answering_a_read_with_more_than_asked_is_not_waited_for_forever() {
    let s = Scene::new();
    let (run, _) = s.sync(&[], &[], move |e| {
        let mut sc = Script::default().with_file("f.txt", b"hello", T0);
        sc.read_extra = 3;
        play(e, sc)
    });
    for root in [s.hub(), s.good()] {
        assert!(!root.join("f.txt").exists(), "{}", said(&run));
    }
    assert!(said(&run).contains("f.txt"), "{}", said(&run));
}

#[test]
fn a_peer_that_never_confirms_a_file_is_given_up_in_time() {
    let s = Scene::new();
    write_at(&s.hub().join("f.txt"), b"for the peer", T0, 0);
    let started = Instant::now();
    let (run, _) = s.sync(&[], &[], move |e| {
        play(
            e,
            Script {
                confirm_puts: false,
                ..Default::default()
            },
        )
    });
    evil_failed(&run, "no answer");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(
        std::fs::read(s.good().join("f.txt")).unwrap(),
        b"for the peer"
    );
}

#[test]
fn absurd_numbers_from_a_peer_are_survived() {
    let s = Scene::new();
    write_at(&s.hub().join("keep.txt"), b"keep", T0, 0);
    for dry in [true, false] {
        let (run, _) = s.sync(if dry { &["--dry-run"] } else { &[] }, &[], move |e| {
            let huge = |path: &[u8], b: u8| {
                raw(
                    path,
                    Version {
                        kind: Kind::File {
                            size: u64::MAX,
                            hash: Hash([b; 32]),
                        },
                        mode: u32::MAX,
                        mtime: Mtime::new(i64::MAX, u32::MAX),
                        uid: u32::MAX,
                        gid: u32::MAX,
                    },
                )
            };
            let sc = Script {
                entries: vec![
                    huge(b"big1", 1),
                    huge(b"big2", 2),
                    raw(b"far", dir(i64::MIN)),
                    raw(b"nul-link", link("a\0b")),
                    raw(b"empty-link", link("")),
                ],
                summary: ScanSummary {
                    delta: false,
                    files: u64::MAX,
                    dirs: u64::MAX,
                    bytes: u64::MAX,
                    hashed_files: u64::MAX,
                    hashed_bytes: u64::MAX,
                    temps_removed: u64::MAX,
                    millis: u64::MAX,
                },
                ..Default::default()
            };
            play(e, sc.sorted())
        });
        // Versions that cannot be made (a link target with NUL) are failed
        // actions; what matters is that the run ends and reports.
        assert!([0, 1, 2].contains(&run.code()), "{}", said(&run));
        assert_eq!(std::fs::read(s.hub().join("keep.txt")).unwrap(), b"keep");
        assert_eq!(s.good().join("keep.txt").exists(), !dry, "{}", said(&run));
        assert!(!s.hub().join("big1").exists());
    }
}

#[test]
fn broken_frames_drop_the_peer_with_a_clear_reason() {
    let s = Scene::new();
    write_at(&s.hub().join("keep.txt"), b"keep", T0, 0);
    type Peer = Box<dyn FnOnce(&mut Evil) + Send>;
    let cases: Vec<(&str, Peer)> = vec![
        (
            "more than the limit",
            Box::new(|e: &mut Evil| {
                e.greet();
                e.recv();
                e.raw(&u32::MAX.to_le_bytes());
                e.raw(&[0; 64]);
            }),
        ),
        (
            "undecodable message",
            Box::new(|e: &mut Evil| {
                e.greet();
                e.recv();
                e.frame(&[200, 1, 2, 3, 4, 5]);
            }),
        ),
        (
            "stray bytes",
            Box::new(|e: &mut Evil| {
                e.greet();
                e.recv();
                let mut b = bincode::encode_to_vec(
                    Response::Warning("x".into()),
                    bincode::config::standard(),
                )
                .unwrap();
                b.extend_from_slice(b"trailing");
                e.frame(&b);
            }),
        ),
        (
            "closed unexpectedly",
            Box::new(|e: &mut Evil| {
                e.greet();
                e.recv();
                // Half a frame, then gone.
                e.raw(&100u32.to_le_bytes());
                e.raw(&[1, 2, 3]);
                let _ = e.w.flush();
                e.w = File::open("/dev/null").unwrap();
                // Our read side stays open; the relay's writer closes when the
                // hub kills it.
            }),
        ),
        (
            "version 99",
            Box::new(|e: &mut Evil| e.raw(b"hubsync-protocol 99\n")),
        ),
        (
            "Welcome",
            Box::new(|e: &mut Evil| e.raw(b"Welcome to evil!\nhubsync-protocol 1\n")),
        ),
        (
            "I refuse",
            Box::new(|e: &mut Evil| {
                e.greet();
                e.recv();
                e.send(&Response::Fatal("I refuse".into()));
            }),
        ),
    ];
    for (needle, peer) in cases {
        let (run, _) = s.sync(&[], &[], peer);
        evil_failed(&run, needle);
        assert_eq!(std::fs::read(s.good().join("keep.txt")).unwrap(), b"keep");
    }
}

#[test]
fn a_peer_cannot_write_into_the_hubs_state() {
    let s = Scene::new();
    // A first run makes the hub's state directory.
    let (run, _) = s.sync(&[], &[], |e| play(e, Script::default()));
    assert_eq!(run.code(), 0, "{}", said(&run));
    let state = s.hub().join(".hubsync");
    let id = std::fs::read(state.join("replica-id")).unwrap();
    let state_before = listing_all(&state);
    let (run, _) = s.sync(&[], &[], |e| {
        let sc = Script::default()
            .with_file(".hubsync/conflicts/evil.txt", b"evil", T0)
            .with_file(".hubsync/pairs/peer-0000000000000000.state", b"evil", T0)
            .with_file(
                ".hubsync/replica-id",
                b"00000000000000000000000000000000\n",
                T0,
            )
            .with_file(".hubsync.0123456789abcdef.tmp", b"evil", T0)
            .with_file("sub/.hubsync.0123456789abcdef.tmp", b"evil", T0);
        play(e, sc.sorted())
    });
    assert_ne!(run.code(), 101, "{}", said(&run));
    assert_eq!(std::fs::read(state.join("replica-id")).unwrap(), id);
    for (p, _) in listing_all(&state) {
        assert!(
            !p.contains("evil") && !p.contains("peer-0000"),
            "{p} was written\n{state_before:?}"
        );
    }
    for root in [s.hub(), s.good()] {
        assert!(find(&root, ".hubsync.0123456789abcdef.tmp").is_empty());
    }
}

// ------------------------------------------------------------------ a hostile hub

/// A real `hubsync serve ROOT` driven by hand.
struct Serve {
    child: Child,
    w: ChildStdin,
    r: BufReader<ChildStdout>,
    next: u32,
}

impl Serve {
    fn start(root: &Path) -> Serve {
        let mut child = Command::new(BIN)
            .arg("serve")
            .arg(root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut w = child.stdin.take().unwrap();
        let mut r = BufReader::new(child.stdout.take().unwrap());
        w.write_all(proto::greeting().as_bytes()).unwrap();
        proto::read_greeting(&mut r).unwrap();
        Serve {
            child,
            w,
            r,
            next: 0,
        }
    }

    /// Opens a session and scans, as a hub would.
    fn open(root: &Path) -> Serve {
        let mut s = Serve::start(root);
        s.send(&Request::Open(Open {
            hub: ReplicaId([0x4b; 16]),
            label: "evil-hub".into(),
            excludes: vec![],
            pair: None,
            dry_run: false,
            pair_replica: None,
            check: false,
            conflict_retention: None,
            after_install: Vec::new(),
            post_apply: None,
        }));
        assert!(matches!(s.recv(), Some(Response::Opened(_))));
        s.send(&Request::Scan { full: true });
        loop {
            match s.recv() {
                Some(Response::ScanDone(_)) => break,
                Some(Response::Entries(_) | Response::Progress { .. }) => {}
                other => panic!("{other:?}"),
            }
        }
        s
    }

    fn send(&mut self, r: &Request) {
        proto::write_frame(&mut self.w, r).unwrap();
        self.w.flush().unwrap();
    }

    fn frame(&mut self, payload: &[u8]) {
        let _ = self.w.write_all(&(payload.len() as u32).to_le_bytes());
        let _ = self.w.write_all(payload);
        let _ = self.w.flush();
    }

    fn recv(&mut self) -> Option<Response> {
        loop {
            match proto::read_frame::<Response>(&mut self.r) {
                Ok((Response::Progress { .. }, _)) => {}
                Ok((r, _)) => return Some(r),
                Err(_) => return None,
            }
        }
    }

    fn id(&mut self) -> u32 {
        self.next += 1;
        self.next
    }

    /// Sends one operation and returns its answer.
    fn op(&mut self, op: Op) -> Result<(), OpError> {
        let id = self.id();
        let content = match &op {
            Op::PutFile { version, .. } => Some(version.clone()),
            _ => None,
        };
        self.send(&Request::Op { id, op });
        if let Some(v) = content {
            // Contents that match the version's size: `filled(n)` bytes.
            if let Kind::File { size, .. } = v.kind {
                self.send(&Request::Data {
                    id,
                    bytes: filled(size as usize),
                });
            }
            self.send(&Request::End { id });
        }
        loop {
            match self.recv() {
                Some(Response::Done { id: got, result }) if got == id => return result,
                Some(Response::Warning(_)) => {}
                other => panic!("op {id}: {other:?}"),
            }
        }
    }

    /// Reads a whole small file; `Err` is what serve answered instead of data.
    fn read(&mut self, path: &str) -> Result<Vec<u8>, OpError> {
        let id = self.id();
        self.send(&Request::Read {
            id,
            path: RelPath::new(path).unwrap(),
            offset: 0,
            len: 1 << 16,
        });
        match self.recv() {
            Some(Response::Data { id: got, bytes }) if got == id => Ok(bytes),
            Some(Response::Done { id: got, result }) if got == id => Err(result
                .err()
                .unwrap_or(OpError::Io("Done Ok to a read".into()))),
            other => panic!("read {path}: {other:?}"),
        }
    }

    /// Ends the session; returns what serve printed on stderr.
    fn close(mut self) -> String {
        self.send(&Request::Close);
        while self.recv().is_some() {}
        drop(self.w);
        let out = self.child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Waits for serve to end on its own (after a fatal error).
    fn finish(self) -> String {
        drop(self.w);
        let out = self.child.wait_with_output().unwrap();
        assert_ne!(out.status.code(), Some(101), "serve panicked");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

fn filled(n: usize) -> Vec<u8> {
    b"evil!".iter().copied().cycle().take(n).collect()
}

fn evil_file(n: usize) -> Version {
    file(&filled(n), T0 + 7)
}

fn rp(s: &str) -> RelPath {
    RelPath::new(s).unwrap()
}

/// A replica root laid out for the hub's attacks: links out of the root to a
/// directory, to a secret and to /etc/passwd, and a few ordinary files.
fn attacked_replica(s: &Scene) -> PathBuf {
    let root = s.good();
    write_at(&root.join("plain.txt"), b"plain", T0, 0);
    write_at(&root.join("sub/inner.txt"), b"inner", T0, 0);
    symlink(s.outside(), root.join("out")).unwrap();
    symlink("../outside", root.join("rel")).unwrap();
    symlink(s.outside().join("secret.txt"), root.join("secret")).unwrap();
    symlink("/etc/passwd", root.join("passwd")).unwrap();
    symlink(s.outside().join("victim.txt"), root.join("victim")).unwrap();
    root
}

#[test]
fn escaping_paths_from_a_hub_are_refused_by_serve() {
    let s = Scene::new();
    let root = attacked_replica(&s);
    let before = s.untouchable();
    let tree = listing(&root);
    // A valid request, then the same bytes with the path swapped for one that
    // `RelPath` refuses, of the same length.
    for bad in [
        &b"../outside/secret.txt"[..],
        b"/etc/passwd",
        b"a//b",
        b"./a",
        b"..",
        b"x/\0",
        b"x/",
    ] {
        let placeholder: String = "p".repeat(bad.len());
        let payload_for = |req: &Request| {
            let mut b = bincode::encode_to_vec(req, bincode::config::standard()).unwrap();
            let at = b
                .windows(placeholder.len())
                .position(|w| w == placeholder.as_bytes())
                .unwrap();
            b[at..at + bad.len()].copy_from_slice(bad);
            b
        };
        let reqs = [
            Request::Read {
                id: 1,
                path: rp(&placeholder),
                offset: 0,
                len: 100,
            },
            Request::Op {
                id: 2,
                op: Op::PutFile {
                    path: rp(&placeholder),
                    version: evil_file(3),
                    expect: Expect::Absent,
                    keep: None,
                    group: None,
                },
            },
            Request::Op {
                id: 3,
                op: Op::Remove {
                    path: rp(&placeholder),
                    keep: None,
                    group: None,
                },
            },
            Request::Commit {
                changes: vec![(rp(&placeholder), None)],
                token: Some(Token(1)),
                reset: true,
            },
        ];
        for req in &reqs {
            let mut serve = Serve::open(&root);
            serve.frame(&payload_for(req));
            match serve.recv() {
                Some(Response::Fatal(why)) => {
                    assert!(why.contains("invalid path"), "{why}")
                }
                other => panic!("{bad:?}: {other:?}"),
            }
            // It only finishes the session (saves what it scanned) and exits.
            while let Some(r) = serve.recv() {
                assert!(
                    matches!(r, Response::CacheSaved { .. }),
                    "serve went on after a bad request: {r:?}"
                );
            }
            serve.finish();
        }
    }
    assert_eq!(s.untouchable(), before);
    assert_eq!(listing(&root), tree);
}

#[test]
fn serve_never_follows_a_symlink_out_of_its_root() {
    let s = Scene::new();
    let root = attacked_replica(&s);
    let before = s.untouchable();
    let mut serve = Serve::open(&root);

    // Reads through links, of links, and of directories.
    for path in [
        "out/secret.txt",
        "rel/secret.txt",
        "secret",
        "passwd",
        "sub",
    ] {
        let got = serve.read(path);
        assert!(got.is_err(), "{path}: read {got:?}");
    }
    assert_eq!(serve.read("plain.txt").unwrap(), b"plain");

    // Writes below a link to a directory.
    for parent in ["out", "rel"] {
        for op in [
            Op::PutFile {
                path: rp(&format!("{parent}/new.txt")),
                version: evil_file(4),
                expect: Expect::Absent,
                keep: None,
                group: None,
            },
            Op::PutFile {
                path: rp(&format!("{parent}/victim.txt")),
                version: evil_file(4),
                expect: Expect::Scanned,
                keep: Some("x".into()),
                group: None,
            },
            Op::Mkdir {
                path: rp(&format!("{parent}/newdir")),
                version: dir(T0),
                expect: Expect::Absent,
                keep: None,
            },
            Op::PutSymlink {
                path: rp(&format!("{parent}/newlink")),
                version: link("/etc/shadow"),
                expect: Expect::Absent,
                keep: None,
            },
            Op::Remove {
                path: rp(&format!("{parent}/victim.txt")),
                keep: None,
                group: None,
            },
            Op::SetMeta {
                path: rp(&format!("{parent}/secret.txt")),
                version: file(SECRET.as_bytes(), T0 + 1),
            },
        ] {
            let what = format!("{op:?}");
            let r = serve.op(op);
            assert!(r.is_err(), "{what}: {r:?}");
        }
    }
    // New permissions for a link: never for what it points to.
    let r = serve.op(Op::SetMeta {
        path: rp("secret"),
        version: Version {
            mode: 0o666,
            ..link(&s.outside().join("secret.txt").display().to_string())
        },
    });
    assert!(
        std::fs::metadata(s.outside().join("secret.txt"))
            .unwrap()
            .mode()
            & 0o777
            == 0o600,
        "{r:?}"
    );
    // Replacing or removing a link replaces or removes the link, not its target.
    serve
        .op(Op::PutFile {
            path: rp("victim"),
            version: evil_file(6),
            expect: Expect::Scanned,
            keep: None,
            group: None,
        })
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(std::fs::read(root.join("victim")).unwrap(), filled(6));
    serve
        .op(Op::Remove {
            path: rp("passwd"),
            keep: None,
            group: None,
        })
        .unwrap();
    assert!(!root.join("passwd").exists());
    // Expect::Absent on something that is there, or a tree that is not empty.
    let r = serve.op(Op::PutFile {
        path: rp("plain.txt"),
        version: evil_file(5),
        expect: Expect::Absent,
        keep: None,
        group: None,
    });
    assert_eq!(r, Err(OpError::Changed));
    assert_eq!(std::fs::read(root.join("plain.txt")).unwrap(), b"plain");
    let r = serve.op(Op::Remove {
        path: rp("sub"),
        keep: None,
        group: None,
    });
    assert!(r.is_err(), "{r:?}");
    assert_eq!(std::fs::read(root.join("sub/inner.txt")).unwrap(), b"inner");
    // A path it never scanned cannot be removed or replaced.
    write_at(&root.join("late.txt"), b"late", T0, 0);
    assert_eq!(
        serve.op(Op::Remove {
            path: rp("late.txt"),
            keep: None,
            group: None,
        }),
        Err(OpError::Changed)
    );
    // More bytes than announced.
    let id = serve.id();
    serve.send(&Request::Op {
        id,
        op: Op::PutFile {
            path: rp("grown.txt"),
            version: evil_file(3),
            expect: Expect::Absent,
            keep: None,
            group: None,
        },
    });
    serve.send(&Request::Data {
        id,
        bytes: filled(10),
    });
    serve.send(&Request::End { id });
    assert!(matches!(
        serve.recv(),
        Some(Response::Done {
            result: Err(OpError::SourceChanged),
            ..
        })
    ));
    // Data for ids it never opened is ignored.
    serve.send(&Request::Data {
        id: 999,
        bytes: b"stray".to_vec(),
    });
    serve.send(&Request::End { id: 999 });
    let stderr = serve.close();
    assert_eq!(s.untouchable(), before, "{stderr}");
    assert!(!root.join("grown.txt").exists());
    assert!(find(&root, ".tmp").is_empty(), "{:?}", listing_all(&root));
}

#[test]
fn serve_refuses_its_own_state_and_temp_names() {
    let s = Scene::new();
    let root = attacked_replica(&s);
    let mut serve = Serve::open(&root);
    let state = root.join(".hubsync");
    let id_before = std::fs::read(state.join("replica-id")).unwrap();
    for op in [
        Op::PutFile {
            path: rp(".hubsync/replica-id"),
            version: evil_file(33),
            expect: Expect::Scanned,
            keep: None,
            group: None,
        },
        Op::PutFile {
            path: rp(".hubsync/pairs/hub-evil.state"),
            version: evil_file(3),
            expect: Expect::Absent,
            keep: None,
            group: None,
        },
        Op::Remove {
            path: rp(".hubsync/lock"),
            keep: None,
            group: None,
        },
        Op::Remove {
            path: rp(".hubsync"),
            keep: None,
            group: None,
        },
        Op::Mkdir {
            path: rp(".hubsync/conflicts/x"),
            version: dir(T0),
            expect: Expect::Absent,
            keep: None,
        },
        Op::PutSymlink {
            path: rp(".hubsync/scan-cache"),
            version: link("/etc/passwd"),
            expect: Expect::Scanned,
            keep: None,
        },
        Op::PutFile {
            path: rp("sub/.hubsync.0123456789abcdef.tmp"),
            version: evil_file(3),
            expect: Expect::Absent,
            keep: None,
            group: None,
        },
    ] {
        let what = format!("{op:?}");
        match serve.op(op) {
            Err(OpError::Refused(why)) => assert!(why.contains("internal"), "{what}: {why}"),
            other => panic!("{what}: {other:?}"),
        }
    }
    assert!(serve.read(".hubsync/replica-id").is_err());
    serve.close();
    assert_eq!(std::fs::read(state.join("replica-id")).unwrap(), id_before);
    assert!(!state.join("pairs/hub-evil.state").exists());
    assert!(state.join("lock").exists());
}

#[test]
fn serve_refuses_a_session_out_of_order_or_oversized() {
    let s = Scene::new();
    let root = attacked_replica(&s);
    // Work before Open.
    let mut serve = Serve::start(&root);
    serve.send(&Request::Op {
        id: 1,
        op: Op::Remove {
            path: rp("plain.txt"),
            keep: None,
            group: None,
        },
    });
    match serve.recv() {
        Some(Response::Fatal(why)) => assert!(why.contains("not opened"), "{why}"),
        other => panic!("{other:?}"),
    }
    serve.finish();
    // A frame beyond the limit.
    let mut serve = Serve::open(&root);
    let _ = serve.w.write_all(&u32::MAX.to_le_bytes());
    let _ = serve.w.flush();
    match serve.recv() {
        Some(Response::Fatal(why)) => assert!(why.contains("more than the limit"), "{why}"),
        other => panic!("{other:?}"),
    }
    serve.finish();
    // A second Open.
    let mut serve = Serve::open(&root);
    serve.send(&Request::Open(Open {
        hub: ReplicaId([1; 16]),
        label: "again".into(),
        excludes: vec![],
        pair: None,
        dry_run: false,
        pair_replica: None,
        check: false,
        conflict_retention: None,
        after_install: Vec::new(),
        post_apply: None,
    }));
    match serve.recv() {
        Some(Response::Fatal(why)) => assert!(why.contains("already open"), "{why}"),
        other => panic!("{other:?}"),
    }
    serve.finish();
    // A hub of another protocol version.
    let mut child = Command::new(BIN)
        .arg("serve")
        .arg(&root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hubsync-protocol 99\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("version 99")
            && err.contains(&format!("version {}", hubsync::proto::PROTOCOL_VERSION)),
        "{err}"
    );
    assert_eq!(std::fs::read(root.join("plain.txt")).unwrap(), b"plain");
    // The greeting is all it wrote to stdout.
    let mut first = String::new();
    BufReader::new(&out.stdout[..])
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first, proto::greeting());
    let mut rest = Vec::new();
    BufReader::new(&out.stdout[first.len()..])
        .read_to_end(&mut rest)
        .unwrap();
    assert!(rest.is_empty(), "{rest:?}");
}
