//! The requests in flight on one lane, in the order the server runs them,
//! so that a statement whose caller gave up is cancelled on the server
//! without cancelling anyone else's.
//!
//! PostgreSQL's CancelRequest names a backend, not a statement: it stops
//! whatever that backend runs when the request arrives. On a lane, several
//! callers' statements queue on one backend, so a careless cancel hits a
//! neighbour. Three rules keep it on target:
//!
//! * **Every request has a place.** A [`Flight`] takes the next number under
//!   the lane's lock in the same poll that hands its request to the
//!   connection (tokio-postgres writes requests in the order they are
//!   handed over), so the numbers are the server's order.
//! * **A request whose caller left is still watched.** When a flight's
//!   future is dropped before its answer is in (a per-call timeout, a
//!   cancelled task), its request future, which owns everything it needs,
//!   moves to a drain task that reads the answer to its end. So pgfleet
//!   knows when every request is finished, the abandoned ones too.
//! * **Cancel the head only.** The lane takes new statements only when no
//!   other lane can (*fenced*) while it carries an abandoned request, and its settle task
//!   sends a CancelRequest only when the oldest unfinished request is an
//!   abandoned one: every request before it has finished, so the server is
//!   running it. It first gives it [`GRACE`] to finish by itself, since a
//!   CancelRequest costs the server more than a short statement does.
//!
//! One race is left: the abandoned statement may finish on the server just
//! as the CancelRequest travels, and the next request may have started
//! when the signal lands (a cancel that arrives while the backend waits for
//! its next command is dropped; one that arrives between two pipelined
//! statements already read may hit the second). That request fails with
//! SQLSTATE 57014 close in time to a cancel pgfleet sent on its lane: it was
//! aborted, so nothing of it took effect (the router sends no statement that
//! acts outside a transaction to a lane), and the statement methods run it
//! again (see [`Flights::hit_by_cancel`]).
//!
//! A prepare, and an unnamed statement, may send type lookups (for types
//! that are not built in) after their first poll, behind later requests, so
//! being the oldest unfinished request does not make them what the server
//! runs. Abandoned, they are cancelled only after [`SLOW_GRACE`] at the
//! head (a Parse waiting for a lock, a lookup queued behind a long
//! statement); the cancel may land on a neighbour, which runs again. After
//! [`CANCELS`] cancels the lane is given up: it leaves service and its
//! connection is cut, and the statements queued on it fail.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::Lane;
use crate::error::Error;

/// How long the settle task waits between looks, and between two cancels
/// of the same statement.
const LOOK: Duration = Duration::from_millis(250);
/// How long an abandoned statement at the head of the queue may run before
/// it is cancelled: a CancelRequest costs the server a process of its own,
/// more than a short statement left to finish.
const GRACE: Duration = Duration::from_millis(20);
/// The same for a request that may send more after its first poll (a
/// prepare, an unnamed statement: type lookups for types that are not
/// built in): being the oldest unfinished request does not make it the one
/// the server runs, so it is cancelled only when it has stayed at the head
/// this long (a lock its Parse waits for, a lookup queued behind a long
/// statement); whichever request the cancel lands on runs again.
const SLOW_GRACE: Duration = Duration::from_secs(1);
/// Cancels sent for one abandoned statement, [`LOOK`] apart, before the
/// lane is given up and its connection cut: a backend that ignores them is
/// stuck.
const CANCELS: u32 = 8;

/// How close in time to a cancel of its lane a statement's own 57014 is
/// taken for that cancel's work.
const CANCEL_REACH: Duration = Duration::from_secs(1);

/// The book of one lane's requests.
pub(crate) struct Flights {
    log: Mutex<Log>,
    /// Some request's caller left before its answer was in: while any is
    /// unfinished, new statements go to this lane only when no other lane
    /// can take them.
    fenced: AtomicBool,
    /// CancelRequests being sent on this lane now.
    cancelling: AtomicU64,
    /// When a CancelRequest was last begun or finished: nanoseconds since
    /// `base`, 0 for never.
    last_cancel: AtomicU64,
    base: Instant,
    /// Woken when a request finishes.
    changed: Notify,
}

#[derive(Default)]
struct Log {
    next: u64,
    /// Unfinished requests, oldest first.
    open: VecDeque<Entry>,
    /// The settle task runs.
    settling: bool,
    /// The lane was given up (its connection cut): nothing more to cancel.
    given_up: bool,
}

