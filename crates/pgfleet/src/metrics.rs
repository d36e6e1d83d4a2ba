//! Prometheus metrics of a fleet, built from a [`FleetStats`] snapshot with
//! `prometheus-client` and labelled by masked pool URL (`pool`) and server
//! (`server`).
//!
//! ```no_run
//! # fn example(fleet: &pgfleet::Fleet) -> Result<(), std::fmt::Error> {
//! let mut registry = pgfleet::metrics::registry(&fleet.stats());
//! // ... register the application's own metrics ...
//! let text = pgfleet::metrics::encode(&registry)?; // text exposition format
//! # let _ = text;
//! # Ok(())
//! # }
//! ```

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::fleet::FleetStats;
use crate::stats::TimingStats;

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

fn gauge_family(registry: &mut Registry, name: &str, help: &str) -> Family<PoolLabel, Gauge> {
    let family = Family::<PoolLabel, Gauge>::default();
    registry.register(name, help, family.clone());
    family
}

fn counter_family(registry: &mut Registry, name: &str, help: &str) -> Family<PoolLabel, Counter> {
    let family = Family::<PoolLabel, Counter>::default();
    registry.register(name, help, family.clone());
    family
}

type PoolValue<T> = fn(&crate::PoolStats) -> T;
type BudgetValue<T> = fn(&crate::BudgetStats) -> T;
type PoolTiming = fn(&crate::PoolStats) -> &TimingStats;

fn as_i64<T: TryInto<i64>>(v: T) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

