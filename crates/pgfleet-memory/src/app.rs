//! The shared state of the service: one fleet, the database, and the
//! per-user services created once each.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use pgfleet::{Fleet, PoolConfig, Target};

use crate::cache::{CacheStats, ServiceCache};
use crate::error::MemoryError;
use crate::precache::PrecacheEntry;
use crate::services::UserServices;

/// Shared state of the service.
pub struct App {
    fleet: Fleet,
    target: Target,
    config: PoolConfig,
    services: ServiceCache<String, UserServices>,
    ready: AtomicBool,
}

impl App {
    /// The service on `fleet`, storing in `target` through pools made with
    /// `config`. Not ready until [`set_ready`](Self::set_ready).
    pub fn new(fleet: Fleet, target: Target, config: PoolConfig) -> App {
        App {
            fleet,
            target,
            config,
            services: ServiceCache::new(),
            ready: AtomicBool::new(false),
        }
    }

    /// The fleet.
    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    /// The services of `user`, created once.
    ///
    /// # Errors
    /// The fleet's error (closed, invalid configuration).
    pub async fn user(self: &Arc<Self>, user: &str) -> Result<Arc<UserServices>, MemoryError> {
        self.services
            .get_or_try_init(&user.to_owned(), || async {
                UserServices::new(&self.fleet, &self.target, &self.config, user)
            })
            .await
    }

    /// Creates the services of every entry (`precache_configs`); a failure
    /// is logged and the others still go ahead.
    pub async fn precache(self: &Arc<Self>, entries: &[PrecacheEntry]) {
        for entry in entries {
            match self.user(&entry.user).await {
                Ok(_) => tracing::info!(user = %entry.user, "services pre-created"),
                Err(e) => {
                    tracing::warn!(user = %entry.user, error = %e, "pre-creating services failed")
                }
            }
        }
    }

    /// Counts of the per-user service cache.
    pub fn service_stats(&self) -> CacheStats {
        self.services.stats()
    }

    /// Drops every user's services (and so their pool handles).
    pub fn clear_services(&self) {
        self.services.clear();
    }

    /// Whether warm-up and pre-caching finished.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Marks warm-up and pre-caching finished (`/health` says `ready`).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }
}
