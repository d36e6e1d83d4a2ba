//! A distinctive password never appears in any Display, Debug, stats,
//! error or log output. One test in its own binary, so the global log
//! subscriber sees every event of the process.

mod common;

use std::time::Duration;

use common::{app, cluster, config, Capture};
use pgfleet::{Fleet, Target};

const SECRET: &str = "Zebra-Quartz-9931";

#[tokio::test]
async fn a_distinctive_password_never_appears_in_any_output() {
    let app = app("secret");
    let c = cluster();
    let role = app.replace('-', "_");
    // The kit's own ALTER ROLE statement carries the password; everything
    // pgfleet does comes after the subscriber is installed.
    c.create_role(&role, SECRET).await.unwrap();
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();
    let url = c.url_for(&role, SECRET, "postgres");
    let target = Target::parse(&url).unwrap();
    let fleet = Fleet::new();
    let mut cfg = config(&app, 1, 1);
    cfg.acquire_timeout = Duration::from_millis(300);
    let handle = fleet.pool(&target, &cfg).unwrap();
    handle.wait_ready(Duration::from_secs(10)).await.unwrap();
    let conn = handle.get().await.unwrap();
    let mut outputs = vec![
        target.to_string(),
        format!("{target:?}"),
        target.key().to_owned(),
        format!("{:?}", *handle),
        format!("{handle:?}"),
        format!("{fleet:?}"),
        format!("{conn:?}"),
        serde_json::to_string(&fleet.stats()).unwrap(),
    ];
    // A timeout error while the only connection is out.
    let err = handle.get().await.unwrap_err();
    outputs.push(err.to_string());
    outputs.push(format!("{err:?}"));
    drop(conn);
    // A connect error: the role's password is right, the database is wrong.
    let wrong_db = Target::parse(&c.url_for(&role, SECRET, "no_such_db_for_secret")).unwrap();
    let bad = fleet.pool(&wrong_db, &cfg).unwrap();
    let err = bad.get().await.unwrap_err();
    outputs.push(err.to_string());
    outputs.push(format!("{err:?}"));
    outputs.push(pgfleet::report(&err));
    let report = fleet.warmup([(wrong_db.clone(), cfg.clone())]).await;
    outputs.push(format!("{report:?}"));
    fleet.close_all(Duration::from_secs(2)).await;
    outputs.push(String::from_utf8_lossy(&capture.0.lock().unwrap()).into_owned());
    assert!(
        outputs.last().unwrap().contains("connect failed"),
        "logs were captured: {}",
        outputs.last().unwrap()
    );
    for out in &outputs {
        assert!(!out.contains(SECRET), "password leaked in: {out}");
    }
}
