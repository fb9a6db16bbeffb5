//! The resolved, checked settings of a run. The command line (and, later, a config
//! file) is turned into a [`Settings`] here; nothing below sees raw flags.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::exclude::Excludes;
use crate::report::Verbosity;

/// Where a peer lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A directory on this machine, served by a child `hubsync serve`.
    Local(PathBuf),
}

/// One peer of the hub.
#[derive(Clone, Debug)]
pub struct PeerSpec {
    /// Short name used in messages and conflict-copy names.
    pub label: String,
    /// Identifies the peer across runs (keys the hub's copy of the pair's state).
    pub key: String,
    pub target: Target,
}

/// Everything a `sync` run needs to know.
#[derive(Clone, Debug)]
pub struct Settings {
    pub root: PathBuf,
    pub peers: Vec<PeerSpec>,
    pub excludes: Vec<String>,
    pub dry_run: bool,
    pub force_deletions: bool,
    pub verbosity: Verbosity,
    pub json: bool,
    /// A replica that sends nothing for this long while we wait for it is given up.
    pub idle_timeout: Duration,
    /// This executable, started as `serve` for local peers.
    pub exe: PathBuf,
    /// Runs `serve` instead of `exe` (through `sh -c`), e.g. `/usr/local/bin/hubsync`.
    pub remote_command: Option<String>,
}

/// Makes `p` absolute against the current directory without resolving symlinks
/// (a symlinked root is refused later, with the reason).
pub fn absolute(p: &Path) -> Result<PathBuf> {
    if p.as_os_str().is_empty() {
        bail!("an empty path is not a replica root");
    }
    let abs = std::path::absolute(p).with_context(|| format!("cannot resolve {}", p.display()))?;
    // Drop a trailing "/." or "/" so that labels and keys are stable.
    Ok(abs.components().collect())
}

impl Settings {
    /// Builds settings for `hubsync sync ROOT PEER...`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        root: &Path,
        peers: &[String],
        excludes: Vec<String>,
        dry_run: bool,
        force_deletions: bool,
        verbosity: Verbosity,
        json: bool,
        idle_timeout: Duration,
        remote_command: Option<String>,
    ) -> Result<Settings> {
        let root = absolute(root)?;
        Excludes::new(&excludes)?;
        if peers.is_empty() {
            bail!("no peers given: hubsync sync ROOT PEER...");
        }
        let mut specs: Vec<PeerSpec> = Vec::new();
        for p in peers {
            let path = absolute(Path::new(p))?;
            if path == root || path.starts_with(&root) || root.starts_with(&path) {
                bail!(
                    "peer {} overlaps the hub's root {}; replicas must be separate trees",
                    path.display(),
                    root.display()
                );
            }
            if specs
                .iter()
                .any(|s| s.target == Target::Local(path.clone()))
            {
                bail!("peer {} is given twice", path.display());
            }
            let base = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "root".into());
            let mut label = sanitize(&base);
            let mut n = 2;
            while label == "hub" || specs.iter().any(|s| s.label == label) {
                label = format!("{}-{n}", sanitize(&base));
                n += 1;
            }
            specs.push(PeerSpec {
                label,
                key: format!("local:{}", path.display()),
                target: Target::Local(path),
            });
        }
        Ok(Settings {
            root,
            peers: specs,
            excludes,
            dry_run,
            force_deletions,
            verbosity,
            json,
            idle_timeout,
            exe: std::env::current_exe().context("cannot find the hubsync executable")?,
            remote_command,
        })
    }
}

/// A label safe inside a file name.
pub fn sanitize(s: &str) -> String {
    let t: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if t.is_empty() { "peer".into() } else { t }
}
