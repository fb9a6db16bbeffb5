//! The hub's connections to its replicas, all speaking the same protocol: the hub's
//! own root through a `Server` on a thread, peers through a transport [`Link`].
//!
//! Each connection has a writer (a channel drained by a thread) and a reader thread;
//! every response lands in one channel of [`Incoming`] events, so the engine is a
//! single loop that never blocks on one peer. A stalled peer stalls only its own
//! threads, and the engine abandons it when it has been silent for too long.

use std::io::{BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::proto::{self, ProtoError, Request, Response};
use crate::server::{Flow, Server};
use crate::transport::{End, Link};

pub enum Event {
    Response(Response),
    /// The connection ended; `Some` says what went wrong.
    Closed(Option<String>),
    /// This many bytes of file data left the hub's memory for this replica.
    Drained(u64),
}

pub struct Incoming {
    pub replica: usize,
    pub event: Event,
}

pub struct Conn {
    pub label: String,
    tx: Option<Sender<Request>>,
    /// Filled once connected.
    end: Arc<Mutex<Option<Box<dyn End>>>>,
    /// Set when we give up, so a connection that completes later is closed at once.
    killed: Arc<AtomicBool>,
    pub alive: bool,
    pub failure: Option<String>,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    pub last_heard: Instant,
    next_id: u32,
}

/// What a request counts for in a peer's `queued` bytes until it is handed over:
/// file data, and commit frames (about their encoded size); `Drained` reports it.
pub fn queued_cost(r: &Request) -> u64 {
    match r {
        Request::Data { bytes, .. } => bytes.len() as u64,
        Request::Commit { changes, .. } => 128 * changes.len() as u64,
        _ => 0,
    }
}

impl Conn {
    /// The hub's own root, served on a thread of this process.
    pub fn in_process(
        replica: usize,
        label: String,
        root: PathBuf,
        state_dir: PathBuf,
        slot: crate::server::SnapshotSlot,
        events: SyncSender<Incoming>,
    ) -> Conn {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("hub-replica".into())
            .spawn(move || {
                let mut server = Server::new(root, Some(state_dir), true);
                server.share_scans(slot);
                let ev = events.clone();
                let mut out = |r: Response| {
                    let _ = ev.send(Incoming {
                        replica,
                        event: Event::Response(r),
                    });
                };
                'serve: loop {
                    let req = match rx.try_recv() {
                        Ok(r) => r,
                        Err(TryRecvError::Empty) => loop {
                            let installing = server.idle(&mut out);
                            let next = if installing {
                                rx.recv_timeout(crate::server::POLL_INSTALL)
                            } else {
                                rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
                            };
                            match next {
                                Ok(r) => break r,
                                Err(RecvTimeoutError::Timeout) => continue,
                                Err(RecvTimeoutError::Disconnected) => break 'serve,
                            }
                        },
                        Err(TryRecvError::Disconnected) => break,
                    };
                    let drained = queued_cost(&req);
                    let flow = server.handle(req, &mut out);
                    if drained > 0 {
                        let _ = events.send(Incoming {
                            replica,
                            event: Event::Drained(drained),
                        });
                    }
                    if flow == Flow::Close {
                        break;
                    }
                }
                server.finish(&mut out);
                let _ = events.send(Incoming {
                    replica,
                    event: Event::Closed(None),
                });
            })
            .expect("spawning a thread");
        Conn::new(label, tx)
    }

    /// A peer reached by `connect` (run on a thread of its own, so that every peer
    /// connects at the same time); requests queue until it is connected.
    pub fn connect(
        replica: usize,
        label: String,
        events: SyncSender<Incoming>,
        connect: Box<dyn FnOnce() -> Result<Link, String> + Send>,
    ) -> Conn {
        let (tx, rx) = mpsc::channel::<Request>();
        let conn = Conn::new(label.clone(), tx);
        let (sent, received, end, killed) = (
            conn.sent.clone(),
            conn.received.clone(),
            conn.end.clone(),
            conn.killed.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name(format!("peer {label}"))
            .spawn(move || {
                let link = match connect() {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = events.send(Incoming {
                            replica,
                            event: Event::Closed(Some(e)),
                        });
                        return;
                    }
                };
                {
                    let mut slot = end.lock().unwrap_or_else(|p| p.into_inner());
                    let mut e = link.end;
                    if killed.load(Ordering::Relaxed) {
                        e.kill();
                    }
                    *slot = Some(e);
                }
                let ev = events.clone();
                let writer = link.writer;
                std::thread::spawn(move || write_loop(writer, rx, replica, sent, ev));
                read_loop(link.reader, replica, received, events);
            });
        let mut conn = conn;
        if let Err(e) = spawned {
            conn.fail(format!("cannot start a thread: {e}"));
        }
        conn
    }

    fn new(label: String, tx: Sender<Request>) -> Conn {
        Conn {
            label,
            tx: Some(tx),
            end: Arc::new(Mutex::new(None)),
            killed: Arc::new(AtomicBool::new(false)),
            alive: true,
            failure: None,
            sent: Arc::new(AtomicU64::new(0)),
            received: Arc::new(AtomicU64::new(0)),
            last_heard: Instant::now(),
            next_id: 0,
        }
    }

    pub fn send(&mut self, req: Request) {
        if !self.alive {
            return;
        }
        // If the connection is gone its reader reports why (a Closed event); a
        // failed send here says nothing more.
        if let Some(tx) = &self.tx {
            let _ = tx.send(req);
        }
    }

    pub fn next_id(&mut self) -> u32 {
        self.next_id += 1;
        self.next_id
    }

    /// Gives up on this replica: stops the other end now.
    pub fn fail(&mut self, why: String) {
        if self.failure.is_none() {
            self.failure = Some(why);
        }
        self.alive = false;
        self.tx = None;
        self.killed.store(true, Ordering::Relaxed);
        if let Some(end) = self.end().as_mut() {
            end.kill();
        }
    }

    fn end(&self) -> std::sync::MutexGuard<'_, Option<Box<dyn End>>> {
        self.end.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the other end to finish the session (see [`Conn::wait`]).
    pub fn close(&mut self) {
        if self.alive {
            self.send(Request::Close);
        }
        self.tx = None;
    }

    /// Waits for the other end to exit; says how it exited, if badly.
    pub fn wait(&mut self, timeout: Duration) -> Option<String> {
        self.end().as_mut().and_then(|e| e.wait(timeout))
    }

    /// The other end's stderr (for error messages).
    pub fn stderr(&self) -> String {
        self.end().as_ref().map(|e| e.stderr()).unwrap_or_default()
    }

    pub fn wire(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }
}

