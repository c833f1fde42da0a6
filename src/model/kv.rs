//! Per-sequence key/value cache: per layer and KV head, keys and values as plain vectors of
//! `[position][head_dim]`, so attention reads one head's cache as one sequential stream, a decode
//! step appends one row per head (amortised O(1), never a copy of the cache) and a fork copies
//! only the used rows. A forward opens each layer for its new positions and attention's tasks
//! write them in place, each its own row and head, in parallel. Keys and values are stored as
//! f16, as llama.cpp does by default: attention reads the whole cache of every sequence each
//! step, and half the bytes is half that traffic.

use std::sync::Arc;

use half::f16;
use half::slice::HalfFloatSliceExt;

/// One layer's keys and values: a vector per KV head.
#[derive(Debug, Clone)]
struct Layer {
    keys: Vec<Vec<f16>>,
    values: Vec<Vec<f16>>,
}

#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Layer>,
    len: usize,
    /// Values per position per head, known from the first append.
    head_dim: usize,
    /// Values a run may ever hold (the model's context), known from the first append.
    most: usize,
    /// Caches forked from one another (best-of-N candidates, search beams) share a lineage,
    /// and each holds the same keys and values as every other cache of its lineage in its first
    /// `common` positions (`usize::MAX`: no bound of its own). Attention reads such a shared
    /// prefix from one copy for all of them, while it is still in the CPU's cache.
    lineage: Arc<()>,
    common: usize,
    /// A hash of the tokens up to each position: two caches with the same hash at their last
    /// position were fed the same tokens (`same_history`).
    history: Vec<u64>,
}

/// One KV head's keys and values of one layer, `[position][head_dim]`, opened for new positions
/// (`KvCache::open`): attention writes the new rows through these pointers and reads the cached
/// ones before them.
#[derive(Clone, Copy)]
pub(crate) struct KvHead {
    pub keys: *mut f16,
    pub values: *mut f16,
}

// SAFETY: attention's tasks write disjoint rows (their own position and head) and read only rows
// written before the pool call or in its prologue; the cache outlives the forward that opened it.
unsafe impl Send for KvHead {}
unsafe impl Sync for KvHead {}

impl Default for KvCache {
    fn default() -> Self {
        Self {
            layers: Vec::new(),
            len: 0,
            head_dim: 0,
            most: usize::MAX,
            lineage: Arc::new(()),
            common: usize::MAX,
            history: Vec::new(),
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
        let heads = |h: &[Vec<f16>]| h.iter().map(Vec::capacity).sum::<usize>();
        self.layers
            .iter()
            .map(|l| (heads(&l.keys) + heads(&l.values)) * 2)
            .sum()
    }

    /// An independent copy of the cached positions (the prompt shared by best-of-N candidates or
    /// search branches): costs one copy of the used rows, never a new prefill.
    pub fn fork(&self) -> Self {
        let used = self.len * self.head_dim;
        let runs = self.runs();
        // Runs are ranked as `open` ranks them: by layer, each layer's keys then its values.
        let mut k = 0;
        let mut copy = |heads: &[Vec<f16>]| -> Vec<Vec<f16>> {
            let copy_of = |run: &Vec<f16>| {
                let mut copy = Vec::with_capacity(room(used, k, runs).min(self.most));
                k += 1;
                copy.extend_from_slice(&run[..used]);
                copy
            };
            heads.iter().map(copy_of).collect()
        };
        let layers = (self.layers.iter())
            .map(|l| Layer {
                keys: copy(&l.keys),
                values: copy(&l.values),
            })
            .collect();
        Self {
            layers,
            len: self.len,
            head_dim: self.head_dim,
            most: self.most,
            lineage: self.lineage.clone(),
            common: self.common.min(self.len),
            history: self.history[..self.len].to_vec(),
        }
    }

    /// The largest difference between a key or value of `self` and `other`, relative to the
    /// larger magnitude of the two (at least 1); `None` when they hold different positions or
    /// shapes. How tests tell two ways of filling a cache apart.
    pub fn max_rel_diff(&self, other: &KvCache) -> Option<f32> {
        if self.len != other.len
            || self.head_dim != other.head_dim
            || self.layers.len() != other.layers.len()
        {
            return None;
        }
        let used = self.len * self.head_dim;
        let mut worst = 0f32;
        for (a, b) in self.layers.iter().zip(&other.layers) {
            let heads = a
                .keys
                .iter()
                .chain(&a.values)
                .zip(b.keys.iter().chain(&b.values));
            for (x, y) in heads {
                for (x, y) in x[..used].iter().zip(&y[..used]) {
                    let (x, y) = (x.to_f32(), y.to_f32());
                    worst = worst.max((x - y).abs() / x.abs().max(y.abs()).max(1.0));
                }
            }
        }
        Some(worst)
    }

    /// Forget positions from `len` on (search decoders roll back lookahead tokens this way).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        self.history.truncate(self.len);
        // What this cache writes from here on differs from what the others of its lineage hold.
        self.common = self.common.min(self.len);
    }

