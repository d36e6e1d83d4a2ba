//! `pgfleet demo` against a throwaway cluster: per-store pools really hit
//! "too many clients"; the fleet does not.

use std::process::Command;

#[test]
fn naive_stores_hit_too_many_clients_and_the_fleet_holds() {
    let out = Command::new(env!("CARGO_BIN_EXE_pgfleet"))
        .args([
            "demo",
            "--compare",
            "--users",
            "12",
            "--rounds",
            "3",
            "--max-connections",
            "20",
        ])
        .args(["--timeout", "3", "--json", "-"])
        .env_remove("DATABASE_URL")
        .output()
        .expect("run pgfleet demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("starting a throwaway PostgreSQL cluster"),
        "{stderr}"
    );
    assert!(stderr.contains("too-many-clients"), "the table: {stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON on stdout");
    let runs = report["runs"].as_array().unwrap();
    let (naive, fleet) = (&runs[0], &runs[1]);
    assert_eq!(naive["mode"], "naive");
    assert_eq!(naive["pools"], 36, "one pool per store");
    assert!(naive["too_many_clients"].as_u64().unwrap() > 0, "{naive}");
    assert!(naive["failed"].as_u64().unwrap() > 0, "{naive}");
    assert!(
        naive["first_error"]
            .as_str()
            .unwrap()
            .contains("too many clients"),
        "{naive}"
    );
    assert_eq!(fleet["mode"], "fleet");
    assert_eq!(fleet["pools"], 1);
    assert_eq!(fleet["failed"], 0, "{fleet}");
    assert_eq!(fleet["too_many_clients"], 0, "{fleet}");
    assert_eq!(fleet["ok"], fleet["requests"]);
    let budget = fleet["budget"].as_u64().unwrap();
    assert_eq!(budget, 14, "(20 - 3 reserved - 3 headroom)");
    assert!(
        fleet["peak_server_connections"].as_u64().unwrap() <= budget,
        "{fleet}"
    );
}

#[test]
fn replica_processes_with_a_fixed_count_are_refused_and_with_auto_they_split_the_server() {
    let out = Command::new(env!("CARGO_BIN_EXE_pgfleet"))
        .args(["demo", "--replicas", "3", "--seconds", "5", "--json", "-"])
        .env_remove("DATABASE_URL")
        .output()
        .expect("run pgfleet demo --replicas");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("too-many-clients"), "the table: {stderr}");
    let runs: serde_json::Value = serde_json::from_str(&stdout).expect("JSON on stdout");
    let (fixed, auto) = (&runs[0], &runs[1]);
    // max_connections 30: 27 for clients, a budget of 24 after headroom.
    assert_eq!(fixed["replicas_setting"], "1");
    assert_eq!(fixed["budget"], 24, "{fixed}");
    assert!(
        fixed["too_many_clients"].as_u64().unwrap() > 0,
        "three replicas each taking 20 of 27 slots: {fixed}"
    );
    assert_eq!(auto["replicas_setting"], "auto");
    assert_eq!(auto["too_many_clients"], 0, "{auto}");
    assert_eq!(auto["failed"], 0, "{auto}");
    assert!(auto["ok"].as_u64().unwrap() > 0, "{auto}");
    assert!(
        auto["peak_server_connections"].as_u64().unwrap() <= 24,
        "{auto}"
    );
    assert!(auto["jain"].as_f64().unwrap() >= 0.95, "{auto}");
}
