//! `tilt eval steer`: how GenARM's reward weights steer the base. Each ARM is paired with a
//! programmatic scorer of what it was trained for (its *objective*). The sweep runs every ARM's
//! weight over a list alone (the others at 0), again under each KL budget, and a grid over the
//! first two ARMs together, and best-of-N ranked by each ARM (and by the objective's own scorer
//! where the server has it as a reward); per setting it reports each objective's mean reward, the
//! mean per-token KL to the base (from the decoder's report), distinct-2, the base's perplexity of
//! the answers and tokens/s, marks per objective the best setting that stays fluent, and checks
//! that each weight moves its own objective monotonically along its 1-D sweep.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use serde_json::{json, Value};

use super::judge::Judge;
use super::{Decoding, Job, Output};
use crate::bench::plot::{xy_panels, Panel, XySeries};
use crate::decode::DecoderSpec;
use crate::engine::{Engine, EngineOptions};
use crate::reward::scorers::{Keywords, Readability, RegexMatch, Scorer, Sentiment};
use crate::train::prompts::{self, Split};

/// A list of weights, as a comma-separated flag.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights(pub Vec<f32>);

fn parse_weights(s: &str) -> Result<Weights, String> {
    super::parse_numbers(s).map(Weights)
}

/// A list of counts of at least 1, as a comma-separated flag.
#[derive(Debug, Clone, PartialEq)]
pub struct Counts(pub Vec<usize>);

fn parse_counts(s: &str) -> Result<Counts, String> {
    let counts = (s.split(',').map(str::trim).filter(|x| !x.is_empty()))
        .map(|x| match x.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(format!("`{x}` is not a count of at least 1")),
        })
        .collect::<Result<_, _>>()?;
    Ok(Counts(counts))
}

/// A programmatic measure of an objective, higher is better.
#[derive(Debug, Clone)]
pub enum ObjectiveScorer {
    /// The sentiment lexicon: (positive − negative words) / √words.
    Sentiment,
    /// Minus the number of words.
    Concise,
    /// Flesch reading ease.
    Readability,
    /// How many times a word (or phrase) occurs, whole words, case-insensitive.
    Count(String),
    /// 1 if the pattern matches, else 0.
    Regex(String),
    /// The share of the keywords present (whole words).
    Keywords(Vec<String>),
}

impl ObjectiveScorer {
    pub const HELP: &'static str =
        "sentiment, concise (−words), readability (Flesch reading ease), count:WORD, regex:PATTERN, keywords:A,B,…";

    pub fn parse(s: &str) -> Result<Self, String> {
        let (kind, arg) = match s.split_once(':') {
            Some((k, a)) => (k, Some(a)),
            None => (s, None),
        };
        match (kind, arg) {
            ("sentiment", None) => Ok(Self::Sentiment),
            ("concise", None) => Ok(Self::Concise),
            ("readability", None) => Ok(Self::Readability),
            ("count", Some(w)) if !super::words(w).is_empty() => {
                Ok(Self::Count(super::words(w).join(" ")))
            }
            ("regex", Some(p)) => RegexMatch::new(p)
                .map(|_| Self::Regex(p.to_string()))
                .map_err(|e| format!("regex `{p}`: {e}")),
            ("keywords", Some(k)) => {
                let k: Vec<String> = k
                    .split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .map(String::from)
                    .collect();
                if k.is_empty() {
                    Err("keywords: needs at least one keyword".into())
                } else {
                    Ok(Self::Keywords(k))
                }
            }
            _ => Err(format!("unknown scorer `{s}`; one of: {}", Self::HELP)),
        }
    }

    /// The scorer an ARM's name implies: `positive`/`sentiment`, `concise`, `simple`/`readability`.
    pub fn for_arm(name: &str) -> Option<Self> {
        match name {
            "positive" | "sentiment" => Some(Self::Sentiment),
            "concise" => Some(Self::Concise),
            "simple" | "readability" => Some(Self::Readability),
            _ => None,
        }
    }

    /// A judge of the same quality that is not this scorer, where there is one.
    pub fn judge<'a>(&self, model: &'a crate::model::Model) -> Option<Result<Judge<'a>>> {
        match self {
            Self::Sentiment => Some(Judge::sentiment(model)),
            Self::Readability => Some(Judge::plainness(model)),
            _ => None,
        }
    }

    /// The server's programmatic reward that scores the same thing, where it has one.
    pub fn reward_name(&self) -> Option<&'static str> {
        match self {
            Self::Sentiment => Some("sentiment"),
            Self::Readability => Some("readability"),
            _ => None,
        }
    }

    pub fn label(&self) -> String {
        match self {
            Self::Sentiment => "sentiment".into(),
            Self::Concise => "concise".into(),
            Self::Readability => "readability".into(),
            Self::Count(w) => format!("count:{w}"),
            Self::Regex(p) => format!("regex:{p}"),
            Self::Keywords(k) => format!("keywords:{}", k.join(",")),
        }
    }

    pub fn score(&self, text: &str) -> f64 {
        match self {
            Self::Sentiment => f64::from(Sentiment.score(text)),
            Self::Concise => -(super::words(text).len() as f64),
            Self::Readability => f64::from(Readability.score(text)),
            Self::Count(w) => {
                let needle: Vec<&str> = w.split(' ').collect();
                let words = super::words(text);
                words
                    .windows(needle.len())
                    .filter(|win| win.iter().zip(&needle).all(|(a, b)| a == b))
                    .count() as f64
            }
            Self::Regex(p) => f64::from(RegexMatch::new(p).expect("checked").score(text)),
            Self::Keywords(k) => f64::from(Keywords::new(k).score(text)),
        }
    }
}

fn parse_objective(s: &str) -> Result<(String, ObjectiveScorer), String> {
    match s.split_once('=') {
        Some((arm, scorer)) if !arm.is_empty() => {
            Ok((arm.to_string(), ObjectiveScorer::parse(scorer)?))
        }
        _ => Err(format!(
            "expected ARM=SCORER (SCORER one of: {}), got `{s}`",
            ObjectiveScorer::HELP
        )),
    }
}

