//! The pool: a bounded set of tokio-postgres connections to one database,
//! handed out FIFO-fairly, kept healthy in the background, and never handed
//! out dirty.
//!
//! Connections are opened by background tasks, never by the caller of
//! `get()`: a caller that gives up (timeout, dropped future) does not abort a
//! connect half-way, and the connection goes to the next caller in line.
//! Capacity is an RAII `Slot` inside each connection, so a connection lost
//! anywhere (a panicking task, a dropped channel) still gives its unit back.

use std::fmt;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::panic::Location;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};
use tokio::time::timeout;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Error as PgError, NoTls, Statement};

use crate::budget::{ServerBudget, Unit};
use crate::config::PoolConfig;
use crate::conn::{self, RawConn};
use crate::error::{Error, ErrorKind, Result, TimeoutStage};
use crate::internals::{ConnectFailure, Plan, State, Waiter};
use crate::shared::{Decision, Lanes, SharedConnection};
use crate::stats::{Bounds, CloseReason, Counters, PoolStats, Timings};
use crate::tap::TxStatus;
use crate::target::Target;

/// How long a returned connection may take to receive the answers to
/// requests still in flight before the pool cancels them.
const SETTLE: Duration = Duration::from_millis(100);

/// A pool of connections to one database.
///
/// Cheap to clone (an `Arc`). Most code gets pools from a
/// [`Fleet`](crate::Fleet), which keeps one per database; a `Pool` can also be
/// built directly with [`Pool::new`].
#[derive(Clone)]
pub struct Pool {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    /// Identifies the pool in its server budget.
    id: u64,
    budget: Option<Arc<ServerBudget>>,
    target: Target,
    config: PoolConfig,
    pg: tokio_postgres::Config,
    state: Mutex<State>,
    pub(crate) counters: Counters,
    /// Notified when a connect attempt ends (warm-up waits on it).
    connect_events: Notify,
    /// Notified when the last connection of a closed pool is gone.
    drained: Notify,
    runtime: tokio::runtime::Handle,
    next_id: AtomicU64,
    /// Masked URL, for messages.
    label: String,
    /// Shared mode's connections.
    lanes: Lanes,
}

/// One unit of the pool's capacity, held by a connection (or a connect in
/// progress) for its whole life. Dropping it gives the unit back.
pub(crate) struct Slot {
    shared: Weak<Shared>,
    id: u64,
    connecting: bool,
    reason: Option<CloseReason>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        if let Some(reason) = self.reason {
            shared.counters.closed(reason);
        }
        let (plan, drained) = {
            let mut st = shared.lock();
            st.size -= 1;
            st.live.remove(&self.id);
            // A connect that never finished does not replan here: its task
            // replans after a failure, and a task dropped by a runtime that is
            // shutting down must not spawn another one (which would be dropped
            // at once, and so on).
            let plan = if self.connecting {
                st.connecting -= 1;
                Plan::default()
            } else {
                shared.plan(&mut st)
            };
            (plan, st.closed && st.size == 0)
        };
        shared.execute(plan);
        if drained {
            shared.drained.notify_waiters();
        }
    }
}

/// A pooled connection, boxed: it moves between the idle queue, waiters and
/// guards, and a pointer moves cheaper than the whole.
pub(crate) type Conn = Box<PoolConn>;

/// A pooled connection with its bookkeeping.
pub(crate) struct PoolConn {
    pub(crate) raw: RawConn,
    /// When this connection is to be retired (lifetime minus jitter).
    expires: Option<Instant>,
    idle_since: Instant,
    slot: Slot,
    /// The server-budget unit, given back after the slot.
    _unit: Option<Unit>,
}

impl PoolConn {
    fn close(mut self: Box<Self>, reason: CloseReason) {
        self.slot.reason = Some(reason);
        drop(self);
    }

    pub(crate) fn is_expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|t| now >= t)
    }
}

/// What `take` found for a caller.
enum Taken {
    /// An idle connection, fit to hand out now.
    Ready(Conn),
    /// An idle connection that sat long enough to need a round-trip check.
    Stale(Conn),
    /// None idle: the caller is in the queue of waiters.
    Queued(WaitGuard),
}

/// Where a returned connection goes.
enum Verdict {
    Reuse,
    Close(CloseReason),
    Clean,
}

impl Shared {
    pub(crate) fn config(&self) -> &PoolConfig {
        &self.config
    }

    pub(crate) fn label(&self) -> &str {
        &self.label
    }

    pub(crate) fn lanes(&self) -> &Lanes {
        &self.lanes
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent between statements; a panic elsewhere
        // while holding the lock cannot leave it half-updated.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn plan(&self, st: &mut State) -> Plan {
        st.plan(self.config.min_size, self.config.max_size, Instant::now())
    }

