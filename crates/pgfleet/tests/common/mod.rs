//! Shared helpers of the integration tests: the shared cluster, unique
//! application names, and polling of the server's backend count.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use pgfleet::{PoolConfig, Target};
use pgfleet_testkit::{BackendFilter, TempCluster};

/// The cluster shared by the tests of one test binary.
pub fn cluster() -> &'static TempCluster {
    TempCluster::shared()
}

/// A fresh application name, so each test counts only its own backends.
pub fn app(prefix: &str) -> String {
    pgfleet_testkit::unique_name(prefix)
}

/// The `postgres` database of a cluster as a target.
pub fn target(cluster: &TempCluster) -> Target {
    Target::parse(&cluster.url("postgres")).expect("test kit URLs parse")
}

/// A small pool configuration tagged with `app`.
pub fn config(app: &str, min_size: u32, max_size: u32) -> PoolConfig {
    PoolConfig {
        application_name: app.to_owned(),
        min_size,
        max_size: Some(max_size),
        acquire_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
        ..PoolConfig::default()
    }
}

/// Backends with `application_name = app` on `cluster`.
pub async fn backends_on(cluster: &TempCluster, app: &str) -> usize {
    cluster
        .count_backends(&BackendFilter::all().application_name(app))
        .await
        .expect("count backends")
}

/// Backends with `application_name = app` on the shared cluster.
pub async fn backends(app: &str) -> usize {
    backends_on(cluster(), app).await
}

/// Polls until the backend count for `app` is `want` (at most 10s); returns
/// the last count seen.
pub async fn settle_backends_on(cluster: &TempCluster, app: &str, want: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = backends_on(cluster, app).await;
        if n == want || Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`settle_backends_on`] for the shared cluster.
pub async fn settle_backends(app: &str, want: usize) -> usize {
    settle_backends_on(cluster(), app, want).await
}

/// Polls `cond` every 10ms for at most `limit`; returns whether it held.
pub async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Samples the number of backends matching a filter every 10ms until
/// stopped, keeping the peak.
pub struct PeakSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<usize>,
}

impl PeakSampler {
    /// Starts sampling `filter` on `cluster`.
    pub fn start(cluster: std::sync::Arc<TempCluster>, filter: BackendFilter) -> PeakSampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut peak = 0;
            // Bounded: at most 10 minutes of samples.
            for _ in 0..60_000 {
                if flag.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                if let Ok(n) = cluster.count_backends(&filter).await {
                    peak = peak.max(n);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            peak
        });
        PeakSampler { stop, task }
    }

    /// Stops and returns the peak.
    pub async fn finish(self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.task.await.expect("sampler")
    }
}

/// Whether the session is inside a transaction block: SAVEPOINT is allowed
/// only there (25P01 outside).
pub async fn in_transaction(conn: &tokio_postgres::Client) -> bool {
    match conn.batch_execute("SAVEPOINT pgfleet_probe").await {
        Ok(()) => true,
        Err(e) => {
            assert_eq!(e.code().map(|c| c.code()), Some("25P01"), "{e}");
            false
        }
    }
}

/// A writer that appends log output to a shared buffer (a tracing
/// subscriber's writer, for tests that read the logs).
#[derive(Clone, Default)]
pub struct Capture(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Capture {
    /// What was written, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
