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
//! * `application_name`, `connect_timeout`, `load_balance_hosts` and the TLS
//!   parameters (`sslmode`, `sslrootcert`, ...) are connection behaviour, not
//!   identity, and are left out (callers sharing a pool must agree on TLS:
//!   see [`Fleet::pool`](crate::Fleet::pool));
//! * a different user, or different `options` (e.g. another `search_path`),
//!   is a different pool;
//! * several hosts (`h1:5432,h2:5433`) are one database, listed in the key
//!   in their order, and `target_session_attrs` other than `any` is part of
//!   the key (`?target_session_attrs=read-write`): a pool for writes and a
//!   pool for reads on the same hosts are two pools;
//! * `localhost` and `127.0.0.1` are **not** merged: they can resolve to
//!   different servers (IPv6, `/etc/hosts`).

mod hosts;
mod url;

pub use hosts::{Endpoint, Host, LoadBalance, Role, SessionAttrs};

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use percent_encoding::utf8_percent_encode;

use self::hosts::pair_hosts;
pub(crate) use self::url::mask_url_text;
use self::url::{encode, split_list, IPV6};
use crate::error::{Error, Result};
use crate::tls::TlsConfig;

/// A database address: one or more hosts with their ports, database, user,
/// password, startup options and which server a session must be on.
///
/// Build one from a URL with [`Target::parse`] or from parts with
/// [`Target::from_parts`]. `Display` and `Debug` never show the password.
#[derive(Clone)]
pub struct Target {
    /// The servers, in the order given; never empty.
    pub(crate) hosts: Vec<Endpoint>,
    pub(crate) database: String,
    pub(crate) user: String,
    pub(crate) password: Option<String>,
    /// The libpq `options` startup parameter (e.g. `-c search_path=app`).
    pub(crate) options: Option<String>,
    application_name: Option<String>,
    connect_timeout: Option<Duration>,
    session_attrs: SessionAttrs,
    load_balance: LoadBalance,
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

impl Target {
    /// A target from its parts. An empty `user` means `postgres`; an empty
    /// `database` means the user name; a `host` starting with `/` is a Unix
    /// socket directory; `host` may be a list (`h1,h2`), every host then on
    /// `port` (see [`with_hosts`](Self::with_hosts) for a port per host).
    ///
    /// # Errors
    /// `Config` for an empty host (or an empty one in the list), a host
    /// listed twice, or port 0.
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
        let hosts = split_list(host);
        let hosts = pair_hosts(&hosts, &[port.to_string()])
            .map_err(|why| Error::config(format!("invalid target: host {host:?}: {why}")))?;
        Ok(Target::new(hosts, database, user, password))
    }

    fn new(hosts: Vec<Endpoint>, database: &str, user: &str, password: Option<&str>) -> Target {
        let user = if user.is_empty() { "postgres" } else { user }.to_owned();
        let database = if database.is_empty() {
            user.clone()
        } else {
            database.to_owned()
        };
        let mut target = Target {
            hosts,
            database,
            user,
            password: password.map(str::to_owned),
            options: None,
            application_name: None,
            connect_timeout: None,
            session_attrs: SessionAttrs::Any,
            load_balance: LoadBalance::Disable,
            tls: Arc::default(),
            key: Arc::from(""),
            key_hash: 0,
        };
        target.rekey();
        target
    }

    /// A copy with other hosts: `hosts` a list as libpq takes it (`h1,h2`)
    /// and `ports` one port for all or one per host (`5432,5433`).
    ///
    /// # Errors
    /// `Config` when the lists do not pair (three ports for two hosts), a
    /// host is empty, a port is not one, or a server is listed twice.
    pub fn with_hosts(&self, hosts: &str, ports: &str) -> Result<Target> {
        let list = pair_hosts(&split_list(hosts), &split_list(ports)).map_err(|why| {
            Error::config(format!(
                "invalid target: host {hosts:?} with port {ports:?}: {why}"
            ))
        })?;
        let mut target = self.clone();
        target.hosts = list;
        target.rekey();
        Ok(target)
    }

    /// A copy with some parts replaced (`None` keeps the part), keeping the
    /// URL's other parameters. `host` and `port` may be lists.
    pub(crate) fn with_parts(
        &self,
        host: Option<&str>,
        port: Option<&str>,
        database: Option<&str>,
        user: Option<&str>,
        password: Option<&str>,
    ) -> Result<Target> {
        let mut target = match (host, port) {
            (None, None) => self.clone(),
            (Some(host), Some(port)) => self.with_hosts(host, port)?,
            (Some(host), None) => {
                // The old ports go with a new host list only if they still
                // pair; else 5432 as libpq's default.
                let ports = self.port_list();
                self.with_hosts(host, &ports)
                    .or_else(|_| self.with_hosts(host, ""))?
            }
            (None, Some(port)) => self.with_hosts(&self.host_list(), port)?,
        };
        if let Some(database) = database {
            target.database = database.to_owned();
        }
        if let Some(user) = user {
            target.user = if user.is_empty() { "postgres" } else { user }.to_owned();
        }
        if target.database.is_empty() {
            target.database = target.user.clone();
        }
        if let Some(password) = password {
            target.password = Some(password.to_owned());
        }
        target.rekey();
        Ok(target)
    }

