//! `pgfleet-bench`: pgfleet side by side with deadpool-postgres, bb8-postgres,
//! sqlx and raw tokio-postgres baselines, against one throwaway cluster, in
//! one run, interleaved so machine noise hits all alike.
//!
//! ```text
//! cargo run --release -p pgfleet-bench -- --json bench.json --markdown BENCHMARKS.md
//! cargo run -p pgfleet-bench -- --quick     # smoke test, under a minute
//! ```

mod cpu;
mod peers;
mod report;
mod scenarios;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use cpu::{cpu_ticks_self, cpu_ticks_server};
use peers::{Kind, Op, Subject};
use scenarios::{creation, lookups, memory, memory_probe};
use serde::Serialize;

/// Benchmark pgfleet against its peers.
#[derive(Debug, Parser)]
#[command(name = "pgfleet-bench", version, about)]
struct Args {
    /// Short run (smoke test): fewer concurrencies, shorter measurements, one
    /// repetition.
    #[arg(long)]
    quick: bool,
    /// Seconds per measurement.
    #[arg(long)]
    seconds: Option<f64>,
    /// Repetitions of every measurement (median and min are reported).
    #[arg(long)]
    repeat: Option<usize>,
    /// Pool size (max connections) of every pool.
    #[arg(long, default_value_t = 16)]
    pool_size: u32,
    /// Write the results as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Regenerate this markdown report (and an SVG chart beside it).
    #[arg(long, value_name = "FILE")]
    markdown: Option<PathBuf>,
    /// Run only these scenarios (letters, e.g. `--only a,e`; `l` is the
    /// lanes-versus-tasks table); all by default.
    /// A partial run cannot regenerate the markdown report.
    #[arg(long, value_delimiter = ',', value_parser = parse_scenario)]
    only: Vec<char>,
    /// Run only these operations of scenario B (e.g. `--ops select1-extended`);
    /// all by default. A partial run cannot regenerate the markdown report.
    #[arg(long, value_delimiter = ',', value_enum)]
    ops: Vec<Op>,
    /// Run only these concurrencies of scenarios A and B (e.g. `--tasks 16`);
    /// all by default. A partial run cannot regenerate the markdown report.
    #[arg(long, value_delimiter = ',')]
    tasks: Vec<usize>,
    /// Measure only these subjects in scenarios A and B (e.g. `--subjects
    /// pgfleet,dedicated`); all by default. A partial run cannot regenerate
    /// the markdown report.
    #[arg(long, value_delimiter = ',', value_enum)]
    subjects: Vec<Kind>,
    /// Internal (scenario F): measure the memory of one subject's idle
    /// connections in this fresh process, against `--probe-url`, and print
    /// KiB per connection.
    #[arg(long, hide = true, value_enum, requires = "probe_url")]
    memory_probe: Option<Kind>,
    /// Internal: the server of `--memory-probe`.
    #[arg(long, hide = true)]
    probe_url: Option<String>,
}

fn parse_scenario(s: &str) -> Result<char, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        one @ ("a" | "b" | "d" | "e" | "f" | "l") => Ok(one.chars().next().unwrap_or('a')),
        other => Err(format!(
            "unknown scenario {other:?}: expected one of a, b, d, e, f, l (c runs with b)"
        )),
    }
}

/// One measurement, aggregated over repetitions.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Scenario letter and name.
    pub scenario: String,
    /// Implementation.
    pub subject: &'static str,
    /// Operation.
    pub op: &'static str,
    /// Concurrent tasks.
    pub concurrency: usize,
    /// Operations per second: median over repetitions.
    pub ops_per_s: f64,
    /// Operations per second: lowest repetition.
    pub ops_per_s_min: f64,
    /// Operations per second of every repetition, in the order measured
    /// (repetition `i` of every subject of a step ran in the same rotation,
    /// so ratios are taken repetition by repetition).
    pub ops_per_s_reps: Vec<f64>,
    /// Latency percentiles in microseconds (median over repetitions).
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Failed operations.
    pub errors: u64,
    /// Jain's fairness index of per-task completions (1 = perfectly even).
    pub jain: f64,
    /// Client CPU, cores busy on average.
    pub client_cpu: f64,
    /// Server CPU, cores busy on average.
    pub server_cpu: f64,
}

