//! The command line: clap types, and the glue from parsed arguments to a run and an
//! exit code. Nothing below this module sees clap.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{ArgAction, Args, CommandFactory, Parser, Subcommand};

use crate::config::{Overrides, Settings, parse_duration};
use crate::hub::{self, RunError};
use crate::lock::LockError;
use crate::report::Verbosity;

/// Exit codes (documented in README.md).
pub const EXIT_OK: u8 = 0;
pub const EXIT_ERROR: u8 = 1;
pub const EXIT_PARTIAL: u8 = 2;
pub const EXIT_LOCKED: u8 = 75;

#[derive(Parser, Debug)]
#[command(
    name = "hubsync",
    version,
    about = "Keep one directory tree identical on several servers",
    long_about = "Keep one directory tree identical on several servers.\n\n\
        The hub scans its root and every peer, works out what changed since the last \
        run, and propagates it. Conflicts go to the newest mtime; the losing version \
        is kept under .hubsync/conflicts/ on the replica where it was replaced.\n\n\
        Exit codes: 0 all replicas in sync, 1 error, 2 some peers failed while others \
        synced, 75 another run holds the lock."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Synchronize ROOT with every PEER (once, or --every DURATION).
    Sync(SyncArgs),
    /// Check the config and every peer: reachable, host key, login, version, clock,
    /// root writable, lock free.
    Check(SyncArgs),
    /// Is it healthy? The last run, and how long since each peer last synced.
    Status(StatusArgs),
    /// List the kept losers of conflicts, or restore one.
    Conflicts(ConflictsArgs),
    /// Serve ROOT on stdin/stdout for a hub (started by the hub, not by hand).
    Serve {
        /// The replica's root directory.
        root: PathBuf,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) to stdout.
    Man,
}

#[derive(Args, Debug, Clone)]
pub struct SyncArgs {
    /// The hub's own replica root [default: `root` from the config file].
    pub root: Option<PathBuf>,
    /// Other replicas: local directories, or SSH peers as ssh://[user@]host[:port]/path
    /// or [user@]host:/path [default: the [[peer]] tables of the config file].
    pub peers: Vec<String>,
    /// The config file [default: $HUBSYNC_CONFIG, or /etc/hubsync/hubsync.toml when
    /// no ROOT is given].
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Show what would be done; change nothing.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// Print the plan and the summary as one JSON document on stdout.
    #[arg(long)]
    pub json: bool,
    /// Leave matching paths alone on every replica (repeatable). Without '/', the
    /// pattern matches a name at any depth (`*.tmp`); with '/', a path from the root
    /// (`data/cache/**`).
    #[arg(long = "exclude", value_name = "GLOB")]
    pub excludes: Vec<String>,
    /// Sync an application's data directory the way it needs: `dokuwiki` (ROOT is
    /// DokuWiki's data directory; see examples/dokuwiki.toml for what it does).
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,
    /// List every action.
    #[arg(short, long, action = ArgAction::Count)]
    pub verbose: u8,
    /// Print only errors.
    #[arg(short, long, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Carry out deletions that the safety checks would refuse (an empty replica
    /// root, or more than half of a replica's files deleted at once).
    #[arg(long)]
    pub force_deletions: bool,
    /// Give up on a peer that owes an answer and says nothing for this long [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Give up connecting to an SSH peer after this long; the SSH handshake and login
    /// get twice as long [default: 5s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub connect_timeout: Option<Duration>,
    /// The command that runs hubsync on a peer [default: `hubsync` on SSH peers, this
    /// executable on local ones].
    #[arg(long, value_name = "COMMAND")]
    pub remote_command: Option<String>,
    /// Reach SSH peers with the system OpenSSH client, run as this command (e.g.
    /// "ssh" or "ssh -o ControlMaster=auto -o ControlPath=~/.ssh/cm-%C -o ControlPersist=60").
    /// It honours ~/.ssh/config. Without it hubsync speaks SSH itself (libssh2).
    #[arg(long, value_name = "COMMAND")]
    pub ssh_command: Option<String>,
    /// Private key for SSH peers [default: ssh-agent, then ~/.ssh/id_ed25519, id_ecdsa, id_rsa].
    #[arg(short = 'i', long, value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// Verify SSH host keys against FILE instead of ~/.ssh/known_hosts
    /// (/etc/ssh/ssh_known_hosts is read too).
    #[arg(long, value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,
    /// Add the host key of a peer seen for the first time (never replaces a changed key).
    #[arg(long)]
    pub accept_new_host_key: bool,
    /// Leave conflicts with a peer unresolved when its clock differs from the hub's by
    /// more than this (newest-mtime resolution trusts clocks) [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub max_clock_skew: Option<Duration>,
    /// Keep the hub's state (locks, agreed states, status) here [default: ROOT/.hubsync].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Write Prometheus metrics to FILE after each run (for node_exporter's textfile
    /// collector).
    #[arg(long, value_name = "FILE")]
    pub metrics_file: Option<PathBuf>,
    /// Run again DURATION after each run ends, until SIGTERM (for hosts without systemd).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub every: Option<Duration>,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The hub's root [default: from the config file].
    pub root: Option<PathBuf>,
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
    /// Unhealthy when the last run, or a peer's last successful sync, is older than this.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub max_age: Duration,
}

