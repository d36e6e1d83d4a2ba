//! What server a connection is on: its role (primary or standby, read-only
//! or not) and how far a standby lags behind its primary.

use std::time::Duration;

use super::RawConn;
use crate::address::Role;
use crate::error::{Error, Result};

/// Why a standby `lag` behind is left, for `max_replication_lag = max`.
pub(crate) fn lag_text(lag: Duration, max: Duration) -> String {
    format!(
        "it is {:.1} s behind its primary, more than max_replication_lag = {}",
        lag.as_secs_f64(),
        humantime::format_duration(max)
    )
}

/// How far the standby `raw` is on lags behind its primary: zero when it
/// has replayed all the WAL it received (or is no standby), else the time
/// since the last transaction it replayed (a primary with no writes does
/// not make a caught-up standby look behind).
///
/// A standby that was idle and has just received WAL looks as far behind
/// as its idle time for the moment replay takes; a second sample 100 ms
/// later tells the two apart (the smaller one is taken).
pub(crate) async fn replication_lag(raw: &RawConn) -> Result<Duration> {
    let first = lag_sample(raw).await?;
    if first.is_zero() {
        return Ok(first);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(lag_sample(raw).await?.min(first))
}

/// One sample of [`replication_lag`].
async fn lag_sample(raw: &RawConn) -> Result<Duration> {
    let messages = raw
        .client
        .simple_query(
            "SELECT CASE WHEN NOT pg_catalog.pg_is_in_recovery() \
                 OR pg_catalog.pg_last_wal_receive_lsn() = pg_catalog.pg_last_wal_replay_lsn() \
             THEN 0 ELSE coalesce(extract(epoch FROM now() - pg_catalog.pg_last_xact_replay_timestamp()), 0) \
             END::float8",
        )
        .await?;
    let seconds = messages.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => {
            row.get(0).and_then(|v| v.parse::<f64>().ok())
        }
        _ => None,
    });
    seconds
        .map(|s| Duration::from_secs_f64(s.max(0.0)))
        .ok_or_else(|| {
            Error::connect("the server answered the replication lag query with no number")
        })
}

/// The role of the server `raw` is on: from what it reported at start-up
/// (PostgreSQL 14+), else asked in one query, as libpq asks.
pub(crate) async fn role_of(raw: &RawConn) -> Result<Role> {
    if let Some(role) = raw.tap.role() {
        return Ok(role);
    }
    query_role(raw).await
}

/// The role of the server `raw` is on, asked in one simple query (which a
/// pooler in transaction mode runs on one server connection). The
/// server's `default_transaction_read_only` is its `reset_val`, what the
/// session would have without a `SET` of its own.
pub(crate) async fn query_role(raw: &RawConn) -> Result<Role> {
    let messages = raw
        .client
        .simple_query(
            "SELECT pg_catalog.pg_is_in_recovery(), (SELECT reset_val \
             FROM pg_catalog.pg_settings WHERE name = 'default_transaction_read_only')",
        )
        .await?;
    messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(Role {
                standby: row.get(0) == Some("t"),
                default_read_only: row.get(1) == Some("on"),
            }),
            _ => None,
        })
        .ok_or_else(|| Error::connect("the server answered the role query with no row"))
}
