//! The pool: a bounded set of tokio-postgres connections to one database,
//! handed out FIFO-fairly, kept healthy in the background, and never handed
//! out dirty.
//!
//! This file is the [`Pool`] API. Behind it:
//!
//! * `state.rs` — the state behind the pool's mutex and the decisions taken
//!   under it (`plan`, backoff, waiters), pure and tested without a server;
//! * `hosts.rs` — the servers of the target: the walk that opens a
//!   connection on the first host matching `target_session_attrs`, and
//!   what a failover needs (the current host, retired hosts);
//! * `inner.rs` — [`PoolInner`](inner::PoolInner), what every handle and task
//!   shares; the RAII capacity a connection holds (`Slot`); the hand-off to
//!   the oldest waiter; the connect task `open`;
//! * `acquire.rs` — `get`: the fast path, health checks, waiting;
//! * `release.rs` — a returned connection's verdict and the clean task;
//! * `guard.rs` — [`PooledConnection`];
//! * `reaper.rs`, `maintain.rs` — the background tasks that fail waiters at
//!   their deadline and keep idle connections healthy.
//!
//! Connections are opened by background tasks, never by the caller of
//! `get()`: a caller that gives up (timeout, dropped future) does not abort a
//! connect half-way, and the connection goes to the next caller in line.

mod acquire;
mod budgeted;
mod credentials;
mod estimate;
mod guard;
pub(crate) mod hosts;
pub(crate) mod inner;
mod leaks;
pub(crate) mod maintain;
pub(crate) mod query;
mod reaper;
mod release;
pub(crate) mod session;
mod state;
mod transaction;

use std::fmt;
use std::future::Future;
use std::panic::Location;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

pub use self::guard::PooledConnection;
use self::hosts::Hosts;
use self::inner::PoolInner;
pub use self::transaction::Transaction;
use crate::address::{SessionAttrs, Target};
use crate::budget::ServerBudget;
use crate::config::{PoolConfig, ReadFallback};
use crate::error::{Error, Result, TimeoutStage};
use crate::listener::Listener;
use crate::shared::{self, Lanes, SharedConnection};
use crate::stats::{HostStats, PoolStats, Timings};

/// A pool of connections to one database.
///
/// Cheap to clone (two `Arc`s). Most code gets pools from a
/// [`Fleet`](crate::Fleet), which keeps one per database; a `Pool` can also be
/// built directly with [`Pool::new`].
#[derive(Clone)]
pub struct Pool {
    pub(crate) inner: Arc<PoolInner>,
    /// Shared mode's connections ([`Pool::shared`]).
    lanes: Arc<Lanes>,
    /// The statement methods' connections ([`Pool::query`] and the rest).
    pub(crate) statement_lanes: Arc<Lanes>,
    /// The read side of a multi-host target ([`Pool::reads`]), made on
    /// first use.
    reads: Arc<Mutex<Option<Pool>>>,
}

impl Pool {
    /// Creates a pool and starts opening its warm floor (`min_size`
    /// connections) in the background. Returns at once.
    ///
    /// # Errors
    /// A `Config` error if the configuration is invalid or if called outside
    /// a tokio runtime.
    pub fn new(target: Target, config: PoolConfig) -> Result<Pool> {
        Pool::build(target, config, Vec::new())
    }

    /// A pool whose connections to each host take a unit of that server's
    /// budget (`budgets` in the order of the target's hosts).
    pub(crate) fn build(
        target: Target,
        config: PoolConfig,
        budgets: Vec<Option<Arc<ServerBudget>>>,
    ) -> Result<Pool> {
        Pool::build_side(target, config, budgets, None)
    }

