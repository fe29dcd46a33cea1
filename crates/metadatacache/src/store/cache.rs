//! The committed-value cache of a [`Store`](crate::Store), optionally
//! bounded by entries and bytes.
//!
//! Eviction is CLOCK (second chance): entries sit in a ring in insertion
//! order; a read marks an entry referenced; the hand skips (and clears)
//! referenced entries, skips entries whose key is locked or awaited, and
//! evicts the first idle, unreferenced one. Amortised O(1) per insert.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Arc;
use std::time::Instant;

use foldhash::fast::RandomState;

/// A committed cache entry: exactly what storage held at `validated`.
pub(super) struct Cached<V> {
    pub(super) value: Arc<V>,
    pub(super) etag: Arc<str>,
    /// When the round trip that last confirmed this entry began. Storage held
    /// this version at some moment after it.
    pub(super) validated: Instant,
    /// Encoded size of the document, for the byte bound.
    pub(super) size: usize,
    /// Set by [`Cache::clear`] on an entry in use: its next read
    /// revalidates, whatever `validated` says.
    pub(super) must_revalidate: bool,
    /// The watch's notification number when the call that confirmed this
    /// entry began (see [`Watch`](super::watch::Watch)).
    pub(super) watch_seq: u64,
    /// The round trip that made this entry found a version written
    /// elsewhere: the next update revalidates before it writes, unless a
    /// refused write brings the stored version back (see
    /// [`Options::optimistic_writes`](crate::Options::optimistic_writes)).
    pub(super) changed_elsewhere: bool,
    referenced: bool,
}

impl<V> Cached<V> {
    pub(super) fn new(
        value: Arc<V>,
        etag: Arc<str>,
        validated: Instant,
        watch_seq: u64,
        size: usize,
    ) -> Self {
        Cached {
            value,
            etag,
            validated,
            size,
            must_revalidate: false,
            watch_seq,
            changed_elsewhere: false,
            referenced: false,
        }
    }

    /// Whether an update may write from this entry without revalidating it
    /// (see [`Options::optimistic_writes`](crate::Options::optimistic_writes)):
    /// nothing asked for a revalidation, and the last round trip found no
    /// other writer, or a refusal brings the stored version back
    /// (`versions`), which costs the round trip a read would.
    pub(super) fn writable_unread(&self, versions: bool) -> bool {
        !self.must_revalidate && (versions || !self.changed_elsewhere)
    }
}

/// Limits of a cache; `usize::MAX` means unbounded.
#[derive(Debug, Clone, Copy)]
pub(super) struct Capacity {
    pub(super) entries: usize,
    pub(super) bytes: usize,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            entries: usize::MAX,
            bytes: usize::MAX,
        }
    }
}

impl Capacity {
    fn bounded(&self) -> bool {
        self.entries != usize::MAX || self.bytes != usize::MAX
    }
}

pub(super) struct Cache<K, V> {
    // foldhash: fast, and seeded per process (keys may come from users).
    map: HashMap<K, Cached<V>, RandomState>,
    /// Keys in insertion order, for the CLOCK hand; only kept when bounded.
    /// May hold keys already removed from `map` (skipped when reached).
    ring: VecDeque<K>,
    bytes: usize,
    capacity: Capacity,
}

