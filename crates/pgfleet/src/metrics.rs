//! Prometheus metrics of a fleet (feature `prometheus`): a
//! `prometheus-client` collector that reads [`Fleet::stats`] at each
//! scrape, labelled by masked pool URL (`pool`) and server (`server`).
//! Counter names and their help come from the one list of counters in
//! `stats.rs`.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::budget::{BudgetStats, ReplicaStats};
use crate::fleet::{Fleet, FleetStats};
use crate::stats::PoolStats;

/// The metrics of a fleet, read from its statistics at every scrape.
///
/// Register it in the application's registry, beside the application's own
/// metrics, or encode it alone:
///
/// ```no_run
/// # fn example(fleet: &pgfleet::Fleet) {
/// use pgfleet::prometheus_client::registry::Registry;
///
/// let mut registry = Registry::default();
/// pgfleet::FleetMetrics::new(fleet).register(&mut registry);
/// // ... the application's own metrics ...
/// let mut text = String::new();
/// pgfleet::prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
///
/// let alone: String = pgfleet::FleetMetrics::new(fleet).encode();
/// # let _ = (text, alone);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct FleetMetrics {
    fleet: Fleet,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabel {
    pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClosedLabel {
    pool: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerLabel {
    server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabel {
    pool: String,
    server: String,
}

/// The prefix of every metric name.
const PREFIX: &str = "pgfleet";

impl FleetMetrics {
    /// The metrics of `fleet` (a cheap clone of it).
    pub fn new(fleet: &Fleet) -> FleetMetrics {
        FleetMetrics {
            fleet: fleet.clone(),
        }
    }

    /// Registers these metrics in `registry`, under the prefix `pgfleet`.
    pub fn register(self, registry: &mut Registry) {
        registry
            .sub_registry_with_prefix(PREFIX)
            .register_collector(Box::new(self));
    }

    /// These metrics alone, in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut registry = Registry::default();
        self.clone().register(&mut registry);
        let mut out = String::new();
        // Writing to a String does not fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

impl Collector for FleetMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        encode_stats(&self.fleet.stats(), &mut encoder)
    }
}

fn as_i64<T: TryInto<i64>>(v: T) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

/// Writes one metric family.
fn emit(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    family: &impl EncodeMetric,
) -> Result<(), fmt::Error> {
    family.encode(encoder.encode_descriptor(name, help, None, family.metric_type())?)
}

/// A gauge per pool.
fn pool_gauge(stats: &FleetStats, get: impl Fn(&PoolStats) -> i64) -> Family<PoolLabel, Gauge> {
    let family = Family::<PoolLabel, Gauge>::default();
    for (url, pool) in &stats.pools {
        family
            .get_or_create(&PoolLabel { pool: url.clone() })
            .set(get(pool));
    }
    family
}

/// A gauge or counter per server budget.
fn server_family<M: Default + Clone>(
    stats: &FleetStats,
    set: impl Fn(&M, &BudgetStats),
) -> Family<ServerLabel, M> {
    let family = Family::<ServerLabel, M>::default();
    for (server, budget) in &stats.servers {
        set(
            &family.get_or_create(&ServerLabel {
                server: server.clone(),
            }),
            budget,
        );
    }
    family
}

fn encode_stats(stats: &FleetStats, encoder: &mut DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
    encode_gauges(stats, encoder)?;
    encode_counters(stats, encoder)?;
    encode_timings(stats, encoder)?;
    encode_budgets(stats, encoder)
}

/// The pools' gauges: sizes now and as configured.
fn encode_gauges(
    stats: &FleetStats,
    encoder: &mut DescriptorEncoder<'_>,
) -> Result<(), fmt::Error> {
    type PoolGauge = (&'static str, &'static str, fn(&PoolStats) -> i64);
    let gauges: [PoolGauge; 10] = [
        ("pool_size", "Open plus opening connections", |p| {
            as_i64(p.gauges.size)
        }),
        ("pool_idle", "Idle connections", |p| as_i64(p.gauges.idle)),
        ("pool_in_use", "Connections handed out", |p| {
            as_i64(p.gauges.in_use)
        }),
        ("pool_waiting", "Callers waiting for a connection", |p| {
            as_i64(p.gauges.waiting)
        }),
        ("pool_connecting", "Connections being opened", |p| {
            as_i64(p.gauges.connecting)
        }),
        ("pool_min_size", "Configured warm floor", |p| {
            as_i64(p.min_size)
        }),
        ("pool_max_size", "Configured hard cap", |p| {
            as_i64(p.max_size)
        }),
        ("pool_active_references", "Live handles to the pool", |p| {
            as_i64(p.active_references)
        }),
        (
            "pool_shared_connections",
            "Connections in service for shared mode",
            |p| as_i64(p.gauges.shared),
        ),
        (
            "pool_statement_lanes",
            "Connections in service as lanes of the statement methods",
            |p| as_i64(p.gauges.lanes),
        ),
    ];
    for (name, help, get) in gauges {
        emit(encoder, name, help, &pool_gauge(stats, get))?;
    }
    let connections = Family::<HostLabel, Gauge>::default();
    let current = Family::<HostLabel, Gauge>::default();
    for (url, pool) in &stats.pools {
        for host in &pool.hosts {
            let label = HostLabel {
                pool: url.clone(),
                server: host.server.clone(),
            };
            connections
                .get_or_create(&label)
                .set(as_i64(host.connections));
            let is_current = pool.host.as_deref() == Some(host.server.as_str());
            current.get_or_create(&label).set(i64::from(is_current));
        }
    }
    emit(
        encoder,
        "pool_host_connections",
        "The pool's connections open on each host of its target",
        &connections,
    )?;
    emit(
        encoder,
        "pool_host_current",
        "1 on the pool's host (PoolStats::host), 0 on the other hosts of its target",
        &current,
    )
}

/// One family per counter of `CounterStats`, named after it, and the
/// connections closed by reason.
fn encode_counters(
    stats: &FleetStats,
    encoder: &mut DescriptorEncoder<'_>,
) -> Result<(), fmt::Error> {
    let mut counters: Vec<(&'static str, &'static str, Family<PoolLabel, Counter>)> = Vec::new();
    let closed = Family::<ClosedLabel, Counter>::default();
    for (url, pool) in &stats.pools {
        let label = PoolLabel { pool: url.clone() };
        for (i, (name, help, value)) in pool.counters.each().into_iter().enumerate() {
            if counters.len() <= i {
                counters.push((name, help, Family::default()));
            }
            counters[i].2.get_or_create(&label).inc_by(value);
        }
        for (reason, value) in pool.counters.closed() {
            closed
                .get_or_create(&ClosedLabel {
                    pool: url.clone(),
                    reason: reason.to_owned(),
                })
                .inc_by(value);
        }
    }
    for (name, help, family) in &counters {
        emit(encoder, name, help.trim(), family)?;
    }
    emit(
        encoder,
        "connections_closed",
        "Connections closed, by reason",
        &closed,
    )
}

/// Timings: total seconds and sample count per pool.
fn encode_timings(
    stats: &FleetStats,
    encoder: &mut DescriptorEncoder<'_>,
) -> Result<(), fmt::Error> {
    type Timing = (&'static str, fn(&PoolStats) -> &crate::stats::TimingStats);
    let timings: [Timing; 3] = [
        ("wait", |p| &p.timings.wait),
        ("hold", |p| &p.timings.hold),
        ("connect", |p| &p.timings.connect),
    ];
    for (name, get) in timings {
        let sum = Family::<PoolLabel, Counter<f64>>::default();
        let count = Family::<PoolLabel, Counter>::default();
        for (url, pool) in &stats.pools {
            let label = PoolLabel { pool: url.clone() };
            let t = get(pool);
            sum.get_or_create(&label).inc_by(t.sum_us as f64 / 1e6);
            count.get_or_create(&label).inc_by(t.count);
        }
        emit(
            encoder,
            &format!("{name}_seconds"),
            &format!("Total {name} time"),
            &sum,
        )?;
        emit(
            encoder,
            &format!("{name}_samples"),
            &format!("Number of {name} samples"),
            &count,
        )?;
    }
    Ok(())
}

/// The server budgets' gauges and counters.
fn encode_budgets(
    stats: &FleetStats,
    encoder: &mut DescriptorEncoder<'_>,
) -> Result<(), fmt::Error> {
    type ServerGauge = (&'static str, &'static str, fn(&BudgetStats) -> i64);
    let budget_gauges: [ServerGauge; 4] = [
        (
            "server_budget",
            "Connections this process may hold on the server (0 until auto is derived)",
            |b| as_i64(b.budget.unwrap_or(0)),
        ),
        (
            "server_capacity",
            "Budget usable now (lower after refusals)",
            |b| as_i64(b.capacity.unwrap_or(0)),
        ),
        ("server_in_use", "Budget units held", |b| as_i64(b.in_use)),
        (
            "server_waiting",
            "Connects waiting for a budget unit",
            |b| as_i64(b.waiting),
        ),
    ];
    for (name, help, get) in budget_gauges {
        let family = server_family::<Gauge>(stats, |g, b| {
            g.set(get(b));
        });
        emit(encoder, name, help, &family)?;
    }
    type ServerCounter = (&'static str, &'static str, fn(&BudgetStats) -> u64);
    let budget_counters: [ServerCounter; 2] = [
        (
            "server_reclaims",
            "Idle connections closed to free units for another pool",
            |b| b.reclaims,
        ),
        (
            "server_refusals",
            "Connects the server refused with 53300",
            |b| b.refusals,
        ),
    ];
    for (name, help, get) in budget_counters {
        let family = server_family::<Counter>(stats, |c, b| {
            c.inc_by(get(b));
        });
        emit(encoder, name, help, &family)?;
    }
    encode_replicas(stats, encoder)
}

/// `replicas: auto`: per server, the replicas seen and this one's share.
fn encode_replicas(
    stats: &FleetStats,
    encoder: &mut DescriptorEncoder<'_>,
) -> Result<(), fmt::Error> {
    if stats.servers.values().all(|b| b.replicas.is_none()) {
        return Ok(());
    }
    type ReplicaGauge = (&'static str, &'static str, fn(&ReplicaStats) -> i64);
    let gauges: [ReplicaGauge; 5] = [
        (
            "server_replicas_seen",
            "Live replicas of the service on the server, this one included (replicas: auto)",
            |r| as_i64(r.seen),
        ),
        (
            "server_replica_share",
            "This replica's share of the server's budget, its coordinator included",
            |r| as_i64(r.share),
        ),
        (
            "server_replica_tokens",
            "Tokens this replica holds on the server",
            |r| as_i64(r.tokens),
        ),
        (
            "server_replica_want",
            "Connections this replica asks for, as it publishes them",
            |r| as_i64(r.want),
        ),
        (
            "server_replica_joined",
            "1 while this replica's coordinator is connected and holds a token",
            |r| i64::from(r.joined),
        ),
    ];
    for (name, help, get) in gauges {
        let family = Family::<ServerLabel, Gauge>::default();
        for (server, budget) in &stats.servers {
            if let Some(replicas) = &budget.replicas {
                family
                    .get_or_create(&ServerLabel {
                        server: server.clone(),
                    })
                    .set(get(replicas));
            }
        }
        emit(encoder, name, help, &family)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A collector of a fixed snapshot, to test the encoding alone.
    #[derive(Debug)]
    struct Fixed(FleetStats);

    impl Collector for Fixed {
        fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
            encode_stats(&self.0, &mut encoder)
        }
    }

    #[test]
    fn pool_values_appear_labelled_by_masked_url() {
        let mut stats = FleetStats::default();
        let mut pool = PoolStats {
            url: "postgres://app:***@db:5432/x".into(),
            max_size: 20,
            ..PoolStats::default()
        };
        pool.gauges.size = 7;
        pool.counters.acquires = 42;
        pool.counters.connections_closed_idle = 3;
        pool.counters.statement_cache_hits = 5;
        pool.counters.failovers = 2;
        pool.host = Some("db2:5432".into());
        pool.hosts = vec![
            crate::stats::HostStats {
                server: "db:5432".into(),
                connections: 0,
            },
            crate::stats::HostStats {
                server: "db2:5432".into(),
                connections: 6,
            },
        ];
        stats.pools.insert(pool.url.clone(), pool);
        let mut registry = Registry::default();
        registry
            .sub_registry_with_prefix(PREFIX)
            .register_collector(Box::new(Fixed(stats)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("pgfleet_pool_size{pool=\"postgres://app:***@db:5432/x\"} 7"),
            "{text}"
        );
        assert!(
            text.contains("pgfleet_acquires_total{pool=\"postgres://app:***@db:5432/x\"} 42"),
            "{text}"
        );
        assert!(text.contains("pgfleet_connections_closed_total{pool=\"postgres://app:***@db:5432/x\",reason=\"idle\"} 3"), "{text}");
        assert!(
            text.contains(
                "pgfleet_statement_cache_hits_total{pool=\"postgres://app:***@db:5432/x\"} 5"
            ),
            "{text}"
        );
        assert!(
            text.contains("# HELP pgfleet_statement_cache_hits `prepare_cached` calls served from a connection's statement cache."),
            "{text}"
        );
        assert!(
            text.contains("pgfleet_pool_max_size{pool=\"postgres://app:***@db:5432/x\"} 20"),
            "{text}"
        );
        assert!(
            text.contains("pgfleet_failovers_total{pool=\"postgres://app:***@db:5432/x\"} 2"),
            "{text}"
        );
        assert!(text.contains("pgfleet_pool_host_connections{pool=\"postgres://app:***@db:5432/x\",server=\"db2:5432\"} 6"), "{text}");
        assert!(text.contains("pgfleet_pool_host_connections{pool=\"postgres://app:***@db:5432/x\",server=\"db:5432\"} 0"), "{text}");
        assert!(text.contains("pgfleet_pool_host_current{pool=\"postgres://app:***@db:5432/x\",server=\"db2:5432\"} 1"), "{text}");
        assert!(text.contains("pgfleet_pool_host_current{pool=\"postgres://app:***@db:5432/x\",server=\"db:5432\"} 0"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
