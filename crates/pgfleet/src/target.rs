//! Database targets: where a pool connects, and the key that says whether two
//! addresses are the same database.
//!
//! # Same database, same pool
//!
//! Two targets share a pool when their [`Target::key`] is equal. The key is
//! `postgres://user@host:port/database`, plus `?options=...` when the libpq
//! `options` startup parameter is set, built so that:
//!
//! * `postgres://` and `postgresql://` are the same;
//! * host names compare case-insensitively; the default port 5432 is made
//!   explicit; the database defaults to the user name, the user to
//!   `postgres`; percent-encoding is decoded before comparing;
//! * the password is never part of the key;
//! * `application_name`, `connect_timeout` and the TLS parameters
//!   (`sslmode`, `sslrootcert`, ...) are connection behaviour, not identity,
//!   and are left out (callers sharing a pool must agree on TLS: see
//!   [`Fleet::pool`](crate::Fleet::pool));
//! * a different user, or different `options` (e.g. another `search_path`),
//!   is a different pool;
//! * `localhost` and `127.0.0.1` are **not** merged: they can resolve to
//!   different servers (IPv6, `/etc/hosts`).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::error::{Error, Result};
use crate::tls::TlsConfig;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Host {
    /// A TCP host name or IP address (IPv6 without brackets).
    Tcp(String),
    /// A directory holding the server's Unix socket (`.s.PGSQL.<port>`).
    Unix(PathBuf),
}

/// A database address: host, port, database, user, password and startup
/// options.
///
/// Build one from a URL with [`Target::parse`] or from parts with
/// [`Target::from_parts`]. `Display` and `Debug` never show the password.
#[derive(Clone)]
pub struct Target {
    pub(crate) host: Host,
    pub(crate) port: u16,
    pub(crate) database: String,
    pub(crate) user: String,
    pub(crate) password: Option<String>,
    /// The libpq `options` startup parameter (e.g. `-c search_path=app`).
    pub(crate) options: Option<String>,
    application_name: Option<String>,
    connect_timeout: Option<Duration>,
    /// How connections use TLS (shared by clones).
    pub(crate) tls: Arc<TlsConfig>,
    /// The normalised key: see [`Target::key`]. Shared with the clones of
    /// this target and with the fleet entry made from it, so the fleet's
    /// lookup usually compares pointers, not text.
    pub(crate) key: Arc<str>,
    /// `key` hashed once with [`key_hash`], so the fleet's lookup of an
    /// existing pool never hashes the key again.
    pub(crate) key_hash: u64,
}

/// The hash of a target key, with one process-wide randomly seeded hasher.
pub(crate) fn key_hash(key: &str) -> u64 {
    use std::hash::BuildHasher;
    static HASHER: std::sync::OnceLock<foldhash::fast::RandomState> = std::sync::OnceLock::new();
    HASHER.get_or_init(Default::default).hash_one(key)
}

/// Characters left as they are in user names, database names and hosts of
/// the displayed URL and the key.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Inside brackets the colons of an IPv6 address stay as they are.
const IPV6: &AsciiSet = &COMPONENT.remove(b':');

fn encode(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
}

fn decode(s: &str, what: &str, url: &str) -> Result<String> {
    let bad = |why: &str| {
        Error::config(format!(
            "invalid database URL {}: {what} {why}",
            mask_url_text(url)
        ))
    };
    // `%` must start an escape of two hex digits (`%zz` or a lone `%` is
    // a mistake, not a user named so); the bytes it gives must be UTF-8.
    let bytes = s.as_bytes();
    for (i, _) in s.match_indices('%') {
        let escape = bytes.get(i + 1..i + 3);
        if !escape.is_some_and(|e| e.iter().all(u8::is_ascii_hexdigit)) {
            return Err(bad(
                "has a `%` that is not followed by two hex digits (write `%25` for a `%`)",
            ));
        }
    }
    percent_decode_str(s)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| bad("is not valid UTF-8 once decoded"))
}

