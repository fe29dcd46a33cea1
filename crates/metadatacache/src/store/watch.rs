//! Push invalidation ([`Options::watch`](super::Options::watch)): a store
//! that follows its storage's change stream answers reads from memory while
//! the stream is whole and has reported no change to the path since the
//! cached version was confirmed.
//!
//! Every notification gets a sequence number. A read or write records the
//! number current when its storage call *began* (`seq`): any change it may
//! not have seen is numbered higher. A cached entry is current when the
//! stream has been in sync since before that call, and the last change
//! reported for its path is older than the call, or produced exactly the
//! cached version (its etag). A gap distrusts everything until the stream
//! is in sync again, and then every entry confirmed before that.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use crate::storage::{Change, Storage};

/// How many recent changes are remembered by path; past that, the memory
/// is dropped and entries confirmed before are revalidated once.
const MAX_CHANGED: usize = 4096;

/// How long to wait before subscribing again after the stream failed;
/// doubled after each failure in a row (a refusal that lasts: bad
/// credentials, a bucket that cannot be watched), up to
/// [`MAX_RESUBSCRIBE`], and back to this once a stream got in sync.
const RESUBSCRIBE: Duration = Duration::from_millis(200);

/// The longest wait between two subscriptions.
const MAX_RESUBSCRIBE: Duration = Duration::from_secs(30);

/// The watch state of one store.
#[derive(Debug, Default)]
pub(super) struct Watch {
    state: Mutex<State>,
    started: AtomicBool,
    stop: Notify,
    /// Gaps seen (for [`Stats`](super::Stats)).
    pub(super) gaps: AtomicU64,
    /// The backend, for the metrics (set when following starts).
    backend: std::sync::OnceLock<&'static str>,
}

#[derive(Debug, Default)]
struct State {
    /// The stream is whole.
    in_sync: bool,
    /// The number of the last notification.
    seq: u64,
    /// The number given to the last `InSync`: entries confirmed by calls
    /// that began earlier are not trusted.
    sync_seq: u64,
    /// Changes numbered below this were forgotten.
    floor: u64,
    /// The last change reported per path: its number and new etag.
    changed: HashMap<String, (u64, Option<String>)>,
}

impl Watch {
    fn state(&self) -> MutexGuard<'_, State> {
        // Each critical section is a few field updates; a poisoned state is
        // still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The number to record with a storage call that begins now.
    pub(super) fn seq(&self) -> u64 {
        self.state().seq
    }

    /// Whether the version `etag` of `path`, confirmed by a call that began
    /// at `seq`, is still current without asking storage.
    pub(super) fn is_current(&self, path: &str, etag: &str, seq: u64) -> bool {
        let s = self.state();
        s.in_sync
            && seq >= s.sync_seq
            && seq >= s.floor
            && s.changed
                .get(path)
                .is_none_or(|(at, new)| *at <= seq || new.as_deref() == Some(etag))
    }

    /// Applies one notification.
    fn apply(&self, change: Change) {
        let mut s = self.state();
        s.seq += 1;
        let seq = s.seq;
        match change {
            Change::InSync => {
                s.in_sync = true;
                s.sync_seq = seq;
                tracing::debug!("watch: in sync");
            }
            Change::Gap { reason } => {
                if s.in_sync {
                    tracing::warn!(%reason, "watch: changes may have been missed; every read revalidates until the stream is in sync");
                }
                s.in_sync = false;
                self.gaps.fetch_add(1, Ordering::Relaxed);
                #[cfg(feature = "metrics")]
                metrics::counter!(
                    "metadatacache_watch_gaps_total",
                    "backend" => self.backend.get().copied().unwrap_or("unknown")
                )
                .increment(1);
            }
            Change::Changed { path, etag } => {
                if s.changed.len() >= MAX_CHANGED {
                    s.changed.clear();
                    s.floor = seq;
                }
                s.changed.insert(path, (seq, etag));
            }
        }
    }

    /// Marks the stream broken (it ended or could not be set up).
    fn broken(&self, reason: &str) {
        self.apply(Change::Gap {
            reason: reason.to_owned(),
        });
    }

