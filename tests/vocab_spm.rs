//! SentencePiece (`tokenizer.ggml.model = "llama"`) vocabularies read from GGUF tokenize exactly
//! as llama.cpp does: its own reference cases (`tests/data/spm`, from llama.cpp's `models/`), and
//! random text against a direct port of llama.cpp's `llm_tokenizer_spm_session`.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file;
use tilt::model::vocab::{tokenizer_json_from_gguf, Vocab};

const BOS: u32 = 1;
const EOS: u32 = 2;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/spm")
        .join(name)
}

fn content() -> gguf_file::Content {
    let mut f = std::fs::File::open(data("ggml-vocab-llama-spm.gguf")).unwrap();
    gguf_file::Content::read(&mut f).unwrap()
}

/// The reference GGUF with one metadata entry set.
fn content_with(key: &str, value: gguf_file::Value) -> gguf_file::Content {
    let mut c = content();
    c.metadata.insert(key.into(), value);
    c
}

fn vocab() -> &'static Vocab {
    static V: OnceLock<Vocab> = OnceLock::new();
    V.get_or_init(|| Vocab::from_gguf(&content()).unwrap())
}

/// llama.cpp's `test-tokenizer-0` reading of `.inp` / `.out`: inputs end with
/// `\n__ggml_vocab_test__\n`, one line of space-separated ids per input.
fn reference_cases() -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(data("ggml-vocab-llama-spm.gguf.inp")).unwrap();
    let out = std::fs::read_to_string(data("ggml-vocab-llama-spm.gguf.out")).unwrap();
    let sep = "\n__ggml_vocab_test__\n";
    let mut inputs = Vec::new();
    let mut rest = inp.as_str();
    while !rest.is_empty() {
        match rest.find(sep) {
            Some(at) => {
                inputs.push(rest[..at].to_string());
                rest = &rest[at + sep.len()..];
            }
            None => {
                inputs.push(rest.to_string());
                rest = "";
            }
        }
    }
    let outputs: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(
        inputs.len(),
        outputs.len(),
        "inputs and outputs differ in count"
    );
    inputs.into_iter().zip(outputs).collect()
}

