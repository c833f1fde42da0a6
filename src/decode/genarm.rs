//! GenARM (Xu et al., ICLR 2025): steer the base with autoregressive reward models. Each step
//! samples from ℓ = log_softmax(base) + Σ_i (w_i/β)·log_softmax(ARM_i), computed in f32, through
//! the request's sampler (temperature 1 samples the tilted distribution itself; see
//! reference/algorithms.md §2.1 on why the official code's τ/(1+Σα) rescaling is not needed).
//!
//! With `constraints.keywords`, each step adds `constraints.keyword_boost` to the tokens that
//! start or continue a missing keyword and takes it off ending the answer per missing keyword
//! (`lexical`), after the tilt: candidates can then contain words the base would not say.
//!
//! Every model runs in lockstep: the base and each ARM prefill their own prompt (their own chat
//! template) on their own sequence, each is forked for the `n` choices, and each step feeds every
//! sequence of a choice the same token. All of a step's forwards are planned together, so the
//! engine runs one batched forward per model per step.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use anyhow::{Context, Result};
use serde_json::json;

use super::lexical::Lexicon;
use super::objectives::{Constraints, KeywordSpec};
use super::prompt::{fork, SharedPrompt};
use super::track::{Rows, TrackId, Tracker};
use super::{typed, Choice, Generation, Method, ParamError, Params};
use crate::engine::{Cx, Decoder, Event, FinishReason, Flow, Outputs, SeqId, Usage};
use crate::math::{self, log_sum_exp};
use crate::model::{for_each_mut, Logits, ModelId, ModelInfo, Vocab, BASE};
use crate::reward::Registry;
use crate::sampling::Sampled;

/// `genarm`: steer the base token by token with reward models.
#[derive(Debug, Clone, Copy)]
pub struct GenArm;

/// `genarm`'s parameters: reward name → weight, and the KL strength β (each ARM's log-probs
/// count w/β). Also best-of-N's `guide`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenArmParams {
    #[serde(default)]
    rewards: BTreeMap<String, f64>,
    beta: Option<f64>,
    /// The most KL(tilted ‖ base) a step may take, in nats; each step scales the weights down
    /// to fit.
    max_kl_per_token: Option<f64>,
    /// Keywords to pull toward (`keywords`, `keyword_boost`).
    #[serde(default)]
    constraints: Constraints,
}

impl Method for GenArm {
    type Spec = GenArmSpec;

    fn name(&self) -> &'static str {
        "genarm"
    }

    fn parse(&self, params: Params, rewards: &Registry) -> Result<GenArmSpec, ParamError> {
        GenArmSpec::parse("", typed(params)?, rewards)
    }

    fn models(&self, spec: &GenArmSpec) -> Vec<ModelId> {
        spec.active().map(|a| a.model).collect()
    }

    fn build(
        &self,
        spec: &GenArmSpec,
        generation: Generation,
        models: &[ModelInfo],
    ) -> Result<Box<dyn Decoder>, ParamError> {
        Ok(Box::new(GenArmDecoder::new(
            spec.clone(),
            generation,
            &models[BASE].vocab,
        )))
    }
}

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
    /// Each step's KL budget, in nats (none: the weights apply as given).
    pub max_kl: Option<f32>,
    /// Keywords the sampled tokens are pulled toward.
    pub keywords: Option<KeywordSpec>,
}

impl GenArmSpec {
    /// No guidance: plain sampling.
    pub fn none() -> Self {
        Self {
            rewards: Vec::new(),
            beta: 1.0,
            max_kl: None,
            keywords: None,
        }
    }

