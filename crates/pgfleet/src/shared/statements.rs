//! One call of the statement methods on a lane: the statement from the
//! lane's cache (prepared in a flight of its own on a miss), its parameters
//! encoded up front, and its execution in a [`Flight`], so that a caller
//! who leaves gets its statement cancelled on the server and nobody else's.
//!
//! The parameters are encoded before the request is handed over because a
//! flight's request must own everything it uses: if its caller leaves, it
//! runs on in a drain task, long after the caller's borrowed parameters are
//! gone.

use std::panic::Location;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_util::TryStreamExt;
use tokio_postgres::types::{to_sql_checked, Format, IsNull, ToSql, Type};
use tokio_postgres::{Row, SimpleQueryMessage};

use super::flights::Flight;
use super::{lease, Lane, Lanes};
use crate::conn::sql::excerpt;
use crate::conn::Prepared;
use crate::error::{Error, Result};
use crate::pool::inner::PoolInner;
use crate::pool::query::{collect, more_than_one_row, wrong_parameter_count, STALE_STATEMENT};

/// What the caller wants back from a statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Want {
    /// Every row.
    Rows,
    /// At most one row (more is an error).
    AtMostOne,
    /// The number of rows affected.
    Count,
}

/// The answer of one call.
pub(crate) enum Output {
    Rows(Vec<Row>),
    Count(u64),
    Messages(Vec<SimpleQueryMessage>),
}

/// One call: a statement and how to run it.
pub(crate) struct Call<'a> {
    pub(crate) sql: &'a str,
    /// Declared parameter types (`query_typed`); the server infers the rest.
    pub(crate) types: &'a [Type],
    pub(crate) params: &'a [&'a (dyn ToSql + Sync)],
    pub(crate) want: Want,
    /// The simple query protocol (`simple_query`): no parameters, text rows.
    pub(crate) simple: bool,
}

/// Times a statement runs again after a cancel meant for another aborted
/// it.
const COLLATERAL_RETRIES: u32 = 5;

