//! The pools under test behind one interface: pgfleet, deadpool-postgres,
//! bb8-postgres, sqlx, and the raw tokio-postgres baselines.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::NoTls;

/// Which implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// pgfleet's pool.
    Pgfleet,
    /// deadpool-postgres (RecyclingMethod::Fast).
    Deadpool,
    /// bb8-postgres (`test_on_check_out(false)`).
    Bb8,
    /// sqlx PgPool (defaults: it pings before handing a connection out).
    Sqlx,
    /// N dedicated tokio-postgres connections, one per task (baseline).
    Dedicated,
    /// One tokio-postgres connection shared by every task (pipelining).
    Pipelined,
    /// pgfleet's opt-in shared mode (`Pool::shared`): statements pipelined
    /// over `shared_connections` of the pool's connections.
    PgfleetShared,
    /// pgfleet's statement methods on the pool (`pool.query(...)`): routed
    /// by pgfleet, pipelined over its lanes (`shared_connections` = auto).
    PgfleetStmt,
    /// The statement methods with 1, 2 and 4 lanes (the lanes table).
    StmtLanes1,
    /// 2 lanes.
    StmtLanes2,
    /// 4 lanes.
    StmtLanes4,
    /// pgfleet's pool over TLS (`sslmode=verify-full`, rustls), to the same
    /// server: scenario B only, the cost of TLS per statement.
    PgfleetTls,
    /// No pool at all (scenario A only): the harness loop alone, to show how
    /// even the scheduler spreads work over tasks.
    Noop,
}

impl Kind {
    /// The pools (not the baselines).
    pub const POOLS: [Kind; 4] = [Kind::Pgfleet, Kind::Deadpool, Kind::Bb8, Kind::Sqlx];

    /// Display name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pgfleet => "pgfleet",
            Kind::Deadpool => "deadpool",
            Kind::Bb8 => "bb8",
            Kind::Sqlx => "sqlx",
            Kind::Dedicated => "dedicated",
            Kind::Pipelined => "pipelined",
            Kind::PgfleetShared => "pgfleet-shared",
            Kind::PgfleetStmt => "pgfleet-stmt",
            Kind::StmtLanes1 => "stmt 1 lane",
            Kind::StmtLanes2 => "stmt 2 lanes",
            Kind::StmtLanes4 => "stmt 4 lanes",
            Kind::PgfleetTls => "pgfleet-tls",
            Kind::Noop => "no pool",
        }
    }
}

/// What one operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    /// Acquire and release, no query.
    AcquireRelease,
    /// Acquire, yield to the scheduler once while holding the connection,
    /// release: no I/O, but with more tasks than connections the tasks
    /// really queue for connections, so the pool's hand-off and its
    /// fairness are what is measured.
    AcquireYieldRelease,
    /// `SELECT 1` through a statement prepared once per connection (pgfleet,
    /// deadpool: `prepare_cached`; the baselines prepare at start; sqlx: its
    /// own statement cache; bb8 has no statement cache and is not measured).
    Select1Prepared,
    /// `SELECT 1`, extended protocol with an unnamed statement, in one round
    /// trip (`query_typed`: the server parses and plans every time; sqlx: its
    /// cached prepared statement).
    Select1Extended,
    /// `SELECT 1`, simple protocol.
    Select1Simple,
    /// Indexed point query through a statement prepared once per connection
    /// (as `Select1Prepared`).
    PointPrepared,
    /// Indexed point query, extended protocol, unnamed statement.
    PointExtended,
    /// Indexed point query, simple protocol.
    PointSimple,
}

impl Op {
    /// The operations of scenario B, in report order.
    pub const QUERIES: [Op; 6] = [
        Op::Select1Prepared,
        Op::Select1Extended,
        Op::Select1Simple,
        Op::PointPrepared,
        Op::PointExtended,
        Op::PointSimple,
    ];

    /// Runs through a statement cached per connection: subjects without a
    /// statement cache (bb8) are not measured on it.
    pub fn is_prepared(self) -> bool {
        matches!(self, Op::Select1Prepared | Op::PointPrepared)
    }

