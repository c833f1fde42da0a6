//! Reading request bodies: JSON only, within the body limit, and every type error named by the
//! JSON path of the offending field (axum's `Json` answers 422 without naming it).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ApiError;
use super::AppState;

/// A request body that is a JSON object.
pub struct JsonBody(pub Value);

impl FromRequest<AppState> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        if !is_json(req.headers()) {
            return Err(ApiError::unsupported_media_type());
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large(state.limits.body_bytes)
            } else {
                ApiError::malformed(None, e.body_text())
            }
        })?;
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::malformed(None, format!("the body is not valid JSON: {e}")))?;
        if !value.is_object() {
            return Err(ApiError::malformed(None, "the body must be a JSON object"));
        }
        let mut value = value;
        integral_numbers(&mut value);
        Ok(Self(value))
    }
}

impl JsonBody {
    /// The body as `T`; fields `T` does not name are ignored.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        serde_path_to_error::deserialize(&self.0).map_err(|e| {
            let path = e.path().to_string();
            let message = e.into_inner().to_string();
            if path == "." {
                ApiError::malformed(None, message)
            } else {
                ApiError::malformed(Some(path.clone()), format!("`{path}`: {message}"))
            }
        })
    }
}

/// `application/json`, with or without parameters, or any `+json` type.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Numbers written with a zero fraction (`16.0`) as integers: JSON Schema, and so the API's
/// contract, counts them as integers, and clients that hold every number as a float send them.
/// serde_json's depth limit bounds the recursion.
fn integral_numbers(value: &mut Value) {
    match value {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            // Within ±2^53 every integer is exact in a double.
            if f.fract() == 0.0 && f.abs() <= 9_007_199_254_740_992.0 {
                *value = Value::from(f as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_numbers),
        Value::Object(fields) => fields.values_mut().for_each(integral_numbers),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integral_floats_become_integers_and_others_stay() {
        let mut v = serde_json::json!({"n": 2.0, "t": 0.7, "ids": [1.0, -3.0], "big": 1e300,
                                       "nested": {"k": 4.0}, "s": "5.0"});
        integral_numbers(&mut v);
        assert_eq!(
            v,
            serde_json::json!({"n": 2, "t": 0.7, "ids": [1, -3], "big": 1e300,
                               "nested": {"k": 4}, "s": "5.0"})
        );
    }
}
