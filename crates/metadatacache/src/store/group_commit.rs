//! `Store::update` with group commit: updates queued behind one key's lock
//! are applied one after another to the same value and written with a single
//! compare-and-swap.
//!
//! Every caller runs its own closure in its own task, so closures may borrow
//! from their caller's stack. The task that gets the lock leads: it runs its
//! own closure on the committed value, and only if that changes the value
//! does it take the queue of waiting updates and send the value along them
//! (a [`Chain`]: each waiter runs its `f` on it and hands it to the next
//! one, the last back to the leader, n + 1 hand-offs between tasks for n
//! waiters). It writes the final value once and tells each waiter that
//! changed it the outcome. A waiter cancelled with the value on its way to
//! it takes the value along: the leader runs its own `f` again, alone, and
//! the waiters after it queue again (nothing was written yet).
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
use super::batch::{Basis, Batch, Chain, Outcome, ToWaiter, Waiter, run, settle};
use super::guard::KeyGuard;
use super::stats::Counter;
use crate::error::{Error, ErrorKind, Result};

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
                        Some(ToWaiter::Chain(chain)) => {
                            match self.take_turn(chain, &key, &path, create, &mut f) {
                                Turn::Joined => pending = None,
                                Turn::Pending(own) => pending = Some(own),
                                Turn::Decided(own) => return own,
                                Turn::Requeued => break,
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
                            // A stale chain or Requeue from a leader that
                            // wrote nothing of ours (a leader cancelled
                            // before its write): dropping the chain sends
                            // its members back to the queue.
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
        // Whether the batch gave up on conflicts: its waiters ran their `f`
        // in every attempt since they joined, so they give up with it
        // instead of starting their count again behind another leader.
        let mut gave_up = false;
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
            let own_input = match self.input(g.key(), g.path(), &committed, create) {
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
            if !batch.waiters.is_empty() {
                let (back, returned) = oneshot::channel();
                Chain {
                    value,
                    committed: committed.clone(),
                    basis,
                    rest: batch.waiters.drain(..).collect(),
                    kept: Vec::new(),
                    back,
                }
                .pass_on();
                match returned.await {
                    Ok((batched, kept)) => {
                        value = batched;
                        batch.waiters = kept;
                    }
                    // A member was cancelled (or its `f` panicked) holding
                    // the chain: the others queue again by themselves, and
                    // the value went with it. Run our `f` again, alone.
                    Err(_) => {
                        unconfirmed = false;
                        continue;
                    }
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
                        gave_up = true;
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
        if wrote || gave_up {
            // Members that decided without a write take a give-up as "not
            // written" and decide again; the others share it.
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
        // Entries of callers that led themselves, or were cancelled, go now:
        // only a leader that takes waiters would clear them otherwise, and
        // on a key that is never idle they would pile up.
        drop(self.inner.locks.take_queued(g.key(), |w| w.tx.is_closed()));
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
    fn input(&self, key: &K, path: &str, committed: &Option<Arc<V>>, create: bool) -> Result<V> {
        match committed {
            Some(v) => Ok(V::clone(v)),
            None if create => self.init_value(key, path),
            None => Err(Error::not_found(format!("key {key} does not exist")).with_path(path)),
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

    /// A member's turn in its batch's chain: runs `f` on the batch's value
    /// and, when that changes nothing (or fails), on the committed value
    /// instead; then passes the chain on, itself among the members waiting
    /// for the write when its outcome depends on it.
    fn take_turn<F>(
        &self,
        mut chain: Chain<V>,
        key: &K,
        path: &str,
        create: bool,
        f: &mut F,
    ) -> Turn
    where
        F: FnMut(V) -> Result<(V, bool)>,
    {
        let Some(me) = chain.rest.pop_front() else {
            chain.pass_on();
            return Turn::Requeued;
        };
        if let Outcome::Changed(new) = run(f, chain.value.clone()) {
            chain.value = new;
            chain.kept.push(me);
            chain.pass_on();
            return Turn::Joined;
        }
        // It changed nothing, or failed, on a value that is not committed
        // yet: decide on the committed one instead.
        let turn = match self.input(key, path, &chain.committed, create) {
            Err(e) => Turn::Decided(Err(e)),
            Ok(input) => match run(f, input) {
                // It wants to write after all, on the committed value: it
                // goes to the next batch, which starts from this one's.
                Outcome::Changed(_) => Turn::Requeued,
                Outcome::Unchanged => decided(&mut chain, me, Ok(())),
                Outcome::Failed(e) => decided(&mut chain, me, Err(e)),
            },
        };
        chain.pass_on();
        turn
    }
}

/// A member decided `own` without a write: final on the committed value; on
/// a provisional one, standing only if the batch's write lands, so it waits
/// for it.
fn decided<V>(chain: &mut Chain<V>, me: Waiter<V>, own: Result<()>) -> Turn {
    match chain.basis {
        Basis::Committed => Turn::Decided(own),
        Basis::Provisional => {
            chain.kept.push(me);
            Turn::Pending(own)
        }
    }
}

/// What a member's turn in a batch came to.
enum Turn {
    /// It changed the batch's value: its outcome is the write's.
    Joined,
    /// It decided on a provisional value: this outcome stands if the
    /// batch's write lands.
    Pending(Result<()>),
    /// Its outcome, final.
    Decided(Result<()>),
    /// It takes part in a later batch.
    Requeued,
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::{MemoryStorage, Options, Store};

    /// Updates that write nothing, on a key that is never idle, leave no
    /// entries behind in its queue (each queued before it came to lead).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leaders_that_write_nothing_leave_no_queue_behind() {
        let store: Store<String, u64> = Store::new(
            Options::new(Arc::new(MemoryStorage::new()), |k: &String| k.clone()).init(|| 0),
        );
        store
            .update("k".into(), true, |n| Ok((n + 1, true)))
            .await
            .unwrap();
        let held = store.lock("k".into()).await;
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(
                    async move { store.update("k".into(), false, |n| Ok((n, false))).await },
                )
            })
            .collect();
        let key = "k".to_owned();
        // A hang detector, not a speed bound.
        let start = std::time::Instant::now();
        while store.inner.locks.queued(&key) < 50 {
            assert!(start.elapsed().as_secs() < 60, "the updates never queued");
            tokio::task::yield_now().await;
        }
        // Keeps the key busy after the 50 are done.
        let next = tokio::spawn({
            let store = store.clone();
            async move { store.lock("k".into()).await }
        });
        drop(held);
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let _busy = next.await.unwrap();
        let left = store.inner.locks.queued(&key);
        assert_eq!(left, 0, "entries left in the queue of a busy key");
    }
}
