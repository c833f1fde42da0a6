//! ARM training: the GenARM loss learns a toy preference, the saved model serves with the same
//! log-probs as the training forward, and bad data fails with clear errors.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use tilt::model::config::RopeStyle;
use tilt::model::{ForwardItem, KvCache, Logits, Precision};
use tilt::train::{self, Arm, ArmConfig, Batch, Pair, TrainOptions};

fn tiny(vocab_size: usize, context_length: usize) -> ArmConfig {
    ArmConfig {
        vocab_size,
        hidden: 32,
        n_layers: 1,
        n_heads: 4,
        n_kv_heads: 2,
        ffn: 64,
        rope_theta: 10_000.0,
        rms_eps: 1e-5,
        context_length,
    }
}

#[test]
fn loss_decreases_and_flips_the_ranking() {
    // Chosen responses are longer, so an untrained (near-uniform) ARM ranks them lower.
    let pairs = vec![
        Pair::new(vec![1, 2], vec![3, 4, 5, 6, 7], vec![8]),
        Pair::new(vec![2, 9], vec![10, 11, 12], vec![13]),
    ];
    let arm = Arm::new(tiny(16, 32), 1).unwrap();
    let margins =
        |arm: &Arm| -> Vec<f32> { train::margins(arm, &pairs, 1.0).unwrap().to_vec1().unwrap() };
    assert!(
        margins(&arm).iter().all(|&m| m < 0.0),
        "{:?}",
        margins(&arm)
    );
    let opts = TrainOptions {
        epochs: 40,
        lr: 1e-2,
        beta_r: 1.0,
        batch: 2,
        seed: 0,
    };
    let reports = train::train(
        &arm,
        &pairs,
        &[],
        &opts,
        &indicatif::ProgressBar::hidden(),
        |_| {},
    )
    .unwrap();
    let (first, last) = (reports[0].train_loss, reports.last().unwrap().train_loss);
    assert!(last < first / 10.0, "loss {first} -> {last}");
    assert!(
        margins(&arm).iter().all(|&m| m > 0.0),
        "{:?}",
        margins(&arm)
    );
    let eval = train::evaluate(&arm, &pairs, 1.0, 8).unwrap();
    assert_eq!(eval.accuracy, 1.0);
}

