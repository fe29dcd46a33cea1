//! Storage in a local directory, correct across processes on one host.
//!
//! The blocking file system work lives in [`fs`]; this module holds the
//! public types and runs every operation on tokio's blocking thread pool.
//! Change streams (inotify) live in [`watch`].

mod config;
mod fs;
mod lock;
mod many;
mod ops;
mod synced;
mod temp;
mod watch;

pub use self::config::{DiskOptions, DiskStep};

use std::fmt;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::{Error, ErrorKind, Result};
use crate::storage::{
    Capabilities, ChangeStream, DownloadRequest, DownloadResponse, FileInfo, Storage,
    UploadRequest, UploadResponse, validate_path,
};

const BACKEND: &str = "disk";

/// Storage in a local directory: the embedded default backend.
///
/// Each document is a plain file holding exactly the uploaded bytes (a JSON
/// document stays a JSON file you can `cat`); directories are directories.
/// Several processes on one host may share a directory:
///
/// - **compare-and-swap** — preconditions are checked and the document
///   replaced while holding an exclusive `flock` on the directory that
///   holds the document, through a descriptor opened for that one operation
///   (so it excludes other tasks of the process too). The kernel drops the
///   lock if the process dies. The lock is the very directory the new
///   version is renamed into, so two writers of one document always share
///   it, whatever is renamed meanwhile. Writes to documents of one
///   directory take turns for the short check-and-rename; writing and
///   syncing the new content happens before, outside the lock.
/// - **format marker** — `<dir>/.mdcache/format` names this locking
///   scheme; a directory whose marker names another is refused at open
///   ([`ErrorKind::InvalidInput`]), so processes that lock differently
///   never share one.
/// - **atomic replace** — an upload writes a temp file in the document's
///   directory, fsyncs it, renames it over the document and fsyncs the
///   directory. Readers never take the lock and see the old or the new
///   version, never a torn or empty one, even if a writer is killed. A
///   write whose precondition already fails is refused before its temp
///   file is written, with the stored version attached
///   ([`Capabilities::current_on_conflict`]); the check is repeated under
///   the lock.
/// - **combined uploads** — [`upload_many`](Storage::upload_many) writes
///   all its temp files, syncs them together, renames each directory's
///   documents under one lock and syncs each directory once
///   ([`Capabilities::combined_calls`]).
/// - **strong etags** — the etag is the BLAKE3 hash of the content as 64
///   hex digits, so equal content has an equal etag (also across uploads
///   and processes), and `if_none_match` answers [`ErrorKind::NotModified`].
///   A cryptographic hash: a user who can write documents cannot forge
///   content with another version's etag to pass a compare-and-swap.
/// - **point of no return** — once a new version is renamed into place (or
///   a document unlinked), any later failure (syncing the directory) is
///   [`ErrorKind::Unavailable`]: the change is visible and may stand.
/// - **confinement** — paths are checked with [`validate_path`] and resolved
///   one component at a time from a descriptor of the root with
///   `O_NOFOLLOW`: a path through a symbolic link, or naming one, fails
///   with [`ErrorKind::PermissionDenied`], so nothing outside the root is
///   ever created, read or removed. Symbolic links and special files are
///   not listed.
/// - **permissions** — documents `0o600`, directories `0o700` (see
///   [`DiskOptions`]), set with `fchmod` where the umask (or a default ACL)
///   left a new file or directory with other bits, so it does not matter. All
///   processes sharing a directory should run as the same user.
/// - **reserved names** — `<dir>/.mdcache` and temp files named
///   `.{name}.tmp.{pid}.{random}` are internal: a path with a segment that
///   starts with `.mdcache`, or starts with `.` and contains `.tmp.`, is
///   [`ErrorKind::InvalidInput`], and such entries are never listed. Temp
///   files left by killed writers are removed by [`DiskOptions::open`].
///
/// - **change notifications** — [`watch`](Storage::watch) follows the tree
///   with inotify (one kernel watch per directory, counted against
///   `fs.inotify.max_user_watches`), so changes made by other processes on
///   this host are reported too, each with an unknown etag. Nothing is
///   stored for it. On a network or cluster file system (NFS, SMB, Ceph,
///   9P, AFS, GFS2, OCFS2, Lustre) or FUSE, whose changes on other hosts
///   inotify never sees, [`capabilities`](Storage::capabilities) declares
///   no notifications and `watch` refuses ([`ErrorKind::InvalidInput`]).
///
/// An upload creates missing parent directories (unless it has `if_match`).
/// [`UploadRequest::mtime`] is recorded as the file's modification time;
/// otherwise the file system's clock stamps it, which ticks coarsely (a few
/// milliseconds on Linux), so `if_unmodified_since` cannot tell apart two
/// writes within one tick — use `if_match` for compare-and-swap. Deleting a document leaves
/// its (possibly empty) directory in place. Unix only.
///
/// Cloning is cheap; clones share the open root directory.
#[derive(Clone)]
pub struct DiskStorage {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The storage root, opened once; every path is resolved beneath it.
    root: OwnedFd,
    dir: PathBuf,
    opts: DiskOptions,
    /// Directories whose entry in their parent this handle synced.
    synced: synced::SyncedDirs,
    /// The shared file system the root lies on, if any: then changes made
    /// on other hosts cannot be followed.
    shared_fs: Option<&'static str>,
}

