//! Several hosts for one database, as libpq takes them: the host list and
//! its ports, which server a session must be on (`target_session_attrs`),
//! and the order hosts are tried in (`load_balance_hosts`).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Host {
    /// A TCP host name or IP address (IPv6 without brackets).
    Tcp(String),
    /// A directory holding the server's Unix socket (`.s.PGSQL.<port>`).
    Unix(PathBuf),
}

impl Host {
    /// A host as written: a path starting with `/` is a socket directory,
    /// anything else a TCP host (compared case-insensitively).
    pub(crate) fn new(text: &str) -> Host {
        if text.starts_with('/') {
            Host::Unix(PathBuf::from(text))
        } else {
            Host::Tcp(text.to_ascii_lowercase())
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Tcp(h) => f.write_str(h),
            Host::Unix(dir) => write!(f, "{}", dir.display()),
        }
    }
}

/// One server of a target: a host and its port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// The host.
    pub host: Host,
    /// The port.
    pub port: u16,
}

/// What the server a session lands on must be, as libpq's
/// `target_session_attrs`. PostgreSQL 14 and later report what is needed
/// (`in_hot_standby`, `default_transaction_read_only`) when a session
/// starts, so checking costs no round trip; before 14, and behind a
/// pooler that does not pass those reports on, one query asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum SessionAttrs {
    /// Any server that accepts the session.
    #[default]
    Any,
    /// A server whose sessions can write: not a standby, and
    /// `default_transaction_read_only` off.
    ReadWrite,
    /// A server whose sessions are read-only: a standby, or a primary with
    /// `default_transaction_read_only` on.
    ReadOnly,
    /// A server that is not in recovery.
    Primary,
    /// A server in recovery (a hot standby).
    Standby,
    /// A standby if one accepts; any server otherwise (and back to a
    /// standby when one returns).
    PreferStandby,
}

impl SessionAttrs {
    /// libpq's name of the value.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionAttrs::Any => "any",
            SessionAttrs::ReadWrite => "read-write",
            SessionAttrs::ReadOnly => "read-only",
            SessionAttrs::Primary => "primary",
            SessionAttrs::Standby => "standby",
            SessionAttrs::PreferStandby => "prefer-standby",
        }
    }

    /// Whether a session on a server in `role` is what these attributes
    /// ask for; `prefer-standby` accepts any server (a primary as the
    /// fallback: see [`prefers`](Self::prefers)).
    pub fn accepts(self, role: Role) -> bool {
        match self {
            SessionAttrs::Any | SessionAttrs::PreferStandby => true,
            SessionAttrs::ReadWrite => !role.read_only(),
            SessionAttrs::ReadOnly => role.read_only(),
            SessionAttrs::Primary => !role.standby,
            SessionAttrs::Standby => role.standby,
        }
    }

    /// Whether `role` is the first choice: for `prefer-standby` a standby,
    /// for the others whatever they accept.
    pub fn prefers(self, role: Role) -> bool {
        match self {
            SessionAttrs::PreferStandby => role.standby,
            other => other.accepts(role),
        }
    }

    /// Whether the server's role matters at all (not `any`).
    pub fn checks_role(self) -> bool {
        self != SessionAttrs::Any
    }
}

impl fmt::Display for SessionAttrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SessionAttrs {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "any" | "" => SessionAttrs::Any,
            "read-write" => SessionAttrs::ReadWrite,
            "read-only" => SessionAttrs::ReadOnly,
            "primary" => SessionAttrs::Primary,
            "standby" => SessionAttrs::Standby,
            "prefer-standby" => SessionAttrs::PreferStandby,
            _ => {
                return Err(format!(
                    "{s:?}: expected any, read-write, read-only, primary, standby or prefer-standby"
                ))
            }
        })
    }
}

/// The order hosts are tried in, as libpq's `load_balance_hosts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum LoadBalance {
    /// In the order given (pgfleet tries the host its last connection
    /// landed on first, then the others in order).
    #[default]
    Disable,
    /// In a random order for every connection, which spreads a pool's
    /// connections over the hosts that accept them.
    Random,
}

impl LoadBalance {
    /// libpq's name of the value.
    pub fn as_str(self) -> &'static str {
        match self {
            LoadBalance::Disable => "disable",
            LoadBalance::Random => "random",
        }
    }
}

impl fmt::Display for LoadBalance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LoadBalance {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "disable" | "" => Ok(LoadBalance::Disable),
            "random" => Ok(LoadBalance::Random),
            _ => Err(format!("{s:?}: expected disable or random")),
        }
    }
}

/// What a server is, for `target_session_attrs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Role {
    /// In recovery: a hot standby.
    pub standby: bool,
    /// `default_transaction_read_only` is on.
    pub default_read_only: bool,
}

