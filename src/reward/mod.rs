//! Reward sources behind one seam. Two kinds:
//! - ARMs (autoregressive reward models): causal LMs loaded beside the base with `Role::Reward`
//!   and the base's tokenizer. Token-level decoders (GenARM) read their next-token log-probs;
//!   their sequence-level reward is Σ log π_r(y_t | x, y_<t).
//! - Programmatic scorers (`scorers`): functions of the finished text, for sequence-level decoders.
//!
//! The `Registry`, built once from the loaded models, resolves names to sources for every
//! decoder and lists them for `/v1/rewards`.

pub mod scorers;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::model::fetch::Manifest;
use crate::model::{Model, ModelId, ModelInfo, Precision, Role};
use scorers::Scorer;

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

/// Every reward source of a server: its ARMs, then the built-in scorers.
pub struct Registry {
    arms: Vec<Arm>,
    scorers: Vec<scorers::Builtin>,
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
                description: format!(
                    "autoregressive reward model ({} layers, hidden size {}): token-level log-probs",
                    m.config.n_layers, m.config.hidden
                ),
            })
            .collect();
        Self {
            arms,
            scorers: scorers::builtin(),
        }
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

/// Refuse an ARM that does not tokenize exactly like the base: GenARM adds log-probs token id by
/// token id, so the two must mean the same token by each id.
pub fn check_tokenizer(base: &Model, arm: &Model) -> Result<()> {
    let (b, a) = (&base.vocab, &arm.vocab);
    if a.size() != b.size() {
        bail!(
            "reward model `{}` has a {}-token vocabulary, the base model `{}` {}: an ARM needs the base's tokenizer",
            arm.name,
            a.size(),
            base.name,
            b.size()
        );
    }
    if a.digest != b.digest {
        bail!(
            "reward model `{}` and the base model `{}` have different token tables (same size {}, different tokens): an ARM needs the base's tokenizer",
            arm.name,
            base.name,
            a.size()
        );
    }
    Ok(())
}

/// Load the ARM `name` from `path` and check it against `base`.
pub fn load_arm(base: &Model, name: &str, path: &Path, precision: Precision) -> Result<Model> {
    let arm = Model::load_with(path, name, Role::Reward, precision)
        .with_context(|| format!("loading reward model `{name}`"))?;
    check_tokenizer(base, &arm)?;
    Ok(arm)
}

/// The reward entries of `dir/models.toml` whose files are present (none ship yet; absent ones
/// are skipped with a warning rather than stopping the server).
pub fn manifest_arms(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let manifest = Manifest::load(dir)?;
    Ok(manifest
        .models
        .into_iter()
        .filter(|e| e.role == Role::Reward)
        .filter_map(|e| {
            let path = dir.join(&e.file);
            if path.exists() {
                Some((e.name, path))
            } else {
                tracing::warn!("reward model `{}`: {} is missing", e.name, path.display());
                None
            }
        })
        .collect())
}

/// `base`, then its reward models: the manifest's that are present, unless `manifest` is false
/// (skipped with a warning if their tokenizer differs, as they may have been trained for another
/// base), then those named by `--reward NAME=PATH` flags (an error if they do not load).
pub fn with_rewards(
    base: Model,
    flags: &[(String, PathBuf)],
    manifest: bool,
    precision: Precision,
) -> Result<Vec<Model>> {
    let mut models = Vec::new();
    let manifest = match manifest {
        true => manifest_arms(&crate::model::fetch::models_dir()).unwrap_or_else(|e| {
            tracing::warn!("no reward models from the manifest: {e:#}");
            Vec::new()
        }),
        false => Vec::new(),
    };
    for (name, path) in manifest {
        if flags.iter().any(|(n, _)| *n == name) {
            continue;
        }
        match load_arm(&base, &name, &path, precision) {
            Ok(arm) => models.push(arm),
            Err(e) => tracing::warn!("skipping reward model `{name}`: {e:#}"),
        }
    }
    for (i, (name, path)) in flags.iter().enumerate() {
        if *name == base.name || flags[..i].iter().any(|(n, _)| n == name) {
            bail!("--reward {name}: the name is already taken");
        }
        models.push(load_arm(&base, name, path, precision)?);
    }
    for arm in &models {
        tracing::info!("reward model `{}` loaded", arm.name);
    }
    models.insert(0, base);
    Ok(models)
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
        };
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
        assert_eq!(r.names(), ["sentiment", "sentiment"]);
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
