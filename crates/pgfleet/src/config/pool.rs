//! [`PoolConfig`]: how one pool behaves, as plain data with documented
//! defaults and [`validate`](PoolConfig::validate).

use std::collections::BTreeMap;
use std::time::Duration;

use super::hooks::Hooks;

/// `max_size` when it is not set and `min_size` is no larger.
pub(crate) const DEFAULT_MAX_SIZE: u32 = 10;

/// How one pool behaves. Every field is documented in the configuration
/// reference with its YAML names, unit, default and range.
///
/// Build one with struct update syntax; `max_size` follows a larger
/// `min_size` when it is left unset:
///
/// ```
/// use pgfleet::PoolConfig;
/// let config = PoolConfig { min_size: 20, ..PoolConfig::default() };
/// assert!(config.validate().is_ok());
/// assert_eq!(config.effective_max_size(), 20);
/// ```
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct PoolConfig {
    /// Warm floor: connections kept open even when idle, refilled in the
    /// background (`min_size`, alias `pool_size`). Default 1, range
    /// 0..=10000 and at most the `max_size`.
    pub min_size: u32,
    /// Hard cap on open plus opening connections (`max_size`; or
    /// `pool_size + max_overflow`). `None` (the default) means 10, or
    /// `min_size` if larger; range 1..=10000. See
    /// [`effective_max_size`](Self::effective_max_size).
    pub max_size: Option<u32>,
    /// How long `get()` waits for a connection before failing
    /// (`timeout`, aliases `pool_timeout`, `acquire_timeout`). Default 30s,
    /// at most 7 days.
    #[cfg_attr(feature = "serde", serde(with = "super::value::duration_text"))]
    pub acquire_timeout: Duration,
    /// How long opening one connection may take (`connect_timeout`).
    /// Default 10s, at most 7 days.
    #[cfg_attr(feature = "serde", serde(with = "super::value::duration_text"))]
    pub connect_timeout: Duration,
    /// Connections older than this are closed when next idle
    /// (`max_lifetime`, alias `pool_recycle`); up to 10% jitter is taken off
    /// so connections opened together do not expire together. Default 1h,
    /// at most 30 days; `None` keeps connections for ever.
    #[cfg_attr(feature = "serde", serde(with = "super::value::duration_text::option"))]
    pub max_lifetime: Option<Duration>,
    /// Connections above `min_size` idle for longer than this are closed
    /// (`idle_timeout`, alias `max_inactive_connection_lifetime`).
    /// Default 5min, at most 30 days; `None` keeps them.
    #[cfg_attr(feature = "serde", serde(with = "super::value::duration_text::option"))]
    pub idle_timeout: Option<Duration>,
    /// A connection is closed after serving this many statements
    /// (`max_queries`). Default 50000, at least 1; `None` for no limit.
    pub max_queries: Option<u64>,
    /// Server-side `statement_timeout` of every connection
    /// (`command_timeout`). Default off; at most 7 days. Conflicts with a
    /// `statement_timeout` in `server_settings`.
    #[cfg_attr(feature = "serde", serde(with = "super::value::duration_text::option"))]
    pub command_timeout: Option<Duration>,
    /// A connection idle for longer than this is checked with a round trip
    /// before it is handed out (`health_check_after`). Default 5s, at most
    /// 7 days.
    #[cfg_attr(feature = "serde", serde(with = "super::value::duration_text"))]
    pub health_check_after: Duration,
    /// How long a fleet pool with no live handles stays open before it
    /// closes (`linger`). Default 30s, at most 7 days.
    #[cfg_attr(feature = "serde", serde(with = "super::value::duration_text"))]
    pub linger: Duration,
    /// A connection held longer than this is reported while still held,
    /// with the place it was taken, and counted in `leaks_reported`
    /// (`leak_threshold`). Default off; at most 7 days.
    #[cfg_attr(feature = "serde", serde(with = "super::value::duration_text::option"))]
    pub leak_threshold: Option<Duration>,
    /// `application_name` of every connection, so that they can be found in
    /// `pg_stat_activity` (`application_name`). Default `pgfleet`, 1..=63
    /// bytes.
    pub application_name: String,
    /// Extra run-time parameters sent at connection start-up
    /// (`server_settings`), e.g. `search_path`, `work_mem`. Names like
    /// `work_mem` or `app.tenant`.
    pub server_settings: BTreeMap<String, String>,
    /// Connections that statements are pipelined over, per kind of use:
    /// the statement methods on the pool ([`Pool::query`](crate::Pool::query)
    /// and the rest) and the opt-in shared mode
    /// ([`Pool::shared`](crate::Pool::shared)) each open up to this many
    /// *lanes*, taken from the pool as the load asks for them
    /// (`shared_connections`). `None` (`auto`, the default) is, for the
    /// statement methods, the number of cores the process may use, at least
    /// 2 and at most 64 ([`Self::lanes`]), and for shared mode 2; range
    /// 1..=10000. The statement methods use at most half of `max_size`,
    /// shared mode at most `max_size`.
    #[cfg_attr(
        feature = "serde",
        serde(serialize_with = "super::value::auto_count::serialize")
    )]
    pub shared_connections: Option<u32>,
    /// Idle time of a connection's TCP socket before the first keepalive
    /// probe (`keepalives_idle`), so that a dead network or server is
    /// noticed on idle connections. Default 60s; at most 7 days; `None`
    /// turns keepalive off.
    #[cfg_attr(feature = "serde", serde(with = "super::value::duration_text::option"))]
    pub keepalives_idle: Option<Duration>,
    /// Time between keepalive probes (`keepalives_interval`). Default 10s,
    /// at most 7 days.
    #[cfg_attr(feature = "serde", serde(with = "super::value::duration_text"))]
    pub keepalives_interval: Duration,
    /// Unanswered probes before the connection is dropped
    /// (`keepalives_count`). Default 3, range 1..=100.
    pub keepalives_count: u32,
    /// How long data sent on a connection may stay unacknowledged before
    /// the connection is dropped (`tcp_user_timeout`, Linux's
    /// `TCP_USER_TIMEOUT`): a statement sent into a dead network fails
    /// instead of hanging. Default 30s; at most 7 days; `None`: the
    /// system's (about 15 minutes).
    #[cfg_attr(feature = "serde", serde(with = "super::value::duration_text::option"))]
    pub tcp_user_timeout: Option<Duration>,
    /// Callers that may wait for a connection at once (`max_waiting`); one
    /// more is turned away at once with an `Overloaded` error naming the
    /// limit, counted in `acquires_rejected`. Default off (no limit); range
    /// 0..=1000000 (0: never wait, take an idle connection or fail).
    pub max_waiting: Option<u32>,
    /// Prepared statements each connection keeps for `prepare_cached`
    /// (`statement_cache_size`); past it the least recently used is closed.
    /// Default 256, range 0..=10000; 0 caches nothing.
    pub statement_cache_size: usize,
    /// What sits between the pool and PostgreSQL (`pooler`): nothing
    /// (the default), a pooler in transaction mode, or one in session mode.
    /// See [`Pooler`].
    pub pooler: Pooler,
    /// When a returned connection's session state is reset before the next
    /// borrower (`reset`). See [`Reset`].
    pub reset: Reset,
    /// Where [`Pool::get_read`](crate::Pool::get_read) goes when no
    /// standby of a multi-host target accepts (`read_fallback`): the
    /// primary (the default), or an error.
    pub read_fallback: ReadFallback,
    /// A standby further behind its primary than this takes no reads
    /// (`max_replication_lag`): it is checked when a connection opens there
    /// and every maintenance tick, and the pool leaves it while it lags.
    /// Default off; at most 7 days.
    #[cfg_attr(feature = "serde", serde(with = "super::value::duration_text::option"))]
    pub max_replication_lag: Option<Duration>,
    /// Async callbacks on the pool's connections, set in code: see
    /// [`Hooks`]. Compared by identity.
    #[cfg_attr(feature = "serde", serde(skip))]
    pub hooks: Hooks,
}

