//! The kit's PgBouncer: starts in front of a cluster, pools in the mode
//! asked, and its console answers.

use pgfleet_testkit::{PgBouncer, PoolMode, TempCluster};
use tokio_postgres::NoTls;

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

#[tokio::test]
async fn transaction_mode_moves_sessions_between_server_connections() {
    let cluster = TempCluster::start().unwrap();
    let bouncer = PgBouncer::builder(PoolMode::Transaction)
        .pool_size(2)
        .start(&cluster)
        .unwrap();
    let url = bouncer.url("postgres");
    let a = connect(&url).await;
    let b = connect(&url).await;
    // Two clients in transactions at once hold the two server connections.
    a.batch_execute("BEGIN").await.unwrap();
    b.batch_execute("BEGIN").await.unwrap();
    let pa: i32 = a
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let pb: i32 = b
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(pa, pb);
    a.batch_execute("COMMIT").await.unwrap();
    b.batch_execute("COMMIT").await.unwrap();
    let pools = bouncer.show("SHOW POOLS").await.unwrap();
    let postgres = pools
        .iter()
        .find(|row| row.iter().any(|(k, v)| k == "database" && v == "postgres"))
        .expect("a pool for database postgres");
    let get = |name: &str| postgres.iter().find(|(k, _)| k == name).unwrap().1.clone();
    assert_eq!(get("pool_mode"), "transaction");
    assert_eq!(get("cl_active"), "2");
}