impl<K: Eq + Hash + Clone, V> Cache<K, V> {
    pub(super) fn new(capacity: Capacity) -> Self {
        Cache {
            map: HashMap::default(),
            ring: VecDeque::new(),
            bytes: 0,
            capacity,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// Approximate bytes held (sum of encoded document sizes).
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(super) fn contains_key(&self, key: &K) -> bool {
        self.map.contains_key(key)
    }

    /// Looks an entry up and marks it recently used.
    pub(super) fn get(&mut self, key: &K) -> Option<&Cached<V>> {
        self.get_mut(key).map(|c| &*c)
    }

    pub(super) fn get_mut(&mut self, key: &K) -> Option<&mut Cached<V>> {
        let c = self.map.get_mut(key)?;
        c.referenced = true;
        Some(c)
    }

    pub(super) fn remove(&mut self, key: &K) {
        if let Some(old) = self.map.remove(key) {
            self.bytes -= old.size;
        }
    }

    /// Drops every entry whose key is idle; entries of busy keys (locked
    /// or awaited: a guard may be reading them) stay, marked so that their
    /// next read revalidates.
    pub(super) fn clear(&mut self, busy: impl Fn(&K) -> bool) {
        let mut bytes = 0;
        self.map.retain(|k, c| {
            let keep = busy(k);
            if keep {
                c.must_revalidate = true;
                bytes += c.size;
            }
            keep
        });
        self.bytes = bytes;
        let map = &self.map;
        self.ring.retain(|k| map.contains_key(k));
    }

    /// Inserts or replaces `key`'s entry, then evicts idle entries while over
    /// capacity. `busy` tells whether a key is locked or awaited (never
    /// evicted); the key being inserted is busy by construction.
    /// Returns the entry it replaced, for the caller to drop once it has
    /// released the cache (freeing a large value takes a while).
    pub(super) fn insert(
        &mut self,
        key: K,
        entry: Cached<V>,
        busy: impl Fn(&K) -> bool,
    ) -> Option<Cached<V>> {
        self.bytes += entry.size;
        let bounded = self.capacity.bounded();
        let old = self.map.insert(key.clone(), entry);
        match &old {
            Some(old) => self.bytes -= old.size,
            None if bounded => self.ring.push_back(key),
            None => {}
        }
        if bounded {
            self.evict(&busy);
        }
        old
    }

    fn over(&self) -> bool {
        self.map.len() > self.capacity.entries || self.bytes > self.capacity.bytes
    }

    fn evict(&mut self, busy: &impl Fn(&K) -> bool) {
        // One full turn of the hand over the live entries (plus the stale
        // keys it drops) bounds the work; if everything is busy or was just
        // used, the cache stays over capacity until the next insert.
        let mut budget = 2 * self.map.len() + 1;
        while self.over() && budget > 0 {
            budget -= 1;
            let Some(key) = self.ring.pop_front() else {
                break;
            };
            let Some(entry) = self.map.get_mut(&key) else {
                continue; // removed earlier: drop the stale ring slot
            };
            if entry.referenced || busy(&key) {
                entry.referenced = false;
                self.ring.push_back(key);
                continue;
            }
            if let Some(old) = self.map.remove(&key) {
                self.bytes -= old.size;
            }
        }
        // Stale slots from removals: compact when they dominate.
        if self.ring.len() > 2 * self.map.len() + 1024 {
            let map = &self.map;
            self.ring.retain(|k| map.contains_key(k));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(size: usize) -> Cached<u32> {
        Cached::new(Arc::new(0), Arc::from("e"), Instant::now(), 0, size)
    }

    #[test]
    fn bounded_by_entries_and_bytes() {
        let mut c = Cache::new(Capacity {
            entries: 10,
            bytes: usize::MAX,
        });
        for i in 0..1000 {
            c.insert(i, entry(1), |_| false);
        }
        assert_eq!(c.len(), 10);
        let mut c = Cache::new(Capacity {
            entries: usize::MAX,
            bytes: 100,
        });
        for i in 0..1000 {
            c.insert(i, entry(30), |_| false);
        }
        assert!(c.bytes() <= 100);
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn busy_and_recent_entries_survive() {
        let mut c = Cache::new(Capacity {
            entries: 3,
            bytes: usize::MAX,
        });
        c.insert(0, entry(1), |_| false);
        c.insert(1, entry(1), |_| false);
        c.insert(2, entry(1), |_| false);
        c.get(&1);
        // Key 0 is locked: 2 is the idle, unreferenced victim.
        c.insert(3, entry(1), |k| *k == 0);
        assert!(c.contains_key(&0) && c.contains_key(&1) && c.contains_key(&3));
        assert!(!c.contains_key(&2));
    }

    #[test]
    fn removals_do_not_grow_the_ring() {
        let mut c = Cache::new(Capacity {
            entries: 5,
            bytes: usize::MAX,
        });
        for i in 0..100_000 {
            c.insert(i, entry(1), |_| false);
            c.remove(&i);
        }
        assert!(c.ring.len() <= 2 * c.len() + 1025);
        assert_eq!(c.bytes(), 0);
    }
}
