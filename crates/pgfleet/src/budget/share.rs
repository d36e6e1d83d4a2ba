//! What `replicas: auto` does to a server budget: the demand this replica
//! publishes, the share its coordinator sets, and the connections it sheds
//! when the share shrinks.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::replicas::Connector;
use super::{Reclaim, ServerBudget};

impl ServerBudget {
    /// `replicas: auto`: a pool on the server offers how to open the
    /// coordinator's connection; the first offer starts the coordinator on
    /// the current runtime.
    pub(crate) fn offer_connector(self: &Arc<Self>, pool_id: u64, connector: Connector) {
        if let Some(c) = &self.coordination {
            if c.offer(pool_id, connector) {
                tokio::spawn(super::coordinator::coordinate(Arc::downgrade(self)));
            }
        }
    }

    /// Units held now.
    pub(crate) fn in_use(&self) -> u32 {
        self.lock().in_use
    }

    /// What this process asks of the server, coordinator included: `(want,
    /// floor)`. The want is what the pools use or wait for, plus one
    /// spare so that a quiet replica answers its next caller at once.
    pub(crate) fn local_demand(&self) -> (u32, u32) {
        let (members, in_use): (Vec<Arc<dyn Reclaim>>, u32) = {
            let st = self.lock();
            (
                st.members.iter().filter_map(|m| m.pool.upgrade()).collect(),
                st.in_use,
            )
        };
        let (mut demand, mut floor, mut open) = (0u32, 0u32, 0u32);
        for pool in &members {
            let asked = pool.demand(&self.server);
            demand = demand.saturating_add(asked.demand);
            floor = floor.saturating_add(asked.floor);
            open = open.saturating_add(asked.open);
        }
        // Units that are not a pool's connections (a listener's) count as
        // wanted; idle connections do not.
        let want = demand
            .saturating_add(in_use.saturating_sub(open))
            .saturating_add(1)
            .max(floor);
        (want.saturating_add(1), floor.saturating_add(1))
    }

    /// `replicas: auto`: sets what this replica may hold (`None`: no
    /// limit but the budget's).
    pub(crate) fn set_share(self: &Arc<Self>, share: Option<u32>) {
        let mut st = self.lock();
        st.share = share;
        // Until the share covers what is open, every returned connection
        // still closes, floors included.
        if share.is_none_or(|s| st.in_use <= s) {
            self.lost.store(false, Ordering::Relaxed);
        }
        self.update_over(&st);
        self.grant_waiters(&mut st);
    }

    /// `replicas: auto`: the coordinator is gone (its connection failed,
    /// its task ended, every pool closed), and its tokens with it: this
    /// replica may hold nothing, floors included, until it is back.
    pub(crate) fn lose_share(self: &Arc<Self>, why: Option<String>) {
        {
            let mut st = self.lock();
            st.share = Some(0);
            self.lost.store(true, Ordering::Relaxed);
            self.update_over(&st);
        }
        self.shed();
        if let Some(c) = &self.coordination {
            c.update(|s| {
                s.joined = false;
                s.tokens = 0;
                s.share = 0;
                if why.is_some() {
                    s.last_error = why;
                }
            });
        }
    }

    /// `replicas: auto`: the budget split between the replicas, derived
    /// once from the server's settings (read by the coordinator).
    pub(crate) fn derive_total(
        self: &Arc<Self>,
        max_connections: u32,
        superuser_reserved: u32,
        reserved: u32,
    ) -> u32 {
        self.derive(max_connections, superuser_reserved, reserved);
        self.lock().target.unwrap_or(0)
    }

    /// Closes idle connections above the pools' floors (below them too
    /// once the coordinator is lost) while more units are held than the
    /// limit allows.
    pub(crate) fn shed(&self) {
        let below_floor = self.lost.load(Ordering::Relaxed);
        loop {
            let candidates: Vec<Arc<dyn Reclaim>> = {
                let st = self.lock();
                if st.limit().is_none_or(|limit| st.in_use <= limit) {
                    return;
                }
                st.members
                    .iter()
                    .filter(|m| m.units > m.min_size || (below_floor && m.units > 0))
                    .filter_map(|m| m.pool.upgrade())
                    .collect()
            };
            if !candidates
                .iter()
                .any(|pool| pool.reclaim_idle(&self.server, below_floor))
            {
                return;
            }
            self.reclaims.fetch_add(1, Ordering::Relaxed);
        }
    }
}
