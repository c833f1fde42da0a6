//! What every decoder does first: prefill its prompt once — in chunks, so a long prompt does not
//! stall the other requests' decode steps — then fork that cache for each of its sequences.
//! Asked for the prompt's own log-probs (`echo` with `logprobs`), the prefill keeps every
//! position's row and reports them once the prompt is in.

use anyhow::{bail, Context, Result};

use super::{Choice, Generation};
use crate::engine::{
    Cx, Decoder, Event, FinishReason, Flow, Outputs, PromptLogprobs, SeqId, Usage,
};
use crate::model::{for_each_mut, Logits, ModelId, BASE};
use crate::sampling::logprobs;

/// Logit rows one request may ask for in a step: each is vocabulary-wide (~200 KB here).
pub const MAX_ROWS: usize = 128;

pub struct SharedPrompt {
    model: ModelId,
    tokens: Vec<u32>,
    seq: Option<SeqId>,
    /// Tokens in the cache once the planned chunk is absorbed.
    done: usize,
    planned: Option<(usize, usize)>,
    /// Alternatives per position when the prompt's log-probs are asked for, and those so far.
    logprobs: Option<(usize, PromptLogprobs)>,
}

impl SharedPrompt {
    pub fn new(model: ModelId, tokens: Vec<u32>) -> Self {
        Self {
            model,
            tokens,
            seq: None,
            done: 0,
            planned: None,
            logprobs: None,
        }
    }

    /// The request's prompt on the base model, reporting its log-probs if the request asks.
    pub fn base(generation: &Generation) -> Self {
        let mut prompt = Self::new(BASE, generation.prompt.clone());
        prompt.logprobs = (generation.sampling.prompt_logprobs).map(|k| {
            let report = PromptLogprobs {
                prompt: 0,
                tokens: generation.prompt.clone(),
                entries: Vec::with_capacity(generation.prompt.len().saturating_sub(1)),
            };
            (k, report)
        });
        prompt
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
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
        let mut step = cx.prefill_tokens();
        if self.logprobs.is_some() {
            step = step.min(MAX_ROWS);
        }
        let end = (self.done + step).min(self.tokens.len());
        let logits = if self.logprobs.is_some() {
            Logits::All
        } else if end == self.tokens.len() {
            Logits::Last
        } else {
            Logits::None
        };
        let ticket = cx.forward(seq, self.tokens[self.done..end].to_vec(), logits)?;
        self.planned = Some((ticket, end));
        Ok(())
    }

