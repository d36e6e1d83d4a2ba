//! Pool configuration: plain data with documented defaults and `validate()`,
//! and [`PoolSettings`], the one parser of configuration keys shared by YAML
//! layers, environment variables and code. The reference of every key is
//! `docs/CONFIGURATION.md`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::target::Target;

/// How one pool behaves. Every field is documented in
/// `docs/CONFIGURATION.md` with its YAML names, unit, default and range.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolConfig {
    /// Warm floor: connections kept open even when idle, refilled in the
    /// background (`min_size`, alias `pool_size`). Default 1, range
    /// 0..=`max_size`.
    pub min_size: u32,
    /// Hard cap on open plus opening connections (`max_size`; or
    /// `pool_size + max_overflow`). Default 10 (or `min_size` if larger),
    /// range 1..=10000.
    pub max_size: u32,
    /// How long `get()` waits for a connection before failing
    /// (`timeout`, aliases `pool_timeout`, `acquire_timeout`). Default 30s.
    #[serde(with = "duration_text")]
    pub acquire_timeout: Duration,
    /// How long opening one connection may take (`connect_timeout`).
    /// Default 10s.
    #[serde(with = "duration_text")]
    pub connect_timeout: Duration,
    /// Connections older than this are closed when next idle
    /// (`pool_recycle`, alias `max_lifetime`); up to 10% jitter is taken off
    /// so connections opened together do not expire together. Default 1h.
    #[serde(with = "duration_text::option")]
    pub max_lifetime: Option<Duration>,
    /// Connections above `min_size` idle for longer than this are closed
    /// (`idle_timeout`, alias `max_inactive_connection_lifetime`).
    /// Default 5min.
    #[serde(with = "duration_text::option")]
    pub idle_timeout: Option<Duration>,
    /// A connection is closed after serving this many statements
    /// (`max_queries`). Default 50000.
    pub max_queries: Option<u64>,
    /// Server-side `statement_timeout` of every connection
    /// (`command_timeout`). Default off.
    #[serde(with = "duration_text::option")]
    pub command_timeout: Option<Duration>,
    /// A connection idle for longer than this is checked with a round trip
    /// before it is handed out (`health_check_after`). Default 5s.
    #[serde(with = "duration_text")]
    pub health_check_after: Duration,
    /// How long a fleet pool with no live handles stays open before it
    /// closes (`linger`). Default 30s.
    #[serde(with = "duration_text")]
    pub linger: Duration,
    /// A connection held longer than this is reported with the place it was
    /// taken (`leak_threshold`). Default off.
    #[serde(with = "duration_text::option")]
    pub leak_threshold: Option<Duration>,
    /// `application_name` of every connection, so that they can be found in
    /// `pg_stat_activity` (`application_name`). Default `pgfleet`.
    pub application_name: String,
    /// Extra run-time parameters sent at connection start-up
    /// (`server_settings`), e.g. `search_path`, `work_mem`.
    pub server_settings: BTreeMap<String, String>,
    /// Connections the opt-in shared mode ([`Pool::shared`](crate::Pool::shared))
    /// pipelines statements over, taken from the pool when first needed
    /// (`shared_connections`). Default 2, range 1..=10000; at most
    /// `max_size` are used.
    pub shared_connections: u32,
    /// Prepared statements each connection keeps for `prepare_cached`
    /// (`statement_cache_size`); past it the least recently used is closed.
    /// Default 256, range 0..=10000; 0 caches nothing.
    pub statement_cache_size: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            min_size: 1,
            max_size: 10,
            acquire_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_lifetime: Some(Duration::from_secs(3600)),
            idle_timeout: Some(Duration::from_secs(300)),
            max_queries: Some(50_000),
            command_timeout: None,
            health_check_after: Duration::from_secs(5),
            linger: Duration::from_secs(30),
            leak_threshold: None,
            application_name: "pgfleet".to_owned(),
            server_settings: BTreeMap::new(),
            shared_connections: 2,
            statement_cache_size: 256,
        }
    }
}

/// Upper bound of timeouts: anything longer is a mistake in units.
const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Upper bound of lifetimes.
const MAX_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// Upper bound of pool sizes.
const MAX_POOL_SIZE: u64 = 10_000;
/// Upper bound of per-connection statement caches.
const MAX_STATEMENT_CACHE: u64 = 10_000;

/// What [`PoolConfig::problem`] found: the field (canonical key), its value
/// as shown, and what is wrong.
struct Problem {
    field: &'static str,
    value: String,
    why: String,
}

impl PoolConfig {
    /// Checks a configuration built in code: sizes, durations, names.
    ///
    /// # Errors
    /// A `Config` error naming the field (by its configuration key), its
    /// value and the source `code`, e.g. `invalid configuration: max_size =
    /// 0 (code): expected 1..=10000`.
    pub fn validate(&self) -> Result<()> {
        match self.problem() {
            None => Ok(()),
            Some(p) => Err(Error::config(format!(
                "invalid configuration: {} = {} ({}): {}",
                p.field,
                p.value,
                Source::Code,
                p.why
            ))),
        }
    }

