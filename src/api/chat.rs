//! `POST /v1/chat/completions`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::Response;
use serde_json::Value;

use super::error::ApiError;
use super::json::JsonBody;
use super::run::{Outcome, Run};
use super::stream::{respond, Chunks};
use super::wire::{
    AssistantMessage, ChatChoice, ChatChunk, ChatCompletion, ChatLogprobs, ChunkChoice,
    CommonRequest, Delta, TokenLogprob, TopLogprob,
};
use super::{id, now, token_bytes, token_string, validate, AppState};
use crate::engine::{FinishReason, TokenEvent, Usage};
use crate::model::Vocab;

pub async fn create(State(state): State<AppState>, body: JsonBody) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let engine = state.engine()?;
    let common: CommonRequest = body.parse()?;
    let request = body.parse()?;
    let model = validate::model(engine, common.model.as_deref())?;
    let job = validate::chat(common, request, engine, model, &state.limits)?;
    let writer = Writer {
        id: id("chatcmpl"),
        created: now(),
        model: job.model.clone(),
        vocab: model.vocab.clone(),
        logprobs: job.logprobs(),
    };
    let stream = job.stream;
    let run = Run::start(engine, job, arrived, state.request_timeout)?;
    respond(run, writer, stream).await
}

/// Writes one request's chat completion objects.
struct Writer {
    id: String,
    created: u64,
    model: String,
    vocab: Arc<Vocab>,
    logprobs: bool,
}

impl Writer {
    fn logprobs(&self, tokens: &[TokenEvent]) -> Option<ChatLogprobs> {
        self.logprobs.then(|| ChatLogprobs {
            content: tokens
                .iter()
                .map(|t| TokenLogprob {
                    token: token_string(&self.vocab, t.token),
                    logprob: t.logprob.unwrap_or_default(),
                    bytes: token_bytes(&self.vocab, t.token),
                    top_logprobs: t
                        .top
                        .iter()
                        .map(|&(id, logprob)| TopLogprob {
                            token: token_string(&self.vocab, id),
                            logprob,
                            bytes: token_bytes(&self.vocab, id),
                        })
                        .collect(),
                })
                .collect(),
        })
    }

    fn chunk(&self, choices: Vec<ChunkChoice>) -> ChatChunk {
        ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage: None,
            alignment: None,
        }
    }
}

impl Chunks for Writer {
    type Complete = ChatCompletion;
    type Chunk = ChatChunk;

    fn complete(self, outcome: Outcome) -> ChatCompletion {
        let choices = outcome
            .choices
            .into_iter()
            .enumerate()
            .map(|(index, c)| ChatChoice {
                index,
                logprobs: self.logprobs(&c.tokens),
                message: AssistantMessage {
                    role: "assistant",
                    content: c.text,
                },
                finish_reason: c.finish_reason.as_str(),
            })
            .collect();
        ChatCompletion {
            id: self.id,
            object: "chat.completion",
            created: self.created,
            model: self.model,
            choices,
            usage: outcome.usage.into(),
            alignment: outcome.alignment,
        }
    }

    /// The assistant role opens every choice.
    fn start(&mut self, choices: usize) -> Vec<ChatChunk> {
        (0..choices)
            .map(|index| {
                self.chunk(vec![ChunkChoice {
                    index,
                    delta: Delta {
                        role: Some("assistant"),
                        content: Some(String::new()),
                    },
                    logprobs: None,
                    finish_reason: None,
                }])
            })
            .collect()
    }

    fn token(&mut self, token: &TokenEvent) -> Option<ChatChunk> {
        if token.text.is_empty() && !self.logprobs {
            return None;
        }
        Some(self.chunk(vec![ChunkChoice {
            index: token.choice,
            delta: Delta {
                role: None,
                content: Some(token.text.clone()),
            },
            logprobs: self.logprobs(std::slice::from_ref(token)),
            finish_reason: None,
        }]))
    }

    fn finish(
        &mut self,
        choice: usize,
        reason: FinishReason,
        text: String,
        alignment: Option<Value>,
    ) -> ChatChunk {
        ChatChunk {
            alignment,
            ..self.chunk(vec![ChunkChoice {
                index: choice,
                delta: Delta {
                    role: None,
                    content: (!text.is_empty()).then_some(text),
                },
                logprobs: None,
                finish_reason: Some(reason.as_str()),
            }])
        }
    }

    fn usage(&mut self, usage: Usage) -> ChatChunk {
        ChatChunk {
            usage: Some(usage.into()),
            ..self.chunk(Vec::new())
        }
    }
}
