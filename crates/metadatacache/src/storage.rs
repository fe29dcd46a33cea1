//! The backend trait and its request and response types.

use std::fmt;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{Error, ErrorKind, Result};

/// A write of `content` at `path`, with optional preconditions.
///
/// All fields are public so that callers can use struct update syntax:
///
/// ```
/// # use metadatacache::UploadRequest;
/// let req = UploadRequest {
///     if_match: Some("etag-1".into()),
///     ..UploadRequest::new("users/alice.json", "{}")
/// };
/// assert_eq!(req.path, "users/alice.json");
/// ```
///
/// The preconditions are checked by the backend atomically with the write, so
/// they hold against other tasks, processes and machines.
#[derive(Clone, PartialEq, Eq)]
pub struct UploadRequest {
    /// Slash-separated storage path.
    pub path: String,
    /// The bytes to store.
    pub content: Bytes,
    /// Write only if the current etag equals this one; otherwise
    /// [`ErrorKind::PreconditionFailed`] (or [`ErrorKind::NotFound`] when the
    /// path is absent).
    pub if_match: Option<String>,
    /// `["*"]`: create only if absent, otherwise [`ErrorKind::AlreadyExists`].
    /// Any other entry: write only if the current etag is none of them.
    pub if_none_match: Vec<String>,
    /// Write only if the stored document was not modified after this time.
    pub if_unmodified_since: Option<SystemTime>,
    /// The modification time to record; `None` means now. Backends that keep
    /// their own clock may ignore it.
    pub mtime: Option<SystemTime>,
    /// An identifier unique to this write, stored with the version where
    /// the backend can (see [`DownloadResponse::write_token`]). It lets a
    /// writer whose reply was lost find out whether its write landed.
    pub write_token: Option<String>,
}

impl UploadRequest {
    /// An unconditional write of `content` at `path`.
    pub fn new(path: impl Into<String>, content: impl Into<Bytes>) -> Self {
        UploadRequest {
            path: path.into(),
            content: content.into(),
            if_match: None,
            if_none_match: Vec::new(),
            if_unmodified_since: None,
            mtime: None,
            write_token: None,
        }
    }

    /// True when the request asks to create the document only if absent.
    pub fn is_create_only(&self) -> bool {
        self.if_none_match.iter().any(|e| e == "*")
    }
}

// Document content may be secret (passwords, tokens): Debug shows its size only.
impl fmt::Debug for UploadRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UploadRequest")
            .field("path", &self.path)
            .field("content", &format_args!("<{} bytes>", self.content.len()))
            .field("if_match", &self.if_match)
            .field("if_none_match", &self.if_none_match)
            .field("if_unmodified_since", &self.if_unmodified_since)
            .field("mtime", &self.mtime)
            .field("write_token", &self.write_token)
            .finish()
    }
}

/// What a successful upload returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadResponse {
    /// The etag of the version just written.
    pub etag: String,
    /// Its modification time.
    pub mtime: SystemTime,
}

/// A read of `path`, optionally conditional.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadRequest {
    /// Slash-separated storage path.
    pub path: String,
    /// If the current etag is one of these, the backend answers
    /// [`ErrorKind::NotModified`] without sending the content.
    pub if_none_match: Vec<String>,
}

impl DownloadRequest {
    /// An unconditional read of `path`.
    pub fn new(path: impl Into<String>) -> Self {
        DownloadRequest {
            path: path.into(),
            if_none_match: Vec::new(),
        }
    }

    /// A read that answers [`ErrorKind::NotModified`] while the etag is `etag`.
    pub fn if_none_match(path: impl Into<String>, etag: impl Into<String>) -> Self {
        DownloadRequest {
            path: path.into(),
            if_none_match: vec![etag.into()],
        }
    }
}

