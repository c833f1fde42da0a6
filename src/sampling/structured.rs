//! Structured output: a JSON schema compiled once per request (by llguidance, what llama.cpp and
//! vLLM use) into a grammar whose state every choice carries; before each draw the state gives
//! the tokens that keep the answer inside the grammar, and every other token's logit becomes −∞.
//! The state is cloned where a sequence forks (DeAL's beams and rollouts).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use crate::model::Vocab;

/// A compiled grammar: start a `Constraint` per choice from it.
#[derive(Clone)]
pub struct Grammar {
    /// The state before the first token, cloned for each choice.
    start: Arc<Mutex<Matcher>>,
    ends: Arc<Ends>,
}

/// The vocabulary's end-of-generation tokens, each of which ends an answer the grammar accepts,
/// and the one the grammar's own mask stands for them by.
struct Ends {
    tokens: Vec<u32>,
    eos: u32,
}

impl fmt::Debug for Grammar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Grammar")
    }
}

impl PartialEq for Grammar {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.start, &other.start)
    }
}

impl Grammar {
    /// Answers that are JSON values valid under `schema` (OpenAI's `json_schema`), written
    /// compactly: `, ` and `: ` between items, no other white space (a free choice of white
    /// space lets a small model wander off in new lines until it runs out of tokens); and
    /// objects hold only the properties their schema names, unless it says what else they
    /// may hold (any such answer is still valid under the schema; unnamed keys are where a
    /// small model rambles).
    pub fn json_schema(vocab: &Vocab, schema: &Value) -> Result<Self, String> {
        let Value::Object(fields) = schema else {
            return Err("the schema must be a JSON object".into());
        };
        let mut schema = fields.clone();
        close_objects(&mut schema);
        schema.entry("x-guidance").or_insert_with(
            || json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
        Self::compile(
            vocab,
            TopLevelGrammar::from_json_schema(Value::Object(schema)),
        )
    }

    /// Answers in the language of a Lark grammar (llguidance's dialect, which also reads most
    /// of llama.cpp's GBNF): tilt's `response_format` type `grammar`.
    pub fn lark(vocab: &Vocab, grammar: &str) -> Result<Self, String> {
        Self::compile(vocab, TopLevelGrammar::from_lark(grammar.to_string()))
    }

    /// Any JSON object (OpenAI's `json_object`).
    pub fn json_object(vocab: &Vocab) -> Self {
        Self::json_schema(vocab, &json!({"type": "object"})).expect("a fixed schema compiles")
    }

    fn compile(vocab: &Vocab, grammar: TopLevelGrammar) -> Result<Self, String> {
        let factory = factory(vocab)?;
        let parser = factory
            .create_parser(grammar)
            .map_err(|e| format!("{e:#}"))?;
        let mut start = Matcher::new(Ok(parser));
        if let Some(e) = start.get_error() {
            return Err(e);
        }
        // Compiling is lazy in places: the first mask finds what is left.
        start.compute_mask().map_err(|e| format!("{e:#}"))?;
        let ends = Ends {
            tokens: vocab.end_of_generation.iter().copied().collect(),
            eos: factory.tok_env().tok_trie().eos_token(),
        };
        Ok(Self {
            start: Arc::new(Mutex::new(start)),
            ends: Arc::new(ends),
        })
    }

    /// A fresh state, before an answer's first token.
    pub fn start(&self) -> Constraint {
        let start = self.start.lock().unwrap_or_else(|e| e.into_inner());
        Constraint {
            matcher: start.deep_clone(),
            ends: self.ends.clone(),
        }
    }
}

/// One answer's place in its grammar.
pub struct Constraint {
    matcher: Matcher,
    ends: Arc<Ends>,
}

impl Clone for Constraint {
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
            ends: self.ends.clone(),
        }
    }
}

impl Constraint {
    /// Set every token the grammar does not allow next to −∞; an end-of-generation token is
    /// allowed once the answer is complete (and only then: nothing may follow it).
    pub fn mask(&mut self, logits: &mut [f32]) {
        let Ok(allowed) = self.matcher.compute_mask_or_eos() else {
            // An error state (a token the grammar refused was forced in): only ending is left.
            return self.only_ends(logits);
        };
        let ending = allowed.is_allowed(self.ends.eos);
        for (t, x) in logits.iter_mut().enumerate() {
            let t = t as u32;
            if !(allowed.is_allowed(t) || ending && self.ends.tokens.contains(&t)) {
                *x = f32::NEG_INFINITY;
            }
        }
    }

