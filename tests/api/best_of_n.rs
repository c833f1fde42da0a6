//! The `best_of_n` decoder over HTTP: reachable through `alignment` with its report (plain and
//! streamed), and its parameters checked with a 400 naming each. The reward-model case starts its
//! own server with a toy ARM.

use serde_json::{json, Value};

use crate::cases;
use crate::common;
use crate::server::{decoder, refused, streams_like, Client, Server};

pub fn cases() -> Vec<(&'static str, crate::Case)> {
    cases![
        best_of_n_answers_with_its_report,
        best_of_n_parameters_are_checked
    ]
}

pub fn own_cases() -> Vec<(&'static str, crate::OwnCase)> {
    cases![own: best_of_n_scores_and_is_guided_by_reward_models]
}

fn best_of_n(params: Value) -> Value {
    decoder("best_of_n", params)
}

async fn best_of_n_answers_with_its_report(c: Client) {
    let alignment = best_of_n(json!({"n": 3, "rewards": {"sentiment": 1},
                                     "constraints": {"max_words": 12}, "return_candidates": true}));
    let body = json!({"prompt": "Describe your morning in one sentence:", "max_tokens": 12,
                      "seed": 4, "alignment": alignment});
    let r = c.ok("/v1/completions", &body).await;
    let report = &r["alignment"];
    assert_eq!(report["decoder"], "best_of_n");
    assert_eq!(report["n"], 3);
    assert_eq!(report["selection"], "hard");
    assert_eq!(
        report["weights"],
        json!({"sentiment": 1.0, "max_words": 1.0})
    );
    let candidates = report["candidates"].as_array().unwrap();
    assert_eq!(candidates.len(), 3);
    let chosen = report["chosen"].as_u64().unwrap() as usize;
    assert_eq!(r["choices"][0]["text"], candidates[chosen]["text"]);
    assert_eq!(r["choices"].as_array().unwrap().len(), 1);
    assert_eq!(r["usage"]["completion_tokens"], report["generated_tokens"]);

    // Streamed, the chosen candidate arrives as choice 0 with the report on its last chunk.
    for ch in streams_like(&c, &body, &r).await {
        assert_eq!(ch["index"], 0);
    }
}

async fn best_of_n_parameters_are_checked(c: Client) {
    let sentiment = json!({"sentiment": 1});
    refused(
        &c,
        &[
            (
                best_of_n(json!({"n": 0, "rewards": sentiment})),
                "alignment.n",
                "between 1 and 16",
            ),
            (
                best_of_n(json!({"n": 17, "rewards": sentiment})),
                "alignment.n",
                "between 1 and 16",
            ),
            (
                best_of_n(json!({"n": -1, "rewards": sentiment})),
                "alignment.n",
                "invalid value",
            ),
            (
                best_of_n(json!({"rewards": {"helpful": 1}})),
                "alignment.rewards",
                "scores with: sentiment",
            ),
            (
                best_of_n(json!({"rewards": {"sentiment": 1e39}})),
                "alignment.rewards.sentiment",
                "finite",
            ),
            (
                best_of_n(json!({"rewards": {"sentiment": "NaN"}})),
                "alignment.rewards.sentiment",
                "f64",
            ),
            (
                best_of_n(json!({"rewards": sentiment, "selection": "soft", "beta": 0})),
                "alignment.beta",
                "above 0",
            ),
            (
                best_of_n(json!({"rewards": sentiment, "beta": 1})),
                "alignment.beta",
                "soft",
            ),
            (
                best_of_n(json!({"rewards": sentiment, "selection": "softest"})),
                "alignment.selection",
                "unknown variant",
            ),
            (
                best_of_n(json!({"rewards": sentiment, "calibrate": 33})),
                "alignment.calibrate",
                "at most 32",
            ),
            (
                best_of_n(json!({"constraints": {"keywords": []}})),
                "alignment.constraints.keywords",
                "at least one",
            ),
            (
                best_of_n(json!({"constraints": {"keywords": ["sea", " "]}})),
                "alignment.constraints.keywords",
                "blank",
            ),
            (
                best_of_n(json!({"constraints": {"max_words": 0}})),
                "alignment.constraints.max_words",
                "at least 1",
            ),
            (
                best_of_n(json!({"constraints": {"min_words": 3}})),
                "alignment.constraints.min_words",
                "unknown field",
            ),
            (best_of_n(json!({})), "alignment.rewards", "select by"),
            (
                best_of_n(json!({"rewards": sentiment, "reject_fraction": 0.5})),
                "alignment.reject_fraction",
                "speculative",
            ),
            (
                best_of_n(json!({"rewards": sentiment, "selection": "speculative",
                                 "reject_fraction": 1})),
                "alignment.reject_fraction",
                "below 1",
            ),
            (
                best_of_n(json!({"rewards": sentiment, "selection": "speculative",
                                 "checkpoint_tokens": 0})),
                "alignment.checkpoint_tokens",
                "between 1 and",
            ),
            (
                best_of_n(json!({"rewards": sentiment, "selection": "speculative",
                                 "calibrate": 4})),
                "alignment.calibrate",
                "speculative",
            ),
            (
                best_of_n(json!({"constraints": {"keywords": ["sea"], "keyword_boost": 51}})),
                "alignment.constraints.keyword_boost",
                "between 0 and 50",
            ),
        ],
    )
    .await;
    // The top-level `n` counts choices: each gets its own best of `alignment.n`.
    let body = json!({"prompt": "Hi", "n": 2, "max_tokens": 4, "seed": 1,
                      "alignment": best_of_n(json!({"n": 2, "rewards": sentiment}))});
    let r = c.ok("/v1/completions", &body).await;
    assert_eq!(r["choices"].as_array().unwrap().len(), 2, "{r}");
    assert_eq!(
        r["alignment"]["choices"].as_array().unwrap().len(),
        2,
        "{r}"
    );
}

