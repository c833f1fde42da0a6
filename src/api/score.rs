//! `POST /v1/score` (tilt's own): given a prompt and responses, the base's log-likelihood of each
//! and each requested reward source's score — a reward model's Σ log π_r (relative to the base's
//! for a LoRA ARM) with its per-token terms, a programmatic scorer's value — so the rewards that
//! steer decoding can also rank and filter outside it. The models read the responses through the
//! engine, batched with everything else.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use tokio::sync::oneshot;

use super::error::ApiError;
use super::json::JsonBody;
use super::validate::{self, Reading, ScoreJob};
use super::wire::{RewardScore, ScoreData, ScoreRequest, ScoreResponse, ScoreUsage};
use super::AppState;
use crate::decode::Likelihoods;
use crate::engine::{EngineError, Event};

pub async fn create(
    State(state): State<AppState>,
    body: JsonBody,
) -> Result<Json<ScoreResponse>, ApiError> {
    let engine = state.engine()?;
    let request: ScoreRequest = body.parse()?;
    let model = validate::model(engine, request.model.as_deref())?;
    let ScoreJob {
        prompts,
        responses,
        texts,
        rewards,
    } = validate::score(request, engine, model, &state.limits)?;
    let prompt_tokens = prompts[0].1.len();
    let (tx, rx) = oneshot::channel();
    let reader = Likelihoods::new(prompts, &responses, tx)
        .map_err(|e| ApiError::internal(format!("{e:#}")))?;
    // Dropped with this future (the client went away), the receiver cancels the work.
    let mut events = engine.submit(Box::new(reader))?;
    loop {
        match events.recv().await {
            Some(Event::Done { .. }) => break,
            Some(Event::Failed(e)) => return Err(e.into()),
            Some(_) => {}
            None => return Err(EngineError::Stopped.into()),
        }
    }
    let logprobs = rx
        .await
        .map_err(|_| ApiError::internal("the scores were not sent"))?;
    let sum = |lps: &[f32]| lps.iter().map(|&l| f64::from(l)).sum::<f64>();
    let data = (0..responses.len())
        .map(|i| {
            let base = &logprobs[0][i];
            let scores = rewards.iter().map(|(name, reading)| {
                let score = match reading {
                    Reading::Model(m) => {
                        // A relative reward model scores log π_r − log π_base, token by token.
                        let mut terms = logprobs[*m][i].clone();
                        if engine.models()[*m].relative {
                            for (t, b) in terms.iter_mut().zip(base) {
                                *t -= b;
                            }
                        }
                        RewardScore {
                            score: sum(&terms),
                            token_logprobs: Some(terms),
                        }
                    }
                    Reading::Text(scorer) => RewardScore {
                        score: f64::from(scorer.score(&texts[i])),
                        token_logprobs: None,
                    },
                };
                (name.clone(), score)
            });
            ScoreData {
                index: i,
                tokens: responses[i].len(),
                logprob: sum(base),
                token_logprobs: base.clone(),
                rewards: scores.collect::<BTreeMap<_, _>>(),
            }
        })
        .collect();
    let response_tokens = responses.iter().map(Vec::len).sum();
    Ok(Json(ScoreResponse {
        object: "score",
        model: model.name.clone(),
        data,
        usage: ScoreUsage {
            prompt_tokens,
            response_tokens,
            total_tokens: prompt_tokens + response_tokens,
        },
    }))
}
