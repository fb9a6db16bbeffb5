//! SSH peers against a real sshd on 127.0.0.1, through both transports: the built-in
//! libssh2 client and the system OpenSSH client (`--ssh-command`).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::sshd::{Silent, Sshd};
use common::*;

const T0: i64 = 1_700_000_000;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Via {
    Libssh2,
    OpenSsh,
}

const BOTH: [Via; 2] = [Via::Libssh2, Via::OpenSsh];

/// A hub on this machine with SSH peers on one sshd (the peers' roots live on this
/// machine too, reached only through sshd).
struct Net {
    sshd: Sshd,
    via: Via,
    dir: tempfile::TempDir,
    known_hosts: PathBuf,
    identity: PathBuf,
    remote: String,
}

macro_rules! sshd_or_skip {
    () => {
        match Sshd::start() {
            Some(s) => s,
            None => {
                eprintln!("skipped: no sshd (set HUBSYNC_REQUIRE_SSHD=1 to make this fail)");
                return;
            }
        }
    };
}

impl Net {
    fn new(sshd: Sshd, via: Via) -> Net {
        let dir = tempfile::tempdir().unwrap();
        let known_hosts = dir.path().join("known_hosts");
        std::fs::copy(sshd.known_hosts(), &known_hosts).unwrap();
        Net {
            identity: sshd.client_key().to_path_buf(),
            remote: BIN.to_string(),
            sshd,
            via,
            dir,
            known_hosts,
        }
    }

