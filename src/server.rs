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
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::agreed::{self, OldCache, sorted_union};
use crate::apply::{Incoming, Ready, Root, conflict_time};
use crate::archive::{self, CacheEntry, PairRecord, ReplicaId, StateError, Token};
use crate::exclude::Excludes;
use crate::lock::{Lock, LockError};
use crate::proto::{
    self, Expect, GroupTag, IoLock, Op, OpError, Open, Opened, PairStatus, ProtoError, Request,
    Response, ScanSummary,
};
use crate::relpath::RelPath;
use crate::scan::{self, Snapshot};
use crate::version::{Entry, Mtime, State, Version};

/// Received files waiting for a sync are bounded: past this many files or
/// bytes, receiving waits for the sync in progress.
const MAX_READY_FILES: usize = 4096;
const MAX_READY_BYTES: u64 = 256 << 20;
/// A `post_apply` command is stopped after this long.
const POST_APPLY_LIMIT: Duration = Duration::from_secs(120);
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

/// How a file being received is to be installed.
struct Receiving {
    expect: Expect,
    keep: Option<String>,
    group: Option<GroupTag>,
}

/// A received file, with the request id and conditions of its installation.
struct ReadyFile {
    id: u32,
    ready: Ready,
    how: Receiving,
}

/// An install group being gathered: its members are installed together once the
/// hub says it sent them all and every one is here and synced.
#[derive(Default)]
struct Gathering {
    lock: Option<IoLock>,
    parts: Vec<(u32, Part)>,
    /// Members being received or synced.
    pending: u32,
    /// A member failed: the group is dropped.
    broken: bool,
    /// From `GroupEnd`: how many members were sent, and whether that is all.
    end: Option<(u32, bool)>,
}

enum Part {
    File(ReadyFile),
    Remove {
        id: u32,
        path: RelPath,
        keep: Option<String>,
    },
}

/// Received files whose sync is running; they are renamed into place after it.
struct Syncing {
    batch: Vec<ReadyFile>,
    done: mpsc::Receiver<Result<(), OpError>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Install {
    /// Install what is synced, start syncing what is not; never wait unless the
    /// received files reach their bound.
    Poll,
    /// Wait until every received file is installed.
    All,
}

struct Session {
    root: Root,
    excludes: Excludes,
    dry_run: bool,
    hub: ReplicaId,
    /// Our record of what we agreed with this hub (if it is readable and matches
    /// the scan cache it was written against).
    record: Option<PairRecord>,
    /// The hub holds the same agreed state: the scan can be answered with a delta.
    pair_shared: bool,
    /// The generation of the scan cache as loaded (`None`: there was none).
    cache_gen: Option<u64>,
    /// This replica's other pair records (other hubs): rebased when the cache moves.
    others: Vec<(PathBuf, PairRecord)>,
    snapshot: Option<Arc<Snapshot>>,
    /// The hub's own replica hands its scan to the hub through this slot instead of
    /// sending (copying) every entry.
    share: Option<SnapshotSlot>,
    /// What we changed this session, for the scan cache (`None`: removed).
    applied: BTreeMap<RelPath, Option<CacheEntry>>,
    incoming: HashMap<u32, (Incoming, Receiving)>,
    groups: HashMap<u32, Gathering>,
    /// Received files not yet part of a sync.
    ready: Vec<ReadyFile>,
    ready_bytes: u64,
    syncing: Option<Syncing>,
    reading: Option<(RelPath, File)>,
    commit: Vec<(RelPath, Option<Version>)>,
    commit_reset: bool,
    /// Set once the hub's commit is complete: the new agreed state's token.
    committed: Option<Token>,
    progress: Arc<scan::Progress>,
    /// Conflict copies older than this go when the session ends.
    retention: Option<std::time::Duration>,
    /// What to invalidate after installing, and what to run then.
    after_install: Vec<crate::rules::AfterInstall>,
    post_apply: Option<String>,
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
    /// Said to the hub right after `Opened` (an unreadable replica id).
    open_warning: Option<String>,
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
            open_warning: None,
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
                Ok(opened) => {
                    out(Response::Opened(opened));
                    if let Some(w) = self.open_warning.take() {
                        out(Response::Warning(w));
                    }
                }
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

