//! Path patterns with one named part, like `meta/{id}.changes`: they tie files that
//! belong together (a page, its changelog, its metadata) by what they share.
//!
//! A pattern is literal text around exactly one `{id}`, which matches one or more
//! bytes, `/` included (DokuWiki namespaces become directories). Filling a pattern
//! gives a [`RelPath`], so nothing built from a matched name can leave the root.

use crate::relpath::RelPath;

/// A pattern such as `pages/{id}.txt`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdPattern {
    prefix: Vec<u8>,
    suffix: Vec<u8>,
    text: String,
}

const PART: &str = "{id}";

impl IdPattern {
    pub fn parse(text: &str) -> Result<IdPattern, String> {
        let Some(at) = text.find(PART) else {
            return Err(format!("pattern {text:?} has no {PART}"));
        };
        let (prefix, rest) = text.split_at(at);
        let suffix = &rest[PART.len()..];
        if suffix.contains(PART) {
            return Err(format!("pattern {text:?} has {PART} more than once"));
        }
        if text.contains(['*', '?', '[']) {
            return Err(format!(
                "pattern {text:?}: only {PART} is special here, not glob characters"
            ));
        }
        // A sample filling must be a valid relative path.
        let p = IdPattern {
            prefix: prefix.as_bytes().to_vec(),
            suffix: suffix.as_bytes().to_vec(),
            text: text.to_string(),
        };
        if p.fill(b"x").is_none() {
            return Err(format!(
                "pattern {text:?} is not a relative path inside the root"
            ));
        }
        Ok(p)
    }

    /// The `{id}` of `path`, if it matches.
    pub fn capture<'p>(&self, path: &'p RelPath) -> Option<&'p [u8]> {
        let b = path.as_bytes();
        let id = b
            .strip_prefix(self.prefix.as_slice())?
            .strip_suffix(self.suffix.as_slice())?;
        (!id.is_empty()).then_some(id)
    }

    /// The path for `id`, if that is a valid path.
    pub fn fill(&self, id: &[u8]) -> Option<RelPath> {
        let mut b = Vec::with_capacity(self.prefix.len() + id.len() + self.suffix.len());
        b.extend_from_slice(&self.prefix);
        b.extend_from_slice(id);
        b.extend_from_slice(&self.suffix);
        RelPath::new(b).ok()
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rp(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn captures_and_fills() {
        let p = IdPattern::parse("meta/{id}.changes").unwrap();
        assert_eq!(
            p.capture(&rp("meta/wiki/start.changes")),
            Some(&b"wiki/start"[..])
        );
        assert_eq!(p.capture(&rp("meta/start.meta")), None);
        assert_eq!(p.capture(&rp("pages/start.changes")), None);
        // `{id}` is never empty.
        assert_eq!(p.capture(&rp("meta/.changes")), None);
        let pages = IdPattern::parse("pages/{id}.txt").unwrap();
        assert_eq!(
            pages.fill(b"wiki/start").unwrap(),
            rp("pages/wiki/start.txt")
        );
        let media = IdPattern::parse("media/{id}").unwrap();
        assert_eq!(media.capture(&rp("media/a/b.png")), Some(&b"a/b.png"[..]));
    }

    #[test]
    fn fills_that_would_escape_are_refused() {
        let p = IdPattern::parse("pages/{id}.txt").unwrap();
        assert_eq!(p.fill(b"../../etc/passwd"), None);
        assert_eq!(p.fill(b"a//b"), None);
        let bare = IdPattern::parse("{id}").unwrap();
        assert_eq!(bare.fill(b"/etc/passwd"), None);
    }

    #[test]
    fn bad_patterns_are_refused_with_a_reason() {
        for (text, why) in [
            ("pages/x.txt", "no {id}"),
            ("{id}/{id}", "more than once"),
            ("pages/*/{id}", "glob"),
            ("/abs/{id}", "relative path"),
            ("../{id}", "relative path"),
        ] {
            let e = IdPattern::parse(text).unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
    }
}
