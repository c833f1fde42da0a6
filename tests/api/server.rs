//! A real `tilt serve` on a free loopback port, and a small HTTP client for it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};

pub struct Server {
    child: Child,
    pub url: String,
}

impl Server {
    /// Start `tilt serve --port 0 <args>` and wait until it listens (not until it is ready).
    /// `TILT_BIN` picks another binary than the one cargo built (as in tests/compat/run.sh).
    pub fn spawn(args: &[&str]) -> Self {
        let bin = std::env::var("TILT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tilt").into());
        let mut child = Command::new(bin)
            .args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning tilt serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("reading the server's address");
        let url = line
            .trim()
            .strip_prefix("tilt: listening on ")
            .unwrap_or_else(|| panic!("unexpected first line from tilt serve: {line:?}"))
            .to_string();
        Self { child, url }
    }

    /// Start and wait until `/health` answers 200.
    pub async fn ready(args: &[&str]) -> Self {
        let server = Self::spawn(args);
        let client = server.client();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = client.http.get(client.url("/health")).send().await {
                if r.status() == StatusCode::OK {
                    return server;
                }
            }
            assert!(Instant::now() < deadline, "tilt serve never became ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A server's resident memory, in KiB (Linux).
    pub fn rss_kib_of(pid: u32) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .expect("reading the server's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc status")
    }

    /// Send SIGTERM, as a process manager stopping the server would.
    pub fn terminate(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("a pid");
        // SAFETY: a plain signal to the child this Server owns (and has not yet reaped).
        assert_eq!(
            unsafe { libc::kill(pid, libc::SIGTERM) },
            0,
            "sending SIGTERM"
        );
    }

    /// Wait up to `limit` for the server to exit; its status.
    pub async fn exited(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("polling tilt serve") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "tilt serve still runs after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn client(&self) -> Client {
        Client {
            base: self.url.clone(),
            http: reqwest::Client::new(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone)]
pub struct Client {
    pub base: String,
    pub http: reqwest::Client,
}

/// A response: status, content type and body (JSON when it parses, else a string).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: String,
    pub body: Value,
}

impl Client {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Send `request` (which is `method path`) and check the reply against openapi.yaml.
    pub async fn send(&self, method: &str, path: &str, request: reqwest::RequestBuilder) -> Reply {
        let response = request.send().await.expect("sending a request");
        let status = response.status();
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let text = response.text().await.expect("reading a response");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        let reply = Reply {
            status,
            content_type,
            body,
        };
        if let Err(e) = crate::openapi::check(method, path, &reply) {
            panic!("{method} {path} answered outside openapi.yaml: {e}");
        }
        reply
    }

    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        self.send("POST", path, self.http.post(self.url(path)).json(body))
            .await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send("GET", path, self.http.get(self.url(path))).await
    }

    /// POST expecting 200; the JSON body.
    pub async fn ok(&self, path: &str, body: &Value) -> Value {
        let reply = self.post(path, body).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{path} {body}: {:?}",
            reply.body
        );
        reply.body
    }

    /// POST a streaming request and read every `data:` payload up to and including `[DONE]`
    /// (returned as the string "[DONE]"); checks the SSE content type.
    pub async fn stream(&self, path: &str, body: &Value) -> Vec<Value> {
        let response = self
            .http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("sending a request");
        assert_eq!(response.status(), StatusCode::OK);
        let ct = response.headers()[reqwest::header::CONTENT_TYPE]
            .to_str()
            .unwrap();
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        let mut events = Events::new(response);
        let mut out = Vec::new();
        while let Some(data) = events.next().await {
            out.push(data);
        }
        if let Err(e) = crate::openapi::check_stream(path, &out) {
            panic!("POST {path} streamed outside openapi.yaml: {e}");
        }
        out
    }

    /// The value of a metric line `name{labels…} value` summed over its label sets.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").await.body;
        let text = text.as_str().expect("metrics are text");
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    }

    /// Token ids of a plain prompt, as the server counts them.
    pub async fn tokens(&self, prompt: &str) -> Vec<u64> {
        self.tokens_with(prompt, true).await
    }

    /// Token ids of `prompt`, with the special tokens a prompt starts with or without.
    pub async fn tokens_with(&self, prompt: &str, special: bool) -> Vec<u64> {
        let request = serde_json::json!({"prompt": prompt, "add_special_tokens": special});
        let body = self.ok("/tokenize", &request).await;
        body["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap())
            .collect()
    }
}

/// The `data:` payloads of an SSE response, one at a time; JSON when they parse.
pub struct Events {
    body: futures::stream::BoxStream<'static, reqwest::Result<Vec<u8>>>,
    buffer: Vec<u8>,
    done: bool,
}

impl Events {
    pub fn new(response: reqwest::Response) -> Self {
        Self {
            body: response
                .bytes_stream()
                .map(|chunk| chunk.map(|b| b.to_vec()))
                .boxed(),
            buffer: Vec::new(),
            done: false,
        }
    }

    pub async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let event = String::from_utf8(event).expect("events are UTF-8");
                let data: Vec<&str> = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if data.is_empty() {
                    continue; // a comment or keep-alive
                }
                let data = data.join("\n");
                return Some(serde_json::from_str(&data).unwrap_or(Value::String(data)));
            }
            if self.done {
                assert!(
                    self.buffer.iter().all(u8::is_ascii_whitespace),
                    "truncated event: {:?}",
                    String::from_utf8_lossy(&self.buffer)
                );
                return None;
            }
            match self.body.next().await {
                Some(chunk) => self
                    .buffer
                    .extend_from_slice(&chunk.expect("reading the stream")),
                None => self.done = true,
            }
        }
    }
}

/// Streams the completion `body` and checks that its chunks spell the text of `r`, the same
/// request answered whole, and that a chunk carries `r`'s `alignment` report. Returns the
/// chunks' choices.
pub async fn streams_like(c: &Client, body: &Value, r: &Value) -> Vec<Value> {
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = c.stream("/v1/completions", &streamed).await;
    let choices: Vec<Value> = events
        .iter()
        .flat_map(|e| e["choices"].as_array().into_iter().flatten().cloned())
        .collect();
    let text: String = choices
        .iter()
        .map(|ch| ch["text"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(text, r["choices"][0]["text"].as_str().unwrap());
    let last = events.iter().rev().find(|e| e.get("alignment").is_some());
    assert_eq!(
        last.expect("a chunk with the report")["alignment"],
        r["alignment"]
    );
    choices
}

/// An `alignment` object: the decoder `name` with `params` beside it.
pub fn decoder(name: &str, params: Value) -> Value {
    let mut alignment = json!({ "decoder": name });
    alignment
        .as_object_mut()
        .unwrap()
        .extend(params.as_object().unwrap().clone());
    alignment
}

/// Checks each `(alignment, param, message fragment)` gets a 400 naming `param`.
pub async fn refused(c: &Client, cases: &[(Value, &str, &str)]) {
    for (alignment, param, says) in cases {
        let body = json!({"prompt": "Hi", "max_tokens": 2, "alignment": alignment});
        let r = c.post("/v1/completions", &body).await;
        assert_eq!(r.status, 400, "{alignment}: {:?}", r.body);
        assert_eq!(
            r.body["error"]["param"], *param,
            "{alignment}: {:?}",
            r.body
        );
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{alignment}: {message}");
    }
}
