//! `pgfleet`: the command-line face of pgfleet.
//!
//! * `pgfleet config check [--config DIR] [--json]` prints the effective
//!   configuration with the source of every value (passwords masked) and
//!   exits 2 when it is invalid; `pgfleet config keys` lists every key.
//! * `pgfleet demo [--naive | --compare]` reproduces the "too many clients"
//!   incident with per-store pools and shows the fleet holding; `pgfleet
//!   demo --replicas N` does the same for N replica processes of one
//!   service, `replicas: 1` beside `replicas: auto`.
//! * `pgfleet serve [--config DIR] [--listen ADDR]` runs the multi-user
//!   memory API on one fleet.
//! * `pgfleet monitor [--interval S] [--duration S] [--max N]` samples the
//!   server's client connections from `pg_stat_activity`.

mod check;
mod demo;
mod demo_replicas;
mod embedded;
mod monitor;
mod replica;
mod sampler;
mod serve;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// One shared, bounded PostgreSQL pool per database.
#[derive(Debug, Parser)]
#[command(name = "pgfleet", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the multi-user memory API (M0 messages, M1 episodes, M2 facts) on
    /// one fleet; without a configured database, on a throwaway local cluster.
    Serve(serve::ServeArgs),
    /// Reproduce the "too many clients" incident with per-store pools, and
    /// show one fleet (one pool per database, a budget per server) holding
    /// under the same load; with --replicas N, N replica processes of one
    /// service with `replicas: 1` and then `replicas: auto`.
    Demo(demo::DemoArgs),
    /// Watch the server's client connections (pg_stat_activity): total, by
    /// state, database and application, the fleet's own marked, and the
    /// replicas of `replicas: auto` by service and instance. One sample by
    /// default; exit status 3 if --max was exceeded.
    Monitor(monitor::MonitorArgs),
    /// One replica of a service under load, reporting JSON lines (used by
    /// `demo --replicas` and the tests).
    #[command(hide = true)]
    Replica(replica::ReplicaArgs),
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration and where each value comes from;
    /// exit 2 if it is invalid.
    Check(check::CheckArgs),
    /// List every configuration key of a pool and its database: aliases,
    /// default, range, and what it does.
    Keys,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo provokes connect failures on purpose and counts them in its
    // table; its default log level keeps the terminal readable.
    let default_filter = match cli.command {
        Command::Demo(_) => "error",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Serve(args) => serve::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Monitor(args) => monitor::run(&args),
        Command::Replica(args) => replica::run(&args),
        Command::Config {
            command: ConfigCommand::Check(args),
        } => check::run(&args),
        Command::Config {
            command: ConfigCommand::Keys,
        } => check::keys(),
    }
}