    /// `params` checked against `registry`; errors name parameters under `prefix` (e.g.
    /// `guide.` inside best_of_n).
    pub fn parse(
        prefix: &str,
        params: GenArmParams,
        registry: &Registry,
    ) -> Result<Self, ParamError> {
        let invalid =
            |param: &str, message: String| ParamError::new(format!("{prefix}{param}"), message);
        // Checked in f32, the precision the decoder computes in: 1e39 is finite only as an f64.
        let beta = params.beta.unwrap_or(1.0) as f32;
        if !(beta.is_finite() && beta > 0.0) {
            return Err(invalid(
                "beta",
                format!(
                    "`beta` must be a finite number above 0, got {}",
                    params.beta.unwrap_or(1.0)
                ),
            ));
        }
        let max_kl = match params.max_kl_per_token {
            None => None,
            Some(b) if b.is_finite() && b >= 0.0 => Some(b as f32),
            Some(b) => {
                return Err(invalid(
                    "max_kl_per_token",
                    format!(
                        "`max_kl_per_token` must be a finite number of nats, at least 0, got {b}"
                    ),
                ))
            }
        };
        let mut rewards = Vec::with_capacity(params.rewards.len());
        for (name, w) in params.rewards {
            let Some(model) = registry.arm(&name) else {
                let loaded = registry.arm_names();
                let loaded = if loaded.is_empty() {
                    "none are loaded (start the server with `--reward NAME=PATH`)".to_string()
                } else {
                    format!("loaded: {}", loaded.join(", "))
                };
                let what = if registry.scorer(&name).is_some() {
                    "is a programmatic (sequence-level) reward"
                } else {
                    "is not a loaded reward model"
                };
                return Err(invalid(
                    "rewards",
                    format!("`{name}` {what}; genarm steers with reward models, {loaded}"),
                ));
            };
            let weight = w as f32;
            if !(weight.is_finite() && (weight / beta).is_finite()) {
                return Err(invalid(
                    &format!("rewards.{name}"),
                    format!("the weight of `{name}` must be a finite number (also once divided by `beta`), got {w}"),
                ));
            }
            rewards.push(ArmWeight {
                name,
                model,
                weight,
            });
        }
        let keywords = params
            .constraints
            .keywords_only("genarm")
            .map_err(|e| ParamError {
                param: e.param.map(|p| format!("{prefix}{p}")),
                ..e
            })?;
        Ok(Self {
            rewards,
            beta,
            max_kl,
            keywords,
        })
    }

    /// The ARMs that change the distribution; a weight of 0 costs nothing.
    pub fn active(&self) -> impl Iterator<Item = &ArmWeight> {
        self.rewards.iter().filter(|a| a.weight != 0.0)
    }
}

/// The tilted scores, reused every step.
#[derive(Default)]
pub struct Tilt {
    scores: Vec<f32>,
    /// Σ c_i·log_softmax(arm_i) (up to a constant), kept while a KL budget is searched.
    pull: Vec<f32>,
}

