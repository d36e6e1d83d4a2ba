//! Connections returned dirty are cleaned before reuse: open and failed
//! transactions are rolled back, requests still in flight are waited for or
//! cancelled, and the next borrower never sees any of it.

mod common;

use std::time::Duration;

use common::{app, cluster, config, in_transaction, target};
use pgfleet::Pool;

#[tokio::test]
async fn raw_begin_left_open_is_rolled_back_before_reuse() {
    let app = app("dirty_begin");
    let pool = Pool::new(target(cluster()), config(&app, 0, 1)).unwrap();
    let table = format!("dirty_{}", app.replace('-', "_"));
    {
        let conn = pool.get().await.unwrap();
        conn.batch_execute(&format!("CREATE TABLE {table} (v int)"))
            .await
            .unwrap();
        conn.batch_execute(&format!("BEGIN; INSERT INTO {table} VALUES (1)"))
            .await
            .unwrap();
        // Dropped inside the transaction.
    }
    let conn = pool.get().await.unwrap();
    assert!(!in_transaction(&conn).await);
    let n: i64 = conn
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the uncommitted row must not be visible");
    let stats = pool.stats();
    assert_eq!(stats.counters.dirty_returns, 1);
    assert_eq!(
        stats.counters.connections_created, 1,
        "rolled back, not reconnected"
    );
}

#[tokio::test]
async fn failed_statement_inside_a_transaction_is_rolled_back() {
    let app = app("dirty_failed");
    let pool = Pool::new(target(cluster()), config(&app, 0, 1)).unwrap();
    {
        let conn = pool.get().await.unwrap();
        conn.batch_execute("BEGIN").await.unwrap();
        let err = conn.batch_execute("SELECT 1/0").await.unwrap_err();
        assert_eq!(err.code().unwrap().code(), "22012");
        // Returned right after the error: the ReadyForQuery behind it may
        // not have been read yet.
    }
    let conn = pool.get().await.unwrap();
    let v: i32 = conn.query_one("SELECT 41 + 1", &[]).await.unwrap().get(0);
    assert_eq!(v, 42);
    assert!(!in_transaction(&conn).await);
    assert_eq!(pool.stats().counters.dirty_returns, 1);
}

#[tokio::test]
async fn transaction_api_dropped_without_commit_leaves_nothing_behind() {
    let app = app("dirty_txapi");
    let pool = Pool::new(target(cluster()), config(&app, 0, 1)).unwrap();
    {
        let mut conn = pool.get().await.unwrap();
        let tx = conn.transaction().await.unwrap();
        tx.batch_execute("SET LOCAL work_mem = '77MB'")
            .await
            .unwrap();
        // tokio-postgres queues a ROLLBACK when a Transaction is dropped.
        drop(tx);
    }
    let conn = pool.get().await.unwrap();
    let wm: String = conn.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
    assert_ne!(wm, "77MB");
    assert!(!in_transaction(&conn).await);
}

#[tokio::test]
async fn guard_dropped_mid_query_does_not_poison_the_next_borrower() {
    let app = app("dirty_midquery");
    let pool = Pool::new(target(cluster()), config(&app, 0, 1)).unwrap();
    {
        let conn = pool.get().await.unwrap();
        // A long statement abandoned half-way.
        let r = tokio::time::timeout(
            Duration::from_millis(100),
            conn.batch_execute("BEGIN; SELECT pg_sleep(30)"),
        )
        .await;
        assert!(r.is_err(), "the query should still be running");
    }
    let started = std::time::Instant::now();
    let conn = tokio::time::timeout(Duration::from_secs(10), pool.get())
        .await
        .expect("the abandoned statement is cancelled, not waited out")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    let v: i32 = conn.query_one("SELECT 7", &[]).await.unwrap().get(0);
    assert_eq!(v, 7);
    assert!(!in_transaction(&conn).await);
    // The backend running pg_sleep is not left behind: one connection only.
    drop(conn);
    assert!(common::backends(&app).await <= 1);
    let rows = cluster()
        .backends(&pgfleet_testkit::BackendFilter::all().application_name(&app))
        .await
        .unwrap();
    assert!(
        rows.iter().all(|b| b.state.as_deref() != Some("active")),
        "{rows:?}"
    );
}

