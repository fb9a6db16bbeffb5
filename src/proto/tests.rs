use super::*;
use crate::relpath::RelPath;
use std::io::Cursor;

#[test]
fn frames_round_trip() {
    let msgs = vec![
        Request::Scan { full: true },
        Request::Read {
            id: 7,
            path: RelPath::new("a/b").unwrap(),
            offset: 1 << 40,
            len: 99,
        },
        Request::Data {
            id: 3,
            bytes: vec![1, 2, 3],
        },
        Request::Close,
    ];
    let mut buf = Vec::new();
    for m in &msgs {
        write_frame(&mut buf, m).unwrap();
    }
    let mut r = Cursor::new(buf);
    for m in &msgs {
        let (got, _): (Request, usize) = read_frame(&mut r).unwrap();
        assert_eq!(format!("{got:?}"), format!("{m:?}"));
    }
    assert!(matches!(
        read_frame::<Request>(&mut r),
        Err(ProtoError::Disconnected)
    ));
}

#[test]
fn huge_length_prefix_is_refused_without_allocating() {
    let mut bytes = u32::MAX.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[0; 16]);
    let err = read_frame::<Request>(&mut Cursor::new(bytes)).unwrap_err();
    assert!(matches!(err, ProtoError::TooLarge(_)), "{err}");
}

#[test]
fn hostile_inner_length_is_an_error() {
    // A Data frame whose byte vector claims 4 GiB inside a small frame.
    let mut payload = vec![4u8, 0]; // variant Data, id 0
    payload.push(252); // bincode varint marker for u32
    payload.extend_from_slice(&u32::MAX.to_le_bytes());
    let mut bytes = (payload.len() as u32).to_le_bytes().to_vec();
    bytes.extend_from_slice(&payload);
    let err = read_frame::<Request>(&mut Cursor::new(bytes)).unwrap_err();
    assert!(matches!(err, ProtoError::Decode(_)), "{err}");
}

#[test]
fn truncated_frames_are_disconnects() {
    let mut buf = Vec::new();
    write_frame(
        &mut buf,
        &Request::Data {
            id: 1,
            bytes: vec![7; 100],
        },
    )
    .unwrap();
    for cut in 1..buf.len() {
        let r = read_frame::<Request>(&mut Cursor::new(&buf[..cut]));
        assert!(matches!(r, Err(ProtoError::Disconnected)), "cut {cut}");
    }
}

#[test]
fn escaping_paths_do_not_decode() {
    let mut buf = Vec::new();
    write_frame(
        &mut buf,
        &Request::Read {
            id: 1,
            path: RelPath::new("ok").unwrap(),
            offset: 0,
            len: 1,
        },
    )
    .unwrap();
    // Replace "ok" by ".." in place.
    let pos = buf.windows(2).position(|w| w == b"ok").unwrap();
    buf[pos..pos + 2].copy_from_slice(b"..");
    let err = read_frame::<Request>(&mut Cursor::new(buf)).unwrap_err();
    assert!(err.to_string().contains("invalid path"), "{err}");
}

#[test]
fn greeting_ok() {
    let mut r = Cursor::new(format!("{}rest", greeting()).into_bytes());
    assert_eq!(read_greeting(&mut r).unwrap(), PROTOCOL_VERSION);
    let mut rest = String::new();
    r.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "rest");
}

#[test]
fn greeting_version_mismatch_names_both() {
    let mut r = Cursor::new(b"hubsync-protocol 99\n".to_vec());
    let err = read_greeting(&mut r).unwrap_err();
    assert!(matches!(err, ProtoError::Version { theirs: 99, .. }));
    let text = err.to_string();
    assert!(text.contains("99") && text.contains(&PROTOCOL_VERSION.to_string()));
}

#[test]
fn junk_before_greeting_is_shown() {
    let mut r = Cursor::new(format!("Welcome to web2!\n{}", greeting()).into_bytes());
    let err = read_greeting(&mut r).unwrap_err();
    assert!(err.to_string().contains("Welcome to web2!"), "{err}");
    let mut r = Cursor::new(b"bash: hubsync: command not found\n".to_vec());
    let err = read_greeting(&mut r).unwrap_err();
    assert!(err.to_string().contains("command not found"), "{err}");
    let mut r = Cursor::new(Vec::new());
    assert!(matches!(
        read_greeting(&mut r),
        Err(ProtoError::Disconnected)
    ));
}

#[test]
fn endless_junk_is_bounded() {
    let mut r = Cursor::new(vec![b'x'; 10 << 20]);
    let err = read_greeting(&mut r).unwrap_err();
    assert!(matches!(err, ProtoError::Junk { .. }));
    assert!(r.position() < 1 << 20);
}
