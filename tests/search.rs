//! The search decoders `args` and `deal` with the real base model: each reduces to greedy decoding
//! when the search is trivial, a seed fixes ARGS' sampling, a keyword constraint puts a keyword
//! into the answer that greedy decoding leaves out, and DeAL's forward-token count is the
//! documented formula. ARGS with a toy reward model steers towards (or away from) the token it
//! favours.

mod common;

use common::run;

use serde_json::{json, Value};
use tilt::decode::{DecoderSpec, Generation};
use tilt::engine::{Engine, EngineOptions, Event};
use tilt::model::{Message, Model, Role};
use tilt::sampling::SamplingParams;

fn engine() -> Engine {
    let base = Model::load(&common::model_path(), "smollm2", Role::Base).unwrap();
    Engine::start(vec![base], EngineOptions::default())
}

/// `question` as a user message in the base's chat template, decoded greedily.
fn generation(engine: &Engine, question: &str, max_tokens: usize) -> Generation {
    let base = engine.base();
    let text = base
        .chat
        .render(&[Message {
            role: "user".into(),
            content: question.into(),
        }])
        .unwrap();
    Generation {
        prompt: base.vocab.encode(&text, false).unwrap(),
        max_tokens,
        stop: Vec::new(),
        ignore_eos: false,
        n: 1,
        sampling: SamplingParams::greedy(),
        model_prompts: Default::default(),
    }
}

fn spec(engine: &Engine, decoder: &str, params: Value) -> DecoderSpec {
    let params = params.as_object().cloned().unwrap();
    DecoderSpec::parse(decoder, params, engine.rewards()).unwrap()
}

fn has_word(text: &str, word: &str) -> bool {
    text.split(|c: char| !c.is_alphanumeric())
        .any(|w| w.eq_ignore_ascii_case(word))
}

/// Greedy decoding answers "the Blue Whale"; a shark is close behind.
const OCEAN: &str = "Name one animal that lives in the ocean.";

#[test]
fn trivial_searches_are_greedy_decoding() {
    let e = engine();
    let g = generation(&e, OCEAN, 16);
    let greedy = run(&e, &DecoderSpec::sample(), g.clone());
    // Unpulled: the keywords only score.
    let keywords = json!({"keywords": ["shark"], "keyword_boost": 0});
    // One candidate per step: nothing to rescore.
    let args = run(
        &e,
        &spec(&e, "args", json!({"top_k": 1, "constraints": keywords})),
        g.clone(),
    );
    // No weight on the reward: the base's best token.
    let unweighted = run(
        &e,
        &spec(&e, "args", json!({"weight": 0, "constraints": keywords})),
        g.clone(),
    );
    // One beam of one token: the rollouts only look.
    let deal = run(
        &e,
        &spec(
            &e,
            "deal",
            json!({"top_k": 1, "beam_width": 1, "lookahead": 3, "constraints": keywords}),
        ),
        g,
    );
    for r in [&args, &unweighted, &deal] {
        assert_eq!(r.tokens, greedy.tokens, "{} vs {}", r.text, greedy.text);
        assert_eq!(r.text, greedy.text);
        assert_eq!(r.completion_tokens, greedy.completion_tokens);
    }
    // ARGS feeds every answer token but the last, like greedy decoding.
    assert_eq!(args.report["forward_tokens"], greedy.tokens.len() - 1);
    assert_eq!(args.report["mode"], "greedy");
}

#[test]
fn a_keyword_constraint_brings_in_what_greedy_leaves_out() {
    let e = engine();
    let g = generation(&e, OCEAN, 16);
    let greedy = run(&e, &DecoderSpec::sample(), g.clone());
    assert!(!has_word(&greedy.text, "shark"), "{}", greedy.text);
    let keywords = json!({"keywords": ["shark"]});
    let args = run(
        &e,
        &spec(&e, "args", json!({"weight": 5, "constraints": keywords})),
        g.clone(),
    );
    assert!(has_word(&args.text, "shark"), "{}", args.text);
    assert_eq!(args.report["rewards"], json!([1.0]));
    let deal = spec(
        &e,
        "deal",
        json!({"top_k": 4, "beam_width": 2, "lookahead": 3, "lambda": 5, "constraints": keywords}),
    );
    let a = run(&e, &deal, g.clone());
    assert!(has_word(&a.text, "shark"), "{}", a.text);
    assert_eq!(a.report["reward"], 1.0);
    assert_eq!(a.report["weights"], json!({"keywords": 1.0}));
    // The search is deterministic, and what streamed as agreed is the whole answer.
    let b = run(&e, &deal, g);
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.report, b.report);
    assert_eq!(a.completion_tokens, a.tokens.len());
}

