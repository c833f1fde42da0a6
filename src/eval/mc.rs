//! `tilt eval mc`: multiple-choice accuracy of equilibrium ranking against the model's plain
//! generative and discriminative rankings, on the same questions (MMLU-format JSONL: `question`,
//! `answer_a`…, `correct_answer` as a letter, `topic`). One `equilibrium` request per question
//! reports every candidate's score under all four rankings, so each is read off the same run.
//!
//! `--format letters` lists the options in the prompt and ranks the letters (the paper's MMLU
//! setting); `--format texts` asks the bare question and ranks the option texts. With `--url`
//! the questions go one at a time to a running server, which measures latency over HTTP.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::{Decoding, Job};
use crate::bench::plot::{xy_panels, Panel, XySeries};
use crate::decode::equilibrium::{initial, RankParams, RankSpec};
use crate::decode::DecoderSpec;
use crate::engine::{Engine, EngineOptions};

/// The rankings compared, as the report names their scores.
pub const RANKINGS: [&str; 4] = ["generator", "discriminator", "er_g", "er_d"];

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The options listed in the prompt; the candidates are their letters.
    Letters,
    /// The bare question; the candidates are the option texts.
    Texts,
}

#[derive(clap::Args, Debug)]
pub struct McArgs {
    /// Questions, one JSON object a line (MMLU format).
    #[arg(long)]
    pub data: PathBuf,
    /// Write mc.md, mc.svg and mc.json here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Questions to use, taken in turn from each subject (file order within one).
    #[arg(long, default_value_t = 300)]
    pub limit: usize,
    #[arg(long, value_enum, default_value = "letters")]
    pub format: Format,
    /// The base model (default: the manifest's default model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Ask a running server instead (e.g. http://127.0.0.1:8080), one question at a time.
    #[arg(long)]
    pub url: Option<String>,
    /// Ranking parameters as JSON (`rank_by` aside), e.g. `{"lambda_d": 0.5}`.
    #[arg(long, value_name = "JSON")]
    pub params: Option<String>,
    /// Requests decoded together (in process).
    #[arg(long, default_value_t = EngineOptions::default().max_running)]
    pub max_running: usize,
}

/// One question: its prompt, candidates and the right one.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    pub topic: String,
    pub prompt: String,
    pub candidates: Vec<String>,
    pub correct: usize,
}

/// The questions of `text` (MMLU-format JSONL) in `format`; lines that do not make a question
/// (no options, a blank one, an unknown answer letter) are counted, not used.
pub fn parse(text: &str, format: Format) -> Result<(Vec<Question>, usize)> {
    let (mut questions, mut skipped) = (Vec::new(), 0);
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(line).with_context(|| format!("line {}: not JSON", i + 1))?;
        let options: Vec<String> = ('a'..='z')
            .map_while(|l| v[format!("answer_{l}")].as_str().map(str::to_string))
            .collect();
        let letter = v["correct_answer"]
            .as_str()
            .unwrap_or("")
            .trim()
            .to_uppercase();
        let correct = letter
            .chars()
            .next()
            .filter(|_| letter.len() == 1)
            .map(|c| (c as u8).wrapping_sub(b'A') as usize)
            .filter(|&c| c < options.len());
        let (Some(question), Some(correct)) = (v["question"].as_str(), correct) else {
            skipped += 1;
            continue;
        };
        if options.len() < 2 || options.iter().any(|o| o.trim().is_empty()) {
            skipped += 1;
            continue;
        }
        let topic = v["topic"].as_str().unwrap_or("").to_string();
        let letters: Vec<String> = (0..options.len())
            .map(|k| ((b'A' + k as u8) as char).to_string())
            .collect();
        let (prompt, candidates) = match format {
            Format::Letters => {
                let listed: Vec<String> = letters
                    .iter()
                    .zip(&options)
                    .map(|(l, o)| format!("{l}. {o}"))
                    .collect();
                let about = if topic.is_empty() {
                    String::new()
                } else {
                    format!(" about {topic}")
                };
                let prompt = format!(
                    "The following is a multiple choice question{about}.\n\n{question}\n{}\n\nAnswer with the letter of the correct option.",
                    listed.join("\n")
                );
                (prompt, letters)
            }
            Format::Texts => (question.to_string(), options),
        };
        questions.push(Question {
            topic,
            prompt,
            candidates,
            correct,
        });
    }
    Ok((questions, skipped))
}

