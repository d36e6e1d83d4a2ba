//! Pool statistics: lock-free counters and timing histograms recorded on the
//! hot path, and the serialisable snapshot [`PoolStats`] read from them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// Why a connection was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// Older than `max_lifetime`.
    Lifetime,
    /// Idle above the floor for longer than `idle_timeout`.
    Idle,
    /// Socket closed, FATAL from the server, failed health check.
    Broken,
    /// Returned with a request in flight or a transaction that could not be
    /// rolled back.
    Dirty,
    /// Served `max_queries` statements.
    MaxQueries,
    /// The pool was closed.
    Shutdown,
    /// Closed while idle above the floor to free a unit of the server budget
    /// for another pool.
    Reclaimed,
}

/// A histogram of durations in power-of-two microsecond buckets, plus sum
/// and maximum. Recording is two relaxed atomic adds and a load (the count
/// is the sum of the buckets; the maximum is written only when it grows).
#[derive(Debug)]
pub(crate) struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    sum_us: AtomicU64,
    max_us: AtomicU64,
}

/// Bucket `i` holds durations in `[2^(i-1), 2^i)` microseconds (bucket 0:
/// under 1us); the last one is open-ended (about 36 minutes and up).
const BUCKETS: usize = 32;

impl Histogram {
    pub(crate) fn new() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
            max_us: AtomicU64::new(0),
        }
    }

    pub(crate) fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let bucket = ((u64::BITS - us.leading_zeros()) as usize).min(BUCKETS - 1);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        if us > 0 {
            self.sum_us.fetch_add(us, Ordering::Relaxed);
            if us > self.max_us.load(Ordering::Relaxed) {
                self.max_us.fetch_max(us, Ordering::Relaxed);
            }
        }
    }

    /// Samples recorded.
    pub(crate) fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    pub(crate) fn snapshot(&self) -> TimingStats {
        let buckets: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let count: u64 = buckets.iter().sum();
        let quantile = |q: f64| -> u64 {
            if count == 0 {
                return 0;
            }
            let rank = ((count as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, n) in buckets.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    // Upper bound of the bucket: a conservative estimate.
                    return if i == 0 { 1 } else { 1u64 << i };
                }
            }
            u64::MAX
        };
        let sum_us = self.sum_us.load(Ordering::Relaxed);
        TimingStats {
            count,
            sum_us,
            mean_us: sum_us.checked_div(count).unwrap_or(0),
            p50_us: quantile(0.50),
            p99_us: quantile(0.99),
            max_us: self.max_us.load(Ordering::Relaxed),
            buckets,
        }
    }
}

/// A snapshot of one timing histogram. Quantiles are upper bounds of
/// power-of-two buckets, so they are within 2x of the truth.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TimingStats {
    /// Number of samples.
    pub count: u64,
    /// Sum of all samples in microseconds.
    pub sum_us: u64,
    /// Mean in microseconds.
    pub mean_us: u64,
    /// Median (bucket upper bound) in microseconds.
    pub p50_us: u64,
    /// 99th percentile (bucket upper bound) in microseconds.
    pub p99_us: u64,
    /// Largest sample in microseconds.
    pub max_us: u64,
    /// Counts per bucket; bucket `i` holds samples below `2^i` microseconds
    /// (and at least `2^(i-1)`).
    #[serde(skip)]
    pub buckets: Vec<u64>,
}

/// Counters of one pool, updated without locks.
#[derive(Debug)]
pub(crate) struct Counters {
    pub(crate) acquires_waited: AtomicU64,
    pub(crate) acquires_timed_out: AtomicU64,
    pub(crate) connections_created: AtomicU64,
    pub(crate) connect_errors: AtomicU64,
    pub(crate) closed_lifetime: AtomicU64,
    pub(crate) closed_idle: AtomicU64,
    pub(crate) closed_broken: AtomicU64,
    pub(crate) closed_dirty: AtomicU64,
    pub(crate) closed_max_queries: AtomicU64,
    pub(crate) closed_shutdown: AtomicU64,
    pub(crate) closed_reclaimed: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
    pub(crate) dirty_returns: AtomicU64,
    pub(crate) health_checks: AtomicU64,
    pub(crate) leaks_reported: AtomicU64,
    pub(crate) shared_leases: AtomicU64,
    pub(crate) statements_prepared: AtomicU64,
    pub(crate) statement_cache_hits: AtomicU64,
    pub(crate) wait: Histogram,
    pub(crate) hold: Histogram,
    pub(crate) connect: Histogram,
}

impl Counters {
    pub(crate) fn new() -> Self {
        let z = || AtomicU64::new(0);
        Counters {
            acquires_waited: z(),
            acquires_timed_out: z(),
            connections_created: z(),
            connect_errors: z(),
            closed_lifetime: z(),
            closed_idle: z(),
            closed_broken: z(),
            closed_dirty: z(),
            closed_max_queries: z(),
            closed_shutdown: z(),
            closed_reclaimed: z(),
            connections_refused: z(),
            dirty_returns: z(),
            health_checks: z(),
            leaks_reported: z(),
            shared_leases: z(),
            statements_prepared: z(),
            statement_cache_hits: z(),
            wait: Histogram::new(),
            hold: Histogram::new(),
            connect: Histogram::new(),
        }
    }

