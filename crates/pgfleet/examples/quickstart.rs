//! Quickstart: 5 users x 3 memory-layer stores share one pool.
//!
//! Uses `DATABASE_URL` when set; otherwise starts a throwaway local
//! PostgreSQL cluster (removed at exit).
//!
//! ```text
//! cargo run -p pgfleet --example quickstart
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgfleet::{Fleet, PoolConfig, Target};
use pgfleet_testkit::TempCluster;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (_cluster, url) = match std::env::var("DATABASE_URL") {
        Ok(url) => (None, url),
        Err(_) => {
            println!("DATABASE_URL is not set: starting a throwaway PostgreSQL cluster");
            let cluster = TempCluster::builder()
                .setting("max_connections", "30")
                .start()?;
            println!(
                "  data directory {} (removed at exit)",
                cluster.data_dir().display()
            );
            let url = cluster.url("postgres");
            (Some(cluster), url)
        }
    };
    let target = Target::parse(&url)?;
    println!("target: {target}");

    let fleet = Fleet::new();
    let config = PoolConfig {
        min_size: 2,
        max_size: Some(8),
        application_name: "pgfleet-quickstart".into(),
        ..PoolConfig::default()
    };
    let started = Instant::now();
    let report = fleet.warmup([(target.clone(), config.clone())]).await;
    for outcome in &report.outcomes {
        match &outcome.result {
            Ok(took) => println!("warmed up {} in {took:?}", outcome.url),
            Err(e) => return Err(format!("warm-up of {} failed: {e}", outcome.url).into()),
        }
    }

    // Every store of every user asks the fleet; all get the same pool.
    let mut stores = Vec::new();
    for user in 0..5 {
        for layer in ["M0", "M1", "M2"] {
            stores.push((format!("user{user}/{layer}"), fleet.pool(&target, &config)?));
        }
    }
    println!(
        "{} stores -> {} pool(s), active_references = {} (the stores, plus the fleet's own handle from warm-up)",
        stores.len(),
        fleet.len(),
        stores[0].1.active_references()
    );

    let stores = Arc::new(stores);
    let mut tasks = Vec::new();
    for i in 0..300usize {
        let stores = stores.clone();
        tasks.push(tokio::spawn(async move {
            let (_, pool) = &stores[i % stores.len()];
            let conn = pool.get().await?;
            conn.query_one("SELECT pg_sleep(0.005)", &[]).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        }));
    }
    let mut failed = 0;
    for task in tasks {
        if task.await?.is_err() {
            failed += 1;
        }
    }
    let conn = stores[0].1.get().await?;
    let backends: i64 = conn
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgfleet-quickstart'",
            &[],
        )
        .await?
        .get(0);
    drop(conn);
    println!(
        "300 concurrent queries in {:?}: {} failed; server backends for this app: {backends} (max_size {})",
        started.elapsed(),
        failed,
        config.effective_max_size()
    );
    println!("{}", serde_json::to_string_pretty(&fleet.stats())?);
    let closed = fleet.close_all(Duration::from_secs(5)).await;
    println!(
        "closed {} pool(s); connections cut: {}",
        closed.pools, closed.connections_cut
    );
    Ok(())
}
