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
//! A token costs one base forward (`forward_tokens`), as with `sample`, plus one forward per ARM
//! (`arm_forward_tokens`), and each choice streams token by token. Choice i draws from RNG
//! stream i of the request's seed.

use anyhow::{Context, Result};
use serde_json::json;

use super::objectives::{active_arms, answer_text, Objective, Scoring};
use super::prompt::{fork, SharedPrompt};
use super::{Choice, Decoder, Flow, Generation};
use crate::engine::{Cx, Event, FinishReason, ModelId, Outputs, SeqId, Usage, BASE};
use crate::model::Logits;
use crate::sampling::{argmax, log_softmax, top_sorted};

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

impl ArgsSpec {
    /// The reward models that change the scores, with their objective's index: one of weight 0
    /// (or every one, at `weight` 0) costs no forward.
    pub fn arms(&self) -> impl Iterator<Item = (usize, ModelId)> + '_ {
        active_arms(&self.objectives, self.weight)
    }
}

/// One reward model's part of the request.
struct Arm {
    /// Its objective's index in the spec.
    objective: usize,
    prompt: SharedPrompt,
    /// The prompt's sequence and next-token logits, kept until every model has prefilled.
    first: Option<(SeqId, Vec<f32>)>,
    /// log_softmax of this step's row, reused.
    logprobs: Vec<f32>,
}

/// A choice with its ARM sequences (`arms[i]` belongs to `Args::arms[i]`) and, per ARM, the
/// log-prob Σ_t log π_r(y_t | x, y_<t) of the tokens taken so far.
struct Branch {
    choice: Choice,
    arms: Vec<SeqId>,
    arm_logprobs: Vec<f64>,
}

pub struct Args {
    spec: ArgsSpec,
    scoring: Scoring,
    generation: Generation,
    prompt: SharedPrompt,
    /// The base prompt's sequence and logits, kept until every ARM has prefilled.
    first: Option<(SeqId, Vec<f32>)>,
    arms: Vec<Arm>,
    branches: Vec<Branch>,
    /// (branch, tickets: the base's, then each ARM's) planned this step.
    tickets: Vec<(usize, Vec<usize>)>,
    /// Tokens fed to the base after the prompt.
    forward_tokens: usize,
    /// Tokens fed to the reward models after their prompts.
    arm_forward_tokens: usize,
}

impl Args {
    pub fn new(spec: ArgsSpec, generation: Generation) -> Self {
        let arms = spec
            .arms()
            .map(|(objective, model)| Arm {
                objective,
                prompt: SharedPrompt::new(model, generation.prompt_for(model).to_vec()),
                first: None,
                logprobs: Vec::new(),
            })
            .collect();
        Self {
            scoring: Scoring::new(&spec.objectives),
            prompt: SharedPrompt::new(BASE, generation.prompt.clone()),
            first: None,
            arms,
            spec,
            generation,
            branches: Vec::new(),
            tickets: Vec::new(),
            forward_tokens: 0,
            arm_forward_tokens: 0,
        }
    }

    /// Pick branch `b`'s next token from the base's `logits` and each ARM's row (in `arms`
    /// order), and record it.
    fn step(&mut self, cx: &mut Cx, b: usize, logits: &[f32], arm_rows: &[&[f32]]) -> Result<()> {
        let g = &self.generation;
        let vocab = &cx.model(BASE).vocab;
        // Only the shared vocabulary counts: models may pad their rows past the tokenizer.
        let size = vocab.size();
        for (arm, row) in self.arms.iter_mut().zip(arm_rows) {
            arm.logprobs.clear();
            arm.logprobs.extend_from_slice(&row[..row.len().min(size)]);
            log_softmax(&mut arm.logprobs);
        }
        // A token past an ARM's row (padding) gets the row's least log-prob.
        let arm_logprob = |arm: &Arm, v: u32| {
            arm.logprobs
                .get(v as usize)
                .copied()
                .unwrap_or_else(|| arm.logprobs.iter().copied().fold(f32::INFINITY, f32::min))
        };
        let branch = &mut self.branches[b];
        let c = &mut branch.choice;
        let adjusted = c.sampler.adjusted(logits);
        let candidates = top_sorted(&adjusted, self.spec.top_k);
        let scores: Vec<f32> = candidates
            .iter()
            .map(|v| {
                let text = answer_text(vocab, g, c.tokens.iter().chain([v]));
                let mut terms = self.scoring.scores(&text);
                for arm in &self.arms {
                    terms[arm.objective] = arm_logprob(arm, *v);
                }
                adjusted[*v as usize] + self.spec.weight * self.scoring.combine(&terms) as f32
            })
            .collect();
        let j = match self.spec.mode {
            Mode::Greedy => argmax(&scores) as usize,
            Mode::Sample => c.sampler.choose(&scores),
        };
        for (sum, arm) in branch.arm_logprobs.iter_mut().zip(&self.arms) {
            *sum += f64::from(arm_logprob(arm, candidates[j]));
        }
        let sampled = c.sampler.record(candidates[j], logits);
        c.accept(cx, g, sampled)?;
        // An ARM with a shorter context ends the choice as the base's would.
        if !c.is_done() && branch.arms.iter().any(|&s| cx.room(s) == 0) {
            c.finish(cx, FinishReason::Length)?;
        }
        if c.is_done() {
            for &s in &branch.arms {
                cx.free(s);
            }
        }
        Ok(())
    }

