//! Where the pool is among its hosts: a connection that moved it (a
//! failover: counted, logged, the old host retired), retiring a host, and
//! the warm floor's reservation, which follows the pool to its host.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use super::{Conn, Connected, PoolInner};
use crate::error::Error;
use crate::stats::CloseReason;

impl PoolInner {
    /// Logs and counts a connection that moved the pool to another host,
    /// and retires the host it left (`back`: for a preferred one); the
    /// warm floor follows the pool to the host it landed on.
    pub(super) fn moved(self: &Arc<Self>, connected: &Connected, back: bool) {
        if let Some(current) = self.hosts.current() {
            self.follow_floor(current);
        }
        let Some((from, generation, why)) = &connected.moved_from else {
            return;
        };
        self.counters.failovers.fetch_add(1, Ordering::Relaxed);
        let to = &self.hosts.entry(connected.host).server;
        let left = &self.hosts.entry(*from).server;
        tracing::warn!(
            pool = %self.label,
            from = %left,
            to = %to,
            reason = why.as_deref().unwrap_or(if back {
                "a server that target_session_attrs prefers accepts again"
            } else {
                "its connections were retired"
            }),
            "failover: the pool is on another server now"
        );
        if let Some(generation) = generation {
            self.retire_host(*from, *generation, &format!("the pool moved to {to}"));
        }
    }

    /// Moves the warm floor's reservation to the budget of `host` when the
    /// pool is on one host at a time and it was reserved elsewhere; if
    /// that budget cannot hold it, it stays where it was (logged).
    pub(super) fn follow_floor(&self, host: usize) {
        let before = self.floor_host.load(Ordering::SeqCst);
        if before == host || before == usize::MAX {
            return;
        }
        // Moves and resizes one at a time, with the floor in force.
        let _floor = self
            .floor_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let before = self.floor_host.load(Ordering::SeqCst);
        if before == host {
            return;
        }
        let min_size = self.min_size();
        let (old, new) = (self.hosts.entry(before), self.hosts.entry(host));
        if let Some(budget) = &new.budget {
            if let Err(e) = budget.set_floor(self.id, min_size) {
                if !self.floor_warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(pool = %self.label, server = %new.server, error = %e, "the warm floor stays reserved on the server the pool left");
                }
                return;
            }
        }
        if let Some(budget) = &old.budget {
            // Lowering a floor always fits.
            let _ = budget.set_floor(self.id, 0);
        }
        self.floor_host.store(host, Ordering::SeqCst);
    }

    /// Sets the warm floor in force and reserves it in the budgets that
    /// hold it (see `floor_hosts`); nothing changes when one cannot.
    pub(crate) fn set_floor(&self, min_size: u32, max_size: u32) -> Result<(), Error> {
        let _floor = self
            .floor_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let before = self.min_size();
        let budgets: Vec<_> = self
            .floor_hosts()
            .into_iter()
            .filter_map(|h| self.hosts.entry(h).budget.clone())
            .collect();
        for (i, budget) in budgets.iter().enumerate() {
            if let Err(e) = budget.set_floor(self.id, min_size) {
                for earlier in &budgets[..i] {
                    // Set back where it was; it fit before.
                    let _ = earlier.set_floor(self.id, before);
                }
                return Err(e);
            }
        }
        self.set_sizes(min_size, max_size);
        Ok(())
    }

    /// The hosts whose budgets reserve the pool's warm floor: the one the
    /// pool is on when it is on one at a time, else all.
    pub(crate) fn floor_hosts(&self) -> Vec<usize> {
        match self.floor_host.load(Ordering::SeqCst) {
            usize::MAX => (0..self.hosts.entries().len()).collect(),
            host => vec![host],
        }
    }

    /// Retires `host` (if still at `generation`): its idle connections
    /// close now, its connections in use when they come back; new ones go
    /// to the host that matches now. Logged once per retirement.
    pub(crate) fn retire_host(self: &Arc<Self>, host: usize, generation: u64, why: &str) {
        if !self.hosts.retire(host, generation) {
            return;
        }
        let open = self.hosts.open_on(host);
        if open > 0 {
            tracing::warn!(
                pool = %self.label,
                server = %self.hosts.entry(host).server,
                reason = why,
                connections = open,
                "leaving this server: its idle connections close now, the ones in use when returned"
            );
        }
        let victims: Vec<Conn> = {
            let mut st = self.lock();
            let (gone, kept) = std::mem::take(&mut st.idle)
                .into_iter()
                .partition(|c: &Conn| self.hosts.is_retired(c.host, c.host_generation));
            st.idle = kept;
            gone.into()
        };
        for conn in victims {
            conn.close(CloseReason::Failover);
        }
        self.replan();
    }
}
