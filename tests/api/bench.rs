//! `tilt bench` end to end against the real server: a load run and an idealised-runtime sweep,
//! each writing a complete report.

use serde_json::Value;

use crate::server::Client;

pub fn cases() -> Vec<(&'static str, crate::Case)> {
    crate::cases![bench_measures_the_real_server]
}

fn tilt_bench(url: &str, args: &[&str], out: &std::path::Path) -> Value {
    let bin = std::env::var("TILT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tilt").into());
    let output = std::process::Command::new(bin)
        .args(["bench", "--url", url])
        .args(args)
        .arg("--output")
        .arg(out)
        .output()
        .expect("tilt bench runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

async fn bench_measures_the_real_server(c: Client) {
    let url = c.url("");
    let url = url.trim_end_matches('/');
    let dir = tempfile::tempdir().unwrap();
    let load = tilt_bench(
        url,
        &[
            "--requests=4",
            "--concurrency=1,2",
            "--prompt-tokens=16",
            "--output-tokens=8",
            "--alignment",
            r#"{"decoder":"sample"}"#,
        ],
        &dir.path().join("load.json"),
    );
    let runs = load["series"][0]["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "one run per concurrency");
    for run in runs {
        let s = &run["summary"];
        assert_eq!(
            (s["completed"].as_u64(), s["failed"].as_u64()),
            (Some(4), Some(0)),
            "{s}"
        );
        // ignore_eos: every request generates exactly max_tokens, counted from the server's usage.
        assert_eq!(s["output_tokens"].as_u64(), Some(32), "{s}");
        assert_eq!(s["outputs_counted_from_chunks"], 0, "{s}");
        for metric in ["ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"] {
            let median = s[metric]["median"]
                .as_f64()
                .unwrap_or_else(|| panic!("{metric}: {s}"));
            assert!(median > 0.0, "{metric}: {s}");
        }
        for sample in run["samples"].as_array().unwrap() {
            assert_eq!(sample["ok"], true);
            assert_eq!(sample["tokens_from_usage"], true);
            // Gaps between chunks that carry text: at most 8 for 8 tokens. Each token's text is a
            // chunk, and one more comes at the end when the last token stopped mid-character: its
            // complete characters go out with it, the trailing bytes when the stream finishes.
            // Fewer with ignore_eos, when the model goes on emitting control tokens (no text).
            let gaps = sample["itl_ms"].as_array().unwrap().len();
            assert!((1..=8).contains(&gaps), "8 tokens, {gaps} gaps: {sample}");
            assert!(sample["prompt_tokens"].as_u64().unwrap() > 0);
        }
    }
    let sweep = tilt_bench(
        url,
        &[
            "--sweep",
            "--requests=1",
            "--sweep-prompt-tokens=8,64",
            "--sweep-output-tokens=2,12",
        ],
        &dir.path().join("sweep.json"),
    );
    let fit = &sweep["series"][0]["fit"];
    for field in [
        "intercept_ms",
        "ms_per_prompt_token",
        "ms_per_output_token",
        "r2",
    ] {
        assert!(fit[field].is_number(), "{field}: {fit}");
    }
    assert_eq!(fit["samples"], 4);
    assert!(
        fit["ms_per_output_token"].as_f64().unwrap() > 0.0,
        "each output token costs time: {fit}"
    );
}
