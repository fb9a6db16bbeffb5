//! One `sync` run on the hub, from lock to unlock:
//!
//! ```text
//! lock ─► open + scan every replica (in parallel) ─► safety checks ─► reconcile
//!      ─► (dry-run: print, stop) ─► execute the plan ─► commit agreed states ─► close
//! ```
//!
//! The hub's own root is a replica like the others (index 0, served on a thread);
//! peers are `serve` processes. All responses arrive on one channel, so one loop
//! drives every replica and a dead or silent peer is dropped without holding up the
//! rest.

mod check;
mod conn;
mod exec;

pub use check::{CheckLine, check};

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};

use crate::apply::conflict_time;
use crate::archive::{PairRecord, ReplicaId, StateError};
use crate::config::{Settings, Target, sanitize};
use crate::exclude::Excludes;
use crate::lock::{Lock, LockError};
use crate::plan::{Action, HUB, Plan, Reason};
use crate::proto::{Open, Opened, PairStatus, Request, Response, ScanSummary};
use crate::reconcile::{self, PeerInput, View};
use crate::report::{ConflictReport, ReplicaReport, RunReport};
use crate::transport;
use crate::version::{Entry, Mtime};

use conn::{Conn, Event, Incoming};

/// A run deletes at most this many files from a replica without `--force-deletions`,
/// unless that is also at most half of its files.
const HANDFUL: usize = 10;

/// Why a run could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Locked(#[from] LockError),
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
}

/// What a run did.
pub struct Outcome {
    pub report: RunReport,
    pub plan: Option<Plan>,
    pub labels: Vec<String>,
}

/// The hub's view of one replica during a run.
struct Rep {
    conn: Conn,
    url: String,
    /// Peers: where the hub keeps its record of this pair's agreed state.
    pair_path: Option<PathBuf>,
    /// The record, if it is readable and relative to the hub's scan cache.
    agreed: Option<PairRecord>,
    /// The peer holds a copy of `agreed` with the same token (deltas possible).
    shared: bool,
    opened: Option<Opened>,
    entries: Vec<Entry>,
    scanned: Option<ScanSummary>,
    /// Taken out of this run by a safety check.
    refused: Option<String>,
    report: ReplicaReport,
    sent_at: Instant,
    /// Requests sent that it owes an answer to.
    pending: usize,
    /// File data handed to its connection that it has not taken yet.
    queued: u64,
}

impl Rep {
    fn taking_part(&self) -> bool {
        self.conn.alive && self.refused.is_none() && self.scanned.is_some()
    }
}

struct Run<'a> {
    s: &'a Settings,
    reps: Vec<Rep>,
    rx: Receiver<Incoming>,
    report: RunReport,
    hub_id: ReplicaId,
    /// Time part of this run's conflict-copy names.
    stamp: String,
    exec: Option<exec::Exec>,
    /// The hub's own scan, shared with its in-process replica.
    hub_slot: crate::server::SnapshotSlot,
    hub_snapshot: Option<std::sync::Arc<crate::scan::Snapshot>>,
    /// The hub's cache generation when the run started (records refer to it).
    hub_gen: Option<u64>,
    /// Pair records to save once the hub's cache is saved, and its generation then.
    records: Vec<(PathBuf, PairRecord)>,
    saved_gen: Option<u64>,
    /// Paths whose conflicting versions are merged, and how.
    mergeable: Option<globset::GlobSet>,
    merge_rules: Vec<(globset::GlobMatcher, crate::merge::MergeRule)>,
    install_first: globset::GlobSet,
    install_last: globset::GlobSet,
}

/// Replies waiting for the hub to handle them, at most.
const EVENTS_QUEUED: usize = 1024;

