//! Counted handles without a shared counter.
//!
//! A pool has one [`Cell`] per stripe (an `Arc`, 128-byte aligned, holding a
//! clone of the pool); a thread always takes its handles from the same
//! stripe. A handle *is* a clone of the cell's `Arc`: the live count is each
//! cell's strong count less the entry's own reference ([`Refs::look`]).
//! Taking a handle also bumps the stripe's `taken` counter (its own line),
//! which lets the linger watcher tell "no handle now" from "none since the
//! last look". So taking is two uncontended atomic RMWs and dropping one,
//! all on lines only this thread writes.

use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use crate::pool::Pool;
use crate::stats::PoolStats;

/// The handle count of one pool.
///
/// Live handles are the cells' reference counts (less the entry's own
/// reference to each cell): taking a handle clones the thread's cell,
/// dropping it drops the clone. Taking also bumps the stripe's `taken`
/// counter, so the linger watcher can tell "no handle now" from "no handle
/// since the last look", and retirement can tell a handle taken at the last
/// moment (see [`Entry::take_handle`]).
pub(crate) struct Refs {
    pub(crate) taken: Box<[Stripe]>,
    /// The cells, to read their counts (set once, right after they exist).
    pub(crate) cells: OnceLock<Box<[Weak<Cell>]>>,
    /// References to each cell that are not handles: 1 while the entry
    /// lives, 0 after.
    pub(crate) base: AtomicUsize,
    /// Set by the linger watcher before its final look at the stripes; a
    /// lookup that sees it backs off. Both sides use `SeqCst`, so a handle
    /// taken at the last moment and a retirement cannot miss each other.
    pub(crate) retiring: AtomicBool,
}

/// Handles ever taken through one stripe (wrapping), on its own cache line.
#[repr(align(128))]
#[derive(Default)]
pub(crate) struct Stripe(pub(crate) AtomicU64);

impl Refs {
    pub(crate) fn new(stripes: usize) -> Refs {
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
    pub(crate) fn look(&self) -> (usize, u64) {
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
pub(crate) struct Cell {
    pub(crate) pool: Pool,
    pub(crate) refs: Arc<Refs>,
}

/// How many stripes a pool's handle count uses: enough that the threads of
/// a runtime rarely share one.
pub(crate) fn stripe_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(4, |n| n.get() * 2)
            .next_power_of_two()
            .clamp(2, 64)
    })
}

/// The stripe of a new thread: threads take stripes in turn.
pub(crate) fn next_stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed) & (stripe_count() - 1)
}

/// A counted handle to a fleet pool. Derefs to [`Pool`] (`handle.get()`).
/// While any handle lives, the pool stays open.
pub struct PoolHandle {
    pub(crate) cell: Arc<Cell>,
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

    /// [`Pool::stats`], with the live handles of this pool's fleet in
    /// `active_references` (as [`Fleet::stats`](crate::Fleet::stats) shows
    /// them).
    pub fn stats(&self) -> PoolStats {
        let mut stats = self.cell.pool.stats();
        stats.active_references = self.active_references();
        stats
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

impl fmt::Debug for PoolHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolHandle")
            .field("pool", &self.cell.pool)
            .field("active_references", &self.active_references())
            .finish()
    }
}
