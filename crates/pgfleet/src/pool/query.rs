//! The query methods of pgfleet's handles ([`PooledConnection`],
//! [`Transaction`], [`SharedConnection`]): one implementation,
//! [`Session`], behind the methods the `query_methods!` macro gives each.
//!
//! Text goes through the connection's statement cache: the first call
//! prepares it, later ones only bind and execute. Behind a pooler in
//! transaction mode no named statement may outlive a transaction, so the
//! cache holds the statement's parameter types instead (learnt once per
//! pool, see [`Session::describe`]) and each execution sends Parse, Bind,
//! Describe, Execute and Sync at once as an unnamed statement.
//!
//! [`PooledConnection`]: crate::PooledConnection
//! [`Transaction`]: crate::Transaction
//! [`SharedConnection`]: crate::SharedConnection

use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::TryStreamExt;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Row, RowStream, SimpleQueryMessage};

use super::inner::PoolInner;
use crate::config::Pooler;
use crate::conn::sql::{self, excerpt, quote_ident, Effects};
use crate::conn::{Keyword, Prepared, RawConn, SqlRef, StatementCache, TapState, TxStatus};
use crate::error::{Error, Result};

/// A handle's view of its connection while one call runs.
pub(crate) struct Session<'a> {
    pub(crate) client: &'a Client,
    pub(crate) statements: &'a StatementCache,
    /// The connection's tap: a cached statement sends no text for it to
    /// read, so its session effects are reported here.
    pub(crate) tap: &'a TapState,
    pub(crate) pool: &'a PoolInner,
    /// Shared mode: other tasks' statements run on the same connection.
    pub(crate) shared: bool,
}

/// SQLSTATEs after which a cached statement is prepared again, once:
/// "cached plan must not change result type" (it outlived a schema change)
/// and "prepared statement does not exist" (something dropped it on the
/// server behind the cache's back).
pub(crate) const STALE_STATEMENT: [&str; 2] = ["0A000", "26000"];

impl<'a> Session<'a> {
    /// The view of a pool connection's `raw` parts.
    pub(crate) fn of(raw: &'a RawConn, pool: &'a PoolInner, shared: bool) -> Session<'a> {
        Session {
            client: &raw.client,
            statements: &raw.statements,
            tap: &raw.tap,
            pool,
            shared,
        }
    }
}

