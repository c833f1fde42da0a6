//! `tilt distill`: a small draft of the base for the `adaptive` decoder. The student is a subset
//! of the base's own layers over its embeddings (tied, and frozen: the student reads and writes
//! the base's token space), trained to match the base's next-token distributions on text the
//! base wrote (`tilt prefs --responses`): the loss is the cross-entropy of the student's
//! log-probs under the base's probabilities, which is KL(base ‖ student) up to the base's own
//! entropy. The result is a GGUF with the base's metadata and tokenizer and its matrices in
//! Q4_1, as the base's are; it is judged through tilt's own loader and kernels: held-out
//! perplexity and top-1 agreement against the base.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::model::{Arm, ArmConfig, Batch};
use crate::model::{fetch, ForwardItem, ForwardOutput, KvCache, Logits, Model, Role};

#[derive(clap::Args, Debug)]
pub struct DistillArgs {
    /// Training text: a `tilt prefs --responses` file ({"prompt", "responses"} per line).
    #[arg(long)]
    pub responses: PathBuf,
    /// Held-out text, in the same format (e.g. from `tilt prefs --split eval`).
    #[arg(long)]
    pub heldout: PathBuf,
    /// The GGUF file to write; a report goes beside it (`.json`).
    #[arg(long)]
    pub out: PathBuf,
    /// The base GGUF (default: the manifest's default model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The base's layers the student keeps, in order.
    #[arg(long, value_delimiter = ',', default_value = "0,1,2,29")]
    pub layers: Vec<usize>,
    /// Training time, in minutes.
    #[arg(long, default_value_t = 40.0)]
    pub minutes: f64,
    /// At most this many steps (0: only the time counts).
    #[arg(long, default_value_t = 0)]
    pub max_steps: usize,
    #[arg(long, default_value_t = 3e-4)]
    pub lr: f64,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// One line of a `--responses` file.
#[derive(Deserialize)]
struct Responses {
    prompt: String,
    responses: Vec<String>,
    #[serde(default)]
    ended: Vec<bool>,
}

/// A prompt and response in base tokens, with where the response starts.
type Sequence = (Vec<u32>, usize);

/// Every (prompt, response) of `path`, rendered and tokenized as the base reads them; a response
/// that ended on its own ends with EOS.
fn read_sequences(path: &Path, base: &Model) -> Result<Vec<Sequence>> {
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut seqs = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let r: Responses = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}", path.display(), i + 1))?;
        let prompt = super::render_prompt(&base.chat, &base.vocab, &r.prompt)?;
        for (j, text) in r.responses.iter().enumerate() {
            let mut tokens = prompt.clone();
            tokens.extend(base.vocab.encode(text, false)?);
            if r.ended.get(j).copied().unwrap_or(true) {
                tokens.extend(base.vocab.eos);
            }
            if tokens.len() > prompt.len() && tokens.len() <= base.context_length() {
                seqs.push((tokens, prompt.len()));
            }
        }
    }
    if seqs.is_empty() {
        bail!("{} holds no responses", path.display());
    }
    Ok(seqs)
}

/// `model`'s logits at every position but the last of each sequence, each read from scratch.
fn rows_of(model: &Model, seqs: &[Sequence]) -> Result<ForwardOutput> {
    let mut caches: Vec<KvCache> = seqs.iter().map(|_| KvCache::new()).collect();
    let mut items: Vec<ForwardItem> = caches
        .iter_mut()
        .zip(seqs)
        .map(|(cache, (tokens, _))| ForwardItem {
            cache,
            tokens: &tokens[..tokens.len() - 1],
            logits: Logits::All,
        })
        .collect();
    Ok(model.llama.forward(&mut items)?)
}

/// The base's next-token probabilities at each response row of `seqs` (row p predicts token
/// p + 1, from the prompt's last position on), in the order `Batch` lays them out.
fn teacher(base: &Model, seqs: &[Sequence]) -> Result<Tensor> {
    let out = rows_of(base, seqs)?;
    let mut probs = Vec::new();
    for (i, (_, prompt)) in seqs.iter().enumerate() {
        for row in out.item(i).skip(prompt - 1) {
            let start = probs.len();
            probs.extend_from_slice(row);
            let p = &mut probs[start..];
            let total = crate::math::exp_in_place(p, crate::math::max(row), 1.0);
            p.iter_mut().for_each(|x| *x /= total);
        }
    }
    let rows = probs.len() / out.vocab;
    Ok(Tensor::from_vec(probs, (rows, out.vocab), &Device::Cpu)?)
}

