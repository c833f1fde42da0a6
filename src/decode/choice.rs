//! One output choice of a token-level decoder: sampler, stop strings, limits, events.

use anyhow::Result;

use super::Generation;
use crate::engine::{Cx, Event, FinishReason, SeqId, TokenEvent};
use crate::model::BASE;
use crate::sampling::{Sampled, Sampler, TextStream};

pub struct Choice {
    pub index: usize,
    pub seq: SeqId,
    pub sampler: Sampler,
    text: TextStream,
    /// Tokens generated so far.
    pub tokens: Vec<u32>,
    pub finished: Option<FinishReason>,
    /// Events kept back instead of sent, for a candidate that is only streamed if chosen.
    held: Option<Vec<Event>>,
}

impl Choice {
    pub fn new(index: usize, seq: SeqId, generation: &Generation) -> Self {
        Self {
            index,
            seq,
            sampler: Sampler::new(
                generation.sampling.clone(),
                index as u64,
                &generation.prompt,
            ),
            text: TextStream::new(generation.stop.clone()),
            tokens: Vec::new(),
            finished: None,
            held: None,
        }
    }

    /// A candidate for choice `index` that draws from RNG stream `stream` and holds its events
    /// until `take_held`.
    pub fn candidate(index: usize, stream: usize, seq: SeqId, generation: &Generation) -> Self {
        let mut c = Self::new(stream, seq, generation);
        c.index = index;
        c.held = Some(Vec::new());
        c
    }

    /// The events a candidate holds back so far.
    pub fn held(&self) -> &[Event] {
        self.held.as_deref().unwrap_or_default()
    }

    /// The events a candidate held back, in order.
    pub fn take_held(&mut self) -> Vec<Event> {
        self.held.take().unwrap_or_default()
    }

    fn send(&mut self, cx: &Cx, event: Event) {
        match &mut self.held {
            Some(held) => held.push(event),
            None => cx.emit(event),
        }
    }

    pub fn is_done(&self) -> bool {
        self.finished.is_some()
    }

    /// The token to feed next (the last generated one).
    pub fn last(&self) -> Option<u32> {
        self.tokens.last().copied()
    }

    /// Record a sampled token: emit its text, and finish on end-of-generation, a stop string,
    /// `max_tokens` or a full context.
    pub fn accept(&mut self, cx: &mut Cx, generation: &Generation, s: Sampled) -> Result<()> {
        self.tokens.push(s.token);
        let vocab = &cx.model(BASE).vocab;
        let logprob = s.logprob;
        if !generation.ignore_eos && vocab.end_of_generation.contains(&s.token) {
            self.send(
                cx,
                Event::Token(TokenEvent {
                    choice: self.index,
                    token: s.token,
                    text: String::new(),
                    logprob,
                    top: s.top,
                }),
            );
            return self.finish(cx, FinishReason::Stop);
        }
        let released = self.text.push(vocab.bytes(s.token));
        self.send(
            cx,
            Event::Token(TokenEvent {
                choice: self.index,
                token: s.token,
                text: released.text,
                logprob,
                top: s.top,
            }),
        );
        if released.stopped {
            return self.finish(cx, FinishReason::Stop);
        }
        if self.tokens.len() >= generation.max_tokens || cx.room(self.seq) == 0 {
            return self.finish(cx, FinishReason::Length);
        }
        Ok(())
    }

    pub fn finish(&mut self, cx: &mut Cx, reason: FinishReason) -> Result<()> {
        let text = self.text.finish();
        self.finished = Some(reason);
        self.send(
            cx,
            Event::Finished {
                choice: self.index,
                reason,
                text,
            },
        );
        cx.free(self.seq);
        Ok(())
    }
}
