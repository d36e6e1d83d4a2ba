//! `pgfleet config check`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use pgfleet::{Effective, FleetConfig, Loaded, Loader, PoolConfig};
use pgfleet_memory::{precache, PrecacheEntry};
use serde::Serialize;

/// Arguments of `pgfleet config check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Configuration directory (Hydra layout: config.yaml, database/, store/).
    /// Default: ./config if it exists, else defaults and environment only.
    #[arg(long, value_name = "DIR")]
    config: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// `println!` into a `String` (writing to a `String` cannot fail).
macro_rules! outln {
    ($out:expr) => {
        $out.push('\n')
    };
    ($out:expr, $($arg:tt)*) => {{
        let _ = writeln!($out, $($arg)*);
    }};
}

/// Exit code for an invalid configuration.
const INVALID: u8 = 2;

pub fn run(args: &CheckArgs) -> ExitCode {
    let (loader, described) = match &args.config {
        Some(dir) => (Loader::new(dir), dir.display().to_string()),
        None if PathBuf::from("config").is_dir() => (Loader::new("config"), "./config".to_owned()),
        None => (
            Loader::without_files(),
            "none (no --config and no ./config: defaults and environment only)".to_owned(),
        ),
    };
    let loaded = match precache::declare(loader).load() {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("pgfleet: {e}");
            return ExitCode::from(INVALID);
        }
    };
    let precache = match precache::entries(&loaded) {
        Ok(entries) => entries,
        Err(e) => {
            eprintln!("pgfleet: {e}");
            return ExitCode::from(INVALID);
        }
    };
    let mut out = String::new();
    if args.json {
        match serde_json::to_string_pretty(&Report::new(&loaded, precache)) {
            Ok(json) => outln!(out, "{json}"),
            Err(e) => {
                eprintln!("pgfleet: cannot serialise the report: {e}");
                return ExitCode::FAILURE;
            }
        }
        return emit(&out);
    }
    outln!(out, "configuration directory: {described}");
    if !loaded.files().is_empty() {
        outln!(out, "files read: {}", loaded.files().join(", "));
    }
    outln!(out, "target: {}", loaded.target());
    outln!(out);
    let rows = loaded.explain();
    let key_width = rows.iter().map(|r| r.key.len()).max().unwrap_or(0);
    let value_width = rows
        .iter()
        .map(|r| r.value.len())
        .max()
        .unwrap_or(0)
        .min(60);
    outln!(
        out,
        "{:key_width$}  {:value_width$}  source",
        "key",
        "value"
    );
    for row in rows {
        outln!(
            out,
            "{:key_width$}  {:value_width$}  {}",
            row.key,
            row.value,
            row.source
        );
    }
    let budget = &loaded.fleet_config().budget;
    outln!(
        out,
        "\nserver budget (connections this process may hold per server):"
    );
    let describe = |mode: &pgfleet::BudgetMode| {
        match mode {
        pgfleet::BudgetMode::Auto => match budget.replicas {
            pgfleet::Replicas::Auto => format!(
                "auto: max_connections - reserved - headroom {}, read at first contact, split between the live replicas of service {}",
                budget.headroom,
                budget
                    .service
                    .as_deref()
                    .unwrap_or("<the first pool's application_name>")
            ),
            pgfleet::Replicas::Fixed(n) => format!(
                "auto: (max_connections - reserved - headroom {}) / replicas {n}, read at first contact",
                budget.headroom
            ),
        },
        pgfleet::BudgetMode::Fixed(n) => format!("{n} connections"),
        pgfleet::BudgetMode::Off => "off: pools are bounded by max_size only".to_owned(),
    }
    };
    outln!(out, "  default: {}", describe(&budget.mode));
    for (server, mode) in &budget.servers {
        outln!(out, "  {server}: {}", describe(mode));
    }
    if !loaded.warmup().is_empty() {
        outln!(out, "\nwarm-up at start:");
        for w in loaded.warmup() {
            outln!(
                out,
                "  {} (min_size {}, max_size {})",
                w.target,
                w.config.min_size,
                w.config.effective_max_size()
            );
        }
    }
    if !precache.is_empty() {
        outln!(out, "\npre-created services:");
        for p in &precache {
            outln!(out, "  user {}: {}", p.user, p.services.join(", "));
        }
    }
    outln!(out, "\nconfiguration is valid");
    emit(&out)
}

/// `pgfleet config keys`: the table of keys, as the parser reads it.
pub fn keys() -> ExitCode {
    let keys: Vec<pgfleet::KeyInfo> = pgfleet::config_keys().collect();
    let names: Vec<String> = keys
        .iter()
        .map(|k| {
            if k.aliases.is_empty() {
                k.name.to_owned()
            } else {
                format!("{} ({})", k.name, k.aliases.join(", "))
            }
        })
        .collect();
    let name_width = names.iter().map(String::len).max().unwrap_or(0);
    let default_width = keys.iter().map(|k| k.default.len()).max().unwrap_or(0);
    let range_width = keys
        .iter()
        .map(|k| k.range.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    outln!(
        out,
        "{:name_width$}  {:default_width$}  {:range_width$}  meaning",
        "key (aliases)",
        "default",
        "range"
    );
    for (key, name) in keys.iter().zip(&names) {
        outln!(
            out,
            "{name:name_width$}  {:default_width$}  {:range_width$}  {}",
            key.default,
            key.range,
            key.doc
        );
    }
    emit(&out)
}

/// What `--json` prints.
#[derive(Debug, Serialize)]
struct Report<'a> {
    /// The effective target, password masked.
    target: String,
    /// Its normalised key (see `Target::key`).
    key: &'a str,
    /// Files read.
    files: &'a [String],
    /// Effective values and their sources.
    effective: &'a [Effective],
    /// The effective pool configuration (durations as `"30s"` text).
    pool_config: &'a PoolConfig,
    /// Pools to warm.
    warmup: Vec<WarmupRow>,
    /// Users whose services `pgfleet serve` creates at start.
    precache: Vec<PrecacheEntry>,
    /// Fleet-wide settings.
    fleet: &'a FleetConfig,
}

/// One warm-up target in a [`Report`].
#[derive(Debug, Serialize)]
struct WarmupRow {
    /// The target, password masked.
    url: String,
    /// Its warm floor.
    min_size: u32,
    /// Its cap.
    max_size: u32,
}

impl<'a> Report<'a> {
    fn new(loaded: &'a Loaded, precache: Vec<PrecacheEntry>) -> Report<'a> {
        Report {
            target: loaded.target().masked_url(),
            key: loaded.target().key(),
            files: loaded.files(),
            effective: loaded.explain(),
            pool_config: loaded.pool_config(),
            warmup: loaded
                .warmup()
                .iter()
                .map(|w| WarmupRow {
                    url: w.target.masked_url(),
                    min_size: w.config.min_size,
                    max_size: w.config.effective_max_size(),
                })
                .collect(),
            precache,
            fleet: loaded.fleet_config(),
        }
    }
}

/// Writes the report to standard output; a closed pipe (`| head`) is not an
/// error worth a panic.
fn emit(out: &str) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgfleet: cannot write the report: {e}");
            ExitCode::FAILURE
        }
    }
}