/// How close below the budget the scale search stops, in nats: a step's KL ends in
/// [budget − KL_TOLERANCE, budget] unless the scale reaches 1 or a bracket of SCALE_TOLERANCE.
const KL_TOLERANCE: f32 = 1e-4;
const SCALE_TOLERANCE: f32 = 1e-5;

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
        let base = self.tilt(base, arms, vocab);
        Self::divergence(&self.scores, base, log_sum_exp(base), 1.0).0
    }

    /// Fill `scores` as `combine` does; returns `base` cut to the shared vocabulary.
    fn tilt<'b>(&mut self, base: &'b [f32], arms: &[(f32, &[f32])], vocab: usize) -> &'b [f32] {
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
        base
    }

    /// `combine` with the ARMs' pull scaled by the largest s ∈ [0, 1] whose KL(tilted ‖ base)
    /// stays within `budget`: (KL, s). KL grows with s (its slope is s·Var(pull) under the
    /// tilted distribution), so Newton's steps toward the budget, kept inside a bracket that
    /// bisects when a step would leave it, find s in about four passes over the row.
    pub fn combine_within(
        &mut self,
        base: &[f32],
        arms: &[(f32, &[f32])],
        vocab: usize,
        budget: f32,
    ) -> (f32, f32) {
        let base = self.tilt(base, arms, vocab);
        // The base's normaliser, once: every scale's KL needs it.
        let base_lse = log_sum_exp(base);
        let at = Self::divergence(&self.scores, base, base_lse, 1.0);
        if at.0 <= budget {
            return (at.0, 1.0);
        }
        if budget <= 0.0 {
            // Exactly the base: a search would stop at a scale whose KL rounds to 0 in f32.
            self.scores.copy_from_slice(base);
            return (0.0, 0.0);
        }
        self.pull.clear();
        self.pull
            .extend(self.scores.iter().zip(base).map(|(s, b)| s - b));
        let (mut lo, mut lo_kl, mut hi) = (0.0f32, 0.0f32, 1.0f32);
        // Aim a little under the budget so that Newton's steps, which come down from above on
        // a convex KL, land inside it.
        let target = budget - KL_TOLERANCE / 2.0;
        let (mut s, mut at) = (1.0f32, at);
        let mut scored = 1.0f32;
        for _ in 0..40 {
            let (kl, slope) = at;
            if kl <= budget {
                (lo, lo_kl) = (s, kl);
                if budget - kl <= KL_TOLERANCE {
                    break;
                }
            } else {
                hi = s;
            }
            if hi - lo <= SCALE_TOLERANCE {
                break;
            }
            // Newton on log KL against log s: KL grows as s² near 0 and flattens where the
            // tilt saturates, both nearly straight lines in those axes. Where it has flattened
            // the step down is long: it stops 1/16 of the way from `lo`.
            let newton = s * ((target.ln() - kl.ln()) * kl / (s * slope)).exp();
            s = if slope > 0.0 && kl > 0.0 && newton < hi {
                newton.max(lo + (s - lo) / 16.0)
            } else {
                (lo + hi) / 2.0
            };
            self.scale(base, s);
            scored = s;
            at = Self::divergence(&self.scores, base, base_lse, s);
        }
        if scored != lo {
            self.scale(base, lo);
        }
        (lo_kl, lo)
    }

    /// scores = base + s·pull.
    fn scale(&mut self, base: &[f32], s: f32) {
        if s == 0.0 {
            // Not 0·pull: a token an ARM excludes has a pull of −∞.
            self.scores.copy_from_slice(base);
            return;
        }
        for ((t, b), p) in self.scores.iter_mut().zip(base).zip(&self.pull) {
            *t = b + s * p;
        }
    }

    /// KL(softmax(scores) ‖ softmax(base)) and its slope in the pull's scale `s` (> 0), where
    /// scores = base + s·pull: d KL/ds = s·Var(pull) = Var(scores − base)/s under softmax(scores).
    /// `base_lse` is log Σ e^base.
    fn divergence(scores: &[f32], base: &[f32], base_lse: f32, s: f32) -> (f32, f32) {
        // With u = e^(t − m), S = Σu and x = t − base: p = u/S, log p = t − m − log S, and the
        // base's log-prob is base − lse(base), so KL = E[x] − m − log S + lse(base).
        let m = math::max(scores);
        if !m.is_finite() {
            return (0.0, 0.0);
        }
        let (total, first, second) = math::tilt_moments(scores, base, m);
        let mean = first / total;
        let kl = (mean - m - total.ln() + base_lse).max(0.0);
        let var = (second / total - mean * mean).max(0.0);
        (kl, var / s)
    }
}

/// A choice with its ARMs' sequences.
struct Branch {
    choice: Choice,
    arms: TrackId,
    tilt: Tilt,
}

/// A sampled token, KL(tilted ‖ base) of the distribution it was drawn from and the scale the
/// ARMs' weights took in it (1 without a KL budget).
type Drawn = (Sampled, f32, f32);

/// The keywords a [`Guided`] pulls toward, with what it needs to see where each answer stands.
struct Pull {
    lexicon: Lexicon,
    vocab: Arc<Vocab>,
    /// The tokens that end an answer (none with `ignore_eos`).
    ending: HashSet<u32>,
}

impl Branch {
    /// The next token from the models' rows (the base's, then each ARM's, weighted by `coefs`
    /// and scaled to fit `max_kl`), nudged toward the keywords.
    fn draw(&mut self, guide: &Guide, rows: &[&[f32]], vocab: usize) -> Drawn {
        if rows.len() == 1 {
            let Some(pull) = &guide.pull else {
                // No ARM: exactly plain decoding.
                return (self.choice.sampler.sample(rows[0]), 0.0, 1.0);
            };
            let mut scores = rows[0].to_vec();
            pull.nudge(&self.choice.tokens, &mut scores);
            return (self.choice.sampler.sample(&scores), 0.0, 1.0);
        }
        let mut arms: Vec<(f32, &[f32])> = (guide.coefs.iter().copied())
            .zip(rows[1..].iter().copied())
            .collect();
        // A relative ARM pulls by log π_r − log π_base.
        if guide.base_coef != 0.0 {
            arms.push((guide.base_coef, rows[0]));
        }
        let (kl, scale) = match guide.max_kl {
            Some(budget) => self.tilt.combine_within(rows[0], &arms, vocab, budget),
            None => (self.tilt.combine(rows[0], &arms, vocab), 1.0),
        };
        if let Some(pull) = &guide.pull {
            pull.nudge(&self.choice.tokens, &mut self.tilt.scores);
        }
        (self.choice.sampler.sample(&self.tilt.scores), kl, scale)
    }
}

