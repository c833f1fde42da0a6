//! The ARM being trained: a small llama written in candle tensor ops so autograd can differentiate
//! it. Weight names, tied embeddings and half-split RoPE follow Hugging Face llama, which is what
//! `Llama::from_safetensors` reads back, so the saved model serves as is.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{linear_no_bias, Linear, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Hyper-parameters of the ARM; `config.json` is written from them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ArmConfig {
    pub vocab_size: usize,
    pub hidden: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub ffn: usize,
    pub rope_theta: f32,
    pub rms_eps: f64,
    /// Positions the served model accepts (the base's context, so it can follow any base prompt).
    pub context_length: usize,
}

impl ArmConfig {
    fn head_dim(&self) -> usize {
        self.hidden / self.n_heads
    }

    fn validate(&self) -> Result<()> {
        if self.n_heads == 0 || !self.hidden.is_multiple_of(self.n_heads) {
            bail!(
                "hidden size {} must split into {} heads",
                self.hidden,
                self.n_heads
            );
        }
        if self.ffn == 0 {
            bail!("the feed-forward size must be positive");
        }
        // Everything else is what the server checks when it loads the saved config.
        crate::model::LlamaConfig::from_hf_json(&self.hf_json(DType::F32, None, None).to_string())?;
        Ok(())
    }

    /// The Hugging Face `config.json` that `LlamaConfig::from_hf_json` reads.
    pub fn hf_json(&self, dtype: DType, bos: Option<u32>, eos: Option<u32>) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden,
            "intermediate_size": self.ffn,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim(),
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_eps,
            "max_position_embeddings": self.context_length,
            "tie_word_embeddings": true,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "torch_dtype": if dtype == DType::F16 { "float16" } else { "float32" },
        })
    }
}

/// A linear layer, plus `scale · B·A` once low-rank adapters are added (`Arm::add_lora`).
struct Proj {
    w: Linear,
    lora: Option<(Tensor, Tensor)>,
    scale: f64,
}

impl Proj {
    fn new(w: Linear) -> Self {
        Self {
            w,
            lora: None,
            scale: 0.0,
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.w.forward(x)?;
        Ok(match &self.lora {
            None => y,
            Some((a, b)) => {
                let delta = x.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)?;
                (y + (delta * self.scale)?)?
            }
        })
    }

    fn freeze(&mut self) {
        self.w = Linear::new(self.w.weight().detach(), None);
    }
}

struct Block {
    attn_norm: Tensor,
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    mlp_norm: Tensor,
    gate: Proj,
    up: Proj,
    down: Proj,
}

/// Low-rank adapters over a base's layers: what `Arm::add_lora` made and `save` writes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// The base layer each of the ARM's layers is.
    pub layers: Vec<usize>,
    /// The base model's file name, for the record.
    pub base: String,
}

/// The projections `add_lora` adapts (the serving forward fuses gate and up into SwiGLU).
pub const LORA_TARGETS: [&str; 5] = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"];

/// A trainable llama: its variables live in `varmap` (what the optimiser updates and `save` writes).
pub struct Arm {
    pub cfg: ArmConfig,
    pub varmap: VarMap,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    pub lora: Option<LoraConfig>,
}

/// Response rows the output layer takes at once in training (128 × 49,152 f32 logits: 25 MB).
const HEAD_CHUNK: usize = 128;

/// Standard deviation of the initial weights (Hugging Face llama's `initializer_range`).
const INIT_STD: f32 = 0.02;

