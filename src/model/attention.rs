//! Causal attention of a ragged batch's new rows against their sequences' caches. A task is one
//! row and one KV head with the (up to four) query heads that share it, so a cached key or value
//! is loaded and converted from f16 once for all of them; a layer's tasks of all items run in one
//! pass over the pool. A task sweeps its visible positions three times: scores q·k, an
//! in-place softmax, and the weighted sum of values. With AVX2 the two dot-product sweeps use
//! explicit vectors: scores eight positions at a time with one transposing reduction per query,
//! values four 8-wide accumulators per query, so that no score is a serial chain of adds ending
//! in a horizontal sum.

use std::ops::Range;

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::config::LlamaConfig;
use super::kv::{store_f16, KvHead};
use super::pool::Shared;
use super::quant::{Q8Writer, BLOCK};
use crate::math;

/// One item's part of a layer's attention: its rows in the batch, the position of the first,
/// and its cache's KV heads, opened for those rows (`KvCache::open`).
pub(super) struct Span<'c> {
    pub rows: Range<usize>,
    pub start: usize,
    pub kv: &'c [KvHead],
    /// Another item's keys and values, the same as this one's in their first positions (a
    /// cache forked from the same prompt): read from there, they are still in the CPU's cache
    /// from that item's tasks.
    pub prefix: Option<(&'c [KvHead], usize)>,
}

/// Multiply-adds below which attention runs on the calling thread (measured: the base model's
/// attention at a few hundred positions still gains from the pool; a tiny ARM's does not).
const SMALL_ATTENTION: usize = 1 << 16;

/// Query heads one task takes together: they share a KV head (grouped-query attention), so its
/// keys and values are read and converted once for all of them.
const QUERIES: usize = 4;