    /// Starts following `storage`'s changes, once per store, from a task
    /// that ends when the store is dropped ([`stop`](Self::stop)).
    pub(super) fn start(self: &Arc<Self>, storage: &Arc<dyn Storage>) {
        if self.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let _ = self.backend.set(storage.backend());
        if !storage.capabilities().notifications {
            tracing::warn!(
                backend = storage.backend(),
                "watch: this backend cannot report changes; every read revalidates"
            );
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Called outside a runtime: try again from the next read.
            self.started.store(false, Ordering::SeqCst);
            return;
        };
        let watch = Arc::clone(self);
        let storage = Arc::clone(storage);
        runtime.spawn(async move { watch.follow(storage).await });
    }

    /// Follows the change stream until [`stop`](Self::stop). Should the
    /// task end any other way — dropped with its runtime, say — nothing
    /// would apply changes any more: the watch is then marked broken (reads
    /// revalidate) and the next read starts it again.
    async fn follow(self: Arc<Self>, storage: Arc<dyn Storage>) {
        struct Following(Option<Arc<Watch>>);
        impl Drop for Following {
            fn drop(&mut self) {
                if let Some(watch) = self.0.take() {
                    watch.broken("the task that followed the changes ended with its runtime");
                    watch.started.store(false, Ordering::SeqCst);
                }
            }
        }
        let mut following = Following(Some(Arc::clone(&self)));
        self.follow_stream(storage).await;
        following.0 = None;
    }

    /// Follows the change stream, subscribing again whenever it ends.
    async fn follow_stream(&self, storage: Arc<dyn Storage>) {
        let mut pause = RESUBSCRIBE;
        loop {
            let subscribed = tokio::select! {
                () = self.stop.notified() => return,
                s = storage.watch("") => s,
            };
            match subscribed {
                Ok(mut stream) => loop {
                    tokio::select! {
                        () = self.stop.notified() => return,
                        change = stream.next() => match change {
                            Some(change) => {
                                if change == Change::InSync {
                                    pause = RESUBSCRIBE;
                                }
                                self.apply(change);
                            }
                            None => {
                                self.broken("the change stream ended");
                                break;
                            }
                        },
                    }
                },
                Err(e) => self.broken(&format!("cannot subscribe: {e}")),
            }
            // Reads revalidate meanwhile; a subscription that keeps failing,
            // or a stream that keeps ending at once, must not spin.
            tokio::select! {
                () = self.stop.notified() => return,
                () = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(MAX_RESUBSCRIBE);
        }
    }

    /// Ends the following task (the store is gone).
    pub(super) fn stop(&self) {
        // A permit is kept if the task is not waiting right now.
        self.stop.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changed(path: &str, etag: Option<&str>) -> Change {
        Change::Changed {
            path: path.to_owned(),
            etag: etag.map(str::to_owned),
        }
    }

    #[test]
    fn currency_rules() {
        let w = Watch::default();
        // Not in sync yet: nothing is current.
        assert!(!w.is_current("a", "e1", w.seq()));
        w.apply(Change::InSync);
        let read = w.seq();
        assert!(w.is_current("a", "e1", read));
        // A change after the read began: stale, unless it made our version.
        w.apply(changed("a", Some("e2")));
        assert!(!w.is_current("a", "e1", read));
        assert!(w.is_current("a", "e2", read));
        assert!(w.is_current("b", "x", read), "other paths are unaffected");
        // A read that began after the change is current.
        assert!(w.is_current("a", "e9", w.seq()));
        // A delete (no etag) matches no version.
        let before = w.seq();
        w.apply(changed("a", None));
        assert!(!w.is_current("a", "e2", before));
        // A gap distrusts everything; so does every read begun before the
        // stream was whole again.
        let before_gap = w.seq();
        w.apply(Change::Gap {
            reason: "test".into(),
        });
        assert!(!w.is_current("b", "x", w.seq()));
        w.apply(Change::InSync);
        assert!(!w.is_current("b", "x", before_gap));
        assert!(w.is_current("b", "x", w.seq()));
        assert_eq!(w.gaps.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn forgetting_old_changes_distrusts_older_reads() {
        let w = Watch::default();
        w.apply(Change::InSync);
        let read = w.seq();
        for n in 0..=MAX_CHANGED {
            w.apply(changed(&format!("p{n}"), None));
        }
        assert!(
            !w.is_current("untouched", "e", read),
            "older than the floor"
        );
        assert!(w.is_current("untouched", "e", w.seq()));
    }
}
