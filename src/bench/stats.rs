//! Statistics for `tilt bench`: percentiles, per-run summaries (throughput, goodput, latency
//! distributions) and the least-squares fit behind the idealised runtime.

use std::collections::BTreeMap;

use serde::Serialize;

use super::Sample;

/// The `p`-th percentile (0..=100) of ascending `sorted` values by linear interpolation between
/// closest ranks (numpy's default, Hyndman–Fan type 7): rank h = (n − 1)·p/100, value =
/// x[⌊h⌋] + (h − ⌊h⌋)·(x[⌊h⌋+1] − x[⌊h⌋]). `None` when there are no values.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let h = last as f64 * p.clamp(0.0, 100.0) / 100.0;
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(last);
    Some(sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo]))
}

/// Mean, median, p90 and p99 (see [`percentile`]), min and max of a metric in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Distribution {
    pub count: usize,
    pub mean: f64,
    pub median: f64,
    pub p90: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
}

impl Distribution {
    /// `None` for no values (the metric is then `null` in the report).
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Self> {
        let mut v: Vec<f64> = values.into_iter().collect();
        v.sort_by(f64::total_cmp);
        let q = |p| percentile(&v, p);
        Some(Self {
            count: v.len(),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            median: q(50.0)?,
            p90: q(90.0)?,
            p99: q(99.0)?,
            min: *v.first()?,
            max: *v.last()?,
        })
    }
}

/// Events per second; 0 for an empty interval rather than infinity.
pub fn throughput(count: f64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count / seconds
    } else {
        0.0
    }
}

/// Service-level objectives a successful request must meet to count towards goodput.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Slo {
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
}

impl Slo {
    pub fn is_set(&self) -> bool {
        self.ttft_ms.is_some() || self.tpot_ms.is_some()
    }

    /// A successful sample within every objective set. A missing value cannot miss: a one-token
    /// answer has no TPOT.
    pub fn met_by(&self, s: &Sample) -> bool {
        let within = |limit: Option<f64>, value: Option<f64>| match (limit, value) {
            (Some(limit), Some(value)) => value <= limit,
            _ => true,
        };
        s.ok && within(self.ttft_ms, s.ttft_ms) && within(self.tpot_ms, s.tpot_ms)
    }
}

/// One run's results. Latencies and token counts cover successful requests only; failures are
/// counted, never averaged in as fast answers.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub requests: usize,
    pub completed: usize,
    pub failed: usize,
    /// From the first request sent to the last one finished.
    pub duration_s: f64,
    /// Completed requests per second.
    pub request_throughput: f64,
    /// Output tokens of completed requests per second.
    pub output_throughput: f64,
    /// Prompt and output tokens of completed requests per second.
    pub total_token_throughput: f64,
    /// Completed requests within the SLOs per second; `null` when no SLO was given.
    pub goodput: Option<f64>,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    /// Completed requests whose server sent no usage, so their output tokens are stream chunks.
    pub outputs_counted_from_chunks: usize,
    /// Failures by HTTP status ("none" when no response arrived).
    pub errors_by_status: BTreeMap<String, usize>,
    /// Failures by kind (`http_status`, `incomplete_stream`, `stream_error`, ...).
    pub errors_by_kind: BTreeMap<String, usize>,
    pub ttft_ms: Option<Distribution>,
    pub tpot_ms: Option<Distribution>,
    /// Gaps between consecutive streamed chunks, pooled over requests.
    pub itl_ms: Option<Distribution>,
    pub e2el_ms: Option<Distribution>,
}

