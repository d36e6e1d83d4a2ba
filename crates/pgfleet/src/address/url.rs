//! Reading a `postgres://` URL: percent-decoding, the authority with one or
//! several hosts, the query's parameters; and masking the password of a
//! URL that may not parse.

use std::sync::Arc;
use std::time::Duration;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use super::hosts::pair_hosts;
use super::{LoadBalance, SessionAttrs, Target};
use crate::error::{Error, Result};
use crate::tls::TlsConfig;

/// Characters left as they are in user names, database names and hosts of
/// the displayed URL and the key.
pub(super) const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Inside brackets the colons of an IPv6 address stay as they are.
pub(super) const IPV6: &AsciiSet = &COMPONENT.remove(b':');

pub(super) fn encode(s: &str) -> String {
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
    /// `postgres://user:password@host:port/database?param=value&...`, with
    /// libpq's multi-host form `postgres://user@h1:5432,h2:5433/database`.
    ///
    /// Query parameters: `options`, `application_name`, `connect_timeout`
    /// (seconds), `target_session_attrs`, `load_balance_hosts`, libpq's TLS
    /// parameters `sslmode`, `sslrootcert`, `sslcert`, `sslkey`, `sslsni`,
    /// `channel_binding` (see [`TlsConfig`]), and `user`, `password`,
    /// `dbname`, `host` (a host list; a directory for a Unix socket),
    /// `port` (one port for all hosts or one per host) overriding the URL's
    /// parts. A host that is a percent-encoded absolute path
    /// (`%2Fvar%2Frun%2Fpostgresql`) is a Unix socket directory.
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
        if parts.hosts.iter().all(String::is_empty) {
            return Err(bad("no host".into()));
        }
        let hosts = pair_hosts(&parts.hosts, &parts.ports).map_err(bad)?;
        let mut target = Target::new(
            hosts,
            &parts.database,
            &parts.user,
            parts.password.as_deref(),
        );
        target.options = parts.options.filter(|o| !o.is_empty());
        target.application_name = parts.application_name;
        target.connect_timeout = parts.connect_timeout;
        target.session_attrs = parts.session_attrs;
        target.load_balance = parts.load_balance;
        target.tls = Arc::new(parts.tls);
        target.rekey();
        Ok(target)
    }
}

/// A comma list, as libpq splits `host` and `port`.
pub(super) fn split_list(text: &str) -> Vec<String> {
    if text.is_empty() {
        return Vec::new();
    }
    text.split(',').map(|s| s.trim().to_owned()).collect()
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
    /// The hosts, as written (an entry may be empty: `h1,,h3` is an error).
    hosts: Vec<String>,
    /// The ports: none, one for all hosts, or one per host (an empty entry
    /// is 5432).
    ports: Vec<String>,
    database: String,
    options: Option<String>,
    application_name: Option<String>,
    connect_timeout: Option<Duration>,
    session_attrs: SessionAttrs,
    load_balance: LoadBalance,
    tls: TlsConfig,
}

impl UrlParts {
    /// `user:password@host:port,host:port`, a host possibly a bracketed
    /// IPv6 address.
    fn from_authority(
        authority: &str,
        url: &str,
        bad: &dyn Fn(String) -> Error,
    ) -> Result<UrlParts> {
        let (userinfo, hostports) = match authority.rsplit_once('@') {
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
        if hostports.is_empty() {
            return Ok(parts);
        }
        let several = hostports.contains(',');
        for hostport in hostports.split(',') {
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
            if several && host.is_empty() {
                return Err(bad(format!(
                    "host {} of the list {hostports:?} is empty",
                    parts.hosts.len() + 1
                )));
            }
            parts.hosts.push(host);
            parts.ports.push(port.unwrap_or("").to_owned());
        }
        if parts.ports.iter().all(String::is_empty) {
            parts.ports.clear();
        }
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
            "host" => self.hosts = split_list(&value),
            "port" => self.ports = split_list(&value),
            "target_session_attrs" => {
                self.session_attrs = value
                    .parse()
                    .map_err(|why| bad(format!("target_session_attrs = {why}")))?;
            }
            "load_balance_hosts" => {
                self.load_balance = value
                    .parse()
                    .map_err(|why| bad(format!("load_balance_hosts = {why}")))?;
            }
            other => match self.tls.set_param(other, &value) {
                Ok(true) => {}
                Ok(false) => {
                    return Err(bad(format!(
                        "unknown parameter {other:?} (known: options, application_name, connect_timeout, target_session_attrs, load_balance_hosts, sslmode, sslrootcert, sslcert, sslkey, sslsni, channel_binding, user, password, dbname, host, port)"
                    )))
                }
                Err(why) => return Err(bad(format!("{other} = {why}"))),
            },
        }
        Ok(())
    }
}
