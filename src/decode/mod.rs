//! Decoders: each owns one request's state machine. Every step it plans forwards (on any model,
//! any number of sequences), then absorbs their logits and emits tokens. Token-level decoders and
//! search decoders share this one seam, so the engine batches them all together.

mod choice;
pub mod sample;

use anyhow::Result;

use crate::engine::Cx;
use crate::engine::Outputs;
use crate::sampling::SamplingParams;

pub use choice::Choice;
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
}

/// Names of the decoders a request may ask for.
pub const DECODERS: &[&str] = &["sample"];

/// The decoder named `name` for `generation`.
pub fn build(name: &str, generation: Generation) -> Result<Box<dyn Decoder>, String> {
    match name {
        "sample" => Ok(Box::new(Sample::new(generation))),
        other => Err(format!(
            "unknown decoder `{other}`; available: {}",
            DECODERS.join(", ")
        )),
    }
}
