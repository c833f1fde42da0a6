//! Models that read a request's answers as they grow: the reward models beside the base (GenARM,
//! ARGS, DeAL, best-of-N's scoring) or the base itself under another prompt. Each model (a lane)
//! prefills the prompt in its own tokens — its own chat template — once, in chunks; then every
//! track (a choice, candidate, beam or rollout) holds one sequence on each lane, forked from the
//! prompt or from another track, fed the same tokens in the same step (so the engine batches
//! them), truncated and freed together.
//!
//! A tracker either leaves each step's rows to its decoder (`Rows::Raw`: GenARM tilts the base
//! by them) or keeps each lane's next-token log-probs and the sum Σ log π(y_t | prompt, y_<t) of
//! the tokens counted on a track (`Rows::LogProbs`: sequence-level rewards).

use std::sync::Arc;

use anyhow::{bail, Context, Result};

use super::prompt::{fork, SharedPrompt};
use crate::engine::{Cx, Outputs, SeqId};
use crate::math::log_softmax;
use crate::model::{Logits, ModelId, BASE};

/// What a tracker does with the rows its forwards return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// Handed to the decoder (`Tracker::rows`), untouched.
    Raw,
    /// Log-softmaxed over the shared vocabulary and kept as each track's next-token log-probs.
    LogProbs,
}

/// A track's place in its tracker.
pub type TrackId = usize;

/// One model's part: its prompt, then the prompt's sequence and row until tracks branch off.
struct Lane {
    model: ModelId,
    prompt: SharedPrompt,
    root: Option<SeqId>,
    /// The row after the prompt (raw, or log-probs).
    first: Option<Arc<[f32]>>,
    /// With `Rows::LogProbs`, for a model read relative to the base (`ModelInfo::relative`):
    /// the lane of the base under the same prompt, whose log-probs its own are counted against.
    reference: Option<usize>,
}

struct Track {
    /// One sequence per lane.
    seqs: Vec<SeqId>,
    /// Per lane, Σ log π of the tokens counted.
    logps: Vec<f64>,
    /// Per lane, the log-probs of the next token (`Rows::LogProbs`).
    next: Vec<Arc<[f32]>>,
    /// This step's feed: its tokens and a ticket per lane.
    fed: Option<(Vec<u32>, Vec<usize>)>,
}

/// A track's counts and caches at one moment, to return to (`Tracker::rewind`).
#[derive(Clone)]
pub struct Checkpoint {
    lens: Vec<usize>,
    logps: Vec<f64>,
    next: Vec<Arc<[f32]>>,
}

pub struct Tracker {
    /// The decoder's lanes, then any base lanes that relative ones are read against.
    lanes: Vec<Lane>,
    /// The decoder's lanes (`lanes` may add references after them).
    asked: usize,
    /// References added (once, at the first plan).
    resolved: bool,
    /// Relative lanes' rows after the prompt made differences (once, when all are in).
    relative_firsts: bool,
    rows: Rows,
    tracks: Vec<Option<Track>>,
    free: Vec<TrackId>,
    /// Tracks fed this step.
    planned: Vec<TrackId>,
}

impl Tracker {
    /// A tracker over the models of `prompts`, each with the prompt in its own tokens.
    pub fn new(prompts: impl IntoIterator<Item = (ModelId, Vec<u32>)>, rows: Rows) -> Self {
        let lanes: Vec<Lane> = prompts
            .into_iter()
            .map(|(model, tokens)| Lane::new(model, tokens))
            .collect();
        Self {
            asked: lanes.len(),
            resolved: false,
            relative_firsts: false,
            lanes,
            rows,
            tracks: Vec::new(),
            free: Vec::new(),
            planned: Vec::new(),
        }
    }

    /// Models followed (each a forward per fed token), the base lanes that relative ones are
    /// read against included; the decoder's own lanes come first.
    pub fn lanes(&self) -> usize {
        self.lanes.len()
    }

