//! `Store::update` with group commit: updates queued behind one key's lock
//! are applied one after another to the same value and written with a single
//! compare-and-swap.
//!
//! Every caller runs its own closure in its own task, so closures may borrow
//! from their caller's stack. The task that gets the lock leads the batch: it
//! takes the queue of waiting updates, hands each waiter the value in turn
//! (the waiter runs its `f` and answers with the result), writes the final
//! value once, and tells every waiter the outcome. A failing `f` is left out
//! without sinking the others; a conflict re-runs the whole batch on the
//! fresh value.

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, ErrorKind, Result};
use crate::guard::KeyGuard;
use crate::store::Store;

/// A waiting update, queued for the next batch leader of its key.
pub(crate) struct Member<V> {
    tx: mpsc::UnboundedSender<ToMember<V>>,
    create: bool,
    call: Instant,
}

impl<V> fmt::Debug for Member<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Member")
            .field("create", &self.create)
            .finish_non_exhaustive()
    }
}

enum ToMember<V> {
    /// Run your `f` on this value and answer.
    Apply(V, oneshot::Sender<Answer<V>>),
    /// The batch is over; this is your result.
    Done(Result<()>),
}

/// What one participant's `f` made of the value.
enum Answer<V> {
    /// Persist this value.
    Changed(V),
    /// Nothing to persist (`f` returned `persist = false`).
    Unchanged,
    /// `f` failed; the participant already has its error.
    Failed,
}

/// How a participant of the current attempt stands.
enum Part<V> {
    /// The leader itself.
    Own,
    /// A waiter, reachable through its channel.
    Waiter(Member<V>),
}

/// Tells every waiter still in the batch its outcome when the leader stops,
/// also when the leader's future is dropped half-way.
struct Batch<V> {
    seats: Vec<Part<V>>,
    /// An upload was sent and its outcome is not known yet.
    writing: bool,
}

impl<V> Batch<V> {
    fn finish(&mut self, res: &Result<()>) {
        for part in self.seats.drain(..) {
            if let Part::Waiter(m) = part {
                let _ = m.tx.send(ToMember::Done(match res {
                    Ok(()) => Ok(()),
                    Err(e) => Err(e.duplicate()),
                }));
            }
        }
    }
}

impl<V> Drop for Batch<V> {
    fn drop(&mut self) {
        if self.writing {
            // The leader was cancelled with a write in flight: it may have
            // been applied, so nobody may run their `f` again.
            let err = Error::new(
                ErrorKind::Unavailable,
                "the update's batch was cancelled while writing; it may have been applied",
            );
            self.finish(&Err(err));
        }
        // Otherwise dropping the senders tells waiters to queue again:
        // nothing of theirs was written.
    }
}

