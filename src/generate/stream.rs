//! The token loop as a stream of events: prefill, then sample and decode one token at a time
//! until an end token, the token budget, a stop string, the context's end, or the caller says
//! stop. Like mlx-lm's `generate_step` generator: the caller pulls events (an [`Iterator`]), so
//! a command line prints them and a server can send each as it comes (SSE) or stop by dropping
//! the stream.

use std::borrow::BorrowMut;
use std::collections::VecDeque;
use std::time::Instant;

use crate::runtime::{Session, StepOutput};

use super::GenerateError;
use super::sampler::{Sampler, SamplerConfig};
use super::stop::TextDecoder;

/// What to generate after a prompt.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens to generate (end tokens not counted; 0: none).
    pub max_tokens: usize,
    /// How each token is picked among the session's candidates.
    pub sampler: SamplerConfig,
    /// Ids that end generation (EOS, `<|im_end|>`, ...). The end token is not part of the output.
    pub end_ids: Vec<u32>,
}

/// Why generation finished (serialised in snake case, as `firstrt run --json` prints it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced one of [`GenerateOptions::end_ids`].
    EndToken,
    /// [`GenerateOptions::max_tokens`] tokens were generated.
    MaxTokens,
    /// A stop string appeared in the text (see [`TextDecoder`]).
    StopString,
    /// The session's KV cache is full: no room for another token.
    ContextFull,
    /// The caller asked to stop ([`TokenStream::stop`]).
    Caller,
}

/// Where the time went, in seconds (wall clock on the host, GPU waits included).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Timings {
    /// Prompt tokens prefilled.
    pub prefill_tokens: usize,
    /// Prefill time (s).
    pub prefill_s: f64,
    /// Decode steps run (the first generated token comes from prefill).
    pub decode_tokens: usize,
    /// Time from the first request for a token to the end (s): sampling, detokenising and the
    /// decode steps.
    pub decode_s: f64,
    /// Time to first token (s): from the start of prefill until the first token is known.
    pub ttft_s: f64,
}

impl Timings {
    /// Prefill speed (tokens/s; 0 when nothing was timed).
    pub fn prefill_tok_s(&self) -> f64 {
        if self.prefill_s > 0.0 { self.prefill_tokens as f64 / self.prefill_s } else { 0.0 }
    }

    /// Decode speed (tokens/s; 0 when no decode step ran).
    pub fn decode_tok_s(&self) -> f64 {
        if self.decode_s > 0.0 { self.decode_tokens as f64 / self.decode_s } else { 0.0 }
    }

    /// Time per decode step (ms; 0 when no decode step ran).
    pub fn decode_ms_per_token(&self) -> f64 {
        if self.decode_tokens > 0 { 1000.0 * self.decode_s / self.decode_tokens as f64 } else { 0.0 }
    }
}

/// One generation, once it has finished.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The ids prefilled.
    pub prompt_ids: Vec<u32>,
    /// The generated ids, end token excluded (with a stop string: up to the token that
    /// completed it).
    pub generated_ids: Vec<u32>,
    /// The generated text, cut before a stop string (empty when the stream had no
    /// [`TextDecoder`]).
    pub text: String,
    /// Why it finished.
    pub finish: FinishReason,
    /// Where the time went.
    pub timings: Timings,
}

/// What a [`TokenStream`] yields, in order: for each generated token a `Token`, then the
/// `Text` it made final, if any; after the last token possibly a `Text` with what was held
/// back; `Finished` last.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A generated token id (end tokens are not reported).
    Token(u32),
    /// Text that is final: whole UTF-8 characters, known not to be part of a stop string
    /// (only with a [`TextDecoder`]).
    Text(String),
    /// The last event.
    Finished {
        /// Why generation finished.
        reason: FinishReason,
        /// Prefill and decode times.
        timings: Timings,
    },
}

/// The token loop over a session, pulled one [`Event`] at a time.
///
/// [`TokenStream::start`] prefills the prompt; each call of `next` then samples one token and
/// reports it; the decode step that feeds it back runs at the following call, so a caller that
/// prints tokens shows each one before the next step starts. Between `start` and the first
/// `next`, [`TokenStream::session`] shows the session after prefill (its logits are those of
/// the last prompt position).
///
/// `S` is how the stream holds its session: borrowed (`&mut Session`, the default, as `run`
/// and `chat` do) or owned (`Session`, as the server's scheduler keeps many streams alive
/// side by side). `'a` is the borrow of the tokenizer that the [`TextDecoder`] reads.
pub struct TokenStream<'a, S: BorrowMut<Session> = &'a mut Session> {
    session: S,
    sampler: Sampler,
    max_tokens: usize,
    end_ids: Vec<u32>,
    text: Option<TextDecoder<'a>>,
    prompt_ids: Vec<u32>,
    /// Candidates for the next token.
    out: StepOutput,
    /// A token sampled and reported but not yet fed back.
    to_decode: Option<u32>,
    generated: Vec<u32>,
    timings: Timings,
    start: Instant,
    decode_start: Option<Instant>,
    events: VecDeque<Event>,
    finish: Option<FinishReason>,
}

