//! Best-of-N: sample N whole candidates as one batch (prefill once, fork N ways; plain or
//! GenARM-guided), score each with the weighted sum of its rewards — programmatic scorers, and
//! reward models at sequence level (Σ_t log π_r(y_t | x, y_<t)) — and return one. Hard selection takes the best; soft
//! selection is RSO's rejection sampling toward π_base·exp(r/β) (reference/algorithms.md §9).
//! `calibrate: K` samples K more reference candidates in the same batch and replaces each
//! objective's score by its quantile among theirs (InfAlign's calibrated reward, §11), so
//! objectives on different scales combine fairly.
//!
//! `selection: "speculative"` is hard selection that stops weak candidates early (Sun et al.,
//! NeurIPS 2024, "Fast Best-of-N Decoding via Speculative Rejection"): at checkpoints the
//! candidates pause while the same objectives score what each has written so far (reward models'
//! Σ log π_r over the prefix, programmatic scorers on the text), and in each group the lowest
//! `reject_fraction` of the unfinished ones stop there. The rest sample on; the best survivor is
//! chosen. With `reject_fraction` 0 nothing stops, and the choice is hard best-of-N's.
//!
//! Candidates hold their events back; only the chosen one is streamed, once every candidate has
//! finished. Each of the request's `n` choices has its own group of candidates; candidate j of
//! group g draws from RNG stream g·(N+K) + j of the request's seed, so N = 1 is plain `sample`.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use super::equilibrium::{dedup, RankParams, RankSpec, Ranked, Ranking};
use super::genarm::{GenArmParams, GenArmSpec, Guided, Sequences};
use super::objectives::{self, Constraints, Objective, Scoring, Source};
use super::track::{Rows, TrackId, Tracker};
use super::{typed, within, Choice, Generation, Method, ParamError, Params};
use crate::engine::{Cx, Decoder, Event, Flow, Outputs, Usage};
use crate::model::ModelId;
use crate::model::ModelInfo;
use crate::reward::Registry;

/// Most candidates one request may ask for.
pub const MAX_N: usize = 16;
/// Most reference samples for calibration.
pub const MAX_CALIBRATE: usize = 32;

/// `best_of_n`: sample candidates, return the best by reward.
#[derive(Debug, Clone, Copy)]
pub struct BestOfN;

/// `best_of_n`'s parameters: candidates, programmatic rewards and per-request constraints,
/// selection.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BestOfNParams {
    #[serde(default = "default_candidates")]
    n: usize,
    #[serde(default)]
    rewards: BTreeMap<String, f64>,
    #[serde(default)]
    constraints: Constraints,
    #[serde(default)]
    selection: SelectionName,
    beta: Option<f64>,
    #[serde(default)]
    calibrate: usize,
    #[serde(default)]
    return_candidates: bool,
    /// GenARM guidance of the candidates: `{"rewards": {arm: w}, "beta": b}`.
    guide: Option<GenArmParams>,
    /// The ranking's parameters with `selection: "equilibrium"`.
    equilibrium: Option<RankParams>,
    /// With `selection: "speculative"`: the share of unfinished candidates stopped at each
    /// checkpoint, and the tokens between checkpoints.
    reject_fraction: Option<f64>,
    checkpoint_tokens: Option<usize>,
}

