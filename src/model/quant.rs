//! Quantized weights × int8 activations, our own kernels for the GGUF types the default model uses
//! (Q4_1 layers, Q8_0 embeddings/output). candle 0.11 has no SIMD dot product for Q4_1 (its scalar
//! fallback took 77% of decode time) and re-reads the weights for every activation row. Here one
//! pass over a weight row serves up to four activation rows, dot products are AVX-512 VNNI
//! (`vpdpbusd`) or AVX2 (`maddubs`), and rows are split across candle's thread pool.

use half::f16;

const BLOCK: usize = 32;
/// Activation rows that share one pass over the weights.
const TILE: usize = 4;

/// A ggml block of 32 weights.
pub trait WeightBlock: Copy + Send + Sync {
    /// Bytes of one block in a GGUF file.
    const BYTES: usize;
    fn parse(bytes: &[u8]) -> Self;
    /// Dot products of one weight row (`w`, `nb` blocks) with activation rows `r0..r0 + count`.
    fn dot_tile(w: &[Self], acts: &Q8Rows, r0: usize, count: usize, sums: &mut [f32; TILE]);
    #[cfg(test)]
    fn values(&self) -> [f32; BLOCK];
}

/// ggml's `block_q4_1`: value j = d·q_j + m, q_j in 0..16; bytes hold q_j (low nibble) and
/// q_{j+16} (high nibble).
#[derive(Clone, Copy, Debug)]
pub struct Q4_1 {
    d: f16,
    m: f16,
    qs: [u8; 16],
}

/// ggml's `block_q8_0`: value j = d·q_j.
#[derive(Clone, Copy, Debug)]
pub struct Q8_0 {
    d: f16,
    qs: [i8; 32],
}

/// A `rows × cols` quantized matrix (each row is one output feature).
pub struct QMatrix<B> {
    rows: usize,
    cols: usize,
    blocks: Vec<B>,
}

/// Activations quantized per 32 values: `q ≈ x / d`, and `s = d · Σq` for Q4_1's offset term.
pub struct Q8Rows {
    d: Vec<f32>,
    s: Vec<f32>,
    qs: Vec<i8>,
    /// Blocks per row.
    nb: usize,
}

impl<B: WeightBlock> QMatrix<B> {
    /// From ggml's raw bytes.
    pub fn from_ggml(bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if !cols.is_multiple_of(BLOCK) || bytes.len() != rows * cols / BLOCK * B::BYTES {
            return None;
        }
        Some(Self {
            rows,
            cols,
            blocks: bytes.chunks_exact(B::BYTES).map(B::parse).collect(),
        })
    }

    /// Stack matrices with the same number of columns (fused projections).
    pub fn concat(parts: Vec<Self>) -> Option<Self> {
        let cols = parts.first()?.cols;
        if parts.iter().any(|p| p.cols != cols) {
            return None;
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        Some(Self {
            rows,
            cols,
            blocks: parts.into_iter().flat_map(|p| p.blocks).collect(),
        })
    }

    /// `x` is `m` rows of `cols`; returns `m` rows of `rows` values.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "matmul input shape");
        let acts = quantize(x, m, self.cols);
        let n = self.rows;
        let mut out = vec![0f32; m * n];
        let dst = SharedOut(out.as_mut_ptr());
        let nb = acts.nb;
        let tiles = m.div_ceil(TILE);
        // Work items: (chunk of weight rows, activation tile); a chunk's weights stay in cache
        // while a worker goes through the tiles.
        const CHUNK: usize = 16;
        let chunks = n.div_ceil(CHUNK);
        candle_core::utils::barrier_pool().execute_chunked(chunks * tiles, |range| {
            for item in range {
                let (chunk, tile) = (item / tiles, item % tiles);
                let r0 = tile * TILE;
                let count = TILE.min(m - r0);
                for j in chunk * CHUNK..((chunk + 1) * CHUNK).min(n) {
                    let mut sums = [0f32; TILE];
                    B::dot_tile(
                        &self.blocks[j * nb..(j + 1) * nb],
                        &acts,
                        r0,
                        count,
                        &mut sums,
                    );
                    for (i, s) in sums[..count].iter().enumerate() {
                        // SAFETY: item (chunk, tile) alone writes rows r0..r0+count × its chunk's columns.
                        unsafe { *dst.get().add((r0 + i) * n + j) = *s };
                    }
                }
            }
        });
        out
    }

    /// The matrix in f32, row-major.
    #[cfg(test)]
    fn dequantize(&self) -> Vec<f32> {
        self.blocks.iter().flat_map(B::values).collect()
    }
}

fn quantize(x: &[f32], m: usize, cols: usize) -> Q8Rows {
    let nb = cols / BLOCK;
    let mut acts = Q8Rows {
        d: Vec::with_capacity(m * nb),
        s: Vec::with_capacity(m * nb),
        qs: vec![0; m * cols],
        nb,
    };
    for (block, q) in x.chunks_exact(BLOCK).zip(acts.qs.chunks_exact_mut(BLOCK)) {
        let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in q.iter_mut().zip(block) {
            *q = (v * id).round() as i8;
            sum += *q as i32;
        }
        acts.d.push(d);
        acts.s.push(d * sum as f32);
    }
    acts
}