/// Runs one synchronization as `s` says.
pub fn run(s: &Settings) -> Result<Outcome, RunError> {
    let started = Instant::now();
    let started_at = std::time::SystemTime::now();
    crate::scan::check_root(&s.root).context("the hub's root")?;
    let hub_state = s.state_dir.clone();
    let _lock = Lock::acquire(&s.root, &hub_state)?;
    let (hub_id, id_warning) =
        ReplicaId::load(&hub_state, !s.dry_run).context("the hub's replica id")?;
    let hub_id = hub_id.unwrap_or_else(ReplicaId::random);
    Excludes::new(&s.excludes)?;
    let hub_gen = crate::archive::scan_cache_generation(&hub_state.join("scan-cache"));

    // Bounded: replicas answer faster than the hub may get to their answers, and
    // a first sync has one per file.
    let (tx, rx) = mpsc::sync_channel(EVENTS_QUEUED);
    let hub_slot: crate::server::SnapshotSlot = Default::default();
    let mut report = RunReport {
        dry_run: s.dry_run,
        keep_actions: s.verbosity == crate::report::Verbosity::Verbose,
        ..Default::default()
    };
    report
        .warnings
        .extend(id_warning.map(|w| format!("hub: {w}")));
    let mut reps = vec![Rep {
        conn: Conn::in_process(
            HUB,
            "hub".into(),
            s.root.clone(),
            hub_state.clone(),
            hub_slot.clone(),
            tx.clone(),
        ),
        url: s.root.display().to_string(),
        pair_path: None,
        agreed: None,
        shared: false,
        opened: None,
        entries: Vec::new(),
        scanned: None,
        refused: None,
        report: ReplicaReport {
            label: "hub".into(),
            url: s.root.display().to_string(),
            ..Default::default()
        },
        sent_at: Instant::now(),
        pending: 0,
        queued: 0,
    }];
    for (i, p) in s.peers.iter().enumerate() {
        let replica = i + 1;
        let pair_path = hub_state.join("pairs").join(format!(
            "peer-{}.state",
            &blake3::hash(p.key.as_bytes()).to_hex()[..16]
        ));
        let agreed = match PairRecord::load(&pair_path) {
            Ok(r) if Some(r.base) == hub_gen => Some(r),
            Ok(_) => {
                report.warnings.push(format!(
                    "peer {}: {} does not match the hub's scan cache (a crash between saving them, or a lost cache); treating this as a first sync with it (nothing will be deleted)",
                    p.label,
                    pair_path.display()
                ));
                None
            }
            Err(StateError::Missing { .. }) => None,
            Err(e) => {
                report.warnings.push(format!(
                    "peer {}: {e}; treating this as a first sync with it (nothing will be deleted)",
                    p.label
                ));
                None
            }
        };
        let url = match &p.target {
            Target::Local(path) => path.display().to_string(),
            Target::Ssh(t) => t.key(),
        };
        let connect: Box<dyn FnOnce() -> Result<transport::Link, String> + Send> =
            match p.target.clone() {
                Target::Local(path) => {
                    let exe = s.exe.clone();
                    let cmd = Some(p.ssh.remote_command.clone()).filter(|c| !c.is_empty());
                    Box::new(move || {
                        transport::spawn_local(&exe, cmd.as_deref(), &path)
                            .map_err(|e| format!("cannot start `hubsync serve`: {e}"))
                    })
                }
                Target::Ssh(t) => {
                    let o = p.ssh.clone();
                    match o.ssh_command.clone() {
                        Some(words) => Box::new(move || {
                            transport::ssh::spawn_openssh(&t, &o, &words)
                                .map_err(|e| format!("cannot run {}: {e}", words[0]))
                        }),
                        None => Box::new(move || transport::libssh2::connect(&t, &o)),
                    }
                }
            };
        let conn = Conn::connect(replica, p.label.clone(), tx.clone(), connect);
        reps.push(Rep {
            conn,
            url: url.clone(),
            pair_path: Some(pair_path),
            agreed,
            shared: false,
            opened: None,
            entries: Vec::new(),
            scanned: None,
            refused: None,
            report: ReplicaReport {
                label: p.label.clone(),
                url,
                ..Default::default()
            },
            sent_at: Instant::now(),
            pending: 0,
            queued: 0,
        });
    }
    drop(tx);
    crate::trace!("agreed states loaded, peers started");

    let mut run = Run {
        s,
        reps,
        rx,
        report,
        hub_id,
        stamp: conflict_time(Mtime::now()),
        exec: None,
        hub_slot,
        hub_snapshot: None,
        hub_gen,
        records: Vec::new(),
        saved_gen: None,
        mergeable: None,
        install_first: globset::GlobSet::empty(),
        install_last: globset::GlobSet::empty(),
        merge_rules: Vec::new(),
    };
    run.compile_merges()?;
    let result = run.go();
    run.finish(started);
    if !s.dry_run {
        run.record_status(started_at);
    }
    crate::trace!("status recorded");
    let labels = run.labels();
    let plan = result?;
    Ok(Outcome {
        report: run.report,
        plan,
        labels,
    })
}

