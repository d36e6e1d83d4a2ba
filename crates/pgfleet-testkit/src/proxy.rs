//! [`FaultProxy`]: a TCP proxy on 127.0.0.1 between a client and a server
//! that injects network faults on command — latency, a blackholed network,
//! refused or hung new connections, every connection reset — so that tests
//! can show what a pool does when the network misbehaves.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::error::{Error, Result};

/// What the proxy does to traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Bytes pass both ways unchanged.
    Pass,
    /// Every chunk of bytes, both ways, waits this long before it passes:
    /// a slow network.
    Delay(Duration),
    /// Nothing passes, either way, on any connection, and nothing is closed:
    /// a dead network (a cable pulled, a firewall dropping packets). New
    /// connections are accepted and then hear nothing.
    Blackhole,
    /// New connections are accepted and reset at once (RST); existing ones
    /// pass.
    RefuseNew,
    /// New connections are accepted and then hear nothing, for good (no
    /// connection to the server is made; lifting the fault does not revive
    /// them, `cut_all` ends them); existing ones pass: a connect that hangs.
    HangNew,
}

/// A TCP proxy on a free 127.0.0.1 port that forwards to `upstream` and
/// injects [`Fault`]s. Its tasks run on the tokio runtime it was started
/// on, and stop when it is dropped (every proxied connection is closed
/// then).
///
/// ```no_run
/// # async fn example(cluster: &pgfleet_testkit::TempCluster) -> pgfleet_testkit::Result<()> {
/// use pgfleet_testkit::{Fault, FaultProxy};
///
/// let proxy = FaultProxy::start(cluster.port()).await?;
/// let url = cluster.url_via(proxy.port(), "postgres"); // through the proxy
/// proxy.set(Fault::Blackhole); // the network dies
/// proxy.set(Fault::Pass); // and comes back
/// proxy.cut_all(); // every connection closed
/// # let _ = url;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct FaultProxy {
    port: u16,
    fault: watch::Sender<Fault>,
    /// Bumped by `cut_all`; a connection started at an older generation
    /// resets itself.
    cuts: watch::Sender<u64>,
    shared: Arc<Counts>,
    /// Dropping it stops the accept loop and every connection.
    _stop: watch::Sender<()>,
}

#[derive(Debug, Default)]
struct Counts {
    /// Client connections accepted.
    accepted: AtomicU64,
    /// Proxied connections open now.
    open: AtomicUsize,
}

impl FaultProxy {
    /// Starts a proxy to `127.0.0.1:upstream_port`, passing traffic.
    ///
    /// # Errors
    /// The listener could not be bound.
    pub async fn start(upstream_port: u16) -> Result<FaultProxy> {
        let upstream = SocketAddr::from(([127, 0, 0, 1], upstream_port));
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|e| Error::io("bind the fault proxy", e))?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::io("read the fault proxy's address", e))?
            .port();
        let (fault, fault_rx) = watch::channel(Fault::Pass);
        let (cuts, cuts_rx) = watch::channel(0u64);
        let (stop, stop_rx) = watch::channel(());
        let shared = Arc::new(Counts::default());
        tokio::spawn(accept_loop(
            listener,
            upstream,
            Watches {
                fault: fault_rx,
                cuts: cuts_rx,
                stop: stop_rx,
            },
            shared.clone(),
        ));
        Ok(FaultProxy {
            port,
            fault,
            cuts,
            shared,
            _stop: stop,
        })
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Applies `fault` from now on, to existing and new connections alike.
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    /// The fault in force.
    pub fn fault(&self) -> Fault {
        *self.fault.borrow()
    }

    /// Resets every proxied connection open now: both sides get a TCP
    /// reset (RST), as when a middlebox drops its state or a host crashes.
    /// Later connections are not affected.
    pub fn cut_all(&self) {
        self.cuts.send_modify(|generation| *generation += 1);
    }

    /// Client connections accepted since the start.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Proxied connections open now.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }
}

