//! Table-driven tests of every rule, plus a property test that runs random histories
//! through reconcile and an in-memory apply.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;

use super::*;
use crate::version::{Hash, Mtime};

thread_local! {
    static CONTENT: RefCell<HashMap<Hash, String>> = RefCell::new(HashMap::new());
}

fn fm(content: &str, mtime: i64, mode: u32) -> Version {
    let hash = Hash::of(content.as_bytes());
    CONTENT.with(|c| c.borrow_mut().insert(hash, content.to_string()));
    Version {
        kind: Kind::File {
            size: content.len() as u64,
            hash,
        },
        mode,
        mtime: Mtime::new(mtime, 0),
        uid: 0,
        gid: 0,
    }
}
fn f(content: &str, mtime: i64) -> Version {
    fm(content, mtime, 0o644)
}
fn d() -> Version {
    dm(0o755)
}
fn dm(mode: u32) -> Version {
    Version {
        kind: Kind::Dir,
        mode,
        mtime: Mtime::new(1, 0),
        uid: 0,
        gid: 0,
    }
}
fn l(target: &str) -> Version {
    Version {
        kind: Kind::Symlink {
            target: target.as_bytes().to_vec(),
        },
        mode: 0o777,
        mtime: Mtime::new(1, 0),
        uid: 0,
        gid: 0,
    }
}

/// Tests describe every replica and agreed state as whole trees; this turns them
/// into what `reconcile` takes (the hub's scan as its current cache, each agreed
/// state as its difference from it).
struct TInput<'a> {
    hub: &'a [Entry],
    peers: Vec<TPeer<'a>>,
    mergeable: Option<&'a globset::GlobSet>,
    bundles: &'a [crate::rules::Bundle],
}

struct TPeer<'a> {
    view: Option<View<'a>>,
    agreed: Option<&'a [(RelPath, Version)]>,
    clock_ok: bool,
}

fn reconcile_t(t: &TInput<'_>) -> Plan {
    use crate::archive::CacheEntry;
    use crate::scan::StatKey;
    let stat = StatKey {
        dev: 0,
        ino: 0,
        ctime: Mtime::default(),
    };
    let current: Vec<CacheEntry> = t
        .hub
        .iter()
        .filter_map(|e| match &e.state {
            State::Present(v) => Some(CacheEntry {
                path: e.path.clone(),
                version: v.clone(),
                stat,
                trusted: true,
            }),
            _ => None,
        })
        .collect();
    let skipped: Vec<(RelPath, String)> = t
        .hub
        .iter()
        .filter_map(|e| match &e.state {
            State::Skip(w) => Some((e.path.clone(), w.clone())),
            _ => None,
        })
        .collect();
    let diffs: Vec<Option<crate::agreed::Diff>> = t
        .peers
        .iter()
        .map(|p| {
            p.agreed.map(|a| {
                let mut d = Vec::new();
                let mut paths: Vec<&RelPath> = a
                    .iter()
                    .map(|e| &e.0)
                    .chain(current.iter().map(|e| &e.path))
                    .collect();
                paths.sort();
                paths.dedup();
                for path in paths {
                    let av = a.iter().find(|e| e.0 == *path).map(|e| &e.1);
                    let hv = current.iter().find(|e| e.path == *path).map(|e| &e.version);
                    let same = match (av, hv) {
                        (None, None) => true,
                        (Some(x), Some(y)) => x.same(y),
                        _ => false,
                    };
                    if !same {
                        d.push((path.clone(), av.cloned()));
                    }
                }
                d
            })
        })
        .collect();
    reconcile(&Input {
        hub: Hub {
            current: &current,
            skipped: &skipped,
            changes: &[],
        },
        peers: t
            .peers
            .iter()
            .zip(&diffs)
            .map(|(p, d)| PeerInput {
                view: p.view,
                agreed: d.as_deref(),
                clock_ok: p.clock_ok,
            })
            .collect(),
        mergeable: t.mergeable,
        bundles: t.bundles,
    })
}

fn show(v: &Option<Version>) -> String {
    match v {
        None => "-".into(),
        Some(v) => match &v.kind {
            Kind::File { hash, .. } => {
                let c = CONTENT.with(|c| c.borrow().get(hash).cloned().unwrap_or_default());
                let mode = if v.mode == 0o644 {
                    String::new()
                } else {
                    format!("/{:o}", v.mode)
                };
                format!("f:{c}@{}{mode}", v.mtime.secs)
            }
            Kind::Dir if v.mode == 0o755 => "d".into(),
            Kind::Dir => format!("d/{:o}", v.mode),
            Kind::Symlink { target } => format!("l:{}", String::from_utf8_lossy(target)),
        },
    }
}

