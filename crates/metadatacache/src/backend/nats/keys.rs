//! Where documents live in the bucket: storage paths as KV keys and NATS
//! subjects, and back.
//!
//! A KV key may hold only `A-Z a-z 0-9 - _ = / .`, and `.` separates its
//! tokens (no empty tokens, no `*` or `>`). A storage path is encoded one
//! segment per token, segments joined by `.`: the bytes `A-Z a-z 0-9 - _`
//! stay as they are, every other byte of the segment's UTF-8 becomes `=XX`
//! (two upper-case hex digits). `users/a.b json` is the key
//! `users.a=2Eb=20json`.
//!
//! The escape is reversible and only one spelling decodes (upper-case hex,
//! no escaped plain byte), so distinct paths never share a key, and the
//! keys below directory `d` are exactly the subjects `<key of d>.>`: a
//! subject filter lists a directory.
//!
//! Directory marks: before a document is first written, every directory
//! above it gets a mark, the key `<key of the directory>.=` (an empty
//! value), so "does anything lie below `d`" is one read of `d`'s mark
//! instead of a scan of the bucket. A mark stays when its directory empties;
//! finding one only sends the check to the scan. `=` alone decodes to no
//! path, so marks are never listed or reported as documents. The key
//! `=dirs` at the bucket's top says every document of the bucket was
//! written with its marks: set on a bucket found empty, so buckets filled
//! before marks existed, or by other tools, keep the scan.

use crate::error::{Error, Result};
use crate::storage::validate_path;

/// `=XX` is the byte 0xXX.
const ESCAPE: char = '=';

/// The longest subject this backend sends. NATS servers refuse protocol
/// lines longer than 4096 bytes by default (`max_control_line`); a direct
/// get puts the subject into a longer request subject.
pub(super) const MAX_SUBJECT_LEN: usize = 3800;

/// Bytes that stand for themselves in a key token.
fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// Appends the token of one path segment to `out`.
fn encode_segment(segment: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in segment.as_bytes() {
        if is_plain(b) {
            out.push(char::from(b));
        } else {
            out.push(ESCAPE);
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
}

/// The value of an upper-case hex digit.
fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The path segment a key token encodes; `None` unless the token is
/// exactly what [`encode_segment`] makes of some segment.
fn decode_token(token: &str) -> Option<String> {
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if is_plain(b) {
            out.push(b);
            i += 1;
        } else if char::from(b) == ESCAPE {
            let hi = hex_value(*bytes.get(i + 1)?)?;
            let lo = hex_value(*bytes.get(i + 2)?)?;
            let byte = hi << 4 | lo;
            if is_plain(byte) {
                return None;
            }
            out.push(byte);
            i += 3;
        } else {
            return None;
        }
    }
    if out.is_empty() {
        return None;
    }
    String::from_utf8(out).ok()
}

/// The KV key of a (valid, non-empty) storage path.
pub(super) fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len() + 8);
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            out.push('.');
        }
        encode_segment(segment, &mut out);
    }
    out
}

/// The storage path a KV key encodes; `None` for keys this encoding never
/// makes (written by another tool), and for keys of invalid paths.
pub(super) fn decode_key(key: &str) -> Option<String> {
    let mut path = String::with_capacity(key.len());
    for (i, token) in key.split('.').enumerate() {
        if i > 0 {
            path.push('/');
        }
        path.push_str(&decode_token(token)?);
    }
    validate_path(&path, false).ok()?;
    Some(path)
}

/// The subjects of one storage: a bucket, and an optional key prefix in it.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    /// `$KV.<bucket>.` followed by the prefix's key and a `.`, if any.
    base: String,
}

impl Layout {
    /// The layout of storage path `prefix` (`""` for none) in `bucket`.
    pub(super) fn new(bucket: &str, prefix: &str) -> Layout {
        let mut base = format!("$KV.{bucket}.");
        if !prefix.is_empty() {
            base.push_str(&encode_path(prefix));
            base.push('.');
        }
        Layout { base }
    }

    /// The subject of the document at `path`.
    pub(super) fn subject(&self, path: &str) -> String {
        let mut s = self.base.clone();
        encode_segments_into(path, &mut s);
        s
    }