impl Arm {
    /// Fresh weights drawn from `seed` (candle cannot seed its CPU generator, so we draw them).
    pub fn new(cfg: ArmConfig, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let (h, hd) = (cfg.hidden, cfg.head_dim());
        let ones = candle_nn::Init::Const(1.0);
        let embed = vb.get((cfg.vocab_size, h), "model.embed_tokens.weight")?;
        let blocks = (0..cfg.n_layers)
            .map(|i| {
                let vb = vb.pp(format!("model.layers.{i}"));
                let (attn, mlp) = (vb.pp("self_attn"), vb.pp("mlp"));
                let proj = |i, o, vb| -> Result<Proj> { Ok(Proj::new(linear_no_bias(i, o, vb)?)) };
                Ok(Block {
                    attn_norm: vb.get_with_hints(h, "input_layernorm.weight", ones)?,
                    q: proj(h, cfg.n_heads * hd, attn.pp("q_proj"))?,
                    k: proj(h, cfg.n_kv_heads * hd, attn.pp("k_proj"))?,
                    v: proj(h, cfg.n_kv_heads * hd, attn.pp("v_proj"))?,
                    o: proj(cfg.n_heads * hd, h, attn.pp("o_proj"))?,
                    mlp_norm: vb.get_with_hints(h, "post_attention_layernorm.weight", ones)?,
                    gate: proj(h, cfg.ffn, mlp.pp("gate_proj"))?,
                    up: proj(h, cfg.ffn, mlp.pp("up_proj"))?,
                    down: proj(cfg.ffn, h, mlp.pp("down_proj"))?,
                })
            })
            .collect::<Result<_>>()?;
        let norm = vb.get_with_hints(h, "model.norm.weight", ones)?;
        let arm = Self {
            cfg,
            varmap,
            embed,
            blocks,
            norm,
            lora: None,
        };
        arm.randomize(seed, INIT_STD)?;
        Ok(arm)
    }

