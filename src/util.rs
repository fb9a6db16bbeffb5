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

/// Opens a state file for reading, never through a symlink and never blocking on
/// a fifo: a link or a special file planted in a state directory is an error
/// saying what it is, not a way to make a run read elsewhere (or hang).
pub fn open_state_file(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    Ok(f)
}

/// Reads a state file whole (see [`open_state_file`]).
pub fn read_state_file(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    open_state_file(path)?.read_to_end(&mut bytes)?;
    Ok(bytes)
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

/// Where `HUBSYNC_TRACE` asks for a trace of what a run does, with timings (a
/// debugging aid, not a stable format): an absolute path appends to that file
/// (the way to trace a `serve`, whose stderr the hub keeps), anything else means
/// stderr.
fn trace_sink() -> Option<&'static std::sync::Mutex<Box<dyn Write + Send>>> {
    static SINK: std::sync::OnceLock<Option<std::sync::Mutex<Box<dyn Write + Send>>>> =
        std::sync::OnceLock::new();
    SINK.get_or_init(|| {
        let v = std::env::var_os("HUBSYNC_TRACE")?;
        let w: Box<dyn Write + Send> = if Path::new(&v).is_absolute() {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&v);
            Box::new(f.ok()?)
        } else {
            Box::new(std::io::stderr())
        };
        Some(std::sync::Mutex::new(w))
    })
    .as_ref()
}

pub fn tracing() -> bool {
    trace_sink().is_some()
}

/// Writes one trace line (see [`trace!`]).
pub fn trace_line(args: std::fmt::Arguments) {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let ms = START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis();
    if let Some(sink) = trace_sink() {
        // One write per line: several processes may append to one file.
        let line = format!("[{} {ms:>5} ms] {args}\n", std::process::id());
        let mut w = sink.lock().unwrap_or_else(|p| p.into_inner());
        let _ = w.write_all(line.as_bytes());
    }
}

/// This process's peak resident memory so far, in bytes (Linux; `None` elsewhere).
pub fn peak_rss() -> Option<u64> {
    proc_status_bytes("VmHWM:")
}

/// Resident memory now and at its peak, for traces.
pub fn memory() -> String {
    let mb = |v: Option<u64>| v.map_or("?".into(), |b| format!("{:.1} MB", b as f64 / 1e6));
    format!(
        "memory {} (peak {})",
        mb(proc_status_bytes("VmRSS:")),
        mb(peak_rss())
    )
}

fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Prints a trace line when `HUBSYNC_TRACE` is set.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)*) => {
        if $crate::util::tracing() {
            $crate::util::trace_line(format_args!($($arg)*));
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
