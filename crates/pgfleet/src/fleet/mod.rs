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
//!
//! * `registry.rs` — the snapshot, the thread's copy of it, lookups, and
//!   retirement's half of the handshake;
//! * `handles.rs` — striped handle counts and [`PoolHandle`];
//! * `linger.rs` — the linger watcher;
//! * `reports.rs` — [`FleetStats`], [`WarmupReport`], [`CloseReport`].

mod handles;
mod linger;
mod registry;
mod reports;

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, PoisonError};
use std::time::{Duration, Instant};

pub use self::handles::PoolHandle;
use self::handles::{stripe_count, Cell, Refs};
use self::registry::{find_entry, find_live, Entry, FleetInner, Registry, Snapshot, LOCAL};
pub use self::reports::{CloseReport, FleetStats, WarmupOutcome, WarmupReport};
use crate::address::Target;
use crate::budget::ServerBudget;
use crate::config::{BudgetMode, FleetConfig, PoolConfig};
use crate::error::{Error, Result};
use crate::pool::Pool;

/// A registry of shared pools, one per database ([`Target::key`]).
///
/// Use [`Fleet::global`] for the process-wide fleet, or [`Fleet::new`] for
/// an explicit one (tests, or a library that wants its own). Cheap to clone.
#[derive(Clone, Default)]
pub struct Fleet {
    inner: Arc<FleetInner>,
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
    /// A pool runs its background work and its connections on the tokio
    /// runtime of the caller that created it. When that runtime shuts down
    /// (each `#[tokio::test]` has its own, a CLI may start and stop one),
    /// the next lookup from a running runtime replaces the pool with a new
    /// one there; handles taken before stay on the old pool, whose `get`
    /// fails with `Closed`, so take a handle on the runtime that uses it.
    /// Handles used from other runtimes while the creating one runs work:
    /// their queries travel to the connections' runtime and back.
    pub fn global() -> &'static Fleet {
        static GLOBAL: OnceLock<Fleet> = OnceLock::new();
        GLOBAL.get_or_init(Fleet::new)
    }

    /// The pool for `target`, created with `config` if the fleet has none
    /// yet. One database has one pool and so one configuration: asked again
    /// with settings that differ (not only in how they are written: a
    /// `max_size` of `None` that means 10 equals `Some(10)`), it is an error
    /// naming the keys that differ. To share whatever pool exists, use
    /// [`existing`](Self::existing).
    ///
    /// # Errors
    /// `Closed` after [`close_all`](Self::close_all); `Config` if the pool
    /// exists with other settings, or has to be created and `config` is
    /// invalid or no tokio runtime runs.
    #[inline]
    pub fn pool(&self, target: &Target, config: &PoolConfig) -> Result<PoolHandle> {
        match self.lookup(target, Some(config)) {
            Some((handle, true)) => Ok(handle),
            Some((handle, false)) if Self::same_settings(&handle, target, config) => Ok(handle),
            Some((handle, false)) => Err(settings_differ(&handle, target, config)),
            None => self.create(target, config),
        }
    }

    /// Whether `config` means what `handle`'s pool's configuration means, by
    /// every field (`max_size: None` equals the cap it stands for): the
    /// slow path, for a configuration that is not the one the pool was
    /// created with.
    #[cold]
    fn same_settings(handle: &PoolHandle, target: &Target, config: &PoolConfig) -> bool {
        handle.config().means_same(config) && handle.target().tls() == target.tls()
    }

    /// The pool for `target` if the fleet has one, whatever its settings.
    pub fn existing(&self, target: &Target) -> Option<PoolHandle> {
        self.lookup(target, None).map(|(handle, _)| handle)
    }

    /// [`pool`](Self::pool) when this thread found no pool: under the writer
    /// lock, finds it in the shared registry or creates it.
    #[cold]
    #[inline(never)]
    fn create(&self, target: &Target, config: &PoolConfig) -> Result<PoolHandle> {
        let inner = &self.inner;
        let _writer = inner.write();
        if inner.closed.load(Ordering::SeqCst) {
            return Err(Error::closed(format!(
                "the fleet is closed; no pool for {target}"
            )));
        }
        let stripe = LOCAL
            .try_with(|local| local.try_borrow().map_or(0, |local| local.stripe))
            .unwrap_or(0);
        if let Some(handle) = find_live(&inner.pools.load(), target, stripe) {
            return if Self::same_settings(&handle, target, config) {
                Ok(handle)
            } else {
                Err(settings_differ(&handle, target, config))
            };
        }
        if let Some(dead) = find_entry(&inner.pools.load(), target).cloned() {
            // Its runtime shut down (each `#[tokio::test]` has its own, say):
            // its tasks and connections went with it. A new pool on the
            // caller's runtime replaces it.
            tracing::info!(pool = %target, "the tokio runtime of this pool shut down; a new pool on the current runtime replaces it");
            dead.remove_from(inner);
            dead.pool.close();
        }
        let key = target.key.clone();
        // Each host's connections count in that server's budget.
        let budgets = target
            .server_keys()
            .into_iter()
            .map(|server| match inner.config.budget.mode_for(&server) {
                BudgetMode::Off => None,
                BudgetMode::Auto | BudgetMode::Fixed(_) => Some(
                    inner
                        .budgets
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .entry(server)
                        .or_insert_with_key(|server| {
                            ServerBudget::new(
                                server.clone(),
                                &inner.config.budget,
                                &inner.instance,
                                &config.application_name,
                            )
                        })
                        .clone(),
                ),
            })
            .collect();
        let pool = Pool::build(target.clone(), config.clone(), budgets)?;
        // When its runtime shuts down, every thread looks again (and finds
        // it gone): the fast path need not check.
        let fleet = Arc::downgrade(inner);
        pool.on_runtime_gone(move || {
            if let Some(fleet) = fleet.upgrade() {
                fleet.generation.fetch_add(1, Ordering::Release);
            }
        });
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
            asked: config.clone(),
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
        tokio::spawn(linger::watch_linger(Arc::downgrade(&entry)));
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
    fn lookup(&self, target: &Target, config: Option<&PoolConfig>) -> Option<(PoolHandle, bool)> {
        let inner = &*self.inner;
        let generation = inner.generation.load(Ordering::Acquire);
        let found = LOCAL.try_with(|local| {
            let local = local.try_borrow().ok()?;
            let snapshot = local.snapshot.as_ref()?;
            (snapshot.fleet == inner.id && snapshot.generation == generation).then(|| {
                let entry = find_entry(&snapshot.registry, target)?;
                let handle = entry.take_handle(local.stripe)?;
                // The usual caller passes the configuration the pool was
                // created with: equal field by field, settled here.
                let exact = config.is_some_and(|config| {
                    let tls = &entry.pool.target().tls;
                    entry.asked == *config
                        && (Arc::ptr_eq(tls, &target.tls) || **tls == *target.tls)
                });
                Some((handle, exact))
            })
        });
        match found {
            Ok(Some(found)) => found,
            _ => self
                .refresh(target, generation)
                .map(|handle| (handle, false)),
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
            let handle = find_live(&registry, target, local.stripe);
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
            _ => find_live(&registry, target, 0),
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
    /// checked-out connections when they are returned — or, if still out
    /// after `deadline`, cut (`Duration::MAX`: never cut). Later `pool()` and `get()` calls fail with `Closed`.
    /// Idempotent.
    pub async fn close_all(&self, deadline: Duration) -> CloseReport {
        // `Duration::MAX` (or any limit past what `Instant` holds) waits for
        // every connection to come back.
        let deadline = Instant::now().checked_add(deadline);
        let inner = &self.inner;
        let entries = {
            let _writer = inner.write();
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
            report.connections_cut += entry.pool.wait_closed_until(deadline).await;
        }
        report
    }

    /// Whether [`close_all`](Self::close_all) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// Statistics of every pool (and read side, see
    /// [`Pool::reads`](crate::Pool::reads)), keyed by masked URL, and of
    /// every server budget, keyed by `host:port`.
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
                .flat_map(|entry| {
                    let mut stats = entry.pool.stats();
                    stats.active_references = entry.refs.look().0;
                    // A read side (`Pool::reads`) is listed beside its pool.
                    let reads = entry.pool.read_side().map(|r| r.stats());
                    std::iter::once(stats).chain(reads)
                })
                .map(|stats| (stats.url.clone(), stats))
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

/// The error for a `config` that does not mean what `handle`'s pool's
/// configuration means: the keys that differ, with both values.
#[cold]
fn settings_differ(handle: &PoolHandle, target: &Target, config: &PoolConfig) -> Error {
    let differ = handle.config().differences(config);
    let (in_force, asked) = (handle.target().tls(), target.tls());
    let listed: Vec<String> = differ
        .iter()
        .map(|(key, existing, asked)| format!("{key} = {existing} (in force) vs {asked} (asked)"))
        .chain(in_force.differences(asked).into_iter().map(|key| {
            format!(
                "{key} = {} (in force) vs {} (asked)",
                in_force.shown(key),
                asked.shown(key)
            )
        }))
        .collect();
    Error::config(format!(
        "the pool for {} exists with other settings: {}; one database has one pool and one configuration: pass the same settings, or Fleet::existing to share it as it is",
        handle.target(),
        listed.join(", ")
    ))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

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
                    let mut last: Option<u64> = None;
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
                            let id = handle.pool().id();
                            if last != Some(id) {
                                created.fetch_add(1, Ordering::Relaxed);
                                last = Some(id);
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

    /// The handshake step by step, without relying on timing: a handle taken
    /// before retirement looks again makes it back off; a lookup after the
    /// mark backs off to the writer lock and, once the retirement is done,
    /// gets a fresh pool, never the closed one.
    #[test]
    fn a_lookup_and_a_retirement_cannot_miss_each_other() {
        let runtime = current_thread();
        let _context = runtime.enter();
        let fleet = Fleet::new();
        let config = idle_config(Duration::from_secs(600));
        let target = target();
        let first = fleet.pool(&target, &config).expect("pool");
        let first_id = first.pool().id();
        drop(first);
        let entry = fleet
            .inner
            .pools
            .load()
            .iter()
            .next()
            .expect("entry")
            .clone();

        let (live, seen) = entry.refs.look();
        assert_eq!(live, 0);
        let held = fleet.pool(&target, &config).expect("pool");
        assert!(
            !entry.retire(seen),
            "retired a pool a lookup had just taken"
        );
        assert!(!held.is_closed());
        drop(held);

        let (_, seen) = entry.refs.look();
        std::thread::scope(|scope| {
            let writer = fleet.inner.write();
            assert!(entry.mark_retiring(seen));
            let lookup = scope.spawn(|| {
                let _context = runtime.enter();
                fleet.pool(&target, &config).expect("pool")
            });
            // The lookup counts its handle, sees the mark and waits for the
            // writer lock.
            let deadline = Instant::now() + Duration::from_secs(10);
            while entry.refs.look().1 == seen {
                assert!(Instant::now() < deadline, "the lookup never ran");
                std::thread::yield_now();
            }
            entry.unpublish(&fleet.inner);
            drop(writer);
            let handle = lookup.join().expect("lookup thread");
            assert!(!handle.is_closed(), "a lookup got the retired pool");
            assert_ne!(handle.pool().id(), first_id, "the retired pool came back");
        });
        assert!(entry.pool.is_closed());
    }

    #[test]
    fn asking_for_a_pool_with_other_settings_names_the_keys_that_differ() {
        let runtime = current_thread();
        let _context = runtime.enter();
        let fleet = Fleet::new();
        let config = PoolConfig {
            max_size: Some(10),
            ..idle_config(Duration::from_secs(600))
        };
        let first = fleet.pool(&target(), &config).expect("pool");
        // The same meaning written otherwise: `None` is 10 here.
        let same = PoolConfig {
            max_size: None,
            ..config.clone()
        };
        let again = fleet.pool(&target(), &same).expect("same settings");
        assert_eq!(again.pool().id(), first.pool().id());
        let other = PoolConfig {
            max_size: Some(25),
            acquire_timeout: Duration::from_secs(3),
            ..config.clone()
        };
        let err = fleet.pool(&target(), &other).unwrap_err();
        assert!(err.is_config(), "{err:?}");
        let message = err.to_string();
        assert!(
            message.contains("max_size = 10 (in force) vs 25 (asked)")
                && message.contains("timeout = 30s (in force) vs 3s (asked)"),
            "{message}"
        );
        let shared = fleet.existing(&target()).expect("the pool exists");
        assert_eq!(shared.pool().id(), first.pool().id());
        assert!(fleet
            .existing(&Target::parse("postgres://unit@127.0.0.1:1/none").unwrap())
            .is_none());
    }

    #[test]
    fn a_configuration_changed_in_place_is_checked_again() {
        let runtime = current_thread();
        let _context = runtime.enter();
        let fleet = Fleet::new();
        // One configuration, in one place, asked for again and again as a
        // loop would: every lookup compares what it holds now.
        let mut config = idle_config(Duration::from_secs(600));
        let first = fleet.pool(&target(), &config).expect("pool");
        for _ in 0..3 {
            let again = fleet.pool(&target(), &config).expect("same settings");
            assert_eq!(again.pool().id(), first.pool().id());
        }
        config.max_size = Some(config.effective_max_size());
        fleet.pool(&target(), &config).expect("the same meaning");
        config.statement_cache_size += 1;
        let err = fleet.pool(&target(), &config).unwrap_err();
        assert!(err.to_string().contains("statement_cache_size"), "{err}");
        config.statement_cache_size -= 1;
        config.max_lifetime = Some(Duration::from_secs(7));
        let err = fleet.pool(&target(), &config).unwrap_err();
        assert!(err.to_string().contains("max_lifetime"), "{err}");
    }

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
        // A handle's stats count the fleet's handles, as the fleet's do.
        assert_eq!(first.stats().active_references, 3);
        assert_eq!(
            first.pool().stats().active_references,
            0,
            "a bare Pool has none"
        );
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
