//! ARGS (Khanov et al., ICLR 2024; reference/algorithms.md §3): each step takes the base's `top_k`
//! next tokens (after the request's logit bias and penalties), scores each by
//! logit + w·Σ_i w_i·r_i(answer + token) with the programmatic objectives, and takes the best
//! (`greedy`, ARGS-greedy) or draws among the k from softmax(score/τ) at the request's
//! temperature and truncation (`sample`, ARGS-stochastic). Raw logits, not log-probs, as in the
//! official code: they differ by a per-step constant, which neither rule sees.
//!
//! The rewards are programmatic, so a token costs one base forward, as with `sample`, and each
//! choice streams token by token. Choice i draws from RNG stream i of the request's seed.

use anyhow::Result;
use serde_json::json;

use super::objectives::{answer_text, Objective, Scoring};
use super::prompt::{fork, plan_choices, SharedPrompt};
use super::{Choice, Decoder, Flow, Generation};
use crate::engine::{Cx, Event, Outputs, Usage, BASE};
use crate::sampling::{argmax, top_sorted};

/// Most candidate tokens per step.
pub const MAX_TOP_K: usize = 32;

/// How the next token is picked among the rescored candidates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Greedy,
    Sample,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Greedy => "greedy",
            Self::Sample => "sample",
        }
    }
}

/// Checked `args` parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ArgsSpec {
    pub top_k: usize,
    pub mode: Mode,
    /// w: how much the reward counts against the logit.
    pub weight: f32,
    pub objectives: Vec<Objective>,
}

pub struct Args {
    spec: ArgsSpec,
    scoring: Scoring,
    generation: Generation,
    prompt: SharedPrompt,
    choices: Vec<Choice>,
    /// (choice, ticket) planned this step.
    tickets: Vec<(usize, usize)>,
    /// Tokens fed to the base after the prompt.
    forward_tokens: usize,
}

impl Args {
    pub fn new(spec: ArgsSpec, generation: Generation) -> Self {
        Self {
            scoring: Scoring::new(&spec.objectives),
            prompt: SharedPrompt::new(BASE, generation.prompt.clone()),
            spec,
            generation,
            choices: Vec::new(),
            tickets: Vec::new(),
            forward_tokens: 0,
        }
    }

    /// Pick choice `i`'s next token from the base's `logits` and record it.
    fn step(&mut self, cx: &mut Cx, i: usize, logits: &[f32]) -> Result<()> {
        let g = &self.generation;
        let c = &mut self.choices[i];
        let adjusted = c.sampler.adjusted(logits);
        let candidates = top_sorted(&adjusted, self.spec.top_k);
        let vocab = &cx.model(BASE).vocab;
        let scores: Vec<f32> = candidates
            .iter()
            .map(|v| {
                let text = answer_text(vocab, g, c.tokens.iter().chain([v]));
                adjusted[*v as usize] + self.spec.weight * self.scoring.reward(&text) as f32
            })
            .collect();
        let j = match self.spec.mode {
            Mode::Greedy => argmax(&scores) as usize,
            Mode::Sample => c.sampler.choose(&scores),
        };
        let sampled = c.sampler.record(candidates[j], logits);
        c.accept(cx, g, sampled)
    }

    fn report(&self, cx: &Cx) -> serde_json::Value {
        let vocab = &cx.model(BASE).vocab;
        let rewards: Vec<f64> = self
            .choices
            .iter()
            .map(|c| {
                self.scoring
                    .reward(&answer_text(vocab, &self.generation, &c.tokens))
            })
            .collect();
        let output: usize = self.choices.iter().map(|c| c.tokens.len()).sum();
        json!({
            "top_k": self.spec.top_k,
            "mode": self.spec.mode.name(),
            "weight": self.spec.weight,
            "weights": self.scoring.weights(),
            "rewards": rewards,
            "forward_tokens": self.forward_tokens,
            "forward_tokens_per_output_token": self.forward_tokens as f64 / output.max(1) as f64,
        })
    }
}

impl Decoder for Args {
    fn plan(&mut self, cx: &mut Cx) -> Result<()> {
        self.tickets.clear();
        if self.choices.is_empty() {
            return self.prompt.plan(cx);
        }
        plan_choices(cx, &self.choices, &mut self.tickets)?;
        self.forward_tokens += self.tickets.len();
        Ok(())
    }

    fn absorb(&mut self, cx: &mut Cx, out: &Outputs) -> Result<Flow> {
        if self.choices.is_empty() {
            let Some((seq, logits)) = self.prompt.absorb(out)? else {
                return Ok(Flow::Continue);
            };
            let seqs = fork(cx, seq, self.generation.n)?;
            for (i, s) in seqs.into_iter().enumerate() {
                self.choices.push(Choice::new(i, s, &self.generation));
                self.step(cx, i, logits)?;
            }
        } else {
            for (i, t) in std::mem::take(&mut self.tickets) {
                self.step(cx, i, out.last(t)?)?;
            }
        }
        if !self.choices.iter().all(Choice::is_done) {
            return Ok(Flow::Continue);
        }
        cx.emit(Event::Done {
            usage: Usage {
                prompt_tokens: self.generation.prompt.len(),
                completion_tokens: self.choices.iter().map(|c| c.tokens.len()).sum(),
            },
            report: Some(self.report(cx)),
        });
        Ok(Flow::Done)
    }
}
