//! Reading a Hydra-style configuration directory into one merged tree of
//! YAML nodes, each remembering the file it came from: the root file, the
//! group files chosen by the `defaults:` list, composed in Hydra's order.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use yaml_rust2::{Yaml, YamlLoader};

use super::value::RawValue;
use crate::error::{Error, Result};

/// A YAML node with the file it came from.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) value: NodeValue,
    pub(crate) file: Arc<str>,
}

#[derive(Debug, Clone)]
pub(crate) enum NodeValue {
    Scalar(RawValue),
    Map(Vec<(String, Node)>),
    List(Vec<Node>),
}

pub(crate) fn empty_map(file: &str) -> Node {
    Node {
        value: NodeValue::Map(Vec::new()),
        file: file.into(),
    }
}

pub(crate) fn config_error(message: String) -> Error {
    Error::config(format!("invalid configuration: {message}"))
}

/// Reads the root file and the group files and merges them.
pub(crate) fn read_dir(dir: &Path) -> Result<(Node, Vec<String>)> {
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
        let options = group_options(&group_dir)?;
        if options.is_empty() {
            continue;
        }
        seen.push(group.clone());
        let Some((position, path)) = choose(&group, &options, &defaults)? else {
            continue;
        };
        let name = rel(dir, &path);
        composed.push((
            position,
            name.clone(),
            read_group_file(&path, &name, &group)?,
        ));
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

/// The `.yaml`/`.yml` files of a group directory, by option name.
fn group_options(group_dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut options: Vec<(String, PathBuf)> = std::fs::read_dir(group_dir)
        .map_err(|e| config_error(format!("cannot read {}: {e}", group_dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .filter_map(|p| {
            let stem = p.file_stem()?.to_string_lossy().into_owned();
            Some((stem, p))
        })
        .collect();
    options.sort();
    Ok(options)
}

/// The option of `group` to read, and its place in the composition order:
/// the one the defaults list chooses, else `default`, else the only one;
/// `None` for `- group: null`.
fn choose(
    group: &str,
    options: &[(String, PathBuf)],
    defaults: &Defaults,
) -> Result<Option<(usize, PathBuf)>> {
    let names: Vec<&str> = options.iter().map(|(o, _)| o.as_str()).collect();
    match defaults.choices.iter().find(|c| c.group == group) {
        Some(Choice { option: None, .. }) => Ok(None),
        Some(Choice {
            option: Some(chosen),
            position,
            ..
        }) => match options.iter().find(|(o, _)| o == chosen) {
            Some((_, path)) => Ok(Some((*position, path.clone()))),
            None => Err(config_error(format!(
                "defaults in config.yaml choose `{group}: {chosen}`, but {group}/ has only {}",
                names.join(", ")
            ))),
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
            Ok(Some((0, path)))
        }
    }
}

/// A group file's content, placed under the group's name, or at the root
/// when its first line is `# @package _global_`.
fn read_group_file(path: &Path, name: &str, group: &str) -> Result<Node> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| config_error(format!("cannot read {}: {e}", path.display())))?;
    let content = parse_yaml(&text, name)?;
    let global = text
        .lines()
        .next()
        .is_some_and(|l| l.trim() == "# @package _global_");
    Ok(if global {
        content
    } else {
        Node {
            value: NodeValue::Map(vec![(group.to_owned(), content)]),
            file: name.into(),
        }
    })
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

pub(crate) fn lookup<'a>(root: &'a Node, path: &[&str]) -> Option<&'a Node> {
    path.iter().try_fold(root, |node, key| match &node.value {
        NodeValue::Map(pairs) => pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v),
        _ => None,
    })
}
