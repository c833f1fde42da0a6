//! Llama-family decoder forward over a ragged batch: every item is one sequence with its own KV
//! cache and any number of new tokens (prefill, chunked prefill or a single decode token).
//! Linear layers run once over all items' rows (`linear`); between them, norms, RoPE, attention
//! against each item's cache and SwiGLU run inside those layers' pool calls or as plain loops
//! over f32 rows, with no tensor allocations on the decode path.

use std::ops::Range;
use std::sync::Arc;

use super::adapter::{self, Adapter};
use super::attention::{attention, Span};
use super::config::{LlamaConfig, RopeStyle};
use super::kv::KvCache;
use super::linear::Linear;
use super::quant::{self, Input, Q8Rows, Sink};
use crate::math;

/// Which logits a forward item wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None: only extend the cache.
    None,
    /// The next-token distribution after the last new token.
    Last,
    /// One row per new token (scoring a candidate continuation).
    All,
}

/// What `run_layers` returns: the hidden rows after the last layer run, each item's first row,
/// and per row the row it is a copy of (itself when it was computed).
type Rows = (Vec<f32>, Vec<usize>, Vec<usize>);

/// One sequence's part of a batched forward (`C`: its cache, the KV cache for the real model).
pub struct ForwardItem<'a, C = KvCache> {
    pub cache: &'a mut C,
    pub tokens: &'a [u32],
    pub logits: Logits,
}

/// Logits of a batched forward: `rows[i]` is the range of rows (each `vocab` wide) of item `i`.
#[derive(Debug, Default)]
pub struct ForwardOutput {
    pub data: Vec<f32>,
    pub vocab: usize,
    pub rows: Vec<Range<usize>>,
}

impl ForwardOutput {
    /// Row `r` (absolute) of the output.
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.vocab..(r + 1) * self.vocab]
    }

    /// The rows of item `i`.
    pub fn item(&self, i: usize) -> impl Iterator<Item = &[f32]> + '_ {
        self.rows[i].clone().map(|r| self.row(r))
    }

    /// The last row of item `i`, if it asked for logits.
    pub fn last(&self, i: usize) -> Option<&[f32]> {
        let r = &self.rows[i];
        (!r.is_empty()).then(|| self.row(r.end - 1))
    }
}

/// Why a forward could not run. The engine plans only valid forwards, so each is a bug or a
/// fault of the machine, never a client's mistake.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("forward item without tokens")]
    Empty,
    #[error("sequence of {positions} positions exceeds the context length {context}")]
    PastContext { positions: usize, context: usize },
    #[error("token id {token} is outside the vocabulary ({vocab})")]
    Token { token: u32, vocab: usize },
    #[error("models of one forward must share their weights")]
    Unshared,
    #[error(transparent)]
    Kernel(#[from] candle_core::Error),
}

pub(super) struct Layer {
    pub(super) attn_norm: Vec<f32>,
    pub(super) qkv: Linear,
    pub(super) wo: Linear,
    pub(super) ffn_norm: Vec<f32>,
    pub(super) gate_up: Linear,
    pub(super) down: Linear,
}

/// A model's weights, shared by the base and every adapter over it.
pub(super) struct Weights {
    /// `(vocab, hidden)` row-major.
    pub(super) embed: Vec<f32>,
    pub(super) layers: Vec<Layer>,
    pub(super) norm: Vec<f32>,
    pub(super) output: Linear,
    /// `(context_length, head_dim / 2)` rotary tables.
    pub(super) cos: Vec<f32>,
    pub(super) sin: Vec<f32>,
}

pub struct Llama {
    pub cfg: LlamaConfig,
    pub(super) weights: Arc<Weights>,
    /// Low-rank deltas over `weights` (a LoRA model on a base's weights).
    pub(super) adapter: Option<Arc<Adapter>>,
}

