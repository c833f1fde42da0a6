//! GenARM with the real base model and toy reward models generated here: weight 0 is plain
//! decoding, a reward model steers towards (or away from) what it favours, and a reward model
//! with another tokenizer is refused at load.

mod common;

use serde_json::{json, Value};
use tilt::decode::{self, DecoderSpec, Generation};
use tilt::engine::{Engine, Event};
use tilt::model::Precision;
use tilt::sampling::SamplingParams;

fn generation(engine: &Engine, prompt: &str, n: usize, sampling: SamplingParams) -> Generation {
    Generation {
        prompt: engine.base().vocab.encode(prompt, false).unwrap(),
        max_tokens: 16,
        stop: Vec::new(),
        ignore_eos: false,
        n,
        sampling,
        model_prompts: Default::default(),
    }
}

fn genarm(engine: &Engine, params: Value) -> DecoderSpec {
    let params = params.as_object().cloned().unwrap();
    DecoderSpec::parse("genarm", params, engine.rewards()).unwrap()
}

/// Each choice's tokens, and the report.
fn run(engine: &Engine, spec: &DecoderSpec, g: Generation) -> (Vec<Vec<u32>>, Option<Value>) {
    let mut tokens = vec![Vec::new(); g.n];
    let mut rx = engine
        .submit(spec.build(g, engine.models()).unwrap())
        .unwrap();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Token(t) => tokens[t.choice].push(t.token),
            Event::Done { report, .. } => return (tokens, report),
            Event::Failed(msg) => panic!("request failed: {msg}"),
            _ => {}
        }
    }
    panic!("the engine stopped");
}

#[test]
fn zero_weights_decode_exactly_like_plain_sampling() {
    let (e, _dir) = common::engine_with_toy_arm(common::single_token(" Paris"));
    let sampling = SamplingParams {
        temperature: 0.9,
        seed: Some(7),
        ..Default::default()
    };
    let g = generation(&e, "Tell me about the sea.", 3, sampling);
    let plain = run(&e, &DecoderSpec::sample(), g.clone()).0;
    let (tilted, report) = run(&e, &genarm(&e, json!({"rewards": {"toy": 0}})), g.clone());
    assert_eq!(tilted, plain);
    assert_ne!(plain[0], plain[1], "choices draw from their own streams");
    let report = report.unwrap();
    assert_eq!(report["weights"], json!({"toy": 0.0}));
    assert_eq!(report["kl_per_token"], 0.0);
    // With weight, the same seed gives another answer.
    let (steered, report) = run(&e, &genarm(&e, json!({"rewards": {"toy": 1}})), g);
    assert_ne!(steered, plain);
    assert!(report.unwrap()["kl_per_token"].as_f64().unwrap() > 0.0);
}

#[test]
fn the_favoured_token_appears_with_a_positive_weight_and_vanishes_with_a_negative_one() {
    let paris = common::single_token(" Paris");
    let (e, _dir) = common::engine_with_toy_arm(paris);
    let greedy = |prompt, rewards: Value| {
        let g = generation(&e, prompt, 1, SamplingParams::greedy());
        let spec = genarm(&e, json!({ "rewards": rewards }));
        run(&e, &spec, g).0.remove(0)
    };
    // Where the base says Paris, steering away removes it…
    let france = "The capital of France is";
    assert!(greedy(france, json!({})).contains(&paris));
    assert!(!greedy(france, json!({"toy": -2})).contains(&paris));
    // …and where it does not, steering towards it brings it in.
    let sea = "Write one sentence about the sea:";
    assert!(!greedy(sea, json!({})).contains(&paris));
    assert!(greedy(sea, json!({"toy": 2})).contains(&paris));
    // β divides the weight: weight 2 at β = 100 is too weak to move the answer.
    let g = generation(&e, sea, 1, SamplingParams::greedy());
    let weak = run(
        &e,
        &genarm(&e, json!({"rewards": {"toy": 2}, "beta": 100})),
        g,
    );
    assert_eq!(weak.0[0], greedy(sea, json!({})));
}

