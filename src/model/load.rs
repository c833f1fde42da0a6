//! Loading a model: GGUF (quantized, read by our kernels) or a Hugging Face safetensors folder,
//! with its tokenizer and chat template.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::config::LlamaConfig;
use super::linear::Linear;
use super::llama::{Layer, Llama, Weights};
use super::{ChatTemplate, Model, Precision, Role, Vocab};

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
        Llama::assemble(cfg, embed, layers, norm, output)
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
        Llama::assemble(cfg, embed, layers, norm, output)
    }

    fn assemble(
        cfg: LlamaConfig,
        embed: Vec<f32>,
        layers: Vec<Layer>,
        norm: Vec<f32>,
        output: Linear,
    ) -> Result<Llama> {
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
        Ok(Llama {
            cfg,
            weights: Arc::new(Weights {
                embed,
                layers,
                norm,
                output,
                cos,
                sin,
            }),
            adapter: None,
        })
    }
}

impl Model {
    /// Load a GGUF file or a Hugging Face safetensors folder.
    pub fn load(path: &Path, name: &str, role: Role) -> Result<Self> {
        Self::load_with(path, name, role, Precision::Stored)
    }

    pub fn load_with(path: &Path, name: &str, role: Role, precision: Precision) -> Result<Self> {
        if !path.exists() {
            bail!(
                "model not found: {} (run `tilt fetch` for the default model)",
                path.display()
            );
        }
        if path.is_dir() {
            Self::load_safetensors(path, name, role, precision)
        } else {
            Self::load_gguf(path, name, role, precision)
        }
    }

    fn load_gguf(path: &Path, name: &str, role: Role, precision: Precision) -> Result<Self> {
        let mut file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| anyhow::anyhow!("{} is not a readable GGUF file: {e}", path.display()))?;
        let llama = Llama::from_gguf(&content, &mut file, precision)
            .with_context(|| format!("loading {}", path.display()))?;
        let vocab = Vocab::from_gguf(&content)?;
        if vocab.size() != llama.cfg.vocab_size {
            bail!(
                "tokenizer has {} tokens, the model {}",
                vocab.size(),
                llama.cfg.vocab_size
            );
        }
        let template = content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok());
        let chat = Self::template(template.map(String::as_str), &vocab)?;
        Ok(Self {
            name: name.to_string(),
            role,
            llama,
            vocab: Arc::new(vocab),
            chat: Arc::new(chat),
        })
    }

    fn load_safetensors(dir: &Path, name: &str, role: Role, precision: Precision) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let cfg_text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("reading {}", cfg_path.display()))?;
        let cfg = LlamaConfig::from_hf_json(&cfg_text)?;
        let vocab = Vocab::from_dir(dir)?;
        if vocab.size() > cfg.vocab_size {
            bail!(
                "tokenizer has {} tokens, the model only {}",
                vocab.size(),
                cfg.vocab_size
            );
        }
        let llama = Llama::from_safetensors(dir, cfg, precision)?;
        let tok_cfg: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        let chat = Self::template(tok_cfg["chat_template"].as_str(), &vocab)?;
        Ok(Self {
            name: name.to_string(),
            role,
            llama,
            vocab: Arc::new(vocab),
            chat: Arc::new(chat),
        })
    }

    fn template(source: Option<&str>, vocab: &Vocab) -> Result<ChatTemplate> {
        let text = |id: Option<u32>| id.map(|i| vocab.text(i).to_string()).unwrap_or_default();
        ChatTemplate::new(source, &text(vocab.bos), &text(vocab.eos))
    }
}
