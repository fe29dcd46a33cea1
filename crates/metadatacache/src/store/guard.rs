//! [`KeyGuard`]: the operations that need a key's lock.

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument;

use super::Store;
use super::batch::Waiter;
use super::cache::Cached;
use super::key_lock::KeyLockGuard;
use super::stats::{self, Counter};
use crate::error::{Error, ErrorKind, Result};
use crate::storage::{DownloadRequest, DownloadResponse};

#[derive(Debug, Clone, Copy)]
pub(super) struct Began {
    pub(super) at: Instant,
    pub(super) seq: u64,
}

/// Exclusive access to one key of a [`Store`], obtained with
/// [`Store::lock`]. Dropping the guard unlocks the key.
///
/// The guard sees the committed cached value plus, after [`set`](Self::set),
/// a value of its own that only [`persist`](Self::persist) commits. A value
/// set but not persisted is discarded when the guard is dropped, so nothing
/// uncommitted ever reaches the shared cache.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::sync::Arc;
/// use metadatacache::{MemoryStorage, Options, Store};
///
/// let store: Store<String, u32> =
///     Store::new(Options::new(Arc::new(MemoryStorage::new()), |k: &String| format!("{k}.json")));
/// let mut g = store.lock("hits".to_string()).await;
/// assert_eq!(g.get().await?, None);
/// g.set(1);
/// g.persist().await?;
/// assert_eq!(g.get().await?.as_deref(), Some(&1));
/// drop(g);
/// # Ok::<_, metadatacache::Error>(()) }).unwrap();
/// ```
pub struct KeyGuard<K: Eq + Hash + Clone, V> {
    pub(super) store: Store<K, V>,
    lock: KeyLockGuard<K, Waiter<V>>,
    pub(super) path: String,
    pub(super) staged: Option<Arc<V>>,
    /// When the write that brought the cached version back began: a
    /// refused compare-and-swap that returned the version it found (see
    /// [`Error::current`](crate::Error::current)).
    pub(super) refreshed: Option<Instant>,
}

impl<K: Eq + Hash + Clone + fmt::Display, V> fmt::Debug for KeyGuard<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyGuard")
            .field("key", &format_args!("{}", self.lock.key()))
            .field("path", &self.path)
            .field("staged", &self.staged.is_some())
            .finish()
    }
}

