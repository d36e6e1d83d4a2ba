//! [`PgBouncer`]: a real PgBouncer (the system's `pgbouncer` binary) in
//! front of a [`TempCluster`], in transaction or session pooling mode.

use std::fmt::Write as _;
use std::fs;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_postgres::{NoTls, SimpleQueryMessage};

use crate::cluster::TempCluster;
use crate::error::{Error, Result};
use crate::system::{
    as_postgres, chown_to_postgres, free_port, log_tail, nanos_suffix, spawn_watchdog,
    SUPERUSER_PASSWORD,
};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// PgBouncer's `pool_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// A server connection per transaction.
    Transaction,
    /// A server connection per client connection.
    Session,
}

impl PoolMode {
    fn as_str(self) -> &'static str {
        match self {
            PoolMode::Transaction => "transaction",
            PoolMode::Session => "session",
        }
    }
}

/// Builder of a [`PgBouncer`].
#[derive(Debug, Clone)]
pub struct PgBouncerBuilder {
    mode: PoolMode,
    pool_size: u32,
    max_client_conn: u32,
    users: Vec<(String, String)>,
    settings: Vec<(String, String)>,
}

impl PgBouncerBuilder {
    /// `default_pool_size`: server connections per database and user
    /// (default 5).
    pub fn pool_size(mut self, n: u32) -> Self {
        self.pool_size = n;
        self
    }

    /// `max_client_conn` (default 1000).
    pub fn max_client_conn(mut self, n: u32) -> Self {
        self.max_client_conn = n;
        self
    }

    /// Another user that may log in (besides `postgres`), with its password;
    /// the role must exist on the cluster.
    pub fn user(mut self, name: impl Into<String>, password: impl Into<String>) -> Self {
        self.users.push((name.into(), password.into()));
        self
    }

    /// Any other `[pgbouncer]` setting.
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// Writes the configuration into a fresh directory and starts PgBouncer
    /// on a free 127.0.0.1 port in front of `cluster`; waits (up to 10 s)
    /// until it accepts connections.
    ///
    /// # Errors
    /// No `pgbouncer` binary (with how to install it), or it did not start
    /// (with the end of its log).
    pub fn start(self, cluster: &TempCluster) -> Result<PgBouncer> {
        let binary = find_pgbouncer()?;
        let dir = std::env::temp_dir().join(format!(
            "pgfleet-pgbouncer-{}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            nanos_suffix()
        ));
        fs::create_dir_all(&dir).map_err(|e| Error::io("create the PgBouncer directory", e))?;
        let mut users = format!("\"postgres\" \"{SUPERUSER_PASSWORD}\"\n");
        for (name, password) in &self.users {
            let _ = writeln!(users, "\"{name}\" \"{password}\"");
        }
        fs::write(dir.join("userlist.txt"), users)
            .map_err(|e| Error::io("write the PgBouncer user list", e))?;
        let mut last = None;
        for _ in 0..5 {
            let port = free_port()?;
            let mut ini = format!(
                "[databases]\n* = host=127.0.0.1 port={upstream}\n\n[pgbouncer]\n\
                 listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = scram-sha-256\nauth_file = {dir}/userlist.txt\n\
                 admin_users = postgres\npool_mode = {mode}\ndefault_pool_size = {size}\n\
                 max_client_conn = {clients}\nlogfile = {dir}/pgbouncer.log\n\
                 pidfile = {dir}/pgbouncer.pid\n",
                upstream = cluster.port(),
                dir = dir.display(),
                mode = self.mode.as_str(),
                size = self.pool_size,
                clients = self.max_client_conn,
            );
            for (name, value) in &self.settings {
                let _ = writeln!(ini, "{name} = {value}");
            }
            fs::write(dir.join("pgbouncer.ini"), ini)
                .map_err(|e| Error::io("write pgbouncer.ini", e))?;
            chown_to_postgres(&dir)?;
            let child = as_postgres(&binary)
                .arg(dir.join("pgbouncer.ini"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| Error::io("start pgbouncer", e))?;
            let bouncer = PgBouncer {
                dir: dir.clone(),
                port,
                mode: self.mode,
                pool_size: self.pool_size,
                child: Mutex::new(child),
            };
            match bouncer.wait_listening(Duration::from_secs(10)) {
                Ok(()) => {
                    bouncer.spawn_watchdog()?;
                    return Ok(bouncer);
                }
                Err(e) => {
                    bouncer.kill();
                    last = Some(e);
                    std::mem::forget(bouncer);
                }
            }
        }
        let _ = fs::remove_dir_all(&dir);
        Err(last.expect("at least one attempt"))
    }
}

/// The `pgbouncer` binary: `PGFLEET_PGBOUNCER`, `/usr/sbin/pgbouncer`, or
/// on `PATH`.
fn find_pgbouncer() -> Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PGFLEET_PGBOUNCER")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    candidates.push(PathBuf::from("/usr/sbin/pgbouncer"));
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("pgbouncer")));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or(Error::MissingPgBouncer)
}

