//! SSH peers: how they are written, and the two ways to reach them.
//!
//! `ssh://[user@]host[:port]/path` or scp-style `[user@]host:/path`. By default the
//! hub speaks SSH itself through libssh2 (see `libssh2.rs`); `--ssh-command` runs the
//! system OpenSSH client instead, on pipes exactly like a local peer, which honours
//! the admin's `~/.ssh/config` (ProxyJump, certificates, ControlMaster).

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};

use super::{Link, spawn};
use crate::util::shell_quote;

/// Where an SSH peer lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SshTarget {
    pub user: Option<String>,
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl SshTarget {
    /// Parses a peer argument; `Ok(None)` when it is a local path.
    pub fn parse(s: &str) -> Result<Option<SshTarget>> {
        if let Some(rest) = s.strip_prefix("ssh://") {
            let (authority, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => bail!(
                    "{s:?}: an ssh:// peer needs an absolute path after the host, like ssh://web2/var/www/wiki/data"
                ),
            };
            let (user, hostport) = split_user(authority);
            let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
                let (h, rest) = v6
                    .split_once(']')
                    .ok_or_else(|| anyhow::anyhow!("{s:?}: unclosed '[' in the host"))?;
                let port = match rest.strip_prefix(':') {
                    Some(p) => parse_port(s, p)?,
                    None if rest.is_empty() => 22,
                    None => bail!("{s:?}: unexpected {rest:?} after the host"),
                };
                (h.to_string(), port)
            } else {
                match hostport.rsplit_once(':') {
                    Some((h, p)) => (h.to_string(), parse_port(s, p)?),
                    None => (hostport.to_string(), 22),
                }
            };
            if host.is_empty() {
                bail!("{s:?}: no host name");
            }
            return Ok(Some(SshTarget {
                user,
                host,
                port,
                path: path.to_string(),
            }));
        }
        // scp style: a colon before any slash.
        let Some(colon) = s.find(':') else {
            return Ok(None);
        };
        if s[..colon].contains('/') {
            return Ok(None);
        }
        let (user, host) = split_user(&s[..colon]);
        let path = &s[colon + 1..];
        if host.is_empty() {
            bail!("{s:?}: no host name before ':'");
        }
        if !path.starts_with('/') {
            bail!("{s:?}: the path on an SSH peer must be absolute, like web2:/var/www/wiki/data");
        }
        Ok(Some(SshTarget {
            user,
            host: host.to_string(),
            port: 22,
            path: path.to_string(),
        }))
    }

    /// The user to log in as: given, or the local user.
    pub fn user_or_local(&self) -> String {
        self.user.clone().unwrap_or_else(local_user)
    }

    /// A stable name for the peer: `ssh://user@host:port/path`.
    pub fn key(&self) -> String {
        format!(
            "ssh://{}@{}:{}{}",
            self.user_or_local(),
            self.host,
            self.port,
            self.path
        )
    }
}

fn split_user(s: &str) -> (Option<String>, &str) {
    match s.rsplit_once('@') {
        Some((u, h)) => (Some(u.to_string()), h),
        None => (None, s),
    }
}

fn parse_port(s: &str, p: &str) -> Result<u16> {
    p.parse::<u16>()
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| anyhow::anyhow!("{s:?}: {p:?} is not a port number"))
}

/// The name of the user running hubsync.
pub fn local_user() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| {
            let uid = rustix::process::getuid().as_raw();
            std::fs::read_to_string("/etc/passwd").ok().and_then(|p| {
                p.lines().find_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.len() > 2 && f[2] == uid.to_string()).then(|| f[0].to_string())
                })
            })
        })
        .unwrap_or_else(|| "root".into())
}

