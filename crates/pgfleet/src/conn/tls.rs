//! TLS with rustls: the client configuration a pool builds once from its
//! target's [`TlsConfig`] (roots, verification as `sslmode` says, client
//! certificate), the handshake, what a failed one means in words, and the
//! channel binding data of a session.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore,
    SignatureScheme,
};
use tokio::net::TcpStream;
use tokio_postgres::tls::ChannelBinding;

use crate::address::{Host, Target};
use crate::error::Error;
use crate::tls::{RootCert, SslMode, TlsConfig};

/// What a pool's TLS connections are made with.
pub(crate) struct Client {
    config: Arc<ClientConfig>,
    /// The name checked against the certificate and sent as SNI.
    server_name: ServerName<'static>,
    /// Where the roots came from, for messages.
    roots: String,
}

/// libpq's default files, under `~/.postgresql/`.
fn default_file(name: &str) -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let path = Path::new(&home).join(".postgresql").join(name);
    path.is_file().then_some(path)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Client {
    /// The client for `target`, or `None` when its connections never use
    /// TLS (`sslmode=disable`, a Unix socket).
    ///
    /// # Errors
    /// `Config` naming the parameter and the file for a file that cannot
    /// be read or holds nothing usable, a key that does not belong to its
    /// certificate, `verify-ca`/`verify-full` without roots, or
    /// `sslrootcert=system` with a weaker mode than `verify-full`.
    pub(crate) fn new(target: &Target) -> Result<Option<Client>, Error> {
        let tls = target.tls();
        let Host::Tcp(host) = target.host() else {
            return Ok(None);
        };
        if tls.mode() == SslMode::Disable {
            return Ok(None);
        }
        let server_name = ServerName::try_from(host.clone()).map_err(|_| {
            Error::config(format!(
                "invalid TLS settings for {target}: the host {host:?} is not a valid DNS name or IP address"
            ))
        })?;
        if let Some(custom) = &tls.client_config {
            return Ok(Some(Client {
                config: custom.clone(),
                server_name,
                roots: "the rustls ClientConfig given in code".into(),
            }));
        }
        let bad =
            |what: String| Error::config(format!("invalid TLS settings for {target}: {what}"));
        let (verifier, roots) = verifier(tls).map_err(bad)?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match client_identity(tls).map_err(bad)? {
            Some((cert_path, key_path, certs, key)) => {
                builder.with_client_auth_cert(certs, key).map_err(|e| {
                    bad(match e {
                        rustls::Error::InconsistentKeys(_) => format!(
                            "sslkey = {} is not the key of sslcert = {}",
                            key_path.display(),
                            cert_path.display()
                        ),
                        other => format!(
                            "sslcert = {} / sslkey = {}: {other}",
                            cert_path.display(),
                            key_path.display()
                        ),
                    })
                })?
            }
            None => builder.with_no_client_auth(),
        };
        config.enable_sni = tls.sends_sni();
        // PostgreSQL 17 checks the protocol when the client names one.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(Some(Client {
            config: Arc::new(config),
            server_name,
            roots,
        }))
    }

    /// The TLS handshake over `tcp`, after the server agreed to TLS.
    ///
    /// # Errors
    /// What failed, in words (see [`describe`](Self::describe)), and
    /// whether it is a failure of TLS itself (trust, protocol), which a
    /// retry does not cure, rather than of the network.
    pub(crate) async fn handshake(
        &self,
        tcp: TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, (String, bool)> {
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| {
                let of_tls = e
                    .get_ref()
                    .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some());
                (self.describe(&e), of_tls)
            })
    }

    /// A TLS failure after the handshake, in words, when `e` is one: with
    /// TLS 1.3 the server checks the client's certificate after the
    /// client has finished its part, so its refusal arrives as an alert on
    /// the first read of the startup.
    pub(crate) fn explain_startup(&self, e: &tokio_postgres::Error) -> Option<String> {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
        while let Some(inner) = cause {
            if let Some(tls) = inner
                .downcast_ref::<io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|e| e.downcast_ref::<rustls::Error>())
            {
                return Some(self.describe_tls(tls));
            }
            cause = inner.source();
        }
        None
    }

    /// A failed handshake in words: which check failed and what decides
    /// it, never key material.
    fn describe(&self, e: &io::Error) -> String {
        match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
            Some(tls) => self.describe_tls(tls),
            None => format!("TLS handshake failed: {e}"),
        }
    }

    fn describe_tls(&self, tls: &rustls::Error) -> String {
        match tls {
            rustls::Error::InvalidCertificate(cert) => match cert {
                CertificateError::UnknownIssuer => format!(
                    "the server's certificate is not issued by a trusted authority (roots: {})",
                    self.roots
                ),
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => {
                    let presented = match cert {
                        CertificateError::NotValidForNameContext { presented, .. } => {
                            format!(" (it names {})", presented.join(", "))
                        }
                        _ => String::new(),
                    };
                    format!(
                        "the server's certificate is not valid for host {}{presented}; sslmode=verify-full checks the host name, verify-ca does not",
                        self.server_name.to_str()
                    )
                }
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    "the server's certificate has expired".into()
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    "the server's certificate is not valid yet".into()
                }
                other => format!("the server's certificate was refused: {other:?}"),
            },
            rustls::Error::AlertReceived(alert) => match alert {
                AlertDescription::CertificateRequired => {
                    "the server requires a client certificate (set sslcert and sslkey)".into()
                }
                AlertDescription::UnknownCA
                | AlertDescription::BadCertificate
                | AlertDescription::CertificateUnknown
                | AlertDescription::AccessDenied
                | AlertDescription::DecryptError => format!(
                    "the server refused the TLS session (alert {alert:?}): usually the client certificate (sslcert) is not one it trusts"
                ),
                other => format!("the server ended the TLS handshake (alert {other:?})"),
            },
            other => format!("TLS handshake failed: {other}"),
        }
    }
}

