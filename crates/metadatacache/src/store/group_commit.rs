//! `Store::update` with group commit: updates queued behind one key's lock
//! are applied one after another to the same value and written with a single
//! compare-and-swap.
//!
//! Every caller runs its own closure in its own task, so closures may borrow
//! from their caller's stack. The task that gets the lock leads: it runs its
//! own closure on the committed value, and only if that changes the value
//! does it take the queue of waiting updates and hand each waiter the value
//! in turn (the waiter runs its `f` and answers). It writes the final value
//! once and tells each waiter that changed it the outcome.
//!
//! Each caller gets its own outcome:
//!
//! - an update whose `f` changes nothing, or fails, on the *committed* value
//!   returns at once (`Ok`, or its own error), without waiting for the write
//!   and never with another caller's error;
//! - one whose `f` changes nothing, or fails, on a value that earlier members
//!   of the batch changed (which is not committed yet) runs its `f` again on
//!   the committed value; if it then wants to write, it goes back to the
//!   queue for the next batch;
//! - those that changed the value share the write's outcome;
//! - a value that cannot be encoded sends the waiters back to the queue and
//!   the leader tries alone, so one bad value fails only its own update;
//! - a conflict re-runs the batch on the fresh value.
//!
//! A batch may also start from the cached version without revalidating it
//! (optimistic writes, see `Options::optimistic_writes`): it takes every
//! queued update, since its compare-and-swap lands after all their calls or
//! not at all. A member that decides without a write on that unconfirmed
//! value waits for the write: if it lands, the decision stands; if not, the
//! member decides again in a later batch. A leader that decides without a
//! write on it revalidates and runs its `f` again.

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};

use super::Store;
use super::guard::KeyGuard;
use super::stats::Counter;
use crate::error::{Error, ErrorKind, Result};

/// An update waiting for its key's lock, queued for the next batch leader.
pub(super) struct Waiter<V> {
    tx: mpsc::UnboundedSender<ToWaiter<V>>,
    create: bool,
    call: Instant,
}

impl<V> fmt::Debug for Waiter<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Waiter")
            .field("create", &self.create)
            .finish_non_exhaustive()
    }
}

/// What the value handed to a waiter is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Basis {
    /// The batch's value so far: earlier members may have changed it.
    Batch,
    /// Exactly what storage holds: a decision without a write is final.
    Committed,
    /// The cached version, not confirmed since the call (an optimistic
    /// batch): a decision without a write stands only if the batch's
    /// compare-and-swap on that version lands.
    Provisional,
}

/// What a leader tells a waiter.
enum ToWaiter<V> {
    /// Run your `f` on this value and reply.
    Apply {
        value: V,
        basis: Basis,
        reply: oneshot::Sender<Reply<V>>,
    },
    /// Wait for the lock again: your update takes part in a later batch.
    Requeue,
    /// The batch's write is over; this is your result.
    Done(Result<()>),
}

/// What a waiter's `f` made of the value it was handed.
enum Reply<V> {
    /// Write this value.
    Changed(V),
    /// `f` returned `persist = false`.
    Unchanged,
    /// `f` failed; the waiter keeps its error.
    Failed,
}

/// The waiters of one batch that changed the value and wait for the write.
/// Dropping it tells them their outcome, also when the leader's future is
/// dropped half-way.
struct Batch<V> {
    waiters: Vec<Waiter<V>>,
    /// A write was sent and its outcome is not known yet.
    writing: bool,
}

impl<V> Batch<V> {
    fn finish(&mut self, res: &Result<()>) {
        for w in self.waiters.drain(..) {
            let _ = w.tx.send(ToWaiter::Done(match res {
                Ok(()) => Ok(()),
                Err(e) => Err(e.duplicate()),
            }));
        }
    }

