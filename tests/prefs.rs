//! `tilt prefs` with the real model, kept small: the pairs rank as the objective's scorer says,
//! the same seed writes the same bytes, `train-arm` trains on the output, and bad arguments fail
//! with clear errors.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use tilt::reward::scorers::letter_share;
use tilt::train::prefs::{Objective, ScoredPair, NOT_AN_ANSWER};

fn tilt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tilt"))
        .args(args)
        .output()
        .expect("tilt runs")
}

/// `tilt prefs` on the real model with `args`, writing `out`; panics on failure.
fn prefs(out: &Path, args: &[&str]) -> Vec<u8> {
    let model = common::model_path();
    let mut all = vec![
        "prefs",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    all.extend(args);
    let run = tilt(&all);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    std::fs::read(out).unwrap()
}

fn parse(bytes: &[u8]) -> Vec<ScoredPair> {
    String::from_utf8(bytes.to_vec())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a pair per line"))
        .collect()
}

/// The pairs `tilt prefs --objective OBJECTIVE` ranks from the responses saved in `saved`.
fn rank_from(objective: &str, saved: &Path, out: &Path) -> Vec<ScoredPair> {
    let run = tilt(&[
        "prefs",
        "--objective",
        objective,
        "--from-responses",
        saved.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    parse(&std::fs::read(out).unwrap())
}

/// Every pair's chosen and rejected responses are the best and worst of the K scores recorded,
/// which differ. A recorded score is the scorer's, or for a `concise` response that is not a real
/// answer (cut off at `--max-tokens`, or mostly symbols) far below any, by its share of lettered
/// pieces; a `concise` pair chooses a real answer, which ended.
fn assert_ranked(pairs: &[ScoredPair], objective: Objective, k: usize) {
    let scorer = objective.scorer();
    let unreal = |text: &str| -NOT_AN_ANSWER + 100.0 * letter_share(text);
    let recorded_as = |recorded: f32, text: &str| {
        recorded == scorer.score(text)
            || (objective == Objective::Concise && recorded == unreal(text))
    };
    for p in pairs {
        assert_eq!(p.scores.len(), k, "{p:?}");
        let max = p.scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let min = p.scores.iter().copied().fold(f32::INFINITY, f32::min);
        assert!(max > min, "{p:?}");
        assert!(
            recorded_as(max, &p.chosen) && recorded_as(min, &p.rejected),
            "{p:?}"
        );
        if objective == Objective::Concise {
            assert!(p.chosen_ended && max == scorer.score(&p.chosen), "{p:?}");
        }
    }
}

const SMALL: &[&str] = &["--split", "all", "--k", "3", "--max-tokens", "12"];

/// Prompts this model answers in a few tokens, so that some of 12-token responses end on their
/// own: `concise` pairs only prompts with a response that ended.
const SHORT: [&str; 3] = [
    "Answer with one word: what color is the sky on a clear day?",
    "Reply with only yes or no: is water wet?",
    "Say hello in one word.",
];

fn short_prompts(dir: &Path) -> std::path::PathBuf {
    let file = dir.join("short.jsonl");
    let lines: Vec<String> = SHORT
        .iter()
        .map(|p| serde_json::json!({ "prompt": p }).to_string())
        .collect();
    std::fs::write(&file, lines.join("\n")).unwrap();
    file
}

#[test]
fn concise_pairs_rank_repeat_by_seed_and_train_an_arm() {
    let dir = tempfile::tempdir().unwrap();
    let short = short_prompts(dir.path());
    let concise = [
        "--objective",
        "concise",
        "--prompts",
        short.to_str().unwrap(),
    ];
    let first = prefs(&dir.path().join("a.jsonl"), &[&concise[..], SMALL].concat());
    let pairs = parse(&first);
    assert!(!pairs.is_empty(), "no prompt had a response that ended");
    assert_ranked(&pairs, Objective::Concise, 3);
    assert!(pairs.iter().all(|p| SHORT.contains(&p.prompt.as_str())));

    let again = prefs(&dir.path().join("b.jsonl"), &[&concise[..], SMALL].concat());
    assert_eq!(first, again, "the same seed writes the same file");
    let other = prefs(
        &dir.path().join("c.jsonl"),
        &[&concise[..], &["--seed", "1"], SMALL].concat(),
    );
    assert_ne!(first, other, "another seed samples other responses");

    let arm = dir.path().join("arm");
    let run = Command::new(env!("CARGO_BIN_EXE_tilt"))
        .args(["train-arm", "--data"])
        .arg(dir.path().join("a.jsonl"))
        .arg("--out")
        .arg(&arm)
        .arg("--base")
        .arg(common::model_path())
        .args(["--layers", "1", "--hidden", "32", "--ffn", "64"])
        .args(["--epochs", "1", "--heldout", "0"])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(arm.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["pairs"], pairs.len());
}

#[test]
fn sentiment_pairs_rank_by_the_lexicon_and_their_responses_serve_another_objective() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pairs.jsonl");
    let saved = dir.path().join("responses.jsonl");
    let args = [
        "--responses",
        saved.to_str().unwrap(),
        "--objective",
        "sentiment",
        "--split",
        "eval",
        "--limit",
        "3",
        "--k",
        "4",
        "--max-tokens",
        "24",
    ];
    let pairs = parse(&prefs(&out, &args));
    assert!(!pairs.is_empty(), "every prompt was a tie");
    assert_ranked(&pairs, Objective::Sentiment, 4);
    let eval = tilt::train::prompts::builtin(tilt::train::prompts::Split::Eval);
    assert!(pairs.iter().all(|p| eval.contains(&p.prompt)));

    // The saved responses, ranked again for concision and plainness without sampling.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&saved)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    // Whether each response ended on its own, which `concise` ranks by.
    assert!(lines
        .iter()
        .all(|l| l["ended"].as_array().unwrap().len() == 4));
    // 24-token responses rarely end, and `concise` pairs only prompts with one that did (its
    // rule is checked exactly in `concise_chooses_a_response_that_ended`).
    let pairs = rank_from("concise", &saved, &dir.path().join("concise.jsonl"));
    assert_ranked(&pairs, Objective::Concise, 4);
    let simple = rank_from("readability", &saved, &dir.path().join("simple.jsonl"));
    assert!(!simple.is_empty(), "every prompt was a tie");
    assert_ranked(&simple, Objective::Readability, 4);
    for p in pairs.iter().chain(&simple) {
        let line = lines
            .iter()
            .find(|l| l["prompt"] == p.prompt.as_str())
            .unwrap();
        let responses = line["responses"].as_array().unwrap();
        assert!(responses.iter().any(|r| r == p.chosen.as_str()), "{p:?}");
        assert!(responses.iter().any(|r| r == p.rejected.as_str()), "{p:?}");
    }
}

#[test]
fn shards_split_the_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let args = |shard| {
        [
            "--objective",
            "concise",
            "--split",
            "all",
            "--limit",
            "3",
            "--k",
            "2",
            "--max-tokens",
            "4",
            "--shard",
            shard,
        ]
    };
    let mut prompts = Vec::new();
    for (i, shard) in ["0/2", "1/2"].into_iter().enumerate() {
        let saved = dir.path().join(format!("r{i}.jsonl"));
        let out = dir.path().join(format!("p{i}.jsonl"));
        prefs(
            &out,
            &[&args(shard)[..], &["--responses", saved.to_str().unwrap()]].concat(),
        );
        for l in std::fs::read_to_string(&saved).unwrap().lines() {
            let l: serde_json::Value = serde_json::from_str(l).unwrap();
            prompts.push((i, l["prompt"].as_str().unwrap().to_string()));
        }
    }
    let all = tilt::train::prompts::builtin(tilt::train::prompts::Split::All);
    let want = vec![
        (0, all[0].clone()),
        (0, all[2].clone()),
        (1, all[1].clone()),
    ];
    assert_eq!(prompts, want);
}

#[test]
fn a_prompt_file_replaces_the_builtin_set() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prompts.jsonl");
    std::fs::write(
        &file,
        "{\"prompt\": \"Say hello in one word.\"}\n\n{\"prompt\": \"Reply with only yes or no: is water wet?\"}\n",
    )
    .unwrap();
    let out = dir.path().join("pairs.jsonl");
    let args = [
        "--objective",
        "concise",
        "--prompts",
        file.to_str().unwrap(),
        "--split",
        "all",
        "--k",
        "3",
        "--max-tokens",
        "12",
    ];
    let pairs = parse(&prefs(&out, &args));
    assert!(!pairs.is_empty(), "every prompt was a tie");
    assert!(pairs
        .iter()
        .all(|p| SHORT[1..].contains(&p.prompt.as_str())));
}