impl Llama {
    /// Run a ragged batch: each item's tokens are appended to its cache; logits come back as asked.
    pub fn forward(&self, items: &mut [ForwardItem<'_>]) -> Result<ForwardOutput, ForwardError> {
        let n = items.len();
        let mut out = Self::forward_shared(&[self], items, &[n])?;
        Ok(out.pop().unwrap_or_default())
    }

    /// This model over the same weights with `adapter`'s deltas: it costs no weight memory, and
    /// its rows ride in the base's matmuls (`forward_shared`).
    pub fn with_adapter(&self, adapter: Adapter) -> Llama {
        Llama {
            cfg: self.cfg.clone(),
            weights: self.weights.clone(),
            adapter: Some(Arc::new(adapter)),
        }
    }

    pub fn adapter(&self) -> Option<&Adapter> {
        self.adapter.as_deref()
    }

    /// Whether `self` and `other` run on the same weights, so their items can share a forward.
    pub fn shares_weights(&self, other: &Llama) -> bool {
        Arc::ptr_eq(&self.weights, &other.weights)
    }

    /// One forward over several models of the same weights (a base and adapters over it):
    /// `items` holds `counts[k]` items of `models[k]`, in that order; each model gets its own
    /// output. Every weight is read once for all their rows; an adapter adds its low-rank
    /// deltas to its own rows only.
    pub fn forward_shared(
        models: &[&Llama],
        items: &mut [ForwardItem<'_>],
        counts: &[usize],
    ) -> Result<Vec<ForwardOutput>, ForwardError> {
        let Some(first) = models.first() else {
            return Ok(Vec::new());
        };
        if models.len() != counts.len()
            || counts.iter().sum::<usize>() != items.len()
            || models.iter().any(|m| !m.shares_weights(first))
        {
            return Err(ForwardError::Unshared);
        }
        let cfg = &first.cfg;
        let hidden = cfg.hidden;
        let (x, first_row, source) = first.run_layers(models, items, counts, cfg.n_layers)?;
        // Each model's wanted rows, in item order, then one pass of the output layer for all.
        let mut wanted = Vec::new();
        let mut per_model = Vec::with_capacity(models.len());
        let mut item = 0;
        for &count in counts {
            let mut rows = Vec::with_capacity(count);
            let start = wanted.len();
            for (it, &row) in items[item..item + count].iter().zip(&first_row[item..]) {
                let t = it.tokens.len();
                let first = wanted.len() - start;
                match it.logits {
                    Logits::None => {}
                    Logits::Last => wanted.push(row + t - 1),
                    Logits::All => wanted.extend(row..row + t),
                }
                rows.push(first..wanted.len() - start);
            }
            per_model.push((start..wanted.len(), rows));
            item += count;
        }
        // The output layer runs once per distinct row: a copy's logits are its source's.
        let mut slot = vec![usize::MAX; source.len()];
        let mut distinct = Vec::with_capacity(wanted.len());
        let at: Vec<usize> = (wanted.iter())
            .map(|&r| {
                let s = source[r];
                if slot[s] == usize::MAX {
                    slot[s] = distinct.len();
                    distinct.push(s);
                }
                slot[s]
            })
            .collect();
        let vocab = cfg.vocab_size;
        let mut data = vec![0f32; distinct.len() * vocab];
        if !distinct.is_empty() {
            let sel: Vec<f32> = (distinct.iter())
                .flat_map(|&r| &x[r * hidden..(r + 1) * hidden])
                .copied()
                .collect();
            let w = &first.weights;
            let input = Input::normed(&sel, &w.norm, cfg.rms_eps as f32);
            w.output
                .forward(input, distinct.len(), Sink::Store(&mut data))?;
        }
        if distinct.len() < wanted.len() {
            data = (at.iter())
                .flat_map(|&k| &data[k * vocab..(k + 1) * vocab])
                .copied()
                .collect();
        }
        // Split from the back: the first model's rows (the base's) keep the buffer, uncopied.
        let mut outputs: Vec<ForwardOutput> = per_model
            .into_iter()
            .rev()
            .map(|(span, rows)| ForwardOutput {
                data: data.split_off(span.start * vocab),
                vocab,
                rows,
            })
            .collect();
        outputs.reverse();
        Ok(outputs)
    }

    /// The hidden states after the first `layers` layers for every token of `tokens`, from an
    /// empty cache: `(tokens, hidden)`. What an adapter over the layers above them starts from.
    pub fn hidden_states(&self, tokens: &[u32], layers: usize) -> Result<Vec<f32>, ForwardError> {
        let mut cache = KvCache::new();
        let mut items = [ForwardItem {
            cache: &mut cache,
            tokens,
            logits: Logits::None,
        }];
        let stop = layers.min(self.cfg.n_layers);
        Ok(self.run_layers(&[self], &mut items, &[1], stop)?.0)
    }

    /// Run `items` (`counts[k]` of `models[k]`) through the first `stop` layers; returns the
    /// hidden rows, each item's first row among them and each row's source (the row it is a
    /// copy of, or itself), and advances every cache.
    ///
    /// An adapter's item reads the base below the adapter's first layer. When a base item of
    /// the batch has its tokens at its positions after the same history (GenARM feeds the two
    /// alike), the adapter's rows skip those layers: they take that twin's hidden rows where
    /// their adapter begins, and copies of its keys and values (kept, so that the item can
    /// also run alone later). An item alike with an earlier item of the same model is its copy
    /// in the same way, through every layer. Rows are laid out with such items last, in the order
    /// their layers begin, so that each layer runs on a prefix of the rows.
    fn run_layers(
        &self,
        models: &[&Llama],
        items: &mut [ForwardItem<'_>],
        counts: &[usize],
        stop: usize,
    ) -> Result<Rows, ForwardError> {
        let cfg = &self.cfg;
        let w = &*self.weights;
        let (hidden, hd, kvh) = (cfg.hidden, cfg.head_dim, cfg.n_kv_heads);
        let (qw, kvw) = (cfg.n_heads * hd, kvh * hd);
        for it in items.iter() {
            if it.tokens.is_empty() {
                return Err(ForwardError::Empty);
            }
            let positions = it.cache.len() + it.tokens.len();
            if positions > cfg.context_length {
                return Err(ForwardError::PastContext {
                    positions,
                    context: cfg.context_length,
                });
            }
            if let Some(&token) = it.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(ForwardError::Token {
                    token,
                    vocab: cfg.vocab_size,
                });
            }
        }
        let adapter_of: Vec<Option<&Adapter>> = (models.iter().zip(counts))
            .flat_map(|(m, &c)| std::iter::repeat_n(m.adapter.as_deref(), c))
            .collect();
        // Each item's twin, and the layer it joins the batch at. An item fed what an earlier
        // item of the same model is fed, after the same history (best-of-N's candidate, the
        // base lane its ARMs are read against, an ARM that both guides and ranks it), never
        // joins: it is that one's copy throughout. An adapted item joins its base twin where
        // its adapter begins.
        let same_model = |i: usize, j: usize| match (adapter_of[i], adapter_of[j]) {
            (None, None) => true,
            (Some(a), Some(b)) => std::ptr::eq(a, b),
            _ => false,
        };
        let alike = |i: usize, j: usize| {
            items[j].tokens == items[i].tokens && items[j].cache.same_history(items[i].cache)
        };
        let mut twin: Vec<Option<(usize, usize)>> = vec![None; items.len()];
        for i in 0..items.len() {
            twin[i] = (0..i)
                .find(|&j| same_model(i, j) && twin[j].is_none() && alike(i, j))
                .map(|j| (j, stop));
        }
        // The base twins come second: a copy's original may be an adapted item that joins
        // late, which `order` then places (and copies keys and values for) before the copy.
        for i in 0..items.len() {
            let Some(a) = adapter_of[i] else { continue };
            let joins = a.first_layer().min(stop);
            if joins > 0 && twin[i].is_none() {
                twin[i] = (0..items.len())
                    .find(|&j| adapter_of[j].is_none() && twin[j].is_none() && alike(i, j))
                    .map(|j| (j, joins));
            }
        }
        let mut order: Vec<usize> = (0..items.len()).filter(|&i| twin[i].is_none()).collect();
        let mut late: Vec<usize> = (0..items.len()).filter(|&i| twin[i].is_some()).collect();
        late.sort_by_key(|&i| twin[i].map(|(_, joins)| joins));
        order.extend(&late);
        // Rows of the batch: every item's new tokens, in `order`.
        let mut first_row = vec![0; items.len()];
        let mut n = 0;
        for &i in &order {
            first_row[i] = n;
            n += items[i].tokens.len();
        }
        let rows: Vec<Range<usize>> = (0..items.len())
            .map(|i| first_row[i]..first_row[i] + items[i].tokens.len())
            .collect();
        let rows_of = |i: usize| rows[i].clone();
        let mut place = vec![0; items.len()];
        for (p, &i) in order.iter().enumerate() {
            place[i] = p;
        }
        let mut x = vec![0f32; n * hidden];
        for &i in &order {
            let rows = &mut x[first_row[i] * hidden..];
            for (row, &t) in rows.chunks_exact_mut(hidden).zip(items[i].tokens) {
                row.copy_from_slice(&w.embed[t as usize * hidden..(t as usize + 1) * hidden]);
            }
        }
        // The rows of each adapted item that computes its own (copies do not), with its adapter.
        let adapted: Vec<(Range<usize>, &Adapter)> = (0..items.len())
            .filter(|&i| twin[i].is_none_or(|(_, joins)| joins < stop))
            .filter_map(|i| Some((rows_of(i), adapter_of[i]?)))
            .collect();
        // Items forked from an earlier item of the batch read their shared prefix of keys and
        // values from that item's copy: (its place in `order`, the positions they share).
        let anchors: Vec<Option<(usize, usize)>> = (0..order.len())
            .map(|p| {
                (0..p)
                    .map(|a| (a, items[order[p]].cache.shared_with(items[order[a]].cache)))
                    .find(|&(_, shared)| shared > 0)
            })
            .collect();
        let eps = cfg.rms_eps as f32;
        let width = qw + 2 * kvw;
        let mut qkv = vec![0f32; n * width];
        let mut attn = vec![0f32; n * qw];
        let mut act = vec![0f32; n * cfg.ffn];
        let (mut q8_attn, mut q8_act) = (Q8Rows::new(), Q8Rows::new());
        let mut kv_heads = Vec::with_capacity(items.len() * kvh);
        for (li, layer) in w.layers[..stop].iter().enumerate() {
            // Items taking part in this layer: a prefix of `order`, and their rows.
            let joined = |i: usize| twin[i].is_none_or(|(_, joins)| joins <= li);
            let active = order.iter().take_while(|&&i| joined(i)).count();
            let na = order[..active]
                .iter()
                .map(|&i| items[i].tokens.len())
                .sum::<usize>();
            for &i in &order[..active] {
                if let Some((j, _)) = twin[i].filter(|&(_, joins)| joins == li) {
                    let (to, from) = (first_row[i] * hidden, first_row[j] * hidden);
                    let len = items[i].tokens.len() * hidden;
                    x.copy_within(from..from + len, to);
                }
            }
            let xa = &mut x[..na * hidden];
            layer.qkv.forward(
                Input::normed(xa, &layer.attn_norm, eps),
                na,
                Sink::Store(&mut qkv[..na * width]),
            )?;
            for (rows, a) in &adapted {
                let parts = &a.layers[li].qkv;
                if !parts.is_empty() {
                    let normed = rms_normed(
                        &x[rows.start * hidden..rows.end * hidden],
                        &layer.attn_norm,
                        eps,
                    );
                    let y = &mut qkv[rows.start * width..rows.end * width];
                    adapter::add(parts, &normed, y, width, a.scale);
                }
            }
            // Open every item's cache for its new rows, then attend all rows of all items in one
            // pass over the pool (a pool call per item made batched decode pay a join per
            // sequence); the tasks rotate and store the new keys and values themselves.
            kv_heads.clear();
            for &i in &order {
                let it = &mut items[i];
                let t = it.tokens.len();
                it.cache.open(
                    (cfg.n_layers, cfg.context_length),
                    li,
                    (kvh, hd),
                    t,
                    &mut kv_heads,
                );
            }
            let kv_of = |p: usize| &kv_heads[p * kvh..(p + 1) * kvh];
            let spans: Vec<Span> = (0..active)
                .map(|p| {
                    let i = order[p];
                    Span {
                        rows: rows_of(i),
                        start: items[i].cache.len(),
                        kv: kv_of(p),
                        prefix: anchors[p].map(|(a, shared)| (kv_of(a), shared)),
                    }
                })
                .collect();
            // Attention and SwiGLU quantize their outputs for the next matmul as they make
            // them, where it reads quantized blocks (our kernels): its pool call then has no
            // prologue to wait for.
            // An attention task's heads are whole blocks only if a head is.
            let attn_blocks = (layer.wo.takes_blocks() && hd.is_multiple_of(quant::BLOCK))
                .then(|| q8_attn.writer(na, qw));
            let rope = |x: &mut [f32], pos: usize| self.rope(x, pos);
            let (qkv_a, attn_a) = (&mut qkv[..na * width], &mut attn[..na * qw]);
            attention(cfg, qkv_a, width, &spans, &rope, attn_a, attn_blocks);
            // Items not yet in copy their twins' new keys and values.
            for p in active..order.len() {
                let (i, (j, _)) = (order[p], twin[order[p]].expect("late items have twins"));
                let (start, t) = (items[i].cache.len(), items[i].tokens.len());
                for (to, from) in kv_of(p).iter().zip(kv_of(place[j])) {
                    // SAFETY: both caches were opened for positions start..start + t of this
                    // layer, and attention wrote the twin's; the item's are its own.
                    unsafe {
                        let at = start * hd;
                        std::ptr::copy_nonoverlapping(from.keys.add(at), to.keys.add(at), t * hd);
                        std::ptr::copy_nonoverlapping(
                            from.values.add(at),
                            to.values.add(at),
                            t * hd,
                        );
                    }
                }
            }
            let input = match attn_blocks {
                Some(_) => Input::quantized(attn_a, &q8_attn),
                None => Input::plain(attn_a),
            };
            layer
                .wo
                .forward(input, na, Sink::Add(&mut x[..na * hidden]))?;
            add_deltas(
                &adapted,
                |a| &a.layers[li].wo,
                (&attn, qw),
                (&mut x, hidden),
            );
            let act_blocks = layer
                .down
                .takes_blocks()
                .then(|| q8_act.writer(na, cfg.ffn));
            let act_a = &mut act[..na * cfg.ffn];
            layer.gate_up.forward(
                Input::normed(&x[..na * hidden], &layer.ffn_norm, eps),
                na,
                Sink::SwiGlu(act_a, act_blocks),
            )?;
            let input = match act_blocks {
                Some(_) => Input::quantized(act_a, &q8_act),
                None => Input::plain(act_a),
            };
            layer
                .down
                .forward(input, na, Sink::Add(&mut x[..na * hidden]))?;
            add_deltas(
                &adapted,
                |a| &a.layers[li].down,
                (&act, cfg.ffn),
                (&mut x, hidden),
            );
        }
        // Items that never joined (base copies, adapters that begin at `stop` or above) are their
        // twins' rows throughout.
        for (i, twin) in twin.iter().enumerate() {
            if let Some((j, stop_at)) = *twin {
                if stop_at == stop {
                    let (to, from) = (first_row[i] * hidden, first_row[j] * hidden);
                    x.copy_within(from..from + items[i].tokens.len() * hidden, to);
                }
            }
        }
        for it in items.iter_mut() {
            // SAFETY: every layer opened this cache for its t rows, and its attention (or its
            // twin's, copied) wrote them.
            unsafe { it.cache.advance(it.tokens) };
        }
        // Each row's source: the row it is a copy of (its item never joined), else itself.
        let mut source: Vec<usize> = (0..n).collect();
        for (i, twin) in twin.iter().enumerate() {
            if let Some((j, stop_at)) = *twin {
                if stop_at == stop {
                    for k in 0..items[i].tokens.len() {
                        source[first_row[i] + k] = first_row[j] + k;
                    }
                }
            }
        }
        Ok((x, first_row, source))
    }

    /// Rotate every head of `x` (one row) for position `pos`.
    fn rope(&self, x: &mut [f32], pos: usize) {
        let half = self.cfg.head_dim / 2;
        let cos = &self.weights.cos[pos * half..(pos + 1) * half];
        let sin = &self.weights.sin[pos * half..(pos + 1) * half];
        for head in x.chunks_exact_mut(self.cfg.head_dim) {
            match self.cfg.rope_style {
                // Zipped iterators, not indices: free of bounds checks, the loops vectorise.
                RopeStyle::Interleaved => {
                    for ((p, &c), &s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
                        let (a, b) = (p[0], p[1]);
                        p[0] = a * c - b * s;
                        p[1] = a * s + b * c;
                    }
                }
                RopeStyle::Halves => {
                    let (lo, hi) = head.split_at_mut(half);
                    for (((x, y), &c), &s) in lo.iter_mut().zip(hi).zip(cos).zip(sin) {
                        let (a, b) = (*x, *y);
                        *x = a * c - b * s;
                        *y = a * s + b * c;
                    }
                }
            }
        }
    }
}

/// Each adapted item's low-rank deltas of one linear layer (`parts` picks it), from its rows of
/// `input` (each `inp` wide) into its rows of `out` (each `width` wide).
fn add_deltas<'a>(
    adapted: &[(Range<usize>, &'a Adapter)],
    parts: impl Fn(&'a Adapter) -> &'a [adapter::LowRank],
    (input, inp): (&[f32], usize),
    (out, width): (&mut [f32], usize),
) {
    for (rows, a) in adapted {
        let x = &input[rows.start * inp..rows.end * inp];
        let y = &mut out[rows.start * width..rows.end * width];
        adapter::add(parts(a), x, y, width, a.scale);
    }
}

/// `x`'s rows RMS-normalised and scaled by `weight`, as `Input::normed` feeds a matmul.
fn rms_normed(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let mut out = x.to_vec();
    for row in out.chunks_exact_mut(weight.len()) {
        let s = math::inv_rms(row, eps);
        for (v, &w) in row.iter_mut().zip(weight) {
            *v *= s * w;
        }
    }
    out
}
