//! Random histories through the real binary: edits on three replicas, runs with a
//! peer sometimes missing, and after every complete run the invariants: all trees
//! equal, a second run plans nothing, and every version that was a change before
//! the run is in some tree or kept as a conflict copy.
//!
//! `HUBSYNC_RANDOM_SEEDS` and `HUBSYNC_RANDOM_ROUNDS` make it longer.
//!
//! The same with crashes: runs SIGKILLed (the hub, or one of its `serve`
//! children) at a seeded moment, some of them while the plan is carried out.
//! Whatever a run's fate, a version that only one replica ever had must
//! afterwards still be in a tree or kept as a conflict copy (a temp file does not
//! count: the next scan removes it); every run that finishes leaves the trees
//! equal and a dry run planning nothing. `HUBSYNC_CRASH_SEEDS` and
//! `HUBSYNC_CRASH_ROUNDS` make it longer.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::*;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const NAMES: [&str; 8] = ["a", "b", "d/x", "d/y", "d", "e/f/g", "e", "e/f"];

fn remove_tree(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p).unwrap(),
        Ok(_) => std::fs::remove_file(p).unwrap(),
        Err(_) => {}
    }
}

/// Makes room for a file at `rel` under `root`: parents become directories.
fn make_parents(root: &Path, rel: &str) {
    let mut cur = root.to_path_buf();
    let parts: Vec<&str> = rel.split('/').collect();
    for part in &parts[..parts.len() - 1] {
        cur = cur.join(part);
        if !cur.is_dir() {
            remove_tree(&cur);
            std::fs::create_dir(&cur).unwrap();
        }
    }
}

fn edit(rng: &mut Rng, root: &Path, tick: &mut i64, tag: &str) {
    let rel = NAMES[rng.below(NAMES.len() as u64) as usize];
    let p = root.join(rel);
    *tick += 1;
    match rng.below(5) {
        0 | 1 => {
            make_parents(root, rel);
            if p.is_dir() {
                remove_tree(&p);
            }
            write_at(
                &p,
                format!("{tag} {tick}").as_bytes(),
                1_700_000_000 + *tick,
                0,
            );
        }
        2 => {
            if p.is_file() {
                std::fs::remove_file(&p).unwrap();
            }
        }
        3 => remove_tree(&p),
        _ => {
            make_parents(root, &format!("{rel}/k"));
            if !p.is_dir() {
                remove_tree(&p);
                std::fs::create_dir(&p).unwrap();
            }
            write_at(
                &p.join("k"),
                format!("{tag} {tick} k").as_bytes(),
                1_700_000_000 + *tick,
                0,
            );
        }
    }
}

/// Every file content under `root`, conflict copies included.
fn contents(root: &Path) -> BTreeSet<String> {
    listing_all(root)
        .into_iter()
        .filter(|(p, d)| {
            d.starts_with("file") && !p.ends_with("lock") && !p.contains(".hubsync/")
                || p.contains("conflicts/")
        })
        .filter_map(|(p, _)| std::fs::read_to_string(root.join(p)).ok())
        .filter(|c| c.starts_with('r'))
        .collect()
}

fn tree_contents(root: &Path) -> BTreeSet<String> {
    listing(root)
        .into_iter()
        .filter(|(_, d)| d.starts_with("file"))
        .filter_map(|(p, _)| std::fs::read_to_string(root.join(p)).ok())
        .collect()
}

