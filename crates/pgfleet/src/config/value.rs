//! Values as written in a configuration source ([`RawValue`]), where they
//! came from ([`Source`]), and the checks that turn them into typed values.
//! The messages say what was expected; the caller adds the key, the value
//! and the source.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(tag = "kind", rename_all = "snake_case")
)]
#[non_exhaustive]
pub enum Source {
    /// The built-in default.
    Default,
    /// Set in code (also a deserialized `PoolConfig` or `FleetConfig`).
    Code,
    /// A configuration file, at a key path (e.g. `database.postgres.pool_size`).
    File {
        /// The file, relative to the configuration directory.
        path: String,
        /// The dotted key path inside the merged configuration.
        key: String,
    },
    /// An environment variable (`POSTGRES_HOST`, `DATABASE_URL`, ...).
    Env {
        /// The variable's name.
        var: String,
    },
    /// Derived from a URL set elsewhere (the source of the URL is given).
    Url {
        /// Where the URL came from.
        from: Box<Source>,
    },
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::Code => f.write_str("code"),
            Source::File { path, key } => write!(f, "{path}: {key}"),
            Source::Env { var } => write!(f, "env {var}"),
            Source::Url { from } => write!(f, "url from {from}"),
        }
    }
}

/// A value as written in a configuration source, before typing.
#[derive(Debug, Clone, PartialEq)]
pub enum RawValue {
    /// `null` / `~` / empty.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A whole number.
    Int(i64),
    /// A number with a fraction.
    Float(f64),
    /// A string.
    Str(String),
    /// A mapping.
    Map(Vec<(String, RawValue)>),
    /// A sequence.
    List(Vec<RawValue>),
}

impl fmt::Display for RawValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RawValue::Null => f.write_str("null"),
            RawValue::Bool(b) => write!(f, "{b}"),
            RawValue::Int(i) => write!(f, "{i}"),
            RawValue::Float(x) => write!(f, "{x:?}"),
            RawValue::Str(s) => write!(f, "{s:?}"),
            RawValue::Map(_) => f.write_str("a mapping"),
            RawValue::List(_) => f.write_str("a list"),
        }
    }
}

impl From<&str> for RawValue {
    fn from(s: &str) -> Self {
        RawValue::Str(s.to_owned())
    }
}

/// What a check of one value found wrong.
pub(crate) type Why = String;

/// `null`, `off`, `none`, `disabled`: an optional value turned off.
pub(crate) fn is_off(raw: &RawValue) -> bool {
    match raw {
        RawValue::Null => true,
        RawValue::Str(s) => matches!(
            s.trim().to_ascii_lowercase().as_str(),
            "off" | "none" | "null" | "disabled"
        ),
        _ => false,
    }
}

/// Whether `raw` asks for the value to be worked out (`auto`, or null).
pub(crate) fn is_auto(raw: &RawValue) -> bool {
    match raw {
        RawValue::Null => true,
        RawValue::Str(s) => s.trim().eq_ignore_ascii_case("auto"),
        _ => false,
    }
}

/// A whole number in `min..=max` (`10`, `10.0` and `"10"` are accepted).
pub(crate) fn count(raw: &RawValue, min: u64, max: u64) -> Result<u64, Why> {
    let expected = || {
        if max == u64::MAX {
            format!("expected a whole number >= {min}")
        } else {
            format!("expected a whole number in {min}..={max}")
        }
    };
    let n: i128 = match raw {
        RawValue::Int(i) => i128::from(*i),
        RawValue::Float(f) if f.fract() == 0.0 && f.is_finite() => *f as i128,
        RawValue::Str(s) => s.trim().parse::<i128>().map_err(|_| expected())?,
        _ => return Err(expected()),
    };
    if n < i128::from(min) || n > i128::from(max) {
        return Err(expected());
    }
    Ok(n as u64)
}

/// A duration: bare numbers are seconds, strings are humantime (`"30s"`,
/// `"250ms"`) or numbers. Zero, values past `max` and `off` are refused
/// (callers of an optional duration take `off` first).
pub(crate) fn duration(raw: &RawValue, max: Duration, optional: bool) -> Result<Duration, Why> {
    const EXPECTED: &str = "expected a duration like 30, 2.5 (seconds) or \"250ms\"";
    if is_off(raw) {
        return Err(format!("cannot be disabled; {EXPECTED}"));
    }
    let seconds = |x: f64| -> Result<Duration, Why> {
        if !x.is_finite() {
            Err("expected a finite number of seconds".into())
        } else if x < 0.0 {
            Err("must not be negative".into())
        } else {
            Duration::try_from_secs_f64(x).map_err(|_| "too large".into())
        }
    };
    let d = match raw {
        RawValue::Int(i) => seconds(*i as f64)?,
        RawValue::Float(f) => seconds(*f)?,
        RawValue::Str(s) => match s.trim().parse::<f64>() {
            Ok(x) => seconds(x)?,
            Err(_) => {
                humantime::parse_duration(s.trim()).map_err(|e| format!("{EXPECTED} ({e})"))?
            }
        },
        _ => return Err(EXPECTED.into()),
    };
    check_duration(d, max, optional).map_err(|why| {
        if d > max {
            format!("{why}; check the unit")
        } else {
            why
        }
    })?;
    Ok(d)
}

