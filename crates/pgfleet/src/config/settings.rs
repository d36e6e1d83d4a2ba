//! [`PoolSettings`]: the one parser of configuration keys, shared by YAML
//! layers, environment variables, URLs, deserialized configurations and
//! code. Every key is set through the table in `keys.rs`; each remembers the
//! source that set it, and [`PoolSettings::explain`] shows them all.

use std::collections::BTreeMap;
use std::fmt;

use super::keys::{self, Kind, KEYS, MAX_POOL_SIZE};
use super::pool::PoolConfig;
use super::value::{self, RawValue, Source};
use crate::address::{mask_url_text, Target};
use crate::error::{Error, Result};

/// Raw settings of one pool, merged layer over layer: every key optional,
/// each with the source that set it. [`PoolSettings::resolve`] applies the
/// defaults and the checks across keys.
///
/// `Debug` shows the password as `***` and masks it inside a URL.
#[derive(Clone, Default)]
pub struct PoolSettings {
    /// The pool keys set so far, applied over the defaults in the order set.
    config: PoolConfig,
    /// `max_overflow`, which has no field of its own: it sums into
    /// `max_size`.
    max_overflow: Option<u32>,
    /// The target keys set so far.
    parts: Parts,
    /// Which keys are set, by whom, and in what order.
    set: BTreeMap<&'static str, Setting>,
    seq: u64,
}

/// The target keys as set (the URL's own parts live in `url`).
#[derive(Clone, Default)]
struct Parts {
    url: Option<String>,
    host: Option<String>,
    /// One port, or a comma list of ports (checked when set).
    port: Option<String>,
    database: Option<String>,
    user: Option<String>,
    password: Option<String>,
    /// Connection parameters by name: TLS, `target_session_attrs`,
    /// `load_balance_hosts` (checked when set).
    params: BTreeMap<&'static str, String>,
}

/// Who set a key, and when.
#[derive(Debug, Clone)]
struct Setting {
    source: Source,
    /// Order of setting: target parts set after a URL override the URL's.
    seq: u64,
}

