//! The test kit's error type.

/// A `Result` with the kit's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong starting or driving a cluster.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No PostgreSQL server binaries on this machine.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl) not found in PGFLEET_PG_BIN, pg_config --bindir, \
         /usr/lib/postgresql/*/bin or PATH; install them with `apt-get install postgresql` (Debian/Ubuntu) \
         or set PGFLEET_PG_BIN to the directory holding initdb"
    )]
    MissingBinaries,
    /// No PgBouncer binary on this machine.
    #[error(
        "pgbouncer not found in PGFLEET_PGBOUNCER, /usr/sbin or PATH; install it with \
         `apt-get install pgbouncer` (Debian/Ubuntu) or run scripts/setup.sh"
    )]
    MissingPgBouncer,
    /// initdb failed.
    #[error("initdb failed: {0}")]
    Initdb(String),
    /// The server did not start.
    #[error(
        "the PostgreSQL server did not start: {message}\n--- end of server log ---\n{log_tail}"
    )]
    Start {
        /// What pg_ctl said.
        message: String,
        /// The last lines of the server log.
        log_tail: String,
    },
    /// A command failed.
    #[error("could not {what} ({status}): {stderr}")]
    Command {
        /// What the command was for.
        what: String,
        /// Its exit status.
        status: String,
        /// Its standard error.
        stderr: String,
    },
    /// An I/O error.
    #[error("could not {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A test certificate could not be made.
    #[error("{0}")]
    Tls(String),
    /// An admin query failed.
    #[error("test kit query failed ({what}): {source}")]
    Query {
        /// The statement or its purpose.
        what: String,
        /// The cause.
        source: tokio_postgres::Error,
    },
}

impl Error {
    pub(crate) fn io(what: &str, source: std::io::Error) -> Self {
        Error::Io {
            what: what.to_owned(),
            source,
        }
    }

    pub(crate) fn query(what: &str, source: tokio_postgres::Error) -> Self {
        Error::Query {
            what: what.to_owned(),
            source,
        }
    }
}
