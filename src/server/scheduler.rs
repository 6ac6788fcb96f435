//! The scheduler: one thread that owns every running sequence and interleaves their steps.
//!
//! Requests arrive as [`Job`]s (token ids, sampling, plan, adapter) over a channel. Up to
//! `max_concurrent` run at once, each a [`Session`] of its own over the shared weights (its own
//! KV cache, sized for its prompt and `max_tokens`); the rest wait in arrival order. Each round
//! first starts waiting jobs while there is room (their prefill; the routers of a routed plan
//! decide the layers there), then gives every running sequence one decode step, in the order
//! they started: a fair round robin, so a long generation never starves a short one. What a
//! step makes is sent back as [`JobEvent`]s over the job's own channel.
//!
//! A job whose receiver is gone (the client disconnected, the handler was dropped) is dropped
//! before its next step: its session, and with it its KV cache, is freed. Capacity is counted
//! by [`Slot`]s, taken by the HTTP side before a job is built (a full server answers 429 at
//! once) and given back when the job ends, however it ends.
//!
//! Running sequences that wait for a decode step and share a layer plan (no adapter, plan
//! fixed) take it together as one batched step ([`DecodeBatch`]: the projections run over all
//! their rows at once, so each weight is read once per round instead of once per sequence);
//! the others step alone. The first token of a sequence comes from its prefill.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio::sync::mpsc::UnboundedSender;

use crate::generate::{Event, FinishReason, GenerateOptions, TextDecoder, Timings, TokenStream};
use crate::model::tokenizer::ModelTokenizer;
use crate::runtime::batch::DecodeBatch;
use crate::runtime::{GpuLora, GpuWeights, LoadedModel, PlanChoice, Session, SessionOptions};

use super::api::ApiError;

/// A request ready to run.
pub struct Job {
    /// The prompt's ids (checked against the vocabulary and the context).
    pub prompt_ids: Vec<u32>,
    /// Token budget, sampler and end ids.
    pub options: GenerateOptions,
    /// Stop strings.
    pub stop: Vec<String>,
    /// The layers it runs: a static plan, or routers deciding in its prefill.
    pub plan: PlanChoice,
    /// An unmerged LoRA adapter and its user scale.
    pub lora: Option<(Arc<GpuLora>, f32)>,
    /// KV-cache rows of its session: prompt length + `max_tokens`.
    pub ctx_len: usize,
    /// Where its events go.
    pub events: UnboundedSender<JobEvent>,
    /// Its share of the server's capacity, given back when the job is dropped.
    pub slot: Slot,
}

/// What the scheduler tells a request's handler, in order: `Started` (or `Failed`), then
/// `Delta`s, then `Finished` (or `Failed`).
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    /// The prefill ran and the plan is fixed.
    Started {
        /// Layers (0-based) that this sequence skips.
        skipped_layers: Vec<usize>,
        /// Each layer's router probability (None: no router, or a static plan).
        router_probs: Vec<Option<f32>>,
    },
    /// What one decode step made: its token id (none when it ended the sequence) and the
    /// text that became final (possibly empty: a stop string may still be forming).
    Delta {
        /// Generated ids.
        ids: Vec<u32>,
        /// Final text.
        text: String,
    },
    /// Generation ended.
    Finished {
        /// Why.
        reason: FinishReason,
        /// Tokens generated (end token excluded).
        completion_tokens: usize,
        /// Prefill and decode times.
        timings: Timings,
    },
    /// The job could not run or stopped on an error.
    Failed(ApiError),
}