#[derive(Args, Debug)]
pub struct ConflictsArgs {
    /// The replica root whose conflict copies to list [default: from the config file].
    pub root: Option<PathBuf>,
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Put this conflict copy back in place (the version there now is kept as a
    /// conflict copy in turn; the next sync spreads the restored one).
    #[arg(long, value_name = "COPY")]
    pub restore: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

impl SyncArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            config: self.config.clone(),
            root: self.root.clone(),
            peers: self.peers.clone(),
            excludes: self.excludes.clone(),
            dry_run: self.dry_run,
            force_deletions: self.force_deletions,
            verbosity: Some(match (self.quiet, self.verbose) {
                (true, _) => Verbosity::Quiet,
                (false, 0) => Verbosity::Normal,
                _ => Verbosity::Verbose,
            }),
            json: self.json,
            timeout: self.timeout,
            connect_timeout: self.connect_timeout,
            remote_command: self.remote_command.clone(),
            ssh_command: self.ssh_command.clone(),
            identity: self.identity.clone(),
            known_hosts: self.known_hosts.clone(),
            accept_new_host_key: self.accept_new_host_key,
            max_clock_skew: self.max_clock_skew,
            state_dir: self.state_dir.clone(),
            metrics_file: self.metrics_file.clone(),
            profile: self.profile.clone(),
        }
    }
}

/// Runs the command line; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Serve { root } => match crate::server::serve(&root) {
            Ok(()) => EXIT_OK,
            Err(e) => {
                eprintln!("hubsync serve: {e:#}");
                EXIT_ERROR
            }
        },
        Command::Sync(args) => sync(args),
        Command::Check(args) => check(args),
        Command::Status(args) => status(args),
        Command::Conflicts(args) => conflicts(args),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "hubsync",
                &mut std::io::stdout(),
            );
            EXIT_OK
        }
        Command::Man => {
            match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
                Ok(()) => EXIT_OK,
                Err(e) => {
                    eprintln!("hubsync: {e}");
                    EXIT_ERROR
                }
            }
        }
    };
    ExitCode::from(code)
}

fn settings(a: &SyncArgs) -> Result<Settings, u8> {
    Settings::resolve(a.overrides()).map_err(|e| {
        eprintln!("hubsync: error: {e:#}");
        EXIT_ERROR
    })
}

/// Set by SIGTERM or SIGINT: finish the run under way, then stop. A second signal
/// stops at once.
fn stop_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 1, flag.clone());
        let _ = signal_hook::flag::register(sig, flag.clone());
    }
    flag
}

