//! One shared, bounded, observable PostgreSQL pool per database for the whole
//! process, on [`tokio_postgres`].
//!
//! A service that gives every store, user or memory layer its own pool ends
//! with `FATAL: sorry, too many clients already`. pgfleet keeps **one pool
//! per database** in a process-wide [`Fleet`], hands out counted
//! [`PoolHandle`]s, and holds every pool of a server to a shared **server
//! budget**, so the process can never be the one that exhausts the server.
//!
//! ```no_run
//! use pgfleet::{Fleet, PoolConfig, Target};
//!
//! # async fn example() -> Result<(), pgfleet::Error> {
//! let target = Target::parse("postgres://app:secret@127.0.0.1:5432/memfuse")?;
//! let config = PoolConfig { min_size: 2, max_size: Some(20), ..PoolConfig::default() };
//!
//! // Every store asks the process-wide fleet; all get the same pool.
//! let m0 = Fleet::global().pool(&target, &config)?;
//! let m1 = Fleet::global().pool(&target, &config)?;
//! assert_eq!(m0.active_references(), 2);
//!
//! // One statement, one call: pgfleet pipelines it with other tasks'
//! // statements on a few shared connections when that is safe (prepared
//! // once per connection), or runs it on a connection of its own.
//! let row = m0.query_one("SELECT $1::int + 1", &[&41i32]).await?;
//! assert_eq!(row.get::<_, i32>(0), 42);
//! let stored = m0
//!     .execute("INSERT INTO m0_messages (user_id, content) VALUES ($1, $2)", &[&"alice", &"hi"])
//!     .await?;
//!
//! // A deadline for one call: past it, the statement is cancelled on the
//! // server, and no other statement is.
//! let slow = m0.with_timeout(std::time::Duration::from_secs(2));
//! let rows = slow.query("SELECT * FROM m0_messages WHERE user_id = $1", &[&"alice"]).await?;
//!
//! // A transaction, or several statements that share a session: a
//! // connection of your own.
//! let mut conn = m1.get().await?;
//! let tx = conn.transaction().await?;
//! tx.execute("UPDATE m2_facts SET content = $1 WHERE id = $2", &[&"tea", &7i64]).await?;
//! tx.commit().await?;
//! # drop((stored, rows));
//! # Ok(())
//! # }
//! ```
//!
//! # Which method
//!
//! * **The statement methods on the pool** ([`Pool::query`],
//!   [`query_one`](Pool::query_one), [`query_opt`](Pool::query_opt),
//!   [`execute`](Pool::execute), [`query_typed`](Pool::query_typed),
//!   [`simple_query`](Pool::simple_query), [`prepare_cached`](Pool::prepare_cached),
//!   and [`with_timeout`](Pool::with_timeout) for a per-call deadline):
//!   the default. pgfleet decides from the text, without a round trip,
//!   where each runs. One statement with no transaction control, COPY,
//!   cursor, lock or session state is pipelined on a *lane*: one of a few
//!   connections (`shared_connections`, one per core by default) that many
//!   tasks' statements share, which does more per server connection than
//!   exclusive checkout (see `BENCHMARKS.md`). Anything else (`BEGIN`,
//!   `SET`, `LISTEN`, temporary tables, advisory locks, `COPY` to a file,
//!   scripts of several statements) runs on a connection of its own, reset
//!   when it comes back. An error, a timeout or a dropped future concerns
//!   its own statement only.
//! * **[`Pool::get`]**: a connection of your own, for transactions and
//!   for statements that must share a session; its query methods keep
//!   prepared statements per connection, and it derefs to
//!   `tokio_postgres::Client`.
//! * **[`Pool::shared`]**: a lease on a lane, reaching the `Client` itself,
//!   for code that wants to drive the pipelining by hand.
//!
//! # What is in it
//!
//! * [`Fleet`]: one [`Pool`] per normalised database address
//!   ([`Target::key`]), lock-free lookups, single-flight creation, counted
//!   handles that linger before closing, [`warmup`](Fleet::warmup),
//!   [`close_all`](Fleet::close_all), [`stats`](Fleet::stats).
//! * [`Pool`]: FIFO-fair acquire with timeouts, a warm floor, lifetimes with
//!   jitter, idle timeouts, `max_queries`, health checks only for
//!   connections that sat idle, and a protocol tap that never lets a dirty
//!   connection (a request in flight, an open transaction) reach the next
//!   caller, and resets the session state a borrower left (`SET`,
//!   `LISTEN`, advisory locks, temporary tables: the `reset` key) only when
//!   it sees some. The guard's query methods ([`PooledConnection::query`]
//!   and the like) and [`PooledConnection::prepare_cached`] keep prepared
//!   statements per connection; [`Pool::shared`] pipelines autocommit
//!   statements of many tasks over a few connections.
//! * [`Listener`] ([`Pool::listener`]): `LISTEN`/`NOTIFY` on a connection
//!   of its own, inside the server budget; it reconnects after a restart,
//!   listens again, and reports a [`Gap`] when notifications may have been
//!   missed.
//! * [`Hooks`]: async `after_connect`, `before_acquire` and `after_release`
//!   callbacks, set in code (the `hooks` field of [`PoolConfig`]).
//! * Poolers: with `pooler=transaction` every query method, `prepare_cached`,
//!   transactions and shared mode work behind PgBouncer in transaction mode
//!   (unnamed statements, parameter types learnt once per pool); with
//!   `pooler=session`, behind a session pooler.
//! * Server budgets ([`BudgetConfig`]): `auto` reads the server's
//!   `max_connections` at first contact; floors are reserved, idle
//!   connections are reclaimed between pools, and a refusal lowers the
//!   budget until slots free up. With [`Replicas::Auto`] the replicas of one
//!   service find each other through the server and split its budget
//!   between the live ones ([`ReplicaStats`] in each budget's statistics).
//! * Configuration: [`PoolConfig`] and [`FleetConfig`] as plain data, the one
//!   key parser [`PoolSettings`] (YAML, environment, URL query, code), and
//!   with the `yaml` feature a layered `Loader` for Hydra-style
//!   directories. Every key is documented in the [configuration
//!   reference](configuration).
//! * Observability: [`PoolStats`] and [`FleetStats`] (serialisable with the
//!   `serde` feature), Prometheus metrics with the `prometheus` feature
//!   (`FleetMetrics`), and [`sample_activity`] for `pg_stat_activity`.
//!
//! # Errors
//!
//! Every fallible operation returns [`Error`]: a kind ([`ErrorKind`]), a
//! message that names what failed (a timeout shows the pool's state and the
//! last connect error), the SQLSTATE behind it ([`Error::code`]) and its
//! cause. A `tokio_postgres::Error` converts into it, so one `?` serves pool
//! and query errors alike. Passwords never appear in any `Display` or
//! `Debug` output, error, log line or statistic.
//!
//! # Features
//!
//! All on by default; `--no-default-features` leaves a working pool and
//! fleet without YAML or Prometheus in the dependency tree.
//!
//! * `yaml` — `Loader`, `Loaded`: layered YAML configuration.
//! * `prometheus` — `FleetMetrics`: a `prometheus-client` collector of a
//!   fleet.
//! * `serde` — `Serialize` for statistics and configurations, and
//!   `Deserialize` for [`PoolConfig`] and [`FleetConfig`] through the same
//!   key parser (unknown keys refused).

