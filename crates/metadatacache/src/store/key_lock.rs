//! A table of per-key async locks that forgets a key as soon as nobody holds
//! or waits for its lock.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

use foldhash::fast::RandomState;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

type Slot = Arc<AsyncMutex<()>>;

/// A key's lock and the number of tasks holding or waiting for it. The count
/// is kept explicitly (not read off the `Arc`) so that it is exact at every
/// moment the table lock is held, also while a cancelled waiter is unwinding.
#[derive(Debug)]
struct Entry<Q> {
    slot: Slot,
    users: usize,
    /// Values queued by waiters for whoever holds the lock next (see
    /// [`KeyLocks::lock_queued`]); dropped with the entry.
    queue: Vec<Q>,
}

impl<Q> Default for Entry<Q> {
    fn default() -> Self {
        Entry {
            slot: Slot::default(),
            users: 0,
            queue: Vec::new(),
        }
    }
}

/// Per-key mutual exclusion. Locks on different keys never wait for each
/// other.
#[derive(Debug)]
pub(super) struct KeyLocks<K, Q = ()> {
    // A std mutex, never held across an await: it only guards the lookup.
    table: Mutex<HashMap<K, Entry<Q>, RandomState>>,
}

impl<K, Q> KeyLocks<K, Q> {
    pub(super) fn new() -> Self {
        KeyLocks {
            table: Mutex::new(HashMap::default()),
        }
    }

    fn table(&self) -> MutexGuard<'_, HashMap<K, Entry<Q>, RandomState>> {
        // Every critical section is a single map operation; a poisoned map is
        // still consistent.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of keys currently locked or waited for.
    pub(super) fn len(&self) -> usize {
        self.table().len()
    }
}

impl<K: Eq + Hash + Clone, Q> KeyLocks<K, Q> {
    /// Number of tasks holding or waiting for the lock on `key`.
    pub(super) fn users(&self, key: &K) -> usize {
        self.table().get(key).map_or(0, |e| e.users)
    }

    /// Waits for the lock on `key`.
    ///
    /// # Cancel safety
    /// Cancel safe: a waiter dropped before it gets the lock leaves no trace
    /// in the table.
    pub(super) async fn lock(self: &Arc<Self>, key: K) -> KeyLockGuard<K, Q> {
        self.lock_inner(key, None).await
    }

    /// Like [`lock`](Self::lock), and also queues `item` for the holder of
    /// the lock, in the same step: a holder that takes the queue afterwards
    /// sees `item`.
    pub(super) async fn lock_queued(self: &Arc<Self>, key: K, item: Q) -> KeyLockGuard<K, Q> {
        self.lock_inner(key, Some(item)).await
    }

    /// The lock on `key` if nobody holds or waits for it, without waiting.
    pub(super) fn try_lock(self: &Arc<Self>, key: &K) -> Option<KeyLockGuard<K, Q>> {
        let mut table = self.table();
        if table.contains_key(key) {
            return None; // held or awaited: queue up instead
        }
        let entry = table.entry(key.clone()).or_default();
        let Ok(guard) = Arc::clone(&entry.slot).try_lock_owned() else {
            // Unreachable for a fresh entry; never leave it behind.
            table.remove(key);
            return None;
        };
        entry.users = 1;
        drop(table);
        Some(KeyLockGuard {
            locks: Arc::clone(self),
            key: Some(key.clone()),
            guard: Some(guard),
        })
    }

    /// Takes the items queued for `key`'s lock holder for which `take` is
    /// true, oldest first; the others stay queued in their order.
    pub(super) fn take_queued(&self, key: &K, mut take: impl FnMut(&Q) -> bool) -> Vec<Q> {
        let mut table = self.table();
        let Some(entry) = table.get_mut(key) else {
            return Vec::new();
        };
        let (taken, kept) = std::mem::take(&mut entry.queue)
            .into_iter()
            .partition(|q| take(q));
        entry.queue = kept;
        taken
    }