#[derive(clap::Args, Debug)]
pub struct SteerArgs {
    /// Write steer.md, steer.svg and steer.json here.
    #[arg(long)]
    pub out: PathBuf,
    /// The base and the reward models; every loaded reward model is swept.
    #[command(flatten)]
    pub models: super::EvalModels,
    /// What an ARM steers towards, measured by a programmatic scorer, as ARM=SCORER (repeatable;
    /// SCORER: sentiment, concise (minus the word count), readability (Flesch reading ease),
    /// count:WORD, regex:PATTERN, keywords:A,B). ARMs named `positive`/`sentiment`, `concise`
    /// and `simple` get theirs by default.
    #[arg(long = "objective", value_name = "ARM=SCORER", value_parser = parse_objective)]
    pub objectives: Vec<(String, ObjectiveScorer)>,
    /// Each ARM's weight in its 1-D sweep (the others at 0).
    #[arg(long, default_value = "-1,0,0.5,1,2,4", value_parser = parse_weights, allow_hyphen_values = true)]
    pub weights: Weights,
    /// Weights of the 2-D grid over the first two ARMs (each pair of them); empty for none.
    #[arg(long, default_value = "-1,0,1,2", value_parser = parse_weights, allow_hyphen_values = true)]
    pub grid: Weights,
    /// GenARM's β: each ARM's log-probs count weight/β.
    #[arg(long, default_value_t = 1.0)]
    pub beta: f32,
    /// KL budgets (`max_kl_per_token`, nats): each runs every ARM's 1-D sweep again under it
    /// (its nonzero weights); empty for none.
    #[arg(long, default_value = "0.5", value_parser = parse_weights)]
    pub max_kl: Weights,
    /// N of the best-of-N settings, ranked by each ARM (and by its objective's scorer where the
    /// server has one of that name), as a list; empty for none. Best-of-2 generates as many
    /// tokens per answer as GenARM with one ARM feeds its models.
    #[arg(long, default_value = "2,4", value_parser = parse_counts)]
    pub best_of: Counts,
    /// A fluent setting keeps distinct-2 at least this…
    #[arg(long, default_value_t = 0.8)]
    pub min_distinct_2: f64,
    /// …and the base's perplexity of its answers within this multiple of plain decoding's…
    #[arg(long, default_value_t = 1.5)]
    pub max_perplexity_ratio: f64,
    /// …and its share of word tokens (with a letter) at least this fraction of plain decoding's:
    /// a length objective must not be won with digits and symbols.
    #[arg(long, default_value_t = 0.9)]
    pub min_word_share: f64,
    /// Prompts, one {"prompt": …} per line (default: the built-in held-out `eval` split).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Use only the first N prompts.
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// 1 samples the tilted distribution itself.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Each prompt samples with seed ^ hash(prompt), the same in every setting.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Requests decoded together.
    #[arg(long, default_value_t = EngineOptions::default().max_running)]
    pub max_running: usize,
}

/// How a setting decodes.
#[derive(Debug, Clone, PartialEq)]
enum Method {
    /// GenARM at the setting's weights, under a KL budget or not.
    GenArm { max_kl: Option<f32> },
    /// Best-of-N of plain samples, ranked by a reward (an ARM or a programmatic scorer).
    BestOf { n: usize, by: String },
}

impl Method {
    fn label(&self) -> String {
        match self {
            Self::GenArm { max_kl: None } => "genarm".into(),
            Self::GenArm { max_kl: Some(b) } => format!("genarm, KL ≤ {b}"),
            Self::BestOf { n, by } => format!("best-of-{n} by {by}"),
        }
    }

    /// The decoder config of this method at `weights` (an entry per ARM of `arms`).
    fn config(&self, arms: &[String], weights: &[f32], beta: f32) -> Value {
        match self {
            Self::GenArm { max_kl } => {
                let rewards: serde_json::Map<String, Value> = arms
                    .iter()
                    .zip(weights)
                    .map(|(a, &w)| (a.clone(), json!(w)))
                    .collect();
                let mut config = json!({"decoder": "genarm", "rewards": rewards, "beta": beta});
                if let Some(b) = max_kl {
                    config["max_kl_per_token"] = json!(b);
                }
                config
            }
            Self::BestOf { n, by } => {
                json!({"decoder": "best_of_n", "n": n, "rewards": {by.as_str(): 1.0}})
            }
        }
    }
}

/// One way of decoding (GenARM weights, an entry per ARM in load order, or best-of-N) and the
/// sweeps it belongs to.
#[derive(Debug, Clone)]
struct Setting {
    weights: Vec<f32>,
    method: Method,
    sweeps: Vec<String>,
}

impl Setting {
    fn label(&self) -> String {
        match self.is_plain() {
            true => "plain".into(),
            false => self.method.label(),
        }
    }

    /// Plain decoding: every weight 0, no budget.
    fn is_plain(&self) -> bool {
        self.method == (Method::GenArm { max_kl: None }) && self.weights.iter().all(|&w| w == 0.0)
    }
}

/// What one setting measured.
#[derive(Debug, Clone)]
struct Measured {
    /// Mean reward per objective (ARM order).
    rewards: Vec<f64>,
    kl_per_token: f64,
    /// The mean and least scale a KL budget gave the weights.
    kl_scale: Option<(f64, f64)>,
    distinct_2: f64,
    /// The share of answer tokens with a letter in them.
    word_tokens: f64,
    /// Per objective, its judge's score of each answer, in prompt order (empty for an objective
    /// without a judge: only `sentiment` and `readability` have one).
    judge_scores: Vec<Vec<f64>>,
    /// The base's perplexity of the answers (teacher-forced, answer tokens pooled).
    perplexity: f64,
    mean_tokens: f64,
    /// Tokens generated per answer (every candidate of best-of-N).
    generated_per_answer: f64,
    tokens_per_s: f64,
    wall_s: f64,
    outputs: Vec<Output>,
}

/// The name of ARM `arm`'s sweep under KL budget `budget`.
fn budget_sweep(arm: &str, budget: f32) -> String {
    format!("{arm}, KL ≤ {budget}")
}

/// What the settings cover beyond the 1-D sweeps and the grid.
struct Plan<'a> {
    weights: &'a [f32],
    grid: &'a [f32],
    budgets: &'a [f32],
    best_of: &'a [usize],
    /// Per ARM, the rewards its best-of-N settings rank by: itself, and its objective's scorer
    /// where the server has one.
    rankers: Vec<Vec<String>>,
}

impl Measured {
    /// Objective `i`'s judge scores (empty without a judge).
    fn judged(&self, i: usize) -> &[f64] {
        self.judge_scores.get(i).map_or(&[], Vec::as_slice)
    }

    /// Objective `i`'s judge: its mean score and the share of answers it reads as having the
    /// quality (above 0).
    fn judge(&self, i: usize) -> Option<(f64, f64)> {
        let scores = self.judged(i);
        (!scores.is_empty()).then(|| {
            let positive = scores.iter().filter(|&&s| s > 0.0).count();
            (
                super::mean(scores.iter().copied()),
                positive as f64 / scores.len() as f64,
            )
        })
    }
}

/// Every setting once: plain decoding, each ARM's sweep, the grid over the first two, each ARM's
/// sweep under each budget, then best-of-N per ARM and ranker.
fn settings(arms: &[String], plan: &Plan) -> Vec<Setting> {
    let mut out: Vec<Setting> = Vec::new();
    let mut add = |w: Vec<f32>, method: Method, sweep: String| match out
        .iter_mut()
        .find(|s| s.weights == w && s.method == method)
    {
        Some(s) => s.sweeps.push(sweep),
        None => out.push(Setting {
            weights: w,
            method,
            sweeps: vec![sweep],
        }),
    };
    let genarm = Method::GenArm { max_kl: None };
    let along = |i: usize, w: f32| {
        let mut v = vec![0.0; arms.len()];
        v[i] = w;
        v
    };
    add(vec![0.0; arms.len()], genarm.clone(), "plain".into());
    for (i, arm) in arms.iter().enumerate() {
        for &w in plan.weights {
            add(along(i, w), genarm.clone(), arm.clone());
        }
    }
    if arms.len() >= 2 {
        for &a in plan.grid {
            for &b in plan.grid {
                let mut v = vec![0.0; arms.len()];
                v[0] = a;
                v[1] = b;
                add(v, genarm.clone(), "grid".into());
            }
        }
    }
    for &budget in plan.budgets {
        let method = Method::GenArm {
            max_kl: Some(budget),
        };
        for (i, arm) in arms.iter().enumerate() {
            for &w in plan.weights.iter().filter(|&&w| w != 0.0) {
                add(along(i, w), method.clone(), budget_sweep(arm, budget));
            }
        }
    }
    for &n in plan.best_of {
        for (i, arm) in arms.iter().enumerate() {
            for by in &plan.rankers[i] {
                let method = Method::BestOf { n, by: by.clone() };
                add(vec![0.0; arms.len()], method, format!("{arm}, best-of"));
            }
        }
    }
    out
}

