//! A private OpenSSH server on 127.0.0.1 for integration tests, and a silent TCP peer.
//!
//! [`Sshd::start`] runs `/usr/sbin/sshd -D -e -f CONFIG` from a temp dir holding a fresh
//! ed25519 host key, a client key authorized for the current user, a `known_hosts` line for
//! the server and sshd's log. Logins are key-only and always as the current user: a
//! non-root sshd can only log in its own user, and as root we log in as root.
//!
//! Shaped by what we measured (see the notes, "sshd inside cargo test"):
//! - sshd must be started by absolute path, because it re-executes itself per connection.
//! - Readiness is "our sshd logged `Server listening on 127.0.0.1 port N` and a TCP connect
//!   reads an `SSH-2.0-` banner". The log line proves that *our* sshd owns the port; a
//!   banner alone could come from another server that won the race for it.
//! - sshd calls `setsid()` for every accepted connection, so the per-connection processes
//!   are not in the listener's process group. [`Sshd::pause`] and `Drop` therefore find the
//!   processes by walking `/proc` down from the listener's pid.
//! - The session resets `PATH` and Debian's bash sources `~/.bashrc`, so commands run over
//!   ssh should be absolute paths and protocols should not assume a clean stdout prefix.
//!
//! When sshd cannot be used, `start()` returns `None` (tests print "skipped: no sshd"),
//! unless `HUBSYNC_REQUIRE_SSHD` is set (non-empty, not `0`), which CI does so that a
//! missing sshd fails instead of silently skipping.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process, kill_process_group};

/// The compiled-in path matters: sshd refuses to start unless given by absolute path.
pub const SSHD: &str = "/usr/sbin/sshd";
/// Set (non-empty and not `0`) to make a missing or broken sshd a test failure.
pub const REQUIRE_ENV: &str = "HUBSYNC_REQUIRE_SSHD";

const READY_TIMEOUT: Duration = Duration::from_secs(10);
const READY_POLL: Duration = Duration::from_millis(20);
const BIND_ATTEMPTS: usize = 20;
/// How long pause() and Drop wait for SIGSTOP/SIGTERM to take effect before going on.
const SIGNAL_WAIT: Duration = Duration::from_secs(3);
/// How long Drop lets a parent reap its exited children before ending the parent too.
const REAP_WAIT: Duration = Duration::from_millis(200);

/// A running private sshd. Dropping it kills the listener, every per-connection process and
/// the commands they started, and removes the temp dir.
pub struct Sshd {
    child: Child,
    /// See [`watch`]; its stdin is the pipe whose closing means "the test process is gone".
    watcher: Option<Child>,
    port: u16,
    user: String,
    client_key: PathBuf,
    client_pub: String,
    known_hosts: PathBuf,
    host_key_line: String,
    log_path: PathBuf,
    /// Processes stopped by pause(), so resume() continues exactly them even if /proc changed.
    paused: Mutex<Vec<ProcInfo>>,
    // Declared last so it is removed after the fields above are dropped.
    dir: tempfile::TempDir,
}

/// One line of `/proc/PID/stat`, enough to walk a process tree and tell processes apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: u32,
    pub ppid: u32,
    /// The kernel's short name (`comm`, at most 15 bytes); `sshd` for every sshd process.
    pub comm: String,
    /// `R`, `S`, `D`, `T` (stopped), `t`, `Z`, ...
    pub state: char,
    /// Start time in clock ticks since boot; with `pid` it identifies a process.
    pub start: u64,
}

impl ProcInfo {
    pub fn is_sshd(&self) -> bool {
        // OpenSSH 9.8+ splits per-connection work into sshd-session (and 10.0 sshd-auth).
        self.comm == "sshd" || self.comm.starts_with("sshd-")
    }
    pub fn is_stopped(&self) -> bool {
        matches!(self.state, 'T' | 't')
    }
    /// Whether this very process (same pid *and* start time) still runs (zombies do not).
    pub fn alive(&self) -> bool {
        read_stat(self.pid).is_some_and(|p| p.start == self.start && !matches!(p.state, 'Z' | 'X'))
    }
    /// Its current state, or None if it is gone (or its pid now names another process).
    pub fn current(&self) -> Option<ProcInfo> {
        read_stat(self.pid).filter(|p| p.start == self.start)
    }
    fn signal(&self, sig: Signal) {
        // Re-check identity right before signalling so a reused pid is never hit.
        if self.current().is_some()
            && let Some(pid) = Pid::from_raw(self.pid as i32)
        {
            let _ = kill_process(pid, sig);
        }
    }
}

