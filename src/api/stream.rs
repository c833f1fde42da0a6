//! Server-sent events as OpenAI clients expect them: one `data: {chunk}` per event, `data: [DONE]`
//! at the end. The stream owns the `Run`, so a client that disconnects drops it and cancels the
//! request at the engine's next step.

use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, Stream, StreamExt};
use serde::Serialize;
use serde_json::Value;

use super::error::ApiError;
use super::run::{Outcome, Run};
use super::validate::Streaming;
use crate::engine::{Event, FinishReason, PromptLogprobs, TokenEvent, Usage};

/// How one endpoint writes a run: as chunks while streaming, or as one object at the end.
pub trait Chunks: Send + 'static {
    type Chunk: Serialize;
    type Complete: Serialize;
    /// The whole response object of a run that was not streamed.
    fn complete(self, outcome: Outcome) -> Self::Complete;
    /// What precedes the first token (the chat role, echoed prompts).
    fn start(&mut self, choices: usize) -> Vec<Self::Chunk>;
    /// A prompt's own log-probs (asked for with `echo`), before its choices' tokens.
    fn prompt(&mut self, _logprobs: &PromptLogprobs) -> Vec<Self::Chunk> {
        Vec::new()
    }
    /// A token; `None` when there is nothing to send (its text is held back, no logprobs asked).
    fn token(&mut self, token: &TokenEvent) -> Option<Self::Chunk>;
    /// The end of a choice, with its held-back text; the last one carries the `alignment` report.
    fn finish(
        &mut self,
        choice: usize,
        reason: FinishReason,
        text: String,
        alignment: Option<Value>,
    ) -> Self::Chunk;
    /// The closing chunk with usage and no choices (`stream_options.include_usage`).
    fn usage(&mut self, usage: Usage) -> Self::Chunk;
}

struct State<C> {
    run: Run,
    chunks: C,
    streaming: Streaming,
    started: bool,
    finished: usize,
    /// The last choice to finish waits for the run's report, which arrives right after it.
    last: Option<(usize, FinishReason, String)>,
}

/// The response of a run: a stream of chunks when asked for, else the finished object.
pub async fn respond<C: Chunks>(
    run: Run,
    chunks: C,
    stream: Option<Streaming>,
) -> Result<Response, ApiError> {
    Ok(match stream {
        Some(streaming) => sse(run, chunks, streaming).into_response(),
        None => Json(chunks.complete(run.collect().await?)).into_response(),
    })
}

fn sse<C: Chunks>(
    run: Run,
    chunks: C,
    streaming: Streaming,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let state = State {
        run,
        chunks,
        streaming,
        started: false,
        finished: 0,
        last: None,
    };
    let events = stream::unfold(Some(state), |state| async move {
        let mut state = state?;
        let (batch, over) = state.advance().await;
        Some((stream::iter(batch), (!over).then_some(state)))
    })
    .flatten()
    .map(Ok);
    // A comment every 15 s keeps idle streams (a long prefill, held candidates) open through
    // proxies.
    Sse::new(events).keep_alive(KeepAlive::default())
}

impl<C: Chunks> State<C> {
    /// The next events to send, and whether the stream is over after them.
    async fn advance(&mut self) -> (Vec<SseEvent>, bool) {
        if !self.started {
            self.started = true;
            let first = self.chunks.start(self.run.choices());
            if !first.is_empty() {
                return (first.iter().map(data).collect(), false);
            }
        }
        loop {
            let Some(event) = self.run.next().await else {
                return (Vec::new(), true);
            };
            match event {
                Event::Prompt(logprobs) => {
                    let chunks = self.chunks.prompt(&logprobs);
                    if !chunks.is_empty() {
                        return (chunks.iter().map(data).collect(), false);
                    }
                }
                Event::Token(token) => {
                    if let Some(chunk) = self.chunks.token(&token) {
                        return (vec![data(&chunk)], false);
                    }
                }
                Event::Finished {
                    choice,
                    reason,
                    text,
                } => {
                    self.finished += 1;
                    if self.finished == self.run.choices() {
                        self.last = Some((choice, reason, text));
                    } else {
                        let chunk = self.chunks.finish(choice, reason, text, None);
                        return (vec![data(&chunk)], false);
                    }
                }
                Event::Done { usage, report } => {
                    let mut out = Vec::new();
                    if let Some((choice, reason, text)) = self.last.take() {
                        out.push(data(&self.chunks.finish(choice, reason, text, report)));
                    }
                    if self.streaming.include_usage {
                        out.push(data(&self.chunks.usage(usage)));
                    }
                    out.push(SseEvent::default().data("[DONE]"));
                    return (out, true);
                }
                Event::Failed(message) => {
                    let error = ApiError::from(message).to_json();
                    return (
                        vec![
                            SseEvent::default().data(error),
                            SseEvent::default().data("[DONE]"),
                        ],
                        true,
                    );
                }
                Event::Started { .. } => {}
            }
        }
    }
}

fn data(chunk: &impl Serialize) -> SseEvent {
    SseEvent::default().data(serde_json::to_string(chunk).expect("chunks always serialize"))
}
