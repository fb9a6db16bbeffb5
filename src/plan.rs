//! The plan: what a run will do, path by path. Built by `reconcile`, printed by
//! `--dry-run`, executed by the engine, so the preview is exactly what would run.

use std::fmt;

use serde::Serialize;

use crate::relpath::RelPath;
use crate::version::Version;

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
}

/// Why a path gets its result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "why", rename_all = "snake_case")]
pub enum Reason {
    /// Changed on these replicas, identically.
    Changed { on: Vec<usize> },
    /// Deleted on these replicas, and changed nowhere else.
    Deleted { on: Vec<usize> },
    /// Several replicas changed it to the same content with different metadata; the
    /// newest metadata wins and nothing needs keeping.
    Metadata { on: Vec<usize> },
    /// Nobody changed it; some replicas are behind the hub (they missed an earlier
    /// run) and catch up.
    CatchUp,
    /// Changed differently on several replicas, and merged: the result holds every
    /// line of each of these replicas' versions (computed when the plan runs).
    Merged { on: Vec<usize> },
    /// Changed differently on several replicas.
    Conflict {
        winner: usize,
        losers: Vec<usize>,
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
    /// The replica to copy file content from, when some action needs it.
    pub source: Option<usize>,
    /// What each replica does, in replica order.
    pub actions: Vec<(usize, Action)>,
    /// Peers whose agreed state for this path becomes `result` once the actions on
    /// the hub and on that peer have succeeded.
    pub agree: Vec<usize>,
    /// For a merge: the versions whose lines make the result, and where they are.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub merge: Vec<(usize, Version)>,
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
            .filter(|(x, a)| *x == r && pred(*a))
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
                Reason::Changed { on } => format!("changed on {}", self.names(on.iter().copied())),
                Reason::Deleted { on } => format!("deleted on {}", self.names(on.iter().copied())),
                Reason::Metadata { on } => format!(
                    "same content, metadata changed on {}; newest wins",
                    self.names(on.iter().copied())
                ),
                Reason::CatchUp => "catching up with the hub".to_string(),
                Reason::Merged { on } => format!(
                    "changed on {}; their lines are merged",
                    self.names(on.iter().copied())
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
                    };
                    format!(
                        "CONFLICT: {} wins ({rule}) over {}",
                        self.names([*winner]),
                        self.names(losers.iter().copied())
                    )
                }
            };
            writeln!(f, "{}  [{what}; {why}]", item.path)?;
            for (r, a) in &item.actions {
                let from = match (a, item.source) {
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
                    Action::SetMeta => "set mode/mtime",
                };
                writeln!(f, "    {}: {a}{from}", self.names([*r]))?;
            }
        }
        for (p, why) in &self.plan.skipped {
            writeln!(f, "{p}  [left alone this run: {why}]")?;
        }
        Ok(())
    }
}
