//! What every decoder does first: prefill its prompt once — in chunks, so a long prompt does not
//! stall the other requests' decode steps — then fork that cache for each of its sequences.

use anyhow::{bail, Context, Result};

use super::Choice;
use crate::engine::{Cx, Outputs, SeqId};
use crate::model::{Logits, ModelId};

pub struct SharedPrompt {
    model: ModelId,
    tokens: Vec<u32>,
    seq: Option<SeqId>,
    /// Tokens in the cache once the planned chunk is absorbed.
    done: usize,
    planned: Option<(usize, usize)>,
}

impl SharedPrompt {
    pub fn new(model: ModelId, tokens: Vec<u32>) -> Self {
        Self {
            model,
            tokens,
            seq: None,
            done: 0,
            planned: None,
        }
    }

    /// Schedule the next chunk, if any is left.
    pub fn plan(&mut self, cx: &mut Cx) -> Result<()> {
        if self.tokens.is_empty() {
            bail!("an empty prompt for {}", cx.model(self.model).name);
        }
        if self.done == self.tokens.len() {
            return Ok(());
        }
        let seq = *self.seq.get_or_insert_with(|| cx.new_seq(self.model));
        let end = (self.done + cx.prefill_tokens()).min(self.tokens.len());
        let logits = if end == self.tokens.len() {
            Logits::Last
        } else {
            Logits::None
        };
        let ticket = cx.forward(seq, self.tokens[self.done..end].to_vec(), logits)?;
        self.planned = Some((ticket, end));
        Ok(())
    }

    /// After the step: the prompt's sequence and its next-token logits, once the last chunk is in.
    pub fn absorb<'o>(&mut self, out: &Outputs<'o>) -> Result<Option<(SeqId, &'o [f32])>> {
        let Some((ticket, end)) = self.planned.take() else {
            return Ok(None);
        };
        self.done = end;
        if end < self.tokens.len() {
            return Ok(None);
        }
        Ok(Some((
            self.seq.context("a prompt without its sequence")?,
            out.last(ticket)?,
        )))
    }
}

/// `count` sequences continuing the prefilled `seq` (itself first). Forks are taken before
/// anything is appended to the shared cache.
pub fn fork(cx: &mut Cx, seq: SeqId, count: usize) -> Result<Vec<SeqId>> {
    let mut seqs = vec![seq];
    for _ in 1..count {
        seqs.push(cx.fork(seq)?);
    }
    Ok(seqs)
}

/// One decode step for every unfinished choice; records `(choice, ticket)`.
pub fn plan_choices(
    cx: &mut Cx,
    choices: &[Choice],
    tickets: &mut Vec<(usize, usize)>,
) -> Result<()> {
    for (i, c) in choices.iter().enumerate() {
        if let (false, Some(tok)) = (c.is_done(), c.last()) {
            tickets.push((i, cx.forward(c.seq, vec![tok], Logits::Last)?));
        }
    }
    Ok(())
}