/// The range every duration obeys: above zero, at most `max`.
pub(crate) fn check_duration(d: Duration, max: Duration, optional: bool) -> Result<(), Why> {
    if d.is_zero() {
        let off = if optional {
            " (use `off` to disable)"
        } else {
            ""
        };
        Err(format!("must be greater than zero{off}"))
    } else if d > max {
        Err(format!("longer than {}", humantime::format_duration(max)))
    } else {
        Ok(())
    }
}

/// Text from a scalar (numbers and booleans as written).
pub(crate) fn text(raw: &RawValue) -> Result<String, Why> {
    match raw {
        RawValue::Str(s) => Ok(s.clone()),
        RawValue::Int(i) => Ok(i.to_string()),
        RawValue::Float(f) => Ok(f.to_string()),
        RawValue::Bool(b) => Ok(b.to_string()),
        _ => Err("expected a text value".into()),
    }
}

/// One port, or a comma list of ports (one per host), as text.
pub(crate) fn ports(raw: &RawValue) -> Result<String, Why> {
    match raw {
        RawValue::Str(s) if s.contains(',') => {
            for part in s.split(',') {
                if !part.trim().is_empty() {
                    port(&RawValue::Str(part.to_owned())).map_err(|_| {
                        format!("{part:?}: expected port numbers 1..=65535, one per host")
                    })?;
                }
            }
            Ok(s.split(',').map(str::trim).collect::<Vec<_>>().join(","))
        }
        other => port(other).map(|p| p.to_string()),
    }
}

/// A port number, 1..=65535.
pub(crate) fn port(raw: &RawValue) -> Result<u16, Why> {
    const EXPECTED: &str = "expected a port number 1..=65535";
    let n = match raw {
        RawValue::Int(i) => *i,
        RawValue::Str(s) => s.trim().parse::<i64>().map_err(|_| EXPECTED.to_owned())?,
        _ => return Err(EXPECTED.into()),
    };
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| EXPECTED.into())
}

/// A mapping of run-time parameter names to scalar values.
pub(crate) fn settings_map(raw: &RawValue) -> Result<BTreeMap<String, String>, Why> {
    let RawValue::Map(pairs) = raw else {
        return Err("expected a mapping of setting names to values".into());
    };
    let mut out = BTreeMap::new();
    for (name, value) in pairs {
        check_setting_name(name).map_err(|why| format!("setting {name:?}: {why}"))?;
        let value =
            text(value).map_err(|_| format!("setting {name:?}: expected a scalar value"))?;
        check_setting_value(&value).map_err(|why| format!("setting {name:?}: {why}"))?;
        out.insert(name.clone(), value);
    }
    Ok(out)
}

/// `application_name`: what the server keeps of it, without NUL bytes.
pub(crate) fn check_application_name(name: &str) -> Result<(), Why> {
    if name.is_empty() {
        Err("must not be empty".into())
    } else if name.len() > 63 {
        Err("longer than 63 bytes (the server truncates it)".into())
    } else if name.contains('\0') {
        Err("contains a NUL byte".into())
    } else {
        Ok(())
    }
}

/// A run-time parameter name (`work_mem`, `app.tenant`).
pub(crate) fn check_setting_name(name: &str) -> Result<(), Why> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    if first_ok
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
    {
        Ok(())
    } else {
        Err("expected a setting name like work_mem or app.tenant".into())
    }
}

/// A run-time parameter value: anything but a NUL byte.
pub(crate) fn check_setting_value(value: &str) -> Result<(), Why> {
    if value.contains('\0') {
        Err("the value contains a NUL byte".into())
    } else {
        Ok(())
    }
}

/// A duration as the reference and `explain` show it (`30s`, `off`).
pub(crate) fn show_duration(d: Option<Duration>) -> String {
    d.map_or("off".to_owned(), |d| {
        humantime::format_duration(d).to_string()
    })
}

/// A count or `auto` serialises as the number or `"auto"`.
#[cfg(feature = "serde")]
pub(crate) mod auto_count {
    use serde::Serializer;

    pub(crate) fn serialize<S: Serializer>(n: &Option<u32>, s: S) -> Result<S::Ok, S::Error> {
        match n {
            Some(n) => s.serialize_u32(*n),
            None => s.serialize_str("auto"),
        }
    }
}

/// Durations serialise as humantime strings (`"30s"`).
#[cfg(feature = "serde")]
pub(crate) mod duration_text {
    use serde::Serializer;
    use std::time::Duration;

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub(crate) mod option {
        use super::*;

        pub(crate) fn serialize<S: Serializer>(
            d: &Option<Duration>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }
    }
}
