//! Helpers of the `pgfleet serve` tests: a server child process, requests,
//! the Prometheus text format.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgfleet_testkit::{unique_name, TempCluster};
use serde_json::Value;

/// A running `pgfleet serve` child process.
pub struct Server {
    pub child: Child,
    pub base: String,
    pub app: String,
    pub output: Arc<Mutex<Vec<String>>>,
    _config: tempfile::TempDir,
}

impl Server {
    pub fn start(cluster: &TempCluster, timeout_s: u32) -> Server {
        Server::start_url(&cluster.url("postgres"), timeout_s)
    }

    /// `pgfleet serve` on the database at `url`.
    pub fn start_url(url: &str, timeout_s: u32) -> Server {
        let app = unique_name("serve");
        let yaml = format!(
            "postgres:\n  min_size: 2\n  max_size: 10\n  timeout: {timeout_s}\n  connect_timeout: 2\n  application_name: {app}\n\
             connection_pool:\n  precache_configs:\n    - user: alice\n      services: [memory, buffer, storage]\n"
        );
        Server::start_with(url, &app, &yaml, Stdio::null())
    }

    /// `pgfleet serve` on the database at `url` with `yaml` as its
    /// `config.yaml` (whose pools are named `app`); its standard error goes
    /// to `stderr`.
    pub fn start_with(url: &str, app: &str, yaml: &str, stderr: Stdio) -> Server {
        let app = app.to_owned();
        let config = tempfile::tempdir().unwrap();
        std::fs::write(config.path().join("config.yaml"), yaml).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_pgfleet"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--shutdown-timeout",
                "5",
                "--config",
            ])
            .arg(config.path())
            .env("DATABASE_URL", url)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.to_owned());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("serve did not start: {:?}", output.lock().unwrap()));
        Server {
            child,
            base,
            app,
            output,
            _config: config,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn wait_ready(&self, client: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = client.get(self.url("/health")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "never ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then wait (bounded) for the exit status.
    pub fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub async fn post(client: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    let r = client.post(url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

pub async fn post_raw(client: &reqwest::Client, url: String, body: String) -> (u16, Value) {
    let r = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Parses the Prometheus text format: `name{labels} value` lines.
pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let name = series.split('{').next().unwrap().to_owned();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        *out.entry(name).or_default() += value;
    }
    out
}
