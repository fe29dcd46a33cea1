//! Change streams: one etcd watch on the storage's keys, kept alive across
//! outages until the consumer drops the stream.
//!
//! A watch starts from the revision after the one read when it is opened,
//! so every change made after the subscription began is reported. When
//! the watch breaks (a lost connection, a server restart, history
//! compacted past the watch, a cancel by the server), the stream reports a
//! gap and opens a new watch from the then current revision, retrying with
//! backoff for as long as the server is away; once it stands, the stream
//! reports that it is in sync again.

use std::sync::Arc;

use etcd_client::{EventType, WatchResponse, WatchStream, Watcher};

use super::client::Conn;
use super::layout::{Layout, check_path, etag};
use super::{EtcdStorage, tag};
use crate::backend::util::Backoff;
use crate::error::Result;
use crate::storage::{Change, ChangeSender, ChangeStream, is_within};

/// What one change stream watches.
struct Subscription {
    conn: Arc<Conn>,
    layout: Layout,
    /// The storage path below which documents are reported ("" for all).
    prefix: String,
    /// The etcd key prefix watched: the document key of `prefix`, so the
    /// metadata keys of documents (`<prefix>/.mdcache-meta/…`) are watched
    /// only at the root, where they are filtered out.
    key: String,
}

impl EtcdStorage {
    /// [`Storage::watch`](crate::Storage::watch): opens the first watch
    /// within the timeout, then follows it from a task of its own.
    pub(super) async fn subscribe(&self, prefix: &str) -> Result<ChangeStream> {
        check_path(prefix, true).map_err(tag)?;
        let subscription = Subscription {
            conn: Arc::clone(&self.conn),
            key: self.layout.doc(prefix),
            layout: self.layout.clone(),
            prefix: prefix.to_owned(),
        };
        let watch = subscription.conn.watch(&subscription.key).await?;
        let (tx, rx) = ChangeStream::channel();
        tx.send(Change::InSync);
        tokio::spawn(subscription.follow(tx, watch));
        Ok(rx)
    }
}

impl Subscription {
    /// Reports the watch's events, and re-establishes it whenever it
    /// breaks, until the consumer drops the stream.
    async fn follow(self, tx: ChangeSender, mut watch: (Watcher, WatchStream)) {
        loop {
            // The `Watcher` half stays alive with `watch`: dropping it
            // would end the watch.
            let reason = tokio::select! {
                () = tx.closed() => return,
                reason = self.report(&tx, &mut watch.1) => match reason {
                    Some(reason) => reason,
                    None => return,
                },
            };
            tracing::debug!(%reason, prefix = %self.prefix, "etcd watch: broken");
            if !tx.send(Change::Gap { reason }) {
                return;
            }
            match self.reopen(&tx).await {
                Some(reopened) => watch = reopened,
                None => return,
            }
            if !tx.send(Change::InSync) {
                return;
            }
        }
    }

    /// Reports the events of `stream` until it breaks; returns why, or
    /// `None` once the consumer is gone.
    async fn report(&self, tx: &ChangeSender, stream: &mut WatchStream) -> Option<String> {
        loop {
            let resp = match stream.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => return Some("the etcd watch stream ended".to_owned()),
                Err(e) => return Some(format!("the etcd watch broke: {e}")),
            };
            if let Some(reason) = broken(&resp) {
                return Some(reason);
            }
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                let Some(path) = self.layout.path_of(kv.key()) else {
                    continue;
                };
                if !is_within(path, &self.prefix) {
                    continue;
                }
                let etag = match event.event_type() {
                    EventType::Put => Some(etag(kv.mod_revision())),
                    EventType::Delete => None,
                };
                let change = Change::Changed {
                    path: path.to_owned(),
                    etag,
                };
                if !tx.send(change) {
                    return None;
                }
            }
        }
    }

    /// Opens a new watch, retrying with backoff while the server is away;
    /// `None` once the consumer is gone.
    async fn reopen(&self, tx: &ChangeSender) -> Option<(Watcher, WatchStream)> {
        let mut backoff = Backoff::new();
        loop {
            let attempt = tokio::select! {
                () = tx.closed() => return None,
                attempt = self.conn.watch(&self.key) => attempt,
            };
            match attempt {
                Ok(watch) => return Some(watch),
                Err(e) => tracing::debug!(error = %e, "etcd watch: cannot re-establish yet"),
            }
            tokio::select! {
                () = tx.closed() => return None,
                () = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }
}

/// Why a watch response ends the watch: history compacted past it (the
/// server cancels such a watch), or a cancel.
fn broken(resp: &WatchResponse) -> Option<String> {
    if resp.compact_revision() > 0 {
        return Some(format!(
            "etcd compacted its history up to revision {} ahead of the watch",
            resp.compact_revision()
        ));
    }
    resp.canceled()
        .then(|| format!("etcd cancelled the watch: {}", resp.cancel_reason()))
}
