//! Quantized weights × int8 activations, our own kernels for the GGUF types the default model uses
//! (Q4_1 layers, Q8_0 embeddings/output). candle 0.11 has no SIMD dot product for Q4_1 (its scalar
//! fallback took 77% of decode time) and re-reads the weights for every activation row. Here:
//! - weight rows are interleaved in panels, so that a vector lane is one weight row: a block's 32
//!   products for a panel take eight `vpdpbusd` against broadcast activations, with no horizontal
//!   sums, and each added activation row costs only those eight. Panels are sixteen rows with
//!   AVX-512 (`quant/zmm.rs`), eight with AVX2 (`quant/ymm.rs`, VNNI or `maddubs`);
//! - one pass over a panel serves up to four activation rows (prefill, batched decode);
//! - output panels are spread over tilt's thread pool (`pool::split_after`).
//!
//! `formats` holds the weight layouts, `activations` the int8 rows they multiply, `matmul` the
//! driver that spreads a product over the pool and applies its sink.

mod activations;
mod formats;
mod matmul;

pub use activations::Q8Rows;
pub(crate) use activations::Q8Writer;
pub use formats::{GgmlMatrix, Q4_1Matrix, Q8_0Matrix};
#[cfg(test)]
pub use matmul::matmul;
pub use matmul::{gate_up_order, matmul_into, Input, Sink};

// The kernel's own quantizer where AVX-512 gives one.
#[cfg_attr(target_feature = "avx512bw", allow(unused_imports))]
use activations::quantize_block;

pub(crate) const BLOCK: usize = 32;
/// Activation rows that share one pass over the weights.
const TILE: usize = 4;
// The kernel for this CPU, fixed at compile time (target-cpu=native): it sets `PANEL`, the weight
// rows interleaved together (one per i32 lane of its vectors), and `Q8_OFFSET`, whether Q8_0
// quants are stored as unsigned q + 128.
#[cfg(all(
    target_feature = "avx512f",
    target_feature = "avx512bw",
    target_feature = "avx512vnni"
))]
#[path = "zmm.rs"]
mod kernel;
#[cfg(all(
    target_feature = "avx2",
    not(all(
        target_feature = "avx512f",
        target_feature = "avx512bw",
        target_feature = "avx512vnni"
    ))
))]
#[path = "ymm.rs"]
mod kernel;
#[cfg(not(target_feature = "avx2"))]
mod kernel {
    pub(super) use super::quantize_block;
    pub const PANEL: usize = 8;
    pub const Q8_OFFSET: bool = false;
}
use kernel::{PANEL, Q8_OFFSET};

/// Four bytes of each of a panel's rows.
type Chunk = [u8; 4 * PANEL];

/// What the shared matmul driver needs of a weight matrix.
pub trait PanelDot: Sync {
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
    /// Dot products of the rows of panel `p` with activation rows `r0..r0 + count`:
    /// `sums[i][r]` is weight row `p·PANEL + r` against activation row `r0 + i`.
    fn dot_panel(&self, p: usize, acts: &Q8Rows, r0: usize, count: usize, sums: &mut Sums);
}

type Sums = [[f32; PANEL]; TILE];

/// Ask for the weights ahead of the block at `at` (`chunks` chunks a block, here or in the next
/// panels, which follow in memory): into L2 `FAR` blocks ahead, into L1 `NEAR` blocks ahead.
/// The stream is read once and never cached. The L2 requests go out early enough to cover
/// memory's latency, the L1 ones only the L2's: one L1 stream alone leaves a step waiting.
#[cfg(target_feature = "avx2")]
#[inline(always)]
unsafe fn prefetch(at: &[Chunk], chunks: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T2};
    const NEAR: usize = 4;
    const FAR: usize = 32;
    let lines = chunks * std::mem::size_of::<Chunk>() / 64;
    let near = at.as_ptr().wrapping_add(NEAR * chunks) as *const i8;
    let far = at.as_ptr().wrapping_add(FAR * chunks) as *const i8;
    for line in 0..lines {
        _mm_prefetch::<_MM_HINT_T0>(near.wrapping_add(64 * line));
        _mm_prefetch::<_MM_HINT_T2>(far.wrapping_add(64 * line));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

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

    fn check(w: &impl PanelDot, dense: &[f32], m: usize) {
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

    #[test]
    fn kernel_quantizer_matches_the_portable_one() {
        // Halves of 127ths (ties), zeros, a zero block, and one NaN block.
        let mut blocks: Vec<Vec<f32>> = (0..40)
            .map(|b| {
                (0..32)
                    .map(|i| ((i * 7 + b * 13) % 29) as f32 * 0.5 - 7.0)
                    .collect()
            })
            .collect();
        blocks.push(vec![0.0; 32]);
        for x in &blocks {
            let (mut a, mut b) = ([0i8; 32], [0i8; 32]);
            assert_eq!(kernel::quantize_block(x, &mut a), quantize_block(x, &mut b));
            assert_eq!(a, b);
        }
        let mut q = [0i8; 32];
        kernel::quantize_block(&[f32::NAN; 32], &mut q);
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

    fn quantized(x: &[f32], m: usize) -> Q8Rows {
        let mut q8 = Q8Rows::new();
        let writer = q8.writer(m, x.len() / m);
        // SAFETY: one thread, every block once, read after.
        unsafe { writer.blocks(0, x) };
        q8
    }

    #[test]
    fn quantized_inputs_and_outputs_are_the_prologues_bit_for_bit() {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let input = |m: usize, cols: usize| -> Vec<f32> {
            (0..m * cols)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect()
        };
        // A matmul of blocks quantized elsewhere equals the one that quantizes them itself.
        for (rows, cols, m) in SHAPES {
            let (w, x) = (q4_1(rows, cols), input(m, cols));
            let q8 = quantized(&x, m);
            let mut got = vec![0f32; m * rows];
            matmul_into(&w, Input::quantized(&x, &q8), m, Sink::Store(&mut got));
            assert_eq!(
                bits(&got),
                bits(&matmul(&w, &x, m)),
                "{rows}×{cols}, {m} rows"
            );
        }
        // SwiGLU's blocks are its outputs quantized, as the next matmul's prologue would.
        let (half, cols, m) = (4 * BLOCK, 96, 3);
        let w = q4_1(2 * half, cols);
        let x = input(m, cols);
        let mut act = vec![0f32; m * half];
        let mut q8 = Q8Rows::new();
        let writer = q8.writer(m, half);
        matmul_into(
            &w,
            Input::plain(&x),
            m,
            Sink::SwiGlu(&mut act, Some(writer)),
        );
        let want = quantized(&act, m);
        assert_eq!(
            (&q8.qs, bits(&q8.d), bits(&q8.s)),
            (&want.qs, bits(&want.d), bits(&want.s))
        );
        assert_eq!(q8.minus128, want.minus128);
        // And the outputs are silu(gate)·up of the interleaved gate and up panels.
        let all = matmul(&w, &x, m);
        for (r, (all, act)) in all
            .chunks_exact(2 * half)
            .zip(act.chunks_exact(half))
            .enumerate()
        {
            for (p, (pair, act)) in all
                .chunks_exact(2 * PANEL)
                .zip(act.chunks_exact(PANEL))
                .enumerate()
            {
                let mut want = [0f32; PANEL];
                crate::math::silu_mul(&pair[..PANEL], &pair[PANEL..], &mut want);
                assert_eq!(bits(act), bits(&want), "row {r} panel {p}");
            }
        }
    }
}
