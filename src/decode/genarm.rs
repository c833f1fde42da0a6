//! GenARM (Xu et al., ICLR 2025): steer the base with autoregressive reward models. Each step
//! samples from ℓ = log_softmax(base) + Σ_i (w_i/β)·log_softmax(ARM_i), computed in f32, through
//! the request's sampler (temperature 1 samples the tilted distribution itself; see
//! reference/algorithms.md §2.1 on why the official code's τ/(1+Σα) rescaling is not needed).
//!
//! Every model runs in lockstep: the base and each ARM prefill their own prompt (their own chat
//! template) on their own sequence, each is forked for the `n` choices, and each step feeds every
//! sequence of a choice the same token. All of a step's forwards are planned together, so the
//! engine runs one batched forward per model per step.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde_json::json;

use super::prompt::{fork, SharedPrompt};
use super::{Choice, Decoder, Flow, Generation};
use crate::engine::{Cx, Event, FinishReason, ModelId, Outputs, SeqId, Usage, BASE};
use crate::math::{self, log_sum_exp};
use crate::model::{for_each_mut, Logits};
use crate::sampling::Sampled;

/// One reward model and its weight in a request.
#[derive(Debug, Clone, PartialEq)]
pub struct ArmWeight {
    pub name: String,
    pub model: ModelId,
    pub weight: f32,
}

/// Checked `genarm` parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct GenArmSpec {
    pub rewards: Vec<ArmWeight>,
    /// Strength of the KL regulariser: each ARM's log-probs count w/β.
    pub beta: f32,
}

impl GenArmSpec {
    /// The ARMs that change the distribution; a weight of 0 costs nothing.
    pub fn active(&self) -> impl Iterator<Item = &ArmWeight> {
        self.rewards.iter().filter(|a| a.weight != 0.0)
    }
}

/// The tilted scores, reused every step.
#[derive(Default)]
pub struct Tilt {
    scores: Vec<f32>,
}

impl Tilt {
    /// The scores of the last `combine`.
    pub fn scores(&self) -> &[f32] {
        &self.scores
    }

    /// scores = log_softmax(base) + Σ c_i·log_softmax(arm_i) + K over the first `vocab` ids
    /// (models may pad their output rows past the shared tokenizer), for a constant K: sampling
    /// and log-probs normalise anyway, and the ARMs' own normalisers are constants, never
    /// computed. Returns KL(softmax(scores) ‖ base), the divergence of the tilted distribution
    /// from the base at temperature 1, which no constant changes.
    pub fn combine(&mut self, base: &[f32], arms: &[(f32, &[f32])], vocab: usize) -> f32 {
        let v = arms
            .iter()
            .map(|(_, row)| row.len())
            .fold(base.len().min(vocab), usize::min);
        let base = &base[..v];
        // The base's logits stand for its log-probs here: they differ by a constant.
        self.scores.clear();
        self.scores.extend_from_slice(base);
        for &(c, row) in arms {
            for (s, a) in self.scores.iter_mut().zip(&row[..v]) {
                *s += c * a;
            }
        }
        // With u = e^(s − m) and S = Σu: p = u/S, log p = s − m − log S, and the base's
        // log-prob is base − lse(base), so KL = Σ u·(s − base)/S − m − log S + lse(base).
        let m = math::max(&self.scores);
        if !m.is_finite() {
            return 0.0;
        }
        let (total, weighted) = math::tilt_sums(&self.scores, base, m);
        (weighted / total - m - total.ln() + log_sum_exp(base)).max(0.0)
    }
}

/// One model's part of the request: its prompt while prefilling, then one sequence per choice.
struct Lane {
    /// What this model's log-probs are multiplied by: w/β for an ARM (the base is lane 0).
    coef: f32,
    prompt: SharedPrompt,
    /// The prompt's sequence and next-token logits, kept until every lane has prefilled.
    first: Option<(SeqId, Vec<f32>)>,
}

/// A choice with its ARM sequences (`arms[i]` belongs to lane `i + 1`).
struct Branch {
    choice: Choice,
    arms: Vec<SeqId>,
    tilt: Tilt,
}

/// A sampled token and KL(tilted ‖ base) of the distribution it was drawn from.
type Drawn = (Sampled, f32);

