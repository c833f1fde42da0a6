//! Weight matrices in our kernels' layout: GGUF's Q4_1 and Q8_0 blocks, their rows interleaved
//! in panels so that a vector lane is one weight row.

use half::f16;

use super::super::huge::HugeSlice;
use super::PanelDot;
#[cfg(target_feature = "avx2")]
use super::{kernel, Q8Rows, Sums};
use super::{Chunk, BLOCK, PANEL, Q8_OFFSET};
#[cfg(not(target_feature = "avx2"))]
use super::{Q8Rows, Sums};

/// ggml's `block_q4_1` (value j = d·q_j + m, q_j in 0..16; byte j holds q_j low and q_{j+16}
/// high), interleaved by panels: chunk c of (panel, block) holds bytes 4c..4c+4 of each of the
/// panel's rows (lane r = row r), so its low nibbles are values 4c..4c+4 and its high ones
/// 16+4c..20+4c. Scales are `[panel][block][row]`. Rows past `rows` are zero.
pub struct Q4_1Matrix {
    rows: usize,
    cols: usize,
    qs: HugeSlice<Chunk>,
    d: HugeSlice<f16>,
    m: HugeSlice<f16>,
}

/// ggml's `block_q8_0` (value j = d·q_j), interleaved like `Q4_1Matrix`: chunk c of (panel,
/// block) holds values 4c..4c+4 of each row.
pub struct Q8_0Matrix {
    rows: usize,
    cols: usize,
    qs: HugeSlice<Chunk>,
    d: HugeSlice<f16>,
}

/// A matrix read from a GGUF tensor's raw bytes (several tensors of the same type and width
/// concatenated are one matrix with their rows stacked: fused projections).
pub trait GgmlMatrix: Sized {
    fn from_ggml(bytes: &[u8], rows: usize, cols: usize) -> Option<Self>;
}

fn blocks_of(bytes: &[u8], rows: usize, cols: usize, block_bytes: usize) -> Option<Vec<&[u8]>> {
    (cols.is_multiple_of(BLOCK) && bytes.len() == rows * cols / BLOCK * block_bytes)
        .then(|| bytes.chunks_exact(block_bytes).collect())
}

/// Interleave `B`-byte quant blocks (`quants(row, block)`) into panel chunks (see `Q4_1Matrix`).
fn interleave<const B: usize>(
    rows: usize,
    nb: usize,
    quants: impl Fn(usize, usize) -> [u8; B],
) -> HugeSlice<Chunk> {
    let chunks = B / 4;
    let mut out = vec![[0u8; 4 * PANEL]; rows.div_ceil(PANEL) * nb * chunks];
    for j in 0..rows {
        let (p, r) = (j / PANEL, j % PANEL);
        for b in 0..nb {
            let q = quants(j, b);
            for c in 0..chunks {
                out[(p * nb + b) * chunks + c][4 * r..4 * r + 4]
                    .copy_from_slice(&q[4 * c..4 * c + 4]);
            }
        }
    }
    HugeSlice::copy_of(&out)
}

/// Per-block scales (`scale(row, block)`) as `[panel][block][row]`.
fn interleave_scales(
    rows: usize,
    nb: usize,
    scale: impl Fn(usize, usize) -> f16,
) -> HugeSlice<f16> {
    let mut out = vec![f16::ZERO; rows.div_ceil(PANEL) * nb * PANEL];
    for j in 0..rows {
        for b in 0..nb {
            out[((j / PANEL) * nb + b) * PANEL + j % PANEL] = scale(j, b);
        }
    }
    HugeSlice::copy_of(&out)
}

impl GgmlMatrix for Q4_1Matrix {
    /// From ggml's raw bytes (20 a block).
    fn from_ggml(bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        let blocks = blocks_of(bytes, rows, cols, 20)?;
        let nb = cols / BLOCK;
        let at = |j: usize, b: usize| blocks[j * nb + b];
        let half = |j, b, o: usize| f16::from_le_bytes([at(j, b)[o], at(j, b)[o + 1]]);
        Some(Self {
            rows,
            cols,
            qs: interleave::<16>(rows, nb, |j, b| at(j, b)[4..20].try_into().unwrap()),
            d: interleave_scales(rows, nb, |j, b| half(j, b, 0)),
            m: interleave_scales(rows, nb, |j, b| half(j, b, 2)),
        })
    }
}

impl GgmlMatrix for Q8_0Matrix {
    /// From ggml's raw bytes (34 a block).
    fn from_ggml(bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        let blocks = blocks_of(bytes, rows, cols, 34)?;
        let nb = cols / BLOCK;
        let at = |j: usize, b: usize| blocks[j * nb + b];
        Some(Self {
            rows,
            cols,
            qs: interleave::<32>(rows, nb, |j, b| {
                let q: [u8; 32] = at(j, b)[2..34].try_into().unwrap();
                q.map(|q| if Q8_OFFSET { q ^ 0x80 } else { q })
            }),
            d: interleave_scales(rows, nb, |j, b| {
                f16::from_le_bytes([at(j, b)[0], at(j, b)[1]])
            }),
        })
    }
}

