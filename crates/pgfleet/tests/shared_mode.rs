//! Shared mode (`Pool::shared`): many tasks' autocommit statements pipelined
//! over `shared_connections` connections; a lane left in a transaction is
//! taken out of service and rolled back; lanes go back to the pool when
//! unused and when the pool closes; cancelled calls lose nothing.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{app, backends, cluster, config, settle_backends, target};
use pgfleet::Pool;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_share_a_few_connections() {
    let app = app("shared_many");
    let mut cfg = config(&app, 0, 8);
    cfg.shared_connections = Some(2);
    let pool = Pool::new(target(cluster()), cfg).unwrap();
    let mut tasks = Vec::new();
    for i in 0..200i32 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut sum = 0i64;
            for j in 0..20i32 {
                let conn = pool.shared().await.unwrap();
                let row = conn
                    .query_one("SELECT $1::int4 + $2::int4", &[&i, &j])
                    .await
                    .unwrap();
                sum += i64::from(row.get::<_, i32>(0));
            }
            (i, sum)
        }));
    }
    let mut peak = 0;
    let probe = {
        let app = app.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            for _ in 0..20 {
                peak = peak.max(backends(&app).await);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            peak
        })
    };
    for t in tasks {
        let (i, sum) = t.await.unwrap();
        assert_eq!(sum, i64::from(i) * 20 + (0..20).sum::<i64>(), "task {i}");
    }
    peak = peak.max(probe.await.unwrap());
    peak = peak.max(backends(&app).await);
    let stats = pool.stats();
    // The lanes are the only connections in use. On a loaded machine a
    // connect that runs late gets a replacement (the pool's overdue rule),
    // which then sits idle: at most one per lane, never in use.
    let extra = stats.gauges.idle as usize;
    if extra > 0 {
        eprintln!(
            "{extra} connect(s) ran late and were replaced; the extra connection(s) stayed idle"
        );
    }
    assert!(extra <= 2, "{stats:?}");
    assert!(
        peak <= 2 + extra,
        "{peak} backends for 2 shared connections and {extra} idle"
    );
    assert_eq!(stats.gauges.shared, 2);
    assert_eq!(stats.counters.shared_leases, 200 * 20);
    assert_eq!(stats.gauges.in_use, 2, "lanes count as in use");
    // Exclusive checkout still works beside shared mode, from the rest.
    let exclusive = pool.get().await.unwrap();
    exclusive.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn lane_left_in_a_transaction_is_taken_out_and_rolled_back() {
    let app = app("shared_tx");
    let mut cfg = config(&app, 0, 4);
    cfg.shared_connections = Some(1);
    let pool = Pool::new(target(cluster()), cfg).unwrap();
    let table = format!("shared_{}", app.replace('-', "_"));
    pool.shared()
        .await
        .unwrap()
        .batch_execute(&format!("CREATE TABLE {table} (v int)"))
        .await
        .unwrap();
    {
        let conn = pool.shared().await.unwrap();
        // Misuse: a transaction on a shared connection.
        conn.batch_execute(&format!("BEGIN; INSERT INTO {table} VALUES (1)"))
            .await
            .unwrap();
    }
    assert!(
        common::eventually(Duration::from_secs(5), || pool
            .stats()
            .counters
            .dirty_returns
            == 1)
        .await,
        "the lane's connection is rolled back on its way back: {:?}",
        pool.stats().counters
    );
    let conn = pool.shared().await.unwrap();
    let n: i64 = conn
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the uncommitted row is gone");
    // Outside a transaction: SAVEPOINT fails with 25P01.
    let err = conn.batch_execute("SAVEPOINT probe").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("25P01"), "{err}");
    assert_eq!(pool.stats().gauges.shared, 1);
}

