//! `tilt eval steer`: how GenARM's reward weights steer the base. Each ARM is paired with a
//! programmatic scorer of what it was trained for (its *objective*). The sweep runs every ARM's
//! weight over a list alone (the others at 0), and a grid over the first two ARMs together; per
//! setting it reports each objective's mean reward, the mean per-token KL to the base (from the
//! decoder's report), distinct-2 and tokens/s, and checks that each weight moves its own
//! objective monotonically along its 1-D sweep.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use serde_json::{json, Value};

use super::{Decoding, Job, Output};
use crate::bench::plot::{xy_panels, Panel, XySeries};
use crate::decode::DecoderSpec;
use crate::engine::{Engine, EngineOptions};
use crate::reward::scorers::{Keywords, RegexMatch, Scorer, Sentiment};
use crate::train::prompts::{self, Split};

/// A list of weights, as a comma-separated flag.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights(pub Vec<f32>);

fn parse_weights(s: &str) -> Result<Weights, String> {
    super::parse_numbers(s).map(Weights)
}

/// A programmatic measure of an objective, higher is better.
#[derive(Debug, Clone)]
pub enum ObjectiveScorer {
    /// The sentiment lexicon: (positive − negative words) / √words.
    Sentiment,
    /// Minus the number of words.
    Concise,
    /// How many times a word (or phrase) occurs, whole words, case-insensitive.
    Count(String),
    /// 1 if the pattern matches, else 0.
    Regex(String),
    /// The share of the keywords present (whole words).
    Keywords(Vec<String>),
}

impl ObjectiveScorer {
    pub const HELP: &'static str =
        "sentiment, concise (−words), count:WORD, regex:PATTERN, keywords:A,B,…";

