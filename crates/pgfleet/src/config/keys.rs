//! The one table of configuration keys.
//!
//! Every key — its name, aliases, kind and range, default and a one-line
//! doc — is one row of [`KEYS`]. The parser ([`PoolSettings`]), the checks
//! of a configuration built in code ([`PoolConfig::validate`]), `explain`,
//! the suggestions for unknown keys, a URL's pool keys and the test of the
//! configuration reference all read this table, so a key is added in one
//! place.
//!
//! [`PoolSettings`]: super::PoolSettings

use std::time::Duration;

use super::kinds::{choice, field, Choice, Field};
pub(crate) use super::kinds::{size, Kind};
use super::pool::{PoolConfig, Pooler, ReadFallback, Reset};
use super::value::Source;
use crate::error::{Error, Result};

/// Upper bound of timeouts: anything longer is a mistake in units.
pub(crate) const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Upper bound of lifetimes.
pub(crate) const MAX_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// Upper bound of pool sizes.
pub(crate) const MAX_POOL_SIZE: u32 = 10_000;
/// Upper bound of `max_waiting`.
const MAX_WAITING: u32 = 1_000_000;
/// Upper bound of per-connection statement caches.
const MAX_STATEMENT_CACHE: usize = 10_000;

/// One configuration key.
pub(crate) struct Key {
    /// The canonical name (what `explain` and errors about a field show).
    pub(crate) name: &'static str,
    /// Other accepted names (the seed's and other pools' spellings).
    pub(crate) aliases: &'static [&'static str],
    /// What the value is, its range, and the field it sets.
    pub(crate) kind: Kind,
    /// The default, as the reference shows it.
    pub(crate) default: &'static str,
    /// What the key does, in one line.
    pub(crate) doc: &'static str,
}

