//! The engine: one thread owns the models and steps every active sequence of every request
//! together (continuous batching). Requests join and leave between steps; each gets a stream of
//! typed events; dropping the receiver cancels the request at the next step. The contract a
//! decoder implements is in `decoder`, what a model must provide in `forward`.

mod decoder;
mod events;
#[cfg(test)]
pub mod fake;
mod forward;
mod pacer;
mod store;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use tokio::sync::mpsc;

use crate::model::{ForwardItem, ForwardOutput, ModelId, ModelInfo};
use crate::reward::Registry;
use decoder::Planned;
use pacer::Pacer;
use store::{SeqStore, Store};

pub use decoder::{Cx, Decoder, Flow, Outputs};
pub use events::{EngineError, Event, FinishReason, PromptLogprobs, TokenEvent, Usage};
pub use forward::{Cache, Forward};
pub use store::SeqId;

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Requests stepped together; later ones wait in the queue.
    pub max_running: usize,
    /// Prompt tokens a sequence may prefill in one step, so long prompts do not stall others.
    pub prefill_chunk: usize,
    /// Prompt tokens all sequences together may prefill at most in a step while others decode.
    pub interleaved_prefill: usize,
    /// While others decode, a step that also prefills may take at most this many times a
    /// decode-only step (`pacer`): a long prompt slows the streams by a bounded factor
    /// (docs/reliability.md has the trade-off measured).
    pub prefill_stretch: f64,
    /// Requests that may wait beyond the running ones; past it `submit` refuses (`Busy`), so a
    /// flood costs bounded memory. None: no bound (in-process evaluations queue everything).
    pub max_queue: Option<usize>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            max_running: 16,
            prefill_chunk: 256,
            interleaved_prefill: 64,
            prefill_stretch: 3.0,
            max_queue: None,
        }
    }
}

/// Requests running and waiting, for metrics.
#[derive(Debug, Default)]
pub struct Load {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
}

struct Job {
    decoder: Box<dyn Decoder>,
    events: mpsc::UnboundedSender<Event>,
    queued_at: Instant,
}

/// A handle to the engine thread; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    jobs: std_mpsc::Sender<Job>,
    /// `max_running` and `max_queue`, for admission.
    limits: (usize, Option<usize>),
    models: Arc<Vec<ModelInfo>>,
    rewards: Arc<Registry>,
    pub load: Arc<Load>,
}

impl Engine {
    /// Start the engine thread over `models` (the first is the base model).
    pub fn start<F: Forward>(models: Vec<F>, options: EngineOptions) -> Self {
        let infos = Arc::new(models.iter().map(F::info).collect::<Vec<_>>());
        let load = Arc::new(Load::default());
        let (tx, rx) = std_mpsc::channel();
        let limits = (options.max_running, options.max_queue);
        let pacer = Pacer::new(options.prefill_stretch, options.interleaved_prefill);
        // Models that share weights run as one forward, in the order they were given.
        let mut groups: Vec<Vec<ModelId>> = Vec::new();
        for (mid, m) in models.iter().enumerate() {
            match groups.iter_mut().find(|g| models[g[0]].shares_weights(m)) {
                Some(g) => g.push(mid),
                None => groups.push(vec![mid]),
            }
        }
        let worker = Worker {
            groups,
            models,
            infos: infos.clone(),
            options,
            jobs: rx,
            queue: VecDeque::new(),
            running: Vec::new(),
            store: SeqStore::default(),
            load: load.clone(),
            decoding: false,
            pacer,
        };
        std::thread::Builder::new()
            .name("tilt-engine".into())
            .spawn(move || worker.run())
            .expect("spawning the engine thread");
        Self {
            jobs: tx,
            limits,
            rewards: Arc::new(Registry::new(&infos)),
            models: infos,
            load,
        }
    }

    pub fn models(&self) -> &[ModelInfo] {
        &self.models
    }

    pub fn base(&self) -> &ModelInfo {
        &self.models[crate::model::BASE]
    }

    /// The reward sources of the loaded models: what requests may steer and score by.
    pub fn rewards(&self) -> &Registry {
        &self.rewards
    }

