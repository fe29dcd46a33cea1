//! Fault injection for tests: a storage around a storage.
//!
//! Available with the cargo feature `testing`.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

pub mod history;

use crate::error::{Error, ErrorKind, Result};
use crate::storage::{
    DownloadRequest, DownloadResponse, FileInfo, Storage, UploadRequest, UploadResponse,
};

/// Wraps a storage and makes a seeded, reproducible fraction of calls fail.
///
/// - [`unavailable`](Self::unavailable): the call fails with
///   [`ErrorKind::Unavailable`] and the inner storage is not touched;
/// - [`ambiguous`](Self::ambiguous): an upload is applied to the inner
///   storage, then the caller gets [`ErrorKind::Unavailable`] (a lost reply);
/// - [`conflicts`](Self::conflicts): an upload fails with
///   [`ErrorKind::Aborted`] without touching the inner storage;
/// - [`latency`](Self::latency): added to every call.
///
/// The same seed and the same sequence of calls give the same faults.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use metadatacache::MemoryStorage;
/// use metadatacache::testing::FaultyStorage;
///
/// let storage = FaultyStorage::new(Arc::new(MemoryStorage::new()), 42)
///     .unavailable(0.1)
///     .ambiguous(0.2)
///     .latency(Duration::from_millis(1));
/// assert_eq!(storage.faults().ambiguous, 0);
/// ```
pub struct FaultyStorage {
    inner: Arc<dyn Storage>,
    rng: Mutex<fastrand::Rng>,
    unavailable: f64,
    ambiguous: f64,
    conflicts: f64,
    latency: Duration,
    racy_cas: bool,
    counts: FaultCounts,
}

#[derive(Debug, Default)]
struct FaultCounts {
    unavailable: AtomicU64,
    ambiguous: AtomicU64,
    conflicts: AtomicU64,
}

/// How many faults a [`FaultyStorage`] has injected so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Calls failed with `Unavailable` before reaching the inner storage.
    pub unavailable: u64,
    /// Uploads applied but reported `Unavailable`.
    pub ambiguous: u64,
    /// Uploads failed with a spurious `Aborted`.
    pub conflicts: u64,
}

impl fmt::Debug for FaultyStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyStorage")
            .field("inner", &self.inner)
            .field("unavailable", &self.unavailable)
            .field("ambiguous", &self.ambiguous)
            .field("conflicts", &self.conflicts)
            .field("latency", &self.latency)
            .field("racy_cas", &self.racy_cas)
            .finish_non_exhaustive()
    }
}

#[derive(PartialEq)]
enum Fault {
    None,
    Unavailable,
    Ambiguous,
    Conflict,
}

impl FaultyStorage {
    /// Wraps `inner`; no faults until configured.
    pub fn new(inner: Arc<dyn Storage>, seed: u64) -> Self {
        FaultyStorage {
            inner,
            rng: Mutex::new(fastrand::Rng::with_seed(seed)),
            unavailable: 0.0,
            ambiguous: 0.0,
            conflicts: 0.0,
            latency: Duration::ZERO,
            racy_cas: false,
            counts: FaultCounts::default(),
        }
    }

    /// This fraction of all calls fails with `Unavailable`, the inner storage
    /// untouched.
    #[must_use]
    pub fn unavailable(mut self, p: f64) -> Self {
        self.unavailable = p.clamp(0.0, 1.0);
        self
    }

    /// This fraction of uploads is applied, but the caller gets
    /// `Unavailable`.
    #[must_use]
    pub fn ambiguous(mut self, p: f64) -> Self {
        self.ambiguous = p.clamp(0.0, 1.0);
        self
    }

    /// This fraction of uploads fails with a spurious `Aborted`.
    #[must_use]
    pub fn conflicts(mut self, p: f64) -> Self {
        self.conflicts = p.clamp(0.0, 1.0);
        self
    }

    /// Breaks compare-and-swap on purpose, to show that the checks catch it:
    /// preconditions are checked by a separate download, then (after a
    /// pause that invites a race) the write goes through unconditionally.
    #[must_use]
    pub fn racy_cas(mut self, on: bool) -> Self {
        self.racy_cas = on;
        self
    }

    /// Added to every call.
    #[must_use]
    pub fn latency(mut self, d: Duration) -> Self {
        self.latency = d;
        self
    }

