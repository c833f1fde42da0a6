//! The engine's scheduling on the fake model: batching across requests, the queue, cancellation,
//! failures, and what `Cx` lets a decoder do to its caches.

use std::sync::atomic::Ordering;
use std::sync::mpsc;

use anyhow::{bail, Context, Result};

use super::fake::{self, FakeModel};
use super::*;
use crate::model::{Logits, Role, BASE};

fn argmax(row: &[f32]) -> u32 {
    (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b }) as u32
}

/// Greedy decoding written against the seam alone: prefill `prompt`, then `len` tokens. With a
/// gate, each `plan` first waits for a permit (or for the gate's sender to go).
struct Greedy {
    prompt: Vec<u32>,
    len: usize,
    seq: Option<SeqId>,
    tokens: Vec<u32>,
    ticket: Option<usize>,
    gate: Option<mpsc::Receiver<()>>,
}

impl Greedy {
    fn new(prompt: &[u32], len: usize) -> Self {
        Self {
            prompt: prompt.to_vec(),
            len,
            seq: None,
            tokens: Vec::new(),
            ticket: None,
            gate: None,
        }
    }

    /// The same, waiting for a permit before each step.
    fn gated(prompt: &[u32], len: usize) -> (Self, mpsc::Sender<()>) {
        let (tx, rx) = mpsc::channel();
        let mut d = Self::new(prompt, len);
        d.gate = Some(rx);
        (d, tx)
    }
}

impl Decoder for Greedy {
    fn plan(&mut self, cx: &mut Cx) -> Result<()> {
        if let Some(gate) = &self.gate {
            let _ = gate.recv();
        }
        let (seq, tokens) = match (self.seq, self.tokens.last()) {
            (None, _) => {
                let seq = cx.new_seq(BASE);
                self.seq = Some(seq);
                (seq, self.prompt.clone())
            }
            (Some(seq), Some(&t)) => (seq, vec![t]),
            (Some(_), None) => bail!("no token to feed"),
        };
        self.ticket = Some(cx.forward(seq, tokens, Logits::Last)?);
        Ok(())
    }

    fn absorb(&mut self, cx: &mut Cx, out: &Outputs) -> Result<Flow> {
        let token = argmax(out.last(self.ticket.take().context("no ticket")?)?);
        self.tokens.push(token);
        cx.emit(Event::Token(TokenEvent {
            choice: 0,
            token,
            text: String::new(),
            logprob: None,
            top: Vec::new(),
        }));
        if self.tokens.len() < self.len {
            return Ok(Flow::Continue);
        }
        cx.emit(Event::Finished {
            choice: 0,
            reason: FinishReason::Length,
            text: String::new(),
        });
        cx.emit(Event::Done {
            usage: Usage {
                prompt_tokens: self.prompt.len(),
                completion_tokens: self.len,
            },
            report: None,
        });
        Ok(Flow::Done)
    }
}

/// Wait for a request's first token.
fn first_token(events: &mut tokio::sync::mpsc::UnboundedReceiver<Event>) {
    while !matches!(events.blocking_recv(), Some(Event::Token(_)) | None) {}
}

fn counting() -> (Engine, fake::Batches) {
    let model = FakeModel::counting().with_context(2048);
    let batches = model.batches.clone();
    (
        Engine::start(vec![model], EngineOptions::default()),
        batches,
    )
}

#[test]
fn a_decoder_on_the_seam_alone_decodes_greedily() {
    let (e, batches) = counting();
    let out = fake::run(&e, Box::new(Greedy::new(&[2, 3], 4)));
    // After `cat` (3) the fake puts most weight on the next word, and so on.
    assert_eq!(out.tokens, [[4, 5, 6, 7]]);
    assert_eq!(out.finish, [Some(FinishReason::Length)]);
    // The prompt in one forward, then a token a step; the last token is never fed.
    assert_eq!(batches.get(), [vec![2], vec![1], vec![1], vec![1]]);
}

#[test]
fn requests_running_together_share_every_forward() {
    let (e, batches) = counting();
    let (a, permits) = Greedy::gated(&[2], 6);
    let mut a_events = e.submit(Box::new(a)).unwrap();
    let _ = permits.send(());
    first_token(&mut a_events);
    // While A waits for its second permit, B arrives and joins it.
    let mut b_events = e.submit(Box::new(Greedy::new(&[9], 3))).unwrap();
    drop(permits);
    while !matches!(b_events.blocking_recv(), Some(Event::Done { .. }) | None) {}
    while !matches!(a_events.blocking_recv(), Some(Event::Done { .. }) | None) {}
    let shared = batches.get().iter().filter(|b| b.len() == 2).count();
    assert!(shared >= 2, "{:?}", batches.get());
    // Batched, each gives what it gives alone.
    assert_eq!(
        fake::run(&e, Box::new(Greedy::new(&[9], 3))).tokens,
        [[10, 11, 12]]
    );
}

