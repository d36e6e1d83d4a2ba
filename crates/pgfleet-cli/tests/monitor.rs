//! `pgfleet monitor` against a real server.

use std::process::Command;
use std::time::Duration;

use pgfleet::{Pool, PoolConfig, Target};
use pgfleet_testkit::TempCluster;

fn monitor(url: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pgfleet"))
        .arg("monitor")
        .args(["--database-url", url])
        .args(args)
        .output()
        .expect("run pgfleet monitor");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_connections_marks_the_fleet_and_enforces_max() {
    let cluster = TempCluster::start().unwrap();
    let url = cluster.url("postgres");
    let pool = Pool::new(
        Target::parse(&url).unwrap(),
        PoolConfig {
            min_size: 3,
            max_size: Some(3),
            application_name: "pgfleet-monitored".into(),
            ..PoolConfig::default()
        },
    )
    .unwrap();
    pool.wait_ready(Duration::from_secs(10)).await.unwrap();
    let (other, conn) = tokio_postgres::connect(
        &format!("{url}?application_name=psql"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);

    // One-shot table.
    let url2 = url.clone();
    let (code, out, err) = tokio::task::spawn_blocking(move || monitor(&url2, &[]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("client connections 4 of max_connections 100 (3 marked *"),
        "{out}"
    );
    assert!(out.contains("*pgfleet-monitored"), "{out}");
    assert!(out.contains("    1  psql"), "{out}");
    assert!(!out.contains(TempCluster::superuser_password()), "{out}");

    // Continuous, piped: one line per sample, bounded by --duration.
    let url2 = url.clone();
    let (code, out, _) = tokio::task::spawn_blocking(move || {
        monitor(&url2, &["--interval", "0.1", "--duration", "0.5"])
    })
    .await
    .unwrap();
    assert_eq!(code, 0);
    let lines: Vec<_> = out.lines().collect();
    assert!(lines.len() >= 3, "{out}");
    assert!(
        lines.iter().all(|l| l.contains("total=4/100 fleet=3")),
        "{out}"
    );

    // JSON lines and --max: exceeded -> status 3.
    let url2 = url.clone();
    let (code, out, err) =
        tokio::task::spawn_blocking(move || monitor(&url2, &["--json", "--max", "2"]))
            .await
            .unwrap();
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("4 client connections seen, more than --max 2"),
        "{err}"
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["total"], 4);
    assert_eq!(v["fleet"], 3);
    assert_eq!(v["by_application"]["psql"], 1);

    let (code, _, _) = tokio::task::spawn_blocking(move || monitor(&url, &["--max", "10"]))
        .await
        .unwrap();
    assert_eq!(code, 0);
    drop(other);
}

#[test]
fn without_a_server_it_says_what_to_give() {
    let out = Command::new(env!("CARGO_BIN_EXE_pgfleet"))
        .arg("monitor")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("give --database-url, set DATABASE_URL, or give --config DIR"));
}

#[test]
fn it_watches_a_tls_only_server_with_verify_full() {
    let ca = pgfleet_testkit::TestCa::new("monitor test CA").unwrap();
    let tls = pgfleet_testkit::ServerTls::new(&ca, &["127.0.0.1"])
        .unwrap()
        .only();
    let cluster = TempCluster::builder().tls(tls).start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    ca.write_cert(&dir.path().join("ca.pem")).unwrap();
    let base = cluster.url("postgres");
    // A relative sslrootcert, as people write it, from the directory it is in.
    let run = |params: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_pgfleet"))
            .current_dir(dir.path())
            .arg("monitor")
            .args(["--database-url", &format!("{base}?{params}")])
            .output()
            .expect("run pgfleet monitor");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = run("sslmode=verify-full&sslrootcert=ca.pem");
    assert_eq!(code, 0, "{err}");
    // The monitor leaves its own connection out of the count.
    assert!(
        out.contains("client connections 0 of max_connections 100"),
        "{out}"
    );
    // The platform's roots (`sslrootcert=system`): here the CA is made the
    // platform's by SSL_CERT_FILE, which the platform store honours.
    let out = Command::new(env!("CARGO_BIN_EXE_pgfleet"))
        .env("SSL_CERT_FILE", dir.path().join("ca.pem"))
        .arg("monitor")
        .args([
            "--database-url",
            &format!("{base}?sslmode=verify-full&sslrootcert=system"),
        ])
        .output()
        .expect("run pgfleet monitor");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Plaintext is refused by this server, and the message says so.
    let (code, _, err) = run("sslmode=disable");
    assert_eq!(code, 1);
    assert!(err.contains("no encryption"), "{err}");
    assert!(!err.contains(TempCluster::superuser_password()), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_are_grouped_by_service_and_instance() {
    let cluster = TempCluster::start().unwrap();
    let url = cluster.url("postgres");
    // Two replicas of one service (a fleet each), 2 warm connections each.
    let mut fleets = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..2 {
        let fleet = pgfleet::Fleet::with_config(pgfleet::FleetConfig {
            budget: pgfleet::BudgetConfig {
                replicas: pgfleet::Replicas::Auto,
                service: Some("monitored-svc".into()),
                ..pgfleet::BudgetConfig::default()
            },
        })
        .unwrap();
        let handle = fleet
            .pool(
                &Target::parse(&url).unwrap(),
                &PoolConfig {
                    min_size: 2,
                    max_size: Some(4),
                    application_name: "monitored-app".into(),
                    ..PoolConfig::default()
                },
            )
            .unwrap();
        handle.wait_ready(Duration::from_secs(10)).await.unwrap();
        handles.push(handle);
        fleets.push(fleet);
    }
    let instances: Vec<String> = fleets
        .iter()
        .map(|f| {
            f.stats()
                .servers
                .into_values()
                .next()
                .and_then(|b| b.replicas)
                .unwrap()
                .instance
        })
        .collect();
    let url2 = url.clone();
    let (code, out, err) = tokio::task::spawn_blocking(move || monitor(&url2, &[]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("by service and instance (replicas: auto):"),
        "{out}"
    );
    // Each replica: its coordinator and its two pool connections.
    assert!(out.contains("      6  monitored-svc (2 replicas)"), "{out}");
    for instance in &instances {
        assert!(
            out.contains(&format!("        3    #{instance} (wants ")),
            "{out}"
        );
    }
    let url2 = url.clone();
    let (code, out, _) = tokio::task::spawn_blocking(move || monitor(&url2, &["--json"]))
        .await
        .unwrap();
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for instance in &instances {
        assert_eq!(
            v["by_replica"]["monitored-svc"][instance]["connections"], 3,
            "{v}"
        );
    }
    drop(handles);
    for fleet in fleets {
        fleet.close_all(Duration::from_secs(5)).await;
    }
}
