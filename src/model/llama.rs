//! Llama-family decoder forward over a ragged batch: every item is one sequence with its own KV
//! cache and any number of new tokens (prefill, chunked prefill or a single decode token).
//! Linear layers run once over all items' rows; attention runs per item against its own cache.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::config::{LlamaConfig, RopeStyle};
use super::kv::KvCache;

/// Which logits a forward item wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None: only extend the cache.
    None,
    /// The next-token distribution after the last new token.
    Last,
    /// One row per new token (scoring a candidate continuation).
    All,
}

/// One sequence's part of a batched forward.
pub struct ForwardItem<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [u32],
    pub logits: Logits,
}

/// Logits of a batched forward: `rows[i]` is the range of rows (each `vocab` wide) of item `i`.
#[derive(Debug, Default)]
pub struct ForwardOutput {
    pub data: Vec<f32>,
    pub vocab: usize,
    pub rows: Vec<Range<usize>>,
}

impl ForwardOutput {
    /// Row `r` (absolute) of the output.
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.vocab..(r + 1) * self.vocab]
    }

    /// The rows of item `i`.
    pub fn item(&self, i: usize) -> impl Iterator<Item = &[f32]> + '_ {
        self.rows[i].clone().map(|r| self.row(r))
    }

    /// The last row of item `i`, if it asked for logits.
    pub fn last(&self, i: usize) -> Option<&[f32]> {
        let r = &self.rows[i];
        (!r.is_empty()).then(|| self.row(r.end - 1))
    }
}

struct Layer {
    attn_norm: Tensor,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    ffn_norm: Tensor,
    w_gate: QMatMul,
    w_up: QMatMul,
    w_down: QMatMul,
}

pub struct Llama {
    pub cfg: LlamaConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    output: QMatMul,
    /// `(context_length, head_dim / 2)` rotary tables.
    cos: Tensor,
    sin: Tensor,
}