    /// Queue a request; its events arrive on the returned receiver. Drop it to cancel. Refused
    /// (`Busy`) when `max_queue` requests already wait.
    pub fn submit(
        &self,
        decoder: Box<dyn Decoder>,
    ) -> Result<mpsc::UnboundedReceiver<Event>, EngineError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (max_running, max_queue) = self.limits;
        // Waiting counts requests not yet admitted: those a free slot will take at once do not
        // queue. (The two counts are read apart: the bound may be passed by a request or two.)
        let free = max_running.saturating_sub(self.load.running.load(Ordering::Relaxed));
        let bound = max_queue.map_or(usize::MAX, |q| q.saturating_add(free));
        (self.load.waiting)
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                (w < bound).then_some(w + 1)
            })
            .map_err(|_| EngineError::Busy {
                max_queue: max_queue.unwrap_or(usize::MAX),
            })?;
        self.jobs
            .send(Job {
                decoder,
                events: tx,
                queued_at: Instant::now(),
            })
            .map_err(|_| {
                self.load.waiting.fetch_sub(1, Ordering::Relaxed);
                EngineError::Stopped
            })?;
        Ok(rx)
    }
}

struct Running {
    decoder: Box<dyn Decoder>,
    events: mpsc::UnboundedSender<Event>,
    seqs: Vec<SeqId>,
    planned: Vec<Planned>,
    /// Where each planned forward's rows landed: (model, item in that model's batch).
    landed: Vec<(usize, usize)>,
    failed: Option<EngineError>,
    done: bool,
}

struct Worker<F: Forward> {
    models: Vec<F>,
    /// Models by the weights they share, each group one forward a step.
    groups: Vec<Vec<ModelId>>,
    infos: Arc<Vec<ModelInfo>>,
    options: EngineOptions,
    jobs: std_mpsc::Receiver<Job>,
    queue: VecDeque<Job>,
    running: Vec<Running>,
    store: SeqStore<F::Cache>,
    load: Arc<Load>,
    /// The last step fed some sequence a single token: something is decoding.
    decoding: bool,
    pacer: Pacer,
}

impl<F: Forward> Worker<F> {
    fn run(mut self) {
        loop {
            if self.running.is_empty() && self.queue.is_empty() {
                match self.jobs.recv() {
                    Ok(job) => self.queue.push_back(job),
                    Err(_) => return, // every handle dropped
                }
            }
            while let Ok(job) = self.jobs.try_recv() {
                self.queue.push_back(job);
            }
            self.admit();
            self.step();
            self.retire();
        }
    }

    fn admit(&mut self) {
        while self.running.len() < self.options.max_running {
            let Some(job) = self.queue.pop_front() else {
                break;
            };
            self.load.waiting.fetch_sub(1, Ordering::Relaxed);
            if job.events.is_closed() {
                continue; // the client left while queued
            }
            let _ = job.events.send(Event::Started {
                queue_time: job.queued_at.elapsed(),
            });
            self.load.running.fetch_add(1, Ordering::Relaxed);
            self.running.push(Running {
                decoder: job.decoder,
                events: job.events,
                seqs: Vec::new(),
                planned: Vec::new(),
                landed: Vec::new(),
                failed: None,
                done: false,
            });
        }
    }

