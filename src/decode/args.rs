//! ARGS (Khanov et al., ICLR 2024; reference/algorithms.md §3): each step takes the base's `top_k`
//! next tokens (after the request's logit bias and penalties), scores each by
//! logit + w·Σ_i w_i·r_i(answer + token), and takes the best (`greedy`, ARGS-greedy) or draws
//! among the k from softmax(score/τ) at the request's temperature and truncation (`sample`,
//! ARGS-stochastic). Raw logits, not log-probs, as in the official code: they differ by a
//! per-step constant, which neither rule sees.
//!
//! A programmatic objective scores the answer's text with each candidate appended. A reward
//! model (ARM) scores at sequence level, r(answer + v) = Σ_t log π_r over answer + v, which is a
//! constant shared by the k candidates plus log π_r(v | prompt, answer): so a candidate is ranked
//! by the ARM's next-token log-prob, log_softmax(ARM logits)[v], and the constant, which no rule
//! sees, is left out. Each ARM prefills the prompt in its own chat template on its own sequence,
//! forked per choice like the base's, and every step forwards each unfinished choice's last token
//! on the base and on each ARM, all planned together so the engine batches them per model.
//!
//! With `constraints.keywords`, the candidates also take every token that starts or continues a
//! missing keyword (`lexical`); each candidate's score adds the change in the answer's keyword
//! standing (`keyword_boost` per keyword token, given back when a keyword in progress is
//! abandoned, and taken per missing keyword from ending the answer), and the keyword objective
//! scores the lexicon's heuristic. Without keywords the candidates are the top-k alone.
//!
//! A token costs one base forward (`forward_tokens`), as with `sample`, plus one forward per ARM
//! (`arm_forward_tokens`), and each choice streams token by token. Choice i draws from RNG
//! stream i of the request's seed.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde_json::json;

use super::lexical::Lexicon;
use super::objectives::{
    self, active_arms, answer_text, Constraints, KeywordSpec, Objective, Scoring,
};
use super::prompt::{fork, SharedPrompt};
use super::track::{Rows, TrackId, Tracker};
use super::{finite, typed, within, Choice, Generation, Method, ParamError, Params};
use crate::engine::{Cx, Decoder, Event, FinishReason, Flow, Outputs, SeqId, Usage};
use crate::model::{Logits, ModelId, ModelInfo, BASE};
use crate::reward::Registry;
use crate::sampling::{argmax, top_sorted};

/// Most candidate tokens per step.
pub const MAX_TOP_K: usize = 32;

/// `args`: rescore the base's top-k tokens by reward, every step.
#[derive(Debug, Clone, Copy)]
pub struct Args;

/// `args`' parameters: candidates per step, how one is picked, and the rewards that rescore them.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ArgsParams {
    /// The paper's and the official code's k.
    #[serde(default = "default_top_k")]
    top_k: usize,
    #[serde(default)]
    mode: Mode,
    /// ARGS' w; the paper's default.
    #[serde(default = "default_weight")]
    weight: f64,
    #[serde(default)]
    rewards: BTreeMap<String, f64>,
    #[serde(default)]
    constraints: Constraints,
}

fn default_top_k() -> usize {
    10
}

fn default_weight() -> f64 {
    1.0
}

impl Method for Args {
    type Spec = ArgsSpec;

