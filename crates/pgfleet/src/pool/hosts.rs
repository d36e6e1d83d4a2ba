//! The servers of a pool: one entry per host of its target, the walk that
//! opens a connection on the first host that matches `target_session_attrs`,
//! and what the pool needs for a failover (which host it is on, which hosts'
//! connections are retired, when a `prefer-standby` pool looks for a standby
//! again).
//!
//! A host is *retired* by bumping its generation: a connection opened on it
//! before carries the old generation and is closed the next time the pool
//! looks at it (at once when idle, when returned when in use). New
//! connections try the host the last one landed on first
//! (`load_balance_hosts=disable`), then the others in order, so a pool that
//! moved stays where it is without a failed attempt per connect.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::address::{LoadBalance, SessionAttrs, Target};
use crate::budget::ServerBudget;
use crate::conn;
use crate::error::Result;

mod walk;

pub(crate) use self::walk::{Connected, Walk};

/// No host yet.
const NONE: usize = usize::MAX;

/// The first wait of a `prefer-standby` pool on a primary before it looks
/// for a standby again; doubled after each look that finds none.
const FALLBACK_FIRST_LOOK: Duration = Duration::from_secs(1);
/// The longest wait between two looks.
const FALLBACK_LONGEST_WAIT: Duration = Duration::from_secs(10);

/// One server of the pool.
pub(crate) struct HostEntry {
    /// The pool's target narrowed to this host.
    pub(crate) target: Target,
    /// TLS for this host (its name is the one checked).
    pub(crate) tls: conn::TlsClient,
    /// `host:port`, as budgets and stats name it.
    pub(crate) server: String,
    /// This server's budget in the fleet, if any.
    pub(crate) budget: Option<Arc<ServerBudget>>,
    /// Bumped when the host is retired.
    generation: AtomicU64,
    /// The pool's connections open on this host now.
    open: AtomicU32,
    /// Connects trying this host now.
    trying: AtomicU32,
    /// What the last session opened here found: `ROLE_*`.
    role: AtomicU8,
}

/// The hosts of one pool.
pub(crate) struct Hosts {
    entries: Vec<HostEntry>,
    /// What the server of a session must be.
    pub(crate) attrs: SessionAttrs,
    balance: LoadBalance,
    /// A read side: new connections try the host with the fewest of the
    /// pool's connections first.
    least_busy: bool,
    /// The host new connections try first: the one the last connection
    /// landed on; `NONE` before the first and after that host was retired.
    current: AtomicUsize,
    /// The host the last connection landed on, retired or not: a connection
    /// that lands elsewhere moved the pool.
    last: AtomicUsize,
    /// Set while a `prefer-standby` pool is on a primary for want of a
    /// standby: when to look for one next.
    fallback: Mutex<Option<Fallback>>,
    /// A look for a preferred server runs.
    looking: AtomicBool,
}

#[derive(Clone, Copy)]
struct Fallback {
    next_look: Instant,
    wait: Duration,
}

/// What the last session opened on a host found (`HostEntry::role`).
const ROLE_UNKNOWN: u8 = 0;
const ROLE_PRIMARY: u8 = 1;
const ROLE_STANDBY: u8 = 2;

