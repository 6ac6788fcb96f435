//! `firstrt run` and `firstrt chat`.

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;

use firstrt::generate::{
    Conversation, Event, GenerateError, GenerateOptions, Generation, SamplerConfig, TextDecoder, TokenStream, fit_prompt,
};
use firstrt::gpu::GpuOptions;
use firstrt::model::chat::ChatMessage;
use firstrt::runtime::{GpuLora, LayerPlan, LoadedModel, MergedLora, PlanChoice, PlanPolicyArgs, Session, SessionOptions};

use super::{ModelArgs, load_model};

#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Maximum number of tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Sample among the K most likely tokens (0: no limit beyond the 256 candidates read back).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Nucleus sampling: the smallest set of candidates whose probability reaches P.
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Random seed (default: from the clock).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when the generated text contains this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    /// Before the model loads: `--temperature` finite and >= 0, `--top-p` in 0..=1, `--top-k` at
    /// most the 256 candidates read back (the library's [`SamplerConfig::validate`], with the
    /// field named as its flag).
    pub(super) fn check(&self) -> Result<()> {
        let config = SamplerConfig { temperature: self.temperature, top_k: self.top_k, top_p: self.top_p, seed: 0 };
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("--{} {} is outside the allowed range {}", e.field.replace('_', "-"), e.value, e.allowed))
    }

    /// The generation options (the seed from the clock unless given), ending at the model's end
    /// tokens.
    fn options(&self, model: &LoadedModel) -> GenerateOptions {
        let seed = self
            .seed
            .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64));
        let sampler = SamplerConfig { temperature: self.temperature.max(0.0), top_k: self.top_k, top_p: self.top_p.clamp(0.0, 1.0), seed };
        GenerateOptions { max_tokens: self.max_tokens, sampler, end_ids: model.tokenizer.end_ids().to_vec() }
    }
}

#[derive(Args, Debug, Clone)]
pub struct PlanArgs {
    /// Skip these decoder layers (0-based, comma-separated) for the whole sequence.
    #[arg(long, value_delimiter = ',', conflicts_with = "routers")]
    pub skip_layers: Vec<usize>,
    /// A FiRST router file: routers decide during prefill which layers this input runs (a
    /// static plan's file from `static-plan --out` gives its fixed plan).
    #[arg(long)]
    pub routers: Option<PathBuf>,
    /// A layer runs iff its router's probability is at least this (default: the file's).
    #[arg(long, requires = "routers")]
    pub router_threshold: Option<f32>,
    /// Skip at most N layers (the N lowest probabilities among those below the threshold).
    #[arg(long, requires = "routers")]
    pub max_skip: Option<usize>,
    /// Skip at least N layers (the N lowest probabilities).
    #[arg(long, requires = "routers")]
    pub min_skip: Option<usize>,
    /// Print each layer's router probability and run/skip decision to stderr.
    #[arg(long)]
    pub show_plan: bool,
}

impl PlanArgs {
    /// Before the model loads: `--router-threshold` is a probability (0..=1) and `--min-skip`
    /// is not above `--max-skip`.
    pub(super) fn check(&self) -> Result<()> {
        if let Some(t) = self.router_threshold
            && !(0.0..=1.0).contains(&t)
        {
            bail!("--router-threshold {t} is outside the allowed range 0..=1");
        }
        if let (Some(min), Some(max)) = (self.min_skip, self.max_skip)
            && min > max
        {
            bail!("--min-skip {min} is above --max-skip {max}");
        }
        Ok(())
    }

    /// How this run's sessions choose their layers, made once: `--skip-layers` (static), or a
    /// router file read and uploaded (routed, or the static plan it holds; then
    /// `--router-threshold`, `--min-skip` and `--max-skip` are refused).
    pub(super) fn choice(&self, model: &LoadedModel) -> Result<PlanChoice> {
        match &self.routers {
            Some(path) => {
                let policy = PlanPolicyArgs { threshold: self.router_threshold, max_skip: self.max_skip, min_skip: self.min_skip };
                let (_, plan) = model.load_routers(path, &policy).context("--routers")?;
                Ok(plan)
            }
            None => Ok(PlanChoice::skipping(model.weights.config.n_layers, &self.skip_layers)?),
        }
    }

