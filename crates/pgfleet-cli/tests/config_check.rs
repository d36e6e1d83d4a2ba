//! `pgfleet config check` as a user runs it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../pgfleet/tests/fixtures")
        .join(name)
}

fn pgfleet(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgfleet"));
    cmd.args(args);
    for var in [
        "POSTGRES_HOST",
        "POSTGRES_PORT",
        "POSTGRES_DB",
        "POSTGRES_USER",
        "POSTGRES_PASSWORD",
        "DATABASE_URL",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("run pgfleet");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn valid_configuration_prints_values_with_sources_and_masks_the_password() {
    let dir = fixture("seed");
    let (code, out, err) = pgfleet(
        &["config", "check", "--config", dir.to_str().unwrap()],
        &[("POSTGRES_PASSWORD", "Very-Secret-77")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("store/pgai.yaml: store.database.postgres.pool_size"),
        "{out}"
    );
    assert!(out.contains("env POSTGRES_PASSWORD"), "{out}");
    assert!(out.contains("***"));
    assert!(
        out.contains("user default_user: memory, buffer, storage"),
        "{out}"
    );
    assert!(out.contains("configuration is valid"));
    assert!(!out.contains("Very-Secret-77") && !err.contains("Very-Secret-77"));
}

#[test]
fn json_output_is_machine_readable() {
    let dir = fixture("seed");
    let (code, out, _) = pgfleet(
        &[
            "config",
            "check",
            "--json",
            "--config",
            dir.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let min = v["effective"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == "min_size")
        .unwrap();
    assert_eq!(min["value"], "15");
    assert_eq!(min["source"]["kind"], "file");
    assert_eq!(v["warmup"][0]["max_size"], 40);
    assert_eq!(
        v["target"],
        "postgres://postgres:***@localhost:5432/memfuse"
    );
    assert_eq!(v["pool_config"]["acquire_timeout"], "45s");
    assert!(!out.contains(":postgres@"), "{out}");
}

#[test]
fn invalid_configuration_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("database")).unwrap();
    std::fs::write(
        dir.path().join("database/default.yaml"),
        "postgres:\n  pool_size: 50\n  max_size: 20\n",
    )
    .unwrap();
    let (code, out, err) = pgfleet(
        &["config", "check", "--config", dir.path().to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 2, "{out}");
    assert!(
        err.contains("min_size = 50") || err.contains("pool_size"),
        "{err}"
    );
    assert!(err.contains("database/default.yaml"), "{err}");
}

#[test]
fn without_a_directory_defaults_and_environment_are_used() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pgfleet"))
        .args(["config", "check"])
        .current_dir(dir.path())
        .env("DATABASE_URL", "postgres://app:pw@db:5433/app")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(stdout.contains("defaults and environment only"), "{stdout}");
    assert!(
        stdout.contains("postgres://app:***@db:5433/app"),
        "{stdout}"
    );
}

#[test]
fn config_keys_lists_every_key_with_aliases_defaults_and_ranges() {
    let (code, out, err) = pgfleet(&["config", "keys"], &[]);
    assert_eq!(code, 0, "{err}");
    let row = |key: &str| {
        out.lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no row for {key}: {out}"))
            .to_owned()
    };
    let min = row("min_size (pool_size)");
    assert!(min.contains(" 1 ") && min.contains("0..=10000"), "{min}");
    let timeout = row("timeout (pool_timeout, acquire_timeout)");
    assert!(
        timeout.contains("30s") && timeout.contains("7 days"),
        "{timeout}"
    );
    assert!(row("statement_cache_size").contains("256"));
    assert_eq!(out.lines().count(), pgfleet::config_keys().count() + 1);
}
