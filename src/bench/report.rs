//! The report's forms: JSON (every sample), markdown tables, and SVG line charts of latency and
//! throughput against load, one line per series.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::stats::{Distribution, Summary};
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
            (name, chart(title, x_title, unit, &ticks, &lines))
        })
        .collect()
}

/// Chart geometry shared by every SVG here: width, plot height and margins.
const W: f64 = 720.0;
const PLOT_H: f64 = 300.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;

const COLORS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// A line chart with evenly spaced categories on x (load points), y from 0, and a legend
/// below; a missing value breaks no line, it is simply not drawn.
fn chart(
    title: &str,
    x_title: &str,
    y_title: &str,
    ticks: &[String],
    lines: &[(String, Vec<Option<f64>>)],
) -> String {
    let plot_w = W - LEFT - RIGHT;
    let legend_top = TOP + PLOT_H + 55.0;
    let height = legend_top + 20.0 * lines.len() as f64 + 10.0;
    let max = lines
        .iter()
        .flat_map(|(_, vs)| vs.iter().flatten())
        .fold(0.0, |m: f64, &v| m.max(v));
    let step = nice_step(if max > 0.0 { max } else { 1.0 });
    let top = step * (max / step).ceil().max(1.0);
    let x = |i: usize| LEFT + plot_w * (i as f64 + 0.5) / ticks.len().max(1) as f64;
    let y = |v: f64| TOP + PLOT_H * (1.0 - v / top);

    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
        W / 2.0,
        escape(title)
    );
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let mut v = 0.0;
    while v <= top + step / 2.0 {
        writeln!(
            svg,
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.decimals$}</text>",
            W - RIGHT,
            LEFT - 6.0,
            y(v) + 4.0,
            y = y(v),
        )
        .unwrap();
        v += step;
    }
    for (i, tick) in ticks.iter().enumerate() {
        writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            x(i),
            TOP + PLOT_H + 18.0,
            escape(tick)
        )
        .unwrap();
    }
    writeln!(
        svg,
        "<line x1=\"{LEFT}\" x2=\"{LEFT}\" y1=\"{TOP}\" y2=\"{b}\" stroke=\"black\"/>\
         <line x1=\"{LEFT}\" x2=\"{}\" y1=\"{b}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n\
         <text transform=\"translate(18 {}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        W - RIGHT,
        LEFT + plot_w / 2.0,
        TOP + PLOT_H + 40.0,
        escape(x_title),
        TOP + PLOT_H / 2.0,
        escape(y_title),
        b = TOP + PLOT_H,
    )
    .unwrap();
    for (n, (label, values)) in lines.iter().enumerate() {
        let color = COLORS[n % COLORS.len()];
        let points: Vec<(f64, f64)> = values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| (x(i), y(v))))
            .collect();
        let ly = legend_top + 20.0 * n as f64;
        series_marks(&mut svg, color, &points, true, label, ly);
    }
    svg.push_str("</svg>\n");
    svg
}

/// Points of one series of an x–y panel; `line` joins them in order.
pub(crate) struct XySeries {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub line: bool,
}

/// One x–y chart with numeric axes (negative values included) for `xy_panels`.
pub(crate) struct Panel {
    pub title: String,
    pub x_title: String,
    pub y_title: String,
    pub series: Vec<XySeries>,
}

/// The round grid lines (first, step, last) covering `lo..=hi`, with some room when they are equal.
fn axis(lo: f64, hi: f64) -> (f64, f64, f64) {
    let (lo, hi) = if hi - lo > 1e-12 * hi.abs().max(1.0) {
        (lo, hi)
    } else {
        (lo - 0.5 * lo.abs().max(1.0), hi + 0.5 * hi.abs().max(1.0))
    };
    let step = nice_step(hi - lo);
    ((lo / step).floor() * step, step, (hi / step).ceil() * step)
}

/// `v` rounded to 0 when it is within rounding error of it.
fn snap(v: f64, step: f64) -> f64 {
    if v.abs() < step * 1e-9 {
        0.0
    } else {
        v
    }
}

