//! Streaming replication in the test kit: a standby, a promotion, and the
//! former primary back as a standby of the new one.

use std::time::{Duration, Instant};

use pgfleet_testkit::TempCluster;
use tokio_postgres::NoTls;

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// Waits (at most 30 s) until `sql` returns `want` on `cluster` (an error,
/// such as a table not replayed yet, is "not yet").
async fn wait_for(cluster: &TempCluster, sql: &str, want: i64) {
    let client = connect(&cluster.url("postgres")).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = client.query_one(sql, &[]).await.map(|r| r.get::<_, i64>(0));
        if got.as_ref().ok() == Some(&want) {
            return;
        }
        if Instant::now() >= deadline {
            let log = std::fs::read_to_string(cluster.log_path()).unwrap_or_default();
            panic!(
                "{sql}: {got:?}, not {want}; the server's log ends:\n{}",
                &log[log.len().saturating_sub(3000)..]
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn standby_promotion_and_the_old_primary_rejoining() {
    let primary = TempCluster::builder().replication().start().unwrap();
    let standby = primary.start_standby().unwrap();
    assert_ne!(primary.port(), standby.port());
    assert!(!primary.is_in_recovery().await.unwrap());
    assert!(standby.is_in_recovery().await.unwrap());

    primary
        .execute("CREATE TABLE t (n int); INSERT INTO t SELECT generate_series(1, 10)")
        .await
        .unwrap();
    wait_for(&standby, "SELECT count(*) FROM t", 10).await;
    // A standby refuses writes with 25006.
    let on_standby = connect(&standby.url("postgres")).await;
    let refused = on_standby.execute("INSERT INTO t VALUES (0)", &[]).await;
    assert_eq!(refused.unwrap_err().code().map(|c| c.code()), Some("25006"));

    // The primary dies; its writes after the standby's last replay are the
    // ones pg_rewind undoes.
    primary.kill().unwrap();
    assert!(!primary.is_running());
    standby.promote().unwrap();
    assert!(!standby.is_in_recovery().await.unwrap());
    standby.execute("INSERT INTO t VALUES (11)").await.unwrap();

    primary.rejoin_as_standby_of(&standby).unwrap();
    assert!(primary.is_running());
    assert!(primary.is_in_recovery().await.unwrap());
    // It follows the new primary.
    standby.execute("INSERT INTO t VALUES (12)").await.unwrap();
    wait_for(&primary, "SELECT count(*) FROM t", 12).await;
}
