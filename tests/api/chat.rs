//! `/v1/chat/completions` end to end.

use serde_json::{json, Value};

use crate::cases;
use crate::server::Client;

const PATH: &str = "/v1/chat/completions";

pub fn cases() -> Vec<(&'static str, crate::Case)> {
    cases![
        chat_answers_as_the_assistant,
        stream_opens_with_the_role_and_matches_the_answer,
        n_choices_stream_independently,
        logprobs_list_every_token_with_bytes,
        content_parts_equal_joined_text,
        max_completion_tokens_is_an_alias,
        developer_role_reads_as_system,
    ]
}

fn user(content: &str) -> Value {
    json!([{"role": "user", "content": content}])
}

fn content(body: &Value, choice: usize) -> &str {
    body["choices"][choice]["message"]["content"]
        .as_str()
        .unwrap()
}

/// Per choice: whether the first chunk carried the role, the content, the finish reason.
fn streamed(events: &[Value], choices: usize) -> Vec<(bool, String, Option<String>)> {
    let mut out = vec![(false, String::new(), None); choices];
    let mut seen = vec![false; choices];
    for e in &events[..events.len() - 1] {
        for c in e["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            if !seen[i] {
                seen[i] = true;
                out[i].0 = c["delta"]["role"] == "assistant";
            } else {
                assert!(
                    c["delta"].get("role").is_none(),
                    "role only in the first chunk"
                );
            }
            if let Some(text) = c["delta"]["content"].as_str() {
                out[i].1.push_str(text);
            }
            if let Some(r) = c["finish_reason"].as_str() {
                assert!(out[i].2.is_none(), "choice {i} finished twice");
                out[i].2 = Some(r.to_string());
            }
        }
    }
    out
}

async fn chat_answers_as_the_assistant(c: Client) {
    let messages = user("What is the capital of France?");
    let body = c
        .ok(
            PATH,
            &json!({"messages": messages, "max_tokens": 24, "temperature": 0}),
        )
        .await;
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert!(!content(&body, 0).is_empty());
    assert!(["stop", "length"].contains(&body["choices"][0]["finish_reason"].as_str().unwrap()));
    let prompt = c.ok("/tokenize", &json!({"messages": messages})).await;
    assert_eq!(body["usage"]["prompt_tokens"], prompt["count"]);
    assert_eq!(body["alignment"]["decoder"], "sample");
}

async fn stream_opens_with_the_role_and_matches_the_answer(c: Client) {
    let request =
        json!({"messages": user("Name three colours."), "max_tokens": 16, "temperature": 0});
    let whole = c.ok(PATH, &request).await;
    let mut streaming = request.clone();
    streaming["stream"] = json!(true);
    streaming["stream_options"] = json!({"include_usage": true});
    let events = c.stream(PATH, &streaming).await;
    let (role, text, reason) = streamed(&events, 1).remove(0);
    assert!(role);
    assert_eq!(text, content(&whole, 0));
    assert_eq!(
        reason.as_deref(),
        whole["choices"][0]["finish_reason"].as_str()
    );
    let usage = &events[events.len() - 2];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], whole["usage"]);
    assert_eq!(events[events.len() - 3]["alignment"]["decoder"], "sample");
}

async fn n_choices_stream_independently(c: Client) {
    let request = json!({"messages": user("Tell me a story."), "max_tokens": 12, "temperature": 1.0, "seed": 99, "n": 2, "stream": true});
    let events = c.stream(PATH, &request).await;
    let choices = streamed(&events, 2);
    let mut whole_request = request.clone();
    whole_request["stream"] = json!(false);
    let whole = c.ok(PATH, &whole_request).await;
    for (i, (role, text, reason)) in choices.iter().enumerate() {
        assert!(role, "choice {i} opens with the role");
        assert!(reason.is_some(), "choice {i} finishes");
        assert_eq!(text, content(&whole, i));
    }
}

async fn logprobs_list_every_token_with_bytes(c: Client) {
    let body = c
        .ok(PATH, &json!({"messages": user("Say yes."), "max_tokens": 24, "temperature": 0, "logprobs": true, "top_logprobs": 2}))
        .await;
    let entries = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(
        Some(entries.len() as u64),
        body["usage"]["completion_tokens"].as_u64()
    );
    let mut bytes = Vec::new();
    for e in entries {
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        assert_eq!(
            top[0]["token"], e["token"],
            "greedy picks the most likely token"
        );
        assert!(top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64());
        bytes.extend(
            e["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8),
        );
    }
    assert_eq!(String::from_utf8(bytes).unwrap(), content(&body, 0));
    let without = c
        .ok(PATH, &json!({"messages": user("Hi"), "max_tokens": 2}))
        .await;
    assert_eq!(without["choices"][0]["logprobs"], Value::Null);
}

async fn content_parts_equal_joined_text(c: Client) {
    let parts = json!([{"role": "user", "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "hello"}]}]);
    let a = c
        .ok(
            PATH,
            &json!({"messages": parts, "max_tokens": 8, "temperature": 0}),
        )
        .await;
    let b = c
        .ok(
            PATH,
            &json!({"messages": user("Say\nhello"), "max_tokens": 8, "temperature": 0}),
        )
        .await;
    assert_eq!(content(&a, 0), content(&b, 0));
    assert_eq!(a["usage"], b["usage"]);
}

async fn max_completion_tokens_is_an_alias(c: Client) {
    let body = c
        .ok(PATH, &json!({"messages": user("Hi"), "max_completion_tokens": 3, "max_tokens": 50, "ignore_eos": true}))
        .await;
    assert_eq!(body["usage"]["completion_tokens"], 3);
    assert_eq!(body["choices"][0]["finish_reason"], "length");
}

async fn developer_role_reads_as_system(c: Client) {
    let prompt = |role: &str| json!({"messages": [{"role": role, "content": "Be brief."}, {"role": "user", "content": "Hi"}]});
    let developer = c.ok("/tokenize", &prompt("developer")).await;
    let system = c.ok("/tokenize", &prompt("system")).await;
    assert_eq!(developer["tokens"], system["tokens"]);
    c.ok(
        PATH,
        &json!({"messages": prompt("developer")["messages"], "max_tokens": 2}),
    )
    .await;
}
