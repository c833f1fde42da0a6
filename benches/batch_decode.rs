//! Decode-step cost for batch 1 vs batch 4 (cache length ~200), and the sampler per row, in one
//! process, interleaved so machine noise hits both alike; prints medians.
//!
//!     cargo bench --bench batch_decode [-- ROUNDS [--only BATCH]]

use std::time::Instant;

use tilt::model::{fetch, ForwardItem, KvCache, Logits, Model, Role};
use tilt::sampling::{Sampler, SamplingParams};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; the rest is `[ROUNDS] [--only BATCH]`.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let rounds: usize = args.first().map_or(30, |a| a.parse().expect("ROUNDS"));
    let only: Option<usize> = (args.get(1).map(String::as_str) == Some("--only"))
        .then(|| args[2].parse().expect("BATCH"));
    let path = fetch::ensure(&fetch::models_dir(), fetch::DEFAULT_MODEL).expect("default model");
    let m = Model::load(&path, "smollm2", Role::Base).expect("model loads");
    let prompt: Vec<u32> = (0..200u32).map(|i| 1000 + i * 37).collect();
    let mut primed = KvCache::new();
    m.llama
        .forward(&mut [ForwardItem {
            cache: &mut primed,
            tokens: &prompt,
            logits: Logits::None,
        }])
        .unwrap();
    let len = primed.len();
    let mut caches: Vec<KvCache> = (0..4).map(|_| primed.fork()).collect();
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
    let (mut one, mut four) = (Vec::new(), Vec::new());
    let mut logits = Vec::new();
    for _ in 0..rounds {
        one.push(step(&mut caches[..1]).0);
        let (dt, l) = step(&mut caches);
        four.push(dt);
        logits = l;
    }
    let (one, four) = (median(one), median(four));
    println!(
        "decode step at {len}: batch 1 {one:.2} ms, batch 4 {four:.2} ms, ratio {:.2}",
        four / one
    );
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