    fn problem(&self) -> Option<Problem> {
        let bad = |field: &'static str, value: &dyn fmt::Display, why: &str| {
            Some(Problem {
                field,
                value: value.to_string(),
                why: why.to_owned(),
            })
        };
        if self.max_size == 0 || u64::from(self.max_size) > MAX_POOL_SIZE {
            return bad("max_size", &self.max_size, "expected 1..=10000");
        }
        if self.min_size > self.max_size {
            return bad(
                "min_size",
                &self.min_size,
                &format!("greater than max_size = {}", self.max_size),
            );
        }
        let durations: [(&'static str, Option<Duration>, Duration); 8] = [
            ("timeout", Some(self.acquire_timeout), MAX_TIMEOUT),
            ("connect_timeout", Some(self.connect_timeout), MAX_TIMEOUT),
            (
                "health_check_after",
                Some(self.health_check_after),
                MAX_TIMEOUT,
            ),
            ("linger", Some(self.linger), MAX_TIMEOUT),
            ("command_timeout", self.command_timeout, MAX_TIMEOUT),
            ("leak_threshold", self.leak_threshold, MAX_TIMEOUT),
            ("max_lifetime", self.max_lifetime, MAX_LIFETIME),
            ("idle_timeout", self.idle_timeout, MAX_LIFETIME),
        ];
        for (field, value, max) in durations {
            if let Some(d) = value {
                let shown = humantime::format_duration(d);
                if d.is_zero() {
                    return bad(
                        field,
                        &shown,
                        "must be greater than zero (use None / `off` to disable)",
                    );
                }
                if d > max {
                    return bad(
                        field,
                        &shown,
                        &format!("longer than {}", humantime::format_duration(max)),
                    );
                }
            }
        }
        if self.shared_connections == 0 || u64::from(self.shared_connections) > MAX_POOL_SIZE {
            return bad(
                "shared_connections",
                &self.shared_connections,
                "expected 1..=10000",
            );
        }
        if u64::try_from(self.statement_cache_size).unwrap_or(u64::MAX) > MAX_STATEMENT_CACHE {
            return bad(
                "statement_cache_size",
                &self.statement_cache_size,
                "expected 0..=10000",
            );
        }
        if self.max_queries == Some(0) {
            return bad(
                "max_queries",
                &0,
                "must be at least 1 (use None / `off` to disable)",
            );
        }
        if let Err(why) = check_application_name(&self.application_name) {
            return bad(
                "application_name",
                &format!("{:?}", self.application_name),
                &why,
            );
        }
        for (name, value) in &self.server_settings {
            if let Err(why) = check_setting_name(name) {
                return bad("server_settings", &format!("{name:?}"), &why);
            }
            if value.contains('\0') {
                return bad(
                    "server_settings",
                    &format!("{name:?}"),
                    "the value contains a NUL byte",
                );
            }
        }
        if self.command_timeout.is_some() && self.server_settings.contains_key("statement_timeout")
        {
            return bad(
                "server_settings",
                &"statement_timeout",
                "ambiguous: command_timeout already sets statement_timeout; set one of them",
            );
        }
        None
    }
}

fn check_application_name(name: &str) -> std::result::Result<(), String> {
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

fn check_setting_name(name: &str) -> std::result::Result<(), String> {
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

/// Durations serialise as humantime strings (`"30s"`).
mod duration_text {
    use serde::Serializer;
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub mod option {
        use super::*;
        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }
    }
}

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// The built-in default.
    Default,
    /// Set in code.
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

/// The canonical keys, in the order they are listed.
pub(crate) const CANONICAL_KEYS: &[&str] = &[
    "url",
    "host",
    "port",
    "database",
    "user",
    "password",
    "min_size",
    "max_size",
    "max_overflow",
    "timeout",
    "connect_timeout",
    "max_lifetime",
    "idle_timeout",
    "max_queries",
    "command_timeout",
    "health_check_after",
    "linger",
    "leak_threshold",
    "application_name",
    "server_settings",
    "shared_connections",
    "statement_cache_size",
];

/// Every accepted name and the canonical key it sets.
const ALIASES: &[(&str, &str)] = &[
    ("pool_size", "min_size"),
    ("pool_timeout", "timeout"),
    ("acquire_timeout", "timeout"),
    ("pool_recycle", "max_lifetime"),
    ("max_inactive_connection_lifetime", "idle_timeout"),
    ("db", "database"),
    ("dbname", "database"),
    ("username", "user"),
    ("database_url", "url"),
];

fn canonical(key: &str) -> Option<&'static str> {
    CANONICAL_KEYS
        .iter()
        .find(|k| **k == key)
        .copied()
        .or_else(|| {
            ALIASES
                .iter()
                .find(|(alias, _)| *alias == key)
                .map(|(_, k)| *k)
        })
}

/// The known name closest to `key`, if one is close.
fn suggest(key: &str) -> Option<&'static str> {
    CANONICAL_KEYS
        .iter()
        .copied()
        .chain(ALIASES.iter().map(|(a, _)| *a))
        .map(|k| (edit_distance(key, k), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + usize::from(ca != *cb))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}

/// A typed value of one key.
#[derive(Debug, Clone, PartialEq)]
enum Typed {
    Count(u64),
    Duration(Option<Duration>),
    Text(String),
    Port(u16),
    Map(BTreeMap<String, String>),
}

