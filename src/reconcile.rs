//! Reconciliation: from the scans of all replicas and each pair's agreed state, the
//! plan. Pure: no I/O, no clock, deterministic output order.
//!
//! For each path (see `../shared/notes/reconcile.md` for the model):
//! 1. A peer *changed* the path when its version differs from its pair's agreed state
//!    (with no agreed state, being present counts as a change and being absent does
//!    not, so nothing is ever deleted without an agreed state to prove it).
//! 2. Nobody changed it: the hub's version stands (peers that missed a run catch up).
//! 3. Otherwise the candidates are the changed peers' versions, plus the hub's if the
//!    hub changed it relative to one of them. Equal candidates collapse; one left wins.
//! 4. Several left is a conflict: present beats absent, then newest mtime, then the
//!    greater content hash. A replica whose own change lost keeps it as a conflict copy,
//!    and so does every replica that holds a copy of a losing version.
//!
//! Directories follow their contents: a directory stays (or becomes one again) while
//! anything below it is present, and anything whose state is unknown on some replica
//! (being written, unreadable) pins its ancestors so that nothing is removed above it.
//! The walk keeps a stack of open ancestors and settles each path once everything
//! below it has been seen, which the depth-first order of `RelPath` makes possible in
//! one pass.

use smallvec::SmallVec;

use crate::agreed::{OldCache, lookup, sorted_union};
use crate::archive::CacheEntry;
use crate::plan::{Action, Actions, HUB, Item, Plan, Reason, Replicas, Rule};
use crate::relpath::RelPath;
use crate::version::{Entry, Kind, State, Version};

/// A peer's scan as the hub received it.
#[derive(Clone, Copy, Debug)]
pub enum View<'a> {
    /// Every present path.
    Full(&'a [Entry]),
    /// Only paths that differ from the pair's agreed state (which must be given).
    Delta(&'a [Entry]),
}

/// One peer's contribution.
#[derive(Clone, Copy, Debug)]
pub struct PeerInput<'a> {
    /// `None`: the peer does not take part in this run (unreachable or refused).
    pub view: Option<View<'a>>,
    /// The pair's agreed state, as where it differs from the hub's cache before this
    /// run's scan (see `agreed.rs`); `None`: no agreed state (first sync, lost or
    /// corrupt state).
    pub agreed: Option<&'a [(RelPath, Option<Version>)]>,
    /// The peer's clock agrees with the hub's well enough to compare mtimes: if not,
    /// conflicts that newest-mtime would decide are left alone for it.
    pub clock_ok: bool,
}

/// The hub's side: its new scan and how it differs from the cache it replaces.
#[derive(Clone, Copy, Debug)]
pub struct Hub<'a> {
    /// Present paths, sorted.
    pub current: &'a [CacheEntry],
    /// Paths left alone this run (being written, unreadable), sorted.
    pub skipped: &'a [(RelPath, String)],
    /// Paths where `current` differs from the previous cache, with what it held.
    pub changes: &'a [(RelPath, Option<Version>)],
}

/// Everything reconciliation looks at.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    pub hub: Hub<'a>,
    pub peers: Vec<PeerInput<'a>>,
    /// Files whose conflicting versions are merged (their lines united) instead of
    /// one winning: append-only logs.
    pub mergeable: Option<&'a globset::GlobSet>,
    /// Files that follow a leader: when several replicas changed one differently,
    /// the replica whose leader changed last wins it.
    pub bundles: &'a [crate::rules::Bundle],
}

/// A replica's state at one path, borrowed from the input.
#[derive(Clone, Copy, Debug)]
enum St<'a> {
    Absent,
    Present(&'a Version),
    Skip(&'a str),
}

impl<'a> St<'a> {
    fn of(s: &'a State) -> St<'a> {
        match s {
            State::Absent => St::Absent,
            State::Present(v) => St::Present(v),
            State::Skip(w) => St::Skip(w),
        }
    }
    fn version(self) -> Option<&'a Version> {
        match self {
            St::Present(v) => Some(v),
            _ => None,
        }
    }
}

fn same(a: Option<&Version>, b: Option<&Version>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => a.same(b),
        _ => false,
    }
}

