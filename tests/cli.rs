//! The command line: sensible output, and clear errors (never a panic) for bad models and prompts.

mod common;

use std::process::{Command, Output};

fn tilt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tilt"))
        .args(args)
        .output()
        .expect("tilt runs")
}

/// `tilt generate --model PATH --prompt hi`.
fn generate_with(path: &std::path::Path) -> Output {
    tilt(&[
        "generate",
        "--model",
        path.to_str().unwrap(),
        "--prompt",
        "hi",
    ])
}

fn assert_clean_failure(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert!(stderr.contains(needle), "stderr lacks {needle:?}: {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "a panic: {stderr}"
    );
}

#[test]
fn generate_writes_english_for_the_haiku_prompt() {
    let model = common::model_path();
    let out = tilt(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--chat",
        "--prompt",
        "Write a haiku about the sea",
        "--temperature",
        "0",
        "--max-tokens",
        "40",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let words: Vec<&str> = text.split_whitespace().collect();
    assert!(words.len() >= 5, "{text:?}");
    let english = ["the", "sea", "a", "of", "and", "in", "waves", "ocean"];
    assert!(words.iter().any(|w| english.contains(&w.to_lowercase().trim_matches(|c: char| !c.is_alphabetic()))), "{text:?}");
    assert!(!text.contains("<|im_end|>"));
}

#[test]
fn missing_model_file() {
    let out = generate_with(std::path::Path::new("/nonexistent/model.gguf"));
    assert_clean_failure(&out, "model not found");
}

#[test]
fn corrupt_model_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.gguf");
    std::fs::write(&path, b"GGUF\x03\x00\x00\x00garbage that is not a model").unwrap();
    let out = generate_with(&path);
    assert_clean_failure(&out, "not a readable GGUF file");
    // A truncated copy of the real model.
    let real = std::fs::read(common::model_path()).unwrap();
    std::fs::write(&path, &real[..real.len() / 3]).unwrap();
    let out = generate_with(&path);
    assert_clean_failure(&out, "broken.gguf");
}

#[test]
fn unsupported_architecture() {
    use candle_core::quantized::gguf_file::{self, Value};
    use candle_core::quantized::{GgmlDType, QTensor};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpt2.gguf");
    let t = QTensor::quantize(
        &candle_core::Tensor::zeros((4, 32), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let mut f = std::fs::File::create(&path).unwrap();
    gguf_file::write(
        &mut f,
        &[("general.architecture", &Value::String("gpt2".into()))],
        &[("token_embd.weight", &t)],
    )
    .unwrap();
    drop(f);
    let out = generate_with(&path);
    assert_clean_failure(&out, "unsupported architecture `gpt2`");
}

#[test]
fn prompt_longer_than_the_context() {
    let model = common::model_path();
    let prompt = "word ".repeat(9000);
    let out = tilt(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        &prompt,
    ]);
    assert_clean_failure(&out, "context");
}

/// The first log line of `tilt serve` that says it is ready, in `format`, from a pipe.
fn ready_line(format: &str) -> String {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_tilt"))
        .args([
            "--log-format",
            format,
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tilt serve starts");
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let line = stderr
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains("ready"))
        .expect("a ready line");
    let _ = child.kill();
    let _ = child.wait();
    line
}

#[test]
fn logs_are_plain_text_on_a_pipe_or_json_objects() {
    let text = ready_line("text");
    assert!(!text.contains('\x1b'), "colour codes on a pipe: {text:?}");
    let json: serde_json::Value = serde_json::from_str(&ready_line("json")).expect("a JSON line");
    assert_eq!(json["level"], "INFO");
    assert!(
        json["fields"]["message"]
            .as_str()
            .unwrap()
            .contains("ready"),
        "{json}"
    );
}

#[test]
fn a_reward_model_named_like_a_builtin_scorer_is_refused() {
    let model = common::model_path();
    let out = tilt(&[
        "serve",
        "--port",
        "0",
        "--model",
        model.to_str().unwrap(),
        "--no-default-rewards",
        "--reward",
        "sentiment=models/arm-positive",
    ]);
    assert_clean_failure(
        &out,
        "reward model `sentiment`: a built-in scorer has that name",
    );
}
