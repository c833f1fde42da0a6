//! Reward sources behind one seam. Two kinds:
//! - ARMs (autoregressive reward models): causal LMs loaded beside the base with `Role::Reward`
//!   and the base's tokenizer. Token-level decoders (GenARM) read their next-token log-probs;
//!   their sequence-level reward is Σ log π_r(y_t | x, y_<t). An ARM made of adapters over the
//!   base's weights is read relative to the base (`ModelInfo::relative`): log π_r − log π_base.
//! - Programmatic scorers (`scorers`): functions of the finished text, for sequence-level decoders.
//!
//! The `Registry`, built once from the loaded models, resolves names to sources for every
//! decoder and lists them for `/v1/rewards`; it also knows the draft models (`adaptive`
//! decodes with one), the other kind of model a request may name besides the base.

pub mod scorers;

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::model::{Model, ModelId, ModelInfo, Role};
use scorers::Scorer;

/// An error naming the reward model among `models` whose name a built-in scorer has: a request
/// naming it would be ambiguous.
pub fn check_names(models: &[Model]) -> anyhow::Result<()> {
    let builtin = scorers::builtin();
    match (models.iter())
        .find(|m| m.role == Role::Reward && builtin.iter().any(|s| s.name == m.name))
    {
        Some(m) => anyhow::bail!(
            "reward model `{}`: a built-in scorer has that name; load it under another",
            m.name
        ),
        None => Ok(()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Token level: a model's next-token log-probs.
    Arm,
    /// Sequence level: a score of the text.
    Programmatic,
}

/// A reward source as clients see it.
#[derive(Debug, Clone, Serialize)]
pub struct RewardInfo {
    pub name: String,
    pub kind: Kind,
    pub description: String,
}

/// What a reward name stands for.
#[derive(Clone)]
pub enum Source {
    /// A reward model, scored by the decoder with forwards.
    Arm(ModelId),
    /// A function of the answer's text.
    Text(Arc<dyn Scorer>),
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Arm(m) => write!(f, "Arm({m})"),
            Self::Text(_) => write!(f, "Text"),
        }
    }
}

/// A reward name a request got wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RewardError {
    #[error("`{name}` is not a loaded reward")]
    Unknown { name: String },
    #[error("the weight of `{name}` must be a finite number, got {weight}")]
    Weight { name: String, weight: f64 },
}

struct Arm {
    name: String,
    model: ModelId,
    description: String,
}

/// Every reward source of a server: its ARMs, then the built-in scorers; and its drafts.
pub struct Registry {
    arms: Vec<Arm>,
    scorers: Vec<scorers::Builtin>,
    drafts: Vec<(String, ModelId)>,
}

impl Registry {
    /// The reward models among `models` (by their index), and the built-in scorers.
    pub fn new(models: &[ModelInfo]) -> Self {
        let arms = models
            .iter()
            .enumerate()
            .filter(|(_, m)| m.role == Role::Reward)
            .map(|(model, m)| Arm {
                name: m.name.clone(),
                model,
                description: match m.relative {
                    true => "autoregressive reward model on the base's weights (low-rank adapters): token-level log-probs relative to the base's".into(),
                    false => format!(
                        "autoregressive reward model ({} layers, hidden size {}): token-level log-probs",
                        m.config.n_layers, m.config.hidden
                    ),
                },
            })
            .collect();
        let drafts = models
            .iter()
            .enumerate()
            .filter(|(_, m)| m.role == Role::Draft)
            .map(|(id, m)| (m.name.clone(), id))
            .collect();
        Self {
            arms,
            scorers: scorers::builtin(),
            drafts,
        }
    }

    /// The draft model `name`, or the first loaded when no name is given.
    pub fn draft(&self, name: Option<&str>) -> Result<ModelId, String> {
        let found = match name {
            Some(name) => self.drafts.iter().find(|(n, _)| n == name),
            None => self.drafts.first(),
        };
        if let Some(&(_, id)) = found {
            return Ok(id);
        }
        let loaded: Vec<&str> = self.drafts.iter().map(|(n, _)| n.as_str()).collect();
        if loaded.is_empty() {
            return Err(
                "no draft model is loaded (start the server with `--draft-model PATH`)".into(),
            );
        }
        Err(format!(
            "`{}` is not a loaded draft model; loaded: {}",
            name.unwrap_or_default(),
            loaded.join(", ")
        ))
    }

