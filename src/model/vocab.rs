//! Tokenizer and vocabulary: a `tokenizers::Tokenizer` built from GGUF metadata (`tokenizer.ggml.*`)
//! or loaded from `tokenizer.json`, plus the raw bytes of every token for incremental detokenization.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use super::config::gguf_int;

/// Texts of control tokens that end a generation, whatever the model calls its EOS.
const END_OF_GENERATION: &[&str] = &[
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "</s>",
    "<|end_of_text|>",
];

pub struct Vocab {
    tokenizer: Tokenizer,
    /// The bytes each token stands for in generated text (empty for control tokens).
    token_bytes: Vec<Vec<u8>>,
    /// The token's own text (control tokens as written, e.g. `<|im_end|>`).
    token_text: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Tokens that end generation (EOS and its siblings).
    pub end_of_generation: HashSet<u32>,
    pub add_bos: bool,
    /// sha256 over the token table: two models with the same digest tokenize identically.
    pub digest: String,
}

impl Vocab {
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = &content.metadata;
        let spec = tokenizer_json_from_gguf(content)?;
        let tokenizer = Tokenizer::from_bytes(serde_json::to_vec(&spec)?)
            .map_err(|e| anyhow::anyhow!("building the tokenizer from GGUF metadata: {e}"))?;
        let spm = gguf_tokenizer_model(content) == "llama";
        let tokens = gguf_strings(content, "tokenizer.ggml.tokens")?;
        let types = gguf_token_types(content, tokens.len());
        let id = |key: &str| md.get(key).and_then(gguf_int).map(|v| v as u32);
        let control: HashSet<u32> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| types.get(*i) == Some(&3))
            .map(|(i, _)| i as u32)
            .collect();
        let token_bytes = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if spm {
                    spm_token_bytes(t, types.get(i).copied().unwrap_or(1))
                } else if control.contains(&(i as u32)) {
                    Vec::new()
                } else {
                    byte_level_decode(t)
                }
            })
            .collect();
        // llama.cpp adds BOS to SentencePiece prompts unless the GGUF says otherwise.
        let add_bos = md
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(spm);
        Ok(Self::finish(
            tokenizer,
            token_bytes,
            tokens,
            &control,
            id("tokenizer.ggml.bos_token_id"),
            id("tokenizer.ggml.eos_token_id"),
            add_bos,
        ))
    }

    /// A Hugging Face `tokenizer.json` (+ `tokenizer_config.json` for BOS/EOS when present).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let raw = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let cfg: Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(Value::Null);
        Self::from_json(&raw, &cfg).with_context(|| path.display().to_string())
    }

    /// A `tokenizer.json`'s text, with the `tokenizer_config.json` object (or null).
    pub fn from_json(raw: &str, cfg: &Value) -> Result<Self> {
        let tokenizer =
            Tokenizer::from_bytes(raw.as_bytes()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let spec: Value = serde_json::from_str(raw)?;
        let byte_level = spec.to_string().contains("\"ByteLevel\"");
        let n = tokenizer.get_vocab_size(true);
        let mut tokens = vec![String::new(); n];
        for (t, i) in tokenizer.get_vocab(true) {
            if (i as usize) < n {
                tokens[i as usize] = t;
            }
        }
        let control: HashSet<u32> = tokenizer
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(i, _)| *i)
            .collect();
        let token_bytes = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if control.contains(&(i as u32)) {
                    Vec::new()
                } else if byte_level {
                    byte_level_decode(t)
                } else {
                    sentencepiece_decode(t)
                }
            })
            .collect();
        let token_id = |key: &str| {
            let v = &cfg[key];
            let text = v.as_str().or_else(|| v["content"].as_str())?;
            tokenizer.token_to_id(text)
        };
        let add_bos = cfg["add_bos_token"].as_bool().unwrap_or(false);
        let bos = token_id("bos_token");
        let eos = token_id("eos_token");
        Ok(Self::finish(
            tokenizer,
            token_bytes,
            tokens,
            &control,
            bos,
            eos,
            add_bos,
        ))
    }

    fn finish(
        tokenizer: Tokenizer,
        token_bytes: Vec<Vec<u8>>,
        token_text: Vec<String>,
        control: &HashSet<u32>,
        bos: Option<u32>,
        eos: Option<u32>,
        add_bos: bool,
    ) -> Self {
        let mut end_of_generation: HashSet<u32> = control
            .iter()
            .copied()
            .filter(|&i| END_OF_GENERATION.contains(&token_text[i as usize].as_str()))
            .collect();
        end_of_generation.extend(eos);
        let mut h = Sha256::new();
        for t in &token_text {
            h.update((t.len() as u32).to_le_bytes());
            h.update(t.as_bytes());
        }
        let digest = format!("{:x}", h.finalize());
        Self {
            tokenizer,
            token_bytes,
            token_text,
            bos,
            eos,
            end_of_generation,
            add_bos,
            digest,
        }
    }

    pub fn size(&self) -> usize {
        self.token_bytes.len()
    }

    /// Tokenize `text`; control tokens written in the text (`<|im_start|>`) become their ids.
    /// Adds BOS when the model asks for it and `add_bos` is true.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode_fast(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos && self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// The bytes a token adds to generated text.
    pub fn bytes(&self, id: u32) -> &[u8] {
        self.token_bytes
            .get(id as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// The token as the vocabulary writes it (control tokens included).
    pub fn text(&self, id: u32) -> &str {
        self.token_text
            .get(id as usize)
            .map(String::as_str)
            .unwrap_or("")
    }

    /// Generated text of `ids` (control tokens omitted, invalid UTF-8 replaced).
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&i| self.bytes(i).iter().copied())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// `ids` with control tokens written out, for showing a prompt back (`echo`, `/detokenize`).
    pub fn decode_with_special(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &i in ids {
            match self.bytes(i) {
                [] => bytes.extend_from_slice(self.text(i).as_bytes()),
                b => bytes.extend_from_slice(b),
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.tokenizer.token_to_id(text)
    }
}

fn gguf_strings(content: &gguf_file::Content, key: &str) -> Result<Vec<String>> {
    match content.metadata.get(key) {
        Some(gguf_file::Value::Array(items)) => items
            .iter()
            .map(|v| v.to_string().cloned().map_err(anyhow::Error::from))
            .collect::<Result<_>>()
            .with_context(|| format!("GGUF metadata {key} holds non-strings")),
        _ => bail!("GGUF metadata lacks {key}"),
    }
}

/// llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
fn gguf_token_types(content: &gguf_file::Content, n: usize) -> Vec<u64> {
    match content.metadata.get("tokenizer.ggml.token_type") {
        Some(gguf_file::Value::Array(items)) => {
            items.iter().map(|v| gguf_int(v).unwrap_or(1)).collect()
        }
        _ => vec![1; n],
    }
}

fn gguf_tokenizer_model(content: &gguf_file::Content) -> String {
    content
        .metadata
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default()
}

/// `tokenizer.ggml.scores` (SentencePiece log-probabilities); 0 for tokens without one.
fn gguf_scores(content: &gguf_file::Content, n: usize) -> Vec<f32> {
    let mut scores = match content.metadata.get("tokenizer.ggml.scores") {
        Some(gguf_file::Value::Array(items)) => {
            items.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect()
        }
        _ => Vec::new(),
    };
    scores.resize(n, 0.0);
    scores
}

/// The Hugging Face `tokenizer.json` equivalent of a GGUF's vocabulary: byte-level BPE (`gpt2`)
/// or SentencePiece (`llama`).
pub fn tokenizer_json_from_gguf(content: &gguf_file::Content) -> Result<Value> {
    let model = gguf_tokenizer_model(content);
    match model.as_str() {
        "gpt2" => gpt2_tokenizer_json_from_gguf(content),
        "llama" => spm_tokenizer_json_from_gguf(content),
        _ => bail!("GGUF tokenizer `{model}` is not supported: tilt reads byte-level BPE (`gpt2`) and SentencePiece (`llama`) vocabularies from GGUF; use a safetensors folder with tokenizer.json for other tokenizers"),
    }
}

fn gpt2_tokenizer_json_from_gguf(content: &gguf_file::Content) -> Result<Value> {
    let md = &content.metadata;
    let tokens = gguf_strings(content, "tokenizer.ggml.tokens")?;
    let merges = gguf_strings(content, "tokenizer.ggml.merges")?;
    let types = gguf_token_types(content, tokens.len());
    let pre = md
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    // Control (3) and user-defined (4) tokens are matched whole, before the BPE model sees the text.
    let specials: Vec<(u32, &str)> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| (i as u32, t.as_str()))
        .collect();
    Ok(tokenizer_json(&tokens, &merges, &specials, &pre))
}

/// llama.cpp's SentencePiece tokenizer (`llm_tokenizer_spm`) as a Hugging Face BPE model, the way
/// transformers' `LlamaConverter` does it. llama.cpp splits the text into chars and repeatedly
/// merges the adjacent pair whose concatenation is the vocabulary piece of highest score; BPE with
/// every (left, right) split of every piece as a merge, ranked by the piece's score, does the
/// same. Chars outside the vocabulary become `<0xXX>` byte tokens in both.
fn spm_tokenizer_json_from_gguf(content: &gguf_file::Content) -> Result<Value> {
    let md = &content.metadata;
    let tokens = gguf_strings(content, "tokenizer.ggml.tokens")?;
    let types = gguf_token_types(content, tokens.len());
    let scores = gguf_scores(content, tokens.len());
    let add_space_prefix = md
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(true);
    let unk = types
        .iter()
        .position(|&t| t == 2)
        .or_else(|| {
            md.get("tokenizer.ggml.unknown_token_id")
                .and_then(gguf_int)
                .map(|i| i as usize)
                .filter(|&i| i < tokens.len())
        })
        .map(|i| tokens[i].clone());
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let merges: Vec<Value> = spm_merges(&tokens, &scores)
        .into_iter()
        .map(|(l, r)| json!([tokens[l as usize], tokens[r as usize]]))
        .collect();
    // llama.cpp matches control (3), user-defined (4) and unknown (2) tokens whole when it parses
    // special tokens, and starts a new SentencePiece fragment (with its own leading space) after
    // each; Hugging Face normalizes each piece between added tokens separately, so `Prepend` does
    // the same.
    let added: Vec<Value> = types
        .iter()
        .enumerate()
        .filter(|(i, t)| *i < tokens.len() && matches!(**t, 2..=4))
        .map(|(i, &t)| json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": t != 4}))
        .collect();
    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
    let normalizer = if add_space_prefix {
        json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"}, replace]})
    } else {
        json!({"type": "Sequence", "normalizers": [replace]})
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    }))
}