/// The verifier `sslmode` asks for, and where its roots came from. As in
/// libpq, a configured root certificate makes `require`, `prefer` and
/// `allow` check the chain too.
fn verifier(tls: &TlsConfig) -> Result<(Arc<dyn ServerCertVerifier>, String), String> {
    let roots = match tls.root_cert_setting() {
        Some(RootCert::System) => {
            if tls.mode() != SslMode::VerifyFull {
                return Err(format!(
                    "sslrootcert = system needs sslmode = verify-full (got {})",
                    tls.mode()
                ));
            }
            let found = rustls_native_certs::load_native_certs();
            let mut store = RootCertStore::empty();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(
                    "sslrootcert = system: the platform has no trusted root certificates".into(),
                );
            }
            Some((store, "the platform's trusted roots".to_owned()))
        }
        Some(RootCert::File(path)) => Some((
            read_roots(path)?,
            format!("sslrootcert = {}", path.display()),
        )),
        None => match default_file("root.crt") {
            Some(path) => Some((
                read_roots(&path)?,
                format!("sslrootcert = {}", path.display()),
            )),
            None => None,
        },
    };
    let Some((store, shown)) = roots else {
        if tls.mode().verifies() {
            return Err(format!(
                "sslmode = {} needs the authorities to check the server against: set sslrootcert to a PEM file of the CA, or sslrootcert = system",
                tls.mode()
            ));
        }
        return Ok((
            Arc::new(Unverified(provider())),
            "none (the certificate is not checked)".into(),
        ));
    };
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider())
        .build()
        .map_err(|e| format!("{shown}: {e}"))?;
    let verifier: Arc<dyn ServerCertVerifier> = if tls.mode() == SslMode::VerifyFull {
        webpki
    } else {
        Arc::new(ChainOnly(webpki))
    };
    Ok((verifier, shown))
}

fn read_roots(path: &Path) -> Result<RootCertStore, String> {
    let shown = path.display();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect())
        .map_err(|e| format!("sslrootcert = {shown}: cannot read it: {}", pem_error(&e)))?;
    let mut store = RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!("sslrootcert = {shown}: no certificate in it"));
    }
    Ok(store)
}

/// The certificate and key files and what they hold, for a client
/// certificate: the ones set, else libpq's defaults when both exist.
type Identity = (
    PathBuf,
    PathBuf,
    Vec<CertificateDer<'static>>,
    PrivateKeyDer<'static>,
);

fn client_identity(tls: &TlsConfig) -> Result<Option<Identity>, String> {
    let (cert, key) = match (tls.client_cert_path(), tls.client_key_path()) {
        (Some(cert), Some(key)) => (cert.to_owned(), key.to_owned()),
        (Some(cert), None) => {
            return Err(format!(
                "sslcert = {} is set without sslkey",
                cert.display()
            ))
        }
        (None, Some(key)) => {
            return Err(format!("sslkey = {} is set without sslcert", key.display()))
        }
        (None, None) => match (
            default_file("postgresql.crt"),
            default_file("postgresql.key"),
        ) {
            (Some(cert), Some(key)) => (cert, key),
            _ => return Ok(None),
        },
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
        .and_then(|certs| certs.collect())
        .map_err(|e| {
            format!(
                "sslcert = {}: cannot read it: {}",
                cert.display(),
                pem_error(&e)
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "sslcert = {}: no certificate in it",
            cert.display()
        ));
    }
    // Never the key's bytes in a message: only the file and the reason.
    let private = PrivateKeyDer::from_pem_file(&key).map_err(|e| {
        format!(
            "sslkey = {}: cannot read the private key (PEM: PKCS#8, PKCS#1 or SEC1): {}",
            key.display(),
            pem_error(&e)
        )
    })?;
    Ok(Some((cert, key, certs, private)))
}

/// A PEM reading error in words, without the file's contents.
fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error as Pem;
    match e {
        Pem::Io(io) => io.to_string(),
        Pem::NoItemsFound => "no PEM item of the expected kind in it".into(),
        Pem::MissingSectionEnd { .. } => "a PEM section has no END line".into(),
        Pem::IllegalSectionStart { .. } => "a malformed BEGIN line".into(),
        Pem::Base64Decode(_) => "invalid base64 in a PEM section".into(),
        _ => "not a readable PEM file".into(),
    }
}