fn default_candidates() -> usize {
    4
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum SelectionName {
    #[default]
    Hard,
    Soft,
    Equilibrium,
    Speculative,
}

/// `reject_fraction` when the request does not say: half the unfinished candidates stop at each
/// checkpoint.
pub const DEFAULT_REJECT_FRACTION: f64 = 0.5;
/// Checkpoints per `max_tokens` when `checkpoint_tokens` is not given.
const CHECKPOINTS: usize = 4;
/// The most tokens between two checkpoints one may ask for.
pub const MAX_CHECKPOINT_TOKENS: usize = 4096;

impl Method for BestOfN {
    type Spec = BestOfNSpec;

    fn name(&self) -> &'static str {
        "best_of_n"
    }

    fn parse(&self, params: Params, rewards: &Registry) -> Result<BestOfNSpec, ParamError> {
        let p: BestOfNParams = typed(params)?;
        if !(1..=MAX_N).contains(&p.n) {
            return Err(ParamError::new(
                "n",
                format!("`n` must be between 1 and {MAX_N}, got {}", p.n),
            ));
        }
        if p.calibrate > MAX_CALIBRATE {
            return Err(ParamError::new(
                "calibrate",
                format!(
                    "`calibrate` must be at most {MAX_CALIBRATE} reference samples, got {}",
                    p.calibrate
                ),
            ));
        }
        if p.equilibrium.is_some() && !matches!(p.selection, SelectionName::Equilibrium) {
            return Err(ParamError::new(
                "equilibrium",
                "`equilibrium` applies only to `selection: \"equilibrium\"`",
            ));
        }
        let speculative = matches!(p.selection, SelectionName::Speculative);
        for (param, given) in [
            ("reject_fraction", p.reject_fraction.is_some()),
            ("checkpoint_tokens", p.checkpoint_tokens.is_some()),
        ] {
            if given && !speculative {
                return Err(ParamError::new(
                    param,
                    format!("`{param}` applies only to `selection: \"speculative\"`"),
                ));
            }
        }
        let ranked = matches!(p.selection, SelectionName::Equilibrium);
        let selection = match (p.selection, p.beta) {
            (
                SelectionName::Hard | SelectionName::Equilibrium | SelectionName::Speculative,
                Some(_),
            ) => {
                return Err(ParamError::new(
                    "beta",
                    "`beta` applies only to `selection: \"soft\"`",
                ))
            }
            (SelectionName::Hard, None) => Selection::Hard,
            (SelectionName::Speculative, None) => {
                if p.calibrate > 0 {
                    return Err(ParamError::new(
                        "calibrate",
                        "`calibrate` does not apply to `selection: \"speculative\"`, which stops candidates before references could be compared",
                    ));
                }
                let reject_fraction = p.reject_fraction.unwrap_or(DEFAULT_REJECT_FRACTION);
                if !(0.0..1.0).contains(&reject_fraction) {
                    return Err(ParamError::new(
                        "reject_fraction",
                        format!("`reject_fraction` must be at least 0 and below 1, got {reject_fraction}"),
                    ));
                }
                let every = (p.checkpoint_tokens)
                    .map(|c| within("checkpoint_tokens", c, 1, MAX_CHECKPOINT_TOKENS))
                    .transpose()?;
                Selection::Speculative(Speculative {
                    reject_fraction,
                    every,
                })
            }
            (SelectionName::Equilibrium, None) => {
                if p.calibrate > 0 {
                    return Err(ParamError::new(
                        "calibrate",
                        "`calibrate` does not apply to `selection: \"equilibrium\"`, which ranks by no reward",
                    ));
                }
                let rank = p.equilibrium.unwrap_or_default();
                Selection::Equilibrium(RankSpec::parse("equilibrium.", rank)?)
            }
            (SelectionName::Soft, beta) => {
                // RSO's default.
                let beta = beta.unwrap_or(0.5);
                if !(beta.is_finite() && beta > 0.0) {
                    return Err(ParamError::new(
                        "beta",
                        format!("`beta` must be a finite number above 0, got {beta}"),
                    ));
                }
                Selection::Soft { beta }
            }
        };
        // Equilibrium ranking needs no reward; any given are scored and reported.
        let (objectives, keywords) = if ranked && p.rewards.is_empty() && p.constraints.is_empty() {
            (Vec::new(), None)
        } else {
            objectives::parse("best_of_n", "select by", p.rewards, p.constraints, rewards)?
        };
        let mut guide = match p.guide {
            Some(g) => GenArmSpec::parse("guide.", g, rewards)?,
            None => GenArmSpec::none(),
        };
        // The candidates are pulled toward the keywords they will be selected by.
        if guide.keywords.is_none() {
            guide.keywords = keywords;
        }
        Ok(BestOfNSpec {
            n: p.n,
            objectives,
            selection,
            calibrate: p.calibrate,
            return_candidates: p.return_candidates,
            guide,
        })
    }

    fn models(&self, spec: &BestOfNSpec) -> Vec<ModelId> {
        let guides = spec.guide.active().map(|a| a.model);
        guides.chain(spec.scoring_models()).collect()
    }

    fn build(
        &self,
        spec: &BestOfNSpec,
        generation: Generation,
        models: &[ModelInfo],
    ) -> Result<Box<dyn Decoder>, ParamError> {
        Ok(Box::new(BestOfNDecoder::new(
            spec.clone(),
            generation,
            &models[crate::model::BASE].vocab,
        )))
    }
}

#[derive(Debug, Clone)]
pub enum Selection {
    Hard,
    /// Accept a candidate with probability exp((r − r_max)/β).
    Soft {
        beta: f64,
    },
    /// Rank each group's candidates by the consensus game (`equilibrium`).
    Equilibrium(RankSpec),
    /// Hard selection among the candidates that survive speculative rejection.
    Speculative(Speculative),
}

/// Speculative rejection's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Speculative {
    /// The share of a group's unfinished candidates stopped at each checkpoint, in [0, 1).
    pub reject_fraction: f64,
    /// Tokens between checkpoints (default: `max_tokens` / 4, at least 1).
    pub every: Option<usize>,
}

/// Checked `best_of_n` parameters.
#[derive(Debug, Clone)]
pub struct BestOfNSpec {
    pub n: usize,
    pub objectives: Vec<Objective>,
    pub selection: Selection,
    /// Reference samples per objective's quantile; 0 scores with the raw rewards.
    pub calibrate: usize,
    pub return_candidates: bool,
    /// GenARM guidance while sampling the candidates (no reward: plain sampling).
    pub guide: GenArmSpec,
}

impl BestOfNSpec {
    /// The reward models that score the candidates.
    pub fn scoring_models(&self) -> impl Iterator<Item = ModelId> + '_ {
        self.objectives.iter().filter_map(|o| match o.source {
            Source::Arm(m) => Some(m),
            _ => None,
        })
    }
}

/// Response tokens one candidate feeds the scoring ARMs per step: enough rows to use the matmuls
/// well, few enough that the logits of all candidates stay small (each row is vocabulary-wide).
const SCORE_CHUNK: usize = 32;

