//! The `genarm` decoder over HTTP: reward sources listed, steering through `alignment`, and its
//! parameters checked. Cases with a reward model start their own server with a toy ARM (see
//! `common::toy_arm`); the shared server has the reward models that models/ ships.

use serde_json::{json, Value};

use crate::cases;
use crate::common;
use crate::server::{Client, Server};

pub fn cases() -> Vec<(&'static str, crate::Case)> {
    cases![unknown_rewards_list_the_loaded_ones]
}

pub fn own_cases() -> Vec<(&'static str, crate::OwnCase)> {
    cases![own: reward_sources_are_listed, genarm_steers_and_reports, genarm_parameters_are_checked,
           genarm_without_reward_models_says_none_are_loaded]
}

/// A server whose only reward model is the toy ARM `toy`, which favours " Paris"; the tempdir
/// holds its files.
async fn server_with_toy() -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    common::toy_arm(dir.path(), common::single_token(" Paris"), |_| {});
    let flag = format!("toy={}", dir.path().display());
    let args = ["--no-default-rewards", "--reward", &flag];
    (Server::ready(&args).await, dir)
}

fn genarm(rewards: Value) -> Value {
    json!({"decoder": "genarm", "rewards": rewards})
}

async fn reward_sources_are_listed() {
    let (server, _dir) = server_with_toy().await;
    let c = server.client();
    let rewards = c.get("/v1/rewards").await;
    assert_eq!(rewards.status, 200);
    let kind = |name: &str| {
        rewards.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .map(|r| r["kind"].clone())
    };
    assert_eq!(kind("toy"), Some(json!("arm")));
    assert_eq!(kind("sentiment"), Some(json!("programmatic")));
    let models = c.get("/v1/models").await.body;
    let toy = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "toy")
        .expect("the reward model is listed");
    assert_eq!(toy["role"], "reward");
    // Requests generate with the base, not the reward model.
    let r = c
        .post("/v1/completions", &json!({"model": "toy", "prompt": "Hi"}))
        .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
}

async fn genarm_steers_and_reports() {
    let (server, _dir) = server_with_toy().await;
    let c = server.client();
    let ask = |rewards: Value| {
        json!({"prompt": "Write one sentence about the sea:", "max_tokens": 16, "temperature": 0,
               "alignment": genarm(rewards)})
    };
    let plain = c.ok("/v1/completions", &ask(json!({}))).await;
    assert!(!plain["choices"][0]["text"]
        .as_str()
        .unwrap()
        .contains("Paris"));
    assert_eq!(plain["alignment"]["kl_per_token"], 0.0);
    let steered = c.ok("/v1/completions", &ask(json!({"toy": 2}))).await;
    assert!(
        steered["choices"][0]["text"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{steered}"
    );
    let report = &steered["alignment"];
    assert_eq!(report["decoder"], "genarm");
    assert_eq!(report["weights"], json!({"toy": 2.0}));
    assert_eq!(report["beta"], 1.0);
    assert!(report["kl_per_token"].as_f64().unwrap() > 0.0);

    // Chat, streamed, with n = 2: every model formats the messages with its own template.
    let events = c
        .stream(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8,
                    "n": 2, "stream": true, "alignment": genarm(json!({"toy": 3}))}),
        )
        .await;
    let mut text = [String::new(), String::new()];
    for e in &events {
        for choice in e["choices"].as_array().into_iter().flatten() {
            let i = choice["index"].as_u64().unwrap() as usize;
            text[i].push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        }
    }
    assert!(text.iter().all(|t| t.contains("Paris")), "{text:?}");
    let last = events.iter().rev().find(|e| e.get("alignment").is_some());
    assert_eq!(
        last.expect("a chunk with the report")["alignment"]["decoder"],
        "genarm"
    );
}

async fn genarm_parameters_are_checked() {
    let (server, _dir) = server_with_toy().await;
    let c = server.client();
    let bad = |alignment: Value| json!({"prompt": "Hi", "max_tokens": 2, "alignment": alignment});
    for (alignment, param, says) in [
        (
            genarm(json!({"nope": 1})),
            "alignment.rewards",
            "loaded: toy",
        ),
        (
            genarm(json!({"sentiment": 1})),
            "alignment.rewards",
            "programmatic",
        ),
        (
            genarm(json!({"toy": "NaN"})),
            "alignment.rewards.toy",
            "f64",
        ),
        // Finite as JSON, infinite in the f32 the decoder computes in.
        (
            genarm(json!({"toy": 1e39})),
            "alignment.rewards.toy",
            "finite",
        ),
        (genarm(json!({"toy": [1]})), "alignment.rewards.toy", "f64"),
        (
            json!({"decoder": "genarm", "beta": 0}),
            "alignment.beta",
            "above 0",
        ),
        (
            json!({"decoder": "genarm", "beta": -1}),
            "alignment.beta",
            "above 0",
        ),
        (
            json!({"decoder": "genarm", "gamma": 1}),
            "alignment.gamma",
            "unknown field",
        ),
    ] {
        let r = c.post("/v1/completions", &bad(alignment.clone())).await;
        assert_eq!(r.status, 400, "{alignment}: {:?}", r.body);
        assert_eq!(r.body["error"]["param"], param, "{alignment}: {:?}", r.body);
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{alignment}: {message}");
    }
    // JSON has no NaN or infinity; a number too large for an f64 is refused as malformed JSON.
    let r = c
        .send(
            "POST",
            "/v1/completions",
            c.http
                .post(c.url("/v1/completions"))
                .header("content-type", "application/json")
                .body(r#"{"prompt": "Hi", "alignment": {"decoder": "genarm", "rewards": {"toy": 1e400}}}"#),
        )
        .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
}

/// The names of the reward models a server has loaded.
async fn loaded_arms(c: &Client) -> Vec<String> {
    let rewards = c.get("/v1/rewards").await.body;
    rewards["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "arm")
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect()
}

async fn unknown_rewards_list_the_loaded_ones(c: Client) {
    let r = c
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "Hi"}],
                    "alignment": genarm(json!({"no-such-reward": 1}))}),
        )
        .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.body["error"]["param"], "alignment.rewards");
    let message = r.body["error"]["message"].as_str().unwrap();
    let loaded = loaded_arms(&c).await;
    assert!(message.contains("`no-such-reward`"), "{message}");
    for name in &loaded {
        assert!(
            message.contains(name.as_str()),
            "{name} missing from: {message}"
        );
    }
    if loaded.is_empty() {
        assert!(message.contains("none are loaded"), "{message}");
    }
}

async fn genarm_without_reward_models_says_none_are_loaded() {
    let server = Server::ready(&["--no-default-rewards"]).await;
    let c = server.client();
    assert_eq!(loaded_arms(&c).await, Vec::<String>::new());
    let r = c
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "Hi"}],
                    "alignment": genarm(json!({"positive": 1}))}),
        )
        .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.body["error"]["param"], "alignment.rewards");
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("none are loaded"));
    // No rewards at all: plain decoding with the genarm report.
    let ok = c
        .ok(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                    "alignment": {"decoder": "genarm"}}),
        )
        .await;
    assert_eq!(ok["alignment"]["decoder"], "genarm");
    assert_eq!(ok["alignment"]["weights"], json!({}));
}
