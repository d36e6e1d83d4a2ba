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
//!
//! Behind a transaction pooler no named statement may outlive a
//! transaction, so a [`Prepared`] there is only the statement's text and
//! parameter types, and each execution sends Parse, Bind and Execute at
//! once (an unnamed statement).

/// A statement from `prepare_cached`: run it with the query methods of the
/// handle that prepared it ([`PooledConnection::query`] and the like).
///
/// Directly on PostgreSQL (and behind a session pooler) it is a statement
/// prepared on the server, held in the connection's statement cache, and
/// [`statement`](Self::statement) is the tokio-postgres statement. Behind a
/// pooler in transaction mode it is the statement's text and parameter
/// types, and every execution parses it again in the same round trip.
///
/// [`PooledConnection::query`]: crate::PooledConnection::query
#[derive(Clone)]
pub struct Prepared {
    sql: Arc<str>,
    form: Form,
    effects: Effects,
    /// The first keyword, for the checks of shared mode.
    keyword: Keyword,
}

#[derive(Clone)]
enum Form {
    Named(Statement),
    Unnamed(Arc<[Type]>),
}

/// What the first keyword of a statement says to shared mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keyword {
    /// `COPY`.
    Copy,
    /// `BEGIN`, `START`, `COMMIT`, `END`, `ROLLBACK`, `ABORT`,
    /// `SAVEPOINT`, `RELEASE`, `PREPARE TRANSACTION` and the like.
    TransactionControl,
    /// Anything else.
    Other,
}

impl Keyword {
    /// What the first keyword of `sql` says.
    pub(crate) fn of(sql: &str) -> Keyword {
        match sql::first_keyword(sql).as_deref() {
            Some("COPY") => Keyword::Copy,
            Some(
                "BEGIN" | "START" | "COMMIT" | "END" | "ROLLBACK" | "ABORT" | "SAVEPOINT"
                | "RELEASE",
            ) => Keyword::TransactionControl,
            _ => Keyword::Other,
        }
    }
}

impl Prepared {
    /// A statement prepared on the server.
    pub(crate) fn named(sql: &str, statement: Statement) -> Prepared {
        Prepared::new(sql, Form::Named(statement))
    }

    /// A statement's text and parameter types, for an unnamed statement.
    pub(crate) fn unnamed(sql: &str, params: Vec<Type>) -> Prepared {
        Prepared::new(sql, Form::Unnamed(params.into()))
    }

    fn new(sql: &str, form: Form) -> Prepared {
        Prepared {
            sql: sql.into(),
            form,
            effects: sql::effects(sql.as_bytes()),
            keyword: Keyword::of(sql),
        }
    }

    /// The statement's text.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// The types of its parameters.
    pub fn params(&self) -> &[Type] {
        match &self.form {
            Form::Named(statement) => statement.params(),
            Form::Unnamed(params) => params,
        }
    }

    /// The statement prepared on the server, when there is one (not behind
    /// a pooler in transaction mode). Like any prepared statement it
    /// belongs to the connection that prepared it.
    pub fn statement(&self) -> Option<&Statement> {
        match &self.form {
            Form::Named(statement) => Some(statement),
            Form::Unnamed(_) => None,
        }
    }

    /// The session state the statement may leave behind.
    pub(crate) fn effects(&self) -> Effects {
        self.effects
    }

    pub(crate) fn keyword(&self) -> Keyword {
        self.keyword
    }
}

impl fmt::Debug for Prepared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prepared")
            .field("sql", &self.sql)
            .field("params", &self.params())
            .field("named", &self.statement().is_some())
            .finish()
    }
}

/// What the query methods of pgfleet's handles accept as the statement:
/// its text (`&str`, `&String`), a [`Prepared`] from `prepare_cached`, or a
/// tokio-postgres [`Statement`] prepared on the same connection. Sealed.
pub trait Sql: private::Sealed + Sync {}

impl Sql for str {}
impl Sql for String {}
impl Sql for Prepared {}
impl Sql for Statement {}

pub(crate) mod private {
    use super::{Prepared, Statement};

    /// The statement a [`Sql`](super::Sql) names.
    pub enum SqlRef<'a> {
        /// Text, prepared through the cache.
        Text(&'a str),
        /// From `prepare_cached`.
        Prepared(&'a Prepared),
        /// Prepared by the caller.
        Statement(&'a Statement),
    }

    /// Seals [`Sql`](super::Sql).
    pub trait Sealed {
        /// The statement this names.
        fn as_sql(&self) -> SqlRef<'_>;
    }

    impl Sealed for str {
        fn as_sql(&self) -> SqlRef<'_> {
            SqlRef::Text(self)
        }
    }
    impl Sealed for String {
        fn as_sql(&self) -> SqlRef<'_> {
            SqlRef::Text(self)
        }
    }
    impl Sealed for Prepared {
        fn as_sql(&self) -> SqlRef<'_> {
            SqlRef::Prepared(self)
        }
    }
    impl Sealed for Statement {
        fn as_sql(&self) -> SqlRef<'_> {
            SqlRef::Statement(self)
        }
    }
}

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio_postgres::types::Type;
use tokio_postgres::Statement;

use super::sql::{self, Effects};

/// Values by SQL text and declared parameter types, least recently used
/// dropped first: the statements prepared on one connection (`V =
/// Statement`), or the parameter types a pool learnt behind a transaction
/// pooler.
#[derive(Debug)]
pub(crate) struct StatementCache<V = Prepared> {
    capacity: usize,
    inner: Mutex<Inner<V>>,
}

#[derive(Debug)]
struct Inner<V> {
    /// Values by SQL text; one text may be prepared with different
    /// parameter types.
    by_sql: HashMap<Box<str>, Vec<Entry<V>>>,
    len: usize,
    /// Ticks on every use, to find the least recently used value.
    clock: u64,
}

#[derive(Debug)]
struct Entry<V> {
    types: Box<[Type]>,
    statement: V,
    used: u64,
}

impl<V: Clone> StatementCache<V> {
    /// An empty cache holding up to `capacity` values (0: none).
    pub(crate) fn new(capacity: usize) -> Self {
        StatementCache {
            capacity,
            inner: Mutex::new(Inner {
                by_sql: HashMap::new(),
                len: 0,
                clock: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<V>> {
        // Every update leaves the map consistent before it can panic.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The value for `sql` with `types`, if cached.
    pub(crate) fn get(&self, sql: &str, types: &[Type]) -> Option<V> {
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
    pub(crate) fn insert(&self, sql: &str, types: &[Type], statement: V) -> V {
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

    /// Forgets the value for `sql` with `types`.
    pub(crate) fn remove(&self, sql: &str, types: &[Type]) {
        let mut inner = self.lock();
        let Some(entries) = inner.by_sql.get_mut(sql) else {
            return;
        };
        let before = entries.len();
        entries.retain(|e| *e.types != *types);
        let removed = before - entries.len();
        if entries.is_empty() {
            inner.by_sql.remove(sql);
        }
        inner.len -= removed;
    }

    /// Forgets every value (after `DISCARD ALL` or `DEALLOCATE ALL`).
    pub(crate) fn clear(&self) {
        let mut inner = self.lock();
        inner.by_sql.clear();
        inner.len = 0;
    }

    /// Values cached.
    pub(crate) fn len(&self) -> usize {
        self.lock().len
    }
}

impl<V> Inner<V> {
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