#[derive(Debug, Clone)]
struct Entry {
    value: Typed,
    source: Source,
    /// Order of setting: later wins, and target parts set after a URL
    /// override the URL's.
    seq: u64,
}

/// Raw settings of one pool, merged layer over layer: every key optional,
/// each with the source that set it. [`PoolSettings::resolve`] applies the
/// defaults and the checks across keys.
#[derive(Debug, Clone, Default)]
pub struct PoolSettings {
    entries: BTreeMap<&'static str, Entry>,
    seq: u64,
}

/// One effective value and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Effective {
    /// The canonical key.
    pub key: String,
    /// The value as shown to people (passwords as `***`).
    pub value: String,
    /// Where it came from.
    pub source: Source,
}

impl PoolSettings {
    /// Empty settings: everything at its default.
    pub fn new() -> Self {
        PoolSettings::default()
    }

    /// Sets one key (any accepted name) from a raw value; a later call wins.
    ///
    /// # Errors
    /// A `Config` error naming the key, the value as given (a password as
    /// `***`), the source and what was expected; unknown keys get the
    /// closest known name.
    pub fn set(&mut self, key: &str, raw: &RawValue, source: Source) -> Result<()> {
        let Some(name) = canonical(key) else {
            let hint = suggest(key)
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            return Err(Error::config(format!(
                "invalid configuration: unknown key `{key}` ({source}){hint}"
            )));
        };
        let shown = if name == "password" {
            "***".to_owned()
        } else {
            raw.to_string()
        };
        let fail = |why: String| {
            Error::config(format!(
                "invalid configuration: {key} = {shown} ({source}): {why}"
            ))
        };
        let value = match name {
            "min_size" => Typed::Count(count(raw, 0, MAX_POOL_SIZE).map_err(fail)?),
            "max_size" => Typed::Count(count(raw, 1, MAX_POOL_SIZE).map_err(fail)?),
            "max_overflow" => Typed::Count(count(raw, 0, MAX_POOL_SIZE).map_err(fail)?),
            "shared_connections" => Typed::Count(count(raw, 1, MAX_POOL_SIZE).map_err(fail)?),
            "statement_cache_size" => {
                Typed::Count(count(raw, 0, MAX_STATEMENT_CACHE).map_err(fail)?)
            }
            "max_queries" => match raw {
                _ if is_off(raw) => Typed::Duration(None),
                _ => Typed::Count(count(raw, 1, u64::MAX).map_err(fail)?),
            },
            "timeout" | "connect_timeout" | "health_check_after" | "linger" => {
                Typed::Duration(Some(
                    duration(raw, MAX_TIMEOUT, false)
                        .map_err(fail)?
                        .expect("not optional"),
                ))
            }
            "command_timeout" | "leak_threshold" => {
                Typed::Duration(duration(raw, MAX_TIMEOUT, true).map_err(fail)?)
            }
            "max_lifetime" | "idle_timeout" => {
                Typed::Duration(duration(raw, MAX_LIFETIME, true).map_err(fail)?)
            }
            "application_name" => {
                let text = text(raw).map_err(fail)?;
                check_application_name(&text).map_err(fail)?;
                Typed::Text(text)
            }
            "server_settings" => Typed::Map(settings_map(raw).map_err(fail)?),
            "port" => Typed::Port(port(raw).map_err(fail)?),
            "host" => {
                let text = text(raw).map_err(fail)?;
                if text.is_empty() {
                    return Err(fail("the host must not be empty".into()));
                }
                if text.contains(',') {
                    return Err(fail(
                        "several hosts are not supported; give one host".into(),
                    ));
                }
                Typed::Text(text)
            }
            "url" => {
                let text = text(raw).map_err(fail)?;
                // Pool keys in the URL's query go through the same parser as
                // every other layer, at the URL's place in the order; the
                // rest of the URL is the target's.
                let (url, params) = split_pool_params(&text)
                    .map_err(|why| Error::config(format!("{why} ({source})")))?;
                Target::parse(&url).map_err(|e| Error::config(format!("{e} ({source})")))?;
                let from = Source::Url {
                    from: Box::new(source.clone()),
                };
                let mut staged = self.clone();
                for (param, value) in &params {
                    staged.set(param, &RawValue::Str(value.clone()), from.clone())?;
                }
                *self = staged;
                Typed::Text(url)
            }
            _ => Typed::Text(text(raw).map_err(fail)?),
        };
        self.seq += 1;
        self.entries.insert(
            name,
            Entry {
                value,
                source,
                seq: self.seq,
            },
        );
        Ok(())
    }

    /// Whether a key (canonical name) was set.
    pub fn is_set(&self, key: &str) -> bool {
        canonical(key).is_some_and(|k| self.entries.contains_key(k))
    }

    fn get(&self, key: &str) -> Option<&Entry> {
        self.entries.get(key)
    }

    fn count(&self, key: &str) -> Option<(u64, &Source)> {
        match self.get(key) {
            Some(Entry {
                value: Typed::Count(n),
                source,
                ..
            }) => Some((*n, source)),
            _ => None,
        }
    }

