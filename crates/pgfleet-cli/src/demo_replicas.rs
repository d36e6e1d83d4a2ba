//! `pgfleet demo --replicas N`: N replica processes of one service on one
//! small server, each wanting up to 20 connections, first with
//! `replicas: 1` (each divides the server as if it were alone) and then
//! with `replicas: auto` (they find each other and split it), side by side.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgfleet::Replicas;
use serde::Serialize;

use crate::replica::Report;
use crate::sampler::Sampler;

/// The outcome of one setup.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicasRun {
    /// `1` or `auto`.
    pub replicas_setting: String,
    /// Replica processes.
    pub processes: u32,
    /// Requests that succeeded, over all replicas.
    pub ok: u64,
    /// Requests that failed.
    pub failed: u64,
    /// Connects the server refused with 53300 (too many clients).
    pub too_many_clients: u64,
    /// Most client connections seen on the server at once.
    pub peak_server_connections: usize,
    /// The server's `max_connections`.
    pub max_connections: u32,
    /// The budget each replica derived for the server.
    pub budget: Option<u32>,
    /// Connections each replica held at the end.
    pub held: Vec<u32>,
    /// Jain's fairness index over what the replicas held at the end.
    pub jain: f64,
    /// The first error a request saw, if any.
    pub first_error: Option<String>,
}

/// One child `pgfleet replica`, its last report, and what it held in the
/// last report under load.
struct ReplicaChild {
    child: Child,
    last: Arc<Mutex<(Option<Report>, u32)>>,
}

impl Drop for ReplicaChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(url: &str, replicas: Replicas, seconds: u64) -> Result<ReplicaChild, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find pgfleet itself: {e}"))?;
    let mut child = Command::new(exe)
        .args(["replica", "--replicas", &replicas.to_string()])
        .args(["--service", "pgfleet-demo-replicas", "--max-size", "20"])
        .args(["--tasks", "40", "--hold-ms", "20", "--report-ms", "200"])
        .args(["--seconds", &seconds.to_string()])
        // In the environment, not in the process list: it may hold a
        // password.
        .env("DATABASE_URL", url)
        // Refusals are counted in the table; the log would drown it.
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start a replica: {e}"))?;
    let stdout = child.stdout.take().ok_or("no output of a replica")?;
    let last = Arc::new(Mutex::new((None, 0)));
    let into = last.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(report) = serde_json::from_str::<Report>(&line) {
                let mut last = into.lock().expect("report");
                if !report.done {
                    last.1 = report.held;
                }
                last.0 = Some(report);
            }
        }
    });
    Ok(ReplicaChild { child, last })
}

/// Runs `processes` replicas with `replicas` for `seconds` each, started
/// one by one `stagger` apart.
pub async fn run(
    url: &str,
    target: &pgfleet::Target,
    replicas: Replicas,
    processes: u32,
    seconds: u64,
) -> Result<ReplicasRun, String> {
    let stagger = Duration::from_secs(1);
    let sampler = Sampler::start(target).await?;
    let mut children = Vec::new();
    for i in 0..processes {
        if i > 0 {
            tokio::time::sleep(stagger).await;
        }
        eprintln!(
            "  replicas: {replicas}: starting replica {} of {processes}",
            i + 1
        );
        // All stop together, `seconds` after the last one started.
        let runs = seconds + u64::from(processes - 1 - i) * stagger.as_secs();
        children.push(spawn(url, replicas, runs)?);
    }
    let deadline = Instant::now() + Duration::from_secs(seconds + 15);
    for child in &mut children {
        loop {
            let done = child
                .last
                .lock()
                .expect("report")
                .0
                .as_ref()
                .is_some_and(|r| r.done);
            if done || Instant::now() > deadline {
                break;
            }
            if let Ok(Some(_)) = child.child.try_wait() {
                // Exited: its last line may still be on its way.
                tokio::time::sleep(Duration::from_millis(200)).await;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let (peak, max_connections) = sampler.finish();
    let reports: Vec<Report> = children
        .iter()
        .filter_map(|c| c.last.lock().expect("report").0.clone())
        .collect();
    // What each held in its last report under load.
    let held: Vec<u32> = children
        .iter()
        .map(|c| c.last.lock().expect("report").1)
        .collect();
    let jain = {
        let xs: Vec<f64> = held.iter().map(|&h| f64::from(h)).collect();
        let sum: f64 = xs.iter().sum();
        let squares: f64 = xs.iter().map(|x| x * x).sum();
        if squares == 0.0 {
            0.0
        } else {
            sum * sum / (xs.len() as f64 * squares)
        }
    };
    Ok(ReplicasRun {
        replicas_setting: replicas.to_string(),
        processes,
        ok: reports.iter().map(|r| r.ok).sum(),
        failed: reports.iter().map(|r| r.failed).sum(),
        too_many_clients: reports.iter().map(|r| r.refused).sum(),
        peak_server_connections: peak,
        max_connections,
        budget: reports.iter().find_map(|r| r.budget),
        held,
        jain,
        first_error: reports.iter().find_map(|r| r.first_error.clone()),
    })
}

/// The two setups side by side.
pub fn table(runs: &[ReplicasRun]) -> String {
    use std::fmt::Write as _;
    let mut out = String::from("\n");
    let _ = writeln!(
        out,
        "{:<9} {:>9} {:>9} {:>8} {:>17} {:>15} {:>7} {:>6}  connections each at the end",
        "replicas",
        "processes",
        "ok",
        "failed",
        "too-many-clients",
        "peak-conns/max",
        "budget",
        "jain"
    );
    for r in runs {
        let _ = writeln!(
            out,
            "{:<9} {:>9} {:>9} {:>8} {:>17} {:>15} {:>7} {:>6.3}  {:?}",
            r.replicas_setting,
            r.processes,
            r.ok,
            r.failed,
            r.too_many_clients,
            format!("{}/{}", r.peak_server_connections, r.max_connections),
            r.budget.map_or("-".to_owned(), |b| b.to_string()),
            r.jain,
            r.held,
        );
    }
    for r in runs {
        if let Some(e) = &r.first_error {
            let _ = writeln!(out, "\nreplicas: {}, first error: {e}", r.replicas_setting);
        }
    }
    out
}
