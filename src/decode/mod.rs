//! Decoders: each owns one request's state machine. Every step it plans forwards (on any model,
//! any number of sequences), then absorbs their logits and emits tokens. Token-level decoders and
//! search decoders share this one seam, so the engine batches them all together.

pub mod args;
pub mod best_of_n;
mod choice;
pub mod deal;
pub mod genarm;
pub mod objectives;
mod prompt;
pub mod sample;

use std::collections::{BTreeMap, HashMap};

use anyhow::Result;

use crate::engine::{Cx, ModelId, ModelInfo, Outputs};
use crate::reward;
use crate::sampling::SamplingParams;
use objectives::Constraints;

pub use args::{Args, ArgsSpec};
pub use best_of_n::{BestOfN, BestOfNSpec};
pub use choice::Choice;
pub use deal::{Deal, DealSpec};
pub use genarm::{ArmWeight, GenArm, GenArmSpec};
pub use sample::Sample;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Done,
}

pub trait Decoder: Send {
    /// Schedule this step's forwards with `cx.forward` (or none).
    fn plan(&mut self, cx: &mut Cx) -> Result<()>;
    /// Read the logits of the forwards scheduled in `plan` and advance.
    fn absorb(&mut self, cx: &mut Cx, out: &Outputs) -> Result<Flow>;
}

/// A validated generation request, in base-model tokens.
#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Keep going past end-of-generation tokens (exactly `max_tokens`, for benchmarks).
    pub ignore_eos: bool,
    /// Choices to return.
    pub n: usize,
    pub sampling: SamplingParams,
    /// The prompt in the tokens of other models that the decoder runs, each formatted with that
    /// model's own chat template. A model missing here reads `prompt` (ARMs share the base's
    /// vocabulary, so only the templates can differ).
    pub model_prompts: HashMap<ModelId, Vec<u32>>,
}

impl Generation {
    /// The prompt as `model` reads it.
    pub fn prompt_for(&self, model: ModelId) -> &[u32] {
        self.model_prompts.get(&model).unwrap_or(&self.prompt)
    }
}

/// Names of the decoders a request may ask for.
pub const DECODERS: &[&str] = &["sample", "genarm", "best_of_n", "args", "deal"];

/// A decoder parameter a request got wrong: `param` names it (relative to the decoder's
/// parameter object), `message` says what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError {
    pub param: Option<String>,
    pub message: String,
}

/// A decoder and its checked parameters: what a request's choice of decoder becomes before any
/// work starts. Each decoder deserializes its own typed parameters, so a new decoder adds a
/// variant, a parameter struct and a line in `parse`.
#[derive(Debug, Clone, PartialEq)]
pub enum DecoderSpec {
    Sample,
    GenArm(GenArmSpec),
    BestOfN(BestOfNSpec),
    Args(ArgsSpec),
    Deal(DealSpec),
}

/// `sample` takes no parameters beyond the request's sampling fields.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SampleParams {}

/// `genarm`: reward name → weight, and the KL strength β (each ARM's log-probs count w/β).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct GenArmParams {
    #[serde(default)]
    rewards: BTreeMap<String, f64>,
    beta: Option<f64>,
}

/// `best_of_n`: candidates, programmatic rewards and per-request constraints, selection.
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
}

fn default_candidates() -> usize {
    4
}

/// `args`: candidates per step, how one is picked, and the rewards that rescore them.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ArgsParams {
    #[serde(default = "default_args_top_k")]
    top_k: usize,
    #[serde(default)]
    mode: args::Mode,
    /// ARGS' w; the paper's default.
    #[serde(default = "default_weight")]
    weight: f64,
    #[serde(default)]
    rewards: BTreeMap<String, f64>,
    #[serde(default)]
    constraints: Constraints,
}

/// The paper's and the official code's k.
fn default_args_top_k() -> usize {
    10
}

/// `deal`: the search's shape, the reward's weight λ and the rewards.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DealParams {
    #[serde(default = "default_deal_top_k")]
    top_k: usize,
    #[serde(default = "default_beam_width")]
    beam_width: usize,
    #[serde(default = "default_lookahead")]
    lookahead: usize,
    #[serde(default = "default_weight")]
    lambda: f64,
    #[serde(default)]
    rewards: BTreeMap<String, f64>,
    #[serde(default)]
    constraints: Constraints,
}

fn default_deal_top_k() -> usize {
    4
}

fn default_beam_width() -> usize {
    2
}

fn default_lookahead() -> usize {
    8
}

