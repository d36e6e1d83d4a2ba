//! Behind a real PgBouncer 1.x (Debian's package), in transaction and in
//! session pooling mode: mixed load through every API of the pool with
//! zero errors, the server never holding more than PgBouncer's pool, and
//! the `auto` budget not derived through the pooler.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Capture;
use pgfleet::{BudgetSource, Fleet, PoolHandle, PoolSettings, RawValue, Source};
use pgfleet_testkit::{BackendFilter, PgBouncer, PoolMode, TempCluster};

const TASKS: usize = 50;
const OPS_PER_TASK: usize = 200;

/// A fleet pool on `url` (which carries `pooler=...`), tagged `app`.
fn pool(fleet: &Fleet, url: &str, app: &str, max_size: u32) -> PoolHandle {
    let mut settings = PoolSettings::new();
    for (key, value) in [
        ("url", url.to_owned()),
        ("application_name", app.to_owned()),
        ("min_size", "0".to_owned()),
        ("max_size", max_size.to_string()),
        ("timeout", "30s".to_owned()),
    ] {
        settings
            .set(key, &RawValue::Str(value), Source::Code)
            .unwrap();
    }
    let (target, config) = settings.resolve().unwrap();
    fleet.pool(&target, &config).unwrap()
}

/// A fresh cluster behind a PgBouncer of 2 server connections in `mode`.
fn cluster_behind(mode: PoolMode) -> (TempCluster, PgBouncer) {
    let cluster = TempCluster::start().unwrap();
    let bouncer = PgBouncer::builder(mode)
        .pool_size(2)
        .start(&cluster)
        .unwrap();
    (cluster, bouncer)
}

/// One operation of the mix, by number: text queries, `prepare_cached`,
/// transactions (committed and dropped early), shared mode, updates, the
/// statement methods on the pool.
async fn operation(pool: &PoolHandle, task: usize, i: usize) -> pgfleet::Result<()> {
    let n = (task * OPS_PER_TASK + i) as i32;
    match i % 7 {
        0 => {
            let conn = pool.get().await?;
            let row = conn.query_one("SELECT $1::int + 1", &[&n]).await?;
            assert_eq!(row.get::<_, i32>(0), n + 1);
        }
        1 => {
            let conn = pool.get().await?;
            let statement = conn
                .prepare_cached("SELECT $1::text || '!', $2::int8 * 2")
                .await?;
            let row = conn
                .query_one(&statement, &[&n.to_string(), &i64::from(n)])
                .await?;
            assert_eq!(row.get::<_, String>(0), format!("{n}!"));
            assert_eq!(row.get::<_, i64>(1), i64::from(n) * 2);
        }
        2 => {
            let mut conn = pool.get().await?;
            let tx = conn.transaction().await?;
            tx.execute(
                "INSERT INTO items (task, v) VALUES ($1, $2)",
                &[&(task as i32), &n],
            )
            .await?;
            let count = tx
                .prepare_cached("SELECT count(*) FROM items WHERE task = $1 AND v = $2")
                .await?;
            let row = tx.query_one(&count, &[&(task as i32), &n]).await?;
            assert_eq!(row.get::<_, i64>(0), 1);
            tx.commit().await?;
        }
        3 => {
            let conn = pool.shared().await?;
            let rows = conn
                .query(
                    "SELECT g FROM generate_series(1, $1) g",
                    &[&(i as i32 % 7 + 1)],
                )
                .await?;
            assert_eq!(rows.len(), i % 7 + 1);
        }
        4 => {
            let conn = pool.get().await?;
            conn.execute(
                "UPDATE items SET v = v + 1 WHERE task = $1 AND v < $2",
                &[&(task as i32), &0],
            )
            .await?;
            assert!(conn
                .query_opt("SELECT 1 WHERE $1::bool", &[&false])
                .await?
                .is_none());
        }
        5 => {
            // The statement methods on the pool: pipelined on a lane in the
            // pooler-safe form, and a SET on a connection of its own.
            let row = pool
                .query_one("SELECT $1::int * 3, $2::text", &[&n, &"x"])
                .await?;
            assert_eq!(row.get::<_, i32>(0), n * 3);
            assert!(pool.query_opt("SELECT 1 WHERE false", &[]).await?.is_none());
            pool.execute("SET statement_timeout = '7s'", &[]).await?;
        }
        _ => {
            // An early return from a transaction: dropped, rolled back.
            let mut conn = pool.get().await?;
            let tx = conn.transaction().await?;
            tx.execute(
                "INSERT INTO items (task, v) VALUES ($1, -1)",
                &[&(task as i32)],
            )
            .await?;
            drop(tx);
        }
    }
    Ok(())
}

