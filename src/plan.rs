//! The plan: what a run will do, path by path. Built by `reconcile`, printed by
//! `--dry-run`, executed by the engine, so the preview is exactly what would run.

use std::fmt;

use serde::Serialize;

use crate::relpath::RelPath;
use crate::version::Version;

/// A set of replicas by index, as bits: a plan holds several per path, and a first
/// sync has a path for every file.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Replicas(u64);

/// The most replicas one run can sync (the hub and 63 peers).
pub const MAX_REPLICAS: usize = 64;

impl Replicas {
    pub fn one(r: usize) -> Replicas {
        let mut s = Replicas::default();
        s.insert(r);
        s
    }

    pub fn insert(&mut self, r: usize) {
        debug_assert!(r < MAX_REPLICAS);
        self.0 |= 1 << r;
    }

    pub fn contains(&self, r: usize) -> bool {
        r < MAX_REPLICAS && self.0 & (1 << r) != 0
    }

    pub fn len(&self) -> usize {
        self.0.count_ones() as usize
    }

    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }

    /// Members in increasing order.
    pub fn iter(&self) -> ReplicaIter {
        ReplicaIter(self.0)
    }

    pub fn first(&self) -> Option<usize> {
        (self.0 != 0).then(|| self.0.trailing_zeros() as usize)
    }
}

impl FromIterator<usize> for Replicas {
    fn from_iter<I: IntoIterator<Item = usize>>(iter: I) -> Replicas {
        let mut s = Replicas::default();
        for r in iter {
            s.insert(r);
        }
        s
    }
}

impl IntoIterator for &Replicas {
    type Item = usize;
    type IntoIter = ReplicaIter;
    fn into_iter(self) -> ReplicaIter {
        ReplicaIter(self.0)
    }
}

/// The members of a [`Replicas`], lowest first.
pub struct ReplicaIter(u64);

impl Iterator for ReplicaIter {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        if self.0 == 0 {
            return None;
        }
        let r = self.0.trailing_zeros() as usize;
        self.0 &= self.0 - 1;
        Some(r)
    }
}

impl fmt::Debug for Replicas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Serialize for Replicas {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

/// What each replica does for one path, in replica order.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Actions(smallvec::SmallVec<[(u8, Action); 8]>);

impl Actions {
    pub fn push(&mut self, r: usize, a: Action) {
        debug_assert!(r < MAX_REPLICAS);
        self.0.push((r as u8, a));
    }

    pub fn iter(&self) -> impl Iterator<Item = (usize, Action)> + '_ {
        self.0.iter().map(|&(r, a)| (r as usize, a))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl FromIterator<(usize, Action)> for Actions {
    fn from_iter<I: IntoIterator<Item = (usize, Action)>>(iter: I) -> Actions {
        let mut s = Actions::default();
        for (r, a) in iter {
            s.push(r, a);
        }
        s
    }
}

impl<'a> IntoIterator for &'a Actions {
    type Item = (usize, Action);
    type IntoIter =
        std::iter::Map<std::slice::Iter<'a, (u8, Action)>, fn(&(u8, Action)) -> (usize, Action)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|&(r, a)| (r as usize, a))
    }
}

impl fmt::Debug for Actions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Serialize for Actions {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

/// Replica index of the hub; peers are 1..
pub const HUB: usize = 0;

/// What happens to one path on one replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Nothing there yet: install the result.
    Create,
    /// An older version that nobody changed: replace it.
    Replace,
    /// This replica's own change lost a conflict: keep it under
    /// `.hubsync/conflicts/`, then install the result.
    KeepAndReplace,
    Remove,
    /// This replica's own change lost to a deletion (decided by a bundle's leader):
    /// keep it under `.hubsync/conflicts/`, then remove the path.
    KeepAndRemove,
    /// Same content; only permission bits, mtime or owner change.
    SetMeta,
}

/// How a conflict was decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// The version with the newest mtime won.
    NewestMtime,
    /// Equal mtimes: the greater content hash won (documented tie-break).
    TieBreak,
    /// A modification beats a deletion.
    ModifiedBeatsDeleted,
    /// A directory that still has (new) content cannot become a file or vanish.
    DirectoryHasContent,
    /// The replica whose bundle leader (a changelog) changed last wins the
    /// bundle's other files.
    BundleLeader,
}

/// Why a path gets its result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "why", rename_all = "snake_case")]
pub enum Reason {
    /// Changed on these replicas, identically.
    Changed { on: Replicas },
    /// Deleted on these replicas, and changed nowhere else.
    Deleted { on: Replicas },
    /// Several replicas changed it to the same content with different metadata; the
    /// newest metadata wins and nothing needs keeping.
    Metadata { on: Replicas },
    /// Nobody changed it; some replicas are behind the hub (they missed an earlier
    /// run) and catch up.
    CatchUp,
    /// Changed differently on several replicas, and merged: the result holds every
    /// line of each of these replicas' versions (computed when the plan runs).
    Merged { on: Replicas },
    /// Changed differently on several replicas.
    Conflict {
        winner: u8,
        losers: Replicas,
        rule: Rule,
    },
}

