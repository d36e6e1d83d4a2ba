//! Layered configuration: the seed's files load unchanged, layers and
//! environment override in order, every value knows its source, and every
//! invalid input is a clear error naming key, value and file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pgfleet::{Loader, Source};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn no_env() -> Vec<(String, String)> {
    Vec::new()
}

fn source_of(loaded: &pgfleet::Loaded, key: &str) -> String {
    loaded
        .explain()
        .iter()
        .find(|e| e.key == key)
        .unwrap_or_else(|| panic!("no {key}"))
        .source
        .to_string()
}

#[test]
fn seed_files_load_unchanged_with_store_layer_winning() {
    let loaded = Loader::new(fixture("seed"))
        .application_key("precache_configs")
        .env(no_env())
        .load()
        .unwrap();
    let t = loaded.target();
    assert_eq!(t.key(), "postgres://postgres@localhost:5432/memfuse");
    assert!(t.has_password());
    let c = loaded.pool_config();
    assert_eq!((c.min_size, c.effective_max_size()), (15, 40));
    assert_eq!(c.acquire_timeout, Duration::from_secs(45));
    assert_eq!(c.max_lifetime, Some(Duration::from_secs(3600)));
    assert_eq!(
        source_of(&loaded, "min_size"),
        "store/pgai.yaml: store.database.postgres.pool_size"
    );
    assert_eq!(
        source_of(&loaded, "max_size"),
        "store/pgai.yaml: store.database.postgres.max_overflow"
    );
    assert_eq!(
        source_of(&loaded, "timeout"),
        "store/pgai.yaml: store.database.postgres.pool_timeout"
    );
    assert_eq!(
        source_of(&loaded, "max_lifetime"),
        "database/default.yaml: database.postgres.pool_recycle"
    );
    assert_eq!(
        source_of(&loaded, "host"),
        "database/default.yaml: database.postgres.host"
    );
    for key in ["port", "database", "user", "password"] {
        assert_eq!(
            source_of(&loaded, key),
            format!("database/default.yaml: database.postgres.{key}")
        );
    }
    assert_eq!(source_of(&loaded, "idle_timeout"), "default");
    assert_eq!(
        loaded.files(),
        ["config.yaml", "database/default.yaml", "store/pgai.yaml"]
    );
    // Seed 004's connection_pool block.
    assert_eq!(loaded.warmup().len(), 1);
    assert_eq!(
        loaded.warmup()[0].target.key(),
        "postgres://postgres@localhost:5432/memfuse"
    );
    assert_eq!(
        loaded.warmup()[0].config.effective_max_size(),
        40,
        "warm-up entries inherit the pool settings"
    );
    // The application's own key, handed over as written (the memory
    // service reads it: pgfleet-memory's tests).
    let precache = loaded.application_value("precache_configs").unwrap();
    assert_eq!(precache.path, "connection_pool.precache_configs");
    assert_eq!(precache.file, "config.yaml");
    assert!(matches!(&precache.value, pgfleet::RawValue::List(items) if items.len() == 1));
}

#[test]
fn application_keys_must_be_declared() {
    let err = Loader::new(fixture("seed"))
        .env(no_env())
        .load()
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("unknown key `precache_configs` in connection_pool"),
        "{err}"
    );
}

#[test]
fn seed_small_example_gives_pool_size_plus_overflow() {
    let loaded = Loader::new(fixture("seed_small"))
        .env(no_env())
        .load()
        .unwrap();
    let c = loaded.pool_config();
    assert_eq!((c.min_size, c.effective_max_size()), (10, 30));
    assert_eq!(c.acquire_timeout, Duration::from_secs(30));
}