/// Best-effort masking of a URL that may not parse: hides whatever stands
/// between the first `:` after the scheme and the last `@`, and any
/// `password=` query value.
pub(crate) fn mask_url_text(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let rest_start = scheme_end + 3;
        let authority_end = out[rest_start..]
            .find(['/', '?'])
            .map_or(out.len(), |i| rest_start + i);
        // The `@` ending the user info: in the authority, or, when a raw
        // `/` or `?` in the password cut the authority short, the last one
        // anywhere (masking too much is safe, too little is not).
        let at = out[rest_start..authority_end]
            .rfind('@')
            .or_else(|| out[rest_start..].rfind('@'))
            .map(|i| rest_start + i);
        if let Some(at) = at {
            if let Some(colon) = out[rest_start..at].find(':') {
                out.replace_range(rest_start + colon + 1..at, "***");
            }
        }
    }
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let masked: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k == "password" => format!("{k}=***"),
                _ => kv.to_owned(),
            })
            .collect();
        out = format!("{head}{}", masked.join("&"));
    }
    out
}

impl Target {
    /// Parses a `postgres://` or `postgresql://` URL:
    /// `postgres://user:password@host:port/database?param=value&...`.
    ///
    /// Query parameters: `options`, `application_name`, `connect_timeout`
    /// (seconds), libpq's TLS parameters `sslmode`, `sslrootcert`,
    /// `sslcert`, `sslkey`, `sslsni`, `channel_binding` (see [`TlsConfig`]),
    /// and `user`, `password`, `dbname`, `host` (a directory for a Unix
    /// socket), `port` overriding the URL's parts. A host that is a percent-encoded absolute
    /// path (`%2Fvar%2Frun%2Fpostgresql`) is a Unix socket directory.
    ///
    /// # Errors
    /// A `Config` error naming the problem; the password is masked in it.
    pub fn parse(url: &str) -> Result<Target> {
        match Target::parse_url(url) {
            // The messages of a failed parse quote pieces of the URL; when a
            // raw `/`, `?` or `#` in the password cut the authority short,
            // those pieces are pieces of the password.
            Err(_) if userinfo_cut_short(url) => Err(Error::config(format!(
                "invalid database URL {}: it cannot be read; a `/`, `?`, `#` or `@` in the user or password must be percent-encoded (%2F, %3F, %23, %40)",
                mask_url_text(url)
            ))),
            parsed => parsed,
        }
    }

