//! Quantized weights × int8 activations, our own kernels for the GGUF types the default model uses
//! (Q4_1 layers, Q8_0 embeddings/output). candle 0.11 has no SIMD dot product for Q4_1 (its scalar
//! fallback took 77% of decode time) and re-reads the weights for every activation row. Here:
//! - one pass over a weight row serves up to four activation rows (prefill, batched decode);
//! - blocks of 32 are dotted with AVX-512 VNNI `vpdpbusd` (AVX2 `maddubs` without it), and eight
//!   blocks' integer sums are reduced together so their scales apply in one vector multiply;
//! - weights are stored split (quants, scales, mins) so eight scales load as one f16 vector;
//! - output rows are spread over candle's thread pool.

use half::f16;

const BLOCK: usize = 32;
/// Activation rows that share one pass over the weights.
const TILE: usize = 4;
/// Blocks whose scales are applied together.
const GROUP: usize = 8;

/// ggml's `block_q4_1` (value j = d·q_j + m, q_j in 0..16; byte j holds q_j low and q_{j+16}
/// high), stored split.
pub struct Q4_1Matrix {
    rows: usize,
    cols: usize,
    qs: Vec<[u8; 16]>,
    d: Vec<f16>,
    m: Vec<f16>,
}

/// ggml's `block_q8_0` (value j = d·q_j), stored split.
pub struct Q8_0Matrix {
    rows: usize,
    cols: usize,
    qs: Vec<[i8; 32]>,
    d: Vec<f16>,
}

/// Activations quantized per 32 values: `q ≈ x / d`, and `s = d · Σq` for Q4_1's offset term.
pub struct Q8Rows {
    d: Vec<f32>,
    s: Vec<f32>,
    qs: Vec<i8>,
    /// Blocks per row.
    nb: usize,
}

/// What the shared matmul driver needs of a weight matrix.
pub trait RowDot: Sync {
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
    /// Dot products of weight row `j` with activation rows `r0..r0 + count` into `sums`.
    fn dot_tile(&self, j: usize, acts: &Q8Rows, r0: usize, count: usize, sums: &mut [f32; TILE]);
}

/// A matrix read from a GGUF tensor's raw bytes.
pub trait GgmlMatrix: Sized {
    fn from_ggml(bytes: &[u8], rows: usize, cols: usize) -> Option<Self>;
    /// Stack matrices with the same number of columns (fused projections).
    fn concat(parts: Vec<Self>) -> Option<Self>;
}

fn blocks_of(
    bytes: &[u8],
    rows: usize,
    cols: usize,
    block_bytes: usize,
) -> Option<std::slice::ChunksExact<'_, u8>> {
    (cols.is_multiple_of(BLOCK) && bytes.len() == rows * cols / BLOCK * block_bytes)
        .then(|| bytes.chunks_exact(block_bytes))
}

fn same_cols(cols: impl Iterator<Item = usize>) -> Option<usize> {
    let mut cols = cols.peekable();
    let first = *cols.peek()?;
    cols.all(|c| c == first).then_some(first)
}

impl GgmlMatrix for Q4_1Matrix {
    /// From ggml's raw bytes (20 a block).
    fn from_ggml(bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        let mut out = Self {
            rows,
            cols,
            qs: Vec::new(),
            d: Vec::new(),
            m: Vec::new(),
        };
        for b in blocks_of(bytes, rows, cols, 20)? {
            out.d.push(f16::from_le_bytes([b[0], b[1]]));
            out.m.push(f16::from_le_bytes([b[2], b[3]]));
            out.qs.push(b[4..20].try_into().unwrap());
        }
        Some(out)
    }

    fn concat(parts: Vec<Self>) -> Option<Self> {
        let cols = same_cols(parts.iter().map(|p| p.cols))?;
        let rows = parts.iter().map(|p| p.rows).sum();
        let mut out = Self {
            rows,
            cols,
            qs: Vec::new(),
            d: Vec::new(),
            m: Vec::new(),
        };
        for p in parts {
            out.qs.extend(p.qs);
            out.d.extend(p.d);
            out.m.extend(p.m);
        }
        Some(out)
    }
}

