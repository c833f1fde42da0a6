//! From wire requests to a `Job`: every value checked once, against the model it will run on, so
//! that nothing past this point can be a client's mistake. Each failure is a 400 naming its
//! parameter.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use super::error::ApiError;
use super::wire::{
    ChatMessage, ChatRequest, CommonRequest, CompletionRequest, Content, Prompt, ResponseFormat,
    ScoreRequest, Stop,
};
use super::Limits;
use crate::decode::objectives::read_text;
use crate::decode::{DecoderSpec, Generation};
use crate::engine::Engine;
use crate::model::{Message, ModelId, ModelInfo, Vocab, BASE};
use crate::reward::{self, scorers::Scorer, Registry};
use crate::sampling::{Grammar, SamplingParams};

/// Most choices per prompt (`n`).
pub const MAX_N: usize = 16;
/// Most choices in one request, over all its prompts.
pub const MAX_CHOICES: usize = 64;
/// Most alternatives per token (`logprobs`, `top_logprobs`).
pub const MAX_LOGPROBS: usize = 20;
/// Most stop strings.
pub const MAX_STOP: usize = 4;
/// Longest stop string, in characters: every token is matched against each.
pub const MAX_STOP_CHARS: usize = 256;
/// `max_tokens` when a completions request gives none (OpenAI's default).
const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;

/// A checked generation request: one `Generation` per prompt, each with `n` choices.
#[derive(Debug)]
pub struct Job {
    /// The served model's name, echoed in responses.
    pub model: String,
    pub decoder: DecoderSpec,
    pub generations: Vec<Generation>,
    pub n: usize,
    /// `None` answers with one JSON body.
    pub stream: Option<Streaming>,
    /// How long the request may take, as it asked (the server may allow less).
    pub timeout: Option<Duration>,
}

impl Job {
    /// Whether tokens carry logprobs (the same for every prompt).
    pub fn logprobs(&self) -> bool {
        self.generations[0].sampling.logprobs.is_some()
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Streaming {
    /// End with a chunk that carries `usage` and no choices.
    pub include_usage: bool,
}

#[derive(Debug)]
pub struct CompletionJob {
    pub job: Job,
    /// The prompts' texts, to put before each choice's text (`echo`).
    pub echo: Option<Vec<String>>,
}

/// The model a request names (the base model when it names none).
pub fn model<'a>(engine: &'a Engine, requested: Option<&str>) -> Result<&'a ModelInfo, ApiError> {
    let base = engine.base();
    match requested {
        None => Ok(base),
        Some(name) if name == base.name => Ok(base),
        Some(name) => match engine.models().iter().find(|m| m.name == name) {
            Some(m) => Err(ApiError::invalid(
                "model",
                format!(
                    "`{name}` is a {} model; requests generate with `{}`",
                    m.role.name(),
                    base.name
                ),
            )),
            None => Err(ApiError::model_not_found(name, &base.name)),
        },
    }
}

/// A prompt as the client gave it, so that each model the decoder runs can read it in its own
/// tokens and chat template.
enum Source {
    Text(String),
    Tokens(Vec<u32>),
    Chat(Vec<Message>),
}

impl Source {
    fn tokens(&self, model: &ModelInfo) -> Result<Vec<u32>, ApiError> {
        match self {
            Self::Text(text) => encode(model, text),
            Self::Tokens(ids) => Ok(ids.clone()),
            Self::Chat(messages) => render(model, messages),
        }
    }
}