fn read_loop(
    reader: Box<dyn std::io::Read + Send>,
    replica: usize,
    received: Arc<AtomicU64>,
    events: SyncSender<Incoming>,
) {
    let mut r = BufReader::with_capacity(1 << 20, reader);
    let event = match proto::read_greeting(&mut r) {
        Err(e) => Event::Closed(Some(greeting_error(e))),
        Ok(_) => loop {
            match proto::read_frame::<Response>(&mut r) {
                Ok((resp, n)) => {
                    received.fetch_add(n as u64, Ordering::Relaxed);
                    let event = Event::Response(resp);
                    if events.send(Incoming { replica, event }).is_err() {
                        return;
                    }
                }
                Err(ProtoError::Disconnected) => break Event::Closed(None),
                Err(e) => break Event::Closed(Some(format!("it {e}"))),
            }
        },
    };
    let _ = events.send(Incoming { replica, event });
}

fn write_loop(
    writer: Box<dyn Write + Send>,
    rx: Receiver<Request>,
    replica: usize,
    sent: Arc<AtomicU64>,
    events: SyncSender<Incoming>,
) {
    let mut w = BufWriter::with_capacity(256 << 10, writer);
    let fail = |e: String| {
        let _ = events.send(Incoming {
            replica,
            event: Event::Closed(Some(e)),
        });
    };
    if let Err(e) = w.write_all(proto::greeting().as_bytes()) {
        return fail(format!("cannot send to it: {e}"));
    }
    loop {
        let req = match rx.try_recv() {
            Ok(r) => r,
            Err(TryRecvError::Empty) => {
                if let Err(e) = w.flush() {
                    return fail(format!("cannot send to it: {e}"));
                }
                match rx.recv() {
                    Ok(r) => r,
                    Err(_) => break,
                }
            }
            Err(TryRecvError::Disconnected) => break,
        };
        let drained = queued_cost(&req);
        match proto::write_frame(&mut w, &req) {
            Ok(n) => {
                sent.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => return fail(format!("cannot send to it: {e}")),
        }
        if drained > 0 {
            let _ = events.send(Incoming {
                replica,
                event: Event::Drained(drained),
            });
        }
    }
    // Dropping the writer closes the stream: the other end sees the session end.
    let _ = w.flush();
}

/// Words for a failed greeting, with what to do about it.
fn greeting_error(e: ProtoError) -> String {
    match e {
        ProtoError::Version { .. } => {
            format!("{e}; install the same hubsync version on the hub and on this peer")
        }
        ProtoError::Junk { .. } => format!(
            "{e}; if a shell startup file (like ~/.bashrc) prints this, make it quiet for non-interactive sessions; if it says the command is missing, install hubsync there or point --remote-command at it"
        ),
        ProtoError::Disconnected => {
            "it closed the connection before the hubsync greeting".to_string()
        }
        e => format!("{e}"),
    }
}
