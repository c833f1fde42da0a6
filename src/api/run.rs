//! A job on the engine: one submission per prompt, their events merged into one sequence with
//! choice indices numbered across prompts, and the request's metrics recorded on the way.
//! A `Run` owns the engine's receivers: dropping it (the client went away) cancels the work.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use metrics::{counter, histogram, Counter, Histogram};
use serde_json::{json, Value};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{StreamExt, StreamMap};

use super::error::ApiError;
use super::metrics::{
    E2E_REQUEST_LATENCY, GENERATION_TOKENS, INTER_TOKEN_LATENCY, PROMPT_TOKENS, REQUEST_QUEUE_TIME,
    REQUEST_REJECTED, REQUEST_SUCCESS, TIME_TO_FIRST_TOKEN,
};
use super::validate::Job;
use crate::decode::DecoderSpec;
use crate::engine::{Engine, EngineError, Event, FinishReason, PromptLogprobs, TokenEvent, Usage};

pub struct Run {
    events: StreamMap<usize, UnboundedReceiverStream<Event>>,
    /// Choices per prompt.
    n: usize,
    prompt_lens: Vec<usize>,
    decoder: DecoderSpec,
    model: String,
    arrived: Instant,
    /// When each choice last produced a token.
    last_token: Vec<Option<Instant>>,
    first_token_seen: bool,
    usage: Usage,
    reports: Vec<Option<Value>>,
    over: bool,
    metrics: Metrics,
    /// When the request must end, with what it has by then.
    deadline: Option<Instant>,
    /// Per choice, whether it has finished; per prompt, tokens streamed and whether it is done.
    finished: Vec<bool>,
    streamed: Vec<usize>,
    done: Vec<bool>,
    /// The endings a passed deadline writes, sent before anything else.
    expired: VecDeque<Event>,
}

struct Metrics {
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    queue: Histogram,
    prompt_tokens: Counter,
    generation_tokens: Counter,
}

impl Metrics {
    fn new(model: &str) -> Self {
        let label = || ("model_name", model.to_string());
        Self {
            ttft: histogram!(TIME_TO_FIRST_TOKEN, &[label()]),
            itl: histogram!(INTER_TOKEN_LATENCY, &[label()]),
            e2e: histogram!(E2E_REQUEST_LATENCY, &[label()]),
            queue: histogram!(REQUEST_QUEUE_TIME, &[label()]),
            prompt_tokens: counter!(PROMPT_TOKENS, &[label()]),
            generation_tokens: counter!(GENERATION_TOKENS, &[label()]),
        }
    }
}

/// One choice of a finished run.
pub struct ChoiceOutcome {
    pub text: String,
    pub tokens: Vec<TokenEvent>,
    pub finish_reason: FinishReason,
}

/// A finished run.
pub struct Outcome {
    pub choices: Vec<ChoiceOutcome>,
    /// Per prompt, its own log-probs when asked for.
    pub prompts: Vec<Option<PromptLogprobs>>,
    pub usage: Usage,
    pub alignment: Value,
}

