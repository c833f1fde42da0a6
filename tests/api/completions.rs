//! `/v1/completions` end to end.

use serde_json::{json, Value};

use crate::cases;
use crate::server::Client;

const PATH: &str = "/v1/completions";

pub fn cases() -> Vec<(&'static str, crate::Case)> {
    cases![
        greedy_completion_reports_usage_and_alignment,
        stream_concatenates_to_the_same_text,
        seed_makes_sampling_repeatable,
        several_prompts_and_n_number_choices_prompt_major,
        stop_string_ends_the_choice_before_it,
        logprobs_describe_each_token,
        echo_puts_the_prompt_first,
        token_id_prompt_equals_text_prompt,
        ignore_eos_generates_exactly_max_tokens,
        logit_bias_forces_a_token,
        extensions_and_unknown_fields_are_accepted,
        a_timeout_ends_the_answer_with_what_it_has,
    ]
}

fn text(body: &Value, choice: usize) -> &str {
    body["choices"][choice]["text"].as_str().unwrap()
}

/// The text and finish reasons of a stream, by choice.
fn streamed(events: &[Value], choices: usize) -> (Vec<String>, Vec<Option<String>>) {
    let mut texts = vec![String::new(); choices];
    let mut reasons = vec![None; choices];
    for e in &events[..events.len() - 1] {
        for c in e["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            texts[i].push_str(c["text"].as_str().unwrap());
            if let Some(r) = c["finish_reason"].as_str() {
                assert!(reasons[i].is_none(), "choice {i} finished twice");
                reasons[i] = Some(r.to_string());
            }
        }
    }
    (texts, reasons)
}

async fn greedy_completion_reports_usage_and_alignment(c: Client) {
    let prompt = "The capital of France is";
    let body = c
        .ok(
            PATH,
            &json!({"prompt": prompt, "max_tokens": 6, "temperature": 0}),
        )
        .await;
    let models = c.get("/v1/models").await.body;
    assert_eq!(body["model"], models["data"][0]["id"]);
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"].as_array().unwrap().len(), 1);
    assert!(!text(&body, 0).is_empty());
    let usage = &body["usage"];
    assert_eq!(usage["prompt_tokens"], c.tokens(prompt).await.len());
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=6).contains(&completion));
    if completion < 6 {
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
    } else {
        assert_eq!(body["choices"][0]["finish_reason"], "length");
    }
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["prompt_tokens"].as_u64().unwrap() + completion)
    );
    assert_eq!(body["alignment"], json!({"decoder": "sample"}));
}

async fn stream_concatenates_to_the_same_text(c: Client) {
    let request = json!({"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0});
    let whole = c.ok(PATH, &request).await;
    let mut streaming = request.clone();
    streaming["stream"] = json!(true);
    let events = c.stream(PATH, &streaming).await;
    let (texts, reasons) = streamed(&events, 1);
    assert_eq!(texts[0], text(&whole, 0));
    assert_eq!(
        reasons[0].as_deref(),
        whole["choices"][0]["finish_reason"].as_str()
    );
    assert!(
        events.iter().all(|e| e.get("usage").is_none()),
        "usage only when asked"
    );
    let finish = &events[events.len() - 2];
    assert_eq!(
        finish["alignment"]["decoder"], "sample",
        "the last chunk carries the report"
    );

    streaming["stream_options"] = json!({"include_usage": true});
    let events = c.stream(PATH, &streaming).await;
    let usage = &events[events.len() - 2];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], whole["usage"]);
    assert_eq!(
        events.iter().filter(|e| e.get("usage").is_some()).count(),
        1
    );
}

async fn seed_makes_sampling_repeatable(c: Client) {
    let request = json!({"prompt": "My favourite animal is", "max_tokens": 16, "temperature": 1.0, "seed": 1234, "n": 2});
    let a = c.ok(PATH, &request).await;
    let b = c.ok(PATH, &request).await;
    assert_eq!(a["choices"], b["choices"]);
    let mut streaming = request.clone();
    streaming["stream"] = json!(true);
    let (texts, _) = streamed(&c.stream(PATH, &streaming).await, 2);
    assert_eq!(texts, [text(&a, 0), text(&a, 1)]);
}