impl Role {
    /// Sessions cannot write (`transaction_read_only` would be on).
    pub fn read_only(self) -> bool {
        self.standby || self.default_read_only
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.standby, self.default_read_only) {
            (true, _) => f.write_str("a standby"),
            (false, true) => {
                f.write_str("a read-only primary (default_transaction_read_only = on)")
            }
            (false, false) => f.write_str("a primary"),
        }
    }
}

/// The hosts of a host list (`h1,h2`) and their ports (`5432,5433`, or
/// one port for all, or none for 5432), as libpq pairs them.
pub(crate) fn pair_hosts(hosts: &[String], ports: &[String]) -> Result<Vec<Endpoint>, String> {
    let port_of = |text: &str| match text.trim() {
        "" => Ok(5432),
        p => parse_port(p),
    };
    let ports: Vec<u16> = ports.iter().map(|p| port_of(p)).collect::<Result<_, _>>()?;
    if ports.len() > 1 && ports.len() != hosts.len() {
        return Err(format!(
            "{} ports for {} hosts: give one port for all hosts or one per host",
            ports.len(),
            hosts.len()
        ));
    }
    let endpoints = hosts
        .iter()
        .enumerate()
        .map(|(i, host)| {
            if host.is_empty() {
                return Err(format!("host {} of the list is empty", i + 1));
            }
            let port = match ports.len() {
                0 => 5432,
                1 => ports[0],
                _ => ports[i],
            };
            Ok(Endpoint {
                host: Host::new(host),
                port,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    for (i, endpoint) in endpoints.iter().enumerate() {
        if endpoints[..i].contains(endpoint) {
            return Err(format!(
                "{}:{} is listed twice (each server once)",
                endpoint.host, endpoint.port
            ));
        }
    }
    Ok(endpoints)
}

pub(crate) fn parse_port(text: &str) -> Result<u16, String> {
    match text.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        Ok(p) => Err(format!("port {p} is out of range 1..=65535")),
        Err(_) => Err(format!("port {text:?} is not a number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(standby: bool, default_read_only: bool) -> Role {
        Role {
            standby,
            default_read_only,
        }
    }

    #[test]
    fn session_attributes_accept_as_libpq_does() {
        let primary = role(false, false);
        let read_only_primary = role(false, true);
        let standby = role(true, false);
        use SessionAttrs::*;
        for (attrs, accepted) in [
            (Any, [true, true, true]),
            (ReadWrite, [true, false, false]),
            (ReadOnly, [false, true, true]),
            (Primary, [true, true, false]),
            (Standby, [false, false, true]),
            (PreferStandby, [true, true, true]),
        ] {
            let got = [primary, read_only_primary, standby].map(|r| attrs.accepts(r));
            assert_eq!(got, accepted, "{attrs}");
            assert_eq!(attrs.as_str().parse::<SessionAttrs>(), Ok(attrs));
        }
        assert!(PreferStandby.prefers(standby));
        assert!(!PreferStandby.prefers(primary));
        assert!("READ-WRITE".parse::<SessionAttrs>().is_ok());
        assert!("readwrite"
            .parse::<SessionAttrs>()
            .unwrap_err()
            .contains("expected any, read-write"));
        assert_eq!("random".parse(), Ok(LoadBalance::Random));
        assert!("round-robin".parse::<LoadBalance>().is_err());
    }

    #[test]
    fn hosts_and_ports_pair_as_libpq_pairs_them() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let hosts = s(&["a", "b"]);
        let got = pair_hosts(&hosts, &s(&["1", "2"])).unwrap();
        assert_eq!((got[0].port, got[1].port), (1, 2));
        let got = pair_hosts(&hosts, &s(&["7"])).unwrap();
        assert_eq!((got[0].port, got[1].port), (7, 7));
        let got = pair_hosts(&hosts, &[]).unwrap();
        assert_eq!((got[0].port, got[1].port), (5432, 5432));
        let got = pair_hosts(&hosts, &s(&["", "6"])).unwrap();
        assert_eq!((got[0].port, got[1].port), (5432, 6));
        assert!(pair_hosts(&hosts, &s(&["1", "2", "3"]))
            .unwrap_err()
            .contains("3 ports for 2 hosts"));
        assert!(pair_hosts(&s(&["a", ""]), &[])
            .unwrap_err()
            .contains("host 2"));
        assert!(pair_hosts(&s(&["a", "A"]), &s(&["1"]))
            .unwrap_err()
            .contains("a:1 is listed twice"));
        assert!(pair_hosts(&s(&["a", "a"]), &s(&["1", "2"])).is_ok());
        assert_eq!(
            pair_hosts(&s(&["/tmp"]), &[]).unwrap()[0].host,
            Host::Unix("/tmp".into())
        );
    }
}
