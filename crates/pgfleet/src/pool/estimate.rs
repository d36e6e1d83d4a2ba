//! What the pool has learned about its own timing — how long a connect
//! takes, how long callers hold a connection — so that it opens a
//! connection only when one would arrive sooner than a returned one.
//! Moving averages, updated under the pool's lock by paths that hold it
//! anyway (a return, a finished connect); pure.

use std::time::Duration;

/// A new sample weighs 1/`WEIGHT` in the moving averages: recent enough
/// to follow a change of load within a few dozen samples.
const WEIGHT: u64 = 4;

/// A connect in progress counts as "will serve a waiter" for this many
/// times the usual connect time (at least [`MIN_OVERDUE`]); after that it
/// is overdue — hung, most likely — and another may be opened.
const OVERDUE_FACTOR: u32 = 3;
/// The shortest time before a connect counts as overdue.
const MIN_OVERDUE: Duration = Duration::from_millis(100);
/// When a connect counts as overdue while none has finished yet.
const OVERDUE_UNKNOWN: Duration = Duration::from_secs(1);

/// Moving averages of connect and hold times (integer arithmetic on
/// nanoseconds: it runs under the pool's lock on every return).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(crate) struct Estimates {
    connect: Option<Duration>,
    hold: Option<Duration>,
}

fn blend(average: Option<Duration>, sample: Duration) -> Duration {
    let sample = u64::try_from(sample.as_nanos()).unwrap_or(u64::MAX);
    match average {
        None => Duration::from_nanos(sample),
        Some(average) => {
            let average = u64::try_from(average.as_nanos()).unwrap_or(u64::MAX);
            Duration::from_nanos(average - average / WEIGHT + sample / WEIGHT)
        }
    }
}

impl Estimates {
    /// A connect that took `took`.
    pub(crate) fn record_connect(&mut self, took: Duration) {
        self.connect = Some(blend(self.connect, took));
    }

    /// A connection held for `held` and returned.
    pub(crate) fn record_hold(&mut self, held: Duration) {
        self.hold = Some(blend(self.hold, held));
    }

    /// The usual connect time, once one has finished.
    pub(crate) fn connect(&self) -> Option<Duration> {
        self.connect
    }

    /// How long a connect in progress counts as one that will arrive.
    pub(crate) fn overdue_after(&self) -> Duration {
        self.connect
            .map_or(OVERDUE_UNKNOWN, |c| (c * OVERDUE_FACTOR).max(MIN_OVERDUE))
    }

    /// How many waiters, with `in_use` connections out, connections coming
    /// back will serve before a connect opened now would arrive: the
    /// returns within one connect time. 0 while either time is unknown (the
    /// pool then opens as many connections as callers wait).
    pub(crate) fn served_by_returns(&self, in_use: u32) -> u32 {
        match (self.connect, self.hold) {
            (Some(connect), Some(hold)) if in_use > 0 => {
                let returns = connect.as_nanos() * u128::from(in_use) / hold.as_nanos().max(1);
                u32::try_from(returns).unwrap_or(u32::MAX)
            }
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_times_open_for_every_waiter_and_wait_a_second_for_a_connect() {
        let e = Estimates::default();
        assert_eq!(e.served_by_returns(10), 0);
        assert_eq!(e.overdue_after(), OVERDUE_UNKNOWN);
    }

    #[test]
    fn short_holds_and_slow_connects_leave_waiters_to_returns() {
        let mut e = Estimates::default();
        e.record_connect(Duration::from_millis(150));
        e.record_hold(Duration::from_millis(2));
        // Five connections returning every 2ms serve 375 waiters in 150ms.
        assert_eq!(e.served_by_returns(5), 375);
        assert_eq!(e.overdue_after(), Duration::from_millis(450));
        let mut e = Estimates::default();
        e.record_connect(Duration::from_millis(10));
        e.record_hold(Duration::from_millis(100));
        assert_eq!(e.served_by_returns(10), 1);
        assert_eq!(e.overdue_after(), MIN_OVERDUE);
    }

    #[test]
    fn averages_follow_new_samples() {
        let mut e = Estimates::default();
        e.record_hold(Duration::from_millis(100));
        for _ in 0..30 {
            e.record_hold(Duration::from_millis(10));
        }
        let hold = e.hold.unwrap();
        assert!(hold < Duration::from_millis(11), "{hold:?}");
    }
}
