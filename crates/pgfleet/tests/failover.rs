//! Several hosts against real servers: a primary killed and its standby
//! promoted under write load, the old primary back as a standby, a
//! `prefer-standby` pool following its standby away and back, and a
//! primary that turns read-only.
//!
//! Every timing is printed (`--nocapture`) for the closing note; the
//! assertions allow what a loaded machine needs.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgfleet::{Pool, PoolConfig, SessionAttrs, Target};
use pgfleet_testkit::{BackendFilter, TempCluster};

/// A primary and its streaming standby.
fn pair() -> (TempCluster, TempCluster) {
    let primary = TempCluster::builder().replication().start().unwrap();
    let standby = primary.start_standby().unwrap();
    (primary, standby)
}

/// `postgres://…@127.0.0.1:p1,127.0.0.1:p2/postgres?target_session_attrs=…`
fn target(hosts: &[&TempCluster], attrs: &str) -> Target {
    let list: Vec<String> = hosts
        .iter()
        .map(|c| format!("127.0.0.1:{}", c.port()))
        .collect();
    Target::parse(&format!(
        "postgres://postgres:{}@{}/postgres?target_session_attrs={attrs}",
        TempCluster::superuser_password(),
        list.join(",")
    ))
    .unwrap()
}

fn config(app: &str, max_size: u32) -> PoolConfig {
    PoolConfig {
        acquire_timeout: Duration::from_secs(3),
        connect_timeout: Duration::from_secs(2),
        ..common::config(app, 0, max_size)
    }
}

/// What one statement of the load saw.
#[derive(Debug, Clone)]
struct Outcome {
    at: Instant,
    /// The server's port, or the error's SQLSTATE / text.
    result: Result<u16, String>,
}

