//! The HTTP layer: OpenAI-compatible routes plus tilt's `alignment` extension. It knows HTTP and
//! the wire formats, not tensors: requests are validated into `decode::Generation`s here
//! (`validate`), handed to the engine, and its events written back as JSON or server-sent events.
//! `openapi.yaml` at the repository root is the contract; docs/api.md lists which OpenAI fields are
//! implemented, ignored or rejected.

pub mod auth;
mod chat;
mod completions;
mod error;
mod json;
pub mod metrics;
mod request_id;
mod routes;
mod run;
mod score;
mod stream;
mod validate;
mod wire;

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::engine::Engine;
use crate::model::Vocab;
use error::ApiError;

/// Server-wide limits on what one request may ask, beyond the model's own context (`tilt serve`
/// flags). Decoders' own limits (candidates, beams, lookahead, iterations) are theirs.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Request body bytes (413 beyond); the default is ample for a full context of token ids.
    pub body_bytes: usize,
    /// Tokens of one prompt (None: the context's).
    pub prompt_tokens: Option<usize>,
    /// Tokens one choice may generate (None: what the context leaves).
    pub output_tokens: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            body_bytes: 1 << 20,
            prompt_tokens: None,
            output_tokens: None,
        }
    }
}

/// What every handler shares. The engine is set once the model has loaded; until then the routes
/// that need it answer 503.
#[derive(Clone)]
pub struct AppState {
    engine: Arc<OnceLock<Engine>>,
    metrics: PrometheusHandle,
    keys: Arc<auth::Keys>,
    /// The longest a generation request may take (`--request-timeout`).
    request_timeout: Option<std::time::Duration>,
    limits: Limits,
    /// Unix time the server started (the models' `created`).
    started: u64,
}

impl AppState {
    pub fn new(metrics: PrometheusHandle) -> Self {
        Self {
            engine: Arc::default(),
            metrics,
            keys: Arc::default(),
            request_timeout: None,
            limits: Limits::default(),
            started: now(),
        }
    }

    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// End every generation request after `limit` at most, with what it produced.
    pub fn with_request_timeout(mut self, limit: Option<std::time::Duration>) -> Self {
        self.request_timeout = limit;
        self
    }

    /// Require one of `keys` (none: the server is open).
    pub fn with_keys(mut self, keys: auth::Keys) -> Self {
        self.keys = Arc::new(keys);
        self
    }

    /// Serve with `engine` from now on.
    pub fn ready(&self, engine: Engine) {
        if self.engine.set(engine).is_err() {
            tracing::warn!("the engine was already set; keeping the first");
        }
    }

    fn engine(&self) -> Result<&Engine, ApiError> {
        self.engine.get().ok_or_else(ApiError::loading)
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(routes::playground))
        .route("/v1/completions", post(completions::create))
        .route("/v1/chat/completions", post(chat::create))
        .route("/v1/models", get(routes::models))
        .route("/v1/rewards", get(routes::rewards))
        .route("/v1/score", post(score::create))
        .route("/health", get(routes::health))
        .route("/tokenize", post(routes::tokenize))
        .route("/detokenize", post(routes::detokenize))
        .route("/tokenizer_info", get(routes::tokenizer_info))
        .route("/metrics", get(routes::metrics))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(state.limits.body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ))
        .layer(axum::middleware::from_fn(metrics::track_http))
        .layer(axum::middleware::from_fn(request_id::assign))
        .with_state(state)
}

/// Serve on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Without TCP_NODELAY, Nagle's algorithm holds small SSE chunks back (tens of ms of TTFT).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// A fresh response id such as `chatcmpl-3f2a…`.
fn id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A token as text for logprobs: its bytes (lossy where a character spans tokens), or the
/// control token's name.
fn token_string(vocab: &Vocab, id: u32) -> String {
    match vocab.bytes(id) {
        [] => vocab.text(id).to_string(),
        bytes => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// The bytes a token adds to the text (none for control tokens), so that a choice's tokens'
/// bytes always rebuild its text, characters split across tokens included.
fn token_bytes(vocab: &Vocab, id: u32) -> Vec<u8> {
    vocab.bytes(id).to_vec()
}