    /// Starts what a plan asks for. Called without the lock.
    fn execute(self: &Arc<Self>, plan: Plan) {
        for _ in 0..plan.connects {
            let slot = Slot {
                shared: Arc::downgrade(self),
                id: self.next_id.fetch_add(1, Ordering::Relaxed),
                connecting: true,
                reason: None,
            };
            self.runtime.spawn(open(self.clone(), slot));
        }
        if let Some(at) = plan.retry_at {
            let weak = Arc::downgrade(self);
            self.runtime.spawn(async move {
                tokio::time::sleep_until(at.into()).await;
                if let Some(shared) = weak.upgrade() {
                    let plan = {
                        let mut st = shared.lock();
                        st.retry_scheduled = false;
                        shared.plan(&mut st)
                    };
                    shared.execute(plan);
                }
            });
        }
    }

    /// Gives a clean connection to the oldest live waiter, or puts it idle
    /// (idle since `now`).
    fn hand_off(&self, mut st: MutexGuard<'_, State>, mut conn: Conn, now: Instant) {
        if st.closed {
            drop(st);
            conn.close(CloseReason::Shutdown);
            return;
        }
        while let Some(waiter) = st.waiters.pop_front() {
            if waiter.tx.is_closed() {
                continue;
            }
            match waiter.tx.send(Ok(conn)) {
                Ok(()) => {
                    st.waiting -= 1;
                    return;
                }
                // The caller gave up between the check and the send.
                Err(Ok(back)) => conn = back,
                Err(Err(_)) => unreachable!("only connections are sent here"),
            }
        }
        conn.idle_since = now;
        st.idle.push_back(conn);
    }

    fn verdict(&self, conn: &Conn, now: Instant) -> Verdict {
        if conn.raw.is_broken() {
            if let Some(code) = conn.raw.tap.fatal_code() {
                tracing::debug!(pool = %self.label, sqlstate = %code, "connection closed by the server");
            }
            Verdict::Close(CloseReason::Broken)
        } else if !conn.raw.tap.is_clean() {
            Verdict::Clean
        } else if self
            .config
            .max_queries
            .is_some_and(|max| conn.raw.tap.queries() >= max)
        {
            Verdict::Close(CloseReason::MaxQueries)
        } else if conn.is_expired(now) {
            Verdict::Close(CloseReason::Lifetime)
        } else {
            Verdict::Reuse
        }
    }

    /// Takes back a connection from a caller, at `now`.
    pub(crate) fn release(
        self: &Arc<Self>,
        conn: Conn,
        location: &'static Location<'static>,
        now: Instant,
    ) {
        match self.verdict(&conn, now) {
            Verdict::Reuse => self.hand_off(self.lock(), conn, now),
            Verdict::Close(reason) => conn.close(reason),
            Verdict::Clean => match tokio::runtime::Handle::try_current() {
                Ok(_) => {
                    self.runtime.spawn(clean(self.clone(), conn, location));
                }
                Err(_) => conn.close(CloseReason::Dirty),
            },
        }
    }

    /// Closes the longest-idle connection if the pool is above its floor,
    /// to free a server-budget unit for another pool. Returns whether one
    /// was closed.
    pub(crate) fn reclaim_idle(&self) -> bool {
        let victim = {
            let mut st = self.lock();
            if st.size - st.connecting <= self.config.min_size {
                return false;
            }
            st.idle.pop_front()
        };
        match victim {
            Some(conn) => {
                conn.close(CloseReason::Reclaimed);
                true
            }
            None => false,
        }
    }

    /// The error of an acquire that ran out of time, with the pool's
    /// snapshot, its budget and the last connect error.
    fn timeout_error(&self) -> Error {
        let after = self.config.acquire_timeout;
        let mut message = format!(
            "timed out after {} waiting for a connection to {} {}",
            humantime::format_duration(after),
            self.label,
            self.snapshot_line()
        );
        if let Some(budget) = &self.budget {
            message.push_str("; ");
            message.push_str(&budget.summary());
        }
        if let Some(last) = self.last_failure_text() {
            message.push_str("; last connect error: ");
            message.push_str(&last);
        }
        Error::timeout(TimeoutStage::Acquire, after, message)
    }

