//! `tilt prefs`: preference pairs for `tilt train-arm`. Samples K responses per prompt from the
//! base (one shared prefill per prompt, every prompt queued at once so the engine batches them),
//! scores them with the objective's programmatic scorer, and keeps best vs worst.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

use super::prompts::{self, Split};
use crate::decode::{self, Generation};
use crate::engine::{Engine, EngineOptions, Event, FinishReason};
use crate::model::{fetch, Model, Role};
use crate::reward::scorers::{letter_share, word_count, Length, Readability, Scorer, Sentiment};
use crate::sampling::SamplingParams;

/// What the chosen response has more of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Objective {
    /// The sentiment lexicon scorer: more positive is better.
    Sentiment,
    /// Fewer words of real text, in an answer that ends, is better.
    Concise,
    /// Plainer text (Flesch reading ease) is better.
    Readability,
}

/// What a `concise` response that is not a real answer loses, on top of its words: more than
/// any real answer can, so it ranks below all of them.
pub const NOT_AN_ANSWER: f32 = 1e6;

/// The least share of a `concise` answer's pieces that hold a letter (`letter_share`).
pub const MIN_LETTER_SHARE: f32 = 0.8;

/// What `concise` counts the words of: a response that ended on its own and is mostly words.
fn is_real_answer(text: &str, ended: bool) -> bool {
    ended && letter_share(text) >= MIN_LETTER_SHARE
}

impl Objective {
    /// A response's score. For `concise`, a response that did not end (cut off at
    /// `--max-tokens`) or is mostly digits and symbols ranks below every real answer, and among
    /// those the fewer of its pieces hold a letter the lower: counting words alone would reward
    /// text that says little per token (quotes, digits) instead of answers that stop.
    pub fn score(self, scorer: &dyn Scorer, text: &str, ended: bool) -> f32 {
        if self == Self::Concise && !is_real_answer(text, ended) {
            return -NOT_AN_ANSWER + 100.0 * letter_share(text);
        }
        scorer.score(text)
    }

    pub fn scorer(self) -> Box<dyn Scorer> {
        match self {
            Self::Sentiment => Box::new(Sentiment),
            // A budget of one word: each word past it costs 1, so the score is −(words − 1).
            Self::Concise => Box::new(Length::at_most(1)),
            Self::Readability => Box::new(Readability),
        }
    }
}

/// One line of the output: what `train-arm` reads, plus the scores of all K responses.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScoredPair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    /// Whether each response ended on its own: `train-arm` ends only those with the end token.
    pub chosen_ended: bool,
    pub rejected_ended: bool,
    pub scores: Vec<f32>,
}

/// K responses to one prompt, whether each ended on its own, and their scores.
pub struct Scored<'a> {
    pub prompt: &'a str,
    pub responses: &'a [String],
    pub ended: &'a [bool],
    pub scores: &'a [f32],
}