impl Pull {
    /// `scores` shaped toward the keywords the answer `tokens` lacks.
    fn nudge(&self, tokens: &[u32], scores: &mut [f32]) {
        let state = (self.lexicon).state(&self.vocab, tokens, &self.vocab.decode(tokens));
        self.lexicon.nudge(&state, scores, &self.ending);
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
    prompt: SharedPrompt,
    /// The base prompt's sequence and next-token logits, kept until every ARM has prefilled.
    first: Option<(SeqId, Vec<f32>)>,
    /// The active ARMs, reading every branch's tokens.
    arms: Tracker,
    guide: Guide,
    sequences: Sequences,
    branches: Vec<Branch>,
    /// (branch, base ticket) planned this step.
    tickets: Vec<(usize, usize)>,
    kl_sum: f64,
    /// The sum and least of the scales the KL budget gave the weights.
    scale_sum: f64,
    scale_min: f32,
    tokens: usize,
}

/// How every branch of a [`Guided`] turns the models' rows into scores.
struct Guide {
    /// What each ARM's log-probs are multiplied by: w/β.
    coefs: Vec<f32>,
    /// Each ARM's model.
    models: Vec<ModelId>,
    /// What the base's log-probs are multiplied by besides their own 1: minus the coefficients
    /// of the ARMs read relative to the base (`ModelInfo::relative`), known at the first plan.
    base_coef: f32,
    max_kl: Option<f32>,
    /// The keywords, when the request has them and a nonzero boost.
    pull: Option<Pull>,
}

impl Guided {
    pub fn new(
        spec: &GenArmSpec,
        generation: &Generation,
        sequences: Sequences,
        vocab: &Arc<Vocab>,
    ) -> Self {
        let pull = (spec.keywords.as_ref())
            .and_then(|k| k.pull(vocab))
            .map(|lexicon| Pull {
                lexicon,
                vocab: vocab.clone(),
                ending: match generation.ignore_eos {
                    true => HashSet::new(),
                    false => vocab.end_of_generation.clone(),
                },
            });
        let arms = spec
            .active()
            .map(|a| (a.model, generation.prompt_for(a.model).to_vec()));
        Self {
            prompt: SharedPrompt::base(generation),
            first: None,
            arms: Tracker::new(arms, Rows::Raw),
            guide: Guide {
                coefs: spec.active().map(|a| a.weight / spec.beta).collect(),
                models: spec.active().map(|a| a.model).collect(),
                base_coef: 0.0,
                max_kl: spec.max_kl,
                pull,
            },
            sequences,
            branches: Vec::new(),
            tickets: Vec::new(),
            kl_sum: 0.0,
            scale_sum: 0.0,
            scale_min: 1.0,
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

    /// Stop sequence `i` where it stands (a candidate rejected early): it costs no more forwards.
    pub fn stop(&mut self, cx: &mut Cx, i: usize) -> Result<()> {
        let branch = self.branches.get_mut(i).context("no such sequence")?;
        if !branch.choice.is_done() {
            branch.choice.finish(cx, FinishReason::Length)?;
            self.arms.free(cx, branch.arms);
        }
        Ok(())
    }

    /// Mean KL(tilted ‖ base) per sampled token (0 without an active ARM).
    pub fn kl_per_token(&self) -> f64 {
        self.kl_sum / self.tokens.max(1) as f64
    }

    /// The guidance's part of a report: `spec`'s weights, β, the mean KL per token and, under a
    /// KL budget, the mean and least scale it gave the weights.
    pub fn report(&self, spec: &GenArmSpec) -> serde_json::Value {
        let mut report = json!({
            "weights": spec.weights(),
            "beta": spec.beta,
            "kl_per_token": self.kl_per_token(),
        });
        if let Some(budget) = spec.max_kl {
            report["max_kl_per_token"] = budget.into();
            report["kl_scale"] = json!({
                "mean": if self.tokens == 0 { 1.0 } else { self.scale_sum / self.tokens as f64 },
                "min": self.scale_min,
            });
        }
        report
    }

    /// Record branch `b`'s drawn token (and the KL of the distribution it came from).
    fn record(&mut self, cx: &mut Cx, g: &Generation, b: usize, drawn: Drawn) -> Result<()> {
        let branch = &mut self.branches[b];
        self.kl_sum += f64::from(drawn.1);
        self.scale_sum += f64::from(drawn.2);
        self.scale_min = self.scale_min.min(drawn.2);
        self.tokens += 1;
        branch.choice.accept(cx, g, drawn.0)?;
        // An ARM with a shorter context ends the choice as the base's would.
        if !branch.choice.is_done() && self.arms.room(cx, branch.arms) == 0 {
            branch.choice.finish(cx, FinishReason::Length)?;
        }
        if branch.choice.is_done() {
            self.arms.free(cx, branch.arms);
        }
        Ok(())
    }

    /// Once every model has its prompt's logits: fork each for the sequences and sample their
    /// first tokens.
    fn branch_out(&mut self, cx: &mut Cx, g: &Generation) -> Result<()> {
        let count = self.sequences.count();
        let (seq, logits) = self.first.take().context("no base prompt")?;
        let seqs = fork(cx, seq, count)?;
        let tracks = self.arms.branch(cx, count)?;
        let firsts = self.arms.first_rows()?;
        let rows: Vec<&[f32]> = std::iter::once(logits.as_slice())
            .chain(firsts.iter().map(|r| &r[..]))
            .collect();
        let vocab = cx.model(BASE).vocab.size();
        for (i, (seq, arms)) in seqs.into_iter().zip(tracks).enumerate() {
            let mut branch = Branch {
                choice: self.sequences.choice(i, seq, g),
                arms,
                tilt: Tilt::default(),
            };
            let drawn = branch.draw(&self.guide, &rows, vocab);
            self.branches.push(branch);
            self.record(cx, g, i, drawn)?;
        }
        Ok(())
    }

    pub fn plan(&mut self, cx: &mut Cx) -> Result<()> {
        self.tickets.clear();
        if self.branches.is_empty() {
            let g = &mut self.guide;
            g.base_coef = -(g.coefs.iter().zip(&g.models))
                .filter(|&(_, &m)| cx.model(m).relative)
                .map(|(c, _)| c)
                .sum::<f32>();
            self.prompt.plan(cx)?;
            return self.arms.plan_prompts(cx);
        }
        for (b, branch) in self.branches.iter().enumerate() {
            let (false, Some(tok)) = (branch.choice.is_done(), branch.choice.last()) else {
                continue;
            };
            let t = cx.forward(branch.choice.seq, vec![tok], Logits::Last)?;
            self.arms.feed(cx, branch.arms, &[tok])?;
            self.tickets.push((b, t));
        }
        Ok(())
    }

    /// Read this step's logits and advance every sequence planned; true once all are done.
    pub fn absorb(&mut self, cx: &mut Cx, out: &Outputs, g: &Generation) -> Result<bool> {
        if self.branches.is_empty() {
            if let Some((seq, logits)) = self.prompt.absorb(cx, out)? {
                self.first = Some((seq, logits.to_vec()));
            }
            if self.arms.absorb_prompts(cx, out)? && self.first.is_some() {
                self.branch_out(cx, g)?;
            }
            return Ok(self.is_done());
        }
        self.arms.absorb(cx, out)?;
        let vocab = cx.model(BASE).vocab.size();
        let mut rows = Vec::with_capacity(self.tickets.len());
        for &(b, t) in &self.tickets {
            let mut r = vec![out.last(t)?];
            r.extend(self.arms.rows(out, self.branches[b].arms)?);
            rows.push(r);
        }
        // Draw every branch's token on the pool's threads, then record them in order.
        let mut draws = Vec::with_capacity(rows.len());
        let mut branches = self.branches.iter_mut().enumerate();
        for (&(b, _), rows) in self.tickets.iter().zip(&rows) {
            let (_, branch) = branches
                .find(|(i, _)| *i == b)
                .context("a ticket out of order")?;
            draws.push((b, branch, rows, None));
        }
        let guide = &self.guide;
        for_each_mut(&mut draws, |(_, branch, rows, drawn)| {
            *drawn = Some(branch.draw(guide, rows, vocab))
        });
        let drawn = draws
            .into_iter()
            .map(|(b, _, _, d)| Ok((b, d.context("a branch left undrawn")?)))
            .collect::<Result<Vec<(usize, Drawn)>>>()?;
        for (b, d) in drawn {
            self.record(cx, g, b, d)?;
        }
        Ok(self.is_done())
    }
}

pub struct GenArmDecoder {
    spec: GenArmSpec,
    generation: Generation,
    guided: Guided,
}

impl GenArmDecoder {
    pub fn new(spec: GenArmSpec, generation: Generation, vocab: &Arc<Vocab>) -> Self {
        let guided = Guided::new(&spec, &generation, Sequences::Choices(generation.n), vocab);
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

impl Decoder for GenArmDecoder {
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
            report: Some({
                let mut report = self.guided.report(&self.spec);
                if let Some(k) = &self.spec.keywords {
                    report["keywords"] = k.keywords.clone().into();
                    report["keyword_boost"] = k.boost.into();
                }
                report
            }),
        });
        Ok(Flow::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::testing::{engine, generation, run};
    use crate::engine::fake::{self, id, FakeModel};
    use crate::model::Role;
    use crate::sampling::SamplingParams;

    /// The counting base and an ARM `sea` that favours `sea` by 10 nats, whatever came before.
    fn base_and_sea() -> Vec<FakeModel> {
        let sea = FakeModel::new("sea", Role::Reward, |_| fake::favour(id("sea"), 10.0));
        vec![FakeModel::counting(), sea]
    }

    #[test]
    fn keywords_pull_sampling_toward_words_the_base_would_not_say() {
        let e = engine(base_and_sea());
        let g = generation(&[id("the")], 4, SamplingParams::greedy());
        let plain = run(&e, "sample", json!({}), g.clone());
        assert!(!plain.tokens[0].contains(&id("blue")));
        let kw = json!({"constraints": {"keywords": ["blue"]}});
        let out = run(&e, "genarm", kw, g.clone());
        assert!(out.tokens[0].contains(&id("blue")), "{:?}", out.text);
        assert_eq!(
            out.report.unwrap()["keyword_boost"],
            json!(crate::decode::lexical::DEFAULT_BOOST)
        );
        // best-of-N's candidates are pulled toward the keywords they are selected by.
        let bon = json!({"n": 2, "constraints": {"keywords": ["blue"]}});
        let out = run(&e, "best_of_n", bon, g.clone());
        assert!(out.tokens[0].contains(&id("blue")), "{:?}", out.text);
        let bad = json!({"constraints": {"max_words": 3}});
        let err = GenArm
            .parse(bad.as_object().cloned().unwrap(), &Registry::new(&[]))
            .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("constraints.max_words"));
    }

    #[test]
    fn an_arm_pulls_the_base_toward_its_tokens_or_away_from_them() {
        let e = engine(base_and_sea());
        let g = generation(&[id("sun")], 3, SamplingParams::greedy());
        let steer = |w: f64| run(&e, "genarm", json!({"rewards": {"sea": w}}), g.clone());
        // After `sun` the base says `sea`, then counts on.
        let plain = run(&e, "sample", json!({}), g.clone());
        assert_eq!(plain.text, [" sea happy sad"]);
        assert_eq!(steer(0.0).tokens, plain.tokens);
        assert_eq!(steer(0.0).report.unwrap()["kl_per_token"], 0.0);
        let toward = steer(1.0);
        assert_eq!(toward.text, [" sea sea sea"]);
        assert!(toward.report.unwrap()["kl_per_token"].as_f64().unwrap() > 1.0);
        assert!(!steer(-1.0).tokens[0].contains(&id("sea")));
    }

    /// A reward model read relative to the base (an adapter) rewards what it adds to the base:
    /// one that predicts exactly as the base does pulls nothing at any weight, token by token or
    /// as a whole answer, where the same model read on its own sharpens the base.
    #[test]
    fn a_relative_arm_rewards_only_what_it_adds_to_the_base() {
        let copy = |relative: bool| {
            let arm = FakeModel::new("copy", Role::Reward, fake::counting);
            if relative {
                arm.relative()
            } else {
                arm
            }
        };
        let g = generation(&[id("the")], 8, crate::decode::testing::seeded(7));
        let e = engine(vec![FakeModel::counting(), copy(true)]);
        let plain = run(&e, "sample", json!({}), g.clone());
        for w in [1.0, 4.0, -2.0] {
            let out = run(&e, "genarm", json!({"rewards": {"copy": w}}), g.clone());
            assert_eq!(out.tokens, plain.tokens, "weight {w}");
            let kl = out.report.unwrap()["kl_per_token"].as_f64().unwrap();
            assert!(kl < 1e-6, "weight {w}: KL {kl}");
        }
        let bon = json!({"n": 4, "rewards": {"copy": 1.0}, "return_candidates": true});
        let report = run(&e, "best_of_n", bon.clone(), g.clone()).report.unwrap();
        for c in report["candidates"].as_array().unwrap() {
            assert_eq!(c["reward"], 0.0, "{c}");
        }
        // Read on its own, the copy's log-probs double the base's: sharper, other samples.
        let e = engine(vec![FakeModel::counting(), copy(false)]);
        let out = run(&e, "genarm", json!({"rewards": {"copy": 4.0}}), g.clone());
        assert!(out.report.unwrap()["kl_per_token"].as_f64().unwrap() > 0.01);
        let report = run(&e, "best_of_n", bon, g).report.unwrap();
        assert!(report["candidates"][0]["reward"].as_f64().unwrap() < -0.5);
        // A relative ARM that favours `sea` still pulls toward it.
        let sea = FakeModel::new("sea", Role::Reward, |_| fake::favour(id("sea"), 10.0));
        let e = engine(vec![FakeModel::counting(), sea.relative()]);
        let g = generation(&[id("sun")], 3, SamplingParams::greedy());
        let out = run(&e, "genarm", json!({"rewards": {"sea": 1.0}}), g);
        assert_eq!(out.text, [" sea sea sea"]);
    }

    #[test]
    fn each_arm_reads_the_prompt_in_its_own_tokens() {
        // This ARM favours `red` when its prompt began with `blue`, else `sea`.
        let arm = FakeModel::new("colour", Role::Reward, |h| match h.first() {
            Some(&t) if t == id("blue") => fake::favour(id("red"), 10.0),
            _ => fake::favour(id("sea"), 10.0),
        });
        let e = engine(vec![FakeModel::counting(), arm]);
        let mut g = generation(&[id("the")], 2, SamplingParams::greedy());
        let params = json!({"rewards": {"colour": 1.0}});
        assert_eq!(
            run(&e, "genarm", params.clone(), g.clone()).text,
            [" sea sea"]
        );
        g.model_prompts.insert(1, vec![id("blue"), id("the")]);
        assert_eq!(run(&e, "genarm", params, g).text, [" red red"]);
    }

    #[test]
    fn an_arm_with_a_shorter_context_ends_the_choice() {
        let sea =
            FakeModel::new("sea", Role::Reward, |_| fake::favour(id("sea"), 10.0)).with_context(3);
        let e = engine(vec![FakeModel::counting(), sea]);
        let g = generation(&[id("the")], 10, SamplingParams::greedy());
        let out = run(&e, "genarm", json!({"rewards": {"sea": 1.0}}), g);
        // The prompt and two answer tokens fill the ARM's context; a third is drawn from it,
        // as the base's own context would allow (the last token is never fed).
        assert_eq!(out.tokens[0].len(), 3);
        assert_eq!(out.finish, [Some(FinishReason::Length)]);
    }

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

    /// KL(softmax(scores) ‖ softmax(base)) in f64, independently of the fused pass.
    fn kl64(scores: &[f32], base: &[f32]) -> f64 {
        let lse = |x: &[f32]| {
            let m = x
                .iter()
                .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
            m + x
                .iter()
                .map(|&v| (f64::from(v) - m).exp())
                .sum::<f64>()
                .ln()
        };
        let (zs, zb) = (lse(scores), lse(base));
        scores
            .iter()
            .zip(base)
            .map(|(&s, &b)| {
                let p = (f64::from(s) - zs).exp();
                if p > 0.0 {
                    p * ((f64::from(s) - zs) - (f64::from(b) - zb))
                } else {
                    0.0
                }
            })
            .sum()
    }

    /// A vocabulary-sized row of deterministic noise with a few strong tokens.
    fn row(seed: u32, v: usize, spread: f32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2_654_435_761).max(1);
        (0..v)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let noise = (x % 10_000) as f32 / 10_000.0 * spread;
                if i % 97 == seed as usize % 97 {
                    noise + 8.0
                } else {
                    noise
                }
            })
            .collect()
    }