/// BPE merges `(left id, right id)` equivalent to SentencePiece's score-driven merging: every split
/// of every piece into two pieces, highest-scoring piece first. llama.cpp breaks score ties by
/// position (leftmost pair first); ranks cannot, so among equal scores a longer left piece goes
/// first, which makes runs of equal-score pieces (Llama's `▁▁`…`▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁`) grow from the
/// left as llama.cpp's do.
fn spm_merges(tokens: &[String], scores: &[f32]) -> Vec<(u32, u32)> {
    // Where a text appears twice, llama.cpp's text→id map keeps the last id; so does this.
    let index: HashMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i as u32))
        .collect();
    let mut merges = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if index.get(piece.as_str()) != Some(&(id as u32)) {
            continue;
        }
        let score = scores.get(id).copied().unwrap_or(0.0);
        for (n, (at, _)) in piece.char_indices().enumerate().skip(1) {
            let (l, r) = piece.split_at(at);
            if let (Some(&l), Some(&r)) = (index.get(l), index.get(r)) {
                merges.push((score, n, id as u32, l, r));
            }
        }
    }
    merges.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(b.1.cmp(&a.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    merges.into_iter().map(|m| (m.3, m.4)).collect()
}

/// The bytes a SentencePiece token stands for in generated text, as llama.cpp's `token_to_piece`
/// renders it without special tokens: nothing for unknown (2), control (3) and unused (5) tokens,
/// user-defined (4) ones as written, byte tokens (6) as their byte, others with `▁` as a space.
fn spm_token_bytes(token: &str, token_type: u64) -> Vec<u8> {
    match token_type {
        2 | 3 | 5 => Vec::new(),
        4 => token.as_bytes().to_vec(),
        _ => sentencepiece_decode(token),
    }
}

/// The `tokenizer.json` that the GGUF metadata describes (what llama.cpp implements natively).
fn tokenizer_json(
    tokens: &[String],
    merges: &[String],
    specials: &[(u32, &str)],
    pre: &str,
) -> Value {
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<Value> = specials
        .iter()
        .map(|(id, content)| json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let pre_tokenizer = match pre {
        // llama.cpp: these split every digit, then apply the GPT-2 pattern.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            json!({
                "type": "Sequence",
                "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]
            })
        }
        "llama-bpe" | "llama3" | "llama-v3" => json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}, "behavior": "Isolated", "invert": false},
                byte_level(false)
            ]
        }),
        _ => byte_level(true),
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    })
}

