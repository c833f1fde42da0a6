//! What to send: prompts from a JSONL file, or synthetic prompts of about a chosen length.
//!
//! Synthetic prompts are random sequences of common English words, each one token for the
//! usual BPE vocabularies. When the server offers `POST /tokenize` (llama-server, vLLM) the words
//! per token are measured there; otherwise one token per word is assumed. Either way it is an
//! approximation (BOS and chat templates add a few tokens): the report counts prompt tokens from
//! the server's usage whenever it sends it.

use std::path::Path;

use anyhow::{bail, Context, Result};
use rand::seq::IndexedRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use serde_json::{json, Value};

use super::client::{Endpoint, Prompt};

const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by",
    "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an",
    "they", "you", "were", "her", "she", "there", "one", "all", "we", "their", "been", "has",
    "more", "when", "will", "would", "who", "so", "no", "if", "out", "time", "about", "up", "can",
    "said", "them", "what", "some", "other", "into", "only", "new", "like", "then", "first",
    "also", "after", "over", "could", "people", "years", "two", "these", "made", "may", "your",
    "its", "than", "most", "many", "such", "where", "well", "way", "because", "good", "each",
    "very", "great", "day", "world", "water", "house", "city", "year", "small", "life", "part",
];

pub enum Workload {
    /// Prompts from a file, used in order and cycled.
    File(Vec<Prompt>),
    Synthetic {
        words: usize,
        /// The intended prompt length, recorded when the server sends no usage.
        tokens: u64,
        max_tokens: usize,
        seed: u64,
    },
}

impl Workload {
    /// Synthetic prompts of about `tokens` tokens at `tokens_per_word` (1 when unmeasured).
    pub fn synthetic(tokens: usize, max_tokens: usize, tokens_per_word: f64, seed: u64) -> Self {
        Workload::Synthetic {
            words: ((tokens as f64 / tokens_per_word).round() as usize).max(1),
            tokens: tokens as u64,
            max_tokens,
            seed,
        }
    }

    /// Request `i` of run `stream`. Synthetic prompts differ across runs and requests, so a
    /// server's prefix cache cannot answer a repeat and flatter its prefill.
    pub fn prompt(&self, stream: u64, i: usize) -> Prompt {
        match self {
            Workload::File(prompts) => prompts[i % prompts.len()].clone(),
            &Workload::Synthetic {
                words,
                tokens,
                max_tokens,
                seed,
            } => Prompt {
                input: text(words, seed, stream, i as u64).into(),
                max_tokens,
                approx_tokens: Some(tokens),
            },
        }
    }
}

fn text(words: usize, seed: u64, stream: u64, i: u64) -> String {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ i.rotate_left(32));
    rng.set_stream(stream);
    let mut out = Vec::with_capacity(words);
    for _ in 0..words {
        out.push(*WORDS.choose(&mut rng).expect("WORDS is not empty"));
    }
    out.join(" ")
}

/// Tokens per synthetic word as the server's `POST /tokenize` counts them; `None` when it has
/// no such route. The body carries both llama-server's (`content`) and vLLM's (`prompt`) field.
pub async fn tokens_per_word(
    client: &reqwest::Client,
    base: &str,
    model: Option<&str>,
) -> Option<f64> {
    const SAMPLE: usize = 256;
    let text = text(SAMPLE, 0, u64::MAX, 0);
    let mut body = json!({"content": text, "prompt": text});
    if let Some(model) = model {
        body["model"] = model.into();
    }
    let response = client
        .post(format!("{base}/tokenize"))
        .json(&body)
        .send()
        .await
        .ok()?
        .error_for_status()
        .ok()?;
    let v: Value = response.json().await.ok()?;
    let count = v["count"]
        .as_u64()
        .or_else(|| v["tokens"].as_array().map(|t| t.len() as u64))?;
    (count > 0).then(|| count as f64 / SAMPLE as f64)
}

#[derive(Deserialize)]
struct Line {
    prompt: Option<String>,
    messages: Option<Value>,
    max_tokens: Option<usize>,
}

/// Prompts from JSONL: one object per line with `prompt` (text) or `messages` (chat only) and an
/// optional `max_tokens` (default `max_tokens`).
pub fn read_prompts(path: &Path, max_tokens: usize, endpoint: Endpoint) -> Result<Vec<Prompt>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut prompts = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let at = || format!("{}:{}", path.display(), n + 1);
        let line: Line = serde_json::from_str(line).with_context(at)?;
        let input = match (line.prompt, line.messages) {
            (Some(text), None) => Value::String(text),
            (None, Some(messages @ Value::Array(_))) if endpoint == Endpoint::Chat => messages,
            (None, Some(_)) => bail!("{}: `messages` needs --endpoint chat and an array", at()),
            _ => bail!("{}: give exactly one of `prompt` and `messages`", at()),
        };
        prompts.push(Prompt {
            input,
            max_tokens: line.max_tokens.unwrap_or(max_tokens),
            approx_tokens: None,
        });
    }
    if prompts.is_empty() {
        bail!("{} holds no prompts", path.display());
    }
    Ok(prompts)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn synthetic_prompts_have_the_length_and_differ_across_runs_and_requests() {
        let w = Workload::synthetic(100, 16, 2.0, 1);
        let p = w.prompt(0, 0);
        assert_eq!(p.input.as_str().unwrap().split(' ').count(), 50);
        assert_eq!((p.max_tokens, p.approx_tokens), (16, Some(100)));
        assert_eq!(p.input, w.prompt(0, 0).input);
        assert_ne!(p.input, w.prompt(0, 1).input);
        assert_ne!(p.input, w.prompt(1, 0).input);
    }

    #[test]
    fn prompt_files_cycle_and_check_their_lines() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, r#"{{"prompt": "a", "max_tokens": 3}}"#).unwrap();
        writeln!(f).unwrap();
        writeln!(f, r#"{{"messages": [{{"role": "user", "content": "b"}}]}}"#).unwrap();
        let prompts = read_prompts(f.path(), 9, Endpoint::Chat).unwrap();
        assert_eq!(prompts.len(), 2);
        assert_eq!((prompts[0].max_tokens, prompts[1].max_tokens), (3, 9));
        let w = Workload::File(prompts);
        assert_eq!(w.prompt(0, 2).input, "a");
        let err = read_prompts(f.path(), 9, Endpoint::Completions).unwrap_err();
        assert!(err.to_string().contains(":3:"), "{err}");
    }
}
