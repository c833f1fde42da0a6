//! What the engine needs of a model: a ragged batch in, logits out, over caches it can fork and
//! truncate. The real model implements it here; unit tests use a scripted fake (`fake`).

use crate::model::{ForwardError, ForwardItem, ForwardOutput, KvCache, Llama, Model, ModelInfo};

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
    /// Whether `self`'s items may run in one forward with `other`'s: they share weights (a base
    /// and adapters over it).
    fn shares_weights(&self, _other: &Self) -> bool {
        false
    }
    /// One forward over models that share weights (`shares_weights`): `items` holds
    /// `counts[k]` items of `models[k]`, in that order; one output per model.
    fn forward_shared(
        models: &[&Self],
        items: &mut [ForwardItem<'_, Self::Cache>],
        counts: &[usize],
    ) -> Result<Vec<ForwardOutput>, ForwardError>
    where
        Self: Sized,
    {
        let mut outputs = Vec::with_capacity(models.len());
        let mut rest = items;
        for (model, &count) in models.iter().zip(counts) {
            let (mine, others) = rest.split_at_mut(count);
            outputs.push(model.forward(mine)?);
            rest = others;
        }
        Ok(outputs)
    }
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
            relative: self.llama.adapter().is_some(),
        }
    }

    fn forward(
        &self,
        items: &mut [ForwardItem<'_, KvCache>],
    ) -> Result<ForwardOutput, ForwardError> {
        self.llama.forward(items)
    }

    fn shares_weights(&self, other: &Self) -> bool {
        self.llama.shares_weights(&other.llama)
    }

    fn forward_shared(
        models: &[&Self],
        items: &mut [ForwardItem<'_, KvCache>],
        counts: &[usize],
    ) -> Result<Vec<ForwardOutput>, ForwardError> {
        let llamas: Vec<&Llama> = models.iter().map(|m| &m.llama).collect();
        Llama::forward_shared(&llamas, items, counts)
    }
}
