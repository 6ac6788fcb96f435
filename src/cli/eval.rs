//! `firstrt eval`: a task scored under several layer plans, with the speed of each.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;

use firstrt::eval::data::{TaskExample, load_task};
use firstrt::eval::plot::{PlotPoint, write_plot};
use firstrt::eval::report::{BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, ConfigSummary, example_json, markdown_table};
use firstrt::eval::run::DECODE_PROBE_STEPS;
use firstrt::eval::run::{EvalConfig, ExampleResult, GENERATE_METRICS, LOGLIK_METRICS, ScoreMode, decode_probe, evaluate_example};
use firstrt::gpu::GpuOptions;
use firstrt::model::open_model;
use firstrt::model::routers::layer_list;
use firstrt::runtime::calibration::block_influence;
use firstrt::runtime::plan::skippable_layers;
use firstrt::runtime::{LayerPlan, LoadedModel, PlanChoice, PlanPolicyArgs};

use super::{ModelArgs, load_model, progress_bar};

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreKind {
    /// Greedy generation scored with ROUGE-1/2/L/Lsum and exact match.
    Rouge,
    /// Mean negative log-likelihood of the references under teacher forcing (no generation).
    Loglik,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Task file: JSONL rows {"id", "prompt", "references": [...]} (or "completion").
    #[arg(long)]
    pub data: PathBuf,
    /// Evaluate only the first N examples.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Generation budget per example.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// What to measure.
    #[arg(long, value_enum, default_value_t = ScoreKind::Rouge)]
    pub score: ScoreKind,
    /// ROUGE without the Porter stemmer (rouge-score's use_stemmer=False).
    #[arg(long)]
    pub no_stemmer: bool,
    /// A FiRST router file; each of --thresholds is one configuration.
    #[arg(long)]
    pub routers: Option<PathBuf>,
    /// Router thresholds to evaluate (default: the file's own).
    #[arg(long, value_delimiter = ',', requires = "routers")]
    pub thresholds: Vec<f32>,
    /// With --routers: skip at most N layers per example (the N lowest probabilities among
    /// those below the threshold), as `run --max-skip`; applies to every threshold.
    #[arg(long, requires = "routers")]
    pub max_skip: Option<usize>,
    /// With --routers: skip at least N layers per example, as `run --min-skip`.
    #[arg(long, requires = "routers")]
    pub min_skip: Option<usize>,
    /// One static plan: skip these layers (0-based, comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub skip_layers: Vec<usize>,
    /// Static plans of N layers each (comma-separated): the N layers of lowest block influence
    /// (ShortGPT) over --calibration; the first and last layer are kept.
    #[arg(long, value_delimiter = ',', requires = "calibration")]
    pub static_skip: Vec<usize>,
    /// Calibration rows for --static-skip (JSONL like --data; prompt + first reference).
    #[arg(long, requires = "static_skip")]
    pub calibration: Option<PathBuf>,
    /// Calibration rows used: the first K of --calibration.
    #[arg(long, default_value_t = 64)]
    pub calibration_limit: usize,
    /// A PEFT LoRA adapter: every configuration is evaluated without and with it (unmerged).
    #[arg(long)]
    pub lora: Option<PathBuf>,
    /// The adapter's user scale S: W + S (alpha / r) B A.
    #[arg(long, default_value_t = 1.0, requires = "lora")]
    pub lora_scale: f32,
    /// Evaluate each configuration with the adapter only (not also without it).
    #[arg(long, requires = "lora")]
    pub lora_only: bool,
    /// Leave out the full model's configuration (evaluate only the plans asked for).
    #[arg(long)]
    pub no_full: bool,
    /// Print the whole results JSON on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Write results.json, results.md, plot.svg and plot.png into this folder (created if
    /// missing; the files appear only when the evaluation has finished).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `--out`: checked before any work: an existing folder, or a new one whose parent exists and
/// is writable.
pub(super) fn check_out_dir(dir: &Path) -> Result<()> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() && !m.permissions().readonly() => Ok(()),
        Ok(m) if m.is_dir() => bail!("--out {}: the folder is read-only", dir.display()),
        Ok(_) => bail!("--out {}: exists and is not a folder", dir.display()),
        Err(_) => super::check_output("--out", dir),
    }
}

