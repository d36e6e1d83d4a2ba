//! COPY through pooled connections: a `copy_in` leaves the connection
//! ready at once (the next `get()` on a pool of one connection gets it
//! without waiting), `copy_out` works, shared mode refuses COPY.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{app, cluster, config, target};
use futures_util::{SinkExt, TryStreamExt};
use pgfleet::Pool;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_then_an_immediate_get_on_a_pool_of_one() {
    let table = app("copy_t").replace('-', "_");
    let mut cfg = config(&app("copy_in"), 1, 1);
    cfg.acquire_timeout = Duration::from_secs(2);
    let pool = Pool::new(target(cluster()), cfg).unwrap();
    let conn = pool.get().await.unwrap();
    conn.batch_execute(&format!("CREATE TABLE {table} (id int, name text)"))
        .await
        .unwrap();
    let sink = conn
        .copy_in(&format!("COPY {table} FROM STDIN"))
        .await
        .unwrap();
    let mut sink = std::pin::pin!(sink);
    for i in 0..1000 {
        sink.send(Bytes::from(format!("{i}\tname {i}\n")))
            .await
            .unwrap();
    }
    assert_eq!(sink.as_mut().finish().await.unwrap(), 1000);
    drop(conn);
    let started = Instant::now();
    let conn = pool.get().await.unwrap();
    let waited = started.elapsed();
    eprintln!("get() after COPY IN took {waited:?}");
    let n: i64 = conn
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1000);
    assert_eq!(
        pool.stats().counters.connections_created,
        1,
        "the same connection"
    );
    assert_eq!(pool.stats().counters.connections_closed_dirty, 0);

    // COPY OUT reads it back on the same connection.
    let stream = conn
        .copy_out(&format!(
            "COPY (SELECT id FROM {table} ORDER BY id LIMIT 3) TO STDOUT"
        ))
        .await
        .unwrap();
    let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
    let text: String = chunks.iter().map(|c| String::from_utf8_lossy(c)).collect();
    assert_eq!(text, "0\n1\n2\n");
    conn.batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_mode_refuses_copy_with_a_clear_error() {
    let pool = Pool::new(target(cluster()), config(&app("copy_shared"), 0, 2)).unwrap();
    let lease = pool.shared().await.unwrap();
    let err = lease.copy_in("COPY t FROM STDIN").await.unwrap_err();
    assert!(err.is_unsupported(), "{err}");
    assert!(err.to_string().contains("pool.get()"), "{err}");
    let err = lease.copy_out("COPY t TO STDOUT").await.unwrap_err();
    assert!(err.is_unsupported(), "{err}");
    let err = lease
        .query("COPY pg_class TO STDOUT", &[])
        .await
        .unwrap_err();
    assert!(err.is_unsupported(), "{err}");
    let err = lease.execute("BEGIN", &[]).await.unwrap_err();
    assert!(err.is_unsupported(), "{err}");
    // The lease still works for what belongs there.
    let v: i32 = lease.query_one("SELECT 7", &[]).await.unwrap().get(0);
    assert_eq!(v, 7);
}
