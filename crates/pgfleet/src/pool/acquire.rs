//! Taking a connection: an idle one checked without a round trip (the fast
//! path, synchronous under the lock), a stale one checked with one, or a
//! place in the FIFO queue of waiters, served by whatever frees up first.

use std::future::Future;
use std::panic::Location;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio::time::timeout;

use super::guard::PooledConnection;
use super::inner::{Conn, PoolInner};
use super::reaper;
use super::release::Verdict;
use super::state::{Plan, Waiter};
use crate::error::{Error, Result};
use crate::stats::CloseReason;

/// What `take` found for a caller.
enum Taken {
    /// An idle connection, fit to hand out now.
    Ready(Conn),
    /// An idle connection that sat long enough to need a round-trip check.
    Stale(Conn),
    /// None idle: the caller is in the queue of waiters.
    Queued(WaitGuard),
}

/// The longest an acquire waits, whatever it asked for (as the longest
/// `acquire_timeout`): a deadline always exists and never overflows.
const MAX_WAIT: Duration = Duration::from_secs(7 * 24 * 3600);

impl PoolInner {
    /// `get()` on behalf of the caller at `location`.
    pub(crate) fn get(
        self: &Arc<Self>,
        location: &'static Location<'static>,
    ) -> impl Future<Output = Result<PooledConnection>> + Send + '_ {
        self.get_within(self.config.acquire_timeout, location)
    }

    /// `get()` waiting at most `limit` (at most 7 days).
    pub(crate) async fn get_within(
        self: &Arc<Self>,
        limit: Duration,
        location: &'static Location<'static>,
    ) -> Result<PooledConnection> {
        // One clock read serves the whole fast path: the verdict on an idle
        // connection, its idle age, and the start of the hold time.
        let started = Instant::now();
        let limit = limit.min(MAX_WAIT);
        match self.take(started, started, limit, location)? {
            Taken::Ready(conn) if self.config.hooks.before_acquire.is_none() => {
                Ok(self.hand_out(conn, started, started, location))
            }
            // Waiting and health checks live in their own (boxed) future, so
            // the future of a `get()` that finds an idle connection stays
            // small.
            slow => Box::pin(self.acquire_slow(slow, started, limit, location)).await,
        }
    }

    /// Takes an idle connection, or queues the caller as a waiter (and
    /// starts the connects the pool needs). Connections found unfit on the
    /// way are closed or sent to be cleaned.
    fn take(
        self: &Arc<Self>,
        now: Instant,
        started: Instant,
        limit: Duration,
        location: &'static Location<'static>,
    ) -> Result<Taken> {
        let mut discarded = Vec::new();
        let mut dirty = Vec::new();
        let mut plan = Plan::default();
        let mut start_reaper = None;
        let taken = {
            let mut st = self.lock();
            if st.closed {
                return Err(self.closed_error());
            }
            loop {
                let Some(conn) = st.idle.pop_back() else {
                    if let Some(max) = self.config.max_waiting.filter(|max| st.waiting >= *max) {
                        break Err(max);
                    }
                    let (tx, rx) = oneshot::channel();
                    let deadline = started + limit;
                    st.waiters.push_back(Waiter {
                        tx,
                        deadline,
                        limit,
                        since: started,
                    });
                    st.waiting += 1;
                    if st.reap_at.is_none_or(|at| deadline < at) {
                        st.reaper += 1;
                        st.reap_at = Some(deadline);
                        start_reaper = Some(st.reaper);
                    }
                    // The acquire's own clock reading: a waiter queues
                    // many times a second under load.
                    plan = st.plan(self.min_size(), self.max_size(), now);
                    // From here on, dropping the guard settles the wait.
                    break Ok(Taken::Queued(WaitGuard {
                        rx: Some(rx),
                        pool: self.clone(),
                    }));
                };
                match self.verdict(&conn, now) {
                    Verdict::Reuse => {
                        let idle_for = now.saturating_duration_since(conn.idle_since);
                        break Ok(if idle_for < self.config.health_check_after {
                            Taken::Ready(conn)
                        } else {
                            Taken::Stale(conn)
                        });
                    }
                    Verdict::Close(reason) => discarded.push((conn, reason)),
                    Verdict::NeedsCleaning => dirty.push(conn),
                }
            }
        };
        for (conn, reason) in discarded {
            conn.close(reason);
        }
        for conn in dirty {
            self.send_to_clean(conn, location);
        }
        if let Some(id) = start_reaper {
            reaper::start(self, id);
        }
        self.execute(plan);
        // Turned away: `max_waiting` callers wait already.
        taken.map_err(|max| self.overloaded_error(max))
    }

    /// The rest of an acquire that could not take a fresh idle connection:
    /// health-check a stale one, or wait in line until the deadline.
    async fn acquire_slow(
        self: &Arc<Self>,
        mut taken: Taken,
        started: Instant,
        limit: Duration,
        location: &'static Location<'static>,
    ) -> Result<PooledConnection> {
        let deadline = started + limit;
        loop {
            let conn = match taken {
                Taken::Ready(conn) => Some(conn),
                Taken::Stale(conn) => self.check(conn, deadline).await,
                Taken::Queued(mut wait) => {
                    // No timer here: the reaper fails the wait at its
                    // deadline.
                    let outcome = wait.rx.as_mut().expect("set when queued").await;
                    wait.rx = None;
                    let conn = match outcome {
                        Ok(Ok(conn)) => conn,
                        Ok(Err(error)) => {
                            self.count_timeout(&error);
                            return Err(error);
                        }
                        Err(_) => return Err(self.closed_error()),
                    };
                    self.counters
                        .acquires_waited
                        .fetch_add(1, Ordering::Relaxed);
                    Some(conn)
                }
            };
            let conn = match conn {
                Some(conn) if self.config.hooks.before_acquire.is_some() => {
                    // Boxed: the hook's state (and its timer) stays out of
                    // this future, which every queued caller allocates.
                    Box::pin(self.before_acquire(conn, deadline)).await
                }
                conn => conn,
            };
            if let Some(conn) = conn {
                return Ok(self.hand_out(conn, started, Instant::now(), location));
            }
            // The stale connection failed its check, or the hook turned the
            // connection down: start over.
            taken = self.take(Instant::now(), started, limit, location)?;
        }
    }

    /// Wraps a connection in its guard, recording how long the caller
    /// waited.
    fn hand_out(
        self: &Arc<Self>,
        conn: Conn,
        started: Instant,
        now: Instant,
        location: &'static Location<'static>,
    ) -> PooledConnection {
        self.counters
            .wait
            .record(now.saturating_duration_since(started));
        if self.config.leak_threshold.is_some() {
            self.checkouts.taken(conn.id(), now, location);
        }
        PooledConnection::new(conn, self.clone(), now, location)
    }

    /// Runs the `before_acquire` hook, if any, within the caller's
    /// deadline; closes the connection if it says no or does not answer.
    async fn before_acquire(&self, conn: Conn, deadline: Instant) -> Option<Conn> {
        let Some(hook) = &self.config.hooks.before_acquire else {
            return Some(conn);
        };
        let limit = deadline.saturating_duration_since(Instant::now());
        let keep = timeout(limit, hook(&conn.raw.client))
            .await
            .unwrap_or(false);
        if keep && conn.raw.tap.is_clean() {
            Some(conn)
        } else {
            conn.close(CloseReason::Hook);
            None
        }
    }

    /// Checks a connection that sat idle with one round trip; closes it if
    /// it fails.
    async fn check(&self, conn: Conn, deadline: Instant) -> Option<Conn> {
        self.counters.health_checks.fetch_add(1, Ordering::Relaxed);
        let limit = self
            .config
            .connect_timeout
            .min(deadline.saturating_duration_since(Instant::now()));
        let ok = timeout(limit, conn.raw.client.simple_query(""))
            .await
            .is_ok_and(|r| r.is_ok());
        if ok && conn.raw.tap.is_clean() {
            Some(conn)
        } else {
            conn.close(CloseReason::Broken);
            None
        }
    }
}

/// The receiving end of a wait; dropping it unserved withdraws from the
/// queue, dropping it after a connection arrived returns the connection.
struct WaitGuard {
    rx: Option<oneshot::Receiver<Result<Conn, Error>>>,
    pool: Arc<PoolInner>,
}

impl WaitGuard {
    /// Stops waiting. Returns what was sent before the wait closed, if
    /// anything.
    fn cancel(&mut self) -> Option<Result<Conn, Error>> {
        let mut rx = self.rx.take()?;
        rx.close();
        match rx.try_recv() {
            Ok(received) => Some(received),
            Err(_) => {
                // Never served: the sender side will not count us any more.
                let mut st = self.pool.lock();
                debug_assert!(st.waiting > 0, "waiting count out of step");
                st.waiting = st.waiting.saturating_sub(1);
                st.prune_waiters();
                None
            }
        }
    }
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        match self.cancel() {
            Some(Ok(conn)) => self.pool.hand_off(self.pool.lock(), conn, Instant::now()),
            // Timed out as the caller gave up: still a timeout.
            Some(Err(error)) => self.pool.count_timeout(&error),
            None => {}
        }
    }
}