/// The result files of `--out`, written so that none appears half-written and a failure leaves
/// the folder as it was: each file goes to a hidden temporary name in the folder first (the
/// folder is created if missing), and only when all are written are they renamed into place.
pub(super) struct OutFiles {
    dir: PathBuf,
    created: bool,
    pending: Vec<(PathBuf, PathBuf)>,
}

impl OutFiles {
    pub(super) fn new(dir: &Path) -> Result<OutFiles> {
        let created = !dir.exists();
        std::fs::create_dir_all(dir).with_context(|| format!("--out {}: creating the folder", dir.display()))?;
        Ok(OutFiles { dir: dir.to_path_buf(), created, pending: Vec::new() })
    }

    /// The temporary path for `name`, to be renamed to `dir/name` by `commit`.
    pub(super) fn stage(&mut self, name: &str) -> PathBuf {
        // The extension stays last: plotters picks the image format by it.
        let tmp = self.dir.join(format!(".tmp-{}-{name}", std::process::id()));
        self.pending.push((tmp.clone(), self.dir.join(name)));
        tmp
    }

    pub(super) fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let tmp = self.stage(name);
        std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))
    }

    pub(super) fn commit(mut self) -> Result<()> {
        for (tmp, path) in std::mem::take(&mut self.pending) {
            std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }
}