/// What a successful download returns.
#[derive(Clone, PartialEq, Eq)]
pub struct DownloadResponse {
    /// The stored bytes.
    pub content: Bytes,
    /// The etag of this version.
    pub etag: String,
    /// Its modification time.
    pub mtime: SystemTime,
    /// The [`UploadRequest::write_token`] of the write that made this
    /// version, on backends that store one ([`Capabilities::write_tokens`]);
    /// `None` elsewhere.
    pub write_token: Option<String>,
}

impl fmt::Debug for DownloadResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DownloadResponse")
            .field("content", &format_args!("<{} bytes>", self.content.len()))
            .field("etag", &self.etag)
            .field("mtime", &self.mtime)
            .field("write_token", &self.write_token)
            .finish()
    }
}

/// Whether a path names a document or a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// A document.
    File,
    /// A directory (or, on backends without directories, a common prefix).
    Dir,
}

/// What [`Storage::stat`] and [`Storage::list_dir`] report about a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    /// The full storage path.
    pub path: String,
    /// Document or directory.
    pub kind: EntryKind,
    /// Content length in bytes (0 for directories).
    pub size: u64,
    /// Modification time, where the backend keeps one.
    pub mtime: Option<SystemTime>,
    /// The document's etag; `None` for directories.
    pub etag: Option<String>,
}

impl FileInfo {
    /// A directory (or common prefix) at `path`, without mtime.
    pub fn dir(path: impl Into<String>) -> Self {
        FileInfo {
            path: path.into(),
            kind: EntryKind::Dir,
            size: 0,
            mtime: None,
            etag: None,
        }
    }

    /// True for documents.
    pub fn is_file(&self) -> bool {
        self.kind == EntryKind::File
    }

    /// True for directories.
    pub fn is_dir(&self) -> bool {
        self.kind == EntryKind::Dir
    }
}

/// What a [`Storage`] can do beyond the operations every backend has.
///
/// A store and the conformance suite rely only on what a backend declares
/// here. New fields may be added; build a value from
/// [`Capabilities::default`] (nothing declared) and set what holds:
///
/// ```
/// let mut caps = metadatacache::Capabilities::default();
/// caps.unique_etags = true;
/// assert!(!caps.write_tokens);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Every version gets an etag the path never had before, also after a
    /// delete and a re-create: once the etag moved away from `e`, no write
    /// with `if_match: e` can ever succeed again. Revision numbers (etcd,
    /// NATS) and writer-chosen unique etags (memory, PostgreSQL) have this;
    /// content hashes (disk, S3) do not, since equal content has an equal
    /// etag. With it, a store may resend a write whose reply was lost: of
    /// all copies, at most one can land.
    pub unique_etags: bool,
    /// The backend stores [`UploadRequest::write_token`] with the version
    /// it writes and returns it in [`DownloadResponse::write_token`], so a
    /// writer whose reply was lost can see that its write landed.
    pub write_tokens: bool,
    /// [`Storage::delete_if_match`] is checked by the server atomically
    /// with the delete (never a read followed by an unconditional delete).
    pub conditional_delete: bool,
    /// The backend can report changes to documents as they happen.
    pub notifications: bool,
    /// Directories are stored: [`Storage::make_dir_if_not_exist`] creates
    /// one that exists (and is listed) while empty. Elsewhere a directory
    /// exists only while a document lies below it.
    pub directories: bool,
}

/// A storage of byte documents at slash-separated paths, each with an etag that
/// changes whenever its content changes.
///
/// Implementations must check every precondition of an [`UploadRequest`]
/// atomically with the write, also against other processes and machines
/// sharing the storage. The trait is object safe; stores use it as
/// `Arc<dyn Storage>`.
///
/// Paths are relative, slash-separated and normalised (see [`validate_path`]);
/// the empty path names the root directory.
#[async_trait]
pub trait Storage: Send + Sync + fmt::Debug {
    /// Short backend name: `"memory"`, `"disk"`, `"etcd"`, `"postgres"`, `"s3"`, ….
    fn backend(&self) -> &'static str;