impl Sshd {
    /// Starts a private sshd on a free port of 127.0.0.1 and waits until it sends its banner.
    ///
    /// Returns None (after printing why to stderr) if sshd cannot be used here, unless
    /// `HUBSYNC_REQUIRE_SSHD` is set, in which case it panics with the reason and sshd's log.
    pub fn start() -> Option<Sshd> {
        match Sshd::try_start() {
            Ok(s) => Some(s),
            Err(why) if required() => {
                panic!("{REQUIRE_ENV} is set but the test sshd could not be started: {why}")
            }
            Err(why) => {
                eprintln!("test sshd unavailable: {why}");
                None
            }
        }
    }

    fn try_start() -> Result<Sshd, String> {
        if !Path::new(SSHD).is_file() {
            return Err(format!("{SSHD} not found (apt-get install openssh-server)"));
        }
        let me = current_user()?;
        check_user(&me)?;
        let dir = tempfile::Builder::new()
            .prefix("hubsync-sshd.")
            .tempdir()
            .map_err(|e| format!("cannot create a temp dir: {e}"))?;
        let d = dir.path();
        let host_key = d.join("host_ed25519");
        let client_key = d.join("client_ed25519");
        keygen(&host_key, "hubsync-test-host")?;
        keygen(&client_key, "hubsync-test-client")?;
        let client_pub = read_pub(&client_key)?;
        let host_pub = read_pub(&host_key)?;
        let authorized = d.join("authorized_keys");
        fs::write(&authorized, format!("{client_pub}\n")).map_err(|e| format!("{e}"))?;
        // Fail here rather than in the first test's ssh() if the client is missing.
        match Command::new("ssh").arg("-V").stdin(Stdio::null()).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                return Err(format!(
                    "`ssh -V` failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                ));
            }
            Err(e) => {
                return Err(format!(
                    "cannot run ssh (apt-get install openssh-client): {e}"
                ));
            }
        }

        let cfg_path = d.join("sshd_config");
        let log_path = d.join("sshd.log");
        let mut failures = String::new();
        for attempt in 1..=BIND_ATTEMPTS {
            let port = free_port()?;
            let cfg = config(d, &host_key, &authorized, &me.name, port);
            fs::write(&cfg_path, cfg).map_err(|e| format!("cannot write {cfg_path:?}: {e}"))?;
            let log = fs::File::create(&log_path).map_err(|e| format!("{log_path:?}: {e}"))?;
            let mut child = Command::new(SSHD)
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&cfg_path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .process_group(0)
                .spawn()
                .map_err(|e| format!("cannot run {SSHD}: {e}"))?;
            match wait_ready(&mut child, port, &log_path) {
                Ready::Yes => {
                    let host_key_line = format!("[127.0.0.1]:{port} {}", key_fields(&host_pub));
                    let known_hosts = d.join("known_hosts");
                    if let Err(e) = fs::write(&known_hosts, format!("{host_key_line}\n")) {
                        kill_tree(&mut child);
                        return Err(format!("cannot write {known_hosts:?}: {e}"));
                    }
                    let watcher = watch(&child, d);
                    return Ok(Sshd {
                        child,
                        watcher,
                        port,
                        user: me.name,
                        client_key,
                        client_pub,
                        known_hosts,
                        host_key_line,
                        log_path,
                        paused: Mutex::new(Vec::new()),
                        dir,
                    });
                }
                Ready::PortTaken => {
                    // Someone took the port between our probe bind and sshd's bind.
                    let _ = child.wait();
                    let _ = writeln!(failures, "attempt {attempt}: port {port} was taken");
                }
                Ready::Failed(why) => {
                    kill_tree(&mut child);
                    let log = fs::read_to_string(&log_path).unwrap_or_default();
                    return Err(format!("{why}\n{failures}--- sshd log ---\n{log}"));
                }
            }
        }
        Err(format!(
            "sshd could not bind a port in {BIND_ATTEMPTS} attempts:\n{failures}"
        ))
    }