impl Drop for OutFiles {
    /// Not committed: remove what was staged, and the folder if this run created it.
    fn drop(&mut self) {
        for (tmp, _) in &self.pending {
            let _ = std::fs::remove_file(tmp);
        }
        if self.created && !self.pending.is_empty() {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

impl EvalArgs {
    /// Everything that can be checked before the model loads.
    fn check(&self) -> Result<()> {
        if self.limit == Some(0) {
            bail!("--limit 0: at least one example is needed");
        }
        if self.calibration_limit == 0 {
            bail!("--calibration-limit 0: at least one calibration row is needed");
        }
        if self.max_tokens == 0 && self.score == ScoreKind::Rouge {
            bail!("--max-tokens 0: nothing would be generated");
        }
        for &t in &self.thresholds {
            if !(0.0..=1.0).contains(&t) {
                bail!("--thresholds {t} is outside the allowed range 0..=1");
            }
        }
        if self.no_full && self.skip_layers.is_empty() && self.static_skip.is_empty() && self.routers.is_none() {
            bail!("--no-full: no other plan is asked for (--skip-layers, --static-skip or --routers)");
        }
        if !self.lora_scale.is_finite() {
            bail!("--lora-scale {} is not a finite number", self.lora_scale);
        }
        if let Some(dir) = &self.out {
            check_out_dir(dir)?;
        }
        Ok(())
    }

    fn mode(&self) -> ScoreMode {
        match self.score {
            ScoreKind::Rouge => ScoreMode::Generate { max_tokens: self.max_tokens, stemmer: !self.no_stemmer },
            ScoreKind::Loglik => ScoreMode::LogLik,
        }
    }
}

/// The plans to evaluate, labelled, without adapters: the full model, the static skip list, the
/// static plans of lowest block influence (`static N`), then the routers at each threshold (a
/// static router file is one static plan, labelled by its file name).
fn plans(args: &EvalArgs, model: &LoadedModel, skip_layers: Option<&[usize]>, ctx_len: usize) -> Result<Vec<(String, PlanChoice)>> {
    let n = model.weights.config.n_layers;
    let mut plans = vec![("full".to_string(), PlanChoice::Static(LayerPlan::full(n)))];
    if let Some(layers) = skip_layers {
        plans.push((format!("skip {}", layer_list(layers)), PlanChoice::skipping(n, layers)?));
    }
    if let Some(path) = &args.calibration {
        let mut rows = load_task(path)?;
        rows.truncate(args.calibration_limit);
        let sequences = super::static_plan::calibration_sequences(model, &args.model.model, path, &rows, ctx_len)?;
        let bar = progress_bar(sequences.len(), "block influence (rows)");
        let influence = block_influence(&model.weights, &sequences, &mut |done, _| bar.set_position(done as u64))?;
        bar.finish_and_clear();
        for &count in &args.static_skip {
            let layers = influence.static_plan(count, false)?;
            eprintln!("static {count}: skip {} (lowest block influence over {} calibration tokens)", layer_list(&layers), influence.tokens);
            plans.push((format!("static {count}"), PlanChoice::skipping(n, &layers)?));
        }
    }
    if let Some(path) = &args.routers {
        let budget = PlanPolicyArgs { threshold: None, max_skip: args.max_skip, min_skip: args.min_skip };
        let (file, choice) = model.load_routers(path, &budget).context("--routers")?;
        match choice {
            PlanChoice::Static(_) if !args.thresholds.is_empty() => {
                bail!("--thresholds: {} holds a static plan (fixed decisions); thresholds do not apply to it", path.display())
            }
            PlanChoice::Static(_) => {
                let name = path.file_stem().map_or_else(|| path.display().to_string(), |s| s.to_string_lossy().into_owned());
                plans.push((name, choice));
            }
            PlanChoice::Routed(routing) => {
                let thresholds = if args.thresholds.is_empty() { vec![file.threshold] } else { args.thresholds.clone() };
                let mut bounds = String::new();
                if let Some(n) = args.min_skip {
                    bounds += &format!(" skip≥{n}");
                }
                if let Some(n) = args.max_skip {
                    bounds += &format!(" skip≤{n}");
                }
                for t in thresholds {
                    plans.push((format!("routers {t}{bounds}"), PlanChoice::Routed(EvalConfig::with_threshold(&routing, t))));
                }
            }
        }
    }
    Ok(plans)
}

pub fn run(gpu: &GpuOptions, args: EvalArgs) -> Result<()> {
    args.check()?;
    let mut examples: Vec<TaskExample> = load_task(&args.data)?;
    examples.truncate(args.limit.unwrap_or(usize::MAX));
    let config = open_model(&args.model.model).with_context(|| format!("loading {}", args.model.model.display()))?.config().clone();
    let ctx_len = super::context_len(&config, args.model.ctx)?;
    let skip_layers = match args.skip_layers.as_slice() {
        [] => None,
        list => {
            let mut layers = list.to_vec();
            layers.sort_unstable();
            layers.dedup();
            if let Some(&bad) = layers.iter().find(|&&l| l >= config.n_layers) {
                bail!("--skip-layers {bad}: the model has {} layers (0..{})", config.n_layers, config.n_layers - 1);
            }
            Some(layers)
        }
    };
    let skippable = skippable_layers(config.n_layers, false).len();
    if let Some(&count) = args.static_skip.iter().find(|&&c| c > skippable) {
        bail!(
            "--static-skip {count} is more than the {skippable} layers that may be skipped (the model has {}; the first and last layer are kept)",
            config.n_layers
        );
    }
    if let Some(path) = &args.calibration {
        load_task(path)?; // a bad calibration file is refused before the model loads
    }
    let (_ctx, model) = load_model(gpu, &args.model, None)?;
    if let Some(Err(e)) = &model.template {
        bail!("{}: {e}", args.model.model.display());
    }
    let lora = match &args.lora {
        Some(dir) => Some((model.load_lora(dir).with_context(|| format!("loading the LoRA adapter {}", dir.display()))?, args.lora_scale)),
        None => None,
    };
    let mut configs = Vec::new();
    let mut plans = plans(&args, &model, skip_layers.as_deref(), ctx_len)?;
    if args.no_full {
        plans.remove(0);
    }
    for (label, plan) in plans {
        if !args.lora_only {
            configs.push(EvalConfig { label: label.clone(), plan: plan.clone(), lora: None });
        }
        if let Some(l) = &lora {
            configs.push(EvalConfig { label: format!("{label} + lora"), plan, lora: Some(l.clone()) });
        }
    }
    let mode = args.mode();
    let names: &[&str] = match mode {
        ScoreMode::Generate { .. } => &GENERATE_METRICS,
        ScoreMode::LogLik => &LOGLIK_METRICS,
    };

    let bar = progress_bar(configs.len() * examples.len(), "");
    // Examples outer, configurations inner: a change of machine load between the start and
    // the end of the run touches every configuration alike.
    let mut results: Vec<Vec<ExampleResult>> = vec![Vec::with_capacity(examples.len()); configs.len()];
    for (i, example) in examples.iter().enumerate() {
        for (c, config) in configs.iter().enumerate() {
            bar.set_message(format!("{} · example {}/{}", config.label, i + 1, examples.len()));
            let r = evaluate_example(&model, config, example, mode, ctx_len).with_context(|| {
                format!("{}:{} (id {}), configuration '{}'", args.data.display(), example.line, example.id, config.label)
            })?;
            results[c].push(r);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();

    let mut summaries: Vec<ConfigSummary> = configs.iter().zip(&results).map(|(c, r)| ConfigSummary::new(&c.label, names, r)).collect();
    for (summary, config) in summaries.iter_mut().zip(&configs) {
        if summary.needs_probe() && matches!(mode, ScoreMode::Generate { .. }) {
            let (seconds, steps) = decode_probe(&model, config, &examples[0], DECODE_PROBE_STEPS, ctx_len)
                .with_context(|| format!("timing the decode of configuration '{}'", config.label))?;
            summary.set_probe(seconds, steps);
        }
    }
    let table = markdown_table(&summaries);
    let json = serde_json::json!({
        "model": args.model.model.display().to_string(),
        "dtype": model.weights.format_summary(),
        "adapter": model.weights.ctx.info.name,
        "data": args.data.display().to_string(),
        "examples": examples.len(),
        "score": match mode { ScoreMode::Generate { .. } => "rouge", ScoreMode::LogLik => "loglik" },
        "max_tokens": args.max_tokens,
        "stemmer": !args.no_stemmer,
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "interval": 0.95},
        "lora": args.lora.as_ref().map(|d| serde_json::json!({"dir": d.display().to_string(), "scale": args.lora_scale})),
        "configurations": configs.iter().zip(&summaries).zip(&results).map(|((c, s), r)| {
            let mut v = s.to_json();
            v["lora"] = serde_json::json!(c.lora.is_some());
            v["plan"] = match &c.plan {
                PlanChoice::Static(plan) => serde_json::json!({"kind": "static", "skip_layers": plan.skipped_layers()}),
                PlanChoice::Routed(routing) => serde_json::json!({
                    "kind": "routers",
                    "threshold": routing.policy.threshold,
                    "max_skip": routing.policy.max_skip,
                    "min_skip": routing.policy.min_skip,
                }),
            };
            v["per_example"] = r.iter().map(|e| example_json(names, e)).collect();
            v
        }).collect::<Vec<_>>(),
    });
    if args.json {
        println!("{json}");
    } else {
        print!("{table}");
    }
    if let Some(dir) = &args.out {
        let (metric, scale, y_label) = match mode {
            ScoreMode::Generate { .. } => ("rougeLsum", 100.0, "ROUGE-Lsum F (%)"),
            ScoreMode::LogLik => ("nll", 1.0, "NLL of the references (nats/token)"),
        };
        let points: Vec<PlotPoint> = summaries.iter().filter_map(|s| PlotPoint::of(s, metric, scale)).collect();
        let title = format!(
            "{} · {} examples · {}",
            args.data.file_name().map_or_else(|| args.data.display().to_string(), |n| n.to_string_lossy().into_owned()),
            examples.len(),
            args.model.model.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        );
        let mut out = OutFiles::new(dir)?;
        let (svg, png) = (out.stage("plot.svg"), out.stage("plot.png"));
        write_plot(&points, &title, y_label, &svg, &png)?;
        let md = format!(
            "# {title}\n\n{}, {} examples, {}, dtype {}, adapter {}.\n\n{table}",
            args.data.display(),
            examples.len(),
            match mode {
                ScoreMode::Generate { max_tokens, stemmer } => {
                    format!("greedy, at most {max_tokens} tokens, ROUGE F-measure (%) with{} stemming", if stemmer { "" } else { "out" })
                }
                ScoreMode::LogLik => "teacher-forced NLL of the references".into(),
            },
            model.weights.format_summary(),
            model.weights.ctx.info.name
        );
        out.write("results.json", &serde_json::to_vec_pretty(&json)?)?;
        out.write("results.md", md.as_bytes())?;
        out.commit()?;
        eprintln!("wrote results.json, results.md, plot.svg and plot.png into {}", dir.display());
    }
    Ok(())
}
