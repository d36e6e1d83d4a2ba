//! The shared state of the service: one fleet, the database, and the
//! per-user services created once each.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use pgfleet::{Fleet, PoolConfig, Target};

use crate::cache::{CacheStats, ServiceCache};
use crate::error::MemoryError;
use crate::precache::PrecacheEntry;
use crate::schema::create_schema;
use crate::services::UserServices;

/// How long start-up waits before it tries the database again.
const START_UP_RETRY: Duration = Duration::from_secs(1);
/// The longest one start-up attempt waits for a connection, so that
/// `/health` reports an unreachable database soon.
const START_UP_ATTEMPT: Duration = Duration::from_secs(5);

/// Where the service is in its start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Not tried the database yet.
    Starting,
    /// The database could not be reached (or the schema not created); the
    /// reason, and start-up tries again.
    Degraded(String),
    /// The schema exists; warm-up and pre-caching may still run.
    Serving,
    /// Start-up finished.
    Ready,
}

/// Shared state of the service.
pub struct App {
    fleet: Fleet,
    target: Target,
    config: PoolConfig,
    services: ServiceCache<String, UserServices>,
    ready: AtomicBool,
    /// The schema exists: the API may touch the database.
    schema: AtomicBool,
    /// Why the last start-up attempt failed, while it has not succeeded.
    startup_error: Mutex<Option<String>>,
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
            schema: AtomicBool::new(false),
            startup_error: Mutex::new(None),
        }
    }

    /// The start-up: creates the schema, trying again every second while
    /// the database cannot be reached (`phase` says why), then warms the
    /// pools and pre-creates the users' services, and marks the service
    /// ready. Runs until it has succeeded; abort its task to stop it.
    pub async fn start_up(
        self: &Arc<Self>,
        warm: Vec<(Target, PoolConfig)>,
        precache: Vec<PrecacheEntry>,
    ) {
        loop {
            let attempt = async {
                let pool = self.fleet.pool(&self.target, &self.config)?;
                create_schema(&pool, self.config.acquire_timeout.min(START_UP_ATTEMPT)).await
            };
            match attempt.await {
                Ok(()) => break,
                Err(e) => {
                    let reason = format!("cannot create the schema on {}: {e}", self.target);
                    tracing::warn!(error = %reason, "start-up: the database is not ready; trying again");
                    *self.startup_error() = Some(reason);
                    tokio::time::sleep(START_UP_RETRY).await;
                }
            }
        }
        *self.startup_error() = None;
        self.schema.store(true, Ordering::SeqCst);
        let report = self.fleet.warmup(warm).await;
        for o in &report.outcomes {
            match &o.result {
                Ok(took) => tracing::info!(pool = %o.url, ?took, "warmed up"),
                Err(e) => tracing::warn!(pool = %o.url, error = %e, "warm-up failed"),
            }
        }
        self.precache(&precache).await;
        self.set_ready();
    }

    fn startup_error(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.startup_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Where the start-up is.
    pub fn phase(&self) -> Phase {
        if self.ready.load(Ordering::SeqCst) {
            Phase::Ready
        } else if self.schema.load(Ordering::SeqCst) {
            Phase::Serving
        } else {
            match self.startup_error().clone() {
                Some(reason) => Phase::Degraded(reason),
                None => Phase::Starting,
            }
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
        if !self.schema.load(Ordering::SeqCst) {
            return Err(MemoryError::Unavailable(
                self.startup_error()
                    .clone()
                    .unwrap_or_else(|| "the service is starting".to_owned()),
            ));
        }
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