#[test]
fn a_seed_fixes_args_sampling() {
    let e = engine();
    let mut g = generation(&e, OCEAN, 12);
    g.sampling = SamplingParams {
        temperature: 1.0,
        seed: Some(3),
        ..Default::default()
    };
    let s = spec(
        &e,
        "args",
        json!({"mode": "sample", "top_k": 5, "rewards": {"sentiment": 1}}),
    );
    let a = run(&e, &s, g.clone());
    let b = run(&e, &s, g.clone());
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.report, b.report);
    assert_eq!(a.report["mode"], "sample");
    let others: Vec<Vec<u32>> = (4..8)
        .map(|seed| {
            g.sampling.seed = Some(seed);
            run(&e, &s, g.clone()).tokens
        })
        .collect();
    assert!(
        others.iter().any(|t| *t != a.tokens),
        "seeds draw differently"
    );
}

/// The formula of `decode::deal`'s documentation.
fn deal_forward_tokens(k: usize, b: usize, l: usize, max_tokens: usize) -> usize {
    (1..max_tokens)
        .map(|t| k * b.min(k.pow(t as u32 - 1)) * l.min(max_tokens - t).max(1))
        .sum()
}

#[test]
fn deal_forward_tokens_follow_the_formula() {
    let e = engine();
    for (k, b, l, max_tokens) in [(3, 2, 2, 6), (2, 2, 0, 5), (2, 3, 4, 4)] {
        let mut g = generation(&e, OCEAN, max_tokens);
        g.ignore_eos = true;
        let s = spec(
            &e,
            "deal",
            json!({"top_k": k, "beam_width": b, "lookahead": l, "rewards": {"sentiment": 1}}),
        );
        let r = run(&e, &s, g);
        assert_eq!(r.tokens.len(), max_tokens);
        let expected = deal_forward_tokens(k, b, l, max_tokens);
        assert_eq!(
            r.report["forward_tokens"], expected,
            "k {k}, b {b}, l {l}, T {max_tokens}: {}",
            r.report
        );
        let per = r.report["forward_tokens_per_output_token"]
            .as_f64()
            .unwrap();
        assert!((per - expected as f64 / max_tokens as f64).abs() < 1e-9);
    }
    // Spelled out once: k·min(b, k^(t−1))·min(l, T − t) for t = 1..5.
    assert_eq!(deal_forward_tokens(3, 2, 2, 6), 6 + 12 + 12 + 12 + 6);
}

#[test]
fn deal_stops_at_a_stop_string() {
    let e = engine();
    let mut g = generation(&e, OCEAN, 32);
    let greedy = run(&e, &DecoderSpec::sample(), g.clone());
    let cut = greedy
        .text
        .find(" ocean")
        .expect("greedy mentions the ocean");
    g.stop = vec![" ocean".into()];
    let s = spec(
        &e,
        "deal",
        json!({"top_k": 1, "beam_width": 1, "lookahead": 2, "rewards": {"sentiment": 1}}),
    );
    let r = run(&e, &s, g);
    assert_eq!(r.text, greedy.text[..cut]);
    assert!(r.tokens.len() < greedy.tokens.len(), "{}", r.text);
}

#[test]
fn deal_streams_each_token_once_the_beams_agree() {
    let e = engine();
    // One beam agrees with itself at once: each token streams the iteration it is chosen.
    let s = spec(
        &e,
        "deal",
        json!({"top_k": 3, "beam_width": 1, "lookahead": 2, "rewards": {"sentiment": 1}}),
    );
    let mut g = generation(&e, OCEAN, 12);
    g.ignore_eos = true;
    let mut rx = e.submit(s.build(g, e.models()).unwrap()).unwrap();
    loop {
        match rx.blocking_recv().expect("the engine answers") {
            Event::Token(_) => break,
            Event::Started { .. } | Event::Prompt(_) => {}
            other => panic!("{other:?} before the first token"),
        }
    }
    // Eleven more iterations of rollouts are still to run: nothing has finished yet.
    while let Ok(ev) = rx.try_recv() {
        assert!(
            matches!(ev, Event::Token(_)),
            "{ev:?} with the first tokens"
        );
    }
    while let Some(ev) = rx.blocking_recv() {
        if matches!(ev, Event::Done { .. }) {
            return;
        }
    }
    panic!("the engine stopped");
}

/// `prompt` as raw text, decoded greedily.
fn raw(engine: &Engine, prompt: &str, max_tokens: usize) -> Generation {
    let mut g = generation(engine, "", max_tokens);
    g.prompt = engine.base().vocab.encode(prompt, false).unwrap();
    g
}