    fn duration(&self, key: &str) -> Option<Option<Duration>> {
        match self.get(key) {
            Some(Entry {
                value: Typed::Duration(d),
                ..
            }) => Some(*d),
            _ => None,
        }
    }

    fn text(&self, key: &str) -> Option<(&str, &Entry)> {
        match self.get(key) {
            Some(
                e @ Entry {
                    value: Typed::Text(t),
                    ..
                },
            ) => Some((t.as_str(), e)),
            _ => None,
        }
    }

    /// The target: the `url` if set, with `host`, `port`, `database`,
    /// `user`, `password` set after it (higher layers) overriding its parts;
    /// otherwise the parts, defaulting to `localhost:5432`, user `postgres`.
    ///
    /// # Errors
    /// `Config` for a URL that does not parse.
    pub fn target(&self) -> Result<Target> {
        let url = self.text("url");
        let base = match url {
            Some((text, entry)) => Some((
                Target::parse(text)
                    .map_err(|e| Error::config(format!("{e} ({})", entry.source)))?,
                entry.seq,
            )),
            None => None,
        };
        let url_seq = base.as_ref().map(|(_, seq)| *seq);
        let after_url = |key: &str| -> Option<&Entry> {
            self.get(key)
                .filter(|e| url_seq.is_none_or(|url_seq| e.seq > url_seq))
        };
        let text_of = |key: &str| match after_url(key) {
            Some(Entry {
                value: Typed::Text(t),
                ..
            }) => Some(t.clone()),
            _ => None,
        };
        let port = match after_url("port") {
            Some(Entry {
                value: Typed::Port(p),
                ..
            }) => Some(*p),
            _ => None,
        };
        let password = text_of("password");
        match base {
            Some((target, _)) => target.with_parts(
                text_of("host").as_deref(),
                port,
                text_of("database").as_deref(),
                text_of("user").as_deref(),
                password.as_deref(),
            ),
            None => Target::from_parts(
                text_of("host").as_deref().unwrap_or("localhost"),
                port.unwrap_or(5432),
                text_of("database").as_deref().unwrap_or(""),
                text_of("user").as_deref().unwrap_or(""),
                password.as_deref(),
            ),
        }
    }

    /// The pool configuration: defaults for what is not set, then the
    /// checks across keys (`min_size <= max_size`, `max_size` against
    /// `pool_size + max_overflow`).
    ///
    /// # Errors
    /// A `Config` error naming the keys, values and sources in conflict.
    pub fn pool_config(&self) -> Result<PoolConfig> {
        let defaults = PoolConfig::default();
        let min = self.count("min_size");
        let min_size = min.map_or(defaults.min_size, |(n, _)| n as u32);
        let max_size = match (self.count("max_size"), self.count("max_overflow")) {
            (Some((max, max_src)), Some((over, over_src))) if max != u64::from(min_size) + over => {
                return Err(Error::config(format!(
                    "invalid configuration: max_size = {max} ({max_src}) disagrees with pool_size + max_overflow = {min_size} + {over} ({over_src}); set one of them"
                )));
            }
            (Some((max, _)), _) => max as u32,
            (None, Some((over, over_src))) => {
                let sum = u64::from(min_size) + over;
                if sum > MAX_POOL_SIZE {
                    let min_src = min.map_or(Source::Default, |(_, s)| s.clone());
                    return Err(Error::config(format!(
                        "invalid configuration: max_size = pool_size + max_overflow = {min_size} ({min_src}) + {over} ({over_src}) = {sum}: expected at most {MAX_POOL_SIZE}"
                    )));
                }
                sum as u32
            }
            (None, None) => defaults.max_size.max(min_size),
        };
        if min_size > max_size {
            let (_, min_src) = min.expect("only a set min_size can exceed max_size");
            let max_src = self
                .get("max_size")
                .map_or(Source::Default, |e| e.source.clone());
            return Err(Error::config(format!(
                "invalid configuration: min_size = {min_size} ({min_src}) is greater than max_size = {max_size} ({max_src})"
            )));
        }
        let config = PoolConfig {
            min_size,
            max_size,
            acquire_timeout: self
                .duration("timeout")
                .flatten()
                .unwrap_or(defaults.acquire_timeout),
            connect_timeout: self
                .duration("connect_timeout")
                .flatten()
                .unwrap_or(defaults.connect_timeout),
            max_lifetime: self
                .duration("max_lifetime")
                .unwrap_or(defaults.max_lifetime),
            idle_timeout: self
                .duration("idle_timeout")
                .unwrap_or(defaults.idle_timeout),
            max_queries: match self.get("max_queries") {
                Some(Entry {
                    value: Typed::Count(n),
                    ..
                }) => Some(*n),
                Some(_) => None,
                None => defaults.max_queries,
            },
            command_timeout: self
                .duration("command_timeout")
                .unwrap_or(defaults.command_timeout),
            health_check_after: self
                .duration("health_check_after")
                .flatten()
                .unwrap_or(defaults.health_check_after),
            linger: self.duration("linger").flatten().unwrap_or(defaults.linger),
            leak_threshold: self
                .duration("leak_threshold")
                .unwrap_or(defaults.leak_threshold),
            application_name: self
                .text("application_name")
                .map_or(defaults.application_name, |(t, _)| t.to_owned()),
            server_settings: match self.get("server_settings") {
                Some(Entry {
                    value: Typed::Map(m),
                    ..
                }) => m.clone(),
                _ => BTreeMap::new(),
            },
            shared_connections: self
                .count("shared_connections")
                .map_or(defaults.shared_connections, |(n, _)| {
                    u32::try_from(n).unwrap_or(u32::MAX)
                }),
            statement_cache_size: self
                .count("statement_cache_size")
                .map_or(defaults.statement_cache_size, |(n, _)| {
                    usize::try_from(n).unwrap_or(usize::MAX)
                }),
        };
        if let (Some(command), Some(settings)) = (
            config.command_timeout.and(self.get("command_timeout")),
            self.get("server_settings"),
        ) {
            if config.server_settings.contains_key("statement_timeout") {
                return Err(Error::config(format!(
                    "invalid configuration: server_settings.statement_timeout = {:?} ({}) conflicts with command_timeout = {} ({}): ambiguous, both set statement_timeout; set one of them",
                    config.server_settings["statement_timeout"],
                    settings.source,
                    humantime::format_duration(config.command_timeout.unwrap_or_default()),
                    command.source
                )));
            }
        }
        // The checks above and in `set` leave nothing for `problem` to find;
        // it stays as a safety net, naming the source of the field.
        if let Some(p) = config.problem() {
            let source = self
                .get(p.field)
                .map_or(Source::Default, |e| e.source.clone());
            return Err(Error::config(format!(
                "invalid configuration: {} = {} ({source}): {}",
                p.field, p.value, p.why
            )));
        }
        Ok(config)
    }