pub struct BestOfNDecoder {
    spec: BestOfNSpec,
    /// The text scorers; reward models' scores come from `arms`.
    scoring: Scoring,
    generation: Generation,
    /// The candidates of every group, each group's N then its K reference samples.
    guided: Guided,
    /// The reward models that score: their prompts prefilled beside the candidates', then a
    /// track per candidate fed each of its tokens in the step that feeds it to the base,
    /// summing log-probs (in chunks, where it lags behind).
    arms: Tracker,
    /// The objective of each of `arms`' lanes.
    arm_objectives: Vec<usize>,
    /// Per candidate, once scoring has started.
    runs: Vec<Run>,
    /// The candidates wait while the scoring ARMs catch up: at a checkpoint, or once all have
    /// finished.
    reading: bool,
    /// Per candidate, the tokens it had when speculative rejection stopped it.
    rejected: Vec<Option<usize>>,
    /// Speculative rejection's checkpoints so far: tokens, unfinished candidates, stopped.
    checkpoints: Vec<(usize, usize, usize)>,
    /// With `selection: "equilibrium"`, once the candidates are scored: per group, the ranking
    /// of its distinct candidates and where each is among the group's.
    rankings: Vec<(Ranking, Vec<usize>)>,
}

/// A candidate being read by the scoring ARMs.
struct Run {
    track: TrackId,
    /// Response tokens fed to the ARMs, and counted (each token's log-prob added, once the row
    /// before it is read): `counted` is `fed` or `fed + 1`.
    fed: usize,
    counted: usize,
    /// Where this step's feed ends.
    feeding: Option<usize>,
    /// Per ARM lane, Σ log π_r of the response, once counted to its end (or of its prefix,
    /// once stopped early).
    logps: Vec<f64>,
    /// Speculative rejection stopped it: its track is freed.
    stopped: bool,
}

impl BestOfNDecoder {
    pub fn new(
        spec: BestOfNSpec,
        generation: Generation,
        vocab: &std::sync::Arc<crate::model::Vocab>,
    ) -> Self {
        let sequences = Sequences::Candidates {
            groups: generation.n,
            per_group: spec.n + spec.calibrate,
        };
        let (arm_objectives, prompts): (Vec<usize>, Vec<_>) = spec
            .objectives
            .iter()
            .enumerate()
            .filter_map(|(objective, o)| match o.source {
                Source::Arm(model) => {
                    Some((objective, (model, generation.prompt_for(model).to_vec())))
                }
                _ => None,
            })
            .unzip();
        Self {
            guided: Guided::new(&spec.guide, &generation, sequences, vocab),
            scoring: Scoring::new(&spec.objectives),
            arms: Tracker::new(prompts, Rows::LogProbs),
            arm_objectives,
            runs: Vec::new(),
            reading: false,
            rejected: vec![None; generation.n * (spec.n + spec.calibrate)],
            checkpoints: Vec::new(),
            rankings: Vec::new(),
            spec,
            generation,
        }
    }

    /// Speculative rejection's settings, and the tokens between its checkpoints.
    fn speculative(&self) -> Option<(f64, usize)> {
        let Selection::Speculative(s) = &self.spec.selection else {
            return None;
        };
        let every = (s.every).unwrap_or(self.generation.max_tokens.div_ceil(CHECKPOINTS));
        Some((s.reject_fraction, every.max(1)))
    }

    /// The unfinished candidates (they sample in lockstep) have reached the next checkpoint, and
    /// the scoring ARMs have their prompts. As in the paper, a checkpoint comes when the tokens
    /// the unfinished candidates hold reach what all of them held at the first (memory full),
    /// and at least `checkpoint_tokens` after the last: with half stopped each time, at 1, 2, 4…
    /// times `checkpoint_tokens`.
    fn at_checkpoint(&self) -> bool {
        let Some((_, every)) = self.speculative() else {
            return false;
        };
        let last = self.checkpoints.last().map_or(0, |c| c.0);
        let live: Vec<usize> = (self.guided.choices())
            .filter(|c| !c.is_done())
            .map(|c| c.tokens.len())
            .collect();
        let len = live.iter().copied().max().unwrap_or(0);
        let budget = self.rejected.len() * every;
        self.arms.ready() && !live.is_empty() && len >= last + every && live.len() * len >= budget
    }

    /// Whether the candidates sample this step (they wait while the ARMs catch up).
    fn sampling(&self) -> bool {
        !self.reading && !self.guided.is_done()
    }

    /// Every candidate has its first token.
    fn started(&self) -> bool {
        let mut choices = self.guided.choices().peekable();
        choices.peek().is_some() && choices.all(|c| !c.tokens.is_empty())
    }

    /// Each candidate's combined reward for what it has written so far, its ARM terms from the
    /// sums read.
    fn partial_rewards(&self) -> Result<Vec<f64>> {
        let mut rewards = Vec::new();
        for (c, choice) in self.guided.choices().enumerate() {
            let mut terms = self.scoring.scores(&text(choice.held()));
            if let Some(run) = self.runs.get(c) {
                let logps = match run.logps.is_empty() {
                    true => self.arms.logps(run.track)?,
                    false => &run.logps,
                };
                for (&objective, &logp) in self.arm_objectives.iter().zip(logps) {
                    terms[objective] = logp as f32;
                }
            }
            rewards.push(self.scoring.combine(&terms));
        }
        Ok(rewards)
    }