#[test]
fn args_steers_with_a_reward_models_next_token_log_prob() {
    let (e, _dir) = common::engine_with_toy_arm(common::single_token(" Paris"));
    let paris = common::single_token(" Paris");
    let args = |g: Generation, w: f64| {
        let s = spec(&e, "args", json!({"rewards": {"toy": w}}));
        // The API renders the prompt in the template of each model args runs.
        assert_eq!(s.models().len(), usize::from(w != 0.0));
        run(&e, &s, g)
    };
    // Where greedy decoding does not say Paris, the ARM brings it in…
    let sea = raw(&e, "Last summer we travelled to", 12);
    let greedy = run(&e, &DecoderSpec::sample(), sea.clone());
    // "… the moon."
    assert!(!greedy.tokens.contains(&paris), "{}", greedy.text);
    let towards = args(sea.clone(), 5.0);
    assert!(towards.tokens.contains(&paris), "{}", towards.text);
    // One ARM forward per base forward; the reported reward is the ARM's sequence log-prob,
    // weighted, which favours the answer with Paris.
    let r = &towards.report;
    assert_eq!(r["arm_forward_tokens"], r["forward_tokens"]);
    assert_eq!(r["forward_tokens"], towards.tokens.len() - 1);
    assert_eq!(r["weights"], json!({"toy": 5.0}));
    let t = towards.tokens.len();
    close(&r["rewards"][0], 5.0 * toy_log_prob(&e, &towards.tokens), t);
    // …weight 0 is greedy decoding, without ARM forwards…
    let unweighted = args(sea, 0.0);
    assert_eq!(unweighted.tokens, greedy.tokens);
    assert_eq!(unweighted.report["arm_forward_tokens"], 0);
    // …and where greedy says Paris, a negative weight takes it out.
    let france = raw(&e, "The capital of France is", 4);
    let greedy = run(&e, &DecoderSpec::sample(), france.clone());
    assert!(greedy.tokens.contains(&paris), "{}", greedy.text);
    let away = args(france, -5.0);
    assert!(!away.tokens.contains(&paris), "{}", away.text);
}

#[test]
fn deal_steers_with_a_reward_models_sequence_log_prob() {
    let (e, _dir) = common::engine_with_toy_arm(common::single_token(" Paris"));
    let paris = common::single_token(" Paris");
    let deal = |g: Generation, w: f64| {
        let s = spec(
            &e,
            "deal",
            json!({"top_k": 10, "beam_width": 2, "lookahead": 2, "rewards": {"toy": w}}),
        );
        assert_eq!(s.models().len(), usize::from(w != 0.0));
        run(&e, &s, g)
    };
    // Where greedy decoding does not say Paris, the ARM brings it in…
    let summer = raw(&e, "Last summer we travelled to", 8);
    let greedy = run(&e, &DecoderSpec::sample(), summer.clone());
    assert!(!greedy.tokens.contains(&paris), "{}", greedy.text);
    let towards = deal(summer.clone(), 5.0);
    assert!(towards.tokens.contains(&paris), "{}", towards.text);
    // The ARM rolls out alongside the base: one ARM forward per base forward.
    let r = &towards.report;
    assert_eq!(r["arm_forward_tokens"], r["forward_tokens"]);
    // The answer's reward counts its own tokens, not the last lookahead.
    let t = towards.tokens.len();
    close(&r["reward"], 5.0 * toy_log_prob(&e, &towards.tokens), t);
    // …weight 0 runs no ARM and scores nothing: the search follows log π alone…
    let unweighted = deal(summer, 0.0);
    assert_eq!(unweighted.report["arm_forward_tokens"], 0);
    assert_eq!(unweighted.report["reward"], 0.0);
    // …and where greedy says Paris, a negative weight takes it out.
    let france = raw(&e, "The capital of France is", 4);
    let greedy = run(&e, &DecoderSpec::sample(), france.clone());
    assert!(greedy.tokens.contains(&paris), "{}", greedy.text);
    let away = deal(france, -5.0);
    assert!(!away.tokens.contains(&paris), "{}", away.text);
}

/// The toy ARM ignores context: log π_r(y) = 10·[y is " Paris"] − ln(e^10 + V − 1) at every
/// position, so `tokens` score Σ_t log π_r = 10k − T·ln(e^10 + V − 1) with k of them Paris.
fn toy_log_prob(engine: &Engine, tokens: &[u32]) -> f64 {
    let paris = common::single_token(" Paris");
    let v = engine.models()[1].config.vocab_size as f64;
    let k = tokens.iter().filter(|&&t| t == paris).count() as f64;
    10.0 * k - tokens.len() as f64 * (10f64.exp() + v - 1.0).ln()
}

/// `reported` is `expected` up to the ARM's Q8_0 rounding (far below 0.01 a token).
fn close(reported: &Value, expected: f64, tokens: usize) {
    let r = reported.as_f64().unwrap();
    assert!(
        (r - expected).abs() < 0.05 * tokens as f64,
        "{r} vs {expected}"
    );
}

#[test]
fn keywords_the_prompt_does_not_suggest_are_written() {
    let e = engine();
    let g = generation(&e, "Write one sentence about everyday life.", 48);
    let greedy = run(&e, &DecoderSpec::sample(), g.clone());
    assert!(!has_word(&greedy.text, "frisbee"), "{}", greedy.text);
    // The search with lookahead writes it greedily; ARGS, one step at a time, writes such words
    // in most sets at sampling temperature (docs/evaluation.md).
    let keywords = json!({"constraints": {"keywords": ["frisbee"]}});
    let out = run(&e, &spec(&e, "deal", keywords), g);
    assert!(has_word(&out.text, "frisbee"), "{}", out.text);
    assert!(out.report["pruned"].as_u64().unwrap() > 0, "{}", out.report);
}