    /// Target and pool configuration together; the URL's
    /// `application_name` and `connect_timeout` apply when the keys are not
    /// set.
    ///
    /// # Errors
    /// As [`target`](Self::target) and [`pool_config`](Self::pool_config).
    pub fn resolve(&self) -> Result<(Target, PoolConfig)> {
        let target = self.target()?;
        let mut config = self.pool_config()?;
        if !self.is_set("application_name") {
            if let Some(name) = target.url_application_name() {
                check_application_name(name).map_err(|why| {
                    Error::config(format!(
                        "invalid configuration: application_name = {name:?} (url): {why}"
                    ))
                })?;
                config.application_name = name.to_owned();
            }
        }
        if !self.is_set("connect_timeout") {
            if let Some(t) = target.url_connect_timeout() {
                config.connect_timeout = t;
            }
        }
        Ok((target, config))
    }

    /// Every effective value with its source, defaults included, in the
    /// reference's order. Passwords show as `***`.
    ///
    /// # Errors
    /// As [`resolve`](Self::resolve).
    pub fn explain(&self) -> Result<Vec<Effective>> {
        let (target, config) = self.resolve()?;
        let url_source = self.get("url").map(|e| Source::Url {
            from: Box::new(e.source.clone()),
        });
        let source_of = |key: &str| -> Source {
            match (self.get(key), self.get("url")) {
                (Some(e), Some(u)) if e.seq < u.seq && is_target_part(key) => {
                    url_source.clone().expect("url set")
                }
                (Some(e), _) => e.source.clone(),
                (None, Some(_)) if is_target_part(key) => url_source.clone().expect("url set"),
                (None, _) => Source::Default,
            }
        };
        let fmt_d = |d: Option<Duration>| {
            d.map_or("off".to_owned(), |d| {
                humantime::format_duration(d).to_string()
            })
        };
        let mut rows = Vec::new();
        if self.is_set("url") {
            rows.push(("url", target.masked_url()));
        }
        rows.extend([
            (
                "host",
                match target.host() {
                    crate::target::Host::Tcp(h) => h.clone(),
                    crate::target::Host::Unix(p) => p.display().to_string(),
                },
            ),
            ("port", target.port().to_string()),
            ("database", target.database().to_owned()),
            ("user", target.user().to_owned()),
            (
                "password",
                if target.has_password() {
                    "***"
                } else {
                    "(none)"
                }
                .to_owned(),
            ),
            ("min_size", config.min_size.to_string()),
            ("max_size", config.max_size.to_string()),
            ("timeout", fmt_d(Some(config.acquire_timeout))),
            ("connect_timeout", fmt_d(Some(config.connect_timeout))),
            ("max_lifetime", fmt_d(config.max_lifetime)),
            ("idle_timeout", fmt_d(config.idle_timeout)),
            (
                "max_queries",
                config.max_queries.map_or("off".into(), |n| n.to_string()),
            ),
            ("command_timeout", fmt_d(config.command_timeout)),
            ("health_check_after", fmt_d(Some(config.health_check_after))),
            ("linger", fmt_d(Some(config.linger))),
            ("leak_threshold", fmt_d(config.leak_threshold)),
            ("application_name", config.application_name.clone()),
            ("shared_connections", config.shared_connections.to_string()),
            (
                "statement_cache_size",
                config.statement_cache_size.to_string(),
            ),
        ]);
        if !config.server_settings.is_empty() {
            let shown: Vec<String> = config
                .server_settings
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            rows.push(("server_settings", shown.join(", ")));
        }
        Ok(rows
            .into_iter()
            .map(|(key, value)| {
                let source = match key {
                    "url" => self
                        .get("url")
                        .map_or(Source::Default, |e| e.source.clone()),
                    // max_size derived from pool_size + max_overflow.
                    "max_size" if !self.is_set("max_size") && self.is_set("max_overflow") => {
                        source_of("max_overflow")
                    }
                    _ => source_of(key),
                };
                Effective {
                    key: key.to_owned(),
                    value,
                    source,
                }
            })
            .collect())
    }
}

