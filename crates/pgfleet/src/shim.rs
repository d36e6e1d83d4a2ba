//! TEMPORARY: minimal Target parsing / Display / validate until target.rs and
//! config.rs land. Delete when they do.
#![allow(missing_docs)]
use std::fmt;

use crate::config::PoolConfig;
use crate::error::{Error, Result};
use crate::target::{Host, Target};

impl Target {
    pub fn parse(url: &str) -> Result<Target> {
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or_else(|| Error::config(format!("bad url {url}")))?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (auth, hostpart) = rest.rsplit_once('@').unwrap_or(("postgres", rest));
        let (user, mut password) = match auth.split_once(':') {
            Some((u, p)) => (u.to_owned(), Some(p.to_owned())),
            None => (auth.to_owned(), None),
        };
        let (hostport, db) = hostpart.split_once('/').unwrap_or((hostpart, ""));
        let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "5432"));
        let port: u16 = port.parse().map_err(|_| Error::config(format!("bad port {port}")))?;
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            if let Some(("password", v)) = kv.split_once('=') {
                password = Some(v.to_owned());
            }
        }
        let database = if db.is_empty() { user.clone() } else { db.to_owned() };
        let key = format!("postgres://{user}@{}:{port}/{database}", host.to_lowercase());
        Ok(Target {
            host: Host::Tcp(host.to_owned()),
            port,
            database,
            user,
            password,
            options: None,
            key,
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = match &self.host {
            Host::Tcp(h) => h.clone(),
            Host::Unix(p) => p.display().to_string(),
        };
        let pw = if self.password.is_some() { ":***" } else { "" };
        write!(f, "postgres://{}{pw}@{host}:{}/{}", self.user, self.port, self.database)
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Target({self})")
    }
}

impl PoolConfig {
    pub fn validate(&self) -> Result<()> {
        if self.max_size == 0 {
            return Err(Error::config("max_size = 0"));
        }
        if self.min_size > self.max_size {
            return Err(Error::config("min_size > max_size"));
        }
        if self.acquire_timeout.is_zero() {
            return Err(Error::config("timeout = 0"));
        }
        Ok(())
    }
}
