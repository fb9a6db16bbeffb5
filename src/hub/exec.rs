//! Carrying out a plan on every replica at once, and recording what was agreed.
//!
//! Each replica receives its operations in an order that keeps its tree valid at
//! every step: removals deepest first, then new directories parents first, then
//! files and links, then directory permission changes. File content is read from
//! the source replica in chunks and relayed by the hub to every destination that
//! needs it, many files at a time but with a bounded number of bytes in flight, so
//! memory stays flat whatever the file sizes and small files do not cost a round
//! trip each.

use std::collections::{HashMap, VecDeque};

use crate::agreed::{self, OldCache, sorted_union};
use crate::archive::{PairRecord, Token};
use crate::plan::{Action, HUB, Plan, Reason};
use crate::proto::{CHUNK, Expect, Op, OpError, Request, Response};
use crate::relpath::RelPath;
use crate::version::Kind;
use crate::version::Version;

use super::Run;

/// Bytes requested from sources and not yet handed to destinations' pipes.
const IN_FLIGHT: u64 = 8 << 20;
/// Files being received by destinations at once.
const MAX_ACTIVE: usize = 128;
/// Outstanding chunk requests per file.
const READ_AHEAD: usize = 4;
/// Agreed-state changes per commit frame.
const COMMIT_CHUNK: usize = 4096;

struct Task {
    item: usize,
    replica: usize,
    action: Action,
    phase: u8,
    id: u32,
    op: Option<Op>,
    outcome: Option<Result<(), OpError>>,
    /// Counted in the replica's `pending` (it owes us an answer for it).
    counted: bool,
}

struct Transfer {
    item: usize,
    source: usize,
    size: u64,
    next: u64,
    received: u64,
    outstanding: usize,
    dests: Vec<usize>,
    started: bool,
    done: bool,
}

/// A merge: read every input version, unite their lines, send the result.
struct MergeJob {
    item: usize,
    inputs: Vec<(usize, crate::version::Version)>,
    bufs: Vec<Vec<u8>>,
    outstanding: usize,
    dests: Vec<usize>,
    done: bool,
}

enum Waiting {
    Task(usize),
    Read { transfer: usize, len: u64 },
    MergeRead { job: usize, input: usize, len: u64 },
}

#[derive(Default)]
pub(super) struct Exec {
    tasks: Vec<Task>,
    by_id: HashMap<(usize, u32), Waiting>,
    transfers: Vec<Transfer>,
    queue: VecDeque<usize>,
    /// Started transfers that are not done (at most `MAX_ACTIVE`).
    active: Vec<usize>,
    in_flight: u64,
    /// Tasks without an outcome yet.
    remaining: usize,
    /// Replicas known dead at the last `reap`.
    dead_seen: usize,
    /// Per replica: phase-D tasks not yet sent, and tasks of earlier phases not done.
    later: Vec<Vec<usize>>,
    earlier_left: Vec<usize>,
    committed: Vec<bool>,
    /// On a terminal only: bytes delivered of all that must be, rate, ETA.
    progress: Option<indicatif::ProgressBar>,
    merges: Vec<MergeJob>,
    /// The results of merges that were computed, by item.
    merged: HashMap<usize, crate::version::Version>,
}

/// What execution did: per plan item, which replicas carried out their action
/// successfully, and the results of merges (known only once they ran).
#[derive(Default)]
pub(super) struct Outcomes {
    pub ok: Vec<Vec<(usize, bool)>>,
    pub merged: HashMap<usize, crate::version::Version>,
}

/// Merged files are built in memory: larger ones are left to the next run.
const MAX_MERGE: u64 = 64 << 20;

