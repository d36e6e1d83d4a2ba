//! `pgfleet replica` (hidden): one replica of a service under load, for
//! `pgfleet demo --replicas N` and the tests that start several processes.
//! It prints one JSON line per report interval on standard output: what its
//! fleet holds on the server, its share, the replicas it sees, and the
//! requests done and failed; its log (warnings, refusals) goes to standard
//! error.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use pgfleet::{BudgetConfig, BudgetMode, Fleet, FleetConfig, PoolConfig, Replicas, Target};
use serde::{Deserialize, Serialize};

/// Arguments of `pgfleet replica`.
#[derive(Debug, Args, Clone)]
pub struct ReplicaArgs {
    /// The server; default: `DATABASE_URL` (which keeps a password out of
    /// the process list).
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// `fleet.replicas`: `auto` or a count.
    #[arg(long, default_value = "auto", value_parser = parse_replicas)]
    pub replicas: Replicas,
    /// `fleet.service`.
    #[arg(long, default_value = "pgfleet-demo")]
    pub service: String,
    /// `fleet.headroom`: connections the budget leaves for other clients.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub headroom: u32,
    /// `max_size` of the replica's pool.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_size: u32,
    /// Tasks issuing requests.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub tasks: u32,
    /// How long each request holds its connection (pg_sleep), milliseconds.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub hold_ms: u64,
    /// How long to run, seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub seconds: u64,
    /// Report interval, milliseconds.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub report_ms: u64,
    /// Acquire timeout of the pool, seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout: u64,
}

/// `auto` or a count of at least 1.
pub fn parse_replicas(value: &str) -> Result<Replicas, String> {
    match value.trim() {
        "auto" => Ok(Replicas::Auto),
        n => match n.parse::<u32>() {
            Ok(n) if n >= 1 => Ok(Replicas::Fixed(n)),
            _ => Err(format!("{value:?}: expected `auto` or a whole number >= 1")),
        },
    }
}

/// One report line.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Report {
    /// Milliseconds since the replica started.
    pub elapsed_ms: u64,
    /// Its process id.
    pub pid: u32,
    /// Its instance id among the replicas (`replicas: auto`), else empty.
    pub instance: String,
    /// Units held on the server: connections open or being opened.
    pub held: u32,
    /// Its share, coordinator included (`replicas: auto`); else its budget.
    pub share: u32,
    /// Replicas it sees (`replicas: auto`; else 0).
    pub seen: u32,
    /// The server's budget as derived.
    pub budget: Option<u32>,
    /// Requests that succeeded.
    pub ok: u64,
    /// Requests that failed.
    pub failed: u64,
    /// Connects the server refused with 53300 (too many clients).
    pub refused: u64,
    /// The first error a request saw.
    pub first_error: Option<String>,
    /// The last line: the replica stopped.
    pub done: bool,
}

pub fn run(args: &ReplicaArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgfleet replica: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(replica(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgfleet replica: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn replica(args: &ReplicaArgs) -> Result<(), String> {
    let url = args
        .database_url
        .clone()
        .or_else(|| std::env::var("DATABASE_URL").ok())
        .ok_or("no server: give --database-url or set DATABASE_URL")?;
    let target = Target::parse(&url).map_err(|e| e.to_string())?;
    let fleet = Fleet::with_config(FleetConfig {
        budget: BudgetConfig {
            mode: BudgetMode::Auto,
            replicas: args.replicas,
            service: Some(args.service.clone()),
            headroom: args.headroom,
            ..BudgetConfig::default()
        },
    })
    .map_err(|e| e.to_string())?;
    let pool = fleet
        .pool(
            &target,
            &PoolConfig {
                min_size: 0,
                max_size: Some(args.max_size),
                acquire_timeout: Duration::from_secs(args.timeout),
                application_name: args.service.clone(),
                ..PoolConfig::default()
            },
        )
        .map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let sql = format!("SELECT pg_sleep({})", args.hold_ms as f64 / 1000.0);
    let mut tasks = Vec::new();
    for _ in 0..args.tasks {
        let (pool, stop, ok, failed, first_error, sql) = (
            pool.clone(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
            first_error.clone(),
            sql.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let result = async {
                    let conn = pool.get().await?;
                    conn.execute(sql.as_str(), &[]).await?;
                    Ok::<_, pgfleet::Error>(())
                }
                .await;
                match result {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        first_error
                            .lock()
                            .expect("first error")
                            .get_or_insert_with(|| e.to_string());
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    let started = Instant::now();
    let report = |done: bool| {
        let stats = fleet.stats();
        let budget = stats.servers.values().next();
        let replicas = budget.and_then(|b| b.replicas.clone());
        let line = Report {
            elapsed_ms: started.elapsed().as_millis() as u64,
            pid: std::process::id(),
            instance: replicas
                .as_ref()
                .map(|r| r.instance.clone())
                .unwrap_or_default(),
            held: budget.map_or(0, |b| b.in_use),
            share: match &replicas {
                Some(r) => r.share,
                None => budget.and_then(|b| b.capacity).unwrap_or(0),
            },
            seen: replicas.as_ref().map_or(0, |r| r.seen),
            budget: budget.and_then(|b| b.budget),
            ok: ok.load(Ordering::Relaxed),
            failed: failed.load(Ordering::Relaxed),
            refused: stats
                .pools
                .values()
                .map(|p| p.counters.connections_refused)
                .sum(),
            first_error: first_error.lock().expect("first error").clone(),
            done,
        };
        println!(
            "{}",
            serde_json::to_string(&line).expect("a report serialises")
        );
    };
    let until = started + Duration::from_secs(args.seconds);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(args.report_ms)).await;
        report(false);
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    report(true);
    drop(pool);
    fleet.close_all(Duration::from_secs(5)).await;
    Ok(())
}