    /// What decided the plan, as `--json` reports it: `routed` (routers), `static` (a skip list
    /// or a static plan's router file that skips layers) or `full` (nothing skipped, fixed).
    pub(super) fn kind(choice: &PlanChoice, plan: &LayerPlan) -> &'static str {
        match choice {
            PlanChoice::Routed(_) => "routed",
            PlanChoice::Static(_) if plan.kept() == plan.len() => "full",
            PlanChoice::Static(_) => "static",
        }
    }

    /// After the first prefill: print the plan when asked (a static plan has no probabilities).
    fn report(&self, session: &Session, choice: &PlanChoice) {
        if !self.show_plan {
            return;
        }
        let plan = session.plan();
        for (l, p) in session.router_probs().iter().enumerate() {
            let decision = if plan.runs(l) { "run" } else { "skip" };
            match (choice, p) {
                (PlanChoice::Static(_), _) => eprintln!("layer {l:>3}: {decision}"),
                (PlanChoice::Routed(_), p) => {
                    let p = p.map_or("    -".to_string(), |p| format!("{p:.3}"));
                    eprintln!("layer {l:>3}: p = {p}  {decision}");
                }
            }
        }
        let source = match (choice, &self.routers) {
            (PlanChoice::Routed(_), Some(path)) => format!("routed by {}", path.display()),
            (PlanChoice::Static(_), Some(path)) => format!("static, from {}", path.display()),
            _ if self.skip_layers.is_empty() => "full model".to_string(),
            _ => "static, --skip-layers".to_string(),
        };
        eprintln!("plan ({source}): {} of {} layers run, skipped {:?}", plan.kept(), plan.len(), plan.skipped_layers());
    }
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraMode {
    /// W + S (alpha / r) B A folded into the weights at load: decoding costs nothing extra.
    Merged,
    /// Base weights untouched, two small extra products per adapted projection group; the
    /// adapter can be swapped or rescaled without reloading (chat: /lora).
    Unmerged,
}

#[derive(Args, Debug, Clone)]
pub struct LoraArgs {
    /// A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub lora: Option<PathBuf>,
    /// How the adapter is applied (default: merged for run, unmerged for chat).
    #[arg(long, value_enum, requires = "lora")]
    pub lora_mode: Option<LoraMode>,
    /// Multiplies the adapter's delta: W + S (alpha / r) B A (0: the base model).
    #[arg(long, default_value_t = 1.0, requires = "lora")]
    pub lora_scale: f32,
}

/// The adapter, as the model and its sessions need it.
struct LoraSetup {
    /// What to merge at load (merged mode).
    merged: Option<MergedLora>,
    /// The folder to upload after load (unmerged mode) and the scale.
    unmerged: Option<(PathBuf, f32)>,
}

impl LoraArgs {
    fn setup(&self, default: LoraMode) -> Result<LoraSetup> {
        let Some(dir) = &self.lora else { return Ok(LoraSetup { merged: None, unmerged: None }) };
        if !self.lora_scale.is_finite() {
            bail!("--lora-scale {} is not a finite number", self.lora_scale);
        }
        Ok(match self.lora_mode.unwrap_or(default) {
            LoraMode::Merged => LoraSetup { merged: Some(MergedLora { dir: dir.clone(), scale: self.lora_scale }), unmerged: None },
            LoraMode::Unmerged => LoraSetup { merged: None, unmerged: Some((dir.clone(), self.lora_scale)) },
        })
    }
}

