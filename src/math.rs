//! Vector-friendly float helpers for the hot loops over a vocabulary row or an attention span:
//! an inlined, branch-free `exp` that the compiler vectorises (libm's `expf` is a scalar call
//! per value), and reductions with independent lanes (a plain `iter().sum()` is one serial chain
//! of adds, since float addition is not reassociated for us).

/// Lanes of the reductions: two AVX-512 or four AVX2 vectors of partial results.
const LANES: usize = 32;

/// e^x within 2 ulp (Cephes' `expf` polynomial on x − n·ln2, then 2^n in the exponent bits);
/// exactly 0 below −87.33 (so e^−∞ = 0) and for NaN, +∞ above 88.72.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding it rounds to an integer (ties to even) held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    // `max`/`min` clamp NaN into range too (`clamp` keeps it).
    #[allow(clippy::manual_clamp)]
    let c = x.max(-87.5).min(88.72);
    let t = c * LOG2E + ROUND;
    let n = t - ROUND;
    let r = c - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // n in [−127, 128] from t's bits; 2^n as two factors so both ends stay representable.
    let n = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let half = n >> 1;
    let pow = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    let v = e * pow(half) * pow(n - half);
    let v = if x.is_nan() || x < -87.33 { 0.0 } else { v };
    if x > 88.72 {
        f32::INFINITY
    } else {
        v
    }
}

/// Folds `x` with `f` over `LANES` independent accumulators starting at `init`, then folds the
/// lanes and the tail with `g`.
#[inline(always)]
fn lanes(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32, g: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(init, |a, &v| f(a, v));
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = f(*a, v);
        }
    }
    acc.iter().fold(tail, |a, &v| g(a, v))
}

/// Dot product with eight independent accumulators, so the compiler vectorises it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// 1/√(mean(x²) + eps): what RMS norm scales a row by (before its weights).
pub fn inv_rms(x: &[f32], eps: f32) -> f32 {
    1.0 / (dot(x, x) / x.len() as f32 + eps).sqrt()
}

/// Largest value (−∞ for an empty slice; NaN are skipped).
pub fn max(x: &[f32]) -> f32 {
    #[cfg(target_feature = "avx512f")]
    // SAFETY: AVX-512F is enabled for the whole crate.
    unsafe {
        wide::max(x)
    }
    #[cfg(not(target_feature = "avx512f"))]
    lanes(x, f32::NEG_INFINITY, f32::max, f32::max)
}

pub fn sum(x: &[f32]) -> f32 {
    lanes(x, 0.0, |a, v| a + v, |a, v| a + v)
}

/// Σ e^((x − shift)·scale).
pub fn sum_exp(x: &[f32], shift: f32, scale: f32) -> f32 {
    #[cfg(target_feature = "avx512f")]
    // SAFETY: AVX-512F is enabled for the whole crate.
    unsafe {
        wide::sum_exp(x, shift, scale)
    }
    #[cfg(not(target_feature = "avx512f"))]
    lanes(x, 0.0, |a, v| a + exp((v - shift) * scale), |a, v| a + v)
}

/// x ← e^((x − shift)·scale) in place; returns the sum of the new values.
pub fn exp_in_place(x: &mut [f32], shift: f32, scale: f32) -> f32 {
    #[cfg(target_feature = "avx512f")]
    // SAFETY: AVX-512F is enabled for the whole crate.
    unsafe {
        wide::exp_in_place(x, shift, scale)
    }
    #[cfg(not(target_feature = "avx512f"))]
    {
        for v in x.iter_mut() {
            *v = exp((*v - shift) * scale);
        }
        sum(x)
    }
}

/// SwiGLU's gate: out = silu(g)·u = g·u / (1 + e^−g), elementwise.
pub fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
    assert!(g.len() == u.len() && g.len() == out.len());
    #[cfg(target_feature = "avx512f")]
    // SAFETY: AVX-512F is enabled for the whole crate; the lengths are checked above.
    unsafe {
        wide::silu_mul(g, u, out)
    }
    #[cfg(not(target_feature = "avx512f"))]
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
        *o = g / (1.0 + exp(-g)) * u;
    }
}