/// `verify-ca` (and `require` with roots): the chain must lead to a trusted
/// root; the host name is not checked. webpki checks the name only once the
/// chain is good, so a name error means a good chain.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `require`, `prefer`, `allow` without roots: encryption without checking
/// who the server is (libpq's meaning); the handshake's signatures are
/// still checked, so the session is with the holder of the certificate's
/// key.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `tls-server-end-point` (RFC 5929): the server certificate hashed with
/// the hash of its signature algorithm, SHA-256 for MD5 and SHA-1. None
/// for an algorithm without one (Ed25519), as PostgreSQL cannot bind those
/// either; SCRAM then runs without binding (or fails under
/// `channel_binding=require`).
pub(crate) fn channel_binding(
    stream: &tokio_rustls::client::TlsStream<TcpStream>,
) -> ChannelBinding {
    let (_, session) = stream.get_ref();
    let Some(cert) = session.peer_certificates().and_then(|c| c.first()) else {
        return ChannelBinding::none();
    };
    let algorithm = match signature_hash(cert) {
        Some(SigHash::Sha256) => &ring::digest::SHA256,
        Some(SigHash::Sha384) => &ring::digest::SHA384,
        Some(SigHash::Sha512) => &ring::digest::SHA512,
        None => return ChannelBinding::none(),
    };
    ChannelBinding::tls_server_end_point(ring::digest::digest(algorithm, cert).as_ref().to_vec())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SigHash {
    Sha256,
    Sha384,
    Sha512,
}

/// The hash of a certificate's signature algorithm, read from its DER:
/// `Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm
/// SEQUENCE { OID, ... }, signature }`.
fn signature_hash(cert: &[u8]) -> Option<SigHash> {
    let (_, body, _) = der_item(cert, 0x30)?;
    let (_, _, rest) = der_item(body, 0x30)?; // tbsCertificate
    let (_, algorithm, _) = der_item(rest, 0x30)?;
    let (_, oid, _) = der_item(algorithm, 0x06)?;
    // The OIDs' content bytes.
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01]; // 1.2.840.113549.1.1
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04]; // 1.2.840.10045.4
    match oid {
        [rsa @ .., last] if rsa == RSA => match last {
            4 | 5 | 11 => Some(SigHash::Sha256), // md5, sha1, sha256
            12 => Some(SigHash::Sha384),
            13 => Some(SigHash::Sha512),
            _ => None,
        },
        [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01] => Some(SigHash::Sha256), // ecdsa-with-SHA1
        [ecdsa @ .., 0x03, last] if ecdsa == ECDSA => match last {
            2 => Some(SigHash::Sha256),
            3 => Some(SigHash::Sha384),
            4 => Some(SigHash::Sha512),
            _ => None,
        },
        _ => None,
    }
}

/// One DER item with tag `tag` at the start of `data`: (header length,
/// content, what follows).
fn der_item(data: &[u8], tag: u8) -> Option<(usize, &[u8], &[u8])> {
    if *data.first()? != tag {
        return None;
    }
    let first = *data.get(1)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for &b in data.get(2..2 + n)? {
            len = len << 8 | usize::from(b);
        }
        (len, 2 + n)
    };
    let content = data.get(header..header.checked_add(len)?)?;
    Some((header, content, &data[header + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(alg).expect("key");
        rcgen::CertificateParams::new(vec!["db.test".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert")
            .der()
            .to_vec()
    }

    #[test]
    fn the_signature_hash_is_read_from_the_certificate() {
        assert_eq!(
            signature_hash(&cert_with(&rcgen::PKCS_ECDSA_P256_SHA256)),
            Some(SigHash::Sha256)
        );
        assert_eq!(
            signature_hash(&cert_with(&rcgen::PKCS_ECDSA_P384_SHA384)),
            Some(SigHash::Sha384)
        );
        assert_eq!(signature_hash(&cert_with(&rcgen::PKCS_ED25519)), None);
        assert_eq!(signature_hash(b"\x30\x03\x02\x01"), None);
        assert_eq!(signature_hash(&[]), None);
    }
}
