//! `tilt bench` end to end against a mock OpenAI-compatible SSE server on 127.0.0.1: a healthy
//! one, and ones that fail in the ways benchmark tools have mistaken for fast successes.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use clap::Parser;
use futures::StreamExt;
use serde_json::{json, Value};

use tilt::bench::{execute, markdown, write, BenchArgs};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Ok,
    /// Like `Ok` without the usage chunk.
    NoUsage,
    /// 500 with an OpenAI-shaped error body.
    Status500,
    /// 200, two tokens, then the body ends without `data: [DONE]`.
    Truncated,
    /// 200, two tokens, an error event, then `data: [DONE]` as if all were well.
    ErrorEvent,
}

struct Mock {
    mode: Mode,
    bodies: Mutex<Vec<Value>>,
}

/// The mock counts two tokens per word, so prompt calibration has something to find.
fn tokens(text: &str) -> usize {
    2 * text.split_whitespace().count()
}

async fn start(mode: Mode) -> (String, Arc<Mock>) {
    let mock = Arc::new(Mock {
        mode,
        bodies: Mutex::new(Vec::new()),
    });
    let app = Router::new()
        .route("/v1/completions", post(complete))
        .route("/v1/chat/completions", post(complete))
        .route(
            "/v1/models",
            get(|| async { Json(json!({"object": "list", "data": [{"id": "mock-model"}]})) }),
        )
        .route(
            "/tokenize",
            post(|Json(body): Json<Value>| async move {
                Json(json!({"tokens": vec![0; tokens(body["content"].as_str().unwrap())]}))
            }),
        )
        .with_state(mock.clone());
    // Without TCP_NODELAY, Nagle's algorithm and delayed ACKs hold small SSE writes for ~40 ms.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let listener = listener.tap_io(|tcp| tcp.set_nodelay(true).unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, mock)
}