impl Llama {
    /// `dequantize` expands quantized weights to f32: slower, but free of the int8 activation
    /// rounding that quantized matmuls apply (which moves logits by up to ~0.5 on this model).
    pub fn from_gguf(
        content: &gguf_file::Content,
        file: &mut std::fs::File,
        dequantize: bool,
    ) -> Result<Self> {
        let cfg = LlamaConfig::from_gguf(content)?;
        let dev = Device::Cpu;
        let mut get = |name: &str| -> Result<QTensor> {
            content
                .tensor(file, name, &dev)
                .with_context(|| format!("GGUF tensor `{name}` is missing or unreadable"))
        };
        let linear = |t: QTensor| -> Result<QMatMul> {
            Ok(if dequantize {
                QMatMul::Tensor(t.dequantize(&Device::Cpu)?)
            } else {
                QMatMul::from_qtensor(t)?
            })
        };
        let embed_q = get("token_embd.weight")?;
        let embed = embed_q.dequantize(&dev)?;
        let output = match get("output.weight") {
            Ok(t) => linear(t)?,
            Err(_) => linear(embed_q)?,
        };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let mut q =
                |n: &str| -> Result<QMatMul> { linear(get(&format!("blk.{i}.{n}.weight"))?) };
            let wq = q("attn_q")?;
            let wk = q("attn_k")?;
            let wv = q("attn_v")?;
            let wo = q("attn_output")?;
            let w_gate = q("ffn_gate")?;
            let w_up = q("ffn_up")?;
            let w_down = q("ffn_down")?;
            let attn_norm = get(&format!("blk.{i}.attn_norm.weight"))?.dequantize(&dev)?;
            let ffn_norm = get(&format!("blk.{i}.ffn_norm.weight"))?.dequantize(&dev)?;
            layers.push(Layer {
                attn_norm,
                wq,
                wk,
                wv,
                wo,
                ffn_norm,
                w_gate,
                w_up,
                w_down,
            });
        }
        let norm = get("output_norm.weight")?.dequantize(&dev)?;
        Self::assemble(cfg, embed, layers, norm, output)
    }

    /// A Hugging Face llama checkpoint: `config.json` and `*.safetensors` (f32, f16 or bf16), run in f32.
    pub fn from_safetensors(dir: &Path, cfg: LlamaConfig) -> Result<Self> {
        let mut files: Vec<_> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("no *.safetensors files in {}", dir.display());
        }
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for f in &files {
            for (name, t) in candle_core::safetensors::load(f, &Device::Cpu)
                .with_context(|| format!("reading {}", f.display()))?
            {
                tensors.insert(name, t);
            }
        }
        let mut take = |name: &str| -> Result<Tensor> {
            let t = tensors
                .remove(name)
                .or_else(|| tensors.remove(name.trim_start_matches("model.")))
                .with_context(|| format!("safetensors lack tensor `{name}`"))?;
            Ok(t.to_dtype(DType::F32)?)
        };
        let embed = take("model.embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = format!("model.layers.{i}");
            let mut lin = |n: &str| -> Result<QMatMul> {
                Ok(QMatMul::Tensor(take(&format!("{p}.{n}.weight"))?))
            };
            let wq = lin("self_attn.q_proj")?;
            let wk = lin("self_attn.k_proj")?;
            let wv = lin("self_attn.v_proj")?;
            let wo = lin("self_attn.o_proj")?;
            let w_gate = lin("mlp.gate_proj")?;
            let w_up = lin("mlp.up_proj")?;
            let w_down = lin("mlp.down_proj")?;
            let attn_norm = take(&format!("{p}.input_layernorm.weight"))?;
            let ffn_norm = take(&format!("{p}.post_attention_layernorm.weight"))?;
            layers.push(Layer {
                attn_norm,
                wq,
                wk,
                wv,
                wo,
                ffn_norm,
                w_gate,
                w_up,
                w_down,
            });
        }
        let norm = take("model.norm.weight")?;
        let output = match take("lm_head.weight") {
            Ok(t) => QMatMul::Tensor(t),
            Err(_) => QMatMul::Tensor(embed.clone()),
        };
        Self::assemble(cfg, embed, layers, norm, output)
    }

    fn assemble(
        cfg: LlamaConfig,
        embed: Tensor,
        layers: Vec<Layer>,
        norm: Tensor,
        output: QMatMul,
    ) -> Result<Self> {
        let (v, h) = embed.dims2()?;
        if v != cfg.vocab_size || h != cfg.hidden {
            bail!(
                "token embedding is {v}x{h}, config says {}x{}",
                cfg.vocab_size,
                cfg.hidden
            );
        }
        let half = cfg.head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f32 / cfg.head_dim as f32))
            .collect();
        let n = cfg.context_length;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in 0..n {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (n, half), &Device::Cpu)?;
        let sin = Tensor::from_vec(sin, (n, half), &Device::Cpu)?;
        Ok(Self {
            cfg,
            embed,
            layers,
            norm,
            output,
            cos,
            sin,
        })
    }

    /// Run a ragged batch: each item's tokens are appended to its cache; logits come back as asked.
    pub fn forward(&self, items: &mut [ForwardItem<'_>]) -> Result<ForwardOutput> {
        let cfg = &self.cfg;
        let dev = Device::Cpu;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for it in items.iter_mut() {
            if it.tokens.is_empty() {
                bail!("forward item without tokens");
            }
            let start = it.cache.len();
            if start + it.tokens.len() > cfg.context_length {
                bail!(
                    "sequence of {} positions exceeds the context length {}",
                    start + it.tokens.len(),
                    cfg.context_length
                );
            }
            if let Some(&bad) = it.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                bail!(
                    "token id {bad} is outside the vocabulary ({})",
                    cfg.vocab_size
                );
            }
            it.cache.reserve(cfg, it.tokens.len())?;
            ids.extend_from_slice(it.tokens);
            positions.extend((start..start + it.tokens.len()).map(|p| p as u32));
        }
        let n = ids.len();
        let ids = Tensor::from_vec(ids, n, &dev)?;
        let pos = Tensor::from_vec(positions, n, &dev)?;
        let cos = self.cos.index_select(&pos, 0)?.unsqueeze(1)?; // (n, 1, half)
        let sin = self.sin.index_select(&pos, 0)?.unsqueeze(1)?;
        let (h, kv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let group = cfg.group();
        let scale = 1.0 / (hd as f64).sqrt();

        let mut x = self.embed.index_select(&ids, 0)?; // (n, hidden)
        for (li, layer) in self.layers.iter().enumerate() {
            let xn = candle_nn::ops::rms_norm(&x, &layer.attn_norm, cfg.rms_eps as f32)?;
            let q = self.rope(&layer.wq.forward(&xn)?.reshape((n, h, 1, hd))?, &cos, &sin)?;
            let k = self.rope(&layer.wk.forward(&xn)?.reshape((n, kv, 1, hd))?, &cos, &sin)?;
            let v = layer.wv.forward(&xn)?;
            let q = q.reshape((n, h * hd))?;
            let k = k.reshape((n, kv * hd))?;
            let mut outs = Vec::with_capacity(items.len());
            let mut row = 0;
            for it in items.iter() {
                let t = it.tokens.len();
                let qi = q.narrow(0, row, t)?;
                let ki = k
                    .narrow(0, row, t)?
                    .reshape((t, kv, hd))?
                    .transpose(0, 1)?
                    .contiguous()?;
                let vi = v
                    .narrow(0, row, t)?
                    .reshape((t, kv, hd))?
                    .transpose(0, 1)?
                    .contiguous()?;
                let (keys, values) = it.cache.write(li, &ki, &vi)?;
                // (t, kv, group, hd) -> (kv, group * t, hd): each key/value head serves its query group.
                let qi = if t == 1 {
                    qi.reshape((kv, group, hd))?
                } else {
                    qi.reshape((t, kv, group, hd))?
                        .permute((1, 2, 0, 3))?
                        .contiguous()?
                        .reshape((kv, group * t, hd))?
                };
                let mut att = (qi.matmul(&keys.t()?)? * scale)?; // (kv, group*t, total)
                if t > 1 {
                    let total = keys.dim(1)?;
                    let start = total - t;
                    let mask: Vec<f32> = (0..t)
                        .flat_map(|i| {
                            (0..total).map(move |j| {
                                if j > start + i {
                                    f32::NEG_INFINITY
                                } else {
                                    0.0
                                }
                            })
                        })
                        .collect();
                    let mask = Tensor::from_vec(mask, (1, 1, t, total), &dev)?;
                    att = att
                        .reshape((kv, group, t, total))?
                        .broadcast_add(&mask)?
                        .reshape((kv, group * t, total))?;
                }
                let att = candle_nn::ops::softmax_last_dim(&att)?;
                let o = att.matmul(&values)?; // (kv, group*t, hd)
                let o = if t == 1 {
                    o.reshape((1, h * hd))?
                } else {
                    o.reshape((kv, group, t, hd))?
                        .permute((2, 0, 1, 3))?
                        .contiguous()?
                        .reshape((t, h * hd))?
                };
                outs.push(o);
                row += t;
            }
            let attn = if outs.len() == 1 {
                outs.pop().unwrap()
            } else {
                Tensor::cat(&outs, 0)?
            };
            x = (x + layer.wo.forward(&attn)?)?;
            let xn = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, cfg.rms_eps as f32)?;
            let gate = layer.w_gate.forward(&xn)?.silu()?;
            let up = layer.w_up.forward(&xn)?;
            x = (x + layer.w_down.forward(&(gate * up)?)?)?;
        }
        let mut wanted = Vec::new();
        let mut rows = Vec::with_capacity(items.len());
        let mut row = 0;
        for it in items.iter_mut() {
            let t = it.tokens.len();
            let first = wanted.len();
            match it.logits {
                Logits::None => {}
                Logits::Last => wanted.push((row + t - 1) as u32),
                Logits::All => wanted.extend((row..row + t).map(|r| r as u32)),
            }
            rows.push(first..wanted.len());
            it.cache.advance(t);
            row += t;
        }
        let vocab = cfg.vocab_size;
        if wanted.is_empty() {
            return Ok(ForwardOutput {
                data: Vec::new(),
                vocab,
                rows,
            });
        }
        let r = wanted.len();
        let sel = x.index_select(&Tensor::from_vec(wanted, r, &dev)?, 0)?;
        let sel = candle_nn::ops::rms_norm(&sel, &self.norm, cfg.rms_eps as f32)?;
        let logits = self.output.forward(&sel)?;
        let data = logits.flatten_all()?.to_vec1::<f32>()?;
        Ok(ForwardOutput { data, vocab, rows })
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        Ok(match self.cfg.rope_style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(x, cos, sin)?,
            RopeStyle::Halves => candle_nn::rotary_emb::rope(x, cos, sin)?,
        })
    }
}
