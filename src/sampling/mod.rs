//! Token sampling shared by every decoder: logit bias, penalties, temperature (0 = greedy), top-k,
//! top-p, min-p, a seeded RNG, logprobs; and text streaming with stop strings (`text`).

pub mod structured;
pub mod text;

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::math;

pub use crate::math::{log_softmax, log_sum_exp};
pub use structured::{Constraint, Grammar};
pub use text::TextStream;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 selects the most likely token.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 disables.
    pub top_k: usize,
    pub min_p: f32,
    /// Divides positive (multiplies negative) logits of tokens seen in the prompt or output; 1 disables.
    pub repetition_penalty: f32,
    /// OpenAI semantics: subtracted once from logits of tokens already generated.
    pub presence_penalty: f32,
    /// OpenAI semantics: subtracted per occurrence in the generated text.
    pub frequency_penalty: f32,
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: Option<u64>,
    /// Report the chosen token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
    /// Report each prompt token's log-probability after the tokens before it, with this many
    /// alternatives (`echo` with `logprobs`; vLLM's name).
    pub prompt_logprobs: Option<usize>,
    /// The grammar every answer must keep to (`response_format`).
    pub grammar: Option<Grammar>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
            logprobs: None,
            prompt_logprobs: None,
            grammar: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }
}

/// A sampled token; when `logprobs` was asked, its log-probability under the distribution handed
/// to the sampler (before temperature and truncation) and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
}

/// One sequence's sampler: parameters, RNG stream and the counts the penalties need.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Occurrences of each token in the generated text.
    counts: HashMap<u32, u32>,
    /// Tokens of the prompt, for the repetition penalty.
    prompt_seen: Vec<u32>,
    scratch: Vec<f32>,
    /// Where the answer stands in the request's grammar, if it has one.
    constraint: Option<Constraint>,
}