impl Session<'_> {
    fn pooler(&self) -> Pooler {
        self.pool.config.pooler
    }

    /// The cached statement for `sql` with declared parameter `types`,
    /// prepared (or, behind a transaction pooler, described) on a miss.
    pub(crate) async fn prepare(&self, sql: &str, types: &[Type]) -> Result<Prepared> {
        let counters = &self.pool.counters;
        if let Some(prepared) = self.statements.get(sql, types) {
            counters
                .statement_cache_hits
                .fetch_add(1, Ordering::Relaxed);
            return Ok(prepared);
        }
        let prepared = if self.pooler() == Pooler::Transaction {
            match self.pool.shapes.get(sql, types) {
                Some(prepared) => prepared,
                None => {
                    let params = self.describe(sql, types).await?;
                    let prepared = Prepared::unnamed(sql, params);
                    self.pool.shapes.insert(sql, types, prepared)
                }
            }
        } else {
            let statement = self.client.prepare_typed(sql, types).await?;
            counters.statements_prepared.fetch_add(1, Ordering::Relaxed);
            Prepared::named(sql, statement)
        };
        Ok(self.statements.insert(sql, types, prepared))
    }

    /// The parameter types of `sql` behind a transaction pooler, without
    /// leaving a named statement on any server connection: the declared
    /// `types` when they cover every `$n`, else one simple query that
    /// prepares, reads `pg_prepared_statements` and deallocates at once
    /// (one request, so the pooler keeps it on one server connection, and
    /// nothing of it outlives the request).
    async fn describe(&self, sql: &str, types: &[Type]) -> Result<Vec<Type>> {
        let count = sql::param_count(sql);
        if types.len() >= count {
            return Ok(types.to_vec());
        }
        if sql::statement_count(sql) > 1 {
            return Err(Error::statement(format!(
                "cannot run several statements with parameters in one call: {}",
                excerpt(sql)
            )));
        }
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "pgfleet_describe_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let declared = if types.is_empty() {
            String::new()
        } else {
            let names: Vec<String> = types
                .iter()
                .map(|t| format!("{}.{}", quote_ident(t.schema()), quote_ident(t.name())))
                .collect();
            format!("({})", names.join(", "))
        };
        let text = format!(
            "PREPARE {name}{declared} AS {sql}\n; \
             SELECT parameter_types::oid[]::text FROM pg_prepared_statements WHERE name = '{name}'; \
             DEALLOCATE {name}"
        );
        self.pool
            .counters
            .statements_prepared
            .fetch_add(1, Ordering::Relaxed);
        let messages = self.client.simple_query(&text).await?;
        let oids = messages
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(row) => row.get(0),
                _ => None,
            })
            .ok_or_else(|| {
                Error::statement(format!(
                    "could not read the parameter types of {}",
                    excerpt(sql)
                ))
            })?;
        oids.trim_matches(|c| c == '{' || c == '}')
            .split(',')
            .filter(|s| !s.is_empty())
            .enumerate()
            .map(|(i, oid)| {
                let known = oid.trim().parse::<u32>().ok().and_then(Type::from_oid);
                match (types.get(i), known) {
                    (Some(declared), _) => Ok(declared.clone()),
                    (None, Some(t)) => Ok(t),
                    (None, None) => Err(Error::statement(format!(
                        "parameter ${} of {} has a type (oid {oid}) that is not built in; behind \
                         pooler = transaction give the parameter types \
                         (prepare_typed_cached or query_typed)",
                        i + 1,
                        excerpt(sql)
                    ))),
                }
            })
            .collect()
    }

    /// Refuses what cannot run here: in shared mode, COPY, transaction
    /// control and session state; warns about session state behind a
    /// transaction pooler, where it lands on whichever server connection
    /// the pooler picked.
    fn check(&self, prepared: &Prepared) -> Result<()> {
        let effects = prepared.effects();
        if self.shared {
            let what = match prepared.keyword() {
                Keyword::Copy => Some("COPY".to_owned()),
                Keyword::TransactionControl => Some("transaction control".to_owned()),
                Keyword::Other if effects.needs_reset() => Some(effects.names().join(", ")),
                Keyword::Other if effects.contains(Effects::DROPPED_STATEMENTS) => {
                    Some("DISCARD/DEALLOCATE".to_owned())
                }
                Keyword::Other => None,
            };
            if let Some(what) = what {
                return Err(Error::unsupported(format!(
                    "{what} cannot run in shared mode, where other tasks' statements share the \
                     connection: take a connection of your own with pool.get() ({})",
                    excerpt(prepared.sql())
                )));
            }
        }
        if self.pooler() == Pooler::Transaction && effects.needs_reset() {
            warn_pooler_session_state(self.pool, effects, prepared.sql());
        }
        Ok(())
    }

    /// Runs `sql` with `params`; the rows as a stream.
    pub(crate) async fn query_raw(
        &self,
        sql: SqlRef<'_>,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<RowStream> {
        match sql {
            SqlRef::Statement(statement) => Ok(self
                .client
                .query_raw(statement, params.iter().copied())
                .await?),
            SqlRef::Prepared(prepared) => {
                self.check(prepared)?;
                self.run(prepared, params).await
            }
            SqlRef::Text(text) => {
                let prepared = self.prepare(text, &[]).await?;
                self.check(&prepared)?;
                match self.run(&prepared, params).await {
                    Err(e)
                        if e.code().is_some_and(|c| STALE_STATEMENT.contains(&c))
                            && prepared.statement().is_some() =>
                    {
                        self.statements.remove(text, &[]);
                        // Inside a transaction the failure aborted it: a
                        // retry would only fail with 25P02 and hide why.
                        if self.shared || self.tap.status() != TxStatus::Idle {
                            return Err(e);
                        }
                        let prepared = self.prepare(text, &[]).await?;
                        self.run(&prepared, params).await
                    }
                    result => result,
                }
            }
        }
    }

    async fn run(&self, prepared: &Prepared, params: &[&(dyn ToSql + Sync)]) -> Result<RowStream> {
        // A cached statement sends Bind and Execute only, no text for the
        // tap to read: its session effects are reported before it runs.
        self.tap.add_effects(prepared.effects());
        let rows = match prepared.statement() {
            Some(statement) => {
                self.client
                    .query_raw(statement, params.iter().copied())
                    .await?
            }
            None => {
                let types = prepared.params();
                if types.len() != params.len() {
                    return Err(wrong_parameter_count(prepared, params.len()));
                }
                self.client
                    .query_typed_raw(
                        prepared.sql(),
                        params.iter().copied().zip(types.iter().cloned()),
                    )
                    .await?
            }
        };
        if prepared.effects().contains(Effects::DROPPED_STATEMENTS) {
            // DISCARD ALL / DEALLOCATE dropped the server's statements,
            // tokio-postgres's own for type lookups too.
            self.statements.clear();
            self.client.clear_type_cache();
        }
        Ok(rows)
    }

    pub(crate) async fn query(
        &self,
        sql: SqlRef<'_>,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        let stream = self.query_raw(sql, params).await?;
        collect(stream, usize::MAX).await.map(|(rows, _)| rows)
    }

    pub(crate) async fn query_opt(
        &self,
        sql: SqlRef<'_>,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>> {
        let stream = self.query_raw(sql, params).await?;
        let (mut rows, more) = collect(stream, 1).await?;
        if more {
            return Err(more_than_one_row());
        }
        Ok(rows.pop())
    }

    pub(crate) async fn query_one(
        &self,
        sql: SqlRef<'_>,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row> {
        self.query_opt(sql, params).await?.ok_or_else(no_row)
    }

    pub(crate) async fn execute(
        &self,
        sql: SqlRef<'_>,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64> {
        let stream = self.query_raw(sql, params).await?;
        let mut stream = std::pin::pin!(stream);
        while stream.try_next().await?.is_some() {}
        Ok(stream.rows_affected().unwrap_or(0))
    }
}

