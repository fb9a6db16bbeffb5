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

/// Bytes requested from sources and not yet handed to destinations' pipes (more
/// does not move data faster here, and it is memory held at the run's peak).
const IN_FLIGHT: u64 = 1 << 20;
/// Files being received by destinations at once.
const MAX_ACTIVE: usize = 128;
/// Answers a destination may owe before no new transfer starts for it (more than
/// a receiver's install batch, so that it never waits on us for a full one).
const MAX_OWED: usize = 8192;
/// Outstanding chunk requests per file.
const READ_AHEAD: usize = 4;
/// Agreed-state changes per commit frame.
const COMMIT_CHUNK: usize = 4096;
/// Commit frames queued for one peer, at most (in `queued_cost` units).
const COMMIT_QUEUED: u64 = 1 << 20;

struct Task {
    /// Small fields (see `item()`, `replica()`): a first sync has a task per file.
    item: u32,
    replica: u8,
    action: Action,
    phase: u8,
    /// Install order (see `Run::rank_of`); a grouped file takes its leader's.
    rank: u8,
    id: u32,
    /// A file whose bytes arrive later (its operation is sent with the transfer).
    put_file: bool,
    sent: bool,
    /// Counted in the replica's `pending` (it owes us an answer for it).
    counted: bool,
    outcome: Outcome,
}

impl Task {
    fn item(&self) -> usize {
        self.item as usize
    }

    fn replica(&self) -> usize {
        usize::from(self.replica)
    }
}

/// How a task ended; the errors live in `Exec::errors` (tasks are many and mostly
/// succeed, so each stays small).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Pending,
    Ok,
    Failed(u32),
}

struct Transfer {
    item: usize,
    source: usize,
    size: u64,
    next: u64,
    received: u64,
    outstanding: usize,
    dests: smallvec::SmallVec<[usize; 2]>,
    started: bool,
    done: bool,
}

/// A transfer not started yet. A first sync queues one per file, so it is kept
/// small: its destinations are found again among the item's tasks, which are
/// consecutive from `first_task`.
#[derive(Clone, Copy)]
struct Queued {
    item: u32,
    first_task: u32,
    source: u32,
}

impl Exec {
    fn queued_dests(&self, q: Queued) -> smallvec::SmallVec<[usize; 2]> {
        let item = q.item as usize;
        (q.first_task as usize..self.tasks.len())
            .take_while(|&t| self.tasks[t].item() == item)
            .filter(|&t| self.tasks[t].put_file)
            .collect()
    }

    fn queued_size(&self, q: Queued) -> u64 {
        self.plan.items[q.item as usize]
            .result
            .as_ref()
            .map_or(0, |v| v.size())
    }
}

/// A merge: read every input version, unite their lines, send the result.
struct MergeJob {
    item: usize,
    rank: u8,
    started: bool,
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
    /// Transfers not started yet; started ones live in `transfers`, whose slots are
    /// reused once a transfer is done and no read for it is outstanding (so memory
    /// follows the transfers in flight, not the size of the plan).
    queue: VecDeque<Queued>,
    free: Vec<usize>,
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
    /// The plan being carried out.
    plan: std::sync::Arc<Plan>,
    merges: Vec<MergeJob>,
    /// The results of merges that were computed, by item.
    merged: HashMap<usize, crate::version::Version>,
    /// Why tasks failed (`Outcome::Failed` indexes it).
    errors: Vec<OpError>,
    /// File tasks not finished, by rank: a rank starts once those before it are done.
    rank_left: [usize; 3],
    /// Install groups (a page and its changelog on one replica) and, per task, its
    /// group and place in it.
    groups: Vec<GroupRun>,
    task_group: HashMap<usize, (usize, u32)>,
    /// Grouped tasks already sent whole or failed (counted once).
    group_resolved: std::collections::HashSet<usize>,
    /// Groups whose members are all resolved: `GroupEnd` is due.
    group_ends: Vec<usize>,
    /// `MAX_OWED`, or smaller for tests (`HUBSYNC_TEST_MAX_OWED`).
    max_owed: usize,
}

