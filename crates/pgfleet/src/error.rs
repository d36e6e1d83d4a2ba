//! The one error type of the crate.
//!
//! [`Error`] is a boxed struct so that `Result<T, Error>` stays one word wide;
//! [`ErrorKind`] says what went wrong, the predicates (`is_timeout`, ...) answer
//! the common questions, and [`std::error::Error::source`] gives the cause
//! (a `tokio_postgres::Error`, an `io::Error`, ...). `Display` prints this
//! error's own message only; walk `source()` for the rest.

use std::fmt;
use std::time::Duration;

/// A boxed cause.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a timed-out operation was waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TimeoutStage {
    /// Waiting for a connection from the pool (`timeout` / `pool_timeout`).
    Acquire,
    /// Opening a new connection to the server (`connect_timeout`).
    Connect,
    /// Waiting for the pools to close (`close_all` deadline).
    Close,
    /// Running a statement of the statement methods past its per-call
    /// deadline (`Pool::with_timeout`).
    Statement,
}

impl fmt::Display for TimeoutStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TimeoutStage::Acquire => "acquire",
            TimeoutStage::Connect => "connect",
            TimeoutStage::Close => "close",
            TimeoutStage::Statement => "statement",
        })
    }
}

/// The kind of an [`Error`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// An operation did not finish within its time limit.
    Timeout {
        /// What it was waiting for.
        stage: TimeoutStage,
        /// The limit that ran out.
        after: Duration,
    },
    /// The pool (or the whole fleet) was closed.
    Closed,
    /// A connection could not be opened: network, authentication, missing
    /// database, server refusing connections.
    Connect,
    /// The configuration is invalid; the message names the key, the value and
    /// where it came from.
    Config,
    /// The pool's queue of waiting callers is full (`max_waiting`): the
    /// caller was turned away at once instead of waiting.
    Overloaded,
    /// The operation cannot run on this handle: COPY or transaction
    /// control in shared mode, say. The message says what to use instead.
    Unsupported,
    /// A statement failed: the server refused it (see [`Error::code`]), or
    /// the connection broke while it ran. Made from a
    /// [`tokio_postgres::Error`], so that one `?` serves pool and query
    /// errors alike.
    Db,
}

/// The error of every fallible pgfleet operation.
pub struct Error(Box<Inner>);

struct Inner {
    kind: ErrorKind,
    message: String,
    /// SQLSTATE recorded where the cause itself is not kept.
    code: Option<String>,
    /// A connect failure that waiting will not cure (a certificate the
    /// client does not trust, a server without TLS under `sslmode=require`).
    permanent: bool,
    source: Option<BoxError>,
}

/// Connect errors that waiting will not cure: bad credentials, missing
/// database or role. Waiters fail at once instead of running out their
/// timeout.
fn is_permanent_code(code: &str) -> bool {
    code.starts_with("28") || code == "3D000"
}