#[test]
fn llama_cpp_reference_cases() {
    let v = vocab();
    let cases = reference_cases();
    assert_eq!(cases.len(), 46);
    let mut failed = Vec::new();
    for (text, expected) in &cases {
        // test-tokenizer-0 calls common_tokenize(ctx, text, add_special = false, parse_special = false).
        let got = v.encode(text, false).unwrap();
        if &got != expected {
            failed.push(format!(
                "{text:?}\n  expected {expected:?}\n  got      {got:?}"
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} reference cases differ:\n{}",
        failed.len(),
        cases.len(),
        failed.join("\n")
    );
}

#[test]
fn decoding_round_trips_the_reference_inputs() {
    let v = vocab();
    for (text, ids) in reference_cases() {
        let decoded = v.decode(&ids);
        if text.is_empty() {
            assert_eq!(decoded, "");
            continue;
        }
        // `decode` is the concatenation of token bytes, so it keeps the space that
        // add_space_prefix put in front; llama.cpp's detokenizer drops it.
        assert_eq!(decoded.strip_prefix(' '), Some(text.as_str()), "{text:?}");
    }
}

#[test]
fn bos_is_added_when_asked() {
    let v = vocab();
    assert!(v.add_bos, "llama vocabularies add BOS by default");
    assert_eq!(v.bos, Some(BOS));
    assert_eq!(v.eos, Some(EOS));
    assert!(v.end_of_generation.contains(&EOS));
    assert_eq!(v.encode("Hello world", true).unwrap(), [BOS, 15043, 3186]);
    assert_eq!(v.encode("Hello world", false).unwrap(), [15043, 3186]);
    assert_eq!(v.encode("", true).unwrap(), [BOS]);
    assert!(v.encode("", false).unwrap().is_empty());
}

#[test]
fn add_bos_false_in_metadata_is_respected() {
    let c = content_with(
        "tokenizer.ggml.add_bos_token",
        gguf_file::Value::Bool(false),
    );
    let v = Vocab::from_gguf(&c).unwrap();
    assert!(!v.add_bos);
    assert_eq!(v.encode("Hello world", true).unwrap(), [15043, 3186]);
}

#[test]
fn token_bytes() {
    let v = vocab();
    assert_eq!(v.size(), 32000);
    assert_eq!(v.text(13), "<0x0A>");
    assert_eq!(v.bytes(13), b"\n");
    assert_eq!(v.bytes(3), [0u8]);
    assert_eq!(v.bytes(258), [0xFFu8]);
    assert_eq!(v.bytes(15043), b" Hello");
    assert_eq!(v.bytes(29871), b" ");
    // Unknown and control tokens add nothing to generated text but are shown when asked.
    assert!(v.bytes(0).is_empty());
    assert!(v.bytes(BOS).is_empty());
    assert!(v.bytes(EOS).is_empty());
    assert_eq!(v.decode(&[BOS, 15043, EOS]), " Hello");
    assert_eq!(v.decode_with_special(&[BOS, 15043, EOS]), "<s> Hello</s>");
    // A character split into byte tokens decodes whole again.
    assert_eq!(v.decode(&[29871, 243, 162, 169, 156]), " 🦙");
}

#[test]
fn special_tokens_are_matched_whole_and_start_a_new_fragment() {
    let v = vocab();
    // llama.cpp with parse_special: each text fragment after a special token gets its own
    // leading space.
    assert_eq!(v.encode("<s>Hello</s>", false).unwrap(), [BOS, 15043, EOS]);
    assert_eq!(
        v.encode("Hello<s>world", false).unwrap(),
        [15043, BOS, 3186]
    );
    assert_eq!(v.token_id("</s>"), Some(EOS));
}

/// `tokenizer_json_from_gguf` is written out as `tokenizer.json` (e.g. by `tilt train`) and read
/// back with `Vocab::from_json`; that copy must tokenize and decode the same.
#[test]
fn exported_tokenizer_json_tokenizes_the_same() {
    let spec = tokenizer_json_from_gguf(&content()).unwrap();
    let cfg = serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true});
    let v = Vocab::from_json(&spec.to_string(), &cfg).unwrap();
    assert_eq!(v.bos, Some(BOS));
    assert_eq!(v.eos, Some(EOS));
    for (text, expected) in reference_cases() {
        let ids = v.encode(&text, false).unwrap();
        assert_eq!(ids, expected, "{text:?}");
        assert_eq!(v.decode(&ids), vocab().decode(&ids), "{text:?}");
    }
    assert_eq!(v.encode("Hi", true).unwrap()[0], BOS);
}

#[test]
fn other_tokenizer_models_are_refused_clearly() {
    for model in ["bert", "t5"] {
        let c = content_with(
            "tokenizer.ggml.model",
            gguf_file::Value::String(model.into()),
        );
        let err = Vocab::from_gguf(&c)
            .err()
            .expect("should be refused")
            .to_string();
        assert!(
            err.contains(&format!("`{model}` is not supported")),
            "{err}"
        );
        assert!(err.contains("`llama`") && err.contains("`gpt2`"), "{err}");
    }
}

// --- A direct port of llama.cpp's SentencePiece tokenizer, as the oracle for random text. ---

struct Oracle {
    index: HashMap<String, u32>,
    scores: Vec<f32>,
    add_space_prefix: bool,
}

struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    /// llama.cpp's `llm_bigram_spm::comparator`: highest score, then leftmost.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .partial_cmp(&o.score)
            .unwrap_or(Ordering::Equal)
            .then(o.left.cmp(&self.left))
    }
}

#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    n: usize,
    prev: isize,
    next: isize,
}

