//! The fleet: the process-wide registry of pools, one per database.
//!
//! Lookups of an existing pool read an atomic snapshot of the registry
//! (`arc-swap`) and take no lock at all; creating a pool takes the writer
//! lock, re-checks, and publishes a new snapshot, so a hundred concurrent
//! first requests create one pool. Handles are counted: a pool whose last
//! handle is dropped lingers for its `linger` time, then closes and leaves
//! the registry.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::budget::{BudgetConfig, BudgetMode, BudgetStats, ServerBudget};
use crate::config::PoolConfig;
use crate::error::{Error, Result};
use crate::pool::Pool;
use crate::stats::PoolStats;
use crate::target::Target;

/// A registry of shared pools, one per database ([`Target::key`]).
///
/// Use [`Fleet::global`] for the process-wide fleet, or [`Fleet::new`] for
/// an explicit one (tests, or a library that wants its own). Cheap to clone.
#[derive(Clone, Default)]
pub struct Fleet {
    inner: Arc<FleetInner>,
}

/// Fleet-wide settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FleetConfig {
    /// Server budgets: how many connections this process may hold on each
    /// server, across all its pools there.
    pub budget: BudgetConfig,
}

#[derive(Default)]
struct FleetInner {
    config: FleetConfig,
    pools: ArcSwap<HashMap<Arc<str>, Arc<Entry>>>,
    /// One budget per server (`host:port`); created under `writer`.
    budgets: Mutex<HashMap<String, Arc<ServerBudget>>>,
    /// Held while creating or retiring a pool; lookups never take it.
    writer: Mutex<()>,
    closed: AtomicBool,
    /// Handles kept by the fleet itself for warmed-up pools.
    pinned: Mutex<Vec<PoolHandle>>,
}

struct Entry {
    key: Arc<str>,
    pool: Pool,
    refs: AtomicUsize,
    /// Set by the retiring code before it checks `refs`; a lookup that sees
    /// it backs off. Together they make "last handle gone" and "new handle
    /// taken" impossible to miss each other.
    retiring: AtomicBool,
    /// Bumped each time `refs` drops to zero, so a stale linger timer does
    /// nothing.
    zero_epoch: AtomicU64,
    fleet: Weak<FleetInner>,
}

/// A counted handle to a fleet pool. Derefs to [`Pool`] (`handle.get()`).
/// While any handle lives, the pool stays open.
pub struct PoolHandle {
    entry: Arc<Entry>,
}

impl Fleet {
    /// A new, empty fleet with default settings (server budgets `auto`).
    pub fn new() -> Fleet {
        Fleet::default()
    }

    /// A new, empty fleet with these settings.
    ///
    /// # Errors
    /// `Config` if the settings are invalid.
    pub fn with_config(config: FleetConfig) -> Result<Fleet> {
        config.budget.validate()?;
        Ok(Fleet {
            inner: Arc::new(FleetInner {
                config,
                ..FleetInner::default()
            }),
        })
    }

    /// The fleet's settings.
    pub fn config(&self) -> &FleetConfig {
        &self.inner.config
    }

