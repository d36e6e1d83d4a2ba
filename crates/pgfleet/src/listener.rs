//! [`Listener`]: `LISTEN`/`NOTIFY` on a connection of its own, which
//! survives server restarts and says when notifications may have been
//! missed.
//!
//! A listening session cannot be pooled (its subscriptions are session
//! state), so a listener opens its own connection with the pool's target,
//! credentials, TLS and settings. It is outside the pool's `max_size` but
//! takes a unit of the server budget, like any connection of the process.
//! Its driver task forwards the server's notifications to a channel the
//! listener reads; when the connection dies the listener reconnects (with
//! backoff), listens to every channel again, and only then reports a
//! [`Gap`]: everything notified after the gap event is delivered, and
//! anything notified between the loss and the new `LISTEN` may be lost.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::Stream;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_postgres::Notification;

use crate::budget::Unit;
use crate::config::Pooler;
use crate::conn::sql::quote_ident;
use crate::conn::RawConn;
use crate::error::{Error, Result};
use crate::pool::inner::PoolInner;

/// What a [`Listener`] receives.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// A notification on one of the channels listened to.
    Notification(Notification),
    /// The connection was lost and is back, listening again: notifications
    /// sent in between may have been missed.
    Gap(Gap),
}

/// A time when a listener was not listening: the connection was lost and
/// has been re-established, with every channel listened to again.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Gap {
    /// When the loss was noticed.
    pub lost_at: SystemTime,
    /// How long the listener was not listening.
    pub duration: Duration,
    /// The channels whose notifications may have been missed.
    pub channels: Vec<String>,
    /// Why the connection was lost, as far as the client can tell.
    pub reason: String,
}

/// How often a waiting listener looks whether its pool was closed.
const CLOSE_CHECK: Duration = Duration::from_millis(500);

/// The shortest and longest wait between reconnect attempts.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// `LISTEN`/`NOTIFY` on its own connection: see the module documentation
/// of this type's file, and [`Pool::listener`](crate::Pool::listener).
///
/// ```no_run
/// # async fn example(pool: &pgfleet::Pool) -> pgfleet::Result<()> {
/// use pgfleet::ListenerEvent;
/// let mut listener = pool.listener().await?;
/// listener.listen("jobs").await?;
/// loop {
///     match listener.recv().await? {
///         ListenerEvent::Notification(n) => println!("{}: {}", n.channel(), n.payload()),
///         // Notifications may have been missed: look at the table instead.
///         ListenerEvent::Gap(gap) => println!("not listening for {:?}", gap.duration),
///         _ => {}
///     }
/// }
/// # }
/// ```
pub struct Listener {
    pool: Arc<PoolInner>,
    live: Option<Live>,
    channels: BTreeSet<String>,
    tx: mpsc::UnboundedSender<Notification>,
    rx: mpsc::UnboundedReceiver<Notification>,
    /// Set while the connection is lost: when, and why.
    lost: Option<(Instant, SystemTime, String)>,
    reconnects: u64,
}

/// The listener's connection and the budget unit it holds.
struct Live {
    raw: RawConn,
    _unit: Option<Unit>,
    /// The host it is on and that host's generation: when the pool leaves
    /// the host (a failover), the listener follows.
    host: usize,
    generation: u64,
}

