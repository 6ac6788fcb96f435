//! `firstrt train`: FiRST routers and/or a LoRA adapter trained on the GPU (see
//! `firstrt::train`), with checkpoints, `--resume`, a progress bar and `--json` step lines.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::Serialize;

use firstrt::eval::data::load_task;
use firstrt::gpu::GpuOptions;
use firstrt::kernels::adamw::AdamWConfig;
use firstrt::model::lora::{LoraAdapter, LoraConfig, LoraDims, Projection};
use firstrt::model::routers::{RouterFile, model_identity};
use firstrt::runtime::PlanPolicyArgs;
use firstrt::runtime::plan::PlanPolicy;
use firstrt::train::checkpoint::Checkpoint;
use firstrt::train::data::{Overflow, TrainSequence, prepare};
use firstrt::train::engine::{Engine, EngineOptions, GateRule, SequenceStats};

use super::ModelArgs;

/// What a run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// The routers, with the model and any adapter frozen (FiRST's first stage).
    Routers,
    /// A LoRA adapter under the routers' inference plan at their threshold (routers frozen).
    Lora,
    /// Routers and adapter together, with hard gates.
    Joint,
}

/// How a routed layer's gate follows from its probability while training routers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Gate {
    /// z ~ Bernoulli(p) per sequence with the straight-through gradient (the method's default).
    Hard,
    /// g = p.
    Soft,
    /// z ~ Bernoulli(p) per sequence, as hard, with the score-function (REINFORCE) gradient:
    /// (loss under the drawn plan − the full model's cross-entropy) · (z − p) / (p (1 − p)).
    /// Forward passes only; the routers stage alone.
    Score,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Training rows: JSONL {"id", "prompt", "completion"} (or "references": the first is used).
    #[arg(long)]
    pub data: PathBuf,
    /// Held-out rows: every --eval-every steps, their mean cross-entropy and layers skipped
    /// under the inference plan.
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// What to train.
    #[arg(long, value_enum)]
    pub stage: Stage,
    /// A router file to start from (routers, joint) or to run under (lora; required there).
    /// Without it, routers start from `routers init` with --router-rank and --router-bias.
    #[arg(long)]
    pub routers: Option<PathBuf>,
    /// A PEFT adapter to start from (lora, joint) or to apply frozen (routers).
    #[arg(long)]
    pub lora: Option<PathBuf>,
    /// Optimizer steps.
    #[arg(long)]
    pub steps: usize,
    /// Sequences per step (gradients are averaged over them).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// AdamW learning rate (constant).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f32,
    /// AdamW weight decay (decoupled).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f32,
    /// Global gradient-norm clipping of each step's mean gradient.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
    /// λ: weight of the mean router probability in the loss.
    #[arg(long, default_value_t = 0.01)]
    pub lambda: f32,
    /// Adds μ · |mean p − TARGET| to the loss: a budget of kept layers (a fraction in [0, 1]).
    #[arg(long)]
    pub keep_target: Option<f32>,
    /// μ of --keep-target.
    #[arg(long, default_value_t = 1.0, requires = "keep_target")]
    pub keep_weight: f32,
    /// Gates while training routers (routers and joint stages).
    #[arg(long, value_enum, default_value_t = Gate::Hard)]
    pub gate: Gate,
    /// τ: a layer runs iff p >= τ (the lora stage's plan, --eval, and the saved router file's
    /// default). Default: the router file's, 0.5 for new routers.
    #[arg(long)]
    pub threshold: Option<f32>,
    /// Skip at most N layers per sequence (the N lowest probabilities among those below τ), as
    /// `run --max-skip`: the lora stage's plan and --eval's. Needs --routers or new routers.
    #[arg(long)]
    pub max_skip: Option<usize>,
    /// Skip at least N layers per sequence (the N lowest probabilities), as `run --min-skip`.
    #[arg(long)]
    pub min_skip: Option<usize>,
    /// Rank of new routers (0: linear).
    #[arg(long, default_value_t = 16)]
    pub router_rank: usize,
    /// Output bias of new routers: every layer starts at p = sigmoid(bias).
    #[arg(long, default_value_t = 2.0)]
    pub router_bias: f32,
    /// Let routers skip layer 0 and the last layer (new routers only).
    #[arg(long)]
    pub skip_first_last: bool,
    /// LoRA rank r of a new adapter.
    #[arg(long, default_value_t = 8)]
    pub lora_r: usize,
    /// LoRA alpha of a new adapter (scaling alpha / r).
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f32,
    /// Projections a new adapter targets (PEFT module names).
    #[arg(long, value_delimiter = ',', default_value = "q_proj,k_proj,v_proj,o_proj")]
    pub lora_targets: Vec<String>,
    /// Seed of the data order, the gates and a new adapter's initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Rows longer than --ctx: cut the prompt from the left (default) or skip them.
    #[arg(long)]
    pub skip_long: bool,
    /// Train on the first N rows of --data only.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Save a checkpoint every K steps (and at the end and at Ctrl-C).
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: usize,
    /// Evaluate --eval every K steps (default: --checkpoint-every).
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Continue from OUT/checkpoint.safetensors (the options must match the ones it was made with).
    #[arg(long)]
    pub resume: bool,
    /// One JSON line per step (and per evaluation) on stdout.
    #[arg(long)]
    pub json: bool,
    /// Output folder: routers.safetensors, adapter/, checkpoint.safetensors.
    #[arg(long)]
    pub out: PathBuf,
}

