//! What a run tells people and programs: the one-line summary for the journal, the
//! action list for `-v`, the plan for `--dry-run`, and one JSON document for
//! `--json`. The engine only fills a [`RunReport`]; this module decides the words.

use std::fmt::Write as _;
use std::io::Write;

use serde::Serialize;

use crate::plan::{Action, Plan, Reason, Rule};
use crate::proto::ScanSummary;
use crate::util::Bytes;

/// How loud to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verbosity {
    Quiet,
    Normal,
    Verbose,
}

/// The outcome for one replica.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReplicaReport {
    pub label: String,
    pub url: String,
    /// `ok`, `failed` (unreachable, broke off) or `refused` (a safety check).
    pub status: &'static str,
    pub error: Option<String>,
    /// Files (and symlinks) written into this replica, and their bytes.
    pub files_in: u64,
    pub bytes_in: u64,
    /// Copies of files read from this replica for others, and their bytes.
    pub files_out: u64,
    pub bytes_out: u64,
    pub removed: u64,
    pub metadata: u64,
    /// Actions left for the next run because the path changed during this one.
    pub deferred: u64,
    pub failed_actions: u64,
    pub wire_sent: u64,
    pub wire_received: u64,
    pub scan: Option<ScanSummary>,
    /// The peer's clock minus the hub's, in seconds (hub: 0).
    pub clock_offset: Option<f64>,
}

/// One conflict and where its losers were kept.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct ConflictReport {
    pub path: String,
    pub winner: String,
    pub rule: Rule,
    /// (replica, where its losing version is kept, if anywhere).
    pub losers: Vec<(String, Option<String>)>,
}

/// Everything a run did or would do.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunReport {
    pub dry_run: bool,
    pub result: &'static str,
    pub exit_code: i32,
    pub seconds: f64,
    /// The hub process's peak resident memory, in bytes.
    pub peak_memory: Option<u64>,
    pub replicas: Vec<ReplicaReport>,
    pub conflicts: Vec<ConflictReport>,
    pub warnings: Vec<String>,
    pub errors: Vec<String>,
    /// What was done where, for `-v` (kept only then: a first sync has one per
    /// file and replica).
    #[serde(skip)]
    pub actions: Vec<Done>,
    #[serde(skip)]
    pub keep_actions: bool,
}

/// One action carried out.
#[derive(Clone, Debug)]
pub struct Done {
    pub replica: usize,
    pub action: Action,
    pub path: crate::relpath::RelPath,
}

impl Done {
    fn verb(&self) -> &'static str {
        match self.action {
            Action::Remove => "removed",
            Action::KeepAndRemove => "removed (its own version kept as a conflict copy)",
            Action::SetMeta => "metadata",
            Action::Create => "created",
            Action::Replace => "replaced",
            Action::KeepAndReplace => "replaced (its own version kept as a conflict copy)",
        }
    }
}

#[derive(Serialize)]
struct JsonAction<'a> {
    replica: &'a str,
    action: Action,
}

#[derive(Serialize)]
struct JsonItem<'a> {
    path: String,
    result: Option<&'a crate::version::Version>,
    why: String,
    source: Option<&'a str>,
    actions: Vec<JsonAction<'a>>,
}

#[derive(Serialize)]
struct JsonDoc<'a> {
    #[serde(flatten)]
    report: &'a RunReport,
    plan: Vec<JsonItem<'a>>,
    skipped: Vec<(String, &'a str)>,
}

