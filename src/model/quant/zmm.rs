//! The AVX-512 kernels: panels of sixteen weight rows, one per i32 lane of a 512-bit vector, and
//! VNNI `vpdpbusd` on them. Server cores issue the 512-bit `vpdpbusd` as fast as the 256-bit one,
//! so a panel of sixteen does twice the multiply-adds per instruction (489 vs 263 GMAC/s on one
//! core of this machine). Q8_0 quants are stored unsigned, as q + 128 (AVX-512 has no `vpsignb`
//! for the signed trick): the extra 128·Σx is taken back with the activations' block sums, the
//! same term as Q4_1's offset.

use std::arch::x86_64::*;

use half::f16;

use super::{prefetch, Chunk, Q8Rows, Sums, BLOCK, TILE};

pub const PANEL: usize = 16;
pub const Q8_OFFSET: bool = true;

/// `super::quantize_block` on two vectors: |x| max, scale, round to nearest even, clamp to
/// ±127 (NaN, converted to i32::MIN, becomes −127), narrow to i8.
#[inline(always)]
pub fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    assert!(x.len() == BLOCK && q.len() == BLOCK);
    // SAFETY: this module is compiled only with AVX-512F/BW; the lengths are checked above.
    unsafe {
        let halves = [
            _mm512_loadu_ps(x.as_ptr()),
            _mm512_loadu_ps(x.as_ptr().add(16)),
        ];
        let amax = _mm512_max_ps(_mm512_abs_ps(halves[0]), _mm512_abs_ps(halves[1]));
        let d = _mm512_reduce_max_ps(amax) / 127.0;
        let id = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        let mut sum = _mm512_setzero_si512();
        for (h, v) in halves.into_iter().enumerate() {
            let r = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm512_mul_ps(v, id),
            );
            let r = _mm512_max_epi32(
                _mm512_min_epi32(r, _mm512_set1_epi32(127)),
                _mm512_set1_epi32(-127),
            );
            _mm_storeu_si128(q.as_mut_ptr().add(16 * h).cast(), _mm512_cvtepi32_epi8(r));
            sum = _mm512_add_epi32(sum, r);
        }
        (d, _mm512_reduce_add_epi32(sum))
    }
}

#[inline(always)]
unsafe fn load_f16x16(v: &[f16]) -> __m512 {
    assert!(v.len() >= PANEL);
    _mm512_cvtph_ps(_mm256_loadu_si256(v.as_ptr() as *const __m256i))
}

/// Activation values 4c..4c+4 of block `a`, in every lane.
#[inline(always)]
unsafe fn broadcast4(acts: &Q8Rows, a: usize, c: usize) -> __m512i {
    let p = acts.qs.as_ptr().add(a * BLOCK + 4 * c) as *const i32;
    _mm512_set1_epi32(p.read_unaligned())
}

/// What a format's unsigned quants are offset by, per block and row: Q4_1 stores its `m`, taken
/// in through the activations' block sums; Q8_0's is 128, whose excess each block's integer sum
/// starts without (`Q8Rows::minus128`).
enum Offset<'a> {
    Stored(&'a [f16]),
    Plus128,
}

/// For each activation row i of `r0..r0 + count`, lane r of `sums[i]` gets
/// Σ_b d_b[r]·da_b·(w_b[r] · x_b) + m_b[r]·s_b. `unpack(b)` gives block b's eight chunks (chunk
/// c: values 4c..4c+4 of each row) as u8 vectors.
#[inline(always)]
unsafe fn panel(
    d: &[f16],
    offset: Offset,
    acts: &Q8Rows,
    r0: usize,
    count: usize,
    sums: &mut Sums,
    unpack: impl Fn(usize) -> [__m512i; 8],
) {
    match count {
        1 => panel_rows::<1>(d, offset, acts, r0, sums, unpack),
        2 => panel_rows::<2>(d, offset, acts, r0, sums, unpack),
        3 => panel_rows::<3>(d, offset, acts, r0, sums, unpack),
        _ => panel_rows::<4>(d, offset, acts, r0, sums, unpack),
    }
}