impl Branch {
    /// The next token from the models' rows (lane order; `coefs` are the ARMs' lanes').
    fn draw(&mut self, coefs: &[f32], rows: &[&[f32]], vocab: usize) -> Drawn {
        if rows.len() == 1 {
            // No ARM: exactly plain decoding.
            return (self.choice.sampler.sample(rows[0]), 0.0);
        }
        let arms: Vec<(f32, &[f32])> = coefs
            .iter()
            .copied()
            .zip(rows[1..].iter().copied())
            .collect();
        let kl = self.tilt.combine(rows[0], &arms, vocab);
        (self.choice.sampler.sample(&self.tilt.scores), kl)
    }
}

/// What the sequences of a [`Guided`] are: the request's choices, streamed as they go, or
/// candidates that hold their events for a decoder that picks among them.
#[derive(Debug, Clone, Copy)]
pub enum Sequences {
    /// `n` choices, choice i drawing from RNG stream i.
    Choices(usize),
    /// `groups` groups of `per_group` candidates; group g answers choice g, and candidate j of it
    /// draws from RNG stream g·per_group + j.
    Candidates { groups: usize, per_group: usize },
}

impl Sequences {
    fn count(self) -> usize {
        match self {
            Self::Choices(n) => n,
            Self::Candidates { groups, per_group } => groups * per_group,
        }
    }

    fn choice(self, i: usize, seq: SeqId, generation: &Generation) -> Choice {
        match self {
            Self::Choices(_) => Choice::new(i, seq, generation),
            Self::Candidates { per_group, .. } => {
                Choice::candidate(i / per_group, i, seq, generation)
            }
        }
    }
}

/// Token-level guided sampling of several sequences in lockstep: the whole of `genarm`, and how
/// best-of-N draws its candidates. With no active ARM it is exactly plain sampling.
pub struct Guided {
    lanes: Vec<Lane>,
    sequences: Sequences,
    branches: Vec<Branch>,
    /// (branch, lane, ticket) planned this step; a branch's tickets are consecutive, lane order.
    tickets: Vec<(usize, usize, usize)>,
    kl_sum: f64,
    tokens: usize,
}

impl Guided {
    pub fn new(spec: &GenArmSpec, generation: &Generation, sequences: Sequences) -> Self {
        let lane = |model, coef| Lane {
            coef,
            prompt: SharedPrompt::new(model, generation.prompt_for(model).to_vec()),
            first: None,
        };
        let mut lanes = vec![lane(BASE, 1.0)];
        lanes.extend(spec.active().map(|a| lane(a.model, a.weight / spec.beta)));
        Self {
            lanes,
            sequences,
            branches: Vec::new(),
            tickets: Vec::new(),
            kl_sum: 0.0,
            tokens: 0,
        }
    }

    /// The sequences, in order, once the prompts are prefilled (empty before).
    pub fn choices(&self) -> impl Iterator<Item = &Choice> {
        self.branches.iter().map(|b| &b.choice)
    }

    pub fn choices_mut(&mut self) -> impl Iterator<Item = &mut Choice> {
        self.branches.iter_mut().map(|b| &mut b.choice)
    }

    /// Every sequence has finished.
    pub fn is_done(&self) -> bool {
        !self.branches.is_empty() && self.branches.iter().all(|b| b.choice.is_done())
    }

    /// Mean KL(tilted ‖ base) per sampled token (0 without an active ARM).
    pub fn kl_per_token(&self) -> f64 {
        self.kl_sum / self.tokens.max(1) as f64
    }

    /// Sample branch `b`'s next token from its models' rows (lane order) and record it.
    fn advance(&mut self, cx: &mut Cx, g: &Generation, b: usize, rows: &[&[f32]]) -> Result<()> {
        let vocab = cx.model(BASE).vocab.size();
        let coefs: Vec<f32> = self.lanes[1..].iter().map(|l| l.coef).collect();
        let drawn = self.branches[b].draw(&coefs, rows, vocab);
        self.record(cx, g, b, drawn)
    }

