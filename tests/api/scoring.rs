//! Scoring end to end: prompt log-probs (`echo` with `logprobs`, `max_tokens: 0`) as OpenAI's
//! legacy API defines them, and `/v1/score` for the base and reward sources.

use serde_json::{json, Value};

use crate::cases;
use crate::server::{decoder, Client};

const PATH: &str = "/v1/completions";

pub fn cases() -> Vec<(&'static str, crate::Case)> {
    cases![
        prompt_logprobs_are_the_generated_ones_teacher_forced,
        prompt_logprobs_for_lists_of_prompts_and_streams,
        max_tokens_zero_needs_echo,
        score_reads_responses_with_the_base_and_rewards,
        score_arm_values_are_what_best_of_n_ranks_by,
        score_requests_are_checked,
        tokenizer_info_describes_the_base_tokenizer,
    ]
}

fn floats(v: &Value) -> Vec<Option<f64>> {
    v.as_array().unwrap().iter().map(Value::as_f64).collect()
}

/// Greedy tokens after a prompt, with their logprobs, are the prompt log-probs of the prompt
/// extended by them: the decode steps and the prefill agree within int8 noise.
async fn prompt_logprobs_are_the_generated_ones_teacher_forced(c: Client) {
    let prompt = "The three primary colours are";
    let ids = c.tokens(prompt).await;
    let generated = c
        .ok(PATH, &json!({"prompt": ids, "max_tokens": 8, "temperature": 0, "logprobs": 2, "ignore_eos": true}))
        .await;
    let lp = &generated["choices"][0]["logprobs"];
    let gen_lps = floats(&lp["token_logprobs"]);
    assert_eq!(gen_lps.len(), 8);
    // The generated tokens' ids: the answer retokenised (checked to give them back).
    let full_text = format!(
        "{prompt}{}",
        generated["choices"][0]["text"].as_str().unwrap()
    );
    let full = c.tokens(&full_text).await;
    let scored = c
        .ok(
            PATH,
            &json!({"prompt": full, "max_tokens": 0, "echo": true, "logprobs": 2}),
        )
        .await;
    let choice = &scored["choices"][0];
    assert_eq!(choice["text"], full_text);
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(scored["usage"]["completion_tokens"], 0);
    assert_eq!(scored["usage"]["prompt_tokens"], full.len());
    let echo = &choice["logprobs"];
    let lps = floats(&echo["token_logprobs"]);
    assert_eq!(lps.len(), full.len());
    assert_eq!(lps[0], None, "the first prompt token follows nothing");
    assert!(echo["top_logprobs"][0].is_null());
    assert!(lps[1..].iter().all(|l| l.is_some_and(|l| l <= 0.0)));
    // Offsets walk the echoed text.
    let offsets: Vec<u64> = echo["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
    let tokens: Vec<&str> = echo["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.concat(), full_text);
    assert_eq!(
        full.len(),
        ids.len() + 8,
        "the text retokenises to other tokens"
    );
    {
        for (i, (g, p)) in gen_lps.iter().zip(&lps[ids.len()..]).enumerate() {
            let (g, p) = (g.unwrap(), p.unwrap());
            assert!(
                (g - p).abs() < 0.05,
                "token {i}: generated {g} vs prompt {p}"
            );
        }
        // Greedy tokens top their alternatives.
        for (i, top) in echo["top_logprobs"].as_array().unwrap()[ids.len()..]
            .iter()
            .enumerate()
        {
            let best = top
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_f64().unwrap())
                .fold(f64::MIN, f64::max);
            assert_eq!(Some(best), lps[ids.len() + i], "token {i}");
        }
    }
    // Generating after scoring: the prompt's entries, then the generated token's.
    let both = c
        .ok(
            PATH,
            &json!({"prompt": ids, "max_tokens": 1, "echo": true, "logprobs": 1, "temperature": 0}),
        )
        .await;
    let both_lps = floats(&both["choices"][0]["logprobs"]["token_logprobs"]);
    assert_eq!(both_lps.len(), ids.len() + 1);
    assert_eq!(&both_lps[..ids.len()], &lps[..ids.len()]);
}

async fn prompt_logprobs_for_lists_of_prompts_and_streams(c: Client) {
    let a = c.tokens("Cats are").await;
    let b = c.tokens("The ocean is deep and").await;
    let one = |p: &Vec<u64>| json!({"prompt": p, "max_tokens": 0, "echo": true, "logprobs": 1});
    let alone_a = c.ok(PATH, &one(&a)).await;
    let alone_b = c.ok(PATH, &one(&b)).await;
    let both = c
        .ok(
            PATH,
            &json!({"prompt": [a, b], "max_tokens": 0, "echo": true, "logprobs": 1, "n": 2}),
        )
        .await;
    let choices = both["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for (i, alone) in [&alone_a, &alone_a, &alone_b, &alone_b]
        .into_iter()
        .enumerate()
    {
        let got = floats(&choices[i]["logprobs"]["token_logprobs"]);
        let want = floats(&alone["choices"][0]["logprobs"]["token_logprobs"]);
        assert_eq!(got.len(), want.len(), "choice {i}");
        for (g, w) in got.iter().zip(&want).skip(1) {
            assert!(
                (g.unwrap() - w.unwrap()).abs() < 1e-3,
                "choice {i}: {g:?} vs {w:?}"
            );
        }
        assert_eq!(choices[i]["text"], alone["choices"][0]["text"]);
    }
    // Streamed, each choice's first chunk is its echoed prompt with the prompt's log-probs.
    let events = c
        .stream(PATH, &json!({"prompt": "Cats are", "max_tokens": 3, "echo": true, "logprobs": 1, "temperature": 0, "stream": true}))
        .await;
    let first = &events[0]["choices"][0];
    assert_eq!(first["text"], "Cats are");
    assert_eq!(
        floats(&first["logprobs"]["token_logprobs"]),
        floats(&alone_a["choices"][0]["logprobs"]["token_logprobs"])
    );
}

async fn max_tokens_zero_needs_echo(c: Client) {
    let r = c
        .post(PATH, &json!({"prompt": "Hi there", "max_tokens": 0}))
        .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.body["error"]["param"], "max_tokens");
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("echo"));
    // With echo and no logprobs: the prompt comes back, nothing is generated.
    let r = c
        .ok(
            PATH,
            &json!({"prompt": "Hi there", "max_tokens": 0, "echo": true}),
        )
        .await;
    assert_eq!(r["choices"][0]["text"], "Hi there");
    assert!(r["choices"][0]["logprobs"].is_null());
    assert_eq!(r["usage"]["completion_tokens"], 0);
    // Any decoder: nothing is decoded.
    let alignment = decoder("best_of_n", json!({"n": 2, "rewards": {"sentiment": 1}}));
    let r = c
        .ok(PATH, &json!({"prompt": "Hi there", "max_tokens": 0, "echo": true, "logprobs": 0, "alignment": alignment}))
        .await;
    assert_eq!(
        floats(&r["choices"][0]["logprobs"]["token_logprobs"]).len(),
        c.tokens("Hi there").await.len()
    );
    // Chat has no echo: 0 stays a 400.
    let r = c
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0}),
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"]["param"], "max_tokens");
}

