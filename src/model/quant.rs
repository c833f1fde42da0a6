//! Quantized weights × int8 activations, our own kernels for the GGUF types the default model uses
//! (Q4_1 layers, Q8_0 embeddings/output). candle 0.11 has no SIMD dot product for Q4_1 (its scalar
//! fallback took 77% of decode time) and re-reads the weights for every activation row. Here:
//! - weight rows are interleaved in panels, so that a vector lane is one weight row: a block's 32
//!   products for a panel take eight `vpdpbusd` against broadcast activations, with no horizontal
//!   sums, and each added activation row costs only those eight. Panels are sixteen rows with
//!   AVX-512 (`quant/zmm.rs`), eight with AVX2 (`quant/ymm.rs`, VNNI or `maddubs`);
//! - one pass over a panel serves up to four activation rows (prefill, batched decode);
//! - output panels are spread over candle's thread pool (`pool::split`).
use half::f16;

use super::huge::HugeSlice;

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
#[path = "quant/zmm.rs"]
mod kernel;
#[cfg(all(
    target_feature = "avx2",
    not(all(
        target_feature = "avx512f",
        target_feature = "avx512bw",
        target_feature = "avx512vnni"
    ))
))]
#[path = "quant/ymm.rs"]
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

/// Activations quantized per 32 values: `q ≈ x / d`, and `s = d · Σq` for Q4_1's offset term.
pub struct Q8Rows {
    d: Vec<f32>,
    s: Vec<f32>,
    /// −128·Σq: what a block's integer dot product with Q8_0 weights stored as q + 128 has in
    /// excess (`Q8_OFFSET`).
    minus128: Vec<i32>,
    qs: Vec<i8>,
    /// Blocks per row.
    nb: usize,
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

