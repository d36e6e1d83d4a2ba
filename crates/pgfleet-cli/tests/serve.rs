//! `pgfleet serve` over HTTP against real PostgreSQL servers: every
//! endpoint, bad input, outage and recovery, load, metrics against stats,
//! graceful shutdown.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{parse_metrics, post, post_raw, Server};

use pgfleet::{Pool, PoolConfig, Target};
use pgfleet_testkit::{Fault, FaultProxy, TempCluster};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_answers_and_bad_input_gets_a_clear_4xx() {
    let cluster = TempCluster::start().unwrap();
    let server = Server::start(&cluster, 5);
    let client = reqwest::Client::new();
    server.wait_ready(&client).await;

    let (status, body) = post(
        &client,
        server.url("/users/alice/messages"),
        json!({"session_id": "s1", "messages": [
            {"role": "user", "content": "I live in Lisbon"},
            {"role": "assistant", "content": "Lisbon is sunny"},
            {"role": "user", "content": "My cat is called Miso"},
            {"role": "assistant", "content": "Miso is a nice name"},
        ]}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body, json!({"messages": 4, "episodes": 1, "facts": 2}));
    let (status, body) = post(
        &client,
        server.url("/users/alice/facts"),
        json!({"facts": ["alice drinks tea"]}),
    )
    .await;
    assert_eq!((status, body), (201, json!({"stored": 1})));
    let (status, body) = post(
        &client,
        server.url("/users/alice/query"),
        json!({"query": "Lisbon tea", "top_k": 10}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let layers: Vec<&str> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["layer"].as_str().unwrap())
        .collect();
    for layer in ["M0", "M1", "M2"] {
        assert!(layers.contains(&layer), "{layer} missing: {body}");
    }
    // Another user sees nothing of alice's.
    let (status, body) = post(
        &client,
        server.url("/users/bob/query"),
        json!({"query": "Lisbon"}),
    )
    .await;
    assert_eq!(
        (status, body["results"].as_array().unwrap().len()),
        (200, 0)
    );

    for (path, raw, status, needle) in [
        (
            "/users/alice/query",
            "{bad".to_owned(),
            400,
            "malformed JSON",
        ),
        (
            "/users/alice/query",
            r#"{"top_k": 3}"#.to_owned(),
            400,
            "missing field `query`",
        ),
        (
            "/users/alice/query",
            r#"{"query": "   "}"#.to_owned(),
            400,
            "query must not be empty",
        ),
        (
            "/users/alice/query",
            r#"{"query": "?!"}"#.to_owned(),
            400,
            "no searchable words",
        ),
        (
            "/users/alice/query",
            r#"{"query": "x", "top_k": 0}"#.to_owned(),
            400,
            "top_k = 0",
        ),
        (
            "/users/alice/query",
            r#"{"query": "x", "top_k": 51}"#.to_owned(),
            400,
            "top_k = 51",
        ),
        (
            "/users/alice/query",
            r#"{"query": "x", "extra": 1}"#.to_owned(),
            400,
            "unknown field `extra`",
        ),
        (
            "/users/a%20b/query",
            r#"{"query": "x"}"#.to_owned(),
            400,
            "invalid user id",
        ),
        (
            &format!("/users/{}/query", "u".repeat(65)),
            r#"{"query": "x"}"#.to_owned(),
            400,
            "invalid user id",
        ),
        (
            "/users/alice/messages",
            r#"{"session_id": "s", "messages": []}"#.to_owned(),
            400,
            "1 to 100 messages",
        ),
        (
            "/users/alice/messages",
            r#"{"session_id": "s", "messages": [{"role": "robot", "content": "x"}]}"#.to_owned(),
            400,
            "messages[0].role",
        ),
        (
            "/users/alice/facts",
            r#"{"facts": [""]}"#.to_owned(),
            400,
            "facts[0] must not be empty",
        ),
        (
            "/users/alice/facts",
            format!(r#"{{"facts": ["{}"]}}"#, "x".repeat(70_000)),
            413,
            "larger than 65536 bytes",
        ),
    ] {
        let (got, body) = post_raw(&client, server.url(path), raw.clone()).await;
        assert_eq!(got, status, "{path} {}: {body}", &raw[..raw.len().min(60)]);
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{path}: {message}");
    }

    let health: Value = client
        .get(server.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health, json!({"status": "ready"}));

    // A few searches one after another, so that connections are reused
    // (and their cached statements with them) however the pool spread the
    // requests so far.
    for _ in 0..5 {
        let (status, _) = post(
            &client,
            server.url("/users/alice/query"),
            json!({"query": "Lisbon"}),
        )
        .await;
        assert_eq!(status, 200);
    }

    // /metrics agrees with /stats (nothing acquires between the two calls).
    let stats: Value = client
        .get(server.url("/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let metrics_response = client.get(server.url("/metrics")).send().await.unwrap();
    assert!(metrics_response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let metrics = parse_metrics(&metrics_response.text().await.unwrap());
    assert_eq!(stats["ready"], true);
    let pools = stats["fleet"]["pools"].as_object().unwrap();
    assert_eq!(pools.len(), 1, "one pool for every store of every user");
    let pool = pools.values().next().unwrap();
    assert_eq!(pool["max_size"], 10);
    assert_eq!(metrics["pgfleet_pool_max_size"], 10.0);
    assert_eq!(
        metrics["pgfleet_acquires_total"],
        pool["counters"]["acquires"].as_f64().unwrap()
    );
    assert_eq!(
        metrics["pgfleet_pool_size"],
        pool["gauges"]["size"].as_f64().unwrap()
    );
    assert_eq!(
        metrics["pgfleet_pool_active_references"],
        pool["active_references"].as_f64().unwrap()
    );
    assert_eq!(
        metrics["pgfleet_service_cache_hits_total"],
        stats["services"]["hits"].as_f64().unwrap()
    );
    // The stores run cached statements: prepared once per connection, then
    // reused by later requests.
    let (prepared, hits) = (
        pool["counters"]["statements_prepared"].as_f64().unwrap(),
        pool["counters"]["statement_cache_hits"].as_f64().unwrap(),
    );
    assert!(prepared >= 1.0 && hits >= 1.0, "{}", pool["counters"]);
    assert_eq!(metrics["pgfleet_statements_prepared_total"], prepared);
    assert_eq!(metrics["pgfleet_statement_cache_hits_total"], hits);
    assert_eq!(
        stats["services"]["entries"], 2,
        "alice (pre-cached) and bob"
    );
    assert!(
        stats["services"]["hits"].as_u64().unwrap() >= 3,
        "{}",
        stats["services"]
    );
    // 3 stores per user, plus the fleet's warm-up handle.
    assert_eq!(pool["active_references"], 3 * 2 + 1);
    let text = serde_json::to_string(&stats).unwrap();
    assert!(!text.contains(TempCluster::superuser_password()));
    assert!(text.contains("postgres://postgres:***@127.0.0.1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_gives_503_within_the_timeout_and_recovers_by_itself() {
    let cluster = Arc::new(TempCluster::start().unwrap());
    let server = Server::start(&cluster, 1);
    let client = reqwest::Client::new();
    server.wait_ready(&client).await;
    let query = json!({"query": "anything"});
    assert_eq!(
        post(&client, server.url("/users/carol/query"), query.clone())
            .await
            .0,
        200
    );

    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.stop())
        .await
        .unwrap()
        .unwrap();
    let started = Instant::now();
    let (status, body) = post(&client, server.url("/users/carol/query"), query.clone()).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "no hang: {:?}",
        started.elapsed()
    );
    assert_eq!(body["error"]["code"], "database_unavailable");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("database unavailable"),
        "{body}"
    );
    // Health turns degraded with the reason.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = client.get(server.url("/health")).send().await.unwrap();
        let (code, health): (u16, Value) = (r.status().as_u16(), r.json().await.unwrap());
        if code == 503 && health["status"] == "degraded" {
            assert!(
                health["reason"]
                    .as_str()
                    .unwrap()
                    .contains("could not connect"),
                "{health}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "health never degraded: {health}");
        // Traffic makes the pool notice the dead connections.
        let _ = post(&client, server.url("/users/carol/query"), query.clone()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.resume())
        .await
        .unwrap()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if post(&client, server.url("/users/carol/query"), query.clone())
            .await
            .0
            == 200
        {
            break;
        }
        assert!(Instant::now() < deadline, "no recovery");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.wait_ready(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_users_with_mixed_requests_stay_within_the_pool() {
    let cluster = Arc::new(TempCluster::start().unwrap());
    let server = Server::start(&cluster, 30);
    let client = reqwest::Client::new();
    server.wait_ready(&client).await;

    // The monitor's sampling code, on a connection of the test's own.
    let sampler_pool = Pool::new(
        Target::parse(&cluster.url("postgres")).unwrap(),
        PoolConfig {
            min_size: 1,
            max_size: Some(1),
            application_name: "serve-test-sampler".into(),
            ..PoolConfig::default()
        },
    )
    .unwrap();
    let peak = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, stop, app) = (peak.clone(), stop.clone(), server.app.clone());
        tokio::spawn(async move {
            let conn = sampler_pool.get().await.unwrap();
            for _ in 0..100_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let sample = pgfleet::sample_activity(&conn).await.unwrap();
                peak.fetch_max(sample.count_applications(|a| a == app), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let server_errors = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for u in 0..200 {
        let (client, base, server_errors, ok) = (
            client.clone(),
            server.base.clone(),
            server_errors.clone(),
            ok.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let user = format!("user{u}");
            for i in 0..20 {
                let (path, body) = match i % 3 {
                    0 => (
                        "messages",
                        json!({"session_id": "s", "messages": [{"role": "user", "content": format!("I like item {i} of user {u}")}]}),
                    ),
                    1 => ("facts", json!({"facts": [format!("fact {i} for {user}")]})),
                    _ => ("query", json!({"query": format!("item {i} fact"), "top_k": 5})),
                };
                let r = client.post(format!("{base}/users/{user}/{path}")).json(&body).send().await.unwrap();
                if r.status().is_server_error() {
                    server_errors.fetch_add(1, Ordering::SeqCst);
                } else if r.status().is_success() {
                    ok.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    sampler.await.unwrap();
    assert_eq!(server_errors.load(Ordering::SeqCst), 0);
    assert_eq!(ok.load(Ordering::SeqCst), 4000);
    let peak = peak.load(Ordering::SeqCst);
    assert!(
        (1..=10).contains(&peak),
        "peak backends {peak} for a pool of max_size 10"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_requests_in_flight_then_leaves_no_backends() {
    let cluster = TempCluster::start().unwrap();
    let mut server = Server::start(&cluster, 10);
    let client = reqwest::Client::new();
    server.wait_ready(&client).await;
    let mut tasks = Vec::new();
    for u in 0..60 {
        let (client, url) = (client.clone(), server.url(&format!("/users/u{u}/messages")));
        tasks.push(tokio::spawn(async move {
            client
                .post(url)
                .json(&json!({"session_id": "s", "messages": [{"role": "user", "content": "I am in flight"}]}))
                .send()
                .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    let status = tokio::task::block_in_place(|| server.terminate());
    assert_eq!(
        status,
        Some(0),
        "exit status; output: {:?}",
        server.output.lock().unwrap()
    );
    let mut completed = 0i64;
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => {
                assert_eq!(r.status(), 201, "a request in flight completed");
                completed += 1;
            }
            // Never read by the server: refused, or still in the listen
            // backlog / on an idle keep-alive connection when it closed.
            Err(e) => assert!(
                e.is_connect() || e.is_request(),
                "unexpected client error: {e}"
            ),
        }
    }
    assert!(completed > 0);
    // Every request the server processed was answered: one stored message
    // per 201, none stored without a response.
    let (db, conn) = tokio_postgres::connect(&cluster.url("postgres"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let stored: i64 = db
        .query_one(
            "SELECT count(*) FROM m0_messages WHERE content = 'I am in flight'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, completed, "stored messages vs. answered requests");
    let output = server.output.lock().unwrap().join("\n");
    assert!(
        output.contains("closed 1 pool(s); connections cut at the deadline: 0"),
        "{output}"
    );
    let filter = pgfleet_testkit::BackendFilter::all().application_name(&server.app);
    let left = cluster
        .wait_for_backends(&filter, |n| n == 0, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(left, 0, "backends left after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_without_the_database_listens_says_why_and_recovers() {
    let cluster = TempCluster::shared();
    let proxy = FaultProxy::start(cluster.port()).await.unwrap();
    proxy.set(Fault::RefuseNew);
    // The listener is up although the database is not.
    let server = Server::start_url(&cluster.url_via(proxy.port(), "postgres"), 2);
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let reason = loop {
        let r = client.get(server.url("/health")).send().await.unwrap();
        assert_eq!(r.status(), 503);
        let body: Value = r.json().await.unwrap();
        if body["status"] == "degraded" {
            break body["reason"].as_str().unwrap_or_default().to_owned();
        }
        assert_eq!(body["status"], "starting", "{body}");
        assert!(Instant::now() < deadline, "never degraded: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(reason.contains("cannot create the schema"), "{reason}");
    let (status, body) = post(
        &client,
        server.url("/users/alice/facts"),
        json!({"facts": ["alice waits"]}),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "database_unavailable");
    // The database appears: the service becomes ready by itself.
    proxy.set(Fault::Pass);
    server.wait_ready(&client).await;
    let (status, body) = post(
        &client,
        server.url("/users/alice/facts"),
        json!({"facts": ["alice is served"]}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_database_is_unreachable_exits_cleanly() {
    let cluster = TempCluster::shared();
    let proxy = FaultProxy::start(cluster.port()).await.unwrap();
    proxy.set(Fault::RefuseNew);
    let mut server = Server::start_url(&cluster.url_via(proxy.port(), "postgres"), 2);
    let client = reqwest::Client::new();
    let r = client.get(server.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        server.terminate(),
        Some(0),
        "{:?}",
        server.output.lock().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_pgbouncer_in_transaction_mode_many_users_get_no_5xx() {
    use pgfleet_testkit::{BackendFilter, PgBouncer, PoolMode};
    let cluster = Arc::new(TempCluster::start().unwrap());
    let bouncer = PgBouncer::builder(PoolMode::Transaction)
        .pool_size(4)
        .start(&cluster)
        .unwrap();
    let server = Server::start_url(
        &format!("{}?pooler=transaction", bouncer.url("postgres")),
        30,
    );
    let client = reqwest::Client::new();
    server.wait_ready(&client).await;

    // Every backend on the server (PgBouncer's server connections; the
    // kit's own are left out), sampled while the load runs.
    let peak = Arc::new(AtomicUsize::new(0));
    let peak_bouncer = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let bouncer = Arc::new(bouncer);
    let sampler = {
        let (peak, peak_bouncer, stop) = (peak.clone(), peak_bouncer.clone(), stop.clone());
        let (cluster, bouncer) = (cluster.clone(), bouncer.clone());
        tokio::spawn(async move {
            for _ in 0..100_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(n) = cluster.count_backends(&BackendFilter::all()).await {
                    peak.fetch_max(n, Ordering::SeqCst);
                }
                if let Ok(servers) = bouncer.show("SHOW SERVERS").await {
                    peak_bouncer.fetch_max(servers.len(), Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let statuses = Arc::new(Mutex::new(HashMap::<u16, u64>::new()));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut tasks = Vec::new();
    for u in 0..100 {
        let (client, base, statuses, failures) = (
            client.clone(),
            server.base.clone(),
            statuses.clone(),
            failures.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let user = format!("pooled{u}");
            for i in 0..20 {
                let (path, body) = match i % 3 {
                    0 => (
                        "messages",
                        json!({"session_id": "s", "messages": [{"role": "user", "content": format!("item {i} of {user}")}]}),
                    ),
                    1 => ("facts", json!({"facts": [format!("fact {i} for {user}")]})),
                    _ => ("query", json!({"query": format!("item {i} fact"), "top_k": 5})),
                };
                let r = client
                    .post(format!("{base}/users/{user}/{path}"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                *statuses.lock().unwrap().entry(status).or_default() += 1;
                if status >= 500 {
                    let text = r.text().await.unwrap_or_default();
                    failures.lock().unwrap().push(text);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    sampler.await.unwrap();
    let statuses = statuses.lock().unwrap().clone();
    let failures = failures.lock().unwrap().clone();
    let peak = peak.load(Ordering::SeqCst);
    let peak_bouncer = peak_bouncer.load(Ordering::SeqCst);
    eprintln!(
        "behind PgBouncer: statuses {statuses:?}, server backends peak {peak}, \
         PgBouncer's server connections peak {peak_bouncer}"
    );
    assert!(
        peak_bouncer as u32 <= bouncer.pool_size(),
        "{}",
        bouncer.log_tail(40)
    );
    assert!(
        failures.is_empty(),
        "{} 5xx, first: {:?}",
        failures.len(),
        failures.first()
    );
    let successes: u64 = statuses
        .iter()
        .filter(|(status, _)| (200..300).contains(*status))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(successes, 2000, "{statuses:?}");
    // At most PgBouncer's pool; the server's count may lag by one for the
    // moment a backend whose connection PgBouncer replaced takes to exit.
    assert!(
        (1..=bouncer.pool_size() as usize + 1).contains(&peak),
        "peak backends {peak} for a PgBouncer pool of {}; its log:\n{}",
        bouncer.pool_size(),
        bouncer.log_tail(40)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_error_is_answered_with_the_servers_words() {
    let cluster = TempCluster::start().unwrap();
    let server = Server::start(&cluster, 30);
    let client = reqwest::Client::new();
    server.wait_ready(&client).await;
    // The service's table disappears under it.
    cluster
        .execute("DROP TABLE m2_facts CASCADE")
        .await
        .unwrap();
    let (status, body) = post(
        &client,
        server.url("/users/alice/facts"),
        json!({"facts": ["a fact"]}),
    )
    .await;
    assert_eq!(status, 500, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("relation \"m2_facts\" does not exist") && message.contains("42P01"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_under_load_needs_no_restart() {
    let primary = TempCluster::builder().replication().start().unwrap();
    let standby = primary.start_standby().unwrap();
    let url = format!(
        "postgres://postgres:{}@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
        TempCluster::superuser_password(),
        primary.port(),
        standby.port()
    );
    let mut server = Server::start_url(&url, 10);
    let client = reqwest::Client::new();
    server.wait_ready(&client).await;

    // 20 users write and search without pause; every answer is recorded.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answers = Arc::new(Mutex::new(Vec::<(Instant, u16)>::new()));
    let mut tasks = Vec::new();
    for u in 0..20 {
        let (client, base, answers, stop) = (
            client.clone(),
            server.base.clone(),
            answers.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let user = format!("failover{u}");
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let (path, body) = match i % 2 {
                    0 => ("facts", json!({"facts": [format!("fact {i} of {user}")]})),
                    _ => ("query", json!({"query": format!("fact {i}"), "top_k": 3})),
                };
                let status = match client
                    .post(format!("{base}/users/{user}/{path}"))
                    .json(&body)
                    .timeout(Duration::from_secs(30))
                    .send()
                    .await
                {
                    Ok(r) => r.status().as_u16(),
                    Err(_) => 0,
                };
                answers.lock().unwrap().push((Instant::now(), status));
                if status != 200 && status != 201 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let killed = Instant::now();
    primary.kill().unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    standby.promote().unwrap();
    let promoted = Instant::now();
    tokio::time::sleep(Duration::from_millis(4000)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let answers = answers.lock().unwrap().clone();
    let ok = |s: u16| s == 200 || s == 201;
    let before = answers.iter().filter(|(at, _)| *at < killed).count();
    let bad: Vec<&(Instant, u16)> = answers.iter().filter(|(_, s)| !ok(*s)).collect();
    let recovered = answers
        .iter()
        .filter(|(at, s)| *at >= promoted && ok(*s) && answers.iter().any(|(b, _)| b > at))
        .map(|(at, _)| *at)
        .min()
        .expect("answers after the promotion");
    let after = answers
        .iter()
        .filter(|(at, _)| *at > promoted + Duration::from_secs(2))
        .count();
    println!(
        "SERVE_FAILOVER requests={} before_kill={before} not_2xx={} first_2xx_after_promote={}ms answered_after_promote_plus_2s={after}",
        answers.len(),
        bad.len(),
        recovered.saturating_duration_since(promoted).as_millis(),
    );
    for (at, status) in &bad {
        assert!(
            *at >= killed && *at <= promoted + Duration::from_secs(2),
            "a {status} outside the failover window"
        );
    }
    assert!(after > 0);
    assert!(recovered.saturating_duration_since(promoted) < Duration::from_secs(2));
    // The same process, never restarted, ready, on the new primary.
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "serve is running"
    );
    let health = client.get(server.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let (status, body) = post(
        &client,
        server.url("/users/failover0/facts"),
        json!({"facts": ["after the failover"]}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (db, conn) = tokio_postgres::connect(&standby.url("postgres"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let stored: i64 = db
        .query_one(
            "SELECT count(*) FROM m2_facts WHERE content = 'after the failover'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 1);
    assert_eq!(server.terminate(), Some(0));
}