async fn best_of_n_scores_and_is_guided_by_reward_models() {
    let dir = tempfile::tempdir().unwrap();
    common::toy_arm(dir.path(), common::single_token(" Paris"), |_| {});
    let flag = format!("toy={}", dir.path().display());
    let server = Server::ready(&["--reward", &flag]).await;
    let c = server.client();
    let alignment = best_of_n(
        json!({"n": 2, "rewards": {"toy": 1}, "return_candidates": true,
                                     "guide": {"rewards": {"toy": 2}, "beta": 0.5}}),
    );
    let body = json!({"messages": [{"role": "user", "content": "Name a city."}],
                      "max_tokens": 6, "seed": 2, "alignment": alignment});
    let r = c.ok("/v1/chat/completions", &body).await;
    let report = &r["alignment"];
    assert_eq!(report["guide"]["weights"], json!({"toy": 2.0}), "{report}");
    assert!(report["guide"]["kl_per_token"].as_f64().unwrap() > 0.0);
    let scores: Vec<f64> = report["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["scores"]["toy"].as_f64().unwrap())
        .collect();
    // A sum of log-probs: below 0, and the higher one chosen.
    assert!(scores.iter().all(|&s| s < 0.0), "{scores:?}");
    let best = if scores[1] > scores[0] { 1 } else { 0 };
    assert_eq!(report["chosen"], best);
    // Speculative rejection reads the candidates at checkpoints: stopping none, it chooses as
    // hard best-of-N does with the same seed; stopping half, it generates fewer tokens.
    let select = |extra: Value| {
        let mut params = json!({"n": 4, "rewards": {"toy": 1}, "return_candidates": true});
        params
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        json!({"messages": [{"role": "user", "content": "Describe a rainy day."}],
               "max_tokens": 12, "seed": 3, "alignment": best_of_n(params)})
    };
    let hard = c.ok("/v1/chat/completions", &select(json!({}))).await;
    let speculative = json!({"selection": "speculative", "checkpoint_tokens": 3});
    let mut none = speculative.clone();
    none["reject_fraction"] = json!(0);
    let kept = c.ok("/v1/chat/completions", &select(none)).await;
    assert_eq!(kept["choices"][0]["message"], hard["choices"][0]["message"]);
    let (h, k) = (&hard["alignment"], &kept["alignment"]);
    assert_eq!(k["chosen"], h["chosen"], "{k}");
    assert_eq!(k["generated_tokens"], h["generated_tokens"]);
    for (a, b) in
        (h["candidates"].as_array().unwrap().iter()).zip(k["candidates"].as_array().unwrap())
    {
        let (a, b) = (a["reward"].as_f64().unwrap(), b["reward"].as_f64().unwrap());
        assert!((a - b).abs() < 1e-3, "{a} vs {b}");
    }
    assert!(!k["checkpoints"].as_array().unwrap().is_empty(), "{k}");
    let halved = c.ok("/v1/chat/completions", &select(speculative)).await;
    let s = &halved["alignment"];
    assert_eq!(s["selection"], "speculative");
    assert!(s["checkpoints"][0]["rejected"].as_u64().unwrap() > 0, "{s}");
    assert!(
        s["generated_tokens"].as_u64() < h["generated_tokens"].as_u64(),
        "{s}"
    );
    let chosen = s["chosen"].as_u64().unwrap() as usize;
    assert!(s["candidates"][chosen]["rejected_at"].is_null(), "{s}");
    refused(
        &c,
        &[(
            best_of_n(json!({"rewards": {"toy": 1}, "guide": {"rewards": {"toy": "x"}}})),
            "alignment.guide.rewards.toy",
            "invalid type",
        )],
    )
    .await;
}
