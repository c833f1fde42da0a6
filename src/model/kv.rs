//! Per-sequence key/value cache: plain vectors, `[position][kv_head][head_dim]` per layer, so a
//! decode step appends one row (amortised O(1), no copy of the cache) and a fork copies only the
//! used rows. Keys and values are stored as f16, as llama.cpp does by default: attention reads
//! the whole cache of every sequence each step, and half the bytes is half that traffic.

use std::sync::Arc;

use half::f16;
use half::slice::HalfFloatSliceExt;

#[derive(Debug)]
pub struct KvCache {
    /// Per layer: keys and values.
    layers: Vec<(Vec<f16>, Vec<f16>)>,
    len: usize,
    /// Floats per position per layer (kv_heads × head_dim), known from the first append.
    width: usize,
    /// Caches forked from one another (best-of-N candidates, search beams) share a lineage,
    /// and each holds the same keys and values as every other cache of its lineage in its first
    /// `common` positions (`usize::MAX`: no bound of its own). Attention reads such a shared
    /// prefix from one copy for all of them, while it is still in the CPU's cache.
    lineage: Arc<()>,
    common: usize,
}

impl Default for KvCache {
    fn default() -> Self {
        Self {
            layers: Vec::new(),
            len: 0,
            width: 0,
            lineage: Arc::new(()),
            common: usize::MAX,
        }
    }
}

impl Clone for KvCache {
    /// A copy is a fork: it shares the cached positions, not what either appends later.
    fn clone(&self) -> Self {
        self.fork()
    }
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `self` and `other` are of one lineage, and for how many leading positions they
    /// then hold the same keys and values.
    pub fn shared_with(&self, other: &KvCache) -> usize {
        if Arc::ptr_eq(&self.lineage, &other.lineage) {
            self.common.min(other.common).min(self.len).min(other.len)
        } else {
            0
        }
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
            lineage: self.lineage.clone(),
            common: self.common.min(self.len),
        }
    }

    /// Forget positions from `len` on (search decoders roll back lookahead tokens this way).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        // What this cache writes from here on differs from what the others of its lineage hold.
        self.common = self.common.min(self.len);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache of `len` positions of one layer, one value each.
    fn grow(cache: &mut KvCache, values: &[f32]) {
        cache.append(1, 0, 1, values, values);
        cache.advance(values.len());
    }

    #[test]
    fn forks_share_what_they_hold_in_common_and_no_more() {
        let mut root = KvCache::new();
        grow(&mut root, &[1.0, 2.0, 3.0, 4.0]);
        let mut a = root.fork();
        grow(&mut root, &[5.0, 6.0]);
        let b = root.fork();
        grow(&mut a, &[7.0]);
        assert_eq!(a.shared_with(&root), 4);
        assert_eq!(b.shared_with(&root), 6);
        assert_eq!(a.shared_with(&b), 4);
        assert_eq!(KvCache::new().shared_with(&root), 0);
        // A rolled-back root writes new values from position 2 on.
        root.truncate(2);
        grow(&mut root, &[8.0, 9.0, 10.0, 11.0]);
        assert_eq!(root.shared_with(&b), 2);
        assert_eq!(root.shared_with(&a), 2);
        assert_eq!(a.shared_with(&b), 4);
        // A fork of the rolled-back root shares its new values with it, and only the old two
        // with the others.
        let c = root.fork();
        assert_eq!(c.shared_with(&root), 2);
        assert_eq!(c.shared_with(&b), 2);
        // Whatever `shared_with` says is the same is the same.
        let caches = [&root, &a, &b, &c];
        for x in caches {
            for y in caches {
                let n = x.shared_with(y);
                assert_eq!(x.layers[0].0[..n], y.layers[0].0[..n]);
            }
        }
    }
}
