//! [`Transaction`]: a transaction on a pooled connection, with the guard's
//! query methods and statement cache.

use std::fmt;
use std::ops::{Deref, DerefMut};

use super::inner::PoolInner;
use super::query::Session;
use crate::conn::{StatementCache, TapState};
use crate::error::Result;

/// A transaction on a [`PooledConnection`](crate::PooledConnection), from
/// its [`transaction`](crate::PooledConnection::transaction) method. It
/// rolls back when dropped without [`commit`](Self::commit) (an early
/// return with `?` is safe: the pool sees the rollback through and reuses
/// the connection without a second one).
///
/// Its query methods and [`prepare_cached`](Self::prepare_cached) are the
/// guard's, on the connection's statement cache. It derefs to
/// [`tokio_postgres::Transaction`] for the rest (savepoints, portals,
/// `copy_in`).
pub struct Transaction<'a> {
    tx: tokio_postgres::Transaction<'a>,
    statements: &'a StatementCache,
    tap: &'a TapState,
    pool: &'a PoolInner,
}

impl<'a> Transaction<'a> {
    pub(crate) fn new(
        tx: tokio_postgres::Transaction<'a>,
        statements: &'a StatementCache,
        tap: &'a TapState,
        pool: &'a PoolInner,
    ) -> Transaction<'a> {
        Transaction {
            tx,
            statements,
            tap,
            pool,
        }
    }

    /// Commits the transaction.
    ///
    /// # Errors
    /// `Db` if `COMMIT` fails (a deferred constraint, a serialization
    /// failure).
    pub async fn commit(self) -> Result<()> {
        Ok(self.tx.commit().await?)
    }

    /// Rolls the transaction back.
    ///
    /// # Errors
    /// `Db` if `ROLLBACK` fails (the connection broke).
    pub async fn rollback(self) -> Result<()> {
        Ok(self.tx.rollback().await?)
    }

    super::query::query_methods!();

    fn session(&self) -> Session<'_> {
        Session {
            client: self.tx.client(),
            statements: self.statements,
            tap: self.tap,
            pool: self.pool,
            shared: false,
        }
    }
}

impl<'a> Deref for Transaction<'a> {
    type Target = tokio_postgres::Transaction<'a>;
    fn deref(&self) -> &Self::Target {
        &self.tx
    }
}

impl DerefMut for Transaction<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.tx
    }
}

impl fmt::Debug for Transaction<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transaction")
            .field("pool", &self.pool.label)
            .finish_non_exhaustive()
    }
}
