//! `firstrt bench`: a warm-up run, then `--repeat` runs of prefill + greedy decode on a fixed
//! prompt; medians and ranges of prefill tok/s, decode tok/s, ms/token and time to first token,
//! and the peak bytes held by GPU tensors.

use anyhow::{Context, Result, bail};
use clap::Args;

use firstrt::generate::{GenerateOptions, SamplerConfig, Timings, generate};
use firstrt::gpu::GpuOptions;
use firstrt::runtime::{LoadedModel, SessionOptions};

use super::generate::PlanArgs;
use super::profiling::ProfileArgs;
use super::{ModelArgs, load_model};

/// The bench prompt: this text, tokenized and repeated (then cut) to `--prompt-len` tokens.
const PROMPT_TEXT: &str = "Once upon a time, in a small village at the edge of a great forest, there lived an old \
clockmaker who repaired every clock in the valley. Each morning he opened his shop, wound the tall clock by the door, \
and listened to the town wake up. Children came to watch him work, because his hands moved faster than anyone could \
follow, and he told stories about the gears as if they were alive.";

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens (a fixed English text, repeated to this length).
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// Tokens generated per run (greedy; the first comes from the prefill).
    #[arg(long = "gen", default_value_t = 64)]
    pub gen_tokens: usize,
    /// Measured runs after the warm-up.
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
    #[command(flatten)]
    pub plan: PlanArgs,
    /// One JSON object on stdout (fields in README.md) instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub profiling: ProfileArgs,
}

fn prompt_ids(model: &LoadedModel, n: usize) -> Result<Vec<u32>> {
    let mut ids = model.text_ids(PROMPT_TEXT)?;
    if ids.is_empty() {
        bail!("the bench text tokenizes to no ids");
    }
    while ids.len() < n {
        ids.extend_from_within(..);
    }
    ids.truncate(n);
    Ok(ids)
}

/// Median, min and max of a sample.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(mut v: Vec<f64>) -> Spread {
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { 0.5 * (v[n / 2 - 1] + v[n / 2]) };
        Spread { median, min: v[0], max: v[n - 1] }
    }
}

pub fn run(gpu: &GpuOptions, args: BenchArgs) -> Result<()> {
    if args.prompt_len == 0 || args.gen_tokens == 0 || args.repeat == 0 {
        bail!("--prompt-len, --gen and --repeat must be at least 1");
    }
    args.plan.check()?;
    args.profiling.check()?;
    let lengths = || format!("--prompt-len {} + --gen {}", args.prompt_len, args.gen_tokens);
    let needed =
        args.prompt_len.checked_add(args.gen_tokens).filter(|&n| n < usize::MAX).with_context(|| format!("{} overflows", lengths()))?;
    let ctx_len = match args.model.ctx {
        Some(c) => c,
        None => needed + 1,
    };
    if needed > ctx_len {
        bail!("{} does not fit --ctx {ctx_len}", lengths());
    }
    let (ctx, model) = load_model(gpu, &args.model, None)?;
    let session_options = SessionOptions { ctx_len, candidates: 1 };
    let choice = args.plan.choice(&model)?;
    // The first session checks the context against the device before the prompt is built.
    let mut warm_up =
        choice.session(&model.weights, session_options.clone()).with_context(|| format!("{} need {ctx_len} positions", lengths()))?;
    let ids = prompt_ids(&model, args.prompt_len)?;
    let options = GenerateOptions {
        max_tokens: args.gen_tokens,
        sampler: SamplerConfig::greedy(),
        end_ids: Vec::new(), // always the full --gen tokens
    };
    // Warm-up: pipelines, kernel-variant choice, first-use allocations.
    generate(&mut warm_up, &ids, &options)?;
    drop(warm_up);
    ctx.memory.reset_peak();
    let mut profiler = args.profiling.profiler(&ctx)?;
    let mut timings: Vec<Timings> = Vec::new();
    let mut kv_bytes = 0;
    let mut plan = None;
    for _ in 0..args.repeat {
        let mut s = choice.session(&model.weights, session_options.clone())?;
        s.set_profiler(profiler.take());
        let g = generate(&mut s, &ids, &options)?;
        profiler = s.set_profiler(None);
        kv_bytes = s.kv_bytes();
        plan = Some(s.plan().clone());
        timings.push(g.timings);
    }
    let peak = ctx.memory.peak_bytes();
    let plan = plan.expect("repeat >= 1");
    let pick = |f: &dyn Fn(&Timings) -> f64| Spread::of(timings.iter().map(f).collect());
    let prefill = pick(&|t| t.prefill_tok_s());
    let decode = pick(&|t| t.decode_tok_s());
    let ms_token = pick(&|t| t.decode_ms_per_token());
    let ttft = pick(&|t| 1e3 * t.ttft_s);
    let summary = match &mut profiler {
        Some(p) => {
            p.flush()?;
            Some(p.summary())
        }
        None => None,
    };
    if args.json {
        let out = serde_json::json!({
            "model": args.model.model.display().to_string(),
            "adapter": ctx.info.name,
            "backend": format!("{:?}", ctx.info.backend),
            "dtype": model.weights.requested.name(),
            "weights": {
                "formats": model.weights.format_summary(),
                "matrix_bytes": model.weights.matrix_bytes(),
                "bits_per_weight": model.weights.bits_per_weight(),
            },
            "prompt_len": args.prompt_len,
            "gen": args.gen_tokens,
            "repeat": args.repeat,
            "layers_run": plan.kept(),
            "skipped_layers": plan.skipped_layers(),
            "plan": PlanArgs::kind(&choice, &plan),
            "prefill_tok_s": prefill,
            "decode_tok_s": decode,
            "ms_per_token": ms_token,
            "ttft_ms": ttft,
            "memory": {
                "peak_gpu_bytes": peak,
                "weights_bytes": model.weights.byte_len(),
                "interleaved_bytes": model.weights.interleaved_bytes(),
                "kv_bytes": kv_bytes,
            },
            "profiled": profiler.is_some(),
            "profile": summary,
        });
        println!("{out}");
    } else {
        println!(
            "{} on {} ({:?}), {} weights, prompt {} tokens, {} generated, {} of {} layers, {} runs after a warm-up{}",
            args.model.model.display(),
            ctx.info.name,
            ctx.info.backend,
            model.weights.requested,
            args.prompt_len,
            args.gen_tokens,
            plan.kept(),
            plan.len(),
            args.repeat,
            if profiler.is_some() { " (profiled: timestamps add overhead)" } else { "" }
        );
        println!("{:<16} {:>12} {:>12} {:>12}", "", "median", "min", "max");
        for (name, s) in [("prefill tok/s", prefill), ("decode tok/s", decode), ("ms/token", ms_token), ("TTFT ms", ttft)] {
            println!("{name:<16} {:>12.2} {:>12.2} {:>12.2}", s.median, s.min, s.max);
        }
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        println!(
            "peak GPU memory {:.1} MiB (weights {:.1} MiB{}, KV cache {:.1} MiB, the rest activations and logits)",
            mib(peak),
            mib(model.weights.byte_len()),
            match model.weights.interleaved_bytes() {
                0 => String::new(),
                b => format!(" with {:.1} MiB of interleaved copies for the windows GEMV", mib(b)),
            },
            mib(kv_bytes)
        );
        println!("matrices: {} ({:.2} bits per weight)", model.weights.format_summary(), model.weights.bits_per_weight());
    }
    args.profiling.finish(profiler)
}