/// Warns, once per kind per pool, that `sql` leaves session state on a
/// connection behind a transaction pooler.
fn warn_pooler_session_state(pool: &PoolInner, effects: Effects, sql: &str) {
    let before = pool
        .warned_session_state
        .fetch_or(effects.bits(), Ordering::Relaxed);
    let new = Effects::from_bits(effects.bits() & !before);
    if new.needs_reset() {
        tracing::warn!(
            pool = %pool.label,
            statement = %excerpt(sql),
            "{} behind pooler = transaction: the pooler hands the next transaction any \
             server connection, so this state lands on one nobody can predict; use a direct \
             connection (or a session pooler) for it",
            new.names().join(", ")
        );
    }
}

/// `prepared` was given `got` parameters, not as many as it takes.
pub(crate) fn wrong_parameter_count(prepared: &Prepared, got: usize) -> Error {
    Error::statement(format!(
        "expected {} parameters but got {got}: {}",
        prepared.params().len(),
        excerpt(prepared.sql())
    ))
}

/// `query_opt` found a second row.
pub(crate) fn more_than_one_row() -> Error {
    Error::statement("the query returned more than one row, at most one was expected")
}

/// `query_one` found none.
pub(crate) fn no_row() -> Error {
    Error::statement("the query returned no rows, one was expected")
}

/// Up to `limit` rows of `stream`, and whether there were more (the rest
/// is read and dropped, so that the connection is ready again).
pub(crate) async fn collect(stream: RowStream, limit: usize) -> Result<(Vec<Row>, bool)> {
    let mut stream = std::pin::pin!(stream);
    let mut rows = Vec::new();
    let mut more = false;
    while let Some(row) = stream.try_next().await? {
        if rows.len() < limit {
            rows.push(row);
        } else {
            more = true;
        }
    }
    Ok((rows, more))
}

