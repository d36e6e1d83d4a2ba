//! Credentials at run time: a rotated password, a password provider called
//! for each new connection, and `drain` replacing open connections.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{app, cluster, config, settle_backends};
use pgfleet::{Pool, Target};

async fn pids(pool: &Pool, n: usize) -> HashSet<i32> {
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(pool.get().await.unwrap());
    }
    let mut out = HashSet::new();
    for conn in &held {
        out.insert(
            conn.query_one("SELECT pg_backend_pid()", &[])
                .await
                .unwrap()
                .get(0),
        );
    }
    out
}

#[tokio::test]
async fn a_rotated_password_reaches_new_connections_and_drain_replaces_the_old() {
    let app = app("rotate");
    let c = cluster();
    let role = app.replace('-', "_");
    c.create_role(&role, "first-Pw-1").await.unwrap();
    let target = Target::parse(&c.url_for(&role, "first-Pw-1", "postgres")).unwrap();
    let pool = Pool::new(target, config(&app, 2, 4)).unwrap();
    pool.wait_ready(Duration::from_secs(10)).await.unwrap();
    let before = pids(&pool, 2).await;

    // The password rotates on the server; open sessions keep working.
    c.execute(&format!("ALTER ROLE {role} PASSWORD 'second-Pw-2'"))
        .await
        .unwrap();
    pool.set_password(Some("second-Pw-2"));
    let held = pool.get().await.unwrap();
    held.simple_query("SELECT 1").await.unwrap();
    // Drain: the idle connection is replaced now, the held one on return.
    pool.drain();
    drop(held);
    assert_eq!(settle_backends(&app, 2).await, 2);
    let after = pids(&pool, 2).await;
    assert!(
        before.is_disjoint(&after),
        "{before:?} then {after:?}: not replaced"
    );
    assert!(pool.stats().counters.connections_closed_drained >= 2);
    assert_eq!(
        pool.stats().counters.connect_errors,
        0,
        "the new password was used"
    );
    pool.close();
}

#[tokio::test]
async fn a_password_provider_is_asked_for_each_new_connection() {
    let app = app("provider");
    let c = cluster();
    let role = app.replace('-', "_");
    c.create_role(&role, "token-0").await.unwrap();
    // The URL's password is wrong: only the provider's works.
    let target = Target::parse(&c.url_for(&role, "not-the-token", "postgres")).unwrap();
    let mut cfg = config(&app, 0, 3);
    cfg.acquire_timeout = Duration::from_secs(1);
    let pool = Pool::new(target, cfg).unwrap();
    let asked = Arc::new(AtomicUsize::new(0));
    pool.set_password_provider({
        let asked = asked.clone();
        move || {
            let asked = asked.clone();
            async move {
                asked.fetch_add(1, Ordering::SeqCst);
                Ok("token-0".to_owned())
            }
        }
    });
    let conns = [pool.get().await.unwrap(), pool.get().await.unwrap()];
    assert_eq!(asked.load(Ordering::SeqCst), 2);
    drop(conns);
    // A provider that fails fails the connect, with its message.
    pool.set_password_provider(|| async { Err("the token service is down".into()) });
    pool.drain();
    let err = pool.get().await.unwrap_err();
    assert!(
        pgfleet::report(&err).contains("the token service is down"),
        "{err:?}"
    );
    pool.close();
}
