//! Layered configuration from a Hydra-style directory of YAML files.
//!
//! ```text
//! config/
//!   config.yaml            # optional root: top-level keys, `defaults:`, `connection_pool:`
//!   database/default.yaml  # placed under `database:`  -> database.postgres.*
//!   store/pgai.yaml        # placed under `store:`     -> store.database.postgres.*
//! ```
//!
//! Pool settings are read from three sections, lowest to highest:
//! `postgres.*` < `database.postgres.*` < `store.database.postgres.*`, then
//! the environment: `POSTGRES_HOST`, `POSTGRES_PORT`, `POSTGRES_DB`,
//! `POSTGRES_USER`, `POSTGRES_PASSWORD`, and last `DATABASE_URL`. String
//! values are interpolated first (see the interpolation rules in
//! the configuration reference). Every effective value remembers its source.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use super::fleet::FleetConfig;
use super::interpolate::interpolate;
use super::pool::PoolConfig;
use super::settings::{Effective, PoolSettings};
use super::value::{RawValue, Source};
use super::yaml::{config_error, empty_map, lookup, read_dir, Node, NodeValue};
use crate::address::{mask_url_text, Target};
use crate::error::Result;

/// The sections that hold pool settings, lowest priority first.
pub(crate) const LAYERS: &[&[&str]] = &[
    &["postgres"],
    &["database", "postgres"],
    &["store", "database", "postgres"],
];

/// Environment variables that override target keys, applied in this order
/// after every file (`DATABASE_URL` last, so it wins).
pub(crate) const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("POSTGRES_HOST", "host"),
    ("POSTGRES_PORT", "port"),
    ("POSTGRES_DB", "database"),
    ("POSTGRES_USER", "user"),
    ("POSTGRES_PASSWORD", "password"),
    ("DATABASE_URL", "url"),
];

/// Loads configuration from a directory and the environment.
///
/// `Debug` lists the names of injected environment variables, never their
/// values.
#[derive(Clone)]
pub struct Loader {
    dir: Option<PathBuf>,
    env: Option<BTreeMap<String, String>>,
    /// Keys of `connection_pool` that belong to the application.
    application_keys: Vec<String>,
}

/// The result of loading: the effective target and pool configuration, the
/// warm-up list, the application's own keys, and where every value came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    files: Vec<String>,
    settings: PoolSettings,
    target: Target,
    config: PoolConfig,
    effective: Vec<Effective>,
    warmup: Vec<WarmupEntry>,
    application: Vec<ApplicationValue>,
    fleet: FleetConfig,
}

/// One pool to create and warm at start-up (`connection_pool.warmup_configs`).
/// Entries inherit the effective settings and override them with their own
/// keys.
#[derive(Debug, Clone)]
pub struct WarmupEntry {
    /// The database.
    pub target: Target,
    /// Its pool configuration.
    pub config: PoolConfig,
}

/// A value under `connection_pool` that the application declared its own
/// with [`Loader::application_key`] (e.g. the memory service's
/// `precache_configs`): interpolated, otherwise as written.
///
/// Its strings may have been interpolated from the environment (a
/// password, say), so `Debug` shows where it came from and its shape, not
/// its content; read `value` to see that.
#[derive(Clone, PartialEq)]
pub struct ApplicationValue {
    /// The key inside `connection_pool`.
    pub key: String,
    /// Its dotted path, e.g. `connection_pool.precache_configs`.
    pub path: String,
    /// The file it came from, relative to the configuration directory.
    pub file: String,
    /// The value, its strings interpolated.
    pub value: RawValue,
}

impl fmt::Debug for ApplicationValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shape = match &self.value {
            RawValue::List(items) => format!("a list of {}", items.len()),
            RawValue::Map(pairs) => format!("a mapping of {} keys", pairs.len()),
            RawValue::Str(_) => "a string".to_owned(),
            other => other.to_string(),
        };
        f.debug_struct("ApplicationValue")
            .field("key", &self.key)
            .field("path", &self.path)
            .field("file", &self.file)
            .field("value", &format_args!("{shape}"))
            .finish()
    }
}

