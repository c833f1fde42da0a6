//! DeAL (Huang et al., ACL 2025; reference/algorithms.md §6): decoding as heuristic search. Each
//! iteration expands every live beam by its `top_k` most likely next tokens, rolls each expansion
//! out `lookahead` tokens greedily on a fork of the beam's cache, scores it by
//! f = log π(answer) + λ·R(answer ⊕ lookahead), and keeps the `beam_width` best (finished beams
//! compete with their final score and are not expanded).
//!
//! R weighs the objectives: a programmatic one scores the text of answer ⊕ lookahead, a reward
//! model (ARM) its sequence log-prob Σ_t log π_r(y_t | x, y_<t) over the answer's tokens and the
//! scored lookahead. The ARMs follow the base on one track per beam or rollout (`track`): forked
//! per rollout, fed the same token in the same step (so the engine batches it), rewound with a
//! kept beam, freed with a dropped one; a beam's track holds its Σ log π_r and the ARMs'
//! next-token log-probs, which price its expansions' first token.
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
//!
//! Pruning (`prune`, on by default) skips the rollout of an expansion that cannot be kept: where
//! every objective's score is bounded (keywords, regexes, word budgets, and reward models from
//! above), an expansion whose best possible score is below the `beam_width`-th best worst case of
//! the others is dropped before it is rolled out. The search keeps the same beams; the formula
//! above becomes an upper bound, and `pruned` counts the rollouts skipped.
//!
//! Keywords (`constraints.keywords`, see `lexical`): each beam's expansions also take the tokens
//! that start or continue a missing keyword, a rollout finishes a keyword in progress, and the
//! score adds the answer's keyword standing (`keyword_boost` per keyword token written, less
//! `keyword_boost` per missing keyword once it ends); the keyword objective scores the lexicon's
//! heuristic. The forward tokens grow by a rollout per pulled token; without keywords nothing
//! changes. Once an expansion has every keyword and nothing else is weighed, no rollout can
//! change its reward: it is fed its token alone (for the row after it), not rolled out.

use std::borrow::Cow;
use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde_json::json;

use super::lexical::{Lexicon, State};
use super::objectives::{
    self, active_arms, answer_text, stop_at, Constraints, KeywordSpec, Objective, Scoring, Source,
};
use super::prompt::SharedPrompt;
use super::track::{Checkpoint, Rows, TrackId, Tracker};
use super::{finite, typed, within, Choice, Generation, Method, ParamError, Params};
use crate::engine::{Cx, Decoder, Event, FinishReason, Flow, Outputs, SeqId, Usage};
use crate::model::{Logits, ModelId, ModelInfo, Vocab, BASE};
use crate::reward::Registry;
use crate::sampling::{argmax, log_sum_exp, top_sorted, Constraint, Sampled};

/// Most tokens expanded per beam.
pub const MAX_TOP_K: usize = 16;
/// Most beams kept.
pub const MAX_BEAM_WIDTH: usize = 8;
/// Longest rollout.
pub const MAX_LOOKAHEAD: usize = 64;

/// `deal`: heuristic search over beams with lookahead rollouts.
#[derive(Debug, Clone, Copy)]
pub struct Deal;

/// `deal`'s parameters: the search's shape, the reward's weight λ and the rewards.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DealParams {
    #[serde(default = "default_top_k")]
    top_k: usize,
    #[serde(default = "default_beam_width")]
    beam_width: usize,
    #[serde(default = "default_lookahead")]
    lookahead: usize,
    #[serde(default = "default_lambda")]
    lambda: f64,
    #[serde(default)]
    rewards: BTreeMap<String, f64>,
    #[serde(default)]
    constraints: Constraints,
    #[serde(default = "default_prune")]
    prune: bool,
}

fn default_prune() -> bool {
    true
}

fn default_top_k() -> usize {
    4
}

fn default_beam_width() -> usize {
    2
}

fn default_lookahead() -> usize {
    8
}

fn default_lambda() -> f64 {
    1.0
}

impl Method for Deal {
    type Spec = DealSpec;