/// Splits the pool keys (`max_size=20`, `pool_timeout=5s`, ...) out of a
/// URL's query: the URL without them, and the (name, decoded value) pairs.
fn split_pool_params(url: &str) -> std::result::Result<(String, Vec<(String, String)>), String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), Vec::new()));
    };
    let mut kept = Vec::new();
    let mut params = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match canonical(name) {
            Some(key) if is_pool_key(key) => {
                let value = percent_encoding::percent_decode_str(value)
                    .decode_utf8()
                    .map_err(|_| {
                        format!(
                            "invalid database URL {}: {name} is not valid UTF-8 once decoded",
                            crate::target::mask_url_text(url)
                        )
                    })?;
                params.push((name.to_owned(), value.into_owned()));
            }
            _ => kept.push(pair),
        }
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, params))
}

/// Keys of the pool (not of the target) that a URL's query may carry.
fn is_pool_key(key: &str) -> bool {
    !is_target_part(key) && !matches!(key, "url" | "server_settings")
}

fn is_target_part(key: &str) -> bool {
    matches!(key, "host" | "port" | "database" | "user" | "password")
}

fn is_off(raw: &RawValue) -> bool {
    match raw {
        RawValue::Null => true,
        RawValue::Str(s) => matches!(
            s.trim().to_ascii_lowercase().as_str(),
            "off" | "none" | "null" | "disabled"
        ),
        _ => false,
    }
}

fn count(raw: &RawValue, min: u64, max: u64) -> std::result::Result<u64, String> {
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
/// `"250ms"`) or numbers; `null`/`off`/`none` disable an optional one.
fn duration(
    raw: &RawValue,
    max: Duration,
    optional: bool,
) -> std::result::Result<Option<Duration>, String> {
    if is_off(raw) {
        return if optional {
            Ok(None)
        } else {
            Err(
                "cannot be disabled; expected a duration like 30, 2.5 (seconds) or \"250ms\""
                    .into(),
            )
        };
    }
    let seconds = |x: f64| -> std::result::Result<Duration, String> {
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
            Err(_) => humantime::parse_duration(s.trim()).map_err(|e| {
                format!("expected a duration like 30, 2.5 (seconds) or \"250ms\" ({e})")
            })?,
        },
        _ => return Err("expected a duration like 30, 2.5 (seconds) or \"250ms\"".into()),
    };
    if d.is_zero() {
        let off = if optional {
            " (use `off` to disable)"
        } else {
            ""
        };
        return Err(format!("must be greater than zero{off}"));
    }
    if d > max {
        return Err(format!(
            "longer than {}; check the unit",
            humantime::format_duration(max)
        ));
    }
    Ok(Some(d))
}

fn text(raw: &RawValue) -> std::result::Result<String, String> {
    match raw {
        RawValue::Str(s) => Ok(s.clone()),
        RawValue::Int(i) => Ok(i.to_string()),
        RawValue::Float(f) => Ok(f.to_string()),
        RawValue::Bool(b) => Ok(b.to_string()),
        _ => Err("expected a text value".into()),
    }
}

fn port(raw: &RawValue) -> std::result::Result<u16, String> {
    let n = match raw {
        RawValue::Int(i) => *i,
        RawValue::Str(s) => s
            .trim()
            .parse::<i64>()
            .map_err(|_| "expected a port number 1..=65535".to_owned())?,
        _ => return Err("expected a port number 1..=65535".into()),
    };
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| "expected a port number 1..=65535".into())
}