    /// How many items are queued for `key`.
    #[cfg(test)]
    pub(super) fn queued(&self, key: &K) -> usize {
        self.table().get(key).map_or(0, |e| e.queue.len())
    }

    /// The greatest `f(item)` over the items queued for `key`.
    pub(super) fn newest_queued<T: Ord>(&self, key: &K, f: impl Fn(&Q) -> T) -> Option<T> {
        self.table().get(key)?.queue.iter().map(f).max()
    }

    /// Puts `items` back at the front of `key`'s queue (they were taken by
    /// a holder that did not use them). Dropped if nobody holds or waits
    /// for the lock any more.
    pub(super) fn requeue(&self, key: &K, items: Vec<Q>) {
        if items.is_empty() {
            return;
        }
        if let Some(entry) = self.table().get_mut(key) {
            let rest = std::mem::replace(&mut entry.queue, items);
            entry.queue.extend(rest);
        }
    }

    async fn lock_inner(self: &Arc<Self>, key: K, item: Option<Q>) -> KeyLockGuard<K, Q> {
        let slot = {
            let mut table = self.table();
            let entry = table.entry(key.clone()).or_default();
            entry.users += 1;
            entry.queue.extend(item);
            Arc::clone(&entry.slot)
        };
        // The ticket is created before the await so that a cancelled waiter
        // still runs the clean-up in its Drop.
        let mut ticket = KeyLockGuard {
            locks: Arc::clone(self),
            key: Some(key),
            guard: None,
        };
        ticket.guard = Some(slot.lock_owned().await);
        ticket
    }
}

/// Holds the lock on one key; dropping it unlocks.
#[derive(Debug)]
pub(super) struct KeyLockGuard<K: Eq + Hash + Clone, Q = ()> {
    locks: Arc<KeyLocks<K, Q>>,
    key: Option<K>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl<K: Eq + Hash + Clone, Q> KeyLockGuard<K, Q> {
    pub(super) fn key(&self) -> &K {
        // Only taken in Drop.
        self.key.as_ref().unwrap_or_else(|| unreachable!())
    }
}

impl<K: Eq + Hash + Clone, Q> Drop for KeyLockGuard<K, Q> {
    fn drop(&mut self) {
        let mut table = self.locks.table();
        // Release under the table lock so that a new waiter either finds
        // the entry (and counts itself in) or creates a fresh one.
        self.guard.take();
        if let Some(key) = self.key.take()
            && let Some(entry) = table.get_mut(&key)
        {
            entry.users -= 1;
            if entry.users == 0 {
                table.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn forgets_keys_when_unlocked() {
        let locks = Arc::new(KeyLocks::<_, ()>::new());
        for i in 0..1000 {
            let _g = locks.lock(i).await;
            assert_eq!(locks.len(), 1);
        }
        assert_eq!(locks.len(), 0);
    }

    #[tokio::test]
    async fn cancelled_waiter_leaves_no_entry() {
        let locks = Arc::new(KeyLocks::<_, ()>::new());
        let g = locks.lock("k").await;
        let waiter = tokio::time::timeout(Duration::from_millis(10), locks.lock("k")).await;
        assert!(waiter.is_err());
        assert_eq!(locks.len(), 1);
        drop(g);
        assert_eq!(locks.len(), 0);
    }

    #[tokio::test]
    async fn same_key_is_exclusive() {
        let locks = Arc::new(KeyLocks::<_, ()>::new());
        let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let locks = Arc::clone(&locks);
            let counter = Arc::clone(&counter);
            tasks.push(tokio::spawn(async move {
                for _ in 0..50 {
                    let _g = locks.lock(1).await;
                    let seen = counter.load(std::sync::atomic::Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    counter.store(seen + 1, std::sync::atomic::Ordering::SeqCst);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(counter.load(std::sync::atomic::Ordering::SeqCst), 400);
        assert_eq!(locks.len(), 0);
    }
}
