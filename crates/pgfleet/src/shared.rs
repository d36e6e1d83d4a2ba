//! Lanes: a few connections of the pool on which many tasks' autocommit
//! statements are pipelined, for the statement methods on the pool
//! ([`Pool::query`](crate::Pool::query) and its kin, see `statement.rs`)
//! and for the opt-in shared mode, each with a set of its own ([`Use`]).
//!
//! A tokio-postgres `Client` takes requests from any number of tasks at once
//! and writes them back to back on its one socket; the server answers in
//! order. For short autocommit statements this pipelining does more per
//! connection than exclusive checkout, where each connection carries one
//! statement at a time and sits idle during every round trip.
//!
//! [`Pool::shared`](crate::Pool::shared) hands out a [`SharedConnection`]: a
//! lease on one of up to `shared_connections` *lanes*. A lane is an ordinary
//! pool connection, taken from the pool when shared mode first needs it (so it
//! counts in `max_size` and the server budget) and given back after
//! `idle_timeout` without a lease, or broken. A shared-mode lease goes to
//! the lane with the fewest leases; while every lane has a lease out and fewer than
//! `shared_connections` exist, another lane is opened in the background
//! (only the callers that come before the first lane is in wait for it). A lane past its lifetime or
//! `max_queries` is replaced the same way and keeps serving until its
//! replacement is in, so recycling never stalls the callers (and both limits
//! are soft in shared mode: a lane may run past them for the time of one
//! connect). The statement methods' lanes work the same way, except that
//! another opens only past [`STATEMENT_DEPTH`] statements in flight on every
//! lane, and that they carry only [`flights::Flight`]s.
//!
//! What may run in shared mode: single autocommit statements with no session
//! state — queries, inserts, updates, deletes, each on its own. What may not:
//! `BEGIN`/`COMMIT` (other tasks' statements would run inside the
//! transaction), `SET`, temporary tables, `LISTEN`, advisory locks, cursors,
//! `DISCARD`/`DEALLOCATE` (they remove the cached statements other leases
//! use), and prepared statements used beyond the lease that prepared them (a
//! statement from [`SharedConnection::prepare_cached`] belongs to the
//! connection, not the lease, and is the fastest way to run one). The
//! guard only derefs to `&Client`, so `Client::transaction` (which needs
//! `&mut`) cannot be reached; a lane that is found inside a transaction when
//! a lease ends is taken out of service at once (with a warning naming the
//! place that lease was taken) and rolled back before its connection is
//! reused.

mod flights;
pub(crate) mod statements;

use std::fmt;
use std::ops::Deref;
use std::panic::Location;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_postgres::Client;

use crate::config::PoolConfig;
use crate::conn::TxStatus;
use crate::error::{Error, Result};
use crate::pool::inner::{Conn, PoolInner};
use crate::pool::maintain::tick_for;
use crate::pool::query::Session;
use flights::Flights;

/// Leases a shared connection of `pool` for the caller at `location`: the
/// body of [`Pool::shared`](crate::Pool::shared).
pub(crate) async fn lease(
    pool: &Arc<PoolInner>,
    lanes: &Arc<Lanes>,
    location: &'static Location<'static>,
) -> Result<SharedConnection> {
    let cap = lanes.cap(pool);
    let deadline = Instant::now() + pool.config.acquire_timeout;
    loop {
        let changed = lanes.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        match lanes.decide(cap, Instant::now(), location) {
            None => return Err(pool.closed_error()),
            Some(Decision::Lease(lease, None)) => return Ok(lease),
            Some(Decision::Lease(lease, Some(growing))) => {
                // Open another lane without making this caller wait for it.
                pool.runtime.spawn(grow(pool.clone(), growing, location));
                return Ok(lease);
            }
            Some(Decision::Grow(growing)) => {
                // Within the caller's own deadline: it may have waited for
                // another caller's attempt already.
                let left = deadline.saturating_duration_since(Instant::now());
                let conn = pool.get_within(left, location).await?.into_conn();
                let lane = Lane::new(conn, pool, lanes, location);
                let lease = SharedConnection::new(lane.clone(), location);
                let added = lanes.add(lane, cap);
                drop(growing);
                return if added {
                    Ok(lease)
                } else {
                    Err(pool.closed_error())
                };
            }
            Some(Decision::Wait) => {
                if tokio::time::timeout_at(deadline.into(), changed)
                    .await
                    .is_err()
                {
                    let error = pool.timeout_error(pool.config.acquire_timeout);
                    pool.count_timeout(&error);
                    return Err(error);
                }
            }
        }
    }
}

