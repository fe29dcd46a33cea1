//! Change notifications: what [`Storage::watch`](super::Storage::watch)
//! reports, and the channel backends report it through.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

/// How many changes may wait for a slow consumer before the stream reports
/// a [`Change::Gap`] instead of holding more.
const CAPACITY: usize = 4096;

/// What a change stream reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Change {
    /// The stream is whole from here on: every change after this one is
    /// reported, until a [`Gap`](Change::Gap).
    InSync,
    /// The document at `path` was written or deleted. `etag` is its new
    /// etag where the backend reports it; `None` for a delete, or where the
    /// backend does not say (then the version is unknown).
    Changed {
        /// The document's storage path.
        path: String,
        /// The new etag, if known.
        etag: Option<String>,
    },
    /// Changes may have been missed (a reconnect, a consumer that lagged,
    /// history compacted away, an overflowing queue). An
    /// [`InSync`](Change::InSync) follows once the stream is whole again.
    Gap {
        /// Why, for the log.
        reason: String,
    },
}

/// The receiving end of a change stream; dropping it ends the
/// subscription (the backend's watch task notices and stops).
pub struct ChangeStream {
    rx: mpsc::Receiver<Change>,
    /// Shared with the sender: a change was dropped, a gap is owed.
    lost: Arc<AtomicBool>,
    /// The [`Change::InSync`] that follows a gap this end reported.
    owed: Option<Change>,
}

/// Why a stream reports a gap of its own.
const LAGGED: &str = "the consumer lagged; changes were dropped";

impl fmt::Debug for ChangeStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChangeStream").finish_non_exhaustive()
    }
}

impl ChangeStream {
    /// A new stream and the sender a backend reports into.
    pub fn channel() -> (ChangeSender, ChangeStream) {
        let (tx, rx) = mpsc::channel(CAPACITY);
        let lost = Arc::new(AtomicBool::new(false));
        let sender = ChangeSender {
            tx,
            lost: Arc::clone(&lost),
            order: Mutex::new(()),
        };
        let stream = ChangeStream {
            rx,
            lost,
            owed: None,
        };
        (sender, stream)
    }

    /// The next change; `None` once the backend ended the stream for good.
    ///
    /// Once every change that was queued before one was dropped has been
    /// taken, the stream reports the gap itself, then
    /// [`InSync`](Change::InSync): the backend may have nothing more to
    /// send, and the consumer must not go on trusting what it missed.
    ///
    /// # Cancel safety
    /// Cancel safe: a change is taken off the stream only when returned.
    pub async fn next(&mut self) -> Option<Change> {
        if let Some(owed) = self.owed.take() {
            return Some(owed);
        }
        match self.rx.try_recv() {
            Ok(change) => return Some(change),
            Err(mpsc::error::TryRecvError::Disconnected) => return None,
            Err(mpsc::error::TryRecvError::Empty) => {}
        }
        // Empty: whatever came after a dropped change was dropped too
        // (the sender queues the gap ahead of any that found room).
        if self.lost.swap(false, Ordering::SeqCst) {
            self.owed = Some(Change::InSync);
            return Some(Change::Gap {
                reason: LAGGED.to_owned(),
            });
        }
        self.rx.recv().await
    }
}

/// The sending end of a change stream, used by backends. Never blocks: a
/// change that finds the stream full (the consumer lags) is dropped and
/// the consumer is told so with a [`Change::Gap`], then
/// [`Change::InSync`], as soon as there is room again.
pub struct ChangeSender {
    tx: mpsc::Sender<Change>,
    /// A change was dropped; a gap is owed (by this end ahead of the next
    /// change that finds room, or by the stream once it is drained).
    lost: Arc<AtomicBool>,
    /// Keeps the owed gap ahead of the change that finds room.
    order: Mutex<()>,
}

impl fmt::Debug for ChangeSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChangeSender")
            .field("closed", &self.tx.is_closed())
            .finish_non_exhaustive()
    }
}

impl ChangeSender {
    /// Reports `change`. False once the consumer dropped its stream: the
    /// backend should stop watching.
    pub fn send(&self, change: Change) -> bool {
        let _order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        if self.lost.load(Ordering::SeqCst) {
            if self.tx.capacity() < 3 {
                return !self.tx.is_closed();
            }
            let gap = Change::Gap {
                reason: LAGGED.to_owned(),
            };
            if self.tx.try_send(gap).is_err() || self.tx.try_send(Change::InSync).is_err() {
                return !self.tx.is_closed();
            }
            self.lost.store(false, Ordering::SeqCst);
        }
        match self.tx.try_send(change) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.lost.store(true, Ordering::SeqCst);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// True once the consumer dropped its stream.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Waits until the consumer drops its stream.
    ///
    /// # Cancel safety
    /// Cancel safe: it only waits.
    pub async fn closed(&self) {
        self.tx.closed().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changed(n: usize) -> Change {
        Change::Changed {
            path: format!("p{n}"),
            etag: None,
        }
    }

    #[tokio::test]
    async fn a_lagging_consumer_gets_a_gap_then_in_sync() {
        let (tx, mut rx) = ChangeStream::channel();
        for n in 0..CAPACITY + 10 {
            assert!(tx.send(changed(n)));
        }
        for n in 0..CAPACITY {
            assert_eq!(rx.next().await, Some(changed(n)));
        }
        // Room again: the gap comes before the next change.
        assert!(tx.send(changed(99_999)));
        assert!(matches!(rx.next().await, Some(Change::Gap { .. })));
        assert_eq!(rx.next().await, Some(Change::InSync));
        assert_eq!(rx.next().await, Some(changed(99_999)));
        drop(rx);
        assert!(!tx.send(Change::InSync));
        assert!(tx.is_closed());
    }

    /// A backend that has nothing more to send after the drop: the stream
    /// reports the gap itself once it is drained.
    #[tokio::test]
    async fn a_drop_is_reported_without_a_later_change() {
        let (tx, mut rx) = ChangeStream::channel();
        for n in 0..CAPACITY + 1 {
            assert!(tx.send(changed(n)));
        }
        for n in 0..CAPACITY {
            assert_eq!(rx.next().await, Some(changed(n)));
        }
        // A hang detector, not a speed bound.
        async fn next(rx: &mut ChangeStream) -> Option<Change> {
            let next = tokio::time::timeout(std::time::Duration::from_secs(60), rx.next());
            next.await.expect("no gap: the drop went unreported")
        }
        assert!(matches!(next(&mut rx).await, Some(Change::Gap { .. })));
        assert_eq!(next(&mut rx).await, Some(Change::InSync));
        // Whole again: changes pass, and no second gap.
        assert!(tx.send(changed(7)));
        assert_eq!(next(&mut rx).await, Some(changed(7)));
    }
}
