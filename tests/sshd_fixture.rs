//! Tests of the private-sshd fixture itself: logins work, servers are independent,
//! pause/resume freezes exactly the sshd processes, Silent never talks, Drop cleans up.

#[path = "common/sshd.rs"]
mod sshd;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdout, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use sshd::{ProcInfo, Silent, Sshd, has_banner};

macro_rules! sshd_or_skip {
    () => {
        match Sshd::start() {
            Some(s) => s,
            None => {
                eprintln!("skipped: no sshd");
                return;
            }
        }
    };
}

const LONG: Duration = Duration::from_secs(10);

/// Kills the ssh client if a test fails half-way, so no test leaves it running.
struct Client(Child);

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Client {
    fn wait_for(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.0.try_wait().expect("try_wait") {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Lines read from a child's stdout by a thread, so the test can wait with a timeout.
fn lines(out: ChildStdout) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Polls until `f` returns Some, or panics with `what` after LONG.
#[track_caller]
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + LONG;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[track_caller]
fn assert_echo(s: &Sshd, word: &str) {
    let out = s.ssh(&format!("echo {word}"));
    assert!(
        out.status.success(),
        "ssh failed ({}):\nstderr: {}\n--- sshd log ---\n{}",
        out.status,
        text(&out.stderr),
        s.log()
    );
    assert_eq!(
        text(&out.stdout),
        format!("{word}\n"),
        "stderr: {}",
        text(&out.stderr)
    );
}

#[test]
fn echo_hello() {
    let s = sshd_or_skip!();
    assert_echo(&s, "hello");

    // The accessors describe this server.
    let port = s.port();
    assert!(
        s.host_key_line()
            .starts_with(&format!("[127.0.0.1]:{port} ssh-ed25519 AAAA")),
        "{}",
        s.host_key_line()
    );
    assert_eq!(
        std::fs::read_to_string(s.known_hosts()).unwrap(),
        format!("{}\n", s.host_key_line())
    );
    assert!(
        s.client_pub().starts_with("ssh-ed25519 AAAA"),
        "{}",
        s.client_pub()
    );
    assert!(s.client_key().starts_with(s.dir()) && s.client_key().is_file());
    let uid = rustix::process::getuid().as_raw();
    let id = std::process::Command::new("id")
        .arg("-un")
        .output()
        .unwrap();
    assert_eq!(s.user(), text(&id.stdout).trim(), "uid {uid}");
    let args = s.ssh_args();
    assert_eq!(args[0], "ssh");
    assert!(
        args.windows(2).any(|w| w == ["-p", &port.to_string()]),
        "{args:?}"
    );
    // The log is sshd's, at VERBOSE: it records the key that logged us in.
    assert!(s.log().contains("Accepted publickey for"), "{}", s.log());
}

#[test]
fn two_servers_are_independent() {
    let a = sshd_or_skip!();
    let b = sshd_or_skip!();
    assert_ne!(a.port(), b.port());
    assert_ne!(a.host_key_line(), b.host_key_line());
    assert_echo(&a, "from-a");
    assert_echo(&b, "from-b");

    // Host keys are really checked: a's client options with b's known_hosts are refused.
    let mut args = a.ssh_args();
    let kh = args
        .iter()
        .position(|x| x.starts_with("UserKnownHostsFile="))
        .unwrap();
    args[kh] = format!("UserKnownHostsFile={}", b.known_hosts().display());
    let out = std::process::Command::new(&args[0])
        .args(&args[1..])
        .arg(a.destination())
        .arg("echo should-not-run")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(255),
        "stdout {:?}",
        text(&out.stdout)
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn pause_holds_new_logins_until_resume() {
    let s = sshd_or_skip!();
    s.pause();
    assert!(
        s.sshd_processes().iter().all(ProcInfo::is_stopped),
        "{:?}",
        s.sshd_processes()
    );
    let mut c = Client(
        s.ssh_command("echo resumed")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The TCP handshake completes in the kernel, but the stopped listener never accepts.
    let early = c.wait_for(Duration::from_secs(1));
    assert!(
        early.is_none(),
        "ssh finished while sshd was paused: {early:?}"
    );
    s.resume();
    let st = c.wait_for(LONG).expect("ssh did not finish after resume()");
    let mut out = String::new();
    c.0.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let mut err = String::new();
    c.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(st.success(), "{st}: {err}\n--- sshd log ---\n{}", s.log());
    assert_eq!(out, "resumed\n");
    assert!(s.sshd_processes().iter().all(|p| !p.is_stopped()));
}

#[test]
fn pause_stops_sessions_but_not_their_commands() {
    let s = sshd_or_skip!();
    let mut c = Client(
        s.ssh_command("/bin/cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut stdin = c.0.stdin.take().unwrap();
    let rx = lines(c.0.stdout.take().unwrap());
    stdin.write_all(b"one\n").unwrap();
    assert_eq!(rx.recv_timeout(LONG).expect("no echo from cat"), "one");
    let cat = eventually("cat under sshd", || {
        s.processes().into_iter().find(|p| p.comm == "cat")
    });

    s.pause();
    let stopped = s.sshd_processes();
    // The listener plus at least the per-connection monitor and its session child.
    assert!(stopped.len() >= 2, "{stopped:?}");
    assert!(stopped.iter().all(ProcInfo::is_stopped), "{stopped:?}");
    let now = cat.current().expect("cat is gone");
    assert!(
        !now.is_stopped(),
        "pause() stopped the user's command: {now:?}"
    );
    // Data no longer flows through the stopped session.
    stdin.write_all(b"two\n").unwrap();
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "data passed a paused sshd"
    );

    s.resume();
    assert_eq!(
        rx.recv_timeout(LONG).expect("no echo after resume()"),
        "two"
    );
    drop(stdin);
    let st = c.wait_for(LONG).expect("ssh did not exit after EOF");
    assert!(st.success(), "{st}\n--- sshd log ---\n{}", s.log());
}

#[test]
fn silent_accepts_but_never_speaks() {
    let silent = Silent::start();
    let addr = SocketAddr::from(([127, 0, 0, 1], silent.port()));
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 64];
    match conn.read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("expected silence, got {other:?}"),
    }
    // The accepted socket was held open until the drop, which closes it.
    drop(silent);
    conn.set_read_timeout(Some(LONG)).unwrap();
    match conn.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("expected the connection to close on drop, got {other:?}"),
    }
}

/// Every process in `procs` is gone (or a zombie left to init).
#[track_caller]
fn assert_all_gone(procs: &[ProcInfo]) {
    let deadline = Instant::now() + LONG;
    while procs.iter().any(ProcInfo::alive) {
        assert!(
            Instant::now() < deadline,
            "still running: {:?}",
            procs.iter().filter(|p| p.alive()).collect::<Vec<_>>()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn drop_stops_server_sessions_and_commands() {
    let s = sshd_or_skip!();
    let port = s.port();
    let mut c = Client(
        s.ssh_command("/bin/sleep 600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    eventually("sleep under sshd", || {
        s.processes().into_iter().find(|p| p.comm == "sleep")
    });
    let procs = s.processes();
    assert!(procs.len() >= 3, "{procs:?}");
    let dir = s.dir().to_path_buf();
    drop(s);
    assert!(!has_banner(port), "port {port} still answers with a banner");
    assert_all_gone(&procs);
    assert!(!dir.exists(), "temp dir {dir:?} left behind");
    assert!(
        c.wait_for(LONG).is_some(),
        "ssh client still running after the server was dropped"
    );
}

#[test]
fn drop_while_paused_cleans_up() {
    let s = sshd_or_skip!();
    let port = s.port();
    let mut c = Client(
        s.ssh_command("/bin/sleep 600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    eventually("sleep under sshd", || {
        s.processes().into_iter().find(|p| p.comm == "sleep")
    });
    s.pause();
    let procs = s.processes();
    drop(s);
    assert!(!has_banner(port));
    assert_all_gone(&procs);
    assert!(
        c.wait_for(LONG).is_some(),
        "ssh client still running after the server was dropped"
    );
}
