//! `pgfleet serve` replicas with `replicas: auto` on a server with
//! `max_connections = 30`: started one by one, one killed with SIGKILL and
//! started again, under HTTP load. Sampled every 50 ms, the server never
//! holds more client backends than the budget; no replica logs a refusal
//! or answers a 5xx; the shares (read from each replica's `/metrics`)
//! converge within 5 s after each change.

mod common;

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{parse_metrics, Server};
use pgfleet_testkit::{unique_name, BackendFilter, TempCluster};
use serde_json::json;

/// `max_connections` 30: 27 for clients, 24 after the headroom of 3.
const BUDGET: usize = 24;
const CONVERGENCE: Duration = Duration::from_secs(5);

/// One replica: the server process, its log file, its load.
struct Replica {
    server: Server,
    log: tempfile::NamedTempFile,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    first_failure: Arc<std::sync::Mutex<Option<String>>>,
}

impl Replica {
    async fn start(url: &str, client: &reqwest::Client) -> Replica {
        let app = unique_name("replica");
        let yaml = format!(
            "postgres:\n  min_size: 1\n  max_size: 20\n  timeout: 30\n  connect_timeout: 5\n  application_name: {app}\n\
             fleet:\n  replicas: auto\n  service: memory-replicas\n"
        );
        let log = tempfile::NamedTempFile::new().unwrap();
        let server = Server::start_with(url, &app, &yaml, Stdio::from(log.reopen().unwrap()));
        server.wait_ready(client).await;
        let replica = Replica {
            server,
            log,
            stop: Arc::default(),
            ok: Arc::default(),
            failed: Arc::default(),
            first_failure: Arc::default(),
        };
        replica.load(client, 48);
        replica
    }

