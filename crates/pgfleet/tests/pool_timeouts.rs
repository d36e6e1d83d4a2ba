//! Waiting for capacity: acquire timeouts, FIFO order, exact gauges, and
//! cancellation safety.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{app, cluster, config, target};
use pgfleet::{ErrorKind, Pool, TimeoutStage};

#[tokio::test]
async fn acquire_times_out_when_pool_is_exhausted_and_says_why() {
    let app = app("timeout");
    let mut cfg = config(&app, 1, 1);
    cfg.acquire_timeout = Duration::from_millis(200);
    let pool = Pool::new(target(cluster()), cfg).unwrap();
    // Open the one connection first: on a loaded machine opening it can
    // itself take longer than 200ms.
    pool.wait_ready(Duration::from_secs(10)).await.unwrap();
    let held = pool.get().await.unwrap();
    let started = Instant::now();
    let err = pool.get().await.unwrap_err();
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(200), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    assert_eq!(
        err.kind(),
        &ErrorKind::Timeout {
            stage: TimeoutStage::Acquire,
            after: Duration::from_millis(200)
        }
    );
    let message = err.to_string();
    assert!(
        message.starts_with(
            "timed out after 200ms waiting for a connection to postgres://postgres:***@127.0.0.1:"
        ),
        "{message}"
    );
    assert!(
        message.contains("(size=1, idle=0, in_use=1, waiting=1"),
        "{message}"
    );
    assert_eq!(pool.stats().counters.acquires_timed_out, 1);
    drop(held);
    // The pool is whole afterwards.
    pool.get().await.unwrap();
    assert_eq!(pool.stats().gauges.waiting, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_served_in_arrival_order() {
    let app = app("fifo");
    let pool = Pool::new(target(cluster()), config(&app, 1, 1)).unwrap();
    let held = pool.get().await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..10u32 {
        let (pool2, order) = (pool.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let conn = pool2.get().await.unwrap();
            order.lock().unwrap().push(i);
            conn.query_one("SELECT 1", &[]).await.unwrap();
        }));
        // Enqueue strictly one after the other.
        assert!(
            common::eventually(Duration::from_secs(5), || pool.stats().gauges.waiting
                == i + 1)
            .await
        );
    }
    drop(held);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), (0..10).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gauges_are_exact_under_a_known_load() {
    let app = app("gauges");
    let pool = Pool::new(target(cluster()), config(&app, 4, 4)).unwrap();
    pool.wait_ready(Duration::from_secs(10)).await.unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let mut tasks = Vec::new();
    for _ in 0..7 {
        let (pool, gate) = (pool.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let conn = pool.get().await.unwrap();
            // Hold until the test lets go.
            gate.acquire().await.unwrap().forget();
            drop(conn);
        }));
    }
    assert!(
        common::eventually(Duration::from_secs(10), || {
            let g = pool.stats().gauges;
            g.in_use == 4 && g.waiting == 3
        })
        .await,
        "{:?}",
        pool.stats().gauges
    );
    let g = pool.stats().gauges;
    assert_eq!(
        (g.size, g.idle, g.in_use, g.waiting, g.connecting),
        (4, 0, 4, 3, 0)
    );
    gate.add_permits(7);
    for t in tasks {
        t.await.unwrap();
    }
    let g = pool.stats().gauges;
    assert_eq!((g.size, g.idle, g.in_use, g.waiting), (4, 4, 0, 0));
    assert_eq!(pool.stats().counters.acquires_waited, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_cancelled_acquires_leave_the_pool_whole() {
    let app = app("cancel");
    let pool = Pool::new(target(cluster()), config(&app, 0, 4)).unwrap();
    let mut rng = fastrand::Rng::with_seed(7);
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let pool = pool.clone();
        let budget = Duration::from_micros(rng.u64(0..3000));
        let hold = Duration::from_micros(rng.u64(0..500));
        let task = tokio::spawn(async move {
            // Cancelled by timeout at a random point of the acquire...
            if let Ok(Ok(conn)) = tokio::time::timeout(budget, pool.get()).await {
                // ...or while holding, with a query in flight.
                let _ = tokio::time::timeout(hold, conn.simple_query("SELECT 1")).await;
            }
        });
        if i % 3 == 0 {
            // ...or aborted from outside.
            let abort = task.abort_handle();
            let after = Duration::from_micros(rng.u64(0..2000));
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                abort.abort();
            });
        }
        tasks.push(task);
    }
    for t in tasks {
        let _ = t.await;
    }
    // Returns dirtied by cancelled queries are cleaned in the background.
    assert!(
        common::eventually(Duration::from_secs(10), || {
            let g = pool.stats().gauges;
            g.waiting == 0 && g.in_use == 0 && g.connecting == 0
        })
        .await,
        "{:?}",
        pool.stats().gauges
    );
    let g = pool.stats().gauges;
    assert!(g.size <= 4, "{g:?}");
    // All max_size connections can still be taken at once.
    let mut held = Vec::new();
    for _ in 0..4 {
        let conn = tokio::time::timeout(Duration::from_secs(10), pool.get())
            .await
            .expect("no hang")
            .unwrap();
        conn.query_one("SELECT 1", &[]).await.unwrap();
        held.push(conn);
    }
    assert_eq!(pool.stats().gauges.in_use, 4);
    assert!(common::backends(&app).await <= 4);
}