impl Run {
    /// Submit every prompt of `job`; `arrived` is when the HTTP request came in, and the run
    /// ends at `arrived` + the shorter of the request's `timeout` and the server's `limit`.
    pub fn start(
        engine: &Engine,
        job: Job,
        arrived: Instant,
        limit: Option<Duration>,
    ) -> Result<Self, ApiError> {
        let timeout = match (job.timeout, limit) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut events = StreamMap::new();
        let prompt_lens = job.generations.iter().map(|g| g.prompt.len()).collect();
        let prompts = job.generations.len();
        // Every prompt's decoder first: one that refuses its prompt refuses the request.
        let decoders = job
            .generations
            .into_iter()
            .map(|g| job.decoder.build(g, engine.models()))
            .collect::<Result<Vec<_>, _>>()?;
        for (p, decoder) in decoders.into_iter().enumerate() {
            // Refused, the prompts already queued are dropped with `events`: nothing runs.
            let submitted = engine.submit(decoder).inspect_err(|e| {
                if matches!(e, EngineError::Busy { .. }) {
                    counter!(REQUEST_REJECTED, "model_name" => job.model.clone()).increment(1);
                }
            })?;
            events.insert(p, UnboundedReceiverStream::new(submitted));
        }
        Ok(Self {
            events,
            n: job.n,
            prompt_lens,
            decoder: job.decoder,
            metrics: Metrics::new(&job.model),
            model: job.model,
            arrived,
            last_token: vec![None; prompts * job.n],
            first_token_seen: false,
            usage: Usage::default(),
            reports: vec![None; prompts],
            over: false,
            deadline: timeout.map(|t| arrived + t),
            finished: vec![false; prompts * job.n],
            streamed: vec![0; prompts],
            done: vec![false; prompts],
            expired: VecDeque::new(),
        })
    }

    /// The deadline has passed: stop every prompt still running (dropping its events cancels
    /// it in the engine) and end each unfinished choice as a length limit would, then the run
    /// with what it produced; the report says `deadline_exceeded`.
    fn expire(&mut self) {
        self.events.clear();
        for (choice, finished) in self.finished.iter_mut().enumerate() {
            if !std::mem::replace(finished, true) {
                self.expired.push_back(Event::Finished {
                    choice,
                    reason: FinishReason::Length,
                    text: String::new(),
                });
            }
        }
        for p in (0..self.done.len()).filter(|&p| !self.done[p]) {
            self.usage.prompt_tokens += self.prompt_lens[p];
            self.usage.completion_tokens += self.streamed[p];
        }
        let mut report = alignment(self.decoder.name(), std::mem::take(&mut self.reports));
        report["deadline_exceeded"] = true.into();
        self.expired.push_back(Event::Done {
            usage: self.usage,
            report: Some(report),
        });
    }

    /// Choices over all prompts.
    pub fn choices(&self) -> usize {
        self.last_token.len()
    }

    /// The next token, finished choice, failure, or the final `Done` (with usage summed over the
    /// prompts and the decoder's reports merged into the `alignment` object); `None` after that.
    pub async fn next(&mut self) -> Option<Event> {
        if let Some(event) = self.expired.pop_front() {
            return Some(event);
        }
        while !self.over {
            let next = match self.deadline {
                Some(deadline) => tokio::time::timeout_at(deadline.into(), self.events.next())
                    .await
                    .ok(),
                None => Some(self.events.next().await),
            };
            let Some(next) = next else {
                self.over = true;
                self.expire();
                return self.expired.pop_front();
            };
            let Some((p, event)) = next else {
                self.over = true;
                return Some(Event::Failed(EngineError::Stopped));
            };
            match event {
                Event::Started { queue_time } => {
                    self.metrics.queue.record(queue_time.as_secs_f64());
                    self.metrics
                        .prompt_tokens
                        .increment(self.prompt_lens[p] as u64);
                }
                Event::Prompt(mut logprobs) => {
                    logprobs.prompt = p;
                    return Some(Event::Prompt(logprobs));
                }
                Event::Token(mut token) => {
                    token.choice += p * self.n;
                    self.streamed[p] += 1;
                    self.observe_token(token.choice);
                    return Some(Event::Token(token));
                }
                Event::Finished {
                    choice,
                    reason,
                    text,
                } => {
                    self.finished[choice + p * self.n] = true;
                    counter!(REQUEST_SUCCESS, "model_name" => self.model.clone(), "finish_reason" => reason.as_str())
                        .increment(1);
                    return Some(Event::Finished {
                        choice: choice + p * self.n,
                        reason,
                        text,
                    });
                }
                Event::Done { usage, report } => {
                    self.usage.prompt_tokens += usage.prompt_tokens;
                    self.usage.completion_tokens += usage.completion_tokens;
                    self.reports[p] = report;
                    self.done[p] = true;
                    if self.done.iter().all(|&d| d) {
                        self.over = true;
                        self.metrics
                            .e2e
                            .record(self.arrived.elapsed().as_secs_f64());
                        return Some(Event::Done {
                            usage: self.usage,
                            report: Some(alignment(
                                self.decoder.name(),
                                std::mem::take(&mut self.reports),
                            )),
                        });
                    }
                }
                Event::Failed(message) => {
                    self.over = true;
                    return Some(Event::Failed(message));
                }
            }
        }
        None
    }

