//! `pgfleet monitor`: the connection monitor of seed 000, on
//! `pg_stat_activity`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use clap::Args;
use pgfleet::{ActivitySample, Loader, Pool, PoolConfig, Target};

/// Arguments of `pgfleet monitor`.
#[derive(Debug, Args)]
pub struct MonitorArgs {
    /// Server to watch; default: `DATABASE_URL`, else the target of --config.
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
    /// Configuration directory whose target to watch.
    #[arg(long, value_name = "DIR")]
    config: Option<PathBuf>,
    /// Sample every SECONDS until --duration ends (or Ctrl-C). Without it
    /// (and without --duration), one sample.
    #[arg(long, value_name = "SECONDS")]
    interval: Option<f64>,
    /// Stop after SECONDS (continuous mode; interval 1s unless given).
    #[arg(long, value_name = "SECONDS")]
    duration: Option<f64>,
    /// Exit with status 3 if any sample sees more than N client connections.
    #[arg(long, value_name = "N")]
    max: Option<usize>,
    /// Connections whose application_name starts with this are marked as
    /// the fleet's (`*`).
    #[arg(long, value_name = "PREFIX", default_value = "pgfleet")]
    fleet_app: String,
    /// One JSON object per sample.
    #[arg(long)]
    json: bool,
}

/// Exit status when `--max` was exceeded.
const MAX_EXCEEDED: u8 = 3;

pub fn run(args: &MonitorArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgfleet monitor: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(monitor(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pgfleet monitor: {e}");
            ExitCode::FAILURE
        }
    }
}

fn seconds(what: &str, value: f64) -> Result<Duration, String> {
    if value.is_finite() && value > 0.0 && value <= 86_400.0 {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(format!("--{what} {value}: expected seconds in (0, 86400]"))
    }
}

fn target(args: &MonitorArgs) -> Result<Target, String> {
    if let Some(url) = args
        .database_url
        .clone()
        .or_else(|| std::env::var("DATABASE_URL").ok())
    {
        return Target::parse(&url).map_err(|e| e.to_string());
    }
    match &args.config {
        Some(dir) => Ok(Loader::new(dir)
            .load()
            .map_err(|e| e.to_string())?
            .target()
            .clone()),
        None => Err(
            "no server to watch: give --database-url, set DATABASE_URL, or give --config DIR"
                .into(),
        ),
    }
}

