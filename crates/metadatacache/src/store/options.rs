//! How a [`Store`](super::Store) is configured.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::cache::Capacity;
use super::codec::{Codec, JsonCodec};
use super::retry::RetryPolicy;
use crate::storage::Storage;

type PathFn<K> = dyn Fn(&K) -> String + Send + Sync;
type InitFn<V> = dyn Fn() -> V + Send + Sync;

/// How a [`Store`](super::Store) is configured.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use metadatacache::{MemoryStorage, Options, RetryPolicy};
///
/// let opts = Options::<String, Vec<String>>::new(Arc::new(MemoryStorage::new()), |user| {
///     format!("users/{user}.json")
/// })
/// .max_attempts(20)
/// .init(Vec::new)
/// .max_staleness(Duration::from_millis(100))
/// .retry_policy(RetryPolicy::default().max_delay(Duration::from_millis(20)));
/// let store = metadatacache::Store::new(opts);
/// # drop(store);
/// ```
pub struct Options<K, V> {
    pub(super) storage: Arc<dyn Storage>,
    pub(super) path: Arc<PathFn<K>>,
    pub(super) max_attempts: usize,
    pub(super) init: Option<Arc<InitFn<V>>>,
    pub(super) max_staleness: Duration,
    pub(super) retry_policy: RetryPolicy,
    pub(super) codec: Arc<dyn Codec<V>>,
    pub(super) batching: bool,
    pub(super) optimistic: bool,
    pub(super) capacity: Capacity,
    pub(super) watch: bool,
}

impl<K, V> Options<K, V>
where
    V: Serialize + DeserializeOwned + 'static,
{
    /// Options over `storage`, with `path` mapping a key to its storage path.
    ///
    /// Defaults: 100 attempts, no init function, `max_staleness` zero (every
    /// read revalidates), [`RetryPolicy::default`], [`JsonCodec`].
    pub fn new(
        storage: Arc<dyn Storage>,
        path: impl Fn(&K) -> String + Send + Sync + 'static,
    ) -> Self {
        Options {
            storage,
            path: Arc::new(path),
            max_attempts: 100,
            init: None,
            max_staleness: Duration::ZERO,
            retry_policy: RetryPolicy::default(),
            codec: Arc::new(JsonCodec),
            batching: true,
            optimistic: true,
            capacity: Capacity::default(),
            watch: false,
        }
    }
}

impl<K, V> Options<K, V> {
    /// The most attempts one `update`, `remove` or `reset` makes before it
    /// gives up on conflicts (at least 1; default 100).
    #[must_use]
    pub fn max_attempts(mut self, n: usize) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// The contract's name for [`max_attempts`](Self::max_attempts): the
    /// most attempts, not the number of retries after the first.
    #[must_use]
    pub fn retries(self, n: usize) -> Self {
        self.max_attempts(n)
    }

    /// The value `update(.., create_if_not_found = true, ..)` starts from when
    /// the key is absent.
    #[must_use]
    pub fn init(mut self, f: impl Fn() -> V + Send + Sync + 'static) -> Self {
        self.init = Some(Arc::new(f));
        self
    }

    /// How old a cached value may be before a read revalidates it. Zero (the
    /// default) makes every `get` and `update` ask storage with a conditional
    /// download. A positive value trades freshness for round trips: a value
    /// changed by another replica may be seen up to this much later. Writes
    /// stay safe either way (compare-and-swap catches a stale etag).
    #[must_use]
    pub fn max_staleness(mut self, d: Duration) -> Self {
        self.max_staleness = d;
        self
    }