/// One unit of the server's capacity (running or waiting jobs), given back on drop.
#[derive(Debug)]
pub struct Slot {
    in_flight: Arc<AtomicUsize>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

enum Message {
    Job(Box<Job>),
    /// Refuse what waits and what comes; let running jobs finish.
    Drain,
    /// Drop every job now.
    CancelAll,
}

/// Counts the HTTP side reads (`/health`).
#[derive(Debug, Default)]
struct Counts {
    running: AtomicUsize,
    waiting: AtomicUsize,
    /// Batched decode steps run, and the sequence steps they held.
    batched_steps: AtomicUsize,
    batched_rows: AtomicUsize,
}

/// The handle the HTTP side holds: submit jobs, take capacity, drain and stop.
pub struct Scheduler {
    tx: mpsc::Sender<Message>,
    in_flight: Arc<AtomicUsize>,
    capacity: usize,
    counts: Arc<Counts>,
    draining: AtomicBool,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Scheduler {
    /// Start the scheduler thread over `model` (its weights for the sessions, its tokenizer
    /// for the text): `max_concurrent` sequences run at once (≥ 1), `queue` more may wait; with
    /// `batch`, the decode steps of running sequences that share a plan run as one
    /// ([`DecodeBatch`]), else each sequence steps alone.
    pub fn start(model: Arc<LoadedModel>, max_concurrent: usize, queue: usize, batch: bool) -> Scheduler {
        let (tx, rx) = mpsc::channel();
        let counts = Arc::new(Counts::default());
        let thread_counts = counts.clone();
        let max_concurrent = max_concurrent.max(1);
        let thread = std::thread::Builder::new()
            .name("firstrt-scheduler".into())
            .spawn(move || {
                let batch_capacity = if batch { max_concurrent } else { 0 };
                run(&model.weights, &model.tokenizer, &rx, max_concurrent, batch_capacity, &thread_counts)
            })
            .expect("spawning the scheduler thread");
        Scheduler {
            tx,
            in_flight: Arc::new(AtomicUsize::new(0)),
            capacity: max_concurrent + queue,
            counts,
            draining: AtomicBool::new(false),
            thread: std::sync::Mutex::new(Some(thread)),
        }
    }

    /// Take one unit of capacity. Errors: 429 when `max_concurrent + queue` jobs are already
    /// running or waiting; 503 while draining.
    pub fn reserve(&self) -> Result<Slot, ApiError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable("the server is shutting down"));
        }
        let before = self.in_flight.fetch_add(1, Ordering::SeqCst);
        let slot = Slot { in_flight: self.in_flight.clone() };
        if before >= self.capacity {
            return Err(ApiError::busy(format!(
                "the server is busy: {} requests are running or waiting (--max-concurrent plus --queue); retry later",
                self.capacity
            )));
        }
        Ok(slot)
    }

    /// Hand a job to the scheduler; its events follow on `job.events`. Errors: 503 when the
    /// scheduler has stopped.
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        self.tx.send(Message::Job(Box::new(job))).map_err(|_| ApiError::unavailable("the scheduler has stopped"))
    }

    /// Stop taking work: waiting and new jobs get a 503; running ones finish.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        let _ = self.tx.send(Message::Drain);
    }

    /// Drop every job now (their clients see the response end).
    pub fn cancel_all(&self) {
        self.draining.store(true, Ordering::SeqCst);
        let _ = self.tx.send(Message::CancelAll);
    }

    /// True once [`Scheduler::drain`] or [`Scheduler::cancel_all`] was called.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// (running, waiting) jobs now.
    pub fn counts(&self) -> (usize, usize) {
        (self.counts.running.load(Ordering::SeqCst), self.counts.waiting.load(Ordering::SeqCst))
    }

    /// Batched decode steps run so far, and the sequence steps they held (their sum of batch
    /// sizes).
    pub fn batched(&self) -> (usize, usize) {
        (self.counts.batched_steps.load(Ordering::SeqCst), self.counts.batched_rows.load(Ordering::SeqCst))
    }

    /// Requests holding capacity now (running, waiting, or being prepared by the HTTP side).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Wait for the thread to end (after a drain, once the running jobs have finished).
    pub fn join(&self) {
        let handle = self.thread.lock().map(|mut t| t.take()).unwrap_or(None);
        if let Some(handle) = handle
            && handle.join().is_err()
        {
            log::error!("the scheduler thread panicked");
        }
    }
}

/// A running sequence: its token stream (which owns the session) and where its events go.
struct Running<'t> {
    stream: TokenStream<'t, Session>,
    events: UnboundedSender<JobEvent>,
    _slot: Slot,
}

