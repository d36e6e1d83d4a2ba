//! The multi-user memory service that `pgfleet serve` runs: an application
//! built on the pgfleet library, kept outside it.
//!
//! Three memory layers, each a [`Store`] with its own table and its own
//! [`PoolHandle`](pgfleet::PoolHandle) from one [`Fleet`](pgfleet::Fleet), so
//! every store of every user shares the one pool per database:
//!
//! * M0 — raw messages of a session;
//! * M1 — episodes: consecutive messages of a session grouped by four;
//! * M2 — facts: short statements about a user (given, or extracted from the
//!   user's own messages starting with "I " or "My ").
//!
//! Search is PostgreSQL full-text search (`simple` configuration) with GIN
//! indexes; results of the three layers are ranked together by `ts_rank`.
//! Per-user services ([`UserServices`]) are created once each by a
//! single-flight [`ServiceCache`], and may be pre-created at start-up
//! (`connection_pool.precache_configs`, see [`precache`]). [`router`] is the
//! HTTP API; the domain returns [`MemoryError`]s, which the HTTP layer maps
//! to status codes.

mod api;
mod app;
mod cache;
mod error;
pub mod precache;
mod schema;
mod services;
mod store;

pub use api::{router, serve, ApiError, BODY_LIMIT};
pub use app::{App, Phase};
pub use cache::{CacheStats, ServiceCache};
pub use error::MemoryError;
pub use precache::PrecacheEntry;
pub use schema::create_schema;
pub use services::{tsquery, Message, Stored, UserServices, EPISODE_SIZE, SERVICE_NAMES};
pub use store::{Hit, Layer, Store};

/// The repository's README, whose Rust examples run as this crate's doc
/// tests (this crate is not published, so it may read outside itself).
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
