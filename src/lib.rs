//! tilt: a test-time alignment inference server. The layers, each importing only from those
//! below it: `api` (HTTP) → `engine` (the batching thread and the contract decoders implement)
//! and `decode` (one file per decoder) → `reward` (reward sources) → `model` (forward,
//! tokenizer, KV cache); `sampling`, `math` and `progress` serve them all.

pub mod api;
pub mod bench;
pub mod decode;
pub mod engine;
pub mod eval;
pub mod math;
pub mod model;
pub mod progress;
pub mod reward;
pub mod sampling;
pub mod train;