    /// A checkpoint: in each group, stop the lowest `reject_fraction` of the unfinished
    /// candidates by what they have written so far.
    fn checkpoint(&mut self, cx: &mut Cx) -> Result<()> {
        let (fraction, _) = self
            .speculative()
            .context("a checkpoint without speculation")?;
        let rewards = self.partial_rewards()?;
        let per_group = self.spec.n;
        let live: Vec<bool> = self.guided.choices().map(|c| !c.is_done()).collect();
        let tokens = (self.guided.choices().filter(|c| !c.is_done()))
            .map(|c| c.tokens.len())
            .max()
            .unwrap_or(0);
        let (mut unfinished, mut stopped) = (0, 0);
        for first in (0..live.len()).step_by(per_group) {
            let mut group: Vec<usize> = (first..first + per_group).filter(|&i| live[i]).collect();
            // Lowest reward first; among equals the later candidate goes first.
            group.sort_by(|&a, &b| rewards[a].total_cmp(&rewards[b]).then(b.cmp(&a)));
            let stop = (fraction * group.len() as f64).floor() as usize;
            unfinished += group.len();
            stopped += stop;
            for &c in &group[..stop] {
                self.guided.stop(cx, c)?;
                self.rejected[c] = Some(tokens);
                if let Some(run) = self.runs.get_mut(c) {
                    // Its partial sums are its scores.
                    run.logps = self.arms.logps(run.track)?.to_vec();
                    run.stopped = true;
                    self.arms.free(cx, run.track);
                }
            }
        }
        self.checkpoints.push((tokens, unfinished, stopped));
        Ok(())
    }

    /// Every ARM's prompt is in and every candidate has its first token: a track per
    /// candidate, each sum starting with the log-prob of that token.
    fn start_scoring(&mut self, cx: &mut Cx) -> Result<()> {
        let count = self.guided.choices().count();
        let tracks = self.arms.branch(cx, count)?;
        for (c, track) in self.guided.choices().zip(tracks) {
            let mut run = Run {
                track,
                fed: 0,
                counted: 0,
                feeding: None,
                logps: Vec::new(),
                stopped: false,
            };
            run.count_next(&mut self.arms, c)?;
            run.finish_if_read(cx, &mut self.arms, c)?;
            self.runs.push(run);
        }
        Ok(())
    }

    /// Every ARM has read every candidate's response so far (but those stopped early).
    fn scored(&self) -> bool {
        self.arm_objectives.is_empty()
            || (!self.runs.is_empty()
                && (self.runs.iter().zip(self.guided.choices()))
                    .all(|(r, c)| r.stopped || r.counted >= c.tokens.len()))
    }

    /// Feed every candidate's tokens that the ARMs have not read. While a candidate samples,
    /// its newest token goes in the step that feeds it to the base: the ARM's row is then the
    /// base row's twin (a LoRA ARM skips the layers below its adapters, the base lane it is
    /// read against is a copy). After sampling, the response's last token is not fed: only
    /// the log-probs before each token are needed.
    fn plan_scoring(&mut self, cx: &mut Cx, sampling: bool) -> Result<()> {
        for (run, c) in self.runs.iter_mut().zip(self.guided.choices()) {
            let len = c.tokens.len();
            let limit = if sampling && !c.is_done() {
                len
            } else {
                len.saturating_sub(1)
            };
            if run.is_read() || run.counted != run.fed + 1 || run.fed >= limit {
                continue;
            }
            let end = (run.fed + SCORE_CHUNK).min(limit);
            self.arms.feed(cx, run.track, &c.tokens[run.fed..end])?;
            run.feeding = Some(end);
        }
        Ok(())
    }

    /// Count what this step's feeds predicted: their tokens after the first (the tracker does),
    /// and the token after each feed, from its last row, once sampled.
    fn absorb_scoring(&mut self, cx: &mut Cx, out: &Outputs) -> Result<()> {
        self.arms.absorb(cx, out)?;
        for (run, c) in self.runs.iter_mut().zip(self.guided.choices()) {
            if let Some(end) = run.feeding.take() {
                (run.fed, run.counted) = (end, end);
            }
            run.count_next(&mut self.arms, c)?;
            run.finish_if_read(cx, &mut self.arms, c)?;
        }
        Ok(())
    }

    /// Rank each group's distinct candidates (blank ones cannot be; a group of blanks keeps
    /// its first).
    fn start_ranking(&mut self, cx: &mut Cx, spec: &RankSpec) -> Result<()> {
        let texts: Vec<String> = self.guided.choices().map(|c| text(c.held())).collect();
        let base = cx.model(crate::model::BASE);
        for group in texts.chunks(self.spec.n) {
            let firsts: Vec<usize> = dedup(group)
                .into_iter()
                .filter(|&i| !group[i].trim().is_empty())
                .collect();
            let firsts = if firsts.is_empty() { vec![0] } else { firsts };
            let distinct: Vec<String> = firsts.iter().map(|&i| group[i].clone()).collect();
            let ranking = Ranking::new(&base.vocab, base, &self.generation.prompt, &distinct, spec)
                .map_err(anyhow::Error::msg)?;
            self.rankings.push((ranking, firsts));
        }
        Ok(())
    }