/// (Σu, Σu·x, Σu·x²) for u = e^(t − m) and x = t − b: the normaliser of scores `t` and the
/// first two moments of their difference to `b`, in one pass (GenARM's KL and its slope in the
/// tilt's scale). Pairs with u = 0 are skipped: there t − b may be −∞ or NaN (a token the tilt
/// excludes).
pub fn tilt_moments(t: &[f32], b: &[f32], m: f32) -> (f32, f32, f32) {
    assert_eq!(t.len(), b.len());
    #[cfg(target_feature = "avx512f")]
    // SAFETY: AVX-512F is enabled for the whole crate; the lengths are checked above.
    unsafe {
        wide::tilt_moments(t, b, m)
    }
    #[cfg(not(target_feature = "avx512f"))]
    {
        const L: usize = 16;
        let (mut total, mut first, mut second) = ([0f32; L], [0f32; L], [0f32; L]);
        let mut add = |i: usize, t: f32, b: f32| {
            let u = exp(t - m);
            if u > 0.0 {
                let ux = u * (t - b);
                total[i % L] += u;
                first[i % L] += ux;
                second[i % L] += ux * (t - b);
            }
        };
        for (i, (&t, &b)) in t.iter().zip(b).enumerate() {
            add(i, t, b);
        }
        let sum = |a: [f32; L]| a.iter().sum();
        (sum(total), sum(first), sum(second))
    }
}

/// Sixteen exps per instruction sequence (the compiler's own vectors stop at 256 bits here).
#[cfg(target_feature = "avx512f")]
mod wide {
    use std::arch::x86_64::*;

    /// `super::exp` on sixteen lanes; `vscalefps` applies 2^n, saturating to +∞, so the clamp
    /// only keeps the polynomial's argument small.
    #[inline(always)]
    unsafe fn exp16(x: __m512) -> __m512 {
        let set = _mm512_set1_ps;
        // `max` returns its second operand for NaN, so NaN maps to e^−104, then to 0.
        let c = _mm512_min_ps(_mm512_max_ps(x, set(-104.0)), set(89.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(c, set(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, set(0.693_359_4), c);
        let r = _mm512_fnmadd_ps(n, set(-2.121_944_4e-4), r);
        let mut p = set(1.987_569_1e-4);
        for k in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = _mm512_fmadd_ps(p, r, set(k));
        }
        let e = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, set(1.0)));
        // Zero below −87.33 like the scalar `exp` (rather than subnormals).
        let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, set(-87.33));
        _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(e, n))
    }

    #[inline(always)]
    unsafe fn arg(p: *const f32, shift: __m512, scale: __m512) -> __m512 {
        _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(p), shift), scale)
    }

    pub unsafe fn sum_exp(x: &[f32], shift: f32, scale: f32) -> f32 {
        let (sh, sc) = (_mm512_set1_ps(shift), _mm512_set1_ps(scale));
        let chunks = x.chunks_exact(32);
        let tail: f32 = chunks
            .remainder()
            .iter()
            .map(|&v| super::exp((v - shift) * scale))
            .sum();
        let mut acc = [_mm512_setzero_ps(); 2];
        for c in chunks {
            acc[0] = _mm512_add_ps(acc[0], exp16(arg(c.as_ptr(), sh, sc)));
            acc[1] = _mm512_add_ps(acc[1], exp16(arg(c.as_ptr().add(16), sh, sc)));
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1])) + tail
    }

    pub unsafe fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
        let whole = g.len() / 16 * 16;
        let one = _mm512_set1_ps(1.0);
        for i in (0..whole).step_by(16) {
            let gv = _mm512_loadu_ps(g.as_ptr().add(i));
            let gu = _mm512_mul_ps(gv, _mm512_loadu_ps(u.as_ptr().add(i)));
            // e^−g capped at e^80: the Newton step below needs a finite d (silu is ~0 there).
            let neg = _mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv), _mm512_set1_ps(80.0));
            let d = _mm512_add_ps(one, exp16(neg));
            // 1/d by `vrcp14ps` and a Newton step: a division is several times slower.
            let r = _mm512_rcp14_ps(d);
            let r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0)));
            _mm512_storeu_ps(out.as_mut_ptr().add(i), _mm512_mul_ps(gu, r));
        }
        for i in whole..g.len() {
            out[i] = g[i] / (1.0 + super::exp(-g[i])) * u[i];
        }
    }

    pub unsafe fn tilt_moments(t: &[f32], b: &[f32], m: f32) -> (f32, f32, f32) {
        let mv = _mm512_set1_ps(m);
        let zero = _mm512_setzero_ps();
        let (mut total, mut first, mut second) = (zero, zero, zero);
        let whole = t.len() / 16 * 16;
        for i in (0..whole).step_by(16) {
            let tv = _mm512_loadu_ps(t.as_ptr().add(i));
            let u = exp16(_mm512_sub_ps(tv, mv));
            let d = _mm512_sub_ps(tv, _mm512_loadu_ps(b.as_ptr().add(i)));
            let live = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(u, zero);
            total = _mm512_add_ps(total, u);
            let ud = _mm512_maskz_mul_ps(live, u, d);
            first = _mm512_add_ps(first, ud);
            second = _mm512_mask3_fmadd_ps(ud, d, second, live);
        }
        let (mut total, mut first, mut second) = (
            _mm512_reduce_add_ps(total),
            _mm512_reduce_add_ps(first),
            _mm512_reduce_add_ps(second),
        );
        for i in whole..t.len() {
            let u = super::exp(t[i] - m);
            if u > 0.0 {
                let ud = u * (t[i] - b[i]);
                total += u;
                first += ud;
                second += ud * (t[i] - b[i]);
            }
        }
        (total, first, second)
    }

    /// Lanes of `x` past its whole vectors: a mask for the rest (fewer than sixteen values).
    #[inline(always)]
    fn tail_mask(rest: usize) -> __mmask16 {
        ((1u32 << rest) - 1) as __mmask16
    }

    /// Sixteen lanes at a time with a masked last vector: the short rows of attention (tens of
    /// scores) would otherwise spend more on a scalar tail and a serial fold of the lanes than
    /// on the vectors.
    pub unsafe fn max(x: &[f32]) -> f32 {
        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
        // `max` returns its second operand when either is NaN: the accumulator, so NaN skip.
        let mut acc = [ninf; 4];
        let mut quads = x.chunks_exact(64);
        for c in quads.by_ref() {
            for (k, a) in acc.iter_mut().enumerate() {
                *a = _mm512_max_ps(_mm512_loadu_ps(c.as_ptr().add(16 * k)), *a);
            }
        }
        let mut singles = quads.remainder().chunks_exact(16);
        for c in singles.by_ref() {
            acc[0] = _mm512_max_ps(_mm512_loadu_ps(c.as_ptr()), acc[0]);
        }
        let rest = singles.remainder();
        let tail = _mm512_mask_loadu_ps(ninf, tail_mask(rest.len()), rest.as_ptr());
        acc[1] = _mm512_max_ps(tail, acc[1]);
        let m = _mm512_max_ps(_mm512_max_ps(acc[0], acc[1]), _mm512_max_ps(acc[2], acc[3]));
        _mm512_reduce_max_ps(m)
    }

    /// x ← e^((x − shift)·scale), returning the sum of the new values, accumulated as they are
    /// made (one pass, the sum in vectors).
    pub unsafe fn exp_in_place(x: &mut [f32], shift: f32, scale: f32) -> f32 {
        let (sh, sc) = (_mm512_set1_ps(shift), _mm512_set1_ps(scale));
        let mut acc = [_mm512_setzero_ps(); 2];
        let mut pairs = x.chunks_exact_mut(32);
        for c in pairs.by_ref() {
            for (k, a) in acc.iter_mut().enumerate() {
                let e = exp16(arg(c.as_ptr().add(16 * k), sh, sc));
                _mm512_storeu_ps(c.as_mut_ptr().add(16 * k), e);
                *a = _mm512_add_ps(*a, e);
            }
        }
        let mut singles = pairs.into_remainder().chunks_exact_mut(16);
        for c in singles.by_ref() {
            let e = exp16(arg(c.as_ptr(), sh, sc));
            _mm512_storeu_ps(c.as_mut_ptr(), e);
            acc[0] = _mm512_add_ps(acc[0], e);
        }
        let rest = singles.into_remainder();
        let mask = tail_mask(rest.len());
        let v = _mm512_maskz_loadu_ps(mask, rest.as_ptr());
        let e = exp16(_mm512_mul_ps(_mm512_sub_ps(v, sh), sc));
        _mm512_mask_storeu_ps(rest.as_mut_ptr(), mask, e);
        acc[1] = _mm512_mask_add_ps(acc[1], mask, acc[1], e);
        _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
    }
}

