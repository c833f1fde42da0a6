//! The matmul driver: quantize (and normalise) the input, spread (panels × rows) items over the
//! pool, and write each item's products as its sink asks.

use super::super::pool::{self, Shared};
use super::{PanelDot, Q8Rows, Q8Writer, BLOCK, PANEL, TILE};

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
            pool::split_after(units, prologue, chunks * tiles, work);
        }
    });
}

/// Panels in a SwiGLU work item: gate and up by turns, one block of outputs.
const SWIGLU_CHUNK: usize = 2 * BLOCK / PANEL;

/// Multiply-adds below which a matmul skips the thread pool.
const SMALL_MATMUL: usize = 1 << 18;
