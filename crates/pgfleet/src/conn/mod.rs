//! One physical connection: opening it (socket, TLS as `sslmode` says,
//! protocol tap, tokio-postgres handshake, driver task) and what the pool
//! watches on it.
//!
//! * `socket.rs` — TCP and Unix sockets, TCP options, the TLS request;
//! * `tls.rs` — rustls: the client configuration, verification, the
//!   handshake's errors in words, channel binding (feature `tls-rustls`);
//! * `tap.rs` — the protocol tap, which follows the message stream;
//! * `statements.rs` — the per-connection statement cache;
//! * `sql.rs` — what a statement's text says about the session.

pub(crate) mod role;
mod socket;
pub(crate) mod sql;
mod statements;
mod tap;
#[cfg(feature = "tls-rustls")]
mod tls;

pub(crate) use socket::SocketOptions;
pub(crate) use tap::{TapState, TxStatus};

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use tokio::task::AbortHandle;
use tokio_postgres::config::{SslMode as PgSslMode, SslNegotiation};
use tokio_postgres::Client;

use self::socket::{open_socket, request_tls, Established, Socket};
pub(crate) use self::statements::{private::SqlRef, Keyword, StatementCache};
pub use self::statements::{Prepared, Sql};
use self::tap::TapStream;
use crate::address::{Host, Target};
use crate::config::PoolConfig;
use crate::error::Error;
use crate::tls::{ChannelBinding, SslMode};

/// An open connection and what the pool needs to watch and stop it.
pub(crate) struct RawConn {
    pub(crate) client: Client,
    pub(crate) tap: Arc<TapState>,
    /// The task driving the connection; aborting it drops the socket.
    pub(crate) driver: AbortHandle,
    pub(crate) created: Instant,
    /// Statements prepared through the pool on this connection.
    pub(crate) statements: StatementCache,
    /// Whether the session is TLS (its cancel requests are too).
    pub(crate) secure: bool,
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
        .ssl_mode(PgSslMode::Disable)
        .channel_binding(match target.tls().channel_binding_setting() {
            ChannelBinding::Disable => tokio_postgres::config::ChannelBinding::Disable,
            ChannelBinding::Prefer => tokio_postgres::config::ChannelBinding::Prefer,
            ChannelBinding::Require => tokio_postgres::config::ChannelBinding::Require,
        });
    if let Some(password) = target.password() {
        pg.password(password);
    }
    let mut options = target.options().unwrap_or_default().to_owned();
    if !config.pooler.is_some() {
        // Poolers refuse most start-up parameters: behind one the settings
        // are applied with SET instead (`session_settings`).
        for (name, value) in settings(config) {
            if !options.is_empty() {
                options.push(' ');
            }
            let _ = write!(options, "-c {name}={}", escape_option(&value));
        }
    }
    if !options.is_empty() {
        pg.options(&options);
    }
    pg
}

/// The run-time parameters every connection of a pool gets:
/// `command_timeout` as `statement_timeout`, then `server_settings`.
fn settings(config: &PoolConfig) -> impl Iterator<Item = (&str, String)> {
    let timeout = config
        .command_timeout
        .map(|t| ("statement_timeout", t.as_millis().to_string()));
    timeout.into_iter().chain(
        config
            .server_settings
            .iter()
            .map(|(name, value)| (name.as_str(), value.clone())),
    )
}

/// The `SET` statements that give a connection behind a pooler in session
/// mode what start-up options give a direct one (a pooler refuses them);
/// `None` when there is nothing to set or no pooler. Names are checked
/// when the configuration is (letters, digits, `_`, `.`); values are
/// quoted.
pub(crate) fn session_settings(config: &PoolConfig) -> Option<String> {
    if !config.pooler.is_some() {
        return None;
    }
    let mut sql = String::new();
    for (name, value) in settings(config) {
        // An E'' literal means the same whatever standard_conforming_strings
        // says.
        let quoted = value.replace('\\', "\\\\").replace('\'', "''");
        let _ = write!(sql, "SET {name} = E'{quoted}'; ");
    }
    (!sql.is_empty()).then_some(sql)
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

/// What a pool's connections need for TLS, built once when the pool is
/// made (the files are read then): the rustls client, or nothing when its
/// connections never use TLS (`sslmode=disable`, a Unix socket).
#[derive(Clone, Default)]
pub(crate) struct TlsClient {
    #[cfg(feature = "tls-rustls")]
    client: Option<Arc<tls::Client>>,
}

impl TlsClient {
    /// # Errors
    /// `Config` for TLS settings that cannot work: unreadable or empty
    /// files, a key that is not the certificate's, `verify-*` without
    /// roots; without the `tls-rustls` feature, a mode that requires TLS.
    pub(crate) fn new(target: &Target) -> Result<TlsClient, Error> {
        #[cfg(feature = "tls-rustls")]
        {
            Ok(TlsClient {
                client: tls::Client::new(target)?.map(Arc::new),
            })
        }
        #[cfg(not(feature = "tls-rustls"))]
        {
            let mode = target.tls().mode();
            if mode.requires_tls() && matches!(target.host(), Host::Tcp(_)) {
                return Err(Error::config(format!(
                    "invalid TLS settings for {target}: sslmode = {mode} needs TLS, and this build of pgfleet has none (enable the tls-rustls feature)"
                )));
            }
            Ok(TlsClient {})
        }
    }

    /// Whether TLS can be tried at all.
    fn available(&self) -> bool {
        #[cfg(feature = "tls-rustls")]
        {
            self.client.is_some()
        }
        #[cfg(not(feature = "tls-rustls"))]
        {
            false
        }
    }
}

/// How one attempt goes over the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    Plain,
    Tls,
}