    /// Display name.
    pub fn name(self) -> &'static str {
        match self {
            Op::AcquireRelease => "acquire+release",
            Op::AcquireYieldRelease => "acquire+yield+release",
            Op::Select1Prepared => "SELECT 1 (prepared)",
            Op::Select1Extended => "SELECT 1 (extended)",
            Op::Select1Simple => "SELECT 1 (simple)",
            Op::PointPrepared => "point query (prepared)",
            Op::PointExtended => "point query (extended)",
            Op::PointSimple => "point query (simple)",
        }
    }
}

/// A pool (or baseline) ready to run operations.
#[derive(Clone)]
pub enum Subject {
    /// pgfleet.
    Pgfleet(pgfleet::Pool),
    /// deadpool.
    Deadpool(deadpool_postgres::Pool),
    /// bb8.
    Bb8(bb8::Pool<bb8_postgres::PostgresConnectionManager<NoTls>>),
    /// sqlx.
    Sqlx(sqlx::PgPool),
    /// Dedicated connections: task `i` uses connection `i % n`.
    Dedicated(Arc<Vec<RawClient>>),
    /// One shared connection.
    Pipelined(Arc<RawClient>),
    /// pgfleet in shared mode.
    PgfleetShared(pgfleet::Pool),
    /// pgfleet's statement methods.
    PgfleetStmt(pgfleet::Pool),
    /// Nothing.
    Noop,
}

/// Point-query table rows.
pub const ROWS: i32 = 10_000;

/// The `SELECT 1` statement.
const SELECT1: &str = "SELECT 1";
/// The point query (the table is created by the harness).
const POINT: &str = "SELECT v FROM bench WHERE id = $1";

/// A raw tokio-postgres connection (a baseline) with the benchmark's
/// statements prepared on it once.
pub struct RawClient {
    client: tokio_postgres::Client,
    select1: tokio_postgres::Statement,
    point: tokio_postgres::Statement,
}

impl RawClient {
    async fn connect(url: &str) -> Result<RawClient, BoxError> {
        let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
        tokio::spawn(conn);
        let select1 = client.prepare(SELECT1).await?;
        let point = client.prepare(POINT).await?;
        Ok(RawClient {
            client,
            select1,
            point,
        })
    }

    /// The statement prepared for `sql` (one of the two above).
    fn statement(&self, sql: &str) -> tokio_postgres::Statement {
        if sql == SELECT1 {
            self.select1.clone()
        } else {
            self.point.clone()
        }
    }
}

/// `shared_connections` of the shared-mode subject (the library default
/// on this machine's 2 cores, written out so the subject stays the same).
pub const SHARED_CONNECTIONS: u32 = 2;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The sqlx operation, boxed: sqlx's `Executor` bounds are higher-ranked,
/// and an unboxed future of them is not provably `Send` inside `spawn`.
fn sqlx_run(
    pool: sqlx::PgPool,
    op: Op,
    key: i32,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), BoxError>> + Send>> {
    Box::pin(async move {
        let mut conn = pool.acquire().await?;
        match op {
            Op::AcquireRelease => {}
            Op::AcquireYieldRelease => tokio::task::yield_now().await,
            // sqlx prepares and caches every statement it runs with
            // arguments or through `query`.
            Op::Select1Prepared | Op::Select1Extended => {
                sqlx::query(SELECT1).fetch_one(conn.as_mut()).await?;
            }
            Op::Select1Simple => {
                // A plain string without arguments runs unprepared (simple protocol).
                sqlx::Executor::execute(conn.as_mut(), SELECT1).await?;
            }
            Op::PointPrepared | Op::PointExtended => {
                sqlx::query(POINT)
                    .bind(key)
                    .fetch_one(conn.as_mut())
                    .await?;
            }
            Op::PointSimple => {
                let sql = format!("SELECT v FROM bench WHERE id = {key}");
                sqlx::Executor::execute(conn.as_mut(), sql.as_str()).await?;
            }
        }
        Ok(())
    })
}

