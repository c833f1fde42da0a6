//! API keys: with any configured, every route but the playground page `/`, `/health` (and
//! `/metrics`, unless it is made private) needs `Authorization: Bearer KEY`. Keys are compared in constant time and never
//! logged or echoed.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;

/// The keys a server accepts, and whether `/metrics` needs one too.
#[derive(Default)]
pub struct Keys {
    keys: Vec<Vec<u8>>,
    private_metrics: bool,
}

impl Keys {
    /// Blank keys are dropped (a stray newline in a key file must not open the server).
    pub fn new(keys: impl IntoIterator<Item = String>, private_metrics: bool) -> Self {
        Self {
            keys: (keys.into_iter())
                .map(|k| k.trim().as_bytes().to_vec())
                .filter(|k| !k.is_empty())
                .collect(),
            private_metrics,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether `path` answers without a key.
    fn public(&self, path: &str) -> bool {
        path == "/" || path == "/health" || (path == "/metrics" && !self.private_metrics)
    }

    /// Whether `given` is one of the keys; every key is compared, each in constant time.
    fn accepts(&self, given: &[u8]) -> bool {
        (self.keys.iter()).fold(false, |ok, k| {
            ok | constant_time_eq::constant_time_eq(k, given)
        })
    }
}

/// Middleware: 401 in the OpenAI shape for a request without an accepted key.
pub async fn require_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let keys = &state.keys;
    if keys.is_empty() || keys.public(request.uri().path()) {
        return next.run(request).await;
    }
    let given = (request.headers().get(header::AUTHORIZATION))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(key) if keys.accepts(key.as_bytes()) => next.run(request).await,
        Some(_) => ApiError::unauthorized("the API key is not valid").into_response(),
        None => {
            ApiError::unauthorized("an API key is required: send it as `Authorization: Bearer KEY`")
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_configured_key_is_accepted_and_nothing_else() {
        let keys = Keys::new(["alpha".to_string(), " beta\n".into(), "".into()], false);
        assert!(keys.accepts(b"alpha") && keys.accepts(b"beta"));
        assert!(!keys.accepts(b"alph") && !keys.accepts(b"") && !keys.accepts(b"alphaa"));
        assert!(keys.public("/") && keys.public("/health") && keys.public("/metrics"));
        assert!(!keys.public("/v1/models") && !keys.public("/tokenize"));
        assert!(!Keys::new(["k".to_string()], true).public("/metrics"));
        assert!(Keys::new(["\n".to_string()], false).is_empty());
    }
}