/// A failed attempt, and what libpq's fallbacks need to know about it.
struct Failed {
    error: Error,
    /// The server answered the startup with an error (it refused the
    /// session as offered: `allow` retries with TLS, `prefer` without).
    refused: bool,
    /// The TLS handshake failed (`prefer` retries without TLS).
    handshake: bool,
}

impl From<Error> for Failed {
    fn from(error: Error) -> Failed {
        Failed {
            error,
            refused: false,
            handshake: false,
        }
    }
}

/// Opens one connection (no timeout here: the caller bounds it), with room
/// for `statement_cache_size` cached statements, over TLS or not as the
/// target's `sslmode` says, with libpq's fallbacks: `prefer` tries TLS,
/// then plaintext when the server declines TLS, the handshake fails or the
/// server refuses the TLS session; `allow` tries plaintext, then TLS when
/// the server refuses the plaintext session.
///
/// With `notifications`, the driver task forwards the server's
/// notifications (`LISTEN`) there instead of dropping them.
pub(crate) async fn connect(
    target: &Target,
    pg: &tokio_postgres::Config,
    options: &SocketOptions,
    tls: &TlsClient,
    statement_cache_size: usize,
    notifications: Option<&Notifications>,
) -> Result<RawConn, Error> {
    let mode = target.tls().mode();
    let tls_possible = tls.available() && matches!(target.host(), Host::Tcp(_));
    let first = if tls_possible && mode != SslMode::Allow {
        Wire::Tls
    } else {
        Wire::Plain
    };
    let attempt = |wire| {
        attempt(
            target,
            pg,
            options,
            tls,
            statement_cache_size,
            notifications,
            wire,
        )
    };
    match attempt(first).await {
        Ok(conn) => Ok(conn),
        Err(failed) => {
            let second = match (mode, first) {
                (SslMode::Prefer, Wire::Tls) if failed.refused || failed.handshake => Wire::Plain,
                (SslMode::Allow, Wire::Plain) if failed.refused && tls_possible => Wire::Tls,
                _ => return Err(failed.error),
            };
            let first_error = failed.error.to_string();
            attempt(second).await.map_err(|again| {
                let why = match first {
                    Wire::Tls => "over TLS",
                    Wire::Plain => "in plaintext",
                };
                let error = Error::connect(format!(
                    "{} (tried {why} first: {first_error})",
                    again.error
                ));
                // Whether waiting helps is the second attempt's to say.
                if again.error.is_permanent() {
                    error.with_source(again.error).permanent()
                } else {
                    error.with_source(again.error)
                }
            })
        }
    }
}

/// A connect error for `target`: what failed.
fn connect_error(target: &Target, what: &str) -> Error {
    Error::connect(format!("could not connect to {target}: {what}"))
}