/// One operation through the statement methods on the pool: one call, as
/// a user writes it (text, prepared and cached per lane by pgfleet;
/// `query_typed` caches too, so `extended` is the same as `prepared`
/// here).
async fn stmt_run(pool: &pgfleet::Pool, op: Op, key: i32) -> Result<(), BoxError> {
    match op {
        Op::AcquireRelease | Op::AcquireYieldRelease => {
            return Err("the statement methods have no acquire: scenario B only".into());
        }
        Op::Select1Prepared => drop(pool.query(SELECT1, &[]).await?),
        Op::Select1Extended => drop(pool.query_typed(SELECT1, &[]).await?),
        Op::Select1Simple => drop(pool.simple_query(SELECT1).await?),
        Op::PointPrepared => drop(pool.query(POINT, &[&key]).await?),
        Op::PointExtended => {
            let typed = [(
                &key as &(dyn tokio_postgres::types::ToSql + Sync),
                tokio_postgres::types::Type::INT4,
            )];
            drop(pool.query_typed(POINT, &typed).await?)
        }
        Op::PointSimple => {
            let sql = format!("SELECT v FROM bench WHERE id = {key}");
            drop(pool.simple_query(&sql).await?)
        }
    }
    Ok(())
}

impl Subject {
    /// Builds `kind` with `size` connections (pools: max size; `min` kept
    /// warm where the pool supports it).
    pub async fn build(kind: Kind, url: &str, size: u32, min: u32) -> Result<Subject, BoxError> {
        // tokio-postgres's own parser (the peers'): it knows no sslrootcert.
        let pg = || url.parse::<tokio_postgres::Config>();
        let pgfleet_pool = |shared_connections: Option<u32>| -> Result<pgfleet::Pool, BoxError> {
            Ok(pgfleet::Pool::new(
                pgfleet::Target::parse(url)?,
                pgfleet::PoolConfig {
                    min_size: min,
                    max_size: Some(size),
                    acquire_timeout: Duration::from_secs(60),
                    application_name: "bench-pgfleet".into(),
                    shared_connections,
                    ..pgfleet::PoolConfig::default()
                },
            )?)
        };
        Ok(match kind {
            Kind::Pgfleet | Kind::PgfleetTls => {
                Subject::Pgfleet(pgfleet_pool(Some(SHARED_CONNECTIONS))?)
            }
            Kind::PgfleetShared => Subject::PgfleetShared(pgfleet_pool(Some(SHARED_CONNECTIONS))?),
            Kind::PgfleetStmt => Subject::PgfleetStmt(pgfleet_pool(None)?),
            Kind::StmtLanes1 => Subject::PgfleetStmt(pgfleet_pool(Some(1))?),
            Kind::StmtLanes2 => Subject::PgfleetStmt(pgfleet_pool(Some(2))?),
            Kind::StmtLanes4 => Subject::PgfleetStmt(pgfleet_pool(Some(4))?),
            Kind::Deadpool => {
                let manager = deadpool_postgres::Manager::from_config(
                    pg()?,
                    NoTls,
                    deadpool_postgres::ManagerConfig {
                        recycling_method: deadpool_postgres::RecyclingMethod::Fast,
                    },
                );
                Subject::Deadpool(
                    deadpool_postgres::Pool::builder(manager)
                        .max_size(size as usize)
                        .build()?,
                )
            }
            Kind::Bb8 => {
                let manager = bb8_postgres::PostgresConnectionManager::new(pg()?, NoTls);
                Subject::Bb8(
                    bb8::Pool::builder()
                        .max_size(size)
                        // Like pgfleet and deadpool (Fast), no round trip on
                        // every checkout; bb8's default pings each time.
                        .test_on_check_out(false)
                        .min_idle(Some(min))
                        .connection_timeout(Duration::from_secs(60))
                        .build(manager)
                        .await?,
                )
            }
            Kind::Sqlx => Subject::Sqlx(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(size)
                    .min_connections(min)
                    .acquire_timeout(Duration::from_secs(60))
                    .connect(url)
                    .await?,
            ),
            Kind::Dedicated => {
                let mut clients = Vec::new();
                for _ in 0..size {
                    clients.push(RawClient::connect(url).await?);
                }
                Subject::Dedicated(Arc::new(clients))
            }
            Kind::Pipelined => Subject::Pipelined(Arc::new(RawClient::connect(url).await?)),
            Kind::Noop => Subject::Noop,
        })
    }

