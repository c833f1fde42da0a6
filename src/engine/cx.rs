//! The seam between the engine and a decoder: what a decoder may do in one step.

use anyhow::{bail, Context, Result};
use tokio::sync::mpsc;

use super::{Event, ModelId, ModelInfo, Planned, SeqStore};
use crate::model::{ForwardOutput, KvCache, Logits};

/// A sequence: one KV cache on one model.
pub type SeqId = usize;

/// Handed to `Decoder::plan` and `Decoder::absorb`.
pub struct Cx<'a> {
    store: &'a mut SeqStore,
    models: &'a [ModelInfo],
    owned: &'a mut Vec<SeqId>,
    planned: &'a mut Vec<Planned>,
    events: &'a mpsc::UnboundedSender<Event>,
    /// Most prompt tokens to put in one forward.
    pub prefill_chunk: usize,
}

impl<'a> Cx<'a> {
    pub(crate) fn new(
        store: &'a mut SeqStore,
        models: &'a [ModelInfo],
        owned: &'a mut Vec<SeqId>,
        planned: &'a mut Vec<Planned>,
        events: &'a mpsc::UnboundedSender<Event>,
        prefill_chunk: usize,
    ) -> Self {
        Self {
            store,
            models,
            owned,
            planned,
            events,
            prefill_chunk,
        }
    }

    pub fn model(&self, id: ModelId) -> &ModelInfo {
        &self.models[id]
    }

    pub fn models(&self) -> &[ModelInfo] {
        self.models
    }

    /// A new, empty sequence on `model`.
    pub fn new_seq(&mut self, model: ModelId) -> SeqId {
        let id = self.store.insert(model, KvCache::new());
        self.owned.push(id);
        id
    }

    /// A copy of `seq` (its cached positions), to continue independently.
    pub fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        let (model, cache) = self.store.get(seq).context("fork of an unknown sequence")?;
        let (model, copy) = (*model, cache.fork());
        let id = self.store.insert(model, copy);
        self.owned.push(id);
        Ok(id)
    }

    /// Release a sequence's cache now (all are released when the request ends).
    pub fn free(&mut self, seq: SeqId) {
        if let Some(i) = self.owned.iter().position(|&s| s == seq) {
            self.owned.swap_remove(i);
            self.store.remove(seq);
        }
    }

    /// Positions cached in `seq`.
    pub fn len(&self, seq: SeqId) -> usize {
        self.store.get(seq).map_or(0, |(_, c)| c.len())
    }

    /// Forget positions of `seq` from `len` on.
    pub fn truncate(&mut self, seq: SeqId, len: usize) {
        if let Some((_, c)) = self.store.get_mut(seq) {
            c.truncate(len);
        }
    }

    /// Positions `seq` may still grow by.
    pub fn room(&self, seq: SeqId) -> usize {
        match self.store.get(seq) {
            Some((m, c)) => self.models[*m].context_length().saturating_sub(c.len()),
            None => 0,
        }
    }

    /// Ask for a forward of `tokens` on `seq` in this step; the returned ticket finds its logits
    /// in `absorb`. One forward per sequence per step.
    pub fn forward(&mut self, seq: SeqId, tokens: Vec<u32>, logits: Logits) -> Result<usize> {
        if !self.owned.contains(&seq) {
            bail!("forward on a sequence this request does not own");
        }
        if self.planned.iter().any(|p| p.seq == seq) {
            bail!("two forwards of one sequence in one step");
        }
        if tokens.is_empty() {
            bail!("forward without tokens");
        }
        if tokens.len() > self.room(seq) {
            bail!("forward past the context length");
        }
        self.planned.push(Planned {
            seq,
            tokens,
            logits,
        });
        Ok(self.planned.len() - 1)
    }

    /// Send an event to the request's owner (ignored once the owner has gone).
    pub fn emit(&self, event: Event) {
        let _ = self.events.send(event);
    }
}

/// Logits of the forwards a request planned in this step, by ticket.
pub struct Outputs<'a> {
    outputs: &'a [ForwardOutput],
    landed: &'a [(ModelId, usize)],
}

impl<'a> Outputs<'a> {
    pub(crate) fn new(outputs: &'a [ForwardOutput], landed: &'a [(ModelId, usize)]) -> Self {
        Self { outputs, landed }
    }

    /// The next-token logits after the last token of ticket `t` (planned with `Logits::Last` or `All`).
    pub fn last(&self, t: usize) -> Result<&'a [f32]> {
        let (m, i) = *self.landed.get(t).context("unknown forward ticket")?;
        self.outputs
            .get(m)
            .and_then(|o| o.last(i))
            .context("this forward returned no logits")
    }

    /// Every row of ticket `t` (planned with `Logits::All`): row j predicts the token after token j.
    pub fn rows(&self, t: usize) -> Result<Vec<&'a [f32]>> {
        let (m, i) = *self.landed.get(t).context("unknown forward ticket")?;
        let out = self.outputs.get(m).context("unknown model")?;
        Ok(out.item(i).collect())
    }
}
