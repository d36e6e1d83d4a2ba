//! A session's life in the pool beyond the connection itself: what a new
//! connection is given before its first use (`set_up`), and what a
//! returned one must send so that the next borrower finds a clean session
//! (`reset_needed`, `reset_sql`).

use crate::config::{PoolConfig, Pooler, Reset};
use crate::conn::sql::Effects;
use crate::conn::{self, RawConn};
use crate::error::{Error, Result};

/// Prepares a new connection for its first borrower: behind a session
/// pooler, the settings that start-up options give a direct connection,
/// sent at once even when there are none, so that the pooler assigns a
/// server connection now (within `connect_timeout`), not while a borrower
/// waits for its first statement; then the `after_connect` hook. A failure
/// discards the connection and counts as a failed connect.
pub(crate) async fn set_up(config: &PoolConfig, label: &str, raw: &RawConn) -> Result<()> {
    if config.pooler == Pooler::Session {
        let sql = conn::session_settings(config).unwrap_or_default();
        raw.client.batch_execute(&sql).await.map_err(|e| {
            let db = Error::from(e);
            Error::connect(format!(
                "could not apply server_settings / command_timeout to a new connection to {}: {db}",
                label
            ))
            .with_code(db.code().map(str::to_owned))
        })?;
    }
    after_connect(config, label, raw).await?;
    // What the set-up sent is the pool's own, not a borrower's.
    raw.tap.take_effects();
    Ok(())
}

/// Runs the `after_connect` hook, if any, on `raw`.
pub(crate) async fn after_connect(config: &PoolConfig, label: &str, raw: &RawConn) -> Result<()> {
    let Some(hook) = &config.hooks.after_connect else {
        return Ok(());
    };
    hook(&raw.client).await.map_err(|e| {
        // A statement's error in the server's words, with its SQLSTATE.
        let (why, code) = match e.downcast::<tokio_postgres::Error>() {
            Ok(pg) => {
                let db = Error::from(*pg);
                (db.to_string(), db.code().map(str::to_owned))
            }
            Err(other) => (crate::error::report(&*other), None),
        };
        Error::connect(format!(
            "the after_connect hook failed on a new connection to {label}: {why}"
        ))
        .with_code(code)
    })
}

/// The session state a returned connection must have reset, from what the
/// tap saw and the `reset` setting; `None` when nothing is to be sent.
pub(crate) fn reset_needed(config: &PoolConfig, seen: Effects) -> Option<Effects> {
    if config.pooler == Pooler::Transaction {
        // No session survives a transaction: nothing to reset, nothing to
        // send to whichever server the pooler picks.
        return None;
    }
    match config.reset {
        Reset::Never => None,
        Reset::Always => Some(Effects::ALL),
        Reset::Auto => seen.needs_reset().then_some(seen),
    }
}

/// The statements that reset `effects`, in one simple query (see
/// [`Reset`] for the table).
pub(crate) fn reset_sql(config: &PoolConfig, effects: Effects) -> String {
    let mut sql = String::new();
    if effects.contains(Effects::CURSOR) {
        sql.push_str("CLOSE ALL; ");
    }
    if effects.contains(Effects::SETTINGS) {
        sql.push_str("SET SESSION AUTHORIZATION DEFAULT; RESET ALL; ");
        if let Some(settings) = conn::session_settings(config) {
            sql.push_str(&settings);
        }
    }
    if effects.contains(Effects::LISTEN) {
        sql.push_str("UNLISTEN *; ");
    }
    if effects.contains(Effects::ADVISORY) {
        sql.push_str("SELECT pg_advisory_unlock_all(); ");
    }
    if effects.contains(Effects::TEMP) {
        sql.push_str("DISCARD TEMP; ");
    }
    if effects.contains(Effects::PREPARED) {
        sql.push_str("DEALLOCATE ALL; ");
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_sends_only_what_was_seen() {
        let config = PoolConfig::default();
        assert_eq!(reset_needed(&config, Effects::NONE), None);
        assert_eq!(reset_needed(&config, Effects::DROPPED_STATEMENTS), None);
        let seen = Effects::LISTEN | Effects::ADVISORY;
        assert_eq!(reset_needed(&config, seen), Some(seen));
        assert_eq!(
            reset_sql(&config, seen),
            "UNLISTEN *; SELECT pg_advisory_unlock_all(); "
        );
        let always = PoolConfig {
            reset: Reset::Always,
            ..PoolConfig::default()
        };
        assert_eq!(reset_needed(&always, Effects::NONE), Some(Effects::ALL));
        let never = PoolConfig {
            reset: Reset::Never,
            ..PoolConfig::default()
        };
        assert_eq!(reset_needed(&never, seen), None);
        let pooled = PoolConfig {
            pooler: Pooler::Transaction,
            reset: Reset::Always,
            ..PoolConfig::default()
        };
        assert_eq!(reset_needed(&pooled, seen), None);
    }

    #[test]
    fn behind_a_session_pooler_settings_come_back_after_reset_all() {
        let config = PoolConfig {
            pooler: Pooler::Session,
            server_settings: [("work_mem".to_owned(), "8MB".to_owned())].into(),
            ..PoolConfig::default()
        };
        assert_eq!(
            reset_sql(&config, Effects::SETTINGS),
            "SET SESSION AUTHORIZATION DEFAULT; RESET ALL; SET work_mem = E'8MB'; "
        );
    }
}
