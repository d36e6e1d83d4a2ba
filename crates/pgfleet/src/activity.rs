//! Server connection activity from `pg_stat_activity`: the sampling code of
//! `pgfleet monitor`, usable from tests and services.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// Client connections on a server at one moment, as `pg_stat_activity` shows
/// them (the sampling connection itself left out).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct ActivitySample {
    /// Client backends.
    pub total: usize,
    /// The server's `max_connections`.
    pub max_connections: u32,
    /// By state (`active`, `idle`, `idle in transaction`, ...).
    pub by_state: BTreeMap<String, usize>,
    /// By database.
    pub by_database: BTreeMap<String, usize>,
    /// By `application_name` (`(none)` when empty).
    pub by_application: BTreeMap<String, usize>,
}

impl ActivitySample {
    /// Connections whose `application_name` satisfies `is_ours`.
    pub fn count_applications(&self, is_ours: impl Fn(&str) -> bool) -> usize {
        self.by_application
            .iter()
            .filter(|(app, _)| is_ours(app))
            .map(|(_, n)| n)
            .sum()
    }
}

/// Reads `pg_stat_activity` once over `client`.
///
/// # Errors
/// `Connect` if the query fails (the message says which).
pub async fn sample(client: &tokio_postgres::Client) -> Result<ActivitySample> {
    let rows = client
        .query(
            "SELECT coalesce(state, '(unknown)'), coalesce(datname::text, '(none)'), \
                    coalesce(nullif(application_name, ''), '(none)'), \
                    current_setting('max_connections')::int \
             FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| Error::connect(format!("cannot read pg_stat_activity: {e}")).with_source(e))?;
    let mut out = ActivitySample::default();
    if rows.is_empty() {
        let row = client
            .query_one("SELECT current_setting('max_connections')::int", &[])
            .await
            .map_err(|e| {
                Error::connect(format!("cannot read max_connections: {e}")).with_source(e)
            })?;
        out.max_connections = u32::try_from(row.get::<_, i32>(0)).unwrap_or(0);
    }
    for row in rows {
        out.total += 1;
        *out.by_state.entry(row.get(0)).or_default() += 1;
        *out.by_database.entry(row.get(1)).or_default() += 1;
        *out.by_application.entry(row.get(2)).or_default() += 1;
        out.max_connections = u32::try_from(row.get::<_, i32>(3)).unwrap_or(0);
    }
    Ok(out)
}