fn settings_map(raw: &RawValue) -> std::result::Result<BTreeMap<String, String>, String> {
    let RawValue::Map(pairs) = raw else {
        return Err("expected a mapping of setting names to values".into());
    };
    let mut out = BTreeMap::new();
    for (name, value) in pairs {
        check_setting_name(name).map_err(|why| format!("setting {name:?}: {why}"))?;
        let value =
            text(value).map_err(|_| format!("setting {name:?}: expected a scalar value"))?;
        if value.contains('\0') {
            return Err(format!("setting {name:?}: the value contains a NUL byte"));
        }
        out.insert(name.clone(), value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn file(key: &str) -> Source {
        Source::File {
            path: "database/default.yaml".into(),
            key: format!("database.postgres.{key}"),
        }
    }

    fn settings(pairs: &[(&str, RawValue)]) -> Result<PoolSettings> {
        let mut s = PoolSettings::new();
        for (k, v) in pairs {
            s.set(k, v, file(k))?;
        }
        Ok(s)
    }

    #[test]
    fn seed_names_have_one_meaning_each() {
        let s = settings(&[
            ("pool_size", RawValue::Int(10)),
            ("max_overflow", RawValue::Int(20)),
            ("pool_timeout", RawValue::Float(30.0)),
            ("pool_recycle", RawValue::Int(3600)),
            ("max_inactive_connection_lifetime", RawValue::Float(300.0)),
            ("max_queries", RawValue::Int(50000)),
            ("command_timeout", RawValue::Float(60.0)),
        ])
        .unwrap();
        let c = s.pool_config().unwrap();
        assert_eq!((c.min_size, c.max_size), (10, 30));
        assert_eq!(c.acquire_timeout, Duration::from_secs(30));
        assert_eq!(c.max_lifetime, Some(Duration::from_secs(3600)));
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(300)));
        assert_eq!(c.max_queries, Some(50000));
        assert_eq!(c.command_timeout, Some(Duration::from_secs(60)));
    }

    #[test]
    fn durations_accept_seconds_and_humantime_and_off() {
        let s = settings(&[
            ("timeout", "250ms".into()),
            ("connect_timeout", RawValue::Float(0.5)),
            ("max_lifetime", "off".into()),
            ("idle_timeout", RawValue::Null),
            ("leak_threshold", "2m".into()),
        ])
        .unwrap();
        let c = s.pool_config().unwrap();
        assert_eq!(c.acquire_timeout, Duration::from_millis(250));
        assert_eq!(c.connect_timeout, Duration::from_millis(500));
        assert_eq!((c.max_lifetime, c.idle_timeout), (None, None));
        assert_eq!(c.leak_threshold, Some(Duration::from_secs(120)));
    }

    #[test]
    fn bad_values_name_key_value_and_source() {
        for (key, value, needle) in [
            ("max_size", RawValue::Str("abc".into()), "max_size = \"abc\" (database/default.yaml: database.postgres.max_size): expected a whole number"),
            ("max_size", RawValue::Int(0), "max_size = 0"),
            ("min_size", RawValue::Int(-1), "min_size = -1"),
            ("timeout", RawValue::Int(0), "must be greater than zero"),
            ("timeout", RawValue::Float(-2.0), "must not be negative"),
            ("timeout", "off".into(), "cannot be disabled"),
            ("connect_timeout", RawValue::Int(10_000_000), "check the unit"),
            ("max_lifetime", "forever".into(), "expected a duration"),
            ("port", "http".into(), "port = \"http\""),
            ("port", RawValue::Int(70000), "expected a port number"),
            ("application_name", "".into(), "must not be empty"),
            ("server_settings", RawValue::Map(vec![("Bad Name".into(), "1".into())]), "setting \"Bad Name\""),
            ("url", "mysql://x".into(), "must start with postgres://"),
            ("password", RawValue::List(vec![]), "password = ***"),
            ("statement_cache_size", RawValue::Int(-1), "statement_cache_size = -1"),
            ("statement_cache_size", RawValue::Int(10_001), "expected a whole number in 0..=10000"),
        ] {
            let err = settings(&[(key, value)]).unwrap_err();
            assert!(err.is_config());
            assert!(err.to_string().contains(needle), "{key}: {err}");
        }
    }

    #[test]
    fn unknown_keys_suggest_the_closest_name() {
        let err = settings(&[("max_sise", RawValue::Int(3))]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: unknown key `max_sise` (database/default.yaml: database.postgres.max_sise); did you mean `max_size`?"
        );
        let err = settings(&[("frobnicate", RawValue::Int(3))]).unwrap_err();
        assert!(!err.to_string().contains("did you mean"));
    }

    #[test]
    fn cross_key_conflicts_name_both_sides() {
        let err = settings(&[
            ("min_size", RawValue::Int(50)),
            ("max_size", RawValue::Int(20)),
        ])
        .unwrap()
        .pool_config()
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("min_size = 50") && msg.contains("max_size = 20"),
            "{msg}"
        );
        let err = settings(&[
            ("pool_size", RawValue::Int(5)),
            ("max_overflow", RawValue::Int(5)),
            ("max_size", RawValue::Int(20)),
        ])
        .unwrap()
        .pool_config()
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("disagrees with pool_size + max_overflow"),
            "{err}"
        );
        let err = settings(&[
            ("command_timeout", RawValue::Int(5)),
            (
                "server_settings",
                RawValue::Map(vec![("statement_timeout".into(), "1s".into())]),
            ),
        ])
        .unwrap()
        .pool_config()
        .unwrap_err();
        assert!(err.to_string().contains("ambiguous"), "{err}");
    }

    #[test]
    fn sums_and_conflicts_name_every_source() {
        let err = settings(&[
            ("pool_size", RawValue::Int(9000)),
            ("max_overflow", RawValue::Int(2000)),
        ])
        .unwrap()
        .pool_config()
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: max_size = pool_size + max_overflow = 9000 (database/default.yaml: database.postgres.pool_size) + 2000 (database/default.yaml: database.postgres.max_overflow) = 11000: expected at most 10000"
        );
        let mut s = PoolSettings::new();
        s.set("command_timeout", &"5s".into(), Source::Code)
            .unwrap();
        s.set(
            "server_settings",
            &RawValue::Map(vec![("statement_timeout".into(), "1s".into())]),
            file("server_settings"),
        )
        .unwrap();
        let msg = s.pool_config().unwrap_err().to_string();
        assert!(
            msg.contains("server_settings.statement_timeout = \"1s\" (database/default.yaml: database.postgres.server_settings)")
                && msg.contains("command_timeout = 5s (code)"),
            "{msg}"
        );
    }

    #[test]
    fn pool_keys_in_a_url_query_use_the_same_parser() {
        let env = Source::Env {
            var: "DATABASE_URL".into(),
        };
        let mut s = PoolSettings::new();
        s.set("pool_timeout", &RawValue::Int(30), file("pool_timeout"))
            .unwrap();
        s.set(
            "url",
            &"postgres://u:pw@h/d?pool_size=5&max_overflow=5&pool_timeout=2.5&application_name=svc&sslmode=disable&options=-c%20a%3Db".into(),
            env.clone(),
        )
        .unwrap();
        let (t, c) = s.resolve().unwrap();
        assert_eq!(t.key(), "postgres://u@h:5432/d?options=-c%20a%3Db");
        assert_eq!((c.min_size, c.max_size), (5, 10));
        assert_eq!(c.acquire_timeout, Duration::from_millis(2500));
        assert_eq!(c.application_name, "svc");
        let rows = s.explain().unwrap();
        let timeout = rows.iter().find(|r| r.key == "timeout").unwrap();
        assert_eq!(timeout.source.to_string(), "url from env DATABASE_URL");
        // A bad value in the query names the key, the value and the URL's
        // source; the password stays masked.
        let err = PoolSettings::new()
            .set("url", &"postgres://u:Secret9@h/d?max_size=abc".into(), env)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("max_size = \"abc\" (url from env DATABASE_URL): expected a whole number"),
            "{err}"
        );
        assert!(!err.contains("Secret9"));
    }

    #[test]
    fn validate_names_the_field_and_code_as_the_source() {
        let bad = PoolConfig {
            max_size: 0,
            ..PoolConfig::default()
        };
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "invalid configuration: max_size = 0 (code): expected 1..=10000"
        );
        let bad = PoolConfig {
            min_size: 20,
            max_size: 10,
            ..PoolConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("min_size = 20 (code): greater than max_size = 10"));
    }

    #[test]
    fn max_size_defaults_to_at_least_min_size() {
        let c = settings(&[("min_size", RawValue::Int(15))])
            .unwrap()
            .pool_config()
            .unwrap();
        assert_eq!((c.min_size, c.max_size), (15, 15));
    }

    #[test]
    fn target_parts_set_after_a_url_override_it() {
        let mut s = PoolSettings::new();
        s.set("host", &"early".into(), Source::Code).unwrap();
        s.set(
            "url",
            &"postgres://u:pw@db:5432/app".into(),
            Source::Env {
                var: "DATABASE_URL".into(),
            },
        )
        .unwrap();
        s.set("database", &"other".into(), Source::Code).unwrap();
        let t = s.target().unwrap();
        assert_eq!(t.key(), "postgres://u@db:5432/other");
        let rows = s.explain().unwrap();
        let host = rows.iter().find(|r| r.key == "host").unwrap();
        assert_eq!(host.source.to_string(), "url from env DATABASE_URL");
        let pw = rows.iter().find(|r| r.key == "password").unwrap();
        assert_eq!(pw.value, "***");
    }

    #[test]
    fn hand_built_configs_are_validated() {
        let ok = PoolConfig::default();
        assert!(ok.validate().is_ok());
        let bad = PoolConfig {
            idle_timeout: Some(Duration::ZERO),
            ..PoolConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("idle_timeout"));
        let bad = PoolConfig {
            application_name: "x".repeat(64),
            ..PoolConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("application_name"));
        let bad = PoolConfig {
            statement_cache_size: 10_001,
            ..PoolConfig::default()
        };
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "invalid configuration: statement_cache_size = 10001 (code): expected 0..=10000"
        );
    }

    #[test]
    fn statement_cache_size_is_read_and_zero_allowed() {
        let (_, c) = settings(&[("statement_cache_size", RawValue::Int(0))])
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(c.statement_cache_size, 0);
        let (_, c) = settings(&[]).unwrap().resolve().unwrap();
        assert_eq!(c.statement_cache_size, 256);
    }

    fn raw_scalar() -> impl Strategy<Value = RawValue> {
        prop_oneof![
            Just(RawValue::Null),
            any::<bool>().prop_map(RawValue::Bool),
            any::<i64>().prop_map(RawValue::Int),
            any::<f64>().prop_map(RawValue::Float),
            "\\PC{0,20}".prop_map(RawValue::Str),
        ]
    }

    proptest! {
        #[test]
        fn setting_any_key_to_any_scalar_never_panics(key in 0..CANONICAL_KEYS.len(), raw in raw_scalar()) {
            let mut s = PoolSettings::new();
            if s.set(CANONICAL_KEYS[key], &raw, Source::Code).is_ok() {
                let _ = s.resolve();
                let _ = s.explain();
            }
        }
    }
}
