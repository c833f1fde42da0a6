//! Client mistakes: each answered with a 4xx in the OpenAI error shape, naming the parameter.

use serde_json::{json, Value};

use crate::cases;
use crate::server::{Client, Reply};

pub fn cases() -> Vec<(&'static str, crate::Case)> {
    cases![
        invalid_values_name_their_parameter,
        missing_fields_and_wrong_types,
        malformed_bodies,
        unknown_model_is_404,
        context_overflow_is_400,
        unknown_decoder_lists_the_available_ones,
        unsupported_fields_are_rejected,
        unknown_route_and_method,
        tokenize_and_detokenize_errors,
        request_ids_are_echoed_or_assigned,
    ]
}

/// Assert an error reply: status, OpenAI shape, `param` and `code`.
fn assert_error(reply: &Reply, status: u16, param: Option<&str>, code: Option<&str>) {
    assert_eq!(reply.status, status, "{:?}", reply.body);
    let error = reply.body["error"].as_object().expect("an error object");
    let keys: Vec<&str> = error.keys().map(String::as_str).collect();
    assert_eq!(keys.len(), 4, "{keys:?}");
    assert!(!error["message"].as_str().unwrap().is_empty());
    assert!(error["type"].is_string());
    assert_eq!(error["param"].as_str(), param, "{:?}", reply.body);
    if code.is_some() {
        assert_eq!(error["code"].as_str(), code, "{:?}", reply.body);
    }
}

