//! TLS against real servers: every `sslmode` against a TLS-only and a
//! plaintext-only server with libpq's outcome for each pair, certificate
//! checks (host name, unknown CA), client certificates, channel binding,
//! and the pool's own machinery over TLS: dirty returns, a guard dropped
//! mid-query, shared mode, the statement cache, cancelling a statement.

#![cfg(feature = "tls-rustls")]

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use common::{app, config, in_transaction};
use pgfleet::{Error, Pool, PooledConnection, SslMode, Target};
use pgfleet_testkit::{ServerTls, TempCluster, TestCa};

/// The CA of the TLS clusters of this binary.
fn ca() -> &'static TestCa {
    static CA: OnceLock<TestCa> = OnceLock::new();
    CA.get_or_init(|| TestCa::new("pgfleet test CA").expect("CA"))
}

/// A TLS-only server (hostssl only) with a certificate for 127.0.0.1 and
/// localhost; `certuser` logs in with a client certificate.
fn tls_only() -> &'static TempCluster {
    static CLUSTER: OnceLock<TempCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let tls = ServerTls::new(ca(), &["127.0.0.1", "localhost"])
            .expect("server certificate")
            .only()
            .cert_auth("certuser");
        TempCluster::builder()
            .setting("max_connections", "60")
            .tls(tls)
            .start()
            .expect("TLS-only cluster")
    })
}

/// A plaintext-only server (`ssl = off`).
fn plaintext_only() -> &'static TempCluster {
    common::cluster()
}

/// A TLS-only server whose certificate names another host only.
fn other_name() -> &'static TempCluster {
    static CLUSTER: OnceLock<TempCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let tls = ServerTls::new(ca(), &["db.example"])
            .expect("server certificate")
            .only();
        TempCluster::builder()
            .setting("max_connections", "20")
            .tls(tls)
            .start()
            .expect("cluster with another host's certificate")
    })
}

fn ca_path(cluster: &TempCluster) -> PathBuf {
    cluster.ca_cert_path().expect("a TLS cluster")
}

fn url(cluster: &TempCluster, params: &str) -> String {
    format!("{}?{params}", cluster.url("postgres"))
}

/// A pool of at most 2 for `url`, tagged with `app`.
fn pool(url: &str, app: &str) -> Result<Pool, Error> {
    let mut config = config(app, 0, 2);
    config.acquire_timeout = Duration::from_secs(5);
    Pool::new(Target::parse(url)?, config)
}

/// Whether the server sees this session as TLS.
async fn ssl_in_use(conn: &PooledConnection) -> bool {
    conn.query_one(
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        &[],
    )
    .await
    .expect("pg_stat_ssl")
    .get(0)
}

/// Connects once: `Ok(TLS in use)` or the error's text.
async fn outcome(url: &str) -> Result<bool, String> {
    let app = app("tls_mode");
    let pool = pool(url, &app).map_err(|e| pgfleet::report(&e))?;
    let result = match pool.get().await {
        Ok(conn) => Ok(ssl_in_use(&conn).await),
        Err(e) => Err(pgfleet::report(&e)),
    };
    pool.close();
    result
}

#[tokio::test]
async fn each_sslmode_against_a_tls_only_and_a_plaintext_only_server() {
    let ca = ca_path(tls_only());
    let ca = ca.display();
    // libpq's outcome for each pair: Some(tls in use) or None (fails).
    let table: [(SslMode, Option<bool>, Option<bool>); 6] = [
        (SslMode::Disable, None, Some(false)),
        (SslMode::Allow, Some(true), Some(false)),
        (SslMode::Prefer, Some(true), Some(false)),
        (SslMode::Require, Some(true), None),
        (SslMode::VerifyCa, Some(true), None),
        (SslMode::VerifyFull, Some(true), None),
    ];
    for (mode, on_tls_only, on_plaintext_only) in table {
        let params = format!("sslmode={mode}&sslrootcert={ca}");
        for (server, cluster, want) in [
            ("TLS-only", tls_only(), on_tls_only),
            ("plaintext-only", plaintext_only(), on_plaintext_only),
        ] {
            let got = outcome(&url(cluster, &params)).await;
            match (want, &got) {
                (Some(tls), Ok(used)) => assert_eq!(*used, tls, "{mode} on {server}"),
                (None, Err(message)) => {
                    let expected = match server {
                        // The server refuses the plaintext session.
                        "TLS-only" => "no encryption",
                        _ => "the server does not support TLS",
                    };
                    assert!(message.contains(expected), "{mode} on {server}: {message}");
                }
                _ => panic!("{mode} on {server}: expected {want:?}, got {got:?}"),
            }
        }
    }
}