#[test]
fn environment_overrides_files_and_database_url_wins() {
    let secret = "s3cr3t-xyz";
    let loaded = Loader::new(fixture("seed"))
        .application_key("precache_configs")
        .env([
            ("POSTGRES_HOST", "db.internal"),
            ("POSTGRES_PASSWORD", secret),
            ("POSTGRES_PORT", "6543"),
        ])
        .load()
        .unwrap();
    assert_eq!(
        loaded.target().key(),
        "postgres://postgres@db.internal:6543/memfuse"
    );
    assert_eq!(source_of(&loaded, "host"), "env POSTGRES_HOST");
    assert_eq!(source_of(&loaded, "port"), "env POSTGRES_PORT");
    let shown = serde_json::to_string(loaded.explain()).unwrap()
        + &serde_json::to_string(loaded.pool_config()).unwrap()
        + &format!("{:?}", loaded.explain());
    assert!(!shown.contains(secret), "{shown}");
    assert!(shown.contains("***"));

    let loaded = Loader::new(fixture("seed"))
        .application_key("precache_configs")
        .env([
            ("POSTGRES_HOST", "db.internal"),
            ("DATABASE_URL", "postgresql://app:pw@primary:5433/app"),
        ])
        .load()
        .unwrap();
    assert_eq!(loaded.target().key(), "postgres://app@primary:5433/app");
    assert_eq!(source_of(&loaded, "host"), "url from env DATABASE_URL");
    assert_eq!(source_of(&loaded, "url"), "env DATABASE_URL");
}

#[test]
fn interpolation_reads_the_injected_environment() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "config.yaml", "postgres:\n  host: ${DBHOST}\n  database: ${oc.env:DBNAME,fallback}\n  application_name: app-${oc.env:REPLICA,0}\n");
    let loaded = Loader::new(dir.path())
        .env([("DBHOST", "h1")])
        .load()
        .unwrap();
    assert_eq!(
        loaded.target().key(),
        "postgres://postgres@h1:5432/fallback"
    );
    assert_eq!(loaded.pool_config().application_name, "app-0");
}

#[test]
fn without_files_defaults_and_environment_apply() {
    let loaded = Loader::without_files()
        .env([("POSTGRES_DB", "x")])
        .load()
        .unwrap();
    assert_eq!(
        loaded.target().key(),
        "postgres://postgres@localhost:5432/x"
    );
    // The defaults, resolved: the cap in force is explicit.
    assert_eq!(
        loaded.pool_config(),
        &pgfleet::PoolConfig {
            max_size: Some(10),
            ..pgfleet::PoolConfig::default()
        }
    );
    assert!(loaded
        .explain()
        .iter()
        .any(|e| e.key == "min_size" && e.source == Source::Default));
}

fn write(dir: &Path, file: &str, text: &str) {
    let path = dir.join(file);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// Loads a one-file configuration and returns the error message.
fn error_for(file: &str, text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), file, text);
    let err = Loader::new(dir.path()).env(no_env()).load().unwrap_err();
    assert!(err.is_config(), "{err:?}");
    err.to_string()
}

#[test]
fn every_invalid_configuration_names_key_value_and_file() {
    for (file, text, needles) in [
        (
            "database/default.yaml",
            "postgres:\n  max_sise: 3\n",
            &[
                "unknown key `max_sise`",
                "database/default.yaml",
                "did you mean `max_size`",
            ][..],
        ),
        (
            "database/default.yaml",
            "postgres:\n  min_size: 50\n  max_size: 20\n",
            &["min_size = 50", "max_size = 20", "database/default.yaml"][..],
        ),
        (
            "config.yaml",
            "postgres:\n  max_size: ~\n",
            &["max_size = null", "expected a whole number in 1..=10000"][..],
        ),
        (
            "config.yaml",
            "postgres:\n  max_size: 0\n",
            &["max_size = 0", "config.yaml: postgres.max_size"][..],
        ),
        (
            "config.yaml",
            "postgres:\n  pool_timeout: 0\n",
            &["pool_timeout = 0", "greater than zero"][..],
        ),
        (
            "config.yaml",
            "postgres:\n  pool_timeout: -5\n",
            &["pool_timeout = -5", "negative"][..],
        ),
        (
            "config.yaml",
            "postgres:\n  connect_timeout: 99999999\n",
            &["connect_timeout = 99999999", "check the unit"][..],
        ),
        (
            "config.yaml",
            "postgres:\n  port: fivefour\n",
            &["port = \"fivefour\"", "config.yaml"][..],
        ),
        (
            "config.yaml",
            "postgres:\n  url: 'postgres://u:pw@h:x/d'\n",
            &["port \"x\" is not a number", "config.yaml: postgres.url"][..],
        ),
        (
            "config.yaml",
            "postgres:\n  host: ${oc.env:HOST\n",
            &["unterminated", "postgres.host", "config.yaml"][..],
        ),
        (
            "config.yaml",
            "postgres:\n  host: ${NOT_SET_ANYWHERE}\n",
            &["NOT_SET_ANYWHERE is not set", "postgres.host"][..],
        ),
        (
            "config.yaml",
            "postgres: [1, 2]\n",
            &["`postgres` must be a mapping"][..],
        ),
        (
            "config.yaml",
            "postgres:\n  host: [unclosed\n",
            &["config.yaml: malformed YAML"][..],
        ),
        (
            "config.yaml",
            "connection_pool:\n  warmup_config: []\n",
            &["unknown key `warmup_config`"][..],
        ),
        (
            "config.yaml",
            "connection_pool:\n  warmup_configs:\n    - host: h\n      max_size: none\n",
            &["connection_pool.warmup_configs[0].max_size"][..],
        ),
    ] {
        let msg = error_for(file, text);
        for needle in needles {
            assert!(
                msg.contains(needle),
                "{text:?}\n  message: {msg}\n  missing: {needle}"
            );
        }
    }
}

