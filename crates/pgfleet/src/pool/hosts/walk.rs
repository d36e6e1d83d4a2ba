//! The walk that opens a connection: the hosts in order, each within one
//! `connect_timeout`, until one whose server matches `target_session_attrs`;
//! and what its landing says about where the pool is (a failover).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::timeout;

use super::{HostEntry, Hosts, NONE, ROLE_PRIMARY, ROLE_STANDBY};
use crate::address::{LoadBalance, Role, SessionAttrs};
use crate::budget::{self, ServerBudget, Unit};
use crate::config::PoolConfig;
use crate::conn::role::{lag_text, replication_lag, role_of};
use crate::conn::{self, RawConn, TOO_MANY_CONNECTIONS};
use crate::error::{Error, ErrorKind, Result, TimeoutStage};
use crate::pool::credentials::Credentials;
use crate::pool::session;
use crate::stats::Counters;

/// A connection opened by [`Hosts::walk`].
pub(crate) struct Connected {
    pub(crate) raw: RawConn,
    pub(crate) unit: Option<Unit>,
    /// The host it is on, and that host's generation when it was opened.
    pub(crate) host: usize,
    pub(crate) generation: u64,
    /// The host the pool was on before, when this connection moved it: the
    /// generation to retire it at (`None`: retired already), and why it was
    /// left (its error in this walk, if it was tried).
    pub(crate) moved_from: Option<(usize, Option<u64>, Option<String>)>,
}

/// What a walk saw when it began.
struct WalkStart {
    current: Option<usize>,
    /// `current`'s generation then.
    current_generation: u64,
    last: usize,
}

/// A connection a walk keeps, before `landed` records it.
struct Landing {
    raw: RawConn,
    unit: Option<Unit>,
    host: usize,
    generation: u64,
    preferred: bool,
}

/// A host a walk tried in vain.
struct Failure {
    host: usize,
    error: Error,
    /// The host is gone or no longer matches: a pool on it leaves it.
    leaves: bool,
}

impl Failure {
    fn of(host: usize, error: Error) -> Failure {
        Failure {
            host,
            error,
            leaves: false,
        }
    }
}

/// What one host turned out to be.
enum Probe {
    /// A server the attributes accept; `preferred` when it is their first
    /// choice.
    Fits { raw: Box<RawConn>, preferred: bool },
    /// A server they do not accept (or a standby too far behind).
    Mismatch(Error),
}

/// Whether a connect error says the server is gone (refused, reset,
/// shutting down, starting up), rather than slow, full or refusing the
/// credentials.
fn is_gone(error: &Error) -> bool {
    if error.is_permanent() || matches!(error.kind(), ErrorKind::Timeout { .. }) {
        return false;
    }
    match error.code() {
        None => true,
        Some(code) => code.starts_with("57P") || code.starts_with("08"),
    }
}

/// What a walk needs from its pool.
pub(crate) struct Walk<'a> {
    pub(crate) pool_id: u64,
    pub(crate) label: &'a str,
    pub(crate) config: &'a PoolConfig,
    pub(crate) credentials: &'a Credentials,
    pub(crate) counters: &'a Counters,
    pub(crate) cache_size: usize,
    pub(crate) notifications: Option<&'a conn::Notifications>,
    /// The longest wait for a unit of a server budget (a listener's);
    /// `None`: as long as `still_needed` says.
    pub(crate) unit_wait: Option<Duration>,
    /// Checked while waiting for a budget unit.
    pub(crate) still_needed: &'a (dyn Fn() -> bool + Send + Sync),
    /// Called once, when the first attempt starts talking to a server.
    pub(crate) on_started: &'a (dyn Fn() + Send + Sync),
    /// Called for a host with open connections that cannot be reached:
    /// `(host, generation, why)`.
    pub(crate) on_unreachable: &'a (dyn Fn(usize, u64, &str) + Send + Sync),
    /// Only a host whose role is the first choice, other than the current
    /// one (the look for a standby of `prefer-standby`).
    pub(crate) preferred_only: bool,
}

