//! `firstrt run` and `firstrt chat`.

use std::io::{BufRead, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;

use firstrt::gpu::GpuOptions;
use firstrt::kernels::sample::SamplerConfig;
use firstrt::model::chat::ChatMessage;
use firstrt::model::tokenizer::StreamDecoder;
use firstrt::runtime::{
    GenerateOptions, Generation, GpuLora, LayerPlan, LoadedModel, MergedLora, PlanPolicyArgs, Session, SessionOptions, generate_with,
};

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
    fn sampler(&self) -> SamplerConfig {
        let seed = self
            .seed
            .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64));
        SamplerConfig { temperature: self.temperature.max(0.0), top_k: self.top_k, top_p: self.top_p.clamp(0.0, 1.0), seed }
    }

    /// Candidates the GPU hands back per token.
    fn candidates(&self) -> usize {
        if self.temperature <= 0.0 {
            1
        } else if self.top_k == 0 {
            firstrt::runtime::session::MAX_CANDIDATES
        } else {
            self.top_k.min(firstrt::runtime::session::MAX_CANDIDATES)
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct PlanArgs {
    /// Skip these decoder layers (0-based, comma-separated) for the whole sequence.
    #[arg(long, value_delimiter = ',', conflicts_with = "routers")]
    pub skip_layers: Vec<usize>,
    /// A FiRST router file: routers decide during prefill which layers this input runs.
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

    /// A session under these options: routed, or with a static plan.
    pub(super) fn session(&self, model: &LoadedModel, options: SessionOptions) -> Result<Session> {
        let n = model.weights.config.n_layers;
        Ok(match &self.routers {
            Some(path) => {
                let policy = PlanPolicyArgs { threshold: self.router_threshold, max_skip: self.max_skip, min_skip: self.min_skip };
                let (_, routing) = model.load_routers(path, &policy).with_context(|| format!("loading {}", path.display()))?;
                Session::with_routers(&model.weights, options, routing)?
            }
            None => Session::new(&model.weights, options, LayerPlan::skipping(n, &self.skip_layers)?)?,
        })
    }

    /// After the first prefill: print the plan when asked.
    fn report(&self, session: &Session) {
        if !self.show_plan {
            return;
        }
        let plan = session.plan();
        for (l, p) in session.router_probs().iter().enumerate() {
            let p = p.map_or("    -".to_string(), |p| format!("{p:.3}"));
            eprintln!("layer {l:>3}: p = {p}  {}", if plan.runs(l) { "run" } else { "skip" });
        }
        eprintln!("plan: {} of {} layers run, skipped {:?}", plan.kept(), plan.len(), plan.skipped_layers());
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

/// Streams decoded text to stdout, holding back any tail that could start a stop string.
struct TextSink<'a> {
    decoder: StreamDecoder<'a>,
    stops: &'a [String],
    text: String,
    printed: usize,
    echo: bool,
    stopped: bool,
    /// The first error of `accept` (detokenising or writing), returned by `finish`.
    error: Option<anyhow::Error>,
}

impl<'a> TextSink<'a> {
    fn new(model: &'a LoadedModel, stops: &'a [String], echo: bool) -> Self {
        TextSink {
            decoder: StreamDecoder::new(&model.tokenizer),
            stops,
            text: String::new(),
            printed: 0,
            echo,
            stopped: false,
            error: None,
        }
    }

    /// The token callback: add a token; false once a stop string has appeared or on an error
    /// (kept for `finish`).
    fn accept(&mut self, id: u32) -> bool {
        match self.push(id) {
            Ok(go_on) => go_on,
            Err(e) => {
                self.error = Some(e);
                false
            }
        }
    }

    /// Add a token; false once a stop string has appeared.
    fn push(&mut self, id: u32) -> Result<bool> {
        if let Some(piece) = self.decoder.push(id)? {
            self.text.push_str(&piece);
        }
        self.emit(false)
    }

    fn emit(&mut self, finished: bool) -> Result<bool> {
        let mut end = self.text.len();
        for s in self.stops.iter().filter(|s| !s.is_empty()) {
            if let Some(at) = self.text.find(s.as_str()) {
                end = end.min(at);
                self.stopped = true;
            }
        }
        if !self.stopped && !finished {
            // Hold back a suffix that is a prefix of a stop string.
            for s in self.stops.iter().filter(|s| !s.is_empty()) {
                for k in (1..s.len()).rev() {
                    if s.is_char_boundary(k) && self.text.ends_with(&s[..k]) {
                        end = end.min(self.text.len() - k);
                        break;
                    }
                }
            }
        }
        if self.stopped {
            self.text.truncate(end);
        }
        if end > self.printed {
            if self.echo {
                let mut out = std::io::stdout().lock();
                out.write_all(&self.text.as_bytes()[self.printed..end])?;
                out.flush()?;
            }
            self.printed = end;
        }
        Ok(!self.stopped)
    }

    /// The whole text, or the first error that stopped generation.
    fn finish(&mut self) -> Result<String> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if !self.stopped {
            self.text.push_str(&self.decoder.finish()?);
            self.emit(true)?;
        }
        Ok(self.text.clone())
    }
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
        if t.decode_tokens > 0 { 1000.0 * t.decode_s / t.decode_tokens as f64 } else { 0.0 },
        g.stop
    );
}

fn write_logits(path: &PathBuf, logits: &[f32]) -> Result<()> {
    let bytes: &[u8] = bytemuck::cast_slice(logits);
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![logits.len()], bytes)?;
    safetensors::serialize_to_file([("logits", view)], None, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub fn run(gpu: &GpuOptions, args: RunArgs) -> Result<()> {
    args.plan.check()?;
    args.profiling.check()?;
    if let Some(path) = &args.logits_out {
        super::check_output("--logits-out", path)?;
    }
    let lora_setup = args.lora.setup(LoraMode::Merged)?;
    let (ctx, model) = load_model(gpu, &args.model, lora_setup.merged.as_ref())?;
    let lora = upload_lora(&model, &lora_setup)?;
    let mut prompt_ids = if let Some(ids) = &args.prompt_ids {
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
            let mut messages = Vec::new();
            if let Some(system) = &args.system {
                messages.push(ChatMessage { role: "system".into(), content: system.clone() });
            }
            messages.push(ChatMessage { role: "user".into(), content: text });
            model.chat_ids(&messages)?
        } else {
            model.text_ids(&text)?
        }
    };
    let ctx_len = super::context_len(&model.weights.config, args.model.ctx)?;
    if prompt_ids.len() >= ctx_len {
        if !args.truncate {
            bail!(
                "the prompt has {} tokens but the context holds {ctx_len} (room is needed for at least one generated token); raise --ctx or pass --truncate",
                prompt_ids.len()
            );
        }
        let keep = ctx_len.saturating_sub(args.sampling.max_tokens.min(ctx_len / 2)).max(1);
        let cut = prompt_ids.len() - keep;
        eprintln!("warning: prompt truncated from {} to its last {keep} tokens", prompt_ids.len());
        prompt_ids.drain(..cut);
    }
    let mut session = args.plan.session(&model, SessionOptions { ctx_len, candidates: args.sampling.candidates() })?;
    if let Some((g, scale)) = &lora {
        session.set_lora(Some(g.clone()), *scale)?;
    }
    session.prepare()?;
    let options = GenerateOptions {
        max_tokens: args.sampling.max_tokens,
        sampler: args.sampling.sampler(),
        end_ids: model.tokenizer.end_ids().to_vec(),
    };
    session.set_profiler(args.profiling.profiler(&ctx)?);
    let clock = session.profiler().map(|p| p.host_clock());
    let mut capture = super::profiling::Capture::start(&ctx, args.profiling.capture);
    let mut seen = 0usize;
    let mut sink = TextSink::new(&model, &args.sampling.stop, !args.json);
    let logits_out = args.logits_out.clone();
    let plan_args = args.plan.clone();
    let generation = generate_with(
        &mut session,
        &prompt_ids,
        &options,
        &mut |s: &Session| {
            plan_args.report(s);
            if let Some(path) = &logits_out {
                let logits = s.read_logits()?;
                write_logits(path, &logits).map_err(|e| firstrt::runtime::RuntimeError::Callback(e.context("--logits-out").into()))?;
            }
            Ok(())
        },
        &mut |id| {
            seen += 1;
            if seen == 2 {
                capture.stop(); // the prefill and the first decode step are in
            }
            let t = std::time::Instant::now();
            let go_on = sink.accept(id);
            if let Some(c) = &clock {
                c.span("detokenise", t);
            }
            go_on
        },
    )?;
    capture.stop();
    let text = sink.finish()?;
    if args.json {
        let out = serde_json::json!({
            "prompt_ids": generation.prompt_ids,
            "generated_ids": generation.generated_ids,
            "text": text,
            "stop_reason": generation.stop,
            "skipped_layers": session.plan().skipped_layers(),
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
    let new_session = |lora: &Option<(Arc<GpuLora>, f32)>| -> Result<Session> {
        let mut s = args.plan.session(&model, SessionOptions { ctx_len, candidates: args.sampling.candidates() })?;
        if let Some((g, scale)) = lora {
            s.set_lora(Some(g.clone()), *scale)?;
        }
        s.prepare()?;
        Ok(s)
    };
    let mut session = new_session(&lora)?;
    let mut messages: Vec<ChatMessage> = Vec::new();
    if let Some(system) = &args.system {
        messages.push(ChatMessage { role: "system".into(), content: system.clone() });
    }
    let options = GenerateOptions {
        max_tokens: args.sampling.max_tokens,
        sampler: args.sampling.sampler(),
        end_ids: model.tokenizer.end_ids().to_vec(),
    };
    // Token ids the session's cache holds, so each turn prefills only what is new.
    let mut cached: Vec<u32> = Vec::new();
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
                    // The cache holds what the previous adapter computed: read the conversation
                    // again under the new one at the next turn.
                    session = new_session(&lora)?;
                    cached.clear();
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
        messages.push(ChatMessage { role: "user".into(), content: line.trim_end_matches(['\n', '\r']).to_string() });
        let ids = model.chat_ids(&messages)?;
        // Reuse the cache when the new rendering extends what it holds; else start over.
        let new_ids = if ids.starts_with(&cached) && session.position() == cached.len() {
            ids[cached.len()..].to_vec()
        } else {
            session = new_session(&lora)?;
            cached.clear();
            ids.clone()
        };
        if session.position() + new_ids.len() >= ctx_len {
            eprintln!("(the conversation no longer fits the context of {ctx_len} tokens; starting over)");
            messages.drain(..messages.len() - 1);
            session = new_session(&lora)?;
            cached.clear();
            continue;
        }
        let mut sink = TextSink::new(&model, &args.sampling.stop, true);
        let first_turn = session.position() == 0;
        let g = generate_with(
            &mut session,
            &new_ids,
            &options,
            &mut |s: &Session| {
                if first_turn {
                    args.plan.report(s);
                }
                Ok(())
            },
            &mut |id| sink.accept(id),
        )?;
        let reply = sink.finish()?;
        println!();
        print_timings(&g);
        // The cache now holds the new prompt ids and the generated tokens that were fed back
        // (all of them when an end token stopped generation, all but the last otherwise); the
        // next turn's rendering re-feeds the rest as the template writes it.
        cached.extend_from_slice(&new_ids);
        let fed = session.position().saturating_sub(cached.len()).min(g.generated_ids.len());
        cached.extend_from_slice(&g.generated_ids[..fed]);
        messages.push(ChatMessage { role: "assistant".into(), content: reply });
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
