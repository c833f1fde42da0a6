//! Prometheus metrics, named like vLLM's (so existing dashboards apply) with a `tilt:` prefix and a
//! `model_name` label; plus HTTP request counts by route pattern (never the raw path, which would
//! let clients mint labels).

use std::time::Duration;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::engine::Engine;

pub const TIME_TO_FIRST_TOKEN: &str = "tilt:time_to_first_token_seconds";
pub const INTER_TOKEN_LATENCY: &str = "tilt:inter_token_latency_seconds";
pub const E2E_REQUEST_LATENCY: &str = "tilt:e2e_request_latency_seconds";
pub const REQUEST_QUEUE_TIME: &str = "tilt:request_queue_time_seconds";
pub const NUM_REQUESTS_RUNNING: &str = "tilt:num_requests_running";
pub const NUM_REQUESTS_WAITING: &str = "tilt:num_requests_waiting";
pub const PROMPT_TOKENS: &str = "tilt:prompt_tokens_total";
pub const GENERATION_TOKENS: &str = "tilt:generation_tokens_total";
pub const REQUEST_SUCCESS: &str = "tilt:request_success_total";
pub const REQUEST_REJECTED: &str = "tilt:request_rejected_total";
pub const HTTP_REQUESTS: &str = "tilt:http_requests_total";

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0, 120.0,
];
const TOKEN_LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.0,
];

/// Install the process-wide recorder; the handle renders `/metrics`.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(INTER_TOKEN_LATENCY.into()),
            TOKEN_LATENCY_BUCKETS,
        )?
        .set_buckets(LATENCY_BUCKETS)?
        .install_recorder()?;
    describe_histogram!(
        TIME_TO_FIRST_TOKEN,
        Unit::Seconds,
        "From request arrival to the first generated token."
    );
    describe_histogram!(
        INTER_TOKEN_LATENCY,
        Unit::Seconds,
        "Between consecutive tokens of one choice."
    );
    describe_histogram!(
        E2E_REQUEST_LATENCY,
        Unit::Seconds,
        "From request arrival to its last token."
    );
    describe_histogram!(
        REQUEST_QUEUE_TIME,
        Unit::Seconds,
        "Time a request waited for the engine to admit it."
    );
    describe_gauge!(NUM_REQUESTS_RUNNING, "Requests the engine is stepping.");
    describe_gauge!(NUM_REQUESTS_WAITING, "Requests waiting for admission.");
    describe_counter!(PROMPT_TOKENS, "Prompt tokens of admitted requests.");
    describe_counter!(GENERATION_TOKENS, "Generated tokens.");
    describe_counter!(REQUEST_SUCCESS, "Choices that finished, by finish reason.");
    describe_counter!(
        REQUEST_REJECTED,
        "Requests refused with 429 because the queue was full."
    );
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests by route pattern, method and status."
    );
    // Histograms keep their samples until rendered; drain them even when nobody scrapes.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// Set the engine's gauges; called right before rendering so they are current.
pub fn sample_load(engine: &Engine) {
    use std::sync::atomic::Ordering;
    let model = engine.base().name.clone();
    gauge!(NUM_REQUESTS_RUNNING, "model_name" => model.clone())
        .set(engine.load.running.load(Ordering::Relaxed) as f64);
    gauge!(NUM_REQUESTS_WAITING, "model_name" => model)
        .set(engine.load.waiting.load(Ordering::Relaxed) as f64);
}

/// Middleware: count every response by route pattern, method and status.
pub async fn track_http(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = request.method().to_string();
    let response = next.run(request).await;
    counter!(
        HTTP_REQUESTS,
        "route" => route,
        "method" => method,
        "status" => response.status().as_u16().to_string()
    )
    .increment(1);
    response
}
