//! Server budgets: all pools of a fleet whose targets live on the same
//! server share one budget of physical connections, so the process can never
//! be the one that trips `FATAL: sorry, too many clients already`.
//!
//! Every open connection, and every connect in progress, holds one `Unit`
//! for its whole life. Floors are reserved: a pool below its `min_size` can
//! always get a unit, and pools above their floors can grow only into what
//! the others' floors leave free:
//!
//! ```text
//! sum over pools of max(units held, min_size)  <=  capacity
//! ```
//!
//! A pool that needs a unit while the budget is spent waits (FIFO among
//! pools above their floor) and asks the other pools on the server to close
//! an idle connection above their floor (reclaim). When the server refuses a
//! connection with 53300 anyway (other clients took the slots), the
//! effective capacity drops to what is open, and creeps back up by one unit a
//! second while probing.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio_postgres::Client;

use crate::config::{BudgetConfig, BudgetMode, Pooler, Replicas};
use crate::error::{Error, Result};

mod coordinator;
pub(crate) mod replicas;
mod share;
mod stats;

use self::replicas::Coordination;
pub use self::replicas::{ReplicaMember, ReplicaStats};
pub use self::stats::{BudgetSource, BudgetStats, Derivation};

/// What a budget may ask of a pool on its server: close one idle connection
/// above its floor, so that the unit it held can go to another pool. The
/// budget knows its pools through this alone.
pub(crate) trait Reclaim: Send + Sync {
    /// Closes the longest-idle connection on `server` if the pool is above
    /// its floor (or whatever its floor, with `below_floor`); whether one
    /// was closed.
    fn reclaim_idle(&self, server: &str, below_floor: bool) -> bool;

    /// What the pool asks of `server` now.
    fn demand(&self, server: &str) -> Asked;
}

/// What one pool asks of a server (`Reclaim::demand`).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Asked {
    /// Connections in use or being opened plus callers waiting, at most
    /// its `max_size`.
    pub(crate) demand: u32,
    /// Its warm floor.
    pub(crate) floor: u32,
    /// Its connections, open or being opened.
    pub(crate) open: u32,
}

/// How long the capacity stays lowered after a refusal before it probes one
/// unit higher.
const RECOVERY_STEP: Duration = Duration::from_secs(1);

/// The shared budget of one server.
pub(crate) struct ServerBudget {
    server: String,
    mode: BudgetMode,
    headroom: u32,
    replicas: u32,
    /// `replicas: auto`: the split with the other replicas.
    coordination: Option<Coordination>,
    /// More units are held than the limit allows: returned connections
    /// close (read without the lock on every return).
    over: AtomicBool,
    /// `replicas: auto` without a coordinator: no token covers this
    /// replica's connections, floors included; all of them close.
    lost: AtomicBool,
    state: Mutex<BudgetState>,
    reclaims: AtomicU64,
    refusals: AtomicU64,
    waits: AtomicU64,
}

struct Member {
    pool_id: u64,
    pool: Weak<dyn Reclaim>,
    label: String,
    min_size: u32,
    units: u32,
}

struct BudgetWaiter {
    pool_id: u64,
    above_floor: bool,
    tx: oneshot::Sender<Unit>,
}

struct BudgetState {
    /// Configured or derived; `None` until an `auto` budget is derived.
    target: Option<u32>,
    /// What may be used now: the target, or less after refusals.
    capacity: Option<u32>,
    derivation: Option<Derivation>,
    /// `replicas: auto`: what this replica may hold now, its share of the
    /// budget (`None` without coordination).
    share: Option<u32>,
    /// An `auto` budget lets one connection through to read the server's
    /// settings.
    probing: bool,
    /// `auto` on a server that is a pooler: never derived, no limit.
    behind_pooler: bool,
    in_use: u32,
    members: Vec<Member>,
    waiters: VecDeque<BudgetWaiter>,
    lowered_until: Option<Instant>,
}

/// One unit of a server budget; dropping it gives the unit back.
pub(crate) struct Unit {
    /// `None` once disarmed (given back by hand under the budget's lock).
    budget: Option<Arc<ServerBudget>>,
    pool_id: u64,
}

impl Unit {
    /// Whether the budget holds more units than it may now (see
    /// `ServerBudget::over`).
    pub(crate) fn over(&self) -> Option<bool> {
        self.budget.as_ref().and_then(|b| b.over())
    }
}

