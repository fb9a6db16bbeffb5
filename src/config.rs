//! The resolved, checked settings of a run.
//!
//! Two sources, parsed first and resolved second (the engine never sees raw flags):
//! the TOML config file (`--config FILE`, `HUBSYNC_CONFIG`, or
//! `/etc/hubsync/hubsync.toml` when no ROOT is given) and the command line, which
//! overrides it. Every rejection names the file and line and says what to write
//! instead.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use toml::Spanned;

use crate::exclude::Excludes;
use crate::report::Verbosity;
use crate::transport::ssh::{SshOptions, SshTarget};

/// Where the config file is looked for when none is named.
pub const DEFAULT_CONFIG: &str = "/etc/hubsync/hubsync.toml";
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(30);
pub const DEFAULT_CONFLICT_RETENTION: Duration = Duration::from_secs(30 * 86_400);

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
    /// Short name used in messages, metrics and conflict-copy names.
    pub label: String,
    /// Identifies the peer across runs (keys the hub's copy of the pair's state).
    pub key: String,
    pub target: Target,
    /// How to reach it (SSH options, remote command).
    pub ssh: SshOptions,
    /// It is given up when it owes us something and says nothing for this long.
    pub timeout: Duration,
}

/// Everything a `sync` run needs to know.
#[derive(Clone, Debug)]
pub struct Settings {
    pub root: PathBuf,
    /// The hub's state: locks, agreed states, scan cache, status (default
    /// `ROOT/.hubsync`; outside the root, an unmounted root is told apart from an
    /// empty one).
    pub state_dir: PathBuf,
    pub peers: Vec<PeerSpec>,
    pub excludes: Vec<String>,
    pub dry_run: bool,
    pub force_deletions: bool,
    /// A run may delete at most this fraction of a replica's files (and more than a
    /// handful) without `--force-deletions`.
    pub deletion_threshold: f64,
    pub verbosity: Verbosity,
    pub json: bool,
    /// This executable, started as `serve` for local peers.
    pub exe: PathBuf,
    /// Above this clock difference, a peer's conflicts are left unresolved.
    pub max_clock_skew: Duration,
    /// Conflict copies older than this are removed.
    pub conflict_retention: Duration,
    pub metrics_file: Option<PathBuf>,
    /// Where the file came from, if there was one (for messages).
    pub config_file: Option<PathBuf>,
    /// Files merged line by line instead of one version winning.
    pub merges: Vec<crate::merge::MergeRule>,
    /// The profile in use (`dokuwiki`), if any.
    pub profile: Option<String>,
    /// Files that belong together (see `rules.rs`).
    pub bundles: Vec<crate::rules::Bundle>,
    /// Globs of files each receiver installs before, and after, all others.
    pub install_first: Vec<String>,
    pub install_last: Vec<String>,
    /// What each replica invalidates after installing files (checked; sent to peers).
    pub after_install: Vec<crate::rules::AfterInstallRule>,
    /// A command each replica runs in its root after it applied changes, with the
    /// changed paths on stdin.
    pub post_apply: Option<String>,
}

/// What the command line says; `None`/empty means "not given".
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub root: Option<PathBuf>,
    pub peers: Vec<String>,
    pub excludes: Vec<String>,
    pub dry_run: bool,
    pub force_deletions: bool,
    pub verbosity: Option<Verbosity>,
    pub json: bool,
    pub timeout: Option<Duration>,
    pub connect_timeout: Option<Duration>,
    pub remote_command: Option<String>,
    pub ssh_command: Option<String>,
    pub identity: Option<PathBuf>,
    pub known_hosts: Option<PathBuf>,
    pub accept_new_host_key: bool,
    pub max_clock_skew: Option<Duration>,
    pub state_dir: Option<PathBuf>,
    pub metrics_file: Option<PathBuf>,
    pub profile: Option<String>,
}

