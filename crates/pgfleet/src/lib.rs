//! pgfleet: one shared, bounded, observable PostgreSQL pool per database for
//! the whole process.

pub mod config;
mod conn;
pub mod error;
pub mod fleet;
mod internals;
mod interpolate;
pub mod layered;
pub mod pool;
pub mod stats;
mod tap;
pub mod target;

pub use config::{Effective, PoolConfig, PoolSettings, RawValue, Source};
pub use error::{Error, ErrorKind, Result, TimeoutStage};
pub use layered::{Loaded, Loader, PrecacheEntry, WarmupEntry};
pub use fleet::{CloseReport, Fleet, FleetStats, PoolHandle, WarmupOutcome, WarmupReport};
pub use pool::{Pool, PooledConnection};
pub use stats::{CounterStats, Gauges, PoolStats, TimingStats, Timings};
pub use target::{Host, Target};
