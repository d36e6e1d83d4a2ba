//! The fleet: the process-wide registry of pools, one per database.
//!
//! Lookups of an existing pool read an atomic snapshot of the registry
//! (`arc-swap`) and take no lock at all; creating a pool takes the writer
//! lock, re-checks, and publishes a new snapshot, so a hundred concurrent
//! first requests create one pool. Handles are counted: a pool whose last
//! handle is dropped lingers for its `linger` time, then closes and leaves
//! the registry.
//!
//! The count is striped: each thread counts its handles in its own cache
//! line (see `Refs`), so threads taking and dropping handles of one pool
//! never write to a shared line. A linger watcher per pool sums the stripes
//! on a tick; nothing on the handle path looks at the total.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::budget::{BudgetConfig, BudgetMode, BudgetStats, ServerBudget};
use crate::config::PoolConfig;
use crate::error::{Error, Result};
use crate::pool::Pool;
use crate::stats::{PoolStats, UseCount};
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

/// The registry: key -> entry, hashed with a fast hasher (the keys are
/// database addresses from configuration, hashed on every lookup).
type Registry = HashMap<Arc<str>, Arc<Entry>, foldhash::fast::RandomState>;

#[derive(Default)]
struct FleetInner {
    config: FleetConfig,
    pools: ArcSwap<Registry>,
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
    refs: Arc<Refs>,
    /// One per stripe; a handle holds the cell of the thread that took it.
    cells: Box<[Arc<Cell>]>,
    fleet: Weak<FleetInner>,
}

/// Live handles of one pool, counted in stripes.
///
/// Each stripe is a word on its own cache line: the low 32 bits count the
/// live handles taken through that stripe, the high 32 bits count handles
/// ever taken (wrapping), so the linger watcher can tell "no handle now" from
/// "no handle since the last look". A thread always uses the same stripe.
struct Refs {
    stripes: Box<[Stripe]>,
    /// Set by the linger watcher before its final look at the stripes; a
    /// lookup that sees it backs off. Both sides use `SeqCst`, so a handle
    /// taken at the last moment and a retirement cannot miss each other.
    retiring: AtomicBool,
}

#[repr(align(128))]
#[derive(Default)]
struct Stripe(UseCount);

impl Refs {
    fn new(stripes: usize) -> Refs {
        Refs {
            stripes: (0..stripes).map(|_| Stripe::default()).collect(),
            retiring: AtomicBool::new(false),
        }
    }

    /// Live handles, and a fingerprint of the handles ever taken.
    fn look(&self) -> (usize, u64) {
        self.stripes.iter().fold((0, 0), |(live, taken), stripe| {
            let (stripe_live, stripe_taken) = stripe.0.look();
            (
                live + stripe_live as usize,
                taken.wrapping_add(stripe_taken),
            )
        })
    }
}

/// What a handle holds: the pool and its stripe. Each cell is a separate
/// allocation on its own cache lines, so cloning and dropping handles on one
/// thread touches nothing another thread writes.
#[repr(align(128))]
struct Cell {
    pool: Pool,
    refs: Arc<Refs>,
    stripe: usize,
}

impl Cell {
    fn uses(&self) -> &UseCount {
        &self.refs.stripes[self.stripe].0
    }
}

/// How many stripes a pool's handle count uses: enough that the threads of
/// a runtime rarely share one.
fn stripe_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(4, |n| n.get() * 2)
            .next_power_of_two()
            .clamp(2, 64)
    })
}

/// This thread's stripe (of `stripe_count()`).
fn my_stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    STRIPE.with(|s| *s) & (stripe_count() - 1)
}

