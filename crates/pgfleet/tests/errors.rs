//! One error type for pool and query errors: `?` takes both, and the
//! SQLSTATE stays readable.

mod common;

use common::{app, cluster, config, target};
use pgfleet::Pool;

/// A handler as services write them: one `?` for the pool, one for the query.
async fn count_rows(pool: &Pool, sql: &str) -> pgfleet::Result<i64> {
    let conn = pool.get().await?;
    let row = conn.query_one(sql, &[]).await?;
    Ok(row.get(0))
}

#[tokio::test]
async fn query_errors_convert_with_their_sqlstate_and_message() {
    let pool = Pool::new(target(cluster()), config(&app("errors"), 1, 2)).unwrap();
    assert_eq!(count_rows(&pool, "SELECT 7::bigint").await.unwrap(), 7);

    let err = count_rows(&pool, "SELEC 1").await.unwrap_err();
    assert!(
        err.is_db() && !err.is_connect() && !err.is_timeout(),
        "{err:?}"
    );
    assert_eq!(err.code(), Some("42601"));
    assert!(err.to_string().contains("syntax error"), "{err}");
    assert!(err.to_string().contains("42601"), "{err}");
    assert_eq!(err.as_db_error().map(|db| db.code().code()), Some("42601"));

    let err = count_rows(&pool, "SELECT * FROM no_such_table_here")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("42P01"));
    assert!(err.to_string().contains("no_such_table_here"), "{err}");
    // The pool's own errors keep their kinds.
    pool.close();
    let err = count_rows(&pool, "SELECT 1").await.unwrap_err();
    assert!(err.is_closed() && !err.is_db(), "{err:?}");
}