    /// The faults injected so far.
    pub fn faults(&self) -> Faults {
        let c = &self.counts;
        Faults {
            unavailable: c.unavailable.load(Ordering::Relaxed),
            ambiguous: c.ambiguous.load(Ordering::Relaxed),
            conflicts: c.conflicts.load(Ordering::Relaxed),
        }
    }

    /// Draws the fault for one call (one random number per call, so the
    /// sequence depends on the seed and the call order only).
    async fn begin(&self, upload: bool, path: &str) -> Result<Fault> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        let x = self.rng.lock().unwrap_or_else(|p| p.into_inner()).f64();
        let fault = if x < self.unavailable {
            Fault::Unavailable
        } else if upload && x < self.unavailable + self.ambiguous {
            Fault::Ambiguous
        } else if upload && x < self.unavailable + self.ambiguous + self.conflicts {
            Fault::Conflict
        } else {
            Fault::None
        };
        match fault {
            Fault::Unavailable => {
                self.counts.unavailable.fetch_add(1, Ordering::Relaxed);
                Err(injected(
                    ErrorKind::Unavailable,
                    "injected: storage unavailable",
                    path,
                ))
            }
            Fault::Conflict => {
                self.counts.conflicts.fetch_add(1, Ordering::Relaxed);
                Err(injected(
                    ErrorKind::Aborted,
                    "injected: spurious conflict",
                    path,
                ))
            }
            f => Ok(f),
        }
    }
}

impl FaultyStorage {
    /// The non-atomic check of [`racy_cas`](Self::racy_cas): returns the
    /// request stripped of its preconditions if they held a moment ago.
    async fn check_then_act(&self, req: UploadRequest) -> Result<UploadRequest> {
        let current = match self.inner.download(DownloadRequest::new(&req.path)).await {
            Ok(d) => Some((d.etag, d.mtime)),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        crate::storage::check_upload_preconditions(
            &req,
            current.as_ref().map(|(e, m)| (e.as_str(), *m)),
        )?;
        tokio::time::sleep(Duration::from_millis(1)).await;
        Ok(UploadRequest::new(req.path, req.content))
    }
}

fn injected(kind: ErrorKind, msg: &'static str, path: &str) -> Error {
    Error::new(kind, msg).with_path(path).with_backend("faulty")
}

#[async_trait]
impl Storage for FaultyStorage {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn stores_write_tokens(&self) -> bool {
        // Spurious conflicts and lost replies never lose a stored token,
        // but a racy compare-and-swap voids "distinct etags per version".
        self.inner.stores_write_tokens() && !self.racy_cas
    }

    async fn init(&self, name: &str) -> Result<()> {
        self.begin(false, name).await?;
        self.inner.init(name).await
    }

    async fn upload(&self, req: UploadRequest) -> Result<UploadResponse> {
        let fault = self.begin(true, &req.path).await?;
        let path = req.path.clone();
        let req = if self.racy_cas {
            self.check_then_act(req).await?
        } else {
            req
        };
        let resp = self.inner.upload(req).await?;
        if fault == Fault::Ambiguous {
            self.counts.ambiguous.fetch_add(1, Ordering::Relaxed);
            return Err(injected(
                ErrorKind::Unavailable,
                "injected: upload applied but reply lost",
                &path,
            ));
        }
        Ok(resp)
    }

    async fn download(&self, req: DownloadRequest) -> Result<DownloadResponse> {
        self.begin(false, &req.path).await?;
        self.inner.download(req).await
    }

    async fn delete_if_match(&self, path: &str, if_match: Option<&str>) -> Result<()> {
        self.begin(false, path).await?;
        self.inner.delete_if_match(path, if_match).await
    }

    async fn stat(&self, path: &str) -> Result<FileInfo> {
        self.begin(false, path).await?;
        self.inner.stat(path).await
    }

    async fn list_dir(&self, path: &str) -> Result<Vec<FileInfo>> {
        self.begin(false, path).await?;
        self.inner.list_dir(path).await
    }

    async fn make_dir_if_not_exist(&self, path: &str) -> Result<()> {
        self.begin(false, path).await?;
        self.inner.make_dir_if_not_exist(path).await
    }
}
