//! Decoders: one file each. A decoder owns one request's state machine behind the engine's
//! `Decoder` trait, and describes itself with one `Method`: its name, its parameters parsed into
//! a checked spec, the models it runs, its limit on choices, and how it is built. `DECODERS` is
//! the table of them; nothing outside this folder tells one decoder from another.
//!
//! What several decoders share: `prompt` (prefill once, fork), `choice` (one streamed answer),
//! `track` (models reading the answers beside the base), `objectives` (what search decoders
//! score with).

pub mod adaptive;
pub mod args;
pub mod best_of_n;
mod choice;
pub mod deal;
pub mod equilibrium;
pub mod genarm;
pub mod lexical;
pub mod objectives;
mod prompt;
pub mod sample;
mod score;
mod track;

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde_json::Value;

use crate::engine::Decoder;
use crate::model::{ModelId, ModelInfo};
use crate::reward::Registry;
use crate::sampling::SamplingParams;

pub use choice::Choice;
pub use score::Likelihoods;

/// Every decoder a request may name, in the order they are listed.
const DECODERS: &[&dyn Entry] = &[
    &sample::Sample,
    &genarm::GenArm,
    &best_of_n::BestOfN,
    &args::Args,
    &deal::Deal,
    &equilibrium::Equilibrium,
    &adaptive::Adaptive,
];

/// The names of the decoders.
pub fn names() -> Vec<&'static str> {
    DECODERS.iter().map(|d| d.name()).collect()
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

/// A decoder parameter a request got wrong: `param` names it (relative to the decoder's
/// parameter object), `message` says what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParamError {
    pub param: Option<String>,
    pub message: String,
}

impl ParamError {
    pub fn new(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
            message: message.into(),
        }
    }
}

/// A decoder's parameters: the request's `alignment` object without `decoder`.
pub type Params = serde_json::Map<String, Value>;

/// What each decoder file implements besides the engine's `Decoder`.
pub trait Method: Copy + Send + Sync + 'static {
    /// The checked parameters: what a request's choice of this decoder becomes before any work.
    type Spec: fmt::Debug + Send + Sync + 'static;
    fn name(&self) -> &'static str;
    fn parse(&self, params: Params, rewards: &Registry) -> Result<Self::Spec, ParamError>;
    /// Models other than the base that the decoder runs (they need the prompt in their tokens).
    fn models(&self, _spec: &Self::Spec) -> Vec<ModelId> {
        Vec::new()
    }
    /// Whether the decoder can give the request's `n` choices; if not, why.
    fn check_choices(&self, _spec: &Self::Spec, _n: usize) -> Result<(), String> {
        Ok(())
    }
    /// Whether the decoder keeps its answers to a grammar (`response_format`); if not, why.
    fn check_grammar(&self, _spec: &Self::Spec) -> Result<(), String> {
        Ok(())
    }
    /// The decoder for one prompt, or why it cannot serve it (`models`: the engine's).
    fn build(
        &self,
        spec: &Self::Spec,
        generation: Generation,
        models: &[ModelInfo],
    ) -> Result<Box<dyn Decoder>, ParamError>;
}

/// A decoder and its checked parameters.
#[derive(Clone)]
pub struct DecoderSpec(Arc<dyn Checked>);

impl DecoderSpec {
    /// The decoder `name` with `params`, its reward names resolved in `rewards`.
    pub fn parse(name: &str, params: Params, rewards: &Registry) -> Result<Self, ParamError> {
        match DECODERS.iter().find(|d| d.name() == name) {
            Some(d) => d.parse(params, rewards),
            None => Err(ParamError::new(
                "decoder",
                format!(
                    "unknown decoder `{name}`; available: {}",
                    names().join(", ")
                ),
            )),
        }
    }

    /// Plain sampling, what a request without `alignment` gets.
    pub fn sample() -> Self {
        Self(Arc::new(Bound {
            method: sample::Sample,
            spec: (),
        }))
    }

    pub fn name(&self) -> &'static str {
        self.0.name()
    }

    /// Models other than the base that the decoder runs.
    pub fn models(&self) -> Vec<ModelId> {
        self.0.models()
    }

    /// Whether the decoder can give the request's `n` choices; if not, why.
    pub fn check_choices(&self, n: usize) -> Result<(), String> {
        self.0.check_choices(n)
    }

    /// Whether the decoder keeps its answers to a grammar (`response_format`); if not, why.
    pub fn check_grammar(&self) -> Result<(), String> {
        self.0.check_grammar()
    }

    /// The decoder for one prompt, or why it cannot serve it (`models`: the engine's). With
    /// `max_tokens` 0 nothing is decoded: the prompt alone is scored.
    pub fn build(
        &self,
        generation: Generation,
        models: &[ModelInfo],
    ) -> Result<Box<dyn Decoder>, ParamError> {
        if generation.max_tokens == 0 {
            return Ok(Box::new(prompt::PromptOnly::new(generation)));
        }
        self.0.build(generation, models)
    }

    /// The checked parameters, if the decoder's are of type `S`.
    pub fn get<S: 'static>(&self) -> Option<&S> {
        self.0.spec().downcast_ref()
    }
}

impl fmt::Debug for DecoderSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.debug(f)
    }
}

/// The decoder named `name` with default parameters, for `generation` on `models`.
pub fn build(
    name: &str,
    generation: Generation,
    models: &[ModelInfo],
) -> Result<Box<dyn Decoder>, ParamError> {
    let spec = DecoderSpec::parse(name, Params::new(), &Registry::new(models))?;
    spec.build(generation, models)
}

/// A row of the table: a `Method` with its spec type erased.
trait Entry: Sync {
    fn name(&self) -> &'static str;
    fn parse(&self, params: Params, rewards: &Registry) -> Result<DecoderSpec, ParamError>;
}

