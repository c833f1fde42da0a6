//! Low-rank adapters (LoRA) over a base model's layers: a model that is the base plus, in some
//! linear layers, `scale · B·A·x`. It keeps no weight of its own beyond A and B, so it runs on
//! the base's weights, its rows in the same matmuls as the base's (`Llama::forward_shared`).
//! Read from a PEFT-style folder: `adapter_config.json` (`r`, `lora_alpha`) and
//! `adapter_model.safetensors` with `…layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight` and
//! `…layers.{i}.mlp.down_proj.lora_{A,B}.weight`, A `(r, in)` and B `(out, r)`, in Hugging Face's
//! layout (q and k rows in halves order, permuted here for a GGUF base's interleaved RoPE).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::config::{LlamaConfig, RopeStyle};
use crate::math;

/// `B·A` of rank r applied to rows of `inp` values, adding rows of `out` values.
pub(super) struct LowRank {
    /// `(r, in)`: one row per rank, dotted with the input row.
    a: Vec<f32>,
    /// `(r, out)`: B transposed, one row per rank, scaled and added to the output row.
    b: Vec<f32>,
    inp: usize,
    out: usize,
    /// Where in the (fused) layer's output row this part's values start.
    offset: usize,
}

impl LowRank {
    /// `y[offset..offset + out] += scale · B·A·x` for each row of `x` (`in` wide) and `y` (`width` wide).
    fn apply(&self, x: &[f32], y: &mut [f32], width: usize, scale: f32) {
        let rank = self.a.len() / self.inp;
        let mut t = vec![0f32; rank];
        for (x, y) in x.chunks_exact(self.inp).zip(y.chunks_exact_mut(width)) {
            for (t, a) in t.iter_mut().zip(self.a.chunks_exact(self.inp)) {
                *t = scale * math::dot(x, a);
            }
            let y = &mut y[self.offset..self.offset + self.out];
            for (&t, b) in t.iter().zip(self.b.chunks_exact(self.out)) {
                for (y, &b) in y.iter_mut().zip(b) {
                    *y += t * b;
                }
            }
        }
    }
}

/// One layer's adapters, by the linear layer they add to (q, k and v share the fused qkv).
#[derive(Default)]
pub(super) struct LayerAdapter {
    pub qkv: Vec<LowRank>,
    pub wo: Vec<LowRank>,
    pub down: Vec<LowRank>,
}

impl LayerAdapter {
    pub fn is_empty(&self) -> bool {
        self.qkv.is_empty() && self.wo.is_empty() && self.down.is_empty()
    }
}

/// Add every part's delta for rows `x` (each `inp` wide) to rows `y` (each `width` wide).
pub(super) fn add(parts: &[LowRank], x: &[f32], y: &mut [f32], width: usize, scale: f32) {
    for p in parts {
        p.apply(x, y, width, scale);
    }
}

pub struct Adapter {
    pub rank: usize,
    /// `lora_alpha / r`.
    pub(super) scale: f32,
    /// One per base layer (empty where nothing is adapted).
    pub(super) layers: Vec<LayerAdapter>,
}

/// The projections an adapter may change and where each lands in the fused layers.
const TARGETS: [&str; 5] = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"];

/// Whether `dir` holds an adapter rather than a whole model.
pub fn is_adapter(dir: &Path) -> bool {
    dir.join("adapter_config.json").is_file()
}

impl Adapter {
    /// Read a PEFT-style adapter folder for a base of `cfg`.
    pub fn load(dir: &Path, cfg: &LlamaConfig) -> Result<Self> {
        let path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let rank = json["r"]
            .as_u64()
            .filter(|&r| r > 0)
            .with_context(|| format!("{}: `r` must be a positive integer", path.display()))?
            as usize;
        let alpha = json["lora_alpha"].as_f64().unwrap_or(rank as f64);
        let weights = dir.join("adapter_model.safetensors");
        let tensors = candle_core::safetensors::load(&weights, &Device::Cpu)
            .with_context(|| format!("reading {}", weights.display()))?;
        Self::from_tensors(tensors, rank, (alpha / rank as f64) as f32, cfg)
            .with_context(|| format!("loading the adapter in {}", dir.display()))
    }

