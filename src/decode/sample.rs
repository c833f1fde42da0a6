//! Plain sampling (greedy at temperature 0): prefill the prompt once, fork it for each of the `n`
//! choices, then one decode step per choice per engine step.

use anyhow::{Context, Result};

use super::prompt::{fork, plan_choices, SharedPrompt};
use super::{typed, Choice, Generation, Method, ParamError, Params};
use crate::engine::{Cx, Decoder, Event, Flow, Outputs, Usage};
use crate::model::{for_each_mut, ModelInfo};
use crate::reward::Registry;
use crate::sampling::Sampled;

/// `sample`: no parameters beyond the request's sampling fields.
#[derive(Debug, Clone, Copy)]
pub struct Sample;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SampleParams {}

impl Method for Sample {
    type Spec = ();

    fn name(&self) -> &'static str {
        "sample"
    }

    fn parse(&self, params: Params, _: &Registry) -> Result<(), ParamError> {
        typed::<SampleParams>(params).map(|_| ())
    }

    fn build(
        &self,
        _: &(),
        generation: Generation,
        _: &[ModelInfo],
    ) -> Result<Box<dyn Decoder>, ParamError> {
        Ok(Box::new(SampleDecoder::new(generation)))
    }
}

pub struct SampleDecoder {
    generation: Generation,
    prompt: SharedPrompt,
    choices: Vec<Choice>,
    /// (choice, ticket) planned this step.
    tickets: Vec<(usize, usize)>,
}

impl SampleDecoder {
    pub fn new(generation: Generation) -> Self {
        let prompt = SharedPrompt::base(&generation);
        Self {
            generation,
            prompt,
            choices: Vec::new(),
            tickets: Vec::new(),
        }
    }
}

impl Decoder for SampleDecoder {
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
            let Some((seq, logits)) = self.prompt.absorb(cx, out)? else {
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

#[cfg(test)]
mod tests {
    use crate::decode::testing::{engine, generation, run, seeded};
    use crate::engine::fake::{self, id, FakeModel};
    use crate::engine::{Engine, EngineOptions, FinishReason};
    use crate::model::Role;
    use crate::sampling::SamplingParams;
    use serde_json::json;

    #[test]
    fn greedy_follows_the_model_and_stops_at_max_tokens() {
        let e = engine(vec![FakeModel::counting()]);
        let g = generation(&[id("the")], 4, SamplingParams::greedy());
        let out = run(&e, "sample", json!({}), g);
        assert_eq!(out.text, [" cat dog sat on"]);
        assert_eq!(out.finish, [Some(FinishReason::Length)]);
        assert_eq!(out.usage.unwrap().completion_tokens, 4);
    }

    #[test]
    fn end_of_generation_and_stop_strings_end_a_choice() {
        // The fake ends its answer after `dog`.
        let ends = FakeModel::new("ends", Role::Base, |h| match h.last() {
            Some(&t) if t == id("dog") => fake::favour(fake::EOS, 9.0),
            _ => fake::counting(h),
        });
        let e = engine(vec![ends]);
        let out = run(
            &e,
            "sample",
            json!({}),
            generation(&[id("the")], 9, SamplingParams::greedy()),
        );
        assert_eq!(
            (out.text[0].as_str(), out.finish[0]),
            (" cat dog", Some(FinishReason::Stop))
        );
        assert_eq!(out.tokens[0].last(), Some(&fake::EOS));
        let mut g = generation(&[id("the")], 9, SamplingParams::greedy());
        g.stop = vec![" do".into()];
        let out = run(&e, "sample", json!({}), g);
        assert_eq!(
            (out.text[0].as_str(), out.finish[0]),
            (" cat", Some(FinishReason::Stop))
        );
    }

    #[test]
    fn choices_draw_from_their_own_streams_of_one_seed() {
        let e = engine(vec![FakeModel::counting()]);
        let mut g = generation(&[id("the")], 12, seeded(5));
        g.n = 3;
        let three = run(&e, "sample", json!({}), g.clone());
        assert_eq!(three.tokens.len(), 3);
        assert!(three.tokens[0] != three.tokens[1] || three.tokens[1] != three.tokens[2]);
        g.n = 1;
        assert_eq!(
            run(&e, "sample", json!({}), g.clone()).tokens[0],
            three.tokens[0]
        );
        assert_eq!(
            run(&e, "sample", json!({}), g).tokens,
            run(
                &e,
                "sample",
                json!({}),
                generation(&[id("the")], 12, seeded(5))
            )
            .tokens
        );
    }

    #[test]
    fn a_long_prompt_is_prefilled_in_chunks() {
        let model = FakeModel::counting();
        let batches = model.batches.clone();
        let options = EngineOptions {
            prefill_chunk: 4,
            ..EngineOptions::default()
        };
        let e = Engine::start(vec![model], options);
        let prompt: Vec<u32> = (2..12).collect();
        let out = run(
            &e,
            "sample",
            json!({}),
            generation(&prompt, 2, SamplingParams::greedy()),
        );
        assert_eq!(out.tokens[0].len(), 2);
        assert_eq!(batches.get(), [vec![4], vec![4], vec![2], vec![1]]);
    }
}
