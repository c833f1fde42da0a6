//! `tilt eval`: offline evaluations that drive the engine directly (no HTTP), like `tilt prefs`.
//! - `steer` (steer.rs): sweep GenARM's reward weights on held-out prompts and measure each
//!   objective's programmatic reward, KL to the base, diversity and speed.
//! - `keywords` (keywords.rs): CommonGen-style concept sets, each decoding method given as a
//!   decoder config in JSON; keyword coverage, fluency (perplexity under the base) and cost.
//! - `mc` (mc.rs): multiple-choice accuracy of equilibrium ranking and the model's own rankings.
//! - `adaptive` (adaptive.rs): entropy-adaptive decoding swept over its threshold.
//! - `speculative` (speculative.rs): best-of-N's speculative rejection against full best-of-N.
//! - `judge` (judge.rs): the base as a sentiment judge, independent of the lexicon.
//!
//! This file holds what they share: running a batch of requests, distinct-n, perplexity, table
//! formatting and writing the outputs.

pub mod adaptive;
pub mod judge;
pub mod keywords;
pub mod mc;
pub mod speculative;
pub mod steer;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use serde_json::{Map, Value};

use crate::decode::{DecoderSpec, Generation};
use crate::engine::{Engine, Event};
use crate::model::{fetch, Logits, Model, Precision, Role};
use crate::sampling::{log_sum_exp, SamplingParams};
use crate::train::prompts;

#[derive(clap::Subcommand, Debug)]
pub enum EvalCommand {
    /// Sweep GenARM reward weights on held-out prompts: objective rewards, KL, diversity, speed.
    Steer(Box<steer::SteerArgs>),
    /// Keyword-constrained generation over CommonGen-style concept sets, per decoding method.
    Keywords(Box<keywords::KeywordsArgs>),
    /// Multiple-choice accuracy: equilibrium ranking against generative and discriminative
    /// ranking on the same questions (MMLU-format JSONL).
    Mc(Box<mc::McArgs>),
    /// Entropy-adaptive decoding swept over its threshold: the large model's share of tokens,
    /// compute saved, tok/s against the formula, quality kept against large-only decoding.
    Adaptive(Box<adaptive::AdaptiveArgs>),
    /// Best-of-N's speculative rejection against full best-of-N on the same prompts and seeds:
    /// how often it chooses within the full run's top 2, and its share of tokens and wall time.
    Speculative(Box<speculative::SpeculativeArgs>),
}

/// The `tilt eval` command.
pub fn run(command: EvalCommand) -> Result<()> {
    match command {
        EvalCommand::Steer(args) => steer::run(*args),
        EvalCommand::Keywords(args) => keywords::run(*args),
        EvalCommand::Mc(args) => mc::run(*args),
        EvalCommand::Adaptive(args) => adaptive::run(*args),
        EvalCommand::Speculative(args) => speculative::run(*args),
    }
}

/// Which models an evaluation runs: the base, and the reward models as `tilt serve` loads them.
#[derive(clap::Args, Debug)]
pub struct EvalModels {
    /// The base model (default: the manifest's default model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A reward model as NAME=PATH (repeatable), added to the manifest's reward models.
    #[arg(long = "reward", value_name = "NAME=PATH", value_parser = crate::reward::parse_flag)]
    pub rewards: Vec<(String, PathBuf)>,
    /// Skip the reward models of models/models.toml (only `--reward` ones load).
    #[arg(long)]
    pub no_default_rewards: bool,
}

impl EvalModels {
    /// The base, then its reward models (in Q8_0, as the server runs them).
    pub fn load(&self) -> Result<Vec<Model>> {
        let base = load_base(self.model.as_deref())?;
        let manifest = !self.no_default_rewards;
        let companions = crate::model::companions::Companions {
            rewards: self.rewards.clone(),
            draft: None,
            manifest,
        };
        let models = crate::model::companions::with_companions(base, &companions, Precision::Q8_0)?;
        crate::reward::check_names(&models)?;
        Ok(models)
    }
}

/// The base model at `path` (default: the manifest's default model, fetched if missing).
pub fn load_base(path: Option<&Path>) -> Result<Model> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => fetch::ensure(&fetch::models_dir(), fetch::DEFAULT_MODEL)?,
    };
    Model::load(&path, "base", Role::Base)
}

