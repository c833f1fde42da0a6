//! Llama-family decoder forward over a ragged batch: every item is one sequence with its own KV
//! cache and any number of new tokens (prefill, chunked prefill or a single decode token).
//! Linear layers run once over all items' rows through candle's quantized matmuls; everything
//! between them (norms, RoPE, attention against each item's cache, SwiGLU) is a plain loop over
//! f32 rows, which avoids dozens of small tensor allocations per layer on the decode path.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::attention::{attention, Span};
use super::config::{LlamaConfig, RopeStyle};
use super::kv::KvCache;
use super::quant::{self, GgmlMatrix, Input, Q4_1Matrix, Q8Rows, Q8_0Matrix, Sink};
use super::Precision;
use crate::math;

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

/// Projections that read the same input, fused into one matmul when their weights allow it
/// (q|k|v, gate|up): one activation quantization and one pass over the thread pool instead of several.
struct Linear {
    kernel: Kernel,
    out: usize,
    /// Our kernel's gate and up panels alternate (`quant::gate_up_order`), for a SwiGLU sink.
    paired: bool,
}

enum Kernel {
    /// Our SIMD kernels (see `quant`).
    Q4_1(Q4_1Matrix),
    Q8_0(Q8_0Matrix),
    /// candle's matmuls (other quantizations, dense weights); several parts are concatenated.
    Candle(Vec<QMatMul>),
}

impl Linear {
    /// `gate_up`: the weights are [gate, up], to be paired panel by panel for a SwiGLU sink.
    fn fuse(weights: Vec<QTensor>, gate_up: bool) -> Result<Self> {
        let out = weights.iter().map(|w| w.shape().dims()[0]).sum();
        let cols = weights[0].shape().dims()[1];
        let dtype = weights[0].dtype();
        let same = weights
            .iter()
            .all(|w| w.dtype() == dtype && w.shape().dims()[1] == cols);
        // Same type and width: the parts' bytes, concatenated, are the fused matrix (its rows
        // reordered to pair gate and up panels when that is asked and possible).
        let order = gate_up.then(|| quant::gate_up_order(out / 2)).flatten();
        let paired = order.is_some();
        let ours = |make: fn(&[u8], usize, usize) -> Option<Kernel>| -> Result<Self> {
            let mut bytes = Vec::new();
            for w in &weights {
                bytes.extend_from_slice(&w.data()?);
            }
            if let Some(order) = &order {
                let row = bytes.len() / out;
                bytes = order
                    .iter()
                    .flat_map(|&j| &bytes[j * row..(j + 1) * row])
                    .copied()
                    .collect();
            }
            let kernel = make(&bytes, out, cols).context("malformed quantized tensor")?;
            Ok(Self {
                kernel,
                out,
                paired,
            })
        };
        match dtype {
            GgmlDType::Q4_1 if same => {
                return ours(|b, r, c| Q4_1Matrix::from_ggml(b, r, c).map(Kernel::Q4_1))
            }
            GgmlDType::Q8_0 if same => {
                return ours(|b, r, c| Q8_0Matrix::from_ggml(b, r, c).map(Kernel::Q8_0))
            }
            _ => {}
        }
        if same && weights.len() > 1 {
            let mut bytes = Vec::new();
            for w in &weights {
                bytes.extend_from_slice(&w.data()?);
            }
            let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), &Device::Cpu, dtype)?;
            let fused = QTensor::new(storage, (out, cols))?;
            return Ok(Self {
                kernel: Kernel::Candle(vec![QMatMul::from_qtensor(fused)?]),
                out,
                paired: false,
            });
        }
        let parts = weights
            .into_iter()
            .map(QMatMul::from_qtensor)
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            kernel: Kernel::Candle(parts),
            out,
            paired: false,
        })
    }

    /// Dense weights, kept in f32 or quantized to Q8_0 as `precision` asks (Q8_0 needs whole
    /// 32-value blocks per row; other shapes stay f32).
    fn dense(weights: Vec<Tensor>, precision: Precision, gate_up: bool) -> Result<Self> {
        let blocks = weights.iter().all(|w| w.dim(1).is_ok_and(|c| c % 32 == 0));
        if precision == Precision::Q8_0 && blocks {
            let quantized = weights
                .iter()
                .map(|w| QTensor::quantize(&w.to_dtype(DType::F32)?, GgmlDType::Q8_0))
                .collect::<candle_core::Result<_>>()?;
            return Self::fuse(quantized, gate_up);
        }
        let out = weights
            .iter()
            .map(|w| w.dim(0))
            .sum::<candle_core::Result<usize>>()?;
        let weights = weights
            .iter()
            .map(|w| w.to_dtype(DType::F32))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let w = if weights.len() == 1 {
            weights[0].clone()
        } else {
            Tensor::cat(&weights, 0)?
        };
        Ok(Self {
            kernel: Kernel::Candle(vec![QMatMul::Tensor(w)]),
            out,
            paired: false,
        })
    }

    /// `input` (`n` rows) through this layer, into `sink`. Our kernels normalise and apply the
    /// sink inside their pool call; the others run the same steps around candle's matmul.
    fn forward(&self, input: Input, n: usize, sink: Sink) -> Result<()> {
        // Our kernels pair gate and up panels only where the matrix was laid out for it.
        let fits = self.paired || !matches!(sink, Sink::SwiGlu(..));
        match &self.kernel {
            Kernel::Q4_1(w) if fits => {
                quant::matmul_into(w, input, n, sink);
                return Ok(());
            }
            Kernel::Q8_0(w) if fits => {
                quant::matmul_into(w, input, n, sink);
                return Ok(());
            }
            _ => {}
        }
        let mut normed = Vec::new();
        let x = match input.norm {
            Some((weight, eps)) => {
                normed.resize(input.x.len(), 0.0);
                rms_norm(input.x, weight, eps, &mut normed);
                &normed
            }
            None => input.x,
        };
        let y = self.products(x, n)?;
        match sink {
            Sink::Store(out) => out.copy_from_slice(&y),
            Sink::Add(out) => add(out, &y),
            Sink::SwiGlu(out, blocks) => {
                let half = self.out / 2;
                for (r, a) in y.chunks_exact(self.out).zip(out.chunks_exact_mut(half)) {
                    let (g, u) = r.split_at(half);
                    math::silu_mul(g, u, a);
                }
                if let Some(blocks) = blocks {
                    // SAFETY: this thread alone writes them, before the next matmul.
                    unsafe { blocks.blocks(0, out) };
                }
            }
        }
        Ok(())
    }

    /// Whether this layer's kernel reads its input as quantized blocks (`Input::quantized`);
    /// those kernels hold whole blocks per row, so its input width is one too.
    fn takes_blocks(&self) -> bool {
        matches!(self.kernel, Kernel::Q4_1(_) | Kernel::Q8_0(_))
    }

    /// `x` is `n` rows; returns `n` rows of `self.out` values (rows in the matrix's order).
    fn products(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        let plain = Input::plain(x);
        let mut y = vec![0f32; n * self.out];
        let parts = match &self.kernel {
            Kernel::Q4_1(w) => {
                quant::matmul_into(w, plain, n, Sink::Store(&mut y));
                return Ok(y);
            }
            Kernel::Q8_0(w) => {
                quant::matmul_into(w, plain, n, Sink::Store(&mut y));
                return Ok(y);
            }
            Kernel::Candle(parts) => parts,
        };
        let input = Tensor::from_slice(x, (n, x.len() / n), &Device::Cpu)?;
        if let [one] = parts.as_slice() {
            return Ok(one.forward(&input)?.flatten_all()?.to_vec1()?);
        }
        let outs = parts
            .iter()
            .map(|p| p.forward(&input))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&outs, 1)?.flatten_all()?.to_vec1()?)
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    qkv: Linear,
    wo: Linear,
    ffn_norm: Vec<f32>,
    gate_up: Linear,
    down: Linear,
}