/// Upload the unmerged adapter, if any.
fn upload_lora(model: &LoadedModel, setup: &LoraSetup) -> Result<Option<(Arc<GpuLora>, f32)>> {
    match &setup.unmerged {
        Some((dir, scale)) => {
            let g = model.load_lora(dir).context("loading the LoRA adapter")?;
            Ok(Some((g, *scale)))
        }
        None => Ok(None),
    }
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt (default: read from stdin).
    #[arg(long, short = 'p')]
    pub prompt: Option<String>,
    /// Token ids used as they are (no template, no BOS), e.g. 1,2,3.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["prompt", "chat"])]
    pub prompt_ids: Option<Vec<u32>>,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    pub chat: bool,
    /// A system message for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub plan: PlanArgs,
    #[command(flatten)]
    pub lora: LoraArgs,
    /// Keep only the end of a prompt that does not fit the context, instead of failing.
    #[arg(long)]
    pub truncate: bool,
    /// Print one JSON object (ids, text, timings, plan) on stdout instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Write the logits of the last prompt position to this safetensors file (tensor `logits`, [vocab] f32).
    #[arg(long)]
    pub logits_out: Option<PathBuf>,
    #[command(flatten)]
    pub profiling: super::profiling::ProfileArgs,
}

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A system message for the conversation.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub plan: PlanArgs,
    #[command(flatten)]
    pub lora: LoraArgs,
}

fn print_timings(g: &Generation) {
    let t = &g.timings;
    eprintln!(
        "\nprefill: {} tokens in {:.2} s ({:.1} tok/s) | decode: {} tokens in {:.2} s ({:.1} tok/s, {:.1} ms/token) | stop: {:?}",
        t.prefill_tokens,
        t.prefill_s,
        t.prefill_tok_s(),
        t.decode_tokens,
        t.decode_s,
        t.decode_tok_s(),
        t.decode_ms_per_token(),
        g.finish
    );
}

/// Drain a stream: each text piece to stdout as it comes when `echo`, `on_token` for each
/// generated token; returns the record.
fn drive(mut stream: TokenStream<'_>, echo: bool, on_token: &mut dyn FnMut()) -> Result<Generation> {
    for event in &mut stream {
        match event? {
            Event::Token(_) => on_token(),
            Event::Text(piece) if echo => {
                let mut out = std::io::stdout().lock();
                out.write_all(piece.as_bytes())?;
                out.flush()?;
            }
            Event::Text(_) | Event::Finished { .. } => {}
        }
    }
    Ok(stream.into_generation())
}

fn write_logits(path: &Path, logits: &[f32]) -> Result<()> {
    let bytes: &[u8] = bytemuck::cast_slice(logits);
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![logits.len()], bytes)?;
    safetensors::serialize_to_file([("logits", view)], None, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub fn run(gpu: &GpuOptions, args: RunArgs) -> Result<()> {
    args.sampling.check()?;
    args.plan.check()?;
    args.profiling.check()?;
    if let Some(path) = &args.logits_out {
        super::check_output("--logits-out", path)?;
    }
    let lora_setup = args.lora.setup(LoraMode::Merged)?;
    let (ctx, model) = load_model(gpu, &args.model, lora_setup.merged.as_ref())?;
    let lora = upload_lora(&model, &lora_setup)?;
    let prompt_ids = if let Some(ids) = &args.prompt_ids {
        ids.clone()
    } else {
        let text = match &args.prompt {
            Some(p) => p.clone(),
            None => {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s).context("reading the prompt from stdin")?;
                s
            }
        };
        if args.chat {
            let mut messages: Vec<ChatMessage> = args.system.iter().map(ChatMessage::system).collect();
            messages.push(ChatMessage::user(text));
            model.chat_ids(&messages)?
        } else {
            model.text_ids(&text)?
        }
    };
    let ctx_len = super::context_len(&model.weights.config, args.model.ctx)?;
    let (prompt_ids, cut) = fit_prompt(&prompt_ids, ctx_len, args.sampling.max_tokens, args.truncate)
        .map_err(|e| anyhow::anyhow!("{e}; raise --ctx or pass --truncate"))?;
    if cut > 0 {
        eprintln!("warning: prompt truncated from {} to its last {} tokens", cut + prompt_ids.len(), prompt_ids.len());
    }
    let options = args.sampling.options(&model);
    let choice = args.plan.choice(&model)?;
    let mut session = choice.session(&model.weights, SessionOptions { ctx_len, candidates: options.sampler.candidates() })?;
    if let Some((g, scale)) = &lora {
        session.set_lora(Some(g.clone()), *scale)?;
    }
    // The decode step's and the prefill's pipelines compile in one warm-up (TokenStream::start
    // finds the prefill prepared).
    session.prepare_prefill(prompt_ids.len())?;
    session.set_profiler(args.profiling.profiler(&ctx)?);
    let mut capture = super::profiling::Capture::start(&ctx, args.profiling.capture);
    let text = TextDecoder::new(&model.tokenizer, &args.sampling.stop);
    let stream = TokenStream::start(&mut session, prompt_ids, &options, Some(text))?;
    args.plan.report(stream.session(), &choice);
    if let Some(path) = &args.logits_out {
        write_logits(path, &stream.session().read_logits()?).context("--logits-out")?;
    }
    let mut seen = 0usize;
    let generation = drive(stream, !args.json, &mut || {
        seen += 1;
        if seen == 2 {
            capture.stop(); // the prefill and the first decode step are in
        }
    })?;
    capture.stop();
    if args.json {
        let out = serde_json::json!({
            "prompt_ids": generation.prompt_ids,
            "generated_ids": generation.generated_ids,
            "text": generation.text,
            "stop_reason": generation.finish,
            "skipped_layers": session.plan().skipped_layers(),
            "plan": PlanArgs::kind(&choice, session.plan()),
            "lora": args.lora.lora.as_ref().map(|dir| serde_json::json!({
                "dir": dir.display().to_string(),
                "mode": if lora_setup.merged.is_some() { "merged" } else { "unmerged" },
                "scale": args.lora.lora_scale,
            })),
            "timings": {
                "prefill_tokens": generation.timings.prefill_tokens,
                "prefill_s": generation.timings.prefill_s,
                "prefill_tok_s": generation.timings.prefill_tok_s(),
                "decode_tokens": generation.timings.decode_tokens,
                "decode_s": generation.timings.decode_s,
                "decode_tok_s": generation.timings.decode_tok_s(),
                "ttft_s": generation.timings.ttft_s,
            },
        });
        println!("{out}");
    } else {
        println!();
    }
    print_timings(&generation);
    args.profiling.finish(session.set_profiler(None))
}