async fn monitor(args: &MonitorArgs) -> Result<ExitCode, String> {
    let interval = args.interval.map(|s| seconds("interval", s)).transpose()?;
    let duration = args.duration.map(|s| seconds("duration", s)).transpose()?;
    let continuous = interval.is_some() || duration.is_some();
    let interval = interval.unwrap_or(Duration::from_secs(1));
    let target = target(args)?;
    let pool = Pool::new(
        target.clone(),
        PoolConfig {
            min_size: 0,
            max_size: Some(1),
            acquire_timeout: Duration::from_secs(10),
            application_name: "pgfleet-monitor".into(),
            ..PoolConfig::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let live = continuous && !args.json && std::io::stdout().is_terminal();
    let started = Instant::now();
    let mut exceeded = None;
    loop {
        let sample = {
            let conn = pool.get().await.map_err(|e| e.to_string())?;
            pgfleet::sample_activity(&conn)
                .await
                .map_err(|e| e.to_string())?
        };
        let fleet = sample.count_applications(|app| app.starts_with(&args.fleet_app));
        if let Some(max) = args.max {
            if sample.total > max {
                exceeded = Some(exceeded.map_or(sample.total, |e: usize| e.max(sample.total)));
            }
        }
        let stamp = humantime::format_rfc3339_seconds(SystemTime::now());
        if args.json {
            let mut value = serde_json::to_value(&sample).map_err(|e| e.to_string())?;
            value["time"] = stamp.to_string().into();
            value["fleet"] = fleet.into();
            println!("{value}");
        } else if continuous && !live {
            println!(
                "{}",
                line(&sample, fleet, &args.fleet_app, &stamp.to_string())
            );
        } else {
            let text = table(
                &sample,
                fleet,
                &args.fleet_app,
                &target.to_string(),
                &stamp.to_string(),
            );
            // On a terminal in continuous mode, redraw in place (home, clear).
            let redraw = if live { "\x1b[H\x1b[2J" } else { "" };
            print!("{redraw}{text}");
        }
        if !continuous || duration.is_some_and(|d| started.elapsed() + interval > d) {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    pool.close();
    match (exceeded, args.max) {
        (Some(peak), Some(max)) => {
            eprintln!("pgfleet monitor: {peak} client connections seen, more than --max {max}");
            Ok(ExitCode::from(MAX_EXCEEDED))
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}

fn mark(app: &str, prefix: &str) -> &'static str {
    if app.starts_with(prefix) {
        "*"
    } else {
        ""
    }
}

fn joined(map: &std::collections::BTreeMap<String, usize>, prefix: Option<&str>) -> String {
    let mut entries: Vec<_> = map.iter().collect();
    entries.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    entries
        .iter()
        .map(|(k, n)| format!("{}{k}={n}", prefix.map_or("", |p| mark(k, p))))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The replicas of each service: `service: instance=connections(want N)`.
fn replicas(s: &ActivitySample) -> Vec<String> {
    s.by_replica
        .iter()
        .map(|(service, instances)| {
            let total: usize = instances.values().map(|r| r.connections).sum();
            let each = instances
                .iter()
                .map(|(instance, r)| match r.want {
                    Some(want) => format!("{instance}={}(want {want})", r.connections),
                    None => format!("{instance}={}", r.connections),
                })
                .collect::<Vec<_>>()
                .join(" ");
            format!(
                "{service} ({} replicas, {total} connections): {each}",
                instances.len()
            )
        })
        .collect()
}

/// One plain line per sample, for pipes and logs.
fn line(s: &ActivitySample, fleet: usize, prefix: &str, stamp: &str) -> String {
    let mut line = format!(
        "{stamp} total={}/{} fleet={fleet} state[{}] db[{}] app[{}]",
        s.total,
        s.max_connections,
        joined(&s.by_state, None),
        joined(&s.by_database, None),
        joined(&s.by_application, Some(prefix)),
    );
    for service in replicas(s) {
        line.push_str(&format!(" replicas[{service}]"));
    }
    line
}

/// A compact table for a terminal or a one-shot look.
fn table(s: &ActivitySample, fleet: usize, prefix: &str, target: &str, stamp: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "{target}  {stamp}");
    let _ = writeln!(
        out,
        "client connections {} of max_connections {} ({} marked * are the fleet's: application_name {prefix}*)",
        s.total, s.max_connections, fleet
    );
    for (title, map, marks) in [
        ("state", &s.by_state, None),
        ("database", &s.by_database, None),
        ("application", &s.by_application, Some(prefix)),
    ] {
        let _ = writeln!(out, "  by {title}:");
        let mut entries: Vec<_> = map.iter().collect();
        entries.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (name, n) in entries {
            let m = marks.map_or("", |p| mark(name, p));
            let _ = writeln!(out, "    {n:>5}  {m}{name}");
        }
    }
    if !s.by_replica.is_empty() {
        let _ = writeln!(out, "  by service and instance (replicas: auto):");
        for (service, instances) in &s.by_replica {
            let total: usize = instances.values().map(|r| r.connections).sum();
            let _ = writeln!(
                out,
                "    {total:>5}  {service} ({} replicas)",
                instances.len()
            );
            for (instance, r) in instances {
                let want = r.want.map_or_else(
                    || "no coordinator seen".to_owned(),
                    |w| format!("wants {w}"),
                );
                let _ = writeln!(out, "    {:>5}    #{instance} ({want})", r.connections);
            }
        }
    }
    out
}
