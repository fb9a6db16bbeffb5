//! The built-in SSH client (the `ssh2` crate, libssh2): connect, verify the host key,
//! log in with keys only, run `hubsync serve PATH`, and turn the channel into the same
//! pair of byte streams a local child gives.
//!
//! libssh2's traps (see `shared/notes/ssh2.md`) shape this file:
//! - one thread owns the session and drives it in non-blocking mode with `poll`, so no
//!   blocking read ever holds the session lock against a writer;
//! - the engine talks to that thread through two socket pairs, so flow control is the
//!   kernel's: when the engine stops reading, we stop reading the channel, and the SSH
//!   window does the rest (nothing piles up in memory);
//! - stderr is read in the same loop (it shares the window); `flush()` is never called
//!   (it discards unread input); `wait_eof` comes before `wait_close`; an exit by signal
//!   is read from `exit_signal`, since `exit_status` says 0 then;
//! - no libssh2 keepalive (it turns into false timeouts); the engine's idle timer and
//!   `serve`'s progress messages decide when a peer is dead;
//! - agent identities are tried one by one (`userauth_agent` only tries the first);
//! - the host-key check is ours (`known_hosts.rs`), with negotiation steered to known
//!   key types.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use ssh2::{BlockDirections, Channel, HashType, MethodType, Session};

use super::known_hosts::{self, KnownHosts, Verdict};
use super::ssh::{SshOptions, SshTarget, home};
use super::{End, Link};

/// The receive window we offer: large windows matter on long links (measured: 61 MB/s
/// with 2 MiB, 166 MB/s with 16 MiB at 40 ms RTT).
const WINDOW: u32 = 16 << 20;
const STDERR_KEEP: usize = 16 << 10;

struct Shared {
    killed: AtomicBool,
    stderr: Mutex<Vec<u8>>,
    /// How the remote command ended ("" if cleanly); set when the pump stops.
    exit: Mutex<Option<String>>,
    done: Condvar,
}

pub struct SshEnd {
    shared: Arc<Shared>,
    tcp: TcpStream,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl End for SshEnd {
    fn kill(&mut self) {
        self.shared.killed.store(true, Ordering::Relaxed);
        let _ = self.tcp.shutdown(Shutdown::Both);
    }

    fn wait(&mut self, timeout: Duration) -> Option<String> {
        let exit = locked(&self.shared.exit);
        let (exit, res) = self
            .shared
            .done
            .wait_timeout_while(exit, timeout, |e| e.is_none())
            .unwrap_or_else(|p| p.into_inner());
        if res.timed_out() {
            drop(exit);
            self.kill();
            return Some("did not finish; connection closed".into());
        }
        exit.clone().filter(|s| !s.is_empty())
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&locked(&self.shared.stderr))
            .trim()
            .to_string()
    }
}

