//! DeAL (Huang et al., ACL 2025; reference/algorithms.md §6): decoding as heuristic search. Each
//! iteration expands every live beam by its `top_k` most likely next tokens, rolls each expansion
//! out `lookahead` tokens greedily on a fork of the beam's cache, scores it by
//! f = log π(answer) + λ·R(answer ⊕ lookahead), and keeps the `beam_width` best (finished beams
//! compete with their final score and are not expanded).
//!
//! R weighs the objectives: a programmatic one scores the text of answer ⊕ lookahead, a reward
//! model (ARM) its sequence log-prob Σ_t log π_r(y_t | x, y_<t) over the answer's tokens and the
//! scored lookahead. Each ARM prefills the prompt in its own chat template; its cache follows the
//! base's — forked per rollout, fed the same token in the same step (so the engine batches it),
//! truncated with a kept beam, freed with a dropped one — and each beam carries its Σ log π_r and
//! the ARM's next-token log-probs, which price its expansions' first token.
//!
//! Caches: the prompt is prefilled once; the first beam is a fork of it. An expansion's rollout
//! runs on a fork of its beam (the beam's own cache goes to its last expansion), so all rollouts
//! of an iteration advance together, one batched forward per engine step. A kept expansion
//! truncates its rollout away, keeping the logits its first rollout token produced; the rest are
//! freed. The search is deterministic: it reads the base distribution at temperature 1, and the
//! request's sampling fields do not apply.
//!
//! Streaming: a token is sent once every kept beam agrees on it (later beams all descend from
//! these, so an agreed prefix never changes); the rest of the winner follows at the end. With
//! `logprobs`, each token carries its log π (no alternatives: the search ranks its own).
//!
//! Cost (`forward_tokens`, tokens fed to the base after the prompt): an expansion that adds the
//! t-th answer token feeds min(lookahead, max_tokens − t, room) tokens, at least 1 (the next
//! iteration needs its logits), and none when it ends the answer; a rollout that reaches
//! end-of-generation stops there. When no beam ends early
//! (`ignore_eos`, no stop string, context to spare), with k = top_k, b = beam_width,
//! l = lookahead and T = max_tokens:
//!
//! forward_tokens = Σ_{t=1}^{T−1} k · min(b, k^(t−1)) · max(1, min(l, T − t))
//!
//! about b·k·l per output token once the beams are full. Each ARM of nonzero weight is fed the
//! same tokens, counted apart as `arm_forward_tokens`.

use anyhow::{Context, Result};
use serde_json::json;

use super::objectives::{active_arms, answer_text, stop_at, Objective, Scoring};
use super::prompt::SharedPrompt;
use super::{Choice, Decoder, Flow, Generation};
use crate::engine::{Cx, Event, FinishReason, ModelId, Outputs, SeqId, Usage, BASE};
use crate::model::Logits;
use crate::sampling::{argmax, log_softmax, log_sum_exp, top_sorted, Sampled};

/// Most tokens expanded per beam.
pub const MAX_TOP_K: usize = 16;
/// Most beams kept.
pub const MAX_BEAM_WIDTH: usize = 8;
/// Longest rollout.
pub const MAX_LOOKAHEAD: usize = 64;

/// Checked `deal` parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct DealSpec {
    pub top_k: usize,
    pub beam_width: usize,
    pub lookahead: usize,
    /// Weight of the reward against the log-probability.
    pub lambda: f32,
    pub objectives: Vec<Objective>,
}

impl DealSpec {
    /// The reward models that change the scores, with their objective's index: one of weight 0
    /// (or every one, at `lambda` 0) costs no forward.
    pub fn arms(&self) -> impl Iterator<Item = (usize, ModelId)> + '_ {
        active_arms(&self.objectives, self.lambda)
    }
}

/// One reward model's part of the request.
struct Arm {
    /// Its objective's index in the spec.
    objective: usize,
    prompt: SharedPrompt,
    /// Its prompt's length, in its tokens.
    prompt_len: usize,
}

/// A reward model's state along a beam or a rollout.
#[derive(Clone, Default)]
struct ArmTrack {
    /// Cache of the ARM's prompt + the answer's tokens (+ the rollout's).
    seq: Option<SeqId>,
    /// Σ log π_r of the answer's tokens (a beam's), or of the scored lookahead (a rollout's).
    logp: f64,
    /// log_softmax of the ARM's row after the last token (a beam's next-token log-probs).
    next: Vec<f32>,
    ticket: Option<usize>,
}

