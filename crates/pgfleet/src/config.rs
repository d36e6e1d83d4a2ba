//! Pool configuration: plain data with documented defaults and `validate()`.

use std::collections::BTreeMap;
use std::time::Duration;

/// How one pool behaves. Every field is documented in
/// `docs/CONFIGURATION.md` with its YAML names, unit, default and range.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PoolConfig {
    /// Warm floor: connections kept open even when idle, refilled in the
    /// background (`min_size`, alias `pool_size`). Default 1.
    pub min_size: u32,
    /// Hard cap on open plus opening connections (`max_size`; or
    /// `pool_size + max_overflow`). Default 10.
    pub max_size: u32,
    /// How long `get()` waits for a connection before failing
    /// (`timeout`, alias `pool_timeout`). Default 30s.
    #[serde(with = "humantime_serde_compat")]
    pub acquire_timeout: Duration,
    /// How long opening one connection may take (`connect_timeout`).
    /// Default 10s.
    #[serde(with = "humantime_serde_compat")]
    pub connect_timeout: Duration,
    /// Connections older than this are closed when next idle
    /// (`pool_recycle`, alias `max_lifetime`); up to 10% jitter is taken off
    /// so connections opened together do not expire together. Default 1h.
    #[serde(with = "humantime_serde_compat::option")]
    pub max_lifetime: Option<Duration>,
    /// Connections above `min_size` idle for longer than this are closed
    /// (`idle_timeout`, alias `max_inactive_connection_lifetime`).
    /// Default 5min.
    #[serde(with = "humantime_serde_compat::option")]
    pub idle_timeout: Option<Duration>,
    /// A connection is closed after serving this many queries
    /// (`max_queries`). Default 50000.
    pub max_queries: Option<u64>,
    /// Server-side `statement_timeout` of every connection
    /// (`command_timeout`). Default off.
    #[serde(with = "humantime_serde_compat::option")]
    pub command_timeout: Option<Duration>,
    /// A connection idle for longer than this is checked with a round trip
    /// before it is handed out (`health_check_after`). Default 5s.
    #[serde(with = "humantime_serde_compat")]
    pub health_check_after: Duration,
    /// How long a pool with no live handles stays open before it closes
    /// (`linger`). Default 30s.
    #[serde(with = "humantime_serde_compat")]
    pub linger: Duration,
    /// A connection held longer than this is reported with the place it was
    /// taken (`leak_threshold`). Default off.
    #[serde(with = "humantime_serde_compat::option")]
    pub leak_threshold: Option<Duration>,
    /// `application_name` of every connection, so that they can be found in
    /// `pg_stat_activity` (`application_name`). Default `pgfleet`.
    pub application_name: String,
    /// Extra run-time parameters sent at connection start-up
    /// (`server_settings`), e.g. `search_path`, `work_mem`.
    pub server_settings: BTreeMap<String, String>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            min_size: 1,
            max_size: 10,
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
        }
    }
}

/// Durations serialise as humantime strings (`"30s"`).
mod humantime_serde_compat {
    use serde::Serializer;
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub mod option {
        use super::*;
        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }
    }
}