/// What a `/lora ...` line asks for.
#[derive(Debug, PartialEq)]
enum LoraCommand {
    Load(PathBuf),
    Scale(f32),
    Off,
}

/// Parse a chat line: None when it is not a `/lora` command, Some(Err) when it is a bad one.
fn parse_lora_command(line: &str) -> Option<Result<LoraCommand, String>> {
    let line = line.trim();
    let rest = line.strip_prefix("/lora")?;
    if !rest.is_empty() && !rest.starts_with(char::is_whitespace) {
        return None;
    }
    let rest = rest.trim();
    Some(if rest.is_empty() {
        Err("usage: /lora DIR | /lora scale S | /lora off".into())
    } else if rest == "off" {
        Ok(LoraCommand::Off)
    } else if let Some(v) = rest.strip_prefix("scale ") {
        match v.trim().parse::<f32>() {
            Ok(s) if s.is_finite() => Ok(LoraCommand::Scale(s)),
            _ => Err(format!("/lora scale: '{}' is not a finite number", v.trim())),
        }
    } else {
        Ok(LoraCommand::Load(PathBuf::from(rest)))
    })
}

pub fn chat(gpu: &GpuOptions, args: ChatArgs) -> Result<()> {
    args.sampling.check()?;
    args.plan.check()?;
    let lora_setup = args.lora.setup(LoraMode::Unmerged)?;
    let (_ctx, model) = load_model(gpu, &args.model, lora_setup.merged.as_ref())?;
    match &model.template {
        None => bail!("{} has no chat template", args.model.model.display()),
        Some(Err(e)) => bail!("{}: {e}", args.model.model.display()),
        Some(Ok(_)) => {}
    }
    // The unmerged adapter and its scale; /lora commands change it.
    let mut lora = upload_lora(&model, &lora_setup)?;
    let ctx_len = super::context_len(&model.weights.config, args.model.ctx)?;
    let options = args.sampling.options(&model);
    let choice = args.plan.choice(&model)?;
    let new_session = |lora: &Option<(Arc<GpuLora>, f32)>| -> Result<Session> {
        let mut s = choice.session(&model.weights, SessionOptions { ctx_len, candidates: options.sampler.candidates() })?;
        if let Some((g, scale)) = lora {
            s.set_lora(Some(g.clone()), *scale)?;
        }
        s.prepare()?;
        Ok(s)
    };
    let mut session = new_session(&lora)?;
    let mut conversation = Conversation::new(args.system.clone());
    eprintln!("chat with {} — an empty line or Ctrl-D ends; /lora DIR, /lora scale S, /lora off", args.model.model.display());
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        std::io::stderr().flush().ok();
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some(command) = parse_lora_command(&line) {
            let next = match (command, &model.merged_lora) {
                (Err(usage), _) => Err(anyhow::anyhow!(usage)),
                (Ok(_), Some(m)) => Err(anyhow::anyhow!(
                    "the adapter {} is merged into the weights; start with --lora-mode unmerged to change adapters",
                    m.dir.display()
                )),
                (Ok(LoraCommand::Off), None) => Ok(None),
                (Ok(LoraCommand::Scale(s)), None) => match &lora {
                    Some((g, _)) => Ok(Some((g.clone(), s))),
                    None => Err(anyhow::anyhow!("no adapter loaded: /lora DIR first")),
                },
                (Ok(LoraCommand::Load(dir)), None) => {
                    let scale = lora.as_ref().map_or(args.lora.lora_scale, |(_, s)| *s);
                    model.load_lora(&dir).context("loading the LoRA adapter").map(|g| Some((g, scale)))
                }
            };
            match next {
                Ok(next) => {
                    lora = next;
                    // The cache holds what the previous adapter computed: a new session reads
                    // the conversation again under the new one at the next turn.
                    session = new_session(&lora)?;
                    match &lora {
                        Some((g, s)) => {
                            eprintln!("(LoRA {} at scale {s}, rank {}, {} KiB on the GPU)", g.dir.display(), g.rank, g.byte_len() / 1024)
                        }
                        None => eprintln!("(LoRA off)"),
                    }
                }
                Err(e) => eprintln!("error: {e:#}"),
            }
            continue;
        }
        let question = line.trim_end_matches(['\n', '\r']);
        let turn = match conversation.ask(question, session.position(), ctx_len, |m: &[ChatMessage]| model.chat_ids(m)) {
            Ok(turn) => turn,
            Err(e @ GenerateError::PromptTooLong { .. }) => {
                eprintln!("error: {e}; ask a shorter question or raise --ctx");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if turn.dropped_exchanges > 0 {
            eprintln!(
                "(the conversation no longer fits the context of {ctx_len} tokens; dropped the oldest {} exchange(s), kept the system prompt)",
                turn.dropped_exchanges
            );
        }
        if turn.restart {
            session = new_session(&lora)?;
        }
        let first_turn = session.position() == 0;
        let text = TextDecoder::new(&model.tokenizer, &args.sampling.stop);
        let stream = TokenStream::start(&mut session, &turn.ids, &options, Some(text))?;
        if first_turn {
            args.plan.report(stream.session(), &choice);
        }
        let g = drive(stream, true, &mut || {})?;
        println!();
        print_timings(&g);
        conversation.record(turn, g.text, &g.generated_ids, session.position());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_commands() {
        assert_eq!(parse_lora_command("/lora off\n"), Some(Ok(LoraCommand::Off)));
        assert_eq!(parse_lora_command("/lora scale 0.5"), Some(Ok(LoraCommand::Scale(0.5))));
        assert_eq!(parse_lora_command("/lora  /tmp/my adapter "), Some(Ok(LoraCommand::Load(PathBuf::from("/tmp/my adapter")))));
        assert!(matches!(parse_lora_command("/lora scale x"), Some(Err(_))));
        assert!(matches!(parse_lora_command("/lora scale inf"), Some(Err(_))));
        assert!(matches!(parse_lora_command("/lora"), Some(Err(_))));
        assert_eq!(parse_lora_command("/loraxyz"), None);
        assert_eq!(parse_lora_command("tell me about /lora"), None);
    }
}