/// The config file as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    root: Option<Spanned<String>>,
    state_dir: Option<Spanned<String>>,
    #[serde(default)]
    exclude: Vec<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    max_clock_skew: Option<Spanned<String>>,
    conflict_retention: Option<Spanned<String>>,
    deletion_threshold: Option<Spanned<f64>>,
    remote_command: Option<String>,
    ssh_command: Option<String>,
    identity: Option<Spanned<String>>,
    known_hosts: Option<Spanned<String>>,
    accept_new_host_key: Option<bool>,
    metrics_file: Option<Spanned<String>>,
    #[serde(default, rename = "peer")]
    peers: Vec<FilePeer>,
    #[serde(default, rename = "merge")]
    merges: Vec<Spanned<crate::merge::MergeRule>>,
    profile: Option<Spanned<String>>,
    #[serde(default, rename = "bundle")]
    bundles: Vec<Spanned<crate::rules::BundleRule>>,
    #[serde(default)]
    install_first: Vec<Spanned<String>>,
    #[serde(default)]
    install_last: Vec<Spanned<String>>,
    #[serde(default)]
    after_install: Vec<Spanned<crate::rules::AfterInstallRule>>,
    post_apply: Option<String>,
}

/// What a config file or a profile says about an application's files.
#[derive(Default)]
struct AppRules {
    excludes: Vec<String>,
    merges: Vec<crate::merge::MergeRule>,
    bundles: Vec<crate::rules::Bundle>,
    install_first: Vec<String>,
    install_last: Vec<String>,
    after_install: Vec<crate::rules::AfterInstallRule>,
}

impl AppRules {
    fn of(src: &Source, file: &File) -> Result<AppRules> {
        let mut r = AppRules::default();
        for e in &file.exclude {
            if let Err(err) = Excludes::new(std::slice::from_ref(e.get_ref())) {
                return src.err(e.span(), format!("{err:#}"));
            }
            r.excludes.push(e.get_ref().clone());
        }
        for m in &file.merges {
            if let Err(e) = m.get_ref().check() {
                return src.err(m.span(), e);
            }
            if let Err(e) = globset::Glob::new(&m.get_ref().glob) {
                return src.err(m.span(), format!("merge glob: {e}"));
            }
            r.merges.push(m.get_ref().clone());
        }
        for b in &file.bundles {
            match b.get_ref().compile() {
                Ok(b) => r.bundles.push(b),
                Err(e) => return src.err(b.span(), format!("bundle: {e}")),
            }
        }
        for (list, out) in [
            (&file.install_first, &mut r.install_first),
            (&file.install_last, &mut r.install_last),
        ] {
            for g in list {
                if let Err(e) = globset::Glob::new(g.get_ref()) {
                    return src.err(g.span(), format!("install order glob: {e}"));
                }
                out.push(g.get_ref().clone());
            }
        }
        for a in &file.after_install {
            if let Err(e) = a.get_ref().compile() {
                return src.err(a.span(), format!("after_install: {e}"));
            }
            r.after_install.push(a.get_ref().clone());
        }
        Ok(r)
    }

    fn extend(&mut self, more: AppRules) {
        self.excludes.extend(more.excludes);
        self.merges.extend(more.merges);
        self.bundles.extend(more.bundles);
        self.install_first.extend(more.install_first);
        self.install_last.extend(more.install_last);
        self.after_install.extend(more.after_install);
    }
}

/// Parses a built-in profile: it may only describe files, not a setup.
fn parse_profile(name: &str, text: &str) -> Result<(Source, File)> {
    let src = Source {
        path: PathBuf::from(format!("(profile {name})")),
        text: text.to_string(),
    };
    let file: File = match toml::from_str(&src.text) {
        Ok(f) => f,
        Err(e) => match e.span() {
            Some(span) => return src.err(span, e.message().trim()),
            None => bail!("{}: {}", src.path.display(), e.message().trim()),
        },
    };
    let setup = file.root.is_some()
        || file.state_dir.is_some()
        || !file.peers.is_empty()
        || file.profile.is_some()
        || file.post_apply.is_some();
    if setup {
        bail!(
            "{}: a profile describes files only (no root, peers, profile or post_apply)",
            src.path.display()
        );
    }
    Ok((src, file))
}

/// Checks a built-in profile (for tests).
pub fn check_profile(name: &str, text: &str) -> Result<()> {
    let (src, file) = parse_profile(name, text)?;
    AppRules::of(&src, &file).map(|_| ())
}

