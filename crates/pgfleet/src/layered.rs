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
//! `docs/CONFIGURATION.md`). Every effective value remembers its source.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use yaml_rust2::{Yaml, YamlLoader};

use crate::budget::{BudgetConfig, BudgetMode};
use crate::config::{Effective, PoolConfig, PoolSettings, RawValue, Source};
use crate::error::{Error, Result};
use crate::fleet::FleetConfig;
use crate::interpolate::interpolate;
use crate::target::{mask_url_text, Target};

/// The sections that hold pool settings, lowest priority first.
pub const LAYERS: &[&[&str]] = &[
    &["postgres"],
    &["database", "postgres"],
    &["store", "database", "postgres"],
];

/// Environment variables that override target keys, applied in this order
/// after every file (`DATABASE_URL` last, so it wins).
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("POSTGRES_HOST", "host"),
    ("POSTGRES_PORT", "port"),
    ("POSTGRES_DB", "database"),
    ("POSTGRES_USER", "user"),
    ("POSTGRES_PASSWORD", "password"),
    ("DATABASE_URL", "url"),
];

/// A YAML node with the file it came from.
#[derive(Debug, Clone)]
struct Node {
    value: NodeValue,
    file: Arc<str>,
}

#[derive(Debug, Clone)]
enum NodeValue {
    Scalar(RawValue),
    Map(Vec<(String, Node)>),
    List(Vec<Node>),
}

/// Loads configuration from a directory and the environment.
#[derive(Debug, Clone)]
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
#[derive(Debug, Clone, PartialEq)]
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
            Some(section) => fleet_config(section, &env)?,
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

fn empty_map(file: &str) -> Node {
    Node {
        value: NodeValue::Map(Vec::new()),
        file: file.into(),
    }
}

fn config_error(message: String) -> Error {
    Error::config(format!("invalid configuration: {message}"))
}

