//! One physical connection: opening it (socket, protocol tap, tokio-postgres
//! handshake, driver task) and what the pool watches on it.
//!
//! * `tap.rs` — the protocol tap, which follows the message stream;
//! * `statements.rs` — the per-connection statement cache.

mod statements;
mod tap;

pub(crate) use tap::TxStatus;

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpStream, UnixStream};
use tokio::task::AbortHandle;
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, NoTls};

use self::statements::StatementCache;
use self::tap::{Socket, TapState, TapStream};
use crate::config::PoolConfig;
use crate::error::Error;
use crate::target::{Host, Target};

/// An open connection and what the pool needs to watch and stop it.
pub(crate) struct RawConn {
    pub(crate) client: Client,
    pub(crate) tap: Arc<TapState>,
    /// The task driving the connection; aborting it drops the socket.
    pub(crate) driver: AbortHandle,
    pub(crate) created: Instant,
    /// Statements prepared through the pool on this connection.
    pub(crate) statements: StatementCache,
}

impl RawConn {
    /// The socket is gone or the server said FATAL.
    pub(crate) fn is_broken(&self) -> bool {
        self.tap.is_dead() || self.client.is_closed()
    }
}

/// Builds the tokio-postgres configuration for every connection of a pool:
/// credentials, `application_name`, and the startup `options` carrying
/// `statement_timeout` and `server_settings`.
pub(crate) fn pg_config(target: &Target, config: &PoolConfig) -> tokio_postgres::Config {
    let mut pg = tokio_postgres::Config::new();
    pg.user(target.user())
        .dbname(target.database())
        .application_name(&config.application_name)
        .ssl_mode(SslMode::Disable);
    if let Some(password) = target.password() {
        pg.password(password);
    }
    let mut options = target.options().unwrap_or_default().to_owned();
    let mut setting = |name: &str, value: &str| {
        if !options.is_empty() {
            options.push(' ');
        }
        let _ = write!(options, "-c {name}={}", escape_option(value));
    };
    if let Some(timeout) = config.command_timeout {
        setting("statement_timeout", &timeout.as_millis().to_string());
    }
    for (name, value) in &config.server_settings {
        setting(name, value);
    }
    if !options.is_empty() {
        pg.options(&options);
    }
    pg
}

/// libpq splits `options` on spaces; a backslash escapes the next character.
fn escape_option(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if c == ' ' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Opens a socket to the target's server.
pub(crate) async fn open_socket(target: &Target) -> std::io::Result<Socket> {
    Ok(match target.host() {
        Host::Tcp(host) => {
            let stream = TcpStream::connect((host.as_str(), target.port())).await?;
            // Requests are small and latency-bound.
            stream.set_nodelay(true)?;
            Socket::Tcp(stream)
        }
        Host::Unix(dir) => Socket::Unix(
            UnixStream::connect(dir.join(format!(".s.PGSQL.{}", target.port()))).await?,
        ),
    })
}

/// Opens one connection (no timeout here: the caller bounds it), with room
/// for `statement_cache_size` cached statements.
pub(crate) async fn connect(
    target: &Target,
    pg: &tokio_postgres::Config,
    statement_cache_size: usize,
) -> Result<RawConn, Error> {
    let fail = |what: &str| Error::connect(format!("could not connect to {target}: {what}"));
    let socket = open_socket(target)
        .await
        .map_err(|e| fail(&e.to_string()).with_source(e))?;
    let tap = Arc::new(TapState::new());
    let (client, connection) = pg
        .connect_raw(TapStream::new(socket, tap.clone()), NoTls)
        .await
        .map_err(|e| fail(&connect_message(&e)).with_source(e))?;
    let driver_tap = tap.clone();
    let driver = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
        driver_tap.mark_eof();
    })
    .abort_handle();
    Ok(RawConn {
        client,
        tap,
        driver,
        created: Instant::now(),
        statements: StatementCache::new(statement_cache_size),
    })
}

/// A handle that cancels the statement running on one connection: a
/// CancelRequest on a fresh socket to the same server. From
/// [`PooledConnection::cancel_token`](crate::PooledConnection::cancel_token);
/// it stays valid after the guard is dropped (cancelling then reaches
/// whatever that connection runs next, as with libpq).
#[derive(Clone)]
pub struct CancelToken {
    token: tokio_postgres::CancelToken,
    target: Target,
}

impl CancelToken {
    pub(crate) fn new(client: &Client, target: &Target) -> CancelToken {
        CancelToken {
            token: client.cancel_token(),
            target: target.clone(),
        }
    }

    /// Asks the server to cancel the statement running on the connection,
    /// if any; the statement then fails with SQLSTATE 57014. Whether it was
    /// running or not, the server does not say.
    ///
    /// # Errors
    /// `Connect` if the server cannot be reached.
    pub async fn cancel_query(&self) -> Result<(), Error> {
        let fail = |e: &dyn std::fmt::Display| {
            Error::connect(format!(
                "could not send a cancel request to {}: {e}",
                self.target
            ))
        };
        let socket = open_socket(&self.target)
            .await
            .map_err(|e| fail(&e).with_source(e))?;
        self.token
            .cancel_query_raw(socket, NoTls)
            .await
            .map_err(|e| fail(&e).with_source(e))
    }
}

impl std::fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelToken")
            .field("target", &self.target)
            .finish()
    }
}

/// The server's message for a database error (e.g. `password authentication
/// failed for user "app"`), else the error's own text.
pub(crate) fn connect_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({}: {})", db.message(), db.severity(), db.code().code()),
        None => {
            let mut s = e.to_string();
            let mut cur = std::error::Error::source(e);
            while let Some(inner) = cur {
                s.push_str(": ");
                s.push_str(&inner.to_string());
                cur = inner.source();
            }
            s
        }
    }
}

/// SQLSTATE 53300: `FATAL: sorry, too many clients already`.
pub(crate) const TOO_MANY_CONNECTIONS: &str = "53300";

/// Connect errors that waiting will not cure: bad credentials, missing
/// database or role. Waiters fail at once instead of running out their
/// timeout.
pub(crate) fn is_permanent(code: &str) -> bool {
    code.starts_with("28") || code == "3D000"
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn options_are_escaped_for_libpq() {
        assert_eq!(escape_option(r"a b\c"), r"a\ b\\c");
    }

    #[test]
    fn command_timeout_and_server_settings_become_startup_options() {
        let target =
            Target::parse("postgres://app:pw@db:5432/x?options=-c%20search_path%3Dapp").unwrap();
        let mut config = PoolConfig {
            command_timeout: Some(Duration::from_millis(1500)),
            ..PoolConfig::default()
        };
        config
            .server_settings
            .insert("work_mem".into(), "64MB".into());
        let pg = pg_config(&target, &config);
        assert_eq!(
            pg.get_options(),
            Some("-c search_path=app -c statement_timeout=1500 -c work_mem=64MB")
        );
        assert_eq!(pg.get_application_name(), Some("pgfleet"));
    }

    #[test]
    fn auth_and_missing_database_are_permanent() {
        assert!(is_permanent("28P01") && is_permanent("28000") && is_permanent("3D000"));
        assert!(!is_permanent("53300") && !is_permanent("57P03"));
    }
}