#[test]
fn bad_arguments_fail_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::model_path();
    let out = dir.path().join("pairs.jsonl");
    let bad_file = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad_file,
        "{\"prompt\": \"ok\"}\n{\"text\": \"no prompt\"}\n",
    )
    .unwrap();
    let missing = dir.path().join("missing.jsonl");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--objective", "concise", "--k", "1"],
            "--k must be at least 2",
        ),
        (
            &["--objective", "concise", "--temperature", "0"],
            "--temperature must be above 0",
        ),
        (&["--objective", "concise", "--limit", "0"], "--limit"),
        (
            &["--objective", "concise", "--max-tokens", "0"],
            "--max-tokens",
        ),
        (&["--objective", "kindness"], "invalid value 'kindness'"),
        (
            &[
                "--objective",
                "concise",
                "--prompts",
                bad_file.to_str().unwrap(),
            ],
            "bad.jsonl line 2",
        ),
        (
            &[
                "--objective",
                "concise",
                "--prompts",
                missing.to_str().unwrap(),
            ],
            "missing.jsonl",
        ),
    ];
    for (args, needle) in cases {
        let mut all = vec![
            "prefs",
            "--model",
            model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        all.extend(*args);
        let run = tilt(&all);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
    let run = tilt(&[
        "prefs",
        "--objective",
        "concise",
        "--out",
        dir.path().join("no/such/dir/pairs.jsonl").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        stderr.contains("creating") && stderr.contains("no/such/dir"),
        "{stderr}"
    );
}

#[test]
fn concise_chooses_a_response_that_ended() {
    // The cut-off response has the fewest words (symbols say little per token), and so has one
    // of digits that ended; the shortest real answer is chosen over them, and a prompt without
    // a real answer (all cut off, or digits) gives no pair.
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("responses.jsonl");
    let lines = [
        serde_json::json!({
            "prompt": "p1",
            "responses": ["It is blue, mostly.", "\"1\" \"2\" \"3\"", "Blue.", "4 5"],
            "ended": [true, false, true, true],
        }),
        serde_json::json!({
            "prompt": "p2",
            "responses": ["a b c", "a", "1 2"],
            "ended": [false, false, true],
        }),
    ];
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(&saved, text.join("\n")).unwrap();
    let pairs = rank_from("concise", &saved, &dir.path().join("pairs.jsonl"));
    assert_eq!(pairs.len(), 1, "{pairs:?}");
    assert_eq!(pairs[0].chosen, "Blue.");
    assert_eq!(pairs[0].rejected, "\"1\" \"2\" \"3\"");
    // `train-arm` ends only the chosen one with the end token.
    assert!(pairs[0].chosen_ended && !pairs[0].rejected_ended);
}
