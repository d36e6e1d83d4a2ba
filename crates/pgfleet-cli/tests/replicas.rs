//! `replicas: auto` across OS processes: replicas of one service (each a
//! `pgfleet replica` process, 40 tasks wanting up to 20 connections) on a
//! server with `max_connections = 30`, started one by one, one killed with
//! SIGKILL and started again. Sampled every 50 ms, the server never holds
//! more client backends than the budget, no process logs a refusal, shares
//! converge within 5 s after each change, and no request fails.
//!
//! The replicas log in as a role that is not a superuser, with a headroom
//! of 1: the server's 27 slots for such roles are the replicas' 26 and the
//! sampler's one, so a replica that went over its share even for a moment
//! would be refused (53300), and the test would see it.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgfleet_testkit::TempCluster;
use serde_json::Value;

/// `max_connections` 30: 27 for roles that are not superusers, 26 after a
/// headroom of 1 (the sampler's connection).
const BUDGET: usize = 26;
/// The longest a change may take to settle.
const CONVERGENCE: Duration = Duration::from_secs(5);

/// One replica process and what it printed.
struct Replica {
    child: Child,
    reports: Arc<Mutex<Vec<Value>>>,
    log: Arc<Mutex<String>>,
}

impl Replica {
    fn start(url: &str) -> Replica {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pgfleet"))
            .args([
                "replica",
                "--replicas",
                "auto",
                "--service",
                "replica-test",
                "--max-size",
                "20",
                "--tasks",
                "40",
                "--hold-ms",
                "20",
                "--seconds",
                "120",
                "--report-ms",
                "50",
                "--headroom",
                "1",
                "--timeout",
                "5",
            ])
            .env("DATABASE_URL", url)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start pgfleet replica");
        let reports = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().unwrap();
        let lines = reports.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(value) = serde_json::from_str::<Value>(&line) {
                    lines.lock().unwrap().push(value);
                }
            }
        });
        let mut stderr = child.stderr.take().unwrap();
        let text = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                text.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Replica {
            child,
            reports,
            log,
        }
    }

    fn last(&self) -> Option<Value> {
        self.reports.lock().unwrap().last().cloned()
    }

    fn field(&self, name: &str) -> u64 {
        self.last()
            .and_then(|r| r[name].as_u64())
            .unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

fn jain(xs: &[u64]) -> f64 {
    let sum: f64 = xs.iter().map(|&x| x as f64).sum();
    let squares: f64 = xs.iter().map(|&x| (x as f64).powi(2)).sum();
    if squares == 0.0 {
        return 0.0;
    }
    sum * sum / (xs.len() as f64 * squares)
}

/// Waits until the live replicas each see `live.len()` replicas, have
/// shares with Jain's index at least 0.95 that add up to at least
/// `at_least`, and hold what their share allows; returns how long it took.
fn converge(live: &[&Replica], at_least: u64, what: &str) -> Duration {
    let started = Instant::now();
    loop {
        let shares: Vec<u64> = live.iter().map(|r| r.field("share")).collect();
        let held: Vec<u64> = live.iter().map(|r| r.field("held")).collect();
        let seen = live.iter().all(|r| r.field("seen") == live.len() as u64);
        // The share counts the coordinator, and one spare.
        let using = shares
            .iter()
            .zip(&held)
            .all(|(&share, &held)| held < share && share <= held + 2);
        if seen && using && jain(&shares) >= 0.95 && shares.iter().sum::<u64>() >= at_least {
            let took = started.elapsed();
            eprintln!("{what}: converged in {took:.2?}: shares {shares:?}, connections {held:?}");
            // Some steady state for the sampler too.
            std::thread::sleep(Duration::from_millis(500));
            return took;
        }
        assert!(
            started.elapsed() < CONVERGENCE,
            "{what}: not converged within {CONVERGENCE:?}: shares {shares:?}, connections {held:?}, last reports {:#?}, logs {:#?}",
            live.iter().map(|r| r.last()).collect::<Vec<_>>(),
            live.iter().map(|r| r.log.lock().unwrap().clone()).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn replica_processes_split_the_server_through_joins_a_sigkill_and_a_restart() {
    let cluster = Arc::new(
        TempCluster::builder()
            .setting("max_connections", "30")
            .start()
            .unwrap(),
    );
    // The runtime goes at once: the admin connection's task, and its
    // slot, with it.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(cluster.create_role("replica_user", "replica-pw"))
        .unwrap();
    let url = cluster.url_for("replica_user", "replica-pw", "postgres");
    // Every 50 ms, over one connection of its own (left out of the count), the server's client backends.
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicUsize::new(0));
    let samples = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (cluster, done, peak, samples) =
            (cluster.clone(), done.clone(), peak.clone(), samples.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let (client, connection) =
                    tokio_postgres::connect(&cluster.url("postgres"), tokio_postgres::NoTls)
                        .await
                        .unwrap();
                tokio::spawn(connection);
                let sql = "SELECT count(*) FROM pg_stat_activity \
                           WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()";
                let deadline = Instant::now() + Duration::from_secs(300);
                while !done.load(Ordering::SeqCst) && Instant::now() < deadline {
                    if let Ok(row) = client.query_one(sql, &[]).await {
                        peak.fetch_max(row.get::<_, i64>(0) as usize, Ordering::SeqCst);
                        samples.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
        })
    };

    let mut times = Vec::new();
    let a = Replica::start(&url);
    times.push(converge(&[&a], 21, "one replica"));
    let mut b = Replica::start(&url);
    times.push(converge(&[&a, &b], 22, "a second replica joins"));
    let c = Replica::start(&url);
    times.push(converge(&[&a, &b, &c], 23, "a third replica joins"));
    // SIGKILL: its coordinator's backend goes with the process, and its
    // advisory locks with the backend.
    let killed_at = b.field("elapsed_ms");
    b.kill();
    times.push(converge(&[&a, &c], 22, "the second is killed"));
    let b2 = Replica::start(&url);
    times.push(converge(&[&a, &c, &b2], 23, "the second starts again"));
    std::thread::sleep(Duration::from_secs(1));

    done.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::SeqCst);
    eprintln!(
        "peak client backends {peak} of budget {BUDGET} ({} samples); convergence {times:.2?}; killed at {killed_at} ms",
        samples.load(Ordering::SeqCst)
    );
    for (name, r) in [("a", &a), ("b (killed)", &b), ("c", &c), ("b again", &b2)] {
        let log = r.log.lock().unwrap().clone();
        assert!(
            !log.contains("53300")
                && !log.contains("too many clients")
                && !log.contains("remaining connection slots"),
            "replica {name} logged a refusal:\n{log}"
        );
        assert_eq!(r.field("refused"), 0, "replica {name}: {:?}", r.last());
        if name != "b (killed)" {
            assert_eq!(r.field("failed"), 0, "replica {name}: {:?}", r.last());
            assert!(r.field("ok") > 0, "replica {name}: {:?}", r.last());
        }
    }
    assert!(samples.load(Ordering::SeqCst) > 20);
    assert!(
        peak <= BUDGET,
        "peak {peak} client backends, budget {BUDGET}"
    );
}