/// log_softmax of an ARM's row over the shared vocabulary (models may pad their rows).
fn arm_logprobs(row: &[f32], vocab: usize) -> Vec<f32> {
    let mut lp = row[..row.len().min(vocab)].to_vec();
    log_softmax(&mut lp);
    lp
}

/// `token`'s log-prob in `logprobs`; a token past the row (padding) gets the row's least.
fn arm_logprob(logprobs: &[f32], token: u32) -> f32 {
    logprobs
        .get(token as usize)
        .copied()
        .unwrap_or_else(|| logprobs.iter().copied().fold(f32::INFINITY, f32::min))
}

/// A kept partial (or finished) answer.
struct Beam {
    /// Cache of prompt + every token (None once finished).
    seq: Option<SeqId>,
    tokens: Vec<u32>,
    /// log π of each token.
    logps: Vec<f32>,
    score: f64,
    /// The most likely next tokens with their log-probs.
    next: Vec<(u32, f32)>,
    finished: Option<FinishReason>,
    /// Per reward model (in `Deal::arms` order).
    arms: Vec<ArmTrack>,
}

/// Beam `parent` plus `token`, being rolled out.
struct Expansion {
    parent: usize,
    token: u32,
    logp: f32,
    /// The rollout's cache: prompt + parent's tokens + token + lookahead so far.
    seq: Option<SeqId>,
    lookahead: Vec<u32>,
    /// Lookahead tokens that count in the score.
    scored: usize,
    /// Forwards left.
    todo: usize,
    next: Vec<(u32, f32)>,
    finished: Option<FinishReason>,
    ticket: Option<usize>,
    /// Per reward model: `logp` over the parent's tokens + `token` (`base`), and the rollout's.
    arm_base: Vec<f64>,
    arms: Vec<ArmTrack>,
}

pub struct Deal {
    spec: DealSpec,
    scoring: Scoring,
    generation: Generation,
    prompt: SharedPrompt,
    /// The base prompt's sequence and logits, kept until every ARM has prefilled.
    first: Option<(SeqId, Vec<f32>)>,
    arms: Vec<Arm>,
    /// Each ARM's prompt sequence and logits, once prefilled.
    arm_firsts: Vec<Option<(SeqId, Vec<f32>)>>,
    /// The answer: streams agreed tokens; holds the prompt's cache (beams are forks of it).
    choice: Option<Choice>,
    beams: Vec<Beam>,
    expansions: Vec<Expansion>,
    forward_tokens: usize,
    /// Tokens fed to the reward models after their prompts.
    arm_forward_tokens: usize,
}

/// The `k` most likely tokens of `logits` with their log-probs, most likely first.
fn ranked(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let lse = log_sum_exp(logits);
    top_sorted(logits, k)
        .into_iter()
        .map(|t| (t, logits[t as usize] - lse))
        .collect()
}

impl Deal {
    pub fn new(spec: DealSpec, generation: Generation) -> Self {
        let arms: Vec<Arm> = spec
            .arms()
            .map(|(objective, model)| Arm {
                objective,
                prompt: SharedPrompt::new(model, generation.prompt_for(model).to_vec()),
                prompt_len: generation.prompt_for(model).len(),
            })
            .collect();
        Self {
            scoring: Scoring::new(&spec.objectives),
            prompt: SharedPrompt::new(BASE, generation.prompt.clone()),
            first: None,
            arm_firsts: vec![None; arms.len()],
            arms,
            spec,
            generation,
            choice: None,
            beams: Vec::new(),
            expansions: Vec::new(),
            forward_tokens: 0,
            arm_forward_tokens: 0,
        }
    }

    /// The weighted reward of `text`, with each ARM's term from `arm_logps`.
    fn reward(&self, text: &str, arm_logps: impl Iterator<Item = f64>) -> f64 {
        let mut terms = self.scoring.scores(text);
        for (arm, logp) in self.arms.iter().zip(arm_logps) {
            terms[arm.objective] = logp as f32;
        }
        self.scoring.combine(&terms)
    }

