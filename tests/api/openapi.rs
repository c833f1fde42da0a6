//! The contract: every response any case receives is checked against `openapi.yaml` (by
//! `server::Client`), and the cases here make sure each route and status the spec describes is
//! exercised, and that the checker itself rejects a broken response.

use std::sync::LazyLock;

use serde_json::{json, Value};

use crate::cases;
use crate::server::{Client, Reply};

static SPEC: LazyLock<Value> = LazyLock::new(|| {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml");
    let text = std::fs::read_to_string(path).expect("reading openapi.yaml");
    let doc: Value = serde_yaml_ng::from_str(&text).expect("openapi.yaml parses");
    assert_eq!(doc["openapi"], "3.1.0");
    doc
});

/// JSON-pointer escaping of one reference token.
fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// `pointer` with every `$ref` met on the way followed (`responses/400` is often a reference).
fn resolve(pointer: &str) -> Result<String, String> {
    let mut at = String::new();
    for token in pointer.split('/').skip(1) {
        at = format!("{at}/{token}");
        let node = SPEC
            .pointer(&at)
            .ok_or_else(|| format!("openapi.yaml has nothing at {at}"))?;
        if let Some(target) = node.get("$ref").and_then(Value::as_str) {
            at = target.trim_start_matches('#').to_string();
        }
    }
    Ok(at)
}

/// Validate `instance` against the schema at `pointer` inside the spec (so `$ref`s resolve).
fn validate(pointer: &str, instance: &Value) -> Result<(), String> {
    let pointer = resolve(pointer)?;
    let mut root = SPEC.clone();
    root["$ref"] = Value::String(format!("#{pointer}"));
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&root)
        .map_err(|e| format!("the schema at {pointer} does not compile: {e}"))?;
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{instance} does not match {pointer}: {}",
            errors.join("; ")
        ))
    }
}

/// Where the spec describes `method path` answering `status` with `content_type`.
fn media_pointer(method: &str, path: &str, status: u16, content_type: &str) -> String {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    format!(
        "/paths/{}/{}/responses/{status}/content/{}",
        escape(path),
        method.to_ascii_lowercase(),
        escape(essence)
    )
}

/// Check a reply against the spec. Routes and methods the spec does not describe must answer
/// 404 and 405 errors.
pub fn check(method: &str, path: &str, reply: &Reply) -> Result<(), String> {
    let Some(route) = SPEC["paths"].get(path) else {
        if reply.status != 404 {
            return Err(format!(
                "{path} is not in the spec, yet answered {}",
                reply.status
            ));
        }
        return validate("/components/schemas/ErrorResponse", &reply.body);
    };
    if route.get(method.to_ascii_lowercase()).is_none() {
        if reply.status != 405 {
            return Err(format!(
                "{method} {path} is not in the spec, yet answered {}",
                reply.status
            ));
        }
        return validate("/components/schemas/ErrorResponse", &reply.body);
    }
    let media = media_pointer(method, path, reply.status.as_u16(), &reply.content_type);
    validate(&format!("{media}/schema"), &reply.body)
}

/// Check the `data` payloads of an event stream (all but the closing `[DONE]`).
pub fn check_stream(path: &str, events: &[Value]) -> Result<(), String> {
    let media = media_pointer("post", path, 200, "text/event-stream");
    let (last, chunks) = events.split_last().ok_or("an empty stream")?;
    if last != "[DONE]" {
        return Err(format!("the stream ends with {last}, not [DONE]"));
    }
    chunks
        .iter()
        .try_for_each(|c| validate(&format!("{media}/x-data-schema"), c))
}

pub fn cases() -> Vec<(&'static str, crate::Case)> {
    cases![
        every_route_in_the_spec_answers_as_described,
        checker_rejects_broken_responses
    ]
}

/// One request per route the spec lists (the client checks each reply against the spec).
async fn every_route_in_the_spec_answers_as_described(c: Client) {
    let requests: Vec<(&str, &str, Value)> = vec![
        (
            "post",
            "/v1/completions",
            json!({"prompt": "Hi", "max_tokens": 2, "logprobs": 2, "echo": true}),
        ),
        (
            "post",
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "logprobs": true, "top_logprobs": 2}),
        ),
        ("get", "/v1/models", Value::Null),
        ("get", "/v1/rewards", Value::Null),
        ("get", "/health", Value::Null),
        ("post", "/tokenize", json!({"prompt": "Hi"})),
        ("post", "/detokenize", json!({"tokens": [1, 2, 3]})),
        ("get", "/tokenizer_info", Value::Null),
        (
            "post",
            "/v1/score",
            json!({"prompt": "Hi", "responses": [" there", " you"], "rewards": ["sentiment"]}),
        ),
        ("get", "/metrics", Value::Null),
        ("get", "/", Value::Null),
    ];
    let described: Vec<(String, String)> = SPEC["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .map(move |method| (method.clone(), path.clone()))
        })
        .collect();
    for (method, path) in &described {
        assert!(
            requests.iter().any(|(m, p, _)| m == method && p == path),
            "no request exercises {method} {path}"
        );
    }
    for (method, path, body) in requests {
        let reply = match method {
            "get" => c.get(path).await,
            _ => c.post(path, &body).await,
        };
        assert_eq!(reply.status, 200, "{method} {path}: {:?}", reply.body);
        // A method the route does not take.
        let other = match method {
            "get" => c.send("POST", path, c.http.post(c.url(path))).await,
            _ => c.send("GET", path, c.http.get(c.url(path))).await,
        };
        assert_eq!(other.status, 405, "{path}");
    }
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let body = if path == "/v1/completions" {
            json!({"prompt": "Hi", "max_tokens": 2, "stream": true, "logprobs": 1, "echo": true, "stream_options": {"include_usage": true}})
        } else {
            json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": true, "logprobs": true, "top_logprobs": 1, "stream_options": {"include_usage": true}})
        };
        c.stream(path, &body).await;
    }
}

/// A change that breaks a valid response.
type Edit = fn(&mut Value);

async fn checker_rejects_broken_responses(c: Client) {
    let path = "/v1/chat/completions";
    let reply = c
        .post(
            path,
            &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
        )
        .await;
    assert_eq!(check("POST", path, &reply), Ok(()));
    let broken = |edit: Edit| {
        let mut body = reply.body.clone();
        edit(&mut body);
        check(
            "POST",
            path,
            &Reply {
                body,
                ..reply.clone()
            },
        )
    };
    let cases: [(&str, Edit); 5] = [
        ("missing usage", |b| {
            b.as_object_mut().unwrap().remove("usage");
        }),
        ("index as a string", |b| {
            b["choices"][0]["index"] = json!("0")
        }),
        ("unknown finish reason", |b| {
            b["choices"][0]["finish_reason"] = json!("eos")
        }),
        ("undocumented field", |b| b["extra"] = json!(1)),
        ("content null", |b| {
            b["choices"][0]["message"]["content"] = Value::Null
        }),
    ];
    for (what, edit) in cases {
        assert!(
            broken(edit).is_err(),
            "the checker accepted a response with {what}"
        );
    }
    let error = Reply {
        status: reqwest::StatusCode::BAD_REQUEST,
        content_type: "application/json".into(),
        body: json!({"error": {"message": "x", "type": "invalid_request_error", "param": null}}),
    };
    assert!(
        check("POST", path, &error).is_err(),
        "an error without `code`"
    );
}