impl Q4_1Matrix {
    #[cfg(test)]
    fn dequantize(&self) -> Vec<f32> {
        (0..self.qs.len())
            .flat_map(|b| {
                let (d, m, q) = (self.d[b].to_f32(), self.m[b].to_f32(), self.qs[b]);
                (0..BLOCK).map(move |j| {
                    if j < 16 {
                        (q[j] & 0x0F) as f32 * d + m
                    } else {
                        (q[j - 16] >> 4) as f32 * d + m
                    }
                })
            })
            .collect()
    }
}

impl GgmlMatrix for Q8_0Matrix {
    /// From ggml's raw bytes (34 a block).
    fn from_ggml(bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        let mut out = Self {
            rows,
            cols,
            qs: Vec::new(),
            d: Vec::new(),
        };
        for b in blocks_of(bytes, rows, cols, 34)? {
            out.d.push(f16::from_le_bytes([b[0], b[1]]));
            out.qs.push(std::array::from_fn(|j| b[2 + j] as i8));
        }
        Some(out)
    }

    fn concat(parts: Vec<Self>) -> Option<Self> {
        let cols = same_cols(parts.iter().map(|p| p.cols))?;
        let rows = parts.iter().map(|p| p.rows).sum();
        let mut out = Self {
            rows,
            cols,
            qs: Vec::new(),
            d: Vec::new(),
        };
        for p in parts {
            out.qs.extend(p.qs);
            out.d.extend(p.d);
        }
        Some(out)
    }
}

impl Q8_0Matrix {
    #[cfg(test)]
    fn dequantize(&self) -> Vec<f32> {
        (0..self.qs.len())
            .flat_map(|b| self.qs[b].map(|q| q as f32 * self.d[b].to_f32()))
            .collect()
    }
}

/// `x` is `m` rows of `w.cols()`; returns `m` rows of `w.rows()` values.
pub fn matmul<W: RowDot>(w: &W, x: &[f32], m: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * w.cols(), "matmul input shape");
    let acts = quantize(x, m, w.cols());
    let n = w.rows();
    let mut out = vec![0f32; m * n];
    let dst = SharedOut(out.as_mut_ptr());
    let tiles = m.div_ceil(TILE);
    // Work items: (chunk of weight rows, activation tile); a chunk's weights stay in cache while
    // a worker goes through the tiles.
    const CHUNK: usize = 16;
    let chunks = n.div_ceil(CHUNK);
    candle_core::utils::barrier_pool().execute_chunked(chunks * tiles, |range| {
        for item in range {
            let (chunk, tile) = (item / tiles, item % tiles);
            let r0 = tile * TILE;
            let count = TILE.min(m - r0);
            for j in chunk * CHUNK..((chunk + 1) * CHUNK).min(n) {
                let mut sums = [0f32; TILE];
                w.dot_tile(j, &acts, r0, count, &mut sums);
                for (i, s) in sums[..count].iter().enumerate() {
                    // SAFETY: item (chunk, tile) alone writes rows r0..r0+count × its chunk's columns.
                    unsafe { *dst.get().add((r0 + i) * n + j) = *s };
                }
            }
        }
    });
    out
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

impl RowDot for Q4_1Matrix {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    #[inline]
    fn dot_tile(&self, j: usize, acts: &Q8Rows, r0: usize, count: usize, sums: &mut [f32; TILE]) {
        let nb = acts.nb;
        let (qs, d, m) = (
            &self.qs[j * nb..(j + 1) * nb],
            &self.d[j * nb..(j + 1) * nb],
            &self.m[j * nb..(j + 1) * nb],
        );
        #[cfg(target_feature = "avx2")]
        // SAFETY: compiled only where AVX2 is enabled for the whole crate (target-cpu=native).
        unsafe {
            simd::dot_tile_q4_1(qs, d, m, acts, r0, count, sums)
        }
        #[cfg(not(target_feature = "avx2"))]
        for (i, sum) in sums[..count].iter_mut().enumerate() {
            *sum = (0..nb)
                .map(|b| {
                    let a = (r0 + i) * nb + b;
                    let x = &acts.qs[a * BLOCK..(a + 1) * BLOCK];
                    let isum: i32 = (0..16)
                        .map(|k| {
                            (qs[b][k] & 0x0F) as i32 * x[k] as i32
                                + (qs[b][k] >> 4) as i32 * x[k + 16] as i32
                        })
                        .sum();
                    d[b].to_f32() * acts.d[a] * isum as f32 + m[b].to_f32() * acts.s[a]
                })
                .sum();
        }
    }
}