impl fmt::Debug for Loader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Loader")
            .field("dir", &self.dir)
            .field(
                "env",
                &self
                    .env
                    .as_ref()
                    .map(|vars| vars.keys().collect::<Vec<_>>()),
            )
            .field("application_keys", &self.application_keys)
            .finish()
    }
}

impl Loader {
    /// A loader for a configuration directory, reading the process
    /// environment.
    pub fn new(dir: impl Into<PathBuf>) -> Loader {
        Loader {
            dir: Some(dir.into()),
            env: None,
            application_keys: Vec::new(),
        }
    }

    /// A loader with no files: defaults plus the environment.
    pub fn without_files() -> Loader {
        Loader {
            dir: None,
            env: None,
            application_keys: Vec::new(),
        }
    }

    /// Uses these variables instead of the process environment (tests, or
    /// a service that wants to control what is read).
    pub fn env<I, K, V>(mut self, vars: I) -> Loader
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        self.env = Some(
            vars.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        );
        self
    }

    /// Declares a key of the `connection_pool` section as the application's
    /// own (the seed's `precache_configs`, say): pgfleet accepts it instead
    /// of reporting an unknown key, interpolates its strings, and hands it
    /// over through [`Loaded::application_value`] for the application to
    /// read and check.
    pub fn application_key(mut self, key: impl Into<String>) -> Loader {
        self.application_keys.push(key.into());
        self
    }

    fn var(&self, name: &str) -> Option<String> {
        match &self.env {
            Some(map) => map.get(name).cloned(),
            None => std::env::var(name).ok(),
        }
    }

    /// Reads the files and the environment and resolves everything.
    ///
    /// # Errors
    /// A `Config` error naming the key, the value and the file (or variable)
    /// for anything invalid: unreadable or malformed YAML, unknown keys,
    /// bad values, failed interpolation, conflicts between keys.
    pub fn load(&self) -> Result<Loaded> {
        let env = |name: &str| self.var(name);
        let (root, files) = match &self.dir {
            Some(dir) => read_dir(dir)?,
            None => (empty_map("(none)"), Vec::new()),
        };
        let mut settings = PoolSettings::new();
        for layer in LAYERS {
            if let Some(section) = lookup(&root, layer) {
                apply_section(&mut settings, section, &layer.join("."), &env)?;
            }
        }
        for (var, key) in ENV_OVERRIDES {
            if let Some(value) = self.var(var).filter(|v| !v.is_empty()) {
                settings.set(
                    key,
                    &RawValue::Str(value),
                    Source::Env {
                        var: (*var).to_owned(),
                    },
                )?;
            }
        }
        let (target, config) = settings.resolve()?;
        let effective = settings.explain()?;
        let (warmup, application) = match lookup(&root, &["connection_pool"]) {
            Some(block) => startup(block, &settings, &self.application_keys, &env)?,
            None => (Vec::new(), Vec::new()),
        };
        let fleet = match lookup(&root, &["fleet"]) {
            Some(section) => FleetConfig::from_raw(&raw(section, "fleet", &env)?, &section.file)?,
            None => FleetConfig::default(),
        };
        Ok(Loaded {
            files,
            settings,
            target,
            config,
            effective,
            warmup,
            application,
            fleet,
        })
    }
}

impl Loaded {
    /// Defaults plus these environment variables, for when there is no
    /// configuration directory at all; the same as
    /// `Loader::without_files().env(vars).load()`.
    ///
    /// # Errors
    /// As [`Loader::load`], naming the variable for a bad value.
    pub fn from_env<I, K, V>(vars: I) -> Result<Loaded>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Loader::without_files().env(vars).load()
    }

    /// The effective target.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The effective pool configuration.
    pub fn pool_config(&self) -> &PoolConfig {
        &self.config
    }

    /// The merged settings, for further layering in code.
    pub fn settings(&self) -> &PoolSettings {
        &self.settings
    }

    /// Every effective value with its source (passwords as `***`).
    pub fn explain(&self) -> &[Effective] {
        &self.effective
    }

    /// Pools to warm at start-up.
    pub fn warmup(&self) -> &[WarmupEntry] {
        &self.warmup
    }

    /// The value of an application key of `connection_pool` (see
    /// [`Loader::application_key`]), if the files set it.
    pub fn application_value(&self, key: &str) -> Option<&ApplicationValue> {
        self.application.iter().find(|v| v.key == key)
    }

    /// Fleet-wide settings (the `fleet:` section): server budgets.
    pub fn fleet_config(&self) -> &FleetConfig {
        &self.fleet
    }

    /// The files read, relative to the configuration directory.
    pub fn files(&self) -> &[String] {
        &self.files
    }
}