/// Whether `points` (weight, reward), sorted by weight, never fall: the drops where they do.
fn drops(points: &[(f32, f64)]) -> Vec<(f32, f32, f64)> {
    points
        .windows(2)
        .filter(|p| p[1].1 < p[0].1)
        .map(|p| (p[0].0, p[1].0, p[1].1 - p[0].1))
        .collect()
}

/// Indices of the settings no other setting beats on both objectives (≥ both, > one).
fn pareto(points: &[(f64, f64)]) -> Vec<usize> {
    (0..points.len())
        .filter(|&i| {
            let (a, b) = points[i];
            !points
                .iter()
                .any(|&(x, y)| x >= a && y >= b && (x > a || y > b))
        })
        .collect()
}

fn fmt_weight(w: f32) -> String {
    format!("{w}")
}

/// The `tilt eval steer` command.
pub fn run(args: SteerArgs) -> Result<()> {
    if args.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    if args.limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    if args.weights.0.is_empty() {
        bail!("--weights needs at least one weight");
    }
    if !(args.beta.is_finite() && args.beta > 0.0) {
        bail!("--beta must be above 0, got {}", args.beta);
    }
    let mut prompts = match &args.prompts {
        Some(path) => prompts::read(path, Split::All)?,
        None => prompts::builtin(Split::Eval),
    };
    prompts.truncate(args.limit.unwrap_or(usize::MAX));
    if prompts.is_empty() {
        bail!("no prompts");
    }
    std::fs::create_dir_all(&args.out)?;

    for &b in &args.max_kl.0 {
        if !(b.is_finite() && b >= 0.0) {
            bail!("--max-kl takes budgets of at least 0 nats, got {b}");
        }
    }
    let models = args.models.load()?;
    // A second copy of the base for teacher-forced perplexity and the judges; the engine owns
    // the first.
    let reader = super::load_base(args.models.model.as_deref())?;
    // The reward models (the manifest's draft loads beside them).
    let arms: Vec<String> = (models[1..].iter())
        .filter(|m| m.role == crate::model::Role::Reward)
        .map(|m| m.name.clone())
        .collect();
    if arms.is_empty() {
        bail!(
            "no reward models to sweep: the manifest lists none that are present; add --reward NAME=PATH"
        );
    }
    for (arm, _) in &args.objectives {
        if !arms.contains(arm) {
            bail!(
                "--objective {arm}=…: no reward model `{arm}` is loaded (loaded: {})",
                arms.join(", ")
            );
        }
    }
    let objectives: Vec<ObjectiveScorer> = arms
        .iter()
        .map(|arm| {
            let given = args.objectives.iter().rev().find(|(a, _)| a == arm);
            given
                .map(|(_, s)| s.clone())
                .or_else(|| ObjectiveScorer::for_arm(arm))
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "no objective for reward model `{arm}`: add --objective {arm}=SCORER ({})",
                        ObjectiveScorer::HELP
                    )
                })
        })
        .collect::<Result<_>>()?;
    // An independent judge per objective where there is one: the scorer trained the ARM, so it
    // cannot be the only measure of it.
    let judges: Vec<Option<Judge>> = objectives
        .iter()
        .map(|o| o.judge(&reader).transpose())
        .collect::<Result<_>>()?;
    let engine = Engine::start(
        models,
        EngineOptions {
            max_running: args.max_running.max(1),
            ..EngineOptions::default()
        },
    );
    let decoding = Decoding {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    };
    let rankers = arms
        .iter()
        .zip(&objectives)
        .map(|(arm, objective)| {
            let mut by = vec![arm.clone()];
            by.extend(
                objective
                    .reward_name()
                    .filter(|name| engine.rewards().scorer(name).is_some())
                    .map(String::from),
            );
            by
        })
        .collect();
    let plan = Plan {
        weights: &args.weights.0,
        grid: &args.grid.0,
        budgets: &args.max_kl.0,
        best_of: &args.best_of.0,
        rankers,
    };
    let settings = settings(&arms, &plan);
    eprintln!(
        "eval steer: {} settings × {} prompts, ARMs {}",
        settings.len(),
        prompts.len(),
        arms.join(", ")
    );
    let bar = crate::progress::bar((settings.len() * prompts.len()) as u64, "steer");
    let mut measured = Vec::with_capacity(settings.len());
    for setting in &settings {
        let config = setting.method.config(&arms, &setting.weights, args.beta);
        let (name, params) = super::split_config(&config)?;
        let spec = DecoderSpec::parse(&name, params, engine.rewards())
            .map_err(|e| anyhow::anyhow!("{config}: {}", e.message))?;
        let jobs: Vec<Job> = prompts
            .iter()
            .map(|p| Job {
                spec: spec.clone(),
                prompt: p.clone(),
                salt: 0,
            })
            .collect();
        let start = Instant::now();
        let outputs = super::run_jobs(&engine, &jobs, &decoding, &bar)?;
        let wall_s = start.elapsed().as_secs_f64();
        let items: Vec<(&[u32], &[u32])> = outputs
            .iter()
            .map(|o| (o.prompt_tokens.as_slice(), o.tokens.as_slice()))
            .collect();
        let nll = super::response_nll(&reader, &items)?;
        let texts: Vec<&str> = outputs.iter().map(|o| o.text.as_str()).collect();
        let judged = judges
            .iter()
            .map(|j| j.as_ref().map_or(Ok(Vec::new()), |j| j.score(&texts)))
            .collect::<Result<_>>()?;
        let vocab = &engine.base().vocab;
        let mut m = measure(&objectives, outputs, &nll, vocab, wall_s);
        m.judge_scores = judged;
        measured.push(m);
    }
    bar.finish_and_clear();

    let report = Report {
        arms: &arms,
        objectives: &objectives,
        settings: &settings,
        measured: &measured,
        fluency: Fluency {
            min_distinct_2: args.min_distinct_2,
            max_perplexity_ratio: args.max_perplexity_ratio,
            min_word_share: args.min_word_share,
        },
    };
    let checks = report.monotonicity();
    let files = super::write_files(
        &args.out,
        &[
            ("steer.md", report.markdown(&checks)),
            ("steer.svg", report.svg()),
            (
                "steer.json",
                serde_json::to_string_pretty(&report.json(&checks, &args, &prompts))?,
            ),
        ],
    )?;
    println!("{}", report.markdown(&checks));
    for f in files {
        eprintln!("wrote {}", f.display());
    }
    Ok(())
}