/// The rules of the profile called `name`.
fn profile_rules(name: &str) -> Result<AppRules> {
    let Some((_, text)) = crate::rules::PROFILES.iter().find(|(n, _)| *n == name) else {
        let known: Vec<&str> = crate::rules::PROFILES.iter().map(|(n, _)| *n).collect();
        bail!("unknown profile {name:?} (there is {})", known.join(", "));
    };
    let (src, file) = parse_profile(name, text)?;
    AppRules::of(&src, &file)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePeer {
    name: Spanned<String>,
    url: Spanned<String>,
    identity: Option<Spanned<String>>,
    known_hosts: Option<Spanned<String>>,
    port: Option<Spanned<u16>>,
    remote_command: Option<String>,
    ssh_command: Option<String>,
    timeout: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
}

/// A config file with its text, for line numbers.
struct Source {
    path: PathBuf,
    text: String,
}

impl Source {
    fn line(&self, span: Range<usize>) -> usize {
        let before = &self.text.as_bytes()[..span.start.min(self.text.len())];
        before.iter().filter(|&&b| b == b'\n').count() + 1
    }

    /// "FILE line N: MSG".
    fn err<T>(&self, span: Range<usize>, msg: impl std::fmt::Display) -> Result<T> {
        bail!("{} line {}: {msg}", self.path.display(), self.line(span))
    }

    fn duration(&self, v: &Option<Spanned<String>>) -> Result<Option<Duration>> {
        match v {
            None => Ok(None),
            Some(s) => match parse_duration(s.get_ref()) {
                Ok(d) => Ok(Some(d)),
                Err(e) => self.err(s.span(), e),
            },
        }
    }

    fn abs_path(&self, v: &Option<Spanned<String>>, what: &str) -> Result<Option<PathBuf>> {
        match v {
            None => Ok(None),
            Some(s) if Path::new(s.get_ref()).is_absolute() => Ok(Some(s.get_ref().into())),
            Some(s) => self.err(
                s.span(),
                format!(
                    "{what} {:?} must be an absolute path (like /var/www/wiki/data)",
                    s.get_ref()
                ),
            ),
        }
    }
}

/// Parses `10s`, `500ms`, `2m`, `1h`, `30d`, or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 10s, 500ms, 2m or 30d"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        u => return Err(format!("{s:?}: unknown unit {u:?} (use ms, s, m, h or d)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(secs))
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

/// Which config file applies, if any: `--config`, then `HUBSYNC_CONFIG`, then the
/// default when no ROOT was given.
pub fn config_path(cli: &Overrides) -> Option<PathBuf> {
    cli.config
        .clone()
        .or_else(|| std::env::var_os("HUBSYNC_CONFIG").map(PathBuf::from))
        .or_else(|| cli.root.is_none().then(|| PathBuf::from(DEFAULT_CONFIG)))
}

fn load(path: &Path) -> Result<(Source, File)> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow::anyhow!(
                "no config file at {}; write one (see examples/hubsync.toml) or give ROOT and PEERs on the command line",
                path.display()
            )
        } else {
            anyhow::anyhow!("cannot read {}: {e}", path.display())
        }
    })?;
    let src = Source {
        path: path.to_path_buf(),
        text,
    };
    let file: File = match toml::from_str(&src.text) {
        Ok(f) => f,
        Err(e) => {
            let hint = if e.message().contains("unknown field") {
                " (check the spelling against examples/hubsync.toml)"
            } else {
                ""
            };
            return match e.span() {
                Some(span) => src.err(span, format!("{}{hint}", e.message().trim())),
                None => bail!("{}: {}{hint}", src.path.display(), e.message().trim()),
            };
        }
    };
    Ok((src, file))
}

/// The root and state directory, from ROOT or the config file (for `status` and
/// `conflicts`, which need no peers).
pub fn locate(cli: &Overrides) -> Result<(PathBuf, PathBuf)> {
    let (src, file) = match config_path(cli) {
        Some(p) => load(&p)?,
        None => (
            Source {
                path: PathBuf::from("(command line)"),
                text: String::new(),
            },
            File::default(),
        ),
    };
    let root = match &cli.root {
        Some(r) => absolute(r)?,
        None => match src.abs_path(&file.root, "root")? {
            Some(r) => r,
            None => bail!(
                "no root: give ROOT or `root = \"/path\"` in {}",
                src.path.display()
            ),
        },
    };
    let state = match (&cli.state_dir, src.abs_path(&file.state_dir, "state_dir")?) {
        (Some(d), _) => absolute(d)?,
        (None, Some(d)) => d,
        (None, None) => root.join(crate::exclude::STATE_DIR),
    };
    Ok((root, state))
}