/// A decoder config as JSON, `{"decoder": NAME, ...params}`, split into name and parameters.
pub fn split_config(config: &Value) -> Result<(String, Map<String, Value>)> {
    let Some(object) = config.as_object() else {
        bail!("a decoder config must be a JSON object, got {config}");
    };
    let mut params = object.clone();
    let name = match params.remove("decoder") {
        Some(Value::String(name)) => name,
        Some(other) => bail!("`decoder` must be a string, got {other}"),
        None => bail!("a decoder config needs `decoder`, e.g. {{\"decoder\": \"sample\"}}"),
    };
    Ok((name, params))
}

/// One prompt's request: the decoder and the prompt text; `salt` tells apart the draws of jobs
/// that share a prompt (their seeds are `seed ^ stable_hash(prompt) ^ salt`).
pub struct Job {
    pub spec: DecoderSpec,
    pub prompt: String,
    pub salt: u64,
}

/// One finished request (n = 1).
#[derive(Debug, Clone, Default)]
pub struct Output {
    pub text: String,
    /// The tokens of the answer, as streamed.
    pub tokens: Vec<u32>,
    /// The prompt as the base read it.
    pub prompt_tokens: Vec<u32>,
    /// Tokens the decoder generated in all (every candidate of a search decoder).
    pub generated: usize,
    pub report: Option<Value>,
}

/// Sampling settings shared by every request of a run; each request's seed is
/// `seed ^ stable_hash(prompt)`, so a prompt gets the same draws in every setting.
#[derive(Debug, Clone, Copy)]
pub struct Decoding {
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
}

impl Decoding {
    pub fn seed_for(&self, prompt: &str) -> u64 {
        self.seed ^ prompts::stable_hash(prompt)
    }
}

/// Render `prompt` as a user turn for the base and for every other model `spec` runs.
pub fn generation(
    engine: &Engine,
    spec: &DecoderSpec,
    prompt: &str,
    decoding: &Decoding,
) -> Result<Generation> {
    let models = engine.models();
    let render = |id: usize| -> Result<Vec<u32>> {
        let m = &models[id];
        let tokens = crate::train::render_prompt(&m.chat, &m.vocab, prompt)?;
        if tokens.len() + decoding.max_tokens > m.context_length() {
            bail!(
                "the prompt {prompt:?} has {} tokens for `{}`; with --max-tokens {} it does not fit the context of {}",
                tokens.len(),
                m.name,
                decoding.max_tokens,
                m.context_length()
            );
        }
        Ok(tokens)
    };
    let model_prompts = spec
        .models()
        .into_iter()
        .map(|id| Ok((id, render(id)?)))
        .collect::<Result<_>>()?;
    Ok(Generation {
        prompt: render(crate::model::BASE)?,
        max_tokens: decoding.max_tokens,
        stop: Vec::new(),
        ignore_eos: false,
        n: 1,
        sampling: SamplingParams {
            temperature: decoding.temperature,
            top_p: decoding.top_p,
            seed: Some(decoding.seed_for(prompt)),
            ..SamplingParams::default()
        },
        model_prompts,
    })
}

/// Submit every job at once (the engine batches them) and collect the outputs in job order.
pub fn run_jobs(
    engine: &Engine,
    jobs: &[Job],
    decoding: &Decoding,
    bar: &ProgressBar,
) -> Result<Vec<Output>> {
    let mut streams = Vec::with_capacity(jobs.len());
    for job in jobs {
        let mut g = generation(engine, &job.spec, &job.prompt, decoding)?;
        g.sampling.seed = g.sampling.seed.map(|s| s ^ job.salt);
        let prompt_tokens = g.prompt.clone();
        let decoder = job.spec.build(g, engine.models())?;
        streams.push((engine.submit(decoder)?, prompt_tokens));
    }
    let mut outputs = Vec::with_capacity(jobs.len());
    for (mut events, prompt_tokens) in streams {
        let mut out = Output {
            prompt_tokens,
            ..Output::default()
        };
        loop {
            match events.blocking_recv() {
                Some(Event::Token(t)) => {
                    out.text.push_str(&t.text);
                    out.tokens.push(t.token);
                }
                Some(Event::Finished { text, .. }) => out.text.push_str(&text),
                Some(Event::Done { usage, report }) => {
                    out.generated = usage.completion_tokens;
                    out.report = report;
                    break;
                }
                Some(Event::Failed(msg)) => bail!("a request failed: {msg}"),
                Some(Event::Started { .. } | Event::Prompt(_)) => {}
                None => bail!("the engine stopped"),
            }
        }
        outputs.push(out);
        bar.inc(1);
    }
    Ok(outputs)
}