/// Where reads go when no standby accepts: the `read_fallback` key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "lowercase")
)]
#[non_exhaustive]
pub enum ReadFallback {
    /// To the primary (`prefer-standby`), back to a standby when one
    /// returns.
    #[default]
    Primary,
    /// Nowhere: `get_read` fails while no standby accepts (`standby`).
    Error,
}

impl ReadFallback {
    /// Every value, in the order of [`NAMES`](Self::NAMES).
    pub const ALL: [ReadFallback; 2] = [ReadFallback::Primary, ReadFallback::Error];
    /// The values as the `read_fallback` key spells them.
    pub const NAMES: [&'static str; 2] = ["primary", "error"];
}

/// When a returned connection's session state is reset: the `reset` key.
///
/// The protocol tap reads the text of every statement a connection sends
/// and the settings the server reports, so the pool knows without a round
/// trip whether a borrower left session state behind, and of which kind.
/// The reset sends, in one round trip, only what that kind needs:
///
/// | seen | reset |
/// |---|---|
/// | `SET`, `RESET`, `set_config`, a reported setting changed | `SET SESSION AUTHORIZATION DEFAULT; RESET ALL` (then `server_settings` again behind a session pooler) |
/// | `LISTEN` | `UNLISTEN *` |
/// | `pg_advisory_lock` and its session-level kin | `SELECT pg_advisory_unlock_all()` |
/// | a temporary table, view or sequence | `DISCARD TEMP` |
/// | SQL `PREPARE` | `DEALLOCATE ALL` (the statement cache is cleared with it) |
/// | `DECLARE … WITH HOLD` | `CLOSE ALL` |
///
/// Behind `pooler = transaction` there is no session to reset and nothing
/// is sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "lowercase")
)]
#[non_exhaustive]
pub enum Reset {
    /// Reset what the connection is seen to have changed; a connection
    /// that changed nothing costs no round trip.
    #[default]
    Auto,
    /// Reset every kind on every return: one round trip per return, and the
    /// statement cache is cleared each time (`DEALLOCATE ALL`).
    Always,
    /// Never reset (the borrowers promise to leave no session state).
    Never,
}