#[tokio::test]
async fn the_default_mode_is_prefer() {
    assert_eq!(outcome(&tls_only().url("postgres")).await, Ok(true));
    assert_eq!(outcome(&plaintext_only().url("postgres")).await, Ok(false));
}

#[tokio::test]
async fn verify_full_refuses_another_hosts_certificate_and_verify_ca_accepts_it() {
    let cluster = other_name();
    let ca = ca_path(tls_only());
    let full = outcome(&url(
        cluster,
        &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
    ))
    .await
    .unwrap_err();
    assert!(
        full.contains("not valid for host 127.0.0.1") && full.contains("db.example"),
        "{full}"
    );
    let ca_only = outcome(&url(
        cluster,
        &format!("sslmode=verify-ca&sslrootcert={}", ca.display()),
    ))
    .await;
    assert_eq!(ca_only, Ok(true));
    // `require` with a root certificate checks the chain too (libpq).
    let required = outcome(&url(
        cluster,
        &format!("sslmode=require&sslrootcert={}", ca.display()),
    ))
    .await;
    assert_eq!(required, Ok(true));
}

#[tokio::test]
async fn an_unknown_ca_fails_at_once_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let stranger = TestCa::new("someone else").unwrap();
    let path = dir.path().join("other-ca.crt");
    stranger.write_cert(&path).unwrap();
    let app = app("tls_unknown_ca");
    let mut config = config(&app, 0, 2);
    config.acquire_timeout = Duration::from_secs(30);
    let pool = Pool::new(
        Target::parse(&url(
            tls_only(),
            &format!("sslmode=verify-ca&sslrootcert={}", path.display()),
        ))
        .unwrap(),
        config,
    )
    .unwrap();
    let err = pool.get().await.unwrap_err();
    // A connect error, not the acquire timeout: waiting will not help.
    assert!(err.is_connect(), "{err:?}");
    let message = pgfleet::report(&err);
    assert!(
        message.contains("not issued by a trusted authority")
            && message.contains(&path.display().to_string()),
        "{message}"
    );
    // `require` with this root checks the chain (libpq) and fails too;
    // `prefer` falls back to plaintext, which this server refuses.
    let require = outcome(&url(
        tls_only(),
        &format!("sslmode=require&sslrootcert={}", path.display()),
    ))
    .await
    .unwrap_err();
    assert!(
        require.contains("not issued by a trusted authority"),
        "{require}"
    );
    let prefer = outcome(&url(
        tls_only(),
        &format!("sslmode=prefer&sslrootcert={}", path.display()),
    ))
    .await
    .unwrap_err();
    assert!(
        prefer.contains("no encryption") && prefer.contains("tried over TLS first"),
        "{prefer}"
    );
}

#[tokio::test]
async fn bad_tls_settings_are_refused_when_the_pool_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.crt");
    let cases = [
        (
            format!("sslmode=verify-full&sslrootcert={}", missing.display()),
            format!("sslrootcert = {}: cannot read it", missing.display()),
        ),
        (
            "sslmode=verify-full".to_owned(),
            "needs the authorities to check the server against".to_owned(),
        ),
        (
            "sslmode=require&sslrootcert=system".to_owned(),
            "sslrootcert = system needs sslmode = verify-full".to_owned(),
        ),
        (
            format!("sslcert={}", missing.display()),
            "is set without sslkey".to_owned(),
        ),
    ];
    for (params, needle) in cases {
        let err = pool(&url(tls_only(), &params), "tls_bad").unwrap_err();
        assert!(err.is_config(), "{params}: {err:?}");
        assert!(err.to_string().contains(&needle), "{params}: {err}");
        assert!(
            !err.to_string().contains(TempCluster::superuser_password()),
            "{err}"
        );
    }
}

/// Writes a client certificate for `user` from `ca` into `dir`.
fn client_files(ca: &TestCa, user: &str, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
    ca.issue_client(user).unwrap().write(dir, stem).unwrap()
}

fn cert_url(cert: &Path, key: &Path, mode: &str) -> String {
    let cluster = tls_only();
    format!(
        "postgres://certuser@127.0.0.1:{}/postgres?sslmode={mode}&sslrootcert={}&sslcert={}&sslkey={}",
        cluster.port(),
        ca_path(cluster).display(),
        cert.display(),
        key.display()
    )
}

