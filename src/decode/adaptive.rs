//! Entropy-adaptive decoding (Simonds, "Entropy Adaptive Decoding", 2025; reference/
//! algorithms.md §8): a small draft model and the large base, of one tokenizer, take turns
//! writing the answer. Every row the active model produces has its entropy (bits, before
//! temperature) enter a rolling window; while the window's mean is at least `entropy_threshold`
//! the large model writes the next token, otherwise the small one; after a switch the new model
//! writes at least `min_stay` tokens before the next one, so the two cannot flap.
//!
//! Both models read the prompt at the start (each in its own chat template; so a switch never
//! waits on a prompt) and every choice keeps a sequence on each. The model that becomes active
//! catches up on the answer tokens it has not seen in one forward: its cache stays valid and
//! nothing is recomputed. Threshold 0 is large-only decoding and ∞ small-only, token for token.

use std::collections::VecDeque;

use anyhow::{Context, Result};
use serde_json::json;

use super::prompt::{fork, SharedPrompt};
use super::{typed, Choice, Generation, Method, ParamError, Params};
use crate::engine::{Cx, Decoder, Event, FinishReason, Flow, Outputs, SeqId, Usage};
use crate::math::entropy_bits;
use crate::model::{LlamaConfig, Logits, ModelId, ModelInfo, BASE};
use crate::reward::Registry;

/// Longest entropy window.
pub const MAX_WINDOW: usize = 64;
/// Longest minimum stay.
pub const MAX_STAY: usize = 4096;

/// `adaptive`: switch between a small and a large model on uncertainty.
#[derive(Debug, Clone, Copy)]
pub struct Adaptive;

/// `adaptive`'s parameters.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AdaptiveParams {
    /// Mean entropy, in bits, from which on the large model writes.
    #[serde(default = "default_threshold")]
    entropy_threshold: f64,
    /// Rows whose entropies are averaged: the paper's 5.
    #[serde(default = "default_window")]
    window: usize,
    /// Tokens a model writes after becoming active before another switch.
    #[serde(default = "default_stay")]
    min_stay: usize,
    /// The small model, by name (default: the first draft loaded).
    draft: Option<String>,
    /// Not supported: refused with a reason.
    guide: Option<serde_json::Value>,
}

fn default_threshold() -> f64 {
    2.0
}

fn default_window() -> usize {
    5
}

fn default_stay() -> usize {
    4
}

/// Checked `adaptive` parameters.
#[derive(Debug, Clone)]
pub struct AdaptiveSpec {
    pub entropy_threshold: f32,
    pub window: usize,
    pub min_stay: usize,
    /// The small model.
    pub draft: ModelId,
}

impl Method for Adaptive {
    type Spec = AdaptiveSpec;

    fn name(&self) -> &'static str {
        "adaptive"
    }

    fn parse(&self, params: Params, rewards: &Registry) -> Result<AdaptiveSpec, ParamError> {
        let p: AdaptiveParams = typed(params)?;
        if p.guide.is_some() {
            return Err(ParamError::new(
                "guide",
                "adaptive decoding does not take GenARM guidance: the reward models would have to follow two models' rows; use `genarm` or `best_of_n` with `guide`",
            ));
        }
        // ∞ is allowed: small-only decoding.
        let threshold = p.entropy_threshold as f32;
        if threshold.is_nan() || threshold < 0.0 {
            return Err(ParamError::new(
                "entropy_threshold",
                format!(
                    "`entropy_threshold` must be a number of bits, at least 0, got {}",
                    p.entropy_threshold
                ),
            ));
        }
        Ok(AdaptiveSpec {
            entropy_threshold: threshold,
            window: super::within("window", p.window, 1, MAX_WINDOW)?,
            min_stay: super::within("min_stay", p.min_stay, 1, MAX_STAY)?,
            draft: rewards
                .draft(p.draft.as_deref())
                .map_err(|why| ParamError::new("draft", why))?,
        })
    }

    fn models(&self, spec: &AdaptiveSpec) -> Vec<ModelId> {
        vec![spec.draft]
    }

    fn build(
        &self,
        spec: &AdaptiveSpec,
        generation: Generation,
        models: &[ModelInfo],
    ) -> Result<Box<dyn Decoder>, ParamError> {
        let cost = |m: ModelId| multiply_adds(&models[m].config) as f64;
        Ok(Box::new(AdaptiveDecoder {
            small: SharedPrompt::new(spec.draft, generation.prompt_for(spec.draft).to_vec()),
            large: SharedPrompt::base(&generation),
            firsts: [None, None],
            cost_ratio: cost(spec.draft) / cost(BASE),
            spec: spec.clone(),
            generation,
            branches: Vec::new(),
        }))
    }
}