    /// Called when no request is waiting: installs what has been received and
    /// synced. Returns whether received files are still waiting for their sync;
    /// then the caller waits for requests only briefly and calls again.
    pub fn idle(&mut self, out: &mut dyn FnMut(Response)) -> bool {
        match self.session.as_mut() {
            Some(s) => {
                s.install_ready(out, Install::Poll);
                s.installing()
            }
            None => false,
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
        // A record is only usable with the cache it was written against.
        let cache_gen = archive::scan_cache_generation(&self.state_dir.join("scan-cache"));
        let own = self.pair_path(&o.hub);
        let (record, status) = if self.in_hub {
            (None, PairStatus::None)
        } else {
            match PairRecord::load(&own) {
                Ok(r) if Some(r.base) == cache_gen => {
                    let token = r.token;
                    (Some(r), PairStatus::Present(token))
                }
                Ok(_) => (
                    None,
                    PairStatus::Unreadable(format!(
                        "{} does not match this replica's scan cache (a crash between saving them, or a lost cache)",
                        own.display()
                    )),
                ),
                Err(StateError::Missing { .. }) => (None, PairStatus::None),
                Err(e) => (None, PairStatus::Unreadable(e.to_string())),
            }
        };
        let mut others = Vec::new();
        if !self.in_hub
            && let Ok(dir) = std::fs::read_dir(self.state_dir.join("pairs"))
        {
            for e in dir.flatten() {
                let p = e.path();
                if p != own
                    && p.extension().is_some_and(|x| x == "state")
                    && let Ok(r) = PairRecord::load(&p)
                    && Some(r.base) == cache_gen
                {
                    others.push((p, r));
                }
            }
        }
        crate::trace!("serve: pair records loaded");
        let pair_shared = o.pair_replica == Some(replica)
            && matches!((&status, o.pair), (PairStatus::Present(t), Some(h)) if *t == h);
        let after_install = (o.after_install.iter())
            .map(|r| r.compile())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                anyhow::anyhow!("the hub sent an after_install rule that is wrong: {e}")
            })?;
        self.session = Some(Session {
            root,
            excludes,
            dry_run: o.dry_run,
            hub: o.hub,
            record,
            pair_shared,
            cache_gen,
            others,
            snapshot: None,
            share: self.share.clone(),
            applied: BTreeMap::new(),
            incoming: HashMap::new(),
            groups: HashMap::new(),
            ready: Vec::new(),
            ready_bytes: 0,
            syncing: None,
            reading: None,
            commit: Vec::new(),
            commit_reset: false,
            committed: None,
            progress: self.progress.clone(),
            retention: None,
            after_install,
            post_apply: o.post_apply.clone(),
        });
        // The hub sees a new replica id as a new replica; this says why.
        self.open_warning = warning;
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