impl RowDot for Q8_0Matrix {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    #[inline]
    fn dot_tile(&self, j: usize, acts: &Q8Rows, r0: usize, count: usize, sums: &mut [f32; TILE]) {
        let nb = acts.nb;
        let (qs, d) = (
            &self.qs[j * nb..(j + 1) * nb],
            &self.d[j * nb..(j + 1) * nb],
        );
        #[cfg(target_feature = "avx2")]
        // SAFETY: compiled only where AVX2 is enabled for the whole crate (target-cpu=native).
        unsafe {
            simd::dot_tile_q8_0(qs, d, acts, r0, count, sums)
        }
        #[cfg(not(target_feature = "avx2"))]
        for (i, sum) in sums[..count].iter_mut().enumerate() {
            *sum = (0..nb)
                .map(|b| {
                    let a = (r0 + i) * nb + b;
                    let x = &acts.qs[a * BLOCK..(a + 1) * BLOCK];
                    let isum: i32 = qs[b]
                        .iter()
                        .zip(x)
                        .map(|(&w, &x)| w as i32 * x as i32)
                        .sum();
                    d[b].to_f32() * acts.d[a] * isum as f32
                })
                .sum();
        }
    }
}

#[cfg(target_feature = "avx2")]
mod simd {
    use std::arch::x86_64::*;

    use half::f16;

    use super::{Q8Rows, BLOCK, GROUP, TILE};

