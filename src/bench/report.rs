//! The report's forms: JSON (every sample), markdown tables, and SVG line charts of latency and
//! throughput against load, one line per series.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::plot::categories;
use super::stats::{Distribution, LongPrompt, Summary};
use super::{Report, Run, Series};

/// Write `path` (JSON) and, beside it, the markdown (same name, `.md`) and, for load runs, the
/// charts `<stem>-<metric>.svg`. Returns the files written.
pub fn write(report: &Report, path: &Path) -> Result<Vec<PathBuf>> {
    let dir = path.parent().unwrap_or(Path::new(""));
    if !dir.as_os_str().is_empty() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let mut files = vec![(path.to_path_buf(), serde_json::to_string_pretty(report)?)];
    let mut md = markdown(report);
    if !report.settings.sweep {
        for (metric, svg) in charts(report) {
            let name = format!("{stem}-{metric}.svg");
            writeln!(md, "\n![{metric}]({name})").unwrap();
            files.push((dir.join(name), svg));
        }
    }
    files.push((path.with_extension("md"), md));
    for (file, text) in &files {
        std::fs::write(file, text).with_context(|| format!("writing {}", file.display()))?;
    }
    Ok(files.into_iter().map(|(file, _)| file).collect())
}

/// A run's load point, or its lengths when it is a sweep cell (always one client), as a table
/// cell, chart tick or progress message.
pub(super) fn describe(
    concurrency: Option<usize>,
    rate: Option<f64>,
    cell: Option<(usize, usize)>,
) -> String {
    match (cell, rate, concurrency) {
        (Some((p, o)), _, _) => format!("{p} → {o} tokens"),
        (None, Some(rate), _) => format!("{rate} req/s"),
        (None, None, Some(1)) => "1 client".into(),
        (None, None, c) => format!("{} clients", c.unwrap_or(1)),
    }
}

fn load(run: &Run, sweep: bool) -> String {
    let cell = run.prompt_tokens.zip(run.output_tokens).filter(|_| sweep);
    describe(run.concurrency, run.rate, cell)
}

fn num(v: f64) -> String {
    match v.abs() {
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 10.0 => format!("{v:.1}"),
        _ => format!("{v:.2}"),
    }
}

fn median(d: &Option<Distribution>) -> Option<f64> {
    d.as_ref().map(|d| d.median)
}

fn opt(v: Option<f64>) -> String {
    v.map_or("–".into(), num)
}

/// Markdown tables: per series, throughput and latency per load point, then a comparison with
/// the first series and, after a sweep, the idealised-runtime fits.
pub fn markdown(report: &Report) -> String {
    let s = &report.settings;
    let mut md = String::from("# tilt bench\n\n");
    let prompts = match &s.prompts {
        Some(path) => format!("prompts from `{}`", path.display()),
        None if s.sweep => "synthetic prompts over a grid of lengths, one request at a time".into(),
        None => format!(
            "synthetic prompts of ~{} tokens, max_tokens {}",
            s.prompt_tokens, s.output_tokens
        ),
    };
    writeln!(
        md,
        "Endpoint `{}`, {prompts}, ignore_eos {}, streaming. Latencies in ms over successful \
         requests; percentiles by linear interpolation; throughput over each run's wall time.",
        s.endpoint.path(),
        s.ignore_eos
    )
    .unwrap();
    if s.slo_ttft.is_some() || s.slo_tpot.is_some() {
        writeln!(
            md,
            "Goodput: successful requests per second with TTFT ≤ {} ms and TPOT ≤ {} ms.",
            opt(s.slo_ttft),
            opt(s.slo_tpot)
        )
        .unwrap();
    }
    for series in &report.series {
        series_tables(&mut md, series, s.sweep);
    }
    if report.series.len() > 1 && !s.sweep {
        comparison(&mut md, &report.series);
    }
    if s.sweep {
        fits(&mut md, &report.series);
    }
    md
}

fn series_tables(md: &mut String, series: &Series, sweep: bool) {
    writeln!(md, "\n## {}\n", series.label).unwrap();
    let calibration = match series.tokens_per_word {
        Some(t) => format!("{t:.2} tokens per synthetic word (from /tokenize)"),
        None => "synthetic prompts assume 1 token per word".into(),
    };
    writeln!(
        md,
        "`{}`, model `{}`; {calibration}.\n",
        series.url,
        series.model.as_deref().unwrap_or("(none sent)")
    )
    .unwrap();
    md.push_str("| load | ok | failed | req/s | output tok/s | total tok/s | goodput req/s |\n");
    md.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
    for run in &series.runs {
        let t = &run.summary;
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            load(run, sweep),
            t.completed,
            t.failed,
            num(t.request_throughput),
            num(t.output_throughput),
            num(t.total_token_throughput),
            opt(t.goodput)
        )
        .unwrap();
    }
    md.push_str("\n| load | metric | mean | median | p90 | p99 |\n|---|---|---:|---:|---:|---:|\n");
    for run in &series.runs {
        let t = &run.summary;
        for (name, d) in [
            ("TTFT", &t.ttft_ms),
            ("TPOT", &t.tpot_ms),
            ("ITL", &t.itl_ms),
            ("E2E", &t.e2el_ms),
        ] {
            let cells = match d {
                Some(Distribution {
                    mean,
                    median,
                    p90,
                    p99,
                    ..
                }) => [mean, median, p90, p99].map(|v| num(*v)).join(" | "),
                None => "– | – | – | –".into(),
            };
            writeln!(md, "| {} | {name} | {cells} |", load(run, sweep)).unwrap();
        }
    }
    for run in &series.runs {
        if let Some(long) = &run.long_prompt {
            long_prompt(md, &load(run, sweep), long);
        }
    }
    for run in &series.runs {
        let t = &run.summary;
        if t.failed > 0 {
            let by = |m: &std::collections::BTreeMap<String, usize>| {
                let parts: Vec<String> = m.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
                parts.join(", ")
            };
            writeln!(
                md,
                "\nFailures at {}: status {}; kind {}.",
                load(run, sweep),
                by(&t.errors_by_status),
                by(&t.errors_by_kind)
            )
            .unwrap();
        }
        if t.outputs_counted_from_chunks > 0 {
            writeln!(
                md,
                "\nAt {}, the server sent no usage for {} requests: their output tokens are stream chunks.",
                load(run, sweep),
                t.outputs_counted_from_chunks
            )
            .unwrap();
        }
    }
}

