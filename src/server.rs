//! The replica side of a session: what `hubsync serve ROOT` runs, and what the hub
//! runs in-process for its own root.
//!
//! A [`Server`] owns one root for one session. It answers requests in order, except
//! that received files are installed in batches: many small files are written to
//! temp files, made durable with one `syncfs`, and renamed into place together, when
//! the batch is full, when the hub goes quiet, or before any other operation (so the
//! hub's ordering of operations is kept).
//!
//! `serve` writes only protocol frames to stdout; anything for people goes to stderr.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::apply::{Incoming, Ready, Root, conflict_time};
use crate::archive::{self, Agreed, CacheEntry, ReplicaId, StateError};
use crate::exclude::Excludes;
use crate::lock::{Lock, LockError};
use crate::proto::{
    self, Expect, Op, OpError, Open, Opened, PairStatus, ProtoError, Request, Response, ScanSummary,
};
use crate::relpath::RelPath;
use crate::scan::{self, Snapshot};
use crate::version::{Entry, Mtime, State, Version};

/// A batch of received files is installed once it holds this many files or bytes.
const BATCH_FILES: usize = 512;
const BATCH_BYTES: u64 = 64 << 20;
/// Entries are sent in frames of about this size.
const ENTRIES_FRAME: usize = 1 << 20;

/// Where a replica keeps its state, given its root.
pub fn state_dir(root: &Path) -> PathBuf {
    root.join(crate::exclude::STATE_DIR)
}

/// Continue or end the session.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Close,
}

struct Session {
    root: Root,
    excludes: Excludes,
    dry_run: bool,
    hub: ReplicaId,
    pair: Option<Agreed>,
    /// Our pair state could be used as the base of a delta this session.
    pair_shared: bool,
    snapshot: Option<Arc<Snapshot>>,
    /// The hub's own replica hands its scan to the hub through this slot instead of
    /// sending (copying) every entry.
    share: Option<SnapshotSlot>,
    /// What we changed this session, for the scan cache (`None`: removed).
    applied: BTreeMap<RelPath, Option<CacheEntry>>,
    incoming: HashMap<u32, (Incoming, Expect, Option<String>)>,
    ready: Vec<(u32, Ready, Expect, Option<String>)>,
    ready_bytes: u64,
    reading: Option<(RelPath, File)>,
    commit: Vec<(RelPath, Option<Version>)>,
    commit_reset: bool,
    progress: Arc<scan::Progress>,
    /// Conflict copies older than this go when the session ends.
    retention: Option<std::time::Duration>,
}

/// One replica root, serving one session.
pub struct Server {
    root: PathBuf,
    state_dir: PathBuf,
    /// The hub's own root: the hub holds the lock and the pair states itself.
    in_hub: bool,
    _lock: Option<Lock>,
    session: Option<Session>,
    /// Advanced by scans; read by the keep-alive thread of `serve`.
    pub progress: Arc<scan::Progress>,
    share: Option<SnapshotSlot>,
}

/// Where an in-process replica leaves its scan for the hub.
pub type SnapshotSlot = Arc<Mutex<Option<Arc<Snapshot>>>>;

impl Server {
    /// `state_dir`: where this replica's lock, id, scan cache and pair states live
    /// (`None`: `ROOT/.hubsync`). Conflict copies always stay inside the root.
    pub fn new(root: PathBuf, state: Option<PathBuf>, in_hub: bool) -> Server {
        let state_dir = state.unwrap_or_else(|| state_dir(&root));
        Server {
            root,
            state_dir,
            in_hub,
            _lock: None,
            session: None,
            progress: Arc::new(scan::Progress::default()),
            share: None,
        }
    }

    /// Makes scans land in `slot` rather than on the wire (the hub's own replica).
    pub fn share_scans(&mut self, slot: SnapshotSlot) {
        self.share = Some(slot);
    }

    /// Handles one request, sending responses through `out`.
    pub fn handle(&mut self, req: Request, out: &mut dyn FnMut(Response)) -> Flow {
        match req {
            Request::Open(open) => match self.open(open) {
                Ok(opened) => out(Response::Opened(opened)),
                Err(e) => {
                    out(Response::Fatal(format!("{e:#}")));
                    return Flow::Close;
                }
            },
            Request::Close => {
                self.finish(out);
                return Flow::Close;
            }
            req => {
                let Some(s) = self.session.as_mut() else {
                    out(Response::Fatal("the session was not opened".into()));
                    return Flow::Close;
                };
                s.handle(req, &self.state_dir, out);
            }
        }
        Flow::Continue
    }