/// One path as every replica sees it.
struct Row<'a> {
    path: &'a RelPath,
    /// Index 0 is the hub; `None` for peers not taking part.
    states: SmallVec<[Option<St<'a>>; 4]>,
    /// Per peer (index 0 unused): `None` = no agreed state; `Some(None)` = agreed absent.
    agreed: SmallVec<[Option<Option<&'a Version>>; 4]>,
}

fn find<'a, T>(list: &'a [T], path: &RelPath, key: impl Fn(&T) -> &RelPath) -> Option<&'a T> {
    list.binary_search_by(|e| key(e).cmp(path))
        .ok()
        .map(|i| &list[i])
}

/// A path waiting on the ancestor stack until everything below it has been seen.
struct Open<'a> {
    path: &'a RelPath,
    /// `None`: everything already agrees (then `present` says whether it exists).
    decision: Option<Decision<'a>>,
    present: bool,
    /// Left alone this run, and so is everything below it.
    skipping: bool,
    present_below: bool,
    skip_below: bool,
}

/// A path that needs more than "everything already agrees".
struct Decision<'a> {
    row: Row<'a>,
    /// Replicas whose current version took part as a candidate (their own change).
    candidates: Vec<usize>,
    result: Option<Version>,
    reason: Reason,
    skip: Option<String>,
}

/// What `settle` needs to know beyond the stack.
struct Ctx<'a> {
    current: &'a [CacheEntry],
    /// Every path looked at, sorted; when `dense` is false, paths not in it are
    /// the same on every replica and in every agreed state.
    paths: &'a [&'a RelPath],
    dense: bool,
}

impl Ctx<'_> {
    /// Whether the hub (hence every replica) holds something below `path` that
    /// this run does not look at (sparse runs only).
    fn present_outside(&self, path: &RelPath) -> bool {
        if self.dense {
            return false;
        }
        let start = self.current.partition_point(|e| e.path <= *path);
        self.current[start..]
            .iter()
            .take_while(|e| path.is_ancestor_of(&e.path))
            .any(|e| self.paths.binary_search(&&e.path).is_err())
    }
}

/// Computes the plan. The result is deterministic for a given input.
///
/// Only paths that changed somewhere (or lack an agreed state) are looked at: the
/// hub's changes against its cache, each pair's differences from it, each peer's
/// delta, and, when some peer sent its whole tree or has no agreed state, every
/// path. A path outside that set holds the same version on every replica and in
/// every agreed state, so there is nothing to decide.
pub fn reconcile<'a>(input: &Input<'a>) -> Plan {
    let n = input.peers.len() + 1;
    let hub = input.hub;
    let old = OldCache {
        current: hub.current,
        changes: hub.changes,
    };
    let dense = input
        .peers
        .iter()
        .any(|p| p.view.is_some() && (p.agreed.is_none() || matches!(p.view, Some(View::Full(_)))));
    let mut lists: Vec<Box<dyn Iterator<Item = &'a RelPath> + 'a>> = vec![
        Box::new(hub.changes.iter().map(|e| &e.0)),
        Box::new(hub.skipped.iter().map(|e| &e.0)),
    ];
    for p in &input.peers {
        if let Some(a) = p.agreed {
            lists.push(Box::new(a.iter().map(|e| &e.0)));
        }
        if let Some(View::Full(v) | View::Delta(v)) = p.view {
            lists.push(Box::new(v.iter().map(|e| &e.path)));
        }
    }
    if dense {
        lists.push(Box::new(hub.current.iter().map(|e| &e.path)));
    }
    let paths = sorted_union(lists);
    let ctx = Ctx {
        current: hub.current,
        paths: &paths,
        dense,
    };

    let mut plan = Plan::default();
    let mut stack: Vec<Open<'a>> = Vec::new();
    let clock_ok: Vec<bool> = std::iter::once(true)
        .chain(input.peers.iter().map(|p| p.clock_ok))
        .collect();

    let make_row = |path: &'a RelPath| -> Row<'a> {
        let mut row = Row {
            path,
            states: SmallVec::with_capacity(n),
            agreed: SmallVec::with_capacity(n),
        };
        let hub_state = match find(hub.skipped, path, |e| &e.0) {
            Some((_, why)) => St::Skip(why),
            None => {
                find(hub.current, path, |e| &e.path).map_or(St::Absent, |e| St::Present(&e.version))
            }
        };
        row.states.push(Some(hub_state));
        row.agreed.push(None);
        for peer in &input.peers {
            let a = peer.agreed.map(|diff| lookup(diff, &old, path));
            row.agreed.push(a);
            row.states.push(peer.view.map(|v| match v {
                View::Full(list) => {
                    find(list, path, |e| &e.path).map_or(St::Absent, |e| St::of(&e.state))
                }
                View::Delta(list) => match find(list, path, |e| &e.path) {
                    Some(e) => St::of(&e.state),
                    None => a.flatten().map_or(St::Absent, St::Present),
                },
            }));
        }
        row
    };
    let winners = bundle_winners(input.bundles, &paths, &make_row, &clock_ok);

    for &path in &paths {
        let row = make_row(path);
        while stack.last().is_some_and(|o| !o.path.is_ancestor_of(path)) {
            settle(&mut stack, &mut plan, &ctx);
        }
        let present = row.states[HUB].and_then(St::version).is_some();
        let decision = if stack.last().is_some_and(|o| o.skipping) {
            Some(Decision {
                row,
                candidates: vec![],
                result: None,
                reason: Reason::CatchUp,
                skip: Some("a directory above it is left alone this run".into()),
            })
        } else {
            let merge = input.mergeable.is_some_and(|g| g.is_match(path.as_path()));
            let leader = if merge {
                None
            } else {
                winners.get(path).copied()
            };
            decide(row, &clock_ok, merge, leader)
        };
        let skipping = decision.as_ref().is_some_and(|d| d.skip.is_some());
        stack.push(Open {
            path,
            decision,
            present,
            skipping,
            present_below: false,
            skip_below: false,
        });
    }
    while !stack.is_empty() {
        settle(&mut stack, &mut plan, &ctx);
    }
    // Settling emits children before parents; present the plan in path order
    // (paths are unique, and an unstable sort needs no second copy of the items).
    plan.items.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    plan.skipped.sort_by(|a, b| a.0.cmp(&b.0));
    plan
}

