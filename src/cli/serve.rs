//! `firstrt serve`: the OpenAI-compatible HTTP server (see `firstrt::server`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;

use firstrt::gpu::GpuOptions;
use firstrt::gpu::notice::serve_first_run_wait;
use firstrt::runtime::session::MAX_CANDIDATES;
use firstrt::runtime::{LayerPlan, PlanPolicyArgs, Session, SessionOptions};
use firstrt::server::http::AppState;
use firstrt::server::scheduler::{PREFILL_CHUNK, Scheduler, SchedulerOptions};
use firstrt::server::{ServedAdapter, ServedModel, ServedRouters};

use super::{ModelArgs, load_model};

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the address is printed on stdout).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// A FiRST router file that requests can name: NAME=FILE (repeatable). A request picks it
    /// with `"first": {"routers": "NAME"}`.
    #[arg(long = "routers", value_name = "NAME=FILE", value_parser = named_path)]
    pub routers: Vec<(String, PathBuf)>,
    /// The router file (by NAME) that decides for requests without `first` (default: the full
    /// model).
    #[arg(long)]
    pub default_routers: Option<String>,
    /// A PEFT LoRA adapter that requests can name: NAME=DIR (repeatable), uploaded unmerged. A
    /// request picks it with `"lora": {"name": "NAME", "scale": S}`.
    #[arg(long = "lora", value_name = "NAME=DIR", value_parser = named_path)]
    pub lora: Vec<(String, PathBuf)>,
    /// The model id that requests name in `model` (default: the model file's name without
    /// `.gguf`, or the folder's name).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Sequences generating at once (each holds a KV cache sized for its prompt + max_tokens).
    #[arg(long, default_value_t = 4)]
    pub max_concurrent: usize,
    /// Requests that may wait for a free sequence; more get 429.
    #[arg(long, default_value_t = 16)]
    pub queue: usize,
    /// Step every sequence alone instead of batching the decode steps of sequences that share
    /// a plan (for comparison: batching reads each weight once per step for all of them).
    #[arg(long)]
    pub no_batch: bool,
    /// Require `Authorization: Bearer KEY` on /v1/* (default: FIRSTRT_API_KEY; none: open).
    #[arg(long, env = "FIRSTRT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// On SIGINT/SIGTERM, how long running sequences may finish before they are cancelled (s);
    /// a second signal cancels them at once.
    #[arg(long, default_value_t = 30.0, allow_negative_numbers = true)]
    pub shutdown_timeout: f64,
    /// A prompt longer than this many tokens is prefilled this many per round, so that the
    /// other sequences keep generating meanwhile (static plans; routers read a whole prompt).
    #[arg(long, default_value_t = PREFILL_CHUNK)]
    pub prefill_chunk: usize,
    /// `max_tokens` of a request that gives none (capped by the room its prompt leaves in the
    /// context): each sequence's KV cache is sized for its prompt plus `max_tokens`.
    #[arg(long, default_value_t = 512)]
    pub default_max_tokens: usize,
}

/// `NAME=PATH` with a non-empty name of letters, digits, `-`, `_` and `.`.
fn named_path(s: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = s.split_once('=').ok_or_else(|| format!("'{s}' is not NAME=PATH"))?;
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(format!("'{name}' is not a name (letters, digits, '-', '_', '.')"));
    }
    if path.is_empty() {
        return Err(format!("'{s}' has no path after '='"));
    }
    Ok((name.to_string(), PathBuf::from(path)))
}

/// Names given twice are refused, naming the flag.
fn unique(flag: &str, items: &[(String, PathBuf)]) -> Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    for (name, _) in items {
        if !seen.insert(name) {
            bail!("{flag}: the name '{name}' is given twice");
        }
    }
    Ok(())
}

impl ServeArgs {
    fn check(&self) -> Result<()> {
        if self.max_concurrent == 0 {
            bail!("--max-concurrent 0: at least 1 sequence must be able to run");
        }
        if !(self.shutdown_timeout.is_finite() && self.shutdown_timeout >= 0.0) {
            bail!("--shutdown-timeout {} must be a number of seconds >= 0", self.shutdown_timeout);
        }
        unique("--routers", &self.routers)?;
        unique("--lora", &self.lora)?;
        if let Some(name) = &self.default_routers
            && !self.routers.iter().any(|(n, _)| n == name)
        {
            bail!("--default-routers {name}: no --routers {name}=FILE was given");
        }
        if self.api_key.as_deref() == Some("") {
            bail!("--api-key is empty");
        }
        if self.model_id.as_deref().is_some_and(|id| id.trim().is_empty()) {
            bail!("--model-id is empty");
        }
        if self.prefill_chunk == 0 {
            bail!("--prefill-chunk 0: a chunk must hold at least 1 token");
        }
        if self.default_max_tokens == 0 {
            bail!("--default-max-tokens 0: a request must be able to generate at least 1 token");
        }
        Ok(())
    }

    fn model_id(&self) -> String {
        if let Some(id) = &self.model_id {
            return id.clone();
        }
        let path = &self.model.model;
        let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| path.display().to_string());
        name.strip_suffix(".gguf").map(str::to_string).unwrap_or(name)
    }
}

