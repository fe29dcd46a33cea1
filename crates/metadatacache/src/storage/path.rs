//! Storage paths: what is accepted, and how they are taken apart.

use crate::error::{Error, Result};

/// Longest accepted storage path in bytes.
pub const MAX_PATH_LEN: usize = 1024;
/// Longest accepted path segment in bytes.
pub const MAX_SEGMENT_LEN: usize = 255;

/// Checks that `path` is a relative, normalised, slash-separated path.
///
/// Rejected with [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput): absolute paths, `.` and `..`
/// segments, empty segments (`a//b`, a trailing `/`), backslashes, NUL and
/// other control characters, paths longer than [`MAX_PATH_LEN`] and segments
/// longer than [`MAX_SEGMENT_LEN`]. The empty path (the root) is accepted only
/// when `allow_root` is true.
///
/// Every backend calls this before touching anything, so a bad path never
/// creates or reads anything.
///
/// # Errors
/// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) naming the path and what is wrong with it.
pub fn validate_path(path: &str, allow_root: bool) -> Result<()> {
    let bad = |why: &'static str| Err(Error::invalid_input(why).with_path(path));
    if path.is_empty() {
        return if allow_root {
            Ok(())
        } else {
            bad("empty path")
        };
    }
    if path.len() > MAX_PATH_LEN {
        return bad("path longer than 1024 bytes");
    }
    if path.starts_with('/') {
        return bad("absolute path; paths are relative to the storage root");
    }
    // Printable ASCII without backslashes (the usual case) needs no char
    // scan.
    let plain = path
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'\\');
    if !plain && let Some(c) = path.chars().find(|c| c.is_control() || *c == '\\') {
        return if c == '\\' {
            bad("backslash in path")
        } else {
            bad("control character in path")
        };
    }
    for segment in path.split('/') {
        match segment {
            "" => return bad("empty path segment"),
            "." | ".." => return bad("'.' or '..' segment in path"),
            s if s.len() > MAX_SEGMENT_LEN => return bad("path segment longer than 255 bytes"),
            _ => {}
        }
    }
    Ok(())
}

/// The parent directory of `path` ("" for a top-level path).
pub fn parent(path: &str) -> &str {
    path.rfind('/').map_or("", |i| &path[..i])
}

/// Joins a directory and a child name ("" is the root).
pub(crate) fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

/// True when `path` is `dir` or lies below it (`""` is the root, which
/// holds everything): what a change stream subscribed at `dir` reports.
pub(crate) fn is_within(path: &str, dir: &str) -> bool {
    dir.is_empty()
        || path
            .strip_prefix(dir)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn paths() {
        for ok in ["a", "a/b.json", "users/ä ö/x", "a.b/c-d_e"] {
            validate_path(ok, false).unwrap();
        }
        validate_path("", true).unwrap();
        for bad in [
            "",
            "/a",
            "a/../b",
            "..",
            ".",
            "a//b",
            "a/",
            "a\0b",
            "a\\b",
            "a\nb",
            &"x".repeat(256),
            &"a/".repeat(600),
        ] {
            let e = validate_path(bad, false).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad:?}");
            assert_eq!(e.path(), Some(bad));
        }
    }

    #[test]
    fn parent_of() {
        assert_eq!(parent("a"), "");
        assert_eq!(parent("a/b"), "a");
        assert_eq!(parent("a/b/c.json"), "a/b");
    }
}
