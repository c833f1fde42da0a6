//! `tilt eval speculative`: speculative rejection against full best-of-N on held-out prompts.
//! Every prompt runs alone (a request's latency, as a user sees it), full best-of-N and each
//! speculative setting alternating, with the same seed: a candidate that survives is the full
//! run's candidate of the same index, so its full reward and rank among the full run's are known.
//! Per setting: how often the choice is within the full run's top 2, the reward given up, and
//! generated tokens and wall time as shares of the full run's (medians over prompts, each
//! prompt's wall time the median of its repeats).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

use super::{cell, mean, num, Decoding, Job, Output};
use crate::decode::DecoderSpec;
use crate::engine::{Engine, EngineOptions};
use crate::train::prompts::{self, Split};

#[derive(clap::Args, Debug)]
pub struct SpeculativeArgs {
    /// Write speculative.md and speculative.json here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub models: super::EvalModels,
    /// The objectives candidates are ranked by, as best_of_n's `rewards` (JSON).
    #[arg(long, default_value = r#"{"positive": 1.0}"#)]
    pub rank_by: String,
    /// Candidates per request.
    #[arg(long, default_value_t = 16)]
    pub n: usize,
    /// The `reject_fraction`s to try (comma-separated).
    #[arg(long, default_value = "0.5", value_delimiter = ',')]
    pub reject_fractions: Vec<f64>,
    /// The `checkpoint_tokens` to try (comma-separated; 0 is the decoder's default).
    #[arg(long, default_value = "0", value_delimiter = ',')]
    pub checkpoint_tokens: Vec<usize>,
    /// Prompts, one {"prompt": …} per line (default: the built-in held-out `eval` split).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Use only the first N prompts.
    #[arg(long, default_value_t = 30)]
    pub limit: usize,
    /// Timed runs of every setting per prompt, alternated.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Each prompt samples with seed ^ hash(prompt), the same in every setting.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// One setting's runs of every prompt.
struct Setting {
    name: String,
    config: Value,
    spec: DecoderSpec,
    /// Per prompt: the output of its first run and the wall time of each run.
    runs: Vec<(Output, Vec<f64>)>,
}

/// The `tilt eval speculative` command.
pub fn run(args: SpeculativeArgs) -> Result<()> {
    if args.limit == 0 || args.repeats == 0 || args.max_tokens == 0 {
        bail!("--limit, --repeats and --max-tokens must be at least 1");
    }
    let rewards: Value = serde_json::from_str(&args.rank_by).context("--rank-by is not JSON")?;
    let mut prompts = match &args.prompts {
        Some(path) => prompts::read(path, Split::All)?,
        None => prompts::builtin(Split::Eval),
    };
    prompts.truncate(args.limit);
    if prompts.is_empty() {
        bail!("no prompts");
    }
    let engine = Engine::start(args.models.load()?, EngineOptions::default());
    let base = json!({"n": args.n, "rewards": rewards, "return_candidates": true});
    let mut configs = vec![("full".to_string(), base.clone())];
    for &fraction in &args.reject_fractions {
        for &every in &args.checkpoint_tokens {
            let mut c = base.clone();
            c["selection"] = "speculative".into();
            c["reject_fraction"] = json!(fraction);
            let mut name = format!("speculative α={fraction}");
            if every > 0 {
                c["checkpoint_tokens"] = every.into();
                name.push_str(&format!(" every {every}"));
            }
            configs.push((name, c));
        }
    }
    let mut settings = configs
        .into_iter()
        .map(|(name, config)| {
            let params: Map<String, Value> = config.as_object().cloned().unwrap_or_default();
            let spec = DecoderSpec::parse("best_of_n", params, engine.rewards())
                .map_err(|e| anyhow::anyhow!("{name}: {}", e.message))?;
            Ok(Setting {
                name,
                config,
                spec,
                runs: Vec::new(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let decoding = Decoding {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: 1.0,
        seed: args.seed,
    };
    eprintln!(
        "eval speculative: {} settings × {} prompts × {} repeats, best-of-{}",
        settings.len(),
        prompts.len(),
        args.repeats,
        args.n
    );
    let bar = crate::progress::bar(
        (settings.len() * prompts.len() * args.repeats) as u64,
        "speculative",
    );
    for prompt in &prompts {
        let mut times = vec![Vec::new(); settings.len()];
        let mut outputs = vec![None; settings.len()];
        for r in 0..args.repeats {
            // Alternate the order, so that neither kind always runs first.
            let mut order: Vec<usize> = (0..settings.len()).collect();
            if r % 2 == 1 {
                order.reverse();
            }
            for s in order {
                let job = Job {
                    spec: settings[s].spec.clone(),
                    prompt: prompt.clone(),
                    salt: 0,
                };
                let start = Instant::now();
                let out = super::run_jobs(&engine, &[job], &decoding, &bar)?.remove(0);
                times[s].push(start.elapsed().as_secs_f64());
                outputs[s].get_or_insert(out);
            }
        }
        for ((s, out), t) in settings.iter_mut().zip(outputs).zip(times) {
            s.runs.push((out.context("a setting never ran")?, t));
        }
    }
    bar.finish_and_clear();
    let (md, json) = report(&settings, &args, prompts.len())?;
    println!("{md}");
    if let Some(out) = &args.out {
        let files = [
            ("speculative.md", md),
            ("speculative.json", serde_json::to_string_pretty(&json)?),
        ];
        for f in super::write_files(out, &files)? {
            eprintln!("wrote {}", f.display());
        }
    }
    Ok(())
}

/// Each candidate's reward in a best-of-N report.
fn candidate_rewards(report: &Value) -> Result<Vec<f64>> {
    (report["candidates"].as_array())
        .context("a report without candidates")?
        .iter()
        .map(|c| c["reward"].as_f64().context("a candidate without a reward"))
        .collect()
}

fn chosen(report: &Value) -> Result<usize> {
    report["chosen"]
        .as_u64()
        .map(|c| c as usize)
        .context("a report without `chosen`")
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// The table and the data: per setting, against the full run of the same prompts.
fn report(settings: &[Setting], args: &SpeculativeArgs, prompts: usize) -> Result<(String, Value)> {
    let full = &settings[0];
    let mut rows = Vec::new();
    let mut data = Vec::new();
    for s in settings {
        let (mut top2, mut same_text) = (0usize, 0usize);
        let (mut regret, mut chosen_reward) = (Vec::new(), Vec::new());
        let (mut tokens, mut walls) = (Vec::new(), Vec::new());
        let (mut all_tokens, mut all_full_tokens) = (0usize, 0usize);
        for ((out, t), (f_out, f_t)) in s.runs.iter().zip(&full.runs) {
            let report = out.report.as_ref().context("no report")?;
            let full_report = f_out
                .report
                .as_ref()
                .context("the full run has no report")?;
            let full_rewards = candidate_rewards(full_report)?;
            let c = chosen(report)?;
            let reward = *full_rewards
                .get(c)
                .context("a chosen candidate out of range")?;
            let above = full_rewards.iter().filter(|&&r| r > reward).count();
            top2 += usize::from(above < 2);
            let best = full_rewards
                .iter()
                .copied()
                .fold(f64::NEG_INFINITY, f64::max);
            regret.push(best - reward);
            chosen_reward.push(reward);
            same_text += usize::from(out.text == full_report["candidates"][c]["text"]);
            tokens.push(out.generated as f64 / f_out.generated.max(1) as f64);
            all_tokens += out.generated;
            all_full_tokens += f_out.generated;
            walls.push(median(t.clone()) / median(f_t.clone()));
        }
        let top2_rate = top2 as f64 / prompts as f64;
        rows.push(vec![
            format!("`{}`", s.name),
            cell(top2_rate, 3),
            cell(mean(chosen_reward.iter().copied()), 2),
            cell(mean(regret.iter().copied()), 2),
            cell(all_tokens as f64 / all_full_tokens.max(1) as f64, 3),
            cell(median(tokens.clone()), 3),
            cell(median(walls.clone()), 3),
        ]);
        data.push(json!({
            "name": s.name,
            "config": s.config,
            "top2_rate": num(top2_rate),
            "chosen_is_full_candidate": same_text,
            "mean_reward": num(mean(chosen_reward.iter().copied())),
            "mean_regret": num(mean(regret.iter().copied())),
            "generated_share": num(all_tokens as f64 / all_full_tokens.max(1) as f64),
            "median_generated_share": num(median(tokens)),
            "median_wall_share": num(median(walls)),
            "wall_s": s.runs.iter().map(|(_, t)| num(median(t.clone()))).collect::<Vec<_>>(),
        }));
    }
    let header: Vec<String> = [
        "setting",
        "choice in full top 2",
        "mean reward",
        "reward below full's best",
        "generated tokens / full",
        "median per prompt",
        "median wall time / full",
    ]
    .map(String::from)
    .to_vec();
    let mut md = format!(
        "# Speculative rejection against best-of-{} ({prompts} prompts, `rewards` {}, {} tokens, temperature {}, {} alternated runs each)\n\n",
        args.n, args.rank_by, args.max_tokens, args.temperature, args.repeats
    );
    md.push_str(&super::table(&header, &rows));
    Ok((
        md,
        json!({"settings": data, "prompts": prompts, "n": args.n}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }
}