/// The whole run.
#[derive(Debug, Serialize)]
pub struct Results {
    /// Machine and settings.
    pub setup: BTreeMap<String, String>,
    /// Scenarios A-C.
    pub rows: Vec<Row>,
    /// Scenario D: pool creation, milliseconds.
    pub creation: Vec<CreationRow>,
    /// Scenario E: registry lookups.
    pub lookups: Vec<LookupRow>,
    /// Scenario F: client memory per idle connection.
    pub memory: Vec<MemoryRow>,
}

/// Scenario D.
#[derive(Debug, Clone, Serialize)]
pub struct CreationRow {
    /// Implementation.
    pub subject: &'static str,
    /// Build plus first connection handed out, ms (median).
    pub first_connection_ms: f64,
    /// Build plus 5 connections open, ms (median).
    pub five_warm_ms: f64,
}

/// Scenario E.
#[derive(Debug, Clone, Serialize)]
pub struct LookupRow {
    /// Registry.
    pub registry: &'static str,
    /// Threads looking up.
    pub threads: usize,
    /// Lookups per second (all threads), median of the repetitions.
    pub lookups_per_s: f64,
    /// The slowest repetition's lookups per second.
    pub lookups_per_s_min: f64,
    /// Nanoseconds per lookup per thread, at the median.
    pub ns_per_lookup: f64,
}