/// A `Result` with pgfleet's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error(Box::new(Inner {
            kind,
            message: message.into(),
            code: None,
            permanent: false,
            source: None,
        }))
    }

    pub(crate) fn set_code(&mut self, code: Option<String>) {
        self.0.code = code;
    }

    /// This error with the SQLSTATE `code` recorded.
    pub(crate) fn with_code(mut self, code: Option<String>) -> Self {
        self.0.code = code;
        self
    }

    /// A copy for a second recipient: same kind, message and SQLSTATE; the
    /// cause is folded into the message.
    pub(crate) fn duplicate(&self) -> Error {
        let mut copy = Error::new(self.0.kind.clone(), report(self));
        copy.0.code = self.code().map(str::to_owned);
        copy.0.permanent = self.0.permanent;
        copy
    }

    /// Marks a connect failure that waiting will not cure.
    pub(crate) fn permanent(mut self) -> Self {
        self.0.permanent = true;
        self
    }

    /// Whether retrying the connect cannot help until something changes:
    /// bad credentials, a missing database or role, a TLS failure of
    /// trust or support.
    pub(crate) fn is_permanent(&self) -> bool {
        self.0.permanent || self.code().is_some_and(is_permanent_code)
    }

    pub(crate) fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.0.source = Some(source.into());
        self
    }

    pub(crate) fn timeout(
        stage: TimeoutStage,
        after: Duration,
        message: impl Into<String>,
    ) -> Self {
        Error::new(ErrorKind::Timeout { stage, after }, message)
    }

    /// A connect-stage timeout: "timed out after {limit} {doing}".
    pub(crate) fn connect_timed_out(limit: Duration, doing: impl std::fmt::Display) -> Self {
        Error::timeout(
            TimeoutStage::Connect,
            limit,
            format!(
                "timed out after {} {doing}",
                humantime::format_duration(limit)
            ),
        )
    }

    pub(crate) fn overloaded(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Overloaded, message)
    }

    pub(crate) fn closed(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Closed, message)
    }

    pub(crate) fn connect(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Connect, message)
    }

    pub(crate) fn config(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Config, message)
    }

    /// A statement that failed on the client's side (wrong number of
    /// parameters or rows).
    pub(crate) fn statement(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Db, message)
    }

    pub(crate) fn unsupported(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Unsupported, message)
    }

    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.0.kind
    }

    /// True for any timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self.0.kind, ErrorKind::Timeout { .. })
    }

    /// True when the pool or fleet was closed.
    pub fn is_closed(&self) -> bool {
        self.0.kind == ErrorKind::Closed
    }

    /// True when the pool turned the caller away because its queue was
    /// full (`max_waiting`).
    pub fn is_overloaded(&self) -> bool {
        self.0.kind == ErrorKind::Overloaded
    }

    /// True when a connection could not be opened.
    pub fn is_connect(&self) -> bool {
        self.0.kind == ErrorKind::Connect
    }

    /// True for invalid configuration.
    pub fn is_config(&self) -> bool {
        self.0.kind == ErrorKind::Config
    }

    /// True for an operation this handle cannot run (COPY in shared mode).
    pub fn is_unsupported(&self) -> bool {
        self.0.kind == ErrorKind::Unsupported
    }

    /// True for a failed statement (an error of tokio-postgres, or a wrong
    /// number of parameters or rows).
    pub fn is_db(&self) -> bool {
        self.0.kind == ErrorKind::Db
    }

    /// The tokio-postgres error behind this one, if it is a `Db` error.
    pub fn as_db_error(&self) -> Option<&tokio_postgres::error::DbError> {
        self.source_pg()
            .and_then(tokio_postgres::Error::as_db_error)
    }

    fn source_pg(&self) -> Option<&tokio_postgres::Error> {
        self.0
            .source
            .as_deref()
            .and_then(|e| e.downcast_ref::<tokio_postgres::Error>())
    }

    /// The SQLSTATE of the server error behind this error, if there is one
    /// (e.g. `28P01` for a wrong password, `3D000` for a missing database,
    /// `53300` for "too many clients").
    pub fn code(&self) -> Option<&str> {
        if let Some(code) = &self.0.code {
            return Some(code);
        }
        let mut cur: Option<&(dyn std::error::Error + 'static)> = self
            .0
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static));
        while let Some(e) = cur {
            if let Some(pg) = e.downcast_ref::<tokio_postgres::Error>() {
                if let Some(db) = pg.as_db_error() {
                    return Some(db.code().code());
                }
            }
            cur = e.source();
        }
        None
    }
}

impl From<tokio_postgres::Error> for Error {
    /// A `Db` error whose message is the server's (`relation "x" does not
    /// exist (ERROR 42P01)`) or the connection's, with the tokio-postgres
    /// error as its source.
    fn from(e: tokio_postgres::Error) -> Self {
        let message = match e.as_db_error() {
            Some(db) => format!("{} ({} {})", db.message(), db.severity(), db.code().code()),
            None => report(&e),
        };
        Error::new(ErrorKind::Db, message).with_source(e)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.0.kind)
            .field("message", &self.0.message);
        if let Some(source) = &self.0.source {
            // The cause's Display, not its Debug: tokio-postgres' Debug of a
            // connect error can include the configuration it was given.
            d.field("source", &source.to_string());
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// The full chain of an error's messages, `: `-separated, for logs and for
/// errors that wrap other errors.
pub fn report(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_and_missing_database_are_permanent() {
        assert!(is_permanent_code("28P01") && is_permanent_code("28000"));
        assert!(is_permanent_code("3D000"));
        assert!(!is_permanent_code("53300") && !is_permanent_code("57P03"));
    }

    #[test]
    fn display_prints_own_message_and_report_walks_sources() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err = Error::connect("could not connect to postgres://app@db:5432/x").with_source(io);
        assert_eq!(
            err.to_string(),
            "could not connect to postgres://app@db:5432/x"
        );
        assert_eq!(
            report(&err),
            "could not connect to postgres://app@db:5432/x: refused"
        );
        assert!(err.is_connect() && !err.is_timeout() && !err.is_closed());
    }

    #[test]
    fn timeout_carries_stage_and_limit() {
        let err = Error::timeout(TimeoutStage::Acquire, Duration::from_secs(2), "timed out");
        assert!(err.is_timeout());
        assert_eq!(
            err.kind(),
            &ErrorKind::Timeout {
                stage: TimeoutStage::Acquire,
                after: Duration::from_secs(2)
            }
        );
    }
}
