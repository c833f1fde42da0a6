//! The models a server runs beside its base — reward models and a draft — from the manifest
//! and from flags, each checked to tokenize exactly like the base: the decoders that run them
//! add log-probs, or hand tokens over, id by id.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::adapter::{self, Adapter};
use super::fetch::{models_dir, Manifest};
use super::{Model, Precision, Role};

/// Refuse a model that does not tokenize exactly like the base.
pub fn check_tokenizer(base: &Model, other: &Model) -> Result<()> {
    let (b, o) = (&base.vocab, &other.vocab);
    let role = other.role.name();
    if o.size() != b.size() {
        bail!(
            "{role} model `{}` has a {}-token vocabulary, the base model `{}` {}: a {role} model needs the base's tokenizer",
            other.name,
            o.size(),
            base.name,
            b.size()
        );
    }
    if o.digest != b.digest {
        bail!(
            "{role} model `{}` and the base model `{}` have different token tables (same size {}, different tokens): a {role} model needs the base's tokenizer",
            other.name,
            base.name,
            o.size()
        );
    }
    Ok(())
}

/// Load `name` from `path` in `role` and check it against `base`. An adapter folder becomes a
/// model on the base's own weights.
pub fn load(
    base: &Model,
    name: &str,
    path: &Path,
    role: Role,
    precision: Precision,
) -> Result<Model> {
    if adapter::is_adapter(path) {
        let adapter = Adapter::load(path, &base.llama.cfg)
            .with_context(|| format!("loading {} model `{name}`", role.name()))?;
        return Ok(Model {
            name: name.to_string(),
            role,
            llama: base.llama.with_adapter(adapter),
            vocab: base.vocab.clone(),
            chat: base.chat.clone(),
        });
    }
    let model = Model::load_with(path, name, role, precision)
        .with_context(|| format!("loading {} model `{name}`", role.name()))?;
    check_tokenizer(base, &model)?;
    Ok(model)
}

/// The entries of `role` in `dir/models.toml` whose files are present (absent ones are skipped
/// with a warning rather than stopping the server).
pub fn manifest(dir: &Path, role: Role) -> Result<Vec<(String, PathBuf)>> {
    let manifest = Manifest::load(dir)?;
    Ok(manifest
        .models
        .into_iter()
        .filter(|e| e.role == role)
        .filter_map(|e| {
            let path = dir.join(&e.file);
            if path.exists() {
                Some((e.name, path))
            } else {
                tracing::warn!(
                    "{} model `{}`: {} is missing",
                    role.name(),
                    e.name,
                    path.display()
                );
                None
            }
        })
        .collect())
}

/// What to load beside the base.
#[derive(Debug, Clone, Default)]
pub struct Companions {
    /// `--reward NAME=PATH` flags.
    pub rewards: Vec<(String, PathBuf)>,
    /// `--draft-model PATH`: replaces the manifest's draft.
    pub draft: Option<PathBuf>,
    /// Also the manifest's reward models and draft (a flag replaces an entry of its name).
    pub manifest: bool,
}

/// `base`, then its reward models — the manifest's that are present (skipped with a warning if
/// their tokenizer differs, as they may have been trained for another base), then the flags'
/// (an error if they do not load) — then its draft, the flag's or else the manifest's.
pub fn with_companions(base: Model, c: &Companions, precision: Precision) -> Result<Vec<Model>> {
    let listed = |role| match c.manifest {
        true => manifest(&models_dir(), role).unwrap_or_else(|e| {
            tracing::warn!("no {} models from the manifest: {e:#}", role.name());
            Vec::new()
        }),
        false => Vec::new(),
    };
    let mut models = Vec::new();
    for (name, path) in listed(Role::Reward) {
        if c.rewards.iter().any(|(n, _)| *n == name) {
            continue;
        }
        match load(&base, &name, &path, Role::Reward, precision) {
            Ok(arm) => models.push(arm),
            Err(e) => tracing::warn!("skipping reward model `{name}`: {e:#}"),
        }
    }
    for (i, (name, path)) in c.rewards.iter().enumerate() {
        if *name == base.name || c.rewards[..i].iter().any(|(n, _)| n == name) {
            bail!("--reward {name}: the name is already taken");
        }
        models.push(load(&base, name, path, Role::Reward, precision)?);
    }
    match &c.draft {
        Some(path) => {
            let name = path
                .file_stem()
                .map_or("draft".into(), |s| s.to_string_lossy().into_owned());
            if name == base.name || models.iter().any(|m| m.name == name) {
                bail!(
                    "--draft-model {}: the name `{name}` is already taken",
                    path.display()
                );
            }
            models.push(load(&base, &name, path, Role::Draft, precision)?);
        }
        None => {
            if let Some((name, path)) = listed(Role::Draft).into_iter().next() {
                match load(&base, &name, &path, Role::Draft, precision) {
                    Ok(draft) => models.push(draft),
                    Err(e) => tracing::warn!("skipping draft model `{name}`: {e:#}"),
                }
            }
        }
    }
    for m in &models {
        tracing::info!("{} model `{}` loaded", m.role.name(), m.name);
    }
    models.insert(0, base);
    Ok(models)
}