/// Opens one more lane in the background (the caller that asked for it
/// already has a lease on another).
async fn grow(pool: Arc<PoolInner>, growing: Growing, location: &'static Location<'static>) {
    let cap = growing.lanes.cap(&pool);
    match pool.get(location).await {
        Ok(conn) => {
            let lane = Lane::new(conn.into_conn(), &pool, &growing.lanes, location);
            // Closed meanwhile: the lane, dropped, gives its connection back.
            growing.lanes.add(lane, cap);
        }
        Err(e) => {
            tracing::debug!(pool = %pool.label, error = %e, "could not open another shared connection")
        }
    }
    drop(growing);
}

/// The lanes of one pool.
pub(crate) struct Lanes {
    state: Mutex<LanesState>,
    /// Notified when a lane was added or an attempt to add one ended.
    changed: Notify,
    /// Lanes with no lease for this long are given back (`idle_timeout`).
    idle: Option<Duration>,
    /// How often the sweep looks (the pool's maintenance tick).
    tick: Duration,
    /// Whose lanes these are: the statement methods', or shared mode's.
    use_: Use,
}

/// The two sets of lanes a pool has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Use {
    /// The statement methods on the pool (`Pool::query`, ...): every
    /// request on these lanes goes through a [`flights::Flight`].
    Statements,
    /// Shared mode's leases (`Pool::shared`), which reach the `Client`.
    Leases,
}

/// Statements in flight on every lane before the statement methods open
/// another. One lane carries one server backend, so it runs at most one
/// server core's worth; below this depth a second lane only splits the
/// batches of the first, and on a machine whose cores the server shares it
/// doubles the threads that preempt each other (measured with
/// `pgfleet-bench --only l --tasks 16 --seconds 1 --repeat 2` before this
/// rule, two lanes forced by the load: at 16 tasks one lane gave 54.6k/s
/// with a p99 of 0.87 ms, two lanes 51.4k/s with 4.29 ms).
const STATEMENT_DEPTH: u64 = 32;

impl Use {
    /// Leases on every lane before another lane is opened: a shared-mode
    /// lease may be held across several statements, so any lease counts.
    fn depth(self) -> u64 {
        match self {
            Use::Statements => STATEMENT_DEPTH,
            Use::Leases => 1,
        }
    }
}

#[derive(Default)]
struct LanesState {
    lanes: Vec<Arc<Lane>>,
    /// Lanes being opened (their connection is being acquired).
    growing: usize,
    /// The sweep task runs (see [`sweep_lanes`]).
    sweeping: bool,
    closed: bool,
}

/// One connection in shared mode.
pub(crate) struct Lane {
    conn: Option<Conn>,
    pool: Arc<PoolInner>,
    lanes: Weak<Lanes>,
    leases: UseCount,
    /// Where the lease that opened this lane was taken.
    location: &'static Location<'static>,
    /// For the idle sweep: the leases-taken count last seen and since when.
    seen: Mutex<(u64, Instant)>,
    /// The requests in flight, for the statement methods.
    flights: Flights,
}

