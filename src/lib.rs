//! tilt: a test-time alignment inference server. See DESIGN.md in the shared design folder and
//! README.md for the layers: `api` (HTTP) → `engine` (batching thread) → `decode` (per-request
//! decoders) → `sampling` / `model` (candle forward, tokenizer, KV cache).

pub mod api;
pub mod bench;
pub mod decode;
pub mod engine;
pub mod eval;
pub mod math;
pub mod model;
pub mod reward;
pub mod sampling;
pub mod train;