impl Listener {
    /// A listener on `pool`'s database, connected.
    pub(crate) async fn open(pool: Arc<PoolInner>) -> Result<Listener> {
        if pool.config.pooler == Pooler::Transaction {
            return Err(Error::unsupported(format!(
                "LISTEN needs a session of its own, which a pooler in transaction mode does not \
                 keep: give the listener a pool on a direct URL (not through the pooler) for {}",
                pool.label
            )));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let mut listener = Listener {
            pool,
            live: None,
            channels: BTreeSet::new(),
            tx,
            rx,
            lost: None,
            reconnects: 0,
        };
        listener.live = Some(listener.connect().await?);
        Ok(listener)
    }

    /// One connection: a budget unit, the pool's connect path, the session
    /// set-up, then `LISTEN` on every channel; within `connect_timeout`.
    async fn connect(&self) -> Result<Live> {
        let pool = &self.pool;
        let limit = pool.config.connect_timeout;
        let still_needed = || !pool.lock().closed;
        let connected = pool
            .connect_session(
                0,
                Some(&self.tx),
                Some(pool.config.acquire_timeout),
                &still_needed,
                &|| {},
                false,
            )
            .await?
            .ok_or_else(|| {
                Error::closed(format!(
                    "the pool of this listener ({}) is closed",
                    pool.label
                ))
            })?;
        let raw = connected.raw;
        if !self.channels.is_empty() {
            let sql: String = self
                .channels
                .iter()
                .map(|c| format!("LISTEN {}; ", quote_ident(c)))
                .collect();
            timeout(limit, raw.client.batch_execute(&sql))
                .await
                .map_err(|_| {
                    Error::connect_timed_out(limit, format!("listening again on {}", pool.label))
                })??;
        }
        let unit = connected.unit;
        Ok(Live {
            raw,
            _unit: unit,
            host: connected.host,
            generation: connected.generation,
        })
    }

    /// Listens to `channel` (any name; quoted as an identifier). Kept
    /// across reconnects.
    ///
    /// # Errors
    /// `Db` if the server refuses; the channel is not kept then.
    pub async fn listen(&mut self, channel: &str) -> Result<()> {
        self.run(&format!("LISTEN {}", quote_ident(channel)))
            .await?;
        self.channels.insert(channel.to_owned());
        Ok(())
    }

    /// Stops listening to `channel`.
    ///
    /// # Errors
    /// `Db` if the server refuses (the channel is forgotten anyway).
    pub async fn unlisten(&mut self, channel: &str) -> Result<()> {
        self.channels.remove(channel);
        self.run(&format!("UNLISTEN {}", quote_ident(channel)))
            .await
    }

    /// Stops listening to every channel.
    ///
    /// # Errors
    /// `Db` if the server refuses (the channels are forgotten anyway).
    pub async fn unlisten_all(&mut self) -> Result<()> {
        self.channels.clear();
        self.run("UNLISTEN *").await
    }

    /// The channels listened to.
    pub fn channels(&self) -> impl Iterator<Item = &str> {
        self.channels.iter().map(String::as_str)
    }

    /// Times the connection was lost and re-established.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// Runs `sql` on the live connection; when there is none, the next
    /// connection listens to the channels anyway.
    async fn run(&mut self, sql: &str) -> Result<()> {
        match &self.live {
            Some(live) if !live.raw.is_broken() => Ok(live.raw.client.batch_execute(sql).await?),
            _ => Ok(()),
        }
    }

    /// The next notification, or a [`Gap`] after a reconnect. Waits as
    /// long as it takes (wrap it in a timeout to bound it); while the
    /// server is away it retries with backoff (100 ms to 5 s) and logs each
    /// failure.
    ///
    /// # Errors
    /// `Closed` when the pool was closed.
    pub async fn recv(&mut self) -> Result<Event> {
        loop {
            // Notifications already forwarded come first, also those the
            // old connection delivered before it died.
            if let Ok(n) = self.rx.try_recv() {
                return Ok(Event::Notification(n));
            }
            if self.pool.lock().closed {
                return Err(Error::closed(format!(
                    "the pool of this listener ({}) is closed",
                    self.pool.label
                )));
            }
            let Some(live) = &self.live else {
                return self.reconnect().await.map(Event::Gap);
            };
            if live.raw.is_broken() {
                self.lose("the connection was closed".to_owned());
                continue;
            }
            if self.pool.hosts.is_retired(live.host, live.generation) {
                let server = self.pool.hosts.entry(live.host).server.clone();
                self.lose(format!(
                    "the pool left {server} (failover): the listener follows it"
                ));
                continue;
            }
            let tap = live.raw.tap.clone();
            tokio::select! {
                biased;
                n = self.rx.recv() => {
                    if let Some(n) = n {
                        return Ok(Event::Notification(n));
                    }
                }
                // Looks at the pool again: a closed pool ends the listener,
                // a host it left is left (at the top of the loop).
                () = tokio::time::sleep(CLOSE_CHECK) => {
                    if self.pool.lock().closed {
                        self.live = None;
                    }
                }
                () = tap.closed() => {
                    let why = tap
                        .fatal_code()
                        .map_or_else(|| "the connection was closed".to_owned(), |code| {
                            format!("the server ended the session (SQLSTATE {code})")
                        });
                    self.lose(why);
                }
            }
        }
    }

    /// The connection is gone, for `reason`.
    fn lose(&mut self, reason: String) {
        tracing::warn!(pool = %self.pool.label, %reason, channels = self.channels.len(), "listener lost its connection; reconnecting");
        self.live = None;
        self.lost = Some((Instant::now(), SystemTime::now(), reason));
    }

    /// Reconnects with backoff until it works (or the pool closes), and
    /// returns the gap.
    async fn reconnect(&mut self) -> Result<Gap> {
        let mut wait = BACKOFF.0;
        loop {
            if self.pool.lock().closed {
                return Err(Error::closed(format!(
                    "the pool of this listener ({}) is closed",
                    self.pool.label
                )));
            }
            match self.connect().await {
                Ok(live) => {
                    self.live = Some(live);
                    self.reconnects += 1;
                    let (since, lost_at, reason) = self.lost.take().unwrap_or_else(|| {
                        (Instant::now(), SystemTime::now(), "unknown".to_owned())
                    });
                    let gap = Gap {
                        lost_at,
                        duration: since.elapsed(),
                        channels: self.channels.iter().cloned().collect(),
                        reason,
                    };
                    tracing::info!(pool = %self.pool.label, gap = ?gap.duration, "listener reconnected and listening again");
                    return Ok(gap);
                }
                Err(e) => {
                    tracing::warn!(pool = %self.pool.label, error = %e, retry_in = ?wait, "listener could not reconnect");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(BACKOFF.1);
                }
            }
        }
    }

    /// The events as a [`Stream`]: `Ok(Event)` for ever, or one `Err` when
    /// the pool closes, then the end.
    pub fn into_stream(self) -> impl Stream<Item = Result<Event>> + Send {
        futures_util::stream::unfold(Some(self), |listener| async move {
            let mut listener = listener?;
            match listener.recv().await {
                Ok(event) => Some((Ok(event), Some(listener))),
                Err(e) => Some((Err(e), None)),
            }
        })
    }
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("pool", &self.pool.label)
            .field("channels", &self.channels)
            .field("connected", &self.live.is_some())
            .field("reconnects", &self.reconnects)
            .finish()
    }
}
