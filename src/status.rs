//! "Is it healthy?": the status file each run leaves behind, `hubsync status`, and
//! the same figures in Prometheus text format for node_exporter's textfile collector.
//!
//! The status file (`STATE_DIR/status.json`) is rewritten atomically after every run
//! that is not a dry run. It keeps, per peer, when it last synced successfully, so
//! a peer that has been failing for an hour shows as such even though the hub runs
//! every ten seconds.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::{Overrides, Settings};
use crate::report::{ConflictReport, RunReport};
use crate::util::Bytes;
use crate::version::Mtime;

pub const STATUS_FILE: &str = "status.json";
const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize, Default, Debug, Clone)]
pub struct Status {
    pub format: u32,
    pub root: String,
    pub last_run: Option<LastRun>,
    pub peers: Vec<PeerStatus>,
    pub runs_total: u64,
    pub conflicts_total: u64,
    pub errors_total: u64,
}

#[derive(Serialize, Deserialize, Default, Debug, Clone)]
pub struct LastRun {
    /// Unix seconds.
    pub started: f64,
    pub finished: f64,
    pub seconds: f64,
    /// The hub's peak resident memory, in bytes.
    #[serde(default)]
    pub peak_memory: Option<u64>,
    /// `ok`, `partial` or `failed`.
    pub result: String,
    pub exit_code: i32,
    pub conflicts: Vec<ConflictReport>,
    pub errors: Vec<String>,
    pub warnings: usize,
}

#[derive(Serialize, Deserialize, Default, Debug, Clone)]
pub struct PeerStatus {
    pub name: String,
    pub url: String,
    pub last_attempt: f64,
    pub last_success: Option<f64>,
    /// `ok`, `failed` or `refused`.
    pub last_result: String,
    pub error: Option<String>,
    /// Files (and bytes) written to it and copied from it in the last run.
    pub files_to: u64,
    pub bytes_to: u64,
    pub files_from: u64,
    pub bytes_from: u64,
    pub wire_sent: u64,
    pub wire_received: u64,
    pub clock_offset: Option<f64>,
}

/// Verdict of `hubsync status`.
#[derive(Serialize, Debug)]
pub struct Health {
    pub healthy: bool,
    pub problems: Vec<String>,
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn ago(now: f64, t: f64) -> String {
    let s = (now - t).max(0.0);
    if s < 120.0 {
        format!("{s:.0} s ago")
    } else if s < 7200.0 {
        format!("{:.0} min ago", s / 60.0)
    } else if s < 172_800.0 {
        format!("{:.1} h ago", s / 3600.0)
    } else {
        format!("{:.1} days ago", s / 86_400.0)
    }
}

fn when(t: f64) -> String {
    Mtime::new(t as i64, 0).to_string()
}

impl Status {
    /// Reads `state_dir/status.json`.
    pub fn load(state_dir: &Path) -> Result<Status> {
        let path = state_dir.join(STATUS_FILE);
        let text = crate::util::read_state_file(&path).with_context(|| {
            format!(
                "no status at {} (has hubsync sync run here yet?)",
                path.display()
            )
        })?;
        let st: Status = serde_json::from_slice(&text).with_context(|| {
            format!(
                "{} is not a status file this hubsync can read",
                path.display()
            )
        })?;
        Ok(st)
    }

    /// Folds a finished run into the status (and returns it).
    pub fn record(
        state_dir: &Path,
        s: &Settings,
        report: &RunReport,
        started: SystemTime,
    ) -> Status {
        let mut st = Status::load(state_dir).unwrap_or_default();
        st.format = FORMAT;
        st.root = s.root.display().to_string();
        let finished = SystemTime::now();
        st.last_run = Some(LastRun {
            started: unix(started),
            finished: unix(finished),
            seconds: report.seconds,
            peak_memory: report.peak_memory,
            result: report.result.to_string(),
            exit_code: report.exit_code,
            conflicts: report.conflicts.clone(),
            errors: report.errors.clone(),
            warnings: report.warnings.len(),
        });
        st.runs_total += 1;
        st.conflicts_total += report.conflicts.len() as u64;
        st.errors_total += report.errors.len() as u64;
        let old = std::mem::take(&mut st.peers);
        for (spec, r) in s.peers.iter().zip(report.replicas.iter().skip(1)) {
            let prev = old.iter().find(|p| p.name == spec.label);
            let ok = r.status == "ok" && r.failed_actions == 0;
            st.peers.push(PeerStatus {
                name: spec.label.clone(),
                url: r.url.clone(),
                last_attempt: unix(finished),
                last_success: if ok {
                    Some(unix(finished))
                } else {
                    prev.and_then(|p| p.last_success)
                },
                last_result: if ok {
                    "ok"
                } else if r.status == "ok" {
                    "partial"
                } else {
                    r.status
                }
                .to_string(),
                error: r.error.clone(),
                files_to: r.files_in,
                bytes_to: r.bytes_in,
                files_from: r.files_out,
                bytes_from: r.bytes_out,
                wire_sent: r.wire_sent,
                wire_received: r.wire_received,
                clock_offset: r.clock_offset,
            });
        }
        st
    }

