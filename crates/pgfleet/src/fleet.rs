//! The fleet: the process-wide registry of pools, one per database.
//!
//! Lookups of an existing pool take no lock and write no shared line. The
//! registry is an immutable snapshot published with `arc-swap` and a
//! generation number; each thread keeps the snapshot it last read, and a
//! lookup only checks that the generation has not moved, then finds the
//! entry by the hash its [`Target`] carries. Creating or retiring a pool takes
//! the writer lock, re-checks, publishes a new snapshot and bumps the
//! generation, so a hundred concurrent first requests create one pool.
//!
//! Handles are counted: a pool whose last handle is dropped lingers for its
//! `linger` time, then closes and leaves the registry. The count is striped:
//! each thread takes its handles from its own cell (see `Cell`), so threads
//! taking and dropping handles of one pool never write to a shared line. A
//! linger watcher per pool sums the stripes on a tick; nothing on the handle
//! path looks at the total.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hashbrown::HashTable;
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

/// The registry: one entry per key, found by the hash that [`Target`]
/// computed once when it was built, so a lookup never hashes the key.
type Registry = HashTable<Arc<Entry>>;

struct FleetInner {
    /// Names this fleet in the threads' snapshots (never reused).
    id: u64,
    config: FleetConfig,
    pools: ArcSwap<Registry>,
    /// Bumped after every store to `pools`: a snapshot read at the current
    /// generation is current.
    generation: AtomicU64,
    /// One budget per server (`host:port`); created under `writer`.
    budgets: Mutex<HashMap<String, Arc<ServerBudget>>>,
    /// Held while creating or retiring a pool; lookups never take it.
    writer: Mutex<()>,
    closed: AtomicBool,
    /// Handles kept by the fleet itself for warmed-up pools.
    pinned: Mutex<Vec<PoolHandle>>,
}

impl FleetInner {
    fn new(config: FleetConfig) -> FleetInner {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        FleetInner {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            config,
            pools: ArcSwap::default(),
            generation: AtomicU64::new(0),
            budgets: Mutex::default(),
            writer: Mutex::default(),
            closed: AtomicBool::new(false),
            pinned: Mutex::default(),
        }
    }

    /// Publishes a new registry (under `writer`).
    fn publish(&self, registry: Registry) -> Arc<Registry> {
        let old = self.pools.swap(Arc::new(registry));
        self.generation.fetch_add(1, Ordering::Release);
        old
    }
}

impl Default for FleetInner {
    fn default() -> FleetInner {
        FleetInner::new(FleetConfig::default())
    }
}

impl Drop for FleetInner {
    /// Threads may still hold a snapshot with this fleet's entries: close
    /// the pools nobody holds a handle to now, rather than when the last
    /// snapshot goes. Pools with handles close after their linger, as usual.
    fn drop(&mut self) {
        for entry in self.pools.load().iter() {
            if entry.refs.look().0 == 0 {
                entry.pool.close();
            }
        }
    }
}

/// What a thread keeps for lookups.
struct Local {
    /// The stripe of this thread's handles (of `stripe_count()`).
    stripe: usize,
    /// The registry of the fleet this thread last looked in, and its
    /// generation then. It may keep retired (closed) entries in memory until
    /// the thread's next lookup; see `FleetInner::drop`.
    snapshot: Option<Snapshot>,
}

struct Snapshot {
    fleet: u64,
    generation: u64,
    registry: Arc<Registry>,
}

thread_local! {
    static LOCAL: RefCell<Local> = RefCell::new(Local {
        stripe: next_stripe(),
        snapshot: None,
    });
}

struct Entry {
    key: Arc<str>,
    hash: u64,
    pool: Pool,
    refs: Arc<Refs>,
    /// One per stripe; a handle holds the cell of the thread that took it.
    cells: Box<[Arc<Cell>]>,
    fleet: Weak<FleetInner>,
}

