//! The statement methods on the pool: `pool.query(sql, params)` and its
//! kin, one call for one statement in autocommit.
//!
//! Each call is routed by pgfleet, not by the caller, from the statement's
//! text and the pool's state, without a round trip:
//!
//! * **On a lane** (pipelined with other callers' statements on one of a few
//!   connections) when that is safe: one statement, no transaction
//!   control, no COPY, no cursor or lock, no session state (`SET`,
//!   `LISTEN`, advisory locks, temporary tables, `PREPARE`, `DEALLOCATE`:
//!   the same reading of the text that decides a session reset,
//!   [`conn::sql::exclusive`](crate::conn::sql)). Behind
//!   `pooler = transaction` the lane runs the pooler-safe form (unnamed
//!   statements).
//! * **On a connection of its own** ([`Pool::get`]) otherwise, or when the
//!   pool is too small to spare a lane (`max_size` 1). Its session is reset
//!   when it comes back, as for any borrower: `pool.execute("SET ...")`
//!   runs, and leaves nothing behind for the next caller.
//!
//! A call's deadline ([`Pool::with_timeout`]) covers the whole call; past
//! it, or when the caller's future is dropped, the statement is cancelled
//! on the server if it runs there. A cancel is sent only while that
//! statement is the one its lane's backend runs; the one race left (it
//! finishes as the cancel travels) aborts the next statement, which then
//! runs again, so its caller sees its own result (see `shared/flights.rs`).

use std::fmt;
use std::future::Future;
use std::panic::Location;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Row, SimpleQueryMessage};

use crate::conn::sql::{self, Exclusive};
use crate::error::{Error, Result, TimeoutStage};
use crate::pool::query::no_row;
use crate::pool::Pool;
use crate::shared::statements::{self as lane, Call, Output, Want};

/// Text that the statement methods on the pool take: a `&str`, a
/// `String`, or a [`PoolStatement`] (whose route is worked out once).
/// Sealed.
pub trait PoolSql: private::Sealed + Sync {
    #[doc(hidden)]
    fn parts(&self) -> (&str, &[Type], Route);
}

mod private {
    pub trait Sealed {}
    impl Sealed for str {}
    impl Sealed for String {}
    impl Sealed for super::PoolStatement {}
}

/// Where a statement runs, from its text.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Not worked out yet.
    Unknown,
    /// On a lane.
    Lane,
    /// On a connection of its own.
    Own,
    /// Nowhere: a COPY stream.
    Refused,
}

impl Route {
    fn of(sql: &str) -> Route {
        match sql::exclusive(sql) {
            None => Route::Lane,
            Some(Exclusive::CopyStream) => Route::Refused,
            Some(_) => Route::Own,
        }
    }
}

impl PoolSql for str {
    fn parts(&self) -> (&str, &[Type], Route) {
        (self, &[], Route::Unknown)
    }
}

impl PoolSql for String {
    fn parts(&self) -> (&str, &[Type], Route) {
        (self, &[], Route::Unknown)
    }
}

/// A statement checked once against the server and routed once, for the
/// statement methods on its pool ([`Pool::prepare_cached`]). Each
/// connection still prepares it once, on first use, and caches it.
#[derive(Clone)]
pub struct PoolStatement {
    sql: Arc<str>,
    /// Declared parameter types.
    types: Arc<[Type]>,
    /// The parameter types the server settled on.
    params: Arc<[Type]>,
    route: Route,
}

impl PoolStatement {
    /// The statement's text.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// Its parameter types, as the server inferred them (or as declared).
    pub fn params(&self) -> &[Type] {
        &self.params
    }

    /// Whether the statement methods pipeline it with other callers'
    /// statements (`true`), or run it on a connection of its own.
    pub fn is_pipelined(&self) -> bool {
        self.route == Route::Lane
    }
}

impl fmt::Debug for PoolStatement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolStatement")
            .field("sql", &sql::excerpt(&self.sql))
            .field("pipelined", &self.is_pipelined())
            .finish()
    }
}

impl PoolSql for PoolStatement {
    fn parts(&self) -> (&str, &[Type], Route) {
        (&self.sql, &self.types, self.route)
    }
}

/// The statement methods with a deadline for each call
/// ([`Pool::with_timeout`]).
#[derive(Clone, Copy)]
pub struct Statements<'a> {
    pool: &'a Pool,
    timeout: Option<Duration>,
}