impl Oracle {
    fn new(c: &gguf_file::Content) -> Self {
        let md = &c.metadata;
        let tokens: Vec<String> = md["tokenizer.ggml.tokens"]
            .to_vec()
            .unwrap()
            .iter()
            .map(|v| v.to_string().unwrap().clone())
            .collect();
        let scores = md["tokenizer.ggml.scores"]
            .to_vec()
            .unwrap()
            .iter()
            .map(|v| v.to_f32().unwrap())
            .collect();
        let add_space_prefix = md
            .get("tokenizer.ggml.add_space_prefix")
            .map(|v| v.to_bool().unwrap())
            .unwrap_or(true);
        let index = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i as u32))
            .collect();
        Self {
            index,
            scores,
            add_space_prefix,
        }
    }

    /// `llama_tokenize_impl` for SPM, add_special and parse_special false: one raw fragment.
    fn encode(&self, raw: &str) -> Vec<u32> {
        let mut out = Vec::new();
        if raw.is_empty() {
            return out;
        }
        let mut text = String::new();
        if self.add_space_prefix {
            text.push(' ');
        }
        text.push_str(raw);
        let text = text.replace(' ', "\u{2581}");
        self.session(&text, &mut out);
        out
    }

    fn session(&self, text: &str, out: &mut Vec<u32>) {
        let mut symbols: Vec<Symbol> = Vec::new();
        let chars: Vec<(usize, usize)> = text
            .char_indices()
            .map(|(i, c)| (i, c.len_utf8()))
            .collect();
        for (k, &(start, n)) in chars.iter().enumerate() {
            symbols.push(Symbol {
                start,
                n,
                prev: k as isize - 1,
                next: if k + 1 == chars.len() {
                    -1
                } else {
                    k as isize + 1
                },
            });
        }
        let mut queue = BinaryHeap::new();
        let mut rev_merge: HashMap<String, (usize, usize)> = HashMap::new();
        let try_add = |symbols: &[Symbol],
                       queue: &mut BinaryHeap<Bigram>,
                       rev: &mut HashMap<String, (usize, usize)>,
                       left: isize,
                       right: isize| {
            if left < 0 || right < 0 {
                return;
            }
            let (l, r) = (symbols[left as usize], symbols[right as usize]);
            let piece = &text[l.start..l.start + l.n + r.n];
            let Some(&id) = self.index.get(piece) else {
                return;
            };
            queue.push(Bigram {
                left: left as usize,
                right: right as usize,
                score: self.scores[id as usize],
                size: piece.len(),
            });
            rev.insert(piece.to_string(), (left as usize, right as usize));
        };
        for i in 1..symbols.len() {
            try_add(
                &symbols,
                &mut queue,
                &mut rev_merge,
                i as isize - 1,
                i as isize,
            );
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (symbols[b.left], symbols[b.right]);
            if l.n == 0 || r.n == 0 || l.n + r.n != b.size {
                continue;
            }
            symbols[b.left].n += r.n;
            symbols[b.right].n = 0;
            symbols[b.left].next = r.next;
            if r.next >= 0 {
                symbols[r.next as usize].prev = b.left as isize;
            }
            let (prev, next) = (symbols[b.left].prev, symbols[b.left].next);
            try_add(&symbols, &mut queue, &mut rev_merge, prev, b.left as isize);
            try_add(&symbols, &mut queue, &mut rev_merge, b.left as isize, next);
        }
        let mut i = 0isize;
        while i != -1 && !symbols.is_empty() {
            self.resegment(text, &symbols, &rev_merge, symbols[i as usize], out);
            i = symbols[i as usize].next;
        }
    }

    fn resegment(
        &self,
        text: &str,
        symbols: &[Symbol],
        rev: &HashMap<String, (usize, usize)>,
        s: Symbol,
        out: &mut Vec<u32>,
    ) {
        let piece = &text[s.start..s.start + s.n];
        if let Some(&id) = self.index.get(piece) {
            out.push(id);
            return;
        }
        match rev.get(piece) {
            None => out.extend(piece.bytes().map(|b| self.index[&format!("<0x{b:02X}>")])),
            Some(&(l, r)) => {
                self.resegment(text, symbols, rev, symbols[l], out);
                self.resegment(text, symbols, rev, symbols[r], out);
            }
        }
    }
}

#[test]
fn oracle_reproduces_the_reference_cases() {
    let oracle = Oracle::new(&content());
    for (text, expected) in reference_cases() {
        assert_eq!(oracle.encode(&text), expected, "{text:?}");
    }
}

