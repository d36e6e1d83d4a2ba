//! Server connection activity from `pg_stat_activity`: the sampling code of
//! `pgfleet monitor`, usable from tests and services.

use std::collections::BTreeMap;

use crate::budget::replicas::{parse_name, parse_tag, PREFIX};
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
    /// The replicas of services with `replicas: auto`: service, then
    /// instance id. A replica's pool connections carry its instance id in
    /// their `application_name` (`<name> #<code><instance>`); its coordinator
    /// publishes the service and its demand.
    pub by_replica: BTreeMap<String, BTreeMap<String, ReplicaActivity>>,
}

/// One replica of a service on the server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct ReplicaActivity {
    /// Its client connections, its coordinator included.
    pub connections: usize,
    /// What its coordinator says it wants (`None`: no coordinator seen).
    pub want: Option<u32>,
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
    let mut tagged: Vec<String> = Vec::new();
    for row in rows {
        out.total += 1;
        *out.by_state.entry(row.get(0)).or_default() += 1;
        *out.by_database.entry(row.get(1)).or_default() += 1;
        let app: String = row.get(2);
        if let Some((service, instance, want)) = coordinator(&app) {
            let replica = out
                .by_replica
                .entry(service.to_owned())
                .or_default()
                .entry(instance.to_owned())
                .or_default();
            replica.connections += 1;
            replica.want = Some(want);
        } else if let Some((_, _, instance)) = parse_tag(&app) {
            tagged.push(instance.to_owned());
        }
        *out.by_application.entry(app).or_default() += 1;
        out.max_connections = u32::try_from(row.get::<_, i32>(3)).unwrap_or(0);
    }
    // A pool connection counts under the service of its instance's
    // coordinator (or `(unknown)` when none was seen).
    for instance in tagged {
        let service = out
            .by_replica
            .iter()
            .find(|(_, instances)| instances.contains_key(&instance))
            .map_or_else(|| "(unknown)".to_owned(), |(service, _)| service.clone());
        out.by_replica
            .entry(service)
            .or_default()
            .entry(instance)
            .or_default()
            .connections += 1;
    }
    Ok(out)
}

/// A coordinator's `application_name`: `(service, instance, want)`.
fn coordinator(app: &str) -> Option<(&str, &str, u32)> {
    let rest = app.strip_prefix(PREFIX)?;
    let (service, _) = rest.split_once(' ')?;
    let (instance, want, _) = parse_name(app, service)?;
    Some((service, instance, want))
}