    /// Creates or opens the storage space `name` (a directory, table, key
    /// prefix …). Idempotent.
    async fn init(&self, name: &str) -> Result<()>;

    /// Writes a document; see [`UploadRequest`] for the preconditions.
    ///
    /// # Errors
    /// [`ErrorKind::PreconditionFailed`], [`ErrorKind::NotFound`] or
    /// [`ErrorKind::AlreadyExists`] when a precondition fails (nothing is
    /// written), [`ErrorKind::InvalidInput`] for a bad path,
    /// [`ErrorKind::Unavailable`] when the outcome is unknown.
    async fn upload(&self, req: UploadRequest) -> Result<UploadResponse>;

    /// Reads a document.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] when absent, [`ErrorKind::NotModified`] when the
    /// etag is one of `if_none_match`.
    async fn download(&self, req: DownloadRequest) -> Result<DownloadResponse>;

    /// Deletes a document, only if its etag is `if_match` when that is given.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] when absent, [`ErrorKind::PreconditionFailed`]
    /// when the etag differs.
    async fn delete_if_match(&self, path: &str, if_match: Option<&str>) -> Result<()>;

    /// Deletes a document unconditionally.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] when absent.
    async fn delete(&self, path: &str) -> Result<()> {
        self.delete_if_match(path, None).await
    }

    /// Describes a document or directory.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] when absent.
    async fn stat(&self, path: &str) -> Result<FileInfo>;

    /// The paths of the direct children of directory `path`; a missing
    /// directory is empty. Internal files (temporary or lock files) are never
    /// listed.
    async fn read_dir(&self, path: &str) -> Result<Vec<String>> {
        Ok(self
            .list_dir(path)
            .await?
            .into_iter()
            .map(|info| info.path)
            .collect())
    }

    /// Like [`read_dir`](Storage::read_dir) with a [`FileInfo`] per child,
    /// sorted by path.
    async fn list_dir(&self, path: &str) -> Result<Vec<FileInfo>>;

    /// Creates directory `path` and its parents; a no-op where the backend has
    /// no directories.
    async fn make_dir_if_not_exist(&self, path: &str) -> Result<()>;

    /// What this backend can do beyond the required operations (see
    /// [`Capabilities`]). The default declares nothing: a store then
    /// answers a write whose reply was lost with [`ErrorKind::Unavailable`].
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// Writes `content` unconditionally.
    async fn simple_upload(&self, path: &str, content: Bytes) -> Result<UploadResponse> {
        self.upload(UploadRequest::new(path, content)).await
    }

    /// Reads a document's content.
    async fn simple_download(&self, path: &str) -> Result<Bytes> {
        Ok(self.download(DownloadRequest::new(path)).await?.content)
    }
}

/// A new [`UploadRequest::write_token`]: 32 hex digits, unique to this
/// call across threads, processes and machines.
///
/// The first 64 bits are drawn from the operating system's random source
/// once per process, and again in a child after `fork` (a child gets a copy
/// of its parent's memory, so a generator seeded before the fork would
/// repeat the parent's tokens there); the last 64 bits count the calls.
pub fn new_write_token() -> String {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};
    // (process id, random bits of that process).
    static SEED: Mutex<(u32, u64)> = Mutex::new((0, 0));
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let pid = std::process::id();
    let seed = {
        let mut seed = SEED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seed.0 != pid {
            // Without an OS random source, the time and the process id
            // still set processes apart.
            let random = getrandom::u64().unwrap_or_else(|_| {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                (nanos as u64) ^ (u64::from(pid) << 32)
            });
            *seed = (pid, random);
        }
        seed.1
    };
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut out = String::with_capacity(32);
    push_hex(&mut out, seed);
    push_hex(&mut out, n);
    out
}