/// `tasks` tasks running `sql` (which returns the server's port) in a loop
/// until `stop`; every outcome recorded.
fn load(
    pool: &Pool,
    tasks: usize,
    sql: &'static str,
    stop: &Arc<AtomicBool>,
) -> (Arc<Mutex<Vec<Outcome>>>, Vec<tokio::task::JoinHandle<()>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handles = (0..tasks)
        .map(|task| {
            let (pool, stop, seen) = (pool.clone(), stop.clone(), seen.clone());
            tokio::spawn(async move {
                let mut n = 0i32;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let result = async {
                        let conn = pool.get().await.map_err(|e| e.to_string())?;
                        let row = conn.query_one(sql, &[&(task as i32), &n]).await.map_err(
                            |e| match e.code() {
                                Some(code) => code.to_owned(),
                                None => e.to_string(),
                            },
                        )?;
                        Ok(row.get::<_, i32>(0) as u16)
                    }
                    .await;
                    let failed = result.is_err();
                    seen.lock().unwrap().push(Outcome {
                        at: Instant::now(),
                        result,
                    });
                    if failed {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        })
        .collect();
    (seen, handles)
}

const WRITE: &str = "INSERT INTO writes (task, n) VALUES ($1, $2) RETURNING inet_server_port()";
const READ: &str =
    "SELECT inet_server_port() FROM (SELECT $1::int AS task, $2::int AS n) AS arguments";

/// The first outcome at or after `since` that succeeded on `port`.
fn first_success_on(seen: &[Outcome], port: u16, since: Instant) -> Option<Instant> {
    seen.iter()
        .filter(|o| o.at >= since && o.result == Ok(port))
        .map(|o| o.at)
        .min()
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_killed_standby_promoted_under_write_load() {
    let (primary, standby) = pair();
    primary
        .execute("CREATE TABLE writes (id bigserial PRIMARY KEY, task int, n int)")
        .await
        .unwrap();
    let app = common::app("failover");
    let pool = Pool::new(target(&[&primary, &standby], "read-write"), config(&app, 8)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (seen, tasks) = load(&pool, 32, WRITE, &stop);
    // A connection taken before the failover and held across it.
    let held = pool.get().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let killed = Instant::now();
    primary.kill().unwrap();
    // No primary for a while: writes wait or fail.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let promoting = Instant::now();
    standby.promote().unwrap();
    let promoted = Instant::now();
    tokio::time::sleep(Duration::from_millis(3000)).await;

    // The old primary comes back as a standby of the new one, first in the
    // URL's list: the pool must not write there.
    let rejoining = Instant::now();
    primary.rejoin_as_standby_of(&standby).unwrap();
    assert!(primary.is_in_recovery().await.unwrap());
    let rejoined = Instant::now();
    let held_write = held
        .execute("INSERT INTO writes (task, n) VALUES (-1, -1)", &[])
        .await;
    drop(held);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let on_old_primary = primary
        .count_backends(&BackendFilter::all().application_name(&app))
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }

    let seen = seen.lock().unwrap().clone();
    let (old, new) = (primary.port(), standby.port());
    let before = seen.iter().filter(|o| o.at < killed).count();
    assert!(
        seen.iter()
            .filter(|o| o.at < killed)
            .all(|o| o.result == Ok(old)),
        "every write before the kill went to the primary"
    );
    let failures: Vec<&Outcome> = seen.iter().filter(|o| o.result.is_err()).collect();
    let read_only = failures
        .iter()
        .filter(|o| o.result.as_ref().unwrap_err() == "25006")
        .count();
    assert_eq!(read_only, 0, "no write reached a standby: {failures:?}");
    let recovered = first_success_on(&seen, new, promoting).expect("writes on the new primary");
    let last_failure = failures.iter().map(|o| o.at).max();
    println!(
        "FAILOVER writes={} before_kill={before} failed={} first_write_on_new_primary_after_promote_returned={}ms (after promote began {}ms, after kill {}ms) last_failure_after_promote={:?}ms promote_took={}ms",
        seen.len(),
        failures.len(),
        ms(recovered.saturating_duration_since(promoted)),
        ms(recovered - promoting),
        ms(recovered - killed),
        last_failure.map(|t| t.saturating_duration_since(promoted).as_millis()),
        ms(promoted - promoting),
    );
    assert!(
        recovered.saturating_duration_since(promoted) < Duration::from_secs(2),
        "writes succeed again within 2 s of the promotion: {}ms",
        ms(recovered.saturating_duration_since(promoted))
    );
    // Writes fail only while no primary exists (and up to 2 s after).
    for failure in &failures {
        assert!(
            failure.at >= killed && failure.at <= promoted + Duration::from_secs(2),
            "a write failed outside the window without a primary: {failure:?}"
        );
    }
    // After the old primary rejoined as a standby: every write on the new
    // primary, none refused, the pre-failover connection included.
    let after: Vec<&Outcome> = seen.iter().filter(|o| o.at >= rejoining).collect();
    assert!(!after.is_empty());
    assert!(after.iter().all(|o| o.result == Ok(new)), "{after:?}");
    assert!(
        held_write.is_err(),
        "the held connection died with its server"
    );
    assert_eq!(
        on_old_primary, 0,
        "no session of the pool on the old primary"
    );
    let stats = pool.stats();
    println!(
        "FAILOVER_STATS failovers={} closed_failover={} closed_broken={} host={:?} hosts={:?} rejoin_took={}ms",
        stats.counters.failovers,
        stats.counters.connections_closed_failover,
        stats.counters.connections_closed_broken,
        stats.host,
        stats.hosts,
        ms(rejoined - rejoining),
    );
    assert_eq!(stats.counters.failovers, 1);
    assert_eq!(stats.host, Some(format!("127.0.0.1:{new}")));
    // The rows written since the promotion are on the new primary.
    let written_after = seen
        .iter()
        .filter(|o| o.at >= promoting && o.result == Ok(new))
        .count();
    let (client, conn) = tokio_postgres::connect(&standby.url("postgres"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let rows: i64 = client
        .query_one("SELECT count(*) FROM writes", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        rows as usize >= written_after,
        "{rows} rows, {written_after} written"
    );
    pool.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_standby_follows_the_standby_away_and_back() {
    let (primary, standby) = pair();
    let app = common::app("prefer");
    // The primary first in the list: the pool must still prefer the standby.
    let pool = Pool::new(
        target(&[&primary, &standby], "prefer-standby"),
        config(&app, 4),
    )
    .unwrap();
    assert_eq!(
        pool.target().target_session_attrs(),
        SessionAttrs::PreferStandby
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (seen, tasks) = load(&pool, 8, READ, &stop);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let stopped = Instant::now();
    standby.stop().unwrap();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let resumed = Instant::now();
    standby.resume().unwrap();
    let back_deadline = Instant::now() + Duration::from_secs(20);
    let (old, new) = (primary.port(), standby.port());
    let back = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let seen = seen.lock().unwrap();
        if let Some(at) = first_success_on(&seen, new, resumed) {
            // Back for good: the primary's connections were retired.
            let last_on_primary = seen
                .iter()
                .filter(|o| o.result == Ok(old))
                .map(|o| o.at)
                .max();
            if last_on_primary.is_some_and(|p| p < at + Duration::from_millis(500))
                && Instant::now() > at + Duration::from_millis(800)
            {
                break at;
            }
        }
        assert!(
            Instant::now() < back_deadline,
            "the pool came back to the standby"
        );
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .filter(|o| o.at < stopped)
            .all(|o| o.result == Ok(new)),
        "reads on the standby while it is up"
    );
    let on_primary = first_success_on(&seen, old, stopped).expect("reads moved to the primary");
    let failed = seen.iter().filter(|o| o.result.is_err()).count();
    let tail: Vec<&Outcome> = seen
        .iter()
        .filter(|o| o.at > back + Duration::from_millis(800))
        .collect();
    assert!(tail.iter().all(|o| o.result == Ok(new)), "{tail:?}");
    let stats = pool.stats();
    println!(
        "PREFER_STANDBY reads={} failed={failed} to_primary_after_stop={}ms back_to_standby_after_resume={}ms failovers={} closed_failover={}",
        seen.len(),
        ms(on_primary - stopped),
        ms(back - resumed),
        stats.counters.failovers,
        stats.counters.connections_closed_failover,
    );
    assert!(stats.counters.failovers >= 2);
    assert_eq!(stats.host, Some(format!("127.0.0.1:{new}")));
    pool.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_turns_read_only_is_left_for_the_promoted_standby() {
    // The case of a pool that stays on a demoted primary because `SELECT 1`
    // still succeeds there: the server reports default_transaction_read_only
    // (PostgreSQL 14+), the pool leaves it, and writes go to the standby
    // once it is promoted.
    let (primary, standby) = pair();
    primary
        .execute("CREATE TABLE writes (id bigserial PRIMARY KEY, task int, n int)")
        .await
        .unwrap();
    let app = common::app("readonly");
    let pool = Pool::new(target(&[&primary, &standby], "read-write"), config(&app, 4)).unwrap();
    // A listener on the primary, which stays up: it must follow the pool.
    let mut listener = pool.listener().await.unwrap();
    listener.listen("after_failover").await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (seen, tasks) = load(&pool, 8, WRITE, &stop);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let turned = Instant::now();
    primary
        .execute("ALTER SYSTEM SET default_transaction_read_only = on")
        .await
        .unwrap();
    primary.execute("SELECT pg_reload_conf()").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let open_on_primary = pool.stats().hosts[0].connections;
    let promoting = Instant::now();
    standby.promote().unwrap();
    let promoted = Instant::now();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    let (old, new) = (primary.port(), standby.port());
    let refused = seen
        .iter()
        .filter(|o| o.result.as_ref().err().is_some_and(|e| e == "25006"))
        .count();
    let recovered = first_success_on(&seen, new, promoting).expect("writes on the new primary");
    let last_on_old = seen
        .iter()
        .filter(|o| o.result == Ok(old))
        .map(|o| o.at)
        .max()
        .unwrap();
    let stats = pool.stats();
    println!(
        "READ_ONLY writes={} refused_25006={refused} last_write_on_old_after_turn={}ms open_on_old_1s_later={open_on_primary} recovered_after_promote={}ms closed_failover={}",
        seen.len(),
        ms(last_on_old.saturating_duration_since(turned)),
        ms(recovered.saturating_duration_since(promoted)),
        stats.counters.connections_closed_failover,
    );
    // At most one refused write per connection open then: each connection
    // learns of the change with its next statement.
    assert!(refused <= 4, "{refused} writes refused as read-only");
    assert_eq!(open_on_primary, 0, "the pool left the read-only primary");
    assert!(recovered.saturating_duration_since(promoted) < Duration::from_secs(2));
    let tail: Vec<&Outcome> = seen
        .iter()
        .filter(|o| o.at > promoted + Duration::from_secs(1))
        .collect();
    assert!(tail.iter().all(|o| o.result == Ok(new)), "{tail:?}");
    // The listener left the old primary with the pool (a gap), and hears
    // what is sent on the new one.
    let gap = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("the listener reports its move")
        .unwrap();
    let pgfleet::ListenerEvent::Gap(gap) = gap else {
        panic!("a gap first, got {gap:?}");
    };
    assert!(gap.reason.contains("failover"), "{gap:?}");
    standby
        .execute("NOTIFY after_failover, 'on the new primary'")
        .await
        .unwrap();
    let heard = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("a notification")
        .unwrap();
    let pgfleet::ListenerEvent::Notification(n) = heard else {
        panic!("a notification, got {heard:?}");
    };
    assert_eq!(n.payload(), "on the new primary");
    pool.close();
}

/// The port of the server a connection is on.
async fn port_of(conn: &pgfleet::PooledConnection) -> u16 {
    let row = conn
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap();
    row.get::<_, i32>(0) as u16
}

/// Polls `get_read` (at most `within`) until a read lands on `port`;
/// returns how long it took.
async fn reads_reach(pool: &Pool, port: u16, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if let Ok(conn) = pool.get_read().await {
            if port_of(&conn).await == port {
                return started.elapsed();
            }
        }
        assert!(
            started.elapsed() < within,
            "reads did not reach port {port} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_the_least_busy_standby_and_fall_back_to_the_primary() {
    let primary = TempCluster::builder().replication().start().unwrap();
    let one = primary.start_standby().unwrap();
    let two = primary.start_standby().unwrap();
    let app = common::app("reads");
    let pool = Pool::new(
        target(&[&primary, &one, &two], "read-write"),
        config(&app, 8),
    )
    .unwrap();
    let writer = pool.get().await.unwrap();
    assert_eq!(port_of(&writer).await, primary.port());
    drop(writer);

    // Eight readers at once: spread over the two standbys, none on the
    // primary.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(pool.get_read().await.unwrap());
    }
    let mut ports = Vec::new();
    for conn in &held {
        ports.push(port_of(conn).await);
    }
    let on = |c: &TempCluster| ports.iter().filter(|p| **p == c.port()).count();
    println!(
        "READS spread: primary={} standby_one={} standby_two={}",
        on(&primary),
        on(&one),
        on(&two)
    );
    assert_eq!(on(&primary), 0);
    assert!(on(&one) >= 2 && on(&two) >= 2, "{ports:?}");
    drop(held);
    let reads = pool.reads().unwrap();
    // Spreading over the standbys is no failover: their connections were
    // kept, and the read side never connected to the primary.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let read_stats = reads.stats();
    assert_eq!(read_stats.counters.failovers, 0);
    assert_eq!(read_stats.counters.connections_closed_failover, 0);
    assert_eq!(read_stats.gauges.idle, 8, "{read_stats:?}");
    assert_eq!(
        primary
            .count_backends(&BackendFilter::all().application_name(&app))
            .await
            .unwrap(),
        1,
        "on the primary, only the writer's connection"
    );
    assert_eq!(
        reads.target().target_session_attrs(),
        SessionAttrs::PreferStandby
    );
    assert_eq!(reads.stats().hosts[0].connections, 0);

    // No standby: reads go to the primary, and back to a standby when one
    // returns.
    let stopped = Instant::now();
    one.stop().unwrap();
    two.stop().unwrap();
    let to_primary = reads_reach(&pool, primary.port(), Duration::from_secs(10)).await;
    let resumed = Instant::now();
    one.resume().unwrap();
    let back = reads_reach(&pool, one.port(), Duration::from_secs(20)).await;
    println!(
        "READS fallback_to_primary_after_standbys_stopped={}ms back_to_standby_after_resume={}ms (stopping both took {}ms)",
        ms(to_primary),
        ms(back),
        ms(resumed - stopped) - ms(to_primary)
    );
    // Writes stayed on the primary throughout.
    assert_eq!(port_of(&pool.get().await.unwrap()).await, primary.port());

    // With read_fallback = error, no standby means no read.
    two.resume().unwrap();
    one.stop().unwrap();
    two.stop().unwrap();
    let strict = Pool::new(
        target(&[&primary, &one, &two], "read-write"),
        PoolConfig {
            read_fallback: pgfleet::ReadFallback::Error,
            acquire_timeout: Duration::from_secs(1),
            ..config(&app, 2)
        },
    )
    .unwrap();
    let refused = strict.get_read().await.map(|_| ()).unwrap_err().to_string();
    assert!(
        refused.contains("target_session_attrs = standby"),
        "{refused}"
    );
    assert_eq!(port_of(&strict.get().await.unwrap()).await, primary.port());
    strict.close();
    pool.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_standby_takes_no_reads_until_it_catches_up() {
    let (primary, standby) = pair();
    primary
        .execute("CREATE TABLE writes (id bigserial PRIMARY KEY, task int, n int)")
        .await
        .unwrap();
    let app = common::app("lag");
    let pool = Pool::new(
        target(&[&primary, &standby], "read-write"),
        PoolConfig {
            max_replication_lag: Some(Duration::from_secs(1)),
            ..config(&app, 4)
        },
    )
    .unwrap();
    reads_reach(&pool, standby.port(), Duration::from_secs(10)).await;
    // A fresh transaction replayed just before the pause, so that the lag
    // counts from its commit (after `committed_after`), a little before the
    // pause.
    let committed_after = Instant::now();
    primary
        .execute("INSERT INTO writes (task, n) VALUES (0, 0)")
        .await
        .unwrap();
    let (client, conn) = tokio_postgres::connect(&standby.url("postgres"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let replay_deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // The table itself may not be replayed yet (42P01).
        let rows: i64 = match client.query_one("SELECT count(*) FROM writes", &[]).await {
            Ok(row) => row.get(0),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => 0,
            Err(e) => panic!("reading the standby: {e}"),
        };
        if rows > 0 {
            break;
        }
        assert!(Instant::now() < replay_deadline, "the standby replays");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Replay stops while the primary keeps writing: the standby falls
    // behind.
    standby
        .execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (_, writers) = load(&pool, 2, WRITE, &stop);
    let paused = Instant::now();
    let left = reads_reach(&pool, primary.port(), Duration::from_secs(15)).await;
    standby
        .execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    let back = reads_reach(&pool, standby.port(), Duration::from_secs(20)).await;
    stop.store(true, Ordering::Relaxed);
    for task in writers {
        task.await.unwrap();
    }
    println!(
        "LAG reads_left_lagging_standby_after_pause={}ms back_after_resume={}ms",
        ms(left),
        ms(back)
    );
    assert!(paused.elapsed() >= left);
    // The lag passes 1 s one second after that commit, not before.
    let since_commit = paused.duration_since(committed_after) + left;
    assert!(
        since_commit >= Duration::from_secs(1),
        "not before it lags: {left:?} after the pause, {since_commit:?} after the commit"
    );
    pool.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_host_is_passed_over_not_left() {
    // A connect that times out says the server is slow, not gone: the
    // pool opens its next connection elsewhere but keeps the ones it has
    // and counts no failover.
    let cluster = TempCluster::start().unwrap();
    let proxy = pgfleet_testkit::FaultProxy::start(cluster.port())
        .await
        .unwrap();
    let url = format!(
        "postgres://postgres:{}@127.0.0.1:{},127.0.0.1:{}/postgres",
        TempCluster::superuser_password(),
        proxy.port(),
        cluster.port()
    );
    let app = common::app("slow");
    let pool = Pool::new(
        Target::parse(&url).unwrap(),
        PoolConfig {
            connect_timeout: Duration::from_millis(500),
            ..config(&app, 4)
        },
    )
    .unwrap();
    let first = pool.get().await.unwrap();
    let second = pool.get().await.unwrap();
    assert_eq!(pool.stats().hosts[0].connections, 2);
    proxy.set(pgfleet_testkit::Fault::HangNew);
    let third = pool.get().await.unwrap();
    let stats = pool.stats();
    assert_eq!(stats.hosts[0].connections, 2, "{stats:?}");
    assert_eq!(stats.hosts[1].connections, 1, "{stats:?}");
    assert_eq!(stats.counters.failovers, 0);
    assert_eq!(stats.counters.connections_closed_failover, 0);
    // The connections on the slow host still work.
    first.execute("SELECT 1", &[]).await.unwrap();
    drop((first, second, third));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(pool.stats().gauges.idle, 3);
    pool.close();
}
