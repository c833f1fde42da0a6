//! The search decoders `args` and `deal` over HTTP: reachable through `alignment` with their
//! reports (plain and streamed), and their parameters checked with a 400 naming each. The
//! reward-model case starts its own server with a toy ARM; the shared server has none.

use serde_json::{json, Value};

use crate::cases;
use crate::common;
use crate::server::{decoder, refused, streams_like, Client, Server};

pub fn cases() -> Vec<(&'static str, crate::Case)> {
    cases![
        args_answers_with_its_report,
        deal_answers_and_streams_with_its_report,
        search_parameters_are_checked
    ]
}

pub fn own_cases() -> Vec<(&'static str, crate::OwnCase)> {
    cases![own: search_decoders_score_with_reward_models]
}

async fn args_answers_with_its_report(c: Client) {
    let alignment = decoder(
        "args",
        json!({"top_k": 5, "weight": 2, "constraints": {"keywords": ["sea"]}}),
    );
    let body = json!({"messages": [{"role": "user", "content": "Where do fish live?"}],
                      "max_tokens": 8, "temperature": 0, "alignment": alignment});
    let r = c.ok("/v1/chat/completions", &body).await;
    let report = &r["alignment"];
    assert_eq!(report["decoder"], "args");
    assert_eq!(report["top_k"], 5);
    assert_eq!(report["mode"], "greedy");
    assert_eq!(report["weight"], 2.0);
    assert_eq!(report["weights"], json!({"keywords": 1.0}));
    let tokens = r["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(report["forward_tokens"], tokens - 1);
    assert_eq!(report["rewards"].as_array().unwrap().len(), 1);
}

async fn deal_answers_and_streams_with_its_report(c: Client) {
    let alignment = decoder(
        "deal",
        json!({"top_k": 2, "beam_width": 2, "lookahead": 2, "rewards": {"sentiment": 1}}),
    );
    let body = json!({"prompt": "The weather today is", "max_tokens": 6, "ignore_eos": true,
                      "alignment": alignment});
    let r = c.ok("/v1/completions", &body).await;
    let report = &r["alignment"];
    assert_eq!(report["decoder"], "deal");
    assert_eq!(
        (
            &report["top_k"],
            &report["beam_width"],
            &report["lookahead"],
            &report["lambda"]
        ),
        (&json!(2), &json!(2), &json!(2), &json!(1.0))
    );
    assert_eq!(r["usage"]["completion_tokens"], 6);
    // Σ_{t=1}^{5} k·min(b, k^(t−1))·min(l, T − t) = 2·1·2 + 2·2·2 + 2·2·2 + 2·2·2 + 2·2·1.
    assert_eq!(report["forward_tokens"], 4 + 8 + 8 + 8 + 4);
    assert_eq!(report["forward_tokens_per_output_token"], 32.0 / 6.0);
    assert_eq!(r["choices"][0]["finish_reason"], "length");

    // Streamed, the same answer arrives, with the report on its last chunk.
    streams_like(&c, &body, &r).await;
}

async fn search_parameters_are_checked(c: Client) {
    let kw = json!({"keywords": ["sea"]});
    let with = |name: &str, extra: Value| {
        let mut p = json!({"constraints": kw});
        p.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        decoder(name, p)
    };
    refused(
        &c,
        &[
            (
                with("args", json!({"top_k": 0})),
                "alignment.top_k",
                "between 1 and 32",
            ),
            (
                with("args", json!({"top_k": 33})),
                "alignment.top_k",
                "between 1 and 32",
            ),
            (
                with("args", json!({"mode": "beam"})),
                "alignment.mode",
                "unknown variant",
            ),
            (
                with("args", json!({"weight": 1e39})),
                "alignment.weight",
                "finite",
            ),
            (
                decoder("args", json!({"rewards": {"helpful": 1}})),
                "alignment.rewards",
                "args scores with: sentiment",
            ),
            (decoder("args", json!({})), "alignment.rewards", "steer by"),
            (
                with("deal", json!({"top_k": 0})),
                "alignment.top_k",
                "between 1 and 16",
            ),
            (
                with("deal", json!({"lookahead": 65})),
                "alignment.lookahead",
                "between 0 and 64",
            ),
            (
                with("deal", json!({"beam_width": 9})),
                "alignment.beam_width",
                "between 1 and 8",
            ),
            (
                with("deal", json!({"lambda": "x"})),
                "alignment.lambda",
                "f64",
            ),
            (
                decoder("deal", json!({"rewards": {"helpful": 1}})),
                "alignment.rewards",
                "deal scores with: sentiment",
            ),
            (
                decoder("deal", json!({"constraints": {"keywords": []}})),
                "alignment.constraints.keywords",
                "at least one",
            ),
            (
                with("deal", json!({"beams": 2})),
                "alignment.beams",
                "unknown field",
            ),
        ],
    )
    .await;
    // One answer per request: the beams are the search's, not choices.
    let r = c
        .post(
            "/v1/completions",
            &json!({"prompt": "Hi", "n": 2, "alignment": with("deal", json!({}))}),
        )
        .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.body["error"]["param"], "n");
}

async fn search_decoders_score_with_reward_models() {
    let dir = tempfile::tempdir().unwrap();
    common::toy_arm(dir.path(), common::single_token(" Paris"), |_| {});
    let flag = format!("toy={}", dir.path().display());
    let server = Server::ready(&["--reward", &flag]).await;
    let c = server.client();
    // args ranks each step's candidates by the ARM's next-token log-prob (each ARM reads the
    // chat in its own template): one ARM forward per base forward.
    let body = json!({"messages": [{"role": "user", "content": "Where do fish live?"}],
                      "max_tokens": 6, "temperature": 0,
                      "alignment": decoder("args", json!({"rewards": {"toy": 1}}))});
    let r = c.ok("/v1/chat/completions", &body).await;
    let report = &r["alignment"];
    assert_eq!(report["decoder"], "args");
    assert_eq!(report["weights"], json!({"toy": 1.0}));
    let tokens = r["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(report["forward_tokens"], tokens - 1);
    assert_eq!(report["arm_forward_tokens"], tokens - 1);
    assert_eq!(report["rewards"].as_array().unwrap().len(), 1);
    // deal rolls the ARM out alongside the base: one ARM forward per base forward.
    let body = json!({"prompt": "The weather today is", "max_tokens": 4, "ignore_eos": true,
                      "alignment": decoder("deal", json!({"top_k": 2, "lookahead": 2,
                                                          "rewards": {"toy": 1}}))});
    let r = c.ok("/v1/completions", &body).await;
    let report = &r["alignment"];
    assert_eq!(report["decoder"], "deal");
    assert_eq!(report["weights"], json!({"toy": 1.0}));
    assert_eq!(report["arm_forward_tokens"], report["forward_tokens"]);
    assert!(report["reward"].as_f64().unwrap() < 0.0, "{report}");
}
