//! The parts of a group-commit batch: the waiters queued behind a key's
//! lock, the chain that carries the batch's value from member to member,
//! and the outcome each member is told (see [`group_commit`](super::group_commit)).

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, ErrorKind, Result};

/// An update waiting for its key's lock, queued for the next batch leader.
pub(super) struct Waiter<V> {
    pub(super) tx: mpsc::UnboundedSender<ToWaiter<V>>,
    pub(super) create: bool,
    pub(super) call: Instant,
}

impl<V> fmt::Debug for Waiter<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Waiter")
            .field("create", &self.create)
            .finish_non_exhaustive()
    }
}

/// What the value a member falls back to (when its `f` changes nothing on
/// the batch's value) is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Basis {
    /// Exactly what storage holds: a decision without a write is final.
    Committed,
    /// The cached version, not confirmed since the call (an optimistic
    /// batch): a decision without a write stands only if the batch's
    /// compare-and-swap on that version lands.
    Provisional,
}

/// What a leader (or the member before) tells a waiter.
pub(super) enum ToWaiter<V> {
    /// Your turn in the batch: run your `f`, then pass the chain on.
    Chain(Chain<V>),
    /// Wait for the lock again: your update takes part in a later batch.
    Requeue,
    /// The batch's write is over; this is your result.
    Done(Result<()>),
}

/// A batch's value on its way through its members: each runs its `f` on
/// it and hands it to the next member itself, the last one back to the
/// leader, so a batch of n members costs n + 1 hand-offs between tasks
/// (a member's `f` may borrow from its caller's stack, so it runs in the
/// member's task).
///
/// A member cancelled before its turn drops the chain: every member not
/// yet told its outcome then sees its channel close and queues again, and
/// the leader sees `back` close. Nothing of theirs was written: the chain
/// is over before the batch's write is sent.
pub(super) struct Chain<V> {
    /// The batch's value so far.
    pub(super) value: V,
    /// The value a member whose `f` changes nothing on the batch's value
    /// decides on instead, and what it is.
    pub(super) committed: Option<Arc<V>>,
    pub(super) basis: Basis,
    /// The member this is sent to (first), and the ones after it.
    pub(super) rest: VecDeque<Waiter<V>>,
    /// The members waiting for the batch's write.
    pub(super) kept: Vec<Waiter<V>>,
    pub(super) back: oneshot::Sender<(V, Vec<Waiter<V>>)>,
}

impl<V> Chain<V> {
    /// Hands the chain to the first member of `rest` still waiting (the
    /// member that got it has taken itself off), or back to the leader
    /// when there is none.
    pub(super) fn pass_on(mut self) {
        while let Some(next) = self.rest.front() {
            let tx = next.tx.clone();
            match tx.send(ToWaiter::Chain(self)) {
                Ok(()) => return,
                Err(mpsc::error::SendError(msg)) => {
                    let ToWaiter::Chain(chain) = msg else {
                        unreachable!("the message just sent")
                    };
                    self = chain;
                    // Cancelled meanwhile.
                    self.rest.pop_front();
                }
            }
        }
        let _ = self.back.send((self.value, self.kept));
    }
}

/// The waiters of one batch that changed the value and wait for the write.
/// Dropping it tells them their outcome, also when the leader's future is
/// dropped half-way.
pub(super) struct Batch<V> {
    pub(super) waiters: Vec<Waiter<V>>,
    /// A write was sent and its outcome is not known yet.
    pub(super) writing: bool,
}

impl<V> Batch<V> {
    pub(super) fn finish(&mut self, res: &Result<()>) {
        for w in self.waiters.drain(..) {
            let _ = w.tx.send(ToWaiter::Done(match res {
                Ok(()) => Ok(()),
                Err(e) => Err(e.duplicate()),
            }));
        }
    }

    pub(super) fn requeue_all(&mut self) {
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
pub(super) enum Outcome<V> {
    Changed(V),
    Unchanged,
    Failed(Error),
}

pub(super) fn run<V, F>(f: &mut F, value: V) -> Outcome<V>
where
    F: FnMut(V) -> Result<(V, bool)>,
{
    match f(value) {
        Ok((new, true)) => Outcome::Changed(new),
        Ok((_, false)) => Outcome::Unchanged,
        Err(e) => Outcome::Failed(e),
    }
}

/// A waiter's result once its batch's write is over (`res`): the outcome
/// it decided on a provisional value if that write landed and so confirmed
/// the value; `None` (decide again) if it did not; else the write's.
pub(super) fn settle(pending: Option<Result<()>>, res: Result<()>) -> Option<Result<()>> {
    match (pending, res) {
        (Some(own), Ok(())) => Some(own),
        (Some(_), Err(_)) => None,
        (None, res) => Some(res),
    }
}
