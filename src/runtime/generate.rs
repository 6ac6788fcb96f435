//! The token loop: prefill, then sample and decode one token at a time until an end token, the
//! token budget, the context's end, or the caller says stop.

use std::time::Instant;

use crate::kernels::sample::{Sampler, SamplerConfig};

use super::{RuntimeError, Session};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    /// Ids that end generation (EOS, `<|im_end|>`, ...). The end token is not part of the output.
    pub end_ids: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    EndToken,
    MaxTokens,
    ContextFull,
    /// The callback asked to stop (a stop string, or the user).
    Caller,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    pub prefill_tokens: usize,
    pub prefill_s: f64,
    /// Decode steps run (the first generated token comes from prefill).
    pub decode_tokens: usize,
    pub decode_s: f64,
    /// Time to first token: from the call until the first token is known.
    pub ttft_s: f64,
}

impl Timings {
    pub fn prefill_tok_s(&self) -> f64 {
        if self.prefill_s > 0.0 { self.prefill_tokens as f64 / self.prefill_s } else { 0.0 }
    }

    pub fn decode_tok_s(&self) -> f64 {
        if self.decode_s > 0.0 { self.decode_tokens as f64 / self.decode_s } else { 0.0 }
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    pub stop: StopReason,
    pub timings: Timings,
}

/// Generate after `prompt_ids`. `on_token` sees each generated token (end tokens excluded) and
/// returns false to stop.
pub fn generate(
    session: &mut Session,
    prompt_ids: &[u32],
    options: &GenerateOptions,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<Generation, RuntimeError> {
    generate_with(session, prompt_ids, options, &mut |_| Ok(()), on_token)
}

/// [`generate`], calling `after_prefill` once the prompt is in the cache (the session's logits
/// are then those of the last prompt position).
pub fn generate_with(
    session: &mut Session,
    prompt_ids: &[u32],
    options: &GenerateOptions,
    after_prefill: &mut dyn FnMut(&Session) -> Result<(), RuntimeError>,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<Generation, RuntimeError> {
    let mut sampler = Sampler::new(options.sampler.clone());
    let mut timings = Timings { prefill_tokens: prompt_ids.len(), ..Timings::default() };
    let start = Instant::now();
    let mut out = session.prefill(prompt_ids)?;
    timings.prefill_s = start.elapsed().as_secs_f64();
    after_prefill(session)?;
    let mut generated = Vec::new();
    let decode_start = Instant::now();
    let stop = loop {
        if generated.len() >= options.max_tokens {
            break StopReason::MaxTokens;
        }
        let clock = session.profiler().map(|p| p.host_clock());
        let t_sample = clock.as_ref().map(|_| Instant::now());
        let token = sampler.pick(&out.candidates);
        if let (Some(clock), Some(t)) = (&clock, t_sample) {
            clock.span("sample", t);
        }
        if generated.is_empty() {
            timings.ttft_s = start.elapsed().as_secs_f64();
        }
        if options.end_ids.contains(&token) {
            break StopReason::EndToken;
        }
        generated.push(token);
        if !on_token(token) {
            break StopReason::Caller;
        }
        if generated.len() >= options.max_tokens {
            break StopReason::MaxTokens;
        }
        if session.position() >= session.ctx_len() {
            break StopReason::ContextFull;
        }
        out = session.decode(token)?;
        timings.decode_tokens += 1;
    };
    timings.decode_s = decode_start.elapsed().as_secs_f64();
    Ok(Generation { prompt_ids: prompt_ids.to_vec(), generated_ids: generated, stop, timings })
}