    fn name(&self) -> &'static str {
        "args"
    }

    fn parse(&self, params: Params, rewards: &Registry) -> Result<ArgsSpec, ParamError> {
        let p: ArgsParams = typed(params)?;
        let top_k = within("top_k", p.top_k, 1, MAX_TOP_K)?;
        let weight = finite("weight", p.weight)?;
        let (objectives, keywords) =
            objectives::parse("args", "steer by", p.rewards, p.constraints, rewards)?;
        Ok(ArgsSpec {
            top_k,
            mode: p.mode,
            weight,
            objectives,
            keywords,
        })
    }

    fn models(&self, spec: &ArgsSpec) -> Vec<ModelId> {
        spec.arms().map(|(_, m)| m).collect()
    }

    fn build(
        &self,
        spec: &ArgsSpec,
        generation: Generation,
        models: &[ModelInfo],
    ) -> Result<Box<dyn Decoder>, ParamError> {
        let lexicon = (spec.keywords.as_ref()).and_then(|k| k.pull(&models[BASE].vocab));
        Ok(Box::new(ArgsDecoder::new(
            spec.clone(),
            generation,
            lexicon,
        )))
    }
}

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
#[derive(Debug, Clone)]
pub struct ArgsSpec {
    pub top_k: usize,
    pub mode: Mode,
    /// w: how much the reward counts against the logit.
    pub weight: f32,
    pub objectives: Vec<Objective>,
    pub keywords: Option<KeywordSpec>,
}

impl ArgsSpec {
    /// The reward models that change the scores, with their objective's index: one of weight 0
    /// (or every one, at `weight` 0) costs no forward.
    pub fn arms(&self) -> impl Iterator<Item = (usize, ModelId)> + '_ {
        active_arms(&self.objectives, self.weight)
    }
}

/// A choice with its ARMs' track, and per ARM the log-prob Σ_t log π_r(y_t | x, y_<t) of the
/// tokens taken, kept once the choice is done and its track freed.
struct Branch {
    choice: Choice,
    arms: TrackId,
    arm_logps: Vec<f64>,
}

pub struct ArgsDecoder {
    spec: ArgsSpec,
    scoring: Scoring,
    /// The keywords, when the request constrains them.
    lexicon: Option<Lexicon>,
    generation: Generation,
    prompt: SharedPrompt,
    /// The base prompt's sequence and logits, kept until every ARM has prefilled.
    first: Option<(SeqId, Vec<f32>)>,
    /// The active reward models, reading every choice's tokens.
    arms: Tracker,
    /// The objective of each of `arms`' lanes.
    arm_objectives: Vec<usize>,
    branches: Vec<Branch>,
    /// (branch, base ticket) planned this step.
    tickets: Vec<(usize, usize)>,
    /// Tokens fed to the base after the prompt.
    forward_tokens: usize,
    /// Tokens fed to the reward models after their prompts.
    arm_forward_tokens: usize,
}

impl ArgsDecoder {
    pub fn new(spec: ArgsSpec, generation: Generation, lexicon: Option<Lexicon>) -> Self {
        let (arm_objectives, prompts): (Vec<usize>, Vec<_>) = spec
            .arms()
            .map(|(objective, model)| (objective, (model, generation.prompt_for(model).to_vec())))
            .unzip();
        Self {
            scoring: Scoring::new(&spec.objectives),
            lexicon,
            prompt: SharedPrompt::base(&generation),
            first: None,
            arms: Tracker::new(prompts, Rows::LogProbs),
            arm_objectives,
            spec,
            generation,
            branches: Vec::new(),
            tickets: Vec::new(),
            forward_tokens: 0,
            arm_forward_tokens: 0,
        }
    }

