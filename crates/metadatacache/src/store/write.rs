//! The write path of a [`KeyGuard`]: a compare-and-swap upload, and the
//! settling of a write whose reply was lost.

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::KeyGuard;
use super::guard::Began;
use super::stats::{self, Counter};
use crate::error::{Error, ErrorKind, Result};
use crate::storage::{DownloadRequest, DownloadResponse, UploadRequest, new_write_token, parent};

/// How often a write whose reply was lost is sent again to fence it (see
/// [`KeyGuard::settle_lost_write`]).
const RESENDS: u32 = 3;

/// When a storage call began: the instant (for coalescing and staleness)
/// and the watch's notification number (for push invalidation).
/// What a write sent, to send it again after its reply was lost.
struct Sent {
    content: Bytes,
    /// The `if_match` etag; `None` for a create.
    over: Option<Arc<str>>,
    token: Option<String>,
}

impl<K, V> KeyGuard<K, V>
where
    K: Eq + Hash + Clone + fmt::Display + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    /// Compare-and-swap write of `value` over `etag` (create-only if `None`);
    /// commits to the cache on success only.
    ///
    /// A write whose reply is lost (`Unavailable`) is settled where the
    /// backend allows it (see [`settle_lost_write`](Self::settle_lost_write)):
    /// `Ok` only when it certainly landed, exactly once; otherwise the
    /// `Unavailable` stands.
    pub(super) async fn write(&mut self, value: Arc<V>, etag: Option<Arc<str>>) -> Result<()> {
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
        let caps = storage.capabilities();
        if caps.write_tokens || caps.unique_etags {
            req.write_token = Some(new_write_token());
        }
        let sent = Sent {
            content: req.content.clone(),
            over: etag.clone(),
            token: req.write_token.clone(),
        };
        let size = sent.content.len();
        let start = self.began();
        inner.counters.bump(Counter::Uploads);
        let res = if inner.combines() {
            inner.writes.call(storage, req).await
        } else {
            storage.upload(req).await
        };
        stats::storage_call(storage.backend(), "upload", start.at, &res);
        match res {
            Ok(resp) => {
                self.commit(value, resp.etag.into(), start, size);
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::Unavailable => {
                inner.counters.bump(Counter::LostReplies);
                match self.settle_lost_write(sent).await {
                    Some(etag) => {
                        inner.counters.bump(Counter::LostRepliesSettled);
                        self.commit(value, etag.into(), start, size);
                        Ok(())
                    }
                    None => Err(e),
                }
            }
            Err(e) => {
                let Some(current) = e.current().filter(|_| e.is_conflict()) else {
                    return Err(e);
                };
                // Refused by the version this very write made: a layer
                // below sent it twice (a client's own retry) and reports
                // the second copy's refusal. It landed, once.
                if sent.token.is_some() && current.write_token == sent.token {
                    let etag = current.etag.as_str().into();
                    self.commit(value, etag, start, size);
                    return Ok(());
                }
                self.install_current(current, start);
                Err(e)
            }
        }
    }

    /// Caches the version that refused a write (began at `start`), as a
    /// download of it would, when it decodes; a value set on the guard was
    /// meant for the version that lost.
    fn install_current(&mut self, current: &DownloadResponse, start: Began) {
        let inner = &self.store.inner;
        let Ok(value) = inner.opts.codec.decode(&current.content) else {
            // The next read reports what is wrong with it.
            return;
        };
        self.staged = None;
        let size = current.content.len();
        self.commit(Arc::new(value), current.etag.as_str().into(), start, size);
        if let Some(c) = inner.cache().get_mut(self.key()) {
            c.changed_elsewhere = true;
        }
        inner.counters.bump(Counter::ConflictVersions);
        self.refreshed = Some(start.at);
    }

    /// After a write whose reply was lost: `Some(etag)` when it certainly
    /// landed, exactly once; `None` when that cannot be told (the write may
    /// or may not be applied, and may still land later).
    ///
    /// A read alone never proves that a write will not land later: it may
    /// sit in a queue or a socket buffer. So the write is first *fenced*:
    /// on a backend whose etags never repeat ([`Capabilities::unique_etags`](crate::Capabilities::unique_etags))
    /// the very same write (same content, token and `if_match`) is sent
    /// again. Of all its copies at most one can land, because the first to
    /// land moves the etag away from `if_match` for good. A copy answered
    /// `Ok` is the one that landed. A copy refused by its precondition means
    /// the etag moved: if the stored version carries our token
    /// ([`Capabilities::write_tokens`](crate::Capabilities::write_tokens)) one of our copies made it; if not,
    /// another writer's version is there, and ours may have landed before it
    /// or never: `None`.
    ///
    /// Creates are not resent: a document deleted meanwhile would let a
    /// second copy land too. The stored version carrying our token proves
    /// the one copy landed; otherwise `None`.
    async fn settle_lost_write(&self, sent: Sent) -> Option<String> {
        let inner = &self.store.inner;
        let storage = &inner.opts.storage;
        let caps = storage.capabilities();
        let token = sent.token?;
        if let Some(over) = sent.over.as_deref().filter(|_| caps.unique_etags) {
            for resend in 1..=RESENDS {
                let delay = inner.opts.retry_policy.delay(resend, None);
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let req = UploadRequest {
                    if_match: Some(over.to_owned()),
                    write_token: Some(token.clone()),
                    ..UploadRequest::new(self.path.clone(), sent.content.clone())
                };
                inner.counters.bump(Counter::Uploads);
                let started = Instant::now();
                let res = storage.upload(req).await;
                stats::storage_call(storage.backend(), "upload", started, &res);
                match res {
                    Ok(resp) => return Some(resp.etag),
                    // Not sent, or turned away unprocessed: send it again.
                    Err(e)
                        if matches!(
                            e.kind(),
                            ErrorKind::Unavailable | ErrorKind::TooEarly | ErrorKind::Aborted
                        ) => {}
                    // Refused by its precondition: the etag moved away from
                    // `over`, so none of the copies can land any more. Which
                    // one is stored? Any other refusal (access, a bad
                    // request) ends the resends too: the read decides.
                    Err(_) => break,
                }
            }
        }
        if !caps.write_tokens {
            return None;
        }
        match storage.download(DownloadRequest::new(&self.path)).await {
            Ok(d) if d.write_token.as_deref() == Some(token.as_str()) => Some(d.etag),
            _ => None,
        }
    }
}
