//! The resolved, checked settings of a run. The command line (and, later, a config
//! file) is turned into a [`Settings`] here; nothing below sees raw flags.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::exclude::Excludes;
use crate::report::Verbosity;
use crate::transport::ssh::{SshOptions, SshTarget};

/// Where a peer lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A directory on this machine, served by a child `hubsync serve`.
    Local(PathBuf),
    /// A directory on another machine, reached over SSH.
    Ssh(SshTarget),
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
    /// How SSH peers are reached.
    pub ssh: SshOptions,
    /// Above this clock difference, a peer's conflicts are left unresolved.
    pub max_clock_skew: Duration,
}

/// What the command line (or a config file) says about reaching peers.
#[derive(Clone, Debug, Default)]
pub struct Reach {
    pub remote_command: Option<String>,
    pub ssh_command: Option<String>,
    pub identity: Option<PathBuf>,
    pub known_hosts: Option<PathBuf>,
    pub accept_new_host_key: bool,
    pub connect_timeout: Duration,
    pub max_clock_skew: Duration,
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
        reach: Reach,
    ) -> Result<Settings> {
        let root = absolute(root)?;
        Excludes::new(&excludes)?;
        if peers.is_empty() {
            bail!("no peers given: hubsync sync ROOT PEER...");
        }
        let mut specs: Vec<PeerSpec> = Vec::new();
        for p in peers {
            if let Some(t) = SshTarget::parse(p)? {
                let key = t.key();
                if specs.iter().any(|s| s.key == key) {
                    bail!("peer {p} is given twice");
                }
                // A host name's first label (web2 of web2.example.org); an address whole.
                let base = if t.host.parse::<std::net::IpAddr>().is_ok() {
                    sanitize(&t.host)
                } else {
                    sanitize(t.host.split('.').next().unwrap_or(&t.host))
                };
                let label = unique_label(&base, &specs);
                specs.push(PeerSpec {
                    label,
                    key,
                    target: Target::Ssh(t),
                });
                continue;
            }
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
            let label = unique_label(&sanitize(&base), &specs);
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
            ssh: SshOptions {
                remote_command: reach
                    .remote_command
                    .clone()
                    .unwrap_or_else(|| "hubsync".into()),
                ssh_command: reach
                    .ssh_command
                    .map(|c| c.split_whitespace().map(String::from).collect::<Vec<_>>())
                    .filter(|w| !w.is_empty()),
                identity: reach.identity.map(|p| absolute(&p)).transpose()?,
                known_hosts: reach.known_hosts.map(|p| absolute(&p)).transpose()?,
                accept_new_host_key: reach.accept_new_host_key,
                connect_timeout: reach.connect_timeout,
            },
            remote_command: reach.remote_command,
            max_clock_skew: reach.max_clock_skew,
        })
    }
}

fn unique_label(base: &str, specs: &[PeerSpec]) -> String {
    let mut label = base.to_string();
    let mut n = 2;
    while label == "hub" || specs.iter().any(|s| s.label == label) {
        label = format!("{base}-{n}");
        n += 1;
    }
    label
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