#[test]
fn past_max_running_requests_wait_their_turn() {
    let model = FakeModel::counting();
    let batches = model.batches.clone();
    let options = EngineOptions {
        max_running: 1,
        ..EngineOptions::default()
    };
    let e = Engine::start(vec![model], options);
    let (a, permits) = Greedy::gated(&[2], 3);
    let mut a_events = e.submit(Box::new(a)).unwrap();
    let _ = permits.send(());
    first_token(&mut a_events);
    let mut b_events = e.submit(Box::new(Greedy::new(&[9], 2))).unwrap();
    assert_eq!(e.load.waiting.load(Ordering::Relaxed), 1);
    assert_eq!(e.load.running.load(Ordering::Relaxed), 1);
    drop(permits);
    while !matches!(a_events.blocking_recv(), Some(Event::Done { .. }) | None) {}
    while !matches!(b_events.blocking_recv(), Some(Event::Done { .. }) | None) {}
    assert!(batches.get().iter().all(|b| b.len() == 1));
    assert_eq!(batches.tokens(), 1 + 2 + 1 + 1);
}

#[test]
fn past_max_queue_requests_are_refused_not_queued() {
    let options = EngineOptions {
        max_running: 1,
        max_queue: Some(1),
        ..EngineOptions::default()
    };
    let e = Engine::start(vec![FakeModel::counting()], options);
    let (a, permits) = Greedy::gated(&[2], 3);
    let mut a_events = e.submit(Box::new(a)).unwrap();
    let _ = permits.send(());
    first_token(&mut a_events);
    // One runs, one may wait; the third is refused and nothing of it queues.
    let mut b_events = e.submit(Box::new(Greedy::new(&[9], 2))).unwrap();
    let refused = e.submit(Box::new(Greedy::new(&[5], 2))).unwrap_err();
    assert_eq!(refused, EngineError::Busy { max_queue: 1 });
    assert_eq!(e.load.waiting.load(Ordering::Relaxed), 1);
    drop(permits);
    while !matches!(a_events.blocking_recv(), Some(Event::Done { .. }) | None) {}
    while !matches!(b_events.blocking_recv(), Some(Event::Done { .. }) | None) {}
    // With the queue empty again, a request is taken.
    let mut c_events = e.submit(Box::new(Greedy::new(&[5], 2))).unwrap();
    while !matches!(c_events.blocking_recv(), Some(Event::Done { .. }) | None) {}
    assert_eq!(e.load.waiting.load(Ordering::Relaxed), 0);
}