/// Causal attention of every row of `qkv` (each `width` wide: queries, keys, values) against its
/// item's cache, after rotating its queries and keys for their positions (`rope`) and writing
/// its keys and values into the cache: done in the tasks, in parallel, not in a serial pass
/// over the batch before them. Writes rows of `n_heads × head_dim` into `out` and, given
/// `blocks`, quantizes them there too, each task its own heads' blocks, for the output
/// projection to read.
pub(super) fn attention(
    cfg: &LlamaConfig,
    qkv: &mut [f32],
    width: usize,
    spans: &[Span],
    rope: &(impl Fn(&mut [f32], usize) + Sync),
    out: &mut [f32],
    blocks: Option<Q8Writer>,
) {
    let (h, kvh, hd, group) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.group());
    assert!(blocks.is_none() || hd.is_multiple_of(BLOCK));
    assert!(width == (h + 2 * kvh) * hd && qkv.len().is_multiple_of(width));
    let n = qkv.len() / width;
    let span_of: Vec<&Span> = spans
        .iter()
        .flat_map(|s| s.rows.clone().map(move |_| s))
        .collect();
    assert!(span_of.len() == n && spans.iter().all(|s| s.kv.len() == kvh));
    let position = |r: usize| span_of[r].start + (r - span_of[r].rows.start);
    let scale = 1.0 / (hd as f32).sqrt();
    let (qkv_ptr, out_ptr) = (Shared(qkv.as_mut_ptr()), Shared(out.as_mut_ptr()));
    // Row r's KV head `kv_head`: its queries and key rotated in place, key and value stored.
    let prepare = |r: usize, kv_head: usize| {
        let p = position(r);
        let at = |offset: usize| qkv_ptr.get().wrapping_add(r * width + offset);
        // SAFETY: these heads of row r are this call's alone (one per row and KV head), and
        // `open` made room for position p in the cache.
        unsafe {
            rope(
                std::slice::from_raw_parts_mut(at(kv_head * group * hd), group * hd),
                p,
            );
            let key = std::slice::from_raw_parts_mut(at((h + kv_head) * hd), hd);
            rope(key, p);
            let value = std::slice::from_raw_parts(at((h + kvh + kv_head) * hd), hd);
            let head = span_of[r].kv[kv_head];
            store_f16(head.keys.add(p * hd), key);
            store_f16(head.values.add(p * hd), value);
        }
    };
    // Tasks: (KV head, part of that head's queries, row), so that a thread's consecutive tasks
    // read one head's keys and values, of one item or of a prefix items share.
    let parts = group.div_ceil(QUERIES);
    // With one row per item and one task per row and KV head, a task prepares its own row and
    // head, which no other task reads; otherwise every row is prepared before any is attended.
    let own = parts == 1 && spans.iter().all(|s| s.rows.len() == 1);
    let task = |i: usize, scores: &mut Vec<f32>| {
        let (r, kv_head, part) = (i % n, i / n / parts, i / n % parts);
        if own {
            prepare(r, kv_head);
        }
        let s = span_of[r];
        let visible = position(r) + 1;
        let first = kv_head * group + part * QUERIES;
        let heads = first..(first + QUERIES).min((kv_head + 1) * group);
        let run = |kv: &[KvHead], len: usize| {
            // SAFETY: positions below `visible` are cached or were written by `prepare` (by
            // this task, or before the pool's prologue ends).
            unsafe {
                (
                    std::slice::from_raw_parts(kv[kv_head].keys.cast_const(), len * hd),
                    std::slice::from_raw_parts(kv[kv_head].values.cast_const(), len * hd),
                )
            }
        };
        let (keys, values) = run(s.kv, visible);
        let ((prefix_keys, prefix_values), shared) = match s.prefix {
            Some((kv, shared)) => (run(kv, shared), shared),
            None => ((keys, values), 0),
        };
        let head_kv = Head {
            keys,
            values,
            prefix_keys,
            prefix_values,
            shared,
            head_dim: hd,
            visible,
        };
        // SAFETY: task `i` alone writes row r's outputs for `heads`; the queries it reads are
        // rotated (by `prepare`, above or in the pool's prologue) and written by no one after.
        let (q, o) = unsafe {
            (
                std::slice::from_raw_parts(
                    qkv_ptr.get().add(r * width + heads.start * hd),
                    heads.len() * hd,
                ),
                std::slice::from_raw_parts_mut(
                    out_ptr.get().add((r * h + heads.start) * hd),
                    heads.len() * hd,
                ),
            )
        };
        head_kv.attend(q, scale, scores, o);
        if let Some(blocks) = blocks {
            // Whole blocks: the heads start at a multiple of head_dim, itself of BLOCK.
            // SAFETY: these blocks are this task's alone (its heads of row r), read by the next
            // matmul after this pool call.
            unsafe { blocks.blocks((r * h + heads.start) * hd / BLOCK, o) };
        }
    };
    // A fork-join costs more than a small call (a tiny ARM, a short context): those run on the
    // calling thread.
    let macs = (0..n).map(|r| position(r) + 1).sum::<usize>() * h * hd * 2;
    let run = |range: std::ops::Range<usize>| {
        let mut scores = Vec::new();
        range.for_each(|i| task(i, &mut scores))
    };
    let tasks = n * kvh * parts;
    let units = if own { 0 } else { n * kvh };
    let prepare_unit = |u: usize| prepare(u % n, u / n);
    if macs < SMALL_ATTENTION {
        (0..units).for_each(prepare_unit);
        run(0..tasks);
    } else {
        super::pool::split_after(units, prepare_unit, tasks, run);
    }
}

/// Positions a sweep asks for before it reads them.
#[cfg(target_feature = "avx2")]
const AHEAD: usize = 16;

/// Turns each of the `NQ` rows of `n` scores into e^(s − max) in place; returns 1/Σ per row.
#[cfg(target_feature = "avx2")]
#[inline(always)]
fn softmax_rows<const NQ: usize>(scores: &mut [f32], n: usize) -> [f32; NQ] {
    std::array::from_fn(|g| {
        let s = &mut scores[g * n..(g + 1) * n];
        1.0 / math::exp_in_place(s, math::max(s), 1.0)
    })
}

