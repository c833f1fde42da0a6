//! Single-stream decode and prefill speed of tilt's forward, side by side with candle's stock
//! `quantized_llama` on the same GGUF, in one run. Medians of several runs; ratios printed.
//!
//!     cargo bench --bench model_speed --features stock-candle
//!
//! Env: TILT_BENCH_RUNS (default 5), TILT_BENCH_DECODE (128), TILT_BENCH_PREFILL (512).

use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use tilt::model::{fetch, ForwardItem, KvCache, Logits, Model, Role};
use tilt::sampling::argmax;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let runs = env("TILT_BENCH_RUNS", 5);
    let decode = env("TILT_BENCH_DECODE", 128);
    let prefill = env("TILT_BENCH_PREFILL", 512);
    let path = fetch::ensure(&fetch::models_dir(), fetch::DEFAULT_MODEL)?;
    let model = Model::load(&path, "smollm2", Role::Base)?;
    let prompt: Vec<u32> = (0..prefill as u32)
        .map(|i| 1000 + (i * 7919) % 40000)
        .collect();
    let mut file = std::fs::File::open(&path)?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)?;
    let mut stock = ModelWeights::from_gguf(content, &mut file, &Device::Cpu)?;
    println!(
        "threads: {}  runs: {runs}  decode: {decode} tokens  prefill: {prefill} tokens",
        candle_core::utils::get_num_threads()
    );

    let tilt_decode = |_: usize| -> anyhow::Result<f64> {
        let mut cache = KvCache::new();
        let out = model.llama.forward(&mut [ForwardItem {
            cache: &mut cache,
            tokens: &[1],
            logits: Logits::Last,
        }])?;
        let mut next = argmax(out.last(0).unwrap());
        let t = Instant::now();
        for _ in 0..decode {
            let out = model.llama.forward(&mut [ForwardItem {
                cache: &mut cache,
                tokens: &[next],
                logits: Logits::Last,
            }])?;
            next = argmax(out.last(0).unwrap());
        }
        Ok(decode as f64 / t.elapsed().as_secs_f64())
    };
    let tilt_prefill = |_: usize| -> anyhow::Result<f64> {
        let mut cache = KvCache::new();
        let t = Instant::now();
        model.llama.forward(&mut [ForwardItem {
            cache: &mut cache,
            tokens: &prompt,
            logits: Logits::Last,
        }])?;
        Ok(prefill as f64 / t.elapsed().as_secs_f64())
    };
    let mut stock_decode = |_: usize| -> anyhow::Result<f64> {
        let x = Tensor::new(&[1u32], &Device::Cpu)?.unsqueeze(0)?;
        let mut next = argmax(&stock.forward(&x, 0)?.squeeze(0)?.to_vec1::<f32>()?);
        let t = Instant::now();
        for i in 0..decode {
            let x = Tensor::new(&[next], &Device::Cpu)?.unsqueeze(0)?;
            next = argmax(&stock.forward(&x, i + 1)?.squeeze(0)?.to_vec1::<f32>()?);
        }
        Ok(decode as f64 / t.elapsed().as_secs_f64())
    };
    let mut rows = Vec::new();
    let tilt_d = median((0..runs).map(tilt_decode).collect::<anyhow::Result<_>>()?);
    let stock_d = median(
        (0..runs)
            .map(&mut stock_decode)
            .collect::<anyhow::Result<_>>()?,
    );
    let tilt_p = median((0..runs).map(tilt_prefill).collect::<anyhow::Result<_>>()?);
    let mut stock_prefill = |_: usize| -> anyhow::Result<f64> {
        let x = Tensor::new(prompt.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let t = Instant::now();
        stock.forward(&x, 0)?;
        Ok(prefill as f64 / t.elapsed().as_secs_f64())
    };
    let stock_p = median(
        (0..runs)
            .map(&mut stock_prefill)
            .collect::<anyhow::Result<_>>()?,
    );
    rows.push(("decode tok/s", tilt_d, stock_d));
    rows.push((
        if prefill == 512 {
            "prefill-512 tok/s"
        } else {
            "prefill tok/s"
        },
        tilt_p,
        stock_p,
    ));
    println!("| metric | tilt | candle quantized_llama | ratio |");
    println!("|---|---|---|---|");
    for (name, a, b) in rows {
        println!("| {name} | {a:.1} | {b:.1} | {:.2}x |", a / b);
    }
    Ok(())
}