    fn root(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn url(&self, root: &Path) -> String {
        format!(
            "ssh://{}@127.0.0.1:{}{}",
            self.sshd.user(),
            self.sshd.port(),
            root.display()
        )
    }

    /// `hubsync sync HUB PEERS... ARGS` with the options that reach this sshd.
    fn cmd(&self, hub: &Path, peers: &[String], args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("sync").arg(hub).args(peers);
        c.arg("--identity").arg(&self.identity);
        c.arg("--known-hosts").arg(&self.known_hosts);
        c.arg("--remote-command").arg(&self.remote);
        if self.via == Via::OpenSsh {
            c.arg("--ssh-command")
                .arg("ssh -F /dev/null -o IdentitiesOnly=yes -o GlobalKnownHostsFile=/dev/null -o LogLevel=ERROR");
        }
        c.args(args);
        c
    }

    #[track_caller]
    fn sync(&self, code: i32, hub: &Path, peers: &[String], args: &[&str]) -> Run {
        let r = run(self.cmd(hub, peers, args));
        if r.code() != code {
            panic!(
                "[{:?}] expected exit {code}, got {}\n$ {}\n--- stdout\n{}--- stderr\n{}--- sshd log\n{}",
                self.via,
                r.code(),
                r.cmd,
                r.stdout(),
                r.stderr(),
                self.sshd.log()
            );
        }
        r
    }
}

fn converged(roots: &[&Path]) {
    let first = listing(roots[0]);
    for r in &roots[1..] {
        assert_eq!(
            listing(r),
            first,
            "{} differs from {}",
            r.display(),
            roots[0].display()
        );
    }
}

#[test]
fn three_replicas_sync_both_ways_over_ssh() {
    for via in BOTH {
        let net = Net::new(sshd_or_skip!(), via);
        let (hub, p1, p2) = (net.root("hub"), net.root("web2"), net.root("web3"));
        let peers = [net.url(&p1), net.url(&p2)];
        write_at(&hub.join("wiki/start.txt"), b"from the hub", T0, 5);
        write_at(&p1.join("media/logo.png"), &vec![7u8; 3 << 20], T0, 0);
        write_at(&p2.join("wiki/other.txt"), b"from web3", T0, 0);
        net.sync(0, &hub, &peers, &[]);
        converged(&[&hub, &p1, &p2]);
        assert_eq!(mtime_ns(&p2.join("wiki/start.txt")), (T0, 5));
        // A change on one SSH peer reaches the other in the same run.
        write_at(&p2.join("wiki/start.txt"), b"edited on web3", T0 + 10, 0);
        std::fs::remove_file(p1.join("wiki/other.txt")).unwrap();
        let j = net.sync(0, &hub, &peers, &["--json"]).json();
        converged(&[&hub, &p1, &p2]);
        assert_eq!(
            std::fs::read_to_string(p1.join("wiki/start.txt")).unwrap(),
            "edited on web3"
        );
        assert!(!hub.join("wiki/other.txt").exists());
        assert_eq!(j["result"], "ok", "{via:?}");
        // A no-change run moves a few kilobytes at most.
        let j = net.sync(0, &hub, &peers, &["--json"]).json();
        for r in &j["replicas"].as_array().unwrap()[1..] {
            let wire = r["wire_sent"].as_u64().unwrap() + r["wire_received"].as_u64().unwrap();
            assert!(wire < 4096, "{via:?}: {wire} bytes: {r}");
            assert_eq!(r["scan"]["delta"], true);
        }
    }
}

#[test]
fn a_root_path_with_spaces_quotes_and_dollars() {
    for via in BOTH {
        let net = Net::new(sshd_or_skip!(), via);
        let hub = net.root("hub");
        let odd = net.root("it's a \"peer\" $HOME `x`");
        write_at(&hub.join("f"), b"x", T0, 0);
        net.sync(0, &hub, &[net.url(&odd)], &[]);
        assert_eq!(std::fs::read(odd.join("f")).unwrap(), b"x", "{via:?}");
    }
}

#[test]
fn unknown_host_keys_are_refused_with_the_fingerprint() {
    for via in BOTH {
        let net = Net::new(sshd_or_skip!(), via);
        std::fs::write(&net.known_hosts, "").unwrap();
        let (hub, peer) = (net.root("hub"), net.root("peer"));
        write_at(&hub.join("f"), b"x", T0, 0);
        let r = net.sync(1, &hub, &[net.url(&peer)], &[]);
        let err = r.stderr();
        assert!(!peer.join("f").exists());
        match via {
            Via::Libssh2 => {
                let fp = net.sshd.host_key_line();
                assert!(
                    err.contains("not known") && err.contains("SHA256:"),
                    "{err}"
                );
                assert!(
                    err.contains("--accept-new-host-key") && err.contains("ssh-keyscan"),
                    "{err}"
                );
                assert!(!fp.is_empty());
            }
            Via::OpenSsh => assert!(err.contains("Host key verification failed"), "{err}"),
        }
        // accept-new adds it, and the next run needs no flag.
        net.sync(0, &hub, &[net.url(&peer)], &["--accept-new-host-key"]);
        assert!(peer.join("f").exists());
        let kh = std::fs::read_to_string(&net.known_hosts).unwrap();
        assert!(
            kh.contains(&format!("[127.0.0.1]:{}", net.sshd.port())),
            "{kh}"
        );
        net.sync(0, &hub, &[net.url(&peer)], &[]);
    }
}

#[test]
fn a_changed_host_key_is_refused_even_with_accept_new() {
    for via in BOTH {
        let net = Net::new(sshd_or_skip!(), via);
        // Known hosts lists a different key for this server.
        let other = net.dir.path().join("other");
        assert!(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(&other)
                .status()
                .unwrap()
                .success()
        );
        let key = std::fs::read_to_string(other.with_extension("pub")).unwrap();
        let key: Vec<&str> = key.split_whitespace().take(2).collect();
        std::fs::write(
            &net.known_hosts,
            format!("[127.0.0.1]:{} {} {}\n", net.sshd.port(), key[0], key[1]),
        )
        .unwrap();
        let (hub, peer) = (net.root("hub"), net.root("peer"));
        write_at(&hub.join("f"), b"x", T0, 0);
        let r = net.sync(1, &hub, &[net.url(&peer)], &["--accept-new-host-key"]);
        let err = r.stderr();
        match via {
            Via::Libssh2 => assert!(err.contains("CHANGED") && err.contains("line 1"), "{err}"),
            Via::OpenSsh => assert!(
                err.contains("IDENTIFICATION HAS CHANGED")
                    || err.contains("Host key verification failed"),
                "{err}"
            ),
        }
        assert!(!peer.join("f").exists());
        let kh = std::fs::read_to_string(&net.known_hosts).unwrap();
        assert_eq!(
            kh.lines().count(),
            1,
            "the known key was not replaced: {kh}"
        );
    }
}

#[test]
fn a_wrong_key_names_user_host_and_methods() {
    for via in BOTH {
        let mut net = Net::new(sshd_or_skip!(), via);
        let wrong = net.dir.path().join("wrong");
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&wrong)
            .status()
            .unwrap();
        let (hub, peer) = (net.root("hub"), net.root("peer"));
        net.identity = wrong.clone();
        let r = run(net.cmd(&hub, &[net.url(&peer)], &[]));
        assert_eq!(r.code(), 1, "{}", r.stderr());
        let err = r.stderr();
        match via {
            Via::Libssh2 => {
                assert!(err.contains(&format!("as {}", net.sshd.user())), "{err}");
                assert!(err.contains("127.0.0.1"), "{err}");
                assert!(err.contains("accepts: publickey"), "{err}");
                assert!(err.contains(&wrong.display().to_string()), "{err}");
            }
            Via::OpenSsh => assert!(err.contains("Permission denied"), "{err}"),
        }
    }
}