#[test]
fn random_histories_converge_and_lose_nothing() {
    let seeds: u64 = std::env::var("HUBSYNC_RANDOM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let rounds: u64 = std::env::var("HUBSYNC_RANDOM_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    for seed in 1..=seeds {
        eprintln!("seed {seed}");
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed);
        let e = Env::new(3);
        let mut tick = 0i64;
        let mut previous_complete = true;
        let mut after_previous: BTreeSet<String> = BTreeSet::new();
        for round in 0..rounds {
            for _ in 0..rng.below(4) {
                let r = rng.below(3) as usize;
                edit(&mut rng, &e.r(r), &mut tick, &format!("r{r}"));
            }
            // What the trees hold now: after a complete run everything was agreed,
            // so all of it that changed since is a change that must survive.
            let before: BTreeSet<String> = (0..3)
                .flat_map(|i| tree_contents(&e.r(i)))
                .filter(|c| !after_previous.contains(c))
                .collect();
            let missing = match rng.below(5) {
                0 => Some(1 + rng.below(2) as usize),
                _ => None,
            };
            let mut cmd = std::process::Command::new(BIN);
            cmd.arg("sync").arg(e.r(0));
            for i in 1..3 {
                if Some(i) != missing {
                    cmd.arg(e.r(i));
                } else {
                    // A peer that is down: its path does not exist this run.
                    cmd.arg(e.dir.path().join("down"));
                }
            }
            let r = run(cmd);
            let expected = if missing.is_some() { 2 } else { 0 };
            assert_eq!(
                r.code(),
                expected,
                "seed {seed} round {round}: {}\n{}",
                r.stderr(),
                e.dump()
            );
            after_previous = (0..3).flat_map(|i| tree_contents(&e.r(i))).collect();
            if missing.is_some() {
                previous_complete = false;
                continue;
            }
            e.assert_converged();
            let again = e.sync_ok(&["--json"]).json();
            assert!(
                again["plan"].as_array().unwrap().is_empty(),
                "seed {seed} round {round}: a second run plans {}\n{}",
                again["plan"],
                e.dump()
            );
            if previous_complete {
                let mut everything = BTreeSet::new();
                for i in 0..3 {
                    everything.extend(contents(&e.r(i)));
                }
                for c in before.iter().filter(|c| c.starts_with('r')) {
                    assert!(
                        everything.contains(c),
                        "seed {seed} round {round}: lost {c:?}\n{}",
                        e.dump()
                    );
                }
            }
            previous_complete = true;
        }
    }
}

// ------------------------------------------------------------------ with crashes

/// How a run of the crash test ends.
#[derive(Debug, Clone, Copy)]
enum Kill {
    /// Runs to the end.
    No,
    /// SIGKILL to the hub this many milliseconds after it starts.
    Hub(u64),
    /// SIGKILL to one of its `serve` children (the `n`th, modulo how many there
    /// are) this many milliseconds after it starts.
    Serve(u64, u64),
    /// SIGKILL to the hub this many milliseconds into carrying out its plan.
    DuringApply(u64),
}

/// Processes whose command line mentions `needle` (the test's temp directory).
fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for d in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = d.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(d.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            out.push((pid, cmd));
        }
    }
    out
}

fn sigkill(pid: u32) {
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::KILL,
    );
}

