//! A keyed, single-flight async cache of per-user services, with hit and
//! miss counts (seed 004's pre-cached services).

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;
use tokio::sync::OnceCell;

/// Values created once per key, even when many callers ask at once; a
/// failed creation is not cached (the next caller tries again).
pub struct ServiceCache<K, V> {
    entries: Mutex<HashMap<K, Arc<OnceCell<Arc<V>>>>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// Counts of a [`ServiceCache`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CacheStats {
    /// Values held.
    pub entries: usize,
    /// Lookups served by an existing value (or by another caller's creation
    /// in flight).
    pub hits: u64,
    /// Lookups that created the value.
    pub misses: u64,
}

impl<K: Hash + Eq + Clone, V> Default for ServiceCache<K, V> {
    fn default() -> Self {
        ServiceCache {
            entries: Mutex::new(HashMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }
}

impl<K: Hash + Eq + Clone, V> ServiceCache<K, V> {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The value for `key`, created by `init` if there is none; concurrent
    /// callers for one key share one creation.
    ///
    /// # Errors
    /// `init`'s error, to the caller whose creation failed.
    ///
    /// # Cancel safety
    /// Dropping the future while `init` runs abandons that creation; the next
    /// caller starts a new one.
    pub async fn get_or_try_init<F, Fut, E>(&self, key: &K, init: F) -> Result<Arc<V>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let cell = {
            let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
            entries.entry(key.clone()).or_default().clone()
        };
        let created = AtomicBool::new(false);
        let value = cell
            .get_or_try_init(|| async {
                created.store(true, Ordering::Relaxed);
                init().await.map(Arc::new)
            })
            .await?
            .clone();
        let counter = if created.load(Ordering::Relaxed) {
            &self.misses
        } else {
            &self.hits
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(value)
    }

    /// The value for `key` if it was created.
    pub fn get(&self, key: &K) -> Option<Arc<V>> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.get(key).and_then(|cell| cell.get().cloned())
    }

    /// Hit and miss counts and the number of values.
    pub fn stats(&self) -> CacheStats {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        CacheStats {
            entries: entries.values().filter(|c| c.initialized()).count(),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }

    /// Drops every value.
    pub fn clear(&self) {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test]
    async fn concurrent_first_requests_create_once() {
        let cache: Arc<ServiceCache<String, usize>> = Arc::new(ServiceCache::new());
        let created = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (cache, created) = (cache.clone(), created.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_try_init(&"alice".to_owned(), || async {
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        Ok::<_, ()>(created.fetch_add(1, Ordering::SeqCst))
                    })
                    .await
                    .unwrap()
            }));
        }
        for t in tasks {
            assert_eq!(*t.await.unwrap(), 0);
        }
        assert_eq!(created.load(Ordering::SeqCst), 1);
        assert_eq!(
            cache.stats(),
            CacheStats {
                entries: 1,
                hits: 49,
                misses: 1
            }
        );
    }

    #[tokio::test]
    async fn failures_are_not_cached() {
        let cache: ServiceCache<u32, u32> = ServiceCache::new();
        assert!(cache
            .get_or_try_init(&1, || async { Err::<u32, _>("down") })
            .await
            .is_err());
        assert_eq!(
            *cache
                .get_or_try_init(&1, || async { Ok::<_, &str>(7) })
                .await
                .unwrap(),
            7
        );
        assert_eq!(cache.get(&1).as_deref(), Some(&7));
        assert_eq!(cache.stats().entries, 1);
    }
}