async fn create_cert_role() {
    tls_only()
        .execute("DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'certuser') THEN CREATE ROLE certuser LOGIN; END IF; END $$")
        .await
        .unwrap();
}

#[tokio::test]
async fn client_certificates_log_in_and_wrong_ones_fail_clearly() {
    create_cert_role().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = client_files(ca(), "certuser", dir.path(), "good");
    // No password anywhere: the certificate is the credential.
    let conn_user = {
        let app = app("tls_cert");
        let pool = pool(&cert_url(&cert, &key, "verify-full"), &app).unwrap();
        let conn = pool.get().await.unwrap();
        assert!(ssl_in_use(&conn).await);
        let user: String = conn
            .query_one("SELECT current_user", &[])
            .await
            .unwrap()
            .get(0);
        user
    };
    assert_eq!(conn_user, "certuser");

    // A key that is not the certificate's: refused before any connect.
    let (_, other_key) = client_files(ca(), "certuser", dir.path(), "other");
    let err = pool(&cert_url(&cert, &other_key, "verify-full"), "tls_cert_bad").unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains(&format!(
            "sslkey = {} is not the key of sslcert",
            other_key.display()
        )),
        "{message}"
    );
    // Not a key at all: the file and the reason, never its contents.
    let garbage = dir.path().join("garbage.key");
    std::fs::write(
        &garbage,
        "-----BEGIN PRIVATE KEY-----\nSecretbits!!\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let err = pool(&cert_url(&cert, &garbage, "verify-full"), "tls_cert_bad").unwrap_err();
    let message = err.to_string();
    assert!(message.contains("cannot read the private key"), "{message}");
    assert!(!message.contains("Secretbits"), "{message}");

    // A certificate from a CA the server does not trust: the server says
    // no with a TLS alert (with TLS 1.3, on the first read after the
    // handshake), which the pool explains.
    let stranger = TestCa::new("someone else").unwrap();
    let (cert, key) = client_files(&stranger, "certuser", dir.path(), "stranger");
    let refused = outcome(&cert_url(&cert, &key, "verify-full"))
        .await
        .unwrap_err();
    assert!(refused.contains("refused the TLS session"), "{refused}");
}

#[tokio::test]
async fn an_rsa_client_key_in_pkcs1_form_works() {
    create_cert_role().await;
    let dir = tempfile::tempdir().unwrap();
    let pkcs8 = dir.path().join("rsa8.key");
    let pkcs1 = dir.path().join("rsa1.key");
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl (apt-get install openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        pkcs8.to_str().unwrap(),
    ]);
    run(&[
        "pkey",
        "-in",
        pkcs8.to_str().unwrap(),
        "-traditional",
        "-out",
        pkcs1.to_str().unwrap(),
    ]);
    let pkcs1_text = std::fs::read_to_string(&pkcs1).unwrap();
    assert!(pkcs1_text.contains("BEGIN RSA PRIVATE KEY"), "PKCS#1 form");
    let key = pgfleet_testkit::rcgen::KeyPair::from_pem_and_sign_algo(
        &std::fs::read_to_string(&pkcs8).unwrap(),
        &pgfleet_testkit::rcgen::PKCS_RSA_SHA256,
    )
    .unwrap();
    let cert = dir.path().join("rsa.crt");
    std::fs::write(
        &cert,
        ca().issue_client_for("certuser", key).unwrap().cert_pem,
    )
    .unwrap();
    assert_eq!(
        outcome(&cert_url(&cert, &pkcs1, "verify-full")).await,
        Ok(true)
    );
}

#[tokio::test]
async fn scram_binds_to_the_tls_session() {
    let ca = ca_path(tls_only());
    // Binding needs the session's certificate hash: it works only if the
    // data pgfleet computes is the server's.
    let bound = outcome(&url(
        tls_only(),
        &format!(
            "sslmode=verify-full&sslrootcert={}&channel_binding=require",
            ca.display()
        ),
    ))
    .await;
    assert_eq!(bound, Ok(true));
    let plain = outcome(&url(
        plaintext_only(),
        "sslmode=disable&channel_binding=require",
    ))
    .await
    .unwrap_err();
    assert!(plain.contains("channel binding"), "{plain}");
}

fn verified_url() -> String {
    url(
        tls_only(),
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            ca_path(tls_only()).display()
        ),
    )
}

