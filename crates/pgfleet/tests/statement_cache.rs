//! The per-connection statement cache (`prepare_cached`): a statement is
//! prepared once per connection and reused by later callers; the cache is
//! bounded and closes what it drops on the server; failures are not cached;
//! shared-mode leases share their connection's statements.

mod common;

use common::{app, cluster, config, target};
use pgfleet::{Pool, PooledConnection};
use tokio_postgres::types::Type;

/// The texts of the statements prepared on this connection, oldest first,
/// as the server lists them (asked with an unnamed statement, which the
/// list does not show).
async fn server_statements(conn: &PooledConnection) -> Vec<String> {
    conn.query_typed(
        "SELECT statement FROM pg_prepared_statements ORDER BY prepare_time",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|row| row.get(0))
    .collect()
}

/// A pool of one connection (so every `get()` finds the same one) caching
/// `cache_size` statements, tagged with a fresh application name.
fn one_connection_pool(prefix: &str, cache_size: usize) -> Pool {
    let mut cfg = config(&app(prefix), 0, 1);
    cfg.statement_cache_size = cache_size;
    Pool::new(target(cluster()), cfg).unwrap()
}

/// The pool's statement-cache counters: (statements prepared, cache hits).
fn prepared_and_hits(pool: &Pool) -> (u64, u64) {
    let counters = pool.stats().counters;
    (counters.statements_prepared, counters.statement_cache_hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_is_prepared_once_per_connection_and_reused() {
    let pool = one_connection_pool("stmt_reuse", 256);
    let sql = "SELECT $1::int4 + 1";
    {
        let conn = pool.get().await.unwrap();
        let statement = conn.prepare_cached(sql).await.unwrap();
        conn.prepare_cached(sql).await.unwrap();
        let row = conn.query_one(&statement, &[&41i32]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 42);
    }
    // The one connection comes back with its statement: no new prepare.
    let conn = pool.get().await.unwrap();
    let statement = conn.prepare_cached(sql).await.unwrap();
    let row = conn.query_one(&statement, &[&1i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
    assert_eq!(conn.cached_statements(), 1);
    assert_eq!(server_statements(&conn).await, vec![sql.to_owned()]);
    assert_eq!(prepared_and_hits(&pool), (1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_least_recently_used_statement_is_closed_when_the_cache_is_full() {
    let pool = one_connection_pool("stmt_evict", 2);
    let conn = pool.get().await.unwrap();
    conn.prepare_cached("SELECT 'a'").await.unwrap();
    conn.prepare_cached("SELECT 'b'").await.unwrap();
    // `a` is used again, so `b` is now the least recently used.
    conn.prepare_cached("SELECT 'a'").await.unwrap();
    conn.prepare_cached("SELECT 'c'").await.unwrap();
    assert_eq!(conn.cached_statements(), 2);
    assert_eq!(server_statements(&conn).await, ["SELECT 'a'", "SELECT 'c'"]);
    // `b` is prepared anew on its next use, and `a` makes room for it.
    let b = conn.prepare_cached("SELECT 'b'").await.unwrap();
    let row = conn.query_one(&b, &[]).await.unwrap();
    assert_eq!(row.get::<_, &str>(0), "b");
    assert_eq!(server_statements(&conn).await, ["SELECT 'c'", "SELECT 'b'"]);
    assert_eq!(prepared_and_hits(&pool), (4, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameter_types_make_separate_entries() {
    let pool = one_connection_pool("stmt_types", 256);
    let conn = pool.get().await.unwrap();
    let sql = "SELECT $1";
    let int4 = conn.prepare_typed_cached(sql, &[Type::INT4]).await.unwrap();
    let int8 = conn.prepare_typed_cached(sql, &[Type::INT8]).await.unwrap();
    assert_eq!(int4.params(), &[Type::INT4]);
    assert_eq!(int8.params(), &[Type::INT8]);
    let again = conn.prepare_typed_cached(sql, &[Type::INT8]).await.unwrap();
    assert_eq!(again.params(), &[Type::INT8]);
    let row = conn.query_one(&again, &[&7i64]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0), 7);
    assert_eq!(conn.cached_statements(), 2);
    assert_eq!(server_statements(&conn).await, [sql, sql]);
    assert_eq!(prepared_and_hits(&pool), (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_prepare_is_not_cached_and_size_zero_caches_nothing() {
    let pool = one_connection_pool("stmt_fail", 0);
    let conn = pool.get().await.unwrap();
    let error = conn.prepare_cached("SELEC 1").await.unwrap_err();
    assert_eq!(error.code(), Some("42601"), "{error}");
    let first = conn.prepare_cached("SELECT 1").await.unwrap();
    let second = conn.prepare_cached("SELECT 1").await.unwrap();
    // Two statements on the server while both are held; none in the cache.
    assert_eq!(server_statements(&conn).await, ["SELECT 1", "SELECT 1"]);
    drop((first, second));
    assert_eq!(server_statements(&conn).await, Vec::<String>::new());
    assert_eq!(conn.cached_statements(), 0);
    assert_eq!(prepared_and_hits(&pool), (2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clearing_the_cache_follows_deallocate_all() {
    let pool = one_connection_pool("stmt_clear", 256);
    let conn = pool.get().await.unwrap();
    let sql = "SELECT 2";
    let stale = conn.prepare_cached(sql).await.unwrap();
    conn.batch_execute("DEALLOCATE ALL").await.unwrap();
    let error = conn.query(&stale, &[]).await.unwrap_err();
    assert_eq!(error.code(), Some("26000"), "{error}");
    conn.clear_statement_cache();
    assert_eq!(conn.cached_statements(), 0);
    let fresh = conn.prepare_cached(sql).await.unwrap();
    let row = conn.query_one(&fresh, &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_leases_share_their_connections_statements() {
    let app = app("stmt_shared");
    let mut cfg = config(&app, 0, 4);
    cfg.shared_connections = Some(2);
    let pool = Pool::new(target(cluster()), cfg).unwrap();
    let sql = "SELECT $1::int4 * 2";
    let (tasks, rounds) = (50i32, 20i32);
    let mut handles = Vec::new();
    for i in 0..tasks {
        let pool = pool.clone();
        handles.push(tokio::spawn(async move {
            for j in 0..rounds {
                let conn = pool.shared().await.unwrap();
                let statement = conn.prepare_cached(sql).await.unwrap();
                let row = conn.query_one(&statement, &[&(i + j)]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), 2 * (i + j));
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let (prepared, hits) = prepared_and_hits(&pool);
    assert_eq!(prepared + hits, u64::try_from(tasks * rounds).unwrap());
    // Only callers that missed together before the first prepare finished
    // prepare again: at most one per task per lane.
    assert!(
        prepared <= 2 * u64::try_from(tasks).unwrap(),
        "{prepared} prepared, {hits} hits"
    );
    // Each lane keeps one statement; race losers' copies were closed.
    for _ in 0..4 {
        let conn = pool.shared().await.unwrap();
        assert_eq!(conn.cached_statements(), 1);
        let rows = conn
            .query_typed("SELECT count(*) FROM pg_prepared_statements", &[])
            .await
            .unwrap();
        assert_eq!(rows[0].get::<_, i64>(0), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_evicted_while_in_use_still_run_and_are_closed_after() {
    let app = app("stmt_thrash");
    let mut cfg = config(&app, 0, 4);
    cfg.shared_connections = Some(2);
    cfg.statement_cache_size = 1;
    let pool = Pool::new(target(cluster()), cfg).unwrap();
    // Three texts through a cache of one: nearly every call evicts a
    // statement that other leases may still hold.
    let texts = [
        "SELECT $1::int4 * 2",
        "SELECT $1::int4 * 2 + 0",
        "SELECT $1::int4 * 2 - 0",
    ];
    let (tasks, rounds) = (32i32, 50i32);
    let mut handles = Vec::new();
    for i in 0..tasks {
        let pool = pool.clone();
        handles.push(tokio::spawn(async move {
            for j in 0..rounds {
                let conn = pool.shared().await.unwrap();
                let text = texts[usize::try_from((i + j) % 3).unwrap()];
                let statement = conn.prepare_cached(text).await.unwrap();
                tokio::task::yield_now().await;
                let row = conn.query_one(&statement, &[&(i + j)]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), 2 * (i + j));
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let (prepared, hits) = prepared_and_hits(&pool);
    assert_eq!(prepared + hits, u64::try_from(tasks * rounds).unwrap());
    assert_eq!(pool.stats().counters.dirty_returns, 0);
    // Whatever was evicted has been closed on the server.
    for _ in 0..4 {
        let conn = pool.shared().await.unwrap();
        let rows = conn
            .query_typed("SELECT count(*) FROM pg_prepared_statements", &[])
            .await
            .unwrap();
        assert_eq!(conn.cached_statements(), 1);
        assert_eq!(rows[0].get::<_, i64>(0), 1);
    }
}