impl fmt::Debug for DiskStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskStorage")
            .field("dir", &self.inner.dir)
            .field("opts", &self.inner.opts)
            .finish()
    }
}

impl DiskStorage {
    /// Opens (and creates, if missing, with mode `0o700`) the storage
    /// directory `dir` with the default [`DiskOptions`]: fsync on, documents
    /// `0o600`, directories `0o700`, stale temp files removed after 10
    /// minutes.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use metadatacache::{DiskStorage, DownloadRequest, ErrorKind, Storage};
    /// let dir = tempfile::tempdir().unwrap();
    /// let storage = DiskStorage::open(dir.path())?;
    /// let written = storage.simple_upload("users/alice.json", "{}".into()).await?;
    /// assert_eq!(std::fs::read(dir.path().join("users/alice.json")).unwrap(), b"{}");
    ///
    /// let req = DownloadRequest::if_none_match("users/alice.json", written.etag);
    /// let err = storage.download(req).await.unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::NotModified);
    /// # Ok::<_, metadatacache::Error>(()) }).unwrap();
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::PermissionDenied`], [`ErrorKind::NotFound`] or
    /// [`ErrorKind::Other`] naming `dir` when it cannot be created or opened.
    pub fn open(dir: impl AsRef<Path>) -> Result<DiskStorage> {
        DiskOptions::new().open(dir)
    }

    /// Opens the directory a URL names: `disk:PATH`, `disk://PATH` or a
    /// bare path (one that does not start with a URL scheme), with the
    /// default options. Blocking, like [`open`](Self::open).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] naming the URL when it names no
    /// directory or a `disk:` URL has a `?` (disk URLs take no
    /// parameters); otherwise as [`open`](Self::open).
    pub fn from_url(url: &str) -> Result<DiskStorage> {
        let (path, is_url) = match url.strip_prefix("disk:") {
            Some(path) => (path.strip_prefix("//").unwrap_or(path), true),
            None => (url, false),
        };
        if path.is_empty() {
            return Err(crate::backend::util::bad_url(
                BACKEND,
                url,
                "no directory; expected disk:PATH",
            ));
        }
        if is_url && path.contains('?') {
            return Err(crate::backend::util::bad_url(
                BACKEND,
                url,
                "a disk URL takes no parameters (DiskOptions are set in code); \
                 for a directory whose name has a '?', give it as a bare path",
            ));
        }
        Self::open(path)
    }

    /// The directory this storage was opened on.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The options it was opened with.
    pub fn options(&self) -> &DiskOptions {
        &self.inner.opts
    }

    /// Runs `f` where blocking is allowed. Once started, it runs to the end
    /// even if the caller's future is dropped, so a write is never cut in
    /// half by cancellation.
    ///
    /// On a multi-threaded runtime the calling worker runs `f` itself
    /// (`block_in_place` hands its other tasks to another worker): that saves
    /// a thread hand-off per operation, which is a sizeable share of a small
    /// document's cost. Elsewhere `f` goes to the blocking pool.
    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        if let Ok(handle) = tokio::runtime::Handle::try_current()
            && handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
        {
            return tokio::task::block_in_place(|| f(&self.inner));
        }
        let inner = Arc::clone(&self.inner);
        match tokio::task::spawn_blocking(move || f(&inner)).await {
            Ok(result) => result,
            Err(e) => Err(tag(Error::new(
                ErrorKind::Unavailable,
                "disk worker task failed",
            )
            .with_source(e))),
        }
    }
}

fn tag(e: Error) -> Error {
    e.with_backend(BACKEND)
}

/// True for names the backend keeps for itself: `.mdcache…` and temp files,
/// in any case (on a case-insensitive file system `.MDCACHE` is
/// `.mdcache`).
fn is_internal(segment: &str) -> bool {
    let reserved = ".mdcache";
    let head = segment.get(..reserved.len());
    head.is_some_and(|h| h.eq_ignore_ascii_case(reserved)) || is_temp(segment)
}

/// True for temp file names: `.{name}.tmp.{pid}.{random}` (in any case).
fn is_temp(segment: &str) -> bool {
    segment.starts_with('.')
        && segment
            .as_bytes()
            .windows(5)
            .any(|w| w.eq_ignore_ascii_case(b".tmp."))
}

/// [`validate_path`] plus the reserved-name rule.
fn check_path(path: &str, allow_root: bool) -> Result<()> {
    validate_path(path, allow_root).map_err(tag)?;
    if path.split('/').any(is_internal) {
        return Err(tag(Error::invalid_input(
            "names starting with \".mdcache\", and names starting with '.' that contain \
             \".tmp.\", are reserved for the disk backend's internal files",
        )
        .with_path(path)));
    }
    Ok(())
}