fn long_prompt(md: &mut String, load: &str, long: &LongPrompt) {
    let tokens = long
        .sample
        .prompt_tokens
        .map_or("?".into(), |t| t.to_string());
    let Some(prefill) = long.prefill_ms else {
        let why = long
            .sample
            .error_detail
            .as_deref()
            .unwrap_or("no first token");
        writeln!(
            md,
            "\nAt {load}, the long prompt ({tokens} tokens) failed: {why}."
        )
        .unwrap();
        return;
    };
    let median = |d: &Option<Distribution>| d.as_ref().map_or("–".into(), |d| num(d.median));
    let p99 = long
        .itl_during_ms
        .as_ref()
        .map_or("–".into(), |d| num(d.p99));
    writeln!(
        md,
        "\nAt {load}, a {tokens}-token prompt arrived at {} ms and took {} ms to its first token. \
         The other streams' inter-token gap: median {} ms without it; during its prefill median \
         {} ms, p99 {p99} ms; p99 ÷ median without it = {}.",
        num(long.sample.start_ms),
        num(prefill),
        median(&long.itl_without_ms),
        median(&long.itl_during_ms),
        opt(long.p99_during_over_median_without),
    )
    .unwrap();
}

/// Each series against the first (the baseline) at each load point.
fn comparison(md: &mut String, series: &[Series]) {
    let base = &series[0];
    writeln!(md, "\n## Relative to {}\n", base.label).unwrap();
    md.push_str("| load | series | output tok/s | × | median TPOT | × | median TTFT | × |\n");
    md.push_str("|---|---|---:|---:|---:|---:|---:|---:|\n");
    let ratio = |v: Option<f64>, b: Option<f64>| match (v, b) {
        (Some(v), Some(b)) if b > 0.0 => format!("{v:.2}", v = v / b),
        _ => "–".into(),
    };
    for (i, base_run) in base.runs.iter().enumerate() {
        for s in series {
            let Some(run) = s.runs.get(i) else { continue };
            let (r, b) = (&run.summary, &base_run.summary);
            writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                load(run, false),
                s.label,
                num(r.output_throughput),
                ratio(Some(r.output_throughput), Some(b.output_throughput)),
                opt(median(&r.tpot_ms)),
                ratio(median(&r.tpot_ms), median(&b.tpot_ms)),
                opt(median(&r.ttft_ms)),
                ratio(median(&r.ttft_ms), median(&b.ttft_ms)),
            )
            .unwrap();
        }
    }
}

fn fits(md: &mut String, series: &[Series]) {
    md.push_str("\n## Idealised runtime\n\nEnd-to-end latency, one request at a time, fitted as ");
    md.push_str("a + b·prompt_tokens + c·output_tokens by least squares.\n\n");
    md.push_str(
        "| series | a (ms) | b (ms/prompt token) | c (ms/output token) | R² | requests |\n",
    );
    md.push_str("|---|---:|---:|---:|---:|---:|\n");
    for s in series {
        match &s.fit {
            Some(f) => writeln!(
                md,
                "| {} | {} | {:.3} | {:.3} | {:.4} | {} |",
                s.label,
                num(f.intercept_ms),
                f.ms_per_prompt_token,
                f.ms_per_output_token,
                f.r2,
                f.samples
            ),
            None => writeln!(md, "| {} | – | – | – | – | not determined |", s.label),
        }
        .unwrap();
    }
}

/// (metric, svg) for each chart: medians of E2E latency, TTFT and TPOT, and output throughput.
fn charts(report: &Report) -> Vec<(&'static str, String)> {
    let Some(first) = report.series.first() else {
        return Vec::new();
    };
    let ticks: Vec<String> = first.runs.iter().map(|r| load(r, false)).collect();
    let x_title = if report.settings.rate.is_empty() {
        "concurrent clients"
    } else {
        "request rate (Poisson)"
    };
    type Metric = fn(&Summary) -> Option<f64>;
    let specs: [(&str, &str, &str, Metric); 4] = [
        ("latency", "Median end-to-end latency", "ms", |s| {
            median(&s.e2el_ms)
        }),
        ("ttft", "Median time to first token", "ms", |s| {
            median(&s.ttft_ms)
        }),
        ("tpot", "Median time per output token", "ms", |s| {
            median(&s.tpot_ms)
        }),
        ("throughput", "Output throughput", "tokens/s", |s| {
            Some(s.output_throughput)
        }),
    ];
    specs
        .into_iter()
        .map(|(name, title, unit, value)| {
            let line = |s: &Series| {
                (
                    s.label.clone(),
                    s.runs.iter().map(|r| value(&r.summary)).collect(),
                )
            };
            let lines: Vec<_> = report.series.iter().map(line).collect();
            (name, categories(title, x_title, unit, &ticks, &lines))
        })
        .collect()
}
