//! [`KeyGuard`]: the operations that need a key's lock.

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::batch::Member;
use crate::cache::Cached;
use crate::error::{Error, ErrorKind, Result};
use crate::key_lock::KeyLockGuard;
use crate::stats::bump;
use crate::storage::{DownloadRequest, UploadRequest, parent};
use crate::store::Store;

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
    store: Store<K, V>,
    lock: KeyLockGuard<K, Member<V>>,
    path: String,
    staged: Option<Arc<V>>,
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
    pub(crate) fn new(store: Store<K, V>, lock: KeyLockGuard<K, Member<V>>, path: String) -> Self {
        KeyGuard {
            store,
            lock,
            path,
            staged: None,
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
    pub async fn get(&mut self) -> Result<Option<Arc<V>>> {
        self.revalidate(Instant::now(), true).await?;
        Ok(self.staged.clone().or_else(|| self.committed_value()))
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
    /// gone the cached value is dropped.
    ///
    /// # Errors
    /// Storage errors; [`ErrorKind::Codec`] when the stored document cannot
    /// be decoded, in which case the cache keeps its last good value.
    pub async fn sync(&mut self) -> Result<()> {
        let inner = &self.store.inner;
        let cached_etag = inner.cache().get(self.key()).map(|c| Arc::clone(&c.etag));
        let req = DownloadRequest {
            path: self.path.clone(),
            if_none_match: cached_etag.iter().map(|e| e.to_string()).collect(),
        };
        let start = Instant::now();
        match inner.opts.storage.download(req).await {
            Ok(resp) => {
                bump(&inner.counters.downloads);
                let value = inner.opts.codec.decode(&resp.content).map_err(|e| {
                    e.with_path(&self.path)
                        .with_backend(inner.opts.storage.backend())
                })?;
                self.staged = None;
                let size = resp.content.len();
                self.commit(Arc::new(value), resp.etag.into(), start, size);
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::NotModified => {
                bump(&inner.counters.not_modified);
                if let Some(c) = inner.cache().get_mut(self.key()) {
                    c.validated = c.validated.max(start);
                }
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                inner.cache().remove(self.key());
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Writes the guard's value (the one [`set`](Self::set), else the cached
    /// one) with compare-and-swap: `if_match` the cached etag, or create-only
    /// when there is none. On success the value and its new etag become the
    /// committed cache entry.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] when there is nothing to persist; a conflict
    /// kind (see [`Error::is_conflict`]) when another writer got there first;
    /// other storage errors. The committed cache entry is unchanged on error.
    pub async fn persist(&mut self) -> Result<()> {
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
    pub(crate) async fn revalidate(&mut self, call: Instant, allow_stale: bool) -> Result<()> {
        let inner = &self.store.inner;
        let fresh = inner.cache().get(self.key()).is_some_and(|c| {
            c.validated > call
                || (allow_stale
                    && !inner.opts.max_staleness.is_zero()
                    && c.validated.elapsed() <= inner.opts.max_staleness)
        });
        if fresh {
            bump(&inner.counters.hits);
            return Ok(());
        }
        self.sync().await
    }

    /// The committed value and etag, if the key is cached.
    pub(crate) fn committed(&self) -> Option<(Arc<V>, Arc<str>)> {
        self.store
            .inner
            .cache()
            .get(self.key())
            .map(|c| (Arc::clone(&c.value), Arc::clone(&c.etag)))
    }

    pub(crate) fn committed_value(&self) -> Option<Arc<V>> {
        self.store
            .inner
            .cache()
            .get(self.key())
            .map(|c| Arc::clone(&c.value))
    }

    fn commit(&self, value: Arc<V>, etag: Arc<str>, validated: Instant, size: usize) {
        let inner = &self.store.inner;
        let entry = Cached::new(value, etag, validated, size);
        inner
            .cache()
            .insert(self.key().clone(), entry, |k| inner.locks.users(k) > 0);
    }

    /// Compare-and-swap write of `value` over `etag` (create-only if `None`);
    /// commits to the cache on success only.
    pub(crate) async fn write(&mut self, value: Arc<V>, etag: Option<Arc<str>>) -> Result<()> {
        let inner = &self.store.inner;
        let storage = &inner.opts.storage;
        let content = inner
            .opts
            .codec
            .encode(&value)
            .map_err(|e| e.with_path(&self.path))?;
        let mut req = UploadRequest::new(self.path.clone(), content);
        match &etag {
            Some(etag) => req.if_match = Some(etag.to_string()),
            None => {
                // An existing document's directory exists; only a create may
                // need one.
                let dir = parent(&self.path);
                if !matches!(dir, "" | "." | "/") {
                    storage.make_dir_if_not_exist(dir).await.map_err(|e| {
                        // A document where the directory should be is no
                        // conflict to retry: the key can never be created.
                        if e.kind() == ErrorKind::AlreadyExists {
                            Error::invalid_input(format!(
                                "cannot create key {}: a parent of its path is a document",
                                self.key()
                            ))
                            .with_path(&self.path)
                            .with_source(e)
                        } else {
                            e
                        }
                    })?;
                }
                req.if_none_match = vec!["*".to_owned()];
            }
        }
        let token = storage
            .stores_write_tokens()
            .then(|| format!("{:032x}", fastrand::u128(..)));
        req.write_token.clone_from(&token);
        let size = req.content.len();
        let start = Instant::now();
        bump(&inner.counters.uploads);
        match storage.upload(req).await {
            Ok(resp) => {
                self.commit(value, resp.etag.into(), start, size);
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::Unavailable && token.is_some() => {
                let token = token.unwrap_or_default();
                match self.resolve_lost_reply(&token, etag.as_deref()).await {
                    Some(Ok(etag)) => {
                        self.commit(value, etag.into(), start, size);
                        Ok(())
                    }
                    // Certainly not applied: a conflict kind, so the update
                    // loop syncs and runs `f` again.
                    Some(Err(())) => Err(Error::new(
                        ErrorKind::Aborted,
                        "the write's reply was lost and it did not land",
                    )
                    .with_path(&self.path)
                    .with_source(e)),
                    None => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// After a write whose reply was lost: `Some(Ok(etag))` if the stored
    /// version carries our write token (it landed), `Some(Err(()))` if the
    /// version we wrote over is still there (it did not), `None` when it
    /// cannot be told (someone else wrote since, or storage is still
    /// unreachable). Only for backends that store write tokens.
    async fn resolve_lost_reply(
        &self,
        token: &str,
        over: Option<&str>,
    ) -> Option<Result<String, ()>> {
        let storage = &self.store.inner.opts.storage;
        match storage.download(DownloadRequest::new(&self.path)).await {
            Ok(d) if d.write_token.as_deref() == Some(token) => Some(Ok(d.etag)),
            Ok(d) if Some(d.etag.as_str()) == over => Some(Err(())),
            // A create that did not land (or landed and was deleted since:
            // either way no version holds it now).
            Err(e) if e.kind() == ErrorKind::NotFound && over.is_none() => Some(Err(())),
            _ => None,
        }
    }

    /// Compare-and-swap delete; drops the cache entry. `Ok(false)` when the
    /// document was already gone.
    pub(crate) async fn delete(&mut self, etag: &str) -> Result<bool> {
        let inner = &self.store.inner;
        let res = inner
            .opts
            .storage
            .delete_if_match(&self.path, Some(etag))
            .await;
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
