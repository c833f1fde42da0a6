//! A stand-in model for unit tests: a vocabulary of a few words, logits scripted as a function
//! of everything the sequence holds, and caches that are the tokens themselves. The engine and
//! every decoder run on it in milliseconds; a wrong fork, truncation or feed changes what it
//! predicts next, so the tests see it.

use std::sync::{Arc, Mutex};

use serde_json::json;

use super::{Cache, Decoder, Engine, EngineError, Event, FinishReason, Forward, Usage};
use crate::model::{
    ChatTemplate, ForwardError, ForwardItem, ForwardOutput, LlamaConfig, Logits, ModelInfo, Role,
    Vocab,
};

/// The words, in id order: id 0 ends generation, 1 opens a turn.
pub const WORDS: &[&str] = &[
    "<|im_end|>",
    "<|im_start|>",
    "the",
    "cat",
    "dog",
    "sat",
    "on",
    "a",
    "mat",
    "sun",
    "sea",
    "happy",
    "sad",
    "and",
    "park",
    "ran",
    "big",
    "small",
    "red",
    "blue",
    ".",
];

/// End of generation.
pub const EOS: u32 = 0;

/// The id of `word` in [`WORDS`].
pub fn id(word: &str) -> u32 {
    WORDS
        .iter()
        .position(|w| *w == word)
        .unwrap_or_else(|| panic!("{word:?} is not a fake word")) as u32
}

/// Logits for the token after `history` (everything the cache holds, prompt included).
pub type Script = Arc<dyn Fn(&[u32]) -> Vec<f32> + Send + Sync>;

/// A fake model. `batches` records every forward it ran: the tokens of each item.
pub struct FakeModel {
    name: String,
    role: Role,
    context: usize,
    script: Script,
    pub batches: Batches,
    relative: bool,
}

/// The forwards a fake model ran, shared with the test that made it.
#[derive(Clone, Default)]
pub struct Batches(Arc<Mutex<Vec<Vec<usize>>>>);

impl Batches {
    /// Tokens of each item, per forward.
    pub fn get(&self) -> Vec<Vec<usize>> {
        self.0.lock().unwrap().clone()
    }

    /// Tokens fed in all.
    pub fn tokens(&self) -> usize {
        self.get().iter().flatten().sum()
    }
}

/// A fake cache: the tokens it holds.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FakeCache(pub Vec<u32>);

impl Cache for FakeCache {
    fn positions(&self) -> usize {
        self.0.len()
    }

    fn fork(&self) -> Self {
        self.clone()
    }

    fn truncate(&mut self, len: usize) {
        self.0.truncate(len);
    }
}

impl FakeModel {
    pub fn new(
        name: &str,
        role: Role,
        script: impl Fn(&[u32]) -> Vec<f32> + Send + Sync + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            role,
            context: 64,
            script: Arc::new(script),
            batches: Batches::default(),
            relative: false,
        }
    }

    /// A base model that, after token t, puts most weight on t + 1 (wrapping past the last word
    /// to `the`, never ending on its own), the rest spread by position so that sampling varies.
    pub fn counting() -> Self {
        Self::new("fake", Role::Base, counting)
    }

    pub fn with_context(mut self, context: usize) -> Self {
        self.context = context;
        self
    }

    /// A reward model read relative to the base (as an adapter is: `ModelInfo::relative`).
    pub fn relative(mut self) -> Self {
        self.relative = true;
        self
    }
}

/// The `counting` script.
pub fn counting(history: &[u32]) -> Vec<f32> {
    let last = history.last().copied().unwrap_or(1);
    let next = if last as usize + 1 >= WORDS.len() {
        2
    } else {
        last + 1
    };
    (0..WORDS.len() as u32)
        .map(|v| match v {
            EOS | 1 => -20.0,
            v if v == next => 3.0,
            v => ((v as usize * 7 + history.len() * 3) % 11) as f32 * 0.1,
        })
        .collect()
}

/// Logits that make `word` `margin` nats likelier than every other word (end included).
pub fn favour(word: u32, margin: f32) -> Vec<f32> {
    (0..WORDS.len() as u32)
        .map(|v| if v == word { margin } else { 0.0 })
        .collect()
}