    #[test]
    fn a_kl_budget_holds_each_step_within_it_and_is_plain_genarm_when_not_binding() {
        let v = 4096;
        for seed in 1..6u32 {
            let base = row(seed, v, 6.0);
            let (a, b) = (row(seed + 100, v, 6.0), row(seed + 200, v, 3.0));
            let arms = [(4.0f32, &a[..]), (-1.5f32, &b[..])];
            let mut full = Tilt::default();
            let unbounded = full.combine(&base, &arms, v);
            assert!(unbounded > 1.0, "{unbounded}");
            for budget in [0.0f32, 0.01, 0.1, 0.5, 1.0] {
                let mut t = Tilt::default();
                let (kl, scale) = t.combine_within(&base, &arms, v, budget);
                let measured = kl64(t.scores(), &base);
                assert!(
                    measured <= f64::from(budget) + 1e-3,
                    "{measured} > {budget}"
                );
                assert!(
                    (measured - f64::from(kl)).abs() < 1e-3,
                    "{measured} vs {kl}"
                );
                assert!((0.0..1.0).contains(&scale), "{scale}");
                // The largest scale within it: the budget is met, not just respected.
                assert!(
                    measured >= f64::from(budget) - 1e-3,
                    "{measured} < {budget}"
                );
                // The weights' pull scaled, nothing else: scores = base + s·(full − base).
                for i in (0..v).step_by(257) {
                    let expected = base[i] + scale * (full.scores()[i] - base[i]);
                    assert!((t.scores()[i] - expected).abs() < 1e-3);
                }
            }
            // Not binding: the very scores of unbudgeted GenARM.
            let mut t = Tilt::default();
            let (kl, scale) = t.combine_within(&base, &arms, v, unbounded + 0.01);
            assert_eq!((kl, scale), (unbounded, 1.0));
            assert_eq!(t.scores(), full.scores());
        }
        // A budget of 0 is the base itself, even where an ARM excludes a token.
        let base = [1.0, 2.0, 0.5];
        let mut t = Tilt::default();
        let (kl, scale) = t.combine_within(&base, &[(1.0, &[0.0, f32::NEG_INFINITY, 0.0])], 3, 0.0);
        assert_eq!((kl, scale, t.scores()), (0.0, 0.0, &base[..]));
    }