/// `panel` for `N` rows, their products interleaved: with three or four rows, each row's block
/// is one chain of eight `vpdpbusd`, the rows' chains hiding each other's latency; one or two
/// rows split theirs in two chains, added at the end.
#[inline(always)]
unsafe fn panel_rows<const N: usize>(
    d: &[f16],
    offset: Offset,
    acts: &Q8Rows,
    r0: usize,
    sums: &mut Sums,
    unpack: impl Fn(usize) -> [__m512i; 8],
) {
    const { assert!(N >= 1 && N <= TILE) };
    let chains = if N >= 3 { 1 } else { 2 };
    let mut acc = [_mm512_setzero_ps(); N];
    let mut acc_m = [_mm512_setzero_ps(); N];
    for b in 0..acts.nb {
        let w = unpack(b);
        let dw = load_f16x16(&d[b * PANEL..]);
        let mw = match offset {
            Offset::Stored(m) => Some(load_f16x16(&m[b * PANEL..])),
            Offset::Plus128 => None,
        };
        let a: [usize; N] = std::array::from_fn(|i| (r0 + i) * acts.nb + b);
        let mut isum = [[_mm512_setzero_si512(); 2]; N];
        if let Offset::Plus128 = offset {
            for i in 0..N {
                isum[i][0] = _mm512_set1_epi32(*acts.minus128.get_unchecked(a[i]));
            }
        }
        for (c, &u) in w.iter().enumerate() {
            for i in 0..N {
                let k = c % chains;
                isum[i][k] = _mm512_dpbusd_epi32(isum[i][k], u, broadcast4(acts, a[i], c));
            }
        }
        for i in 0..N {
            let isum = if chains == 2 {
                _mm512_add_epi32(isum[i][0], isum[i][1])
            } else {
                isum[i][0]
            };
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*acts.d.get_unchecked(a[i])));
            acc[i] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(isum), acc[i]);
            if let Some(mw) = mw {
                acc_m[i] =
                    _mm512_fmadd_ps(mw, _mm512_set1_ps(*acts.s.get_unchecked(a[i])), acc_m[i]);
            }
        }
    }
    for i in 0..N {
        _mm512_storeu_ps(sums[i].as_mut_ptr(), _mm512_add_ps(acc[i], acc_m[i]));
    }
}

/// Each byte's high nibble, as a byte. With GFNI a GF(2) affine map does the shift and the mask
/// in one instruction: row i of its bit matrix (byte 7 − i) picks input bit i + 4.
#[inline(always)]
unsafe fn high_nibbles(q: __m512i, low: __m512i) -> __m512i {
    #[cfg(target_feature = "gfni")]
    {
        let _ = low;
        _mm512_gf2p8affine_epi64_epi8::<0>(q, _mm512_set1_epi64(0x1020_4080_0000_0000))
    }
    #[cfg(not(target_feature = "gfni"))]
    _mm512_and_si512(_mm512_srli_epi16(q, 4), low)
}

#[inline(always)]
unsafe fn load(chunk: &Chunk) -> __m512i {
    _mm512_loadu_si512(chunk.as_ptr() as *const _)
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
    let low = _mm512_set1_epi8(0x0F);
    panel(d, Offset::Stored(m), acts, r0, count, sums, |b| {
        // Chunk c's low nibbles are values 4c..4c+4, its high nibbles 16+4c..20+4c.
        prefetch(&qs[b * 4..], 4);
        let raw: [__m512i; 4] = std::array::from_fn(|c| load(&qs[b * 4 + c]));
        std::array::from_fn(|k| {
            let q = raw[k % 4];
            if k < 4 {
                _mm512_and_si512(q, low)
            } else {
                high_nibbles(q, low)
            }
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
    panel(d, Offset::Plus128, acts, r0, count, sums, |b| {
        prefetch(&qs[b * 8..], 8);
        std::array::from_fn(|c| load(&qs[b * 8 + c]))
    });
}
