//! The typed cache over a [`Storage`]: [`Store`], [`Options`] and the
//! read-modify-write loop.

use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument;

use crate::batch::Waiter;
use crate::cache::{Cache, Capacity};
use crate::codec::{Codec, JsonCodec};
use crate::error::{Error, ErrorKind, Result};
use crate::guard::KeyGuard;
use crate::key_lock::KeyLocks;
use crate::retry::RetryPolicy;
use crate::stats::{Counters, Stats, bump};
use crate::storage::Storage;

type PathFn<K> = dyn Fn(&K) -> String + Send + Sync;
type InitFn<V> = dyn Fn() -> V + Send + Sync;

/// How a [`Store`] is configured.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use metadatacache::{MemoryStorage, Options, RetryPolicy};
///
/// let opts = Options::<String, Vec<String>>::new(Arc::new(MemoryStorage::new()), |user| {
///     format!("users/{user}.json")
/// })
/// .retries(20)
/// .init(Vec::new)
/// .max_staleness(Duration::from_millis(100))
/// .retry_policy(RetryPolicy::default().max_delay(Duration::from_millis(20)));
/// let store = metadatacache::Store::new(opts);
/// # drop(store);
/// ```
pub struct Options<K, V> {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) path: Arc<PathFn<K>>,
    pub(crate) retries: usize,
    pub(crate) init: Option<Arc<InitFn<V>>>,
    pub(crate) max_staleness: Duration,
    pub(crate) retry_policy: RetryPolicy,
    pub(crate) codec: Arc<dyn Codec<V>>,
    pub(crate) batching: bool,
    pub(crate) capacity: Capacity,
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
            retries: 100,
            init: None,
            max_staleness: Duration::ZERO,
            retry_policy: RetryPolicy::default(),
            codec: Arc::new(JsonCodec),
            batching: true,
            capacity: Capacity::default(),
        }
    }
}