    /// Give every relative lane a base lane under the same prompt to be read against (sharing
    /// one where prompts agree); log-probs and sums of a relative lane are then differences.
    fn resolve(&mut self, cx: &Cx) {
        self.resolved = true;
        if self.rows != Rows::LogProbs {
            return;
        }
        for l in 0..self.asked {
            if !cx.model(self.lanes[l].model).relative {
                continue;
            }
            let tokens = self.lanes[l].prompt.tokens().to_vec();
            let same = |x: &Lane| x.model == BASE && x.prompt.tokens() == tokens.as_slice();
            let r = match self.lanes.iter().position(same) {
                Some(r) => r,
                None => {
                    self.lanes.push(Lane::new(BASE, tokens));
                    self.lanes.len() - 1
                }
            };
            self.lanes[l].reference = Some(r);
        }
    }

    /// Plan the next chunk of every lane's prompt (nothing once prefilled).
    pub fn plan_prompts(&mut self, cx: &mut Cx) -> Result<()> {
        if !self.resolved {
            self.resolve(cx);
        }
        for lane in &mut self.lanes {
            if lane.first.is_none() {
                lane.prompt.plan(cx)?;
            }
        }
        Ok(())
    }

    /// Read the prompts' chunks; true once every lane's prompt is in.
    pub fn absorb_prompts(&mut self, cx: &Cx, out: &Outputs) -> Result<bool> {
        let vocab = cx.model(BASE).vocab.size();
        for lane in &mut self.lanes {
            if lane.first.is_some() {
                continue;
            }
            if let Some((seq, row)) = lane.prompt.absorb(cx, out)? {
                lane.root = Some(seq);
                lane.first = Some(match self.rows {
                    Rows::Raw => row.into(),
                    Rows::LogProbs => log_probs(row, vocab),
                });
            }
        }
        if !self.ready() {
            return Ok(false);
        }
        // Once all are in, relative lanes' rows become differences, once.
        if !self.relative_firsts {
            self.relative_firsts = true;
            for l in 0..self.asked {
                if let Some(r) = self.lanes[l].reference {
                    let reference = self.lanes[r]
                        .first
                        .clone()
                        .context("a prompt not prefilled")?;
                    let own = self.lanes[l]
                        .first
                        .as_deref()
                        .context("a prompt not prefilled")?;
                    self.lanes[l].first = Some(difference(own, &reference));
                }
            }
        }
        Ok(true)
    }

    /// Every lane's prompt is in.
    pub fn ready(&self) -> bool {
        self.lanes.iter().all(|l| l.first.is_some())
    }

    /// Each lane's row after the prompt.
    pub fn first_rows(&self) -> Result<Vec<Arc<[f32]>>> {
        self.lanes
            .iter()
            .map(|l| l.first.clone().context("a prompt not yet prefilled"))
            .collect()
    }

    /// `count` tracks at the prompt's end: the first takes the prompt's own sequences, the rest
    /// fork them. Once only; with `count` 0 the prompt's sequences are freed.
    pub fn branch(&mut self, cx: &mut Cx, count: usize) -> Result<Vec<TrackId>> {
        let mut per_lane = Vec::with_capacity(self.lanes.len());
        for lane in &mut self.lanes {
            let root = lane.root.take().context("branching before the prompt")?;
            if count == 0 {
                cx.free(root);
                per_lane.push(Vec::new());
            } else {
                per_lane.push(fork(cx, root, count)?);
            }
        }
        let firsts: Vec<Arc<[f32]>> = self
            .lanes
            .iter()
            .map(|l| l.first.clone().expect("a root implies its row"))
            .collect();
        let logps = vec![0.0; self.lanes.len()];
        Ok((0..count)
            .map(|i| {
                self.insert(Track {
                    seqs: per_lane.iter().map(|s| s[i]).collect(),
                    logps: logps.clone(),
                    next: firsts.clone(),
                    fed: None,
                })
            })
            .collect())
    }

