//! Server-wide behaviour, each case on its own server: the loading phase, and cancellation when a
//! client goes away (watched through the load gauge, which other requests would disturb).

use std::time::{Duration, Instant};

use serde_json::json;

use crate::cases;
use crate::server::{Client, Events, Server};

pub fn cases() -> Vec<(&'static str, crate::OwnCase)> {
    cases![own: answers_503_while_loading, disconnect_cancels_generation]
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
