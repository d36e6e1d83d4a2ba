//! The registry of a fleet: one entry per database key, in an immutable
//! `hashbrown` table published with `arc-swap` and a generation number.
//!
//! Each thread keeps the snapshot it last read (thread-local [`Local`]). A
//! lookup of an existing pool is one load of the generation and, if it has
//! not moved, a probe of the thread's own snapshot with the hash its
//! [`Target`] carries: no lock, no hashing, no write to a shared line.
//! Creating or retiring a pool takes the writer lock, re-checks, publishes a
//! new table and bumps the generation.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use arc_swap::ArcSwap;
use hashbrown::HashTable;

use super::handles::{next_stripe, Cell, PoolHandle, Refs};
use crate::address::Target;
use crate::budget::ServerBudget;
use crate::config::{FleetConfig, PoolConfig};
use crate::pool::Pool;

/// The registry: one entry per key, found by the hash that [`Target`]
/// computed once when it was built, so a lookup never hashes the key.
pub(crate) type Registry = HashTable<Arc<Entry>>;

pub(crate) struct FleetInner {
    /// Names this fleet in the threads' snapshots (never reused).
    pub(crate) id: u64,
    /// Names this process among the replicas of its service
    /// (`replicas: auto`): 8 random hex digits.
    pub(crate) instance: String,
    pub(crate) config: FleetConfig,
    pub(crate) pools: ArcSwap<Registry>,
    /// Bumped after every store to `pools`: a snapshot read at the current
    /// generation is current.
    pub(crate) generation: AtomicU64,
    /// One budget per server (`host:port`); created under `writer`.
    pub(crate) budgets: Mutex<HashMap<String, Arc<ServerBudget>>>,
    /// Held while creating or retiring a pool; lookups never take it.
    pub(crate) writer: Mutex<()>,
    pub(crate) closed: AtomicBool,
    /// Handles kept by the fleet itself for warmed-up pools.
    pub(crate) pinned: Mutex<Vec<PoolHandle>>,
}

impl FleetInner {
    pub(crate) fn new(config: FleetConfig) -> FleetInner {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        FleetInner {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            instance: format!("{:08x}", fastrand::u32(..)),
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
    pub(crate) fn publish(&self, registry: Registry) -> Arc<Registry> {
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
pub(crate) struct Local {
    /// The stripe of this thread's handles (of `stripe_count()`).
    pub(crate) stripe: usize,
    /// The registry of the fleet this thread last looked in, and its
    /// generation then. It may keep retired (closed) entries in memory until
    /// the thread's next lookup; see `FleetInner::drop`.
    pub(crate) snapshot: Option<Snapshot>,
}

pub(crate) struct Snapshot {
    pub(crate) fleet: u64,
    pub(crate) generation: u64,
    pub(crate) registry: Arc<Registry>,
}

thread_local! {
    pub(crate) static LOCAL: RefCell<Local> = RefCell::new(Local {
        stripe: next_stripe(),
        snapshot: None,
    });
}

pub(crate) struct Entry {
    pub(crate) key: Arc<str>,
    pub(crate) hash: u64,
    /// The configuration as the caller that created the pool passed it
    /// (the pool's own has `max_size` resolved): a lookup passing an equal
    /// one, the usual case, needs no comparison of meanings.
    pub(crate) asked: PoolConfig,
    pub(crate) pool: Pool,
    pub(crate) refs: Arc<Refs>,
    /// One per stripe; a handle holds the cell of the thread that took it.
    pub(crate) cells: Box<[Arc<Cell>]>,
    pub(crate) fleet: Weak<FleetInner>,
}

/// The handle of the pool for `target` in `registry`, counted in `stripe`,
/// or `None` for a pool whose tokio runtime shut down (the caller replaces
/// it under the writer lock). The thread's fast path skips this check: a
/// pool whose runtime shut down bumps the generation (see `Fleet::create`),
/// which sends the thread here.
pub(crate) fn find_live(registry: &Registry, target: &Target, stripe: usize) -> Option<PoolHandle> {
    find_entry(registry, target)?
        .take_handle(stripe)
        .filter(|handle| !handle.pool().is_runtime_gone())
}

/// The entry for `target` in `registry`.
pub(crate) fn find_entry<'r>(registry: &'r Registry, target: &Target) -> Option<&'r Arc<Entry>> {
    registry.find(target.key_hash, |entry| {
        Arc::ptr_eq(&entry.key, &target.key) || entry.key == target.key
    })
}

impl FleetInner {
    /// Takes the writer lock: creating and retiring pools, and `close_all`.
    pub(crate) fn write(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }
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
    pub(crate) fn take_handle(&self, stripe: usize) -> Option<PoolHandle> {
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
    pub(crate) fn retire(&self, seen: u64) -> bool {
        let Some(fleet) = self.fleet.upgrade() else {
            self.pool.close();
            return true;
        };
        let _writer = fleet.write();
        if !self.mark_retiring(seen) {
            return false;
        }
        self.unpublish(&fleet);
        true
    }

    /// The first half of a retirement, under the writer lock: marks the
    /// entry retiring, then looks at the handles again. Returns `false`
    /// (unmarked) if a lookup took a handle since `seen`. Once it returns
    /// `true`, a lookup that finds the entry in its snapshot backs off to
    /// the writer lock.
    pub(crate) fn mark_retiring(&self, seen: u64) -> bool {
        self.refs.retiring.store(true, Ordering::SeqCst);
        if self.refs.look() != (0, seen) {
            // A lookup took a handle since the watcher looked.
            self.refs.retiring.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// The second half, still under the writer lock: removes the entry from
    /// the registry and closes its pool.
    pub(crate) fn unpublish(&self, fleet: &FleetInner) {
        self.remove_from(fleet);
        tracing::debug!(pool = %self.pool.target(), "pool closed after linger with no handles");
        self.pool.close();
    }

    /// Removes the entry from the registry (under the writer lock).
    pub(crate) fn remove_from(&self, fleet: &FleetInner) {
        let mut pools = Registry::clone(&fleet.pools.load());
        if let Ok(found) = pools.find_entry(self.hash, |e| std::ptr::eq(Arc::as_ptr(e), self)) {
            found.remove();
            fleet.publish(pools);
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        // The entry's references to the cells go with it.
        self.refs.base.store(0, Ordering::Release);
    }
}