    /// Redraw every matrix from N(0, std²), in name order so `seed` fixes the result; norms stay as they are.
    pub fn randomize(&self, seed: u64, std: f32) -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let vars = self.varmap.data().lock().unwrap();
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort();
        for name in names {
            let var = &vars[name];
            if var.rank() < 2 {
                continue;
            }
            let values: Vec<f32> = (0..var.elem_count())
                .map(|_| {
                    // Box-Muller; 1 - u keeps the logarithm finite.
                    let (u1, u2) = (1.0 - rng.random::<f32>(), rng.random::<f32>());
                    std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
                })
                .collect();
            var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu)?)?;
        }
        Ok(())
    }

    /// Final hidden states `(batch, len, hidden)` of right-padded `tokens` `(batch, len)`; padding
    /// at the end never reaches earlier positions through causal attention. `start`: the input
    /// to the first layer `(batch, len, hidden)` instead of the token embeddings (a LoRA ARM's
    /// layers start from the base's hidden states below them).
    fn hidden(&self, tokens: &Tensor, start: Option<&Tensor>) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let cfg = &self.cfg;
        let mut x = match start {
            Some(x) => x.clone(),
            None => self
                .embed
                .index_select(&tokens.flatten_all()?, 0)?
                .reshape((b, t, cfg.hidden))?,
        };
        let (cos, sin) = self.rope_tables(t)?;
        let mask: Vec<f32> = (0..t * t)
            .map(|i| if i % t > i / t { -1e9 } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu)?;
        for blk in &self.blocks {
            let a = self.attention(blk, &self.rms_norm(&x, &blk.attn_norm)?, &cos, &sin, &mask)?;
            x = (x + a)?;
            let xn = self.rms_norm(&x, &blk.mlp_norm)?;
            let m = blk
                .down
                .forward(&(blk.gate.forward(&xn)?.silu()? * blk.up.forward(&xn)?)?)?;
            x = (x + m)?;
        }
        self.rms_norm(&x, &self.norm)
    }

    fn attention(
        &self,
        blk: &Block,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let hd = cfg.head_dim();
        let heads = |lin: &Proj, n: usize| -> Result<Tensor> {
            Ok(lin
                .forward(x)?
                .reshape((b, t, n, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = candle_nn::rotary_emb::rope_slow(&heads(&blk.q, cfg.n_heads)?, cos, sin)?;
        let k = candle_nn::rotary_emb::rope_slow(&heads(&blk.k, cfg.n_kv_heads)?, cos, sin)?;
        let v = heads(&blk.v, cfg.n_kv_heads)?;
        // Query head h reads key/value head h / group, as the inference forward does.
        let group = cfg.n_heads / cfg.n_kv_heads;
        let repeat = |x: Tensor| -> Result<Tensor> {
            Ok(x.unsqueeze(2)?
                .broadcast_as((b, cfg.n_kv_heads, group, t, hd))?
                .reshape((b, cfg.n_heads, t, hd))?)
        };
        let (k, v) = (repeat(k)?, repeat(v)?);
        let scores = (q.matmul(&k.t()?.contiguous()?)? / (hd as f64).sqrt())?;
        let weights = candle_nn::ops::softmax(&scores.broadcast_add(mask)?, D::Minus1)?;
        let y = weights
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, t, cfg.n_heads * hd))?;
        blk.o.forward(&y)
    }

    /// `(len, head_dim / 2)` cosines and sines of half-split RoPE (`RopeStyle::Halves`).
    fn rope_tables(&self, len: usize) -> Result<(Tensor, Tensor)> {
        let hd = self.cfg.head_dim();
        let angles: Vec<f32> = (0..len)
            .flat_map(|p| {
                (0..hd / 2)
                    .map(move |i| p as f32 / self.cfg.rope_theta.powf(2.0 * i as f32 / hd as f32))
            })
            .collect();
        let angles = Tensor::from_vec(angles, (len, hd / 2), &Device::Cpu)?;
        Ok((angles.cos()?, angles.sin()?))
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let scale = (x.sqr()?.mean_keepdim(D::Minus1)? + self.cfg.rms_eps)?
            .sqrt()?
            .recip()?;
        Ok(x.broadcast_mul(&scale)?.broadcast_mul(weight)?)
    }

    /// Log-probabilities of every next token after every position: `(batch, len, vocab)`.
    pub fn log_probs(&self, tokens: &Tensor) -> Result<Tensor> {
        let logits = self
            .hidden(tokens, None)?
            .broadcast_matmul(&self.embed.t()?)?;
        Ok(candle_nn::ops::log_softmax(&logits, D::Minus1)?)
    }

    /// Σ_t log π(y_t | x, y_<t) over each sequence's response tokens: `(batch,)`. The output head
    /// runs only on the positions that predict a response token (the vocabulary dominates its cost).
    pub fn response_log_probs(&self, batch: &Batch) -> Result<Tensor> {
        let rows = self.response_rows(batch)?;
        // The output layer a chunk of rows at a time, each chunk's vocabulary-wide logits freed
        // before the next (whole, they ran to hundreds of MB a batch, and the allocator mapped
        // and zeroed fresh pages for each: more system time than compute).
        let n = rows.dim(0)?;
        let mut picked = Vec::with_capacity(n.div_ceil(HEAD_CHUNK));
        for start in (0..n).step_by(HEAD_CHUNK) {
            let len = HEAD_CHUNK.min(n - start);
            let logits = rows.narrow(0, start, len)?.matmul(&self.embed.t()?)?;
            let targets = batch.targets.narrow(0, start, len)?.unsqueeze(1)?;
            let target = logits.gather(&targets, 1)?.squeeze(1)?;
            picked.push((target - logits.log_sum_exp(D::Minus1)?)?);
        }
        let picked = Tensor::cat(&picked, 0)?.unsqueeze(1)?;
        Ok(batch.owner.matmul(&picked)?.squeeze(1)?)
    }

    /// Final hidden states at the batch's response rows: `(rows, hidden)`.
    fn response_rows(&self, batch: &Batch) -> Result<Tensor> {
        let (b, t) = batch.tokens.dims2()?;
        let hidden = self
            .hidden(&batch.tokens, batch.start.as_ref())?
            .reshape((b * t, self.cfg.hidden))?;
        Ok(hidden.index_select(&batch.rows, 0)?)
    }

    /// Log-probabilities of every next token at the batch's response rows: `(rows, vocab)`.
    pub fn row_log_probs(&self, batch: &Batch) -> Result<Tensor> {
        let logits = self.response_rows(batch)?.matmul(&self.embed.t()?)?;
        Ok(candle_nn::ops::log_softmax(&logits, D::Minus1)?)
    }

    /// Stop gradients at the embeddings (a distilled draft keeps the base's): backward then
    /// skips the output layer's weight gradient, the largest single matmul of a step. The
    /// variable still holds them, so `set_weights` and `save` see them.
    pub fn freeze_embeddings(&mut self) {
        self.embed = self.embed.detach();
    }

    /// Freeze every weight and train low-rank adapters of `rank` on q, k, v, o and down of each
    /// layer instead: A drawn small, B zero, so the adapted model starts as the unadapted one.
    /// `varmap` then holds the adapters alone (what the optimiser updates and `save` writes).
    pub fn add_lora(&mut self, lora: LoraConfig, seed: u64) -> Result<()> {
        if lora.layers.len() != self.blocks.len() {
            bail!("a LoRA ARM names one base layer per layer");
        }
        self.embed = self.embed.detach();
        self.norm = self.norm.detach();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let scale = lora.alpha / lora.rank as f64;
        for (i, blk) in self.blocks.iter_mut().enumerate() {
            blk.attn_norm = blk.attn_norm.detach();
            blk.mlp_norm = blk.mlp_norm.detach();
            for p in [&mut blk.gate, &mut blk.up] {
                p.freeze();
            }
            let targets = [
                (&mut blk.q, "self_attn.q_proj"),
                (&mut blk.k, "self_attn.k_proj"),
                (&mut blk.v, "self_attn.v_proj"),
                (&mut blk.o, "self_attn.o_proj"),
                (&mut blk.down, "mlp.down_proj"),
            ];
            for (p, name) in targets {
                p.freeze();
                let (out, inp) = p.w.weight().dims2()?;
                let vb = vb.pp(format!("model.layers.{i}.{name}"));
                let a = vb.get_with_hints(
                    (lora.rank, inp),
                    "lora_A.weight",
                    candle_nn::Init::Const(0.0),
                )?;
                let b = vb.get_with_hints(
                    (out, lora.rank),
                    "lora_B.weight",
                    candle_nn::Init::Const(0.0),
                )?;
                p.lora = Some((a, b));
                p.scale = scale;
            }
        }
        // A ~ U(±1/√in), as PEFT draws it; B stays zero.
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let vars = varmap.data().lock().unwrap();
        let mut names: Vec<&String> = vars.keys().filter(|n| n.contains("lora_A")).collect();
        names.sort();
        for name in names {
            let var = &vars[name];
            let bound = 1.0 / (var.dim(1)? as f32).sqrt();
            let values: Vec<f32> = (0..var.elem_count())
                .map(|_| bound * (2.0 * rng.random::<f32>() - 1.0))
                .collect();
            var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu)?)?;
        }
        drop(vars);
        self.varmap = varmap;
        self.lora = Some(lora);
        Ok(())
    }

    /// Set the variables named in `tensors` (Hugging Face names) to their values.
    pub fn set_weights(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let vars = self.varmap.data().lock().unwrap();
        for (name, value) in tensors {
            let Some(var) = vars.get(name) else {
                bail!("the model has no variable `{name}`");
            };
            var.set(value)?;
        }
        Ok(())
    }

    /// Every variable by name.
    pub fn weights(&self) -> HashMap<String, Tensor> {
        let vars = self.varmap.data().lock().unwrap();
        vars.iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// Write `model.safetensors` (weights in `dtype`) and `config.json`; for a LoRA ARM, the
    /// adapters alone (`adapter_model.safetensors`, in f32, named by their base layers, and
    /// `adapter_config.json`), which the server runs on the base's weights.
    pub fn save(&self, dir: &Path, dtype: DType, bos: Option<u32>, eos: Option<u32>) -> Result<()> {
        if let Some(lora) = &self.lora {
            return self.save_lora(dir, lora);
        }
        let tensors = self
            .varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(name, var)| Ok((name.clone(), var.as_tensor().to_dtype(dtype)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
        let config = self.cfg.hf_json(dtype, bos, eos);
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&config)?,
        )?;
        Ok(())
    }
}

