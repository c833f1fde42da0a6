//! `tilt eval keywords`: keyword-constrained generation on CommonGen-style concept sets. Each
//! method is a decoder config in JSON (`{"decoder": NAME, ...params}`) in which the string
//! `"$concepts"` stands for the set's words, so any decoder — `args` and `deal` included once
//! they exist — plugs in by name. Per method: the rate of answers with every keyword, the mean
//! share of keywords present (inflections matched), fluency as the base's perplexity of the
//! answer, cost in generated (and, where the decoder reports them, forward) tokens per output
//! token, wall time and tokens/s.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::{Decoding, Job, Output};
use crate::bench::plot::{xy_panels, Panel, XySeries};
use crate::decode::{self, DecoderSpec};
use crate::engine::{Engine, EngineOptions};

/// The built-in concept sets.
pub const CONCEPTS: &str = include_str!("concepts.txt");

/// The placeholder for a set's words in a method's config.
pub const PLACEHOLDER: &str = "$concepts";

/// The default methods: plain sampling, best-of-N with the keywords as a constraint, sampling
/// pulled toward the keywords (`genarm` without reward models), and the search decoders `args`
/// and `deal`.
pub const DEFAULT_METHODS: &[(&str, &str)] = &[
    ("sample", r#"{"decoder": "sample"}"#),
    (
        "best_of_4",
        r#"{"decoder": "best_of_n", "n": 4, "constraints": {"keywords": "$concepts"}}"#,
    ),
    (
        "best_of_8",
        r#"{"decoder": "best_of_n", "n": 8, "constraints": {"keywords": "$concepts"}}"#,
    ),
    (
        "genarm",
        r#"{"decoder": "genarm", "constraints": {"keywords": "$concepts"}}"#,
    ),
    (
        "args",
        r#"{"decoder": "args", "constraints": {"keywords": "$concepts"}}"#,
    ),
    (
        "deal",
        r#"{"decoder": "deal", "constraints": {"keywords": "$concepts"}}"#,
    ),
];

/// Concept sets from `text`: one per line, words separated by spaces or commas; `#` comments
/// and blank lines skipped.
pub fn parse_concepts(text: &str) -> Result<Vec<Vec<String>>> {
    let mut sets = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let set: Vec<String> = line
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect();
        if set.is_empty() {
            bail!("line {}: no words", i + 1);
        }
        sets.push(set);
    }
    Ok(sets)
}

/// A crude English stem: lowercase, one inflectional suffix off (-ies → -y, -ing, -ed, -s), a
/// final e dropped and a doubled final consonant undone, so that "throws", "throwing" and
/// "throw", or "dances", "danced", "dancing" and "dance", meet. Irregular forms ("caught")
/// do not.
pub fn stem(word: &str) -> String {
    let mut w = word.to_lowercase();
    let len = w.chars().count();
    if len > 4 && w.ends_with("ies") {
        w.truncate(w.len() - 3);
        w.push('y');
        return w;
    }
    for suffix in ["ing", "ed", "s"] {
        if w.ends_with(suffix) && w.len() - suffix.len() >= 3 && !w.ends_with("ss") {
            w.truncate(w.len() - suffix.len());
            break;
        }
    }
    if w.len() >= 4 && w.ends_with('e') {
        w.pop();
    }
    let b = w.as_bytes();
    if b.len() >= 4 {
        let (x, y) = (b[b.len() - 2], b[b.len() - 1]);
        if x == y && y.is_ascii_alphabetic() && !b"aeioulsz".contains(&y) {
            w.pop();
        }
    }
    w
}

/// Whether `word` is a form of `keyword`: the same stem, or `keyword` with at most two more
/// letters ("throw" → "thrown").
pub fn is_form(keyword: &str, word: &str) -> bool {
    let (k, w) = (keyword.to_lowercase(), word.to_lowercase());
    if k == w || stem(&k) == stem(&w) {
        return true;
    }
    k.chars().count() >= 3 && w.starts_with(&k) && w.len() - k.len() <= 2
}

/// How many of `keywords` the text uses, each in any form (a phrase: its words in a row).
pub fn hits(keywords: &[String], text: &str) -> usize {
    let words = super::words(text);
    keywords
        .iter()
        .filter(|k| {
            let kw = super::words(k);
            !kw.is_empty()
                && words
                    .windows(kw.len())
                    .any(|win| win.iter().zip(&kw).all(|(w, k)| is_form(k, w)))
        })
        .count()
}