impl Run<'_> {
    /// Executes `plan`; returns per item which replicas succeeded.
    pub(super) fn execute(&mut self, plan: &Plan) -> Outcomes {
        let n = self.reps.len();
        let mut ex = Exec {
            later: vec![Vec::new(); n],
            earlier_left: vec![0; n],
            committed: vec![false; n],
            ..Default::default()
        };
        for (ii, item) in plan.items.iter().enumerate() {
            let mut file_dests = Vec::new();
            for &(r, action) in &item.actions {
                if !self.reps[r].taking_part() {
                    continue;
                }
                let keep = (action == Action::KeepAndReplace).then(|| self.keep_suffix(r));
                let expect = if action == Action::Create {
                    Expect::Absent
                } else {
                    Expect::Scanned
                };
                let path = item.path.clone();
                let (phase, op) = match (&item.result, action) {
                    (None, _) => (0, Op::Remove { path }),
                    (Some(v), Action::SetMeta) => (
                        if v.is_dir() { 3 } else { 2 },
                        Op::SetMeta {
                            path,
                            version: v.clone(),
                        },
                    ),
                    (Some(v), _) => match v.kind {
                        Kind::Dir => (
                            1,
                            Op::Mkdir {
                                path,
                                version: v.clone(),
                                expect,
                                keep,
                            },
                        ),
                        Kind::Symlink { .. } => (
                            2,
                            Op::PutSymlink {
                                path,
                                version: v.clone(),
                                expect,
                                keep,
                            },
                        ),
                        Kind::File { .. } => {
                            file_dests.push(ex.tasks.len());
                            (
                                2,
                                Op::PutFile {
                                    path,
                                    version: v.clone(),
                                    expect,
                                    keep,
                                },
                            )
                        }
                    },
                };
                let id = self.reps[r].conn.next_id();
                if phase < 3 {
                    ex.earlier_left[r] += 1;
                }
                ex.remaining += 1;
                ex.tasks.push(Task {
                    item: ii,
                    replica: r,
                    action,
                    phase,
                    id,
                    op: Some(op),
                    outcome: None,
                    counted: false,
                });
            }
            if !file_dests.is_empty() && matches!(item.reason, Reason::Merged { .. }) {
                let ok = item
                    .merge
                    .iter()
                    .all(|(r, v)| self.reps[*r].taking_part() && v.size() <= MAX_MERGE);
                if ok {
                    ex.merges.push(MergeJob {
                        item: ii,
                        inputs: item.merge.clone(),
                        bufs: vec![Vec::new(); item.merge.len()],
                        outstanding: 0,
                        dests: file_dests,
                        done: false,
                    });
                } else {
                    for t in file_dests {
                        let why = OpError::Refused(
                            "a version to merge is too large or unreachable".into(),
                        );
                        finish_task(&mut ex, t, Err(why));
                    }
                }
            } else if !file_dests.is_empty() {
                let size = item.result.as_ref().map_or(0, |v| v.size());
                match item.source.filter(|&s| self.reps[s].taking_part()) {
                    Some(source) => {
                        ex.queue.push_back(ex.transfers.len());
                        ex.transfers.push(Transfer {
                            item: ii,
                            source,
                            size,
                            next: 0,
                            received: 0,
                            outstanding: 0,
                            dests: file_dests,
                            started: false,
                            done: false,
                        });
                    }
                    None => {
                        for t in file_dests {
                            let why =
                                OpError::Io("no replica that holds the content takes part".into());
                            finish_task(&mut ex, t, Err(why));
                        }
                    }
                }
            }
        }
        // Immediate operations, in the order that keeps each tree valid.
        let mut order: Vec<usize> = (0..ex.tasks.len())
            .filter(|&t| {
                ex.tasks[t].outcome.is_none() && !matches!(ex.tasks[t].op, Some(Op::PutFile { .. }))
            })
            .collect();
        order.sort_by(|&a, &b| {
            let (x, y) = (&ex.tasks[a], &ex.tasks[b]);
            let (px, py) = (&plan.items[x.item].path, &plan.items[y.item].path);
            x.phase.cmp(&y.phase).then_with(|| {
                if x.phase == 0 || x.phase == 3 {
                    py.cmp(px)
                } else {
                    px.cmp(py)
                }
            })
        });
        for t in order {
            if ex.tasks[t].phase == 3 {
                ex.later[ex.tasks[t].replica].push(t);
            } else {
                self.send_task(&mut ex, t);
            }
        }
        for j in 0..ex.merges.len() {
            self.start_merge(&mut ex, plan, j);
        }
        ex.progress = self.progress_bar(&ex);
        self.exec = Some(ex);
        loop {
            self.reap();
            self.start_transfers(plan);
            self.send_later();
            let ex = self.exec.as_ref().expect("set above");
            if let Some(bar) = &ex.progress {
                let done = ex.tasks.len() - ex.remaining;
                bar.set_message(format!("{done}/{} changes", ex.tasks.len()));
            }
            if ex.remaining == 0 {
                break;
            }
            self.pump_once();
        }
        let ex = self.exec.take().expect("set above");
        if let Some(bar) = &ex.progress {
            bar.finish_and_clear();
        }
        self.record(plan, &ex);
        let mut outcomes = Outcomes {
            ok: vec![Vec::new(); plan.items.len()],
            merged: ex.merged.clone(),
        };
        for t in &ex.tasks {
            outcomes.ok[t.item].push((t.replica, matches!(t.outcome, Some(Ok(())))));
        }
        self.exec = Some(Exec {
            committed: ex.committed,
            ..Default::default()
        });
        outcomes
    }

    /// Asks every input of merge `j` for its whole content.
    fn start_merge(&mut self, ex: &mut Exec, plan: &Plan, j: usize) {
        let path = plan.items[ex.merges[j].item].path.clone();
        for k in 0..ex.merges[j].inputs.len() {
            let (r, size) = (ex.merges[j].inputs[k].0, ex.merges[j].inputs[k].1.size());
            let mut offset = 0;
            while offset < size {
                let len = (size - offset).min(CHUNK as u64);
                let rep = &mut self.reps[r];
                let id = rep.conn.next_id();
                rep.conn.send(Request::Read {
                    id,
                    path: path.clone(),
                    offset,
                    len: len as u32,
                });
                rep.pending += 1;
                ex.merges[j].outstanding += 1;
                ex.by_id.insert(
                    (r, id),
                    Waiting::MergeRead {
                        job: j,
                        input: k,
                        len,
                    },
                );
                offset += len;
            }
        }
        if ex.merges[j].outstanding == 0 {
            self.finish_merge(ex, j);
        }
    }

    /// All inputs are in: check them, unite their lines, send the result.
    fn finish_merge(&mut self, ex: &mut Exec, j: usize) {
        let m = &ex.merges[j];
        let intact = m.inputs.iter().zip(&m.bufs).all(|((_, v), b)| {
            matches!(&v.kind, Kind::File { size, hash } if *size == b.len() as u64 && *hash == crate::version::Hash::of(b))
        });
        if !intact {
            return fail_merge(ex, j, OpError::SourceChanged);
        }
        let path = match &ex.tasks[m.dests[0]].op {
            Some(Op::PutFile { path, .. }) => path.clone(),
            _ => return fail_merge(ex, j, OpError::Refused("not a file".into())),
        };
        let Some(rule) = self
            .merge_rules
            .iter()
            .find(|(g, _)| g.is_match(path.as_path()))
            .map(|(_, r)| r.clone())
        else {
            return fail_merge(ex, j, OpError::Refused("no merge rule".into()));
        };
        let inputs: Vec<&[u8]> = m.bufs.iter().map(Vec::as_slice).collect();
        let bytes = crate::merge::merge_lines(&rule, &inputs);
        let newest = m
            .inputs
            .iter()
            .map(|(_, v)| v)
            .max_by(|a, b| a.precedence(b))
            .expect("inputs");
        let version = crate::version::Version {
            kind: Kind::File {
                size: bytes.len() as u64,
                hash: crate::version::Hash::of(&bytes),
            },
            ..newest.clone()
        };
        ex.merges[j].done = true;
        ex.merges[j].bufs = Vec::new();
        ex.merged.insert(ex.merges[j].item, version.clone());
        for d in ex.merges[j].dests.clone() {
            if ex.tasks[d].outcome.is_some() {
                continue;
            }
            if let Some(Op::PutFile { version: v, .. }) = ex.tasks[d].op.as_mut() {
                *v = version.clone();
            }
            self.send_task(ex, d);
            let (r, id) = (ex.tasks[d].replica, ex.tasks[d].id);
            for chunk in bytes.chunks(CHUNK) {
                self.reps[r].conn.send(Request::Data {
                    id,
                    bytes: chunk.to_vec(),
                });
            }
            self.reps[r].conn.send(Request::End { id });
            ex.tasks[d].counted = true;
            self.reps[r].pending += 1;
        }
    }

    /// A progress bar for long runs (a first sync), on a terminal only: nothing of it
    /// reaches the journal.
    fn progress_bar(&self, ex: &Exec) -> Option<indicatif::ProgressBar> {
        use std::io::IsTerminal;
        if self.s.json
            || self.s.verbosity < crate::report::Verbosity::Normal
            || !std::io::stderr().is_terminal()
        {
            return None;
        }
        let total: u64 = ex
            .transfers
            .iter()
            .map(|t| t.size * t.dests.len() as u64)
            .sum();
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:>18} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .ok()?
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        Some(bar)
    }

    fn pump_once(&mut self) {
        match self.rx.recv_timeout(std::time::Duration::from_millis(100)) {
            Ok(inc) => self.on_event(inc),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                for rep in &mut self.reps {
                    rep.conn.fail("all connections ended".into());
                }
            }
        }
        self.check_timeouts();
    }

    fn send_task(&mut self, ex: &mut Exec, t: usize) {
        let task = &mut ex.tasks[t];
        let op = task.op.take().expect("sent once");
        let rep = &mut self.reps[task.replica];
        // A file being received owes us nothing until we have sent all of it.
        if !matches!(op, Op::PutFile { .. }) {
            task.counted = true;
            rep.pending += 1;
        }
        rep.conn.send(Request::Op { id: task.id, op });
        ex.by_id.insert((task.replica, task.id), Waiting::Task(t));
    }

    /// Fails what depends on replicas that are gone (only when one has gone since
    /// the last look: this runs once per event).
    fn reap(&mut self) {
        let dead = self.reps.iter().filter(|r| !r.conn.alive).count();
        let Some(mut ex) = self.exec.take() else {
            return;
        };
        if dead != ex.dead_seen {
            ex.dead_seen = dead;
            // What was queued for a dead replica will never drain.
            for rep in self.reps.iter_mut().filter(|r| !r.conn.alive) {
                ex.in_flight = ex.in_flight.saturating_sub(rep.queued);
                rep.queued = 0;
            }
            for t in 0..ex.tasks.len() {
                let r = ex.tasks[t].replica;
                if ex.tasks[t].outcome.is_none() && !self.reps[r].conn.alive {
                    let why = self.reps[r]
                        .conn
                        .failure
                        .clone()
                        .unwrap_or_else(|| "it failed".into());
                    finish_task(&mut ex, t, Err(OpError::Io(why)));
                }
            }
            for j in 0..ex.merges.len() {
                let dead_input = ex.merges[j]
                    .inputs
                    .iter()
                    .any(|(r, _)| !self.reps[*r].conn.alive);
                if dead_input {
                    fail_merge(
                        &mut ex,
                        j,
                        OpError::Io("a replica holding a version to merge failed".into()),
                    );
                }
            }
            for tr in 0..ex.transfers.len() {
                let x = &ex.transfers[tr];
                if x.done {
                    continue;
                }
                if !self.reps[x.source].conn.alive {
                    self.abort_transfer(
                        &mut ex,
                        tr,
                        OpError::Io("its source replica failed".into()),
                    );
                } else if x.dests.iter().all(|&d| ex.tasks[d].outcome.is_some()) {
                    mark_done(&mut ex, tr);
                }
            }
        }
        self.exec = Some(ex);
    }

    /// Starts queued transfers and asks for more data while the budget allows.
    fn start_transfers(&mut self, plan: &Plan) {
        let Some(mut ex) = self.exec.take() else {
            return;
        };
        while ex.active.len() < MAX_ACTIVE && ex.in_flight < IN_FLIGHT {
            let Some(tr) = ex.queue.pop_front() else {
                break;
            };
            if ex.transfers[tr].done {
                continue; // aborted before it started
            }
            ex.transfers[tr].started = true;
            ex.active.push(tr);
            let dests = ex.transfers[tr].dests.clone();
            for d in dests {
                if ex.tasks[d].outcome.is_none() {
                    self.send_task(&mut ex, d);
                }
            }
            if ex.transfers[tr].size == 0 {
                self.end_transfer(&mut ex, tr);
            }
        }
        for k in 0..ex.active.len() {
            let tr = ex.active[k];
            let x = &ex.transfers[tr];
            if x.done || x.next >= x.size {
                continue;
            }
            let path = plan.items[x.item].path.clone();
            while ex.in_flight < IN_FLIGHT && ex.transfers[tr].outstanding < READ_AHEAD {
                let x = &mut ex.transfers[tr];
                if x.next >= x.size {
                    break;
                }
                let len = (x.size - x.next).min(CHUNK as u64);
                let rep = &mut self.reps[x.source];
                let id = rep.conn.next_id();
                rep.conn.send(Request::Read {
                    id,
                    path: path.clone(),
                    offset: x.next,
                    len: len as u32,
                });
                rep.pending += 1;
                x.next += len;
                x.outstanding += 1;
                ex.in_flight += len;
                ex.by_id
                    .insert((x.source, id), Waiting::Read { transfer: tr, len });
            }
        }
        self.exec = Some(ex);
    }

    /// Sends each replica its directory permission changes once everything else for
    /// it is done (a directory made read-only earlier could refuse new files).
    fn send_later(&mut self) {
        let Some(mut ex) = self.exec.take() else {
            return;
        };
        for r in 0..self.reps.len() {
            if ex.earlier_left[r] == 0 && !ex.later[r].is_empty() {
                for t in std::mem::take(&mut ex.later[r]) {
                    self.send_task(&mut ex, t);
                }
            }
        }
        self.exec = Some(ex);
    }

    fn end_transfer(&mut self, ex: &mut Exec, tr: usize) {
        mark_done(ex, tr);
        let x = &ex.transfers[tr];
        for &d in &x.dests {
            if ex.tasks[d].outcome.is_none() {
                let task = &ex.tasks[d];
                self.reps[task.replica]
                    .conn
                    .send(Request::End { id: task.id });
            }
        }
    }

    fn abort_transfer(&mut self, ex: &mut Exec, tr: usize, why: OpError) {
        if ex.transfers[tr].done {
            return;
        }
        mark_done(ex, tr);
        for d in ex.transfers[tr].dests.clone() {
            if ex.tasks[d].outcome.is_none() {
                let (r, id) = (ex.tasks[d].replica, ex.tasks[d].id);
                // The destination drops its temp file; we do not wait for it.
                self.reps[r].conn.send(Request::Abort { id });
                ex.by_id.remove(&(r, id));
                finish_task(ex, d, Err(why.clone()));
            }
        }
    }

    /// Handles an event of the execution and commit phases.
    pub(super) fn on_exec_event(&mut self, r: usize, resp: Response) {
        let Some(mut ex) = self.exec.take() else {
            return;
        };
        match resp {
            Response::Done { id, result } => match ex.by_id.remove(&(r, id)) {
                Some(Waiting::Task(t)) => {
                    if ex.tasks[t].counted {
                        self.reps[r].pending = self.reps[r].pending.saturating_sub(1);
                    }
                    finish_task(&mut ex, t, result);
                }
                Some(Waiting::Read { transfer, len }) => {
                    self.reps[r].pending = self.reps[r].pending.saturating_sub(1);
                    ex.in_flight = ex.in_flight.saturating_sub(len);
                    ex.transfers[transfer].outstanding -= 1;
                    let err = result.err().unwrap_or(OpError::SourceChanged);
                    self.abort_transfer(&mut ex, transfer, err);
                }
                Some(Waiting::MergeRead { job, .. }) => {
                    self.reps[r].pending = self.reps[r].pending.saturating_sub(1);
                    ex.merges[job].outstanding -= 1;
                    fail_merge(&mut ex, job, result.err().unwrap_or(OpError::SourceChanged));
                }
                None => {}
            },
            Response::Data { id, bytes } => {
                let merge_read = match ex.by_id.get(&(r, id)) {
                    Some(Waiting::MergeRead { job, input, len }) => Some((*job, *input, *len)),
                    _ => None,
                };
                if let Some((job, input, len)) = merge_read {
                    ex.by_id.remove(&(r, id));
                    self.reps[r].pending = self.reps[r].pending.saturating_sub(1);
                    let m = &mut ex.merges[job];
                    m.outstanding -= 1;
                    if (bytes.len() as u64) < len {
                        fail_merge(&mut ex, job, OpError::SourceChanged);
                    } else {
                        m.bufs[input].extend_from_slice(&bytes);
                        if m.outstanding == 0 && !m.done {
                            self.finish_merge(&mut ex, job);
                        }
                    }
                } else if let Some(Waiting::Read { transfer: tr, len }) = ex.by_id.remove(&(r, id))
                {
                    self.reps[r].pending = self.reps[r].pending.saturating_sub(1);
                    ex.in_flight = ex.in_flight.saturating_sub(len);
                    ex.transfers[tr].outstanding -= 1;
                    if ex.transfers[tr].done {
                        // aborted meanwhile
                    } else if (bytes.len() as u64) < len {
                        // The file shrank since it was scanned.
                        self.abort_transfer(&mut ex, tr, OpError::SourceChanged);
                    } else {
                        ex.transfers[tr].received += bytes.len() as u64;
                        let dests: Vec<usize> = ex.transfers[tr]
                            .dests
                            .iter()
                            .copied()
                            .filter(|&d| ex.tasks[d].outcome.is_none())
                            .collect();
                        let mut bytes = Some(bytes);
                        for (k, &d) in dests.iter().enumerate() {
                            let task = &ex.tasks[d];
                            let data = if k + 1 == dests.len() {
                                bytes.take().unwrap_or_default()
                            } else {
                                bytes.clone().unwrap_or_default()
                            };
                            ex.in_flight += data.len() as u64;
                            if let Some(bar) = &ex.progress {
                                bar.inc(data.len() as u64);
                            }
                            self.reps[task.replica].queued += data.len() as u64;
                            self.reps[task.replica].conn.send(Request::Data {
                                id: task.id,
                                bytes: data,
                            });
                        }
                        let x = &ex.transfers[tr];
                        if x.received == x.size {
                            self.end_transfer(&mut ex, tr);
                        }
                    }
                }
            }
            Response::Committed => {
                self.reps[r].pending = self.reps[r].pending.saturating_sub(1);
                ex.committed[r] = true;
            }
            _ => {}
        }
        self.exec = Some(ex);
    }

    pub(super) fn on_drained(&mut self, n: u64) {
        if let Some(ex) = self.exec.as_mut() {
            ex.in_flight = ex.in_flight.saturating_sub(n);
        }
    }

    /// Fills the report from the outcome of every task.
    fn record(&mut self, plan: &Plan, ex: &Exec) {
        for t in &ex.tasks {
            let item = &plan.items[t.item];
            let label = self.reps[t.replica].conn.label.clone();
            let alive = self.reps[t.replica].conn.alive;
            match &t.outcome {
                Some(Ok(())) => {
                    let size = item.result.as_ref().map_or(0, |v| v.size());
                    let rep = &mut self.reps[t.replica];
                    let verb = match t.action {
                        Action::Remove => {
                            rep.report.removed += 1;
                            "removed"
                        }
                        Action::SetMeta => {
                            rep.report.metadata += 1;
                            "metadata"
                        }
                        Action::KeepAndReplace | Action::Create | Action::Replace => {
                            // Directories are counted by the files they bring.
                            if !item.result.as_ref().is_some_and(|v| v.is_dir()) {
                                rep.report.files_in += 1;
                                rep.report.bytes_in += size;
                                if let Some(src) = item.source {
                                    let src = &mut self.reps[src].report;
                                    src.files_out += 1;
                                    src.bytes_out += size;
                                }
                            }
                            match t.action {
                                Action::Create => "created",
                                Action::Replace => "replaced",
                                _ => "replaced (its own version kept as a conflict copy)",
                            }
                        }
                    };
                    self.report
                        .actions
                        .push(format!("{label}: {verb} {}", item.path));
                }
                Some(Err(e @ (OpError::Changed | OpError::SourceChanged))) => {
                    self.reps[t.replica].report.deferred += 1;
                    self.report
                        .warnings
                        .push(format!("{label}: {}: {e}", item.path));
                }
                // A replica that failed as a whole is reported once, not per path.
                Some(Err(e)) if alive => {
                    self.reps[t.replica].report.failed_actions += 1;
                    self.report
                        .errors
                        .push(format!("{label}: {}: {e}", item.path));
                }
                Some(Err(_)) => {}
                None => {}
            }
        }
    }

    /// Sends each peer the changes to its agreed state, and prepares our own pair
    /// records (saved once the hub's scan cache is, since they are relative to it).
    pub(super) fn commit(&mut self, plan: &Plan, outcomes: &Outcomes) {
        let ok = |item: usize, r: usize| outcomes.ok[item].iter().all(|&(x, good)| x != r || good);
        let result_of = |ii: usize| -> Option<Option<Version>> {
            let item = &plan.items[ii];
            match &item.reason {
                // A merge is agreed on only if it was made.
                Reason::Merged { .. } => outcomes.merged.get(&ii).map(|v| Some(v.clone())),
                _ => Some(item.result.clone()),
            }
        };
        let Some(snap) = self.hub_snapshot.clone() else {
            return;
        };
        let old = OldCache {
            current: &snap.entries,
            changes: &snap.changes,
        };
        // What the hub's tree holds after this run, where the run touched it.
        let mut hub_after: Vec<(RelPath, Option<Version>)> = Vec::new();
        for (ii, item) in plan.items.iter().enumerate() {
            if item.actions.iter().any(|&(r, _)| r == HUB)
                && ok(ii, HUB)
                && let Some(v) = result_of(ii)
            {
                hub_after.push((item.path.clone(), v));
            }
        }
        let cache_after = |p: &RelPath| -> Option<&Version> {
            match hub_after.binary_search_by(|e| e.0.cmp(p)) {
                Ok(i) => hub_after[i].1.as_ref(),
                Err(_) => snap.get(p).map(|e| &e.version),
            }
        };
        let item_paths: Vec<&RelPath> = plan.items.iter().map(|i| &i.path).collect();
        let mut waiting = Vec::new();
        let records: Vec<Option<PairRecord>> = self.reps.iter().map(|r| r.agreed.clone()).collect();
        for (i, known) in records.iter().enumerate().skip(1) {
            let rep = &self.reps[i];
            let Some(path) = rep.pair_path.clone() else {
                continue;
            };
            let known = known.as_ref();
            if !rep.taking_part() {
                // Not synced this run: its agreed state stands, rewritten against
                // the hub's new cache.
                if let Some(rec) = known {
                    let touched = sorted_union(vec![
                        Box::new(rec.diff.iter().map(|e| &e.0)),
                        Box::new(snap.changes.iter().map(|e| &e.0)),
                        Box::new(item_paths.iter().copied()),
                    ]);
                    let diff = agreed::rebase(
                        touched,
                        |p| agreed::lookup(&rec.diff, &old, p).cloned(),
                        cache_after,
                    );
                    self.records.push((
                        path,
                        PairRecord {
                            diff,
                            ..rec.clone()
                        },
                    ));
                }
                continue;
            }
            let updates: Vec<(RelPath, Option<Version>)> = plan
                .items
                .iter()
                .enumerate()
                .filter(|(ii, item)| item.agree.contains(&i) && ok(*ii, HUB) && ok(*ii, i))
                .filter_map(|(ii, item)| result_of(ii).map(|v| (item.path.clone(), v)))
                .collect();
            let find_update = |p: &RelPath| {
                updates
                    .binary_search_by(|e| e.0.cmp(p))
                    .ok()
                    .map(|k| updates[k].1.clone())
            };
            let agreed_after = |p: &RelPath| -> Option<Version> {
                match find_update(p) {
                    Some(v) => v,
                    None => known.and_then(|r| agreed::lookup(&r.diff, &old, p).cloned()),
                }
            };
            let replica = rep.opened.as_ref().map(|o| o.replica);
            let shared = rep.shared && known.is_some();
            let mut lists: Vec<Box<dyn Iterator<Item = &RelPath> + '_>> = vec![
                Box::new(snap.changes.iter().map(|e| &e.0)),
                Box::new(item_paths.iter().copied()),
                Box::new(updates.iter().map(|e| &e.0)),
            ];
            if let Some(rec) = known {
                lists.push(Box::new(rec.diff.iter().map(|e| &e.0)));
            }
            if !shared {
                lists.push(Box::new(snap.entries.iter().map(|e| &e.path)));
            }
            let touched = sorted_union(lists);
            let files = agreed::count_files(
                known.map_or(0, |r| r.files),
                updates.iter().map(|(p, after)| {
                    (
                        known.and_then(|r| agreed::lookup(&r.diff, &old, p)),
                        after.as_ref(),
                    )
                }),
            );
            let diff = agreed::rebase(touched.iter().copied(), agreed_after, cache_after);
            if updates.is_empty() && shared {
                // Nothing newly agreed; only a new cache to be relative to.
                let rec = known.expect("shared implies a record");
                self.records.push((
                    path,
                    PairRecord {
                        diff,
                        ..rec.clone()
                    },
                ));
                continue;
            }
            let token = Token::new();
            let rep = &mut self.reps[i];
            if shared {
                send_commit(rep, updates, token, false);
            } else {
                // The peer cannot apply changes to a state it does not share: it gets
                // the whole agreed state.
                let all: Vec<(RelPath, Option<Version>)> = match known {
                    None => updates.into_iter().filter(|e| e.1.is_some()).collect(),
                    Some(rec) => sorted_union(vec![
                        Box::new(snap.entries.iter().map(|e| &e.path)),
                        Box::new(snap.changes.iter().map(|e| &e.0)),
                        Box::new(rec.diff.iter().map(|e| &e.0)),
                        Box::new(updates.iter().map(|e| &e.0)),
                    ])
                    .into_iter()
                    .filter_map(|p| agreed_after(p).map(|v| (p.clone(), Some(v))))
                    .collect(),
                };
                send_commit(rep, all, token, true);
            }
            rep.pending += 1;
            waiting.push((
                i,
                path,
                PairRecord {
                    peer_replica: replica,
                    token,
                    base: 0,
                    files,
                    diff,
                },
            ));
        }
        let ids: Vec<usize> = waiting.iter().map(|w| w.0).collect();
        self.pump(|run| {
            ids.iter().all(|&i| {
                !run.reps[i].conn.alive || run.exec.as_ref().is_some_and(|e| e.committed[i])
            })
        });
        for (i, path, rec) in waiting {
            if self.exec.as_ref().is_some_and(|e| e.committed[i]) {
                self.records.push((path, rec));
            } else if let Some(old_rec) = &self.reps[i].agreed {
                // The peer did not confirm: keep what we agreed before (rewritten
                // against the new cache), so that nothing is taken as agreed twice.
                let touched = sorted_union(vec![
                    Box::new(old_rec.diff.iter().map(|e| &e.0)),
                    Box::new(snap.changes.iter().map(|e| &e.0)),
                    Box::new(item_paths.iter().copied()),
                ]);
                let diff = agreed::rebase(
                    touched,
                    |p| agreed::lookup(&old_rec.diff, &old, p).cloned(),
                    cache_after,
                );
                self.records.push((
                    path,
                    PairRecord {
                        diff,
                        ..old_rec.clone()
                    },
                ));
            }
        }
        self.exec = None;
    }
}