impl fmt::Debug for Statements<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Statements")
            .field("pool", self.pool)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The parameters of one call, with their lifetime.
type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

impl<'a> Statements<'a> {
    /// Runs one call: routes it, and holds it to its deadline.
    async fn run<'b>(
        self,
        sql: &'b (impl PoolSql + ?Sized),
        params: &'b [&'b (dyn ToSql + Sync)],
        typed: Option<&'b [Type]>,
        want: Want,
        simple: bool,
        location: &'static Location<'static>,
    ) -> Result<Output> {
        let (text, declared, route) = sql.parts();
        let call = Call {
            sql: text,
            types: typed.unwrap_or(declared),
            params,
            want,
            simple,
        };
        let run = self.route(&call, route, location);
        match self.timeout {
            None => run.await,
            Some(limit) => tokio::time::timeout(limit, run).await.unwrap_or_else(|_| {
                Err(Error::timeout(
                    TimeoutStage::Statement,
                    limit,
                    format!(
                        "the statement did not finish within {} (per-call timeout, waiting \
                         for a connection included); it is cancelled on the server if it \
                         runs there: {}",
                        humantime::format_duration(limit),
                        sql::excerpt(text)
                    ),
                ))
            }),
        }
    }

    async fn route(
        self,
        call: &Call<'_>,
        route: Route,
        location: &'static Location<'static>,
    ) -> Result<Output> {
        let pool = self.pool;
        let route = match route {
            Route::Unknown => Route::of(call.sql),
            known => known,
        };
        if route == Route::Refused {
            return Err(Error::unsupported(format!(
                "COPY FROM STDIN / TO STDOUT streams data, which one call cannot carry: take a \
                 connection with pool.get() and use copy_in / copy_out ({})",
                sql::excerpt(call.sql)
            )));
        }
        let lanes = &pool.statement_lanes;
        if route == Route::Lane && lanes.cap(&pool.inner) > 0 {
            return lane::run(&pool.inner, lanes, call, location).await;
        }
        pool.inner
            .counters
            .statements_exclusive
            .fetch_add(1, Ordering::Relaxed);
        let conn = pool.inner.get(location).await?;
        if call.simple {
            return Ok(Output::Messages(conn.simple_query(call.sql).await?));
        }
        if call.types.is_empty() {
            // The text itself: the guard prepares it again once if its
            // cached form went stale (a schema change).
            let sql = call.sql;
            return Ok(match call.want {
                Want::Rows => Output::Rows(conn.query(sql, call.params).await?),
                Want::AtMostOne => Output::Rows(
                    conn.query_opt(sql, call.params)
                        .await?
                        .into_iter()
                        .collect(),
                ),
                Want::Count => Output::Count(conn.execute(sql, call.params).await?),
            });
        }
        let prepared = conn.prepare_typed_cached(call.sql, call.types).await?;
        Ok(match call.want {
            Want::Rows => Output::Rows(conn.query(&prepared, call.params).await?),
            Want::AtMostOne => Output::Rows(
                conn.query_opt(&prepared, call.params)
                    .await?
                    .into_iter()
                    .collect(),
            ),
            Want::Count => Output::Count(conn.execute(&prepared, call.params).await?),
        })
    }

    /// As [`Pool::query`], with this view's deadline.
    ///
    /// # Errors
    /// As [`Pool::query`]; `Timeout` past the deadline.
    #[track_caller]
    pub fn query<S: PoolSql + ?Sized>(
        self,
        sql: &'a S,
        params: Params<'a>,
    ) -> impl Future<Output = Result<Vec<Row>>> + Send + 'a {
        let location = Location::caller();
        async move {
            match self
                .run(sql, params, None, Want::Rows, false, location)
                .await?
            {
                Output::Rows(rows) => Ok(rows),
                _ => unreachable!("rows were asked for"),
            }
        }
    }

    /// As [`Pool::query_opt`], with this view's deadline.
    ///
    /// # Errors
    /// As [`Pool::query_opt`]; `Timeout` past the deadline.
    #[track_caller]
    pub fn query_opt<S: PoolSql + ?Sized>(
        self,
        sql: &'a S,
        params: Params<'a>,
    ) -> impl Future<Output = Result<Option<Row>>> + Send + 'a {
        let location = Location::caller();
        async move {
            match self
                .run(sql, params, None, Want::AtMostOne, false, location)
                .await?
            {
                Output::Rows(mut rows) => Ok(rows.pop()),
                _ => unreachable!("rows were asked for"),
            }
        }
    }

    /// As [`Pool::query_one`], with this view's deadline.
    ///
    /// # Errors
    /// As [`Pool::query_one`]; `Timeout` past the deadline.
    #[track_caller]
    pub fn query_one<S: PoolSql + ?Sized>(
        self,
        sql: &'a S,
        params: Params<'a>,
    ) -> impl Future<Output = Result<Row>> + Send + 'a {
        let opt = self.query_opt(sql, params);
        async move { opt.await?.ok_or_else(no_row) }
    }

    /// As [`Pool::execute`], with this view's deadline.
    ///
    /// # Errors
    /// As [`Pool::execute`]; `Timeout` past the deadline.
    #[track_caller]
    pub fn execute<S: PoolSql + ?Sized>(
        self,
        sql: &'a S,
        params: Params<'a>,
    ) -> impl Future<Output = Result<u64>> + Send + 'a {
        let location = Location::caller();
        async move {
            match self
                .run(sql, params, None, Want::Count, false, location)
                .await?
            {
                Output::Count(n) => Ok(n),
                _ => unreachable!("a count was asked for"),
            }
        }
    }

    /// As [`Pool::query_typed`], with this view's deadline.
    ///
    /// # Errors
    /// As [`Pool::query_typed`]; `Timeout` past the deadline.
    #[track_caller]
    pub fn query_typed(
        self,
        sql: &'a str,
        params: &'a [(&'a (dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Vec<Row>>> + Send + 'a {
        let location = Location::caller();
        async move {
            let (values, types): (Vec<&(dyn ToSql + Sync)>, Vec<Type>) =
                params.iter().map(|(v, t)| (*v, t.clone())).unzip();
            match self
                .run(sql, &values, Some(&types), Want::Rows, false, location)
                .await?
            {
                Output::Rows(rows) => Ok(rows),
                _ => unreachable!("rows were asked for"),
            }
        }
    }

    /// As [`Pool::simple_query`], with this view's deadline.
    ///
    /// # Errors
    /// As [`Pool::simple_query`]; `Timeout` past the deadline.
    #[track_caller]
    pub fn simple_query(
        self,
        sql: &'a str,
    ) -> impl Future<Output = Result<Vec<SimpleQueryMessage>>> + Send + 'a {
        let location = Location::caller();
        async move {
            match self.run(sql, &[], None, Want::Rows, true, location).await? {
                Output::Messages(messages) => Ok(messages),
                _ => unreachable!("messages were asked for"),
            }
        }
    }
}

