//! `Listener` against a real server: notifications delivered, channels
//! listened again after a server restart, the gap signalled, nothing
//! notified after the gap lost, and the listener's connection inside the
//! server budget but outside the pool's `max_size`.

mod common;

use std::time::Duration;

use common::{app, config};
use futures_util::StreamExt;
use pgfleet::{Fleet, ListenerEvent, Pool};
use pgfleet_testkit::TempCluster;

async fn notify(pool: &Pool, channel: &str, payload: &str) {
    // The pool reconnects by itself after a restart; retry (bounded) while
    // it does.
    for _ in 0..100 {
        if let Ok(conn) = pool.get().await {
            if conn
                .execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
                .await
                .is_ok()
            {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("could not notify {channel}");
}

async fn next(listener: &mut pgfleet::Listener) -> ListenerEvent {
    tokio::time::timeout(Duration::from_secs(30), listener.recv())
        .await
        .expect("an event within 30 s")
        .expect("the listener works")
}

fn payload(event: ListenerEvent) -> (String, String) {
    match event {
        ListenerEvent::Notification(n) => (n.channel().to_owned(), n.payload().to_owned()),
        other => panic!("expected a notification, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_survives_a_restart_signals_the_gap_and_loses_nothing_after_it() {
    let cluster = TempCluster::start().unwrap();
    let target = pgfleet::Target::parse(&cluster.url("postgres")).unwrap();
    let fleet = Fleet::new();
    // One pooled connection at most; the listener's is outside it.
    let pool = fleet.pool(&target, &config(&app("listen"), 0, 1)).unwrap();
    let held = pool.get().await.unwrap();
    let mut listener = pool.listener().await.unwrap();
    listener.listen("jobs").await.unwrap();
    listener.listen("other channel").await.unwrap();
    let budget = fleet.stats().servers.into_values().next().unwrap();
    assert_eq!(
        budget.in_use, 2,
        "the listener holds a budget unit: {budget:?}"
    );
    drop(held);

    notify(&pool, "jobs", "first").await;
    notify(&pool, "other channel", "second").await;
    assert_eq!(
        payload(next(&mut listener).await),
        ("jobs".into(), "first".into())
    );
    assert_eq!(
        payload(next(&mut listener).await),
        ("other channel".into(), "second".into())
    );

    // The server restarts under the listener.
    let restart = tokio::task::spawn_blocking(move || {
        cluster.restart().unwrap();
        cluster
    });
    let gap = match next(&mut listener).await {
        ListenerEvent::Gap(gap) => gap,
        other => panic!("expected a gap, got {other:?}"),
    };
    let cluster = restart.await.unwrap();
    eprintln!("gap: {gap:?}");
    assert_eq!(gap.channels, ["jobs", "other channel"]);
    assert!(gap.duration > Duration::ZERO);
    assert_eq!(listener.reconnects(), 1);
    // Listening again before the gap was reported: nothing after it is lost.
    for i in 0..20 {
        notify(&pool, "jobs", &format!("after {i}")).await;
    }
    for i in 0..20 {
        assert_eq!(
            payload(next(&mut listener).await),
            ("jobs".into(), format!("after {i}"))
        );
    }

    // Unlisten: that channel's notifications stop, the others go on.
    listener.unlisten("other channel").await.unwrap();
    notify(&pool, "other channel", "ignored").await;
    notify(&pool, "jobs", "last").await;
    assert_eq!(
        payload(next(&mut listener).await),
        ("jobs".into(), "last".into())
    );
    assert_eq!(listener.channels().collect::<Vec<_>>(), ["jobs"]);
    // The same events as a Stream.
    let mut events = std::pin::pin!(listener.into_stream());
    notify(&pool, "jobs", "streamed").await;
    let event = tokio::time::timeout(Duration::from_secs(30), events.next())
        .await
        .expect("an event within 30 s")
        .expect("the stream goes on")
        .expect("the listener works");
    assert_eq!(payload(event), ("jobs".into(), "streamed".into()));
    fleet.close_all(Duration::from_secs(5)).await;
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_behind_a_transaction_pooler_is_refused() {
    let target = pgfleet::Target::parse("postgres://app@127.0.0.1:1/app").unwrap();
    let mut cfg = config(&app("listen_pooler"), 0, 1);
    cfg.pooler = pgfleet::Pooler::Transaction;
    let pool = Pool::new(target, cfg).unwrap();
    let err = pool.listener().await.unwrap_err();
    assert!(err.is_unsupported(), "{err}");
    assert!(err.to_string().contains("LISTEN needs a session"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_opened_first_derives_the_auto_budget_and_pools_go_on() {
    let cluster = TempCluster::start().unwrap();
    let target = pgfleet::Target::parse(&cluster.url("postgres")).unwrap();
    let fleet = Fleet::new();
    let pool = fleet
        .pool(&target, &config(&app("listen_first"), 0, 2))
        .unwrap();
    // The listener's connection is the first on the server: it reads the
    // server's limits for the `auto` budget.
    let mut listener = pool.listener().await.unwrap();
    listener.listen("first").await.unwrap();
    let conn = tokio::time::timeout(Duration::from_secs(10), pool.get())
        .await
        .expect("a pooled connection while the listener lives")
        .unwrap();
    let budget = fleet.stats().servers.into_values().next().unwrap();
    assert!(budget.budget.is_some(), "derived: {budget:?}");
    assert_eq!(budget.in_use, 2);
    drop(conn);
    // A closed pool ends a waiting listener.
    pool.close();
    let ended = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("recv ends when the pool closes");
    assert!(ended.unwrap_err().is_closed());
}