impl Drop for Unit {
    fn drop(&mut self) {
        if let Some(budget) = self.budget.take() {
            let mut st = budget.lock();
            st.give_back(self.pool_id);
            budget.update_over(&st);
            budget.grant_waiters(&mut st);
        }
    }
}

impl BudgetState {
    /// What may be held now: the capacity, and this replica's share.
    fn limit(&self) -> Option<u32> {
        match (self.capacity.or(self.target), self.share) {
            (Some(c), Some(s)) => Some(c.min(s)),
            (c, None) => c,
            (None, s) => s,
        }
    }

    /// A capacity lowered after a refusal climbs back one unit per
    /// `RECOVERY_STEP` since, up to the target, whether or not any pool
    /// asks (so that it has recovered by the time one needs it).
    fn recover(&mut self, now: Instant) {
        let (Some(target), Some(mut capacity)) = (self.target, self.capacity) else {
            return;
        };
        while capacity < target {
            match self.lowered_until {
                Some(t) if t <= now => {
                    capacity += 1;
                    self.lowered_until = Some(t + RECOVERY_STEP);
                }
                Some(_) => break,
                None => capacity = target,
            }
        }
        if capacity >= target {
            self.lowered_until = None;
        }
        self.capacity = Some(capacity);
    }

    fn give_back(&mut self, pool_id: u64) {
        self.in_use -= 1;
        if let Some(m) = self.members.iter_mut().find(|m| m.pool_id == pool_id) {
            m.units -= 1;
        }
        if self.target.is_none() {
            // The probe of an `auto` budget ended without deriving it.
            self.probing = false;
        }
    }
}