    /// The hosts as a comma list, as written.
    fn host_list(&self) -> String {
        let hosts: Vec<String> = self.hosts.iter().map(|e| e.host.to_string()).collect();
        hosts.join(",")
    }

    /// The ports as a comma list, one per host.
    fn port_list(&self) -> String {
        let ports: Vec<String> = self.hosts.iter().map(|e| e.port.to_string()).collect();
        ports.join(",")
    }

    /// The same target on its host `index` alone: what one connection to
    /// that server uses.
    pub(crate) fn for_endpoint(&self, index: usize) -> Target {
        let mut target = self.clone();
        target.hosts = vec![self.hosts[index].clone()];
        target.rekey();
        target
    }

    fn hosts_text(&self) -> String {
        let shown: Vec<String> = self.hosts.iter().map(endpoint_text).collect();
        shown.join(",")
    }

    /// Recomputes the key and its hash after the parts changed.
    fn rekey(&mut self) {
        self.key = self.make_key().into();
        self.key_hash = key_hash(&self.key);
    }

    fn make_key(&self) -> String {
        let mut key = format!(
            "postgres://{}@{}/{}",
            encode(&self.user),
            self.hosts_text(),
            encode(&self.database)
        );
        let mut separator = '?';
        if let Some(options) = &self.options {
            key.push(separator);
            key.push_str("options=");
            key.push_str(&encode(options));
            separator = '&';
        }
        if self.session_attrs.checks_role() {
            key.push(separator);
            key.push_str("target_session_attrs=");
            key.push_str(self.session_attrs.as_str());
        }
        key
    }

    /// The host (the first, when there are several).
    pub fn host(&self) -> &Host {
        &self.hosts[0].host
    }

    /// The port (of the first host, when there are several).
    pub fn port(&self) -> u16 {
        self.hosts[0].port
    }

