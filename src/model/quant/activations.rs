//! Activations quantized to int8 per 32-value block, the other operand of every product.

use super::super::pool::Shared;
use super::{kernel, BLOCK};

/// Activations quantized per 32 values: `q ≈ x / d`, and `s = d · Σq` for Q4_1's offset term.
pub struct Q8Rows {
    pub(super) d: Vec<f32>,
    pub(super) s: Vec<f32>,
    /// −128·Σq: what a block's integer dot product with Q8_0 weights stored as q + 128 has in
    /// excess (`Q8_OFFSET`).
    pub(super) minus128: Vec<i32>,
    pub(super) qs: Vec<i8>,
    /// Blocks per row.
    pub(super) nb: usize,
}

impl Q8Rows {
    pub const fn new() -> Self {
        Self {
            d: Vec::new(),
            s: Vec::new(),
            minus128: Vec::new(),
            qs: Vec::new(),
            nb: 0,
        }
    }

    /// Room for `m` rows of `cols` values (whole blocks), and a handle to fill it from pool
    /// workers, block by block.
    pub(crate) fn writer(&mut self, m: usize, cols: usize) -> Q8Writer {
        assert!(cols.is_multiple_of(BLOCK), "activations in whole blocks");
        self.nb = cols / BLOCK;
        self.d.resize(m * self.nb, 0.0);
        self.s.resize(m * self.nb, 0.0);
        self.minus128.resize(m * self.nb, 0);
        self.qs.resize(m * cols, 0);
        Q8Writer {
            d: Shared(self.d.as_mut_ptr()),
            s: Shared(self.s.as_mut_ptr()),
            minus128: Shared(self.minus128.as_mut_ptr()),
            qs: Shared(self.qs.as_mut_ptr()),
            blocks: m * self.nb,
        }
    }

    pub(super) fn rows(&self) -> usize {
        self.d.len() / self.nb.max(1)
    }
}

/// Where quantized activation blocks go (`Q8Rows::writer`), from any thread.
#[derive(Clone, Copy)]
pub(crate) struct Q8Writer {
    d: Shared<f32>,
    s: Shared<f32>,
    minus128: Shared<i32>,
    qs: Shared<i8>,
    blocks: usize,
}

impl Q8Writer {
    /// Quantizes `x` (whole blocks) as the blocks from `first` on (row-major over the rows'
    /// blocks).
    ///
    /// # Safety
    /// Those blocks are written by one thread alone, and the rows are read only once every
    /// writer is done (the pool call that writes them has returned).
    #[inline]
    pub(crate) unsafe fn blocks(&self, first: usize, x: &[f32]) {
        assert!(x.len().is_multiple_of(BLOCK) && first + x.len() / BLOCK <= self.blocks);
        for (a, x) in (first..).zip(x.chunks_exact(BLOCK)) {
            // SAFETY: block `a` is within the buffers `writer` sized, and the caller's alone.
            unsafe {
                let q = std::slice::from_raw_parts_mut(self.qs.get().add(a * BLOCK), BLOCK);
                let (da, sum) = kernel::quantize_block(x, q);
                *self.d.get().add(a) = da;
                *self.s.get().add(a) = da * sum as f32;
                *self.minus128.get().add(a) = -128 * sum;
            }
        }
    }
}

/// One block of 32 activations as `q ≈ x / d` (ties to even, like llama.cpp's SIMD quantizer);
/// returns (d, Σq). Eight-lane loops that vectorise: batches pay this per row.
#[cfg_attr(target_feature = "avx512bw", allow(dead_code))]
pub(super) fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    let mut amax = [0f32; 8];
    for c in x.chunks_exact(8) {
        for (a, v) in amax.iter_mut().zip(c) {
            *a = a.max(v.abs());
        }
    }
    let d = amax.iter().fold(0f32, |a, &v| a.max(v)) / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = [0i32; 8];
    for (qc, c) in q.chunks_exact_mut(8).zip(x.chunks_exact(8)) {
        for ((q, v), s) in qc.iter_mut().zip(c).zip(sum.iter_mut()) {
            // `max`/`min` also map NaN (from non-finite activations) into range; clamp keeps NaN.
            #[allow(clippy::manual_clamp)]
            let r = (v * id).round_ties_even().max(-127.0).min(127.0);
            // SAFETY: r is finite and within i8; the unchecked cast is what vectorises.
            *q = unsafe { r.to_int_unchecked::<i32>() } as i8;
            *s += *q as i32;
        }
    }
    (d, sum.iter().sum())
}
