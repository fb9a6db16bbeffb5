//! Random histories through the real binary: edits on three replicas, runs with a
//! peer sometimes missing, and after every complete run the invariants: all trees
//! equal, a second run plans nothing, and every version that was a change before
//! the run is in some tree or kept as a conflict copy.
//!
//! `HUBSYNC_RANDOM_SEEDS` and `HUBSYNC_RANDOM_ROUNDS` make it longer.

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
