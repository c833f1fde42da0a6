//! The model layer: llama-family forward with our int8 kernels, tokenizer, chat template, KV
//! cache, and the model files (manifest, provisioning). It imports nothing of the layers above.

pub mod adapter;
mod attention;
pub mod chat;
pub mod companions;
pub mod config;
pub mod fetch;
mod huge;
pub mod kv;
mod linear;
pub mod llama;
mod load;
mod pool;
mod quant;
pub mod vocab;

use std::sync::Arc;

pub use chat::{ChatTemplate, Message};
pub use config::LlamaConfig;
pub use kv::KvCache;
pub use llama::{ForwardError, ForwardItem, ForwardOutput, Llama, Logits};
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

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Self::Base => "base",
            Self::Reward => "reward",
            Self::Draft => "draft",
        }
    }
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
    pub fn context_length(&self) -> usize {
        self.llama.cfg.context_length
    }
}

/// Index of a model among those a server runs: 0 is the base model.
pub type ModelId = usize;
pub const BASE: ModelId = 0;

/// What the rest of the server may know about a loaded model without touching its weights.
#[derive(Clone)]
pub struct ModelInfo {
    pub name: String,
    pub role: Role,
    pub config: LlamaConfig,
    pub vocab: Arc<Vocab>,
    pub chat: Arc<ChatTemplate>,
    /// An adapter over the base's weights. As a reward model, what it rewards is its log-probs
    /// relative to the base's, log π_r − log π_base (as DPO reads a policy against its
    /// reference): an adapter that changes nothing rewards nothing, and weight 1 in GenARM
    /// samples from the adapted model itself.
    pub relative: bool,
}

impl ModelInfo {
    pub fn context_length(&self) -> usize {
        self.config.context_length
    }
}
