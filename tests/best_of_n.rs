//! Best-of-N with the real base model: one candidate is plain sampling, a seed fixes everything,
//! soft selection with a tiny β is hard selection, a length budget picks the shortest candidate,
//! and calibration samples its references in the same run.

mod common;

use common::{run, Run};

use serde_json::{json, Value};
use tilt::decode::{DecoderSpec, Generation};
use tilt::engine::{Engine, EngineOptions};
use tilt::model::{Model, Role};
use tilt::sampling::SamplingParams;

fn engine() -> Engine {
    let base = Model::load(&common::model_path(), "smollm2", Role::Base).unwrap();
    Engine::start(vec![base], EngineOptions::default())
}

fn generation(engine: &Engine, prompt: &str, max_tokens: usize, seed: u64) -> Generation {
    Generation {
        prompt: engine.base().vocab.encode(prompt, false).unwrap(),
        max_tokens,
        stop: Vec::new(),
        ignore_eos: false,
        n: 1,
        sampling: SamplingParams {
            temperature: 1.0,
            seed: Some(seed),
            ..Default::default()
        },
        model_prompts: Default::default(),
    }
}

fn best_of_n(engine: &Engine, params: Value) -> DecoderSpec {
    let params = params.as_object().cloned().unwrap();
    DecoderSpec::parse("best_of_n", params, engine.rewards()).unwrap()
}

/// Words as the scorers count them: letters, digits and inner apostrophes.
fn words(text: &str) -> usize {
    text.split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .filter(|w| !w.trim_matches('\'').is_empty())
        .count()
}

fn candidates(report: &Value) -> &Vec<Value> {
    report["candidates"].as_array().expect("candidates listed")
}

const PROMPT: &str = "Write a short, cheerful note to a friend:";

#[test]
fn one_candidate_is_plain_sampling_with_the_same_seed() {
    let e = engine();
    let g = generation(&e, PROMPT, 24, 7);
    let plain = run(&e, &DecoderSpec::sample(), g.clone());
    let one = run(
        &e,
        &best_of_n(&e, json!({"n": 1, "rewards": {"sentiment": 1}})),
        g,
    );
    assert_eq!(one.tokens, plain.tokens);
    assert_eq!(one.text, plain.text);
    assert_eq!(one.report["n"], 1);
    assert_eq!(one.report["chosen"], 0);
    assert_eq!(one.report["kl_bound"], 0.0);
    assert_eq!(one.report["generated_tokens"], plain.completion_tokens);
}

#[test]
fn a_seed_fixes_the_candidates_and_the_choice() {
    let e = engine();
    let spec = best_of_n(
        &e,
        json!({"n": 4, "rewards": {"sentiment": 1}, "selection": "soft", "beta": 0.5,
               "return_candidates": true}),
    );
    let a = run(&e, &spec, generation(&e, PROMPT, 16, 11));
    let b = run(&e, &spec, generation(&e, PROMPT, 16, 11));
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.report, b.report);
    let texts: Vec<&Value> = candidates(&a.report).iter().map(|c| &c["text"]).collect();
    assert!(texts[1..].iter().any(|t| *t != texts[0]), "{texts:?}");
    let chosen = a.report["chosen"].as_u64().unwrap() as usize;
    assert_eq!(candidates(&a.report)[chosen]["text"], a.text.as_str());
    let n = 4f64;
    assert!((a.report["kl_bound"].as_f64().unwrap() - (n.ln() - (n - 1.0) / n)).abs() < 1e-9);
    // The cost is every candidate's tokens, not just the answer's.
    let total: u64 = candidates(&a.report)
        .iter()
        .map(|c| c["tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(a.report["generated_tokens"], total);
    assert_eq!(a.completion_tokens as u64, total);
}

#[test]
fn soft_selection_with_a_tiny_beta_is_hard_selection() {
    let e = engine();
    let params = |selection: Value| {
        let mut p = json!({"n": 6, "rewards": {"sentiment": 1}, "constraints": {"max_words": 8},
                           "return_candidates": true});
        p.as_object_mut()
            .unwrap()
            .extend(selection.as_object().unwrap().clone());
        best_of_n(&e, p)
    };
    for seed in [1, 2, 3] {
        let hard = run(&e, &params(json!({})), generation(&e, PROMPT, 16, seed));
        let soft = run(
            &e,
            &params(json!({"selection": "soft", "beta": 1e-9})),
            generation(&e, PROMPT, 16, seed),
        );
        assert_eq!(candidates(&hard.report), candidates(&soft.report));
        let scores: Vec<f64> = hard.report["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_f64().unwrap())
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let reward = |r: &Run| scores[r.report["chosen"].as_u64().unwrap() as usize];
        // Ties may resolve either way; the reward may not.
        assert_eq!(reward(&hard), max);
        assert_eq!(reward(&soft), max);
        assert_eq!(soft.report["selection"], "soft");
    }
}

#[test]
fn a_word_budget_picks_the_shortest_candidate() {
    let e = engine();
    let spec = best_of_n(
        &e,
        json!({"n": 8, "constraints": {"max_words": 1}, "return_candidates": true}),
    );
    let r = run(&e, &spec, generation(&e, PROMPT, 32, 5));
    let lengths: Vec<usize> = candidates(&r.report)
        .iter()
        .map(|c| words(c["text"].as_str().unwrap()))
        .collect();
    let shortest = *lengths.iter().min().unwrap();
    assert!(
        lengths.iter().any(|&l| l != shortest),
        "the candidates differ in length: {lengths:?}"
    );
    assert_eq!(words(&r.text), shortest, "{lengths:?}: {}", r.text);
}

#[test]
fn calibration_scores_quantiles_among_extra_reference_samples() {
    let e = engine();
    let spec = best_of_n(
        &e,
        json!({"n": 3, "rewards": {"sentiment": 2}, "constraints": {"keywords": ["friend", "sun"]},
               "calibrate": 5, "return_candidates": true}),
    );
    let r = run(&e, &spec, generation(&e, PROMPT, 12, 9));
    assert_eq!(r.report["calibrate"], 5);
    assert_eq!(
        r.report["weights"],
        json!({"sentiment": 2.0, "keywords": 1.0})
    );
    let listed = candidates(&r.report);
    assert_eq!(listed.len(), 3);
    for c in listed {
        let q = &c["calibrated"];
        for name in ["sentiment", "keywords"] {
            let v = q[name].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{c}");
            // Quantiles among 5 references, ties counting ½, are multiples of 0.1.
            assert!(((v * 10.0).round() - v * 10.0).abs() < 1e-6, "{c}");
        }
        let reward = 2.0 * q["sentiment"].as_f64().unwrap() + q["keywords"].as_f64().unwrap();
        assert!((c["reward"].as_f64().unwrap() - reward).abs() < 1e-6, "{c}");
    }
    // The references were generated (and paid for) too.
    let listed_tokens: u64 = listed.iter().map(|c| c["tokens"].as_u64().unwrap()).sum();
    assert!(r.report["generated_tokens"].as_u64().unwrap() > listed_tokens);
}
