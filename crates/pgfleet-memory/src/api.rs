//! The HTTP API of the memory service, and how the service's errors become
//! responses.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::app::{App, Phase};
use crate::error::MemoryError;
use crate::services::{tsquery, Message};

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 64 * 1024;

/// The routes.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/users/{user_id}/messages", post(add_messages))
        .route("/users/{user_id}/facts", post(add_facts))
        .route("/users/{user_id}/query", post(query))
        .route("/stats", get(stats))
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(log_request))
        .with_state(app)
}

async fn log_request(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    tracing::debug!(%method, %path, status = response.status().as_u16(), elapsed = ?started.elapsed(), "request");
    response
}

/// An error response: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug)]
pub enum ApiError {
    /// 400: the request is wrong; the message says how.
    BadRequest(String),
    /// 413: the body is over [`BODY_LIMIT`].
    TooLarge,
    /// 503: the database cannot be reached now.
    Unavailable(String),
    /// 500: anything else.
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, "bad_request", m),
            ApiError::TooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the request body is larger than {BODY_LIMIT} bytes"),
            ),
            ApiError::Unavailable(m) => {
                (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable", m)
            }
            ApiError::Internal(m) => {
                tracing::error!(error = %m, "request failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal", m)
            }
        };
        (
            status,
            Json(json!({"error": {"code": code, "message": message}})),
        )
            .into_response()
    }
}

impl From<MemoryError> for ApiError {
    fn from(e: MemoryError) -> Self {
        match e {
            MemoryError::Unavailable(_) => ApiError::Unavailable(e.to_string()),
            MemoryError::Database(_) | MemoryError::Config(_) => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::BytesRejection(_) => ApiError::TooLarge,
            JsonRejection::JsonSyntaxError(e) => {
                ApiError::BadRequest(format!("malformed JSON: {}", e.body_text()))
            }
            JsonRejection::JsonDataError(e) => {
                ApiError::BadRequest(format!("invalid request: {}", e.body_text()))
            }
            JsonRejection::MissingJsonContentType(_) => ApiError::BadRequest(
                "expected a JSON body with Content-Type: application/json".into(),
            ),
            other => ApiError::BadRequest(other.body_text()),
        }
    }
}

/// User ids: 1 to 64 of letters, digits, `_`, `-`, `.`.
fn user_id(raw: &str) -> Result<&str, ApiError> {
    let ok = !raw.is_empty()
        && raw.len() <= 64
        && raw
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(raw)
    } else {
        Err(ApiError::BadRequest(format!(
            "invalid user id {raw:?}: expected 1 to 64 letters, digits, '_', '-' or '.'"
        )))
    }
}