#[test]
fn a_missing_remote_hubsync_is_explained() {
    for via in BOTH {
        let mut net = Net::new(sshd_or_skip!(), via);
        let (hub, peer) = (net.root("hub"), net.root("peer"));
        net.remote = "/nonexistent/hubsync".into();
        let r = run(net.cmd(&hub, &[net.url(&peer)], &[]));
        assert_eq!(r.code(), 1);
        let err = r.stderr();
        assert!(
            err.contains("No such file") || err.contains("not found"),
            "{err}"
        );
        assert!(err.contains("--remote-command"), "{err}");
    }
}

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, PermissionsExt::from_mode(0o755)).unwrap();
    p
}

#[test]
fn another_protocol_version_or_a_noisy_shell_is_refused_clearly() {
    for via in BOTH {
        let mut net = Net::new(sshd_or_skip!(), via);
        let (hub, peer) = (net.root("hub"), net.root("peer"));
        let old = script(
            net.dir.path(),
            "old-hubsync",
            "echo 'hubsync-protocol 99'; cat >/dev/null",
        );
        net.remote = old.display().to_string();
        let r = run(net.cmd(&hub, &[net.url(&peer)], &[]));
        assert_eq!(r.code(), 1);
        let ours = format!("version {}", hubsync::proto::PROTOCOL_VERSION);
        assert!(
            r.stderr().contains("version 99") && r.stderr().contains(&ours),
            "{}",
            r.stderr()
        );

        let noisy = script(
            net.dir.path(),
            "noisy",
            &format!("echo 'Welcome to web2!'; exec {BIN} \"$@\""),
        );
        net.remote = noisy.display().to_string();
        let r = run(net.cmd(&hub, &[net.url(&peer)], &[]));
        assert_eq!(r.code(), 1);
        assert!(
            r.stderr().contains("Welcome to web2!") && r.stderr().contains("bashrc"),
            "{}",
            r.stderr()
        );
    }
}

#[test]
fn clock_skew_is_reported_and_stops_conflict_resolution_only() {
    let mut net = Net::new(sshd_or_skip!(), Via::Libssh2);
    let (hub, peer) = (net.root("hub"), net.root("peer"));
    write_at(&hub.join("shared"), b"v0", T0, 0);
    net.sync(0, &hub, &[net.url(&peer)], &[]);
    write_at(&hub.join("shared"), b"hub edit", T0 + 5, 0);
    write_at(&peer.join("shared"), b"peer edit", T0 + 9, 0);
    write_at(&peer.join("fresh"), b"new on the peer", T0, 0);
    net.remote = format!("env HUBSYNC_TEST_CLOCK_OFFSET=120 {BIN}");
    let r = run(net.cmd(&hub, &[net.url(&peer)], &[]));
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let err = r.stderr();
    assert!(
        err.contains("clock is +120") && err.contains("max-clock-skew"),
        "{err}"
    );
    // The conflict waits; the non-conflicting change flows.
    assert_eq!(std::fs::read(hub.join("shared")).unwrap(), b"hub edit");
    assert_eq!(std::fs::read(peer.join("shared")).unwrap(), b"peer edit");
    assert_eq!(
        std::fs::read(hub.join("fresh")).unwrap(),
        b"new on the peer"
    );
    // A small skew is only a warning.
    net.remote = format!("env HUBSYNC_TEST_CLOCK_OFFSET=3 {BIN}");
    let r = run(net.cmd(&hub, &[net.url(&peer)], &[]));
    assert_eq!(r.code(), 0);
    assert!(r.stderr().contains("clock is +3"), "{}", r.stderr());
    assert_eq!(std::fs::read(hub.join("shared")).unwrap(), b"peer edit");
}

