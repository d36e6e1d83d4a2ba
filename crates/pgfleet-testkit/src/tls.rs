//! Certificates made at run time for TLS tests: a [`TestCa`] that issues
//! server and client certificates, and the [`ServerTls`] settings that make
//! a [`TempCluster`](crate::TempCluster) speak TLS.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::error::{Error, Result};

/// A certificate authority that exists for one test run.
pub struct TestCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

fn tls_error(what: &str, e: rcgen::Error) -> Error {
    Error::Tls(format!("could not {what}: {e}"))
}

impl TestCa {
    /// A new CA whose certificate names `name` (ECDSA P-256).
    ///
    /// # Errors
    /// If the key or certificate cannot be made.
    pub fn new(name: &str) -> Result<TestCa> {
        let key = KeyPair::generate().map_err(|e| tls_error("make a CA key", e))?;
        let mut params = CertificateParams::new(Vec::<String>::new())
            .map_err(|e| tls_error("make CA parameters", e))?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params
            .self_signed(&key)
            .map_err(|e| tls_error("sign the CA certificate", e))?;
        Ok(TestCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Writes the CA certificate to `path`.
    ///
    /// # Errors
    /// If the file cannot be written.
    pub fn write_cert(&self, path: &Path) -> Result<()> {
        fs::write(path, &self.cert_pem).map_err(|e| Error::io("write the CA certificate", e))
    }

    /// A server certificate for `names` (DNS names or IP addresses), with
    /// a new key.
    ///
    /// # Errors
    /// If the key or certificate cannot be made.
    pub fn issue_server(&self, names: &[&str]) -> Result<Issued> {
        let key = KeyPair::generate().map_err(|e| tls_error("make a server key", e))?;
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params =
            CertificateParams::new(names.clone()).map_err(|e| tls_error("name the server", e))?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params, key)
    }

    /// A client certificate whose common name is `user` (what PostgreSQL's
    /// `cert` authentication compares with the role), with a new key.
    ///
    /// # Errors
    /// If the key or certificate cannot be made.
    pub fn issue_client(&self, user: &str) -> Result<Issued> {
        let key = KeyPair::generate().map_err(|e| tls_error("make a client key", e))?;
        self.issue_client_for(user, key)
    }

    /// A client certificate for `user` and a key made elsewhere (e.g. RSA,
    /// read with [`KeyPair::from_pem`]).
    ///
    /// # Errors
    /// If the certificate cannot be made.
    pub fn issue_client_for(&self, user: &str, key: KeyPair) -> Result<Issued> {
        let mut params = CertificateParams::new(Vec::<String>::new())
            .map_err(|e| tls_error("make client parameters", e))?;
        params.distinguished_name.push(DnType::CommonName, user);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params, key)
    }

    fn issue(&self, params: CertificateParams, key: KeyPair) -> Result<Issued> {
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| tls_error("sign a certificate", e))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A certificate and its private key, PEM (the key PKCS#8).
#[derive(Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// The private key: keep it out of logs.
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("key_pem", &"***")
            .finish_non_exhaustive()
    }
}

impl Issued {
    /// Writes `<stem>.crt` and `<stem>.key` (mode 0600) into `dir`; returns
    /// their paths.
    ///
    /// # Errors
    /// If a file cannot be written.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(PathBuf, PathBuf)> {
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        fs::write(&cert, &self.cert_pem).map_err(|e| Error::io("write a certificate", e))?;
        write_private(&key, &self.key_pem)?;
        Ok((cert, key))
    }
}

/// Writes a private key readable by its owner only.
pub(crate) fn write_private(path: &Path, pem: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, pem).map_err(|e| Error::io("write a private key", e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io("restrict a private key", e))
}

/// How a [`TempCluster`](crate::TempCluster) speaks TLS: `ssl = on` with a
/// certificate from a [`TestCa`], client certificates checked against the
/// same CA, and a `pg_hba.conf` that may refuse plaintext.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub(crate) server: Issued,
    pub(crate) ca_pem: String,
    pub(crate) only: bool,
    pub(crate) cert_users: Vec<String>,
}

impl ServerTls {
    /// A server certificate from `ca` for `names` (`127.0.0.1` and
    /// `localhost` reach the kit's clusters); plaintext still allowed.
    ///
    /// # Errors
    /// If the certificate cannot be made.
    pub fn new(ca: &TestCa, names: &[&str]) -> Result<ServerTls> {
        Ok(ServerTls {
            server: ca.issue_server(names)?,
            ca_pem: ca.cert_pem().to_owned(),
            only: false,
            cert_users: Vec::new(),
        })
    }

    /// Refuse TCP connections without TLS (`hostssl` lines only), as
    /// managed services do.
    pub fn only(mut self) -> ServerTls {
        self.only = true;
        self
    }

    /// `user` logs in with a client certificate (`cert` authentication:
    /// the certificate's common name must be the role), no password.
    pub fn cert_auth(mut self, user: impl Into<String>) -> ServerTls {
        self.cert_users.push(user.into());
        self
    }

    /// The `pg_hba.conf` for these settings: the kit's admin connection on
    /// the Unix socket, then TCP from 127.0.0.1.
    pub(crate) fn hba(&self) -> String {
        let mut hba = String::from("# written by pgfleet-testkit\nlocal all all trust\n");
        for user in &self.cert_users {
            hba.push_str(&format!("hostssl all {user} 127.0.0.1/32 cert\n"));
        }
        hba.push_str("hostssl all all 127.0.0.1/32 scram-sha-256\n");
        if !self.only {
            hba.push_str("hostnossl all all 127.0.0.1/32 scram-sha-256\n");
        }
        hba
    }
}