/// A counted handle to a fleet pool. Derefs to [`Pool`] (`handle.get()`).
/// While any handle lives, the pool stays open.
pub struct PoolHandle {
    cell: Arc<Cell>,
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
        let pool = Pool::build(target.clone(), config.clone(), budget)?;
        let refs = Arc::new(Refs::new(stripe_count()));
        let cells = (0..stripe_count())
            .map(|stripe| {
                Arc::new(Cell {
                    pool: pool.clone(),
                    refs: refs.clone(),
                    stripe,
                })
            })
            .collect();
        let entry = Arc::new(Entry {
            key: key.clone(),
            pool,
            refs,
            cells,
            fleet: Arc::downgrade(inner),
        });
        let handle = entry.take_handle();
        let mut pools = Registry::clone(&inner.pools.load());
        pools.insert(key, entry.clone());
        inner.pools.store(Arc::new(pools));
        tokio::spawn(watch_linger(Arc::downgrade(&entry)));
        tracing::debug!(pool = %target, "pool created");
        Ok(handle)
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
        let handle = pools.get(key)?.take_handle();
        if handle.cell.refs.retiring.load(Ordering::SeqCst) {
            // The pool is being retired: this handle must not keep it. The
            // caller creates a fresh pool under the writer lock.
            return None;
        }
        Some(handle)
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
            inner.pools.swap(Arc::new(Registry::default()))
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
                    stats.active_references = entry.refs.look().0;
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
    /// A new handle, counted in this thread's stripe.
    fn take_handle(&self) -> PoolHandle {
        let cell = &self.cells[my_stripe()];
        cell.uses().take();
        PoolHandle { cell: cell.clone() }
    }

    /// Closes the pool and removes it from the registry if it still has no
    /// handle and none was taken since `seen` (a fingerprint from
    /// [`Refs::look`]). Returns whether it retired.
    fn retire(&self, seen: u64) -> bool {
        let Some(fleet) = self.fleet.upgrade() else {
            self.pool.close();
            return true;
        };
        let _writer = fleet.writer.lock().unwrap_or_else(PoisonError::into_inner);
        self.refs.retiring.store(true, Ordering::SeqCst);
        if self.refs.look() != (0, seen) {
            // A lookup took a handle since the watcher looked.
            self.refs.retiring.store(false, Ordering::SeqCst);
            return false;
        }
        let current = fleet.pools.load();
        if current
            .get(&self.key)
            .is_some_and(|e| std::ptr::eq(Arc::as_ptr(e), self))
        {
            let mut pools = Registry::clone(&current);
            pools.remove(&self.key);
            fleet.pools.store(Arc::new(pools));
        }
        tracing::debug!(pool = %self.pool.target(), "pool closed after linger with no handles");
        self.pool.close();
        true
    }
}

/// Retires a pool once it has had no handle for its `linger` time. Looks at
/// the handle count on a tick of a quarter of `linger` (10ms..1s); a handle
/// taken between two looks restarts the wait. Ends when the pool closes or
/// leaves the fleet.
async fn watch_linger(entry: Weak<Entry>) {
    let linger = match entry.upgrade() {
        Some(entry) => entry.pool.config().linger,
        None => return,
    };
    let tick = (linger / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Since when the pool has had no handle, and the fingerprint then.
    let mut unused: Option<(Instant, u64)> = None;
    loop {
        interval.tick().await;
        let Some(entry) = entry.upgrade() else {
            return;
        };
        if entry.pool.is_closed() {
            return;
        }
        let (live, taken) = entry.refs.look();
        unused = match unused {
            _ if live > 0 => None,
            Some((since, seen)) if seen == taken => {
                if since.elapsed() >= linger && entry.retire(taken) {
                    return;
                }
                Some((since, seen))
            }
            _ => Some((Instant::now(), taken)),
        };
    }
}

impl PoolHandle {
    /// Live handles to this pool, this one included.
    pub fn active_references(&self) -> usize {
        self.cell.refs.look().0
    }

    /// The pool.
    pub fn pool(&self) -> &Pool {
        &self.cell.pool
    }
}

impl Deref for PoolHandle {
    type Target = Pool;
    fn deref(&self) -> &Pool {
        &self.cell.pool
    }
}

impl Clone for PoolHandle {
    fn clone(&self) -> Self {
        // The same stripe: this handle keeps the count above zero, so the
        // clone cannot race a retirement.
        self.cell.uses().take();
        PoolHandle {
            cell: self.cell.clone(),
        }
    }
}

impl Drop for PoolHandle {
    fn drop(&mut self) {
        self.cell.uses().put();
    }
}

impl fmt::Debug for PoolHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolHandle")
            .field("pool", &self.cell.pool)
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