    fn requeue_all(&mut self) {
        for w in self.waiters.drain(..) {
            let _ = w.tx.send(ToWaiter::Requeue);
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

/// What running one `f` gave.
enum Outcome<V> {
    Changed(V),
    Unchanged,
    Failed(Error),
}

fn run<V, F>(f: &mut F, value: V) -> Outcome<V>
where
    F: FnMut(V) -> Result<(V, bool)>,
{
    match f(value) {
        Ok((new, true)) => Outcome::Changed(new),
        Ok((_, false)) => Outcome::Unchanged,
        Err(e) => Outcome::Failed(e),
    }
}

impl<K, V> Store<K, V>
where
    K: Eq + Hash + Clone + fmt::Display + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    /// Waits for the key's lock while taking part in other leaders' batches;
    /// leads a batch once it holds the lock.
    pub(super) async fn update_batched<F>(
        &self,
        key: K,
        create: bool,
        call: Instant,
        mut f: F,
    ) -> Result<()>
    where
        F: FnMut(V) -> Result<(V, bool)> + Send,
    {
        // Uncontended: lead without queueing.
        if let Some(lock) = self.inner.locks.try_lock(&key) {
            let path = (self.inner.opts.path)(&key);
            tracing::Span::current().record("path", path.as_str());
            let mut g = KeyGuard::new(self.clone(), lock, path);
            return self.lead(&mut g, create, call, &mut f).await;
        }
        loop {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let waiter = Waiter { tx, create, call };
            let path = (self.inner.opts.path)(&key);
            let lock = self.inner.locks.lock_queued(key.clone(), waiter);
            tokio::pin!(lock);
            // Our outcome decided on a provisional value, standing if the
            // batch's write lands.
            let mut pending: Option<Result<()>> = None;
            loop {
                tokio::select! {
                    // A leader's message comes first: Done is sent before
                    // the leader unlocks.
                    biased;
                    msg = rx.recv() => match msg {
                        Some(ToWaiter::Apply { value, basis, reply }) => {
                            let mut own_error = None;
                            let answer = match run(&mut f, value) {
                                Outcome::Changed(new) => Reply::Changed(new),
                                Outcome::Unchanged => Reply::Unchanged,
                                Outcome::Failed(e) => {
                                    own_error = Some(e);
                                    Reply::Failed
                                }
                            };
                            let decided = !matches!(answer, Reply::Changed(_));
                            let _ = reply.send(answer);
                            let own = own_error.map_or(Ok(()), Err);
                            match basis {
                                // Decided on the committed value: final,
                                // whatever becomes of the batch's write.
                                Basis::Committed if decided => return own,
                                Basis::Provisional if decided => pending = Some(own),
                                _ => pending = None,
                            }
                        }
                        Some(ToWaiter::Requeue) | None => break,
                        Some(ToWaiter::Done(res)) => match settle(pending.take(), res) {
                            Some(res) => return res,
                            // Our decision could not be confirmed: decide
                            // again in a later batch.
                            None => break,
                        },
                    },
                    lock = &mut lock => {
                        // A previous leader may have written our update,
                        // sent Done and unlocked between our two polls: its
                        // Done is queued by now (it is sent before the
                        // unlock). Leading without reading it would apply
                        // our `f` twice.
                        while let Ok(msg) = rx.try_recv() {
                            if let ToWaiter::Done(res) = msg
                                && let Some(res) = settle(pending.take(), res)
                            {
                                return res;
                            }
                            // A stale Apply or Requeue from a leader that
                            // wrote nothing of ours.
                        }
                        let mut g = KeyGuard::new(self.clone(), lock, path);
                        // Our own queue entry may still be in the queue; a
                        // closed channel tells it apart.
                        drop(rx);
                        return self.lead(&mut g, create, call, &mut f).await;
                    }
                }
            }
        }
    }

    /// Runs one batch as its leader, holding the key's lock.
    pub(super) async fn lead<F>(
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
            waiters: Vec::new(),
            writing: false,
        };
        let mut attempt = 0usize;
        // Whether the last attempt's write reached storage, so that the
        // waiters in the batch share its outcome.
        let mut wrote = false;
        // An optimistic first try (see `Options::optimistic_writes`): `f`
        // runs on the cached value, which nothing confirmed since the call.
        let mut unconfirmed = self.may_write_optimistically(g);
        let mut taken = false;
        let res = loop {
            let observed = if unconfirmed {
                None
            } else {
                attempt += 1;
                tracing::Span::current().record("attempts", attempt);
                // Every participant needs data no older than its own call:
                // the first round trip covers the waiters queued so far.
                let observed = if attempt == 1 {
                    let queued = self.inner.locks.newest_queued(g.key(), |w| w.call);
                    g.revalidate_at(queued.map_or(call, |q| q.max(call)), true)
                        .await
                } else {
                    g.sync_at().await
                };
                match observed {
                    Ok(observed) => Some(observed),
                    Err(e) => break Err(e),
                }
            };
            let committed = g.committed();
            let etag = committed.as_ref().map(|(_, e)| Arc::clone(e));
            let committed: Option<Arc<V>> = committed.map(|(v, _)| v);
            let own_input = match self.input(g, &committed, create) {
                Ok(v) => v,
                Err(e) => break Err(e),
            };
            let mut value = match run(f, own_input) {
                Outcome::Changed(new) => new,
                // No write wanted, or an error, on a value nothing
                // confirmed: decide again on what storage holds.
                Outcome::Unchanged | Outcome::Failed(_) if unconfirmed => {
                    unconfirmed = false;
                    continue;
                }
                // Decided on the committed value: our outcome is final.
                Outcome::Unchanged => break Ok(()),
                Outcome::Failed(e) => break Err(e),
            };
            if !taken {
                taken = true;
                // An optimistic batch may take every queued update: its
                // compare-and-swap lands after all their calls, or not at
                // all.
                batch.waiters = self.take_waiters(g, observed);
                tracing::Span::current().record("batch", batch.waiters.len() + 1);
            }
            let basis = if unconfirmed {
                Basis::Provisional
            } else {
                Basis::Committed
            };
            let mut i = 0;
            while i < batch.waiters.len() {
                if self
                    .apply(g, &batch.waiters[i], &mut value, &committed, basis)
                    .await
                {
                    i += 1;
                } else {
                    batch.waiters.remove(i);
                }
            }
            let had_etag = etag.is_some();
            batch.writing = true;
            let written = g.write(Arc::new(value), etag).await;
            batch.writing = false;
            match written {
                Ok(()) => {
                    wrote = true;
                    break Ok(());
                }
                // One member's value cannot be encoded: the others try
                // again in later batches, the leader alone.
                Err(e) if e.kind() == ErrorKind::Codec && !batch.waiters.is_empty() => {
                    batch.requeue_all();
                }
                // The cached version was not the stored one any more:
                // revalidate (unless the refusal brought back the stored
                // version, cached now as if read when the write began) and
                // run `f` again, without backing off.
                Err(e) if unconfirmed && (e.is_conflict() || e.kind() == ErrorKind::NotFound) => {
                    self.inner.counters.bump(Counter::Conflicts);
                    if g.refreshed.take().is_none()
                        && let Some(c) = self.inner.cache().get_mut(g.key())
                    {
                        c.must_revalidate = true;
                    }
                    unconfirmed = false;
                }
                // A compare-and-swap on a document deleted meanwhile: sync
                // again (and create it, if allowed) like any conflict.
                // After the backoff, a read gets a fresher version than
                // the one a refusal brought back.
                Err(e) if e.is_conflict() || (had_etag && e.kind() == ErrorKind::NotFound) => {
                    g.refreshed = None;
                    if let Err(e) = self.after_conflict("update", g, call, attempt, e).await {
                        break Err(e);
                    }
                }
                Err(e) => {
                    // Unavailable: it may have been applied, for everyone
                    // in the batch.
                    wrote = true;
                    break Err(e);
                }
            }
        };
        if wrote {
            batch.finish(&res);
        } else {
            // Nothing of the waiters' was written (our own outcome was
            // decided without a write, or every write conflicted): they
            // stay queued for the next holder of the lock, and decide
            // their own outcome.
            self.inner
                .locks
                .requeue(g.key(), std::mem::take(&mut batch.waiters));
        }
        res
    }

    /// Whether an update (and its batch) may start from the cached value
    /// without revalidating it, as [`Options::optimistic_writes`](crate::Options::optimistic_writes)
    /// says; never when a watch can confirm the entry for free.
    fn may_write_optimistically(&self, g: &KeyGuard<K, V>) -> bool {
        let inner = &self.inner;
        let versions = inner.opts.storage.capabilities().current_on_conflict;
        inner.opts.optimistic
            && inner.watch.is_none()
            && (inner.cache().get(g.key())).is_some_and(|c| c.writable_unread(versions))
    }

    /// The value an update's `f` starts from: the committed one, else
    /// `init()` if it may create the key.
    fn input(&self, g: &KeyGuard<K, V>, committed: &Option<Arc<V>>, create: bool) -> Result<V> {
        match committed {
            Some(v) => Ok(V::clone(v)),
            None if create => self.init_value(g),
            None => {
                Err(Error::not_found(format!("key {} does not exist", g.key())).with_path(g.path()))
            }
        }
    }

    /// Takes the live waiters whose calls storage was checked after
    /// (`observed`; every waiter when `None`); later ones stay queued for
    /// the next leader.
    fn take_waiters(&self, g: &KeyGuard<K, V>, observed: Option<Instant>) -> Vec<Waiter<V>> {
        let mut taken = self.inner.locks.take_queued(g.key(), |w| {
            w.tx.is_closed() || observed.is_none_or(|observed| w.call < observed)
        });
        // Our own entry (if we queued before leading) and cancelled waiters.
        taken.retain(|w| !w.tx.is_closed());
        taken
    }

    /// Hands `value` to waiter `w` and takes its answer. True when the
    /// waiter stays in the batch for the write's outcome (it changed the
    /// value, or decided on the `Provisional` committed value); false when
    /// it left (decided on the committed value, sent back to the queue, or
    /// cancelled).
    async fn apply(
        &self,
        g: &KeyGuard<K, V>,
        w: &Waiter<V>,
        value: &mut V,
        committed: &Option<Arc<V>>,
        basis: Basis,
    ) -> bool {
        match ask(w, value.clone(), Basis::Batch).await {
            Some(Reply::Changed(new)) => {
                *value = new;
                return true;
            }
            // It changed nothing, or failed, on a value that is not
            // committed yet: decide on the committed one instead.
            Some(Reply::Unchanged | Reply::Failed) => {}
            None => return false,
        }
        let input = match self.input(g, committed, w.create) {
            Ok(v) => v,
            Err(e) => {
                let _ = w.tx.send(ToWaiter::Done(Err(e)));
                return false;
            }
        };
        match ask(w, input, basis).await {
            Some(Reply::Changed(_)) => {
                // It wants to write after all, on the committed value: it
                // goes to the next batch, which starts from this one's.
                let _ = w.tx.send(ToWaiter::Requeue);
                false
            }
            Some(_) => basis == Basis::Provisional,
            None => false,
        }
    }
}

/// A waiter's result once its batch's write is over (`res`): the outcome
/// it decided on a provisional value if that write landed and so confirmed
/// the value; `None` (decide again) if it did not; else the write's.
fn settle(pending: Option<Result<()>>, res: Result<()>) -> Option<Result<()>> {
    match (pending, res) {
        (Some(own), Ok(())) => Some(own),
        (Some(_), Err(_)) => None,
        (None, res) => Some(res),
    }
}

/// Sends `value` to waiter `w`; `None` when it is gone.
async fn ask<V>(w: &Waiter<V>, value: V, basis: Basis) -> Option<Reply<V>> {
    let (reply, answer) = oneshot::channel();
    w.tx.send(ToWaiter::Apply {
        value,
        basis,
        reply,
    })
    .ok()?;
    answer.await.ok()
}