/// Pops the top of the stack: applies what its descendants require, turns it into
/// an item, and passes what its parent needs to know up the stack.
fn settle(stack: &mut Vec<Open<'_>>, plan: &mut Plan, ctx: &Ctx<'_>) {
    let Some(mut open) = stack.pop() else { return };
    if open
        .decision
        .as_ref()
        .is_some_and(|d| !d.result.as_ref().is_some_and(Version::is_dir))
        && !open.present_below
    {
        open.present_below = ctx.present_outside(open.path);
    }
    let (present, skipped) = match open.decision {
        None => (open.present, false),
        Some(mut d) => {
            let is_dir = d.result.as_ref().is_some_and(Version::is_dir);
            if d.skip.is_none() && open.skip_below && !is_dir {
                d.skip = Some("something below it is left alone this run".into());
            } else if d.skip.is_none() && open.present_below && !is_dir {
                force_directory(&mut d);
            }
            let flags = (d.result.is_some(), d.skip.is_some());
            emit(d, plan);
            flags
        }
    };
    if let Some(parent) = stack.last_mut() {
        parent.present_below |= (present && !skipped) || open.present_below;
        parent.skip_below |= skipped || open.skip_below;
    }
}

/// Which replicas changed the path since their agreed state (the hub counts when it
/// differs from a changed peer's agreed state), hub first; empty when nobody did.
fn candidates_of(row: &Row<'_>) -> Vec<usize> {
    let n = row.states.len();
    let Some(h) = row.states[HUB] else {
        return vec![];
    };
    let version_of = |r: usize| row.states[r].and_then(St::version);
    let changed: Vec<usize> = (1..n)
        .filter(|&i| {
            row.states[i].is_some()
                && match row.agreed[i] {
                    None => version_of(i).is_some(),
                    Some(a) => !same(version_of(i), a),
                }
        })
        .collect();
    let hub_changed_vs = |i: usize| match row.agreed[i] {
        None => h.version().is_some(),
        Some(a) => !same(h.version(), a),
    };
    let hub_changed = if changed.is_empty() {
        // Only the hub changed it (compared with every peer's agreed state).
        (1..n).any(|i| row.states[i].is_some() && hub_changed_vs(i))
    } else {
        changed.iter().any(|&i| hub_changed_vs(i))
    };
    let mut candidates = changed;
    if hub_changed {
        candidates.insert(0, HUB);
    }
    candidates
}

