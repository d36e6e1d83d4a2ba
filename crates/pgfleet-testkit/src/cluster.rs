//! `TempCluster`: a real, throwaway PostgreSQL server.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

use crate::error::{Error, Result};
use crate::system::{
    as_postgres, chown_to_postgres, default_candidates, ensure_template, find_binaries, free_port,
    is_root, log_tail, nanos_suffix, run, spawn_watchdog, SUPERUSER_PASSWORD,
};
use crate::tls::{write_private, ServerTls};

mod replication;

use self::replication::REPLICATION_SETTINGS;

/// Application name of the kit's own admin connections; the counting
/// helpers leave them out.
pub const ADMIN_APPLICATION_NAME: &str = "pgfleet-testkit";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Builder for a [`TempCluster`] with server settings.
#[derive(Debug, Default, Clone)]
pub struct ClusterBuilder {
    settings: Vec<(String, String)>,
    tls: Option<ServerTls>,
}

impl ClusterBuilder {
    /// Sets any server setting (`postgresql.conf` name and value), e.g.
    /// `.setting("max_connections", "20")`.
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// Ready for streaming replication: what [`TempCluster::start_standby`]
    /// and [`TempCluster::rejoin_as_standby_of`] need of a primary.
    pub fn replication(mut self) -> Self {
        for (name, value) in REPLICATION_SETTINGS {
            self.settings.push((name.to_owned(), value.to_owned()));
        }
        self
    }

    /// Speak TLS: `ssl = on` with the certificate of `tls`, client
    /// certificates checked against its CA, and its `pg_hba.conf`.
    pub fn tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Creates the data directory from the machine's template (running
    /// initdb once per machine) and starts the server on a free port.
    ///
    /// # Errors
    /// Missing binaries (with how to install them), initdb or start failure
    /// (with the end of the server log).
    pub fn start(self) -> Result<TempCluster> {
        let bin = find_binaries(&default_candidates())?;
        let template = ensure_template(&bin)?;
        let dir = cluster_dir();
        run(
            Command::new("cp").arg("-a").arg(&template).arg(&dir),
            "copy the template",
        )?;
        let data = dir.join("data");
        let mut settings = self.settings.clone();
        if let Some(tls) = &self.tls {
            install_tls(&dir, &data, tls)?;
            for (name, value) in [
                ("ssl", "on"),
                ("ssl_cert_file", "server.crt"),
                ("ssl_key_file", "server.key"),
                ("ssl_ca_file", "root.crt"),
            ] {
                settings.push((name.to_owned(), value.to_owned()));
            }
        }
        chown_to_postgres(&dir)?;
        launch(bin, dir, settings, self.tls.is_some())
    }
}

/// A fresh directory name for a cluster.
fn cluster_dir() -> PathBuf {
    std::env::temp_dir().join(format!(
        "pgfleet-cluster-{}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        nanos_suffix()
    ))
}

/// Starts the server of `dir/data` (owned by `postgres`) on a free port
/// with `settings`; the directory is removed if it does not start.
fn launch(
    bin: PathBuf,
    dir: PathBuf,
    settings: Vec<(String, String)>,
    tls: bool,
) -> Result<TempCluster> {
    let data = dir.join("data");
    let mut last_err = None;
    // A free port can be taken between our probe and the server's bind:
    // try a few.
    for _ in 0..5 {
        let port = free_port()?;
        let cluster = TempCluster {
            bin: bin.clone(),
            dir: dir.clone(),
            data: data.clone(),
            port,
            running: Mutex::new(false),
            tls,
            settings: settings.clone(),
        };
        cluster.write_settings(&settings)?;
        match cluster.pg_ctl_start() {
            Ok(()) => {
                cluster.spawn_watchdog()?;
                return Ok(cluster);
            }
            Err(e) => {
                last_err = Some(e);
                // Keep the directory for the next attempt; forget this
                // value without running its Drop.
                std::mem::forget(cluster);
            }
        }
    }
    let _ = fs::remove_dir_all(&dir);
    Err(last_err.expect("at least one attempt"))
}

/// A running PostgreSQL server in a fresh directory on a free 127.0.0.1
/// port, removed on drop (also when a test panics), and by a watchdog
/// process if the test process dies without dropping it.
#[derive(Debug)]
pub struct TempCluster {
    bin: PathBuf,
    dir: PathBuf,
    data: PathBuf,
    port: u16,
    running: Mutex<bool>,
    /// Started with [`ClusterBuilder::tls`].
    tls: bool,
    /// The settings it was started with (written again after `pg_rewind`,
    /// which copies the source's).
    settings: Vec<(String, String)>,
}

