//! TLS settings of a target, with libpq's names and meanings: `sslmode`,
//! `sslrootcert`, `sslcert`, `sslkey`, `sslsni`, `channel_binding`.
//!
//! They travel with the [`Target`](crate::Target) (a URL's query, the
//! configuration keys of the same names, or [`Target::with_tls`](crate::Target::with_tls)
//! from code), are not part of the key that decides which addresses are
//! one database, and must agree between the callers that share a pool
//! (see [`Fleet::pool`](crate::Fleet::pool)). The handshake itself lives in
//! `conn/tls.rs` (feature `tls-rustls`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
#[cfg(feature = "tls-rustls")]
use std::sync::Arc;

/// libpq's `sslmode`: whether a connection uses TLS, and what it checks.
///
/// | mode | TLS | checks the certificate | falls back |
/// |---|---|---|---|
/// | `disable` | never | — | — |
/// | `allow` | only if plaintext is refused | chain, when a root certificate is configured | to TLS, once |
/// | `prefer` (default) | when the server offers it | chain, when a root certificate is configured | to plaintext, when the server declines TLS, the handshake fails or the server refuses the TLS session |
/// | `require` | always | chain, when a root certificate is configured | never |
/// | `verify-ca` | always | chain | never |
/// | `verify-full` | always | chain and host name | never |
///
/// As in libpq, a Unix-socket connection never uses TLS, whatever the mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SslMode {
    /// Plaintext only.
    Disable,
    /// Plaintext first; TLS when the server refuses the plaintext session.
    Allow,
    /// TLS first; plaintext when TLS does not work out (libpq's default).
    #[default]
    Prefer,
    /// TLS, or no connection.
    Require,
    /// TLS with a certificate issued by a trusted authority.
    VerifyCa,
    /// TLS with a trusted certificate for the host connected to.
    VerifyFull,
}

impl SslMode {
    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether a connection without TLS is refused.
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }

    /// Whether the server's certificate must chain to a trusted root
    /// (whether or not a root certificate is configured).
    pub fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = String;

    fn from_str(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "{other:?}: expected disable, allow, prefer, require, verify-ca or verify-full"
                ))
            }
        })
    }
}

/// libpq's `sslrootcert`: the authorities a server certificate is checked
/// against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RootCert {
    /// A PEM file of one or more CA certificates.
    File(PathBuf),
    /// The platform's trusted roots (`sslrootcert=system`); as in libpq,
    /// only with `sslmode=verify-full`.
    System,
}

/// libpq's `channel_binding`: whether SCRAM authentication binds itself to
/// the TLS session (`SCRAM-SHA-256-PLUS`), which defeats a man in the middle
/// that holds a certificate the client accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ChannelBinding {
    /// Never.
    Disable,
    /// When the session is TLS and the server offers it (default).
    #[default]
    Prefer,
    /// Always: a connection that cannot bind fails.
    Require,
}

impl ChannelBinding {
    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelBinding::Disable => "disable",
            ChannelBinding::Prefer => "prefer",
            ChannelBinding::Require => "require",
        }
    }
}

impl FromStr for ChannelBinding {
    type Err = String;

    fn from_str(s: &str) -> Result<ChannelBinding, String> {
        Ok(match s {
            "disable" => ChannelBinding::Disable,
            "prefer" => ChannelBinding::Prefer,
            "require" => ChannelBinding::Require,
            other => return Err(format!("{other:?}: expected disable, prefer or require")),
        })
    }
}

/// How a target's connections use TLS. The default is libpq's: `prefer`,
/// the default files under `~/.postgresql/` when they exist, SNI on,
/// channel binding when possible.
///
/// ```
/// use pgfleet::{RootCert, SslMode, Target, TlsConfig};
///
/// let tls = TlsConfig::new(SslMode::VerifyFull).root_cert(RootCert::File("ca.pem".into()));
/// let target = Target::parse("postgres://app@db.internal/app")?.with_tls(tls);
/// assert_eq!(target.tls().mode(), SslMode::VerifyFull);
/// # Ok::<(), pgfleet::Error>(())
/// ```
#[derive(Clone)]
pub struct TlsConfig {
    pub(crate) mode: SslMode,
    pub(crate) root_cert: Option<RootCert>,
    pub(crate) client_cert: Option<PathBuf>,
    pub(crate) client_key: Option<PathBuf>,
    /// `sslsni`: send the host name in the handshake (not for an IP
    /// address).
    pub(crate) sni: bool,
    pub(crate) channel_binding: ChannelBinding,
    /// A rustls configuration given from code: used as it is.
    #[cfg(feature = "tls-rustls")]
    pub(crate) client_config: Option<Arc<rustls::ClientConfig>>,
}

