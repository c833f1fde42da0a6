//! `tilt train-arm`: train an autoregressive reward model (ARM) on preference pairs with the GenARM
//! loss −log σ(β_r · (log π_r(y_w|x) − log π_r(y_l|x))), where each log π_r is a sum over response
//! tokens only (see reference/algorithms.md §2). The ARM shares the base's vocabulary and chat
//! template, and is saved as a Hugging Face llama folder that the server loads like any model.

pub mod distill;
pub mod model;
pub mod prefs;
pub mod prompts;

use std::collections::{HashMap, HashSet};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use indicatif::ProgressBar;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::model::{fetch, vocab, ChatTemplate, Message, Model, Role, Vocab};
pub use model::{Arm, ArmConfig, Batch, LoraConfig};

/// One line of the training data.
#[derive(Debug, Deserialize)]
pub struct TextPair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    /// Whether each response ended on its own (`tilt prefs` says; other data: yes): only those
    /// end with the end token, so that an ARM does not learn to end where a cut-off text stops.
    #[serde(default = "yes")]
    pub chosen_ended: bool,
    #[serde(default = "yes")]
    pub rejected_ended: bool,
}

fn yes() -> bool {
    true
}

/// Read `{"prompt", "chosen", "rejected"}` JSONL; blank lines are skipped.
pub fn read_pairs(path: &Path) -> Result<Vec<TextPair>> {
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut pairs = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let pair = serde_json::from_str(&line).with_context(|| {
            format!(
                "{} line {}: expected {{\"prompt\", \"chosen\", \"rejected\"}} strings",
                path.display(),
                i + 1
            )
        })?;
        pairs.push(pair);
    }
    if pairs.is_empty() {
        bail!("{} holds no preference pairs", path.display());
    }
    Ok(pairs)
}

/// A preference pair in tokens: the rendered prompt, then each response (ending with EOS, so the
/// ARM also learns where answers stop).
#[derive(Debug, Clone)]
pub struct Pair {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    /// For a LoRA ARM: the base's hidden states below its layers for the chosen and the
    /// rejected sequence (`with_starts`).
    pub starts: Option<Arc<[Vec<f32>; 2]>>,
    /// log π_ref(y_w|x) − log π_ref(y_l|x) of the model the ARM is read against: the base for
    /// a LoRA ARM (whose reward is its log-ratio to the base, as in DPO), none (0) otherwise.
    pub reference: f32,
}

impl Pair {
    pub fn new(prompt: Vec<u32>, chosen: Vec<u32>, rejected: Vec<u32>) -> Self {
        Self {
            prompt,
            chosen,
            rejected,
            starts: None,
            reference: 0.0,
        }
    }

    /// Both sequences truncated to `max_len`, or `None` when the prompt leaves no room for a response.
    fn fit(mut self, max_len: usize) -> Option<Self> {
        let room = max_len.checked_sub(self.prompt.len()).filter(|&r| r > 0)?;
        self.chosen.truncate(room);
        self.rejected.truncate(room);
        Some(self)
    }

    fn sequences(&self) -> [(Vec<u32>, usize); 2] {
        let seq = |r: &[u32]| ([&self.prompt[..], r].concat(), self.prompt.len());
        [seq(&self.chosen), seq(&self.rejected)]
    }
}

/// `prompt` as a user turn in `chat`, in tokens: how ARMs see prompts in training, and how
/// `tilt prefs` asks the base for the responses they learn from.
pub fn render_prompt(chat: &ChatTemplate, vocab: &Vocab, prompt: &str) -> Result<Vec<u32>> {
    let text = chat
        .render(&[Message {
            role: "user".into(),
            content: prompt.to_string(),
        }])
        .map_err(anyhow::Error::msg)?;
    vocab.encode(&text, false)
}

/// Render each prompt as a user turn in the base's chat template and append the response tokens.
/// Returns the pairs that fit in `max_len` tokens and how many did not.
pub fn encode(base: &Model, pairs: &[TextPair], max_len: usize) -> Result<(Vec<Pair>, usize)> {
    let response = |text: &str, ended: bool| -> Result<Vec<u32>> {
        let mut ids = base.vocab.encode(text, false)?;
        ids.extend(base.vocab.eos.filter(|_| ended));
        Ok(ids)
    };
    let mut encoded = Vec::with_capacity(pairs.len());
    for p in pairs {
        encoded.push(Pair::new(
            render_prompt(&base.chat, &base.vocab, &p.prompt)?,
            response(&p.chosen, p.chosen_ended)?,
            response(&p.rejected, p.rejected_ended)?,
        ));
    }
    let total = encoded.len();
    let fitted: Vec<Pair> = encoded.into_iter().filter_map(|p| p.fit(max_len)).collect();
    let skipped = total - fitted.len();
    Ok((fitted, skipped))
}