    /// Counts an acquire timeout, if `error` is one (waiters count their
    /// own, see `reap_waiters`).
    fn count_timeout(&self, error: &Error) {
        if matches!(
            error.kind(),
            ErrorKind::Timeout {
                stage: TimeoutStage::Acquire,
                ..
            }
        ) {
            self.counters
                .acquires_timed_out
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    fn snapshot_line(&self) -> String {
        let g = self.lock().gauges();
        format!(
            "(size={}, idle={}, in_use={}, waiting={}, connecting={}, max_size={})",
            g.size, g.idle, g.in_use, g.waiting, g.connecting, self.config.max_size
        )
    }

    fn last_failure_text(&self) -> Option<String> {
        self.lock().last_failure.as_ref().map(|f| f.message.clone())
    }
}

/// Fails the waiters whose `acquire_timeout` ran out, so that waiters arm
/// no timer of their own. One task per pool, running only while somebody
/// waits: it sleeps until the earliest deadline in the queue (with one
/// timeout per pool and a FIFO queue, the front's), fails every waiter then
/// due, and stops when the queue is empty. A waiter queued with an earlier
/// deadline than the task's next wake (one back in line after a failed
/// health check) starts a new reaper, which supersedes the old one.
async fn reap_waiters(mut reaper: Reaper) {
    loop {
        let Some(shared) = reaper.pool.upgrade() else {
            reaper.done = true;
            return;
        };
        let now = Instant::now();
        let due = {
            let st = shared.lock();
            st.reaper == reaper.id && st.waiters.iter().any(|w| w.deadline <= now)
        };
        // Built before the lock is taken again (it reads the gauges), while
        // the callers it is for still count as waiting.
        let error = due.then(|| shared.timeout_error());
        let next = {
            let mut st = shared.lock();
            if st.reaper != reaper.id {
                // Superseded by a reaper with an earlier wake.
                reaper.done = true;
                return;
            }
            let waiting = std::mem::take(&mut st.waiters);
            let mut next: Option<Instant> = None;
            for waiter in waiting {
                if waiter.tx.is_closed() {
                    continue;
                }
                match &error {
                    Some(error) if waiter.deadline <= now => {
                        // The caller counts its own timeout (`acquire_slow`),
                        // so the counter is up before it sees the error.
                        if waiter.tx.send(Err(error.duplicate())).is_ok() {
                            st.waiting -= 1;
                        }
                    }
                    _ => {
                        next = Some(next.map_or(waiter.deadline, |t| t.min(waiter.deadline)));
                        st.waiters.push_back(waiter);
                    }
                }
            }
            st.reap_at = next;
            next
        };
        drop(shared);
        match next {
            Some(at) => tokio::time::sleep_until(at.into()).await,
            None => {
                reaper.done = true;
                return;
            }
        }
    }
}

/// What a reaper task owns. Made before the task is spawned: if the task is
/// dropped without finishing — its runtime shut down, or was already gone
/// at the spawn — nobody would fail the waiters at their deadline any more,
/// and the pool's connections went with that runtime; so the waiters fail
/// now, and the next waiter starts a reaper again.
struct Reaper {
    pool: Weak<Shared>,
    id: u64,
    /// Set when the task ends on its own.
    done: bool,
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let Some(shared) = self.pool.upgrade() else {
            return;
        };
        let mut st = shared.lock();
        if st.reaper == self.id {
            st.reap_at = None;
            let label = &shared.label;
            st.fail_waiters(|| {
                Error::closed(format!(
                    "the tokio runtime of the pool for {label} shut down; it cannot time out waiters or open connections"
                ))
            });
        }
    }
}

/// Opens one connection for the pool and hands it to the next waiter.
async fn open(shared: Arc<Shared>, mut slot: Slot) {
    let unit = match &shared.budget {
        Some(budget) => {
            let still_needed = || {
                let st = shared.lock();
                // This connect counts in `size`: it is needed while callers
                // wait, or while it is part of the floor.
                !st.closed && (st.waiting > 0 || st.size <= shared.config.min_size)
            };
            match budget.acquire(shared.id, still_needed).await {
                Some(unit) => Some(unit),
                None => return,
            }
        }
        None => None,
    };
    let started = Instant::now();
    let result = match timeout(
        shared.config.connect_timeout,
        conn::connect(
            &shared.target,
            &shared.pg,
            shared.config.statement_cache_size,
        ),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(Error::timeout(
            TimeoutStage::Connect,
            shared.config.connect_timeout,
            format!(
                "timed out after {} connecting to {}",
                humantime::format_duration(shared.config.connect_timeout),
                shared.label
            ),
        )),
    };
    match result {
        Ok(raw) => {
            if let Some(budget) = shared.budget.as_ref().filter(|b| b.needs_derivation()) {
                derive_budget(budget, &raw.client).await;
            }
            shared
                .counters
                .connections_created
                .fetch_add(1, Ordering::Relaxed);
            shared.counters.connect.record(started.elapsed());
            let expires = shared.config.max_lifetime.map(|lifetime| {
                // Up to 10% off, so connections opened together do not
                // expire together.
                raw.created + lifetime.mul_f64(1.0 - fastrand::f64() * 0.1)
            });
            let now = Instant::now();
            let mut st = shared.lock();
            st.connecting -= 1;
            slot.connecting = false;
            st.connect_succeeded();
            st.live.insert(slot.id, raw.driver.clone());
            let conn = Box::new(PoolConn {
                raw,
                expires,
                idle_since: now,
                slot,
                _unit: unit,
            });
            shared.hand_off(st, conn, now);
            shared.connect_events.notify_waiters();
        }
        Err(err) => {
            shared
                .counters
                .connect_errors
                .fetch_add(1, Ordering::Relaxed);
            let message = err.to_string();
            let code = err.code().map(str::to_owned);
            let permanent = code.as_deref().is_some_and(conn::is_permanent);
            if code.as_deref() == Some(conn::TOO_MANY_CONNECTIONS) {
                shared
                    .counters
                    .connections_refused
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(budget) = &shared.budget {
                    budget.refused();
                }
            }
            tracing::warn!(pool = %shared.label, error = %message, "connect failed");
            {
                let mut st = shared.lock();
                st.connect_failed(ConnectFailure {
                    message,
                    code,
                    at: Instant::now(),
                });
                if permanent {
                    // Waiting will not cure bad credentials or a missing
                    // database: fail the callers now.
                    st.fail_waiters(|| err.duplicate());
                }
            }
            shared.connect_events.notify_waiters();
            drop(slot);
            drop(unit);
            // Retry after the backoff if callers or the floor still need it.
            let plan = shared.plan(&mut shared.lock());
            shared.execute(plan);
        }
    }
}

/// Reads the server's connection limits on the first connection to a server
/// whose budget is `auto`.
async fn derive_budget(budget: &Arc<ServerBudget>, client: &Client) {
    let query = "SELECT current_setting('max_connections')::int, \
                 current_setting('superuser_reserved_connections')::int, \
                 coalesce(current_setting('reserved_connections', true), '0')::int";
    match client.query_one(query, &[]).await {
        Ok(row) => {
            let get = |i: usize| u32::try_from(row.get::<_, i32>(i)).unwrap_or(0);
            budget.derive(get(0), get(1), get(2));
        }
        Err(e) => {
            tracing::warn!(server = %budget.server(), error = %e, "could not read the server's connection limits");
            budget.derivation_failed();
        }
    }
}

/// Cleans a connection returned dirty: waits for requests in flight (and
/// cancels them if they run on), rolls back an open transaction, then
/// returns it to the pool or closes it.
async fn clean(shared: Arc<Shared>, conn: Conn, location: &'static Location<'static>) {
    let tap = conn.raw.tap.clone();
    let mut settled = timeout(SETTLE, tap.settled()).await.unwrap_or(false);
    if !settled && !conn.raw.is_broken() {
        // A statement is still running on the server: cancel it so the
        // connection can come back, rather than leave a busy backend behind.
        let token = conn.raw.client.cancel_token();
        if let Ok(socket) = conn::open_socket(&shared.target).await {
            let _ = timeout(
                shared.config.connect_timeout,
                token.cancel_query_raw(socket, NoTls),
            )
            .await;
            settled = timeout(shared.config.connect_timeout, tap.settled())
                .await
                .unwrap_or(false);
        }
    }
    if !settled {
        tracing::warn!(pool = %shared.label, taken_at = %location, "connection returned with a request still running; closed");
        conn.close(CloseReason::Dirty);
        return;
    }
    if tap.status() != TxStatus::Idle {
        shared
            .counters
            .dirty_returns
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            pool = %shared.label,
            taken_at = %location,
            "connection returned inside a transaction; rolled back"
        );
        let rolled_back = timeout(
            shared.config.connect_timeout,
            conn.raw.client.batch_execute("ROLLBACK"),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        if !rolled_back || !tap.is_clean() {
            conn.close(CloseReason::Dirty);
            return;
        }
    }
    let now = Instant::now();
    match shared.verdict(&conn, now) {
        Verdict::Reuse => shared.hand_off(shared.lock(), conn, now),
        Verdict::Close(reason) => conn.close(reason),
        Verdict::Clean => conn.close(CloseReason::Dirty),
    }
}

/// Closes idle connections past their idle timeout or lifetime and refills
/// the floor, on a tick derived from the configured durations.
async fn maintain(weak: Weak<Shared>, tick: Duration) {
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(shared) = weak.upgrade() else {
            return;
        };
        let now = Instant::now();
        let mut victims = Vec::new();
        let plan = {
            let mut st = shared.lock();
            if st.closed {
                return;
            }
            let mut above_floor = st.size.saturating_sub(shared.config.min_size);
            let idle_timeout = shared.config.idle_timeout;
            // Oldest-idle first: the front of the queue.
            let mut kept = std::collections::VecDeque::with_capacity(st.idle.len());
            while let Some(conn) = st.idle.pop_front() {
                let reason = if conn.raw.is_broken() {
                    Some(CloseReason::Broken)
                } else if conn.is_expired(now) {
                    Some(CloseReason::Lifetime)
                } else if above_floor > 0
                    && idle_timeout.is_some_and(|t| now - conn.idle_since >= t)
                {
                    Some(CloseReason::Idle)
                } else {
                    None
                };
                match reason {
                    Some(reason) => {
                        above_floor = above_floor.saturating_sub(1);
                        victims.push((conn, reason));
                    }
                    None => kept.push_back(conn),
                }
            }
            st.idle = kept;
            shared.plan(&mut st)
        };
        for (conn, reason) in victims {
            conn.close(reason);
        }
        shared.execute(plan);
        shared.lanes.sweep(shared.config.idle_timeout, now);
    }
}