    fn only_ends(&self, logits: &mut [f32]) {
        for (t, x) in logits.iter_mut().enumerate() {
            if !self.ends.tokens.contains(&(t as u32)) {
                *x = f32::NEG_INFINITY;
            }
        }
    }

    /// Advance past `token` (an end-of-generation token ends the answer and changes nothing).
    pub fn commit(&mut self, token: u32) {
        if self.ends.tokens.contains(&token) {
            return;
        }
        // A refused token leaves the state in error: `mask` then allows only ending.
        let _ = self.matcher.consume_token(token);
    }
}

/// Give every object schema in `schema` that names its properties and says nothing of others
/// `additionalProperties: false`, walking only the keywords that hold schemas.
fn close_objects(schema: &mut serde_json::Map<String, Value>) {
    if schema.contains_key("properties") && !schema.contains_key("additionalProperties") {
        schema.insert("additionalProperties".into(), Value::Bool(false));
    }
    let each = |v: &mut Value| {
        if let Value::Object(s) = v {
            close_objects(s);
        }
    };
    for (key, value) in schema.iter_mut() {
        match (key.as_str(), value) {
            ("properties" | "patternProperties" | "$defs" | "definitions", Value::Object(map)) => {
                map.values_mut().for_each(each)
            }
            ("anyOf" | "oneOf" | "allOf" | "prefixItems", Value::Array(list)) => {
                list.iter_mut().for_each(each)
            }
            ("items" | "additionalProperties" | "not" | "if" | "then" | "else" | "contains", v) => {
                each(v)
            }
            _ => {}
        }
    }
}

/// The parser factory of a vocabulary: its token trie and the precomputed slices that make
/// masks fast, built once per vocabulary (some hundreds of ms for ~50,000 tokens).
fn factory(vocab: &Vocab) -> Result<Arc<ParserFactory>, String> {
    static FACTORIES: OnceLock<Mutex<HashMap<String, Arc<ParserFactory>>>> = OnceLock::new();
    let mut factories = FACTORIES
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(f) = factories.get(&vocab.digest) {
        return Ok(f.clone());
    }
    let words: Vec<Vec<u8>> = (0..vocab.size() as u32)
        .map(|t| match vocab.bytes(t) {
            // Control tokens have no bytes: the trie knows them by name, behind its marker.
            [] => [&[TokTrie::SPECIAL_TOKEN_MARKER], vocab.text(t).as_bytes()].concat(),
            bytes => bytes.to_vec(),
        })
        .collect();
    let eos = vocab
        .eos
        .or_else(|| vocab.end_of_generation.iter().min().copied())
        .unwrap_or(0);
    let mut info = TokRxInfo::new(vocab.size() as u32, eos);
    info.tok_bos = vocab.bos;
    let trie = TokTrie::from(&info, &words);
    let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
    let mut factory = ParserFactory::new_simple(&env).map_err(|e| format!("{e:#}"))?;
    factory.quiet();
    let factory = Arc::new(factory);
    factories.insert(vocab.digest.clone(), factory.clone());
    Ok(factory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_closed_where_the_schema_is_silent_and_only_there() {
        let mut schema = json!({
            "type": "object",
            "properties": {
                "pet": {"type": "object", "properties": {"name": {"type": "string"}}},
                "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}},
                "extra": {"type": "object", "properties": {}, "additionalProperties": true},
                "properties": {"type": "string"}
            },
            "$defs": {"tag": {"properties": {"label": {"type": "string"}}}},
            "anyOf": [{"properties": {"a": {}}}]
        });
        close_objects(schema.as_object_mut().unwrap());
        assert_eq!(schema["additionalProperties"], false);
        assert_eq!(schema["properties"]["pet"]["additionalProperties"], false);
        assert_eq!(schema["properties"]["extra"]["additionalProperties"], true);
        assert_eq!(schema["$defs"]["tag"]["additionalProperties"], false);
        assert_eq!(schema["anyOf"][0]["additionalProperties"], false);
        // A property named `properties` is a property, not a keyword.
        assert!(schema["properties"]["properties"]
            .get("additionalProperties")
            .is_none());
        assert!(schema["properties"].get("additionalProperties").is_none());
    }
}