    /// Writes the status file atomically.
    pub fn save(&self, state_dir: &Path) -> Result<()> {
        let path = state_dir.join(STATUS_FILE);
        std::fs::create_dir_all(state_dir)?;
        crate::util::write_atomic(&path, |f| {
            serde_json::to_writer_pretty(&mut *f, self).map_err(std::io::Error::other)
        })
        .with_context(|| format!("cannot write {}", path.display()))
    }

    pub fn health(&self, max_age: Duration) -> Health {
        let now = unix(SystemTime::now());
        let max = max_age.as_secs_f64();
        let mut problems = Vec::new();
        match &self.last_run {
            None => problems.push("no run has been recorded".to_string()),
            Some(r) => {
                if now - r.finished > max {
                    problems.push(format!(
                        "the last run finished {} (more than {} ago): is the timer running?",
                        ago(now, r.finished),
                        fmt_secs(max)
                    ));
                }
                if r.result == "failed" {
                    problems.push(format!(
                        "the last run failed: {}",
                        r.errors.first().cloned().unwrap_or_default()
                    ));
                }
            }
        }
        for p in &self.peers {
            match p.last_success {
                None => problems.push(format!("peer {} has never synced", p.name)),
                Some(t) if now - t > max => problems.push(format!(
                    "peer {} last synced {}{}",
                    p.name,
                    ago(now, t),
                    p.error
                        .as_ref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                )),
                Some(_) => {}
            }
        }
        Health {
            healthy: problems.is_empty(),
            problems,
        }
    }

    pub fn print(&self, health: &Health) {
        let now = unix(SystemTime::now());
        if health.healthy {
            println!("hubsync: healthy");
        } else {
            println!("hubsync: UNHEALTHY");
            for p in &health.problems {
                println!("  - {p}");
            }
        }
        println!("root: {}", self.root);
        if let Some(r) = &self.last_run {
            println!(
                "last run: {} ({}), {} in {:.2} s, exit code {}",
                when(r.finished),
                ago(now, r.finished),
                r.result,
                r.seconds,
                r.exit_code
            );
            for e in &r.errors {
                println!("  error: {e}");
            }
        }
        for p in &self.peers {
            let last = p
                .last_success
                .map(|t| format!("last synced {}", ago(now, t)))
                .unwrap_or_else(|| "never synced".into());
            println!(
                "peer {} ({}): {}, {last}; last run: {} files ({}) to it, {} files ({}) from it",
                p.name,
                p.url,
                p.last_result,
                p.files_to,
                Bytes(p.bytes_to),
                p.files_from,
                Bytes(p.bytes_from)
            );
            if let Some(e) = &p.error {
                println!("  error: {e}");
            }
        }
        if let Some(r) = &self.last_run {
            for c in &r.conflicts {
                for (who, kept) in &c.losers {
                    println!(
                        "conflict: {}: {} won over {who}{}",
                        c.path,
                        c.winner,
                        kept.as_ref()
                            .map(|k| format!(", kept at {k}"))
                            .unwrap_or_default()
                    );
                }
            }
        }
        println!(
            "totals: {} runs, {} conflicts kept, {} errors (list kept copies with `hubsync conflicts`)",
            self.runs_total, self.conflicts_total, self.errors_total
        );
    }

    pub fn print_json(&self, health: &Health) {
        #[derive(Serialize)]
        struct Doc<'a> {
            #[serde(flatten)]
            health: &'a Health,
            status: &'a Status,
        }
        let _ = serde_json::to_writer_pretty(
            std::io::stdout().lock(),
            &Doc {
                health,
                status: self,
            },
        );
        println!();
    }

