//! `tilt bench`: latency and throughput of any OpenAI-compatible server (tilt, llama-server,
//! vLLM), per decoder configuration and per server, so one command compares them.
//!
//! Each series (a server URL × an `alignment` object) runs once per load point: N clients in a
//! closed loop, or Poisson arrivals at a rate, for a request count or a duration, after a few
//! warm-up requests. Requests stream, so TTFT and inter-token latency are what a client sees.
//! `--sweep` instead runs a grid of prompt × output lengths one request at a time and fits the
//! idealised runtime a + b·prompt_tokens + c·output_tokens (Narayanan et al., "Cheaply Evaluating
//! Inference Efficiency Metrics for Autoregressive Transformer APIs").

mod client;
mod load;
pub(crate) mod plot;
pub(crate) mod report;
pub mod stats;
mod workload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use clap::{ArgAction, Parser};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::{Map, Value};

pub use client::{Endpoint, Failure, Sample};
pub use report::{markdown, write};

use client::Target;
use load::{Load, Stop};
use stats::{LongPrompt, RuntimeFit, Slo, Summary};
use workload::Workload;

/// Requests per run unless `--requests` or `--duration` says otherwise.
const DEFAULT_REQUESTS: usize = 32;
/// Requests per grid cell of `--sweep`.
const DEFAULT_SWEEP_REQUESTS: usize = 3;

#[derive(Parser, Debug, Clone, Serialize)]
pub struct BenchArgs {
    /// Base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8080 (repeat to compare servers).
    #[arg(long, value_name = "URL", required = true)]
    pub url: Vec<String>,
    /// Model name to send (default: the first of the server's GET /v1/models, else none).
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,
    #[arg(long, value_enum, default_value_t = Endpoint::Completions)]
    pub endpoint: Endpoint,
    /// Clients in a closed loop; a comma list runs one load point each.
    #[arg(
        long,
        value_name = "N,..",
        value_delimiter = ',',
        default_value = "1",
        conflicts_with = "rate"
    )]
    pub concurrency: Vec<usize>,
    /// Open loop instead: Poisson arrivals per second; a comma list runs one load point each.
    #[arg(long, value_name = "R,..", value_delimiter = ',')]
    pub rate: Vec<f64>,
    /// Requests per load point [default: 32; 3 per cell with --sweep].
    #[arg(long, value_name = "M", conflicts_with = "duration")]
    pub requests: Option<usize>,
    /// Seconds per load point to keep sending; requests in flight then finish.
    #[arg(long, value_name = "SECONDS")]
    pub duration: Option<f64>,
    /// Unmeasured requests, one at a time, before each series.
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub warmup: usize,
    /// Prompts, one JSON object a line: {"prompt": TEXT} or {"messages": [...]} (chat), optional
    /// "max_tokens". Used in order and cycled, the same for every load point (a server's prefix
    /// cache may answer repeats faster).
    #[arg(long, value_name = "FILE.jsonl", conflicts_with = "prompt_tokens")]
    pub prompts: Option<PathBuf>,
    /// Length of synthetic prompts, in tokens (approximate: see the report's tokens_per_word).
    #[arg(long, value_name = "P", default_value_t = 128)]
    pub prompt_tokens: usize,
    /// max_tokens of each request.
    #[arg(long, value_name = "O", default_value_t = 128)]
    pub output_tokens: usize,
    /// Send `ignore_eos` (tilt, vLLM and llama-server extension) so answers run to max_tokens.
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub ignore_eos: bool,
    /// An `alignment` object to send with every request, e.g. '{"decoder":"sample"}'.
    #[arg(long, value_name = "JSON", value_parser = json_object, conflicts_with = "alignment_file")]
    pub alignment: Option<Value>,
    /// JSONL of `alignment` objects, one series each (a `null` line sends none).
    #[arg(long, value_name = "FILE.jsonl")]
    pub alignment_file: Option<PathBuf>,
    /// More body fields for every request, e.g. '{"temperature":0}'; the benchmark's own win.
    #[arg(long, value_name = "JSON", value_parser = json_object)]
    pub extra_body: Option<Value>,
    /// Goodput counts requests with TTFT at most this many milliseconds.
    #[arg(long, value_name = "MS")]
    pub slo_ttft: Option<f64>,
    /// Goodput counts requests with TPOT at most this many milliseconds.
    #[arg(long, value_name = "MS")]
    pub slo_tpot: Option<f64>,
    /// Idealised runtime: one request at a time over prompt × output lengths, then a linear fit.
    #[arg(long, conflicts_with_all = ["concurrency", "rate", "duration", "prompts", "prompt_tokens", "output_tokens"])]
    pub sweep: bool,
    /// Synthetic prompt lengths of the sweep grid.
    #[arg(
        long,
        value_name = "P,..",
        value_delimiter = ',',
        default_value = "32,128,512",
        requires = "sweep"
    )]
    pub sweep_prompt_tokens: Vec<usize>,
    /// Output lengths (max_tokens) of the sweep grid.
    #[arg(
        long,
        value_name = "O,..",
        value_delimiter = ',',
        default_value = "16,64,128",
        requires = "sweep"
    )]
    pub sweep_output_tokens: Vec<usize>,
    /// Fairness under mixed load: once each run's streams flow, one request with a synthetic
    /// prompt of this many tokens arrives; the report splits the streams' inter-token gaps into
    /// those during its prefill (arrival to its first token) and the rest.
    #[arg(long, value_name = "TOKENS", conflicts_with = "sweep")]
    pub long_prompt_tokens: Option<usize>,
    /// Seconds into each run at which the long prompt arrives.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 1.0,
        requires = "long_prompt_tokens"
    )]
    pub long_prompt_after: f64,
    /// Seconds before a request counts as failed (timeout).
    #[arg(long, value_name = "SECONDS", default_value_t = 600.0)]
    pub request_timeout: f64,
    /// Seeds synthetic prompts and Poisson arrivals.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the JSON report here, with FILE.md and FILE-*.svg plots beside it.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