/// Up to `limit` questions, one from each subject in turn (subjects in order of appearance).
pub fn spread(questions: Vec<Question>, limit: usize) -> Vec<Question> {
    let mut by_topic: Vec<(String, std::collections::VecDeque<Question>)> = Vec::new();
    for q in questions {
        match by_topic.iter_mut().find(|(t, _)| *t == q.topic) {
            Some((_, qs)) => qs.push_back(q),
            None => by_topic.push((q.topic.clone(), [q].into())),
        }
    }
    let mut out = Vec::new();
    while out.len() < limit && by_topic.iter().any(|(_, qs)| !qs.is_empty()) {
        for (_, qs) in &mut by_topic {
            if out.len() < limit {
                out.extend(qs.pop_front());
            }
        }
    }
    out
}

/// The candidate each ranking picks from an `equilibrium` report (the first best on ties).
pub fn picks(report: &Value) -> Result<[usize; 4]> {
    let candidates = report["candidates"]
        .as_array()
        .context("a report without candidates")?;
    let score = |c: &Value, ranking: &str| -> f64 {
        match ranking {
            "er_g" => c["equilibrium"]["generator"].as_f64(),
            "er_d" => c["equilibrium"]["discriminator"].as_f64(),
            plain => c[plain].as_f64(),
        }
        .unwrap_or(f64::NEG_INFINITY)
    };
    Ok(RANKINGS.map(|r| {
        (0..candidates.len()).fold(0, |b, i| {
            if score(&candidates[i], r) > score(&candidates[b], r) {
                i
            } else {
                b
            }
        })
    }))
}

