//! `hubsync check`: everything a run needs, tested without changing anything, one
//! line per check. Peers are opened exactly as a run opens them (same transports,
//! same timeouts, all at once), then closed without scanning.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::archive::ReplicaId;
use crate::config::{Settings, Target};
use crate::lock::Lock;
use crate::proto::{Open, PROTOCOL_VERSION, Request, Response};
use crate::transport;

use super::conn::{Conn, Event};

/// One line of the verdict.
#[derive(Debug, Clone)]
pub struct CheckLine {
    pub ok: bool,
    pub text: String,
}

fn line(ok: bool, text: impl Into<String>) -> CheckLine {
    CheckLine {
        ok,
        text: text.into(),
    }
}

/// Checks the settings and every peer.
pub fn check(s: &Settings) -> Vec<CheckLine> {
    let mut out = Vec::new();
    out.push(line(
        true,
        format!(
            "config {}: root {}, {} peer(s), {} exclude pattern(s)",
            s.config_file
                .as_ref()
                .map_or("(command line)".into(), |p| p.display().to_string()),
            s.root.display(),
            s.peers.len(),
            s.excludes.len()
        ),
    ));
    match crate::scan::check_root(&s.root) {
        Err(e) => out.push(line(false, format!("hub root: {e:#}"))),
        Ok(()) => {
            let probe = s.root.join(crate::exclude::temp_name());
            let writable = std::fs::File::create_new(&probe).is_ok();
            let _ = std::fs::remove_file(&probe);
            out.push(line(
                writable,
                format!(
                    "hub root {} exists{}",
                    s.root.display(),
                    if writable {
                        " and is writable"
                    } else {
                        " but is NOT writable"
                    }
                ),
            ));
            match Lock::acquire(&s.root, &s.state_dir) {
                Ok(_) => out.push(line(
                    true,
                    format!("hub lock in {} is free", s.state_dir.display()),
                )),
                Err(e) => out.push(line(false, format!("hub: {e}"))),
            }
        }
    }

    let (tx, rx) = mpsc::sync_channel(1024);
    let mut conns: Vec<Conn> = Vec::new();
    for (i, p) in s.peers.iter().enumerate() {
        let connect: Box<dyn FnOnce() -> Result<transport::Link, String> + Send> =
            match p.target.clone() {
                Target::Local(path) => {
                    let exe = s.exe.clone();
                    let cmd = Some(p.ssh.remote_command.clone()).filter(|c| !c.is_empty());
                    Box::new(move || {
                        transport::spawn_local(&exe, cmd.as_deref(), &path)
                            .map_err(|e| e.to_string())
                    })
                }
                Target::Ssh(t) => {
                    let o = p.ssh.clone();
                    match o.ssh_command.clone() {
                        Some(w) => Box::new(move || {
                            transport::ssh::spawn_openssh(&t, &o, &w).map_err(|e| e.to_string())
                        }),
                        None => Box::new(move || transport::libssh2::connect(&t, &o)),
                    }
                }
            };
        let mut c = Conn::connect(i, p.label.clone(), tx.clone(), connect);
        c.send(Request::Open(Open {
            hub: ReplicaId([0; 16]),
            label: p.label.clone(),
            excludes: s.excludes.clone(),
            pair: None,
            dry_run: true,
            pair_replica: None,
            check: true,
            conflict_retention: None,
            after_install: Vec::new(),
            post_apply: None,
        }));
        conns.push(c);
    }
    drop(tx);

    let started = Instant::now();
    let mut results: Vec<Option<Vec<CheckLine>>> = vec![None; s.peers.len()];
    while results.iter().any(Option::is_none) {
        let Ok(inc) = rx.recv_timeout(Duration::from_millis(100)) else {
            for (i, p) in s.peers.iter().enumerate() {
                let limit = p.timeout + p.ssh.connect_timeout * 3;
                if results[i].is_none() && started.elapsed() > limit {
                    conns[i].fail("no answer".into());
                    results[i] = Some(vec![line(
                        false,
                        format!("{}: no answer within {:.0} s", p.label, limit.as_secs_f64()),
                    )]);
                }
            }
            continue;
        };
        let (i, label) = (inc.replica, &s.peers[inc.replica].label);
        if results[i].is_some() {
            continue;
        }
        let url = match &s.peers[i].target {
            Target::Local(p) => p.display().to_string(),
            Target::Ssh(t) => t.key(),
        };
        results[i] = match inc.event {
            Event::Response(Response::Opened(o)) => {
                let offset =
                    (o.time.as_nanos() - crate::version::Mtime::now().as_nanos()) as f64 / 1e9;
                let skew_ok = offset.abs() <= s.max_clock_skew.as_secs_f64();
                let writable = o.writable.unwrap_or(false);
                Some(vec![
                    line(
                        true,
                        format!(
                            "{label}: reachable at {url} (host {}), host key and login accepted",
                            o.hostname
                        ),
                    ),
                    line(
                        true,
                        format!("{label}: speaks hubsync protocol {PROTOCOL_VERSION}"),
                    ),
                    line(
                        skew_ok,
                        format!(
                            "{label}: clock {offset:+.2} s from the hub's{}",
                            if skew_ok {
                                ""
                            } else {
                                " — more than --max-clock-skew; conflicts with it would be left unresolved"
                            }
                        ),
                    ),
                    line(
                        writable,
                        format!(
                            "{label}: root exists{}, its lock is free",
                            if writable {
                                " and is writable"
                            } else {
                                " but is NOT writable"
                            }
                        ),
                    ),
                ])
            }
            Event::Response(Response::Fatal(msg)) => {
                Some(vec![line(false, format!("{label}: {msg}"))])
            }
            Event::Closed(why) => {
                conns[i].close();
                let _ = conns[i].wait(Duration::from_secs(1));
                let stderr = conns[i].stderr();
                let mut msg = why.unwrap_or_else(|| "the connection closed".into());
                if !stderr.is_empty() {
                    msg = format!("{msg}; it said: {stderr}{}", super::hint(&stderr));
                }
                Some(vec![line(false, format!("{label}: {msg}"))])
            }
            _ => None,
        };
    }
    for c in &mut conns {
        c.close();
    }
    for c in &mut conns {
        let _ = c.wait(Duration::from_secs(5));
    }
    out.extend(results.into_iter().flatten().flatten());
    out
}