impl Default for TlsConfig {
    fn default() -> TlsConfig {
        TlsConfig {
            mode: SslMode::default(),
            root_cert: None,
            client_cert: None,
            client_key: None,
            sni: true,
            channel_binding: ChannelBinding::default(),
            #[cfg(feature = "tls-rustls")]
            client_config: None,
        }
    }
}

impl TlsConfig {
    /// libpq's defaults with another `sslmode`.
    pub fn new(mode: SslMode) -> TlsConfig {
        TlsConfig {
            mode,
            ..TlsConfig::default()
        }
    }

    /// `sslrootcert`.
    pub fn root_cert(mut self, root: RootCert) -> TlsConfig {
        self.root_cert = Some(root);
        self
    }

    /// `sslcert` and `sslkey`: a client certificate (PEM; the key PKCS#8,
    /// PKCS#1 or SEC1) for `cert` authentication or a server that asks for
    /// one.
    pub fn client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> TlsConfig {
        self.client_cert = Some(cert.into());
        self.client_key = Some(key.into());
        self
    }

    /// `sslsni`: whether the handshake names the host (default: yes).
    pub fn sni(mut self, on: bool) -> TlsConfig {
        self.sni = on;
        self
    }

    /// `channel_binding`.
    pub fn channel_binding(mut self, binding: ChannelBinding) -> TlsConfig {
        self.channel_binding = binding;
        self
    }

    /// Your own rustls configuration: roots, client certificate, versions
    /// and verification are then yours; `sslmode` still decides whether
    /// TLS is tried and whether plaintext is acceptable, and the files of
    /// this configuration are not read. Its ALPN protocols are kept.
    #[cfg(feature = "tls-rustls")]
    pub fn rustls_config(mut self, config: Arc<rustls::ClientConfig>) -> TlsConfig {
        self.client_config = Some(config);
        self
    }

    /// `sslmode`.
    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// `sslrootcert`, when set.
    pub fn root_cert_setting(&self) -> Option<&RootCert> {
        self.root_cert.as_ref()
    }

    /// `sslcert`, when set.
    pub fn client_cert_path(&self) -> Option<&Path> {
        self.client_cert.as_deref()
    }

    /// `sslkey`, when set.
    pub fn client_key_path(&self) -> Option<&Path> {
        self.client_key.as_deref()
    }

    /// `sslsni`.
    pub fn sends_sni(&self) -> bool {
        self.sni
    }

    /// `channel_binding`.
    pub fn channel_binding_setting(&self) -> ChannelBinding {
        self.channel_binding
    }