/// The options a checkpoint records: a resumed run must use the same ones.
#[derive(Debug, Serialize, PartialEq)]
struct RunOptions<'a> {
    data: String,
    stage: Stage,
    batch: usize,
    lr: f32,
    weight_decay: f32,
    max_grad_norm: f32,
    lambda: f32,
    keep_target: Option<f32>,
    keep_weight: f32,
    gate: Gate,
    threshold: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_skip: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    min_skip: Option<usize>,
    lora_r: usize,
    lora_alpha: f32,
    lora_targets: &'a [String],
    router_rank: usize,
    router_bias: f32,
    seed: u64,
    ctx: usize,
    limit: Option<usize>,
    skip_long: bool,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C sets a flag that the loop reads after each step: it saves a checkpoint and stops.
fn catch_ctrl_c() {
    let handler = on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
    }
}

/// One JSON line of `--json`.
#[derive(Serialize)]
struct StepLine {
    step: usize,
    loss: f32,
    ce: f32,
    mean_p: Option<f32>,
    skipped: f32,
    grad_norm: f32,
    tokens_per_s: f64,
}

#[derive(Serialize)]
struct EvalLine {
    step: usize,
    eval_ce: f64,
    eval_skipped: f64,
    rows: usize,
}

/// The sequences of step `step` (from 0): the data in a new seeded order each epoch, taken
/// `batch` at a time, so that a resumed run sees exactly what an uninterrupted one would.
fn batch_indices(n: usize, batch: usize, step: usize, seed: u64) -> Vec<usize> {
    let mut out = Vec::with_capacity(batch);
    // The batch's items by epoch: each epoch's order is shuffled once.
    let (mut order_epoch, mut order) = (usize::MAX, Vec::new());
    for k in step * batch..(step + 1) * batch {
        let (epoch, i) = (k / n, k % n);
        if epoch != order_epoch {
            order = (0..n).collect();
            order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
            order_epoch = epoch;
        }
        out.push(order[i]);
    }
    out
}

/// The gate seed of sequence `i` of step `step`.
fn gate_seed(seed: u64, step: usize, i: usize) -> u64 {
    seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ ((step as u64) << 20) ^ i as u64
}

fn parse_targets(names: &[String]) -> Result<Vec<Projection>> {
    let mut targets = Vec::new();
    for n in names {
        let p = Projection::parse(n).with_context(|| {
            format!("--lora-targets: unknown projection {n:?} (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")
        })?;
        if !targets.contains(&p) {
            targets.push(p);
        }
    }
    targets.sort_by_key(|p| p.index());
    Ok(targets)
}

