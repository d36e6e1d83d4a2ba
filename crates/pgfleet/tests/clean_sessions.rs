//! Every borrower gets a clean session: each kind of session state a
//! borrower leaves (SET, advisory lock, LISTEN, temporary table, PREPARE,
//! WITH HOLD cursor) is reset before the next one, in one round trip, and
//! a connection that left none costs no round trip at all (counted through
//! the protocol tap).

mod common;

use std::collections::BTreeMap;

use common::{app, cluster, config, target};
use pgfleet::{Pool, PoolConfig, Reset};

/// A pool of exactly one connection, so every `get()` is the same session.
fn one_connection(prefix: &str, tweak: impl FnOnce(&mut PoolConfig)) -> Pool {
    let mut cfg = config(&app(prefix), 1, 1);
    tweak(&mut cfg);
    Pool::new(target(cluster()), cfg).unwrap()
}

async fn backend_pid(conn: &pgfleet::PooledConnection) -> i32 {
    conn.query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_changed_nothing_costs_no_round_trip() {
    let pool = one_connection("clean_free", |_| {});
    let conn = pool.get().await.unwrap();
    let pid = backend_pid(&conn).await;
    conn.query_one("SELECT $1::int + 1", &[&1i32])
        .await
        .unwrap();
    conn.batch_execute("SELECT 1; UPDATE pg_class SET relname = relname WHERE false")
        .await
        .unwrap();
    let before = conn.round_trips();
    drop(conn);
    let conn = pool.get().await.unwrap();
    assert_eq!(conn.round_trips(), before, "no reset, no health check");
    assert_eq!(backend_pid(&conn).await, pid);
    assert_eq!(pool.stats().counters.session_resets, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_session_state_is_reset_before_the_next_borrower() {
    let pool = one_connection("clean_kinds", |_| {});
    // (what a borrower does, what the next one checks, what it must see)
    let cases: [(&str, &str, &str); 7] = [
        (
            "SET work_mem = '3MB'",
            "SELECT current_setting('work_mem')",
            "4MB",
        ),
        (
            "SET search_path = nowhere",
            "SELECT current_setting('search_path')",
            "\"$user\", public",
        ),
        (
            "SELECT pg_advisory_lock(4242)",
            "SELECT count(*)::text FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
            "0",
        ),
        (
            "LISTEN jobs",
            "SELECT count(*)::text FROM pg_listening_channels()",
            "0",
        ),
        (
            "CREATE TEMP TABLE scratch (x int)",
            "SELECT (to_regclass('pg_temp.scratch') IS NULL)::text",
            "true",
        ),
        (
            "PREPARE mine AS SELECT 1",
            "SELECT count(*)::text FROM pg_prepared_statements WHERE name = 'mine'",
            "0",
        ),
        (
            "DECLARE held CURSOR WITH HOLD FOR SELECT 1",
            "SELECT count(*)::text FROM pg_cursors WHERE is_holdable",
            "0",
        ),
    ];
    let pid = backend_pid(&pool.get().await.unwrap()).await;
    for (i, (leave, check, want)) in cases.iter().enumerate() {
        let conn = pool.get().await.unwrap();
        conn.batch_execute(leave).await.unwrap();
        let before = conn.round_trips();
        drop(conn);
        let conn = pool.get().await.unwrap();
        let after = conn.round_trips();
        if leave.starts_with("PREPARE") {
            // DEALLOCATE ALL took the cached statements with it: the cache
            // is empty, and their Close messages went out with the reset.
            assert_eq!(conn.cached_statements(), 0);
            assert!(after > before, "{leave}: reset");
        } else {
            assert_eq!(after, before + 1, "{leave}: one reset round trip");
        }
        assert_eq!(backend_pid(&conn).await, pid, "{leave}: same session");
        let seen: String = conn.query_one(*check, &[]).await.unwrap().get(0);
        assert_eq!(seen, *want, "after {leave:?}");
        assert_eq!(pool.stats().counters.session_resets, i as u64 + 1);
    }
    // The statement cache survived DEALLOCATE ALL: it was cleared with it.
    let conn = pool.get().await.unwrap();
    let statement = conn.prepare_cached("SELECT $1::int * 3").await.unwrap();
    let v: i32 = conn.query_one(&statement, &[&7i32]).await.unwrap().get(0);
    assert_eq!(v, 21);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_left_through_the_query_methods_is_seen_too() {
    let pool = one_connection("clean_extended", |_| {});
    let conn = pool.get().await.unwrap();
    // Parse messages (the extended protocol) are read like simple queries.
    conn.query_one("SELECT pg_advisory_lock($1)", &[&77i64])
        .await
        .unwrap();
    conn.query_one("SELECT set_config('app.tenant', $1, false)", &[&"acme"])
        .await
        .unwrap();
    drop(conn);
    let conn = pool.get().await.unwrap();
    let row = conn
        .query_one(
            "SELECT (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()), \
             current_setting('app.tenant', true)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 0);
    assert_eq!(row.get::<_, Option<String>>(1).unwrap_or_default(), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_settings_come_back_after_a_reset() {
    let pool = one_connection("clean_settings", |c| {
        c.server_settings = BTreeMap::from([("work_mem".to_owned(), "5MB".to_owned())]);
    });
    let conn = pool.get().await.unwrap();
    conn.batch_execute("SET work_mem = '1MB'").await.unwrap();
    drop(conn);
    let conn = pool.get().await.unwrap();
    let v: String = conn
        .query_one("SELECT current_setting('work_mem')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "5MB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_always_and_never() {
    let always = one_connection("clean_always", |c| c.reset = Reset::Always);
    let conn = always.get().await.unwrap();
    let before = conn.round_trips();
    drop(conn);
    let conn = always.get().await.unwrap();
    assert_eq!(conn.round_trips(), before + 1, "one reset on every return");
    drop(conn);

    let never = one_connection("clean_never", |c| c.reset = Reset::Never);
    let conn = never.get().await.unwrap();
    conn.batch_execute("SET work_mem = '2MB'").await.unwrap();
    drop(conn);
    let conn = never.get().await.unwrap();
    let v: String = conn
        .query_one("SELECT current_setting('work_mem')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "2MB", "reset = never trusts the borrowers");
    assert_eq!(never.stats().counters.session_resets, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_statement_that_sets_state_is_reset_on_every_return() {
    let pool = one_connection("clean_cached", |_| {});
    let set_tenant = "SELECT set_config('app.tenant', $1, false)";
    for tenant in ["acme", "globex", "initech"] {
        let conn = pool.get().await.unwrap();
        let seen: Option<String> = conn
            .query_one("SELECT current_setting('app.tenant', true)", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            seen.unwrap_or_default(),
            "",
            "{tenant}: no tenant left over"
        );
        // From the second borrow on, the statement comes from the cache:
        // only Bind and Execute go out, no text for the tap to read.
        conn.query_one(set_tenant, &[&tenant]).await.unwrap();
        let prepared = conn
            .prepare_cached("SELECT pg_advisory_lock(42)")
            .await
            .unwrap();
        conn.query_one(&prepared, &[]).await.unwrap();
    }
    let conn = pool.get().await.unwrap();
    let row = conn
        .query_one(
            "SELECT current_setting('app.tenant', true), \
             (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0).unwrap_or_default(), "");
    assert_eq!(row.get::<_, i64>(1), 0);
    assert_eq!(pool.stats().counters.session_resets, 3);
}