async fn several_prompts_and_n_number_choices_prompt_major(c: Client) {
    let prompts = ["One, two,", "Red, green,"];
    let body = c
        .ok(
            PATH,
            &json!({"prompt": prompts, "n": 2, "max_tokens": 3, "temperature": 0}),
        )
        .await;
    let choices = body["choices"].as_array().unwrap();
    let indices: Vec<u64> = choices
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, [0, 1, 2, 3]);
    // Greedy: both choices of a prompt agree, and match that prompt asked alone.
    for (p, prompt) in prompts.iter().enumerate() {
        let alone = c
            .ok(
                PATH,
                &json!({"prompt": prompt, "max_tokens": 3, "temperature": 0}),
            )
            .await;
        assert_eq!(text(&body, 2 * p), text(&alone, 0));
        assert_eq!(text(&body, 2 * p + 1), text(&alone, 0));
    }
    let mut prompt_tokens = 0;
    for p in prompts {
        prompt_tokens += c.tokens(p).await.len();
    }
    assert_eq!(body["usage"]["prompt_tokens"], prompt_tokens);
    assert_eq!(body["usage"]["completion_tokens"], 12);
}

async fn stop_string_ends_the_choice_before_it(c: Client) {
    let request = json!({"prompt": "The days of the week are Monday,", "max_tokens": 24, "temperature": 0, "ignore_eos": true});
    let free = c.ok(PATH, &request).await;
    let full = text(&free, 0);
    // A stop string taken from the middle of the free-running text.
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 12, "{full:?}");
    let stop: String = chars[8..11].iter().collect();
    let expected = &full[..full.find(&stop).unwrap()];
    let mut stopped = request.clone();
    stopped["stop"] = json!(["\u{1}never", stop]);
    let body = c.ok(PATH, &stopped).await;
    assert_eq!(text(&body, 0), expected);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    stopped["stream"] = json!(true);
    let (texts, reasons) = streamed(&c.stream(PATH, &stopped).await, 1);
    assert_eq!(texts[0], expected);
    assert_eq!(reasons[0].as_deref(), Some("stop"));
}

