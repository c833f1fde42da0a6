//! Plain sampling (greedy at temperature 0): prefill the prompt once, fork it for each of the `n`
//! choices, then one decode step per choice per engine step.

use anyhow::{Context, Result};

use super::prompt::{fork, plan_choices, SharedPrompt};
use super::{Choice, Decoder, Flow, Generation};
use crate::engine::{Cx, Event, Outputs, Usage, BASE};
use crate::model::for_each_mut;
use crate::sampling::Sampled;

pub struct Sample {
    generation: Generation,
    prompt: SharedPrompt,
    choices: Vec<Choice>,
    /// (choice, ticket) planned this step.
    tickets: Vec<(usize, usize)>,
}

impl Sample {
    pub fn new(generation: Generation) -> Self {
        let prompt = SharedPrompt::new(BASE, generation.prompt.clone());
        Self {
            generation,
            prompt,
            choices: Vec::new(),
            tickets: Vec::new(),
        }
    }
}

impl Decoder for Sample {
    fn plan(&mut self, cx: &mut Cx) -> Result<()> {
        self.tickets.clear();
        if self.choices.is_empty() {
            return self.prompt.plan(cx);
        }
        plan_choices(cx, &self.choices, &mut self.tickets)
    }

    fn absorb(&mut self, cx: &mut Cx, out: &Outputs) -> Result<Flow> {
        let g = &self.generation;
        if self.choices.is_empty() {
            let Some((seq, logits)) = self.prompt.absorb(out)? else {
                return Ok(Flow::Continue);
            };
            let seqs = fork(cx, seq, g.n)?;
            for (i, s) in seqs.into_iter().enumerate() {
                let mut c = Choice::new(i, s, g);
                let sampled = c.sampler.sample(logits);
                c.accept(cx, g, sampled)?;
                self.choices.push(c);
            }
        } else {
            // Draw every row on the pool's threads, then record the tokens in order.
            let mut draws = Vec::with_capacity(self.tickets.len());
            let mut choices = self.choices.iter_mut().enumerate();
            for &(i, t) in &self.tickets {
                let c = choices
                    .find(|(j, _)| *j == i)
                    .context("a ticket out of order")?;
                draws.push((&mut c.1.sampler, out.last(t)?, None));
            }
            for_each_mut(&mut draws, |(sampler, row, drawn)| {
                *drawn = Some(sampler.sample(row))
            });
            let drawn = draws
                .into_iter()
                .map(|d| d.2.context("a row left undrawn"))
                .collect::<Result<Vec<Sampled>>>()?;
            for (&(i, _), sampled) in self.tickets.iter().zip(drawn) {
                self.choices[i].accept(cx, g, sampled)?;
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