/// What [`lease`] should do, decided under the lanes lock.
enum Decision {
    /// Use this lease (already counted); with a token, also open another
    /// lane in the background.
    Lease(SharedConnection, Option<Growing>),
    /// No lane yet: open one and use it (the caller holds the token).
    Grow(Growing),
    /// The first lanes are being opened: wait for a change.
    Wait,
}

/// Counts a lane being opened; dropping it (on success, failure or
/// cancellation) uncounts it and wakes the callers waiting for a lane.
struct Growing {
    lanes: Arc<Lanes>,
}

impl Drop for Growing {
    fn drop(&mut self) {
        self.lanes.lock().growing -= 1;
        self.lanes.changed.notify_waiters();
    }
}

impl Lanes {
    /// No lanes yet, for a pool with `config`.
    pub(crate) fn new(config: &PoolConfig, use_: Use) -> Lanes {
        Lanes {
            state: Mutex::new(LanesState::default()),
            changed: Notify::new(),
            idle: config.idle_timeout,
            tick: tick_for(config),
            use_,
        }
    }

    /// How many lanes `pool` may have: for the statement methods
    /// `shared_connections` (one per core by default) and at most half of
    /// `max_size`, which leaves the rest to `get()` and to the statements
    /// that may not be pipelined (0 lanes, all of them on connections of
    /// their own, when `max_size` is 1); for shared mode
    /// `shared_connections` (2 by default), at most `max_size`.
    pub(crate) fn cap(&self, pool: &PoolInner) -> usize {
        let max = pool.max_size() as usize;
        match self.use_ {
            // A shared-mode lease may be held for long: one lane per lease
            // up to the cap, so `auto` keeps shared mode's 2.
            Use::Leases => (pool.config.shared_connections.unwrap_or(2) as usize).min(max),
            Use::Statements => (pool.config.lanes() as usize).min(max / 2),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LanesState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Picks a lane (shared mode: the one with the fewest leases; the
    /// statement methods: the busiest below [`STATEMENT_DEPTH`]; unfenced
    /// lanes within their time first), and asks for another lane while every lane is busy or one is
    /// due for replacement, and fewer than `cap` fresh ones exist or are
    /// being opened.
    fn decide(
        self: &Arc<Self>,
        cap: usize,
        now: Instant,
        location: &'static Location<'static>,
    ) -> Option<Decision> {
        let mut retired = Vec::new();
        let decision = {
            let mut st = self.lock();
            if st.closed {
                return None;
            }
            // Broken lanes, and lanes left in a transaction, leave the list;
            // their connection goes back to the pool when their last lease
            // ends.
            let mut i = 0;
            while i < st.lanes.len() {
                if st.lanes[i].alive() {
                    i += 1;
                } else {
                    retired.push(st.lanes.swap_remove(i));
                }
            }
            trim(&mut st.lanes, cap, &mut retired);
            // Lanes past their lifetime or `max_queries` keep serving until
            // their replacement is in: a new lane is opened now, and `add`
            // retires the old one.
            let fresh = st.lanes.iter().filter(|lane| lane.fresh(now)).count();
            // A fenced lane (a statement whose caller left is being
            // cancelled on it) takes statements only when no other can.
            let depth = self.use_.depth();
            let least = st
                .lanes
                .iter()
                .min_by_key(|lane| (lane.flights.fenced(), !lane.fresh(now), lane.live_leases()))
                .cloned();
            // The statement methods pack: the busiest lane below the depth
            // takes the statement, so a load that one lane carries leaves
            // the others idle (their backends asleep, and given back after
            // `idle_timeout`) instead of spreading thin.
            let packed = (self.use_ == Use::Statements)
                .then(|| {
                    st.lanes
                        .iter()
                        .filter(|lane| {
                            !lane.flights.fenced() && lane.fresh(now) && lane.live_leases() < depth
                        })
                        .max_by_key(|lane| lane.live_leases())
                        .cloned()
                })
                .flatten();
            let all_busy = least
                .as_ref()
                .is_none_or(|lane| lane.live_leases() >= depth || lane.flights.fenced());
            // With no lane yet, the first one is opened alone: the callers
            // that come meanwhile wait for it, and the load decides on more.
            // Then: one more while every lane is busy, and one replacement
            // per lane past its time (not counting those being opened).
            let wanted = match &least {
                None => cap > 0 && st.growing == 0,
                Some(_) => {
                    (all_busy && fresh + st.growing < cap)
                        || fresh + st.growing < st.lanes.len().min(cap)
                }
            };
            let grow = wanted.then(|| {
                st.growing += 1;
                Growing {
                    lanes: self.clone(),
                }
            });
            match (packed.or(least), grow) {
                // Never wait for a new lane while one can take the statement.
                (Some(lane), grow) => Decision::Lease(SharedConnection::new(lane, location), grow),
                (None, Some(grow)) => Decision::Grow(grow),
                (None, None) => Decision::Wait,
            }
        };
        drop(retired);
        Some(decision)
    }

    /// Adds a lane, and retires lanes past their time once their
    /// replacement is in. Returns `false` (the lane is dropped, and its
    /// connection goes back to the pool) if the lanes were closed meanwhile.
    fn add(self: &Arc<Self>, lane: Arc<Lane>, cap: usize) -> bool {
        let mut st = self.lock();
        if st.closed {
            drop(st);
            drop(lane);
            return false;
        }
        let runtime = lane.pool.runtime.clone();
        let now = Instant::now();
        let mut retired = Vec::new();
        // A lane past its time is replaced by the first fresh lane added
        // after it (the load may not need it beside the old one).
        if lane.fresh(now) {
            if let Some(i) = st.lanes.iter().position(|l| !l.fresh(now)) {
                retired.push(st.lanes.swap_remove(i));
            }
        }
        st.lanes.push(lane);
        while st.lanes.len() > cap {
            match st.lanes.iter().position(|l| !l.fresh(now)) {
                Some(i) => retired.push(st.lanes.remove(i)),
                None => break,
            }
        }
        let start_sweep = !st.sweeping;
        st.sweeping = true;
        drop(st);
        drop(retired);
        if start_sweep {
            runtime.spawn(sweep_lanes(Arc::downgrade(self), self.tick));
        }
        true
    }

    /// Gives back lanes that had no lease for `idle_timeout`, and lanes
    /// that broke; returns whether any lane is left.
    fn sweep(&self, now: Instant) -> bool {
        let idle = self.idle;
        let mut retired = Vec::new();
        // Callers wait in `get()`: a lane without a statement on it gives
        // its connection back now rather than after `idle_timeout`. (The
        // pool's lock is never taken under the lanes lock.)
        let pool = self.lock().lanes.first().map(|lane| lane.pool.clone());
        let wanted_back = pool.as_ref().is_some_and(|pool| pool.has_waiters());
        let left = {
            let mut st = self.lock();
            // The pool may have been resized below its lanes.
            if let Some(pool) = &pool {
                trim(&mut st.lanes, self.cap(pool), &mut retired);
            }
            let mut i = 0;
            while i < st.lanes.len() {
                let lane = &st.lanes[i];
                let unused = idle.is_some_and(|idle| lane.unused_for(idle, now))
                    || (wanted_back && lane.live_leases() == 0 && lane.flights.open() == 0);
                if unused || !lane.alive() {
                    retired.push(st.lanes.swap_remove(i));
                } else {
                    i += 1;
                }
            }
            let left = !st.lanes.is_empty() && !st.closed;
            st.sweeping = left;
            left
        };
        drop(retired);
        left
    }

    /// Takes every lane out of service (the pool is closing).
    pub(crate) fn close(&self) {
        let retired = {
            let mut st = self.lock();
            st.closed = true;
            std::mem::take(&mut st.lanes)
        };
        drop(retired);
        self.changed.notify_waiters();
    }

    /// Lanes in service.
    pub(crate) fn count(&self) -> usize {
        self.lock().lanes.len()
    }

    /// Takes a poisoned lane out of service.
    fn remove(&self, lane: &Arc<Lane>) {
        let removed = {
            let mut st = self.lock();
            st.lanes
                .iter()
                .position(|l| Arc::ptr_eq(l, lane))
                .map(|i| st.lanes.swap_remove(i))
        };
        drop(removed);
    }
}

/// Takes out of service the lanes above `cap` (the pool resized below
/// them), those with the fewest leases first; their connections go back
/// when their last lease ends.
fn trim(lanes: &mut Vec<Arc<Lane>>, cap: usize, retired: &mut Vec<Arc<Lane>>) {
    while lanes.len() > cap.max(1) {
        let Some(i) = (0..lanes.len()).min_by_key(|&i| lanes[i].live_leases()) else {
            break;
        };
        retired.push(lanes.swap_remove(i));
    }
}

/// The sweep task of shared mode: on the pool's maintenance tick, gives back
/// lanes that had no lease for `idle_timeout`, or broke. Runs while lanes
/// exist; the next lane added starts it again.
async fn sweep_lanes(lanes: Weak<Lanes>, tick: Duration) {
    // The first tick is at once: skip it.
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    loop {
        interval.tick().await;
        let Some(lanes) = lanes.upgrade() else {
            return;
        };
        if !lanes.sweep(Instant::now()) {
            return;
        }
    }
}

impl Lane {
    fn new(
        conn: Conn,
        pool: &Arc<PoolInner>,
        lanes: &Arc<Lanes>,
        location: &'static Location<'static>,
    ) -> Arc<Lane> {
        Arc::new(Lane {
            conn: Some(conn),
            pool: pool.clone(),
            lanes: Arc::downgrade(lanes),
            leases: UseCount::default(),
            location,
            seen: Mutex::new((0, Instant::now())),
            flights: Flights::new(),
        })
    }

    fn conn(&self) -> &Conn {
        self.conn.as_ref().expect("present until drop")
    }

    /// The query machinery's view of this lane's connection.
    fn session(&self) -> Session<'_> {
        Session::of(&self.conn().raw, &self.pool, true)
    }

    /// Whether the lane may take leases at all: its connection is open, in
    /// no transaction, on a host the pool has not left, and its server said
    /// nothing about another role (the pool looks when it comes back).
    fn alive(&self) -> bool {
        let conn = self.conn();
        let hosts = &self.pool.hosts;
        let role_changed = hosts.attrs.checks_role() && conn.raw.tap.role_alert();
        !conn.raw.is_broken()
            && conn.raw.tap.status() == TxStatus::Idle
            && !hosts.is_retired(conn.host, conn.host_generation)
            && !role_changed
    }

    /// Whether the lane is within its lifetime, `max_queries` and the
    /// pool's generation (`drain`); a lane that is not is replaced, and
    /// serves until the replacement is in.
    fn fresh(&self, now: Instant) -> bool {
        let conn = self.conn();
        !conn.is_expired(now)
            && conn.generation == self.pool.generation.load(Ordering::Relaxed)
            && self
                .pool
                .config
                .max_queries
                .is_none_or(|max| conn.raw.tap.queries() < max)
    }

    fn live_leases(&self) -> u64 {
        self.leases.live()
    }

    /// Whether no lease was taken or held for `idle`, as seen by the sweeps
    /// (the first sweep that sees the lane unused starts the clock).
    fn unused_for(&self, idle: Duration, now: Instant) -> bool {
        let (live, taken) = self.leases.look();
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if live > 0 || seen.0 != taken {
            *seen = (taken, now);
            false
        } else {
            now.saturating_duration_since(seen.1) >= idle
        }
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // The usual return path: a lane left in a transaction is rolled
            // back, a broken or expired one closed.
            self.pool.release(conn, self.location, Instant::now(), None);
        }
    }
}

/// A lease on a connection that other tasks use at the same time: their
/// statements and this task's are pipelined on one socket. Derefs to
/// [`tokio_postgres::Client`]; see [`Pool::shared`](crate::Pool::shared) for
/// what may run on it.
pub struct SharedConnection {
    lane: Arc<Lane>,
    location: &'static Location<'static>,
}

impl SharedConnection {
    fn new(lane: Arc<Lane>, location: &'static Location<'static>) -> SharedConnection {
        lane.leases.take();
        lane.pool
            .counters
            .shared_leases
            .fetch_add(1, Ordering::Relaxed);
        SharedConnection { lane, location }
    }
    /// Where this lease was taken (`shared()`'s caller).
    pub fn location(&self) -> &'static Location<'static> {
        self.location
    }

