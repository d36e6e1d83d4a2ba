//! `pgfleet serve`: the multi-user memory API on one fleet.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use pgfleet::{Fleet, Loader, Target};
use pgfleet_memory::{precache, App};

/// Arguments of `pgfleet serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration directory; default ./config if it exists.
    #[arg(long, value_name = "DIR")]
    config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// On shutdown, how long to wait for connections to close, in seconds.
    #[arg(long, default_value_t = 10.0)]
    shutdown_timeout: f64,
}

pub fn run(args: &ServeArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgfleet serve: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgfleet serve: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: &ServeArgs) -> Result<(), String> {
    if !(args.shutdown_timeout > 0.0 && args.shutdown_timeout <= 3600.0) {
        return Err(format!(
            "--shutdown-timeout {}: expected seconds in (0, 3600]",
            args.shutdown_timeout
        ));
    }
    let loader = match &args.config {
        Some(dir) => Loader::new(dir),
        None if PathBuf::from("config").is_dir() => Loader::new("config"),
        None => Loader::without_files(),
    };
    let loaded = precache::declare(loader)
        .load()
        .map_err(|e| e.to_string())?;
    let precache = precache::entries(&loaded).map_err(|e| e.to_string())?;
    let configured = loaded.settings().is_set("url") || loaded.settings().is_set("host");
    // With no database configured: a throwaway local cluster, kept for the
    // life of the process.
    let (_cluster, target, warm) = if configured {
        let mut warm: Vec<(Target, pgfleet::PoolConfig)> = loaded
            .warmup()
            .iter()
            .map(|w| (w.target.clone(), w.config.clone()))
            .collect();
        warm.push((loaded.target().clone(), loaded.pool_config().clone()));
        (None, loaded.target().clone(), warm)
    } else {
        if let Some(missing) = crate::embedded::MISSING {
            return Err(missing.to_owned());
        }
        println!("no database configured: starting a throwaway local PostgreSQL cluster");
        let cluster = crate::embedded::start(None).await?;
        println!(
            "  data kept under {} until the server stops",
            cluster.dir().display()
        );
        let database = loaded.target().database().to_owned();
        cluster.create_database(&database).await?;
        let target = Target::parse(&cluster.url(&database)).map_err(|e| e.to_string())?;
        let warm = vec![(target.clone(), loaded.pool_config().clone())];
        (Some(cluster), target, warm)
    };
    let fleet = Fleet::with_config(loaded.fleet_config().clone()).map_err(|e| e.to_string())?;
    let app = Arc::new(App::new(
        fleet.clone(),
        target.clone(),
        loaded.pool_config().clone(),
    ));
    // Listen first: while the database is not reachable yet, /health says
    // so and the API answers 503; the start-up goes on in the background.
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("database: {target}");
    println!("listening on http://{addr}");
    let starting = tokio::spawn({
        let app = app.clone();
        async move { app.start_up(warm, precache).await }
    });

    pgfleet_memory::serve(listener, app.clone(), shutdown_signal())
        .await
        .map_err(|e| e.to_string())?;
    starting.abort();
    println!("shutting down: in-flight requests finished; closing connections");
    app.clear_services();
    let report = fleet
        .close_all(Duration::from_secs_f64(args.shutdown_timeout))
        .await;
    println!(
        "closed {} pool(s); connections cut at the deadline: {}",
        report.pools, report.connections_cut
    );
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}
