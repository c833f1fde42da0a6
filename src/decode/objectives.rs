//! What the reward-guided decoders (best_of_n, args, deal) score with: reward names resolved by
//! the registry (programmatic scorers and reward models) and per-request constraints, each an
//! `Objective` with a weight. One parse for all three, so a reward name means the same thing (and
//! is refused the same way) in each.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::lexical::{self, Lexicon};
use super::{Generation, ParamError};
use crate::model::{ModelId, Vocab};
use crate::reward::scorers::{Keywords, Length};
use crate::reward::{Registry, RewardError};

pub use crate::reward::Source;

/// One term of the reward: its name in reports, its weight and its source.
#[derive(Debug, Clone)]
pub struct Objective {
    pub name: String,
    pub weight: f32,
    pub source: Source,
}

/// `constraints`: per-request scorers, each with weight 1, and how hard the keywords pull.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constraints {
    keywords: Option<Vec<String>>,
    max_words: Option<usize>,
    keyword_boost: Option<f64>,
}

impl Constraints {
    pub fn is_empty(&self) -> bool {
        self.keywords.is_none() && self.max_words.is_none()
    }

    /// The keywords alone, for a decoder that takes no sequence-level reward (`genarm`).
    pub fn keywords_only(self, decoder: &str) -> Result<Option<KeywordSpec>, ParamError> {
        if self.max_words.is_some() {
            return Err(ParamError::new(
                "constraints.max_words",
                format!("{decoder} takes only `constraints.keywords` (and `keyword_boost`), which it pulls toward token by token"),
            ));
        }
        self.keyword_spec(None)
    }

    fn keyword_spec(&self, objective: Option<usize>) -> Result<Option<KeywordSpec>, ParamError> {
        let boost = match self.keyword_boost {
            None => lexical::DEFAULT_BOOST,
            Some(b) if b.is_finite() && (0.0..=MAX_KEYWORD_BOOST).contains(&b) => b as f32,
            Some(b) => {
                return Err(ParamError::new(
                    "constraints.keyword_boost",
                    format!("`constraints.keyword_boost` must be between 0 and {MAX_KEYWORD_BOOST} (nats), got {b}"),
                ))
            }
        };
        let Some(keywords) = &self.keywords else {
            if self.keyword_boost.is_some() {
                return Err(ParamError::new(
                    "constraints.keyword_boost",
                    "`constraints.keyword_boost` needs `constraints.keywords`",
                ));
            }
            return Ok(None);
        };
        if keywords.is_empty() || keywords.iter().any(|k| k.trim().is_empty()) {
            return Err(ParamError::new(
                "constraints.keywords",
                "`constraints.keywords` must list at least one keyword, none blank",
            ));
        }
        if keywords.len() > MAX_KEYWORDS
            || keywords
                .iter()
                .any(|k| k.chars().count() > MAX_KEYWORD_CHARS)
        {
            return Err(ParamError::new(
                "constraints.keywords",
                format!("`constraints.keywords` takes at most {MAX_KEYWORDS} keywords of at most {MAX_KEYWORD_CHARS} characters each"),
            ));
        }
        Ok(Some(KeywordSpec {
            keywords: keywords.clone(),
            boost,
            objective,
        }))
    }
}

/// Most keywords one request may constrain, and the longest one: each is spelled and matched
/// against the answer at every step.
pub const MAX_KEYWORDS: usize = 16;
pub const MAX_KEYWORD_CHARS: usize = 64;

/// The largest `constraints.keyword_boost`: beyond it a keyword would be forced, not pulled.
pub const MAX_KEYWORD_BOOST: f64 = 50.0;

/// A request's keyword constraint: its words, how many nats a pulled token gains, and the index
/// of its objective among the decoder's (none where the decoder scores no sequence).
#[derive(Debug, Clone, PartialEq)]
pub struct KeywordSpec {
    pub keywords: Vec<String>,
    pub boost: f32,
    pub objective: Option<usize>,
}

impl KeywordSpec {
    /// The keywords in `vocab`'s tokens, to pull toward; none with `keyword_boost` 0, which
    /// leaves the keywords to score alone.
    pub fn pull(&self, vocab: &Vocab) -> Option<Lexicon> {
        (self.boost > 0.0).then(|| Lexicon::new(vocab, &self.keywords, self.boost))
    }
}