/// One KV head's cache as its queries see it: position p's key is
/// `keys[p·head_dim..][..head_dim]`, or `prefix_keys[..]` for p below `shared` (likewise for
/// values).
struct Head<'c> {
    keys: &'c [f16],
    values: &'c [f16],
    prefix_keys: &'c [f16],
    prefix_values: &'c [f16],
    shared: usize,
    head_dim: usize,
    visible: usize,
}

impl Head<'_> {
    /// Where position p's key and value start (p may run past `visible` for a prefetch).
    #[inline(always)]
    fn at(&self, p: usize) -> (*const f16, *const f16) {
        let (k, v) = if p < self.shared {
            (self.prefix_keys, self.prefix_values)
        } else {
            (self.keys, self.values)
        };
        let o = p * self.head_dim;
        (k.as_ptr().wrapping_add(o), v.as_ptr().wrapping_add(o))
    }

    /// Asks for position p's key (or value) now: the cache was evicted by the weights streamed
    /// since the last layer, and the sweeps issue this `AHEAD` positions before they read.
    #[cfg(target_feature = "avx2")]
    #[inline(always)]
    fn prefetch(&self, p: usize, key: bool) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let (k, v) = self.at(p);
        let at = (if key { k } else { v }) as *const i8;
        for line in 0..(2 * self.head_dim).div_ceil(64) {
            // SAFETY: a prefetch does not fault, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(64 * line)) };
        }
    }

    /// The first `AHEAD` positions' keys and values, which the sweeps' own prefetches miss.
    #[cfg(target_feature = "avx2")]
    #[inline(always)]
    fn prefetch_start(&self) {
        for p in 0..self.visible.min(AHEAD) {
            self.prefetch(p, true);
            self.prefetch(p, false);
        }
    }

    /// For each of the query heads in `q` (1..=`QUERIES` of them, `head_dim` wide each, output
    /// likewise in `o`): softmax(scale · q·Kᵀ) · V over the visible positions.
    fn attend(&self, q: &[f32], scale: f32, scores: &mut Vec<f32>, o: &mut [f32]) {
        let (hd, n) = (self.head_dim, self.visible);
        let nq = q.len() / hd;
        let last = n * hd;
        assert!(
            (1..=QUERIES).contains(&nq)
                && q.len() == nq * hd
                && o.len() == q.len()
                && self.keys.len() >= last
                && self.values.len() >= last
                && self.shared < n
                && (self.shared == 0
                    || self.prefix_keys.len().min(self.prefix_values.len()) >= self.shared * hd)
        );
        scores.clear();
        scores.resize(nq * n, 0.0);
        // The vector paths, monomorphised per head size (`$hd`, in `$ch` vectors) and query count.
        #[allow(unused_macros)]
        macro_rules! vector_path {
            ($method:ident, $($hd:literal => $ch:literal),*) => {
                match (hd, nq) {
                    $(
                        ($hd, 1) => return self.$method::<$ch, 1>(q, scale, scores, o),
                        ($hd, 2) => return self.$method::<$ch, 2>(q, scale, scores, o),
                        ($hd, 3) => return self.$method::<$ch, 3>(q, scale, scores, o),
                        ($hd, _) => return self.$method::<$ch, 4>(q, scale, scores, o),
                    )*
                    _ => {}
                }
            };
        }
        #[cfg(target_feature = "avx512f")]
        // SAFETY: AVX-512F is enabled for the whole crate; the assert above bounds every read.
        unsafe {
            vector_path!(attend_zmm, 32 => 2, 64 => 4, 96 => 6, 128 => 8);
        }
        #[cfg(all(
            target_feature = "avx2",
            target_feature = "fma",
            not(target_feature = "avx512f")
        ))]
        // SAFETY: AVX2/FMA are enabled for the whole crate; the assert above bounds every read.
        unsafe {
            vector_path!(attend_simd, 32 => 4, 64 => 8, 96 => 12, 128 => 16);
        }
        let mut k = vec![0f32; hd];
        for p in 0..n {
            // SAFETY: `at(p)` is in bounds for p < n (the assert above).
            let key = unsafe { std::slice::from_raw_parts(self.at(p).0, hd) };
            key.convert_to_f32_slice(&mut k);
            for g in 0..nq {
                scores[g * n + p] = math::dot(&q[g * hd..(g + 1) * hd], &k) * scale;
            }
        }
        o.fill(0.0);
        for (s, o) in scores.chunks_exact_mut(n).zip(o.chunks_exact_mut(hd)) {
            let max = math::max(s);
            let inv = 1.0 / math::exp_in_place(s, max, 1.0);
            for (p, &w) in s.iter().enumerate() {
                // SAFETY: as for the keys above.
                let v = unsafe { std::slice::from_raw_parts(self.at(p).1, hd) };
                for (o, v) in o.iter_mut().zip(v) {
                    *o += w * inv * v.to_f32();
                }
            }
        }
    }

    /// `attend` for `NQ` query heads of `8·CH` dimensions.
    #[cfg(all(
        target_feature = "avx2",
        target_feature = "fma",
        not(target_feature = "avx512f")
    ))]
    #[inline(always)]
    unsafe fn attend_simd<const CH: usize, const NQ: usize>(
        &self,
        q: &[f32],
        scale: f32,
        scores: &mut [f32],
        o: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        let n = self.visible;
        // Eight cached f16 values as f32.
        let load = |p: *const f16, c: usize| _mm256_cvtph_ps(_mm_loadu_si128(p.add(8 * c).cast()));
        let qv: [[__m256; CH]; NQ] = std::array::from_fn(|g| {
            std::array::from_fn(|c| _mm256_loadu_ps(q.as_ptr().add(g * 8 * CH + 8 * c)))
        });
        // Per query, one accumulator per position, its lanes partial sums over the dimensions;
        // each key is converted once for all the queries.
        let dots = |p: usize| -> [__m256; NQ] {
            let kp = self.at(p).0;
            let k: [__m256; CH] = std::array::from_fn(|c| load(kp, c));
            std::array::from_fn(|g| {
                (1..CH).fold(_mm256_mul_ps(qv[g][0], k[0]), |a, c| {
                    _mm256_fmadd_ps(qv[g][c], k[c], a)
                })
            })
        };
        self.prefetch_start();
        let scale_v = _mm256_set1_ps(scale);
        let mut p = 0;
        while p + 8 <= n {
            for j in 0..8 {
                self.prefetch(p + AHEAD + j, true);
            }
            // acc[g][j]: query g against position p + j.
            let by_position: [[__m256; NQ]; 8] = std::array::from_fn(|j| dots(p + j));
            let acc: [[__m256; 8]; NQ] = std::array::from_fn(|g| by_position.map(|d| d[g]));
            for (g, acc) in acc.iter().enumerate() {
                // Lane j of the result: the sum of acc[j]'s lanes.
                let pair = |a, b| _mm256_hadd_ps(a, b);
                let u0 = pair(pair(acc[0], acc[1]), pair(acc[2], acc[3]));
                let u1 = pair(pair(acc[4], acc[5]), pair(acc[6], acc[7]));
                let s = _mm256_add_ps(
                    _mm256_permute2f128_ps(u0, u1, 0x20),
                    _mm256_permute2f128_ps(u0, u1, 0x31),
                );
                _mm256_storeu_ps(
                    scores.as_mut_ptr().add(g * n + p),
                    _mm256_mul_ps(s, scale_v),
                );
            }
            p += 8;
        }
        for p in p..n {
            for (g, d) in dots(p).into_iter().enumerate() {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), d);
                scores[g * n + p] = lanes.iter().sum::<f32>() * scale;
            }
        }
        let inv: [f32; NQ] = softmax_rows(scores, n);
        // Values four chunks at a time, so the accumulators of all queries stay in registers.
        for c0 in (0..CH).step_by(4) {
            let mut acc = [[_mm256_setzero_ps(); 4]; NQ];
            for p in 0..n {
                let vp = self.at(p).1.add(8 * c0);
                if c0 == 0 {
                    self.prefetch(p + AHEAD, false);
                }
                let v: [__m256; 4] = std::array::from_fn(|c| load(vp, c));
                for (g, acc) in acc.iter_mut().enumerate() {
                    let w = _mm256_set1_ps(*scores.get_unchecked(g * n + p));
                    for (a, v) in acc.iter_mut().zip(v) {
                        *a = _mm256_fmadd_ps(w, v, *a);
                    }
                }
            }
            for (g, acc) in acc.iter().enumerate() {
                for (c, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(
                        o.as_mut_ptr().add(g * 8 * CH + 8 * (c0 + c)),
                        _mm256_mul_ps(*a, _mm256_set1_ps(inv[g])),
                    );
                }
            }
        }
    }

    /// `attend` for `NQ` query heads of `16·CH` dimensions, in 512-bit vectors. Scores go eight
    /// positions at a time: a position's key, converted once, meets every query (read from
    /// memory, so that the 8·NQ accumulators fit in registers), and one transposing reduction
    /// per query turns its eight accumulators into eight scores. Values: NQ·CH accumulators,
    /// each position's value converted once.
    #[cfg(target_feature = "avx512f")]
    #[inline(always)]
    unsafe fn attend_zmm<const CH: usize, const NQ: usize>(
        &self,
        q: &[f32],
        scale: f32,
        scores: &mut [f32],
        o: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        let n = self.visible;
        let load =
            |p: *const f16, c: usize| _mm512_cvtph_ps(_mm256_loadu_si256(p.add(16 * c).cast()));
        let qp = q.as_ptr();
        self.prefetch_start();
        // Query g against the key at position p: sixteen partial sums.
        let dot = |k: &[__m512; CH], g: usize| {
            let mut a = _mm512_mul_ps(_mm512_loadu_ps(qp.add(g * 16 * CH)), k[0]);
            for (c, &k) in k.iter().enumerate().skip(1) {
                a = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(g * 16 * CH + 16 * c)), k, a);
            }
            a
        };
        let scale_v = _mm256_set1_ps(scale);
        let mut p = 0;
        while p + 8 <= n {
            let mut acc = [[_mm512_setzero_ps(); 8]; NQ];
            for j in 0..8 {
                self.prefetch(p + AHEAD + j, true);
                let kp = self.at(p + j).0;
                let k: [__m512; CH] = std::array::from_fn(|c| load(kp, c));
                for (g, acc) in acc.iter_mut().enumerate() {
                    acc[j] = dot(&k, g);
                }
            }
            for (g, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(
                    scores.as_mut_ptr().add(g * n + p),
                    _mm256_mul_ps(sum8(acc), scale_v),
                );
            }
            p += 8;
        }
        for p in p..n {
            let kp = self.at(p).0;
            let k: [__m512; CH] = std::array::from_fn(|c| load(kp, c));
            for g in 0..NQ {
                scores[g * n + p] = _mm512_reduce_add_ps(dot(&k, g)) * scale;
            }
        }
        let inv: [f32; NQ] = softmax_rows(scores, n);
        let mut acc = [[_mm512_setzero_ps(); CH]; NQ];
        for p in 0..n {
            self.prefetch(p + AHEAD, false);
            let vp = self.at(p).1;
            let v: [__m512; CH] = std::array::from_fn(|c| load(vp, c));
            for (g, acc) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(*scores.get_unchecked(g * n + p));
                for (a, &v) in acc.iter_mut().zip(&v) {
                    *a = _mm512_fmadd_ps(w, v, *a);
                }
            }
        }
        for (g, acc) in acc.iter().enumerate() {
            for (c, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(
                    o.as_mut_ptr().add(g * 16 * CH + 16 * c),
                    _mm512_mul_ps(*a, _mm512_set1_ps(inv[g])),
                );
            }
        }
    }
}