    fn insert(&mut self, track: Track) -> TrackId {
        match self.free.pop() {
            Some(id) => {
                self.tracks[id] = Some(track);
                id
            }
            None => {
                self.tracks.push(Some(track));
                self.tracks.len() - 1
            }
        }
    }

    fn track(&self, id: TrackId) -> Result<&Track> {
        self.tracks
            .get(id)
            .and_then(Option::as_ref)
            .context("an unknown track")
    }

    fn track_mut(&mut self, id: TrackId) -> Result<&mut Track> {
        self.tracks
            .get_mut(id)
            .and_then(Option::as_mut)
            .context("an unknown track")
    }

    /// A copy of track `id`, to continue independently.
    pub fn fork(&mut self, cx: &mut Cx, id: TrackId) -> Result<TrackId> {
        let t = self.track(id)?;
        let (logps, next) = (t.logps.clone(), t.next.clone());
        let seqs = t
            .seqs
            .clone()
            .into_iter()
            .map(|s| cx.fork(s))
            .collect::<Result<_>>()?;
        Ok(self.insert(Track {
            seqs,
            logps,
            next,
            fed: None,
        }))
    }

    /// Release track `id`'s sequences.
    pub fn free(&mut self, cx: &mut Cx, id: TrackId) {
        if let Some(t) = self.tracks.get_mut(id).and_then(Option::take) {
            for s in t.seqs {
                cx.free(s);
            }
            self.free.push(id);
        }
    }

    /// Positions every lane of track `id` may still grow by (unbounded without lanes).
    pub fn room(&self, cx: &Cx, id: TrackId) -> usize {
        self.track(id).map_or(0, |t| {
            t.seqs
                .iter()
                .map(|&s| cx.room(s))
                .fold(usize::MAX, usize::min)
        })
    }

    /// Advance track `id` by `tokens` on every lane, in this step. With `Rows::LogProbs`, each
    /// token after the first is counted from the row before it.
    pub fn feed(&mut self, cx: &mut Cx, id: TrackId, tokens: &[u32]) -> Result<()> {
        let logits = match (self.rows, tokens.len()) {
            (Rows::LogProbs, 2..) => Logits::All,
            _ => Logits::Last,
        };
        let t = self.track(id)?;
        if t.fed.is_some() {
            bail!("a track fed twice in one step");
        }
        let tickets = t
            .seqs
            .clone()
            .into_iter()
            .map(|s| cx.forward(s, tokens.to_vec(), logits))
            .collect::<Result<Vec<_>>>()?;
        self.track_mut(id)?.fed = Some((tokens.to_vec(), tickets));
        self.planned.push(id);
        Ok(())
    }

    /// After the step: with `Rows::LogProbs`, count the fed tokens and keep each lane's
    /// next-token log-probs (with `Rows::Raw`, `rows` hands the rows out instead).
    pub fn absorb(&mut self, cx: &Cx, out: &Outputs) -> Result<()> {
        let planned = std::mem::take(&mut self.planned);
        if self.rows == Rows::Raw {
            return Ok(());
        }
        let vocab = cx.model(BASE).vocab.size();
        let references: Vec<Option<usize>> = self.lanes.iter().map(|l| l.reference).collect();
        for id in planned {
            let t = self.track_mut(id)?;
            let (tokens, tickets) = t.fed.take().context("a planned track without its feed")?;
            let mut gains = Vec::with_capacity(tickets.len());
            for (l, &ticket) in tickets.iter().enumerate() {
                let rows = out.rows(ticket)?;
                // Row i predicts the token after tokens[i].
                let gain: f64 = (rows.iter().zip(&tokens[1..]))
                    .map(|(row, &next)| f64::from(logprob_in(row, next, vocab)))
                    .sum();
                gains.push(gain);
                let last = rows.last().context("a feed without logits")?;
                t.next[l] = log_probs(last, vocab);
            }
            for (l, gain) in gains.iter().enumerate() {
                t.logps[l] += match references[l] {
                    Some(r) => gain - gains[r],
                    None => *gain,
                };
            }
            for (l, r) in references.iter().enumerate() {
                if let Some(r) = *r {
                    t.next[l] = difference(&t.next[l], &t.next[r]);
                }
            }
        }
        Ok(())
    }