impl<K, V> Store<K, V>
where
    K: Eq + Hash + Clone + fmt::Display + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    /// Waits for the key's lock while taking part in other leaders' batches;
    /// leads a batch once it holds the lock.
    pub(crate) async fn update_batched<F>(
        &self,
        key: K,
        create: bool,
        call: Instant,
        mut f: F,
    ) -> Result<()>
    where
        F: FnMut(V) -> Result<(V, bool)> + Send,
    {
        // Uncontended: lead a batch of one without queueing.
        if let Some(lock) = self.inner.locks.try_lock(&key) {
            let path = (self.inner.opts.path)(&key);
            let mut g = KeyGuard::new(self.clone(), lock, path);
            return self.lead(&mut g, create, call, &mut f).await;
        }
        loop {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let member = Member { tx, create, call };
            let path = (self.inner.opts.path)(&key);
            let lock = self.inner.locks.lock_queued(key.clone(), member);
            tokio::pin!(lock);
            let mut own_error = None;
            loop {
                tokio::select! {
                    // A leader's message comes first: Done is sent before
                    // the leader unlocks.
                    biased;
                    msg = rx.recv() => match msg {
                        Some(ToMember::Apply(value, reply)) => {
                            let answer = match f(value) {
                                Ok((new, true)) => Answer::Changed(new),
                                Ok((_, false)) => Answer::Unchanged,
                                Err(e) => {
                                    own_error = Some(e);
                                    Answer::Failed
                                }
                            };
                            let failed = matches!(answer, Answer::Failed);
                            let _ = reply.send(answer);
                            if failed {
                                // Left out of the batch; our error is final.
                                return Err(own_error.take().unwrap_or_else(|| unreachable!()));
                            }
                        }
                        Some(ToMember::Done(res)) => return res,
                        // The leader went away before writing anything of
                        // ours: queue again.
                        None => break,
                    },
                    lock = &mut lock => {
                        // A previous leader may have written our update,
                        // sent Done and unlocked between our two polls: its
                        // Done is queued by now (it is sent before the
                        // unlock). Leading without reading it would apply
                        // our `f` twice.
                        while let Ok(msg) = rx.try_recv() {
                            if let ToMember::Done(res) = msg {
                                return res;
                            }
                            // A stale Apply from a leader that was cancelled
                            // before writing: nothing of ours was written.
                        }
                        let mut g = KeyGuard::new(self.clone(), lock, path);
                        // Our own queue entry is one of the members; a
                        // closed channel tells it apart.
                        drop(rx);
                        return self.lead(&mut g, create, call, &mut f).await;
                    }
                }
            }
        }
    }

    /// Runs one batch as its leader, holding the key's lock.
    pub(crate) async fn lead<F>(
        &self,
        g: &mut KeyGuard<K, V>,
        create: bool,
        call: Instant,
        f: &mut F,
    ) -> Result<()>
    where
        F: FnMut(V) -> Result<(V, bool)> + Send,
    {
        let mut batch = Batch {
            seats: vec![Part::Own],
            writing: false,
        };
        let mut newest_call = call;
        for m in self.inner.locks.take_queue(g.key()) {
            if m.tx.is_closed() {
                continue; // our own entry, or a cancelled waiter
            }
            newest_call = newest_call.max(m.call);
            batch.seats.push(Part::Waiter(m));
        }
        tracing::Span::current().record("batch", batch.seats.len());
        let mut own_error: Option<Error> = None;
        let mut attempt = 0usize;
        let res = loop {
            attempt += 1;
            tracing::Span::current().record("attempts", attempt);
            // Every participant needs data no older than its own call.
            let fresh = if attempt == 1 {
                g.revalidate(newest_call, true).await
            } else {
                g.sync().await
            };
            if let Err(e) = fresh {
                break Err(e);
            }
            let committed = g.committed();
            let etag = committed.as_ref().map(|(_, e)| Arc::clone(e));
            let mut value: Option<V> = committed.map(|(v, _)| (*v).clone());
            let mut dirty = false;
            let mut i = 0;
            while i < batch.seats.len() {
                let wants_create = match &batch.seats[i] {
                    Part::Own => create,
                    Part::Waiter(m) => m.create,
                };
                let input = match &value {
                    Some(v) => v.clone(),
                    None if wants_create => match self.init_value(g) {
                        Ok(v) => v,
                        Err(e) => {
                            self.leave(&mut batch, i, &mut own_error, e);
                            continue;
                        }
                    },
                    None => {
                        let e = Error::not_found(format!("key {} does not exist", g.key()))
                            .with_path(g.path());
                        self.leave(&mut batch, i, &mut own_error, e);
                        continue;
                    }
                };
                let answer = match &mut batch.seats[i] {
                    Part::Own => match f(input) {
                        Ok((new, true)) => Answer::Changed(new),
                        Ok((_, false)) => Answer::Unchanged,
                        Err(e) => {
                            own_error = Some(e);
                            Answer::Failed
                        }
                    },
                    Part::Waiter(m) => {
                        let (reply, answer) = oneshot::channel();
                        if m.tx.send(ToMember::Apply(input, reply)).is_err() {
                            batch.seats.remove(i);
                            continue;
                        }
                        match answer.await {
                            Ok(a) => a,
                            // The waiter was cancelled while deciding.
                            Err(_) => {
                                batch.seats.remove(i);
                                continue;
                            }
                        }
                    }
                };
                match answer {
                    Answer::Changed(new) => {
                        value = Some(new);
                        dirty = true;
                    }
                    Answer::Unchanged => {}
                    Answer::Failed => {
                        // Its error is already with its caller (or in
                        // own_error).
                        batch.seats.remove(i);
                        continue;
                    }
                }
                i += 1;
            }
            let Some(new) = value.filter(|_| dirty) else {
                break Ok(());
            };
            let had_etag = etag.is_some();
            batch.writing = true;
            let written = g.write(Arc::new(new), etag).await;
            batch.writing = false;
            match written {
                Ok(()) => break Ok(()),
                // A compare-and-swap on a document deleted meanwhile: sync
                // again (and create it, if allowed) like any conflict.
                Err(e) if e.is_conflict() || (had_etag && e.kind() == ErrorKind::NotFound) => {
                    if let Err(e) = self.after_conflict("update", g, call, attempt, e).await {
                        break Err(e);
                    }
                }
                Err(e) => break Err(e),
            }
        };
        batch.finish(&res);
        match own_error {
            Some(e) => Err(e),
            None => res,
        }
    }

    /// Removes seat `i` from the batch with error `e`.
    fn leave(&self, batch: &mut Batch<V>, i: usize, own_error: &mut Option<Error>, e: Error) {
        match batch.seats.remove(i) {
            Part::Own => *own_error = Some(e),
            Part::Waiter(m) => {
                let _ = m.tx.send(ToMember::Done(Err(e)));
            }
        }
    }
}