/// Multiply-adds a model spends on one token: its layers' projections and the output layer.
pub fn multiply_adds(c: &LlamaConfig) -> usize {
    let (q, kv) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    let layer = c.hidden * (q + 2 * kv) + q * c.hidden + 3 * c.hidden * c.ffn;
    c.n_layers * layer + c.vocab_size * c.hidden
}

/// Which model writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Small = 0,
    Large = 1,
}

impl Side {
    fn other(self) -> Self {
        match self {
            Self::Small => Self::Large,
            Self::Large => Self::Small,
        }
    }
}

/// One choice: its answer, a sequence on each model and how far each has read the answer.
struct Branch {
    choice: Choice,
    seqs: [SeqId; 2],
    fed: [usize; 2],
    active: Side,
    entropies: VecDeque<f32>,
    /// Tokens written since the last switch (the first model counts as switched to).
    since_switch: usize,
    ticket: Option<usize>,
    written: [usize; 2],
    switches: usize,
    /// Answer tokens fed on switches beyond the one a step feeds anyway.
    catch_up: usize,
}

pub struct AdaptiveDecoder {
    spec: AdaptiveSpec,
    generation: Generation,
    small: SharedPrompt,
    large: SharedPrompt,
    /// Each model's prompt sequence and row, once prefilled: [small, large].
    firsts: [Option<(SeqId, Vec<f32>)>; 2],
    /// C_S / C_L, by multiply-adds per token.
    cost_ratio: f64,
    branches: Vec<Branch>,
}

impl Branch {
    /// Take in a row of the active model: its entropy enters the window, whose mean decides
    /// which model writes the next token (true: a switch, and the other model must read the
    /// answer first).
    fn consider(&mut self, row: &[f32], spec: &AdaptiveSpec) -> bool {
        self.entropies.push_back(entropy_bits(row));
        while self.entropies.len() > spec.window {
            self.entropies.pop_front();
        }
        let mean = self.entropies.iter().sum::<f32>() / self.entropies.len() as f32;
        let wanted = if mean >= spec.entropy_threshold {
            Side::Large
        } else {
            Side::Small
        };
        if wanted == self.active || self.since_switch < spec.min_stay {
            return false;
        }
        self.active = wanted;
        self.since_switch = 0;
        self.switches += 1;
        true
    }

    /// The tokens the active model has not read.
    fn missed(&self) -> &[u32] {
        &self.choice.tokens[self.fed[self.active as usize]..]
    }
}

impl AdaptiveDecoder {
    /// Draw branch `b`'s next token from `row` (the active model's) and record it.
    fn draw(&mut self, cx: &mut Cx, b: usize, row: &[f32]) -> Result<()> {
        let g = &self.generation;
        let branch = &mut self.branches[b];
        let sampled = branch.choice.sampler.sample(row);
        branch.written[branch.active as usize] += 1;
        branch.since_switch += 1;
        branch.choice.accept(cx, g, sampled)?;
        // Either model's context may end the answer, as the base's alone would.
        let other = branch.seqs[branch.active.other() as usize];
        if !branch.choice.is_done() && cx.room(other) == 0 {
            branch.choice.finish(cx, FinishReason::Length)?;
        }
        if branch.choice.is_done() {
            // The choice frees the small model's sequence; the large one's goes here.
            cx.free(branch.seqs[Side::Large as usize]);
        }
        Ok(())
    }

