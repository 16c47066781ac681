//! Values derived from the jobs (encoded `GET /jobs` bodies, counts by status), kept while no
//! job changes. Clients poll their job list; the store's job version says when to recompute.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

/// At most this many entries; a full cache is emptied and starts over.
const MAX_ENTRIES: usize = 256;

pub struct JobsCache<K, V> {
    entries: Mutex<HashMap<K, (u64, V)>>,
}

impl<K, V> Default for JobsCache<K, V> {
    fn default() -> Self {
        JobsCache {
            entries: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq, V: Clone> JobsCache<K, V> {
    /// The value kept for `key` if it was computed at job version `version`.
    pub fn get(&self, key: &K, version: u64) -> Option<V> {
        let entries = self.entries.lock().ok()?;
        match entries.get(key) {
            Some((at, value)) if *at == version => Some(value.clone()),
            _ => None,
        }
    }

    /// Keeps `value`, computed from the store at job version `version`. The version must have
    /// been read before the store was: a job written meanwhile then makes the value stale at
    /// once, never wrongly fresh.
    pub fn put(&self, key: K, version: u64, value: V) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= MAX_ENTRIES && !entries.contains_key(&key) {
                entries.clear();
            }
            entries.insert(key, (version, value));
        }
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
