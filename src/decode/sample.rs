//! Plain sampling (greedy at temperature 0): prefill the prompt once, fork it for each of the `n`
//! choices, then one decode step per choice per engine step.

use anyhow::Result;

use super::{Choice, Decoder, Flow, Generation};
use crate::engine::{Cx, Event, Outputs, SeqId, Usage, BASE};
use crate::model::Logits;

pub struct Sample {
    generation: Generation,
    prompt_seq: Option<SeqId>,
    prefilled: usize,
    choices: Vec<Choice>,
    /// (choice, ticket) planned this step.
    tickets: Vec<(usize, usize)>,
}

impl Sample {
    pub fn new(generation: Generation) -> Self {
        Self {
            generation,
            prompt_seq: None,
            prefilled: 0,
            choices: Vec::new(),
            tickets: Vec::new(),
        }
    }
}

/// Schedule the next prompt chunk of `seq`; returns its ticket. Logits only after the last chunk.
pub fn plan_prefill(cx: &mut Cx, seq: SeqId, prompt: &[u32], done: usize) -> Result<usize> {
    let end = (done + cx.prefill_chunk.max(1)).min(prompt.len());
    let logits = if end == prompt.len() {
        Logits::Last
    } else {
        Logits::None
    };
    cx.forward(seq, prompt[done..end].to_vec(), logits)
}

impl Decoder for Sample {
    fn plan(&mut self, cx: &mut Cx) -> Result<()> {
        self.tickets.clear();
        if self.prefilled < self.generation.prompt.len() {
            let seq = *self.prompt_seq.get_or_insert_with(|| cx.new_seq(BASE));
            let t = plan_prefill(cx, seq, &self.generation.prompt, self.prefilled)?;
            self.tickets.push((usize::MAX, t));
            return Ok(());
        }
        for (i, c) in self.choices.iter().enumerate() {
            if let (false, Some(tok)) = (c.is_done(), c.last()) {
                let t = cx.forward(c.seq, vec![tok], Logits::Last)?;
                self.tickets.push((i, t));
            }
        }
        Ok(())
    }

    fn absorb(&mut self, cx: &mut Cx, out: &Outputs) -> Result<Flow> {
        let g = &self.generation;
        if self.choices.is_empty() {
            let (_, t) = self.tickets[0];
            self.prefilled = (self.prefilled + cx.prefill_chunk.max(1)).min(g.prompt.len());
            if self.prefilled < g.prompt.len() {
                return Ok(Flow::Continue);
            }
            let logits = out.last(t)?;
            let seq = self.prompt_seq.expect("prefilled a sequence");
            // Fork before the first choice appends anything to the shared prompt cache.
            let mut seqs = vec![seq];
            for _ in 1..g.n {
                seqs.push(cx.fork(seq)?);
            }
            for (i, s) in seqs.into_iter().enumerate() {
                let mut c = Choice::new(i, s, g);
                let sampled = c.sampler.sample(logits);
                c.accept(cx, g, sampled)?;
                self.choices.push(c);
            }
        } else {
            for &(i, t) in &self.tickets {
                let c = &mut self.choices[i];
                let sampled = c.sampler.sample(out.last(t)?);
                c.accept(cx, g, sampled)?;
            }
        }
        if self.choices.iter().all(Choice::is_done) {
            let completion_tokens = self.choices.iter().map(|c| c.tokens.len()).sum();
            cx.emit(Event::Done {
                usage: Usage {
                    prompt_tokens: g.prompt.len(),
                    completion_tokens,
                },
                report: None,
            });
            return Ok(Flow::Done);
        }
        Ok(Flow::Continue)
    }
}