impl Scored<'_> {
    fn pair(&self, chosen: usize, rejected: usize) -> ScoredPair {
        ScoredPair {
            prompt: self.prompt.to_string(),
            chosen: self.responses[chosen].clone(),
            rejected: self.responses[rejected].clone(),
            chosen_ended: self.ended[chosen],
            rejected_ended: self.ended[rejected],
            scores: self.scores.to_vec(),
        }
    }

    /// The pair with the widest score gap among those whose word counts differ by at most
    /// `tolerance` × the longer one's (any, without a tolerance), or `None` when no pair differs.
    ///
    /// Why a tolerance: the GenARM loss compares *sums* of log-probs, and a tiny ARM's per-token
    /// log-probs are far from 0, so a few tokens of length difference outweigh the objective's
    /// signal (sentiment words). Pairs of about the same length leave the ARM only the objective
    /// to learn. A length objective (concise) must not use it.
    pub fn widest_pair(&self, tolerance: Option<f32>, min_gap: f32) -> Option<ScoredPair> {
        let Some(tolerance) = tolerance else {
            return self.best_vs_worst(min_gap);
        };
        let (responses, scores) = (self.responses, self.scores);
        let lens: Vec<usize> = responses.iter().map(|r| word_count(r)).collect();
        let mut best: Option<(usize, usize)> = None;
        for i in 0..responses.len() {
            for j in 0..responses.len() {
                let longer = lens[i].max(lens[j]) as f32;
                let close = (lens[i] as f32 - lens[j] as f32).abs() <= tolerance * longer;
                let gap = scores[i] - scores[j];
                let wide = gap > 0.0 && gap >= min_gap;
                if close && wide && best.is_none_or(|(a, b)| gap > scores[a] - scores[b]) {
                    best = Some((i, j));
                }
            }
        }
        best.map(|(i, j)| self.pair(i, j))
    }

    /// Best vs worst, or `None` when their scores differ by less than `min_gap` (or not at all).
    pub fn best_vs_worst(&self, min_gap: f32) -> Option<ScoredPair> {
        let scores = self.scores;
        let by_score = |a: &(usize, &f32), b: &(usize, &f32)| a.1.total_cmp(b.1);
        // `max_by` keeps the last of equals and `min_by` the first: either is fine, both are fixed.
        let (best, _) = scores.iter().enumerate().max_by(by_score)?;
        let (worst, _) = scores.iter().enumerate().min_by(by_score)?;
        let gap = scores[best] - scores[worst];
        (gap > 0.0 && gap >= min_gap).then(|| self.pair(best, worst))
    }
}

#[derive(clap::Args, Debug)]
pub struct PrefsArgs {
    /// What the chosen response is better at.
    #[arg(long, value_enum)]
    pub objective: Objective,
    /// Output JSONL: {"prompt", "chosen", "rejected", "scores"} per line.
    #[arg(long)]
    pub out: PathBuf,
    /// Prompts, one {"prompt": …} per line (default: the built-in set of 500).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// With the built-in set, add its 1,464 training-only prompts (other templates and topics,
    /// never in the `eval` split).
    #[arg(long, conflicts_with = "prompts")]
    pub more_prompts: bool,
    /// Which prompts: `train` leaves out the held-out ones that `eval` selects (a stable hash of
    /// the prompt's text picks about one in ten).
    #[arg(long, value_enum, default_value = "train")]
    pub split: Split,
    /// Use only the first N prompts.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Responses sampled per prompt.
    #[arg(long, default_value_t = 4)]
    pub k: usize,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The base model to sample from (default: the manifest's default model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Prompts decoded together (each with its K responses); the rest wait in the queue.
    #[arg(long, default_value_t = EngineOptions::default().max_running)]
    pub max_running: usize,
    /// Only prompts i with i mod N = I, as I/N: N processes with one thread each share a busy
    /// machine better than one with N threads; `cat` their outputs together.
    #[arg(long, value_parser = parse_shard)]
    pub shard: Option<(usize, usize)>,
    /// Also write every prompt's K responses here ({"prompt", "responses"} per line), for
    /// `--from-responses`.
    #[arg(long)]
    pub responses: Option<PathBuf>,
    /// Rank the responses of an earlier `--responses` file instead of sampling: one sampling
    /// run serves every objective.
    #[arg(long, conflicts_with_all = ["responses", "prompts", "limit", "shard", "model"])]
    pub from_responses: Option<PathBuf>,
    /// Pair only responses whose word counts differ by at most this share of the longer's,
    /// taking the widest score gap among them (see `widest_pair`); default: best vs worst.
    #[arg(long)]
    pub length_tolerance: Option<f32>,
    /// Skip a prompt whose pair's scores differ by less than this, as a tie: a lexicon's small
    /// gaps (one word more of sentiment in a long answer) are noise the ARM would learn.
    #[arg(long, default_value_t = 0.0)]
    pub min_gap: f32,
}

fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    let parsed = s
        .split_once('/')
        .and_then(|(i, n)| Some((i.parse().ok()?, n.parse().ok()?)));
    match parsed {
        Some((i, n)) if i < n => Ok((i, n)),
        _ => Err(format!("expected I/N with I < N, got `{s}`")),
    }
}