/// One effective value and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Effective {
    /// The canonical key.
    pub key: String,
    /// The value as shown to people (passwords as `***`).
    pub value: String,
    /// Where it came from.
    pub source: Source,
    /// What the key does, in one line.
    pub doc: &'static str,
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
    pub fn set(&mut self, name: &str, raw: &RawValue, source: Source) -> Result<()> {
        let Some(key) = keys::lookup(name) else {
            let hint = keys::suggest(name)
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            return Err(Error::config(format!(
                "invalid configuration: unknown key `{name}` ({source}){hint}"
            )));
        };
        let shown = if matches!(key.kind, Kind::Secret) {
            "***".to_owned()
        } else {
            raw.to_string()
        };
        let fail = |why: String| {
            Error::config(format!(
                "invalid configuration: {name} = {shown} ({source}): {why}"
            ))
        };
        match &key.kind {
            Kind::Url => {
                let url = value::text(raw).map_err(fail)?;
                self.set_url(&url, &source)?;
            }
            Kind::Host => {
                let host = value::text(raw).map_err(fail)?;
                if host.is_empty() {
                    return Err(fail("the host must not be empty".into()));
                }
                if host.split(',').any(|h| h.trim().is_empty()) {
                    return Err(fail("a host of the list is empty".into()));
                }
                self.parts.host = Some(host);
            }
            Kind::Port => self.parts.port = Some(value::ports(raw).map_err(fail)?),
            Kind::User => self.parts.user = Some(value::text(raw).map_err(fail)?),
            Kind::Database => self.parts.database = Some(value::text(raw).map_err(fail)?),
            Kind::Secret => self.parts.password = Some(value::text(raw).map_err(fail)?),
            Kind::Param(_) => {
                let text = value::text(raw).map_err(fail)?;
                Target::from_parts("localhost", 5432, "", "", None)?
                    .set_param(key.name, &text)
                    .map_err(fail)?;
                self.parts.params.insert(key.name, text);
            }
            Kind::Size {
                min,
                max,
                field: None,
            } => self.max_overflow = Some(keys::size(raw, *min, *max).map_err(fail)?),
            _ => {
                key.kind.apply(raw, &mut self.config).map_err(fail)?;
            }
        }
        self.seq += 1;
        self.set.insert(
            key.name,
            Setting {
                source,
                seq: self.seq,
            },
        );
        Ok(())
    }

    /// The `url` key: pool keys in the URL's query go through the same
    /// parser as every other layer, at the URL's place in the order; the
    /// rest of the URL is the target's.
    fn set_url(&mut self, url: &str, source: &Source) -> Result<()> {
        let (url, params) =
            split_pool_params(url).map_err(|why| Error::config(format!("{why} ({source})")))?;
        Target::parse(&url).map_err(|e| Error::config(format!("{e} ({source})")))?;
        let from = Source::Url {
            from: Box::new(source.clone()),
        };
        let mut staged = self.clone();
        for (param, value) in &params {
            staged.set(param, &RawValue::Str(value.clone()), from.clone())?;
        }
        *self = staged;
        self.parts.url = Some(url);
        Ok(())
    }

    /// Whether a key (any accepted name) was set.
    pub fn is_set(&self, name: &str) -> bool {
        keys::lookup(name).is_some_and(|k| self.set.contains_key(k.name))
    }

    fn setting(&self, name: &str) -> Option<&Setting> {
        self.set.get(name)
    }

    fn source(&self, name: &str) -> Source {
        self.setting(name)
            .map_or(Source::Default, |s| s.source.clone())
    }

    /// The target: the `url` if set, with `host`, `port`, `database`,
    /// `user`, `password` set after it (higher layers) overriding its parts;
    /// otherwise the parts, defaulting to `localhost:5432`, user `postgres`.
    ///
    /// # Errors
    /// `Config` for a URL that does not parse.
    pub fn target(&self) -> Result<Target> {
        let url = self.parts.url.as_deref().zip(self.setting("url"));
        let url_seq = url.map(|(_, s)| s.seq);
        // A part set after the URL (or with no URL at all).
        let after_url = |name: &str| {
            self.setting(name)
                .is_some_and(|s| url_seq.is_none_or(|url_seq| s.seq > url_seq))
        };
        let part = |name: &str, value: &Option<String>| value.clone().filter(|_| after_url(name));
        let host = part("host", &self.parts.host);
        let database = part("database", &self.parts.database);
        let user = part("user", &self.parts.user);
        let password = part("password", &self.parts.password);
        let port = self.parts.port.clone().filter(|_| after_url("port"));
        let target = match url {
            Some((text, setting)) => Target::parse(text)
                .map_err(|e| Error::config(format!("{e} ({})", setting.source)))?
                .with_parts(
                    host.as_deref(),
                    port.as_deref(),
                    database.as_deref(),
                    user.as_deref(),
                    password.as_deref(),
                ),
            None => {
                let host = host.as_deref().unwrap_or("localhost");
                let target = Target::from_parts(
                    host,
                    5432,
                    database.as_deref().unwrap_or(""),
                    user.as_deref().unwrap_or(""),
                    password.as_deref(),
                )?;
                match port {
                    Some(port) => target.with_hosts(host, &port),
                    None => Ok(target),
                }
            }
        }?;
        // A connection parameter set in any layer holds unless a later URL
        // names the same parameter (as libpq: a connection string overrides
        // only what it says).
        let mut target = target;
        for (name, value) in &self.parts.params {
            if after_url(name) || !self.url_names(name) {
                // Checked when set.
                let _ = target.set_param(name, value);
            }
        }
        Ok(target)
    }

    /// Whether the `url` key's query names the parameter `name`.
    fn url_names(&self, name: &str) -> bool {
        let Some((_, query)) = self.parts.url.as_deref().and_then(|u| u.split_once('?')) else {
            return false;
        };
        query
            .split('&')
            .any(|pair| pair.split_once('=').map_or(pair, |(k, _)| k) == name)
    }

    /// The pool configuration: defaults for what is not set, then the
    /// checks across keys (`min_size <= max_size`, `max_size` against
    /// `pool_size + max_overflow`). Resolved: `max_size` is always `Some`,
    /// the cap in force.
    ///
    /// # Errors
    /// A `Config` error naming the keys, values and sources in conflict.
    pub fn pool_config(&self) -> Result<PoolConfig> {
        let mut config = self.config.clone();
        let min_size = config.min_size;
        let min_source = || self.source("min_size");
        if let Some(over) = self.max_overflow {
            let over_source = self.source("max_overflow");
            let sum = u64::from(min_size) + u64::from(over);
            match config.max_size {
                Some(max) if u64::from(max) != sum => {
                    return Err(Error::config(format!(
                        "invalid configuration: max_size = {max} ({}) disagrees with pool_size + max_overflow = {min_size} + {over} ({over_source}); set one of them",
                        self.source("max_size")
                    )));
                }
                Some(_) => {}
                None if sum > u64::from(MAX_POOL_SIZE) => {
                    return Err(Error::config(format!(
                        "invalid configuration: max_size = pool_size + max_overflow = {min_size} ({}) + {over} ({over_source}) = {sum}: expected at most {MAX_POOL_SIZE}",
                        min_source()
                    )));
                }
                None => config.max_size = Some(sum as u32),
            }
        }
        if let Some(max) = config.max_size.filter(|max| min_size > *max) {
            return Err(Error::config(format!(
                "invalid configuration: min_size = {min_size} ({}) is greater than max_size = {max} ({})",
                min_source(),
                self.source("max_size")
            )));
        }
        if let (Some(command), Some(statement_timeout)) = (
            config.command_timeout,
            config.server_settings.get("statement_timeout"),
        ) {
            return Err(Error::config(format!(
                "invalid configuration: server_settings.statement_timeout = {statement_timeout:?} ({}) conflicts with command_timeout = {} ({}): ambiguous, both set statement_timeout; set one of them",
                self.source("server_settings"),
                humantime::format_duration(command),
                self.source("command_timeout")
            )));
        }
        // Resolved: the cap in force, whether set or following `min_size`.
        config.max_size = Some(config.effective_max_size());
        // The checks above and in `set` leave nothing for `problem` to find;
        // it stays as a safety net, naming the source of the field.
        if let Some(p) = config.problem() {
            return Err(Error::config(format!(
                "invalid configuration: {} = {} ({}): {}",
                p.key,
                p.value,
                self.source(p.key),
                p.why
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
                value::check_application_name(name).map_err(|why| {
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
    /// reference's order. Passwords show as `***`; `server_settings` is
    /// listed when set.
    ///
    /// # Errors
    /// As [`resolve`](Self::resolve).
    pub fn explain(&self) -> Result<Vec<Effective>> {
        let (target, config) = self.resolve()?;
        let url = self.setting("url");
        let url_source = || Source::Url {
            from: Box::new(url.map_or(Source::Default, |u| u.source.clone())),
        };
        let target_source = |name: &str| match (self.setting(name), url) {
            (Some(s), Some(u)) if s.seq < u.seq => url_source(),
            (Some(s), _) => s.source.clone(),
            (None, Some(_)) => url_source(),
            (None, None) => Source::Default,
        };
        let list = |items: &mut dyn Iterator<Item = String>| items.collect::<Vec<_>>().join(",");
        let mut rows = Vec::new();
        for key in KEYS {
            let (value, source) = match &key.kind {
                Kind::Url if url.is_none() => continue,
                Kind::Url => (target.masked_url(), self.source("url")),
                Kind::Host => (
                    list(&mut target.endpoints().iter().map(|e| e.host.to_string())),
                    target_source(key.name),
                ),
                Kind::Port => (
                    list(&mut target.endpoints().iter().map(|e| e.port.to_string())),
                    target_source(key.name),
                ),
                Kind::User => (target.user().to_owned(), target_source(key.name)),
                Kind::Database => (target.database().to_owned(), target_source(key.name)),
                Kind::Secret => (
                    if target.has_password() {
                        "***"
                    } else {
                        "(none)"
                    }
                    .to_owned(),
                    target_source(key.name),
                ),
                Kind::Param(_) => (
                    target.shown_param(key.name),
                    match (self.setting(key.name), url) {
                        (Some(s), Some(u)) if s.seq < u.seq && self.url_names(key.name) => {
                            url_source()
                        }
                        (Some(s), _) => s.source.clone(),
                        (None, Some(_)) if self.url_names(key.name) => url_source(),
                        (None, _) => Source::Default,
                    },
                ),
                Kind::Settings(_) if config.server_settings.is_empty() => continue,
                // max_size derived from pool_size + max_overflow.
                Kind::MaxSize { .. } if !self.is_set("max_size") && self.is_set("max_overflow") => {
                    (
                        key.kind.show(&config).unwrap_or_default(),
                        self.source("max_overflow"),
                    )
                }
                _ => match key.kind.show(&config) {
                    Some(shown) => (shown, self.source(key.name)),
                    // max_overflow: shown as the max_size it makes.
                    None => continue,
                },
            };
            rows.push(Effective {
                key: key.name.to_owned(),
                value,
                source,
                doc: key.doc,
            });
        }
        Ok(rows)
    }
}

impl fmt::Debug for PoolSettings {
    /// The keys set, their values as `explain` shows them (the password as
    /// `***`, a URL masked) and their sources.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (name, setting) in &self.set {
            let shown = match *name {
                "url" => self.parts.url.as_deref().map(mask_url_text),
                "password" => Some("***".to_owned()),
                "host" => self.parts.host.clone(),
                "port" => self.parts.port.clone(),
                "database" => self.parts.database.clone(),
                "user" => self.parts.user.clone(),
                "max_overflow" => self.max_overflow.map(|n| n.to_string()),
                name if self.parts.params.contains_key(name) => {
                    self.parts.params.get(name).cloned()
                }
                other => keys::key(other).kind.show(&self.config),
            };
            map.entry(
                name,
                &format_args!("{} ({})", shown.unwrap_or_default(), setting.source),
            );
        }
        map.finish()
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
        if keys::lookup(name).is_some_and(|k| k.kind.is_url_param()) {
            let value = percent_encoding::percent_decode_str(value)
                .decode_utf8()
                .map_err(|_| {
                    format!(
                        "invalid database URL {}: {name} is not valid UTF-8 once decoded",
                        mask_url_text(url)
                    )
                })?;
            params.push((name.to_owned(), value.into_owned()));
        } else {
            kept.push(pair);
        }
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, params))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

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
        assert_eq!((c.min_size, c.effective_max_size()), (10, 30));
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
    fn tls_keys_come_from_the_url_and_later_layers_override_them() {
        use crate::tls::{RootCert, SslMode};
        let mut s = PoolSettings::new();
        s.set(
            "url",
            &"postgres://u@db.internal/d?sslmode=require&sslrootcert=/etc/url-ca.pem".into(),
            Source::Code,
        )
        .unwrap();
        s.set("sslmode", &"verify-full".into(), file("sslmode"))
            .unwrap();
        s.set("sslsni", &RawValue::Int(0), file("sslsni")).unwrap();
        let target = s.target().unwrap();
        let tls = target.tls();
        assert_eq!(tls.mode(), SslMode::VerifyFull, "the later layer wins");
        assert_eq!(
            tls.root_cert_setting(),
            Some(&RootCert::File("/etc/url-ca.pem".into())),
            "the URL's value stays"
        );
        assert!(!tls.sends_sni());
        let rows = s.explain().unwrap();
        let mode = rows.iter().find(|r| r.key == "sslmode").unwrap();
        assert_eq!(mode.value, "verify-full");
        assert_eq!(mode.source, file("sslmode"));
        let root = rows.iter().find(|r| r.key == "sslrootcert").unwrap();
        assert_eq!(root.value, "/etc/url-ca.pem");
        let sni = rows.iter().find(|r| r.key == "sslsni").unwrap();
        assert_eq!(sni.source, file("sslsni"));
        let binding = rows.iter().find(|r| r.key == "channel_binding").unwrap();
        assert_eq!(binding.source, Source::Default, "the URL does not name it");

        // YAML's TLS keys survive a later URL (DATABASE_URL) that does not
        // name them; one that does wins.
        let mut s = PoolSettings::new();
        s.set("sslmode", &"verify-full".into(), file("sslmode"))
            .unwrap();
        s.set(
            "sslrootcert",
            &"/etc/yaml-ca.pem".into(),
            file("sslrootcert"),
        )
        .unwrap();
        let env = Source::Env {
            var: "DATABASE_URL".into(),
        };
        s.set(
            "url",
            &"postgres://u@h/d?sslrootcert=/etc/env-ca.pem".into(),
            env,
        )
        .unwrap();
        let tls = s.target().unwrap().tls().clone();
        assert_eq!(tls.mode(), SslMode::VerifyFull);
        assert_eq!(
            tls.root_cert_setting(),
            Some(&RootCert::File("/etc/env-ca.pem".into()))
        );
        // A bad value names the key, the value and where it came from.
        let err = PoolSettings::new()
            .set("sslmode", &"strict".into(), file("sslmode"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sslmode = \"strict\" (database/default.yaml: database.postgres.sslmode)")
                && err.contains("verify-full"),
            "{err}"
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
        assert_eq!((c.min_size, c.effective_max_size()), (5, 10));
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
            max_size: Some(0),
            ..PoolConfig::default()
        };
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "invalid configuration: max_size = 0 (code): expected 1..=10000"
        );
        let bad = PoolConfig {
            min_size: 20,
            max_size: Some(10),
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
        assert_eq!((c.min_size, c.effective_max_size()), (15, 15));
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
        fn setting_any_key_to_any_scalar_never_panics(key in 0..KEYS.len(), raw in raw_scalar()) {
            let mut s = PoolSettings::new();
            if s.set(KEYS[key].name, &raw, Source::Code).is_ok() {
                let _ = s.resolve();
                let _ = s.explain();
            }
        }
    }
}