/// The query methods of a handle with `fn session(&self) -> Session<'_>`.
macro_rules! query_methods {
    () => {
        /// Runs a statement and returns its rows.
        ///
        /// `sql` is text (prepared once per connection and cached, so a
        /// repeated statement costs one round trip), a
        /// [`Prepared`](crate::Prepared) from `prepare_cached`, or a
        /// tokio-postgres statement prepared on this connection. Behind
        /// `pooler = transaction` the text and `Prepared` run as unnamed
        /// statements, which any pooler accepts. These methods are found
        /// before the `Client`'s (reached through `Deref`), which do not
        /// know about the cache or the pooler.
        ///
        /// # Errors
        /// `Db` with the server's message and SQLSTATE
        /// ([`Error::code`](crate::Error::code)); `Unsupported` for what
        /// cannot run on this handle (COPY or `BEGIN` in shared mode).
        pub async fn query<S: $crate::Sql + ?Sized>(
            &self,
            sql: &S,
            params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        ) -> $crate::Result<Vec<tokio_postgres::Row>> {
            self.session().query(sql.as_sql(), params).await
        }

        /// Runs a statement that returns exactly one row.
        ///
        /// # Errors
        /// As [`query`](Self::query); `Db` when the statement returned no
        /// row or more than one.
        pub async fn query_one<S: $crate::Sql + ?Sized>(
            &self,
            sql: &S,
            params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        ) -> $crate::Result<tokio_postgres::Row> {
            self.session().query_one(sql.as_sql(), params).await
        }

        /// Runs a statement that returns at most one row.
        ///
        /// # Errors
        /// As [`query`](Self::query); `Db` when it returned more than one.
        pub async fn query_opt<S: $crate::Sql + ?Sized>(
            &self,
            sql: &S,
            params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        ) -> $crate::Result<Option<tokio_postgres::Row>> {
            self.session().query_opt(sql.as_sql(), params).await
        }

        /// Runs a statement and returns the number of rows it affected.
        ///
        /// # Errors
        /// As [`query`](Self::query).
        pub async fn execute<S: $crate::Sql + ?Sized>(
            &self,
            sql: &S,
            params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        ) -> $crate::Result<u64> {
            self.session().execute(sql.as_sql(), params).await
        }

        /// Runs a statement and returns its rows as a stream, for results
        /// too large to hold at once.
        ///
        /// # Errors
        /// As [`query`](Self::query).
        pub async fn query_raw<S: $crate::Sql + ?Sized>(
            &self,
            sql: &S,
            params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        ) -> $crate::Result<tokio_postgres::RowStream> {
            self.session().query_raw(sql.as_sql(), params).await
        }

        /// The statement for `sql`, prepared once per connection and kept
        /// in its cache (up to `statement_cache_size`, least recently used
        /// dropped first): later calls on the same connection, by any
        /// caller, reuse it without a round trip, and the server skips
        /// parsing it (and planning, once it settles on a reusable plan).
        /// Run it with this handle's query methods. Behind
        /// `pooler = transaction` it holds the statement's text and
        /// parameter types instead (learnt once per pool), and runs as an
        /// unnamed statement.
        ///
        /// # Errors
        /// The server's error preparing `sql` (nothing is cached then).
        pub async fn prepare_cached(&self, sql: &str) -> $crate::Result<$crate::Prepared> {
            self.session().prepare(sql, &[]).await
        }

        /// [`prepare_cached`](Self::prepare_cached) with parameter types
        /// given (others inferred by the server); each list of types is
        /// its own entry.
        ///
        /// # Errors
        /// The server's error preparing `sql`.
        pub async fn prepare_typed_cached(
            &self,
            sql: &str,
            types: &[tokio_postgres::types::Type],
        ) -> $crate::Result<$crate::Prepared> {
            self.session().prepare(sql, types).await
        }
    };
}
pub(crate) use query_methods;