/// GGUF rows of attention heads interleave each head's two halves (llama.cpp's permutation for
/// its RoPE); Hugging Face's, which the trainer uses, keep them apart.
/// A model of the base's `layers` (in order) over its embeddings and final norm: its config and
/// its weights under Hugging Face names (RoPE in halves, as `Arm` computes it), read from the
/// base's GGUF `content` in `file` and dequantized. Where a draft or an ARM starts from the base.
pub fn base_layers(
    file: &mut std::fs::File,
    content: &gguf_file::Content,
    base: &Model,
    layers: &[usize],
) -> Result<(ArmConfig, HashMap<String, Tensor>)> {
    let cfg = &base.llama.cfg;
    if layers.is_empty() || layers.iter().any(|&l| l >= cfg.n_layers) {
        bail!("layers must be among the base's 0..{}", cfg.n_layers);
    }
    let arm_cfg = ArmConfig {
        vocab_size: cfg.vocab_size,
        hidden: cfg.hidden,
        n_layers: layers.len(),
        n_heads: cfg.n_heads,
        n_kv_heads: cfg.n_kv_heads,
        ffn: cfg.ffn,
        rope_theta: cfg.rope_theta,
        rms_eps: cfg.rms_eps,
        context_length: cfg.context_length,
    };
    let dev = Device::Cpu;
    let mut get = |name: &str| -> Result<Tensor> {
        let q = content
            .tensor(file, name, &dev)
            .with_context(|| format!("the base has no tensor `{name}`"))?;
        Ok(q.dequantize(&dev)?)
    };
    let mut init = HashMap::new();
    init.insert(
        "model.embed_tokens.weight".to_string(),
        get("token_embd.weight")?,
    );
    init.insert("model.norm.weight".to_string(), get("output_norm.weight")?);
    for (i, &l) in layers.iter().enumerate() {
        for &(hf, gg) in LAYER_TENSORS {
            let mut w = get(&format!("blk.{l}.{gg}.weight"))?;
            match gg {
                "attn_q" => w = halves_from_interleaved(&w, cfg.n_heads)?,
                "attn_k" => w = halves_from_interleaved(&w, cfg.n_kv_heads)?,
                _ => {}
            }
            init.insert(format!("model.layers.{i}.{hf}.weight"), w);
        }
    }
    Ok((arm_cfg, init))
}

fn halves_from_interleaved(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, cols) = w.dims2()?;
    let hd = out / heads;
    Ok(w.reshape((heads, hd / 2, 2, cols))?
        .transpose(1, 2)?
        .reshape((out, cols))?)
}

fn interleaved_from_halves(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, cols) = w.dims2()?;
    let hd = out / heads;
    Ok(w.reshape((heads, 2, hd / 2, cols))?
        .transpose(1, 2)?
        .reshape((out, cols))?)
}