/// The scheduler thread: see the module docs.
fn run(
    weights: &Arc<GpuWeights>,
    tokenizer: &ModelTokenizer,
    rx: &mpsc::Receiver<Message>,
    max_concurrent: usize,
    batch_capacity: usize,
    counts: &Counts,
) {
    let mut waiting: VecDeque<Box<Job>> = VecDeque::new();
    let mut running: Vec<Running<'_>> = Vec::new();
    let mut draining = false;
    let mut batch = match batch_capacity {
        0 | 1 => None,
        n => DecodeBatch::new(weights, n).inspect_err(|e| log::warn!("decoding one sequence per step: no batch buffers ({e})")).ok(),
    };
    loop {
        let idle = running.is_empty() && waiting.is_empty();
        if idle && draining {
            break;
        }
        // Block only when there is nothing to run.
        let first = if idle {
            match rx.recv() {
                Ok(m) => Some(m),
                Err(_) => break,
            }
        } else {
            None
        };
        for message in first.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            match message {
                Message::Job(job) if draining => refuse(*job),
                Message::Job(job) => waiting.push_back(job),
                Message::Drain => {
                    draining = true;
                    waiting.drain(..).for_each(|job| refuse(*job));
                }
                Message::CancelAll => {
                    draining = true;
                    waiting.drain(..).for_each(|job| refuse(*job));
                    running.clear();
                    if let Some(b) = batch.as_mut() {
                        b.forget();
                    }
                    let _ = weights.ctx.device.poll(wgpu::PollType::Poll);
                }
            }
        }
        // A client that left while waiting costs nothing more.
        waiting.retain(|job| !job.events.is_closed());
        while running.len() < max_concurrent {
            let Some(job) = waiting.pop_front() else { break };
            if let Some(r) = start(weights, tokenizer, *job) {
                running.push(r);
            }
        }
        counts.running.store(running.len(), Ordering::SeqCst);
        counts.waiting.store(waiting.len(), Ordering::SeqCst);
        let before = running.len();
        let alive = round(&mut running, batch.as_mut(), counts);
        let mut keep = alive.into_iter();
        running.retain(|_| keep.next().unwrap_or(false));
        counts.running.store(running.len(), Ordering::SeqCst);
        if running.len() < before {
            // The batch's program holds the ended sessions' buffers; wgpu frees them when the
            // device is next polled: do both now, not at the next request.
            if let Some(b) = batch.as_mut() {
                b.forget();
            }
            let _ = weights.ctx.device.poll(wgpu::PollType::Poll);
        }
    }
    counts.running.store(0, Ordering::SeqCst);
    counts.waiting.store(0, Ordering::SeqCst);
}

