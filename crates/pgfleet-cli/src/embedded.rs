//! The embedded default: a throwaway local PostgreSQL cluster for `serve`
//! and `demo` when no database is configured (feature `embedded-cluster`,
//! on by default; it links the test kit). Built without the feature, the
//! binary asks for a database instead.

use std::path::Path;

/// A throwaway cluster, stopped and removed when dropped.
#[cfg(feature = "embedded-cluster")]
pub struct Embedded(pgfleet_testkit::TempCluster);

/// Without the feature there is never a cluster.
#[cfg(not(feature = "embedded-cluster"))]
pub enum Embedded {}

/// The message for a command that needs a database when this build has no
/// embedded cluster; `None` when it has one.
pub const MISSING: Option<&str> = if cfg!(feature = "embedded-cluster") {
    None
} else {
    Some("no database configured, and this pgfleet was built without the embedded-cluster feature: set DATABASE_URL (or --database-url, --config)")
};

/// Starts a throwaway cluster, with `max_connections` if given.
///
/// # Errors
/// Why it could not start, or, without the feature, that a database must
/// be configured.
#[cfg(feature = "embedded-cluster")]
pub async fn start(max_connections: Option<u32>) -> Result<Embedded, String> {
    let cluster = tokio::task::spawn_blocking(move || {
        let mut builder = pgfleet_testkit::TempCluster::builder();
        if let Some(max) = max_connections {
            builder = builder.setting("max_connections", max.to_string());
        }
        builder.start()
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    Ok(Embedded(cluster))
}

/// Without the feature: an error asking for a database.
///
/// # Errors
/// Always.
#[cfg(not(feature = "embedded-cluster"))]
pub async fn start(_max_connections: Option<u32>) -> Result<Embedded, String> {
    Err(MISSING.unwrap_or_default().to_owned())
}

#[cfg(feature = "embedded-cluster")]
impl Embedded {
    /// The cluster's directory (data, socket, logs).
    pub fn dir(&self) -> &Path {
        self.0.dir()
    }

    /// The URL of database `db`, as the superuser.
    pub fn url(&self, db: &str) -> String {
        self.0.url(db)
    }

    /// Creates database `db` if it is missing.
    ///
    /// # Errors
    /// The server's error.
    pub async fn create_database(&self, db: &str) -> Result<(), String> {
        self.0.create_database(db).await.map_err(|e| e.to_string())
    }
}

#[cfg(not(feature = "embedded-cluster"))]
impl Embedded {
    /// Unreachable: there is no cluster without the feature.
    pub fn dir(&self) -> &Path {
        match *self {}
    }

    /// Unreachable: there is no cluster without the feature.
    pub fn url(&self, _db: &str) -> String {
        match *self {}
    }

    /// Unreachable: there is no cluster without the feature.
    pub async fn create_database(&self, _db: &str) -> Result<(), String> {
        match *self {}
    }
}