async fn score_reads_responses_with_the_base_and_rewards(c: Client) {
    let prompt = "My favourite season is";
    let responses = [
        " summer: warm, happy and wonderful.",
        " winter: cold, sad and awful.",
    ];
    let r = c
        .ok("/v1/score", &json!({"prompt": prompt, "responses": responses, "rewards": ["sentiment", "positive"]}))
        .await;
    assert_eq!(r["object"], "score");
    let data = r["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for (i, d) in data.iter().enumerate() {
        let tokens = d["tokens"].as_u64().unwrap() as usize;
        let per_token = floats(&d["token_logprobs"]);
        assert_eq!(per_token.len(), tokens);
        let sum: f64 = per_token.iter().map(|l| l.unwrap()).sum();
        assert!((sum - d["logprob"].as_f64().unwrap()).abs() < 1e-3);
        // The base's log-likelihood is what the echoed prompt reports for those tokens.
        let full = c.tokens(&format!("{prompt}{}", responses[i])).await;
        let echoed = c
            .ok(
                PATH,
                &json!({"prompt": full, "max_tokens": 0, "echo": true, "logprobs": 0}),
            )
            .await;
        let echo = floats(&echoed["choices"][0]["logprobs"]["token_logprobs"]);
        assert_eq!(full.len(), c.tokens(prompt).await.len() + tokens);
        for (a, b) in echo[full.len() - tokens..].iter().zip(&per_token) {
            assert!((a.unwrap() - b.unwrap()).abs() < 0.05, "{a:?} vs {b:?}");
        }
        let arm = &d["rewards"]["positive"];
        assert_eq!(floats(&arm["token_logprobs"]).len(), tokens);
        assert!(d["rewards"]["sentiment"]["token_logprobs"].is_null());
    }
    // The lexicon prefers the warm answer.
    assert!(
        data[0]["rewards"]["sentiment"]["score"].as_f64()
            > data[1]["rewards"]["sentiment"]["score"].as_f64()
    );
    assert_eq!(r["usage"]["prompt_tokens"], c.tokens(prompt).await.len());
    // Messages read through each model's chat template; token-id responses as given.
    let ids = c.tokens(" yes").await;
    let r = c
        .ok("/v1/score", &json!({"messages": [{"role": "user", "content": "Is water wet?"}], "responses": [ids], "eos": true}))
        .await;
    assert_eq!(r["data"][0]["tokens"], ids.len() + 1);
}