/// The entropy of softmax(x), in bits: with m = max x, u = e^(x − m) and S = Σu,
/// H = ln S − Σu·(x − m)/S nats.
pub fn entropy_bits(x: &[f32]) -> f32 {
    let m = max(x);
    if !m.is_finite() {
        return 0.0;
    }
    const L: usize = 16;
    let (mut total, mut weighted) = ([0f32; L], [0f32; L]);
    let mut add = |i: usize, v: f32| {
        let u = exp(v - m);
        if u > 0.0 {
            total[i] += u;
            weighted[i] += u * (v - m);
        }
    };
    let chunks = x.chunks_exact(L);
    for (i, &v) in chunks.remainder().iter().enumerate() {
        add(i, v);
    }
    for c in chunks {
        for (i, &v) in c.iter().enumerate() {
            add(i, v);
        }
    }
    let (s, w): (f32, f32) = (total.iter().sum(), weighted.iter().sum());
    ((s.ln() - w / s) / std::f32::consts::LN_2).max(0.0)
}

/// log Σ e^x, computed stably (−∞ when every value is, or for an empty slice).
pub fn log_sum_exp(x: &[f32]) -> f32 {
    let m = max(x);
    if !m.is_finite() {
        return m;
    }
    m + sum_exp(x, m, 1.0).ln()
}