impl Hosts {
    /// Opens one connection on the first host (in [`order`](Self::order))
    /// that accepts it and whose server matches `target_session_attrs`;
    /// each host within one `connect_timeout` (connect, role check, lag
    /// check, set-up), each holding a unit of its server's budget while it
    /// is tried. `prefer-standby` takes a primary only when no host has a
    /// standby. `Ok(None)`: no longer needed while it waited for a budget
    /// unit.
    ///
    /// # Errors
    /// The host's error when there is one host; with several, one error
    /// naming every host and why it failed (permanent only when every
    /// host's error is). A password provider that fails fails the walk
    /// before any host is tried.
    pub(crate) async fn walk(&self, w: &Walk<'_>) -> Result<Option<Connected>> {
        let current = self.current();
        let start = WalkStart {
            current,
            current_generation: current.map_or(0, |h| self.generation(h)),
            last: self.last.load(Ordering::SeqCst),
        };
        let last_generation = (start.last != NONE).then(|| self.generation(start.last));
        let settle_for_current = self.is_on_fallback();
        // Once per walk: a provider is asked for one password, and its
        // failure is no host's.
        let pg = timeout(w.config.connect_timeout, w.credentials.for_connect(w.label))
            .await
            .map_err(|_| {
                Error::connect_timed_out(
                    w.config.connect_timeout,
                    format!("waiting for the password provider of {}", w.label),
                )
            })??;
        let mut failures: Vec<Failure> = Vec::new();
        let mut fallback: Option<Landing> = None;
        let mut started = false;
        for host in self.order() {
            if w.preferred_only && Some(host) == start.current {
                continue;
            }
            let entry = &self.entries[host];
            let unit = match &entry.budget {
                Some(budget) => match self.unit(budget, w).await {
                    Ok(Some(unit)) => Some(unit),
                    Ok(None) => return Ok(None),
                    Err(error) => {
                        failures.push(Failure::of(host, error));
                        continue;
                    }
                },
                None => None,
            };
            if !started {
                started = true;
                (w.on_started)();
            }
            let generation = entry.generation.load(Ordering::SeqCst);
            let deadline = tokio::time::Instant::now() + w.config.connect_timeout;
            let trying = Trying::new(&entry.trying);
            let probe = self.attempt(entry, &pg, w, deadline).await;
            drop(trying);
            let (raw, preferred) = match probe {
                Ok(Probe::Fits { raw, preferred }) => (*raw, preferred),
                Ok(Probe::Mismatch(error)) => {
                    failures.push(Failure {
                        host,
                        error,
                        leaves: true,
                    });
                    continue;
                }
                Err(error) => {
                    let gone = is_gone(&error);
                    if error.code() == Some(TOO_MANY_CONNECTIONS) {
                        w.counters
                            .connections_refused
                            .fetch_add(1, Ordering::Relaxed);
                        if let Some(budget) = &entry.budget {
                            budget.refused();
                        }
                    } else if gone
                        && self.entries.len() > 1
                        && Some(host) == start.current
                        && self.open_on(host) > 0
                    {
                        // The server the pool is on is gone (refused,
                        // reset, shutting down): its idle connections go
                        // now. Not for a timeout, which a loaded but
                        // healthy server gives too; and with one host there
                        // is nowhere to go: its dead connections close as
                        // broken on their own.
                        (w.on_unreachable)(host, generation, &error.to_string());
                    }
                    failures.push(Failure {
                        host,
                        error,
                        leaves: gone,
                    });
                    continue;
                }
            };
            let landing = Landing {
                raw,
                unit,
                host,
                generation,
                preferred,
            };
            if preferred || (settle_for_current && Some(host) == start.current) {
                if let Err(error) = self.set_up(&landing.raw, w, deadline).await {
                    failures.push(Failure::of(host, error));
                    continue;
                }
                let landed = self.landed(
                    landing,
                    &start,
                    last_generation,
                    &failures,
                    w.preferred_only,
                );
                return Ok(Some(landed));
            }
            if !w.preferred_only && fallback.is_none() {
                fallback = Some(landing);
            }
        }
        if let Some(landing) = fallback {
            let deadline = tokio::time::Instant::now() + w.config.connect_timeout;
            self.set_up(&landing.raw, w, deadline).await?;
            return Ok(Some(self.landed(
                landing,
                &start,
                last_generation,
                &failures,
                false,
            )));
        }
        Err(self.failed(failures))
    }