/// Each pair's sequences with the base's hidden states after its first `layers` layers (on the
/// serving forward, as the server will feed a LoRA ARM on them).
pub fn with_starts(
    base: &Model,
    pairs: Vec<Pair>,
    layers: usize,
    progress: &ProgressBar,
) -> Result<Vec<Pair>> {
    pairs
        .into_iter()
        .map(|mut p| {
            let [(c, _), (r, _)] = p.sequences();
            let c = base.llama.hidden_states(&c, layers)?;
            let r = base.llama.hidden_states(&r, layers)?;
            p.starts = Some(Arc::new([c, r]));
            progress.inc(1);
            Ok(p)
        })
        .collect()
}

/// Set each pair's `reference` to the ARM's margin as it is now (an untrained LoRA ARM: the base).
pub fn set_reference(
    arm: &Arm,
    pairs: &mut [Pair],
    batch: usize,
    progress: &ProgressBar,
) -> Result<()> {
    for chunk in pairs.chunks_mut(batch.max(1)) {
        let m: Vec<f32> = margins(arm, chunk, 1.0)?.detach().to_vec1()?;
        for (p, m) in chunk.iter_mut().zip(m) {
            p.reference = m;
        }
        progress.inc(chunk.len() as u64);
    }
    Ok(())
}

/// β_r · (log π_r(y_w|x) − log π_r(y_l|x) − the pair's reference margin) per pair: `(pairs,)`.
pub fn margins(arm: &Arm, pairs: &[Pair], beta_r: f64) -> Result<Tensor> {
    let seqs: Vec<_> = pairs.iter().flat_map(Pair::sequences).collect();
    let batch = match pairs
        .iter()
        .map(|p| p.starts.as_deref())
        .collect::<Option<Vec<_>>>()
    {
        Some(starts) => {
            let starts: Vec<&[f32]> = starts
                .iter()
                .flat_map(|s| s.iter().map(Vec::as_slice))
                .collect();
            Batch::with_starts(&seqs, &starts, arm.cfg.hidden)?
        }
        None => Batch::new(&seqs)?,
    };
    let lp = arm.response_log_probs(&batch)?.reshape((pairs.len(), 2))?;
    let reference: Vec<f32> = pairs.iter().map(|p| p.reference).collect();
    let reference = Tensor::new(reference.as_slice(), &candle_core::Device::Cpu)?;
    let margin = ((lp.narrow(1, 0, 1)? - lp.narrow(1, 1, 1)?)?.squeeze(1)? - reference)?;
    Ok((margin * beta_r)?)
}