/// Runs `call` on one of `lanes`. A statement that a cancel meant for
/// another statement aborted runs again, one whose cached form went stale
/// (a schema change) once more.
pub(crate) async fn run(
    pool: &Arc<PoolInner>,
    lanes: &Arc<Lanes>,
    call: &Call<'_>,
    location: &'static Location<'static>,
) -> Result<Output> {
    // A statement aborted by a cancel meant for another runs again (a
    // storm of cancels may hit it more than once); a stale cached
    // statement is prepared again once.
    let mut hits = 0;
    let mut stale = false;
    loop {
        let lease = lease(pool, lanes, location).await?;
        let lane = lease.lane.clone();
        let began = Instant::now();
        let result = if call.simple {
            simple(&lane, call.sql).await
        } else {
            statement(&lane, call).await
        };
        drop(lease);
        match result {
            Err(e) if hits < COLLATERAL_RETRIES && lane.flights.hit_by_cancel(&e, began) => {
                hits += 1;
                pool.counters
                    .statements_retried
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(e)
                if !stale
                    && !call.simple
                    && e.code().is_some_and(|c| STALE_STATEMENT.contains(&c)) =>
            {
                stale = true;
                lane.conn().raw.statements.remove(call.sql, call.types);
            }
            result => {
                pool.counters
                    .statements_pipelined
                    .fetch_add(1, Ordering::Relaxed);
                return result;
            }
        }
    }
}

/// `sql` prepared (or found in the cache) on one of `lanes`.
pub(crate) async fn prepare(
    pool: &Arc<PoolInner>,
    lanes: &Arc<Lanes>,
    sql: &str,
    types: &[Type],
    location: &'static Location<'static>,
) -> Result<Prepared> {
    let mut hits = 0;
    loop {
        let lease = lease(pool, lanes, location).await?;
        let began = Instant::now();
        match cached(&lease.lane, sql, types).await {
            Err(e) if hits < COLLATERAL_RETRIES && lease.lane.flights.hit_by_cancel(&e, began) => {
                hits += 1;
                pool.counters
                    .statements_retried
                    .fetch_add(1, Ordering::Relaxed);
            }
            result => return result,
        }
    }
}

/// The lane's cached statement for `sql` and `types`, prepared in a flight
/// of its own on a miss.
async fn cached(lane: &Arc<Lane>, sql: &str, types: &[Type]) -> Result<Prepared> {
    if let Some(prepared) = lane.conn().raw.statements.get(sql, types) {
        lane.pool
            .counters
            .statement_cache_hits
            .fetch_add(1, Ordering::Relaxed);
        return Ok(prepared);
    }
    let (owner, sql, types) = (lane.clone(), sql.to_owned(), types.to_vec());
    let request = Box::pin(async move { owner.session().prepare(&sql, &types).await });
    Flight::with_lookups(lane.clone(), request).await
}

/// A statement through the lane's statement cache.
async fn statement(lane: &Arc<Lane>, call: &Call<'_>) -> Result<Output> {
    let prepared = cached(lane, call.sql, call.types).await?;
    let params = encode(call.params, &prepared)?;
    let (owner, want) = (lane.clone(), call.want);
    // An unnamed statement (behind a transaction pooler) may look up the
    // types of its columns after its first poll.
    let named = prepared.statement().is_some();
    let request = Box::pin(async move { execute(&owner, &prepared, &params, want).await });
    if named {
        Flight::new(lane.clone(), request).await
    } else {
        Flight::with_lookups(lane.clone(), request).await
    }
}

/// A simple query (no parameters, several statements allowed by the
/// protocol; the router sends only single safe ones here).
async fn simple(lane: &Arc<Lane>, sql: &str) -> Result<Output> {
    let (owner, sql) = (lane.clone(), sql.to_owned());
    let request = Box::pin(async move {
        let messages = owner.conn().raw.client.simple_query(&sql).await?;
        Ok(Output::Messages(messages))
    });
    Flight::new(lane.clone(), request).await
}

/// Runs a prepared statement and reads its whole answer.
async fn execute(
    lane: &Lane,
    prepared: &Prepared,
    params: &[Encoded],
    want: Want,
) -> Result<Output> {
    let client = &lane.conn().raw.client;
    let stream = match prepared.statement() {
        Some(statement) => client.query_raw(statement, params.iter()).await?,
        None => {
            let typed = params.iter().zip(prepared.params().iter().cloned());
            client.query_typed_raw(prepared.sql(), typed).await?
        }
    };
    match want {
        Want::Rows => Ok(Output::Rows(collect(stream, usize::MAX).await?.0)),
        Want::AtMostOne => match collect(stream, 1).await? {
            (_, true) => Err(more_than_one_row()),
            (rows, false) => Ok(Output::Rows(rows)),
        },
        Want::Count => {
            let mut stream = std::pin::pin!(stream);
            while stream.try_next().await?.is_some() {}
            Ok(Output::Count(stream.rows_affected().unwrap_or(0)))
        }
    }
}

/// A parameter encoded before its request is handed over (see the module
/// docs): its bytes, sent as they are.
#[derive(Debug)]
struct Encoded {
    value: Option<Bytes>,
    format: Format,
}

impl ToSql for Encoded {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match &self.value {
            Some(bytes) => {
                out.extend_from_slice(bytes);
                Ok(IsNull::No)
            }
            None => Ok(IsNull::Yes),
        }
    }

    fn accepts(_ty: &Type) -> bool {
        // Checked against the statement's type when it was encoded.
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        match self.format {
            Format::Text => Format::Text,
            Format::Binary => Format::Binary,
        }
    }

    to_sql_checked!();
}

/// Encodes `params` for `prepared`'s parameter types, checking each type as
/// tokio-postgres would.
fn encode(params: &[&(dyn ToSql + Sync)], prepared: &Prepared) -> Result<Vec<Encoded>> {
    let types = prepared.params();
    if types.len() != params.len() {
        return Err(wrong_parameter_count(prepared, params.len()));
    }
    let mut buf = BytesMut::new();
    params
        .iter()
        .zip(types)
        .enumerate()
        .map(|(i, (param, ty))| {
            let format = param.encode_format(ty);
            match param.to_sql_checked(ty, &mut buf) {
                Ok(IsNull::Yes) => Ok(Encoded {
                    value: None,
                    format,
                }),
                Ok(IsNull::No) => Ok(Encoded {
                    value: Some(buf.split().freeze()),
                    format,
                }),
                Err(e) => Err(Error::statement(format!(
                    "parameter ${} of {} (type {}): {e}",
                    i + 1,
                    excerpt(prepared.sql()),
                    ty.name()
                ))
                .with_source(e)),
            }
        })
        .collect()
}
