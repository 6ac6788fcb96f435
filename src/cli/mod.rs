//! Command-line parsing and the subcommands.

mod bench;
mod eval;
mod eval_merge;
mod generate;
mod inspect;
mod profiling;
mod routers;
mod serve;
mod static_plan;
mod train;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use firstrt::gpu::{GpuContext, GpuOptions, list_adapters};
use firstrt::model::{ModelConfig, open_model};
use firstrt::runtime::{LoadedModel, MergedLora, WeightDtype};

#[derive(Parser, Debug)]
#[command(name = "firstrt", version, about = "LLM inference on wgpu compute shaders with FiRST layer skipping")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// GPU backend: vulkan, metal, dx12 or gl (default: WGPU_BACKEND, else the best adapter of any).
    #[arg(long, global = true)]
    backend: Option<String>,
    /// Use the adapter whose name contains this text (default: WGPU_ADAPTER_NAME).
    #[arg(long, global = true)]
    adapter: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List every GPU adapter with its backend, driver, features and limits.
    Devices,
    /// Generate text from a prompt, streamed to stdout.
    Run(generate::RunArgs),
    /// An interactive multi-turn chat using the model's chat template.
    Chat(generate::ChatArgs),
    /// Print the token ids of a text (no special tokens added).
    Tokenize(inspect::TokenizeArgs),
    /// Architecture, sizes, dtypes, tokenizer and the memory that loading will need.
    Inspect(inspect::InspectArgs),
    /// FiRST router files: `routers init` writes a starting file for a model.
    Routers(routers::RoutersArgs),
    /// Prefill and decode speed, time to first token and GPU memory: median of repeats.
    Bench(bench::BenchArgs),
    /// Score a task (ROUGE or log-likelihood) under several layer plans, with each one's speed.
    Eval(eval::EvalArgs),
    /// One table and plot from the results.json of several `eval` runs.
    EvalMerge(eval_merge::EvalMergeArgs),
    /// ShortGPT's block influence of every layer over calibration rows, and the static plan
    /// skipping the N least influential layers (printed, or saved as a router file).
    StaticPlan(static_plan::StaticPlanArgs),
    /// Train FiRST routers and/or a LoRA adapter on the GPU (stages routers, lora, joint), with
    /// checkpoints and --resume; writes routers.safetensors and a PEFT adapter/.
    Train(train::TrainArgs),
    /// An OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, streaming),
    /// with a FiRST plan and a LoRA adapter chosen per request.
    Serve(serve::ServeArgs),
}

/// Options every command that loads a model shares.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A .gguf file or a Hugging Face folder (config.json, *.safetensors, tokenizer.json).
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    /// How the weight matrices are stored on the GPU: f32 or f16 values; `native`, each matrix in
    /// the file's own block type where a kernel reads it (q8_0, q4_0, q4_1, q4_k, q6_k), others
    /// as values; or one block type for all (kept where stored so; q8_0 and q4_0 can be made at
    /// load from any source). Default: native for a quantised GGUF, else f32. `RUST_LOG=info`
    /// says what each matrix became.
    #[arg(long, value_parser = WeightDtype::NAMES)]
    pub dtype: Option<String>,
    /// Context length (KV-cache rows); default: the model's, capped at 4096.
    #[arg(long)]
    pub ctx: Option<usize>,
}

impl ModelArgs {
    /// The `--dtype` asked for, or the model's default ([`WeightDtype::default_for`]: native for
    /// a quantised GGUF, else f32), which opens the model file to see how it is stored.
    pub fn weight_dtype(&self) -> Result<WeightDtype> {
        match &self.dtype {
            Some(name) => WeightDtype::parse(name).with_context(|| format!("--dtype {name}")),
            None => {
                let source = open_model(&self.model).with_context(|| format!("loading {}", self.model.display()))?;
                Ok(WeightDtype::default_for(source.as_ref()))
            }
        }
    }
}

/// The context length a command sizes its KV cache for: `--ctx`, or the model's maximum capped
/// at 4096. Refused when 0 (no room for even one token), by every command alike; the size of the
/// KV cache it implies is checked against the device when a session is created
/// (`KvCache::empty`).
pub fn context_len(config: &ModelConfig, ctx: Option<usize>) -> Result<usize> {
    match ctx {
        Some(0) => bail!("--ctx 0: the context must hold at least 1 position"),
        Some(n) => Ok(n),
        None => Ok(config.max_position.clamp(1, 4096)),
    }
}

/// Checks, before any work starts, that `flag` can write a file at `path`: its folder exists,
/// is a folder and is not read-only. The message names the flag and the path once.
pub fn check_output(flag: &str, path: &Path) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let problem = match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "its folder does not exist".to_string(),
        Err(e) => format!("its folder cannot be read ({e})"),
        Ok(m) if !m.is_dir() => format!("{} is not a folder", dir.display()),
        Ok(m) if m.permissions().readonly() => "its folder is read-only".to_string(),
        Ok(_) => return Ok(()),
    };
    bail!("{flag} {}: {problem}", path.display())
}

pub fn run(cli: Cli) -> Result<()> {
    let gpu = GpuOptions { backend: cli.backend.clone(), adapter: cli.adapter.clone(), max_binding_override: None };
    match cli.command {
        Command::Devices => {
            let adapters = list_adapters(&gpu)?;
            if adapters.is_empty() {
                bail!("{}", firstrt::gpu::DRIVER_HINT);
            }
            for (i, a) in adapters.iter().enumerate() {
                println!("[{i}] {a}");
            }
            Ok(())
        }
        Command::Run(args) => generate::run(&gpu, args),
        Command::Chat(args) => generate::chat(&gpu, args),
        Command::Tokenize(args) => inspect::tokenize(args),
        Command::Inspect(args) => inspect::inspect(args),
        Command::Routers(args) => routers::run(args),
        Command::Bench(args) => bench::run(&gpu, args),
        Command::Eval(args) => eval::run(&gpu, args),
        Command::EvalMerge(args) => eval_merge::run(args),
        Command::StaticPlan(args) => static_plan::run(&gpu, args),
        Command::Train(args) => train::run(&gpu, args),
        Command::Serve(args) => serve::run(&gpu, args),
    }
}

/// A progress bar on stderr (drawn only on a terminal): `message`, the bar, done/total, elapsed
/// time and ETA.
pub fn progress_bar(len: usize, message: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed} ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(message.to_string());
    bar
}

/// Open the GPU and load the model with a progress bar on stderr, with a LoRA adapter merged
/// into the weights when `lora` says so.
pub fn load_model(gpu: &GpuOptions, args: &ModelArgs, lora: Option<&MergedLora>) -> Result<(Arc<GpuContext>, LoadedModel)> {
    let ctx = GpuContext::new(gpu)?;
    log::info!("using {} ({:?})", ctx.info.name, ctx.info.backend);
    let dtype = args.weight_dtype()?;
    let bar = progress_bar(1, &format!("loading {}", args.model.display()));
    let model = LoadedModel::load_merged(&ctx, &args.model, dtype, lora, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .with_context(|| format!("loading {}", args.model.display()))?;
    bar.finish_and_clear();
    Ok((ctx, model))
}
