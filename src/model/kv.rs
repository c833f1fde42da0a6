//! Per-sequence key/value cache: pre-allocated per layer and grown by doubling, so a decode step
//! writes one row in place instead of copying the whole cache (candle's stock llama concatenates).

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::config::LlamaConfig;

/// Rows are allocated in multiples of this many positions.
const CHUNK: usize = 128;

#[derive(Debug)]
pub struct KvCache {
    /// Per layer: keys and values, each `(n_kv_heads, capacity, head_dim)`.
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    pub fn new() -> Self {
        Self {
            layers: Vec::new(),
            len: 0,
            capacity: 0,
        }
    }

    /// Positions already cached: the next token is at this position.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by this cache (allocated capacity, not only the used rows).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * 4)
            .sum()
    }

    /// An independent copy of the cached positions (the prompt shared by best-of-N candidates or
    /// search branches): costs one copy of the used rows, never a new prefill.
    pub fn fork(&self) -> Result<Self> {
        if self.len == 0 {
            return Ok(Self::new());
        }
        let capacity = round_up(self.len + 1);
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| {
                Ok((
                    Self::copy_rows(k, self.len, capacity)?,
                    Self::copy_rows(v, self.len, capacity)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            len: self.len,
            capacity,
        })
    }

    /// Forget positions from `len` on (search decoders roll back lookahead tokens this way).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Make room for `extra` more positions.
    pub(crate) fn reserve(&mut self, cfg: &LlamaConfig, extra: usize) -> Result<()> {
        let needed = self.len + extra;
        if needed <= self.capacity {
            return Ok(());
        }
        let capacity = round_up(needed.max(self.capacity * 2));
        if self.layers.is_empty() {
            let zeros = || {
                Tensor::zeros(
                    (cfg.n_kv_heads, capacity, cfg.head_dim),
                    DType::F32,
                    &Device::Cpu,
                )
            };
            self.layers = (0..cfg.n_layers)
                .map(|_| Ok((zeros()?, zeros()?)))
                .collect::<Result<_>>()?;
        } else {
            for (k, v) in self.layers.iter_mut() {
                *k = Self::copy_rows(k, self.len, capacity)?;
                *v = Self::copy_rows(v, self.len, capacity)?;
            }
        }
        self.capacity = capacity;
        Ok(())
    }

    /// Write `k`, `v` (`(n_kv_heads, t, head_dim)`, contiguous) of layer `layer` at position
    /// `self.len()`, and return views of all keys and values up to and including them.
    pub(crate) fn write(&self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (ck, cv) = &self.layers[layer];
        ck.slice_set(k, 1, self.len)?;
        cv.slice_set(v, 1, self.len)?;
        let total = self.len + k.dim(1)?;
        Ok((ck.narrow(1, 0, total)?, cv.narrow(1, 0, total)?))
    }

    /// Commit `t` positions written by `write` in every layer.
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }

    fn copy_rows(src: &Tensor, len: usize, capacity: usize) -> Result<Tensor> {
        let (h, _, d) = src.dims3()?;
        let dst = Tensor::zeros((h, capacity, d), DType::F32, &Device::Cpu)?;
        if len > 0 {
            dst.slice_set(&src.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
        }
        Ok(dst)
    }
}

impl Default for KvCache {
    fn default() -> Self {
        Self::new()
    }
}

fn round_up(n: usize) -> usize {
    n.div_ceil(CHUNK).max(1) * CHUNK
}