    /// Sets one libpq parameter by name (`sslmode`, `sslrootcert`,
    /// `sslcert`, `sslkey`, `sslsni`, `channel_binding`); `Ok(false)` for
    /// another name.
    ///
    /// # Errors
    /// What is wrong with the value.
    pub(crate) fn set_param(&mut self, name: &str, value: &str) -> Result<bool, String> {
        match name {
            "sslmode" => self.mode = value.parse()?,
            "sslrootcert" => {
                self.root_cert = match value {
                    "" => None,
                    "system" => Some(RootCert::System),
                    path => Some(RootCert::File(PathBuf::from(path))),
                }
            }
            "sslcert" => self.client_cert = Some(value).filter(|v| !v.is_empty()).map(PathBuf::from),
            "sslkey" => self.client_key = Some(value).filter(|v| !v.is_empty()).map(PathBuf::from),
            "sslsni" => {
                self.sni = match value {
                    "1" | "on" | "true" => true,
                    "0" | "off" | "false" => false,
                    other => return Err(format!("{other:?}: expected 1 or 0")),
                };
            }
            "channel_binding" => self.channel_binding = value.parse()?,
            "sslnegotiation" => match value {
                "postgres" | "" => {}
                "direct" => {
                    return Err("\"direct\": direct TLS negotiation (PostgreSQL 17) is not supported yet; use sslnegotiation=postgres".into())
                }
                other => return Err(format!("{other:?}: expected postgres")),
            },
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The names of the parameters whose values differ from `other`'s, in
    /// the order above (a rustls configuration from code counts as
    /// `sslrootcert`: it decides the roots).
    pub(crate) fn differences(&self, other: &TlsConfig) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.mode != other.mode {
            out.push("sslmode");
        }
        #[cfg(feature = "tls-rustls")]
        let same_custom = match (&self.client_config, &other.client_config) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        #[cfg(not(feature = "tls-rustls"))]
        let same_custom = true;
        if self.root_cert != other.root_cert || !same_custom {
            out.push("sslrootcert");
        }
        if self.client_cert != other.client_cert {
            out.push("sslcert");
        }
        if self.client_key != other.client_key {
            out.push("sslkey");
        }
        if self.sends_sni() != other.sends_sni() {
            out.push("sslsni");
        }
        if self.channel_binding != other.channel_binding {
            out.push("channel_binding");
        }
        out
    }

    /// The value of one parameter as shown to people.
    pub(crate) fn shown(&self, name: &str) -> String {
        let path = |p: &Option<PathBuf>| {
            p.as_ref()
                .map_or("none".to_owned(), |p| p.display().to_string())
        };
        match name {
            "sslmode" => self.mode.to_string(),
            "sslrootcert" => {
                #[cfg(feature = "tls-rustls")]
                if self.client_config.is_some() {
                    return "a rustls ClientConfig from code".into();
                }
                match &self.root_cert {
                    None => "none".into(),
                    Some(RootCert::System) => "system".into(),
                    Some(RootCert::File(p)) => p.display().to_string(),
                }
            }
            "sslcert" => path(&self.client_cert),
            "sslkey" => path(&self.client_key),
            "sslsni" => if self.sends_sni() { "1" } else { "0" }.into(),
            "channel_binding" => self.channel_binding.as_str().into(),
            _ => String::new(),
        }
    }
}

impl PartialEq for TlsConfig {
    /// Every parameter equal; a rustls configuration from code is equal
    /// only to itself (the same `Arc`).
    fn eq(&self, other: &TlsConfig) -> bool {
        #[cfg(feature = "tls-rustls")]
        let same_custom = match (&self.client_config, &other.client_config) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        #[cfg(not(feature = "tls-rustls"))]
        let same_custom = true;
        same_custom
            && self.mode == other.mode
            && self.root_cert == other.root_cert
            && self.client_cert == other.client_cert
            && self.client_key == other.client_key
            && self.sni == other.sni
            && self.channel_binding == other.channel_binding
    }
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("TlsConfig");
        for name in TLS_PARAMS {
            d.field(name, &self.shown(name));
        }
        d.finish()
    }
}

/// The TLS parameters, in the order of the reference.
pub(crate) const TLS_PARAMS: [&str; 6] = [
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslsni",
    "channel_binding",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_parameters_are_read_and_bad_values_named() {
        let mut tls = TlsConfig::default();
        assert_eq!(tls.mode(), SslMode::Prefer);
        assert!(tls.set_param("sslmode", "verify-full").unwrap());
        assert!(tls.set_param("sslrootcert", "system").unwrap());
        assert!(tls.set_param("sslcert", "/c.pem").unwrap());
        assert!(tls.set_param("sslkey", "/k.pem").unwrap());
        assert!(tls.set_param("sslsni", "0").unwrap());
        assert!(tls.set_param("channel_binding", "require").unwrap());
        assert!(!tls.set_param("host", "x").unwrap());
        assert_eq!(tls.root_cert_setting(), Some(&RootCert::System));
        assert!(!tls.sends_sni());
        let err = tls.set_param("sslmode", "strict").unwrap_err();
        assert!(
            err.contains("\"strict\"") && err.contains("verify-full"),
            "{err}"
        );
        let err = tls.set_param("sslnegotiation", "direct").unwrap_err();
        assert!(err.contains("PostgreSQL 17"), "{err}");
        let other = TlsConfig::new(SslMode::VerifyFull);
        assert_eq!(
            tls.differences(&other),
            [
                "sslrootcert",
                "sslcert",
                "sslkey",
                "sslsni",
                "channel_binding"
            ]
        );
        assert_eq!(
            TlsConfig::default(),
            TlsConfig::new(SslMode::Prefer).sni(true)
        );
    }
}
