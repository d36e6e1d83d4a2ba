//! Database targets: where a pool connects, and the key that says whether two
//! addresses are the same database.

use std::fmt;
use std::path::PathBuf;

/// Where the server listens.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Host {
    /// A TCP host name or IP address.
    Tcp(String),
    /// A directory holding the server's Unix socket (`.s.PGSQL.<port>`).
    Unix(PathBuf),
}

/// A database address: host, port, database, user, password and startup
/// options.
///
/// Build one from a URL with [`Target::parse`] or from parts with
/// [`Target::from_parts`]. `Display` and `Debug` never show the password.
#[derive(Clone)]
pub struct Target {
    pub(crate) host: Host,
    pub(crate) port: u16,
    pub(crate) database: String,
    pub(crate) user: String,
    pub(crate) password: Option<String>,
    /// The libpq `options` startup parameter (e.g. `-c search_path=app`).
    pub(crate) options: Option<String>,
    /// The normalised key: see [`Target::key`].
    pub(crate) key: String,
}

impl Target {
    /// The host.
    pub fn host(&self) -> &Host {
        &self.host
    }
    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
    /// The database name.
    pub fn database(&self) -> &str {
        &self.database
    }
    /// The user name.
    pub fn user(&self) -> &str {
        &self.user
    }
    /// The `options` startup parameter, if any.
    pub fn options(&self) -> Option<&str> {
        self.options.as_deref()
    }
    pub(crate) fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }
    /// The normalised key of this target: two targets with the same key are
    /// the same database and share one pool. It never contains the password.
    pub fn key(&self) -> &str {
        &self.key
    }
}
