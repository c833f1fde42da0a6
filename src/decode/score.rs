//! Log-likelihoods of given continuations in their contexts, batched through the engine: for
//! decoders that rank texts they did not grow (equilibrium ranking's framings and judgments).
//! The items' token sequences are laid out as a trie, so a prefix they share — a question, a
//! framing — is fed once and forked, and every node whose parent is in is fed in the same step.
//!
//! Item i is `context ++ continuation`; the row at position p predicts the token at p + 1, so
//! its continuation needs the rows of positions |context| − 1 … len − 2, and its last token is
//! never fed. Nodes are split where an item's first needed row begins, so a node needs either
//! all of its rows or none.

use anyhow::{bail, Context, Result};
use tokio::sync::oneshot;

use super::prompt::MAX_ROWS;
use crate::engine::{Cx, Decoder, Event, Flow, Outputs, SeqId, Usage};
use crate::math::log_sum_exp;
use crate::model::{Logits, ModelId};

struct Item {
    tokens: Vec<u32>,
    /// The first position whose row it needs: its context's last.
    first: usize,
    /// log π of each continuation token.
    logps: Vec<f32>,
}

struct Node {
    parent: Option<usize>,
    /// Position of `run[0]` in every sequence through this node.
    start: usize,
    run: Vec<u32>,
    children: Vec<usize>,
    /// The items through this node that need its rows.
    readers: Vec<usize>,
    seq: Option<SeqId>,
    /// Tokens of `run` fed (or planned).
    fed: usize,
    done: bool,
}

/// (node, tokens fed from, ticket) planned this step.
type Planned = (usize, usize, usize);

pub struct Scorer {
    model: ModelId,
    items: Vec<Item>,
    nodes: Vec<Node>,
    planned: Vec<Planned>,
}

impl Scorer {
    /// Score each `(context, continuation)` on `model`; both must be non-empty.
    pub fn new(model: ModelId, items: Vec<(Vec<u32>, Vec<u32>)>) -> Result<Self> {
        let mut scorer = Self {
            model,
            items: Vec::with_capacity(items.len()),
            nodes: Vec::new(),
            planned: Vec::new(),
        };
        for (context, continuation) in items {
            if context.is_empty() || continuation.is_empty() {
                bail!("a scored item needs a context and a continuation");
            }
            let first = context.len() - 1;
            let mut tokens = context;
            let n = continuation.len();
            tokens.extend(continuation);
            scorer.items.push(Item {
                tokens,
                first,
                logps: Vec::with_capacity(n),
            });
        }
        let all: Vec<usize> = (0..scorer.items.len()).collect();
        scorer.grow(all, 0, None);
        Ok(scorer)
    }

    /// The fed part of item `i`: all but its last token.
    fn fed_len(&self, i: usize) -> usize {
        self.items[i].tokens.len() - 1
    }

    /// Nodes for `group` (items that agree before `start` and go on past it), by their token at
    /// `start`, under `parent`.
    fn grow(&mut self, group: Vec<usize>, start: usize, parent: Option<usize>) {
        let mut by_token: Vec<(u32, Vec<usize>)> = Vec::new();
        for i in group {
            let t = self.items[i].tokens[start];
            match by_token.iter_mut().find(|(u, _)| *u == t) {
                Some((_, g)) => g.push(i),
                None => by_token.push((t, vec![i])),
            }
        }
        for (_, group) in by_token {
            // The run goes on while every item does, with the same token, and none starts
            // needing rows.
            let mut end = start + 1;
            while group.iter().all(|&i| {
                self.fed_len(i) > end
                    && self.items[i].first != end
                    && self.items[i].tokens[end] == self.items[group[0]].tokens[end]
            }) {
                end += 1;
            }
            let id = self.nodes.len();
            let readers = group
                .iter()
                .copied()
                .filter(|&i| self.items[i].first <= start)
                .collect();
            self.nodes.push(Node {
                parent,
                start,
                run: self.items[group[0]].tokens[start..end].to_vec(),
                children: Vec::new(),
                readers,
                seq: None,
                fed: 0,
                done: false,
            });
            if let Some(p) = parent {
                self.nodes[p].children.push(id);
            }
            let longer: Vec<usize> = group
                .into_iter()
                .filter(|&i| self.fed_len(i) > end)
                .collect();
            if !longer.is_empty() {
                self.grow(longer, end, Some(id));
            }
        }
    }

