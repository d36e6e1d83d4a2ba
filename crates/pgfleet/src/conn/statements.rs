//! Prepared statements cached per connection.
//!
//! A statement prepared on the server lives as long as the session that
//! prepared it, so the cache belongs to one physical connection and dies with
//! it. Executing a cached statement costs Bind/Execute only: the server skips
//! parsing, and planning too once it settles on a reusable plan
//! (`plan_cache_mode`); for short statements that is most of its work.
//!
//! The cache is bounded (`statement_cache_size`); when it is full, the least
//! recently used statement is dropped, and tokio-postgres closes it on the
//! server. Two tasks missing on one statement at once (shared mode) both
//! prepare it; the first to finish is kept and the other's copy is closed.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio_postgres::types::Type;
use tokio_postgres::{Client, Statement};

use crate::stats::Counters;

/// The statements prepared on one connection, by SQL text and parameter
/// types.
#[derive(Debug)]
pub(crate) struct StatementCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Statements by SQL text; one text may be prepared with different
    /// parameter types.
    by_sql: HashMap<Box<str>, Vec<Entry>>,
    len: usize,
    /// Ticks on every use, to find the least recently used statement.
    clock: u64,
}

#[derive(Debug)]
struct Entry {
    types: Box<[Type]>,
    statement: Statement,
    used: u64,
}

impl StatementCache {
    /// An empty cache holding up to `capacity` statements (0: none).
    pub(crate) fn new(capacity: usize) -> Self {
        StatementCache {
            capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update leaves the map consistent before it can panic.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The statement prepared for `sql` with `types`, if cached.
    fn get(&self, sql: &str, types: &[Type]) -> Option<Statement> {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        let entry = inner
            .by_sql
            .get_mut(sql)?
            .iter_mut()
            .find(|e| *e.types == *types)?;
        entry.used = now;
        Some(entry.statement.clone())
    }

    /// Caches a statement just prepared and returns the one to use: the
    /// cached one if another caller got there first. Makes room by dropping
    /// the least recently used statement.
    fn insert(&self, sql: &str, types: &[Type], statement: Statement) -> Statement {
        if self.capacity == 0 {
            return statement;
        }
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        if let Some(entry) = inner
            .by_sql
            .get_mut(sql)
            .and_then(|entries| entries.iter_mut().find(|e| *e.types == *types))
        {
            entry.used = now;
            return entry.statement.clone();
        }
        if inner.len >= self.capacity {
            inner.evict_least_recent();
        }
        inner.by_sql.entry(sql.into()).or_default().push(Entry {
            types: types.into(),
            statement: statement.clone(),
            used: now,
        });
        inner.len += 1;
        statement
    }

    /// Forgets every statement (after `DISCARD ALL` or `DEALLOCATE ALL`).
    pub(crate) fn clear(&self) {
        let mut inner = self.lock();
        inner.by_sql.clear();
        inner.len = 0;
    }

    /// Statements cached.
    pub(crate) fn len(&self) -> usize {
        self.lock().len
    }

    /// The cached statement for `sql` with parameter `types`, prepared on
    /// `client` on a miss; counted in `counters`.
    pub(crate) async fn prepare(
        &self,
        client: &Client,
        counters: &Counters,
        sql: &str,
        types: &[Type],
    ) -> Result<Statement, tokio_postgres::Error> {
        if let Some(statement) = self.get(sql, types) {
            counters
                .statement_cache_hits
                .fetch_add(1, Ordering::Relaxed);
            return Ok(statement);
        }
        let statement = client.prepare_typed(sql, types).await?;
        counters.statements_prepared.fetch_add(1, Ordering::Relaxed);
        Ok(self.insert(sql, types, statement))
    }
}

impl Inner {
    fn evict_least_recent(&mut self) {
        let Some((sql, index)) = self
            .by_sql
            .iter()
            .flat_map(|(sql, entries)| {
                entries
                    .iter()
                    .enumerate()
                    .map(move |(i, e)| (e.used, sql, i))
            })
            .min_by_key(|&(used, _, _)| used)
            .map(|(_, sql, i)| (sql.clone(), i))
        else {
            return;
        };
        if let Some(entries) = self.by_sql.get_mut(&sql) {
            entries.swap_remove(index);
            if entries.is_empty() {
                self.by_sql.remove(&sql);
            }
            self.len -= 1;
        }
    }
}