/// `engine`: what it serves (decoders may run the auxiliary models, and score with its
/// rewards); `model`: the base model the request names.
pub fn completion(
    common: CommonRequest,
    request: CompletionRequest,
    engine: &Engine,
    model: &ModelInfo,
    limits: &Limits,
) -> Result<CompletionJob, ApiError> {
    if request.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported(
            "suffix",
            "`suffix` is not supported: tilt's models do not fill in the middle",
        ));
    }
    let n = choices(common.n)?;
    if request.best_of.is_some_and(|b| b != n as i64) {
        return Err(ApiError::unsupported(
            "best_of",
            "`best_of` is only accepted equal to `n`; for best-of-N selection by reward use the `alignment` extension",
        ));
    }
    let vocab = &model.vocab;
    let prompt = request.prompt.ok_or_else(|| ApiError::missing("prompt"))?;
    let (sources, texts): (Vec<Source>, Vec<String>) = match prompt {
        Prompt::Text(text) => (vec![Source::Text(text.clone())], vec![text]),
        Prompt::Texts(texts) => (
            texts.iter().map(|t| Source::Text(t.clone())).collect(),
            texts,
        ),
        Prompt::Tokens(ids) => {
            let text = vocab.decode_with_special(&ids);
            (vec![Source::Tokens(ids)], vec![text])
        }
        Prompt::TokenLists(lists) => {
            let texts = lists.iter().map(|l| vocab.decode_with_special(l)).collect();
            (lists.into_iter().map(Source::Tokens).collect(), texts)
        }
    };
    let prompts = sources
        .iter()
        .map(|s| s.tokens(model))
        .collect::<Result<Vec<_>, _>>()?;
    if prompts.is_empty() {
        return Err(ApiError::invalid("prompt", "the list of prompts is empty"));
    }
    for p in &prompts {
        if p.is_empty() {
            return Err(ApiError::invalid("prompt", "the prompt is empty"));
        }
        in_vocabulary("prompt", p, vocab)?;
    }
    let logprobs = request
        .logprobs
        .map(|k| count("logprobs", k, 0, Some(MAX_LOGPROBS)))
        .transpose()?;
    let echo = request.echo.unwrap_or(false);
    if common.max_tokens == Some(0) && !echo {
        return Err(ApiError::invalid(
            "max_tokens",
            "`max_tokens: 0` generates nothing; it is accepted with `echo: true`, to score the prompt",
        ));
    }
    let mut job = job(
        common,
        engine,
        model,
        prompts.into_iter().zip(sources).collect(),
        n,
        logprobs,
        Budget {
            param: "max_tokens",
            prompt_param: "prompt",
            default: Some(COMPLETIONS_DEFAULT_MAX_TOKENS),
            least: usize::from(!echo),
        },
        limits,
    )?;
    if echo {
        for g in &mut job.generations {
            g.sampling.prompt_logprobs = logprobs;
        }
    }
    constrain(&mut job, grammar(request.response_format, model)?)?;
    Ok(CompletionJob {
        job,
        echo: echo.then_some(texts),
    })
}

