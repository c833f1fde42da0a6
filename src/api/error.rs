//! Errors in the OpenAI shape: `{"error": {"message", "type", "param", "code"}}`, with `code` a
//! string or null. Client mistakes are 4xx and never 5xx, because OpenAI clients retry 5xx.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::decode::ParamError;
use crate::engine::EngineError;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
pub struct ErrorResponse<'a> {
    pub error: &'a ErrorBody,
}

impl ApiError {
    fn new(
        status: StatusCode,
        kind: &'static str,
        code: Option<&'static str>,
        param: Option<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            body: ErrorBody {
                message: message.into(),
                kind,
                param,
                code,
            },
        }
    }

    /// 400: a parameter has a value tilt cannot use.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("invalid_value"),
            Some(param.into()),
            message,
        )
    }

    /// 400: a required parameter is absent.
    pub fn missing(param: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("missing_required_parameter"),
            Some(param.into()),
            format!("`{param}` is required"),
        )
    }

    /// 400: the body is not the JSON this route takes (`param` is the JSON path, when known).
    pub fn malformed(param: Option<String>, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            param,
            message,
        )
    }

    /// 400: a parameter tilt does not implement was given a value.
    pub fn unsupported(param: &str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("unsupported_parameter"),
            Some(param.into()),
            message,
        )
    }

    /// 400: prompt plus completion do not fit the model's context.
    pub fn context_length(param: &str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("context_length_exceeded"),
            Some(param.into()),
            message,
        )
    }

    pub fn model_not_found(name: &str, served: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("model_not_found"),
            Some("model".into()),
            format!("the model `{name}` does not exist; this server serves `{served}`"),
        )
    }

    pub fn route_not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("unknown_url"),
            None,
            format!("no route {path}"),
        )
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            Some("method_not_allowed"),
            None,
            "this route does not take that method",
        )
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            Some("request_too_large"),
            None,
            format!("the request body exceeds {limit} bytes"),
        )
    }

    pub fn unsupported_media_type() -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            Some("unsupported_media_type"),
            None,
            "the request body must be JSON (Content-Type: application/json)",
        )
    }

    /// 503: the model is still loading; clients may retry.
    pub fn loading() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            Some("model_loading"),
            None,
            "the model is loading; retry shortly",
        )
    }

    /// 503: the engine has stopped (the server is shutting down); clients may retry elsewhere.
    pub fn stopping() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            Some("server_stopping"),
            None,
            "the server is stopping",
        )
    }

    /// 401: no API key, or one the server does not accept (never echoed).
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_api_key"),
            None,
            message,
        )
    }

    /// 429: the queue is full; clients may retry (the official client does, after
    /// `Retry-After`).
    pub fn busy(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "requests",
            Some("rate_limit_exceeded"),
            None,
            message,
        )
    }

    /// 500: tilt's own failure, never a client's.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            None,
            None,
            message,
        )
    }

    /// The JSON body, also sent as an SSE event when a stream fails midway.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&ErrorResponse { error: &self.body })
            .expect("an error body always serializes")
    }
}

/// 400 for a decoder parameter, named by its path in the `alignment` object.
impl From<ParamError> for ApiError {
    fn from(e: ParamError) -> Self {
        let param = e
            .param
            .map_or_else(|| "alignment".to_string(), |p| format!("alignment.{p}"));
        Self::invalid(param, e.message)
    }
}

/// What each engine failure is to a client: a stopping engine or a full queue may be retried,
/// anything else is tilt's fault (requests are validated before they reach the engine).
impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Stopped => Self::stopping(),
            EngineError::Busy { .. } => Self::busy(e.to_string()),
            EngineError::Decoder(_) | EngineError::Forward { .. } => Self::internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            self.to_json(),
        )
            .into_response();
        if matches!(
            self.status,
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
        ) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
