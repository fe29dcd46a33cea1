//! The backend trait and its request and response types.

use std::fmt;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{ErrorKind, Result};

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
    /// The backend's short name, as errors and logs show it: `"memory"`,
    /// `"disk"`, `"etcd"`, `"postgres"`, `"s3"`, ….
    fn backend(&self) -> &'static str;

    /// Makes the storage ready and `name` (a path; `""` for the root) a
    /// place to keep documents. Idempotent. Every backend does the same
    /// three things, as far as it has them: it creates its own structures
    /// where it can (PostgreSQL's table), checks that it is reachable
    /// (networked backends), and creates directory `name` where directories
    /// are stored ([`Capabilities::directories`]); elsewhere a directory
    /// needs no creating. `name` is always checked like a path.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a bad `name`;
    /// [`ErrorKind::Unavailable`] or [`ErrorKind::PermissionDenied`] when
    /// the backend cannot be used.
    ///
    /// # Cancel safety
    /// Cancel safe: what it creates is idempotent to create again.
    async fn init(&self, name: &str) -> Result<()>;

    /// Writes a document; see [`UploadRequest`] for the preconditions.
    ///
    /// # Errors
    /// [`ErrorKind::PreconditionFailed`], [`ErrorKind::NotFound`] or
    /// [`ErrorKind::AlreadyExists`] when a precondition fails (nothing is
    /// written), [`ErrorKind::InvalidInput`] for a bad path,
    /// [`ErrorKind::Unavailable`] when the outcome is unknown: the write
    /// may have been applied, also later. Once the request may have reached
    /// the server, no other error is returned unless the server said the
    /// write was not applied.
    ///
    /// # Cancel safety
    /// Not cancel safe: a dropped call may or may not have been applied
    /// (like a lost reply).
    async fn upload(&self, req: UploadRequest) -> Result<UploadResponse>;

    /// Writes several documents, each with its own preconditions and its
    /// own result, in request order: one request's refusal never fails
    /// another, and a path named twice is written as by two uploads. Backends with
    /// [`Capabilities::combined_calls`] send them in one round trip; the
    /// default sends the uploads concurrently.
    ///
    /// # Errors
    /// Per request, as [`upload`](Storage::upload).
    ///
    /// # Cancel safety
    /// Not cancel safe: a dropped call may have applied any of the writes.
    async fn upload_many(&self, reqs: Vec<UploadRequest>) -> Vec<Result<UploadResponse>> {
        futures_util::future::join_all(reqs.into_iter().map(|req| self.upload(req))).await
    }

    /// Reads several documents, each answered on its own, in request
    /// order. Backends with [`Capabilities::combined_calls`] read them in
    /// one round trip; the default sends the downloads concurrently.
    ///
    /// # Errors
    /// Per request, as [`download`](Storage::download).
    ///
    /// # Cancel safety
    /// Cancel safe: a read changes nothing.
    async fn download_many(&self, reqs: Vec<DownloadRequest>) -> Vec<Result<DownloadResponse>> {
        futures_util::future::join_all(reqs.into_iter().map(|req| self.download(req))).await
    }

    /// Reads a document.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] when absent, [`ErrorKind::NotModified`] when the
    /// etag is one of `if_none_match`, [`ErrorKind::Unavailable`] when the
    /// backend does not answer.
    ///
    /// # Cancel safety
    /// Cancel safe: a read changes nothing.
    async fn download(&self, req: DownloadRequest) -> Result<DownloadResponse>;

    /// Deletes a document, only if its etag is `if_match` when that is given.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] when absent, [`ErrorKind::PreconditionFailed`]
    /// when the etag differs (the document is kept),
    /// [`ErrorKind::Unavailable`] when the outcome is unknown. A backend
    /// that cannot check `if_match` atomically with the delete
    /// ([`Capabilities::conditional_delete`]) refuses it.
    ///
    /// # Cancel safety
    /// Not cancel safe: a dropped call may or may not have deleted.
    async fn delete_if_match(&self, path: &str, if_match: Option<&str>) -> Result<()>;

    /// Deletes a document unconditionally.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] when absent, [`ErrorKind::Unavailable`] when
    /// the outcome is unknown.
    ///
    /// # Cancel safety
    /// Not cancel safe: a dropped call may or may not have deleted.
    async fn delete(&self, path: &str) -> Result<()> {
        self.delete_if_match(path, None).await
    }

    /// Describes a document or directory.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] when absent, [`ErrorKind::Unavailable`] when
    /// the backend does not answer.
    ///
    /// # Cancel safety
    /// Cancel safe: a read changes nothing.
    async fn stat(&self, path: &str) -> Result<FileInfo>;

    /// The paths of the direct children of directory `path`; a missing
    /// directory is empty. Internal files (temporary or lock files) are never
    /// listed.
    ///
    /// # Errors
    /// As [`list_dir`](Storage::list_dir).
    ///
    /// # Cancel safety
    /// Cancel safe: a read changes nothing.
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
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a bad path, [`ErrorKind::Unavailable`]
    /// when the backend does not answer.
    ///
    /// # Cancel safety
    /// Cancel safe: a read changes nothing.
    async fn list_dir(&self, path: &str) -> Result<Vec<FileInfo>>;

    /// Creates directory `path` and its parents; a no-op where the backend has
    /// no directories.
    ///
    /// # Errors
    /// [`ErrorKind::AlreadyExists`] when `path` or a parent is a document,
    /// [`ErrorKind::InvalidInput`] for a bad path.
    ///
    /// # Cancel safety
    /// Cancel safe: creating a directory is idempotent.
    async fn make_dir_if_not_exist(&self, path: &str) -> Result<()>;

    /// What this backend can do beyond the required operations (see
    /// [`Capabilities`]). The default declares nothing: a store then
    /// answers a write whose reply was lost with [`ErrorKind::Unavailable`].
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// Subscribes to the changes of the documents below `prefix` (`""` for
    /// all of them), as [`Options::watch`](crate::Options::watch) uses it.
    ///
    /// The backend keeps the subscription alive by itself (reconnecting
    /// after an outage) until the stream is dropped. The stream opens with
    /// [`Change::InSync`] once every later change will be reported, reports
    /// a [`Change::Gap`] whenever changes may have been missed, and another
    /// `InSync` once it is whole again. A change is reported after it is
    /// visible to reads.
    ///
    /// # Errors
    /// [`ErrorKind::Other`] where the backend cannot report changes
    /// ([`Capabilities::notifications`] is false: the default);
    /// [`ErrorKind::InvalidInput`] for a bad prefix.
    ///
    /// # Cancel safety
    /// Cancel safe: a subscription set up half-way is dropped with the
    /// future.
    async fn watch(&self, prefix: &str) -> Result<ChangeStream> {
        let _ = prefix;
        Err(crate::Error::new(
            ErrorKind::Other,
            "this backend cannot report changes; reads revalidate instead",
        )
        .with_backend(self.backend()))
    }

    /// Writes `content` unconditionally.
    ///
    /// # Errors
    /// As [`upload`](Storage::upload).
    ///
    /// # Cancel safety
    /// As [`upload`](Storage::upload): not cancel safe.
    async fn simple_upload(&self, path: &str, content: Bytes) -> Result<UploadResponse> {
        self.upload(UploadRequest::new(path, content)).await
    }

    /// Reads a document's content.
    ///
    /// # Errors
    /// As [`download`](Storage::download).
    ///
    /// # Cancel safety
    /// Cancel safe: a read changes nothing.
    async fn simple_download(&self, path: &str) -> Result<Bytes> {
        Ok(self.download(DownloadRequest::new(path)).await?.content)
    }
}

mod capabilities;
mod change;
pub(crate) mod download;
mod path;
mod precondition;
mod token;

pub use self::capabilities::Capabilities;
pub use self::change::{Change, ChangeSender, ChangeStream};
pub use self::download::DownloadResponse;
pub use self::path::{MAX_PATH_LEN, MAX_SEGMENT_LEN, parent, validate_path};
pub(crate) use self::path::{is_within, join};
pub(crate) use self::precondition::with_current;
pub use self::precondition::{check_delete_precondition, check_upload_preconditions};
pub use self::token::new_write_token;

#[cfg(test)]
mod tests {
    use super::*;

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