    fn observe_token(&mut self, choice: usize) {
        let now = Instant::now();
        if !self.first_token_seen {
            self.first_token_seen = true;
            self.metrics.ttft.record((now - self.arrived).as_secs_f64());
        }
        if let Some(last) = self.last_token[choice].replace(now) {
            self.metrics.itl.record((now - last).as_secs_f64());
        }
        self.metrics.generation_tokens.increment(1);
    }

    /// Run to the end and gather every choice.
    pub async fn collect(mut self) -> Result<Outcome, ApiError> {
        let mut texts = vec![String::new(); self.choices()];
        let mut tokens = vec![Vec::new(); self.choices()];
        let mut reasons = vec![None; self.choices()];
        let mut prompts = vec![None; self.prompt_lens.len()];
        while let Some(event) = self.next().await {
            match event {
                Event::Prompt(logprobs) => {
                    let p = logprobs.prompt;
                    prompts[p] = Some(logprobs);
                }
                Event::Token(t) => {
                    texts[t.choice].push_str(&t.text);
                    tokens[t.choice].push(t);
                }
                Event::Finished {
                    choice,
                    reason,
                    text,
                } => {
                    texts[choice].push_str(&text);
                    reasons[choice] = Some(reason);
                }
                Event::Done { usage, report } => {
                    let choices = texts
                        .into_iter()
                        .zip(tokens)
                        .zip(reasons)
                        .map(|((text, tokens), reason)| {
                            let finish_reason = reason.ok_or_else(|| {
                                ApiError::internal("the decoder finished without ending a choice")
                            })?;
                            Ok(ChoiceOutcome {
                                text,
                                tokens,
                                finish_reason,
                            })
                        })
                        .collect::<Result<_, ApiError>>()?;
                    return Ok(Outcome {
                        choices,
                        prompts,
                        usage,
                        alignment: report.unwrap_or_default(),
                    });
                }
                Event::Failed(failure) => return Err(failure.into()),
                Event::Started { .. } => {}
            }
        }
        Err(ApiError::internal("the request ended without a result"))
    }
}

/// `{"decoder": name, ...the decoder's report}`; with several prompts their reports go in a
/// `prompts` list, in prompt order.
fn alignment(decoder: &str, mut reports: Vec<Option<Value>>) -> Value {
    let mut alignment = json!({ "decoder": decoder });
    if reports.iter().all(Option::is_none) {
        return alignment;
    }
    if reports.len() > 1 {
        alignment["prompts"] = reports.into();
        return alignment;
    }
    match reports.pop().flatten() {
        Some(Value::Object(fields)) => {
            for (k, v) in fields {
                alignment[k.as_str()] = v;
            }
        }
        report => alignment["report"] = report.into(),
    }
    alignment
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_merges_reports() {
        assert_eq!(
            alignment("sample", vec![None]),
            json!({"decoder": "sample"})
        );
        assert_eq!(
            alignment("best_of_n", vec![Some(json!({"scores": [1, 2]}))]),
            json!({"decoder": "best_of_n", "scores": [1, 2]})
        );
        assert_eq!(
            alignment("x", vec![Some(json!(3))]),
            json!({"decoder": "x", "report": 3})
        );
        assert_eq!(
            alignment("x", vec![None, Some(json!({"kl": 0.5}))]),
            json!({"decoder": "x", "prompts": [null, {"kl": 0.5}]})
        );
    }
}