/// How to reach SSH peers (shared by all of them unless configured per peer).
#[derive(Clone, Debug)]
pub struct SshOptions {
    /// Run `serve` on the peer with this command (default `hubsync`).
    pub remote_command: String,
    /// Use the system OpenSSH client, with these words first (e.g. `ssh -o ...`).
    pub ssh_command: Option<Vec<String>>,
    pub identity: Option<PathBuf>,
    /// Replaces `~/.ssh/known_hosts` (the system-wide file is still read).
    pub known_hosts: Option<PathBuf>,
    pub accept_new_host_key: bool,
    pub connect_timeout: Duration,
}

impl SshOptions {
    /// The command line the peer's shell runs.
    pub fn remote(&self, path: &str) -> String {
        format!("{} serve {}", self.remote_command, shell_quote(path))
    }

    /// The user's known_hosts file (where `--accept-new-host-key` writes).
    pub fn user_known_hosts(&self) -> PathBuf {
        self.known_hosts
            .clone()
            .unwrap_or_else(|| home().join(".ssh/known_hosts"))
    }
}

pub fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// Starts the system `ssh` for `t`, talking to `serve` over its pipes.
pub fn spawn_openssh(t: &SshTarget, o: &SshOptions, words: &[String]) -> io::Result<Link> {
    let mut argv: Vec<String> = words.to_vec();
    let secs = o.connect_timeout.as_secs().max(1);
    for opt in [
        "BatchMode=yes".to_string(),
        format!("ConnectTimeout={secs}"),
        "ServerAliveInterval=2".to_string(),
        "ServerAliveCountMax=2".to_string(),
    ] {
        argv.push("-o".into());
        argv.push(opt);
    }
    if o.accept_new_host_key {
        argv.extend(["-o".into(), "StrictHostKeyChecking=accept-new".into()]);
    }
    if let Some(kh) = &o.known_hosts {
        argv.extend(["-o".into(), format!("UserKnownHostsFile={}", kh.display())]);
    }
    if let Some(id) = &o.identity {
        argv.extend(["-i".into(), id.display().to_string()]);
    }
    argv.extend(["-T".into(), "-e".into(), "none".into()]);
    argv.extend(["-p".into(), t.port.to_string()]);
    if let Some(u) = &t.user {
        argv.extend(["-l".into(), u.clone()]);
    }
    argv.push("--".into());
    argv.push(t.host.clone());
    argv.push(o.remote(&t.path));
    spawn(&argv)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Option<SshTarget> {
        SshTarget::parse(s).unwrap()
    }

    #[test]
    fn url_forms() {
        assert_eq!(
            p("ssh://alice@web2:2222/var/www/wiki data"),
            Some(SshTarget {
                user: Some("alice".into()),
                host: "web2".into(),
                port: 2222,
                path: "/var/www/wiki data".into()
            })
        );
        assert_eq!(p("ssh://web2/srv").unwrap().port, 22);
        assert_eq!(p("ssh://[::1]:2200/srv").unwrap().host, "::1");
        assert_eq!(
            p("bob@web3:/srv/data").unwrap().user.as_deref(),
            Some("bob")
        );
        assert_eq!(p("web3:/srv/data").unwrap().path, "/srv/data");
        assert_eq!(p("/local/path"), None);
        assert_eq!(p("./dir:with:colons"), None);
        assert_eq!(p("relative/dir"), None);
    }

    #[test]
    fn bad_urls_say_why() {
        for bad in [
            "ssh://web2",
            "ssh://web2:port/x",
            "web3:relative",
            ":/x",
            "ssh://:22/x",
        ] {
            let e = SshTarget::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn remote_command_quotes_the_path() {
        let o = SshOptions {
            remote_command: "/usr/local/bin/hubsync".into(),
            ssh_command: None,
            identity: None,
            known_hosts: None,
            accept_new_host_key: false,
            connect_timeout: Duration::from_secs(5),
        };
        assert_eq!(
            o.remote("/srv/it's $HOME"),
            r"/usr/local/bin/hubsync serve '/srv/it'\''s $HOME'"
        );
    }
}