    /// Why a standby is too far behind for `max_replication_lag`, if it is
    /// (a question that fails counts as too far).
    async fn lagging(
        &self,
        raw: &RawConn,
        role: Option<Role>,
        w: &Walk<'_>,
        deadline: tokio::time::Instant,
    ) -> Option<String> {
        let max = w.config.max_replication_lag?;
        if !role.is_some_and(|r| r.standby) {
            return None;
        }
        match tokio::time::timeout_at(deadline, replication_lag(raw)).await {
            Ok(Ok(lag)) if lag <= max => None,
            Ok(Ok(lag)) => Some(lag_text(lag, max)),
            Ok(Err(e)) => Some(format!("could not read its replication lag: {e}")),
            Err(_) => Some("its replication lag could not be read in time".into()),
        }
    }

    /// A unit of `budget` for this walk, waiting at most `w.unit_wait`.
    async fn unit(&self, budget: &Arc<ServerBudget>, w: &Walk<'_>) -> Result<Option<Unit>> {
        let acquire = budget.acquire(w.pool_id, w.still_needed);
        match w.unit_wait {
            None => Ok(acquire.await),
            Some(wait) => timeout(wait, acquire).await.map_err(|_| {
                Error::timeout(
                    TimeoutStage::Acquire,
                    wait,
                    format!(
                        "timed out after {} waiting for a unit of the budget of server {} for {}",
                        humantime::format_duration(wait),
                        budget.server(),
                        w.label
                    ),
                )
            }),
        }
    }

    /// One host, before `deadline`: the connection, the budget's
    /// derivation if it needs one, the server's role when the attributes
    /// ask about it, its replication lag when it matters; and whether the
    /// server is what the attributes ask for.
    async fn attempt(
        &self,
        entry: &HostEntry,
        pg: &tokio_postgres::Config,
        w: &Walk<'_>,
        deadline: tokio::time::Instant,
    ) -> Result<Probe> {
        let late = |what: &str| {
            Error::connect_timed_out(w.config.connect_timeout, format!("{what} {}", entry.target))
        };
        let options = conn::SocketOptions::of(w.config);
        // `replicas: auto`: the instance in the name, for the monitor.
        let tagged = entry
            .budget
            .as_ref()
            .and_then(|b| b.coordination())
            .map(|c| c.tag(pg));
        let connect = conn::connect(
            &entry.target,
            tagged.as_ref().unwrap_or(pg),
            &options,
            &entry.tls,
            w.cache_size,
            w.notifications,
        );
        let raw = tokio::time::timeout_at(deadline, connect)
            .await
            .map_err(|_| late("connecting to"))??;
        if let Some(budget) = entry.budget.as_ref().filter(|b| b.needs_derivation()) {
            let derive = budget::derive_from_server(budget, &raw.client);
            if tokio::time::timeout_at(deadline, derive).await.is_err() {
                budget.derivation_failed();
            }
        }
        if !self.attrs.checks_role() {
            return Ok(Probe::Fits {
                raw: Box::new(raw),
                preferred: true,
            });
        }
        let role = tokio::time::timeout_at(deadline, role_of(&raw))
            .await
            .map_err(|_| late("reading the role of"))?
            .map_err(|e| {
                Error::connect(format!(
                    "could not read whether {} is a standby: {e}",
                    entry.server
                ))
                .with_source(e)
            })?;
        entry.role.store(
            if role.standby {
                ROLE_STANDBY
            } else {
                ROLE_PRIMARY
            },
            Ordering::Relaxed,
        );
        if !self.attrs.accepts(role) {
            return Ok(Probe::Mismatch(Error::connect(format!(
                "{} is {role}, and target_session_attrs = {} needs {}",
                entry.server,
                self.attrs,
                match self.attrs {
                    SessionAttrs::ReadWrite => "a server that accepts writes",
                    SessionAttrs::ReadOnly => "a read-only server",
                    SessionAttrs::Primary => "a primary",
                    _ => "a standby",
                }
            ))));
        }
        if let Some(why) = self.lagging(&raw, Some(role), w, deadline).await {
            return Ok(Probe::Mismatch(Error::connect(format!(
                "{}: {why}",
                entry.server
            ))));
        }
        Ok(Probe::Fits {
            raw: Box::new(raw),
            preferred: self.attrs.prefers(role),
        })
    }

