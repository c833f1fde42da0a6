//! `tilt eval adaptive`: entropy-adaptive decoding swept over its threshold. Per setting, on
//! held-out prompts decoded greedily one at a time: the share of tokens the large model wrote,
//! the compute saved by the multiply-add formula, wall-clock tok/s against what the formula
//! predicts from the measured per-token times of each model alone, and the quality kept against
//! large-only decoding (the large model's mean log-likelihood of the text, agreement with its
//! greedy output); and MMLU accuracy with the answer letter generated.
//!
//! Thresholds 0 (large-only) and ∞ (small-only) always run: they measure C_L and C_S. Timings
//! are medians over `--repeats` passes through every setting in turn, so drift of a busy machine
//! lands on all settings alike.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::mc::{self, Format, Question};
use super::{cell, num, Decoding, Job, Output};
use crate::bench::plot::{xy_panels, Panel, XySeries};
use crate::decode::DecoderSpec;
use crate::engine::{Engine, EngineOptions};
use crate::model::companions::{with_companions, Companions};
use crate::model::{Precision, Role, BASE};
use crate::train::prompts::{self, Split};

/// A threshold above every entropy a vocabulary allows (log2 of its size): small-only.
const SMALL_ONLY: f64 = 1e9;

#[derive(clap::Args, Debug)]
pub struct AdaptiveArgs {
    /// The small model (default: the draft of models/models.toml).
    #[arg(long)]
    pub draft: Option<PathBuf>,
    /// The large model (default: the manifest's default model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Entropy thresholds in bits (`inf`: small-only); 0 and inf are always added.
    #[arg(long, value_delimiter = ',', default_value = "0,1,1.5,2,2.5,3,4,inf")]
    pub thresholds: Vec<f64>,
    #[arg(long, default_value_t = 5)]
    pub window: usize,
    #[arg(long, default_value_t = 4)]
    pub min_stay: usize,
    /// Held-out built-in prompts for free-form answers.
    #[arg(long, default_value_t = 24)]
    pub prompts: usize,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Timed passes over the free-form prompts (every setting in turn each pass).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// MMLU-format questions (e.g. ../shared/data/mmlu-dev.jsonl); none: no accuracy column.
    #[arg(long)]
    pub mmlu: Option<PathBuf>,
    /// Questions used, taken in turn from each subject.
    #[arg(long, default_value_t = 200)]
    pub questions: usize,
    /// Write adaptive.md, adaptive.svg and adaptive.json here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One threshold's results.
struct Setting {
    threshold: f64,
    answers: Vec<Output>,
    /// Wall seconds of each pass over the prompts.
    walls: Vec<f64>,
    letters: Vec<Output>,
}

impl Setting {
    fn tokens(&self, side: &str) -> u64 {
        self.report_sum(&|r| &r["tokens"][side])
    }

    fn large_share(&self) -> f64 {
        let (s, l) = (self.tokens("small"), self.tokens("large"));
        l as f64 / (s + l).max(1) as f64
    }

    /// A count of the reports, summed over the answers.
    fn report_sum(&self, field: &dyn Fn(&Value) -> &Value) -> u64 {
        self.answers
            .iter()
            .filter_map(|o| o.report.as_ref())
            .map(|r| field(r).as_u64().unwrap_or(0))
            .sum()
    }

    fn generated(&self) -> usize {
        self.answers.iter().map(|o| o.tokens.len()).sum()
    }

    /// Median wall seconds per generated token.
    fn seconds_per_token(&self) -> f64 {
        let mut w = self.walls.clone();
        w.sort_by(f64::total_cmp);
        w[w.len() / 2] / self.generated().max(1) as f64
    }

    fn label(&self) -> String {
        if self.threshold >= SMALL_ONLY {
            "∞ (small only)".into()
        } else if self.threshold == 0.0 {
            "0 (large only)".into()
        } else {
            format!("{}", self.threshold)
        }
    }
}

/// The option a generated answer names: its first word that is a single letter (`B`, `B.`,
/// `(B)`, "The answer is B"), as an option index.
fn letter(text: &str, options: usize) -> Option<usize> {
    let word = text
        .split_whitespace()
        .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()))
        .find(|w| w.len() == 1 && w.chars().all(|c| c.is_ascii_uppercase()))?;
    let i = (word.as_bytes()[0] - b'A') as usize;
    (i < options).then_some(i)
}

/// Share of `large`'s tokens that `other` reproduces before the first difference.
fn prefix_agreement(other: &[u32], large: &[u32]) -> f64 {
    if large.is_empty() {
        return 1.0;
    }
    let same = other.iter().zip(large).take_while(|(a, b)| a == b).count();
    same as f64 / large.len() as f64
}