    /// Called when no request is waiting: installs what has been received.
    pub fn idle(&mut self, out: &mut dyn FnMut(Response)) {
        if let Some(s) = self.session.as_mut() {
            s.flush_ready(out);
        }
    }

    fn open(&mut self, o: Open) -> Result<Opened> {
        crate::trace!("serve {}: open", self.root.display());
        anyhow::ensure!(self.session.is_none(), "the session is already open");
        scan::check_root(&self.root)?;
        let root_was_empty = std::fs::read_dir(&self.root)?.next().is_none();
        if !self.in_hub {
            self._lock = Some(
                Lock::acquire(&self.root, &self.state_dir).map_err(|e| match e {
                    LockError::Held { .. } => {
                        anyhow::anyhow!("{e}; it is being synced by another hub right now")
                    }
                    e => e.into(),
                })?,
            );
        }
        let (id, warning) = ReplicaId::load(&self.state_dir, !o.dry_run)?;
        let replica = id.unwrap_or_else(ReplicaId::random);
        let excludes = Excludes::new(&o.excludes)?;
        let mut root = Root::open(&self.root, state_dir(&self.root))?;
        root.fallback_suffix = format!(
            "{}-{}-changed-during-sync",
            conflict_time(Mtime::now()),
            o.label
        );
        let (pair, status) = if self.in_hub {
            (None, PairStatus::None)
        } else {
            match Agreed::load(&self.pair_path(&o.hub)) {
                Ok(mut a) => {
                    // Paths excluded since are no longer part of the agreement.
                    a.retain(|p| !excludes.excludes(p));
                    let token = a.token;
                    (Some(a), PairStatus::Present(token))
                }
                Err(StateError::Missing { .. }) => (None, PairStatus::None),
                Err(e) => (None, PairStatus::Unreadable(e.to_string())),
            }
        };
        crate::trace!("serve: pair state loaded");
        let pair_shared = o.pair_replica == Some(replica)
            && matches!((&status, o.pair), (PairStatus::Present(t), Some(h)) if *t == h);
        self.session = Some(Session {
            root,
            excludes,
            dry_run: o.dry_run,
            hub: o.hub,
            pair,
            pair_shared,
            snapshot: None,
            share: self.share.clone(),
            applied: BTreeMap::new(),
            incoming: HashMap::new(),
            ready: Vec::new(),
            ready_bytes: 0,
            reading: None,
            commit: Vec::new(),
            commit_reset: false,
            progress: self.progress.clone(),
            retention: None,
        });
        let _ = warning; // reported through the replica id change itself
        // Test hook: pretend this replica's clock is off by this many seconds.
        let skew: i64 = std::env::var("HUBSYNC_TEST_CLOCK_OFFSET")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let writable = o.check.then(|| {
            let probe = self.root.join(crate::exclude::temp_name());
            let ok = std::fs::File::create_new(&probe).is_ok();
            let _ = std::fs::remove_file(&probe);
            ok
        });
        if let Some(s) = self.session.as_mut() {
            s.retention = o.conflict_retention.map(std::time::Duration::from_secs);
        }
        let now = Mtime::now();
        Ok(Opened {
            replica,
            hostname: hostname(),
            time: Mtime::new(now.secs + skew, now.nanos),
            pair: status,
            root_was_empty,
            writable,
        })
    }

    fn pair_path(&self, hub: &ReplicaId) -> PathBuf {
        self.state_dir
            .join("pairs")
            .join(format!("hub-{}.state", hub.hex()))
    }

    /// Ends the session: drops unfinished files, saves the scan cache.
    pub fn finish(&mut self, out: &mut dyn FnMut(Response)) {
        let Some(mut s) = self.session.take() else {
            return;
        };
        s.flush_ready(out);
        if let Some(r) = s.retention.filter(|_| !s.dry_run) {
            crate::conflicts::prune(&self.root, r);
        }
        for (_, (inc, _, _)) in s.incoming.drain() {
            s.root.abort_put(inc);
        }
        if let Some(snap) = s.snapshot.take()
            && (snap.cache_changed || !s.applied.is_empty())
        {
            if let Some(slot) = &s.share {
                // The hub is done with it by now; take it back without a copy.
                slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            }
            let snap = Arc::try_unwrap(snap).unwrap_or_else(|shared| (*shared).clone());
            let entries = merge_applied(snap.entries, std::mem::take(&mut s.applied));
            if let Err(e) =
                archive::save_scan_cache(&self.state_dir.join("scan-cache"), &self.root, &entries)
            {
                out(Response::Warning(format!(
                    "cannot save the scan cache: {e}"
                )));
            }
        }
    }
}