    fn rows(&self) -> usize {
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

/// What the shared matmul driver needs of a weight matrix.
pub trait PanelDot: Sync {
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
    /// Dot products of the rows of panel `p` with activation rows `r0..r0 + count`:
    /// `sums[i][r]` is weight row `p·PANEL + r` against activation row `r0 + i`.
    fn dot_panel(&self, p: usize, acts: &Q8Rows, r0: usize, count: usize, sums: &mut Sums);
}

type Sums = [[f32; PANEL]; TILE];

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
    fn dequantize(&self) -> Vec<f32> {
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
    fn dequantize(&self) -> Vec<f32> {
        let nb = self.cols / BLOCK;
        (0..self.rows * nb * BLOCK)
            .map(|i| {
                let (q, d) = self.value(i / self.cols, i % self.cols / BLOCK, i % BLOCK);
                q as f32 * d
            })
            .collect()
    }
}

/// A matmul's input: `m` rows of activations, RMS-normalised on the way in when `norm` gives
/// the norm's (weight, eps): the norm runs inside the pool call, not serially before it.
#[derive(Clone, Copy)]
pub struct Input<'a> {
    pub x: &'a [f32],
    pub norm: Option<(&'a [f32], f32)>,
    /// `x` already quantized, by the pool call that made it (attention, SwiGLU): our kernels
    /// take these blocks and skip the prologue; others read `x`.
    pub quantized: Option<&'a Q8Rows>,
}

impl<'a> Input<'a> {
    pub fn plain(x: &'a [f32]) -> Self {
        Self {
            x,
            norm: None,
            quantized: None,
        }
    }

    pub fn normed(x: &'a [f32], weight: &'a [f32], eps: f32) -> Self {
        Self {
            x,
            norm: Some((weight, eps)),
            quantized: None,
        }
    }

    /// `x`, with its blocks as `Q8Writer::block` quantized them.
    pub fn quantized(x: &'a [f32], blocks: &'a Q8Rows) -> Self {
        Self {
            x,
            norm: None,
            quantized: Some(blocks),
        }
    }
}

/// Where a matmul's products go (row-major, `m` rows).
pub enum Sink<'a> {
    /// Stored: `m × rows` values.
    Store(&'a mut [f32]),
    /// Added to what is there (a residual connection): `m × rows` values.
    Add(&'a mut [f32]),
    /// silu(gate)·up, `m × rows/2` values, for a matrix whose gate and up panels alternate
    /// (`gate_up_order`); also quantized, block by block, into the writer if one is given.
    SwiGlu(&'a mut [f32], Option<Q8Writer>),
}

/// `x` is `m` rows of `w.cols()`; returns `m` rows of `w.rows()` values.
#[cfg(test)]
pub fn matmul<W: PanelDot>(w: &W, x: &[f32], m: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * w.rows()];
    matmul_into(w, Input::plain(x), m, Sink::Store(&mut out));
    out
}

/// The row order that makes a stacked [gate; up] matrix (`half` rows each) alternate one panel
/// of gate rows with the same panel of up rows, as `Sink::SwiGlu` needs; `None` when `half` is
/// not a whole number of panels.
pub fn gate_up_order(half: usize) -> Option<Vec<usize>> {
    half.is_multiple_of(PANEL).then(|| {
        (0..half / PANEL)
            .flat_map(|p| {
                (0..2).flat_map(move |h| (0..PANEL).map(move |r| h * half + p * PANEL + r))
            })
            .collect()
    })
}

/// A thread's buffers for its matmuls' activations.
struct Scratch {
    acts: Q8Rows,
    /// Each row's RMS-norm scale, when the input is normalised.
    inv_rms: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = const {
        std::cell::RefCell::new(Scratch {
            acts: Q8Rows::new(),
            inv_rms: Vec::new(),
        })
    };
}

/// `input` (`m` rows of `w.cols()`) times `w`'s rows, into `sink`. Every thread of the pool call
/// first quantizes its share of the activations (normalising them if asked), unless the input
/// comes quantized; then items of (a chunk of panels, up to four activation rows) are spread
/// over the pool, each writing its products as `sink` asks.
pub fn matmul_into<W: PanelDot>(w: &W, input: Input, m: usize, sink: Sink) {
    let (cols, n) = (w.cols(), w.rows());
    assert_eq!(input.x.len(), m * cols, "matmul input shape");
    let (out, swiglu, add, quantize_out) = match sink {
        Sink::Store(o) => (o, false, false, None),
        Sink::Add(o) => (o, false, true, None),
        Sink::SwiGlu(o, q) => (o, true, false, q),
    };
    let width = if swiglu { n / 2 } else { n };
    assert!(
        out.len() == m * width
            && (!swiglu || width.is_multiple_of(PANEL))
            && (quantize_out.is_none() || width.is_multiple_of(BLOCK)),
        "matmul output shape"
    );
    let dst = Shared(out.as_mut_ptr());
    let nb = cols / BLOCK;
    SCRATCH.with_borrow_mut(|Scratch { acts, inv_rms }| {
        inv_rms.clear();
        let writer = match input.quantized {
            Some(q) => {
                assert!(q.nb == nb && q.rows() == m, "quantized input shape");
                assert!(
                    input.norm.is_none(),
                    "a quantized input is not normalised again"
                );
                None
            }
            None => {
                // One scale per row, on this thread: a few hundred multiply-adds a row.
                if let Some((_, eps)) = input.norm {
                    let rows = input.x.chunks_exact(cols);
                    inv_rms.extend(rows.map(|row| crate::math::inv_rms(row, eps)));
                }
                Some(acts.writer(m, cols))
            }
        };
        let inv_rms = &*inv_rms;
        // Prologue units: `GROUP` blocks of one row, each normalised and quantized.
        const GROUP: usize = 4;
        let groups = nb.div_ceil(GROUP);
        let prologue = |unit: usize| {
            let Some(writer) = writer else { return };
            let (r, g) = (unit / groups, unit % groups);
            let row = &input.x[r * cols..(r + 1) * cols];
            let scale = input.norm.map(|(weight, _)| (weight, inv_rms[r]));
            for b in g * GROUP..(g * GROUP + GROUP).min(nb) {
                let mut normed = [0f32; BLOCK];
                let mut block = &row[b * BLOCK..(b + 1) * BLOCK];
                if let Some((weight, scale)) = scale {
                    let weight = &weight[b * BLOCK..(b + 1) * BLOCK];
                    for ((o, &v), &w) in normed.iter_mut().zip(block).zip(weight) {
                        *o = v * scale * w;
                    }
                    block = &normed;
                }
                // SAFETY: block (r, b) is this unit's alone, read only after the prologue.
                unsafe { writer.blocks(r * nb + b, block) };
            }
        };
        let units = if writer.is_some() { m * groups } else { 0 };
        let acts = input.quantized.unwrap_or(acts);
        let tiles = m.div_ceil(TILE);
        // Work items: (chunk of panels, activation tile); a chunk's weights stay in cache while
        // a worker goes through the tiles. For SwiGLU a chunk is gate and up panels by turns,
        // a block's worth of outputs, so that it can also quantize them.
        let chunk_panels = if swiglu { SWIGLU_CHUNK } else { 2 };
        let panels = n.div_ceil(PANEL);
        let chunks = panels.div_ceil(chunk_panels);
        let work = |range: std::ops::Range<usize>| {
            // Each item writes the products it reads (its panels, its rows) before reading them.
            let mut sums = [[[0f32; PANEL]; TILE]; SWIGLU_CHUNK];
            for item in range {
                let (chunk, tile) = (item / tiles, item % tiles);
                let r0 = tile * TILE;
                let count = TILE.min(m - r0);
                let first = chunk * chunk_panels;
                let last = (first + chunk_panels).min(panels);
                for (p, sums) in (first..last).zip(&mut sums) {
                    w.dot_panel(p, acts, r0, count, sums);
                }
                for i in 0..count {
                    // SAFETY: item (chunk, tile) alone writes rows r0..r0+count × its columns.
                    let row = unsafe { dst.get().add((r0 + i) * width) };
                    if swiglu {
                        // SAFETY: as above; a panel of outputs per (gate, up) pair, from the
                        // chunk's first output on.
                        let out = unsafe {
                            std::slice::from_raw_parts_mut(
                                row.add(first / 2 * PANEL),
                                (last - first) / 2 * PANEL,
                            )
                        };
                        for (pair, out) in out.chunks_exact_mut(PANEL).enumerate() {
                            let (gate, up) = (&sums[2 * pair][i], &sums[2 * pair + 1][i]);
                            crate::math::silu_mul(gate, up, out);
                        }
                        if let Some(q) = quantize_out {
                            // SAFETY: this block of the row is this item's alone; the
                            // consumer reads it after this pool call.
                            unsafe { q.blocks((r0 + i) * (width / BLOCK) + chunk, out) };
                        }
                        continue;
                    }
                    for (k, sums) in sums[..chunk_panels].iter().enumerate() {
                        let j0 = (first + k) * PANEL;
                        if j0 >= n {
                            break;
                        }
                        let out = unsafe {
                            std::slice::from_raw_parts_mut(row.add(j0), PANEL.min(n - j0))
                        };
                        if add {
                            for (o, v) in out.iter_mut().zip(&sums[i]) {
                                *o += v;
                            }
                        } else if let Ok(out) = <&mut [f32; PANEL]>::try_from(&mut *out) {
                            *out = sums[i]; // a fixed-size copy, not a call to memmove
                        } else {
                            out.copy_from_slice(&sums[i][..out.len()]);
                        }
                    }
                }
            }
        };
        // A fork-join costs more than a small matmul (a tiny ARM's 128-wide layers): those run
        // on the calling thread.
        if n * cols * m < SMALL_MATMUL {
            (0..units).for_each(prologue);
            work(0..chunks * tiles);
        } else {
            super::pool::split_after(units, prologue, chunks * tiles, work);
        }
    });
}

/// Panels in a SwiGLU work item: gate and up by turns, one block of outputs.
const SWIGLU_CHUNK: usize = 2 * BLOCK / PANEL;

/// Multiply-adds below which a matmul skips the thread pool.
const SMALL_MATMUL: usize = 1 << 18;

/// One block of 32 activations as `q ≈ x / d` (ties to even, like llama.cpp's SIMD quantizer);
/// returns (d, Σq). Eight-lane loops that vectorise: batches pay this per row.
#[cfg_attr(target_feature = "avx512bw", allow(dead_code))]
fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, i32) {
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

/// Ask for the weights ahead of the block at `at` (`chunks` chunks a block, here or in the next
/// panels, which follow in memory): into L2 `FAR` blocks ahead, into L1 `NEAR` blocks ahead.
/// The stream is read once and never cached. One L1 stream alone left a batch-1 step waiting on
/// memory; the L2 requests go out early enough to cover memory's latency, the L1 ones only the
/// L2's (one 128-token sample took ~5% less time with both than with L1 prefetches 16 blocks ahead).
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

/// A buffer shared by pool workers that each write their own disjoint elements.
pub(crate) struct Shared<T>(pub(crate) *mut T);
// SAFETY: users guarantee disjoint writes (see `matmul_into`, `llama::attention`,
// `pool::for_each_mut`), and the pool joins every worker (or passes a barrier) before the buffer
// is read.
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}
// Copyable whatever T is: it is only a pointer (a derive would ask for `T: Copy`).
impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Shared<T> {}
impl<T> Shared<T> {
    pub(crate) fn get(self) -> *mut T {
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
