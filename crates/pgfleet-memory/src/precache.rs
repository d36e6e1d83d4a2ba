//! `connection_pool.precache_configs`: users whose services are created at
//! start-up (seed 004), read from the layered configuration as a key the
//! service declares its own.

use pgfleet::{Loaded, Loader, RawValue};
use serde::Serialize;

use crate::error::MemoryError;
use crate::services::SERVICE_NAMES;

/// The key inside `connection_pool`.
pub const PRECACHE_KEY: &str = "precache_configs";

/// Services pre-created for a user when `services` is not given.
pub const DEFAULT_SERVICES: &[&str] = SERVICE_NAMES;

/// Services to create for one user at start-up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PrecacheEntry {
    /// The user id.
    pub user: String,
    /// The services (`memory`, `buffer`, `storage` by default).
    pub services: Vec<String>,
}

/// Declares `precache_configs` on a loader, so that pgfleet accepts it.
pub fn declare(loader: Loader) -> Loader {
    loader.application_key(PRECACHE_KEY)
}

/// The pre-cache entries of a configuration loaded with [`declare`]; none
/// when the files do not set the key.
///
/// # Errors
/// `Config`, naming the entry, the value and the file, for a list that is
/// not one, an entry without `user`, an unknown key or service.
pub fn entries(loaded: &Loaded) -> Result<Vec<PrecacheEntry>, MemoryError> {
    let Some(found) = loaded.application_value(PRECACHE_KEY) else {
        return Ok(Vec::new());
    };
    let bad = |what: String| {
        MemoryError::Config(format!("invalid configuration: {what} ({})", found.file))
    };
    let items = match &found.value {
        RawValue::List(items) => items.as_slice(),
        RawValue::Null => &[],
        other => return Err(bad(format!("{} = {other}: expected a list", found.path))),
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| entry(item, &format!("{}[{i}]", found.path)).map_err(&bad))
        .collect()
}

/// One entry; the error names the field and the value (without the file).
fn entry(item: &RawValue, path: &str) -> Result<PrecacheEntry, String> {
    let RawValue::Map(pairs) = item else {
        return Err(format!("{path} = {item}: expected a mapping with `user`"));
    };
    let mut user = None;
    let mut services = None;
    for (key, value) in pairs {
        match (key.as_str(), value) {
            ("user", RawValue::Str(s)) if !s.trim().is_empty() => user = Some(s.clone()),
            ("user", v) => return Err(format!("{path}.user = {v}: expected a non-empty user id")),
            ("services", RawValue::List(list)) => {
                let mut names = Vec::new();
                for (j, v) in list.iter().enumerate() {
                    match v {
                        RawValue::Str(s) if SERVICE_NAMES.contains(&s.as_str()) => {
                            names.push(s.clone())
                        }
                        v => {
                            return Err(format!(
                                "{path}.services[{j}] = {v}: expected one of {}",
                                SERVICE_NAMES.join(", ")
                            ))
                        }
                    }
                }
                services = Some(names);
            }
            ("services", v) => return Err(format!("{path}.services = {v}: expected a list")),
            (other, _) => {
                return Err(format!(
                    "unknown key `{other}` in {path}; known: user, services"
                ))
            }
        }
    }
    Ok(PrecacheEntry {
        user: user.ok_or_else(|| format!("{path}: `user` is missing"))?,
        services: services
            .unwrap_or_else(|| DEFAULT_SERVICES.iter().map(|s| (*s).to_owned()).collect()),
    })
}
