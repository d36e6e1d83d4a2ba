//! A session's life in the pool beyond the connection itself: what a new
//! connection is given before its first use (`set_up`).

use crate::config::{PoolConfig, Pooler};
use crate::conn::{self, RawConn};
use crate::error::{Error, Result};

/// Prepares a new connection for its first borrower: behind a session
/// pooler, the settings that start-up options give a direct connection,
/// sent at once even when there are none, so that the pooler assigns a
/// server connection now (within `connect_timeout`), not while a borrower
/// waits for its first statement. A failure discards the connection and
/// counts as a failed connect.
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
    Ok(())
}
