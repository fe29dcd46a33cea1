//! Where documents and their metadata live in the etcd key space, and how
//! etags and modification times are encoded.

use std::time::{Duration, SystemTime};

use etcd_client::{Compare, CompareOp, KeyValue};

use crate::error::{Error, Result};
use crate::storage::{EntryKind, FileInfo, parent, validate_path};

/// The first path segment reserved for the backend's own keys.
pub(super) const META_DIR: &str = ".mdcache-meta";

/// Rejects paths inside the reserved metadata directory.
///
/// # Errors
/// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput).
pub(super) fn check_not_reserved(path: &str) -> Result<()> {
    if path.split('/').next() == Some(META_DIR) {
        return Err(Error::invalid_input(format!(
            "the path segment {META_DIR:?} is reserved for the etcd backend's metadata"
        ))
        .with_path(path));
    }
    Ok(())
}

/// Validates a storage path for this backend.
pub(super) fn check_path(path: &str, allow_root: bool) -> Result<()> {
    validate_path(path, allow_root)?;
    check_not_reserved(path)
}

/// The key layout under one prefix.
///
/// A document at `path` is the key `<prefix>/<path>` holding exactly the
/// document's bytes; its modification time is the key
/// `<prefix>/.mdcache-meta/<path>`, written in the same transaction.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    /// `"<prefix>/"`, or empty for no prefix.
    base: String,
}

impl Layout {
    pub(super) fn new(prefix: &str) -> Layout {
        let base = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        };
        Layout { base }
    }

    /// The document key of `path`.
    pub(super) fn doc(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The metadata key of `path`.
    pub(super) fn meta(&self, path: &str) -> String {
        format!("{}{META_DIR}/{path}", self.base)
    }

    /// The key prefix of everything below directory `dir` ("" = the root).
    pub(super) fn under(&self, dir: &str) -> String {
        if dir.is_empty() {
            self.base.clone()
        } else {
            format!("{}{dir}/", self.base)
        }
    }

    /// The key prefix of the metadata of everything below `dir`.
    pub(super) fn meta_under(&self, dir: &str) -> String {
        if dir.is_empty() {
            format!("{}{META_DIR}/", self.base)
        } else {
            format!("{}{META_DIR}/{dir}/", self.base)
        }
    }

    /// The storage path of a document key; `None` for internal (metadata)
    /// keys, foreign keys outside the prefix, and keys that are no valid
    /// path.
    pub(super) fn path_of<'k>(&self, key: &'k [u8]) -> Option<&'k str> {
        let full = std::str::from_utf8(key).ok()?.strip_prefix(&self.base)?;
        (validate_path(full, false).is_ok() && check_not_reserved(full).is_ok()).then_some(full)
    }
}

/// The ancestors of `path`, nearest first (not the root).
pub(super) fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    std::iter::successors(Some(parent(path)), |p| {
        Some(parent(p)).filter(|_| !p.is_empty())
    })
    .filter(|p| !p.is_empty())
}

/// The etag of a revision.
pub(super) fn etag(revision: i64) -> String {
    revision.to_string()
}

/// The revision an etag names, if it is one this backend hands out
/// (a positive integer in canonical decimal form).
pub(super) fn revision(etag: &str) -> Option<i64> {
    etag.parse::<i64>()
        .ok()
        .filter(|r| *r > 0 && r.to_string() == etag)
}

/// Compare that holds when the document's etag is `etag`; never holds for
/// an etag this backend cannot have handed out.
pub(super) fn etag_is(key: &str, etag: &str) -> Compare {
    Compare::mod_revision(key, CompareOp::Equal, revision(etag).unwrap_or(-1))
}

/// Compare that holds when the key exists.
pub(super) fn exists(key: &str) -> Compare {
    Compare::create_revision(key, CompareOp::Greater, 0)
}

/// Compare that holds when the key is absent.
pub(super) fn absent(key: &str) -> Compare {
    Compare::create_revision(key, CompareOp::Equal, 0)
}

/// Encodes the metadata key's value: the modification time in decimal
/// nanoseconds since the Unix epoch, then, after a space, the write token if
/// the write had one.
pub(super) fn encode_meta(mtime: SystemTime, token: Option<&str>) -> String {
    let nanos = mtime
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    match token {
        Some(t) => format!("{nanos} {t}"),
        None => nanos.to_string(),
    }
}

/// The metadata of document `doc` — its text — if it was written together
/// with this version of the document.
fn meta_text<'a>(doc: &KeyValue, meta: Option<&'a KeyValue>) -> Option<&'a str> {
    let meta = meta.filter(|m| m.mod_revision() == doc.mod_revision())?;
    std::str::from_utf8(meta.value()).ok()
}

/// The modification time of document `doc` from its metadata key.
pub(super) fn mtime_of(doc: &KeyValue, meta: Option<&KeyValue>) -> Option<SystemTime> {
    let nanos: u64 = meta_text(doc, meta)?.split(' ').next()?.parse().ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_nanos(nanos))
}

/// The write token of document `doc`'s version, from its metadata key.
pub(super) fn token_of(doc: &KeyValue, meta: Option<&KeyValue>) -> Option<String> {
    Some(meta_text(doc, meta)?.split_once(' ')?.1.to_owned())
}

/// The [`FileInfo`] of a document.
pub(super) fn file_info(path: String, doc: &KeyValue, meta: Option<&KeyValue>) -> FileInfo {
    FileInfo {
        path,
        kind: EntryKind::File,
        size: doc.value().len() as u64,
        mtime: mtime_of(doc, meta),
        etag: Some(etag(doc.mod_revision())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn keys() {
        let l = Layout::new("app");
        assert_eq!(l.doc("a/b.json"), "app/a/b.json");
        assert_eq!(l.meta("a/b.json"), "app/.mdcache-meta/a/b.json");
        assert_eq!(l.under(""), "app/");
        assert_eq!(l.under("a"), "app/a/");
        assert_eq!(l.meta_under(""), "app/.mdcache-meta/");
        assert_eq!(l.meta_under("a"), "app/.mdcache-meta/a/");
        let root = Layout::new("");
        assert_eq!(root.doc("x"), "x");
        assert_eq!(root.meta("x"), ".mdcache-meta/x");
        assert_eq!(root.under(""), "");

        assert_eq!(l.path_of(b"app/a/b.json"), Some("a/b.json"));
        assert_eq!(l.path_of(b"app/.mdcache-meta/a/b.json"), None);
        assert_eq!(l.path_of(b"other/a.json"), None);
        assert_eq!(l.path_of(b"app/"), None);
        assert_eq!(root.path_of(b".mdcache-meta/x"), None);
        assert_eq!(root.path_of(b"x"), Some("x"));
    }

    #[test]
    fn ancestors_nearest_first() {
        assert_eq!(ancestors("a/b/c").collect::<Vec<_>>(), ["a/b", "a"]);
        assert_eq!(ancestors("a").count(), 0);
    }

    #[test]
    fn etags() {
        assert_eq!(revision(&etag(42)), Some(42));
        for bad in ["", "0", "-3", "007", "+7", "x", "m1"] {
            assert_eq!(revision(bad), None, "{bad}");
        }
    }

    #[test]
    fn reserved_segment() {
        assert!(check_path(".mdcache-meta", false).is_err());
        assert!(check_path(".mdcache-meta/x", false).is_err());
        assert!(check_path("a/.mdcache-meta", false).is_ok());
        assert!(check_path("", true).is_ok());
    }
}
