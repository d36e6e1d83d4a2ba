//! [`Hooks`]: async callbacks a pool runs on its connections, set in code.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio_postgres::Client;

/// The boxed future a hook returns.
pub type HookFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The error an `after_connect` hook fails with.
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

type ConnectHook =
    dyn for<'a> Fn(&'a Client) -> HookFuture<'a, Result<(), HookError>> + Send + Sync;
type CheckHook = dyn for<'a> Fn(&'a Client) -> HookFuture<'a, bool> + Send + Sync;

/// Async callbacks a pool runs on its connections (the `hooks` field of
/// [`PoolConfig`](crate::PoolConfig); code only, no configuration key).
///
/// * `after_connect` runs on every new physical connection before its
///   first borrower, within `connect_timeout` (e.g. `SET search_path`,
///   registering types). It runs again after every session reset (see
///   the `reset` key: `RESET ALL`, `DISCARD TEMP`, `DEALLOCATE ALL` may
///   undo what it did), so what it sets holds for every borrower. An error discards the connection and is reported like a
///   failed connect (counted in `connect_errors`, in the acquire timeout's
///   message, with backoff).
/// * `before_acquire` runs before a connection is handed to a caller of
///   `get()` (new or idle); `false` (or not answering before the caller's
///   deadline) discards it and the caller gets another.
/// * `after_release` runs when a connection comes back, in the background
///   (a guard's drop cannot wait); `false` (or not answering within
///   `connect_timeout`) discards it.
///
/// Discarded connections are counted in `connections_closed_hook`.
///
/// ```
/// use pgfleet::{Hooks, PoolConfig};
/// let hooks = Hooks::default()
///     .after_connect(|client| {
///         Box::pin(async move {
///             client.batch_execute("SET search_path = app, public").await?;
///             Ok(())
///         })
///     })
///     .before_acquire(|client| Box::pin(async move { !client.is_closed() }));
/// let config = PoolConfig { hooks, ..PoolConfig::default() };
/// assert!(config.hooks.is_set());
/// ```
#[derive(Clone, Default)]
pub struct Hooks {
    pub(crate) after_connect: Option<Arc<ConnectHook>>,
    pub(crate) before_acquire: Option<Arc<CheckHook>>,
    pub(crate) after_release: Option<Arc<CheckHook>>,
}

impl Hooks {
    /// Sets the hook run on every new connection before its first use.
    pub fn after_connect<F>(mut self, hook: F) -> Self
    where
        F: for<'a> Fn(&'a Client) -> HookFuture<'a, Result<(), HookError>> + Send + Sync + 'static,
    {
        self.after_connect = Some(Arc::new(hook));
        self
    }

    /// Sets the hook run before a connection is handed out; `false`
    /// discards it.
    pub fn before_acquire<F>(mut self, hook: F) -> Self
    where
        F: for<'a> Fn(&'a Client) -> HookFuture<'a, bool> + Send + Sync + 'static,
    {
        self.before_acquire = Some(Arc::new(hook));
        self
    }

    /// Sets the hook run when a connection comes back; `false` discards it.
    pub fn after_release<F>(mut self, hook: F) -> Self
    where
        F: for<'a> Fn(&'a Client) -> HookFuture<'a, bool> + Send + Sync + 'static,
    {
        self.after_release = Some(Arc::new(hook));
        self
    }

    /// Whether any hook is set.
    pub fn is_set(&self) -> bool {
        self.after_connect.is_some()
            || self.before_acquire.is_some()
            || self.after_release.is_some()
    }
}

/// Hooks are equal when they are the same closures (the same `Arc`s): a
/// clone of a configuration equals it, a configuration with other closures
/// does not.
impl PartialEq for Hooks {
    fn eq(&self, other: &Hooks) -> bool {
        fn same<T: ?Sized>(a: &Option<Arc<T>>, b: &Option<Arc<T>>) -> bool {
            match (a, b) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
        }
        same(&self.after_connect, &other.after_connect)
            && same(&self.before_acquire, &other.before_acquire)
            && same(&self.after_release, &other.after_release)
    }
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooks")
            .field("after_connect", &self.after_connect.is_some())
            .field("before_acquire", &self.before_acquire.is_some())
            .field("after_release", &self.after_release.is_some())
            .finish()
    }
}