impl Session {
    fn handle(&mut self, req: Request, state_dir: &Path, out: &mut dyn FnMut(Response)) {
        match req {
            Request::Open(_) | Request::Close => unreachable!("handled by Server"),
            Request::Scan => self.scan(&state_dir.join("scan-cache"), out),
            Request::Read {
                id,
                path,
                offset,
                len,
            } => match self.read(&path, offset, len) {
                Ok(bytes) => out(Response::Data { id, bytes }),
                Err(e) => out(Response::Done { id, result: Err(e) }),
            },
            Request::Op { id, op } => {
                if let Err(e) = self.check_path(op.path()) {
                    return out(Response::Done { id, result: Err(e) });
                }
                match op {
                    Op::PutFile {
                        path,
                        version,
                        expect,
                        keep,
                    } => {
                        if !version.is_file() || self.dry_run {
                            return out(Response::Done {
                                id,
                                result: Err(OpError::Refused("not a file, or a dry run".into())),
                            });
                        }
                        match self.root.begin_put(&path, version) {
                            Ok(inc) => {
                                self.incoming.insert(id, (inc, expect, keep));
                            }
                            Err(e) => out(Response::Done { id, result: Err(e) }),
                        }
                    }
                    op => {
                        self.flush_ready(out);
                        let result = self.apply(op);
                        out(Response::Done { id, result });
                    }
                }
            }
            Request::Data { id, bytes } => {
                if let Some((inc, _, _)) = self.incoming.get_mut(&id) {
                    inc.write(&bytes);
                }
            }
            Request::End { id } => {
                let Some((inc, expect, keep)) = self.incoming.remove(&id) else {
                    return; // its Begin already failed and was answered
                };
                match self.root.finish_put(inc) {
                    Ok(ready) => {
                        self.ready_bytes += ready.version.size();
                        self.ready.push((id, ready, expect, keep));
                        if self.ready.len() >= BATCH_FILES || self.ready_bytes >= BATCH_BYTES {
                            self.flush_ready(out);
                        }
                    }
                    Err(e) => out(Response::Done { id, result: Err(e) }),
                }
            }
            Request::Abort { id } => {
                if let Some((inc, _, _)) = self.incoming.remove(&id) {
                    self.root.abort_put(inc);
                    out(Response::Done {
                        id,
                        result: Err(OpError::SourceChanged),
                    });
                }
            }
            Request::Commit {
                changes,
                token,
                reset,
            } => {
                self.flush_ready(out);
                if reset {
                    self.commit.clear();
                    self.commit_reset = true;
                }
                self.commit.extend(changes);
                if let Some(token) = token {
                    let warning = self.commit(state_dir, token);
                    if let Some(w) = warning {
                        out(Response::Warning(w));
                    }
                    out(Response::Committed);
                }
            }
        }
    }

    /// Refuses paths outside what is synced: our own state, temp names, excludes.
    fn check_path(&self, path: &RelPath) -> Result<(), OpError> {
        if self.excludes.excludes(path) {
            return Err(OpError::Refused(format!("{path} is excluded or internal")));
        }
        Ok(())
    }