/// Every key, in the order of the reference and of `explain`.
pub(crate) const KEYS: &[Key] = &[
    Key {
        name: "url",
        aliases: &["database_url"],
        kind: Kind::Url,
        default: "none",
        doc: "a full postgres:// URL; its query may carry pool keys",
    },
    Key {
        name: "host",
        aliases: &[],
        kind: Kind::Host,
        default: "localhost",
        doc: "a host name, IP address or Unix socket directory, or a comma list of them (tried in order)",
    },
    Key {
        name: "port",
        aliases: &[],
        kind: Kind::Port,
        default: "5432",
        doc: "the server's port: one for all hosts, or a comma list with one per host",
    },
    Key {
        name: "database",
        aliases: &["db", "dbname"],
        kind: Kind::Database,
        default: "the user name",
        doc: "the database name",
    },
    Key {
        name: "user",
        aliases: &["username"],
        kind: Kind::User,
        default: "postgres",
        doc: "the role name",
    },
    Key {
        name: "password",
        aliases: &[],
        kind: Kind::Secret,
        default: "none",
        doc: "the password, shown as *** everywhere",
    },
    Key {
        name: "target_session_attrs",
        aliases: &[],
        kind: Kind::Param("any, read-write, read-only, primary, standby, prefer-standby"),
        default: "any",
        doc: "which server a session must be on; a pool leaves a host that stops matching (libpq's meanings)",
    },
    Key {
        name: "load_balance_hosts",
        aliases: &[],
        kind: Kind::Param("disable, random"),
        default: "disable",
        doc: "try the hosts in order (the last one that matched first), or in a random order per connection",
    },
    Key {
        name: "sslmode",
        aliases: &[],
        kind: Kind::Param("disable, allow, prefer, require, verify-ca, verify-full"),
        default: "prefer",
        doc: "whether connections use TLS and what they check (libpq's meanings)",
    },
    Key {
        name: "sslrootcert",
        aliases: &[],
        kind: Kind::Param("a PEM file, or system"),
        default: "~/.postgresql/root.crt if it exists",
        doc: "the authorities the server's certificate must chain to",
    },
    Key {
        name: "sslcert",
        aliases: &[],
        kind: Kind::Param("a PEM file"),
        default: "~/.postgresql/postgresql.crt if it exists",
        doc: "the client certificate, sent when the server asks for one",
    },
    Key {
        name: "sslkey",
        aliases: &[],
        kind: Kind::Param("a PEM file: PKCS#8, PKCS#1 or SEC1"),
        default: "~/.postgresql/postgresql.key if it exists",
        doc: "the client certificate's private key; never shown",
    },
    Key {
        name: "sslsni",
        aliases: &[],
        kind: Kind::Param("1, 0"),
        default: "1",
        doc: "whether the TLS handshake names the host (Server Name Indication)",
    },
    Key {
        name: "channel_binding",
        aliases: &[],
        kind: Kind::Param("disable, prefer, require"),
        default: "prefer",
        doc: "bind SCRAM authentication to the TLS session (SCRAM-SHA-256-PLUS)",
    },
    Key {
        name: "min_size",
        aliases: &["pool_size"],
        kind: Kind::Size {
            min: 0,
            max: MAX_POOL_SIZE,
            field: Some(field!(min_size)),
        },
        default: "1",
        doc: "warm floor: connections kept open even when idle",
    },
    Key {
        name: "max_size",
        aliases: &[],
        kind: Kind::MaxSize {
            min: 1,
            max: MAX_POOL_SIZE,
        },
        default: "10",
        doc: "hard cap on open plus opening connections",
    },
    Key {
        name: "max_overflow",
        aliases: &[],
        kind: Kind::Size {
            min: 0,
            max: MAX_POOL_SIZE,
            field: None,
        },
        default: "none",
        doc: "connections above the floor: max_size = pool_size + max_overflow",
    },
    Key {
        name: "timeout",
        aliases: &["pool_timeout", "acquire_timeout"],
        kind: Kind::Duration {
            max: MAX_TIMEOUT,
            field: field!(acquire_timeout),
        },
        default: "30s",
        doc: "how long get() waits for a connection",
    },
    Key {
        name: "connect_timeout",
        aliases: &[],
        kind: Kind::Duration {
            max: MAX_TIMEOUT,
            field: field!(connect_timeout),
        },
        default: "10s",
        doc: "how long opening one connection may take",
    },
    Key {
        name: "max_lifetime",
        aliases: &["pool_recycle"],
        kind: Kind::OptDuration {
            max: MAX_LIFETIME,
            field: field!(max_lifetime),
        },
        default: "1h",
        doc: "connections older than this are closed when next idle",
    },
    Key {
        name: "idle_timeout",
        aliases: &["max_inactive_connection_lifetime"],
        kind: Kind::OptDuration {
            max: MAX_LIFETIME,
            field: field!(idle_timeout),
        },
        default: "5m",
        doc: "connections above min_size idle longer than this are closed",
    },
    Key {
        name: "max_queries",
        aliases: &[],
        kind: Kind::Limit {
            min: 1,
            field: field!(max_queries),
        },
        default: "50000",
        doc: "a connection is closed after serving this many statements",
    },
    Key {
        name: "command_timeout",
        aliases: &[],
        kind: Kind::OptDuration {
            max: MAX_TIMEOUT,
            field: field!(command_timeout),
        },
        default: "off",
        doc: "server-side statement_timeout of every connection",
    },
    Key {
        name: "health_check_after",
        aliases: &[],
        kind: Kind::Duration {
            max: MAX_TIMEOUT,
            field: field!(health_check_after),
        },
        default: "5s",
        doc: "a connection idle longer than this gets a round-trip check before use",
    },
    Key {
        name: "linger",
        aliases: &[],
        kind: Kind::Duration {
            max: MAX_TIMEOUT,
            field: field!(linger),
        },
        default: "30s",
        doc: "how long a fleet pool with no live handles stays open",
    },
    Key {
        name: "leak_threshold",
        aliases: &[],
        kind: Kind::OptDuration {
            max: MAX_TIMEOUT,
            field: field!(leak_threshold),
        },
        default: "off",
        doc: "a connection held longer than this is reported",
    },
    Key {
        name: "application_name",
        aliases: &[],
        kind: Kind::AppName(field!(application_name)),
        default: "pgfleet",
        doc: "application_name of every connection, as pg_stat_activity shows it",
    },
    Key {
        name: "server_settings",
        aliases: &[],
        kind: Kind::Settings(field!(server_settings)),
        default: "none",
        doc: "run-time parameters sent at connection start-up",
    },
    Key {
        name: "shared_connections",
        aliases: &[],
        kind: Kind::Auto {
            max: MAX_POOL_SIZE,
            field: field!(shared_connections),
        },
        default: "auto",
        doc: "lanes (connections) that statements are pipelined over; auto: one per core (2..=64) for the statement methods, 2 for shared mode",
    },
    Key {
        name: "keepalives_idle",
        aliases: &[],
        kind: Kind::OptDuration {
            max: MAX_TIMEOUT,
            field: field!(keepalives_idle),
        },
        default: "1m",
        doc: "idle time of a connection's socket before the first TCP keepalive probe",
    },
    Key {
        name: "keepalives_interval",
        aliases: &[],
        kind: Kind::Duration {
            max: MAX_TIMEOUT,
            field: field!(keepalives_interval),
        },
        default: "10s",
        doc: "time between TCP keepalive probes",
    },
    Key {
        name: "keepalives_count",
        aliases: &[],
        kind: Kind::Size {
            min: 1,
            max: 100,
            field: Some(field!(keepalives_count)),
        },
        default: "3",
        doc: "unanswered keepalive probes before the connection is dropped",
    },
    Key {
        name: "tcp_user_timeout",
        aliases: &[],
        kind: Kind::OptDuration {
            max: MAX_TIMEOUT,
            field: field!(tcp_user_timeout),
        },
        default: "30s",
        doc: "how long sent data may stay unacknowledged before the connection is dropped",
    },
    Key {
        name: "max_waiting",
        aliases: &[],
        kind: Kind::Callers {
            max: MAX_WAITING,
            field: field!(max_waiting),
        },
        default: "off",
        doc: "callers that may wait at once; one more is turned away at once",
    },
    Key {
        name: "statement_cache_size",
        aliases: &[],
        kind: Kind::Len {
            max: MAX_STATEMENT_CACHE,
            field: field!(statement_cache_size),
        },
        default: "256",
        doc: "prepared statements each connection keeps for prepare_cached",
    },
    Key {
        name: "pooler",
        aliases: &[],
        kind: choice!(pooler, Pooler),
        default: "none",
        doc: "what sits in front of the server: none, or a pooler in transaction or session mode",
    },
    Key {
        name: "reset",
        aliases: &[],
        kind: choice!(reset, Reset),
        default: "auto",
        doc: "when a returned connection's session state is reset: auto (what it changed), always, never",
    },
    Key {
        name: "read_fallback",
        aliases: &[],
        kind: choice!(read_fallback, ReadFallback),
        default: "primary",
        doc: "where get_read goes when no standby accepts: the primary, or an error",
    },
    Key {
        name: "max_replication_lag",
        aliases: &[],
        kind: Kind::OptDuration {
            max: MAX_TIMEOUT,
            field: field!(max_replication_lag),
        },
        default: "off",
        doc: "a standby further behind than this takes no reads until it catches up",
    },
];

