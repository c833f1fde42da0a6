//! Equilibrium ranking over HTTP, with the real model: reachable on chat and completions, the
//! answer the chosen candidate verbatim (plain and streamed), the report listing every
//! candidate, and its parameters checked with a 400 naming each.

use serde_json::json;

use crate::cases;
use crate::server::{decoder, refused, streams_like, Client};

pub fn cases() -> Vec<(&'static str, crate::Case)> {
    cases![
        a_multiple_choice_answer_is_a_candidate_verbatim,
        sampled_candidates_are_ranked_and_streamed,
        equilibrium_parameters_are_checked
    ]
}

const QUESTION: &str = "What is the capital of France?\nA. Berlin\nB. Paris\nC. Rome\nD. Madrid";

async fn a_multiple_choice_answer_is_a_candidate_verbatim(c: Client) {
    let candidates = ["A", "B", "C", "D"];
    for rank_by in ["er_d", "er_g", "generator", "discriminator"] {
        let alignment = decoder(
            "equilibrium",
            json!({"candidates": candidates, "rank_by": rank_by}),
        );
        let body = json!({"messages": [{"role": "user", "content": QUESTION}],
                          "alignment": alignment});
        let r = c.ok("/v1/chat/completions", &body).await;
        let report = &r["alignment"];
        assert_eq!(report["decoder"], "equilibrium");
        assert_eq!(report["rank_by"], rank_by);
        let listed = report["candidates"].as_array().unwrap();
        assert_eq!(listed.len(), 4);
        let chosen = report["chosen"].as_u64().unwrap() as usize;
        let answer = r["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(answer, candidates[chosen]);
        assert_eq!(r["choices"][0]["finish_reason"], "stop");
        for player in ["generator", "discriminator"] {
            let total: f64 = listed
                .iter()
                .map(|c| c["equilibrium"][player].as_f64().unwrap())
                .sum();
            // The generator's policy is a distribution over candidates; the discriminator's
            // P(correct | y) is one per candidate.
            assert!(total > 0.0 && (player != "generator" || (total - 1.0).abs() < 1e-6));
        }
        assert_eq!(report["iterations"], 5000);
        assert!(report["scored_tokens"].as_u64().unwrap() > 0);
    }
    // Completions too, and the answer streams once ranked.
    let body = json!({"prompt": format!("{QUESTION}\n"),
                      "alignment": decoder("equilibrium", json!({"candidates": ["Paris", "Berlin"]}))});
    let r = c.ok("/v1/completions", &body).await;
    let text = r["choices"][0]["text"].as_str().unwrap();
    assert!(text == "Paris" || text == "Berlin", "{text}");
    streams_like(&c, &body, &r).await;
}

async fn sampled_candidates_are_ranked_and_streamed(c: Client) {
    let body = json!({"prompt": "The capital of France is", "max_tokens": 4, "seed": 3,
                      "temperature": 1.0,
                      "alignment": decoder("equilibrium", json!({"n": 4}))});
    let r = c.ok("/v1/completions", &body).await;
    let report = &r["alignment"];
    assert_eq!(report["sampled"], true);
    let chosen = report["chosen"].as_u64().unwrap() as usize;
    assert_eq!(
        report["candidates"][chosen]["text"],
        r["choices"][0]["text"]
    );
    streams_like(&c, &body, &r).await;
    // best_of_n ranks its candidates the same way when asked.
    let body = json!({"prompt": "The capital of France is", "max_tokens": 4, "seed": 3,
                      "alignment": decoder("best_of_n", json!({"n": 4, "selection": "equilibrium"}))});
    let r = c.ok("/v1/completions", &body).await;
    assert_eq!(r["alignment"]["selection"], "equilibrium");
    assert!(r["alignment"]["equilibrium"]["candidates"].is_array());
}

async fn equilibrium_parameters_are_checked(c: Client) {
    let two = json!(["yes", "no"]);
    let with = |extra: serde_json::Value| {
        let mut p = json!({"candidates": two});
        p.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        decoder("equilibrium", p)
    };
    refused(
        &c,
        &[
            (
                decoder("equilibrium", json!({"candidates": ["yes"]})),
                "alignment.candidates",
                "between 2 and 26",
            ),
            (
                decoder("equilibrium", json!({"candidates": ["yes", " yes "]})),
                "alignment.candidates",
                "distinct",
            ),
            (
                decoder("equilibrium", json!({"candidates": ["yes", " "]})),
                "alignment.candidates",
                "blank",
            ),
            (
                decoder("equilibrium", json!({})),
                "alignment.candidates",
                "needs `candidates`",
            ),
            (
                decoder("equilibrium", json!({"n": 1})),
                "alignment.n",
                "between 2 and 16",
            ),
            (with(json!({"n": 3})), "alignment.n", "not both"),
            (
                with(json!({"lambda_g": -0.5})),
                "alignment.lambda_g",
                "[0, 100]",
            ),
            (with(json!({"eta_d": 0})), "alignment.eta_d", "(0, 100]"),
            (
                with(json!({"iterations": 0})),
                "alignment.iterations",
                "between 1 and 100000",
            ),
            (
                with(json!({"rank_by": "votes"})),
                "alignment.rank_by",
                "unknown variant",
            ),
            (
                with(json!({"judge": {"prompt": "Is it right?"}})),
                "alignment.judge.prompt",
                "{answer}",
            ),
            (
                with(json!({"framing": {"wrong": "x"}})),
                "alignment.framing.wrong",
                "unknown field",
            ),
        ],
    )
    .await;
    let body = json!({"prompt": "Hi", "n": 2, "alignment": with(json!({}))});
    let r = c.post("/v1/completions", &body).await;
    assert_eq!(
        (r.status.as_u16(), &r.body["error"]["param"]),
        (400, &json!("n"))
    );
    let body = json!({"prompt": "Hi", "logprobs": 1, "alignment": with(json!({}))});
    let r = c.post("/v1/completions", &body).await;
    assert_eq!(
        (r.status.as_u16(), &r.body["error"]["param"]),
        (400, &json!("alignment.candidates"))
    );
}