/// The share of `keywords` the text uses (1 when there are none).
pub fn coverage(keywords: &[String], text: &str) -> f64 {
    if keywords.is_empty() {
        return 1.0;
    }
    hits(keywords, text) as f64 / keywords.len() as f64
}

/// `config` with every string equal to the placeholder replaced by `concepts`.
pub fn fill(config: &Value, concepts: &[String]) -> Value {
    match config {
        Value::String(s) if s == PLACEHOLDER => json!(concepts),
        Value::Array(a) => Value::Array(a.iter().map(|v| fill(v, concepts)).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| (k.clone(), fill(v, concepts)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn parse_method(s: &str) -> Result<(String, Value), String> {
    let Some((name, config)) = s.split_once('=') else {
        return Err(format!(
            "expected NAME=JSON, e.g. bon4={}, got `{s}`",
            DEFAULT_METHODS[1].1
        ));
    };
    if name.is_empty() {
        return Err("the method needs a name before `=`".into());
    }
    let config: Value =
        serde_json::from_str(config).map_err(|e| format!("method `{name}`: {e}"))?;
    super::split_config(&config).map_err(|e| format!("method `{name}`: {e}"))?;
    Ok((name.to_string(), config))
}

#[derive(clap::Args, Debug)]
pub struct KeywordsArgs {
    /// Write keywords.md, keywords.svg and keywords.json here.
    #[arg(long)]
    pub out: PathBuf,
    /// The base (which also scores fluency) and the reward models.
    #[command(flatten)]
    pub models: super::EvalModels,
    /// A method as NAME=JSON decoder config, e.g. `bon4={"decoder":"best_of_n","n":4,
    /// "constraints":{"keywords":"$concepts"}}` ("$concepts" becomes the set's words).
    /// Repeatable; replaces the defaults: sample, best_of_4, best_of_8, genarm, args, deal.
    #[arg(long = "method", value_name = "NAME=JSON", value_parser = parse_method)]
    pub methods: Vec<(String, Value)>,
    /// Concept sets, one per line, words separated by spaces (default: the built-in 55).
    #[arg(long)]
    pub concepts: Option<PathBuf>,
    /// Use only the first N concept sets.
    #[arg(long)]
    pub limit: Option<usize>,
    /// The user prompt; `{}` becomes the words, comma-separated. Without `{}` the prompt does not
    /// name the words (e.g. "Write one sentence about everyday life."): only the constraints do.
    #[arg(long, default_value = "Write one sentence that uses the words: {}.")]
    pub template: String,
    #[arg(long, default_value_t = 48)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Each prompt samples with seed ^ hash(prompt), the same for every method.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Requests decoded together.
    #[arg(long, default_value_t = EngineOptions::default().max_running)]
    pub max_running: usize,
}

/// One method's results.
struct MethodResult {
    name: String,
    config: Value,
    /// Share of answers with every keyword.
    all_present: f64,
    mean_coverage: f64,
    perplexity: f64,
    mean_tokens: f64,
    generated_per_token: f64,
    forward_per_token: Option<f64>,
    wall_s: f64,
    tokens_per_s: f64,
    outputs: Vec<(Output, f64)>,
}

/// Forward tokens a decoder's report says it spent, if it says.
fn forward_tokens(report: &Value) -> Option<f64> {
    report
        .get("forward_tokens")
        .or_else(|| report.get("cost").and_then(|c| c.get("forward_tokens")))
        .and_then(Value::as_f64)
}

/// The `tilt eval keywords` command.
pub fn run(args: KeywordsArgs) -> Result<()> {
    if args.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    if args.limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    let mut sets = match &args.concepts {
        Some(path) => parse_concepts(
            &std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("reading {}", path.display()))?,
        None => parse_concepts(CONCEPTS)?,
    };
    sets.truncate(args.limit.unwrap_or(usize::MAX));
    if sets.is_empty() {
        bail!("no concept sets");
    }
    let hidden = !args.template.contains("{}");
    let prompts: Vec<String> = sets
        .iter()
        .map(|s| args.template.replace("{}", &s.join(", ")))
        .collect();
    let defaults = args.methods.is_empty();
    let methods: Vec<(String, Value)> = if defaults {
        DEFAULT_METHODS
            .iter()
            .map(|(n, c)| (n.to_string(), serde_json::from_str(c).expect("valid JSON")))
            .collect()
    } else {
        args.methods.clone()
    };
    std::fs::create_dir_all(&args.out)?;

    let models = args.models.load()?;
    // A second copy of the base for teacher-forced scoring; the engine owns the first.
    let scorer = super::load_base(args.models.model.as_deref())?;
    let engine = Engine::start(
        models,
        EngineOptions {
            max_running: args.max_running.max(1),
            ..EngineOptions::default()
        },
    );
    let decoding = Decoding {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    };

    // Check every method on the first set before the long part.
    let mut runnable = Vec::new();
    let mut skipped = Vec::new();
    for (name, config) in methods {
        let (decoder, params) = super::split_config(&fill(&config, &sets[0]))?;
        let why = if !decode::names().contains(&decoder.as_str()) {
            Some(format!(
                "this build has no decoder `{decoder}` (it has: {})",
                decode::names().join(", ")
            ))
        } else {
            match DecoderSpec::parse(&decoder, params, engine.rewards()) {
                Ok(_) => None,
                Err(e) if defaults => Some(format!(
                    "`{decoder}` refuses the default config {config}: {}{}",
                    e.param.map(|p| format!("{p}: ")).unwrap_or_default(),
                    e.message
                )),
                Err(e) => bail!(
                    "method `{name}` ({config}): {}{}",
                    e.param.map(|p| format!("{p}: ")).unwrap_or_default(),
                    e.message
                ),
            }
        };
        match why {
            Some(why) => {
                eprintln!("eval keywords: skipping method `{name}`: {why}");
                skipped.push(json!({"method": name, "config": config, "reason": why}));
            }
            None => runnable.push((name, config)),
        }
    }
    if runnable.is_empty() {
        bail!("no method can run");
    }
    eprintln!(
        "eval keywords: {} methods × {} concept sets",
        runnable.len(),
        sets.len()
    );

    let mut results = Vec::new();
    for (name, config) in runnable {
        let jobs = sets
            .iter()
            .zip(&prompts)
            .map(|(set, prompt)| {
                let (decoder, params) = super::split_config(&fill(&config, set))?;
                let spec = DecoderSpec::parse(&decoder, params, engine.rewards())
                    .map_err(|e| anyhow::anyhow!("method `{name}` for {set:?}: {}", e.message))?;
                // A prompt that hides the words is every set's: the set tells their draws apart.
                let salt = match hidden {
                    true => crate::train::prompts::stable_hash(&set.join(" ")),
                    false => 0,
                };
                Ok(Job {
                    spec,
                    prompt: prompt.clone(),
                    salt,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let bar = crate::progress::bar(jobs.len() as u64, &name);
        let start = Instant::now();
        let outputs = super::run_jobs(&engine, &jobs, &decoding, &bar)?;
        let wall_s = start.elapsed().as_secs_f64();
        bar.finish_and_clear();
        eprintln!("eval keywords: {name}: decoded in {wall_s:.1} s; scoring fluency");
        let items: Vec<(&[u32], &[u32])> = outputs
            .iter()
            .map(|o| (o.prompt_tokens.as_slice(), o.tokens.as_slice()))
            .collect();
        let nll = super::response_nll(&scorer, &items)?;
        results.push(summarize(name, config, &sets, outputs, &nll, wall_s));
    }

    let files = super::write_files(
        &args.out,
        &[
            ("keywords.md", markdown(&results, &skipped)),
            ("keywords.svg", svg(&results)),
            (
                "keywords.json",
                serde_json::to_string_pretty(&to_json(&results, &skipped, &sets, &args))?,
            ),
        ],
    )?;
    println!("{}", markdown(&results, &skipped));
    for f in files {
        eprintln!("wrote {}", f.display());
    }
    Ok(())
}

fn summarize(
    name: String,
    config: Value,
    sets: &[Vec<String>],
    outputs: Vec<Output>,
    nll: &[(f64, usize)],
    wall_s: f64,
) -> MethodResult {
    let cover: Vec<f64> = sets
        .iter()
        .zip(&outputs)
        .map(|(set, o)| coverage(set, &o.text))
        .collect();
    let out_tokens: usize = outputs.iter().map(|o| o.tokens.len()).sum();
    let generated: usize = outputs.iter().map(|o| o.generated).sum();
    let forwards: Option<f64> = outputs
        .iter()
        .map(|o| o.report.as_ref().and_then(forward_tokens))
        .sum();
    let per_token = |x: f64| x / out_tokens.max(1) as f64;
    MethodResult {
        name,
        config,
        all_present: super::mean(cover.iter().map(|&c| if c >= 1.0 { 1.0 } else { 0.0 })),
        mean_coverage: super::mean(cover.iter().copied()),
        perplexity: super::perplexity(nll),
        mean_tokens: super::mean(outputs.iter().map(|o| o.tokens.len() as f64)),
        generated_per_token: per_token(generated as f64),
        forward_per_token: forwards.map(per_token),
        wall_s,
        tokens_per_s: out_tokens as f64 / wall_s.max(1e-9),
        outputs: outputs.into_iter().zip(cover).collect(),
    }
}

fn markdown(results: &[MethodResult], skipped: &[Value]) -> String {
    let header: Vec<String> = [
        "method",
        "all keywords",
        "keyword share",
        "perplexity",
        "tokens",
        "generated / output token",
        "forward / output token",
        "wall s",
        "output tok/s",
    ]
    .map(String::from)
    .to_vec();
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                format!("`{}`", r.name),
                super::cell(r.all_present, 3),
                super::cell(r.mean_coverage, 3),
                super::cell(r.perplexity, 2),
                super::cell(r.mean_tokens, 1),
                super::cell(r.generated_per_token, 2),
                r.forward_per_token
                    .map_or("–".into(), |f| super::cell(f, 2)),
                super::cell(r.wall_s, 1),
                super::cell(r.tokens_per_s, 1),
            ]
        })
        .collect();
    let mut md = String::from("## Keyword-constrained generation\n\n");
    md.push_str(&super::table(&header, &rows));
    md.push_str("\nMethods:\n");
    for r in results {
        md.push_str(&format!("- `{}`: `{}`\n", r.name, r.config));
    }
    for s in skipped {
        md.push_str(&format!(
            "- `{}` skipped: {}\n",
            s["method"].as_str().unwrap_or(""),
            s["reason"].as_str().unwrap_or("")
        ));
    }
    md
}

fn svg(results: &[MethodResult]) -> String {
    let panel = |title: &str, y_title: &str, value: &dyn Fn(&MethodResult) -> f64| Panel {
        title: title.into(),
        // Search decoders run far more tokens than they keep: their forward tokens, where the
        // report gives them, are the cost; on a log scale, so 1× and 70× both read.
        x_title: "cost: log2(tokens run per output token)".into(),
        y_title: y_title.into(),
        series: results
            .iter()
            .map(|r| XySeries {
                label: r.name.clone(),
                points: vec![(cost(r).log2(), value(r))],
                line: false,
            })
            .collect(),
    };
    xy_panels(&[
        panel("Keyword share vs cost", "mean keyword share", &|r| {
            r.mean_coverage
        }),
        panel("All keywords present vs cost", "rate", &|r| r.all_present),
        panel(
            "Fluency vs cost (lower is more fluent)",
            "perplexity under the base",
            &|r| r.perplexity,
        ),
    ])
}

fn to_json(
    results: &[MethodResult],
    skipped: &[Value],
    sets: &[Vec<String>],
    args: &KeywordsArgs,
) -> Value {
    let methods: Vec<Value> = results
        .iter()
        .map(|r| {
            json!({
                "method": r.name,
                "config": r.config,
                "all_present": super::num(r.all_present),
                "mean_coverage": super::num(r.mean_coverage),
                "perplexity": super::num(r.perplexity),
                "mean_tokens": super::num(r.mean_tokens),
                "generated_per_output_token": super::num(r.generated_per_token),
                "forward_per_output_token": r.forward_per_token.map(super::num),
                "wall_s": super::num(r.wall_s),
                "output_tokens_per_s": super::num(r.tokens_per_s),
                "outputs": r.outputs.iter().zip(sets).map(|((o, c), set)| json!({
                    "concepts": set,
                    "text": o.text,
                    "coverage": super::num(*c),
                    "tokens": o.tokens.len(),
                    "generated": o.generated,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "template": args.template,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "concept_sets": sets.len(),
        "methods": methods,
        "skipped": skipped,
    })
}

/// What a method's answers cost: the tokens it ran through the base per output token (forward
/// tokens where the decoder reports them, else the tokens it generated).
fn cost(r: &MethodResult) -> f64 {
    r.forward_per_token
        .unwrap_or(r.generated_per_token)
        .max(r.generated_per_token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kw(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn the_builtin_concepts_are_fifty_sets_of_three_to_five_words() {
        let sets = parse_concepts(CONCEPTS).unwrap();
        assert!(sets.len() >= 50, "{}", sets.len());
        for s in &sets {
            assert!((3..=5).contains(&s.len()), "{s:?}");
        }
        let mut distinct = sets.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), sets.len());
    }

    #[test]
    fn stems_meet_across_inflections() {
        for (a, b) in [
            ("throw", "throws"),
            ("throw", "throwing"),
            ("dance", "danced"),
            ("dance", "dancing"),
            ("run", "running"),
            ("city", "cities"),
            ("box", "boxes"),
            ("glass", "glasses"),
            ("catch", "catches"),
        ] {
            assert!(is_form(a, b), "{a} {b}");
        }
        assert!(is_form("throw", "thrown"));
        assert!(!is_form("cat", "category"));
        assert!(!is_form("bed", "b"));
        assert!(!is_form("ball", "bell"));
    }

    #[test]
    fn coverage_counts_keywords_in_any_form() {
        let set = kw(&["dog", "frisbee", "catch", "throw"]);
        assert_eq!(coverage(&set, "The Dogs catch a frisbee."), 0.75);
        assert_eq!(
            coverage(&set, "She throws the frisbee and her dog catches it."),
            1.0
        );
        assert_eq!(coverage(&set, "Nothing here."), 0.0);
        assert_eq!(coverage(&[], "anything"), 1.0);
        // A phrase needs its words in a row.
        assert_eq!(coverage(&kw(&["ice cream"]), "cream and ice"), 0.0);
        assert_eq!(coverage(&kw(&["ice cream"]), "ice creams"), 1.0);
    }

    #[test]
    fn configs_get_the_concepts_and_methods_parse() {
        let c: Value = serde_json::from_str(DEFAULT_METHODS[1].1).unwrap();
        let filled = fill(&c, &kw(&["a", "b"]));
        assert_eq!(filled["constraints"]["keywords"], json!(["a", "b"]));
        assert_eq!(filled["n"], 4);
        let (name, config) = parse_method(r#"mine={"decoder":"sample"}"#).unwrap();
        assert_eq!(
            (name.as_str(), config["decoder"].as_str()),
            ("mine", Some("sample"))
        );
        assert!(parse_method("mine").is_err());
        assert!(parse_method(r#"mine={"n":4}"#).is_err());
        for (_, c) in DEFAULT_METHODS {
            super::super::split_config(&serde_json::from_str(c).unwrap()).unwrap();
        }
    }

    #[test]
    fn the_chart_has_a_point_per_method_and_panel() {
        use crate::bench::plot::{assert_svg_with, texts};
        let result = |name: &str, coverage: f64, forward: Option<f64>| MethodResult {
            name: name.into(),
            config: json!({}),
            all_present: coverage / 2.0,
            mean_coverage: coverage,
            perplexity: 8.0 / coverage,
            mean_tokens: 40.0,
            generated_per_token: 1.0,
            forward_per_token: forward,
            wall_s: 1.0,
            tokens_per_s: 10.0,
            outputs: Vec::new(),
        };
        let svg = svg(&[result("sample", 0.4, None), result("deal", 0.9, Some(64.0))]);
        assert_svg_with(
            &svg,
            &[
                "Keyword share vs cost",
                "All keywords present vs cost",
                "Fluency vs cost (lower is more fluent)",
                "cost: log2(tokens run per output token)",
            ],
        );
        // Each method is named in the legend of each panel and drawn there as one point.
        let texts = texts(&svg);
        assert_eq!(texts.iter().filter(|t| **t == "sample").count(), 3);
        assert_eq!(texts.iter().filter(|t| **t == "deal").count(), 3);
        assert_eq!(svg.matches("<circle").count(), 6);
    }
}