    /// The process-wide fleet.
    ///
    /// Its pools run their background work on the tokio runtime that created
    /// them: use it from one runtime (the usual `#[tokio::main]` service).
    pub fn global() -> &'static Fleet {
        static GLOBAL: OnceLock<Fleet> = OnceLock::new();
        GLOBAL.get_or_init(Fleet::new)
    }

    /// The pool for `target`, created with `config` if the fleet has none
    /// yet. If a pool exists already, it is shared as it is: its
    /// configuration wins, and `config` is not even compared (this is the
    /// hot path of every store; `stats()` shows the configuration in force).
    ///
    /// # Errors
    /// `Closed` after [`close_all`](Self::close_all); `Config` if the pool
    /// has to be created and `config` is invalid or no tokio runtime runs.
    pub fn pool(&self, target: &Target, config: &PoolConfig) -> Result<PoolHandle> {
        if let Some(handle) = self.lookup(target.key()) {
            return Ok(handle);
        }
        let inner = &self.inner;
        let _writer = inner.writer.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.closed.load(Ordering::SeqCst) {
            return Err(Error::closed(format!(
                "the fleet is closed; no pool for {target}"
            )));
        }
        if let Some(handle) = self.lookup(target.key()) {
            return Ok(handle);
        }
        let key: Arc<str> = target.key().into();
        let server = target.server_key();
        let budget = match inner.config.budget.mode_for(&server) {
            BudgetMode::Off => None,
            BudgetMode::Auto | BudgetMode::Fixed(_) => Some(
                inner
                    .budgets
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entry(server)
                    .or_insert_with_key(|server| {
                        ServerBudget::new(server.clone(), &inner.config.budget)
                    })
                    .clone(),
            ),
        };
        let entry = Arc::new(Entry {
            key: key.clone(),
            pool: Pool::build(target.clone(), config.clone(), budget)?,
            refs: AtomicUsize::new(1),
            retiring: AtomicBool::new(false),
            zero_epoch: AtomicU64::new(0),
            fleet: Arc::downgrade(inner),
        });
        let mut pools = HashMap::clone(&inner.pools.load());
        pools.insert(key, entry.clone());
        inner.pools.store(Arc::new(pools));
        tracing::debug!(pool = %target, "pool created");
        Ok(PoolHandle { entry })
    }

    /// The pool for a URL, with `config`.
    ///
    /// # Errors
    /// As [`pool`](Self::pool), plus `Config` for a malformed URL.
    pub fn pool_url(&self, url: &str, config: &PoolConfig) -> Result<PoolHandle> {
        self.pool(&Target::parse(url)?, config)
    }

    fn lookup(&self, key: &str) -> Option<PoolHandle> {
        let pools = self.inner.pools.load();
        let entry = pools.get(key)?;
        entry.refs.fetch_add(1, Ordering::SeqCst);
        if entry.retiring.load(Ordering::SeqCst) {
            entry.release_ref();
            return None;
        }
        Some(PoolHandle {
            entry: entry.clone(),
        })
    }

    /// Creates the pools for `targets` and waits until each has its warm
    /// floor open, all in parallel. A target that fails is reported and the
    /// others still warm. The fleet keeps a handle to each warmed pool, so
    /// warmed pools stay open until [`close_all`](Self::close_all).
    pub async fn warmup<I>(&self, targets: I) -> WarmupReport
    where
        I: IntoIterator<Item = (Target, PoolConfig)>,
    {
        let mut tasks = tokio::task::JoinSet::new();
        let mut outcomes = Vec::new();
        for (target, config) in targets {
            let url = target.to_string();
            match self.pool(&target, &config) {
                Ok(handle) => {
                    tasks.spawn(async move {
                        let started = Instant::now();
                        let result = handle.wait_ready(config.connect_timeout).await;
                        (url, handle, result.map(|()| started.elapsed()))
                    });
                }
                Err(error) => outcomes.push(WarmupOutcome {
                    url,
                    result: Err(error),
                }),
            }
        }
        while let Some(joined) = tasks.join_next().await {
            let Ok((url, handle, result)) = joined else {
                continue;
            };
            match &result {
                Ok(took) => {
                    tracing::info!(pool = %url, took = ?took, "pool warmed up");
                    self.inner
                        .pinned
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(handle);
                }
                Err(error) => tracing::warn!(pool = %url, %error, "warm-up failed"),
            }
            outcomes.push(WarmupOutcome { url, result });
        }
        WarmupReport { outcomes }
    }

    /// Closes every pool: idle connections now, waiters fail with `Closed`,
    /// checked-out connections when they are returned — or, if still out at
    /// `deadline`, cut. Later `pool()` and `get()` calls fail with `Closed`.
    /// Idempotent.
    pub async fn close_all(&self, deadline: Duration) -> CloseReport {
        let deadline = Instant::now() + deadline;
        let inner = &self.inner;
        let entries = {
            let _writer = inner.writer.lock().unwrap_or_else(PoisonError::into_inner);
            inner.closed.store(true, Ordering::SeqCst);
            inner.pools.swap(Arc::new(HashMap::new()))
        };
        let pinned =
            std::mem::take(&mut *inner.pinned.lock().unwrap_or_else(PoisonError::into_inner));
        drop(pinned);
        for entry in entries.values() {
            entry.pool.close();
        }
        let mut report = CloseReport::default();
        for entry in entries.values() {
            report.pools += 1;
            report.connections_cut += entry.pool.wait_closed(deadline).await;
        }
        report
    }

    /// Whether [`close_all`](Self::close_all) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// Statistics of every pool, keyed by masked URL, and of every server
    /// budget, keyed by `host:port`.
    pub fn stats(&self) -> FleetStats {
        let pools = self.inner.pools.load();
        let servers = self
            .inner
            .budgets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(server, budget)| (server.clone(), budget.stats()))
            .collect();
        FleetStats {
            servers,
            pools: pools
                .values()
                .map(|entry| {
                    let mut stats = entry.pool.stats();
                    stats.active_references = entry.refs.load(Ordering::SeqCst);
                    (stats.url.clone(), stats)
                })
                .collect(),
        }
    }

    /// Number of pools in the fleet.
    pub fn len(&self) -> usize {
        self.inner.pools.load().len()
    }

    /// Whether the fleet has no pools.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for Fleet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pools = self.inner.pools.load();
        f.debug_struct("Fleet")
            .field(
                "pools",
                &pools
                    .values()
                    .map(|e| e.pool.target().to_string())
                    .collect::<Vec<_>>(),
            )
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Entry {
    fn release_ref(self: &Arc<Self>) {
        if self.refs.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.schedule_linger();
        }
    }

    fn schedule_linger(self: &Arc<Self>) {
        let epoch = self.zero_epoch.fetch_add(1, Ordering::SeqCst) + 1;
        let entry = self.clone();
        let linger = self.pool.config().linger;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to wait on (e.g. dropped during shutdown): retire now.
            entry.retire(epoch);
            return;
        };
        runtime.spawn(async move {
            tokio::time::sleep(linger).await;
            entry.retire(epoch);
        });
    }

    /// Closes the pool and removes it from the registry if no handle was
    /// taken since its refcount reached zero at `epoch`.
    fn retire(&self, epoch: u64) {
        let Some(fleet) = self.fleet.upgrade() else {
            self.pool.close();
            return;
        };
        let _writer = fleet.writer.lock().unwrap_or_else(PoisonError::into_inner);
        if self.zero_epoch.load(Ordering::SeqCst) != epoch || self.refs.load(Ordering::SeqCst) != 0
        {
            return;
        }
        self.retiring.store(true, Ordering::SeqCst);
        if self.refs.load(Ordering::SeqCst) != 0 {
            // A lookup took a handle between the two checks.
            self.retiring.store(false, Ordering::SeqCst);
            return;
        }
        let current = fleet.pools.load();
        if current
            .get(&self.key)
            .is_some_and(|e| std::ptr::eq(Arc::as_ptr(e), self))
        {
            let mut pools = HashMap::clone(&current);
            pools.remove(&self.key);
            fleet.pools.store(Arc::new(pools));
        }
        tracing::debug!(pool = %self.pool.target(), "pool closed after linger with no handles");
        self.pool.close();
    }
}

