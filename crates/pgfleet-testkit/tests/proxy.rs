//! The fault proxy between a real client and a real server: each fault does
//! what it says, and goes away when it is lifted.

use std::time::{Duration, Instant};

use pgfleet_testkit::{Fault, FaultProxy, TempCluster};
use tokio::time::timeout;
use tokio_postgres::{Client, NoTls};

async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

async fn select_one(client: &Client) -> bool {
    client.simple_query("SELECT 1").await.is_ok()
}

#[tokio::test]
async fn each_fault_bites_and_lifts() {
    let cluster = TempCluster::shared();
    let proxy = FaultProxy::start(cluster.port()).await.unwrap();
    let url = cluster.url_via(proxy.port(), "postgres");
    let client = connect(&url).await.unwrap();
    assert!(select_one(&client).await);
    assert_eq!(proxy.open_connections(), 1);

    // A dead network: the statement hangs, then completes when it returns.
    proxy.set(Fault::Blackhole);
    let statement = client.simple_query("SELECT 2");
    tokio::pin!(statement);
    assert!(
        timeout(Duration::from_millis(300), &mut statement)
            .await
            .is_err(),
        "a statement got through a blackholed network"
    );
    proxy.set(Fault::Pass);
    assert!(timeout(Duration::from_secs(5), statement)
        .await
        .unwrap()
        .is_ok());

    // Latency: every chunk waits, both ways.
    proxy.set(Fault::Delay(Duration::from_millis(60)));
    let started = Instant::now();
    assert!(select_one(&client).await);
    assert!(
        started.elapsed() >= Duration::from_millis(120),
        "{:?}",
        started.elapsed()
    );
    proxy.set(Fault::Pass);

    // New connections refused; the existing one still works.
    proxy.set(Fault::RefuseNew);
    assert!(timeout(Duration::from_secs(5), connect(&url))
        .await
        .unwrap()
        .is_err());
    assert!(select_one(&client).await);

    // New connections hang, for good; later ones pass once it lifts.
    proxy.set(Fault::HangNew);
    let hanging = tokio::spawn({
        let url = url.clone();
        async move { connect(&url).await.is_ok() }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!hanging.is_finished(), "a connect got through HangNew");
    proxy.set(Fault::Pass);
    let later = connect(&url).await.unwrap();
    assert!(select_one(&later).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    if hanging.is_finished() {
        panic!("a hung connect came back to life: {:?}", hanging.await);
    }
    drop(later);

    // Every connection cut: the client sees its connection end, and the
    // hung connect fails.
    proxy.cut_all();
    assert!(!timeout(Duration::from_secs(5), hanging)
        .await
        .unwrap()
        .unwrap());
    let err = timeout(Duration::from_secs(5), client.simple_query("SELECT 3"))
        .await
        .unwrap();
    assert!(err.is_err(), "a cut connection still answered");
    let fresh = connect(&url).await.unwrap();
    assert!(select_one(&fresh).await);
    assert!(proxy.accepted() >= 4);
    drop(fresh);
    drop(proxy);
}

#[tokio::test]
async fn a_cut_resets_the_connection() {
    use tokio::io::AsyncReadExt;

    let cluster = TempCluster::shared();
    let proxy = FaultProxy::start(cluster.port()).await.unwrap();
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port()))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.open_connections() == 0 {
        assert!(
            Instant::now() < deadline,
            "the proxy never took the connection"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Let the proxy reach the server before the cut.
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.cut_all();
    let mut buf = [0u8; 16];
    let read = timeout(Duration::from_secs(5), raw.read(&mut buf))
        .await
        .expect("the cut connection stayed open");
    let err = read.expect_err("a cut connection ended with an orderly close, not a reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}
