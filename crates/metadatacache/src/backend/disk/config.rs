//! How a [`DiskStorage`] is opened: [`DiskOptions`], and the fault hook of
//! the tests.

#[cfg(feature = "testing")]
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::{DiskStorage, Inner, fs, tag};
#[cfg(doc)]
use crate::error::ErrorKind;
use crate::error::{Error, Result};

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
    pub(super) fsync: bool,
    pub(super) file_mode: u32,
    pub(super) dir_mode: u32,
    pub(super) stale_temp_grace: Duration,
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
    pub(super) fn fault(&self, step: DiskStep, path: &str) -> std::io::Result<()> {
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
        let shared_fs = super::watch::shared_fs(&root);
        let inner = Inner {
            root,
            dir: dir.to_path_buf(),
            opts: self.clone(),
            synced: Default::default(),
            shared_fs,
        };
        inner.sweep_temp_files();
        Ok(DiskStorage {
            inner: Arc::new(inner),
        })
    }
}
