//! The numbers that catch regressions: one decode step, a prefill, the sampler, GenARM's combine,
//! and structured output's mask over the vocabulary.
//!
//!     cargo bench --bench hot_paths

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use tilt::model::{fetch, ForwardItem, KvCache, Logits, Model, Role};
use tilt::sampling::{Grammar, Sampler, SamplingParams};

fn model() -> Model {
    let path = fetch::ensure(&fetch::models_dir(), fetch::DEFAULT_MODEL).expect("default model");
    Model::load(&path, "smollm2", Role::Base).expect("model loads")
}

fn forward(c: &mut Criterion) {
    let m = model();
    let prompt: Vec<u32> = (0..128u32).map(|i| 1000 + i * 37).collect();
    let mut primed = KvCache::new();
    m.llama
        .forward(&mut [ForwardItem {
            cache: &mut primed,
            tokens: &prompt,
            logits: Logits::None,
        }])
        .unwrap();
    let mut g = c.benchmark_group("forward");
    g.sample_size(20);
    g.bench_function("decode_step_at_128", |b| {
        b.iter_batched_ref(
            || primed.fork(),
            |cache| {
                m.llama
                    .forward(&mut [ForwardItem {
                        cache,
                        tokens: &[42],
                        logits: Logits::Last,
                    }])
                    .unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("decode_step_batch_4", |b| {
        b.iter_batched_ref(
            || (0..4).map(|_| primed.fork()).collect::<Vec<_>>(),
            |caches| {
                let mut items: Vec<ForwardItem> = caches
                    .iter_mut()
                    .map(|cache| ForwardItem {
                        cache,
                        tokens: &[42],
                        logits: Logits::Last,
                    })
                    .collect();
                m.llama.forward(&mut items).unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("prefill_128", |b| {
        b.iter_batched_ref(
            KvCache::new,
            |cache| {
                m.llama
                    .forward(&mut [ForwardItem {
                        cache,
                        tokens: &prompt,
                        logits: Logits::Last,
                    }])
                    .unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn sampler(c: &mut Criterion) {
    let logits: Vec<f32> = (0..49152)
        .map(|i| ((i * 7919 % 1000) as f32 / 100.0).sin() * 8.0)
        .collect();
    let mut g = c.benchmark_group("sampler");
    for (name, params) in [
        ("greedy", SamplingParams::greedy()),
        (
            "temperature",
            SamplingParams {
                seed: Some(1),
                ..Default::default()
            },
        ),
        (
            "top_p_0.9",
            SamplingParams {
                top_p: 0.9,
                seed: Some(1),
                ..Default::default()
            },
        ),
        (
            "top_k_40_penalties",
            SamplingParams {
                top_k: 40,
                presence_penalty: 0.5,
                frequency_penalty: 0.5,
                seed: Some(1),
                ..Default::default()
            },
        ),
        (
            "logprobs_5",
            SamplingParams {
                logprobs: Some(5),
                seed: Some(1),
                ..Default::default()
            },
        ),
    ] {
        let mut s = Sampler::new(params, 0, &[]);
        g.bench_function(name, |b| b.iter(|| s.sample(&logits)));
    }
    g.finish();
}

fn genarm_combine(c: &mut Criterion) {
    let row = |seed: usize| -> Vec<f32> {
        (0..49152)
            .map(|i| ((i * 7919 + seed) % 1000) as f32 / 100.0)
            .collect()
    };
    let (base, arm1, arm2) = (row(0), row(1), row(2));
    let mut tilt = tilt::decode::genarm::Tilt::default();
    let mut g = c.benchmark_group("genarm_combine");
    g.bench_function("one_arm", |b| {
        b.iter(|| tilt.combine(&base, &[(1.0, &arm1)], 49152))
    });
    g.bench_function("two_arms", |b| {
        b.iter(|| tilt.combine(&base, &[(1.0, &arm1), (-0.5, &arm2)], 49152))
    });
    g.finish();
}

/// One mask of a JSON schema's state over the base's vocabulary (what each draw under
/// `response_format` adds), at the value's start, inside a string and inside a number.
fn structured_mask(c: &mut Criterion) {
    let m = model();
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"]
    });
    let grammar = Grammar::json_schema(&m.vocab, &schema).expect("the schema compiles");
    let row = vec![0.0f32; m.vocab.size()];
    let mut g = c.benchmark_group("structured");
    for (name, prefix) in [
        ("mask_at_start", ""),
        ("mask_in_string", r#"{"name": "Ada Love"#),
        ("mask_in_number", r#"{"name": "Ada", "age": 3"#),
    ] {
        let tokens = m.vocab.encode(prefix, false).unwrap();
        let state = || {
            let mut s = grammar.start();
            tokens.iter().for_each(|&t| s.commit(t));
            s
        };
        let mut check = (state(), row.clone());
        check.0.mask(&mut check.1);
        let allowed = check.1.iter().filter(|x| x.is_finite()).count();
        assert!(allowed > 1, "{name}: the prefix left the grammar");
        g.bench_function(name, |b| {
            b.iter_batched_ref(
                || (state(), row.clone()),
                |(s, row)| s.mask(row),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, forward, sampler, genarm_combine, structured_mask);
criterion_main!(benches);