fn measure(
    objectives: &[ObjectiveScorer],
    outputs: Vec<Output>,
    nll: &[(f64, usize)],
    vocab: &crate::model::Vocab,
    wall_s: f64,
) -> Measured {
    // Tokens with a letter in them, pooled: what a length objective cannot win by symbols.
    let (wordy, answered) = outputs
        .iter()
        .flat_map(|o| &o.tokens)
        .fold((0, 0), |(w, n), &t| {
            let wordy = vocab.decode(&[t]).chars().any(char::is_alphabetic);
            (w + usize::from(wordy), n + 1)
        });
    let texts: Vec<&str> = outputs.iter().map(|o| o.text.as_str()).collect();
    let rewards = objectives
        .iter()
        .map(|o| super::mean(texts.iter().map(|t| o.score(t))))
        .collect();
    // Per-token KL, pooled over every token of the setting.
    let (kl, tokens) = outputs.iter().fold((0.0, 0usize), |(kl, n), o| {
        let k = o
            .report
            .as_ref()
            .and_then(|r| r["kl_per_token"].as_f64())
            .unwrap_or(0.0);
        (kl + k * o.generated as f64, n + o.generated)
    });
    let generated: usize = outputs.iter().map(|o| o.generated).sum();
    // A budget's scales, pooled over tokens like the KL; the least over every answer.
    let scales: Vec<(f64, f64, usize)> = outputs
        .iter()
        .filter_map(|o| {
            let scale = &o.report.as_ref()?["kl_scale"];
            Some((scale["mean"].as_f64()?, scale["min"].as_f64()?, o.generated))
        })
        .collect();
    let kl_scale = (!scales.is_empty()).then(|| {
        let n: usize = scales.iter().map(|s| s.2).sum();
        let mean = scales.iter().map(|s| s.0 * s.2 as f64).sum::<f64>() / n.max(1) as f64;
        let min = scales.iter().map(|s| s.1).fold(1.0, f64::min);
        (mean, min)
    });
    Measured {
        rewards,
        kl_per_token: if tokens == 0 { 0.0 } else { kl / tokens as f64 },
        kl_scale,
        distinct_2: super::distinct_2(&texts),
        word_tokens: if answered == 0 {
            f64::NAN
        } else {
            wordy as f64 / answered as f64
        },
        judge_scores: Vec::new(),
        perplexity: super::perplexity(nll),
        generated_per_answer: generated as f64 / outputs.len().max(1) as f64,
        mean_tokens: super::mean(outputs.iter().map(|o| o.tokens.len() as f64)),
        tokens_per_s: generated as f64 / wall_s.max(1e-9),
        wall_s,
        outputs,
    }
}

/// The monotonicity check of one ARM's 1-D sweep.
struct Check {
    arm: String,
    points: Vec<(f32, f64)>,
    drops: Vec<(f32, f32, f64)>,
}

/// Two settings read by the judge prompt by prompt: the mean of a − b, the prompts where a is
/// ahead and behind, and a 95 % bootstrap interval of the mean (2,000 resamples, seed 0).
#[derive(Debug, Clone, PartialEq)]
struct Paired {
    mean: f64,
    wins: usize,
    losses: usize,
    interval: (f64, f64),
}

fn paired(a: &[f64], b: &[f64]) -> Paired {
    use rand::{Rng, SeedableRng};
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut means: Vec<f64> = (0..2000)
        .map(|_| super::mean((0..d.len()).map(|_| d[rng.random_range(0..d.len())])))
        .collect();
    means.sort_by(f64::total_cmp);
    Paired {
        mean: super::mean(d.iter().copied()),
        wins: d.iter().filter(|&&x| x > 0.0).count(),
        losses: d.iter().filter(|&&x| x < 0.0).count(),
        interval: (means[50], means[1949]),
    }
}

/// What a fluent setting keeps: diversity, and the base's perplexity of its answers and their
/// share of word tokens against plain decoding's.
#[derive(Debug, Clone, Copy)]
struct Fluency {
    min_distinct_2: f64,
    max_perplexity_ratio: f64,
    min_word_share: f64,
}

struct Report<'a> {
    arms: &'a [String],
    objectives: &'a [ObjectiveScorer],
    settings: &'a [Setting],
    measured: &'a [Measured],
    fluency: Fluency,
}

