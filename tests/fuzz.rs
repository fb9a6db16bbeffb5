//! Hostile bytes against the two decoders that read what others wrote: the wire
//! (`proto::read_greeting`, `proto::read_frame`) and the state files
//! (`archive::PairRecord::load`, `archive::load_scan_cache`,
//! `archive::scan_cache_generation`).
//!
//! Random bytes, and valid encodings mutated (bit flips, bytes set to varint markers,
//! truncations, extensions, insertions), with the frame's length prefix or the state
//! file's checksum recomputed half of the time so that the mutation reaches the
//! bincode decoder behind them. Every input must give a message or a clear error (a
//! state-file error names the file), never a panic; and in a child process whose
//! address space is capped, no length prefix, however large, may make a decoder
//! allocate more than the documented bound.
//!
//! Fast by default (256 cases per property, about a second in all); `PROPTEST_CASES=5000` for a long run.

use std::io::Cursor;
use std::path::Path;

use hubsync::archive::{
    self, CacheEntry, PairRecord, ReplicaId, StateError, Token, load_scan_cache,
    scan_cache_generation,
};
use hubsync::proto::{
    self, Expect, GroupTag, IoLock, MAX_FRAME, Op, OpError, Open, Opened, PairStatus, ProtoError,
    Request, Response, ScanSummary,
};
use hubsync::relpath::RelPath;
use hubsync::scan::StatKey;
use hubsync::version::{Entry, Hash, Kind, Mtime, State, Version};
use proptest::prelude::*;
use proptest::test_runner::Config;

fn cases(default: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    Config {
        cases,
        // The mutations are cheap to shrink but the inputs are not interesting to
        // keep: a failure prints the input, which is what matters.
        failure_persistence: None,
        ..Config::default()
    }
}

// ---------------------------------------------------------------- valid messages

fn arb_relpath() -> impl Strategy<Value = RelPath> {
    let comp = proptest::collection::vec(
        prop_oneof![
            Just(b'a'),
            Just(b'.'),
            Just(b' '),
            Just(b'\n'),
            Just(0xffu8)
        ],
        1..4,
    );
    proptest::collection::vec(comp, 1..4)
        .prop_filter_map("valid path", |comps| RelPath::new(comps.join(&b'/')).ok())
}