/// The maintenance tick: a quarter of the shortest timed behaviour, between
/// 10ms and 1s.
fn tick_for(config: &PoolConfig) -> Duration {
    [config.idle_timeout, config.max_lifetime]
        .into_iter()
        .flatten()
        .map(|d| d / 4)
        .min()
        .unwrap_or(Duration::from_secs(1))
        .clamp(Duration::from_millis(10), Duration::from_secs(1))
}

impl Pool {
    /// Creates a pool and starts opening its warm floor (`min_size`
    /// connections) in the background. Returns at once.
    ///
    /// # Errors
    /// A `Config` error if the configuration is invalid or if called outside
    /// a tokio runtime.
    pub fn new(target: Target, config: PoolConfig) -> Result<Pool> {
        Pool::build(target, config, None)
    }

    /// A pool that takes its connections from a server budget.
    pub(crate) fn build(
        target: Target,
        config: PoolConfig,
        budget: Option<Arc<ServerBudget>>,
    ) -> Result<Pool> {
        static NEXT_POOL_ID: AtomicU64 = AtomicU64::new(0);
        config.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::config(
                "pgfleet pools must be created inside a tokio runtime (no runtime is running)",
            )
        })?;
        let label = target.to_string();
        let shared = Arc::new(Shared {
            id: NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed),
            budget,
            pg: conn::pg_config(&target, &config),
            target,
            state: Mutex::new(State::new()),
            counters: Counters::new(),
            connect_events: Notify::new(),
            drained: Notify::new(),
            runtime,
            next_id: AtomicU64::new(0),
            label,
            config,
            lanes: Lanes::new(),
        });
        if let Some(budget) = &shared.budget {
            budget.join(
                shared.id,
                Arc::downgrade(&shared),
                shared.label.clone(),
                shared.config.min_size,
            )?;
        }
        let plan = shared.plan(&mut shared.lock());
        shared.execute(plan);
        shared
            .runtime
            .spawn(maintain(Arc::downgrade(&shared), tick_for(&shared.config)));
        Ok(Pool { shared })
    }

    /// Takes a connection, waiting (FIFO) up to the acquire timeout.
    ///
    /// The returned guard derefs to [`tokio_postgres::Client`]; dropping it
    /// returns the connection. The place of the call is recorded for leak
    /// reports.
    ///
    /// # Errors
    /// `Timeout { stage: Acquire }` with the pool's state and the last connect
    /// error; `Connect` at once when the server rejects the credentials or
    /// the database does not exist; `Closed` once the pool is closed, or
    /// when the caller has to wait and the tokio runtime the pool was built
    /// on has shut down (nothing could time the wait out or open a
    /// connection).
    ///
    /// # Cancel safety
    /// Dropping the future at any point loses nothing: a connection handed
    /// to it after it was dropped goes to the next waiter.
    #[track_caller]
    pub fn get(&self) -> impl Future<Output = Result<PooledConnection>> + Send + '_ {
        self.get_at(Location::caller())
    }

    /// `get()` on behalf of the caller at `location`.
    async fn get_at(&self, location: &'static Location<'static>) -> Result<PooledConnection> {
        // One clock read serves the whole fast path: the verdict on an idle
        // connection, its idle age, and the start of the hold time.
        let started = Instant::now();
        match self.take(started, started, location)? {
            Taken::Ready(conn) => Ok(self.hand_out(conn, started, started, location)),
            // Waiting and health checks live in their own (boxed) future, so
            // the future of a `get()` that finds an idle connection stays
            // small.
            slow => Box::pin(self.acquire_slow(slow, started, location)).await,
        }
    }

    /// Opt-in shared mode: a lease on a connection that other tasks use at
    /// the same time, their statements pipelined on one socket. For short
    /// autocommit statements this does more per connection than [`get`]
    /// (see `BENCHMARKS.md`), and it holds only `shared_connections` of the
    /// pool's connections however many tasks use it.
    ///
    /// Only single autocommit statements without session state belong here:
    /// no `BEGIN`/`COMMIT`, `SET`, temporary tables, `LISTEN`, advisory locks,
    /// cursors, `DISCARD`/`DEALLOCATE` (they would remove the statements the
    /// connection's other leases rely on), or prepared statements kept
    /// beyond the lease. Statements from
    /// [`SharedConnection::prepare_cached`] belong to the connection and stay
    /// cached there; use each through the lease that returned it. Use
    /// [`get`] for the rest. A connection found inside a transaction when a
    /// lease ends is taken out of service with a warning and rolled back.
    ///
    /// The lease goes to the shared connection with the fewest leases. While
    /// every one has a lease out and fewer than `shared_connections` exist,
    /// another is taken from the pool in the background; only the first
    /// caller, when there is none yet, waits for one (as `get` does).
    ///
    /// # Errors
    /// `Closed` once the pool is closed; as [`get`] (`Timeout`, `Connect`)
    /// when the first shared connection has to be taken.
    ///
    /// # Cancel safety
    /// Dropping the future at any point loses nothing.
    ///
    /// [`get`]: Self::get
    #[track_caller]
    pub fn shared(&self) -> impl Future<Output = Result<SharedConnection>> + Send + '_ {
        let location = Location::caller();
        async move {
            let shared = &self.shared;
            let config = &shared.config;
            let cap = config.shared_connections.min(config.max_size) as usize;
            let deadline = Instant::now() + config.acquire_timeout;
            loop {
                let changed = shared.lanes.changed();
                tokio::pin!(changed);
                changed.as_mut().enable();
                match shared.lanes.decide(shared, cap, Instant::now(), location) {
                    None => return Err(self.closed_error()),
                    Some(Decision::Lease(lease, grow)) => {
                        if let Some(growing) = grow {
                            // Open another lane without making this caller
                            // wait for it.
                            let pool = self.clone();
                            shared.runtime.spawn(async move {
                                match pool.get_at(location).await {
                                    Ok(conn) => {
                                        let lanes = &pool.shared.lanes;
                                        lanes.add(&pool.shared, conn.into_conn(), cap, location, false);
                                    }
                                    Err(e) => tracing::debug!(pool = %pool.shared.label, error = %e, "could not open another shared connection"),
                                }
                                drop(growing);
                            });
                        }
                        return Ok(lease);
                    }
                    Some(Decision::Grow(growing)) => {
                        let conn = self.get_at(location).await?.into_conn();
                        let lease = shared.lanes.add(shared, conn, cap, location, true);
                        drop(growing);
                        return lease.flatten().ok_or_else(|| self.closed_error());
                    }
                    Some(Decision::Wait) => {
                        if tokio::time::timeout_at(deadline.into(), changed)
                            .await
                            .is_err()
                        {
                            return Err(shared.timeout_error());
                        }
                    }
                }
            }
        }
    }

    /// Takes an idle connection, or queues the caller as a waiter (and
    /// starts the connects the pool needs). Connections found unfit on the
    /// way are closed or sent to be cleaned.
    fn take(
        &self,
        now: Instant,
        started: Instant,
        location: &'static Location<'static>,
    ) -> Result<Taken> {
        let shared = &self.shared;
        let mut discarded = Vec::new();
        let mut dirty = Vec::new();
        let mut plan = Plan::default();
        let mut start_reaper = None;
        let taken = {
            let mut st = shared.lock();
            if st.closed {
                return Err(self.closed_error());
            }
            loop {
                let Some(conn) = st.idle.pop_back() else {
                    let (tx, rx) = oneshot::channel();
                    let deadline = started + shared.config.acquire_timeout;
                    st.waiters.push_back(Waiter { tx, deadline });
                    st.waiting += 1;
                    if st.reap_at.is_none_or(|at| deadline < at) {
                        st.reaper += 1;
                        st.reap_at = Some(deadline);
                        start_reaper = Some(st.reaper);
                    }
                    plan = shared.plan(&mut st);
                    // From here on, dropping the guard settles the wait.
                    break Taken::Queued(WaitGuard {
                        rx: Some(rx),
                        shared: shared.clone(),
                    });
                };
                match shared.verdict(&conn, now) {
                    Verdict::Reuse => {
                        let idle_for = now.saturating_duration_since(conn.idle_since);
                        break if idle_for < shared.config.health_check_after {
                            Taken::Ready(conn)
                        } else {
                            Taken::Stale(conn)
                        };
                    }
                    Verdict::Close(reason) => discarded.push((conn, reason)),
                    Verdict::Clean => dirty.push(conn),
                }
            }
        };
        for (conn, reason) in discarded {
            conn.close(reason);
        }
        for conn in dirty {
            shared.runtime.spawn(clean(shared.clone(), conn, location));
        }
        if let Some(id) = start_reaper {
            let reaper = Reaper {
                pool: Arc::downgrade(shared),
                id,
                done: false,
            };
            shared.runtime.spawn(reap_waiters(reaper));
        }
        shared.execute(plan);
        Ok(taken)
    }

    /// The rest of an acquire that could not take a fresh idle connection:
    /// health-check a stale one, or wait in line until the deadline.
    async fn acquire_slow(
        &self,
        mut taken: Taken,
        started: Instant,
        location: &'static Location<'static>,
    ) -> Result<PooledConnection> {
        let shared = &self.shared;
        let deadline = started + shared.config.acquire_timeout;
        loop {
            match taken {
                Taken::Ready(conn) => {
                    return Ok(self.hand_out(conn, started, Instant::now(), location));
                }
                Taken::Stale(conn) => {
                    if let Some(conn) = self.check(conn, deadline).await {
                        return Ok(self.hand_out(conn, started, Instant::now(), location));
                    }
                }
                Taken::Queued(mut wait) => {
                    // No timer here: `reap_waiters` fails the wait at its
                    // deadline.
                    let outcome = wait.rx.as_mut().expect("set when queued").await;
                    wait.rx = None;
                    let conn = match outcome {
                        Ok(Ok(conn)) => conn,
                        Ok(Err(error)) => {
                            shared.count_timeout(&error);
                            return Err(error);
                        }
                        Err(_) => return Err(self.closed_error()),
                    };
                    shared
                        .counters
                        .acquires_waited
                        .fetch_add(1, Ordering::Relaxed);
                    return Ok(self.hand_out(conn, started, Instant::now(), location));
                }
            }
            // The stale connection failed its check: start over.
            taken = self.take(Instant::now(), started, location)?;
        }
    }

    /// Wraps a connection in its guard, recording how long the caller
    /// waited.
    fn hand_out(
        &self,
        conn: Conn,
        started: Instant,
        now: Instant,
        location: &'static Location<'static>,
    ) -> PooledConnection {
        self.shared
            .counters
            .wait
            .record(now.saturating_duration_since(started));
        PooledConnection {
            conn: Some(conn),
            pool: self.shared.clone(),
            acquired_at: now,
            location,
        }
    }

    /// Checks a connection that sat idle with one round trip; closes it if
    /// it fails.
    async fn check(&self, conn: Conn, deadline: Instant) -> Option<Conn> {
        let shared = &self.shared;
        shared
            .counters
            .health_checks
            .fetch_add(1, Ordering::Relaxed);
        let limit = shared
            .config
            .connect_timeout
            .min(deadline.saturating_duration_since(Instant::now()));
        let ok = timeout(limit, conn.raw.client.simple_query(""))
            .await
            .is_ok_and(|r| r.is_ok());
        if ok && conn.raw.tap.is_clean() {
            Some(conn)
        } else {
            conn.close(CloseReason::Broken);
            None
        }
    }

    fn closed_error(&self) -> Error {
        Error::closed(format!("pool for {} is closed", self.shared.label))
    }

    /// Waits until the warm floor is open (`min_size` connections), or fails
    /// with the first connect error seen after the call, or times out.
    ///
    /// # Errors
    /// `Connect` with the server's reason, or `Timeout { stage: Connect }`.
    pub async fn wait_ready(&self, limit: Duration) -> Result<()> {
        let shared = &self.shared;
        let since = Instant::now();
        let deadline = since + limit;
        loop {
            let notified = shared.connect_events.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = shared.lock();
                if st.closed {
                    return Err(self.closed_error());
                }
                if st.size - st.connecting >= shared.config.min_size {
                    return Ok(());
                }
                if let Some(f) = st.last_failure.as_ref().filter(|f| f.at >= since) {
                    let mut err = Error::connect(f.message.clone());
                    err.set_code(f.code.clone());
                    return Err(err);
                }
            }
            if tokio::time::timeout_at(deadline.into(), notified)
                .await
                .is_err()
            {
                return Err(Error::timeout(
                    TimeoutStage::Connect,
                    limit,
                    format!(
                        "timed out after {} warming up {} {}",
                        humantime::format_duration(limit),
                        shared.label,
                        shared.snapshot_line()
                    ),
                ));
            }
        }
    }

    /// Closes the pool: waiters fail with `Closed`, idle connections close
    /// now, connections in use close when returned, later `get()` calls
    /// fail. Idempotent.
    pub fn close(&self) {
        let (idle, drained) = {
            let mut st = self.shared.lock();
            if st.closed {
                return;
            }
            st.closed = true;
            st.fail_waiters(|| self.closed_error());
            let idle: Vec<Conn> = st.idle.drain(..).collect();
            (idle, st.size == 0)
        };
        for conn in idle {
            conn.close(CloseReason::Shutdown);
        }
        self.shared.lanes.close();
        if let Some(budget) = &self.shared.budget {
            budget.leave(self.shared.id);
        }
        if drained {
            self.shared.drained.notify_waiters();
        }
    }

    /// After [`close`](Self::close): waits until every connection is gone,
    /// or until `deadline`, when the connections still open (held by callers
    /// or being opened) are cut. Returns how many had to be cut.
    pub async fn wait_closed(&self, deadline: Instant) -> usize {
        loop {
            let notified = self.shared.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.shared.lock().size == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline.into(), notified)
                .await
                .is_err()
            {
                let st = self.shared.lock();
                for driver in st.live.values() {
                    driver.abort();
                }
                return st.size as usize;
            }
        }
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed
    }

    /// The database this pool connects to.
    pub fn target(&self) -> &Target {
        &self.shared.target
    }

    /// The pool's configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.shared.config
    }

    /// A snapshot of the pool's gauges, counters and timings.
    pub fn stats(&self) -> PoolStats {
        let shared = &self.shared;
        let (mut gauges, closed, last) = {
            let st = shared.lock();
            (
                st.gauges(),
                st.closed,
                st.last_failure.as_ref().map(|f| f.message.clone()),
            )
        };
        gauges.shared = u32::try_from(shared.lanes.count()).unwrap_or(u32::MAX);
        let bounds = self.bounds();
        PoolStats {
            url: shared.label.clone(),
            min_size: bounds.min_size,
            max_size: bounds.max_size,
            timeout: bounds.timeout,
            recycle: bounds.recycle,
            active_references: 0,
            pool_closed: closed,
            gauges,
            counters: shared.counters.snapshot(),
            timings: Timings {
                wait: shared.counters.wait.snapshot(),
                hold: shared.counters.hold.snapshot(),
                connect: shared.counters.connect.snapshot(),
            },
            last_connect_error: last,
        }
    }

    fn bounds(&self) -> Bounds {
        let c = &self.shared.config;
        Bounds {
            min_size: c.min_size,
            max_size: c.max_size,
            timeout: c.acquire_timeout.as_secs_f64(),
            recycle: c.max_lifetime.map(|d| d.as_secs_f64()),
        }
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("target", &self.shared.label)
            .field("gauges", &self.shared.lock().gauges())
            .finish()
    }
}

