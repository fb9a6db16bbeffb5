//! Host-key verification against OpenSSH `known_hosts` files, done by us rather than
//! by libssh2 so that the answers are exact:
//! - hashed entries (`|1|salt|hash`), `[host]:port` entries, patterns with `*`, `?`
//!   and negation, and `@revoked` markers are understood;
//! - a server key of a type that has no entry is "unknown key type" rather than
//!   libssh2's misleading "mismatch" (we also steer negotiation towards the types
//!   that are known, as OpenSSH does);
//! - messages name the file and line, and give the fingerprint as OpenSSH prints it.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use hmac::{Hmac, Mac};

/// One usable line of a known_hosts file.
#[derive(Debug, Clone)]
pub struct Entry {
    pub file: PathBuf,
    pub line: usize,
    hosts: Hosts,
    pub key_type: String,
    pub key: Vec<u8>,
    revoked: bool,
}

#[derive(Debug, Clone)]
enum Hosts {
    Hashed { salt: Vec<u8>, hash: Vec<u8> },
    Patterns(Vec<(bool, globset::GlobMatcher)>),
}

/// The verdict on a server's key.
#[derive(Debug)]
pub enum Verdict {
    Match,
    /// Known hosts has a different key of this type (or only other types) for it.
    Changed {
        entry: Entry,
    },
    /// The key is listed as revoked.
    Revoked {
        entry: Entry,
    },
    Unknown,
}

#[derive(Debug, Default)]
pub struct KnownHosts {
    entries: Vec<Entry>,
}

/// How `known_hosts` names a host: `host` on port 22, `[host]:port` otherwise.
pub fn host_field(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

/// `SHA256:…` as `ssh-keygen -l` prints it.
pub fn fingerprint(sha256: &[u8]) -> String {
    format!("SHA256:{}", STANDARD_NO_PAD.encode(sha256))
}

/// The key type named inside an SSH public-key blob.
pub fn blob_type(blob: &[u8]) -> Option<String> {
    let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    let name = blob.get(4..4 + len)?;
    String::from_utf8(name.to_vec()).ok()
}

/// Host-key algorithms to offer for keys of `key_type`, best first.
pub fn algorithms(key_type: &str) -> &'static str {
    match key_type {
        "ssh-ed25519" => "ssh-ed25519",
        "ecdsa-sha2-nistp256" => "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384" => "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521" => "ecdsa-sha2-nistp521",
        "ssh-rsa" => "rsa-sha2-512,rsa-sha2-256,ssh-rsa",
        _ => "",
    }
}

impl KnownHosts {
    /// Reads every file that exists; unreadable lines are skipped, as OpenSSH does.
    pub fn load(files: &[PathBuf]) -> KnownHosts {
        let mut kh = KnownHosts::default();
        for f in files {
            if let Ok(text) = std::fs::read_to_string(f) {
                for (i, line) in text.lines().enumerate() {
                    if let Some(e) = parse_line(f, i + 1, line) {
                        kh.entries.push(e);
                    }
                }
            }
        }
        kh
    }

    /// Entries that name `host` on `port`.
    pub fn lookup(&self, host: &str, port: u16) -> Vec<&Entry> {
        let name = host_field(host, port);
        self.entries.iter().filter(|e| e.matches(&name)).collect()
    }

    /// The key types known for the host, to steer negotiation (`None`: unknown host).
    pub fn preferred_algorithms(&self, host: &str, port: u16) -> Option<String> {
        let mut algs: Vec<&str> = Vec::new();
        for e in self.lookup(host, port).into_iter().filter(|e| !e.revoked) {
            let a = algorithms(&e.key_type);
            if !a.is_empty() && !algs.contains(&a) {
                algs.push(a);
            }
        }
        (!algs.is_empty()).then(|| algs.join(","))
    }

    pub fn check(&self, host: &str, port: u16, blob: &[u8]) -> Verdict {
        let entries = self.lookup(host, port);
        if let Some(e) = entries.iter().find(|e| e.revoked && e.key == blob) {
            return Verdict::Revoked {
                entry: (*e).clone(),
            };
        }
        let live: Vec<&&Entry> = entries.iter().filter(|e| !e.revoked).collect();
        if live.iter().any(|e| e.key == blob) {
            return Verdict::Match;
        }
        let ty = blob_type(blob).unwrap_or_default();
        match live.iter().find(|e| e.key_type == ty).or(live.first()) {
            Some(e) => Verdict::Changed {
                entry: (**e).clone(),
            },
            None => Verdict::Unknown,
        }
    }
}

impl Entry {
    fn matches(&self, name: &str) -> bool {
        match &self.hosts {
            Hosts::Hashed { salt, hash } => {
                let Ok(mut mac) = Hmac::<sha1::Sha1>::new_from_slice(salt) else {
                    return false;
                };
                mac.update(name.as_bytes());
                mac.verify_slice(hash).is_ok()
            }
            Hosts::Patterns(pats) => {
                let mut hit = false;
                for (negated, m) in pats {
                    if m.is_match(name) {
                        if *negated {
                            return false;
                        }
                        hit = true;
                    }
                }
                hit
            }
        }
    }
}