async fn logprobs_describe_each_token(c: Client) {
    let body = c
        .ok(PATH, &json!({"prompt": "1, 2, 3, 4,", "max_tokens": 6, "temperature": 0, "logprobs": 3, "ignore_eos": true}))
        .await;
    let lp = &body["choices"][0]["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.len(), 6);
    assert_eq!(tokens.concat(), text(&body, 0));
    let mut offset = 0;
    for (i, token) in tokens.iter().enumerate() {
        assert_eq!(lp["text_offset"][i], offset);
        offset += token.chars().count();
        let chosen = lp["token_logprobs"][i].as_f64().unwrap();
        let top = lp["top_logprobs"][i].as_object().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely alternative.
        let best = top
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!((chosen - best).abs() < 1e-4, "{chosen} vs {best}");
        assert!(top.contains_key(*token));
        assert!(chosen <= 0.0);
    }
    let plain = c
        .ok(
            PATH,
            &json!({"prompt": "1, 2, 3, 4,", "max_tokens": 2, "temperature": 0}),
        )
        .await;
    assert_eq!(plain["choices"][0]["logprobs"], Value::Null);
}

async fn echo_puts_the_prompt_first(c: Client) {
    let prompt = "Roses are red,";
    let plain = c
        .ok(
            PATH,
            &json!({"prompt": prompt, "max_tokens": 4, "temperature": 0}),
        )
        .await;
    let echoed = c
        .ok(
            PATH,
            &json!({"prompt": prompt, "max_tokens": 4, "temperature": 0, "echo": true}),
        )
        .await;
    assert_eq!(text(&echoed, 0), format!("{prompt}{}", text(&plain, 0)));
    let events = c
        .stream(PATH, &json!({"prompt": prompt, "max_tokens": 4, "temperature": 0, "echo": true, "stream": true}))
        .await;
    assert_eq!(streamed(&events, 1).0[0], text(&echoed, 0));
}

async fn token_id_prompt_equals_text_prompt(c: Client) {
    let prompt = "Water boils at";
    let ids = c.tokens(prompt).await;
    let request = |p: Value| json!({"prompt": p, "max_tokens": 5, "temperature": 0});
    let by_text = c.ok(PATH, &request(json!(prompt))).await;
    let by_ids = c.ok(PATH, &request(json!(ids))).await;
    let by_lists = c.ok(PATH, &request(json!([ids, ids]))).await;
    assert_eq!(text(&by_ids, 0), text(&by_text, 0));
    assert_eq!(text(&by_lists, 1), text(&by_text, 0));
    assert_eq!(by_ids["usage"], by_text["usage"]);
}

async fn ignore_eos_generates_exactly_max_tokens(c: Client) {
    let body = c
        .ok(
            PATH,
            &json!({"prompt": "Hi", "max_tokens": 40, "temperature": 0, "ignore_eos": true}),
        )
        .await;
    assert_eq!(body["usage"]["completion_tokens"], 40);
    assert_eq!(body["choices"][0]["finish_reason"], "length");
}

async fn logit_bias_forces_a_token(c: Client) {
    let banana = c.tokens(" banana").await[0];
    let body = c
        .ok(PATH, &json!({"prompt": "I like", "max_tokens": 4, "temperature": 0, "logit_bias": {banana.to_string(): 100}, "ignore_eos": true}))
        .await;
    let piece = c.ok("/detokenize", &json!({"tokens": [banana]})).await["prompt"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(text(&body, 0), piece.repeat(4));
}

async fn extensions_and_unknown_fields_are_accepted(c: Client) {
    let body = c
        .ok(
            PATH,
            &json!({
                "prompt": "Hello", "max_tokens": 3, "temperature": 0.8, "top_p": 0.9, "top_k": 40,
                "min_p": 0.05, "repetition_penalty": 1.1, "presence_penalty": 0.5,
                "frequency_penalty": 0.5, "seed": -7, "user": "someone", "best_of": 1,
                "suffix": "", "stop": "\n\n", "stream": false, "some_future_field": {"x": [1]},
                "alignment": {"decoder": "sample"}
            }),
        )
        .await;
    assert_eq!(
        body["usage"]["completion_tokens"].as_u64().map(|n| n <= 3),
        Some(true)
    );
}

async fn a_timeout_ends_the_answer_with_what_it_has(c: Client) {
    // Thousands of tokens cannot be written in a fifth of a second: the deadline ends them.
    let body = json!({"prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": true,
                      "n": 2, "timeout": 0.2});
    let r = c.ok("/v1/completions", &body).await;
    assert_eq!(r["alignment"]["deadline_exceeded"], true, "{r}");
    for choice in r["choices"].as_array().unwrap() {
        assert_eq!(choice["finish_reason"], "length");
    }
    let written = r["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(written < 2 * 3000, "{r}");
    // Streamed: every choice ends, then the usage and [DONE].
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let events = c.stream("/v1/completions", &streamed).await;
    let ended = (events.iter())
        .filter(|e| e["choices"][0]["finish_reason"] == "length")
        .count();
    assert_eq!(ended, 2, "{events:?}");
    let usage = &events[events.len() - 2]["usage"];
    assert!(
        usage["completion_tokens"].as_u64().unwrap() < 2 * 3000,
        "{usage}"
    );
    // A request that finishes in time says nothing of a deadline.
    let quick = json!({"prompt": "Hi", "max_tokens": 2, "timeout": 60});
    let r = c.ok("/v1/completions", &quick).await;
    assert!(r["alignment"].get("deadline_exceeded").is_none(), "{r}");
}
