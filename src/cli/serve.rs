//! `firstrt serve`: the OpenAI-compatible HTTP server (see `firstrt::server`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;

use firstrt::gpu::GpuOptions;
use firstrt::runtime::session::MAX_CANDIDATES;
use firstrt::runtime::{LayerPlan, PlanPolicyArgs, Session, SessionOptions};
use firstrt::server::http::AppState;
use firstrt::server::scheduler::Scheduler;
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
    /// On SIGINT/SIGTERM, how long running sequences may finish before they are cancelled (s).
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_timeout: f64,
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
    let (_ctx, model) = load_model(gpu, &args.model, None)?;
    let ctx_len = super::context_len(&model.weights.config, args.model.ctx)?;
    let mut routers = BTreeMap::new();
    for (name, path) in &args.routers {
        let (_, choice) =
            model.load_routers(path, &PlanPolicyArgs::default()).with_context(|| format!("--routers {name}={}", path.display()))?;
        routers.insert(name.clone(), ServedRouters { path: path.clone(), choice });
    }
    let mut adapters = BTreeMap::new();
    for (name, dir) in &args.lora {
        let gpu = model.load_lora(dir).with_context(|| format!("--lora {name}={}", dir.display()))?;
        adapters.insert(name.clone(), ServedAdapter { dir: dir.clone(), gpu });
    }
    // One sequence of the whole context must fit the device; its steps are compiled now, so
    // that the first request's time is its own.
    eprintln!("preparing the kernels (a few seconds the first time on this machine)");
    let n_layers = model.weights.config.n_layers;
    let mut session = Session::new(&model.weights, SessionOptions { ctx_len, candidates: MAX_CANDIDATES }, LayerPlan::full(n_layers))
        .with_context(|| format!("--ctx {ctx_len}: one sequence of the whole context"))?;
    for rows in [1, 2, 4, 8, 64.min(ctx_len)] {
        session.prepare_prefill(rows).with_context(|| format!("preparing a {rows}-token prefill"))?;
    }
    drop(session);
    let served = Arc::new(ServedModel {
        loaded: Arc::new(model),
        id: args.model_id(),
        ctx_len,
        routers,
        adapters,
        default_routers: args.default_routers.clone(),
    });
    let scheduler = Scheduler::start(served.loaded.clone(), args.max_concurrent, args.queue, !args.no_batch);
    let state = Arc::new(AppState::new(served.clone(), scheduler, args.api_key.clone()));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    runtime.block_on(async {
        let address = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&address).await.with_context(|| format!("listening on {address} (--host, --port)"))?;
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
        firstrt::server::serve(listener, state, shutdown_signal(), Duration::from_secs_f64(args.shutdown_timeout))
            .await
            .context("serving")?;
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