impl Run<'_> {
    fn compile_merges(&mut self) -> Result<(), RunError> {
        let mut set = globset::GlobSetBuilder::new();
        for rule in &self.s.merges {
            let glob = globset::GlobBuilder::new(&rule.glob)
                .literal_separator(true)
                .build()
                .map_err(|e| anyhow!("merge rule {:?}: {e}", rule.glob))?;
            set.add(glob.clone());
            self.merge_rules
                .push((glob.compile_matcher(), rule.clone()));
        }
        if !self.merge_rules.is_empty() {
            self.mergeable = Some(set.build().map_err(|e| anyhow!("{e}"))?);
        }
        let globs = |list: &[String]| -> Result<globset::GlobSet, RunError> {
            let mut set = globset::GlobSetBuilder::new();
            for g in list {
                let glob = globset::GlobBuilder::new(g)
                    .literal_separator(true)
                    .build()
                    .map_err(|e| anyhow!("install order glob {g:?}: {e}"))?;
                set.add(glob);
            }
            Ok(set.build().map_err(|e| anyhow!("{e}"))?)
        };
        self.install_first = globs(&self.s.install_first)?;
        self.install_last = globs(&self.s.install_last)?;
        Ok(())
    }

    /// When a file is installed relative to others: 0 first, 1 normally, 2 last.
    pub(super) fn rank_of(&self, path: &crate::relpath::RelPath) -> u8 {
        if self.install_first.is_match(path.as_path()) {
            0
        } else if self.install_last.is_match(path.as_path()) {
            2
        } else {
            1
        }
    }

    fn labels(&self) -> Vec<String> {
        self.reps.iter().map(|r| r.conn.label.clone()).collect()
    }

    fn go(&mut self) -> Result<Option<Plan>, RunError> {
        crate::trace!("opening and scanning");
        self.open_and_scan()?;
        crate::trace!("scanned; {}", crate::util::memory());
        self.check_empty_roots();
        self.check_clocks();
        let plan = std::sync::Arc::new(self.plan());
        crate::trace!(
            "planned {} items; {}",
            plan.items.len(),
            crate::util::memory()
        );
        if self.s.dry_run {
            self.report_conflicts(&plan, &Default::default());
            self.count_planned(&plan);
            return Ok(Some(std::sync::Arc::unwrap_or_clone(plan)));
        }
        // Test hook: lets integration tests change a tree between scan and apply.
        if let Ok(cmd) = std::env::var("HUBSYNC_TEST_BEFORE_APPLY") {
            let _ = std::process::Command::new("sh").arg("-c").arg(cmd).status();
        }
        let outcomes = self.execute(&plan);
        self.report_conflicts(&plan, &outcomes.failed);
        crate::trace!("executed; {}", crate::util::memory());
        self.commit(&plan, &outcomes);
        crate::trace!("committed; {}", crate::util::memory());
        // The plan is about as big as the hub's scan: gone before the hub's own
        // replica saves its scan cache, unless the output shows it.
        let shown = self.s.json || self.s.verbosity == crate::report::Verbosity::Verbose;
        Ok(shown.then(|| std::sync::Arc::unwrap_or_clone(plan)))
    }

    /// Opens every replica and scans them all at once.
    fn open_and_scan(&mut self) -> Result<(), RunError> {
        for (i, rep) in self.reps.iter_mut().enumerate() {
            let (pair, pair_replica) = match &rep.agreed {
                Some(a) => (Some(a.token), a.peer_replica),
                None => (None, None),
            };
            rep.sent_at = Instant::now();
            rep.conn.last_heard = Instant::now();
            rep.conn.send(Request::Open(Open {
                hub: self.hub_id,
                label: if i == HUB {
                    "hub".into()
                } else {
                    rep.conn.label.clone()
                },
                excludes: self.s.excludes.clone(),
                pair,
                dry_run: self.s.dry_run,
                pair_replica,
                check: false,
                conflict_retention: Some(self.s.conflict_retention.as_secs()),
                after_install: self.s.after_install.clone(),
                post_apply: self.s.post_apply.clone(),
            }));
            rep.conn.send(Request::Scan { full: false });
        }
        self.pump(|run| {
            run.reps
                .iter()
                .all(|r| !r.conn.alive || r.scanned.is_some())
        });
        // Records are relative to the cache the hub had when they were written; if
        // the scan found another (or none), they cannot be read back.
        let gen_now = self.hub_snapshot.as_ref().and_then(|s| s.generation);
        if gen_now != self.hub_gen {
            for rep in self.reps.iter_mut().skip(1) {
                if rep.agreed.take().is_some() {
                    self.report.warnings.push(format!(
                        "peer {}: the hub's scan cache changed under its record; treating this as a first sync with it (nothing will be deleted)",
                        rep.conn.label
                    ));
                }
            }
        }
        // A delta is only readable against a record: ask again for everything.
        let mut again = false;
        for rep in self.reps.iter_mut().skip(1) {
            if rep.conn.alive && rep.agreed.is_none() && rep.scanned.is_some_and(|s| s.delta) {
                rep.entries.clear();
                rep.scanned = None;
                rep.conn.send(Request::Scan { full: true });
                again = true;
            }
        }
        if again {
            self.pump(|run| {
                run.reps
                    .iter()
                    .all(|r| !r.conn.alive || r.scanned.is_some())
            });
        }
        let hub = &self.reps[HUB];
        if !hub.conn.alive || hub.scanned.is_none() {
            return Err(anyhow!(
                "cannot scan the hub's root {}: {}",
                self.s.root.display(),
                hub.conn.failure.clone().unwrap_or_default()
            )
            .into());
        }
        Ok(())
    }

    /// Waits for events until `done` holds, dropping replicas that go silent.
    fn pump(&mut self, mut done: impl FnMut(&Run) -> bool) {
        while !done(self) {
            match self.rx.recv_timeout(Duration::from_millis(100)) {
                Ok(inc) => self.on_event(inc),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.check_timeouts();
        }
    }

    fn check_timeouts(&mut self) {
        for (i, rep) in self.reps.iter_mut().enumerate().skip(1) {
            let limit = self.s.peers[i - 1].timeout;
            if !self_waiting(rep) {
                // Its silence counts only from when we wait on it: a peer left idle
                // while another one holds up a shared transfer is not stalled.
                rep.conn.last_heard = Instant::now();
                continue;
            }
            if rep.conn.alive && rep.conn.last_heard.elapsed() > limit {
                let what = if rep.scanned.is_none() {
                    "its scan".to_string()
                } else if rep.queued > 0 {
                    format!("it to take {} of data", crate::util::Bytes(rep.queued))
                } else {
                    format!("{} answer(s)", rep.pending)
                };
                let why = format!(
                    "no answer for {:.0} s while waiting for {what}; giving up on it for this run",
                    limit.as_secs_f64()
                );
                rep.conn.fail(why);
            }
        }
    }

    /// Handles an event of the open/scan phase (and what any phase has in common).
    fn on_event(&mut self, inc: Incoming) {
        let r = inc.replica;
        let rep = &mut self.reps[r];
        if crate::util::tracing() {
            let what = match &inc.event {
                Event::Response(Response::Data { bytes, .. }) => format!("data {}", bytes.len()),
                Event::Response(Response::Done { id, result }) => format!("done {id} {result:?}"),
                Event::Response(Response::Entries(e)) => format!("{} entries", e.len()),
                Event::Response(_) => "response".into(),
                Event::Closed(w) => format!("closed {w:?}"),
                Event::Drained(n) => format!("drained {n} (queued {})", rep.queued),
            };
            crate::trace!("replica {r}: {what}");
        }
        rep.conn.last_heard = Instant::now();
        match inc.event {
            Event::Response(Response::Opened(o)) => {
                let rtt = rep.sent_at.elapsed();
                let now = Mtime::now().as_nanos() - (rtt.as_nanos() / 2) as i128;
                rep.report.clock_offset = Some((o.time.as_nanos() - now) as f64 / 1e9);
                self.opened(r, o);
            }
            Event::Response(Response::Entries(mut e)) => {
                if rep.entries.is_empty() {
                    rep.entries = e;
                } else {
                    rep.entries.append(&mut e);
                }
            }
            Event::Response(Response::ScanDone(summary)) => {
                if r == HUB {
                    self.hub_snapshot = self
                        .hub_slot
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .take();
                }
                let rep = &mut self.reps[r];
                rep.scanned = Some(summary);
                rep.report.scan = Some(summary);
                if !rep.entries.is_sorted_by(|a, b| a.path < b.path) {
                    rep.conn.fail("it sent its scan out of order".into());
                }
                if !summary.delta {
                    // A full listing never needs a base.
                    if rep.shared && rep.agreed.take().is_some() {
                        // It said at open that it holds our record, yet could not
                        // answer with a delta: its copy turned out unusable (a
                        // damaged scan cache). Like a peer without a record, this
                        // is a first sync: its absences are not deletions.
                        self.report.warnings.push(format!(
                            "peer {}: it could not use its record of the last sync after all; treating this as a first sync (nothing will be deleted)",
                            rep.conn.label
                        ));
                    }
                    rep.shared = false;
                }
            }
            Event::Response(Response::Warning(w)) => {
                let label = rep.conn.label.clone();
                self.report.warnings.push(format!("{label}: {w}"));
            }
            Event::Response(Response::Fatal(msg)) => rep.conn.fail(msg),
            Event::Response(Response::Progress { .. }) => {}
            Event::Closed(why) => {
                if rep.conn.alive {
                    // Let it finish exiting (its input closed) so that its last
                    // words are in stderr.
                    rep.conn.close();
                    let exit = rep.conn.wait(Duration::from_secs(1));
                    let stderr = rep.conn.stderr();
                    let mut msg =
                        why.unwrap_or_else(|| "the connection closed unexpectedly".into());
                    if !stderr.is_empty() {
                        msg = format!("{msg}; it said: {stderr}");
                    } else if let Some(exit) = exit {
                        msg = format!("{msg} ({exit})");
                    }
                    rep.conn.fail(msg + &hint(&stderr));
                }
            }
            Event::Response(other) => self.on_exec_event(r, other),
            // A dead replica's queue was written off whole when it died.
            Event::Drained(_) if !rep.conn.alive => {}
            Event::Drained(n) => {
                rep.queued = rep.queued.saturating_sub(n);
                self.on_drained(n);
            }
        }
    }

    /// Checks what a peer said about itself against what we remember of it.
    fn opened(&mut self, r: usize, o: Opened) {
        let rep = &mut self.reps[r];
        if let (true, Some(a)) = (r != HUB, &rep.agreed) {
            let why = if a.peer_replica != Some(o.replica) {
                // An empty root keeps its agreed state until the unmounted-disk check.
                (!o.root_was_empty).then(|| {
                    "it is not the replica it was at the last sync (its .hubsync directory is new)"
                        .to_string()
                })
            } else {
                match &o.pair {
                    PairStatus::Present(t) => {
                        rep.shared = *t == a.token;
                        None
                    }
                    PairStatus::None => Some("it has no record of the last sync".to_string()),
                    PairStatus::Unreadable(e) => Some(e.clone()),
                }
            };
            if let Some(why) = why {
                self.report.warnings.push(format!(
                    "peer {}: {why}; treating this as a first sync (nothing will be deleted)",
                    rep.conn.label
                ));
                rep.agreed = None;
            }
        }
        rep.opened = Some(o);
    }

    /// A replica whose root is empty (not even a state directory) although the last
    /// sync left files there looks like an unmounted disk: it takes no part.
    fn check_empty_roots(&mut self) {
        for rep in self.reps.iter_mut().skip(1) {
            let (Some(o), Some(a)) = (&rep.opened, &rep.agreed) else {
                continue;
            };
            if o.root_was_empty && a.files > 0 && !self.s.force_deletions {
                rep.refused = Some(format!(
                    "its root {} is empty, but the last sync left {} files there; it looks unmounted or wiped, so nothing was copied to it or deleted because of it. Mount it, or if it really is meant to be empty, run again with --force-deletions",
                    rep.url, a.files
                ));
            }
            if o.root_was_empty && a.peer_replica != Some(o.replica) {
                // After the check (or with --force-deletions): a fresh replica.
                rep.agreed = None;
            }
        }
    }

    /// Newest-mtime resolution trusts clocks: say when a peer's is off.
    fn check_clocks(&mut self) {
        let limit = self.s.max_clock_skew.as_secs_f64();
        for rep in self.reps.iter().skip(1) {
            let Some(off) = rep.report.clock_offset.filter(|o| o.abs() > 1.0) else {
                continue;
            };
            let label = &rep.conn.label;
            self.report.warnings.push(if off.abs() > limit {
                format!(
                    "peer {label}: its clock is {off:+.1} s off the hub's, more than --max-clock-skew ({limit:.0} s); conflicts with it are left unresolved until the clocks agree (run NTP/chrony on both)"
                )
            } else {
                format!("peer {label}: its clock is {off:+.1} s off the hub's; newest-mtime decisions trust clocks, so keep them in sync (NTP/chrony)")
            });
        }
    }

    /// Reconciles, taking out peers whose changes would delete too much.
    fn plan(&mut self) -> Plan {
        let empty = crate::scan::Snapshot::default();
        let snap = self.hub_snapshot.clone();
        let snap = snap.as_deref().unwrap_or(&empty);
        loop {
            let plan = {
                let input = reconcile::Input {
                    mergeable: self.mergeable.as_ref(),
                    bundles: &self.s.bundles,
                    hub: reconcile::Hub {
                        current: &snap.entries,
                        skipped: &snap.skipped,
                        changes: &snap.changes,
                    },
                    peers: self.reps[1..]
                        .iter()
                        .map(|rep| PeerInput {
                            view: rep.taking_part().then(|| {
                                if rep.scanned.is_some_and(|s| s.delta) {
                                    View::Delta(&rep.entries)
                                } else {
                                    View::Full(&rep.entries)
                                }
                            }),
                            agreed: rep.agreed.as_ref().map(|a| &a.diff[..]),
                            clock_ok: rep
                                .report
                                .clock_offset
                                .is_none_or(|o| o.abs() <= self.s.max_clock_skew.as_secs_f64()),
                        })
                        .collect(),
                };
                reconcile::reconcile(&input)
            };
            if self.s.force_deletions || !self.refuse_mass_deletions(&plan) {
                return plan;
            }
        }
    }

    /// Returns true if it took some peer out of the run.
    fn refuse_mass_deletions(&mut self, plan: &Plan) -> bool {
        let mut refused = false;
        for victim in 0..self.reps.len() {
            // A peer's own figures: saturate rather than trust them not to overflow.
            let files = (self.reps[victim].scanned)
                .map_or(0, |s| s.files.saturating_add(s.dirs))
                .try_into()
                .unwrap_or(usize::MAX);
            let removes: Vec<&crate::plan::Item> = plan
                .items
                .iter()
                .filter(|i| {
                    i.actions.iter().any(|(r, a)| {
                        r == victim && matches!(a, Action::Remove | Action::KeepAndRemove)
                    }) && i.result.is_none()
                })
                .collect();
            if removes.len() <= HANDFUL || removes.len() * 2 <= files {
                continue;
            }
            let mut origins: Vec<usize> = Vec::new();
            for i in &removes {
                if let Reason::Deleted { on } = &i.reason {
                    origins.extend(on);
                }
            }
            origins.sort();
            origins.dedup();
            let victim_label = self.reps[victim].conn.label.clone();
            let targets: Vec<usize> = if origins.contains(&HUB) || origins.is_empty() {
                if victim == HUB { vec![] } else { vec![victim] }
            } else {
                origins
            };
            for t in targets {
                let rep = &mut self.reps[t];
                if rep.refused.is_none() {
                    rep.refused = Some(format!(
                        "this run would delete {} of the {files} files on {victim_label}; that looks like a replica that was emptied or unmounted, so {} takes no part. If the deletions are intended, run again with --force-deletions",
                        removes.len(),
                        rep.conn.label
                    ));
                    refused = true;
                }
            }
        }
        refused
    }

    /// Reports each conflict with where its losers were kept. A replica whose action
    /// `failed` still has its own version in place (it was never replaced, or was put
    /// back): it is no loser this run, its error is reported, and the conflict comes
    /// back next run.
    fn report_conflicts(
        &mut self,
        plan: &Plan,
        failed: &std::collections::HashSet<(usize, usize)>,
    ) {
        for (ii, item) in plan.items.iter().enumerate() {
            let Reason::Conflict {
                winner,
                losers,
                rule,
            } = &item.reason
            else {
                continue;
            };
            // The losers, and the replicas that held a copy of a losing version
            // and kept it as well.
            let keepers = item.actions.iter().filter_map(|(r, a)| {
                matches!(a, Action::KeepAndReplace | Action::KeepAndRemove).then_some(r)
            });
            let losers: Vec<_> = losers
                .iter()
                .chain(keepers.filter(|r| !losers.contains(*r)))
                .filter(|l| !failed.contains(&(ii, *l)))
                .map(|l| {
                    let keeps = item.actions.iter().any(|(r, a)| {
                        r == l && matches!(a, Action::KeepAndReplace | Action::KeepAndRemove)
                    });
                    let rep = &self.reps[l];
                    let kept = keeps.then(|| {
                        let rel = format!("{}.conflict-{}", item.path, self.keep_suffix(l));
                        let root = if l == HUB {
                            self.s.root.display().to_string()
                        } else {
                            rep.url.clone()
                        };
                        format!("{root}/.hubsync/conflicts/{rel}")
                    });
                    (rep.conn.label.clone(), kept)
                })
                .collect();
            if losers.is_empty() {
                continue;
            }
            self.report.conflicts.push(ConflictReport {
                path: item.path.to_string(),
                winner: self.reps[usize::from(*winner)].conn.label.clone(),
                rule: *rule,
                losers,
            });
        }
    }

    /// Leaves the status file (and metrics), and removes old conflict copies.
    fn record_status(&mut self, started: std::time::SystemTime) {
        let st = crate::status::Status::record(&self.s.state_dir, self.s, &self.report, started);
        if let Err(e) = st.save(&self.s.state_dir) {
            self.report.warnings.push(format!("{e:#}"));
        }
        if let Some(m) = &self.s.metrics_file
            && let Err(e) = st.save_metrics(m)
        {
            self.report.warnings.push(format!("{e:#}"));
        }
        crate::conflicts::prune(&self.s.root, self.s.conflict_retention);
    }

    /// Fills the per-replica figures with what the plan would do (dry runs).
    fn count_planned(&mut self, plan: &Plan) {
        for item in plan.changes() {
            for (r, a) in &item.actions {
                if !self.reps[r].taking_part() && r != HUB {
                    continue;
                }
                let rep = &mut self.reps[r].report;
                match a {
                    Action::Remove | Action::KeepAndRemove => rep.removed += 1,
                    Action::SetMeta => rep.metadata += 1,
                    _ if item.result.as_ref().is_some_and(|v| v.is_dir()) => {}
                    _ => {
                        rep.files_in += 1;
                        let size = item.result.as_ref().map_or(0, |v| v.size());
                        rep.bytes_in = rep.bytes_in.saturating_add(size);
                    }
                }
            }
        }
    }

    /// The suffix of conflict copies kept on replica `r` in this run.
    fn keep_suffix(&self, r: usize) -> String {
        format!("{}-{}", self.stamp, sanitize(&self.reps[r].conn.label))
    }

    /// Closes every connection and fills in the report.
    fn finish(&mut self, started: Instant) {
        crate::trace!("closing");
        // Hand the hub's scan back before its replica saves its cache.
        self.hub_snapshot = None;
        for rep in &mut self.reps {
            rep.conn.close();
        }
        for rep in &mut self.reps {
            if let Some(exit) = rep.conn.wait(Duration::from_secs(10))
                && rep.conn.failure.is_none()
            {
                let stderr = rep.conn.stderr();
                rep.conn.failure = Some(if stderr.is_empty() {
                    exit
                } else {
                    format!("{exit}: {stderr}")
                });
            }
        }
        crate::trace!("closed");
        // Drain what the closing replicas still say (warnings, the hub's new cache
        // generation); the hub's own replica has finished when it reports closed.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut hub_closed = !self.reps[HUB].conn.alive;
        loop {
            let wait = if hub_closed {
                Duration::from_millis(20)
            } else {
                Duration::from_millis(200)
            };
            let Ok(inc) = self.rx.recv_timeout(wait) else {
                if hub_closed || Instant::now() > deadline {
                    break;
                }
                continue;
            };
            match inc.event {
                Event::Response(Response::Warning(w)) => {
                    let label = self.reps[inc.replica].conn.label.clone();
                    self.report.warnings.push(format!("{label}: {w}"));
                }
                Event::Response(Response::CacheSaved { generation }) if inc.replica == HUB => {
                    self.saved_gen = Some(generation);
                }
                Event::Closed(_) if inc.replica == HUB => hub_closed = true,
                _ => {}
            }
        }
        // Pair records are relative to the hub's cache: saved after it, never with
        // a generation that is not on disk.
        if let Some(generation) = self.saved_gen {
            for (path, mut rec) in std::mem::take(&mut self.records) {
                rec.base = generation;
                let unchanged = self
                    .reps
                    .iter()
                    .find(|r| r.pair_path.as_ref() == Some(&path))
                    .and_then(|r| r.agreed.as_ref())
                    .is_some_and(|old| *old == rec);
                if unchanged {
                    continue;
                }
                if let Err(e) = rec.save(&path, "peer") {
                    self.report.errors.push(format!(
                        "cannot save the agreed state at {}: {e}",
                        path.display()
                    ));
                    self.reps[HUB].report.failed_actions += 1;
                }
            }
        }
        let mut failed = 0;
        for rep in &mut self.reps {
            let (sent, received) = rep.conn.wire();
            rep.report.wire_sent = sent;
            rep.report.wire_received = received;
            rep.report.status = if let Some(why) = &rep.refused {
                rep.report.error = Some(why.clone());
                "refused"
            } else if let Some(why) = &rep.conn.failure {
                rep.report.error = Some(why.clone());
                "failed"
            } else {
                "ok"
            };
            if rep.report.status != "ok" {
                failed += 1;
                self.report.errors.push(format!(
                    "{} {}: {}",
                    if rep.pair_path.is_none() {
                        "hub"
                    } else {
                        "peer"
                    },
                    rep.conn.label,
                    rep.report.error.clone().unwrap_or_default()
                ));
            } else if rep.report.failed_actions > 0 {
                failed += 1;
            }
        }
        let peers = self.reps.len() - 1;
        let hub_failed =
            self.reps[HUB].report.status != "ok" || self.reps[HUB].report.failed_actions > 0;
        let (result, code) = if failed == 0 {
            ("ok", 0)
        } else if hub_failed || failed >= peers {
            ("failed", 1)
        } else {
            ("partial", 2)
        };
        self.report.result = result;
        self.report.exit_code = code;
        self.report.seconds = started.elapsed().as_secs_f64();
        self.report.peak_memory = crate::util::peak_rss();
        crate::trace!("{}", crate::util::memory());
        self.report.replicas = self.reps.iter().map(|r| r.report.clone()).collect();
    }
}

/// What to do about a peer that failed with `stderr`.
pub(crate) fn hint(stderr: &str) -> String {
    if stderr.contains("command not found") || stderr.contains("No such file or directory") {
        " (install hubsync on the peer, or point --remote-command at it, e.g. --remote-command /usr/local/bin/hubsync)".into()
    } else if stderr.contains("Host key verification failed") {
        " (add the peer's host key to known_hosts, e.g. with ssh-keyscan, or run once with --accept-new-host-key)".into()
    } else if stderr.contains("Permission denied") {
        " (check that the key is in the peer's authorized_keys, or pass --identity FILE)".into()
    } else {
        String::new()
    }
}

/// Whether this replica should be making progress: it owes answers, or it has not
/// taken data we gave it. (A peer that waits for data from another peer is not
/// stalled itself.)
fn self_waiting(rep: &Rep) -> bool {
    rep.scanned.is_none() || rep.pending > 0 || rep.queued > 0
}