pub struct Llama {
    pub cfg: LlamaConfig,
    /// `(vocab, hidden)` row-major.
    embed: Vec<f32>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: Linear,
    /// `(context_length, head_dim / 2)` rotary tables.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

fn vec_of(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

impl Llama {
    /// `Precision::F32` expands quantized weights to f32: slower, but free of the int8 activation
    /// rounding that quantized matmuls apply (which moves logits by up to ~0.5 on this model).
    pub fn from_gguf(
        content: &gguf_file::Content,
        file: &mut std::fs::File,
        precision: Precision,
    ) -> Result<Self> {
        let cfg = LlamaConfig::from_gguf(content)?;
        let dev = Device::Cpu;
        let mut get = |name: &str| -> Result<QTensor> {
            content
                .tensor(file, name, &dev)
                .with_context(|| format!("GGUF tensor `{name}` is missing or unreadable"))
        };
        let linear = |ws: Vec<QTensor>, gate_up: bool| -> Result<Linear> {
            let dense = ws
                .iter()
                .all(|w| matches!(w.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16));
            if precision == Precision::F32 || (dense && precision == Precision::Q8_0) {
                let ws = ws
                    .iter()
                    .map(|w| w.dequantize(&Device::Cpu))
                    .collect::<candle_core::Result<_>>()?;
                Linear::dense(ws, precision, gate_up)
            } else {
                Linear::fuse(ws, gate_up)
            }
        };
        let embed_q = get("token_embd.weight")?;
        let embed = vec_of(&embed_q.dequantize(&dev)?)?;
        let output = match get("output.weight") {
            Ok(t) => linear(vec![t], false)?,
            Err(_) => linear(vec![embed_q], false)?,
        };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let mut w = |n: &str| get(&format!("blk.{i}.{n}.weight"));
            let qkv = linear(vec![w("attn_q")?, w("attn_k")?, w("attn_v")?], false)?;
            let wo = linear(vec![w("attn_output")?], false)?;
            let gate_up = linear(vec![w("ffn_gate")?, w("ffn_up")?], true)?;
            let down = linear(vec![w("ffn_down")?], false)?;
            let attn_norm = vec_of(&w("attn_norm")?.dequantize(&dev)?)?;
            let ffn_norm = vec_of(&w("ffn_norm")?.dequantize(&dev)?)?;
            layers.push(Layer {
                attn_norm,
                qkv,
                wo,
                ffn_norm,
                gate_up,
                down,
            });
        }
        let norm = vec_of(&get("output_norm.weight")?.dequantize(&dev)?)?;
        Self::assemble(cfg, embed, layers, norm, output)
    }

    /// A Hugging Face llama checkpoint: `config.json` and `*.safetensors` (f32, f16 or bf16), run in f32.
    pub fn from_safetensors(dir: &Path, cfg: LlamaConfig, precision: Precision) -> Result<Self> {
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
            Ok(t)
        };
        let embed_t = take("model.embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = format!("model.layers.{i}");
            let mut w = |n: &str| take(&format!("{p}.{n}.weight"));
            let qkv = Linear::dense(
                vec![
                    w("self_attn.q_proj")?,
                    w("self_attn.k_proj")?,
                    w("self_attn.v_proj")?,
                ],
                precision,
                false,
            )?;
            let wo = Linear::dense(vec![w("self_attn.o_proj")?], precision, false)?;
            let gate_up = Linear::dense(
                vec![w("mlp.gate_proj")?, w("mlp.up_proj")?],
                precision,
                true,
            )?;
            let down = Linear::dense(vec![w("mlp.down_proj")?], precision, false)?;
            let attn_norm = vec_of(&w("input_layernorm")?)?;
            let ffn_norm = vec_of(&w("post_attention_layernorm")?)?;
            layers.push(Layer {
                attn_norm,
                qkv,
                wo,
                ffn_norm,
                gate_up,
                down,
            });
        }
        let norm = vec_of(&take("model.norm.weight")?)?;
        let output = Linear::dense(
            vec![take("lm_head.weight").unwrap_or_else(|_| embed_t.clone())],
            precision,
            false,
        )?;
        let embed = vec_of(&embed_t)?;
        Self::assemble(cfg, embed, layers, norm, output)
    }