/// For every follower of a bundle whose leader changed this run: the replica whose
/// leader version is the newest among those that changed it. Leaders whose changes
/// cannot be compared (a skipped state, a peer with a bad clock among several
/// changers) decide nothing.
fn bundle_winners<'a>(
    bundles: &[crate::rules::Bundle],
    paths: &[&'a RelPath],
    make_row: &dyn Fn(&'a RelPath) -> Row<'a>,
    clock_ok: &[bool],
) -> std::collections::HashMap<RelPath, usize> {
    let mut winners = std::collections::HashMap::new();
    if bundles.is_empty() {
        return winners;
    }
    for &path in paths {
        for b in bundles {
            let Some(id) = b.leader_id(path) else {
                continue;
            };
            let row = make_row(path);
            if row
                .states
                .iter()
                .flatten()
                .any(|s| matches!(s, St::Skip(_)))
            {
                continue;
            }
            let candidates = candidates_of(&row);
            if candidates.len() > 1 && candidates.iter().any(|&r| !clock_ok[r]) {
                continue;
            }
            let newest = candidates
                .iter()
                .filter_map(|&r| row.states[r].and_then(St::version).map(|v| (r, v)))
                .max_by(|a, b| a.1.precedence(b.1));
            if let Some((w, _)) = newest {
                for f in &b.followers {
                    if let Some(fp) = f.fill(id) {
                        winners.insert(fp, w);
                    }
                }
            }
        }
    }
    winners
}

/// Decides one path; `None` when every replica already holds the agreed version
/// (the common case, kept free of allocation). `leader`: the replica whose change
/// of this path's bundle leader came last, if the path follows one.
fn decide<'a>(
    row: Row<'a>,
    clock_ok: &[bool],
    mergeable: bool,
    leader: Option<usize>,
) -> Option<Decision<'a>> {
    let n = row.states.len();
    let h = row.states[HUB].expect("the hub always takes part");
    if let Some(why) = row.states.iter().flatten().find_map(|s| match s {
        St::Skip(w) => Some(*w),
        _ => None,
    }) {
        return Some(Decision {
            row,
            candidates: vec![],
            result: None,
            reason: Reason::CatchUp,
            skip: Some(why.to_string()),
        });
    }
    let version_of = |r: usize| row.states[r].and_then(St::version);
    let taking_part = |i: usize| row.states[i].is_some();
    let peer_changed = |i: usize| -> bool {
        taking_part(i)
            && match row.agreed[i] {
                None => version_of(i).is_some(),
                Some(a) => !same(version_of(i), a),
            }
    };
    let hub_changed_vs = |i: usize| -> bool {
        match row.agreed[i] {
            None => h.version().is_some(),
            Some(a) => !same(h.version(), a),
        }
    };
    let changed: Vec<usize> = (1..n).filter(|&i| peer_changed(i)).collect();
    if changed.is_empty()
        && (1..n).all(|i| !taking_part(i) || (row.agreed[i].is_some() && !hub_changed_vs(i)))
    {
        return None;
    }

    let mut candidates = changed.clone();
    if changed.iter().any(|&i| hub_changed_vs(i)) {
        candidates.insert(0, HUB);
    }
    let (result, reason) = if candidates.is_empty() {
        // Nobody else changed it, so the hub's version stands; it still counts as a
        // candidate so that, should a directory below force a different result, the
        // hub's version is kept rather than silently replaced.
        candidates.push(HUB);
        // The hub's own change if no peer had agreed on it yet (display only: the
        // decision is the same either way).
        let own = (1..n).all(|i| !taking_part(i) || hub_changed_vs(i));
        let reason = if own && h.version().is_some() {
            Reason::Changed {
                on: Replicas::one(HUB),
            }
        } else if own {
            Reason::Deleted {
                on: Replicas::one(HUB),
            }
        } else {
            Reason::CatchUp
        };
        (h.version().cloned(), reason)
    } else if let Some(d) = leader.and_then(|w| follow_leader(w, &candidates, version_of)) {
        d
    } else {
        resolve(&candidates, version_of, mergeable)
    };
    let by_clock = matches!(
        reason,
        Reason::Metadata { .. }
            | Reason::Conflict {
                rule: Rule::NewestMtime | Rule::TieBreak,
                ..
            }
    );
    let skip = (by_clock && candidates.iter().any(|&r| !clock_ok[r])).then(|| {
        "a conflict with a peer whose clock is off; left until the clocks agree".to_string()
    });
    Some(Decision {
        row,
        candidates,
        result,
        reason,
        skip,
    })
}