/// The key that `name` (the canonical name or an alias) sets.
pub(crate) fn lookup(name: &str) -> Option<&'static Key> {
    KEYS.iter()
        .find(|k| k.name == name || k.aliases.contains(&name))
}

/// The key of a canonical name; a name not in the table is a bug.
pub(crate) fn key(name: &str) -> &'static Key {
    KEYS.iter()
        .find(|k| k.name == name)
        .unwrap_or_else(|| panic!("`{name}` is not in the table of keys"))
}

/// The known name closest to `name`, if one is close.
pub(crate) fn suggest(name: &str) -> Option<&'static str> {
    KEYS.iter()
        .flat_map(|k| std::iter::once(k.name).chain(k.aliases.iter().copied()))
        .map(|k| (edit_distance(name, k), k))
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

/// One configuration key as the reference documents it: what
/// [`config_keys`] lists.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyInfo {
    /// The canonical name.
    pub name: &'static str,
    /// Other accepted names.
    pub aliases: &'static [&'static str],
    /// The default, as the reference shows it.
    pub default: &'static str,
    /// The valid range (empty for names and URLs).
    pub range: String,
    /// What the key does, in one line.
    pub doc: &'static str,
}

/// Every configuration key of a pool and its target, in the reference's
/// order, from the same table that the parser and the checks read.
pub fn config_keys() -> impl Iterator<Item = KeyInfo> {
    KEYS.iter().map(|key| KeyInfo {
        name: key.name,
        aliases: key.aliases,
        default: key.default,
        range: key.kind.range(),
        doc: key.doc,
    })
}

/// What [`PoolConfig::problem`] found: the field (by its key), its value as
/// shown, and what is wrong.
pub(crate) struct Problem {
    pub(crate) key: &'static str,
    pub(crate) value: String,
    pub(crate) why: String,
}