/// xorshift64*: deterministic random text without another dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn random_text(rng: &mut Rng, pieces: &[String]) -> String {
    const CHARS: &[&str] = &[
        " ",
        "  ",
        "\n",
        "\t",
        "\r\n",
        "'",
        "!",
        "?",
        ".",
        ",",
        "3",
        "33",
        "0",
        "\u{2581}",
        "é",
        "ß",
        "Ä",
        "½",
        "я",
        "天",
        "～",
        "😁",
        "🦙",
        "🚀",
        "😶‍🌫️",
        "ក",
        "ា",
        "ន",
        "់",
        "\u{0}",
        "\u{7f}",
        "\u{feff}",
        "\u{10ffff}",
        "<",
        ">",
        "<0x41>",
    ];
    let mut s = String::new();
    for _ in 0..1 + rng.below(12) {
        match rng.below(4) {
            0 | 1 => s.push_str(&pieces[rng.below(pieces.len())].replace('\u{2581}', " ")),
            2 => s.push_str(CHARS[rng.below(CHARS.len())]),
            _ => s.push_str(&" ".repeat(1 + rng.below(40))),
        }
    }
    s
}

fn compare_with_oracle(c: gguf_file::Content, seed: u64, cases: usize) {
    let oracle = Oracle::new(&c);
    let v = Vocab::from_gguf(&c).unwrap();
    // Ordinary pieces: past <unk>, <s>, </s> and the 256 byte tokens.
    let pieces: Vec<String> = (259..v.size() as u32)
        .map(|i| v.text(i).to_string())
        .collect();
    let mut rng = Rng(seed);
    let mut failed = Vec::new();
    for _ in 0..cases {
        let text = random_text(&mut rng, &pieces);
        if ["<s>", "</s>", "<unk>"].iter().any(|t| text.contains(t)) {
            continue; // the oracle does not parse special tokens
        }
        let (got, want) = (v.encode(&text, false).unwrap(), oracle.encode(&text));
        if got != want {
            failed.push(format!(
                "{text:?}\n  llama.cpp {want:?}\n  tilt      {got:?}"
            ));
        }
        // Decoding gives the text back, but for the leading space and a written `▁`, which
        // SentencePiece cannot tell from a space (llama.cpp neither).
        let prefix = if oracle.add_space_prefix { " " } else { "" };
        let expected = format!("{prefix}{}", text.replace('\u{2581}', " "));
        assert_eq!(v.decode(&got), expected, "{text:?}");
    }
    assert!(
        failed.is_empty(),
        "{} of {cases} random texts differ:\n{}",
        failed.len(),
        failed[..failed.len().min(10)].join("\n")
    );
}

#[test]
fn random_text_matches_llama_cpp() {
    compare_with_oracle(content(), 0x9E37_79B9_7F4A_7C15, 3000);
}

#[test]
fn random_text_matches_llama_cpp_without_space_prefix() {
    let c = content_with(
        "tokenizer.ggml.add_space_prefix",
        gguf_file::Value::Bool(false),
    );
    let v = Vocab::from_gguf(&c).unwrap();
    assert_eq!(v.encode("Hello world", false).unwrap(), [10994, 3186]);
    compare_with_oracle(c, 0xD1B5_4A32_D192_ED03, 1000);
}

/// Runs of spaces are where SentencePiece scores tie (every `▁…▁` piece of Llama's vocabulary
/// scores -1e9) and llama.cpp's leftmost-first tie rule decides the pieces.
#[test]
fn space_runs_match_llama_cpp() {
    let oracle = Oracle::new(&content());
    let v = vocab();
    for n in 1..=80 {
        let run = " ".repeat(n);
        for text in [
            run.clone(),
            format!("a{run}b"),
            format!("Hello{run}world"),
            format!("{run}Hello"),
            format!("\n{run}\n"),
            format!("x{run}"),
        ] {
            assert_eq!(
                v.encode(&text, false).unwrap(),
                oracle.encode(&text),
                "{text:?}"
            );
        }
    }
}
