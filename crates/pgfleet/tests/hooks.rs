//! The pool's hooks against a real server: `after_connect` on every new
//! connection (and a failing one reported like a connect error),
//! `before_acquire` and `after_release` turning connections down.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{app, cluster, config, target};

use pgfleet::{Hooks, Pool};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_connect_prepares_every_new_connection_and_survives_a_reset() {
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let hooks = Hooks::default().after_connect(move |client| {
        counted.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            client
                .batch_execute("SET application_name = 'hooked'; SET search_path = pg_catalog")
                .await?;
            Ok(())
        })
    });
    let mut cfg = config(&app("hook_connect"), 2, 2);
    cfg.hooks = hooks;
    let pool = Pool::new(target(cluster()), cfg).unwrap();
    let a = pool.get().await.unwrap();
    let b = pool.get().await.unwrap();
    for conn in [&a, &b] {
        let path: String = conn
            .query_one("SELECT current_setting('search_path')", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(path, "pg_catalog");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2, "once per connection");
    // A borrower's SET makes the pool RESET ALL on return, which would
    // undo the hook's settings: the hook runs again.
    a.batch_execute("SET work_mem = '2MB'").await.unwrap();
    drop((a, b));
    let conns = [pool.get().await.unwrap(), pool.get().await.unwrap()];
    for conn in &conns {
        let row = conn
            .query_one(
                "SELECT current_setting('search_path'), current_setting('work_mem')",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "pg_catalog");
        assert_eq!(row.get::<_, String>(1), "4MB");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    assert_eq!(pool.stats().counters.connections_created, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_after_connect_is_reported_like_a_connect_error() {
    let hooks = Hooks::default().after_connect(|client| {
        Box::pin(async move {
            client.batch_execute("SELECT * FROM no_such_table").await?;
            Ok(())
        })
    });
    let mut cfg = config(&app("hook_fail"), 0, 2);
    cfg.acquire_timeout = Duration::from_millis(800);
    cfg.hooks = hooks;
    let pool = Pool::new(target(cluster()), cfg).unwrap();
    let err = pool.get().await.unwrap_err();
    let message = err.to_string();
    assert!(err.is_timeout(), "{message}");
    assert!(message.contains("after_connect hook failed"), "{message}");
    assert!(message.contains("no_such_table"), "{message}");
    let stats = pool.stats();
    assert!(stats.counters.connect_errors >= 1, "{stats:?}");
    assert_eq!(
        stats.gauges.idle + stats.gauges.in_use,
        0,
        "never handed out"
    );
    // Nobody waits any more and the floor is 0: the retries stop, and no
    // connection is left.
    assert!(common::eventually(Duration::from_secs(5), || pool.stats().gauges.size == 0).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_acquire_and_after_release_turn_connections_down() {
    let refuse_next = Arc::new(AtomicBool::new(false));
    let refuse = refuse_next.clone();
    let keep_on_return = Arc::new(AtomicBool::new(true));
    let keep = keep_on_return.clone();
    let hooks = Hooks::default()
        .before_acquire(move |_| {
            let ok = !refuse.swap(false, Ordering::SeqCst);
            Box::pin(async move { ok })
        })
        .after_release(move |client| {
            let keep = keep.load(Ordering::SeqCst);
            Box::pin(async move { keep && client.simple_query("").await.is_ok() })
        });
    let mut cfg = config(&app("hook_check"), 0, 1);
    cfg.hooks = hooks;
    let pool = Pool::new(target(cluster()), cfg).unwrap();
    // The pid of a borrowed connection; after the return, waits (bounded)
    // until the after_release hook has run on it (kept idle, or closed).
    let pid = |conn: pgfleet::PooledConnection| {
        let pool = pool.clone();
        async move {
            let pid = conn
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .unwrap()
                .get::<_, i32>(0);
            drop(conn);
            assert!(
                common::eventually(Duration::from_secs(5), || {
                    let gauges = pool.stats().gauges;
                    gauges.size == gauges.idle && gauges.connecting == 0
                })
                .await
            );
            pid
        }
    };
    let first = pid(pool.get().await.unwrap()).await;
    // Kept on return, handed out again.
    let again = pid(pool.get().await.unwrap()).await;
    assert_eq!(first, again);
    // before_acquire says no once: that connection goes, a new one comes.
    refuse_next.store(true, Ordering::SeqCst);
    let after_refusal = pid(pool.get().await.unwrap()).await;
    assert_ne!(after_refusal, again);
    // after_release says no: the next borrower gets a new connection.
    keep_on_return.store(false, Ordering::SeqCst);
    let released = pid(pool.get().await.unwrap()).await;
    keep_on_return.store(true, Ordering::SeqCst);
    let next = pid(pool.get().await.unwrap()).await;
    assert_ne!(next, released);
    let counters = pool.stats().counters;
    assert_eq!(counters.connections_closed_hook, 2, "{counters:?}");
}
