//! Equilibrium ranking (Jacob, Shen, Farina, Andreas, "The Consensus Game", ICLR 2024;
//! reference/algorithms.md §7): choose among candidate answers by making the model's generator
//! and discriminator agree.
//!
//! - The generator's initial policy comes from the model's likelihood of each candidate after
//!   the prompt framed as asking for a correct answer and for an incorrect one (`framing`), the
//!   discriminator's from its probability of judging each candidate correct rather than
//!   incorrect (`judge`). The framings are text appended to the rendered prompt: in a chat, the
//!   start of the assistant's turn (the model's own template); after a completions prompt, on a
//!   new line. Both are normalised as the paper does (over correctness values, then candidates;
//!   over candidates, then judgments).
//! - piKL no-regret dynamics then move both toward the regularised equilibrium (`Game`).
//! - The answer is the candidate ranked first by `rank_by`, verbatim.
//!
//! Candidates are given (`candidates`, multiple choice) or sampled from the base (`n`, one batch
//! sharing the prompt; texts equal after trimming merge). All scoring is prefill only, through
//! one token trie (`score`): the prompt is fed once for every framing and candidate.

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::genarm::{GenArmSpec, Guided, Sequences};
use super::score::Scorer;
use super::{typed, Generation, Method, ParamError, Params};
use crate::engine::{Cx, Decoder, Event, FinishReason, Flow, Outputs, TokenEvent, Usage};
use crate::model::{ModelInfo, Vocab, BASE};
use crate::reward::Registry;
use crate::sampling::TextStream;

/// Most candidates, given or sampled: the paper's multiple choice has up to 26 letters.
pub const MAX_CANDIDATES: usize = 26;
/// Most sampled candidates (as best-of-N's).
pub const MAX_SAMPLED: usize = 16;
/// Most iterations of the dynamics (each costs O(candidates)).
pub const MAX_ITERATIONS: usize = 100_000;

/// `equilibrium`: rank candidate answers by the consensus game.
#[derive(Debug, Clone, Copy)]
pub struct Equilibrium;

/// What decides the answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RankBy {
    /// The equilibrium discriminator's P(correct | x, y): the paper's headline MMLU and ARC
    /// figures are ER-D's, so it is the default.
    #[default]
    ErD,
    /// The equilibrium generator's π(y | x, correct).
    ErG,
    /// The model's own likelihood of y after the correct framing (generative ranking, G).
    Generator,
    /// The model's own P(correct | x, y) (discriminative ranking, D).
    Discriminator,
}

impl RankBy {
    fn name(self) -> &'static str {
        match self {
            Self::ErD => "er_d",
            Self::ErG => "er_g",
            Self::Generator => "generator",
            Self::Discriminator => "discriminator",
        }
    }
}

/// The ranking's parameters, shared with best-of-N's `selection: "equilibrium"`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankParams {
    #[serde(default)]
    rank_by: RankBy,
    lambda_g: Option<f64>,
    lambda_d: Option<f64>,
    eta_g: Option<f64>,
    eta_d: Option<f64>,
    iterations: Option<usize>,
    tolerance: Option<f64>,
    #[serde(default)]
    framing: FramingParams,
    #[serde(default)]
    judge: JudgeParams,
}

/// What follows the prompt when the generator is asked for a correct or an incorrect answer.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FramingParams {
    correct: String,
    incorrect: String,
}

impl Default for FramingParams {
    fn default() -> Self {
        Self {
            correct: "Answer:".into(),
            incorrect: "Incorrect answer:".into(),
        }
    }
}

/// What follows the prompt when the model judges a candidate (`{answer}` stands for it), and
/// the two judgments compared.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct JudgeParams {
    prompt: String,
    correct: String,
    incorrect: String,
}

impl Default for JudgeParams {
    fn default() -> Self {
        Self {
            prompt: "Proposed answer: {answer}\nVerdict: this answer is".into(),
            correct: " correct".into(),
            incorrect: " incorrect".into(),
        }
    }
}

/// The regularised game and its dynamics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Game {
    pub lambda_g: f64,
    pub lambda_d: f64,
    pub eta_g: f64,
    pub eta_d: f64,
    pub iterations: usize,
    /// Stop once no probability moves by more than this in an iteration (0: run them all).
    pub tolerance: f64,
}

/// Checked ranking parameters.
#[derive(Debug, Clone)]
pub struct RankSpec {
    pub rank_by: RankBy,
    pub game: Game,
    framing: [String; 2],
    judge: String,
    judgments: [String; 2],
}