/// The Wilson score interval (95 %) of `k` successes in `n`.
pub fn wilson(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let (z, n, p) = (1.96f64, n as f64, k as f64 / n as f64);
    let centre = (p + z * z / (2.0 * n)) / (1.0 + z * z / n);
    let half = z / (1.0 + z * z / n) * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt();
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// One question's outcome.
struct Answered {
    topic: String,
    /// Per ranking, whether it picked the right candidate.
    right: [bool; 4],
    /// How long the dynamics take on this question's scores, in ms.
    game_ms: f64,
    /// Over HTTP: the request's wall time, in s.
    latency_s: Option<f64>,
    candidates: usize,
}

/// The `tilt eval mc` command.
pub fn run(args: McArgs) -> Result<()> {
    if args.limit == 0 {
        bail!("--limit must be at least 1");
    }
    let text = std::fs::read_to_string(&args.data)
        .with_context(|| format!("reading {}", args.data.display()))?;
    let (questions, skipped) = parse(&text, args.format)?;
    let questions = spread(questions, args.limit);
    if questions.is_empty() {
        bail!("{} holds no usable questions", args.data.display());
    }
    let params: serde_json::Map<String, Value> = match &args.params {
        Some(p) => serde_json::from_str(p).context("--params is not a JSON object")?,
        None => Default::default(),
    };
    let rank = RankSpec::parse("", serde_json::from_value::<RankParams>(json!(params))?)
        .map_err(|e| anyhow::anyhow!("--params: {}: {e}", e.param.clone().unwrap_or_default()))?;
    let alignment = |q: &Question| {
        let mut a = params.clone();
        a.insert("candidates".into(), json!(q.candidates));
        a
    };
    let start = Instant::now();
    let reports: Vec<(Value, Option<f64>)> = match &args.url {
        Some(url) => over_http(url, &questions, &alignment)?,
        None => {
            let base = super::load_base(args.model.as_deref())?;
            let engine = Engine::start(
                vec![base],
                EngineOptions {
                    max_running: args.max_running.max(1),
                    ..EngineOptions::default()
                },
            );
            let jobs = questions
                .iter()
                .map(|q| {
                    let spec = DecoderSpec::parse("equilibrium", alignment(q), engine.rewards())
                        .map_err(|e| {
                            anyhow::anyhow!("{}: {e}", e.param.clone().unwrap_or_default())
                        })?;
                    Ok(Job {
                        spec,
                        prompt: q.prompt.clone(),
                        salt: 0,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let decoding = Decoding {
                max_tokens: 1,
                temperature: 0.0,
                top_p: 1.0,
                seed: 0,
            };
            let bar = crate::progress::bar(jobs.len() as u64, "eval mc");
            let outputs = super::run_jobs(&engine, &jobs, &decoding, &bar)?;
            bar.finish_and_clear();
            outputs
                .into_iter()
                .map(|o| (o.report.unwrap_or_default(), None))
                .collect()
        }
    };
    let wall_s = start.elapsed().as_secs_f64();
    let answered = questions
        .iter()
        .zip(reports)
        .map(|(q, (report, latency_s))| {
            let picks = picks(&report)?;
            Ok(Answered {
                topic: q.topic.clone(),
                right: picks.map(|p| p == q.correct),
                game_ms: game_ms(&report, &rank)?,
                latency_s,
                candidates: q.candidates.len(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let summary = Summary {
        answered,
        skipped,
        wall_s,
        iterations: rank.game.iterations,
        args: &args,
    };
    super::publish(
        args.out.as_deref(),
        "mc",
        summary.markdown(),
        summary.svg(),
        &summary.json(),
    )
}

/// Each question through `url`'s chat completions, one at a time: (report, wall seconds).
fn over_http(
    url: &str,
    questions: &[Question],
    alignment: &dyn Fn(&Question) -> serde_json::Map<String, Value>,
) -> Result<Vec<(Value, Option<f64>)>> {
    let runtime = tokio::runtime::Runtime::new()?;
    let client = reqwest::Client::new();
    let endpoint = format!("{}/v1/chat/completions", url.trim_end_matches('/'));
    let bar = crate::progress::bar(questions.len() as u64, "eval mc");
    let mut out = Vec::with_capacity(questions.len());
    for q in questions {
        let mut a = alignment(q);
        a.insert("decoder".into(), json!("equilibrium"));
        let body = json!({"messages": [{"role": "user", "content": q.prompt}], "alignment": a});
        let start = Instant::now();
        let reply: Value = runtime.block_on(async {
            let r = client.post(&endpoint).json(&body).send().await?;
            let status = r.status();
            let v: Value = r.json().await?;
            if !status.is_success() {
                bail!("{endpoint} answered {status}: {v}");
            }
            Ok(v)
        })?;
        out.push((
            reply["alignment"].clone(),
            Some(start.elapsed().as_secs_f64()),
        ));
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// The dynamics' time on a report's scores: its candidates' log-likelihoods and judgments are
/// the game's whole input.
fn game_ms(report: &Value, rank: &RankSpec) -> Result<f64> {
    let candidates = report["candidates"].as_array().context("no candidates")?;
    let gen = [
        candidates
            .iter()
            .map(|c| c["log_likelihood"]["correct"].as_f64().unwrap_or(0.0))
            .collect(),
        candidates
            .iter()
            .map(|c| c["log_likelihood"]["incorrect"].as_f64().unwrap_or(0.0))
            .collect(),
    ];
    let judged: Vec<[f64; 2]> = candidates
        .iter()
        .map(|c| {
            let p = c["discriminator"].as_f64().unwrap_or(0.5);
            [p.ln(), (1.0 - p).ln()]
        })
        .collect();
    let start = Instant::now();
    let (g, d) = initial(&gen, &judged);
    std::hint::black_box(rank.game.solve(&g, &d));
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

struct Summary<'a> {
    answered: Vec<Answered>,
    skipped: usize,
    wall_s: f64,
    iterations: usize,
    args: &'a McArgs,
}

impl Summary<'_> {
    /// Per ranking: (right, of).
    fn counts<'q>(answered: impl Iterator<Item = &'q Answered> + Clone) -> [(usize, usize); 4] {
        let n = answered.clone().count();
        [0, 1, 2, 3].map(|r| (answered.clone().filter(|a| a.right[r]).count(), n))
    }

    fn subjects(&self) -> BTreeMap<&str, [(usize, usize); 4]> {
        let topics: std::collections::BTreeSet<&str> =
            self.answered.iter().map(|a| a.topic.as_str()).collect();
        topics
            .into_iter()
            .map(|t| {
                (
                    t,
                    Self::counts(self.answered.iter().filter(move |a| a.topic == t)),
                )
            })
            .collect()
    }

    fn seconds_per_question(&self) -> f64 {
        self.wall_s / self.answered.len() as f64
    }

    fn median(mut v: Vec<f64>) -> f64 {
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    fn markdown(&self) -> String {
        let n = self.answered.len();
        let mut md = format!(
            "## Multiple choice: equilibrium ranking vs the model's own rankings\n\n{n} questions from `{}` (`--format {}`), {} skipped as unusable.\n\n",
            self.args.data.display(),
            match self.args.format {
                Format::Letters => "letters",
                Format::Texts => "texts",
            },
            self.skipped
        );
        let header: Vec<String> = ["ranking", "accuracy", "95 % CI", "right"]
            .map(String::from)
            .to_vec();
        let rows: Vec<Vec<String>> = RANKINGS
            .iter()
            .zip(Self::counts(self.answered.iter()))
            .map(|(r, (k, n))| {
                let (lo, hi) = wilson(k, n);
                vec![
                    format!("`{r}`"),
                    super::cell(k as f64 / n as f64, 3),
                    format!("{}–{}", super::cell(lo, 3), super::cell(hi, 3)),
                    format!("{k} / {n}"),
                ]
            })
            .collect();
        md.push_str(&super::table(&header, &rows));
        let latencies: Vec<f64> = self.answered.iter().filter_map(|a| a.latency_s).collect();
        let game = Self::median(self.answered.iter().map(|a| a.game_ms).collect());
        md.push_str(&format!(
            "\nWall time {:.1} s: {:.3} s a question{}. The dynamics ({} iterations) take {game:.2} ms a question (median). Chance: {:.3}.\n",
            self.wall_s,
            self.seconds_per_question(),
            if latencies.is_empty() {
                " (in process, questions batched)".to_string()
            } else {
                format!(
                    "; over HTTP one at a time, median latency {:.3} s",
                    Self::median(latencies)
                )
            },
            self.iterations,
            1.0 / self.mean_candidates(),
        ));
        md.push_str("\n### By subject\n\n");
        let mut header = vec!["subject".to_string(), "questions".to_string()];
        header.extend(RANKINGS.iter().map(|r| format!("`{r}`")));
        let rows: Vec<Vec<String>> = self
            .subjects()
            .into_iter()
            .map(|(t, counts)| {
                let mut row = vec![t.to_string(), counts[0].1.to_string()];
                row.extend(
                    counts
                        .iter()
                        .map(|&(k, n)| super::cell(k as f64 / n as f64, 2)),
                );
                row
            })
            .collect();
        md.push_str(&super::table(&header, &rows));
        md
    }

    fn svg(&self) -> String {
        let counts = Self::counts(self.answered.iter());
        let series = RANKINGS
            .iter()
            .zip(counts)
            .enumerate()
            .map(|(i, (r, (k, n)))| {
                let (lo, hi) = wilson(k, n);
                let x = i as f64;
                XySeries {
                    label: format!("{r}: {:.3}", k as f64 / n as f64),
                    // The 95 % interval as a bar, the accuracy at its middle point.
                    points: vec![(x, lo), (x, k as f64 / n as f64), (x, hi)],
                    line: true,
                }
            });
        let chance = 1.0 / self.mean_candidates();
        let series = series
            .chain([XySeries {
                label: format!("chance {chance:.3}"),
                points: vec![(-0.5, chance), (3.5, chance)],
                line: true,
            }])
            .collect();
        xy_panels(&[Panel {
            title: format!(
                "Accuracy with 95 % intervals ({} questions)",
                self.answered.len()
            ),
            x_title: "ranking: 0 generator, 1 discriminator, 2 ER-G, 3 ER-D".into(),
            y_title: "accuracy".into(),
            series,
        }])
    }

    /// Chance accuracy is its reciprocal's mean; near enough with equal option counts.
    fn mean_candidates(&self) -> f64 {
        super::mean(self.answered.iter().map(|a| a.candidates as f64))
    }

    fn json(&self) -> Value {
        let counts = Self::counts(self.answered.iter());
        json!({
            "data": self.args.data.display().to_string(),
            "format": format!("{:?}", self.args.format).to_lowercase(),
            "questions": self.answered.len(),
            "skipped": self.skipped,
            "wall_s": self.wall_s,
            "accuracy": RANKINGS.iter().zip(counts).map(|(r, (k, n))| {
                let (lo, hi) = wilson(k, n);
                (r.to_string(), json!({"right": k, "of": n, "ci95": [super::num(lo), super::num(hi)]}))
            }).collect::<serde_json::Map<_, _>>(),
            "subjects": self.subjects().into_iter().map(|(t, c)| {
                (t.to_string(), json!(RANKINGS.iter().zip(c).map(|(r, (k, n))| (r.to_string(), json!([k, n]))).collect::<serde_json::Map<_, _>>()))
            }).collect::<serde_json::Map<_, _>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINES: &str = r#"{"question": "2+2?", "answer_a": "3", "answer_b": "4", "answer_c": "5", "answer_d": "6", "correct_answer": "B", "topic": "math"}
{"question": "Sky?", "answer_a": "blue", "answer_b": "", "answer_c": "red", "answer_d": "green", "correct_answer": "A", "topic": "nature"}
{"question": "Sea?", "answer_a": "wet", "answer_b": "dry", "correct_answer": "Q", "topic": "nature"}
{"question": "Sun?", "answer_a": "hot", "answer_b": "cold", "correct_answer": "a", "topic": "nature"}
"#;

    #[test]
    fn questions_parse_in_either_format_and_bad_lines_are_counted() {
        let (qs, skipped) = parse(LINES, Format::Letters).unwrap();
        assert_eq!((qs.len(), skipped), (2, 2));
        assert_eq!(qs[0].candidates, ["A", "B", "C", "D"]);
        assert_eq!(qs[0].correct, 1);
        assert!(qs[0].prompt.contains("B. 4") && qs[0].prompt.contains("about math"));
        let (qs, _) = parse(LINES, Format::Texts).unwrap();
        assert_eq!(
            (qs[1].candidates.clone(), qs[1].correct),
            (vec!["hot".into(), "cold".into()], 0)
        );
    }

    #[test]
    fn subjects_take_turns() {
        let q = |t: &str| Question {
            topic: t.into(),
            prompt: String::new(),
            candidates: vec![],
            correct: 0,
        };
        let all = vec![q("a"), q("a"), q("a"), q("b"), q("c")];
        let topics: Vec<String> = spread(all, 4).into_iter().map(|q| q.topic).collect();
        assert_eq!(topics, ["a", "b", "c", "a"]);
    }

    #[test]
    fn rankings_are_read_off_the_report_and_intervals_hold_the_rate() {
        let c = |g: f64, d: f64, eg: f64, ed: f64| json!({"generator": g, "discriminator": d, "equilibrium": {"generator": eg, "discriminator": ed}});
        let report = json!({"candidates": [c(0.9, 0.1, 0.2, 0.3), c(0.1, 0.8, 0.7, 0.1), c(0.0, 0.1, 0.1, 0.6)]});
        assert_eq!(picks(&report).unwrap(), [0, 1, 1, 2]);
        let (lo, hi) = wilson(30, 100);
        assert!(
            lo < 0.3 && 0.3 < hi && (0.21..0.22).contains(&lo),
            "{lo} {hi}"
        );
        assert_eq!(wilson(0, 10).0, 0.0);
    }
}