struct Entry {
    seq: u64,
    /// The caller left; the drain task reads the answer.
    abandoned: bool,
    /// How long it may run at the head, abandoned, before it is
    /// cancelled: [`GRACE`] for a request that sends nothing after its first
    /// poll (an execution of a prepared statement, a simple query), so that
    /// the server runs it when it is the oldest unfinished one;
    /// [`SLOW_GRACE`] for one that may (see there).
    grace: Duration,
    /// Cancels sent for it, and when the last one was.
    cancels: u32,
    last_cancel: Option<Instant>,
    /// Since when the settle task has seen it at the head, abandoned.
    head_since: Option<Instant>,
}

/// A request future that owns what it uses, so that it can outlive its
/// caller.
pub(crate) type Request<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl Flights {
    pub(crate) fn new() -> Flights {
        Flights {
            log: Mutex::default(),
            fenced: AtomicBool::new(false),
            cancelling: AtomicU64::new(0),
            last_cancel: AtomicU64::new(0),
            base: Instant::now(),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the lane carries a request whose caller left.
    pub(crate) fn fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// Marks a CancelRequest begun or finished.
    fn cancel_mark(&self) {
        let nanos = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_cancel.store(nanos.max(1), Ordering::Release);
    }

    /// Requests unfinished now.
    pub(crate) fn open(&self) -> usize {
        self.lock().open.len()
    }

    /// Whether `error`, from a call that began on this lane at `began`, is
    /// the work of a CancelRequest pgfleet sent for someone else's
    /// statement: SQLSTATE 57014 while a cancel was being sent on the lane,
    /// or within [`CANCEL_REACH`] of one since shortly before the call
    /// began. Such a statement was aborted, so nothing of it took effect
    /// and it may run again. The message is not read (the server words it
    /// in its own language), except to rule out the server's own
    /// `statement_timeout` when it says so in English.
    pub(crate) fn hit_by_cancel(&self, error: &Error, began: Instant) -> bool {
        let own_timeout = error
            .as_db_error()
            .is_some_and(|db| db.message().contains("statement timeout"));
        if error.code() != Some("57014") || own_timeout {
            return false;
        }
        if self.cancelling.load(Ordering::Acquire) > 0 {
            return true;
        }
        let last = self.last_cancel.load(Ordering::Acquire);
        let since = began.saturating_duration_since(self.base);
        let from = since.saturating_sub(CANCEL_REACH).as_nanos();
        last != 0 && u128::from(last) >= from
    }

    fn finish(&self, seq: u64) {
        let mut log = self.lock();
        if let Some(i) = log.open.iter().position(|e| e.seq == seq) {
            log.open.remove(i);
        }
        if !log.open.iter().any(|e| e.abandoned) {
            self.fenced.store(false, Ordering::Release);
        }
        drop(log);
        self.changed.notify_waiters();
    }
}

/// One request on a lane: numbered and handed to the connection in one
/// poll, finished when its answer is read; dropped early, it is handed to a
/// drain task and the lane's settle task cancels it on the server.
pub(crate) struct Flight<T: Send + 'static> {
    lane: Arc<Lane>,
    request: Option<Request<T>>,
    /// Its number, once sent.
    seq: Option<u64>,
    grace: Duration,
}

impl<T: Send + 'static> Flight<T> {
    /// A request that sends all it sends in its first poll: cancelled on
    /// the server when its caller leaves while it runs.
    pub(crate) fn new(lane: Arc<Lane>, request: Request<T>) -> Flight<T> {
        Flight {
            lane,
            request: Some(request),
            seq: None,
            grace: GRACE,
        }
    }

    /// A request that may send type lookups after its first poll (a
    /// prepare, an unnamed statement): cancelled only after [`SLOW_GRACE`].
    pub(crate) fn with_lookups(lane: Arc<Lane>, request: Request<T>) -> Flight<T> {
        Flight {
            lane,
            request: Some(request),
            seq: None,
            grace: SLOW_GRACE,
        }
    }
}