fn json_object(s: &str) -> Result<Value, String> {
    match serde_json::from_str(s) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err("expected a JSON object".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Everything measured, as written to the JSON report.
#[derive(Debug, Serialize)]
pub struct Report {
    pub tilt_version: &'static str,
    pub command: Vec<String>,
    pub settings: BenchArgs,
    pub series: Vec<Series>,
}

/// One server URL with one `alignment` configuration.
#[derive(Debug, Serialize)]
pub struct Series {
    pub label: String,
    pub url: String,
    pub model: Option<String>,
    pub alignment: Option<Value>,
    /// Tokens per synthetic prompt word measured by the server's /tokenize; null: 1 assumed.
    pub tokens_per_word: Option<f64>,
    pub runs: Vec<Run>,
    /// The idealised runtime, with --sweep (null otherwise or when the fit is not determined).
    pub fit: Option<RuntimeFit>,
}

/// One load point (or sweep cell) of a series.
#[derive(Debug, Serialize)]
pub struct Run {
    /// Closed-loop clients (null in an open loop).
    pub concurrency: Option<usize>,
    /// Open-loop requests per second (null in a closed loop).
    pub rate: Option<f64>,
    /// Synthetic prompt length asked for (null with --prompts).
    pub prompt_tokens: Option<usize>,
    /// max_tokens asked for (null with --prompts, where lines may set their own).
    pub output_tokens: Option<usize>,
    pub summary: Summary,
    /// With --long-prompt-tokens: the long prompt's request and the streams' gaps around it.
    pub long_prompt: Option<LongPrompt>,
    pub samples: Vec<Sample>,
}

impl BenchArgs {
    fn check(&self) -> Result<()> {
        for url in &self.url {
            let parsed = reqwest::Url::parse(url).with_context(|| format!("--url {url}"))?;
            ensure!(
                parsed.scheme() == "http",
                "--url {url}: only http:// (tilt bench targets local servers and has no TLS)"
            );
        }
        ensure!(
            self.concurrency.iter().all(|&c| c > 0),
            "--concurrency must be at least 1"
        );
        ensure!(
            self.rate.iter().all(|&r| r.is_finite() && r > 0.0),
            "--rate must be positive"
        );
        ensure!(self.requests != Some(0), "--requests must be at least 1");
        ensure!(
            self.duration.is_none_or(|d| d.is_finite() && d > 0.0),
            "--duration must be positive"
        );
        ensure!(self.output_tokens > 0, "--output-tokens must be at least 1");
        ensure!(
            self.sweep_prompt_tokens
                .iter()
                .chain(&self.sweep_output_tokens)
                .all(|&n| n > 0),
            "sweep lengths must be at least 1"
        );
        ensure!(!self.plan().is_empty(), "nothing to run: a list is empty");
        ensure!(
            self.long_prompt_tokens != Some(0),
            "--long-prompt-tokens must be at least 1"
        );
        ensure!(
            self.long_prompt_after.is_finite() && self.long_prompt_after >= 0.0,
            "--long-prompt-after must be a number of seconds"
        );
        ensure!(
            self.request_timeout > 0.0,
            "--request-timeout must be positive"
        );
        Ok(())
    }

    fn stop(&self) -> Stop {
        match (self.duration, self.sweep) {
            (Some(d), _) => Stop::Duration(Duration::from_secs_f64(d)),
            (None, true) => Stop::Requests(self.requests.unwrap_or(DEFAULT_SWEEP_REQUESTS)),
            (None, false) => Stop::Requests(self.requests.unwrap_or(DEFAULT_REQUESTS)),
        }
    }

    /// The runs of every series, with synthetic prompt and output lengths: load points, or sweep
    /// cells at one client.
    fn plan(&self) -> Vec<(Load, (usize, usize))> {
        if self.sweep {
            let cells = self.sweep_prompt_tokens.iter().flat_map(|&p| {
                let outputs = self.sweep_output_tokens.iter();
                outputs.map(move |&o| (Load::Closed(1), (p, o)))
            });
            return cells.collect();
        }
        let lengths = (self.prompt_tokens, self.output_tokens);
        let loads: Vec<Load> = if self.rate.is_empty() {
            self.concurrency.iter().map(|&c| Load::Closed(c)).collect()
        } else {
            self.rate.iter().map(|&r| Load::Open(r)).collect()
        };
        loads.into_iter().map(|l| (l, lengths)).collect()
    }

    fn alignments(&self) -> Result<Vec<Option<Value>>> {
        let Some(path) = &self.alignment_file else {
            return Ok(vec![self.alignment.clone()]);
        };
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut out = Vec::new();
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            match serde_json::from_str(line) {
                Ok(v @ Value::Object(_)) => out.push(Some(v)),
                Ok(Value::Null) => out.push(None),
                _ => bail!(
                    "{}:{}: expected a JSON object or null",
                    path.display(),
                    n + 1
                ),
            }
        }
        ensure!(
            !out.is_empty(),
            "{} holds no configurations",
            path.display()
        );
        Ok(out)
    }

    /// Body fields every request of a series carries.
    fn fields(&self, model: Option<&str>, alignment: Option<&Value>) -> Map<String, Value> {
        let mut fields = self
            .extra_body
            .as_ref()
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        if let Some(model) = model {
            fields.insert("model".into(), model.into());
        }
        if self.ignore_eos {
            fields.insert("ignore_eos".into(), true.into());
        }
        if let Some(alignment) = alignment {
            fields.insert("alignment".into(), alignment.clone());
        }
        fields
    }
}

/// `tilt bench` from the command line: run, print the markdown report, write the files, and fail
/// when no request at all succeeded.
pub fn run(args: BenchArgs) -> Result<()> {
    let report = tokio::runtime::Runtime::new()?.block_on(execute(&args))?;
    print!("{}", markdown(&report));
    if let Some(path) = &args.output {
        for written in write(&report, path)? {
            eprintln!("wrote {}", written.display());
        }
    }
    let runs = report.series.iter().flat_map(|s| &s.runs);
    if runs.map(|r| r.summary.completed).sum::<usize>() == 0 {
        bail!("every request failed; see the errors in the report");
    }
    Ok(())
}

/// Run every series and load point of `args`.
pub async fn execute(args: &BenchArgs) -> Result<Report> {
    args.check()?;
    let client = reqwest::Client::new();
    let alignments = args.alignments()?;
    let file = match &args.prompts {
        Some(path) => {
            let prompts = workload::read_prompts(path, args.output_tokens, args.endpoint)?;
            Some(Arc::new(Workload::File(prompts)))
        }
        None => None,
    };
    let mut session = Session {
        args,
        file,
        streams: 0,
    };
    let mut series = Vec::new();
    for url in &args.url {
        let base = url.trim_end_matches('/').trim_end_matches("/v1");
        let model = match &args.model {
            Some(m) => Some(m.clone()),
            None => first_model(&client, base).await,
        };
        let tokens_per_word = match session.file {
            None => workload::tokens_per_word(&client, base, model.as_deref()).await,
            Some(_) => None,
        };
        for alignment in &alignments {
            let target = Target {
                client: client.clone(),
                url: format!("{base}{}", args.endpoint.path()),
                endpoint: args.endpoint,
                fields: args.fields(model.as_deref(), alignment.as_ref()),
                timeout: Duration::from_secs_f64(args.request_timeout),
            };
            let label = match alignment {
                None => url.clone(),
                Some(a) if args.url.len() > 1 => format!("{a} @ {url}"),
                Some(a) => a.to_string(),
            };
            let runs = session
                .runs(Arc::new(target), &label, tokens_per_word)
                .await;
            let fit = if args.sweep {
                RuntimeFit::of(runs.iter().flat_map(|r| &r.samples))
            } else {
                None
            };
            series.push(Series {
                label,
                url: url.clone(),
                model: model.clone(),
                alignment: alignment.clone(),
                tokens_per_word,
                runs,
                fit,
            });
        }
    }
    Ok(Report {
        tilt_version: env!("CARGO_PKG_VERSION"),
        command: std::env::args().collect(),
        settings: args.clone(),
        series,
    })
}

struct Session<'a> {
    args: &'a BenchArgs,
    /// Prompts from --prompts, shared by every run.
    file: Option<Arc<Workload>>,
    /// Runs so far: each run and warm-up gets its own prompt stream, so none repeats another's.
    streams: u64,
}