    /// Once both prompts are in: a sequence per choice on each model, and the first tokens.
    fn branch_out(&mut self, cx: &mut Cx) -> Result<()> {
        let n = self.generation.n;
        let (small, small_row) = self.firsts[0].take().context("no small prompt")?;
        let (large, large_row) = self.firsts[1].take().context("no large prompt")?;
        let (smalls, larges) = (fork(cx, small, n)?, fork(cx, large, n)?);
        for (i, (s, l)) in smalls.into_iter().zip(larges).enumerate() {
            let mut branch = Branch {
                choice: Choice::new(i, s, &self.generation),
                seqs: [s, l],
                fed: [0, 0],
                active: Side::Small,
                entropies: VecDeque::with_capacity(self.spec.window + 1),
                since_switch: self.spec.min_stay,
                ticket: None,
                written: [0, 0],
                switches: 0,
                catch_up: 0,
            };
            // Both models have read the prompt, so which one writes the first token is a choice
            // that costs no forward, not a switch.
            let row = if branch.consider(&small_row, &self.spec) {
                branch.switches = 0;
                &large_row
            } else {
                &small_row
            };
            self.branches.push(branch);
            self.draw(cx, i, row)?;
        }
        Ok(())
    }

    fn report(&self) -> serde_json::Value {
        let sum = |f: &dyn Fn(&Branch) -> usize| self.branches.iter().map(f).sum::<usize>();
        let (small, large) = (sum(&|b| b.written[0]), sum(&|b| b.written[1]));
        let f_large = large as f64 / (small + large).max(1) as f64;
        json!({
            "entropy_threshold": self.spec.entropy_threshold,
            "window": self.spec.window,
            "min_stay": self.spec.min_stay,
            "tokens": {"small": small, "large": large},
            "switches": sum(&|b| b.switches),
            "catch_up_tokens": sum(&|b| b.catch_up),
            "large_share": f_large,
            "cost_ratio": self.cost_ratio,
            "relative_compute": f_large + (1.0 - f_large) * self.cost_ratio,
        })
    }
}

impl Decoder for AdaptiveDecoder {
    fn plan(&mut self, cx: &mut Cx) -> Result<()> {
        if self.branches.is_empty() {
            self.small.plan(cx)?;
            return self.large.plan(cx);
        }
        for branch in &mut self.branches {
            branch.ticket = None;
            if branch.choice.is_done() {
                continue;
            }
            let missed = branch.missed().to_vec();
            if missed.is_empty() {
                anyhow::bail!("the active model has nothing to read");
            }
            let m = branch.active as usize;
            branch.catch_up += missed.len().saturating_sub(1);
            branch.ticket = Some(cx.forward(branch.seqs[m], missed, Logits::Last)?);
            branch.fed[m] = branch.choice.tokens.len();
        }
        Ok(())
    }

