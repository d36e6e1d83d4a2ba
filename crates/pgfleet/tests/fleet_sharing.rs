//! One pool per database for the whole fleet: sharing, single-flight
//! creation, URL normalisation, linger, close_all, warm-up, statistics.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{app, backends, cluster, config, settle_backends, target};
use pgfleet::{Fleet, Target};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifteen_stores_share_one_pool_and_load_stays_within_max_size() {
    let app = app("share");
    let fleet = Fleet::new();
    let cfg = config(&app, 2, 6);
    let target = target(cluster());
    // 5 users x 3 memory layers, each store asking the fleet for its pool.
    let mut stores = Vec::new();
    for _user in 0..5 {
        for _layer in ["m0", "m1", "m2"] {
            stores.push(fleet.pool(&target, &cfg).unwrap());
        }
    }
    assert_eq!(fleet.len(), 1);
    assert_eq!(stores[0].active_references(), 15);
    let stats = fleet.stats();
    let pool = stats.pools.values().next().unwrap();
    assert_eq!(pool.active_references, 15);

    let stores = Arc::new(stores);
    let peak = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (app, peak, done) = (app.clone(), peak.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                peak.fetch_max(backends(&app).await, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut tasks = Vec::new();
    for i in 0..300 {
        let stores = stores.clone();
        tasks.push(tokio::spawn(async move {
            let store = &stores[i % stores.len()];
            let conn = store.get().await.expect("acquire");
            let row = conn
                .query_one("SELECT $1::int + 1", &[&(i as i32)])
                .await
                .unwrap();
            assert_eq!(row.get::<_, i32>(0), i as i32 + 1);
            conn.execute("SELECT pg_sleep(0.002)", &[]).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    sampler.await.unwrap();
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak <= 6, "peak backends {peak} above max_size 6");
    assert!(peak >= 1);
    let stats = stores[0].stats();
    assert_eq!(stats.counters.acquires, 300);
    assert!(stats.gauges.size <= 6);
    assert!(
        stats.counters.connections_created <= 6,
        "{:?}",
        stats.counters
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_first_requests_create_one_pool() {
    let app = app("single");
    let fleet = Fleet::new();
    let cfg = config(&app, 3, 5);
    let target = target(cluster());
    let barrier = Arc::new(tokio::sync::Barrier::new(100));
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (fleet, cfg, target, barrier) =
            (fleet.clone(), cfg.clone(), target.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            fleet.pool(&target, &cfg).unwrap()
        }));
    }
    let mut handles = Vec::new();
    for t in tasks {
        handles.push(t.await.unwrap());
    }
    assert_eq!(fleet.len(), 1);
    assert_eq!(handles[0].active_references(), 100);
    handles[0]
        .wait_ready(Duration::from_secs(10))
        .await
        .unwrap();
    // One set of connections: the warm floor, once.
    assert_eq!(settle_backends(&app, 3).await, 3);
    assert_eq!(handles[0].stats().counters.connections_created, 3);
}

#[tokio::test]
async fn equivalent_urls_share_a_pool_and_different_ones_do_not() {
    let app = app("norm");
    let fleet = Fleet::new();
    let cfg = config(&app, 0, 2);
    let c = cluster();
    let port = c.port();
    let pw = pgfleet_testkit::TempCluster::superuser_password();
    let same = [
        format!("postgres://postgres:{pw}@127.0.0.1:{port}/postgres"),
        format!("postgresql://postgres:{pw}@127.0.0.1:{port}/postgres"),
        format!("postgres://postgres@127.0.0.1:{port}/postgres?password={pw}"),
        format!("postgres://postgres:{pw}@127.0.0.1:{port}/postgres?application_name=x&connect_timeout=3"),
    ];
    let handles: Vec<_> = same
        .iter()
        .map(|u| fleet.pool_url(u, &cfg).unwrap())
        .collect();
    assert_eq!(fleet.len(), 1, "keys: {:?}", fleet.stats().pools.keys());
    assert_eq!(handles[0].active_references(), 4);
    // Another database is another pool.
    c.create_database("norm_other").await.unwrap();
    let other = fleet
        .pool_url(
            &format!("postgres://postgres:{pw}@127.0.0.1:{port}/norm_other"),
            &cfg,
        )
        .unwrap();
    assert_eq!(fleet.len(), 2);
    let conn = other.get().await.unwrap();
    let db: String = conn
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(db, "norm_other");
}

#[tokio::test]
async fn pool_without_handles_lingers_then_closes_and_a_later_request_makes_a_new_one() {
    let app = app("linger");
    let fleet = Fleet::new();
    let mut cfg = config(&app, 2, 3);
    cfg.linger = Duration::from_millis(300);
    let target = target(cluster());
    let handle = fleet.pool(&target, &cfg).unwrap();
    handle.wait_ready(Duration::from_secs(10)).await.unwrap();
    assert_eq!(settle_backends(&app, 2).await, 2);
    drop(handle);
    // Still there during the linger time: a handle taken now reuses it.
    let again = fleet.pool(&target, &cfg).unwrap();
    assert_eq!(again.stats().counters.connections_created, 2);
    drop(again);
    assert_eq!(
        settle_backends(&app, 0).await,
        0,
        "backends left after linger"
    );
    assert!(common::eventually(Duration::from_secs(5), || fleet.is_empty()).await);
    let fresh = fleet.pool(&target, &cfg).unwrap();
    fresh.wait_ready(Duration::from_secs(10)).await.unwrap();
    assert!(!fresh.is_closed());
    assert_eq!(
        fresh.stats().counters.connections_created,
        2,
        "a fresh pool"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_all_closes_idle_now_fails_waiters_and_closes_checked_out_on_return() {
    let app = app("closeall");
    let fleet = Fleet::new();
    let cfg = config(&app, 3, 3);
    let handle = fleet.pool(&target(cluster()), &cfg).unwrap();
    handle.wait_ready(Duration::from_secs(10)).await.unwrap();
    let out1 = handle.get().await.unwrap();
    let out2 = handle.get().await.unwrap();
    let _out3 = handle.get().await.unwrap();
    let waiter = {
        let h = handle.clone();
        tokio::spawn(async move { h.get().await.map(|_| ()) })
    };
    assert!(
        common::eventually(Duration::from_secs(5), || handle.stats().gauges.waiting
            == 1)
        .await
    );
    let closing = {
        let fleet = fleet.clone();
        tokio::spawn(async move { fleet.close_all(Duration::from_secs(3)).await })
    };
    let err = waiter.await.unwrap().unwrap_err();
    assert!(err.is_closed(), "{err}");
    // The connection still held keeps working until it is returned.
    out1.query_one("SELECT 1", &[]).await.unwrap();
    drop(out1);
    drop(out2);
    // _out3 stays out past the deadline and is cut.
    let report = closing.await.unwrap();
    assert_eq!(report.pools, 1);
    assert_eq!(report.connections_cut, 1);
    assert_eq!(settle_backends(&app, 0).await, 0);
    let err = handle.get().await.unwrap_err();
    assert!(err.is_closed());
    let err = fleet.pool(&target(cluster()), &cfg).unwrap_err();
    assert!(err.is_closed());
    // Idempotent.
    assert_eq!(fleet.close_all(Duration::from_secs(1)).await.pools, 0);
}

#[tokio::test]
async fn warmup_opens_floors_and_reports_a_bad_target_without_failing_the_rest() {
    let app = app("warm");
    let fleet = Fleet::new();
    let c = cluster();
    c.create_database("warm_a").await.unwrap();
    c.create_database("warm_b").await.unwrap();
    let cfg = config(&app, 3, 4);
    let good_a = Target::parse(&c.url("warm_a")).unwrap();
    let good_b = Target::parse(&c.url("warm_b")).unwrap();
    let bad = Target::parse(&c.url("warm_does_not_exist")).unwrap();
    let report = fleet
        .warmup([
            (good_a, cfg.clone()),
            (bad, cfg.clone()),
            (good_b, cfg.clone()),
        ])
        .await;
    assert!(!report.is_ok());
    let failures: Vec<_> = report.failures().collect();
    assert_eq!(failures.len(), 1);
    assert!(failures[0].0.contains("warm_does_not_exist"));
    assert_eq!(failures[0].1.code(), Some("3D000"), "{}", failures[0].1);
    // Both good pools have their floor open when warm-up returns.
    let stats = fleet.stats();
    for db in ["warm_a", "warm_b"] {
        let pool = stats.pools.iter().find(|(k, _)| k.ends_with(db)).unwrap().1;
        assert_eq!(pool.gauges.size - pool.gauges.connecting, 3, "{db}");
    }
    assert_eq!(backends(&app).await, 6);
    fleet.close_all(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn stats_carry_the_seed_fields_keyed_by_masked_url_as_json() {
    let app = app("stats");
    let fleet = Fleet::new();
    let mut cfg = config(&app, 1, 4);
    cfg.max_lifetime = Some(Duration::from_secs(3600));
    let handle = fleet.pool(&target(cluster()), &cfg).unwrap();
    drop(handle.get().await.unwrap());
    let json = serde_json::to_value(fleet.stats()).unwrap();
    let (key, pool) = json["pools"].as_object().unwrap().iter().next().unwrap();
    assert!(
        key.starts_with("postgres://postgres:***@127.0.0.1:"),
        "{key}"
    );
    assert!(!key.contains(pgfleet_testkit::TempCluster::superuser_password()));
    assert_eq!(pool["min_size"], 1);
    assert_eq!(pool["max_size"], 4);
    assert_eq!(pool["timeout"], 10.0);
    assert_eq!(pool["recycle"], 3600.0);
    assert_eq!(pool["active_references"], 1);
    assert_eq!(pool["pool_closed"], false);
    assert_eq!(pool["counters"]["acquires"], 1);
    assert!(pool["gauges"]["size"].as_u64().unwrap() >= 1);
}

/// The process-wide fleet from one runtime after another, as
/// `#[tokio::test]`s use it: a pool whose runtime shut down is replaced.
#[test]
fn the_global_fleet_serves_one_runtime_after_another() {
    let app = app("global_rt");
    // A key of its own: another search_path makes another pool.
    let target = Target::parse(&format!(
        "{}?options=-c%20search_path%3D{}",
        cluster().url("postgres"),
        app.replace('-', "_")
    ))
    .unwrap();
    let cfg = config(&app, 1, 2);
    let mut pools = Vec::new();
    for round in 0..3 {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let handle = Fleet::global().pool(&target, &cfg).unwrap();
            let conn = handle
                .get()
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            let row = conn.query_one("SELECT 1::int", &[]).await.unwrap();
            assert_eq!(row.get::<_, i32>(0), 1);
            pools.push(handle.pool().clone());
        });
        drop(runtime);
    }
    // A new pool each round; the old ones closed.
    assert!(pools[0].is_closed() && pools[1].is_closed());
    assert!(!pools[2].is_closed());
}