#[test]
fn a_kl_budget_bounds_every_step_and_changes_nothing_when_loose() {
    let (e, _dir) = common::engine_with_toy_arm(common::single_token(" Paris"));
    let sampling = SamplingParams {
        temperature: 1.0,
        seed: Some(3),
        ..Default::default()
    };
    let g = generation(&e, "Write one sentence about the sea:", 2, sampling);
    let steer = |budget: Option<f64>| {
        let mut params = json!({"rewards": {"toy": 6}});
        if let Some(b) = budget {
            params["max_kl_per_token"] = b.into();
        }
        let (tokens, report) = run(&e, &genarm(&e, params), g.clone());
        (tokens, report.unwrap())
    };
    let (free, report) = steer(None);
    let unbounded = report["kl_per_token"].as_f64().unwrap();
    assert!(unbounded > 1.0, "{report}");
    let (loose, report) = steer(Some(1e6));
    assert_eq!(loose, free);
    assert_eq!(report["kl_scale"], json!({"mean": 1.0, "min": 1.0}));
    for budget in [0.05, 0.5] {
        let (_, report) = steer(Some(budget));
        // Each step's KL is within the budget, so their mean is too; a binding budget is met.
        let kl = report["kl_per_token"].as_f64().unwrap();
        assert!(kl <= budget + 1e-3 && kl > budget * 0.5, "{report}");
        let min = report["kl_scale"]["min"].as_f64().unwrap();
        assert!(min > 0.0 && min < 1.0, "{report}");
    }
    let plain = run(&e, &DecoderSpec::sample(), g.clone()).0;
    assert_eq!(steer(Some(0.0)).0, plain);
}

#[test]
fn each_model_reads_the_prompt_through_its_own_template() {
    // A per-model prompt reaches the ARM: generation still runs and the tilt still applies.
    let paris = common::single_token(" Paris");
    let (e, _dir) = common::engine_with_toy_arm(paris);
    let arm = &e.models()[1];
    let messages = [tilt::model::Message {
        role: "user".into(),
        content: "Name a fruit.".into(),
    }];
    let own = arm.chat.render(&messages).unwrap();
    assert!(own.starts_with("user: Name a fruit."), "{own:?}");
    let base_text = e.base().chat.render(&messages).unwrap();
    let mut g = generation(&e, &base_text, 1, SamplingParams::greedy());
    g.model_prompts
        .insert(1, arm.vocab.encode(&own, false).unwrap());
    let spec = genarm(&e, json!({"rewards": {"toy": 3}}));
    let (tokens, _) = run(&e, &spec, g);
    assert!(tokens[0].contains(&paris));
}

