//! Operation counters.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of a store's counters since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Reads answered from the cache without a storage round trip (coalesced
    /// or within `max_staleness`).
    pub hits: u64,
    /// Downloads that transferred and decoded a document.
    pub downloads: u64,
    /// Conditional downloads answered `NotModified` (nothing transferred).
    pub not_modified: u64,
    /// Upload calls made.
    pub uploads: u64,
    /// Uploads or deletes rejected because another writer got there first.
    pub conflicts: u64,
    /// Attempts started again after a conflict.
    pub retries: u64,
    /// Operations that ran out of attempts or time.
    pub give_ups: u64,
    /// Writes whose reply was lost (the storage answered `Unavailable`).
    pub lost_replies: u64,
    /// Lost-reply writes shown to have landed exactly once (answered
    /// `Ok`); the others were answered `Unavailable`.
    pub lost_replies_settled: u64,
    /// Gaps in the change stream of a watching store (see
    /// [`Options::watch`](crate::Options::watch)): each made every read
    /// revalidate until the stream was whole again.
    pub watch_gaps: u64,
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) hits: AtomicU64,
    pub(super) downloads: AtomicU64,
    pub(super) not_modified: AtomicU64,
    pub(super) uploads: AtomicU64,
    pub(super) conflicts: AtomicU64,
    pub(super) retries: AtomicU64,
    pub(super) give_ups: AtomicU64,
    pub(super) lost_replies: AtomicU64,
    pub(super) lost_replies_settled: AtomicU64,
}

pub(super) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub(super) fn snapshot(&self) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            hits: get(&self.hits),
            downloads: get(&self.downloads),
            not_modified: get(&self.not_modified),
            uploads: get(&self.uploads),
            conflicts: get(&self.conflicts),
            retries: get(&self.retries),
            give_ups: get(&self.give_ups),
            lost_replies: get(&self.lost_replies),
            lost_replies_settled: get(&self.lost_replies_settled),
            watch_gaps: 0,
        }
    }
}