    /// Score every candidate, pick one per group, stream them and report.
    fn finish(&mut self, cx: &mut Cx) {
        let texts: Vec<String> = self.guided.choices().map(|c| text(c.held())).collect();
        let ranked: Vec<(Ranked, &[usize])> = self
            .rankings
            .iter()
            .zip(texts.chunks(self.spec.n.max(1)))
            .map(|((r, firsts), group)| {
                let distinct: Vec<String> = firsts.iter().map(|&i| group[i].clone()).collect();
                (r.rank(&distinct), firsts.as_slice())
            })
            .collect();
        let held: Vec<Vec<Event>> = self.guided.choices_mut().map(|c| c.take_held()).collect();
        let lens: Vec<usize> = self.guided.choices().map(|c| c.tokens.len()).collect();
        let mut raw: Vec<Vec<f32>> = texts.iter().map(|t| self.scoring.scores(t)).collect();
        for (c, run) in self.runs.iter().enumerate() {
            for (&objective, &logp) in self.arm_objectives.iter().zip(&run.logps) {
                raw[c][objective] = logp as f32;
            }
        }
        let per_group = self.spec.n + self.spec.calibrate;
        let mut rng = self.rng();
        let mut held: Vec<Option<Vec<Event>>> = held.into_iter().map(Some).collect();
        let mut groups = Vec::with_capacity(self.generation.n);
        for g in 0..self.generation.n {
            let first = g * per_group;
            let range = first..first + per_group;
            let mut group = self.select(&raw[range.clone()], &self.rejected[range], &mut rng);
            let equilibrium = ranked.get(g).map(|(r, firsts)| {
                group.chosen = firsts[r.chosen];
                r.report.clone()
            });
            for event in held[first + group.chosen].take().expect("chosen once") {
                cx.emit(event);
            }
            let mut report = json!({"chosen": group.chosen, "scores": group.rewards});
            if let Some(equilibrium) = equilibrium {
                report["equilibrium"] = equilibrium;
            }
            if self.spec.return_candidates {
                report["candidates"] = (0..self.spec.n)
                    .map(|i| {
                        let mut c = json!({
                            "text": texts[first + i],
                            "tokens": lens[first + i],
                            "scores": self.named(&raw[first + i]),
                            "reward": group.rewards[i],
                        });
                        if self.spec.calibrate > 0 {
                            c["calibrated"] = self.named(&group.scores[i]);
                        }
                        if self.speculative().is_some() {
                            c["rejected_at"] = json!(self.rejected[first + i]);
                        }
                        c
                    })
                    .collect();
            }
            groups.push(report);
        }
        let generated: usize = lens.iter().sum();
        let n = self.spec.n as f64;
        // The first choice's selection at the top level; every choice's under `choices` when
        // the request asked for several.
        let mut report = groups[0].clone();
        report["n"] = self.spec.n.into();
        report["kl_bound"] = (n.ln() - (n - 1.0) / n).into();
        report["weights"] = json!(self.scoring.weights());
        report["calibrate"] = self.spec.calibrate.into();
        report["generated_tokens"] = generated.into();
        if self.spec.guide.active().next().is_some() {
            report["guide"] = self.guided.report(&self.spec.guide);
        }
        match self.spec.selection {
            Selection::Hard => report["selection"] = "hard".into(),
            Selection::Soft { beta } => {
                report["selection"] = "soft".into();
                report["beta"] = beta.into();
            }
            Selection::Equilibrium(_) => report["selection"] = "equilibrium".into(),
            Selection::Speculative(_) => {
                let (fraction, every) = self.speculative().expect("speculative");
                report["selection"] = "speculative".into();
                report["reject_fraction"] = fraction.into();
                report["checkpoint_tokens"] = every.into();
                report["checkpoints"] = (self.checkpoints.iter())
                    .map(|&(tokens, unfinished, stopped)| {
                        json!({"tokens": tokens, "unfinished": unfinished, "rejected": stopped})
                    })
                    .collect();
            }
        }
        if self.generation.n > 1 {
            report["choices"] = groups.into();
        }
        cx.emit(Event::Done {
            usage: Usage {
                prompt_tokens: self.generation.prompt.len(),
                completion_tokens: generated,
            },
            report: Some(report),
        });
    }

    /// Per-objective values as {name: value}.
    fn named(&self, values: &[f32]) -> Value {
        let named = self.spec.objectives.iter().zip(values);
        named.map(|(o, &v)| (o.name.clone(), json!(v))).collect()
    }

    /// Select among one group's raw scores (its N candidates, then its K references), but
    /// those `rejected` early.
    fn select(&self, raw: &[Vec<f32>], rejected: &[Option<usize>], rng: &mut ChaCha8Rng) -> Group {
        let (candidates, references) = raw.split_at(self.spec.n);
        let scores: Vec<Vec<f32>> = if self.spec.calibrate > 0 {
            candidates
                .iter()
                .map(|c| {
                    (0..c.len())
                        .map(|j| quantile(c[j], references.iter().map(|r| r[j])))
                        .collect()
                })
                .collect()
        } else {
            candidates.to_vec()
        };
        let rewards: Vec<f64> = scores.iter().map(|s| self.scoring.combine(s)).collect();
        let chosen = match self.spec.selection {
            // Equilibrium ranking replaces this choice (`finish`).
            Selection::Hard | Selection::Equilibrium(_) => best(&rewards),
            Selection::Speculative(_) => {
                let survivors: Vec<f64> = (rewards.iter().zip(rejected))
                    .map(|(&r, stop)| if stop.is_some() { f64::NEG_INFINITY } else { r })
                    .collect();
                best(&survivors)
            }
            Selection::Soft { beta } => soft(&rewards, beta, rng),
        };
        Group {
            chosen,
            scores,
            rewards,
        }
    }

