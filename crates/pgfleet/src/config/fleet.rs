//! Fleet-wide settings: [`FleetConfig`] and the server budgets it holds
//! ([`BudgetConfig`], [`BudgetMode`]), and the reader of the `fleet:`
//! section shared by YAML files and deserialization.

use std::collections::BTreeMap;
use std::fmt;

#[cfg(any(feature = "yaml", feature = "serde"))]
use super::value::RawValue;
use crate::error::{Error, Result};

/// Fleet-wide settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct FleetConfig {
    /// Server budgets: how many connections this process may hold on each
    /// server, across all its pools there.
    pub budget: BudgetConfig,
}

impl FleetConfig {
    /// Checks the settings.
    ///
    /// # Errors
    /// `Config` naming the field and the value.
    pub fn validate(&self) -> Result<()> {
        self.budget.validate()
    }

    /// Reads a `fleet:` section: `budget` (`auto`, `off` or a number),
    /// `headroom`, `replicas` (`auto` or a number), `service`, and `servers`
    /// (per `host:port` budgets).
    /// `origin` names where it came from in messages (a file name).
    ///
    /// # Errors
    /// `Config` naming the key, the value and the origin.
    #[cfg(any(feature = "yaml", feature = "serde"))]
    pub(crate) fn from_raw(raw: &RawValue, origin: &str) -> Result<FleetConfig> {
        let RawValue::Map(pairs) = raw else {
            return Err(config_error(format!("{origin}: `fleet` must be a mapping")));
        };
        let at = |key: &str| format!("fleet.{key} ({origin})");
        let whole = |key: &str, value: &RawValue, min: i64| -> Result<u32> {
            let n = match value {
                RawValue::Int(i) => Some(*i),
                RawValue::Str(s) => s.trim().parse().ok(),
                _ => None,
            };
            n.filter(|n| *n >= min && *n <= MAX_BUDGET)
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
        for (key, value) in pairs {
            match key.as_str() {
                "budget" => budget.mode = mode("budget", value)?,
                "headroom" => budget.headroom = whole("headroom", value, 0)?,
                "replicas" => {
                    budget.replicas = match value {
                        RawValue::Str(s) if s.trim() == "auto" => Replicas::Auto,
                        other => whole("replicas", other, 1).map(Replicas::Fixed).map_err(|_| {
                            config_error(format!(
                                "{} = {other}: expected `auto` or a whole number >= 1",
                                at("replicas")
                            ))
                        })?,
                    }
                }
                "service" => {
                    budget.service = match value {
                        RawValue::Null => None,
                        RawValue::Str(s) => Some(s.trim().to_owned()),
                        other => {
                            return Err(config_error(format!(
                                "{} = {other}: expected a name",
                                at("service")
                            )))
                        }
                    }
                }
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
                        "unknown key `{other}` in fleet ({origin}); known: budget, headroom, replicas, service, servers"
                    )))
                }
            }
        }
        budget.validate()?;
        Ok(FleetConfig { budget })
    }
}

/// The largest budget, headroom or replica count accepted.
#[cfg(any(feature = "yaml", feature = "serde"))]
const MAX_BUDGET: i64 = 100_000;

#[cfg(any(feature = "yaml", feature = "serde"))]
fn config_error(message: String) -> Error {
    Error::config(format!("invalid configuration: {message}"))
}

/// How many replicas of the application share each server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "snake_case")
)]
pub enum Replicas {
    /// The live replicas of the same [`service`](BudgetConfig::service)
    /// find each other through the server and split its budget between
    /// them, by demand (see the configuration reference, "Replicas").
    Auto,
    /// A fixed count: an `auto` budget is divided by it.
    Fixed(u32),
}

impl fmt::Display for Replicas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Replicas::Auto => f.write_str("auto"),
            Replicas::Fixed(n) => write!(f, "{n}"),
        }
    }
}

/// The longest service name: it travels in `application_name` (63 bytes)
/// with an instance id and the replica's demand.
pub const MAX_SERVICE_LEN: usize = 30;

/// How a server's budget is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "snake_case")
)]
pub enum BudgetMode {
    /// Derived at first contact: `max_connections` minus
    /// `superuser_reserved_connections` and `reserved_connections`, minus the
    /// headroom, divided by the replicas.
    Auto,
    /// A fixed number of connections for this process.
    Fixed(u32),
    /// No budget: pools are bounded by their own `max_size` only.
    Off,
}

impl fmt::Display for BudgetMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BudgetMode::Auto => f.write_str("auto"),
            BudgetMode::Fixed(n) => write!(f, "{n}"),
            BudgetMode::Off => f.write_str("off"),
        }
    }
}

