//! The machine's side of a cluster: finding the PostgreSQL binaries, running
//! them as the `postgres` OS user when this process is root, free ports,
//! log tails, and the `initdb` template made once per machine.

use std::fs;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// The superuser password of every cluster (host connections use
/// scram-sha-256, so password checks are real).
pub(crate) const SUPERUSER_PASSWORD: &str = "pgfleet-testkit-pw";

/// Bump when the template's initdb options change.
const TEMPLATE_VERSION: u32 = 1;

pub(crate) fn default_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(dir) = std::env::var_os("PGFLEET_PG_BIN") {
        out.push(PathBuf::from(dir));
        return out;
    }
    if let Ok(o) = Command::new("pg_config").arg("--bindir").output() {
        if o.status.success() {
            out.push(PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
        }
    }
    if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<(u32, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                Some((v, e.path().join("bin")))
            })
            .collect();
        versions.sort_by_key(|v| std::cmp::Reverse(v.0));
        out.extend(versions.into_iter().map(|(_, p)| p));
    }
    if let Some(path) = std::env::var_os("PATH") {
        out.extend(std::env::split_paths(&path));
    }
    out
}

/// The first candidate directory holding both `initdb` and `pg_ctl`.
pub(crate) fn find_binaries(candidates: &[PathBuf]) -> Result<PathBuf> {
    candidates
        .iter()
        .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
        .cloned()
        .ok_or(Error::MissingBinaries)
}

pub(crate) fn is_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false)
    })
}

/// A command run as the `postgres` OS user when we are root (PostgreSQL
/// refuses to run as root).
pub(crate) fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

pub(crate) fn chown_to_postgres(path: &Path) -> Result<()> {
    if is_root() {
        run(
            Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(path),
            "chown to postgres",
        )?;
    }
    Ok(())
}

pub(crate) fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io(what, e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            what: what.to_owned(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

pub(crate) fn free_port() -> Result<u16> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| Error::io("find a free port", e))?;
    Ok(listener
        .local_addr()
        .map_err(|e| Error::io("find a free port", e))?
        .port())
}

pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs initdb once per machine into a cached template directory (atomic
/// rename, so concurrent test processes agree on one), and returns it.
pub(crate) fn ensure_template(bin: &Path) -> Result<PathBuf> {
    let version = bin
        .parent()
        .and_then(|p| p.file_name())
        .map(|v| v.to_string_lossy().into_owned())
        .unwrap_or_else(|| "pg".into());
    let template = std::env::temp_dir().join(format!(
        "pgfleet-testkit-template-{version}-v{TEMPLATE_VERSION}"
    ));
    if template.join("data").join("PG_VERSION").is_file() {
        return Ok(template);
    }
    let staging = std::env::temp_dir().join(format!(
        "pgfleet-testkit-staging-{}-{}",
        std::process::id(),
        nanos_suffix()
    ));
    fs::create_dir_all(&staging).map_err(|e| Error::io("create the template directory", e))?;
    let pwfile = staging.join("pwfile");
    fs::File::create(&pwfile)
        .and_then(|mut f| writeln!(f, "{SUPERUSER_PASSWORD}"))
        .map_err(|e| Error::io("write the password file", e))?;
    chown_to_postgres(&staging)?;
    let out = as_postgres(&bin.join("initdb"))
        .arg("-D")
        .arg(staging.join("data"))
        .args([
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
        ])
        .args(["--locale=C", "--no-sync"])
        .arg(format!("--pwfile={}", pwfile.display()))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io("run initdb", e))?;
    let _ = fs::remove_file(&pwfile);
    if !out.status.success() {
        let _ = fs::remove_dir_all(&staging);
        return Err(Error::Initdb(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    match fs::rename(&staging, &template) {
        Ok(()) => Ok(template),
        // Another process won the race: use theirs.
        Err(_) if template.join("data").join("PG_VERSION").is_file() => {
            let _ = fs::remove_dir_all(&staging);
            Ok(template)
        }
        Err(e) => Err(Error::io("install the template", e)),
    }
}

/// The sub-second nanoseconds of now: a cheap, varying suffix for names.
pub(crate) fn nanos_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0)
}

/// Starts a detached shell that runs `cleanup` and removes `dir` once this
/// process is gone (bounded: gives up waiting after 6 hours).
pub(crate) fn spawn_watchdog(cleanup: &str, dir: &Path) -> Result<()> {
    let script = format!(
        "i=0; while kill -0 {pid} 2>/dev/null && [ $i -lt 43200 ]; do sleep 0.5; i=$((i+1)); done; \
         {cleanup} >/dev/null 2>&1; rm -rf '{dir}'",
        pid = std::process::id(),
        dir = dir.display()
    );
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| Error::io("start the watchdog", e))?;
    Ok(())
}