    fn parse_url(url: &str) -> Result<Target> {
        let bad = |why: String| {
            Error::config(format!(
                "invalid database URL {}: {why}",
                mask_url_text(url)
            ))
        };
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or_else(|| bad("it must start with postgres:// or postgresql://".into()))?;
        if rest.contains('#') {
            return Err(bad("a URL fragment (#...) is not allowed".into()));
        }
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let raw_database = path.trim_end_matches('/');
        if raw_database.contains('/') {
            return Err(bad(format!(
                "the path /{raw_database} has more than one segment (percent-encode '/' in a database name)"
            )));
        }
        let mut parts = UrlParts::from_authority(authority, url, &bad)?;
        parts.database = decode(raw_database, "the database", url)?;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            parts.set_param(k, decode(v, k, url)?, &bad)?;
        }
        if parts.host.is_empty() {
            return Err(bad("no host".into()));
        }
        // Checked again here: a `host=` parameter can list several too.
        if parts.host.contains(',') || parts.port.as_deref().is_some_and(|p| p.contains(',')) {
            return Err(bad("several hosts are not supported; give one host".into()));
        }
        let port = match parts.port.as_deref() {
            None | Some("") => 5432,
            Some(p) => parse_port(p).map_err(bad)?,
        };
        let mut target = Target::from_parts(
            &parts.host,
            port,
            &parts.database,
            &parts.user,
            parts.password.as_deref(),
        )?;
        target.options = parts.options.filter(|o| !o.is_empty());
        target.application_name = parts.application_name;
        target.connect_timeout = parts.connect_timeout;
        target.tls = Arc::new(parts.tls);
        target.rekey();
        Ok(target)
    }

    /// A target from its parts. An empty `user` means `postgres`; an empty
    /// `database` means the user name; a `host` starting with `/` is a Unix
    /// socket directory.
    ///
    /// # Errors
    /// `Config` for an empty host, several hosts (`h1,h2`) or port 0.
    pub fn from_parts(
        host: &str,
        port: u16,
        database: &str,
        user: &str,
        password: Option<&str>,
    ) -> Result<Target> {
        if host.is_empty() {
            return Err(Error::config("invalid target: the host is empty"));
        }
        if port == 0 {
            return Err(Error::config("invalid target: port 0"));
        }
        if host.contains(',') {
            return Err(Error::config(format!(
                "invalid target: host {host:?}: several hosts are not supported; give one host"
            )));
        }
        let host = if host.starts_with('/') {
            Host::Unix(PathBuf::from(host))
        } else {
            Host::Tcp(host.to_ascii_lowercase())
        };
        let user = if user.is_empty() { "postgres" } else { user }.to_owned();
        let database = if database.is_empty() {
            user.clone()
        } else {
            database.to_owned()
        };
        let mut target = Target {
            host,
            port,
            database,
            user,
            password: password.map(str::to_owned),
            options: None,
            application_name: None,
            connect_timeout: None,
            tls: Arc::default(),
            key: Arc::from(""),
            key_hash: 0,
        };
        target.rekey();
        Ok(target)
    }

    /// A copy with some parts replaced (`None` keeps the part), keeping the
    /// URL's other parameters.
    pub(crate) fn with_parts(
        &self,
        host: Option<&str>,
        port: Option<u16>,
        database: Option<&str>,
        user: Option<&str>,
        password: Option<&str>,
    ) -> Result<Target> {
        let current_host = match &self.host {
            Host::Tcp(h) => h.clone(),
            Host::Unix(p) => p.display().to_string(),
        };
        let mut target = Target::from_parts(
            host.unwrap_or(&current_host),
            port.unwrap_or(self.port),
            database.unwrap_or(&self.database),
            user.unwrap_or(&self.user),
            password.or(self.password.as_deref()),
        )?;
        target.options = self.options.clone();
        target.application_name = self.application_name.clone();
        target.connect_timeout = self.connect_timeout;
        target.tls = self.tls.clone();
        target.rekey();
        Ok(target)
    }

    fn host_text(&self) -> String {
        match &self.host {
            Host::Tcp(h) if h.contains(':') => {
                format!("[{}]", utf8_percent_encode(h, IPV6))
            }
            Host::Tcp(h) => encode(h),
            Host::Unix(dir) => encode(&dir.display().to_string()),
        }
    }

    /// Recomputes the key and its hash after the parts changed.
    fn rekey(&mut self) {
        self.key = self.make_key().into();
        self.key_hash = key_hash(&self.key);
    }

    fn make_key(&self) -> String {
        let mut key = format!(
            "postgres://{}@{}:{}/{}",
            encode(&self.user),
            self.host_text(),
            self.port,
            encode(&self.database)
        );
        if let Some(options) = &self.options {
            key.push_str("?options=");
            key.push_str(&encode(options));
        }
        key
    }

    /// The host.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The database name.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// The user name.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The `options` startup parameter, if any.
    pub fn options(&self) -> Option<&str> {
        self.options.as_deref()
    }

    /// Whether a password is set.
    pub fn has_password(&self) -> bool {
        self.password.is_some()
    }

    pub(crate) fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// A copy with another password (`None` to remove it).
    pub fn with_password(mut self, password: Option<&str>) -> Target {
        self.password = password.map(str::to_owned);
        self
    }

    /// How connections to this target use TLS.
    pub fn tls(&self) -> &TlsConfig {
        &self.tls
    }

    /// A copy whose connections use TLS as `tls` says.
    pub fn with_tls(mut self, tls: TlsConfig) -> Target {
        self.tls = Arc::new(tls);
        self
    }

    /// `application_name` given in the URL, if any.
    pub fn url_application_name(&self) -> Option<&str> {
        self.application_name.as_deref()
    }

    /// `connect_timeout` given in the URL, if any.
    pub fn url_connect_timeout(&self) -> Option<Duration> {
        self.connect_timeout
    }

    /// The normalised key of this target: two targets with the same key are
    /// the same database and share one pool. It never contains the password.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Identifies the server (host and port, or socket directory and port).
    pub fn server_key(&self) -> String {
        format!("{}:{}", self.host_text(), self.port)
    }

    /// The URL with the password shown as `***`.
    pub fn masked_url(&self) -> String {
        self.to_string()
    }
}

