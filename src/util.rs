//! Small helpers shared by several modules.

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

/// Fills `buf` from the kernel's random source.
pub fn random_bytes(buf: &mut [u8]) {
    // getrandom(2) cannot fail for small requests once the pool is initialised; if it
    // somehow does, fall back to the clock and pid, which is enough for temp names.
    if rustix::rand::getrandom(&mut *buf, rustix::rand::GetRandomFlags::empty()).is_err() {
        let seed = blake3::hash(
            format!("{:?}{}", std::time::SystemTime::now(), std::process::id()).as_bytes(),
        );
        for (b, s) in buf.iter_mut().zip(seed.as_bytes().iter().cycle()) {
            *b = *s;
        }
    }
}

pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    random_bytes(&mut b);
    u64::from_le_bytes(b)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `path` atomically: a temp file beside it, fsync, rename, fsync of the
/// directory. A reader (or a crash) sees the old file or the new one, never a mix.
pub fn write_atomic(path: &Path, fill: impl FnOnce(&mut File) -> io::Result<()>) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.{:016x}.tmp", random_u64()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        fill(&mut f)?;
        f.flush()?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Bytes for humans: `1.5 MB`.
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0 as f64;
        if self.0 < 1000 {
            write!(f, "{} B", self.0)
        } else if b < 1e6 {
            write!(f, "{:.1} kB", b / 1e3)
        } else if b < 1e9 {
            write!(f, "{:.1} MB", b / 1e6)
        } else {
            write!(f, "{:.2} GB", b / 1e9)
        }
    }
}

/// Shell-quotes one word for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:,@%=".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Whether `HUBSYNC_TRACE` asks for a trace of what a run does, with timings (a
/// debugging aid: it goes to stderr and is not a stable format).
pub fn tracing() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("HUBSYNC_TRACE").is_some())
}

/// Milliseconds since the process started, for traces.
pub fn trace_ms() -> u128 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis()
}

/// Prints a trace line when `HUBSYNC_TRACE` is set.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)*) => {
        if $crate::util::tracing() {
            eprintln!("[{} {:>5} ms] {}", std::process::id(), $crate::util::trace_ms(), format!($($arg)*));
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_display() {
        assert_eq!(Bytes(12).to_string(), "12 B");
        assert_eq!(Bytes(1500).to_string(), "1.5 kB");
        assert_eq!(Bytes(2_500_000).to_string(), "2.5 MB");
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("/var/www"), "/var/www");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's $HOME"), r"'it'\''s $HOME'");
        assert_eq!(shell_quote(""), "''");
    }
}