impl PoolHandle {
    /// Live handles to this pool, this one included.
    pub fn active_references(&self) -> usize {
        self.entry.refs.load(Ordering::SeqCst)
    }

    /// The pool.
    pub fn pool(&self) -> &Pool {
        &self.entry.pool
    }
}

impl Deref for PoolHandle {
    type Target = Pool;
    fn deref(&self) -> &Pool {
        &self.entry.pool
    }
}

impl Clone for PoolHandle {
    fn clone(&self) -> Self {
        self.entry.refs.fetch_add(1, Ordering::SeqCst);
        PoolHandle {
            entry: self.entry.clone(),
        }
    }
}

impl Drop for PoolHandle {
    fn drop(&mut self) {
        self.entry.release_ref();
    }
}

impl fmt::Debug for PoolHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolHandle")
            .field("pool", &self.entry.pool)
            .field("active_references", &self.active_references())
            .finish()
    }
}

/// Statistics of a whole fleet.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FleetStats {
    /// Per pool, keyed by masked URL.
    pub pools: BTreeMap<String, PoolStats>,
    /// Per server budget, keyed by `host:port`.
    pub servers: BTreeMap<String, BudgetStats>,
}

/// What [`Fleet::warmup`] did for each target.
#[derive(Debug)]
pub struct WarmupReport {
    /// One per target, in completion order.
    pub outcomes: Vec<WarmupOutcome>,
}

/// Warm-up of one target.
#[derive(Debug)]
pub struct WarmupOutcome {
    /// The target, password masked.
    pub url: String,
    /// How long the warm floor took to open, or why it failed.
    pub result: Result<Duration>,
}

impl WarmupReport {
    /// Whether every target warmed up.
    pub fn is_ok(&self) -> bool {
        self.outcomes.iter().all(|o| o.result.is_ok())
    }

    /// The targets that failed, with their errors.
    pub fn failures(&self) -> impl Iterator<Item = (&str, &Error)> {
        self.outcomes
            .iter()
            .filter_map(|o| o.result.as_ref().err().map(|e| (o.url.as_str(), e)))
    }
}

/// What [`Fleet::close_all`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CloseReport {
    /// Pools closed by this call.
    pub pools: usize,
    /// Connections still held by callers at the deadline, cut.
    pub connections_cut: usize,
}