    /// The Prometheus text exposition of this status.
    pub fn metrics(&self) -> String {
        let mut m = String::new();
        let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
            let _ = writeln!(m, "# HELP {name} {help}");
            let _ = writeln!(m, "# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(m, "{name}{labels} {v}");
            }
        };
        let run = self.last_run.clone().unwrap_or_default();
        let peer = |f: &dyn Fn(&PeerStatus) -> Option<f64>| -> Vec<(String, f64)> {
            self.peers
                .iter()
                .filter_map(|p| f(p).map(|v| (format!("{{peer=\"{}\"}}", escape(&p.name)), v)))
                .collect()
        };
        family(
            "hubsync_last_run_timestamp_seconds",
            "gauge",
            "When the last run finished (unix time).",
            vec![(String::new(), run.finished)],
        );
        family(
            "hubsync_last_run_duration_seconds",
            "gauge",
            "How long the last run took.",
            vec![(String::new(), run.seconds)],
        );
        family(
            "hubsync_last_run_peak_memory_bytes",
            "gauge",
            "The hub's peak resident memory during the last run.",
            run.peak_memory
                .map(|b| (String::new(), b as f64))
                .into_iter()
                .collect(),
        );
        family(
            "hubsync_last_run_success",
            "gauge",
            "1 if the last run synced every replica, else 0.",
            vec![(String::new(), f64::from(u8::from(run.result == "ok")))],
        );
        family(
            "hubsync_last_run_conflicts",
            "gauge",
            "Conflicts resolved in the last run (losers kept).",
            vec![(String::new(), run.conflicts.len() as f64)],
        );
        family(
            "hubsync_last_run_errors",
            "gauge",
            "Errors in the last run.",
            vec![(String::new(), run.errors.len() as f64)],
        );
        family(
            "hubsync_runs_total",
            "counter",
            "Runs recorded.",
            vec![(String::new(), self.runs_total as f64)],
        );
        family(
            "hubsync_conflicts_total",
            "counter",
            "Conflicts resolved since the status file was created.",
            vec![(String::new(), self.conflicts_total as f64)],
        );
        family(
            "hubsync_errors_total",
            "counter",
            "Errors reported since the status file was created.",
            vec![(String::new(), self.errors_total as f64)],
        );
        family(
            "hubsync_peer_up",
            "gauge",
            "1 if the peer synced in the last run.",
            peer(&|p| Some(f64::from(u8::from(p.last_result == "ok")))),
        );
        family(
            "hubsync_peer_last_success_timestamp_seconds",
            "gauge",
            "When the peer last synced successfully (unix time).",
            peer(&|p| p.last_success),
        );
        family(
            "hubsync_peer_clock_offset_seconds",
            "gauge",
            "The peer's clock minus the hub's.",
            peer(&|p| p.clock_offset),
        );
        let dir = |f: &dyn Fn(&PeerStatus) -> (u64, u64)| -> Vec<(String, f64)> {
            self.peers
                .iter()
                .flat_map(|p| {
                    let (to, from) = f(p);
                    let n = escape(&p.name);
                    [
                        (format!("{{peer=\"{n}\",direction=\"to_peer\"}}"), to as f64),
                        (
                            format!("{{peer=\"{n}\",direction=\"from_peer\"}}"),
                            from as f64,
                        ),
                    ]
                })
                .collect()
        };
        family(
            "hubsync_last_run_files",
            "gauge",
            "Files copied to and from the peer in the last run.",
            dir(&|p| (p.files_to, p.files_from)),
        );
        family(
            "hubsync_last_run_bytes",
            "gauge",
            "File bytes copied to and from the peer in the last run.",
            dir(&|p| (p.bytes_to, p.bytes_from)),
        );
        family(
            "hubsync_last_run_wire_bytes",
            "gauge",
            "Protocol bytes sent to and received from the peer in the last run.",
            dir(&|p| (p.wire_sent, p.wire_received)),
        );
        m
    }

    /// Writes the metrics file atomically (node_exporter must never read half).
    pub fn save_metrics(&self, path: &Path) -> Result<()> {
        let text = self.metrics();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        crate::util::write_atomic(path, |f| std::io::Write::write_all(f, text.as_bytes()))
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

fn fmt_secs(s: f64) -> String {
    if s >= 120.0 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{s:.0} s")
    }
}

/// Escapes a Prometheus label value.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The state directory `hubsync status` reads: from ROOT or the config file.
pub fn state_dir_for(ov: &Overrides) -> Result<PathBuf> {
    crate::config::locate(ov).map(|(_, state)| state)
}

/// The replica root `hubsync conflicts` looks at: ROOT or the config file's root.
pub fn root_for(ov: &Overrides) -> Result<PathBuf> {
    crate::config::locate(ov).map(|(root, _)| root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_parse_as_prometheus_text() {
        let st = Status {
            format: FORMAT,
            root: "/r".into(),
            last_run: Some(LastRun {
                finished: 1_700_000_000.5,
                seconds: 0.25,
                result: "ok".into(),
                ..Default::default()
            }),
            peers: vec![PeerStatus {
                name: "web2".into(),
                last_success: Some(1_700_000_000.0),
                last_result: "ok".into(),
                files_to: 3,
                ..Default::default()
            }],
            runs_total: 7,
            ..Default::default()
        };
        let text = st.metrics();
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("valid exposition format");
        let get = |name: &str| scrape.samples.iter().find(|s| s.metric == name).unwrap();
        assert!(
            matches!(get("hubsync_runs_total").value, prometheus_parse::Value::Counter(v) if v == 7.0)
        );
        let up = get("hubsync_peer_up");
        assert_eq!(up.labels.get("peer"), Some("web2"));
    }

    #[test]
    fn health_names_stale_peers() {
        let now = unix(SystemTime::now());
        let st = Status {
            last_run: Some(LastRun {
                finished: now,
                result: "partial".into(),
                ..Default::default()
            }),
            peers: vec![
                PeerStatus {
                    name: "fresh".into(),
                    last_success: Some(now - 5.0),
                    ..Default::default()
                },
                PeerStatus {
                    name: "stale".into(),
                    last_success: Some(now - 3600.0),
                    error: Some("no answer".into()),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let h = st.health(Duration::from_secs(300));
        assert!(!h.healthy);
        assert_eq!(h.problems.len(), 1, "{:?}", h.problems);
        assert!(h.problems[0].contains("stale") && h.problems[0].contains("no answer"));
    }
}
