//! Combining the writes of different keys: while one of a store's writes
//! is in flight, the writes of other keys queue, and when it is answered
//! they go together in one [`Storage::upload_many`] call, where the backend
//! sends them in one round trip ([`Capabilities::combined_writes`](crate::Capabilities::combined_writes)).
//!
//! Every write keeps its own compare-and-swap and its own result: the
//! backend answers each request on its own, so one key's conflict never
//! fails another's write. A write sent while nothing is in flight goes at
//! once, alone: combining never delays a store that writes one key at a
//! time.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::storage::{Storage, UploadRequest, UploadResponse};

/// A write waiting for the next combined call, and where its result goes.
type Queued = (UploadRequest, oneshot::Sender<Result<UploadResponse>>);

/// One store's queue of writes for the next combined call.
#[derive(Debug, Default)]
pub(super) struct Combiner {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    queue: Vec<Queued>,
    /// A write or a combined call is in flight.
    busy: bool,
}

impl Combiner {
    fn state(&self) -> MutexGuard<'_, State> {
        // Every critical section is a push or a take; poisoning cannot leave
        // the queue inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `req` alone when nothing is in flight, or else together with
    /// the other writes queued meanwhile.
    ///
    /// # Cancel safety
    /// Not cancel safe, like [`Storage::upload`]: a dropped call may have
    /// been applied, also later.
    pub(super) async fn upload(
        self: &Arc<Self>,
        storage: &Arc<dyn Storage>,
        req: UploadRequest,
    ) -> Result<UploadResponse> {
        let queued = {
            let mut state = self.state();
            if state.busy {
                let (tx, rx) = oneshot::channel();
                state.queue.push((req, tx));
                Err(rx)
            } else {
                state.busy = true;
                Ok(req)
            }
        };
        match queued {
            Ok(req) => {
                // Whatever queued meanwhile is sent when this write is over,
                // also when this future is dropped.
                let _next = HandOff {
                    combiner: Arc::clone(self),
                    storage: Arc::clone(storage),
                };
                storage.upload(req).await
            }
            Err(rx) => rx.await.unwrap_or_else(|_| {
                Err(Error::unavailable(
                    "the combined write was dropped in flight; it may have been applied",
                ))
            }),
        }
    }

    /// Sends what is queued, in combined calls, until the queue is empty.
    async fn drain(self: Arc<Self>, storage: Arc<dyn Storage>) {
        let mut idle = Idle(Some(Arc::clone(&self)));
        loop {
            let batch = {
                let mut state = self.state();
                if state.queue.is_empty() {
                    state.busy = false;
                    idle.0 = None;
                    return;
                }
                std::mem::take(&mut state.queue)
            };
            let (reqs, txs): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            let results = storage.upload_many(reqs).await;
            let mut results = results.into_iter();
            for tx in txs {
                let res = results.next().unwrap_or_else(|| {
                    Err(Error::unavailable(
                        "the backend answered too few of a combined write's requests; \
                         this one may have been applied",
                    ))
                });
                let _ = tx.send(res);
            }
        }
    }
}

/// Hands the queue on when a write sent alone is over.
struct HandOff {
    combiner: Arc<Combiner>,
    storage: Arc<dyn Storage>,
}

impl Drop for HandOff {
    fn drop(&mut self) {
        let mut state = self.combiner.state();
        if state.queue.is_empty() {
            state.busy = false;
            return;
        }
        drop(state);
        let (combiner, storage) = (Arc::clone(&self.combiner), Arc::clone(&self.storage));
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn(combiner.drain(storage))),
            // No runtime to send them on (it is shutting down): they fail
            // as dropped, with the outcome unknown to their callers.
            Err(_) => {
                let mut state = self.combiner.state();
                state.queue.clear();
                state.busy = false;
            }
        }
    }
}

/// Frees the combiner if a drain stops half-way (its task was cancelled
/// with the runtime, or a backend panicked): the queued writes fail as
/// dropped and later writes go again.
struct Idle(Option<Arc<Combiner>>);

impl Drop for Idle {
    fn drop(&mut self) {
        if let Some(combiner) = self.0.take() {
            let mut state = combiner.state();
            state.queue.clear();
            state.busy = false;
        }
    }
}