/// One install group on one replica.
struct GroupRun {
    replica: usize,
    id: u32,
    lock: Option<crate::proto::IoLock>,
    tasks: Vec<usize>,
    planned: u32,
    resolved: u32,
    sent: u32,
    complete: bool,
}

/// What execution did: per plan item, which replicas carried out their action
/// successfully, and the results of merges (known only once they ran).
#[derive(Default)]
pub(super) struct Outcomes {
    /// (item, replica) of every action that did not succeed.
    pub failed: std::collections::HashSet<(usize, usize)>,
    pub merged: HashMap<usize, crate::version::Version>,
}

/// Merged files are built in memory: larger ones are left to the next run.
const MAX_MERGE: u64 = 64 << 20;

impl Run<'_> {
    /// Executes `plan`; returns per item which replicas succeeded.
    pub(super) fn execute(&mut self, plan: &std::sync::Arc<Plan>) -> Outcomes {
        let n = self.reps.len();
        let mut ex = Exec {
            later: vec![Vec::new(); n],
            earlier_left: vec![0; n],
            committed: vec![false; n],
            plan: plan.clone(),
            max_owed: std::env::var("HUBSYNC_TEST_MAX_OWED")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(MAX_OWED),
            ..Default::default()
        };
        for (ii, item) in plan.items.iter().enumerate() {
            let mut file_dests = Vec::new();
            for (r, action) in &item.actions {
                if !self.reps[r].taking_part() {
                    continue;
                }
                let (phase, put_file) = match (&item.result, action) {
                    (None, _) => (0, false),
                    (Some(v), Action::SetMeta) => (if v.is_dir() { 3 } else { 2 }, false),
                    (Some(v), _) => match v.kind {
                        Kind::Dir => (1, false),
                        Kind::Symlink { .. } => (2, false),
                        Kind::File { .. } => {
                            file_dests.push(ex.tasks.len());
                            (2, true)
                        }
                    },
                };
                let id = self.reps[r].conn.next_id();
                if phase < 3 {
                    ex.earlier_left[r] += 1;
                }
                ex.remaining += 1;
                ex.tasks.push(Task {
                    // Both fit: items are counted like `Queued`'s, and replicas are
                    // fewer than MAX_REPLICAS (64), which the settings enforce.
                    item: ii as u32,
                    replica: r as u8,
                    action,
                    phase,
                    rank: 1,
                    id,
                    put_file,
                    sent: false,
                    outcome: Outcome::Pending,
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
                        rank: 1,
                        started: false,
                        inputs: item.merge.to_vec(),
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
                match item.source().filter(|&s| self.reps[s].taking_part()) {
                    Some(source) => {
                        ex.queue.push_back(Queued {
                            item: ii as u32,
                            first_task: file_dests[0] as u32,
                            source: source as u32,
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
        self.plan_groups_and_ranks(&mut ex);
        // Immediate operations, in the order that keeps each tree valid.
        let mut order: Vec<usize> = (0..ex.tasks.len())
            .filter(|&t| ex.tasks[t].outcome == Outcome::Pending && !ex.tasks[t].put_file)
            .collect();
        order.sort_by(|&a, &b| {
            let (x, y) = (&ex.tasks[a], &ex.tasks[b]);
            let (px, py) = (&plan.items[x.item()].path, &plan.items[y.item()].path);
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
                ex.later[ex.tasks[t].replica()].push(t);
            } else {
                self.send_task(&mut ex, t);
            }
        }
        ex.progress = self.progress_bar(&ex);
        self.exec = Some(ex);
        loop {
            self.reap();
            self.start_merges(plan);
            self.start_transfers(plan);
            self.send_later();
            self.send_group_ends();
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
        let outcomes = Outcomes {
            failed: (ex.tasks.iter())
                .filter(|t| t.outcome != Outcome::Ok)
                .map(|t| (t.item(), t.replica()))
                .collect(),
            merged: ex.merged.clone(),
        };
        self.exec = Some(Exec {
            committed: ex.committed,
            ..Default::default()
        });
        outcomes
    }

    /// Decides each file task's install rank and install group: a bundle's leader
    /// and the files installed with it, on one replica, form a group when more
    /// than one of them changes there. Then orders the transfer queue by rank and
    /// keeps a group's members next to each other.
    fn plan_groups_and_ranks(&self, ex: &mut Exec) {
        let plan = ex.plan.clone();
        // (replica, leader) -> [(task, position)]
        let mut members: std::collections::BTreeMap<(usize, RelPath), Vec<(usize, u32)>> =
            Default::default();
        let mut locks: HashMap<RelPath, Option<crate::proto::IoLock>> = HashMap::new();
        for t in 0..ex.tasks.len() {
            let task = &ex.tasks[t];
            let item = &plan.items[task.item()];
            // A file installed with its leader takes the leader's rank (a group
            // never waits for a rank that waits for it).
            let anchor = self
                .s
                .bundles
                .iter()
                .find_map(|b| b.together_with(&item.path));
            ex.tasks[t].rank = self.rank_of(anchor.as_ref().map_or(&item.path, |a| &a.0));
            let task = &ex.tasks[t];
            let groupable = task.outcome == Outcome::Pending
                && (task.put_file
                    || matches!(task.action, Action::Remove | Action::KeepAndRemove)
                        && item.result.is_none());
            if !groupable {
                continue;
            }
            for b in &self.s.bundles {
                let place = b.together_with(&item.path).or_else(|| {
                    b.leader_id(&item.path)
                        .map(|_| (item.path.clone(), b.together.len()))
                });
                if let Some((leader, pos)) = place {
                    locks.entry(leader.clone()).or_insert_with(|| {
                        b.lock_dir.clone().map(|dir| crate::proto::IoLock {
                            dir,
                            of: leader.clone(),
                        })
                    });
                    members
                        .entry((task.replica(), leader))
                        .or_default()
                        .push((t, pos as u32));
                    break;
                }
            }
        }
        for ((replica, leader), list) in members {
            if list.len() < 2 {
                continue;
            }
            let g = ex.groups.len();
            ex.groups.push(GroupRun {
                replica,
                id: g as u32,
                lock: locks.get(&leader).cloned().flatten(),
                tasks: list.iter().map(|&(t, _)| t).collect(),
                planned: list.len() as u32,
                resolved: 0,
                sent: 0,
                complete: true,
            });
            for (t, pos) in list {
                ex.task_group.insert(t, (g, pos));
            }
        }
        for t in &ex.tasks {
            if t.put_file && t.outcome == Outcome::Pending {
                ex.rank_left[t.rank as usize] += 1;
            }
        }
        for m in &mut ex.merges {
            m.rank = m.dests.first().map_or(1, |&d| ex.tasks[d].rank);
        }
        // Rank first; then a group's members together, leader last; else path order,
        // which the queue is in already (the plan's). Without bundles a stable sort
        // by rank is all it takes, in place: a first sync queues every file.
        let mut queue = std::mem::take(&mut ex.queue);
        let rank = |q: &Queued| ex.tasks[q.first_task as usize].rank;
        if self.s.bundles.is_empty() {
            queue.make_contiguous().sort_by_key(rank);
        } else {
            use std::borrow::Cow;
            let key = |q: &Queued| {
                let path = &plan.items[q.item as usize].path;
                let (anchor, pos) = match self.s.bundles.iter().find_map(|b| b.together_with(path))
                {
                    Some((leader, pos)) => (Cow::Owned(leader), pos as u32),
                    None => (Cow::Borrowed(path), u32::MAX),
                };
                (rank(q), anchor, pos)
            };
            let mut keyed: Vec<(_, Queued)> = queue.drain(..).map(|q| (key(&q), q)).collect();
            keyed.sort_by(|a, b| a.0.cmp(&b.0));
            queue.extend(keyed.into_iter().map(|(_, q)| q));
        }
        ex.queue = queue;
    }

    /// Starts the merges whose rank is open.
    fn start_merges(&mut self, plan: &Plan) {
        let Some(mut ex) = self.exec.take() else {
            return;
        };
        for j in 0..ex.merges.len() {
            if !ex.merges[j].started && ex.rank_open(ex.merges[j].rank) {
                ex.merges[j].started = true;
                self.start_merge(&mut ex, plan, j);
            }
        }
        self.exec = Some(ex);
    }

    /// Tells each replica which of its install groups are complete.
    fn send_group_ends(&mut self) {
        let Some(mut ex) = self.exec.take() else {
            return;
        };
        for g in std::mem::take(&mut ex.group_ends) {
            let group = &ex.groups[g];
            let r = group.replica;
            self.reps[r].conn.send(Request::GroupEnd {
                group: group.id,
                members: group.sent,
                complete: group.complete,
            });
            // Now it owes an answer for every member it has.
            for &t in &ex.groups[g].tasks {
                if ex.tasks[t].sent && ex.tasks[t].outcome == Outcome::Pending {
                    ex.tasks[t].counted = true;
                    self.reps[r].pending += 1;
                }
            }
        }
        self.exec = Some(ex);
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
        let path = ex.plan.items[m.item].path.clone();
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
            if ex.tasks[d].outcome != Outcome::Pending {
                continue;
            }
            self.send_task(ex, d);
            let (r, id) = (ex.tasks[d].replica(), ex.tasks[d].id);
            for chunk in bytes.chunks(CHUNK) {
                self.reps[r].conn.send(Request::Data {
                    id,
                    bytes: chunk.to_vec(),
                });
            }
            self.reps[r].conn.send(Request::End { id });
            self.owe_answer(ex, d);
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
        // Sizes are what peers claim: saturate rather than overflow.
        let total: u64 = (ex.queue.iter())
            .map(|&q| {
                ex.queued_size(q)
                    .saturating_mul(ex.queued_dests(q).len() as u64)
            })
            .fold(0, u64::saturating_add);
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

    /// The operation a task sends: built when it is sent, from its plan item.
    fn op_for(&self, ex: &Exec, t: usize) -> Op {
        let task = &ex.tasks[t];
        let item = &ex.plan.items[task.item()];
        let path = item.path.clone();
        let keep = matches!(task.action, Action::KeepAndReplace | Action::KeepAndRemove)
            .then(|| self.keep_suffix(task.replica()));
        let expect = if task.action == Action::Create {
            Expect::Absent
        } else {
            Expect::Scanned
        };
        let version = ex
            .merged
            .get(&task.item())
            .or(item.result.as_ref())
            .cloned();
        let group = ex
            .task_group
            .get(&t)
            .map(|&(g, position)| crate::proto::GroupTag {
                group: ex.groups[g].id,
                position,
                lock: ex.groups[g].lock.clone(),
            });
        match (version, task.action) {
            (None, _) => Op::Remove { path, keep, group },
            (Some(version), Action::SetMeta) => Op::SetMeta { path, version },
            (Some(version), _) => match version.kind {
                Kind::Dir => Op::Mkdir {
                    path,
                    version,
                    expect,
                    keep,
                },
                Kind::Symlink { .. } => Op::PutSymlink {
                    path,
                    version,
                    expect,
                    keep,
                },
                Kind::File { .. } => Op::PutFile {
                    path,
                    version,
                    expect,
                    keep,
                    group,
                },
            },
        }
    }

    fn send_task(&mut self, ex: &mut Exec, t: usize) {
        let op = self.op_for(ex, t);
        let task = &mut ex.tasks[t];
        debug_assert!(!task.sent, "sent once");
        task.sent = true;
        let rep = &mut self.reps[task.replica()];
        let grouped = ex.task_group.contains_key(&t);
        // A file being received owes us nothing until we have sent all of it, nor
        // a group member until its whole group was sent.
        let whole = !matches!(op, Op::PutFile { .. });
        if whole && !grouped {
            task.counted = true;
            rep.pending += 1;
        }
        rep.conn.send(Request::Op { id: task.id, op });
        ex.by_id.insert((task.replica(), task.id), Waiting::Task(t));
        if whole {
            resolve_member(ex, t, true);
        }
    }

    /// All of task `t`'s data was sent: from now on the replica owes us its answer
    /// (a group member's, once the group is complete).
    fn owe_answer(&mut self, ex: &mut Exec, t: usize) {
        // Counted, a destination that never answers is noticed and dropped.
        if !ex.task_group.contains_key(&t) && !ex.tasks[t].counted {
            ex.tasks[t].counted = true;
            self.reps[ex.tasks[t].replica()].pending += 1;
        }
        resolve_member(ex, t, true);
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
            // Nor will the answers a dead replica owed. A read gives its share of the
            // in-flight budget back only when answered: without this, a source that
            // died mid-transfer kept the budget forever, no queued transfer could
            // start, and the run waited on nobody, past every timeout.
            let owed: Vec<(usize, u32)> = (ex.by_id.keys())
                .filter(|(r, _)| !self.reps[*r].conn.alive)
                .copied()
                .collect();
            for key in owed {
                match ex.by_id.remove(&key) {
                    Some(Waiting::Read { transfer, len }) => {
                        ex.in_flight = ex.in_flight.saturating_sub(len);
                        ex.transfers[transfer].outstanding -= 1;
                        release(&mut ex, transfer);
                    }
                    Some(Waiting::MergeRead { job, .. }) => ex.merges[job].outstanding -= 1,
                    Some(Waiting::Task(_)) | None => {}
                }
            }
            for t in 0..ex.tasks.len() {
                let r = ex.tasks[t].replica();
                if ex.tasks[t].outcome == Outcome::Pending && !self.reps[r].conn.alive {
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
            // Queued transfers from a dead source fail without starting.
            let queued = std::mem::take(&mut ex.queue);
            for q in queued {
                if self.reps[q.source as usize].conn.alive {
                    ex.queue.push_back(q);
                } else {
                    for d in ex.queued_dests(q) {
                        finish_task(
                            &mut ex,
                            d,
                            Err(OpError::Io("its source replica failed".into())),
                        );
                    }
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
                } else if x
                    .dests
                    .iter()
                    .all(|&d| ex.tasks[d].outcome != Outcome::Pending)
                {
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
            let Some(&front) = ex.queue.front() else {
                break;
            };
            if !ex.rank_open(ex.tasks[front.first_task as usize].rank) {
                break;
            }
            // A destination that owes this many answers waits: past its pipe, a slow
            // link holds thousands of small files, and every one is a waiting entry.
            let owing = |d: usize| {
                let rep = &self.reps[ex.tasks[d].replica()];
                ex.tasks[d].outcome == Outcome::Pending
                    && rep.conn.alive
                    && rep.pending >= ex.max_owed
            };
            if ex.queued_dests(front).into_iter().any(owing) {
                break;
            }
            let Some(q) = ex.queue.pop_front() else {
                break;
            };
            let dests = ex.queued_dests(q);
            if dests
                .iter()
                .all(|&d| ex.tasks[d].outcome != Outcome::Pending)
            {
                continue; // nobody needs it any more
            }
            let x = Transfer {
                item: q.item as usize,
                source: q.source as usize,
                size: ex.queued_size(q),
                next: 0,
                received: 0,
                outstanding: 0,
                dests,
                started: true,
                done: false,
            };
            let tr = match ex.free.pop() {
                Some(slot) => {
                    ex.transfers[slot] = x;
                    slot
                }
                None => {
                    ex.transfers.push(x);
                    ex.transfers.len() - 1
                }
            };
            ex.active.push(tr);
            let dests = ex.transfers[tr].dests.clone();
            for d in dests {
                if ex.tasks[d].outcome == Outcome::Pending {
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
        for d in ex.transfers[tr].dests.clone() {
            if ex.tasks[d].outcome == Outcome::Pending {
                let task = &ex.tasks[d];
                self.reps[task.replica()]
                    .conn
                    .send(Request::End { id: task.id });
                self.owe_answer(ex, d);
            }
        }
    }

    fn abort_transfer(&mut self, ex: &mut Exec, tr: usize, why: OpError) {
        if ex.transfers[tr].done {
            return;
        }
        mark_done(ex, tr);
        for d in ex.transfers[tr].dests.clone() {
            if ex.tasks[d].outcome == Outcome::Pending {
                let (r, id) = (ex.tasks[d].replica(), ex.tasks[d].id);
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
                    release(&mut ex, transfer);
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
                    if (bytes.len() as u64) != len {
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
                        release(&mut ex, tr);
                    } else if (bytes.len() as u64) != len {
                        // The file shrank since it was scanned (or the source
                        // sent more than asked, which would never end).
                        self.abort_transfer(&mut ex, tr, OpError::SourceChanged);
                    } else {
                        ex.transfers[tr].received += bytes.len() as u64;
                        let dests: Vec<usize> = ex.transfers[tr]
                            .dests
                            .iter()
                            .copied()
                            .filter(|&d| ex.tasks[d].outcome == Outcome::Pending)
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
                            self.reps[task.replica()].queued += data.len() as u64;
                            self.reps[task.replica()].conn.send(Request::Data {
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
            let item = &plan.items[t.item()];
            let label = &self.reps[t.replica()].conn.label;
            let alive = self.reps[t.replica()].conn.alive;
            let outcome = match t.outcome {
                Outcome::Pending => None,
                Outcome::Ok => Some(Ok(())),
                Outcome::Failed(k) => Some(Err(&ex.errors[k as usize])),
            };
            match outcome {
                Some(Ok(())) => {
                    let size = item.result.as_ref().map_or(0, |v| v.size());
                    let rep = &mut self.reps[t.replica()];
                    match t.action {
                        Action::Remove | Action::KeepAndRemove => rep.report.removed += 1,
                        Action::SetMeta => rep.report.metadata += 1,
                        Action::KeepAndReplace | Action::Create | Action::Replace => {
                            // Directories are counted by the files they bring.
                            if !item.result.as_ref().is_some_and(|v| v.is_dir()) {
                                rep.report.files_in += 1;
                                rep.report.bytes_in = rep.report.bytes_in.saturating_add(size);
                                if let Some(src) = item.source() {
                                    let src = &mut self.reps[src].report;
                                    src.files_out += 1;
                                    src.bytes_out = src.bytes_out.saturating_add(size);
                                }
                            }
                        }
                    }
                    if self.report.keep_actions {
                        self.report.actions.push(crate::report::Done {
                            replica: t.replica(),
                            action: t.action,
                            path: item.path.clone(),
                        });
                    }
                }
                Some(Err(e @ (&OpError::Changed | &OpError::SourceChanged))) => {
                    let line = format!("{label}: {}: {e}", item.path);
                    self.reps[t.replica()].report.deferred += 1;
                    self.report.warnings.push(line);
                }
                // What a failed source could not send is that source's failure,
                // reported once with it; the destination did nothing wrong, and the
                // path syncs on the next run.
                Some(Err(e))
                    if alive && item.source().is_some_and(|s| !self.reps[s].conn.alive) =>
                {
                    let line = format!("{label}: {}: {e}; it syncs next run", item.path);
                    self.reps[t.replica()].report.deferred += 1;
                    self.report.warnings.push(line);
                }
                // A replica that failed as a whole is reported once, not per path.
                Some(Err(e)) if alive => {
                    let line = format!("{label}: {}: {e}", item.path);
                    self.reps[t.replica()].report.failed_actions += 1;
                    self.report.errors.push(line);
                }
                Some(Err(_)) => {}
                None => {}
            }
        }
    }

    /// Sends each peer the changes to its agreed state, and prepares our own pair
    /// records (saved once the hub's scan cache is, since they are relative to it).
    pub(super) fn commit(&mut self, plan: &Plan, outcomes: &Outcomes) {
        let ok = |item: usize, r: usize| !outcomes.failed.contains(&(item, r));
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
            if item.actions.iter().any(|(r, _)| r == HUB)
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
            // Items (sorted by path, as the plan is) newly agreed with this peer.
            let updates: Vec<usize> = (0..plan.items.len())
                .filter(|&ii| plan.items[ii].agree.contains(i) && ok(ii, HUB) && ok(ii, i))
                .filter(|&ii| result_of(ii).is_some())
                .collect();
            let update_path = |k: usize| &plan.items[updates[k]].path;
            let update_value = |k: usize| result_of(updates[k]).flatten();
            let find_update = |p: &RelPath| {
                updates
                    .binary_search_by(|&ii| plan.items[ii].path.cmp(p))
                    .ok()
                    .map(update_value)
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
                Box::new((0..updates.len()).map(update_path)),
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
                (0..updates.len()).map(|k| {
                    let p = update_path(k);
                    let after = match &plan.items[updates[k]].reason {
                        Reason::Merged { .. } => outcomes.merged.get(&updates[k]),
                        _ => plan.items[updates[k]].result.as_ref(),
                    };
                    (known.and_then(|r| agreed::lookup(&r.diff, &old, p)), after)
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
            if shared {
                self.send_commit(
                    i,
                    (0..updates.len()).map(|k| (update_path(k).clone(), update_value(k))),
                    token,
                    false,
                );
            } else {
                // The peer cannot apply changes to a state it does not share: it gets
                // the whole agreed state.
                match known {
                    None => self.send_commit(
                        i,
                        (0..updates.len())
                            .filter_map(|k| Some((update_path(k).clone(), Some(update_value(k)?)))),
                        token,
                        true,
                    ),
                    Some(rec) => {
                        let all = sorted_union(vec![
                            Box::new(snap.entries.iter().map(|e| &e.path)),
                            Box::new(snap.changes.iter().map(|e| &e.0)),
                            Box::new(rec.diff.iter().map(|e| &e.0)),
                            Box::new((0..updates.len()).map(update_path)),
                        ]);
                        self.send_commit(
                            i,
                            all.into_iter()
                                .filter_map(|p| agreed_after(p).map(|v| (p.clone(), Some(v)))),
                            token,
                            true,
                        );
                    }
                }
            }
            self.reps[i].pending += 1;
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

impl Run<'_> {
    /// Sends peer `i` its agreed-state changes in frames, waiting while much is
    /// queued for it: a first sync commits every file, and building every frame at
    /// once would hold a second copy of the whole state.
    fn send_commit(
        &mut self,
        i: usize,
        changes: impl Iterator<Item = (RelPath, Option<Version>)>,
        token: Token,
        reset: bool,
    ) {
        let mut changes = changes.peekable();
        let mut first = true;
        loop {
            let chunk: Vec<_> = changes.by_ref().take(COMMIT_CHUNK).collect();
            let last = changes.peek().is_none();
            let req = Request::Commit {
                changes: chunk,
                token: last.then_some(token),
                reset: reset && first,
            };
            self.reps[i].queued += super::conn::queued_cost(&req);
            self.reps[i].conn.send(req);
            first = false;
            if last {
                return;
            }
            self.pump(|run| !run.reps[i].conn.alive || run.reps[i].queued <= COMMIT_QUEUED);
        }
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
    release(ex, tr);
}

/// Frees a done transfer's slot once no read for it is outstanding.
fn release(ex: &mut Exec, tr: usize) {
    let x = &mut ex.transfers[tr];
    if x.done && x.outstanding == 0 && x.started {
        x.started = false; // a free slot
        ex.free.push(tr);
    }
}

fn finish_task(ex: &mut Exec, t: usize, result: Result<(), OpError>) {
    if ex.tasks[t].outcome != Outcome::Pending {
        return;
    }
    let outcome = match result {
        Ok(()) => Outcome::Ok,
        Err(e) => {
            ex.errors.push(e);
            Outcome::Failed(ex.errors.len() as u32 - 1)
        }
    };
    let task = &mut ex.tasks[t];
    task.outcome = outcome;
    if task.put_file {
        // Tasks that fail before ranks are counted were never counted.
        let left = &mut ex.rank_left[task.rank as usize];
        *left = left.saturating_sub(1);
    }
    ex.remaining -= 1;
    if task.phase < 3 {
        ex.earlier_left[task.replica()] -= 1;
    }
    resolve_member(ex, t, outcome == Outcome::Ok);
}

/// A grouped task was sent whole (`ok`) or will not be: once every member of its
/// group is one or the other, the group's `GroupEnd` is due.
fn resolve_member(ex: &mut Exec, t: usize, ok: bool) {
    let Some(&(g, _)) = ex.task_group.get(&t) else {
        return;
    };
    if !ex.group_resolved.insert(t) {
        return;
    }
    let group = &mut ex.groups[g];
    group.resolved += 1;
    if ok {
        group.sent += 1;
    } else {
        group.complete = false;
    }
    if group.resolved == group.planned {
        ex.group_ends.push(g);
    }
}

impl Exec {
    /// Whether files of `rank` may start: every file of an earlier rank is done.
    fn rank_open(&self, rank: u8) -> bool {
        self.rank_left[..rank as usize].iter().all(|&n| n == 0)
    }
}
