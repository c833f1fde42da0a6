//! Structured output end to end: `response_format` keeps every answer inside a JSON schema under
//! every decoder that takes it, and says why in a 400 where a decoder cannot.

use serde_json::{json, Value};

use crate::cases;
use crate::server::{decoder, Client};

pub fn cases() -> Vec<(&'static str, crate::Case)> {
    cases![
        answers_validate_against_the_schema_under_each_decoder,
        an_enum_forces_one_of_its_values,
        json_object_and_completions_take_it_too,
        a_lark_grammar_shapes_free_text,
        a_short_budget_ends_with_length,
        bad_formats_are_400s,
    ]
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "mood": {"type": "string", "enum": ["happy", "calm", "tired"]}
        },
        "required": ["name", "age", "mood"],
        "additionalProperties": false
    })
}

fn format(schema: &Value) -> Value {
    json!({"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": true}})
}

/// Every choice's content parses and validates against `schema`.
fn valid(reply: &Value, schema: &Value, what: &str) {
    let validator = jsonschema::validator_for(schema).unwrap();
    for c in reply["choices"].as_array().unwrap() {
        let text = c["message"]["content"]
            .as_str()
            .or(c["text"].as_str())
            .unwrap();
        assert_eq!(c["finish_reason"], "stop", "{what}: {text:?}");
        let value: Value = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("{what}: {text:?} is not JSON: {e}"));
        assert!(
            validator.is_valid(&value),
            "{what}: {text} breaks the schema"
        );
    }
}

async fn answers_validate_against_the_schema_under_each_decoder(c: Client) {
    let schema = person_schema();
    let messages = json!([{"role": "user", "content": "Invent a person and describe them."}]);
    let cases = [
        ("sample", json!({"decoder": "sample"}), 3),
        (
            "genarm",
            decoder("genarm", json!({"rewards": {"positive": 1.0}})),
            2,
        ),
        (
            "best_of_n",
            decoder("best_of_n", json!({"n": 3, "rewards": {"positive": 1}})),
            1,
        ),
        (
            "args",
            decoder("args", json!({"rewards": {"sentiment": 1}, "top_k": 4})),
            1,
        ),
        (
            "deal",
            decoder(
                "deal",
                json!({"rewards": {"sentiment": 1}, "top_k": 3, "beam_width": 2, "lookahead": 4}),
            ),
            1,
        ),
        ("equilibrium", decoder("equilibrium", json!({"n": 3})), 1),
        ("adaptive", decoder("adaptive", json!({})), 1),
    ];
    for (what, alignment, n) in cases {
        let body = json!({"messages": messages, "max_tokens": 80, "temperature": 0.8, "seed": 5,
                          "n": n, "response_format": format(&schema), "alignment": alignment});
        let r = c.ok("/v1/chat/completions", &body).await;
        valid(&r, &schema, what);
    }
}

async fn an_enum_forces_one_of_its_values(c: Client) {
    let schema = json!({"type": "object", "properties": {"answer": {"enum": ["maybe", "certainly not"]}},
                        "required": ["answer"], "additionalProperties": false});
    let body = json!({"messages": [{"role": "user", "content": "Is the sky green? Answer yes or no."}],
                      "max_tokens": 24, "temperature": 1.0, "seed": 2, "n": 4,
                      "response_format": format(&schema)});
    let r = c.ok("/v1/chat/completions", &body).await;
    valid(&r, &schema, "enum");
    for choice in r["choices"].as_array().unwrap() {
        let v: Value =
            serde_json::from_str(choice["message"]["content"].as_str().unwrap()).unwrap();
        assert!(
            ["maybe", "certainly not"].contains(&v["answer"].as_str().unwrap()),
            "{v}"
        );
    }
}

async fn json_object_and_completions_take_it_too(c: Client) {
    let r = c
        .ok(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "Give a JSON object with the keys name and age of a fictional person."}],
            "max_tokens": 100, "temperature": 0, "response_format": {"type": "json_object"}}),
        )
        .await;
    valid(&r, &json!({"type": "object"}), "json_object");
    let schema =
        json!({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4});
    let r = c
        .ok(
            "/v1/completions",
            &json!({"prompt": "Some numbers:", "max_tokens": 40, "temperature": 0,
            "response_format": format(&schema)}),
        )
        .await;
    valid(&r, &schema, "completions");
}

/// A budget that ends inside the value: the choice ends with `length`, its text a prefix.
async fn a_short_budget_ends_with_length(c: Client) {
    let r = c
        .ok(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "Invent a person."}],
            "max_tokens": 4, "temperature": 0, "response_format": format(&person_schema())}),
        )
        .await;
    let choice = &r["choices"][0];
    assert_eq!(choice["finish_reason"], "length");
    let text = choice["message"]["content"].as_str().unwrap();
    assert!(text.starts_with('{'), "{text:?}");
    assert!(serde_json::from_str::<Value>(text).is_err());
}

async fn bad_formats_are_400s(c: Client) {
    let messages = json!([{"role": "user", "content": "Hi"}]);
    let cases = [
        (json!({"type": "xml"}), None, "response_format.type"),
        (
            json!({"type": "json_schema"}),
            None,
            "response_format.json_schema.schema",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}),
            None,
            "response_format.json_schema.schema",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}),
            None,
            "response_format.json_schema.schema",
        ),
        (
            format(&person_schema()),
            Some(decoder(
                "equilibrium",
                json!({"candidates": ["Paris", "Rome"]}),
            )),
            "response_format",
        ),
    ];
    for (format, alignment, param) in cases {
        let mut body = json!({"messages": messages, "max_tokens": 4, "response_format": format});
        if let Some(a) = alignment {
            body["alignment"] = a;
        }
        let r = c.post("/v1/chat/completions", &body).await;
        assert_eq!(r.status, 400, "{body}: {:?}", r.body);
        assert_eq!(r.body["error"]["param"], param, "{body}: {:?}", r.body);
    }
}

/// tilt's `grammar` type: a Lark grammar, here a date.
async fn a_lark_grammar_shapes_free_text(c: Client) {
    let grammar = r#"start: year "-" month "-" day
year: /20[0-9][0-9]/
month: /0[1-9]|1[0-2]/
day: /0[1-9]|[12][0-9]|3[01]/"#;
    let r = c
        .ok("/v1/completions", &json!({"prompt": "The date of the meeting is", "max_tokens": 16,
            "temperature": 0.9, "seed": 1, "n": 3, "response_format": {"type": "grammar", "grammar": grammar}}))
        .await;
    let date = regex::Regex::new(r"^20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$").unwrap();
    for choice in r["choices"].as_array().unwrap() {
        let text = choice["text"].as_str().unwrap();
        assert!(date.is_match(text), "{text:?}");
        assert_eq!(choice["finish_reason"], "stop");
    }
    let r = c
        .post(
            "/v1/completions",
            &json!({"prompt": "x", "max_tokens": 4,
            "response_format": {"type": "grammar", "grammar": "start: undefined_rule"}}),
        )
        .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.body["error"]["param"], "response_format.grammar");
}