fn parse_line(file: &Path, line: usize, text: &str) -> Option<Entry> {
    let text = text.trim();
    if text.is_empty() || text.starts_with('#') {
        return None;
    }
    let mut fields = text.split_whitespace();
    let mut first = fields.next()?;
    let mut revoked = false;
    if first.starts_with('@') {
        match first {
            "@revoked" => revoked = true,
            _ => return None, // @cert-authority: certificates are not used here
        }
        first = fields.next()?;
    }
    let key_type = fields.next()?.to_string();
    let key = STANDARD.decode(fields.next()?).ok()?;
    let hosts = if let Some(rest) = first.strip_prefix("|1|") {
        let (salt, hash) = rest.split_once('|')?;
        Hosts::Hashed {
            salt: STANDARD.decode(salt).ok()?,
            hash: STANDARD.decode(hash).ok()?,
        }
    } else {
        let mut pats = Vec::new();
        for p in first.split(',') {
            let (neg, p) = match p.strip_prefix('!') {
                Some(p) => (true, p),
                None => (false, p),
            };
            // OpenSSH patterns know only `*` and `?`; everything else is literal
            // (notably the brackets of `[host]:port`).
            let escaped: String = p
                .chars()
                .map(|c| match c {
                    '[' | ']' | '{' | '}' | '\\' => format!("\\{c}"),
                    c => c.to_string(),
                })
                .collect();
            let glob = globset::GlobBuilder::new(&escaped)
                .backslash_escape(true)
                .literal_separator(false)
                .case_insensitive(true)
                .build()
                .ok()?;
            pats.push((neg, glob.compile_matcher()));
        }
        Hosts::Patterns(pats)
    };
    Some(Entry {
        file: file.to_path_buf(),
        line,
        hosts,
        key_type,
        key,
        revoked,
    })
}

/// Appends the key for `host`:`port` (like OpenSSH's `accept-new`).
pub fn append(file: &Path, host: &str, port: u16, blob: &[u8]) -> io::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let ty = blob_type(blob).unwrap_or_else(|| "ssh-unknown".into());
    let mut f = OpenOptions::new().create(true).append(true).open(file)?;
    writeln!(
        f,
        "{} {ty} {}",
        host_field(host, port),
        STANDARD.encode(blob)
    )?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(ty: &str, payload: &[u8]) -> Vec<u8> {
        let mut b = (ty.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(ty.as_bytes());
        b.extend_from_slice(payload);
        b
    }

    fn kh(text: &str) -> KnownHosts {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("known_hosts");
        std::fs::write(&p, text).unwrap();
        KnownHosts::load(&[p])
    }

    #[test]
    fn plain_port_and_pattern_entries() {
        let ed = blob("ssh-ed25519", b"key-one");
        let line = |h: &str| format!("{h} ssh-ed25519 {}\n", STANDARD.encode(&ed));
        let k = kh(&format!(
            "# comment\n{}{}{}",
            line("web1,web1.example.org"),
            line("[127.0.0.1]:2222"),
            line("*.lan,!bad.lan")
        ));
        assert!(matches!(k.check("web1", 22, &ed), Verdict::Match));
        assert!(matches!(
            k.check("web1.example.org", 22, &ed),
            Verdict::Match
        ));
        assert!(matches!(k.check("127.0.0.1", 2222, &ed), Verdict::Match));
        assert!(matches!(k.check("127.0.0.1", 22, &ed), Verdict::Unknown));
        assert!(matches!(k.check("x.lan", 22, &ed), Verdict::Match));
        assert!(matches!(k.check("bad.lan", 22, &ed), Verdict::Unknown));
        let other = blob("ssh-ed25519", b"key-two");
        match k.check("web1", 22, &other) {
            Verdict::Changed { entry } => assert_eq!(entry.line, 2),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn hashed_entries() {
        // `ssh-keygen -H` style: |1|base64(salt)|base64(hmac-sha1(salt, name))
        let salt = b"0123456789abcdefghij";
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(salt).unwrap();
        mac.update(b"[10.0.0.5]:2200");
        let hash = mac.finalize().into_bytes();
        let ed = blob("ssh-ed25519", b"k");
        let k = kh(&format!(
            "|1|{}|{} ssh-ed25519 {}\n",
            STANDARD.encode(salt),
            STANDARD.encode(hash),
            STANDARD.encode(&ed)
        ));
        assert!(matches!(k.check("10.0.0.5", 2200, &ed), Verdict::Match));
        assert!(matches!(k.check("10.0.0.6", 2200, &ed), Verdict::Unknown));
    }

    #[test]
    fn other_key_types_and_revocation() {
        let ed = blob("ssh-ed25519", b"k");
        let rsa = blob("ssh-rsa", b"r");
        let k = kh(&format!("h ssh-ed25519 {}\n", STANDARD.encode(&ed)));
        assert_eq!(
            k.preferred_algorithms("h", 22).as_deref(),
            Some("ssh-ed25519")
        );
        assert!(matches!(k.check("h", 22, &rsa), Verdict::Changed { .. }));
        let k = kh(&format!(
            "@revoked h ssh-ed25519 {}\n",
            STANDARD.encode(&ed)
        ));
        assert!(matches!(k.check("h", 22, &ed), Verdict::Revoked { .. }));
        assert_eq!(k.preferred_algorithms("h", 22), None);
    }

    #[test]
    fn append_then_match() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/known_hosts");
        let ed = blob("ssh-ed25519", b"new");
        append(&p, "127.0.0.1", 2022, &ed).unwrap();
        let k = KnownHosts::load(&[p]);
        assert!(matches!(k.check("127.0.0.1", 2022, &ed), Verdict::Match));
    }

    #[test]
    fn fingerprints_look_like_openssh() {
        assert_eq!(
            fingerprint(&[0u8; 32]),
            "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
        );
    }
}