    /// Expand every live beam by its top-k tokens, forking caches for the rollouts.
    fn expand(&mut self, cx: &mut Cx) -> Result<()> {
        let g = &self.generation;
        let vocab = &cx.model(BASE).vocab;
        let mut expansions = Vec::new();
        for (p, beam) in self.beams.iter().enumerate() {
            if beam.finished.is_some() {
                continue;
            }
            let seq = beam.seq.context("a live beam without its cache")?;
            // An ARM with a shorter context ends the answer as the base's would.
            let room = beam
                .arms
                .iter()
                .filter_map(|a| a.seq)
                .map(|s| cx.room(s))
                .fold(cx.room(seq), usize::min);
            let t = beam.tokens.len() + 1;
            let prefix: Vec<u8> = beam
                .tokens
                .iter()
                .flat_map(|&t| vocab.bytes(t))
                .copied()
                .collect();
            for &(token, logp) in &beam.next {
                let ends = !g.ignore_eos && vocab.end_of_generation.contains(&token);
                let stops = || {
                    let bytes = [prefix.as_slice(), vocab.bytes(token)].concat();
                    stop_at(&String::from_utf8_lossy(&bytes), &g.stop).is_some()
                };
                // The same order of checks as `Choice::accept`, which streams the answer.
                let finished = if ends || stops() {
                    Some(FinishReason::Stop)
                } else if t >= g.max_tokens || room == 0 {
                    Some(FinishReason::Length)
                } else {
                    None
                };
                let todo = match finished {
                    Some(_) => 0,
                    None => self.spec.lookahead.min(g.max_tokens - t).min(room).max(1),
                };
                expansions.push(Expansion {
                    parent: p,
                    token,
                    logp,
                    seq: None,
                    lookahead: Vec::new(),
                    scored: self.spec.lookahead.min(todo),
                    todo,
                    next: Vec::new(),
                    finished,
                    ticket: None,
                    arm_base: beam
                        .arms
                        .iter()
                        .map(|a| a.logp + f64::from(arm_logprob(&a.next, token)))
                        .collect(),
                    arms: vec![ArmTrack::default(); beam.arms.len()],
                });
            }
        }
        // Rollout caches: forks of the parent, the parent's own going to its last rollout.
        for (p, beam) in self.beams.iter_mut().enumerate() {
            let Some(seq) = beam.seq.take() else { continue };
            let rolling: Vec<usize> = (0..expansions.len())
                .filter(|&e| expansions[e].parent == p && expansions[e].todo > 0)
                .collect();
            let arm_seqs: Vec<SeqId> = beam.arms.iter_mut().filter_map(|a| a.seq.take()).collect();
            match rolling.split_last() {
                None => {
                    cx.free(seq);
                    for s in arm_seqs {
                        cx.free(s);
                    }
                }
                Some((&last, rest)) => {
                    for &e in rest {
                        expansions[e].seq = Some(cx.fork(seq)?);
                        for (i, &s) in arm_seqs.iter().enumerate() {
                            expansions[e].arms[i].seq = Some(cx.fork(s)?);
                        }
                    }
                    expansions[last].seq = Some(seq);
                    for (i, &s) in arm_seqs.iter().enumerate() {
                        expansions[last].arms[i].seq = Some(s);
                    }
                }
            }
        }
        self.expansions = expansions;
        Ok(())
    }

