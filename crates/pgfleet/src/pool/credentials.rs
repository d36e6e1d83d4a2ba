//! The credentials of new connections: a password changed at run time
//! ([`Pool::set_password`](crate::Pool::set_password)), or a provider called
//! for each new connection (short-lived tokens such as cloud IAM auth,
//! [`Pool::set_password_provider`](crate::Pool::set_password_provider)).
//! Connections already open keep the session they authenticated;
//! [`Pool::drain`](crate::Pool::drain) replaces them.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::address::Target;
use crate::config::PoolConfig;
use crate::conn;
use crate::error::{BoxError, Error};

/// A password provider, boxed.
pub(crate) type Provider =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<String, BoxError>> + Send>> + Send + Sync>;

/// What new connections authenticate with.
pub(crate) struct Credentials {
    /// The connection settings of the next connect, password included.
    pg: Mutex<tokio_postgres::Config>,
    /// Called for each new connection, when set; wins over `pg`'s password.
    provider: Mutex<Option<Provider>>,
}

impl Credentials {
    pub(crate) fn new(target: &Target, config: &PoolConfig) -> Credentials {
        Credentials {
            pg: Mutex::new(conn::pg_config(target, config)),
            provider: Mutex::new(None),
        }
    }

    fn pg(&self) -> MutexGuard<'_, tokio_postgres::Config> {
        self.pg.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn provider(&self) -> MutexGuard<'_, Option<Provider>> {
        self.provider.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// New connections use `password` (`None`: none).
    pub(crate) fn set_password(
        &self,
        target: &Target,
        config: &PoolConfig,
        password: Option<&str>,
    ) {
        let target = target.clone().with_password(password);
        *self.pg() = conn::pg_config(&target, config);
    }

    /// New connections ask `provider` for their password (`None`: stop
    /// asking).
    pub(crate) fn set_provider(&self, provider: Option<Provider>) {
        *self.provider() = provider;
    }

    /// The settings for one new connection: with the provider's password
    /// when there is a provider.
    ///
    /// # Errors
    /// `Connect` with the provider's error.
    pub(crate) async fn for_connect(&self, label: &str) -> Result<tokio_postgres::Config, Error> {
        let mut pg = self.pg().clone();
        let provider = self.provider().clone();
        if let Some(provider) = provider {
            let password = provider().await.map_err(|e| {
                Error::connect(format!(
                    "could not get a password for {label} from the password provider: {e}"
                ))
            })?;
            pg.password(password);
        }
        Ok(pg)
    }
}