/// A follower changed differently on several replicas: the version of `winner`
/// (the replica whose bundle leader changed last), absence included. `None` when
/// the rule does not apply: no real conflict, the winner did not change this path
/// itself, or a directory is involved (directories follow their contents).
fn follow_leader<'a>(
    winner: usize,
    candidates: &[usize],
    version_of: impl Fn(usize) -> Option<&'a Version>,
) -> Option<(Option<Version>, Reason)> {
    if !candidates.contains(&winner) {
        return None;
    }
    let winning = version_of(winner);
    let losers: Replicas = candidates
        .iter()
        .copied()
        .filter(|&r| !same(version_of(r), winning))
        .collect();
    let any_dir = candidates
        .iter()
        .any(|&r| version_of(r).is_some_and(Version::is_dir));
    if losers.is_empty() || any_dir {
        return None;
    }
    let content_differs = candidates.iter().any(|&r| match (version_of(r), winning) {
        (Some(v), Some(w)) => !v.same_content(w),
        (a, b) => a.is_some() != b.is_some(),
    });
    if !content_differs {
        return None; // metadata only: the usual newest-wins rule is right
    }
    Some((
        winning.cloned(),
        Reason::Conflict {
            winner: small(winner),
            losers,
            rule: Rule::BundleLeader,
        },
    ))
}

/// Picks the result among the candidates' versions (steps 3 and 4 of the model).
fn resolve<'a>(
    candidates: &[usize],
    version_of: impl Fn(usize) -> Option<&'a Version>,
    mergeable: bool,
) -> (Option<Version>, Reason) {
    let holders = |pred: &dyn Fn(Option<&Version>) -> bool| -> Replicas {
        candidates
            .iter()
            .copied()
            .filter(|&r| pred(version_of(r)))
            .collect()
    };
    // Distinct candidate versions, first holder first.
    let mut distinct: Vec<(usize, Option<&Version>)> = Vec::new();
    for &r in candidates {
        let v = version_of(r);
        if !distinct.iter().any(|(_, d)| same(*d, v)) {
            distinct.push((r, v));
        }
    }
    if let [(_, only)] = distinct[..] {
        let on = holders(&|x| same(x, only));
        return match only {
            Some(v) => (Some(v.clone()), Reason::Changed { on }),
            None => (None, Reason::Deleted { on }),
        };
    }
    let present: Vec<(usize, &Version)> = distinct
        .iter()
        .filter_map(|&(r, v)| v.map(|v| (r, v)))
        .collect();
    let (winner, winning) = present
        .iter()
        .copied()
        .max_by(|a, b| a.1.precedence(b.1))
        .expect("two distinct candidates include a present one");
    let deleted = present.len() < distinct.len();
    let one_content = present.iter().all(|(_, v)| v.same_content(winning));
    if one_content && !deleted {
        let on = holders(&|x| x.is_some());
        return (Some(winning.clone()), Reason::Metadata { on });
    }
    if mergeable && !one_content && present.iter().all(|(_, v)| v.is_file()) {
        // Every differing version's lines go into the result: nobody loses.
        let on = present.iter().map(|&(r, _)| r).collect();
        return (Some(winning.clone()), Reason::Merged { on });
    }
    let rule = if one_content {
        Rule::ModifiedBeatsDeleted
    } else if present
        .iter()
        .any(|(_, v)| !v.same_content(winning) && v.mtime == winning.mtime)
    {
        Rule::TieBreak
    } else {
        Rule::NewestMtime
    };
    let losers = holders(&|x| !x.is_some_and(|x| x.same_content(winning)));
    (
        Some(winning.clone()),
        Reason::Conflict {
            winner: small(winner),
            losers,
            rule,
        },
    )
}

/// The path must stay a directory because something below it is present: take the
/// newest directory version any replica holds (or agreed on), and record a conflict
/// for the replicas whose own non-directory change cannot win.
fn force_directory(d: &mut Decision<'_>) {
    let mut dirs: Vec<&Version> = d
        .row
        .states
        .iter()
        .flatten()
        .filter_map(|s| s.version())
        .collect();
    dirs.extend(d.row.agreed.iter().flatten().flatten().copied());
    let dir = dirs
        .into_iter()
        .filter(|v| v.is_dir())
        .max_by(|a, b| a.precedence(b))
        .cloned()
        .unwrap_or(Version {
            kind: Kind::Dir,
            mode: 0o755,
            mtime: Default::default(),
            uid: 0,
            gid: 0,
        });
    let holds_dir = |r: usize| {
        d.row.states[r]
            .and_then(St::version)
            .is_some_and(Version::is_dir)
    };
    let losers: Replicas = d
        .candidates
        .iter()
        .copied()
        .filter(|&r| !holds_dir(r))
        .collect();
    if !losers.is_empty() {
        let deleted_only = losers
            .iter()
            .all(|r| d.row.states[r].and_then(St::version).is_none());
        d.reason = Reason::Conflict {
            winner: small(
                (0..d.row.states.len())
                    .find(|&r| holds_dir(r))
                    .unwrap_or(HUB),
            ),
            losers,
            rule: if deleted_only {
                Rule::ModifiedBeatsDeleted
            } else {
                Rule::DirectoryHasContent
            },
        };
    }
    d.result = Some(dir);
}

