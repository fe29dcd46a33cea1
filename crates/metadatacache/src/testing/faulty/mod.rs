//! [`FaultyStorage`]: fault injection, a storage around a storage.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

mod watch;

use crate::error::{Error, ErrorKind, Result};
use crate::storage::{
    Capabilities, ChangeSender, ChangeStream, DownloadRequest, DownloadResponse, FileInfo, Storage,
    UploadRequest, UploadResponse,
};

/// Wraps a storage and makes a seeded, reproducible fraction of calls fail.
///
/// - [`unavailable`](Self::unavailable): the call fails with
///   [`ErrorKind::Unavailable`] and the inner storage is not touched;
/// - [`ambiguous`](Self::ambiguous): an upload is applied to the inner
///   storage, then the caller gets [`ErrorKind::Unavailable`] (a lost reply);
/// - [`conflicts`](Self::conflicts): an upload fails with
///   [`ErrorKind::Aborted`] without touching the inner storage;
/// - [`errors`](Self::errors): the call fails with [`ErrorKind::Other`] and
///   the inner storage is not touched;
/// - [`applied_conflicts`](Self::applied_conflicts): an upload is applied,
///   then the caller gets [`ErrorKind::Aborted`] — a storage that lies, to
///   see the checks catch an update applied twice;
/// - [`delayed_apply`](Self::delayed_apply): an upload answers
///   [`ErrorKind::Unavailable`] at once and reaches the inner storage only
///   later, racing the caller's next calls (a request that timed out in a
///   queue or a socket buffer and commits late);
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
    errors: f64,
    applied_conflicts: f64,
    delayed: f64,
    max_delay: Duration,
    latency: Duration,
    racy_cas: bool,
    conflict_versions: bool,
    counts: Arc<FaultCounts>,
    /// Signalled whenever a delayed upload finishes.
    settled: Arc<tokio::sync::Notify>,
    /// The change streams handed out, for [`watch_gap`](Self::watch_gap).
    streams: Mutex<Vec<Arc<ChangeSender>>>,
    /// While set, changes are dropped instead of forwarded.
    watch_paused: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Debug, Default)]
struct FaultCounts {
    unavailable: AtomicU64,
    ambiguous: AtomicU64,
    conflicts: AtomicU64,
    errors: AtomicU64,
    applied_conflicts: AtomicU64,
    delayed: AtomicU64,
    delayed_landed: AtomicU64,
    /// Delayed uploads not finished yet.
    in_flight: AtomicU64,
    watch_dropped: AtomicU64,
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
    /// Calls failed with `Other` before reaching the inner storage.
    pub errors: u64,
    /// Uploads applied but reported as a conflict (`Aborted`).
    pub applied_conflicts: u64,
    /// Uploads answered `Unavailable` and sent to the inner storage later.
    pub delayed: u64,
    /// Delayed uploads that the inner storage accepted when they arrived.
    pub delayed_landed: u64,
    /// Changes dropped from change streams while they were paused.
    pub watch_dropped: u64,
}

impl fmt::Debug for FaultyStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyStorage")
            .field("inner", &self.inner)
            .field("unavailable", &self.unavailable)
            .field("ambiguous", &self.ambiguous)
            .field("conflicts", &self.conflicts)
            .field("errors", &self.errors)
            .field("applied_conflicts", &self.applied_conflicts)
            .field("delayed", &self.delayed)
            .field("max_delay", &self.max_delay)
            .field("latency", &self.latency)
            .field("racy_cas", &self.racy_cas)
            .field("conflict_versions", &self.conflict_versions)
            .finish_non_exhaustive()
    }
}

#[derive(PartialEq)]
enum Fault {
    None,
    Unavailable,
    Ambiguous,
    Conflict,
    Error,
    AppliedConflict,
    Delayed,
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
            errors: 0.0,
            applied_conflicts: 0.0,
            delayed: 0.0,
            max_delay: Duration::ZERO,
            latency: Duration::ZERO,
            racy_cas: false,
            conflict_versions: true,
            counts: Arc::default(),
            settled: Arc::default(),
            streams: Mutex::default(),
            watch_paused: Arc::default(),
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

    /// This fraction of all calls fails with an error of kind `Other`, the
    /// inner storage untouched: an error that is neither a conflict nor
    /// ambiguous, so the operation was not applied.
    #[must_use]
    pub fn errors(mut self, p: f64) -> Self {
        self.errors = p.clamp(0.0, 1.0);
        self
    }

    /// Breaks the storage contract on purpose, to show that the checks
    /// catch it: this fraction of uploads is applied, but the caller gets a
    /// spurious `Aborted`, so an update that retries it is applied twice.
    #[must_use]
    pub fn applied_conflicts(mut self, p: f64) -> Self {
        self.applied_conflicts = p.clamp(0.0, 1.0);
        self
    }

    /// This fraction of uploads answers `Unavailable` at once and reaches
    /// the inner storage only after a random delay of up to `max_delay`,
    /// racing the caller's next calls: a request that timed out but still
    /// commits, late. [`settle`](Self::settle) waits until all have arrived.
    ///
    /// Needs a tokio runtime with a timer (the delayed upload is a spawned
    /// task).
    #[must_use]
    pub fn delayed_apply(mut self, p: f64, max_delay: Duration) -> Self {
        self.delayed = p.clamp(0.0, 1.0);
        self.max_delay = max_delay;
        self
    }