    #[test]
    fn genarm_under_a_kl_budget_reports_its_scale() {
        let e = engine(base_and_sea());
        let g = generation(&[id("sun")], 3, SamplingParams::greedy());
        let steer = |extra: serde_json::Value| {
            let mut p = json!({"rewards": {"sea": 1.0}});
            p.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            run(&e, "genarm", p, g.clone())
        };
        let free = steer(json!({}));
        // A loose budget changes nothing; a budget of 0 is plain decoding.
        let loose = steer(json!({"max_kl_per_token": 100.0}));
        assert_eq!(loose.tokens, free.tokens);
        let report = loose.report.unwrap();
        assert_eq!(report["kl_scale"], json!({"mean": 1.0, "min": 1.0}));
        assert_eq!(report["kl_per_token"], free.report.unwrap()["kl_per_token"]);
        let plain = run(&e, "sample", json!({}), g.clone());
        let none = steer(json!({"max_kl_per_token": 0.0}));
        assert_eq!(none.tokens, plain.tokens);
        assert_eq!(none.report.unwrap()["kl_scale"]["min"], 0.0);
        let tight = steer(json!({"max_kl_per_token": 0.3})).report.unwrap();
        assert!(
            tight["kl_per_token"].as_f64().unwrap() <= 0.3 + 1e-3,
            "{tight}"
        );
        let min = tight["kl_scale"]["min"].as_f64().unwrap();
        assert!(min > 0.0 && min < 1.0, "{tight}");
        for bad in [json!(-1.0), json!("a")] {
            let params = json!({"rewards": {"sea": 1.0}, "max_kl_per_token": bad});
            let err = GenArm.parse(params.as_object().cloned().unwrap(), e.rewards());
            assert!(err.is_err());
        }
        let params = json!({"rewards": {"sea": 1.0}, "max_kl_per_token": -1});
        let err = GenArm
            .parse(params.as_object().cloned().unwrap(), e.rewards())
            .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("max_kl_per_token"));
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