    pub fn port(&self) -> u16 {
        self.port
    }
    /// The pid of the listening sshd (the process started by the fixture).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    /// The current user's name, the only user this server lets in.
    pub fn user(&self) -> String {
        self.user.clone()
    }
    /// A private key file authorized on this server.
    pub fn client_key(&self) -> &Path {
        &self.client_key
    }
    /// The public key line of [`Sshd::client_key`] (`ssh-ed25519 AAAA... comment`).
    pub fn client_pub(&self) -> String {
        self.client_pub.clone()
    }
    /// A known_hosts file holding exactly [`Sshd::host_key_line`].
    pub fn known_hosts(&self) -> &Path {
        &self.known_hosts
    }
    /// `[127.0.0.1]:PORT ssh-ed25519 AAAA...`
    pub fn host_key_line(&self) -> String {
        self.host_key_line.clone()
    }
    /// The temp dir holding keys, config and log; other tests may put files here.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    /// sshd's log (its stderr, LogLevel VERBOSE) so far, for failure messages.
    pub fn log(&self) -> String {
        match fs::read(&self.log_path) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) => format!("(cannot read {:?}: {e})", self.log_path),
        }
    }

    /// The listener and every process below it, user commands included, top-down.
    pub fn processes(&self) -> Vec<ProcInfo> {
        tree(self.pid(), false)
    }
    /// The sshd processes of this server: the listener and the per-connection ones.
    pub fn sshd_processes(&self) -> Vec<ProcInfo> {
        tree(self.pid(), true)
    }

    /// Stops (SIGSTOP) the listener and every per-connection sshd process, but not the
    /// commands they run. New connections then complete the TCP handshake but get no
    /// banner; open sessions stop moving data. Returns once all of them are stopped.
    pub fn pause(&self) {
        let stopped = freeze(self.pid(), true);
        let mut paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        for p in stopped {
            if !paused.contains(&p) {
                paused.push(p);
            }
        }
    }

    /// Continues (SIGCONT) what [`Sshd::pause`] stopped.
    pub fn resume(&self) {
        let paused = std::mem::take(&mut *self.paused.lock().unwrap_or_else(|e| e.into_inner()));
        // Also everything sshd-ish below the listener now: a process stopped by pause()
        // cannot have forked since, so this adds nothing in the normal case, but it makes
        // resume() safe to call without a pause().
        let mut seen = HashSet::new();
        for p in tree(self.pid(), true).iter().chain(&paused) {
            if seen.insert((p.pid, p.start)) {
                p.signal(Signal::CONT);
            }
        }
    }

    /// `ssh` (first element) and options that log in to this server non-interactively,
    /// checking its host key; the caller appends `user@127.0.0.1` and the command.
    pub fn ssh_args(&self) -> Vec<String> {
        vec![
            "ssh".into(),
            "-F".into(),
            "/dev/null".into(),
            "-T".into(),
            "-p".into(),
            self.port.to_string(),
            "-i".into(),
            self.client_key.display().to_string(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            format!("UserKnownHostsFile={}", ssh_quote(&self.known_hosts)),
            // Keep a stray system-wide entry for [127.0.0.1]:PORT from interfering.
            "-o".into(),
            "GlobalKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "LogLevel=ERROR".into(),
        ]
    }

    /// `user@127.0.0.1`, the destination to append to [`Sshd::ssh_args`].
    pub fn destination(&self) -> String {
        format!("{}@127.0.0.1", self.user)
    }

    /// A `Command` running `cmd` on this server (stdio left at Command's defaults).
    pub fn ssh_command(&self, cmd: &str) -> Command {
        let args = self.ssh_args();
        let mut c = Command::new(&args[0]);
        c.args(&args[1..]).arg(self.destination()).arg(cmd);
        c
    }

    /// Runs `cmd` on this server with stdin closed and returns its output. `cmd` goes
    /// through the user's login shell with sshd's PATH: use absolute paths.
    pub fn ssh(&self, cmd: &str) -> Output {
        self.ssh_command(cmd)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run ssh: {e}"))
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        kill_tree(&mut self.child);
        // kill_tree's SIGTERM to the process group has normally ended it already.
        if let Some(w) = &mut self.watcher {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

/// The cleanup Drop cannot do if the test process dies first (Ctrl-C, a CI timeout,
/// SIGKILL): sshd is in its own process group, so it would outlive us, with its temp dir.
/// This shell joins that group and blocks reading a pipe only we hold; when we die the read
/// returns, and it ends the group and removes the dir. Per-connection processes are not in
/// the group, but they exit when their clients (our children) die.
fn watch(sshd: &Child, dir: &Path) -> Option<Child> {
    const SCRIPT: &str =
        r#"read _; trap '' TERM; kill -TERM -"$1"; kill -CONT -"$1"; rm -rf -- "$2""#;
    Command::new("/bin/sh")
        .arg("-c")
        .arg(SCRIPT)
        .arg("hubsync-sshd-watch")
        .arg(sshd.id().to_string())
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(sshd.id() as i32)
        .spawn()
        .ok()
}

/// Stops the whole tree under `child` (so nothing forks or gets reparented while we look),
/// then ends it from the leaves up: SIGTERM + SIGCONT one level, SIGCONT its parents so they
/// reap it, SIGKILL what ignores SIGTERM. Leaves first matters where PID 1 does not reap
/// (containers without an init): a child that outlives its parent ends as a zombie forever.
/// Finally the listener (`child`) itself, which is reaped here.
fn kill_tree(child: &mut Child) {
    let root = child.id();
    if matches!(child.try_wait(), Ok(None)) {
        let all = freeze(root, false);
        let depth = depths(&all, root);
        let level = |d: usize| {
            all.iter()
                .zip(&depth)
                .filter(move |(_, x)| **x == d)
                .map(|(p, _)| p)
        };
        for d in (1..=depth.iter().copied().max().unwrap_or(0)).rev() {
            for p in level(d) {
                p.signal(Signal::TERM);
                p.signal(Signal::CONT);
            }
            for p in level(d - 1) {
                p.signal(Signal::CONT);
            }
            if !wait_until(SIGNAL_WAIT, || level(d).all(|p| !p.alive())) {
                for p in level(d) {
                    p.signal(Signal::KILL);
                }
                wait_until(SIGNAL_WAIT, || level(d).all(|p| !p.alive()));
            }
            // Give the parents a moment to reap (also children that died while they were
            // stopped, which the tree walk skips); only tidiness depends on it.
            let parents: Vec<u32> = level(d - 1).map(|p| p.pid).collect();
            wait_until(REAP_WAIT, || {
                level(d).all(|p| p.current().is_none()) && !has_zombie_children(&parents)
            });
        }
        // Likewise the listener may hold zombies (e.g. the connection of a client that gave
        // up) that it could not reap while stopped.
        if let Some(r) = all.first() {
            r.signal(Signal::CONT);
        }
        wait_until(REAP_WAIT, || !has_zombie_children(&[root]));
        if let Some(g) = Pid::from_raw(root as i32) {
            let _ = kill_process_group(g, Signal::TERM);
            let _ = kill_process_group(g, Signal::CONT);
            if !wait_until(SIGNAL_WAIT, || !matches!(child.try_wait(), Ok(None))) {
                let _ = kill_process_group(g, Signal::KILL);
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn has_zombie_children(parents: &[u32]) -> bool {
    all_procs()
        .iter()
        .any(|p| p.state == 'Z' && parents.contains(&p.ppid))
}

/// For each process of a tree listed by [`freeze`], its distance from `root`.
fn depths(procs: &[ProcInfo], root: u32) -> Vec<usize> {
    let parent: HashMap<u32, u32> = procs.iter().map(|p| (p.pid, p.ppid)).collect();
    procs
        .iter()
        .map(|p| {
            let (mut pid, mut d) = (p.pid, 0);
            while pid != root && d <= procs.len() {
                match parent.get(&pid) {
                    Some(&pp) => (pid, d) = (pp, d + 1),
                    None => break,
                }
            }
            d
        })
        .collect()
}

/// Polls `done` every 2 ms until it holds (true) or `limit` passes (false).
fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// SIGSTOPs `root` and its descendants (only sshd processes, with an all-sshd ancestry,
/// if `only_sshd`) until a scan made after everything seen was stopped finds nothing new.
/// That closes the race with a fork between scanning a parent and stopping it.
fn freeze(root: u32, only_sshd: bool) -> Vec<ProcInfo> {
    let deadline = Instant::now() + SIGNAL_WAIT;
    let mut stopped: Vec<ProcInfo> = Vec::new();
    loop {
        let now = tree(root, only_sshd);
        let mut new = false;
        // Top-down, so a parent is stopped before we look at its children again.
        for p in &now {
            if !stopped.iter().any(|s| s.pid == p.pid && s.start == p.start) {
                p.signal(Signal::STOP);
                stopped.push(p.clone());
                new = true;
            }
        }
        // SIGSTOP takes effect asynchronously; wait until the kernel reports each stopped.
        while Instant::now() < deadline
            && !stopped.iter().all(|p| {
                p.current()
                    .is_none_or(|c| c.is_stopped() || matches!(c.state, 'Z' | 'X'))
            })
        {
            thread::sleep(Duration::from_millis(1));
        }
        if !new || Instant::now() >= deadline {
            return stopped;
        }
    }
}

/// `root` and its descendants, parents before children. With `only_sshd`, the walk does
/// not enter non-sshd processes, so a user command and everything it starts are left out.
/// Zombies are left out too: a stopped listener cannot reap its exited children (such as
/// the one that served our readiness probe), and a zombie has no children of its own.
fn tree(root: u32, only_sshd: bool) -> Vec<ProcInfo> {
    let mut all = all_procs();
    all.retain(|p| !matches!(p.state, 'Z' | 'X'));
    let Some(r) = all.iter().find(|p| p.pid == root) else {
        return Vec::new();
    };
    let mut children: HashMap<u32, Vec<&ProcInfo>> = HashMap::new();
    for p in &all {
        children.entry(p.ppid).or_default().push(p);
    }
    let mut out = vec![r.clone()];
    let mut i = 0;
    while i < out.len() {
        let pid = out[i].pid;
        for c in children.get(&pid).into_iter().flatten() {
            if c.pid != root && (!only_sshd || c.is_sshd()) {
                out.push((*c).clone());
            }
        }
        i += 1;
    }
    out
}

fn all_procs() -> Vec<ProcInfo> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(read_stat)
        .collect()
}

fn read_stat(pid: u32) -> Option<ProcInfo> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may itself contain spaces and parentheses; it ends at the *last* ')'.
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = s.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state), rest[1] field 4 (ppid), rest[19] field 22 (starttime).
    Some(ProcInfo {
        pid,
        ppid: rest.get(1)?.parse().ok()?,
        comm,
        state: rest.first()?.chars().next()?,
        start: rest.get(19)?.parse().ok()?,
    })
}

enum Ready {
    Yes,
    PortTaken,
    Failed(String),
}

fn wait_ready(child: &mut Child, port: u16, log_path: &Path) -> Ready {
    let listening = format!("Server listening on 127.0.0.1 port {port}.");
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let log = fs::read_to_string(log_path).unwrap_or_default();
        match child.try_wait() {
            Ok(Some(status)) => {
                return if log.contains("Address already in use")
                    || log.contains("Cannot bind any address")
                {
                    Ready::PortTaken
                } else {
                    Ready::Failed(format!("sshd exited at start ({status})"))
                };
            }
            Ok(None) => {}
            Err(e) => return Ready::Failed(format!("cannot wait for sshd: {e}")),
        }
        if log.contains(&listening) && has_banner(port) {
            return Ready::Yes;
        }
        if Instant::now() > deadline {
            return Ready::Failed(format!(
                "sshd did not answer with an SSH-2.0- banner on port {port} within {READY_TIMEOUT:?}"
            ));
        }
        thread::sleep(READY_POLL);
    }
}

/// Whether a TCP connect to the port reads an `SSH-2.0-` banner within a short timeout.
pub fn has_banner(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while got.len() < 8 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got.starts_with(b"SSH-2.0-")
}

fn required() -> bool {
    std::env::var_os(REQUIRE_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

struct User {
    uid: u32,
    name: String,
    shell: String,
}

/// The user we run as, looked up by uid (not $USER, which `su` and sudo leave stale).
fn current_user() -> Result<User, String> {
    let uid = rustix::process::getuid().as_raw();
    // getent goes through NSS like sshd does; /etc/passwd is the fallback.
    let line = Command::new("getent")
        .args(["passwd", &uid.to_string()])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .or_else(|| {
            fs::read_to_string("/etc/passwd")
                .ok()?
                .lines()
                .find_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.len() == 7 && f[2] == uid.to_string()).then(|| l.to_string())
                })
        })
        .ok_or_else(|| format!("uid {uid} has no passwd entry; sshd cannot log it in"))?;
    let f: Vec<&str> = line.split(':').collect();
    if f.len() != 7 {
        return Err(format!("odd passwd entry for uid {uid}: {line:?}"));
    }
    Ok(User {
        uid,
        name: f[0].to_string(),
        shell: f[6].to_string(),
    })
}

/// Rejects users sshd would refuse, with a message saying how to fix it.
fn check_user(me: &User) -> Result<(), String> {
    let shell = if me.shell.is_empty() {
        "/bin/sh"
    } else {
        &me.shell
    };
    if shell.ends_with("/nologin") || shell.ends_with("/false") || !Path::new(shell).is_file() {
        return Err(format!(
            "user {} has no usable login shell ({shell:?})",
            me.name
        ));
    }
    if me.uid == 0 {
        // With UsePAM no, a root sshd refuses accounts whose password starts with '!',
        // which is what useradd creates ("User x not allowed because account is locked").
        if let Ok(shadow) = fs::read_to_string("/etc/shadow") {
            let prefix = format!("{}:", me.name);
            if let Some(l) = shadow.lines().find(|l| l.starts_with(&prefix))
                && l[prefix.len()..].starts_with('!')
            {
                return Err(format!(
                    "account {} is locked in /etc/shadow; sshd (UsePAM no) refuses it. \
                     Unlock it with `usermod -p '*' {}`",
                    me.name, me.name
                ));
            }
        }
        // The privilege-separation chroot is compiled in; fresh containers lack it.
        let run = Path::new("/run/sshd");
        if !run.is_dir() {
            fs::create_dir_all(run)
                .and_then(|()| fs::set_permissions(run, fs::Permissions::from_mode(0o755)))
                .map_err(|e| format!("cannot create /run/sshd: {e}"))?;
        }
    }
    Ok(())
}

fn keygen(path: &Path, comment: &str) -> Result<(), String> {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ssh-keygen: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ssh-keygen failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

fn read_pub(key: &Path) -> Result<String, String> {
    let p = key.with_extension("pub");
    fs::read_to_string(&p)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("cannot read {p:?}: {e}"))
}

/// `ssh-ed25519 AAAA...` without the comment.
fn key_fields(pub_line: &str) -> String {
    pub_line
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

fn free_port() -> Result<u16, String> {
    let l =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("cannot bind 127.0.0.1:0: {e}"))?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

/// Quotes a path for sshd_config / `ssh -o` if it holds whitespace or quotes.
fn ssh_quote(p: &Path) -> String {
    let s = p.display().to_string();
    if s.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'') {
        format!("\"{}\"", s.replace('"', "\\\""))
    } else {
        s
    }
}

fn config(dir: &Path, host_key: &Path, authorized: &Path, user: &str, port: u16) -> String {
    // AuthorizedKeysFile expands %-tokens; a literal '%' in the temp path would need "%%".
    let authorized = ssh_quote(authorized).replace('%', "%%");
    format!(
        "\
ListenAddress 127.0.0.1:{port}
AddressFamily inet
HostKey {host_key}
PidFile {pid}
AuthorizedKeysFile {authorized}
AllowUsers {user}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
HostbasedAuthentication no
UsePAM no
StrictModes no
MaxStartups 100:30:200
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
PermitUserEnvironment no
LogLevel VERBOSE
",
        host_key = ssh_quote(host_key),
        pid = ssh_quote(&dir.join("sshd.pid")),
    )
}

/// A TCP listener on 127.0.0.1 that accepts connections and never sends a byte, like a
/// black-holed peer. Accepted sockets stay open until it is dropped.
pub struct Silent {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Silent {
    pub fn start() -> Silent {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        // Non-blocking accept polled with a stop flag, so Drop never hangs on accept().
        listener.set_nonblocking(true).expect("set_nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let mut held = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => held.push(s),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
            drop(held);
        });
        Silent {
            port,
            stop,
            thread: Some(thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
