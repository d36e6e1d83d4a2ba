//! The byte stream under a connection: a TCP or Unix socket, or TLS over
//! TCP, and the TCP options that notice a dead network.
//!
//! pgfleet negotiates TLS itself (the SSLRequest, the handshake), below the
//! protocol tap, so that the tap sees the decrypted stream. tokio-postgres
//! then runs over a stream that is already secure: it is told
//! `sslmode=require` with direct negotiation, so it sends no SSLRequest, and
//! [`Established`] hands it the stream as it is, with the channel binding
//! data of the session for SCRAM-SHA-256-PLUS.

use std::future::{ready, Ready};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::tls::{ChannelBinding, TlsConnect, TlsStream};

use super::tap::TapStream;
use crate::address::{Host, Target};
use crate::config::PoolConfig;

/// A connection's stream.
#[derive(Debug)]
pub(crate) enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
    #[cfg(feature = "tls-rustls")]
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Socket {
    /// Whether the stream is TLS.
    pub(crate) fn is_tls(&self) -> bool {
        match self {
            #[cfg(feature = "tls-rustls")]
            Socket::Tls(_) => true,
            _ => false,
        }
    }
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

    fn apply(&self, stream: &TcpStream) -> io::Result<()> {
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

/// Opens a plain socket to the target's server, with `options` on a TCP
/// one.
pub(crate) async fn open_socket(target: &Target, options: &SocketOptions) -> io::Result<Socket> {
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

/// The SSLRequest message: length 8, code 1234.5679.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Asks the server for TLS: `true` when it agrees (`S`), `false` when it
/// declines (`N`); the stream then carries the handshake or the plaintext
/// startup. Exactly one byte is read, so nothing the server sent before the
/// handshake can be taken for part of the secure session.
///
/// # Errors
/// The socket's, or `InvalidData` for another answer (an ErrorResponse from
/// a server that does not know the request).
pub(crate) async fn request_tls(stream: &mut TcpStream) -> io::Result<bool> {
    stream.write_all(&SSL_REQUEST).await?;
    match stream.read_u8().await? {
        b'S' => Ok(true),
        b'N' => Ok(false),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the server answered the TLS request with {other:#04x}, not S or N"),
        )),
    }
}

impl Socket {
    /// `tls-server-end-point` data of a TLS session (a hash of the server's
    /// certificate), for SCRAM-SHA-256-PLUS; none for plaintext.
    fn channel_binding(&self) -> ChannelBinding {
        match self {
            #[cfg(feature = "tls-rustls")]
            Socket::Tls(stream) => super::tls::channel_binding(stream),
            _ => ChannelBinding::none(),
        }
    }
}

impl TlsStream for Socket {
    fn channel_binding(&self) -> ChannelBinding {
        Socket::channel_binding(self)
    }
}

impl<S: TlsStream + Unpin> TlsStream for TapStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        self.get_ref().channel_binding()
    }
}

/// The "TLS connector" tokio-postgres is given: the stream is already what
/// it should be (TLS negotiated below the tap, or plaintext with
/// `sslmode=disable`, where tokio-postgres never calls it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Established;

impl<S: TlsStream + Unpin> TlsConnect<S> for Established {
    type Stream = S;
    type Error = io::Error;
    type Future = Ready<io::Result<S>>;

    fn connect(self, stream: S) -> Self::Future {
        ready(Ok(stream))
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_read(cx, buf),
            #[cfg(feature = "tls-rustls")]
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, data),
            Socket::Unix(s) => Pin::new(s).poll_write(cx, data),
            #[cfg(feature = "tls-rustls")]
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Unix(s) => Pin::new(s).poll_flush(cx),
            #[cfg(feature = "tls-rustls")]
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Unix(s) => Pin::new(s).poll_shutdown(cx),
            #[cfg(feature = "tls-rustls")]
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
