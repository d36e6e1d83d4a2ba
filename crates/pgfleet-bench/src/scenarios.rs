//! Scenarios D (pool creation), E (lookups in a registry) and F (memory per
//! idle connection), which do not go through the throughput loop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::peers::{Kind, Op, Subject};
use crate::{median, BoxError, CreationRow, LookupRow, MemoryRow};

/// Scenario D: time from building a pool to its first connection, and to
/// five connections open (opened in parallel where the pool does that).
pub async fn creation(url: &str, repeat: usize) -> Result<Vec<CreationRow>, BoxError> {
    let mut out = Vec::new();
    for kind in Kind::POOLS {
        let (mut first, mut five) = (Vec::new(), Vec::new());
        for _ in 0..repeat {
            let t = Instant::now();
            let s = Subject::build(kind, url, 16, 0).await?;
            s.run(Op::AcquireRelease, 0, 1).await?;
            first.push(t.elapsed().as_secs_f64() * 1000.0);
            s.close().await;

            let t = Instant::now();
            let s = Subject::build(kind, url, 16, 5).await?;
            match &s {
                Subject::Pgfleet(p) => p.wait_ready(Duration::from_secs(30)).await?,
                // bb8 and sqlx open min_idle / min_connections in build;
                // deadpool has no floor: take five at once.
                Subject::Deadpool(_) => {
                    let mut tasks = Vec::new();
                    for _ in 0..5 {
                        let s = s.clone();
                        tasks.push(tokio::spawn(async move { s.fill(1).await.is_ok() }));
                    }
                    for t in tasks {
                        t.await?;
                    }
                }
                _ => {}
            }
            five.push(t.elapsed().as_secs_f64() * 1000.0);
            s.close().await;
        }
        out.push(CreationRow {
            subject: kind.name(),
            first_connection_ms: median(first),
            five_warm_ms: median(five),
        });
    }
    Ok(out)
}

/// The registries of scenario E.
/// `Fleet::pool` checks the caller's settings against the pool's on every
/// lookup; `Fleet::existing` does not.
const REGISTRIES: [&str; 4] = [
    "pgfleet Fleet::pool",
    "pgfleet Fleet::existing",
    "Mutex<HashMap>",
    "RwLock<HashMap>",
];

/// Scenario E: looking up an existing pool in pgfleet's fleet against a
/// `Mutex<HashMap>` and an `RwLock<HashMap>` registry (the seed's design),
/// on 1 and 2 threads, `repeat` times interleaved (median and min).
pub fn lookups(
    duration: Duration,
    repeat: usize,
    runtime: tokio::runtime::Handle,
) -> Vec<LookupRow> {
    use std::hint::black_box;
    let _context = runtime.enter();
    let fleet = pgfleet::Fleet::new();
    let target = pgfleet::Target::parse("postgres://bench@127.0.0.1:1/lookup").expect("target");
    let config = pgfleet::PoolConfig {
        min_size: 0,
        ..pgfleet::PoolConfig::default()
    };
    // A pool that never connects (min_size 0, nobody calls get): lookups only.
    let _keep = fleet.pool(&target, &config).expect("pool");
    let key = target.key().to_owned();
    let mutex = Mutex::new(HashMap::from([(key.clone(), Arc::new(1u64))]));
    let rwlock = RwLock::new(HashMap::from([(key.clone(), Arc::new(1u64))]));
    // Lookups until `stop`, in batches of 256; how many.
    let spin = |stop: &AtomicBool, lookup: &dyn Fn()| {
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            for _ in 0..256 {
                lookup();
            }
            n += 256;
        }
        n
    };
    let mut samples: HashMap<(&'static str, usize), Vec<f64>> = HashMap::new();
    for _ in 0..repeat {
        for threads in [1usize, 2] {
            for registry in REGISTRIES {
                let stop = AtomicBool::new(false);
                let total: u64 = std::thread::scope(|scope| {
                    let workers: Vec<_> = (0..threads)
                        .map(|_| {
                            scope.spawn(|| {
                                let _context = runtime.enter();
                                match registry {
                                    "Mutex<HashMap>" => spin(&stop, &|| {
                                        black_box(mutex.lock().expect("lock").get(&key).cloned());
                                    }),
                                    "RwLock<HashMap>" => spin(&stop, &|| {
                                        black_box(rwlock.read().expect("lock").get(&key).cloned());
                                    }),
                                    "pgfleet Fleet::existing" => spin(&stop, &|| {
                                        black_box(fleet.existing(&target).expect("pool"));
                                    }),
                                    _ => spin(&stop, &|| {
                                        black_box(fleet.pool(&target, &config).expect("pool"));
                                    }),
                                }
                            })
                        })
                        .collect();
                    std::thread::sleep(duration);
                    stop.store(true, Ordering::Relaxed);
                    workers.into_iter().map(|w| w.join().unwrap_or(0)).sum()
                });
                samples
                    .entry((registry, threads))
                    .or_default()
                    .push(total as f64 / duration.as_secs_f64());
            }
        }
    }
    let mut out = Vec::new();
    for threads in [1usize, 2] {
        for registry in REGISTRIES {
            let per_s = samples.remove(&(registry, threads)).unwrap_or_default();
            let min = per_s.iter().copied().fold(f64::INFINITY, f64::min);
            let median = median(per_s);
            out.push(LookupRow {
                registry,
                threads,
                lookups_per_s: median,
                lookups_per_s_min: min,
                ns_per_lookup: 1e9 * threads as f64 / median.max(1.0),
            });
        }
    }
    out
}

