//! The command line: clap types, and the glue from parsed arguments to a run and an
//! exit code. Nothing below this module sees clap.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand};

use crate::config::Settings;
use crate::hub::{self, RunError};
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
        is kept under .hubsync/conflicts/ on the replica where it was replaced."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Synchronize ROOT with every PEER, once.
    Sync(SyncArgs),
    /// Serve ROOT on stdin/stdout for a hub (started by the hub, not by hand).
    Serve {
        /// The replica's root directory.
        root: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct SyncArgs {
    /// The hub's own replica root.
    pub root: PathBuf,
    /// Other replicas: local directories, or SSH peers as ssh://[user@]host[:port]/path
    /// or [user@]host:/path.
    #[arg(required = true)]
    pub peers: Vec<String>,
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
    /// List every action (repeat for more).
    #[arg(short, long, action = ArgAction::Count)]
    pub verbose: u8,
    /// Print only errors.
    #[arg(short, long, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Carry out deletions that the safety checks would refuse (an empty replica
    /// root, or more than half of a replica's files deleted at once).
    #[arg(long)]
    pub force_deletions: bool,
    /// Give up on a peer that says nothing for this long while we wait for it.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Give up connecting to an SSH peer after this long (TCP; the SSH handshake
    /// and login get twice as long).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// The command that runs hubsync on a peer [default: hubsync on SSH peers, this
    /// executable on local ones].
    #[arg(long, value_name = "COMMAND")]
    pub remote_command: Option<String>,
    /// Reach SSH peers with the system OpenSSH client, run as this command (e.g.
    /// "ssh" or "ssh -o ControlMaster=auto -o ControlPath=~/.ssh/cm-%C -o ControlPersist=60").
    /// It honours ~/.ssh/config. Without it hubsync speaks SSH itself (libssh2).
    #[arg(long, value_name = "COMMAND")]
    pub ssh_command: Option<String>,
    /// Private key for SSH peers (default: ssh-agent, then ~/.ssh/id_ed25519, id_ecdsa, id_rsa).
    #[arg(short = 'i', long, value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// Verify SSH host keys against FILE instead of ~/.ssh/known_hosts
    /// (/etc/ssh/ssh_known_hosts is read too).
    #[arg(long, value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,
    /// Add the host key of a peer seen for the first time (never replaces a changed key).
    #[arg(long)]
    pub accept_new_host_key: bool,
    /// Leave conflicts with a peer unresolved when its clock differs from the hub's
    /// by more than this (newest-mtime resolution trusts clocks).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub max_clock_skew: Duration,
}

/// Parses `10s`, `500ms`, `2m`, or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 10s, 500ms or 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Runs the command line; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { root } => match crate::server::serve(&root) {
            Ok(()) => ExitCode::from(EXIT_OK),
            Err(e) => {
                eprintln!("hubsync serve: {e:#}");
                ExitCode::from(EXIT_ERROR)
            }
        },
        Command::Sync(args) => ExitCode::from(sync(args)),
    }
}

fn sync(a: SyncArgs) -> u8 {
    let verbosity = match (a.quiet, a.verbose) {
        (true, _) => Verbosity::Quiet,
        (false, 0) => Verbosity::Normal,
        _ => Verbosity::Verbose,
    };
    let settings = match Settings::new(
        &a.root,
        &a.peers,
        a.excludes,
        a.dry_run,
        a.force_deletions,
        verbosity,
        a.json,
        a.timeout,
        crate::config::Reach {
            remote_command: a.remote_command,
            ssh_command: a.ssh_command,
            identity: a.identity,
            known_hosts: a.known_hosts,
            accept_new_host_key: a.accept_new_host_key,
            connect_timeout: a.connect_timeout,
            max_clock_skew: a.max_clock_skew,
        },
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("hubsync: error: {e:#}");
            return EXIT_ERROR;
        }
    };
    match hub::run(&settings) {
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
                    .print(outcome.plan.as_ref(), &outcome.labels, verbosity);
            }
            match outcome.report.exit_code {
                0 => EXIT_OK,
                2 => EXIT_PARTIAL,
                _ => EXIT_ERROR,
            }
        }
        Err(RunError::Locked(e)) => {
            eprintln!("hubsync: {e}; not starting a second run");
            EXIT_LOCKED
        }
        Err(RunError::Failed(e)) => {
            eprintln!("hubsync: error: {e:#}");
            EXIT_ERROR
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn command_line_shape() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