/// One path's decision.
#[derive(Clone, Debug, Serialize)]
pub struct Item {
    pub path: RelPath,
    /// The version every replica holds afterwards (`None`: the path is removed).
    pub result: Option<Version>,
    pub reason: Reason,
    /// The replica to copy file content from, when some action needs it (see
    /// `source()`; small, as a first sync plans an item per file).
    pub source: Option<u8>,
    /// What each replica does, in replica order.
    pub actions: Actions,
    /// Peers whose agreed state for this path becomes `result` once the actions on
    /// the hub and on that peer have succeeded.
    pub agree: Replicas,
    /// For a merge: the versions whose lines make the result, and where they are.
    #[serde(skip_serializing_if = "MergeInputs::is_empty")]
    pub merge: MergeInputs,
}

impl Item {
    pub fn source(&self) -> Option<usize> {
        self.source.map(usize::from)
    }
}

/// The inputs of a merge. Hardly any item has some, and a first sync plans an item
/// per file: one pointer, not a slice's two.
#[derive(Clone, Debug, Default)]
#[allow(clippy::box_collection)] // the Box is the point: a thin pointer
pub struct MergeInputs(Option<Box<Vec<(usize, Version)>>>);

impl MergeInputs {
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }
}

impl From<Vec<(usize, Version)>> for MergeInputs {
    fn from(v: Vec<(usize, Version)>) -> Self {
        MergeInputs((!v.is_empty()).then(|| Box::new(v)))
    }
}

impl std::ops::Deref for MergeInputs {
    type Target = [(usize, Version)];
    fn deref(&self) -> &Self::Target {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }
}

impl Serialize for MergeInputs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (**self).serialize(s)
    }
}

/// Everything one run would do.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Plan {
    pub items: Vec<Item>,
    /// Paths left alone this run and why (a file changing while scanned, an
    /// unreadable directory).
    pub skipped: Vec<(RelPath, String)>,
}

impl Plan {
    /// Number of actions of each kind on replica `r`.
    pub fn count(&self, r: usize, pred: impl Fn(Action) -> bool) -> usize {
        self.items
            .iter()
            .flat_map(|i| i.actions.iter())
            .filter(|&(x, a)| x == r && pred(a))
            .count()
    }

    pub fn conflicts(&self) -> impl Iterator<Item = &Item> {
        self.items
            .iter()
            .filter(|i| matches!(i.reason, Reason::Conflict { .. }))
    }

    /// Items that change some tree (the rest only record agreement).
    pub fn changes(&self) -> impl Iterator<Item = &Item> {
        self.items.iter().filter(|i| !i.actions.is_empty())
    }

    /// Writes the plan for people: one line per changed path.
    pub fn display<'a>(&'a self, labels: &'a [String]) -> PlanDisplay<'a> {
        PlanDisplay { plan: self, labels }
    }
}

pub struct PlanDisplay<'a> {
    plan: &'a Plan,
    labels: &'a [String],
}

impl PlanDisplay<'_> {
    fn names(&self, rs: impl IntoIterator<Item = usize>) -> String {
        rs.into_iter()
            .map(|r| self.labels.get(r).map(String::as_str).unwrap_or("?"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for PlanDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for item in self.plan.changes() {
            let what = match (&item.result, &item.reason) {
                (None, _) => "delete".to_string(),
                (Some(_), Reason::Merged { .. }) => "merge".to_string(),
                (Some(v), _) => v.kind.name().to_string(),
            };
            let why = match &item.reason {
                Reason::Changed { on } => format!("changed on {}", self.names(on.iter())),
                Reason::Deleted { on } => format!("deleted on {}", self.names(on.iter())),
                Reason::Metadata { on } => format!(
                    "same content, metadata changed on {}; newest wins",
                    self.names(on.iter())
                ),
                Reason::CatchUp => "catching up with the hub".to_string(),
                Reason::Merged { on } => format!(
                    "changed on {}; their lines are merged",
                    self.names(on.iter())
                ),
                Reason::Conflict {
                    winner,
                    losers,
                    rule,
                } => {
                    let rule = match rule {
                        Rule::NewestMtime => "newest mtime",
                        Rule::TieBreak => "equal mtimes, greater content hash",
                        Rule::ModifiedBeatsDeleted => "modified beats deleted",
                        Rule::DirectoryHasContent => "directory has new content",
                        Rule::BundleLeader => "its changelog changed last there",
                    };
                    format!(
                        "CONFLICT: {} wins ({rule}) over {}",
                        self.names([usize::from(*winner)]),
                        self.names(losers.iter())
                    )
                }
            };
            writeln!(f, "{}  [{what}; {why}]", item.path)?;
            for (r, a) in item.actions.iter() {
                let from = match (a, item.source()) {
                    (Action::Create | Action::Replace | Action::KeepAndReplace, Some(s)) => {
                        format!(" from {}", self.names([s]))
                    }
                    _ => String::new(),
                };
                let a = match a {
                    Action::Create => "create",
                    Action::Replace => "replace",
                    Action::KeepAndReplace => {
                        "keep its version under .hubsync/conflicts/, then replace"
                    }
                    Action::Remove => "remove",
                    Action::KeepAndRemove => {
                        "keep its version under .hubsync/conflicts/, then remove"
                    }
                    Action::SetMeta => "set mode/mtime",
                };
                writeln!(f, "    {}: {a}{from}", self.names([r]))?;
            }
        }
        for (p, why) in &self.plan.skipped {
            writeln!(f, "{p}  [left alone this run: {why}]")?;
        }
        Ok(())
    }
}