impl RankSpec {
    /// `params` checked; errors name parameters under `prefix`.
    pub fn parse(prefix: &str, p: RankParams) -> Result<Self, ParamError> {
        let real = |name: &str, v: Option<f64>, default: f64, lo: f64, hi: f64, open: bool| {
            let v = v.unwrap_or(default);
            let above = if open { v > lo } else { v >= lo };
            if above && v <= hi {
                return Ok(v);
            }
            let bracket = if open { "(" } else { "[" };
            Err(ParamError::new(
                format!("{prefix}{name}"),
                format!("`{name}` must be in {bracket}{lo}, {hi}], got {v}"),
            ))
        };
        let iterations = p.iterations.unwrap_or(5000);
        if !(1..=MAX_ITERATIONS).contains(&iterations) {
            return Err(ParamError::new(
                format!("{prefix}iterations"),
                format!("`iterations` must be between 1 and {MAX_ITERATIONS}, got {iterations}"),
            ));
        }
        let game = Game {
            lambda_g: real("lambda_g", p.lambda_g, 0.1, 0.0, 100.0, false)?,
            lambda_d: real("lambda_d", p.lambda_d, 0.1, 0.0, 100.0, false)?,
            eta_g: real("eta_g", p.eta_g, 0.1, 0.0, 100.0, true)?,
            eta_d: real("eta_d", p.eta_d, 0.1, 0.0, 100.0, true)?,
            iterations,
            tolerance: real("tolerance", p.tolerance, 1e-7, 0.0, 1.0, false)?,
        };
        let text = |name: &str, v: &str| {
            if v.trim().is_empty() {
                return Err(ParamError::new(
                    format!("{prefix}{name}"),
                    format!("`{name}` must not be blank"),
                ));
            }
            Ok(v.to_string())
        };
        let framing = [
            text("framing.correct", &p.framing.correct)?,
            text("framing.incorrect", &p.framing.incorrect)?,
        ];
        let judgments = [
            text("judge.correct", &p.judge.correct)?,
            text("judge.incorrect", &p.judge.incorrect)?,
        ];
        if framing[0] == framing[1] || judgments[0] == judgments[1] {
            let which = if framing[0] == framing[1] {
                "framing"
            } else {
                "judge"
            };
            return Err(ParamError::new(
                format!("{prefix}{which}"),
                format!("`{which}.correct` and `{which}.incorrect` must differ"),
            ));
        }
        let judge = text("judge.prompt", &p.judge.prompt)?;
        if !judge.contains("{answer}") {
            return Err(ParamError::new(
                format!("{prefix}judge.prompt"),
                "`judge.prompt` must contain `{answer}`, where the candidate goes",
            ));
        }
        Ok(Self {
            rank_by: p.rank_by,
            game,
            framing,
            judge,
            judgments,
        })
    }
}

/// The candidates of a request.
#[derive(Debug, Clone)]
pub enum Candidates {
    /// Given: distinct after trimming, in the request's order.
    Given(Vec<String>),
    /// Sampled from the base, this many.
    Sampled(usize),
}

/// Checked `equilibrium` parameters.
#[derive(Debug, Clone)]
pub struct EquilibriumSpec {
    pub candidates: Candidates,
    pub rank: RankSpec,
}

impl Method for Equilibrium {
    type Spec = EquilibriumSpec;