fn reason_text(r: &Reason, labels: &[String]) -> String {
    let names = |v: &crate::plan::Replicas| {
        v.iter()
            .map(|i| labels.get(i).map(String::as_str).unwrap_or("?"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match r {
        Reason::Changed { on } => format!("changed on {}", names(on)),
        Reason::Deleted { on } => format!("deleted on {}", names(on)),
        Reason::Metadata { on } => format!("metadata changed on {}", names(on)),
        Reason::CatchUp => "catching up".into(),
        Reason::Merged { on } => format!("merged the lines of {}", names(on)),
        Reason::Conflict {
            winner,
            losers,
            rule,
        } => format!(
            "conflict: {} wins over {} ({rule:?})",
            names(&crate::plan::Replicas::one(usize::from(*winner))),
            names(losers)
        ),
    }
}

impl RunReport {
    /// The one line for the journal.
    pub fn summary_line(&self) -> String {
        let mut s = String::new();
        let verb = if self.dry_run { "would sync" } else { "synced" };
        let ok = self.replicas.iter().filter(|r| r.status == "ok").count();
        let _ = write!(
            s,
            "hubsync: {verb} {ok}/{} replicas in {:.2}s",
            self.replicas.len(),
            self.seconds
        );
        let parts: Vec<String> = self
            .replicas
            .iter()
            .map(|r| match r.status {
                "ok" => {
                    let mut p =
                        format!("{} +{} files ({})", r.label, r.files_in, Bytes(r.bytes_in));
                    if r.removed > 0 {
                        let _ = write!(p, " -{}", r.removed);
                    }
                    p
                }
                other => format!("{} {}", r.label, other.to_uppercase()),
            })
            .collect();
        let _ = write!(s, ": {}", parts.join(", "));
        if !self.conflicts.is_empty() {
            let _ = write!(s, "; {} conflict(s), losers kept", self.conflicts.len());
        }
        let deferred: u64 = self.replicas.iter().map(|r| r.deferred).sum();
        if deferred > 0 {
            let _ = write!(s, "; {deferred} change(s) deferred to the next run");
        }
        s
    }

    /// Prints what people should see at `verbosity` to stderr (and the plan or the
    /// action list to stdout).
    pub fn print(&self, plan: Option<&Plan>, labels: &[String], verbosity: Verbosity) {
        let mut out = std::io::stdout().lock();
        if let Some(plan) = plan
            && (self.dry_run || verbosity == Verbosity::Verbose)
        {
            let _ = write!(out, "{}", plan.display(labels));
        }
        if verbosity == Verbosity::Verbose && !self.dry_run {
            for a in &self.actions {
                let label = labels.get(a.replica).map(String::as_str).unwrap_or("?");
                let _ = writeln!(out, "{label}: {} {}", a.verb(), a.path);
            }
        }
        let _ = out.flush();
        let mut err = std::io::stderr().lock();
        if verbosity >= Verbosity::Normal {
            for w in &self.warnings {
                let _ = writeln!(err, "hubsync: warning: {w}");
            }
            for c in &self.conflicts {
                for (r, kept) in &c.losers {
                    let _ = writeln!(
                        err,
                        "hubsync: conflict: {}: {} won over {r}{}",
                        c.path,
                        c.winner,
                        kept.as_ref()
                            .map(|k| format!("; {r}'s version kept at {k}"))
                            .unwrap_or_default()
                    );
                }
            }
        }
        for e in &self.errors {
            let _ = writeln!(err, "hubsync: error: {e}");
        }
        if verbosity >= Verbosity::Normal {
            let _ = writeln!(err, "{}", self.summary_line());
        }
    }

    /// The whole report, with the plan, as one JSON document on stdout.
    pub fn print_json(&self, plan: Option<&Plan>, labels: &[String]) {
        let name = |i: usize| labels.get(i).map(String::as_str).unwrap_or("?");
        let items = plan
            .map(|p| {
                p.changes()
                    .map(|i| JsonItem {
                        path: i.path.to_string_lossy(),
                        result: i.result.as_ref(),
                        why: reason_text(&i.reason, labels),
                        source: i.source().map(name),
                        actions: i
                            .actions
                            .iter()
                            .map(|(r, action)| JsonAction {
                                replica: name(r),
                                action,
                            })
                            .collect(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let skipped = plan
            .map(|p| {
                p.skipped
                    .iter()
                    .map(|(path, why)| (path.to_string_lossy(), why.as_str()))
                    .collect()
            })
            .unwrap_or_default();
        let doc = JsonDoc {
            report: self,
            plan: items,
            skipped,
        };
        let mut out = std::io::stdout().lock();
        let _ = serde_json::to_writer_pretty(&mut out, &doc);
        let _ = writeln!(out);
    }
}
