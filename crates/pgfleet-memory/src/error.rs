//! The memory service's own errors: what went wrong in its terms, not in
//! HTTP's. The HTTP layer (`api.rs`) maps them to responses.

use std::fmt;

/// An error of the memory service.
#[derive(Debug)]
#[non_exhaustive]
pub enum MemoryError {
    /// The database cannot be reached now: the pool timed out, a connection
    /// could not be opened or was lost, the pool is closed. Retrying later
    /// may succeed.
    Unavailable(String),
    /// The database refused a statement.
    Database(String),
    /// The service's configuration (`connection_pool.precache_configs`) is
    /// invalid; the message names the key, the value and the file.
    Config(String),
}

impl MemoryError {
    /// Whether retrying later may succeed.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, MemoryError::Unavailable(_))
    }
}

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryError::Unavailable(m) => write!(f, "database unavailable: {m}"),
            MemoryError::Database(m) => write!(f, "database error: {m}"),
            MemoryError::Config(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for MemoryError {}

impl From<pgfleet::Error> for MemoryError {
    /// The message keeps the server's words and SQLSTATE (`relation
    /// "memories" does not exist (ERROR 42P01)`), never a password.
    fn from(e: pgfleet::Error) -> Self {
        let code = e.code();
        // A lost connection (tokio-postgres says closed, no SQLSTATE), a
        // connection exception (08), an operator intervention such as a
        // shutdown (57P), or "too many clients" (53300): the database, not
        // the statement, is the problem.
        let lost = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<tokio_postgres::Error>())
            .is_some_and(|pg| pg.is_closed() || pg.as_db_error().is_none() && pg.code().is_none());
        let unavailable = e.is_timeout()
            || e.is_connect()
            || e.is_closed()
            || e.is_overloaded()
            || lost
            || code.is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c == "53300");
        if unavailable {
            MemoryError::Unavailable(e.to_string())
        } else {
            MemoryError::Database(e.to_string())
        }
    }
}

impl From<tokio_postgres::Error> for MemoryError {
    fn from(e: tokio_postgres::Error) -> Self {
        pgfleet::Error::from(e).into()
    }
}