#[tokio::test]
async fn over_tls_a_dirty_return_is_rolled_back_and_a_dropped_query_does_not_poison() {
    let app = app("tls_dirty");
    let mut config = config(&app, 0, 1);
    config.max_queries = Some(1_000);
    let pool = Pool::new(Target::parse(&verified_url()).unwrap(), config).unwrap();
    {
        let conn = pool.get().await.unwrap();
        assert!(ssl_in_use(&conn).await);
        conn.batch_execute("BEGIN; CREATE TEMP TABLE t (v int)")
            .await
            .unwrap();
    }
    {
        let conn = pool.get().await.unwrap();
        assert!(!in_transaction(&conn).await, "rolled back before reuse");
    }
    // A guard dropped in the middle of a statement inside a transaction:
    // the pool cancels it (a cancel request over TLS) and rolls back, so
    // the same connection serves again.
    {
        let conn = pool.get().await.unwrap();
        let slow = conn.batch_execute("BEGIN; SELECT pg_sleep(30)");
        let r = tokio::time::timeout(Duration::from_millis(100), slow).await;
        assert!(r.is_err(), "the statement should still be running");
    }
    let conn = pool.get().await.unwrap();
    let v: i32 = conn.query_one("SELECT 7", &[]).await.unwrap().get(0);
    assert_eq!(v, 7);
    assert!(!in_transaction(&conn).await);
    drop(conn);
    let stats = pool.stats();
    assert_eq!(stats.counters.dirty_returns, 2, "{stats:?}");
    assert_eq!(
        stats.counters.connections_created, 1,
        "cancelled and cleaned, not replaced: {stats:?}"
    );

    // FATAL seen through TLS: a terminated backend is not handed out.
    let pid: i32 = {
        let conn = pool.get().await.unwrap();
        conn.query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0)
    };
    tls_only()
        .execute(&format!("SELECT pg_terminate_backend({pid}, 5000)"))
        .await
        .unwrap();
    // The FATAL reaches the idle connection's driver through TLS; the
    // pool's maintenance then closes the connection as broken (bounded
    // wait, no fixed sleep).
    assert!(
        common::eventually(Duration::from_secs(10), || {
            pool.stats().counters.connections_closed_broken == 1
        })
        .await,
        "the terminated connection was never seen as broken"
    );
    let conn = pool.get().await.unwrap();
    let again: i32 = conn
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(again, pid);
    assert!(ssl_in_use(&conn).await);
    assert_eq!(pool.stats().counters.connections_closed_broken, 1);
}

#[tokio::test]
async fn over_tls_max_queries_shared_mode_and_the_statement_cache_work() {
    let app = app("tls_shared");
    let mut config = config(&app, 0, 2);
    config.max_queries = Some(3);
    config.shared_connections = Some(1);
    let pool = Pool::new(Target::parse(&verified_url()).unwrap(), config).unwrap();
    // max_queries counts statements the tap sees in the decrypted stream.
    let first: i32 = {
        let conn = pool.get().await.unwrap();
        for _ in 0..3 {
            conn.query_one("SELECT 1", &[]).await.unwrap();
        }
        conn.query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0)
    };
    let second: i32 = {
        let conn = pool.get().await.unwrap();
        conn.query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0)
    };
    assert_ne!(first, second, "retired after max_queries");
    // The statement cache: prepared once, reused.
    {
        let conn = pool.get().await.unwrap();
        let before = conn.cached_statements();
        for i in 0..5i32 {
            let statement = conn.prepare_cached("SELECT $1::int + 1").await.unwrap();
            let v: i32 = conn.query_one(&statement, &[&i]).await.unwrap().get(0);
            assert_eq!(v, i + 1);
        }
        assert_eq!(conn.cached_statements(), before + 1);
    }
    // Shared mode: many callers on one TLS lane.
    let mut tasks = Vec::new();
    for i in 0..20i32 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let shared = pool.shared().await.unwrap();
            let v: i32 = shared
                .query_one("SELECT $1::int", &[&i])
                .await
                .unwrap()
                .get(0);
            v
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.unwrap(), i as i32);
    }
}

