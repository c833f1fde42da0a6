//! Wire types: OpenAI completions and chat requests, responses and stream chunks, plus tilt's own
//! routes. Requests are read leniently (every field optional, unknown fields ignored) and checked
//! in `validate`; numbers are read wide (i64, f64) so that an out-of-range value gets a 400 that
//! says so rather than a type error.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Fields shared by `/v1/completions` and `/v1/chat/completions`.
#[derive(Debug, Default, Deserialize)]
pub struct CommonRequest {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    /// Token id (as a string, as OpenAI sends it) → bias added to its logit.
    pub logit_bias: Option<BTreeMap<String, f64>>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub ignore_eos: Option<bool>,
    /// Accepted and ignored, but typed as the contract says.
    #[allow(dead_code)]
    pub user: Option<String>,
    /// tilt's extension: seconds the request may take (within the server's `--request-timeout`);
    /// then it ends with what it has produced.
    pub timeout: Option<f64>,
    /// tilt's extension: `{"decoder": name, ...that decoder's parameters}`.
    pub alignment: Option<Map<String, Value>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "expected a string or a list of strings")]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `/v1/completions`' own fields.
#[derive(Debug, Default, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Option<Prompt>,
    pub echo: Option<bool>,
    /// Alternatives to report per token (the chosen token is always reported).
    pub logprobs: Option<i64>,
    pub suffix: Option<String>,
    pub best_of: Option<i64>,
    pub response_format: Option<ResponseFormat>,
}

#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "expected a string, a list of strings, a list of token ids or a list of token-id lists"
)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// `/v1/chat/completions`' own fields.
#[derive(Debug, Default, Deserialize)]
pub struct ChatRequest {
    pub messages: Option<Vec<ChatMessage>>,
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub tools: Option<Vec<Value>>,
    pub response_format: Option<ResponseFormat>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
    /// Accepted and ignored, but typed as the contract says.
    #[allow(dead_code)]
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "expected a string or a list of content parts")]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
    pub json_schema: Option<JsonSchemaFormat>,
    /// tilt's type `grammar`: a Lark grammar.
    pub grammar: Option<String>,
}

/// OpenAI's `response_format.json_schema`.
#[derive(Debug, Deserialize)]
pub struct JsonSchemaFormat {
    /// Accepted and ignored (OpenAI requires a name; the schema is what binds).
    #[allow(dead_code)]
    pub name: Option<String>,
    /// Accepted and ignored, typed as the contract says.
    #[allow(dead_code)]
    pub description: Option<String>,
    pub schema: Option<Value>,
    /// Accepted: tilt's grammars are always strict.
    #[allow(dead_code)]
    pub strict: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl From<crate::engine::Usage> for Usage {
    fn from(u: crate::engine::Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
        }
    }
}

/// A completion, or one chunk of a streamed one (same object, as in OpenAI's API).
#[derive(Debug, Serialize)]
pub struct Completion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alignment: Option<Value>,
}

#[derive(Debug, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// The legacy completions logprobs format: parallel lists, one entry per token.
#[derive(Debug, Default, Clone, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    /// `null` for an echoed prompt's first token, which follows nothing.
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<BTreeMap<String, f32>>>,
    /// Character offset of each token in the choice's text.
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    pub alignment: Value,
}

#[derive(Debug, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: &'static str,
}

#[derive(Debug, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Default, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprob>,
}

#[derive(Debug, Serialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Serialize)]
pub struct ChatChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alignment: Option<Value>,
}

#[derive(Debug, Serialize)]
pub struct ChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// `base` (the model requests generate with), `reward` or `draft`.
    pub role: crate::model::Role,
    pub context_length: usize,
}

#[derive(Debug, Serialize)]
pub struct RewardList {
    pub object: &'static str,
    pub data: Vec<crate::reward::RewardInfo>,
}

/// `POST /v1/score` (tilt's own): responses read after one prompt by the base and reward sources.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreRequest {
    pub model: Option<String>,
    /// Exactly one of `prompt` (a text or token ids) and `messages`.
    #[serde(default, deserialize_with = "not_null")]
    pub prompt: Option<Prompt>,
    #[serde(default, deserialize_with = "not_null")]
    pub messages: Option<Vec<ChatMessage>>,
    /// Texts or token-id lists (one of either also goes).
    pub responses: Option<Prompt>,
    /// Reward sources by name (`/v1/rewards`): reward models and programmatic scorers.
    pub rewards: Option<Vec<String>>,
    /// Read each response as ended: the vocabulary's end-of-sequence token after it.
    pub eos: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct ScoreResponse {
    pub object: &'static str,
    pub model: String,
    pub data: Vec<ScoreData>,
    pub usage: ScoreUsage,
}

/// One response's scores.
#[derive(Debug, Serialize)]
pub struct ScoreData {
    pub index: usize,
    /// Its tokens as read (with the end-of-sequence token when `eos`).
    pub tokens: usize,
    /// The base's Σ log π(y_t | prompt, y_<t), and each term.
    pub logprob: f64,
    pub token_logprobs: Vec<f32>,
    pub rewards: BTreeMap<String, RewardScore>,
}

/// A reward source's score of one response: a reward model's Σ log π_r (with each term; for one
/// read relative to the base, Σ log π_r − log π_base), or a programmatic scorer's value of the text.
#[derive(Debug, Serialize)]
pub struct RewardScore {
    pub score: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_logprobs: Option<Vec<f32>>,
}

#[derive(Debug, Serialize)]
pub struct ScoreUsage {
    /// The prompt's tokens (read once, whatever the number of responses).
    pub prompt_tokens: usize,
    /// The responses' tokens, all of them.
    pub response_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Debug, Serialize)]
pub struct TokenizerInfo {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub add_bos_token: bool,
    pub chat_template: String,
    pub model_max_length: usize,
    pub vocab_size: usize,
}

#[derive(Debug, Default, Deserialize)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    /// Exactly one of `prompt` and `messages`: a null one is neither given nor absent.
    #[serde(default, deserialize_with = "not_null")]
    pub prompt: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    pub messages: Option<Vec<ChatMessage>>,
    /// Add the model's BOS token to a `prompt` when it wants one (default true).
    pub add_special_tokens: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct TokenizeResponse {
    pub tokens: Vec<u32>,
    pub count: usize,
    pub max_model_len: usize,
}

#[derive(Debug, Default, Deserialize)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Option<Vec<i64>>,
}

#[derive(Debug, Serialize)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

#[derive(Debug, Serialize)]
pub struct Health {
    pub status: &'static str,
}

/// A field that may be left out but not sent as null (`Option` alone reads null as absent).
fn not_null<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    match Option::<T>::deserialize(deserializer)? {
        Some(value) => Ok(Some(value)),
        None => Err(serde::de::Error::custom("must not be null")),
    }
}