    /// Opens `n` connections at once and returns when all are open (for
    /// warm-up and the memory measurement), then releases them.
    pub async fn fill(&self, n: usize) -> Result<(), BoxError> {
        match self {
            Subject::Pgfleet(p) => {
                let mut held = Vec::new();
                for _ in 0..n {
                    held.push(p.get().await?);
                }
            }
            Subject::Deadpool(p) => {
                let mut held = Vec::new();
                for _ in 0..n {
                    held.push(p.get().await?);
                }
            }
            Subject::Bb8(p) => {
                let mut held = Vec::new();
                for _ in 0..n {
                    held.push(p.get().await?);
                }
            }
            Subject::Sqlx(p) => {
                let mut held = Vec::new();
                for _ in 0..n {
                    held.push(p.acquire().await?);
                }
            }
            Subject::Dedicated(_)
            | Subject::Pipelined(_)
            | Subject::PgfleetShared(_)
            | Subject::PgfleetStmt(_)
            | Subject::Noop => {}
        }
        Ok(())
    }

    /// Runs one operation for task `task`.
    pub async fn run(&self, op: Op, task: usize, key: i32) -> Result<(), BoxError> {
        // Runs `$op` on client `$c`; `$prepare(sql)` is the subject's
        // statement for `sql`, as a future.
        macro_rules! on_client {
            ($op:expr, $c:expr, $prepare:expr) => {{
                // A tokio-postgres client, or a pgfleet handle whose own
                // query methods are found before the Client's.
                let c = $c;
                match $op {
                    Op::AcquireRelease => {}
                    Op::AcquireYieldRelease => tokio::task::yield_now().await,
                    Op::Select1Prepared => {
                        let statement = $prepare(SELECT1).await?;
                        c.query(&statement, &[]).await?;
                    }
                    Op::Select1Extended => {
                        c.query_typed(SELECT1, &[]).await?;
                    }
                    Op::Select1Simple => {
                        c.simple_query(SELECT1).await?;
                    }
                    Op::PointPrepared => {
                        let statement = $prepare(POINT).await?;
                        c.query(&statement, &[&key]).await?;
                    }
                    Op::PointExtended => {
                        c.query_typed(POINT, &[(&key, tokio_postgres::types::Type::INT4)])
                            .await?;
                    }
                    Op::PointSimple => {
                        c.simple_query(&format!("SELECT v FROM bench WHERE id = {key}"))
                            .await?;
                    }
                }
            }};
        }
        // The baselines' statements were prepared at start.
        let ready = |raw: &RawClient, sql: &str| {
            std::future::ready(Ok::<_, tokio_postgres::Error>(raw.statement(sql)))
        };
        match self {
            Subject::Pgfleet(p) => {
                let conn = p.get().await?;
                on_client!(op, &conn, |sql| conn.prepare_cached(sql));
            }
            Subject::Deadpool(p) => {
                let conn = p.get().await?;
                on_client!(op, &conn, |sql| conn.prepare_cached(sql));
            }
            Subject::Bb8(p) => {
                let conn = p.get().await?;
                if op.is_prepared() {
                    return Err(
                        "bb8 has no statement cache: not measured on prepared queries".into(),
                    );
                }
                on_client!(op, &conn, |sql| conn.prepare(sql));
            }
            Subject::Dedicated(clients) => {
                let raw = &clients[task % clients.len()];
                on_client!(op, &raw.client, |sql| ready(raw, sql));
            }
            Subject::Pipelined(raw) => on_client!(op, &raw.client, |sql| ready(raw, sql)),
            Subject::PgfleetShared(p) => {
                let conn = p.shared().await?;
                on_client!(op, &conn, |sql| conn.prepare_cached(sql));
            }
            Subject::PgfleetStmt(p) => stmt_run(p, op, key).await?,
            Subject::Sqlx(p) => sqlx_run(p.clone(), op, key).await?,
            Subject::Noop if op == Op::AcquireYieldRelease => tokio::task::yield_now().await,
            Subject::Noop => {}
        }
        Ok(())
    }

    /// Closes the pool so its connections leave the server.
    pub async fn close(self) {
        match self {
            Subject::Pgfleet(p) | Subject::PgfleetShared(p) | Subject::PgfleetStmt(p) => {
                p.close();
                p.wait_closed(std::time::Instant::now() + Duration::from_secs(5))
                    .await;
            }
            Subject::Deadpool(p) => p.close(),
            Subject::Bb8(p) => drop(p),
            Subject::Sqlx(p) => p.close().await,
            Subject::Dedicated(_) | Subject::Pipelined(_) | Subject::Noop => {}
        }
    }
}