impl Reset {
    /// Every value, in the order of [`NAMES`](Self::NAMES).
    pub const ALL: [Reset; 3] = [Reset::Auto, Reset::Always, Reset::Never];
    /// The values as the `reset` key spells them.
    pub const NAMES: [&'static str; 3] = ["auto", "always", "never"];
}

/// What sits between a pool and PostgreSQL: the `pooler` key.
///
/// Behind a pooler such as PgBouncer, the connections the pool opens are
/// the pooler's clients, not server sessions:
///
/// * [`Pooler::Transaction`]: the pooler lends a server connection for one
///   transaction (one statement in autocommit) and may pick another for
///   the next, so no session state survives a transaction. pgfleet then
///   prepares no named statement that would outlive one: the query methods
///   of the guard, [`prepare_cached`](crate::PooledConnection::prepare_cached)
///   and shared mode run each statement as an unnamed one (Parse, Bind,
///   Execute in one round trip) with parameter types it learnt once per SQL
///   text. `command_timeout` and `server_settings` are refused (they need
///   a session); session state (`SET`, `LISTEN`,
///   session advisory locks, SQL `PREPARE`, `WITH HOLD` cursors, temporary
///   tables) is reported with a warning, since it lands on whichever server
///   connection the pooler picked.
/// * [`Pooler::Session`]: the pooler lends a server connection for as long
///   as the client stays connected, so everything works as without one;
///   `command_timeout` and `server_settings` are applied with `SET` after
///   connecting.
///
/// Under either, a URL's `options` are refused: poolers refuse most
/// start-up parameters.
///
/// Under either, an `auto` server budget is not derived from the backend's
/// `max_connections`: the pooler, not PostgreSQL, limits this process's
/// connections (PgBouncer's `max_client_conn`), so the pools are bounded by
/// their `max_size` alone and the budget's statistics say so.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "lowercase")
)]
#[non_exhaustive]
pub enum Pooler {
    /// Directly on PostgreSQL (or on a pooler that keeps sessions whole).
    #[default]
    None,
    /// A pooler in transaction mode (PgBouncer's `pool_mode = transaction`).
    Transaction,
    /// A pooler in session mode (PgBouncer's `pool_mode = session`).
    Session,
}

impl Pooler {
    /// Every value, in the order of [`NAMES`](Self::NAMES).
    pub const ALL: [Pooler; 3] = [Pooler::None, Pooler::Transaction, Pooler::Session];
    /// The values as the `pooler` key spells them.
    pub const NAMES: [&'static str; 3] = ["none", "transaction", "session"];

    /// The value as the `pooler` key spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Pooler::None => Self::NAMES[0],
            Pooler::Transaction => Self::NAMES[1],
            Pooler::Session => Self::NAMES[2],
        }
    }

    /// Whether a pooler sits in front of the server.
    pub fn is_some(self) -> bool {
        self != Pooler::None
    }
}

