//! Best-of-N: sample N whole candidates as one batch (prefill once, fork N ways; plain or
//! GenARM-guided), score each with the weighted sum of its rewards — programmatic scorers, and
//! reward models at sequence level (Σ_t log π_r(y_t | x, y_<t)) — and return one. Hard selection takes the best; soft
//! selection is RSO's rejection sampling toward π_base·exp(r/β) (reference/algorithms.md §9).
//! `calibrate: K` samples K more reference candidates in the same batch and replaces each
//! objective's score by its quantile among theirs (InfAlign's calibrated reward, §11), so
//! objectives on different scales combine fairly.
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
use super::{typed, Generation, Method, ParamError, Params};
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
}

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
        let ranked = matches!(p.selection, SelectionName::Equilibrium);
        let selection = match (p.selection, p.beta) {
            (SelectionName::Hard | SelectionName::Equilibrium, Some(_)) => {
                return Err(ParamError::new(
                    "beta",
                    "`beta` applies only to `selection: \"soft\"`",
                ))
            }
            (SelectionName::Hard, None) => Selection::Hard,
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
        let objectives = if ranked && p.rewards.is_empty() && p.constraints.is_empty() {
            Vec::new()
        } else {
            objectives::parse("best_of_n", "select by", p.rewards, p.constraints, rewards)?
        };
        let guide = match p.guide {
            Some(g) => GenArmSpec::parse("guide.", g, rewards)?,
            None => GenArmSpec::none(),
        };
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
        _: &[ModelInfo],
    ) -> Result<Box<dyn Decoder>, ParamError> {
        Ok(Box::new(BestOfNDecoder::new(spec.clone(), generation)))
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
    /// The reward models that score: their prompts prefilled while the candidates are sampled,
    /// then a track per candidate fed its response in chunks, summing log-probs.
    arms: Tracker,
    /// The objective of each of `arms`' lanes.
    arm_objectives: Vec<usize>,
    /// Per candidate, once scoring has started.
    runs: Vec<Run>,
    /// With `selection: "equilibrium"`, once the candidates are scored: per group, the ranking
    /// of its distinct candidates and where each is among the group's.
    rankings: Vec<(Ranking, Vec<usize>)>,
}

/// A candidate being read by the scoring ARMs.
struct Run {
    track: TrackId,
    /// Response tokens counted.
    counted: usize,
    /// Per ARM lane, Σ log π_r of the response, once counted to its end.
    logps: Vec<f64>,
}

impl BestOfNDecoder {
    pub fn new(spec: BestOfNSpec, generation: Generation) -> Self {
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
            guided: Guided::new(&spec.guide, &generation, sequences),
            scoring: Scoring::new(&spec.objectives),
            arms: Tracker::new(prompts, Rows::LogProbs),
            arm_objectives,
            runs: Vec::new(),
            rankings: Vec::new(),
            spec,
            generation,
        }
    }

    /// The candidates are done: a track per candidate, each sum starting with the log-prob of
    /// the response's first token.
    fn start_scoring(&mut self, cx: &mut Cx) -> Result<()> {
        let count = self.guided.choices().count();
        let tracks = self.arms.branch(cx, count)?;
        for (c, track) in self.guided.choices().zip(tracks) {
            let y1 = *c.tokens.first().context("a candidate without tokens")?;
            self.arms.count(track, y1)?;
            let mut run = Run {
                track,
                counted: 1,
                logps: Vec::new(),
            };
            run.finish_if_read(cx, &mut self.arms, c.tokens.len())?;
            self.runs.push(run);
        }
        Ok(())
    }

    /// Every ARM has read every candidate's response.
    fn scored(&self) -> bool {
        self.arm_objectives.is_empty()
            || (!self.runs.is_empty()
                && (self.runs.iter().zip(self.guided.choices()))
                    .all(|(r, c)| r.counted >= c.tokens.len()))
    }

    /// Feed every candidate the next chunk of its response that the ARMs have not read: from the
    /// last token counted on, whose rows predict the tokens after them. The response's last
    /// token is never fed: only the log-probs before each token are needed.
    fn plan_scoring(&mut self, cx: &mut Cx) -> Result<()> {
        for (run, c) in self.runs.iter().zip(self.guided.choices()) {
            if run.counted < c.tokens.len() {
                let end = (run.counted - 1 + SCORE_CHUNK).min(c.tokens.len() - 1);
                self.arms
                    .feed(cx, run.track, &c.tokens[run.counted - 1..end])?;
            }
        }
        Ok(())
    }

    /// Count what this step's chunks predicted: their tokens after the first (the tracker does)
    /// and the token after each chunk, from its last row.
    fn absorb_scoring(&mut self, cx: &mut Cx, out: &Outputs) -> Result<()> {
        self.arms.absorb(cx, out)?;
        for (run, c) in self.runs.iter_mut().zip(self.guided.choices()) {
            let len = c.tokens.len();
            if run.counted >= len {
                continue;
            }
            let end = (run.counted - 1 + SCORE_CHUNK).min(len - 1);
            self.arms.count(run.track, c.tokens[end])?;
            run.counted = end + 1;
            run.finish_if_read(cx, &mut self.arms, len)?;
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
            let mut group = self.select(&raw[first..first + per_group], &mut rng);
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
            report["guide"] = json!({
                "weights": self.spec.guide.weights(),
                "beta": self.spec.guide.beta,
                "kl_per_token": self.guided.kl_per_token(),
            });
        }
        match self.spec.selection {
            Selection::Hard => report["selection"] = "hard".into(),
            Selection::Soft { beta } => {
                report["selection"] = "soft".into();
                report["beta"] = beta.into();
            }
            Selection::Equilibrium(_) => report["selection"] = "equilibrium".into(),
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

    /// Select among one group's raw scores (its N candidates, then its K references).
    fn select(&self, raw: &[Vec<f32>], rng: &mut ChaCha8Rng) -> Group {
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
    /// Once the response's `len` tokens are counted, keep the sums and free the track.
    fn finish_if_read(&mut self, cx: &mut Cx, arms: &mut Tracker, len: usize) -> Result<()> {
        if self.counted >= len {
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
        if !self.runs.is_empty() {
            return self.plan_scoring(cx);
        }
        // Prefilled alongside the candidates' first steps (a no-op once done).
        self.arms.plan_prompts(cx)?;
        if !self.guided.is_done() {
            self.guided.plan(cx)?;
        }
        Ok(())
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
        if !self.runs.is_empty() {
            self.absorb_scoring(cx, out)?;
        } else {
            let prefilled = self.arms.absorb_prompts(cx, out)?;
            if !self.guided.is_done() && !self.guided.absorb(cx, out, &self.generation)? {
                return Ok(Flow::Continue);
            }
            if !prefilled {
                // A prompt that takes longer to prefill than the candidates took to sample.
                return Ok(Flow::Continue);
            }
            if !self.arm_objectives.is_empty() {
                self.start_scoring(cx)?;
            }
        }
        if !self.scored() {
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
        let one = json!({"n": 1, "constraints": {"keywords": ["sea"]}});
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
        // that every response token is read after the right history, across chunks.
        let arm_row = |last: u32| fake::favour((last + 2) % WORDS.len() as u32, 2.0);
        let arm = FakeModel::new("arm", Role::Reward, move |h| arm_row(*h.last().unwrap()))
            .with_context(256);
        let e = engine(vec![FakeModel::counting().with_context(256), arm]);
        let prompt = [id("the"), id("cat")];
        let g = generation(&prompt, 2 * SCORE_CHUNK + 5, seeded(8));
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
            assert!((got - want).abs() < 1e-3, "{got} vs {want}");
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