/// Scenario F.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryRow {
    /// Implementation.
    pub subject: &'static str,
    /// Resident memory added per idle pooled connection, KiB.
    pub kib_per_connection: f64,
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let (Some(kind), Some(url)) = (args.memory_probe, &args.probe_url) {
        match runtime.block_on(memory_probe(kind, url)) {
            Ok(kib) => println!("{kib}"),
            Err(e) => {
                eprintln!("pgfleet-bench --memory-probe: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    if let Err(e) = runtime.block_on(run(args)) {
        eprintln!("pgfleet-bench: {e}");
        std::process::exit(1);
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn run(args: Args) -> Result<(), BoxError> {
    let wants = |scenario: char| args.only.is_empty() || args.only.contains(&scenario);
    let partial = !args.only.is_empty()
        || !args.ops.is_empty()
        || !args.tasks.is_empty()
        || !args.subjects.is_empty();
    if partial && args.markdown.is_some() {
        return Err(
            "--markdown needs the whole run: drop --only, --ops, --tasks and --subjects".into(),
        );
    }
    let seconds = args.seconds.unwrap_or(if args.quick { 0.25 } else { 2.0 });
    let repeat = args.repeat.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    let measure = Duration::from_secs_f64(seconds);
    eprintln!("starting a throwaway PostgreSQL cluster (max_connections=300, TLS on)");
    let ca = pgfleet_testkit::TestCa::new("pgfleet-bench CA")?;
    let tls = pgfleet_testkit::ServerTls::new(&ca, &["127.0.0.1"])?;
    let cluster = tokio::task::spawn_blocking(|| {
        pgfleet_testkit::TempCluster::builder()
            .setting("max_connections", "300")
            .setting("shared_buffers", "64MB")
            .tls(tls)
            .start()
    })
    .await??;
    // Every subject in plaintext (the server offers TLS, so pgfleet's
    // default `prefer` would take it), and pgfleet once more over TLS.
    let url = format!("{}?sslmode=disable", cluster.url("postgres"));
    let tls_url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        cluster.url("postgres"),
        cluster
            .ca_cert_path()
            .ok_or("the bench cluster has TLS")?
            .display()
    );
    cluster
        .execute(&format!(
            "DROP TABLE IF EXISTS bench; CREATE TABLE bench (id int PRIMARY KEY, v text); \
             INSERT INTO bench SELECT g, md5(g::text) FROM generate_series(1, {}) g; ANALYZE bench;",
            peers::ROWS
        ))
        .await?;
    let server_pid = std::fs::read_to_string(cluster.data_dir().join("postmaster.pid"))?
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<u32>().ok())
        .ok_or("cannot read postmaster.pid")?;

    let mut setup = BTreeMap::new();
    setup.insert(
        "cores".into(),
        std::thread::available_parallelism()
            .map_or(0, |n| n.get())
            .to_string(),
    );
    setup.insert("pool_size".into(), args.pool_size.to_string());
    setup.insert("seconds_per_measurement".into(), seconds.to_string());
    setup.insert("repetitions".into(), repeat.to_string());
    setup.insert("quick".into(), args.quick.to_string());
    setup.insert(
        "build".into(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
        .into(),
    );

    // Scenario F (in processes of its own) first, before the other
    // scenarios load the machine.
    let memory = if wants('f') {
        memory(&url).await?
    } else {
        Vec::new()
    };

    let size = args.pool_size;
    let mut subjects: Vec<(Kind, Subject)> = Vec::new();
    for kind in Kind::POOLS {
        let s = Subject::build(kind, &url, size, 0).await?;
        s.fill(size as usize).await?;
        subjects.push((kind, s));
    }
    let dedicated = Subject::build(Kind::Dedicated, &url, size, 0).await?;
    let pipelined = Subject::build(Kind::Pipelined, &url, 1, 0).await?;
    let shared = Subject::build(Kind::PgfleetShared, &url, size, 0).await?;
    let statements = Subject::build(Kind::PgfleetStmt, &url, size, 0).await?;
    let mut by_lanes = Vec::new();
    if wants('l') {
        for kind in [Kind::StmtLanes1, Kind::StmtLanes2, Kind::StmtLanes4] {
            by_lanes.push((kind, Subject::build(kind, &url, size, 0).await?));
        }
    }
    let over_tls = Subject::build(Kind::PgfleetTls, &tls_url, size, 0).await?;
    over_tls.fill(size as usize).await?;

    let (a_conc, b_conc): (&[usize], &[usize]) = if args.quick {
        (&[1, 16, 256], &[16, 256])
    } else {
        (&[1, 16, 256, 1024], &[16, 256, 1024])
    };
    let wants_tasks = |c: &&usize| args.tasks.is_empty() || args.tasks.contains(c);
    let wants_op = |op: &&Op| args.ops.is_empty() || args.ops.contains(op);
    let mut rows = Vec::new();
    let mut plan: Vec<Step> = Vec::new();
    for &c in a_conc.iter().filter(|_| wants('a')).filter(wants_tasks) {
        let mut with_control = subjects.clone();
        with_control.push((Kind::Noop, Subject::Noop));
        plan.push((
            "A acquire+release".into(),
            Op::AcquireRelease,
            c,
            with_control.clone(),
        ));
        if c > size as usize {
            plan.push((
                "A contended".into(),
                Op::AcquireYieldRelease,
                c,
                with_control,
            ));
        }
    }
    let b_ops: &[Op] = if args.quick {
        &[Op::Select1Prepared, Op::PointSimple]
    } else {
        &Op::QUERIES
    };
    for &op in b_ops.iter().filter(|_| wants('b')).filter(wants_op) {
        for &c in b_conc.iter().filter(wants_tasks) {
            // bb8 has no statement cache: it has no prepared form to run.
            let mut with_baselines: Vec<_> = subjects
                .iter()
                .filter(|(kind, _)| !(op.is_prepared() && *kind == Kind::Bb8))
                .cloned()
                .collect();
            with_baselines.push((Kind::Dedicated, dedicated.clone()));
            with_baselines.push((Kind::Pipelined, pipelined.clone()));
            with_baselines.push((Kind::PgfleetShared, shared.clone()));
            with_baselines.push((Kind::PgfleetStmt, statements.clone()));
            with_baselines.push((Kind::PgfleetTls, over_tls.clone()));
            plan.push(("B/C queries".into(), op, c, with_baselines));
        }
    }
    // The lanes table: the statement methods with 1, 2 and 4 lanes against
    // the number of tasks, beside the dedicated connections.
    let l_conc: &[usize] = if args.quick {
        &[16, 256]
    } else {
        &[1, 16, 256, 1024]
    };
    for &c in l_conc.iter().filter(|_| wants('l')).filter(wants_tasks) {
        let mut with_lanes = by_lanes.clone();
        with_lanes.push((Kind::Dedicated, dedicated.clone()));
        plan.push(("L lanes".into(), Op::Select1Prepared, c, with_lanes));
    }
    for step in &mut plan {
        step.3
            .retain(|(kind, _)| args.subjects.is_empty() || args.subjects.contains(kind));
    }
    let total: usize = plan.iter().map(|p| p.3.len() * repeat).sum();
    let mut done = 0;
    for (scenario, op, c, subjects) in plan {
        let mut samples: HashMap<&'static str, Vec<Sample>> = HashMap::new();
        for rep in 0..repeat {
            // Interleave: rotate the order every repetition.
            for i in 0..subjects.len() {
                let (kind, subject) = &subjects[(i + rep) % subjects.len()];
                // Dedicated connections are one per task: the baseline is
                // `pool_size` tasks, whatever the concurrency.
                let tasks = if *kind == Kind::Dedicated {
                    c.min(size as usize)
                } else {
                    c
                };
                let sample = measure_once(subject, op, tasks, measure, server_pid).await;
                samples.entry(kind.name()).or_default().push(sample);
                done += 1;
                eprint!("\r  measured {done}/{total}");
            }
        }
        for (kind, _) in &subjects {
            rows.push(aggregate(
                &scenario,
                kind.name(),
                op,
                c,
                &samples[kind.name()],
            ));
        }
    }
    eprintln!();
    let extra = [shared, statements]
        .into_iter()
        .chain(by_lanes.into_iter().map(|(_, s)| s));
    for s in subjects.into_iter().map(|(_, s)| s).chain(extra) {
        s.close().await;
    }

    let creation = if wants('d') {
        creation(&url, repeat.max(3)).await?
    } else {
        Vec::new()
    };
    let handle = tokio::runtime::Handle::current();
    let lookups = if wants('e') {
        tokio::task::spawn_blocking(move || lookups(measure, repeat, handle)).await?
    } else {
        Vec::new()
    };
    let results = Results {
        setup,
        rows,
        creation,
        lookups,
        memory,
    };
    print!("{}", report::table(&results));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)?;
    }
    if let Some(path) = &args.markdown {
        report::markdown(&results, path)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// One planned measurement: scenario, operation, tasks, subjects.
type Step = (String, Op, usize, Vec<(Kind, Subject)>);

/// One measurement of one subject.
struct Sample {
    ops: u64,
    errors: u64,
    elapsed: Duration,
    latencies_ns: Vec<u64>,
    per_task: Vec<u64>,
    client_cpu: f64,
    server_cpu: f64,
}

async fn measure_once(
    subject: &Subject,
    op: Op,
    tasks: usize,
    duration: Duration,
    server_pid: u32,
) -> Sample {
    let stop = Arc::new(AtomicBool::new(false));
    let cpu0 = (cpu_ticks_self(), cpu_ticks_server(server_pid));
    let started = Instant::now();
    let mut handles = Vec::with_capacity(tasks);
    for task in 0..tasks {
        let (subject, stop) = (subject.clone(), stop.clone());
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(1024);
            let (mut ok, mut errors) = (0u64, 0u64);
            let mut key = (task as i32 * 7919) % peers::ROWS;
            // Bounded by time and by count.
            while !stop.load(Ordering::Relaxed) && ok + errors < 50_000_000 {
                key = key % peers::ROWS + 1;
                let t = Instant::now();
                match subject.run(op, task, key).await {
                    Ok(()) => ok += 1,
                    Err(_) => errors += 1,
                }
                lat.push(t.elapsed().as_nanos() as u64);
                if op == Op::AcquireRelease && ok % 64 == 0 {
                    // Pools whose acquire never waits would otherwise hog
                    // the worker: let the others run.
                    tokio::task::yield_now().await;
                }
            }
            (ok, errors, lat)
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut sample = Sample {
        ops: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latencies_ns: Vec::new(),
        per_task: Vec::with_capacity(tasks),
        client_cpu: 0.0,
        server_cpu: 0.0,
    };
    for h in handles {
        let (ok, errors, lat) = h.await.unwrap_or((0, 1, Vec::new()));
        sample.ops += ok;
        sample.errors += errors;
        sample.per_task.push(ok);
        sample.latencies_ns.extend(lat);
    }
    sample.elapsed = started.elapsed();
    let secs = sample.elapsed.as_secs_f64();
    let tick = 100.0; // USER_HZ on Linux
    sample.client_cpu = cpu_ticks_self().saturating_sub(cpu0.0) as f64 / tick / secs;
    sample.server_cpu = cpu_ticks_server(server_pid).saturating_sub(cpu0.1) as f64 / tick / secs;
    sample
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

/// The median (the mean of the middle two of an even count); 0 when empty.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Jain's index: (sum x)^2 / (n * sum x^2).
pub fn jain(xs: &[u64]) -> f64 {
    let n = xs.len() as f64;
    let sum: f64 = xs.iter().map(|&x| x as f64).sum();
    let squares: f64 = xs.iter().map(|&x| (x as f64).powi(2)).sum();
    if squares == 0.0 {
        return 0.0;
    }
    sum * sum / (n * squares)
}

fn aggregate(
    scenario: &str,
    subject: &'static str,
    op: Op,
    concurrency: usize,
    samples: &[Sample],
) -> Row {
    let throughput: Vec<f64> = samples
        .iter()
        .map(|s| s.ops as f64 / s.elapsed.as_secs_f64())
        .collect();
    let pct = |q: f64| {
        median(
            samples
                .iter()
                .map(|s| {
                    let mut l = s.latencies_ns.clone();
                    l.sort_unstable();
                    percentile(&l, q)
                })
                .collect(),
        )
    };
    Row {
        scenario: scenario.to_owned(),
        subject,
        op: op.name(),
        concurrency,
        ops_per_s: median(throughput.clone()),
        ops_per_s_min: throughput.iter().copied().fold(f64::INFINITY, f64::min),
        ops_per_s_reps: throughput,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        p999_us: pct(0.999),
        errors: samples.iter().map(|s| s.errors).sum(),
        jain: median(samples.iter().map(|s| jain(&s.per_task)).collect()),
        client_cpu: median(samples.iter().map(|s| s.client_cpu).collect()),
        server_cpu: median(samples.iter().map(|s| s.server_cpu).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jain_index_is_one_when_even_and_one_over_n_when_one_task_does_all() {
        assert!((jain(&[5, 5, 5, 5]) - 1.0).abs() < 1e-9);
        assert!((jain(&[20, 0, 0, 0]) - 0.25).abs() < 1e-9);
    }

    #[test]
    fn percentiles_pick_the_rank() {
        let v: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        assert_eq!(percentile(&v, 0.5), 500.0);
        assert_eq!(percentile(&v, 0.99), 990.0);
        assert_eq!(percentile(&v, 0.999), 999.0);
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(Vec::new()), 0.0);
    }
}