    fn scan(&mut self, cache_path: &Path, out: &mut dyn FnMut(Response)) {
        crate::trace!(
            "serve {}: loading the scan cache",
            self.root.path().display()
        );
        let cache = match archive::load_scan_cache(cache_path) {
            Ok(c) => c,
            Err(StateError::Missing { .. }) => Vec::new(),
            Err(e) => {
                out(Response::Warning(format!("{e}; hashing every file again")));
                Vec::new()
            }
        };
        crate::trace!("serve: cache loaded ({} entries)", cache.len());
        let snap = match scan::scan(
            self.root.path(),
            &self.excludes,
            cache,
            Mtime::now(),
            !self.dry_run,
            Some(&self.progress),
        ) {
            Ok(s) => s,
            Err(e) => return out(Response::Fatal(format!("{e:#}"))),
        };
        crate::trace!(
            "serve: scanned ({} entries, {} hashed)",
            snap.entries.len(),
            snap.stats.hashed_files
        );
        if let Some(slot) = &self.share {
            let st = snap.stats;
            let snap = Arc::new(snap);
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(snap.clone());
            self.snapshot = Some(snap);
            out(Response::ScanDone(ScanSummary {
                delta: false,
                files: st.files,
                dirs: st.dirs,
                bytes: st.bytes,
                hashed_files: st.hashed_files,
                hashed_bytes: st.hashed_bytes,
                temps_removed: st.temps_removed,
                millis: st.took.as_millis() as u64,
            }));
            return;
        }
        let delta = self.pair_shared && self.pair.is_some();
        let mut batch = Vec::new();
        let mut size = 0usize;
        let mut emit = |e: Entry, out: &mut dyn FnMut(Response)| {
            size += e.path.as_bytes().len() + 64;
            batch.push(e);
            if size >= ENTRIES_FRAME {
                out(Response::Entries(std::mem::take(&mut batch)));
                size = 0;
            }
        };
        let mut skipped = snap.skipped.iter().peekable();
        let agreed: &[(RelPath, Version)] = match (&self.pair, delta) {
            (Some(p), true) => p.entries(),
            _ => &[],
        };
        let mut agreed = agreed.iter().peekable();
        for e in &snap.entries {
            while let Some((p, why)) = skipped.next_if(|(p, _)| *p < e.path) {
                emit(
                    Entry {
                        path: p.clone(),
                        state: State::Skip(why.clone()),
                    },
                    out,
                );
            }
            while let Some((p, _)) = agreed.next_if(|(p, _)| *p < e.path) {
                if !snap.is_skipped(p) {
                    emit(
                        Entry {
                            path: p.clone(),
                            state: State::Absent,
                        },
                        out,
                    );
                }
            }
            let base = agreed.next_if(|(p, _)| *p == e.path).map(|(_, v)| v);
            if !delta || !base.is_some_and(|b| b.same(&e.version)) {
                emit(
                    Entry {
                        path: e.path.clone(),
                        state: State::Present(e.version.clone()),
                    },
                    out,
                );
            }
        }
        for (p, why) in skipped {
            emit(
                Entry {
                    path: p.clone(),
                    state: State::Skip(why.clone()),
                },
                out,
            );
        }
        for (p, _) in agreed {
            if !snap.is_skipped(p) {
                emit(
                    Entry {
                        path: p.clone(),
                        state: State::Absent,
                    },
                    out,
                );
            }
        }
        if !batch.is_empty() {
            out(Response::Entries(batch));
        }
        crate::trace!("serve: entries sent");
        let st = snap.stats;
        out(Response::ScanDone(ScanSummary {
            delta,
            files: st.files,
            dirs: st.dirs,
            bytes: st.bytes,
            hashed_files: st.hashed_files,
            hashed_bytes: st.hashed_bytes,
            temps_removed: st.temps_removed,
            millis: st.took.as_millis() as u64,
        }));
        self.snapshot = Some(Arc::new(snap));
    }

