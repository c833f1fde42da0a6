//! Causal attention of a ragged batch's new rows against their sequences' caches. Every
//! (row, head) pair is one task, and a layer's tasks of all items run in one pass over candle's
//! pool. A task sweeps its visible positions three times: scores q·k, an in-place softmax, and
//! the weighted sum of values. With AVX2 the two dot-product sweeps use explicit vectors: scores
//! eight positions at a time with one transposing reduction, values with one accumulator per
//! eight dimensions. The plain loops they replace were latency-bound, each score a serial chain
//! of adds and a serial horizontal sum; attention took a quarter of a batched decode step.

use std::ops::Range;

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::config::LlamaConfig;
use super::quant::SharedOut;
use crate::math;

/// One item's part of a layer's attention: its query rows in the batch, the position of the first,
/// and its keys/values (`[position][kv_head][head_dim]`, through its last row).
pub(super) struct Span<'c> {
    pub rows: Range<usize>,
    pub start: usize,
    pub keys: &'c [f16],
    pub values: &'c [f16],
}

/// Multiply-adds below which attention runs on the calling thread (measured: the base model's
/// attention at a few hundred positions still gains from the pool; a tiny ARM's does not).
const SMALL_ATTENTION: usize = 1 << 16;

/// Causal attention of every row of `qkv` (each `width` wide, queries first) against its item's
/// cache. Writes rows of `n_heads × head_dim` into `out`.
pub(super) fn attention(
    cfg: &LlamaConfig,
    qkv: &[f32],
    width: usize,
    spans: &[Span],
    out: &mut [f32],
) {
    let (h, hd, group) = (cfg.n_heads, cfg.head_dim, cfg.group());
    let kvw = cfg.n_kv_heads * hd;
    let n = qkv.len() / width;
    let span_of: Vec<&Span> = spans
        .iter()
        .flat_map(|s| s.rows.clone().map(move |_| s))
        .collect();
    let visible = |r: usize| span_of[r].start + (r - span_of[r].rows.start) + 1;
    let scale = 1.0 / (hd as f32).sqrt();
    let out_ptr = SharedOut(out.as_mut_ptr());
    let task = |i: usize, scores: &mut Vec<f32>| {
        let (r, head) = (i / h, i % h);
        let s = span_of[r];
        let q = &qkv[r * width + head * hd..r * width + (head + 1) * hd];
        let kv_off = (head / group) * hd;
        let head_kv = Head {
            keys: &s.keys[kv_off..],
            values: &s.values[kv_off..],
            stride: kvw,
            visible: visible(r),
        };
        // SAFETY: task `i` alone writes the `hd` values at offset `i * hd` (row r, head `head`).
        let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(i * hd), hd) };
        head_kv.attend(q, scale, scores, o);
    };
    // A fork-join costs more than a small call (a tiny ARM, a short context): those run on the
    // calling thread.
    let macs = (0..n).map(visible).sum::<usize>() * h * hd * 2;
    let run = |range: std::ops::Range<usize>| {
        let mut scores = Vec::new();
        range.for_each(|i| task(i, &mut scores))
    };
    if macs < SMALL_ATTENTION {
        run(0..n * h);
    } else {
        super::pool::split(n * h, run);
    }
}

/// One KV head's cache as a query sees it: position p's key is `keys[p·stride..][..head_dim]`.
struct Head<'c> {
    keys: &'c [f16],
    values: &'c [f16],
    stride: usize,
    visible: usize,
}

