//! One example under one configuration: greedy generation (or teacher-forced log-likelihood)
//! in a fresh session, with its plan, timings and scores.
//!
//! A configuration is a layer plan (the full model, a static skip list, or routers at a
//! threshold) and, optionally, an unmerged LoRA adapter. Every example gets a new
//! [`Session`], so routers decide a new plan for each prompt, as they would for a new request.

use std::sync::Arc;

use crate::generate::{GenerateError, GenerateOptions, SamplerConfig, TextDecoder, TokenStream};
use crate::model::chat::ChatMessage;
use crate::runtime::plan::PlanPolicy;
use crate::runtime::routed::Routing;
use crate::runtime::{GpuLora, LoadedModel, PlanChoice, RuntimeError, Session, SessionOptions};

use super::data::TaskExample;
use super::rouge::{exact_match, rouge};

/// A configuration to evaluate: a plan and an optional unmerged adapter.
#[derive(Clone)]
pub struct EvalConfig {
    /// Short name for tables and the plot, e.g. `full`, `static 6`, `routers 0.5`, `+ lora`.
    pub label: String,
    /// The layer plan: static (the full model is the plan skipping nothing), or routers.
    pub plan: PlanChoice,
    /// An unmerged LoRA adapter and its user scale S, applied to every layer that runs.
    pub lora: Option<(Arc<GpuLora>, f32)>,
}

impl EvalConfig {
    /// The same routers under another threshold: the routers on the GPU stay shared, only the
    /// policy changes.
    pub fn with_threshold(routing: &Routing, threshold: f32) -> Routing {
        Routing { routers: routing.routers.clone(), policy: PlanPolicy { threshold, ..routing.policy.clone() } }
    }

    /// A new session for one example, with the adapter attached and its decode step prepared.
    /// Errors: the session's (context too large for the device, a bad plan).
    pub fn session(&self, model: &LoadedModel, ctx_len: usize) -> Result<Session, RuntimeError> {
        let options = SessionOptions { ctx_len, candidates: SamplerConfig::greedy().candidates() };
        let mut session = self.plan.session(&model.weights, options)?;
        if let Some((lora, scale)) = &self.lora {
            session.set_lora(Some(lora.clone()), *scale)?;
        }
        session.prepare()?;
        Ok(session)
    }
}

/// What is measured on each example.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScoreMode {
    /// Greedy generation of at most `max_tokens` tokens, scored with ROUGE (with or without
    /// the Porter stemmer) and exact match against the references.
    Generate {
        /// The generation budget per example.
        max_tokens: usize,
        /// Stem tokens longer than 3 characters before ROUGE (rouge-score's `use_stemmer`).
        stemmer: bool,
    },
    /// Teacher forcing: the mean negative log-likelihood (nats per token) of each reference's
    /// tokens after the prompt, averaged over the references; nothing is generated.
    LogLik,
}

/// The metrics of [`ScoreMode::Generate`], in table order: the four ROUGE F-measures
/// (maximum over the references) and exact match.
pub const GENERATE_METRICS: [&str; 5] = ["rouge1", "rouge2", "rougeL", "rougeLsum", "exact_match"];

/// The metric of [`ScoreMode::LogLik`].
pub const LOGLIK_METRICS: [&str; 1] = ["nll"];

/// The outcome of one example under one configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ExampleResult {
    /// The example's id.
    pub id: String,
    /// The generated text (empty for log-likelihood).
    pub text: String,
    /// Prompt tokens (after the chat template).
    pub prompt_tokens: usize,
    /// Tokens generated (log-likelihood: reference tokens scored).
    pub tokens: usize,
    /// Layers the plan skipped for this prompt.
    pub skipped_layers: Vec<usize>,
    /// Wall time of the prefill, in seconds (pipelines compiled beforehand).
    pub prefill_s: f64,
    /// Wall time of the decode steps, in seconds.
    pub decode_s: f64,
    /// Decode steps run (a generation of n tokens runs n - 1 or n of them).
    pub decode_steps: usize,
    /// One value per metric of the mode ([`GENERATE_METRICS`] or [`LOGLIK_METRICS`]).
    pub scores: Vec<f64>,
}

/// The prompt of an example as the model reads it: the chat template around the user message
/// with the generation prompt, exactly as `firstrt run --chat` builds it.
/// Errors: the template's or tokenizer's.
pub fn prompt_ids(model: &LoadedModel, example: &TaskExample) -> Result<Vec<u32>, RuntimeError> {
    model.chat_ids(&[ChatMessage::user(example.prompt.clone())])
}

/// A calibration sequence for block influence (`firstrt static-plan`, `eval --static-skip`):
/// the chat-templated prompt with the generation prompt, followed by the tokens of the first
/// reference, cut to `ctx_len` tokens. Returns the ids and whether they were cut.
/// Errors: the template's or tokenizer's.
pub fn calibration_ids(model: &LoadedModel, example: &TaskExample, ctx_len: usize) -> Result<(Vec<u32>, bool), RuntimeError> {
    let mut ids = prompt_ids(model, example)?;
    ids.extend(model.text_ids(&example.references[0])?);
    let cut = ids.len() > ctx_len;
    ids.truncate(ctx_len);
    Ok((ids, cut))
}

/// Decode steps of [`decode_probe`] as `eval` runs it.
pub const DECODE_PROBE_STEPS: usize = 32;