    fn read(&mut self, path: &RelPath, offset: u64, len: u32) -> Result<Vec<u8>, OpError> {
        self.check_path(path)?;
        if self.reading.as_ref().is_none_or(|(p, _)| p != path) {
            self.reading = Some((path.clone(), self.root.open_read(path)?));
        }
        let file = &self.reading.as_ref().expect("just opened").1;
        let mut buf = vec![0u8; len.min(proto::CHUNK as u32) as usize];
        let mut filled = 0;
        while filled < buf.len() {
            match file.read_at(&mut buf[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(OpError::Io(format!("cannot read {path}: {e}"))),
            }
        }
        buf.truncate(filled);
        Ok(buf)
    }

    fn scanned(&self, path: &RelPath) -> Option<&CacheEntry> {
        if let Some(a) = self.applied.get(path) {
            return a.as_ref();
        }
        self.snapshot.as_ref().and_then(|s| s.get(path))
    }

    fn expected(&self, path: &RelPath, expect: Expect) -> Result<Option<CacheEntry>, OpError> {
        match expect {
            Expect::Absent => Ok(None),
            Expect::Scanned => self
                .scanned(path)
                .cloned()
                .map(Some)
                .ok_or(OpError::Changed),
        }
    }

    fn apply(&mut self, op: Op) -> Result<(), OpError> {
        if self.dry_run {
            return Err(OpError::Refused("dry run".into()));
        }
        let (path, entry) = match op {
            Op::PutFile { .. } => unreachable!("handled by the caller"),
            Op::Mkdir {
                path,
                version,
                expect,
                keep,
            } => {
                let scanned = self.expected(&path, expect)?;
                let stat = self
                    .root
                    .mkdir(&path, &version, scanned.as_ref(), keep.as_deref())?;
                (
                    path.clone(),
                    Some(CacheEntry {
                        path,
                        version,
                        stat,
                        trusted: true,
                    }),
                )
            }
            Op::PutSymlink {
                path,
                version,
                expect,
                keep,
            } => {
                let scanned = self.expected(&path, expect)?;
                let stat = self
                    .root
                    .symlink(&path, &version, scanned.as_ref(), keep.as_deref())?;
                (
                    path.clone(),
                    Some(CacheEntry {
                        path,
                        version,
                        stat,
                        trusted: true,
                    }),
                )
            }
            Op::Remove { path } => {
                let scanned = self.expected(&path, Expect::Scanned)?;
                self.root.remove(&path, scanned.as_ref())?;
                (path, None)
            }
            Op::SetMeta { path, version } => {
                let scanned = self.expected(&path, Expect::Scanned)?;
                let old = scanned.as_ref().ok_or(OpError::Changed)?;
                if !old.version.same_content(&version) {
                    return Err(OpError::Refused("content differs".into()));
                }
                let stat = self.root.set_meta(&path, &version, Some(old))?;
                let version = Version {
                    kind: old.version.kind.clone(),
                    ..version
                };
                (
                    path.clone(),
                    Some(CacheEntry {
                        path,
                        version,
                        stat,
                        trusted: true,
                    }),
                )
            }
        };
        self.applied.insert(path, entry);
        Ok(())
    }

    /// Installs every received file: one sync for all of them, then the renames.
    fn flush_ready(&mut self, out: &mut dyn FnMut(Response)) {
        if self.ready.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.ready);
        self.ready_bytes = 0;
        if let Err(e) = self.root.sync() {
            for (id, ready, _, _) in batch {
                self.root.discard(ready);
                out(Response::Done {
                    id,
                    result: Err(e.clone()),
                });
            }
            return;
        }
        for (id, ready, expect, keep) in batch {
            let scanned = match self.expected(&ready.path, expect) {
                Ok(s) => s,
                Err(e) => {
                    self.root.discard(ready);
                    out(Response::Done { id, result: Err(e) });
                    continue;
                }
            };
            let path = ready.path.clone();
            let version = ready.version.clone();
            let result = self.root.install(ready, scanned.as_ref(), keep.as_deref());
            let result = result.map(|stat| {
                self.applied.insert(
                    path.clone(),
                    Some(CacheEntry {
                        path,
                        version,
                        stat,
                        trusted: true,
                    }),
                );
            });
            out(Response::Done { id, result });
        }
    }

    /// Applies the hub's changes to our copy of the pair's agreed state and checks
    /// that both copies are now identical.
    fn commit(&mut self, state_dir: &Path, token: archive::Token) -> Option<String> {
        let changes = std::mem::take(&mut self.commit);
        let mut pair = match (self.commit_reset, self.pair.take()) {
            (false, Some(p)) if self.pair_shared => p,
            _ => Agreed::new(self.hub, Vec::new()),
        };
        let path = state_dir
            .join("pairs")
            .join(format!("hub-{}.state", self.hub.hex()));
        pair.apply(&changes);
        if pair.token.digest != token.digest {
            let _ = std::fs::remove_file(&path);
            return Some(
                "the agreed state diverged from the hub's; the next run exchanges full snapshots"
                    .into(),
            );
        }
        pair.token = token;
        let warning = pair
            .save(&path, "hub")
            .err()
            .map(|e| format!("cannot save the agreed state {}: {e}", path.display()));
        self.pair = Some(pair);
        self.pair_shared = true;
        self.commit_reset = false;
        warning
    }
}