impl Arm {
    fn save_lora(&self, dir: &Path, lora: &LoraConfig) -> Result<()> {
        let vars = self.varmap.data().lock().unwrap();
        let mut tensors = HashMap::new();
        for (name, var) in vars.iter() {
            // model.layers.{i}.… → base_model.model.model.layers.{base layer}.…
            let rest = name.strip_prefix("model.layers.").unwrap_or(name);
            let (i, rest) = rest.split_once('.').unwrap_or(("0", rest));
            let layer = lora.layers[i.parse::<usize>()?];
            let key = format!("base_model.model.model.layers.{layer}.{rest}");
            tensors.insert(key, var.as_tensor().clone());
        }
        candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors"))?;
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": lora.rank,
            "lora_alpha": lora.alpha,
            "target_modules": LORA_TARGETS,
            "layers_to_transform": lora.layers,
            "base_model_name_or_path": lora.base,
        });
        std::fs::write(
            dir.join("adapter_config.json"),
            serde_json::to_string_pretty(&config)?,
        )?;
        Ok(())
    }
}

/// Token sequences, each a prompt then a response, laid out for `Arm::response_log_probs`.
pub struct Batch {
    /// `(batch, len)`, right-padded with token 0.
    tokens: Tensor,
    /// Flat indices `seq * len + pos` of the positions whose next token is a response token.
    rows: Tensor,
    /// That next token, per row.
    targets: Tensor,
    /// `(batch, rows)`: 1 where the row belongs to the sequence, to sum rows per sequence.
    owner: Tensor,
    /// `(batch, len, hidden)`: each sequence's input to the ARM's first layer (a LoRA ARM).
    start: Option<Tensor>,
}

