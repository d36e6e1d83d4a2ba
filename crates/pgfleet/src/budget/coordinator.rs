//! The coordinator of `replicas: auto` on one server (see `replicas.rs`
//! for the protocol): its connection, the join, and the tick that publishes
//! this replica's demand, reads the others', and takes or gives back
//! tokens.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::replicas::{parse_name, split, Coordination, ReplicaMember, PREFIX, TICK};
use super::ServerBudget;
use crate::conn::RawConn;

/// The shortest time between two ticks woken by a waiting pool.
const MIN_TICK: Duration = Duration::from_millis(100);
/// How long a demand counts after it was seen, so that shares do not follow
/// every burst.
const DEMAND_WINDOW: usize = 5;
/// How long a joiner that found the door taken waits before it tries
/// again (plus up to as much at random).
const JOIN_RETRY: Duration = Duration::from_millis(500);
/// The longest wait between two attempts to reconnect the coordinator.
const MAX_RECONNECT: Duration = Duration::from_secs(5);
/// How long after a replica left no replica takes a token for its share:
/// a connect it had in progress may still land.
const DEPARTED: Duration = Duration::from_millis(400);
/// The longest a coordinator's query may take (the connection is given up
/// after: a half-open connection must not stall the replica).
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the wait between ticks looks whether the coordinator's
/// connection broke.
const WATCH: Duration = Duration::from_millis(20);

/// One replica as read from the server.
struct Seen {
    instance: String,
    want: u32,
    floor: u32,
    tokens: u32,
    door: bool,
    database: String,
}

/// The coordinator of one server budget: connects, joins, and ticks until
/// the budget is gone; reconnects after a failure (the pools shrink to
/// nothing meanwhile: without its tokens this replica may hold nothing).
pub(crate) async fn coordinate(budget: Weak<ServerBudget>) {
    // Dropped with the task, also when its runtime shuts down: the replica
    // then holds nothing, and the next pool on the server starts another.
    let _running = Running(budget.clone());
    let mut backoff = JOIN_RETRY;
    loop {
        let Some(strong) = budget.upgrade() else {
            return;
        };
        let coordination = strong.coordination().expect("a coordinated budget");
        let Some((pool_id, connector)) = coordination.connector() else {
            // No pool left on the server: wait for one.
            drop(strong);
            tokio::time::sleep(TICK).await;
            continue;
        };
        let (want, floor) = strong.local_demand();
        let name = coordination.name(want, floor);
        let wake = coordination.wake.clone();
        drop(strong);
        let why = match connector(name).await {
            Ok(raw) => {
                backoff = JOIN_RETRY;
                match Session::new(budget.clone(), wake, raw).run().await {
                    Ended::BudgetGone => return,
                    Ended::Idle => continue,
                    Ended::Full => {
                        // The door is taken: another replica is joining.
                        // Try again a little later.
                        tokio::time::sleep(JOIN_RETRY.mul_f64(1.0 + fastrand::f64())).await;
                        continue;
                    }
                    Ended::Failed(why) => why,
                }
            }
            Err(e) if e.is_closed() => {
                // That pool closed: the next one connects.
                if let Some(strong) = budget.upgrade() {
                    if let Some(c) = strong.coordination() {
                        c.withdraw(pool_id);
                    }
                }
                continue;
            }
            Err(e) => e.to_string(),
        };
        if let Some(strong) = budget.upgrade() {
            tracing::warn!(server = %strong.server(), error = %why, "replicas: the coordinator's connection failed; this replica holds no share until it is back");
            strong.lose_share(Some(why));
        }
        tokio::time::sleep(backoff.mul_f64(1.0 + fastrand::f64() * 0.5)).await;
        backoff = (backoff * 2).min(MAX_RECONNECT);
    }
}

/// Lives as long as the coordinator task.
struct Running(Weak<ServerBudget>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(budget) = self.0.upgrade() {
            budget.lose_share(None);
            if let Some(c) = budget.coordination() {
                c.stopped();
            }
        }
    }
}

enum Ended {
    BudgetGone,
    /// The door was taken (another replica is joining).
    Full,
    /// No pool is left on the server.
    Idle,
    Failed(String),
}

/// One connection of the coordinator and the tokens it holds.
struct Session {
    budget: Weak<ServerBudget>,
    wake: Arc<tokio::sync::Notify>,
    raw: RawConn,
    /// Regular tokens held (slot numbers 1..B-1).
    tokens: Vec<u32>,
    door: bool,
    /// The budget split between the replicas (`B`).
    total: u32,
    /// Tokens that could have gone back at the previous tick.
    spare_before: u32,
    /// Demands seen at the last ticks (the window's maximum counts).
    demands: VecDeque<u32>,
    published: String,
    database: String,
    warned_database: bool,
    /// The members at the last tick.
    members: Vec<String>,
    /// When a member was last seen to leave.
    departed_at: Option<Instant>,
}

