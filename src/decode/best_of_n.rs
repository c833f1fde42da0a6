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

use anyhow::{Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use super::genarm::{GenArmSpec, Guided, Sequences};
use super::objectives::{Objective, Scoring, Source};
use super::prompt::SharedPrompt;
use super::{Decoder, Flow, Generation};
use crate::engine::{Cx, Event, ModelId, Outputs, SeqId, Usage};
use crate::model::Logits;
use crate::sampling::{log_softmax, log_sum_exp};

/// Most candidates one request may ask for.
pub const MAX_N: usize = 16;
/// Most reference samples for calibration.
pub const MAX_CALIBRATE: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Selection {
    Hard,
    /// Accept a candidate with probability exp((r − r_max)/β).
    Soft {
        beta: f64,
    },
}

/// Checked `best_of_n` parameters.
#[derive(Debug, Clone, PartialEq)]
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

/// Response tokens one candidate feeds a scoring ARM per step: enough rows to use the matmuls
/// well, few enough that the logits of all candidates stay small (each row is vocabulary-wide).
const SCORE_CHUNK: usize = 32;

/// One reward model scoring every candidate: its prompt prefilled once (while the candidates are
/// sampled), then forked per candidate and fed the response in chunks, summing log-probs.
struct ArmScorer {
    objective: usize,
    prompt: SharedPrompt,
    /// The prompt's sequence and its next-token log-probs (the first response token's).
    first: Option<(SeqId, Vec<f32>)>,
    /// Per candidate: its sequence, response tokens fed so far, and the log-prob sum.
    runs: Vec<(SeqId, usize, f64)>,
    /// (candidate, ticket, first token fed) planned this step.
    tickets: Vec<(usize, usize, usize)>,
}
pub struct BestOfN {
    spec: BestOfNSpec,
    /// The text scorers; reward models' scores come from `arms`.
    scoring: Scoring,
    generation: Generation,
    /// The candidates of every group, each group's N then its K reference samples.
    guided: Guided,
    arms: Vec<ArmScorer>,
}

impl BestOfN {
    pub fn new(spec: BestOfNSpec, generation: Generation) -> Self {
        let sequences = Sequences::Candidates {
            groups: generation.n,
            per_group: spec.n + spec.calibrate,
        };
        let arms = spec
            .objectives
            .iter()
            .enumerate()
            .filter_map(|(objective, o)| match o.source {
                Source::Arm(model) => Some(ArmScorer {
                    objective,
                    prompt: SharedPrompt::new(model, generation.prompt_for(model).to_vec()),
                    first: None,
                    runs: Vec::new(),
                    tickets: Vec::new(),
                }),
                _ => None,
            })
            .collect();
        Self {
            guided: Guided::new(&spec.guide, &generation, sequences),
            scoring: Scoring::new(&spec.objectives),
            spec,
            generation,
            arms,
        }
    }

    /// The candidates are done: fork each ARM's prompt for every candidate, starting each sum
    /// with the log-prob of the response's first token.
    fn start_scoring(&mut self, cx: &mut Cx) -> Result<()> {
        for arm in &mut self.arms {
            let (seq, first) = arm
                .first
                .take()
                .context("an ARM prompt not yet prefilled")?;
            for c in self.guided.choices() {
                let run = cx.fork(seq)?;
                let y1 = *c.tokens.first().context("a candidate without tokens")?;
                let lp = first.get(y1 as usize).copied().unwrap_or(f32::NEG_INFINITY);
                arm.runs.push((run, 0, f64::from(lp)));
                if c.tokens.len() == 1 {
                    cx.free(run);
                }
            }
            cx.free(seq);
        }
        Ok(())
    }

    /// Every ARM has read every candidate's response.
    fn scored(&self) -> bool {
        let lens: Vec<usize> = self.guided.choices().map(|c| c.tokens.len()).collect();
        self.arms.iter().all(|a| {
            a.runs.len() == lens.len() && a.runs.iter().zip(&lens).all(|(r, &l)| r.1 + 1 >= l)
        })
    }

    /// Score every candidate, pick one per group, stream them and report.
    fn finish(&mut self, cx: &mut Cx) {
        let held: Vec<Vec<Event>> = self.guided.choices_mut().map(|c| c.take_held()).collect();
        let lens: Vec<usize> = self.guided.choices().map(|c| c.tokens.len()).collect();
        let texts: Vec<String> = held.iter().map(|events| text(events)).collect();
        let mut raw: Vec<Vec<f32>> = texts.iter().map(|t| self.scoring.scores(t)).collect();
        for arm in &self.arms {
            for (c, run) in arm.runs.iter().enumerate() {
                raw[c][arm.objective] = run.2 as f32;
            }
        }
        let per_group = self.spec.n + self.spec.calibrate;
        let mut rng = self.rng();
        let mut held: Vec<Option<Vec<Event>>> = held.into_iter().map(Some).collect();
        let mut groups = Vec::with_capacity(self.generation.n);
        for g in 0..self.generation.n {
            let first = g * per_group;
            let group = self.select(&raw[first..first + per_group], &mut rng);
            for event in held[first + group.chosen].take().expect("chosen once") {
                cx.emit(event);
            }
            let mut report = json!({"chosen": group.chosen, "scores": group.rewards});
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
            Selection::Hard => best(&rewards),
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
fn text(events: &[Event]) -> String {
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

impl ArmScorer {
    /// Plan the next chunk of every candidate's response that this ARM has not read yet. The
    /// last token is never fed: only the log-probs before each token are needed.
    fn plan(&mut self, cx: &mut Cx, responses: &[&[u32]]) -> Result<()> {
        self.tickets.clear();
        for (c, &(seq, fed, _)) in self.runs.iter().enumerate() {
            let end = (fed + SCORE_CHUNK).min(responses[c].len().saturating_sub(1));
            if fed < end {
                let t = cx.forward(seq, responses[c][fed..end].to_vec(), Logits::All)?;
                self.tickets.push((c, t, fed));
            }
        }
        Ok(())
    }

    fn absorb(&mut self, cx: &mut Cx, out: &Outputs, responses: &[&[u32]]) -> Result<()> {
        for &(c, t, fed) in &self.tickets {
            let rows = out.rows(t)?;
            let run = &mut self.runs[c];
            for (i, row) in rows.iter().enumerate() {
                run.2 += f64::from(log_prob(row, responses[c][fed + i + 1]));
            }
            run.1 = fed + rows.len();
            if run.1 + 1 >= responses[c].len() {
                cx.free(run.0);
            }
        }
        self.tickets.clear();
        Ok(())
    }
}

/// log softmax(row)[token], without materialising the whole log-softmax row.
fn log_prob(row: &[f32], token: u32) -> f32 {
    row.get(token as usize)
        .map_or(f32::NEG_INFINITY, |&x| x - log_sum_exp(row))
}

impl Decoder for BestOfN {
    fn plan(&mut self, cx: &mut Cx) -> Result<()> {
        let responses: Vec<&[u32]> = self.guided.choices().map(|c| c.tokens.as_slice()).collect();
        for arm in &mut self.arms {
            if arm.runs.is_empty() {
                // Prefilled alongside the candidates' first steps (a no-op once done).
                arm.prompt.plan(cx)?;
            } else {
                arm.plan(cx, &responses)?;
            }
        }
        if !self.guided.is_done() {
            self.guided.plan(cx)?;
        }
        Ok(())
    }

    fn absorb(&mut self, cx: &mut Cx, out: &Outputs) -> Result<Flow> {
        let scoring = self.arms.first().is_some_and(|a| !a.runs.is_empty());
        if scoring {
            let responses: Vec<&[u32]> =
                self.guided.choices().map(|c| c.tokens.as_slice()).collect();
            for arm in &mut self.arms {
                arm.absorb(cx, out, &responses)?;
            }
        } else {
            for arm in &mut self.arms {
                if let Some((seq, logits)) = arm.prompt.absorb(out)? {
                    let mut lp = logits.to_vec();
                    log_softmax(&mut lp);
                    arm.first = Some((seq, lp));
                }
            }
            if !self.guided.is_done() && !self.guided.absorb(cx, out, &self.generation)? {
                return Ok(Flow::Continue);
            }
            if self.arms.iter().any(|a| a.first.is_none()) {
                // A prompt that takes longer to prefill than the candidates took to sample.
                return Ok(Flow::Continue);
            }
            self.start_scoring(cx)?;
        }
        if !self.scored() {
            return Ok(Flow::Continue);
        }
        self.finish(cx);
        Ok(Flow::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
