//! Adaptive decoding over HTTP, with the real base and the draft the manifest ships: the small
//! and the large model share the answer (tokens per model add up to it, plain and streamed
//! alike), threshold 0 writes exactly what the base alone samples, and its parameters are
//! checked with a 400 naming each.

use serde_json::json;

use crate::cases;
use crate::server::{decoder, refused, streams_like, Client};

pub fn cases() -> Vec<(&'static str, crate::Case)> {
    cases![
        both_models_write_and_the_report_adds_up,
        threshold_zero_is_the_base_alone,
        adaptive_parameters_are_checked
    ]
}

const PROMPT: &str = "Write a short story about a lighthouse keeper.";

async fn both_models_write_and_the_report_adds_up(c: Client) {
    let body = json!({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 48,
                      "seed": 5, "n": 2,
                      "alignment": decoder("adaptive", json!({"entropy_threshold": 2.0}))});
    let r = c.ok("/v1/chat/completions", &body).await;
    let report = &r["alignment"];
    assert_eq!(report["decoder"], "adaptive");
    let (small, large) = (
        report["tokens"]["small"].as_u64().unwrap(),
        report["tokens"]["large"].as_u64().unwrap(),
    );
    assert_eq!(
        small + large,
        r["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert!(
        small > 0 && large > 0,
        "one model wrote everything: {report}"
    );
    assert!(report["switches"].as_u64().unwrap() > 0);
    let share = report["large_share"].as_f64().unwrap();
    assert!((share - large as f64 / (small + large) as f64).abs() < 1e-9);
    let ratio = report["cost_ratio"].as_f64().unwrap();
    assert!(
        ratio > 0.0 && ratio < 1.0 / 3.0,
        "the draft costs {ratio} of the base"
    );
    let compute = report["relative_compute"].as_f64().unwrap();
    assert!((compute - (share + (1.0 - share) * ratio)).abs() < 1e-9);
    for choice in r["choices"].as_array().unwrap() {
        assert!(!choice["message"]["content"].as_str().unwrap().is_empty());
    }
    // Completions stream the same answer.
    let body = json!({"prompt": "Once upon a time", "max_tokens": 32, "seed": 2,
                      "alignment": decoder("adaptive", json!({}))});
    let r = c.ok("/v1/completions", &body).await;
    streams_like(&c, &body, &r).await;
}

async fn threshold_zero_is_the_base_alone(c: Client) {
    let body = |alignment: serde_json::Value| {
        json!({"prompt": "The old lighthouse", "max_tokens": 24, "seed": 11,
               "temperature": 0.8, "n": 2, "alignment": alignment})
    };
    let base = c
        .ok("/v1/completions", &body(decoder("sample", json!({}))))
        .await;
    let zero = c
        .ok(
            "/v1/completions",
            &body(decoder("adaptive", json!({"entropy_threshold": 0}))),
        )
        .await;
    for i in 0..2 {
        assert_eq!(zero["choices"][i]["text"], base["choices"][i]["text"]);
    }
    assert_eq!(zero["alignment"]["tokens"]["small"], 0);
    assert_eq!(zero["alignment"]["switches"], 0);
}

async fn adaptive_parameters_are_checked(c: Client) {
    refused(
        &c,
        &[
            (
                decoder("adaptive", json!({"entropy_threshold": -1})),
                "alignment.entropy_threshold",
                "at least 0",
            ),
            (
                decoder("adaptive", json!({"window": 0})),
                "alignment.window",
                "between 1 and 64",
            ),
            (
                decoder("adaptive", json!({"min_stay": 0})),
                "alignment.min_stay",
                "between 1 and 4096",
            ),
            (
                decoder("adaptive", json!({"draft": "nope"})),
                "alignment.draft",
                "nope",
            ),
            (
                decoder("adaptive", json!({"guide": {"rewards": {"positive": 1}}})),
                "alignment.guide",
                "does not take GenARM guidance",
            ),
            (
                decoder("adaptive", json!({"threshold": 1})),
                "alignment.threshold",
                "unknown field",
            ),
        ],
    )
    .await;
}
