//! The typed cache over a [`Storage`](crate::Storage): [`Store`], its
//! [`Options`], the per-key [`KeyGuard`], group commit and the
//! read-modify-write loop.

use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument;

mod batch;
mod cache;
mod codec;
mod combine;
mod group_commit;
mod guard;
mod key_lock;
mod options;
mod retry;
mod stats;
mod watch;
mod write;

pub use self::codec::{Codec, JsonCodec};
pub use self::guard::KeyGuard;
pub use self::options::Options;
pub use self::retry::RetryPolicy;
pub use self::stats::Stats;

use self::batch::Waiter;
use self::cache::Cache;
use self::combine::Combiner;
use self::key_lock::KeyLocks;
use self::stats::{Counter, Counters};
use self::watch::Watch;
use crate::error::{Error, ErrorKind, Result};

/// A typed in-memory cache of documents in a shared [`Storage`](crate::Storage), with
/// per-key locking and compare-and-swap writes.
///
/// Cheap to clone: clones share the cache, the lock table and the counters.
/// Several `Store`s (in one process or many) may share one storage; they never
/// lose each other's changes made through [`update`](Store::update).
pub struct Store<K, V> {
    inner: Arc<Inner<K, V>>,
}

struct Inner<K, V> {
    opts: Options<K, V>,
    locks: Arc<KeyLocks<K, Waiter<V>>>,
    cache: Mutex<Cache<K, V>>,
    counters: Counters,
    /// Push invalidation, with [`Options::watch`].
    watch: Option<Arc<Watch>>,
    /// Writes, and reads, of different keys sent together, with
    /// [`Options::batching`].
    writes: Arc<Combiner<crate::storage::UploadRequest>>,
    reads: Arc<Combiner<crate::storage::DownloadRequest>>,
}

impl<K, V> Drop for Inner<K, V> {
    fn drop(&mut self) {
        if let Some(watch) = &self.watch {
            watch.stop();
        }
    }
}

impl<K, V> Inner<K, V> {
    /// Whether calls of different keys are combined (see `combine`).
    fn combines(&self) -> bool {
        self.opts.batching && self.opts.storage.capabilities().combined_calls
    }