impl std::fmt::Display for Pooler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            min_size: 1,
            max_size: None,
            acquire_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_lifetime: Some(Duration::from_secs(3600)),
            idle_timeout: Some(Duration::from_secs(300)),
            max_queries: Some(50_000),
            command_timeout: None,
            health_check_after: Duration::from_secs(5),
            linger: Duration::from_secs(30),
            leak_threshold: None,
            application_name: "pgfleet".to_owned(),
            server_settings: BTreeMap::new(),
            shared_connections: None,
            max_waiting: None,
            keepalives_idle: Some(Duration::from_secs(60)),
            keepalives_interval: Duration::from_secs(10),
            keepalives_count: 3,
            tcp_user_timeout: Some(Duration::from_secs(30)),
            statement_cache_size: 256,
            pooler: Pooler::None,
            reset: Reset::Auto,
            read_fallback: ReadFallback::Primary,
            max_replication_lag: None,
            hooks: Hooks::default(),
        }
    }
}

impl PoolConfig {
    /// Whether `other` means the same configuration: equal fields, with
    /// `max_size` compared as the cap in force (`None` that means 10 equals
    /// `Some(10)`). Cheap: plain comparisons, no allocation.
    pub fn means_same(&self, other: &PoolConfig) -> bool {
        // Destructured, so that a new field cannot be forgotten here.
        let PoolConfig {
            min_size,
            max_size: _,
            acquire_timeout,
            connect_timeout,
            max_lifetime,
            idle_timeout,
            max_queries,
            command_timeout,
            health_check_after,
            linger,
            leak_threshold,
            application_name,
            server_settings,
            shared_connections,
            keepalives_idle,
            keepalives_interval,
            keepalives_count,
            tcp_user_timeout,
            max_waiting,
            statement_cache_size,
            pooler,
            reset,
            read_fallback,
            max_replication_lag,
            hooks,
        } = self;
        *min_size == other.min_size
            && self.effective_max_size() == other.effective_max_size()
            && *acquire_timeout == other.acquire_timeout
            && *connect_timeout == other.connect_timeout
            && *max_lifetime == other.max_lifetime
            && *idle_timeout == other.idle_timeout
            && *max_queries == other.max_queries
            && *command_timeout == other.command_timeout
            && *health_check_after == other.health_check_after
            && *linger == other.linger
            && *leak_threshold == other.leak_threshold
            && *shared_connections == other.shared_connections
            && *keepalives_idle == other.keepalives_idle
            && *keepalives_interval == other.keepalives_interval
            && *keepalives_count == other.keepalives_count
            && *tcp_user_timeout == other.tcp_user_timeout
            && *max_waiting == other.max_waiting
            && *statement_cache_size == other.statement_cache_size
            && *pooler == other.pooler
            && *reset == other.reset
            && *read_fallback == other.read_fallback
            && *max_replication_lag == other.max_replication_lag
            && *hooks == other.hooks
            && *application_name == other.application_name
            && *server_settings == other.server_settings
    }

    /// The statement methods' lanes in force (`shared_connections`): the
    /// value set, or for `auto` the number of cores this process may use,
    /// at least 2 and at most 64. Each
    /// lane is one connection driven by its own task, and one server
    /// backend: with fewer lanes than cores, the pipelines of the busiest
    /// lanes are the bottleneck, on the client and on the server.
    pub fn lanes(&self) -> u32 {
        // Read once: the standard library reads the cgroup files each time.
        static CORES: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
        self.shared_connections.unwrap_or_else(|| {
            *CORES.get_or_init(|| {
                std::thread::available_parallelism()
                    .map_or(2, |n| u32::try_from(n.get()).unwrap_or(u32::MAX))
                    .clamp(2, 64)
            })
        })
    }

    /// The cap in force: `max_size`, or when it is `None`, 10 or `min_size`
    /// if larger.
    pub fn effective_max_size(&self) -> u32 {
        self.max_size
            .unwrap_or_else(|| DEFAULT_MAX_SIZE.max(self.min_size))
    }
}