    /// Record branch `b`'s drawn token (and the KL of the distribution it came from).
    fn record(&mut self, cx: &mut Cx, g: &Generation, b: usize, drawn: Drawn) -> Result<()> {
        let branch = &mut self.branches[b];
        self.kl_sum += f64::from(drawn.1);
        self.tokens += 1;
        branch.choice.accept(cx, g, drawn.0)?;
        // An ARM with a shorter context ends the choice as the base's would.
        if !branch.choice.is_done() && branch.arms.iter().any(|&s| cx.room(s) == 0) {
            branch.choice.finish(cx, FinishReason::Length)?;
        }
        if branch.choice.is_done() {
            for &s in &branch.arms {
                cx.free(s);
            }
        }
        Ok(())
    }

    /// Once every lane has its prompt's logits: fork each lane for the sequences and sample
    /// their first tokens.
    fn branch_out(&mut self, cx: &mut Cx, g: &Generation) -> Result<()> {
        let count = self.sequences.count();
        let mut seqs = Vec::with_capacity(self.lanes.len());
        let mut firsts = Vec::with_capacity(self.lanes.len());
        for lane in &mut self.lanes {
            let (seq, logits) = lane.first.take().context("a lane without its prompt")?;
            seqs.push(fork(cx, seq, count)?);
            firsts.push(logits);
        }
        let rows: Vec<&[f32]> = firsts.iter().map(Vec::as_slice).collect();
        for i in 0..count {
            self.branches.push(Branch {
                choice: self.sequences.choice(i, seqs[0][i], g),
                arms: seqs[1..].iter().map(|s| s[i]).collect(),
                tilt: Tilt::default(),
            });
            self.advance(cx, g, i, &rows)?;
        }
        Ok(())
    }

    pub fn plan(&mut self, cx: &mut Cx) -> Result<()> {
        self.tickets.clear();
        if self.branches.is_empty() {
            for lane in &mut self.lanes {
                lane.prompt.plan(cx)?;
            }
            return Ok(());
        }
        for (b, branch) in self.branches.iter().enumerate() {
            let (false, Some(tok)) = (branch.choice.is_done(), branch.choice.last()) else {
                continue;
            };
            let seqs = std::iter::once(branch.choice.seq).chain(branch.arms.iter().copied());
            for (l, seq) in seqs.enumerate() {
                let t = cx.forward(seq, vec![tok], Logits::Last)?;
                self.tickets.push((b, l, t));
            }
        }
        Ok(())
    }

    /// Read this step's logits and advance every sequence planned; true once all are done.
    pub fn absorb(&mut self, cx: &mut Cx, out: &Outputs, g: &Generation) -> Result<bool> {
        let tickets = std::mem::take(&mut self.tickets);
        if self.branches.is_empty() {
            for lane in &mut self.lanes {
                if let Some((seq, logits)) = lane.prompt.absorb(out)? {
                    lane.first = Some((seq, logits.to_vec()));
                }
            }
            if self.lanes.iter().all(|l| l.first.is_some()) {
                self.branch_out(cx, g)?;
            }
        } else {
            // Draw every branch's token on the pool's threads, then record them in order.
            let vocab = cx.model(BASE).vocab.size();
            let coefs: Vec<f32> = self.lanes[1..].iter().map(|l| l.coef).collect();
            let mut draws = Vec::new();
            let mut branches = self.branches.iter_mut().enumerate();
            for step in tickets.chunks(self.lanes.len()) {
                let b = step[0].0;
                let (_, branch) = branches
                    .find(|(i, _)| *i == b)
                    .context("a ticket out of order")?;
                let rows = step
                    .iter()
                    .map(|&(_, _, t)| out.last(t))
                    .collect::<Result<Vec<_>>>()?;
                draws.push((b, branch, rows, None));
            }
            for_each_mut(&mut draws, |(_, branch, rows, drawn)| {
                *drawn = Some(branch.draw(&coefs, rows, vocab))
            });
            let drawn = draws
                .into_iter()
                .map(|(b, _, _, d)| Ok((b, d.context("a branch left undrawn")?)))
                .collect::<Result<Vec<(usize, Drawn)>>>()?;
            for (b, d) in drawn {
                self.record(cx, g, b, d)?;
            }
        }
        self.tickets = tickets;
        Ok(self.is_done())
    }
}