    /// Every item is scored.
    pub fn is_done(&self) -> bool {
        self.nodes.iter().all(|n| n.done)
    }

    /// Feed the next chunk of every node whose parent is in, within the step's row budget.
    pub fn plan(&mut self, cx: &mut Cx) -> Result<()> {
        self.planned.clear();
        let mut rows = MAX_ROWS;
        for n in 0..self.nodes.len() {
            let node = &self.nodes[n];
            if node.done || node.parent.is_some_and(|p| !self.nodes[p].done) {
                continue;
            }
            let needed = !node.readers.is_empty();
            let mut count = (node.run.len() - node.fed).min(cx.prefill_chunk.max(1));
            if needed {
                count = count.min(rows);
            }
            if count == 0 {
                continue;
            }
            let seq = match (node.seq, node.parent) {
                (Some(seq), _) => seq,
                (None, None) => cx.new_seq(self.model),
                (None, Some(p)) => {
                    let parent = self.nodes[p].seq.context("a parent without its cache")?;
                    let seq = cx.fork(parent)?;
                    self.nodes[n].seq = Some(seq);
                    // The last child to start takes over; the parent's cache is no longer needed.
                    if self.nodes[p]
                        .children
                        .iter()
                        .all(|&c| self.nodes[c].seq.is_some())
                    {
                        cx.free(parent);
                        self.nodes[p].seq = None;
                    }
                    seq
                }
            };
            let node = &mut self.nodes[n];
            node.seq = Some(seq);
            let from = node.fed;
            let tokens = node.run[from..from + count].to_vec();
            let logits = if needed { Logits::All } else { Logits::None };
            let ticket = cx.forward(seq, tokens, logits)?;
            node.fed += count;
            if needed {
                rows -= count;
            }
            self.planned.push((n, from, ticket));
        }
        Ok(())
    }

    /// Read this step's rows; true once every item is scored.
    pub fn absorb(&mut self, cx: &mut Cx, out: &Outputs) -> Result<bool> {
        for (n, from, ticket) in std::mem::take(&mut self.planned) {
            let node = &self.nodes[n];
            if !node.readers.is_empty() {
                for (j, row) in out.rows(ticket)?.into_iter().enumerate() {
                    let lse = log_sum_exp(row);
                    let position = node.start + from + j;
                    for &i in &node.readers {
                        let item = &mut self.items[i];
                        let next = item.tokens[position + 1] as usize;
                        item.logps
                            .push(row.get(next).map_or(f32::NEG_INFINITY, |&x| x - lse));
                    }
                }
            }
            let node = &mut self.nodes[n];
            if node.fed == node.run.len() {
                node.done = true;
                if node.children.is_empty() {
                    if let Some(seq) = node.seq.take() {
                        cx.free(seq);
                    }
                }
            }
        }
        Ok(self.is_done())
    }

    /// Σ log π of item `i`'s continuation.
    pub fn total(&self, i: usize) -> f64 {
        self.items[i].logps.iter().map(|&l| f64::from(l)).sum()
    }

    /// log π of each of item `i`'s continuation tokens.
    pub fn logps(&self, i: usize) -> &[f32] {
        &self.items[i].logps
    }

    /// Tokens fed in all: each shared prefix counts once.
    pub fn fed_tokens(&self) -> usize {
        self.nodes.iter().map(|n| n.run.len()).sum()
    }
}

/// Responses read by several models at once (`/v1/score`): the base's log-likelihood and reward
/// models' Σ log π_r, each model reading the prompt in its own tokens, prefilled once per model
/// and forked per response. Sends, per model in the order given, each response's per-token
/// log-probs.
pub struct Likelihoods {
    scorers: Vec<Scorer>,
    responses: usize,
    result: Option<oneshot::Sender<Vec<Vec<Vec<f32>>>>>,
}

