//! One streamed request to an OpenAI-compatible endpoint, timed chunk by chunk. Success means a
//! 2xx answer whose stream carried text and ended with `data: [DONE]`; anything else is a
//! failure with its kind, never a fast success.

use std::time::{Duration, Instant};

use clap::ValueEnum;
use serde::Serialize;
use serde_json::{json, Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// POST /v1/completions with `prompt`.
    Completions,
    /// POST /v1/chat/completions with `messages`.
    Chat,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        }
    }
}

/// Where and how to send: the endpoint URL and the body fields every request shares.
pub struct Target {
    pub client: reqwest::Client,
    pub url: String,
    pub endpoint: Endpoint,
    /// `model`, `alignment`, `ignore_eos`, ...: what every request carries besides the prompt,
    /// `max_tokens` and the streaming options.
    pub fields: Map<String, Value>,
    pub timeout: Duration,
}

/// One prompt: `input` is text (either endpoint) or a `messages` array (chat only).
#[derive(Debug, Clone)]
pub struct Prompt {
    pub input: Value,
    pub max_tokens: usize,
    /// Prompt tokens if known without the server's usage (synthetic prompts).
    pub approx_tokens: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// A non-2xx answer.
    HttpStatus,
    /// No answer: the connection was refused or broke before the headers.
    Connection,
    /// The per-request timeout passed.
    Timeout,
    /// The body ended or broke before `data: [DONE]`.
    IncompleteStream,
    /// The stream carried an error object.
    StreamError,
    /// A `data:` line that is not JSON.
    InvalidChunk,
    /// `[DONE]` without any text before it.
    NoOutput,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::HttpStatus => "http_status",
            Failure::Connection => "connection",
            Failure::Timeout => "timeout",
            Failure::IncompleteStream => "incomplete_stream",
            Failure::StreamError => "stream_error",
            Failure::InvalidChunk => "invalid_chunk",
            Failure::NoOutput => "no_output",
        }
    }
}

/// One request's measurements; times in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    /// Order in the run; request `index` used the run's `index`-th prompt.
    pub index: usize,
    pub ok: bool,
    /// HTTP status; a stream that breaks after a 200 keeps its 200.
    pub status: Option<u16>,
    pub error: Option<Failure>,
    pub error_detail: Option<String>,
    /// When it was sent, from the start of the run.
    pub start_ms: f64,
    /// Until the first chunk carrying text (a role-only first chunk does not count).
    pub ttft_ms: Option<f64>,
    /// Until `data: [DONE]`, or until the failure.
    pub e2el_ms: f64,
    /// (e2el − ttft) / (output_tokens − 1), when more than one token came.
    pub tpot_ms: Option<f64>,
    /// Gaps between consecutive chunks carrying text.
    pub itl_ms: Vec<f64>,
    /// From the server's usage, else the synthetic prompt's intended length, else null.
    pub prompt_tokens: Option<u64>,
    /// From the server's usage, else the number of chunks carrying text.
    pub output_tokens: u64,
    /// Whether `output_tokens` came from usage.
    pub tokens_from_usage: bool,
    pub max_tokens: usize,
}

impl Target {
    fn body(&self, prompt: &Prompt) -> Value {
        let mut body = self.fields.clone();
        let (key, input) = match (self.endpoint, &prompt.input) {
            (Endpoint::Completions, text) => ("prompt", text.clone()),
            (Endpoint::Chat, Value::String(_)) => (
                "messages",
                json!([{"role": "user", "content": prompt.input}]),
            ),
            (Endpoint::Chat, messages) => ("messages", messages.clone()),
        };
        body.insert(key.into(), input);
        body.insert("max_tokens".into(), prompt.max_tokens.into());
        // Usage arrives in one last chunk before [DONE]; without it tokens are counted by chunk.
        body.insert("stream".into(), true.into());
        body.insert("stream_options".into(), json!({"include_usage": true}));
        Value::Object(body)
    }
}

/// Send `prompt` and time its stream; `origin` is the start of the run.
pub async fn send(target: &Target, prompt: &Prompt, index: usize, origin: Instant) -> Sample {
    let mut sample = Sample {
        index,
        max_tokens: prompt.max_tokens,
        ..Sample::default()
    };
    let sent = Instant::now();
    sample.start_ms = ms(sent - origin);
    let result = receive(target, prompt, &mut sample.status)
        .await
        .and_then(|r| match r.chunks.first() {
            Some(&first) => Ok((r, first)),
            None => Err((Failure::NoOutput, "the stream ended with no text".into())),
        });
    sample.e2el_ms = ms(sent.elapsed());
    match result {
        Ok((received, first)) => {
            let ttft = ms(first - sent);
            sample.ok = true;
            sample.ttft_ms = Some(ttft);
            sample.itl_ms = received
                .chunks
                .windows(2)
                .map(|w| ms(w[1] - w[0]))
                .collect();
            sample.tokens_from_usage = received.output_tokens.is_some();
            sample.output_tokens = received
                .output_tokens
                .unwrap_or(received.chunks.len() as u64);
            sample.prompt_tokens = received.prompt_tokens.or(prompt.approx_tokens);
            sample.tpot_ms = (sample.output_tokens > 1)
                .then(|| (sample.e2el_ms - ttft) / (sample.output_tokens - 1) as f64);
        }
        Err((kind, detail)) => {
            sample.error = Some(kind);
            sample.error_detail = Some(detail);
        }
    }
    sample
}

