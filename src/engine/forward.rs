//! What the engine needs of a model: a ragged batch in, logits out, over caches it can fork and
//! truncate. The real model implements it here; unit tests use a scripted fake (`fake`).

use crate::model::{ForwardError, ForwardItem, ForwardOutput, KvCache, Model, ModelInfo};

/// One sequence's cached positions.
pub trait Cache: Default + Send + 'static {
    /// Positions cached.
    fn positions(&self) -> usize;
    /// A copy to continue independently.
    fn fork(&self) -> Self;
    /// Forget positions from `len` on.
    fn truncate(&mut self, len: usize);
}

/// A model the engine can step.
pub trait Forward: Send + 'static {
    type Cache: Cache;
    /// What the rest of the server may know of the model.
    fn info(&self) -> ModelInfo;
    /// Append each item's tokens to its cache; return the logits each item asked for.
    fn forward(
        &self,
        items: &mut [ForwardItem<'_, Self::Cache>],
    ) -> Result<ForwardOutput, ForwardError>;
}

impl Cache for KvCache {
    fn positions(&self) -> usize {
        self.len()
    }

    fn fork(&self) -> Self {
        KvCache::fork(self)
    }

    fn truncate(&mut self, len: usize) {
        KvCache::truncate(self, len)
    }
}

impl Forward for Model {
    type Cache = KvCache;

    fn info(&self) -> ModelInfo {
        ModelInfo {
            name: self.name.clone(),
            role: self.role,
            config: self.llama.cfg.clone(),
            vocab: self.vocab.clone(),
            chat: self.chat.clone(),
        }
    }

    fn forward(
        &self,
        items: &mut [ForwardItem<'_, KvCache>],
    ) -> Result<ForwardOutput, ForwardError> {
        self.llama.forward(items)
    }
}