/// A value as written, for an error message: a password as `***`, the
/// password inside a URL masked.
fn shown_template(path: &str, text: &str) -> String {
    let key = path.rsplit('.').next().unwrap_or(path);
    match key {
        "password" => "***".to_owned(),
        "url" | "database_url" => format!("{:?}", mask_url_text(text)),
        _ => format!("{text:?}"),
    }
}

/// Converts a node to a raw value, interpolating strings.
fn raw(node: &Node, path: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<RawValue> {
    Ok(match &node.value {
        NodeValue::Scalar(RawValue::Str(s)) => {
            RawValue::Str(interpolate(s, env).map_err(|why| {
                config_error(format!(
                    "{path} = {} ({}: {path}): {why}",
                    shown_template(path, s),
                    node.file
                ))
            })?)
        }
        NodeValue::Scalar(v) => v.clone(),
        NodeValue::Map(pairs) => RawValue::Map(
            pairs
                .iter()
                .map(|(k, v)| Ok((k.clone(), raw(v, &format!("{path}.{k}"), env)?)))
                .collect::<Result<_>>()?,
        ),
        NodeValue::List(items) => RawValue::List(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| raw(v, &format!("{path}[{i}]"), env))
                .collect::<Result<_>>()?,
        ),
    })
}

fn apply_section(
    settings: &mut PoolSettings,
    section: &Node,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<()> {
    let NodeValue::Map(pairs) = &section.value else {
        if matches!(section.value, NodeValue::Scalar(RawValue::Null)) {
            return Ok(());
        }
        return Err(config_error(format!(
            "{}: `{path}` must be a mapping",
            section.file
        )));
    };
    for (key, node) in pairs {
        let key_path = format!("{path}.{key}");
        let value = raw(node, &key_path, env)?;
        settings.set(
            key,
            &value,
            Source::File {
                path: node.file.to_string(),
                key: key_path,
            },
        )?;
    }
    Ok(())
}

fn startup(
    block: &Node,
    base: &PoolSettings,
    application_keys: &[String],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Vec<WarmupEntry>, Vec<ApplicationValue>)> {
    let NodeValue::Map(pairs) = &block.value else {
        return Err(config_error(format!(
            "{}: `connection_pool` must be a mapping",
            block.file
        )));
    };
    let mut warmup = Vec::new();
    let mut application = Vec::new();
    for (key, node) in pairs {
        let path = format!("connection_pool.{key}");
        if application_keys.iter().any(|k| k == key) {
            application.push(ApplicationValue {
                key: key.clone(),
                value: raw(node, &path, env)?,
                path,
                file: node.file.to_string(),
            });
            continue;
        }
        if key != "warmup_configs" {
            let known: Vec<&str> = std::iter::once("warmup_configs")
                .chain(application_keys.iter().map(String::as_str))
                .collect();
            return Err(config_error(format!(
                "unknown key `{key}` in connection_pool ({}); known: {} (an application declares its own keys with Loader::application_key)",
                node.file,
                known.join(", ")
            )));
        }
        let items = match &node.value {
            NodeValue::List(items) => items.as_slice(),
            NodeValue::Scalar(RawValue::Null) => &[],
            _ => {
                return Err(config_error(format!(
                    "{path} ({}): expected a list",
                    node.file
                )))
            }
        };
        for (i, item) in items.iter().enumerate() {
            let mut settings = base.clone();
            apply_section(&mut settings, item, &format!("{path}[{i}]"), env)?;
            let (target, config) = settings.resolve()?;
            warmup.push(WarmupEntry { target, config });
        }
    }
    Ok((warmup, application))
}