impl ServerBudget {
    /// The budget of `server`. With `replicas: auto` on an `auto` budget,
    /// this replica is `instance` of the configured service, or else of
    /// `default_service` (the first pool's `application_name`).
    pub(crate) fn new(
        server: String,
        config: &BudgetConfig,
        instance: &str,
        default_service: &str,
    ) -> Arc<Self> {
        let mode = config.mode_for(&server);
        let target = match mode {
            BudgetMode::Fixed(n) => Some(n),
            BudgetMode::Auto | BudgetMode::Off => None,
        };
        let coordination =
            (mode == BudgetMode::Auto && config.replicas == Replicas::Auto).then(|| {
                let service = config
                    .service
                    .clone()
                    .unwrap_or_else(|| service_from(default_service));
                Coordination::new(service, instance.to_owned())
            });
        Arc::new(ServerBudget {
            server,
            mode,
            headroom: config.headroom,
            replicas: match config.replicas {
                Replicas::Fixed(n) => n,
                Replicas::Auto => 1,
            },
            over: AtomicBool::new(false),
            lost: AtomicBool::new(false),
            state: Mutex::new(BudgetState {
                target,
                capacity: target,
                // Nothing until the coordinator holds tokens.
                share: coordination.as_ref().map(|_| 0),
                derivation: None,
                probing: false,
                behind_pooler: false,
                in_use: 0,
                members: Vec::new(),
                waiters: VecDeque::new(),
                lowered_until: None,
            }),
            coordination,
            reclaims: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            waits: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, BudgetState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn server(&self) -> &str {
        &self.server
    }

    /// `replicas: auto`: the coordination with the other replicas.
    pub(crate) fn coordination(&self) -> Option<&Coordination> {
        self.coordination.as_ref()
    }

    /// Whether more units are held than the limit allows now: `Some(false)`
    /// a returned connection above its pool's floor closes, `Some(true)`
    /// any returned connection closes (the replica lost its coordinator).
    pub(crate) fn over(&self) -> Option<bool> {
        self.over
            .load(Ordering::Relaxed)
            .then(|| self.lost.load(Ordering::Relaxed))
    }

    fn update_over(&self, st: &BudgetState) {
        let over = st.limit().is_some_and(|limit| st.in_use > limit);
        self.over.store(over, Ordering::Relaxed);
    }

    /// Adds a pool to the budget.
    ///
    /// # Errors
    /// `Config` if the floors of the pools on this server, this one
    /// included, exceed a known budget; the message names the pools.
    pub(crate) fn join(
        &self,
        pool_id: u64,
        pool: Weak<dyn Reclaim>,
        label: String,
        min_size: u32,
        pooler: Pooler,
    ) -> Result<()> {
        let mut st = self.lock();
        if pooler.is_some() && self.mode == BudgetMode::Auto && st.target.is_none() {
            // The pooler, not PostgreSQL, limits this process's
            // connections: the backend's max_connections says nothing
            // about them.
            if !st.behind_pooler {
                tracing::info!(server = %self.server, %pooler, "auto server budget behind a pooler: not derived; the pools' max_size bound them");
            }
            st.behind_pooler = true;
            st.probing = false;
        }
        st.members
            .retain(|m| m.pool.strong_count() > 0 || m.units > 0);
        st.members.push(Member {
            pool_id,
            pool,
            label,
            min_size,
            units: 0,
        });
        if let Some(target) = st.target {
            let floors: u32 = st.members.iter().map(|m| m.min_size).sum();
            if floors > target {
                let listed = floor_list(&st.members);
                st.members.pop();
                return Err(Error::config(format!(
                    "invalid configuration: the warm floors of the pools on server {} add up to {floors}, more than its budget of {target}: {listed}",
                    self.server
                )));
            }
        }
        Ok(())
    }

    /// Changes the floor of a pool (resized).
    ///
    /// # Errors
    /// `Config` if the floors would exceed a known budget; nothing changes
    /// then.
    pub(crate) fn set_floor(self: &Arc<Self>, pool_id: u64, min_size: u32) -> Result<()> {
        let mut st = self.lock();
        let Some(index) = st.members.iter().position(|m| m.pool_id == pool_id) else {
            return Ok(());
        };
        let before = st.members[index].min_size;
        st.members[index].min_size = min_size;
        // Lowering a floor always fits, even a budget derived below the
        // floors already there.
        if let Some(target) = st.target.filter(|_| min_size > before) {
            let floors: u32 = st.members.iter().map(|m| m.min_size).sum();
            if floors > target {
                let listed = floor_list(&st.members);
                st.members[index].min_size = before;
                return Err(Error::config(format!(
                    "invalid configuration: with min_size {min_size}, the warm floors of the pools on server {} would add up to {floors}, more than its budget of {target}: {listed}",
                    self.server
                )));
            }
        }
        // A lower floor may free room for pools waiting above theirs.
        self.grant_waiters(&mut st);
        Ok(())
    }

    /// Removes a pool (closed) from the budget.
    pub(crate) fn leave(self: &Arc<Self>, pool_id: u64) {
        if let Some(c) = &self.coordination {
            c.withdraw(pool_id);
        }
        let mut st = self.lock();
        st.members.retain(|m| m.pool_id != pool_id || m.units > 0);
        if let Some(m) = st.members.iter_mut().find(|m| m.pool_id == pool_id) {
            m.min_size = 0;
        }
        self.grant_waiters(&mut st);
    }

    /// Whether `auto` still has to read the server's settings.
    pub(crate) fn needs_derivation(&self) -> bool {
        // With `replicas: auto` the coordinator reads the settings.
        self.mode == BudgetMode::Auto && self.coordination.is_none() && {
            let st = self.lock();
            st.target.is_none() && !st.behind_pooler
        }
    }

    /// Sets an `auto` budget from the server's settings.
    pub(crate) fn derive(
        self: &Arc<Self>,
        max_connections: u32,
        superuser_reserved: u32,
        reserved: u32,
    ) {
        let derivation = Derivation::new(
            max_connections,
            superuser_reserved,
            reserved,
            self.headroom,
            self.replicas,
        );
        let mut st = self.lock();
        if st.target.is_some() {
            return;
        }
        st.target = Some(derivation.budget);
        st.capacity = Some(derivation.budget);
        st.derivation = Some(derivation);
        st.probing = false;
        let floors: u32 = st.members.iter().map(|m| m.min_size).sum();
        if floors > derivation.budget {
            tracing::error!(
                server = %self.server,
                budget = derivation.budget,
                floors,
                pools = %floor_list(&st.members),
                "the warm floors of the pools on this server exceed its budget; floors are not guaranteed"
            );
        }
        tracing::info!(server = %self.server, budget = derivation.budget, ?derivation, "server budget derived");
        self.grant_waiters(&mut st);
    }

    /// The derivation query failed: let another connection probe.
    pub(crate) fn derivation_failed(self: &Arc<Self>) {
        let mut st = self.lock();
        st.probing = false;
        self.grant_waiters(&mut st);
    }

    /// The server refused a connection with 53300: lower the capacity to
    /// what is open, so the pools stop pushing, and probe upwards later.
    pub(crate) fn refused(&self) {
        self.refusals.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        // The refused connect's own unit is still counted.
        let open = st.in_use.saturating_sub(1).max(1);
        let before = st.capacity;
        st.capacity = Some(before.map_or(open, |c| c.min(open)));
        st.lowered_until = Some(Instant::now() + RECOVERY_STEP);
        self.update_over(&st);
        tracing::warn!(
            server = %self.server,
            from = ?before,
            to = open,
            "the server refused a connection (too many clients): lowering this process's budget"
        );
    }

    /// Whether pool `pool_id` may take a unit now; applies the slow recovery
    /// of a lowered capacity.
    fn may_grant(&self, st: &mut BudgetState, pool_id: u64) -> bool {
        if st.behind_pooler {
            // The pooler limits this process's connections.
            return true;
        }
        let Some(target) = st.target else {
            // `auto` before derivation: one probe connection at a time;
            // `replicas: auto` waits for its coordinator.
            return st.share.is_none() && !st.probing;
        };
        st.recover(Instant::now());
        let capacity = st
            .capacity
            .unwrap_or(target)
            .min(st.share.unwrap_or(u32::MAX));
        let member = st.members.iter().find(|m| m.pool_id == pool_id);
        let below_floor = member.is_some_and(|m| m.units < m.min_size);
        if st.in_use >= capacity {
            return false;
        }
        if below_floor {
            return true;
        }
        let committed: u32 = st.members.iter().map(|m| m.units.max(m.min_size)).sum();
        committed < capacity
    }

    fn take(self: &Arc<Self>, st: &mut BudgetState, pool_id: u64) -> Unit {
        st.in_use += 1;
        if st.target.is_none() && !st.behind_pooler {
            st.probing = true;
        }
        if let Some(m) = st.members.iter_mut().find(|m| m.pool_id == pool_id) {
            m.units += 1;
        }
        self.update_over(st);
        Unit {
            budget: Some(self.clone()),
            pool_id,
        }
    }

    /// Hands units to waiters that may take one, oldest first.
    fn grant_waiters(self: &Arc<Self>, st: &mut BudgetState) {
        let me = self;
        let mut i = 0;
        while i < st.waiters.len() {
            if st.waiters[i].tx.is_closed() {
                st.waiters.remove(i);
                continue;
            }
            let pool_id = st.waiters[i].pool_id;
            if me.may_grant(st, pool_id) {
                let waiter = st.waiters.remove(i).expect("index checked");
                let unit = me.take(st, pool_id);
                if let Err(mut unit) = waiter.tx.send(unit) {
                    // The connect gave up meanwhile; give the unit back here
                    // rather than in Unit::drop, which would take the lock.
                    unit.budget = None;
                    st.give_back(pool_id);
                }
                continue;
            }
            if st.waiters[i].above_floor {
                // Above-floor requests are served strictly in order.
                i += 1;
                while i < st.waiters.len() && st.waiters[i].above_floor {
                    i += 1;
                }
                continue;
            }
            i += 1;
        }
    }

    /// Waits for a unit for pool `pool_id`, reclaiming idle connections of
    /// other pools when the budget is spent. Gives up (returns `None`) when
    /// `still_needed` turns false — checked every 50ms.
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        pool_id: u64,
        still_needed: impl Fn() -> bool,
    ) -> Option<Unit> {
        let mut rx = {
            let mut st = self.lock();
            if self.may_grant(&mut st, pool_id) && st.waiters.is_empty() {
                return Some(self.take(&mut st, pool_id));
            }
            let above_floor = st
                .members
                .iter()
                .find(|m| m.pool_id == pool_id)
                .is_none_or(|m| m.units >= m.min_size);
            let (tx, rx) = oneshot::channel();
            st.waiters.push_back(BudgetWaiter {
                pool_id,
                above_floor,
                tx,
            });
            self.waits.fetch_add(1, Ordering::Relaxed);
            // A request below its floor may pass the queue at once.
            self.grant_waiters(&mut st);
            rx
        };
        if let Some(c) = &self.coordination {
            // This replica may want a larger share.
            c.nudge();
        }
        self.reclaim_for(pool_id);
        loop {
            match tokio::time::timeout(Duration::from_millis(50), &mut rx).await {
                Ok(Ok(unit)) => return Some(unit),
                Ok(Err(_)) => return None,
                Err(_) => {
                    if !still_needed() {
                        rx.close();
                        // A unit sent before the close goes back on drop.
                        drop(rx.try_recv());
                        return None;
                    }
                    // Recovery of a lowered capacity, or a probe slot, may
                    // have opened up without any unit being returned.
                    {
                        let mut st = self.lock();
                        self.grant_waiters(&mut st);
                    }
                    self.reclaim_for(pool_id);
                }
            }
        }
    }

    /// Asks the other pools on the server to close one idle connection
    /// above their floor; the freed unit goes to the oldest waiter.
    fn reclaim_for(&self, pool_id: u64) {
        let candidates: Vec<Arc<dyn Reclaim>> = {
            let st = self.lock();
            if st.target.is_none() {
                return;
            }
            st.members
                .iter()
                .filter(|m| m.pool_id != pool_id && m.units > m.min_size)
                .filter_map(|m| m.pool.upgrade())
                .collect()
        };
        for pool in candidates {
            if pool.reclaim_idle(&self.server, false) {
                self.reclaims.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }

    /// A one-line summary for error messages.
    pub(crate) fn summary(&self) -> String {
        let mut st = self.lock();
        st.recover(Instant::now());
        match st.limit() {
            Some(c) => format!(
                "server {} budget {}/{} connections in use, {} pool connect(s) waiting",
                self.server,
                st.in_use,
                c,
                st.waiters.iter().filter(|w| !w.tx.is_closed()).count()
            ),
            None => format!("server {} budget not derived yet", self.server),
        }
    }

    pub(crate) fn stats(&self) -> BudgetStats {
        let mut st = self.lock();
        st.recover(Instant::now());
        let source = match self.mode {
            BudgetMode::Fixed(_) => BudgetSource::Configured,
            BudgetMode::Off => BudgetSource::Off,
            BudgetMode::Auto if st.behind_pooler => BudgetSource::BehindPooler,
            BudgetMode::Auto if st.derivation.is_some() => BudgetSource::ServerSettings,
            BudgetMode::Auto => BudgetSource::NotYetDerived,
        };
        BudgetStats {
            server: self.server.clone(),
            mode: self.mode,
            source,
            budget: st.target,
            capacity: st.limit(),
            derivation: st.derivation,
            in_use: st.in_use,
            waiting: st.waiters.iter().filter(|w| !w.tx.is_closed()).count(),
            pools: st
                .members
                .iter()
                .map(|m| (m.label.clone(), m.units))
                .collect(),
            reclaims: self.reclaims.load(Ordering::Relaxed),
            refusals: self.refusals.load(Ordering::Relaxed),
            waits: self.waits.load(Ordering::Relaxed),
            replicas: self.coordination.as_ref().map(Coordination::stats),
        }
    }
}

/// Reads the server's connection limits over `client`, the first
/// connection to a server whose budget is `auto`, and derives the budget
/// from them.
pub(crate) async fn derive_from_server(budget: &Arc<ServerBudget>, client: &Client) {
    let query = "SELECT current_setting('max_connections')::int, \
                 current_setting('superuser_reserved_connections')::int, \
                 coalesce(current_setting('reserved_connections', true), '0')::int";
    match client.query_one(query, &[]).await {
        Ok(row) => {
            let get = |i: usize| u32::try_from(row.get::<_, i32>(i)).unwrap_or(0);
            budget.derive(get(0), get(1), get(2));
        }
        Err(e) => {
            tracing::warn!(server = %budget.server(), error = %e, "could not read the server's connection limits");
            budget.derivation_failed();
        }
    }
}

/// A service name from an `application_name`: the characters a service
/// may have, the others as `_`, cut to the longest name.
fn service_from(application_name: &str) -> String {
    let name: String = application_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(crate::config::MAX_SERVICE_LEN)
        .collect();
    if name.is_empty() {
        "pgfleet".to_owned()
    } else {
        name
    }
}

fn floor_list(members: &[Member]) -> String {
    members
        .iter()
        .filter(|m| m.min_size > 0)
        .map(|m| format!("{} (min_size {})", m.label, m.min_size))
        .collect::<Vec<_>>()
        .join(", ")
}