/// What a complete stream carried.
#[derive(Default)]
struct Received {
    /// Arrival of each chunk carrying text.
    chunks: Vec<Instant>,
    prompt_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

type Failed = (Failure, String);

async fn receive(
    target: &Target,
    prompt: &Prompt,
    status: &mut Option<u16>,
) -> Result<Received, Failed> {
    let mut response = target
        .client
        .post(&target.url)
        .timeout(target.timeout)
        .json(&target.body(prompt))
        .send()
        .await
        .map_err(|e| (transport(&e, Failure::Connection), e.to_string()))?;
    *status = Some(response.status().as_u16());
    if !response.status().is_success() {
        let code = response.status();
        let body = response.text().await.unwrap_or_default();
        return Err((
            Failure::HttpStatus,
            format!("HTTP {code}: {}", excerpt(&body)),
        ));
    }
    let mut received = Received::default();
    let mut pending = Vec::new();
    loop {
        let chunk = match response.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => {
                let detail = "the stream ended without `data: [DONE]`".to_string();
                return Err((Failure::IncompleteStream, detail));
            }
            Err(e) => return Err((transport(&e, Failure::IncompleteStream), e.to_string())),
        };
        // Every event in this network chunk reached the client now.
        let at = Instant::now();
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            // Blank lines, comments and `event:`/`id:` fields carry nothing to time.
            let Some(data) = line.trim_end().strip_prefix("data:") else {
                continue;
            };
            match data.trim_start() {
                "[DONE]" => return Ok(received),
                data => received.absorb(data, at)?,
            }
        }
    }
}

impl Received {
    fn absorb(&mut self, data: &str, at: Instant) -> Result<(), Failed> {
        let v: Value = serde_json::from_str(data)
            .map_err(|e| (Failure::InvalidChunk, format!("{e}: {}", excerpt(data))))?;
        // OpenAI and llama-server nest errors under `error`; older vLLM sends `object: "error"`.
        if v.get("error").is_some() || v["object"] == "error" {
            return Err((Failure::StreamError, excerpt(data)));
        }
        let has_text = |c: &Value| {
            [
                &c["text"],
                &c["delta"]["content"],
                &c["delta"]["reasoning_content"],
            ]
            .iter()
            .any(|t| t.as_str().is_some_and(|t| !t.is_empty()))
        };
        if v["choices"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(has_text))
        {
            self.chunks.push(at);
        }
        let usage = &v["usage"];
        if usage.is_object() {
            self.prompt_tokens = usage["prompt_tokens"].as_u64();
            self.output_tokens = usage["completion_tokens"].as_u64();
        }
        Ok(())
    }
}

fn transport(e: &reqwest::Error, otherwise: Failure) -> Failure {
    if e.is_timeout() {
        Failure::Timeout
    } else {
        otherwise
    }
}

/// The start of a server's message, enough to say what went wrong.
fn excerpt(s: &str) -> String {
    const MAX: usize = 300;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_string(),
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_only_chunks_are_not_text_and_usage_is_read() {
        let at = Instant::now();
        let mut r = Received::default();
        r.absorb(r#"{"choices":[{"delta":{"role":"assistant"}}]}"#, at)
            .unwrap();
        r.absorb(r#"{"choices":[{"delta":{"content":""}}]}"#, at)
            .unwrap();
        assert!(r.chunks.is_empty());
        r.absorb(r#"{"choices":[{"delta":{"content":"Hi"}}]}"#, at)
            .unwrap();
        r.absorb(r#"{"choices":[{"index":0,"text":" there"}]}"#, at)
            .unwrap();
        r.absorb(
            r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}"#,
            at,
        )
        .unwrap();
        assert_eq!(r.chunks.len(), 2);
        assert_eq!((r.prompt_tokens, r.output_tokens), (Some(7), Some(2)));
    }

    #[test]
    fn error_objects_and_garbage_fail_the_stream() {
        let at = Instant::now();
        let mut r = Received::default();
        let err = r.absorb(r#"{"error":{"message":"boom"}}"#, at).unwrap_err();
        assert_eq!(err.0, Failure::StreamError);
        let err = r.absorb(r#"{"object":"error","message":"boom"}"#, at);
        assert_eq!(err.unwrap_err().0, Failure::StreamError);
        assert_eq!(
            r.absorb("not json", at).unwrap_err().0,
            Failure::InvalidChunk
        );
    }

    #[test]
    fn bodies_stream_with_usage_and_carry_the_shared_fields() {
        let mut fields = Map::new();
        fields.insert("alignment".into(), json!({"decoder": "sample"}));
        let target = |endpoint| Target {
            client: reqwest::Client::new(),
            url: String::new(),
            endpoint,
            fields: fields.clone(),
            timeout: Duration::from_secs(1),
        };
        let prompt = Prompt {
            input: "hello".into(),
            max_tokens: 5,
            approx_tokens: None,
        };
        let body = target(Endpoint::Completions).body(&prompt);
        assert_eq!(body["prompt"], "hello");
        assert_eq!(body["max_tokens"], 5);
        assert_eq!(body["alignment"]["decoder"], "sample");
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        let body = target(Endpoint::Chat).body(&prompt);
        assert_eq!(
            body["messages"],
            json!([{"role": "user", "content": "hello"}])
        );
    }
}