    /// `tensors` by name (any prefix before `layers.`), A `(r, in)` and B `(out, r)`.
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        rank: usize,
        scale: f32,
        cfg: &LlamaConfig,
    ) -> Result<Self> {
        let hd = cfg.head_dim;
        let (qw, kvw) = (cfg.n_heads * hd, cfg.n_kv_heads * hd);
        // (input width, output width, offset in the fused output, heads to reorder for RoPE)
        let shape = |target: &str| match target {
            "q_proj" => (cfg.hidden, qw, 0, cfg.n_heads),
            "k_proj" => (cfg.hidden, kvw, qw, cfg.n_kv_heads),
            "v_proj" => (cfg.hidden, kvw, qw + kvw, 0),
            "o_proj" => (qw, cfg.hidden, 0, 0),
            _ => (cfg.ffn, cfg.hidden, 0, 0),
        };
        let mut pending: HashMap<(usize, &str), [Option<Tensor>; 2]> = HashMap::new();
        for (name, t) in tensors {
            let Some((layer, target, which)) = parse_name(&name) else {
                bail!("unexpected tensor `{name}` (adapters may change {TARGETS:?} only)");
            };
            if layer >= cfg.n_layers {
                bail!("`{name}`: the base has {} layers", cfg.n_layers);
            }
            pending.entry((layer, target)).or_default()[which] = Some(t);
        }
        let mut layers: Vec<LayerAdapter> = (0..cfg.n_layers).map(|_| Default::default()).collect();
        let mut keys: Vec<_> = pending.keys().copied().collect();
        keys.sort();
        for (layer, target) in keys {
            let [Some(a), Some(b)] = pending.remove(&(layer, target)).unwrap() else {
                bail!("layer {layer} {target}: lora_A and lora_B come in pairs");
            };
            let (inp, out, offset, heads) = shape(target);
            let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
            if a.dims() != [rank, inp] || b.dims() != [out, rank] {
                bail!(
                    "layer {layer} {target}: lora_A is {:?} and lora_B {:?}, expected [{rank}, {inp}] and [{out}, {rank}]",
                    a.dims(),
                    b.dims()
                );
            }
            let mut b: Vec<f32> = b.flatten_all()?.to_vec1()?;
            if heads > 0 && cfg.rope_style == RopeStyle::Interleaved {
                b = interleave_rows(&b, heads, hd, rank);
            }
            let part = LowRank {
                a: a.flatten_all()?.to_vec1()?,
                b: transpose(&b, out, rank),
                inp,
                out,
                offset,
            };
            let l = &mut layers[layer];
            match target {
                "o_proj" => l.wo.push(part),
                "down_proj" => l.down.push(part),
                _ => l.qkv.push(part),
            }
        }
        if layers.iter().all(LayerAdapter::is_empty) {
            bail!("the adapter changes no layer");
        }
        Ok(Self {
            rank,
            scale,
            layers,
        })
    }

    /// The first layer it changes: below it, its hidden states are the base's.
    pub fn first_layer(&self) -> usize {
        self.layers.iter().position(|l| !l.is_empty()).unwrap_or(0)
    }
}

/// `…layers.{i}.{self_attn|mlp}.{target}.lora_{A|B}.weight` → (i, target, 0 for A / 1 for B).
fn parse_name(name: &str) -> Option<(usize, &'static str, usize)> {
    let rest = &name[name.find("layers.")? + "layers.".len()..];
    let (layer, rest) = rest.split_once('.')?;
    let layer = layer.parse().ok()?;
    let (_, rest) = rest.split_once('.')?;
    let (target, rest) = rest.split_once('.')?;
    let target = TARGETS.iter().find(|&&t| t == target)?;
    let which = match rest {
        "lora_A.weight" => 0,
        "lora_B.weight" => 1,
        _ => return None,
    };
    Some((layer, target, which))
}

/// Rows of `(heads · hd, cols)` from Hugging Face's halves order to GGUF's interleaved pairs.
fn interleave_rows(m: &[f32], heads: usize, hd: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; m.len()];
    for h in 0..heads {
        for j in 0..hd / 2 {
            for s in 0..2 {
                let to = (h * hd + 2 * j + s) * cols;
                let from = (h * hd + s * hd / 2 + j) * cols;
                out[to..to + cols].copy_from_slice(&m[from..from + cols]);
            }
        }
    }
    out
}

fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..cols)
        .flat_map(|c| (0..rows).map(move |r| m[r * cols + c]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_with_any_prefix() {
        let n = "base_model.model.model.layers.12.self_attn.q_proj.lora_B.weight";
        assert_eq!(parse_name(n), Some((12, "q_proj", 1)));
        assert_eq!(
            parse_name("model.layers.3.mlp.down_proj.lora_A.weight"),
            Some((3, "down_proj", 0))
        );
        assert_eq!(parse_name("model.layers.3.mlp.up_proj.lora_A.weight"), None);
        assert_eq!(parse_name("model.norm.weight"), None);
    }

    #[test]
    fn low_rank_adds_scaled_product() {
        // A = [[1, 2]], B = [[3], [4]] (rank 1, in 2, out 2), scale 0.5, at offset 1 of width 4.
        let p = LowRank {
            a: vec![1.0, 2.0],
            b: transpose(&[3.0, 4.0], 2, 1),
            inp: 2,
            out: 2,
            offset: 1,
        };
        let x = [1.0, 1.0, 2.0, 0.0];
        let mut y = vec![0.0; 8];
        p.apply(&x, &mut y, 4, 0.5);
        // Row 0: A·x = 3, ·0.5 = 1.5 → [4.5, 6]; row 1: A·x = 2 → 1 → [3, 4].
        assert_eq!(y, [0.0, 4.5, 6.0, 0.0, 0.0, 3.0, 4.0, 0.0]);
    }

    #[test]
    fn interleaving_pairs_each_half_with_its_twin() {
        // One head of 4 rows (halves: r0 r1 | r2 r3) becomes r0 r2 r1 r3.
        let m = [0.0, 1.0, 2.0, 3.0];
        assert_eq!(interleave_rows(&m, 1, 4, 1), [0.0, 2.0, 1.0, 3.0]);
    }
}