/// Deadlines are kept by one task per pool, not a timer per waiter: each
/// waiter still fails at its own deadline, a waiter served in time is not
/// failed, an abandoned wait is skipped, and nothing is left counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staggered_waiters_each_time_out_at_their_own_deadline() {
    let app = app("reaper");
    let mut cfg = config(&app, 1, 1);
    cfg.acquire_timeout = Duration::from_millis(400);
    let pool = Pool::new(target(cluster()), cfg).unwrap();
    pool.wait_ready(Duration::from_secs(10)).await.unwrap();
    let held = pool.get().await.unwrap();
    let mut waiters = Vec::new();
    for i in 0..4u64 {
        let waiter_pool = pool.clone();
        waiters.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(150 * i)).await;
            let asked = Instant::now();
            let outcome = waiter_pool.get().await;
            let ended = Instant::now();
            // The one served keeps the connection while the others run out.
            if let Ok(conn) = &outcome {
                tokio::time::sleep(Duration::from_millis(1000)).await;
                let _ = conn;
            }
            (i, ended - asked, outcome.map(drop))
        }));
        if i == 0 {
            // An abandoned wait in the queue.
            let _ = tokio::time::timeout(Duration::from_millis(20), pool.get()).await;
        }
    }
    // Waiter 0 is served at about 100ms, well before its deadline.
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(held);
    for waiter in waiters {
        let (i, waited, outcome) = waiter.await.unwrap();
        match (i, outcome) {
            (0, Ok(())) => assert!(waited < Duration::from_millis(400), "{waited:?}"),
            (_, Err(e)) if i > 0 => {
                assert!(
                    matches!(
                        e.kind(),
                        ErrorKind::Timeout {
                            stage: TimeoutStage::Acquire,
                            ..
                        }
                    ),
                    "waiter {i}: {e}"
                );
                assert!(
                    waited >= Duration::from_millis(400),
                    "waiter {i} failed early: {waited:?}"
                );
                assert!(
                    waited < Duration::from_secs(3),
                    "waiter {i} failed late: {waited:?}"
                );
            }
            (i, outcome) => panic!("waiter {i}: unexpected {outcome:?}"),
        }
    }
    assert_eq!(pool.stats().counters.acquires_timed_out, 3);
    assert_eq!(pool.stats().gauges.waiting, 0);
    // The pool is whole afterwards.
    pool.get().await.unwrap();
}

/// The deadline keeper runs on the pool's runtime. If that runtime is gone,
/// a caller that has to wait gets an error at once instead of waiting for
/// ever (the pool's connections and background work went with it).
#[test]
fn a_waiter_fails_at_once_when_the_pools_runtime_is_gone() {
    let app = app("goneruntime");
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (pool, held) = first.block_on(async {
        let pool = Pool::new(target(cluster()), config(&app, 1, 1)).unwrap();
        let held = pool.get().await.unwrap();
        (pool, held)
    });
    drop(first);
    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let outcome =
        second.block_on(async { tokio::time::timeout(Duration::from_secs(5), pool.get()).await });
    let error = outcome
        .expect("the waiter hung instead of failing")
        .expect_err("no connection can be free");
    assert_eq!(error.kind(), &ErrorKind::Closed, "{error}");
    assert!(error.to_string().contains("runtime"), "{error}");
    assert_eq!(pool.stats().gauges.waiting, 0);
    drop(held);
}

#[tokio::test]
async fn a_caller_may_wait_less_than_the_pools_timeout() {
    let app = app("get_timeout");
    let pool = Pool::new(target(cluster()), config(&app, 1, 1)).unwrap();
    pool.wait_ready(Duration::from_secs(10)).await.unwrap();
    let held = pool.get().await.unwrap();
    let started = Instant::now();
    let err = pool
        .get_timeout(Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the pool's 10s timeout applied"
    );
    assert_eq!(
        err.kind(),
        &ErrorKind::Timeout {
            stage: TimeoutStage::Acquire,
            after: Duration::from_millis(200)
        }
    );
    assert!(
        err.to_string()
            .starts_with("timed out after 200ms waiting for a connection"),
        "{err}"
    );
    assert_eq!(pool.stats().counters.acquires_timed_out, 1);
    // Served normally when a connection comes back in time.
    let waiter = tokio::spawn({
        let pool = pool.clone();
        async move { pool.get_timeout(Duration::from_secs(5)).await.map(drop) }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(held);
    waiter.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_full_queue_turns_callers_away_at_once_naming_the_limit() {
    let app = app("max_waiting");
    let mut cfg = config(&app, 1, 1);
    cfg.max_waiting = Some(2);
    let pool = Pool::new(target(cluster()), cfg).unwrap();
    pool.wait_ready(Duration::from_secs(10)).await.unwrap();
    let held = pool.get().await.unwrap();
    let mut waiters = Vec::new();
    for _ in 0..2 {
        let pool = pool.clone();
        waiters.push(tokio::spawn(async move { pool.get().await.map(drop) }));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pool.stats().gauges.waiting < 2 {
        assert!(Instant::now() < deadline, "the waiters never queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    let err = pool.get().await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "turned away late"
    );
    assert!(err.is_overloaded(), "{err:?}");
    assert!(err.to_string().contains("max_waiting = 2"), "{err}");
    assert_eq!(pool.stats().counters.acquires_rejected, 1);
    // The queue drains: both waiters are served, and a caller may wait again.
    drop(held);
    for waiter in waiters {
        waiter.await.unwrap().unwrap();
    }
    drop(pool.get().await.unwrap());
    assert_eq!(pool.stats().counters.acquires_rejected, 1);
}