/// Merges what this session applied into the scan entries (both sorted).
fn merge_applied(
    entries: Vec<CacheEntry>,
    applied: BTreeMap<RelPath, Option<CacheEntry>>,
) -> Vec<CacheEntry> {
    if applied.is_empty() {
        return entries;
    }
    let mut out = Vec::with_capacity(entries.len() + applied.len());
    let mut changes = applied.into_iter().peekable();
    for e in entries {
        while let Some((_, new)) = changes.next_if(|(p, _)| *p < e.path) {
            out.extend(new);
        }
        match changes.next_if(|(p, _)| *p == e.path) {
            Some((_, new)) => out.extend(new),
            None => out.push(e),
        }
    }
    out.extend(changes.filter_map(|(_, new)| new));
    out
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// How often `serve` tells the hub it is still working on a long request.
const KEEPALIVE: Duration = Duration::from_millis(1000);

/// Frames out, shared by the request loop and the keep-alive thread.
struct Output {
    w: BufWriter<io::Stdout>,
    last: Instant,
    error: Option<io::Error>,
}

impl Output {
    fn send(&mut self, r: &Response) {
        if self.error.is_some() {
            return;
        }
        self.last = Instant::now();
        if let Err(e) = proto::write_frame(&mut self.w, r) {
            self.error = Some(match e {
                ProtoError::Io(e) => e,
                e => io::Error::other(e.to_string()),
            });
        }
    }
    fn flush(&mut self) {
        if self.error.is_none()
            && let Err(e) = self.w.flush()
        {
            self.error = Some(e);
        }
    }
}

fn lock(o: &Mutex<Output>) -> std::sync::MutexGuard<'_, Output> {
    o.lock().unwrap_or_else(|p| p.into_inner())
}

/// `hubsync serve ROOT`: speaks the protocol on stdin/stdout until the hub closes.
pub fn serve(root: &Path) -> Result<()> {
    let mut input = BufReader::with_capacity(1 << 20, io::stdin());
    let output = Arc::new(Mutex::new(Output {
        w: BufWriter::with_capacity(1 << 20, io::stdout()),
        last: Instant::now(),
        error: None,
    }));
    {
        let mut o = lock(&output);
        o.w.write_all(proto::greeting().as_bytes())?;
        o.flush();
    }
    match proto::read_greeting(&mut input) {
        Ok(_) => {}
        Err(ProtoError::Disconnected) => return Ok(()),
        Err(e) => anyhow::bail!("the hub {e}"),
    }
    let mut server = Server::new(root.to_path_buf(), None, false);

    // While a request is being handled, say so about once a second.
    let busy = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let keepalive = {
        let (busy, stop, output, progress) = (
            busy.clone(),
            stop.clone(),
            output.clone(),
            server.progress.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::park_timeout(KEEPALIVE / 4);
                let mut o = lock(&output);
                if busy.load(Ordering::Relaxed) && o.last.elapsed() >= KEEPALIVE {
                    o.send(&Response::Progress {
                        files: progress.files.load(Ordering::Relaxed),
                        bytes: progress.bytes.load(Ordering::Relaxed),
                    });
                    o.flush();
                }
            }
        })
    };

    let result = (|| -> Result<()> {
        loop {
            if input.buffer().is_empty() {
                busy.store(true, Ordering::Relaxed);
                server.idle(&mut |r| lock(&output).send(&r));
                let mut o = lock(&output);
                o.flush();
                busy.store(false, Ordering::Relaxed);
                if let Some(e) = o.error.take() {
                    return Err(e.into());
                }
            }
            let req: Request = match proto::read_frame(&mut input) {
                Ok((r, _)) => r,
                // The hub went away: drop unfinished work (temp files are removed).
                Err(ProtoError::Disconnected) => return Ok(()),
                Err(e) => {
                    lock(&output).send(&Response::Fatal(format!("bad request: {e}")));
                    return Ok(());
                }
            };
            busy.store(true, Ordering::Relaxed);
            let flow = server.handle(req, &mut |r| lock(&output).send(&r));
            if let Some(e) = lock(&output).error.take() {
                return Err(e.into());
            }
            if flow == Flow::Close {
                return Ok(());
            }
        }
    })();
    server.finish(&mut |r| lock(&output).send(&r));
    stop.store(true, Ordering::Relaxed);
    keepalive.thread().unpark();
    let _ = keepalive.join();
    lock(&output).flush();
    result
}