    /// Waits until every delayed upload has reached the inner storage.
    ///
    /// # Cancel safety
    /// Cancel safe: it only waits.
    pub async fn settle(&self) {
        loop {
            let notified = self.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.counts.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Breaks compare-and-swap on purpose, to show that the checks catch it:
    /// preconditions are checked by a separate download, then (after a
    /// pause that invites a race) the write goes through unconditionally.
    #[must_use]
    pub fn racy_cas(mut self, on: bool) -> Self {
        self.racy_cas = on;
        self
    }

    /// Off, a refused upload comes back without the stored version and
    /// [`Capabilities::current_on_conflict`] is not declared, as on a
    /// backend that cannot read it with the refusal (default: as the inner
    /// storage does).
    #[must_use]
    pub fn conflict_versions(mut self, on: bool) -> Self {
        self.conflict_versions = on;
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
            errors: c.errors.load(Ordering::Relaxed),
            applied_conflicts: c.applied_conflicts.load(Ordering::Relaxed),
            delayed: c.delayed.load(Ordering::Relaxed),
            delayed_landed: c.delayed_landed.load(Ordering::Relaxed),
            watch_dropped: c.watch_dropped.load(Ordering::SeqCst),
        }
    }

    /// Draws the fault for one call (one random number per call, so the
    /// sequence depends on the seed and the call order only).
    async fn begin(&self, upload: bool, path: &str) -> Result<Fault> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        let x = self.rng.lock().unwrap_or_else(|p| p.into_inner()).f64();
        let mut bound = self.unavailable;
        let mut next = |p: f64| {
            bound += p;
            x < bound
        };
        let fault = if next(0.0) {
            Fault::Unavailable
        } else if upload && next(self.ambiguous) {
            Fault::Ambiguous
        } else if upload && next(self.conflicts) {
            Fault::Conflict
        } else if upload && next(self.delayed) {
            Fault::Delayed
        } else if next(self.errors) {
            Fault::Error
        } else if upload && next(self.applied_conflicts) {
            Fault::AppliedConflict
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
            Fault::Error => {
                self.counts.errors.fetch_add(1, Ordering::Relaxed);
                Err(injected(ErrorKind::Other, "injected: storage error", path))
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

impl FaultyStorage {
    /// Spawns the upload after a random delay; returns the caller's error.
    fn send_later(&self, req: UploadRequest) -> Error {
        let counts = Arc::clone(&self.counts);
        counts.delayed.fetch_add(1, Ordering::Relaxed);
        counts.in_flight.fetch_add(1, Ordering::SeqCst);
        let fraction = self.rng.lock().unwrap_or_else(|p| p.into_inner()).f64();
        let delay = self.max_delay.mul_f64(fraction);
        let inner = Arc::clone(&self.inner);
        let settled = Arc::clone(&self.settled);
        let path = req.path.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if inner.upload(req).await.is_ok() {
                counts.delayed_landed.fetch_add(1, Ordering::Relaxed);
            }
            counts.in_flight.fetch_sub(1, Ordering::SeqCst);
            settled.notify_waiters();
        });
        injected(
            ErrorKind::Unavailable,
            "injected: no answer in time; the upload arrives later",
            &path,
        )
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

    fn capabilities(&self) -> Capabilities {
        // Faults never lose a stored token, but a racy compare-and-swap
        // lets two copies of one write land.
        let mut caps = self.inner.capabilities();
        if self.racy_cas {
            caps.unique_etags = false;
            caps.write_tokens = false;
        }
        caps.current_on_conflict &= self.conflict_versions;
        caps
    }

    async fn init(&self, name: &str) -> Result<()> {
        self.begin(false, name).await?;
        self.inner.init(name).await
    }

    async fn upload(&self, req: UploadRequest) -> Result<UploadResponse> {
        let fault = self.begin(true, &req.path).await?;
        let path = req.path.clone();
        if fault == Fault::Delayed {
            return Err(self.send_later(req));
        }
        let req = if self.racy_cas {
            self.check_then_act(req).await?
        } else {
            req
        };
        let resp = self.inner.upload(req).await.map_err(|mut e| {
            if !self.conflict_versions {
                e.take_current();
            }
            e
        })?;
        if fault == Fault::Ambiguous {
            self.counts.ambiguous.fetch_add(1, Ordering::Relaxed);
            return Err(injected(
                ErrorKind::Unavailable,
                "injected: upload applied but reply lost",
                &path,
            ));
        }
        if fault == Fault::AppliedConflict {
            self.counts
                .applied_conflicts
                .fetch_add(1, Ordering::Relaxed);
            return Err(injected(
                ErrorKind::Aborted,
                "injected: upload applied but reported as a conflict",
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

    /// The inner storage's changes, forwarded so that
    /// [`watch_gap`](Self::watch_gap) can break into them.
    async fn watch(&self, prefix: &str) -> Result<ChangeStream> {
        let inner = self.inner.watch(prefix).await?;
        Ok(self.forward(inner))
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