fn default_weight() -> f64 {
    1.0
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum SelectionName {
    #[default]
    Hard,
    Soft,
}

impl DecoderSpec {
    /// The decoder `name` with `params` (the remaining fields of the request's decoder object);
    /// reward names are resolved against the engine's `models`.
    pub fn parse(
        name: &str,
        params: serde_json::Map<String, serde_json::Value>,
        models: &[ModelInfo],
    ) -> Result<Self, ParamError> {
        match name {
            "sample" => typed::<SampleParams>(params).map(|_| Self::Sample),
            "genarm" => genarm_spec(typed(params)?, models).map(Self::GenArm),
            "best_of_n" => best_of_n_spec(typed(params)?, models).map(Self::BestOfN),
            "args" => args_spec(typed(params)?, models).map(Self::Args),
            "deal" => deal_spec(typed(params)?, models).map(Self::Deal),
            other => Err(ParamError {
                param: Some("decoder".into()),
                message: format!(
                    "unknown decoder `{other}`; available: {}",
                    DECODERS.join(", ")
                ),
            }),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Sample => "sample",
            Self::GenArm(_) => "genarm",
            Self::BestOfN(_) => "best_of_n",
            Self::Args(_) => "args",
            Self::Deal(_) => "deal",
        }
    }

    /// Models other than the base that the decoder runs (they need the prompt in their tokens).
    pub fn models(&self) -> Vec<ModelId> {
        match self {
            Self::Sample => Vec::new(),
            Self::Deal(spec) => {
                let mut models: Vec<ModelId> = spec.arms().map(|(_, m)| m).collect();
                models.sort_unstable();
                models.dedup();
                models
            }
            Self::Args(spec) => {
                let mut models: Vec<ModelId> = spec.arms().map(|(_, m)| m).collect();
                models.sort_unstable();
                models.dedup();
                models
            }
            Self::GenArm(spec) => spec.active().map(|a| a.model).collect(),
            Self::BestOfN(spec) => {
                let mut models: Vec<ModelId> = spec.guide.active().map(|a| a.model).collect();
                models.extend(spec.scoring_models());
                models.sort_unstable();
                models.dedup();
                models
            }
        }
    }

    pub fn build(&self, generation: Generation) -> Box<dyn Decoder> {
        match self {
            Self::Sample => Box::new(Sample::new(generation)),
            Self::GenArm(spec) => Box::new(GenArm::new(spec.clone(), generation)),
            Self::BestOfN(spec) => Box::new(BestOfN::new(spec.clone(), generation)),
            Self::Args(spec) => Box::new(Args::new(spec.clone(), generation)),
            Self::Deal(spec) => Box::new(Deal::new(spec.clone(), generation)),
        }
    }
}

fn genarm_spec(p: GenArmParams, models: &[ModelInfo]) -> Result<GenArmSpec, ParamError> {
    genarm_spec_at("", p, models)
}

/// `genarm_spec` for parameters found under `prefix` (e.g. `guide.` inside best_of_n).
fn genarm_spec_at(
    prefix: &str,
    p: GenArmParams,
    models: &[ModelInfo],
) -> Result<GenArmSpec, ParamError> {
    let invalid = |param: String, message: String| ParamError {
        param: Some(format!("{prefix}{param}")),
        message,
    };
    // Checked in f32, the precision the decoder computes in: 1e39 is finite only as an f64.
    let beta = p.beta.unwrap_or(1.0) as f32;
    if !(beta.is_finite() && beta > 0.0) {
        return Err(invalid(
            "beta".into(),
            format!(
                "`beta` must be a finite number above 0, got {}",
                p.beta.unwrap_or(1.0)
            ),
        ));
    }
    let mut rewards = Vec::with_capacity(p.rewards.len());
    for (name, w) in p.rewards {
        let param = format!("rewards.{name}");
        let Some(model) = reward::arm(models, &name) else {
            let loaded = reward::arm_names(models);
            let loaded = if loaded.is_empty() {
                "none are loaded (start the server with `--reward NAME=PATH`)".to_string()
            } else {
                format!("loaded: {}", loaded.join(", "))
            };
            let what = if reward::scorers::builtin().iter().any(|b| b.name == name) {
                "is a programmatic (sequence-level) reward"
            } else {
                "is not a loaded reward model"
            };
            return Err(invalid(
                "rewards".into(),
                format!("`{name}` {what}; genarm steers with reward models, {loaded}"),
            ));
        };
        let weight = w as f32;
        if !(weight.is_finite() && (weight / beta).is_finite()) {
            return Err(invalid(
                param,
                format!("the weight of `{name}` must be a finite number (also once divided by `beta`), got {w}"),
            ));
        }
        rewards.push(ArmWeight {
            name,
            model,
            weight,
        });
    }
    Ok(GenArmSpec { rewards, beta })
}

fn best_of_n_spec(p: BestOfNParams, models: &[ModelInfo]) -> Result<BestOfNSpec, ParamError> {
    use best_of_n::{Selection, MAX_CALIBRATE, MAX_N};
    let invalid = |param: &str, message: String| ParamError {
        param: Some(param.into()),
        message,
    };
    if !(1..=MAX_N).contains(&p.n) {
        return Err(invalid(
            "n",
            format!("`n` must be between 1 and {MAX_N}, got {}", p.n),
        ));
    }
    if p.calibrate > MAX_CALIBRATE {
        return Err(invalid(
            "calibrate",
            format!(
                "`calibrate` must be at most {MAX_CALIBRATE} reference samples, got {}",
                p.calibrate
            ),
        ));
    }
    let selection = match (p.selection, p.beta) {
        (SelectionName::Hard, None) => Selection::Hard,
        (SelectionName::Hard, Some(_)) => {
            return Err(invalid(
                "beta",
                "`beta` applies only to `selection: \"soft\"`".into(),
            ))
        }
        (SelectionName::Soft, beta) => {
            // RSO's default.
            let beta = beta.unwrap_or(0.5);
            if !(beta.is_finite() && beta > 0.0) {
                return Err(invalid(
                    "beta",
                    format!("`beta` must be a finite number above 0, got {beta}"),
                ));
            }
            Selection::Soft { beta }
        }
    };
    let objectives = objectives::parse("best_of_n", "select by", p.rewards, p.constraints, models)?;
    let guide = match p.guide {
        Some(g) => genarm_spec_at("guide.", g, models)?,
        None => GenArmSpec {
            rewards: Vec::new(),
            beta: 1.0,
        },
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

/// A count parameter within `1..=max`.
fn within(param: &str, value: usize, min: usize, max: usize) -> Result<usize, ParamError> {
    if (min..=max).contains(&value) {
        return Ok(value);
    }
    Err(ParamError {
        param: Some(param.into()),
        message: format!("`{param}` must be between {min} and {max}, got {value}"),
    })
}

fn args_spec(p: ArgsParams, models: &[ModelInfo]) -> Result<ArgsSpec, ParamError> {
    Ok(ArgsSpec {
        top_k: within("top_k", p.top_k, 1, args::MAX_TOP_K)?,
        mode: p.mode,
        weight: finite("weight", p.weight)?,
        objectives: objectives::parse("args", "steer by", p.rewards, p.constraints, models)?,
    })
}

/// A real parameter that must be finite in f32, the precision decoders weigh rewards in.
fn finite(param: &str, value: f64) -> Result<f32, ParamError> {
    let v = value as f32;
    if v.is_finite() {
        return Ok(v);
    }
    Err(ParamError {
        param: Some(param.into()),
        message: format!("`{param}` must be a finite number, got {value}"),
    })
}

fn deal_spec(p: DealParams, models: &[ModelInfo]) -> Result<DealSpec, ParamError> {
    let lambda = finite("lambda", p.lambda)?;
    Ok(DealSpec {
        top_k: within("top_k", p.top_k, 1, deal::MAX_TOP_K)?,
        beam_width: within("beam_width", p.beam_width, 1, deal::MAX_BEAM_WIDTH)?,
        lookahead: within("lookahead", p.lookahead, 0, deal::MAX_LOOKAHEAD)?,
        lambda,
        objectives: objectives::parse("deal", "steer by", p.rewards, p.constraints, models)?,
    })
}

/// Deserialize a decoder's parameter object, naming the offending field on error.
fn typed<T: serde::de::DeserializeOwned>(
    params: serde_json::Map<String, serde_json::Value>,
) -> Result<T, ParamError> {
    let value = serde_json::Value::Object(params);
    serde_path_to_error::deserialize(value).map_err(|e| {
        // The path ends at the offending field, an unknown one included.
        let path = e.path().to_string();
        ParamError {
            param: (path != ".").then_some(path),
            message: e.into_inner().to_string(),
        }
    })
}

/// The decoder named `name` with default parameters, for `generation`.
pub fn build(name: &str, generation: Generation) -> Result<Box<dyn Decoder>, String> {
    let spec = DecoderSpec::parse(name, Default::default(), &[]).map_err(|e| e.message)?;
    Ok(spec.build(generation))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn sample_parses_and_rejects_unknown_parameters() {
        assert_eq!(
            DecoderSpec::parse("sample", params(json!({})), &[]),
            Ok(DecoderSpec::Sample)
        );
        let e = DecoderSpec::parse("sample", params(json!({"beta": 1.0})), &[]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("beta"));
    }

    #[test]
    fn search_decoders_have_their_documented_defaults() {
        let kw = json!({"constraints": {"keywords": ["sea"]}});
        let Ok(DecoderSpec::Deal(d)) = DecoderSpec::parse("deal", params(kw.clone()), &[]) else {
            panic!("deal parses");
        };
        assert_eq!(
            (d.top_k, d.beam_width, d.lookahead, d.lambda),
            (4, 2, 8, 1.0)
        );
        let Ok(DecoderSpec::Args(a)) = DecoderSpec::parse("args", params(kw), &[]) else {
            panic!("args parses");
        };
        assert_eq!((a.top_k, a.mode, a.weight), (10, args::Mode::Greedy, 1.0));
        assert_eq!(a.objectives[0].name, "keywords");
        let e = DecoderSpec::parse("deal", params(json!({"lookahead": 65})), &[]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("lookahead"));
    }

    #[test]
    fn unknown_decoder_lists_the_available_ones() {
        let e = DecoderSpec::parse("nope", params(json!({})), &[]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("decoder"));
        for d in DECODERS {
            assert!(e.message.contains(d), "{}", e.message);
        }
    }
}