impl Likelihoods {
    /// `prompts`: each model with the prompt in its tokens; every response is read after each.
    pub fn new(
        prompts: Vec<(ModelId, Vec<u32>)>,
        responses: &[Vec<u32>],
        result: oneshot::Sender<Vec<Vec<Vec<f32>>>>,
    ) -> Result<Self> {
        let scorers = prompts
            .into_iter()
            .map(|(model, prompt)| {
                let items = responses
                    .iter()
                    .map(|r| (prompt.clone(), r.clone()))
                    .collect();
                Scorer::new(model, items)
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            scorers,
            responses: responses.len(),
            result: Some(result),
        })
    }
}

impl Decoder for Likelihoods {
    fn plan(&mut self, cx: &mut Cx) -> Result<()> {
        for s in self.scorers.iter_mut().filter(|s| !s.is_done()) {
            s.plan(cx)?;
        }
        Ok(())
    }

    fn absorb(&mut self, cx: &mut Cx, out: &Outputs) -> Result<Flow> {
        let mut done = true;
        for s in &mut self.scorers {
            done &= s.is_done() || s.absorb(cx, out)?;
        }
        if !done {
            return Ok(Flow::Continue);
        }
        let logprobs = (self.scorers.iter())
            .map(|s| (0..self.responses).map(|i| s.logps(i).to_vec()).collect())
            .collect();
        if let Some(result) = self.result.take() {
            let _ = result.send(logprobs);
        }
        cx.emit(Event::Done {
            usage: Usage {
                prompt_tokens: self.scorers.iter().map(Scorer::fed_tokens).sum(),
                completion_tokens: 0,
            },
            report: None,
        });
        Ok(Flow::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::testing::engine;
    use crate::engine::fake::{self, FakeModel, WORDS};
    use crate::engine::{Decoder, Event, Flow, Usage};
    use crate::model::{Role, BASE};

    /// Runs a scorer to the end and sends back its totals.
    struct Run(Scorer, std::sync::mpsc::Sender<Vec<f64>>);

    impl Decoder for Run {
        fn plan(&mut self, cx: &mut Cx) -> Result<()> {
            self.0.plan(cx)
        }

        fn absorb(&mut self, cx: &mut Cx, out: &Outputs) -> Result<Flow> {
            if !self.0.absorb(cx, out)? {
                return Ok(Flow::Continue);
            }
            let totals = (0..self.0.items.len()).map(|i| self.0.total(i)).collect();
            let _ = self.1.send(totals);
            cx.emit(Event::Done {
                usage: Usage::default(),
                report: None,
            });
            Ok(Flow::Done)
        }
    }

    #[test]
    fn each_continuation_is_scored_after_its_own_context_and_prefixes_are_fed_once() {
        // The next token's distribution depends on the whole history.
        let words = WORDS.len() as u32;
        let script = move |h: &[u32]| {
            let s = h
                .iter()
                .enumerate()
                .map(|(i, &t)| (i as u32 + 1) * t)
                .sum::<u32>();
            fake::favour(s % words, 2.0)
        };
        let model = FakeModel::new("base", Role::Base, script);
        let batches = model.batches.clone();
        let e = engine(vec![model]);
        let shared: Vec<u32> = (2..12).collect();
        let with = |tail: &[u32]| [shared.as_slice(), tail].concat();
        let items = vec![
            (with(&[3]), vec![4, 5, 6]),
            (with(&[3]), vec![4, 7]),
            (with(&[9, 9]), vec![2]),
            (shared.clone(), vec![3, 4]),
            (vec![5], vec![6]),
        ];
        let want: Vec<f64> = items
            .iter()
            .map(|(c, y)| {
                let mut history = c.clone();
                let mut sum = 0.0;
                for &t in y {
                    let mut lp = script(&history);
                    crate::math::log_softmax(&mut lp);
                    sum += f64::from(lp[t as usize]);
                    history.push(t);
                }
                sum
            })
            .collect();
        let scorer = Scorer::new(BASE, items).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let out = fake::run(&e, Box::new(Run(scorer, tx)));
        assert!(out.failure.is_none(), "{:?}", out.failure);
        let got = rx.recv().unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
        // The shared ten tokens once, then the tails: 3 | 4 5 | 7 (after 3 4), 9 9, 5.
        let fed = batches.tokens();
        assert_eq!(fed, 10 + 1 + 1 + 1 + 2 + 1, "{:?}", batches.get());
    }
}