fn completion(extra: Value) -> Value {
    let mut body = json!({"prompt": "Hello", "max_tokens": 2});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

fn chat(extra: Value) -> Value {
    let mut body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

async fn invalid_values_name_their_parameter(c: Client) {
    let cases = [
        (json!({"max_tokens": 0}), "max_tokens"),
        (json!({"max_tokens": -5}), "max_tokens"),
        (json!({"n": 0}), "n"),
        (json!({"n": 17}), "n"),
        (json!({"temperature": 2.5}), "temperature"),
        (json!({"temperature": -0.1}), "temperature"),
        (json!({"top_p": 0}), "top_p"),
        (json!({"top_p": 1.5}), "top_p"),
        (json!({"top_k": -2}), "top_k"),
        (json!({"min_p": 1.5}), "min_p"),
        (json!({"repetition_penalty": 0}), "repetition_penalty"),
        (json!({"presence_penalty": 3}), "presence_penalty"),
        (json!({"frequency_penalty": -2.5}), "frequency_penalty"),
        (json!({"logprobs": 21}), "logprobs"),
        (json!({"logprobs": -1}), "logprobs"),
        (json!({"logit_bias": {"49152": 1}}), "logit_bias"),
        (json!({"logit_bias": {"banana": 1}}), "logit_bias"),
        (json!({"logit_bias": {"1": 101}}), "logit_bias"),
        (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
        (json!({"timeout": 0}), "timeout"),
        (json!({"stop": "x".repeat(257)}), "stop"),
        (
            json!({"alignment": {"decoder": "deal", "constraints": {"keywords": (0..17).map(|i| format!("w{i}")).collect::<Vec<_>>()}}}),
            "alignment.constraints.keywords",
        ),
        (
            json!({"alignment": {"decoder": "args", "constraints": {"keywords": ["y".repeat(65)]}}}),
            "alignment.constraints.keywords",
        ),
        (json!({"timeout": -1}), "timeout"),
        (json!({"prompt": ""}), "prompt"),
        (json!({"prompt": []}), "prompt"),
        (json!({"prompt": [49152]}), "prompt"),
        (json!({"prompt": ["a", "b", "c", "d", "e"], "n": 16}), "n"),
        (
            json!({"alignment": {"decoder": "sample", "beta": 1}}),
            "alignment.beta",
        ),
        (json!({"alignment": {"decoder": 7}}), "alignment.decoder"),
    ];
    for (extra, param) in cases {
        let reply = c.post("/v1/completions", &completion(extra.clone())).await;
        assert_error(&reply, 400, Some(param), None);
        assert!(
            reply.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains(param.rsplit('.').next().unwrap())
                || param == "logit_bias"
                || param == "prompt",
            "{extra}: {:?}",
            reply.body
        );
    }
    let cases = [
        (
            json!({"top_logprobs": 21, "logprobs": true}),
            "top_logprobs",
        ),
        (json!({"top_logprobs": 2}), "top_logprobs"),
        (json!({"max_completion_tokens": 0}), "max_completion_tokens"),
        (json!({"messages": []}), "messages"),
        (
            json!({"messages": [{"role": "robot", "content": "Hi"}]}),
            "messages[0].role",
        ),
    ];
    for (extra, param) in cases {
        let reply = c.post("/v1/chat/completions", &chat(extra)).await;
        assert_error(&reply, 400, Some(param), None);
    }
}

async fn missing_fields_and_wrong_types(c: Client) {
    let reply = c.post("/v1/completions", &json!({"max_tokens": 2})).await;
    assert_error(
        &reply,
        400,
        Some("prompt"),
        Some("missing_required_parameter"),
    );
    let reply = c
        .post("/v1/chat/completions", &json!({"max_tokens": 2}))
        .await;
    assert_error(
        &reply,
        400,
        Some("messages"),
        Some("missing_required_parameter"),
    );
    let wrong = [
        (json!({"temperature": "hot"}), "temperature"),
        (json!({"max_tokens": 1.5}), "max_tokens"),
        (json!({"n": "2"}), "n"),
        (json!({"stream": "yes"}), "stream"),
        (json!({"stop": 3}), "stop"),
        (json!({"seed": "x"}), "seed"),
        (json!({"logit_bias": [1]}), "logit_bias"),
        (json!({"prompt": [1, "a"]}), "prompt"),
        (json!({"prompt": [-1]}), "prompt"),
        (json!({"echo": 1}), "echo"),
        (json!({"alignment": "genarm"}), "alignment"),
        (
            json!({"stream_options": {"include_usage": "yes"}}),
            "stream_options.include_usage",
        ),
    ];
    for (extra, param) in wrong {
        let reply = c.post("/v1/completions", &completion(extra)).await;
        assert_error(&reply, 400, Some(param), None);
    }
    let wrong = [
        (json!({"messages": "Hi"}), "messages"),
        (json!({"messages": [{"content": "Hi"}]}), "messages[0]"),
        (
            json!({"messages": [{"role": "user", "content": 5}]}),
            "messages[0].content",
        ),
        (json!({"logprobs": 1}), "logprobs"),
    ];
    for (extra, param) in wrong {
        let reply = c.post("/v1/chat/completions", &chat(extra)).await;
        assert_error(&reply, 400, Some(param), None);
    }
}

async fn malformed_bodies(c: Client) {
    let raw = |body: &'static str, content_type: Option<&'static str>| {
        let mut request = c.http.post(c.url("/v1/completions")).body(body);
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        c.send("POST", "/v1/completions", request)
    };
    assert_error(
        &raw("{\"prompt\": ", Some("application/json")).await,
        400,
        None,
        None,
    );
    assert_error(
        &raw("[1, 2]", Some("application/json")).await,
        400,
        None,
        None,
    );
    assert_error(&raw("", Some("application/json")).await, 400, None, None);
    let reply = raw("{\"prompt\": \"Hi\"}", Some("text/plain")).await;
    assert_error(&reply, 415, None, Some("unsupported_media_type"));
    let reply = raw("prompt=Hi", None).await;
    assert_error(&reply, 415, None, Some("unsupported_media_type"));
    let ok = raw(
        "{\"prompt\": \"Hi\", \"max_tokens\": 1}",
        Some("application/json; charset=utf-8"),
    )
    .await;
    assert_eq!(ok.status, 200);

    let huge = "x".repeat(2 << 20);
    let reply = c.post("/v1/completions", &json!({ "prompt": huge })).await;
    assert_error(&reply, 413, None, Some("request_too_large"));
}

async fn unknown_model_is_404(c: Client) {
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let body = if path == "/v1/completions" {
            completion(json!({"model": "gpt-4o"}))
        } else {
            chat(json!({"model": "gpt-4o"}))
        };
        let reply = c.post(path, &body).await;
        assert_error(&reply, 404, Some("model"), Some("model_not_found"));
    }
    let served = c.get("/v1/models").await.body["data"][0]["id"].clone();
    c.ok("/v1/completions", &completion(json!({ "model": served })))
        .await;
}

async fn context_overflow_is_400(c: Client) {
    let context = c.get("/v1/models").await.body["data"][0]["context_length"]
        .as_u64()
        .unwrap();
    // A prompt that alone fills the context.
    let long: Vec<u64> = vec![28; context as usize];
    let reply = c.post("/v1/completions", &json!({"prompt": long})).await;
    assert_error(&reply, 400, Some("prompt"), Some("context_length_exceeded"));
    // A prompt that fits, with a completion that does not.
    let reply = c
        .post(
            "/v1/completions",
            &completion(json!({"max_tokens": context})),
        )
        .await;
    assert_error(&reply, 400, Some("prompt"), Some("context_length_exceeded"));
    let reply = c
        .post(
            "/v1/chat/completions",
            &chat(json!({"max_tokens": context})),
        )
        .await;
    assert_error(
        &reply,
        400,
        Some("messages"),
        Some("context_length_exceeded"),
    );
}

async fn unknown_decoder_lists_the_available_ones(c: Client) {
    let reply = c
        .post(
            "/v1/chat/completions",
            &chat(json!({"alignment": {"decoder": "nope", "rewards": {"positive": 1.0}}})),
        )
        .await;
    assert_error(
        &reply,
        400,
        Some("alignment.decoder"),
        Some("invalid_value"),
    );
    let message = reply.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("genarm") && message.contains("sample"),
        "{message}"
    );
}

async fn unsupported_fields_are_rejected(c: Client) {
    let reply = c
        .post("/v1/completions", &completion(json!({"suffix": "end"})))
        .await;
    assert_error(&reply, 400, Some("suffix"), Some("unsupported_parameter"));
    let reply = c
        .post("/v1/completions", &completion(json!({"best_of": 3})))
        .await;
    assert_error(&reply, 400, Some("best_of"), Some("unsupported_parameter"));
    let cases = [
        (
            json!({"tools": [{"type": "function", "function": {"name": "f"}}]}),
            "tools",
        ),
        (
            json!({"response_format": {"type": "json_xml"}}),
            "response_format.type",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            "messages[0].content[0].type",
        ),
    ];
    for (extra, param) in cases {
        let reply = c.post("/v1/chat/completions", &chat(extra)).await;
        assert_error(&reply, 400, Some(param), Some("unsupported_parameter"));
    }
}

async fn unknown_route_and_method(c: Client) {
    let reply = c.get("/v1/engines").await;
    assert_error(&reply, 404, None, Some("unknown_url"));
    let reply = c
        .send(
            "GET",
            "/v1/completions",
            c.http.get(c.url("/v1/completions")),
        )
        .await;
    assert_error(&reply, 405, None, None);
}

async fn tokenize_and_detokenize_errors(c: Client) {
    assert_error(
        &c.post("/tokenize", &json!({})).await,
        400,
        Some("prompt"),
        None,
    );
    let both = json!({"prompt": "a", "messages": [{"role": "user", "content": "a"}]});
    assert_error(
        &c.post("/tokenize", &both).await,
        400,
        Some("messages"),
        None,
    );
    assert_error(
        &c.post("/detokenize", &json!({})).await,
        400,
        Some("tokens"),
        None,
    );
    for (bad, param) in [
        (json!([-1]), "tokens"),
        (json!([49152]), "tokens"),
        (json!(["a"]), "tokens[0]"),
    ] {
        let reply = c.post("/detokenize", &json!({ "tokens": bad })).await;
        assert_error(&reply, 400, Some(param), None);
    }
    let reply = c
        .post("/tokenize", &json!({"prompt": "a", "model": "nope"}))
        .await;
    assert_error(&reply, 404, Some("model"), Some("model_not_found"));
    // One of `prompt` and `messages`, neither of them null.
    let null = json!({"prompt": null, "messages": [{"role": "user", "content": "a"}]});
    assert_error(&c.post("/tokenize", &null).await, 400, Some("prompt"), None);
    // Integers written with a zero fraction are integers, as JSON Schema counts them; an
    // optional field sent as null is left out.
    let r = c
        .ok(
            "/detokenize",
            &json!({"tokens": [9.0, 10.0], "model": null}),
        )
        .await;
    let plain = c.ok("/detokenize", &json!({"tokens": [9, 10]})).await;
    assert_eq!(r, plain);
    let body = json!({"prompt": "Hi", "max_tokens": 2.0, "n": 2.0, "seed": 1.0, "stop": null});
    let r = c.ok("/v1/completions", &body).await;
    assert_eq!(r["choices"].as_array().unwrap().len(), 2);
    assert_eq!(r["usage"]["completion_tokens"], 4);
    assert_error(
        &c.post("/v1/completions", &json!({"prompt": "Hi", "n": 1.5}))
            .await,
        400,
        Some("n"),
        None,
    );
}

/// Every response carries `x-request-id`: the client's when usable, else a fresh UUID (errors
/// included, so a client's report of one finds the server's logs).
async fn request_ids_are_echoed_or_assigned(c: Client) {
    let id = |r: &reqwest::Response| r.headers()["x-request-id"].to_str().unwrap().to_string();
    let given = c
        .http
        .get(c.url("/v1/models"))
        .header("x-request-id", "trace-42")
        .send()
        .await
        .unwrap();
    assert_eq!(id(&given), "trace-42");
    let (a, b) = (
        c.http.get(c.url("/nowhere")).send().await.unwrap(),
        c.http.get(c.url("/health")).send().await.unwrap(),
    );
    assert_eq!(a.status(), 404);
    assert_eq!(id(&a).len(), 36);
    assert_ne!(id(&a), id(&b));
    let unusable = c
        .http
        .get(c.url("/health"))
        .header("x-request-id", "x".repeat(500))
        .send()
        .await
        .unwrap();
    assert_eq!(id(&unusable).len(), 36);
}