#[async_trait]
impl Storage for DiskStorage {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    /// Conditional deletes under the document's lock, real directories,
    /// changes reported by inotify, and combined uploads that share their
    /// syncs. Etags are content hashes: they repeat.
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            conditional_delete: true,
            combined_calls: true,
            current_on_conflict: true,
            directories: true,
            notifications: self.inner.shared_fs.is_none(),
            ..Capabilities::default()
        }
    }

    /// Watches every directory of the tree with inotify, also those created
    /// later, and reports each document renamed into place, written in
    /// place or unlinked, by any process on this host, with an unknown
    /// etag. Temp files and the internal `.mdcache` folders are not
    /// reported.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a bad prefix;
    /// [`ErrorKind::Unavailable`] when the watch cannot be set up (for
    /// instance past the inotify watch limit).
    async fn watch(&self, prefix: &str) -> Result<ChangeStream> {
        check_path(prefix, true)?;
        if let Some(kind) = self.inner.shared_fs {
            return Err(tag(Error::invalid_input(format!(
                "{} is on a {kind} file system: changes made on other hosts cannot be \
                 followed (a watching Store revalidates every read)",
                self.inner.dir.display()
            ))));
        }
        let prefix = prefix.to_owned();
        self.blocking(move |inner| watch::subscribe(&inner.dir, &prefix))
            .await
    }

    /// Creates directory `name` below the root, like
    /// [`make_dir_if_not_exist`](Storage::make_dir_if_not_exist); paths stay
    /// relative to the root. The empty name is the root itself.
    async fn init(&self, name: &str) -> Result<()> {
        self.make_dir_if_not_exist(name).await
    }

    async fn upload(&self, req: UploadRequest) -> Result<UploadResponse> {
        check_path(&req.path, false)?;
        self.blocking(move |inner| inner.upload(&req).map_err(tag))
            .await
    }

    /// Writes every temp file, has the kernel write them all back at once
    /// before each is synced, renames each directory's documents under one
    /// lock and syncs each directory once. Each request keeps its own
    /// preconditions and result.
    async fn upload_many(&self, reqs: Vec<UploadRequest>) -> Vec<Result<UploadResponse>> {
        let n = reqs.len();
        match self
            .blocking(move |inner| Ok(inner.upload_many(&reqs)))
            .await
        {
            Ok(results) => results.into_iter().map(|r| r.map_err(tag)).collect(),
            Err(e) => (0..n).map(|_| Err(e.duplicate())).collect(),
        }
    }

    async fn download(&self, req: DownloadRequest) -> Result<DownloadResponse> {
        check_path(&req.path, false)?;
        self.blocking(move |inner| inner.download(&req).map_err(tag))
            .await
    }

    async fn delete_if_match(&self, path: &str, if_match: Option<&str>) -> Result<()> {
        check_path(path, false)?;
        let path = path.to_owned();
        let if_match = if_match.map(str::to_owned);
        self.blocking(move |inner| inner.delete(&path, if_match.as_deref()).map_err(tag))
            .await
    }

    async fn stat(&self, path: &str) -> Result<FileInfo> {
        check_path(path, true)?;
        let path = path.to_owned();
        self.blocking(move |inner| inner.stat(&path).map_err(tag))
            .await
    }

    async fn list_dir(&self, path: &str) -> Result<Vec<FileInfo>> {
        check_path(path, true)?;
        let path = path.to_owned();
        self.blocking(move |inner| inner.list_dir(&path).map_err(tag))
            .await
    }

    async fn make_dir_if_not_exist(&self, path: &str) -> Result<()> {
        check_path(path, true)?;
        if path.is_empty() {
            return Ok(());
        }
        let path = path.to_owned();
        self.blocking(move |inner| inner.make_dir(&path).map_err(tag))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_names() {
        for internal in [
            ".mdcache",
            ".mdcache-x",
            ".a.json.tmp.1.2",
            "..tmp.",
            ".x.tmp.",
            ".MDCACHE",
            ".Mdcache-x",
            ".a.json.TMP.1.2",
        ] {
            assert!(is_internal(internal), "{internal}");
        }
        for user in [
            "a.json",
            "mdcache",
            "x.tmp.y",
            ".hidden",
            ".tmp",
            "a.mdcache",
        ] {
            assert!(!is_internal(user), "{user}");
        }
        assert!(check_path(".MDCACHE/format", false).is_err());
        let e = check_path("a/.mdcache/locks/00", false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert_eq!(e.backend(), Some("disk"));
        assert_eq!(e.path(), Some("a/.mdcache/locks/00"));
    }

    #[test]
    fn bad_modes_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        for opts in [
            DiskOptions::new().file_mode(0o400),
            DiskOptions::new().file_mode(0o10600),
            DiskOptions::new().dir_mode(0o600),
        ] {
            let e = opts.open(dir.path()).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{opts:?}");
        }
    }
}
