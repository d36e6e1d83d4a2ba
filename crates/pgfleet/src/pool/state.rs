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

/// The first reconnect delay of a pool that only refills its floor; it
/// doubles with each failure up to [`MAX_BACKOFF`].
const FLOOR_BACKOFF: Duration = Duration::from_millis(300);
/// The longest reconnect delay.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often a failed server is tried again while callers wait.
const WAITING_RETRY: Duration = Duration::from_millis(100);

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
    /// No new connect attempts before this while nobody waits (the floor's
    /// backoff).
    pub(crate) backoff_until: Option<Instant>,
    /// No new connect attempts before this while callers wait: soon, so the
    /// first of them is served soon after the server is back.
    pub(crate) retry_soon: Option<Instant>,
    /// When the replan already scheduled (a timer task) runs.
    pub(crate) retry_at: Option<Instant>,
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
            retry_soon: None,
            retry_at: None,
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
    /// the warm floor, never beyond the cap, and none during backoff (a
    /// short one while callers wait).
    pub(crate) fn plan(&mut self, min_size: u32, max_size: u32, now: Instant) -> Plan {
        if self.closed {
            return Plan::default();
        }
        if let Some(floor_until) = self.backoff_until {
            let until = match self.retry_soon {
                Some(soon) if self.waiting > 0 => soon.min(floor_until),
                _ => floor_until,
            };
            if now < until {
                if self.retry_at.is_some_and(|at| at <= until) {
                    return Plan::default();
                }
                self.retry_at = Some(until);
                return Plan {
                    connects: 0,
                    retry_at: Some(until),
                };
            }
            self.backoff_until = None;
            self.retry_soon = None;
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

    /// Records a failed connect and starts the backoff. Nobody waiting (the
    /// floor alone): exponential from 300ms to 5s, so a server that is down
    /// is not hammered (at most 4 attempts in its first 2 s). Callers
    /// waiting: every 100ms, so the first of them is served soon after the
    /// server is back. Both with jitter (half to all of the delay), so that
    /// pools and replicas that lost the same server do not come back in
    /// lockstep.
    pub(crate) fn connect_failed(&mut self, failure: ConnectFailure) {
        self.failures = self.failures.saturating_add(1);
        let jitter = || 0.5 + fastrand::f64() * 0.5;
        let ceiling = FLOOR_BACKOFF
            .saturating_mul(1 << (self.failures - 1).min(5))
            .min(MAX_BACKOFF);
        self.backoff_until = Some(failure.at + ceiling.mul_f64(jitter()));
        self.retry_soon = Some(failure.at + WAITING_RETRY.mul_f64(jitter()));
        self.last_failure = Some(failure);
    }

    pub(crate) fn connect_succeeded(&mut self) {
        self.failures = 0;
        self.backoff_until = None;
        self.retry_soon = None;
        self.last_failure = None;
    }

    /// The replan scheduled for `at` runs: a later one may be scheduled.
    pub(crate) fn retry_due(&mut self, at: Instant) {
        if self.retry_at == Some(at) {
            self.retry_at = None;
        }
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
        assert!(at > now && at <= now + FLOOR_BACKOFF);
        assert_eq!(st.plan(1, 4, now), Plan::default(), "only one timer");
        st.retry_due(at);
        assert_eq!(st.plan(1, 4, at).connects, 1);
    }

    /// Attempts in the first `window` of an outage, from the first failed
    /// connect on, for a pool that only keeps its floor of one.
    fn attempts_in(window: Duration, waiting: u32) -> u32 {
        let start = Instant::now();
        let mut st = State::<()>::new();
        st.waiting = waiting;
        let mut now = start;
        let mut attempts = 0;
        while now < start + window {
            let plan = st.plan(1, 4, now);
            if plan.connects > 0 {
                attempts += plan.connects;
                st.size = 0;
                st.connecting = 0;
                st.connect_failed(ConnectFailure {
                    message: "refused".into(),
                    code: None,
                    at: now,
                });
            } else if let Some(at) = plan.retry_at {
                st.retry_due(at);
                now = at;
            }
        }
        attempts
    }

    #[test]
    fn a_server_that_is_down_is_not_hammered_while_nobody_waits() {
        for _ in 0..200 {
            let attempts = attempts_in(Duration::from_secs(2), 0);
            assert!(
                attempts < 5,
                "{attempts} attempts in 2s with nobody waiting"
            );
        }
    }

    #[test]
    fn a_server_that_is_down_is_tried_often_while_callers_wait() {
        for _ in 0..200 {
            let attempts = attempts_in(Duration::from_secs(1), 1);
            assert!(
                attempts >= 10,
                "{attempts} attempts in 1s while a caller waits"
            );
        }
    }

    #[test]
    fn a_caller_arriving_during_a_long_backoff_brings_the_retry_forward() {
        let now = Instant::now();
        let mut st = State::<()>::new();
        for i in 0..5 {
            st.connect_failed(ConnectFailure {
                message: "refused".into(),
                code: None,
                at: now + Duration::from_millis(i),
            });
        }
        let floor = st.plan(1, 4, now).retry_at.expect("a retry");
        assert!(floor >= now + Duration::from_secs(2), "{:?}", floor - now);
        st.waiting = 1;
        let soon = st.plan(1, 4, now).retry_at.expect("an earlier retry");
        assert!(soon <= now + Duration::from_millis(110), "{:?}", soon - now);
    }

    #[test]
    fn closed_pool_plans_nothing() {
        let mut st = State::<()>::new();
        st.closed = true;
        assert_eq!(st.plan(3, 4, Instant::now()), Plan::default());
    }
}