/// Mean of −log σ(m), written as relu(−m) + log(1 + e^−|m|) so large margins neither overflow nor
/// lose their gradient.
pub fn genarm_loss(margins: &Tensor) -> Result<Tensor> {
    let softplus = (margins.neg()?.relu()? + (margins.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    Ok(softplus.mean_all()?)
}

#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub epochs: usize,
    pub lr: f64,
    pub beta_r: f64,
    /// Pairs per optimiser step.
    pub batch: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub loss: f32,
    /// Share of pairs whose chosen response the ARM scores higher.
    pub accuracy: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct EpochReport {
    pub epoch: usize,
    /// Mean training loss over the epoch's steps.
    pub train_loss: f32,
    pub heldout: Option<Evaluation>,
}

/// Loss and pairwise accuracy on `pairs`, in batches of `batch`.
pub fn evaluate(arm: &Arm, pairs: &[Pair], beta_r: f64, batch: usize) -> Result<Evaluation> {
    let mut all = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch.max(1)) {
        all.extend(margins(arm, chunk, beta_r)?.detach().to_vec1::<f32>()?);
    }
    let m = Tensor::new(all.as_slice(), &candle_core::Device::Cpu)?;
    Ok(Evaluation {
        loss: genarm_loss(&m)?.to_scalar()?,
        accuracy: all.iter().filter(|&&x| x > 0.0).count() as f32 / all.len().max(1) as f32,
    })
}

/// AdamW on the GenARM loss; `progress` advances per batch, and `on_epoch` sees each epoch's
/// report as it finishes.
pub fn train(
    arm: &Arm,
    pairs: &[Pair],
    heldout: &[Pair],
    opts: &TrainOptions,
    progress: &ProgressBar,
    mut on_epoch: impl FnMut(&EpochReport),
) -> Result<Vec<EpochReport>> {
    let params = ParamsAdamW {
        lr: opts.lr,
        ..ParamsAdamW::default()
    };
    let mut opt = AdamW::new(arm.varmap.all_vars(), params)?;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    let mut reports = Vec::with_capacity(opts.epochs);
    for epoch in 1..=opts.epochs {
        order.shuffle(&mut rng);
        let mut losses = Vec::new();
        for chunk in order.chunks(opts.batch.max(1)) {
            let batch: Vec<Pair> = chunk.iter().map(|&i| pairs[i].clone()).collect();
            let loss = genarm_loss(&margins(arm, &batch, opts.beta_r)?)?;
            opt.backward_step(&loss)?;
            losses.push(loss.to_scalar::<f32>()?);
            progress.inc(1);
        }
        let heldout = if heldout.is_empty() {
            None
        } else {
            Some(evaluate(arm, heldout, opts.beta_r, opts.batch)?)
        };
        let report = EpochReport {
            epoch,
            train_loss: losses.iter().sum::<f32>() / losses.len().max(1) as f32,
            heldout,
        };
        on_epoch(&report);
        reports.push(report);
    }
    Ok(reports)
}

/// Write `tokenizer.json` and `tokenizer_config.json` for the base's vocabulary and chat template
/// into `out`, and check that they load with the base's vocabulary digest (GenARM requires it).
pub fn write_tokenizer(base_path: &Path, base: &Model, out: &Path) -> Result<()> {
    if base_path.is_dir() {
        for name in ["tokenizer.json", "tokenizer_config.json"] {
            let from = base_path.join(name);
            if from.exists() {
                std::fs::copy(&from, out.join(name))
                    .with_context(|| format!("copying {}", from.display()))?;
            }
        }
    } else {
        let mut file = std::fs::File::open(base_path)
            .with_context(|| format!("opening {}", base_path.display()))?;
        let content = candle_core::quantized::gguf_file::Content::read(&mut file)
            .map_err(|e| anyhow::anyhow!("{}: {e}", base_path.display()))?;
        let tokenizer = vocab::tokenizer_json_from_gguf(&content)?;
        std::fs::write(out.join("tokenizer.json"), tokenizer.to_string())?;
        let template = content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok());
        let text = |id: Option<u32>| id.map(|i| base.vocab.text(i).to_string());
        let config = serde_json::json!({
            "bos_token": text(base.vocab.bos),
            "eos_token": text(base.vocab.eos),
            "add_bos_token": base.vocab.add_bos,
            "chat_template": template,
        });
        std::fs::write(
            out.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&config)?,
        )?;
    }
    let saved = Vocab::from_dir(out)?;
    if saved.digest != base.vocab.digest {
        bail!(
            "the tokenizer written to {} differs from the base's ({} vs {})",
            out.display(),
            saved.digest,
            base.vocab.digest
        );
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Preference pairs, one JSON object per line: {"prompt", "chosen", "rejected"}.
    #[arg(long)]
    pub data: PathBuf,
    /// Output folder: model.safetensors, config.json, tokenizer files and report.json.
    #[arg(long)]
    pub out: PathBuf,
    /// The base model whose vocabulary and chat template the ARM shares (default: the manifest's default model).
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Start from these layers of the base (a GGUF), in order, over its embeddings, which stay
    /// frozen: an ARM that begins as a language model. `--layers`, `--hidden`, `--heads`,
    /// `--kv-heads` and `--ffn` then come from the base.
    #[arg(long, value_delimiter = ',')]
    pub from_layers: Vec<usize>,
    /// Train low-rank adapters of this rank on the base's top `--lora-layers` layers instead
    /// (q, k, v, o and down projections). The saved ARM is the adapters alone: the server runs
    /// it on the base's own weights, its rows in the base's matmuls.
    #[arg(long, value_name = "RANK")]
    pub lora: Option<usize>,
    /// How many of the base's top layers the adapters change (with `--lora`).
    #[arg(long, default_value_t = 4)]
    pub lora_layers: usize,
    /// LoRA's alpha: the adapters' product is scaled by alpha / rank (default: the rank).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    #[arg(long, default_value_t = 128)]
    pub hidden: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    #[arg(long, default_value_t = 2)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 256)]
    pub ffn: usize,
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// β_r of the GenARM loss.
    #[arg(long, default_value_t = 1.0)]
    pub beta_r: f64,
    /// Pairs per optimiser step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Tokens per sequence (prompt + response); longer responses are cut, pairs whose prompt alone fills it are skipped.
    #[arg(long, default_value_t = 256)]
    pub max_len: usize,
    /// Share of the pairs held out to measure pairwise accuracy.
    #[arg(long, default_value_t = 0.1)]
    pub heldout: f64,
    /// Save weights in f32 (default f16, half the size).
    #[arg(long)]
    pub f32: bool,
}