    /// Pick branch `b`'s next token from the base's `logits` and the ARMs' next-token
    /// log-probs, and record it.
    fn step(&mut self, cx: &mut Cx, b: usize, logits: &[f32]) -> Result<()> {
        let g = &self.generation;
        let vocab = &cx.model(BASE).vocab;
        let branch = &mut self.branches[b];
        let c = &mut branch.choice;
        let adjusted = c.sampler.adjusted(logits);
        let mut candidates = top_sorted(&adjusted, self.spec.top_k);
        let keywords = self.lexicon.as_ref().map(|lex| {
            let state = lex.state(vocab, &c.tokens, &answer_text(vocab, g, &c.tokens));
            for t in state.pulled() {
                if !candidates.contains(&t) && (t as usize) < adjusted.len() {
                    candidates.push(t);
                }
            }
            (lex, state)
        });
        // Tokens the request's grammar refuses are −∞ (and there is always one it allows).
        candidates.retain(|&t| adjusted[t as usize] > f32::NEG_INFINITY);
        let keyword_objective = self.spec.keywords.as_ref().and_then(|k| k.objective);
        let mut scores = Vec::with_capacity(candidates.len());
        for v in &candidates {
            let tokens: Vec<u32> = c.tokens.iter().chain([v]).copied().collect();
            let text = answer_text(vocab, g, &tokens);
            let mut terms = self.scoring.scores(&text);
            for (lane, &objective) in self.arm_objectives.iter().enumerate() {
                terms[objective] = self.arms.next_logprob(branch.arms, lane, *v)?;
            }
            let mut bonus = 0.0;
            if let (Some((lex, before)), Some(o)) = (&keywords, keyword_objective) {
                let ends = !g.ignore_eos && vocab.end_of_generation.contains(v);
                let after = lex.state(vocab, &tokens, &text);
                terms[o] = lex.credit(&after, ends);
                // The budget spent before and after this token (all of it, if the token ends).
                let t = c.tokens.len() as f32;
                let spent = |t: f32| t / g.max_tokens as f32;
                let after_spent = if ends { 1.0 } else { spent(t + 1.0) };
                bonus = lex.standing(&after, after_spent) - lex.standing(before, spent(t));
            }
            scores.push(
                adjusted[*v as usize]
                    + bonus
                    + self.spec.weight * self.scoring.combine(&terms) as f32,
            );
        }
        let j = match self.spec.mode {
            Mode::Greedy => argmax(&scores) as usize,
            Mode::Sample => c.sampler.choose(&scores),
        };
        self.arms.count(branch.arms, candidates[j])?;
        let sampled = c.sampler.record(candidates[j], logits);
        c.accept(cx, g, sampled)?;
        // An ARM with a shorter context ends the choice as the base's would.
        if !c.is_done() && self.arms.room(cx, branch.arms) == 0 {
            c.finish(cx, FinishReason::Length)?;
        }
        if c.is_done() {
            branch.arm_logps = self.arms.logps(branch.arms)?.to_vec();
            self.arms.free(cx, branch.arms);
        }
        Ok(())
    }

    /// Once the base and every ARM have their prompt's logits: fork each for the choices and
    /// pick their first tokens.
    fn branch_out(&mut self, cx: &mut Cx) -> Result<()> {
        let n = self.generation.n;
        let (base_seq, base_logits) = self.first.take().context("no base prompt")?;
        let base_seqs = fork(cx, base_seq, n)?;
        let tracks = self.arms.branch(cx, n)?;
        for (i, (seq, arms)) in base_seqs.into_iter().zip(tracks).enumerate() {
            self.branches.push(Branch {
                choice: Choice::new(i, seq, &self.generation),
                arms,
                arm_logps: Vec::new(),
            });
            self.step(cx, i, &base_logits)?;
        }
        Ok(())
    }

    fn report(&self, cx: &Cx) -> serde_json::Value {
        let vocab = &cx.model(BASE).vocab;
        let rewards: Vec<f64> = self
            .branches
            .iter()
            .map(|b| {
                let text = answer_text(vocab, &self.generation, &b.choice.tokens);
                let mut terms = self.scoring.scores(&text);
                for (&objective, &sum) in self.arm_objectives.iter().zip(&b.arm_logps) {
                    terms[objective] = sum as f32;
                }
                self.scoring.combine(&terms)
            })
            .collect();
        let output: usize = self.branches.iter().map(|b| b.choice.tokens.len()).sum();
        json!({
            "top_k": self.spec.top_k,
            "mode": self.spec.mode.name(),
            "weight": self.spec.weight,
            "weights": self.scoring.weights(),
            "rewards": rewards,
            "forward_tokens": self.forward_tokens,
            "forward_tokens_per_output_token": self.forward_tokens as f64 / output.max(1) as f64,
            "arm_forward_tokens": self.arm_forward_tokens,
        })
    }
}