    /// Push invalidation (default off): follow the storage's change stream
    /// ([`Storage::watch`]) and answer `get`, and the read of an `update`,
    /// from memory — with no storage call — while the stream is whole and
    /// has reported no change to the path since the cached version was
    /// confirmed. A change drops the entry's trust (the next read
    /// revalidates); a gap in the stream (a reconnect, a lagging consumer,
    /// etcd compaction, an inotify overflow) drops every entry's until the
    /// stream is whole again, and is counted in [`Stats::watch_gaps`].
    ///
    /// The staleness this allows is the notification delay: a change made
    /// by another replica is seen once its notification arrived (usually
    /// milliseconds; see BENCHMARKS.md), where [`max_staleness`] allows a
    /// fixed age instead. Writes stay compare-and-swap, so a stale value
    /// can only cost a conflict and a retry, never a lost update. A caller
    /// that needs a linearizable read — one that sees every write completed
    /// before it started — takes the key's lock and calls
    /// [`KeyGuard::sync`](super::KeyGuard::sync), which always asks storage.
    ///
    /// Backends that cannot notify (S3) fall back to revalidating every
    /// read, and say so once in the log.
    ///
    /// [`max_staleness`]: Self::max_staleness
    /// [`Stats::watch_gaps`]: super::Stats::watch_gaps
    #[must_use]
    pub fn watch(mut self, on: bool) -> Self {
        self.watch = on;
        self
    }

    /// Backoff between conflicting attempts.
    #[must_use]
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry_policy = policy;
        self
    }

    /// Group commit (default on): updates of one key that queue up while an
    /// update holds its lock are applied one after another to the same value
    /// and written with a single compare-and-swap. Each caller gets its own
    /// outcome: an `f` that changes nothing or fails decides on the
    /// committed value and returns at once (`Ok` or its own error; in a batch
    /// written from an unconfirmed cached version, once the write confirms
    /// it), never with another caller's error; the callers that changed the value share
    /// the write's outcome; a conflict re-runs the batch on the fresh value.
    /// Off, every update writes on its own.
    #[must_use]
    pub fn batching(mut self, on: bool) -> Self {
        self.batching = on;
        self
    }

    /// Optimistic writes (default on): an `update` of a key whose cached
    /// version this store wrote or confirmed last runs `f` on the cached
    /// value and writes it with a
    /// compare-and-swap on the cached etag, without revalidating first: one
    /// round trip instead of two. The compare-and-swap is the revalidation:
    /// it lands only if storage still holds that version. When it does not
    /// (another replica wrote), or when `f` wants no write or fails on the
    /// unconfirmed value, the update revalidates and runs `f` again on what
    /// storage holds, so no outcome is ever decided on stale data. Where a
    /// refused write brings back the stored version
    /// ([`Capabilities::current_on_conflict`](crate::Capabilities::current_on_conflict)),
    /// `f` runs again on that version without a read. Elsewhere a key found
    /// changed elsewhere is revalidated first on its next update, until a
    /// revalidation finds it unchanged again. A batch (see
    /// [`batching`](Self::batching)) writes from the cached version the same
    /// way; a member that decides without a write on that version waits for
    /// the batch's write, and its decision stands only if the write lands.
    /// A watching store revalidates as without them.
    ///
    /// Off, every update starts with a conditional download.
    #[must_use]
    pub fn optimistic_writes(mut self, on: bool) -> Self {
        self.optimistic = on;
        self
    }

    /// Keep at most `n` cached values (default unbounded). Only idle
    /// entries are evicted — never one whose key is locked or awaited — so
    /// the cache may exceed `n` by the number of keys in use at once. An
    /// evicted key is downloaded again on its next read.
    #[must_use]
    pub fn capacity(mut self, n: usize) -> Self {
        self.capacity.entries = n;
        self
    }

    /// Keep cached documents up to about `bytes` of encoded size in total
    /// (default unbounded); evicts like [`capacity`](Self::capacity).
    #[must_use]
    pub fn capacity_bytes(mut self, bytes: usize) -> Self {
        self.capacity.bytes = bytes;
        self
    }

    /// How values are encoded (default [`JsonCodec`]).
    #[must_use]
    pub fn codec(mut self, codec: impl Codec<V>) -> Self {
        self.codec = Arc::new(codec);
        self
    }
}

impl<K, V> fmt::Debug for Options<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("storage", &self.storage.backend())
            .field("max_attempts", &self.max_attempts)
            .field("init", &self.init.is_some())
            .field("max_staleness", &self.max_staleness)
            .field("retry_policy", &self.retry_policy)
            .field("batching", &self.batching)
            .field("optimistic_writes", &self.optimistic)
            .field("capacity", &self.capacity)
            .field("watch", &self.watch)
            .finish_non_exhaustive()
    }
}
