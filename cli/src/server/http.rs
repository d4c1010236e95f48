//! The HTTP endpoints: `POST /v1/predict`, `GET /healthz`, `GET /metrics`, `GET /v1/model`.

use super::App;
use super::batcher::{Job, Refused};
use super::metrics::Gauges;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use dlrm::predict::{parse_json_rows, parse_tsv_rows};
use std::sync::Arc;
use std::time::Instant;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/v1/model", get(model))
        .route("/v1/predict", post(predict))
        .with_state(app)
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let served = app.current();
    let text = app.metrics.render(&Gauges {
        version: &served.name,
        step: served.meta.train_state.step,
        queued_rows: app.queue.rows(),
        peak_rss_bytes: dlrm::train::peak_rss_bytes(),
    });
    let kind = "text/plain; version=0.0.4; charset=utf-8";
    ([(header::CONTENT_TYPE, kind)], text).into_response()
}

async fn model(State(app): State<Arc<App>>) -> Response {
    json(StatusCode::OK, &app.current().describe())
}

fn json(code: StatusCode, value: &serde_json::Value) -> Response {
    let kind = [(header::CONTENT_TYPE, "application/json")];
    (code, kind, format!("{value}\n")).into_response()
}

/// `{"version": ..., "probabilities": [...]}`, each probability written as `predict` writes
/// it (the shortest decimal that reads back as the same f32; `null` for NaN).
fn answer(version: &str, probs: &[f32]) -> Response {
    use std::fmt::Write as _;
    let mut text = format!(
        "{{\"version\":{},\"probabilities\":[",
        serde_json::json!(version)
    );
    for (i, p) in probs.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = match p.is_finite() {
            true => write!(text, "{sep}{p}"),
            false => write!(text, "{sep}null"),
        };
    }
    text.push_str("]}\n");
    let kind = [(header::CONTENT_TYPE, "application/json")];
    (StatusCode::OK, kind, text).into_response()
}

/// A request that gets no probabilities: its status and what to tell the client.
struct Failure(StatusCode, String);

/// How a request body writes its rows.
enum BodyFormat {
    Tsv,
    Json,
}

/// The format the Content-Type names: JSON, or Criteo's tab-separated lines (text, or no type).
fn body_format(headers: &HeaderMap) -> Result<BodyFormat, Failure> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(BodyFormat::Tsv);
    };
    let kind = value.to_str().unwrap_or("");
    let essence = kind
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => Ok(BodyFormat::Json),
        "text/tab-separated-values" | "text/plain" => Ok(BodyFormat::Tsv),
        _ => Err(Failure(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "Content-Type {kind:?}: send Criteo lines as text/tab-separated-values (or text/plain) or rows as application/json"
            ),
        )),
    }
}

/// `POST /v1/predict`: the rows' probabilities in request order, as
/// `{"version": ..., "probabilities": [...]}`; errors as `{"error": ...}`.
async fn predict(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    let arrived = Instant::now();
    let (code, rows, response) = match score(&app, arrived, &headers, body).await {
        Ok((version, probs)) => (StatusCode::OK, probs.len(), answer(&version, &probs)),
        Err(Failure(code, error)) => (code, 0, json(code, &serde_json::json!({ "error": error }))),
    };
    let seconds = arrived.elapsed().as_secs_f64();
    app.metrics.request(code.as_u16(), seconds, rows);
    response
}

/// Reads, parses and queues a request's rows, and waits for their probabilities (until the
/// request's deadline).
async fn score(
    app: &App,
    arrived: Instant,
    headers: &HeaderMap,
    body: Body,
) -> Result<(String, Vec<f32>), Failure> {
    let deadline = arrived + app.timeout;
    let format = body_format(headers)?;
    // A bounded number of requests read, hold and wait for their rows at a time.
    let Ok(_permit) = app.bodies.try_acquire() else {
        return Err(Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many requests in flight: retry later".into(),
        ));
    };
    let limit = app.max_body_bytes;
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        let over = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if over {
            let why = format!("the body is over --max-body-bytes ({limit} bytes)");
            Failure(StatusCode::PAYLOAD_TOO_LARGE, why)
        } else {
            Failure(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
            )
        }
    })?;
    let mut rows = Vec::new();
    match format {
        BodyFormat::Tsv => parse_tsv_rows(&bytes, &mut rows),
        BodyFormat::Json => parse_json_rows(&bytes, &mut rows),
    }
    .map_err(|e| Failure(StatusCode::BAD_REQUEST, e.to_string()))?;
    drop(bytes);
    let served = app.current();
    let version = served.name.clone();
    let (reply, answer) = tokio::sync::oneshot::channel();
    let num_rows = rows.len();
    let job = Job {
        rows,
        served,
        deadline,
        reply,
    };
    app.queue.push(job).map_err(|refused| match refused {
        Refused::Full => Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "the queue is full: retry later".into(),
        ),
        Refused::TooLarge => Failure(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request has {num_rows} rows, more than --queue-rows ({})",
                app.queue.capacity_rows()
            ),
        ),
        Refused::Closed => Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down".into(),
        ),
    })?;
    let timed_out = || {
        let ms = app.timeout.as_millis();
        Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not scored within --timeout-ms ({ms} ms)"),
        )
    };
    match tokio::time::timeout_at(deadline.into(), answer).await {
        Ok(Ok(Ok(probs))) => Ok((version, probs)),
        Ok(Ok(Err(e))) => Err(Failure(StatusCode::INTERNAL_SERVER_ERROR, e)),
        // The inference thread dropped the job: it found it past its deadline.
        Ok(Err(_)) | Err(_) => Err(timed_out()),
    }
}
