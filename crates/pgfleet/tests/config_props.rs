//! Property tests of the loader: no YAML scalar, for any key of any layer,
//! makes it panic; a rejected value is an error naming the key and the file.

use std::path::Path;

use pgfleet::Loader;
use proptest::prelude::*;

/// Every name the pool sections accept, from the library's table of keys.
fn names() -> Vec<&'static str> {
    pgfleet::config_keys()
        .flat_map(|k| std::iter::once(k.name).chain(k.aliases.iter().copied()))
        .collect()
}

/// Where a key can be written: (file, text before the key, indentation).
const PLACES: &[(&str, &str, &str)] = &[
    ("config.yaml", "postgres:\n", "  "),
    ("database/default.yaml", "postgres:\n", "  "),
    ("store/pgai.yaml", "database:\n  postgres:\n", "    "),
    (
        "config.yaml",
        "connection_pool:\n  warmup_configs:\n    -\n",
        "      ",
    ),
];

fn scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        // Plain YAML scalars as a person would type them (may be malformed
        // YAML: that must be an error too, never a panic).
        "\\PC{0,24}",
        // Anything as a double-quoted string, so it reaches the typing code.
        "\\PC{0,24}".prop_map(|s| serde_json::to_string(&s).unwrap()),
        // Numbers, durations, interpolations, specials.
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|x| format!("{x:?}")),
        prop::sample::select(vec![
            "~",
            "null",
            "off",
            "none",
            "true",
            "0",
            "-0",
            "0.0",
            "-1",
            ".inf",
            "-.inf",
            ".nan",
            "1e308",
            "99999999999999999999",
            "\"\"",
            "'250ms'",
            "30s",
            "0s",
            "8d",
            "31d",
            "[]",
            "{}",
            "[1, 2]",
            "{a: 1}",
            "{work_mem: 64MB}",
            "{Bad: 1}",
            "${oc.env:X,5}",
            "${X}",
            "${",
            "${oc.env:}",
            "${foo:bar}",
            "\\${x}",
            "postgres://u:p@h:5432/d?max_size=3",
            "postgres://u@h:0/d",
            "&a [1]",
            "*a",
        ])
        .prop_map(str::to_owned),
    ]
}

fn write(dir: &Path, file: &str, text: &str) {
    let path = dir.join(file);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_scalar_for_any_key_loads_or_fails_cleanly(
        key in prop::sample::select(names()),
        place in prop::sample::select(PLACES),
        value in scalar(),
    ) {
        let (file, head, indent) = place;
        let dir = tempfile::tempdir().unwrap();
        let text = format!("{head}{indent}{key}: {value}\n");
        write(dir.path(), file, &text);
        match Loader::new(dir.path()).env([("X", "7")]).load() {
            Ok(loaded) => {
                // A loaded configuration is valid and explains itself.
                prop_assert!(loaded.pool_config().validate().is_ok());
                prop_assert!(!loaded.explain().is_empty());
            }
            Err(err) => {
                prop_assert!(err.is_config());
                let msg = err.to_string();
                prop_assert!(msg.contains(file), "{} -> {}", text, msg);
            }
        }
    }
}