pub fn run(gpu: &GpuOptions, args: TrainArgs) -> Result<()> {
    if args.steps == 0 || args.batch == 0 {
        bail!("--steps and --batch must be at least 1");
    }
    if let Some(c) = args.model.ctx
        && c < 2
    {
        bail!("--ctx {c}: training needs at least 2 positions (a prompt token and a target)");
    }
    if args.checkpoint_every == 0 || args.eval_every == Some(0) {
        bail!("--checkpoint-every and --eval-every must be at least 1");
    }
    if let Some(t) = args.threshold
        && !(0.0..=1.0).contains(&t)
    {
        bail!("--threshold {t}: must be in [0, 1]");
    }
    if let Some(k) = args.keep_target
        && !(0.0..=1.0).contains(&k)
    {
        bail!("--keep-target {k}: must be a fraction in [0, 1]");
    }
    if !(args.lr.is_finite() && args.lr > 0.0) {
        bail!("--lr {}: must be positive", args.lr);
    }
    let targets = parse_targets(&args.lora_targets)?;
    let ckpt_path = args.out.join("checkpoint.safetensors");
    if !args.resume && ckpt_path.exists() {
        bail!("{} exists: continue it with --resume, or choose another --out", ckpt_path.display());
    }
    let examples = load_task(&args.data)?;
    let examples = &examples[..args.limit.unwrap_or(usize::MAX).min(examples.len())];
    let eval_examples = args.eval.as_ref().map(|p| load_task(p)).transpose()?;

    let (_ctx, model) = super::load_model(gpu, &args.model, None)?;
    let config = &model.weights.config;
    let ctx_len = super::context_len(config, args.model.ctx.or(Some(512)))?;
    let overflow = if args.skip_long { Overflow::Skip } else { Overflow::TruncatePrompt };
    let (train, stats) = prepare(&model, &args.data, examples, ctx_len, overflow)?;
    eprintln!(
        "{} training sequences, {} tokens ({} prompts cut to --ctx {ctx_len}, {} rows skipped)",
        train.len(),
        stats.tokens,
        stats.truncated,
        stats.skipped
    );
    let eval = match (&args.eval, &eval_examples) {
        (Some(p), Some(ex)) => Some(prepare(&model, p, ex, ctx_len, overflow)?.0),
        _ => None,
    };

    // Routers: given, or new ones; the lora stage only runs under them.
    let identity = model_identity(model.source.as_ref())?;
    let mut routers = match &args.routers {
        Some(p) => {
            let file = RouterFile::load(p, &identity)?;
            if file.static_skip.is_some() && args.stage != Stage::Lora {
                bail!("--routers {}: a static plan's file has no routers to train (use it with --stage lora)", p.display());
            }
            Some(file)
        }
        None if args.stage != Stage::Lora => {
            let mut f = RouterFile::init(&identity, args.router_rank, args.router_bias, config.rms_eps, 0.5);
            f.skip_first_last = args.skip_first_last;
            Some(f)
        }
        None => None,
    };
    if let (Some(r), Some(t)) = (routers.as_mut(), args.threshold) {
        r.threshold = t;
    }
    // The adapter: given, or a new one for the stages that train it.
    let adapter = match &args.lora {
        Some(dir) => Some(LoraAdapter::load(dir, config)?),
        None if args.stage != Stage::Routers => {
            let cfg = LoraConfig { rank: args.lora_r, alpha: args.lora_alpha, use_rslora: false, targets };
            Some(LoraAdapter::init(cfg, LoraDims::of(config), args.seed)?)
        }
        None => None,
    };
    // A static plan's file fixes the plan; routers decide one per sequence at τ.
    let static_skip = routers.as_ref().and_then(|r| r.static_skip.clone());
    let budget_given = args.max_skip.is_some() || args.min_skip.is_some();
    if budget_given && (routers.is_none() || static_skip.is_some()) {
        bail!("--max-skip/--min-skip: they bound what routers skip; give --routers with routers (not a static plan)");
    }
    let budget = PlanPolicyArgs { threshold: None, max_skip: args.max_skip, min_skip: args.min_skip };
    let policy = routers.as_ref().filter(|r| r.static_skip.is_none()).map(|r| budget.apply(&PlanPolicy::from_routers(r)));
    if let Some(policy) = &policy {
        policy.validate().context("--max-skip/--min-skip")?;
    }
    // The inference plan: what --eval measures and what the lora stage trains under.
    let inference = match &policy {
        Some(policy) => GateRule::Plan(policy.clone()),
        None => GateRule::Fixed((0..config.n_layers).map(|l| !static_skip.as_ref().is_some_and(|s| s.contains(&l))).collect()),
    };
    let gate = match (args.stage, args.gate) {
        (Stage::Lora, _) => inference.clone(),
        (_, Gate::Soft) => GateRule::Soft,
        (_, Gate::Hard) => GateRule::Hard,
        (Stage::Routers, Gate::Score) => GateRule::Score,
        (Stage::Joint, Gate::Score) => bail!("--gate score trains routers alone: use it with --stage routers"),
    };
    let options = EngineOptions {
        ctx_len,
        gate,
        train_routers: args.stage != Stage::Lora,
        train_lora: args.stage != Stage::Routers,
        lambda: args.lambda,
        keep_target: args.keep_target.map(|k| (k, args.keep_weight)),
        adamw: AdamWConfig { lr: args.lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: args.weight_decay },
        max_grad_norm: args.max_grad_norm,
    };
    let mut engine = Engine::new(model.weights.clone(), routers.clone(), adapter.as_ref(), options)?;

    let run_options = RunOptions {
        data: args.data.display().to_string(),
        stage: args.stage,
        batch: args.batch,
        lr: args.lr,
        weight_decay: args.weight_decay,
        max_grad_norm: args.max_grad_norm,
        lambda: args.lambda,
        keep_target: args.keep_target,
        keep_weight: args.keep_weight,
        gate: args.gate,
        threshold: args.threshold,
        max_skip: args.max_skip,
        min_skip: args.min_skip,
        lora_r: args.lora_r,
        lora_alpha: args.lora_alpha,
        lora_targets: &args.lora_targets,
        router_rank: args.router_rank,
        router_bias: args.router_bias,
        seed: args.seed,
        ctx: ctx_len,
        limit: args.limit,
        skip_long: args.skip_long,
    };
    let options_json = serde_json::to_string(&run_options)?;
    let mut history: Vec<f64> = Vec::new();
    let mut start_step = 0;
    if args.resume {
        let ckpt = Checkpoint::load(&ckpt_path)?;
        ckpt.check_model(&ckpt_path, &identity)?;
        ckpt.check_options(&ckpt_path, &options_json, &[])?;
        ckpt.check_tensors(&ckpt_path, &engine.state_layout())?;
        engine.load_state(&ckpt.tensors)?;
        start_step = usize::try_from(ckpt.step)?;
        history = ckpt.losses.clone();
        eprintln!("resuming {} at step {start_step}", ckpt_path.display());
        if start_step >= args.steps {
            bail!("{} is at step {start_step}: nothing left of --steps {}", ckpt_path.display(), args.steps);
        }
    }
    let save_checkpoint = |engine: &Engine, step: usize, losses: &[f64]| -> Result<()> {
        let ckpt = Checkpoint {
            step: step as u64,
            options: options_json.clone(),
            identity: identity.clone(),
            losses: losses.to_vec(),
            tensors: engine.state()?,
        };
        ckpt.save(&ckpt_path)?;
        Ok(())
    };

    std::fs::create_dir_all(&args.out).with_context(|| format!("--out {}: creating the folder", args.out.display()))?;
    catch_ctrl_c();
    let eval_every = args.eval_every.unwrap_or(args.checkpoint_every);
    let bar = super::progress_bar(args.steps, "training");
    bar.set_position(start_step as u64);
    let t0 = Instant::now();
    let mut tokens_done = 0usize;
    let mut last_good = start_step;
    let report_eval = |engine: &mut Engine, done: usize, bar: &indicatif::ProgressBar| -> Result<()> {
        if let Some(ev) = &eval {
            let (ce, skipped) = evaluate(engine, ev, &inference)?;
            bar.println(format!("step {done}: eval CE {ce:.4}, {skipped:.2} layers skipped over {} rows", ev.len()));
            if args.json {
                println!("{}", serde_json::to_string(&EvalLine { step: done, eval_ce: ce, eval_skipped: skipped, rows: ev.len() })?);
            }
        }
        Ok(())
    };
    if start_step == 0 {
        report_eval(&mut engine, 0, &bar)?;
    }
    for step in start_step..args.steps {
        let t_step = Instant::now();
        let mut stats: Vec<SequenceStats> = Vec::with_capacity(args.batch);
        let mut tokens = 0;
        for (i, idx) in batch_indices(train.len(), args.batch, step, args.seed).into_iter().enumerate() {
            let seq: &TrainSequence = &train[idx];
            let s = engine.accumulate(&seq.ids, seq.prompt_len, gate_seed(args.seed, step, i))?;
            if !s.loss().is_finite() {
                bar.abandon();
                bail!(
                    "step {}: the loss of row {} ({}:{}) is {}; stopping. The last good checkpoint is {} (step {last_good})",
                    step + 1,
                    seq.id,
                    args.data.display(),
                    seq.line,
                    s.loss(),
                    ckpt_path.display()
                );
            }
            tokens += seq.ids.len();
            stats.push(s);
        }
        let clip = engine.step(step as u32 + 1, args.lr, args.batch)?;
        if !clip.norm.is_finite() {
            bar.abandon();
            bail!(
                "step {}: the gradient norm is {}; stopping. The last good checkpoint is {} (step {last_good})",
                step + 1,
                clip.norm,
                ckpt_path.display()
            );
        }
        tokens_done += tokens;
        let n = stats.len() as f32;
        let loss = stats.iter().map(SequenceStats::loss).sum::<f32>() / n;
        let ce = stats.iter().map(|s| s.ce).sum::<f32>() / n;
        let ps: Vec<f32> = stats.iter().filter_map(SequenceStats::mean_p).collect();
        let mean_p = (!ps.is_empty()).then(|| ps.iter().sum::<f32>() / ps.len() as f32);
        let skipped = stats.iter().map(|s| s.skipped as f32).sum::<f32>() / n;
        history.push(loss as f64);
        let tps = tokens as f64 / t_step.elapsed().as_secs_f64();
        bar.set_position(step as u64 + 1);
        bar.set_message(format!(
            "step {} loss {loss:.4} ce {ce:.4} mean p {} skip {skipped:.1} {tps:.0} tok/s",
            step + 1,
            mean_p.map_or("-".into(), |p| format!("{p:.3}"))
        ));
        if args.json {
            let line = StepLine { step: step + 1, loss, ce, mean_p, skipped, grad_norm: clip.norm, tokens_per_s: tps };
            println!("{}", serde_json::to_string(&line)?);
        }
        let done = step + 1;
        if done % eval_every == 0 || done == args.steps {
            report_eval(&mut engine, done, &bar)?;
        }
        let interrupted = INTERRUPTED.load(Ordering::SeqCst);
        if done % args.checkpoint_every == 0 || done == args.steps || interrupted {
            save_checkpoint(&engine, done, &history)?;
            last_good = done;
        }
        if interrupted {
            bar.abandon();
            save_outputs(&engine, &args.out, routers.is_some(), adapter.is_some(), &model.path)?;
            bail!("interrupted after step {done}: saved {}; continue with --resume", ckpt_path.display());
        }
    }
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    save_outputs(&engine, &args.out, routers.is_some(), adapter.is_some(), &model.path)?;
    eprintln!(
        "trained {} steps in {secs:.1} s ({:.1} tokens/s), peak GPU memory {} MiB; final loss {:.4}",
        args.steps - start_step,
        tokens_done as f64 / secs,
        engine.peak_bytes() / (1 << 20),
        history.last().copied().unwrap_or(f64::NAN)
    );
    Ok(())
}

