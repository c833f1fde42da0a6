//! Reward sources behind one seam. Two kinds:
//! - ARMs (autoregressive reward models): causal LMs loaded into the engine with `Role::Reward`
//!   and the base's tokenizer. Token-level decoders (GenARM) read their next-token log-probs;
//!   their sequence-level reward is Σ log π_r(y_t | x, y_<t).
//! - Programmatic scorers (`scorers`): functions of the finished text, for sequence-level decoders.

pub mod scorers;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::engine::{ModelId, ModelInfo};
use crate::model::fetch::Manifest;
use crate::model::{Model, Precision, Role};

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

/// Every reward source: the engine's ARMs, then the built-in scorers.
pub fn list(models: &[ModelInfo]) -> Vec<RewardInfo> {
    let arms = models
        .iter()
        .filter(|m| m.role == Role::Reward)
        .map(|m| RewardInfo {
            name: m.name.clone(),
            kind: Kind::Arm,
            description: format!(
                "autoregressive reward model ({} layers, hidden size {}): token-level log-probs",
                m.config.n_layers, m.config.hidden
            ),
        });
    let builtin = scorers::builtin().into_iter().map(|s| RewardInfo {
        name: s.name.to_string(),
        kind: Kind::Programmatic,
        description: s.description.to_string(),
    });
    arms.chain(builtin).collect()
}

/// The engine's model that serves the ARM `name`.
pub fn arm(models: &[ModelInfo], name: &str) -> Option<ModelId> {
    models
        .iter()
        .position(|m| m.role == Role::Reward && m.name == name)
}

/// Names of the loaded ARMs.
pub fn arm_names(models: &[ModelInfo]) -> Vec<&str> {
    models
        .iter()
        .filter(|m| m.role == Role::Reward)
        .map(|m| m.name.as_str())
        .collect()
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

/// Parse a `--reward NAME=PATH` flag.
pub fn parse_flag(flag: &str) -> Result<(String, PathBuf), String> {
    match flag.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => {
            Ok((name.to_string(), PathBuf::from(path)))
        }
        _ => Err(format!("expected NAME=PATH, got `{flag}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
