//! `tilt serve --config FILE`: settings from a TOML file reach the server as its flags would.

use serde_json::json;

use crate::cases;
use crate::server::Server;

pub fn cases() -> Vec<(&'static str, crate::OwnCase)> {
    cases![own: a_config_file_sets_keys_rewards_and_limits]
}

async fn a_config_file_sets_keys_rewards_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tilt.toml");
    std::fs::write(
        &file,
        "api-key = [\"sk-from-file\"]\nno_default_rewards = true\nmax_body_bytes = 2048\n",
    )
    .unwrap();
    let server = Server::ready(&["--config", file.to_str().unwrap()]).await;
    let c = server.client();
    assert_eq!(c.get("/v1/rewards").await.status, 401);
    let keyed = |path: &'static str| {
        c.send(
            "GET",
            path,
            c.http.get(c.url(path)).bearer_auth("sk-from-file"),
        )
    };
    let rewards = keyed("/v1/rewards").await;
    assert_eq!(rewards.status, 200);
    let kinds: Vec<&str> = (rewards.body["data"].as_array().unwrap().iter())
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert!(
        !kinds.is_empty() && kinds.iter().all(|&k| k == "programmatic"),
        "{kinds:?}"
    );
    let big = json!({"prompt": "x".repeat(4096), "max_tokens": 1});
    let request = (c.http.post(c.url("/v1/completions")))
        .bearer_auth("sk-from-file")
        .json(&big);
    assert_eq!(c.send("POST", "/v1/completions", request).await.status, 413);
}