    pub(crate) fn closed(&self, reason: CloseReason) {
        let counter = match reason {
            CloseReason::Lifetime => &self.closed_lifetime,
            CloseReason::Idle => &self.closed_idle,
            CloseReason::Broken => &self.closed_broken,
            CloseReason::Dirty => &self.closed_dirty,
            CloseReason::MaxQueries => &self.closed_max_queries,
            CloseReason::Shutdown => &self.closed_shutdown,
            CloseReason::Reclaimed => &self.closed_reclaimed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> CounterStats {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterStats {
            // Every successful acquire records its wait.
            acquires: self.wait.count(),
            acquires_waited: r(&self.acquires_waited),
            acquires_timed_out: r(&self.acquires_timed_out),
            connections_created: r(&self.connections_created),
            connect_errors: r(&self.connect_errors),
            connections_closed_lifetime: r(&self.closed_lifetime),
            connections_closed_idle: r(&self.closed_idle),
            connections_closed_broken: r(&self.closed_broken),
            connections_closed_dirty: r(&self.closed_dirty),
            connections_closed_max_queries: r(&self.closed_max_queries),
            connections_closed_shutdown: r(&self.closed_shutdown),
            connections_closed_reclaimed: r(&self.closed_reclaimed),
            connections_refused: r(&self.connections_refused),
            dirty_returns: r(&self.dirty_returns),
            health_checks: r(&self.health_checks),
            leaks_reported: r(&self.leaks_reported),
            shared_leases: r(&self.shared_leases),
            statements_prepared: r(&self.statements_prepared),
            statement_cache_hits: r(&self.statement_cache_hits),
        }
    }
}

/// Gauges: the pool right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Gauges {
    /// Open connections plus connections being opened.
    pub size: u32,
    /// Open connections waiting in the pool.
    pub idle: u32,
    /// Connections handed out (or being cleaned after their return).
    pub in_use: u32,
    /// Callers waiting in `get()`.
    pub waiting: u32,
    /// Connections being opened.
    pub connecting: u32,
    /// Connections in service for shared mode (`Pool::shared`); they count
    /// in `in_use`.
    pub shared: u32,
}

/// Counters since the pool was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CounterStats {
    /// Successful `get()` calls.
    pub acquires: u64,
    /// Successful `get()` calls that had to wait for a connection.
    pub acquires_waited: u64,
    /// `get()` calls that timed out.
    pub acquires_timed_out: u64,
    /// Connections opened.
    pub connections_created: u64,
    /// Failed attempts to open a connection.
    pub connect_errors: u64,
    /// Connections closed for reaching `max_lifetime`.
    pub connections_closed_lifetime: u64,
    /// Connections above the floor closed after `idle_timeout`.
    pub connections_closed_idle: u64,
    /// Connections found broken (closed socket, FATAL, failed health check).
    pub connections_closed_broken: u64,
    /// Connections discarded because they came back dirty and could not be
    /// cleaned (request still running, failed rollback).
    pub connections_closed_dirty: u64,
    /// Connections closed after `max_queries` statements.
    pub connections_closed_max_queries: u64,
    /// Connections closed because the pool closed.
    pub connections_closed_shutdown: u64,
    /// Idle connections closed to free server-budget units for another pool.
    pub connections_closed_reclaimed: u64,
    /// Connect attempts the server refused with 53300 (too many clients).
    pub connections_refused: u64,
    /// Connections returned inside a transaction and rolled back.
    pub dirty_returns: u64,
    /// Round-trip health checks run on connections that sat idle.
    pub health_checks: u64,
    /// Connections held longer than `leak_threshold`.
    pub leaks_reported: u64,
    /// Leases handed out in shared mode (`Pool::shared`).
    pub shared_leases: u64,
    /// Statements prepared by `prepare_cached` because the connection had
    /// none cached for the text (cache misses).
    pub statements_prepared: u64,
    /// `prepare_cached` calls served from a connection's statement cache.
    pub statement_cache_hits: u64,
}

/// Timings of one pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Timings {
    /// Time `get()` callers waited (all successful acquires).
    pub wait: TimingStats,
    /// Time connections were held by callers.
    pub hold: TimingStats,
    /// Time to open a connection.
    pub connect: TimingStats,
}

/// The configured bounds of a pool, as the seed's statistics show them.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Bounds {
    /// Warm floor.
    pub min_size: u32,
    /// Hard cap.
    pub max_size: u32,
    /// Acquire timeout in seconds.
    pub timeout: f64,
    /// Max lifetime in seconds, if any.
    pub recycle: Option<f64>,
}

/// Everything about one pool at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PoolStats {
    /// The pool's target, password masked.
    pub url: String,
    /// Warm floor (`min_size`).
    pub min_size: u32,
    /// Hard cap (`max_size`).
    pub max_size: u32,
    /// Acquire timeout in seconds.
    pub timeout: f64,
    /// Max lifetime in seconds, if any.
    pub recycle: Option<f64>,
    /// Live handles to the pool (fleet pools only).
    pub active_references: usize,
    /// Whether the pool is closed.
    pub pool_closed: bool,
    /// The pool right now.
    pub gauges: Gauges,
    /// Counters since creation.
    pub counters: CounterStats,
    /// Timings since creation.
    pub timings: Timings,
    /// The last connect error, if the most recent connect attempt failed.
    pub last_connect_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_bucket_upper_bounds() {
        let h = Histogram::new();
        for _ in 0..98 {
            h.record(Duration::from_micros(3));
        }
        h.record(Duration::from_micros(1000));
        h.record(Duration::from_micros(5000));
        let s = h.snapshot();
        assert_eq!(s.count, 100);
        assert_eq!(s.p50_us, 4);
        assert_eq!(s.p99_us, 1024);
        assert_eq!(s.max_us, 5000);
        assert_eq!(s.mean_us, (98 * 3 + 1000 + 5000) / 100);
    }

    #[test]
    fn empty_histogram_is_all_zero() {
        let s = Histogram::new().snapshot();
        assert_eq!((s.count, s.p50_us, s.p99_us, s.max_us), (0, 0, 0, 0));
    }
}