    fn name(&self) -> &'static str {
        "equilibrium"
    }

    fn check_grammar(&self, spec: &EquilibriumSpec) -> Result<(), String> {
        match spec.candidates {
            Candidates::Given(_) => Err("given candidates are not generated, so no `response_format` can shape them; sample the candidates with `n`".into()),
            Candidates::Sampled(_) => Ok(()),
        }
    }

    fn parse(&self, mut params: Params, _: &Registry) -> Result<EquilibriumSpec, ParamError> {
        let given = params.remove("candidates");
        let n = params.remove("n");
        let rank = RankSpec::parse("", typed(params)?)?;
        let candidates = match (given, n) {
            (Some(_), Some(_)) => {
                return Err(ParamError::new(
                    "n",
                    "give `candidates` or `n` (candidates to sample), not both",
                ))
            }
            (Some(given), None) => Candidates::Given(given_candidates(given)?),
            (None, Some(n)) => {
                let n = serde_json::from_value::<usize>(n)
                    .ok()
                    .filter(|n| (2..=MAX_SAMPLED).contains(n))
                    .ok_or_else(|| {
                        ParamError::new("n", format!("`n` must be between 2 and {MAX_SAMPLED}"))
                    })?;
                Candidates::Sampled(n)
            }
            (None, None) => {
                return Err(ParamError::new(
                    "candidates",
                    "equilibrium needs `candidates` to rank, or `n` candidates to sample",
                ))
            }
        };
        Ok(EquilibriumSpec { candidates, rank })
    }

    fn check_choices(&self, _: &EquilibriumSpec, n: usize) -> Result<(), String> {
        if n == 1 {
            return Ok(());
        }
        Err(format!(
            "`n` must be 1 with the equilibrium decoder (its candidates are `alignment.candidates` or `alignment.n`), got {n}"
        ))
    }

    fn build(
        &self,
        spec: &EquilibriumSpec,
        generation: Generation,
        models: &[ModelInfo],
    ) -> Result<Box<dyn Decoder>, ParamError> {
        let base = &models[BASE];
        let phase = match &spec.candidates {
            Candidates::Given(texts) => {
                if generation.sampling.logprobs.is_some() {
                    return Err(ParamError::new(
                        "candidates",
                        "given candidates are not generated, so they have no `logprobs`; drop `logprobs` or sample candidates with `n`",
                    ));
                }
                let ranking =
                    Ranking::new(&base.vocab, base, &generation.prompt, texts, &spec.rank)
                        .map_err(|why| ParamError::new("candidates", why))?;
                Phase::Ranking {
                    ranking,
                    texts: texts.clone(),
                    held: None,
                }
            }
            Candidates::Sampled(n) => Phase::Sampling(Guided::new(
                &GenArmSpec::none(),
                &generation,
                Sequences::Candidates {
                    groups: 1,
                    per_group: *n,
                },
                &base.vocab,
            )),
        };
        Ok(Box::new(EquilibriumDecoder {
            spec: spec.clone(),
            generation,
            phase,
            generated: 0,
        }))
    }
}

fn given_candidates(value: Value) -> Result<Vec<String>, ParamError> {
    let invalid = |m: String| ParamError::new("candidates", m);
    let texts: Vec<String> = serde_json::from_value(value)
        .map_err(|_| invalid("`candidates` must be a list of strings".into()))?;
    if texts.iter().any(|t| t.trim().is_empty()) {
        return Err(invalid("`candidates` must not hold blank answers".into()));
    }
    let distinct = dedup(&texts).len();
    if !(2..=MAX_CANDIDATES).contains(&distinct) {
        return Err(invalid(format!(
            "`candidates` must hold between 2 and {MAX_CANDIDATES} distinct answers, got {distinct}"
        )));
    }
    Ok(dedup(&texts)
        .into_iter()
        .map(|i| texts[i].clone())
        .collect())
}

/// The first index of each text that is distinct after trimming, in order.
pub(crate) fn dedup(texts: &[String]) -> Vec<usize> {
    let mut firsts: Vec<usize> = Vec::new();
    for (i, t) in texts.iter().enumerate() {
        if !firsts.iter().any(|&f| texts[f].trim() == t.trim()) {
            firsts.push(i);
        }
    }
    firsts
}

/// The equilibrium of the game from both players' initial policies.
#[derive(Debug, Clone, PartialEq)]
pub struct Solved {
    /// π_G(y | x, v): `g[0]` for v = correct, `g[1]` incorrect.
    pub g: [Vec<f64>; 2],
    /// π_D(v | x, y): `d[y][0]` correct, `d[y][1]` incorrect.
    pub d: Vec<[f64; 2]>,
    pub iterations: usize,
    /// The largest move of any probability in the last iteration.
    pub change: f64,
}

/// A softmax of `x` in place.
fn softmax(x: &mut [f64]) {
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut total = 0.0;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        total += *v;
    }
    for v in x.iter_mut() {
        *v /= total;
    }
}

fn lse(x: &[f64]) -> f64 {
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !m.is_finite() {
        return m;
    }
    m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
}

/// The initial policies (as log-probabilities) from the model's log-likelihoods: `gen[v][y]` =
/// log P(y | x, v), `judged[y][v]` = log P(v | x, y) (renormalised here over the two
/// judgments). Normalised as the paper does: the generator over v then over y, the
/// discriminator over y then over v.
pub fn initial(gen: &[Vec<f64>; 2], judged: &[[f64; 2]]) -> ([Vec<f64>; 2], Vec<[f64; 2]>) {
    let ys = judged.len();
    let mut g: [Vec<f64>; 2] = [vec![0.0; ys], vec![0.0; ys]];
    for y in 0..ys {
        let z = lse(&[gen[0][y], gen[1][y]]);
        for v in 0..2 {
            g[v][y] = gen[v][y] - z;
        }
    }
    for row in &mut g {
        let z = lse(row);
        row.iter_mut().for_each(|l| *l -= z);
    }
    let mut d: Vec<[f64; 2]> = judged
        .iter()
        .map(|j| {
            let z = lse(j);
            [j[0] - z, j[1] - z]
        })
        .collect();
    for v in 0..2 {
        let column: Vec<f64> = d.iter().map(|r| r[v]).collect();
        let z = lse(&column);
        d.iter_mut().for_each(|r| r[v] -= z);
    }
    for r in &mut d {
        let z = lse(r);
        r[0] -= z;
        r[1] -= z;
    }
    (g, d)
}

