//! Shortcuts kept in memory: a bounded map (token caches, Keystone's answers), and values
//! derived from the jobs (encoded `GET /jobs` bodies, counts by status) kept while no job
//! changes. Clients poll their job list; the store's job version says when to recompute.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

/// A map of at most `capacity` entries behind a lock. A full map is emptied and starts over:
/// what it holds is only a shortcut, always recomputed when missing.
pub struct Bounded<K, V> {
    capacity: usize,
    entries: Mutex<HashMap<K, V>>,
}

impl<K: Hash + Eq, V> Bounded<K, V> {
    pub fn new(capacity: usize) -> Self {
        Bounded {
            capacity,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn get(&self, key: &K) -> Option<V>
    where
        V: Clone,
    {
        self.entries.lock().ok()?.get(key).cloned()
    }

    pub fn contains(&self, key: &K) -> bool {
        self.entries.lock().is_ok_and(|e| e.contains_key(key))
    }

    pub fn insert(&self, key: K, value: V) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= self.capacity && !entries.contains_key(&key) {
                entries.clear();
            }
            entries.insert(key, value);
        }
    }

    pub fn remove(&self, key: &K) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.remove(key);
        }
    }

    /// Keeps only the entries for which `keep` holds.
    pub fn retain(&self, keep: impl Fn(&K, &V) -> bool) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.retain(|k, v| keep(k, v));
        }
    }

    pub fn clear(&self) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.clear();
        }
    }

    pub fn len(&self) -> usize {
        self.entries.lock().map_or(0, |e| e.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Job-derived values kept this many at most.
const MAX_ENTRIES: usize = 256;

/// Values computed from the store at a job version, reused while it stays the same.
pub struct JobsCache<K, V>(Bounded<K, (u64, V)>);

impl<K: Hash + Eq, V> Default for JobsCache<K, V> {
    fn default() -> Self {
        JobsCache(Bounded::new(MAX_ENTRIES))
    }
}

impl<K: Hash + Eq, V: Clone> JobsCache<K, V> {
    /// The value kept for `key` if it was computed at job version `version`.
    pub fn get(&self, key: &K, version: u64) -> Option<V> {
        match self.0.get(key)? {
            (at, value) if at == version => Some(value),
            _ => None,
        }
    }

    /// Keeps `value`, computed from the store at job version `version`. The version must have
    /// been read before the store was: a job written meanwhile then makes the value stale at
    /// once, never wrongly fresh.
    pub fn put(&self, key: K, version: u64, value: V) {
        self.0.insert(key, (version, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_reused_only_at_the_same_version() {
        let cache = JobsCache::<&str, u32>::default();
        assert_eq!(cache.get(&"k", 1), None);
        cache.put("k", 1, 10);
        assert_eq!(cache.get(&"k", 1), Some(10));
        assert_eq!(cache.get(&"k", 2), None);
        assert_eq!(cache.get(&"other", 1), None);
    }

    #[test]
    fn a_full_cache_starts_over() {
        let cache = JobsCache::<usize, usize>::default();
        for k in 0..=MAX_ENTRIES {
            cache.put(k, 0, k);
        }
        assert_eq!(cache.get(&MAX_ENTRIES, 0), Some(MAX_ENTRIES));
        assert_eq!(cache.get(&0, 0), None);
    }
}
