//! Q4_1 weights × int8 activations, our own kernel: candle 0.11 has no SIMD dot product for Q4_1
//! (its scalar fallback took 77% of decode time), and its matmul re-reads the weights for every
//! activation row. Here one pass over a weight row serves up to four activation rows, the dot
//! product is AVX2 (`maddubs`), and rows are split across candle's thread pool.

use half::f16;

const BLOCK: usize = 32;
/// Activation rows that share one pass over the weights.
const TILE: usize = 4;

/// ggml's `block_q4_1`: value j = d·q_j + m, q_j in 0..16; bytes hold q_j (low nibble) and
/// q_{j+16} (high nibble).
#[derive(Clone, Copy, Debug)]
#[repr(C)]
struct Block {
    d: f16,
    m: f16,
    qs: [u8; 16],
}

/// A `rows × cols` Q4_1 matrix (each row is one output feature).
pub struct Q4_1Matrix {
    rows: usize,
    cols: usize,
    blocks: Vec<Block>,
}

/// Activations quantized per 32 values: `q ≈ x / d`, and `s = d · Σq` for the weights' offset term.
struct Q8Rows {
    d: Vec<f32>,
    s: Vec<f32>,
    qs: Vec<i8>,
}

impl Q4_1Matrix {
    /// From ggml's raw bytes (20 per block of 32 values).
    pub fn from_ggml(bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if cols % BLOCK != 0 || bytes.len() != rows * cols / BLOCK * 20 {
            return None;
        }
        let blocks = bytes
            .chunks_exact(20)
            .map(|b| Block {
                d: f16::from_le_bytes([b[0], b[1]]),
                m: f16::from_le_bytes([b[2], b[3]]),
                qs: b[4..20].try_into().unwrap(),
            })
            .collect();
        Some(Self { rows, cols, blocks })
    }

    /// Stack matrices with the same number of columns (fused projections).
    pub fn concat(parts: Vec<Self>) -> Option<Self> {
        let cols = parts.first()?.cols;
        if parts.iter().any(|p| p.cols != cols) {
            return None;
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let blocks = parts.into_iter().flat_map(|p| p.blocks).collect();
        Some(Self { rows, cols, blocks })
    }

    /// `x` is `m` rows of `cols`; returns `m` rows of `rows` values.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "matmul input shape");
        let acts = quantize(x, m, self.cols);
        let n = self.rows;
        let mut out = vec![0f32; m * n];
        let dst = SharedOut(out.as_mut_ptr());
        let nb = self.cols / BLOCK;
        let tiles = m.div_ceil(TILE);
        // Work items: (activation tile, chunk of weight rows); weights of a chunk stay in cache
        // while a worker goes through the tiles.
        const CHUNK: usize = 16;
        let chunks = n.div_ceil(CHUNK);
        candle_core::utils::barrier_pool().execute_chunked(chunks * tiles, |range| {
            for item in range {
                let (chunk, tile) = (item / tiles, item % tiles);
                let r0 = tile * TILE;
                let r1 = (r0 + TILE).min(m);
                for j in chunk * CHUNK..((chunk + 1) * CHUNK).min(n) {
                    let w = &self.blocks[j * nb..(j + 1) * nb];
                    let mut sums = [0f32; TILE];
                    dot_tile(w, &acts, r0, r1 - r0, nb, &mut sums);
                    for (i, s) in sums[..r1 - r0].iter().enumerate() {
                        // SAFETY: item (chunk, tile) alone writes rows r0..r1 × columns of its chunk.
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
        self.blocks
            .iter()
            .flat_map(|b| {
                let (d, m) = (b.d.to_f32(), b.m.to_f32());
                let lo = b.qs.map(|q| (q & 0x0F) as f32 * d + m);
                let hi = b.qs.map(|q| (q >> 4) as f32 * d + m);
                lo.into_iter().chain(hi)
            })
            .collect()
    }
}

fn quantize(x: &[f32], m: usize, cols: usize) -> Q8Rows {
    let nb = m * cols / BLOCK;
    let mut acts = Q8Rows {
        d: Vec::with_capacity(nb),
        s: Vec::with_capacity(nb),
        qs: vec![0; m * cols],
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

/// Dot products of one weight row with activation rows `r0..r0 + count` into `sums`.
#[inline]
fn dot_tile(
    w: &[Block],
    acts: &Q8Rows,
    r0: usize,
    count: usize,
    nb: usize,
    sums: &mut [f32; TILE],
) {
    #[cfg(target_feature = "avx2")]
    {
        // SAFETY: compiled only where AVX2 is enabled for the whole crate (target-cpu=native).
        unsafe { avx2::dot_tile(w, acts, r0, count, nb, sums) }
    }
    #[cfg(not(target_feature = "avx2"))]
    dot_tile_scalar(w, acts, r0, count, nb, sums)
}

#[allow(dead_code)]
fn dot_tile_scalar(
    w: &[Block],
    acts: &Q8Rows,
    r0: usize,
    count: usize,
    nb: usize,
    sums: &mut [f32; TILE],
) {
    for (i, sum) in sums[..count].iter_mut().enumerate() {
        let row = r0 + i;
        let mut acc = 0f32;
        for (b, blk) in w.iter().enumerate() {
            let a = row * nb + b;
            let q = &acts.qs[a * BLOCK..(a + 1) * BLOCK];
            let mut isum = 0i32;
            for j in 0..16 {
                isum += (blk.qs[j] & 0x0F) as i32 * q[j] as i32
                    + (blk.qs[j] >> 4) as i32 * q[j + 16] as i32;
            }
            acc += blk.d.to_f32() * acts.d[a] * isum as f32 + blk.m.to_f32() * acts.s[a];
        }
        *sum = acc;
    }
}

#[cfg(target_feature = "avx2")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Block, Q8Rows, BLOCK, TILE};

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
    unsafe fn dot_u8_i8(u: __m256i, i: __m256i, _ones: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, i)
    }

    #[inline]
    #[cfg(not(all(target_feature = "avx512vnni", target_feature = "avx512vl")))]
    unsafe fn dot_u8_i8(u: __m256i, i: __m256i, ones: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, i), ones)
    }

    #[inline]
    pub(super) unsafe fn dot_tile(
        w: &[Block],
        acts: &Q8Rows,
        r0: usize,
        count: usize,
        nb: usize,
        sums: &mut [f32; TILE],
    ) {
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); TILE];
        let mut offs = [0f32; TILE];
        for (b, blk) in w.iter().enumerate() {
            let q = _mm_loadu_si128(blk.qs.as_ptr() as *const __m128i);
            // Low nibbles are values 0..16, high nibbles 16..32: the Q8 block's order.
            let nibbles = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), mask);
            let (d, m) = (blk.d.to_f32(), blk.m.to_f32());
            for i in 0..count {
                let a = (r0 + i) * nb + b;
                let y = _mm256_loadu_si256(acts.qs.as_ptr().add(a * BLOCK) as *const __m256i);
                let products = dot_u8_i8(nibbles, y, ones);
                acc[i] = _mm256_fmadd_ps(
                    _mm256_set1_ps(d * acts.d[a]),
                    _mm256_cvtepi32_ps(products),
                    acc[i],
                );
                offs[i] += m * acts.s[a];
            }
        }
        for i in 0..count {
            sums[i] = hsum(acc[i]) + offs[i];
        }
    }
}