impl Game {
    /// piKL-Hedge from the initial log-policies `log_g`, `log_d` (§7.5): each player's payoff
    /// averaged over the iterations so far, regularised toward its initial policy.
    pub fn solve(&self, log_g: &[Vec<f64>; 2], log_d: &[[f64; 2]]) -> Solved {
        let ys = log_d.len();
        let exp = |l: &[f64]| l.iter().map(|v| v.exp()).collect::<Vec<f64>>();
        let mut g = [exp(&log_g[0]), exp(&log_g[1])];
        let mut d: Vec<[f64; 2]> = log_d.iter().map(|r| [r[0].exp(), r[1].exp()]).collect();
        let mut qg = [vec![0.0; ys], vec![0.0; ys]];
        let mut qd = vec![[0.0; 2]; ys];
        // λ·log π⁽¹⁾, with λ = 0 meaning no pull at all (not 0·(−∞)).
        let pull = |lambda: f64, l: f64| if lambda > 0.0 { lambda * l } else { 0.0 };
        let (mut change, mut t) = (f64::INFINITY, 0);
        while t < self.iterations && change > self.tolerance {
            t += 1;
            let step = 1.0 / t as f64;
            for y in 0..ys {
                for v in 0..2 {
                    qg[v][y] += (0.5 * d[y][v] - qg[v][y]) * step;
                    qd[y][v] += (0.5 * g[v][y] - qd[y][v]) * step;
                }
            }
            change = 0.0;
            let scale_g = 1.0 / (1.0 / (self.eta_g * t as f64) + self.lambda_g);
            for v in 0..2 {
                let mut next: Vec<f64> = (0..ys)
                    .map(|y| (qg[v][y] + pull(self.lambda_g, log_g[v][y])) * scale_g)
                    .collect();
                softmax(&mut next);
                for (old, new) in g[v].iter_mut().zip(next) {
                    change = change.max((new - *old).abs());
                    *old = new;
                }
            }
            let scale_d = 1.0 / (1.0 / (self.eta_d * t as f64) + self.lambda_d);
            for y in 0..ys {
                let mut next: Vec<f64> = (0..2)
                    .map(|v| (qd[y][v] + pull(self.lambda_d, log_d[y][v])) * scale_d)
                    .collect();
                softmax(&mut next);
                for v in 0..2 {
                    change = change.max((next[v] - d[y][v]).abs());
                    d[y][v] = next[v];
                }
            }
        }
        Solved {
            g,
            d,
            iterations: t,
            change,
        }
    }
}

/// Scoring a set of candidate answers under both players, then the game: what both
/// `equilibrium` and best-of-N's `selection: "equilibrium"` run.
pub(crate) struct Ranking {
    scorer: Scorer,
    candidates: usize,
    spec: RankSpec,
}

/// A finished ranking.
pub(crate) struct Ranked {
    /// The candidate ranked first.
    pub chosen: usize,
    pub report: Value,
}