    fn cache(&self) -> MutexGuard<'_, Cache<K, V>> {
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
        let backend = opts.storage.backend();
        let watch = opts.watch.then(Arc::default);
        Store {
            inner: Arc::new(Inner {
                opts,
                locks: Arc::new(KeyLocks::new()),
                cache: Mutex::new(Cache::new(capacity)),
                counters: Counters::new(backend),
                watch,
                writes: Arc::default(),
                reads: Arc::default(),
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
        tracing::Span::current().record("path", path.as_str());
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
    ///
    /// # Cancel safety
    /// Cancel safe: a dropped call changes nothing in storage and leaves
    /// the cache consistent with it.
    pub async fn get(&self, key: K) -> Result<Option<Arc<V>>> {
        let call = Instant::now();
        let span = tracing::debug_span!(
            "get",
            key = %key,
            path = tracing::field::Empty,
            backend = self.inner.opts.storage.backend(),
            outcome = tracing::field::Empty
        );
        async {
            let mut g = self.lock(key).await;
            let res = g.revalidate(call, true).await.map(|()| g.committed_value());
            record_outcome(&res);
            stats::operation(self.inner.opts.storage.backend(), "get", call, &res);
            res
        }
        .instrument(span)
        .await
    }

    /// Read-modify-write of `key` with compare-and-swap, retried on conflict.
    ///
    /// `f` gets an owned copy of the current value (or `init()` when absent
    /// and `create_if_not_found`) and returns the new value and whether to
    /// persist it. It may run several times: once per attempt, and once
    /// more when an optimistic first run on the cached value
    /// ([`Options::optimistic_writes`]) turns out to be stale. The cache
    /// changes only when a write succeeds, so an error from `f`, a skipped
    /// persist or a failed write leaves it exactly as committed storage has it.
    ///
    /// # Errors
    /// - an error returned by `f`, unchanged;
    /// - [`ErrorKind::NotFound`] when the key is absent and
    ///   `create_if_not_found` is false;
    /// - [`ErrorKind::InvalidInput`] when creating without an init function;
    /// - after [`Options::max_attempts`] conflicting attempts (or the retry deadline), an
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
            path = tracing::field::Empty,
            backend = self.inner.opts.storage.backend(),
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
            stats::operation(self.inner.opts.storage.backend(), "update", call, &res);
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
    /// Storage errors; after [`Options::max_attempts`] conflicting attempts, an error naming
    /// the key.
    ///
    /// # Cancel safety
    /// Dropping the future before it completes may leave the write applied
    /// or not; the cache stays consistent with storage either way.
    pub async fn reset(&self, key: K, value: V) -> Result<()> {
        let call = Instant::now();
        let span = tracing::debug_span!(
            "reset",
            key = %key,
            path = tracing::field::Empty,
            backend = self.inner.opts.storage.backend(),
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
            stats::operation(self.inner.opts.storage.backend(), "reset", call, &res);
            res
        }
        .instrument(span)
        .await
    }

    /// Deletes `key` from storage (compare-and-swap on the etag storage
    /// reports for it, without decoding the document, retried on conflict)
    /// and drops it from the cache.
    ///
    /// Returns `true` if the document existed.
    ///
    /// # Errors
    /// Storage errors; after [`Options::max_attempts`] conflicting attempts, an error naming
    /// the key.
    ///
    /// # Cancel safety
    /// Dropping the future before it completes may leave the document
    /// deleted or not; the cache stays consistent with storage either way.
    pub async fn remove(&self, key: K) -> Result<bool> {
        let call = Instant::now();
        let span = tracing::debug_span!(
            "remove",
            key = %key,
            path = tracing::field::Empty,
            backend = self.inner.opts.storage.backend(),
            attempts = tracing::field::Empty,
            outcome = tracing::field::Empty
        );
        async {
            let mut g = self.lock(key).await;
            let mut attempt: usize = 0;
            let res = loop {
                attempt += 1;
                tracing::Span::current().record("attempts", attempt);
                // Storage's own etag, never a bounded-staleness copy's, and
                // without decoding: a document that no longer decodes can
                // be removed too.
                let etag = match self.inner.opts.storage.stat(g.path()).await {
                    Ok(info) if info.is_file() => info.etag,
                    Ok(_) => {
                        break Err(Error::invalid_input("a directory exists at the key's path")
                            .with_path(g.path()));
                    }
                    Err(e) if e.kind() == ErrorKind::NotFound => {
                        self.inner.cache().remove(g.key());
                        break Ok(false);
                    }
                    Err(e) => break Err(e),
                };
                let etag = match etag {
                    Some(etag) => Arc::<str>::from(etag),
                    // A backend whose listing carries no etag: read it.
                    None => {
                        g.sync().await?;
                        let Some((_, etag)) = g.committed() else {
                            break Ok(false);
                        };
                        etag
                    }
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
            stats::operation(self.inner.opts.storage.backend(), "remove", call, &res);
            res
        }
        .instrument(span)
        .await
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let mut stats = self.inner.counters.snapshot();
        if let Some(watch) = &self.inner.watch {
            stats.watch_gaps = watch.gaps.load(std::sync::atomic::Ordering::Relaxed);
        }
        stats
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

    fn init_value(&self, key: &K, path: &str) -> Result<V> {
        match &self.inner.opts.init {
            Some(init) => Ok(init()),
            None => Err(Error::invalid_input(format!(
                "cannot create key {key}: Options::init was not set"
            ))
            .with_path(path)),
        }
    }

    /// Counts a conflict and waits before the next attempt, or gives up.
    async fn after_conflict(
        &self,
        op: &str,
        g: &KeyGuard<K, V>,
        call: Instant,
        attempt: usize,
        err: Error,
    ) -> Result<()> {
        let c = &self.inner.counters;
        c.bump(Counter::Conflicts);
        let opts = &self.inner.opts;
        let retry = u32::try_from(attempt).unwrap_or(u32::MAX);
        let delay = if attempt >= opts.max_attempts {
            None
        } else {
            opts.retry_policy.next_delay(retry, &err, call.elapsed())
        };
        let Some(delay) = delay else {
            c.bump(Counter::GiveUps);
            let kind = err.kind();
            // The conflict follows as the source, which the one-line form
            // prints after the message.
            let msg = format!(
                "{op} of key {} gave up after {attempt} attempt{}; last conflict",
                g.key(),
                if attempt == 1 { "" } else { "s" },
            );
            let backend = opts.storage.backend();
            return Err(Error::new(kind, msg)
                .with_path(g.path())
                .with_backend(backend)
                .with_source(err));
        };
        c.bump(Counter::Retries);
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