#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: workers write disjoint elements (see `matmul`) and the pool joins before `out` is read.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}
impl SharedOut {
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_matrix(rows: usize, cols: usize, seed: u32) -> Q4_1Matrix {
        let mut state = seed;
        let mut next = || {
            state = state.wrapping_mul(1664525).wrapping_add(1013904223);
            (state >> 8) as u8
        };
        let mut bytes = Vec::new();
        for _ in 0..rows * cols / BLOCK {
            bytes.extend_from_slice(&f16::from_f32(0.01 + next() as f32 / 5000.0).to_le_bytes());
            bytes.extend_from_slice(&f16::from_f32(-(next() as f32) / 2000.0).to_le_bytes());
            bytes.extend((0..16).map(|_| next()));
        }
        Q4_1Matrix::from_ggml(&bytes, rows, cols).unwrap()
    }

    #[test]
    fn matches_dequantized_f32_matmul() {
        let (rows, cols, m) = (37, 96, 7);
        let w = random_matrix(rows, cols, 9);
        let dense = w.dequantize();
        let x: Vec<f32> = (0..m * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let got = w.matmul(&x, m);
        for r in 0..m {
            for j in 0..rows {
                let want: f32 = (0..cols)
                    .map(|c| x[r * cols + c] * dense[j * cols + c])
                    .sum();
                let scale: f32 = (0..cols)
                    .map(|c| (x[r * cols + c] * dense[j * cols + c]).abs())
                    .sum();
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
    fn simd_equals_scalar() {
        let (rows, cols, m) = (5, 64, 3);
        let w = random_matrix(rows, cols, 4);
        let x: Vec<f32> = (0..m * cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let acts = quantize(&x, m, cols);
        let nb = cols / BLOCK;
        for j in 0..rows {
            let row = &w.blocks[j * nb..(j + 1) * nb];
            let (mut a, mut b) = ([0f32; TILE], [0f32; TILE]);
            dot_tile(row, &acts, 0, m, nb, &mut a);
            dot_tile_scalar(row, &acts, 0, m, nb, &mut b);
            for i in 0..m {
                assert!(
                    (a[i] - b[i]).abs() < 1e-4 * b[i].abs().max(1.0),
                    "{a:?} vs {b:?}"
                );
            }
        }
    }
}
