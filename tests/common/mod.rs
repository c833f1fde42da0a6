//! Shared by the integration tests: the real default model, loaded once per test binary.

#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

use tilt::model::{fetch, Model, Role};

pub fn model_path() -> std::path::PathBuf {
    fetch::ensure(&fetch::models_dir(), fetch::DEFAULT_MODEL)
        .expect("the default model can be provisioned")
}

pub fn model() -> Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            Arc::new(
                Model::load(&model_path(), fetch::DEFAULT_MODEL, Role::Base).expect("model loads"),
            )
        })
        .clone()
}

/// The same model with weights expanded to f32: no int8 activation rounding, so results that
/// should be equal are equal to float precision (the quantized path is chaotic at ~0.5 logits).
pub fn exact_model() -> Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            Arc::new(
                Model::load_with(&model_path(), fetch::DEFAULT_MODEL, Role::Base, true)
                    .expect("model loads"),
            )
        })
        .clone()
}

pub fn golden() -> serde_json::Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/smollm2.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}
