//! The heart of a pool, in one file because its parts call each other: the
//! state shared by every handle and task ([`PoolInner`]), the capacity a
//! connection holds for its whole life ([`Slot`], [`PoolConn`]), handing a
//! connection to the oldest waiter, and the connect task (`open`) that the
//! plan asks for. Dropping a `Slot` replans, a plan starts connects, a
//! connect hands a connection off: a loop that only one file can hold
//! without a cycle of imports.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use super::credentials::Credentials;
use super::hosts::{Connected, Hosts, Walk};

mod failover;
use super::leaks::Checkouts;
use super::state::{ConnectFailure, Plan, State};
use crate::address::Target;
use crate::budget::Unit;
use crate::config::PoolConfig;
use crate::conn::{self, RawConn, StatementCache};
use crate::error::{Error, ErrorKind, TimeoutStage};
use crate::stats::{CloseReason, Counters, Gauges};

/// What every handle, guard and task of one pool shares.
pub(crate) struct PoolInner {
    /// Identifies the pool in its server budgets.
    pub(crate) id: u64,
    /// The servers of the target, each with its budget and TLS client, and
    /// which one the pool is on.
    pub(crate) hosts: Hosts,
    pub(crate) target: Target,
    pub(crate) config: PoolConfig,
    /// The warm floor in force: `config.min_size` until a resize.
    min_size: AtomicU32,
    /// The cap in force: `config.effective_max_size()` until a resize.
    max_size: AtomicU32,
    /// What new connections authenticate with (shared with the read side).
    pub(crate) credentials: Arc<Credentials>,
    /// Bumped by `drain`: a connection of an older generation is replaced.
    pub(crate) generation: AtomicU64,
    state: Mutex<State<Conn>>,
    pub(crate) counters: Counters,
    /// Notified when a connect attempt ends (warm-up waits on it).
    pub(crate) connect_events: Notify,
    /// Notified when the last connection of a closed pool is gone.
    pub(crate) drained: Notify,
    pub(crate) runtime: tokio::runtime::Handle,
    /// Set when the runtime above shut down (see [`watch_runtime`]): the
    /// pool's tasks and connections went with it.
    runtime_gone: Arc<RuntimeGone>,
    /// Dropped with the pool, which ends the runtime watch.
    _watch: oneshot::Sender<()>,
    /// Masked URL, for messages.
    pub(crate) label: String,
    /// Connections held now, when `leak_threshold` is set.
    pub(crate) checkouts: Checkouts,
    /// Behind `pooler = transaction`: the parameter types learnt per SQL
    /// text, shared by the pool's connections.
    pub(crate) shapes: StatementCache,
    /// Kinds of session state already warned about behind a transaction
    /// pooler (bits of `Effects`): one warning per kind per pool.
    pub(crate) warned_session_state: AtomicU8,
    /// A check of the standbys' replication lag runs (`max_replication_lag`).
    pub(crate) lag_check: AtomicBool,
    /// The host whose budget reserves the warm floor, when the pool is on
    /// one host at a time; `usize::MAX`: every host's.
    floor_host: std::sync::atomic::AtomicUsize,
    /// Held while the floor moves or changes (`follow_floor`, `set_floor`).
    floor_lock: Mutex<()>,
    /// The floor could not follow the pool once: warned.
    floor_warned: AtomicBool,
}

/// One unit of the pool's capacity, held by a connection (or a connect in
/// progress) for its whole life. Dropping it gives the unit back and
/// replans (refill the floor, serve waiters).
pub(crate) struct Slot {
    pool: Weak<PoolInner>,
    id: u64,
    connecting: bool,
    reason: Option<CloseReason>,
    /// The host of the connection, once open (counted there).
    host: Option<usize>,
}

/// A pooled connection, boxed: it moves between the idle queue, waiters and
/// guards, and a pointer moves cheaper than the whole.
pub(crate) type Conn = Box<PoolConn>;

