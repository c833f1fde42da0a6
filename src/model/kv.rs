//! Per-sequence key/value cache: plain vectors, `[position][kv_head][head_dim]` per layer, so a
//! decode step appends one row (amortised O(1), no copy of the cache) and a fork copies only the
//! used rows. Keys and values are stored as f16, as llama.cpp does by default: attention reads
//! the whole cache of every sequence each step, and half the bytes is half that traffic.

use half::f16;
use half::slice::HalfFloatSliceExt;

#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Per layer: keys and values.
    layers: Vec<(Vec<f16>, Vec<f16>)>,
    len: usize,
    /// Floats per position per layer (kv_heads × head_dim), known from the first append.
    width: usize,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions already cached: the next token is at this position.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by this cache.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| (k.capacity() + v.capacity()) * 2)
            .sum()
    }

    /// An independent copy of the cached positions (the prompt shared by best-of-N candidates or
    /// search branches): costs one copy of the used rows, never a new prefill.
    pub fn fork(&self) -> Self {
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| {
                let used = self.len * self.width;
                (k[..used].to_vec(), v[..used].to_vec())
            })
            .collect();
        Self {
            layers,
            len: self.len,
            width: self.width,
        }
    }

    /// Forget positions from `len` on (search decoders roll back lookahead tokens this way).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Append rows (each `width` floats) of layer `layer` at position `len()`, and return all keys
    /// and values through them. `advance` commits the positions once every layer is written.
    pub(crate) fn append(
        &mut self,
        n_layers: usize,
        layer: usize,
        width: usize,
        k: &[f32],
        v: &[f32],
    ) -> (&[f16], &[f16]) {
        if self.layers.len() < n_layers {
            self.layers.resize_with(n_layers, Default::default);
        }
        self.width = width;
        let (ck, cv) = &mut self.layers[layer];
        for (cache, new) in [(&mut *ck, k), (&mut *cv, v)] {
            let at = self.len * width;
            cache.resize(at + new.len(), f16::ZERO);
            cache[at..].convert_from_f32_slice(new);
        }
        (ck, cv)
    }

    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