/// Mean cross-entropy and layers skipped over `rows` under the inference plan `rule`.
fn evaluate(engine: &mut Engine, rows: &[TrainSequence], rule: &GateRule) -> Result<(f64, f64)> {
    let (mut ce, mut skipped) = (0.0, 0.0);
    for seq in rows {
        let s = engine.evaluate(&seq.ids, seq.prompt_len, 0, rule)?;
        ce += s.ce as f64;
        skipped += s.skipped as f64;
    }
    let n = rows.len().max(1) as f64;
    Ok((ce / n, skipped / n))
}

/// Writes `out/routers.safetensors` and `out/adapter/` as they are now.
fn save_outputs(engine: &Engine, out: &Path, routers: bool, adapter: bool, model_path: &Path) -> Result<()> {
    if routers && let Some(file) = engine.router_file()? {
        let path = out.join("routers.safetensors");
        file.save(&path).context("saving the routers")?;
        eprintln!("saved {}", path.display());
    }
    if adapter && let Some(lora) = engine.lora() {
        let dir = out.join("adapter");
        let mut host = lora.download(engine.ctx())?;
        host.dir = dir.clone();
        host.save(&dir, Some(&model_path.display().to_string())).with_context(|| format!("saving {}", dir.display()))?;
        eprintln!("saved {}", dir.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_each_epoch_once_and_repeat_for_a_seed() {
        let n = 7;
        let mut seen: Vec<usize> = (0..7).flat_map(|s| batch_indices(n, 3, s, 5)).collect();
        // 21 draws = 3 epochs of 7: each epoch is a permutation.
        for epoch in seen.chunks_mut(7) {
            epoch.sort();
            assert_eq!(epoch, &[0, 1, 2, 3, 4, 5, 6]);
        }
        assert_eq!(batch_indices(n, 3, 4, 5), batch_indices(n, 3, 4, 5));
        assert_ne!(
            (0..3).flat_map(|s| batch_indices(n, 3, s, 5)).collect::<Vec<_>>(),
            (0..3).flat_map(|s| batch_indices(n, 3, s, 6)).collect::<Vec<_>>()
        );
    }
}
