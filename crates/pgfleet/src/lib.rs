//! pgfleet: one shared, bounded, observable PostgreSQL pool per database for
//! the whole process.

pub mod config;
pub mod error;
pub mod target;

pub use config::PoolConfig;
pub use error::{Error, ErrorKind, Result, TimeoutStage};
pub use target::{Host, Target};