/// Reads the root file and the group files and merges them.
fn read_dir(dir: &Path) -> Result<(Node, Vec<String>)> {
    if !dir.is_dir() {
        return Err(config_error(format!(
            "configuration directory {} does not exist or is not a directory",
            dir.display()
        )));
    }
    let mut files = Vec::new();
    let mut root = empty_map("config.yaml");
    let mut defaults = Defaults::default();
    let root_file = ["config.yaml", "config.yml"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file());
    if let Some(path) = &root_file {
        let name = rel(dir, path);
        root = read_yaml(path, &name)?;
        defaults = defaults_list(&mut root)?;
        files.push(name);
    }
    let mut groups: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| config_error(format!("cannot read {}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    groups.sort();
    // (position in the composition order, file name, content placed)
    let mut composed: Vec<(usize, String, Node)> = Vec::new();
    let mut seen = Vec::new();
    for group_dir in groups {
        let group = group_dir
            .file_name()
            .map(|g| g.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut options: Vec<(String, PathBuf)> = std::fs::read_dir(&group_dir)
            .map_err(|e| config_error(format!("cannot read {}: {e}", group_dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .filter_map(|p| {
                let stem = p.file_stem()?.to_string_lossy().into_owned();
                Some((stem, p))
            })
            .collect();
        options.sort();
        if options.is_empty() {
            continue;
        }
        seen.push(group.clone());
        let names: Vec<&str> = options.iter().map(|(o, _)| o.as_str()).collect();
        let choice = defaults.choices.iter().find(|c| c.group == group);
        let (position, path) = match choice {
            Some(Choice { option: None, .. }) => continue,
            Some(Choice {
                option: Some(chosen),
                position,
                ..
            }) => match options.iter().find(|(o, _)| o == chosen) {
                Some((_, path)) => (*position, path.clone()),
                None => {
                    return Err(config_error(format!(
                    "defaults in config.yaml choose `{group}: {chosen}`, but {group}/ has only {}",
                    names.join(", ")
                )))
                }
            },
            None => {
                let path = match options.iter().find(|(o, _)| o == "default") {
                    Some((_, path)) => path.clone(),
                    None if options.len() == 1 => options[0].1.clone(),
                    None => {
                        return Err(config_error(format!(
                            "{group}/ has several options ({}) and none is chosen: add `- {group}: <option>` to the defaults list of config.yaml, or name one default.yaml",
                            names.join(", ")
                        )))
                    }
                };
                // Groups not in the list come first, as if listed at its top.
                (0, path)
            }
        };
        let name = rel(dir, &path);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| config_error(format!("cannot read {}: {e}", path.display())))?;
        let content = parse_yaml(&text, &name)?;
        let global = text
            .lines()
            .next()
            .is_some_and(|l| l.trim() == "# @package _global_");
        let placed = if global {
            content
        } else {
            Node {
                value: NodeValue::Map(vec![(group.clone(), content)]),
                file: name.as_str().into(),
            }
        };
        composed.push((position, name, placed));
    }
    if let Some(missing) = defaults
        .choices
        .iter()
        .find(|c| !c.optional && c.option.is_some() && !seen.contains(&c.group))
    {
        return Err(config_error(format!(
            "defaults in config.yaml choose `{}: {}`, but there is no {}/ directory with .yaml files (mark the entry `optional` to allow that)",
            missing.group,
            missing.option.as_deref().unwrap_or_default(),
            missing.group
        )));
    }
    // Hydra's order: entries before `_self_` are overridden by config.yaml,
    // entries after it override config.yaml; without `_self_` the root
    // comes last.
    composed.push((defaults.self_position, String::new(), root));
    composed.sort_by_key(|(position, _, _)| *position);
    let mut merged = empty_map("(merged)");
    for (_, name, node) in composed {
        merge(&mut merged, node);
        if !name.is_empty() {
            files.push(name);
        }
    }
    Ok((merged, files))
}

fn rel(dir: &Path, path: &Path) -> String {
    path.strip_prefix(dir).unwrap_or(path).display().to_string()
}

fn read_yaml(path: &Path, name: &str) -> Result<Node> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| config_error(format!("cannot read {}: {e}", path.display())))?;
    parse_yaml(&text, name)
}

fn parse_yaml(text: &str, name: &str) -> Result<Node> {
    let docs = YamlLoader::load_from_str(text)
        .map_err(|e| config_error(format!("{name}: malformed YAML: {e}")))?;
    let file: Arc<str> = name.into();
    match docs.len() {
        0 => Ok(empty_map(name)),
        1 => {
            let node = convert(&docs[0], &file, name)?;
            match node.value {
                NodeValue::Map(_) => Ok(node),
                NodeValue::Scalar(RawValue::Null) => Ok(empty_map(name)),
                _ => Err(config_error(format!(
                    "{name}: the top level must be a mapping"
                ))),
            }
        }
        n => Err(config_error(format!(
            "{name}: {n} YAML documents; expected one"
        ))),
    }
}

fn convert(yaml: &Yaml, file: &Arc<str>, name: &str) -> Result<Node> {
    let value = match yaml {
        Yaml::Null => NodeValue::Scalar(RawValue::Null),
        Yaml::Boolean(b) => NodeValue::Scalar(RawValue::Bool(*b)),
        Yaml::Integer(i) => NodeValue::Scalar(RawValue::Int(*i)),
        Yaml::Real(r) => NodeValue::Scalar(
            r.parse::<f64>()
                .map(RawValue::Float)
                .unwrap_or_else(|_| RawValue::Str(r.clone())),
        ),
        Yaml::String(s) => NodeValue::Scalar(RawValue::Str(s.clone())),
        Yaml::Array(items) => NodeValue::List(
            items
                .iter()
                .map(|i| convert(i, file, name))
                .collect::<Result<_>>()?,
        ),
        Yaml::Hash(hash) => {
            let mut pairs = Vec::with_capacity(hash.len());
            for (k, v) in hash {
                let key = match k {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    Yaml::Real(r) => r.clone(),
                    other => {
                        return Err(config_error(format!(
                            "{name}: unsupported mapping key {other:?}"
                        )))
                    }
                };
                pairs.push((key, convert(v, file, name)?));
            }
            NodeValue::Map(pairs)
        }
        Yaml::Alias(_) | Yaml::BadValue => {
            return Err(config_error(format!(
                "{name}: unsupported YAML value (alias or bad value)"
            )))
        }
    };
    Ok(Node {
        value,
        file: file.clone(),
    })
}

/// The Hydra `defaults:` list of config.yaml.
#[derive(Debug, Default)]
struct Defaults {
    choices: Vec<Choice>,
    /// Where config.yaml itself goes in the composition order.
    self_position: usize,
}

/// One `- group: option` entry.
#[derive(Debug)]
struct Choice {
    group: String,
    /// `None` for `- group: null`: the group is not used.
    option: Option<String>,
    /// `- optional group: option`: no error when the group is absent.
    optional: bool,
    /// Place in the composition order (1-based; unlisted groups are 0).
    position: usize,
}

/// Takes the Hydra `defaults:` list out of the root: `- group: option`
/// (also `- optional group: option`, `- override group: option`,
/// `- group: null`) choose group files; `- _self_` places config.yaml.
fn defaults_list(root: &mut Node) -> Result<Defaults> {
    let mut defaults = Defaults {
        choices: Vec::new(),
        self_position: usize::MAX,
    };
    let NodeValue::Map(pairs) = &mut root.value else {
        return Ok(defaults);
    };
    let Some(index) = pairs.iter().position(|(k, _)| k == "defaults") else {
        return Ok(defaults);
    };
    let (_, list) = pairs.remove(index);
    let items = match list.value {
        NodeValue::List(items) => items,
        NodeValue::Scalar(RawValue::Null) => Vec::new(),
        _ => {
            return Err(config_error(format!(
                "{}: `defaults` must be a list",
                root.file
            )))
        }
    };
    for (i, item) in items.into_iter().enumerate() {
        let position = i + 1;
        let unsupported = |what: String| {
            config_error(format!(
                "{}: defaults[{i}] = {what}: expected `- group: option` or `- _self_`",
                root.file
            ))
        };
        match item.value {
            NodeValue::Scalar(RawValue::Str(s)) if s == "_self_" => {
                defaults.self_position = position;
            }
            NodeValue::Scalar(v) => return Err(unsupported(v.to_string())),
            NodeValue::List(_) => return Err(unsupported("a list".into())),
            NodeValue::Map(entry) => {
                for (key, option) in entry {
                    let mut words: Vec<&str> = key.split_whitespace().collect();
                    let group = words.pop().unwrap_or_default().to_owned();
                    let optional = words.contains(&"optional");
                    if group.is_empty()
                        || words.iter().any(|w| *w != "optional" && *w != "override")
                    {
                        return Err(unsupported(format!("{key:?}")));
                    }
                    let option = match option.value {
                        NodeValue::Scalar(RawValue::Null) => None,
                        NodeValue::Scalar(RawValue::Str(o)) => Some(o),
                        NodeValue::Scalar(v) => Some(v.to_string()),
                        _ => return Err(unsupported(format!("{key}: a list or mapping"))),
                    };
                    defaults.choices.retain(|c| c.group != group);
                    defaults.choices.push(Choice {
                        group,
                        option,
                        optional,
                        position,
                    });
                }
            }
        }
    }
    Ok(defaults)
}

/// Deep merge: mappings merge key by key, anything else is replaced.
fn merge(base: &mut Node, over: Node) {
    match (&mut base.value, over.value) {
        (NodeValue::Map(base_pairs), NodeValue::Map(over_pairs)) => {
            for (key, value) in over_pairs {
                match base_pairs.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, existing)) => merge(existing, value),
                    None => base_pairs.push((key, value)),
                }
            }
        }
        (_, value) => {
            base.value = value;
            base.file = over.file;
        }
    }
}

