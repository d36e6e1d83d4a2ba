//! Network faults through the test kit's `FaultProxy`: hung connects,
//! a dead network, connections cut.

mod common;

use std::time::{Duration, Instant};

use common::{app, cluster, config};
use pgfleet::{Fleet, Pool, Target};
use pgfleet_testkit::{Fault, FaultProxy};

/// A proxy in front of the shared cluster, and the target through it.
async fn proxied() -> (FaultProxy, Target) {
    let c = cluster();
    let proxy = FaultProxy::start(c.port()).await.unwrap();
    let target = Target::parse(&c.url_via(proxy.port(), "postgres")).unwrap();
    (proxy, target)
}

#[tokio::test]
async fn closing_wakes_a_warm_up_stuck_on_hung_connects() {
    let app = app("close_wakes");
    let (proxy, target) = proxied().await;
    proxy.set(Fault::HangNew);
    let mut cfg = config(&app, 2, 4);
    cfg.connect_timeout = Duration::from_secs(8);

    let pool = Pool::new(target.clone(), cfg.clone()).unwrap();
    let waiting = tokio::spawn({
        let pool = pool.clone();
        async move { pool.wait_ready(Duration::from_secs(20)).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    pool.close();
    let err = waiting.await.unwrap().unwrap_err();
    assert!(err.is_closed(), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "wait_ready returned {:?} after close, not at once",
        started.elapsed()
    );

    let fleet = Fleet::new();
    let warming = tokio::spawn({
        let fleet = fleet.clone();
        async move { fleet.warmup([(target, cfg)]).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    fleet.close_all(Duration::from_secs(1)).await;
    let report = warming.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "warm-up returned {:?} after close_all",
        started.elapsed()
    );
    let (_, err) = report.failures().next().expect("the warm-up failed");
    assert!(err.is_closed(), "{err:?}");
    proxy.set(Fault::Pass);
}

#[tokio::test]
async fn an_outage_is_probed_gently_while_nobody_waits_and_often_while_callers_do() {
    let app = app("reconnect");
    let (proxy, target) = proxied().await;
    let mut cfg = config(&app, 1, 4);
    cfg.acquire_timeout = Duration::from_secs(10);
    let pool = Pool::new(target, cfg).unwrap();
    pool.wait_ready(Duration::from_secs(10)).await.unwrap();

    // The server goes away: connections are cut, new ones refused.
    proxy.set(Fault::RefuseNew);
    let before = proxy.accepted();
    proxy.cut_all();
    // Nobody waits: the floor is refilled, gently.
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.accepted() == before {
        assert!(
            Instant::now() < deadline,
            "the pool never tried to reconnect"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first = proxy.accepted();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let attempts = proxy.accepted() - first + 1;
    println!("connect attempts in the first 2 s of the outage, nobody waiting: {attempts}");
    assert!(
        attempts < 5,
        "{attempts} connect attempts in 2 s with nobody waiting"
    );

    // A caller waits: when the server is back, it is served soon.
    let waiter = tokio::spawn({
        let pool = pool.clone();
        async move { pool.get().await.map(|_| Instant::now()) }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let back = Instant::now();
    proxy.set(Fault::Pass);
    let served = waiter.await.unwrap().unwrap();
    let after = served - back;
    println!("first acquire after the server's return, a caller waiting: {after:?}");
    assert!(
        after < Duration::from_secs(1),
        "the waiting caller was served {after:?} after the server came back"
    );
    pool.close();
}

#[tokio::test]
async fn a_hung_connect_does_not_keep_a_waiting_caller_from_a_new_one() {
    let app = app("hung_connect");
    let (proxy, target) = proxied().await;
    let mut cfg = config(&app, 1, 3);
    cfg.acquire_timeout = Duration::from_secs(8);
    cfg.connect_timeout = Duration::from_secs(8);
    let pool = Pool::new(target, cfg).unwrap();
    pool.wait_ready(Duration::from_secs(10)).await.unwrap();
    let held = pool.get().await.unwrap();
    // The next connect hangs; the ones after it go through.
    proxy.set(Fault::HangNew);
    let started = Instant::now();
    let waiter = tokio::spawn({
        let pool = pool.clone();
        async move { pool.get().await.map(|_| Instant::now()) }
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.accepted() < 2 {
        assert!(Instant::now() < deadline, "the pool never tried to connect");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy.set(Fault::Pass);
    let served = waiter.await.unwrap().unwrap();
    let waited = served - started;
    println!("a caller behind a hung connect was served after {waited:?}");
    assert!(
        waited < Duration::from_secs(4),
        "the caller waited {waited:?} behind a hung connect"
    );
    drop(held);
    pool.close();
    proxy.cut_all();
}

#[tokio::test]
async fn a_burst_of_short_statements_opens_no_connection_that_arrives_too_late() {
    let app = app("spike");
    let (proxy, target) = proxied().await;
    let mut cfg = config(&app, 5, 10);
    cfg.acquire_timeout = Duration::from_secs(10);
    let pool = Pool::new(target, cfg).unwrap();
    pool.wait_ready(Duration::from_secs(10)).await.unwrap();
    // Teach the pool how long a statement holds a connection.
    for _ in 0..20 {
        let conn = pool.get().await.unwrap();
        conn.simple_query("SELECT pg_sleep(0.002)").await.unwrap();
    }
    // Connects now take 150ms (every chunk each way waits 25ms).
    proxy.set(Fault::Delay(Duration::from_millis(25)));
    let drained = pool.clone();
    let warm = {
        // One slow connect, so the pool knows a connect is slow now.
        drained.resize(6, 10).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while pool.stats().gauges.size - pool.stats().gauges.connecting < 6 {
            assert!(Instant::now() < deadline, "the slow connect never finished");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        pool.stats().counters.connections_created
    };
    proxy.set(Fault::Pass);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let conn = pool.get().await.unwrap();
            conn.simple_query("SELECT pg_sleep(0.002)").await.unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let took = started.elapsed();
    let extra = pool.stats().counters.connections_created - warm;
    println!("a burst of 50 x 2ms on 6 connections took {took:?} and opened {extra} more");
    assert!(extra <= 1, "the burst opened {extra} connections");
    pool.close();
}

/// The kernel's keepalive timer runs on a pool connection's socket (Linux
/// shows it in /proc/net/tcp as timer type 2), found by the port the server
/// sees the connection come from.
#[tokio::test]
async fn pool_connections_have_tcp_keepalive_armed() {
    let app = app("keepalive");
    let pool = Pool::new(common::target(cluster()), config(&app, 1, 1)).unwrap();
    let conn = pool.get().await.unwrap();
    let port: i32 = conn
        .query_one(
            "SELECT client_port FROM pg_stat_activity WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    drop(conn);
    let wanted = format!("0100007F:{:04X}", port);
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let line = table
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(wanted.as_str()))
        .unwrap_or_else(|| panic!("no socket for local port {port} in /proc/net/tcp"));
    let timer = line.split_whitespace().nth(5).unwrap();
    assert!(timer.starts_with("02:"), "no keepalive timer armed: {line}");
    pool.close();
}
