//! A replica session driven request by request: install groups, invalidation
//! after installing, and the post-apply command.

use super::*;
use crate::version::{Hash, Kind};

fn rp(s: &str) -> RelPath {
    RelPath::new(s).unwrap()
}

struct Replica {
    dir: tempfile::TempDir,
    server: Server,
    out: Vec<Response>,
    next: u32,
}

fn file(content: &[u8], secs: i64) -> Version {
    Version {
        kind: Kind::File {
            size: content.len() as u64,
            hash: Hash::of(content),
        },
        mode: 0o644,
        mtime: Mtime::new(secs, 0),
        uid: rustix::process::geteuid().as_raw(),
        gid: rustix::process::getegid().as_raw(),
    }
}

impl Replica {
    fn new(after_install: Vec<crate::rules::AfterInstallRule>, post_apply: Option<String>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for d in ["locks", "meta", "pages", "cache/a"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let mut r = Replica {
            server: Server::new(dir.path().to_path_buf(), None, false),
            dir,
            out: Vec::new(),
            next: 1,
        };
        r.send(Request::Open(Open {
            hub: ReplicaId::random(),
            label: "web2".into(),
            excludes: vec!["cache/**".into(), "locks/**".into()],
            pair: None,
            dry_run: false,
            pair_replica: None,
            check: false,
            conflict_retention: None,
            after_install,
            post_apply,
        }));
        r.send(Request::Scan { full: true });
        r.out.clear();
        r
    }

    fn send(&mut self, req: Request) {
        let out = &mut self.out;
        self.server.handle(req, &mut |r| out.push(r));
    }

    /// Lets received files finish syncing, as the serve loop does when idle.
    fn settle(&mut self) {
        let out = &mut self.out;
        while self.server.idle(&mut |r| out.push(r)) {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// Sends a whole file as a member of `group`; returns its request id.
    fn put(&mut self, path: &str, content: &[u8], secs: i64, group: Option<GroupTag>) -> u32 {
        let id = self.next;
        self.next += 1;
        self.send(Request::Op {
            id,
            op: Op::PutFile {
                path: rp(path),
                version: file(content, secs),
                expect: Expect::Absent,
                keep: None,
                group,
            },
        });
        self.send(Request::Data {
            id,
            bytes: content.to_vec(),
        });
        self.send(Request::End { id });
        id
    }

    fn done(&self) -> Vec<(u32, bool)> {
        self.out
            .iter()
            .filter_map(|r| match r {
                Response::Done { id, result } => Some((*id, result.is_ok())),
                _ => None,
            })
            .collect()
    }

    fn exists(&self, p: &str) -> bool {
        self.dir.path().join(p).exists()
    }
}

fn tag(group: u32, position: u32) -> Option<GroupTag> {
    Some(GroupTag {
        group,
        position,
        lock: Some(IoLock {
            dir: rp("locks"),
            of: rp("meta/p.changes"),
        }),
    })
}

#[test]
fn a_group_is_installed_whole_in_order_once_the_hub_says_it_is_complete() {
    let mut r = Replica::new(vec![], None);
    // The leader arrives first but is installed last.
    let log = r.put("meta/p.changes", b"1\tE\n", 20, tag(7, 1));
    let page = r.put("pages/p.txt", b"text", 20, tag(7, 0));
    r.settle();
    assert!(
        r.done().is_empty(),
        "nothing answered before the group is complete"
    );
    assert!(!r.exists("pages/p.txt") && !r.exists("meta/p.changes"));
    r.send(Request::GroupEnd {
        group: 7,
        members: 2,
        complete: true,
    });
    assert_eq!(
        r.done(),
        vec![(page, true), (log, true)],
        "page first, then its log"
    );
    assert_eq!(
        std::fs::read(r.dir.path().join("pages/p.txt")).unwrap(),
        b"text"
    );
    assert!(r.exists("meta/p.changes"));
    // The lock was released.
    assert_eq!(
        std::fs::read_dir(r.dir.path().join("locks"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn an_incomplete_group_is_dropped_and_answered_for_the_next_run() {
    let mut r = Replica::new(vec![], None);
    let page = r.put("pages/p.txt", b"text", 20, tag(3, 0));
    r.settle();
    // The hub could not send the changelog (its source failed).
    r.send(Request::GroupEnd {
        group: 3,
        members: 1,
        complete: false,
    });
    assert_eq!(r.done(), vec![(page, false)]);
    assert!(
        !r.exists("pages/p.txt"),
        "a page without its log is not installed"
    );

    // A member aborted on the way: the group goes, whatever the hub says later.
    r.out.clear();
    let page = r.put("pages/q.txt", b"q", 20, tag(4, 0));
    let id = r.next;
    r.next += 1;
    r.send(Request::Op {
        id,
        op: Op::PutFile {
            path: rp("meta/q.changes"),
            version: file(b"log", 20),
            expect: Expect::Absent,
            keep: None,
            group: tag(4, 1),
        },
    });
    r.send(Request::Abort { id });
    r.settle();
    r.send(Request::GroupEnd {
        group: 4,
        members: 2,
        complete: true,
    });
    let mut done = r.done();
    done.sort();
    assert_eq!(done, vec![(page, false), (id, false)]);
    assert!(!r.exists("pages/q.txt") && !r.exists("meta/q.changes"));
    // No temp file is left behind in either directory.
    for d in ["pages", "meta"] {
        assert_eq!(
            std::fs::read_dir(r.dir.path().join(d)).unwrap().count(),
            0,
            "{d}"
        );
    }
}

#[test]
fn a_group_the_hub_never_ends_is_dropped_when_the_session_ends() {
    let mut r = Replica::new(vec![], None);
    let page = r.put("pages/p.txt", b"text", 20, tag(1, 0));
    r.settle();
    r.send(Request::Close);
    assert_eq!(r.done(), vec![(page, false)]);
    assert!(!r.exists("pages/p.txt"));
}

#[test]
fn installing_a_page_removes_caches_made_since_its_revision_and_runs_post_apply() {
    let record = tempfile::tempdir().unwrap();
    let list = record.path().join("changed");
    let rule = crate::rules::AfterInstallRule {
        when: "pages/{id}.txt".into(),
        remove: vec!["meta/{id}.indexed".into()],
        remove_newer: vec!["cache/**".into()],
        ..Default::default()
    };
    let mut r = Replica::new(
        vec![rule],
        Some(format!(
            "cat > {}",
            crate::util::shell_quote(&list.display().to_string())
        )),
    );
    let p = r.dir.path().to_path_buf();
    std::fs::write(p.join("meta/p.indexed"), "").unwrap();
    std::fs::write(p.join("meta/other.indexed"), "").unwrap();
    // Rendered by this server after the revision (stale once it arrives), and
    // long before it (already seen as stale by the application).
    std::fs::write(p.join("cache/a/after.xhtml"), "old text").unwrap();
    std::fs::write(p.join("cache/a/before.xhtml"), "older text").unwrap();
    let old = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: 1_000,
            tv_nsec: 0,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: 1_000,
            tv_nsec: 0,
        },
    };
    let before = p.join("cache/a/before.xhtml");
    rustix::fs::utimensat(rustix::fs::CWD, &before, &old, rustix::fs::AtFlags::empty()).unwrap();

    let now = Mtime::now().secs;
    r.put("pages/p.txt", b"new text", now - 5, None);
    r.settle();
    r.send(Request::Close);
    assert!(
        !p.join("meta/p.indexed").exists(),
        "the page's index stamp goes"
    );
    assert!(p.join("meta/other.indexed").exists(), "other pages' stay");
    assert!(!p.join("cache/a/after.xhtml").exists());
    assert!(p.join("cache/a/before.xhtml").exists());
    assert_eq!(std::fs::read_to_string(&list).unwrap(), "pages/p.txt\n");
}