/// One round: every running sequence advances by at most one step. Sequences waiting for a
/// decode step that share a plan (and can be batched) run it together, up to the batch's
/// capacity at a time; every other sequence steps alone. Returns, per sequence, whether it is
/// still running.
fn round(running: &mut [Running<'_>], batch: Option<&mut DecodeBatch>, counts: &Counts) -> Vec<bool> {
    // Groups of sequences (by index) whose decode steps can run as one.
    let mut groups: Vec<Vec<usize>> = Vec::new();
    if let Some(b) = batch.as_deref() {
        for (i, r) in running.iter().enumerate() {
            if r.events.is_closed() || !r.stream.wants_decode() || !b.can_join(r.stream.session()) {
                continue;
            }
            let session = r.stream.session();
            match groups.iter_mut().find(|g| g.len() < b.capacity() && b.same_step(running[g[0]].stream.session(), session)) {
                Some(g) => g.push(i),
                None => groups.push(vec![i]),
            }
        }
        groups.retain(|g| g.len() > 1);
    }
    let mut alive = vec![true; running.len()];
    let mut batched = vec![false; running.len()];
    if let Some(b) = batch {
        for group in &groups {
            group.iter().for_each(|&i| batched[i] = true);
            counts.batched_steps.fetch_add(1, Ordering::SeqCst);
            counts.batched_rows.fetch_add(group.len(), Ordering::SeqCst);
            let results = step_batch(b, running, group);
            for (&i, ok) in group.iter().zip(results) {
                alive[i] = ok && step(&mut running[i]);
            }
        }
    }
    for (i, r) in running.iter_mut().enumerate() {
        if !batched[i] {
            alive[i] = step(r);
        }
    }
    alive
}

/// One batched decode step of the sequences `group` (indices into `running`), each fed its
/// candidates; per sequence, false when it failed (its client has been told).
fn step_batch(batch: &mut DecodeBatch, running: &mut [Running<'_>], group: &[usize]) -> Vec<bool> {
    let ids: Vec<u32> = group.iter().filter_map(|&i| running[i].stream.take_decode()).collect();
    let stepped = catch_unwind(AssertUnwindSafe(|| {
        let mut sessions: Vec<&mut Session> = Vec::with_capacity(group.len());
        for (i, r) in running.iter_mut().enumerate() {
            if group.contains(&i) {
                sessions.push(r.stream.session_mut());
            }
        }
        batch.step(&mut sessions, &ids)
    }));
    let outputs = match stepped {
        Ok(Ok(outputs)) if outputs.len() == group.len() => outputs,
        failed => {
            let message = match failed {
                Ok(Ok(_)) => "internal error (a bug in firstrt): a batched step returned the wrong count".to_string(),
                Ok(Err(e)) => format!("generation failed: {e}"),
                Err(payload) => format!("internal error (a bug in firstrt) in a batched decode step: {}", panic_message(payload.as_ref())),
            };
            log::error!("{message}");
            for &i in group {
                let _ = running[i].events.send(JobEvent::Failed(ApiError::internal(message.clone())));
            }
            return vec![false; group.len()];
        }
    };
    group
        .iter()
        .zip(outputs)
        .map(|(&i, out)| match running[i].stream.feed(out) {
            Ok(()) => true,
            Err(e) => {
                let _ = running[i].events.send(JobEvent::Failed(ApiError::internal(format!("generation failed: {e}"))));
                false
            }
        })
        .collect()
}

fn refuse(job: Job) {
    let _ = job.events.send(JobEvent::Failed(ApiError::unavailable("the server is shutting down")));
}

/// A one-line message from a panic's payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| payload.downcast_ref::<String>().cloned()).unwrap_or_default()
}

/// Create the job's session and prefill; None (after sending `Failed`) when that fails.
fn start<'t>(weights: &Arc<GpuWeights>, tokenizer: &'t ModelTokenizer, job: Job) -> Option<Running<'t>> {
    let Job { prompt_ids, options, stop, plan, lora, ctx_len, events, slot } = job;
    let started = catch_unwind(AssertUnwindSafe(|| -> Result<TokenStream<'t, Session>, String> {
        let mut session = plan
            .session(weights, SessionOptions { ctx_len, candidates: options.sampler.candidates() })
            .map_err(|e| format!("creating the sequence: {e}"))?;
        if let Some((adapter, scale)) = &lora {
            session.set_lora(Some(adapter.clone()), *scale).map_err(|e| format!("attaching the adapter: {e}"))?;
        }
        let text = TextDecoder::new(tokenizer, &stop);
        TokenStream::start(session, &prompt_ids, &options, Some(text)).map_err(|e| format!("prefill: {e}"))
    }));
    let stream = match started {
        Ok(Ok(stream)) => stream,
        Ok(Err(message)) => {
            log::error!("{message}");
            let _ = events.send(JobEvent::Failed(ApiError::internal(message)));
            return None;
        }
        Err(payload) => {
            let message = format!("internal error (a bug in firstrt) starting a sequence: {}", panic_message(payload.as_ref()));
            log::error!("{message}");
            let _ = events.send(JobEvent::Failed(ApiError::internal(message)));
            return None;
        }
    };
    let session = stream.session();
    let started = JobEvent::Started { skipped_layers: session.plan().skipped_layers(), router_probs: session.router_probs().to_vec() };
    events.send(started).ok()?;
    Some(Running { stream, events, _slot: slot })
}

/// One decode step of a running sequence and its events; false when it has ended (finished,
/// failed, or its client left).
fn step(r: &mut Running<'_>) -> bool {
    if r.events.is_closed() {
        return false;
    }
    let mut ids = Vec::new();
    let mut text = String::new();
    let mut finished = None;
    let stepped = catch_unwind(AssertUnwindSafe(|| -> Result<(), String> {
        loop {
            match r.stream.next() {
                None => break,
                Some(Err(e)) => return Err(format!("generation failed: {e}")),
                Some(Ok(Event::Token(id))) => ids.push(id),
                Some(Ok(Event::Text(piece))) => text.push_str(&piece),
                Some(Ok(Event::Finished { reason, timings })) => finished = Some((reason, timings)),
            }
            if !r.stream.has_queued() {
                break;
            }
        }
        Ok(())
    }));
    let failure = match stepped {
        Ok(Ok(())) => None,
        Ok(Err(message)) => Some(message),
        Err(payload) => Some(format!("internal error (a bug in firstrt) in a decode step: {}", panic_message(payload.as_ref()))),
    };
    if let Some(message) = failure {
        log::error!("{message}");
        let _ = r.events.send(JobEvent::Failed(ApiError::internal(message)));
        return false;
    }
    if (!ids.is_empty() || !text.is_empty()) && r.events.send(JobEvent::Delta { ids, text }).is_err() {
        return false;
    }
    match finished {
        Some((reason, timings)) => {
            let completion_tokens = r.stream.generated_len();
            let _ = r.events.send(JobEvent::Finished { reason, completion_tokens, timings });
            false
        }
        None => true,
    }
}
