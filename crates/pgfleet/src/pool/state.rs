//! The state of a pool that lives behind its mutex, and the decisions taken
//! under it. Pure: nothing here awaits, opens, closes or drops a connection
//! (the callers do that after the lock is released), and the connection is a
//! type parameter, so every decision is tested without a server.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio::task::AbortHandle;

use crate::error::Error;
use crate::stats::Gauges;

/// One caller waiting in `get()`. Served in FIFO order by whatever frees up
/// first: a returned connection or a newly opened one.
pub(crate) struct Waiter<C> {
    pub(crate) tx: oneshot::Sender<Result<C, Error>>,
    /// When the caller's time runs out (see the reaper).
    pub(crate) deadline: Instant,
    /// How long the caller was willing to wait (`acquire_timeout`, or its
    /// own limit): what its timeout error says.
    pub(crate) limit: Duration,
}

/// The last failed connect attempt.
#[derive(Debug, Clone)]
pub(crate) struct ConnectFailure {
    pub(crate) message: String,
    pub(crate) code: Option<String>,
    pub(crate) at: Instant,
}

/// What to start after the lock is released.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Connections to open (already counted in `size` and `connecting`).
    pub(crate) connects: u32,
    /// Replan at this time (reconnect backoff).
    pub(crate) retry_at: Option<Instant>,
}

/// The state of one pool, with connections of type `C`.
pub(crate) struct State<C> {
    /// Open connections nobody holds; the back is the most recently returned
    /// (handed out first, so the front ages and can be closed).
    pub(crate) idle: VecDeque<C>,
    /// Callers waiting, oldest first. May hold entries whose caller gave up;
    /// they are skipped when served and pruned when they pile up.
    pub(crate) waiters: VecDeque<Waiter<C>>,
    /// Callers really waiting (entries above minus the abandoned ones).
    pub(crate) waiting: u32,
    /// Open connections plus connections being opened.
    pub(crate) size: u32,
    /// Connections being opened.
    pub(crate) connecting: u32,
    pub(crate) closed: bool,
    pub(crate) last_failure: Option<ConnectFailure>,
    /// Consecutive failed connects; drives the backoff.
    pub(crate) failures: u32,
    /// No new connect attempts before this.
    pub(crate) backoff_until: Option<Instant>,
    /// A timer task will replan at `backoff_until`.
    pub(crate) retry_scheduled: bool,
    /// When the task that fails waiters at their deadline (`reap_waiters`)
    /// wakes next; `None` while no such task runs.
    pub(crate) reap_at: Option<Instant>,
    /// Names the current reaper; an older one that wakes up stops.
    pub(crate) reaper: u64,
    /// Driver tasks of open connections, to force-close them at a deadline.
    pub(crate) live: HashMap<u64, AbortHandle>,
}

impl<C> State<C> {
    pub(crate) fn new() -> Self {
        State {
            idle: VecDeque::new(),
            waiters: VecDeque::new(),
            waiting: 0,
            size: 0,
            connecting: 0,
            closed: false,
            last_failure: None,
            failures: 0,
            backoff_until: None,
            retry_scheduled: false,
            reap_at: None,
            reaper: 0,
            live: HashMap::new(),
        }
    }

    pub(crate) fn gauges(&self) -> Gauges {
        let idle = self.idle.len() as u32;
        Gauges {
            size: self.size,
            idle,
            in_use: self.size - self.connecting - idle,
            waiting: self.waiting,
            connecting: self.connecting,
            shared: 0,
        }
    }

    /// Decides how many connections to open now: enough for the callers
    /// waiting that no connect in progress will serve, and enough to refill
    /// the warm floor, never beyond the cap, and none during backoff.
    pub(crate) fn plan(&mut self, min_size: u32, max_size: u32, now: Instant) -> Plan {
        if self.closed {
            return Plan::default();
        }
        if let Some(until) = self.backoff_until {
            if now < until {
                if self.retry_scheduled {
                    return Plan::default();
                }
                self.retry_scheduled = true;
                return Plan {
                    connects: 0,
                    retry_at: Some(until),
                };
            }
            self.backoff_until = None;
        }
        let for_waiters = self.waiting.saturating_sub(self.connecting);
        let for_floor = min_size.saturating_sub(self.size);
        let connects = for_waiters
            .max(for_floor)
            .min(max_size.saturating_sub(self.size));
        self.size += connects;
        self.connecting += connects;
        Plan {
            connects,
            retry_at: None,
        }
    }

    /// Records a failed connect and starts the backoff: exponential from
    /// 50ms to 5s, with full jitter so that many pools (or replicas) that
    /// lost the same server do not come back in lockstep.
    pub(crate) fn connect_failed(&mut self, failure: ConnectFailure) {
        self.failures = self.failures.saturating_add(1);
        let ceiling = Duration::from_millis(50)
            .saturating_mul(1 << self.failures.min(7))
            .min(Duration::from_secs(5));
        let delay = ceiling.mul_f64(0.5 + fastrand::f64() * 0.5);
        self.backoff_until = Some(failure.at + delay);
        self.last_failure = Some(failure);
    }

    pub(crate) fn connect_succeeded(&mut self) {
        self.failures = 0;
        self.backoff_until = None;
        self.last_failure = None;
    }

    /// Fails every waiter with an error. Each one served is uncounted here;
    /// the ones that had already given up uncount themselves.
    pub(crate) fn fail_waiters(&mut self, error: impl Fn() -> Error) {
        while let Some(waiter) = self.waiters.pop_front() {
            if !waiter.tx.is_closed() && waiter.tx.send(Err(error())).is_ok() {
                self.waiting -= 1;
            }
        }
    }

    /// Drops abandoned waiter entries once they outnumber the live ones, so
    /// the queue stays proportional to the callers really waiting.
    pub(crate) fn prune_waiters(&mut self) {
        if self.waiters.len() > 2 * self.waiting as usize + 32 {
            self.waiters.retain(|w| !w.tx.is_closed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_fills_floor_and_waiters_within_cap() {
        let now = Instant::now();
        let mut st = State::<()>::new();
        assert_eq!(st.plan(2, 4, now).connects, 2);
        assert_eq!((st.size, st.connecting), (2, 2));
        st.waiting = 5;
        // Two connects already in flight serve two of the five waiters.
        assert_eq!(st.plan(2, 4, now).connects, 2);
        assert_eq!(st.size, 4);
        assert_eq!(st.plan(2, 4, now).connects, 0);
    }

    #[test]
    fn backoff_defers_connects_and_schedules_one_retry() {
        let now = Instant::now();
        let mut st = State::<()>::new();
        st.connect_failed(ConnectFailure {
            message: "refused".into(),
            code: None,
            at: now,
        });
        let plan = st.plan(1, 4, now);
        assert_eq!(plan.connects, 0);
        let at = plan.retry_at.expect("a retry is scheduled");
        assert!(at > now && at <= now + Duration::from_millis(100));
        assert_eq!(st.plan(1, 4, now), Plan::default(), "only one timer");
        st.retry_scheduled = false;
        assert_eq!(st.plan(1, 4, at).connects, 1);
    }

    #[test]
    fn closed_pool_plans_nothing() {
        let mut st = State::<()>::new();
        st.closed = true;
        assert_eq!(st.plan(3, 4, Instant::now()), Plan::default());
    }
}