    /// Every host with its port, in the order given.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.hosts
    }

    /// What the server a session lands on must be.
    pub fn target_session_attrs(&self) -> SessionAttrs {
        self.session_attrs
    }

    /// A copy whose sessions must land on a server as `attrs` says.
    pub fn with_target_session_attrs(mut self, attrs: SessionAttrs) -> Target {
        self.session_attrs = attrs;
        self.rekey();
        self
    }

    /// The order hosts are tried in.
    pub fn load_balance_hosts(&self) -> LoadBalance {
        self.load_balance
    }

    /// A copy that tries its hosts in the order `balance` says.
    pub fn with_load_balance_hosts(mut self, balance: LoadBalance) -> Target {
        self.load_balance = balance;
        self
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

    /// Sets one libpq connection parameter that is behaviour, not a part
    /// of the address: the TLS ones, `target_session_attrs`,
    /// `load_balance_hosts`. `Ok(false)` for a name that is none of them.
    pub(crate) fn set_param(
        &mut self,
        name: &str,
        value: &str,
    ) -> std::result::Result<bool, String> {
        match name {
            "target_session_attrs" => {
                self.session_attrs = value.parse()?;
                self.rekey();
            }
            "load_balance_hosts" => self.load_balance = value.parse()?,
            _ => return Arc::make_mut(&mut self.tls).set_param(name, value),
        }
        Ok(true)
    }

    /// The value of a parameter [`set_param`](Self::set_param) takes, as
    /// shown to people.
    pub(crate) fn shown_param(&self, name: &str) -> String {
        match name {
            "target_session_attrs" => self.session_attrs.to_string(),
            "load_balance_hosts" => self.load_balance.to_string(),
            _ => self.tls.shown(name),
        }
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

    /// Identifies the server (host and port, or socket directory and port);
    /// the first one's when there are several (see
    /// [`server_keys`](Self::server_keys)).
    pub fn server_key(&self) -> String {
        endpoint_text(&self.hosts[0])
    }

    /// The server key of every host, in order: each one's connections count
    /// in that server's budget.
    pub fn server_keys(&self) -> Vec<String> {
        self.hosts.iter().map(endpoint_text).collect()
    }

    /// The URL with the password shown as `***`.
    pub fn masked_url(&self) -> String {
        self.to_string()
    }
}

/// `host:port` as the key and the displayed URL write it.
fn endpoint_text(endpoint: &Endpoint) -> String {
    let host = match &endpoint.host {
        Host::Tcp(h) if h.contains(':') => format!("[{}]", utf8_percent_encode(h, IPV6)),
        Host::Tcp(h) => encode(h),
        Host::Unix(dir) => encode(&dir.display().to_string()),
    };
    format!("{host}:{}", endpoint.port)
}

impl FromStr for Target {
    type Err = Error;
    fn from_str(s: &str) -> Result<Target> {
        Target::parse(s)
    }
}

impl PartialEq for Target {
    /// Same key, same password, the same TLS settings and host order.
    fn eq(&self, other: &Target) -> bool {
        self.key == other.key
            && self.password == other.password
            && self.tls == other.tls
            && self.load_balance == other.load_balance
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "postgres://{}", encode(&self.user))?;
        if self.password.is_some() {
            f.write_str(":***")?;
        }
        write!(f, "@{}/{}", self.hosts_text(), encode(&self.database))?;
        if self.session_attrs.checks_role() {
            write!(f, "?target_session_attrs={}", self.session_attrs)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Target");
        match self.hosts.as_slice() {
            [one] => s.field("host", &one.host).field("port", &one.port),
            many => s.field("hosts", &many),
        };
        s.field("database", &self.database)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("options", &self.options);
        if self.session_attrs.checks_role() {
            s.field("target_session_attrs", &self.session_attrs);
        }
        s.field("tls", &self.tls).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::PathBuf;

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
            ("postgres://u:Secret1@h1,,h2/d", "host 2 of the list"),
            ("postgres://u:Secret1@h1,h2/d?port=1,2,3", "3 ports for 2 hosts"),
            ("postgres://u:Secret1@h/d?port=5432,5433", "2 ports for 1 hosts"),
            (
                "postgres://u:Secret1@h/d?target_session_attrs=writable",
                "target_session_attrs = \"writable\": expected any, read-write",
            ),
            (
                "postgres://u:Secret1@h/d?load_balance_hosts=yes",
                "load_balance_hosts = \"yes\": expected disable or random",
            ),
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
    fn several_hosts_are_one_database_in_the_order_given() {
        let t = Target::parse(
            "postgres://app:pw@DB1:5432,db2:5433,[::1]/x?target_session_attrs=read-write&load_balance_hosts=random",
        )
        .unwrap();
        let ports: Vec<u16> = t.endpoints().iter().map(|e| e.port).collect();
        assert_eq!(ports, [5432, 5433, 5432]);
        assert_eq!(t.host(), &Host::Tcp("db1".into()));
        assert_eq!(t.target_session_attrs(), SessionAttrs::ReadWrite);
        assert_eq!(t.load_balance_hosts(), LoadBalance::Random);
        assert_eq!(
            t.key(),
            "postgres://app@db1:5432,db2:5433,[::1]:5432/x?target_session_attrs=read-write"
        );
        assert_eq!(t.server_keys(), ["db1:5432", "db2:5433", "[::1]:5432"]);
        assert_eq!(
            t.to_string(),
            "postgres://app:***@db1:5432,db2:5433,[::1]:5432/x?target_session_attrs=read-write"
        );
        // The key and the display parse back to the same database.
        assert_eq!(Target::parse(t.key()).unwrap().key(), t.key());
        assert_eq!(Target::parse(&t.to_string()).unwrap().key(), t.key());
        // libpq's keyword form in the query: a host list and a port list,
        // or one port for all.
        let q = Target::parse("postgres:///x?host=db1,db2&port=5432,5433&user=app").unwrap();
        assert_eq!(q.key(), "postgres://app@db1:5432,db2:5433/x");
        let q = Target::parse("postgres:///x?host=db1,db2&port=6000").unwrap();
        assert_eq!(q.server_keys(), ["db1:6000", "db2:6000"]);
        // One host alone on its server, as one connection uses it.
        let one = t.for_endpoint(1);
        assert_eq!(one.endpoints().len(), 1);
        assert_eq!(one.server_key(), "db2:5433");
        assert_eq!(one.target_session_attrs(), SessionAttrs::ReadWrite);
        // Attributes are identity; the order of trying is not.
        assert_ne!(key("postgres://a@h1,h2/x"), t.key());
        assert_eq!(
            key("postgres://a@h1,h2/x?load_balance_hosts=random"),
            key("postgres://a@h1:5432,h2:5432/x")
        );
        assert_ne!(key("postgres://a@h1,h2/x"), key("postgres://a@h2,h1/x"));
        assert_eq!(
            key("postgres://a@h1,h2/x?target_session_attrs=any"),
            key("postgres://a@h1,h2/x")
        );
        let parts = Target::from_parts("h1,h2", 7000, "x", "a", None).unwrap();
        assert_eq!(parts.server_keys(), ["h1:7000", "h2:7000"]);
        let moved = parts.with_hosts("h3,h4", "1,2").unwrap();
        assert_eq!(moved.key(), "postgres://a@h3:1,h4:2/x");
        assert!(parts
            .with_hosts("h3,h4", "1,2,3")
            .unwrap_err()
            .to_string()
            .contains("3 ports for 2 hosts"));
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