impl<K, V> KeyGuard<K, V>
where
    K: Eq + Hash + Clone + fmt::Display + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    pub(super) fn new(store: Store<K, V>, lock: KeyLockGuard<K, Waiter<V>>, path: String) -> Self {
        KeyGuard {
            store,
            lock,
            path,
            staged: None,
            refreshed: None,
        }
    }

    /// The locked key.
    pub fn key(&self) -> &K {
        self.lock.key()
    }

    /// The key's storage path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Syncs with storage, then returns the value: the one [`set`](Self::set)
    /// on this guard if any (and storage did not change meanwhile), else the
    /// committed one; `None` when the key is absent.
    ///
    /// # Errors
    /// Storage errors; [`ErrorKind::Codec`] for an undecodable document.
    ///
    /// # Cancel safety
    /// Cancel safe: a read changes nothing in storage, and the cache stays
    /// consistent with it.
    pub async fn get(&mut self) -> Result<Option<Arc<V>>> {
        let span = self.span("guard.get");
        async {
            let res = self
                .revalidate(Instant::now(), true)
                .await
                .map(|()| self.staged.clone().or_else(|| self.committed_value()));
            super::record_outcome(&res);
            res
        }
        .instrument(span)
        .await
    }

    /// Whether a value is cached for the key, without asking storage.
    pub fn is_cached(&self) -> bool {
        self.staged.is_some() || self.store.inner.cache().contains_key(self.key())
    }

    /// Sets the value this guard will [`persist`](Self::persist). Writes
    /// nothing and keeps the cached etag; a [`sync`](Self::sync) that finds
    /// a newer version in storage discards it.
    pub fn set(&mut self, value: V) {
        self.staged = Some(Arc::new(value));
    }

    /// Downloads the document if its etag differs from the cached one
    /// (a conditional download: `NotModified` transfers nothing).
    ///
    /// When storage has a newer version it replaces the cached value and
    /// discards a value [`set`](Self::set) on this guard; when the document is
    /// gone the cached value (and a value set for it) is dropped. For a key
    /// that storage does not hold and never held here, a value set on this
    /// guard stays, for [`persist`](Self::persist) to create.
    ///
    /// # Errors
    /// Storage errors; [`ErrorKind::Codec`] when the stored document cannot
    /// be decoded, in which case the cache keeps its last good value.
    ///
    /// # Cancel safety
    /// Cancel safe: a read changes nothing in storage, and the cache stays
    /// consistent with it.
    pub async fn sync(&mut self) -> Result<()> {
        let span = self.span("guard.sync");
        async {
            let res = self.sync_at().await.map(drop);
            super::record_outcome(&res);
            res
        }
        .instrument(span)
        .await
    }

    /// A span for operation `op` on this key.
    fn span(&self, op: &'static str) -> tracing::Span {
        tracing::debug_span!(
            "guard",
            op,
            key = %self.key(),
            path = %self.path,
            backend = self.store.inner.opts.storage.backend(),
            outcome = tracing::field::Empty
        )
    }

    /// [`sync`](Self::sync); returns when the round trip began (storage
    /// held what the cache now says at some moment after it).
    pub(super) async fn sync_at(&mut self) -> Result<Instant> {
        let inner = &self.store.inner;
        let cached_etag = inner.cache().get(self.key()).map(|c| Arc::clone(&c.etag));
        let req = DownloadRequest {
            path: self.path.clone(),
            if_none_match: cached_etag.iter().map(|e| e.to_string()).collect(),
        };
        let (start, res) = self.download(req).await;
        match res {
            Ok(resp) => {
                inner.counters.bump(Counter::Downloads);
                let value = inner.opts.codec.decode(&resp.content).map_err(|e| {
                    e.with_path(&self.path)
                        .with_backend(inner.opts.storage.backend())
                })?;
                self.staged = None;
                let size = resp.content.len();
                self.commit(Arc::new(value), resp.etag.into(), start, size);
                if cached_etag.is_some()
                    && let Some(c) = inner.cache().get_mut(self.key())
                {
                    c.changed_elsewhere = true;
                }
            }
            Err(e) if e.kind() == ErrorKind::NotModified => {
                inner.counters.bump(Counter::NotModified);
                if let Some(c) = inner.cache().get_mut(self.key()) {
                    c.validated = c.validated.max(start.at);
                    c.watch_seq = c.watch_seq.max(start.seq);
                    c.must_revalidate = false;
                    c.changed_elsewhere = false;
                }
            }
            // Deleted elsewhere: a value set on this guard was meant for
            // the version that is gone.
            Err(e) if e.kind() == ErrorKind::NotFound && cached_etag.is_some() => {
                self.staged = None;
                inner.cache().remove(self.key());
            }
            // Still absent: a value set for the new document stays, to be
            // persisted (created).
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(start.at)
    }

    /// Writes the guard's value (the one [`set`](Self::set), else the cached
    /// one) with compare-and-swap: `if_match` the cached etag, or create-only
    /// when there is none. On success the value and its new etag become the
    /// committed cache entry.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] when there is nothing to persist; a conflict
    /// kind (see [`Error::is_conflict`]) when another writer got there first;
    /// other storage errors. On a conflict that brought back the stored
    /// version ([`Error::current`]) and that version decodes, it becomes
    /// the committed cache entry and the value [`set`](Self::set) is
    /// dropped (it was meant for the version that lost: set it again from
    /// the new one before persisting again); on any other error the
    /// committed cache entry is unchanged.
    ///
    /// # Cancel safety
    /// Dropping the future before it completes may leave the write applied
    /// or not; the committed cache entry is unchanged, so the next sync
    /// sees what storage holds.
    pub async fn persist(&mut self) -> Result<()> {
        let span = self.span("guard.persist");
        async {
            let res = self.persist_staged().await;
            super::record_outcome(&res);
            res
        }
        .instrument(span)
        .await
    }

    async fn persist_staged(&mut self) -> Result<()> {
        let committed = self.committed();
        let value = match (&self.staged, &committed) {
            (Some(v), _) => Arc::clone(v),
            (None, Some((v, _))) => Arc::clone(v),
            (None, None) => {
                return Err(Error::not_found(format!(
                    "nothing to persist for key {}: no value set or cached",
                    self.key()
                ))
                .with_path(&self.path));
            }
        };
        self.write(value, committed.map(|(_, etag)| etag)).await?;
        self.staged = None;
        Ok(())
    }

    /// Revalidates unless a round trip that began after `call` already did
    /// (coalescing queued callers), or `allow_stale` and the entry is within
    /// `max_staleness`.
    pub(super) async fn revalidate(&mut self, call: Instant, allow_stale: bool) -> Result<()> {
        self.revalidate_at(call, allow_stale).await.map(drop)
    }

    /// [`revalidate`](Self::revalidate); returns when the round trip that
    /// confirmed the cached state began.
    pub(super) async fn revalidate_at(
        &mut self,
        call: Instant,
        allow_stale: bool,
    ) -> Result<Instant> {
        let inner = &self.store.inner;
        if let Some(watch) = &inner.watch {
            watch.start(&inner.opts.storage);
        }
        let fresh = inner.cache().get(self.key()).and_then(|c| {
            let fresh = !c.must_revalidate
                && (c.validated > call
                    || (allow_stale
                        && !inner.opts.max_staleness.is_zero()
                        && c.validated.elapsed() <= inner.opts.max_staleness)
                    || (allow_stale
                        && inner
                            .watch
                            .as_ref()
                            .is_some_and(|w| w.is_current(&self.path, &c.etag, c.watch_seq))));
            fresh.then_some(c.validated)
        });
        if let Some(validated) = fresh {
            inner.counters.bump(Counter::Hits);
            return Ok(validated);
        }
        self.sync_at().await
    }

    /// The committed value and etag, if the key is cached.
    pub(super) fn committed(&self) -> Option<(Arc<V>, Arc<str>)> {
        self.store
            .inner
            .cache()
            .get(self.key())
            .map(|c| (Arc::clone(&c.value), Arc::clone(&c.etag)))
    }

    pub(super) fn committed_value(&self) -> Option<Arc<V>> {
        self.store
            .inner
            .cache()
            .get(self.key())
            .map(|c| Arc::clone(&c.value))
    }

    /// Downloads, trying again after `Unavailable` or `TooEarly` with the
    /// store's backoff (a read changes nothing, so that is safe), up to
    /// [`RetryPolicy::read_attempts`](super::RetryPolicy::read_attempts)
    /// tries within its deadline. Returns when the last try began.
    async fn download(&self, req: DownloadRequest) -> (Began, Result<DownloadResponse>) {
        let inner = &self.store.inner;
        let policy = &inner.opts.retry_policy;
        let first = Instant::now();
        let mut attempt: u32 = 1;
        loop {
            let start = self.began();
            let storage = &inner.opts.storage;
            let res = if inner.combines() {
                inner.reads.call(storage, req.clone()).await
            } else {
                storage.download(req.clone()).await
            };
            stats::storage_call(inner.opts.storage.backend(), "download", start.at, &res);
            let delay = match &res {
                Err(e)
                    if matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::TooEarly)
                        && attempt < policy.max_read_attempts() =>
                {
                    policy.next_delay(attempt, e, first.elapsed())
                }
                _ => None,
            };
            let Some(delay) = delay else {
                return (start, res);
            };
            inner.counters.bump(Counter::ReadRetries);
            tracing::debug!(attempt, ?delay, path = %self.path, "read failed, trying again");
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            attempt += 1;
        }
    }

    /// When a storage call begins, for the entry it will confirm.
    pub(super) fn began(&self) -> Began {
        Began {
            at: Instant::now(),
            seq: self.store.inner.watch.as_ref().map_or(0, |w| w.seq()),
        }
    }

    pub(super) fn commit(&self, value: Arc<V>, etag: Arc<str>, began: Began, size: usize) {
        let inner = &self.store.inner;
        let mut entry = Cached::new(value, etag, began.at, began.seq, size);
        let mut cache = inner.cache();
        // Our own write does not show that others stopped writing the key.
        entry.changed_elsewhere = cache.get(self.key()).is_some_and(|c| c.changed_elsewhere);
        let old = cache.insert(self.key().clone(), entry, |k| inner.locks.users(k) > 0);
        drop(cache);
        drop(old);
    }

    /// Compare-and-swap delete; drops the cache entry. `Ok(false)` when the
    /// document was already gone.
    pub(super) async fn delete(&mut self, etag: &str) -> Result<bool> {
        let inner = &self.store.inner;
        let started = Instant::now();
        let res = inner
            .opts
            .storage
            .delete_if_match(&self.path, Some(etag))
            .await;
        stats::storage_call(inner.opts.storage.backend(), "delete", started, &res);
        let existed = match res {
            Ok(()) => true,
            Err(e) if e.kind() == ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        inner.cache().remove(self.key());
        self.staged = None;
        Ok(existed)
    }
}