/// Lowercase words: letters, digits and inner apostrophes.
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .map(|w| w.trim_matches('\'').to_lowercase())
        .filter(|w| !w.is_empty())
        .collect()
}

/// Distinct-2 (Li et al., 2016) over a set of texts: distinct word bigrams / all word bigrams,
/// bigrams taken within each text. 0 when there are none.
pub fn distinct_2<S: AsRef<str>>(texts: &[S]) -> f64 {
    let mut seen = HashSet::new();
    let mut total = 0usize;
    for text in texts {
        let w = words(text.as_ref());
        for pair in w.windows(2) {
            total += 1;
            seen.insert((pair[0].clone(), pair[1].clone()));
        }
    }
    if total == 0 {
        0.0
    } else {
        seen.len() as f64 / total as f64
    }
}

/// Negative log-likelihood (nats, summed) of each `(prompt, response)`'s response tokens under
/// `model`, teacher-forced, with the number of tokens scored. An empty response scores (0, 0).
pub fn response_nll(model: &Model, items: &[(&[u32], &[u32])]) -> Result<Vec<(f64, usize)>> {
    use crate::model::{ForwardItem, KvCache};
    // A few sequences per forward: each response row is a vocabulary of f32.
    const BATCH: usize = 8;
    let mut results = vec![(0.0, 0); items.len()];
    let nll = |row: &[f32], token: u32| -> f64 {
        f64::from(log_sum_exp(row)) - f64::from(row[token as usize])
    };
    let todo: Vec<usize> = (0..items.len())
        .filter(|&i| !items[i].0.is_empty() && !items[i].1.is_empty())
        .collect();
    for chunk in todo.chunks(BATCH) {
        let mut caches: Vec<KvCache> = chunk.iter().map(|_| KvCache::new()).collect();
        // The prompt's last row predicts the first response token.
        let mut batch: Vec<ForwardItem> = caches
            .iter_mut()
            .zip(chunk)
            .map(|(cache, &i)| ForwardItem {
                cache,
                tokens: items[i].0,
                logits: Logits::Last,
            })
            .collect();
        let out = model.llama.forward(&mut batch)?;
        drop(batch);
        for (k, &i) in chunk.iter().enumerate() {
            let row = out.last(k).context("a prompt's logits")?;
            results[i] = (nll(row, items[i].1[0]), 1);
        }
        // Then every response token but the last predicts the one after it.
        let rest: Vec<(usize, &mut KvCache)> = caches
            .iter_mut()
            .zip(chunk)
            .filter(|(_, &i)| items[i].1.len() > 1)
            .map(|(c, &i)| (i, c))
            .collect();
        if rest.is_empty() {
            continue;
        }
        let (ids, caches): (Vec<usize>, Vec<&mut KvCache>) = rest.into_iter().unzip();
        let mut batch: Vec<ForwardItem> = caches
            .into_iter()
            .zip(&ids)
            .map(|(cache, &i)| {
                let r = items[i].1;
                ForwardItem {
                    cache,
                    tokens: &r[..r.len() - 1],
                    logits: Logits::All,
                }
            })
            .collect();
        let out = model.llama.forward(&mut batch)?;
        for (k, &i) in ids.iter().enumerate() {
            let r = items[i].1;
            for (row, &token) in out.item(k).zip(&r[1..]) {
                results[i].0 += nll(row, token);
                results[i].1 += 1;
            }
        }
    }
    Ok(results)
}

/// exp(Σ nll / Σ tokens) over `scored`; NaN when nothing was scored.
pub fn perplexity(scored: &[(f64, usize)]) -> f64 {
    let (nll, n) = scored
        .iter()
        .fold((0.0, 0usize), |(a, m), &(b, k)| (a + b, m + k));
    if n == 0 {
        f64::NAN
    } else {
        (nll / n as f64).exp()
    }
}