impl Session<'_> {
    /// Warm up, then run every load point (or sweep cell) of one series.
    async fn runs(
        &mut self,
        target: Arc<Target>,
        label: &str,
        tokens_per_word: Option<f64>,
    ) -> Vec<Run> {
        let args = self.args;
        let workload = |(p, o)| match &self.file {
            Some(file) => file.clone(),
            None => Arc::new(Workload::synthetic(
                p,
                o,
                tokens_per_word.unwrap_or(1.0),
                args.seed,
            )),
        };
        let plan = args.plan();
        if args.warmup > 0 {
            self.streams += 1;
            let (warm, hidden) = (Stop::Requests(args.warmup), ProgressBar::hidden());
            let first = workload(plan[0].1);
            load::drive(
                &target,
                &first,
                self.streams,
                Load::Closed(1),
                warm,
                args.seed,
                None,
                &hidden,
            )
            .await;
        }
        let slo = Slo {
            ttft_ms: args.slo_ttft,
            tpot_ms: args.slo_tpot,
        };
        let stop = args.stop();
        let mut runs = Vec::new();
        for (load, lengths) in plan {
            let (concurrency, rate) = match load {
                Load::Closed(c) => (Some(c), None),
                Load::Open(r) => (None, Some(r)),
            };
            let what = report::describe(concurrency, rate, args.sweep.then_some(lengths));
            let progress = progress_bar(stop, format!("{label} · {what}"));
            self.streams += 1;
            let long = args.long_prompt_tokens.map(|tokens| {
                let prompt =
                    Workload::synthetic(tokens, 2, tokens_per_word.unwrap_or(1.0), args.seed)
                        .prompt(self.streams, usize::MAX);
                (Duration::from_secs_f64(args.long_prompt_after), prompt)
            });
            let ran = load::drive(
                &target,
                &workload(lengths),
                self.streams,
                load,
                stop,
                args.seed,
                long,
                &progress,
            )
            .await;
            let summary = Summary::of(&ran.samples, ran.duration_s, slo);
            let long_prompt = ran.long.map(|long| LongPrompt::of(long, &ran.samples));
            progress.finish_with_message(format!(
                "{label} · {what}: {} ok, {} failed",
                summary.completed, summary.failed
            ));
            if summary.outputs_counted_from_chunks > 0 {
                eprintln!(
                    "note: {label} · {what}: no usage from the server; output tokens of {} requests are counted as stream chunks",
                    summary.outputs_counted_from_chunks
                );
            }
            let lengths = self.file.is_none().then_some(lengths);
            runs.push(Run {
                concurrency,
                rate,
                prompt_tokens: lengths.map(|l| l.0),
                output_tokens: lengths.map(|l| l.1),
                summary,
                long_prompt,
                samples: ran.samples,
            });
        }
        runs
    }
}