fn temps(root: &Path) -> Vec<PathBuf> {
    find(root, ".hubsync.")
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect()
}

#[test]
fn a_stopped_sshd_is_abandoned_in_time_and_the_other_peer_syncs() {
    for via in BOTH {
        let net = Net::new(sshd_or_skip!(), via);
        let healthy = Sshd::start().expect("a second sshd");
        let (hub, stuck, good) = (net.root("hub"), net.root("stuck"), net.root("good"));
        // Enough data that the transfer is still running when sshd stops.
        write_at(&hub.join("big.bin"), &vec![1u8; 64 << 20], T0, 0);
        write_at(&hub.join("small.txt"), b"small", T0, 0);
        let good_url = format!(
            "ssh://{}@127.0.0.1:{}{}",
            healthy.user(),
            healthy.port(),
            good.display()
        );
        // Both servers' keys are known.
        let mut kh = std::fs::read_to_string(&net.known_hosts).unwrap();
        kh.push_str(&std::fs::read_to_string(healthy.known_hosts()).unwrap());
        std::fs::write(&net.known_hosts, kh).unwrap();
        std::fs::copy(healthy.client_key(), net.dir.path().join("unused")).unwrap();
        // The healthy server must accept the same client key.
        let auth = healthy.dir().join("authorized_keys");
        let mut keys = std::fs::read_to_string(&auth).unwrap_or_default();
        keys.push_str(&net.sshd.client_pub());
        keys.push('\n');
        std::fs::write(&auth, keys).unwrap();

        let mut c = net.cmd(
            &hub,
            &[net.url(&stuck), good_url.clone()],
            &["--timeout", "5s"],
        );
        c.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let start = Instant::now();
        let child = c.spawn().unwrap();
        // Wait until data is flowing into the stuck peer, then stop its sshd.
        let deadline = Instant::now() + Duration::from_secs(20);
        while temps(&stuck).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        net.sshd.pause();
        let healthy_stopped: Vec<String> = healthy
            .sshd_processes()
            .iter()
            .filter(|p| p.is_stopped())
            .map(|p| format!("{p:?}"))
            .collect();
        let out = child.wait_with_output().unwrap();
        let took = start.elapsed();
        net.sshd.resume();
        assert!(
            healthy_stopped.is_empty(),
            "pausing one server stopped the other: {healthy_stopped:?}"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{via:?}: {err}");
        assert!(took < Duration::from_secs(15), "{via:?}: took {took:?}");
        assert_eq!(std::fs::read(good.join("small.txt")).unwrap(), b"small");
        assert_eq!(
            std::fs::metadata(good.join("big.bin")).unwrap().len(),
            64 << 20
        );
        // Whatever reached the stopped peer is whole: a file is there complete or not
        // at all (its temp file is not under the real name).
        if let Ok(m) = std::fs::metadata(stuck.join("big.bin")) {
            assert_eq!(m.len(), 64 << 20, "a partial file is visible");
        }
        // Once it answers again, the next run converges and leaves no temp file.
        std::thread::sleep(Duration::from_millis(500));
        net.sync(0, &hub, &[net.url(&stuck), good_url], &[]);
        converged(&[&hub, &stuck, &good]);
        assert!(temps(&stuck).is_empty(), "{:?}", temps(&stuck));
    }
}

#[test]
fn a_port_that_never_answers_is_abandoned_in_time() {
    for via in BOTH {
        let net = Net::new(sshd_or_skip!(), via);
        let silent = Silent::start();
        let (hub, good) = (net.root("hub"), net.root("good"));
        write_at(&hub.join("f"), b"x", T0, 0);
        let dead = format!(
            "ssh://{}@127.0.0.1:{}/nowhere",
            net.sshd.user(),
            silent.port()
        );
        let start = Instant::now();
        let r = net.sync(
            2,
            &hub,
            &[dead, net.url(&good)],
            &["--connect-timeout", "1s", "--timeout", "2s"],
        );
        let took = start.elapsed();
        assert!(took < Duration::from_secs(8), "{via:?}: took {took:?}");
        assert_eq!(std::fs::read(good.join("f")).unwrap(), b"x");
        let err = r.stderr();
        assert!(
            err.contains("timed out") || err.contains("no answer") || err.contains("handshake"),
            "{via:?}: {err}"
        );
    }
}
