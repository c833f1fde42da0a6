//! `tilt eval steer`, `keywords`, `mc`, `adaptive` and `speculative` end to end through the built
//! binary, with the real base model, toy reward models and a few prompts or questions.

mod common;

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn tilt(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tilt"))
        .args(args)
        .output()
        .expect("tilt runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tilt {args:?} failed:\n{stderr}");
    String::from_utf8(out.stdout).unwrap()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Data rows of the first markdown table in `md`.
fn table_rows(md: &str) -> Vec<&str> {
    md.lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .collect()
}

#[test]
fn steer_sweeps_every_setting_and_weight_raises_the_favoured_word() {
    let model = common::model_path();
    let (paris, london) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    common::toy_arm(paris.path(), common::single_token(" Paris"), |_| {});
    common::toy_arm(london.path(), common::single_token(" London"), |_| {});
    let prompts = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        prompts.path(),
        "{\"prompt\": \"Tell me about a city you like.\"}\n{\"prompt\": \"Write about a trip.\"}\n",
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let reward = |name: &str, dir: &Path| format!("{name}={}", dir.display());
    let stdout = tilt(&[
        "eval",
        "steer",
        "--no-default-rewards",
        "--model",
        model.to_str().unwrap(),
        "--reward",
        &reward("paris", paris.path()),
        "--reward",
        &reward("london", london.path()),
        "--objective",
        "paris=count:paris",
        "--objective",
        "london=count:london",
        "--prompts",
        prompts.path().to_str().unwrap(),
        "--weights",
        "0,0.6,1.2",
        "--grid",
        "0,1",
        "--max-kl",
        "0.3",
        "--best-of",
        "2",
        "--max-tokens",
        "8",
        "--seed",
        "3",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    for f in ["steer.md", "steer.svg", "steer.json"] {
        assert!(out.path().join(f).exists(), "{f} missing");
    }
    let report = read_json(&out.path().join("steer.json"));
    let all = report["settings"].as_array().unwrap();
    let method = |m: &str| -> Vec<&Value> { all.iter().filter(|s| s["method"] == m).collect() };
    let mut settings = method("plain");
    settings.extend(method("genarm"));
    // paris 0, 0.6, 1.2; london 0.6, 1.2 (0 shared); grid (0,1), (1,0), (1,1).
    let weights: Vec<(f64, f64)> = settings
        .iter()
        .map(|s| {
            let w = &s["weights"];
            (w["paris"].as_f64().unwrap(), w["london"].as_f64().unwrap())
        })
        .collect();
    let want = [
        (0.0, 0.0),
        (0.6, 0.0),
        (1.2, 0.0),
        (0.0, 0.6),
        (0.0, 1.2),
        (0.0, 1.0),
        (1.0, 0.0),
        (1.0, 1.0),
    ];
    assert_eq!(weights.len(), want.len(), "{weights:?}");
    for w in want {
        assert!(
            weights
                .iter()
                .any(|v| (v.0 - w.0).abs() < 1e-6 && (v.1 - w.1).abs() < 1e-6),
            "{w:?} missing from {weights:?}"
        );
    }
    // Each ARM's nonzero weights again under the budget, which holds every step; best-of-2
    // ranked by each ARM, generating two answers' tokens for each.
    let budgeted = method("genarm, KL ≤ 0.3");
    assert_eq!(budgeted.len(), 4);
    for s in &budgeted {
        assert!(s["kl_per_token"].as_f64().unwrap() <= 0.3 + 1e-3, "{s}");
        let scale = &s["kl_scale"];
        assert!(scale["min"].as_f64().unwrap() <= scale["mean"].as_f64().unwrap());
    }
    for by in ["paris", "london"] {
        let s = method(&format!("best-of-2 by {by}"));
        assert_eq!(s.len(), 1);
        let per_answer = s[0]["generated_per_answer"].as_f64().unwrap();
        assert!(
            per_answer > s[0]["mean_tokens"].as_f64().unwrap(),
            "{}",
            s[0]
        );
    }
    let plain_perplexity = report["fluency"]["plain_perplexity"].as_f64().unwrap();
    assert!(plain_perplexity > 1.0, "{}", report["fluency"]);
    for s in all {
        assert!(s["perplexity"].as_f64().unwrap() >= 1.0, "{s}");
        let words = s["word_tokens"].as_f64().unwrap();
        assert!(words > 0.0 && words <= 1.0, "{s}");
    }
    let md = std::fs::read_to_string(out.path().join("steer.md")).unwrap();
    assert_eq!(table_rows(&md).len(), all.len(), "{md}");
    assert!(md.contains("Best fluent setting per objective"), "{md}");
    assert_eq!(stdout.trim(), md.trim());
    let svg = std::fs::read_to_string(out.path().join("steer.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("Trade-off"));

    let setting = |p: f64, l: f64| {
        settings
            .iter()
            .find(|s| {
                (s["weights"]["paris"].as_f64().unwrap() - p).abs() < 1e-6
                    && (s["weights"]["london"].as_f64().unwrap() - l).abs() < 1e-6
            })
            .unwrap()
    };
    let count = |s: &Value, arm: &str| s["rewards"][arm].as_f64().unwrap();
    let (none, some, more) = (setting(0.0, 0.0), setting(0.6, 0.0), setting(1.2, 0.0));
    assert_eq!(none["kl_per_token"], 0.0);
    assert!(more["kl_per_token"].as_f64().unwrap() > 0.0);
    assert!(
        count(none, "paris") <= count(some, "paris")
            && count(some, "paris") <= count(more, "paris")
            && count(none, "paris") < count(more, "paris"),
        "{} {} {}",
        count(none, "paris"),
        count(some, "paris"),
        count(more, "paris")
    );
    // At +12 nats " Paris" takes a large share of the 8 tokens (plain sampling: none). How many
    // depends on where the base's own choice leads by more than 12 nats.
    assert!(count(more, "paris") >= 2.0, "{}", count(more, "paris"));
    assert!(count(setting(0.0, 1.2), "london") > count(none, "london"));
    let mono = report["monotonicity"].as_array().unwrap();
    assert_eq!(mono.len(), 2);
    assert_eq!(mono[0]["arm"], "paris");
    assert_eq!(mono[0]["monotone"], true);
    assert!(md.contains("Monotonicity"));
    for s in all {
        assert_eq!(s["outputs"].as_array().unwrap().len(), 2);
        let d = s["distinct_2"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&d));
    }
}

#[test]
fn keywords_reports_each_method_and_best_of_n_covers_at_least_as_much() {
    let model = common::model_path();
    let concepts = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        concepts.path(),
        "# two sets\ndog frisbee catch throw\nchef knife cut vegetable\n",
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    tilt(&[
        "eval",
        "keywords",
        "--no-default-rewards",
        "--model",
        model.to_str().unwrap(),
        "--concepts",
        concepts.path().to_str().unwrap(),
        "--method",
        r#"sample={"decoder":"sample"}"#,
        "--method",
        r#"bon={"decoder":"best_of_n","n":4,"constraints":{"keywords":"$concepts"}}"#,
        "--method",
        r#"later={"decoder":"no_such_decoder","constraints":{"keywords":"$concepts"}}"#,
        "--max-tokens",
        "24",
        "--seed",
        "1",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    for f in ["keywords.md", "keywords.svg", "keywords.json"] {
        assert!(out.path().join(f).exists(), "{f} missing");
    }
    let report = read_json(&out.path().join("keywords.json"));
    assert_eq!(report["concept_sets"], 2);
    let methods = report["methods"].as_array().unwrap();
    let names: Vec<&str> = methods
        .iter()
        .map(|m| m["method"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["sample", "bon"]);
    let skipped = report["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0]["method"], "later");
    for m in methods {
        assert_eq!(m["outputs"].as_array().unwrap().len(), 2);
        for key in ["all_present", "mean_coverage"] {
            let v = m[key].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{key} {v}");
        }
        let ppl = m["perplexity"].as_f64().unwrap();
        assert!(ppl > 1.0 && ppl < 1000.0, "perplexity {ppl}");
        assert!(m["output_tokens_per_s"].as_f64().unwrap() > 0.0);
    }
    let cover = |i: usize| methods[i]["mean_coverage"].as_f64().unwrap();
    assert!(
        cover(1) >= cover(0),
        "best_of_n {} < sample {}",
        cover(1),
        cover(0)
    );
    // N candidates cost about N times the tokens of the answer.
    let cost = |i: usize| methods[i]["generated_per_output_token"].as_f64().unwrap();
    assert!((cost(0) - 1.0).abs() < 0.2, "{}", cost(0));
    assert!(cost(1) > 2.0, "{}", cost(1));
    let md = std::fs::read_to_string(out.path().join("keywords.md")).unwrap();
    assert_eq!(table_rows(&md).len(), 2, "{md}");
    assert!(md.contains("`later` skipped"));
    let svg = std::fs::read_to_string(out.path().join("keywords.svg")).unwrap();
    assert_eq!(svg.matches("<circle").count(), 6);
}

#[test]
fn mc_reports_every_ranking_on_the_same_questions() {
    let model = common::model_path();
    let data = tempfile::NamedTempFile::new().unwrap();
    let line = |q: &str, a: &str, b: &str, right: &str, topic: &str| {
        serde_json::json!({"question": q, "answer_a": a, "answer_b": b, "answer_c": "none",
                           "answer_d": "all", "correct_answer": right, "topic": topic})
        .to_string()
    };
    let lines = [
        line("What is 2 + 2?", "4", "5", "A", "math"),
        line("Which is a colour?", "blue", "seven", "A", "words"),
        line("Which is a number?", "green", "seven", "B", "words"),
        "not a question".to_string(),
    ];
    // A line that is not JSON is an error naming it; blank options are skipped instead.
    std::fs::write(data.path(), lines.join("\n")).unwrap();
    let failed = Command::new(env!("CARGO_BIN_EXE_tilt"))
        .args(["eval", "mc", "--data", data.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!failed.status.success());
    assert!(String::from_utf8_lossy(&failed.stderr).contains("line 4"));
    std::fs::write(data.path(), lines[..3].join("\n")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let stdout = tilt(&[
        "eval",
        "mc",
        "--data",
        data.path().to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.path().to_str().unwrap(),
    ]);
    let rows = table_rows(&stdout);
    assert_eq!(rows.len(), 4, "{stdout}");
    let json = read_json(&out.path().join("mc.json"));
    assert_eq!(json["questions"], 3);
    for ranking in ["generator", "discriminator", "er_g", "er_d"] {
        assert_eq!(json["accuracy"][ranking]["of"], 3, "{json}");
        assert!(json["accuracy"][ranking]["right"].as_u64().unwrap() <= 3);
    }
    assert_eq!(json["subjects"]["words"]["er_d"][1], 2);
    assert!(out.path().join("mc.svg").exists());
}

/// `tilt eval adaptive` with the shipped draft: the ends of the sweep are the two models alone
/// (large-only agrees with itself; small-only writes no large token and saves the formula's
/// compute), a middle threshold lies between, and MMLU runs on every setting.
#[test]
fn adaptive_sweeps_from_the_large_model_alone_to_the_small_one() {
    let data = tempfile::NamedTempFile::new().unwrap();
    let q = serde_json::json!({"question": "What is 2 + 2?", "answer_a": "4", "answer_b": "5",
                               "answer_c": "6", "answer_d": "7", "correct_answer": "A",
                               "topic": "math"});
    std::fs::write(data.path(), q.to_string()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let stdout = tilt(&[
        "eval",
        "adaptive",
        "--thresholds",
        "3",
        "--prompts",
        "3",
        "--max-tokens",
        "16",
        "--repeats",
        "1",
        "--mmlu",
        data.path().to_str().unwrap(),
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert_eq!(table_rows(&stdout).len(), 3, "{stdout}");
    let json = read_json(&out.path().join("adaptive.json"));
    let s = json["settings"].as_array().unwrap();
    assert_eq!(s.len(), 3);
    let (large, middle, small) = (&s[0], &s[1], &s[2]);
    assert_eq!(large["threshold"], 0.0);
    assert_eq!(
        (large["large_share"].as_f64(), large["same_answer"].as_f64()),
        (Some(1.0), Some(1.0))
    );
    assert_eq!(small["threshold"], Value::Null);
    assert_eq!(small["large_share"].as_f64(), Some(0.0));
    let ratio = json["cost_ratio"].as_f64().unwrap();
    assert!((small["compute_saved"].as_f64().unwrap() - (1.0 - ratio)).abs() < 1e-9);
    let f = middle["large_share"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&f));
    for setting in s {
        let acc = setting["mmlu_accuracy"].as_f64().unwrap();
        assert!(acc == 0.0 || acc == 1.0, "{setting}");
    }
    assert!(out.path().join("adaptive.svg").exists());
}

#[test]
fn speculative_without_rejection_chooses_as_full_best_of_n_and_with_it_generates_less() {
    let model = common::model_path();
    let out = tempfile::tempdir().unwrap();
    tilt(&[
        "eval",
        "speculative",
        "--no-default-rewards",
        "--model",
        model.to_str().unwrap(),
        "--rank-by",
        r#"{"sentiment": 1}"#,
        "--n",
        "4",
        "--reject-fractions",
        "0,0.5",
        "--checkpoint-tokens",
        "4",
        "--limit",
        "2",
        "--repeats",
        "1",
        "--max-tokens",
        "16",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    let report = read_json(&out.path().join("speculative.json"));
    let settings = report["settings"].as_array().unwrap();
    let names: Vec<&str> = settings
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "full",
            "speculative α=0 every 4",
            "speculative α=0.5 every 4"
        ]
    );
    for s in &settings[..2] {
        // The full run against itself, and rejection of none: the same choices and tokens.
        assert_eq!(s["top2_rate"], 1.0, "{s}");
        assert_eq!(s["mean_regret"], 0.0, "{s}");
        assert_eq!(s["generated_share"], 1.0, "{s}");
        assert_eq!(s["chosen_is_full_candidate"], 2, "{s}");
    }
    // Half stopped at each checkpoint: fewer tokens, and the survivor is the full run's.
    let halved = &settings[2];
    assert!(
        halved["generated_share"].as_f64().unwrap() < 1.0,
        "{halved}"
    );
    assert_eq!(halved["chosen_is_full_candidate"], 2, "{halved}");
    let md = std::fs::read_to_string(out.path().join("speculative.md")).unwrap();
    assert_eq!(table_rows(&md).len(), 3);
}

/// Each text of `yes` scores above its twin in `no`, and every one of `yes` above 0.
fn assert_judged_apart(judge: &tilt::eval::judge::Judge, yes: &[&str], no: &[&str]) {
    let scores = judge.score(&[yes, no].concat()).unwrap();
    for i in 0..yes.len() {
        assert!(scores[i] > scores[yes.len() + i], "{scores:?}");
    }
    assert!(scores[..yes.len()].iter().all(|&s| s > 0.0), "{scores:?}");
    assert_eq!(judge.score(&[""]).unwrap(), [0.0]);
}

#[test]
fn the_judges_tell_glad_texts_from_sad_ones_and_plain_from_dense() {
    let base = common::model();
    let glad = [
        "What a wonderful day! I loved every minute of the trip and the people were so kind.",
        "This is the best meal I have had in years; the staff were friendly and it was delicious.",
        "I am so happy with my new job. My colleagues are great and I feel proud of my work.",
    ];
    let sad = [
        "What an awful day. I hated every minute of the trip and the people were so rude.",
        "This is the worst meal I have had in years; the staff were hostile and it was disgusting.",
        "I am so miserable at my new job. My colleagues are cruel and I feel ashamed of my work.",
    ];
    let sentiment = tilt::eval::judge::Judge::sentiment(&base).unwrap();
    assert_judged_apart(&sentiment, &glad, &sad);
    let plain = [
        "The dog ran to the park. It saw a big red ball and played all day.",
        "We had soup for lunch. It was hot and good, and then we went home.",
        "Rain fell all night. In the morning the grass was wet and the sky was gray.",
    ];
    let dense = [
        "The canine proceeded expeditiously towards the recreational facility, whereupon it \
         encountered a substantial crimson spherical object.",
        "Our midday sustenance comprised a consommé of considerable temperature and exceptional \
         palatability, subsequent to which we returned to our residence.",
        "Precipitation persisted throughout the nocturnal period; consequently, the vegetation \
         exhibited considerable moisture beneath an overcast firmament.",
    ];
    let plainness = tilt::eval::judge::Judge::plainness(&base).unwrap();
    assert_judged_apart(&plainness, &plain, &dense);
}
