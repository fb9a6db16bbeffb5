//! The wire: a greeting line, then length-prefixed bincode frames.
//!
//! This module is the only place that knows the byte format. A session starts with
//! both sides writing the text line `hubsync-protocol N`; the hub reads lines until it
//! finds it, so output that a remote shell prints first (a noisy `.bashrc`) or an error
//! like "command not found" is recognised as such and shown, and a peer of another
//! protocol version is refused before a single frame is exchanged. The greeting's
//! form never changes between versions.
//!
//! After the greeting each message is `u32 little-endian length, bincode payload`. The
//! length is checked against [`MAX_FRAME`] before anything is allocated, and the
//! payload is decoded with the same limit, so hostile input costs at most one frame of
//! memory and yields an error, never a panic.

mod msg;

pub use msg::*;

use std::io::{self, BufRead, Read, Write};

/// The protocol version this build speaks. Bump on any change to the messages.
pub const PROTOCOL_VERSION: u32 = 3;
const GREETING_PREFIX: &str = "hubsync-protocol ";
/// The largest frame either side sends or accepts.
pub const MAX_FRAME: usize = 8 << 20;
/// File data moves in pieces of this size.
pub const CHUNK: usize = 256 << 10;
/// How much unexpected output before the greeting we read (and show) at most.
const MAX_JUNK: usize = 16 << 10;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("the connection closed")]
    Disconnected,
    #[error("it speaks hubsync protocol version {theirs}, this hubsync speaks version {ours}")]
    Version { ours: u32, theirs: u32 },
    #[error("it printed unexpected output instead of the hubsync greeting: {junk:?}")]
    Junk { junk: String },
    #[error("it sent a frame of {0} bytes, more than the limit of {MAX_FRAME}")]
    TooLarge(u64),
    #[error("it sent an undecodable message: {0}")]
    Decode(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl ProtoError {
    fn from_io(e: io::Error) -> ProtoError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ProtoError::Disconnected
        } else {
            ProtoError::Io(e)
        }
    }
}

/// The greeting line of this build.
pub fn greeting() -> String {
    format!("{GREETING_PREFIX}{PROTOCOL_VERSION}\n")
}

/// Reads up to and including the peer's greeting line. Anything before it is an
/// error that carries what was printed; a version other than ours is
/// [`ProtoError::Version`].
pub fn read_greeting(r: &mut impl BufRead) -> Result<u32, ProtoError> {
    let mut junk = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = r
            .by_ref()
            .take((MAX_JUNK - junk.len().min(MAX_JUNK) + 64) as u64)
            .read_until(b'\n', &mut line)
            .map_err(ProtoError::from_io)?;
        if let Some(v) = line.strip_prefix(GREETING_PREFIX.as_bytes()) {
            let theirs = std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.trim_end().parse::<u32>().ok());
            match theirs {
                Some(_) if !junk.is_empty() => break,
                Some(theirs) if theirs == PROTOCOL_VERSION => return Ok(theirs),
                Some(theirs) => {
                    return Err(ProtoError::Version {
                        ours: PROTOCOL_VERSION,
                        theirs,
                    });
                }
                None => {}
            }
        }
        junk.extend_from_slice(&line);
        if n == 0 || junk.len() >= MAX_JUNK || !line.ends_with(b"\n") {
            break;
        }
    }
    if junk.is_empty() {
        return Err(ProtoError::Disconnected);
    }
    let text = String::from_utf8_lossy(&junk);
    Err(ProtoError::Junk {
        junk: text.trim_end().chars().take(400).collect(),
    })
}

/// Encodes one message as a frame.
pub fn encode_frame<T: bincode::Encode>(msg: &T, out: &mut Vec<u8>) -> Result<(), ProtoError> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    bincode::encode_into_std_write(msg, out, config())
        .map_err(|e| ProtoError::Decode(format!("cannot encode: {e}")))?;
    let len = out.len() - start - 4;
    if len > MAX_FRAME {
        return Err(ProtoError::TooLarge(len as u64));
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// Writes one message as a frame; returns the bytes written.
pub fn write_frame<T: bincode::Encode>(w: &mut impl Write, msg: &T) -> Result<usize, ProtoError> {
    let mut buf = Vec::with_capacity(64);
    encode_frame(msg, &mut buf)?;
    w.write_all(&buf)?;
    Ok(buf.len())
}

/// Reads one frame and decodes it. A clean end of stream before the frame is
/// [`ProtoError::Disconnected`]. Returns the message and the bytes read.
pub fn read_frame<T: bincode::Decode<()>>(r: &mut impl Read) -> Result<(T, usize), ProtoError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).map_err(ProtoError::from_io)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(ProtoError::TooLarge(len as u64));
    }
    // Grow with the bytes that actually arrive instead of trusting the prefix.
    let mut payload = Vec::with_capacity(len.min(64 << 10));
    r.take(len as u64)
        .read_to_end(&mut payload)
        .map_err(ProtoError::from_io)?;
    if payload.len() != len {
        return Err(ProtoError::Disconnected);
    }
    let (msg, used) = bincode::decode_from_slice(&payload, config())
        .map_err(|e| ProtoError::Decode(e.to_string()))?;
    if used != len {
        return Err(ProtoError::Decode(format!(
            "{} stray bytes after the message",
            len - used
        )));
    }
    Ok((msg, len + 4))
}

#[cfg(test)]
mod tests;
