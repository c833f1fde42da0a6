//! Decode-step cost at batch 1, 4, 8, 16 and 32 (cache length ~200, or `CTX`) beside the
//! roofline (the weights streamed once a step at this machine's read bandwidth), and the sampler
//! per row, in one process, interleaved so machine noise hits all alike; prints medians.
//! `--e2e` instead times whole requests through the engine: one 128-token sample against
//! best-of-4 × 128 (ranked by the sentiment scorer, then by the `positive` ARM) and against
//! GenARM with the shipped `positive` ARM, then with two and all three shipped ARMs, then with
//! each reward model named after `--e2e` as NAME=PATH (a LoRA ARM's folder, say).
//!
//!     cargo bench --bench batch_decode [-- ROUNDS [--only BATCH | --e2e [NAME=PATH ...]]]

use std::time::Instant;

use serde_json::json;
use tilt::decode::{DecoderSpec, Generation};
use tilt::engine::{Engine, EngineOptions, Event};
use tilt::model::{fetch, ForwardItem, KvCache, Logits, Model, Role};
use tilt::sampling::{Sampler, SamplingParams};

/// Batch sizes timed side by side.
const BATCHES: [usize; 5] = [1, 4, 8, 16, 32];

/// Bytes a second that all cores read from a 1 GiB buffer, summing it (the best of three).
fn read_bandwidth() -> f64 {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let words = vec![1u64; (1 << 30) / 8];
    let chunk = words.len().div_ceil(threads);
    (0..3)
        .map(|_| {
            let t = Instant::now();
            std::thread::scope(|s| {
                for part in words.chunks(chunk) {
                    s.spawn(move || std::hint::black_box(part.iter().fold(0u64, |a, &w| a ^ w)));
                }
            });
            (words.len() * 8) as f64 / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; the rest is `[ROUNDS] [--only BATCH]`.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let rounds: usize = args.first().map_or(30, |a| a.parse().expect("ROUNDS"));
    let only: Option<usize> = (args.get(1).map(String::as_str) == Some("--only"))
        .then(|| args[2].parse().expect("BATCH"));
    let path = fetch::ensure(&fetch::models_dir(), fetch::DEFAULT_MODEL).expect("default model");
    let m = Model::load(&path, "smollm2", Role::Base).expect("model loads");
    if args.get(1).map(String::as_str) == Some("--e2e") {
        let rewards = args[2..]
            .iter()
            .map(|a| tilt::reward::parse_flag(a).expect("NAME=PATH"))
            .collect();
        return end_to_end(m, rounds, rewards);
    }
    let ctx: u32 = std::env::var("CTX").map_or(200, |v| v.parse().expect("CTX"));
    let prompt: Vec<u32> = (0..ctx).map(|i| 1000 + i * 37).collect();
    let mut primed = KvCache::new();
    m.llama
        .forward(&mut [ForwardItem {
            cache: &mut primed,
            tokens: &prompt,
            logits: Logits::None,
        }])
        .unwrap();
    let len = primed.len();
    let mut caches: Vec<KvCache> = (0..BATCHES[BATCHES.len() - 1])
        .map(|_| primed.fork())
        .collect();
    let step = |caches: &mut [KvCache]| -> (f64, Vec<f32>) {
        let t = Instant::now();
        let mut items: Vec<ForwardItem> = caches
            .iter_mut()
            .map(|cache| ForwardItem {
                cache,
                tokens: &[42],
                logits: Logits::Last,
            })
            .collect();
        let out = m.llama.forward(&mut items).unwrap();
        let dt = t.elapsed().as_secs_f64() * 1e3;
        for c in caches.iter_mut() {
            c.truncate(len);
        }
        (dt, out.data)
    };
    // Warm up (grows the forked caches once).
    for _ in 0..3 {
        step(&mut caches[..1]);
        step(&mut caches);
    }
    // `--only B`: just batch-B steps, to profile one shape.
    if let Some(b) = only {
        let times: Vec<f64> = (0..rounds).map(|_| step(&mut caches[..b]).0).collect();
        println!("batch {b}: {:.2} ms", median(times));
        return;
    }
    let mut times = vec![Vec::new(); BATCHES.len()];
    let mut logits = Vec::new();
    for _ in 0..rounds {
        for (t, &b) in times.iter_mut().zip(&BATCHES) {
            let (dt, l) = step(&mut caches[..b]);
            t.push(dt);
            logits = l;
        }
    }
    // The roofline: every step streams the weights (about the GGUF file) from memory.
    let weights = std::fs::metadata(&path).map_or(0, |m| m.len()) as f64;
    let bandwidth = read_bandwidth();
    let floor = weights / bandwidth * 1e3;
    println!(
        "decode step at {len} cached positions; weights {:.0} MB, a plain read at {:.1} GB/s: \
         floor {floor:.2} ms a step at any batch size",
        weights / 1e6,
        bandwidth / 1e9
    );
    println!("| batch | step ms | × batch 1 | × floor | tokens/s |");
    println!("|---|---|---|---|---|");
    let one = median(times[0].clone());
    for (t, &b) in times.into_iter().zip(&BATCHES) {
        let ms = median(t);
        println!(
            "| {b} | {ms:.2} | {:.2} | {:.2} | {:.0} |",
            ms / one,
            ms / floor,
            b as f64 / ms * 1e3
        );
    }
    let row = &logits[..m.llama.cfg.vocab_size];
    for (name, params) in [
        ("default", SamplingParams::default()),
        (
            "top_p_0.9",
            SamplingParams {
                top_p: 0.9,
                ..Default::default()
            },
        ),
    ] {
        let mut s = Sampler::new(params, 0, &prompt);
        let mut times = Vec::new();
        for _ in 0..rounds * 4 {
            let t = Instant::now();
            std::hint::black_box(s.sample(row));
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        println!("sampler {name}: {:.3} ms/row", median(times));
    }
}

/// Wall time of one request of 128 tokens (ignoring end of generation), in ms.
fn request(engine: &Engine, spec: &DecoderSpec, seed: u64) -> f64 {
    let g = Generation {
        prompt: engine
            .base()
            .vocab
            .encode("Write a short story about a lighthouse keeper.", false)
            .unwrap(),
        max_tokens: 128,
        stop: Vec::new(),
        ignore_eos: true,
        n: 1,
        sampling: SamplingParams {
            seed: Some(seed),
            ..Default::default()
        },
        model_prompts: Default::default(),
    };
    let t = Instant::now();
    let mut rx = engine
        .submit(spec.build(g, engine.models()).unwrap())
        .unwrap();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Done { .. } => return t.elapsed().as_secs_f64() * 1e3,
            Event::Failed(msg) => panic!("request failed: {msg}"),
            _ => {}
        }
    }
    panic!("the engine stopped");
}

fn end_to_end(m: Model, rounds: usize, rewards: Vec<(String, std::path::PathBuf)>) {
    let companions = tilt::model::companions::Companions {
        manifest: true,
        rewards: rewards.clone(),
        ..Default::default()
    };
    let models =
        tilt::model::companions::with_companions(m, &companions, tilt::model::Precision::Q8_0)
            .expect("the shipped reward models load");
    let engine = Engine::start(models, EngineOptions::default());
    let spec = |decoder: &str, params: serde_json::Value| {
        DecoderSpec::parse(
            decoder,
            params.as_object().cloned().unwrap(),
            engine.rewards(),
        )
        .unwrap()
    };
    let sample = spec("sample", json!({}));
    let mut others = vec![
        (
            "best-of-4".to_string(),
            spec("best_of_n", json!({"n": 4, "rewards": {"sentiment": 1.0}})),
        ),
        (
            "best-of-4 by an ARM".to_string(),
            spec("best_of_n", json!({"n": 4, "rewards": {"positive": 1.0}})),
        ),
        (
            "genarm +1 ARM".to_string(),
            spec("genarm", json!({"rewards": {"positive": 1.0}})),
        ),
        (
            "genarm +2 ARMs".to_string(),
            spec(
                "genarm",
                json!({"rewards": {"positive": 1.0, "concise": 1.0}}),
            ),
        ),
        (
            "genarm +3 ARMs".to_string(),
            spec(
                "genarm",
                json!({"rewards": {"positive": 1.0, "concise": 1.0, "simple": 1.0}}),
            ),
        ),
    ];
    for (name, _) in &rewards {
        let params = json!({"rewards": {name.as_str(): 1.0}});
        others.push((format!("genarm +{name}"), spec("genarm", params)));
    }
    let mut one = Vec::new();
    let mut times = vec![Vec::new(); others.len()];
    for r in 0..rounds as u64 {
        one.push(request(&engine, &sample, r));
        for ((_, s), t) in others.iter().zip(&mut times) {
            t.push(request(&engine, s, r));
        }
    }
    let one = median(one);
    println!("128 tokens: sample {one:.0} ms");
    for ((name, _), t) in others.iter().zip(times) {
        let t = median(t);
        println!("  {name} {t:.0} ms, ratio {:.2}", t / one);
    }
}
