//! The soak, short form: many clients at once for a while, every decoder, streamed and not, some
//! hanging up midway, against a server whose queue is small enough to refuse some. Every request
//! must end 200, or 429 by design, or be one the client dropped: none hangs or is lost. After,
//! the load gauges return to zero and resident memory has not grown past its warm-up level by
//! more than a margin. `TILT_SOAK_SECONDS` and `TILT_SOAK_CLIENTS` make the long form
//! (docs/reliability.md); the figures are printed either way.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cases;
use crate::server::{Client, Server};

pub fn cases() -> Vec<(&'static str, crate::OwnCase)> {
    cases![own: many_clients_every_decoder_nothing_lost]
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The alignment objects the clients pick from: every decoder, small enough to finish quickly.
fn alignments() -> Vec<Value> {
    vec![
        json!({"decoder": "sample"}),
        json!({"decoder": "genarm", "rewards": {"positive": 1.0}}),
        json!({"decoder": "best_of_n", "n": 4, "rewards": {"sentiment": 1.0}}),
        json!({"decoder": "best_of_n", "n": 4, "rewards": {"sentiment": 1.0},
               "selection": "speculative", "checkpoint_tokens": 4}),
        json!({"decoder": "args", "top_k": 4, "rewards": {"sentiment": 1.0}}),
        json!({"decoder": "deal", "top_k": 3, "beam_width": 2, "lookahead": 2,
               "constraints": {"keywords": ["rain"]}}),
        json!({"decoder": "equilibrium", "candidates": ["Paris", "Lyon"]}),
        json!({"decoder": "adaptive"}),
    ]
}

/// A small deterministic generator per client, so a failing run can be replayed.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ending {
    Ok,
    Refused,
    HungUp,
}

async fn one_request(c: &Client, rng: &mut Lcg, shapes: &[Value]) -> Result<Ending, String> {
    let alignment = shapes[rng.below(shapes.len() as u64) as usize].clone();
    let stream = rng.below(2) == 0;
    let hang_up = rng.below(5) == 0;
    let mut body = json!({"messages": [{"role": "user", "content": "Describe a rainy day."}],
                          "max_tokens": 8 + rng.below(16), "stream": stream,
                          "alignment": alignment});
    if alignment_is(&body, "equilibrium") {
        body["messages"][0]["content"] = json!("What is the capital of France?");
    }
    let request = c.http.post(c.url("/v1/chat/completions")).json(&body);
    if hang_up {
        let pending = tokio::spawn(async move { request.send().await });
        tokio::time::sleep(Duration::from_millis(20 + rng.below(300))).await;
        pending.abort();
        return Ok(Ending::HungUp);
    }
    let response = request.send().await.map_err(|e| format!("{body}: {e}"))?;
    let status = response.status().as_u16();
    let text = response.text().await.map_err(|e| format!("{body}: {e}"))?;
    match status {
        200 if !stream || text.trim_end().ends_with("data: [DONE]") => Ok(Ending::Ok),
        429 => Ok(Ending::Refused),
        _ => Err(format!("{status} for {body}: {text}")),
    }
}

fn alignment_is(body: &Value, decoder: &str) -> bool {
    body["alignment"]["decoder"] == decoder
}

async fn many_clients_every_decoder_nothing_lost() {
    let seconds = env("TILT_SOAK_SECONDS", 20);
    let clients = env("TILT_SOAK_CLIENTS", 32);
    let server = Server::ready(&["--max-running", "16", "--max-queue", "8"]).await;
    let c = server.client();
    let shapes = Arc::new(alignments());
    let endings: Arc<Mutex<BTreeMap<Ending, u64>>> = Arc::default();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let halfway = start + Duration::from_secs(seconds / 2);
    let pid = server.pid();
    let rss_at_half = tokio::spawn(async move {
        tokio::time::sleep_until(halfway.into()).await;
        Server::rss_kib_of(pid)
    });
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let (c, shapes, endings) = (c.clone(), shapes.clone(), endings.clone());
            tokio::spawn(async move {
                let mut rng = Lcg(i + 1);
                while Instant::now() < deadline {
                    // Nothing may hang: a request gets a minute, far beyond its few tokens.
                    let ended = tokio::time::timeout(
                        Duration::from_secs(60),
                        one_request(&c, &mut rng, &shapes),
                    )
                    .await
                    .map_err(|_| "a request hung for a minute".to_string())??;
                    *endings.lock().unwrap().entry(ended).or_default() += 1;
                    if ended == Ending::Refused {
                        // As a client that honours `Retry-After` (1 s), less some impatience.
                        tokio::time::sleep(Duration::from_millis(300 + rng.below(700))).await;
                    }
                }
                Ok::<(), String>(())
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        if let Err(e) = task.await.unwrap() {
            panic!("client {i}: {e}");
        }
    }
    let rss_half = rss_at_half.await.unwrap();
    // Everything ends: the gauges return to zero.
    let settle = Instant::now() + Duration::from_secs(30);
    loop {
        let running = c.metric("tilt:num_requests_running").await;
        let waiting = c.metric("tilt:num_requests_waiting").await;
        if running == 0.0 && waiting == 0.0 {
            break;
        }
        assert!(
            Instant::now() < settle,
            "running {running}, waiting {waiting}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rss_end = Server::rss_kib_of(pid);
    let endings = endings.lock().unwrap().clone();
    eprintln!(
        "soak: {clients} clients, {seconds} s: {endings:?}; rejected (metric) {}; RSS {} MiB at half time, {} MiB at the end",
        c.metric("tilt:request_rejected_total").await,
        rss_half / 1024,
        rss_end / 1024
    );
    assert!(
        endings.get(&Ending::Ok).copied().unwrap_or(0) > 0,
        "{endings:?}"
    );
    // Memory flat after warm-up, within a margin for allocator slack.
    assert!(
        rss_end <= rss_half + rss_half / 4,
        "RSS grew from {rss_half} KiB to {rss_end} KiB"
    );
}