#[test]
fn a_reward_model_with_another_tokenizer_is_refused() {
    let base = common::model();
    // One token more…
    let bigger = tempfile::tempdir().unwrap();
    common::toy_arm(bigger.path(), 0, |t| {
        t["added_tokens"].as_array_mut().unwrap().push(json!({
            "id": 49152, "content": "<|extra|>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }));
    });
    let e = tilt::model::companions::load(
        &base,
        "bigger",
        bigger.path(),
        tilt::model::Role::Reward,
        Precision::Stored,
    )
    .err()
    .expect("refused");
    let msg = format!("{e:#}");
    assert!(
        msg.contains("`bigger`") && msg.contains(&format!("`{}`", base.name)),
        "{msg}"
    );
    assert!(msg.contains("49153") && msg.contains("49152"), "{msg}");
    // …or the same size with one token renamed.
    let renamed = tempfile::tempdir().unwrap();
    common::toy_arm(renamed.path(), 0, |t| {
        let old = t["added_tokens"][0]["content"]
            .as_str()
            .unwrap()
            .to_string();
        t["added_tokens"][0]["content"] = json!("<|renamed|>");
        let vocab = t["model"]["vocab"].as_object_mut().unwrap();
        let id = vocab.remove(&old).unwrap();
        vocab.insert("<|renamed|>".into(), id);
    });
    let e = tilt::model::companions::load(
        &base,
        "renamed",
        renamed.path(),
        tilt::model::Role::Reward,
        Precision::Stored,
    )
    .err()
    .expect("refused");
    let msg = format!("{e:#}");
    assert!(
        msg.contains("`renamed`") && msg.contains("different token tables"),
        "{msg}"
    );
    // The unedited tokenizer loads.
    let same = tempfile::tempdir().unwrap();
    common::toy_arm(same.path(), 0, |_| {});
    tilt::model::companions::load(
        &base,
        "same",
        same.path(),
        tilt::model::Role::Reward,
        Precision::Stored,
    )
    .unwrap();
}

#[test]
fn unknown_rewards_list_the_loaded_ones() {
    let (e, _dir) = common::engine_with_toy_arm(0);
    let params = json!({"rewards": {"nope": 1}})
        .as_object()
        .cloned()
        .unwrap();
    let err = DecoderSpec::parse("genarm", params, e.rewards()).unwrap_err();
    assert_eq!(err.param.as_deref(), Some("rewards"));
    assert!(
        err.message.contains("`nope`") && err.message.contains("toy"),
        "{}",
        err.message
    );
    // The base is not a reward model.
    let params = json!({"rewards": {"smollm2": 1}})
        .as_object()
        .cloned()
        .unwrap();
    assert!(DecoderSpec::parse("genarm", params, e.rewards()).is_err());
    let params = json!({"rewards": {"toy": 1e39}})
        .as_object()
        .cloned()
        .unwrap();
    let err = DecoderSpec::parse("genarm", params, e.rewards()).unwrap_err();
    assert_eq!(err.param.as_deref(), Some("rewards.toy"));
    // `decode::build` knows genarm too (no rewards: plain decoding).
    assert!(decode::build(
        "genarm",
        generation(&e, "Hi", 1, SamplingParams::greedy()),
        e.models()
    )
    .is_ok());
}

fn best_of_n(engine: &Engine, params: Value) -> DecoderSpec {
    let params = params.as_object().cloned().unwrap();
    DecoderSpec::parse("best_of_n", params, engine.rewards()).unwrap()
}

#[test]
fn best_of_n_scores_candidates_by_the_reward_models_sequence_log_prob() {
    // The toy ARM ignores context: log π_r(y) = 10·[y favoured] − ln(e^10 + V − 1) at every
    // position, so a response of T tokens, k of them favoured, scores 10k − T·ln(e^10 + V − 1).
    let the = common::single_token(" the");
    let (e, _dir) = common::engine_with_toy_arm(the);
    let v = e.models()[1].config.vocab_size as f64;
    let lse = (10f64.exp() + v - 1.0).ln();
    let sampling = SamplingParams {
        temperature: 1.0,
        seed: Some(3),
        ..Default::default()
    };
    let g = generation(&e, "Describe the sea and the sky.", 1, sampling);
    let spec = best_of_n(
        &e,
        json!({"n": 4, "rewards": {"toy": 1}, "return_candidates": true}),
    );
    let (_, report) = run(&e, &spec, g);
    let report = report.unwrap();
    let candidates = report["candidates"].as_array().unwrap();
    let mut favoured = Vec::new();
    for c in candidates {
        let score = c["scores"]["toy"].as_f64().unwrap();
        let t = c["tokens"].as_f64().unwrap();
        let k = (score + t * lse) / 10.0;
        // Q8_0 rounding of the ARM moves each log-prob by far less than 0.01.
        assert!(
            (k - k.round()).abs() < 0.01 * t,
            "{score} is not 10k − {t}·lse: k = {k}"
        );
        let text = c["text"].as_str().unwrap();
        assert!(
            k.round() as usize <= text.matches(" the").count(),
            "{k} in {text:?}"
        );
        favoured.push(score);
    }
    // Hard selection takes the first of equal best scores (candidates of one length with the
    // same count of favoured tokens tie exactly).
    let top = favoured.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let best = favoured.iter().position(|&s| s == top).unwrap();
    assert_eq!(report["chosen"], best);
}

#[test]
fn guided_best_of_one_is_genarm_and_each_choice_gets_its_own_candidates() {
    let paris = common::single_token(" Paris");
    let (e, _dir) = common::engine_with_toy_arm(paris);
    let sampling = SamplingParams {
        temperature: 1.0,
        seed: Some(11),
        ..Default::default()
    };
    let g = generation(&e, "Write one sentence about the sea:", 1, sampling);
    let steered = run(&e, &genarm(&e, json!({"rewards": {"toy": 2}})), g.clone());
    let spec = best_of_n(
        &e,
        json!({"n": 1, "rewards": {"sentiment": 1}, "guide": {"rewards": {"toy": 2}}}),
    );
    let (guided, report) = run(&e, &spec, g.clone());
    assert_eq!(guided, steered.0);
    let report = report.unwrap();
    assert!(report["guide"]["kl_per_token"].as_f64().unwrap() > 0.0);
    assert_eq!(report["guide"]["weights"], json!({"toy": 2.0}));

    // Two choices, two candidates each: choice g's candidates are RNG streams 2g and 2g + 1.
    let mut two = g.clone();
    two.n = 2;
    let spec = best_of_n(&e, json!({"n": 2, "rewards": {"toy": 1}}));
    let (tokens, report) = run(&e, &spec, two);
    let report = report.unwrap();
    assert_eq!(report["choices"].as_array().unwrap().len(), 2);
    let mut four = g;
    four.n = 4;
    let (plain, _) = run(&e, &DecoderSpec::sample(), four);
    for (choice, tokens) in tokens.iter().enumerate() {
        let chosen = report["choices"][choice]["chosen"].as_u64().unwrap() as usize;
        assert_eq!(*tokens, plain[2 * choice + chosen], "choice {choice}");
    }
    // A guide's unknown reward names its parameter.
    let params = json!({"rewards": {"sentiment": 1}, "guide": {"rewards": {"nope": 1}}});
    let err = DecoderSpec::parse(
        "best_of_n",
        params.as_object().cloned().unwrap(),
        e.rewards(),
    )
    .unwrap_err();
    assert_eq!(err.param.as_deref(), Some("guide.rewards"));
}

/// An adapter folder over the last layer's value and down projections, rank 4: `b` 0 leaves the
/// base as it is; otherwise A and B are drawn (seeded) with B up to ±`b`.
fn write_adapter(dir: &std::path::Path, b: f32) {
    let cfg = &common::model().llama.cfg;
    let last = cfg.n_layers - 1;
    let kv = cfg.n_kv_heads * cfg.head_dim;
    let draw = common::draw;
    let name =
        |p: &str, ab: &str| format!("base_model.model.model.layers.{last}.{p}.lora_{ab}.weight");
    let tensors = std::collections::HashMap::from([
        (name("self_attn.v_proj", "A"), draw((4, cfg.hidden), 0.1, 1)),
        (name("self_attn.v_proj", "B"), draw((kv, 4), b, 2)),
        (name("mlp.down_proj", "A"), draw((4, cfg.ffn), 0.1, 3)),
        (name("mlp.down_proj", "B"), draw((cfg.hidden, 4), b, 4)),
    ]);
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        r#"{"r": 4, "lora_alpha": 4}"#,
    )
    .unwrap();
}

/// A LoRA ARM served beside its base: its rows run in the base's forwards, and it is read
/// relative to the base, so with zero adapters every weight decodes exactly like `sample`, and
/// with real ones it steers.
#[test]
fn a_lora_arm_steers_by_what_it_adds_to_the_base() {
    use tilt::model::{companions, Model, Role};
    let (zero, drawn) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_adapter(zero.path(), 0.0);
    write_adapter(drawn.path(), 2.0);
    let base = Model::load(&common::model_path(), "smollm2", Role::Base).unwrap();
    let load = |name: &str, dir: &tempfile::TempDir| {
        companions::load(&base, name, dir.path(), Role::Reward, Precision::Q8_0).unwrap()
    };
    let (zero_arm, drawn_arm) = (load("zero", &zero), load("drawn", &drawn));
    let e = Engine::start(vec![base, zero_arm, drawn_arm], Default::default());
    assert!(e.models()[1].relative && e.models()[2].relative);
    let listed = serde_json::to_string(&e.rewards().list()).unwrap();
    assert!(listed.contains("relative to the base"), "{listed}");
    let sampling = SamplingParams {
        temperature: 0.9,
        seed: Some(11),
        ..Default::default()
    };
    let g = generation(&e, "Tell me about the sea.", 2, sampling);
    let plain = run(&e, &DecoderSpec::sample(), g.clone()).0;
    for w in [1.0, 3.0] {
        let (tokens, report) = run(&e, &genarm(&e, json!({"rewards": {"zero": w}})), g.clone());
        assert_eq!(tokens, plain, "weight {w}");
        let kl = report.unwrap()["kl_per_token"].as_f64().unwrap();
        assert!(kl < 1e-5, "weight {w}: KL {kl}");
    }
    let (tokens, report) = run(&e, &genarm(&e, json!({"rewards": {"drawn": 3.0}})), g);
    assert_ne!(tokens, plain);
    let kl = report.unwrap()["kl_per_token"].as_f64().unwrap();
    assert!(kl > 0.01, "KL {kl}");
}