/// A registry (prefix `pgfleet`) holding the metrics of every pool and
/// server budget in `stats`.
pub fn registry(stats: &FleetStats) -> Registry {
    let mut registry = Registry::with_prefix("pgfleet");
    let gauges: Vec<(Family<PoolLabel, Gauge>, PoolValue<i64>)> = vec![
        (
            gauge_family(&mut registry, "pool_size", "Open plus opening connections"),
            |p| as_i64(p.gauges.size),
        ),
        (
            gauge_family(&mut registry, "pool_idle", "Idle connections"),
            |p| as_i64(p.gauges.idle),
        ),
        (
            gauge_family(&mut registry, "pool_in_use", "Connections handed out"),
            |p| as_i64(p.gauges.in_use),
        ),
        (
            gauge_family(
                &mut registry,
                "pool_waiting",
                "Callers waiting for a connection",
            ),
            |p| as_i64(p.gauges.waiting),
        ),
        (
            gauge_family(&mut registry, "pool_connecting", "Connections being opened"),
            |p| as_i64(p.gauges.connecting),
        ),
        (
            gauge_family(&mut registry, "pool_min_size", "Configured warm floor"),
            |p| as_i64(p.min_size),
        ),
        (
            gauge_family(&mut registry, "pool_max_size", "Configured hard cap"),
            |p| as_i64(p.max_size),
        ),
        (
            gauge_family(
                &mut registry,
                "pool_active_references",
                "Live handles to the pool",
            ),
            |p| as_i64(p.active_references),
        ),
        (
            gauge_family(
                &mut registry,
                "pool_shared_connections",
                "Connections in service for shared mode",
            ),
            |p| as_i64(p.gauges.shared),
        ),
    ];
    let counters: Vec<(Family<PoolLabel, Counter>, PoolValue<u64>)> = vec![
        (
            counter_family(&mut registry, "acquires", "Successful acquires"),
            |p| p.counters.acquires,
        ),
        (
            counter_family(&mut registry, "acquires_waited", "Acquires that waited"),
            |p| p.counters.acquires_waited,
        ),
        (
            counter_family(
                &mut registry,
                "acquires_timed_out",
                "Acquires that timed out",
            ),
            |p| p.counters.acquires_timed_out,
        ),
        (
            counter_family(&mut registry, "connections_created", "Connections opened"),
            |p| p.counters.connections_created,
        ),
        (
            counter_family(&mut registry, "connect_errors", "Failed connect attempts"),
            |p| p.counters.connect_errors,
        ),
        (
            counter_family(
                &mut registry,
                "connections_refused",
                "Connects refused with 53300",
            ),
            |p| p.counters.connections_refused,
        ),
        (
            counter_family(
                &mut registry,
                "dirty_returns",
                "Connections rolled back on return",
            ),
            |p| p.counters.dirty_returns,
        ),
        (
            counter_family(&mut registry, "health_checks", "Round-trip health checks"),
            |p| p.counters.health_checks,
        ),
        (
            counter_family(
                &mut registry,
                "leaks_reported",
                "Connections held past leak_threshold",
            ),
            |p| p.counters.leaks_reported,
        ),
        (
            counter_family(&mut registry, "shared_leases", "Leases in shared mode"),
            |p| p.counters.shared_leases,
        ),
        (
            counter_family(
                &mut registry,
                "statements_prepared",
                "Statements prepared on a statement-cache miss",
            ),
            |p| p.counters.statements_prepared,
        ),
        (
            counter_family(
                &mut registry,
                "statement_cache_hits",
                "prepare_cached calls served from the cache",
            ),
            |p| p.counters.statement_cache_hits,
        ),
    ];
    let closed = Family::<ClosedLabel, Counter>::default();
    registry.register(
        "connections_closed",
        "Connections closed, by reason",
        closed.clone(),
    );
    // Timings: total seconds and sample count per pool.
    let timings: [(&str, PoolTiming); 3] = [
        ("wait", |p| &p.timings.wait),
        ("hold", |p| &p.timings.hold),
        ("connect", |p| &p.timings.connect),
    ];
    let mut timing_families = Vec::new();
    for (name, get) in timings {
        let sum = Family::<PoolLabel, Counter<f64>>::default();
        let count = Family::<PoolLabel, Counter>::default();
        registry.register(
            format!("{name}_seconds"),
            format!("Total {name} time"),
            sum.clone(),
        );
        registry.register(
            format!("{name}_samples"),
            format!("Number of {name} samples"),
            count.clone(),
        );
        timing_families.push((sum, count, get));
    }
    for (url, pool) in &stats.pools {
        let label = PoolLabel { pool: url.clone() };
        for (family, get) in &gauges {
            family.get_or_create(&label).set(get(pool));
        }
        for (family, get) in &counters {
            family.get_or_create(&label).inc_by(get(pool));
        }
        let c = &pool.counters;
        for (reason, n) in [
            ("lifetime", c.connections_closed_lifetime),
            ("idle", c.connections_closed_idle),
            ("broken", c.connections_closed_broken),
            ("dirty", c.connections_closed_dirty),
            ("max_queries", c.connections_closed_max_queries),
            ("shutdown", c.connections_closed_shutdown),
            ("reclaimed", c.connections_closed_reclaimed),
        ] {
            closed
                .get_or_create(&ClosedLabel {
                    pool: url.clone(),
                    reason: reason.to_owned(),
                })
                .inc_by(n);
        }
        for (sum, count, get) in &timing_families {
            let t = get(pool);
            sum.get_or_create(&label).inc_by(t.sum_us as f64 / 1e6);
            count.get_or_create(&label).inc_by(t.count);
        }
    }
    let budget_gauges: Vec<(&str, &str, BudgetValue<i64>)> = vec![
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
    let budget_counters: Vec<(&str, &str, BudgetValue<u64>)> = vec![
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
    for (name, help, get) in budget_gauges {
        let family = Family::<ServerLabel, Gauge>::default();
        registry.register(name, help, family.clone());
        for (server, b) in &stats.servers {
            family
                .get_or_create(&ServerLabel {
                    server: server.clone(),
                })
                .set(get(b));
        }
    }
    for (name, help, get) in budget_counters {
        let family = Family::<ServerLabel, Counter>::default();
        registry.register(name, help, family.clone());
        for (server, b) in &stats.servers {
            family
                .get_or_create(&ServerLabel {
                    server: server.clone(),
                })
                .inc_by(get(b));
        }
    }
    registry
}

/// The registry in the Prometheus text exposition format.
///
/// # Errors
/// Only if formatting fails (it does not for a `String`).
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::PoolStats;

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
        stats.pools.insert(pool.url.clone(), pool);
        let text = encode(&registry(&stats)).unwrap();
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
            text.contains("pgfleet_pool_max_size{pool=\"postgres://app:***@db:5432/x\"} 20"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