impl Ranking {
    /// Score `candidates` after `prompt` (base tokens) on `model`. Errs when a framed candidate
    /// would not fit the model's context.
    pub fn new(
        vocab: &Vocab,
        model: &ModelInfo,
        prompt: &[u32],
        candidates: &[String],
        spec: &RankSpec,
    ) -> Result<Self, String> {
        // A framing starts on a new line, unless the prompt already ends with white space
        // (a chat template's open assistant turn does).
        let ends_open = prompt
            .last()
            .and_then(|&t| vocab.bytes(t).last())
            .is_some_and(|b| b.is_ascii_whitespace());
        let sep = if ends_open { "" } else { "\n" };
        let encode = |text: &str| {
            vocab
                .encode(text, false)
                .map_err(|e| format!("tokenizing a framing: {e:#}"))
        };
        let context = |framing: &str| -> Result<Vec<u32>, String> {
            Ok([prompt, &encode(&format!("{sep}{framing}"))?].concat())
        };
        let answers = candidates
            .iter()
            .map(|c| encode(&format!(" {}", c.trim())))
            .collect::<Result<Vec<_>, _>>()?;
        let mut items = Vec::with_capacity(4 * candidates.len());
        for framing in &spec.framing {
            let framed = context(framing)?;
            items.extend(answers.iter().map(|a| (framed.clone(), a.clone())));
        }
        let judgments = [encode(&spec.judgments[0])?, encode(&spec.judgments[1])?];
        for c in candidates {
            let judged = context(&spec.judge.replace("{answer}", c.trim()))?;
            items.extend(judgments.iter().map(|j| (judged.clone(), j.clone())));
        }
        let longest = items
            .iter()
            .map(|(c, y)| c.len() + y.len())
            .max()
            .unwrap_or(0);
        if longest > model.context_length() {
            return Err(format!(
                "a framed candidate needs {longest} tokens; the model's context holds {}",
                model.context_length()
            ));
        }
        Ok(Self {
            scorer: Scorer::new(BASE, items).map_err(|e| e.to_string())?,
            candidates: candidates.len(),
            spec: spec.clone(),
        })
    }

    pub fn plan(&mut self, cx: &mut Cx) -> Result<()> {
        self.scorer.plan(cx)
    }

    /// True once every candidate is scored.
    pub fn absorb(&mut self, cx: &mut Cx, out: &Outputs) -> Result<bool> {
        self.scorer.absorb(cx, out)
    }

    /// Play the game and rank (once `absorb` is done).
    pub fn rank(&self, texts: &[String]) -> Ranked {
        let ys = self.candidates;
        let gen: [Vec<f64>; 2] =
            [0, 1].map(|v| (0..ys).map(|y| self.scorer.total(v * ys + y)).collect());
        let judged: Vec<[f64; 2]> = (0..ys)
            .map(|y| [0, 1].map(|j| self.scorer.total(2 * ys + 2 * y + j)))
            .collect();
        let (log_g, log_d) = initial(&gen, &judged);
        let solved = self.spec.game.solve(&log_g, &log_d);
        // The plain rankings: the model's own likelihoods, made distributions.
        let mut generator = gen[0].clone();
        softmax(&mut generator);
        let discriminator: Vec<f64> = judged.iter().map(|j| (j[0] - lse(j)).exp()).collect();
        let score = |y: usize| match self.spec.rank_by {
            RankBy::ErD => solved.d[y][0],
            RankBy::ErG => solved.g[0][y],
            RankBy::Generator => generator[y],
            RankBy::Discriminator => discriminator[y],
        };
        let chosen = (0..ys).fold(0, |b, y| if score(y) > score(b) { y } else { b });
        let candidates: Vec<Value> = (0..ys)
            .map(|y| {
                json!({
                    "text": texts[y],
                    "log_likelihood": {"correct": gen[0][y], "incorrect": gen[1][y]},
                    "generator": generator[y],
                    "discriminator": discriminator[y],
                    "initial": {"generator": log_g[0][y].exp(), "discriminator": log_d[y][0].exp()},
                    "equilibrium": {"generator": solved.g[0][y], "discriminator": solved.d[y][0]},
                })
            })
            .collect();
        let game = &self.spec.game;
        let report = json!({
            "rank_by": self.spec.rank_by.name(),
            "chosen": chosen,
            "candidates": candidates,
            "iterations": solved.iterations,
            "change": solved.change,
            "lambda_g": game.lambda_g,
            "lambda_d": game.lambda_d,
            "eta_g": game.eta_g,
            "eta_d": game.eta_d,
            "scored_tokens": self.scorer.fed_tokens(),
        });
        Ranked { chosen, report }
    }
}

#[allow(clippy::large_enum_variant)] // one per request, moved once
enum Phase {
    /// Sampling the candidates.
    Sampling(Guided),
    /// Scoring them; `held` are the sampled candidates' events.
    Ranking {
        ranking: Ranking,
        texts: Vec<String>,
        held: Option<Vec<Vec<Event>>>,
    },
}

pub struct EquilibriumDecoder {
    spec: EquilibriumSpec,
    generation: Generation,
    phase: Phase,
    /// Tokens sampled for the candidates.
    generated: usize,
}