/// Appends `v` as 16 lowercase hex digits.
fn push_hex(out: &mut String, v: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for i in (0..16).rev() {
        out.push(char::from(DIGITS[((v >> (4 * i)) & 0xf) as usize]));
    }
}

/// Longest accepted storage path in bytes.
pub const MAX_PATH_LEN: usize = 1024;
/// Longest accepted path segment in bytes.
pub const MAX_SEGMENT_LEN: usize = 255;

/// Checks that `path` is a relative, normalised, slash-separated path.
///
/// Rejected with [`ErrorKind::InvalidInput`]: absolute paths, `.` and `..`
/// segments, empty segments (`a//b`, a trailing `/`), backslashes, NUL and
/// other control characters, paths longer than [`MAX_PATH_LEN`] and segments
/// longer than [`MAX_SEGMENT_LEN`]. The empty path (the root) is accepted only
/// when `allow_root` is true.
///
/// Every backend calls this before touching anything, so a bad path never
/// creates or reads anything.
///
/// # Errors
/// [`ErrorKind::InvalidInput`] naming the path and what is wrong with it.
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

/// Checks the preconditions of `req` against the current state of the
/// document (`None` when absent). Backends that can read and write under one
/// lock use this so they all answer alike.
///
/// # Errors
/// The precondition error a backend must return.
pub fn check_upload_preconditions(
    req: &UploadRequest,
    current: Option<(&str, SystemTime)>,
) -> Result<()> {
    if req.is_create_only() {
        if current.is_some() {
            return Err(
                Error::new(ErrorKind::AlreadyExists, "document already exists")
                    .with_path(&req.path),
            );
        }
        return Ok(());
    }
    if let Some(want) = &req.if_match {
        match current {
            None => {
                return Err(Error::not_found("if-match on a missing document").with_path(&req.path));
            }
            Some((etag, _)) if etag != want && want != "*" => {
                return Err(Error::new(
                    ErrorKind::PreconditionFailed,
                    format!("etag is {etag:?}, not {want:?}"),
                )
                .with_path(&req.path));
            }
            Some(_) => {}
        }
    }
    if let Some((etag, _)) = current
        && req.if_none_match.iter().any(|e| e == etag)
    {
        return Err(Error::new(
            ErrorKind::PreconditionFailed,
            format!("etag is {etag:?}, which if-none-match excludes"),
        )
        .with_path(&req.path));
    }
    if let (Some(since), Some((_, mtime))) = (req.if_unmodified_since, current)
        && mtime > since
    {
        return Err(Error::new(
            ErrorKind::PreconditionFailed,
            "document modified after if-unmodified-since",
        )
        .with_path(&req.path));
    }
    Ok(())
}

/// Checks a delete's `if_match` against the current etag (`None` when absent).
///
/// # Errors
/// [`ErrorKind::NotFound`] when absent, [`ErrorKind::PreconditionFailed`] on a
/// different etag.
pub fn check_delete_precondition(
    path: &str,
    if_match: Option<&str>,
    current: Option<&str>,
) -> Result<()> {
    match (current, if_match) {
        (None, _) => Err(Error::not_found("no such document").with_path(path)),
        (Some(etag), Some(want)) if etag != want && want != "*" => Err(Error::new(
            ErrorKind::PreconditionFailed,
            format!("etag is {etag:?}, not {want:?}"),
        )
        .with_path(path)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn write_tokens_differ() {
        let a = new_write_token();
        let b = new_write_token();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert_eq!(a[..16], b[..16], "one seed per process");
    }

    #[test]
    fn debug_hides_content() {
        let req = UploadRequest::new("p", "secret-password");
        assert!(!format!("{req:?}").contains("secret"));
        let resp = DownloadResponse {
            content: Bytes::from_static(b"secret-password"),
            etag: "e".into(),
            mtime: SystemTime::UNIX_EPOCH,
            write_token: None,
        };
        assert!(!format!("{resp:?}").contains("secret"));
    }
}
