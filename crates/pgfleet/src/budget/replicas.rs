//! `replicas: auto`: the replicas of one service on one server find each
//! other through the server and split its budget between the live ones.
//!
//! The budget `B` of the server (`max_connections` minus the reserved slots
//! and the headroom) is cut into tokens: session advisory locks
//! `(key, 1..B-1)` of the service's key, plus one *door* `(key, 0)`. Each
//! replica holds its tokens on one connection of its own, the
//! coordinator, whose `application_name` publishes what it wants:
//!
//! ```text
//! pgfleet <service> <instance> w=<want> f=<floor>
//! ```
//!
//! * A replica opens a connection (or starts one) only with a token in
//!   hand, so the connections of all replicas, coordinators included, never
//!   exceed the tokens: `B - 1` regular ones and the door. A lock is
//!   exclusive on the server, so no race between replicas can hand a token
//!   out twice.
//! * A joiner takes the door, which only a joiner holds; its first tick
//!   takes tokens as the others' state allows, and it lets the door go once
//!   its tokens cover what it has open. A second joiner that finds the door
//!   taken closes its connection and tries again a little later.
//! * Every tick (200 ms, 100 ms when a pool waits) each replica publishes
//!   its demand and reads every replica's demand and tokens from
//!   `pg_stat_activity` and `pg_locks`, and computes the same water-filled
//!   split: floors first, then equal shares up to each replica's demand.
//!   It takes free tokens up to its share, and gives back tokens above it:
//!   idle connections close at once, in-use ones as they come back, and a
//!   token goes back one tick after its connection closed (its backend has
//!   gone by then).
//! * A replica that dies, even by SIGKILL, loses its coordinator: the
//!   server drops the backend and its locks, and the others take the tokens
//!   at their next tick.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::conn::RawConn;
use crate::error::Result;

/// How often a replica reads the others' demand and tokens.
pub(crate) const TICK: Duration = Duration::from_millis(200);

/// Opens the coordinator's connection with the given `application_name`,
/// with the settings of one of the server's pools.
pub(crate) type Connector = Arc<
    dyn Fn(String) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<RawConn>> + Send>>
        + Send
        + Sync,
>;

/// One replica as the last tick saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct ReplicaMember {
    /// Its instance id.
    pub instance: String,
    /// Connections it wants, its coordinator included.
    pub want: u32,
    /// Its warm floors plus its coordinator.
    pub floor: u32,
    /// Tokens it holds (connections it may have, its coordinator included).
    pub tokens: u32,
    /// Its share of the budget in the split.
    pub share: u32,
}

/// What `replicas: auto` sees and does on one server.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct ReplicaStats {
    /// The service the replicas share.
    pub service: String,
    /// This replica's instance id (in its connections' `application_name`).
    pub instance: String,
    /// Whether the coordinator's connection is up and holds a token.
    pub joined: bool,
    /// Live replicas of the service on the server, this one included.
    pub seen: u32,
    /// This replica's share (connections, its coordinator included).
    pub share: u32,
    /// Tokens it holds.
    pub tokens: u32,
    /// What it wants, as published.
    pub want: u32,
    /// The budget split between the replicas.
    pub budget: u32,
    /// Every replica seen, by instance id.
    pub members: Vec<ReplicaMember>,
    /// Ticks run.
    pub ticks: u64,
    /// Open connections of other replicas that their tokens do not cover
    /// (a replica that lost its coordinator, or has fewer tokens than
    /// connections): while there are any, no replica takes a token for
    /// growth, only to cover its own open connections.
    pub uncovered: u32,
    /// Why the coordinator is not joined, when it is not.
    pub last_error: Option<String>,
}

/// The coordination of one server budget: who this replica is, how its
/// coordinator connects, and what it last saw.
pub(crate) struct Coordination {
    pub(crate) service: String,
    pub(crate) instance: String,
    /// The first key of the service's advisory locks.
    pub(crate) key: i32,
    connectors: Mutex<Vec<(u64, Connector)>>,
    stats: Mutex<ReplicaStats>,
    started: AtomicBool,
    pub(crate) wake: Arc<tokio::sync::Notify>,
}