/// The receiving end of a wait; dropping it unserved withdraws from the
/// queue, dropping it after a connection arrived returns the connection.
struct WaitGuard {
    rx: Option<oneshot::Receiver<Result<Conn, Error>>>,
    shared: Arc<Shared>,
}

impl WaitGuard {
    /// Stops waiting. Returns what was sent before the wait closed, if
    /// anything.
    fn cancel(&mut self) -> Option<Result<Conn, Error>> {
        let mut rx = self.rx.take()?;
        rx.close();
        match rx.try_recv() {
            Ok(received) => Some(received),
            Err(_) => {
                // Never served: the sender side will not count us any more.
                let mut st = self.shared.lock();
                debug_assert!(st.waiting > 0, "waiting count out of step");
                st.waiting = st.waiting.saturating_sub(1);
                st.prune_waiters();
                None
            }
        }
    }
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        match self.cancel() {
            Some(Ok(conn)) => self
                .shared
                .hand_off(self.shared.lock(), conn, Instant::now()),
            // Timed out as the caller gave up: still a timeout.
            Some(Err(error)) => self.shared.count_timeout(&error),
            None => {}
        }
    }
}

/// A connection taken from a pool. Derefs to [`tokio_postgres::Client`];
/// dropping it returns the connection to the pool, which rolls back an open
/// transaction and never hands out a connection with a request in flight.
pub struct PooledConnection {
    conn: Option<Conn>,
    pool: Arc<Shared>,
    acquired_at: Instant,
    location: &'static Location<'static>,
}

