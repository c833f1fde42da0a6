//! The small routes: the playground, models, health, tokenize, detokenize, tokenizer info,
//! metrics, and the fallbacks.

use axum::extract::State;
use axum::http::{header, Uri};
use axum::response::{Html, IntoResponse};
use axum::Json;

use super::error::ApiError;
use super::json::JsonBody;
use super::wire::{
    DetokenizeRequest, DetokenizeResponse, Health, ModelCard, ModelList, RewardList,
    TokenizeRequest, TokenizeResponse, TokenizerInfo,
};
use super::{metrics, validate, AppState};

/// The playground: one static page bundled into the binary (nothing fetched from elsewhere); it
/// calls the API from the browser, with the API key the user types in when the server needs one.
pub async fn playground() -> Html<&'static str> {
    Html(include_str!("playground.html"))
}

/// The base model and every auxiliary model, with its role.
pub async fn models(State(state): State<AppState>) -> Result<Json<ModelList>, ApiError> {
    let engine = state.engine()?;
    let data = engine
        .models()
        .iter()
        .map(|m| ModelCard {
            id: m.name.clone(),
            object: "model",
            created: state.started,
            owned_by: "tilt",
            role: m.role,
            context_length: m.context_length(),
        })
        .collect();
    Ok(Json(ModelList {
        object: "list",
        data,
    }))
}

/// Reward sources: the loaded reward models (ARMs) and the built-in programmatic scorers.
pub async fn rewards(State(state): State<AppState>) -> Result<Json<RewardList>, ApiError> {
    let engine = state.engine()?;
    Ok(Json(RewardList {
        object: "list",
        data: engine.rewards().list(),
    }))
}

/// What a client needs to tokenize as the server does (vLLM's route; lm-evaluation-harness's
/// `tokenizer_backend=remote` reads it, then calls `/tokenize` and `/detokenize`).
pub async fn tokenizer_info(
    State(state): State<AppState>,
) -> Result<Json<TokenizerInfo>, ApiError> {
    let model = state.engine()?.base();
    let vocab = &model.vocab;
    let name = |id: Option<u32>| id.map(|t| vocab.text(t).to_string());
    Ok(Json(TokenizerInfo {
        bos_token: name(vocab.bos),
        eos_token: name(vocab.eos),
        pad_token: None,
        add_bos_token: vocab.add_bos,
        chat_template: model.chat.source().to_string(),
        model_max_length: model.context_length(),
        vocab_size: vocab.size(),
    }))
}

/// 200 once the model is loaded, 503 before.
pub async fn health(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    state.engine()?;
    Ok(Json(Health { status: "ok" }))
}

pub async fn tokenize(
    State(state): State<AppState>,
    body: JsonBody,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let engine = state.engine()?;
    let request: TokenizeRequest = body.parse()?;
    let model = validate::model(engine, request.model.as_deref())?;
    let tokens = match (request.prompt, request.messages) {
        (Some(prompt), None) => model
            .vocab
            .encode(&prompt, request.add_special_tokens.unwrap_or(true))
            .map_err(|e| ApiError::invalid("prompt", format!("{e:#}")))?,
        (None, Some(messages)) => validate::chat_prompt(model, messages)?,
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "messages",
                "give `prompt` or `messages`, not both",
            ))
        }
        (None, None) => return Err(ApiError::missing("prompt")),
    };
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        tokens,
        max_model_len: model.context_length(),
    }))
}

pub async fn detokenize(
    State(state): State<AppState>,
    body: JsonBody,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let engine = state.engine()?;
    let request: DetokenizeRequest = body.parse()?;
    let model = validate::model(engine, request.model.as_deref())?;
    let size = model.vocab.size();
    let tokens = request
        .tokens
        .ok_or_else(|| ApiError::missing("tokens"))?
        .into_iter()
        .map(|t| {
            u32::try_from(t)
                .ok()
                .filter(|&id| (id as usize) < size)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "tokens",
                        format!("{t} is not a token id: ids are 0 to {}", size - 1),
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(DetokenizeResponse {
        prompt: model.vocab.decode_with_special(&tokens),
    }))
}

/// Prometheus text; the load gauges are sampled now.
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    if let Ok(engine) = state.engine() {
        metrics::sample_load(engine);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::route_not_found(uri.path())
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}
