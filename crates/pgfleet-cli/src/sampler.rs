//! The peak of client connections on a server while a demo runs, sampled
//! over one connection of its own (used by `demo` and `demo --replicas`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgfleet::{Pool, PoolConfig, Target};

/// Samples the number of client connections on the server every 20ms over
/// one connection of its own (which it leaves out of the count).
pub(crate) struct Sampler {
    peak: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
    max_connections: u32,
}

impl Sampler {
    pub(crate) async fn start(target: &Target) -> Result<Sampler, String> {
        // One connection of its own, through pgfleet (so the password stays
        // inside the Target), opened before the load so it has a slot.
        let pool = Pool::new(
            target.clone(),
            PoolConfig {
                min_size: 1,
                max_size: Some(1),
                application_name: "pgfleet-demo-sampler".into(),
                ..PoolConfig::default()
            },
        )
        .map_err(|e| e.to_string())?;
        let client = pool
            .get()
            .await
            .map_err(|e| format!("cannot connect to sample pg_stat_activity: {e}"))?;
        let max_connections: u32 = client
            .query_one("SELECT current_setting('max_connections')::int", &[])
            .await
            .map_err(|e| e.to_string())?
            .get::<_, i32>(0) as u32;
        let peak = Arc::new(AtomicUsize::new(0));
        let seen = peak.clone();
        let task = tokio::spawn(async move {
            let sql = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()";
            // Aborted when the run ends; bounded anyway.
            for _ in 0..1_000_000 {
                if let Ok(row) = client.query_one(sql, &[]).await {
                    seen.fetch_max(row.get::<_, i64>(0) as usize, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            drop(pool);
        });
        Ok(Sampler {
            peak,
            task,
            max_connections,
        })
    }

    pub(crate) fn finish(self) -> (usize, u32) {
        self.task.abort();
        (self.peak.load(Ordering::SeqCst), self.max_connections)
    }
}
