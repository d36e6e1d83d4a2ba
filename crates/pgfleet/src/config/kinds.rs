//! What each kind of configuration key is: how a raw value is checked and
//! typed, which field of [`PoolConfig`] it sets, how it is shown and what
//! range the reference gives. The table of keys (`keys.rs`) says which key
//! is of which kind.

use std::collections::BTreeMap;
use std::time::Duration;

use super::pool::PoolConfig;
use super::value::{self, RawValue, Why};

/// Reads and writes one field of a [`PoolConfig`].
pub(crate) struct Field<T: 'static> {
    pub(crate) get: fn(&PoolConfig) -> &T,
    pub(crate) set: fn(&mut PoolConfig) -> &mut T,
}

macro_rules! field {
    ($name:ident) => {
        Field {
            get: |c| &c.$name,
            set: |c| &mut c.$name,
        }
    };
}
pub(crate) use field;

/// The kind of a key: how a raw value is checked and typed, and where it
/// goes.
pub(crate) enum Kind {
    /// A `postgres://` URL; pool keys in its query are set through this
    /// table too.
    Url,
    /// One host name or IP address, or a Unix socket directory.
    Host,
    /// A port number.
    Port,
    /// The database name.
    Database,
    /// The role name.
    User,
    /// A password: never shown.
    Secret,
    /// A connection parameter of the target (libpq's name): TLS (see
    /// `TlsConfig`), `target_session_attrs`, `load_balance_hosts`; with the
    /// values it takes as the reference shows them.
    Param(&'static str),
    /// A number of connections in `min..=max`. `max_overflow` has no field:
    /// it is added to the floor to make `max_size`.
    Size {
        min: u32,
        max: u32,
        field: Option<Field<u32>>,
    },
    /// `max_size`: a number of connections in `min..=max`, or unset to
    /// follow a larger `min_size` (see `PoolConfig::effective_max_size`).
    MaxSize { min: u32, max: u32 },
    /// A number of entries, `0..=max`.
    Len { max: usize, field: Field<usize> },
    /// A count of at least `min`, or `off`.
    Limit { min: u64, field: Field<Option<u64>> },
    /// A number of callers in `0..=max`, or `off`.
    Callers { max: u32, field: Field<Option<u32>> },
    /// A number of connections in `1..=max`, or `auto` (`None`).
    Auto { max: u32, field: Field<Option<u32>> },
    /// A duration up to `max`, always on.
    Duration {
        max: Duration,
        field: Field<Duration>,
    },
    /// A duration up to `max`, or `off`.
    OptDuration {
        max: Duration,
        field: Field<Option<Duration>>,
    },
    /// `application_name`: 1..=63 bytes.
    AppName(Field<String>),
    /// Run-time parameters sent at start-up, by name.
    Settings(Field<BTreeMap<String, String>>),
    /// One of a few words, `names[i]` meaning the field's `i`th value.
    Choice(Choice),
}

/// A key that takes one of a few words (`pooler`, `reset`).
pub(crate) struct Choice {
    /// The words, as the key spells them.
    pub(crate) names: &'static [&'static str],
    /// The index in `names` of the field's value.
    pub(crate) get: fn(&PoolConfig) -> usize,
    /// Sets the field to the value of `names[i]`.
    pub(crate) set: fn(&mut PoolConfig, usize),
}

/// The [`Choice`] of a field whose type has `ALL` and `NAMES` in the same
/// order.
macro_rules! choice {
    ($name:ident, $ty:ty) => {
        Kind::Choice(Choice {
            names: &<$ty>::NAMES,
            get: |c| <$ty>::ALL.iter().position(|v| *v == c.$name).unwrap_or(0),
            set: |c, i| c.$name = <$ty>::ALL[i],
        })
    };
}
pub(crate) use choice;

impl Kind {
    /// A part of the target (where to connect), not of the pool.
    pub(crate) fn is_target_part(&self) -> bool {
        matches!(
            self,
            Kind::Host | Kind::Port | Kind::Database | Kind::User | Kind::Secret | Kind::Param(_)
        )
    }