impl Head<'_> {
    /// o = softmax(scale · q·Kᵀ) · V over the visible positions.
    fn attend(&self, q: &[f32], scale: f32, scores: &mut Vec<f32>, o: &mut [f32]) {
        let hd = q.len();
        let last = (self.visible - 1) * self.stride + hd;
        assert!(self.keys.len() >= last && self.values.len() >= last && o.len() == hd);
        scores.clear();
        scores.resize(self.visible, 0.0);
        #[cfg(all(target_feature = "avx2", target_feature = "fma"))]
        // SAFETY: AVX2/FMA are enabled for the whole crate; the assert above bounds every read.
        unsafe {
            match hd {
                32 => return self.attend_simd::<4>(q, scale, scores, o),
                64 => return self.attend_simd::<8>(q, scale, scores, o),
                96 => return self.attend_simd::<12>(q, scale, scores, o),
                128 => return self.attend_simd::<16>(q, scale, scores, o),
                _ => {}
            }
        }
        let mut k = vec![0f32; hd];
        for (p, s) in scores.iter_mut().enumerate() {
            self.keys[p * self.stride..p * self.stride + hd].convert_to_f32_slice(&mut k);
            *s = super::llama::dot(q, &k) * scale;
        }
        let max = math::max(scores);
        let inv = 1.0 / math::exp_in_place(scores, max, 1.0);
        o.fill(0.0);
        for (p, &w) in scores.iter().enumerate() {
            let v = &self.values[p * self.stride..p * self.stride + hd];
            for (o, v) in o.iter_mut().zip(v) {
                *o += w * inv * v.to_f32();
            }
        }
    }

    /// `attend` for a head of `8·CH` dimensions.
    #[cfg(all(target_feature = "avx2", target_feature = "fma"))]
    #[inline(always)]
    unsafe fn attend_simd<const CH: usize>(
        &self,
        q: &[f32],
        scale: f32,
        scores: &mut [f32],
        o: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        // Eight cached f16 values as f32.
        let load = |p: *const f16, c: usize| _mm256_cvtph_ps(_mm_loadu_si128(p.add(8 * c).cast()));
        let qv: [__m256; CH] = std::array::from_fn(|c| _mm256_loadu_ps(q.as_ptr().add(8 * c)));
        // One accumulator per position, its lanes partial sums over the dimensions.
        let dot = |p: usize| {
            let k = self.keys.as_ptr().add(p * self.stride);
            (1..CH).fold(_mm256_mul_ps(qv[0], load(k, 0)), |a, c| {
                _mm256_fmadd_ps(qv[c], load(k, c), a)
            })
        };
        let scale_v = _mm256_set1_ps(scale);
        let mut p = 0;
        // The cache was evicted by the weights streamed since the last layer: ask for the keys
        // (and below, the values) a block of positions ahead.
        let ahead = |base: *const f16, p: usize| {
            let at = base.wrapping_add(p * self.stride) as *const i8;
            for line in 0..(CH * 16).div_ceil(64) {
                _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(64 * line));
            }
        };
        while p + 8 <= self.visible {
            for j in 0..8 {
                ahead(self.keys.as_ptr(), p + 16 + j);
            }
            let acc: [__m256; 8] = std::array::from_fn(|j| dot(p + j));
            // Lane j of the result: the sum of acc[j]'s lanes.
            let pair = |a, b| _mm256_hadd_ps(a, b);
            let u0 = pair(pair(acc[0], acc[1]), pair(acc[2], acc[3]));
            let u1 = pair(pair(acc[4], acc[5]), pair(acc[6], acc[7]));
            let s = _mm256_add_ps(
                _mm256_permute2f128_ps(u0, u1, 0x20),
                _mm256_permute2f128_ps(u0, u1, 0x31),
            );
            _mm256_storeu_ps(scores.as_mut_ptr().add(p), _mm256_mul_ps(s, scale_v));
            p += 8;
        }
        for (p, s) in scores.iter_mut().enumerate().skip(p) {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), dot(p));
            *s = lanes.iter().sum::<f32>() * scale;
        }
        let max = math::max(scores);
        let inv = 1.0 / math::exp_in_place(scores, max, 1.0);
        let mut acc = [_mm256_setzero_ps(); CH];
        for (p, &w) in scores.iter().enumerate() {
            ahead(self.values.as_ptr(), p + 16);
            let (w, v) = (_mm256_set1_ps(w), self.values.as_ptr().add(p * self.stride));
            for (c, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(w, load(v, c), *a);
            }
        }
        for (c, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(
                o.as_mut_ptr().add(8 * c),
                _mm256_mul_ps(*a, _mm256_set1_ps(inv)),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector path (head sizes 32, 64, 128) and the plain one (80) against an f64 reference.
    #[test]
    fn matches_a_plain_reference() {
        for (hd, visible, stride) in [
            (64, 1, 192),
            (64, 13, 192),
            (128, 21, 256),
            (32, 9, 64),
            (80, 9, 80),
        ] {
            let val = |i: usize| ((i * 7919 % 1009) as f32 / 1009.0 - 0.5) * 2.0;
            let keys: Vec<f16> = (0..visible * stride)
                .map(|i| f16::from_f32(val(i)))
                .collect();
            let values: Vec<f16> = (0..visible * stride)
                .map(|i| f16::from_f32(val(i + 5)))
                .collect();
            let q: Vec<f32> = (0..hd).map(|i| val(i + 11) * 3.0).collect();
            let head = Head {
                keys: &keys,
                values: &values,
                stride,
                visible,
            };
            let mut o = vec![0f32; hd];
            head.attend(&q, 0.125, &mut Vec::new(), &mut o);
            let s: Vec<f64> = (0..visible)
                .map(|p| {
                    (0..hd)
                        .map(|d| (q[d] * keys[p * stride + d].to_f32()) as f64)
                        .sum::<f64>()
                        * 0.125
                })
                .collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = w.iter().sum();
            for d in 0..hd {
                let want: f64 = (0..visible)
                    .map(|p| w[p] / z * values[p * stride + d].to_f32() as f64)
                    .sum();
                assert!(
                    (o[d] as f64 - want).abs() < 1e-5,
                    "hd {hd} visible {visible} dim {d}"
                );
            }
        }
    }
}