#[test]
fn response_log_probs_sum_only_response_tokens() {
    let arm = Arm::new(tiny(16, 32), 2).unwrap();
    arm.randomize(3, 0.3).unwrap();
    // Two sequences of different lengths (the shorter is padded) and prompt lengths.
    let seqs = vec![(vec![1u32, 2, 3, 4, 5], 2), (vec![6u32, 7, 8], 1)];
    let got: Vec<f32> = arm
        .response_log_probs(&Batch::new(&seqs).unwrap())
        .unwrap()
        .to_vec1()
        .unwrap();
    for ((seq, prompt), got) in seqs.iter().zip(got) {
        let tokens = Tensor::new(seq.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let lp: Vec<Vec<f32>> = arm
            .log_probs(&tokens)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        let want: f32 = (*prompt..seq.len())
            .map(|t| lp[t - 1][seq[t] as usize])
            .sum();
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
    }
}

/// Log-softmax of every row the inference forward returns for `tokens`.
fn served_log_probs(model: &tilt::model::Model, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = KvCache::new();
    let out = model
        .llama
        .forward(&mut [ForwardItem {
            cache: &mut cache,
            tokens,
            logits: Logits::All,
        }])
        .unwrap();
    out.item(0)
        .map(|row| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
            row.iter().map(|x| x - lse).collect()
        })
        .collect()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn saved_arm_serves_with_the_training_log_probs() {
    let base = common::model();
    let mut cfg = tiny(base.llama.cfg.vocab_size, base.context_length());
    cfg.n_layers = 2;
    let arm = Arm::new(cfg, 4).unwrap();
    // Large weights, so attention, RoPE and the norms all move the log-probs by whole nats.
    arm.randomize(5, 0.3).unwrap();
    for var in arm.varmap.all_vars() {
        if var.rank() == 1 {
            var.set(&Tensor::rand(0.5f32, 1.5f32, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    arm.save(dir.path(), DType::F32, base.vocab.bos, base.vocab.eos)
        .unwrap();
    train::write_tokenizer(&common::model_path(), &base, dir.path()).unwrap();
    let mut served = tilt::model::companions::load(
        &base,
        "arm",
        dir.path(),
        tilt::model::Role::Reward,
        Precision::F32,
    )
    .expect("GenARM accepts it");
    assert_eq!(served.vocab.digest, base.vocab.digest);
    assert_eq!(
        served.chat.render(&[]).unwrap(),
        base.chat.render(&[]).unwrap()
    );

    let tokens = base
        .vocab
        .encode("<|im_start|>user\nIs the sky blue?<|im_end|>\n<|im_start|>assistant\nYes, on a clear day.", false)
        .unwrap();
    let input = Tensor::new(tokens.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let trained: Vec<Vec<f32>> = arm
        .log_probs(&input)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let spread = trained[3].iter().copied().fold(f32::NEG_INFINITY, f32::max)
        - trained[3].iter().copied().fold(f32::INFINITY, f32::min);
    assert!(spread > 5.0, "log-probs too flat to compare: {spread}");
    // The server caches keys and values as f16 (llama.cpp's default); with weights this large
    // that rounding moves log-probs by ~0.02 nats of a range over 5. A wrong layout moves them
    // by whole nats.
    let diff = max_diff(&served_log_probs(&served, &tokens), &trained);
    assert!(diff < 0.05, "served and trained log-probs differ by {diff}");

    // Served as the server does by default, in Q8_0: int8 rounding of weights and activations
    // moves these large log-probs by a few per cent of their range; a wrong layout would move
    // them by all of it.
    let q8 = load_arm(&base, dir.path(), Precision::Q8_0);
    let diff = max_diff(&served_log_probs(&q8, &tokens), &trained);
    eprintln!("Q8_0 ARM log-probs differ from f32 by at most {diff}");
    assert!(
        diff < 0.15 * spread,
        "Q8_0 log-probs differ by {diff} (spread {spread})"
    );

    // The comparison notices a RoPE mismatch.
    served.llama.cfg.rope_style = RopeStyle::Interleaved;
    let diff = max_diff(&served_log_probs(&served, &tokens), &trained);
    assert!(diff > 1e-2, "interleaved RoPE differs by only {diff}");
}

#[test]
fn bad_data_gives_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.jsonl");
    let err = format!("{:#}", train::read_pairs(&missing).unwrap_err());
    assert!(err.contains("missing.jsonl"), "{err}");

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n\n{\"prompt\": \"a\", \"chosen\": \"b\"}\n",
    )
    .unwrap();
    let err = format!("{:#}", train::read_pairs(&bad).unwrap_err());
    assert!(err.contains("bad.jsonl line 3"), "{err}");
    assert!(err.contains("rejected"), "{err}");

    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "\n  \n").unwrap();
    let err = format!("{:#}", train::read_pairs(&empty).unwrap_err());
    assert!(err.contains("no preference pairs"), "{err}");

    // The command reports the error and exits with a failure, without a panic.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tilt"))
        .args(["train-arm", "--data"])
        .arg(&bad)
        .arg("--out")
        .arg(dir.path().join("arm"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("error:") && stderr.contains("line 3"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!dir.path().join("arm").exists());
}

/// `tilt train-arm --data DATA --out OUT --base <the test model>` with `flags`, then `more`;
/// it must succeed. Returns the report it wrote.
fn train_arm(data: &Path, out: &Path, flags: &[&str], more: &[&str]) -> serde_json::Value {
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_tilt"))
        .args(["train-arm", "--data"])
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(["--base"])
        .arg(common::model_path())
        .args(flags)
        .args(more)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap()
}

/// The reward model saved in `dir`, loaded beside `base` as the server loads it.
fn load_arm(base: &tilt::model::Model, dir: &Path, precision: Precision) -> tilt::model::Model {
    tilt::model::companions::load(base, "arm", dir, tilt::model::Role::Reward, precision).unwrap()
}

/// A sentence with predictable continuations, to compare two models' log-probs on.
const CAPITALS: &str = "The capital of France is Paris, and the capital of Italy is Rome.";

/// A pairs file in `dir` holding one short pair twice.
fn one_pair(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("pairs.jsonl");
    let pair = serde_json::json!({"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away."});
    std::fs::write(&data, format!("{pair}\n{pair}\n")).unwrap();
    data
}

#[test]
fn train_arm_command_writes_a_loadable_model_and_report() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pairs.jsonl");
    let lines: Vec<String> = (0..4)
        .map(|i| {
            serde_json::json!({"prompt": format!("Say something about day {i}."),
                "chosen": "What a lovely day!", "rejected": "What an awful, dreadful, gloomy day."})
            .to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out_dir = dir.path().join("arm");
    let report = train_arm(
        &data,
        &out_dir,
        &[
            "--layers", "1", "--hidden", "32", "--ffn", "64", "--epochs", "2",
        ],
        &["--heldout", "0.5", "--lr", "1e-2"],
    );
    assert_eq!(report["pairs"], 4);
    assert_eq!(report["train_pairs"], 2);
    assert_eq!(report["heldout_pairs"], 2);
    assert_eq!(report["epochs"].as_array().unwrap().len(), 2);
    assert!(report["heldout_accuracy"].as_f64().is_some());
    assert!(report["wall_seconds"].as_f64().unwrap() > 0.0);
    let arm = load_arm(&common::model(), &out_dir, Precision::Q8_0);
    assert_eq!(arm.llama.cfg.hidden, 32);
    assert_eq!(arm.context_length(), common::model().context_length());
}

/// `tilt distill` on a little text: the student keeps two of the base's layers, a few steps
/// lower its held-out perplexity, and the GGUF it writes loads as the base's draft (same token
/// table) with the report beside it.
#[test]
fn distill_writes_a_draft_that_learns_and_loads_beside_the_base() {
    use tilt::model::{companions, Model, Role};
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("responses.jsonl");
    let lines: Vec<String> = [
        (
            "Name a colour.",
            "Blue is a calm colour, like the sky on a clear day.",
        ),
        ("What is 2 + 2?", "2 + 2 is 4."),
        ("Say hello.", "Hello! How can I help you today?"),
        ("Name a fruit.", "An apple is a sweet, crunchy fruit."),
    ]
    .iter()
    .map(|(p, r)| serde_json::json!({"prompt": p, "responses": [r]}).to_string())
    .collect();
    std::fs::write(&text, lines.join("\n")).unwrap();
    let out = dir.path().join("draft.gguf");
    tilt::train::distill::run(tilt::train::distill::DistillArgs {
        responses: text.clone(),
        heldout: text,
        out: out.clone(),
        model: Some(common::model_path()),
        layers: vec![0, 29],
        minutes: 10.0,
        max_steps: 6,
        lr: 1e-3,
        batch: 2,
        seed: 0,
    })
    .unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.with_extension("json")).unwrap())
            .unwrap();
    assert_eq!(report["steps"], 6);
    let (before, after) = (
        report["heldout"]["untrained_perplexity"].as_f64().unwrap(),
        report["heldout"]["perplexity"].as_f64().unwrap(),
    );
    assert!(after.is_finite() && after < before, "{before} → {after}");
    let base = Model::load(&common::model_path(), "base", Role::Base).unwrap();
    let draft = companions::load(&base, "draft", &out, Role::Draft, Precision::Q8_0).unwrap();
    assert_eq!(draft.llama.cfg.n_layers, 2);
    assert_eq!(draft.vocab.digest, base.vocab.digest);
}

/// `train-arm --from-layers` with every layer of the base and a learning rate of 0: the saved ARM
/// is the base itself, so it predicts as the base does (the ARM in f32 from f16 weights, the base
/// on its Q4_1 kernels).
#[test]
fn an_arm_from_all_the_base_layers_untrained_predicts_as_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let data = one_pair(dir.path());
    let out_dir = dir.path().join("arm");
    let base = common::model();
    let all: Vec<String> = (0..base.llama.cfg.n_layers)
        .map(|l| l.to_string())
        .collect();
    let layers = all.join(",");
    train_arm(
        &data,
        &out_dir,
        &["--from-layers", &layers, "--epochs", "1", "--lr", "0"],
        &["--heldout", "0", "--max-len", "96"],
    );
    let arm = load_arm(&base, &out_dir, Precision::F32);
    assert_eq!(arm.llama.cfg.hidden, base.llama.cfg.hidden);
    let tokens = base.vocab.encode(CAPITALS, false).unwrap();
    let (a, b) = (
        served_log_probs(&arm, &tokens),
        served_log_probs(&base, &tokens),
    );
    let argmax = |row: &Vec<f32>| (0..row.len()).max_by(|&i, &j| row[i].total_cmp(&row[j]));
    let agree = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| argmax(x) == argmax(y))
        .count();
    eprintln!(
        "top-1 agreement {agree}/{}, max |Δ log p| {}",
        a.len(),
        max_diff(&a, &b)
    );
    assert!(agree * 10 >= a.len() * 9, "{agree} of {}", a.len());
    // Q4_1 kernels against f32: small differences in every log-prob, no more.
    let top: f32 = (a.iter().zip(&b))
        .map(|(x, y)| (x[argmax(y).unwrap()] - y[argmax(y).unwrap()]).abs())
        .fold(0.0, f32::max);
    assert!(top < 0.5, "{top}");
}

/// The base's top two layers as a LoRA ARM of rank 4, adapters drawn large (B too), so they
/// move the log-probs by whole nats.
fn lora_arm(base: &tilt::model::Model) -> Arm {
    let path = common::model_path();
    let mut file = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let n = base.llama.cfg.n_layers;
    let layers = vec![n - 2, n - 1];
    let (cfg, init) = train::distill::base_layers(&mut file, &content, base, &layers).unwrap();
    let mut arm = Arm::new(cfg, 3).unwrap();
    arm.set_weights(&init).unwrap();
    let lora = train::LoraConfig {
        rank: 4,
        alpha: 8.0,
        layers,
        base: "test".into(),
    };
    arm.add_lora(lora, 3).unwrap();
    let mut vars: Vec<(String, candle_core::Var)> = (arm.varmap.data().lock().unwrap().iter())
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (seed, (_, var)) in vars.iter().enumerate() {
        let (rows, cols) = var.dims2().unwrap();
        let bound = if rows == 4 { 0.2 } else { 0.1 };
        var.set(&common::draw((rows, cols), bound, seed as u64))
            .unwrap();
    }
    arm
}

/// The training forward's log-probs of `arm` after every token of `tokens` but the last, from
/// the base's hidden states below its layers.
fn lora_log_probs(arm: &Arm, base: &tilt::model::Model, tokens: &[u32]) -> Vec<Vec<f32>> {
    let below = arm.lora.as_ref().unwrap().layers[0];
    let start = base.llama.hidden_states(tokens, below).unwrap();
    let batch =
        Batch::with_starts(&[(tokens.to_vec(), 1)], &[&start], base.llama.cfg.hidden).unwrap();
    arm.row_log_probs(&batch).unwrap().to_vec2().unwrap()
}

/// A LoRA ARM saves its adapters alone, loads as a model on the base's own weights and serves
/// the log-probs it trained with; its rows in one forward with the base's change nothing of
/// the base's.
#[test]
fn a_lora_arm_serves_on_the_base_weights_with_its_training_log_probs() {
    use tilt::model::{companions, Llama, Role};
    let tokens = common::model()
        .vocab
        .encode("<|im_start|>user\nIs the sky blue?<|im_end|>\n<|im_start|>assistant\nYes, on a clear day it is.", false)
        .unwrap();
    // In f32 only the f16 KV cache rounds; on the Q4_1 kernels int8 activations move logits by
    // about half a nat (as they move the base's), where a wrong layout moves them by the adapters'
    // all. Rows batched with others round their activations as they would alone, but not
    // bit for bit on the int8 path.
    for (base, tolerance, batched) in [
        (common::exact_model(), 0.05, 1e-4),
        (common::model(), 1.0, 0.05),
    ] {
        let arm = lora_arm(&base);
        let trained = lora_log_probs(&arm, &base, &tokens);
        let dir = tempfile::tempdir().unwrap();
        arm.save(dir.path(), DType::F32, None, None).unwrap();
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.contains(&"adapter_model.safetensors".to_string()),
            "{names:?}"
        );
        let served =
            companions::load(&base, "lora", dir.path(), Role::Reward, Precision::Q8_0).unwrap();
        assert!(served.llama.shares_weights(&base.llama));
        let served_lp = served_log_probs(&served, &tokens);
        let base_lp = served_log_probs(&base, &tokens);
        let n = tokens.len() - 1;
        // The adapters move the log-probs by whole nats; served and trained agree far closer.
        let moved = max_diff(&served_lp[..n], &base_lp[..n]);
        let diff = max_diff(&served_lp[..n], &trained);
        eprintln!("adapters move log-probs by up to {moved}; served vs trained {diff}");
        assert!(
            moved > 2.0,
            "the adapters barely move the log-probs: {moved}"
        );
        assert!(
            diff < tolerance,
            "served and trained log-probs differ by {diff}"
        );

        // One forward over base and ARM rows gives each what its own forward gives.
        let (mut c1, mut c2) = (KvCache::new(), KvCache::new());
        let mut items = [
            ForwardItem {
                cache: &mut c1,
                tokens: &tokens,
                logits: Logits::All,
            },
            ForwardItem {
                cache: &mut c2,
                tokens: &tokens,
                logits: Logits::All,
            },
        ];
        let out =
            Llama::forward_shared(&[&base.llama, &served.llama], &mut items, &[1, 1]).unwrap();
        let lsm = |rows: Vec<&[f32]>| -> Vec<Vec<f32>> {
            rows.into_iter()
                .map(|r| {
                    let lse = r.iter().map(|x| (x - r[0]).exp()).sum::<f32>().ln() + r[0];
                    r.iter().map(|x| x - lse).collect()
                })
                .collect()
        };
        let joint_base = lsm(out[0].item(0).collect());
        let joint_arm = lsm(out[1].item(0).collect());
        for (joint, alone) in [(&joint_base, &base_lp), (&joint_arm, &served_lp)] {
            let d = max_diff(joint, alone);
            assert!(d < batched, "batched and alone differ by {d}");
        }
        // Beside its twin (the base item on the same tokens) the ARM's rows skipped the layers
        // below its adapters and copied the twin's keys and values there: its cache is the one
        // it would have filled alone, and it goes on alone from it.
        let mut alone = KvCache::new();
        served
            .llama
            .forward(&mut [ForwardItem {
                cache: &mut alone,
                tokens: &tokens,
                logits: Logits::None,
            }])
            .unwrap();
        let d = c2.max_rel_diff(&alone).unwrap();
        assert!(d < batched, "keys and values differ by {d}");
        let more = base.vocab.encode(" And at night?", false).unwrap();
        let next = |cache: &mut KvCache| {
            let out = served
                .llama
                .forward(&mut [ForwardItem {
                    cache,
                    tokens: &more,
                    logits: Logits::Last,
                }])
                .unwrap();
            out.last(0).unwrap().to_vec()
        };
        let (a, b) = (next(&mut c2), next(&mut alone));
        assert!(max_diff(&[a], &[b]) < batched);
    }
}

/// `train-arm --lora` with a learning rate of 0 leaves B at zero: the saved adapters change
/// nothing, and the ARM predicts exactly as the base does.
#[test]
fn a_lora_arm_with_zero_adapters_predicts_exactly_as_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("arm");
    let report = train_arm(
        &one_pair(dir.path()),
        &out_dir,
        &[
            "--lora",
            "4",
            "--lora-layers",
            "3",
            "--epochs",
            "1",
            "--lr",
            "0",
        ],
        &["--heldout", "0", "--max-len", "96"],
    );
    assert_eq!(report["lora"]["rank"], 4);
    assert_eq!(report["lora"]["layers"], serde_json::json!([27, 28, 29]));
    // Untrained, the ARM is the base: its margins are the reference, the loss is log 2.
    let loss = report["epochs"][0]["train_loss"].as_f64().unwrap();
    assert!((loss - std::f64::consts::LN_2).abs() < 1e-3, "{loss}");
    let base = common::model();
    let arm = load_arm(&base, &out_dir, Precision::Q8_0);
    let tokens = base.vocab.encode(CAPITALS, false).unwrap();
    assert_eq!(
        served_log_probs(&arm, &tokens),
        served_log_probs(&base, &tokens)
    );
}
