//! Connection lifecycle with short settings: lifetime, idle timeout,
//! max_queries, floor refill, health checks, and the per-connection
//! settings (statement timeout, server settings, application_name).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{app, backends, cluster, config, settle_backends, target};
use pgfleet::Pool;

async fn backend_pid(pool: &Pool) -> i32 {
    let conn = pool.get().await.unwrap();
    conn.query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn connections_are_retired_after_their_lifetime() {
    let app = app("lifetime");
    let mut cfg = config(&app, 1, 1);
    cfg.max_lifetime = Some(Duration::from_millis(300));
    let pool = Pool::new(target(cluster()), cfg).unwrap();
    let first = backend_pid(&pool).await;
    tokio::time::sleep(Duration::from_millis(450)).await;
    let second = backend_pid(&pool).await;
    assert_ne!(first, second, "a connection past its lifetime was reused");
    let c = pool.stats().counters;
    assert!(c.connections_closed_lifetime >= 1, "{c:?}");
    assert!(c.connections_created >= 2);
    assert!(backends(&app).await <= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_above_the_floor_close_after_idle_timeout() {
    let app = app("idle");
    let mut cfg = config(&app, 1, 3);
    cfg.idle_timeout = Some(Duration::from_millis(200));
    let pool = Pool::new(target(cluster()), cfg).unwrap();
    {
        let a = pool.get().await.unwrap();
        let b = pool.get().await.unwrap();
        let c = pool.get().await.unwrap();
        for conn in [&a, &b, &c] {
            conn.query_one("SELECT 1", &[]).await.unwrap();
        }
    }
    assert_eq!(pool.stats().gauges.size, 3);
    assert!(common::eventually(Duration::from_secs(5), || pool.stats().gauges.size == 1).await);
    assert_eq!(pool.stats().counters.connections_closed_idle, 2);
    assert_eq!(settle_backends(&app, 1).await, 1, "the floor stays open");
}

#[tokio::test]
async fn connection_is_replaced_after_max_queries() {
    let app = app("maxq");
    let mut cfg = config(&app, 0, 1);
    cfg.max_queries = Some(3);
    let pool = Pool::new(target(cluster()), cfg).unwrap();
    let mut pids = HashSet::new();
    for _ in 0..7 {
        // One statement per checkout: connections serve 3 each.
        pids.insert(backend_pid(&pool).await);
    }
    assert_eq!(pids.len(), 3, "7 statements at 3 per connection");
    assert_eq!(pool.stats().counters.connections_closed_max_queries, 2);
}

#[tokio::test]
async fn floor_is_refilled_after_connections_break() {
    let app = app("refill");
    let pool = Pool::new(target(cluster()), config(&app, 3, 5)).unwrap();
    pool.wait_ready(Duration::from_secs(10)).await.unwrap();
    assert_eq!(settle_backends(&app, 3).await, 3);
    let killed = cluster()
        .terminate(&pgfleet_testkit::BackendFilter::all().application_name(&app))
        .await
        .unwrap();
    assert_eq!(killed, 3);
    // The maintenance task notices the dead connections and reopens the floor.
    assert!(
        common::eventually(Duration::from_secs(10), || {
            let s = pool.stats();
            s.counters.connections_created >= 6 && s.gauges.idle == 3
        })
        .await,
        "{:?}",
        pool.stats()
    );
    assert_eq!(pool.stats().counters.connections_closed_broken, 3);
    assert_eq!(settle_backends(&app, 3).await, 3);
}

#[tokio::test]
async fn idle_connection_is_health_checked_and_hot_one_is_not() {
    let app = app("health");
    let mut cfg = config(&app, 0, 1);
    // Wide enough that a loaded machine does not make the hot path look idle.
    cfg.health_check_after = Duration::from_millis(800);
    let pool = Pool::new(target(cluster()), cfg).unwrap();
    backend_pid(&pool).await;
    backend_pid(&pool).await;
    assert_eq!(
        pool.stats().counters.health_checks,
        0,
        "hot connections need no round trip"
    );
    tokio::time::sleep(Duration::from_millis(900)).await;
    backend_pid(&pool).await;
    assert_eq!(pool.stats().counters.health_checks, 1);
}

#[tokio::test]
async fn command_timeout_server_settings_and_application_name_reach_the_server() {
    let app = app("settings");
    let mut cfg = config(&app, 0, 1);
    cfg.command_timeout = Some(Duration::from_millis(150));
    cfg.server_settings.insert("work_mem".into(), "7MB".into());
    cfg.server_settings
        .insert("search_path".into(), "pg_catalog, public".into());
    let pool = Pool::new(target(cluster()), cfg).unwrap();
    let conn = pool.get().await.unwrap();
    let err = conn.batch_execute("SELECT pg_sleep(5)").await.unwrap_err();
    assert_eq!(
        err.code().unwrap().code(),
        "57014",
        "statement_timeout cancels: {err}"
    );
    let row = conn
        .query_one(
            "SELECT current_setting('work_mem'), current_setting('search_path'), \
             current_setting('statement_timeout'), current_setting('application_name')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "7MB");
    assert_eq!(row.get::<_, String>(1), "pg_catalog, public");
    assert_eq!(row.get::<_, String>(2), "150ms");
    assert_eq!(row.get::<_, String>(3), app);
}

#[tokio::test]
async fn connection_held_past_leak_threshold_is_reported_with_its_location() {
    let app = app("leak");
    let mut cfg = config(&app, 0, 1);
    cfg.leak_threshold = Some(Duration::from_millis(50));
    let pool = Pool::new(target(cluster()), cfg).unwrap();
    let conn = pool.get().await.unwrap();
    assert_eq!(conn.location().file(), file!(), "get() records its caller");
    tokio::time::sleep(Duration::from_millis(80)).await;
    drop(conn);
    drop(pool.get().await.unwrap());
    assert_eq!(pool.stats().counters.leaks_reported, 1);
}

#[tokio::test]
async fn connections_opened_together_expire_apart() {
    let app = app("jitter");
    let mut cfg = config(&app, 10, 10);
    cfg.max_lifetime = Some(Duration::from_secs(3));
    cfg.idle_timeout = None;
    let pool = Pool::new(target(cluster()), cfg).unwrap();
    pool.wait_ready(Duration::from_secs(10)).await.unwrap();
    // Watch the first ten lifetime closes: when each was seen.
    let started = std::time::Instant::now();
    let mut seen = Vec::new();
    let mut last = 0;
    while seen.len() < 10 && started.elapsed() < Duration::from_secs(10) {
        let closed = pool.stats().counters.connections_closed_lifetime;
        for _ in last..closed.min(10) {
            seen.push(started.elapsed());
        }
        last = closed.min(10);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen.len(), 10, "ten connections should have expired");
    let moments: HashSet<u128> = seen.iter().map(|d| d.as_millis() / 10).collect();
    assert!(
        moments.len() >= 3,
        "the ten lifetime closes came in {} moments ({seen:?}): the jitter was lost",
        moments.len()
    );
    pool.close();
}

#[tokio::test]
async fn a_connection_never_returned_is_reported_while_it_is_held() {
    let app = app("leak");
    let mut cfg = config(&app, 1, 3);
    cfg.leak_threshold = Some(Duration::from_millis(300));
    let pool = Pool::new(target(cluster()), cfg).unwrap();
    let held = pool.get().await.unwrap();
    // Shared mode keeps its connections on purpose: not leaks.
    let lease = pool.shared().await.unwrap();
    let reported = || pool.stats().counters.leaks_reported;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while reported() == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        reported(),
        1,
        "the held connection was not reported while held"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        reported(),
        1,
        "reported once, and the shared lane not at all"
    );
    drop(held);
    drop(lease);
    // A short hold is no leak; returning the leaked one counts nothing more.
    drop(pool.get().await.unwrap());
    assert_eq!(reported(), 1);
    pool.close();
}

#[tokio::test]
async fn a_pool_resizes_up_and_down_without_touching_connections_in_use() {
    let app = app("resize");
    let pool = Pool::new(target(cluster()), config(&app, 2, 4)).unwrap();
    pool.wait_ready(Duration::from_secs(10)).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(pool.get().await.unwrap());
    }
    pool.resize(1, 2).unwrap();
    assert_eq!((pool.stats().min_size, pool.stats().max_size), (1, 2));
    // Nothing in use is touched: all four still answer.
    for conn in &held {
        conn.simple_query("SELECT 1").await.unwrap();
    }
    assert_eq!(backends(&app).await, 4);
    // As they come back, the ones above the new cap close.
    held.clear();
    assert_eq!(settle_backends(&app, 2).await, 2);
    let stats = pool.stats();
    assert_eq!(stats.counters.connections_closed_resized, 2);
    assert_eq!(stats.gauges.size, 2);
    // Growing: the new floor opens, and callers can take the new cap.
    pool.resize(3, 6).unwrap();
    assert_eq!(settle_backends(&app, 3).await, 3);
    for _ in 0..6 {
        held.push(pool.get().await.unwrap());
    }
    assert_eq!(pool.stats().gauges.in_use, 6);
    held.clear();
    // Bad sizes change nothing.
    let err = pool.resize(5, 4).unwrap_err();
    assert!(err.to_string().contains("min_size = 5"), "{err}");
    assert!(pool.resize(0, 0).is_err());
    assert_eq!((pool.stats().min_size, pool.stats().max_size), (3, 6));
    pool.close();
}