fn sync(a: SyncArgs) -> u8 {
    let settings = match settings(&a) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let stop = stop_flag();
    let Some(every) = a.every else {
        return sync_once(&settings);
    };
    let mut code;
    loop {
        code = sync_once(&settings);
        // The next run starts `every` after this one ended: runs never pile up.
        let until = Instant::now() + every;
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50).min(until - Instant::now()));
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
    }
    if settings.verbosity >= Verbosity::Normal {
        eprintln!("hubsync: stopped by a signal after the last run finished");
    }
    if code == EXIT_LOCKED { EXIT_OK } else { code }
}

fn sync_once(settings: &Settings) -> u8 {
    match hub::run(settings) {
        Ok(outcome) => {
            if settings.json {
                outcome
                    .report
                    .print_json(outcome.plan.as_ref(), &outcome.labels);
                // Problems still go to stderr, for whoever reads the journal.
                for e in &outcome.report.errors {
                    eprintln!("hubsync: error: {e}");
                }
            } else {
                outcome
                    .report
                    .print(outcome.plan.as_ref(), &outcome.labels, settings.verbosity);
            }
            match outcome.report.exit_code {
                0 => EXIT_OK,
                2 => EXIT_PARTIAL,
                _ => EXIT_ERROR,
            }
        }
        Err(RunError::Locked(e @ LockError::Held { .. })) => {
            eprintln!("hubsync: {e}; not starting a second run");
            EXIT_LOCKED
        }
        // Not another run: a lock that cannot be taken at all (a read-only or
        // broken root) is an error, not the "try later" that 75 means.
        Err(RunError::Locked(e)) => {
            eprintln!("hubsync: error: {e}");
            EXIT_ERROR
        }
        Err(RunError::Failed(e)) => {
            eprintln!("hubsync: error: {e:#}");
            EXIT_ERROR
        }
    }
}

fn check(a: SyncArgs) -> u8 {
    let settings = match settings(&a) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let lines = hub::check(&settings);
    let mut failed = false;
    for l in &lines {
        println!("{}  {}", if l.ok { "ok  " } else { "FAIL" }, l.text);
        failed |= !l.ok;
    }
    if failed { EXIT_ERROR } else { EXIT_OK }
}

fn status(a: StatusArgs) -> u8 {
    let ov = Overrides {
        config: a.config.clone(),
        root: a.root.clone(),
        state_dir: a.state_dir.clone(),
        ..Default::default()
    };
    let state_dir = match crate::status::state_dir_for(&ov) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("hubsync: error: {e:#}");
            return EXIT_ERROR;
        }
    };
    match crate::status::Status::load(&state_dir) {
        Ok(st) => {
            let health = st.health(a.max_age);
            if a.json {
                st.print_json(&health);
            } else {
                st.print(&health);
            }
            if health.healthy { EXIT_OK } else { EXIT_ERROR }
        }
        Err(e) => {
            eprintln!("hubsync: {e:#}");
            EXIT_ERROR
        }
    }
}

fn conflicts(a: ConflictsArgs) -> u8 {
    let ov = Overrides {
        config: a.config.clone(),
        root: a.root.clone(),
        ..Default::default()
    };
    let root = match crate::status::root_for(&ov) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hubsync: error: {e:#}");
            return EXIT_ERROR;
        }
    };
    if let Some(copy) = &a.restore {
        return match crate::conflicts::restore(&root, copy) {
            Ok(msg) => {
                println!("{msg}");
                EXIT_OK
            }
            Err(e) => {
                eprintln!("hubsync: error: {e:#}");
                EXIT_ERROR
            }
        };
    }
    match crate::conflicts::list(&root) {
        Ok(list) => {
            crate::conflicts::print(&list, a.json);
            EXIT_OK
        }
        Err(e) => {
            eprintln!("hubsync: error: {e:#}");
            EXIT_ERROR
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_shape() {
        Cli::command().debug_assert();
    }
}