/// Writes the server's certificate, key, CA and `pg_hba.conf` into the data
/// directory, and the CA certificate as `ca.crt` beside it for clients.
fn install_tls(dir: &Path, data: &Path, tls: &ServerTls) -> Result<()> {
    fs::write(data.join("server.crt"), &tls.server.cert_pem)
        .map_err(|e| Error::io("write the server certificate", e))?;
    write_private(&data.join("server.key"), &tls.server.key_pem)?;
    fs::write(data.join("root.crt"), &tls.ca_pem)
        .map_err(|e| Error::io("write the CA certificate", e))?;
    fs::write(dir.join("ca.crt"), &tls.ca_pem)
        .map_err(|e| Error::io("write the CA certificate", e))?;
    fs::write(data.join("pg_hba.conf"), tls.hba()).map_err(|e| Error::io("write pg_hba.conf", e))
}

impl TempCluster {
    /// A builder to set server settings before start.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// Starts a cluster with default settings.
    ///
    /// # Errors
    /// As [`ClusterBuilder::start`].
    pub fn start() -> Result<TempCluster> {
        ClusterBuilder::default().start()
    }

    /// A cluster shared by the whole process (`max_connections=200`),
    /// started on first use. The watchdog removes it when the process exits.
    ///
    /// # Panics
    /// If it cannot start; the message says why.
    pub fn shared() -> &'static TempCluster {
        static SHARED: OnceLock<TempCluster> = OnceLock::new();
        SHARED.get_or_init(|| {
            TempCluster::builder()
                .setting("max_connections", "200")
                .start()
                .unwrap_or_else(|e| panic!("cannot start the shared test cluster: {e}"))
        })
    }

    /// The superuser (`postgres`) password.
    pub fn superuser_password() -> &'static str {
        SUPERUSER_PASSWORD
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The host the server listens on.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// The cluster's directory (data, log, socket).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The directory holding the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate of a TLS cluster (`ca.crt` in its directory),
    /// for `sslrootcert`.
    pub fn ca_cert_path(&self) -> Option<PathBuf> {
        self.tls.then(|| self.dir.join("ca.crt"))
    }

    /// The server log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// A URL for database `db` as the superuser.
    pub fn url(&self, db: &str) -> String {
        self.url_for("postgres", SUPERUSER_PASSWORD, db)
    }

    /// The superuser URL of database `db` through another port of
    /// 127.0.0.1 (a [`FaultProxy`](crate::FaultProxy) in front of the
    /// cluster).
    pub fn url_via(&self, port: u16, db: &str) -> String {
        format!("postgres://postgres:{SUPERUSER_PASSWORD}@127.0.0.1:{port}/{db}")
    }

    /// A URL for database `db` as `user` with `password`.
    pub fn url_for(&self, user: &str, password: &str, db: &str) -> String {
        format!("postgres://{user}:{password}@127.0.0.1:{}/{db}", self.port)
    }

    /// Stops the server (fast shutdown). Blocks briefly.
    ///
    /// # Errors
    /// If pg_ctl fails.
    pub fn stop(&self) -> Result<()> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if *running {
            self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "60"], "stop the server")?;
            *running = false;
        }
        Ok(())
    }

    /// Starts the server again after [`stop`](Self::stop), same port and
    /// data. Blocks until it accepts connections.
    ///
    /// # Errors
    /// If it does not start (with the end of the log).
    pub fn resume(&self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        self.pg_ctl_start()
    }

    /// Stops and starts the server. Blocks briefly.
    ///
    /// # Errors
    /// As [`stop`](Self::stop) and [`resume`](Self::resume).
    pub fn restart(&self) -> Result<()> {
        self.stop()?;
        self.resume()
    }

    /// Stops the server as a crash would (`pg_ctl stop -m immediate`): every
    /// backend is killed at once, nothing is checkpointed. Blocks briefly.
    ///
    /// # Errors
    /// If pg_ctl fails.
    pub fn kill(&self) -> Result<()> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if *running {
            self.pg_ctl(
                &["stop", "-m", "immediate", "-w", "-t", "60"],
                "kill the server",
            )?;
            *running = false;
        }
        Ok(())
    }

    /// Whether the server was started and not stopped.
    pub fn is_running(&self) -> bool {
        *self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates a database; does nothing if it exists.
    ///
    /// # Errors
    /// If the admin query fails.
    pub async fn create_database(&self, name: &str) -> Result<()> {
        let client = self.admin().await?;
        match client
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(name)))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if e.code().is_some_and(|c| c.code() == "42P04") => Ok(()),
            Err(e) => Err(Error::query("CREATE DATABASE", e)),
        }
    }

    /// Creates a login role with a password (or updates the password).
    ///
    /// # Errors
    /// If the admin query fails.
    pub async fn create_role(&self, name: &str, password: &str) -> Result<()> {
        let client = self.admin().await?;
        let sql = format!(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {n}) THEN \
             CREATE ROLE {i} LOGIN; END IF; END $$; ALTER ROLE {i} WITH LOGIN PASSWORD {p}",
            n = quote_literal(name),
            i = quote_ident(name),
            p = quote_literal(password)
        );
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| Error::query("CREATE ROLE", e))
    }

    /// Runs SQL statements on database `postgres`.
    ///
    /// # Errors
    /// If they fail.
    pub async fn execute(&self, sql: &str) -> Result<()> {
        let client = self.admin().await?;
        client
            .batch_execute(sql)
            .await
            .map_err(|e| Error::query(sql, e))
    }

    /// Terminates (`pg_terminate_backend`) the client backends matching
    /// `filter`; returns how many.
    ///
    /// # Errors
    /// If the admin query fails.
    pub async fn terminate(&self, filter: &BackendFilter) -> Result<u64> {
        let rows = self
            .select_backends(
                "count(*) FILTER (WHERE pg_terminate_backend(pid))",
                filter,
                "",
            )
            .await?;
        Ok(rows[0].get::<_, i64>(0) as u64)
    }

    /// The client backends matching `filter`, from `pg_stat_activity`.
    ///
    /// # Errors
    /// If the admin query fails.
    pub async fn backends(&self, filter: &BackendFilter) -> Result<Vec<Backend>> {
        let rows = self
            .select_backends(
                "pid, datname::text, application_name, state",
                filter,
                "ORDER BY pid",
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Backend {
                pid: r.get(0),
                database: r.get(1),
                application_name: r.get(2),
                state: r.get(3),
            })
            .collect())
    }

    /// `SELECT <columns> FROM pg_stat_activity WHERE <filter> <tail>`.
    async fn select_backends(
        &self,
        columns: &str,
        filter: &BackendFilter,
        tail: &str,
    ) -> Result<Vec<tokio_postgres::Row>> {
        let client = self.admin().await?;
        let (clause, params) = filter.clause();
        let sql = format!("SELECT {columns} FROM pg_stat_activity WHERE {clause} {tail}");
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        client
            .query(&sql, &refs)
            .await
            .map_err(|e| Error::query("pg_stat_activity", e))
    }

    /// How many client backends match `filter`.
    ///
    /// # Errors
    /// If the admin query fails.
    pub async fn count_backends(&self, filter: &BackendFilter) -> Result<usize> {
        Ok(self.backends(filter).await?.len())
    }

    /// Polls (every 20ms, at most `limit`) until the number of backends
    /// matching `filter` satisfies `done`; returns the last count.
    ///
    /// # Errors
    /// If the admin query fails.
    pub async fn wait_for_backends(
        &self,
        filter: &BackendFilter,
        done: impl Fn(usize) -> bool,
        limit: Duration,
    ) -> Result<usize> {
        let deadline = Instant::now() + limit;
        loop {
            let n = self.count_backends(filter).await?;
            if done(n) || Instant::now() >= deadline {
                return Ok(n);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn admin(&self) -> Result<tokio_postgres::Client> {
        // The Unix socket (trust): it works whatever TCP requires (TLS).
        let (client, connection) = tokio_postgres::Config::new()
            .host_path(&self.dir)
            .port(self.port)
            .user("postgres")
            .dbname("postgres")
            .application_name(ADMIN_APPLICATION_NAME)
            .connect(NoTls)
            .await
            .map_err(|e| Error::query("admin connection", e))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    fn write_settings(&self, extra: &[(String, String)]) -> Result<()> {
        let mut settings: Vec<(String, String)> = [
            ("listen_addresses", "127.0.0.1".to_owned()),
            ("port", self.port.to_string()),
            ("unix_socket_directories", self.dir.display().to_string()),
            ("fsync", "off".into()),
            ("synchronous_commit", "off".into()),
            ("full_page_writes", "off".into()),
            ("max_connections", "100".into()),
            ("shared_buffers", "16MB".into()),
            ("log_min_messages", "warning".into()),
            ("log_connections", "off".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        settings.extend(extra.iter().cloned());
        // postgresql.auto.conf is read last, so these win over the template.
        let mut text = String::from("# written by pgfleet-testkit\n");
        for (name, value) in settings {
            text.push_str(&format!("{name} = {}\n", quote_literal(&value)));
        }
        fs::write(self.data.join("postgresql.auto.conf"), text)
            .map_err(|e| Error::io("write settings", e))?;
        chown_to_postgres(&self.data.join("postgresql.auto.conf"))
    }

    fn pg_ctl_start(&self) -> Result<()> {
        let log = self.log_path();
        let result = self.pg_ctl(
            &["start", "-w", "-t", "60", "-l", &log.display().to_string()],
            "start the server",
        );
        match result {
            Ok(()) => {
                *self.running.lock().unwrap_or_else(|e| e.into_inner()) = true;
                Ok(())
            }
            Err(e) => Err(Error::Start {
                message: e.to_string(),
                log_tail: log_tail(&log, 20),
            }),
        }
    }

    fn pg_ctl(&self, args: &[&str], what: &str) -> Result<()> {
        let mut cmd = as_postgres(&self.bin.join("pg_ctl"));
        cmd.arg("-D").arg(&self.data).args(args);
        run(&mut cmd, what)
    }

    /// A detached shell that stops the server and removes the directory once
    /// this process is gone (bounded: gives up after 6 hours).
    fn spawn_watchdog(&self) -> Result<()> {
        let pg_ctl = self.bin.join("pg_ctl");
        let stop = if is_root() {
            format!(
                "runuser -u postgres -- '{}' -D '{}' stop -m immediate",
                pg_ctl.display(),
                self.data.display()
            )
        } else {
            format!(
                "'{}' -D '{}' stop -m immediate",
                pg_ctl.display(),
                self.data.display()
            )
        };
        spawn_watchdog(&stop, &self.dir)
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w"], "stop the server");
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A backend row from `pg_stat_activity`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Process id.
    pub pid: i32,
    /// Database name.
    pub database: Option<String>,
    /// `application_name`.
    pub application_name: Option<String>,
    /// `active`, `idle`, `idle in transaction`, ...
    pub state: Option<String>,
}

/// Which client backends to count or terminate. The kit's own admin
/// connections are always left out.
#[derive(Debug, Clone, Default)]
pub struct BackendFilter {
    application_name: Option<String>,
    application_name_prefix: Option<String>,
    database: Option<String>,
}

impl BackendFilter {
    /// Every client backend.
    pub fn all() -> Self {
        BackendFilter::default()
    }

    /// Only those with this `application_name`.
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = Some(name.into());
        self
    }

    /// Only those whose `application_name` starts with this.
    pub fn application_name_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.application_name_prefix = Some(prefix.into());
        self
    }

    /// Only those connected to this database.
    pub fn database(mut self, name: impl Into<String>) -> Self {
        self.database = Some(name.into());
        self
    }

    fn clause(&self) -> (String, Vec<String>) {
        let mut clause = format!(
            "backend_type = 'client backend' AND pid <> pg_backend_pid() AND application_name <> '{ADMIN_APPLICATION_NAME}'"
        );
        let mut params = Vec::new();
        if let Some(name) = &self.application_name {
            params.push(name.clone());
            clause.push_str(&format!(" AND application_name = ${}", params.len()));
        }
        if let Some(prefix) = &self.application_name_prefix {
            params.push(prefix.clone());
            clause.push_str(&format!(
                " AND starts_with(application_name, ${})",
                params.len()
            ));
        }
        if let Some(db) = &self.database {
            params.push(db.clone());
            clause.push_str(&format!(" AND datname = ${}", params.len()));
        }
        (clause, params)
    }
}

/// A unique lowercase name (`prefix` plus counter, pid and clock bits), valid
/// as a database, role or application name (at most 63 bytes).
pub fn unique_name(prefix: &str) -> String {
    let mut name: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(32)
        .collect();
    name.push_str(&format!(
        "_{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        nanos_suffix() % 100_000
    ));
    name.truncate(63);
    name
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binaries_say_how_to_install_them() {
        let empty = std::env::temp_dir().join(format!("pgfleet-empty-{}", std::process::id()));
        fs::create_dir_all(&empty).unwrap();
        let err = find_binaries(&[empty.clone(), PathBuf::from("/nonexistent")]).unwrap_err();
        let _ = fs::remove_dir_all(&empty);
        let msg = err.to_string();
        assert!(msg.contains("apt-get install postgresql"), "{msg}");
        assert!(msg.contains("PGFLEET_PG_BIN"), "{msg}");
    }

    #[test]
    fn unique_names_are_valid_identifiers() {
        let a = unique_name("My-Test Name");
        let b = unique_name("My-Test Name");
        assert_ne!(a, b);
        assert!(a.len() <= 63);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{a}"
        );
    }
}