    #[inline]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Lane k of the result is the sum of the eight lanes of `v[k]`.
    #[inline]
    unsafe fn hsum8(v: &[__m256i; GROUP]) -> __m256i {
        let t0 = _mm256_hadd_epi32(v[0], v[1]);
        let t1 = _mm256_hadd_epi32(v[2], v[3]);
        let t2 = _mm256_hadd_epi32(v[4], v[5]);
        let t3 = _mm256_hadd_epi32(v[6], v[7]);
        let u0 = _mm256_hadd_epi32(t0, t1);
        let u1 = _mm256_hadd_epi32(t2, t3);
        _mm256_add_epi32(
            _mm256_permute2x128_si256(u0, u1, 0x20),
            _mm256_permute2x128_si256(u0, u1, 0x31),
        )
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
    unsafe fn load_f16x8(v: &[f16]) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr() as *const __m128i))
    }

    /// The blocks of one weight row as u8 vectors in the activations' value order (Q4_1: low
    /// nibbles are values 0..16, high nibbles 16..32).
    #[inline]
    unsafe fn nibbles(q: &[u8; 16]) -> __m256i {
        let q = _mm_loadu_si128(q.as_ptr() as *const __m128i);
        _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16(q, 4), q),
            _mm256_set1_epi8(0x0F),
        )
    }

    /// Σ_b d_b·da_b·(w_b · x_b) for activation rows `r0..r0 + count`. `unpack(b)` gives block b's
    /// weights as a u8 vector and, for signed weights, the vector whose signs the activations take.
    /// Eight blocks at a time, their integer sums get their scales in one vector multiply.
    #[inline(always)]
    unsafe fn scaled_dots(
        nb: usize,
        d: &[f16],
        acts: &Q8Rows,
        r0: usize,
        count: usize,
        sums: &mut [f32; TILE],
        unpack: impl Fn(usize) -> (__m256i, Option<__m256i>),
    ) {
        let dot = |(u, sign): (__m256i, Option<__m256i>), a: usize| {
            let x = load_acts(acts, a);
            dot_u8_i8(u, sign.map_or(x, |s| _mm256_sign_epi8(x, s)))
        };
        let mut acc = [_mm256_setzero_ps(); TILE];
        let groups = nb / GROUP;
        for b0 in (0..groups).map(|g| g * GROUP) {
            let w: [(__m256i, Option<__m256i>); GROUP] = std::array::from_fn(|k| unpack(b0 + k));
            let dw = load_f16x8(&d[b0..]);
            for (i, acc) in acc[..count].iter_mut().enumerate() {
                let a0 = (r0 + i) * acts.nb + b0;
                let dots: [__m256i; GROUP] = std::array::from_fn(|k| dot(w[k], a0 + k));
                let scale = _mm256_mul_ps(dw, _mm256_loadu_ps(acts.d.as_ptr().add(a0)));
                *acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(hsum8(&dots)), *acc);
            }
        }
        for (i, sum) in sums[..count].iter_mut().enumerate() {
            *sum = hsum(acc[i]);
        }
        for b in groups * GROUP..nb {
            let w = unpack(b);
            for (i, sum) in sums[..count].iter_mut().enumerate() {
                let a = (r0 + i) * acts.nb + b;
                *sum += d[b].to_f32() * acts.d[a] * hsum(_mm256_cvtepi32_ps(dot(w, a)));
            }
        }
    }

    pub(super) unsafe fn dot_tile_q4_1(
        qs: &[[u8; 16]],
        d: &[f16],
        m: &[f16],
        acts: &Q8Rows,
        r0: usize,
        count: usize,
        sums: &mut [f32; TILE],
    ) {
        let nb = qs.len();
        scaled_dots(nb, d, acts, r0, count, sums, |b| (nibbles(&qs[b]), None));
        // Q4_1's offset term: Σ_b m_b·s_b.
        let groups = nb / GROUP;
        for (i, sum) in sums[..count].iter_mut().enumerate() {
            let a0 = (r0 + i) * acts.nb;
            let mut acc = _mm256_setzero_ps();
            for b0 in (0..groups).map(|g| g * GROUP) {
                acc = _mm256_fmadd_ps(
                    load_f16x8(&m[b0..]),
                    _mm256_loadu_ps(acts.s.as_ptr().add(a0 + b0)),
                    acc,
                );
            }
            *sum += hsum(acc)
                + (groups * GROUP..nb)
                    .map(|b| m[b].to_f32() * acts.s[a0 + b])
                    .sum::<f32>();
        }
    }

    pub(super) unsafe fn dot_tile_q8_0(
        qs: &[[i8; 32]],
        d: &[f16],
        acts: &Q8Rows,
        r0: usize,
        count: usize,
        sums: &mut [f32; TILE],
    ) {
        // u8·i8 products: |w| against the activations carrying w's sign.
        scaled_dots(qs.len(), d, acts, r0, count, sums, |b| {
            let q = _mm256_loadu_si256(qs[b].as_ptr() as *const __m256i);
            (_mm256_sign_epi8(q, q), Some(q))
        });
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

    fn q4_1(rows: usize, cols: usize) -> Q4_1Matrix {
        let raw = bytes(rows * cols / BLOCK, 9, |next| {
            let mut b = f16::from_f32(0.01 + next() as f32 / 5000.0)
                .to_le_bytes()
                .to_vec();
            b.extend(f16::from_f32(-(next() as f32) / 2000.0).to_le_bytes());
            b.extend((0..16).map(|_| next()));
            b
        });
        Q4_1Matrix::from_ggml(&raw, rows, cols).unwrap()
    }

    fn q8_0(rows: usize, cols: usize) -> Q8_0Matrix {
        let raw = bytes(rows * cols / BLOCK, 5, |next| {
            let mut b = f16::from_f32(0.001 + next() as f32 / 20000.0)
                .to_le_bytes()
                .to_vec();
            // Include -128, the one value whose sign flip overflows.
            b.extend((0..32).map(|j| if j == 3 { 0x80 } else { next() }));
            b
        });
        Q8_0Matrix::from_ggml(&raw, rows, cols).unwrap()
    }

    fn check(w: &impl RowDot, dense: &[f32], m: usize) {
        let (rows, cols) = (w.rows(), w.cols());
        let x: Vec<f32> = (0..m * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let got = matmul(w, &x, m);
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

    // Column counts cover whole groups of eight blocks, a tail, and a tail alone.
    const SHAPES: [(usize, usize, usize); 4] = [(37, 96, 7), (16, 64, 1), (9, 576, 5), (5, 512, 2)];

    #[test]
    fn q4_1_matches_dequantized_f32_matmul() {
        for (rows, cols, m) in SHAPES {
            let w = q4_1(rows, cols);
            check(&w, &w.dequantize(), m);
        }
    }

    #[test]
    fn q8_0_matches_dequantized_f32_matmul() {
        for (rows, cols, m) in SHAPES {
            let w = q8_0(rows, cols);
            check(&w, &w.dequantize(), m);
        }
    }

    #[test]
    fn concat_stacks_rows() {
        let (a, b) = (q4_1(3, 64), q4_1(2, 64));
        let (da, db) = (a.dequantize(), b.dequantize());
        let both = Q4_1Matrix::concat(vec![a, b]).unwrap();
        assert_eq!(both.rows(), 5);
        assert_eq!(both.dequantize(), [da, db].concat());
    }
}
