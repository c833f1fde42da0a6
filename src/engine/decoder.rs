//! The contract between the engine and a decoder. Each step the engine asks every running
//! request's decoder to plan forwards (on any model, any number of its sequences), runs one
//! batched forward per model over everything planned, then hands each decoder its logits to
//! absorb: so token-level and search decoders of every request batch together.

use anyhow::{bail, Result};
use tokio::sync::mpsc;

use super::store::{SeqId, Store};
use super::Event;
use crate::model::{ForwardOutput, Logits, ModelId, ModelInfo};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Done,
}

/// One request's state machine.
pub trait Decoder: Send {
    /// Schedule this step's forwards with `cx.forward` (or none).
    fn plan(&mut self, cx: &mut Cx) -> Result<()>;
    /// Read the logits of the forwards scheduled in `plan` and advance.
    fn absorb(&mut self, cx: &mut Cx, out: &Outputs) -> Result<Flow>;
}

/// A forward one request asked for in this step.
pub(super) struct Planned {
    pub(super) seq: SeqId,
    pub(super) tokens: Vec<u32>,
    pub(super) logits: Logits,
}

/// Handed to `Decoder::plan` and `Decoder::absorb`: what a decoder may do in one step.
pub struct Cx<'a> {
    store: &'a mut dyn Store,
    models: &'a [ModelInfo],
    owned: &'a mut Vec<SeqId>,
    planned: &'a mut Vec<Planned>,
    events: &'a mpsc::UnboundedSender<Event>,
    /// Most prompt tokens to put in one forward.
    pub prefill_chunk: usize,
    /// While other requests decode: the prompt tokens this step may still prefill (None:
    /// nothing decodes, a whole chunk goes).
    pub(super) prefill_budget: Option<usize>,
}

impl<'a> Cx<'a> {
    pub(super) fn new(
        store: &'a mut dyn Store,
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
            prefill_budget: None,
        }
    }

    /// How many prompt tokens to prefill next: a whole chunk, or while others decode what is
    /// left of this step's budget (at least one).
    pub fn prefill_tokens(&self) -> usize {
        let chunk = self.prefill_chunk.max(1);
        self.prefill_budget.map_or(chunk, |b| b.clamp(1, chunk))
    }

    pub fn model(&self, id: ModelId) -> &ModelInfo {
        &self.models[id]
    }

    pub fn models(&self) -> &[ModelInfo] {
        self.models
    }

    /// A new, empty sequence on `model`.
    pub fn new_seq(&mut self, model: ModelId) -> SeqId {
        let id = self.store.create(model);
        self.owned.push(id);
        id
    }

    /// A copy of `seq` (its cached positions), to continue independently.
    pub fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        if !self.owned.contains(&seq) {
            bail!("fork of a sequence this request does not own");
        }
        let Some(id) = self.store.fork(seq) else {
            bail!("fork of an unknown sequence");
        };
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
        self.store.describe(seq).map_or(0, |(_, len)| len)
    }

    /// Forget positions of `seq` from `len` on.
    pub fn truncate(&mut self, seq: SeqId, len: usize) {
        self.store.truncate(seq, len);
    }

    /// Positions `seq` may still grow by.
    pub fn room(&self, seq: SeqId) -> usize {
        match self.store.describe(seq) {
            Some((m, len)) => self.models[m].context_length().saturating_sub(len),
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
    pub(super) fn new(outputs: &'a [ForwardOutput], landed: &'a [(ModelId, usize)]) -> Self {
        Self { outputs, landed }
    }

    /// The next-token logits after the last token of ticket `t` (planned with `Logits::Last` or `All`).
    pub fn last(&self, t: usize) -> Result<&'a [f32]> {
        match self.landed.get(t) {
            Some(&(m, i)) => match self.outputs.get(m).and_then(|o| o.last(i)) {
                Some(row) => Ok(row),
                None => bail!("this forward returned no logits"),
            },
            None => bail!("unknown forward ticket"),
        }
    }

    /// Every row of ticket `t` (planned with `Logits::All`): row j predicts the token after token j.
    pub fn rows(&self, t: usize) -> Result<Vec<&'a [f32]>> {
        let Some(&(m, i)) = self.landed.get(t) else {
            bail!("unknown forward ticket");
        };
        let Some(out) = self.outputs.get(m) else {
            bail!("unknown model");
        };
        Ok(out.item(i).collect())
    }
}