    /// Score the rolled-out expansions with the finished beams, keep the best `beam_width`, and
    /// stream what they agree on. Returns whether the search is over.
    fn select(&mut self, cx: &mut Cx) -> Result<bool> {
        let g = &self.generation;
        let prompt = g.prompt.len();
        let lambda = f64::from(self.spec.lambda);
        let old = std::mem::take(&mut self.beams);
        let mut pool: Vec<Beam> = Vec::new();
        for e in std::mem::take(&mut self.expansions) {
            let parent = &old[e.parent];
            let mut tokens = parent.tokens.clone();
            tokens.push(e.token);
            let mut logps = parent.logps.clone();
            logps.push(e.logp);
            let vocab = &cx.model(BASE).vocab;
            let text = answer_text(
                vocab,
                g,
                tokens.iter().chain(e.lookahead.iter().take(e.scored)),
            );
            let logp: f64 = logps.iter().map(|&l| f64::from(l)).sum();
            let seq = match (e.finished, e.seq) {
                (None, seq) => seq,
                (Some(_), Some(seq)) => {
                    cx.free(seq);
                    None
                }
                (Some(_), None) => None,
            };
            let rollout = e.arm_base.iter().zip(&e.arms).map(|(b, a)| b + a.logp);
            let score = logp + lambda * self.reward(&text, rollout);
            let arms = e
                .arms
                .into_iter()
                .zip(&e.arm_base)
                .map(|(a, &logp)| {
                    let seq = match (e.finished, a.seq) {
                        (None, seq) => seq,
                        (Some(_), Some(seq)) => {
                            cx.free(seq);
                            None
                        }
                        (Some(_), None) => None,
                    };
                    ArmTrack {
                        seq,
                        logp,
                        next: a.next,
                        ticket: None,
                    }
                })
                .collect();
            pool.push(Beam {
                seq,
                tokens,
                logps,
                score,
                next: e.next,
                finished: e.finished,
                arms,
            });
        }
        pool.extend(old.into_iter().filter(|b| b.finished.is_some()));
        pool.sort_by(|a, b| b.score.total_cmp(&a.score));
        for dropped in pool.drain(self.spec.beam_width.min(pool.len())..) {
            let arm_seqs = dropped.arms.iter().filter_map(|a| a.seq);
            for seq in dropped.seq.into_iter().chain(arm_seqs) {
                cx.free(seq);
            }
        }
        for beam in &mut pool {
            if let Some(seq) = beam.seq {
                cx.truncate(seq, prompt + beam.tokens.len());
            }
            for (arm, track) in self.arms.iter().zip(&beam.arms) {
                if let Some(seq) = track.seq {
                    cx.truncate(seq, arm.prompt_len + beam.tokens.len());
                }
            }
        }
        self.beams = pool;
        let agreed = self.beams[1..]
            .iter()
            .fold(self.beams[0].tokens.len(), |n, b| {
                n.min(
                    b.tokens
                        .iter()
                        .zip(&self.beams[0].tokens)
                        .take_while(|(a, b)| a == b)
                        .count(),
                )
            });
        self.stream(cx, agreed)?;
        Ok(self.beams.iter().all(|b| b.finished.is_some()))
    }

    /// Stream the best beam's tokens up to `end` that were not sent yet.
    fn stream(&mut self, cx: &mut Cx, end: usize) -> Result<()> {
        let g = &self.generation;
        let beam = &self.beams[0];
        let choice = self
            .choice
            .as_mut()
            .context("streaming before the prompt")?;
        for i in choice.tokens.len()..end {
            if choice.is_done() {
                break;
            }
            let sampled = Sampled {
                token: beam.tokens[i],
                logprob: g.sampling.logprobs.map(|_| beam.logps[i]),
                top: Vec::new(),
            };
            choice.accept(cx, g, sampled)?;
        }
        Ok(())
    }

    /// Stream the rest of the best beam and report.
    fn finish(&mut self, cx: &mut Cx) -> Result<()> {
        let winner = &self.beams[0];
        let (end, reason) = (winner.tokens.len(), winner.finished);
        self.stream(cx, end)?;
        let choice = self
            .choice
            .as_mut()
            .context("finishing before the prompt")?;
        if !choice.is_done() {
            choice.finish(cx, reason.unwrap_or(FinishReason::Length))?;
        }
        let winner = &self.beams[0];
        let text = answer_text(&cx.model(BASE).vocab, &self.generation, &winner.tokens);
        let output = winner.tokens.len();
        let reward = self.reward(&text, winner.arms.iter().map(|a| a.logp));
        let report = json!({
            "top_k": self.spec.top_k,
            "beam_width": self.spec.beam_width,
            "lookahead": self.spec.lookahead,
            "lambda": self.spec.lambda,
            "weights": self.scoring.weights(),
            "reward": reward,
            "score": winner.score,
            "forward_tokens": self.forward_tokens,
            "forward_tokens_per_output_token": self.forward_tokens as f64 / output.max(1) as f64,
            "arm_forward_tokens": self.arm_forward_tokens,
        });
        cx.emit(Event::Done {
            usage: Usage {
                prompt_tokens: self.generation.prompt.len(),
                completion_tokens: output,
            },
            report: Some(report),
        });
        Ok(())
    }
}

