//! Configuration: what one pool does ([`PoolConfig`]), what the fleet does
//! ([`FleetConfig`]), and how both are read from YAML layers, the
//! environment, URLs and code.
//!
//! * `keys.rs` — the table of every key (name, aliases, kind, range,
//!   default, doc) that everything below reads;
//! * `kinds.rs` — what each kind of key does: check, store, show, range;
//! * `value.rs` — raw values, their sources, and the checks of one value;
//! * `pool.rs`, `fleet.rs` — the plain-data configurations;
//! * `settings.rs` — [`PoolSettings`], the one parser of keys;
//! * `serde.rs` — `Deserialize` through that same parser (feature `serde`);
//! * `yaml.rs`, `interpolate.rs`, `layered.rs` — the layered loader
//!   (feature `yaml`).

mod fleet;
mod hooks;
#[cfg(feature = "yaml")]
mod interpolate;
mod keys;
mod kinds;
#[cfg(feature = "yaml")]
mod layered;
mod pool;
#[cfg(feature = "serde")]
mod serde;
mod settings;
mod value;
#[cfg(feature = "yaml")]
mod yaml;

pub use fleet::{BudgetConfig, BudgetMode, FleetConfig, Replicas, MAX_SERVICE_LEN};
pub use hooks::{HookError, HookFuture, Hooks};
pub use keys::{config_keys, KeyInfo};
#[cfg(feature = "yaml")]
pub use layered::{ApplicationValue, Loaded, Loader, WarmupEntry};
pub use pool::{PoolConfig, Pooler, ReadFallback, Reset};
pub use settings::{Effective, PoolSettings};
pub use value::{RawValue, Source};