/// Resident set size of this process, KiB.
fn rss_kib() -> f64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<f64>().ok())
        })
        .map_or(0.0, |pages| pages * 4.0)
}

/// Idle connections opened per memory probe.
const PROBE_CONNECTIONS: u32 = 64;
/// Connections opened before the probe's baseline, so that one-time costs
/// (lazy statics, allocator arenas of the runtime's threads) stay out of it.
const PROBE_WARM: u32 = 8;
/// Memory probes per subject (the median is reported).
const PROBES: usize = 3;

/// Scenario F: resident memory per idle pooled connection, as a pool grows
/// from `PROBE_WARM` to `PROBE_CONNECTIONS` idle connections.
/// Every subject is measured in a fresh process of this binary
/// (`--memory-probe`), several times in rotation: in one process, a pool
/// measured after another would reuse the heap the first one freed and look
/// cheaper than it is.
pub async fn memory(url: &str) -> Result<Vec<MemoryRow>, BoxError> {
    let exe = std::env::current_exe()?;
    let mut samples: HashMap<&'static str, Vec<f64>> = HashMap::new();
    for _ in 0..PROBES {
        for kind in Kind::POOLS {
            let name = clap::ValueEnum::to_possible_value(&kind)
                .ok_or("every kind has a name")?
                .get_name()
                .to_owned();
            let mut probe = std::process::Command::new(&exe);
            probe.args(["--memory-probe", &name, "--probe-url", url]);
            let output = tokio::task::spawn_blocking(move || probe.output()).await??;
            let text = String::from_utf8_lossy(&output.stdout);
            if !output.status.success() {
                return Err(format!(
                    "memory probe of {} failed: {}",
                    kind.name(),
                    String::from_utf8_lossy(&output.stderr).trim()
                )
                .into());
            }
            let kib: f64 = text
                .trim()
                .parse()
                .map_err(|_| format!("memory probe of {} printed {text:?}", kind.name()))?;
            samples.entry(kind.name()).or_default().push(kib);
        }
    }
    Ok(Kind::POOLS
        .iter()
        .map(|kind| MemoryRow {
            subject: kind.name(),
            kib_per_connection: median(samples.remove(kind.name()).unwrap_or_default()),
        })
        .collect())
}

/// One memory probe (in its own process): RSS added per idle connection
/// of `kind`, between `PROBE_WARM` and `PROBE_CONNECTIONS` of them open.
pub async fn memory_probe(kind: Kind, url: &str) -> Result<f64, BoxError> {
    let s = Subject::build(kind, url, PROBE_CONNECTIONS, 0).await?;
    s.fill(PROBE_WARM as usize).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = rss_kib();
    s.fill(PROBE_CONNECTIONS as usize).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = rss_kib();
    s.close().await;
    Ok((after - before) / f64::from(PROBE_CONNECTIONS - PROBE_WARM))
}