    /// Opens layer `layer` (of `n_layers`, for a context of `context` positions) for `t`
    /// positions from `len()`: makes room for them in every KV head's keys and values (`heads`
    /// of them, `head_dim` wide), and pushes where each head's run starts onto `out`. The rows
    /// are written through those pointers, at positions `len()..len() + t`; `advance` commits
    /// them once every layer's are written.
    pub(crate) fn open(
        &mut self,
        (n_layers, context): (usize, usize),
        layer: usize,
        (heads, head_dim): (usize, usize),
        t: usize,
        out: &mut Vec<KvHead>,
    ) {
        if self.layers.is_empty() {
            self.head_dim = head_dim;
            self.most = context.saturating_mul(head_dim);
            let layer = Layer {
                keys: vec![Vec::new(); heads],
                values: vec![Vec::new(); heads],
            };
            self.layers = vec![layer; n_layers];
        }
        let l = &mut self.layers[layer];
        assert!(self.head_dim == head_dim && l.keys.len() == heads);
        let (at, need) = (self.len * head_dim, (self.len + t) * head_dim);
        let (first, runs) = (layer * 2 * heads, n_layers * 2 * heads);
        for (r, run) in l.keys.iter_mut().chain(&mut l.values).enumerate() {
            // Rows past `len()` (rolled back, or of a forward that failed) are dropped.
            run.truncate(at);
            if need > run.capacity() {
                let room = room(need, first + r, runs).min(self.most).max(need);
                run.reserve_exact(room - run.len());
            }
        }
        out.extend(l.keys.iter_mut().zip(&mut l.values).map(|(k, v)| KvHead {
            keys: k.as_mut_ptr(),
            values: v.as_mut_ptr(),
        }));
    }

    /// Key and value runs in all: two per layer and KV head.
    fn runs(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.keys.len() + l.values.len())
            .sum()
    }

    /// Whether `self` and `other` hold positions for the same tokens (by a 64-bit hash of them):
    /// then a model reads the same history in both.
    pub fn same_history(&self, other: &KvCache) -> bool {
        self.len == other.len && self.history.last() == other.history.last()
    }

    /// Commits the positions of `tokens`, one each.
    ///
    /// # Safety
    /// Every layer was opened for them (`open`, with `tokens.len()`) and all their rows written since.
    pub(crate) unsafe fn advance(&mut self, tokens: &[u32]) {
        let t = tokens.len();
        let mut h = self.history.last().copied().unwrap_or(0);
        for &token in tokens {
            h = mix(h ^ u64::from(token));
            self.history.push(h);
        }
        self.len += t;
        let used = self.len * self.head_dim;
        for l in &mut self.layers {
            for run in l.keys.iter_mut().chain(&mut l.values) {
                // SAFETY: `open` reserved these positions and the caller wrote them.
                unsafe { run.set_len(used) };
            }
        }
    }
}

/// Capacity for a run that must hold `need` values, the `k`-th of its cache's `runs`: twice
/// that, and up to as much again by its rank, so a cache's runs outgrow their room at steps
/// spread over the next doubling rather than all in one step. Sequences that grow in step (a
/// batch's streams, best-of-N's candidates) would otherwise copy every run of every cache in
/// one step, several times a normal step's time.
fn room(need: usize, k: usize, runs: usize) -> usize {
    need * 2 + need * k / runs.max(1)
}

