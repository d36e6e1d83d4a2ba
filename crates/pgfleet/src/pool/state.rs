//! The state of a pool that lives behind its mutex, and the decisions taken
//! under it. Pure: nothing here awaits, opens, closes or drops a connection
//! (the callers do that after the lock is released), and the connection is a
//! type parameter, so every decision is tested without a server.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio::task::AbortHandle;

use super::estimate::Estimates;
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
    /// When the caller started waiting.
    pub(crate) since: Instant,
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
    /// Connections to open (already counted in `size` and `connecting`),
    /// with the ids `first_id..first_id + connects`.
    pub(crate) connects: u32,
    pub(crate) first_id: u64,
    /// Replan at this time: the reconnect backoff ends, a waiter has waited
    /// as long as a connect takes, or a connect in progress is overdue.
    pub(crate) retry_at: Option<Instant>,
}

/// A connect in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Connect {
    pub(crate) id: u64,
    /// When it began talking to the server (after any wait for a budget
    /// unit).
    pub(crate) since: Instant,
    /// Opened while others were overdue: it is never counted overdue
    /// itself, so a slow server gets at most one extra connect per late one.
    pub(crate) replacement: bool,
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
    /// Connections being opened, oldest first.
    pub(crate) connects: VecDeque<Connect>,
    /// The id of the next connection planned.
    next_id: u64,
    /// Connect and hold times, as learned.
    pub(crate) estimates: Estimates,
    /// Connections in use that are lent out for good (shared mode's lanes),
    /// not held by a caller who will give them back soon.
    pub(crate) lent: u32,
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
            connects: VecDeque::new(),
            next_id: 0,
            estimates: Estimates::default(),
            lent: 0,
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

    /// Connections being opened.
    pub(crate) fn connecting(&self) -> u32 {
        self.connects.len() as u32
    }

    /// Connection `id` got its budget unit and starts talking to the
    /// server now: its connect time starts here.
    pub(crate) fn connect_started(&mut self, id: u64, now: Instant) {
        if let Some(c) = self.connects.iter_mut().find(|c| c.id == id) {
            c.since = now;
        }
    }

    /// Connection `id` stopped connecting (it opened, or failed).
    pub(crate) fn connect_done(&mut self, id: u64) {
        if let Some(i) = self.connects.iter().position(|c| c.id == id) {
            self.connects.remove(i);
        }
    }

    pub(crate) fn gauges(&self) -> Gauges {
        let idle = self.idle.len() as u32;
        let connecting = self.connecting();
        Gauges {
            size: self.size,
            idle,
            in_use: self.size - connecting - idle,
            waiting: self.waiting,
            connecting,
            shared: 0,
            lanes: 0,
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
        if self.size >= max_size && self.connects.is_empty() {
            // Full, nothing in progress: no connect can start and none can
            // turn overdue, so there is nothing to open or to look at
            // later (the common case of waiters queueing for returns).
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
                    retry_at: Some(until),
                    ..Plan::default()
                };
            }
            self.backoff_until = None;
            self.retry_soon = None;
        }
        let (for_waiters, wake, replacing) = self.waiters_needing_connects(max_size, now);
        let for_floor = min_size.saturating_sub(self.size);
        let mut connects = for_waiters
            .max(for_floor)
            .min(max_size.saturating_sub(self.size));
        if self.failures > 0 {
            // The server failed the last connect: one probe at a time, the
            // rest once it answers, so a server coming back is not flooded
            // by every waiter at once.
            connects = if self.connects.is_empty() {
                connects.min(1)
            } else {
                0
            };
        }
        let first_id = self.next_id;
        for _ in 0..connects {
            self.connects.push_back(Connect {
                id: self.next_id,
                since: now,
                replacement: replacing,
            });
            self.next_id += 1;
        }
        self.size += connects;
        // Nothing may happen before a waiter should have its connect, or
        // before a connect opened now for a waiter is overdue: make sure the
        // pool looks again then.
        let overdue =
            (connects > 0 && self.waiting > 0).then(|| now + self.estimates.overdue_after());
        let wake = wake.into_iter().chain(overdue).min();
        let retry_at = wake.filter(|wake| self.retry_at.is_none_or(|at| at > *wake));
        if retry_at.is_some() {
            self.retry_at = retry_at;
        }
        Plan {
            connects,
            first_id,
            retry_at,
        }
    }

    /// How many connects the waiters need beyond those in progress, and
    /// when to look again if some wait on returns: the waiters that
    /// connections coming back will serve sooner than a new connect would
    /// arrive need none (a burst of short statements is served by the
    /// connections already open), but a waiter that has waited as long as
    /// a connect takes gets one whatever the estimate says (never starved
    /// by a wrong one). A connect in progress for much longer than usual
    /// (hung) no longer counts as one that will serve a waiter.
    fn waiters_needing_connects(
        &self,
        max_size: u32,
        now: Instant,
    ) -> (u32, Option<Instant>, bool) {
        if self.waiting == 0 {
            return (0, None, false);
        }
        let overdue_after = self.estimates.overdue_after();
        let mut arriving = 0;
        let mut overdue = false;
        let mut next_overdue: Option<Instant> = None;
        for connect in &self.connects {
            let overdue_at = connect.since + overdue_after;
            if connect.replacement || overdue_at > now {
                arriving += 1;
                if !connect.replacement {
                    next_overdue = Some(next_overdue.map_or(overdue_at, |t| t.min(overdue_at)));
                }
            } else {
                overdue = true;
            }
        }
        // Connections lent out for good (shared mode's) do not come back
        // at the rate callers return theirs.
        let in_use =
            (self.size - self.connecting() - self.idle.len() as u32).saturating_sub(self.lent);
        let by_returns = self.estimates.served_by_returns(in_use);
        // Waiters that have waited a connect time already, oldest first;
        // no more than could get a connection.
        let room = max_size.saturating_sub(self.size) + arriving;
        let mut starving = 0;
        let mut next_starving = None;
        if let Some(connect) = self.estimates.connect() {
            for waiter in self.waiters.iter().filter(|w| !w.tx.is_closed()) {
                if starving >= room {
                    break;
                }
                if now.saturating_duration_since(waiter.since) >= connect {
                    starving += 1;
                } else {
                    next_starving = Some(waiter.since + connect);
                    break;
                }
            }
        } else {
            starving = self.waiting;
        }
        let need = self.waiting.saturating_sub(by_returns).max(starving);
        let wake = [next_overdue, next_starving.filter(|_| need < self.waiting)]
            .into_iter()
            .flatten()
            .min();
        (need.saturating_sub(arriving), wake, overdue)
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
        assert_eq!((st.size, st.connecting()), (2, 2));
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
                st.connects.clear();
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

    /// `n` waiters that started waiting at `since`; the receivers keep
    /// them live.
    fn queue(
        st: &mut State<()>,
        n: u32,
        since: Instant,
    ) -> Vec<oneshot::Receiver<Result<(), Error>>> {
        (0..n)
            .map(|_| {
                let (tx, rx) = oneshot::channel();
                st.waiters.push_back(Waiter {
                    tx,
                    deadline: since + Duration::from_secs(30),
                    limit: Duration::from_secs(30),
                    since,
                });
                st.waiting += 1;
                rx
            })
            .collect()
    }

    /// Five connections in use, each returned after 2ms; a connect takes
    /// 150ms.
    fn busy_with_short_holds(now: Instant) -> State<()> {
        let mut st = State::<()>::new();
        st.size = 5;
        st.estimates.record_connect(Duration::from_millis(150));
        st.estimates.record_hold(Duration::from_millis(2));
        let _ = now;
        st
    }

    #[test]
    fn a_burst_of_short_statements_is_left_to_the_connections_open() {
        let now = Instant::now();
        let mut st = busy_with_short_holds(now);
        let _waiters = queue(&mut st, 50, now);
        let plan = st.plan(5, 10, now);
        assert_eq!(plan.connects, 0, "returns within 150ms serve all 50");
        // And the pool looks again when the oldest has waited a connect.
        assert_eq!(plan.retry_at, Some(now + Duration::from_millis(150)));
    }

    #[test]
    fn a_waiter_that_waited_a_connect_time_gets_one_whatever_the_estimate() {
        let now = Instant::now();
        let mut st = busy_with_short_holds(now);
        let _old = queue(&mut st, 2, now - Duration::from_millis(200));
        let _new = queue(&mut st, 48, now);
        assert_eq!(st.plan(5, 10, now).connects, 2, "the two that waited");
        // Not again for the same two: their connects are on the way.
        assert_eq!(st.plan(5, 10, now).connects, 0);
    }

    #[test]
    fn a_hung_connect_stops_counting_as_one_that_will_serve() {
        let now = Instant::now();
        let mut st = State::<()>::new();
        st.estimates.record_connect(Duration::from_millis(20));
        st.size = 1;
        // A connect started a second ago, for a caller still waiting.
        st.connects.push_back(Connect {
            id: 0,
            since: now - Duration::from_secs(1),
            replacement: false,
        });
        st.size += 1;
        let _waiter = queue(&mut st, 1, now - Duration::from_secs(1));
        assert_eq!(st.plan(0, 4, now).connects, 1);
        // One that started just now still counts.
        let mut st = State::<()>::new();
        st.estimates.record_connect(Duration::from_millis(20));
        st.connects.push_back(Connect {
            id: 0,
            since: now,
            replacement: false,
        });
        st.size = 1;
        let _waiter = queue(&mut st, 1, now);
        let plan = st.plan(0, 4, now);
        assert_eq!(plan.connects, 0);
        assert_eq!(
            plan.retry_at,
            Some(now + Duration::from_millis(100)),
            "look again when overdue"
        );
    }

    #[test]
    fn a_failing_server_gets_one_probe_at_a_time_whatever_waits() {
        let now = Instant::now();
        let mut st = State::<()>::new();
        let _waiters = queue(&mut st, 50, now);
        st.connect_failed(ConnectFailure {
            message: "refused".into(),
            code: None,
            at: now - Duration::from_secs(1),
        });
        let plan = st.plan(5, 50, now);
        assert_eq!(plan.connects, 1, "one probe, not one per waiter");
        assert_eq!(st.plan(5, 50, now).connects, 0, "the probe is on its way");
        st.connect_done(plan.first_id);
        st.size -= 1;
        st.connect_succeeded();
        assert!(st.plan(5, 50, now).connects > 1, "the rest once it answers");
    }

    #[test]
    fn a_slow_server_gets_at_most_one_extra_connect_per_late_one() {
        let now = Instant::now();
        let mut st = State::<()>::new();
        st.estimates.record_connect(Duration::from_millis(10));
        let _waiters = queue(&mut st, 10, now);
        assert_eq!(st.plan(0, 40, now).connects, 10);
        // 200ms on, all ten are late (overdue after 100ms): ten more.
        let later = now + Duration::from_millis(200);
        assert_eq!(st.plan(0, 40, later).connects, 10);
        // And no more, however long both sets take.
        assert_eq!(st.plan(0, 40, later + Duration::from_secs(1)).connects, 0);
    }

    #[test]
    fn closed_pool_plans_nothing() {
        let mut st = State::<()>::new();
        st.closed = true;
        assert_eq!(st.plan(3, 4, Instant::now()), Plan::default());
    }
}
