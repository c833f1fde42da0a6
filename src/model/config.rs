//! Hyper-parameters of a llama-family decoder, read from GGUF metadata or a Hugging Face `config.json`.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use serde::Deserialize;

/// How rotary embeddings pair up dimensions: GGUF llama weights are permuted for interleaved pairs,
/// Hugging Face checkpoints rotate the two halves of each head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    Interleaved,
    Halves,
}

#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rms_eps: f64,
    pub context_length: usize,
    pub rope_style: RopeStyle,
}

impl LlamaConfig {
    /// The shape of a model too small to run, for a stand-in that only needs its vocabulary and
    /// context.
    #[cfg(test)]
    pub fn tiny(vocab_size: usize, context_length: usize) -> Self {
        Self {
            vocab_size,
            hidden: 8,
            ffn: 16,
            n_layers: 1,
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 8,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            context_length,
            rope_style: RopeStyle::Halves,
        }
    }

    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = &content.metadata;
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if arch != "llama" {
            bail!("unsupported architecture `{arch}`: tilt runs llama-family models (general.architecture = llama)");
        }
        let get = |key: &str| -> Result<u32> {
            let v = md
                .get(&format!("llama.{key}"))
                .with_context(|| format!("GGUF metadata lacks llama.{key}"))?;
            gguf_int(v)
                .map(|v| v as u32)
                .with_context(|| format!("GGUF metadata llama.{key} is not an integer"))
        };
        let hidden = get("embedding_length")? as usize;
        let n_heads = get("attention.head_count")? as usize;
        let n_kv_heads = get("attention.head_count_kv").unwrap_or(n_heads as u32) as usize;
        let rms_eps = md
            .get("llama.attention.layer_norm_rms_epsilon")
            .and_then(|v| v.to_f32().ok())
            .unwrap_or(1e-5) as f64;
        let rope_theta = md
            .get("llama.rope.freq_base")
            .and_then(|v| v.to_f32().ok())
            .unwrap_or(10_000.0);
        let vocab_size = match md.get("tokenizer.ggml.tokens") {
            Some(gguf_file::Value::Array(tokens)) => tokens.len(),
            _ => bail!("GGUF metadata lacks tokenizer.ggml.tokens"),
        };
        let head_dim = md
            .get("llama.attention.key_length")
            .and_then(gguf_int)
            .map(|v| v as usize)
            .unwrap_or(hidden / n_heads.max(1));
        let cfg = Self {
            vocab_size,
            hidden,
            ffn: get("feed_forward_length")? as usize,
            n_layers: get("block_count")? as usize,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_theta,
            rms_eps,
            context_length: get("context_length").unwrap_or(2048) as usize,
            rope_style: RopeStyle::Interleaved,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_hf_json(text: &str) -> Result<Self> {
        #[derive(Deserialize)]
        struct Hf {
            #[serde(default)]
            architectures: Vec<String>,
            #[serde(default)]
            model_type: Option<String>,
            vocab_size: usize,
            hidden_size: usize,
            intermediate_size: usize,
            num_hidden_layers: usize,
            num_attention_heads: usize,
            num_key_value_heads: Option<usize>,
            head_dim: Option<usize>,
            rope_theta: Option<f32>,
            rms_norm_eps: Option<f64>,
            max_position_embeddings: Option<usize>,
        }
        let hf: Hf = serde_json::from_str(text).context("config.json is not a llama config")?;
        let is_llama = hf.model_type.as_deref() == Some("llama")
            || hf.architectures.iter().any(|a| a == "LlamaForCausalLM");
        if !is_llama {
            bail!(
                "unsupported architecture {:?}/{:?}: tilt runs llama-family models",
                hf.model_type,
                hf.architectures
            );
        }
        let cfg = Self {
            vocab_size: hf.vocab_size,
            hidden: hf.hidden_size,
            ffn: hf.intermediate_size,
            n_layers: hf.num_hidden_layers,
            n_heads: hf.num_attention_heads,
            n_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim: hf
                .head_dim
                .unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1)),
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            rms_eps: hf.rms_norm_eps.unwrap_or(1e-5),
            context_length: hf.max_position_embeddings.unwrap_or(2048),
            rope_style: RopeStyle::Halves,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if self.n_heads == 0
            || self.n_kv_heads == 0
            || !self.n_heads.is_multiple_of(self.n_kv_heads)
        {
            bail!(
                "attention heads ({}) must be a multiple of key/value heads ({})",
                self.n_heads,
                self.n_kv_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!(
                "the head dimension ({}) must be even for rotary embeddings",
                self.head_dim
            );
        }
        if self.n_layers == 0 || self.vocab_size == 0 {
            bail!("inconsistent model dimensions: {self:?}");
        }
        Ok(())
    }

    /// Query heads that share one key/value head.
    pub fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
}

/// GGUF writers disagree on integer widths; accept any non-negative integer.
pub fn gguf_int(v: &gguf_file::Value) -> Option<u64> {
    use gguf_file::Value as V;
    match *v {
        V::U8(x) => Some(x as u64),
        V::I8(x) => u64::try_from(x).ok(),
        V::U16(x) => Some(x as u64),
        V::I16(x) => u64::try_from(x).ok(),
        V::U32(x) => Some(x as u64),
        V::I32(x) => u64::try_from(x).ok(),
        V::U64(x) => Some(x),
        V::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}