impl PooledConnection {
    /// Where this connection was taken (`get()`'s caller).
    pub fn location(&self) -> &'static Location<'static> {
        self.location
    }

    /// How long this connection has been held.
    pub fn held_for(&self) -> Duration {
        self.acquired_at.elapsed()
    }

    /// The statement for `sql`, prepared once per connection: later calls on
    /// the same connection, by any caller, reuse it without a round trip, and
    /// the server skips parsing it (and planning, once it settles on a
    /// reusable plan: see PostgreSQL's `plan_cache_mode`). Up to
    /// `statement_cache_size` statements are kept per connection.
    ///
    /// A statement belongs to the connection that prepared it: run it on
    /// this guard only (on another connection it does not exist), and drop
    /// your copies before the guard. Run `DISCARD ALL` or `DEALLOCATE ALL`
    /// only together with
    /// [`clear_statement_cache`](Self::clear_statement_cache): they drop the
    /// statements on the server, not in the cache. The same goes for a
    /// schema change that alters a cached statement's result columns (the
    /// server then answers 0A000, "cached plan must not change result
    /// type"): clear the cache of the connection that reports it.
    ///
    /// # Errors
    /// The server's error preparing `sql` (nothing is cached then).
    pub async fn prepare_cached(&self, sql: &str) -> std::result::Result<Statement, PgError> {
        self.prepare_typed_cached(sql, &[]).await
    }