impl WeightBlock for Q4_1 {
    const BYTES: usize = 20;

    fn parse(b: &[u8]) -> Self {
        Self {
            d: f16::from_le_bytes([b[0], b[1]]),
            m: f16::from_le_bytes([b[2], b[3]]),
            qs: b[4..20].try_into().unwrap(),
        }
    }

    #[inline]
    fn dot_tile(w: &[Self], acts: &Q8Rows, r0: usize, count: usize, sums: &mut [f32; TILE]) {
        #[cfg(target_feature = "avx2")]
        // SAFETY: compiled only where AVX2 is enabled for the whole crate (target-cpu=native).
        unsafe {
            simd::dot_tile_q4_1(w, acts, r0, count, sums)
        }
        #[cfg(not(target_feature = "avx2"))]
        scalar_dot_tile(w, acts, r0, count, sums, |blk, a, q| {
            let isum: i32 = (0..16)
                .map(|j| {
                    (blk.qs[j] & 0x0F) as i32 * q[j] as i32
                        + (blk.qs[j] >> 4) as i32 * q[j + 16] as i32
                })
                .sum();
            blk.d.to_f32() * acts.d[a] * isum as f32 + blk.m.to_f32() * acts.s[a]
        })
    }

    #[cfg(test)]
    fn values(&self) -> [f32; BLOCK] {
        let (d, m) = (self.d.to_f32(), self.m.to_f32());
        std::array::from_fn(|j| {
            if j < 16 {
                (self.qs[j] & 0x0F) as f32 * d + m
            } else {
                (self.qs[j - 16] >> 4) as f32 * d + m
            }
        })
    }
}

impl WeightBlock for Q8_0 {
    const BYTES: usize = 34;

    fn parse(b: &[u8]) -> Self {
        Self {
            d: f16::from_le_bytes([b[0], b[1]]),
            qs: std::array::from_fn(|j| b[2 + j] as i8),
        }
    }

    #[inline]
    fn dot_tile(w: &[Self], acts: &Q8Rows, r0: usize, count: usize, sums: &mut [f32; TILE]) {
        #[cfg(target_feature = "avx2")]
        // SAFETY: compiled only where AVX2 is enabled for the whole crate (target-cpu=native).
        unsafe {
            simd::dot_tile_q8_0(w, acts, r0, count, sums)
        }
        #[cfg(not(target_feature = "avx2"))]
        scalar_dot_tile(w, acts, r0, count, sums, |blk, a, q| {
            let isum: i32 = blk
                .qs
                .iter()
                .zip(q)
                .map(|(&w, &x)| w as i32 * x as i32)
                .sum();
            blk.d.to_f32() * acts.d[a] * isum as f32
        })
    }

    #[cfg(test)]
    fn values(&self) -> [f32; BLOCK] {
        let d = self.d.to_f32();
        self.qs.map(|q| q as f32 * d)
    }
}

/// The portable kernel: `block_dot(block, activation block index, activation quants)`.
#[allow(dead_code)]
fn scalar_dot_tile<B>(
    w: &[B],
    acts: &Q8Rows,
    r0: usize,
    count: usize,
    sums: &mut [f32; TILE],
    block_dot: impl Fn(&B, usize, &[i8]) -> f32,
) {
    for (i, sum) in sums[..count].iter_mut().enumerate() {
        *sum = w
            .iter()
            .enumerate()
            .map(|(b, blk)| {
                let a = (r0 + i) * acts.nb + b;
                block_dot(blk, a, &acts.qs[a * BLOCK..(a + 1) * BLOCK])
            })
            .sum();
    }
}

#[cfg(target_feature = "avx2")]
mod simd {
    use std::arch::x86_64::*;

    use super::{Q8Rows, BLOCK, Q4_1, Q8_0, TILE};

