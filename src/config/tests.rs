//! Config parsing and every rejection, each naming the file and line.

use super::*;

fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("hubsync.toml");
    std::fs::write(&p, text).unwrap();
    (d, p)
}

fn resolve(text: &str) -> Result<Settings> {
    let (_d, p) = write(text);
    Settings::resolve(Overrides {
        config: Some(p),
        ..Default::default()
    })
}

#[track_caller]
fn rejects(text: &str, line: usize, needle: &str) {
    let err = format!("{:#}", resolve(text).unwrap_err());
    assert!(
        err.contains("hubsync.toml line "),
        "no file and line: {err}"
    );
    assert!(
        err.contains(&format!("line {line}:")),
        "wrong line (want {line}): {err}"
    );
    assert!(err.contains(needle), "{needle:?} missing: {err}");
}

const GOOD: &str = r#"
root = "/var/www/wiki/data"
state_dir = "/var/lib/hubsync"
exclude = ["cache/**", "*.indexed"]
timeout = "15s"
connect_timeout = "3s"
conflict_retention = "7d"
deletion_threshold = 0.25
remote_command = "/usr/local/bin/hubsync"
identity = "/etc/hubsync/id_ed25519"
metrics_file = "/var/lib/node_exporter/hubsync.prom"

[[peer]]
name = "web2"
url = "ssh://web2.example.org/var/www/wiki/data"

[[peer]]
name = "web3"
url = "root@web3:/var/www/wiki/data"
port = 2222
identity = "/etc/hubsync/web3_key"
timeout = "30s"
"#;

#[test]
fn a_full_config() {
    let s = resolve(GOOD).unwrap();
    assert_eq!(s.root, PathBuf::from("/var/www/wiki/data"));
    assert_eq!(s.state_dir, PathBuf::from("/var/lib/hubsync"));
    assert_eq!(s.excludes, ["cache/**", "*.indexed"]);
    assert_eq!(s.conflict_retention, Duration::from_secs(7 * 86_400));
    assert_eq!(s.deletion_threshold, 0.25);
    assert_eq!(s.peers.len(), 2);
    let (w2, w3) = (&s.peers[0], &s.peers[1]);
    assert_eq!(w2.label, "web2");
    assert_eq!(w2.timeout, Duration::from_secs(15));
    assert_eq!(w2.ssh.connect_timeout, Duration::from_secs(3));
    assert_eq!(w2.ssh.remote_command, "/usr/local/bin/hubsync");
    assert_eq!(
        w2.ssh.identity.as_deref(),
        Some(Path::new("/etc/hubsync/id_ed25519"))
    );
    match &w3.target {
        Target::Ssh(t) => assert_eq!((t.port, t.user.as_deref()), (2222, Some("root"))),
        t => panic!("{t:?}"),
    }
    assert!(w3.key.contains(":2222/"));
    assert_eq!(w3.timeout, Duration::from_secs(30));
    assert_eq!(
        w3.ssh.identity.as_deref(),
        Some(Path::new("/etc/hubsync/web3_key"))
    );
}

#[test]
fn the_command_line_overrides_the_file() {
    let (_d, p) = write(GOOD);
    let s = Settings::resolve(Overrides {
        config: Some(p),
        root: Some("/srv/other".into()),
        peers: vec!["/srv/local-peer".into()],
        excludes: vec!["tmp/**".into()],
        timeout: Some(Duration::from_secs(2)),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(s.root, PathBuf::from("/srv/other"));
    assert_eq!(
        s.peers.len(),
        1,
        "peers on the command line replace the file's"
    );
    assert_eq!(s.peers[0].timeout, Duration::from_secs(2));
    assert_eq!(
        s.excludes,
        ["cache/**", "*.indexed", "tmp/**"],
        "excludes add up"
    );
    assert_eq!(s.state_dir, PathBuf::from("/var/lib/hubsync"));
}

#[test]
fn no_file_is_needed_with_root_and_peers() {
    let s = Settings::resolve(Overrides {
        root: Some("/srv/a".into()),
        peers: vec!["/srv/b".into(), "web2:/srv/c".into()],
        ..Default::default()
    })
    .unwrap();
    assert_eq!(s.state_dir, PathBuf::from("/srv/a/.hubsync"));
    assert_eq!(s.peers[1].label, "web2");
    assert!(s.config_file.is_none() || std::env::var_os("HUBSYNC_CONFIG").is_some());
}

#[test]
fn rejections_name_file_line_and_fix() {
    rejects("root = \"/r\"\nrot = 1\n", 2, "unknown field");
    rejects(
        "root = \"relative/dir\"\n[[peer]]\nname=\"a\"\nurl=\"/p\"\n",
        1,
        "absolute path",
    );
    rejects(
        "root = \"/r\"\nexclude = [\"ok\", \"bad/[\"]\n",
        2,
        "not a valid glob",
    );
    rejects(
        "root = \"/r\"\n[[peer]]\nname = \"web2\"\nurl = \"/a\"\n[[peer]]\nname = \"web2\"\nurl = \"/b\"\n",
        6,
        "unique",
    );
    rejects(
        "root = \"/r\"\n[[peer]]\nname = \"w\"\nurl = \"ssh://host:notaport/x\"\n",
        4,
        "not a port number",
    );
    rejects(
        "root = \"/r\"\n[[peer]]\nname = \"w\"\nurl = \"web2:relative\"\n",
        4,
        "absolute",
    );
    rejects(
        "root = \"/r\"\ntimeout = \"soon\"\n[[peer]]\nname=\"a\"\nurl=\"/p\"\n",
        2,
        "duration",
    );
    rejects(
        "root = \"/r\"\n[[peer]]\nname = \"has space\"\nurl = \"/p\"\n",
        3,
        "letters, digits",
    );
    rejects(
        "root = \"/r\"\n[[peer]]\nname = \"a\"\nurl = \"/p\"\nport = 22\n",
        5,
        "only to SSH peers",
    );
    rejects(
        "root = \"/r\"\ndeletion_threshold = 3.0\n[[peer]]\nname=\"a\"\nurl=\"/p\"\n",
        2,
        "fraction",
    );
    rejects("root = [\n", 1, "");
}

#[test]
fn missing_pieces_are_explained() {
    let err = format!("{:#}", resolve("root = \"/r\"\n").unwrap_err());
    assert!(
        err.contains("no peers") && err.contains("[[peer]]"),
        "{err}"
    );
    let err = format!(
        "{:#}",
        resolve("[[peer]]\nname=\"a\"\nurl=\"/p\"\n").unwrap_err()
    );
    assert!(err.contains("no root"), "{err}");
    let err = format!(
        "{:#}",
        Settings::resolve(Overrides {
            config: Some("/nonexistent/hubsync.toml".into()),
            ..Default::default()
        })
        .unwrap_err()
    );
    assert!(
        err.contains("no config file at /nonexistent/hubsync.toml"),
        "{err}"
    );
}

#[test]
fn durations() {
    assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
    assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
    assert!(parse_duration("soon").is_err());
    assert!(parse_duration("5 parsecs").is_err());
}
