//! Server-wide behaviour, each case on its own server: the loading phase, cancellation when a
//! client goes away (watched through the load gauge, which other requests would disturb), and
//! admission (429 past `--max-queue`), and shutdown on SIGTERM.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::cases;
use crate::server::{Client, Events, Server};

pub fn cases() -> Vec<(&'static str, crate::OwnCase)> {
    cases![
        own: answers_503_while_loading,
        disconnect_cancels_generation,
        a_full_queue_answers_429,
        sigterm_lets_open_streams_finish_then_exits_0,
        sigterm_stops_at_the_grace_period,
        server_limits_are_400s_and_413s
    ]
}

async fn answers_503_while_loading() {
    // A FIFO as the model file: the server blocks opening it, so it stays in its loading phase
    // for as long as this case needs.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("model.gguf");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("running mkfifo");
    assert!(made.success());
    let server = Server::spawn(&["--model", fifo.to_str().unwrap()]);
    let c = server.client();
    for reply in [
        c.get("/health").await,
        c.get("/v1/models").await,
        c.post("/v1/completions", &json!({"prompt": "Hi"})).await,
        c.post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await,
        c.post("/tokenize", &json!({"prompt": "Hi"})).await,
    ] {
        assert_eq!(reply.status, 503, "{:?}", reply.body);
        assert_eq!(reply.body["error"]["code"], "model_loading");
    }
    assert_eq!(c.get("/metrics").await.status, 200);
}

async fn disconnect_cancels_generation() {
    let server = Server::ready(&[]).await;
    let c = server.client();
    let request = json!({"prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": true, "stream": true});

    // Streaming: read two chunks, then hang up.
    let response = c
        .http
        .post(c.url("/v1/completions"))
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut events = Events::new(response);
    for _ in 0..2 {
        events.next().await.expect("a chunk");
    }
    assert_eq!(c.metric("tilt:num_requests_running").await, 1.0);
    drop(events);
    assert_stops(&c).await;

    // Waiting for the whole answer: hang up once the engine runs it.
    let mut whole = request.clone();
    whole["stream"] = json!(false);
    let http = c.http.clone();
    let url = c.url("/v1/completions");
    let pending = tokio::spawn(async move { http.post(url).json(&whole).send().await });
    wait_until(&c, |running| running == 1.0).await;
    pending.abort();
    assert_stops(&c).await;
}

async fn a_full_queue_answers_429() {
    let server = Server::ready(&["--max-running", "1", "--max-queue", "0"]).await;
    let c = server.client();
    let events = streaming(&c, 2000).await;
    // One runs and none may wait: the next is refused at once, in the OpenAI shape.
    let short = json!({"prompt": "Hi", "max_tokens": 2});
    let reply = c.post("/v1/completions", &short).await;
    assert_eq!(reply.status, 429, "{:?}", reply.body);
    assert_eq!(reply.body["error"]["code"], "rate_limit_exceeded");
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    let raw = (c
        .http
        .post(c.url("/v1/chat/completions"))
        .json(&chat)
        .send())
    .await
    .unwrap();
    assert_eq!(raw.status(), 429);
    assert_eq!(raw.headers()["retry-after"], "1");
    assert_eq!(c.metric("tilt:request_rejected_total").await, 2.0);
    assert_eq!(c.metric("tilt:num_requests_waiting").await, 0.0);
    // Once the running request is gone, requests are taken again.
    drop(events);
    wait_until(&c, |running| running == 0.0).await;
    c.ok("/v1/completions", &short).await;
}

async fn sigterm_lets_open_streams_finish_then_exits_0() {
    let mut server = Server::ready(&["--shutdown-grace", "60"]).await;
    let c = server.client();
    let mut events = streaming(&c, 200).await;
    server.terminate();
    // The open stream runs to its end.
    let mut reasons = Vec::new();
    let mut last = None;
    while let Some(event) = events.next().await {
        if let Some(r) = event["choices"][0]["finish_reason"].as_str() {
            reasons.push(r.to_string());
        }
        last = Some(event);
    }
    assert_eq!(reasons, ["length"]);
    assert_eq!(last, Some(json!("[DONE]")));
    // No new connection is taken.
    let fresh = reqwest::Client::new();
    let refused = fresh.get(c.url("/health")).send().await;
    assert!(refused.is_err(), "{refused:?}");
    assert!(server.exited(Duration::from_secs(20)).await.success());
}

async fn sigterm_stops_at_the_grace_period() {
    let mut server = Server::ready(&["--shutdown-grace", "0.5"]).await;
    let c = server.client();
    // Held open: the stream that the grace period cuts.
    let _stream = streaming(&c, 4000).await;
    let signalled = Instant::now();
    server.terminate();
    // A stream that would run for many seconds is cut at the grace period; the exit is clean.
    assert!(server.exited(Duration::from_secs(20)).await.success());
    let after = signalled.elapsed();
    assert!(after >= Duration::from_millis(500), "{after:?}");
    assert!(after < Duration::from_secs(10), "{after:?}");
}

async fn server_limits_are_400s_and_413s() {
    let server = Server::ready(&[
        "--max-prompt-tokens",
        "8",
        "--max-output-tokens",
        "4",
        "--max-body-bytes",
        "2048",
    ])
    .await;
    let c = server.client();
    let long_prompt = json!({"prompt": "one two three four five six seven eight nine ten"});
    let reply = c.post("/v1/completions", &long_prompt).await;
    assert_eq!(reply.status, 400, "{:?}", reply.body);
    assert_eq!(reply.body["error"]["param"], "prompt");
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
    // The chat template alone is longer than 8 tokens.
    let reply = c.post("/v1/chat/completions", &chat).await;
    assert_eq!(reply.body["error"]["param"], "messages", "{:?}", reply.body);
    let reply = c
        .post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 5}))
        .await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.body["error"]["param"], "max_tokens");
    // A request that names no `max_tokens` gets the server's most (completions default to 16).
    let r = c
        .ok(
            "/v1/completions",
            &json!({"prompt": "Hi", "ignore_eos": true}),
        )
        .await;
    assert_eq!(r["usage"]["completion_tokens"], 4);
    let big = json!({"prompt": "x".repeat(4000)});
    let reply = c.post("/v1/completions", &big).await;
    assert_eq!(reply.status, 413, "{:?}", reply.body);
    assert_eq!(reply.body["error"]["code"], "request_too_large");
}

/// A streamed completion of `max_tokens` tokens, once its first chunk has arrived.
async fn streaming(c: &Client, max_tokens: u64) -> Events {
    let request = json!({"prompt": "Once upon a time", "max_tokens": max_tokens,
                         "ignore_eos": true, "stream": true});
    let response = (c.http.post(c.url("/v1/completions")).json(&request).send())
        .await
        .unwrap();
    let mut events = Events::new(response);
    events.next().await.expect("a chunk");
    events
}

async fn wait_until(c: &Client, ok: impl Fn(f64) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let running = c.metric("tilt:num_requests_running").await;
        if ok(running) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "num_requests_running stuck at {running}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Nothing runs any more and no tokens are being generated.
async fn assert_stops(c: &Client) {
    wait_until(c, |running| running == 0.0).await;
    let before = c.metric("tilt:generation_tokens_total").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(c.metric("tilt:generation_tokens_total").await, before);
    assert!(
        before < 2000.0,
        "the request ran to its end: {before} tokens"
    );
}
