//! `replicas: auto` inside one process: fleets of the same service (each
//! one replica, with an instance id of its own) find each other through the
//! server and split its budget; the server never holds more than the
//! budget. The test with separate OS processes and SIGKILL is in
//! `crates/pgfleet-cli/tests/replicas.rs`.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{config, target, PeakSampler};
use pgfleet::{BudgetConfig, Fleet, FleetConfig, PoolHandle, Replicas};
use pgfleet_testkit::{BackendFilter, TempCluster};

/// `max_connections` 30: 27 for clients, 24 after the headroom of 3.
const BUDGET: u32 = 24;

struct Replica {
    fleet: Fleet,
    pool: PoolHandle,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Replica {
    async fn start(cluster: &TempCluster, tasks: usize) -> Replica {
        let fleet = Fleet::with_config(FleetConfig {
            budget: BudgetConfig {
                replicas: Replicas::Auto,
                service: Some("replica-test".into()),
                ..BudgetConfig::default()
            },
        })
        .unwrap();
        let pool = fleet
            .pool(&target(cluster), &config("replica-test-app", 0, 20))
            .unwrap();
        let replica = Replica {
            fleet,
            pool,
            stop: Arc::new(AtomicBool::new(false)),
            ok: Arc::default(),
            failed: Arc::default(),
            errors: Arc::default(),
        };
        replica.load(tasks);
        replica
    }

    /// `tasks` callers, each doing short statements until stopped.
    fn load(&self, tasks: usize) {
        self.stop.store(false, Ordering::SeqCst);
        for _ in 0..tasks {
            let (pool, stop, ok, failed, errors) = (
                self.pool.clone(),
                self.stop.clone(),
                self.ok.clone(),
                self.failed.clone(),
                self.errors.clone(),
            );
            tokio::spawn(async move {
                // Bounded: at most 10 minutes.
                let deadline = Instant::now() + Duration::from_secs(600);
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    let result = async {
                        let conn = pool.get().await?;
                        conn.execute("SELECT pg_sleep(0.02)", &[]).await?;
                        Ok::<_, pgfleet::Error>(())
                    }
                    .await;
                    match result {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            errors.lock().unwrap().push(e.to_string());
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            });
        }
    }

    fn quiet(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Units held on the server (open connections and connects).
    fn held(&self) -> u32 {
        self.fleet
            .stats()
            .servers
            .into_values()
            .next()
            .map_or(0, |b| b.in_use)
    }

    fn replicas(&self) -> pgfleet::ReplicaStats {
        self.fleet
            .stats()
            .servers
            .into_values()
            .next()
            .and_then(|b| b.replicas)
            .expect("replica stats")
    }
}

/// Jain's fairness index of `xs`.
fn jain(xs: &[u32]) -> f64 {
    let sum: f64 = xs.iter().map(|&x| f64::from(x)).sum();
    let squares: f64 = xs.iter().map(|&x| f64::from(x).powi(2)).sum();
    if squares == 0.0 {
        return 0.0;
    }
    sum * sum / (xs.len() as f64 * squares)
}

/// Waits (at most `limit`) until the replicas in `busy` have nearly equal
/// shares (Jain's index at least 0.95) that add up to at least `at_least`,
/// each seeing `seen` replicas, and each holds what its share allows and
/// no more; returns the time it took, or panics with what was seen.
async fn converge(
    busy: &[&Replica],
    seen: u32,
    at_least: u32,
    limit: Duration,
    what: &str,
) -> Duration {
    let started = Instant::now();
    loop {
        let shares: Vec<u32> = busy.iter().map(|r| r.replicas().share).collect();
        let held: Vec<u32> = busy.iter().map(|r| r.held()).collect();
        let settled = busy
            .iter()
            .zip(&shares)
            .zip(&held)
            .all(|((r, &share), &held)| {
                // The share counts the coordinator, and one spare.
                r.replicas().seen == seen && held < share && share <= held + 2
            });
        if settled && jain(&shares) >= 0.95 && shares.iter().sum::<u32>() >= at_least {
            eprintln!(
                "{what}: converged in {:?}: shares {shares:?}, connections {held:?}",
                started.elapsed()
            );
            return started.elapsed();
        }
        if started.elapsed() > limit {
            let stats: Vec<_> = busy
                .iter()
                .map(|r| {
                    let budget = r.fleet.stats().servers.into_values().next();
                    format!("{:?}\n{:?}\n{:?}", r.replicas(), budget, r.pool.stats())
                })
                .collect();
            panic!("{what}: not converged after {limit:?}: held {held:?}; {stats:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleets_of_one_service_split_the_server_and_never_exceed_it() {
    let cluster = Arc::new(
        TempCluster::builder()
            .setting("max_connections", "30")
            .start()
            .unwrap(),
    );
    let sampler = PeakSampler::start(cluster.clone(), BackendFilter::all());

    let a = Replica::start(&cluster, 40).await;
    // Alone, it takes the whole budget but its coordinator's connection.
    converge(&[&a], 1, 21, Duration::from_secs(10), "one replica").await;
    let stats = a.replicas();
    eprintln!("connect {:?}", a.pool.stats().timings.connect);
    assert_eq!(stats.seen, 1, "{stats:?}");
    assert_eq!(stats.budget, BUDGET, "{stats:?}");

    let b = Replica::start(&cluster, 40).await;
    converge(
        &[&a, &b],
        2,
        22,
        Duration::from_secs(5),
        "a second replica joins",
    )
    .await;
    let c = Replica::start(&cluster, 40).await;
    converge(
        &[&a, &b, &c],
        3,
        23,
        Duration::from_secs(5),
        "a third replica joins",
    )
    .await;
    assert_eq!(a.replicas().seen, 3);

    // A quiet replica lends its share, and gets it back on demand.
    c.quiet();
    converge(
        &[&a, &b],
        3,
        20,
        Duration::from_secs(5),
        "the third goes quiet",
    )
    .await;
    assert!(c.held() <= 3, "a quiet replica holds {}", c.held());
    c.load(40);
    converge(
        &[&a, &b, &c],
        3,
        23,
        Duration::from_secs(5),
        "the third is busy again",
    )
    .await;

    // A replica that goes away frees its share.
    c.quiet();
    drop(c.pool);
    drop(c.fleet);
    converge(
        &[&a, &b],
        2,
        22,
        Duration::from_secs(5),
        "the third is gone",
    )
    .await;

    // A coordinator whose connection is cut: its replica holds nothing
    // until it is back, then takes its share again.
    let instance = a.replicas().instance;
    let cut = cluster
        .terminate(
            &BackendFilter::all()
                .application_name_prefix(format!("pgfleet replica-test {instance} ")),
        )
        .await
        .unwrap();
    assert_eq!(cut, 1, "one coordinator per replica");
    let noticed = Instant::now();
    while a.replicas().joined {
        assert!(
            noticed.elapsed() < Duration::from_secs(5),
            "the cut is noticed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!(
        "the cut noticed in {:?}: {:?}",
        noticed.elapsed(),
        a.replicas().last_error
    );
    converge(
        &[&a, &b],
        2,
        22,
        Duration::from_secs(10),
        "a coordinator reconnects",
    )
    .await;

    let peak = sampler.finish().await;
    a.quiet();
    b.quiet();
    for r in [&a, &b] {
        let errors = r.errors.lock().unwrap();
        assert_eq!(
            r.failed.load(Ordering::Relaxed),
            0,
            "first errors: {:?}",
            &errors[..errors.len().min(3)]
        );
        assert!(r.ok.load(Ordering::Relaxed) > 0);
    }
    eprintln!("peak client backends {peak} (budget {BUDGET})");
    assert!(
        peak as u32 <= BUDGET,
        "peak {peak} above the budget {BUDGET}"
    );
    assert_eq!(
        a.fleet
            .stats()
            .servers
            .into_values()
            .next()
            .unwrap()
            .refusals,
        0
    );

    // A fleet closed gives its share back.
    b.fleet.close_all(Duration::from_secs(5)).await;
    a.load(40);
    converge(
        &[&a],
        1,
        21,
        Duration::from_secs(5),
        "the second closes its fleet",
    )
    .await;
    a.quiet();
}

/// A replica whose coordinator is cut while it holds connections: until
/// they are returned, nothing covers them, and the other replica must not
/// take the tokens they had. The replicas log in as a role that is not a
/// superuser with a headroom of 1, so that any moment above the budget is
/// a refusal (53300) the test sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_left_without_a_coordinator_block_the_others_until_they_close() {
    let cluster = Arc::new(
        TempCluster::builder()
            .setting("max_connections", "30")
            .start()
            .unwrap(),
    );
    cluster
        .create_role("strict_user", "strict-pw")
        .await
        .unwrap();
    let url = cluster.url_for("strict_user", "strict-pw", "postgres");
    let target = pgfleet::Target::parse(&url).unwrap();
    let fleet = || {
        Fleet::with_config(FleetConfig {
            budget: BudgetConfig {
                replicas: Replicas::Auto,
                service: Some("strict-test".into()),
                headroom: 1,
                ..BudgetConfig::default()
            },
        })
        .unwrap()
    };
    let stats = |f: &Fleet| f.stats().servers.into_values().next().unwrap();
    let (a, b) = (fleet(), fleet());
    let pool_a = a.pool(&target, &config("strict-a", 0, 20)).unwrap();
    let pool_b = b.pool(&target, &config("strict-b", 0, 20)).unwrap();
    // `a` holds 8 connections; `b` is busy and wants 20.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(pool_a.get().await.unwrap());
    }
    let b_replica = Replica {
        fleet: b,
        pool: pool_b,
        stop: Arc::default(),
        ok: Arc::default(),
        failed: Arc::default(),
        errors: Arc::default(),
    };
    b_replica.load(40);
    let deadline = Instant::now() + Duration::from_secs(10);
    // `a` wants its 8, a spare and its coordinator: 10 of the 25 tokens.
    while stats(&b_replica.fleet).replicas.unwrap().seen != 2
        || b_replica.replicas().share < 15
        || b_replica.held() + 1 < b_replica.replicas().share
    {
        assert!(Instant::now() < deadline, "{:?}", stats(&b_replica.fleet));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = b_replica.held();
    eprintln!("before the cut: a holds {}, b {before}", stats(&a).in_use);

    let instance = stats(&a).replicas.unwrap().instance;
    let cut = cluster
        .terminate(
            &BackendFilter::all()
                .application_name_prefix(format!("pgfleet strict-test {instance} ")),
        )
        .await
        .unwrap();
    assert_eq!(cut, 1);
    // The test holds the door, so that `a` cannot join again: its 8
    // connections stay open without a token as long as they are held.
    let (admin, connection) =
        tokio_postgres::connect(&cluster.url("postgres"), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    let key: i64 = admin
        .query_one(
            "SELECT DISTINCT classid::bigint FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    admin
        .execute("SELECT pg_advisory_lock($1::int, 0)", &[&(key as i32)])
        .await
        .unwrap();
    // `b` sees them and does not grow, past the settling after a replica
    // leaves and `a`'s attempts to come back.
    let mut seen_uncovered = 0;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let r = b_replica.replicas();
        seen_uncovered = seen_uncovered.max(r.uncovered);
        assert!(
            b_replica.held() <= before,
            "b grew from {before} to {} while a's connections were uncovered: {r:?}",
            b_replica.held()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        seen_uncovered >= 8,
        "b saw a's connections without a token: {seen_uncovered}"
    );
    assert!(!stats(&a).replicas.unwrap().joined);
    // Returned, they close (nothing covers them, floors or not), and `b`,
    // alone now, takes the budget.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats(&a).in_use != 0 || b_replica.replicas().uncovered != 0 {
        assert!(
            Instant::now() < deadline,
            "{:?} {:?}",
            stats(&a),
            b_replica.replicas()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    converge(
        &[&b_replica],
        1,
        21,
        Duration::from_secs(5),
        "after the cut",
    )
    .await;
    // The door open again, `a` comes back.
    admin
        .execute("SELECT pg_advisory_unlock($1::int, 0)", &[&(key as i32)])
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stats(&a).replicas.unwrap().joined {
        assert!(Instant::now() < deadline, "{:?}", stats(&a));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b_replica.quiet();
    assert_eq!(stats(&a).refusals, 0, "{:?}", stats(&a));
    assert_eq!(stats(&b_replica.fleet).refusals, 0);
    assert_eq!(b_replica.failed.load(Ordering::Relaxed), 0);
}