/// Turns a settled decision into a plan item, if it changes or records anything.
fn emit(d: Decision<'_>, plan: &mut Plan) {
    let path = d.row.path.clone();
    if let Some(why) = d.skip {
        plan.skipped.push((path, why));
        return;
    }
    let result = d.result;
    // The versions that lost a conflict. A replica about to lose one keeps it even
    // if it only held a copy (it had agreed on the loser's change while the winner's
    // replica was away): should the run end before the loser's own replica keeps it,
    // the next run would see the winner there as an ordinary edit, and replace the
    // loser's version everywhere without a trace.
    let losing: SmallVec<[&Version; 2]> = match &d.reason {
        Reason::Conflict { losers, .. } => losers
            .iter()
            .filter_map(|r| d.row.states[r].and_then(St::version))
            .filter(|v| !v.is_dir())
            .collect(),
        _ => SmallVec::new(),
    };
    let loses = |r: usize, cur: &Version| {
        d.candidates.contains(&r) || losing.iter().any(|l| l.same_content(cur))
    };
    let mut actions = Actions::default();
    for (r, st) in d.row.states.iter().enumerate() {
        let Some(cur) = st.map(St::version) else {
            continue;
        };
        // A merge's result is only known when it runs: everyone may need it.
        let merged = matches!(d.reason, Reason::Merged { .. });
        if same(cur, result.as_ref()) && !merged {
            continue;
        }
        let action = match (&result, cur) {
            (None, None) => continue,
            // Only a bundle's leader can make a deletion beat a change: the change
            // is kept.
            (None, Some(cur)) if loses(r, cur) => Action::KeepAndRemove,
            (None, Some(_)) => Action::Remove,
            (Some(_), None) => Action::Create,
            // A merge contains every candidate's lines: nothing to keep aside.
            (Some(_), Some(_)) if merged => Action::Replace,
            (Some(res), Some(cur)) if cur.same_content(res) => Action::SetMeta,
            (Some(_), Some(cur)) if loses(r, cur) => Action::KeepAndReplace,
            (Some(_), Some(_)) => Action::Replace,
        };
        actions.push(r, action);
    }
    let needs_bytes = actions
        .iter()
        .any(|(_, a)| matches!(a, Action::Create | Action::Replace | Action::KeepAndReplace));
    // Prefer the hub (no relay), then the lowest peer, among those holding the bytes.
    let source = match &result {
        _ if matches!(d.reason, Reason::Merged { .. }) => None,
        Some(res) if res.is_file() && needs_bytes => d
            .row
            .states
            .iter()
            .position(|s| s.and_then(St::version).is_some_and(|v| v.same_content(res))),
        _ => None,
    };
    let agree: Replicas = (1..d.row.states.len())
        .filter(|&i| d.row.states[i].is_some())
        .filter(|&i| match d.row.agreed[i] {
            None => result.is_some(),
            Some(a) => !same(a, result.as_ref()),
        })
        .collect();
    if actions.is_empty() && agree.is_empty() {
        return;
    }
    let merge = match &d.reason {
        Reason::Merged { on } => on
            .iter()
            .filter_map(|r| {
                d.row.states[r]
                    .and_then(St::version)
                    .map(|v| (r, v.clone()))
            })
            .collect(),
        _ => Vec::new(),
    };
    plan.items.push(Item {
        path,
        result,
        reason: d.reason,
        source: source.map(small),
        actions,
        agree,
        merge: merge.into(),
    });
}

#[cfg(test)]
mod tests;

/// A replica index in a plan's compact fields: there are at most
/// `MAX_REPLICAS` (64) replicas.
fn small(r: usize) -> u8 {
    debug_assert!(r < crate::plan::MAX_REPLICAS);
    r as u8
}