    /// A key that a URL's query may carry: a pool key other than
    /// `server_settings` (a mapping has no place in a query).
    pub(crate) fn is_url_param(&self) -> bool {
        !self.is_target_part() && !matches!(self, Kind::Url | Kind::Settings(_))
    }

    /// Checks `raw` and stores it in `config`, for keys with a field.
    /// Returns `false` for the others (target parts, `max_overflow`).
    ///
    /// # Errors
    /// What is wrong with the value.
    pub(crate) fn apply(&self, raw: &RawValue, config: &mut PoolConfig) -> Result<bool, Why> {
        match self {
            Kind::Size {
                min,
                max,
                field: Some(field),
            } => *(field.set)(config) = size(raw, *min, *max)?,
            Kind::MaxSize { min, max } => config.max_size = Some(size(raw, *min, *max)?),
            Kind::Len { max, field } => {
                *(field.set)(config) = value::count(raw, 0, *max as u64)? as usize;
            }
            Kind::Limit { min, field } => {
                *(field.set)(config) = if value::is_off(raw) {
                    None
                } else {
                    Some(value::count(raw, *min, u64::MAX)?)
                };
            }
            Kind::Callers { max, field } => {
                *(field.set)(config) = if value::is_off(raw) {
                    None
                } else {
                    Some(size(raw, 0, *max)?)
                };
            }
            Kind::Auto { max, field } => {
                *(field.set)(config) = if value::is_auto(raw) {
                    None
                } else {
                    Some(size(raw, 1, *max)?)
                };
            }
            Kind::Duration { max, field } => {
                *(field.set)(config) = value::duration(raw, *max, false)?;
            }
            Kind::OptDuration { max, field } => {
                *(field.set)(config) = if value::is_off(raw) {
                    None
                } else {
                    Some(value::duration(raw, *max, true)?)
                };
            }
            Kind::AppName(field) => {
                let name = value::text(raw)?;
                value::check_application_name(&name)?;
                *(field.set)(config) = name;
            }
            Kind::Settings(field) => *(field.set)(config) = value::settings_map(raw)?,
            Kind::Choice(choice) => {
                let word = value::text(raw)?;
                let i = choice
                    .names
                    .iter()
                    .position(|n| n.eq_ignore_ascii_case(word.trim()))
                    .ok_or_else(|| format!("expected one of {}", choice.names.join(", ")))?;
                (choice.set)(config, i);
            }
            Kind::Size { field: None, .. }
            | Kind::Url
            | Kind::Host
            | Kind::Port
            | Kind::Database
            | Kind::User
            | Kind::Secret
            | Kind::Param(_) => return Ok(false),
        }
        Ok(true)
    }

    /// Checks the value of this key's field in a configuration built in
    /// code; returns the value as shown and what is wrong with it.
    pub(crate) fn check(&self, config: &PoolConfig) -> Result<(), (String, Why)> {
        let fail = |why: Why| Err((self.show(config).unwrap_or_default(), why));
        match self {
            Kind::Size {
                min,
                max,
                field: Some(field),
            } => {
                let n = *(field.get)(config);
                if n < *min || n > *max {
                    return fail(format!("expected {min}..={max}"));
                }
            }
            Kind::MaxSize { min, max } => {
                if config.max_size.is_some_and(|n| n < *min || n > *max) {
                    return fail(format!("expected {min}..={max}"));
                }
            }
            Kind::Len { max, field } => {
                if *(field.get)(config) > *max {
                    return fail(format!("expected 0..={max}"));
                }
            }
            Kind::Callers { max, field } => {
                if (field.get)(config).is_some_and(|n| n > *max) {
                    return fail(format!("expected 0..={max}, or None / `off`"));
                }
            }
            Kind::Auto { max, field } => {
                if (field.get)(config).is_some_and(|n| n < 1 || n > *max) {
                    return fail(format!("expected 1..={max}, or None / `auto`"));
                }
            }
            Kind::Limit { min, field } => {
                if (field.get)(config).is_some_and(|n| n < *min) {
                    return fail(format!(
                        "must be at least {min} (use None / `off` to disable)"
                    ));
                }
            }
            Kind::Duration { max, field } => {
                if let Err(why) = value::check_duration(*(field.get)(config), *max, false) {
                    return fail(why);
                }
            }
            Kind::OptDuration { max, field } => {
                if let Some(d) = *(field.get)(config) {
                    if let Err(why) = value::check_duration(d, *max, false) {
                        return fail(if d.is_zero() {
                            format!("{why} (use None / `off` to disable)")
                        } else {
                            why
                        });
                    }
                }
            }
            Kind::AppName(field) => {
                if let Err(why) = value::check_application_name((field.get)(config)) {
                    return fail(why);
                }
            }
            Kind::Settings(field) => {
                for (name, setting) in (field.get)(config) {
                    if let Err(why) = value::check_setting_name(name)
                        .and_then(|()| value::check_setting_value(setting))
                    {
                        return Err((format!("{name:?}"), why));
                    }
                }
            }
            Kind::Size { field: None, .. }
            | Kind::Url
            | Kind::Host
            | Kind::Port
            | Kind::Database
            | Kind::User
            | Kind::Secret
            | Kind::Param(_)
            | Kind::Choice(_) => {}
        }
        Ok(())
    }

