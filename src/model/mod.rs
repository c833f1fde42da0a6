//! The model layer: llama-family forward on candle, tokenizer, chat template, KV cache, and the
//! model files (manifest, provisioning).

mod attention;
pub mod chat;
pub mod config;
pub mod fetch;
mod huge;
pub mod kv;
pub mod llama;
mod pool;
mod quant;
pub mod vocab;

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;

pub use chat::{ChatTemplate, Message};
pub use config::LlamaConfig;
pub use kv::KvCache;
pub use llama::{ForwardItem, ForwardOutput, Llama, Logits};
pub(crate) use pool::for_each_mut;
pub use vocab::Vocab;

/// What a loaded model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Base,
    Reward,
    Draft,
}

/// How a model's weights are held in memory and multiplied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// Quantized GGUF tensors run on our int8 kernels; dense (f32/f16/bf16) weights run in f32.
    #[default]
    Stored,
    /// Every weight in f32: exact, free of int8 activation rounding, and the slowest.
    F32,
    #[value(name = "q8_0")]
    /// Dense weights are quantized to Q8_0 at load, so they run on the same int8 kernels as a
    /// quantized GGUF: a quarter of the memory traffic of f32 (a small ARM's 49152-row output
    /// layer dominates its cost), at about the rounding error of any Q8_0 model.
    Q8_0,
}

/// A loaded model: weights, tokenizer and chat template.
pub struct Model {
    pub name: String,
    pub role: Role,
    pub llama: Llama,
    pub vocab: Arc<Vocab>,
    pub chat: Arc<ChatTemplate>,
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

    pub fn context_length(&self) -> usize {
        self.llama.cfg.context_length
    }
}
