//! `firstrt static-plan`: ShortGPT's block influence over calibration rows, the layers of lowest
//! influence as a static plan, optionally saved as a router file that `run`, `bench` and `chat`
//! take with `--routers`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;

use firstrt::eval::data::{TaskExample, load_task};
use firstrt::eval::run::calibration_ids;
use firstrt::gpu::GpuOptions;
use firstrt::model::open_model;
use firstrt::model::routers::{RouterFile, layer_list, model_identity};
use firstrt::runtime::LoadedModel;
use firstrt::runtime::calibration::block_influence;
use firstrt::runtime::plan::check_skip_count;

use super::{ModelArgs, check_output, context_len, load_model, progress_bar};

#[derive(Args, Debug)]
pub struct StaticPlanArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A task file (JSONL rows of `prompt` and `completion` or `references`): each row is the
    /// chat-templated prompt followed by its first reference, cut to the context.
    #[arg(long)]
    pub calibration: PathBuf,
    /// How many layers the plan skips: those of lowest block influence.
    #[arg(long)]
    pub skip: usize,
    /// Calibration rows used: the first K of the file.
    #[arg(long, default_value_t = 64)]
    pub limit: usize,
    /// Allow layer 0 and the last layer to be skipped (kept by default).
    #[arg(long)]
    pub skip_first_last: bool,
    /// One JSON object on stdout (per-layer BI, skipped layers, tokens used) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Write the plan as a router file (safetensors) with fixed decisions: `--routers FILE`.
    #[arg(long, short = 'o')]
    pub out: Option<PathBuf>,
}

/// The calibration sequences of `rows` of the task file `path` for `model` (the file at
/// `model_path`), each cut to `ctx_len` ([`calibration_ids`]); a warning says how many were cut.
/// Errors name the file and line of a row the chat template fails on.
pub(super) fn calibration_sequences(
    model: &LoadedModel,
    model_path: &Path,
    path: &Path,
    rows: &[TaskExample],
    ctx_len: usize,
) -> Result<Vec<Vec<u32>>> {
    let mut sequences = Vec::with_capacity(rows.len());
    let mut cut = 0;
    for row in rows {
        let (ids, was_cut) = calibration_ids(model, row, ctx_len)
            .with_context(|| format!("{}:{}: the chat template of {}", path.display(), row.line, model_path.display()))?;
        cut += usize::from(was_cut);
        sequences.push(ids);
    }
    if cut > 0 {
        eprintln!("warning: {cut} calibration rows cut to the context of {ctx_len} tokens");
    }
    Ok(sequences)
}

pub fn run(gpu: &GpuOptions, args: StaticPlanArgs) -> Result<()> {
    if args.limit == 0 {
        bail!("--limit 0: at least one calibration row is needed");
    }
    if let Some(path) = &args.out {
        check_output("--out", path)?;
    }
    // The layer count from the file's configuration, before the weights are uploaded.
    let config = open_model(&args.model.model).with_context(|| format!("loading {}", args.model.model.display()))?.config().clone();
    check_skip_count(config.n_layers, args.skip, args.skip_first_last)?;
    let ctx_len = context_len(&config, args.model.ctx)?;
    let mut rows = load_task(&args.calibration)?;
    rows.truncate(args.limit);

    let (_ctx, model) = load_model(gpu, &args.model, None)?;
    let sequences = calibration_sequences(&model, &args.model.model, &args.calibration, &rows, ctx_len)?;
    let bar = progress_bar(sequences.len(), "block influence (rows)");
    let start = std::time::Instant::now();
    let influence = block_influence(&model.weights, &sequences, &mut |done, _| bar.set_position(done as u64))?;
    let seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let skip = influence.static_plan(args.skip, args.skip_first_last)?;
    if let Some(path) = &args.out {
        let identity = model_identity(model.source.as_ref())?;
        RouterFile::static_plan(&identity, &skip)?.save(path)?;
    }

    let bi = influence.bi();
    if args.json {
        let out = serde_json::json!({
            "model": args.model.model.display().to_string(),
            "dtype": model.weights.requested.name(),
            "calibration": args.calibration.display().to_string(),
            "rows": influence.sequences,
            "tokens": influence.tokens,
            "seconds": seconds,
            "skip": args.skip,
            "skip_first_last": args.skip_first_last,
            "block_influence": bi,
            "skipped_layers": skip,
            "skip_layers": layer_list(&skip),
            "out": args.out.as_ref().map(|p| p.display().to_string()),
        });
        println!("{out}");
        return Ok(());
    }
    println!(
        "block influence (ShortGPT: 1 - mean cos(h_in, h_out)) of {} ({} weights) over {} rows of {}, {} tokens, {seconds:.1} s",
        args.model.model.display(),
        model.weights.requested.name(),
        influence.sequences,
        args.calibration.display(),
        influence.tokens
    );
    println!("layer  block influence");
    for (l, b) in bi.iter().enumerate() {
        println!("{l:>5}  {b:>15.6}{}", if skip.contains(&l) { "  skip" } else { "" });
    }
    println!("skip: {}", layer_list(&skip));
    if let Some(path) = &args.out {
        println!("wrote {}: run it with --routers {} (or --skip-layers {})", path.display(), path.display(), layer_list(&skip));
    }
    Ok(())
}