impl Hosts {
    /// The hosts of `target`, each with its budget (`budgets` in the order
    /// of the target's endpoints; missing ones have none).
    ///
    /// # Errors
    /// `Config` for TLS settings that cannot work for a host.
    pub(crate) fn new(
        target: &Target,
        budgets: Vec<Option<Arc<ServerBudget>>>,
        least_busy: bool,
    ) -> Result<Hosts> {
        let mut budgets = budgets.into_iter();
        let entries = (0..target.endpoints().len())
            .map(|i| {
                let one = target.for_endpoint(i);
                Ok(HostEntry {
                    tls: conn::TlsClient::new(&one)?,
                    server: one.server_key(),
                    target: one,
                    budget: budgets.next().flatten(),
                    generation: AtomicU64::new(0),
                    open: AtomicU32::new(0),
                    trying: AtomicU32::new(0),
                    role: AtomicU8::new(ROLE_UNKNOWN),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Hosts {
            entries,
            attrs: target.target_session_attrs(),
            balance: target.load_balance_hosts(),
            least_busy,
            current: AtomicUsize::new(NONE),
            last: AtomicUsize::new(NONE),
            fallback: Mutex::new(None),
            looking: AtomicBool::new(false),
        })
    }

    pub(crate) fn entry(&self, host: usize) -> &HostEntry {
        &self.entries[host]
    }

    pub(crate) fn entries(&self) -> &[HostEntry] {
        &self.entries
    }

    /// The host new connections try first, if any.
    pub(crate) fn current(&self) -> Option<usize> {
        let current = self.current.load(Ordering::Relaxed);
        (current != NONE).then_some(current)
    }

    /// Whether a connection opened on `host` at `generation` belongs to a
    /// host retired since.
    pub(crate) fn is_retired(&self, host: usize, generation: u64) -> bool {
        self.entries[host].generation.load(Ordering::Relaxed) != generation
    }

    /// Retires `host` if it is still at `generation` (so that the
    /// connections of one era retire it once); whether this call did.
    pub(crate) fn retire(&self, host: usize, generation: u64) -> bool {
        let retired = self.entries[host]
            .generation
            .compare_exchange(
                generation,
                generation + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok();
        if retired {
            let _ = self
                .current
                .compare_exchange(host, NONE, Ordering::SeqCst, Ordering::SeqCst);
        }
        retired
    }

    /// The host's current generation.
    pub(crate) fn generation(&self, host: usize) -> u64 {
        self.entries[host].generation.load(Ordering::SeqCst)
    }

    /// A connection on `host` opened (`true`) or closed.
    pub(crate) fn count(&self, host: usize, opened: bool) {
        let open = &self.entries[host].open;
        if opened {
            open.fetch_add(1, Ordering::Relaxed);
        } else {
            open.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The pool's connections open on `host`.
    pub(crate) fn open_on(&self, host: usize) -> u32 {
        self.entries[host].open.load(Ordering::Relaxed)
    }

    /// Whether a `prefer-standby` pool on a primary should look for a
    /// standby now; if so, the next look is scheduled further out.
    /// The caller runs the look and calls
    /// [`fallback_look_done`](Self::fallback_look_done) after it; one look
    /// at a time.
    pub(crate) fn fallback_look_due(&self, now: Instant) -> bool {
        let mut fallback = self.fallback.lock().unwrap_or_else(PoisonError::into_inner);
        match fallback.as_mut() {
            Some(f) if f.next_look <= now && !self.looking.load(Ordering::Acquire) => {
                f.next_look = now + f.wait;
                f.wait = (f.wait * 2).min(FALLBACK_LONGEST_WAIT);
                self.looking.store(true, Ordering::Release);
                true
            }
            _ => false,
        }
    }

    /// The look for a preferred server ended.
    pub(crate) fn fallback_look_done(&self) {
        self.looking.store(false, Ordering::Release);
    }

    /// The pool is on a server that its attributes accept but do not
    /// prefer (`prefer-standby` on a primary), or back on a preferred one.
    pub(crate) fn on_fallback(&self, fallback: bool) {
        let mut state = self.fallback.lock().unwrap_or_else(PoisonError::into_inner);
        match (fallback, state.is_some()) {
            (true, false) => {
                *state = Some(Fallback {
                    next_look: Instant::now() + FALLBACK_FIRST_LOOK,
                    wait: FALLBACK_FIRST_LOOK * 2,
                });
            }
            (false, true) => *state = None,
            _ => {}
        }
    }

    fn is_on_fallback(&self) -> bool {
        self.fallback
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// Whether the pool is on one host at a time (`load_balance_hosts =
    /// disable`, not a read side): then its warm floor is reserved in the
    /// budget of that host alone, and follows it.
    pub(crate) fn one_at_a_time(&self) -> bool {
        self.balance == LoadBalance::Disable && !self.least_busy
    }

    /// Whether this is a read side (`Pool::reads`).
    pub(crate) fn is_read_side(&self) -> bool {
        self.least_busy
    }

    /// Whether the last session opened on `host` found a standby.
    pub(crate) fn is_standby(&self, host: usize) -> bool {
        self.entries[host].role.load(Ordering::Relaxed) == ROLE_STANDBY
    }

    /// The order of this walk: the current host first, then the others in
    /// order; or a random order per connection; or, for a read side, the
    /// host with the fewest connections (open or opening) first.
    fn order(&self) -> Vec<usize> {
        let n = self.entries.len();
        if self.least_busy {
            // Known primaries last (the fallback): once the role of each
            // host is known, a read does not open a connection on the
            // primary while a standby accepts. Before them, standbys and
            // hosts not tried yet, the fewest connections (open or
            // opening) first.
            let key = |h: usize| {
                let e = &self.entries[h];
                let rank = u8::from(e.role.load(Ordering::Relaxed) == ROLE_PRIMARY);
                let load = e.open.load(Ordering::Relaxed) + e.trying.load(Ordering::Relaxed);
                (rank, load)
            };
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by_key(|&h| key(h));
            if let Some(current) = self.current().filter(|_| self.is_on_fallback()) {
                // On a fallback, the current host first (see `walk`).
                order.retain(|&h| h != current);
                order.insert(0, current);
            }
            return order;
        }
        match self.balance {
            LoadBalance::Random => {
                let mut order: Vec<usize> = (0..n).collect();
                fastrand::shuffle(&mut order);
                order
            }
            LoadBalance::Disable => {
                let current = self.current.load(Ordering::Relaxed);
                let mut order = Vec::with_capacity(n);
                if current < n {
                    order.push(current);
                }
                order.extend((0..n).filter(|&i| i != current));
                order
            }
        }
    }

    /// The servers, as a comma list.
    pub(crate) fn servers(&self) -> String {
        let servers: Vec<&str> = self.entries.iter().map(|e| e.server.as_str()).collect();
        servers.join(",")
    }
}