pub struct GenArm {
    spec: GenArmSpec,
    generation: Generation,
    guided: Guided,
}

impl GenArm {
    pub fn new(spec: GenArmSpec, generation: Generation) -> Self {
        let guided = Guided::new(&spec, &generation, Sequences::Choices(generation.n));
        Self {
            spec,
            generation,
            guided,
        }
    }
}

impl GenArmSpec {
    /// Reward name → weight, for reports.
    pub fn weights(&self) -> BTreeMap<&str, f32> {
        self.rewards
            .iter()
            .map(|a| (a.name.as_str(), a.weight))
            .collect()
    }
}

impl Decoder for GenArm {
    fn plan(&mut self, cx: &mut Cx) -> Result<()> {
        self.guided.plan(cx)
    }

    fn absorb(&mut self, cx: &mut Cx, out: &Outputs) -> Result<Flow> {
        if !self.guided.absorb(cx, out, &self.generation)? {
            return Ok(Flow::Continue);
        }
        let completion_tokens = self.guided.choices().map(|c| c.tokens.len()).sum();
        cx.emit(Event::Done {
            usage: Usage {
                prompt_tokens: self.generation.prompt.len(),
                completion_tokens,
            },
            report: Some(json!({
                "weights": self.spec.weights(),
                "beta": self.spec.beta,
                "kl_per_token": self.guided.kl_per_token(),
            })),
        });
        Ok(Flow::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_arm_weight_leaves_the_base_distribution() {
        let base = [1.0, 2.0, 0.5];
        let arm = [5.0, -3.0, 0.0];
        let mut t = Tilt::default();
        let kl = t.combine(&base, &[(0.0, &arm)], 3);
        // The very row plain decoding samples from.
        assert_eq!(t.scores, base);
        assert!(kl.abs() < 1e-6, "{kl}");
        // Excluded tokens (−∞ from the tilt) carry no weight in the KL.
        let kl = t.combine(&base, &[(1.0, &[0.0, f32::NEG_INFINITY, 0.0])], 3);
        let kept = [1.0f32.exp(), 0.5f32.exp()];
        let z_base: f32 = base.iter().map(|b| b.exp()).sum();
        let expected: f32 = kept
            .iter()
            .map(|&k| k / kept.iter().sum::<f32>())
            .zip(&kept)
            .map(|(p, &k)| p * (p / (k / z_base)).ln())
            .sum();
        assert!((kl - expected).abs() < 1e-6, "{kl} vs {expected}");
    }

    #[test]
    fn tilts_by_the_weighted_arm_and_measures_the_kl() {
        // Base uniform over two tokens; the ARM says 0.8 / 0.2: π_base·π_arm ∝ (0.4, 0.1).
        let base = [0.0, 0.0];
        let arm = [0.8f32.ln(), 0.2f32.ln()];
        let mut t = Tilt::default();
        let kl = t.combine(&base, &[(1.0, &arm)], 2);
        let z = log_sum_exp(&t.scores);
        let p: Vec<f32> = t.scores.iter().map(|s| (s - z).exp()).collect();
        assert!(
            (p[0] - 0.8).abs() < 1e-6 && (p[1] - 0.2).abs() < 1e-6,
            "{p:?}"
        );
        let expected = 0.8 * (0.8f32 / 0.5).ln() + 0.2 * (0.2f32 / 0.5).ln();
        assert!((kl - expected).abs() < 1e-6, "{kl} vs {expected}");
        // A negative weight steers the other way: ∝ 0.5·(0.8, 0.2)^-1 → (0.2, 0.8).
        t.combine(&base, &[(-1.0, &arm)], 2);
        let z = log_sum_exp(&t.scores);
        assert!(((t.scores[1] - z).exp() - 0.8).abs() < 1e-6);
    }

    #[test]
    fn only_the_shared_vocabulary_counts() {
        // The ARM pads its rows past the tokenizer; the padding is ignored.
        let base = [0.0, 0.0];
        let arm = [0.0, 0.0, 50.0];
        let mut t = Tilt::default();
        t.combine(&base, &[(2.0, &arm)], 2);
        assert_eq!(t.scores.len(), 2);
        assert!((t.scores[0] - t.scores[1]).abs() < 1e-6);
    }
}
