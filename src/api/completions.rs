//! `POST /v1/completions`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::Response;
use serde_json::Value;

use super::error::ApiError;
use super::json::JsonBody;
use super::run::{Outcome, Run};
use super::stream::{respond, Chunks};
use super::wire::{CommonRequest, Completion, CompletionChoice, CompletionLogprobs, Usage};
use super::{id, now, token_string, validate, AppState};
use crate::engine::{FinishReason, PromptLogprobs, TokenEvent};
use crate::model::Vocab;

pub async fn create(State(state): State<AppState>, body: JsonBody) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let engine = state.engine()?;
    let common: CommonRequest = body.parse()?;
    let request = body.parse()?;
    let model = validate::model(engine, common.model.as_deref())?;
    let validate::CompletionJob { job, echo } =
        validate::completion(common, request, engine, model, &state.limits)?;
    let writer = Writer {
        id: id("cmpl"),
        created: now(),
        model: job.model.clone(),
        vocab: model.vocab.clone(),
        n: job.n,
        logprobs: job.logprobs(),
        offsets: Vec::new(),
        echo,
    };
    let stream = job.stream;
    let run = Run::start(engine, job, arrived, state.request_timeout)?;
    respond(run, writer, stream).await
}

/// Writes one request's completion objects.
struct Writer {
    id: String,
    created: u64,
    model: String,
    vocab: Arc<Vocab>,
    n: usize,
    logprobs: bool,
    /// Per choice: characters written so far, for `text_offset`.
    offsets: Vec<usize>,
    echo: Option<Vec<String>>,
}

impl Writer {
    fn object(&self, choices: Vec<CompletionChoice>) -> Completion {
        Completion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage: None,
            alignment: None,
        }
    }

    /// The echoed prompt of `choice` (prompt `choice / n`), or nothing.
    fn echo(&self, choice: usize) -> &str {
        self.echo.as_ref().map_or("", |e| &e[choice / self.n])
    }

    /// Logprobs of `tokens`, the first one at character `offset` of the choice's text.
    fn logprobs(&self, tokens: &[TokenEvent], offset: usize) -> Option<CompletionLogprobs> {
        if !self.logprobs {
            return None;
        }
        let mut out = CompletionLogprobs::default();
        self.extend(&mut out, entries(tokens), offset);
        Some(out)
    }

    /// A prompt's own logprobs (OpenAI's `echo`): its first token has none, as it follows nothing.
    fn prompt_logprobs(&self, prompt: &PromptLogprobs) -> CompletionLogprobs {
        let mut out = CompletionLogprobs::default();
        let first = prompt.tokens.first().map(|&t| (t, None, None));
        let rest = (prompt.tokens.iter().skip(1))
            .zip(&prompt.entries)
            .map(|(&t, (lp, top))| (t, Some(*lp), Some(top.as_slice())));
        self.extend(&mut out, first.into_iter().chain(rest), 0);
        out
    }

    /// The chunk that streams choice `index`'s echoed prompt.
    fn echo_chunk(&self, index: usize, logprobs: Option<CompletionLogprobs>) -> Completion {
        self.object(vec![CompletionChoice {
            index,
            text: self.echo(index).to_string(),
            logprobs,
            finish_reason: None,
        }])
    }

    /// Append (token, logprob, alternatives) entries, the first at character `offset`.
    fn extend<'a>(
        &self,
        out: &mut CompletionLogprobs,
        entries: impl Iterator<Item = Entry<'a>>,
        mut offset: usize,
    ) {
        for (token, logprob, top) in entries {
            let text = token_string(&self.vocab, token);
            out.text_offset.push(offset);
            offset += text.chars().count();
            out.tokens.push(text);
            out.token_logprobs.push(logprob);
            out.top_logprobs.push(top.map(|top| {
                top.iter()
                    .map(|&(id, lp)| (token_string(&self.vocab, id), lp))
                    .collect()
            }));
        }
    }

    /// The logprobs of choice `index`: its prompt's, when echoed with them, then its tokens'.
    fn choice_logprobs(
        &self,
        index: usize,
        prompts: &[Option<PromptLogprobs>],
        tokens: &[TokenEvent],
    ) -> Option<CompletionLogprobs> {
        if !self.logprobs {
            return None;
        }
        let mut out = match prompts.get(index / self.n) {
            Some(Some(prompt)) => self.prompt_logprobs(prompt),
            _ => CompletionLogprobs::default(),
        };
        self.extend(&mut out, entries(tokens), self.echo(index).chars().count());
        Some(out)
    }
}

/// One token's logprobs: the token, its log-probability and its alternatives (both none for a
/// prompt's first token).
type Entry<'a> = (u32, Option<f32>, Option<&'a [(u32, f32)]>);

/// Generated tokens as logprob entries.
fn entries(tokens: &[TokenEvent]) -> impl Iterator<Item = Entry<'_>> {
    tokens
        .iter()
        .map(|t| (t.token, t.logprob, Some(t.top.as_slice())))
}

impl Chunks for Writer {
    type Complete = Completion;
    type Chunk = Completion;

    fn complete(self, outcome: Outcome) -> Completion {
        let choices = outcome
            .choices
            .into_iter()
            .enumerate()
            .map(|(index, c)| {
                let echo = self.echo(index);
                CompletionChoice {
                    index,
                    logprobs: self.choice_logprobs(index, &outcome.prompts, &c.tokens),
                    text: format!("{echo}{}", c.text),
                    finish_reason: Some(c.finish_reason.as_str()),
                }
            })
            .collect();
        Completion {
            usage: Some(outcome.usage.into()),
            alignment: Some(outcome.alignment),
            ..self.object(choices)
        }
    }

    fn start(&mut self, choices: usize) -> Vec<Completion> {
        self.offsets = (0..choices).map(|c| self.echo(c).chars().count()).collect();
        // Echoed with logprobs, a prompt is sent once its logprobs are in (`prompt`).
        if self.echo.is_none() || self.logprobs {
            return Vec::new();
        }
        (0..choices)
            .map(|index| self.echo_chunk(index, None))
            .collect()
    }

    fn prompt(&mut self, prompt: &PromptLogprobs) -> Vec<Completion> {
        if self.echo.is_none() {
            return Vec::new();
        }
        let logprobs = self.prompt_logprobs(prompt);
        let first = prompt.prompt * self.n;
        (first..first + self.n)
            .map(|index| self.echo_chunk(index, Some(logprobs.clone())))
            .collect()
    }

    fn token(&mut self, token: &TokenEvent) -> Option<Completion> {
        if token.text.is_empty() && !self.logprobs {
            return None;
        }
        let logprobs = self.logprobs(std::slice::from_ref(token), self.offsets[token.choice]);
        if let Some(lp) = &logprobs {
            self.offsets[token.choice] += lp.tokens[0].chars().count();
        }
        Some(self.object(vec![CompletionChoice {
            index: token.choice,
            text: token.text.clone(),
            logprobs,
            finish_reason: None,
        }]))
    }

    fn finish(
        &mut self,
        choice: usize,
        reason: FinishReason,
        text: String,
        alignment: Option<Value>,
    ) -> Completion {
        Completion {
            alignment,
            ..self.object(vec![CompletionChoice {
                index: choice,
                text,
                logprobs: None,
                finish_reason: Some(reason.as_str()),
            }])
        }
    }

    fn usage(&mut self, usage: crate::engine::Usage) -> Completion {
        Completion {
            usage: Some(Usage::from(usage)),
            ..self.object(Vec::new())
        }
    }
}