/// The id of the first model the server lists, if it lists any.
async fn first_model(client: &reqwest::Client, base: &str) -> Option<String> {
    let response = client
        .get(format!("{base}/v1/models"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    let v: Value = response.error_for_status().ok()?.json().await.ok()?;
    v["data"][0]["id"].as_str().map(String::from)
}

fn progress_bar(stop: Stop, message: String) -> ProgressBar {
    let bar = match stop {
        Stop::Requests(n) => ProgressBar::new(n as u64).with_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}")
                .expect("a valid template")
                .progress_chars("=> "),
        ),
        Stop::Duration(_) => {
            let bar = ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template("{spinner} {msg}: {pos} done {elapsed}")
                    .expect("a valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        }
    };
    bar.with_message(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        BenchArgs::try_parse_from(["bench"].iter().chain(args))
    }

    #[test]
    fn bad_arguments_are_refused_before_any_request() {
        let check = |args: &[&str]| parse(args).unwrap().check();
        assert!(check(&["--url", "http://127.0.0.1:8080/v1"]).is_ok());
        assert!(check(&["--url", "https://127.0.0.1:8080"]).is_err());
        assert!(check(&["--url", "localhost:8080"]).is_err());
        assert!(check(&["--url", "http://a", "--concurrency", "1,0"]).is_err());
        assert!(check(&["--url", "http://a", "--rate", "0"]).is_err());
        assert!(parse(&["--url", "http://a", "--requests", "3", "--duration", "2"]).is_err());
        assert!(parse(&["--url", "http://a", "--sweep", "--concurrency", "2"]).is_err());
        assert!(parse(&["--url", "http://a", "--sweep-prompt-tokens", "8"]).is_err());
    }
}