async fn complete(State(mock): State<Arc<Mock>>, uri: Uri, Json(body): Json<Value>) -> Response {
    mock.bodies.lock().unwrap().push(body.clone());
    if mock.mode == Mode::Status500 {
        let error = json!({"error": {"message": "boom", "type": "server_error"}});
        return (StatusCode::INTERNAL_SERVER_ERROR, Json(error)).into_response();
    }
    let chat = uri.path().contains("chat");
    let prompt = if chat {
        body["messages"][0]["content"].as_str().unwrap()
    } else {
        body["prompt"].as_str().unwrap()
    };
    let n = body["max_tokens"].as_u64().unwrap();
    let mut events = Vec::new();
    if chat {
        // A role-only first chunk, which must not count as the first token.
        events.push(json!({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}));
    }
    for _ in 0..n {
        events.push(if chat {
            json!({"choices": [{"index": 0, "delta": {"content": "tok "}}]})
        } else {
            json!({"choices": [{"index": 0, "text": "tok "}]})
        });
    }
    let usage = json!({"prompt_tokens": tokens(prompt), "completion_tokens": n});
    let mut lines: Vec<String> = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    match mock.mode {
        Mode::Ok => lines.push(format!(
            "data: {}\n\n",
            json!({"choices": [], "usage": usage})
        )),
        Mode::NoUsage => {}
        Mode::Truncated => lines.truncate(2),
        Mode::ErrorEvent => {
            lines.truncate(2);
            lines.push("data: {\"error\": {\"message\": \"overloaded\"}}\n\n".into());
        }
        Mode::Status500 => unreachable!(),
    }
    if mock.mode != Mode::Truncated {
        lines.push("data: [DONE]\n\n".into());
    }
    let stream = futures::stream::iter(lines).then(|line| async move {
        tokio::time::sleep(Duration::from_millis(1)).await;
        Ok::<_, Infallible>(line)
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

fn args(url: &str, extra: &[&str]) -> BenchArgs {
    let base = ["bench", "--url", url, "--request-timeout", "30"];
    BenchArgs::try_parse_from(base.iter().chain(extra)).unwrap()
}

/// The report as a reader of the JSON file sees it.
async fn report(args: &BenchArgs) -> Value {
    serde_json::to_value(execute(args).await.unwrap()).unwrap()
}

const SUMMARY_FIELDS: &[&str] = &[
    "requests",
    "completed",
    "failed",
    "duration_s",
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
    "goodput",
    "prompt_tokens",
    "output_tokens",
    "outputs_counted_from_chunks",
    "errors_by_status",
    "errors_by_kind",
    "ttft_ms",
    "tpot_ms",
    "itl_ms",
    "e2el_ms",
];

const SAMPLE_FIELDS: &[&str] = &[
    "index",
    "ok",
    "status",
    "error",
    "error_detail",
    "start_ms",
    "ttft_ms",
    "e2el_ms",
    "tpot_ms",
    "itl_ms",
    "prompt_tokens",
    "output_tokens",
    "tokens_from_usage",
    "max_tokens",
];

#[tokio::test]
async fn load_runs_write_a_complete_report_per_decoder_and_load_point() {
    let (url, mock) = start(Mode::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let decoders = dir.path().join("decoders.jsonl");
    std::fs::write(&decoders, "{\"decoder\": \"sample\"}\n\nnull\n").unwrap();
    let out = dir.path().join("results/run.json");
    let args = args(
        &url,
        &[
            "--concurrency=1,2",
            "--requests=5",
            "--prompt-tokens=40",
            "--output-tokens=6",
            "--alignment-file",
            decoders.to_str().unwrap(),
            "--slo-ttft=60000",
            "--slo-tpot=60000",
            "--output",
            out.to_str().unwrap(),
        ],
    );
    let written = write(&execute(&args).await.unwrap(), &out).unwrap();
    assert_eq!(written.len(), 6, "{written:?}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();

    let series = report["series"].as_array().unwrap();
    assert_eq!(series.len(), 2);
    assert_eq!(series[0]["alignment"], json!({"decoder": "sample"}));
    assert_eq!(series[1]["alignment"], Value::Null);
    for s in series {
        assert_eq!(s["model"], "mock-model");
        assert_eq!(s["tokens_per_word"], 2.0);
        assert_eq!(s["fit"], Value::Null);
        let runs = s["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!(
            (
                runs[0]["concurrency"].as_u64(),
                runs[1]["concurrency"].as_u64()
            ),
            (Some(1), Some(2))
        );
        for run in runs {
            assert_eq!(run["rate"], Value::Null);
            assert_eq!(
                (run["prompt_tokens"].as_u64(), run["output_tokens"].as_u64()),
                (Some(40), Some(6))
            );
            let summary = &run["summary"];
            for field in SUMMARY_FIELDS {
                assert!(
                    !summary[field].is_null(),
                    "summary.{field} missing: {summary}"
                );
            }
            assert_eq!(summary["completed"], 5);
            assert_eq!(summary["failed"], 0);
            assert_eq!(summary["output_tokens"], 30);
            // Calibrated at two tokens per word, 40-token prompts are 20 words: the mock's usage says 40.
            assert_eq!(summary["prompt_tokens"], 200);
            assert_eq!(summary["outputs_counted_from_chunks"], 0);
            assert_eq!(summary["errors_by_status"], json!({}));
            for metric in ["ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"] {
                for stat in ["count", "mean", "median", "p90", "p99", "min", "max"] {
                    assert!(
                        summary[metric][stat].is_number(),
                        "{metric}.{stat}: {summary}"
                    );
                }
            }
            assert_eq!(summary["itl_ms"]["count"], 25);
            let samples = run["samples"].as_array().unwrap();
            assert_eq!(samples.len(), 5);
            for (i, sample) in samples.iter().enumerate() {
                for field in SAMPLE_FIELDS {
                    assert!(
                        sample.get(field).is_some(),
                        "sample.{field} missing: {sample}"
                    );
                }
                assert_eq!(sample["index"], i);
                assert_eq!(sample["ok"], true);
                assert_eq!(sample["status"], 200);
                assert_eq!(sample["error"], Value::Null);
                assert_eq!(sample["output_tokens"], 6);
                assert_eq!(sample["itl_ms"].as_array().unwrap().len(), 5);
                assert_eq!(sample["tokens_from_usage"], true);
            }
        }
    }

    // Two series, each one warm-up request then two runs of five.
    let bodies = mock.bodies.lock().unwrap();
    assert_eq!(bodies.len(), 22);
    for body in bodies.iter() {
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["ignore_eos"], true);
        assert_eq!(body["max_tokens"], 6);
        assert_eq!(body["model"], "mock-model");
    }
    let aligned = bodies
        .iter()
        .filter(|b| b["alignment"] == json!({"decoder": "sample"}));
    assert_eq!(aligned.count(), 11);
    assert_eq!(
        bodies
            .iter()
            .filter(|b| b.get("alignment").is_none())
            .count(),
        11
    );
    // No prompt repeats, so no server prefix cache can flatter a run.
    let mut prompts: Vec<&str> = bodies
        .iter()
        .map(|b| b["prompt"].as_str().unwrap())
        .collect();
    prompts.sort();
    prompts.dedup();
    assert_eq!(prompts.len(), 22);

    let md = std::fs::read_to_string(out.with_extension("md")).unwrap();
    assert!(md.contains("## {\"decoder\":\"sample\"}"), "{md}");
    assert!(md.contains("| 1 client | 5 | 0 |"), "{md}");
    assert!(md.contains("| 2 clients | 5 | 0 |"), "{md}");
    assert!(md.contains("## Relative to"), "{md}");
    for metric in ["latency", "ttft", "tpot", "throughput"] {
        let svg = std::fs::read_to_string(dir.path().join(format!("results/run-{metric}.svg")));
        let svg = svg.unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // One line per series (the grid and axes are thinner).
        assert_eq!(svg.matches("stroke-width=\"2\"").count(), 2, "{metric}");
        assert!(md.contains(&format!("(run-{metric}.svg)")), "{md}");
    }
}

#[tokio::test]
async fn a_long_prompt_arrives_mid_run_and_the_gaps_around_its_prefill_are_reported() {
    let (url, mock) = start(Mode::Ok).await;
    let args = args(
        &url,
        &[
            "--concurrency=2",
            "--requests=2",
            "--warmup=0",
            "--output-tokens=60",
            "--prompt-tokens=8",
            "--long-prompt-tokens=400",
            "--long-prompt-after=0.02",
        ],
    );
    let ran = execute(&args).await.unwrap();
    let md = markdown(&ran);
    assert!(md.contains("a 400-token prompt arrived at"), "{md}");
    let report = serde_json::to_value(ran).unwrap();
    let run = &report["series"][0]["runs"][0];
    // The long prompt is not one of the run's requests.
    assert_eq!(run["summary"]["requests"], 2);
    let long = &run["long_prompt"];
    assert_eq!(long["sample"]["ok"], true);
    assert_eq!(long["sample"]["prompt_tokens"], 400);
    assert_eq!(long["sample"]["max_tokens"], 2);
    assert!(long["sample"]["start_ms"].as_f64().unwrap() >= 20.0);
    let (during, without) = (&long["itl_during_ms"], &long["itl_without_ms"]);
    let count = |d: &Value| d["count"].as_u64().unwrap();
    assert!(count(during) > 0 && count(without) > 0, "{long}");
    // Every gap of the two 60-token streams is on one side or the other.
    assert_eq!(count(during) + count(without), 2 * 59);
    assert!(long["p99_during_over_median_without"].as_f64().unwrap() > 0.0);
    let prompts: Vec<usize> = mock
        .bodies
        .lock()
        .unwrap()
        .iter()
        .map(|b| tokens(b["prompt"].as_str().unwrap()))
        .collect();
    assert!(prompts.contains(&400), "{prompts:?}");
}

/// The one run of a bench at `mode` with four requests, two at a time and no warm-up.
async fn failing_run(mode: Mode) -> Value {
    let (url, _mock) = start(mode).await;
    let args = args(
        &url,
        &[
            "--concurrency=2",
            "--requests=4",
            "--warmup=0",
            "--output-tokens=8",
        ],
    );
    let report = report(&args).await;
    let run = &report["series"][0]["runs"][0];
    let summary = &run["summary"];
    assert_eq!(
        (summary["completed"].as_u64(), summary["failed"].as_u64()),
        (Some(0), Some(4))
    );
    // Failures contribute no latency and no throughput.
    for metric in ["ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"] {
        assert_eq!(summary[metric], Value::Null, "{metric}");
    }
    assert_eq!(summary["request_throughput"], 0.0);
    assert_eq!(summary["output_tokens"], 0);
    for sample in run["samples"].as_array().unwrap() {
        assert_eq!(sample["ok"], false);
        assert_eq!(sample["ttft_ms"], Value::Null);
        assert!(sample["error_detail"].is_string());
    }
    run.clone()
}

#[tokio::test]
async fn http_errors_are_failures_with_their_status() {
    let run = failing_run(Mode::Status500).await;
    assert_eq!(run["summary"]["errors_by_status"], json!({"500": 4}));
    assert_eq!(run["summary"]["errors_by_kind"], json!({"http_status": 4}));
    let sample = &run["samples"][0];
    assert_eq!(sample["status"], 500);
    assert!(
        sample["error_detail"].as_str().unwrap().contains("boom"),
        "{sample}"
    );
}

#[tokio::test]
async fn streams_ending_without_done_are_failures() {
    let run = failing_run(Mode::Truncated).await;
    assert_eq!(run["summary"]["errors_by_status"], json!({"200": 4}));
    assert_eq!(
        run["summary"]["errors_by_kind"],
        json!({"incomplete_stream": 4})
    );
}

#[tokio::test]
async fn error_events_are_failures_even_when_done_follows() {
    let run = failing_run(Mode::ErrorEvent).await;
    assert_eq!(run["summary"]["errors_by_status"], json!({"200": 4}));
    assert_eq!(run["summary"]["errors_by_kind"], json!({"stream_error": 4}));
    let detail = run["samples"][0]["error_detail"].as_str().unwrap();
    assert!(detail.contains("overloaded"), "{detail}");
}

#[tokio::test]
async fn chat_without_usage_counts_text_chunks_and_says_so() {
    let (url, mock) = start(Mode::NoUsage).await;
    let args = args(
        &url,
        &[
            "--endpoint=chat",
            "--requests=3",
            "--output-tokens=7",
            "--prompt-tokens=10",
            "--warmup=0",
        ],
    );
    let report = report(&args).await;
    let summary = &report["series"][0]["runs"][0]["summary"];
    assert_eq!(summary["completed"], 3);
    assert_eq!(summary["outputs_counted_from_chunks"], 3);
    // The role-only chunk is neither a token nor the first token.
    assert_eq!(summary["output_tokens"], 21);
    assert_eq!(summary["itl_ms"]["count"], 18);
    // Without usage the prompt length is the synthetic prompt's intended one.
    assert_eq!(summary["prompt_tokens"], 30);
    let sample = &report["series"][0]["runs"][0]["samples"][0];
    assert_eq!(sample["tokens_from_usage"], false);
    let bodies = mock.bodies.lock().unwrap();
    assert_eq!(bodies[0]["messages"][0]["role"], "user");
    assert!(bodies[0].get("prompt").is_none());
}

#[tokio::test]
async fn open_loop_sends_every_request() {
    let (url, mock) = start(Mode::Ok).await;
    let args = args(
        &url,
        &[
            "--rate=200",
            "--requests=6",
            "--warmup=0",
            "--output-tokens=3",
        ],
    );
    let report = report(&args).await;
    let run = &report["series"][0]["runs"][0];
    assert_eq!(run["rate"], 200.0);
    assert_eq!(run["concurrency"], Value::Null);
    assert_eq!(run["summary"]["completed"], 6);
    assert_eq!(mock.bodies.lock().unwrap().len(), 6);
}

#[tokio::test]
async fn sweep_runs_the_grid_one_at_a_time_and_fits_runtime() {
    let (url, _mock) = start(Mode::Ok).await;
    let args = args(
        &url,
        &[
            "--sweep",
            "--sweep-prompt-tokens=8,32",
            "--sweep-output-tokens=2,5",
            "--requests=2",
        ],
    );
    let report = execute(&args).await.unwrap();
    let md = markdown(&report);
    assert!(md.contains("| 32 → 5 tokens | 2 | 0 |"), "{md}");
    assert!(md.contains("## Idealised runtime"), "{md}");
    let report = serde_json::to_value(report).unwrap();
    let series = &report["series"][0];
    let cells: Vec<(u64, u64, u64)> = series["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["summary"]["completed"], 2);
            let n = |k: &str| r[k].as_u64().unwrap();
            (n("concurrency"), n("prompt_tokens"), n("output_tokens"))
        })
        .collect();
    assert_eq!(cells, [(1, 8, 2), (1, 8, 5), (1, 32, 2), (1, 32, 5)]);
    let fit = &series["fit"];
    for field in [
        "intercept_ms",
        "ms_per_prompt_token",
        "ms_per_output_token",
        "r2",
    ] {
        assert!(fit[field].is_number(), "{field}: {fit}");
    }
    assert_eq!(fit["samples"], 8);
}

#[tokio::test]
async fn the_tilt_binary_benches_and_fails_when_every_request_fails() {
    let dir = tempfile::tempdir().unwrap();
    for (mode, succeeds) in [(Mode::Ok, true), (Mode::Status500, false)] {
        let (url, _mock) = start(mode).await;
        let out = dir.path().join(format!("bench-{succeeds}.json"));
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_tilt"))
            .args(["bench", "--url", &url, "--requests=3", "--output-tokens=4"])
            .arg("--output")
            .arg(&out)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.success(), succeeds, "{stderr}");
        assert!(String::from_utf8_lossy(&output.stdout).starts_with("# tilt bench"));
        let report: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        let summary = &report["series"][0]["runs"][0]["summary"];
        let expected = if succeeds { (3, 0) } else { (0, 3) };
        assert_eq!(
            (
                summary["completed"].as_u64().unwrap(),
                summary["failed"].as_u64().unwrap()
            ),
            expected
        );
        if !succeeds {
            assert!(stderr.contains("every request failed"), "{stderr}");
        }
    }
}