mod activity;
mod address;
mod budget;
mod config;
mod conn;
mod error;
mod fleet;
mod listener;
#[cfg(feature = "prometheus")]
mod metrics;
mod pool;
mod shared;
mod statement;
mod stats;
mod tls;

#[doc = include_str!("../docs/configuration.md")]
pub mod configuration {}

pub use activity::{sample as sample_activity, ActivitySample, ReplicaActivity};
pub use address::{Endpoint, Host, LoadBalance, Role, SessionAttrs, Target};
pub use budget::{BudgetSource, BudgetStats, Derivation, ReplicaMember, ReplicaStats};
pub use config::{
    config_keys, BudgetConfig, BudgetMode, Effective, FleetConfig, HookError, HookFuture, Hooks,
    KeyInfo, PoolConfig, PoolSettings, Pooler, RawValue, ReadFallback, Replicas, Reset, Source,
    MAX_SERVICE_LEN,
};
#[cfg(feature = "yaml")]
pub use config::{ApplicationValue, Loaded, Loader, WarmupEntry};
pub use conn::{CancelToken, Prepared, Sql};
pub use error::{report, Error, ErrorKind, Result, TimeoutStage};
pub use fleet::{CloseReport, Fleet, FleetStats, PoolHandle, WarmupOutcome, WarmupReport};
pub use listener::{Event as ListenerEvent, Gap, Listener};
#[cfg(feature = "prometheus")]
pub use metrics::FleetMetrics;
pub use pool::{Pool, PooledConnection, Transaction};
/// The prometheus-client of [`FleetMetrics`], so that the registry it is
/// registered in is of the same version.
#[cfg(feature = "prometheus")]
pub use prometheus_client;
/// The rustls of [`TlsConfig::rustls_config`], so that the configuration
/// given is of the same version.
#[cfg(feature = "tls-rustls")]
pub use rustls;
pub use shared::SharedConnection;
pub use statement::{PoolSql, PoolStatement, Statements};
pub use stats::{CounterStats, Gauges, HostStats, PoolStats, TimingStats, Timings};
pub use tls::{ChannelBinding, RootCert, SslMode, TlsConfig};
/// The tokio-postgres this crate is built on, so that callers use the exact
/// same version (`pgfleet::tokio_postgres::types::ToSql`, ...).
pub use tokio_postgres;
