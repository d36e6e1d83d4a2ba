//! Faults: backends killed under the pool, and the server going away under
//! load and coming back.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{app, config, settle_backends_on, target};
use pgfleet::Pool;
use pgfleet_testkit::{BackendFilter, TempCluster};

#[tokio::test]
async fn terminated_idle_connections_are_never_handed_out() {
    let cluster = TempCluster::start().unwrap();
    let app = app("terminated");
    let pool = Pool::new(target(&cluster), config(&app, 2, 2)).unwrap();
    pool.wait_ready(Duration::from_secs(10)).await.unwrap();
    let killed = cluster
        .terminate(&BackendFilter::all().application_name(&app))
        .await
        .unwrap();
    assert_eq!(killed, 2);
    assert_eq!(settle_backends_on(&cluster, &app, 0).await, 0);
    for _ in 0..4 {
        let conn = pool.get().await.unwrap();
        let v: i32 = conn.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(v, 1);
    }
    assert!(pool.stats().counters.connections_closed_broken >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_under_load_fails_fast_then_recovers_by_itself() {
    let cluster = Arc::new(TempCluster::start().unwrap());
    let app = app("restart");
    let mut cfg = config(&app, 2, 4);
    cfg.acquire_timeout = Duration::from_millis(1500);
    cfg.connect_timeout = Duration::from_secs(2);
    let pool = Pool::new(target(&cluster), cfg).unwrap();
    pool.wait_ready(Duration::from_secs(10)).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let slowest_failure_ms = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (pool, stop, ok, failed, slowest) = (
            pool.clone(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
            slowest_failure_ms.clone(),
        );
        workers.push(tokio::spawn(async move {
            // Bounded: stops when told, or after 20k iterations.
            for _ in 0..20_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let started = Instant::now();
                let result = async {
                    let conn = pool.get().await.map_err(|e| e.to_string())?;
                    conn.query_one("SELECT 1", &[])
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>(())
                }
                .await;
                match result {
                    Ok(()) => ok.fetch_add(1, Ordering::SeqCst),
                    Err(_) => {
                        slowest.fetch_max(started.elapsed().as_millis() as u64, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(ok.load(Ordering::SeqCst) > 0);

    // Outage: acquires fail with a clear error within their timeout.
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.stop())
        .await
        .unwrap()
        .unwrap();
    let err = pool.get().await.map(|_| ()).unwrap_err();
    assert!(err.is_timeout() || err.is_connect(), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("last connect error") || message.contains("could not connect"),
        "{message}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let failed_during = failed.load(Ordering::SeqCst);
    assert!(failed_during > 0);

    // Back: the pool recovers without help.
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.resume())
        .await
        .unwrap()
        .unwrap();
    let before = ok.load(Ordering::SeqCst);
    assert!(
        common::eventually(Duration::from_secs(15), || ok.load(Ordering::SeqCst)
            > before + 50)
        .await,
        "no recovery: {:?}",
        pool.stats()
    );
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    // Nobody hung: every failure came back within the acquire timeout plus
    // a query that found its connection dead.
    let slowest = slowest_failure_ms.load(Ordering::SeqCst);
    assert!(slowest < 5_000, "a failure took {slowest}ms");
    let s = pool.stats();
    assert!(s.gauges.size <= 4);
    assert!(s.counters.connect_errors > 0);
    assert_eq!(
        settle_backends_on(&cluster, &app, s.gauges.size as usize).await,
        s.gauges.size as usize
    );
}