    fn step(&mut self) {
        // 1. Every request says which forwards it needs.
        // While something decodes, prompts share a small budget of tokens a step, oldest
        // request first; otherwise each sequence prefills a whole chunk.
        let mut budget = self.decoding.then(|| self.pacer.budget());
        let (mut decoding, mut prompt_tokens) = (false, 0);
        for r in self.running.iter_mut() {
            if r.events.is_closed() {
                r.done = true; // cancelled: the receiver is gone
                continue;
            }
            r.planned.clear();
            let mut cx = Cx::new(
                &mut self.store,
                &self.infos,
                &mut r.seqs,
                &mut r.planned,
                &r.events,
                self.options.prefill_chunk,
            );
            cx.prefill_budget = budget;
            if let Err(e) = guarded("the decoder", || r.decoder.plan(&mut cx)) {
                r.failed = Some(EngineError::Decoder(format!("{e:#}")));
            }
            for p in &r.planned {
                match p.tokens.len() {
                    1 => decoding = true,
                    n => {
                        prompt_tokens += n;
                        budget = budget.map(|b| b.saturating_sub(n));
                    }
                }
            }
        }
        self.decoding = decoding;
        let forwards = Instant::now();
        // 2. One batched forward per group of models that share weights (a base and its
        // adapters), over all planned items.
        let mut outputs: Vec<ForwardOutput> =
            self.models.iter().map(|_| Default::default()).collect();
        for group in &self.groups {
            let mut owners = Vec::new();
            let mut caches = Vec::new();
            let mut counts = Vec::with_capacity(group.len());
            for &mid in group {
                let before = owners.len();
                for (ri, r) in self.running.iter_mut().enumerate() {
                    if r.done || r.failed.is_some() {
                        continue;
                    }
                    r.landed.resize(r.planned.len(), (usize::MAX, 0));
                    for (pi, p) in r.planned.iter().enumerate() {
                        match self.store.get_mut(p.seq) {
                            Some((m, cache)) if *m == mid => {
                                r.landed[pi] = (mid, owners.len() - before);
                                caches.push(std::mem::take(cache));
                                owners.push((ri, pi));
                            }
                            _ => {}
                        }
                    }
                }
                counts.push(owners.len() - before);
            }
            if owners.is_empty() {
                continue;
            }
            // Models without items this step stay out of the forward.
            let (mut models, mut nonzero) = (Vec::new(), Vec::new());
            for (&mid, &count) in group.iter().zip(&counts) {
                if count > 0 {
                    models.push(&self.models[mid]);
                    nonzero.push(count);
                }
            }
            let result = {
                let mut items: Vec<ForwardItem<F::Cache>> = caches
                    .iter_mut()
                    .zip(&owners)
                    .map(|(cache, &(ri, pi))| {
                        let p = &self.running[ri].planned[pi];
                        ForwardItem {
                            cache,
                            tokens: &p.tokens,
                            logits: p.logits,
                        }
                    })
                    .collect();
                guarded("the forward", || {
                    Ok(F::forward_shared(&models, &mut items, &nonzero)?)
                })
            };
            for (cache, &(ri, pi)) in caches.into_iter().zip(&owners) {
                let seq = self.running[ri].planned[pi].seq;
                if let Some((_, slot)) = self.store.get_mut(seq) {
                    *slot = cache;
                }
            }
            match result {
                Ok(outs) => {
                    let with_items = group.iter().zip(&counts).filter(|(_, &c)| c > 0);
                    for ((&mid, _), out) in with_items.zip(outs) {
                        outputs[mid] = out;
                    }
                }
                Err(e) => {
                    let names: Vec<&str> =
                        group.iter().map(|&m| self.infos[m].name.as_str()).collect();
                    let failure = EngineError::Forward {
                        model: names.join("+"),
                        message: format!("{e:#}"),
                    };
                    for &(ri, _) in &owners {
                        self.running[ri].failed = Some(failure.clone());
                    }
                }
            }
        }
        if decoding {
            self.pacer.record(forwards.elapsed(), prompt_tokens);
        }
        // 3. Every request reads its logits and advances.
        for r in self.running.iter_mut() {
            if r.done || r.failed.is_some() {
                continue;
            }
            let out = Outputs::new(&outputs, &r.landed);
            let mut cx = Cx::new(
                &mut self.store,
                &self.infos,
                &mut r.seqs,
                &mut r.planned,
                &r.events,
                self.options.prefill_chunk,
            );
            match guarded("the decoder", || r.decoder.absorb(&mut cx, &out)) {
                Ok(Flow::Continue) => {}
                Ok(Flow::Done) => r.done = true,
                Err(e) => r.failed = Some(EngineError::Decoder(format!("{e:#}"))),
            }
        }
    }

    /// Drop finished, failed and cancelled requests and free their sequences.
    fn retire(&mut self) {
        let store = &mut self.store;
        let load = &self.load;
        self.running.retain_mut(|r| {
            if let Some(failure) = r.failed.take() {
                tracing::error!("request failed: {failure}");
                let _ = r.events.send(Event::Failed(failure));
                r.done = true;
            }
            if !r.done {
                return true;
            }
            for &s in &r.seqs {
                store.remove(s);
            }
            load.running.fetch_sub(1, Ordering::Relaxed);
            false
        });
    }
}

/// Run `f`, turning a panic (a bug) into an error that fails the requests involved instead of
/// taking the engine thread, and every other request with it, down.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(anyhow::anyhow!("{what} panicked: {msg}"))
    })
}