impl Coordination {
    pub(crate) fn new(service: String, instance: String) -> Coordination {
        Coordination {
            key: service_key(&service),
            stats: Mutex::new(ReplicaStats {
                service: service.clone(),
                instance: instance.clone(),
                ..ReplicaStats::default()
            }),
            service,
            instance,
            connectors: Mutex::new(Vec::new()),
            started: AtomicBool::new(false),
            wake: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// A pool on the server offers a way to connect; whether it is the
    /// first (the caller starts the coordinator then).
    pub(crate) fn offer(&self, pool_id: u64, connector: Connector) -> bool {
        self.connectors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((pool_id, connector));
        !self.started.swap(true, Ordering::SeqCst)
    }

    /// The coordinator task ended: the next offer starts another.
    pub(crate) fn stopped(&self) {
        self.started.store(false, Ordering::SeqCst);
    }

    /// The pool left: its connector goes.
    pub(crate) fn withdraw(&self, pool_id: u64) {
        self.connectors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(id, _)| *id != pool_id);
    }

    /// A pool waits for a unit: tick soon.
    pub(crate) fn nudge(&self) {
        self.wake.notify_one();
    }

    pub(crate) fn stats(&self) -> ReplicaStats {
        self.stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut ReplicaStats)) {
        f(&mut self.stats.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// The connector of the first pool on the server that is still open,
    /// with its pool's id.
    pub(crate) fn connector(&self) -> Option<(u64, Connector)> {
        self.connectors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .first()
            .cloned()
    }

    /// The service's key as 8 hex digits, in its pool connections' tags.
    pub(crate) fn code(&self) -> String {
        format!("{:08x}", self.key)
    }

    /// `pg` with the service's code and this replica's instance id
    /// appended to its `application_name` (`<name> #<code><instance>`, the
    /// name cut to fit 63 bytes, and in printable ASCII, which the server
    /// keeps as it is): the other replicas count a replica's connections by
    /// it, and a monitor tells the replicas apart.
    pub(crate) fn tag(&self, pg: &tokio_postgres::Config) -> tokio_postgres::Config {
        let mut pg = pg.clone();
        let room = 63 - TAG.len() - 16;
        let name: String = pg
            .get_application_name()
            .unwrap_or_default()
            .chars()
            .map(|c| if (' '..='~').contains(&c) { c } else { '_' })
            .take(room)
            .collect();
        let tagged = format!("{name}{TAG}{}{}", self.code(), self.instance);
        pg.application_name(&tagged);
        pg
    }

    /// The coordinator's `application_name`.
    pub(crate) fn name(&self, want: u32, floor: u32) -> String {
        format!(
            "{PREFIX}{} {} w={want} f={floor}",
            self.service, self.instance
        )
    }
}

/// How every coordinator's `application_name` starts.
pub(crate) const PREFIX: &str = "pgfleet ";
/// What comes between a pool connection's `application_name` and its
/// replica's instance id.
pub(crate) const TAG: &str = " #";

/// The tag at the end of a pool connection's `application_name`
/// (`<name> #<code><instance>`): the name before it, the service's code
/// and the instance id.
pub(crate) fn parse_tag(name: &str) -> Option<(&str, &str, &str)> {
    let (app, tag) = name.rsplit_once(TAG)?;
    (tag.len() == 16 && tag.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then(|| (app, &tag[..8], &tag[8..]))
}

/// The first advisory-lock key of a service: a stable hash of its name
/// (FNV-1a), kept positive so that `pg_locks.classid` shows it as is.
fn service_key(service: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in b"pgfleet/".iter().chain(service.as_bytes()) {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h & 0x7fff_ffff) as i32
}

/// Reads a coordinator's `application_name` of `service`:
/// `(instance, want, floor)`.
pub(crate) fn parse_name<'a>(name: &'a str, service: &str) -> Option<(&'a str, u32, u32)> {
    let rest = name.strip_prefix(PREFIX)?.strip_prefix(service)?;
    let mut words = rest.strip_prefix(' ')?.split(' ');
    let instance = words.next()?;
    let want = words.next()?.strip_prefix("w=")?.parse().ok()?;
    let floor = words.next()?.strip_prefix("f=")?.parse().ok()?;
    words.next().is_none().then_some((instance, want, floor))
}

/// The split of `total` tokens between replicas that each ask for
/// `(floor, want)`, in the order given (by instance id, the same order on
/// every replica): floors first, as far as they go; then water-filling, each
/// replica gets `max(floor, min(want, level))` at the highest level that
/// fits, and what is left goes one by one to the replicas at the level.
/// Tokens nobody wants stay free.
pub(crate) fn split(total: u32, asks: &[(u32, u32)]) -> Vec<u32> {
    let mut left = total;
    let base: Vec<u32> = asks
        .iter()
        .map(|&(floor, _)| {
            let give = floor.min(left);
            left -= give;
            give
        })
        .collect();
    let fill = |level: u32| -> u64 {
        asks.iter()
            .zip(&base)
            .map(|(&(_, want), &b)| u64::from(b.max(want.min(level))))
            .sum()
    };
    let (mut low, mut high) = (0u32, asks.iter().map(|a| a.1).max().unwrap_or(0));
    if fill(high) <= u64::from(total) {
        low = high;
    }
    while low < high {
        let mid = low + (high - low).div_ceil(2);
        if fill(mid) <= u64::from(total) {
            low = mid;
        } else {
            high = mid - 1;
        }
    }
    let mut shares: Vec<u32> = asks
        .iter()
        .zip(&base)
        .map(|(&(_, want), &b)| b.max(want.min(low)))
        .collect();
    let mut left = total.saturating_sub(shares.iter().sum());
    for (share, &(_, want)) in shares.iter_mut().zip(asks) {
        if left == 0 {
            break;
        }
        if *share == low && want > low {
            *share += 1;
            left -= 1;
        }
    }
    shares
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_gives_floors_first_then_equal_shares_up_to_each_want() {
        assert_eq!(split(23, &[(1, 21), (1, 21), (1, 21)]), vec![8, 8, 7]);
        // A quiet replica lends what it does not want.
        assert_eq!(split(23, &[(1, 2), (1, 21), (1, 21)]), vec![2, 11, 10]);
        // Floors before shares.
        assert_eq!(split(10, &[(6, 8), (1, 20)]), vec![6, 4]);
        // Floors that do not fit: in order, as far as they go.
        assert_eq!(split(5, &[(4, 4), (4, 4)]), vec![4, 1]);
        // Nobody wants the rest: it stays free.
        assert_eq!(split(30, &[(1, 3), (1, 5)]), vec![3, 5]);
        assert_eq!(split(0, &[(1, 3)]), vec![0]);
        // One busy replica beside quiet ones takes what they leave.
        assert_eq!(split(23, &[(1, 2), (1, 22), (1, 2)]), vec![2, 19, 2]);
        assert!(split(9, &[]).is_empty());
    }

    #[test]
    fn a_coordinator_name_is_read_back_for_its_service_only() {
        let c = Coordination::new("memory-api".into(), "0badcafe".into());
        let name = c.name(21, 3);
        assert_eq!(name, "pgfleet memory-api 0badcafe w=21 f=3");
        assert!(name.len() <= 63);
        assert_eq!(parse_name(&name, "memory-api"), Some(("0badcafe", 21, 3)));
        assert_eq!(parse_name(&name, "memory"), None);
        assert_eq!(parse_name("pgfleet memory-api x w=1", "memory-api"), None);
        assert_eq!(parse_name("psql", "memory-api"), None);
        let long = Coordination::new(
            "x".repeat(crate::config::MAX_SERVICE_LEN),
            "ffffffff".into(),
        );
        assert!(long.name(99_999, 99_999).len() <= 63);
    }

    #[test]
    fn pool_connections_carry_the_instance_within_63_bytes() {
        let c = Coordination::new("svc".into(), "0badcafe".into());
        let mut pg = tokio_postgres::Config::new();
        pg.application_name("memory-api");
        let tagged = c.tag(&pg);
        let name = tagged.get_application_name().unwrap();
        assert_eq!(name, format!("memory-api #{}0badcafe", c.code()));
        assert_eq!(
            parse_tag(name),
            Some(("memory-api", c.code().as_str(), "0badcafe"))
        );
        pg.application_name("é".repeat(31));
        let tagged = c.tag(&pg);
        let name = tagged.get_application_name().unwrap();
        assert!(name.len() <= 63 && name.is_ascii(), "{name}");
        assert!(
            name.starts_with("___") && name.ends_with("0badcafe"),
            "{name}"
        );
        assert_eq!(parse_tag("psql"), None);
        assert_eq!(parse_tag("a #b"), None);
        assert_eq!(parse_tag("a #0badcafe"), None, "no service code");
    }

    #[test]
    fn service_keys_are_stable_and_positive() {
        assert_eq!(service_key("memory-api"), service_key("memory-api"));
        assert_ne!(service_key("memory-api"), service_key("memory-apj"));
        assert!(service_key("anything") >= 0);
    }
}
