//! Byte streams to a `serve`: everything above this module sees a reader, a writer
//! and a handle to end the other side, whatever carries the bytes.
//!
//! - a local peer is our own executable run as `hubsync serve PATH` on pipes;
//! - an SSH peer is a libssh2 channel (`libssh2.rs`), or with `--ssh-command` the
//!   system `ssh` on pipes, exactly like a local peer (`ssh.rs`).

pub mod known_hosts;
pub mod libssh2;
pub mod ssh;

use std::io::{self, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How much of a peer's stderr we keep to show when it fails.
const STDERR_KEEP: usize = 16 << 10;

/// A connection to a `serve`, split so that one thread can read while another writes.
pub struct Link {
    pub reader: Box<dyn Read + Send>,
    pub writer: Box<dyn Write + Send>,
    pub end: Box<dyn End>,
}

/// The far end's lifetime.
pub trait End: Send {
    /// Stops it now (a peer we gave up on).
    fn kill(&mut self);
    /// Waits up to `timeout` for it to exit; says how it ended if it did not end
    /// cleanly.
    fn wait(&mut self, timeout: Duration) -> Option<String>;
    /// What it printed on stderr, trimmed.
    fn stderr(&self) -> String;
}

/// A child process speaking the protocol on its stdin/stdout.
pub struct ChildEnd {
    child: Child,
    stderr: Arc<Mutex<Vec<u8>>>,
    /// The thread collecting stderr; joined once the child has exited, so that what
    /// it said last is not lost to a race.
    stderr_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    exited: Option<String>,
}

/// Starts `argv` with piped stdio.
pub fn spawn(argv: &[String]) -> io::Result<Link> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| io::Error::other("empty command"))?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run {program}: {e}")))?;
    let stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let sink = stderr.clone();
    let stderr_thread = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
            s.extend_from_slice(&buf[..n]);
            if s.len() > STDERR_KEEP {
                let cut = s.len() - STDERR_KEEP;
                s.drain(..cut);
            }
        }
    });
    Ok(Link {
        reader: Box::new(stdout),
        writer: Box::new(stdin),
        end: Box::new(ChildEnd {
            child,
            stderr,
            stderr_thread: Mutex::new(Some(stderr_thread)),
            exited: None,
        }),
    })
}

/// A local peer: this executable as `serve ROOT`, or `COMMAND serve ROOT` through
/// the shell when a command is given.
pub fn spawn_local(exe: &Path, command: Option<&str>, root: &Path) -> io::Result<Link> {
    match command {
        None => spawn(&[
            exe.display().to_string(),
            "serve".into(),
            root.display().to_string(),
        ]),
        Some(cmd) => spawn(&[
            "sh".into(),
            "-c".into(),
            format!(
                "{cmd} serve {}",
                crate::util::shell_quote(&root.display().to_string())
            ),
        ]),
    }
}

impl End for ChildEnd {
    fn kill(&mut self) {
        let _ = self.child.kill();
    }

    fn wait(&mut self, timeout: Duration) -> Option<String> {
        if let Some(e) = &self.exited {
            return Some(e.clone()).filter(|s| !s.is_empty());
        }
        let deadline = Instant::now() + timeout;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => {
                    self.kill();
                    let _ = self.child.wait();
                    self.exited = Some("did not exit; killed".into());
                    return self.exited.clone();
                }
                Err(e) => return Some(e.to_string()),
            }
        };
        let desc = if status.success() {
            String::new()
        } else {
            use std::os::unix::process::ExitStatusExt;
            match (status.code(), status.signal()) {
                (Some(c), _) => format!("exited with status {c}"),
                (_, Some(s)) => format!("killed by signal {s}"),
                _ => status.to_string(),
            }
        };
        self.exited = Some(desc.clone());
        Some(desc).filter(|s| !s.is_empty())
    }

    fn stderr(&self) -> String {
        // Once the child has exited, give the collector a moment to read the rest
        // (bounded: a grandchild may still hold the pipe open).
        if self.exited.is_some()
            && let Some(t) = self
                .stderr_thread
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
        {
            let deadline = Instant::now() + Duration::from_millis(500);
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let s = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&s).trim().to_string()
    }
}

impl Drop for ChildEnd {
    fn drop(&mut self) {
        if self.exited.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