/// GPT-2's byte-level alphabet maps every byte to a printable char; invert it.
fn byte_level_decode(token: &str) -> Vec<u8> {
    token
        .chars()
        .map(|c| unicode_to_byte(c).unwrap_or(b'?'))
        .collect()
}

fn unicode_to_byte(c: char) -> Option<u8> {
    let c = c as u32;
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    if c < 256 && printable(c) {
        return Some(c as u8);
    }
    // The other 68 bytes are numbered from 256 upwards in byte order.
    let n = c.checked_sub(256)?;
    (0u32..256)
        .filter(|&b| !printable(b))
        .nth(n as usize)
        .map(|b| b as u8)
}

/// SentencePiece pieces: `▁` is a space, `<0xAB>` is a raw byte.
fn sentencepiece_decode(token: &str) -> Vec<u8> {
    if token.len() == 6 && token.starts_with("<0x") && token.ends_with('>') {
        if let Ok(b) = u8::from_str_radix(&token[3..5], 16) {
            return vec![b];
        }
    }
    token.replace('\u{2581}', " ").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_alphabet_inverts() {
        assert_eq!(byte_level_decode("Ġhello"), b" hello");
        assert_eq!(byte_level_decode("Ċ"), b"\n");
        assert_eq!(unicode_to_byte('!'), Some(b'!'));
        assert_eq!(unicode_to_byte('\u{100}'), Some(0));
        assert_eq!(unicode_to_byte('\u{143}'), Some(173));
    }

    #[test]
    fn spm_merges_follow_scores() {
        let tokens: Vec<String> = [
            "<unk>",
            "a",
            "b",
            "c",
            "ab",
            "bc",
            "abc",
            "\u{2581}",
            "\u{2581}\u{2581}",
            "\u{2581}\u{2581}\u{2581}",
        ]
        .map(String::from)
        .to_vec();
        let scores = [0.0, -1.0, -2.0, -3.0, -5.0, -4.0, -6.0, -1e9, -1e9, -1e9];
        // Every split whose halves are pieces, best piece first: bc, ab, then abc's two splits
        // (longer left half first), then the equal-score runs of ▁: longer left half first, then
        // the lower id (▁▁ before ▁▁▁).
        assert_eq!(
            spm_merges(&tokens, &scores),
            [(2, 3), (1, 2), (4, 3), (1, 5), (8, 7), (7, 7), (7, 8)]
        );
    }

    #[test]
    fn spm_token_bytes_by_type() {
        assert_eq!(spm_token_bytes("\u{2581}the", 1), b" the");
        assert_eq!(spm_token_bytes("<0x0A>", 6), b"\n");
        assert!(spm_token_bytes("<s>", 3).is_empty());
        assert!(spm_token_bytes("<unk>", 2).is_empty());
        assert_eq!(spm_token_bytes("<tool>", 4), b"<tool>");
    }

    #[test]
    fn sentencepiece_pieces() {
        assert_eq!(sentencepiece_decode("<0x0A>"), b"\n");
        assert_eq!(sentencepiece_decode("\u{2581}the"), b" the");
    }
}