impl Settings {
    /// Resolves the command line and the config file (if any) into settings.
    pub fn resolve(cli: Overrides) -> Result<Settings> {
        let config_file = config_path(&cli);
        let (src, file) = match &config_file {
            Some(p) => {
                let (s, f) = load(p)?;
                (Some(s), f)
            }
            None => (None, File::default()),
        };
        let src = src.unwrap_or(Source {
            path: PathBuf::from("(command line)"),
            text: String::new(),
        });

        let root = match (&cli.root, &file.root) {
            (Some(r), _) => absolute(r)?,
            (None, Some(_)) => src.abs_path(&file.root, "root")?.expect("given"),
            (None, None) => bail!(
                "no root: give ROOT on the command line or `root = \"/path\"` in {}",
                src.path.display()
            ),
        };
        let state_dir = match (&cli.state_dir, src.abs_path(&file.state_dir, "state_dir")?) {
            (Some(d), _) => absolute(d)?,
            (None, Some(d)) => d,
            (None, None) => root.join(crate::exclude::STATE_DIR),
        };

        let profile = match (&cli.profile, &file.profile) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(p)) => Some(p.get_ref().clone()),
            (None, None) => None,
        };
        let mut rules = match (&profile, &file.profile) {
            (Some(p), Some(sp)) if cli.profile.is_none() => match profile_rules(p) {
                Ok(r) => r,
                Err(e) => return src.err(sp.span(), format!("{e:#}")),
            },
            (Some(p), _) => profile_rules(p)?,
            (None, _) => AppRules::default(),
        };
        rules.extend(AppRules::of(&src, &file)?);
        let mut excludes = std::mem::take(&mut rules.excludes);
        excludes.extend(cli.excludes.iter().cloned());
        Excludes::new(&excludes)?;

        let timeout = cli
            .timeout
            .or(src.duration(&file.timeout)?)
            .unwrap_or(DEFAULT_TIMEOUT);
        let connect_timeout = cli
            .connect_timeout
            .or(src.duration(&file.connect_timeout)?)
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let base_ssh = SshOptions {
            remote_command: cli
                .remote_command
                .clone()
                .or(file.remote_command.clone())
                .unwrap_or_else(|| "hubsync".into()),
            ssh_command: words(cli.ssh_command.clone().or(file.ssh_command.clone())),
            identity: match &cli.identity {
                Some(p) => Some(absolute(p)?),
                None => src.abs_path(&file.identity, "identity")?,
            },
            known_hosts: match &cli.known_hosts {
                Some(p) => Some(absolute(p)?),
                None => src.abs_path(&file.known_hosts, "known_hosts")?,
            },
            accept_new_host_key: cli.accept_new_host_key
                || file.accept_new_host_key.unwrap_or(false),
            connect_timeout,
        };
        // A local peer runs this executable unless a command was given explicitly.
        let local_command = cli.remote_command.clone().or(file.remote_command.clone());

        let mut peers: Vec<PeerSpec> = Vec::new();
        if !cli.peers.is_empty() {
            for p in &cli.peers {
                let spec = peer_spec(
                    p,
                    None,
                    &root,
                    &peers,
                    base_ssh.clone(),
                    timeout,
                    &local_command,
                )?;
                peers.push(spec);
            }
        } else {
            for fp in &file.peers {
                let name = fp.name.get_ref();
                if name.is_empty() || crate::config::sanitize(name) != *name || name == "hub" {
                    return src.err(
                        fp.name.span(),
                        format!("peer name {name:?} must be non-empty, not \"hub\", and use only letters, digits, '-', '_' and '.'"),
                    );
                }
                if peers.iter().any(|p| p.label == *name) {
                    return src.err(
                        fp.name.span(),
                        format!("a second peer named {name:?}; peer names must be unique"),
                    );
                }
                let mut ssh = base_ssh.clone();
                if let Some(c) = &fp.remote_command {
                    ssh.remote_command = c.clone();
                }
                if let Some(c) = &fp.ssh_command {
                    ssh.ssh_command = words(Some(c.clone()));
                }
                if let Some(p) = src.abs_path(&fp.identity, "identity")? {
                    ssh.identity = Some(p);
                }
                if let Some(p) = src.abs_path(&fp.known_hosts, "known_hosts")? {
                    ssh.known_hosts = Some(p);
                }
                if let Some(d) = src.duration(&fp.connect_timeout)? {
                    ssh.connect_timeout = d;
                }
                let t = src.duration(&fp.timeout)?.unwrap_or(timeout);
                let local = fp.remote_command.clone().or(local_command.clone());
                let mut spec =
                    match peer_spec(fp.url.get_ref(), Some(name), &root, &peers, ssh, t, &local) {
                        Ok(s) => s,
                        Err(e) => return src.err(fp.url.span(), format!("{e:#}")),
                    };
                if let Some(port) = &fp.port {
                    match &mut spec.target {
                        Target::Ssh(t) => {
                            t.port = *port.get_ref();
                            spec.key = t.key();
                        }
                        Target::Local(_) => {
                            return src.err(port.span(), "`port` applies only to SSH peers");
                        }
                    }
                }
                peers.push(spec);
            }
        }
        if peers.is_empty() {
            bail!(
                "no peers: give them on the command line (hubsync sync ROOT PEER...) or as [[peer]] tables in {}",
                src.path.display()
            );
        }
        if peers.len() >= crate::plan::MAX_REPLICAS {
            bail!(
                "{} peers given; one hub syncs at most {} (split them among hubs)",
                peers.len(),
                crate::plan::MAX_REPLICAS - 1
            );
        }
        let deletion_threshold = match &file.deletion_threshold {
            Some(t) if !(0.0..=1.0).contains(t.get_ref()) => {
                return src.err(
                    t.span(),
                    "deletion_threshold is a fraction between 0 and 1, like 0.5",
                );
            }
            Some(t) => *t.get_ref(),
            None => 0.5,
        };
        Ok(Settings {
            root,
            state_dir,
            peers,
            excludes,
            dry_run: cli.dry_run,
            force_deletions: cli.force_deletions,
            deletion_threshold,
            verbosity: cli.verbosity.unwrap_or(Verbosity::Normal),
            json: cli.json,
            exe: std::env::current_exe().context("cannot find the hubsync executable")?,
            max_clock_skew: cli
                .max_clock_skew
                .or(src.duration(&file.max_clock_skew)?)
                .unwrap_or(DEFAULT_MAX_CLOCK_SKEW),
            conflict_retention: src
                .duration(&file.conflict_retention)?
                .unwrap_or(DEFAULT_CONFLICT_RETENTION),
            metrics_file: match &cli.metrics_file {
                Some(p) => Some(absolute(p)?),
                None => src.abs_path(&file.metrics_file, "metrics_file")?,
            },
            config_file,
            merges: rules.merges,
            profile,
            bundles: rules.bundles,
            install_first: rules.install_first,
            install_last: rules.install_last,
            after_install: rules.after_install,
            post_apply: file.post_apply.clone().filter(|c| !c.trim().is_empty()),
        })
    }
}

