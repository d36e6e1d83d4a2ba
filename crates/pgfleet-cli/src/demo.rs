//! `pgfleet demo`: reproduces the incident that started pgfleet — every
//! store with its own small pool, the server answering `FATAL: sorry, too
//! many clients already` — and shows the fleet holding under the same load.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use pgfleet::{BudgetConfig, BudgetMode, Fleet, FleetConfig, Pool, PoolConfig, Target};
use serde::Serialize;

use crate::sampler::Sampler;

/// Arguments of `pgfleet demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Server to use; default: `DATABASE_URL`, else a throwaway local cluster.
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
    /// `max_connections` of the throwaway cluster.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(5..=1000))]
    max_connections: u32,
    /// Users; each has three memory-layer stores (M0, M1, M2).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    users: u32,
    /// Queries each store issues, one after the other.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    rounds: u32,
    /// Acquire timeout of every pool, in seconds.
    #[arg(long, default_value_t = 5.0)]
    timeout: f64,
    /// The original bug: every store opens its own small pool (1-2 connections).
    #[arg(long, conflicts_with = "compare")]
    naive: bool,
    /// Run the naive setup, then the fleet, and print them side by side.
    #[arg(long)]
    compare: bool,
    /// Also write the results as JSON to this file (`-` for standard output).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Instead of stores: N replica processes of one service, each wanting
    /// up to 20 connections, with `replicas: 1` and then `replicas: auto`.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(2..=16), conflicts_with_all = ["naive", "compare"])]
    replicas: Option<u32>,
    /// With --replicas: how long each replica runs, seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(2..=600), requires = "replicas")]
    seconds: u64,
}

/// Which setup ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// One small pool per store.
    Naive,
    /// One fleet: one pool per database, one budget per server.
    Fleet,
}

/// The outcome of one run.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// The setup.
    pub mode: Mode,
    /// Stores (users x 3).
    pub stores: u32,
    /// Pools the stores used.
    pub pools: usize,
    /// Requests issued.
    pub requests: u64,
    /// Requests that succeeded.
    pub ok: u64,
    /// Requests that failed.
    pub failed: u64,
    /// Connection attempts the server refused with 53300 (too many clients).
    pub too_many_clients: u64,
    /// Most client connections seen on the server at once.
    pub peak_server_connections: usize,
    /// The server's `max_connections`.
    pub max_connections: u32,
    /// The fleet's budget for the server (fleet mode).
    pub budget: Option<u32>,
    /// Median request latency (acquire + query), milliseconds.
    pub p50_ms: f64,
    /// 99th percentile request latency, milliseconds.
    pub p99_ms: f64,
    /// Wall time of the run, seconds.
    pub elapsed_s: f64,
    /// The first error a request saw, if any.
    pub first_error: Option<String>,
}

/// What the demo prints as JSON.
#[derive(Debug, Serialize)]
struct DemoReport {
    server: String,
    users: u32,
    rounds: u32,
    runs: Vec<RunReport>,
}

