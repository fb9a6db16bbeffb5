//! The messages of protocol version 2.
//!
//! The hub sends [`Request`]s and a replica answers with [`Response`]s, in order,
//! except that file data is multiplexed by `id` so that many small files can be in
//! flight at once. A session is: `Open`, `Scan`, then any number of `Read`s (as a
//! source) and `Op`s with their `Data`/`End` (as a destination), then `Commit`
//! chunks if the pair's agreed state changed, then `Close`.

use bincode::{Decode, Encode};

use crate::archive::{ReplicaId, Token};
use crate::relpath::RelPath;
use crate::version::{Entry, Mtime, Version};

#[derive(Debug, Encode, Decode)]
pub enum Request {
    Open(Open),
    /// Scan the root; answered by `Entries`* then `ScanDone`. With `full`, every
    /// present path, never a delta (asked for again when the hub finds it cannot
    /// use a delta after all: then the tree is not scanned a second time).
    Scan {
        full: bool,
    },
    /// Send `len` bytes of a file from `offset`; answered by one `Data`, shorter only
    /// if the file is shorter.
    Read {
        id: u32,
        path: RelPath,
        offset: u64,
        len: u32,
    },
    /// Start a change. `PutFile` then takes `Data` and is carried out at `End`; the
    /// others are carried out at once. Each is answered by one `Done`.
    Op {
        id: u32,
        op: Op,
    },
    Data {
        id: u32,
        bytes: Vec<u8>,
    },
    End {
        id: u32,
    },
    /// Drop a `PutFile` in progress (its source failed); answered by `Done`.
    Abort {
        id: u32,
    },
    /// Every operation of install group `group` has been sent (`members` of them),
    /// or some could not be (`complete` false: the group is dropped, its members
    /// answered with an error and retried next run).
    GroupEnd {
        group: u32,
        members: u32,
        complete: bool,
    },
    /// A chunk of the new agreed state of this pair, as changes to the old one (or,
    /// with `reset`, to an empty state); the last chunk carries the new token.
    /// Answered by `Committed` after the last.
    Commit {
        changes: Vec<(RelPath, Option<Version>)>,
        token: Option<Token>,
        reset: bool,
    },
    Close,
}

#[derive(Debug, Encode, Decode)]
pub struct Open {
    pub hub: ReplicaId,
    /// What the hub calls this replica (used in conflict-copy names).
    pub label: String,
    pub excludes: Vec<String>,
    /// The hub's token for this pair's agreed state, if it has one: when the replica's
    /// copy carries the same token it answers the scan with a delta.
    pub pair: Option<Token>,
    pub dry_run: bool,
    /// The replica id the hub's agreed state was made with: a delta is only
    /// meaningful if this is still the same replica.
    pub pair_replica: Option<ReplicaId>,
    /// Only checking (`hubsync check`): also try whether the root is writable.
    pub check: bool,
    /// Remove conflict copies older than this many seconds when the session ends.
    pub conflict_retention: Option<u64>,
    /// What to invalidate after installing files (checked by the replica).
    pub after_install: Vec<crate::rules::AfterInstallRule>,
    /// Run in the root (by `sh -c`) after changes were applied, with the changed
    /// paths on stdin.
    pub post_apply: Option<String>,
}

/// Operations carried out together on a replica, in `position` order, once all of
/// them are there (a page and its changelog), holding `lock` meanwhile.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct GroupTag {
    pub group: u32,
    pub position: u32,
    pub lock: Option<IoLock>,
}

/// A lock directory `dir/md5(absolute path of of)`, as DokuWiki's `io_lock` takes.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct IoLock {
    pub dir: RelPath,
    pub of: RelPath,
}

/// What a replica must find at a path before changing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum Expect {
    /// Nothing there.
    Absent,
    /// Exactly what this replica reported in this session's scan.
    Scanned,
}

#[derive(Debug, Clone, Encode, Decode)]
pub enum Op {
    PutFile {
        path: RelPath,
        version: Version,
        expect: Expect,
        keep: Option<String>,
        group: Option<GroupTag>,
    },
    PutSymlink {
        path: RelPath,
        version: Version,
        expect: Expect,
        keep: Option<String>,
    },
    Mkdir {
        path: RelPath,
        version: Version,
        expect: Expect,
        keep: Option<String>,
    },
    /// Remove a file, a symlink or an empty directory; with `keep`, a file or
    /// symlink is moved into the conflicts directory instead.
    Remove {
        path: RelPath,
        keep: Option<String>,
        group: Option<GroupTag>,
    },
    /// Same content, new permission bits, mtime or owner.
    SetMeta { path: RelPath, version: Version },
}

impl Op {
    pub fn path(&self) -> &RelPath {
        match self {
            Op::PutFile { path, .. }
            | Op::PutSymlink { path, .. }
            | Op::Mkdir { path, .. }
            | Op::Remove { path, .. }
            | Op::SetMeta { path, .. } => path,
        }
    }
}

#[derive(Debug, Encode, Decode)]
pub enum Response {
    Opened(Opened),
    Entries(Vec<Entry>),
    ScanDone(ScanSummary),
    Data {
        id: u32,
        bytes: Vec<u8>,
    },
    Done {
        id: u32,
        result: Result<(), OpError>,
    },
    Committed,
    /// The scan cache on disk now has this generation (pair records refer to it).
    CacheSaved {
        generation: u64,
    },
    /// Sent about once a second while a long request (a scan) is under way, so that
    /// a slow replica is not mistaken for a dead one.
    Progress {
        files: u64,
        bytes: u64,
    },
    /// Something the hub should report, the session goes on.
    Warning(String),
    /// The replica cannot go on; it closes after this.
    Fatal(String),
}

#[derive(Debug, Encode, Decode)]
pub struct Opened {
    pub replica: ReplicaId,
    pub hostname: String,
    /// The replica's clock when it answered.
    pub time: Mtime,
    pub pair: PairStatus,
    /// The root held nothing at all, not even a state directory, when the session
    /// began: what an unmounted disk looks like.
    pub root_was_empty: bool,
    /// Whether a file could be created in the root (asked for by `check`).
    pub writable: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum PairStatus {
    /// No agreed state with this hub.
    None,
    /// There is one but it could not be read (the reason).
    Unreadable(String),
    Present(Token),
}

#[derive(Debug, Clone, Copy, Default, Encode, Decode, serde::Serialize)]
pub struct ScanSummary {
    /// Entries are changes against the agreed state, not the whole tree.
    pub delta: bool,
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    pub hashed_files: u64,
    pub hashed_bytes: u64,
    pub temps_removed: u64,
    pub millis: u64,
}

/// Why one operation was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, thiserror::Error)]
pub enum OpError {
    /// The path changed since it was scanned; it syncs next run.
    #[error("changed since it was scanned, left alone until the next run")]
    Changed,
    /// The source changed while it was being copied; it syncs next run.
    #[error("the source changed while being copied, will retry next run")]
    SourceChanged,
    #[error("refused: {0}")]
    Refused(String),
    #[error("{0}")]
    Io(String),
}