impl Decoder for Deal {
    fn plan(&mut self, cx: &mut Cx) -> Result<()> {
        if self.choice.is_none() {
            self.prompt.plan(cx)?;
            for arm in &mut self.arms {
                arm.prompt.plan(cx)?;
            }
            return Ok(());
        }
        for e in &mut self.expansions {
            e.ticket = None;
            let (Some(seq), true) = (e.seq, e.todo > 0) else {
                continue;
            };
            let feed = *e.lookahead.last().unwrap_or(&e.token);
            e.ticket = Some(cx.forward(seq, vec![feed], Logits::Last)?);
            self.forward_tokens += 1;
            // Each ARM is fed the same token, in the same step.
            for a in &mut e.arms {
                let seq = a.seq.context("a rollout without its ARM cache")?;
                a.ticket = Some(cx.forward(seq, vec![feed], Logits::Last)?);
                self.arm_forward_tokens += 1;
            }
        }
        Ok(())
    }

    fn absorb(&mut self, cx: &mut Cx, out: &Outputs) -> Result<Flow> {
        if self.choice.is_none() {
            if let Some((seq, logits)) = self.prompt.absorb(out)? {
                self.first = Some((seq, logits.to_vec()));
            }
            for (arm, first) in self.arms.iter_mut().zip(&mut self.arm_firsts) {
                if let Some((seq, logits)) = arm.prompt.absorb(out)? {
                    *first = Some((seq, logits.to_vec()));
                }
            }
            if self.first.is_none() || self.arm_firsts.iter().any(Option::is_none) {
                return Ok(Flow::Continue);
            }
            let (seq, logits) = self.first.take().context("no base prompt")?;
            let size = cx.model(BASE).vocab.size();
            let arms = std::mem::take(&mut self.arm_firsts)
                .into_iter()
                .map(|f| {
                    // The first beam takes the ARM's prompt cache itself.
                    let (seq, row) = f.context("an ARM without its prompt")?;
                    Ok(ArmTrack {
                        seq: Some(seq),
                        logp: 0.0,
                        next: arm_logprobs(&row, size),
                        ticket: None,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            self.beams.push(Beam {
                seq: Some(cx.fork(seq)?),
                tokens: Vec::new(),
                logps: Vec::new(),
                score: 0.0,
                next: ranked(&logits, self.spec.top_k),
                finished: None,
                arms,
            });
            self.choice = Some(Choice::new(0, seq, &self.generation));
        } else {
            let eog = &cx.model(BASE).vocab.end_of_generation;
            let size = cx.model(BASE).vocab.size();
            for e in &mut self.expansions {
                let Some(t) = e.ticket.take() else { continue };
                let row = out.last(t)?;
                if e.lookahead.is_empty() {
                    e.next = ranked(row, self.spec.top_k);
                }
                let token = argmax(row);
                // Each ARM's row predicted the same token: its log-prob counts while scored.
                let scored = e.lookahead.len() < e.scored;
                for a in &mut e.arms {
                    let t = a.ticket.take().context("an ARM forward not planned")?;
                    let lp = arm_logprobs(out.last(t)?, size);
                    if scored {
                        a.logp += f64::from(arm_logprob(&lp, token));
                    }
                    if e.lookahead.is_empty() {
                        a.next = lp;
                    }
                }
                e.lookahead.push(token);
                e.todo -= 1;
                // A rollout that ends its answer has nothing more to say.
                if !self.generation.ignore_eos && eog.contains(&token) {
                    e.todo = 0;
                }
            }
            if self.expansions.iter().any(|e| e.todo > 0) {
                return Ok(Flow::Continue);
            }
            if self.select(cx)? {
                self.finish(cx)?;
                return Ok(Flow::Done);
            }
        }
        loop {
            self.expand(cx)?;
            if self.expansions.iter().any(|e| e.todo > 0) {
                return Ok(Flow::Continue);
            }
            // Every expansion ends its answer: nothing to roll out.
            if self.select(cx)? {
                self.finish(cx)?;
                return Ok(Flow::Done);
            }
        }
    }
}
