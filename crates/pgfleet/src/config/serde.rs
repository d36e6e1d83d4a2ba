//! Serde support (feature `serde`): durations as `"30s"` text, and
//! `Deserialize` for [`PoolConfig`] and [`FleetConfig`] through the same
//! parser as YAML layers, so every key name, alias, range and message is
//! the same, and unknown keys are refused with the closest known name.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::fleet::FleetConfig;
use super::pool::PoolConfig;
use super::settings::PoolSettings;
use super::value::{RawValue, Source};

impl<'de> Deserialize<'de> for RawValue {
    /// Any self-describing value: scalars, sequences and mappings (keys as
    /// text).
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(RawVisitor)
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = RawValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a configuration value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<RawValue, E> {
        Ok(RawValue::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<RawValue, E> {
        Ok(RawValue::Int(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawValue, E> {
        i64::try_from(v)
            .map(RawValue::Int)
            .map_err(|_| E::custom(format!("{v} is too large")))
    }

    fn visit_f64<E>(self, v: f64) -> Result<RawValue, E> {
        Ok(RawValue::Float(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<RawValue, E> {
        Ok(RawValue::Str(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<RawValue, E> {
        Ok(RawValue::Str(v))
    }

    fn visit_unit<E>(self) -> Result<RawValue, E> {
        Ok(RawValue::Null)
    }

    fn visit_none<E>(self) -> Result<RawValue, E> {
        Ok(RawValue::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<RawValue, D::Error> {
        RawValue::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawValue, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(RawValue::List(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawValue, A::Error> {
        let mut pairs = Vec::new();
        while let Some((key, value)) = map.next_entry::<String, RawValue>()? {
            pairs.push((key, value));
        }
        Ok(RawValue::Map(pairs))
    }
}

impl<'de> Deserialize<'de> for PoolConfig {
    /// A mapping of pool keys, by any of their names (`max_size`,
    /// `pool_size`, `acquire_timeout`, ...), with the values YAML takes
    /// (durations as `"30s"` or seconds, `"off"`); absent keys keep their
    /// defaults, and `max_size: null` is absent. Target keys (`host`, `url`,
    /// ...) and unknown keys are errors. The result is resolved like
    /// [`PoolSettings::pool_config`]'s (`max_size` is the cap in force), and
    /// serializing a `PoolConfig` gives a mapping this reads back.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let RawValue::Map(pairs) = RawValue::deserialize(deserializer)? else {
            return Err(de::Error::custom("a PoolConfig must be a mapping of keys"));
        };
        let mut settings = PoolSettings::new();
        for (key, value) in &pairs {
            // A serialized `PoolConfig::default()` has `max_size: null`: the
            // cap follows `min_size`, as when the key is absent.
            if key == "max_size" && *value == RawValue::Null {
                continue;
            }
            if super::keys::lookup(key).is_some_and(|k| k.kind.is_target_part() || k.name == "url")
            {
                return Err(de::Error::custom(format!(
                    "`{key}` is a key of the database address, not of a PoolConfig; give it to a Target"
                )));
            }
            settings
                .set(key, value, Source::Code)
                .map_err(de::Error::custom)?;
        }
        settings.pool_config().map_err(de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for FleetConfig {
    /// The `fleet:` section as YAML takes it: `budget` (`"auto"`, `"off"` or
    /// a number), `headroom`, `replicas`, `servers`. Unknown keys are
    /// errors.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = RawValue::deserialize(deserializer)?;
        FleetConfig::from_raw(&raw, "deserialized").map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::fleet::BudgetMode;

    #[test]
    fn a_pool_config_reads_every_name_and_refuses_unknown_keys() {
        let config: PoolConfig = serde_json::from_str(
            r#"{"pool_size": 5, "max_overflow": 5, "acquire_timeout": "250ms",
                "max_lifetime": "off", "server_settings": {"work_mem": "64MB"}}"#,
        )
        .unwrap();
        assert_eq!((config.min_size, config.effective_max_size()), (5, 10));
        assert_eq!(config.acquire_timeout, Duration::from_millis(250));
        assert_eq!(config.max_lifetime, None);
        assert_eq!(config.server_settings["work_mem"], "64MB");
        let err = serde_json::from_str::<PoolConfig>(r#"{"max_sise": 5}"#).unwrap_err();
        assert!(
            err.to_string()
                .contains("unknown key `max_sise` (code); did you mean `max_size`?"),
            "{err}"
        );
        let err = serde_json::from_str::<PoolConfig>(r#"{"max_size": 0}"#).unwrap_err();
        assert!(err.to_string().contains("max_size = 0 (code)"), "{err}");
        let err = serde_json::from_str::<PoolConfig>(r#"{"host": "db"}"#).unwrap_err();
        assert!(err.to_string().contains("give it to a Target"), "{err}");
    }

    #[test]
    fn a_serialized_pool_config_reads_back_the_same() {
        let config = PoolConfig {
            min_size: 3,
            max_size: Some(7),
            idle_timeout: None,
            command_timeout: Some(Duration::from_millis(1500)),
            ..PoolConfig::default()
        };
        let text = serde_json::to_string(&config).unwrap();
        assert_eq!(serde_json::from_str::<PoolConfig>(&text).unwrap(), config);
        // The default's `max_size: null` reads back as the cap it means.
        let defaults = serde_json::to_string(&PoolConfig::default()).unwrap();
        assert_eq!(
            serde_json::from_str::<PoolConfig>(&defaults).unwrap(),
            PoolConfig {
                max_size: Some(10),
                ..PoolConfig::default()
            }
        );
    }

    #[test]
    fn a_fleet_config_reads_the_fleet_section() {
        let config: FleetConfig =
            serde_json::from_str(r#"{"budget": 40, "servers": {"db:5432": "off"}}"#).unwrap();
        assert_eq!(config.budget.mode, BudgetMode::Fixed(40));
        assert_eq!(config.budget.mode_for("db:5432"), BudgetMode::Off);
        let err = serde_json::from_str::<FleetConfig>(r#"{"budgte": 4}"#).unwrap_err();
        assert!(err.to_string().contains("unknown key `budgte`"), "{err}");
    }
}