    fn name(&self) -> &'static str {
        "deal"
    }

    fn parse(&self, params: Params, rewards: &Registry) -> Result<DealSpec, ParamError> {
        let p: DealParams = typed(params)?;
        let lambda = finite("lambda", p.lambda)?;
        let top_k = within("top_k", p.top_k, 1, MAX_TOP_K)?;
        let beam_width = within("beam_width", p.beam_width, 1, MAX_BEAM_WIDTH)?;
        let lookahead = within("lookahead", p.lookahead, 0, MAX_LOOKAHEAD)?;
        let (objectives, keywords) =
            objectives::parse("deal", "steer by", p.rewards, p.constraints, rewards)?;
        Ok(DealSpec {
            top_k,
            beam_width,
            lookahead,
            lambda,
            objectives,
            keywords,
            prune: p.prune,
        })
    }

    fn models(&self, spec: &DealSpec) -> Vec<ModelId> {
        spec.arms().map(|(_, m)| m).collect()
    }

    /// DeAL searches among its own beams: one answer per request.
    fn check_choices(&self, _: &DealSpec, n: usize) -> Result<(), String> {
        if n == 1 {
            return Ok(());
        }
        Err(format!(
            "`n` must be 1 with the deal decoder (its beams are `alignment.beam_width`), got {n}"
        ))
    }

    fn build(
        &self,
        spec: &DealSpec,
        generation: Generation,
        models: &[ModelInfo],
    ) -> Result<Box<dyn Decoder>, ParamError> {
        let lexicon = (spec.keywords.as_ref()).and_then(|k| k.pull(&models[BASE].vocab));
        Ok(Box::new(DealDecoder::new(
            spec.clone(),
            generation,
            lexicon,
        )))
    }
}

/// Checked `deal` parameters.
#[derive(Debug, Clone)]
pub struct DealSpec {
    pub top_k: usize,
    pub beam_width: usize,
    pub lookahead: usize,
    /// Weight of the reward against the log-probability.
    pub lambda: f32,
    pub objectives: Vec<Objective>,
    pub keywords: Option<KeywordSpec>,
    /// Skip the rollouts of expansions that cannot be kept.
    pub prune: bool,
}

impl DealSpec {
    /// The reward models that change the scores, with their objective's index: one of weight 0
    /// (or every one, at `lambda` 0) costs no forward.
    pub fn arms(&self) -> impl Iterator<Item = (usize, ModelId)> + '_ {
        active_arms(&self.objectives, self.lambda)
    }
}

/// A kept partial (or finished) answer.
struct Beam {
    /// Cache of prompt + every token (None once finished).
    seq: Option<SeqId>,
    tokens: Vec<u32>,
    /// log π of each token.
    logps: Vec<f32>,
    score: f64,
    /// The candidate next tokens with their log-probs: the most likely, then the keywords'.
    next: Vec<(u32, f32)>,
    finished: Option<FinishReason>,
    /// The reward models' track along the answer (None once finished).
    arms: Option<TrackId>,
    /// Per reward model, Σ log π_r of the answer's tokens.
    arm_logps: Vec<f64>,
    /// Where the answer stands in the request's grammar (`response_format`).
    grammar: Option<Constraint>,
}

/// Beam `parent` plus `token`, being rolled out.
struct Expansion {
    parent: usize,
    token: u32,
    logp: f32,
    /// The standing of the parent's answer plus `token`.
    bonus: f64,
    /// No lookahead can change its reward (every keyword written, nothing else weighed): it
    /// is fed `token` alone, for the row after it.
    settled: bool,
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
    /// The reward models' track along the rollout, and where it stood after `token` (what a
    /// kept beam returns to).
    arms: Option<TrackId>,
    after_token: Option<Checkpoint>,
    /// Per reward model: Σ log π_r over the parent's tokens + `token`, and over the scored
    /// lookahead.
    arm_base: Vec<f64>,
    arm_rollout: Vec<f64>,
    /// In the request's grammar: the answer after `token` (a kept beam's), and the rollout's
    /// place after its lookahead.
    grammar: Option<Constraint>,
    rollout_grammar: Option<Constraint>,
}