pub fn chat(
    common: CommonRequest,
    request: ChatRequest,
    engine: &Engine,
    model: &ModelInfo,
    limits: &Limits,
) -> Result<Job, ApiError> {
    if request.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::unsupported(
            "tools",
            "tool calling is not supported",
        ));
    }
    let grammar = grammar(request.response_format, model)?;
    let messages = request
        .messages
        .ok_or_else(|| ApiError::missing("messages"))?;
    let messages = chat_messages(messages)?;
    let prompt = render(model, &messages)?;
    let n = choices(common.n)?;
    let top = request
        .top_logprobs
        .map(|k| count("top_logprobs", k, 0, Some(MAX_LOGPROBS)))
        .transpose()?;
    let logprobs = match (request.logprobs.unwrap_or(false), top) {
        (true, top) => Some(top.unwrap_or(0)),
        (false, Some(k)) if k > 0 => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` needs `logprobs: true`",
            ))
        }
        (false, _) => None,
    };
    let (max, param) = match request.max_completion_tokens {
        Some(m) => {
            // The alias wins, but a `max_tokens` beside it is still checked.
            if let Some(other) = common.max_tokens {
                count("max_tokens", other, 1, None)?;
            }
            (Some(m), "max_completion_tokens")
        }
        None => (common.max_tokens, "max_tokens"),
    };
    let mut job = job(
        CommonRequest {
            max_tokens: max,
            ..common
        },
        engine,
        model,
        vec![(prompt, Source::Chat(messages))],
        n,
        logprobs,
        Budget {
            param,
            prompt_param: "messages",
            default: None,
            least: 1,
        },
        limits,
    )?;
    constrain(&mut job, grammar)?;
    Ok(job)
}

/// The grammar `response_format` asks answers to keep to: none for `text`.
fn grammar(format: Option<ResponseFormat>, model: &ModelInfo) -> Result<Option<Grammar>, ApiError> {
    let Some(format) = format else {
        return Ok(None);
    };
    // A `json_schema` is checked whatever the type: it is a mistake even where it is not used.
    if let Some(j) = &format.json_schema {
        if !j.schema.as_ref().is_some_and(Value::is_object) {
            return Err(ApiError::invalid(
                "response_format.json_schema.schema",
                "`response_format.json_schema.schema` must be a JSON Schema object",
            ));
        }
    }
    match format.kind.as_str() {
        "text" => Ok(None),
        "json_object" => Ok(Some(Grammar::json_object(&model.vocab))),
        "json_schema" => {
            let schema = format
                .json_schema
                .and_then(|j| j.schema)
                .ok_or_else(|| ApiError::missing("response_format.json_schema.schema"))?;
            Grammar::json_schema(&model.vocab, &schema)
                .map(Some)
                .map_err(|why| {
                    ApiError::invalid(
                        "response_format.json_schema.schema",
                        format!("the schema does not compile to a grammar: {why}"),
                    )
                })
        }
        "grammar" => {
            let grammar = format
                .grammar
                .ok_or_else(|| ApiError::missing("response_format.grammar"))?;
            Grammar::lark(&model.vocab, &grammar).map(Some).map_err(|why| {
                ApiError::invalid(
                    "response_format.grammar",
                    format!("the grammar does not compile: {why}"),
                )
            })
        }
        other => Err(ApiError::unsupported(
            "response_format.type",
            format!("response format `{other}` is not supported; use `text`, `json_object`, `json_schema` or `grammar`"),
        )),
    }
}

/// Keep every answer of `job` to `grammar`, if the decoder can.
fn constrain(job: &mut Job, grammar: Option<Grammar>) -> Result<(), ApiError> {
    let Some(grammar) = grammar else {
        return Ok(());
    };
    job.decoder
        .check_grammar()
        .map_err(|why| ApiError::unsupported("response_format", why))?;
    for g in &mut job.generations {
        g.sampling.grammar = Some(grammar.clone());
    }
    Ok(())
}

/// Most reward sources one `/v1/score` request may name.
pub const MAX_SCORE_REWARDS: usize = 16;

/// A checked `/v1/score` request.
pub struct ScoreJob {
    /// Each model that reads the responses, with the prompt in its own tokens and template: the
    /// base first, then the reward models asked for.
    pub prompts: Vec<(ModelId, Vec<u32>)>,
    pub responses: Vec<Vec<u32>>,
    /// Each response's text, as the programmatic scorers read it.
    pub texts: Vec<String>,
    /// The reward sources in the order asked, by name.
    pub rewards: Vec<(String, Reading)>,
}

/// How a reward source reads a response.
pub enum Reading {
    /// Σ log π_r of the model at this index of `ScoreJob::prompts`.
    Model(usize),
    Text(Arc<dyn Scorer>),
}

pub fn score(
    request: ScoreRequest,
    engine: &Engine,
    model: &ModelInfo,
    limits: &Limits,
) -> Result<ScoreJob, ApiError> {
    let source = match (request.prompt, request.messages) {
        (Some(Prompt::Text(text)), None) => Source::Text(text),
        (Some(Prompt::Tokens(ids)), None) => Source::Tokens(ids),
        (Some(_), None) => {
            return Err(ApiError::invalid(
                "prompt",
                "`/v1/score` reads one prompt: a text or a list of token ids",
            ))
        }
        (None, Some(messages)) => Source::Chat(chat_messages(messages)?),
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "messages",
                "give `prompt` or `messages`, not both",
            ))
        }
        (None, None) => return Err(ApiError::missing("prompt")),
    };
    let vocab = &model.vocab;
    let prompt_param = if matches!(source, Source::Chat(_)) {
        "messages"
    } else {
        "prompt"
    };
    let prompt = source.tokens(model)?;
    if prompt.is_empty() {
        return Err(ApiError::invalid(prompt_param, "the prompt is empty"));
    }
    in_vocabulary(prompt_param, &prompt, vocab)?;
    within_prompt_limit(prompt_param, &prompt, limits)?;
    let responses = match request
        .responses
        .ok_or_else(|| ApiError::missing("responses"))?
    {
        Prompt::Text(text) => vec![Err(text)],
        Prompt::Texts(texts) => texts.into_iter().map(Err).collect(),
        Prompt::Tokens(ids) => vec![Ok(ids)],
        Prompt::TokenLists(lists) => lists.into_iter().map(Ok).collect(),
    };
    if responses.is_empty() || responses.len() > MAX_CHOICES {
        return Err(ApiError::invalid(
            "responses",
            format!(
                "`responses` must list 1 to {MAX_CHOICES} responses, got {}",
                responses.len()
            ),
        ));
    }
    let eos = match request.eos {
        Some(true) => Some(vocab.eos.ok_or_else(|| {
            ApiError::invalid(
                "eos",
                "this model's vocabulary has no end-of-sequence token",
            )
        })?),
        _ => None,
    };
    let (mut tokens, mut texts) = (Vec::new(), Vec::new());
    for (i, response) in responses.into_iter().enumerate() {
        let param = format!("responses[{i}]");
        let (mut ids, text) = match response {
            Err(text) => {
                let ids = vocab
                    .encode(&text, false)
                    .map_err(|e| ApiError::invalid(&param, format!("{e:#}")))?;
                (ids, text)
            }
            Ok(ids) => {
                in_vocabulary(&param, &ids, vocab)?;
                let text = read_text(vocab, &ids, false, &[]);
                (ids, text)
            }
        };
        if ids.is_empty() {
            return Err(ApiError::invalid(param, "the response is empty"));
        }
        ids.extend(eos);
        tokens.push(ids);
        texts.push(text);
    }
    let registry = engine.rewards();
    let names = request.rewards.unwrap_or_default();
    if names.len() > MAX_SCORE_REWARDS {
        return Err(ApiError::invalid(
            "rewards",
            format!(
                "`rewards` names at most {MAX_SCORE_REWARDS} reward sources, got {}",
                names.len()
            ),
        ));
    }
    let mut prompts = vec![(BASE, prompt)];
    let mut rewards: Vec<(String, Reading)> = Vec::with_capacity(names.len());
    for name in names {
        if rewards.iter().any(|(n, _)| *n == name) {
            return Err(ApiError::invalid(
                "rewards",
                format!("`{name}` is listed twice"),
            ));
        }
        let reading = match registry.reward(&name, 1.0) {
            Ok((reward::Source::Text(scorer), _)) => Reading::Text(scorer),
            Ok((reward::Source::Arm(m), _)) => {
                prompts.push((m, source.tokens(&engine.models()[m])?));
                Reading::Model(prompts.len() - 1)
            }
            Err(e) => {
                return Err(ApiError::invalid(
                    "rewards",
                    format!("{e}; available: {}", registry.names().join(", ")),
                ))
            }
        };
        rewards.push((name, reading));
    }
    let longest = tokens.iter().map(Vec::len).max().unwrap_or(0);
    for (id, p) in &prompts {
        let ctx = engine.models()[*id].context_length();
        if p.len() + longest > ctx {
            return Err(ApiError::context_length(
                "responses",
                format!(
                    "this model's maximum context length is {ctx} tokens; the prompt ({}) and the longest response ({longest}) need {}",
                    p.len(),
                    p.len() + longest
                ),
            ));
        }
    }
    Ok(ScoreJob {
        prompts,
        responses: tokens,
        texts,
        rewards,
    })
}

/// A 400 naming `param` when one of `ids` is not a token of `vocab`.
fn in_vocabulary(param: &str, ids: &[u32], vocab: &Vocab) -> Result<(), ApiError> {
    match ids.iter().find(|&&t| t as usize >= vocab.size()) {
        Some(bad) => Err(ApiError::invalid(
            param,
            format!(
                "token id {bad} is out of range: the vocabulary has {} tokens",
                vocab.size()
            ),
        )),
        None => Ok(()),
    }
}

/// A 400 naming `param` when `prompt` is longer than the server takes (`--max-prompt-tokens`).
fn within_prompt_limit(param: &str, prompt: &[u32], limits: &Limits) -> Result<(), ApiError> {
    match limits.prompt_tokens {
        Some(max) if prompt.len() > max => Err(ApiError::invalid(
            param,
            format!(
                "the prompt has {} tokens; this server takes at most {max} (--max-prompt-tokens)",
                prompt.len()
            ),
        )),
        _ => Ok(()),
    }
}

/// The prompt tokens of a chat: the model's template over the messages.
pub fn chat_prompt(model: &ModelInfo, messages: Vec<ChatMessage>) -> Result<Vec<u32>, ApiError> {
    render(model, &chat_messages(messages)?)
}

fn chat_messages(messages: Vec<ChatMessage>) -> Result<Vec<Message>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must hold at least one message",
        ));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| message(i, m))
        .collect()
}

/// `model`'s chat template over `messages`, in its tokens.
fn render(model: &ModelInfo, messages: &[Message]) -> Result<Vec<u32>, ApiError> {
    let text = model
        .chat
        .render(messages)
        .map_err(|e| ApiError::invalid("messages", e))?;
    model
        .vocab
        .encode(&text, false)
        .map_err(|e| ApiError::invalid("messages", format!("{e:#}")))
}

fn message(i: usize, m: ChatMessage) -> Result<Message, ApiError> {
    let role = match m.role.as_str() {
        "system" | "user" | "assistant" => m.role,
        // OpenAI's newer name for the system role; chat templates know `system`.
        "developer" => "system".to_string(),
        other => {
            return Err(ApiError::invalid(
                format!("messages[{i}].role"),
                format!("unsupported role `{other}`: use system, developer, user or assistant"),
            ))
        }
    };
    let content = match m.content {
        None => String::new(),
        Some(Content::Text(text)) => text,
        Some(Content::Parts(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.into_iter().enumerate() {
                match (part.kind.as_str(), part.text) {
                    ("text", Some(text)) => texts.push(text),
                    ("text", None) => {
                        return Err(ApiError::missing(&format!(
                            "messages[{i}].content[{j}].text"
                        )))
                    }
                    (other, _) => {
                        return Err(ApiError::unsupported(
                            &format!("messages[{i}].content[{j}].type"),
                            format!(
                                "content parts of type `{other}` are not supported; only `text`"
                            ),
                        ))
                    }
                }
            }
            texts.join("\n")
        }
    };
    Ok(Message { role, content })
}

/// Tokens of a completions prompt, with BOS when the model wants it.
pub fn encode(model: &ModelInfo, text: &str) -> Result<Vec<u32>, ApiError> {
    model
        .vocab
        .encode(text, true)
        .map_err(|e| ApiError::invalid("prompt", format!("{e:#}")))
}

/// How many tokens a choice may generate, and where to point when it cannot.
struct Budget {
    param: &'static str,
    prompt_param: &'static str,
    /// When the request names no limit: this, or what the context leaves.
    default: Option<usize>,
    /// The fewest it may ask for (0 only to score an echoed prompt).
    least: usize,
}

/// `prompts`: each prompt in the base's tokens, with its source for the other models.
#[allow(clippy::too_many_arguments)] // the request's parts, each checked here
fn job(
    common: CommonRequest,
    engine: &Engine,
    model: &ModelInfo,
    prompts: Vec<(Vec<u32>, Source)>,
    n: usize,
    logprobs: Option<usize>,
    budget: Budget,
    limits: &Limits,
) -> Result<Job, ApiError> {
    if prompts.len() * n > MAX_CHOICES {
        return Err(ApiError::invalid(
            "n",
            format!(
                "{} prompts × n = {n} asks for {} choices; at most {MAX_CHOICES}",
                prompts.len(),
                prompts.len() * n
            ),
        ));
    }
    let requested = common
        .max_tokens
        .map(|m| count(budget.param, m, budget.least, limits.output_tokens))
        .transpose()?;
    for (p, _) in &prompts {
        within_prompt_limit(budget.prompt_param, p, limits)?;
    }
    let sampling = sampling(&common, model, logprobs)?;
    let stop = stops(common.stop)?;
    let decoder = decoder(common.alignment, engine.rewards())?;
    decoder
        .check_choices(n)
        .map_err(|why| ApiError::invalid("n", why))?;
    let models = engine.models();
    let generations = prompts
        .into_iter()
        .map(|(prompt, source)| {
            let model_prompts = decoder
                .models()
                .into_iter()
                .map(|id| Ok((id, source.tokens(&models[id])?)))
                .collect::<Result<HashMap<_, _>, ApiError>>()?;
            // Every model the decoder runs must fit its prompt and the completion: the
            // tightest one sets the budget.
            let (ctx, len) = std::iter::once((&BASE, &prompt))
                .chain(&model_prompts)
                .map(|(&id, p)| (models[id].context_length(), p.len()))
                .min_by_key(|&(ctx, len)| ctx.saturating_sub(len))
                .expect("the base model runs");
            let max_tokens = match requested {
                Some(m) if len + m > ctx => Err(too_long(&budget, ctx, len, m)),
                Some(m) => Ok(m),
                None if len >= ctx => Err(too_long(&budget, ctx, len, 1)),
                None => Ok((budget.default.unwrap_or(usize::MAX))
                    .min(limits.output_tokens.unwrap_or(usize::MAX))
                    .min(ctx - len)),
            }?;
            Ok(Generation {
                prompt,
                max_tokens,
                stop: stop.clone(),
                ignore_eos: common.ignore_eos.unwrap_or(false),
                n,
                sampling: sampling.clone(),
                model_prompts,
            })
        })
        .collect::<Result<_, ApiError>>()?;
    let timeout = (common.timeout)
        .map(|t| {
            Duration::try_from_secs_f64(t)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    ApiError::invalid(
                        "timeout",
                        format!("`timeout` must be a number of seconds above 0, got {t}"),
                    )
                })
        })
        .transpose()?;
    let stream = common.stream.unwrap_or(false).then(|| Streaming {
        include_usage: common
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
    });
    Ok(Job {
        model: model.name.clone(),
        decoder,
        generations,
        n,
        stream,
        timeout,
    })
}

fn too_long(budget: &Budget, ctx: usize, prompt: usize, completion: usize) -> ApiError {
    ApiError::context_length(
        budget.prompt_param,
        format!(
            "this model's maximum context length is {ctx} tokens; this request needs {} ({prompt} in the prompt, {completion} in the completion)",
            prompt + completion
        ),
    )
}

fn choices(n: Option<i64>) -> Result<usize, ApiError> {
    n.map_or(Ok(1), |n| count("n", n, 1, Some(MAX_N)))
}

/// An integer parameter of at least `min` and, when given, at most `max`.
fn count(param: &str, value: i64, min: usize, max: Option<usize>) -> Result<usize, ApiError> {
    usize::try_from(value)
        .ok()
        .filter(|&v| v >= min && max.is_none_or(|m| v <= m))
        .ok_or_else(|| {
            let range = match max {
                Some(max) => format!("between {min} and {max}"),
                None => format!("at least {min}"),
            };
            ApiError::invalid(param, format!("`{param}` must be {range}, got {value}"))
        })
}

fn stops(stop: Option<Stop>) -> Result<Vec<String>, ApiError> {
    let stops = match stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stops.len() > MAX_STOP {
        return Err(ApiError::invalid(
            "stop",
            format!("at most {MAX_STOP} stop sequences, got {}", stops.len()),
        ));
    }
    if let Some(long) = stops.iter().find(|s| s.chars().count() > MAX_STOP_CHARS) {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "a stop sequence may have at most {MAX_STOP_CHARS} characters, got {}",
                long.chars().count()
            ),
        ));
    }
    Ok(stops)
}

/// A float parameter: `default` when absent, else within `[lo, hi]` (`(lo, hi]` when `open`).
fn real(
    param: &str,
    value: Option<f64>,
    default: f32,
    (lo, hi): (f64, f64),
    open: bool,
) -> Result<f32, ApiError> {
    let Some(v) = value else {
        return Ok(default);
    };
    let above = if open { v > lo } else { v >= lo };
    if above && v <= hi {
        Ok(v as f32)
    } else {
        let open_bracket = if open { "(" } else { "[" };
        Err(ApiError::invalid(
            param,
            format!("`{param}` must be in {open_bracket}{lo}, {hi}], got {v}"),
        ))
    }
}

fn sampling(
    c: &CommonRequest,
    model: &ModelInfo,
    logprobs: Option<usize>,
) -> Result<SamplingParams, ApiError> {
    let top_k = match c.top_k {
        None | Some(-1) => 0, // -1 is vLLM's "off"
        Some(k) => count("top_k", k, 0, Some(model.vocab.size()))?,
    };
    let vocab = model.vocab.size();
    let logit_bias = c
        .logit_bias
        .iter()
        .flatten()
        .map(|(token, &bias)| {
            let id = token
                .parse::<u32>()
                .ok()
                .filter(|&id| (id as usize) < vocab)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "logit_bias",
                        format!("`{token}` is not a token id: ids are 0 to {}", vocab - 1),
                    )
                })?;
            let bias = real("logit_bias", Some(bias), 0.0, (-100.0, 100.0), false)?;
            Ok((id, bias))
        })
        .collect::<Result<_, ApiError>>()?;
    Ok(SamplingParams {
        temperature: real("temperature", c.temperature, 1.0, (0.0, 2.0), false)?,
        top_p: real("top_p", c.top_p, 1.0, (0.0, 1.0), true)?,
        top_k,
        min_p: real("min_p", c.min_p, 0.0, (0.0, 1.0), false)?,
        repetition_penalty: real(
            "repetition_penalty",
            c.repetition_penalty,
            1.0,
            (0.0, 10.0),
            true,
        )?,
        presence_penalty: real(
            "presence_penalty",
            c.presence_penalty,
            0.0,
            (-2.0, 2.0),
            false,
        )?,
        frequency_penalty: real(
            "frequency_penalty",
            c.frequency_penalty,
            0.0,
            (-2.0, 2.0),
            false,
        )?,
        logit_bias,
        // OpenAI seeds are signed 64-bit; keep their bits.
        seed: c.seed.map(|s| s as u64),
        logprobs,
        prompt_logprobs: None,
        grammar: None,
    })
}

/// The decoder an `alignment` object asks for (`sample` when there is none).
fn decoder(
    alignment: Option<Map<String, Value>>,
    rewards: &Registry,
) -> Result<DecoderSpec, ApiError> {
    let Some(mut params) = alignment else {
        return Ok(DecoderSpec::sample());
    };
    let name = match params.remove("decoder") {
        None | Some(Value::Null) => "sample".to_string(),
        Some(Value::String(name)) => name,
        Some(_) => {
            return Err(ApiError::invalid(
                "alignment.decoder",
                "`alignment.decoder` must be a string",
            ))
        }
    };
    Ok(DecoderSpec::parse(&name, params, rewards)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_reals_name_their_bounds() {
        assert_eq!(count("n", 3, 1, Some(16)), Ok(3));
        let e = count("n", 0, 1, Some(16)).unwrap_err();
        assert_eq!(e.body.param.as_deref(), Some("n"));
        assert!(e.body.message.contains("between 1 and 16"));
        let e = count("max_tokens", -5, 1, None).unwrap_err();
        assert!(e.body.message.contains("at least 1"));
        assert_eq!(real("top_p", Some(1.0), 1.0, (0.0, 1.0), true), Ok(1.0));
        assert!(real("top_p", Some(0.0), 1.0, (0.0, 1.0), true).is_err());
        assert_eq!(
            real("temperature", Some(0.0), 1.0, (0.0, 2.0), false),
            Ok(0.0)
        );
        assert!(real("temperature", Some(2.5), 1.0, (0.0, 2.0), false).is_err());
    }

    #[test]
    fn alignment_defaults_to_sample_and_names_bad_parameters() {
        let none = Registry::new(&[]);
        assert_eq!(decoder(None, &none).unwrap().name(), "sample");
        let obj = |v: Value| v.as_object().cloned();
        assert_eq!(
            decoder(obj(serde_json::json!({})), &none).unwrap().name(),
            "sample"
        );
        let e = decoder(obj(serde_json::json!({"decoder": "nope"})), &none).unwrap_err();
        assert_eq!(e.body.param.as_deref(), Some("alignment.decoder"));
        assert!(e.body.message.contains("sample") && e.body.message.contains("genarm"));
        let e = decoder(
            obj(serde_json::json!({"decoder": "sample", "beta": 2})),
            &none,
        )
        .unwrap_err();
        assert_eq!(e.body.param.as_deref(), Some("alignment.beta"));
        for beta in [0.0, -1.0, 1e39] {
            let e = decoder(
                obj(serde_json::json!({"decoder": "genarm", "beta": beta})),
                &none,
            )
            .unwrap_err();
            assert_eq!(e.body.param.as_deref(), Some("alignment.beta"), "{beta}");
        }
        let e = decoder(
            obj(serde_json::json!({"decoder": "genarm", "rewards": {"toy": 1}})),
            &none,
        )
        .unwrap_err();
        assert_eq!(e.body.param.as_deref(), Some("alignment.rewards"));
        assert!(
            e.body.message.contains("none are loaded"),
            "{}",
            e.body.message
        );
        let e = decoder(obj(serde_json::json!({"decoder": 3})), &none).unwrap_err();
        assert_eq!(e.body.param.as_deref(), Some("alignment.decoder"));
    }
}