/// Runs `hubsync sync r0 r1 r2`, killed as `kill` says; returns the exit code
/// (`None` if something was killed). Returns only once no process of the run is
/// left, so that the next run finds every lock free.
fn sync_killed(e: &Env, kill: Kill) -> Option<i32> {
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("sync");
    for i in 0..3 {
        cmd.arg(e.r(i));
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    if let Kill::DuringApply(ms) = kill {
        // `$PPID` in the hook's shell is the hub.
        cmd.env(
            "HUBSYNC_TEST_BEFORE_APPLY",
            format!(
                "(sleep {}; kill -9 $PPID) >/dev/null 2>&1 &",
                ms as f64 / 1000.0
            ),
        );
    }
    let mut child = cmd.spawn().unwrap();
    let mut killed = matches!(kill, Kill::DuringApply(_));
    if let Kill::Hub(ms) | Kill::Serve(ms, _) = kill {
        std::thread::sleep(std::time::Duration::from_millis(ms));
        if child.try_wait().unwrap().is_none() {
            match kill {
                Kill::Hub(_) => {
                    sigkill(child.id());
                    killed = true;
                }
                Kill::Serve(_, n) => {
                    let serves: Vec<u32> =
                        processes_mentioning(&e.dir.path().display().to_string())
                            .into_iter()
                            .filter(|(pid, cmd)| *pid != child.id() && cmd.contains(" serve "))
                            .map(|(pid, _)| pid)
                            .collect();
                    if !serves.is_empty() {
                        sigkill(serves[n as usize % serves.len()]);
                        killed = true;
                    }
                }
                _ => {}
            }
        }
    }
    let out = child.wait_with_output().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let left = processes_mentioning(&e.dir.path().display().to_string());
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "processes of a killed run linger: {left:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let code = out.status.code();
    assert_ne!(code, Some(101), "{stderr}");
    if killed {
        // Killed itself, or it outlived a killed peer (a partial run, or a failed
        // one when that peer was the source of the hub's own changes).
        None
    } else {
        assert_eq!(code, Some(0), "{kill:?}: {stderr}\n{}", e.dump());
        code
    }
}

/// Where each history content is now: replica by replica, in the tree or among
/// its conflict copies (never in temp files, which the next scan removes).
fn whereabouts(e: &Env) -> std::collections::BTreeMap<String, BTreeSet<usize>> {
    let mut out: std::collections::BTreeMap<String, BTreeSet<usize>> = Default::default();
    for i in 0..e.n {
        let root = e.r(i);
        for (p, d) in listing_all(&root) {
            let name = p.rsplit('/').next().unwrap_or(&p);
            let temp = name.starts_with(".hubsync.") && name.ends_with(".tmp");
            let state = p.starts_with(".hubsync/") && !p.starts_with(".hubsync/conflicts/");
            if !d.starts_with("file") || temp || state {
                continue;
            }
            if let Ok(c) = std::fs::read_to_string(root.join(&p))
                && c.starts_with('r')
            {
                out.entry(c).or_default().insert(i);
            }
        }
    }
    out
}

#[test]
fn random_histories_with_crashes_converge_and_lose_nothing() {
    let seeds: u64 = std::env::var("HUBSYNC_CRASH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let rounds: u64 = std::env::var("HUBSYNC_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let mut kills = 0;
    for seed in 1..=seeds {
        let mut rng = Rng(0x5eed_c4a5_0000_0001 ^ seed.wrapping_mul(0x9e37_79b9));
        let e = Env::new(3);
        let mut tick = 0i64;
        // Replicas each content has been seen on, at the end of some run.
        let mut seen: std::collections::BTreeMap<String, BTreeSet<usize>> = Default::default();
        for round in 0..=rounds {
            for _ in 0..rng.below(4) {
                let r = rng.below(3) as usize;
                edit(&mut rng, &e.r(r), &mut tick, &format!("r{r}"));
            }
            // A version that only ever existed on one replica is nobody's to
            // supersede: whatever happens to this run, it must still be in some
            // tree or kept as a conflict copy afterwards.
            let now = whereabouts(&e);
            let only_here: Vec<String> = now
                .iter()
                .filter(|(c, at)| {
                    let mut all: BTreeSet<usize> = seen.get(*c).cloned().unwrap_or_default();
                    all.extend(at.iter());
                    all.len() == 1
                })
                .map(|(c, _)| c.clone())
                .collect();
            // The last round is the clean run that settles everything.
            let kill = match (round == rounds, rng.below(10)) {
                (true, _) | (_, 0..=4) => Kill::No,
                (_, 5 | 6) => Kill::Hub(rng.below(80)),
                (_, 7 | 8) => Kill::Serve(rng.below(80), rng.below(3)),
                _ => Kill::DuringApply(rng.below(20)),
            };
            let what = format!("seed {seed} round {round} {kill:?}");
            let finished = sync_killed(&e, kill);
            kills += usize::from(finished.is_none());
            let after = whereabouts(&e);
            for c in &only_here {
                assert!(
                    after.contains_key(c),
                    "{what}: lost {c:?}, which only one replica had\n{}",
                    e.dump()
                );
            }
            for (c, at) in after {
                seen.entry(c).or_default().extend(at);
            }
            if finished.is_some() {
                e.assert_converged();
                let again = e.sync_ok(&["--dry-run", "--json"]).json();
                assert!(
                    again["plan"].as_array().unwrap().is_empty(),
                    "{what}: a second run plans {}\n{}",
                    again["plan"],
                    e.dump()
                );
            }
        }
    }
    eprintln!("{kills} runs were killed");
}