/// Connects to `t` and starts `serve` there. Errors are whole sentences naming the
/// peer's address and what to do.
pub fn connect(t: &SshTarget, o: &SshOptions) -> Result<Link, String> {
    let at = format!("{}:{}", t.host, t.port);
    let tcp = tcp_connect(t, o.connect_timeout)?;
    let _ = tcp.set_nodelay(true);
    let mut sess = Session::new().map_err(|e| format!("cannot start an SSH session: {e}"))?;
    // Each blocking call of the handshake and login gets this long.
    sess.set_timeout((o.connect_timeout.as_millis() as u32).max(1000) * 2);
    let files = [o.user_known_hosts(), "/etc/ssh/ssh_known_hosts".into()];
    let kh = KnownHosts::load(&files);
    if let Some(algs) = kh.preferred_algorithms(&t.host, t.port) {
        let _ = sess.method_pref(MethodType::HostKey, &algs);
    }
    sess.set_tcp_stream(tcp.try_clone().map_err(|e| e.to_string())?);
    sess.handshake().map_err(|e| {
        format!(
            "the SSH handshake with {at} failed ({e}); is an SSH server answering there? (waited up to {} s)",
            o.connect_timeout.as_secs() * 2
        )
    })?;

    let (blob, _) = sess
        .host_key()
        .ok_or_else(|| format!("{at} sent no host key"))?;
    let blob = blob.to_vec();
    let ty = known_hosts::blob_type(&blob).unwrap_or_else(|| "unknown".into());
    let fp = sess
        .host_key_hash(HashType::Sha256)
        .map(known_hosts::fingerprint)
        .unwrap_or_default();
    let user_file = o.user_known_hosts();
    match kh.check(&t.host, t.port, &blob) {
        Verdict::Match => {}
        Verdict::Unknown if o.accept_new_host_key => {
            known_hosts::append(&user_file, &t.host, t.port, &blob).map_err(|e| {
                format!(
                    "cannot add the host key of {at} to {}: {e}",
                    user_file.display()
                )
            })?;
        }
        Verdict::Unknown => {
            return Err(format!(
                "the host key of {at} is not known ({ty} key fingerprint {fp}); if that is the server's key, add it with `ssh-keyscan -p {} -t {ty} {} >> {}` (compare the fingerprint with `ssh-keygen -lf` on the server), or run once with --accept-new-host-key",
                t.port,
                t.host,
                user_file.display()
            ));
        }
        Verdict::Changed { entry } => {
            return Err(format!(
                "WARNING: the host key of {at} has CHANGED: it offered a {ty} key with fingerprint {fp}, which does not match {} line {} ({}). Someone could be intercepting the connection. If the server was reinstalled, remove that line (`ssh-keygen -R '{}' -f {}`) and add the new key; nothing was synced with this peer",
                entry.file.display(),
                entry.line,
                entry.key_type,
                known_hosts::host_field(&t.host, t.port),
                entry.file.display()
            ));
        }
        Verdict::Revoked { entry } => {
            return Err(format!(
                "the host key of {at} ({fp}) is marked @revoked in {} line {}; refusing to connect",
                entry.file.display(),
                entry.line
            ));
        }
    }

    let user = t.user_or_local();
    login(&sess, &user, &at, o)?;

    let mut ch = sess
        .channel_open("session", WINDOW, 32768, None)
        .map_err(|e| format!("{at} refused a session channel: {e}"))?;
    let command = o.remote(&t.path);
    ch.exec(&command)
        .map_err(|e| format!("{at} refused to run `{command}`: {e}"))?;

    let (hub_writer, pump_in) = UnixStream::pair().map_err(|e| e.to_string())?;
    let (pump_out, hub_reader) = UnixStream::pair().map_err(|e| e.to_string())?;
    let shared = Arc::new(Shared {
        killed: AtomicBool::new(false),
        stderr: Mutex::new(Vec::new()),
        exit: Mutex::new(None),
        done: Condvar::new(),
    });
    let end = SshEnd {
        shared: shared.clone(),
        tcp: tcp.try_clone().map_err(|e| e.to_string())?,
    };
    std::thread::Builder::new()
        .name(format!("ssh {at}"))
        .spawn(move || {
            let result = pump(&sess, &mut ch, &tcp, pump_in, pump_out, &shared);
            let exit = match result {
                Ok(()) => finish(&sess, &mut ch),
                Err(e) if shared.killed.load(Ordering::Relaxed) => {
                    format!("closed by the hub ({e})")
                }
                Err(e) => format!("the SSH connection broke: {e}"),
            };
            *locked(&shared.exit) = Some(exit);
            shared.done.notify_all();
        })
        .map_err(|e| e.to_string())?;
    Ok(Link {
        reader: Box::new(hub_reader),
        writer: Box::new(hub_writer),
        end: Box::new(end),
    })
}

fn tcp_connect(t: &SshTarget, timeout: Duration) -> Result<TcpStream, String> {
    let at = format!("{}:{}", t.host, t.port);
    let addrs = (t.host.as_str(), t.port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {}: {e}", t.host))?;
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) if e.kind() == io::ErrorKind::TimedOut => {
            format!(
                "cannot connect to {at}: no answer within {} s (is the host up?)",
                timeout.as_secs_f64()
            )
        }
        Some(e) => format!("cannot connect to {at}: {e}"),
        None => format!("cannot connect to {at}: the name resolves to no address"),
    })
}

/// Logs in with keys only: every agent identity, then the given or usual key files.
/// Never a password: this runs from a timer.
fn login(sess: &Session, user: &str, at: &str, o: &SshOptions) -> Result<(), String> {
    let methods = sess.auth_methods(user).unwrap_or("").to_string();
    if sess.authenticated() {
        return Ok(());
    }
    let mut tried = Vec::new();
    if std::env::var_os("SSH_AUTH_SOCK").is_some()
        && let Ok(mut agent) = sess.agent()
        && agent.connect().is_ok()
        && agent.list_identities().is_ok()
    {
        let ids = agent.identities().unwrap_or_default();
        for id in &ids {
            if agent.userauth(user, id).is_ok() && sess.authenticated() {
                return Ok(());
            }
        }
        tried.push(format!("ssh-agent ({} keys)", ids.len()));
    }
    let keys: Vec<std::path::PathBuf> = match &o.identity {
        Some(k) => vec![k.clone()],
        None => ["id_ed25519", "id_ecdsa", "id_rsa"]
            .iter()
            .map(|k| home().join(".ssh").join(k))
            .filter(|p| p.exists())
            .collect(),
    };
    for key in &keys {
        match sess.userauth_pubkey_file(user, None, key, None) {
            Ok(()) if sess.authenticated() => return Ok(()),
            Ok(()) => tried.push(format!("{} (not accepted)", key.display())),
            Err(e) => tried.push(format!("{} ({})", key.display(), e.message())),
        }
    }
    if tried.is_empty() {
        tried.push(format!(
            "nothing: no ssh-agent and no key in {}/.ssh",
            home().display()
        ));
    }
    Err(format!(
        "cannot log in to {at} as {user}: tried {}; the server accepts: {}. Put the public key in ~{user}/.ssh/authorized_keys on the peer or pass --identity FILE (hubsync never uses passwords)",
        tried.join(", "),
        if methods.is_empty() {
            "nothing it would say"
        } else {
            &methods
        }
    ))
}

