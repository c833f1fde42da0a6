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
    /// Keywords the sampled tokens are pulled toward.
    pub keywords: Option<KeywordSpec>,
}

impl GenArmSpec {
    /// No guidance: plain sampling.
    pub fn none() -> Self {
        Self {
            rewards: Vec::new(),
            beta: 1.0,
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

/// A choice with its ARMs' sequences.
struct Branch {
    choice: Choice,
    arms: TrackId,
    tilt: Tilt,
}

/// A sampled token and KL(tilted ‖ base) of the distribution it was drawn from.
type Drawn = (Sampled, f32);

/// The keywords a [`Guided`] pulls toward, with what it needs to see where each answer stands.
struct Pull {
    lexicon: Lexicon,
    vocab: Arc<Vocab>,
    /// The tokens that end an answer (none with `ignore_eos`).
    ending: HashSet<u32>,
}

impl Branch {
    /// The next token from the models' rows (the base's, then each ARM's, weighted by `coefs`),
    /// nudged toward the keywords.
    fn draw(&mut self, coefs: &[f32], rows: &[&[f32]], vocab: usize, pull: Option<&Pull>) -> Drawn {
        if rows.len() == 1 {
            let Some(pull) = pull else {
                // No ARM: exactly plain decoding.
                return (self.choice.sampler.sample(rows[0]), 0.0);
            };
            let mut scores = rows[0].to_vec();
            pull.nudge(&self.choice.tokens, &mut scores);
            return (self.choice.sampler.sample(&scores), 0.0);
        }
        let arms: Vec<(f32, &[f32])> = coefs
            .iter()
            .copied()
            .zip(rows[1..].iter().copied())
            .collect();
        let kl = self.tilt.combine(rows[0], &arms, vocab);
        if let Some(pull) = pull {
            pull.nudge(&self.choice.tokens, &mut self.tilt.scores);
        }
        (self.choice.sampler.sample(&self.tilt.scores), kl)
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
    /// What each ARM's log-probs are multiplied by: w/β.
    coefs: Vec<f32>,
    sequences: Sequences,
    /// The keywords, when the request has them and a nonzero boost.
    pull: Option<Pull>,
    branches: Vec<Branch>,
    /// (branch, base ticket) planned this step.
    tickets: Vec<(usize, usize)>,
    kl_sum: f64,
    tokens: usize,
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
            coefs: spec.active().map(|a| a.weight / spec.beta).collect(),
            sequences,
            pull,
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

    /// Record branch `b`'s drawn token (and the KL of the distribution it came from).
    fn record(&mut self, cx: &mut Cx, g: &Generation, b: usize, drawn: Drawn) -> Result<()> {
        let branch = &mut self.branches[b];
        self.kl_sum += f64::from(drawn.1);
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
            let drawn = branch.draw(&self.coefs, &rows, vocab, self.pull.as_ref());
            self.branches.push(branch);
            self.record(cx, g, i, drawn)?;
        }
        Ok(())
    }

    pub fn plan(&mut self, cx: &mut Cx) -> Result<()> {
        self.tickets.clear();
        if self.branches.is_empty() {
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
        let (coefs, pull) = (&self.coefs, self.pull.as_ref());
        for_each_mut(&mut draws, |(_, branch, rows, drawn)| {
            *drawn = Some(branch.draw(coefs, rows, vocab, pull))
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
                let mut report = json!({
                    "weights": self.spec.weights(),
                    "beta": self.spec.beta,
                    "kl_per_token": self.guided.kl_per_token(),
                });
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