impl Session {
    fn new(budget: Weak<ServerBudget>, wake: Arc<tokio::sync::Notify>, raw: RawConn) -> Session {
        Session {
            budget,
            wake,
            raw,
            tokens: Vec::new(),
            door: false,
            total: 0,
            spare_before: 0,
            demands: VecDeque::new(),
            published: String::new(),
            database: String::new(),
            warned_database: false,
            members: Vec::new(),
            departed_at: None,
        }
    }

    async fn run(mut self) -> Ended {
        match self.join().await {
            Ok(true) => {}
            Ok(false) => return Ended::Full,
            Err(why) => return why,
        }
        let mut last = Instant::now();
        loop {
            let Some(budget) = self.budget.upgrade() else {
                return Ended::BudgetGone;
            };
            let coordination = budget.coordination().expect("a coordinated budget");
            match self.tick(&budget, coordination).await {
                Ok(true) => {}
                Ok(false) => {
                    // Every pool on the server closed and nothing is open:
                    // the tokens go back with this connection.
                    budget.lose_share(None);
                    return Ended::Idle;
                }
                Err(why) => return Ended::Failed(why),
            }
            drop(budget);
            // The next tick: at TICK, or sooner (not before MIN_TICK) when a
            // pool waits for a unit.
            let woken = {
                let wake = self.wake.notified();
                tokio::pin!(wake);
                loop {
                    let left = TICK.saturating_sub(last.elapsed());
                    if left.is_zero() {
                        break false;
                    }
                    tokio::select! {
                        () = tokio::time::sleep(left.min(WATCH)) => {}
                        () = &mut wake => break true,
                    }
                    if self.raw.is_broken() {
                        // Its locks are gone on the server: hold nothing
                        // from now on.
                        return Ended::Failed("the coordinator's connection closed".into());
                    }
                }
            };
            if woken {
                tokio::time::sleep(MIN_TICK.saturating_sub(last.elapsed())).await;
                if self.raw.is_broken() {
                    return Ended::Failed("the coordinator's connection closed".into());
                }
            }
            last = Instant::now();
        }
    }

