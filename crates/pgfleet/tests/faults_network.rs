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
