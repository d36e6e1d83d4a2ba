//! `connection_pool.precache_configs`, read through pgfleet's layered
//! loader as a key the memory service declares its own.

use std::path::Path;

use pgfleet::Loader;
use pgfleet_memory::precache;

fn load(yaml: &str) -> Result<Vec<pgfleet_memory::PrecacheEntry>, String> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.yaml"), yaml).unwrap();
    let loaded = precache::declare(Loader::new(dir.path()))
        .env(Vec::<(String, String)>::new())
        .load()
        .map_err(|e| e.to_string())?;
    precache::entries(&loaded).map_err(|e| e.to_string())
}

#[test]
fn the_seed_file_lists_default_user_with_all_three_services() {
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pgfleet/tests/fixtures/seed");
    let loaded = precache::declare(Loader::new(seed))
        .env(Vec::<(String, String)>::new())
        .load()
        .unwrap();
    let entries = precache::entries(&loaded).unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].user, "default_user");
    assert_eq!(entries[0].services, ["memory", "buffer", "storage"]);
}

#[test]
fn services_default_to_all_three_and_strings_are_interpolated() {
    let entries = load(
        "connection_pool:\n  precache_configs:\n    - user: ${oc.env:NO_SUCH_VAR,alice}\n    - user: bob\n      services: [memory]\n",
    )
    .unwrap();
    assert_eq!(entries[0].user, "alice");
    assert_eq!(entries[0].services, ["memory", "buffer", "storage"]);
    assert_eq!(entries[1].services, ["memory"]);
    assert!(load("postgres:\n  host: h\n").unwrap().is_empty());
}

#[test]
fn bad_entries_name_the_field_the_value_and_the_file() {
    for (yaml, needle) in [
        (
            "connection_pool:\n  precache_configs:\n    - services: [memory]\n",
            "connection_pool.precache_configs[0]: `user` is missing (config.yaml)",
        ),
        (
            "connection_pool:\n  precache_configs:\n    - user: a\n      services: [memory, cache]\n",
            "connection_pool.precache_configs[0].services[1] = \"cache\": expected one of memory, buffer, storage (config.yaml)",
        ),
        (
            "connection_pool:\n  precache_configs:\n    - user: ''\n",
            "connection_pool.precache_configs[0].user = \"\": expected a non-empty user id",
        ),
        (
            "connection_pool:\n  precache_configs:\n    - user: a\n      colour: blue\n",
            "unknown key `colour` in connection_pool.precache_configs[0]; known: user, services",
        ),
        (
            "connection_pool:\n  precache_configs: alice\n",
            "connection_pool.precache_configs = \"alice\": expected a list",
        ),
    ] {
        let err = load(yaml).unwrap_err();
        assert!(err.contains(needle), "{yaml}\n  got: {err}\n  want: {needle}");
    }
}
