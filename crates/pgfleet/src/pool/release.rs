//! Where a returned connection goes: straight back (to a waiter or idle),
//! closed, or to the clean task, which settles requests still in flight,
//! cancels a statement still running, rolls back an open transaction and
//! resets the session state a borrower left (see `session.rs`).

use std::panic::Location;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::time::timeout;

use super::inner::{Conn, PoolInner};
use super::session;
use crate::config::Pooler;
use crate::conn::role::query_role;
use crate::conn::sql::Effects;
use crate::conn::TxStatus;
use crate::error::Error;
use crate::stats::CloseReason;

/// How long a returned connection may take to receive the answers to
/// requests still in flight before the pool cancels them.
const SETTLE: Duration = Duration::from_millis(100);

/// Where a returned (or idle) connection goes.
pub(crate) enum Verdict {
    /// Clean and within its limits: reuse it as it is.
    Reuse,
    /// Close it, for this reason.
    Close(CloseReason),
    /// A request in flight or a transaction open: clean it first.
    NeedsCleaning,
}

impl PoolInner {
    /// Judges a connection at `now` without a round trip, from the tap.
    pub(crate) fn verdict(&self, conn: &Conn, now: Instant) -> Verdict {
        if conn.raw.is_broken() {
            if let Some(code) = conn.raw.tap.fatal_code() {
                tracing::debug!(pool = %self.label, sqlstate = %code, "connection closed by the server");
            }
            Verdict::Close(CloseReason::Broken)
        } else if self.hosts.is_retired(conn.host, conn.host_generation) {
            Verdict::Close(CloseReason::Failover)
        } else if self.hosts.attrs.checks_role() && conn.raw.tap.role_alert() {
            // The server reported another role, or a write was refused as
            // read-only: the clean task looks (see `judge_role`).
            Verdict::NeedsCleaning
        } else if !conn.raw.tap.is_clean() {
            Verdict::NeedsCleaning
        } else if self
            .config
            .max_queries
            .is_some_and(|max| conn.raw.tap.queries() >= max)
        {
            Verdict::Close(CloseReason::MaxQueries)
        } else if conn.is_expired(now) {
            Verdict::Close(CloseReason::Lifetime)
        } else {
            Verdict::Reuse
        }
    }

    /// Takes back a connection from a caller, at `now`, that held it for
    /// `held` (`None`: a connection lent out by `into_conn`, a shared-mode
    /// lane's).
    pub(crate) fn release(
        self: &Arc<Self>,
        conn: Conn,
        location: &'static Location<'static>,
        now: Instant,
        held: Option<Duration>,
    ) {
        if held.is_none() {
            // A lent connection (shared mode's) comes home.
            let mut st = self.lock();
            st.lent = st.lent.saturating_sub(1);
        }
        let tap = &conn.raw.tap;
        let verdict = self.verdict(&conn, now);
        // Read after the verdict, which saw the last ReadyForQuery: a
        // ParameterStatus ahead of it is counted.
        let effects = tap.effects();
        // Clearing the cache queues a Close per statement: those must be
        // answered before the connection is handed out again.
        let mut settle = false;
        if self.config.pooler == Pooler::Transaction {
            // No session, nothing to reset; the cache holds no named
            // statement that a DEALLOCATE could have dropped.
            tap.take_effects();
        } else if effects.contains(Effects::DROPPED_STATEMENTS) {
            // `DISCARD ALL` / `DEALLOCATE` dropped the server's statements,
            // tokio-postgres's own for type lookups too.
            conn.raw.statements.clear();
            conn.raw.client.clear_type_cache();
            tap.clear_effects(Effects::DROPPED_STATEMENTS);
            settle = true;
        }
        let reset = settle
            || session::reset_needed(&self.config, effects).is_some()
            || self.config.hooks.after_release.is_some();
        match verdict {
            Verdict::Reuse if reset => self.send_to_clean(conn, location),
            Verdict::Reuse => {
                let mut st = self.lock();
                if let Some(held) = held {
                    st.estimates.record_hold(held);
                }
                self.hand_off(st, conn, now);
            }
            Verdict::Close(reason) => conn.close(reason),
            Verdict::NeedsCleaning => self.send_to_clean(conn, location),
        }
    }

    /// Starts the clean task for a dirty connection; closes it instead when
    /// no runtime runs (a guard dropped outside one).
    pub(crate) fn send_to_clean(
        self: &Arc<Self>,
        conn: Conn,
        location: &'static Location<'static>,
    ) {
        match tokio::runtime::Handle::try_current() {
            Ok(_) => {
                self.runtime.spawn(clean(self.clone(), conn, location));
            }
            Err(_) => conn.close(CloseReason::Dirty),
        }
    }
}

/// Whether the transaction the connection came back in was ended by the
/// client's own requests queued before it came back: a tokio-postgres
/// `Transaction` dropped by an early return queues a ROLLBACK that the tap
/// sees only once the connection's task writes it. An empty query queued
/// now is answered after everything queued before it, so its answer tells
/// the state those requests left (one round trip, on this path only).
async fn rolled_back_by_client(pool: &PoolInner, conn: &Conn) -> bool {
    let barrier = timeout(
        pool.config.connect_timeout,
        conn.raw.client.batch_execute(""),
    )
    .await;
    barrier.is_ok_and(|r| r.is_ok()) && conn.raw.tap.is_clean()
}