/// Charts with numeric x and y axes, stacked in one SVG: a series is points, joined by a line
/// when it asks; each panel has its legend below it.
pub(crate) fn xy_panels(panels: &[Panel]) -> String {
    let plot_w = W - LEFT - RIGHT;
    let panel_h = |p: &Panel| TOP + PLOT_H + 55.0 + 20.0 * p.series.len() as f64 + 10.0;
    let height: f64 = panels.iter().map(panel_h).sum();
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let mut offset = 0.0;
    for panel in panels {
        let points = || panel.series.iter().flat_map(|s| s.points.iter());
        let finite = |v: &f64| v.is_finite();
        let range = |vs: Vec<f64>| {
            let lo = vs.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = vs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if lo.is_finite() {
                axis(lo, hi)
            } else {
                (0.0, 1.0, 1.0)
            }
        };
        let (x0, xs, x1) = range(points().map(|p| p.0).filter(finite).collect());
        let (y0, ys, y1) = range(points().map(|p| p.1).filter(finite).collect());
        let x = |v: f64| LEFT + plot_w * (v - x0) / (x1 - x0);
        let y = |v: f64| offset + TOP + PLOT_H * (1.0 - (v - y0) / (y1 - y0));
        writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"15\">{}</text>",
            W / 2.0,
            offset + 22.0,
            escape(&panel.title)
        )
        .unwrap();
        let decimals = |step: f64| (-step.log10().floor()).max(0.0) as usize;
        let (xd, yd) = (decimals(xs), decimals(ys));
        let mut i = 0.0;
        while y0 + i * ys <= y1 + ys / 2.0 {
            // Snapped, so that a sum of steps near 0 does not print as −0.
            let v = snap(y0 + i * ys, ys);
            writeln!(
                svg,
                "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{py:.1}\" y2=\"{py:.1}\" stroke=\"#ddd\"/>\
                 <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.yd$}</text>",
                W - RIGHT,
                LEFT - 6.0,
                y(v) + 4.0,
                py = y(v),
            )
            .unwrap();
            i += 1.0;
        }
        let mut i = 0.0;
        while x0 + i * xs <= x1 + xs / 2.0 {
            let v = snap(x0 + i * xs, xs);
            writeln!(
                svg,
                "<line x1=\"{px:.1}\" x2=\"{px:.1}\" y1=\"{}\" y2=\"{}\" stroke=\"#eee\"/>\
                 <text x=\"{px:.1}\" y=\"{}\" text-anchor=\"middle\">{v:.xd$}</text>",
                offset + TOP,
                offset + TOP + PLOT_H,
                offset + TOP + PLOT_H + 18.0,
                px = x(v),
            )
            .unwrap();
            i += 1.0;
        }
        writeln!(
            svg,
            "<line x1=\"{LEFT}\" x2=\"{LEFT}\" y1=\"{}\" y2=\"{b}\" stroke=\"black\"/>\
             <line x1=\"{LEFT}\" x2=\"{}\" y1=\"{b}\" y2=\"{b}\" stroke=\"black\"/>\n\
             <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n\
             <text transform=\"translate(18 {}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
            offset + TOP,
            W - RIGHT,
            LEFT + plot_w / 2.0,
            offset + TOP + PLOT_H + 40.0,
            escape(&panel.x_title),
            offset + TOP + PLOT_H / 2.0,
            escape(&panel.y_title),
            b = offset + TOP + PLOT_H,
        )
        .unwrap();
        let legend_top = offset + TOP + PLOT_H + 55.0;
        for (n, s) in panel.series.iter().enumerate() {
            let color = COLORS[n % COLORS.len()];
            let pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .filter(|(a, b)| a.is_finite() && b.is_finite())
                .map(|&(a, b)| (x(a), y(b)))
                .collect();
            let ly = legend_top + 20.0 * n as f64;
            series_marks(&mut svg, color, &pts, s.line, &s.label, ly);
        }
        offset += panel_h(panel);
    }
    svg.push_str("</svg>\n");
    svg
}

/// A round grid step (1, 2 or 5 × 10^k) giving about five lines up to `max`.
fn nice_step(max: f64) -> f64 {
    let raw = max / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = match raw / magnitude {
        f if f <= 1.0 => 1.0,
        f if f <= 2.0 => 2.0,
        f if f <= 5.0 => 5.0,
        _ => 10.0,
    };
    step * magnitude
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One series in plot coordinates: its line (if `line`), a dot per point, and its legend entry
/// at height `legend_y`.
fn series_marks(
    svg: &mut String,
    color: &str,
    points: &[(f64, f64)],
    line: bool,
    label: &str,
    legend_y: f64,
) {
    if line {
        let path: Vec<String> = points
            .iter()
            .map(|(px, py)| format!("{px:.1},{py:.1}"))
            .collect();
        writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            path.join(" ")
        )
        .unwrap();
    }
    for (px, py) in points {
        writeln!(
            svg,
            "<circle cx=\"{px:.1}\" cy=\"{py:.1}\" r=\"3.5\" fill=\"{color}\"/>"
        )
        .unwrap();
    }
    writeln!(
        svg,
        "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{legend_y}\" y2=\"{legend_y}\" stroke=\"{color}\" stroke-width=\"3\"/>\
         <text x=\"{}\" y=\"{}\">{}</text>",
        LEFT + 24.0,
        LEFT + 32.0,
        legend_y + 4.0,
        escape(label)
    )
    .unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_draw_one_escaped_line_per_series_and_skip_missing_points() {
        let ticks = vec!["1 clients".to_string(), "2 clients".to_string()];
        let lines = vec![
            (
                "{\"decoder\":\"sample\"}".to_string(),
                vec![Some(10.0), Some(30.0)],
            ),
            ("a<b".to_string(), vec![None, Some(5.0)]),
        ];
        let svg = chart("t", "x", "ms", &ticks, &lines);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 3);
        assert!(svg.contains("{&quot;decoder&quot;:&quot;sample&quot;}"));
        assert!(svg.contains("a&lt;b"));
    }

    #[test]
    fn xy_panels_stack_charts_with_negative_ranges() {
        let panel = |line| Panel {
            title: "t".into(),
            x_title: "x".into(),
            y_title: "y".into(),
            series: vec![XySeries {
                label: "s<1>".into(),
                points: vec![(-1.0, -3.0), (0.5, 2.0), (4.0, f64::NAN)],
                line,
            }],
        };
        let svg = xy_panels(&[panel(true), panel(false)]);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<polyline").count(), 1);
        // The NaN point is left out.
        assert_eq!(svg.matches("<circle").count(), 4);
        assert!(svg.contains("s&lt;1&gt;"));
        assert_eq!(axis(-3.0, 2.0), (-3.0, 1.0, 2.0));
        let (lo, _, hi) = axis(5.0, 5.0);
        assert!(lo < 5.0 && hi > 5.0);
    }

    #[test]
    fn grid_steps_are_round() {
        for (max, step) in [
            (100.0, 20.0),
            (7.0, 2.0),
            (0.3, 0.1),
            (2600.0, 1000.0),
            (4.5, 1.0),
        ] {
            assert!((nice_step(max) - step).abs() < 1e-9 * step, "{max}");
        }
    }
}