/// The handle count of one pool.
///
/// Live handles are the cells' reference counts (less the entry's own
/// reference to each cell): taking a handle clones the thread's cell,
/// dropping it drops the clone. Taking also bumps the stripe's `taken`
/// counter, so the linger watcher can tell "no handle now" from "no handle
/// since the last look", and retirement can tell a handle taken at the last
/// moment (see [`Entry::take_handle`]).
struct Refs {
    taken: Box<[Stripe]>,
    /// The cells, to read their counts (set once, right after they exist).
    cells: OnceLock<Box<[Weak<Cell>]>>,
    /// References to each cell that are not handles: 1 while the entry
    /// lives, 0 after.
    base: AtomicUsize,
    /// Set by the linger watcher before its final look at the stripes; a
    /// lookup that sees it backs off. Both sides use `SeqCst`, so a handle
    /// taken at the last moment and a retirement cannot miss each other.
    retiring: AtomicBool,
}

/// Handles ever taken through one stripe (wrapping), on its own cache line.
#[repr(align(128))]
#[derive(Default)]
struct Stripe(AtomicU64);

impl Refs {
    fn new(stripes: usize) -> Refs {
        Refs {
            taken: (0..stripes).map(|_| Stripe::default()).collect(),
            cells: OnceLock::new(),
            base: AtomicUsize::new(1),
            retiring: AtomicBool::new(false),
        }
    }

    /// Live handles, and a fingerprint of the handles ever taken.
    ///
    /// The fingerprint is read first: its `SeqCst` loads read every bump
    /// before them, and each lookup clones its cell before it bumps, so the
    /// counts read next include every handle the fingerprint counts.
    fn look(&self) -> (usize, u64) {
        let taken = self.taken.iter().fold(0u64, |sum, stripe| {
            sum.wrapping_add(stripe.0.load(Ordering::SeqCst))
        });
        let base = self.base.load(Ordering::Acquire);
        let live = self.cells.get().map_or(0, |cells| {
            cells
                .iter()
                .map(|cell| cell.strong_count().saturating_sub(base))
                .sum()
        });
        (live, taken)
    }
}