    fn absorb(&mut self, cx: &mut Cx, out: &Outputs) -> Result<Flow> {
        if self.branches.is_empty() {
            for (i, prompt) in [&mut self.small, &mut self.large].into_iter().enumerate() {
                if let Some((seq, row)) = prompt.absorb(cx, out)? {
                    self.firsts[i] = Some((seq, row.to_vec()));
                }
            }
            if self.firsts.iter().any(Option::is_none) {
                return Ok(Flow::Continue);
            }
            self.branch_out(cx)?;
        } else {
            for b in 0..self.branches.len() {
                let Some(t) = self.branches[b].ticket.take() else {
                    continue;
                };
                let row = out.last(t)?;
                self.draw(cx, b, row)?;
                // The row's entropy decides who writes the next token: a switch costs no
                // forward of its own, the model switched to reads what it missed in one.
                let branch = &mut self.branches[b];
                if !branch.choice.is_done() {
                    branch.consider(row, &self.spec);
                }
            }
        }
        if !self.branches.iter().all(|b| b.choice.is_done()) {
            return Ok(Flow::Continue);
        }
        let completion_tokens = self.branches.iter().map(|b| b.choice.tokens.len()).sum();
        cx.emit(Event::Done {
            usage: Usage {
                prompt_tokens: self.generation.prompt.len(),
                completion_tokens,
            },
            report: Some(self.report()),
        });
        Ok(Flow::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::testing::{engine, generation, run, seeded};
    use crate::engine::fake::{self, id, FakeModel, WORDS};
    use crate::model::Role;
    use crate::sampling::SamplingParams;

    /// A small model that is unsure (nearly flat, leaning to `red`) and a large one that is
    /// sure (of `blue`), so greedy tokens show who wrote them.
    fn unsure(role: Role) -> FakeModel {
        FakeModel::new("small", role, |_| {
            (0..WORDS.len() as u32)
                .map(|v| if v == id("red") { 0.1 } else { 0.0 })
                .collect()
        })
    }

    fn sure(role: Role) -> FakeModel {
        FakeModel::new("large", role, |_| fake::favour(id("blue"), 12.0))
    }

    fn adaptive(threshold: f64, window: usize, min_stay: usize) -> serde_json::Value {
        json!({"entropy_threshold": threshold, "window": window, "min_stay": min_stay})
    }

    #[test]
    fn threshold_zero_is_large_only_and_a_huge_one_small_only() {
        // Both models sample here, from counting scripts with different preferences.
        let large = || FakeModel::counting();
        let small = |role| FakeModel::new("small", role, |h| fake::counting(&h[..h.len() - 1]));
        let e = engine(vec![large(), small(Role::Draft)]);
        let g = generation(&[id("the"), id("cat")], 10, seeded(7));
        let large_only = run(&engine(vec![large()]), "sample", json!({}), g.clone());
        let small_only = run(
            &engine(vec![small(Role::Base)]),
            "sample",
            json!({}),
            g.clone(),
        );
        assert_ne!(large_only.tokens, small_only.tokens);
        let zero = run(&e, "adaptive", adaptive(0.0, 5, 1), g.clone());
        assert_eq!(zero.tokens, large_only.tokens);
        assert_eq!(
            zero.report.unwrap()["tokens"],
            json!({"small": 0, "large": 10})
        );
        let huge = run(&e, "adaptive", adaptive(1e9, 5, 1), g);
        assert_eq!(huge.tokens, small_only.tokens);
        let report = huge.report.unwrap();
        assert_eq!(
            (
                report["tokens"]["large"].as_u64(),
                report["switches"].as_u64()
            ),
            (Some(0), Some(0))
        );
    }

    #[test]
    fn each_model_stays_min_stay_tokens_and_catches_up_in_one_forward() {
        let (small, large) = (unsure(Role::Draft), sure(Role::Base));
        let (small_batches, large_batches) = (small.batches.clone(), large.batches.clone());
        let e = engine(vec![large, small]);
        let prompt = [id("the"), id("cat"), id("sat")];
        let g = generation(&prompt, 12, SamplingParams::greedy());
        // Between the small model's ~4.4 bits and the large one's ~0.
        let out = run(&e, "adaptive", adaptive(2.0, 1, 3), g);
        let (b, r) = (id("blue"), id("red"));
        assert_eq!(out.tokens[0], [b, b, b, r, r, r, b, b, b, r, r, r]);
        let report = out.report.unwrap();
        assert_eq!(report["tokens"], json!({"small": 6, "large": 6}));
        assert_eq!(report["switches"], 3);
        // Each model read the prompt once (the first token is the large one's, from its prompt
        // row). On each switch the model switched to read every token it had not in one
        // forward: the other's three, and later also its own last token, drawn from the row
        // that decided the switch. No forward is spent on deciding.
        let fed = |b: &fake::Batches| b.get().into_iter().flatten().collect::<Vec<_>>();
        assert_eq!(fed(&small_batches), [3, 3, 1, 1, 4, 1, 1]);
        assert_eq!(fed(&large_batches), [3, 1, 1, 4, 1, 1]);
        assert_eq!(report["catch_up_tokens"], 2 + 3 + 3);
    }

    #[test]
    fn bad_parameters_name_themselves() {
        let e = engine(vec![sure(Role::Base), unsure(Role::Draft)]);
        let param = |v: serde_json::Value| {
            Adaptive
                .parse(v.as_object().cloned().unwrap(), e.rewards())
                .unwrap_err()
                .param
                .unwrap()
        };
        assert_eq!(param(json!({"entropy_threshold": -1})), "entropy_threshold");
        assert_eq!(param(json!({"window": 0})), "window");
        assert_eq!(param(json!({"min_stay": 0})), "min_stay");
        assert_eq!(param(json!({"draft": "nope"})), "draft");
        assert_eq!(param(json!({"guide": {"rewards": {}}})), "guide");
        let alone = engine(vec![sure(Role::Base)]);
        let e = Adaptive.parse(Params::new(), alone.rewards()).unwrap_err();
        assert!(e.message.contains("--draft-model"), "{e}");
    }
}
