//! Merging versions instead of picking one: for append-only line logs (DokuWiki's
//! `*.changes`), the union of the lines of every changed version, so that two
//! servers' appends within one interval both survive. Pure: bytes in, bytes out.

use serde::Deserialize;

/// How to merge files matching `glob`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeRule {
    pub glob: String,
    /// Only `line-union` for now.
    #[serde(default = "line_union")]
    pub method: String,
    /// Order lines by their leading number (a timestamp), keeping the order of
    /// lines with equal numbers (a stable sort).
    #[serde(default)]
    pub sort_by_leading_number: bool,
    /// Fields (1-based, split by `separator`) that identify one entry; among lines
    /// of one entry, those whose `prefer_nonempty_field` is empty are dropped when
    /// another has it (DokuWiki: a real user's line beats an "external edit").
    #[serde(default)]
    pub same_entry_fields: Vec<usize>,
    pub prefer_nonempty_field: Option<usize>,
    #[serde(default = "tab")]
    pub separator: String,
}

fn line_union() -> String {
    "line-union".into()
}

fn tab() -> String {
    "\t".into()
}

impl MergeRule {
    /// The DokuWiki changelog rule: `timestamp ip type id user summary extra size`.
    pub fn dokuwiki_changelog(glob: &str) -> MergeRule {
        MergeRule {
            glob: glob.into(),
            method: line_union(),
            sort_by_leading_number: true,
            same_entry_fields: vec![1, 4],
            prefer_nonempty_field: Some(5),
            separator: tab(),
        }
    }

    pub fn check(&self) -> Result<(), String> {
        if self.method != "line-union" {
            return Err(format!(
                "unknown merge method {:?} (there is line-union)",
                self.method
            ));
        }
        if self.separator.is_empty() {
            return Err("the separator may not be empty".into());
        }
        if self.same_entry_fields.contains(&0) || self.prefer_nonempty_field == Some(0) {
            return Err("fields are numbered from 1".into());
        }
        Ok(())
    }
}

fn leading_number(line: &[u8]) -> Option<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&line[..digits]).ok()?.parse().ok()
}

fn field<'a>(line: &'a [u8], sep: &[u8], n: usize) -> &'a [u8] {
    let mut rest = line;
    for _ in 1..n {
        match rest.windows(sep.len()).position(|w| w == sep) {
            Some(i) => rest = &rest[i + sep.len()..],
            None => return &[],
        }
    }
    match rest.windows(sep.len()).position(|w| w == sep) {
        Some(i) => &rest[..i],
        None => rest,
    }
}

/// The union of the lines of `versions`, each line once, in the order the rule
/// asks for. Every input line that is not superseded by the preference rule is in
/// the output; a missing final newline is supplied.
pub fn merge_lines(rule: &MergeRule, versions: &[&[u8]]) -> Vec<u8> {
    let sep = rule.separator.as_bytes();
    let mut lines: Vec<&[u8]> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for v in versions {
        for line in v.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                continue;
            }
            if seen.insert(line) {
                lines.push(line);
            }
        }
    }
    if let Some(pf) = rule.prefer_nonempty_field {
        let key = |l: &[u8]| -> Vec<Vec<u8>> {
            rule.same_entry_fields
                .iter()
                .map(|&f| field(l, sep, f).to_vec())
                .collect()
        };
        let with_value: std::collections::HashSet<Vec<Vec<u8>>> = lines
            .iter()
            .filter(|l| !field(l, sep, pf).is_empty())
            .map(|l| key(l))
            .collect();
        lines.retain(|l| !field(l, sep, pf).is_empty() || !with_value.contains(&key(l)));
    }
    if rule.sort_by_leading_number {
        // Lines without a number keep their place at the front (none is dropped).
        lines.sort_by_key(|l| leading_number(l).map_or((0, 0), |n| (1, n)));
    }
    let mut out = Vec::with_capacity(versions.iter().map(|v| v.len()).max().unwrap_or(0) + 64);
    for l in lines {
        out.extend_from_slice(l);
        out.push(b'\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> MergeRule {
        MergeRule::dokuwiki_changelog("**/*.changes")
    }

    fn m(versions: &[&str]) -> String {
        let v: Vec<&[u8]> = versions.iter().map(|s| s.as_bytes()).collect();
        String::from_utf8(merge_lines(&rule(), &v)).unwrap()
    }

    const BASE: &str = "100\t1.2.3.4\tC\twiki:a\talice\tcreated\t\t10\n";

    #[test]
    fn appends_on_both_sides_are_both_kept_in_time_order() {
        let a = format!("{BASE}300\t1.2.3.4\tE\twiki:a\talice\tfrom A\t\t5\n");
        let b = format!("{BASE}200\t5.6.7.8\tE\twiki:a\tbob\tfrom B\t\t7\n");
        assert_eq!(
            m(&[&a, &b]),
            format!(
                "{BASE}200\t5.6.7.8\tE\twiki:a\tbob\tfrom B\t\t7\n300\t1.2.3.4\tE\twiki:a\talice\tfrom A\t\t5\n"
            )
        );
        assert_eq!(
            m(&[&a, &b]),
            m(&[&b, &a]),
            "order of inputs does not matter"
        );
    }

    #[test]
    fn identical_lines_once_and_equal_times_stay_stable() {
        let a = format!("{BASE}200\t1\tE\twiki:x\tu\tone\t\t1\n200\t1\tE\twiki:y\tu\ttwo\t\t1\n");
        let b = format!("{BASE}200\t1\tE\twiki:x\tu\tone\t\t1\n");
        assert_eq!(m(&[&a, &b]), a);
    }

    #[test]
    fn a_real_users_line_beats_an_external_edit_of_the_same_second() {
        let real = format!("{BASE}477\t5.6.7.8\tE\twiki:a\talice\tmy edit\t\t3\n");
        let bogus = format!("{BASE}477\t127.0.0.1\tE\twiki:a\t\texternal edit\t\t0\n");
        assert_eq!(m(&[&real, &bogus]), real);
        // An external edit with nothing better at that second stays.
        let other = format!("{BASE}478\t127.0.0.1\tE\twiki:a\t\texternal edit\t\t0\n");
        assert_eq!(m(&[&other]), other);
    }

    #[test]
    fn nothing_is_lost_and_a_final_newline_is_added() {
        let a = "garbage without number\n100\tx\n";
        let b = "50\ty";
        assert_eq!(m(&[a, b]), "garbage without number\n50\ty\n100\tx\n");
    }

    #[test]
    fn rules_are_checked() {
        let mut r = rule();
        assert!(r.check().is_ok());
        r.method = "magic".into();
        assert!(r.check().is_err());
    }
}