/// A pooled connection with its bookkeeping.
pub(crate) struct PoolConn {
    pub(crate) raw: RawConn,
    /// When this connection is to be retired (lifetime minus jitter).
    expires: Option<Instant>,
    pub(crate) idle_since: Instant,
    /// The pool's generation when it was opened (see `drain`).
    pub(crate) generation: u64,
    /// The host it is on, and that host's generation when it was opened
    /// (see `Hosts::retire`).
    pub(crate) host: usize,
    pub(crate) host_generation: u64,
    slot: Slot,
    /// The server-budget unit, given back after the slot.
    unit: Option<Unit>,
}

impl PoolConn {
    /// Closes the connection, counting it under `reason`.
    pub(crate) fn close(mut self: Box<Self>, reason: CloseReason) {
        self.slot.reason = Some(reason);
        drop(self);
    }

    pub(crate) fn is_expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|t| now >= t)
    }

    /// Whether its server budget holds more than this replica's share
    /// (`replicas: auto` after another replica joined): it should close
    /// rather than go back to the pool, above the floor (`Some(false)`) or
    /// whatever the floor (`Some(true)`: the replica lost its coordinator).
    pub(crate) fn over_budget(&self) -> Option<bool> {
        self.unit.as_ref().and_then(Unit::over)
    }

    /// Names the connection in its pool.
    pub(crate) fn id(&self) -> u64 {
        self.slot.id
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        if let Some(reason) = self.reason {
            pool.counters.closed(reason);
        }
        if let Some(host) = self.host {
            pool.hosts.count(host, false);
        }
        let (plan, drained) = {
            let mut st = pool.lock();
            st.size -= 1;
            st.live.remove(&self.id);
            // A connect that never finished does not replan here: its task
            // replans after a failure, and a task dropped by a runtime that is
            // shutting down must not spawn another one (which would be dropped
            // at once, and so on).
            let plan = if self.connecting {
                st.connect_done(self.id);
                Plan::default()
            } else {
                pool.plan(&mut st)
            };
            (plan, st.closed && st.size == 0)
        };
        pool.execute(plan);
        if drained {
            pool.drained.notify_waiters();
        }
    }
}

impl PoolInner {
    /// The state of a new pool; nothing is opened until the first plan.
    pub(crate) fn new(
        id: u64,
        target: Target,
        config: PoolConfig,
        hosts: Hosts,
        runtime: tokio::runtime::Handle,
        credentials: Option<Arc<Credentials>>,
    ) -> PoolInner {
        let runtime_gone = Arc::new(RuntimeGone::default());
        let (watch, ended) = oneshot::channel();
        runtime.spawn(watch_runtime(
            RuntimeWatch {
                gone: runtime_gone.clone(),
                done: false,
            },
            ended,
        ));
        let config_cache_size = config.statement_cache_size;
        let one_at_a_time = hosts.one_at_a_time();
        PoolInner {
            runtime_gone,
            _watch: watch,
            id,
            hosts,
            credentials: credentials
                .unwrap_or_else(|| Arc::new(Credentials::new(&target, &config))),
            generation: AtomicU64::new(0),
            label: target.to_string(),
            target,
            min_size: AtomicU32::new(config.min_size),
            max_size: AtomicU32::new(config.effective_max_size()),
            config,
            state: Mutex::new(State::new()),
            counters: Counters::new(),
            connect_events: Notify::new(),
            drained: Notify::new(),
            runtime,
            checkouts: Checkouts::default(),
            shapes: StatementCache::new(config_cache_size),
            warned_session_state: AtomicU8::new(0),
            lag_check: AtomicBool::new(false),
            floor_host: std::sync::atomic::AtomicUsize::new(if one_at_a_time {
                0
            } else {
                usize::MAX
            }),
            floor_lock: Mutex::new(()),
            floor_warned: AtomicBool::new(false),
        }
    }