/// The checks of a configuration built in code read the same table.
impl PoolConfig {
    /// The keys whose values differ between `self` and `other`, as
    /// (key, this value, the other value), values as `explain` shows them:
    /// two configurations that mean the same have none.
    pub fn differences(&self, other: &PoolConfig) -> Vec<(&'static str, String, String)> {
        KEYS.iter()
            .filter_map(|key| {
                let (mine, theirs) = (key.kind.show(self)?, key.kind.show(other)?);
                (mine != theirs).then_some((key.name, mine, theirs))
            })
            .collect()
    }

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
                p.key,
                p.value,
                Source::Code,
                p.why
            ))),
        }
    }

    /// The first field out of its range, or the first conflict between
    /// fields.
    pub(crate) fn problem(&self) -> Option<Problem> {
        let bad = |key: &'static str, value: String, why: String| Some(Problem { key, value, why });
        for key in KEYS {
            if let Err((value, why)) = key.kind.check(self) {
                return bad(key.name, value, why);
            }
        }
        let max_size = self.effective_max_size();
        if self.min_size > max_size {
            return bad(
                "min_size",
                self.min_size.to_string(),
                format!("greater than max_size = {max_size}"),
            );
        }
        if self.command_timeout.is_some() && self.server_settings.contains_key("statement_timeout")
        {
            return bad(
                "server_settings",
                "\"statement_timeout\"".to_owned(),
                "ambiguous: command_timeout already sets statement_timeout; set one of them"
                    .to_owned(),
            );
        }
        if self.pooler == Pooler::Transaction {
            const WHY: &str = "a pooler in transaction mode keeps no session to apply it to; \
                               set it on the server (ALTER ROLE ... SET) or in the pooler";
            if let Some(d) = self.command_timeout {
                return bad(
                    "command_timeout",
                    super::value::show_duration(Some(d)),
                    format!("not with pooler = transaction: {WHY}"),
                );
            }
            if let Some(name) = self.server_settings.keys().next() {
                return bad(
                    "server_settings",
                    format!("{name:?}"),
                    format!("not with pooler = transaction: {WHY}"),
                );
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_aliases_are_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for key in KEYS {
            for name in std::iter::once(key.name).chain(key.aliases.iter().copied()) {
                assert!(seen.insert(name), "`{name}` is listed twice");
            }
        }
    }

    #[test]
    fn the_table_says_the_defaults_that_pool_config_has() {
        let defaults = PoolConfig::default();
        for key in KEYS {
            if let Some(shown) = key.kind.show(&defaults) {
                assert_eq!(shown, key.default, "default of `{}`", key.name);
            }
        }
    }

    #[test]
    fn every_field_of_the_default_config_is_in_range() {
        let defaults = PoolConfig::default();
        for key in KEYS {
            assert!(key.kind.check(&defaults).is_ok(), "`{}`", key.name);
        }
    }

    /// The configuration reference has a row for every key, with its
    /// aliases, default and range, and no row for a key that does not
    /// exist.
    #[test]
    fn the_reference_documents_every_key_as_the_table_says() {
        let reference = include_str!("../../docs/configuration.md");
        // The tables of the target and pool keys.
        let start = reference.find("### Target").expect("a Target section");
        let end = reference
            .find("### `connection_pool`")
            .expect("a connection_pool section");
        let rows: Vec<Vec<&str>> = reference[start..end]
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| l.trim_matches('|').split(" | ").map(str::trim).collect())
            .collect();
        for key in KEYS {
            let row = rows
                .iter()
                .find(|r| r[0].starts_with(&format!("`{}`", key.name)))
                .unwrap_or_else(|| panic!("no row for `{}` in the reference", key.name));
            for alias in key.aliases {
                assert!(
                    row[0].contains(&format!("`{alias}`")),
                    "`{}`: alias `{alias}` missing: {row:?}",
                    key.name
                );
            }
            let default = if key.default.contains(' ') || key.default == "none" {
                key.default.to_owned()
            } else {
                format!("`{}`", key.default)
            };
            assert!(
                row.iter().any(|cell| cell.starts_with(&default)),
                "`{}`: default {default} missing: {row:?}",
                key.name
            );
            let range = key.kind.range();
            assert!(
                row.iter().any(|cell| cell.contains(&range)),
                "`{}`: range {range} missing: {row:?}",
                key.name
            );
        }
        for name in rows.iter().filter_map(|r| r[0].split('`').nth(1)) {
            assert!(
                lookup(name).is_some_and(|k| k.name == name),
                "the reference documents `{name}`, which is not a key"
            );
        }
    }
}