    /// The selection's own RNG: the request's seed on a stream no candidate uses.
    fn rng(&self) -> ChaCha8Rng {
        let seed = self
            .generation
            .sampling
            .seed
            .unwrap_or_else(|| rand::rng().random());
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(u64::MAX);
        rng
    }
}

/// One choice's selection: the chosen candidate, each candidate's (calibrated) scores per
/// objective and combined reward.
struct Group {
    chosen: usize,
    scores: Vec<Vec<f32>>,
    rewards: Vec<f64>,
}

/// A candidate's text, from its held events.
pub(crate) fn text(events: &[Event]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Token(t) => Some(t.text.as_str()),
            Event::Finished { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

/// The share of `references` below `score`, ties counting ½ (InfAlign's calibrated reward).
fn quantile(score: f32, references: impl Iterator<Item = f32>) -> f32 {
    let (mut below, mut k) = (0.0, 0usize);
    for r in references {
        k += 1;
        below += if r < score {
            1.0
        } else if r == score {
            0.5
        } else {
            0.0
        };
    }
    below / k.max(1) as f32
}

/// The first candidate with the highest reward.
fn best(rewards: &[f64]) -> usize {
    (0..rewards.len())
        .reduce(|b, i| if rewards[i] > rewards[b] { i } else { b })
        .unwrap_or(0)
}

/// RSO with one sample: sweep the candidates in random order, accepting each with probability
/// exp((r − r_max)/β). A best candidate is always accepted when reached, so one sweep suffices.
fn soft(rewards: &[f64], beta: f64, rng: &mut ChaCha8Rng) -> usize {
    let max = rewards.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut order: Vec<usize> = (0..rewards.len()).collect();
    order.shuffle(rng);
    order
        .into_iter()
        .find(|&i| rng.random::<f64>() < ((rewards[i] - max) / beta).exp())
        .unwrap_or_else(|| best(rewards))
}

impl Run {
    /// Its sums are final: read to the end, or stopped early.
    fn is_read(&self) -> bool {
        self.stopped || !self.logps.is_empty()
    }

    /// Count the token the last row fed predicts, once the candidate has it.
    fn count_next(&mut self, arms: &mut Tracker, c: &Choice) -> Result<()> {
        if !self.is_read() && self.counted == self.fed && self.counted < c.tokens.len() {
            arms.count(self.track, c.tokens[self.counted])?;
            self.counted += 1;
        }
        Ok(())
    }

    /// Once the finished candidate's tokens are all counted, keep the sums and free the track.
    fn finish_if_read(&mut self, cx: &mut Cx, arms: &mut Tracker, c: &Choice) -> Result<()> {
        if !self.is_read() && c.is_done() && self.counted >= c.tokens.len() {
            self.logps = arms.logps(self.track)?.to_vec();
            arms.free(cx, self.track);
        }
        Ok(())
    }
}

impl Decoder for BestOfNDecoder {
    fn plan(&mut self, cx: &mut Cx) -> Result<()> {
        if !self.rankings.is_empty() {
            return self.rankings.iter_mut().try_for_each(|(r, _)| r.plan(cx));
        }
        // Prefilled alongside the candidates' first steps (a no-op once done).
        self.arms.plan_prompts(cx)?;
        let sampling = self.sampling();
        if sampling {
            self.guided.plan(cx)?;
        }
        self.plan_scoring(cx, sampling)
    }

    fn absorb(&mut self, cx: &mut Cx, out: &Outputs) -> Result<Flow> {
        if !self.rankings.is_empty() {
            let mut done = true;
            for (r, _) in &mut self.rankings {
                done &= r.absorb(cx, out)?;
            }
            if !done {
                return Ok(Flow::Continue);
            }
            self.finish(cx);
            return Ok(Flow::Done);
        }
        let prefilled = self.arms.absorb_prompts(cx, out)?;
        if self.sampling() {
            self.guided.absorb(cx, out, &self.generation)?;
        }
        if !self.runs.is_empty() {
            self.absorb_scoring(cx, out)?;
        } else if prefilled && !self.arm_objectives.is_empty() && self.started() {
            self.start_scoring(cx)?;
        }
        if !self.guided.is_done() {
            // At a checkpoint the candidates wait until the ARMs have read them.
            if self.reading || self.at_checkpoint() {
                self.reading = !self.scored();
                if !self.reading {
                    self.checkpoint(cx)?;
                }
            }
            return Ok(Flow::Continue);
        }
        // Unread: a prompt that took longer to prefill than the candidates took to sample.
        self.reading = !self.scored();
        if self.reading {
            return Ok(Flow::Continue);
        }
        if let Selection::Equilibrium(spec) = &self.spec.selection {
            let spec = spec.clone();
            self.start_ranking(cx, &spec)?;
            return Ok(Flow::Continue);
        }
        self.finish(cx);
        Ok(Flow::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::testing::{engine, generation, run, seeded};
    use crate::engine::fake::{self, id, FakeModel, WORDS};
    use crate::engine::{Engine, EngineOptions};
    use crate::model::Role;

    /// The fake words of an answer's text.
    fn ids(text: &str) -> Vec<u32> {
        text.split_whitespace().map(id).collect()
    }

    #[test]
    fn one_candidate_is_plain_sampling_and_the_best_is_chosen() {
        let e = engine(vec![FakeModel::counting()]);
        let g = generation(&[id("the")], 6, seeded(3));
        let plain = run(&e, "sample", json!({}), g.clone());
        // Unpulled (`keyword_boost` 0): keywords only select.
        let one = json!({"n": 1, "constraints": {"keywords": ["sea"], "keyword_boost": 0}});
        assert_eq!(run(&e, "best_of_n", one, g.clone()).tokens, plain.tokens);
        let eight = json!({"n": 8, "rewards": {"sentiment": 1.0}, "return_candidates": true});
        let out = run(&e, "best_of_n", eight, g);
        let report = out.report.unwrap();
        let rewards: Vec<f64> = (report["candidates"].as_array().unwrap().iter())
            .map(|c| c["reward"].as_f64().unwrap())
            .collect();
        let chosen = report["chosen"].as_u64().unwrap() as usize;
        assert!(rewards.iter().all(|&r| r <= rewards[chosen]), "{rewards:?}");
        assert_eq!(
            report["candidates"][chosen]["text"].as_str(),
            Some(out.text[0].as_str())
        );
    }

    #[test]
    fn equilibrium_selection_ranks_the_candidates_without_a_reward() {
        let e = engine(vec![FakeModel::counting()]);
        let g = generation(&[id("the")], 3, seeded(2));
        let params = json!({"n": 4, "selection": "equilibrium", "return_candidates": true});
        let out = run(&e, "best_of_n", params, g);
        let report = out.report.unwrap();
        assert_eq!(report["selection"], "equilibrium");
        let ranked = &report["equilibrium"];
        let chosen = report["chosen"].as_u64().unwrap() as usize;
        let best = &ranked["candidates"][ranked["chosen"].as_u64().unwrap() as usize];
        assert_eq!(best["text"], report["candidates"][chosen]["text"]);
        assert_eq!(Some(out.text[0].as_str()), best["text"].as_str());
        for bad in [
            json!({"selection": "equilibrium", "calibrate": 2}),
            json!({"selection": "equilibrium", "beta": 1.0}),
            json!({"equilibrium": {}, "rewards": {"sentiment": 1.0}}),
            json!({"selection": "equilibrium", "equilibrium": {"eta_g": 0}}),
        ] {
            let params = bad.as_object().cloned().unwrap();
            assert!(BestOfN.parse(params, e.rewards()).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_reward_model_scores_each_whole_response() {
        // An ARM whose next-token distribution depends on the token before: its sums check
        // that every response token is read after the right history. With the base's prompt
        // the ARM reads each token in the step that samples the next; with a long prompt of its
        // own, prefilled in small chunks, it lags behind and catches up in chunks.
        let arm_row = |last: u32| fake::favour((last + 2) % WORDS.len() as u32, 2.0);
        let models = || {
            let arm = FakeModel::new("arm", Role::Reward, move |h| arm_row(*h.last().unwrap()))
                .with_context(256);
            vec![FakeModel::counting().with_context(256), arm]
        };
        let prompt = [id("the"), id("cat")];
        let lagging = Engine::start(
            models(),
            EngineOptions {
                prefill_chunk: 3,
                ..EngineOptions::default()
            },
        );
        for (e, arm_prompt) in [(engine(models()), None), (lagging, Some(40))] {
            let mut g = generation(&prompt, 2 * SCORE_CHUNK + 5, seeded(8));
            if let Some(len) = arm_prompt {
                // Ends as the base's does: the first response token follows "cat" in both.
                let mut long = vec![id("the"); len];
                long.push(id("cat"));
                g.model_prompts.insert(1, long);
            }
            let params = json!({"n": 3, "rewards": {"arm": 1.0}, "return_candidates": true});
            let report = run(&e, "best_of_n", params, g).report.unwrap();
            for c in report["candidates"].as_array().unwrap() {
                let response = ids(c["text"].as_str().unwrap());
                assert_eq!(response.len(), 2 * SCORE_CHUNK + 5);
                let mut last = *prompt.last().unwrap();
                let mut want = 0.0f64;
                for &y in &response {
                    let mut lp = arm_row(last);
                    crate::math::log_softmax(&mut lp);
                    want += f64::from(lp[y as usize]);
                    last = y;
                }
                let got = c["scores"]["arm"].as_f64().unwrap();
                assert!((got - want).abs() < 1e-3, "{arm_prompt:?}: {got} vs {want}");
            }
        }
    }

    fn base_and_arm() -> Engine {
        let arm = FakeModel::new("arm", Role::Reward, |_| fake::favour(id("sea"), 3.0));
        engine(vec![FakeModel::counting(), arm])
    }

    fn speculative(fraction: f64, every: usize) -> Value {
        json!({"n": 8, "rewards": {"arm": 1.0}, "selection": "speculative",
            "reject_fraction": fraction, "checkpoint_tokens": every, "return_candidates": true})
    }

    #[test]
    fn speculative_selection_without_rejection_is_hard_best_of_n() {
        let e = base_and_arm();
        let g = generation(&[id("the")], 12, seeded(5));
        let hard = json!({"n": 8, "rewards": {"arm": 1.0}, "return_candidates": true});
        let full = run(&e, "best_of_n", hard, g.clone());
        let spec = run(&e, "best_of_n", speculative(0.0, 3), g);
        assert_eq!(spec.tokens, full.tokens);
        let (f, s) = (full.report.unwrap(), spec.report.unwrap());
        assert_eq!(s["chosen"], f["chosen"]);
        assert_eq!(s["scores"], f["scores"]);
        assert_eq!(s["generated_tokens"], f["generated_tokens"]);
        // With none stopped, checkpoints every 3 tokens: at 3, 6 and 9, each of all eight.
        let checkpoints = s["checkpoints"].as_array().unwrap();
        assert_eq!(checkpoints.len(), 3, "{s}");
        assert!(checkpoints
            .iter()
            .all(|c| c["unfinished"] == 8 && c["rejected"] == 0));
    }

    #[test]
    fn speculative_rejection_stops_the_weakest_and_chooses_among_the_rest() {
        let e = base_and_arm();
        let g = generation(&[id("the")], 12, seeded(5));
        let hard = json!({"n": 8, "rewards": {"arm": 1.0}, "return_candidates": true});
        let full = run(&e, "best_of_n", hard, g.clone()).report.unwrap();
        let out = run(&e, "best_of_n", speculative(0.5, 3), g);
        let report = out.report.unwrap();
        // Checkpoints when the unfinished hold 8·3 tokens: 8 at 3 tokens, 4 at 6, and 2 would
        // be at 12, where they end. 8·3 + 4·3 + 2·6 tokens.
        let stops: Vec<(u64, u64, u64)> = (report["checkpoints"].as_array().unwrap().iter())
            .map(|c| {
                let n = |k: &str| c[k].as_u64().unwrap();
                (n("tokens"), n("unfinished"), n("rejected"))
            })
            .collect();
        assert_eq!(stops, [(3, 8, 4), (6, 4, 2)]);
        assert_eq!(report["generated_tokens"], 48);
        assert_eq!(full["generated_tokens"], 96);
        let candidates = report["candidates"].as_array().unwrap();
        let chosen = report["chosen"].as_u64().unwrap() as usize;
        assert!(candidates[chosen]["rejected_at"].is_null(), "{report}");
        assert_eq!(
            (candidates.iter())
                .filter(|c| c["rejected_at"].is_null())
                .count(),
            2
        );
        // A stopped candidate is as its prefix of the full run's, and so is the survivor.
        for (c, whole) in candidates
            .iter()
            .zip(full["candidates"].as_array().unwrap())
        {
            let (part, whole) = (c["text"].as_str().unwrap(), whole["text"].as_str().unwrap());
            assert!(whole.starts_with(part), "{part:?} vs {whole:?}");
        }
        assert_eq!(
            candidates[chosen]["text"].as_str(),
            Some(out.text[0].as_str())
        );
    }

    #[test]
    fn speculative_parameters_are_checked() {
        let e = base_and_arm();
        for (bad, param) in [
            (json!({"reject_fraction": 0.5}), "reject_fraction"),
            (json!({"checkpoint_tokens": 4}), "checkpoint_tokens"),
            (
                json!({"selection": "speculative", "reject_fraction": 1.0}),
                "reject_fraction",
            ),
            (
                json!({"selection": "speculative", "reject_fraction": -0.1}),
                "reject_fraction",
            ),
            (
                json!({"selection": "speculative", "checkpoint_tokens": 0}),
                "checkpoint_tokens",
            ),
            (
                json!({"selection": "speculative", "calibrate": 2}),
                "calibrate",
            ),
            (json!({"selection": "speculative", "beta": 1.0}), "beta"),
        ] {
            let mut params = bad.as_object().cloned().unwrap();
            params.insert("rewards".into(), json!({"arm": 1.0}));
            let err = BestOfN.parse(params, e.rewards()).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(param), "{bad}");
        }
    }

    #[test]
    fn quantiles_count_ties_as_half() {
        let refs = [1.0, 2.0, 2.0, 3.0];
        assert_eq!(quantile(0.0, refs.into_iter()), 0.0);
        assert_eq!(quantile(2.0, refs.into_iter()), 0.5);
        assert_eq!(quantile(2.5, refs.into_iter()), 0.75);
        assert_eq!(quantile(9.0, refs.into_iter()), 1.0);
    }

    #[test]
    fn hard_selection_takes_the_first_best() {
        assert_eq!(best(&[0.1, 0.7, 0.3, 0.7]), 1);
    }

    #[test]
    fn soft_selection_tends_to_hard_as_beta_shrinks_and_to_uniform_as_it_grows() {
        let rewards = [0.0, 1.0, 0.5, 0.9];
        let rng = |s| ChaCha8Rng::seed_from_u64(s);
        assert!((0..200).all(|s| soft(&rewards, 1e-9, &mut rng(s)) == 1));
        let mut seen = [0; 4];
        for s in 0..400 {
            seen[soft(&rewards, 1e9, &mut rng(s))] += 1;
        }
        assert!(seen.iter().all(|&c| c > 60), "{seen:?}");
    }
}