impl EquilibriumDecoder {
    /// The sampled candidates are done: their distinct texts go to the ranking.
    fn rank_samples(&mut self, cx: &mut Cx) -> Result<()> {
        let Phase::Sampling(guided) = &mut self.phase else {
            return Ok(());
        };
        let held: Vec<Vec<Event>> = guided.choices_mut().map(|c| c.take_held()).collect();
        self.generated = guided.choices().map(|c| c.tokens.len()).sum();
        let all: Vec<String> = held.iter().map(|e| super::best_of_n::text(e)).collect();
        let firsts = dedup(&all);
        // Blank answers cannot be ranked; if every one is blank, the first stands alone.
        let firsts: Vec<usize> = match firsts
            .iter()
            .copied()
            .filter(|&i| !all[i].trim().is_empty())
            .collect::<Vec<_>>()
        {
            kept if !kept.is_empty() => kept,
            _ => vec![0],
        };
        let texts: Vec<String> = firsts.iter().map(|&i| all[i].clone()).collect();
        let mut held: Vec<Option<Vec<Event>>> = held.into_iter().map(Some).collect();
        let held = firsts
            .iter()
            .map(|&i| held[i].take().unwrap_or_default())
            .collect();
        let base = cx.model(BASE);
        let ranking = Ranking::new(
            &base.vocab,
            base,
            &self.generation.prompt,
            &texts,
            &self.spec.rank,
        )
        .map_err(anyhow::Error::msg)?;
        self.phase = Phase::Ranking {
            ranking,
            texts,
            held: Some(held),
        };
        Ok(())
    }

    /// Stream the chosen candidate and report.
    fn finish(&mut self, cx: &mut Cx) -> Result<()> {
        let Phase::Ranking {
            ranking,
            texts,
            held,
        } = &mut self.phase
        else {
            anyhow::bail!("finishing before the ranking");
        };
        let ranked = ranking.rank(texts);
        let completion = match held {
            Some(held) => {
                let events = std::mem::take(&mut held[ranked.chosen]);
                for e in events {
                    cx.emit(e);
                }
                self.generated
            }
            None => emit_text(cx, &texts[ranked.chosen])?,
        };
        let mut report = ranked.report;
        report["sampled"] = held.is_some().into();
        cx.emit(Event::Done {
            usage: Usage {
                prompt_tokens: self.generation.prompt.len(),
                completion_tokens: completion,
            },
            report: Some(report),
        });
        Ok(())
    }
}

/// Stream `text` as the answer (its base tokens, one event each); returns how many.
fn emit_text(cx: &mut Cx, text: &str) -> Result<usize> {
    let vocab = &cx.model(BASE).vocab;
    let tokens = vocab.encode(text, false).context("tokenizing the answer")?;
    let mut stream = TextStream::new(Vec::new());
    let events: Vec<Event> = tokens
        .iter()
        .map(|&token| {
            Event::Token(TokenEvent {
                choice: 0,
                token,
                text: stream.push(vocab.bytes(token)).text,
                logprob: None,
                top: Vec::new(),
            })
        })
        .collect();
    for e in events {
        cx.emit(e);
    }
    cx.emit(Event::Finished {
        choice: 0,
        reason: FinishReason::Stop,
        text: stream.finish(),
    });
    Ok(tokens.len())
}

impl Decoder for EquilibriumDecoder {
    fn plan(&mut self, cx: &mut Cx) -> Result<()> {
        match &mut self.phase {
            Phase::Sampling(guided) => guided.plan(cx),
            Phase::Ranking { ranking, .. } => ranking.plan(cx),
        }
    }