impl Summary {
    pub fn of(samples: &[Sample], duration_s: f64, slo: Slo) -> Self {
        let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok).collect();
        let prompt_tokens: u64 = ok.iter().filter_map(|s| s.prompt_tokens).sum();
        let output_tokens: u64 = ok.iter().map(|s| s.output_tokens).sum();
        let mut errors_by_status = BTreeMap::new();
        let mut errors_by_kind = BTreeMap::new();
        for s in samples.iter().filter(|s| !s.ok) {
            let status = s.status.map_or("none".into(), |c| c.to_string());
            *errors_by_status.entry(status).or_insert(0) += 1;
            let kind = s.error.map_or("unknown", |k| k.as_str());
            *errors_by_kind.entry(kind.to_string()).or_insert(0) += 1;
        }
        Self {
            requests: samples.len(),
            completed: ok.len(),
            failed: samples.len() - ok.len(),
            duration_s,
            request_throughput: throughput(ok.len() as f64, duration_s),
            output_throughput: throughput(output_tokens as f64, duration_s),
            total_token_throughput: throughput((prompt_tokens + output_tokens) as f64, duration_s),
            goodput: slo.is_set().then(|| {
                let good = ok.iter().filter(|s| slo.met_by(s)).count();
                throughput(good as f64, duration_s)
            }),
            prompt_tokens,
            output_tokens,
            outputs_counted_from_chunks: ok.iter().filter(|s| !s.tokens_from_usage).count(),
            errors_by_status,
            errors_by_kind,
            ttft_ms: Distribution::of(ok.iter().filter_map(|s| s.ttft_ms)),
            tpot_ms: Distribution::of(ok.iter().filter_map(|s| s.tpot_ms)),
            itl_ms: Distribution::of(ok.iter().flat_map(|s| s.itl_ms.iter().copied())),
            e2el_ms: Distribution::of(ok.iter().map(|s| s.e2el_ms)),
        }
    }
}

/// The request of `--long-prompt-tokens` and the other streams' inter-token gaps around it.
#[derive(Debug, Clone, Serialize)]
pub struct LongPrompt {
    /// From its arrival to its first token: its prefill (and its wait, if it queued).
    pub prefill_ms: Option<f64>,
    /// Gaps of the other requests that overlap its prefill.
    pub itl_during_ms: Option<Distribution>,
    /// Their other gaps.
    pub itl_without_ms: Option<Distribution>,
    /// p99 of the gaps during its prefill over the median of the others.
    pub p99_during_over_median_without: Option<f64>,
    pub sample: Sample,
}

impl LongPrompt {
    pub fn of(long: Sample, samples: &[Sample]) -> Self {
        let prefill = long.ttft_ms.map(|t| (long.start_ms, long.start_ms + t));
        let (mut during, mut without) = (Vec::new(), Vec::new());
        for s in samples.iter().filter(|s| s.ok) {
            let Some(ttft) = s.ttft_ms else { continue };
            let mut at = s.start_ms + ttft;
            for &gap in &s.itl_ms {
                match prefill {
                    Some((from, to)) if at + gap >= from && at <= to => during.push(gap),
                    _ => without.push(gap),
                }
                at += gap;
            }
        }
        let itl_during_ms = Distribution::of(during);
        let itl_without_ms = Distribution::of(without);
        let p99_during_over_median_without = match (&itl_during_ms, &itl_without_ms) {
            (Some(d), Some(w)) if w.median > 0.0 => Some(d.p99 / w.median),
            _ => None,
        };
        Self {
            prefill_ms: long.ttft_ms,
            itl_during_ms,
            itl_without_ms,
            p99_during_over_median_without,
            sample: long,
        }
    }
}

/// y ≈ intercept + Σ slopes[j]·x[j], by ordinary least squares.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearFit {
    pub intercept: f64,
    pub slopes: Vec<f64>,
    /// Coefficient of determination, 1 − SS_res / SS_tot (1 when y does not vary).
    pub r2: f64,
}