    /// Once the base and every ARM have their prompt's logits: fork each for the choices and
    /// pick their first tokens.
    fn branch_out(&mut self, cx: &mut Cx) -> Result<()> {
        let n = self.generation.n;
        let (base_seq, base_logits) = self.first.take().context("no base prompt")?;
        let base_seqs = fork(cx, base_seq, n)?;
        let mut arm_seqs = Vec::with_capacity(self.arms.len());
        let mut arm_firsts = Vec::with_capacity(self.arms.len());
        for arm in &mut self.arms {
            let (seq, logits) = arm.first.take().context("an ARM without its prompt")?;
            arm_seqs.push(fork(cx, seq, n)?);
            arm_firsts.push(logits);
        }
        let rows: Vec<&[f32]> = arm_firsts.iter().map(Vec::as_slice).collect();
        for (i, seq) in base_seqs.into_iter().enumerate() {
            self.branches.push(Branch {
                choice: Choice::new(i, seq, &self.generation),
                arms: arm_seqs.iter().map(|s| s[i]).collect(),
                arm_logprobs: vec![0.0; self.arms.len()],
            });
            self.step(cx, i, &base_logits, &rows)?;
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
                for (arm, &sum) in self.arms.iter().zip(&b.arm_logprobs) {
                    terms[arm.objective] = sum as f32;
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

impl Decoder for Args {
    fn plan(&mut self, cx: &mut Cx) -> Result<()> {
        self.tickets.clear();
        if self.branches.is_empty() {
            self.prompt.plan(cx)?;
            for arm in &mut self.arms {
                arm.prompt.plan(cx)?;
            }
            return Ok(());
        }
        for (b, branch) in self.branches.iter().enumerate() {
            let (false, Some(tok)) = (branch.choice.is_done(), branch.choice.last()) else {
                continue;
            };
            let seqs = std::iter::once(branch.choice.seq).chain(branch.arms.iter().copied());
            let tickets = seqs
                .map(|seq| cx.forward(seq, vec![tok], Logits::Last))
                .collect::<Result<Vec<_>>>()?;
            self.forward_tokens += 1;
            self.arm_forward_tokens += branch.arms.len();
            self.tickets.push((b, tickets));
        }
        Ok(())
    }

    fn absorb(&mut self, cx: &mut Cx, out: &Outputs) -> Result<Flow> {
        if self.branches.is_empty() {
            if let Some((seq, logits)) = self.prompt.absorb(out)? {
                self.first = Some((seq, logits.to_vec()));
            }
            for arm in &mut self.arms {
                if let Some((seq, logits)) = arm.prompt.absorb(out)? {
                    arm.first = Some((seq, logits.to_vec()));
                }
            }
            if self.first.is_none() || self.arms.iter().any(|a| a.first.is_none()) {
                return Ok(Flow::Continue);
            }
            self.branch_out(cx)?;
        } else {
            for (b, tickets) in std::mem::take(&mut self.tickets) {
                let rows = tickets
                    .iter()
                    .map(|&t| out.last(t))
                    .collect::<Result<Vec<_>>>()?;
                self.step(cx, b, rows[0], &rows[1..])?;
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
