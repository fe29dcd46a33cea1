//! Faults of change streams: gaps, and changes lost while a stream is down.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::FaultyStorage;
use crate::storage::{Change, ChangeStream};

impl FaultyStorage {
    /// Makes every change stream handed out so far report a gap (changes
    /// may have been missed), then that it is in sync again: what a
    /// reconnect, a lagging consumer or etcd compaction looks like.
    pub fn watch_gap(&self) {
        self.watch_pause();
        self.watch_resume();
    }

    /// Breaks every change stream handed out so far: it reports a gap, and
    /// the changes made until [`watch_resume`](Self::watch_resume) are
    /// lost (a connection that is down).
    pub fn watch_pause(&self) {
        self.watch_paused.store(true, Ordering::SeqCst);
        self.to_streams(Change::Gap {
            reason: "injected".to_owned(),
        });
    }

    /// Mends the streams [`watch_pause`](Self::watch_pause) broke: they
    /// report that they are in sync, and forward changes again.
    pub fn watch_resume(&self) {
        self.watch_paused.store(false, Ordering::SeqCst);
        self.to_streams(Change::InSync);
    }

    fn to_streams(&self, change: Change) {
        let streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        for tx in streams.iter() {
            tx.send(change.clone());
        }
    }

    /// Forwards `inner`'s changes through a stream of our own, which the
    /// methods above break into.
    pub(super) fn forward(&self, mut inner: ChangeStream) -> ChangeStream {
        let (tx, rx) = ChangeStream::channel();
        let tx = Arc::new(tx);
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::clone(&tx));
        let paused = Arc::clone(&self.watch_paused);
        let counts = Arc::clone(&self.counts);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tx.closed() => return,
                    change = inner.next() => match change {
                        Some(_) if paused.load(Ordering::SeqCst) => {
                            counts.watch_dropped.fetch_add(1, Ordering::SeqCst);
                        }
                        Some(change) => {
                            if !tx.send(change) {
                                return;
                            }
                        }
                        None => return,
                    },
                }
            }
        });
        rx
    }
}
