//! Throwaway real PostgreSQL servers for tests.
//!
//! [`TempCluster`] runs `initdb` once per machine into a cached template,
//! copies it for each cluster, and starts `postgres` on a free 127.0.0.1
//! port — as the `postgres` OS user when the tests run as root, since
//! PostgreSQL refuses to run as root. A cluster is stopped and its directory
//! removed on drop (also when a test panics), and by a watchdog process if
//! the test process dies without dropping it.
//!
//! [`PgBouncer`] runs the system's PgBouncer in front of a cluster, in
//! transaction or session pooling mode.
//!
//! [`FaultProxy`] sits between a client and a cluster and injects network
//! faults on command: latency, a blackholed network, refused or hung new
//! connections, every connection cut.
//!
//! ```no_run
//! # async fn example() -> Result<(), pgfleet_testkit::Error> {
//! use pgfleet_testkit::{BackendFilter, TempCluster};
//!
//! let cluster = TempCluster::builder().setting("max_connections", "20").start()?;
//! cluster.create_database("app").await?;
//! let url = cluster.url("app"); // postgres://postgres:...@127.0.0.1:PORT/app
//! let n = cluster.count_backends(&BackendFilter::all().application_name("my-app")).await?;
//! # let _ = (url, n);
//! # Ok(())
//! # }
//! ```

mod cluster;
mod error;
mod pgbouncer;
mod proxy;
mod system;
mod tls;

pub use cluster::{
    unique_name, Backend, BackendFilter, ClusterBuilder, TempCluster, ADMIN_APPLICATION_NAME,
};
pub use error::{Error, Result};
pub use pgbouncer::{PgBouncer, PgBouncerBuilder, PoolMode};
pub use proxy::{Fault, FaultProxy};
/// rcgen, for keys made elsewhere ([`TestCa::issue_client_for`]).
pub use rcgen;
pub use tls::{Issued, ServerTls, TestCa};