    /// Opens one session as the pool's connections are opened: a unit of
    /// the host's server budget, the credentials in force, the first host
    /// that matches `target_session_attrs` (each within `connect_timeout`),
    /// TLS and socket options, then the session's set-up (settings behind a
    /// session pooler, the `after_connect` hook). `unit_wait` bounds the
    /// wait for a budget unit; `on_started` is called when the first
    /// attempt starts talking to a server; `preferred_only` looks only for
    /// a host the attributes prefer, other than the current one (a
    /// `prefer-standby` pool on a primary looking for a standby).
    /// `Ok(None)`: `still_needed` turned false while it waited for a unit.
    pub(crate) async fn connect_session(
        self: &Arc<Self>,
        statement_cache_size: usize,
        notifications: Option<&conn::Notifications>,
        unit_wait: Option<Duration>,
        still_needed: &(dyn Fn() -> bool + Send + Sync),
        on_started: &(dyn Fn() + Send + Sync),
        preferred_only: bool,
    ) -> Result<Option<Connected>, Error> {
        let on_unreachable = |host: usize, generation: u64, why: &str| {
            self.retire_host(host, generation, &format!("it cannot be reached: {why}"));
        };
        let connected = self
            .hosts
            .walk(&Walk {
                pool_id: self.id,
                label: &self.label,
                config: &self.config,
                credentials: &self.credentials,
                counters: &self.counters,
                cache_size: statement_cache_size,
                notifications,
                unit_wait,
                still_needed,
                on_started,
                on_unreachable: &on_unreachable,
                preferred_only,
            })
            .await?;
        if let Some(connected) = &connected {
            self.moved(connected, preferred_only);
        }
        Ok(connected)
    }

    /// Cancels what runs on `conn`, on the server it is on.
    pub(crate) fn cancel_token(&self, conn: &PoolConn) -> conn::CancelToken {
        let host = self.hosts.entry(conn.host);
        conn::CancelToken::new(&conn.raw, &host.target, &host.tls)
    }

    /// The server budgets of the pool's hosts (those that have one).
    pub(crate) fn budgets(&self) -> impl Iterator<Item = &Arc<crate::budget::ServerBudget>> {
        self.hosts
            .entries()
            .iter()
            .filter_map(|h| h.budget.as_ref())
    }

    /// The warm floor in force.
    pub(crate) fn min_size(&self) -> u32 {
        self.min_size.load(Ordering::Relaxed)
    }

    /// The cap in force.
    pub(crate) fn max_size(&self) -> u32 {
        self.max_size.load(Ordering::Relaxed)
    }

    /// Sets the floor and the cap in force (checked by the caller).
    pub(crate) fn set_sizes(&self, min_size: u32, max_size: u32) {
        self.min_size.store(min_size, Ordering::Relaxed);
        self.max_size.store(max_size, Ordering::Relaxed);
    }