fn words(s: Option<String>) -> Option<Vec<String>> {
    s.map(|c| c.split_whitespace().map(String::from).collect::<Vec<_>>())
        .filter(|w| !w.is_empty())
}

/// Turns one peer argument (a path or an SSH URL) into a spec.
fn peer_spec(
    arg: &str,
    name: Option<&str>,
    root: &Path,
    others: &[PeerSpec],
    mut ssh: SshOptions,
    timeout: Duration,
    local_command: &Option<String>,
) -> Result<PeerSpec> {
    if let Some(t) = SshTarget::parse(arg)? {
        let key = t.key();
        if others.iter().any(|s| s.key == key) {
            bail!("peer {arg} is given twice");
        }
        // A host name's first label (web2 of web2.example.org); an address whole.
        let base = if t.host.parse::<std::net::IpAddr>().is_ok() {
            sanitize(&t.host)
        } else {
            sanitize(t.host.split('.').next().unwrap_or(&t.host))
        };
        return Ok(PeerSpec {
            label: name.map_or_else(|| unique_label(&base, others), String::from),
            key,
            target: Target::Ssh(t),
            ssh,
            timeout,
        });
    }
    let path = absolute(Path::new(arg))?;
    if path == root || path.starts_with(root) || root.starts_with(&path) {
        bail!(
            "peer {} overlaps the hub's root {}; replicas must be separate trees",
            path.display(),
            root.display()
        );
    }
    if others
        .iter()
        .any(|s| s.target == Target::Local(path.clone()))
    {
        bail!("peer {} is given twice", path.display());
    }
    let base = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "root".into());
    // For local peers, `remote_command` replaces this executable only if given.
    ssh.remote_command = local_command.clone().unwrap_or_default();
    Ok(PeerSpec {
        label: name.map_or_else(|| unique_label(&sanitize(&base), others), String::from),
        key: format!("local:{}", path.display()),
        target: Target::Local(path),
        ssh,
        timeout,
    })
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

#[cfg(test)]
mod tests;