fn list(rs: &Replicas) -> String {
    rs.iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// One line per item: `path = result reason <source actions`.
fn render(plan: &Plan) -> Vec<String> {
    let mut out: Vec<String> = plan
        .items
        .iter()
        .filter(|i| !i.actions.is_empty())
        .map(|i| {
            let reason = match &i.reason {
                Reason::Changed { on } => format!("changed({})", list(on)),
                Reason::Deleted { on } => format!("deleted({})", list(on)),
                Reason::Metadata { on } => format!("meta({})", list(on)),
                Reason::CatchUp => "catchup".into(),
                Reason::Merged { on } => format!("merge({})", list(on)),
                Reason::Conflict {
                    winner,
                    losers,
                    rule,
                } => format!(
                    "conflict(w={winner} l={} {})",
                    list(losers),
                    match rule {
                        Rule::NewestMtime => "newest",
                        Rule::TieBreak => "tie",
                        Rule::ModifiedBeatsDeleted => "modify>delete",
                        Rule::DirectoryHasContent => "dir-content",
                        Rule::BundleLeader => "leader",
                    }
                ),
            };
            let src = i.source.map(|s| format!(" <{s}")).unwrap_or_default();
            let acts: Vec<String> = i
                .actions
                .iter()
                .map(|(r, a)| {
                    let a = match a {
                        Action::Create => "create",
                        Action::Replace => "replace",
                        Action::KeepAndReplace => "keep",
                        Action::Remove => "remove",
                        Action::KeepAndRemove => "keep-remove",
                        Action::SetMeta => "meta",
                    };
                    format!("{r}:{a}")
                })
                .collect();
            format!(
                "{} = {} {reason}{src} {}",
                i.path,
                show(&i.result),
                acts.join(" ")
            )
        })
        .collect();
    out.extend(plan.skipped.iter().map(|(p, _)| format!("{p} skip")));
    out
}

type Tree = Vec<(&'static str, Version)>;

fn entries(t: &Tree) -> Vec<Entry> {
    let mut v: Vec<Entry> = t
        .iter()
        .map(|(p, v)| Entry {
            path: RelPath::new(*p).unwrap(),
            state: State::Present(v.clone()),
        })
        .collect();
    v.sort_by(|a, b| a.path.cmp(&b.path));
    v
}

fn agreed_list(t: &Tree) -> Vec<(RelPath, Version)> {
    let mut v: Vec<(RelPath, Version)> = t
        .iter()
        .map(|(p, v)| (RelPath::new(*p).unwrap(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Reconciles `hub` with full-view `peers`; `agreed[i]` is peer i+1's agreed state
/// (`None`: first sync).
#[track_caller]
fn check(agreed: &[Option<Tree>], hub: Tree, peers: &[Tree], expect: &[&str]) {
    check_with(None, agreed, hub, peers, expect)
}

#[track_caller]
fn check_with(
    mergeable: Option<&globset::GlobSet>,
    agreed: &[Option<Tree>],
    hub: Tree,
    peers: &[Tree],
    expect: &[&str],
) {
    check_rules(mergeable, &[], agreed, hub, peers, expect)
}

#[track_caller]
fn check_rules(
    mergeable: Option<&globset::GlobSet>,
    bundles: &[crate::rules::Bundle],
    agreed: &[Option<Tree>],
    hub: Tree,
    peers: &[Tree],
    expect: &[&str],
) {
    let hub_e = entries(&hub);
    let peer_e: Vec<Vec<Entry>> = peers.iter().map(entries).collect();
    let agreed_l: Vec<Option<Vec<(RelPath, Version)>>> =
        agreed.iter().map(|a| a.as_ref().map(agreed_list)).collect();
    let input = TInput {
        hub: &hub_e,
        peers: peer_e
            .iter()
            .zip(&agreed_l)
            .map(|(p, a)| TPeer {
                view: Some(View::Full(p)),
                agreed: a.as_deref(),
                clock_ok: true,
            })
            .collect(),
        mergeable,
        bundles,
    };
    let got = render(&reconcile_t(&input));
    assert_eq!(got, expect, "\ngot:\n  {}\n", got.join("\n  "));
}

fn t(items: &[(&'static str, Version)]) -> Tree {
    items.to_vec()
}

#[test]
fn nothing_changed_plans_nothing() {
    let base = t(&[("a", f("x", 1)), ("d", d()), ("d/b", f("y", 2))]);
    check(
        &[Some(base.clone()), Some(base.clone())],
        base.clone(),
        &[base.clone(), base.clone()],
        &[],
    );
}

#[test]
fn changed_on_one_replica_propagates() {
    let base = t(&[("a", f("x", 1)), ("d", d()), ("d/b", f("y", 2))]);
    let ag = [Some(base.clone()), Some(base.clone())];
    let mut created = base.clone();
    created.push(("new", f("n", 5)));
    let mut modified = base.clone();
    modified[0].1 = f("x2", 6);
    let mut deleted = base.clone();
    deleted.remove(0);
    let mut chmod = base.clone();
    chmod[0].1 = fm("x", 1, 0o600);
    let mut touched = base.clone();
    touched[0].1 = f("x", 9);

    // create / modify / delete on a peer, in a three-replica set
    check(
        &ag,
        base.clone(),
        &[base.clone(), created.clone()],
        &["new = f:n@5 changed(2) <2 0:create 1:create"],
    );
    check(
        &ag,
        base.clone(),
        &[modified.clone(), base.clone()],
        &["a = f:x2@6 changed(1) <1 0:replace 2:replace"],
    );
    check(
        &ag,
        base.clone(),
        &[base.clone(), deleted.clone()],
        &["a = - deleted(2) 0:remove 1:remove"],
    );
    // the same changes made on the hub
    check(
        &ag,
        created.clone(),
        &[base.clone(), base.clone()],
        &["new = f:n@5 changed(0) <0 1:create 2:create"],
    );
    check(
        &ag,
        deleted.clone(),
        &[base.clone(), base.clone()],
        &["a = - deleted(0) 1:remove 2:remove"],
    );
    // mode change and mtime-only change travel without copying bytes
    check(
        &ag,
        base.clone(),
        &[chmod.clone(), base.clone()],
        &["a = f:x@1/600 changed(1) 0:meta 2:meta"],
    );
    check(
        &ag,
        base.clone(),
        &[base.clone(), touched.clone()],
        &["a = f:x@9 changed(2) 0:meta 1:meta"],
    );
}

#[test]
fn type_changes_propagate() {
    let base = t(&[("a", f("x", 1)), ("d", d()), ("d/b", f("y", 2))]);
    let ag = [Some(base.clone())];
    // file -> directory with content
    let to_dir = t(&[
        ("a", d()),
        ("a/in", f("i", 3)),
        ("d", d()),
        ("d/b", f("y", 2)),
    ]);
    check(
        &ag,
        base.clone(),
        &[to_dir],
        &[
            "a = d changed(1) 0:replace",
            "a/in = f:i@3 changed(1) <1 0:create",
        ],
    );
    // directory -> file
    let to_file = t(&[("a", f("x", 1)), ("d", f("now a file", 4))]);
    check(
        &ag,
        base.clone(),
        &[to_file],
        &[
            "d = f:now a file@4 changed(1) <1 0:replace",
            "d/b = - deleted(1) 0:remove",
        ],
    );
    // file -> symlink, and symlink target change
    let to_link = t(&[("a", l("d/b")), ("d", d()), ("d/b", f("y", 2))]);
    check(
        &ag,
        base.clone(),
        std::slice::from_ref(&to_link),
        &["a = l:d/b changed(1) 0:replace"],
    );
    let retarget = t(&[("a", l("elsewhere")), ("d", d()), ("d/b", f("y", 2))]);
    check(
        &[Some(to_link.clone())],
        to_link,
        &[retarget],
        &["a = l:elsewhere changed(1) 0:replace"],
    );
    // directory mode change
    let chmod = t(&[("a", f("x", 1)), ("d", dm(0o700)), ("d/b", f("y", 2))]);
    check(
        &ag,
        chmod,
        std::slice::from_ref(&base),
        &["d = d/700 changed(0) 1:meta"],
    );
}

#[test]
fn identical_changes_copy_nothing() {
    let base = t(&[("a", f("x", 1))]);
    let same = t(&[("a", f("x2", 5)), ("b", f("new", 6))]);
    let ag = [Some(base.clone()), Some(base.clone())];
    // changed identically on hub and peer 1: only peer 2 receives, from the hub
    check(
        &ag,
        same.clone(),
        &[same.clone(), base.clone()],
        &[
            "a = f:x2@5 changed(0,1) <0 2:replace",
            "b = f:new@6 changed(0,1) <0 2:create",
        ],
    );
    // changed identically everywhere: nothing at all
    check(&ag, same.clone(), &[same.clone(), same.clone()], &[]);
}

#[test]
fn conflicting_changes_newest_wins_and_loser_is_kept() {
    let base = t(&[("a", f("x", 1))]);
    let ag = [Some(base.clone()), Some(base.clone())];
    let older = t(&[("a", f("alice", 10))]);
    let newer = t(&[("a", f("bob", 11))]);
    check(
        &ag,
        older.clone(),
        &[newer.clone(), base.clone()],
        &["a = f:bob@11 conflict(w=1 l=0 newest) <1 0:keep 2:replace"],
    );
    check(
        &ag,
        newer.clone(),
        &[older.clone(), base.clone()],
        &["a = f:bob@11 conflict(w=0 l=1 newest) <0 1:keep 2:replace"],
    );
    // three different versions: two losers kept, each on its own replica
    let newest = t(&[("a", f("carol", 12))]);
    check(
        &ag,
        older.clone(),
        &[newer.clone(), newest.clone()],
        &["a = f:carol@12 conflict(w=2 l=0,1 newest) <2 0:keep 1:keep"],
    );
}

#[test]
fn equal_mtimes_follow_a_fixed_rule_whatever_the_replica_order() {
    let base = t(&[("a", f("x", 1))]);
    let ag = [Some(base.clone())];
    let one = t(&[("a", f("one", 7))]);
    let two = t(&[("a", f("two", 7))]);
    let winner = if Hash::of(b"one") > Hash::of(b"two") {
        "one"
    } else {
        "two"
    };
    let p1 = reconcile_result(&ag, one.clone(), std::slice::from_ref(&two));
    let p2 = reconcile_result(&ag, two.clone(), std::slice::from_ref(&one));
    assert_eq!(p1, format!("f:{winner}@7"));
    assert_eq!(p1, p2);
    let plan = plan_of(&ag, one, &[two]);
    assert!(matches!(
        plan.items[0].reason,
        Reason::Conflict {
            rule: Rule::TieBreak,
            ..
        }
    ));
    assert!(
        plan.items[0]
            .actions
            .iter()
            .any(|(_, a)| a == Action::KeepAndReplace)
    );
}

fn plan_of(agreed: &[Option<Tree>], hub: Tree, peers: &[Tree]) -> Plan {
    let hub_e = entries(&hub);
    let peer_e: Vec<Vec<Entry>> = peers.iter().map(entries).collect();
    let agreed_l: Vec<Option<Vec<(RelPath, Version)>>> =
        agreed.iter().map(|a| a.as_ref().map(agreed_list)).collect();
    reconcile_t(&TInput {
        hub: &hub_e,
        peers: peer_e
            .iter()
            .zip(&agreed_l)
            .map(|(p, a)| TPeer {
                view: Some(View::Full(p)),
                agreed: a.as_deref(),
                clock_ok: true,
            })
            .collect(),
        mergeable: None,
        bundles: &[],
    })
}

fn reconcile_result(agreed: &[Option<Tree>], hub: Tree, peers: &[Tree]) -> String {
    show(&plan_of(agreed, hub, peers).items[0].result)
}

#[test]
fn modify_beats_delete() {
    let base = t(&[("a", f("x", 1))]);
    let ag = [Some(base.clone()), Some(base.clone())];
    let modified = t(&[("a", f("edit", 3))]);
    check(
        &ag,
        t(&[]),
        &[modified.clone(), base.clone()],
        &["a = f:edit@3 conflict(w=1 l=0 modify>delete) <1 0:create 2:replace"],
    );
    check(
        &ag,
        modified,
        &[t(&[]), t(&[])],
        &["a = f:edit@3 conflict(w=0 l=1,2 modify>delete) <0 1:create 2:create"],
    );
}

#[test]
fn first_sync_is_a_union_that_deletes_nothing() {
    let hub = t(&[
        ("both", f("same", 1)),
        ("h", f("h", 1)),
        ("diff", f("old", 1)),
    ]);
    let peer = t(&[
        ("both", f("same", 1)),
        ("p", f("p", 1)),
        ("diff", f("new", 2)),
    ]);
    check(
        &[None],
        hub,
        &[peer],
        &[
            "diff = f:new@2 conflict(w=1 l=0 newest) <1 0:keep",
            "h = f:h@1 changed(0) <0 1:create",
            "p = f:p@1 changed(1) <1 0:create",
        ],
    );
    // Something agreed with one peer but missing on a new peer is not deleted.
    let base = t(&[("a", f("x", 1))]);
    check(
        &[Some(base.clone()), None],
        base.clone(),
        &[base.clone(), t(&[])],
        &["a = f:x@1 catchup <0 2:create"],
    );
}

#[test]
fn first_sync_records_agreement_for_equal_files() {
    let tree = t(&[("a", f("x", 1))]);
    let plan = plan_of(&[None], tree.clone(), &[tree]);
    assert_eq!(plan.items.len(), 1);
    assert!(plan.items[0].actions.is_empty());
    assert_eq!(plan.items[0].agree, Replicas::one(1));
}

#[test]
fn directories_go_only_when_everything_inside_went() {
    let base = t(&[("d", d()), ("d/a", f("a", 1)), ("d/b", f("b", 1))]);
    let ag = [Some(base.clone()), Some(base.clone())];
    // peer 1 removed the whole directory, peer 2 added a file in it
    let mut added = base.clone();
    added.push(("d/new", f("n", 2)));
    check(
        &ag,
        base.clone(),
        &[t(&[]), added],
        &[
            "d = d conflict(w=0 l=1 modify>delete) 1:create",
            "d/a = - deleted(1) 0:remove 2:remove",
            "d/b = - deleted(1) 0:remove 2:remove",
            "d/new = f:n@2 changed(2) <2 0:create 1:create",
        ],
    );
    // peer 1 removed it and nothing new appeared: it goes everywhere
    check(
        &ag,
        base.clone(),
        &[t(&[]), base.clone()],
        &[
            "d = - deleted(1) 0:remove 2:remove",
            "d/a = - deleted(1) 0:remove 2:remove",
            "d/b = - deleted(1) 0:remove 2:remove",
        ],
    );
    // peer 1 modified a file that peer 2's deletion of the directory would take
    let mut edited = base.clone();
    edited[1].1 = f("a2", 3);
    check(
        &ag,
        base.clone(),
        &[edited, t(&[])],
        &[
            "d = d conflict(w=0 l=2 modify>delete) 2:create",
            "d/a = f:a2@3 conflict(w=1 l=2 modify>delete) <1 0:replace 2:create",
            "d/b = - deleted(2) 0:remove 1:remove",
        ],
    );
}

#[test]
fn a_directory_with_new_content_beats_a_file() {
    let base = t(&[("x", f("file", 1))]);
    let ag = [Some(base.clone()), Some(base.clone())];
    let dir = t(&[("x", d()), ("x/new", f("n", 2))]);
    let edited = t(&[("x", f("file2", 9))]);
    check(
        &ag,
        base.clone(),
        &[dir, edited],
        &[
            "x = d conflict(w=1 l=2 dir-content) 0:replace 2:keep",
            "x/new = f:n@2 changed(1) <1 0:create 2:create",
        ],
    );
}

#[test]
fn peers_that_missed_a_run_catch_up_and_keep_their_own_changes() {
    let old = t(&[("a", f("v0", 1))]);
    let new = t(&[("a", f("v1", 2))]);
    // peer 2 was down when peer 1's change reached the hub
    check(
        &[Some(new.clone()), Some(old.clone())],
        new.clone(),
        &[new.clone(), old.clone()],
        &["a = f:v1@2 catchup <0 2:replace"],
    );
    // ...and it edited the file meanwhile: a real conflict with what the hub learnt;
    // peer 1 holds a copy of the losing version, and keeps it too (see
    // `a_winner_that_reaches_a_copy_of_the_loser_first_keeps_that_copy`)
    let own = t(&[("a", f("v2", 3))]);
    check(
        &[Some(new.clone()), Some(old.clone())],
        new.clone(),
        &[new.clone(), own],
        &["a = f:v2@3 conflict(w=2 l=0 newest) <2 0:keep 1:keep"],
    );
}

#[test]
fn peers_not_taking_part_are_left_alone() {
    let base = t(&[("a", f("x", 1))]);
    let hub = t(&[("a", f("x", 1)), ("b", f("b", 2))]);
    let (hub_e, p_e) = (entries(&hub), entries(&base));
    let ag = agreed_list(&base);
    let plan = reconcile_t(&TInput {
        hub: &hub_e,
        peers: vec![
            TPeer {
                view: Some(View::Full(&p_e)),
                agreed: Some(&ag),
                clock_ok: true,
            },
            TPeer {
                view: None,
                agreed: Some(&ag),
                clock_ok: true,
            },
        ],
        mergeable: None,
        bundles: &[],
    });
    assert_eq!(render(&plan), ["b = f:b@2 changed(0) <0 1:create"]);
    assert_eq!(plan.items[0].agree, Replicas::one(1));
}

#[test]
fn delta_views_read_through_to_the_agreed_state() {
    let base = agreed_list(&t(&[("a", f("x", 1)), ("b", f("y", 1))]));
    let hub = entries(&t(&[("a", f("x", 1)), ("b", f("y", 1))]));
    let delta = vec![
        Entry {
            path: RelPath::new("a").unwrap(),
            state: State::Absent,
        },
        Entry {
            path: RelPath::new("c").unwrap(),
            state: State::Present(f("z", 2)),
        },
    ];
    let plan = reconcile_t(&TInput {
        hub: &hub,
        peers: vec![TPeer {
            view: Some(View::Delta(&delta)),
            agreed: Some(&base),
            clock_ok: true,
        }],
        mergeable: None,
        bundles: &[],
    });
    assert_eq!(
        render(&plan),
        [
            "a = - deleted(1) 0:remove",
            "c = f:z@2 changed(1) <1 0:create",
        ]
    );
    // An empty delta means the peer holds exactly the agreed state.
    let plan = reconcile_t(&TInput {
        hub: &hub,
        peers: vec![TPeer {
            view: Some(View::Delta(&[])),
            agreed: Some(&base),
            clock_ok: true,
        }],
        mergeable: None,
        bundles: &[],
    });
    assert!(plan.items.is_empty());
}

#[test]
fn paths_being_written_or_unreadable_are_left_alone() {
    let base = t(&[("d", d()), ("d/a", f("x", 1)), ("e", f("e", 1))]);
    let ag = agreed_list(&base);
    let hub = entries(&t(&[("e", f("e2", 2))])); // hub deleted d entirely, changed e
    let peer = vec![
        Entry {
            path: RelPath::new("d").unwrap(),
            state: State::Skip("cannot read".into()),
        },
        Entry {
            path: RelPath::new("e").unwrap(),
            state: State::Skip("changed while being read".into()),
        },
    ];
    let plan = reconcile_t(&TInput {
        hub: &hub,
        peers: vec![TPeer {
            view: Some(View::Full(&peer)),
            agreed: Some(&ag),
            clock_ok: true,
        }],
        mergeable: None,
        bundles: &[],
    });
    assert_eq!(render(&plan), ["d skip", "d/a skip", "e skip"]);
    assert!(
        plan.items.is_empty(),
        "no agreement may be recorded for skipped paths"
    );
}

#[test]
fn conflicts_with_a_skewed_clock_are_left_alone_but_other_changes_flow() {
    let base = t(&[("a", f("x", 1)), ("b", f("y", 1))]);
    let ag = agreed_list(&base);
    let hub = entries(&t(&[
        ("a", f("hub", 5)),
        ("b", f("y", 1)),
        ("new", f("n", 2)),
    ]));
    let peer = entries(&t(&[("a", f("peer", 9)), ("b", f("y2", 3))]));
    let plan = reconcile_t(&TInput {
        hub: &hub,
        peers: vec![TPeer {
            view: Some(View::Full(&peer)),
            agreed: Some(&ag),
            clock_ok: false,
        }],
        mergeable: None,
        bundles: &[],
    });
    assert_eq!(
        render(&plan),
        [
            "b = f:y2@3 changed(1) <1 0:replace",
            "new = f:n@2 changed(0) <0 1:create",
            "a skip",
        ]
    );
}

#[test]
fn logs_changed_on_several_replicas_are_merged_not_decided() {
    let mut b = globset::GlobSetBuilder::new();
    b.add(globset::Glob::new("**/*.changes").unwrap());
    let merge = b.build().unwrap();
    let base = t(&[("meta/p.changes", f("1", 1)), ("pages/p.txt", f("v0", 1))]);
    let ag = [Some(base.clone()), Some(base.clone())];
    let a = t(&[
        ("meta/p.changes", f("1+a", 5)),
        ("pages/p.txt", f("alice", 5)),
    ]);
    let b2 = t(&[
        ("meta/p.changes", f("1+b", 6)),
        ("pages/p.txt", f("bob", 6)),
    ]);
    check_with(
        Some(&merge),
        &ag,
        a,
        &[b2, base.clone()],
        &[
            "meta/p.changes = f:1+b@6 merge(0,1) 0:replace 1:replace 2:replace",
            "pages/p.txt = f:bob@6 conflict(w=1 l=0 newest) <1 0:keep 2:replace",
        ],
    );
    // Changed on one replica only: copied as usual.
    let one = t(&[("meta/p.changes", f("1+a", 5)), ("pages/p.txt", f("v0", 1))]);
    check_with(
        Some(&merge),
        &ag,
        one,
        &[base.clone(), base.clone()],
        &["meta/p.changes = f:1+a@5 changed(0) <0 1:replace 2:replace"],
    );
    // A deletion against an append: the append stays (nothing to merge).
    let gone = t(&[("pages/p.txt", f("v0", 1))]);
    let app = t(&[("meta/p.changes", f("1+b", 6)), ("pages/p.txt", f("v0", 1))]);
    check_with(
        Some(&merge),
        &ag,
        gone,
        &[app, base.clone()],
        &["meta/p.changes = f:1+b@6 conflict(w=1 l=0 modify>delete) <1 0:create 2:replace"],
    );
}

#[test]
fn same_content_different_metadata_is_not_a_conflict() {
    let base = t(&[("a", f("x", 1))]);
    let ag = [Some(base.clone())];
    check(
        &ag,
        t(&[("a", f("x", 5))]),
        &[t(&[("a", f("x", 7))])],
        &["a = f:x@7 meta(0,1) 0:meta"],
    );
}

// ---- property test: random histories through reconcile and an in-memory apply ----

type Fs = BTreeMap<RelPath, Version>;

fn is_consistent(fs: &Fs) -> bool {
    fs.keys().all(|p| {
        p.parent()
            .is_none_or(|parent| fs.get(&parent).is_some_and(Version::is_dir))
    })
}

/// Applies a plan to in-memory trees the way the engine would; returns the versions
/// kept as conflict copies.
fn apply(plan: &Plan, trees: &mut [Fs], agreed: &mut [Option<Fs>]) -> Vec<Version> {
    let (kept, _) = apply_some(plan, trees, &mut || true);
    for item in &plan.items {
        for i in &item.agree {
            let a = agreed[i - 1].get_or_insert_with(Fs::new);
            match &item.result {
                Some(v) => a.insert(item.path.clone(), v.clone()),
                None => a.remove(&item.path),
            };
        }
    }
    kept
}

/// Carries out the actions `pick` accepts, in any order, the way a run killed
/// half-way leaves the trees (the engine runs replicas and transfers concurrently,
/// so any subset can be done). An action the tree cannot take yet (a parent not
/// made, a directory not yet empty) fails, as `mkdirat` or `rmdir` would.
fn apply_some(
    plan: &Plan,
    trees: &mut [Fs],
    pick: &mut dyn FnMut() -> bool,
) -> (Vec<Version>, Vec<Vec<bool>>) {
    let mut kept = Vec::new();
    let mut done = vec![vec![false; trees.len()]; plan.items.len()];
    let mut pending: Vec<(usize, &Item, usize, Action)> = plan
        .items
        .iter()
        .enumerate()
        .flat_map(|(ii, item)| item.actions.iter().map(move |(r, a)| (ii, item, r, a)))
        .filter(|_| pick())
        .collect();
    // Until nothing more can be done: a directory's removal waits for its contents.
    loop {
        let before = pending.len();
        pending.retain(|&(ii, item, r, a)| {
            let t = &mut trees[r];
            let parent_ok = item
                .path
                .parent()
                .is_none_or(|p| t.get(&p).is_some_and(Version::is_dir));
            let has_children = t.keys().any(|k| item.path.is_ancestor_of(k));
            let becomes_dir = item.result.as_ref().is_some_and(Version::is_dir);
            if !parent_ok || (has_children && !becomes_dir) {
                return true;
            }
            if matches!(a, Action::KeepAndReplace | Action::KeepAndRemove) {
                kept.push(t[&item.path].clone());
            }
            match &item.result {
                Some(v) => t.insert(item.path.clone(), v.clone()),
                None => t.remove(&item.path),
            };
            done[ii][r] = true;
            false
        });
        if pending.len() == before {
            break;
        }
    }
    (kept, done)
}

fn plan_for(trees: &[Fs], agreed: &[Option<Fs>]) -> Plan {
    plan_views(trees, agreed, None, false)
}

/// Reconciles in-memory trees; peer `absent` takes no part; with `deltas`, peers
/// with an agreed state send only their differences from it (the sparse path).
fn plan_views(trees: &[Fs], agreed: &[Option<Fs>], absent: Option<usize>, deltas: bool) -> Plan {
    let ents: Vec<Vec<Entry>> = trees
        .iter()
        .map(|t| {
            t.iter()
                .map(|(p, v)| Entry {
                    path: p.clone(),
                    state: State::Present(v.clone()),
                })
                .collect()
        })
        .collect();
    let delta_of = |i: usize| -> Vec<Entry> {
        let (t, a) = (&trees[i], agreed[i - 1].as_ref().expect("known"));
        let mut paths: Vec<&RelPath> = t.keys().chain(a.keys()).collect();
        paths.sort();
        paths.dedup();
        paths
            .into_iter()
            .filter(|p| !match (t.get(*p), a.get(*p)) {
                (None, None) => true,
                (Some(x), Some(y)) => x.same(y),
                _ => false,
            })
            .map(|p| Entry {
                path: p.clone(),
                state: t
                    .get(p)
                    .map_or(State::Absent, |v| State::Present(v.clone())),
            })
            .collect()
    };
    let deltas_v: Vec<Option<Vec<Entry>>> = (0..trees.len())
        .map(|i| (i > 0 && deltas && agreed[i - 1].is_some()).then(|| delta_of(i)))
        .collect();
    let ags: Vec<Option<Vec<(RelPath, Version)>>> = agreed
        .iter()
        .map(|a| {
            a.as_ref()
                .map(|a| a.iter().map(|(p, v)| (p.clone(), v.clone())).collect())
        })
        .collect();
    reconcile_t(&TInput {
        hub: &ents[0],
        peers: (1..trees.len())
            .map(|i| TPeer {
                view: (absent != Some(i)).then(|| match &deltas_v[i] {
                    Some(d) => View::Delta(d),
                    None => View::Full(&ents[i]),
                }),
                agreed: ags[i - 1].as_deref(),
                clock_ok: true,
            })
            .collect(),
        mergeable: None,
        bundles: &[],
    })
}

#[derive(Debug, Clone)]
enum Edit {
    Write(usize, u8, u8, i64),
    Delete(usize, u8),
    MkdirWithFile(usize, u8, i64),
    RemoveDir(usize, u8),
}

fn path_of(n: u8) -> RelPath {
    // A small namespace so that edits collide: top-level names and names in "t/".
    RelPath::new(match n % 6 {
        0 => "a".to_string(),
        1 => "b".to_string(),
        2 => "t/a".to_string(),
        3 => "t/b".to_string(),
        4 => "t".to_string(),
        _ => "u/c".to_string(),
    })
    .unwrap()
}

fn ensure_parents(fs: &mut Fs, p: &RelPath) {
    if let Some(parent) = p.parent() {
        ensure_parents(fs, &parent);
        if !fs.get(&parent).is_some_and(Version::is_dir) {
            remove_tree(fs, &parent);
            fs.insert(parent, d());
        }
    }
}

fn remove_tree(fs: &mut Fs, p: &RelPath) {
    fs.retain(|k, _| k != p && !p.is_ancestor_of(k));
}

fn edit(fs: &mut Fs, e: &Edit) {
    match *e {
        Edit::Write(_, p, c, t) => {
            let p = path_of(p);
            remove_tree(fs, &p);
            ensure_parents(fs, &p);
            fs.insert(p, f(&format!("c{c}"), t));
        }
        Edit::Delete(_, p) => {
            let p = path_of(p);
            if fs.get(&p).is_some_and(|v| !v.is_dir()) {
                fs.remove(&p);
            }
        }
        Edit::MkdirWithFile(_, p, t) => {
            let dir = path_of(p);
            let child = dir.join(b"k").unwrap();
            remove_tree(fs, &dir);
            ensure_parents(fs, &child);
            fs.insert(child, f(&format!("k{t}"), t));
        }
        Edit::RemoveDir(_, p) => remove_tree(fs, &path_of(p)),
    }
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let e = prop_oneof![
        (0..3usize, any::<u8>(), 0..4u8, 1..6i64).prop_map(|(r, p, c, t)| Edit::Write(r, p, c, t)),
        (0..3usize, any::<u8>()).prop_map(|(r, p)| Edit::Delete(r, p)),
        (0..3usize, any::<u8>(), 1..6i64).prop_map(|(r, p, t)| Edit::MkdirWithFile(r, p, t)),
        (0..3usize, any::<u8>()).prop_map(|(r, p)| Edit::RemoveDir(r, p)),
    ];
    prop::collection::vec(e, 0..12)
}

fn replica_of(e: &Edit) -> usize {
    match *e {
        Edit::Write(r, ..)
        | Edit::Delete(r, _)
        | Edit::MkdirWithFile(r, ..)
        | Edit::RemoveDir(r, _) => r,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(2000)
    ))]

    /// Random edits on three replicas over several rounds (sometimes with a peer
    /// missing a round, sometimes with the run killed half-way): after a complete
    /// round with everyone present the trees are equal and consistent and a second
    /// run plans nothing; after every round, every version an edit wrote is in some
    /// tree or kept as a conflict copy, unless a later edit replaced it where it was.
    #[test]
    fn random_histories_converge_and_lose_nothing(
        rounds in prop::collection::vec(
            (edits(), 0..4usize, any::<bool>(), prop::option::weighted(0.3, (any::<u64>(), 0..8u8))),
            1..7,
        ),
        first_sync in any::<bool>(),
    ) {
        let mut trees: Vec<Fs> = vec![Fs::new(), Fs::new(), Fs::new()];
        let mut agreed: Vec<Option<Fs>> = vec![
            if first_sync { None } else { Some(Fs::new()) };
            2
        ];
        // Versions edits wrote, and those a later edit replaced where it saw them.
        let mut written: Vec<Version> = Vec::new();
        let mut superseded: Vec<Version> = Vec::new();
        let mut kept: Vec<Version> = Vec::new();
        for (edits, absent, deltas, crash) in &rounds {
            for e in edits {
                let tree = &mut trees[replica_of(e)];
                let before = tree.clone();
                edit(tree, e);
                for (p, v) in &before {
                    if v.is_file() && tree.get(p).is_none_or(|now| !now.same(v)) {
                        superseded.push(v.clone());
                    }
                }
                for (p, v) in tree.iter() {
                    if v.is_file() && before.get(p).is_none_or(|was| !was.same(v)) {
                        written.push(v.clone());
                    }
                }
            }
            // Optionally one peer misses this round (absent = 1 or 2).
            let gone = (*absent == 1 || *absent == 2).then_some(*absent);
            let plan = plan_views(&trees, &agreed, gone, *deltas);
            if let Some((seed, commits)) = crash {
                // Killed mid-run (or actions failed): some actions done; the pairs in
                // `commits` got as far as agreeing on what both sides did.
                let mut x = *seed | 1;
                let mut pick = move || {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x & 1 == 0
                };
                let (k, done) = apply_some(&plan, &mut trees, &mut pick);
                kept.extend(k);
                for i in (1..3).filter(|&i| commits & (1 << i) != 0 && gone != Some(i)) {
                    let a = agreed[i - 1].get_or_insert_with(Fs::new);
                    for (ii, item) in plan.items.iter().enumerate() {
                        let ok = |r: usize| item.actions.iter().all(|(x, _)| x != r) || done[ii][r];
                        if item.agree.contains(i) && ok(0) && ok(i) {
                            match &item.result {
                                Some(v) => a.insert(item.path.clone(), v.clone()),
                                None => a.remove(&item.path),
                            };
                        }
                    }
                }
            } else {
                kept.extend(apply(&plan, &mut trees, &mut agreed));
                // A completed run establishes each present pair's agreed state.
                for (i, a) in agreed.iter_mut().enumerate() {
                    if *absent != i + 1 {
                        a.get_or_insert_with(Fs::new);
                    }
                }
            }
            for t in &trees {
                prop_assert!(is_consistent(t), "inconsistent tree {:?}\nplan {:?}", t, render(&plan));
            }
            for w in &written {
                let there = trees.iter().flat_map(|t| t.values()).chain(kept.iter())
                    .any(|v| v.same_content(w));
                let replaced = superseded.iter().any(|v| v.same_content(w));
                prop_assert!(there || replaced, "lost {:?}\nplan {:?}", w, render(&plan));
            }
            if crash.is_none() && (*absent == 0 || *absent == 3) {
                prop_assert_eq!(&trees[0], &trees[1], "plan {:?}", render(&plan));
                prop_assert_eq!(&trees[0], &trees[2]);
                let again = plan_for(&trees, &agreed);
                prop_assert!(render(&again).is_empty(), "second run plans {:?}", render(&again));
                for a in &agreed {
                    prop_assert_eq!(a.as_ref().unwrap(), &trees[0]);
                }
            }
        }
    }
}

fn dokuwiki_rules() -> (globset::GlobSet, Vec<crate::rules::Bundle>) {
    let mut b = globset::GlobSetBuilder::new();
    b.add(globset::Glob::new("**/*.changes").unwrap());
    let bundle = crate::rules::BundleRule {
        leader: "meta/{id}.changes".into(),
        followers: vec!["pages/{id}.txt".into(), "meta/{id}.meta".into()],
        install_with_leader: vec!["pages/{id}.txt".into()],
        lock_dir: Some("locks".into()),
    }
    .compile()
    .unwrap();
    (b.build().unwrap(), vec![bundle])
}

/// Rows of the bundle rule: when several replicas changed a page bundle, the one
/// whose changelog changed last wins the page and its metadata.
#[test]
fn a_bundle_leader_decides_for_its_followers() {
    let (merge, bundles) = dokuwiki_rules();
    let base = t(&[
        ("meta/p.changes", f("c1", 10)),
        ("meta/p.meta", f("m1", 10)),
        ("pages/p.txt", f("v1", 10)),
    ]);
    let ag = [Some(base.clone())];

    // Deleted on the hub (its changelog appended last), edited on the peer
    // earlier: the deletion stands, the peer's edit is kept, not resurrected.
    let deleted = t(&[
        ("meta/p.changes", f("c1+D", 30)),
        ("meta/p.meta", f("m-del", 30)),
    ]);
    let edited = t(&[
        ("meta/p.changes", f("c1+E", 20)),
        ("meta/p.meta", f("m-edit", 20)),
        ("pages/p.txt", f("bob", 20)),
    ]);
    check_rules(
        Some(&merge),
        &bundles,
        &ag,
        deleted.clone(),
        std::slice::from_ref(&edited),
        &[
            "meta/p.changes = f:c1+D@30 merge(0,1) 0:replace 1:replace",
            "meta/p.meta = f:m-del@30 conflict(w=0 l=1 leader) <0 1:keep",
            "pages/p.txt = - conflict(w=0 l=1 leader) 1:keep-remove",
        ],
    );
    // Without the bundle the modification would win and the page come back.
    check_with(
        Some(&merge),
        &ag,
        deleted,
        std::slice::from_ref(&edited),
        &[
            "meta/p.changes = f:c1+D@30 merge(0,1) 0:replace 1:replace",
            "meta/p.meta = f:m-del@30 conflict(w=0 l=1 newest) <0 1:keep",
            "pages/p.txt = f:bob@20 conflict(w=1 l=0 modify>delete) <1 0:create",
        ],
    );

    // Saved on the peer; the hub only re-rendered the page's metadata later: the
    // saving side's metadata wins although it is older.
    let saved = t(&[
        ("meta/p.changes", f("c1+S", 20)),
        ("meta/p.meta", f("m-saved", 20)),
        ("pages/p.txt", f("v2", 20)),
    ]);
    let rendered = t(&[
        ("meta/p.changes", f("c1", 10)),
        ("meta/p.meta", f("m-render", 25)),
        ("pages/p.txt", f("v1", 10)),
    ]);
    check_rules(
        Some(&merge),
        &bundles,
        &ag,
        rendered,
        std::slice::from_ref(&saved),
        &[
            "meta/p.changes = f:c1+S@20 changed(1) <1 0:replace",
            "meta/p.meta = f:m-saved@20 conflict(w=1 l=0 leader) <1 0:keep",
            "pages/p.txt = f:v2@20 changed(1) <1 0:replace",
        ],
    );

    // Both saved: the later save wins the page (as newest-mtime would), the
    // changelogs merge.
    let a = t(&[
        ("meta/p.changes", f("c1+A", 15)),
        ("meta/p.meta", f("m-a", 15)),
        ("pages/p.txt", f("alice", 15)),
    ]);
    check_rules(
        Some(&merge),
        &bundles,
        &ag,
        a,
        std::slice::from_ref(&saved),
        &[
            "meta/p.changes = f:c1+S@20 merge(0,1) 0:replace 1:replace",
            "meta/p.meta = f:m-saved@20 conflict(w=1 l=0 leader) <1 0:keep",
            "pages/p.txt = f:v2@20 conflict(w=1 l=0 leader) <1 0:keep",
        ],
    );

    // A follower changed on one side only is copied as usual, even against the
    // leader's winner (an external edit is not undone).
    let external = t(&[
        ("meta/p.changes", f("c1", 10)),
        ("meta/p.meta", f("m1", 10)),
        ("pages/p.txt", f("ext", 40)),
    ]);
    let appended = t(&[
        ("meta/p.changes", f("c1+x", 12)),
        ("meta/p.meta", f("m1", 10)),
        ("pages/p.txt", f("v1", 10)),
    ]);
    check_rules(
        Some(&merge),
        &bundles,
        &ag,
        external,
        std::slice::from_ref(&appended),
        &[
            "meta/p.changes = f:c1+x@12 changed(1) <1 0:replace",
            "pages/p.txt = f:ext@40 changed(0) <0 1:replace",
        ],
    );

    // Only metadata (mode, mtime) differs: newest wins as always, no copy kept.
    let touched = t(&[
        ("meta/p.changes", f("c1+S", 20)),
        ("meta/p.meta", f("m1", 50)),
        ("pages/p.txt", f("v1", 10)),
    ]);
    let other = t(&[
        ("meta/p.changes", f("c1+T", 25)),
        ("meta/p.meta", f("m1", 40)),
        ("pages/p.txt", f("v1", 10)),
    ]);
    check_rules(
        Some(&merge),
        &bundles,
        &ag,
        touched,
        std::slice::from_ref(&other),
        &[
            "meta/p.changes = f:c1+T@25 merge(0,1) 0:replace 1:replace",
            "meta/p.meta = f:m1@50 meta(0,1) 1:meta",
        ],
    );
}

/// The bundle rule with the hub as the only replica whose leader changed (the
/// hub saved; a peer only re-rendered the metadata).
#[test]
fn the_hub_alone_can_lead_a_bundle() {
    let (merge, bundles) = dokuwiki_rules();
    let base = t(&[
        ("meta/p.changes", f("c1", 10)),
        ("meta/p.meta", f("m1", 10)),
        ("pages/p.txt", f("v1", 10)),
    ]);
    let saved = t(&[
        ("meta/p.changes", f("c1+S", 20)),
        ("meta/p.meta", f("m-saved", 20)),
        ("pages/p.txt", f("v2", 20)),
    ]);
    let rendered = t(&[
        ("meta/p.changes", f("c1", 10)),
        ("meta/p.meta", f("m-render", 25)),
        ("pages/p.txt", f("v1", 10)),
    ]);
    check_rules(
        Some(&merge),
        &bundles,
        &[Some(base.clone()), Some(base.clone())],
        saved,
        &[rendered, base.clone()],
        &[
            "meta/p.changes = f:c1+S@20 changed(0) <0 1:replace 2:replace",
            "meta/p.meta = f:m-saved@20 conflict(w=0 l=1 leader) <0 1:keep 2:replace",
            "pages/p.txt = f:v2@20 changed(0) <0 1:replace 2:replace",
        ],
    );
}

/// A conflict's winner reached a replica that held the loser's version only as an
/// agreed copy (r1, which had agreed on the hub's edit while r2 was away), then the
/// run died before the hub kept its own losing version. The next run, without r2,
/// sees r1's copy of the winner as an ordinary edit and replaces the hub's version:
/// unless r1 kept the version it replaced, it is gone everywhere.
#[test]
fn a_winner_that_reaches_a_copy_of_the_loser_first_keeps_that_copy() {
    let p = |s: &str| RelPath::new(s).unwrap();
    let base: Fs = [(p("a"), f("base", 1))].into();
    let mut trees = vec![base.clone(), base.clone(), base.clone()];
    let mut agreed = vec![Some(base.clone()), Some(base.clone())];
    // The hub edits a while r2 is away; r2 edits it later (newer mtime).
    trees[0].insert(p("a"), f("hub", 5));
    let plan = plan_views(&trees, &agreed, Some(2), false);
    apply(&plan, &mut trees, &mut agreed);
    agreed[0].get_or_insert_with(Fs::new);
    trees[2].insert(p("a"), f("r2", 7));
    // Everyone present: r2 wins, the hub's edit loses, on r0 and on r1's copy.
    let plan = plan_views(&trees, &agreed, None, false);
    assert_eq!(
        render(&plan),
        ["a = f:r2@7 conflict(w=2 l=0 newest) <2 0:keep 1:keep"]
    );
    // The run dies after r1's action, before the hub's.
    let mut n = 0;
    let (kept, _) = apply_some(&plan, &mut trees, &mut || {
        n += 1;
        n == 2
    });
    assert_eq!(kept, [f("hub", 5)], "r1 keeps what it replaced");
    // The next run, r2 away again: r1's winner replaces the hub's version as a
    // plain edit; the hub's version survives as r1's conflict copy.
    let plan = plan_views(&trees, &agreed, Some(2), false);
    assert_eq!(render(&plan), ["a = f:r2@7 changed(1) <1 0:replace"]);
}
