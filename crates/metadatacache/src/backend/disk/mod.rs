//! Storage in a local directory, correct across processes on one host.
//!
//! The blocking file system work lives in [`fs`]; this module holds the
//! public types and runs every operation on tokio's blocking thread pool.

mod fs;
mod lock;

use std::fmt;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{Error, ErrorKind, Result};
use crate::storage::{
    Capabilities, DownloadRequest, DownloadResponse, FileInfo, Storage, UploadRequest,
    UploadResponse, validate_path,
};

const BACKEND: &str = "disk";

/// Options for opening a [`DiskStorage`]; [`DiskStorage::open`] uses the
/// defaults.
///
/// ```
/// use std::time::Duration;
/// use metadatacache::DiskOptions;
/// let dir = tempfile::tempdir()?;
/// let storage = DiskOptions::new()
///     .file_mode(0o640)
///     .dir_mode(0o750)
///     .stale_temp_grace(Duration::from_secs(60))
///     .open(dir.path())?;
/// # drop(storage);
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskOptions {
    fsync: bool,
    file_mode: u32,
    dir_mode: u32,
    stale_temp_grace: Duration,
    #[cfg(feature = "testing")]
    fault: Option<FaultHook>,
}

/// A point in a disk write where a test can make it fail (see
/// [`DiskOptions::fault_hook`]; cargo feature `testing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DiskStep {
    /// An upload's temp file is written and synced; nothing is visible yet.
    TempWritten,
    /// The new version was renamed into place (it is visible); its
    /// directory is about to be synced.
    Renamed,
    /// The document was removed; its directory is about to be synced.
    Removed,
}

/// What a fault hook is: called with the step and the document's path.
#[cfg(feature = "testing")]
type HookFn = dyn Fn(DiskStep, &str) -> std::io::Result<()> + Send + Sync;

/// A test's fault hook, compared by identity.
#[cfg(feature = "testing")]
#[derive(Clone)]
struct FaultHook(Arc<HookFn>);

#[cfg(feature = "testing")]
impl fmt::Debug for FaultHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FaultHook")
    }
}

#[cfg(feature = "testing")]
impl PartialEq for FaultHook {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

#[cfg(feature = "testing")]
impl Eq for FaultHook {}

impl Default for DiskOptions {
    fn default() -> Self {
        DiskOptions {
            fsync: true,
            file_mode: 0o600,
            dir_mode: 0o700,
            stale_temp_grace: Duration::from_secs(600),
            #[cfg(feature = "testing")]
            fault: None,
        }
    }
}

impl DiskOptions {
    /// The defaults: fsync on, documents `0o600`, directories `0o700`, temp
    /// files removed at open once they are 10 minutes old.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether to `fsync` each written document and its directory before an
    /// upload or delete returns (default `true`).
    ///
    /// With `false`, an acknowledged write survives a crash of the process
    /// (the kernel still holds it) but the last acknowledged writes may be
    /// lost on power loss or a kernel crash. Documents are still replaced by
    /// rename, so a reader or a killed process never sees a torn document;
    /// after a power loss, ext4 (default `auto_da_alloc`), btrfs and XFS
    /// flush a file replaced by rename first, so a document is either the
    /// old or the new version there, while other file systems may then show
    /// an empty document. Turn fsync off only for data you can rebuild.
    #[must_use]
    pub fn fsync(mut self, on: bool) -> Self {
        self.fsync = on;
        self
    }

    /// Permission bits of documents (default `0o600`), set exactly,
    /// whatever the umask. Must let the owner read and write.
    #[must_use]
    pub fn file_mode(mut self, mode: u32) -> Self {
        self.file_mode = mode;
        self
    }

    /// Permission bits of directories this storage creates (default
    /// `0o700`), set exactly, whatever the umask. Must give the owner
    /// `rwx`.
    #[must_use]
    pub fn dir_mode(mut self, mode: u32) -> Self {
        self.dir_mode = mode;
        self
    }

    /// Temp files left by a killed writer are removed when a storage is
    /// opened once they are this old (by ctime; default 10 minutes). Zero
    /// removes every temp file: use it only when no other process is
    /// writing to the directory, or its in-flight uploads fail.
    #[must_use]
    pub fn stale_temp_grace(mut self, grace: Duration) -> Self {
        self.stale_temp_grace = grace;
        self
    }

    /// Calls `hook` at each [`DiskStep`] of a write with the document's
    /// path; an error it returns is taken as the failure of that step's
    /// system call (cargo feature `testing`, for fault-injection tests).
    #[cfg(feature = "testing")]
    #[must_use]
    pub fn fault_hook(
        mut self,
        hook: impl Fn(DiskStep, &str) -> std::io::Result<()> + Send + Sync + 'static,
    ) -> Self {
        self.fault = Some(FaultHook(Arc::new(hook)));
        self
    }

    /// Runs the fault hook, if any, for `step`.
    fn fault(&self, step: DiskStep, path: &str) -> std::io::Result<()> {
        #[cfg(feature = "testing")]
        if let Some(hook) = &self.fault {
            return (hook.0)(step, path);
        }
        let _ = (step, path);
        Ok(())
    }

    /// Opens (and creates, if missing) the storage directory `dir`.
    ///
    /// This does blocking I/O: it creates the directory and walks the tree
    /// to remove stale temp files. Call it at start-up, or through
    /// [`open`](crate::open) (`disk:PATH`) which runs it off the async
    /// threads.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a mode that locks the owner out;
    /// [`ErrorKind::PermissionDenied`], [`ErrorKind::NotFound`] or
    /// [`ErrorKind::Other`] when the directory cannot be created or opened.
    pub fn open(&self, dir: impl AsRef<Path>) -> Result<DiskStorage> {
        let dir = dir.as_ref();
        let shown = dir.display().to_string();
        let bad = |why: &'static str| Err(tag(Error::invalid_input(why).with_path(&shown)));
        if self.file_mode & !0o7777 != 0 || self.file_mode & 0o600 != 0o600 {
            return bad("file mode must be at most 0o7777 and include 0o600");
        }
        if self.dir_mode & !0o7777 != 0 || self.dir_mode & 0o700 != 0o700 {
            return bad("directory mode must be at most 0o7777 and include 0o700");
        }
        let root = fs::open_root(dir, &shown, self)?;
        let inner = Inner {
            root,
            dir: dir.to_path_buf(),
            opts: self.clone(),
        };
        inner.sweep_temp_files();
        Ok(DiskStorage {
            inner: Arc::new(inner),
        })
    }
}

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
///   version, never a torn or empty one, even if a writer is killed.
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

/// True for names the backend keeps for itself: `.mdcache…` and temp files.
fn is_internal(segment: &str) -> bool {
    segment.starts_with(".mdcache") || is_temp(segment)
}

/// True for temp file names: `.{name}.tmp.{pid}.{random}`.
fn is_temp(segment: &str) -> bool {
    segment.starts_with('.') && segment.contains(".tmp.")
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

    /// Conditional deletes under the document's lock, and real
    /// directories. Etags are content hashes: they repeat.
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            conditional_delete: true,
            directories: true,
            ..Capabilities::default()
        }
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