#[derive(Serialize)]
struct Report {
    data: String,
    pairs: usize,
    train_pairs: usize,
    heldout_pairs: usize,
    skipped_pairs: usize,
    response_tokens: usize,
    config: ArmConfig,
    #[serde(skip_serializing_if = "Option::is_none")]
    lora: Option<LoraConfig>,
    epochs: Vec<EpochReport>,
    heldout_accuracy: Option<f32>,
    wall_seconds: f64,
}

/// `layers` of the GGUF base at `path`, as an ARM's config and weights.
fn gguf_layers(
    path: &Path,
    base: &Model,
    layers: &[usize],
) -> Result<(ArmConfig, HashMap<String, Tensor>)> {
    let mut file = std::fs::File::open(path)?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)
        .map_err(|e| anyhow::anyhow!("an ARM from the base's layers needs a GGUF base: {e}"))?;
    distill::base_layers(&mut file, &content, base, layers)
}

/// Held-out pairs and training pairs: whole prompts, taken in order until at least `n_heldout`
/// pairs are held out, so that no prompt is on both sides (a prompt has several pairs when its
/// data comes from several sampling runs). With one pair per prompt, the first `n_heldout`.
fn split_by_prompt(pairs: Vec<Pair>, n_heldout: usize) -> (Vec<Pair>, Vec<Pair>) {
    let mut per_prompt: HashMap<&[u32], usize> = HashMap::new();
    for p in &pairs {
        *per_prompt.entry(&p.prompt).or_default() += 1;
    }
    let (mut held, mut taken) = (HashSet::new(), 0);
    for p in &pairs {
        if taken >= n_heldout {
            break;
        }
        if held.insert(p.prompt.clone()) {
            taken += per_prompt[&p.prompt[..]];
        }
    }
    pairs.into_iter().partition(|p| held.contains(&p.prompt))
}