/// Runs the mix behind a PgBouncer in `mode` and checks it.
async fn mixed_load(mode: PoolMode, pooler: &str) {
    let cluster = Arc::new(TempCluster::start().unwrap());
    cluster.create_database("pooled").await.unwrap();
    let bouncer = PgBouncer::builder(mode)
        .pool_size(4)
        .start(&cluster)
        .unwrap();
    let fleet = Fleet::new();
    let url = format!("{}?pooler={pooler}", bouncer.url("pooled"));
    // A session pooler gives each client connection a server connection
    // for its life: the pool fits in PgBouncer's. A transaction pooler
    // multiplexes more clients over fewer servers.
    let max_size = match mode {
        PoolMode::Session => bouncer.pool_size(),
        PoolMode::Transaction => 2 * bouncer.pool_size(),
    };
    let pool = pool(&fleet, &url, &format!("pooler-{pooler}"), max_size);
    pool.get()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE items (task int NOT NULL, v int NOT NULL)")
        .await
        .unwrap();

    // Sampled while it runs: the server's backends of database `pooled`,
    // and the server connections PgBouncer says it holds.
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicUsize::new(0));
    let peak_bouncer = Arc::new(AtomicUsize::new(0));
    let over = Arc::new(std::sync::Mutex::new(None::<String>));
    let bouncer = Arc::new(bouncer);
    let sampler = {
        let (done, peak, peak_bouncer) = (done.clone(), peak.clone(), peak_bouncer.clone());
        let over = over.clone();
        let (cluster, bouncer) = (cluster.clone(), bouncer.clone());
        tokio::spawn(async move {
            let filter = BackendFilter::all().database("pooled");
            let deadline = Instant::now() + Duration::from_secs(300);
            while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Ok(n) = cluster.count_backends(&filter).await {
                    peak.fetch_max(n, Ordering::Relaxed);
                }
                if let Ok(servers) = bouncer.show("SHOW SERVERS").await {
                    // PgBouncer (1.18+) lists the connection it opens to
                    // forward a CancelRequest (the pool cancels a statement
                    // still running when its connection came back) among
                    // its servers: in state `new` while it logs in (like a
                    // server connection being opened), then
                    // `active_cancel`. Neither holds a server for a client:
                    // count the states that do.
                    let held: Vec<_> = servers
                        .iter()
                        .filter(|row| row.iter().any(|(k, v)| k == "database" && v == "pooled"))
                        .filter(|row| {
                            row.iter().any(|(k, v)| {
                                k == "state"
                                    && matches!(v.as_str(), "active" | "idle" | "used" | "tested")
                            })
                        })
                        .collect();
                    if held.len() > bouncer.pool_size() as usize {
                        over.lock()
                            .unwrap()
                            .get_or_insert_with(|| format!("{held:#?}"));
                    }
                    peak_bouncer.fetch_max(held.len(), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let pool = pool.clone();
        tasks.spawn(async move {
            let mut errors = Vec::new();
            for i in 0..OPS_PER_TASK {
                if let Err(e) = operation(&pool, task, i).await {
                    errors.push(format!("op {}: {e}", i % 7));
                }
            }
            errors
        });
    }
    let mut errors = Vec::new();
    while let Some(result) = tasks.join_next().await {
        errors.extend(result.unwrap());
    }
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    let stats = pool.stats();
    eprintln!(
        "{pooler}: {} operations in {elapsed:.2?}, {} errors; server backends peak {}, PgBouncer's server connections peak {} (its pool {}); \
         created {} connections, {} statements described/prepared, {} cache hits",
        TASKS * OPS_PER_TASK,
        errors.len(),
        peak.load(Ordering::Relaxed),
        peak_bouncer.load(Ordering::Relaxed),
        bouncer.pool_size(),
        stats.counters.connections_created,
        stats.counters.statements_prepared,
        stats.counters.statement_cache_hits,
    );
    assert!(
        errors.is_empty(),
        "{} errors, first: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    // PgBouncer never holds more server connections than its pool. The
    // server's own count may lag by one for the moment a backend whose
    // connection PgBouncer replaced takes to exit (seen once in a loaded
    // run of the whole suite, never alone).
    assert!(
        peak_bouncer.load(Ordering::Relaxed) as u32 <= bouncer.pool_size(),
        "PgBouncer's servers:\n{}",
        over.lock().unwrap().as_deref().unwrap_or_default()
    );
    assert!(
        peak.load(Ordering::Relaxed) as u32 <= bouncer.pool_size() + 1,
        "PgBouncer's log:\n{}",
        bouncer.log_tail(60)
    );
    // Every committed insert is there, every dropped one rolled back.
    let conn = pool.get().await.unwrap();
    let row = conn
        .query_one(
            "SELECT count(*) FILTER (WHERE v >= 0), count(*) FILTER (WHERE v < 0) FROM items",
            &[],
        )
        .await
        .unwrap();
    let committed = (0..OPS_PER_TASK).filter(|i| i % 7 == 2).count() * TASKS;
    assert_eq!(row.get::<_, i64>(0) as usize, committed);
    assert_eq!(row.get::<_, i64>(1), 0);
    drop(conn);
    // The budget of the pooler's address is not derived from the
    // backend's max_connections.
    let budget = fleet
        .stats()
        .servers
        .into_values()
        .next()
        .expect("a server budget");
    assert_eq!(budget.source, BudgetSource::BehindPooler, "{budget:?}");
    assert_eq!(budget.budget, None);
    fleet.close_all(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_mixed_operations_behind_pgbouncer_in_transaction_mode() {
    mixed_load(PoolMode::Transaction, "transaction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_mixed_operations_behind_pgbouncer_in_session_mode() {
    mixed_load(PoolMode::Session, "session").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_settings_reach_the_server_through_a_session_pooler() {
    let (_cluster, bouncer) = cluster_behind(PoolMode::Session);
    let fleet = Fleet::new();
    let url = format!(
        "{}?pooler=session&command_timeout=4s",
        bouncer.url("postgres")
    );
    let mut settings = PoolSettings::new();
    settings
        .set("url", &RawValue::Str(url), Source::Code)
        .unwrap();
    settings
        .set(
            "server_settings",
            &RawValue::Map(vec![("work_mem".into(), RawValue::Str("7MB".into()))]),
            Source::Code,
        )
        .unwrap();
    let (target, config) = settings.resolve().unwrap();
    let pool = fleet.pool(&target, &config).unwrap();
    let conn = pool.get().await.unwrap();
    let row = conn
        .query_one(
            "SELECT current_setting('work_mem'), current_setting('statement_timeout')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "7MB");
    assert_eq!(row.get::<_, String>(1), "4s");
    drop(conn);
    fleet.close_all(Duration::from_secs(5)).await;
}

#[test]
fn settings_that_need_a_session_are_refused_behind_a_transaction_pooler() {
    let mut settings = PoolSettings::new();
    settings
        .set(
            "url",
            &RawValue::Str("postgres://app@db/app?pooler=transaction&command_timeout=5s".into()),
            Source::Code,
        )
        .unwrap();
    let err = settings.resolve().unwrap_err();
    let message = err.to_string();
    assert!(err.is_config(), "{message}");
    assert!(message.contains("command_timeout"), "{message}");
    assert!(message.contains("pooler = transaction"), "{message}");
    assert!(message.contains("ALTER ROLE"), "{message}");
}

#[tokio::test]
async fn session_state_behind_a_transaction_pooler_is_warned_about_once_per_kind() {
    let capture = Capture::default();
    let writer = capture.clone();
    let _log = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish(),
    );
    let (_cluster, bouncer) = cluster_behind(PoolMode::Transaction);
    let fleet = Fleet::new();
    let pool = pool(
        &fleet,
        &format!("{}?pooler=transaction", bouncer.url("postgres")),
        "pooler-warn",
        2,
    );
    let conn = pool.get().await.unwrap();
    for _ in 0..3 {
        conn.execute("SET work_mem = '8MB'", &[]).await.unwrap();
        conn.query("SELECT pg_advisory_lock($1)", &[&5i64])
            .await
            .unwrap();
        conn.query("SELECT pg_advisory_unlock($1)", &[&5i64])
            .await
            .unwrap();
    }
    // Behind the pooler a transaction keeps its server connection: this
    // is where a session-wide effect belongs (SET LOCAL, xact locks).
    let mut conn = conn;
    let tx = conn.transaction().await.unwrap();
    let statement = tx.prepare_cached("SELECT $1::int * 2").await.unwrap();
    let v: i32 = tx.query_one(&statement, &[&21i32]).await.unwrap().get(0);
    assert_eq!(v, 42);
    tx.execute("SET LOCAL work_mem = '9MB'", &[]).await.unwrap();
    tx.commit().await.unwrap();
    drop(conn);
    let log = capture.text();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("behind pooler = transaction"))
        .collect();
    assert_eq!(warnings.len(), 2, "one per kind:\n{log}");
    assert!(
        warnings[0].contains("SET") && warnings[0].contains("work_mem"),
        "{log}"
    );
    assert!(warnings[1].contains("advisory"), "{log}");
    fleet.close_all(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_pooler_setting_named_statements_fail_behind_a_transaction_pooler() {
    // The evidence for `pooler`: the same load with `pooler=none` fails.
    let (_cluster, bouncer) = cluster_behind(PoolMode::Transaction);
    let fleet = Fleet::new();
    let pool = pool(&fleet, &bouncer.url("postgres"), "pooler-none", 4);
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..8 {
        let pool = pool.clone();
        tasks.spawn(async move {
            let mut failed = 0;
            for i in 0..50 {
                let conn = pool.get().await.unwrap();
                if conn
                    .query_one("SELECT $1::int + $2::int", &[&task, &i])
                    .await
                    .is_err()
                {
                    failed += 1;
                }
            }
            failed
        });
    }
    let mut failed = 0;
    while let Some(n) = tasks.join_next().await {
        failed += n.unwrap();
    }
    eprintln!("pooler=none behind a transaction pooler: {failed} of 400 statements failed");
    assert!(failed > 0);
    fleet.close_all(Duration::from_secs(5)).await;
}