    fn assemble(
        cfg: LlamaConfig,
        embed: Vec<f32>,
        layers: Vec<Layer>,
        norm: Vec<f32>,
        output: Linear,
    ) -> Result<Self> {
        if embed.len() != cfg.vocab_size * cfg.hidden {
            bail!(
                "token embedding has {} values, config says {}x{}",
                embed.len(),
                cfg.vocab_size,
                cfg.hidden
            );
        }
        let (q, kv) = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim);
        for (i, l) in layers.iter().enumerate() {
            if l.qkv.out != q + 2 * kv
                || l.gate_up.out != 2 * cfg.ffn
                || l.attn_norm.len() != cfg.hidden
            {
                bail!("layer {i} has shapes that do not match the config {cfg:?}");
            }
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
        let (hidden, hd) = (cfg.hidden, cfg.head_dim);
        let (qw, kvw) = (cfg.n_heads * hd, cfg.n_kv_heads * hd);
        for it in items.iter() {
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
        }
        // Rows of the batch: every item's new tokens (attention finds each row's position).
        let n = items.iter().map(|it| it.tokens.len()).sum::<usize>();
        let mut x = Vec::with_capacity(n * hidden);
        for it in items.iter() {
            for &t in it.tokens {
                x.extend_from_slice(&self.embed[t as usize * hidden..(t as usize + 1) * hidden]);
            }
        }
        // Items forked from an earlier item of the batch read their shared prefix of keys and
        // values from that item's copy: (its index, the positions they share).
        let anchors: Vec<Option<(usize, usize)>> = (0..items.len())
            .map(|i| {
                (0..i)
                    .map(|a| (a, items[i].cache.shared_with(items[a].cache)))
                    .find(|&(_, shared)| shared > 0)
            })
            .collect();
        let eps = cfg.rms_eps as f32;
        let width = qw + 2 * kvw;
        let mut qkv = vec![0f32; n * width];
        let mut attn = vec![0f32; n * qw];
        let mut act = vec![0f32; n * cfg.ffn];
        let (mut q8_attn, mut q8_act) = (Q8Rows::new(), Q8Rows::new());
        let mut kv_heads = Vec::with_capacity(items.len() * cfg.n_kv_heads);
        for (li, layer) in self.layers.iter().enumerate() {
            layer.qkv.forward(
                Input::normed(&x, &layer.attn_norm, eps),
                n,
                Sink::Store(&mut qkv),
            )?;
            // Open every item's cache for its new rows, then attend all rows of all items in one
            // pass over the pool (a pool call per item made batched decode pay a barrier per
            // sequence); the tasks rotate and store the new keys and values themselves.
            kv_heads.clear();
            for it in items.iter_mut() {
                let t = it.tokens.len();
                it.cache
                    .open(cfg.n_layers, li, (cfg.n_kv_heads, hd), t, &mut kv_heads);
            }
            let kv_of = |i: usize| &kv_heads[i * cfg.n_kv_heads..(i + 1) * cfg.n_kv_heads];
            let mut spans = Vec::with_capacity(items.len());
            let mut row = 0;
            for (i, it) in items.iter().enumerate() {
                let t = it.tokens.len();
                spans.push(Span {
                    rows: row..row + t,
                    start: it.cache.len(),
                    kv: kv_of(i),
                    prefix: anchors[i].map(|(a, shared)| (kv_of(a), shared)),
                });
                row += t;
            }
            // Attention and SwiGLU quantize their outputs for the next matmul as they make
            // them, where it reads quantized blocks (our kernels): its pool call then has no
            // prologue to wait for.
            // An attention task's heads are whole blocks only if a head is.
            let attn_blocks = (layer.wo.takes_blocks() && hd.is_multiple_of(quant::BLOCK))
                .then(|| q8_attn.writer(n, qw));
            let rope = |x: &mut [f32], pos: usize| self.rope(x, pos);
            attention(cfg, &mut qkv, width, &spans, &rope, &mut attn, attn_blocks);
            let input = match attn_blocks {
                Some(_) => Input::quantized(&attn, &q8_attn),
                None => Input::plain(&attn),
            };
            layer.wo.forward(input, n, Sink::Add(&mut x))?;
            let act_blocks = layer.down.takes_blocks().then(|| q8_act.writer(n, cfg.ffn));
            layer.gate_up.forward(
                Input::normed(&x, &layer.ffn_norm, eps),
                n,
                Sink::SwiGlu(&mut act, act_blocks),
            )?;
            let input = match act_blocks {
                Some(_) => Input::quantized(&act, &q8_act),
                None => Input::plain(&act),
            };
            layer.down.forward(input, n, Sink::Add(&mut x))?;
        }
        let mut wanted = Vec::new();
        let mut rows = Vec::with_capacity(items.len());
        let mut row = 0;
        for it in items.iter_mut() {
            let t = it.tokens.len();
            let first = wanted.len();
            match it.logits {
                Logits::None => {}
                Logits::Last => wanted.push(row + t - 1),
                Logits::All => wanted.extend(row..row + t),
            }
            rows.push(first..wanted.len());
            // SAFETY: every layer opened this cache for its t rows, and its attention wrote them.
            unsafe { it.cache.advance(t) };
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
        let sel: Vec<f32> = wanted
            .iter()
            .flat_map(|&r| &x[r * hidden..(r + 1) * hidden])
            .copied()
            .collect();
        let mut data = vec![0f32; wanted.len() * vocab];
        let input = Input::normed(&sel, &self.norm, eps);
        self.output
            .forward(input, wanted.len(), Sink::Store(&mut data))?;
        Ok(ForwardOutput { data, vocab, rows })
    }

    /// Rotate every head of `x` (one row) for position `pos`.
    fn rope(&self, x: &mut [f32], pos: usize) {
        let half = self.cfg.head_dim / 2;
        let cos = &self.cos[pos * half..(pos + 1) * half];
        let sin = &self.sin[pos * half..(pos + 1) * half];
        for head in x.chunks_exact_mut(self.cfg.head_dim) {
            match self.cfg.rope_style {
                // Zipped iterators, not indices: free of bounds checks, the loops vectorise.
                RopeStyle::Interleaved => {
                    for ((p, &c), &s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
                        let (a, b) = (p[0], p[1]);
                        p[0] = a * c - b * s;
                        p[1] = a * s + b * c;
                    }
                }
                RopeStyle::Halves => {
                    let (lo, hi) = head.split_at_mut(half);
                    for (((x, y), &c), &s) in lo.iter_mut().zip(hi).zip(cos).zip(sin) {
                        let (a, b) = (*x, *y);
                        *x = a * c - b * s;
                        *y = a * s + b * c;
                    }
                }
            }
        }
    }
}

fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let k = weight.len();
    for (row, o) in x.chunks_exact(k).zip(out.chunks_exact_mut(k)) {
        let s = math::inv_rms(row, eps);
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
            *o = v * s * w;
        }
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