pub struct DealDecoder {
    spec: DealSpec,
    scoring: Scoring,
    /// The keywords, when the request constrains them.
    lexicon: Option<Lexicon>,
    generation: Generation,
    prompt: SharedPrompt,
    /// The base prompt's sequence and logits, kept until every ARM has prefilled.
    first: Option<(SeqId, Vec<f32>)>,
    /// The active reward models, following the beams and rollouts.
    arms: Tracker,
    /// The objective of each of `arms`' lanes.
    arm_objectives: Vec<usize>,
    /// The answer: streams agreed tokens; holds the prompt's cache (beams are forks of it).
    choice: Option<Choice>,
    beams: Vec<Beam>,
    expansions: Vec<Expansion>,
    forward_tokens: usize,
    /// Tokens fed to the reward models after their prompts.
    arm_forward_tokens: usize,
    /// Rollouts skipped by pruning.
    pruned: usize,
}

/// The `k` most likely tokens of `allowed` (the row with tokens a grammar refuses at −∞) with
/// their log-probs under `logits` (the base's row), most likely first.
fn ranked(logits: &[f32], allowed: &[f32], k: usize) -> Vec<(u32, f32)> {
    let lse = log_sum_exp(logits);
    top_sorted(allowed, k)
        .into_iter()
        .filter(|&t| allowed[t as usize] > f32::NEG_INFINITY)
        .map(|t| (t, logits[t as usize] - lse))
        .collect()
}

/// `row` with the tokens `grammar` refuses next at −∞ (the row itself without a grammar).
fn allowed<'r>(row: &'r [f32], grammar: Option<&mut Constraint>) -> Cow<'r, [f32]> {
    match grammar {
        Some(g) => {
            let mut masked = row.to_vec();
            g.mask(&mut masked);
            Cow::Owned(masked)
        }
        None => Cow::Borrowed(row),
    }
}

