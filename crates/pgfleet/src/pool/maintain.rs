//! The maintenance task: closes idle connections past their lifetime, above
//! the floor past their idle timeout, or dead, refills the floor, and reports
//! connections held past `leak_threshold`, on a tick derived from the configured durations. It holds only a weak
//! reference to the pool and ends when the pool closes.

use std::collections::VecDeque;
use std::panic::Location;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::time::timeout;

use super::inner::PoolInner;
use super::release::Verdict;
use crate::config::PoolConfig;
use crate::conn::role::{lag_text, replication_lag};
use crate::stats::CloseReason;

/// Starts the maintenance task of `pool`.
pub(crate) fn start(pool: &Arc<PoolInner>) {
    let tick = tick_for(&pool.config);
    pool.runtime.spawn(maintain(Arc::downgrade(pool), tick));
}

async fn maintain(weak: Weak<PoolInner>, tick: Duration) {
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(pool) = weak.upgrade() else {
            return;
        };
        let now = Instant::now();
        let mut victims = Vec::new();
        let plan = {
            let mut st = pool.lock();
            if st.closed {
                return;
            }
            let mut above_floor = st.size.saturating_sub(pool.min_size());
            // Resized below what is open: idle connections above the cap go
            // now, oldest-idle first.
            let mut above_cap = st.size.saturating_sub(pool.max_size());
            let idle_timeout = pool.config.idle_timeout;
            // Oldest-idle first: the front of the queue.
            let mut kept = VecDeque::with_capacity(st.idle.len());
            while let Some(conn) = st.idle.pop_front() {
                let reason = if above_cap > 0 {
                    above_cap -= 1;
                    Some(CloseReason::Resized)
                } else if conn.raw.is_broken() {
                    Some(CloseReason::Broken)
                } else if conn.is_expired(now) {
                    Some(CloseReason::Lifetime)
                } else if above_floor > 0
                    && idle_timeout.is_some_and(|t| now - conn.idle_since >= t)
                {
                    Some(CloseReason::Idle)
                } else {
                    None
                };
                match reason {
                    Some(reason) => {
                        above_floor = above_floor.saturating_sub(1);
                        victims.push((conn, reason));
                    }
                    None => kept.push_back(conn),
                }
            }
            st.idle = kept;
            pool.plan(&mut st)
        };
        for (conn, reason) in victims {
            conn.close(reason);
        }
        pool.execute(plan);
        if pool.hosts.fallback_look_due(now) {
            pool.runtime.spawn(look_for_preferred(pool.clone()));
        }
        if pool.config.max_replication_lag.is_some() && !pool.lag_check.swap(true, Ordering::AcqRel)
        {
            pool.runtime.spawn(check_lag(pool.clone()));
        }
        if let Some(threshold) = pool.config.leak_threshold {
            pool.checkouts
                .scan(now, threshold, &pool.label, &pool.counters);
        }
    }
}

/// A `prefer-standby` pool on a primary looks for a standby: one connection
/// to each other host, each within `connect_timeout`. When one is a standby,
/// the pool moves there (`connect_session` retires the primary: its idle
/// connections close now, the ones in use when they come back); the probe
/// connection itself is closed.
async fn look_for_preferred(pool: Arc<PoolInner>) {
    let still_needed = || !pool.lock().closed;
    let found = pool
        .connect_session(
            0,
            None,
            Some(pool.config.connect_timeout),
            &still_needed,
            &|| {},
            true,
        )
        .await;
    pool.hosts.fallback_look_done();
    match found {
        Ok(Some(_)) => pool.replan(),
        Ok(None) => {}
        Err(e) => tracing::debug!(pool = %pool.label, error = %e, "no standby accepts yet"),
    }
}

/// Checks how far behind each standby with connections of the pool is, on
/// one of its idle connections (a standby whose connections are all in use
/// is checked at a later tick); the pool leaves a standby further behind
/// than `max_replication_lag` (its connections close: idle now, in use
/// when returned), and comes back when a connect finds it caught up.
async fn check_lag(pool: Arc<PoolInner>) {
    let max = pool.config.max_replication_lag.unwrap_or(Duration::MAX);
    for host in 0..pool.hosts.entries().len() {
        if pool.hosts.open_on(host) == 0 || !pool.hosts.is_standby(host) {
            continue;
        }
        // The longest idle one on that host: it goes back to the front of
        // the queue with its idle time kept (the check is no use).
        let conn = {
            let mut st = pool.lock();
            let found = st.idle.iter().position(|c| c.host == host);
            found.and_then(|i| st.idle.remove(i))
        };
        let Some(conn) = conn else {
            continue;
        };
        let generation = conn.host_generation;
        let lag = timeout(pool.config.connect_timeout, replication_lag(&conn.raw)).await;
        let now = Instant::now();
        match pool.verdict(&conn, now) {
            Verdict::Reuse => {
                let mut st = pool.lock();
                let current = conn.generation == pool.generation.load(Ordering::SeqCst)
                    && !pool.hosts.is_retired(conn.host, conn.host_generation);
                if st.waiting == 0 && !st.closed && current {
                    st.idle.push_front(conn);
                } else {
                    // A waiter, or a drain or retirement meanwhile: as any
                    // connection going back.
                    pool.hand_off(st, conn, now);
                }
            }
            Verdict::Close(reason) => conn.close(reason),
            Verdict::NeedsCleaning => pool.send_to_clean(conn, Location::caller()),
        }
        match lag {
            Ok(Ok(lag)) if lag > max => {
                pool.retire_host(host, generation, &lag_text(lag, max));
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(pool = %pool.label, server = %pool.hosts.entry(host).server, error = %e, "could not read the replication lag");
            }
            Err(_) => {
                tracing::debug!(pool = %pool.label, server = %pool.hosts.entry(host).server, "the replication lag query timed out");
            }
        }
    }
    pool.lag_check.store(false, Ordering::Release);
}

/// The maintenance tick: a quarter of the shortest timed behaviour, between
/// 10ms and 1s. For lifetimes that is a quarter of the jitter window (10% of
/// `max_lifetime`): connections opened together expire across that window,
/// and a coarser tick would close them in one pass again.
pub(crate) fn tick_for(config: &PoolConfig) -> Duration {
    [
        config.idle_timeout.map(|d| d / 4),
        config.max_lifetime.map(|d| d / 40),
        config.leak_threshold.map(|d| d / 4),
    ]
    .into_iter()
    .flatten()
    .min()
    .unwrap_or(Duration::from_secs(1))
    .clamp(Duration::from_millis(10), Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tick_is_finer_than_the_lifetime_jitter() {
        let config = PoolConfig {
            max_lifetime: Some(Duration::from_secs(3)),
            idle_timeout: None,
            ..PoolConfig::default()
        };
        assert_eq!(tick_for(&config), Duration::from_millis(75));
        assert_eq!(tick_for(&PoolConfig::default()), Duration::from_secs(1));
        let config = PoolConfig {
            max_lifetime: None,
            idle_timeout: None,
            ..PoolConfig::default()
        };
        assert_eq!(tick_for(&config), Duration::from_secs(1));
    }
}