impl<T: Send + 'static> Future for Flight<T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let this = self.get_mut();
        let request = this.request.as_mut().expect("polled after completion");
        let flights = &this.lane.flights;
        let polled = match this.seq {
            Some(_) => request.as_mut().poll(cx),
            None => {
                // The first poll hands the request to the connection: its
                // number and its place in the connection's queue are taken
                // under one lock.
                let mut log = flights.lock();
                let seq = log.next;
                log.next += 1;
                log.open.push_back(Entry {
                    seq,
                    abandoned: false,
                    grace: this.grace,
                    cancels: 0,
                    last_cancel: None,
                    head_since: None,
                });
                this.seq = Some(seq);
                let polled = request.as_mut().poll(cx);
                drop(log);
                polled
            }
        };
        match polled {
            Poll::Ready(out) => {
                this.request = None;
                if let Some(seq) = this.seq {
                    flights.finish(seq);
                }
                Poll::Ready(out)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: Send + 'static> Drop for Flight<T> {
    fn drop(&mut self) {
        let (Some(request), Some(seq)) = (self.request.take(), self.seq) else {
            // Finished, or never sent.
            return;
        };
        let lane = self.lane.clone();
        let start_settle = {
            let mut log = lane.flights.lock();
            if let Some(entry) = log.open.iter_mut().find(|e| e.seq == seq) {
                entry.abandoned = true;
            }
            lane.flights.fenced.store(true, Ordering::Release);
            !std::mem::replace(&mut log.settling, true)
        };
        let runtime = lane.pool.runtime.clone();
        if start_settle {
            runtime.spawn(settle(Arc::downgrade(&lane)));
        }
        runtime.spawn(drain(lane, seq, request));
    }
}

/// Reads the answer of a request whose caller left, to its end. It ends
/// when the server answers (cancelled or not) or the connection dies: the
/// settle task cuts the connection of a backend that ignores its cancels.
async fn drain<T: Send + 'static>(lane: Arc<Lane>, seq: u64, request: Request<T>) {
    /// Finishes the entry however the drain ends (a panic included).
    struct Finish(Arc<Lane>, u64);
    impl Drop for Finish {
        fn drop(&mut self) {
            self.0.flights.finish(self.1);
        }
    }
    let _finish = Finish(lane, seq);
    request.await;
}

/// What the settle task does next.
enum Step {
    /// Cancel what the server runs now.
    Cancel,
    /// The abandoned statement ignored every cancel: take the lane out of
    /// service and cut its connection.
    GiveUp,
    /// The abandoned statement at the head may still finish by itself
    /// within this time.
    Grace(Duration),
    Wait,
}

/// The settle task of one lane: while it carries abandoned requests,
/// cancels the oldest unfinished one when it is abandoned, after its grace
/// ([`GRACE`] or [`SLOW_GRACE`]). An abandoned request behind a live one
/// waits: the server has not started it.
async fn settle(lane: Weak<Lane>) {
    loop {
        let Some(lane) = lane.upgrade() else {
            return;
        };
        let flights = &lane.flights;
        let changed = flights.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let now = Instant::now();
        let step = {
            let mut log = flights.lock();
            if !log.open.iter().any(|e| e.abandoned) {
                // Under the lock: a caller leaving now sees `settling`
                // false and starts a settle task of its own.
                log.settling = false;
                flights.fenced.store(false, Ordering::Release);
                return;
            }
            let given_up = log.given_up;
            let entry = log.open.front_mut().expect("an abandoned entry is open");
            if !entry.abandoned || given_up {
                Step::Wait
            } else {
                let since = *entry.head_since.get_or_insert(now);
                if now.duration_since(since) < entry.grace {
                    Step::Grace(entry.grace - now.duration_since(since))
                } else if entry.cancels >= CANCELS {
                    log.given_up = true;
                    Step::GiveUp
                } else if entry
                    .last_cancel
                    .is_none_or(|t| now.duration_since(t) >= LOOK)
                {
                    entry.cancels += 1;
                    entry.last_cancel = Some(now);
                    Step::Cancel
                } else {
                    Step::Wait
                }
            }
        };
        match step {
            Step::Cancel => {
                flights.cancelling.fetch_add(1, Ordering::AcqRel);
                flights.cancel_mark();
                lane.pool
                    .counters
                    .statements_cancelled
                    .fetch_add(1, Ordering::Relaxed);
                let token = lane.pool.cancel_token(lane.conn());
                let sent =
                    tokio::time::timeout(lane.pool.config.connect_timeout, token.cancel_query())
                        .await;
                flights.cancel_mark();
                flights.cancelling.fetch_sub(1, Ordering::AcqRel);
                if !sent.is_ok_and(|r| r.is_ok()) {
                    tracing::debug!(pool = %lane.pool.label, "could not send a CancelRequest for an abandoned statement");
                }
            }
            Step::GiveUp => {
                tracing::warn!(
                    pool = %lane.pool.label,
                    cancels = CANCELS,
                    "a statement whose caller left ignores its cancels: its shared connection is \
                     closed, and the statements queued behind it on that connection fail"
                );
                if let Some(lanes) = lane.lanes.upgrade() {
                    lanes.remove(&lane);
                }
                lane.conn().raw.driver.abort();
            }
            Step::Grace(left) => {
                let _ = tokio::time::timeout(left, changed).await;
                continue;
            }
            Step::Wait => {}
        }
        // Holding the lane meanwhile is no extension of its life: the
        // abandoned requests' drain tasks hold it too.
        let _ = tokio::time::timeout(LOOK, changed).await;
    }
}