    async fn query(&self, sql: &str) -> std::result::Result<Vec<Vec<String>>, Ended> {
        let messages = tokio::time::timeout(QUERY_TIMEOUT, self.raw.client.simple_query(sql))
            .await
            .map_err(|_| {
                Ended::Failed(format!(
                    "the coordinator's query took more than {QUERY_TIMEOUT:?}"
                ))
            })?
            .map_err(|e| Ended::Failed(format!("{e}")))?;
        Ok(messages
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                    (0..row.len())
                        .map(|i| row.get(i).unwrap_or_default().to_owned())
                        .collect(),
                ),
                _ => None,
            })
            .collect())
    }

    /// Derives the budget and takes the door. `Ok(false)`: another replica
    /// is joining.
    async fn join(&mut self) -> std::result::Result<bool, Ended> {
        let Some(budget) = self.budget.upgrade() else {
            return Err(Ended::BudgetGone);
        };
        let key = budget.coordination().expect("coordinated").key;
        let rows = self
            // No statement timeout (the pool's `command_timeout`) on this
            // connection: a failed tick drops it, and its tokens with it.
            .query(
                "SET statement_timeout = 0; SELECT current_setting('max_connections'), \
                 current_setting('superuser_reserved_connections'), \
                 coalesce(current_setting('reserved_connections', true), '0'), \
                 current_database()",
            )
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| Ended::Failed("the server's settings were not read".into()))?;
        let get = |i: usize| row[i].parse::<u32>().unwrap_or(0);
        self.total = budget.derive_total(get(0), get(1), get(2));
        self.database = row[3].clone();
        drop(budget);
        if self.total < 2 {
            return Err(Ended::Failed(format!(
                "a budget of {} leaves no token for a replica",
                self.total
            )));
        }
        // Through the door: the first tick takes tokens as the others'
        // state allows (a free token may be another replica's, whose
        // connections are still open).
        let rows = self
            .query(&format!("SELECT pg_try_advisory_lock({key}, 0)"))
            .await?;
        self.door = rows.first().is_some_and(|r| r[0] == "t");
        Ok(self.door)
    }

    /// Tries to take `n` free regular tokens; how many it got.
    async fn take(&mut self, key: i32, n: u32) -> std::result::Result<u32, Ended> {
        let held = self
            .tokens
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let rows = self
            .query(&format!(
                // CASE, not AND: the planner may order the conditions of an
                // AND as it likes, and a session lock taken again is held
                // twice (one unlock would not give it back).
                "SELECT s FROM generate_series(1, {}) s \
                 WHERE CASE WHEN s = ANY ('{{{held}}}'::int[]) THEN false \
                 ELSE pg_try_advisory_lock({key}, s) END LIMIT {n}",
                self.total - 1
            ))
            .await?;
        let got: Vec<u32> = rows.iter().filter_map(|r| r[0].parse().ok()).collect();
        self.tokens.extend(&got);
        Ok(got.len() as u32)
    }

    /// Reads the regular tokens this session holds from `pg_locks`.
    async fn resync(&mut self, key: i32) -> std::result::Result<(), Ended> {
        let rows = self
            .query(&format!(
                "SELECT objid FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory' \
                 AND classid = {key} AND objsubid = 2 AND objid <> 0 AND granted"
            ))
            .await?;
        let tokens: Vec<u32> = rows.iter().filter_map(|r| r[0].parse().ok()).collect();
        tracing::warn!(ours = self.tokens.len(), server = tokens.len(), "replicas: the coordinator's tokens differ from the server's locks; taking the server's");
        self.tokens = tokens;
        Ok(())
    }

    /// Gives back `n` regular tokens (the highest).
    async fn give_back(&mut self, key: i32, n: u32) -> std::result::Result<(), Ended> {
        self.tokens.sort_unstable();
        let keep = self.tokens.len().saturating_sub(n as usize);
        let gone: Vec<u32> = self.tokens.split_off(keep);
        if gone.is_empty() {
            return Ok(());
        }
        let sql = gone
            .iter()
            .map(|s| format!("pg_advisory_unlock({key}, {s})"))
            .collect::<Vec<_>>()
            .join(", ");
        self.query(&format!("SELECT {sql}")).await?;
        Ok(())
    }

    /// One round: publish the demand, read the replicas, split, take or
    /// give back tokens, set this replica's share. `Ok(false)`: every pool
    /// on the server closed and nothing of this replica is open any more.
    async fn tick(
        &mut self,
        budget: &Arc<ServerBudget>,
        coordination: &Coordination,
    ) -> std::result::Result<bool, String> {
        let failed = |e: Ended| match e {
            Ended::Failed(why) => why,
            Ended::BudgetGone | Ended::Full | Ended::Idle => "the budget closed".to_owned(),
        };
        let key = coordination.key;
        // `close_all`: no pool left on the server. Hold nothing more, and
        // leave once nothing is open.
        let leaving = coordination.connector().is_none();
        let (demand, floor) = budget.local_demand();
        self.demands.push_back(demand);
        while self.demands.len() > DEMAND_WINDOW {
            self.demands.pop_front();
        }
        // Capped, so that the name fits in 63 bytes.
        let cap = self.total.max(1);
        let floor = floor.min(cap);
        let want = self
            .demands
            .iter()
            .copied()
            .max()
            .unwrap_or(demand)
            .max(floor)
            .min(cap);
        let name = coordination.name(want, floor);
        let set = if name == self.published {
            String::new()
        } else {
            format!("SET application_name = '{name}'; ")
        };
        let prefix = format!("{PREFIX}{} ", coordination.service);
        let rows = self
            .query(&format!(
                // The coordinators of the service with their tokens, and the
                // pool connections of the service's replicas by instance id
                // (one snapshot of pg_stat_activity serves both; pg_locks is
                // read once).
                "{set}WITH l AS (SELECT pid, count(*) FILTER (WHERE objid <> 0) AS tokens, \
                   count(*) FILTER (WHERE objid = 0) AS door FROM pg_locks \
                   WHERE locktype = 'advisory' AND classid = {key} AND objsubid = 2 AND granted \
                   GROUP BY pid) \
                 SELECT 'm', a.application_name::text, a.datname::text, \
                   coalesce(l.tokens, 0)::text, coalesce(l.door, 0)::text \
                 FROM pg_stat_activity a LEFT JOIN l ON l.pid = a.pid \
                 WHERE starts_with(a.application_name, '{prefix}') \
                 UNION ALL \
                 SELECT 't', right(application_name, 8), '', count(*)::text, '' FROM pg_stat_activity \
                 WHERE application_name ~ ' #{code}[0-9a-f]{{8}}$' GROUP BY 2",
                code = coordination.code(),
            ))
            .await
            .map_err(failed)?;
        self.published = name;
        let mut seen: Vec<Seen> = rows
            .iter()
            .filter(|r| r[0] == "m")
            .filter_map(|r| {
                let (instance, want, floor) = parse_name(&r[1], &coordination.service)?;
                Some(Seen {
                    instance: instance.to_owned(),
                    want,
                    floor,
                    tokens: r[3].parse().unwrap_or(0),
                    door: r[4] != "0",
                    database: r[2].clone(),
                })
            })
            // Not a member until it holds a token or the door (a joiner
            // that found neither is about to leave).
            .filter(|s| s.tokens > 0 || s.door)
            .collect();
        seen.sort_by(|a, b| a.instance.cmp(&b.instance));
        seen.dedup_by(|a, b| a.instance == b.instance);
        // Pool connections per instance.
        let tagged: HashMap<&str, u32> = rows
            .iter()
            .filter(|r| r[0] == "t")
            .map(|r| (r[1].as_str(), r[3].parse::<u32>().unwrap_or(0)))
            .collect();
        if !self.warned_database {
            if let Some(other) = seen.iter().find(|s| s.database != self.database) {
                self.warned_database = true;
                tracing::warn!(server = %budget.server(), service = %coordination.service, ours = %self.database, theirs = %other.database, "replicas: another replica of the service coordinates in another database, where its advisory locks do not exclude ours; give the service's first pool on this server the same database everywhere");
            }
        }
        let asks: Vec<(u32, u32)> = seen
            .iter()
            .map(|s| {
                if s.instance == coordination.instance {
                    (floor, want)
                } else {
                    (s.floor, s.want)
                }
            })
            .collect();
        let shares = split(self.total - 1, &asks);
        let me = seen
            .iter()
            .position(|s| s.instance == coordination.instance);
        let Some(me) = me else {
            return Err("this replica's coordinator is not among the replicas it sees".into());
        };
        let share = if leaving { 0 } else { shares[me] };
        if seen[me].tokens != self.tokens.len() as u32 {
            // The server knows best which locks this session holds.
            self.resync(key).await.map_err(failed)?;
        }
        // Another replica's connections that its tokens do not cover (its
        // coordinator was lost, or came back while they were open): nobody
        // grows while there are any.
        let now = Instant::now();
        let uncovered: u32 = tagged
            .iter()
            .filter(|(instance, _)| **instance != coordination.instance.as_str())
            .map(
                |(instance, &open)| match seen.iter().find(|m| m.instance == *instance) {
                    Some(m) => (open + 1).saturating_sub(m.tokens + u32::from(m.door)),
                    None => open,
                },
            )
            .sum();
        // A replica that left may have had a connect in progress.
        let members: Vec<String> = seen.iter().map(|m| m.instance.clone()).collect();
        if self.members.iter().any(|m| !members.contains(m)) {
            self.departed_at = Some(now);
        }
        self.members = members;
        let settling = self
            .departed_at
            .is_some_and(|at| now.duration_since(at) < DEPARTED);
        // This replica's own backends (its pool connections as the server
        // sees them, or as its budget counts them) and its coordinator must
        // stay covered whatever the share.
        let own = tagged
            .get(coordination.instance.as_str())
            .copied()
            .unwrap_or(0);
        let cover = budget.in_use().max(own) + 1;
        let held = self.tokens.len() as u32;
        let goal = if uncovered > 0 || settling {
            cover
        } else {
            share.max(cover)
        };
        if goal > held {
            self.take(key, goal - held).await.map_err(failed)?;
        }
        if self.door && self.tokens.len() as u32 >= cover {
            self.query(&format!("SELECT pg_advisory_unlock({key}, 0)"))
                .await
                .map_err(failed)?;
            self.door = false;
        }
        // This replica may hold `share` connections, its coordinator
        // included, and no more than its tokens cover.
        let held = self.tokens.len() as u32;
        let allowed = share.min(held).max(u32::from(self.door));
        // Backends of this replica the server still runs though their
        // connections closed (a statement that did not stop) take tokens
        // too.
        let lingering = own.saturating_sub(budget.in_use());
        budget.set_share(Some(allowed.saturating_sub(1 + lingering)));
        budget.shed();
        // Tokens above the share and above what is open go back, but only
        // those that were spare at the previous tick too: the backend of a
        // connection closed just now may still be on its way out.
        let cover = budget.in_use().max(own) + 1;
        let spare = held.saturating_sub(share.max(cover));
        let give = spare.min(self.spare_before);
        self.spare_before = spare - give;
        if give > 0 {
            self.give_back(key, give).await.map_err(failed)?;
        }
        let tokens = self.tokens.len() as u32 + u32::from(self.door);
        coordination.update(|s| {
            s.joined = true;
            s.seen = seen.len() as u32;
            s.share = share;
            s.tokens = tokens;
            s.want = want;
            s.budget = self.total;
            s.ticks += 1;
            s.last_error = None;
            s.uncovered = uncovered;
            s.members = seen
                .iter()
                .zip(&shares)
                .map(|(m, &share)| ReplicaMember {
                    instance: m.instance.clone(),
                    want: m.want,
                    floor: m.floor,
                    tokens: if m.instance == coordination.instance {
                        tokens
                    } else {
                        m.tokens + u32::from(m.door)
                    },
                    share,
                })
                .collect();
        });
        Ok(!(leaving && budget.in_use() == 0 && own == 0))
    }
}