/// What every task of the proxy watches.
#[derive(Clone)]
struct Watches {
    fault: watch::Receiver<Fault>,
    cuts: watch::Receiver<u64>,
    stop: watch::Receiver<()>,
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mut watches: Watches,
    counts: Arc<Counts>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = watches.stop.changed() => return,
        };
        let Ok((client, _)) = accepted else {
            continue;
        };
        let _ = client.set_nodelay(true);
        counts.accepted.fetch_add(1, Ordering::SeqCst);
        let fault = *watches.fault.borrow();
        match fault {
            Fault::RefuseNew => {
                let _ = client.set_zero_linger();
                drop(client);
            }
            _ => {
                tokio::spawn(proxy_one(client, upstream, watches.clone(), counts.clone()));
            }
        }
    }
}

/// One client connection: holds it silent while new connections hang, then
/// connects upstream and pumps both ways until either side closes, the
/// connection is cut (both sides reset), or the proxy stops.
async fn proxy_one(
    mut client: TcpStream,
    upstream: SocketAddr,
    watches: Watches,
    counts: Arc<Counts>,
) {
    counts.open.fetch_add(1, Ordering::SeqCst);
    let _open = OpenGuard(counts);
    let generation = *watches.cuts.borrow();
    let mut stop = watches.stop.clone();
    let mut cuts = watches.cuts.clone();
    let cut = async move {
        loop {
            if *cuts.borrow_and_update() != generation {
                return;
            }
            if cuts.changed().await.is_err() {
                // The proxy is gone: `stop` ends the connection.
                std::future::pending::<()>().await;
            }
        }
    };
    let fault_at_start = *watches.fault.borrow();
    let mut server: Option<TcpStream> = None;
    let work = async {
        match fault_at_start {
            // A connect that hangs: hold the client, silent, for good.
            Fault::HangNew => std::future::pending::<()>().await,
            // A dead network: silent until it comes back.
            Fault::Blackhole => {
                let mut fault = watches.fault.clone();
                while *fault.borrow_and_update() == Fault::Blackhole {
                    if fault.changed().await.is_err() {
                        return;
                    }
                }
            }
            Fault::Pass | Fault::Delay(_) | Fault::RefuseNew => {}
        }
        let Ok(connected) = TcpStream::connect(upstream).await else {
            return;
        };
        let _ = connected.set_nodelay(true);
        let server = server.insert(connected);
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        tokio::select! {
            _ = pump(client_read, server_write, watches.fault.clone()) => {}
            _ = pump(server_read, client_write, watches.fault.clone()) => {}
        }
    };
    let was_cut = tokio::select! {
        _ = work => false,
        _ = cut => true,
        _ = stop.changed() => false,
    };
    if was_cut {
        // A cut is abrupt: both sides get a reset, not an orderly close.
        let _ = client.set_zero_linger();
        if let Some(server) = &server {
            let _ = server.set_zero_linger();
        }
    }
}

/// Counts a proxied connection until it ends.
struct OpenGuard(Arc<Counts>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Copies one direction, obeying the fault in force before each chunk.
async fn pump(
    mut from: tokio::net::tcp::ReadHalf<'_>,
    mut to: tokio::net::tcp::WriteHalf<'_>,
    mut fault: watch::Receiver<Fault>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // A blackholed network moves nothing: stop reading (the sender's
        // buffers fill up, as they would) until the fault is gone.
        while *fault.borrow_and_update() == Fault::Blackhole {
            if fault.changed().await.is_err() {
                return;
            }
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        let current = *fault.borrow();
        match current {
            Fault::Delay(d) => tokio::time::sleep(d).await,
            Fault::Blackhole => {
                // Read just as the network died: held until it returns.
                while *fault.borrow_and_update() == Fault::Blackhole {
                    if fault.changed().await.is_err() {
                        return;
                    }
                }
            }
            Fault::Pass | Fault::RefuseNew | Fault::HangNew => {}
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