    /// This step's rows of track `id`, one per lane (`Rows::Raw`).
    pub fn rows<'o>(&mut self, out: &Outputs<'o>, id: TrackId) -> Result<Vec<&'o [f32]>> {
        let (_, tickets) = self
            .track_mut(id)?
            .fed
            .take()
            .context("rows of a track not fed this step")?;
        tickets.iter().map(|&t| out.last(t)).collect()
    }

    /// Count `token` on track `id`: add its log-prob under each lane's next-token distribution.
    pub fn count(&mut self, id: TrackId, token: u32) -> Result<()> {
        let t = self.track_mut(id)?;
        for (sum, next) in t.logps.iter_mut().zip(&t.next) {
            *sum += f64::from(logprob(next, token));
        }
        Ok(())
    }

    /// The log-prob of `token` next on lane `lane` of track `id`.
    pub fn next_logprob(&self, id: TrackId, lane: usize, token: u32) -> Result<f32> {
        Ok(logprob(&self.track(id)?.next[lane], token))
    }

    /// Per lane, Σ log π of the tokens counted on track `id`.
    pub fn logps(&self, id: TrackId) -> Result<&[f64]> {
        Ok(&self.track(id)?.logps)
    }

    /// Track `id` as it is now.
    pub fn checkpoint(&self, cx: &Cx, id: TrackId) -> Result<Checkpoint> {
        let t = self.track(id)?;
        Ok(Checkpoint {
            lens: t.seqs.iter().map(|&s| cx.len(s)).collect(),
            logps: t.logps.clone(),
            next: t.next.clone(),
        })
    }

    /// Return track `id` to `checkpoint`: its caches forget what was fed since, its counts too.
    pub fn rewind(&mut self, cx: &mut Cx, id: TrackId, checkpoint: Checkpoint) -> Result<()> {
        let t = self.track_mut(id)?;
        for (&s, &len) in t.seqs.iter().zip(&checkpoint.lens) {
            cx.truncate(s, len);
        }
        t.logps = checkpoint.logps;
        t.next = checkpoint.next;
        Ok(())
    }
}

impl Lane {
    fn new(model: ModelId, tokens: Vec<u32>) -> Self {
        Self {
            model,
            prompt: SharedPrompt::new(model, tokens),
            root: None,
            first: None,
            reference: None,
        }
    }
}

/// `own − reference`, entry by entry: a relative model's log-prob gains over the base's.
fn difference(own: &[f32], reference: &[f32]) -> Arc<[f32]> {
    own.iter().zip(reference).map(|(a, b)| a - b).collect()
}

/// log_softmax of `row` over the shared vocabulary (models may pad their rows past it).
fn log_probs(row: &[f32], vocab: usize) -> Arc<[f32]> {
    let mut lp = row[..row.len().min(vocab)].to_vec();
    log_softmax(&mut lp);
    lp.into()
}

/// `token`'s log-prob in `logprobs`; a token past the row (padding) gets the row's least.
pub fn logprob(logprobs: &[f32], token: u32) -> f32 {
    logprobs
        .get(token as usize)
        .copied()
        .unwrap_or_else(|| logprobs.iter().copied().fold(f32::INFINITY, f32::min))
}

/// `logprob(log_softmax(row), token)` over the shared vocabulary, without materialising it.
fn logprob_in(row: &[f32], token: u32, vocab: usize) -> f32 {
    let row = &row[..row.len().min(vocab)];
    logprob(row, token) - crate::math::log_sum_exp(row)
}
