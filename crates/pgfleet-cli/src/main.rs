//! `pgfleet`: the command-line face of pgfleet.
//!
//! * `pgfleet config check [--config DIR] [--json]` prints the effective
//!   configuration with the source of every value (passwords masked) and
//!   exits 2 when it is invalid.

mod check;

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
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Config {
            command: ConfigCommand::Check(args),
        } => check::run(&args),
    }
}