    /// Ends the session: drops unfinished files, saves the scan cache and the pair
    /// records (rewritten against it, the cache first: a record naming a cache
    /// generation that is not on disk is never read back).
    pub fn finish(&mut self, out: &mut dyn FnMut(Response)) {
        let Some(mut s) = self.session.take() else {
            return;
        };
        s.install_ready(out, Install::All);
        crate::trace!("serve: finishing; {}", crate::util::memory());
        if let Some(r) = s.retention.filter(|_| !s.dry_run) {
            crate::conflicts::prune(&self.root, r);
        }
        for (_, (inc, _)) in s.incoming.drain() {
            s.root.abort_put(inc);
        }
        // Groups the hub never completed: their members wait for the next run.
        for (_, g) in std::mem::take(&mut s.groups) {
            s.drop_group(g, out);
        }
        if !s.dry_run && !s.applied.is_empty() {
            s.invalidate();
            s.losers_into_history(out);
            if let Some(cmd) = s.post_apply.clone()
                && let Err(e) = s.run_post_apply(&cmd, &self.root)
            {
                out(Response::Warning(format!(
                    "post_apply command {cmd:?}: {e}"
                )));
            }
        }
        let Some(snap) = s.snapshot.take() else {
            return;
        };
        if s.dry_run {
            return; // nothing was applied; caches may be refreshed next time
        }
        if let Some(slot) = &s.share {
            // The hub is done with it by now; take it back without a copy.
            slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
        let snap = Arc::try_unwrap(snap).unwrap_or_else(|shared| (*shared).clone());
        let own = self.pair_path(&s.hub);
        let commit = std::mem::take(&mut s.commit);
        let records = {
            let applied = &s.applied;
            let snap = &snap;
            let cache_after = |p: &RelPath| -> Option<&Version> {
                match applied.get(p) {
                    Some(e) => e.as_ref().map(|e| &e.version),
                    None => snap.get(p).map(|e| &e.version),
                }
            };
            s.rebase_records(commit, snap, &cache_after, &own)
        };
        let changed = snap.cache_changed || !s.applied.is_empty() || s.cache_gen.is_none();
        let generation = if changed {
            crate::util::random_u64()
        } else {
            s.cache_gen.unwrap_or(0)
        };
        if changed {
            let entries = merge_applied(snap.entries, std::mem::take(&mut s.applied));
            if let Err(e) = archive::save_scan_cache(
                &self.state_dir.join("scan-cache"),
                &self.root,
                generation,
                &entries,
            ) {
                out(Response::Warning(format!(
                    "cannot save the scan cache: {e}"
                )));
                return;
            }
        }
        out(Response::CacheSaved { generation });
        let loaded: Vec<PairRecord> = s
            .record
            .iter()
            .chain(s.others.iter().map(|o| &o.1))
            .cloned()
            .collect();
        for (path, mut rec) in records {
            rec.base = generation;
            if loaded.contains(&rec) {
                continue; // nothing moved: no need to write it again
            }
            if let Err(e) = rec.save(&path, "hub") {
                out(Response::Warning(format!(
                    "cannot save the agreed state {}: {e}",
                    path.display()
                )));
            }
        }
    }
}

impl Session {
    fn handle(&mut self, req: Request, state_dir: &Path, out: &mut dyn FnMut(Response)) {
        match req {
            Request::Open(_) | Request::Close => unreachable!("handled by Server"),
            Request::Scan { full } => self.scan(&state_dir.join("scan-cache"), full, out),
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
                        group,
                    } => {
                        if !version.is_file() || self.dry_run {
                            return out(Response::Done {
                                id,
                                result: Err(OpError::Refused("not a file, or a dry run".into())),
                            });
                        }
                        match self.root.begin_put(&path, version) {
                            Ok(inc) => {
                                if let Some(tag) = &group {
                                    let g = self.gathering(tag);
                                    g.pending += 1;
                                }
                                let how = Receiving {
                                    expect,
                                    keep,
                                    group,
                                };
                                self.incoming.insert(id, (inc, how));
                            }
                            Err(e) => {
                                if let Some(tag) = &group {
                                    self.gathering(tag).broken = true;
                                }
                                out(Response::Done { id, result: Err(e) })
                            }
                        }
                    }
                    Op::Remove {
                        path,
                        keep,
                        group: Some(tag),
                    } => {
                        let g = self.gathering(&tag);
                        g.parts
                            .push((tag.position, Part::Remove { id, path, keep }));
                        self.try_complete(tag.group, out);
                    }
                    op => {
                        self.install_ready(out, Install::All);
                        let result = self.apply(op);
                        out(Response::Done { id, result });
                    }
                }
            }
            Request::Data { id, bytes } => {
                if let Some((inc, _)) = self.incoming.get_mut(&id) {
                    inc.write(&bytes);
                }
            }
            Request::End { id } => {
                let Some((inc, how)) = self.incoming.remove(&id) else {
                    return; // its Begin already failed and was answered
                };
                match self.root.finish_put(inc) {
                    Ok(ready) => {
                        self.ready_bytes += ready.version.size();
                        self.ready.push(ReadyFile { id, ready, how });
                        self.install_ready(out, Install::Poll);
                    }
                    Err(e) => {
                        out(Response::Done { id, result: Err(e) });
                        self.member_failed(how.group.as_ref(), out);
                    }
                }
            }
            Request::Abort { id } => {
                if let Some((inc, how)) = self.incoming.remove(&id) {
                    self.root.abort_put(inc);
                    out(Response::Done {
                        id,
                        result: Err(OpError::SourceChanged),
                    });
                    self.member_failed(how.group.as_ref(), out);
                }
            }
            Request::GroupEnd {
                group,
                members,
                complete,
            } => {
                self.groups.entry(group).or_default().end = Some((members, complete));
                self.try_complete(group, out);
            }
            Request::Commit {
                changes,
                token,
                reset,
            } => {
                self.install_ready(out, Install::All);
                if reset {
                    self.commit.clear();
                    self.commit_reset = true;
                }
                // Mostly paths this session just wrote: share their names rather
                // than keep a second copy of each (a first sync commits every file).
                let applied = &self.applied;
                self.commit.extend(changes.into_iter().map(|(p, v)| {
                    let p = applied.get_key_value(&p).map_or(p, |(k, _)| k.clone());
                    (p, v)
                }));
                if let Some(token) = token {
                    // Kept in memory and written with the scan cache when the
                    // session ends: the record is relative to the cache saved then.
                    self.committed = Some(token);
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

    fn scan(&mut self, cache_path: &Path, full: bool, out: &mut dyn FnMut(Response)) {
        // Asked again for a full listing: send what was scanned, do not rescan.
        if let Some(snap) = self.snapshot.clone() {
            return self.send_scan(&snap, false, out);
        }
        crate::trace!(
            "serve {}: loading the scan cache",
            self.root.path().display()
        );
        let (generation, cache) = match archive::load_scan_cache(cache_path) {
            Ok((g, c)) => (Some(g), Some(c)),
            Err(StateError::Missing { .. }) => (None, None),
            Err(e) => {
                out(Response::Warning(format!("{e}; hashing every file again")));
                (None, None)
            }
        };
        if generation != self.cache_gen {
            // Not the cache the records were checked against at open (it changed or
            // turned out corrupt): no record of ours can be read back.
            self.record = None;
            self.others.clear();
            self.pair_shared = false;
        }
        self.cache_gen = generation;
        crate::trace!(
            "serve: cache loaded ({} entries)",
            cache.as_ref().map_or(0, Vec::len)
        );
        let mut snap = match scan::scan(
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
        snap.generation = generation;
        crate::trace!(
            "serve: scanned ({} entries, {} hashed, {} changed)",
            snap.entries.len(),
            snap.stats.hashed_files,
            snap.changes.len()
        );
        let snap = Arc::new(snap);
        self.snapshot = Some(snap.clone());
        if let Some(slot) = &self.share {
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(snap.clone());
            return out(Response::ScanDone(summary(&snap, false)));
        }
        let delta = !full && self.pair_shared && self.record.is_some();
        self.send_scan(&snap, delta, out);
    }

    /// Sends a scan: every path, or (`delta`) only where it differs from what we
    /// agreed with the hub. The agreed state differs from the old cache only at the
    /// record's paths, and the tree from the old cache only at the scan's changes,
    /// so those are the only paths to look at.
    fn send_scan(&self, snap: &Snapshot, delta: bool, out: &mut dyn FnMut(Response)) {
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
        match (&self.record, delta) {
            (Some(rec), true) => {
                let old = OldCache {
                    current: &snap.entries,
                    changes: &snap.changes,
                };
                let paths = sorted_union(vec![
                    Box::new(snap.changes.iter().map(|e| &e.0)),
                    Box::new(rec.diff.iter().map(|e| &e.0)),
                    Box::new(snap.skipped.iter().map(|e| &e.0)),
                ]);
                for p in paths {
                    if let Ok(i) = snap.skipped.binary_search_by(|e| e.0.cmp(p)) {
                        emit(
                            Entry {
                                path: p.clone(),
                                state: State::Skip(snap.skipped[i].1.clone()),
                            },
                            out,
                        );
                        continue;
                    }
                    let now = snap.get(p).map(|e| &e.version);
                    let agreed = agreed::lookup(&rec.diff, &old, p);
                    let same = match (now, agreed) {
                        (None, None) => true,
                        (Some(a), Some(b)) => a.same(b),
                        _ => false,
                    };
                    if !same {
                        let state = now.map_or(State::Absent, |v| State::Present(v.clone()));
                        emit(
                            Entry {
                                path: p.clone(),
                                state,
                            },
                            out,
                        );
                    }
                }
            }
            _ => {
                let mut skipped = snap.skipped.iter().peekable();
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
                    emit(
                        Entry {
                            path: e.path.clone(),
                            state: State::Present(e.version.clone()),
                        },
                        out,
                    );
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
            }
        }
        if !batch.is_empty() {
            out(Response::Entries(batch));
        }
        crate::trace!("serve: entries sent");
        out(Response::ScanDone(summary(snap, delta)));
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
            Op::Remove { path, keep, .. } => {
                let scanned = self.expected(&path, Expect::Scanned)?;
                self.root.remove(&path, scanned.as_ref(), keep.as_deref())?;
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

    /// Moves received files towards their real names: a batch whose sync has
    /// finished is renamed into place, and the files received meanwhile start their
    /// own sync, so that syncing overlaps receiving. `Install::All` waits until
    /// every received file is installed.
    fn install_ready(&mut self, out: &mut dyn FnMut(Response), how: Install) {
        loop {
            if let Some(syncing) = &self.syncing {
                let full =
                    self.ready.len() >= MAX_READY_FILES || self.ready_bytes >= MAX_READY_BYTES;
                let result = if how == Install::All || full {
                    syncing.done.recv()
                } else {
                    match syncing.done.try_recv() {
                        Ok(r) => Ok(r),
                        Err(mpsc::TryRecvError::Empty) => return,
                        Err(mpsc::TryRecvError::Disconnected) => Err(mpsc::RecvError),
                    }
                };
                let result =
                    result.unwrap_or_else(|_| Err(OpError::Io("the sync thread died".into())));
                let batch = self.syncing.take().map(|s| s.batch).unwrap_or_default();
                self.install_batch(batch, result, out);
            }
            if self.ready.is_empty() {
                return;
            }
            crate::trace!("syncing {} files", self.ready.len());
            self.syncing = Some(Syncing {
                batch: std::mem::take(&mut self.ready),
                done: self.root.start_sync(),
            });
            self.ready_bytes = 0;
            if how == Install::Poll {
                return;
            }
        }
    }

    /// Renames a synced batch into place (or drops it if the sync failed); members
    /// of install groups go to their group instead.
    fn install_batch(
        &mut self,
        batch: Vec<ReadyFile>,
        synced: Result<(), OpError>,
        out: &mut dyn FnMut(Response),
    ) {
        for file in batch {
            if let Err(e) = &synced {
                self.root.discard(file.ready);
                out(Response::Done {
                    id: file.id,
                    result: Err(e.clone()),
                });
                self.member_failed(file.how.group.as_ref(), out);
                continue;
            }
            match file.how.group.clone() {
                Some(tag) => {
                    let g = self.gathering(&tag);
                    g.pending = g.pending.saturating_sub(1);
                    g.parts.push((tag.position, Part::File(file)));
                    self.try_complete(tag.group, out);
                }
                None => self.install_one(file, out),
            }
        }
    }

    fn install_one(&mut self, file: ReadyFile, out: &mut dyn FnMut(Response)) {
        let ReadyFile { id, ready, how } = file;
        let scanned = match self.expected(&ready.path, how.expect) {
            Ok(s) => s,
            Err(e) => {
                self.root.discard(ready);
                return out(Response::Done { id, result: Err(e) });
            }
        };
        let path = ready.path.clone();
        let version = ready.version.clone();
        let result = self
            .root
            .install(ready, scanned.as_ref(), how.keep.as_deref());
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

    /// The group `tag` belongs to, created on first sight.
    fn gathering(&mut self, tag: &GroupTag) -> &mut Gathering {
        let g = self.groups.entry(tag.group).or_default();
        if g.lock.is_none() {
            g.lock = tag.lock.clone();
        }
        g
    }

    /// A member of `group` failed on its way here: the group will be dropped.
    fn member_failed(&mut self, group: Option<&GroupTag>, out: &mut dyn FnMut(Response)) {
        if let Some(tag) = group {
            let g = self.gathering(tag);
            g.pending = g.pending.saturating_sub(1);
            g.broken = true;
            self.try_complete(tag.group, out);
        }
    }

    /// Installs group `id` if everything for it is here, in its members' order and
    /// holding its lock; drops it if it cannot be complete.
    fn try_complete(&mut self, id: u32, out: &mut dyn FnMut(Response)) {
        let ready = self
            .groups
            .get(&id)
            .is_some_and(|g| g.end.is_some() && g.pending == 0);
        if !ready {
            return;
        }
        let Some(mut g) = self.groups.remove(&id) else {
            return;
        };
        let (members, complete) = g.end.unwrap_or((0, false));
        if !complete || g.broken || g.parts.len() != members as usize {
            return self.drop_group(g, out);
        }
        g.parts.sort_by_key(|p| p.0);
        let _lock = g.lock.as_ref().and_then(|l| self.root.io_lock(l));
        for (_, part) in g.parts {
            match part {
                Part::File(f) => self.install_one(f, out),
                Part::Remove { id, path, keep } => {
                    let result = self.apply(Op::Remove {
                        path,
                        keep,
                        group: None,
                    });
                    out(Response::Done { id, result });
                }
            }
        }
    }

    /// Answers every member of a group that will not be installed this run.
    fn drop_group(&mut self, g: Gathering, out: &mut dyn FnMut(Response)) {
        for (_, part) in g.parts {
            let id = match part {
                Part::File(f) => {
                    self.root.discard(f.ready);
                    f.id
                }
                Part::Remove { id, .. } => id,
            };
            out(Response::Done {
                id,
                result: Err(OpError::SourceChanged),
            });
        }
    }

    /// Removes what `after_install` rules name for the files installed this
    /// session.
    fn invalidate(&mut self) {
        for k in 0..self.after_install.len() {
            let rule = &self.after_install[k];
            let mut since: Option<Mtime> = None;
            let mut stamps = Vec::new();
            for (path, entry) in &self.applied {
                let Some(e) = entry.as_ref().filter(|e| e.version.is_file()) else {
                    continue;
                };
                let Some(id) = rule.when.capture(path) else {
                    continue;
                };
                stamps.extend(rule.remove.iter().filter_map(|p| p.fill(id)));
                since = Some(since.map_or(e.version.mtime, |s| s.min(e.version.mtime)));
            }
            let Some(since) = since else { continue };
            let rule = self.after_install[k].clone();
            for p in stamps {
                self.root.remove_derived(&p);
            }
            // A second's margin: caches are compared by whole seconds.
            let since = Mtime::new(since.secs - 1, since.nanos);
            let mut removed = 0;
            for top in &rule.newer_roots {
                let matches = |p: &RelPath| rule.remove_newer.is_match(p.as_path());
                removed += self.root.remove_newer(top, &matches, since);
            }
            crate::trace!(
                "serve: after_install {}: {removed} cache file(s) removed",
                rule.when.as_str()
            );
        }
    }

    /// Adds the conflict losers that `after_install` rules name to the application's
    /// history (an old revision and its log line), where the application did not
    /// record them itself: a version edited outside it is then not only a copy in
    /// `.hubsync/conflicts/`, which stays in any case.
    fn losers_into_history(&mut self, out: &mut dyn FnMut(Response)) {
        let kept = std::mem::take(&mut self.root.kept);
        for (path, copy) in kept {
            for k in 0..self.after_install.len() {
                let rule = &self.after_install[k];
                let (Some(l), Some(id)) = (rule.loser.clone(), rule.when.capture(&path)) else {
                    continue;
                };
                match self.loser_into_history(&l, id, &copy) {
                    Ok(Some(at)) => crate::trace!("serve: {path}: its loser is now {at}"),
                    Ok(None) => {}
                    Err(e) => out(Response::Warning(format!(
                        "{path}: its losing version is kept at {} but could not be added to the history: {e}",
                        copy.display()
                    ))),
                }
            }
        }
    }

    /// Writes the loser kept at `copy` as `l`'s revision of `id` and inserts its log
    /// line; `None` where there is nothing to do: the revision exists (the
    /// application saved it), there is no log, or the loser is not older than the
    /// log's last entry (which names the current version, and must stay last).
    fn loser_into_history(
        &mut self,
        l: &crate::rules::LoserRevision,
        id: &[u8],
        copy: &Path,
    ) -> Result<Option<RelPath>, OpError> {
        use std::io::Read as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        const MAX: u64 = 64 << 20;
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(copy)
            .map_err(|e| OpError::Io(e.to_string()))?;
        let st = rustix::fs::fstat(&f)?;
        let regular = rustix::fs::FileType::from_raw_mode(st.st_mode).is_file();
        let (Some(at), Some(log_path)) = (l.revision(id, st.st_mtime), l.changelog.fill(id)) else {
            return Ok(None);
        };
        if !regular || st.st_size as u64 > MAX || self.root.lstat(&at)?.is_some() {
            return Ok(None);
        }
        // No lock directory: no application there to take its lock.
        let _lock = match &l.lock_dir {
            Some(dir) if self.root.lstat(dir)?.is_some() => {
                let lock = crate::proto::IoLock {
                    dir: dir.clone(),
                    of: log_path.clone(),
                };
                Some(self.root.io_lock(&lock).ok_or_else(|| {
                    OpError::Io(format!("the application's lock on {log_path} stayed taken"))
                })?)
            }
            _ => None,
        };
        let mut log_file = match self.root.open_read(&log_path) {
            Ok(f) => f,
            Err(OpError::SourceChanged) => return Ok(None),
            Err(e) => return Err(e),
        };
        let was = rustix::fs::fstat(&log_file)?;
        let mut log = Vec::new();
        (&mut log_file)
            .take(MAX)
            .read_to_end(&mut log)
            .map_err(|e| OpError::Io(format!("cannot read {log_path}: {e}")))?;
        let Some(new_log) = crate::rules::insert_by_leading_number(&log, &l.line(id, st.st_mtime))
        else {
            return Ok(None);
        };
        let mut text = Vec::with_capacity(st.st_size as usize);
        f.read_to_end(&mut text)
            .map_err(|e| OpError::Io(format!("cannot read {}: {e}", copy.display())))?;
        if l.compressed() {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            let _ = gz.write_all(&text);
            text = gz.finish().map_err(|e| OpError::Io(e.to_string()))?;
        }
        let mtime = Mtime::new(st.st_mtime, st.st_mtime_nsec as u32);
        // The revision first: a log line must never name a revision that is not there.
        self.root.create_file(&at, &text, &st, mtime)?;
        self.root.rewrite_file(&log_path, &new_log, &was)?;
        Ok(Some(at))
    }

    /// Runs the `post_apply` command in the root with the changed paths on stdin,
    /// for at most two minutes.
    fn run_post_apply(&self, cmd: &str, root: &Path) -> Result<()> {
        use std::io::Write as _;
        use std::process::{Command, Stdio};
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .current_dir(root)
            .env("HUBSYNC_ROOT", root)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start it: {e}"))?;
        // Read its complaints as they come, so that a chatty command cannot block.
        let stderr = child.stderr.take().map(|mut e| {
            std::thread::spawn(move || {
                let mut all = Vec::new();
                let _ = std::io::Read::read_to_end(&mut e, &mut all);
                String::from_utf8_lossy(&all).into_owned()
            })
        });
        if let Some(mut stdin) = child.stdin.take() {
            let mut list = Vec::new();
            for p in self.applied.keys() {
                list.extend_from_slice(p.as_bytes());
                list.push(b'\n');
            }
            // On its own thread: a command that does not read its input must not
            // block us (it gets EPIPE when it exits).
            std::thread::spawn(move || {
                let _ = stdin.write_all(&list);
            });
        }
        let deadline = Instant::now() + POST_APPLY_LIMIT;
        loop {
            if let Some(status) = child.try_wait()? {
                if status.success() {
                    return Ok(());
                }
                let err = stderr.and_then(|t| t.join().ok()).unwrap_or_default();
                let tail: String = err
                    .trim()
                    .lines()
                    .last()
                    .unwrap_or("")
                    .chars()
                    .take(300)
                    .collect();
                anyhow::bail!(
                    "it failed ({status}){}",
                    if tail.is_empty() {
                        String::new()
                    } else {
                        format!(": {tail}")
                    }
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!(
                    "it ran longer than {} s and was stopped",
                    POST_APPLY_LIMIT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether received files are still waiting for a sync to finish.
    fn installing(&self) -> bool {
        self.syncing.is_some() || !self.ready.is_empty()
    }
}

impl Session {
    /// Rewrites this replica's pair records against the cache as it ends this
    /// session (`cache_after`), looking only at the paths the session touched.
    fn rebase_records<'c>(
        &self,
        mut commit: Vec<(RelPath, Option<Version>)>,
        snap: &Snapshot,
        cache_after: &dyn Fn(&RelPath) -> Option<&'c Version>,
        own_path: &Path,
    ) -> Vec<(PathBuf, PairRecord)> {
        let old = OldCache {
            current: &snap.entries,
            changes: &snap.changes,
        };
        let applied: Vec<&RelPath> = self.applied.keys().collect();
        let mut out = Vec::new();
        commit.sort_by(|a, b| a.0.cmp(&b.0));
        commit.dedup_by(|a, b| a.0 == b.0);
        let find_commit = |p: &RelPath| {
            commit
                .binary_search_by(|e| e.0.cmp(p))
                .ok()
                .map(|i| commit[i].1.clone())
        };
        if let Some(token) = self.committed {
            let reset = self.commit_reset || !self.pair_shared || self.record.is_none();
            let base: &[(RelPath, Option<Version>)] = match (&self.record, reset) {
                (Some(r), false) => &r.diff,
                _ => &[],
            };
            let mut lists: Vec<Box<dyn Iterator<Item = &RelPath> + '_>> = vec![
                Box::new(base.iter().map(|e| &e.0)),
                Box::new(snap.changes.iter().map(|e| &e.0)),
                Box::new(applied.iter().copied()),
                Box::new(commit.iter().map(|e| &e.0)),
            ];
            if reset {
                lists.push(Box::new(snap.entries.iter().map(|e| &e.path)));
            }
            let touched = sorted_union(lists);
            let agreed_after = |p: &RelPath| match find_commit(p) {
                Some(v) => v,
                None if reset => None,
                None => agreed::lookup(base, &old, p).cloned(),
            };
            let files = if reset {
                commit
                    .iter()
                    .filter(|e| e.1.as_ref().is_some_and(|v| !v.is_dir()))
                    .count() as u64
            } else {
                let before = self.record.as_ref().map_or(0, |r| r.files);
                agreed::count_files(
                    before,
                    commit
                        .iter()
                        .map(|(p, after)| (agreed::lookup(base, &old, p), after.as_ref())),
                )
            };
            let diff = agreed::rebase(touched, agreed_after, cache_after);
            out.push((
                own_path.to_path_buf(),
                PairRecord {
                    peer_replica: Some(self.hub),
                    token,
                    base: 0,
                    files,
                    diff,
                },
            ));
        } else if let Some(rec) = &self.record {
            out.push((
                own_path.to_path_buf(),
                rebased(rec, &old, snap, &applied, cache_after),
            ));
        }
        for (p, rec) in &self.others {
            out.push((p.clone(), rebased(rec, &old, snap, &applied, cache_after)));
        }
        out
    }
}

/// A record whose agreed state did not change, rewritten against a new cache.
fn rebased<'c>(
    rec: &PairRecord,
    old: &OldCache<'_>,
    snap: &Snapshot,
    applied: &[&RelPath],
    cache_after: &dyn Fn(&RelPath) -> Option<&'c Version>,
) -> PairRecord {
    let touched = sorted_union(vec![
        Box::new(rec.diff.iter().map(|e| &e.0)),
        Box::new(snap.changes.iter().map(|e| &e.0)),
        Box::new(applied.iter().copied()),
    ]);
    PairRecord {
        diff: agreed::rebase(
            touched,
            |p| agreed::lookup(&rec.diff, old, p).cloned(),
            cache_after,
        ),
        ..rec.clone()
    }
}

fn summary(snap: &Snapshot, delta: bool) -> ScanSummary {
    let st = snap.stats;
    ScanSummary {
        delta,
        files: st.files,
        dirs: st.dirs,
        bytes: st.bytes,
        hashed_files: st.hashed_files,
        hashed_bytes: st.hashed_bytes,
        temps_removed: st.temps_removed,
        millis: st.took.as_millis() as u64,
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

/// How long a loop waits for a request before looking again at files being synced.
pub const POLL_INSTALL: Duration = Duration::from_millis(2);

/// Whether standard input has something to read (or is closed) within `wait`.
fn stdin_readable(wait: Duration) -> bool {
    let stdin = io::stdin();
    let mut fds = [rustix::event::PollFd::new(
        &stdin,
        rustix::event::PollFlags::IN,
    )];
    let timeout = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: wait.as_nanos() as _,
    };
    // On error, let the read that follows report it.
    rustix::event::poll(&mut fds, Some(&timeout)).map_or(true, |n| n > 0)
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
                loop {
                    let installing = server.idle(&mut |r| lock(&output).send(&r));
                    let mut o = lock(&output);
                    o.flush();
                    if let Some(e) = o.error.take() {
                        return Err(e.into());
                    }
                    drop(o);
                    if !installing || stdin_readable(POLL_INSTALL) {
                        break;
                    }
                }
                busy.store(false, Ordering::Relaxed);
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
    crate::trace!("serve: done; {}", crate::util::memory());
    stop.store(true, Ordering::Relaxed);
    keepalive.thread().unpark();
    let _ = keepalive.join();
    lock(&output).flush();
    result
}

#[cfg(test)]
mod tests;