    /// Whether callers wait in `get()` now.
    pub(crate) fn has_waiters(&self) -> bool {
        self.lock().waiting > 0
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State<Conn>> {
        // The state is consistent between statements; a panic elsewhere
        // while holding the lock cannot leave it half-updated.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn plan(&self, st: &mut State<Conn>) -> Plan {
        st.plan(self.min_size(), self.max_size(), Instant::now())
    }

    /// Plans under the lock and starts what the plan asks for.
    pub(crate) fn replan(self: &Arc<Self>) {
        let plan = self.plan(&mut self.lock());
        self.execute(plan);
    }

    /// Starts what a plan asks for: connect tasks, and a replan when the
    /// reconnect backoff ends. Called without the lock.
    pub(crate) fn execute(self: &Arc<Self>, plan: Plan) {
        for id in plan.first_id..plan.first_id + u64::from(plan.connects) {
            let slot = Slot {
                pool: Arc::downgrade(self),
                id,
                connecting: true,
                reason: None,
                host: None,
            };
            self.runtime.spawn(open(self.clone(), slot));
        }
        if let Some(at) = plan.retry_at {
            let weak = Arc::downgrade(self);
            self.runtime.spawn(async move {
                tokio::time::sleep_until(at.into()).await;
                if let Some(pool) = weak.upgrade() {
                    let plan = {
                        let mut st = pool.lock();
                        st.retry_due(at);
                        pool.plan(&mut st)
                    };
                    pool.execute(plan);
                }
            });
        }
    }

    /// Gives a clean connection to the oldest live waiter, or puts it idle
    /// (idle since `now`).
    pub(crate) fn hand_off(
        &self,
        mut st: MutexGuard<'_, State<Conn>>,
        mut conn: Conn,
        now: Instant,
    ) {
        if st.closed {
            drop(st);
            conn.close(CloseReason::Shutdown);
            return;
        }
        if st.size - st.connecting() > self.max_size() {
            // Resized below what is open: this one goes, not to a waiter.
            drop(st);
            conn.close(CloseReason::Resized);
            return;
        }
        if conn
            .over_budget()
            .is_some_and(|force| force || st.size - st.connecting() > self.min_size())
        {
            // Another replica's share: this one goes, not to a waiter.
            drop(st);
            conn.close(CloseReason::Reclaimed);
            return;
        }
        if conn.generation != self.generation.load(Ordering::SeqCst) {
            // Opened or taken before a `drain`: replaced, never handed on.
            drop(st);
            conn.close(CloseReason::Drained);
            return;
        }
        if self.hosts.is_retired(conn.host, conn.host_generation) {
            // Its host was left while it was opened or held.
            drop(st);
            conn.close(CloseReason::Failover);
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

    /// The pool's gauges now.
    pub(crate) fn gauges(&self) -> Gauges {
        self.lock().gauges()
    }

    /// The gauges as error messages show them.
    pub(crate) fn snapshot_line(&self) -> String {
        let g = self.gauges();
        format!(
            "(size={}, idle={}, in_use={}, waiting={}, connecting={}, max_size={})",
            g.size,
            g.idle,
            g.in_use,
            g.waiting,
            g.connecting,
            self.max_size()
        )
    }

    /// The message of the last connect attempt, if it failed.
    pub(crate) fn last_failure_text(&self) -> Option<String> {
        self.lock().last_failure.as_ref().map(|f| f.message.clone())
    }

    /// The error of an acquire that ran out of time after waiting `after`,
    /// with the pool's snapshot, its budget and the last connect error.
    pub(crate) fn timeout_error(&self, after: Duration) -> Error {
        let mut message = format!(
            "timed out after {} waiting for a connection to {} {}",
            humantime::format_duration(after),
            self.label,
            self.snapshot_line()
        );
        for budget in self.budgets() {
            message.push_str("; ");
            message.push_str(&budget.summary());
        }
        if let Some(last) = self.last_failure_text() {
            message.push_str("; last connect error: ");
            message.push_str(&last);
        }
        Error::timeout(TimeoutStage::Acquire, after, message)
    }

    /// Counts an acquire timeout, if `error` is one (each caller counts its
    /// own, see `reap_waiters`).
    pub(crate) fn count_timeout(&self, error: &Error) {
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

    /// The error of a caller turned away because `max` callers wait
    /// already; counted.
    pub(crate) fn overloaded_error(&self, max: u32) -> Error {
        self.counters
            .acquires_rejected
            .fetch_add(1, Ordering::Relaxed);
        Error::overloaded(format!(
            "no connection to {} free and {max} callers waiting already (max_waiting = {max}) {}",
            self.label,
            self.snapshot_line()
        ))
    }

    pub(crate) fn closed_error(&self) -> Error {
        Error::closed(format!("pool for {} is closed", self.label))
    }

    /// Cuts every connection still open: their driver tasks are aborted.
    /// Returns how many there were.
    pub(crate) fn cut_all(&self) -> usize {
        let st = self.lock();
        for driver in st.live.values() {
            driver.abort();
        }
        st.size as usize
    }
}

impl PoolInner {
    /// Whether the tokio runtime the pool was built on has shut down.
    pub(crate) fn is_runtime_gone(&self) -> bool {
        self.runtime_gone.flag.load(Ordering::Relaxed)
    }

    /// Calls `hook` when the pool's runtime shuts down (once; the fleet
    /// makes its threads look again).
    pub(crate) fn on_runtime_gone(&self, hook: impl Fn() + Send + Sync + 'static) {
        let _ = self.runtime_gone.hook.set(Box::new(hook));
    }
}

/// That the pool's runtime shut down, and who to tell.
#[derive(Default)]
struct RuntimeGone {
    flag: AtomicBool,
    hook: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

/// Marks the pool's runtime gone when it drops this watch unfinished.
struct RuntimeWatch {
    gone: Arc<RuntimeGone>,
    done: bool,
}

impl Drop for RuntimeWatch {
    fn drop(&mut self) {
        if !self.done {
            self.gone.flag.store(true, Ordering::SeqCst);
            if let Some(hook) = self.gone.hook.get() {
                hook();
            }
        }
    }
}

/// The runtime watch: a task that waits for the pool to be dropped. If the
/// runtime shuts down first, it drops the task unfinished and the watch
/// marks the pool: its background tasks and connection drivers are gone,
/// and a fleet replaces it on the next lookup.
async fn watch_runtime(mut watch: RuntimeWatch, ended: oneshot::Receiver<()>) {
    let _ = ended.await;
    watch.done = true;
}

/// The connect task: opens one connection (a unit of the server budget of
/// its host, the first host that matches, each within `connect_timeout`),
/// and hands it to the oldest waiter (or puts it idle). On failure it
/// records the error, starts the backoff, fails the waiters at once if
/// waiting will not help, and replans.
async fn open(pool: Arc<PoolInner>, mut slot: Slot) {
    let still_needed = || {
        let st = pool.lock();
        // This connect counts in `size`: it is needed while callers wait,
        // or while it is part of the floor.
        !st.closed && (st.waiting > 0 || st.size <= pool.min_size())
    };
    let started = std::sync::OnceLock::new();
    let on_started = || {
        let now = Instant::now();
        let _ = started.set(now);
        pool.lock().connect_started(slot.id, now);
    };
    let generation = pool.generation.load(Ordering::SeqCst);
    let result = pool
        .connect_session(
            pool.config.statement_cache_size,
            None,
            None,
            &still_needed,
            &on_started,
            false,
        )
        .await;
    let started = started.get().copied().unwrap_or_else(Instant::now);
    match result {
        Ok(Some(connected)) => {
            let Connected {
                raw,
                unit,
                host,
                generation: host_generation,
                ..
            } = connected;
            pool.counters
                .connections_created
                .fetch_add(1, Ordering::Relaxed);
            pool.counters.connect.record(started.elapsed());
            let expires = pool.config.max_lifetime.map(|lifetime| {
                // Up to 10% off, so connections opened together do not
                // expire together.
                raw.created + lifetime.mul_f64(1.0 - fastrand::f64() * 0.1)
            });
            let now = Instant::now();
            pool.hosts.count(host, true);
            slot.host = Some(host);
            let mut st = pool.lock();
            st.connect_done(slot.id);
            slot.connecting = false;
            st.connect_succeeded();
            st.estimates.record_connect(started.elapsed());
            st.live.insert(slot.id, raw.driver.clone());
            let conn = Box::new(PoolConn {
                raw,
                expires,
                idle_since: now,
                generation,
                host,
                host_generation,
                slot,
                unit,
            });
            pool.hand_off(st, conn, now);
            pool.connect_events.notify_waiters();
            // After a failure only one probe was opened: now that the
            // server answers, the rest of what is needed.
            pool.replan();
        }
        Ok(None) => {
            // Not needed any more; a caller that queued meanwhile may have
            // counted on it.
            drop(slot);
            pool.replan();
        }
        Err(err) => {
            connect_failed(&pool, &err);
            drop(slot);
            // Retry after the backoff if callers or the floor still need it.
            pool.replan();
        }
    }
}

/// Records a failed connect: counters, the budget's view of a refusal, the
/// backoff, and the waiters failed at once when waiting will not help.
fn connect_failed(pool: &PoolInner, err: &Error) {
    pool.counters.connect_errors.fetch_add(1, Ordering::Relaxed);
    let message = err.to_string();
    let code = err.code().map(str::to_owned);
    let permanent = err.is_permanent();
    tracing::warn!(pool = %pool.label, error = %message, "connect failed");
    {
        let mut st = pool.lock();
        st.connect_failed(ConnectFailure {
            message,
            code,
            at: Instant::now(),
        });
        if permanent {
            // Waiting will not cure bad credentials or a missing database:
            // fail the callers now.
            st.fail_waiters(|| err.duplicate());
        }
    }
    pool.connect_events.notify_waiters();
}
