//! What the engine tells a request's owner.

use std::time::Duration;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End of generation token or a stop string.
    Stop,
    /// `max_tokens` reached or the context is full.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// One generated token of one choice.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub choice: usize,
    pub token: u32,
    /// Text this token releases (may be empty while a stop string could still match).
    pub text: String,
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
}

/// The log-probability of each prompt token after the tokens before it, with the most likely
/// alternatives there (`echo` with `logprobs`). Entry i is prompt token i + 1's: the first prompt
/// token follows nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PromptLogprobs {
    /// Which of the request's prompts (the engine runs one: 0).
    pub prompt: usize,
    pub tokens: Vec<u32>,
    pub entries: Vec<(f32, Vec<(u32, f32)>)>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Admitted from the queue after waiting this long.
    Started {
        queue_time: Duration,
    },
    /// The prompt's own log-probs, once it is prefilled (only when asked for).
    Prompt(PromptLogprobs),
    Token(TokenEvent),
    /// A choice ended; `text` is what it still held back.
    Finished {
        choice: usize,
        reason: FinishReason,
        text: String,
    },
    /// The request is complete.
    Done {
        usage: Usage,
        report: Option<serde_json::Value>,
    },
    Failed(EngineError),
}

/// Why a request failed in the engine. Requests are validated before they reach it, so none of
/// these is a client's mistake; a full queue is the server's load, which the client may retry.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// The engine thread is gone (the server is stopping): nothing more will run.
    #[error("the engine has stopped")]
    Stopped,
    /// A decoder failed or panicked: a bug.
    #[error("{0}")]
    Decoder(String),
    /// A batched forward failed: every request in the batch fails with it.
    #[error("forward of {model} failed: {message}")]
    Forward { model: String, message: String },
    /// `max_queue` requests already wait: this one is refused, not queued.
    #[error("the server is at capacity (at most {max_queue} requests wait beyond those running); retry shortly")]
    Busy { max_queue: usize },
}