/// Decode speed of `config` where its examples give none (every generation ended at its first
/// token, as a plan that breaks the model can make it): the prompt of `example`, then
/// `steps` greedy decode steps with no end token. Returns the decode wall time in seconds and
/// the steps run. Errors: as [`evaluate_example`].
pub fn decode_probe(
    model: &LoadedModel,
    config: &EvalConfig,
    example: &TaskExample,
    steps: usize,
    ctx_len: usize,
) -> Result<(f64, usize), GenerateError> {
    let ids = prompt_ids(model, example)?;
    if ids.len() + steps >= ctx_len {
        return Err(GenerateError::PromptTooLong { tokens: ids.len() + steps, ctx_len });
    }
    let mut session = config.session(model, ctx_len)?;
    let options = GenerateOptions { max_tokens: steps + 1, sampler: SamplerConfig::greedy(), end_ids: vec![] };
    let g = crate::generate::generate(&mut session, &ids, &options)?;
    Ok((g.timings.decode_s, g.timings.decode_tokens))
}

/// `-log softmax(logits)[id]`, in nats, computed in f64 (log-sum-exp with the maximum
/// subtracted).
pub fn negative_log_likelihood(logits: &[f32], id: u32) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    max + sum.ln() - logits.get(id as usize).map_or(f64::NAN, |&v| v as f64)
}

/// Evaluate one example under `config` in a new session of `ctx_len` positions.
///
/// Errors: a prompt (plus the generation budget, or the longest reference) that does not fit
/// `ctx_len`, and the session's errors.
pub fn evaluate_example(
    model: &LoadedModel,
    config: &EvalConfig,
    example: &TaskExample,
    mode: ScoreMode,
    ctx_len: usize,
) -> Result<ExampleResult, GenerateError> {
    let ids = prompt_ids(model, example)?;
    let mut session = config.session(model, ctx_len)?;
    match mode {
        ScoreMode::Generate { max_tokens, stemmer } => {
            if ids.len() >= ctx_len {
                return Err(GenerateError::PromptTooLong { tokens: ids.len(), ctx_len });
            }
            let options = GenerateOptions { max_tokens, sampler: SamplerConfig::greedy(), end_ids: model.tokenizer.end_ids().to_vec() };
            let text = TextDecoder::new(&model.tokenizer, &[] as &[String]);
            let mut stream = TokenStream::start(&mut session, &ids, &options, Some(text))?;
            for event in &mut stream {
                event?;
            }
            let g = stream.into_generation();
            let r = rouge(&g.text, &example.references, stemmer);
            let scores = vec![r.rouge1, r.rouge2, r.rouge_l, r.rouge_lsum, exact_match(&g.text, &example.references)];
            Ok(ExampleResult {
                id: example.id.clone(),
                prompt_tokens: ids.len(),
                tokens: g.generated_ids.len(),
                skipped_layers: session.plan().skipped_layers(),
                prefill_s: g.timings.prefill_s,
                decode_s: g.timings.decode_s,
                decode_steps: g.timings.decode_tokens,
                scores,
                text: g.text,
            })
        }
        ScoreMode::LogLik => {
            let refs = example.references.iter().map(|r| model.text_ids(r)).collect::<Result<Vec<_>, _>>()?;
            let longest = refs.iter().map(Vec::len).max().unwrap_or(0);
            if ids.len() + longest > ctx_len {
                return Err(GenerateError::PromptTooLong { tokens: ids.len() + longest, ctx_len });
            }
            session.prepare_prefill(ids.len())?;
            let start = std::time::Instant::now();
            session.prefill(&ids)?;
            let prefill_s = start.elapsed().as_secs_f64();
            session.prepare()?;
            let first = session.read_logits()?;
            let (mut decode_s, mut steps, mut tokens, mut nll_sum) = (0.0, 0usize, 0usize, 0.0);
            let mut scored_refs = 0usize;
            for reference in &refs {
                if reference.is_empty() {
                    continue;
                }
                session.rewind(ids.len())?;
                let mut nll = negative_log_likelihood(&first, reference[0]);
                let start = std::time::Instant::now();
                for pair in reference.windows(2) {
                    session.decode(pair[0])?;
                    nll += negative_log_likelihood(&session.read_logits()?, pair[1]);
                    steps += 1;
                }
                decode_s += start.elapsed().as_secs_f64();
                tokens += reference.len();
                nll_sum += nll / reference.len() as f64;
                scored_refs += 1;
            }
            let nll = if scored_refs == 0 { f64::NAN } else { nll_sum / scored_refs as f64 };
            Ok(ExampleResult {
                id: example.id.clone(),
                text: String::new(),
                prompt_tokens: ids.len(),
                tokens,
                skipped_layers: session.plan().skipped_layers(),
                prefill_s,
                decode_s,
                decode_steps: steps,
                scores: vec![nll],
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_log_likelihood_is_log_softmax() {
        let logits = [1.0f32, 2.0, 3.0];
        let z: f64 = [1.0f64, 2.0, 3.0].iter().map(|v| v.exp()).sum();
        for (i, v) in [1.0f64, 2.0, 3.0].iter().enumerate() {
            assert!((negative_log_likelihood(&logits, i as u32) - (z.ln() - v)).abs() < 1e-12);
        }
        // large logits do not overflow
        let big = [1000.0f32, 1000.0];
        assert!((negative_log_likelihood(&big, 0) - 2f64.ln()).abs() < 1e-9);
        assert!(negative_log_likelihood(&big, 5).is_nan());
    }
}
