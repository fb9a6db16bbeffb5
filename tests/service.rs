//! Running hubsync as a service: the config file, `check`, the status and metrics
//! files, the systemd units, `--every` and SIGTERM, completions and the man page.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::sshd::Sshd;
use common::*;

const T0: i64 = 1_700_000_000;

fn hubsync(args: &[&str]) -> Run {
    let mut c = Command::new(BIN);
    c.args(args);
    run(c)
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("hubsync.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn a_config_file_replaces_the_command_line() {
    let e = Env::new(3);
    let cfg = write_config(
        e.dir.path(),
        &format!(
            "root = \"{}\"\nexclude = [\"cache/**\"]\n[[peer]]\nname = \"web2\"\nurl = \"{}\"\n[[peer]]\nname = \"web3\"\nurl = \"{}\"\n",
            e.r(0).display(),
            e.r(1).display(),
            e.r(2).display()
        ),
    );
    e.write(0, "page.txt", "hello", T0);
    e.write(1, "cache/x", "not synced", T0);
    let r = hubsync(&["sync", "--config", cfg.to_str().unwrap(), "--json"]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let j = r.json();
    let names: Vec<&str> = j["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["label"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["hub", "web2", "web3"]);
    assert_eq!(e.read(2, "page.txt"), "hello");
    assert!(!e.exists(0, "cache/x"));
    // HUBSYNC_CONFIG works too, and a bad file is refused with its line.
    let bad = write_config(e.dir.path(), "root = \"/r\"\nexclude = [\"a/[\"]\n");
    let mut c = Command::new(BIN);
    c.arg("sync").env("HUBSYNC_CONFIG", &bad);
    let r = run(c);
    assert_eq!(r.code(), 1);
    assert!(
        r.stderr().contains("hubsync.toml line 2:"),
        "{}",
        r.stderr()
    );
}

#[test]
fn check_reports_a_healthy_setup_line_by_line() {
    let e = Env::new(3);
    let r = e.sync_expect(0, &[]);
    drop(r);
    let mut c = Command::new(BIN);
    c.arg("check").arg(e.r(0)).arg(e.r(1)).arg(e.r(2));
    let r = run(c);
    assert_eq!(r.code(), 0, "{}{}", r.stdout(), r.stderr());
    let out = r.stdout();
    assert!(out.lines().all(|l| l.starts_with("ok")), "{out}");
    let speaks = format!(
        "r1: speaks hubsync protocol {}",
        hubsync::proto::PROTOCOL_VERSION
    );
    assert!(out.contains(&speaks), "{out}");
    assert!(
        out.contains("r2: root exists and is writable, its lock is free"),
        "{out}"
    );
    assert!(out.contains("clock"), "{out}");
}

#[test]
fn check_names_each_broken_peer() {
    let e = Env::new(2);
    let missing = e.dir.path().join("not-mounted");
    let fake = e.dir.path().join("old-hubsync");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'hubsync-protocol 99'\ncat >/dev/null\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // A root that does not exist.
    let mut c = Command::new(BIN);
    c.arg("check").arg(e.r(0)).arg(&missing);
    let r = run(c);
    assert_eq!(r.code(), 1);
    assert!(
        r.stdout().contains("FAIL") && r.stdout().contains("does not exist"),
        "{}",
        r.stdout()
    );
    // Another protocol version.
    let mut c = Command::new(BIN);
    c.arg("check")
        .arg(e.r(0))
        .arg(e.r(1))
        .arg("--remote-command")
        .arg(&fake);
    let r = run(c);
    assert_eq!(r.code(), 1);
    assert!(r.stdout().contains("version 99"), "{}", r.stdout());
    // A peer whose lock is held by another run.
    e.sync_ok(&[]);
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .open(e.p(1, ".hubsync/lock"))
        .unwrap();
    lock.try_lock().unwrap();
    let mut c = Command::new(BIN);
    c.arg("check").arg(e.r(0)).arg(e.r(1));
    let r = run(c);
    assert_eq!(r.code(), 1);
    assert!(r.stdout().contains("locked"), "{}", r.stdout());
}

#[test]
fn check_over_ssh_down_and_wrong_host_key() {
    let Some(sshd) = Sshd::start() else {
        eprintln!("skipped: no sshd");
        return;
    };
    let e = Env::new(1);
    let peer = e.dir.path().join("peer");
    std::fs::create_dir(&peer).unwrap();
    let url = format!(
        "ssh://{}@127.0.0.1:{}{}",
        sshd.user(),
        sshd.port(),
        peer.display()
    );
    let base = |kh: &Path| {
        let mut c = Command::new(BIN);
        c.arg("check")
            .arg(e.r(0))
            .arg(&url)
            .arg("--identity")
            .arg(sshd.client_key())
            .arg("--known-hosts")
            .arg(kh)
            .arg("--remote-command")
            .arg(BIN);
        c
    };
    let r = run(base(sshd.known_hosts()));
    assert_eq!(r.code(), 0, "{}{}", r.stdout(), r.stderr());
    assert!(
        r.stdout().contains("host key and login accepted"),
        "{}",
        r.stdout()
    );
    // A wrong host key.
    let wrong = e.dir.path().join("known_hosts");
    let mut line = sshd.host_key_line();
    line.replace_range(line.len() - 8.., "AAAAAAAA");
    std::fs::write(&wrong, format!("{line}\n")).unwrap();
    let r = run(base(&wrong));
    assert_eq!(r.code(), 1);
    assert!(
        r.stdout().contains("FAIL") && r.stdout().contains("host key"),
        "{}",
        r.stdout()
    );
    // The server down.
    let port = sshd.port();
    drop(sshd);
    let mut c = Command::new(BIN);
    c.arg("check")
        .arg(e.r(0))
        .arg(format!("ssh://127.0.0.1:{port}{}", peer.display()))
        .arg("--connect-timeout")
        .arg("2s");
    let r = run(c);
    assert_eq!(r.code(), 1);
    assert!(r.stdout().contains("cannot connect"), "{}", r.stdout());
}

fn metrics(path: &Path) -> prometheus_parse::Scrape {
    let text = std::fs::read_to_string(path).unwrap();
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("not Prometheus text ({e}):\n{text}"))
}

fn sample(s: &prometheus_parse::Scrape, name: &str, peer: Option<&str>) -> f64 {
    let found = s
        .samples
        .iter()
        .find(|x| x.metric == name && peer.is_none_or(|p| x.labels.get("peer") == Some(p)))
        .unwrap_or_else(|| panic!("no {name} {peer:?}"));
    match found.value {
        prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Untyped(v) => v,
        _ => panic!("unexpected type for {name}"),
    }
}

#[test]
fn status_and_metrics_after_good_partial_and_failed_runs() {
    let e = Env::new(3);
    let prom = e.dir.path().join("metrics/hubsync.prom");
    let m = prom.to_str().unwrap();
    e.write(0, "a.txt", "aaaa", T0);
    // Good.
    e.sync_ok(&["--metrics-file", m]);
    let status = hubsync(&["status", e.r(0).to_str().unwrap()]);
    assert_eq!(status.code(), 0, "{}", status.stdout());
    assert!(
        status.stdout().starts_with("hubsync: healthy"),
        "{}",
        status.stdout()
    );
    assert!(status.stdout().contains("peer r1"), "{}", status.stdout());
    let s = metrics(&prom);
    assert_eq!(sample(&s, "hubsync_last_run_success", None), 1.0);
    assert_eq!(sample(&s, "hubsync_peer_up", Some("r2")), 1.0);
    assert_eq!(sample(&s, "hubsync_runs_total", None), 1.0);
    let first_success = sample(
        &s,
        "hubsync_peer_last_success_timestamp_seconds",
        Some("r2"),
    );
    assert!(first_success > 1.7e9);
    let files = s
        .samples
        .iter()
        .find(|x| {
            x.metric == "hubsync_last_run_files"
                && x.labels.get("peer") == Some("r2")
                && x.labels.get("direction") == Some("to_peer")
        })
        .unwrap();
    assert!(matches!(files.value, prometheus_parse::Value::Gauge(v) if v == 1.0));

    // Partial: r2 is gone.
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::rename(e.r(2), e.dir.path().join("gone")).unwrap();
    e.write(0, "b.txt", "b", T0);
    e.sync_expect(2, &["--metrics-file", m]);
    let s = metrics(&prom);
    assert_eq!(sample(&s, "hubsync_last_run_success", None), 0.0);
    assert_eq!(sample(&s, "hubsync_peer_up", Some("r1")), 1.0);
    assert_eq!(sample(&s, "hubsync_peer_up", Some("r2")), 0.0);
    assert_eq!(
        sample(
            &s,
            "hubsync_peer_last_success_timestamp_seconds",
            Some("r2")
        ),
        first_success,
        "a failed peer keeps its last success time"
    );
    assert_eq!(sample(&s, "hubsync_runs_total", None), 2.0);
    let j = hubsync(&[
        "status",
        e.r(0).to_str().unwrap(),
        "--json",
        "--max-age",
        "1s",
    ])
    .json();
    assert_eq!(j["status"]["last_run"]["result"], "partial");
    assert_eq!(j["healthy"], false);
    assert!(j["problems"].to_string().contains("r2"), "{j}");

    // Failed: every peer gone.
    std::fs::rename(e.r(1), e.dir.path().join("gone1")).unwrap();
    e.sync_expect(1, &["--metrics-file", m]);
    let st = hubsync(&["status", e.r(0).to_str().unwrap()]);
    assert_eq!(st.code(), 1);
    assert!(
        st.stdout().contains("UNHEALTHY") && st.stdout().contains("failed"),
        "{}",
        st.stdout()
    );
    let s = metrics(&prom);
    assert!(sample(&s, "hubsync_last_run_errors", None) >= 2.0);
    assert!(sample(&s, "hubsync_errors_total", None) >= 3.0);
}

#[test]
fn systemd_units_verify() {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        panic!("systemd-analyze is needed for this test (package systemd)");
    };
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    // The units name /usr/local/bin/hubsync; verify them against the binary built here.
    let service = std::fs::read_to_string(here.join("hubsync.service"))
        .unwrap()
        .replace("/usr/local/bin/hubsync", BIN);
    std::fs::write(dir.path().join("hubsync.service"), service).unwrap();
    std::fs::copy(here.join("hubsync.timer"), dir.path().join("hubsync.timer")).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .arg(dir.path().join("hubsync.service"))
        .arg(dir.path().join("hubsync.timer"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.trim().is_empty(), "systemd-analyze complained:\n{err}");
    let timer = std::fs::read_to_string(here.join("hubsync.timer")).unwrap();
    assert!(timer.contains("OnUnitInactiveSec=10s") && timer.contains("AccuracySec=1s"));
    let service = std::fs::read_to_string(here.join("hubsync.service")).unwrap();
    assert!(service.contains("SuccessExitStatus=75") && service.contains("Type=oneshot"));
    // The example config is valid.
    let cfg = here.join("hubsync.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let parsed: toml::Table = toml::from_str(&text).unwrap();
    assert!(parsed.contains_key("root") && parsed.contains_key("peer"));
}

#[test]
fn every_stops_cleanly_on_sigterm_mid_run() {
    let e = Env::new(2);
    for k in 0..50 {
        e.write(0, &format!("f{k}"), &"x".repeat(1000), T0);
    }
    e.sync_ok(&[]);
    for k in 0..50 {
        e.write(0, &format!("f{k}"), &"y".repeat(2000), T0 + 1);
    }
    let marker = e.dir.path().join("in-apply");
    let mut c = Command::new(BIN);
    c.arg("sync")
        .arg(e.r(0))
        .arg(e.r(1))
        .arg("--every")
        .arg("1s")
        .env(
            "HUBSYNC_TEST_BEFORE_APPLY",
            format!("touch '{}'; sleep 1", marker.display()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !marker.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        marker.exists(),
        "the first run never reached its apply phase"
    );
    // SIGTERM while the run is between scan and apply.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(err.contains("stopped by a signal"), "{err}");
    // The run under way was finished, not cut: everything arrived, nothing partial.
    for k in 0..50 {
        assert_eq!(e.read(1, &format!("f{k}")), "y".repeat(2000));
    }
    for i in 0..2 {
        let temps: Vec<_> = listing_all(&e.r(i))
            .into_keys()
            .filter(|p| p.ends_with(".tmp"))
            .collect();
        assert!(temps.is_empty(), "{temps:?}");
    }
    assert_eq!(
        std::fs::read_to_string(e.p(0, ".hubsync/status.json"))
            .map(|s| s.contains("\"ok\""))
            .ok(),
        Some(true)
    );
}

#[test]
fn completions_and_man_page() {
    let r = hubsync(&["completions", "bash"]);
    assert_eq!(r.code(), 0);
    assert!(r.stdout().contains("_hubsync") && r.stdout().contains("--dry-run"));
    let r = hubsync(&["man"]);
    assert_eq!(r.code(), 0);
    assert!(
        r.stdout().starts_with(".ie") || r.stdout().contains(".TH hubsync"),
        "{}",
        &r.stdout()[..200.min(r.stdout().len())]
    );
    assert!(r.stdout().contains("sync"));
}

#[test]
fn conflicts_are_listed_and_restored() {
    let e = Env::new(2);
    e.write(0, "doc.txt", "v0", T0);
    e.sync_ok(&[]);
    e.write(0, "doc.txt", "hub edit", T0 + 1);
    e.write(1, "doc.txt", "peer edit (newer)", T0 + 2);
    e.sync_ok(&[]);
    let r = hubsync(&["conflicts", e.r(0).to_str().unwrap(), "--json"]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let list = r.json();
    let copies = list.as_array().unwrap();
    assert_eq!(copies.len(), 1, "{list}");
    assert_eq!(copies[0]["path"], "doc.txt");
    assert_eq!(copies[0]["replica"], "hub");
    let copy = copies[0]["copy"].as_str().unwrap().to_string();
    let r = hubsync(&["conflicts", e.r(0).to_str().unwrap(), "--restore", &copy]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_eq!(e.read(0, "doc.txt"), "hub edit");
    // The next sync spreads the restored version; the replaced one is kept.
    e.sync_ok(&[]);
    assert_eq!(e.read(1, "doc.txt"), "hub edit");
    let r = hubsync(&["conflicts", e.r(0).to_str().unwrap()]);
    assert!(r.stdout().contains("doc.txt"), "{}", r.stdout());
}
