//! Server budgets: pools on one server share its connections, reclaim idle
//! ones from each other, degrade when other clients take the slots, and
//! replicas divide the server between them.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{app, cluster, config, target, PeakSampler};
use pgfleet::{BudgetConfig, BudgetMode, Fleet, FleetConfig, Target};
use pgfleet_testkit::{BackendFilter, TempCluster};

fn small_cluster() -> Arc<TempCluster> {
    Arc::new(
        TempCluster::builder()
            .setting("max_connections", "20")
            .start()
            .unwrap(),
    )
}

fn fleet(mode: BudgetMode, replicas: u32) -> Fleet {
    Fleet::with_config(FleetConfig {
        budget: BudgetConfig {
            mode,
            headroom: 3,
            replicas: pgfleet::Replicas::Fixed(replicas),
            ..BudgetConfig::default()
        },
    })
    .unwrap()
}

/// Runs `tasks` concurrent tasks spread over `handles`, each doing a short
/// query; returns (ok, failed, first error).
async fn load(handles: &[pgfleet::PoolHandle], tasks: usize) -> (u64, u64, Option<String>) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None));
    let mut joins = Vec::new();
    for i in 0..tasks {
        let (h, ok, failed, first_error) = (
            handles[i % handles.len()].clone(),
            ok.clone(),
            failed.clone(),
            first_error.clone(),
        );
        joins.push(tokio::spawn(async move {
            let result = async {
                let conn = h.get().await.map_err(|e| e.to_string())?;
                conn.execute("SELECT pg_sleep(0.01)", &[])
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(())
            }
            .await;
            match result {
                Ok(()) => ok.fetch_add(1, Ordering::SeqCst),
                Err(e) => {
                    first_error.lock().unwrap().get_or_insert(e);
                    failed.fetch_add(1, Ordering::SeqCst)
                }
            };
        }));
    }
    for j in joins {
        j.await.unwrap();
    }
    let e = first_error.lock().unwrap().take();
    (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst), e)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_databases_on_one_small_server_stay_within_the_budget() {
    let cluster = small_cluster();
    let app = app("budget4");
    let fleet = fleet(BudgetMode::Auto, 1);
    let mut handles = Vec::new();
    for db in ["b1", "b2", "b3", "b4"] {
        cluster.create_database(db).await.unwrap();
        let cfg = config(&app, 1, 10);
        handles.push(
            fleet
                .pool(&Target::parse(&cluster.url(db)).unwrap(), &cfg)
                .unwrap(),
        );
    }
    let sampler = PeakSampler::start(cluster.clone(), BackendFilter::all().application_name(&app));
    let (ok, failed, err) = load(&handles, 400).await;
    let peak = sampler.finish().await;
    assert_eq!(failed, 0, "{err:?}");
    assert_eq!(ok, 400);
    let server = fleet.stats().servers.into_values().next().unwrap();
    let derivation = server.derivation.expect("auto budget derived");
    assert_eq!(derivation.max_connections, 20);
    assert_eq!(derivation.superuser_reserved_connections, 3);
    assert_eq!(
        server.budget,
        Some(14),
        "(20 - 3 reserved - 3 headroom) / 1"
    );
    assert!(peak <= 14, "peak {peak} above the budget");
    assert!(
        server.waits > 0,
        "the budget was the limit, not the pools: {server:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_in_one_pool_reclaims_idle_connections_of_another() {
    let cluster = small_cluster();
    let app = app("reclaim");
    let fleet = fleet(BudgetMode::Fixed(4), 1);
    cluster.create_database("ra").await.unwrap();
    cluster.create_database("rb").await.unwrap();
    let mut cfg = config(&app, 0, 4);
    cfg.acquire_timeout = Duration::from_secs(5);
    let a = fleet
        .pool(&Target::parse(&cluster.url("ra")).unwrap(), &cfg)
        .unwrap();
    let b = fleet
        .pool(&Target::parse(&cluster.url("rb")).unwrap(), &cfg)
        .unwrap();
    {
        let held: Vec<_> = futures_join(&a, 4).await;
        assert_eq!(held.len(), 4);
    }
    assert_eq!(a.stats().gauges.idle, 4, "A holds the whole budget, idle");
    // B bursts: it gets units by closing A's idle connections.
    let held_b = futures_join(&b, 3).await;
    assert_eq!(held_b.len(), 3);
    assert_eq!(a.stats().counters.connections_closed_reclaimed, 3);
    let server = fleet.stats().servers.into_values().next().unwrap();
    assert_eq!(server.reclaims, 3);
    assert!(server.in_use <= 4);
    assert!(common::backends_on(&cluster, &app).await <= 4);
}

/// Takes `n` connections at once from a pool.
async fn futures_join(pool: &pgfleet::PoolHandle, n: usize) -> Vec<pgfleet::PooledConnection> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let p = pool.clone();
        tasks.push(tokio::spawn(async move { p.get().await.unwrap() }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floors_that_exceed_the_budget_are_a_configuration_error_naming_the_pools() {
    let cluster = TempCluster::shared();
    let app = app("floors");
    let fleet = fleet(BudgetMode::Fixed(3), 1);
    cluster.create_database("fa").await.unwrap();
    cluster.create_database("fb").await.unwrap();
    let cfg = config(&app, 2, 4);
    let _a = fleet
        .pool(&Target::parse(&cluster.url("fa")).unwrap(), &cfg)
        .unwrap();
    let err = fleet
        .pool(&Target::parse(&cluster.url("fb")).unwrap(), &cfg)
        .unwrap_err();
    let msg = err.to_string();
    assert!(err.is_config());
    assert!(
        msg.contains("add up to 4, more than its budget of 3"),
        "{msg}"
    );
    assert!(
        msg.contains("/fa (min_size 2)") && msg.contains("/fb (min_size 2)"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_client_holding_the_slots_degrades_the_fleet_which_recovers_after() {
    let cluster = small_cluster();
    let app = app("foreign");
    // The foreign client takes 16 of the 20 slots (as superuser, so the
    // reserved ones count too).
    let foreign_url = format!("{}?application_name=foreign-{app}", cluster.url("postgres"));
    let mut foreign = Vec::new();
    for _ in 0..16 {
        let (client, conn) = tokio_postgres::connect(&foreign_url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        foreign.push(client);
    }
    let fleet = fleet(BudgetMode::Fixed(10), 1);
    let mut cfg = config(&app, 0, 10);
    cfg.acquire_timeout = Duration::from_secs(2);
    cfg.connect_timeout = Duration::from_secs(2);
    let pool = fleet
        .pool(&Target::parse(&cluster.url("postgres")).unwrap(), &cfg)
        .unwrap();
    let (ok, failed, err) = load(std::slice::from_ref(&pool), 100).await;
    let server = fleet.stats().servers.into_values().next().unwrap();
    assert!(server.refusals >= 1, "the server refused: {server:?}");
    assert!(
        server.capacity.unwrap() < 10,
        "the budget was lowered: {server:?}"
    );
    assert!(ok > 0, "the fleet works with what is left");
    if failed > 0 {
        let err = err.unwrap();
        assert!(
            err.contains("timed out") && err.contains("budget"),
            "a clear error: {err}"
        );
    }
    assert!(pool.stats().counters.connections_refused >= 1);

    // The foreign client leaves: the budget climbs back and ten connections
    // can be held at once.
    drop(foreign);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, failed, _) = load(std::slice::from_ref(&pool), 20).await;
        let cap = fleet
            .stats()
            .servers
            .into_values()
            .next()
            .unwrap()
            .capacity
            .unwrap();
        if cap == 10 && failed == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no recovery: capacity {cap}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let held = futures_join(&pool, 10).await;
    assert_eq!(held.len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_server_and_stay_under_its_limit() {
    let cluster = small_cluster();
    let app = app("replicas");
    let target = Target::parse(&cluster.url("postgres")).unwrap();
    let replica_a = fleet(BudgetMode::Auto, 2);
    let replica_b = fleet(BudgetMode::Auto, 2);
    let cfg = config(&app, 1, 10);
    let a = replica_a.pool(&target, &cfg).unwrap();
    let b = replica_b.pool(&target, &cfg).unwrap();
    let sampler = PeakSampler::start(cluster.clone(), BackendFilter::all().application_name(&app));
    let (la, lb) = tokio::join!(
        load(std::slice::from_ref(&a), 200),
        load(std::slice::from_ref(&b), 200)
    );
    let peak = sampler.finish().await;
    assert_eq!((la.1, lb.1), (0, 0), "{:?} {:?}", la.2, lb.2);
    for f in [&replica_a, &replica_b] {
        assert_eq!(
            f.stats().servers.into_values().next().unwrap().budget,
            Some(7),
            "(20 - 3 - 3) / 2"
        );
    }
    assert!(peak <= 14, "peak {peak}");
}

#[tokio::test]
async fn resizing_past_the_server_budget_is_refused() {
    let app = app("budget_resize");
    let fleet = Fleet::with_config(FleetConfig {
        budget: BudgetConfig {
            mode: BudgetMode::Fixed(5),
            ..BudgetConfig::default()
        },
    })
    .unwrap();
    let handle = fleet.pool(&target(cluster()), &config(&app, 2, 4)).unwrap();
    let err = handle.resize(6, 6).unwrap_err();
    assert!(err.is_config(), "{err:?}");
    assert!(
        err.to_string().contains("more than its budget of 5"),
        "{err}"
    );
    assert_eq!(handle.stats().min_size, 2);
    handle.resize(3, 5).unwrap();
    assert_eq!(
        fleet.stats().servers.values().next().map(|b| b.budget),
        Some(Some(5))
    );
    fleet.close_all(Duration::from_secs(5)).await;
}