/// The objectives of `rewards` (name → weight) and `constraints`, checked for `decoder`, which
/// needs at least one of them to `purpose` (e.g. "select by"); and the keyword constraint, whose
/// objective is among them.
pub fn parse(
    decoder: &str,
    purpose: &str,
    rewards: BTreeMap<String, f64>,
    constraints: Constraints,
    registry: &Registry,
) -> Result<(Vec<Objective>, Option<KeywordSpec>), ParamError> {
    let mut objectives = Vec::new();
    for (name, w) in rewards {
        let (source, weight) = registry.reward(&name, w).map_err(|e| match e {
            RewardError::Unknown { .. } => ParamError::new(
                "rewards",
                format!(
                    "{e}; {decoder} scores with: {}",
                    registry.names().join(", ")
                ),
            ),
            RewardError::Weight { .. } => ParamError::new(format!("rewards.{name}"), e.to_string()),
        })?;
        objectives.push(Objective {
            source,
            name,
            weight,
        });
    }
    let keywords = constraints.keyword_spec(Some(objectives.len()))?;
    if let Some(k) = &keywords {
        objectives.push(Objective {
            name: "keywords".into(),
            weight: 1.0,
            source: Source::Text(Arc::new(Keywords::new(&k.keywords))),
        });
    }
    if let Some(words) = constraints.max_words {
        if words == 0 {
            return Err(ParamError::new(
                "constraints.max_words",
                "`constraints.max_words` must be at least 1",
            ));
        }
        objectives.push(Objective {
            name: "max_words".into(),
            weight: 1.0,
            source: Source::Text(Arc::new(Length::at_most(words))),
        });
    }
    if objectives.is_empty() {
        return Err(ParamError::new(
            "rewards",
            format!("{decoder} needs something to {purpose}: `rewards` or `constraints`"),
        ));
    }
    Ok((objectives, keywords))
}

/// The reward-model objectives that change a search's scores, with their index: none when the
/// search weighs rewards by `scale` 0, and none of weight 0 (they would cost forwards for nothing).
pub fn active_arms(
    objectives: &[Objective],
    scale: f32,
) -> impl Iterator<Item = (usize, ModelId)> + '_ {
    objectives
        .iter()
        .enumerate()
        .filter_map(move |(i, o)| match o.source {
            Source::Arm(m) if scale != 0.0 && o.weight != 0.0 => Some((i, m)),
            _ => None,
        })
}

/// The objectives: raw scores per objective, and their weighted sum.
pub struct Scoring {
    objectives: Vec<Objective>,
}

impl Scoring {
    pub fn new(objectives: &[Objective]) -> Self {
        Self {
            objectives: objectives.to_vec(),
        }
    }

    pub fn objectives(&self) -> &[Objective] {
        &self.objectives
    }

    /// Each objective's raw score of `text`, in objective order (0 for a reward model, which
    /// the decoder scores itself).
    pub fn scores(&self, text: &str) -> Vec<f32> {
        let score = |o: &Objective| match &o.source {
            Source::Text(s) => s.score(text),
            Source::Arm(_) => 0.0,
        };
        self.objectives.iter().map(score).collect()
    }

    /// Σ weight × score, of per-objective `scores` (raw or calibrated).
    pub fn combine(&self, scores: &[f32]) -> f64 {
        scores
            .iter()
            .zip(&self.objectives)
            .map(|(&s, o)| f64::from(s) * f64::from(o.weight))
            .sum()
    }

    /// The weighted reward of `text`.
    pub fn reward(&self, text: &str) -> f64 {
        self.combine(&self.scores(text))
    }

    /// Objective name → weight, for reports.
    pub fn weights(&self) -> BTreeMap<&str, f32> {
        self.objectives
            .iter()
            .map(|o| (o.name.as_str(), o.weight))
            .collect()
    }
}

/// The answer text that `tokens` (generated tokens, possibly a partial answer) would stream: the
/// scorers of a search decoder read what the client would read. End-of-generation tokens add no
/// text (unless `ignore_eos`), and the text ends before the first stop string.
pub fn answer_text<'t>(
    vocab: &Vocab,
    generation: &Generation,
    tokens: impl IntoIterator<Item = &'t u32>,
) -> String {
    read_text(vocab, tokens, generation.ignore_eos, &generation.stop)
}

/// The text of `tokens` as a client reads it: up to an end-of-generation token (unless
/// `ignore_eos`) and before the first of `stops`.
pub fn read_text<'t>(
    vocab: &Vocab,
    tokens: impl IntoIterator<Item = &'t u32>,
    ignore_eos: bool,
    stops: &[String],
) -> String {
    let mut bytes = Vec::new();
    for &t in tokens {
        if !ignore_eos && vocab.end_of_generation.contains(&t) {
            break;
        }
        bytes.extend_from_slice(vocab.bytes(t));
    }
    let mut text = String::from_utf8_lossy(&bytes).into_owned();
    if let Some(at) = stop_at(&text, stops) {
        text.truncate(at);
    }
    text
}

/// Where the first of `stops` begins in `text`, if any does.
pub fn stop_at(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_cut_at_the_earliest() {
        let stops = vec!["c".to_string(), "ab".to_string(), String::new()];
        assert_eq!(stop_at("xxabc", &stops), Some(2));
        assert_eq!(stop_at("xyz", &stops), None);
    }

    #[test]
    fn scoring_weights_each_objective() {
        let objectives = [
            Objective {
                name: "keywords".into(),
                weight: 2.0,
                source: Source::Text(Arc::new(Keywords::new(&["sun", "sea"]))),
            },
            Objective {
                name: "max_words".into(),
                weight: 1.0,
                source: Source::Text(Arc::new(Length::at_most(2))),
            },
        ];
        let s = Scoring::new(&objectives);
        // Half the keywords (1.0 × 2) and one word over a budget of two (−0.5).
        assert_eq!(s.scores("the sun shines"), vec![0.5, -0.5]);
        assert!((s.reward("the sun shines") - 0.5).abs() < 1e-9);
    }
}