/// Whether the authority of `url` (up to the first `/`, `?` or `#`) has no
/// `@` while one follows later: the sign of a raw `/`, `?` or `#` in the
/// user or password.
fn userinfo_cut_short(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else {
        return false;
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    !rest[..end].contains('@') && rest[end..].contains('@')
}

/// The parts of a URL as read, before the defaults of [`Target::from_parts`].
#[derive(Default)]
struct UrlParts {
    user: String,
    password: Option<String>,
    host: String,
    port: Option<String>,
    database: String,
    options: Option<String>,
    application_name: Option<String>,
    connect_timeout: Option<Duration>,
    tls: TlsConfig,
}

impl UrlParts {
    /// `user:password@host:port`, the host possibly a bracketed IPv6
    /// address.
    fn from_authority(
        authority: &str,
        url: &str,
        bad: &dyn Fn(String) -> Error,
    ) -> Result<UrlParts> {
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let mut parts = UrlParts::default();
        if let Some(info) = userinfo {
            match info.split_once(':') {
                Some((u, p)) => {
                    parts.user = decode(u, "the user", url)?;
                    parts.password = Some(decode(p, "the password", url)?);
                }
                None => parts.user = decode(info, "the user", url)?,
            }
        }
        if hostport.contains(',') {
            return Err(bad("several hosts are not supported; give one host".into()));
        }
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (addr, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("unterminated [ in the IPv6 host".into()))?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| bad(format!("unexpected {p:?} after the IPv6 host")))?,
                ),
            };
            (decode(addr, "the host", url)?, port)
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (decode(h, "the host", url)?, Some(p)),
                None => (decode(hostport, "the host", url)?, None),
            }
        };
        parts.host = host;
        parts.port = port.map(str::to_owned);
        Ok(parts)
    }

    /// One query parameter, decoded.
    fn set_param(
        &mut self,
        name: &str,
        value: String,
        bad: &dyn Fn(String) -> Error,
    ) -> Result<()> {
        match name {
            "options" => self.options = Some(value),
            "application_name" => self.application_name = Some(value),
            "connect_timeout" => {
                let secs: u64 = value.parse().ok().filter(|s| *s > 0).ok_or_else(|| {
                    bad(format!(
                        "connect_timeout = {value:?}: expected whole seconds >= 1"
                    ))
                })?;
                self.connect_timeout = Some(Duration::from_secs(secs));
            }
            "user" => self.user = value,
            "password" => self.password = Some(value),
            "dbname" => self.database = value,
            "host" => self.host = value,
            "port" => self.port = Some(value),
            other => match self.tls.set_param(other, &value) {
                Ok(true) => {}
                Ok(false) => {
                    return Err(bad(format!(
                        "unknown parameter {other:?} (known: options, application_name, connect_timeout, sslmode, sslrootcert, sslcert, sslkey, sslsni, channel_binding, user, password, dbname, host, port)"
                    )))
                }
                Err(why) => return Err(bad(format!("{other} = {why}"))),
            },
        }
        Ok(())
    }
}

fn parse_port(text: &str) -> std::result::Result<u16, String> {
    match text.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        Ok(p) => Err(format!("port {p} is out of range 1..=65535")),
        Err(_) => Err(format!("port {text:?} is not a number")),
    }
}

impl FromStr for Target {
    type Err = Error;
    fn from_str(s: &str) -> Result<Target> {
        Target::parse(s)
    }
}

impl PartialEq for Target {
    /// Same key, same password and the same TLS settings.
    fn eq(&self, other: &Target) -> bool {
        self.key == other.key && self.password == other.password && self.tls == other.tls
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "postgres://{}", encode(&self.user))?;
        if self.password.is_some() {
            f.write_str(":***")?;
        }
        write!(
            f,
            "@{}:{}/{}",
            self.host_text(),
            self.port,
            encode(&self.database)
        )
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("options", &self.options)
            .field("tls", &self.tls)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(url: &str) -> String {
        Target::parse(url).unwrap().key().to_owned()
    }