    /// [`prepare_cached`](Self::prepare_cached) with parameter types given
    /// (others inferred by the server); each list of types is its own entry.
    ///
    /// # Errors
    /// The server's error preparing `sql`.
    pub async fn prepare_typed_cached(
        &self,
        sql: &str,
        types: &[Type],
    ) -> std::result::Result<Statement, PgError> {
        let raw = &self.conn().raw;
        raw.statements
            .prepare(&raw.client, &self.pool.counters, sql, types)
            .await
    }

    /// Statements cached on this connection.
    pub fn cached_statements(&self) -> usize {
        self.conn().raw.statements.len()
    }

    /// Forgets this connection's cached statements, after `DISCARD ALL` or
    /// `DEALLOCATE ALL` removed them on the server, or after a schema change
    /// made one fail with 0A000.
    pub fn clear_statement_cache(&self) {
        self.conn().raw.statements.clear();
    }

    fn conn(&self) -> &Conn {
        self.conn.as_ref().expect("present until drop")
    }

    /// The connection, out of its guard (for shared mode, which returns it
    /// itself).
    pub(crate) fn into_conn(mut self) -> Conn {
        self.conn.take().expect("present until drop")
    }
}

impl Deref for PooledConnection {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.conn().raw.client
    }
}

impl DerefMut for PooledConnection {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.conn.as_mut().expect("present until drop").raw.client
    }
}

impl Drop for PooledConnection {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        let now = Instant::now();
        let held = now.saturating_duration_since(self.acquired_at);
        let shared = &self.pool;
        shared.counters.hold.record(held);
        if shared.config.leak_threshold.is_some_and(|t| held >= t) {
            shared
                .counters
                .leaks_reported
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                pool = %shared.label,
                held = %humantime::format_duration(held),
                taken_at = %self.location,
                "connection held longer than leak_threshold"
            );
        }
        shared.release(conn, self.location, now);
    }
}

impl fmt::Debug for PooledConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledConnection")
            .field("pool", &self.pool.label)
            .field("taken_at", &self.location)
            .field("held_for", &self.held_for())
            .finish()
    }
}