    pub fn parse(s: &str) -> Result<Self, String> {
        let (kind, arg) = match s.split_once(':') {
            Some((k, a)) => (k, Some(a)),
            None => (s, None),
        };
        match (kind, arg) {
            ("sentiment", None) => Ok(Self::Sentiment),
            ("concise", None) => Ok(Self::Concise),
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

    /// The scorer an ARM's name implies: `positive`/`sentiment` and `concise`.
    pub fn for_arm(name: &str) -> Option<Self> {
        match name {
            "positive" | "sentiment" => Some(Self::Sentiment),
            "concise" => Some(Self::Concise),
            _ => None,
        }
    }

    pub fn label(&self) -> String {
        match self {
            Self::Sentiment => "sentiment".into(),
            Self::Concise => "concise".into(),
            Self::Count(w) => format!("count:{w}"),
            Self::Regex(p) => format!("regex:{p}"),
            Self::Keywords(k) => format!("keywords:{}", k.join(",")),
        }
    }

    pub fn score(&self, text: &str) -> f64 {
        match self {
            Self::Sentiment => f64::from(Sentiment.score(text)),
            Self::Concise => -(super::words(text).len() as f64),
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
    /// SCORER: sentiment, concise (minus the word count), count:WORD, regex:PATTERN,
    /// keywords:A,B). ARMs named `positive`/`sentiment` and `concise` get theirs by default.
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

/// One weight vector (an entry per ARM, in load order) and the sweeps it belongs to.
#[derive(Debug, Clone)]
struct Setting {
    weights: Vec<f32>,
    sweeps: Vec<String>,
}

/// What one setting measured.
#[derive(Debug, Clone)]
struct Measured {
    /// Mean reward per objective (ARM order).
    rewards: Vec<f64>,
    kl_per_token: f64,
    distinct_2: f64,
    mean_tokens: f64,
    tokens_per_s: f64,
    wall_s: f64,
    outputs: Vec<Output>,
}

/// Every setting once: each ARM's sweep, then the grid over the first two.
fn settings(arms: &[String], weights: &[f32], grid: &[f32]) -> Vec<Setting> {
    let mut out: Vec<Setting> = Vec::new();
    let mut add = |w: Vec<f32>, sweep: String| match out.iter_mut().find(|s| s.weights == w) {
        Some(s) => s.sweeps.push(sweep),
        None => out.push(Setting {
            weights: w,
            sweeps: vec![sweep],
        }),
    };
    for (i, arm) in arms.iter().enumerate() {
        for &w in weights {
            let mut v = vec![0.0; arms.len()];
            v[i] = w;
            add(v, arm.clone());
        }
    }
    if arms.len() >= 2 {
        for &a in grid {
            for &b in grid {
                let mut v = vec![0.0; arms.len()];
                v[0] = a;
                v[1] = b;
                add(v, "grid".into());
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

    let models = args.models.load()?;
    let arms: Vec<String> = models[1..].iter().map(|m| m.name.clone()).collect();
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
    let settings = settings(&arms, &args.weights.0, &args.grid.0);
    eprintln!(
        "eval steer: {} settings × {} prompts, ARMs {}",
        settings.len(),
        prompts.len(),
        arms.join(", ")
    );
    let bar = crate::progress::bar((settings.len() * prompts.len()) as u64, "steer");
    let mut measured = Vec::with_capacity(settings.len());
    for setting in &settings {
        let rewards: serde_json::Map<String, Value> = arms
            .iter()
            .zip(&setting.weights)
            .map(|(a, &w)| (a.clone(), json!(w)))
            .collect();
        let config = json!({"decoder": "genarm", "rewards": rewards, "beta": args.beta});
        let (name, params) = super::split_config(&config)?;
        let spec = DecoderSpec::parse(&name, params, engine.rewards())
            .map_err(|e| anyhow::anyhow!("genarm {config}: {}", e.message))?;
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
        measured.push(measure(&objectives, outputs, wall_s));
    }
    bar.finish_and_clear();

    let report = Report {
        arms: &arms,
        objectives: &objectives,
        settings: &settings,
        measured: &measured,
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

fn measure(objectives: &[ObjectiveScorer], outputs: Vec<Output>, wall_s: f64) -> Measured {
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
    Measured {
        rewards,
        kl_per_token: if tokens == 0 { 0.0 } else { kl / tokens as f64 },
        distinct_2: super::distinct_2(&texts),
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

struct Report<'a> {
    arms: &'a [String],
    objectives: &'a [ObjectiveScorer],
    settings: &'a [Setting],
    measured: &'a [Measured],
}

impl Report<'_> {
    /// (weight, own objective's mean) along ARM `i`'s sweep, by weight.
    fn sweep(&self, i: usize, value: impl Fn(&Measured) -> f64) -> Vec<(f32, f64)> {
        let mut points: Vec<(f32, f64)> = self
            .settings
            .iter()
            .zip(self.measured)
            .filter(|(s, _)| s.sweeps.contains(&self.arms[i]))
            .map(|(s, m)| (s.weights[i], value(m)))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        points
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
        let mut header: Vec<String> = self.arms.iter().map(|a| format!("w {a}")).collect();
        header.extend((0..self.arms.len()).map(|i| format!("reward {}", self.objective_label(i))));
        header.extend(["KL/token", "distinct-2", "tokens", "tok/s", "sweeps"].map(String::from));
        let rows: Vec<Vec<String>> = self
            .settings
            .iter()
            .zip(self.measured)
            .enumerate()
            .map(|(k, (s, m))| {
                let mut row: Vec<String> = s.weights.iter().map(|&w| fmt_weight(w)).collect();
                row.extend(m.rewards.iter().map(|&r| super::cell(r, 3)));
                let mut sweeps = s.sweeps.join(", ");
                if front.contains(&k) {
                    sweeps.push_str(" (front)");
                }
                row.extend([
                    super::cell(m.kl_per_token, 4),
                    super::cell(m.distinct_2, 3),
                    super::cell(m.mean_tokens, 1),
                    super::cell(m.tokens_per_s, 1),
                    sweeps,
                ]);
                row
            })
            .collect();
        let mut md = String::from("## GenARM steering sweep\n\n");
        md.push_str(&super::table(&header, &rows));
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
        let mut panels: Vec<Panel> = (0..self.arms.len())
            .map(|i| Panel {
                title: format!(
                    "{}: mean reward vs its weight (others 0)",
                    self.objective_label(i)
                ),
                x_title: format!("weight of {}", self.arms[i]),
                y_title: "mean reward".into(),
                series: vec![line(i, &|m| m.rewards[i])],
            })
            .collect();
        panels.push(Panel {
            title: "KL to the base per token vs weight".into(),
            x_title: "weight".into(),
            y_title: "nats / token".into(),
            series: (0..self.arms.len())
                .map(|i| line(i, &|m| m.kl_per_token))
                .collect(),
        });
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
                json!({
                    "weights": weights,
                    "sweeps": s.sweeps,
                    "front": front.contains(&k),
                    "rewards": rewards,
                    "kl_per_token": super::num(m.kl_per_token),
                    "distinct_2": super::num(m.distinct_2),
                    "mean_tokens": super::num(m.mean_tokens),
                    "tokens_per_s": super::num(m.tokens_per_s),
                    "wall_s": super::num(m.wall_s),
                    "outputs": m.outputs.iter().zip(prompts).map(|(o, p)| json!({
                        "prompt": p, "text": o.text, "tokens": o.tokens.len(),
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
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "seed": args.seed,
            "prompts": prompts.len(),
            "settings": settings,
            "monotonicity": monotonicity,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::plot::{assert_svg_with, y_range};

    #[test]
    fn settings_cover_each_sweep_and_the_grid_once() {
        let arms = vec!["a".to_string(), "b".to_string()];
        let s = settings(&arms, &[0.0, 1.0], &[0.0, 1.0]);
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
        assert_eq!(s[0].sweeps, ["a", "b", "grid"]);
        // One ARM: no grid.
        assert_eq!(settings(&arms[..1], &[0.0, 2.0], &[0.0, 1.0]).len(), 2);
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
        let settings = settings(&arms, &[0.0, 1.0, 2.0], &[0.0, 2.0]);
        // Sentiment rises over 0…4 with its weight, concise over −60…−20.
        let measured: Vec<Measured> = settings
            .iter()
            .map(|s| Measured {
                rewards: vec![
                    2.0 * f64::from(s.weights[0]),
                    -60.0 + 20.0 * f64::from(s.weights[1]),
                ],
                kl_per_token: 0.1 * f64::from(s.weights[0] + s.weights[1]),
                distinct_2: 0.9,
                mean_tokens: 30.0,
                tokens_per_s: 10.0,
                wall_s: 1.0,
                outputs: Vec::new(),
            })
            .collect();
        let report = Report {
            arms: &arms,
            objectives: &objectives,
            settings: &settings,
            measured: &measured,
        };
        let panels = report.panels();
        // positive, concise, KL, trade-off.
        assert_eq!(panels.len(), 4);
        let (positive, concise) = (&panels[0], &panels[1]);
        assert_eq!(positive.series.len(), 1);
        assert_eq!(positive.series[0].label, "positive (sentiment)");
        assert_eq!(concise.series[0].label, "concise (concise)");
        let (p, c) = (y_range(positive), y_range(concise));
        assert!(p.start > -1.0 && p.end < 5.0, "{p:?}");
        assert!(c.start > -65.0 && c.end < -15.0, "{c:?}");
        assert_eq!(panels[2].series.len(), 2);

        assert_svg_with(
            &report.svg(),
            &[
                "positive (sentiment): mean reward vs its weight (others 0)",
                "concise (concise): mean reward vs its weight (others 0)",
                "KL to the base per token vs weight",
                "Trade-off: positive (sentiment) vs concise (concise) over the grid",
                "Pareto front",
            ],
        );
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