/// Least squares over rows of predictors `xs` and responses `ys`. Columns are centred first, so
/// the intercept drops out and the normal equations stay well conditioned; they are solved by
/// Gaussian elimination with partial pivoting. `None` when there are fewer rows than unknowns or
/// the predictors are collinear (for instance one never varies).
pub fn least_squares(xs: &[Vec<f64>], ys: &[f64]) -> Option<LinearFit> {
    let n = xs.len();
    let k = xs.first()?.len();
    if n != ys.len() || n <= k || xs.iter().any(|r| r.len() != k) {
        return None;
    }
    let x_mean: Vec<f64> = (0..k)
        .map(|j| xs.iter().map(|r| r[j]).sum::<f64>() / n as f64)
        .collect();
    let y_mean = ys.iter().sum::<f64>() / n as f64;
    // Augmented normal equations [XᵀX | Xᵀy] on centred data.
    let mut a = vec![vec![0.0; k + 1]; k];
    for (row, &y) in xs.iter().zip(ys) {
        for p in 0..k {
            let xp = row[p] - x_mean[p];
            for q in 0..k {
                a[p][q] += xp * (row[q] - x_mean[q]);
            }
            a[p][k] += xp * (y - y_mean);
        }
    }
    // Pivots this small relative to the largest variance mean a predictor is (nearly) a
    // combination of the others.
    let tiny = 1e-12 * (0..k).map(|j| a[j][j]).fold(0.0, f64::max);
    for col in 0..k {
        let pivot = (col..k).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() <= tiny {
            return None;
        }
        a.swap(col, pivot);
        let (done, rest) = a.split_at_mut(col + 1);
        let pivot_row = &done[col];
        for row in rest {
            let f = row[col] / pivot_row[col];
            for (x, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= f * p;
            }
        }
    }
    let mut slopes = vec![0.0; k];
    for r in (0..k).rev() {
        let tail: f64 = ((r + 1)..k).map(|c| a[r][c] * slopes[c]).sum();
        slopes[r] = (a[r][k] - tail) / a[r][r];
    }
    let intercept = y_mean - slopes.iter().zip(&x_mean).map(|(b, m)| b * m).sum::<f64>();
    let predict = |row: &[f64]| intercept + slopes.iter().zip(row).map(|(b, x)| b * x).sum::<f64>();
    let ss_res: f64 = xs
        .iter()
        .zip(ys)
        .map(|(r, y)| (y - predict(r)).powi(2))
        .sum();
    let ss_tot: f64 = ys.iter().map(|y| (y - y_mean).powi(2)).sum();
    let r2 = if ss_tot > 0.0 {
        1.0 - ss_res / ss_tot
    } else {
        1.0
    };
    Some(LinearFit {
        intercept,
        slopes,
        r2,
    })
}

/// The idealised runtime (Narayanan et al.): end-to-end latency of requests served one at a time
/// ≈ a + b·prompt_tokens + c·output_tokens.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuntimeFit {
    pub intercept_ms: f64,
    pub ms_per_prompt_token: f64,
    pub ms_per_output_token: f64,
    pub r2: f64,
    /// Successful requests with a known prompt length that the fit used.
    pub samples: usize,
}