impl Decoder for ArgsDecoder {
    fn plan(&mut self, cx: &mut Cx) -> Result<()> {
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
            self.forward_tokens += 1;
            self.arm_forward_tokens += self.arms.lanes();
            self.tickets.push((b, t));
        }
        Ok(())
    }

    fn absorb(&mut self, cx: &mut Cx, out: &Outputs) -> Result<Flow> {
        if self.branches.is_empty() {
            if let Some((seq, logits)) = self.prompt.absorb(cx, out)? {
                self.first = Some((seq, logits.to_vec()));
            }
            if !self.arms.absorb_prompts(cx, out)? || self.first.is_none() {
                return Ok(Flow::Continue);
            }
            self.branch_out(cx)?;
        } else {
            self.arms.absorb(cx, out)?;
            for (b, t) in std::mem::take(&mut self.tickets) {
                self.step(cx, b, out.last(t)?)?;
            }
        }
        if !self.branches.iter().all(|b| b.choice.is_done()) {
            return Ok(Flow::Continue);
        }
        cx.emit(Event::Done {
            usage: Usage {
                prompt_tokens: self.generation.prompt.len(),
                completion_tokens: self.branches.iter().map(|b| b.choice.tokens.len()).sum(),
            },
            report: Some(self.report(cx)),
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
    use serde_json::json;

    #[test]
    fn a_keyword_among_the_top_k_is_taken() {
        let e = engine(vec![FakeModel::counting()]);
        let g = generation(&[id("the")], 3, SamplingParams::greedy());
        let plain = run(&e, "sample", json!({}), g.clone());
        assert!(!plain.tokens[0].contains(&id("sea")));
        let params = json!({"top_k": 20, "weight": 5.0, "constraints": {"keywords": ["sea"]}});
        let out = run(&e, "args", params, g);
        assert!(out.tokens[0].contains(&id("sea")), "{:?}", out.text);
        let report = out.report.unwrap();
        assert_eq!(report["forward_tokens"], 2);
        assert_eq!(report["arm_forward_tokens"], 0);
    }

    #[test]
    fn a_keyword_outside_the_top_k_is_written() {
        let e = engine(vec![FakeModel::counting()]);
        let g = generation(&[id("the")], 5, SamplingParams::greedy());
        let params = json!({"top_k": 2, "constraints": {"keywords": ["blue"]}});
        let out = run(&e, "args", params, g);
        assert!(out.tokens[0].contains(&id("blue")), "{:?}", out.text);
        // Pulling a token costs no forward: one per token, as ever.
        let report = out.report.unwrap();
        assert_eq!(report["forward_tokens"], 4);
        assert_eq!(report["rewards"][0], 1.0);
    }

    #[test]
    fn a_reward_model_ranks_by_its_next_token_log_prob() {
        let arm = FakeModel::new("sea", Role::Reward, |_| fake::favour(id("sea"), 4.0));
        let e = engine(vec![FakeModel::counting(), arm]);
        let g = generation(&[id("the")], 3, SamplingParams::greedy());
        let out = run(&e, "args", json!({"top_k": 20, "rewards": {"sea": 1.0}}), g);
        assert_eq!(out.text, [" sea sea sea"]);
        let report = out.report.unwrap();
        // Σ log π_r of the three tokens, each the ARM's favourite.
        let mut lp = fake::favour(id("sea"), 4.0);
        crate::math::log_softmax(&mut lp);
        let want = 3.0 * f64::from(lp[id("sea") as usize]);
        let got = report["rewards"][0].as_f64().unwrap();
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        assert_eq!(report["arm_forward_tokens"], report["forward_tokens"]);
    }

    #[test]
    fn args_has_its_documented_defaults() {
        let kw = json!({"constraints": {"keywords": ["sea"]}});
        let a = Args
            .parse(kw.as_object().cloned().unwrap(), &Registry::new(&[]))
            .unwrap();
        assert_eq!((a.top_k, a.mode, a.weight), (10, Mode::Greedy, 1.0));
        assert_eq!(a.objectives[0].name, "keywords");
    }
}