#[test]
fn password_in_a_bad_value_is_never_echoed() {
    let msg = error_for("config.yaml", "postgres:\n  password: [Hunter2-Secret]\n");
    assert!(msg.contains("password = ***"), "{msg}");
    assert!(!msg.contains("Hunter2"), "{msg}");
    let msg = error_for(
        "config.yaml",
        "postgres:\n  url: 'postgres://u:Hunter2-Secret@h:99999/d'\n",
    );
    assert!(!msg.contains("Hunter2"), "{msg}");
}

#[test]
fn group_options_are_chosen_by_the_defaults_list() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "config.yaml",
        "defaults:\n  - store: pgai\n  - _self_\n",
    );
    write(
        dir.path(),
        "store/pgai.yaml",
        "database:\n  postgres:\n    pool_size: 7\n",
    );
    write(
        dir.path(),
        "store/other.yaml",
        "database:\n  postgres:\n    pool_size: 2\n",
    );
    let loaded = Loader::new(dir.path()).env(no_env()).load().unwrap();
    assert_eq!(loaded.pool_config().min_size, 7);
    // Without a choice, several options are an error listing them.
    write(dir.path(), "config.yaml", "postgres: {}\n");
    let err = Loader::new(dir.path()).env(no_env()).load().unwrap_err();
    assert!(
        err.to_string().contains("several options (other, pgai)"),
        "{err}"
    );
}

#[test]
fn a_missing_directory_is_a_clear_error() {
    let err = Loader::new("/nonexistent/pgfleet-config")
        .load()
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("/nonexistent/pgfleet-config does not exist"),
        "{err}"
    );
}

#[test]
fn fleet_section_sets_server_budgets() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "config.yaml",
        "fleet:\n  budget: auto\n  headroom: 5\n  replicas: ${oc.env:REPLICAS,1}\n  servers:\n    \"db:5432\": 40\n    \"other:5432\": off\n",
    );
    let loaded = Loader::new(dir.path())
        .env([("REPLICAS", "4")])
        .load()
        .unwrap();
    let b = &loaded.fleet_config().budget;
    assert_eq!(
        (b.mode, b.headroom, b.replicas),
        (pgfleet::BudgetMode::Auto, 5, pgfleet::Replicas::Fixed(4))
    );
    assert_eq!(b.mode_for("db:5432"), pgfleet::BudgetMode::Fixed(40));
    assert_eq!(b.mode_for("other:5432"), pgfleet::BudgetMode::Off);
    assert_eq!(b.mode_for("elsewhere:5432"), pgfleet::BudgetMode::Auto);
    for (text, needle) in [
        (
            "fleet:\n  replicas: 0\n",
            "fleet.replicas (config.yaml) = 0",
        ),
        (
            "fleet:\n  budget: lots\n",
            "fleet.budget (config.yaml) = \"lots\": expected `auto`, `off` or a number",
        ),
        ("fleet:\n  budgets: 3\n", "unknown key `budgets` in fleet"),
    ] {
        let msg = error_for("config.yaml", text);
        assert!(msg.contains(needle), "{text}: {msg}");
    }
}