    /// [`build`](Self::build), for the read side of `parent` when given:
    /// new connections go to the host with the fewest of its connections,
    /// and it authenticates as its parent does (`set_password`, a
    /// provider).
    fn build_side(
        target: Target,
        config: PoolConfig,
        budgets: Vec<Option<Arc<ServerBudget>>>,
        parent: Option<&PoolInner>,
    ) -> Result<Pool> {
        static NEXT_POOL_ID: AtomicU64 = AtomicU64::new(0);
        config.validate()?;
        if config.pooler.is_some() && target.options().is_some() {
            return Err(Error::config(format!(
                "invalid configuration: options in the URL of {target} with pooler = {}: \
                 poolers refuse start-up options; use server_settings (applied with SET behind \
                 a session pooler) or set them on the role",
                config.pooler
            )));
        }
        // A read side lives on its pool's runtime, wherever it is made.
        let runtime = match parent {
            Some(parent) => parent.runtime.clone(),
            None => tokio::runtime::Handle::try_current().map_err(|_| {
                Error::config(
                    "pgfleet pools must be created inside a tokio runtime (no runtime is running)",
                )
            })?,
        };
        let hosts = Hosts::new(&target, budgets, parent.is_some())?;
        let id = NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed);
        let lanes = Arc::new(Lanes::new(&config, shared::Use::Leases));
        let statement_lanes = Arc::new(Lanes::new(&config, shared::Use::Statements));
        let credentials = parent.map(|p| p.credentials.clone());
        let inner = Arc::new(PoolInner::new(
            id,
            target,
            config,
            hosts,
            runtime,
            credentials,
        ));
        let member: Arc<dyn crate::budget::Reclaim> = inner.clone();
        let floor_hosts = inner.floor_hosts();
        let mut joined: Vec<&Arc<ServerBudget>> = Vec::new();
        for (host, entry) in inner.hosts.entries().iter().enumerate() {
            let Some(budget) = &entry.budget else {
                continue;
            };
            // The warm floor is reserved where the pool's connections can
            // be: on the host it is on (the first, until it moves), or on
            // every host when it spreads over them.
            let floor = if floor_hosts.contains(&host) {
                inner.config.min_size
            } else {
                0
            };
            let join = budget.join(
                inner.id,
                Arc::downgrade(&member),
                inner.label.clone(),
                floor,
                inner.config.pooler,
            );
            if let Err(e) = join {
                for earlier in joined {
                    earlier.leave(inner.id);
                }
                return Err(e);
            }
            joined.push(budget);
            if !inner.config.pooler.is_some() {
                budget.offer_connector(inner.id, budgeted::coordinator_connector(&inner, host));
            }
        }
        inner.replan();
        maintain::start(&inner);
        Ok(Pool {
            inner,
            lanes,
            statement_lanes,
            reads: Arc::default(),
        })
    }

    /// The read side of the pool: for a target with several hosts (and
    /// `target_session_attrs` other than `standby`, `read-only` or
    /// `prefer-standby`), a pool of its own on the same hosts and server
    /// budgets whose connections go to standbys: `prefer-standby` (or
    /// `standby` with `read_fallback = error`), no warm floor, the same
    /// `max_size`, and each new connection to the standby with the fewest
    /// of its connections. Made on first use and closed with this pool.
    /// For any other target, this pool itself.
    ///
    /// # Errors
    /// `Closed` once the pool is closed; `Config` as [`Pool::new`].
    pub fn reads(&self) -> Result<Pool> {
        let target = &self.inner.target;
        let own = matches!(
            target.target_session_attrs(),
            SessionAttrs::Standby | SessionAttrs::ReadOnly | SessionAttrs::PreferStandby
        );
        if target.endpoints().len() < 2 || own {
            return Ok(self.clone());
        }
        // Under the read side's lock, which `close` takes after marking the
        // pool closed: a read side made here is one `close` will see.
        let mut reads = self.reads.lock().unwrap_or_else(PoisonError::into_inner);
        if self.inner.lock().closed {
            return Err(self.inner.closed_error());
        }
        if let Some(pool) = reads.as_ref() {
            return Ok(pool.clone());
        }
        let attrs = match self.inner.config.read_fallback {
            ReadFallback::Primary => SessionAttrs::PreferStandby,
            ReadFallback::Error => SessionAttrs::Standby,
        };
        let config = PoolConfig {
            min_size: 0,
            max_size: Some(self.inner.max_size()),
            ..self.inner.config.clone()
        };
        let budgets = self
            .inner
            .hosts
            .entries()
            .iter()
            .map(|h| h.budget.clone())
            .collect();
        let pool = Pool::build_side(
            target.clone().with_target_session_attrs(attrs),
            config,
            budgets,
            Some(&self.inner),
        )?;
        *reads = Some(pool.clone());
        Ok(pool)
    }

    /// The read side, if it was made.
    pub(crate) fn read_side(&self) -> Option<Pool> {
        self.reads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A connection for reads: from [`reads`](Self::reads), so on a
    /// standby of a multi-host target (the primary when none accepts,
    /// unless `read_fallback = error`), else as [`get`](Self::get). Waits
    /// as `get` does.
    ///
    /// # Errors
    /// As [`get`](Self::get).
    #[track_caller]
    pub fn get_read(&self) -> impl Future<Output = Result<PooledConnection>> + Send + '_ {
        let location = Location::caller();
        async move {
            let reads = self.reads()?;
            reads.inner.get(location).await
        }
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
        self.inner.get(Location::caller())
    }

    /// [`get`](Self::get), waiting at most `limit` instead of the pool's
    /// `acquire_timeout` (at most 7 days): for a caller with a deadline of
    /// its own. The timeout error, counted in `acquires_timed_out`, names
    /// `limit`.
    ///
    /// # Errors
    /// As [`get`](Self::get).
    ///
    /// # Cancel safety
    /// As [`get`](Self::get).
    #[track_caller]
    pub fn get_timeout(
        &self,
        limit: Duration,
    ) -> impl Future<Output = Result<PooledConnection>> + Send + '_ {
        self.inner.get_within(limit, Location::caller())
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
    /// another is taken from the pool in the background; only the callers
    /// that come before the first one is in wait for it (as `get` does).
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
        shared::lease(&self.inner, &self.lanes, Location::caller())
    }

    /// A [`Listener`] for `LISTEN`/`NOTIFY` on this pool's database: a
    /// connection of its own (outside `max_size`, inside the server
    /// budget) that reconnects after a server restart, listens to its
    /// channels again and reports the gap.
    ///
    /// # Errors
    /// `Unsupported` behind `pooler = transaction` (LISTEN needs a
    /// session); the connect errors of [`get`](Self::get) otherwise.
    pub async fn listener(&self) -> Result<Listener> {
        Listener::open(self.inner.clone()).await
    }

    /// Changes the warm floor and the cap while the pool runs. Growing
    /// opens connections for the new floor and the callers waiting;
    /// shrinking closes idle connections above the new cap at the next
    /// maintenance tick and, one by one, connections in use as they come
    /// back, never one in use. `stats()` shows the sizes in force;
    /// `config()` keeps the configuration the pool was made with.
    ///
    /// # Errors
    /// `Config` for `max_size` outside 1..=10000, `min_size` above it, or
    /// floors that would exceed the server budget; nothing changes then.
    pub fn resize(&self, min_size: u32, max_size: u32) -> Result<()> {
        let inner = &self.inner;
        let sized = PoolConfig {
            min_size,
            max_size: Some(max_size),
            ..PoolConfig::default()
        };
        sized.validate()?;
        inner.set_floor(min_size, max_size)?;
        tracing::info!(pool = %inner.label, min_size, max_size, "pool resized");
        inner.replan();
        if let Some(reads) = self.read_side() {
            // The read side keeps no floor, so this cannot fail there; the
            // same cap.
            reads.inner.set_sizes(0, max_size);
            reads.inner.replan();
        }
        Ok(())
    }

    /// New connections authenticate with `password` (`None`: none) from now
    /// on; connections already open keep their sessions (see
    /// [`drain`](Self::drain)). For a rotated password.
    pub fn set_password(&self, password: Option<&str>) {
        let inner = &self.inner;
        inner
            .credentials
            .set_password(&inner.target, &inner.config, password);
    }

    /// New connections take their password from `provider`, called once
    /// for each (within `connect_timeout`): for short-lived tokens such as
    /// cloud IAM authentication. It wins over the target's password and
    /// [`set_password`](Self::set_password). An error from it fails that
    /// connect (`Connect`, with the provider's message) and the pool backs
    /// off as for any connect error.
    pub fn set_password_provider<F, Fut>(&self, provider: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<String, Box<dyn std::error::Error + Send + Sync>>>
            + Send
            + 'static,
    {
        self.inner
            .credentials
            .set_provider(Some(Arc::new(move || Box::pin(provider()))));
    }

    /// Replaces every connection: idle ones now (the floor reopens with the
    /// current credentials), connections in use when they come back
    /// (`connections_closed_drained`), shared mode's as their replacements
    /// come in. For new credentials, or a server
    /// setting that only new sessions see.
    pub fn drain(&self) {
        let inner = &self.inner;
        inner.generation.fetch_add(1, Ordering::SeqCst);
        let idle: Vec<_> = inner.lock().idle.drain(..).collect();
        for conn in idle {
            conn.close(crate::stats::CloseReason::Drained);
        }
        inner.replan();
        if let Some(reads) = self.read_side() {
            reads.drain();
        }
    }

    /// Waits until the warm floor is open (`min_size` connections), or fails
    /// with the first connect error seen after the call, or times out.
    /// `Duration::MAX` waits without a time limit.
    ///
    /// # Errors
    /// `Connect` with the server's reason, `Timeout { stage: Connect }`, or
    /// `Closed` if the pool is closed.
    pub async fn wait_ready(&self, limit: Duration) -> Result<()> {
        let inner = &self.inner;
        let since = Instant::now();
        let deadline = since.checked_add(limit);
        loop {
            let notified = inner.connect_events.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = inner.lock();
                if st.closed {
                    return Err(inner.closed_error());
                }
                if st.size - st.connecting() >= inner.min_size() {
                    return Ok(());
                }
                if let Some(f) = st.last_failure.as_ref().filter(|f| f.at >= since) {
                    let mut err = Error::connect(f.message.clone());
                    err.set_code(f.code.clone());
                    return Err(err);
                }
            }
            if !until(notified, deadline).await {
                return Err(Error::timeout(
                    TimeoutStage::Connect,
                    limit,
                    format!(
                        "timed out after {} warming up {} {}",
                        humantime::format_duration(limit),
                        inner.label,
                        inner.snapshot_line()
                    ),
                ));
            }
        }
    }

    /// Closes the pool: waiters fail with `Closed`, idle connections close
    /// now, connections in use close when returned, later `get()` calls
    /// fail. Idempotent.
    pub fn close(&self) {
        let inner = &self.inner;
        let (idle, drained) = {
            let mut st = inner.lock();
            if st.closed {
                return;
            }
            st.closed = true;
            st.fail_waiters(|| inner.closed_error());
            let idle: Vec<_> = st.idle.drain(..).collect();
            (idle, st.size == 0)
        };
        for conn in idle {
            conn.close(crate::stats::CloseReason::Shutdown);
        }
        self.lanes.close();
        self.statement_lanes.close();
        if let Some(reads) = self.read_side() {
            reads.close();
        }
        for budget in inner.budgets() {
            budget.leave(inner.id);
        }
        if drained {
            inner.drained.notify_waiters();
        }
        // A warm-up in progress (`wait_ready`, `Fleet::warmup`) fails with
        // `Closed` now, not when its connects time out.
        inner.connect_events.notify_waiters();
    }

    /// After [`close`](Self::close): waits until every connection is gone,
    /// or until `deadline`, when the connections still open (held by callers
    /// or being opened) are cut. Returns how many had to be cut.
    pub async fn wait_closed(&self, deadline: Instant) -> usize {
        self.wait_closed_until(Some(deadline)).await
    }

    /// [`wait_closed`](Self::wait_closed); `None` waits without a deadline.
    pub(crate) async fn wait_closed_until(&self, deadline: Option<Instant>) -> usize {
        let reads = match self.read_side() {
            Some(reads) => Box::pin(reads.wait_closed_until(deadline)).await,
            None => 0,
        };
        loop {
            let notified = self.inner.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.inner.lock().size == 0 {
                return reads;
            }
            if !until(notified, deadline).await {
                return reads + self.inner.cut_all();
            }
        }
    }

    /// Whether the tokio runtime this pool was built on (and its background
    /// tasks and connections ran on) has shut down.
    pub(crate) fn is_runtime_gone(&self) -> bool {
        self.inner.is_runtime_gone()
    }

    /// Calls `hook` when this pool's runtime shuts down.
    pub(crate) fn on_runtime_gone(&self, hook: impl Fn() + Send + Sync + 'static) {
        self.inner.on_runtime_gone(hook);
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.lock().closed
    }

    /// The database this pool connects to.
    pub fn target(&self) -> &Target {
        &self.inner.target
    }

    /// The pool's configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.inner.config
    }

    /// A snapshot of the pool's gauges, counters and timings.
    /// `active_references` is 0 here: a fleet's
    /// [`PoolHandle::stats`](crate::PoolHandle::stats) fills it in.
    pub fn stats(&self) -> PoolStats {
        let inner = &self.inner;
        let (mut gauges, closed, last) = {
            let st = inner.lock();
            (
                st.gauges(),
                st.closed,
                st.last_failure.as_ref().map(|f| f.message.clone()),
            )
        };
        gauges.shared = u32::try_from(self.lanes.count()).unwrap_or(u32::MAX);
        gauges.lanes = u32::try_from(self.statement_lanes.count()).unwrap_or(u32::MAX);
        let config = &inner.config;
        PoolStats {
            url: inner.label.clone(),
            min_size: inner.min_size(),
            max_size: inner.max_size(),
            timeout_s: config.acquire_timeout.as_secs_f64(),
            recycle_s: config.max_lifetime.map(|d| d.as_secs_f64()),
            active_references: 0,
            pool_closed: closed,
            gauges,
            counters: inner.counters.snapshot(),
            timings: Timings {
                wait: inner.counters.wait.snapshot(),
                hold: inner.counters.hold.snapshot(),
                connect: inner.counters.connect.snapshot(),
            },
            last_connect_error: last,
            host: inner
                .hosts
                .current()
                .map(|h| inner.hosts.entry(h).server.clone()),
            hosts: (0..inner.hosts.entries().len())
                .map(|h| HostStats {
                    server: inner.hosts.entry(h).server.clone(),
                    connections: inner.hosts.open_on(h),
                })
                .collect(),
        }
    }

    /// Names the pool in its process (never reused).
    #[cfg(test)]
    pub(crate) fn id(&self) -> u64 {
        self.inner.id
    }
}

/// Waits for `event`, until `deadline` if there is one; `false` if the
/// deadline came first.
async fn until(event: impl Future, deadline: Option<Instant>) -> bool {
    match deadline {
        None => {
            event.await;
            true
        }
        Some(deadline) => tokio::time::timeout_at(deadline.into(), event)
            .await
            .is_ok(),
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("target", &self.inner.label)
            .field("gauges", &self.inner.gauges())
            .finish()
    }
}
