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
use std::time::{Duration, Instant};

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

/// TCP options of a pool's sockets, so that a dead network is noticed:
/// keepalive probes on an idle socket, and a limit on unacknowledged data
/// (`tcp_user_timeout`, Linux), which fails a statement sent into a dead
/// network instead of leaving it hanging.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SocketOptions {
    /// Idle time before the first probe, interval, probes; `None`: off.
    pub(crate) keepalive: Option<(Duration, Duration, u32)>,
    pub(crate) user_timeout: Option<Duration>,
}

impl SocketOptions {
    pub(crate) fn of(config: &PoolConfig) -> SocketOptions {
        SocketOptions {
            keepalive: config
                .keepalives_idle
                .map(|idle| (idle, config.keepalives_interval, config.keepalives_count)),
            user_timeout: config.tcp_user_timeout,
        }
    }

    fn apply(&self, stream: &TcpStream) -> std::io::Result<()> {
        let socket = socket2::SockRef::from(stream);
        if let Some((idle, interval, count)) = self.keepalive {
            let keepalive = socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval(interval);
            #[cfg(any(
                target_os = "linux",
                target_os = "android",
                target_vendor = "apple",
                target_os = "freebsd"
            ))]
            let keepalive = keepalive.with_retries(count);
            #[cfg(not(any(
                target_os = "linux",
                target_os = "android",
                target_vendor = "apple",
                target_os = "freebsd"
            )))]
            let _ = count;
            socket.set_tcp_keepalive(&keepalive)?;
        }
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let Some(timeout) = self.user_timeout {
            socket.set_tcp_user_timeout(Some(timeout))?;
        }
        Ok(())
    }
}

/// Opens a socket to the target's server, with `options` on a TCP one.
pub(crate) async fn open_socket(
    target: &Target,
    options: &SocketOptions,
) -> std::io::Result<Socket> {
    Ok(match target.host() {
        Host::Tcp(host) => {
            let stream = TcpStream::connect((host.as_str(), target.port())).await?;
            // Requests are small and latency-bound.
            stream.set_nodelay(true)?;
            options.apply(&stream)?;
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
    options: &SocketOptions,
    statement_cache_size: usize,
) -> Result<RawConn, Error> {
    let fail = |what: &str| Error::connect(format!("could not connect to {target}: {what}"));
    let socket = open_socket(target, options)
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
        let socket = open_socket(&self.target, &SocketOptions::default())
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

    #[tokio::test]
    async fn pool_sockets_carry_keepalive_and_a_user_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let target = Target::parse(&format!("postgres://u@127.0.0.1:{port}/d")).unwrap();
        let options = SocketOptions::of(&PoolConfig::default());
        let Socket::Tcp(stream) = open_socket(&target, &options).await.unwrap() else {
            panic!("a TCP socket");
        };
        let socket = socket2::SockRef::from(&stream);
        assert!(socket.keepalive().unwrap());
        assert_eq!(
            socket.tcp_keepalive_time().unwrap(),
            Duration::from_secs(60)
        );
        assert_eq!(
            socket.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(10)
        );
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), 3);
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(30))
        );
        assert!(stream.nodelay().unwrap());
        // Off: neither.
        let off = SocketOptions::of(&PoolConfig {
            keepalives_idle: None,
            tcp_user_timeout: None,
            ..PoolConfig::default()
        });
        let Socket::Tcp(stream) = open_socket(&target, &off).await.unwrap() else {
            panic!("a TCP socket");
        };
        let socket = socket2::SockRef::from(&stream);
        assert!(!socket.keepalive().unwrap());
        assert_eq!(socket.tcp_user_timeout().unwrap(), None);
    }

    #[test]
    fn auth_and_missing_database_are_permanent() {
        assert!(is_permanent("28P01") && is_permanent("28000") && is_permanent("3D000"));
        assert!(!is_permanent("53300") && !is_permanent("57P03"));
    }
}
