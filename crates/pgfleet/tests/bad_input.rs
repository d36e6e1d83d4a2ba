//! Bad input: wrong password, missing database, unreachable host, invalid
//! configuration — clear errors, no panic.

mod common;

use std::time::{Duration, Instant};

use common::{app, cluster, config};
use pgfleet::{Pool, PoolConfig, Target};

#[tokio::test]
async fn wrong_password_fails_at_once_with_the_servers_reason() {
    let app = app("wrongpw");
    let c = cluster();
    let url = format!(
        "postgres://postgres:not-the-password@127.0.0.1:{}/postgres",
        c.port()
    );
    let pool = Pool::new(Target::parse(&url).unwrap(), config(&app, 0, 2)).unwrap();
    let started = Instant::now();
    let err = pool.get().await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "permanent errors do not wait out the timeout"
    );
    assert!(err.is_connect(), "{err:?}");
    assert_eq!(err.code(), Some("28P01"));
    let message = err.to_string();
    assert!(
        message.contains("password authentication failed"),
        "{message}"
    );
    assert!(!message.contains("not-the-password"), "{message}");
}

#[tokio::test]
async fn missing_database_fails_at_once_naming_it() {
    let app = app("nodb");
    let pool = Pool::new(
        Target::parse(&cluster().url("no_such_db")).unwrap(),
        config(&app, 0, 2),
    )
    .unwrap();
    let err = pool.get().await.unwrap_err();
    assert!(err.is_connect(), "{err:?}");
    assert_eq!(err.code(), Some("3D000"));
    assert!(err.to_string().contains("no_such_db"), "{err}");
}

#[tokio::test]
async fn unreachable_host_times_out_with_the_last_connect_error() {
    let app = app("unreach");
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = config(&app, 0, 2);
    cfg.acquire_timeout = Duration::from_millis(400);
    let pool = Pool::new(
        Target::parse(&format!("postgres://u:pw@127.0.0.1:{port}/db")).unwrap(),
        cfg,
    )
    .unwrap();
    let started = Instant::now();
    let err = pool.get().await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(err.is_timeout(), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("last connect error"), "{message}");
    assert!(message.contains("refused"), "{message}");
}

#[tokio::test]
async fn invalid_pool_configuration_is_rejected_naming_the_field() {
    let target = Target::parse("postgres://u@127.0.0.1:5432/db").unwrap();
    for (cfg, field) in [
        (
            PoolConfig {
                min_size: 5,
                max_size: Some(2),
                ..PoolConfig::default()
            },
            "min_size",
        ),
        (
            PoolConfig {
                max_size: Some(0),
                min_size: 0,
                ..PoolConfig::default()
            },
            "max_size",
        ),
        (
            PoolConfig {
                acquire_timeout: Duration::ZERO,
                ..PoolConfig::default()
            },
            "timeout",
        ),
    ] {
        let err = Pool::new(target.clone(), cfg).unwrap_err();
        assert!(err.is_config(), "{err:?}");
        assert!(err.to_string().contains(field), "{err}");
    }
}

#[tokio::test]
async fn unbounded_limits_wait_without_overflowing() {
    let app = app("maxlimits");
    // A wrong password: the warm-up fails at once, and `Duration::MAX`
    // must not overflow computing its deadline.
    let url = format!(
        "postgres://postgres:not-the-password@127.0.0.1:{}/postgres",
        cluster().port()
    );
    let bad = Pool::new(Target::parse(&url).unwrap(), config(&app, 1, 2)).unwrap();
    let err = bad.wait_ready(Duration::MAX).await.unwrap_err();
    assert_eq!(err.code(), Some("28P01"), "{err:?}");
    let fleet = pgfleet::Fleet::new();
    let good = fleet
        .pool(&common::target(cluster()), &config(&app, 1, 2))
        .unwrap();
    good.wait_ready(Duration::MAX).await.unwrap();
    let conn = good.get().await.unwrap();
    drop(conn);
    let report = fleet.close_all(Duration::MAX).await;
    assert_eq!((report.pools, report.connections_cut), (1, 0));
}