/// The GGUF name of each trained Hugging Face layer tensor.
const LAYER_TENSORS: &[(&str, &str)] = &[
    ("input_layernorm", "attn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

#[derive(Serialize)]
struct Report {
    base: String,
    layers: Vec<usize>,
    config: ArmConfig,
    train_sequences: usize,
    train_tokens: usize,
    heldout_sequences: usize,
    steps: usize,
    tokens_seen: usize,
    lr: f64,
    batch: usize,
    /// Loss (cross-entropy under the base's distribution) every few steps.
    loss_curve: Vec<(usize, f32)>,
    train_seconds: f64,
    /// Through tilt's loader and kernels, on the held-out responses.
    heldout: Heldout,
    bytes: u64,
}

#[derive(Serialize)]
struct Heldout {
    tokens: usize,
    base_perplexity: f64,
    /// The student before training (the kept layers as the base has them) and after.
    untrained_perplexity: f64,
    perplexity: f64,
    /// Share of positions where the student's most likely token is the base's.
    top1_agreement: f64,
}

/// Perplexity of the held-out responses under `model`, and per position its argmax.
fn perplexity(model: &Model, seqs: &[Sequence]) -> Result<(f64, usize, Vec<u32>)> {
    let (mut nll, mut n, mut argmax) = (0.0f64, 0usize, Vec::new());
    for chunk in seqs.chunks(8) {
        let out = rows_of(model, chunk)?;
        for (i, (tokens, prompt)) in chunk.iter().enumerate() {
            for (row, &next) in out.item(i).skip(prompt - 1).zip(&tokens[*prompt..]) {
                nll += f64::from(crate::math::log_sum_exp(row) - row[next as usize]);
                n += 1;
                argmax.push(crate::sampling::argmax(row));
            }
        }
    }
    Ok(((nll / n.max(1) as f64).exp(), n, argmax))
}

/// The `tilt distill` command.
pub fn run(args: DistillArgs) -> Result<()> {
    let base_path = match &args.model {
        Some(p) => p.clone(),
        None => fetch::ensure(&fetch::models_dir(), fetch::DEFAULT_MODEL)?,
    };
    let base = Model::load(&base_path, "base", Role::Base)?;
    let mut file = std::fs::File::open(&base_path)?;
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| anyhow::anyhow!("{} is not a GGUF file: {e}", base_path.display()))?;
    let cfg = &base.llama.cfg;
    if args.layers.is_empty() || args.layers.iter().any(|&l| l >= cfg.n_layers) {
        bail!(
            "--layers must name layers of the base's 0..{}",
            cfg.n_layers
        );
    }
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let train: Vec<Sequence> = read_sequences(&args.responses, &base)?;
    let heldout: Vec<Sequence> = read_sequences(&args.heldout, &base)?;
    let (student_cfg, init) = base_layers(&mut file, &content, &base, &args.layers)?;
    let mut student = Arm::new(student_cfg.clone(), args.seed)?;
    student.freeze_embeddings();
    student.set_weights(&init)?;
    let save = |path: &Path| save_gguf(&student, &content, &args.layers, path);
    // The untrained student through tilt's own loader.
    let untrained_path = args.out.with_extension("untrained.gguf");
    save(&untrained_path)?;
    let untrained = Model::load(&untrained_path, "draft", Role::Draft)?;
    let (untrained_ppl, _, _) = perplexity(&untrained, &heldout)?;
    drop(untrained);
    std::fs::remove_file(&untrained_path)?;
    let (base_ppl, heldout_tokens, base_argmax) = perplexity(&base, &heldout)?;
    eprintln!(
        "distill: {} training sequences, {} held out; held-out perplexity: base {base_ppl:.2}, untrained student {untrained_ppl:.2}",
        train.len(),
        heldout.len()
    );

    let trainable: Vec<_> = {
        let vars = student.varmap.data().lock().unwrap();
        let mut names: Vec<&String> = vars
            .keys()
            .filter(|n| !n.contains("embed_tokens"))
            .collect();
        names.sort();
        names.into_iter().map(|n| vars[n].clone()).collect()
    };
    let mut opt = AdamW::new(
        trainable,
        ParamsAdamW {
            lr: args.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let start = Instant::now();
    let budget = args.minutes * 60.0;
    let (mut steps, mut seen, mut curve) = (0usize, 0usize, Vec::new());
    let mut recent = Vec::new();
    // Steps when they bound the run, else the seconds of the time budget.
    let by_steps = args.max_steps > 0;
    let bar = if by_steps {
        crate::progress::bar(args.max_steps as u64, "steps")
    } else {
        crate::progress::bar(budget.ceil() as u64, "seconds")
    };
    'epochs: loop {
        order.shuffle(&mut rng);
        for chunk in order.chunks(args.batch) {
            if start.elapsed().as_secs_f64() >= budget
                || (args.max_steps > 0 && steps >= args.max_steps)
            {
                break 'epochs;
            }
            let seqs: Vec<Sequence> = chunk.iter().map(|&i| train[i].clone()).collect();
            let target = teacher(&base, &seqs)?;
            let batch = Batch::new(&seqs)?;
            let logp = student.row_log_probs(&batch)?;
            let rows = logp.dim(0)?;
            let loss = ((target * logp)?.sum_all()? / -(rows as f64))?;
            opt.backward_step(&loss)?;
            let loss = loss.to_scalar::<f32>()?;
            steps += 1;
            seen += rows;
            recent.push(loss);
            bar.set_position(if by_steps {
                steps as u64
            } else {
                start.elapsed().as_secs()
            });
            if steps.is_multiple_of(20) {
                let mean = recent.iter().sum::<f32>() / recent.len() as f32;
                curve.push((steps, mean));
                recent.clear();
                bar.set_message(format!("loss {mean:.4}"));
                bar.suspend(|| {
                    eprintln!(
                        "distill: step {steps}, {seen} tokens, {:.0} s: loss {mean:.4}",
                        start.elapsed().as_secs_f64()
                    )
                });
            }
        }
    }
    bar.finish_and_clear();
    let train_seconds = start.elapsed().as_secs_f64();
    save(&args.out)?;
    let draft = Model::load(&args.out, "draft", Role::Draft)?;
    let (ppl, _, argmax) = perplexity(&draft, &heldout)?;
    let agree = argmax
        .iter()
        .zip(&base_argmax)
        .filter(|(a, b)| a == b)
        .count();
    let report = Report {
        base: base_path.display().to_string(),
        layers: args.layers.clone(),
        config: student_cfg,
        train_sequences: train.len(),
        train_tokens: train.iter().map(|(t, p)| t.len() - p).sum(),
        heldout_sequences: heldout.len(),
        steps,
        tokens_seen: seen,
        lr: args.lr,
        batch: args.batch,
        loss_curve: curve,
        train_seconds,
        heldout: Heldout {
            tokens: heldout_tokens,
            base_perplexity: base_ppl,
            untrained_perplexity: untrained_ppl,
            perplexity: ppl,
            top1_agreement: agree as f64 / argmax.len().max(1) as f64,
        },
        bytes: std::fs::metadata(&args.out)?.len(),
    };
    let text = serde_json::to_string_pretty(&report)?;
    std::fs::write(args.out.with_extension("json"), &text)?;
    println!("{text}");
    Ok(())
}

/// Write `student` as a GGUF: the base's metadata (tokenizer and chat template included) with
/// its own layer count, matrices and the embeddings in Q4_1, norms in f32.
fn save_gguf(
    student: &Arm,
    base: &gguf_file::Content,
    layers: &[usize],
    path: &Path,
) -> Result<()> {
    let cfg = &student.cfg;
    let weights = student.weights();
    let w = |name: &str| -> Result<&Tensor> {
        weights
            .get(name)
            .with_context(|| format!("the student has no `{name}`"))
    };
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let q4 = |t: &Tensor| QTensor::quantize(t, GgmlDType::Q4_1);
    let f32 = |t: &Tensor| QTensor::quantize(t, GgmlDType::F32);
    tensors.push((
        "token_embd.weight".into(),
        q4(w("model.embed_tokens.weight")?)?,
    ));
    tensors.push(("output_norm.weight".into(), f32(w("model.norm.weight")?)?));
    for i in 0..layers.len() {
        for &(hf, gg) in LAYER_TENSORS {
            let mut t = w(&format!("model.layers.{i}.{hf}.weight"))?.clone();
            match gg {
                "attn_q" => t = interleaved_from_halves(&t, cfg.n_heads)?,
                "attn_k" => t = interleaved_from_halves(&t, cfg.n_kv_heads)?,
                _ => {}
            }
            let q = if t.rank() == 1 { f32(&t)? } else { q4(&t)? };
            tensors.push((format!("blk.{i}.{gg}.weight"), q));
        }
    }
    let count = gguf_file::Value::U32(layers.len() as u32);
    let name = gguf_file::Value::String(format!("draft of layers {:?}", layers));
    let mut metadata: Vec<(&str, &gguf_file::Value)> = base
        .metadata
        .iter()
        .filter(|(k, _)| *k != "llama.block_count" && *k != "general.name")
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    metadata.push(("llama.block_count", &count));
    metadata.push(("general.name", &name));
    metadata.sort_by_key(|(k, _)| *k);
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    gguf_file::write(&mut out, &metadata, &refs)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_layouts_invert() {
        let w = Tensor::arange(0f32, 8.0 * 3.0, &Device::Cpu)
            .unwrap()
            .reshape((8, 3))
            .unwrap();
        let h = halves_from_interleaved(&w, 2).unwrap();
        // Head 0 rows 0..4 interleaved (a0 b0 a1 b1) become halves (a0 a1 b0 b1).
        let rows: Vec<f32> = h.get(1).unwrap().to_vec1().unwrap();
        assert_eq!(rows, [6.0, 7.0, 8.0]);
        let back = interleaved_from_halves(&h, 2).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }
}