pub fn run(gpu: &GpuOptions, args: ServeArgs) -> Result<()> {
    args.check()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    // The address first: a port in use is reported before the model loads.
    let address = format!("{}:{}", args.host, args.port);
    let listener =
        runtime.block_on(tokio::net::TcpListener::bind(&address)).with_context(|| format!("listening on {address} (--host, --port)"))?;
    let (_ctx, model) = load_model(gpu, &args.model, None)?;
    let ctx_len = super::context_len(&model.weights.config, args.model.ctx)?;
    let max_position = model.weights.config.max_position;
    if ctx_len > max_position {
        eprintln!("warning: --ctx {ctx_len} is beyond the {max_position} positions the model was trained for");
    }
    let mut routers = BTreeMap::new();
    for (name, path) in &args.routers {
        let (_, choice) =
            model.load_routers(path, &PlanPolicyArgs::default()).with_context(|| format!("--routers {name}={}", path.display()))?;
        routers.insert(name.clone(), ServedRouters { choice });
    }
    let mut adapters = BTreeMap::new();
    for (name, dir) in &args.lora {
        let gpu = model.load_lora(dir).with_context(|| format!("--lora {name}={}", dir.display()))?;
        adapters.insert(name.clone(), ServedAdapter { gpu });
    }
    // One sequence of the whole context must fit the device; its steps are compiled now, so
    // that the first request's time is its own.
    eprintln!("preparing the kernels (the first time on this machine: {})", serve_first_run_wait(&model.weights.ctx));
    let n_layers = model.weights.config.n_layers;
    let mut session = Session::new(&model.weights, SessionOptions { ctx_len, candidates: MAX_CANDIDATES }, LayerPlan::full(n_layers))
        .with_context(|| format!("--ctx {ctx_len}: one sequence of the whole context"))?;
    // Short turns, a long prompt, and the longer batched prefills of several prompts at once: on
    // lavapipe products of more than 64 rows of x on quantised weights run another kernel
    // (`matmul::XBCAST_QUANT_MAX_ROWS`), whose compile would otherwise stall requests under load.
    let mut lengths = [1, 2, 4, 8, 64, 128].map(|r| r.min(ctx_len)).to_vec();
    lengths.dedup(); // a short context caps several lengths at the same one
    session.prepare_prefills(&lengths).with_context(|| format!("preparing prefills of {lengths:?} tokens"))?;
    drop(session);
    // The kernel choices an adapter's f32 matrices need (a quantised model's own steps need
    // none on a CPU driver): measured now rather than inside the first request that names it.
    for adapter in adapters.values() {
        model.weights.choose_kernels(Some(&adapter.gpu));
    }
    let served = Arc::new(ServedModel {
        loaded: Arc::new(model),
        id: args.model_id(),
        ctx_len,
        routers,
        adapters,
        default_routers: args.default_routers.clone(),
        default_max_tokens: args.default_max_tokens,
    });
    let options = SchedulerOptions {
        max_concurrent: args.max_concurrent,
        queue: args.queue,
        batch: !args.no_batch,
        prefill_chunk: args.prefill_chunk,
    };
    let scheduler = Scheduler::start(served.loaded.clone(), options);
    let state = Arc::new(AppState::new(served.clone(), scheduler, args.api_key.clone()));
    runtime.block_on(async {
        let local = listener.local_addr()?;
        let names = |m: Vec<&String>| if m.is_empty() { "none".to_string() } else { m.into_iter().cloned().collect::<Vec<_>>().join(", ") };
        eprintln!(
            "serving {} (context {ctx_len}, {} sequences at once, {} waiting; routers: {}; adapters: {}{})",
            served.id,
            args.max_concurrent,
            args.queue,
            names(served.routers.keys().collect()),
            names(served.adapters.keys().collect()),
            if args.api_key.is_some() { "; API key required" } else { "" },
        );
        // The one line on stdout: scripts and tests read the address from it.
        println!("listening on http://{local}");
        std::io::stdout().flush().ok();
        // The first SIGINT/SIGTERM drains, the second cancels what still runs.
        let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
        let (second_tx, second_rx) = tokio::sync::oneshot::channel::<()>();
        let grace = args.shutdown_timeout;
        tokio::spawn(async move {
            shutdown_signal().await;
            eprintln!("shutting down: no new requests; the running ones have up to {grace:.0} s to finish (Ctrl-C again: stop now)");
            let _ = first_tx.send(());
            shutdown_signal().await;
            eprintln!("stopping now: cancelling the running requests");
            let _ = second_tx.send(());
        });
        let first = async {
            // A dropped sender (the signal task ended without a signal) never shuts down.
            if first_rx.await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let second = async {
            if second_rx.await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        firstrt::server::serve(listener, state, first, second, Duration::from_secs_f64(grace)).await.context("serving")?;
        eprintln!("stopped");
        Ok(())
    })
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_paths() {
        assert_eq!(named_path("soft=/a/b=c").unwrap(), ("soft".to_string(), PathBuf::from("/a/b=c")));
        assert!(named_path("nope").is_err());
        assert!(named_path("=x").is_err());
        assert!(named_path("a b=x").is_err());
        assert!(named_path("a=").is_err());
    }
}
