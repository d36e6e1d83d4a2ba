#![doc = include_str!("../../../README.md")]

/// The configuration reference (`docs/CONFIGURATION.md`).
#[doc = include_str!("../../../docs/CONFIGURATION.md")]
pub mod configuration_reference {}

/// How pgfleet is built (`docs/ARCHITECTURE.md`).
#[doc = include_str!("../../../docs/ARCHITECTURE.md")]
pub mod architecture {}

pub mod activity;
pub mod budget;
pub mod config;
mod conn;
pub mod error;
pub mod fleet;
mod internals;
mod interpolate;
pub mod layered;
pub mod metrics;
pub mod pool;
pub mod shared;
mod statements;
pub mod stats;
mod tap;
pub mod target;

pub use activity::{sample as sample_activity, ActivitySample};
pub use budget::{BudgetConfig, BudgetMode, BudgetStats, Derivation};
pub use config::{Effective, PoolConfig, PoolSettings, RawValue, Source};
pub use error::{Error, ErrorKind, Result, TimeoutStage};
pub use fleet::{
    CloseReport, Fleet, FleetConfig, FleetStats, PoolHandle, WarmupOutcome, WarmupReport,
};
pub use layered::{ApplicationValue, Loaded, Loader, WarmupEntry};
pub use pool::{Pool, PooledConnection};
pub use shared::SharedConnection;
pub use stats::{CounterStats, Gauges, PoolStats, TimingStats, Timings};
pub use target::{Host, Target};