#[test]
fn database_url_query_carries_pool_keys_at_its_layer() {
    let loaded = Loader::new(fixture("seed"))
        .application_key("precache_configs")
        .env([(
            "DATABASE_URL",
            "postgres://app:pw@primary/app?pool_size=4&max_overflow=2&pool_timeout=250ms",
        )])
        .load()
        .unwrap();
    let c = loaded.pool_config();
    assert_eq!((c.min_size, c.effective_max_size()), (4, 6));
    assert_eq!(c.acquire_timeout, Duration::from_millis(250));
    assert_eq!(source_of(&loaded, "min_size"), "url from env DATABASE_URL");
    // Keys the URL does not carry keep their file values.
    assert_eq!(
        source_of(&loaded, "max_lifetime"),
        "database/default.yaml: database.postgres.pool_recycle"
    );
    let err = Loader::without_files()
        .env([(
            "DATABASE_URL",
            "postgres://app:pw@primary/app?pool_size=lots",
        )])
        .load()
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("pool_size = \"lots\" (url from env DATABASE_URL)"),
        "{err}"
    );
}

#[test]
fn from_env_is_defaults_plus_the_given_variables() {
    let loaded = pgfleet::Loaded::from_env([("POSTGRES_HOST", "db.internal")]).unwrap();
    assert_eq!(
        loaded.target().key(),
        "postgres://postgres@db.internal:5432/postgres"
    );
    assert!(loaded.files().is_empty());
    let err = pgfleet::Loaded::from_env([("POSTGRES_PORT", "0")]).unwrap_err();
    assert!(
        err.to_string().contains("port = \"0\" (env POSTGRES_PORT)"),
        "{err}"
    );
}

#[test]
fn interpolation_errors_never_show_a_default_password() {
    let msg = error_for(
        "database/default.yaml",
        "postgres:\n  password: ${oc.env:POSTGRES_PASSWORD,Tulip-Secret-4\n",
    );
    assert!(msg.contains("database.postgres.password = ***"), "{msg}");
    assert!(msg.contains("unterminated"), "{msg}");
    assert!(!msg.contains("Tulip"), "{msg}");
    let msg = error_for(
        "config.yaml",
        "postgres:\n  url: postgres://u:Tulip-Secret-4@h/${oc.env:DB\n",
    );
    assert!(msg.contains("postgres://u:***@h/"), "{msg}");
    assert!(!msg.contains("Tulip"), "{msg}");
}

#[test]
fn defaults_list_follows_hydra() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "database/default.yaml",
        "postgres:\n  pool_size: 3\n",
    );
    write(
        dir.path(),
        "store/pgai.yaml",
        "database:\n  postgres:\n    pool_size: 7\n",
    );
    // config.yaml itself also sets database.postgres.pool_size.
    let root = |defaults: &str| format!("{defaults}database:\n  postgres:\n    pool_size: 5\n");
    let min_size = |dir: &Path| {
        Loader::new(dir)
            .env(no_env())
            .load()
            .map(|l| l.pool_config().min_size)
    };
    write(dir.path(), "config.yaml", &root(""));
    assert_eq!(min_size(dir.path()).unwrap(), 7, "root over database/");
    write(
        dir.path(),
        "config.yaml",
        &root("defaults:\n  - _self_\n  - database: default\n  - store: null\n"),
    );
    assert_eq!(
        min_size(dir.path()).unwrap(),
        3,
        "after _self_, database/ wins; store is off"
    );
    write(
        dir.path(),
        "config.yaml",
        &root("defaults:\n  - optional cache: redis\n  - override store: pgai\n"),
    );
    assert_eq!(min_size(dir.path()).unwrap(), 7);
    for (defaults, needle) in [
        ("defaults:\n  - cache: redis\n", "no cache/ directory"),
        ("defaults:\n  - store: other\n", "store/ has only pgai"),
        (
            "defaults:\n  - base_config\n",
            "defaults[0] = \"base_config\"",
        ),
        ("defaults: nope\n", "`defaults` must be a list"),
    ] {
        write(dir.path(), "config.yaml", &root(defaults));
        let msg = min_size(dir.path()).unwrap_err().to_string();
        assert!(msg.contains(needle), "{defaults}: {msg}");
    }
}

#[test]
fn a_global_package_file_is_merged_at_the_root() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "db/local.yaml",
        "# @package _global_\npostgres:\n  host: from-global\n",
    );
    let loaded = Loader::new(dir.path()).env(no_env()).load().unwrap();
    assert_eq!(source_of(&loaded, "host"), "db/local.yaml: postgres.host");
}