/// A merge that cannot be made this run: its destinations keep their versions.
fn fail_merge(ex: &mut Exec, j: usize, why: OpError) {
    if ex.merges[j].done {
        return;
    }
    ex.merges[j].done = true;
    for d in ex.merges[j].dests.clone() {
        finish_task(ex, d, Err(why.clone()));
    }
}

/// A transfer needs nothing more from its source (finished or given up).
fn mark_done(ex: &mut Exec, tr: usize) {
    ex.transfers[tr].done = true;
    if ex.transfers[tr].started
        && let Some(pos) = ex.active.iter().position(|&a| a == tr)
    {
        ex.active.swap_remove(pos);
    }
}

fn finish_task(ex: &mut Exec, t: usize, result: Result<(), OpError>) {
    let task = &mut ex.tasks[t];
    if task.outcome.is_some() {
        return;
    }
    task.outcome = Some(result);
    ex.remaining -= 1;
    if task.phase < 3 {
        ex.earlier_left[task.replica] -= 1;
    }
}

fn send_commit(
    rep: &mut super::Rep,
    changes: Vec<(RelPath, Option<Version>)>,
    token: Token,
    reset: bool,
) {
    let mut chunks = changes.chunks(COMMIT_CHUNK).peekable();
    if chunks.peek().is_none() {
        rep.conn.send(Request::Commit {
            changes: Vec::new(),
            token: Some(token),
            reset,
        });
        return;
    }
    let mut first = true;
    while let Some(c) = chunks.next() {
        let last = chunks.peek().is_none();
        rep.conn.send(Request::Commit {
            changes: c.to_vec(),
            token: last.then_some(token),
            reset: reset && first,
        });
        first = false;
    }
}