/// splitmix64's finaliser: every bit of the input moves every bit of the output.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Writes `x` as f16 at `dst`: a key or value row of one head, converted as it is stored (a
/// decode step writes 720 of them for four sequences of the default model).
///
/// # Safety
/// `dst` is valid for `x.len()` writes.
#[inline]
pub(crate) unsafe fn store_f16(dst: *mut f16, x: &[f32]) {
    #[cfg(target_feature = "avx512f")]
    if x.len().is_multiple_of(16) {
        use std::arch::x86_64::*;
        for (i, c) in x.chunks_exact(16).enumerate() {
            let h = _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm512_loadu_ps(c.as_ptr()));
            _mm256_storeu_si256(dst.add(16 * i).cast(), h);
        }
        return;
    }
    std::slice::from_raw_parts_mut(dst, x.len()).convert_from_f32_slice(x);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `values.len()` more positions of one layer and head, one value each.
    fn grow(cache: &mut KvCache, values: &[f32]) {
        let mut heads = Vec::new();
        let at = cache.len();
        cache.open((1, 1 << 20), 0, (1, 1), values.len(), &mut heads);
        for (p, v) in values.iter().enumerate() {
            // SAFETY: `open` made room for these positions.
            unsafe {
                store_f16(heads[0].keys.add(at + p), std::slice::from_ref(v));
                store_f16(heads[0].values.add(at + p), std::slice::from_ref(v));
            }
        }
        // SAFETY: the one layer's rows are written.
        unsafe { cache.advance(&vec![0; values.len()]) };
    }

    #[test]
    fn store_f16_rounds_as_the_portable_conversion() {
        let mut x: Vec<f32> = (0..4096)
            .map(|i| f32::from_bits((i as u32).wrapping_mul(2_654_435_761)))
            .collect();
        // Ties, overflow, subnormals and the specials.
        x.extend([
            1.0 + 1.0 / 2048.0,
            65520.0,
            1e-7,
            6e-8,
            f32::INFINITY,
            -0.0,
            f32::NAN,
        ]);
        x.resize(x.len().next_multiple_of(16), 0.5);
        let mut run = vec![f16::ONE; x.len() + 1];
        // SAFETY: `run` has room for x past its first value.
        unsafe { store_f16(run.as_mut_ptr().add(1), &x) };
        let mut expected = vec![f16::ZERO; x.len()];
        expected.convert_from_f32_slice(&x);
        assert_eq!(run[0], f16::ONE);
        for (a, b) in run[1..].iter().zip(&expected) {
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "{a} vs {b}"
            );
        }
    }

    #[test]
    fn a_caches_runs_outgrow_their_room_at_different_steps_and_keep_their_rows() {
        let (layers, heads) = (4, 2);
        let mut caches = [KvCache::new(), KvCache::new()];
        let mut most = 0;
        for step in 0..3000usize {
            let t = if step == 0 { 64 } else { 1 };
            let mut grew = 0;
            for cache in &mut caches {
                let at = cache.len();
                let before: Vec<usize> = cache
                    .layers
                    .iter()
                    .flat_map(|l| l.keys.iter().chain(&l.values))
                    .map(Vec::capacity)
                    .collect();
                for layer in 0..layers {
                    let mut out = Vec::new();
                    cache.open((layers, 4000), layer, (heads, 1), t, &mut out);
                    for (h, head) in out.iter().enumerate() {
                        for p in at..at + t {
                            let v = [(p * 8 + layer * 2 + h) as f32];
                            // SAFETY: `open` made room for these positions.
                            unsafe {
                                store_f16(head.keys.add(p), &v);
                                store_f16(head.values.add(p), &v);
                            }
                        }
                    }
                }
                // SAFETY: every layer's rows are written.
                unsafe { cache.advance(&vec![0; t]) };
                let after = cache
                    .layers
                    .iter()
                    .flat_map(|l| l.keys.iter().chain(&l.values))
                    .map(Vec::capacity);
                grew += before.iter().zip(after).filter(|(b, a)| *b != a).count();
            }
            if step > 0 {
                most = most.max(grew);
            }
        }
        // Two caches growing in step: at most one run each grows in a step.
        assert!(most <= 2, "{most} runs grew in one step");
        // No run holds room past the context.
        let rooms = caches
            .iter()
            .flat_map(|c| &c.layers)
            .flat_map(|l| l.keys.iter().chain(&l.values));
        assert!(rooms.map(Vec::capacity).all(|c| (3063..=4000).contains(&c)));
        for cache in &caches {
            assert!(cache.runs() == 16 && cache.len() == 3063);
            for (layer, l) in cache.layers.iter().enumerate() {
                for (h, (k, v)) in l.keys.iter().zip(&l.values).enumerate() {
                    for p in [0, 63, 64, 1000, 3062] {
                        let want = f16::from_f32((p * 8 + layer * 2 + h) as f32);
                        assert_eq!((k[p], v[p]), (want, want), "layer {layer} head {h} at {p}");
                    }
                }
            }
        }
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
                assert_eq!(x.layers[0].keys[0][..n], y.layers[0].keys[0][..n]);
            }
        }
    }
}