/// Fleet-wide settings of server budgets (the `fleet:` section).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct BudgetConfig {
    /// The mode for servers not listed in `servers`. Default `auto`.
    pub mode: BudgetMode,
    /// Connections left for other clients (psql, monitoring, migrations) by
    /// `auto`. Default 3.
    pub headroom: u32,
    /// How many replicas of this application share the server: a number
    /// divides an `auto` budget by it; [`Replicas::Auto`] finds the live
    /// replicas of [`service`](Self::service) on the server. Default 1.
    pub replicas: Replicas,
    /// The name replicas of one application share (`replicas: auto`);
    /// `None`: the `application_name` of the first pool on the server.
    /// Letters, digits, `_`, `-` and `.`, at most [`MAX_SERVICE_LEN`].
    pub service: Option<String>,
    /// Per-server modes, keyed by `host:port` ([`crate::Target::server_key`]).
    pub servers: BTreeMap<String, BudgetMode>,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            mode: BudgetMode::Auto,
            headroom: 3,
            replicas: Replicas::Fixed(1),
            service: None,
            servers: BTreeMap::new(),
        }
    }
}

impl BudgetConfig {
    /// The mode for one server.
    pub fn mode_for(&self, server: &str) -> BudgetMode {
        self.servers.get(server).copied().unwrap_or(self.mode)
    }

    /// Checks the settings.
    ///
    /// # Errors
    /// `Config` for zero replicas, a fixed budget of zero, or a service
    /// name that cannot travel in `application_name`.
    pub fn validate(&self) -> Result<()> {
        if self.replicas == Replicas::Fixed(0) {
            return Err(Error::config(
                "invalid configuration: fleet.replicas = 0: expected at least 1 or `auto`",
            ));
        }
        if let Some(service) = &self.service {
            check_service(service).map_err(|why| {
                Error::config(format!(
                    "invalid configuration: fleet.service = {service:?}: {why}"
                ))
            })?;
        }
        for (server, mode) in std::iter::once(("default", &self.mode))
            .chain(self.servers.iter().map(|(k, v)| (k.as_str(), v)))
        {
            if *mode == BudgetMode::Fixed(0) {
                return Err(Error::config(format!(
                    "invalid configuration: budget of {server} = 0: expected at least 1, `auto` or `off`"
                )));
            }
        }
        Ok(())
    }
}

/// Whether `name` may name a service: what is wrong with it.
pub(crate) fn check_service(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.len() > MAX_SERVICE_LEN {
        return Err(format!("expected 1 to {MAX_SERVICE_LEN} characters"));
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        Some(c) => Err(format!(
            "{c:?} is not allowed: letters, digits, `_`, `-` and `.` only"
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_replicas_or_zero_budget_are_invalid() {
        let bad = BudgetConfig {
            replicas: Replicas::Fixed(0),
            ..BudgetConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("replicas = 0"));
        let mut bad = BudgetConfig::default();
        bad.servers.insert("db:5432".into(), BudgetMode::Fixed(0));
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("db:5432 = 0"));
    }

    #[test]
    #[cfg(any(feature = "yaml", feature = "serde"))]
    fn a_fleet_section_reads_modes_and_numbers_and_names_bad_keys() {
        use crate::config::RawValue;

        let raw = RawValue::Map(vec![
            ("budget".into(), RawValue::Int(40)),
            ("headroom".into(), "5".into()),
            (
                "servers".into(),
                RawValue::Map(vec![("db:5432".into(), "off".into())]),
            ),
        ]);
        let config = FleetConfig::from_raw(&raw, "config.yaml").unwrap();
        assert_eq!(config.budget.mode, BudgetMode::Fixed(40));
        assert_eq!(config.budget.headroom, 5);
        assert_eq!(config.budget.mode_for("db:5432"), BudgetMode::Off);
        let raw = RawValue::Map(vec![
            ("replicas".into(), "auto".into()),
            ("service".into(), "memory-api".into()),
        ]);
        let config = FleetConfig::from_raw(&raw, "config.yaml").unwrap();
        assert_eq!(config.budget.replicas, Replicas::Auto);
        assert_eq!(config.budget.service.as_deref(), Some("memory-api"));
        let raw = RawValue::Map(vec![("replicas".into(), "some".into())]);
        let err = FleetConfig::from_raw(&raw, "config.yaml").unwrap_err();
        assert!(
            err.to_string()
                .contains("fleet.replicas (config.yaml) = \"some\": expected `auto`"),
            "{err}"
        );
        let raw = RawValue::Map(vec![("service".into(), "my service".into())]);
        let err = FleetConfig::from_raw(&raw, "config.yaml").unwrap_err();
        assert!(
            err.to_string()
                .contains("fleet.service = \"my service\": ' ' is not allowed"),
            "{err}"
        );
        let raw = RawValue::Map(vec![("budgte".into(), RawValue::Int(4))]);
        let err = FleetConfig::from_raw(&raw, "config.yaml").unwrap_err();
        assert!(
            err.to_string()
                .contains("unknown key `budgte` in fleet (config.yaml)"),
            "{err}"
        );
    }
}