/// Mean of `values`; NaN when empty.
pub fn mean(values: impl IntoIterator<Item = f64>) -> f64 {
    let (sum, n) = values
        .into_iter()
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        sum / n as f64
    }
}

/// A markdown table.
pub fn table(header: &[String], rows: &[Vec<String>]) -> String {
    let mut md = format!("| {} |\n", header.join(" | "));
    md.push_str(&format!("|{}\n", "---|".repeat(header.len())));
    for row in rows {
        md.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    md
}

/// A number for a table: `decimals` places, "–" when not a number.
pub fn cell(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        // 0 − x keeps −0.000 out of tables.
        let s = format!("{v:.decimals$}");
        if s.trim_start_matches('-')
            .chars()
            .all(|c| c == '0' || c == '.')
        {
            format!("{:.decimals$}", 0.0)
        } else {
            s
        }
    } else {
        "–".into()
    }
}

/// Print an evaluation's table and, with `out`, write it with its plot and data as
/// `{stem}.md`, `{stem}.svg` and `{stem}.json`.
pub fn publish(
    out: Option<&Path>,
    stem: &str,
    md: String,
    svg: String,
    json: &Value,
) -> Result<()> {
    println!("{md}");
    let Some(out) = out else {
        return Ok(());
    };
    let files = [
        (format!("{stem}.md"), md),
        (format!("{stem}.svg"), svg),
        (format!("{stem}.json"), serde_json::to_string_pretty(json)?),
    ];
    let named: Vec<(&str, String)> = files.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    for f in write_files(out, &named)? {
        eprintln!("wrote {}", f.display());
    }
    Ok(())
}

/// Write each `(name, text)` into `dir` (created if needed); returns the paths.
pub fn write_files(dir: &Path, files: &[(&str, String)]) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    files
        .iter()
        .map(|(name, text)| {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        })
        .collect()
}

/// JSON numbers for reports: NaN and infinities become null.
pub fn num(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
}

/// A comma-separated list of numbers (for weight flags).
pub fn parse_numbers(s: &str) -> Result<Vec<f32>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|x| {
            let v: f32 = x
                .trim()
                .parse()
                .map_err(|_| format!("`{x}` is not a number"))?;
            if v.is_finite() {
                Ok(v)
            } else {
                Err(format!("`{x}` is not a finite number"))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_2_counts_unique_bigrams_within_texts() {
        // "a b", "b a", "a b" → 2 distinct of 3; bigrams do not cross texts.
        assert!((distinct_2(&["A b a", "b"]) - 1.0).abs() < 1e-12);
        assert!((distinct_2(&["a b a b"]) - 2.0 / 3.0).abs() < 1e-12);
        assert!((distinct_2(&["a b", "a b"]) - 0.5).abs() < 1e-12);
        assert_eq!(distinct_2(&["one", ""]), 0.0);
        assert_eq!(distinct_2::<&str>(&[]), 0.0);
    }

    #[test]
    fn perplexity_pools_tokens_and_means_skip_nothing() {
        let p = perplexity(&[(2.0, 2), (0.0, 0), (4.0, 2)]);
        assert!((p - 1.5f64.exp()).abs() < 1e-12);
        assert!(perplexity(&[(0.0, 0)]).is_nan());
        assert_eq!(mean([1.0, 2.0, 6.0]), 3.0);
        assert!(mean([]).is_nan());
    }

    #[test]
    fn configs_split_into_decoder_and_parameters() {
        let (name, params) =
            split_config(&serde_json::json!({"decoder": "best_of_n", "n": 4})).unwrap();
        assert_eq!(name, "best_of_n");
        assert_eq!(params.len(), 1);
        assert!(split_config(&serde_json::json!({"n": 4})).is_err());
        assert!(split_config(&serde_json::json!(["sample"])).is_err());
    }

    #[test]
    fn cells_and_number_lists() {
        assert_eq!(cell(-0.0001, 3), "0.000");
        assert_eq!(cell(f64::NAN, 2), "–");
        assert_eq!(cell(-1.25, 2), "-1.25");
        assert_eq!(parse_numbers("-1, 0,0.5").unwrap(), [-1.0, 0.0, 0.5]);
        assert!(parse_numbers("1,x").is_err());
        assert!(parse_numbers("").unwrap().is_empty());
    }
}