/// One line of a `--responses` file.
#[derive(Serialize, Deserialize)]
struct Responses {
    prompt: String,
    responses: Vec<String>,
    /// Whether each response ended on its own (end of text), not at `--max-tokens`. Files
    /// written before this field count every response as ended.
    #[serde(default)]
    ended: Vec<bool>,
}

impl PrefsArgs {
    fn check(&self) -> Result<()> {
        if self.k < 2 {
            bail!("--k must be at least 2 to make a pair, got {}", self.k);
        }
        if self.max_tokens == 0 {
            bail!("--max-tokens must be at least 1");
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            bail!(
                "--temperature must be above 0 (at 0 all K responses are the same), got {}",
                self.temperature
            );
        }
        if self.limit == Some(0) {
            bail!("--limit must be at least 1");
        }
        if self.max_running == 0 {
            bail!("--max-running must be at least 1");
        }
        if self
            .length_tolerance
            .is_some_and(|t| !(t.is_finite() && t >= 0.0))
        {
            bail!("--length-tolerance must be a share of at least 0");
        }
        if !(self.min_gap.is_finite() && self.min_gap >= 0.0) {
            bail!("--min-gap must be at least 0, got {}", self.min_gap);
        }
        Ok(())
    }
}

/// K responses to each prompt, in prompt order (the time is left to the caller).
fn sample(
    engine: &Engine,
    prompts: Vec<String>,
    args: &PrefsArgs,
    bar: &ProgressBar,
) -> Result<Sampled> {
    let base = engine.base();
    let mut streams = Vec::with_capacity(prompts.len());
    for (i, prompt) in prompts.iter().enumerate() {
        let tokens = super::render_prompt(&base.chat, &base.vocab, prompt)?;
        if tokens.len() >= base.context_length() {
            bail!(
                "prompt {} has {} tokens; the model's context holds {}",
                i + 1,
                tokens.len(),
                base.context_length()
            );
        }
        let generation = Generation {
            prompt: tokens,
            max_tokens: args.max_tokens,
            stop: Vec::new(),
            ignore_eos: false,
            n: args.k,
            sampling: SamplingParams {
                temperature: args.temperature,
                // Per prompt, so a prompt gets the same responses wherever it sits in the set.
                seed: Some(args.seed ^ prompts::stable_hash(prompt)),
                ..SamplingParams::default()
            },
            model_prompts: Default::default(),
        };
        let decoder = decode::build("sample", generation, engine.models())?;
        streams.push(engine.submit(decoder)?);
    }
    let (mut responses, mut ended) = (Vec::with_capacity(prompts.len()), Vec::new());
    let mut generated = 0;
    for mut events in streams {
        let mut texts = vec![String::new(); args.k];
        let mut stopped = vec![false; args.k];
        loop {
            match events.blocking_recv() {
                Some(Event::Token(t)) => texts[t.choice].push_str(&t.text),
                Some(Event::Finished {
                    choice,
                    text,
                    reason,
                }) => {
                    texts[choice].push_str(&text);
                    stopped[choice] = reason == FinishReason::Stop;
                }
                Some(Event::Done { usage, .. }) => {
                    generated += usage.completion_tokens;
                    break;
                }
                Some(Event::Failed(msg)) => bail!(msg),
                Some(Event::Started { .. } | Event::Prompt(_)) => {}
                None => bail!("the engine stopped"),
            }
        }
        responses.push(texts);
        ended.push(stopped);
        bar.inc(1);
    }
    Ok(Sampled {
        prompts,
        responses,
        ended,
        generated,
        seconds: 0.0,
    })
}

/// The prompts and their K responses each, with what sampling them cost.
struct Sampled {
    prompts: Vec<String>,
    responses: Vec<Vec<String>>,
    /// Per response, whether it ended on its own.
    ended: Vec<Vec<bool>>,
    /// Tokens generated, and the seconds it took (0 for responses read back).
    generated: usize,
    seconds: f64,
}