/// The `tilt train-arm` command.
pub fn run(args: TrainArgs) -> Result<()> {
    let start = Instant::now();
    if !(0.0..1.0).contains(&args.heldout) {
        bail!("--heldout must be in [0, 1), got {}", args.heldout);
    }
    let texts = read_pairs(&args.data)?;
    let base_path = match &args.base {
        Some(p) => p.clone(),
        None => fetch::ensure(&fetch::models_dir(), fetch::DEFAULT_MODEL)?,
    };
    let base = Model::load(&base_path, "base", Role::Base)?;
    let (mut pairs, skipped) = encode(&base, &texts, args.max_len)?;
    pairs.shuffle(&mut ChaCha8Rng::seed_from_u64(args.seed));
    let n_heldout = (args.heldout * pairs.len() as f64).round() as usize;
    if n_heldout >= pairs.len() {
        bail!(
            "{} usable pairs ({} skipped as too long for --max-len {}) leave none to train on",
            pairs.len(),
            skipped,
            args.max_len
        );
    }
    let (cfg, arm) = if let Some(rank) = args.lora {
        let n = base.llama.cfg.n_layers;
        if rank == 0 || args.lora_layers == 0 || args.lora_layers > n {
            bail!("--lora needs a positive rank and --lora-layers within the base's {n} layers");
        }
        if !args.from_layers.is_empty() {
            bail!("--lora and --from-layers are two kinds of ARM; choose one");
        }
        let below = n - args.lora_layers;
        let layers: Vec<usize> = (below..n).collect();
        let (cfg, init) = gguf_layers(&base_path, &base, &layers)?;
        let mut arm = Arm::new(cfg.clone(), args.seed)?;
        arm.set_weights(&init)?;
        let lora = LoraConfig {
            rank,
            alpha: args.lora_alpha.unwrap_or(rank as f64),
            layers,
            base: base_path
                .file_name()
                .map_or(String::new(), |n| n.to_string_lossy().into_owned()),
        };
        arm.add_lora(lora, args.seed)?;
        println!("reading the pairs with the base (hidden states below layer {below}, log-probs)");
        let bar = crate::progress::bar(2 * pairs.len() as u64, "pairs");
        pairs = with_starts(&base, pairs, below, &bar)?;
        set_reference(&arm, &mut pairs, args.batch, &bar)?;
        bar.finish_and_clear();
        (cfg, arm)
    } else if args.from_layers.is_empty() {
        let cfg = ArmConfig {
            vocab_size: base.llama.cfg.vocab_size,
            hidden: args.hidden,
            n_layers: args.layers,
            n_heads: args.heads,
            n_kv_heads: args.kv_heads,
            ffn: args.ffn,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            context_length: base.context_length(),
        };
        (cfg.clone(), Arm::new(cfg, args.seed)?)
    } else {
        let (cfg, init) = gguf_layers(&base_path, &base, &args.from_layers)?;
        let mut arm = Arm::new(cfg.clone(), args.seed)?;
        arm.freeze_embeddings();
        arm.set_weights(&init)?;
        (cfg, arm)
    };
    let (heldout, train_set) = split_by_prompt(pairs, n_heldout);
    let (heldout, train_set) = (&heldout[..], &train_set[..]);
    let opts = TrainOptions {
        epochs: args.epochs,
        lr: args.lr,
        beta_r: args.beta_r,
        batch: args.batch,
        seed: args.seed,
    };
    println!(
        "training on {} pairs, {} held out, {} skipped",
        train_set.len(),
        heldout.len(),
        skipped
    );
    let batches = train_set.len().div_ceil(opts.batch.max(1)) * opts.epochs;
    let bar = crate::progress::bar(batches as u64, "batches");
    let epochs = train(&arm, train_set, heldout, &opts, &bar, |r| {
        bar.suspend(|| match &r.heldout {
            Some(h) => println!(
                "epoch {}: train loss {:.4}, held-out loss {:.4}, accuracy {:.1}%",
                r.epoch,
                r.train_loss,
                h.loss,
                100.0 * h.accuracy
            ),
            None => println!("epoch {}: train loss {:.4}", r.epoch, r.train_loss),
        })
    })?;
    bar.finish_and_clear();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let dtype = if args.f32 { DType::F32 } else { DType::F16 };
    arm.save(&args.out, dtype, base.vocab.bos, base.vocab.eos)?;
    if arm.lora.is_none() {
        write_tokenizer(&base_path, &base, &args.out)?;
    }
    let report = Report {
        data: args.data.display().to_string(),
        pairs: texts.len(),
        train_pairs: train_set.len(),
        heldout_pairs: heldout.len(),
        skipped_pairs: skipped,
        response_tokens: heldout
            .iter()
            .chain(train_set)
            .map(|p| p.chosen.len() + p.rejected.len())
            .sum(),
        config: cfg,
        lora: arm.lora.clone(),
        heldout_accuracy: epochs
            .last()
            .and_then(|e| e.heldout.as_ref())
            .map(|h| h.accuracy),
        epochs,
        wall_seconds: start.elapsed().as_secs_f64(),
    };
    let text = serde_json::to_string_pretty(&report)?;
    std::fs::write(args.out.join("report.json"), &text)?;
    println!("{text}");
    println!("saved to {}", args.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_heldout_split_keeps_each_prompt_on_one_side() {
        let pair = |prompt: u32| Pair::new(vec![prompt], vec![1], vec![2]);
        let pairs: Vec<Pair> = [7, 3, 7, 5, 3, 9].into_iter().map(pair).collect();
        // Two pairs asked for: prompt 7 (two pairs) is enough.
        let (held, train) = split_by_prompt(pairs.clone(), 2);
        assert_eq!(held.iter().map(|p| p.prompt[0]).collect::<Vec<_>>(), [7, 7]);
        assert_eq!(train.len(), 4);
        // Three: 7, then 3 whole (four pairs), none of them left in training.
        let (held, train) = split_by_prompt(pairs.clone(), 3);
        assert_eq!(held.len(), 4);
        assert!(train.iter().all(|p| p.prompt[0] == 5 || p.prompt[0] == 9));
        // One pair per prompt: the first n, as a plain split.
        let single: Vec<Pair> = [4, 2, 8].into_iter().map(pair).collect();
        let (held, _) = split_by_prompt(single, 2);
        assert_eq!(held.iter().map(|p| p.prompt[0]).collect::<Vec<_>>(), [4, 2]);
        assert!(split_by_prompt(pairs, 0).0.is_empty());
    }
}