fn lookup<'a>(root: &'a Node, path: &[&str]) -> Option<&'a Node> {
    path.iter().try_fold(root, |node, key| match &node.value {
        NodeValue::Map(pairs) => pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v),
        _ => None,
    })
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

/// Reads the `fleet:` section: `budget` (`auto`, `off` or a number),
/// `headroom`, `replicas`, and `servers` (per `host:port` budgets).
fn fleet_config(section: &Node, env: &dyn Fn(&str) -> Option<String>) -> Result<FleetConfig> {
    let RawValue::Map(pairs) = raw(section, "fleet", env)? else {
        return Err(config_error(format!(
            "{}: `fleet` must be a mapping",
            section.file
        )));
    };
    let at = |key: &str| format!("fleet.{key} ({})", section.file);
    let whole = |key: &str, value: &RawValue, min: i64| -> Result<u32> {
        let n = match value {
            RawValue::Int(i) => Some(*i),
            RawValue::Str(s) => s.trim().parse().ok(),
            _ => None,
        };
        n.filter(|n| *n >= min && *n <= 100_000)
            .map(|n| n as u32)
            .ok_or_else(|| {
                config_error(format!(
                    "{} = {value}: expected a whole number >= {min}",
                    at(key)
                ))
            })
    };
    let mode = |key: &str, value: &RawValue| -> Result<BudgetMode> {
        match value {
            RawValue::Str(s) if s.trim() == "auto" => Ok(BudgetMode::Auto),
            RawValue::Str(s) if s.trim() == "off" => Ok(BudgetMode::Off),
            RawValue::Null => Ok(BudgetMode::Off),
            other => whole(key, other, 1).map(BudgetMode::Fixed).map_err(|_| {
                config_error(format!(
                    "{} = {other}: expected `auto`, `off` or a number >= 1",
                    at(key)
                ))
            }),
        }
    };
    let mut budget = BudgetConfig::default();
    for (key, value) in &pairs {
        match key.as_str() {
            "budget" => budget.mode = mode("budget", value)?,
            "headroom" => budget.headroom = whole("headroom", value, 0)?,
            "replicas" => budget.replicas = whole("replicas", value, 1)?,
            "servers" => {
                let RawValue::Map(servers) = value else {
                    return Err(config_error(format!(
                        "{}: expected a mapping of host:port to budgets",
                        at("servers")
                    )));
                };
                for (server, value) in servers {
                    budget
                        .servers
                        .insert(server.clone(), mode(&format!("servers.{server}"), value)?);
                }
            }
            other => {
                return Err(config_error(format!(
                "unknown key `{other}` in fleet ({}); known: budget, headroom, replicas, servers",
                section.file
            )))
            }
        }
    }
    budget.validate()?;
    Ok(FleetConfig { budget })
}