pub fn run(args: AdaptiveArgs) -> Result<()> {
    if args.prompts == 0 || args.repeats == 0 || args.max_tokens == 0 {
        bail!("--prompts, --repeats and --max-tokens must be at least 1");
    }
    let mut thresholds: Vec<f64> = args
        .thresholds
        .iter()
        .map(|&t| if t.is_infinite() { SMALL_ONLY } else { t })
        .chain([0.0, SMALL_ONLY])
        .collect();
    if thresholds.iter().any(|t| t.is_nan() || *t < 0.0) {
        bail!("--thresholds must be numbers of bits, at least 0 (or inf)");
    }
    thresholds.sort_by(f64::total_cmp);
    thresholds.dedup();
    let base = super::load_base(args.model.as_deref())?;
    let companions = Companions {
        rewards: Vec::new(),
        draft: args.draft.clone(),
        manifest: args.draft.is_none(),
    };
    let models: Vec<_> = with_companions(base, &companions, Precision::Q8_0)?
        .into_iter()
        .filter(|m| matches!(m.role, Role::Base | Role::Draft))
        .collect();
    if models.len() < 2 {
        bail!("no draft model: pass --draft PATH or list one in models/models.toml");
    }
    let names = (models[BASE].name.clone(), models[1].name.clone());
    let engine = Engine::start(models, EngineOptions::default());
    let spec = |threshold: f64| {
        let params = json!({"entropy_threshold": threshold, "window": args.window,
                            "min_stay": args.min_stay});
        DecoderSpec::parse(
            "adaptive",
            params.as_object().cloned().unwrap_or_default(),
            engine.rewards(),
        )
        .map_err(|e| anyhow::anyhow!("{}: {e}", e.param.clone().unwrap_or_default()))
    };
    let greedy = |max_tokens| Decoding {
        max_tokens,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
    };
    let prompts: Vec<String> = prompts::builtin(Split::Eval)
        .into_iter()
        .take(args.prompts)
        .collect();
    let questions: Vec<Question> = match &args.mmlu {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            mc::spread(mc::parse(&text, Format::Letters)?.0, args.questions)
        }
        None => Vec::new(),
    };
    let mut settings: Vec<Setting> = thresholds
        .iter()
        .map(|&threshold| Setting {
            threshold,
            answers: Vec::new(),
            walls: Vec::new(),
            letters: Vec::new(),
        })
        .collect();
    let hidden = indicatif::ProgressBar::hidden();
    let bar = crate::progress::bar(
        (args.repeats * settings.len()) as u64,
        "eval adaptive: passes",
    );
    for pass in 0..args.repeats {
        for s in &mut settings {
            let spec = spec(s.threshold)?;
            let start = Instant::now();
            // One stream: each answer waits for the one before it.
            let mut answers = Vec::with_capacity(prompts.len());
            for p in &prompts {
                let job = Job {
                    spec: spec.clone(),
                    prompt: p.clone(),
                    salt: 0,
                };
                answers.extend(super::run_jobs(
                    &engine,
                    &[job],
                    &greedy(args.max_tokens),
                    &hidden,
                )?);
            }
            s.walls.push(start.elapsed().as_secs_f64());
            if pass == 0 {
                s.answers = answers;
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    if !questions.is_empty() {
        let bar = crate::progress::bar(
            (questions.len() * settings.len()) as u64,
            "eval adaptive: MMLU",
        );
        for s in &mut settings {
            let spec = spec(s.threshold)?;
            let jobs: Vec<Job> = questions
                .iter()
                .map(|q| Job {
                    spec: spec.clone(),
                    prompt: q.prompt.clone(),
                    salt: 0,
                })
                .collect();
            s.letters = super::run_jobs(&engine, &jobs, &greedy(8), &bar)?;
        }
        bar.finish_and_clear();
    }
    drop(engine);
    // The large model's log-likelihood of every setting's text.
    let large = super::load_base(args.model.as_deref())?;
    let scored: Vec<f64> = settings
        .iter()
        .map(|s| {
            let items: Vec<(&[u32], &[u32])> = s
                .answers
                .iter()
                .map(|o| (o.prompt_tokens.as_slice(), o.tokens.as_slice()))
                .collect();
            let nll = super::response_nll(&large, &items)?;
            let (sum, n) = nll.iter().fold((0.0, 0), |(a, m), &(b, k)| (a + b, m + k));
            Ok(-sum / n.max(1) as f64)
        })
        .collect::<Result<_>>()?;
    let summary = Summary {
        settings,
        log_likelihood: scored,
        questions: &questions,
        names,
        args: &args,
    };
    super::publish(
        args.out.as_deref(),
        "adaptive",
        summary.markdown(),
        summary.svg(),
        &summary.json(),
    )
}

struct Summary<'a> {
    /// In order of threshold: large-only first, small-only last.
    settings: Vec<Setting>,
    /// The large model's mean log-likelihood per token of each setting's answers.
    log_likelihood: Vec<f64>,
    questions: &'a [Question],
    /// (large, small)
    names: (String, String),
    args: &'a AdaptiveArgs,
}

/// One row of the table, as numbers.
struct Row {
    label: String,
    threshold: f64,
    large_share: f64,
    switches_per_100: f64,
    catch_up_per_100: f64,
    compute_saved: f64,
    tok_s: f64,
    /// Measured time per token over the formula's prediction from C_S and C_L.
    wall_vs_formula: f64,
    log_likelihood: f64,
    agreement: f64,
    exact: f64,
    accuracy: Option<f64>,
}

impl Summary<'_> {
    fn large(&self) -> &Setting {
        &self.settings[0]
    }

    fn small(&self) -> &Setting {
        &self.settings[self.settings.len() - 1]
    }

    /// C_S / C_L by multiply-adds, as the decoder reports it.
    fn cost_ratio(&self) -> f64 {
        self.settings
            .iter()
            .flat_map(|s| &s.answers)
            .filter_map(|o| o.report.as_ref()?["cost_ratio"].as_f64())
            .next()
            .unwrap_or(f64::NAN)
    }

    fn accuracy(&self, s: &Setting) -> Option<f64> {
        if self.questions.is_empty() {
            return None;
        }
        let right = s
            .letters
            .iter()
            .zip(self.questions)
            .filter(|(o, q)| letter(&o.text, q.candidates.len()) == Some(q.correct))
            .count();
        Some(right as f64 / self.questions.len() as f64)
    }

    fn rows(&self) -> Vec<Row> {
        let (t_large, t_small) = (
            self.large().seconds_per_token(),
            self.small().seconds_per_token(),
        );
        let ratio = self.cost_ratio();
        self.settings
            .iter()
            .zip(&self.log_likelihood)
            .map(|(s, &ll)| {
                let f = s.large_share();
                let generated = s.generated().max(1) as f64;
                let predicted = f * t_large + (1.0 - f) * t_small;
                let pairs = s.answers.iter().zip(&self.large().answers);
                let agreement = super::mean(
                    pairs
                        .clone()
                        .map(|(a, l)| prefix_agreement(&a.tokens, &l.tokens)),
                );
                let exact = super::mean(pairs.map(|(a, l)| f64::from(a.tokens == l.tokens)));
                Row {
                    label: s.label(),
                    threshold: s.threshold,
                    large_share: f,
                    switches_per_100: 100.0 * s.report_sum(&|r| &r["switches"]) as f64 / generated,
                    catch_up_per_100: 100.0 * s.report_sum(&|r| &r["catch_up_tokens"]) as f64
                        / generated,
                    compute_saved: 1.0 - (f + (1.0 - f) * ratio),
                    tok_s: 1.0 / s.seconds_per_token(),
                    wall_vs_formula: s.seconds_per_token() / predicted,
                    log_likelihood: ll,
                    agreement,
                    exact,
                    accuracy: self.accuracy(s),
                }
            })
            .collect()
    }

    fn markdown(&self) -> String {
        let rows = self.rows();
        let (t_large, t_small) = (
            self.large().seconds_per_token(),
            self.small().seconds_per_token(),
        );
        let ll_large = self.log_likelihood[0];
        let acc_large = self.accuracy(self.large());
        let mut header: Vec<String> = [
            "threshold (bits)",
            "large share",
            "switches /100 tok",
            "catch-up /100 tok",
            "compute saved",
            "tok/s",
            "wall / formula",
            "large LL /tok",
            "LL kept",
            "agreement",
            "same answer",
        ]
        .map(String::from)
        .to_vec();
        if acc_large.is_some() {
            header.push("MMLU acc.".into());
        }
        let table: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                let mut row = vec![
                    r.label.clone(),
                    cell(r.large_share, 3),
                    cell(r.switches_per_100, 1),
                    cell(r.catch_up_per_100, 1),
                    format!("{} %", cell(100.0 * r.compute_saved, 1)),
                    cell(r.tok_s, 1),
                    cell(r.wall_vs_formula, 3),
                    cell(r.log_likelihood, 3),
                    // Log-likelihoods are negative: kept = large-only's over this one's.
                    format!("{} %", cell(100.0 * ll_large / r.log_likelihood, 1)),
                    cell(r.agreement, 3),
                    cell(r.exact, 3),
                ];
                if let Some(a) = r.accuracy {
                    row.push(cell(a, 3));
                }
                row
            })
            .collect();
        let (large, small) = &self.names;
        let a = self.args;
        let mut md = format!(
            "Large `{large}`, small `{small}`; window {}, min_stay {}. {} held-out prompts, greedy, up to {} tokens, one stream; timings are medians of {} passes.\n\n",
            a.window,
            a.min_stay,
            self.large().answers.len(),
            a.max_tokens,
            a.repeats
        );
        md.push_str(&super::table(&header, &table));
        md.push_str(&format!(
            "\nMeasured per token: C_L {:.2} ms (large only), C_S {:.2} ms (small only): C_S/C_L {:.3} by the clock, {:.3} by multiply-adds.\n",
            1e3 * t_large,
            1e3 * t_small,
            t_small / t_large,
            self.cost_ratio()
        ));
        md.push_str("`compute saved`: 1 − (f_L + (1 − f_L)·C_S/C_L) with C in multiply-adds per token. `wall / formula`: the measured time per token over f_L·C_L + (1 − f_L)·C_S with C as measured. `LL`: the large model's mean log-likelihood per token of the text; `agreement`: share of large-only greedy tokens reproduced before the first difference; `same answer`: identical to large-only.\n");
        if let Some(acc) = acc_large {
            md.push_str(&format!(
                "MMLU: {} questions (letters listed, up to 8 tokens generated greedily, the first single-letter word taken as the answer); large-only accuracy {acc:.3}.\n",
                self.questions.len()
            ));
        }
        md
    }

    fn svg(&self) -> String {
        let rows = self.rows();
        let points = |f: &dyn Fn(&Row) -> f64| -> Vec<(f64, f64)> {
            rows.iter().map(|r| (r.large_share, f(r))).collect()
        };
        let ll_large = self.log_likelihood[0];
        let mut quality = vec![
            XySeries {
                label: "LL kept".into(),
                points: points(&|r| ll_large / r.log_likelihood),
                line: true,
            },
            XySeries {
                label: "agreement with large-only".into(),
                points: points(&|r| r.agreement),
                line: true,
            },
        ];
        if let Some(acc) = self.accuracy(self.large()) {
            quality.push(XySeries {
                label: "MMLU accuracy kept".into(),
                points: points(&|r| r.accuracy.unwrap_or(f64::NAN) / acc),
                line: true,
            });
        }
        xy_panels(&[
            Panel {
                title: "Quality against the large model's share of tokens".into(),
                x_title: "share of tokens from the large model".into(),
                y_title: "relative to large-only".into(),
                series: quality,
            },
            Panel {
                title: "Speed".into(),
                x_title: "share of tokens from the large model".into(),
                y_title: "tok/s (one stream)".into(),
                series: vec![
                    XySeries {
                        label: "measured".into(),
                        points: points(&|r| r.tok_s),
                        line: true,
                    },
                    XySeries {
                        label: "formula: 1 / (f_L·C_L + (1 − f_L)·C_S), C as measured".into(),
                        points: points(&|r| r.tok_s * r.wall_vs_formula),
                        line: true,
                    },
                ],
            },
        ])
    }

    fn json(&self) -> Value {
        let rows: Vec<Value> = self
            .rows()
            .iter()
            .map(|r| {
                json!({
                    "threshold": if r.threshold >= SMALL_ONLY { Value::Null } else { num(r.threshold) },
                    "large_share": num(r.large_share),
                    "switches_per_100_tokens": num(r.switches_per_100),
                    "catch_up_per_100_tokens": num(r.catch_up_per_100),
                    "compute_saved": num(r.compute_saved),
                    "tok_s": num(r.tok_s),
                    "wall_vs_formula": num(r.wall_vs_formula),
                    "log_likelihood": num(r.log_likelihood),
                    "agreement": num(r.agreement),
                    "same_answer": num(r.exact),
                    "mmlu_accuracy": r.accuracy.map(num),
                })
            })
            .collect();
        json!({
            "large": self.names.0,
            "small": self.names.1,
            "window": self.args.window,
            "min_stay": self.args.min_stay,
            "prompts": self.large().answers.len(),
            "max_tokens": self.args.max_tokens,
            "repeats": self.args.repeats,
            "questions": self.questions.len(),
            "cost_ratio": num(self.cost_ratio()),
            "seconds_per_token": {"large": num(self.large().seconds_per_token()),
                                  "small": num(self.small().seconds_per_token())},
            "settings": rows,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_letters_and_agreement() {
        assert_eq!(letter(" B", 4), Some(1));
        assert_eq!(letter("(C) because", 4), Some(2));
        assert_eq!(letter("The answer is D.", 4), Some(3));
        assert_eq!(letter("E", 4), None);
        assert_eq!(letter("1", 4), None);
        assert_eq!(letter("", 4), None);
        assert_eq!(prefix_agreement(&[1, 2, 9, 4], &[1, 2, 3, 4]), 0.5);
        assert_eq!(prefix_agreement(&[1, 2], &[1, 2]), 1.0);
        assert_eq!(prefix_agreement(&[], &[]), 1.0);
    }
}
