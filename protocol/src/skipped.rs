//! The cache of message keys skipped over by out-of-order delivery.
//!
//! Lookups are O(1) (a hash map with a fixed-key SipHash, so nothing reads
//! the OS random source); eviction order is kept in a B-tree keyed by
//! insertion sequence, so the oldest key goes first and removal is
//! O(log n) rather than the O(n) of a front-inserted list. Only
//! authenticated messages ever insert keys, so a peer cannot flood the map.

use std::collections::BTreeMap;
#[allow(clippy::disallowed_types, reason = "see `SkippedKeys`")]
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, DefaultHasher, Hash};

use crate::time::Timestamp;

/// The most message keys a Double Ratchet chain may skip over at once.
pub const MAX_SKIP: u32 = 1_000;

/// The most skipped keys one conversation (or one sender key) keeps.
pub const MAX_SKIPPED_KEYS: usize = 2_000;

/// How long a skipped key is kept: 7 days, in milliseconds.
pub const SKIPPED_KEY_MAX_AGE_MS: u64 = 7 * 24 * 60 * 60 * 1000;

#[derive(Clone)]
struct Slot<V> {
    key: V,
    created_at: Timestamp,
    seq: u64,
}

/// Skipped message keys, bounded, oldest evicted first.
#[derive(Clone)]
#[allow(
    clippy::disallowed_types,
    reason = "lookup only, with a fixed-key hasher; eviction and encoding go by `by_age`, so no output sees this map's order"
)]
pub(crate) struct SkippedKeys<K, V> {
    by_id: HashMap<K, Slot<V>, BuildHasherDefault<DefaultHasher>>,
    by_age: BTreeMap<u64, K>,
    next_seq: u64,
}

impl<K: Eq + Hash + Clone, V> SkippedKeys<K, V> {
    pub(crate) fn new() -> Self {
        #[allow(clippy::disallowed_types, reason = "see the struct")]
        Self { by_id: HashMap::default(), by_age: BTreeMap::new(), next_seq: 0 }
    }

    pub(crate) fn len(&self) -> usize {
        self.by_id.len()
    }

    pub(crate) fn get(&self, id: &K) -> Option<&V> {
        self.by_id.get(id).map(|slot| &slot.key)
    }

    /// Makes room for `additional` inserts at once, so a long skip does not
    /// rehash the map several times over.
    pub(crate) fn reserve(&mut self, additional: usize) {
        self.by_id.reserve(additional.min(MAX_SKIPPED_KEYS));
    }

    /// Inserts, evicting the oldest entries beyond [`MAX_SKIPPED_KEYS`].
    pub(crate) fn insert(&mut self, id: K, key: V, created_at: Timestamp) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(old) = self.by_id.insert(id.clone(), Slot { key, created_at, seq }) {
            self.by_age.remove(&old.seq);
        }
        self.by_age.insert(seq, id);
        while self.by_id.len() > MAX_SKIPPED_KEYS {
            let Some((_, oldest)) = self.by_age.pop_first() else { break };
            self.by_id.remove(&oldest);
        }
    }

    /// When the oldest entry was cached.
    pub(crate) fn oldest_created_at(&self) -> Option<Timestamp> {
        let (_, id) = self.by_age.first_key_value()?;
        self.by_id.get(id).map(|slot| slot.created_at)
    }

    /// Evicts the oldest entry (for a budget shared between caches).
    pub(crate) fn pop_oldest(&mut self) {
        if let Some((_, id)) = self.by_age.pop_first() {
            self.by_id.remove(&id);
        }
    }

    pub(crate) fn remove(&mut self, id: &K) -> Option<V> {
        let slot = self.by_id.remove(id)?;
        self.by_age.remove(&slot.seq);
        Some(slot.key)
    }

    /// Drops every key created before `cutoff`; returns how many.
    pub(crate) fn remove_created_before(&mut self, cutoff: Timestamp) -> usize {
        let before = self.by_id.len();
        let by_id = &mut self.by_id;
        self.by_age.retain(|_, id| match by_id.get(id) {
            Some(slot) if slot.created_at < cutoff => {
                by_id.remove(id);
                false
            }
            _ => true,
        });
        before - self.by_id.len()
    }

    /// Entries oldest first: (id, key, created_at).
    pub(crate) fn iter_oldest_first(&self) -> impl Iterator<Item = (&K, &V, Timestamp)> {
        self.by_age
            .values()
            .filter_map(|id| self.by_id.get_key_value(id).map(|(k, slot)| (k, &slot.key, slot.created_at)))
    }
}

/// Evicts the oldest entries (by time cached) across caches that share one
/// budget of [`MAX_SKIPPED_KEYS`], such as every session with a peer or every
/// sender key of a group.
pub(crate) fn enforce_shared_budget<K: Eq + Hash + Clone, V>(mut caches: Vec<&mut SkippedKeys<K, V>>) {
    let mut total: usize = caches.iter().map(|c| c.len()).sum();
    while total > MAX_SKIPPED_KEYS {
        let oldest =
            caches.iter_mut().filter_map(|c| c.oldest_created_at().map(|at| (at, c))).min_by_key(|(at, _)| *at);
        let Some((_, cache)) = oldest else { break };
        cache.pop_oldest();
        total -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_oldest_beyond_the_cap() {
        let mut cache = SkippedKeys::new();
        for n in 0..(MAX_SKIPPED_KEYS as u32 + 5) {
            cache.insert(n, n, Timestamp(u64::from(n)));
        }
        assert_eq!(cache.len(), MAX_SKIPPED_KEYS);
        assert!(cache.get(&4).is_none());
        assert!(cache.get(&5).is_some());
        assert_eq!(cache.iter_oldest_first().next().map(|(k, _, _)| *k), Some(5));
    }

    #[test]
    fn removes_by_age_and_by_id() {
        let mut cache = SkippedKeys::new();
        for n in 0..10u32 {
            cache.insert(n, n, Timestamp(u64::from(n) * 10));
        }
        assert_eq!(cache.remove(&3), Some(3));
        assert_eq!(cache.remove(&3), None);
        assert_eq!(cache.remove_created_before(Timestamp(50)), 4);
        assert_eq!(cache.len(), 5);
        assert_eq!(cache.iter_oldest_first().map(|(k, _, _)| *k).collect::<Vec<_>>(), vec![5, 6, 7, 8, 9]);
    }
}