    /// Every source, for `/v1/rewards`.
    pub fn list(&self) -> Vec<RewardInfo> {
        let arms = self.arms.iter().map(|a| RewardInfo {
            name: a.name.clone(),
            kind: Kind::Arm,
            description: a.description.clone(),
        });
        let scorers = self.scorers.iter().map(|s| RewardInfo {
            name: s.name.to_string(),
            kind: Kind::Programmatic,
            description: s.description.to_string(),
        });
        arms.chain(scorers).collect()
    }

    /// The model serving the ARM `name`.
    pub fn arm(&self, name: &str) -> Option<ModelId> {
        self.arms.iter().find(|a| a.name == name).map(|a| a.model)
    }

    pub fn arm_names(&self) -> Vec<&str> {
        self.arms.iter().map(|a| a.name.as_str()).collect()
    }

    /// The built-in scorer `name`.
    pub fn scorer(&self, name: &str) -> Option<&Arc<dyn Scorer>> {
        self.scorers
            .iter()
            .find(|s| s.name == name)
            .map(|s| &s.scorer)
    }

    /// Every name a sequence-level decoder may score with: the scorers, then the ARMs.
    pub fn names(&self) -> Vec<&str> {
        let scorers = self.scorers.iter().map(|s| s.name);
        scorers.chain(self.arm_names()).collect()
    }

    /// The source `name` stands for (a built-in scorer before an ARM of the same name), with
    /// its weight checked to be finite in f32, the precision decoders weigh rewards in.
    pub fn reward(&self, name: &str, weight: f64) -> Result<(Source, f32), RewardError> {
        let source = match (self.scorer(name), self.arm(name)) {
            (Some(s), _) => Source::Text(s.clone()),
            (None, Some(m)) => Source::Arm(m),
            (None, None) => {
                return Err(RewardError::Unknown { name: name.into() });
            }
        };
        match weight as f32 {
            w if w.is_finite() => Ok((source, w)),
            _ => Err(RewardError::Weight {
                name: name.into(),
                weight,
            }),
        }
    }
}

/// A `--reward` flag that is not NAME=PATH.
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("expected NAME=PATH, got `{0}`")]
pub struct FlagError(String);

/// Parse a `--reward NAME=PATH` flag.
pub fn parse_flag(flag: &str) -> Result<(String, PathBuf), FlagError> {
    match flag.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => {
            Ok((name.to_string(), PathBuf::from(path)))
        }
        _ => Err(FlagError(flag.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_builtin_scorer_takes_its_name_before_an_arm() {
        let r = Registry {
            arms: vec![Arm {
                name: "sentiment".into(),
                model: 1,
                description: String::new(),
            }],
            scorers: scorers::builtin(),
            drafts: Vec::new(),
        };
        assert!(r.draft(None).unwrap_err().contains("--draft-model"));
        assert!(matches!(
            r.reward("sentiment", 1.0),
            Ok((Source::Text(_), 1.0))
        ));
        assert_eq!(r.arm("sentiment"), Some(1));
        assert_eq!(
            r.reward("nope", 1.0).unwrap_err(),
            RewardError::Unknown {
                name: "nope".into()
            }
        );
        assert!(matches!(
            r.reward("sentiment", 1e39),
            Err(RewardError::Weight { .. })
        ));
        assert_eq!(r.names(), ["sentiment", "readability", "sentiment"]);
    }

    #[test]
    fn reward_flags_need_a_name_and_a_path() {
        assert_eq!(
            parse_flag("toy=/tmp/a=b"),
            Ok(("toy".to_string(), PathBuf::from("/tmp/a=b")))
        );
        for bad in ["toy", "=path", "toy="] {
            assert!(parse_flag(bad).is_err(), "{bad}");
        }
    }
}