#[test]
fn a_client_that_goes_away_stops_costing_compute() {
    let (e, batches) = counting();
    let (a, permits) = Greedy::gated(&[2], 1000);
    let mut events = e.submit(Box::new(a)).unwrap();
    for _ in 0..3 {
        permits.send(()).unwrap();
    }
    let mut tokens = 0;
    while tokens < 3 {
        if let Some(Event::Token(_)) = events.blocking_recv() {
            tokens += 1;
        }
    }
    drop(events);
    drop(permits);
    // The next request runs once the cancelled one has been retired.
    let out = fake::run(&e, Box::new(Greedy::new(&[9], 2)));
    assert_eq!(out.tokens, [[10, 11]]);
    // A fed its prompt and at most a step past what it streamed.
    assert!(batches.tokens() <= 1 + 4 + 2, "{:?}", batches.get());
    // B's `Done` is sent before the engine retires it.
    for _ in 0..1000 {
        if e.load.running.load(Ordering::Relaxed) == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(e.load.running.load(Ordering::Relaxed), 0);
    assert_eq!(e.load.waiting.load(Ordering::Relaxed), 0);
}

/// A decoder that fails the way it is told.
enum Faulty {
    /// Plans a forward of a token outside the vocabulary.
    BadToken,
    Errs,
    Panics,
}

impl Decoder for Faulty {
    fn plan(&mut self, cx: &mut Cx) -> Result<()> {
        let seq = cx.new_seq(BASE);
        match self {
            Self::BadToken => cx.forward(seq, vec![9999], Logits::Last).map(drop),
            Self::Errs => bail!("a decoder's own error"),
            Self::Panics => panic!("a decoder's bug"),
        }
    }

    fn absorb(&mut self, _: &mut Cx, _: &Outputs) -> Result<Flow> {
        Ok(Flow::Done)
    }
}

#[test]
fn failures_end_their_request_with_a_typed_error_and_the_engine_lives_on() {
    let (e, _) = counting();
    let failure = |d| {
        fake::run(&e, Box::new(d))
            .failure
            .expect("the request fails")
    };
    assert!(matches!(
        failure(Faulty::BadToken),
        EngineError::Forward { ref model, .. } if model == "fake"
    ));
    assert_eq!(
        failure(Faulty::Errs),
        EngineError::Decoder("a decoder's own error".into())
    );
    let panicked = failure(Faulty::Panics).to_string();
    assert!(panicked.contains("a decoder's bug"), "{panicked}");
    assert_eq!(
        fake::run(&e, Box::new(Greedy::new(&[2], 2))).tokens,
        [[3, 4]]
    );
}

/// Checks `Cx` from inside a decoder: a sequence of [2, 3, 4], a fork of it truncated to [2],
/// both fed 9; the fake's rows must show each cache's own history.
struct Forks {
    seqs: Vec<SeqId>,
    tickets: Vec<usize>,
    seen: mpsc::Sender<Vec<u32>>,
}

impl Decoder for Forks {
    fn plan(&mut self, cx: &mut Cx) -> Result<()> {
        if self.seqs.is_empty() {
            let seq = cx.new_seq(BASE);
            cx.forward(seq, vec![2, 3, 4], Logits::None)?;
            self.seqs.push(seq);
            return Ok(());
        }
        let seq = self.seqs[0];
        let fork = cx.fork(seq)?;
        cx.truncate(fork, 1);
        assert_eq!((cx.len(seq), cx.len(fork)), (3, 1));
        assert_eq!(cx.room(fork), cx.model(BASE).context_length() - 1);
        self.tickets = vec![
            cx.forward(seq, vec![9], Logits::Last)?,
            cx.forward(fork, vec![9], Logits::All)?,
        ];
        assert!(
            cx.forward(seq, vec![9], Logits::Last).is_err(),
            "once a step"
        );
        assert!(cx.forward(fork, vec![], Logits::Last).is_err(), "no tokens");
        let past = vec![2; cx.room(fork) + 1];
        assert!(
            cx.forward(fork, past, Logits::Last).is_err(),
            "past the context"
        );
        assert!(
            cx.forward(seq + 100, vec![9], Logits::Last).is_err(),
            "not owned"
        );
        self.seqs.push(fork);
        Ok(())
    }

    fn absorb(&mut self, cx: &mut Cx, out: &Outputs) -> Result<Flow> {
        if self.tickets.is_empty() {
            return Ok(Flow::Continue);
        }
        for &t in &self.tickets {
            let _ = self.seen.send(vec![argmax(out.last(t)?)]);
        }
        assert_eq!(out.rows(self.tickets[1])?.len(), 1);
        cx.free(self.seqs[1]);
        assert_eq!(cx.len(self.seqs[1]), 0);
        cx.emit(Event::Done {
            usage: Usage::default(),
            report: None,
        });
        Ok(Flow::Done)
    }
}

#[test]
fn forks_and_truncations_reach_each_cache() {
    // The fake predicts (the sum of the history) mod the vocabulary.
    let words = fake::WORDS.len();
    let model = FakeModel::new("sums", Role::Base, move |h: &[u32]| {
        let s = h.iter().sum::<u32>() as usize % words;
        (0..words).map(|v| if v == s { 1.0 } else { 0.0 }).collect()
    });
    let e = Engine::start(vec![model], EngineOptions::default());
    let (tx, rx) = mpsc::channel();
    let out = fake::run(
        &e,
        Box::new(Forks {
            seqs: Vec::new(),
            tickets: Vec::new(),
            seen: tx,
        }),
    );
    assert!(out.failure.is_none(), "{:?}", out.failure);
    let seen: Vec<Vec<u32>> = rx.try_iter().collect();
    let sum = |h: &[u32]| h.iter().sum::<u32>() % words as u32;
    assert_eq!(seen, [vec![sum(&[2, 3, 4, 9])], vec![sum(&[2, 9])]]);
}