impl Report<'_> {
    /// (weight, value) along ARM `i`'s 1-D sweep, by weight.
    fn sweep(&self, i: usize, value: impl Fn(&Measured) -> f64) -> Vec<(f32, f64)> {
        self.sweep_named(i, &self.arms[i], value)
    }

    /// (ARM `i`'s weight, value) over the settings of sweep `name`, by weight.
    fn sweep_named(
        &self,
        i: usize,
        name: &str,
        value: impl Fn(&Measured) -> f64,
    ) -> Vec<(f32, f64)> {
        let mut points: Vec<(f32, f64)> = self
            .settings
            .iter()
            .zip(self.measured)
            .filter(|(s, _)| s.sweeps.iter().any(|w| w == name))
            .map(|(s, m)| (s.weights[i], value(m)))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        points
    }

    /// The names of ARM `i`'s sweeps under a KL budget.
    fn budget_sweeps(&self, i: usize) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for s in self.settings {
            if let Method::GenArm { max_kl: Some(b) } = s.method {
                let name = budget_sweep(&self.arms[i], b);
                if s.sweeps.contains(&name) && !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        names
    }

    /// Plain decoding's measures, the yardstick of fluency.
    fn plain(&self) -> Option<&Measured> {
        (self.settings.iter().zip(self.measured))
            .find(|(s, _)| s.is_plain())
            .map(|(_, m)| m)
    }

    fn plain_perplexity(&self) -> f64 {
        self.plain().map_or(f64::NAN, |m| m.perplexity)
    }

    fn is_fluent(&self, m: &Measured) -> bool {
        let Some(plain) = self.plain() else {
            return false;
        };
        let f = self.fluency;
        m.distinct_2 >= f.min_distinct_2
            && m.perplexity <= f.max_perplexity_ratio * plain.perplexity
            && m.word_tokens >= f.min_word_share * plain.word_tokens
    }

    /// Best-of-N ranked by an ARM against best-of-N ranked by its objective's own scorer, both
    /// read by the judge: (ARM, N, the setting ranked by the ARM, the one ranked by the scorer).
    fn rankers(&self) -> Vec<(usize, usize, usize, usize)> {
        let find = |n: usize, by: &str| {
            (self.settings.iter()).position(|s| {
                s.method
                    == Method::BestOf {
                        n,
                        by: by.to_string(),
                    }
            })
        };
        let mut out = Vec::new();
        for (i, objective) in self.objectives.iter().enumerate() {
            let Some(scorer) = objective.reward_name() else {
                continue;
            };
            let mut ns: Vec<usize> = (self.settings.iter())
                .filter_map(|s| match s.method {
                    Method::BestOf { n, .. } => Some(n),
                    _ => None,
                })
                .collect();
            ns.sort_unstable();
            ns.dedup();
            for n in ns {
                if let (Some(a), Some(b)) = (find(n, &self.arms[i]), find(n, scorer)) {
                    let (x, y) = (self.measured[a].judged(i), self.measured[b].judged(i));
                    if !x.is_empty() && x.len() == y.len() {
                        out.push((i, n, a, b));
                    }
                }
            }
        }
        out
    }

    /// Per objective, the fluent setting among its ARM's own (its sweeps, under any budget, its
    /// best-of-N, and plain decoding) with the highest mean of that objective.
    fn best(&self) -> Vec<Option<usize>> {
        (0..self.arms.len())
            .map(|i| {
                let arm = &self.arms[i];
                let own = |s: &Setting| {
                    s.is_plain()
                        || s.sweeps
                            .iter()
                            .any(|w| w == arm || w.starts_with(&format!("{arm}, ")))
                };
                (0..self.settings.len())
                    .filter(|&k| own(&self.settings[k]) && self.is_fluent(&self.measured[k]))
                    .max_by(|&a, &b| {
                        self.measured[a].rewards[i].total_cmp(&self.measured[b].rewards[i])
                    })
            })
            .collect()
    }

    fn monotonicity(&self) -> Vec<Check> {
        (0..self.arms.len())
            .map(|i| {
                let points = self.sweep(i, |m| m.rewards[i]);
                Check {
                    arm: self.arms[i].clone(),
                    drops: drops(&points),
                    points,
                }
            })
            .collect()
    }

    /// Settings of the grid on the front of the first two objectives.
    fn front(&self) -> Vec<usize> {
        if self.arms.len() < 2 {
            return Vec::new();
        }
        let grid: Vec<usize> = (0..self.settings.len())
            .filter(|&i| self.settings[i].sweeps.iter().any(|s| s == "grid"))
            .collect();
        let points: Vec<(f64, f64)> = grid
            .iter()
            .map(|&i| (self.measured[i].rewards[0], self.measured[i].rewards[1]))
            .collect();
        pareto(&points).into_iter().map(|k| grid[k]).collect()
    }

    fn objective_label(&self, i: usize) -> String {
        format!("{} ({})", self.arms[i], self.objectives[i].label())
    }

    fn markdown(&self, checks: &[Check]) -> String {
        let front = self.front();
        let best = self.best();
        let mut header = vec!["method".to_string()];
        header.extend(self.arms.iter().map(|a| format!("w {a}")));
        header.extend((0..self.arms.len()).map(|i| format!("reward {}", self.objective_label(i))));
        header.extend(
            [
                "KL/token",
                "KL scale mean / min",
                "distinct-2",
                "word tokens",
            ]
            .map(String::from),
        );
        let judged: Vec<usize> = (0..self.arms.len())
            .filter(|&i| self.measured.iter().any(|m| m.judge(i).is_some()))
            .collect();
        header.extend(
            (judged.iter()).map(|&i| format!("judge of {}: score / share above 0", self.arms[i])),
        );
        header.extend(
            [
                "perplexity",
                "tokens",
                "generated / answer",
                "tok/s",
                "sweeps",
            ]
            .map(String::from),
        );
        let rows: Vec<Vec<String>> = self
            .settings
            .iter()
            .zip(self.measured)
            .enumerate()
            .map(|(k, (s, m))| {
                let mut row = vec![s.label()];
                row.extend(s.weights.iter().map(|&w| match s.method {
                    Method::BestOf { .. } => "—".to_string(),
                    Method::GenArm { .. } => fmt_weight(w),
                }));
                row.extend(m.rewards.iter().map(|&r| super::cell(r, 3)));
                let mut sweeps = s.sweeps.join("; ");
                if front.contains(&k) {
                    sweeps.push_str(" (front)");
                }
                for (i, b) in best.iter().enumerate() {
                    if *b == Some(k) {
                        sweeps.push_str(&format!(" (**best fluent {}**)", self.arms[i]));
                    }
                }
                row.extend([
                    super::cell(m.kl_per_token, 4),
                    m.kl_scale.map_or("—".into(), |(mean, min)| {
                        format!("{} / {}", super::cell(mean, 3), super::cell(min, 3))
                    }),
                    super::cell(m.distinct_2, 3),
                    super::cell(m.word_tokens, 3),
                ]);
                row.extend(judged.iter().map(|&i| {
                    m.judge(i).map_or("—".into(), |(score, share)| {
                        format!("{} / {}", super::cell(score, 3), super::cell(share, 2))
                    })
                }));
                row.extend([
                    super::cell(m.perplexity, 2),
                    super::cell(m.mean_tokens, 1),
                    super::cell(m.generated_per_answer, 1),
                    super::cell(m.tokens_per_s, 1),
                    sweeps,
                ]);
                row
            })
            .collect();
        let mut md = String::from("## GenARM steering sweep\n\n");
        md.push_str(&super::table(&header, &rows));
        md.push_str(&format!(
            "\n### Best fluent setting per objective\n\nFluent: distinct-2 ≥ {}, perplexity ≤ {}× plain decoding's ({}) and word tokens ≥ {}× plain decoding's ({}).\n\n",
            self.fluency.min_distinct_2,
            self.fluency.max_perplexity_ratio,
            super::cell(self.plain_perplexity(), 2),
            self.fluency.min_word_share,
            super::cell(self.plain().map_or(f64::NAN, |m| m.word_tokens), 3),
        ));
        let plain = self.plain();
        for (i, b) in best.iter().enumerate() {
            let line = match (b, plain) {
                (Some(k), Some(p)) => {
                    let (s, m) = (&self.settings[*k], &self.measured[*k]);
                    let weights = match s.method {
                        Method::GenArm { .. } if !s.is_plain() => {
                            format!(" at w {}", fmt_weight(s.weights[i]))
                        }
                        _ => String::new(),
                    };
                    format!(
                        "{}{weights}: {} against plain {} ({:+.3}); distinct-2 {}, perplexity {}× plain, word tokens {}",
                        s.label(),
                        super::cell(m.rewards[i], 3),
                        super::cell(p.rewards[i], 3),
                        m.rewards[i] - p.rewards[i],
                        super::cell(m.distinct_2, 3),
                        super::cell(m.perplexity / p.perplexity, 2),
                        super::cell(m.word_tokens, 3),
                    ) + &match (m.judge(i), p.judge(i)) {
                        (Some((j, _)), Some((pj, _))) => format!(
                            ", judge {} against plain {}",
                            super::cell(j, 3),
                            super::cell(pj, 3)
                        ),
                        _ => String::new(),
                    }
                }
                _ => "no setting stays fluent".into(),
            };
            md.push_str(&format!(
                "- `{}` ({}): {line}\n",
                self.arms[i],
                self.objectives[i].label()
            ));
        }
        let rankers = self.rankers();
        if !rankers.is_empty() {
            md.push_str(
                "\n### Ranked by the ARM or by its objective's scorer, read by the judge\n\n",
            );
            for (i, n, a, b) in rankers {
                let (x, y) = (&self.measured[a], &self.measured[b]);
                let p = paired(x.judged(i), y.judged(i));
                md.push_str(&format!(
                    "- best-of-{n}: ranked by `{}` {} against ranked by `{}` {}: {:+.4} a prompt (95 % interval {:+.4} … {:+.4}), ahead on {} prompts and behind on {} of {}\n",
                    self.arms[i],
                    super::cell(x.judge(i).map_or(f64::NAN, |j| j.0), 4),
                    self.objectives[i].reward_name().unwrap_or_default(),
                    super::cell(y.judge(i).map_or(f64::NAN, |j| j.0), 4),
                    p.mean,
                    p.interval.0,
                    p.interval.1,
                    p.wins,
                    p.losses,
                    x.judged(i).len(),
                ));
            }
        }
        md.push_str("\n### Monotonicity of each weight's own objective (1-D sweeps)\n\n");
        for c in checks {
            let path: Vec<String> = c
                .points
                .iter()
                .map(|(w, r)| format!("{w}: {}", super::cell(*r, 3)))
                .collect();
            let change = match (c.points.first(), c.points.last()) {
                (Some(a), Some(b)) => b.1 - a.1,
                _ => 0.0,
            };
            let verdict = if c.drops.is_empty() {
                format!(
                    "monotone (never falls; {:+.3} from the lowest weight to the highest)",
                    if change.abs() < 1e-12 { 0.0 } else { change }
                )
            } else {
                let d: Vec<String> = c
                    .drops
                    .iter()
                    .map(|(a, b, by)| format!("{a}→{b} by {}", super::cell(-by, 3)))
                    .collect();
                format!("NOT monotone: falls at {}", d.join(", "))
            };
            md.push_str(&format!(
                "- `{}` ({}): {verdict} — {}\n",
                c.arm,
                self.objectives[self.arms.iter().position(|a| *a == c.arm).unwrap()].label(),
                path.join(", ")
            ));
        }
        md
    }

    fn svg(&self) -> String {
        xy_panels(&self.panels())
    }

    /// Each objective's reward against its own weight, one panel each (their scales differ:
    /// sentiment lies in 0…5, concise in −60…−20); KL per token of every sweep; the trade-off
    /// over the grid.
    fn panels(&self) -> Vec<Panel> {
        let line = |i: usize, value: &dyn Fn(&Measured) -> f64| XySeries {
            label: self.objective_label(i),
            points: self
                .sweep(i, value)
                .into_iter()
                .map(|(w, v)| (f64::from(w), v))
                .collect(),
            line: true,
        };
        // ARM i's sweeps under each budget, labelled by it.
        let budgeted = |i: usize, value: &dyn Fn(&Measured) -> f64| -> Vec<XySeries> {
            self.budget_sweeps(i)
                .into_iter()
                .map(|name| XySeries {
                    points: self
                        .sweep_named(i, &name, value)
                        .into_iter()
                        .map(|(w, v)| (f64::from(w), v))
                        .collect(),
                    label: name.replacen(&self.arms[i], &self.objective_label(i), 1),
                    line: true,
                })
                .collect()
        };
        let both = |i: usize, value: &dyn Fn(&Measured) -> f64| {
            let mut series = vec![line(i, value)];
            series.extend(budgeted(i, value));
            series
        };
        let mut panels: Vec<Panel> = (0..self.arms.len())
            .map(|i| Panel {
                title: format!(
                    "{}: mean reward vs its weight (others 0)",
                    self.objective_label(i)
                ),
                x_title: format!("weight of {}", self.arms[i]),
                y_title: "mean reward".into(),
                series: both(i, &|m| m.rewards[i]),
            })
            .collect();
        // One measure against the weight, every ARM's sweeps in one panel.
        let every_arm = |title: &str, y_title: &str, value: &dyn Fn(&Measured) -> f64| Panel {
            title: title.into(),
            x_title: "weight".into(),
            y_title: y_title.into(),
            series: (0..self.arms.len()).flat_map(|i| both(i, value)).collect(),
        };
        panels.push(every_arm(
            "KL to the base per token vs weight",
            "nats / token",
            &|m| m.kl_per_token,
        ));
        panels.push(every_arm("distinct-2 vs weight", "distinct-2", &|m| {
            m.distinct_2
        }));
        if self.arms.len() >= 2 {
            // One line per weight of the first ARM, through the weights of the second.
            // (first ARM's weight, [(second's weight, reward 1, reward 2)]).
            type Line = (f32, Vec<(f32, f64, f64)>);
            let mut by_first: Vec<Line> = Vec::new();
            for (s, m) in self.settings.iter().zip(self.measured) {
                if !s.sweeps.iter().any(|x| x == "grid") {
                    continue;
                }
                let point = (s.weights[1], m.rewards[0], m.rewards[1]);
                match by_first.iter_mut().find(|(w, _)| *w == s.weights[0]) {
                    Some((_, pts)) => pts.push(point),
                    None => by_first.push((s.weights[0], vec![point])),
                }
            }
            by_first.sort_by(|a, b| a.0.total_cmp(&b.0));
            let mut series: Vec<XySeries> = by_first
                .into_iter()
                .map(|(w0, mut pts)| {
                    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                    XySeries {
                        label: format!(
                            "w {} = {w0} (points: w {} ascending)",
                            self.arms[0], self.arms[1]
                        ),
                        points: pts.into_iter().map(|(_, a, b)| (a, b)).collect(),
                        line: true,
                    }
                })
                .collect();
            let front: Vec<(f64, f64)> = self
                .front()
                .into_iter()
                .map(|k| (self.measured[k].rewards[0], self.measured[k].rewards[1]))
                .collect();
            if !front.is_empty() {
                let mut front = front;
                front.sort_by(|a, b| a.0.total_cmp(&b.0));
                series.push(XySeries {
                    label: "Pareto front".into(),
                    points: front,
                    line: true,
                });
            }
            if !series.is_empty() {
                panels.push(Panel {
                    title: format!(
                        "Trade-off: {} vs {} over the grid",
                        self.objective_label(0),
                        self.objective_label(1)
                    ),
                    x_title: format!("mean reward {}", self.objective_label(0)),
                    y_title: format!("mean reward {}", self.objective_label(1)),
                    series,
                });
            }
        }
        panels
    }

    fn json(&self, checks: &[Check], args: &SteerArgs, prompts: &[String]) -> Value {
        let front = self.front();
        let best = self.best();
        // Per judged objective, by ARM name: what `f` gives for objective i.
        let judges = |f: &dyn Fn(usize) -> Option<Value>| -> serde_json::Map<String, Value> {
            (0..self.arms.len())
                .filter_map(|i| f(i).map(|v| (self.arms[i].clone(), v)))
                .collect()
        };
        let settings: Vec<Value> = self
            .settings
            .iter()
            .zip(self.measured)
            .enumerate()
            .map(|(k, (s, m))| {
                let weights: serde_json::Map<String, Value> = self
                    .arms
                    .iter()
                    .zip(&s.weights)
                    .map(|(a, &w)| (a.clone(), json!(w)))
                    .collect();
                let rewards: serde_json::Map<String, Value> = self
                    .arms
                    .iter()
                    .zip(&m.rewards)
                    .map(|(a, &r)| (a.clone(), super::num(r)))
                    .collect();
                let best_for: Vec<&String> = (self.arms.iter().zip(&best))
                    .filter(|(_, b)| **b == Some(k))
                    .map(|(a, _)| a)
                    .collect();
                json!({
                    "method": s.label(),
                    "config": s.method.config(self.arms, &s.weights, args.beta),
                    "weights": weights,
                    "sweeps": s.sweeps,
                    "front": front.contains(&k),
                    "fluent": self.is_fluent(m),
                    "best_fluent_for": best_for,
                    "rewards": rewards,
                    "kl_per_token": super::num(m.kl_per_token),
                    "kl_scale": m.kl_scale.map(|(mean, min)| json!({"mean": mean, "min": min})),
                    "distinct_2": super::num(m.distinct_2),
                    "word_tokens": super::num(m.word_tokens),
                    "judge": judges(&|i| m.judge(i).map(|(score, share)| json!({"score": score, "share_above_0": share}))),
                    "perplexity": super::num(m.perplexity),
                    "generated_per_answer": super::num(m.generated_per_answer),
                    "mean_tokens": super::num(m.mean_tokens),
                    "tokens_per_s": super::num(m.tokens_per_s),
                    "wall_s": super::num(m.wall_s),
                    "outputs": m.outputs.iter().zip(prompts).enumerate().map(|(k, (o, p))| json!({
                        "prompt": p, "text": o.text, "tokens": o.tokens.len(),
                        "judge": judges(&|i| m.judged(i).get(k).map(|&j| json!(j))),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let monotonicity: Vec<Value> = checks
            .iter()
            .map(|c| {
                json!({
                    "arm": c.arm,
                    "monotone": c.drops.is_empty(),
                    "weights": c.points.iter().map(|p| p.0).collect::<Vec<_>>(),
                    "rewards": c.points.iter().map(|p| super::num(p.1)).collect::<Vec<_>>(),
                })
            })
            .collect();
        let objectives: serde_json::Map<String, Value> = self
            .arms
            .iter()
            .zip(self.objectives)
            .map(|(a, o)| (a.clone(), json!(o.label())))
            .collect();
        json!({
            "objectives": objectives,
            "beta": args.beta,
            "fluency": {
                "min_distinct_2": self.fluency.min_distinct_2,
                "max_perplexity_ratio": self.fluency.max_perplexity_ratio,
                "min_word_share": self.fluency.min_word_share,
                "plain_perplexity": super::num(self.plain_perplexity()),
            },
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "seed": args.seed,
            "prompts": prompts.len(),
            "settings": settings,
            "rankers": self.rankers().into_iter().map(|(i, n, a, b)| {
                let p = paired(self.measured[a].judged(i), self.measured[b].judged(i));
                json!({
                    "arm": self.arms[i], "n": n,
                    "scorer": self.objectives[i].reward_name(),
                    "judge_difference": p.mean, "ahead": p.wins, "behind": p.losses,
                    "interval_95": [p.interval.0, p.interval.1],
                })
            }).collect::<Vec<_>>(),
            "monotonicity": monotonicity,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::plot::{assert_svg_with, y_range};

    fn plan<'a>(
        weights: &'a [f32],
        grid: &'a [f32],
        budgets: &'a [f32],
        best_of: &'a [usize],
    ) -> Plan<'a> {
        Plan {
            weights,
            grid,
            budgets,
            best_of,
            rankers: vec![vec!["a".into(), "sentiment".into()], vec!["b".into()]],
        }
    }

    #[test]
    fn settings_cover_each_sweep_and_the_grid_once() {
        let arms = vec!["a".to_string(), "b".to_string()];
        let s = settings(&arms, &plan(&[0.0, 1.0], &[0.0, 1.0], &[], &[]));
        // a: (0,0) (1,0); b: (0,0) dup, (0,1); grid adds (1,1).
        let w: Vec<Vec<f32>> = s.iter().map(|s| s.weights.clone()).collect();
        assert_eq!(
            w,
            [
                vec![0.0, 0.0],
                vec![1.0, 0.0],
                vec![0.0, 1.0],
                vec![1.0, 1.0]
            ]
        );
        assert_eq!(s[0].sweeps, ["plain", "a", "b", "grid"]);
        assert!(s[0].is_plain() && !s[1].is_plain());
        // One ARM: no grid; plain decoding even when the weights leave out 0.
        assert_eq!(
            settings(&arms[..1], &plan(&[0.0, 2.0], &[0.0, 1.0], &[], &[])).len(),
            2
        );
        assert_eq!(settings(&arms[..1], &plan(&[2.0], &[], &[], &[])).len(), 2);
        // Budgets repeat each ARM's nonzero weights; best-of ranks by each ranker.
        let s = settings(&arms, &plan(&[0.0, 1.0, 4.0], &[], &[0.5], &[4]));
        let budgeted: Vec<&Setting> = s
            .iter()
            .filter(|s| s.method == Method::GenArm { max_kl: Some(0.5) })
            .collect();
        assert_eq!(budgeted.len(), 4);
        assert_eq!(budgeted[0].sweeps, ["a, KL ≤ 0.5"]);
        let labels: Vec<String> = s
            .iter()
            .filter(|s| matches!(s.method, Method::BestOf { .. }))
            .map(|s| s.method.label())
            .collect();
        assert_eq!(
            labels,
            ["best-of-4 by a", "best-of-4 by sentiment", "best-of-4 by b"]
        );
        assert_eq!(
            s.last().unwrap().method.config(&arms, &[0.0, 0.0], 1.0),
            json!({"decoder": "best_of_n", "n": 4, "rewards": {"b": 1.0}})
        );
        assert_eq!(
            budgeted[0].method.config(&arms, &budgeted[0].weights, 2.0),
            json!({"decoder": "genarm", "rewards": {"a": 1.0, "b": 0.0}, "beta": 2.0, "max_kl_per_token": 0.5})
        );
    }

    #[test]
    fn drops_and_the_front() {
        assert!(drops(&[(0.0, 1.0), (1.0, 1.0), (2.0, 3.0)]).is_empty());
        assert_eq!(drops(&[(0.0, 1.0), (1.0, 0.5)]), [(0.0, 1.0, -0.5)]);
        assert_eq!(
            pareto(&[(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (0.5, 0.5)]),
            [1, 2, 3]
        );
    }

    #[test]
    fn each_objective_gets_its_own_panel_and_y_range() {
        let arms = vec!["positive".to_string(), "concise".to_string()];
        let objectives = [ObjectiveScorer::Sentiment, ObjectiveScorer::Concise];
        let plan = Plan {
            rankers: vec![vec!["positive".into()], vec!["concise".into()]],
            ..plan(&[0.0, 1.0, 2.0], &[0.0, 2.0], &[0.5], &[])
        };
        let settings = settings(&arms, &plan);
        // Sentiment rises over 0…4 with its weight, concise over −60…−20; a budget halves both.
        let measured: Vec<Measured> = settings
            .iter()
            .map(|s| {
                let k = if s.method == (Method::GenArm { max_kl: None }) {
                    1.0
                } else {
                    0.5
                };
                let (a, b) = (f64::from(s.weights[0]) * k, f64::from(s.weights[1]) * k);
                measured(vec![2.0 * a, -60.0 + 20.0 * b], 0.9, 8.0)
            })
            .collect();
        let report = Report {
            arms: &arms,
            objectives: &objectives,
            settings: &settings,
            measured: &measured,
            fluency: Fluency {
                min_distinct_2: 0.8,
                max_perplexity_ratio: 1.5,
                min_word_share: 0.9,
            },
        };
        let panels = report.panels();
        // positive, concise, KL, distinct-2, trade-off.
        assert_eq!(panels.len(), 5);
        let (positive, concise) = (&panels[0], &panels[1]);
        assert_eq!(positive.series.len(), 2);
        assert_eq!(positive.series[0].label, "positive (sentiment)");
        assert_eq!(positive.series[1].label, "positive (sentiment), KL ≤ 0.5");
        assert_eq!(concise.series[0].label, "concise (concise)");
        let (p, c) = (y_range(positive), y_range(concise));
        assert!(p.start > -1.0 && p.end < 5.0, "{p:?}");
        assert!(c.start > -65.0 && c.end < -15.0, "{c:?}");
        assert_eq!(panels[2].series.len(), 4);

        assert_svg_with(
            &report.svg(),
            &[
                "positive (sentiment): mean reward vs its weight (others 0)",
                "concise (concise): mean reward vs its weight (others 0)",
                "KL to the base per token vs weight",
                "distinct-2 vs weight",
                "Trade-off: positive (sentiment) vs concise (concise) over the grid",
                "Pareto front",
            ],
        );
    }

    fn measured(rewards: Vec<f64>, distinct_2: f64, perplexity: f64) -> Measured {
        Measured {
            rewards,
            kl_per_token: 0.1,
            kl_scale: None,
            distinct_2,
            word_tokens: 0.95,
            judge_scores: Vec::new(),
            perplexity,
            mean_tokens: 30.0,
            generated_per_answer: 30.0,
            tokens_per_s: 10.0,
            wall_s: 1.0,
            outputs: Vec::new(),
        }
    }

    #[test]
    fn the_best_setting_is_the_most_rewarded_that_stays_fluent() {
        let arms = vec!["a".to_string(), "b".to_string()];
        let objectives = [ObjectiveScorer::Sentiment, ObjectiveScorer::Concise];
        let settings = settings(&arms, &plan(&[0.0, 1.0, 4.0], &[], &[0.5], &[4]));
        let labels: Vec<String> = settings
            .iter()
            .map(|s| format!("{} {:?}", s.method.label(), s.weights))
            .collect();
        // plain, a 1, a 4, b 1, b 4, a 1 ≤, a 4 ≤, b 1 ≤, b 4 ≤, best-of by a, sentiment, b.
        assert_eq!(settings.len(), 12, "{labels:?}");
        let m = vec![
            measured(vec![0.0, -50.0], 0.9, 8.0),   // plain
            measured(vec![1.0, -50.0], 0.85, 9.0),  // a 1
            measured(vec![5.0, -50.0], 0.3, 8.0),   // a 4: repetitive
            measured(vec![0.0, -40.0], 0.9, 8.0),   // b 1
            measured(vec![0.0, -20.0], 0.9, 13.0),  // b 4: perplexity 1.62× plain
            measured(vec![1.5, -50.0], 0.9, 8.0),   // a 1 ≤ 0.5
            measured(vec![2.0, -50.0], 0.82, 11.9), // a 4 ≤ 0.5: the best fluent a
            measured(vec![0.0, -40.0], 0.9, 8.0),   // b 1 ≤ 0.5
            measured(vec![0.0, -30.0], 0.9, 8.0),   // b 4 ≤ 0.5: the best fluent b
            measured(vec![1.8, -50.0], 0.9, 8.0),   // best-of by a
            measured(vec![1.9, -50.0], 0.9, 8.0),   // best-of by sentiment
            measured(vec![9.0, -10.0], 0.9, 8.0),   // best-of by b: symbols
        ];
        let mut m = m;
        m[11].word_tokens = 0.5;
        let report = Report {
            arms: &arms,
            objectives: &objectives,
            settings: &settings,
            measured: &m,
            fluency: Fluency {
                min_distinct_2: 0.8,
                max_perplexity_ratio: 1.5,
                min_word_share: 0.9,
            },
        };
        // b's best-of loses to its budgeted weight 4 on word tokens (0.5 against plain's 0.95).
        assert_eq!(report.best(), [Some(6), Some(8)]);
        let md = report.markdown(&report.monotonicity());
        assert!(md.contains("(**best fluent a**)"), "{md}");
        assert!(md.contains("- `a` (sentiment): genarm, KL ≤ 0.5 at w 4: 2.000 against plain 0.000 (+2.000); distinct-2 0.820, perplexity 1.49× plain, word tokens 0.950"), "{md}");
        // Nothing fluent: said so.
        let report = Report {
            fluency: Fluency {
                min_distinct_2: 0.99,
                ..report.fluency
            },
            ..report
        };
        assert_eq!(report.best(), [None, None]);
        assert!(report.markdown(&[]).contains("no setting stays fluent"));
    }

    #[test]
    fn paired_differences_count_wins_and_bound_the_mean() {
        let a = [1.0, 2.0, 3.0, 4.0];
        let b = [0.0, 2.0, 4.0, 2.0];
        let p = paired(&a, &b);
        assert_eq!((p.mean, p.wins, p.losses), (0.5, 2, 1));
        assert!(p.interval.0 <= p.mean && p.mean <= p.interval.1, "{p:?}");
        assert!(p.interval.0 >= -1.0 && p.interval.1 <= 2.0, "{p:?}");
        assert_eq!(paired(&a, &a).interval, (0.0, 0.0));
    }

    #[test]
    fn counts_are_lists_of_positive_integers() {
        assert_eq!(parse_counts("2, 4").unwrap(), Counts(vec![2, 4]));
        assert_eq!(parse_counts("").unwrap(), Counts(Vec::new()));
        assert!(parse_counts("0").is_err() && parse_counts("2.5").is_err());
    }

    #[test]
    fn objective_scorers() {
        let c = ObjectiveScorer::parse("count:Paris").unwrap();
        assert_eq!(c.score("Paris, paris and Parisian PARIS."), 3.0);
        assert_eq!(ObjectiveScorer::Concise.score("one two three"), -3.0);
        assert!(ObjectiveScorer::parse("regex:(").is_err());
        assert!(ObjectiveScorer::parse("nope").is_err());
        assert_eq!(
            ObjectiveScorer::parse("keywords:a, b")
                .unwrap()
                .score("a c"),
            0.5
        );
        assert!(parse_objective("toy=sentiment").is_ok());
        assert!(parse_objective("sentiment").is_err());
    }
}