impl DealDecoder {
    pub fn new(spec: DealSpec, generation: Generation, lexicon: Option<Lexicon>) -> Self {
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
            choice: None,
            beams: Vec::new(),
            expansions: Vec::new(),
            forward_tokens: 0,
            arm_forward_tokens: 0,
            pruned: 0,
        }
    }

    /// Where `tokens` (an answer, with any lookahead) stands with the keywords, when the
    /// request pulls toward them.
    fn keyword_state(&self, vocab: &Vocab, tokens: &[u32]) -> Option<State> {
        let lex = self.lexicon.as_ref()?;
        Some(lex.state(vocab, tokens, &answer_text(vocab, &self.generation, tokens)))
    }

    /// The candidates from the base's `row`: its `top_k` most likely tokens, then the tokens
    /// that start or continue a keyword the answer (standing at `keywords`) lacks, with their
    /// log-probs.
    fn candidates(
        &self,
        row: &[f32],
        allowed: &[f32],
        keywords: Option<&State>,
    ) -> Vec<(u32, f32)> {
        let mut next = ranked(row, allowed, self.spec.top_k);
        if let Some(state) = keywords {
            let lse = log_sum_exp(row);
            for t in state.pulled() {
                let ok = allowed
                    .get(t as usize)
                    .is_some_and(|&a| a > f32::NEG_INFINITY);
                if ok && next.iter().all(|&(n, _)| n != t) {
                    next.push((t, row[t as usize] - lse));
                }
            }
        }
        next
    }

    /// The keywords are the only objective that counts: once all are written, no rollout can
    /// change an answer's reward.
    fn keywords_alone(&self) -> bool {
        let Some(keyword) = self.spec.keywords.as_ref().and_then(|k| k.objective) else {
            return false;
        };
        (self.scoring.objectives().iter().enumerate()).all(|(i, o)| i == keyword || o.weight == 0.0)
    }

    /// The keyword objective's heuristic for `tokens` (an answer, with any lookahead) reading
    /// `text`, where the request has keywords.
    fn keyword_term(
        &self,
        vocab: &Vocab,
        tokens: &[u32],
        text: &str,
        ended: bool,
    ) -> Option<(usize, f32)> {
        let lex = self.lexicon.as_ref()?;
        let objective = self.spec.keywords.as_ref()?.objective?;
        Some((
            objective,
            lex.credit(&lex.state(vocab, tokens, text), ended),
        ))
    }

    /// The weighted reward of `text`, with each ARM's term from `arm_logps` and the keywords'
    /// heuristic `keywords` in place of their raw score, if given.
    fn reward(
        &self,
        text: &str,
        arm_logps: impl Iterator<Item = f64>,
        keywords: Option<(usize, f32)>,
    ) -> f64 {
        let mut terms = self.scoring.scores(text);
        for (&objective, logp) in self.arm_objectives.iter().zip(arm_logps) {
            terms[objective] = logp as f32;
        }
        if let Some((objective, credit)) = keywords {
            terms[objective] = credit;
        }
        self.scoring.combine(&terms)
    }

    /// The least and the most λ·R can be for an unfinished expansion whatever its rollout: per
    /// objective, its scorer's bounds (the keywords' heuristic, unended, lies in the keyword
    /// scorer's [0, 1] too), and a reward model's sum, which the rollout's log-probs can only
    /// lower, at most `arm_base`.
    fn reward_bounds(&self, arm_base: &[f64]) -> (f64, f64) {
        let lambda = f64::from(self.spec.lambda);
        let (mut lo, mut hi) = (0.0, 0.0);
        for (i, o) in self.scoring.objectives().iter().enumerate() {
            let (a, b) = match &o.source {
                Source::Text(s) => s
                    .bounds()
                    .map_or((f64::NEG_INFINITY, f64::INFINITY), |(a, b)| {
                        (f64::from(a), f64::from(b))
                    }),
                Source::Arm(_) => match self.arm_objectives.iter().position(|&x| x == i) {
                    Some(lane) => (f64::NEG_INFINITY, arm_base[lane]),
                    // Weighed by 0: no forward, no term.
                    None => (0.0, 0.0),
                },
            };
            let c = lambda * f64::from(o.weight);
            if c == 0.0 {
                continue;
            }
            let (x, y) = (c * a, c * b);
            lo += x.min(y);
            hi += x.max(y);
        }
        (lo, hi)
    }

    /// Drop the expansions that cannot be among the `beam_width` best, before their rollouts:
    /// their best case is below the `beam_width`-th best worst case of the others.
    fn prune(&mut self, cx: &Cx, expansions: &mut Vec<Expansion>) {
        let vocab = &cx.model(BASE).vocab;
        let g = &self.generation;
        let path = |e: &Expansion| {
            let parent = &self.beams[e.parent];
            let logp: f64 = parent.logps.iter().map(|&l| f64::from(l)).sum();
            logp + f64::from(e.logp) + e.bonus
        };
        let lambda = f64::from(self.spec.lambda);
        let bounds: Vec<(f64, f64)> = expansions
            .iter()
            .map(|e| match (e.finished, e.settled) {
                (Some(_), _) | (None, true) => {
                    // Exact: its answer is all there is to score, or all a rollout could add.
                    let mut tokens = self.beams[e.parent].tokens.clone();
                    tokens.push(e.token);
                    let text = answer_text(vocab, g, &tokens);
                    let kw = self.keyword_term(vocab, &tokens, &text, e.finished.is_some());
                    let s = path(e) + lambda * self.reward(&text, e.arm_base.iter().copied(), kw);
                    (s, s)
                }
                (None, false) => {
                    let (lo, hi) = self.reward_bounds(&e.arm_base);
                    (path(e) + lo, path(e) + hi)
                }
            })
            .collect();
        let mut floors: Vec<f64> = bounds.iter().map(|b| b.0).collect();
        floors.extend(
            self.beams
                .iter()
                .filter(|b| b.finished.is_some())
                .map(|b| b.score),
        );
        let b = self.spec.beam_width;
        if floors.len() <= b {
            return;
        }
        floors.sort_by(|x, y| y.total_cmp(x));
        let threshold = floors[b - 1];
        let mut i = 0;
        expansions.retain(|_| {
            let keep = bounds[i].1 >= threshold || bounds[i].1.is_nan();
            i += 1;
            keep
        });
        self.pruned += bounds.len() - expansions.len();
    }

    /// Expand every live beam by its top-k tokens, forking caches for the rollouts.
    fn expand(&mut self, cx: &mut Cx) -> Result<()> {
        let g = &self.generation;
        let vocab = &cx.model(BASE).vocab;
        let lanes = self.arms.lanes();
        let mut expansions = Vec::new();
        for (p, beam) in self.beams.iter().enumerate() {
            if beam.finished.is_some() {
                continue;
            }
            let seq = beam.seq.context("a live beam without its cache")?;
            let track = beam.arms.context("a live beam without its reward models")?;
            // An ARM with a shorter context ends the answer as the base's would.
            let room = cx.room(seq).min(self.arms.room(cx, track));
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
                let mut todo = match finished {
                    Some(_) => 0,
                    None => self.spec.lookahead.min(g.max_tokens - t).min(room).max(1),
                };
                let arm_base = (0..lanes)
                    .map(|l| {
                        let next = self.arms.next_logprob(track, l, token)?;
                        Ok(beam.arm_logps[l] + f64::from(next))
                    })
                    .collect::<Result<_>>()?;
                let (mut bonus, mut settled) = (0.0, false);
                if let Some(lex) = &self.lexicon {
                    let tokens = [beam.tokens.as_slice(), &[token]].concat();
                    let text = answer_text(vocab, g, &tokens);
                    let spent = match finished {
                        Some(_) => 1.0,
                        None => tokens.len() as f32 / g.max_tokens as f32,
                    };
                    let state = lex.state(vocab, &tokens, &text);
                    bonus = f64::from(lex.standing(&state, spent));
                    settled = finished.is_none() && state.missing() == 0 && self.keywords_alone();
                }
                let scored = match settled {
                    true => 0,
                    false => self.spec.lookahead.min(todo),
                };
                if settled {
                    todo = 1;
                }
                expansions.push(Expansion {
                    parent: p,
                    token,
                    logp,
                    bonus,
                    settled,
                    seq: None,
                    lookahead: Vec::new(),
                    scored,
                    todo,
                    next: Vec::new(),
                    finished,
                    ticket: None,
                    arms: None,
                    after_token: None,
                    arm_base,
                    arm_rollout: vec![0.0; lanes],
                    grammar: beam.grammar.clone().map(|mut g| {
                        g.commit(token);
                        g
                    }),
                    rollout_grammar: None,
                });
            }
        }
        if self.spec.prune {
            self.prune(cx, &mut expansions);
        }
        // Rollout caches: forks of the parent, the parent's own going to its last rollout.
        for (p, beam) in self.beams.iter_mut().enumerate() {
            let Some(seq) = beam.seq.take() else { continue };
            let track = beam
                .arms
                .take()
                .context("a live beam without its reward models")?;
            let rolling: Vec<usize> = (0..expansions.len())
                .filter(|&e| expansions[e].parent == p && expansions[e].todo > 0)
                .collect();
            match rolling.split_last() {
                None => {
                    cx.free(seq);
                    self.arms.free(cx, track);
                }
                Some((&last, rest)) => {
                    for &e in rest {
                        expansions[e].seq = Some(cx.fork(seq)?);
                        expansions[e].arms = Some(self.arms.fork(cx, track)?);
                    }
                    expansions[last].seq = Some(seq);
                    expansions[last].arms = Some(track);
                }
            }
        }
        // Each rollout's track counts its first token, as `arm_base` does.
        for e in &expansions {
            if let Some(track) = e.arms {
                self.arms.count(track, e.token)?;
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
            let read: Vec<u32> = (tokens.iter().chain(e.lookahead.iter().take(e.scored)))
                .copied()
                .collect();
            let text = answer_text(vocab, g, &read);
            let logp: f64 = logps.iter().map(|&l| f64::from(l)).sum();
            let rollout = e.arm_base.iter().zip(&e.arm_rollout).map(|(b, r)| b + r);
            let kw = self.keyword_term(vocab, &read, &text, e.finished.is_some());
            let score = logp + e.bonus + lambda * self.reward(&text, rollout, kw);
            let (seq, arms) = match e.finished {
                None => (e.seq, e.arms),
                Some(_) => {
                    if let Some(seq) = e.seq {
                        cx.free(seq);
                    }
                    if let Some(track) = e.arms {
                        self.arms.free(cx, track);
                    }
                    (None, None)
                }
            };
            // A beam's reward models stand after its last token, not after its rollout.
            if let (Some(track), Some(after)) = (arms, e.after_token) {
                self.arms.rewind(cx, track, after)?;
            }
            pool.push(Beam {
                seq,
                tokens,
                logps,
                score,
                next: e.next,
                finished: e.finished,
                arms,
                arm_logps: e.arm_base,
                grammar: e.grammar,
            });
        }
        pool.extend(old.into_iter().filter(|b| b.finished.is_some()));
        pool.sort_by(|a, b| b.score.total_cmp(&a.score));
        for dropped in pool.drain(self.spec.beam_width.min(pool.len())..) {
            if let Some(seq) = dropped.seq {
                cx.free(seq);
            }
            if let Some(track) = dropped.arms {
                self.arms.free(cx, track);
            }
        }
        for beam in &pool {
            if let Some(seq) = beam.seq {
                cx.truncate(seq, prompt + beam.tokens.len());
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
        let reward = self.reward(&text, winner.arm_logps.iter().copied(), None);
        let mut report = json!({
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
            "pruned": self.pruned,
        });
        if let Some(k) = &self.spec.keywords {
            report["keyword_boost"] = k.boost.into();
        }
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

impl Decoder for DealDecoder {
    fn plan(&mut self, cx: &mut Cx) -> Result<()> {
        if self.choice.is_none() {
            self.prompt.plan(cx)?;
            return self.arms.plan_prompts(cx);
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
            let track = e.arms.context("a rollout without its reward models")?;
            self.arms.feed(cx, track, &[feed])?;
            self.arm_forward_tokens += self.arms.lanes();
        }
        Ok(())
    }

    fn absorb(&mut self, cx: &mut Cx, out: &Outputs) -> Result<Flow> {
        if self.choice.is_none() {
            if let Some((seq, logits)) = self.prompt.absorb(cx, out)? {
                self.first = Some((seq, logits.to_vec()));
            }
            if !self.arms.absorb_prompts(cx, out)? || self.first.is_none() {
                return Ok(Flow::Continue);
            }
            let (seq, logits) = self.first.take().context("no base prompt")?;
            // The first beam takes the ARMs' prompt caches themselves.
            let arms = self.arms.branch(cx, 1)?[0];
            let keywords = self.keyword_state(&cx.model(BASE).vocab, &[]);
            let mut grammar = self.generation.sampling.grammar.as_ref().map(|g| g.start());
            let allowed = allowed(&logits, grammar.as_mut());
            let next = self.candidates(&logits, &allowed, keywords.as_ref());
            self.beams.push(Beam {
                seq: Some(cx.fork(seq)?),
                tokens: Vec::new(),
                logps: Vec::new(),
                score: 0.0,
                next,
                finished: None,
                arms: Some(arms),
                arm_logps: vec![0.0; self.arms.lanes()],
                grammar,
            });
            self.choice = Some(Choice::new(0, seq, &self.generation));
        } else {
            self.arms.absorb(cx, out)?;
            let vocab = cx.model(BASE).vocab.clone();
            let eog = &vocab.end_of_generation;
            let mut expansions = std::mem::take(&mut self.expansions);
            for e in &mut expansions {
                let Some(t) = e.ticket.take() else { continue };
                let row = out.last(t)?;
                let track = e.arms.context("a rollout without its reward models")?;
                let keywords = self.lexicon.is_some().then(|| {
                    let parent = &self.beams[e.parent].tokens;
                    let read = [parent.as_slice(), &[e.token], &e.lookahead].concat();
                    self.keyword_state(&vocab, &read)
                });
                let keywords = keywords.flatten();
                if e.lookahead.is_empty() {
                    e.rollout_grammar = e.grammar.clone();
                }
                let allowed = allowed(row, e.rollout_grammar.as_mut());
                if e.lookahead.is_empty() {
                    e.next = self.candidates(row, &allowed, keywords.as_ref());
                    e.after_token = Some(self.arms.checkpoint(cx, track)?);
                }
                // A rollout finishes a keyword in progress, so that its score sees it.
                let token = (keywords.as_ref())
                    .and_then(State::continuation)
                    .filter(|&t| {
                        allowed
                            .get(t as usize)
                            .is_some_and(|&a| a > f32::NEG_INFINITY)
                    })
                    .unwrap_or_else(|| argmax(&allowed));
                if let Some(g) = &mut e.rollout_grammar {
                    g.commit(token);
                }
                // Each ARM's row predicted the same token: its log-prob counts while scored.
                if e.lookahead.len() < e.scored {
                    for (l, sum) in e.arm_rollout.iter_mut().enumerate() {
                        *sum += f64::from(self.arms.next_logprob(track, l, token)?);
                    }
                }
                e.lookahead.push(token);
                e.todo -= 1;
                // A rollout that ends its answer has nothing more to say.
                if !self.generation.ignore_eos && eog.contains(&token) {
                    e.todo = 0;
                }
            }
            self.expansions = expansions;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::testing::{engine, generation, run};
    use crate::engine::fake::{self, id, FakeModel};
    use crate::model::Role;
    use crate::sampling::SamplingParams;
    use serde_json::json;

    #[test]
    fn the_search_costs_what_the_formula_says() {
        let e = engine(vec![FakeModel::counting()]);
        let mut g = generation(&[id("the")], 6, SamplingParams::greedy());
        g.ignore_eos = true;
        let (k, b, l, t) = (3usize, 2usize, 2usize, 6usize);
        // No keywords, so no expansion beyond the top-k; no pruning, so every rollout runs.
        let params = json!({"top_k": k, "beam_width": b, "lookahead": l, "prune": false,
            "constraints": {"max_words": 50}});
        let out = run(&e, "deal", params, g);
        let want: usize = (1..t)
            .map(|i| k * b.min(k.pow(i as u32 - 1)) * l.min(t - i).max(1))
            .sum();
        assert_eq!(out.report.unwrap()["forward_tokens"], want);
        assert_eq!(out.tokens[0].len(), t);
    }

    #[test]
    fn pruning_keeps_the_same_answer_for_fewer_rollouts() {
        let e = engine(vec![FakeModel::counting()]);
        let g = generation(&[id("the")], 8, SamplingParams::greedy());
        let search = |prune: bool| {
            let params = json!({"top_k": 4, "beam_width": 2, "lookahead": 3, "prune": prune,
                "constraints": {"keywords": ["sea", "park"]}});
            run(&e, "deal", params, g.clone())
        };
        let (full, pruned) = (search(false), search(true));
        assert_eq!(pruned.tokens, full.tokens);
        let (f, p) = (full.report.unwrap(), pruned.report.unwrap());
        assert_eq!(f["pruned"], 0);
        assert!(p["pruned"].as_u64().unwrap() > 0, "{p}");
        assert!(p["forward_tokens"].as_u64() < f["forward_tokens"].as_u64());
        assert_eq!(p["score"], f["score"]);
    }

    #[test]
    fn once_every_keyword_is_written_rollouts_stop() {
        let e = engine(vec![FakeModel::counting()]);
        let mut g = generation(&[id("the")], 6, SamplingParams::greedy());
        g.ignore_eos = true;
        let search = |constraints: serde_json::Value| {
            let params = json!({"top_k": 2, "beam_width": 2, "lookahead": 3, "prune": false,
                "constraints": constraints});
            run(&e, "deal", params, g.clone())
        };
        // `cat` follows `the`: written at once, it leaves nothing for a rollout to find.
        let settled = search(json!({"keywords": ["cat"]}));
        assert_eq!(settled.report.as_ref().unwrap()["reward"], 1.0);
        // With a word budget weighed too, every expansion rolls out.
        let rolled = search(json!({"keywords": ["cat"], "max_words": 50}));
        let forwards =
            |out: &fake::Streamed| out.report.as_ref().unwrap()["forward_tokens"].as_u64();
        assert!(
            forwards(&settled) < forwards(&rolled),
            "{:?}",
            settled.report
        );
    }

    #[test]
    fn a_keyword_outside_the_top_k_is_written() {
        let e = engine(vec![FakeModel::counting()]);
        let g = generation(&[id("the")], 5, SamplingParams::greedy());
        // Counting from `the` never ranks `blue` among its two most likely.
        let plain = run(&e, "sample", json!({}), g.clone());
        assert!(!plain.tokens[0].contains(&id("blue")));
        let kw = json!({"top_k": 2, "constraints": {"keywords": ["blue"]}});
        let out = run(&e, "deal", kw.clone(), g.clone());
        assert!(out.tokens[0].contains(&id("blue")), "{:?}", out.text);
        assert_eq!(out.report.unwrap()["reward"], 1.0);
        // Without a boost the search is as blind as before.
        let mut blind = kw;
        blind["constraints"]["keyword_boost"] = json!(0.0);
        let out = run(&e, "deal", blind, g);
        assert!(!out.tokens[0].contains(&id("blue")), "{:?}", out.text);
    }

    #[test]
    fn the_winner_carries_its_reward_models_sum_over_its_own_tokens() {
        // A context-dependent ARM: a beam's track must hold the answer, not a rollout.
        let row = |last: u32| fake::favour((last * 3 + 1) % fake::WORDS.len() as u32, 3.0);
        let arm = FakeModel::new("arm", Role::Reward, move |h| row(*h.last().unwrap()));
        let e = engine(vec![FakeModel::counting(), arm]);
        let prompt = [id("the")];
        let g = generation(&prompt, 5, SamplingParams::greedy());
        let params = json!({"top_k": 3, "beam_width": 2, "lookahead": 3, "rewards": {"arm": 1.0}});
        let out = run(&e, "deal", params, g);
        let mut last = prompt[0];
        let mut want = 0.0f64;
        for &y in &out.tokens[0] {
            let mut lp = row(last);
            crate::math::log_softmax(&mut lp);
            want += f64::from(lp[y as usize]);
            last = y;
        }
        let report = out.report.unwrap();
        let got = report["reward"].as_f64().unwrap();
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        assert_eq!(report["arm_forward_tokens"], report["forward_tokens"]);
    }

    #[test]
    fn deal_has_its_documented_defaults() {
        let rewards = Registry::new(&[]);
        let params = |v: serde_json::Value| v.as_object().cloned().unwrap();
        let kw = json!({"constraints": {"keywords": ["sea"]}});
        let d = Deal.parse(params(kw), &rewards).unwrap();
        assert_eq!(
            (d.top_k, d.beam_width, d.lookahead, d.lambda),
            (4, 2, 8, 1.0)
        );
        let e = Deal
            .parse(params(json!({"lookahead": 65})), &rewards)
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("lookahead"));
        assert!(d.prune);
        assert_eq!(
            d.keywords.unwrap().boost,
            crate::decode::lexical::DEFAULT_BOOST
        );
        for boost in [-1.0, 51.0] {
            let bad = json!({"constraints": {"keywords": ["sea"], "keyword_boost": boost}});
            let e = Deal.parse(params(bad), &rewards).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("constraints.keyword_boost"));
        }
        let alone = json!({"constraints": {"max_words": 3, "keyword_boost": 2.0}});
        let e = Deal.parse(params(alone), &rewards).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("constraints.keyword_boost"));
    }
}
