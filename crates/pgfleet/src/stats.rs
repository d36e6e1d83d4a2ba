//! Pool statistics: lock-free counters and timing histograms recorded on the
//! hot path, and the serialisable snapshot [`PoolStats`] read from them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
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
    #[cfg_attr(feature = "serde", serde(skip))]
    pub buckets: Vec<u64>,
}

/// Defines every counter of a pool once: the atomic in [`Counters`], the
/// field of [`CounterStats`] (with its doc, which is also its metric's
/// help), the snapshot, and the list metrics read. Connections closed are
/// counted by [`CloseReason`], one field per reason.
macro_rules! counters {
    (
        counters { $( $(#[doc = $doc:literal])+ $name:ident, )* }
        closed { $( $(#[doc = $cdoc:literal])+ $reason:ident => $field:ident, $label:literal; )* }
    ) => {
        /// Why a connection was closed.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub(crate) enum CloseReason {
            $( $(#[doc = $cdoc])+ $reason, )*
        }

        /// Counters of one pool, updated without locks.
        #[derive(Debug)]
        pub(crate) struct Counters {
            $( pub(crate) $name: AtomicU64, )*
            /// Connections closed, by [`CloseReason`].
            closed: [AtomicU64; CloseReason::ALL.len()],
            /// Time `get()` callers waited; its count is the `acquires`.
            pub(crate) wait: Histogram,
            /// Time connections were held.
            pub(crate) hold: Histogram,
            /// Time to open a connection.
            pub(crate) connect: Histogram,
        }

        /// Counters since the pool was created.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        #[cfg_attr(feature = "serde", derive(serde::Serialize))]
        #[non_exhaustive]
        pub struct CounterStats {
            /// Successful `get()` calls.
            pub acquires: u64,
            $( $(#[doc = $doc])+ pub $name: u64, )*
            $( $(#[doc = $cdoc])+ pub $field: u64, )*
        }

        impl CloseReason {
            /// Every reason, in the order of the counters.
            const ALL: [CloseReason; [$( stringify!($reason) ),*].len()] = [$( CloseReason::$reason ),*];

        }

        impl Counters {
            pub(crate) fn new() -> Self {
                Counters {
                    $( $name: AtomicU64::new(0), )*
                    closed: std::array::from_fn(|_| AtomicU64::new(0)),
                    wait: Histogram::new(),
                    hold: Histogram::new(),
                    connect: Histogram::new(),
                }
            }

            pub(crate) fn snapshot(&self) -> CounterStats {
                let closed = |reason: CloseReason| self.closed[reason as usize].load(Ordering::Relaxed);
                CounterStats {
                    // Every successful acquire records its wait.
                    acquires: self.wait.count(),
                    $( $name: self.$name.load(Ordering::Relaxed), )*
                    $( $field: closed(CloseReason::$reason), )*
                }
            }
        }

        impl CounterStats {
            /// Every counter but the closed ones, as (name, help, value): the
            /// name is the field's, the help its doc. For exporting to a
            /// metrics system (`FleetMetrics` names its counters so).
            pub fn each(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![
                    ("acquires", "Successful `get()` calls.", self.acquires),
                    $( (stringify!($name), concat!($($doc),+), self.$name), )*
                ]
            }

            /// Connections closed, as (reason, value); the reasons are
            /// `lifetime`, `idle`, `broken`, `dirty`, `max_queries`,
            /// `shutdown`, `reclaimed`, `resized`, `drained`, `hook`,
            /// `failover`.
            pub fn closed(&self) -> Vec<(&'static str, u64)> {
                vec![ $( ($label, self.$field), )* ]
            }
        }
    };
}

counters! {
    counters {
        /// Successful `get()` calls that had to wait for a connection.
        acquires_waited,
        /// `get()` and `shared()` calls that timed out.
        acquires_timed_out,
        /// `get()` and `shared()` calls turned away at once because
        /// `max_waiting` callers were waiting already.
        acquires_rejected,
        /// Connections opened.
        connections_created,
        /// Failed attempts to open a connection.
        connect_errors,
        /// Connect attempts the server refused with 53300 (too many clients).
        connections_refused,
        /// Connections returned inside a transaction and rolled back.
        dirty_returns,
        /// Returned connections whose session state (SET, LISTEN, advisory
        /// locks, temporary tables, PREPARE, WITH HOLD cursors) was reset
        /// before the next borrower (`reset`).
        session_resets,
        /// Round-trip health checks run on connections that sat idle.
        health_checks,
        /// Connections held longer than `leak_threshold`.
        leaks_reported,
        /// Leases handed out in shared mode (`Pool::shared`).
        shared_leases,
        /// Statements prepared by `prepare_cached` because the connection had
        /// none cached for the text (cache misses).
        statements_prepared,
        /// `prepare_cached` calls served from a connection's statement cache.
        statement_cache_hits,
        /// Statements run by the statement methods on the pool
        /// (`Pool::query` and the rest) on a lane, pipelined with others.
        statements_pipelined,
        /// Statements run by the statement methods on a connection of their
        /// own, because they may not be pipelined (transaction control,
        /// session state, COPY, several statements in one text).
        statements_exclusive,
        /// CancelRequests sent for statements whose caller left (a per-call
        /// timeout, a dropped future) while they ran on a lane.
        statements_cancelled,
        /// Statements of the statement methods run again because a cancel
        /// meant for another statement on their lane aborted them.
        statements_retried,
        /// Times the pool moved to another host of its target (the one it
        /// was on went away or stopped matching `target_session_attrs`).
        failovers,
    }
    closed {
        /// Connections closed for reaching `max_lifetime`.
        Lifetime => connections_closed_lifetime, "lifetime";
        /// Connections above the floor closed after `idle_timeout`.
        Idle => connections_closed_idle, "idle";
        /// Connections found broken (closed socket, FATAL, failed health
        /// check).
        Broken => connections_closed_broken, "broken";
        /// Connections discarded because they came back dirty and could not
        /// be cleaned (request still running, failed rollback).
        Dirty => connections_closed_dirty, "dirty";
        /// Connections closed after `max_queries` statements.
        MaxQueries => connections_closed_max_queries, "max_queries";
        /// Connections closed because the pool closed.
        Shutdown => connections_closed_shutdown, "shutdown";
        /// Idle connections closed to free server-budget units for another
        /// pool.
        Reclaimed => connections_closed_reclaimed, "reclaimed";
        /// Connections closed because the pool was resized below them.
        Resized => connections_closed_resized, "resized";
        /// Connections replaced by `drain` (new credentials, say).
        Drained => connections_closed_drained, "drained";
        /// Connections a `before_acquire` or `after_release` hook turned
        /// down.
        Hook => connections_closed_hook, "hook";
        /// Connections on a host the pool left: it went away, or stopped
        /// matching `target_session_attrs`.
        Failover => connections_closed_failover, "failover";
    }
}

impl Counters {
    /// Counts a connection closed for `reason`.
    pub(crate) fn closed(&self, reason: CloseReason) {
        self.closed[reason as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// Gauges: the pool right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
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
    /// Lanes in service for the statement methods on the pool
    /// (`Pool::query` and the rest); they count in `in_use` too.
    pub lanes: u32,
}

/// Timings of one pool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Timings {
    /// Time `get()` callers waited (all successful acquires).
    pub wait: TimingStats,
    /// Time connections were held by callers.
    pub hold: TimingStats,
    /// Time to open a connection.
    pub connect: TimingStats,
}

/// Everything about one pool at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct PoolStats {
    /// The pool's target, password masked.
    pub url: String,
    /// Warm floor (`min_size`).
    pub min_size: u32,
    /// Hard cap (`max_size`).
    pub max_size: u32,
    /// Acquire timeout in seconds (`timeout`, the seed's name, in JSON).
    #[cfg_attr(feature = "serde", serde(rename = "timeout"))]
    pub timeout_s: f64,
    /// Max lifetime in seconds, if any (`recycle`, the seed's name, in
    /// JSON).
    #[cfg_attr(feature = "serde", serde(rename = "recycle"))]
    pub recycle_s: Option<f64>,
    /// Live handles to the pool: those of its fleet for a fleet pool (the
    /// same count as [`PoolHandle::active_references`]), 0 for a pool made
    /// with `Pool::new`.
    ///
    /// [`PoolHandle::active_references`]: crate::PoolHandle::active_references
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
    /// The pool's server (`host:port`): with `load_balance_hosts =
    /// disable`, the one new connections go to first; with `random` and for
    /// a read side, where the last connection landed. `None` before the
    /// first connection and after that server was left.
    pub host: Option<String>,
    /// Every host of the target with the pool's connections open there now.
    pub hosts: Vec<HostStats>,
}

/// One host of a pool's target.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct HostStats {
    /// `host:port`.
    pub server: String,
    /// The pool's connections open on it.
    pub connections: u32,
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
