//! What a server budget reports: where it came from, how `auto` derived
//! it, and its statistics.

use std::collections::BTreeMap;

use super::replicas::ReplicaStats;
use crate::config::BudgetMode;

/// How an `auto` budget was derived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Derivation {
    /// The server's `max_connections`.
    pub max_connections: u32,
    /// `superuser_reserved_connections`.
    pub superuser_reserved_connections: u32,
    /// `reserved_connections` (PostgreSQL 16+; 0 before).
    pub reserved_connections: u32,
    /// Headroom left for other clients.
    pub headroom: u32,
    /// The fixed count of replicas the budget is divided by (`replicas:
    /// N`); 1 with `replicas: auto`, whose split by demand between the live
    /// replicas is in [`BudgetStats::replicas`].
    pub replicas: u32,
    /// The result: `(max - reserved - headroom) / replicas`, at least 1.
    pub budget: u32,
}

impl Derivation {
    pub(crate) fn new(
        max_connections: u32,
        superuser_reserved: u32,
        reserved: u32,
        headroom: u32,
        replicas: u32,
    ) -> Self {
        let usable = max_connections
            .saturating_sub(superuser_reserved)
            .saturating_sub(reserved)
            .saturating_sub(headroom);
        Derivation {
            max_connections,
            superuser_reserved_connections: superuser_reserved,
            reserved_connections: reserved,
            headroom,
            replicas,
            budget: (usable / replicas.max(1)).max(1),
        }
    }
}

/// Where a server budget came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "snake_case")
)]
#[non_exhaustive]
pub enum BudgetSource {
    /// A number in the configuration.
    Configured,
    /// `auto`, derived from the server's `max_connections` and reserved
    /// slots (see [`BudgetStats::derivation`]).
    ServerSettings,
    /// `auto`, not derived yet: the first connection reads the settings.
    NotYetDerived,
    /// `auto` on a pooler (a pool with `pooler` set): not derived, since
    /// the pooler limits this process's connections; the pools' `max_size`
    /// bound them.
    BehindPooler,
    /// `off`: no budget.
    Off,
}

/// Statistics of one server budget.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct BudgetStats {
    /// `host:port` of the server.
    pub server: String,
    /// How the budget is set.
    pub mode: BudgetMode,
    /// Where the budget in force came from.
    pub source: BudgetSource,
    /// The configured or derived budget (`None` until `auto` is derived).
    pub budget: Option<u32>,
    /// What may be used now (lower than `budget` after refusals).
    pub capacity: Option<u32>,
    /// How `auto` derived the budget.
    pub derivation: Option<Derivation>,
    /// Units held (open connections plus connects in progress).
    pub in_use: u32,
    /// Pool connects waiting for a unit.
    pub waiting: usize,
    /// Units held per pool (masked URL).
    pub pools: BTreeMap<String, u32>,
    /// Idle connections closed in other pools to free units.
    pub reclaims: u64,
    /// Connections the server refused with 53300 (too many clients).
    pub refusals: u64,
    /// Connects that had to wait for a unit.
    pub waits: u64,
    /// `replicas: auto`: the replicas seen on the server and this
    /// replica's share (`capacity` is then at most the share minus the
    /// coordinator's own connection).
    pub replicas: Option<ReplicaStats>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_budget_subtracts_reserved_and_headroom_and_divides_by_replicas() {
        let d = Derivation::new(100, 3, 0, 5, 2);
        assert_eq!(d.budget, 46);
        let d = Derivation::new(20, 3, 2, 3, 1);
        assert_eq!(d.budget, 12);
        assert_eq!(Derivation::new(5, 3, 0, 10, 4).budget, 1, "never zero");
    }
}