pub fn run(args: &DemoArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgfleet demo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(demo(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pgfleet demo: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn demo(args: &DemoArgs) -> Result<ExitCode, String> {
    if !(args.timeout > 0.0 && args.timeout <= 3600.0) {
        return Err(format!(
            "--timeout {}: expected seconds in (0, 3600]",
            args.timeout
        ));
    }
    let url = args
        .database_url
        .clone()
        .or_else(|| std::env::var("DATABASE_URL").ok());
    let (_cluster, target, url) = match url {
        Some(url) => (None, Target::parse(&url).map_err(|e| e.to_string())?, url),
        None => {
            if let Some(missing) = crate::embedded::MISSING {
                return Err(missing.to_owned());
            }
            eprintln!(
                "no database configured (--database-url or DATABASE_URL): starting a throwaway PostgreSQL cluster with max_connections={}",
                args.max_connections
            );
            let cluster = crate::embedded::start(Some(args.max_connections)).await?;
            eprintln!(
                "  data kept under {} (removed at exit)",
                cluster.dir().display()
            );
            let url = cluster.url("postgres");
            let target = Target::parse(&url).map_err(|e| e.to_string())?;
            (Some(cluster), target, url)
        }
    };
    if let Some(processes) = args.replicas {
        return demo_replicas(args, &url, &target, processes).await;
    }
    let modes: &[Mode] = if args.compare {
        &[Mode::Naive, Mode::Fleet]
    } else if args.naive {
        &[Mode::Naive]
    } else {
        &[Mode::Fleet]
    };
    let mut runs = Vec::new();
    for &mode in modes {
        runs.push(run_mode(mode, args, &target).await?);
    }
    let table = table(&runs);
    let report = DemoReport {
        server: target.to_string(),
        users: args.users,
        rounds: args.rounds,
        runs,
    };
    emit(args, &table, &report)
}

/// `--replicas N`: both setups, the table, the JSON.
async fn demo_replicas(
    args: &DemoArgs,
    url: &str,
    target: &Target,
    processes: u32,
) -> Result<ExitCode, String> {
    let mut runs = Vec::new();
    for replicas in [pgfleet::Replicas::Fixed(1), pgfleet::Replicas::Auto] {
        runs.push(crate::demo_replicas::run(url, target, replicas, processes, args.seconds).await?);
    }
    let table = crate::demo_replicas::table(&runs);
    emit(args, &table, &runs)
}

/// Prints the table, and the JSON where --json says: with JSON on
/// standard output, the table goes to standard error.
fn emit<T: Serialize>(args: &DemoArgs, table: &str, report: &T) -> Result<ExitCode, String> {
    let json_to_stdout = args.json.as_deref().is_some_and(|p| p.as_os_str() == "-");
    if json_to_stdout {
        eprint!("{table}");
    } else {
        print!("{table}");
    }
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
        if path.as_os_str() == "-" {
            println!("{json}");
        } else {
            std::fs::write(path, json)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_mode(mode: Mode, args: &DemoArgs, target: &Target) -> Result<RunReport, String> {
    let stores = args.users * 3;
    let timeout = Duration::from_secs_f64(args.timeout);
    let sampler = Sampler::start(target).await?;
    let app = match mode {
        Mode::Naive => "pgfleet-demo-naive",
        Mode::Fleet => "pgfleet-demo-fleet",
    };
    // The pools every store uses, and how they are closed afterwards.
    let fleet = Fleet::with_config(FleetConfig {
        budget: BudgetConfig {
            mode: BudgetMode::Auto,
            ..BudgetConfig::default()
        },
    })
    .map_err(|e| e.to_string())?;
    let mut naive_pools = Vec::new();
    let mut store_pools: Vec<Pool> = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..stores {
        match mode {
            Mode::Naive => {
                // What the original service did: a small pool per store.
                let config = PoolConfig {
                    min_size: 1,
                    max_size: Some(2),
                    acquire_timeout: timeout,
                    application_name: app.into(),
                    ..PoolConfig::default()
                };
                let pool = Pool::new(target.clone(), config).map_err(|e| e.to_string())?;
                naive_pools.push(pool.clone());
                store_pools.push(pool);
            }
            Mode::Fleet => {
                let config = PoolConfig {
                    min_size: 2,
                    max_size: Some(20),
                    acquire_timeout: timeout,
                    application_name: app.into(),
                    ..PoolConfig::default()
                };
                let handle = fleet.pool(target, &config).map_err(|e| e.to_string())?;
                store_pools.push(handle.pool().clone());
                handles.push(handle);
            }
        }
    }
    let pools = match mode {
        Mode::Naive => naive_pools.len(),
        Mode::Fleet => fleet.len(),
    };
    let total = u64::from(stores) * u64::from(args.rounds);
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>6} [{bar:40}] {pos}/{len} {msg}")
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{mode:?}").to_lowercase());
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, pool) in store_pools.into_iter().enumerate() {
        let (ok, failed, latencies, first_error, bar) = (
            ok.clone(),
            failed.clone(),
            latencies.clone(),
            first_error.clone(),
            bar.clone(),
        );
        let rounds = args.rounds;
        tasks.push(tokio::spawn(async move {
            for round in 0..rounds {
                let t = Instant::now();
                let result = async {
                    let conn = pool.get().await.map_err(|e| e.to_string())?;
                    conn.query_one(
                        "SELECT $1::int + count(*)::int FROM (SELECT pg_sleep(0.002)) s",
                        &[&((i as i32) * 1000 + round as i32)],
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                    Ok::<_, String>(())
                }
                .await;
                latencies.lock().expect("latencies").push(t.elapsed());
                match result {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        first_error.lock().expect("first error").get_or_insert(e);
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                bar.inc(1);
                bar.set_message(format!(
                    "ok {} failed {}",
                    ok.load(Ordering::Relaxed),
                    failed.load(Ordering::Relaxed)
                ));
            }
        }));
    }
    for task in tasks {
        task.await.map_err(|e| e.to_string())?;
    }
    bar.finish();
    let elapsed = started.elapsed();
    let (peak, max_connections) = sampler.finish();
    let too_many_clients: u64 = match mode {
        Mode::Naive => naive_pools
            .iter()
            .map(|p| p.stats().counters.connections_refused)
            .sum(),
        Mode::Fleet => fleet
            .stats()
            .pools
            .values()
            .map(|p| p.counters.connections_refused)
            .sum(),
    };
    let budget = fleet.stats().servers.values().next().and_then(|s| s.budget);
    for pool in &naive_pools {
        pool.close();
    }
    for pool in &naive_pools {
        pool.wait_closed(Instant::now() + Duration::from_secs(5))
            .await;
    }
    drop(handles);
    fleet.close_all(Duration::from_secs(5)).await;
    let mut latencies = std::mem::take(&mut *latencies.lock().expect("latencies"));
    latencies.sort();
    let pct = |q: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1000.0
    };
    let first_error = first_error.lock().expect("first error").take();
    Ok(RunReport {
        mode,
        stores,
        pools,
        requests: total,
        ok: ok.load(Ordering::SeqCst),
        failed: failed.load(Ordering::SeqCst),
        too_many_clients,
        peak_server_connections: peak,
        max_connections,
        budget: (mode == Mode::Fleet).then_some(budget).flatten(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        elapsed_s: elapsed.as_secs_f64(),
        first_error,
    })
}

fn table(runs: &[RunReport]) -> String {
    use std::fmt::Write as _;
    let mut out = String::from("\n");
    let _ = writeln!(
        out,
        "{:<6} {:>6} {:>5} {:>9} {:>8} {:>8} {:>17} {:>15} {:>7} {:>9} {:>9}",
        "mode",
        "stores",
        "pools",
        "requests",
        "ok",
        "failed",
        "too-many-clients",
        "peak-conns/max",
        "budget",
        "p50 ms",
        "p99 ms"
    );
    for r in runs {
        let _ = writeln!(
            out,
            "{:<6} {:>6} {:>5} {:>9} {:>8} {:>8} {:>17} {:>15} {:>7} {:>9.1} {:>9.1}",
            format!("{:?}", r.mode).to_lowercase(),
            r.stores,
            r.pools,
            r.requests,
            r.ok,
            r.failed,
            r.too_many_clients,
            format!("{}/{}", r.peak_server_connections, r.max_connections),
            r.budget.map_or("-".to_owned(), |b| b.to_string()),
            r.p50_ms,
            r.p99_ms,
        );
    }
    for r in runs {
        if let Some(e) = &r.first_error {
            let _ = writeln!(
                out,
                "\n{} mode, first error: {e}",
                format!("{:?}", r.mode).to_lowercase()
            );
        }
    }
    out
}
