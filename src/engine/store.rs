//! Every sequence's cache, by id; each remembers the model it belongs to.

use super::forward::Cache;
use crate::model::ModelId;

/// A sequence: one cache on one model.
pub type SeqId = usize;

pub(super) struct SeqStore<C> {
    slots: Vec<Option<(ModelId, C)>>,
    free: Vec<SeqId>,
}

impl<C> Default for SeqStore<C> {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<C: Cache> SeqStore<C> {
    pub(super) fn get_mut(&mut self, id: SeqId) -> Option<&mut (ModelId, C)> {
        self.slots.get_mut(id).and_then(Option::as_mut)
    }

    fn get(&self, id: SeqId) -> Option<&(ModelId, C)> {
        self.slots.get(id).and_then(Option::as_ref)
    }

    fn insert(&mut self, model: ModelId, cache: C) -> SeqId {
        match self.free.pop() {
            Some(id) => {
                self.slots[id] = Some((model, cache));
                id
            }
            None => {
                self.slots.push(Some((model, cache)));
                self.slots.len() - 1
            }
        }
    }
}

/// What a decoder's `Cx` may do to the caches, whatever the model's cache type.
pub(super) trait Store {
    fn create(&mut self, model: ModelId) -> SeqId;
    /// A copy of `seq`, on the same model.
    fn fork(&mut self, seq: SeqId) -> Option<SeqId>;
    fn remove(&mut self, seq: SeqId);
    /// The sequence's model and cached positions.
    fn describe(&self, seq: SeqId) -> Option<(ModelId, usize)>;
    fn truncate(&mut self, seq: SeqId, len: usize);
}

impl<C: Cache> Store for SeqStore<C> {
    fn create(&mut self, model: ModelId) -> SeqId {
        self.insert(model, C::default())
    }

    fn fork(&mut self, seq: SeqId) -> Option<SeqId> {
        let (model, cache) = self.get(seq)?;
        let (model, copy) = (*model, cache.fork());
        Some(self.insert(model, copy))
    }

    fn remove(&mut self, seq: SeqId) {
        if self.slots.get_mut(seq).and_then(Option::take).is_some() {
            self.free.push(seq);
        }
    }

    fn describe(&self, seq: SeqId) -> Option<(ModelId, usize)> {
        self.get(seq).map(|(m, c)| (*m, c.positions()))
    }

    fn truncate(&mut self, seq: SeqId, len: usize) {
        if let Some((_, c)) = self.get_mut(seq) {
            c.truncate(len);
        }
    }
}