/// What a handle holds: the pool and its stripe. Each cell is a separate
/// allocation on its own cache lines, so cloning and dropping handles on one
/// thread touches nothing another thread writes.
#[repr(align(128))]
struct Cell {
    pool: Pool,
    refs: Arc<Refs>,
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

/// The stripe of a new thread: threads take stripes in turn.
fn next_stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed) & (stripe_count() - 1)
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
            inner: Arc::new(FleetInner::new(config)),
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
    #[inline]
    pub fn pool(&self, target: &Target, config: &PoolConfig) -> Result<PoolHandle> {
        match self.lookup(target) {
            Some(handle) => Ok(handle),
            None => self.create(target, config),
        }
    }

    /// [`pool`](Self::pool) when this thread found no pool: under the writer
    /// lock, finds it in the shared registry or creates it.
    #[cold]
    #[inline(never)]
    fn create(&self, target: &Target, config: &PoolConfig) -> Result<PoolHandle> {
        let inner = &self.inner;
        let _writer = inner.writer.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.closed.load(Ordering::SeqCst) {
            return Err(Error::closed(format!(
                "the fleet is closed; no pool for {target}"
            )));
        }
        let stripe = LOCAL
            .try_with(|local| local.try_borrow().map_or(0, |local| local.stripe))
            .unwrap_or(0);
        if let Some(handle) = find(&inner.pools.load(), target, stripe) {
            return Ok(handle);
        }
        let key = target.key.clone();
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
        let cells: Box<[Arc<Cell>]> = (0..stripe_count())
            .map(|_| {
                Arc::new(Cell {
                    pool: pool.clone(),
                    refs: refs.clone(),
                })
            })
            .collect();
        // Set right after the cells exist: nothing else can look yet.
        let _ = refs.cells.set(cells.iter().map(Arc::downgrade).collect());
        let entry = Arc::new(Entry {
            key,
            hash: target.key_hash,
            pool,
            refs,
            cells,
            fleet: Arc::downgrade(inner),
        });
        let handle = entry.take_handle(stripe).ok_or_else(|| {
            Error::closed(format!("the pool for {target} retired as it was created"))
        })?;
        let mut pools = Registry::clone(&inner.pools.load());
        pools.insert_unique(entry.hash, entry.clone(), |e| e.hash);
        inner.publish(pools);
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

    /// The handle of an existing pool, from this thread's snapshot of the
    /// registry: a load of the generation, a probe with the target's hash,
    /// and the handle's own count. `None` if there is no pool (or it is
    /// retiring): the caller goes to the writer lock.
    #[inline]
    fn lookup(&self, target: &Target) -> Option<PoolHandle> {
        let inner = &*self.inner;
        let generation = inner.generation.load(Ordering::Acquire);
        let found = LOCAL.try_with(|local| {
            let local = local.try_borrow().ok()?;
            let snapshot = local.snapshot.as_ref()?;
            (snapshot.fleet == inner.id && snapshot.generation == generation)
                .then(|| find(&snapshot.registry, target, local.stripe))
        });
        match found {
            Ok(Some(handle)) => handle,
            _ => self.refresh(target, generation),
        }
    }

    /// [`lookup`](Self::lookup) when this thread's snapshot is not current:
    /// reads the shared one and keeps it.
    #[cold]
    #[inline(never)]
    fn refresh(&self, target: &Target, generation: u64) -> Option<PoolHandle> {
        let inner = &*self.inner;
        let registry = inner.pools.load_full();
        let found = LOCAL.try_with(|local| {
            let mut local = local.try_borrow_mut().ok()?;
            let handle = find(&registry, target, local.stripe);
            let fresh = Snapshot {
                fleet: inner.id,
                generation,
                registry: registry.clone(),
            };
            // Returned, so that it is dropped after the borrow ends: it may
            // hold the last reference to retired pools.
            let stale = local.snapshot.replace(fresh);
            Some((handle, stale))
        });
        match found {
            Ok(Some((handle, _stale))) => handle,
            // The thread is exiting (or this is a re-entrant call).
            _ => find(&registry, target, 0),
        }
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
            inner.publish(Registry::default())
        };
        let pinned =
            std::mem::take(&mut *inner.pinned.lock().unwrap_or_else(PoisonError::into_inner));
        drop(pinned);
        for entry in entries.iter() {
            entry.pool.close();
        }
        let mut report = CloseReport::default();
        for entry in entries.iter() {
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
                .iter()
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
                    .iter()
                    .map(|e| e.pool.target().to_string())
                    .collect::<Vec<_>>(),
            )
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// The handle of the pool for `target` in `registry`, counted in `stripe`.
fn find(registry: &Registry, target: &Target, stripe: usize) -> Option<PoolHandle> {
    registry
        .find(target.key_hash, |entry| {
            Arc::ptr_eq(&entry.key, &target.key) || entry.key == target.key
        })?
        .take_handle(stripe)
}

impl Entry {
    /// A new handle, counted in `stripe`; `None` if the pool is retiring.
    ///
    /// The cell is cloned first, then the stripe's `taken` bumped, then
    /// `retiring` read, all but the clone `SeqCst`; retirement stores
    /// `retiring` and then reads the stripes, both `SeqCst`. So either the
    /// retirement sees the bump (and with it the clone) and gives up, or
    /// this lookup sees `retiring` and gives its handle back.
    #[inline]
    fn take_handle(&self, stripe: usize) -> Option<PoolHandle> {
        let handle = PoolHandle {
            cell: self.cells[stripe].clone(),
        };
        self.refs.taken[stripe].0.fetch_add(1, Ordering::SeqCst);
        if self.refs.retiring.load(Ordering::SeqCst) {
            // This handle must not keep the pool: the caller creates a fresh
            // pool under the writer lock.
            return None;
        }
        Some(handle)
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
        // Unit tests widen the window in which a lookup may still find the
        // entry in a snapshot, to show the handshake closes it.
        #[cfg(test)]
        std::thread::sleep(Duration::from_millis(2));
        let mut pools = Registry::clone(&fleet.pools.load());
        if let Ok(found) = pools.find_entry(self.hash, |e| std::ptr::eq(Arc::as_ptr(e), self)) {
            found.remove();
            fleet.publish(pools);
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
    /// The same cell: this handle keeps its count above the base, and the
    /// clone's count lands on the same atomic, so the watcher never sees the
    /// clone missing while this one is there.
    fn clone(&self) -> Self {
        PoolHandle {
            cell: self.cell.clone(),
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        // The entry's references to the cells go with it.
        self.refs.base.store(0, Ordering::Release);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool that never connects (`min_size` 0, nobody calls `get`).
    fn idle_config(linger: Duration) -> PoolConfig {
        PoolConfig {
            min_size: 0,
            linger,
            ..PoolConfig::default()
        }
    }

    fn target() -> Target {
        Target::parse("postgres://unit@127.0.0.1:1/lookup").expect("target")
    }

    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// Threads take and drop handles while the linger watcher retires the
    /// pool whenever it sees none: a handle must never hold a closed pool,
    /// and the pool must have been retired (and made again) along the way.
    #[test]
    fn lookups_racing_retirement_never_get_a_closed_pool() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let _context = runtime.enter();
        let fleet = Fleet::new();
        let config = idle_config(Duration::from_millis(10));
        let created = AtomicUsize::new(0);
        let phases = std::sync::Barrier::new(3);
        std::thread::scope(|scope| {
            for _ in 0..3 {
                let (fleet, config, created, phases) = (&fleet, &config, &created, &phases);
                let runtime = runtime.handle().clone();
                scope.spawn(move || {
                    let _context = runtime.enter();
                    let target = target();
                    let mut last: Option<*const Shared> = None;
                    for phase in 0..80u64 {
                        // All quiet for about the linger time plus a tick,
                        // a little longer each phase, so the bursts start
                        // at every point of the watcher's tick.
                        phases.wait();
                        std::thread::sleep(Duration::from_micros(15_000 + phase % 10 * 1_100));
                        let held = fleet.pool(&target, config).expect("pool");
                        for _ in 0..200 {
                            let handle = fleet.pool(&target, config).expect("pool");
                            assert!(!handle.is_closed(), "a lookup got a closed pool");
                            let shared = Arc::as_ptr(&handle.shared);
                            if last != Some(shared) {
                                created.fetch_add(1, Ordering::Relaxed);
                                last = Some(shared);
                            }
                        }
                        // Past the window of a retirement that raced the
                        // first lookup of the burst.
                        std::thread::sleep(Duration::from_millis(3));
                        assert!(!held.is_closed(), "a held pool was closed");
                    }
                });
            }
        });
        assert!(
            created.load(Ordering::Relaxed) > 3,
            "the pool was never retired and made again"
        );
    }

    type Shared = crate::pool::Shared;

    #[test]
    fn dropping_a_fleet_closes_its_unheld_pools_though_a_thread_kept_a_snapshot() {
        let runtime = current_thread();
        let _context = runtime.enter();
        let fleet = Fleet::new();
        let config = idle_config(Duration::from_secs(600));
        let unheld = fleet.pool(&target(), &config).expect("pool");
        // Looked up again: this thread now keeps the registry snapshot.
        drop(fleet.pool(&target(), &config).expect("pool"));
        let other = Target::parse("postgres://unit@127.0.0.1:1/held").expect("target");
        let held = fleet.pool(&other, &config).expect("pool");
        let unheld_pool = unheld.pool().clone();
        drop(unheld);
        assert!(!unheld_pool.is_closed());
        drop(fleet);
        assert!(unheld_pool.is_closed(), "an unheld pool outlived its fleet");
        assert!(!held.is_closed(), "a held pool closed with its fleet");
        assert_eq!(held.active_references(), 1);
    }

    #[test]
    fn handles_are_counted_across_clones_and_threads() {
        let runtime = current_thread();
        let _context = runtime.enter();
        let fleet = Fleet::new();
        let config = idle_config(Duration::from_secs(600));
        let first = fleet.pool(&target(), &config).expect("pool");
        let second = first.clone();
        let third = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let _context = runtime.enter();
                    fleet.pool(&target(), &config).expect("pool")
                })
                .join()
                .expect("thread")
        });
        assert_eq!(first.active_references(), 3);
        drop(second);
        drop(third);
        assert_eq!(first.active_references(), 1);
        assert_eq!(
            fleet
                .stats()
                .pools
                .values()
                .next()
                .map(|s| s.active_references),
            Some(1)
        );
    }
}
