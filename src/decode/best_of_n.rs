//! Best-of-N: sample N whole candidates as one batch (prefill once, fork N ways), score each with
//! the weighted sum of programmatic rewards, and return one. Hard selection takes the best; soft
//! selection is RSO's rejection sampling toward π_base·exp(r/β) (reference/algorithms.md §9).
//! `calibrate: K` samples K more reference candidates in the same batch and replaces each
//! objective's score by its quantile among theirs (InfAlign's calibrated reward, §11), so
//! objectives on different scales combine fairly.
//!
//! Candidates hold their events back; only the chosen one is streamed, once every candidate has
//! finished. Candidate i draws from RNG stream i of the request's seed, so N = 1 is plain `sample`.

use anyhow::Result;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use super::objectives::{Objective, Scoring};
use super::prompt::{fork, plan_choices, SharedPrompt};
use super::{Choice, Decoder, Flow, Generation};
use crate::engine::{Cx, Event, Outputs, Usage, BASE};

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
}

pub struct BestOfN {
    spec: BestOfNSpec,
    scoring: Scoring,
    generation: Generation,
    prompt: SharedPrompt,
    /// The N candidates, then the K reference samples.
    candidates: Vec<Choice>,
    /// (candidate, ticket) planned this step.
    tickets: Vec<(usize, usize)>,
}

impl BestOfN {
    pub fn new(spec: BestOfNSpec, generation: Generation) -> Self {
        Self {
            scoring: Scoring::new(&spec.objectives),
            spec,
            prompt: SharedPrompt::new(BASE, generation.prompt.clone()),
            generation,
            candidates: Vec::new(),
            tickets: Vec::new(),
        }
    }

    /// Score every candidate, pick one, stream it and report.
    fn finish(&mut self, cx: &mut Cx) {
        let held: Vec<Vec<Event>> = self.candidates.iter_mut().map(Choice::take_held).collect();
        let texts: Vec<String> = held.iter().map(|events| text(events)).collect();
        let raw: Vec<Vec<f32>> = texts.iter().map(|t| self.scoring.scores(t)).collect();
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
            Selection::Soft { beta } => soft(&rewards, beta, self.rng()),
        };
        for event in held.into_iter().nth(chosen).expect("a chosen candidate") {
            cx.emit(event);
        }
        let generated: usize = self.candidates.iter().map(|c| c.tokens.len()).sum();
        let n = self.spec.n as f64;
        let weights = self.scoring.weights();
        let mut report = json!({
            "n": self.spec.n,
            "kl_bound": n.ln() - (n - 1.0) / n,
            "chosen": chosen,
            "scores": rewards,
            "weights": weights,
            "calibrate": self.spec.calibrate,
            "generated_tokens": generated,
        });
        match self.spec.selection {
            Selection::Hard => report["selection"] = "hard".into(),
            Selection::Soft { beta } => {
                report["selection"] = "soft".into();
                report["beta"] = beta.into();
            }
        }
        if self.spec.return_candidates {
            let per_objective = |s: &[f32]| -> Value {
                let named = self.spec.objectives.iter().zip(s);
                named.map(|(o, &v)| (o.name.clone(), json!(v))).collect()
            };
            report["candidates"] = (0..self.spec.n)
                .map(|i| {
                    let mut c = json!({
                        "text": texts[i],
                        "tokens": self.candidates[i].tokens.len(),
                        "scores": per_objective(&candidates[i]),
                        "reward": rewards[i],
                    });
                    if self.spec.calibrate > 0 {
                        c["calibrated"] = per_objective(&scores[i]);
                    }
                    c
                })
                .collect();
        }
        cx.emit(Event::Done {
            usage: Usage {
                prompt_tokens: self.generation.prompt.len(),
                completion_tokens: generated,
            },
            report: Some(report),
        });
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
fn soft(rewards: &[f64], beta: f64, mut rng: ChaCha8Rng) -> usize {
    let max = rewards.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut order: Vec<usize> = (0..rewards.len()).collect();
    order.shuffle(&mut rng);
    order
        .into_iter()
        .find(|&i| rng.random::<f64>() < ((rewards[i] - max) / beta).exp())
        .unwrap_or_else(|| best(rewards))
}

impl Decoder for BestOfN {
    fn plan(&mut self, cx: &mut Cx) -> Result<()> {
        self.tickets.clear();
        if self.candidates.is_empty() {
            return self.prompt.plan(cx);
        }
        plan_choices(cx, &self.candidates, &mut self.tickets)
    }

    fn absorb(&mut self, cx: &mut Cx, out: &Outputs) -> Result<Flow> {
        let g = &self.generation;
        if self.candidates.is_empty() {
            let Some((seq, logits)) = self.prompt.absorb(out)? else {
                return Ok(Flow::Continue);
            };
            let seqs = fork(cx, seq, self.spec.n + self.spec.calibrate)?;
            for (i, s) in seqs.into_iter().enumerate() {
                let mut c = Choice::candidate(i, s, g);
                let sampled = c.sampler.sample(logits);
                c.accept(cx, g, sampled)?;
                self.candidates.push(c);
            }
        } else {
            for &(i, t) in &self.tickets {
                let c = &mut self.candidates[i];
                let sampled = c.sampler.sample(out.last(t)?);
                c.accept(cx, g, sampled)?;
            }
        }
        if !self.candidates.iter().all(Choice::is_done) {
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
        assert!((0..200).all(|s| soft(&rewards, 1e-9, rng(s)) == 1));
        let mut seen = [0; 4];
        for s in 0..400 {
            seen[soft(&rewards, 1e9, rng(s))] += 1;
        }
        assert!(seen.iter().all(|&c| c > 60), "{seen:?}");
    }
}