#[tokio::test]
async fn a_running_statement_can_be_cancelled_with_the_guards_token() {
    let app = app("cancel_token");
    let pool = Pool::new(target(cluster()), config(&app, 1, 1)).unwrap();
    let conn = pool.get().await.unwrap();
    let token = conn.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        token.cancel_query().await
    });
    let started = std::time::Instant::now();
    let err = conn.query("SELECT pg_sleep(30)", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some("57014"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    canceller.await.unwrap().unwrap();
    // The connection is fine afterwards.
    let row = conn.query_one("SELECT 1::int", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
}

/// `COPY ... FROM STDIN`, finished or abandoned half-way: the connection
/// comes back clean at once (with one connection, the next `get` would
/// otherwise time out).
#[tokio::test]
async fn copy_from_stdin_finished_or_abandoned_returns_the_connection_clean() {
    use futures_util::SinkExt;
    let app = app("copy_in");
    let mut cfg = config(&app, 1, 1);
    cfg.acquire_timeout = Duration::from_secs(2);
    let pool = Pool::new(target(cluster()), cfg).unwrap();
    let table = format!("copy_{}", app.replace('-', "_"));
    let conn = pool.get().await.unwrap();
    conn.batch_execute(&format!("CREATE TABLE {table} (n int)"))
        .await
        .unwrap();
    let pid: i32 = conn
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let sink = conn
        .copy_in::<_, bytes::Bytes>(&format!("COPY {table} FROM STDIN"))
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    for n in 0..100 {
        sink.send(bytes::Bytes::from(format!("{n}\n")))
            .await
            .unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), 100);
    drop(conn);

    let started = std::time::Instant::now();
    let conn = pool
        .get()
        .await
        .expect("the connection came back after COPY");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    let again: i32 = conn
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(again, pid, "the same connection, reused");

    // Abandoned half-way: dropping the sink sends CopyFail.
    {
        let sink = conn
            .copy_in::<_, bytes::Bytes>(&format!("COPY {table} FROM STDIN"))
            .await
            .unwrap();
        futures_util::pin_mut!(sink);
        sink.send(bytes::Bytes::from_static(b"7\n")).await.unwrap();
    }
    drop(conn);
    let conn = pool
        .get()
        .await
        .expect("the connection came back after an aborted COPY");
    let rows: i64 = conn
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 100, "the abandoned COPY wrote nothing");
    conn.batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
    assert_eq!(pool.stats().counters.connections_closed_dirty, 0);
}

/// `ROLLBACK` statements of `app` in the server log of `cluster`
/// (`log_statement = all`).
fn rollbacks_logged(cluster: &pgfleet_testkit::TempCluster, app: &str) -> usize {
    std::fs::read_to_string(cluster.log_path())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(app) && l.ends_with("statement: ROLLBACK"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_return_from_a_transaction_is_not_a_dirty_return_and_rolls_back_once() {
    let cluster = pgfleet_testkit::TempCluster::builder()
        .setting("log_statement", "all")
        .setting("log_line_prefix", "%a: ")
        .start()
        .unwrap();
    let app = app("early_return");
    let pool = Pool::new(target(&cluster), config(&app, 0, 1)).unwrap();
    const RETURNS: usize = 20;
    for i in 0..RETURNS {
        let mut conn = pool.get().await.unwrap();
        let tx = conn.transaction().await.unwrap();
        tx.execute("SELECT $1::int", &[&(i as i32)]).await.unwrap();
        // An early return: the Transaction is dropped (tokio-postgres
        // queues a ROLLBACK), then the guard.
        drop(tx);
        drop(conn);
    }
    let conn = pool.get().await.unwrap();
    assert!(!in_transaction(&conn).await);
    drop(conn);
    let stats = pool.stats();
    assert_eq!(stats.counters.dirty_returns, 0, "{stats:?}");
    assert_eq!(stats.counters.connections_created, 1, "{stats:?}");
    // The log is written asynchronously: wait (bounded) for all of them.
    let mut seen = 0;
    for _ in 0..100 {
        seen = rollbacks_logged(&cluster, &app);
        if seen >= RETURNS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Give a second ROLLBACK the chance to show up before counting.
    tokio::time::sleep(Duration::from_millis(200)).await;
    seen = seen.max(rollbacks_logged(&cluster, &app));
    assert_eq!(
        seen, RETURNS,
        "one ROLLBACK per transaction, none from the pool"
    );
}