fn arb_version() -> impl Strategy<Value = Version> {
    let kind = prop_oneof![
        (any::<u64>(), any::<[u8; 32]>()).prop_map(|(size, h)| Kind::File {
            size,
            hash: Hash(h)
        }),
        Just(Kind::Dir),
        proptest::collection::vec(any::<u8>(), 0..12).prop_map(|target| Kind::Symlink { target }),
    ];
    (
        kind,
        any::<u32>(),
        any::<i64>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(|(kind, mode, secs, nanos, uid, gid)| Version {
            kind,
            mode,
            mtime: Mtime::new(secs, nanos),
            uid,
            gid,
        })
}

fn arb_state() -> impl Strategy<Value = State> {
    prop_oneof![
        Just(State::Absent),
        arb_version().prop_map(State::Present),
        ".{0,8}".prop_map(State::Skip),
    ]
}

fn arb_group() -> impl Strategy<Value = Option<GroupTag>> {
    proptest::option::of(
        (
            any::<u32>(),
            any::<u32>(),
            proptest::option::of((arb_relpath(), arb_relpath())),
        )
            .prop_map(|(group, position, lock)| GroupTag {
                group,
                position,
                lock: lock.map(|(dir, of)| IoLock { dir, of }),
            }),
    )
}

fn arb_op() -> impl Strategy<Value = Op> {
    let expect = prop_oneof![Just(Expect::Absent), Just(Expect::Scanned)];
    let keep = proptest::option::of("[a-z0-9-]{0,10}");
    prop_oneof![
        (
            arb_relpath(),
            arb_version(),
            expect.clone(),
            keep.clone(),
            arb_group()
        )
            .prop_map(|(path, version, expect, keep, group)| Op::PutFile {
                path,
                version,
                expect,
                keep,
                group,
            }),
        (arb_relpath(), arb_version(), expect.clone(), keep.clone()).prop_map(
            |(path, version, expect, keep)| Op::PutSymlink {
                path,
                version,
                expect,
                keep
            }
        ),
        (arb_relpath(), arb_version(), expect, keep.clone()).prop_map(
            |(path, version, expect, keep)| {
                Op::Mkdir {
                    path,
                    version,
                    expect,
                    keep,
                }
            }
        ),
        (arb_relpath(), keep.clone(), arb_group()).prop_map(|(path, keep, group)| Op::Remove {
            path,
            keep,
            group
        }),
        (arb_relpath(), arb_version()).prop_map(|(path, version)| Op::SetMeta { path, version }),
    ]
}

fn arb_request() -> impl Strategy<Value = Request> {
    let bytes = proptest::collection::vec(any::<u8>(), 0..40);
    prop_oneof![
        (
            any::<[u8; 16]>(),
            ".{0,8}",
            proptest::collection::vec(".{0,6}", 0..3),
            proptest::option::of(any::<u64>()),
            any::<bool>(),
            proptest::option::of(any::<[u8; 16]>()),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(|(hub, label, excludes, pair, dry_run, pr, ret)| {
                Request::Open(Open {
                    hub: ReplicaId(hub),
                    label,
                    excludes,
                    pair: pair.map(Token),
                    dry_run,
                    pair_replica: pr.map(ReplicaId),
                    check: dry_run,
                    conflict_retention: ret,
                    after_install: Vec::new(),
                    post_apply: None,
                })
            }),
        any::<bool>().prop_map(|full| Request::Scan { full }),
        (any::<u32>(), arb_relpath(), any::<u64>(), any::<u32>()).prop_map(
            |(id, path, offset, len)| Request::Read {
                id,
                path,
                offset,
                len
            }
        ),
        (any::<u32>(), arb_op()).prop_map(|(id, op)| Request::Op { id, op }),
        (any::<u32>(), bytes).prop_map(|(id, bytes)| Request::Data { id, bytes }),
        any::<u32>().prop_map(|id| Request::End { id }),
        any::<u32>().prop_map(|id| Request::Abort { id }),
        (any::<u32>(), any::<u32>(), any::<bool>()).prop_map(|(group, members, complete)| {
            Request::GroupEnd {
                group,
                members,
                complete,
            }
        }),
        (
            proptest::collection::vec((arb_relpath(), proptest::option::of(arb_version())), 0..4),
            proptest::option::of(any::<u64>()),
            any::<bool>(),
        )
            .prop_map(|(changes, token, reset)| Request::Commit {
                changes,
                token: token.map(Token),
                reset
            }),
        proptest::strategy::LazyJust::new(|| Request::Close),
    ]
}

fn arb_summary() -> impl Strategy<Value = ScanSummary> {
    (any::<bool>(), any::<[u64; 7]>()).prop_map(|(delta, n)| ScanSummary {
        delta,
        files: n[0],
        dirs: n[1],
        bytes: n[2],
        hashed_files: n[3],
        hashed_bytes: n[4],
        temps_removed: n[5],
        millis: n[6],
    })
}

fn arb_response() -> impl Strategy<Value = Response> {
    let op_error = prop_oneof![
        Just(OpError::Changed),
        Just(OpError::SourceChanged),
        ".{0,8}".prop_map(OpError::Refused),
        ".{0,8}".prop_map(OpError::Io),
    ];
    prop_oneof![
        (
            any::<[u8; 16]>(),
            ".{0,8}",
            any::<i64>(),
            prop_oneof![
                Just(PairStatus::None),
                ".{0,8}".prop_map(PairStatus::Unreadable),
                any::<u64>().prop_map(|t| PairStatus::Present(Token(t))),
            ],
            any::<bool>(),
            proptest::option::of(any::<bool>()),
        )
            .prop_map(|(id, hostname, secs, pair, empty, writable)| {
                Response::Opened(Opened {
                    replica: ReplicaId(id),
                    hostname,
                    time: Mtime::new(secs, 0),
                    pair,
                    root_was_empty: empty,
                    writable,
                })
            }),
        proptest::collection::vec(
            (arb_relpath(), arb_state()).prop_map(|(path, state)| Entry { path, state }),
            0..5
        )
        .prop_map(Response::Entries),
        arb_summary().prop_map(Response::ScanDone),
        (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(id, bytes)| Response::Data { id, bytes }),
        (any::<u32>(), proptest::option::of(op_error)).prop_map(|(id, e)| Response::Done {
            id,
            result: e.map_or(Ok(()), Err)
        }),
        proptest::strategy::LazyJust::new(|| Response::Committed),
        any::<u64>().prop_map(|generation| Response::CacheSaved { generation }),
        (any::<u64>(), any::<u64>()).prop_map(|(files, bytes)| Response::Progress { files, bytes }),
        ".{0,12}".prop_map(Response::Warning),
        ".{0,12}".prop_map(Response::Fatal),
    ]
}

// ---------------------------------------------------------------- mutations

#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        at: usize,
        bit: u8,
    },
    /// Set a byte to a value that means something to a decoder: a varint marker
    /// (251..=254), an enum index out of range, 0, 0xff.
    Set {
        at: usize,
        value: u8,
    },
    /// Put a maximal u64 varint (marker 253 and eight 0xff) at a position: every
    /// length prefix it lands on claims 2^64-1 items.
    HugeVarint {
        at: usize,
    },
    Truncate {
        at: usize,
    },
    Extend {
        bytes: Vec<u8>,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Remove {
        at: usize,
        len: usize,
    },
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    let at = any::<usize>();
    prop_oneof![
        (at, 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (
            at,
            prop_oneof![
                Just(0u8),
                Just(1),
                Just(9),
                Just(250),
                Just(251),
                Just(252),
                Just(253),
                Just(254),
                Just(255),
                any::<u8>()
            ]
        )
            .prop_map(|(at, value)| Mutation::Set { at, value }),
        at.prop_map(|at| Mutation::HugeVarint { at }),
        at.prop_map(|at| Mutation::Truncate { at }),
        proptest::collection::vec(any::<u8>(), 1..16).prop_map(|bytes| Mutation::Extend { bytes }),
        (at, proptest::collection::vec(any::<u8>(), 1..9))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (at, 1usize..9).prop_map(|(at, len)| Mutation::Remove { at, len }),
    ]
}

/// Applies `m` to `b` at or after `from` (so that a header can be left alone).
fn mutate(b: &mut Vec<u8>, from: usize, m: &Mutation) {
    let span = b.len().saturating_sub(from).max(1);
    let pos = |at: usize| (from + at % span).min(b.len());
    match m {
        Mutation::Flip { at, bit } => {
            let i = pos(*at);
            if i < b.len() {
                b[i] ^= 1 << bit;
            }
        }
        Mutation::Set { at, value } => {
            let i = pos(*at);
            if i < b.len() {
                b[i] = *value;
            }
        }
        Mutation::HugeVarint { at } => {
            let i = pos(*at);
            let mut huge = vec![253u8];
            huge.extend_from_slice(&[0xff; 8]);
            let end = (i + 1).min(b.len());
            b.splice(i..end, huge);
        }
        Mutation::Truncate { at } => {
            let i = pos(*at);
            b.truncate(i);
        }
        Mutation::Extend { bytes } => b.extend_from_slice(bytes),
        Mutation::Insert { at, bytes } => {
            let i = pos(*at);
            b.splice(i..i, bytes.iter().copied());
        }
        Mutation::Remove { at, len } => {
            let i = pos(*at);
            let end = (i + len).min(b.len());
            b.drain(i..end);
        }
    }
}

fn frame<T: bincode::Encode>(msg: &T) -> Vec<u8> {
    let mut out = Vec::new();
    proto::encode_frame(msg, &mut out).unwrap();
    out
}

/// Rewrites the length prefix to the payload that follows it.
fn fix_prefix(b: &mut [u8]) {
    if b.len() >= 4 {
        let len = (b.len() - 4) as u32;
        b[..4].copy_from_slice(&len.to_le_bytes());
    }
}

/// Reads frames of type `T` until the stream ends or fails. Checks what a reader
/// must guarantee: never more bytes consumed than given, a message only if it
/// re-encodes to a frame that decodes the same, and an error that says something.
fn drain<T>(bytes: &[u8]) -> Result<usize, TestCaseError>
where
    T: bincode::Encode + bincode::Decode<()> + std::fmt::Debug,
{
    let mut r = Cursor::new(bytes);
    let mut frames = 0;
    loop {
        match proto::read_frame::<T>(&mut r) {
            Ok((msg, n)) => {
                frames += 1;
                prop_assert!(n <= bytes.len());
                let again = frame(&msg);
                let (back, _) = proto::read_frame::<T>(&mut Cursor::new(&again))
                    .map_err(|e| TestCaseError::fail(format!("{msg:?} does not re-decode: {e}")))?;
                prop_assert_eq!(format!("{back:?}"), format!("{msg:?}"));
            }
            Err(e) => {
                prop_assert!(!e.to_string().is_empty());
                if let ProtoError::TooLarge(n) = e {
                    prop_assert!(n > MAX_FRAME as u64);
                }
                prop_assert!(r.position() as usize <= bytes.len());
                return Ok(frames);
            }
        }
    }
}

// ---------------------------------------------------------------- the wire

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn random_bytes_never_make_the_frame_reader_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        small_prefix in any::<bool>(),
    ) {
        let mut bytes = bytes;
        if small_prefix {
            // A plausible length, so that the payload itself is decoded.
            fix_prefix(&mut bytes);
        }
        drain::<Request>(&bytes)?;
        drain::<Response>(&bytes)?;
    }

    #[test]
    fn random_bytes_never_make_the_greeting_reader_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        prefix in prop_oneof![Just(""), Just("hubsync-protocol "), Just("hubsync-protocol 1\n")],
    ) {
        let mut input = prefix.as_bytes().to_vec();
        input.extend_from_slice(&bytes);
        match proto::read_greeting(&mut Cursor::new(&input)) {
            Ok(v) => {
                prop_assert_eq!(v, proto::PROTOCOL_VERSION);
                prop_assert!(input.starts_with(proto::greeting().as_bytes())
                    || input.windows(proto::greeting().len()).any(|w| w == proto::greeting().as_bytes()));
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn mutated_requests_decode_or_fail_cleanly(
        msgs in proptest::collection::vec(arb_request(), 1..4),
        mutations in proptest::collection::vec(arb_mutation(), 1..4),
        fix in any::<bool>(),
    ) {
        // The mutations hit the last frame of a valid stream; the frames before it
        // must still come through intact.
        let mut stream = Vec::new();
        for m in &msgs[..msgs.len() - 1] {
            stream.extend(frame(m));
        }
        let mut last = frame(&msgs[msgs.len() - 1]);
        for m in &mutations {
            mutate(&mut last, if fix { 4 } else { 0 }, m);
        }
        if fix {
            fix_prefix(&mut last);
        }
        stream.extend_from_slice(&last);
        let decoded = drain::<Request>(&stream)?;
        prop_assert!(decoded >= msgs.len() - 1, "a valid frame before the mutated one was lost");
    }

    #[test]
    fn mutated_responses_decode_or_fail_cleanly(
        msgs in proptest::collection::vec(arb_response(), 1..4),
        mutations in proptest::collection::vec(arb_mutation(), 1..4),
        fix in any::<bool>(),
    ) {
        let mut stream = Vec::new();
        for m in &msgs[..msgs.len() - 1] {
            stream.extend(frame(m));
        }
        let mut last = frame(&msgs[msgs.len() - 1]);
        for m in &mutations {
            mutate(&mut last, if fix { 4 } else { 0 }, m);
        }
        if fix {
            fix_prefix(&mut last);
        }
        stream.extend_from_slice(&last);
        let decoded = drain::<Response>(&stream)?;
        prop_assert!(decoded >= msgs.len() - 1, "a valid frame before the mutated one was lost");
    }

    #[test]
    fn valid_messages_round_trip(req in arb_request(), resp in arb_response()) {
        prop_assert_eq!(drain::<Request>(&frame(&req))?, 1);
        prop_assert_eq!(drain::<Response>(&frame(&resp))?, 1);
    }
}

// ---------------------------------------------------------------- state files

const STATE_HEAD: usize = 14 + 1 + 4; // magic, kind, format version

fn arb_pair_record() -> impl Strategy<Value = PairRecord> {
    (
        proptest::option::of(any::<[u8; 16]>()),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        proptest::collection::btree_map(
            arb_relpath().prop_map(|p| p.as_bytes().to_vec()),
            proptest::option::of(arb_version()),
            0..6,
        ),
    )
        .prop_map(|(peer, token, base, files, diff)| {
            let mut diff: Vec<(RelPath, Option<Version>)> = diff
                .into_iter()
                .map(|(p, v)| (RelPath::new(p).unwrap(), v))
                .collect();
            diff.sort_by(|a, b| a.0.cmp(&b.0));
            PairRecord {
                peer_replica: peer.map(ReplicaId),
                token: Token(token),
                base,
                files,
                diff,
            }
        })
}

fn arb_cache() -> impl Strategy<Value = (u64, Vec<CacheEntry>)> {
    (
        any::<u64>(),
        proptest::collection::btree_map(
            arb_relpath().prop_map(|p| p.as_bytes().to_vec()),
            (arb_version(), any::<(u64, u64, i64)>(), any::<bool>()),
            0..6,
        ),
    )
        .prop_map(|(generation, entries)| {
            let mut entries: Vec<CacheEntry> = entries
                .into_iter()
                .map(|(p, (version, (dev, ino, ct), trusted))| CacheEntry {
                    path: RelPath::new(p).unwrap(),
                    version,
                    stat: StatKey {
                        dev,
                        ino,
                        ctime: Mtime::new(ct, 0),
                    },
                    trusted,
                })
                .collect();
            entries.sort_by(|a, b| a.path.cmp(&b.path));
            (generation, entries)
        })
}

/// Recomputes the trailing blake3 checksum over everything before it.
fn fix_checksum(b: &mut [u8]) {
    if b.len() >= 32 {
        let body = b.len() - 32;
        let sum = *blake3::hash(&b[..body]).as_bytes();
        b[body..].copy_from_slice(&sum);
    }
}

/// What every load of a damaged file must satisfy: a result that makes sense, or
/// an error naming the file.
fn check_state_error(e: &StateError, path: &Path) -> Result<(), TestCaseError> {
    let text = e.to_string();
    prop_assert!(
        text.contains(&path.display().to_string()),
        "the error does not name the file: {}",
        text
    );
    prop_assert!(
        !matches!(e, StateError::Missing { .. }),
        "the file is there"
    );
    Ok(())
}

fn load_pair(path: &Path) -> Result<(), TestCaseError> {
    match PairRecord::load(path) {
        Ok(r) => {
            prop_assert!(
                r.diff.windows(2).all(|w| w[0].0 < w[1].0),
                "unsorted diff accepted"
            );
        }
        Err(e) => check_state_error(&e, path)?,
    }
    Ok(())
}

fn load_cache(path: &Path) -> Result<(), TestCaseError> {
    let quick = scan_cache_generation(path);
    match load_scan_cache(path) {
        Ok((generation, entries)) => {
            prop_assert_eq!(quick, Some(generation), "the header read disagrees");
            prop_assert!(
                entries.windows(2).all(|w| w[0].path < w[1].path),
                "unsorted cache accepted"
            );
        }
        Err(e) => check_state_error(&e, path)?,
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn random_state_files_are_refused_with_their_name(
        bytes in proptest::collection::vec(any::<u8>(), 0..400),
        magic in any::<bool>(),
        version in prop_oneof![Just(archive::FORMAT_VERSION), any::<u32>()],
        kind in prop_oneof![Just(1u8), Just(3u8), any::<u8>()],
        checksum in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pairs").join("peer-0123456789abcdef.state");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut b = Vec::new();
        if magic {
            // Past the cheap checks, into the checksum and the decoder.
            b.extend_from_slice(b"hubsync-state\n");
            b.push(kind);
            b.extend_from_slice(&version.to_le_bytes());
        }
        b.extend_from_slice(&bytes);
        b.extend_from_slice(&[0u8; 32]);
        if checksum {
            fix_checksum(&mut b);
        }
        std::fs::write(&path, &b).unwrap();
        load_pair(&path)?;
        load_cache(&path)?;
    }

    #[test]
    fn mutated_pair_records_load_or_fail_naming_the_file(
        rec in arb_pair_record(),
        mutations in proptest::collection::vec(arb_mutation(), 1..4),
        checksum in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub-ab.state");
        rec.save(&path, "peer").unwrap();
        let good = std::fs::read(&path).unwrap();
        prop_assert_eq!(&PairRecord::load(&path).unwrap(), &rec);
        let mut b = good.clone();
        for m in &mutations {
            mutate(&mut b, if checksum { STATE_HEAD } else { 0 }, m);
        }
        if checksum {
            fix_checksum(&mut b);
        }
        std::fs::write(&path, &b).unwrap();
        load_pair(&path)?;
        if !checksum && b != good {
            // Without a fresh checksum, no damage may go unnoticed.
            prop_assert!(PairRecord::load(&path).is_err(), "damage went unnoticed");
        }
    }

    #[test]
    fn mutated_scan_caches_load_or_fail_naming_the_file(
        (generation, entries) in arb_cache(),
        mutations in proptest::collection::vec(arb_mutation(), 1..4),
        checksum in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scan-cache");
        archive::save_scan_cache(&path, dir.path(), generation, &entries).unwrap();
        let good = std::fs::read(&path).unwrap();
        prop_assert_eq!(load_scan_cache(&path).unwrap(), (generation, entries));
        let mut b = good.clone();
        for m in &mutations {
            mutate(&mut b, if checksum { STATE_HEAD } else { 0 }, m);
        }
        if checksum {
            fix_checksum(&mut b);
        }
        std::fs::write(&path, &b).unwrap();
        load_cache(&path)?;
        if !checksum && b != good {
            prop_assert!(load_scan_cache(&path).is_err(), "damage went unnoticed");
        }
    }
}

#[test]
fn every_truncation_zeroing_and_foreign_version_of_a_scan_cache_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scan-cache");
    let entries = vec![CacheEntry {
        path: RelPath::new("a/b").unwrap(),
        version: Version {
            kind: Kind::File {
                size: 3,
                hash: Hash([7; 32]),
            },
            mode: 0o644,
            mtime: Mtime::new(1, 2),
            uid: 0,
            gid: 0,
        },
        stat: StatKey {
            dev: 1,
            ino: 2,
            ctime: Mtime::new(3, 4),
        },
        trusted: true,
    }];
    archive::save_scan_cache(&path, dir.path(), 42, &entries).unwrap();
    let good = std::fs::read(&path).unwrap();
    let named = |e: StateError| {
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        e
    };
    for len in 0..good.len() {
        std::fs::write(&path, &good[..len]).unwrap();
        named(load_scan_cache(&path).unwrap_err());
    }
    std::fs::write(&path, vec![0u8; good.len()]).unwrap();
    assert!(matches!(
        named(load_scan_cache(&path).unwrap_err()),
        StateError::Corrupt { .. }
    ));
    assert_eq!(scan_cache_generation(&path), None);
    let mut foreign = good.clone();
    foreign[15..19].copy_from_slice(&2u32.to_le_bytes());
    std::fs::write(&path, &foreign).unwrap();
    let e = named(load_scan_cache(&path).unwrap_err());
    assert!(matches!(e, StateError::Foreign { found: 2, .. }), "{e}");
    assert!(e.to_string().contains("format 2"), "{e}");
    // A pair record is not a scan cache, even with a valid checksum.
    let rec = dir.path().join("pair.state");
    PairRecord::default().save(&rec, "x").unwrap();
    let e = load_scan_cache(&rec).unwrap_err();
    assert!(e.to_string().contains("kind"), "{e}");
}

// ---------------------------------------------------------------- allocation bound

/// Every position of a valid encoding overwritten with a maximal varint: whichever
/// length prefix it lands on claims 2^64-1 items.
fn huge_claims(valid: &[u8], from: usize) -> impl Iterator<Item = Vec<u8>> + '_ {
    (from..valid.len()).flat_map(move |at| {
        [252u8, 253].into_iter().map(move |marker| {
            let mut b = valid.to_vec();
            let mut huge = vec![marker];
            huge.extend_from_slice(if marker == 252 {
                &[0xff; 4]
            } else {
                &[0xff; 8]
            });
            b.splice(at..at + 1, huge);
            b
        })
    })
}

fn sample_request() -> Request {
    Request::Commit {
        changes: vec![
            (
                RelPath::new("dir/file").unwrap(),
                Some(Version {
                    kind: Kind::Symlink {
                        target: b"../x".to_vec(),
                    },
                    mode: 0o777,
                    mtime: Mtime::new(5, 6),
                    uid: 1,
                    gid: 2,
                }),
            ),
            (RelPath::new("gone").unwrap(), None),
        ],
        token: Some(Token(9)),
        reset: true,
    }
}

fn sample_response() -> Response {
    Response::Entries(vec![
        Entry {
            path: RelPath::new("a").unwrap(),
            state: State::Skip("busy".into()),
        },
        Entry {
            path: RelPath::new("a/b").unwrap(),
            state: State::Present(Version {
                kind: Kind::File {
                    size: 10,
                    hash: Hash([1; 32]),
                },
                mode: 0o644,
                mtime: Mtime::new(1, 1),
                uid: 0,
                gid: 0,
            }),
        },
    ])
}

/// The body of the child process of [`no_length_prefix_allocates_beyond_the_bound`].
fn decode_hostile_claims_under_a_capped_address_space() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let dir = tempfile::tempdir().unwrap();
    let pair = dir.path().join("pair.state");
    let cache = dir.path().join("scan-cache");
    // Inputs are made before the cap, so that only decoding runs under it.
    let mut frames: Vec<Vec<u8>> = Vec::new();
    for valid in [frame(&sample_request()), frame(&sample_response())] {
        for mut b in huge_claims(&valid, 4) {
            fix_prefix(&mut b);
            frames.push(b);
        }
        // And the frame's own prefix at its maximum, with little behind it.
        let mut b = valid.clone();
        b[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        frames.push(b);
    }
    let rec = PairRecord {
        peer_replica: Some(ReplicaId([3; 16])),
        token: Token(1),
        base: 2,
        files: 3,
        diff: match sample_request() {
            Request::Commit { changes, .. } => changes,
            _ => unreachable!(),
        },
    };
    rec.save(&pair, "a label").unwrap();
    let valid_pair = std::fs::read(&pair).unwrap();
    let pairs: Vec<Vec<u8>> = huge_claims(&valid_pair, STATE_HEAD)
        .map(|mut b| {
            fix_checksum(&mut b);
            b
        })
        .collect();

    // The decoders may use MAX_FRAME (8 MiB) per frame and 16 MiB per state-file
    // item; allow that and the test harness's own needs, and nothing like the
    // gigabytes the prefixes claim.
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let vm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmSize");
    let cap = vm_kib * 1024 + (192 << 20);
    let old = getrlimit(Resource::As);
    setrlimit(
        Resource::As,
        Rlimit {
            current: Some(cap),
            maximum: old.maximum,
        },
    )
    .unwrap();
    // The cap is real: a quarter of a gigabyte more is refused.
    assert!(
        Vec::<u8>::new().try_reserve_exact(256 << 20).is_err(),
        "the address-space cap does not hold"
    );
    let mut errors = 0;
    for f in &frames {
        errors += proto::read_frame::<Request>(&mut Cursor::new(f)).is_err() as usize;
        errors += proto::read_frame::<Response>(&mut Cursor::new(f)).is_err() as usize;
    }
    for b in &pairs {
        std::fs::write(&pair, b).unwrap();
        errors += PairRecord::load(&pair).is_err() as usize;
        std::fs::write(&cache, b).unwrap();
        errors += load_scan_cache(&cache).is_err() as usize;
    }
    // Had an allocation followed a claim, the process would have aborted above.
    println!(
        "decoded {} hostile inputs under a {} MiB cap: {errors} errors",
        2 * (frames.len() + pairs.len()),
        cap >> 20
    );
    assert!(errors > 0, "no hostile claim was refused");
}

#[test]
fn no_length_prefix_allocates_beyond_the_bound() {
    if std::env::var_os("HUBSYNC_FUZZ_CHILD").is_some() {
        return decode_hostile_claims_under_a_capped_address_space();
    }
    // In a child process: the address-space cap would starve the other tests.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "no_length_prefix_allocates_beyond_the_bound",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("HUBSYNC_FUZZ_CHILD", "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "the child failed: {:?}\n{text}",
        out.status
    );
    assert!(text.contains("hostile inputs under a"), "{text}");
}
