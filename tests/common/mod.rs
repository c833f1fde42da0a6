//! Shared by the integration tests: the real default model, loaded once per test binary.

#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

use tilt::model::{fetch, Model, Precision, Role};

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
                Model::load_with(
                    &model_path(),
                    fetch::DEFAULT_MODEL,
                    Role::Base,
                    Precision::F32,
                )
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

/// Write a tiny llama-architecture ARM (safetensors, 1 layer, hidden 64) into `dir` that puts
/// about 10 nats more next-token log-probability on `favoured` than on any other token, whatever
/// the context: every embedding is the same vector and the layer adds nothing, so the untied
/// output head sees one hidden state and only `favoured`'s row is non-zero. It uses the base's
/// tokenizer after `edit` (which may change it, to make a mismatching ARM) and its own chat
/// template.
pub fn toy_arm(dir: &std::path::Path, favoured: u32, edit: impl FnOnce(&mut serde_json::Value)) {
    use candle_core::{DType, Device, Tensor};
    use std::collections::HashMap;

    let mut file = std::fs::File::open(model_path()).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let mut tokenizer = tilt::model::vocab::tokenizer_json_from_gguf(&content).unwrap();
    edit(&mut tokenizer);
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let tokens = tilt::model::Vocab::from_dir(dir).unwrap().size();

    let (hidden, ffn, layers) = (64, 128, 1);
    let dev = Device::Cpu;
    let ones = |shape: &[usize]| Tensor::ones(shape, DType::F32, &dev).unwrap();
    let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &dev).unwrap();
    // RMS-normed all-ones hidden state · head row of 10/hidden = a logit of 10.
    let mut head = vec![0f32; tokens * hidden];
    head[favoured as usize * hidden..][..hidden].fill(10.0 / hidden as f32);
    let mut t: HashMap<String, Tensor> = HashMap::from([
        ("model.embed_tokens.weight".into(), ones(&[tokens, hidden])),
        ("model.norm.weight".into(), ones(&[hidden])),
        (
            "lm_head.weight".into(),
            Tensor::from_vec(head, (tokens, hidden), &dev).unwrap(),
        ),
    ]);
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for (name, shape) in [
            ("self_attn.q_proj", [hidden, hidden]),
            ("self_attn.k_proj", [hidden, hidden]),
            ("self_attn.v_proj", [hidden, hidden]),
            ("self_attn.o_proj", [hidden, hidden]),
            ("mlp.gate_proj", [ffn, hidden]),
            ("mlp.up_proj", [ffn, hidden]),
            ("mlp.down_proj", [hidden, ffn]),
        ] {
            t.insert(format!("{p}.{name}.weight"), zeros(&shape));
        }
        t.insert(format!("{p}.input_layernorm.weight"), ones(&[hidden]));
        t.insert(
            format!("{p}.post_attention_layernorm.weight"),
            ones(&[hidden]),
        );
    }
    let t: HashMap<String, Tensor> = t
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F16).unwrap()))
        .collect();
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": tokens, "hidden_size": hidden, "intermediate_size": ffn,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 4,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 2048, "tie_word_embeddings": false,
        "torch_dtype": "float16"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:";
    let tok_cfg = serde_json::json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": false, "chat_template": template});
    std::fs::write(dir.join("tokenizer_config.json"), tok_cfg.to_string()).unwrap();
}

/// The single base token that spells `text`.
pub fn single_token(text: &str) -> u32 {
    match model().vocab.encode(text, false).unwrap()[..] {
        [t] => t,
        ref ts => panic!("{text:?} is {} tokens", ts.len()),
    }
}

/// What a run streamed: choice 0's tokens and text, the completion tokens, and the report.
pub struct Run {
    pub tokens: Vec<u32>,
    pub text: String,
    pub completion_tokens: usize,
    pub report: serde_json::Value,
}

/// Run one request through `engine` and collect what it streamed.
pub fn run(
    engine: &tilt::engine::Engine,
    spec: &tilt::decode::DecoderSpec,
    g: tilt::decode::Generation,
) -> Run {
    let (mut tokens, mut text) = (Vec::new(), String::new());
    let mut rx = engine
        .submit(spec.build(g, engine.models()).unwrap())
        .unwrap();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            tilt::engine::Event::Token(t) => {
                assert_eq!(t.choice, 0);
                tokens.push(t.token);
                text.push_str(&t.text);
            }
            tilt::engine::Event::Finished { text: rest, .. } => text.push_str(&rest),
            tilt::engine::Event::Done { usage, report } => {
                return Run {
                    tokens,
                    text,
                    completion_tokens: usage.completion_tokens,
                    report: report.unwrap_or_default(),
                }
            }
            tilt::engine::Event::Failed(msg) => panic!("request failed: {msg}"),
            _ => {}
        }
    }
    panic!("the engine stopped");
}

/// An engine over the base and a toy ARM named `toy` that favours `favoured` (see `toy_arm`);
/// the tempdir holds the ARM's files.
pub fn engine_with_toy_arm(favoured: u32) -> (tilt::engine::Engine, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    toy_arm(dir.path(), favoured, |_| {});
    let base = Model::load(&model_path(), "smollm2", Role::Base).unwrap();
    let arm =
        tilt::model::companions::load(&base, "toy", dir.path(), Role::Reward, Precision::Q8_0)
            .unwrap();
    let options = tilt::engine::EngineOptions::default();
    (tilt::engine::Engine::start(vec![base, arm], options), dir)
}

/// A `(rows, cols)` tensor of values in ±`bound`, the same for the same `seed` (candle's own
/// random tensors cannot be seeded).
pub fn draw(shape: (usize, usize), bound: f32, seed: u64) -> candle_core::Tensor {
    let values: Vec<f32> = (0..(shape.0 * shape.1) as u64)
        .map(|i| {
            let x = (i.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03))
            .wrapping_mul(0xBF58_476D_1CE4_E5B9);
            bound * ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
        })
        .collect();
    candle_core::Tensor::from_vec(values, shape, &candle_core::Device::Cpu).unwrap()
}