    crate::pool::query::query_methods!();

    /// COPY is refused in shared mode: a COPY holds the connection for
    /// its whole transfer, and other tasks' statements would be sent into
    /// the middle of it. Take a connection of your own with
    /// [`Pool::get`](crate::Pool::get).
    ///
    /// # Errors
    /// Always `Unsupported`.
    pub async fn copy_in<T: ?Sized>(&self, _statement: &T) -> Result<()> {
        Err(copy_refused())
    }

    /// COPY is refused in shared mode, as [`copy_in`](Self::copy_in).
    ///
    /// # Errors
    /// Always `Unsupported`.
    pub async fn copy_out<T: ?Sized>(&self, _statement: &T) -> Result<()> {
        Err(copy_refused())
    }

    fn session(&self) -> Session<'_> {
        self.lane.session()
    }

    /// Statements cached on this lease's connection.
    pub fn cached_statements(&self) -> usize {
        self.lane.conn().raw.statements.len()
    }
}

fn copy_refused() -> Error {
    Error::unsupported(
        "COPY cannot run in shared mode, where other tasks' statements share the connection: \
         take a connection of your own with pool.get()",
    )
}

impl Deref for SharedConnection {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.lane.conn().raw.client
    }
}

impl Drop for SharedConnection {
    fn drop(&mut self) {
        let lane = &self.lane;
        lane.leases.put();
        let status = lane.conn().raw.tap.status();
        if status != TxStatus::Idle {
            tracing::warn!(
                pool = %lane.pool.label,
                noticed_at = %self.location,
                "a shared connection is inside a transaction: shared mode is for autocommit \
                 statements only. It is taken out of service and rolled back; statements of \
                 other tasks on it may have run inside that transaction"
            );
            if let Some(lanes) = lane.lanes.upgrade() {
                lanes.remove(lane);
            }
        }
    }
}

impl fmt::Debug for SharedConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedConnection")
            .field("pool", &self.lane.pool.label)
            .field("leases", &self.lane.leases.live())
            .finish()
    }
}

/// Live uses and uses ever taken, in one atomic word: the low half counts
/// live uses, the high half (wrapping) uses taken, so a watcher can tell
/// "none now" from "none since I last looked" (the idle sweep). Counts a lane's
/// leases.
#[derive(Debug, Default)]
struct UseCount(AtomicU64);

impl UseCount {
    const LIVE: u64 = 1;
    const TAKEN: u64 = 1 << 32;

    /// One more live use.
    fn take(&self) {
        self.0.fetch_add(Self::LIVE | Self::TAKEN, Ordering::SeqCst);
    }

    /// One live use fewer.
    fn put(&self) {
        self.0.fetch_sub(Self::LIVE, Ordering::Release);
    }

    /// Live uses, and uses ever taken (wrapping).
    fn look(&self) -> (u64, u64) {
        let word = self.0.load(Ordering::SeqCst);
        (word & (Self::TAKEN - 1), word >> 32)
    }

    /// Live uses.
    fn live(&self) -> u64 {
        self.look().0
    }
}