impl Batch {
    /// `seqs`: `(tokens, prompt_len)`, each with at least one response token.
    pub fn new(seqs: &[(Vec<u32>, usize)]) -> Result<Self> {
        let len = seqs.iter().map(|(s, _)| s.len()).max().unwrap_or(0);
        let mut tokens = vec![0u32; seqs.len() * len];
        let (mut rows, mut targets, mut seq_of) = (Vec::new(), Vec::new(), Vec::new());
        for (i, (seq, prompt)) in seqs.iter().enumerate() {
            if *prompt == 0 || *prompt >= seq.len() {
                bail!("a sequence needs a prompt and a response token");
            }
            tokens[i * len..i * len + seq.len()].copy_from_slice(seq);
            for p in prompt - 1..seq.len() - 1 {
                rows.push((i * len + p) as u32);
                targets.push(seq[p + 1]);
                seq_of.push(i);
            }
        }
        let n = rows.len();
        let mut owner = vec![0f32; seqs.len() * n];
        for (r, &i) in seq_of.iter().enumerate() {
            owner[i * n + r] = 1.0;
        }
        let dev = &Device::Cpu;
        Ok(Self {
            tokens: Tensor::from_vec(tokens, (seqs.len(), len), dev)?,
            rows: Tensor::from_vec(rows, n, dev)?,
            targets: Tensor::from_vec(targets, n, dev)?,
            owner: Tensor::from_vec(owner, (seqs.len(), n), dev)?,
            start: None,
        })
    }

    /// `seqs` with each one's hidden states below the ARM's layers, `(len, hidden)` row-major.
    pub fn with_starts(
        seqs: &[(Vec<u32>, usize)],
        starts: &[&[f32]],
        hidden: usize,
    ) -> Result<Self> {
        let mut batch = Self::new(seqs)?;
        let (b, len) = batch.tokens.dims2()?;
        let mut x = vec![0f32; b * len * hidden];
        for (i, (s, (seq, _))) in starts.iter().zip(seqs).enumerate() {
            if s.len() != seq.len() * hidden {
                bail!("a sequence's hidden states do not match its tokens");
            }
            x[i * len * hidden..i * len * hidden + s.len()].copy_from_slice(s);
        }
        batch.start = Some(Tensor::from_vec(x, (b, len, hidden), &Device::Cpu)?);
        Ok(batch)
    }
}
