//! Operation counters.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of a store's counters since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Reads answered from the cache without a storage round trip (coalesced,
    /// within `max_staleness`, or vouched for by the watch).
    pub hits: u64,
    /// Downloads that transferred a document (counted before it is
    /// decoded).
    pub downloads: u64,
    /// Conditional downloads answered `NotModified` (nothing transferred).
    pub not_modified: u64,
    /// Upload calls made.
    pub uploads: u64,
    /// Uploads or deletes rejected because another writer got there first.
    pub conflicts: u64,
    /// Rejected uploads that brought back the version that refused them
    /// (see [`Capabilities::current_on_conflict`](crate::Capabilities::current_on_conflict)),
    /// which was cached without a download.
    pub conflict_versions: u64,
    /// Attempts started again after a conflict.
    pub retries: u64,
    /// Operations that ran out of attempts or time.
    pub give_ups: u64,
    /// Writes whose reply was lost (the storage answered `Unavailable`).
    pub lost_replies: u64,
    /// Lost-reply writes shown to have landed exactly once (answered
    /// `Ok`); the others were answered `Unavailable`.
    pub lost_replies_settled: u64,
    /// Reads tried again after the storage answered `Unavailable` or
    /// `TooEarly` (see [`RetryPolicy::read_attempts`](crate::RetryPolicy::read_attempts)).
    pub read_retries: u64,
    /// Gaps in the change stream of a watching store (see
    /// [`Options::watch`](crate::Options::watch)): each made every read
    /// revalidate until the stream was whole again.
    pub watch_gaps: u64,
}

/// One of a store's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Counter {
    Hits,
    Downloads,
    NotModified,
    Uploads,
    Conflicts,
    Retries,
    GiveUps,
    LostReplies,
    LostRepliesSettled,
    ReadRetries,
    ConflictVersions,
}

const COUNTERS: usize = 11;

impl Counter {
    /// The metric each counter feeds (cargo feature `metrics`).
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    fn metric(self) -> &'static str {
        match self {
            Counter::Hits => "metadatacache_hits_total",
            Counter::Downloads => "metadatacache_downloads_total",
            Counter::NotModified => "metadatacache_not_modified_total",
            Counter::Uploads => "metadatacache_uploads_total",
            Counter::Conflicts => "metadatacache_conflicts_total",
            Counter::Retries => "metadatacache_retries_total",
            Counter::GiveUps => "metadatacache_give_ups_total",
            Counter::LostReplies => "metadatacache_lost_replies_total",
            Counter::LostRepliesSettled => "metadatacache_lost_replies_settled_total",
            Counter::ReadRetries => "metadatacache_read_retries_total",
            Counter::ConflictVersions => "metadatacache_conflict_versions_total",
        }
    }
}

/// A store's counters; each also feeds the `metrics` facade (cargo feature
/// `metrics`), labelled with the backend.
#[derive(Debug)]
pub(super) struct Counters {
    values: [AtomicU64; COUNTERS],
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    backend: &'static str,
}

impl Counters {
    pub(super) fn new(backend: &'static str) -> Self {
        Counters {
            values: Default::default(),
            backend,
        }
    }

    /// Counts one `c`.
    pub(super) fn bump(&self, c: Counter) {
        self.values[c as usize].fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!(c.metric(), "backend" => self.backend).increment(1);
    }

    pub(super) fn snapshot(&self) -> Stats {
        let get = |c: Counter| self.values[c as usize].load(Ordering::Relaxed);
        Stats {
            hits: get(Counter::Hits),
            downloads: get(Counter::Downloads),
            not_modified: get(Counter::NotModified),
            uploads: get(Counter::Uploads),
            conflicts: get(Counter::Conflicts),
            conflict_versions: get(Counter::ConflictVersions),
            retries: get(Counter::Retries),
            give_ups: get(Counter::GiveUps),
            lost_replies: get(Counter::LostReplies),
            lost_replies_settled: get(Counter::LostRepliesSettled),
            read_retries: get(Counter::ReadRetries),
            watch_gaps: 0,
        }
    }
}

/// The outcome label of a result: `ok`, or the error's kind.
#[cfg(feature = "metrics")]
fn outcome<T>(res: &crate::error::Result<T>) -> &'static str {
    match res {
        Ok(_) => "ok",
        Err(e) => e.kind().as_str(),
    }
}

/// Records how long a storage call took, in the histogram
/// `metadatacache_storage_seconds{backend, op, outcome}` (cargo feature
/// `metrics`; a no-op without it).
pub(super) fn storage_call<T>(
    backend: &'static str,
    op: &'static str,
    started: std::time::Instant,
    res: &crate::error::Result<T>,
) {
    #[cfg(feature = "metrics")]
    metrics::histogram!(
        "metadatacache_storage_seconds",
        "backend" => backend,
        "op" => op,
        "outcome" => outcome(res)
    )
    .record(started.elapsed().as_secs_f64());
    #[cfg(not(feature = "metrics"))]
    let _ = (backend, op, started, res);
}

/// Records how long a store operation (`get`, `update`, `remove`, `reset`)
/// took, in the histogram `metadatacache_operation_seconds{backend, op,
/// outcome}` (cargo feature `metrics`; a no-op without it).
pub(super) fn operation<T>(
    backend: &'static str,
    op: &'static str,
    started: std::time::Instant,
    res: &crate::error::Result<T>,
) {
    #[cfg(feature = "metrics")]
    metrics::histogram!(
        "metadatacache_operation_seconds",
        "backend" => backend,
        "op" => op,
        "outcome" => outcome(res)
    )
    .record(started.elapsed().as_secs_f64());
    #[cfg(not(feature = "metrics"))]
    let _ = (backend, op, started, res);
}