/// The score endpoint's reward-model values are best-of-N's: the same Σ log π_r of the same tokens
/// (which best-of-N reads as the candidates sample, in the steps that feed the base; guided by
/// the same ARM, the ranking ARM's rows are copies of the guide's).
async fn score_arm_values_are_what_best_of_n_ranks_by(c: Client) {
    let prompt = "Write one sentence about your weekend:";
    for guide in [None, Some(json!({"rewards": {"positive": 1}}))] {
        let mut params = json!({"n": 4, "rewards": {"positive": 1}, "return_candidates": true});
        if let Some(guide) = guide {
            params["guide"] = guide;
        }
        let alignment = decoder("best_of_n", params);
        let r = c
            .ok(PATH, &json!({"prompt": prompt, "max_tokens": 10, "seed": 3, "ignore_eos": true, "alignment": alignment}))
            .await;
        let mut compared = 0;
        for cand in r["alignment"]["candidates"].as_array().unwrap() {
            let text = cand["text"].as_str().unwrap();
            let ids = c.tokens_with(text, false).await;
            if ids.len() != cand["tokens"].as_u64().unwrap() as usize {
                continue; // the text does not give back its tokens (e.g. an end token in it)
            }
            let s = c
                .ok(
                    "/v1/score",
                    &json!({"prompt": prompt, "responses": [ids], "rewards": ["positive"]}),
                )
                .await;
            let got = s["data"][0]["rewards"]["positive"]["score"]
                .as_f64()
                .unwrap();
            let want = cand["scores"]["positive"].as_f64().unwrap();
            assert!(
                (got - want).abs() < 0.01 * want.abs().max(1.0),
                "{text:?}: score {got} vs best_of_n {want}"
            );
            compared += 1;
        }
        assert!(
            compared >= 2,
            "too few candidates retokenise to themselves: {r}"
        );
    }
}

async fn score_requests_are_checked(c: Client) {
    let cases = [
        (json!({"responses": ["a"]}), "prompt"),
        (
            json!({"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}], "responses": ["a"]}),
            "messages",
        ),
        (json!({"prompt": ["a", "b"], "responses": ["a"]}), "prompt"),
        (json!({"prompt": "Hi"}), "responses"),
        (json!({"prompt": "Hi", "responses": []}), "responses"),
        (json!({"prompt": "Hi", "responses": [""]}), "responses[0]"),
        (
            json!({"prompt": "Hi", "responses": [[999999]]}),
            "responses[0]",
        ),
        (
            json!({"prompt": "Hi", "responses": ["a"], "rewards": ["nope"]}),
            "rewards",
        ),
        (
            json!({"prompt": "Hi", "responses": ["a"], "rewards": ["positive", "positive"]}),
            "rewards",
        ),
    ];
    for (body, param) in cases {
        let r = c.post("/v1/score", &body).await;
        assert_eq!(r.status, 400, "{body}: {:?}", r.body);
        assert_eq!(r.body["error"]["param"], param, "{body}: {:?}", r.body);
    }
    // A field the endpoint does not know is a mistake, not ignored.
    let r = c
        .post(
            "/v1/score",
            &json!({"prompt": "Hi", "responses": ["a"], "bogus": 1}),
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("bogus"),
        "{:?}",
        r.body
    );
}

/// What remote tokenizers (lm-evaluation-harness's `tokenizer_backend=remote`) read.
async fn tokenizer_info_describes_the_base_tokenizer(c: Client) {
    let info = c.get("/tokenizer_info").await.body;
    let eos = info["eos_token"]
        .as_str()
        .expect("the base has an end token");
    // The end token's text tokenizes to itself, one token.
    let ids = c.tokens_with(eos, false).await;
    assert_eq!(ids.len(), 1, "{eos}: {ids:?}");
    let models = c.get("/v1/models").await.body;
    assert_eq!(
        info["model_max_length"],
        models["data"][0]["context_length"]
    );
    assert!(info["chat_template"].as_str().unwrap().contains("messages"));
    assert!(info["vocab_size"].as_u64().unwrap() > 1000);
}
