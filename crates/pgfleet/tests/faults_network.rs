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