    /// The subject filter of everything strictly below directory `dir`
    /// (`""`: the whole storage).
    pub(super) fn below(&self, dir: &str) -> String {
        let mut s = self.base.clone();
        if !dir.is_empty() {
            encode_segments_into(dir, &mut s);
            s.push('.');
        }
        s.push('>');
        s
    }

    /// The mark of directory `dir` (a non-empty path).
    pub(super) fn mark(&self, dir: &str) -> String {
        let mut s = self.subject(dir);
        s.push_str(".=");
        s
    }

    /// The marks of every directory above the document at `path`, the
    /// directories of the storage's own prefix included, outermost first.
    pub(super) fn marks_above(&self, path: &str) -> Vec<String> {
        let subject = self.subject(path);
        // `$KV.<bucket>.` is not a directory: start after its two dots.
        let tokens_from = subject.match_indices('.').nth(1).map_or(0, |(i, _)| i + 1);
        subject[tokens_from..]
            .match_indices('.')
            .map(|(i, _)| {
                let mut mark = subject[..tokens_from + i].to_owned();
                mark.push_str(".=");
                mark
            })
            .collect()
    }

    /// The storage path of a subject of this storage; `None` for subjects
    /// outside it and for keys this encoding never makes.
    pub(super) fn path_of(&self, subject: &str) -> Option<String> {
        decode_key(subject.strip_prefix(&self.base)?)
    }

    /// Refuses a path whose subject would be too long to send.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput).
    pub(super) fn check_len(&self, path: &str) -> Result<()> {
        // Encoding at most triples a segment's length.
        if self.base.len() + 3 * path.len() <= MAX_SUBJECT_LEN
            || self.subject(path).len() <= MAX_SUBJECT_LEN
        {
            return Ok(());
        }
        Err(Error::invalid_input(format!(
            "path too long for a NATS subject once encoded (more than {MAX_SUBJECT_LEN} bytes)"
        ))
        .with_path(path))
    }
}

/// The key that says the bucket's documents all have their directory
/// marks.
pub(super) fn marked_flag(bucket: &str) -> String {
    format!("$KV.{bucket}.=dirs")
}

