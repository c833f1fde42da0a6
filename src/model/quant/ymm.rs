//! The AVX2 kernels: panels of eight weight rows, one per i32 lane of a 256-bit vector; VNNI's
//! `vpdpbusd` where the CPU has it (AVX-512 VL), else `maddubs` pairs. Q8_0 weights stay signed:
//! their magnitudes multiply the activations given the weights' signs, since `maddubs` would
//! saturate on unsigned q + 128.
use std::arch::x86_64::*;

use half::f16;

use super::{prefetch, Chunk, Q8Rows, Sums, BLOCK};

pub(super) use super::quantize_block;
pub const PANEL: usize = 8;
pub const Q8_OFFSET: bool = false;

/// `acc` plus the sums of four adjacent u8·i8 products, as eight i32.
#[inline]
#[cfg(all(target_feature = "avx512vnni", target_feature = "avx512vl"))]
unsafe fn dot_u8_i8(acc: __m256i, u: __m256i, i: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(acc, u, i)
}

/// (Operands stay small enough that `maddubs`' i16 pairs never saturate: u ≤ 128.)
#[inline]
#[cfg(not(all(target_feature = "avx512vnni", target_feature = "avx512vl")))]
unsafe fn dot_u8_i8(acc: __m256i, u: __m256i, i: __m256i) -> __m256i {
    _mm256_add_epi32(
        acc,
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, i), _mm256_set1_epi16(1)),
    )
}

#[inline]
unsafe fn load_f16x8(v: &[f16]) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr() as *const __m128i))
}

/// Activation values 4c..4c+4 of block `a`, in every lane.
#[inline]
unsafe fn broadcast4(acts: &Q8Rows, a: usize, c: usize) -> __m256i {
    let p = acts.qs.as_ptr().add(a * BLOCK + 4 * c) as *const i32;
    _mm256_set1_epi32(p.read_unaligned())
}

/// For each activation row i of `r0..r0 + count`, lane r of `sums[i]` gets
/// Σ_b d_b[r]·da_b·(w_b[r] · x_b) (+ Σ_b m_b[r]·s_b when `m` is given). `unpack(b)` gives block
/// b's eight chunks (chunk c: values 4c..4c+4 of each row) as u8 vectors and, for signed
/// weights, the vectors whose signs the activations take.
#[inline(always)]
unsafe fn panel(
    d: &[f16],
    m: Option<&[f16]>,
    acts: &Q8Rows,
    r0: usize,
    count: usize,
    sums: &mut Sums,
    unpack: impl Fn(usize) -> [(__m256i, Option<__m256i>); 8],
) {
    let mut acc = [_mm256_setzero_ps(); super::TILE];
    let mut acc_m = [_mm256_setzero_ps(); super::TILE];
    for b in 0..acts.nb {
        let w = unpack(b);
        let dw = load_f16x8(&d[b * PANEL..]);
        let mw = m.map(|m| load_f16x8(&m[b * PANEL..]));
        for i in 0..count {
            let a = (r0 + i) * acts.nb + b;
            // Two chains, so consecutive products do not wait on each other.
            let mut isum = [_mm256_setzero_si256(); 2];
            for (c, &(u, sign)) in w.iter().enumerate() {
                let x = broadcast4(acts, a, c);
                let x = sign.map_or(x, |s| _mm256_sign_epi8(x, s));
                isum[c % 2] = dot_u8_i8(isum[c % 2], u, x);
            }
            let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*acts.d.get_unchecked(a)));
            let isum = _mm256_cvtepi32_ps(_mm256_add_epi32(isum[0], isum[1]));
            acc[i] = _mm256_fmadd_ps(scale, isum, acc[i]);
            if let Some(mw) = mw {
                acc_m[i] = _mm256_fmadd_ps(mw, _mm256_set1_ps(*acts.s.get_unchecked(a)), acc_m[i]);
            }
        }
    }
    for i in 0..count {
        _mm256_storeu_ps(sums[i].as_mut_ptr(), _mm256_add_ps(acc[i], acc_m[i]));
    }
}

pub unsafe fn panel_q4_1(
    qs: &[Chunk],
    d: &[f16],
    m: &[f16],
    acts: &Q8Rows,
    r0: usize,
    count: usize,
    sums: &mut Sums,
) {
    let low = _mm256_set1_epi8(0x0F);
    panel(d, Some(m), acts, r0, count, sums, |b| {
        // Chunk c's low nibbles are values 4c..4c+4, its high nibbles 16+4c..20+4c.
        prefetch(&qs[b * 4..], 4);
        let raw: [__m256i; 4] =
            std::array::from_fn(|c| _mm256_loadu_si256(qs[b * 4 + c].as_ptr() as *const __m256i));
        std::array::from_fn(|k| {
            let q = raw[k % 4];
            let q = if k < 4 { q } else { _mm256_srli_epi16(q, 4) };
            (_mm256_and_si256(q, low), None)
        })
    });
}

pub unsafe fn panel_q8_0(
    qs: &[Chunk],
    d: &[f16],
    acts: &Q8Rows,
    r0: usize,
    count: usize,
    sums: &mut Sums,
) {
    // u8·i8 products: |w| against the activations carrying w's sign.
    panel(d, None, acts, r0, count, sums, |b| {
        prefetch(&qs[b * 8..], 8);
        std::array::from_fn(|c| {
            let q = _mm256_loadu_si256(qs[b * 8 + c].as_ptr() as *const __m256i);
            (_mm256_sign_epi8(q, q), Some(q))
        })
    });
}
