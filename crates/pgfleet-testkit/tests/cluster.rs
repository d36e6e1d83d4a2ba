//! The test kit against real servers.

use std::process::Command;
use std::time::{Duration, Instant};

use pgfleet_testkit::{unique_name, BackendFilter, TempCluster};
use tokio_postgres::NoTls;

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

fn port_refuses(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
}

#[tokio::test]
async fn settings_databases_counting_and_termination() {
    let cluster = TempCluster::builder()
        .setting("max_connections", "20")
        .start()
        .unwrap();
    let client = connect(&cluster.url("postgres")).await;
    let max: String = client
        .query_one("SHOW max_connections", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(max, "20");

    cluster.create_database("kit_db").await.unwrap();
    cluster.create_database("kit_db").await.unwrap(); // idempotent
    let app = unique_name("kit");
    let url = format!("{}?application_name={app}", cluster.url("kit_db"));
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(connect(&url).await);
    }
    let filter = BackendFilter::all().application_name(&app);
    assert_eq!(cluster.count_backends(&filter).await.unwrap(), 3);
    assert_eq!(
        cluster
            .count_backends(&BackendFilter::all().database("kit_db"))
            .await
            .unwrap(),
        3
    );
    let rows = cluster.backends(&filter).await.unwrap();
    assert!(rows.iter().all(|b| b.database.as_deref() == Some("kit_db")));
    assert_eq!(cluster.terminate(&filter).await.unwrap(), 3);
    let left = cluster
        .wait_for_backends(&filter, |n| n == 0, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(left, 0);
    assert!(clients[0].simple_query("SELECT 1").await.is_err());
}

#[tokio::test]
async fn stop_resume_and_restart_keep_the_data_and_port() {
    let cluster = TempCluster::start().unwrap();
    let port = cluster.port();
    cluster
        .execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
        .await
        .unwrap();
    cluster.stop().unwrap();
    assert!(!cluster.is_running());
    assert!(port_refuses(port));
    cluster.resume().unwrap();
    cluster.restart().unwrap();
    assert_eq!(cluster.port(), port);
    let client = connect(&cluster.url("postgres")).await;
    let v: i32 = client
        .query_one("SELECT v FROM kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 42);
}

#[tokio::test]
async fn roles_get_real_password_checks() {
    let cluster = TempCluster::shared();
    let role = unique_name("role");
    cluster.create_role(&role, "right-pw").await.unwrap();
    let ok = tokio_postgres::connect(&cluster.url_for(&role, "right-pw", "postgres"), NoTls).await;
    assert!(ok.is_ok());
    let err = tokio_postgres::connect(&cluster.url_for(&role, "wrong-pw", "postgres"), NoTls)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code().unwrap().code(), "28P01");
}

#[test]
fn drop_stops_the_server_and_removes_the_directory() {
    let cluster = TempCluster::start().unwrap();
    let (port, dir) = (cluster.port(), cluster.dir().to_path_buf());
    assert!(dir.exists() && !port_refuses(port));
    drop(cluster);
    assert!(!dir.exists());
    assert!(port_refuses(port));
}

#[test]
fn shared_is_one_cluster() {
    assert_eq!(TempCluster::shared().port(), TempCluster::shared().port());
}

/// Run as a child process by the watchdog test: starts a cluster, prints
/// its port and directory, and exits without dropping it.
#[test]
#[ignore = "helper for watchdog_cleans_up_after_a_dead_test_process"]
fn child_that_exits_without_cleanup() {
    if std::env::var_os("PGFLEET_TESTKIT_CHILD").is_none() {
        return;
    }
    let cluster = TempCluster::start().unwrap();
    println!("CLUSTER {} {}", cluster.port(), cluster.dir().display());
    std::process::exit(0);
}

#[test]
fn watchdog_cleans_up_after_a_dead_test_process() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_that_exits_without_cleanup",
            "--nocapture",
        ])
        .env("PGFLEET_TESTKIT_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("CLUSTER "))
        .unwrap_or_else(|| panic!("{stdout}"));
    let mut parts = line.split_whitespace().skip(1);
    let port: u16 = parts.next().unwrap().parse().unwrap();
    let dir = std::path::PathBuf::from(parts.next().unwrap());
    let deadline = Instant::now() + Duration::from_secs(15);
    while (dir.exists() || !port_refuses(port)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!dir.exists(), "the watchdog removed {}", dir.display());
    assert!(port_refuses(port), "the watchdog stopped the server");
}
