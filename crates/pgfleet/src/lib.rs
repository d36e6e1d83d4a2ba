//! pgfleet: one shared, bounded, observable PostgreSQL pool per database for
//! the whole process.

pub mod config;
mod conn;
pub mod error;
pub mod fleet;
mod internals;
pub mod pool;
pub mod stats;
mod tap;
pub mod target;

pub use config::PoolConfig;
pub use error::{Error, ErrorKind, Result, TimeoutStage};
pub use fleet::{CloseReport, Fleet, FleetStats, PoolHandle, WarmupOutcome, WarmupReport};
pub use pool::{Pool, PooledConnection};
pub use stats::{CounterStats, Gauges, PoolStats, TimingStats, Timings};
pub use target::{Host, Target};