/// Byte k (0..B) of row `j`'s block `b` in an interleaved matrix of `chunks` chunks per block.
#[cfg(any(test, not(target_feature = "avx2")))]
fn quant_byte(qs: &[Chunk], nb: usize, chunks: usize, j: usize, b: usize, k: usize) -> u8 {
    let (p, r) = (j / PANEL, j % PANEL);
    qs[(p * nb + b) * chunks + k / 4][4 * r + k % 4]
}

impl Q4_1Matrix {
    /// Value `k` (0..32) of row `j`'s block `b` as (quant, d, m).
    #[cfg(any(test, not(target_feature = "avx2")))]
    fn value(&self, j: usize, b: usize, k: usize) -> (i32, f32, f32) {
        let nb = self.cols / BLOCK;
        let byte = quant_byte(&self.qs, nb, 4, j, b, k % 16);
        let q = if k < 16 { byte & 0x0F } else { byte >> 4 };
        let s = ((j / PANEL) * nb + b) * PANEL + j % PANEL;
        (q as i32, self.d[s].to_f32(), self.m[s].to_f32())
    }

    #[cfg(test)]
    pub(super) fn dequantize(&self) -> Vec<f32> {
        let nb = self.cols / BLOCK;
        (0..self.rows * nb * BLOCK)
            .map(|i| {
                let (q, d, m) = self.value(i / self.cols, i % self.cols / BLOCK, i % BLOCK);
                q as f32 * d + m
            })
            .collect()
    }
}

impl Q8_0Matrix {
    /// Value `k` (0..32) of row `j`'s block `b` as (quant, d).
    #[cfg(any(test, not(target_feature = "avx2")))]
    fn value(&self, j: usize, b: usize, k: usize) -> (i32, f32) {
        let nb = self.cols / BLOCK;
        let byte = quant_byte(&self.qs, nb, 8, j, b, k);
        let q = if Q8_OFFSET { byte ^ 0x80 } else { byte } as i8;
        let s = ((j / PANEL) * nb + b) * PANEL + j % PANEL;
        (q as i32, self.d[s].to_f32())
    }

    #[cfg(test)]
    pub(super) fn dequantize(&self) -> Vec<f32> {
        let nb = self.cols / BLOCK;
        (0..self.rows * nb * BLOCK)
            .map(|i| {
                let (q, d) = self.value(i / self.cols, i % self.cols / BLOCK, i % BLOCK);
                q as f32 * d
            })
            .collect()
    }
}

/// `dot_panel` without AVX2, one product at a time. `value(j, b, k)` is value k of row j's block
/// b as (quant, d, m), for Σ_b d·da·(q · x) + m·s.
#[cfg(not(target_feature = "avx2"))]
fn portable_panel(
    rows: usize,
    p: usize,
    acts: &Q8Rows,
    r0: usize,
    count: usize,
    sums: &mut Sums,
    value: impl Fn(usize, usize, usize) -> (i32, f32, f32),
) {
    let nb = acts.nb;
    for (i, s) in sums[..count].iter_mut().enumerate() {
        for (r, sum) in s.iter_mut().enumerate() {
            let j = p * PANEL + r;
            if j >= rows {
                break;
            }
            *sum = (0..nb)
                .map(|b| {
                    let a = (r0 + i) * nb + b;
                    let x = &acts.qs[a * BLOCK..(a + 1) * BLOCK];
                    let (_, d, m) = value(j, b, 0);
                    let isum: i32 = (0..BLOCK).map(|k| value(j, b, k).0 * x[k] as i32).sum();
                    d * acts.d[a] * isum as f32 + m * acts.s[a]
                })
                .sum();
        }
    }
}

impl PanelDot for Q4_1Matrix {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    #[inline]
    fn dot_panel(&self, p: usize, acts: &Q8Rows, r0: usize, count: usize, sums: &mut Sums) {
        #[cfg(target_feature = "avx2")]
        // SAFETY: compiled only where AVX2 is enabled for the whole crate (target-cpu=native).
        unsafe {
            let nb = acts.nb;
            let (qs, scales) = (
                p * nb * 4..(p + 1) * nb * 4,
                p * nb * PANEL..(p + 1) * nb * PANEL,
            );
            kernel::panel_q4_1(
                &self.qs[qs],
                &self.d[scales.clone()],
                &self.m[scales],
                acts,
                r0,
                count,
                sums,
            )
        }
        #[cfg(not(target_feature = "avx2"))]
        portable_panel(self.rows, p, acts, r0, count, sums, |j, b, k| {
            self.value(j, b, k)
        });
    }
}

impl PanelDot for Q8_0Matrix {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    #[inline]
    fn dot_panel(&self, p: usize, acts: &Q8Rows, r0: usize, count: usize, sums: &mut Sums) {
        #[cfg(target_feature = "avx2")]
        // SAFETY: compiled only where AVX2 is enabled for the whole crate (target-cpu=native).
        unsafe {
            let nb = acts.nb;
            let (qs, scales) = (
                p * nb * 8..(p + 1) * nb * 8,
                p * nb * PANEL..(p + 1) * nb * PANEL,
            );
            kernel::panel_q8_0(&self.qs[qs], &self.d[scales], acts, r0, count, sums)
        }
        #[cfg(not(target_feature = "avx2"))]
        portable_panel(self.rows, p, acts, r0, count, sums, |j, b, k| {
            let (q, d) = self.value(j, b, k);
            (q, d, 0.0)
        });
    }
}