/// A TCP relay to `upstream` that records, for each connection, whether it
/// opened with an SSLRequest (PostgreSQL handles a CancelRequest before
/// `pg_hba.conf`, so only the wire shows whether a cancel went over TLS).
async fn recording_relay(upstream: u16) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<bool>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        // Bounded: the test needs a few connections.
        for _ in 0..64 {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let record = record.clone();
            tokio::spawn(async move {
                let mut first = [0u8; 8];
                if client.read_exact(&mut first).await.is_err() {
                    return;
                }
                record
                    .lock()
                    .unwrap()
                    .push(first == [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]);
                let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    return;
                };
                if server.write_all(&first).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    (port, seen)
}

#[tokio::test]
async fn over_tls_a_running_statement_can_be_cancelled() {
    let (port, opened_with_tls) = recording_relay(tls_only().port()).await;
    let app = app("tls_cancel");
    let relayed = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        tls_only().url_via(port, "postgres"),
        ca_path(tls_only()).display()
    );
    let pool = Pool::new(Target::parse(&relayed).unwrap(), config(&app, 0, 1)).unwrap();
    let conn = pool.get().await.unwrap();
    let token = conn.cancel_token();
    let running = tokio::spawn(async move {
        let err = conn
            .query_one("SELECT pg_sleep(30)", &[])
            .await
            .unwrap_err();
        (conn, err)
    });
    // Cancel until the statement ends (a cancel that arrives before the
    // statement starts cancels nothing); bounded.
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if running.is_finished() {
            break;
        }
        token
            .cancel_query()
            .await
            .expect("the cancel request went through");
    }
    let (conn, err) = tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("the statement was cancelled")
        .unwrap();
    assert_eq!(err.code(), Some("57014"), "{err}");
    // A cancel request still on its way lands on an idle backend, which
    // ignores it, rather than on the next statement.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v: i32 = conn.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(v, 1);
    // The connection and every cancel request asked for TLS first.
    let seen = opened_with_tls.lock().unwrap().clone();
    assert!(seen.len() >= 2, "a connection and a cancel: {seen:?}");
    assert!(seen.iter().all(|tls| *tls), "{seen:?}");
}

#[tokio::test]
async fn callers_sharing_a_pool_must_agree_on_tls() {
    let fleet = pgfleet::Fleet::new();
    let app = app("tls_fleet");
    let config = config(&app, 0, 2);
    let verified = Target::parse(&verified_url()).unwrap();
    let pool = fleet.pool(&verified, &config).unwrap();
    let again = fleet
        .pool(&Target::parse(&verified_url()).unwrap(), &config)
        .unwrap();
    assert_eq!(pool.active_references(), 2, "one pool, two handles");
    drop(again);
    let weaker = Target::parse(&url(tls_only(), "sslmode=prefer")).unwrap();
    assert_eq!(weaker.key(), verified.key(), "one database");
    let err = fleet.pool(&weaker, &config).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("sslmode = verify-full (in force) vs prefer (asked)")
            && message.contains("sslrootcert"),
        "{message}"
    );
}

/// A rustls configuration made in code, trusting `roots`.
fn rustls_config(roots: &[&Path]) -> std::sync::Arc<pgfleet::rustls::ClientConfig> {
    use pgfleet::rustls;
    use rustls::pki_types::pem::PemObject;
    let mut store = rustls::RootCertStore::empty();
    for path in roots {
        store
            .add(rustls::pki_types::CertificateDer::from_pem_file(path).unwrap())
            .unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    std::sync::Arc::new(config)
}

#[tokio::test]
async fn a_rustls_configuration_from_code_is_used_as_it_is() {
    let cluster = tls_only();
    let app = app("tls_custom");
    let with = |config| {
        Target::parse(&cluster.url("postgres"))
            .unwrap()
            .with_tls(pgfleet::TlsConfig::new(SslMode::VerifyFull).rustls_config(config))
    };
    let pool = Pool::new(
        with(rustls_config(&[&ca_path(cluster)])),
        common::config(&app, 0, 1),
    )
    .unwrap();
    let conn = pool.get().await.unwrap();
    assert!(ssl_in_use(&conn).await);
    drop(conn);
    // Its roots decide: none trusted, no connection (and no fallback).
    let mut config = common::config(&app, 0, 1);
    config.acquire_timeout = Duration::from_secs(30);
    let pool = Pool::new(with(rustls_config(&[])), config).unwrap();
    let err = pool.get().await.unwrap_err();
    let message = pgfleet::report(&err);
    assert!(
        err.is_connect()
            && message.contains(
                "not issued by a trusted authority (roots: the rustls ClientConfig given in code)"
            ),
        "{message}"
    );
}