#[tokio::test]
async fn unused_lanes_go_back_to_the_pool_and_close_with_it() {
    let app = app("shared_idle");
    let mut cfg = config(&app, 0, 4);
    cfg.shared_connections = Some(2);
    cfg.idle_timeout = Some(Duration::from_millis(200));
    let pool = Pool::new(target(cluster()), cfg).unwrap();
    let (a, b) = (pool.shared().await.unwrap(), pool.shared().await.unwrap());
    a.simple_query("SELECT 1").await.unwrap();
    b.simple_query("SELECT 1").await.unwrap();
    assert!(
        common::eventually(Duration::from_secs(5), || pool.stats().gauges.shared == 2).await,
        "a second lane is opened while the first is leased"
    );
    drop((a, b));
    assert!(
        common::eventually(Duration::from_secs(5), || pool.stats().gauges.shared == 0).await,
        "unused lanes are given back"
    );
    assert_eq!(
        settle_backends(&app, 0).await,
        0,
        "and closed after idle_timeout"
    );

    let lease = pool.shared().await.unwrap();
    pool.close();
    let err = pool.shared().await.unwrap_err();
    assert!(err.is_closed(), "{err}");
    // The lease still works until dropped; then its connection closes.
    lease.simple_query("SELECT 1").await.unwrap();
    drop(lease);
    assert_eq!(
        pool.wait_closed(std::time::Instant::now() + Duration::from_secs(5))
            .await,
        0
    );
    assert_eq!(settle_backends(&app, 0).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_past_max_queries_are_replaced_without_failing_anyone() {
    let app = app("shared_recycle");
    let mut cfg = config(&app, 0, 4);
    cfg.shared_connections = Some(1);
    cfg.max_queries = Some(50);
    let pool = Pool::new(target(cluster()), cfg).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..30 {
                let conn = pool.shared().await.unwrap();
                conn.simple_query("SELECT 1").await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // A lane past max_queries serves on until its replacement is open (a
    // connect takes longer than 50 pipelined statements here), so the limit
    // is soft: at least one replacement, and nobody failed (unwraps above).
    assert!(
        common::eventually(Duration::from_secs(5), || pool
            .stats()
            .counters
            .connections_closed_max_queries
            >= 1)
        .await,
        "{:?}",
        pool.stats().counters
    );
    assert!(pool.stats().counters.connections_created >= 2);
    assert!(pool.stats().gauges.size <= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_shared_calls_lose_nothing() {
    let app = app("shared_cancel");
    let mut cfg = config(&app, 0, 3);
    cfg.shared_connections = Some(2);
    let pool = Arc::new(Pool::new(target(cluster()), cfg).unwrap());
    let mut tasks = Vec::new();
    for i in 0..300u64 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            // Give up at points spread over lane creation and use.
            let limit = Duration::from_micros(fastrand_like(i) % 20_000);
            let _ = tokio::time::timeout(limit, async {
                let conn = pool.shared().await?;
                conn.simple_query("SELECT pg_sleep(0.001)").await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
            .await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        common::eventually(Duration::from_secs(5), || {
            let g = pool.stats().gauges;
            g.waiting == 0 && g.connecting == 0 && g.shared <= 2 && g.size <= 3
        })
        .await,
        "{:?}",
        pool.stats().gauges
    );
    // The pool is whole: shared mode and every remaining connection work.
    pool.shared()
        .await
        .unwrap()
        .simple_query("SELECT 1")
        .await
        .unwrap();
    let free = 3 - pool.stats().gauges.shared;
    let mut held = Vec::new();
    for _ in 0..free {
        held.push(pool.get().await.unwrap());
    }
    assert_eq!(held.len() as u32, free);
}

/// A deterministic spread of numbers (no RNG dependency needed).
fn fastrand_like(i: u64) -> u64 {
    i.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17)
}

#[tokio::test]
async fn shared_callers_time_out_within_their_own_deadline_and_are_counted() {
    let app = app("shared_timeout");
    let mut cfg = config(&app, 1, 1);
    cfg.acquire_timeout = Duration::from_secs(1);
    let pool = Pool::new(target(cluster()), cfg).unwrap();
    pool.wait_ready(Duration::from_secs(10)).await.unwrap();
    // The only connection is out: the first shared caller waits in `get`
    // for the first lane; the second waits for that attempt, and when it
    // fails, tries again itself with what is left of its own time.
    let held = pool.get().await.unwrap();
    let first = tokio::spawn({
        let pool = pool.clone();
        async move { pool.shared().await.map(drop) }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let second = pool.shared().await.unwrap_err();
    let waited = started.elapsed();
    assert!(second.is_timeout(), "{second:?}");
    assert!(
        waited < Duration::from_millis(1500),
        "waited {waited:?} for a 1s acquire_timeout"
    );
    assert!(first.await.unwrap().unwrap_err().is_timeout());
    assert_eq!(pool.stats().counters.acquires_timed_out, 2);
    drop(held);
}

#[tokio::test]
async fn resizing_below_the_lanes_trims_them_and_the_pool_shrinks() {
    let app = app("shared_resize");
    let mut cfg = config(&app, 0, 4);
    cfg.shared_connections = Some(3);
    let pool = Pool::new(target(cluster()), cfg).unwrap();
    // Three leases at once open three lanes.
    let leases = [
        pool.shared().await.unwrap(),
        pool.shared().await.unwrap(),
        pool.shared().await.unwrap(),
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pool.stats().gauges.shared < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "three lanes never opened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(leases);
    pool.resize(0, 2).unwrap();
    // The next lease trims the lanes to the new cap; the extra one goes
    // back to the pool, which closes it (above the cap).
    drop(pool.shared().await.unwrap());
    assert_eq!(pool.stats().gauges.shared, 2);
    assert_eq!(settle_backends(&app, 2).await, 2);
    assert_eq!(pool.stats().gauges.size, 2);
    pool.close();
}