/// The clean task: waits for requests in flight (and cancels them if they
/// run on), rolls back an open transaction, then returns the connection to
/// the pool or closes it.
async fn clean(pool: Arc<PoolInner>, conn: Conn, location: &'static Location<'static>) {
    let tap = conn.raw.tap.clone();
    let mut settled = timeout(SETTLE, tap.settled()).await.unwrap_or(false);
    if !settled && !conn.raw.is_broken() {
        // A statement is still running on the server: cancel it so the
        // connection can come back, rather than leave a busy backend behind.
        let token = pool.cancel_token(&conn);
        let sent = timeout(pool.config.connect_timeout, token.cancel_query()).await;
        if sent.is_ok_and(|r| r.is_ok()) {
            settled = timeout(pool.config.connect_timeout, tap.settled())
                .await
                .unwrap_or(false);
        }
    }
    if !settled {
        tracing::warn!(pool = %pool.label, taken_at = %location, "connection returned with a request still running; closed");
        conn.close(CloseReason::Dirty);
        return;
    }
    if tap.status() != TxStatus::Idle && !rolled_back_by_client(&pool, &conn).await {
        pool.counters.dirty_returns.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            pool = %pool.label,
            taken_at = %location,
            "connection returned inside a transaction; rolled back"
        );
        let rolled_back = timeout(
            pool.config.connect_timeout,
            conn.raw.client.batch_execute("ROLLBACK"),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        if !rolled_back || !tap.is_clean() {
            conn.close(CloseReason::Dirty);
            return;
        }
    }
    if let Some(effects) = session::reset_needed(&pool.config, tap.effects()) {
        let sql = session::reset_sql(&pool.config, effects);
        let reset = timeout(
            pool.config.connect_timeout,
            conn.raw.client.batch_execute(&sql),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        if !reset || !tap.is_clean() {
            tracing::warn!(pool = %pool.label, taken_at = %location, "resetting a returned connection's session failed; closed");
            conn.close(CloseReason::Dirty);
            return;
        }
        if effects.contains(Effects::PREPARED) {
            // DEALLOCATE ALL dropped the cached statements too, and
            // tokio-postgres's own for type lookups.
            conn.raw.statements.clear();
            conn.raw.client.clear_type_cache();
        }
        tap.take_effects();
        pool.counters.session_resets.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(pool = %pool.label, reset = ?effects.names(), "session reset");
        if pool.config.hooks.after_connect.is_some() {
            // The reset may have undone what the after_connect hook set
            // (RESET ALL its settings, DISCARD TEMP its tables,
            // DEALLOCATE ALL its statements): it runs again.
            let again = timeout(
                pool.config.connect_timeout,
                session::after_connect(&pool.config, &pool.label, &conn.raw),
            )
            .await;
            tap.take_effects();
            if !again.is_ok_and(|r| r.is_ok()) {
                tracing::warn!(pool = %pool.label, "the after_connect hook failed after a session reset; connection closed");
                conn.close(CloseReason::Hook);
                return;
            }
        }
    }
    if let Some(hook) = &pool.config.hooks.after_release {
        let keep = timeout(pool.config.connect_timeout, hook(&conn.raw.client))
            .await
            .unwrap_or(false);
        if !keep || !tap.is_clean() {
            conn.close(CloseReason::Hook);
            return;
        }
    }
    // Statements dropped from the cache above queue a Close each: let them
    // be answered before the verdict, or a clean connection would look
    // busy.
    let _ = timeout(SETTLE, tap.settled()).await;
    if pool.hosts.attrs.checks_role() && tap.role_alert() && !judge_role(&pool, &conn).await {
        conn.close(CloseReason::Broken);
        return;
    }
    let now = Instant::now();
    match pool.verdict(&conn, now) {
        Verdict::Reuse => pool.hand_off(pool.lock(), conn, now),
        Verdict::Close(reason) => conn.close(reason),
        Verdict::NeedsCleaning => conn.close(CloseReason::Dirty),
    }
}

/// A connection whose server reported another role, or on which a write
/// was refused as read-only (25006), after its session was reset (so a
/// session's own `SET default_transaction_read_only` is gone): when the
/// server no longer matches `target_session_attrs`, the pool leaves that
/// host (the verdict then closes this connection with the others). A
/// server that reports its role (PostgreSQL 14+) is believed; otherwise
/// one query asks, as libpq asks. `false` when the question failed.
async fn judge_role(pool: &Arc<PoolInner>, conn: &Conn) -> bool {
    let tap = &conn.raw.tap;
    tap.clear_role_alert();
    // A reported standby is the server's state alone; a primary's
    // `default_transaction_read_only` may be the session's own `SET` (kept
    // under `reset = never`): the query reads the server's value.
    let role = match tap.role() {
        Some(role) if role.standby => Ok(role),
        _ => timeout(pool.config.connect_timeout, query_role(&conn.raw))
            .await
            .unwrap_or_else(|_| Err(Error::connect("the role query timed out"))),
    };
    let role = match role {
        Ok(role) => role,
        Err(e) => {
            tracing::warn!(pool = %pool.label, error = %e, "could not read the server's role after a read-only error; connection closed");
            return false;
        }
    };
    let attrs = pool.hosts.attrs;
    if !attrs.accepts(role) {
        let server = &pool.hosts.entry(conn.host).server;
        pool.retire_host(
            conn.host,
            conn.host_generation,
            &format!("{server} is {role} now, and target_session_attrs = {attrs}"),
        );
    } else if !attrs.prefers(role) {
        let server = &pool.hosts.entry(conn.host).server;
        if pool.hosts.is_read_side() {
            // A standby of the read side was promoted: reads go to the
            // other standbys, and back to it only as the fallback.
            pool.retire_host(
                conn.host,
                conn.host_generation,
                &format!("{server} is {role} now, and reads go to standbys"),
            );
        } else {
            // prefer-standby on a standby that was promoted: kept until a
            // standby accepts again.
            pool.hosts.on_fallback(true);
        }
    }
    true
}
