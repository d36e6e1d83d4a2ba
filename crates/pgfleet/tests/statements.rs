//! The statement methods on the pool (`pool.query` and its kin): each call
//! gets its own result when many share a lane; statements that must not be
//! pipelined run on a connection of their own and still work; a per-call
//! timeout and a dropped future cancel their statement on the server and
//! nobody else's; a storm of dropped futures leaves every lane usable.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{app, backends, cluster, config, eventually, target};
use pgfleet::{Fleet, Pool};
use tokio_postgres::types::Type;

/// A pool tagged `app` whose statement methods use `lanes` lanes.
fn pool(app: &str, lanes: u32, max_size: u32) -> Pool {
    let mut cfg = config(app, 0, max_size);
    cfg.shared_connections = Some(lanes);
    Pool::new(target(cluster()), cfg).unwrap()
}

/// Statements of `app` running on the server now whose text contains
/// `needle`, seen by a pool of its own.
async fn running(observer: &Pool, app: &str, needle: &str) -> i64 {
    observer
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 \
             AND state = 'active' AND position($2 in query) > 0",
            &[&app, &needle],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_callers_on_one_lane_each_get_their_own_result() {
    let app = app("stmt_mixed");
    let pool = pool(&app, 1, 4);
    let mut tasks = Vec::new();
    for task in 0..64i32 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..40i32 {
                let n = task * 1000 + i;
                match i % 4 {
                    0 => {
                        let row = pool.query_one("SELECT $1::int4 * 2", &[&n]).await.unwrap();
                        assert_eq!(row.get::<_, i32>(0), n * 2);
                    }
                    1 => {
                        // Division by zero for this call only.
                        let e = pool
                            .query_one("SELECT $1::int4 / ($1::int4 - $1::int4)", &[&n])
                            .await
                            .unwrap_err();
                        assert_eq!(e.code(), Some("22012"), "{e}");
                    }
                    2 => {
                        let rows = pool
                            .query("SELECT g FROM generate_series(1, $1::int4) g", &[&(i % 5)])
                            .await
                            .unwrap();
                        assert_eq!(rows.len(), (i % 5) as usize);
                    }
                    _ => {
                        // A statement the server refuses to prepare.
                        let e = pool
                            .execute("SELECT FROM no_such_table_here", &[])
                            .await
                            .unwrap_err();
                        assert_eq!(e.code(), Some("42P01"), "{e}");
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = pool.stats();
    assert_eq!(stats.gauges.lanes, 1, "{stats:?}");
    assert_eq!(stats.counters.statements_exclusive, 0, "{stats:?}");
    assert_eq!(stats.counters.statements_pipelined, 64 * 40, "{stats:?}");
    // One lane is one backend, whatever the number of callers.
    assert_eq!(backends(&app).await, 1);
    pool.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_that_must_not_be_pipelined_run_on_their_own_and_work() {
    let app = app("stmt_exclusive");
    let pool = pool(&app, 2, 6);
    pool.execute("CREATE TABLE IF NOT EXISTS stmt_copy (a int)", &[])
        .await
        .unwrap();
    let before = pool.stats().counters.statements_exclusive;
    // Transaction control: runs; the transaction it opened is rolled back
    // when its connection comes back.
    pool.execute("BEGIN", &[]).await.unwrap();
    // Session state: runs, and nobody after it sees it.
    pool.execute("SET search_path = nowhere", &[])
        .await
        .unwrap();
    pool.execute("LISTEN stmt_channel", &[]).await.unwrap();
    pool.execute("CREATE TEMP TABLE stmt_temp (a int)", &[])
        .await
        .unwrap();
    let locked: bool = pool
        .query_one("SELECT pg_try_advisory_lock(4242)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(locked);
    // COPY to a file on the server, and a script of several statements.
    pool.execute("COPY stmt_copy TO '/dev/null'", &[])
        .await
        .unwrap();
    let script = pool
        .simple_query("INSERT INTO stmt_copy VALUES (1); SELECT count(*) FROM stmt_copy")
        .await
        .unwrap();
    assert!(script
        .iter()
        .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))));
    // Outside any transaction block, and not undone by a cancel: never
    // pipelined.
    pool.execute("VACUUM stmt_copy", &[]).await.unwrap();
    let exclusive = pool.stats().counters.statements_exclusive - before;
    assert_eq!(exclusive, 8, "{:?}", pool.stats());
    // A COPY stream cannot be one call: a clear error.
    let e = pool
        .execute("COPY stmt_copy TO STDOUT", &[])
        .await
        .unwrap_err();
    assert!(e.is_unsupported(), "{e}");
    assert!(e.to_string().contains("copy_out"), "{e}");

    // Nothing of it is left on any connection: every connection of the
    // pool but the lanes, taken at once (the statements above ran on them).
    let lanes = pool.stats().gauges.lanes as usize;
    let mut held = Vec::new();
    for _ in 0..(6 - lanes) {
        held.push(pool.get().await.unwrap());
    }
    for conn in &held {
        let row = conn
            .query_one(
                "SELECT current_setting('search_path'), \
                 (SELECT count(*) FROM pg_listening_channels()), \
                 (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
                  AND pid = pg_backend_pid()), \
                 to_regclass('stmt_temp') IS NULL",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "\"$user\", public");
        assert_eq!(row.get::<_, i64>(1), 0);
        assert_eq!(row.get::<_, i64>(2), 0);
        assert!(row.get::<_, bool>(3), "the temporary table is gone");
        assert!(!common::in_transaction(conn).await);
    }
    drop(held);
    pool.execute("DROP TABLE stmt_copy", &[]).await.unwrap();
    pool.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_and_prepared_statements_and_the_fleet_handle() {
    let app = app("stmt_typed");
    let fleet = Fleet::new();
    let mut cfg = config(&app, 0, 4);
    cfg.shared_connections = Some(2);
    let handle = fleet.pool(&target(cluster()), &cfg).unwrap();
    // The fleet's handle has the statement methods (it derefs to the pool).
    let rows = handle
        .query_typed("SELECT $1 + 1", &[(&41i64, Type::INT8)])
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 42);
    let statement = handle
        .prepare_cached("SELECT $1::text || '!'")
        .await
        .unwrap();
    assert!(statement.is_pipelined());
    assert_eq!(statement.params(), &[Type::TEXT]);
    for word in ["a", "b", "c"] {
        let row = handle.query_one(&statement, &[&word]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), format!("{word}!"));
    }
    let set = handle.prepare_cached("SET work_mem = '8MB'").await.unwrap();
    assert!(!set.is_pipelined());
    handle.execute(&set, &[]).await.unwrap();
    // A wrong parameter type is this call's error.
    let e = handle.query(&statement, &[&1i32]).await.unwrap_err();
    assert!(e.to_string().contains("parameter $1"), "{e}");
    let messages = handle.simple_query("SELECT 'x'").await.unwrap();
    assert_eq!(messages.len(), 3, "RowDescription, Row, CommandComplete");
    fleet.close_all(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_call_timeout_cancels_its_statement_and_no_other() {
    let app = app("stmt_timeout");
    let pool = pool(&app, 1, 4);
    let observer = pool_for_observing();
    // Neighbours on the one lane, all through the timeout.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut neighbours = Vec::new();
    for task in 0..16i32 {
        let (pool, stop, done) = (pool.clone(), stop.clone(), done.clone());
        neighbours.push(tokio::spawn(async move {
            let mut i = 0i32;
            while !stop.load(Ordering::Relaxed) && i < 100_000 {
                let n = task * 100_000 + i;
                let row = pool.query_one("SELECT $1::int4 + 1", &[&n]).await;
                assert_eq!(row.unwrap().get::<_, i32>(0), n + 1);
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }));
    }
    for round in 0..3 {
        let started = Instant::now();
        let e = pool
            .with_timeout(Duration::from_millis(300))
            .query("SELECT pg_sleep(30)", &[])
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert!(e.is_timeout(), "{e}");
        assert!(took < Duration::from_secs(5), "round {round}: {took:?}");
        // Cancelled on the server: it is not running there any more.
        let mut gone = false;
        for _ in 0..100 {
            if running(&observer, &app, "pg_sleep").await == 0 {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(gone, "round {round}: pg_sleep still runs on the server");
        eprintln!("TIMEOUT round {round}: error after {took:?}");
    }
    stop.store(true, Ordering::Relaxed);
    for t in neighbours {
        t.await.unwrap();
    }
    let stats = pool.stats();
    assert!(stats.counters.statements_cancelled >= 3, "{stats:?}");
    // Each cancel reached pg_sleep, the head of the lane: none landed on a
    // neighbour (one would have been run again).
    assert_eq!(stats.counters.statements_retried, 0, "{stats:?}");
    assert!(done.load(Ordering::Relaxed) > 0);
    eprintln!(
        "TIMEOUT neighbours ran {} statements, {} of them again after a cancel",
        done.load(Ordering::Relaxed),
        stats.counters.statements_retried
    );
    // Fast again: the lane is not fenced any more.
    let started = Instant::now();
    pool.query_one("SELECT 1", &[]).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(pool.stats().gauges.lanes, 1);
    pool.close();
    observer.close();
}

fn pool_for_observing() -> Pool {
    let mut cfg = config(&app("stmt_observer"), 0, 2);
    cfg.shared_connections = Some(1);
    Pool::new(target(cluster()), cfg).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_dropped_futures_leaves_every_lane_usable() {
    let app = app("stmt_storm");
    let pool = pool(&app, 2, 6);
    let observer = pool_for_observing();
    let survivors = Arc::new(AtomicU64::new(0));
    // 1,000 futures in 10 waves of 100 at once, each dropped after 0-30 ms:
    // before it is sent, while it waits on the lane, while it runs, or
    // never (it finished).
    let storm = {
        let (pool, survivors) = (pool.clone(), survivors.clone());
        tokio::spawn(async move {
            for wave in 0..10u64 {
                let mut tasks = Vec::new();
                for i in 0..100u64 {
                    let (pool, survivors) = (pool.clone(), survivors.clone());
                    let task = wave * 100 + i;
                    tasks.push(tokio::spawn(async move {
                        let cut = Duration::from_micros(fastrand::u64(0..30_000));
                        // Most are quick; 3 in 20 sleep 1-5 ms, and 1 in 20
                        // 50-200 ms: always cut, and cancelled on the server.
                        let sleep = match fastrand::u8(0..20) {
                            0 => 0.05 + fastrand::f64() * 0.15,
                            1..=3 => 0.001 + fastrand::f64() * 0.004,
                            _ => 0.0,
                        };
                        let id = task as i64;
                        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&id, &sleep];
                        let call = pool.query_one("SELECT pg_sleep($2::float8), $1::int8", &params);
                        if let Ok(row) = tokio::time::timeout(cut, call).await {
                            assert_eq!(row.unwrap().get::<_, i64>(1), id);
                            survivors.fetch_add(1, Ordering::Relaxed);
                        }
                    }));
                }
                for t in tasks {
                    t.await.unwrap();
                }
            }
        })
    };
    // Calls that are not dropped, during the storm: every one succeeds.
    let mut steady = Vec::new();
    for task in 0..8i64 {
        let pool = pool.clone();
        steady.push(tokio::spawn(async move {
            for i in 0..200i64 {
                let n = task * 1000 + i;
                let row = pool.query_one("SELECT $1::int8", &[&n]).await.unwrap();
                assert_eq!(row.get::<_, i64>(0), n);
            }
        }));
    }
    storm.await.unwrap();
    for t in steady {
        t.await.unwrap();
    }
    // Every abandoned statement is finished or cancelled, and nothing of
    // the storm runs on the server.
    let mut quiet = false;
    for _ in 0..250 {
        if running(&observer, &app, "pg_sleep").await == 0 {
            quiet = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(quiet, "statements of the storm still run");
    // Every lane is usable: many calls at once, all right.
    let mut after = Vec::new();
    for i in 0..64i64 {
        let pool = pool.clone();
        after.push(tokio::spawn(async move {
            let row = pool.query_one("SELECT $1::int8 * 2", &[&i]).await.unwrap();
            assert_eq!(row.get::<_, i64>(0), i * 2);
        }));
    }
    for t in after {
        t.await.unwrap();
    }
    // The pool is whole: only the lanes are out, within the cap.
    let stats = pool.stats();
    eprintln!(
        "STORM survivors {} of 1000; cancels {}; retried {}; lanes {}; {:?}",
        survivors.load(Ordering::Relaxed),
        stats.counters.statements_cancelled,
        stats.counters.statements_retried,
        stats.gauges.lanes,
        stats.gauges
    );
    assert!(stats.gauges.lanes <= 2, "{stats:?}");
    assert!(
        eventually(Duration::from_secs(10), || {
            let g = pool.stats().gauges;
            g.in_use == g.lanes && g.size <= 6
        })
        .await,
        "{:?}",
        pool.stats()
    );
    let mut conn = pool.get().await.unwrap();
    conn.transaction().await.unwrap().commit().await.unwrap();
    drop(conn);
    pool.close();
    observer.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_follow_the_load_up_to_their_cap() {
    let app = app("stmt_lanes");
    // 4 lanes at most (half of max_size 8), opened as the load asks.
    let pool = pool(&app, 4, 8);
    pool.query_one("SELECT 1", &[]).await.unwrap();
    assert_eq!(pool.stats().gauges.lanes, 1, "one caller, one lane");
    // 16 callers at once pipeline on that one lane: another opens only
    // past 32 statements in flight on every lane.
    let mut tasks = Vec::new();
    for i in 0..16i64 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            for j in 0..50i64 {
                let row = pool.query_one("SELECT $1::int8", &[&(i + j)]).await;
                assert_eq!(row.unwrap().get::<_, i64>(0), i + j);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(pool.stats().gauges.lanes, 1, "{:?}", pool.stats());
    let mut tasks = Vec::new();
    for i in 0..256i64 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            for j in 0..50i64 {
                let row = pool
                    .query_one("SELECT $1::int8 FROM pg_sleep(0.001)", &[&(i + j)])
                    .await;
                assert_eq!(row.unwrap().get::<_, i64>(0), i + j);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(pool.stats().gauges.lanes, 4, "{:?}", pool.stats());
    // A pool of one connection has no lanes: every call is exclusive.
    let single = pool_of_one(&app);
    single.query_one("SELECT 1", &[]).await.unwrap();
    let stats = single.stats();
    assert_eq!(stats.gauges.lanes, 0);
    assert_eq!(stats.counters.statements_exclusive, 1);
    pool.close();
    single.close();
}

fn pool_of_one(app: &str) -> Pool {
    Pool::new(target(cluster()), config(app, 0, 1)).unwrap()
}