    /// After the step: the prompt's sequence and its next-token logits, once the last chunk is in.
    pub fn absorb<'o>(&mut self, cx: &Cx, out: &Outputs<'o>) -> Result<Option<(SeqId, &'o [f32])>> {
        let Some((ticket, end)) = self.planned.take() else {
            return Ok(None);
        };
        let start = self.done;
        self.done = end;
        if let Some((k, report)) = &mut self.logprobs {
            // Row j predicts the token after position start + j; the prompt's last row
            // predicts the answer.
            let rows = out.rows(ticket)?;
            let mut entries: Vec<_> = (start + 1..(end + 1).min(self.tokens.len()))
                .zip(rows)
                .map(|(next, row)| (row, self.tokens[next], (0.0, Vec::new())))
                .collect();
            let k = *k;
            for_each_mut(&mut entries, |(row, token, entry)| {
                *entry = logprobs(row, *token, k)
            });
            report.entries.extend(entries.into_iter().map(|e| e.2));
            if end == self.tokens.len() {
                cx.emit(Event::Prompt(std::mem::take(report)));
            }
        }
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

/// A request that generates nothing (`max_tokens` 0, with `echo`): the prompt is prefilled only
/// when its log-probs are asked for, then every choice ends as a length limit ends it.
pub struct PromptOnly {
    generation: Generation,
    prompt: Option<SharedPrompt>,
}

impl PromptOnly {
    pub fn new(generation: Generation) -> Self {
        let prompt = (generation.sampling.prompt_logprobs.is_some())
            .then(|| SharedPrompt::base(&generation));
        Self { generation, prompt }
    }
}

impl Decoder for PromptOnly {
    fn plan(&mut self, cx: &mut Cx) -> Result<()> {
        match &mut self.prompt {
            Some(prompt) => prompt.plan(cx),
            None => Ok(()),
        }
    }

    fn absorb(&mut self, cx: &mut Cx, out: &Outputs) -> Result<Flow> {
        if let Some(prompt) = &mut self.prompt {
            if prompt.absorb(cx, out)?.is_none() {
                return Ok(Flow::Continue);
            }
        }
        for choice in 0..self.generation.n {
            cx.emit(Event::Finished {
                choice,
                reason: FinishReason::Length,
                text: String::new(),
            });
        }
        cx.emit(Event::Done {
            usage: Usage {
                prompt_tokens: self.generation.prompt.len(),
                completion_tokens: 0,
            },
            report: None,
        });
        Ok(Flow::Done)
    }
}

#[cfg(test)]
mod tests {
    use crate::decode::testing::{generation, run};
    use crate::engine::fake::{self, FakeModel, WORDS};
    use crate::engine::{Engine, EngineOptions, FinishReason};
    use crate::math::log_softmax;
    use crate::model::Role;
    use crate::sampling::{top_sorted, SamplingParams};
    use serde_json::json;

    /// The next word depends on the whole history.
    fn history(h: &[u32]) -> Vec<f32> {
        let s = h
            .iter()
            .enumerate()
            .map(|(i, &t)| (i as u32 + 3) * t)
            .sum::<u32>();
        fake::favour(s % WORDS.len() as u32, 1.5)
    }

    fn history_model() -> FakeModel {
        FakeModel::new("base", Role::Base, history)
    }

    fn asking(k: usize) -> SamplingParams {
        SamplingParams {
            logprobs: Some(k),
            prompt_logprobs: Some(k),
            ..SamplingParams::greedy()
        }
    }

    #[test]
    fn prompt_logprobs_are_the_teacher_forced_ones_across_chunks_for_every_decoder() {
        let model = history_model();
        let options = EngineOptions {
            prefill_chunk: 3,
            ..EngineOptions::default()
        };
        let e = Engine::start(vec![model], options);
        let prompt: Vec<u32> = vec![2, 5, 7, 3, 9, 4, 6, 8];
        for decoder in ["sample", "genarm", "best_of_n", "args", "deal"] {
            let params = match decoder {
                "best_of_n" | "args" | "deal" => json!({"rewards": {"sentiment": 1.0}}),
                _ => json!({}),
            };
            let out = run(&e, decoder, params, generation(&prompt, 2, asking(2)));
            let got = out
                .prompt
                .unwrap_or_else(|| panic!("{decoder}: no prompt logprobs"));
            assert_eq!(got.tokens, prompt);
            assert_eq!(got.entries.len(), prompt.len() - 1, "{decoder}");
            for (i, (lp, top)) in got.entries.iter().enumerate() {
                let mut row = history(&prompt[..=i]);
                log_softmax(&mut row);
                let want = row[prompt[i + 1] as usize];
                assert!((lp - want).abs() < 1e-5, "{decoder} @{i}: {lp} vs {want}");
                let ids: Vec<u32> = top.iter().map(|t| t.0).collect();
                assert_eq!(ids, top_sorted(&row, 2), "{decoder} @{i}");
            }
            assert_eq!(out.tokens[0].len(), 2, "{decoder} still generates");
        }
    }

    #[test]
    fn max_tokens_zero_scores_the_prompt_and_generates_nothing() {
        let model = history_model();
        let batches = model.batches.clone();
        let e = Engine::start(vec![model], EngineOptions::default());
        let prompt = [2, 5, 7, 3];
        let mut g = generation(&prompt, 0, asking(0));
        g.n = 2;
        let out = run(&e, "genarm", json!({}), g);
        assert_eq!(out.prompt.map(|p| p.entries.len()), Some(3));
        assert_eq!(out.finish, [Some(FinishReason::Length); 2]);
        assert!(out.tokens.iter().all(Vec::is_empty));
        assert_eq!(
            out.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
            Some((4, 0))
        );
        assert_eq!(batches.tokens(), 4);
        // Without logprobs there is nothing to compute.
        let out = run(
            &e,
            "sample",
            json!({}),
            generation(&prompt, 0, SamplingParams::greedy()),
        );
        assert!(out.prompt.is_none());
        assert_eq!(out.finish, [Some(FinishReason::Length)]);
        assert_eq!(batches.tokens(), 4);
    }
}