/// The statement methods: the fastest way to run a statement, and the
/// simplest. See the [crate documentation](crate) for when they pipeline.
impl Pool {
    /// Runs one statement in autocommit and returns its rows.
    ///
    /// pgfleet picks where it runs, from the text alone: pipelined with
    /// other callers' statements on one of a few shared connections (lanes)
    /// when that is safe (one statement with no transaction control, COPY,
    /// cursor, lock or session state), else on a connection of its own
    /// from [`get`](Self::get), which is reset when it comes back. Text is
    /// prepared once per connection and cached; a [`PoolStatement`] from
    /// [`prepare_cached`](Self::prepare_cached) also skips reading the
    /// text. Use [`get`](Self::get) for transactions and for several
    /// statements that must share a session.
    ///
    /// # Errors
    /// `Db` with the server's message and SQLSTATE
    /// ([`Error::code`](crate::Error::code)), which concerns this statement
    /// only; the errors of [`get`](Self::get) (`Timeout`, `Connect`,
    /// `Closed`); `Unsupported` for `COPY ... FROM STDIN / TO STDOUT`.
    ///
    /// # Cancel safety
    /// Dropping the future cancels the statement on the server if it still
    /// runs there, and no other statement; the pool stays whole.
    #[track_caller]
    pub fn query<'a, S: PoolSql + ?Sized>(
        &'a self,
        sql: &'a S,
        params: Params<'a>,
    ) -> impl Future<Output = Result<Vec<Row>>> + Send + 'a {
        self.statements().query(sql, params)
    }

    /// Runs one statement that returns exactly one row.
    ///
    /// # Errors
    /// As [`query`](Self::query); `Db` when it returned no row or more than
    /// one.
    #[track_caller]
    pub fn query_one<'a, S: PoolSql + ?Sized>(
        &'a self,
        sql: &'a S,
        params: Params<'a>,
    ) -> impl Future<Output = Result<Row>> + Send + 'a {
        self.statements().query_one(sql, params)
    }

    /// Runs one statement that returns at most one row.
    ///
    /// # Errors
    /// As [`query`](Self::query); `Db` when it returned more than one.
    #[track_caller]
    pub fn query_opt<'a, S: PoolSql + ?Sized>(
        &'a self,
        sql: &'a S,
        params: Params<'a>,
    ) -> impl Future<Output = Result<Option<Row>>> + Send + 'a {
        self.statements().query_opt(sql, params)
    }

    /// Runs one statement and returns the number of rows it affected.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    #[track_caller]
    pub fn execute<'a, S: PoolSql + ?Sized>(
        &'a self,
        sql: &'a S,
        params: Params<'a>,
    ) -> impl Future<Output = Result<u64>> + Send + 'a {
        self.statements().execute(sql, params)
    }

    /// Runs one statement with the types of its parameters given, and
    /// returns its rows: for parameters whose type the server cannot infer
    /// (`SELECT $1`), or to pick one (`$1` as `INT8`). Each list of types
    /// is its own cached statement.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    #[track_caller]
    pub fn query_typed<'a>(
        &'a self,
        sql: &'a str,
        params: &'a [(&'a (dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Vec<Row>>> + Send + 'a {
        self.statements().query_typed(sql, params)
    }

    /// Runs `sql` with the simple query protocol (no parameters, rows as
    /// text): for scripts and for statements that the extended protocol
    /// does not take. A script of several statements runs on a connection
    /// of its own, in one implicit transaction; a single safe statement is
    /// pipelined like the others.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    #[track_caller]
    pub fn simple_query<'a>(
        &'a self,
        sql: &'a str,
    ) -> impl Future<Output = Result<Vec<SimpleQueryMessage>>> + Send + 'a {
        self.statements().simple_query(sql)
    }

    /// The statement methods with a deadline for each call: past `limit`
    /// (from the start of the call, waiting for a connection included) the
    /// call fails with a `Timeout` error, and its statement is cancelled on
    /// the server if it still runs there, without touching the statements
    /// pipelined with it. `command_timeout` is the server's own limit
    /// (`statement_timeout`) and applies as well.
    pub fn with_timeout(&self, limit: Duration) -> Statements<'_> {
        Statements {
            pool: self,
            timeout: Some(limit),
        }
    }

    fn statements(&self) -> Statements<'_> {
        Statements {
            pool: self,
            timeout: None,
        }
    }

    /// Checks `sql` against the server once (its syntax, its tables, its
    /// parameter types) and works out once where it runs; the returned
    /// [`PoolStatement`] then goes to the statement methods in place of the
    /// text. Each connection still prepares it on first use and caches it.
    ///
    /// # Errors
    /// The server's error preparing `sql`; the errors of
    /// [`get`](Self::get).
    #[track_caller]
    pub fn prepare_cached<'a>(
        &'a self,
        sql: &'a str,
    ) -> impl Future<Output = Result<PoolStatement>> + Send + 'a {
        self.prepare_typed_cached(sql, &[])
    }

    /// [`prepare_cached`](Self::prepare_cached) with parameter types given
    /// (the others inferred by the server).
    ///
    /// # Errors
    /// As [`prepare_cached`](Self::prepare_cached).
    #[track_caller]
    pub fn prepare_typed_cached<'a>(
        &'a self,
        sql: &'a str,
        types: &'a [Type],
    ) -> impl Future<Output = Result<PoolStatement>> + Send + 'a {
        let location = Location::caller();
        async move {
            let route = Route::of(sql);
            let lanes = &self.statement_lanes;
            let prepared = if route == Route::Lane && lanes.cap(&self.inner) > 0 {
                lane::prepare(&self.inner, lanes, sql, types, location).await?
            } else {
                let conn = self.inner.get(location).await?;
                conn.prepare_typed_cached(sql, types).await?
            };
            Ok(PoolStatement {
                sql: sql.into(),
                types: types.into(),
                params: prepared.params().into(),
                route,
            })
        }
    }
}