    /// The session's set-up, once the host is chosen (the `after_connect`
    /// hook runs on the server that is kept, not on every one tried),
    /// before `deadline`.
    async fn set_up(
        &self,
        raw: &RawConn,
        w: &Walk<'_>,
        deadline: tokio::time::Instant,
    ) -> Result<()> {
        tokio::time::timeout_at(deadline, session::set_up(w.config, w.label, raw))
            .await
            .map_err(|_| {
                Error::connect_timed_out(
                    w.config.connect_timeout,
                    format!("setting up a session on {}", w.label),
                )
            })?
    }

    /// Records where a connection landed and whether that moved the pool.
    ///
    /// With `load_balance_hosts=disable` outside a read side, the pool is
    /// on one host at a time: a connection that lands on another host than
    /// the pool's moves it when that host was left, in this walk (gone, or
    /// no longer matching; for `read-write` and `primary` also timed out,
    /// since a promoted standby answering means the old primary is not
    /// coming back as one) or before it (retired). A host that only timed
    /// out otherwise stays the pool's: the connection is kept, and the next
    /// ones try that host first again. The look for a preferred server
    /// (`back`) that finds one moves the pool off a host it does not
    /// prefer, whatever the balance. Elsewhere (`random`, a read side) the
    /// current host is only where the last connection landed. A connection
    /// whose host was retired while it was opened moves nothing (it is
    /// closed at the hand-off).
    fn landed(
        &self,
        landing: Landing,
        start: &WalkStart,
        last_generation: Option<u64>,
        failures: &[Failure],
        back: bool,
    ) -> Connected {
        let Landing {
            raw,
            unit,
            host,
            generation,
            preferred,
        } = landing;
        let mut connected = Connected {
            raw,
            unit,
            host,
            generation,
            moved_from: None,
        };
        if self.is_retired(host, generation) {
            return connected;
        }
        let spreads = self.least_busy || self.balance != LoadBalance::Disable;
        let from = start.last;
        let elsewhere = from != NONE && from != host && Some(from) == start.current;
        if !back && !spreads && elsewhere {
            let failure = failures.iter().find(|f| f.host == from);
            let left = failure.is_some_and(|f| {
                f.leaves
                    || (matches!(self.attrs, SessionAttrs::ReadWrite | SessionAttrs::Primary)
                        && matches!(f.error.kind(), ErrorKind::Timeout { .. }))
            }) || last_generation.is_some_and(|g| self.is_retired(from, g));
            if !left {
                // Passed over (slow, full): the pool stays where it is.
                return connected;
            }
            if self
                .last
                .compare_exchange(from, host, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                if self.attrs == SessionAttrs::PreferStandby {
                    self.on_fallback(!preferred);
                }
                self.current.store(host, Ordering::SeqCst);
                connected.moved_from =
                    Some((from, last_generation, failure.map(|f| f.error.to_string())));
            }
            return connected;
        }
        if self.attrs == SessionAttrs::PreferStandby {
            self.on_fallback(!preferred);
        }
        let before = self.last.swap(host, Ordering::SeqCst);
        self.current.store(host, Ordering::SeqCst);
        if back && before == from {
            // The look found a preferred server: leave the one the pool
            // was on, if it is not preferred itself (a read side spreads
            // over standbys).
            connected.moved_from = start
                .current
                .filter(|&h| h != host && !self.is_standby(h))
                .map(|h| (h, Some(start.current_generation), None));
        } else if !spreads && before != NONE && before != host && start.current.is_none() {
            // The host the pool was on was retired before this walk.
            connected.moved_from = Some((before, None, None));
        }
        connected
    }

    /// The error of a walk where no host would do.
    fn failed(&self, mut failures: Vec<Failure>) -> Error {
        if self.entries.len() == 1 && failures.len() == 1 {
            return failures.pop().expect("one failure").error;
        }
        let permanent = !failures.is_empty() && failures.iter().all(|f| f.error.is_permanent());
        let listed: Vec<String> = failures
            .iter()
            .map(|f| format!("{}: {}", self.entries[f.host].server, f.error))
            .collect();
        let error = Error::connect(format!(
            "no host of {} would do (target_session_attrs = {}): {}",
            self.servers(),
            self.attrs,
            listed.join("; ")
        ));
        if permanent {
            error.permanent()
        } else {
            error
        }
    }
}

/// A connect trying a host, counted while it lives (also when its future
/// is dropped half-way).
struct Trying<'a>(&'a AtomicU32);

impl<'a> Trying<'a> {
    fn new(count: &'a AtomicU32) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Trying(count)
    }
}

impl Drop for Trying<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