/// The fake vocabulary: `WORDS` as whole words, each written with a leading space; text
/// tokenizes word by word, white space aside, and an unknown word becomes the end token.
pub fn vocab() -> Vocab {
    let vocab: serde_json::Map<String, serde_json::Value> = WORDS
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let piece = if i < 2 {
                w.to_string()
            } else {
                format!("\u{2581}{w}")
            };
            (piece, json!(i))
        })
        .collect();
    let special = |id: usize| json!({"id": id, "content": WORDS[id], "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0), special(1)],
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "WhitespaceSplit"},
            {"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "always", "split": true}
        ]},
        "post_processor": null,
        "decoder": {"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "always", "split": true},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<|im_end|>"}
    });
    let config = json!({"bos_token": WORDS[1], "eos_token": WORDS[0]});
    Vocab::from_json(&tokenizer.to_string(), &config).expect("the fake vocabulary builds")
}

impl Forward for FakeModel {
    type Cache = FakeCache;

    fn info(&self) -> ModelInfo {
        let vocab = vocab();
        let bos = vocab.text(1).to_string();
        let eos = vocab.text(0).to_string();
        ModelInfo {
            name: self.name.clone(),
            role: self.role,
            config: LlamaConfig::tiny(WORDS.len(), self.context),
            vocab: Arc::new(vocab),
            chat: Arc::new(ChatTemplate::new(None, &bos, &eos).expect("ChatML parses")),
            relative: self.relative,
        }
    }

    fn forward(
        &self,
        items: &mut [ForwardItem<'_, FakeCache>],
    ) -> Result<ForwardOutput, ForwardError> {
        let vocab = WORDS.len();
        let mut out = ForwardOutput {
            data: Vec::new(),
            vocab,
            rows: Vec::with_capacity(items.len()),
        };
        for it in items.iter_mut() {
            if it.tokens.is_empty() {
                return Err(ForwardError::Empty);
            }
            let positions = it.cache.positions() + it.tokens.len();
            if positions > self.context {
                return Err(ForwardError::PastContext {
                    positions,
                    context: self.context,
                });
            }
            let first = out.data.len() / vocab;
            for (i, &t) in it.tokens.iter().enumerate() {
                if t as usize >= vocab {
                    return Err(ForwardError::Token { token: t, vocab });
                }
                it.cache.0.push(t);
                let wanted = match it.logits {
                    Logits::None => false,
                    Logits::Last => i + 1 == it.tokens.len(),
                    Logits::All => true,
                };
                if wanted {
                    let row = (self.script)(&it.cache.0);
                    assert_eq!(row.len(), vocab, "a script row per word");
                    out.data.extend(row);
                }
            }
            out.rows.push(first..out.data.len() / vocab);
        }
        let sizes = items.iter().map(|it| it.tokens.len()).collect();
        self.batches.0.lock().unwrap().push(sizes);
        Ok(out)
    }
}

/// What one request streamed.
#[derive(Debug, Default)]
pub struct Streamed {
    pub tokens: Vec<Vec<u32>>,
    pub text: Vec<String>,
    pub finish: Vec<Option<FinishReason>>,
    pub usage: Option<Usage>,
    pub report: Option<serde_json::Value>,
    pub failure: Option<EngineError>,
    /// The prompt's own log-probs, when asked for.
    pub prompt: Option<super::PromptLogprobs>,
}

/// Submit `decoder` and collect its events until the request ends.
pub fn run(engine: &Engine, decoder: Box<dyn Decoder>) -> Streamed {
    let mut rx = engine.submit(decoder).expect("the engine runs");
    let mut s = Streamed::default();
    let grow = |s: &mut Streamed, i: usize| {
        while s.tokens.len() <= i {
            s.tokens.push(Vec::new());
            s.text.push(String::new());
            s.finish.push(None);
        }
    };
    while let Some(event) = rx.blocking_recv() {
        match event {
            Event::Token(t) => {
                grow(&mut s, t.choice);
                s.tokens[t.choice].push(t.token);
                s.text[t.choice].push_str(&t.text);
            }
            Event::Finished {
                choice,
                reason,
                text,
            } => {
                grow(&mut s, choice);
                s.text[choice].push_str(&text);
                s.finish[choice] = Some(reason);
            }
            Event::Done { usage, report } => {
                s.usage = Some(usage);
                s.report = report;
                break;
            }
            Event::Failed(e) => {
                s.failure = Some(e);
                break;
            }
            Event::Prompt(p) => s.prompt = Some(p),
            Event::Started { .. } => {}
        }
    }
    s
}
