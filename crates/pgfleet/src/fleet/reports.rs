//! What the fleet reports: statistics of all its pools and budgets, and the
//! outcomes of warm-up and shutdown.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::budget::BudgetStats;
use crate::error::{Error, Result};
use crate::stats::PoolStats;

/// Statistics of a whole fleet.
#[derive(Debug, Clone, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct FleetStats {
    /// Per pool, keyed by masked URL.
    pub pools: BTreeMap<String, PoolStats>,
    /// Per server budget, keyed by `host:port`.
    pub servers: BTreeMap<String, BudgetStats>,
}

/// What [`Fleet::warmup`](crate::Fleet::warmup) did for each target.
#[derive(Debug)]
#[non_exhaustive]
pub struct WarmupReport {
    /// One per target, in completion order.
    pub outcomes: Vec<WarmupOutcome>,
}

/// Warm-up of one target.
#[derive(Debug)]
#[non_exhaustive]
pub struct WarmupOutcome {
    /// The target, password masked.
    pub url: String,
    /// How long the warm floor took to open, or why it failed.
    pub result: Result<Duration>,
}

impl WarmupReport {
    /// Whether every target warmed up.
    pub fn is_ok(&self) -> bool {
        self.outcomes.iter().all(|o| o.result.is_ok())
    }

    /// The targets that failed, with their errors.
    pub fn failures(&self) -> impl Iterator<Item = (&str, &Error)> {
        self.outcomes
            .iter()
            .filter_map(|o| o.result.as_ref().err().map(|e| (o.url.as_str(), e)))
    }
}

/// What [`Fleet::close_all`](crate::Fleet::close_all) did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct CloseReport {
    /// Pools closed by this call.
    pub pools: usize,
    /// Connections still held by callers at the deadline, cut.
    pub connections_cut: usize,
}