fn encode_segments_into(path: &str, out: &mut String) {
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            out.push('.');
        }
        encode_segment(segment, out);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;

    /// What a KV key may be (async-nats checks the same before sending).
    fn is_valid_key(key: &str) -> bool {
        !key.is_empty()
            && key.split('.').all(|t| !t.is_empty())
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b))
    }

    #[test]
    fn marks() {
        let l = Layout::new("b", "app/v1");
        assert_eq!(l.mark("d/e"), "$KV.b.app.v1.d.e.=");
        assert_eq!(
            l.marks_above("d/e/f.json"),
            [
                "$KV.b.app.=",
                "$KV.b.app.v1.=",
                "$KV.b.app.v1.d.=",
                "$KV.b.app.v1.d.e.="
            ]
        );
        let root = Layout::new("b", "");
        assert!(root.marks_above("top").is_empty());
        assert_eq!(root.marks_above("a/x"), ["$KV.b.a.="]);
        for mark in l.marks_above("d/e/f").iter().chain([&marked_flag("b")]) {
            assert_eq!(root.path_of(mark), None, "{mark}");
            assert!(is_valid_key(mark.strip_prefix("$KV.b.").unwrap()), "{mark}");
        }
    }

    #[test]
    fn examples() {
        assert_eq!(encode_path("users/alice.json"), "users.alice=2Ejson");
        assert_eq!(encode_path("a b/=x*>"), "a=20b.=3Dx=2A=3E");
        assert_eq!(encode_path("ä"), "=C3=A4");
        assert_eq!(encode_path("-_/Az09"), "-_.Az09");
        assert_eq!(
            decode_key("users.alice=2Ejson").unwrap(),
            "users/alice.json"
        );
        let l = Layout::new("b", "app/v1");
        assert_eq!(l.subject("x.json"), "$KV.b.app.v1.x=2Ejson");
        assert_eq!(l.below(""), "$KV.b.app.v1.>");
        assert_eq!(l.below("d/e"), "$KV.b.app.v1.d.e.>");
        assert_eq!(l.path_of("$KV.b.app.v1.d.x=2Ejson").unwrap(), "d/x.json");
        assert_eq!(l.path_of("$KV.b.other.x"), None);
        let root = Layout::new("b", "");
        assert_eq!(root.below(""), "$KV.b.>");
        assert_eq!(root.path_of("$KV.b.app.v1.x").unwrap(), "app/v1/x");
    }

    #[test]
    fn foreign_keys_do_not_decode() {
        // Lower-case hex, an escaped plain byte, a bad escape, a byte the
        // encoding never leaves alone, invalid UTF-8, a `..` segment.
        for key in [
            "a=2ejson", "=61", "a=", "a=4", "a=G0", "a/b", "a=FF", "=2E=2E", "a..b", ".a", "",
        ] {
            assert_eq!(decode_key(key), None, "{key}");
        }
    }

    #[test]
    fn long_paths() {
        let l = Layout::new("bucket", "");
        let plain = "a".repeat(200);
        assert!(l.check_len(&plain).is_ok());
        let worst = vec!["é".repeat(127); 4].join("/");
        assert!(worst.len() <= crate::MAX_PATH_LEN);
        assert!(
            l.check_len(&worst).is_ok(),
            "every valid path fits at the root"
        );
        let deep = Layout::new("bucket", &"ü".repeat(127));
        assert!(deep.check_len(&worst).is_err());
    }

    /// Segments of any printable characters, with the ones that matter to
    /// NATS (`.`, `*`, `>`, `=`, spaces) and to the escape over-represented.
    fn segment() -> impl Strategy<Value = String> {
        let special = prop::sample::select(vec![
            '.', '*', '>', '=', ' ', '/', '_', '-', '%', '$', '~', 'é', '日', '🦀', '\u{202e}',
            '\u{feff}', '\u{2028}', '\u{301}', 'A', 'z', '0',
        ]);
        let any = any::<char>().prop_filter("no control characters, no separators", |c| {
            !c.is_control() && *c != '/' && *c != '\\'
        });
        prop::collection::vec(prop_oneof![special, any], 1..12)
            .prop_map(|cs| cs.into_iter().filter(|c| *c != '/').collect::<String>())
            .prop_filter("a valid segment", |s| {
                !s.is_empty() && s != "." && s != ".." && s.len() <= 255
            })
    }

    /// Short paths over the few characters an escape could confuse.
    fn near_miss_path() -> impl Strategy<Value = String> {
        let segment = "[._=2E3Da -]{1,3}".prop_filter("a valid segment", |s| s != "." && s != "..");
        prop::collection::vec(segment, 1..3).prop_map(|s| s.join("/"))
    }

    fn path() -> impl Strategy<Value = String> {
        prop::collection::vec(segment(), 1..5).prop_map(|segments| segments.join("/"))
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 2000,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn paths_round_trip_through_valid_keys(p in path()) {
            let key = encode_path(&p);
            prop_assert!(is_valid_key(&key), "{key}");
            prop_assert_eq!(decode_key(&key), Some(p.clone()));
            let l = Layout::new("b", "pre/fix");
            prop_assert_eq!(l.path_of(&l.subject(&p)), Some(p));
        }

        /// Many short paths over the few characters an escape could
        /// confuse: no two of them share a key.
        #[test]
        fn distinct_paths_get_distinct_keys(
            paths in prop::collection::vec(near_miss_path(), 1..64),
        ) {
            let mut seen = std::collections::HashMap::new();
            for p in paths {
                if let Some(other) = seen.insert(encode_path(&p), p.clone()) {
                    prop_assert_eq!(other, p);
                }
            }
        }

        #[test]
        fn a_directory_filter_matches_exactly_the_paths_below(
            dir in path(),
            rest in path(),
            inside in any::<bool>(),
        ) {
            let p = if inside { format!("{dir}/{rest}") } else { rest };
            prop_assume!(p.len() <= crate::MAX_PATH_LEN);
            let l = Layout::new("b", "");
            let filter = l.below(&dir);
            let prefix = filter.strip_suffix('>').unwrap();
            let subject = l.subject(&p);
            let below = p.starts_with(&format!("{dir}/"));
            prop_assert_eq!(subject.starts_with(prefix), below, "{} {}", subject, filter);
        }
    }
}