/// Moves bytes between the channel and the engine's socket pair until the remote
/// command ends.
fn pump(
    sess: &Session,
    ch: &mut Channel,
    tcp: &TcpStream,
    mut from_hub: UnixStream,
    mut to_hub: UnixStream,
    shared: &Shared,
) -> io::Result<()> {
    sess.set_blocking(false);
    from_hub.set_nonblocking(true)?;
    to_hub.set_nonblocking(true)?;
    let mut out = Vec::with_capacity(64 << 10); // engine → channel
    let mut out_at = 0;
    let mut inb = Vec::with_capacity(64 << 10); // channel → engine
    let mut in_at = 0;
    let mut buf = vec![0u8; 64 << 10];
    let (mut hub_done, mut eof_sent, mut remote_done) = (false, false, false);
    let would_block = |e: &io::Error| e.kind() == io::ErrorKind::WouldBlock;
    loop {
        if shared.killed.load(Ordering::Relaxed) {
            return Err(io::Error::other("stopped"));
        }
        let mut moved = false;
        // Engine → remote stdin.
        if out_at == out.len() && !hub_done {
            out.clear();
            out_at = 0;
            match from_hub.read(&mut buf) {
                Ok(0) => hub_done = true,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e),
            }
        }
        if out_at < out.len() {
            match ch.write(&out[out_at..]) {
                Ok(n) => {
                    out_at += n;
                    moved |= n > 0;
                }
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e),
            }
        }
        if hub_done && out_at == out.len() && !eof_sent {
            match ch.send_eof().map_err(io::Error::from) {
                Ok(()) => eof_sent = true,
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e),
            }
        }
        // Remote stdout → engine.
        if in_at == inb.len() && !remote_done {
            inb.clear();
            in_at = 0;
            match ch.read(&mut buf) {
                Ok(0) if ch.eof() => {
                    remote_done = true;
                    let _ = to_hub.shutdown(Shutdown::Write);
                }
                Ok(n) => {
                    inb.extend_from_slice(&buf[..n]);
                    moved |= n > 0;
                }
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e),
            }
        }
        if in_at < inb.len() {
            match to_hub.write(&inb[in_at..]) {
                Ok(n) => {
                    in_at += n;
                    moved |= n > 0;
                    if in_at == inb.len() && remote_done {
                        let _ = to_hub.shutdown(Shutdown::Write);
                    }
                }
                Err(e) if would_block(&e) => {}
                // The engine stopped listening: end the session.
                Err(e) => return Err(e),
            }
        }
        // Remote stderr, which shares the window: always drain it.
        match ch.stderr().read(&mut buf) {
            Ok(n) if n > 0 => {
                let mut s = locked(&shared.stderr);
                s.extend_from_slice(&buf[..n]);
                if s.len() > STDERR_KEEP {
                    let cut = s.len() - STDERR_KEEP;
                    s.drain(..cut);
                }
                moved = true;
            }
            _ => {}
        }
        if remote_done && in_at == inb.len() {
            return Ok(());
        }
        if !moved {
            let net = match sess.block_directions() {
                BlockDirections::Outbound => PollFlags::OUT,
                BlockDirections::Both => PollFlags::IN | PollFlags::OUT,
                _ => PollFlags::IN,
            };
            let hub_in = if out_at == out.len() && !hub_done {
                PollFlags::IN
            } else {
                PollFlags::empty()
            };
            let hub_out = if in_at < inb.len() {
                PollFlags::OUT
            } else {
                PollFlags::empty()
            };
            let mut fds = [
                PollFd::new(tcp, net),
                PollFd::new(&from_hub, hub_in),
                PollFd::new(&to_hub, hub_out),
            ];
            let timeout = rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: 100_000_000,
            };
            match rustix::event::poll(&mut fds, Some(&timeout)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Collects how the remote command ended.
fn finish(sess: &Session, ch: &mut Channel) -> String {
    sess.set_blocking(true);
    sess.set_timeout(2000);
    let _ = ch.wait_eof();
    let _ = ch.close();
    let _ = ch.wait_close();
    if let Ok(sig) = ch.exit_signal()
        && let Some(s) = sig.exit_signal
    {
        return format!("the remote command was killed by signal {s}");
    }
    match ch.exit_status() {
        Ok(0) => String::new(),
        Ok(127) => "the remote command was not found (exit status 127); install hubsync on the peer or point --remote-command at it".into(),
        Ok(c) => format!("the remote command exited with status {c}"),
        Err(e) => format!("cannot read the remote exit status: {e}"),
    }
}