impl<'a, S: BorrowMut<Session>> TokenStream<'a, S> {
    /// Prefill `prompt_ids` after what the session holds and get ready to generate. With
    /// `text`, generated tokens are also detokenised and checked for stop strings. The steps
    /// are prepared first ([`Session::prepare_prefill`]; for a routed session, the decode step
    /// once the prefill has fixed its plan), so that the reported prefill and decode times
    /// leave out kernel choice and pipeline compilation.
    ///
    /// Errors: the session's ([`RuntimeError`](crate::runtime::RuntimeError): an empty prompt,
    /// a token outside the vocabulary, a prompt beyond the context, a GPU failure).
    pub fn start(
        mut session: S,
        prompt_ids: &[u32],
        options: &GenerateOptions,
        text: Option<TextDecoder<'a>>,
    ) -> Result<TokenStream<'a, S>, GenerateError> {
        let s = session.borrow_mut();
        s.prepare_prefill(prompt_ids.len())?;
        let start = Instant::now();
        let out = s.prefill(prompt_ids)?;
        Self::prefilled(session, prompt_ids, out, start, options, text)
    }

    /// A stream over a session whose prefill of `prompt_ids` ran elsewhere (the server batches
    /// the prefills of several new sequences: `DecodeBatch::prefill`), started at `start` and
    /// giving the candidates `out`: prepares the decode step and continues as
    /// [`TokenStream::start`] would after its prefill. Errors: preparing the decode step.
    pub fn prefilled(
        mut session: S,
        prompt_ids: &[u32],
        out: StepOutput,
        start: Instant,
        options: &GenerateOptions,
        text: Option<TextDecoder<'a>>,
    ) -> Result<TokenStream<'a, S>, GenerateError> {
        let timings = Timings { prefill_tokens: prompt_ids.len(), prefill_s: start.elapsed().as_secs_f64(), ..Timings::default() };
        session.borrow_mut().prepare()?;
        Ok(TokenStream {
            session,
            sampler: Sampler::new(options.sampler),
            max_tokens: options.max_tokens,
            end_ids: options.end_ids.clone(),
            text,
            prompt_ids: prompt_ids.to_vec(),
            out,
            to_decode: None,
            generated: Vec::new(),
            timings,
            start,
            decode_start: None,
            events: VecDeque::new(),
            finish: None,
        })
    }

    /// The session (after prefill, and after each step).
    pub fn session(&self) -> &Session {
        self.session.borrow()
    }

    /// True when events of the last step are waiting: the next `next` returns one of them
    /// without running a step. A caller that runs one step at a time (the server's scheduler)
    /// drains them before moving on.
    pub fn has_queued(&self) -> bool {
        !self.events.is_empty()
    }

    /// Tokens generated so far (end token excluded).
    pub fn generated_len(&self) -> usize {
        self.generated.len()
    }

    /// Stop: the next events are the held-back text, if any, and `Finished` with
    /// [`FinishReason::Caller`]. Does nothing once finished.
    ///
    /// Errors: detokenising the held-back text (a tokenizer error).
    pub fn stop(&mut self) -> Result<(), GenerateError> {
        if self.finish.is_none() {
            self.finish_with(FinishReason::Caller)?;
        }
        Ok(())
    }

    /// The record of the generation: ids, text and timings. A stream that has not finished
    /// counts as stopped by the caller; its text is what was detokenised so far (held-back text
    /// included, bytes of an incomplete character left out).
    pub fn into_generation(self) -> Generation {
        let text = self.text.as_ref().map_or_else(String::new, |t| t.text().to_string());
        Generation {
            prompt_ids: self.prompt_ids,
            generated_ids: self.generated,
            text,
            finish: self.finish.unwrap_or(FinishReason::Caller),
            timings: self.timings,
        }
    }

    /// True when the next `next` would run a decode step: a token waits to be fed back, no
    /// event waits, not finished ([`TokenStream::take_decode`] would return it).
    pub fn wants_decode(&self) -> bool {
        self.finish.is_none() && self.events.is_empty() && self.to_decode.is_some()
    }

    /// The token that the next step would feed back, taken, when the next `next` would run a
    /// decode step (no event waiting, not finished); None otherwise. A caller that runs the
    /// decode step itself (the server's scheduler batches several streams into one step with
    /// [`DecodeBatch`](crate::runtime::batch::DecodeBatch)) takes the token here, runs the step
    /// on [`TokenStream::session_mut`], and hands the candidates to [`TokenStream::feed`].
    pub fn take_decode(&mut self) -> Option<u32> {
        if !self.wants_decode() {
            return None;
        }
        let token = self.to_decode.take()?;
        self.decode_start.get_or_insert_with(Instant::now);
        Some(token)
    }

    /// The candidates of the decode step that fed back the token from
    /// [`TokenStream::take_decode`]: sample the next token and queue its events (`next` returns
    /// them). Errors: detokenising; the stream then ends, as after an error in `next`.
    pub fn feed(&mut self, out: StepOutput) -> Result<(), GenerateError> {
        self.out = out;
        self.timings.decode_tokens += 1;
        self.sample_next().inspect_err(|_| {
            self.finish = Some(FinishReason::Caller);
            self.events.clear();
        })
    }

    /// The session, to run a step on it (see [`TokenStream::take_decode`]).
    pub fn session_mut(&mut self) -> &mut Session {
        self.session.borrow_mut()
    }

    /// One step: feed back the last token, then sample and report the next, or finish.
    fn step(&mut self) -> Result<(), GenerateError> {
        self.decode_start.get_or_insert_with(Instant::now);
        if let Some(token) = self.to_decode.take() {
            self.out = self.session.borrow_mut().decode(token)?;
            self.timings.decode_tokens += 1;
        }
        self.sample_next()
    }

    /// Sample the next token from `self.out` and queue its events, or finish.
    fn sample_next(&mut self) -> Result<(), GenerateError> {
        if self.generated.len() >= self.max_tokens {
            return self.finish_with(FinishReason::MaxTokens);
        }
        let session: &Session = self.session.borrow();
        let clock = session.profiler().map(|p| p.host_clock());
        let t_sample = Instant::now();
        let token = self.sampler.pick(&self.out.candidates);
        if let Some(clock) = &clock {
            clock.span("sample", t_sample);
        }
        if self.generated.is_empty() {
            self.timings.ttft_s = self.start.elapsed().as_secs_f64();
        }
        if self.end_ids.contains(&token) {
            return self.finish_with(FinishReason::EndToken);
        }
        self.generated.push(token);
        self.events.push_back(Event::Token(token));
        if let Some(text) = &mut self.text {
            let t_text = Instant::now();
            let piece = text.push(token)?;
            if let Some(clock) = &clock {
                clock.span("detokenise", t_text);
            }
            if !piece.is_empty() {
                self.events.push_back(Event::Text(piece));
            }
            if text.stopped() {
                return self.finish_with(FinishReason::StopString);
            }
        }
        if self.generated.len() >= self.max_tokens {
            return self.finish_with(FinishReason::MaxTokens);
        }
        let session: &Session = self.session.borrow();
        if session.position() >= session.ctx_len() {
            return self.finish_with(FinishReason::ContextFull);
        }
        self.to_decode = Some(token);
        Ok(())
    }

    /// Record the reason, release the held-back text and queue `Finished`.
    fn finish_with(&mut self, reason: FinishReason) -> Result<(), GenerateError> {
        self.finish = Some(reason);
        self.timings.decode_s = self.decode_start.map_or(0.0, |t| t.elapsed().as_secs_f64());
        if let Some(text) = &mut self.text {
            let rest = text.finish()?;
            if !rest.is_empty() {
                self.events.push_back(Event::Text(rest));
            }
        }
        self.events.push_back(Event::Finished { reason, timings: self.timings.clone() });
        Ok(())
    }
}

impl<S: BorrowMut<Session>> Iterator for TokenStream<'_, S> {
    type Item = Result<Event, GenerateError>;

    /// The next event; `None` after `Finished` or after an error.
    fn next(&mut self) -> Option<Self::Item> {
        while self.events.is_empty() {
            if self.finish.is_some() {
                return None;
            }
            if let Err(e) = self.step() {
                // An error ends the stream.
                self.finish = Some(FinishReason::Caller);
                self.events.clear();
                return Some(Err(e));
            }
        }
        self.events.pop_front().map(Ok)
    }
}

/// Generate after `prompt_ids` to the end, without text: [`TokenStream`] run dry.
///
/// Errors: those of [`TokenStream::start`] and of the decode steps.
pub fn generate(session: &mut Session, prompt_ids: &[u32], options: &GenerateOptions) -> Result<Generation, GenerateError> {
    let mut stream = TokenStream::start(session, prompt_ids, options, None)?;
    for event in &mut stream {
        event?;
    }
    Ok(stream.into_generation())
}