/// Lane j of the result: the sum of `v[j]`'s sixteen lanes.
#[cfg(target_feature = "avx512f")]
#[inline(always)]
unsafe fn sum8(v: &[std::arch::x86_64::__m512; 8]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // Fold each vector's 256-bit halves, two vectors per result: (v[2i], v[2i+1]) → one vector
    // with v[2i]'s eight partial sums in its low half and v[2i+1]'s in its high half.
    let fold = |a: __m512, b: __m512| {
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
        )
    };
    let h: [__m512; 4] = std::array::from_fn(|i| fold(v[2 * i], v[2 * i + 1]));
    // 128-bit quarters: (h0, h1) → quarters [v0, v1, v2, v3] each holding four partial sums.
    let quarters = |a: __m512, b: __m512| {
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
        )
    };
    let (x, y) = (quarters(h[0], h[1]), quarters(h[2], h[3]));
    // Within quarters: x holds positions 0..4 (one per quarter), y 4..8. Two rounds of
    // interleave-and-add leave each quarter's sum in every lane of its pair.
    let r1 = _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
    let r2 = _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(
            _mm512_castps_pd(r1),
            _mm512_castps_pd(r1),
        )),
        _mm512_castpd_ps(_mm512_unpackhi_pd(
            _mm512_castps_pd(r1),
            _mm512_castps_pd(r1),
        )),
    );
    // r2's quarter i is [s_i, s_4+i, s_i, s_4+i]: gather s_0..s_8 into the low half.
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
    _mm512_castps512_ps256(_mm512_permutexvar_ps(order, r2))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector paths (head sizes 32, 64, 96, 128; one to four queries sharing the head) and
    /// the plain one (80) against an f64 reference.
    #[test]
    fn matches_a_plain_reference() {
        for (hd, visible, nq) in [
            (64, 1, 1),
            (64, 13, 3),
            (64, 21, 2),
            (96, 17, 1),
            (128, 21, 4),
            (32, 9, 3),
            (80, 9, 2),
        ] {
            let val = |i: usize| ((i * 7919 % 1009) as f32 / 1009.0 - 0.5) * 2.0;
            let keys: Vec<f16> = (0..visible * hd).map(|i| f16::from_f32(val(i))).collect();
            let values: Vec<f16> = (0..visible * hd)
                .map(|i| f16::from_f32(val(i + 5)))
                .collect();
            let q: Vec<f32> = (0..nq * hd).map(|i| val(i + 11) * 3.0).collect();
            // Also with the first positions read from another copy (a shared prefix): each side
            // holds NaN where the other is to be read, so a read from the wrong one shows.
            for shared in [0, visible / 2, visible - 1] {
                let hide = |v: &[f16], prefix: bool| -> Vec<f16> {
                    let cut = shared * hd;
                    v.iter()
                        .enumerate()
                        .map(|(i, &x)| if (i < cut) != prefix { f16::NAN } else { x })
                        .collect()
                };
                let (own_k, own_v) = (hide(&keys, false), hide(&values, false));
                let (pre_k, pre_v) = (hide(&keys, true), hide(&values, true));
                let head = Head {
                    keys: &own_k,
                    values: &own_v,
                    prefix_keys: &pre_k,
                    prefix_values: &pre_v,
                    shared,
                    head_dim: hd,
                    visible,
                };
                let mut o = vec![0f32; nq * hd];
                head.attend(&q, 0.125, &mut Vec::new(), &mut o);
                for (g, (q, o)) in q.chunks_exact(hd).zip(o.chunks_exact(hd)).enumerate() {
                    let s: Vec<f64> = (0..visible)
                        .map(|p| {
                            (0..hd)
                                .map(|d| (q[d] * keys[p * hd + d].to_f32()) as f64)
                                .sum::<f64>()
                                * 0.125
                        })
                        .collect();
                    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = w.iter().sum();
                    for d in 0..hd {
                        let want: f64 = (0..visible)
                            .map(|p| w[p] / z * values[p * hd + d].to_f32() as f64)
                            .sum();
                        assert!(
                            (o[d] as f64 - want).abs() < 1e-5,
                            "hd {hd} visible {visible} shared {shared} query {g} dim {d}"
                        );
                    }
                }
            }
        }
    }
}