/// Sample K responses to every prompt the arguments select.
fn sample_all(args: &PrefsArgs) -> Result<Sampled> {
    let mut prompts = match &args.prompts {
        Some(path) => prompts::read(path, args.split)?,
        None if args.more_prompts => prompts::builtin_more(args.split),
        None => prompts::builtin(args.split),
    };
    prompts.truncate(args.limit.unwrap_or(usize::MAX));
    if let Some((i, n)) = args.shard {
        prompts = prompts.into_iter().skip(i).step_by(n).collect();
    }
    if prompts.is_empty() {
        bail!("no prompts in the {:?} split", args.split);
    }
    // Before the long part, so that an unwritable path fails at once.
    let mut saved = match &args.responses {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => None,
    };
    std::fs::File::create(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let path = match &args.model {
        Some(p) => p.clone(),
        None => fetch::ensure(&fetch::models_dir(), fetch::DEFAULT_MODEL)?,
    };
    let base = Model::load(&path, "base", Role::Base)?;
    let options = EngineOptions {
        max_running: args.max_running,
        ..EngineOptions::default()
    };
    let engine = Engine::start(vec![base], options);
    let bar = crate::progress::bar(prompts.len() as u64, "prompts");
    let start = Instant::now();
    let mut sampled = sample(&engine, prompts, args, &bar)?;
    sampled.seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    if let (Some(file), Some(path)) = (&mut saved, &args.responses) {
        let lines = sampled.prompts.iter().zip(&sampled.responses);
        for ((prompt, responses), ended) in lines.zip(&sampled.ended) {
            let line = Responses {
                prompt: prompt.clone(),
                responses: responses.clone(),
                ended: ended.clone(),
            };
            writeln!(file, "{}", serde_json::to_string(&line)?)?;
        }
        file.flush()
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(sampled)
}

/// The `tilt prefs` command.
pub fn run(args: PrefsArgs) -> Result<()> {
    let start = Instant::now();
    args.check()?;
    let Sampled {
        prompts,
        responses,
        ended,
        generated,
        seconds: sampling,
    } = match &args.from_responses {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let lines = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(serde_json::from_str::<Responses>)
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("reading {}", path.display()))?;
            let mut prompts = Vec::with_capacity(lines.len());
            let (mut responses, mut ended) = (Vec::new(), Vec::new());
            for r in lines {
                let mut e = r.ended;
                e.resize(r.responses.len(), true);
                prompts.push(r.prompt);
                responses.push(r.responses);
                ended.push(e);
            }
            Sampled {
                prompts,
                responses,
                ended,
                generated: 0,
                seconds: 0.0,
            }
        }
        None => sample_all(&args)?,
    };
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(&args.out)
            .with_context(|| format!("creating {}", args.out.display()))?,
    );

    let scorer = args.objective.scorer();
    let pairs: Vec<ScoredPair> = prompts
        .iter()
        .zip(&responses)
        .zip(&ended)
        .filter_map(|((prompt, texts), ended)| {
            // `concise` learns from a real answer against a longer or unreal one; a prompt
            // without a real answer has none to choose.
            if args.objective == Objective::Concise
                && !texts.iter().zip(ended).any(|(t, &e)| is_real_answer(t, e))
            {
                return None;
            }
            let scores: Vec<f32> = texts
                .iter()
                .zip(ended)
                .map(|(t, &e)| args.objective.score(&*scorer, t, e))
                .collect();
            let scored = Scored {
                prompt,
                responses: texts,
                ended,
                scores: &scores,
            };
            scored.widest_pair(args.length_tolerance, args.min_gap)
        })
        .collect();
    for pair in &pairs {
        writeln!(file, "{}", serde_json::to_string(pair)?)?;
    }
    file.flush()
        .with_context(|| format!("writing {}", args.out.display()))?;

    // The scorer's own gap (for `concise`, in words, without the penalty of unreal answers).
    let gap = |p: &ScoredPair| scorer.score(&p.chosen) - scorer.score(&p.rejected);
    let wall = start.elapsed().as_secs_f64();
    println!(
        "{} pairs from {} prompts ({} skipped: ties or gaps below --min-gap, or for concise no real answer), \
         mean score gap {:.3}",
        pairs.len(),
        prompts.len(),
        prompts.len() - pairs.len(),
        // A fold from +0: an empty `sum` of floats is −0.
        pairs.iter().map(gap).fold(0.0, |a, b| a + b) / pairs.len().max(1) as f32,
    );
    if args.from_responses.is_none() {
        println!(
            "{generated} tokens generated at {:.1} tok/s; {wall:.1} s in all; written to {}",
            generated as f64 / sampling.max(1e-9),
            args.out.display()
        );
    } else {
        println!("written to {}", args.out.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scored<'a>(texts: &'a [String], ended: &'a [bool], scores: &'a [f32]) -> Scored<'a> {
        Scored {
            prompt: "p",
            responses: texts,
            ended,
            scores,
        }
    }

    #[test]
    fn best_vs_worst_skips_ties() {
        let texts: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let ended = [true, true, false];
        let pair = scored(&texts, &ended, &[0.5, 2.0, -1.0])
            .best_vs_worst(0.0)
            .unwrap();
        assert_eq!((pair.chosen.as_str(), pair.rejected.as_str()), ("b", "c"));
        assert_eq!((pair.chosen_ended, pair.rejected_ended), (true, false));
        assert_eq!(pair.scores, [0.5, 2.0, -1.0]);
        assert!(scored(&texts, &ended, &[1.0, 1.0, 1.0])
            .best_vs_worst(0.0)
            .is_none());
        // A gap under `min_gap` is a tie; one at it is not.
        let narrow = scored(&texts, &ended, &[0.5, 0.75, 0.5]);
        assert!(narrow.best_vs_worst(0.3).is_none());
        assert!(narrow.best_vs_worst(0.25).is_some());
    }

    #[test]
    fn a_length_tolerance_pairs_responses_of_about_the_same_length() {
        let texts: Vec<String> = ["good day", "a b c d e f g h", "bad day", "ok"]
            .map(String::from)
            .to_vec();
        let (ended, scores) = ([true; 4], [1.0, 3.0, -1.0, -2.0]);
        let pair = scored(&texts, &ended, &scores)
            .widest_pair(Some(0.0), 0.0)
            .unwrap();
        assert_eq!(
            (pair.chosen.as_str(), pair.rejected.as_str()),
            ("good day", "bad day")
        );
        let pair = scored(&texts, &ended, &scores)
            .widest_pair(None, 0.0)
            .unwrap();
        assert_eq!(
            (pair.chosen.as_str(), pair.rejected.as_str()),
            ("a b c d e f g h", "ok")
        );
        let one = scored(&texts[1..2], &ended[1..2], &scores[1..2]);
        assert!(one.widest_pair(Some(0.5), 0.0).is_none());
        // Among same-length pairs only, the widest gap (2) is below a min_gap of 2.5.
        assert!(scored(&texts, &ended, &scores)
            .widest_pair(Some(0.0), 2.5)
            .is_none());
    }

    #[test]
    fn concise_prefers_fewer_words_of_real_answers_that_end() {
        let s = Objective::Concise.scorer();
        assert!(s.score("Yes.") > s.score("Yes, I think so."));
        let score = |text, ended| Objective::Concise.score(&*s, text, ended);
        let long = "Yes, I think so, and here is why: it rains.";
        assert!(score(long, true) > score("\"1\" \"2\"", false));
        // Digits and symbols that end are not a short answer either.
        assert!(score(long, true) > score("11:11 12:11 ok", true));
        // Below real answers, the more symbol-like ranks lowest: it is what a pair rejects.
        assert!(score("Yes, I think so, and", false) > score("11:11 12:11 ok", true));
        let sentiment = Objective::Sentiment.scorer();
        assert_eq!(
            Objective::Sentiment.score(&*sentiment, "good", false),
            sentiment.score("good")
        );
    }
}