    #[test]
    fn same_database_urls_have_the_same_key() {
        let k = key("postgres://app:pw@db.example:5432/memfuse");
        for url in [
            "postgresql://app:pw@db.example:5432/memfuse",
            "postgres://app:other@DB.Example/memfuse",
            "postgres://app@db.example:5432/memfuse?password=x&application_name=a&connect_timeout=3",
            "postgres://app@db.example/memfuse/?sslmode=disable",
            "postgres://%61pp@db.example:5432/mem%66use",
            "postgres://x@db.example:5432/memfuse?user=app",
        ] {
            assert_eq!(key(url), k, "{url}");
        }
        assert_eq!(k, "postgres://app@db.example:5432/memfuse");
    }

    #[test]
    fn different_databases_have_different_keys() {
        let k = key("postgres://app@db:5432/memfuse");
        for url in [
            "postgres://other@db:5432/memfuse",
            "postgres://app@db:5433/memfuse",
            "postgres://app@db2:5432/memfuse",
            "postgres://app@db:5432/memfuse2",
            "postgres://app@db:5432/memfuse?options=-c%20search_path%3Dx",
        ] {
            assert_ne!(key(url), k, "{url}");
        }
        assert_ne!(
            key("postgres://a@localhost/x"),
            key("postgres://a@127.0.0.1/x")
        );
    }

    #[test]
    fn defaults_user_postgres_and_database_user() {
        let t = Target::parse("postgres://db").unwrap();
        assert_eq!(
            (t.user(), t.database(), t.port()),
            ("postgres", "postgres", 5432)
        );
        let t = Target::parse("postgres://app@db").unwrap();
        assert_eq!(t.database(), "app");
    }

    #[test]
    fn ipv6_and_unix_socket_hosts() {
        let t = Target::parse("postgres://u@[::1]:6000/d").unwrap();
        assert_eq!(t.host(), &Host::Tcp("::1".into()));
        assert_eq!(t.port(), 6000);
        assert_eq!(t.key(), "postgres://u@[::1]:6000/d");
        let t = Target::parse("postgres://u@%2Fvar%2Frun%2Fpostgresql/d").unwrap();
        assert_eq!(t.host(), &Host::Unix("/var/run/postgresql".into()));
        let t = Target::parse("postgres:///d?host=/tmp&port=5433&user=u").unwrap();
        assert_eq!(t.host(), &Host::Unix("/tmp".into()));
        assert_eq!((t.port(), t.user()), (5433, "u"));
    }

    #[test]
    fn url_behaviour_parameters_are_kept_outside_the_key() {
        let t = Target::parse(
            "postgres://u@h/d?application_name=svc&connect_timeout=7&options=-c%20a%3Db",
        )
        .unwrap();
        assert_eq!(t.url_application_name(), Some("svc"));
        assert_eq!(t.url_connect_timeout(), Some(Duration::from_secs(7)));
        assert_eq!(t.options(), Some("-c a=b"));
    }

    #[test]
    fn malformed_urls_are_clear_errors_with_the_password_masked() {
        for (url, needle) in [
            ("mysql://u:Secret1@h/d", "must start with postgres://"),
            (
                "postgres://u:Secret1@h:abc/d",
                "port \"abc\" is not a number",
            ),
            ("postgres://u:Secret1@h:0/d", "out of range"),
            ("postgres://u:Secret1@h:70000/d", "out of range"),
            ("postgres://u:Secret1@h1,h2/d", "several hosts"),
            ("postgres://u:Secret1@/d?host=h1,h2", "several hosts"),
            ("postgres://u:Secret1@h/d?port=5432,5433", "several hosts"),
            (
                "postgres://u:Secret1@h/d?sslmode=strict",
                "sslmode = \"strict\": expected disable, allow, prefer, require, verify-ca or verify-full",
            ),
            (
                "postgres://u:Secret1@h/d?frobnicate=1",
                "unknown parameter \"frobnicate\"",
            ),
            ("postgres://u:Secret1@[::1/d", "unterminated ["),
            (
                "postgres://%zz:Secret1@h/d",
                "the user has a `%` that is not",
            ),
            (
                "postgres://u:Secret1%@h/d",
                "the password has a `%` that is not",
            ),
            ("postgres://u:Secret1@h/d%4", "the database has a `%`"),
            // A raw `/` or `?` in the password cuts the authority short.
            ("postgres://u:Sec/ret1@h/d", "must be percent-encoded"),
            ("postgres://u:Sec?ret1@h/d", "must be percent-encoded"),
            ("postgres://u:Secret1@/d", "no host"),
            (
                "postgres://u:Secret1@h/d?connect_timeout=-1",
                "connect_timeout",
            ),
        ] {
            let err = Target::parse(url).unwrap_err();
            let msg = err.to_string();
            assert!(err.is_config());
            assert!(msg.contains(needle), "{url}: {msg}");
            assert!(!msg.contains("Secret1"), "{msg}");
            assert!(!msg.contains("ret1"), "{msg}");
        }
    }