impl Sampler {
    /// `stream` separates sequences that share a seed (choice `i` of `n` draws from stream `i`).
    pub fn new(params: SamplingParams, stream: u64, prompt: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        let mut prompt_seen = if params.repetition_penalty != 1.0 {
            prompt.to_vec()
        } else {
            Vec::new()
        };
        prompt_seen.sort_unstable();
        prompt_seen.dedup();
        let constraint = params.grammar.as_ref().map(Grammar::start);
        Self {
            params,
            rng,
            counts: HashMap::new(),
            prompt_seen,
            scratch: Vec::new(),
            constraint,
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Draw the next token from `logits` (one row, vocabulary wide) and record it.
    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        let token =
            if self.params.temperature <= 1e-5 && !self.adjusts() && self.constraint.is_none() {
                argmax(logits)
            } else {
                let mut x = std::mem::take(&mut self.scratch);
                x.clear();
                x.extend_from_slice(logits);
                self.adjust(&mut x);
                self.constrain(&mut x);
                let token = if self.params.temperature <= 1e-5 {
                    argmax(&x)
                } else {
                    self.draw(&mut x)
                };
                self.scratch = x;
                token
            };
        self.record(token, logits)
    }

    /// Record `token`, drawn from `logits` or chosen from them by a search decoder: the penalties
    /// see it, and its logprobs are reported as a sampled token's would be.
    pub fn record(&mut self, token: u32, logits: &[f32]) -> Sampled {
        *self.counts.entry(token).or_insert(0) += 1;
        if let Some(c) = &mut self.constraint {
            c.commit(token);
        }
        let (logprob, top) = match self.params.logprobs {
            Some(k) => {
                let (logprob, top) = logprobs(logits, token, k);
                (Some(logprob), top)
            }
            None => (None, Vec::new()),
        };
        Sampled {
            token,
            logprob,
            top,
        }
    }

    /// Whether bias or penalties change the logits.
    fn adjusts(&self) -> bool {
        let p = &self.params;
        !p.logit_bias.is_empty()
            || p.repetition_penalty != 1.0
            || p.presence_penalty != 0.0
            || p.frequency_penalty != 0.0
    }

    /// `logits` as sampling sees them before temperature: logit bias and penalties applied,
    /// and tokens the grammar refuses at −∞.
    pub fn adjusted(&mut self, logits: &[f32]) -> Vec<f32> {
        let mut x = logits.to_vec();
        self.adjust(&mut x);
        self.constrain(&mut x);
        x
    }

    /// Tokens the grammar refuses next to −∞ (nothing without a grammar).
    fn constrain(&mut self, x: &mut [f32]) {
        if let Some(c) = &mut self.constraint {
            c.mask(x);
        }
    }

    /// An index into `scores` (a search decoder's candidates), drawn at the request's temperature
    /// with its top-k / top-p / min-p truncation, or the best at temperature 0. Records nothing.
    pub fn choose(&mut self, scores: &[f32]) -> usize {
        if self.params.temperature <= 1e-5 {
            return argmax(scores) as usize;
        }
        let mut x = scores.to_vec();
        self.draw(&mut x) as usize
    }

    fn adjust(&self, x: &mut [f32]) {
        let p = &self.params;
        for &(t, b) in &p.logit_bias {
            if let Some(v) = x.get_mut(t as usize) {
                *v += b;
            }
        }
        if p.repetition_penalty != 1.0 {
            let penalise = |v: &mut f32| {
                *v = if *v > 0.0 {
                    *v / p.repetition_penalty
                } else {
                    *v * p.repetition_penalty
                }
            };
            for &t in &self.prompt_seen {
                if !self.counts.contains_key(&t) {
                    x.get_mut(t as usize).map(penalise);
                }
            }
            for &t in self.counts.keys() {
                x.get_mut(t as usize).map(penalise);
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &c) in &self.counts {
                if let Some(v) = x.get_mut(t as usize) {
                    *v -= p.presence_penalty + p.frequency_penalty * c as f32;
                }
            }
        }
    }

    /// Temperature, then top-k / top-p / min-p truncation, then one draw.
    fn draw(&mut self, x: &mut [f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let max = math::max(x);
        if !max.is_finite() {
            return argmax(x);
        }
        let total = math::exp_in_place(x, max, inv_t);
        let truncating = p.top_k > 0 || p.top_p < 1.0 || p.min_p > 0.0;
        if !truncating {
            return pick_dense(x, total, self.rng.random::<f32>());
        }
        // (After the exp above the best token weighs 1.)
        let mut cand: Vec<u32> = if p.top_k > 0 {
            let mut cand = top_n(x, p.top_k);
            if p.top_p < 1.0 {
                // The nucleus of the renormalised top-k distribution, in descending order.
                cand.sort_unstable_by(|a, b| x[*b as usize].total_cmp(&x[*a as usize]));
                let base: f32 = cand.iter().map(|&i| x[i as usize]).sum();
                let mut acc = 0.0;
                let keep = cand
                    .iter()
                    .position(|&i| {
                        acc += x[i as usize];
                        acc >= p.top_p * base
                    })
                    .map_or(cand.len(), |j| j + 1);
                cand.truncate(keep.max(1));
            }
            cand
        } else if p.top_p < 1.0 {
            nucleus(x, p.top_p * total)
        } else {
            (0..x.len() as u32)
                .filter(|&i| x[i as usize] >= p.min_p)
                .collect()
        };
        if p.min_p > 0.0 {
            let best = cand.iter().map(|&i| x[i as usize]).fold(0.0, f32::max);
            cand.retain(|&i| x[i as usize] >= p.min_p * best);
        }
        let mass: f32 = cand.iter().map(|&i| x[i as usize]).sum();
        pick(
            cand.iter().map(|&i| (i, x[i as usize])),
            mass,
            self.rng.random::<f32>(),
        )
    }
}

/// The top-p nucleus of `weights` (the best weighing 1): every token of weight ≥ t, for the
/// largest t whose tokens hold `target` of the weight. That is the prefix a cumulative sum over
/// the weights sorted in descending order keeps (ties at its edge all kept), found by bisecting
/// t over the bit patterns of positive floats (ordered as the floats are) instead of sorting
/// thousands of candidates. The search runs over the tokens within a factor 1e-4 of the best
/// when they hold the target (every other token weighs less than each of them), else over all.
fn nucleus(weights: &[f32], target: f32) -> Vec<u32> {
    let mut cand: Vec<u32> = (0..weights.len() as u32)
        .filter(|&i| weights[i as usize] >= 1e-4)
        .collect();
    let mut w: Vec<f32> = cand.iter().map(|&i| weights[i as usize]).collect();
    if math::sum(&w) < target {
        cand = (0..weights.len() as u32).collect();
        w = weights.to_vec();
    }
    let mass_from = |t: f32| {
        const L: usize = 16;
        let mut acc = [0f32; L];
        let chunks = w.chunks_exact(L);
        let tail: f32 = chunks.remainder().iter().filter(|&&v| v >= t).sum();
        for c in chunks {
            for i in 0..L {
                acc[i] += if c[i] >= t { c[i] } else { 0.0 };
            }
        }
        tail + acc.iter().sum::<f32>()
    };
    // Invariant: the tokens from `lo` hold the target, those from `hi` (above the best) do not.
    let (mut lo, mut hi) = (0u32, 1f32.to_bits() + 1);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if mass_from(f32::from_bits(mid)) >= target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let t = f32::from_bits(lo);
    cand.retain(|&i| weights[i as usize] >= t);
    cand
}

/// `pick` over every index of `weights`, a block at a time: blocks are summed with vector
/// lanes and only the block holding the target is walked one weight at a time.
fn pick_dense(weights: &[f32], total: f32, u: f32) -> u32 {
    const BLOCK: usize = 512;
    let target = u * total;
    let mut acc = 0.0;
    for (b, block) in weights.chunks(BLOCK).enumerate() {
        let s = math::sum(block);
        if acc + s > target {
            let offset = (b * BLOCK) as u32;
            let weights = block
                .iter()
                .enumerate()
                .map(|(i, &w)| (offset + i as u32, w));
            return pick(weights, target - acc, 1.0);
        }
        acc += s;
    }
    // Rounding left the target past the last block: the last token that has any weight.
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0) as u32
}

fn pick(weights: impl Iterator<Item = (u32, f32)>, total: f32, u: f32) -> u32 {
    let target = u * total;
    let mut acc = 0.0;
    let mut last = 0;
    for (i, w) in weights {
        if w <= 0.0 {
            continue;
        }
        acc += w;
        last = i;
        if acc > target {
            return i;
        }
    }
    last
}

/// `token`'s log-probability under `logits` (one row), and the `k` most likely tokens with theirs,
/// most likely first. Both come from one subtraction, so a token that is the most likely has
/// exactly the top alternative's value (clients test greediness by equality).
pub fn logprobs(logits: &[f32], token: u32, k: usize) -> (f32, Vec<(u32, f32)>) {
    let lse = log_sum_exp(logits);
    let of = |t: u32| {
        logits
            .get(t as usize)
            .map_or(f32::NEG_INFINITY, |&x| x - lse)
    };
    let top = if k > 0 {
        top_sorted(logits, k)
            .into_iter()
            .map(|t| (t, of(t)))
            .collect()
    } else {
        Vec::new()
    };
    (of(token), top)
}

pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in x.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

/// Indices of the `n` largest values, in no particular order.
pub fn top_n(x: &[f32], n: usize) -> Vec<u32> {
    let n = n.min(x.len());
    let mut idx: Vec<u32> = (0..x.len() as u32).collect();
    if n < x.len() {
        idx.select_nth_unstable_by(n, |a, b| x[*b as usize].total_cmp(&x[*a as usize]));
        idx.truncate(n);
    }
    idx
}

/// Indices of the `n` largest values, largest first (ties: lower index first).
pub fn top_sorted(x: &[f32], n: usize) -> Vec<u32> {
    let mut idx = top_n(x, n);
    idx.sort_unstable_by(|&a, &b| x[b as usize].total_cmp(&x[a as usize]).then(a.cmp(&b)));
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 0.5, 2.9]
    }

    #[test]
    fn greedy_takes_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy(), 0, &[]);
        assert_eq!(s.sample(&logits()).token, 1);
    }

    #[test]
    fn same_seed_same_draws_other_stream_differs() {
        let params = SamplingParams {
            seed: Some(7),
            ..Default::default()
        };
        let draw = |stream| {
            let mut s = Sampler::new(params.clone(), stream, &[]);
            (0..64)
                .map(|_| s.sample(&logits()).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(0), draw(0));
        assert_ne!(draw(0), draw(1));
    }

    #[test]
    fn top_k_one_is_greedy_and_min_p_filters() {
        let mut s = Sampler::new(
            SamplingParams {
                top_k: 1,
                seed: Some(1),
                ..Default::default()
            },
            0,
            &[],
        );
        assert!((0..50).all(|_| s.sample(&logits()).token == 1));
        let mut s = Sampler::new(
            SamplingParams {
                min_p: 0.8,
                seed: Some(1),
                ..Default::default()
            },
            0,
            &[],
        );
        assert!((0..200).all(|_| matches!(s.sample(&logits()).token, 1 | 4)));
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        let mut s = Sampler::new(
            SamplingParams {
                top_p: 0.5,
                seed: Some(3),
                ..Default::default()
            },
            0,
            &[],
        );
        let seen: std::collections::HashSet<u32> =
            (0..300).map(|_| s.sample(&logits()).token).collect();
        assert!(seen.is_subset(&[1, 4].into()), "{seen:?}");
    }

    #[test]
    fn logit_bias_and_penalties_apply() {
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                logit_bias: vec![(3, 100.0)],
                ..Default::default()
            },
            0,
            &[],
        );
        assert_eq!(s.sample(&logits()).token, 3);
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                presence_penalty: 2.0,
                ..Default::default()
            },
            0,
            &[],
        );
        assert_eq!(s.sample(&logits()).token, 1);
        assert_eq!(
            s.sample(&logits()).token,
            4,
            "token 1 was penalised after use"
        );
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                repetition_penalty: 2.0,
                ..Default::default()
            },
            0,
            &[1],
        );
        assert_eq!(s.sample(&logits()).token, 4, "prompt token 1 penalised");
    }

    #[test]
    fn logprobs_are_normalised() {
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                logprobs: Some(2),
                ..Default::default()
            },
            0,
            &[],
        );
        let r = s.sample(&logits());
        let lse = log_sum_exp(&logits());
        assert!((r.logprob.unwrap() - (3.0 - lse)).abs() < 1e-6);
        let top: Vec<u32> = r.top.iter().map(|t| t.0).collect();
        assert_eq!(top, vec![1, 4]);
    }
}