/// One attempt: socket, TLS if `wire` says so, startup.
async fn attempt(
    target: &Target,
    pg: &tokio_postgres::Config,
    options: &SocketOptions,
    tls: &TlsClient,
    statement_cache_size: usize,
    notifications: Option<&Notifications>,
    wire: Wire,
) -> Result<RawConn, Failed> {
    let fail = |what: &str| connect_error(target, what);
    let socket = open_socket(target, options)
        .await
        .map_err(|e| fail(&e.to_string()).with_source(e))?;
    let socket = match (wire, socket) {
        (Wire::Tls, Socket::Tcp(tcp)) => secure(target, tls, tcp).await?,
        (_, socket) => socket,
    };
    let secure = socket.is_tls();
    let mut pg = pg.clone();
    if secure {
        // Already TLS below the tap: tokio-postgres must not ask again.
        pg.ssl_mode(PgSslMode::Require)
            .ssl_negotiation(SslNegotiation::Direct);
    }
    let tap = Arc::new(TapState::new());
    let (client, connection) = pg
        .connect_raw(TapStream::new(socket, tap.clone()), Established)
        .await
        .map_err(|e| {
            #[cfg(feature = "tls-rustls")]
            if let Some(why) = tls.client.as_ref().and_then(|c| c.explain_startup(&e)) {
                // The server refused the TLS session (its alert, e.g. for
                // the client certificate): waiting will not change its
                // mind, and libpq does not fall back to plaintext here.
                return Failed {
                    refused: false,
                    handshake: false,
                    error: fail(&why).with_source(e).permanent(),
                };
            }
            Failed {
                refused: e.as_db_error().is_some(),
                handshake: false,
                error: fail(&connect_message(&e)).with_source(e),
            }
        })?;
    let driver_tap = tap.clone();
    let forward = notifications.cloned();
    let driver = tokio::spawn(async move {
        let ended = match forward {
            None => connection.await,
            Some(forward) => drive_forwarding(connection, &forward).await,
        };
        if let Err(e) = ended {
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
        secure,
    })
}

/// Where a listening connection's driver sends the server's notifications.
pub(crate) type Notifications = tokio::sync::mpsc::UnboundedSender<tokio_postgres::Notification>;

/// Drives `connection` to its end, forwarding its notifications.
async fn drive_forwarding<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    forward: &Notifications,
) -> Result<(), tokio_postgres::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
        if let tokio_postgres::AsyncMessage::Notification(n) = message? {
            // The listener may be gone; the connection goes with it.
            let _ = forward.send(n);
        }
    }
    Ok(())
}

/// Asks for TLS on `tcp` and shakes hands: the secure socket, or, under
/// `prefer` when the server declines, the plain one.
async fn secure(
    target: &Target,
    tls: &TlsClient,
    mut tcp: tokio::net::TcpStream,
) -> Result<Socket, Failed> {
    let mode = target.tls().mode();
    let fail = |what: &str| connect_error(target, what);
    let agreed = request_tls(&mut tcp)
        .await
        .map_err(|e| fail(&e.to_string()).with_source(e))?;
    if !agreed {
        return match mode {
            SslMode::Prefer => Ok(Socket::Tcp(tcp)),
            // `allow`'s second attempt, after the plaintext one was refused.
            SslMode::Allow => Err(fail(
                "the server refused the plaintext session and does not support TLS",
            )
            .permanent()
            .into()),
            _ => Err(fail(&format!(
                "the server does not support TLS, and sslmode = {mode} requires it"
            ))
            .permanent()
            .into()),
        };
    }
    #[cfg(feature = "tls-rustls")]
    if let Some(client) = &tls.client {
        return match client.handshake(tcp).await {
            Ok(stream) => Ok(Socket::Tls(Box::new(stream))),
            Err((why, of_tls)) => {
                let error = fail(&why);
                Err(Failed {
                    // A reset during the handshake is the network's: retry.
                    error: if of_tls { error.permanent() } else { error },
                    refused: false,
                    handshake: true,
                })
            }
        };
    }
    let _ = tls;
    Err(fail("TLS is not available in this build")
        .permanent()
        .into())
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
    /// Set when the connection is TLS: the cancel request is too.
    tls: Option<TlsClient>,
}

impl CancelToken {
    pub(crate) fn new(conn: &RawConn, target: &Target, tls: &TlsClient) -> CancelToken {
        CancelToken {
            token: conn.client.cancel_token(),
            target: target.clone(),
            tls: conn.secure.then(|| tls.clone()),
        }
    }

    /// Asks the server to cancel the statement running on the connection,
    /// if any; the statement then fails with SQLSTATE 57014. Whether it was
    /// running or not, the server does not say. The request goes over TLS
    /// when the connection does, checked as the connection was.
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
        let socket = match (&self.tls, socket) {
            (Some(tls), Socket::Tcp(tcp)) => {
                let socket = secure(&self.target, tls, tcp)
                    .await
                    .map_err(|failed| failed.error)?;
                if !socket.is_tls() {
                    return Err(fail(&"the server declined TLS for the cancel request"));
                }
                socket
            }
            (_, socket) => socket,
        };
        self.token
            .cancel_query_raw(socket, Established)
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
}