impl<K, V> Options<K, V> {
    /// Maximum number of attempts of one `update` or `remove` (at least 1).
    #[must_use]
    pub fn retries(mut self, n: usize) -> Self {
        self.retries = n.max(1);
        self
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
    /// committed value and returns at once (`Ok` or its own error), never
    /// with another caller's error; the callers that changed the value share
    /// the write's outcome; a conflict re-runs the batch on the fresh value.
    /// Off, every update writes on its own.
    #[must_use]
    pub fn batching(mut self, on: bool) -> Self {
        self.batching = on;
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
            .field("retries", &self.retries)
            .field("init", &self.init.is_some())
            .field("max_staleness", &self.max_staleness)
            .field("retry_policy", &self.retry_policy)
            .field("batching", &self.batching)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// A typed in-memory cache of documents in a shared [`Storage`], with
/// per-key locking and compare-and-swap writes.
///
/// Cheap to clone: clones share the cache, the lock table and the counters.
/// Several `Store`s (in one process or many) may share one storage; they never
/// lose each other's changes made through [`update`](Store::update).
pub struct Store<K, V> {
    pub(crate) inner: Arc<Inner<K, V>>,
}

pub(crate) struct Inner<K, V> {
    pub(crate) opts: Options<K, V>,
    pub(crate) locks: Arc<KeyLocks<K, Waiter<V>>>,
    pub(crate) cache: Mutex<Cache<K, V>>,
    pub(crate) counters: Counters,
}

impl<K, V> Inner<K, V> {
    pub(crate) fn cache(&self) -> MutexGuard<'_, Cache<K, V>> {
        // Every critical section is one map operation; poisoning cannot leave
        // the map inconsistent.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<K, V> Clone for Store<K, V> {
    fn clone(&self) -> Self {
        Store {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K: Eq + Hash + Clone, V> fmt::Debug for Store<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("opts", &self.inner.opts)
            .field("locked_keys", &self.inner.locks.len())
            .field("cached_keys", &self.inner.cache().len())
            .finish()
    }
}

impl<K, V> Store<K, V>
where
    K: Eq + Hash + Clone + fmt::Display + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    /// A store with an empty cache.
    pub fn new(opts: Options<K, V>) -> Self {
        let capacity = opts.capacity;
        Store {
            inner: Arc::new(Inner {
                opts,
                locks: Arc::new(KeyLocks::new()),
                cache: Mutex::new(Cache::new(capacity)),
                counters: Counters::default(),
            }),
        }
    }

    /// Takes the lock on `key`; the returned guard gives access to the cached
    /// entry and unlocks when dropped.
    ///
    /// # Cancel safety
    /// Cancel safe: a cancelled call leaves nothing locked.
    pub async fn lock(&self, key: K) -> KeyGuard<K, V> {
        let path = (self.inner.opts.path)(&key);
        let lock = self.inner.locks.lock(key).await;
        KeyGuard::new(self.clone(), lock, path)
    }

    /// The current value of `key`, `None` when it is absent in storage.
    ///
    /// Revalidates the cached copy with a conditional download, unless
    /// another task's revalidation that began after this call already did, or
    /// the copy is younger than [`Options::max_staleness`].
    ///
    /// # Errors
    /// Storage errors; [`ErrorKind::Codec`] when the stored document cannot
    /// be decoded (the cache keeps its last good value).
    pub async fn get(&self, key: K) -> Result<Option<Arc<V>>> {
        let call = Instant::now();
        let span = tracing::debug_span!("get", key = %key, outcome = tracing::field::Empty);
        async {
            let mut g = self.lock(key).await;
            let res = g.revalidate(call, true).await.map(|()| g.committed_value());
            record_outcome(&res);
            res
        }
        .instrument(span)
        .await
    }

    /// Read-modify-write of `key` with compare-and-swap, retried on conflict.
    ///
    /// `f` gets an owned copy of the current value (or `init()` when absent
    /// and `create_if_not_found`) and returns the new value and whether to
    /// persist it. It may run several times: once per attempt. The cache
    /// changes only when a write succeeds, so an error from `f`, a skipped
    /// persist or a failed write leaves it exactly as committed storage has it.
    ///
    /// # Errors
    /// - an error returned by `f`, unchanged;
    /// - [`ErrorKind::NotFound`] when the key is absent and
    ///   `create_if_not_found` is false;
    /// - [`ErrorKind::InvalidInput`] when creating without an init function;
    /// - after `retries` conflicting attempts (or the retry deadline), an
    ///   error of the last conflict's kind naming the key and the attempts;
    /// - [`ErrorKind::Unavailable`]: the write may or may not have been
    ///   applied, at most once;
    /// - any other storage error: nothing was applied.
    ///
    /// # Cancel safety
    /// Dropping the future before it completes may leave the write applied or
    /// not; the cache stays consistent with storage either way.
    pub async fn update<F>(&self, key: K, create_if_not_found: bool, f: F) -> Result<()>
    where
        F: FnMut(V) -> Result<(V, bool)> + Send,
    {
        let call = Instant::now();
        let span = tracing::debug_span!(
            "update",
            key = %key,
            attempts = tracing::field::Empty,
            batch = tracing::field::Empty,
            outcome = tracing::field::Empty
        );
        async {
            let res = if self.inner.opts.batching {
                self.update_batched(key, create_if_not_found, call, f).await
            } else {
                let mut f = f;
                let mut g = self.lock(key).await;
                self.lead(&mut g, create_if_not_found, call, &mut f).await
            };
            record_outcome(&res);
            res
        }
        .instrument(span)
        .await
    }

    /// Overwrites `key` with `value`, whatever storage holds now — also a
    /// document that no longer decodes, which [`update`](Self::update)
    /// refuses to touch. Still a compare-and-swap (on the stored version's
    /// etag), retried on conflict, so a concurrent write is overwritten only
    /// if it landed first.
    ///
    /// # Errors
    /// Storage errors; after `retries` conflicting attempts, an error naming
    /// the key.
    pub async fn reset(&self, key: K, value: V) -> Result<()> {
        let call = Instant::now();
        let span = tracing::debug_span!(
            "reset",
            key = %key,
            attempts = tracing::field::Empty,
            outcome = tracing::field::Empty
        );
        async {
            let mut g = self.lock(key).await;
            let value = Arc::new(value);
            let mut attempt: usize = 0;
            let res = loop {
                attempt += 1;
                tracing::Span::current().record("attempts", attempt);
                // The raw etag: no decoding of what is there.
                let etag = match self.inner.opts.storage.stat(g.path()).await {
                    Ok(info) if info.is_file() => info.etag.map(Arc::<str>::from),
                    Ok(_) => {
                        break Err(Error::invalid_input("a directory exists at the key's path")
                            .with_path(g.path()));
                    }
                    Err(e) if e.kind() == ErrorKind::NotFound => None,
                    Err(e) => break Err(e),
                };
                match g.write(Arc::clone(&value), etag).await {
                    Ok(()) => break Ok(()),
                    Err(e) if e.is_conflict() => {
                        self.after_conflict("reset", &g, call, attempt, e).await?;
                    }
                    Err(e) => break Err(e),
                }
            };
            record_outcome(&res);
            res
        }
        .instrument(span)
        .await
    }

    /// Deletes `key` from storage (compare-and-swap on the etag it last saw,
    /// retried on conflict) and drops it from the cache.
    ///
    /// Returns `true` if the document existed.
    ///
    /// # Errors
    /// Storage errors; after `retries` conflicting attempts, an error naming
    /// the key.
    pub async fn remove(&self, key: K) -> Result<bool> {
        let call = Instant::now();
        let span = tracing::debug_span!(
            "remove",
            key = %key,
            attempts = tracing::field::Empty,
            outcome = tracing::field::Empty
        );
        async {
            let mut g = self.lock(key).await;
            let mut attempt: usize = 0;
            let res = loop {
                attempt += 1;
                tracing::Span::current().record("attempts", attempt);
                // Never trust a bounded-staleness copy to say "absent".
                if attempt == 1 {
                    g.revalidate(call, false).await?;
                } else {
                    g.sync().await?;
                }
                let Some((_, etag)) = g.committed() else {
                    break Ok(false);
                };
                match g.delete(&etag).await {
                    Ok(existed) => break Ok(existed),
                    Err(e) if e.is_conflict() => {
                        self.after_conflict("remove", &g, call, attempt, e).await?;
                    }
                    Err(e) => break Err(e),
                }
            };
            record_outcome(&res);
            res
        }
        .instrument(span)
        .await
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.inner.counters.snapshot()
    }

    /// How many keys are locked or waited for right now. Keys leave the lock
    /// table as soon as nobody holds or waits for them.
    pub fn locked_keys(&self) -> usize {
        self.inner.locks.len()
    }

    /// How many tasks hold or wait for the lock on `key` right now.
    pub fn lock_users(&self, key: &K) -> usize {
        self.inner.locks.users(key)
    }

    /// How many keys have a cached value.
    pub fn cached_keys(&self) -> usize {
        self.inner.cache().len()
    }

    /// Approximate bytes of cached documents (their encoded size).
    pub fn cached_bytes(&self) -> usize {
        self.inner.cache().bytes()
    }

    /// Drops the cached values of all keys nobody holds or waits for (the
    /// next read of each downloads it). A key in use keeps its entry, so
    /// that a [`KeyGuard`] holding it is not pulled from under its feet,
    /// but its next read revalidates.
    pub fn clear_cache(&self) {
        let locks = &self.inner.locks;
        self.inner.cache().clear(|k| locks.users(k) > 0);
    }

    pub(crate) fn init_value(&self, g: &KeyGuard<K, V>) -> Result<V> {
        match &self.inner.opts.init {
            Some(init) => Ok(init()),
            None => Err(Error::invalid_input(format!(
                "cannot create key {}: Options::init was not set",
                g.key()
            ))
            .with_path(g.path())),
        }
    }

    /// Counts a conflict and waits before the next attempt, or gives up.
    pub(crate) async fn after_conflict(
        &self,
        op: &str,
        g: &KeyGuard<K, V>,
        call: Instant,
        attempt: usize,
        err: Error,
    ) -> Result<()> {
        let c = &self.inner.counters;
        bump(&c.conflicts);
        let opts = &self.inner.opts;
        let retry = u32::try_from(attempt).unwrap_or(u32::MAX);
        let delay = if attempt >= opts.retries {
            None
        } else {
            opts.retry_policy.next_delay(retry, &err, call.elapsed())
        };
        let Some(delay) = delay else {
            bump(&c.give_ups);
            let kind = err.kind();
            let msg = format!(
                "{op} of key {} gave up after {attempt} attempt{}; last conflict: {err}",
                g.key(),
                if attempt == 1 { "" } else { "s" },
            );
            return Err(Error::new(kind, msg).with_path(g.path()).with_source(err));
        };
        bump(&c.retries);
        tracing::trace!(attempt, ?delay, error = %err, "conflict, retrying");
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok(())
    }
}

fn record_outcome<T>(res: &Result<T>) {
    let span = tracing::Span::current();
    match res {
        Ok(_) => span.record("outcome", "ok"),
        Err(e) if e.kind() == ErrorKind::NotFound => span.record("outcome", "not found"),
        Err(e) => span.record("outcome", tracing::field::display(e)),
    };
}
