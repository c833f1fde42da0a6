//! The Hugging Face path (`config.json` + `*.safetensors` + `tokenizer.json`): the default GGUF,
//! written out the way Hugging Face stores llama (f16, un-permuted q/k for half-split RoPE), must
//! tokenize identically and give the same logits as the GGUF run in f32.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use tilt::model::{vocab::tokenizer_json_from_gguf, ForwardItem, KvCache, Logits, Model, Role};

/// llama.cpp's converter permutes q/k rows so interleaved RoPE reproduces Hugging Face's half-split
/// RoPE; undo it: `(heads, hd/2, 2, dim) -> (heads, 2, hd/2, dim)`.
fn unpermute(w: &Tensor, heads: usize) -> Tensor {
    let (rows, dim) = w.dims2().unwrap();
    let hd = rows / heads;
    w.reshape((heads, hd / 2, 2, dim))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, dim))
        .unwrap()
}

fn export_hf(gguf: &Path, dir: &Path) {
    let mut file = std::fs::File::open(gguf).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let md = &content.metadata;
    let int = |k: &str| tilt::model::config::gguf_int(&md[k]).unwrap() as usize;
    let (heads, kv_heads, layers) = (
        int("llama.attention.head_count"),
        int("llama.attention.head_count_kv"),
        int("llama.block_count"),
    );
    let mut out: HashMap<String, Tensor> = HashMap::new();
    let mut put = |name: String, t: Tensor| {
        out.insert(name, t.to_dtype(DType::F16).unwrap());
    };
    let mut get = |n: &str| {
        content
            .tensor(&mut file, n, &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
    };
    put("model.embed_tokens.weight".into(), get("token_embd.weight"));
    put("model.norm.weight".into(), get("output_norm.weight"));
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        put(
            format!("{p}.self_attn.q_proj.weight"),
            unpermute(&get(&format!("blk.{i}.attn_q.weight")), heads),
        );
        put(
            format!("{p}.self_attn.k_proj.weight"),
            unpermute(&get(&format!("blk.{i}.attn_k.weight")), kv_heads),
        );
        for (hf, gg) in [
            ("self_attn.v_proj", "attn_v"),
            ("self_attn.o_proj", "attn_output"),
            ("mlp.gate_proj", "ffn_gate"),
            ("mlp.up_proj", "ffn_up"),
            ("mlp.down_proj", "ffn_down"),
            ("input_layernorm", "attn_norm"),
            ("post_attention_layernorm", "ffn_norm"),
        ] {
            put(
                format!("{p}.{hf}.weight"),
                get(&format!("blk.{i}.{gg}.weight")),
            );
        }
    }
    candle_core::safetensors::save(&out, dir.join("model.safetensors")).unwrap();
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int("llama.vocab_size"), "hidden_size": int("llama.embedding_length"),
        "intermediate_size": int("llama.feed_forward_length"), "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "rope_theta": md["llama.rope.freq_base"].to_f32().unwrap(), "rms_norm_eps": 1e-5,
        "max_position_embeddings": int("llama.context_length"), "tie_word_embeddings": true,
        "torch_dtype": "float16"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer.json"),
        tokenizer_json_from_gguf(&content).unwrap().to_string(),
    )
    .unwrap();
    let template = md["tokenizer.chat_template"].to_string().unwrap();
    let tok_cfg = json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": false, "chat_template": template});
    std::fs::write(dir.join("tokenizer_config.json"), tok_cfg.to_string()).unwrap();
}

fn last_logits(m: &Model, tokens: &[u32]) -> Vec<f32> {
    let mut cache = KvCache::new();
    let out = m
        .llama
        .forward(&mut [ForwardItem {
            cache: &mut cache,
            tokens,
            logits: Logits::Last,
        }])
        .unwrap();
    out.last(0).unwrap().to_vec()
}

#[test]
fn hugging_face_folder_matches_the_gguf() {
    let dir = tempfile::tempdir().unwrap();
    export_hf(&common::model_path(), dir.path());
    let hf = Model::load(dir.path(), "hf", Role::Base).unwrap();
    let gguf = common::exact_model();
    assert_eq!(hf.vocab.digest, gguf.vocab.digest, "same token table");
    assert_eq!(hf.vocab.eos, gguf.vocab.eos);
    let chat = [tilt::model::Message {
        role: "user".into(),
        content: "Hi 123".into(),
    }];
    assert_eq!(
        hf.chat.render(&chat).unwrap(),
        gguf.chat.render(&chat).unwrap()
    );
    for text in ["The capital of France is", "Once upon a time, 1234 dragons"] {
        let tokens = gguf.vocab.encode(text, false).unwrap();
        assert_eq!(hf.vocab.encode(text, false).unwrap(), tokens);
        let (a, b) = (last_logits(&hf, &tokens), last_logits(&gguf, &tokens));
        assert_eq!(tilt::sampling::argmax(&a), tilt::sampling::argmax(&b));
        // Only the f16 rounding of the weights separates the two.
        let d = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(d < 0.2, "{text:?}: logits differ by {d}");
    }
    // A draft or reward model must tokenize like its base: one control token renamed is refused.
    let renamed = gguf.vocab.text(3).to_string();
    let path = dir.path().join("tokenizer.json");
    let spec = std::fs::read_to_string(&path).unwrap();
    let quoted = format!("\"{renamed}\"");
    assert!(spec.contains(&quoted), "token 3 is {renamed}");
    std::fs::write(&path, spec.replace(&quoted, "\"<|renamed|>\"")).unwrap();
    let err = tilt::model::companions::load(
        &gguf,
        "other",
        dir.path(),
        Role::Draft,
        tilt::model::Precision::F32,
    )
    .err()
    .expect("a renamed token is refused");
    let says = format!("{err:#}");
    assert!(
        says.contains("different token tables") && says.contains("draft model `other`"),
        "{says}"
    );
}