/// In-place log-softmax.
pub fn log_softmax(x: &mut [f32]) {
    let lse = log_sum_exp(x);
    for v in x.iter_mut() {
        *v -= lse;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_is_in_bits() {
        assert!((entropy_bits(&[0.0; 4]) - 2.0).abs() < 1e-5);
        assert!(entropy_bits(&[0.0, f32::NEG_INFINITY]).abs() < 1e-6);
        let x: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let z: f32 = x.iter().map(|v| v.exp()).sum();
        let want: f32 = x
            .iter()
            .map(|v| -(v.exp() / z) * (v.exp() / z).log2())
            .sum();
        assert!(
            (entropy_bits(&x) - want).abs() < 1e-4,
            "{} vs {want}",
            entropy_bits(&x)
        );
    }

    #[test]
    fn exp_matches_libm_within_a_few_ulp() {
        let mut x = -90.0f32;
        while x < 90.0 {
            let (want, got) = (x.exp(), exp(x));
            if x < -87.33 {
                assert_eq!(got, 0.0, "{x}");
            } else if x > 88.72 {
                assert_eq!(got, f32::INFINITY, "{x}");
            } else if want > f32::MIN_POSITIVE {
                assert!(((got - want) / want).abs() < 4e-7, "{x}: {got} vs {want}");
            }
            x += 0.0037;
        }
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
    }

    #[test]
    fn reductions_agree_with_serial_ones() {
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1013) as f32 / 100.0 - 5.0)
            .collect();
        let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(max(&x), m);
        let s: f64 = x.iter().map(|&v| v as f64).sum();
        assert!((sum(&x) as f64 - s).abs() < 1e-3);
        let lse = m as f64
            + x.iter()
                .map(|&v| (v as f64 - m as f64).exp())
                .sum::<f64>()
                .ln();
        assert!((log_sum_exp(&x) as f64 - lse).abs() < 1e-5);
        assert_eq!(log_sum_exp(&[]), f32::NEG_INFINITY);
        assert_eq!(log_sum_exp(&[f32::NEG_INFINITY; 3]), f32::NEG_INFINITY);
        assert_eq!(max(&[f32::NAN, 1.0]), 1.0);
        // The vector path agrees with the scalar `exp`, ±∞ and NaN included.
        let mut y: Vec<f32> = (0..100).map(|i| i as f32 * 2.0 - 110.0).collect();
        y.extend([f32::NEG_INFINITY, f32::INFINITY, f32::NAN, 0.0]);
        let mut z = y.clone();
        exp_in_place(&mut z, 0.0, 1.0);
        for (&v, &e) in y.iter().zip(&z) {
            let want = if v.is_nan() { 0.0 } else { exp(v) };
            assert!(
                e == want || ((e - want) / want).abs() < 4e-7,
                "{v}: {e} vs {want}"
            );
        }
        let (mut g, u): (Vec<f32>, Vec<f32>) =
            (0..40).map(|i| (i as f32 - 20.0, 0.5 * i as f32)).unzip();
        g[3] = -100.0;
        let mut out = vec![0f32; 40];
        silu_mul(&g, &u, &mut out);
        for i in 0..40 {
            let want = f64::from(g[i]) * f64::from(u[i]) / (1.0 + (-f64::from(g[i])).exp());
            assert!(
                (f64::from(out[i]) - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "silu {i}"
            );
        }
        let total: f64 = y[..96].iter().map(|&v| f64::from(v).exp()).sum();
        assert!((f64::from(sum_exp(&y[..96], 0.0, 1.0)) / total - 1.0).abs() < 1e-6);
    }

    /// Every length up to a few vectors (attention's short rows): whole vectors, a masked
    /// tail, or both, with NaN in the body and in the tail.
    #[test]
    fn short_rows_reduce_like_long_ones() {
        for n in (0..=80usize).chain([200, 1000]) {
            let mut x: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 1013) as f32 / 50.0 - 10.0)
                .collect();
            for at in [0, n / 2, n.saturating_sub(1)] {
                if at < n {
                    x[at] = f32::NAN;
                }
            }
            let want = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&x), want, "max of {n}");
            x.retain(|v| !v.is_nan());
            let mut e = x.clone();
            let total = exp_in_place(&mut e, want, 0.5);
            let mut serial = 0f64;
            for (&v, &e) in x.iter().zip(&e) {
                let w = exp((v - want) * 0.5);
                assert!(
                    e == w || ((e - w) / w).abs() < 4e-7,
                    "exp of {n}: {e} vs {w}"
                );
                serial += f64::from(e);
            }
            assert!(
                (f64::from(total) - serial).abs() <= 1e-6 * serial,
                "sum of {n}"
            );
        }
    }
}