    /// The value of this key's field as `explain` and the reference show
    /// it; `None` for keys without a field.
    pub(crate) fn show(&self, config: &PoolConfig) -> Option<String> {
        Some(match self {
            Kind::Size {
                field: Some(field), ..
            } => (field.get)(config).to_string(),
            Kind::MaxSize { .. } => config.effective_max_size().to_string(),
            Kind::Len { field, .. } => (field.get)(config).to_string(),
            Kind::Limit { field, .. } => {
                (field.get)(config).map_or("off".to_owned(), |n| n.to_string())
            }
            Kind::Callers { field, .. } => {
                (field.get)(config).map_or("off".to_owned(), |n| n.to_string())
            }
            Kind::Auto { field, .. } => {
                (field.get)(config).map_or("auto".to_owned(), |n| n.to_string())
            }
            Kind::Duration { field, .. } => value::show_duration(Some(*(field.get)(config))),
            Kind::OptDuration { field, .. } => value::show_duration(*(field.get)(config)),
            Kind::AppName(field) => (field.get)(config).clone(),
            Kind::Settings(field) => {
                let settings = (field.get)(config);
                if settings.is_empty() {
                    "none".to_owned()
                } else {
                    let shown: Vec<String> =
                        settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    shown.join(", ")
                }
            }
            Kind::Choice(choice) => choice.names[(choice.get)(config)].to_owned(),
            Kind::Size { field: None, .. }
            | Kind::Url
            | Kind::Host
            | Kind::Port
            | Kind::Database
            | Kind::User
            | Kind::Secret
            | Kind::Param(_) => return None,
        })
    }

    /// The valid range, as the reference shows it.
    pub(crate) fn range(&self) -> String {
        let days = |d: &Duration| format!("{} days", d.as_secs() / 86_400);
        match self {
            Kind::Size { min, max, .. } | Kind::MaxSize { min, max } => format!("{min}..={max}"),
            Kind::Len { max, .. } => format!("0..={max}"),
            Kind::Limit { min, .. } => format!("≥ {min}"),
            Kind::Callers { max, .. } => format!("0..={max}"),
            Kind::Auto { max, .. } => format!("1..={max}, auto"),
            Kind::Duration { max, .. } | Kind::OptDuration { max, .. } => {
                format!("> 0, ≤ {}", days(max))
            }
            Kind::AppName(_) => "1..=63 bytes".to_owned(),
            Kind::Port => "1..=65535".to_owned(),
            Kind::Param(values) => (*values).to_owned(),
            Kind::Choice(choice) => choice.names.join(", "),
            Kind::Url
            | Kind::Host
            | Kind::Database
            | Kind::User
            | Kind::Secret
            | Kind::Settings(_) => String::new(),
        }
    }
}

/// A size in `min..=max`, as the `u32` of a `PoolConfig` field.
pub(crate) fn size(raw: &RawValue, min: u32, max: u32) -> Result<u32, Why> {
    value::count(raw, u64::from(min), u64::from(max)).map(|n| n as u32)
}