    #[inline]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Sums of four adjacent u8·i8 products, as eight i32.
    #[inline]
    #[cfg(all(target_feature = "avx512vnni", target_feature = "avx512vl"))]
    unsafe fn dot_u8_i8(u: __m256i, i: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, i)
    }

    #[inline]
    #[cfg(not(all(target_feature = "avx512vnni", target_feature = "avx512vl")))]
    unsafe fn dot_u8_i8(u: __m256i, i: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, i), _mm256_set1_epi16(1))
    }

    #[inline]
    unsafe fn load_acts(acts: &Q8Rows, a: usize) -> __m256i {
        _mm256_loadu_si256(acts.qs.as_ptr().add(a * BLOCK) as *const __m256i)
    }

    #[inline]
    pub(super) unsafe fn dot_tile_q4_1(
        w: &[Q4_1],
        acts: &Q8Rows,
        r0: usize,
        count: usize,
        sums: &mut [f32; TILE],
    ) {
        let mask = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); TILE];
        let mut offs = [0f32; TILE];
        for (b, blk) in w.iter().enumerate() {
            let q = _mm_loadu_si128(blk.qs.as_ptr() as *const __m128i);
            // Low nibbles are values 0..16, high nibbles 16..32: the activation block's order.
            let nibbles = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), mask);
            let (d, m) = (blk.d.to_f32(), blk.m.to_f32());
            for i in 0..count {
                let a = (r0 + i) * acts.nb + b;
                let products = _mm256_cvtepi32_ps(dot_u8_i8(nibbles, load_acts(acts, a)));
                acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(d * acts.d[a]), products, acc[i]);
                offs[i] += m * acts.s[a];
            }
        }
        for i in 0..count {
            sums[i] = hsum(acc[i]) + offs[i];
        }
    }

    #[inline]
    pub(super) unsafe fn dot_tile_q8_0(
        w: &[Q8_0],
        acts: &Q8Rows,
        r0: usize,
        count: usize,
        sums: &mut [f32; TILE],
    ) {
        let mut acc = [_mm256_setzero_ps(); TILE];
        for (b, blk) in w.iter().enumerate() {
            let q = _mm256_loadu_si256(blk.qs.as_ptr() as *const __m256i);
            // u8·i8 products: |w| against the activations carrying w's sign.
            let abs = _mm256_sign_epi8(q, q);
            let d = blk.d.to_f32();
            for (i, acc) in acc[..count].iter_mut().enumerate() {
                let a = (r0 + i) * acts.nb + b;
                let signed = _mm256_sign_epi8(load_acts(acts, a), q);
                let products = _mm256_cvtepi32_ps(dot_u8_i8(abs, signed));
                *acc = _mm256_fmadd_ps(_mm256_set1_ps(d * acts.d[a]), products, *acc);
            }
        }
        for i in 0..count {
            sums[i] = hsum(acc[i]);
        }
    }
}

/// An output buffer shared by pool workers that each write their own disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: users guarantee disjoint writes (see `matmul`, `llama::attention`), and the pool joins
// every worker before the buffer is read.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}
impl SharedOut {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(
        n_blocks: usize,
        seed: u32,
        block: impl Fn(&mut dyn FnMut() -> u8) -> Vec<u8>,
    ) -> Vec<u8> {
        let mut state = seed;
        let mut next = move || {
            state = state.wrapping_mul(1664525).wrapping_add(1013904223);
            (state >> 8) as u8
        };
        (0..n_blocks).flat_map(|_| block(&mut next)).collect()
    }

    fn q4_1(rows: usize, cols: usize) -> QMatrix<Q4_1> {
        let raw = bytes(rows * cols / BLOCK, 9, |next| {
            let mut b = f16::from_f32(0.01 + next() as f32 / 5000.0)
                .to_le_bytes()
                .to_vec();
            b.extend(f16::from_f32(-(next() as f32) / 2000.0).to_le_bytes());
            b.extend((0..16).map(|_| next()));
            b
        });
        QMatrix::from_ggml(&raw, rows, cols).unwrap()
    }

    fn q8_0(rows: usize, cols: usize) -> QMatrix<Q8_0> {
        let raw = bytes(rows * cols / BLOCK, 5, |next| {
            let mut b = f16::from_f32(0.001 + next() as f32 / 20000.0)
                .to_le_bytes()
                .to_vec();
            // Include -128, the one value whose sign flip overflows.
            b.extend((0..32).map(|j| if j == 3 { 0x80 } else { next() }));
            b
        });
        QMatrix::from_ggml(&raw, rows, cols).unwrap()
    }

    fn check<B: WeightBlock>(w: &QMatrix<B>, m: usize) {
        let (rows, cols) = (w.rows, w.cols);
        let dense = w.dequantize();
        let x: Vec<f32> = (0..m * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let got = w.matmul(&x, m);
        for r in 0..m {
            for j in 0..rows {
                let terms = (0..cols).map(|c| x[r * cols + c] * dense[j * cols + c]);
                let want: f32 = terms.clone().sum();
                let scale: f32 = terms.map(f32::abs).sum();
                // int8 activations: each term is off by at most 1/254 of its block's largest value
                let err = (got[r * rows + j] - want).abs();
                assert!(
                    err < scale / 100.0,
                    "row {r} col {j}: {} vs {want} (scale {scale})",
                    got[r * rows + j]
                );
            }
        }
    }

    #[test]
    fn q4_1_matches_dequantized_f32_matmul() {
        check(&q4_1(37, 96), 7);
        check(&q4_1(16, 64), 1);
    }

    #[test]
    fn q8_0_matches_dequantized_f32_matmul() {
        check(&q8_0(37, 96), 7);
        check(&q8_0(16, 64), 1);
    }
}
