//! [`PooledConnection`]: a connection taken from a pool, returned when the
//! guard is dropped.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::panic::Location;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::inner::{Conn, PoolInner};
use super::query::Session;
use super::transaction::Transaction;
use crate::conn::CancelToken;

/// A connection taken from a pool. Dropping it returns the connection to
/// the pool, which rolls back an open transaction and never hands out a
/// connection with a request in flight.
///
/// Its query methods ([`query`](Self::query), [`query_one`](Self::query_one),
/// [`query_opt`](Self::query_opt), [`execute`](Self::execute),
/// [`query_raw`](Self::query_raw)) go through the connection's statement
/// cache and work behind a transaction pooler; it derefs to
/// [`tokio_postgres::Client`] for the rest (`simple_query`,
/// `batch_execute`, `copy_in`, ...).
pub struct PooledConnection {
    conn: Option<Conn>,
    pool: Arc<PoolInner>,
    acquired_at: Instant,
    location: &'static Location<'static>,
}

impl PooledConnection {
    /// The guard of `conn`, taken from `pool` by the caller at `location`
    /// at `acquired_at`.
    pub(crate) fn new(
        conn: Conn,
        pool: Arc<PoolInner>,
        acquired_at: Instant,
        location: &'static Location<'static>,
    ) -> PooledConnection {
        PooledConnection {
            conn: Some(conn),
            pool,
            acquired_at,
            location,
        }
    }

    /// Where this connection was taken (`get()`'s caller).
    pub fn location(&self) -> &'static Location<'static> {
        self.location
    }

    /// How long this connection has been held.
    pub fn held_for(&self) -> Duration {
        self.acquired_at.elapsed()
    }

    super::query::query_methods!();

    /// Starts a transaction: `BEGIN` now, `ROLLBACK` when the
    /// [`Transaction`] is dropped without [`commit`](Transaction::commit).
    /// Its query methods and `prepare_cached` are this guard's, on the
    /// same statement cache.
    ///
    /// # Errors
    /// `Db` if `BEGIN` fails.
    pub async fn transaction(&mut self) -> crate::Result<Transaction<'_>> {
        let pool = &*self.pool;
        let raw = &mut self.conn.as_mut().expect("present until drop").raw;
        let tx = raw.client.transaction().await?;
        Ok(Transaction::new(tx, &raw.statements, &raw.tap, pool))
    }

    fn session(&self) -> Session<'_> {
        Session::of(&self.conn().raw, &self.pool, false)
    }

    /// A token that cancels the statement running on this connection, from
    /// another task (this one is busy awaiting it). It replaces
    /// `Client::cancel_token`, which cannot reach the server for a pooled
    /// connection: the pool opened the socket itself.
    ///
    /// ```no_run
    /// # async fn example(pool: &pgfleet::Pool) -> pgfleet::Result<()> {
    /// let conn = pool.get().await?;
    /// let token = conn.cancel_token();
    /// tokio::spawn(async move {
    ///     tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    ///     let _ = token.cancel_query().await;
    /// });
    /// let err = conn.query("SELECT pg_sleep(10)", &[]).await.unwrap_err();
    /// assert_eq!(err.code(), Some("57014"));
    /// # Ok(())
    /// # }
    /// ```
    pub fn cancel_token(&self) -> CancelToken {
        self.pool.cancel_token(self.conn())
    }

    /// Round trips this physical connection has made since it was opened,
    /// as the protocol tap counts them (the start-up, each simple query,
    /// each extended-protocol Sync, the pool's own health checks and
    /// resets included): for diagnostics and tests.
    pub fn round_trips(&self) -> u64 {
        self.conn().raw.tap.requests()
    }

    /// Statements cached on this connection.
    pub fn cached_statements(&self) -> usize {
        self.conn().raw.statements.len()
    }

    /// Forgets this connection's cached statements, after `DISCARD ALL` or
    /// `DEALLOCATE ALL` removed them on the server outside the pool's sight,
    /// or after a schema change made one fail with 0A000 (the query methods
    /// and the protocol tap handle both by themselves).
    pub fn clear_statement_cache(&self) {
        self.conn().raw.statements.clear();
    }

    fn conn(&self) -> &Conn {
        self.conn.as_ref().expect("present until drop")
    }

    /// The connection, out of its guard (for shared mode, which returns it
    /// itself): no longer held by a caller, so no longer a leak suspect.
    pub(crate) fn into_conn(mut self) -> Conn {
        let conn = self.conn.take().expect("present until drop");
        self.leave_caller(&conn, Instant::now());
        // Lent out for good: `release` with no hold takes it back.
        self.pool.lock().lent += 1;
        conn
    }

    /// The connection leaves its caller at `now`: leak detection forgets it.
    fn leave_caller(&self, conn: &Conn, now: Instant) {
        let pool = &self.pool;
        if let Some(threshold) = pool.config.leak_threshold {
            pool.checkouts
                .returned(conn.id(), now, threshold, &pool.label, &pool.counters);
        }
    }
}

impl Deref for PooledConnection {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.conn().raw.client
    }
}

impl DerefMut for PooledConnection {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.conn.as_mut().expect("present until drop").raw.client
    }
}

impl Drop for PooledConnection {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        let now = Instant::now();
        let held = now.saturating_duration_since(self.acquired_at);
        self.pool.counters.hold.record(held);
        self.leave_caller(&conn, now);
        self.pool.release(conn, self.location, now, Some(held));
    }
}

impl fmt::Debug for PooledConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledConnection")
            .field("pool", &self.pool.label)
            .field("taken_at", &self.location)
            .field("held_for", &self.held_for())
            .finish()
    }
}
