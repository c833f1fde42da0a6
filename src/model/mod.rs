//! The model layer: llama-family forward on candle, tokenizer, chat template, KV cache, and the
//! model files (manifest, provisioning).

pub mod chat;
pub mod config;
pub mod fetch;
pub mod kv;
pub mod llama;
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
pub use vocab::Vocab;

/// What a loaded model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Base,
    Reward,
    Draft,
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
        Self::load_with(path, name, role, false)
    }

    /// `dequantize`: run GGUF weights in f32 (exact but slower; see `Llama::from_gguf`).
    pub fn load_with(path: &Path, name: &str, role: Role, dequantize: bool) -> Result<Self> {
        if !path.exists() {
            bail!(
                "model not found: {} (run `tilt fetch` for the default model)",
                path.display()
            );
        }
        if path.is_dir() {
            Self::load_safetensors(path, name, role)
        } else {
            Self::load_gguf(path, name, role, dequantize)
        }
    }

    fn load_gguf(path: &Path, name: &str, role: Role, dequantize: bool) -> Result<Self> {
        let mut file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| anyhow::anyhow!("{} is not a readable GGUF file: {e}", path.display()))?;
        let llama = Llama::from_gguf(&content, &mut file, dequantize)
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

    fn load_safetensors(dir: &Path, name: &str, role: Role) -> Result<Self> {
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
        let llama = Llama::from_safetensors(dir, cfg)?;
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