fn text(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.trim().is_empty() {
        Err(ApiError::BadRequest(format!("{field} must not be empty")))
    } else if value.len() > max {
        Err(ApiError::BadRequest(format!(
            "{field} is longer than {max} bytes"
        )))
    } else {
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MessagesBody {
    session_id: String,
    messages: Vec<Message>,
}

async fn add_messages(
    State(app): State<Arc<App>>,
    Path(user): Path<String>,
    body: Result<Json<MessagesBody>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let user = user_id(&user)?;
    let Json(body) = body?;
    text("session_id", &body.session_id, 64)?;
    if body.messages.is_empty() || body.messages.len() > 100 {
        return Err(ApiError::BadRequest(
            "messages: expected 1 to 100 messages".into(),
        ));
    }
    for (i, m) in body.messages.iter().enumerate() {
        if !matches!(m.role.as_str(), "user" | "assistant" | "system") {
            return Err(ApiError::BadRequest(format!(
                "messages[{i}].role = {:?}: expected user, assistant or system",
                m.role
            )));
        }
        text(&format!("messages[{i}].content"), &m.content, 10_000)?;
    }
    let services = app.user(user).await?;
    let stored = services
        .add_messages(&body.session_id, &body.messages)
        .await?;
    Ok((StatusCode::CREATED, Json(stored)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FactsBody {
    facts: Vec<String>,
}

async fn add_facts(
    State(app): State<Arc<App>>,
    Path(user): Path<String>,
    body: Result<Json<FactsBody>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let user = user_id(&user)?;
    let Json(body) = body?;
    if body.facts.is_empty() || body.facts.len() > 100 {
        return Err(ApiError::BadRequest(
            "facts: expected 1 to 100 facts".into(),
        ));
    }
    for (i, f) in body.facts.iter().enumerate() {
        text(&format!("facts[{i}]"), f, 500)?;
    }
    let services = app.user(user).await?;
    let stored = services.add_facts(&body.facts).await?;
    Ok((StatusCode::CREATED, Json(json!({"stored": stored}))))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryBody {
    query: String,
    #[serde(default = "default_top_k")]
    top_k: i64,
}

fn default_top_k() -> i64 {
    5
}

async fn query(
    State(app): State<Arc<App>>,
    Path(user): Path<String>,
    body: Result<Json<QueryBody>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let started = Instant::now();
    let user = user_id(&user)?;
    let Json(body) = body?;
    text("query", &body.query, 1000)?;
    if !(1..=50).contains(&body.top_k) {
        return Err(ApiError::BadRequest(format!(
            "top_k = {}: expected 1 to 50",
            body.top_k
        )));
    }
    let tsquery = tsquery(&body.query).ok_or_else(|| {
        ApiError::BadRequest("query has no searchable words (letters or digits)".into())
    })?;
    let services = app.user(user).await?;
    let results = services.query(&tsquery, body.top_k as usize).await?;
    Ok(Json(json!({
        "results": results,
        "took_ms": started.elapsed().as_secs_f64() * 1000.0,
    })))
}

async fn stats(State(app): State<Arc<App>>) -> impl IntoResponse {
    Json(json!({
        "ready": app.is_ready(),
        "fleet": app.fleet().stats(),
        "services": app.service_stats(),
    }))
}

async fn metrics(State(app): State<Arc<App>>) -> Result<impl IntoResponse, ApiError> {
    use pgfleet::prometheus_client::encoding::text::encode;
    use pgfleet::prometheus_client::metrics::counter::Counter;
    use pgfleet::prometheus_client::metrics::gauge::Gauge;
    use pgfleet::prometheus_client::registry::Registry;
    let mut registry = Registry::default();
    pgfleet::FleetMetrics::new(app.fleet()).register(&mut registry);
    let cache = app.service_stats();
    let entries = Gauge::<i64>::default();
    entries.set(i64::try_from(cache.entries).unwrap_or(i64::MAX));
    let hits = Counter::<u64>::default();
    hits.inc_by(cache.hits);
    let misses = Counter::<u64>::default();
    misses.inc_by(cache.misses);
    let ours = registry.sub_registry_with_prefix("pgfleet");
    ours.register(
        "service_cache_entries",
        "Users with services created",
        entries,
    );
    ours.register(
        "service_cache_hits",
        "Service lookups served from the cache",
        hits,
    );
    ours.register(
        "service_cache_misses",
        "Service lookups that created services",
        misses,
    );
    let mut text = String::new();
    encode(&mut text, &registry).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    ))
}

async fn health(State(app): State<Arc<App>>) -> impl IntoResponse {
    match app.phase() {
        Phase::Starting | Phase::Serving => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "starting"})),
            )
        }
        Phase::Degraded(reason) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "degraded", "reason": reason})),
            )
        }
        Phase::Ready => {}
    }
    let stats = app.fleet().stats();
    let broken: Vec<String> = stats
        .pools
        .values()
        .filter(|p| p.gauges.size == p.gauges.connecting && p.last_connect_error.is_some())
        .map(|p| {
            format!(
                "{}: {}",
                p.url,
                p.last_connect_error.as_deref().unwrap_or_default()
            )
        })
        .collect();
    if broken.is_empty() {
        (StatusCode::OK, Json(json!({"status": "ready"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "degraded", "reason": broken.join("; ")})),
        )
    }
}

/// Serves the API on `listener` until `shutdown` completes, then lets the
/// requests in flight finish.
///
/// # Errors
/// The listener's I/O error.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(app))
        .with_graceful_shutdown(shutdown)
        .await
}