    #[test]
    fn display_and_debug_mask_the_password() {
        let t = Target::parse("postgres://app:hunter2@db:5432/x").unwrap();
        assert_eq!(t.to_string(), "postgres://app:***@db:5432/x");
        assert!(!format!("{t:?}").contains("hunter2"));
        assert!(format!("{t:?}").contains("***"));
        assert_eq!(t.server_key(), "db:5432");
        let t = Target::parse("postgres://app@db/x").unwrap();
        assert_eq!(t.to_string(), "postgres://app@db:5432/x");
    }

    fn part() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9 _@:/?#%&=+~é-]{1,12}"
    }

    proptest! {
        #[test]
        fn round_trips_any_characters_through_percent_encoding(
            user in part(), password in part(), db in part(), host in part(), port in 1u16..,
        ) {
            let url = format!(
                "postgresql://{}:{}@{}:{}/{}",
                encode(&user), encode(&password), encode(&host), port, encode(&db)
            );
            let t = Target::parse(&url).unwrap();
            prop_assert_eq!(t.user(), user.as_str());
            prop_assert_eq!(t.password(), Some(password.as_str()));
            prop_assert_eq!(t.database(), db.as_str());
            prop_assert_eq!(t.port(), port);
            let expected_host = if host.starts_with('/') {
                Host::Unix(PathBuf::from(&host))
            } else {
                Host::Tcp(host.to_ascii_lowercase())
            };
            prop_assert_eq!(t.host(), &expected_host);
            // The key and the displayed URL parse back to the same target.
            let again = Target::parse(t.key()).unwrap();
            prop_assert_eq!(again.key(), t.key());
            prop_assert_eq!(again.host(), &expected_host);
            let shown = Target::parse(&t.to_string()).unwrap();
            prop_assert_eq!(shown.key(), t.key());
        }

        #[test]
        fn the_password_never_shows(password in "\\PC{4,20}") {
            // Whatever the password, every rendering is exactly the
            // password-free text, so no part of it can leak.
            let url = format!("postgres://appuser:{}@dbhost:5432/appdb", encode(&password));
            let t = Target::parse(&url).unwrap();
            prop_assert_eq!(t.password(), Some(password.as_str()));
            prop_assert_eq!(t.to_string(), "postgres://appuser:***@dbhost:5432/appdb");
            prop_assert_eq!(t.masked_url(), "postgres://appuser:***@dbhost:5432/appdb");
            prop_assert_eq!(
                format!("{t:?}"),
                r#"Target { host: Tcp("dbhost"), port: 5432, database: "appdb", user: "appuser", password: Some("***"), options: None, tls: TlsConfig { sslmode: "prefer", sslrootcert: "none", sslcert: "none", sslkey: "none", sslsni: "1", channel_binding: "prefer" } }"#
            );
            prop_assert_eq!(t.key(), "postgres://appuser@dbhost:5432/appdb");
            prop_assert_eq!(mask_url_text(&url), "postgres://appuser:***@dbhost:5432/appdb");
            let bad = format!("postgres://appuser:{}@dbhost:x/appdb", encode(&password));
            prop_assert_eq!(
                Target::parse(&bad).unwrap_err().to_string(),
                "invalid database URL postgres://appuser:***@dbhost:x/appdb: port \"x\" is not a number"
            );
            let query = format!("postgres://appuser@dbhost/appdb?password={}&frob=1", encode(&password));
            prop_assert_eq!(
                mask_url_text(&query),
                "postgres://appuser@dbhost/appdb?password=***&frob=1"
            );
        }

        #[test]
        fn parsing_never_panics(s in "\\PC{0,60}") {
            let _ = Target::parse(&s);
            let _ = Target::parse(&format!("postgres://{s}"));
        }
    }
}