impl<M: Method> Entry for M {
    fn name(&self) -> &'static str {
        Method::name(self)
    }

    fn parse(&self, params: Params, rewards: &Registry) -> Result<DecoderSpec, ParamError> {
        let spec = Method::parse(self, params, rewards)?;
        Ok(DecoderSpec(Arc::new(Bound {
            method: *self,
            spec,
        })))
    }
}

/// A spec with its method.
struct Bound<M: Method> {
    method: M,
    spec: M::Spec,
}

trait Checked: Send + Sync {
    fn name(&self) -> &'static str;
    fn models(&self) -> Vec<ModelId>;
    fn check_choices(&self, n: usize) -> Result<(), String>;
    fn check_grammar(&self) -> Result<(), String>;
    fn build(
        &self,
        generation: Generation,
        models: &[ModelInfo],
    ) -> Result<Box<dyn Decoder>, ParamError>;
    fn spec(&self) -> &dyn Any;
    fn debug(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result;
}

impl<M: Method> Checked for Bound<M> {
    fn name(&self) -> &'static str {
        self.method.name()
    }

    fn models(&self) -> Vec<ModelId> {
        let mut models = self.method.models(&self.spec);
        models.sort_unstable();
        models.dedup();
        models
    }

    fn check_choices(&self, n: usize) -> Result<(), String> {
        self.method.check_choices(&self.spec, n)
    }

    fn check_grammar(&self) -> Result<(), String> {
        self.method.check_grammar(&self.spec)
    }

    fn build(
        &self,
        generation: Generation,
        models: &[ModelInfo],
    ) -> Result<Box<dyn Decoder>, ParamError> {
        self.method.build(&self.spec, generation, models)
    }

    fn spec(&self) -> &dyn Any {
        &self.spec
    }

    fn debug(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.method.name(), self.spec)
    }
}

/// Deserialize a decoder's parameter object, naming the offending field on error.
pub(crate) fn typed<T: serde::de::DeserializeOwned>(params: Params) -> Result<T, ParamError> {
    serde_path_to_error::deserialize(Value::Object(params)).map_err(|e| {
        // The path ends at the offending field, an unknown one included.
        let path = e.path().to_string();
        ParamError {
            param: (path != ".").then_some(path),
            message: e.into_inner().to_string(),
        }
    })
}

/// A count parameter within `min..=max`.
pub(crate) fn within(
    param: &str,
    value: usize,
    min: usize,
    max: usize,
) -> Result<usize, ParamError> {
    if (min..=max).contains(&value) {
        return Ok(value);
    }
    Err(ParamError::new(
        param,
        format!("`{param}` must be between {min} and {max}, got {value}"),
    ))
}

/// A real parameter that must be finite in f32, the precision decoders weigh rewards in.
pub(crate) fn finite(param: &str, value: f64) -> Result<f32, ParamError> {
    let v = value as f32;
    if v.is_finite() {
        return Ok(v);
    }
    Err(ParamError::new(
        param,
        format!("`{param}` must be a finite number, got {value}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(v: Value) -> Params {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn sample_parses_and_rejects_unknown_parameters() {
        let rewards = Registry::new(&[]);
        let spec = DecoderSpec::parse("sample", params(json!({})), &rewards).unwrap();
        assert_eq!(spec.name(), "sample");
        let e = DecoderSpec::parse("sample", params(json!({"beta": 1.0})), &rewards).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("beta"));
    }

    #[test]
    fn unknown_decoder_lists_the_available_ones() {
        let e = DecoderSpec::parse("nope", params(json!({})), &Registry::new(&[])).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("decoder"));
        for d in names() {
            assert!(e.message.contains(d), "{}", e.message);
        }
    }

    #[test]
    fn every_decoder_builds_with_its_defaults_or_says_what_it_needs() {
        let rewards = Registry::new(&[]);
        for name in names() {
            match DecoderSpec::parse(name, Params::new(), &rewards) {
                Ok(spec) => assert_eq!(spec.name(), name),
                Err(e) => assert!(e.param.is_some(), "{name}: {e}"),
            }
        }
    }
}

/// What decoder tests share: requests on the fake model.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::engine::fake::{self, FakeModel, Streamed};
    use crate::engine::{Engine, EngineOptions};

    /// A request for `prompt` (fake word ids).
    pub fn generation(prompt: &[u32], max_tokens: usize, sampling: SamplingParams) -> Generation {
        Generation {
            prompt: prompt.to_vec(),
            max_tokens,
            stop: Vec::new(),
            ignore_eos: false,
            n: 1,
            sampling,
            model_prompts: HashMap::new(),
        }
    }

    /// Sampling at temperature 1 with `seed`.
    pub fn seeded(seed: u64) -> SamplingParams {
        SamplingParams {
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    /// An engine over `models` (the first the base).
    pub fn engine(models: Vec<FakeModel>) -> Engine {
        Engine::start(models, EngineOptions::default())
    }

    /// Run the decoder `name` with `params` (a JSON object) for `generation`.
    pub fn run(engine: &Engine, name: &str, params: Value, generation: Generation) -> Streamed {
        let spec = spec(engine, name, params);
        let decoder = spec
            .build(generation, engine.models())
            .expect("the decoder builds");
        let out = fake::run(engine, decoder);
        assert!(out.failure.is_none(), "{name}: {:?}", out.failure);
        out
    }

    pub fn spec(engine: &Engine, name: &str, params: Value) -> DecoderSpec {
        let params = params.as_object().cloned().expect("an object");
        DecoderSpec::parse(name, params, engine.rewards()).expect("the parameters parse")
    }
}