    fn absorb(&mut self, cx: &mut Cx, out: &Outputs) -> Result<Flow> {
        let scored = match &mut self.phase {
            Phase::Sampling(guided) => {
                if guided.absorb(cx, out, &self.generation)? {
                    self.rank_samples(cx)?;
                }
                false
            }
            Phase::Ranking { ranking, .. } => ranking.absorb(cx, out)?,
        };
        if !scored {
            return Ok(Flow::Continue);
        }
        self.finish(cx)?;
        Ok(Flow::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::testing::{engine, generation, run, seeded, spec};
    use crate::engine::fake::{self, id, FakeModel};
    use crate::model::Role;
    use crate::sampling::SamplingParams;

    fn logs(rows: &[&[f64]]) -> Vec<Vec<f64>> {
        rows.iter()
            .map(|r| r.iter().map(|p| p.ln()).collect())
            .collect()
    }

    const PAPER: Game = Game {
        lambda_g: 0.1,
        lambda_d: 0.1,
        eta_g: 0.1,
        eta_d: 0.1,
        iterations: 5000,
        tolerance: 1e-7,
    };

    #[test]
    fn one_iteration_matches_the_update_worked_by_hand() {
        let g = logs(&[&[0.8, 0.2], &[0.3, 0.7]]);
        let log_g = [g[0].clone(), g[1].clone()];
        let d = logs(&[&[0.6, 0.4], &[0.1, 0.9]]);
        let log_d: Vec<[f64; 2]> = d.iter().map(|r| [r[0], r[1]]).collect();
        let one = Game {
            iterations: 1,
            tolerance: 0.0,
            ..PAPER
        };
        let solved = one.solve(&log_g, &log_d);
        // t = 1: Q_G[v][y] = ½·π_D(v|y), Q_D[y][v] = ½·π_G(y|v); then each policy is the
        // softmax of (Q + λ·log π⁽¹⁾) / (1/(η·1) + λ) = … / 10.1.
        let pair = |a: f64, b: f64| {
            let (ea, eb) = ((a / 10.1).exp(), (b / 10.1).exp());
            [ea / (ea + eb), eb / (ea + eb)]
        };
        let l = f64::ln;
        let g0 = pair(0.5 * 0.6 + 0.1 * l(0.8), 0.5 * 0.1 + 0.1 * l(0.2));
        let g1 = pair(0.5 * 0.4 + 0.1 * l(0.3), 0.5 * 0.9 + 0.1 * l(0.7));
        let d0 = pair(0.5 * 0.8 + 0.1 * l(0.6), 0.5 * 0.3 + 0.1 * l(0.4));
        let d1 = pair(0.5 * 0.2 + 0.1 * l(0.1), 0.5 * 0.7 + 0.1 * l(0.9));
        let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12);
        assert!(
            close(&solved.g[0], &g0) && close(&solved.g[1], &g1),
            "{solved:?}"
        );
        assert!(
            close(&solved.d[0], &d0) && close(&solved.d[1], &d1),
            "{solved:?}"
        );
        assert_eq!(solved.iterations, 1);
    }

    #[test]
    fn the_dynamics_converge_below_the_tolerance() {
        let gen = [vec![-1.0, -2.0, -0.5, -3.0], vec![-2.0, -0.7, -1.5, -1.0]];
        let judged = [[-0.2, -1.8], [-1.0, -0.5], [-0.7, -0.7], [-2.5, -0.1]];
        let (log_g, log_d) = initial(&gen, &judged);
        let loose = Game {
            tolerance: 1e-5,
            ..PAPER
        };
        let early = loose.solve(&log_g, &log_d);
        assert!(early.change <= loose.tolerance, "{}", early.change);
        assert!(early.iterations < PAPER.iterations, "{}", early.iterations);
        for row in &early.g {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        }
        // The paper's 5000 iterations move the policies far less, and no further than the
        // early stop's tolerance allows.
        let all = PAPER.solve(&log_g, &log_d);
        assert!(all.change < 1e-5, "{}", all.change);
        for (a, b) in all.g[0].iter().zip(&early.g[0]) {
            assert!((a - b).abs() < 1e-2, "{a} vs {b}");
        }
    }

    #[test]
    fn candidate_order_does_not_change_the_equilibrium() {
        let gen = [vec![-1.0, -2.0, -0.5, -3.0], vec![-2.0, -0.7, -1.5, -1.0]];
        let judged = [[-0.2, -1.8], [-1.0, -0.5], [-0.7, -0.7], [-2.5, -0.1]];
        let order = [2, 0, 3, 1];
        let gen_p = [0, 1].map(|v| order.iter().map(|&y| gen[v][y]).collect::<Vec<_>>());
        let judged_p: Vec<[f64; 2]> = order.iter().map(|&y| judged[y]).collect();
        let a = {
            let (g, d) = initial(&gen, &judged);
            PAPER.solve(&g, &d)
        };
        let b = {
            let (g, d) = initial(&gen_p, &judged_p);
            PAPER.solve(&g, &d)
        };
        for (i, &y) in order.iter().enumerate() {
            assert!((a.g[0][y] - b.g[0][i]).abs() < 1e-12);
            assert!((a.d[y][0] - b.d[i][0]).abs() < 1e-12);
        }
    }

    /// A base that knows: after `the` (the correct framing) `cat`, after `a` (the incorrect
    /// one) `dog`; asked to judge `X sat on`, it says `happy` of the cat and `sad` of the dog.
    fn knowing() -> FakeModel {
        FakeModel::new("knows", Role::Base, |h| {
            let n = h.len();
            match h {
                [.., t] if *t == id("the") => fake::favour(id("cat"), 4.0),
                [.., t] if *t == id("a") => fake::favour(id("dog"), 4.0),
                [.., x, s, o] if *s == id("sat") && *o == id("on") => {
                    let judged = if *x == id("cat") { "happy" } else { "sad" };
                    fake::favour(id(judged), 3.0)
                }
                _ => fake::counting(&h[n.saturating_sub(1)..]),
            }
        })
    }

    fn framed(candidates: &[&str], rank_by: &str) -> Value {
        json!({
            "candidates": candidates,
            "rank_by": rank_by,
            "framing": {"correct": "the", "incorrect": "a"},
            "judge": {"prompt": "{answer} sat on", "correct": " happy", "incorrect": " sad"},
        })
    }

    #[test]
    fn when_generator_and_discriminator_agree_every_ranking_picks_their_answer() {
        let e = engine(vec![knowing()]);
        let g = generation(&[id("big"), id("red")], 8, SamplingParams::greedy());
        for rank_by in ["er_d", "er_g", "generator", "discriminator"] {
            // `" cat "` is `cat` again, merged; the answer is the first, verbatim.
            let params = framed(&["dog", "cat", " cat "], rank_by);
            let out = run(&e, "equilibrium", params, g.clone());
            // The fake writes every word with a leading space.
            assert_eq!(out.text, [" cat"], "{rank_by}");
            assert_eq!(out.finish, [Some(FinishReason::Stop)]);
            let report = out.report.unwrap();
            assert_eq!(report["chosen"], 1);
            assert_eq!(report["candidates"].as_array().unwrap().len(), 2);
            let cat = &report["candidates"][1];
            for player in ["generator", "discriminator"] {
                assert!(
                    cat["equilibrium"][player].as_f64().unwrap() > 0.5,
                    "{report}"
                );
            }
        }
        // The other order ranks the same.
        let out = run(&e, "equilibrium", framed(&["cat", "dog"], "er_d"), g);
        let report = out.report.unwrap();
        assert_eq!(
            (out.text[0].as_str(), report["chosen"].as_u64()),
            (" cat", Some(0))
        );
    }

    #[test]
    fn sampled_candidates_are_ranked_and_the_chosen_one_streams() {
        let e = engine(vec![knowing()]);
        let g = generation(&[id("big")], 3, seeded(4));
        let mut params = framed(&[], "er_d");
        params.as_object_mut().unwrap().remove("candidates");
        params["n"] = json!(4);
        let out = run(&e, "equilibrium", params, g);
        let report = out.report.unwrap();
        assert_eq!(report["sampled"], true);
        let chosen = report["chosen"].as_u64().unwrap() as usize;
        assert_eq!(
            report["candidates"][chosen]["text"].as_str(),
            Some(out.text[0].as_str())
        );
        assert_eq!(out.usage.unwrap().completion_tokens, 4 * 3);
    }

    #[test]
    fn bad_parameters_name_themselves() {
        let e = engine(vec![knowing()]);
        let param = |v: Value| {
            let params = v.as_object().cloned().unwrap();
            Equilibrium
                .parse(params, e.rewards())
                .unwrap_err()
                .param
                .unwrap()
        };
        for bad in [
            json!(["a"]),
            json!(["a", " a "]),
            json!(["a", ""]),
            json!("a"),
        ] {
            assert_eq!(param(json!({"candidates": bad})), "candidates");
        }
        let two = json!(["a", "b"]);
        assert_eq!(param(json!({})), "candidates");
        assert_eq!(param(json!({"candidates": two, "n": 3})), "n");
        assert_eq!(param(json!({"n": 1})), "n");
        for (name, value) in [
            ("lambda_g", json!(-1)),
            ("lambda_d", json!(101)),
            ("eta_g", json!(0)),
            ("eta_d", json!(1e9)),
            ("iterations", json!(0)),
            ("iterations", json!(MAX_ITERATIONS + 1)),
            ("tolerance", json!(2)),
        ] {
            let mut p = json!({"candidates": two});
            p[name] = value;
            assert_eq!(param(p), name);
        }
        let p = json!({"candidates": two, "judge": {"prompt": "no slot"}});
        assert_eq!(param(p), "judge.prompt");
        let p = json!({"candidates": two, "framing": {"correct": "x", "incorrect": "x"}});
        assert_eq!(param(p), "framing");
        let s = spec(&e, "equilibrium", json!({"candidates": two}));
        assert!(s.check_choices(1).is_ok() && s.check_choices(2).is_err());
        let mut g = generation(&[id("big")], 3, SamplingParams::greedy());
        g.sampling.logprobs = Some(0);
        let refused = s.build(g, e.models()).err().unwrap();
        assert_eq!(refused.param.as_deref(), Some("candidates"));
    }
}
