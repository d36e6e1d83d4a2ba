//! The reaper task: fails waiters whose `acquire_timeout` ran out, so that
//! waiters arm no timer of their own.
//!
//! One task per pool, running only while somebody waits: it sleeps until the
//! earliest deadline in the queue (usually the front's: most callers wait
//! for the pool's one `acquire_timeout`), fails every waiter then due, and
//! stops when the queue is empty. A waiter queued with an earlier deadline than the task's
//! next wake (one back in line after a failed health check) starts a new
//! reaper, which supersedes the old one (`State::reaper` names the current
//! one).

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::inner::PoolInner;
use crate::error::Error;

/// Starts reaper number `id` of `pool` (see [`State::reaper`]).
///
/// [`State::reaper`]: super::state::State::reaper
pub(crate) fn start(pool: &Arc<PoolInner>, id: u64) {
    let reaper = Reaper {
        pool: Arc::downgrade(pool),
        id,
        done: false,
    };
    pool.runtime.spawn(reap_waiters(reaper));
}

async fn reap_waiters(mut reaper: Reaper) {
    loop {
        let Some(pool) = reaper.pool.upgrade() else {
            reaper.done = true;
            return;
        };
        let now = Instant::now();
        // The limits of the waiters due now (usually one: the pool's).
        let mut limits: Vec<Duration> = {
            let st = pool.lock();
            if st.reaper != reaper.id {
                reaper.done = true;
                return;
            }
            st.waiters
                .iter()
                .filter(|w| w.deadline <= now)
                .map(|w| w.limit)
                .collect()
        };
        limits.sort_unstable();
        limits.dedup();
        // Built before the lock is taken again (they read the gauges),
        // while the callers they are for still count as waiting.
        let errors: Vec<(Duration, Error)> = limits
            .into_iter()
            .map(|limit| (limit, pool.timeout_error(limit)))
            .collect();
        let next = {
            let mut st = pool.lock();
            if st.reaper != reaper.id {
                // Superseded by a reaper with an earlier wake.
                reaper.done = true;
                return;
            }
            let waiting = std::mem::take(&mut st.waiters);
            let mut next: Option<Instant> = None;
            for waiter in waiting {
                if waiter.tx.is_closed() {
                    continue;
                }
                let error = (waiter.deadline <= now)
                    .then(|| errors.iter().find(|(limit, _)| *limit == waiter.limit))
                    .flatten();
                match error {
                    Some((_, error)) => {
                        // The caller counts its own timeout (`acquire_slow`),
                        // so the counter is up before it sees the error.
                        if waiter.tx.send(Err(error.duplicate())).is_ok() {
                            st.waiting -= 1;
                        }
                    }
                    None => {
                        next = Some(next.map_or(waiter.deadline, |t| t.min(waiter.deadline)));
                        st.waiters.push_back(waiter);
                    }
                }
            }
            st.reap_at = next;
            next
        };
        drop(pool);
        match next {
            Some(at) => tokio::time::sleep_until(at.into()).await,
            None => {
                reaper.done = true;
                return;
            }
        }
    }
}

/// What a reaper task owns. Made before the task is spawned: if the task is
/// dropped without finishing — its runtime shut down, or was already gone
/// at the spawn — nobody would fail the waiters at their deadline any more,
/// and the pool's connections went with that runtime; so the waiters fail
/// now, and the next waiter starts a reaper again.
struct Reaper {
    pool: Weak<PoolInner>,
    id: u64,
    /// Set when the task ends on its own.
    done: bool,
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        let mut st = pool.lock();
        if st.reaper == self.id {
            st.reap_at = None;
            let label = &pool.label;
            st.fail_waiters(|| {
                Error::closed(format!(
                    "the tokio runtime of the pool for {label} shut down; it cannot time out waiters or open connections"
                ))
            });
        }
    }
}