/// A running PgBouncer in front of a [`TempCluster`], on a free 127.0.0.1
/// port, with the cluster's superuser (and any users added) allowed in.
/// Stopped and its directory removed on drop, and by a watchdog process if
/// the test process dies first.
#[derive(Debug)]
pub struct PgBouncer {
    dir: PathBuf,
    port: u16,
    mode: PoolMode,
    pool_size: u32,
    child: Mutex<Child>,
}

impl PgBouncer {
    /// A builder for pooling mode `mode`.
    pub fn builder(mode: PoolMode) -> PgBouncerBuilder {
        PgBouncerBuilder {
            mode,
            pool_size: 5,
            max_client_conn: 1000,
            users: Vec::new(),
            settings: Vec::new(),
        }
    }

    /// The port PgBouncer listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its pooling mode.
    pub fn mode(&self) -> PoolMode {
        self.mode
    }

    /// `default_pool_size`: the most server connections per database and
    /// user.
    pub fn pool_size(&self) -> u32 {
        self.pool_size
    }

    /// The superuser URL of database `db` through PgBouncer.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres:{SUPERUSER_PASSWORD}@127.0.0.1:{}/{db}",
            self.port
        )
    }

    /// A URL for database `db` through PgBouncer as `user`.
    pub fn url_for(&self, user: &str, password: &str, db: &str) -> String {
        format!("postgres://{user}:{password}@127.0.0.1:{}/{db}", self.port)
    }

    /// PgBouncer's log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("pgbouncer.log")
    }

    /// The end of PgBouncer's log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_path(), lines)
    }

    /// Runs a command of PgBouncer's admin console (`SHOW POOLS`, ...) and
    /// returns its rows as column name to value.
    ///
    /// # Errors
    /// If the console cannot be reached or refuses the command.
    pub async fn show(&self, command: &str) -> Result<Vec<Vec<(String, String)>>> {
        let (client, connection) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} user=postgres password={SUPERUSER_PASSWORD} dbname=pgbouncer",
                self.port
            ),
            NoTls,
        )
        .await
        .map_err(|e| Error::query("connect to the PgBouncer console", e))?;
        let driver = tokio::spawn(connection);
        let messages = client
            .simple_query(command)
            .await
            .map_err(|e| Error::query(command, e));
        drop(client);
        let _ = driver.await;
        Ok(messages?
            .into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(row) => Some(
                    (0..row.len())
                        .map(|i| {
                            (
                                row.columns()[i].name().to_owned(),
                                row.get(i).unwrap_or_default().to_owned(),
                            )
                        })
                        .collect(),
                ),
                _ => None,
            })
            .collect())
    }

    fn wait_listening(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.lock_child().try_wait() {
                return Err(self.start_error(format!("pgbouncer exited ({status})")));
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(self.start_error(format!("not listening after {limit:?}")))
    }

    fn start_error(&self, message: String) -> Error {
        Error::Start {
            message: format!("PgBouncer: {message}"),
            log_tail: self.log_tail(20),
        }
    }

    fn lock_child(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("pgbouncer.pid")
    }

    /// Kills the PgBouncer process (and, when run through `runuser`, the
    /// daemon it runs as the `postgres` user).
    fn kill(&self) {
        if let Ok(pid) = fs::read_to_string(self.pid_file()) {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.trim())
                .stderr(Stdio::null())
                .status();
        }
        let mut child = self.lock_child();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// A detached shell that kills PgBouncer and removes the directory once
    /// this process is gone.
    fn spawn_watchdog(&self) -> Result<()> {
        let pidfile = self.pid_file();
        spawn_watchdog(
            &format!(
                "[ -f '{p}' ] && kill -TERM $(cat '{p}'); sleep 0.2",
                p = pidfile.display()
            ),
            &self.dir,
        )
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