    /// `tasks` HTTP clients: three conversations stored, then a search, in
    /// a loop.
    fn load(&self, client: &reqwest::Client, tasks: usize) {
        for t in 0..tasks {
            let (client, base, stop, ok, failed, first) = (
                client.clone(),
                self.server.base.clone(),
                self.stop.clone(),
                self.ok.clone(),
                self.failed.clone(),
                self.first_failure.clone(),
            );
            tokio::spawn(async move {
                let user = format!("user{t}");
                let deadline = Instant::now() + Duration::from_secs(300);
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    let (path, body) = if i % 4 != 3 {
                        // One transaction on a connection of its own:
                        // messages, an episode, facts.
                        (
                            "messages",
                            json!({"session_id": "s", "messages": [
                                {"role": "user", "content": format!("I live in town {i}")},
                                {"role": "assistant", "content": "noted"},
                            ]}),
                        )
                    } else {
                        ("query", json!({"query": format!("item {i}"), "top_k": 5}))
                    };
                    i += 1;
                    let result = client
                        .post(format!("{base}/users/{user}/{path}"))
                        .json(&body)
                        .send()
                        .await;
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    match result {
                        Ok(r) if r.status().is_success() => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => {
                            let status = r.status();
                            let text = r.text().await.unwrap_or_default();
                            first
                                .lock()
                                .unwrap()
                                .get_or_insert(format!("{status}: {text}"));
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            first.lock().unwrap().get_or_insert(e.to_string());
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    }

    async fn metrics(&self, client: &reqwest::Client) -> std::collections::HashMap<String, f64> {
        match client.get(self.server.url("/metrics")).send().await {
            Ok(r) => parse_metrics(&r.text().await.unwrap_or_default()),
            Err(_) => Default::default(),
        }
    }
}

fn jain(xs: &[f64]) -> f64 {
    let sum: f64 = xs.iter().sum();
    let squares: f64 = xs.iter().map(|x| x * x).sum();
    if squares == 0.0 {
        return 0.0;
    }
    sum * sum / (xs.len() as f64 * squares)
}

/// Waits until every replica in `live` sees `live.len()` replicas, the
/// shares have Jain's index at least 0.95 and fit the budget, and each
/// holds no more than its share allows; returns the time it took.
async fn converge(live: &[&Replica], client: &reqwest::Client, what: &str) -> Duration {
    let started = Instant::now();
    loop {
        let mut seen = Vec::new();
        let mut shares = Vec::new();
        let mut held = Vec::new();
        for r in live {
            let m = r.metrics(client).await;
            let get = |k: &str| m.get(k).copied().unwrap_or(-1.0);
            seen.push(get("pgfleet_server_replicas_seen"));
            shares.push(get("pgfleet_server_replica_share"));
            held.push(get("pgfleet_server_in_use"));
        }
        let n = live.len() as f64;
        let fits = shares.iter().sum::<f64>() <= (BUDGET - 1) as f64;
        let within = shares.iter().zip(&held).all(|(s, h)| *h >= 0.0 && h < s);
        // Once several replicas are busy, they want more than the budget:
        // the split hands out (nearly) all of it.
        let spent = n < 2.0 || shares.iter().sum::<f64>() >= (BUDGET - 4) as f64;
        if seen.iter().all(|s| *s == n) && fits && within && spent && jain(&shares) >= 0.95 {
            let took = started.elapsed();
            eprintln!("{what}: converged in {took:.2?}: shares {shares:?}, connections {held:?}");
            tokio::time::sleep(Duration::from_millis(500)).await;
            return took;
        }
        assert!(
            started.elapsed() < CONVERGENCE,
            "{what}: not converged within {CONVERGENCE:?}: seen {seen:?}, shares {shares:?}, connections {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_replicas_split_the_server_through_joins_a_sigkill_and_a_restart() {
    let cluster = Arc::new(
        TempCluster::builder()
            .setting("max_connections", "30")
            .start()
            .unwrap(),
    );
    let url = cluster.url("postgres");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (cluster, done, peak) = (cluster.clone(), done.clone(), peak.clone());
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(300);
            while !done.load(Ordering::SeqCst) && Instant::now() < deadline {
                if let Ok(n) = cluster.count_backends(&BackendFilter::all()).await {
                    peak.fetch_max(n, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let mut times = Vec::new();
    let a = Replica::start(&url, &client).await;
    // Each stored fact holds its connection for 20 ms on the server, so
    // that the replicas' load wants more connections than they may have.
    cluster
        .execute(
            "CREATE FUNCTION slow_fact() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM pg_sleep(0.02); RETURN NEW; END $$; \
             CREATE TRIGGER slow_fact BEFORE INSERT ON m2_facts \
             FOR EACH ROW EXECUTE FUNCTION slow_fact()",
        )
        .await
        .unwrap();
    times.push(converge(&[&a], &client, "one replica").await);
    let mut b = Replica::start(&url, &client).await;
    times.push(converge(&[&a, &b], &client, "a second replica joins").await);
    let c = Replica::start(&url, &client).await;
    times.push(converge(&[&a, &b, &c], &client, "a third replica joins").await);
    // SIGKILL under load; its clients' requests in flight die with it.
    b.stop.store(true, Ordering::SeqCst);
    let _ = b.server.child.kill();
    let _ = b.server.child.wait();
    times.push(converge(&[&a, &c], &client, "the second is killed").await);
    let b2 = Replica::start(&url, &client).await;
    times.push(converge(&[&a, &c, &b2], &client, "the second starts again").await);

    for r in [&a, &c, &b2] {
        r.stop.store(true, Ordering::SeqCst);
    }
    done.store(true, Ordering::SeqCst);
    sampler.await.unwrap();
    let peak = peak.load(Ordering::SeqCst);
    eprintln!("peak client backends {peak} of budget {BUDGET}; convergence {times:.2?}");
    for (name, r) in [("a", &a), ("b (killed)", &b), ("c", &c), ("b again", &b2)] {
        let log = std::fs::read_to_string(r.log.path()).unwrap_or_default();
        assert!(
            !log.contains("53300") && !log.contains("too many clients"),
            "replica {name} logged a refusal:\n{log}"
        );
        assert_eq!(
            r.failed.load(Ordering::SeqCst),
            0,
            "replica {name}: {:?}",
            r.first_failure.lock().unwrap()
        );
        assert!(
            r.ok.load(Ordering::SeqCst) > 0,
            "replica {name} served nothing"
        );
        eprintln!("replica {name}: {} requests", r.ok.load(Ordering::SeqCst));
    }
    assert!(
        peak <= BUDGET,
        "peak {peak} client backends, budget {BUDGET}"
    );
}