impl RuntimeFit {
    /// `None` when the lengths do not vary enough to determine the coefficients.
    pub fn of<'a>(samples: impl IntoIterator<Item = &'a Sample>) -> Option<Self> {
        let (xs, ys): (Vec<Vec<f64>>, Vec<f64>) = samples
            .into_iter()
            .filter(|s| s.ok)
            .filter_map(|s| {
                let prompt = s.prompt_tokens? as f64;
                Some((vec![prompt, s.output_tokens as f64], s.e2el_ms))
            })
            .unzip();
        let fit = least_squares(&xs, &ys)?;
        Some(Self {
            intercept_ms: fit.intercept,
            ms_per_prompt_token: fit.slopes[0],
            ms_per_output_token: fit.slopes[1],
            r2: fit.r2,
            samples: ys.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::bench::Failure;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn percentiles_interpolate_linearly() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 100.0), Some(4.0));
        assert_eq!(percentile(&v, 50.0), Some(2.5));
        // h = 3·0.9 = 2.7 → 3 + 0.7·(4 − 3).
        assert!(close(percentile(&v, 90.0).unwrap(), 3.7, 1e-12));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
        // 1..=101: the p-th percentile is exactly 1 + p.
        let w: Vec<f64> = (1..=101).map(f64::from).collect();
        assert!(close(percentile(&w, 99.0).unwrap(), 100.0, 1e-9));
        assert!(close(percentile(&w, 37.5).unwrap(), 38.5, 1e-9));
    }

    #[test]
    fn distribution_sorts_and_summarises() {
        let d = Distribution::of([4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(d.count, 4);
        assert_eq!(d.mean, 2.5);
        assert_eq!(d.median, 2.5);
        assert!(close(d.p90, 3.7, 1e-12));
        assert!(close(d.p99, 3.97, 1e-12));
        assert_eq!((d.min, d.max), (1.0, 4.0));
        assert_eq!(Distribution::of([]), None);
    }

    fn ok_sample(ttft: f64, tpot: Option<f64>, prompt: u64, output: u64) -> Sample {
        Sample {
            ok: true,
            ttft_ms: Some(ttft),
            tpot_ms: tpot,
            e2el_ms: ttft + tpot.unwrap_or(0.0) * (output - 1) as f64,
            itl_ms: vec![tpot.unwrap_or(0.0); output as usize - 1],
            prompt_tokens: Some(prompt),
            output_tokens: output,
            tokens_from_usage: true,
            ..Sample::default()
        }
    }

    fn failed(status: Option<u16>, kind: Failure) -> Sample {
        Sample {
            status,
            error: Some(kind),
            ..Sample::default()
        }
    }

    #[test]
    fn summary_counts_failures_apart_and_computes_throughput_and_goodput() {
        let samples = vec![
            ok_sample(100.0, Some(10.0), 50, 11),
            ok_sample(300.0, Some(10.0), 50, 11),
            ok_sample(100.0, Some(30.0), 50, 11),
            ok_sample(100.0, None, 50, 1),
            failed(Some(500), Failure::HttpStatus),
            failed(Some(500), Failure::HttpStatus),
            failed(Some(200), Failure::IncompleteStream),
            failed(None, Failure::Connection),
        ];
        let slo = Slo {
            ttft_ms: Some(200.0),
            tpot_ms: Some(20.0),
        };
        let s = Summary::of(&samples, 2.0, slo);
        assert_eq!((s.requests, s.completed, s.failed), (8, 4, 4));
        assert_eq!(s.request_throughput, 2.0);
        assert_eq!(s.output_tokens, 34);
        assert_eq!(s.output_throughput, 17.0);
        assert_eq!(s.total_token_throughput, (200.0 + 34.0) / 2.0);
        // Within both: the first and the one-token answer; the second misses TTFT, the third TPOT.
        assert_eq!(s.goodput, Some(1.0));
        assert_eq!(s.errors_by_status["500"], 2);
        assert_eq!(s.errors_by_status["200"], 1);
        assert_eq!(s.errors_by_status["none"], 1);
        assert_eq!(s.errors_by_kind["http_status"], 2);
        assert_eq!(s.errors_by_kind["incomplete_stream"], 1);
        // Failures contribute no latency: the fastest TTFT is a real answer's.
        let ttft = s.ttft_ms.unwrap();
        assert_eq!((ttft.count, ttft.min, ttft.max), (4, 100.0, 300.0));
        assert_eq!(s.itl_ms.unwrap().count, 30);
        assert_eq!(Summary::of(&samples, 2.0, Slo::default()).goodput, None);
    }

    #[test]
    fn a_long_prompts_prefill_splits_the_other_streams_gaps() {
        // A stream with gaps of 10 ms from 100 ms, its tokens at 100, 110, ..., 200; one gap
        // of 40 ms (140 → 180) while the long prompt prefills from 150 to 175.
        let mut stream = ok_sample(100.0, Some(10.0), 5, 8);
        stream.itl_ms = vec![10.0, 10.0, 10.0, 10.0, 40.0, 10.0, 10.0];
        let long = Sample {
            start_ms: 150.0,
            ..ok_sample(25.0, None, 4000, 1)
        };
        let failed_stream = failed(Some(500), Failure::HttpStatus);
        let l = LongPrompt::of(long, &[stream, failed_stream]);
        assert_eq!(l.prefill_ms, Some(25.0));
        let (during, without) = (l.itl_during_ms.unwrap(), l.itl_without_ms.unwrap());
        assert_eq!((during.count, during.max), (1, 40.0));
        assert_eq!((without.count, without.median), (6, 10.0));
        assert_eq!(l.p99_during_over_median_without, Some(4.0));
        // A long prompt that failed has no prefill: every gap is without it.
        let l = LongPrompt::of(
            failed(None, Failure::Connection),
            &[ok_sample(1.0, Some(2.0), 1, 4)],
        );
        assert!(l.prefill_ms.is_none() && l.itl_during_ms.is_none());
        assert_eq!(l.itl_without_ms.unwrap().count, 3);
    }

    #[test]
    fn summary_of_only_failures_has_no_latency_and_zero_throughput() {
        let s = Summary::of(
            &[failed(Some(503), Failure::HttpStatus)],
            0.5,
            Slo::default(),
        );
        assert_eq!((s.completed, s.failed), (0, 1));
        assert_eq!(s.request_throughput, 0.0);
        assert!(s.ttft_ms.is_none() && s.e2el_ms.is_none());
        assert_eq!(throughput(10.0, 0.0), 0.0);
    }

    #[test]
    fn least_squares_recovers_exact_coefficients() {
        let mut xs = Vec::new();
        let mut ys = Vec::new();
        for p in [32.0, 128.0, 512.0] {
            for o in [16.0, 64.0, 128.0] {
                xs.push(vec![p, o]);
                ys.push(40.0 + 2.5 * p + 21.0 * o);
            }
        }
        let fit = least_squares(&xs, &ys).unwrap();
        assert!(close(fit.intercept, 40.0, 1e-8), "{fit:?}");
        assert!(close(fit.slopes[0], 2.5, 1e-10), "{fit:?}");
        assert!(close(fit.slopes[1], 21.0, 1e-10), "{fit:?}");
        assert!(close(fit.r2, 1.0, 1e-12));
    }

    #[test]
    fn least_squares_recovers_coefficients_from_noisy_data() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut xs = Vec::new();
        let mut ys = Vec::new();
        for _ in 0..400 {
            let (p, o) = (rng.random_range(16.0..1024.0), rng.random_range(8.0..256.0));
            let noise = rng.random_range(-50.0..50.0);
            xs.push(vec![p, o]);
            ys.push(120.0 + 1.5 * p + 25.0 * o + noise);
        }
        let fit = least_squares(&xs, &ys).unwrap();
        assert!(close(fit.intercept, 120.0, 15.0), "{fit:?}");
        assert!(close(fit.slopes[0], 1.5, 0.02), "{fit:?}");
        assert!(close(fit.slopes[1], 25.0, 0.1), "{fit:?}");
        assert!(fit.r2 > 0.99 && fit.r2 < 1.0, "{fit:?}");
    }

    #[test]
    fn runtime_fit_uses_successful_samples_only() {
        let mut samples = Vec::new();
        for (p, o) in [(32, 16), (32, 128), (512, 16), (512, 128), (128, 64)] {
            samples.push(Sample {
                ok: true,
                prompt_tokens: Some(p),
                output_tokens: o,
                e2el_ms: 30.0 + 0.5 * p as f64 + 20.0 * o as f64,
                ..Sample::default()
            });
        }
        // A fast failure would drag every coefficient down if it counted.
        samples.push(Sample {
            prompt_tokens: Some(512),
            output_tokens: 0,
            e2el_ms: 1.0,
            ..failed(Some(500), Failure::HttpStatus)
        });
        let fit = RuntimeFit::of(&samples).unwrap();
        assert_eq!(fit.samples, 5);
        assert!(close(fit.intercept_ms, 30.0, 1e-8), "{fit:?}");
        assert!(close(fit.ms_per_prompt_token, 0.5, 1e-10), "{fit:?}");
        assert!(close(fit.ms_per_output_token, 20.0, 1e-10), "{fit:?}");
        assert_eq!(RuntimeFit::of(&samples[..2]), None);
    }

    #[test]
    fn least_squares_refuses_underdetermined_or_collinear_data() {
        // Prompt length never varies: its slope is not identifiable.
        let xs: Vec<Vec<f64>> = [16.0, 64.0, 128.0]
            .iter()
            .map(|&o| vec![128.0, o])
            .collect();
        assert_eq!(least_squares(&xs, &[1.0, 2.0, 3.0]), None);
        assert_eq!(least_squares(&[vec![1.0, 2.0]], &[1.0]), None);
        assert_eq!(least_squares(&[], &[]), None);
    }
}
