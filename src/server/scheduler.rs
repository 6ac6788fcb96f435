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
//! the others step alone. The first token of a sequence comes from its prefill; new sequences
//! that can share a batched step are prefilled together too ([`DecodeBatch::prefill`]).

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use crate::generate::{Event, FinishReason, GenerateOptions, TextDecoder, Timings, TokenStream};
use crate::model::tokenizer::ModelTokenizer;
use crate::runtime::batch::{DecodeBatch, MAX_PREFILL_ROWS};
use crate::runtime::{GpuLora, GpuWeights, LoadedModel, PlanChoice, Session, SessionOptions, StepOutput};

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
    /// Batched prefills run.
    batched_prefills: AtomicUsize,
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
    pub fn start(model: Arc<LoadedModel>, options: SchedulerOptions) -> Scheduler {
        let SchedulerOptions { max_concurrent, queue, batch, prefill_chunk } = options;
        let (tx, rx) = mpsc::channel();
        let counts = Arc::new(Counts::default());
        let thread_counts = counts.clone();
        let max_concurrent = max_concurrent.max(1);
        let thread = std::thread::Builder::new()
            .name("firstrt-scheduler".into())
            .spawn(move || {
                let batch_capacity = if batch { max_concurrent } else { 0 };
                run(&model.weights, &model.tokenizer, &rx, max_concurrent, batch_capacity, prefill_chunk.max(1), &thread_counts)
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

    /// Batched decode steps run so far, the sequence steps they held (their sum of batch
    /// sizes), and batched prefills run.
    pub fn batched(&self) -> (usize, usize, usize) {
        let c = &self.counts;
        (c.batched_steps.load(Ordering::SeqCst), c.batched_rows.load(Ordering::SeqCst), c.batched_prefills.load(Ordering::SeqCst))
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
    prefill_chunk: usize,
    counts: &Counts,
) {
    let mut waiting: VecDeque<Box<Job>> = VecDeque::new();
    let mut running: Vec<Running<'_>> = Vec::new();
    let mut prefilling: Vec<Prefilling> = Vec::new();
    let mut draining = false;
    let mut batch = match batch_capacity {
        0 | 1 => None,
        n => DecodeBatch::new(weights, n).inspect_err(|e| log::warn!("decoding one sequence per step: no batch buffers ({e})")).ok(),
    };
    loop {
        let idle = running.is_empty() && waiting.is_empty() && prefilling.is_empty();
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
                    let cut = || JobEvent::Failed(ApiError::unavailable("the server shut down before this answer was complete"));
                    for r in running.drain(..) {
                        let _ = r.events.send(cut());
                    }
                    for o in prefilling.drain(..).filter_map(|p| p.opened) {
                        let _ = o.events.send(cut());
                    }
                    if let Some(b) = batch.as_mut() {
                        b.forget();
                    }
                    let _ = weights.ctx.device.poll(wgpu::PollType::Poll);
                }
            }
        }
        // A client that left while waiting costs nothing more.
        waiting.retain(|job| !job.events.is_closed());
        let mut starting = Vec::new();
        while running.len() + prefilling.len() + starting.len() < max_concurrent {
            let Some(job) = waiting.pop_front() else { break };
            starting.push(*job);
        }
        // Sequences being prefilled count as running (a long prompt takes a while).
        counts.running.store(running.len() + prefilling.len() + starting.len(), Ordering::SeqCst);
        counts.waiting.store(waiting.len(), Ordering::SeqCst);
        let (started, long) = start_all(weights, tokenizer, starting, batch.as_mut(), prefill_chunk, counts);
        running.extend(started);
        prefilling.extend(long);
        // One chunk of each long prompt, between the other sequences' decode steps.
        let before_chunks = prefilling.len();
        prefilling.retain_mut(|p| {
            match p.advance(prefill_chunk) {
                Ok(None) => true,
                Ok(Some(out)) => {
                    // The prompt is in: the sequence starts.
                    let o = p.opened.take();
                    running.extend(o.and_then(|o| begin(tokenizer, o, Some((out, p.t0)))));
                    false
                }
                Err(()) => false,
            }
        });
        if prefilling.len() < before_chunks {
            let _ = weights.ctx.device.poll(wgpu::PollType::Poll);
        }
        let before = running.len();
        let alive = round(&mut running, batch.as_mut(), counts);
        let mut keep = alive.into_iter();
        running.retain(|_| keep.next().unwrap_or(false));
        counts.running.store(running.len() + prefilling.len(), Ordering::SeqCst);
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
    let stepped = guarded("in a batched decode step", || {
        let mut sessions: Vec<&mut Session> = Vec::with_capacity(group.len());
        for (i, r) in running.iter_mut().enumerate() {
            if group.contains(&i) {
                sessions.push(r.stream.session_mut());
            }
        }
        batch.step(&mut sessions, &ids).map_err(|e| format!("generation failed: {e}"))
    });
    let outputs = match stepped {
        Ok(outputs) => outputs,
        Err(message) => {
            group.iter().for_each(|&i| fail(&running[i].events, message.clone()));
            return vec![false; group.len()];
        }
    };
    group
        .iter()
        .zip(outputs)
        .map(|(&i, out)| running[i].stream.feed(out).map_err(|e| fail(&running[i].events, format!("generation failed: {e}"))).is_ok())
        .collect()
}

fn refuse(job: Job) {
    let _ = job.events.send(JobEvent::Failed(ApiError::unavailable("the server is shutting down")));
}

/// A one-line message from a panic's payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| payload.downcast_ref::<String>().cloned()).unwrap_or_default()
}

/// A job whose session exists, before its prefill.
struct Opened {
    session: Session,
    /// Whether its prefill may run in chunks (a static plan: routers decide on the whole
    /// prompt at once).
    chunked: bool,
    prompt_ids: Vec<u32>,
    options: GenerateOptions,
    stop: Vec<String>,
    events: UnboundedSender<JobEvent>,
    slot: Slot,
}

/// Tell a job's client that it failed (logged too).
fn fail(events: &UnboundedSender<JobEvent>, message: String) {
    log::error!("{message}");
    let _ = events.send(JobEvent::Failed(ApiError::internal(message)));
}

/// Run `f`, turning an error or a panic into a message (`what` names the work).
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => Err(format!("internal error (a bug in firstrt) {what}: {}", panic_message(payload.as_ref()))),
    }
}

/// Create the job's session (with its adapter); None (after sending `Failed`) when that fails.
fn open(weights: &Arc<GpuWeights>, job: Job) -> Option<Opened> {
    let Job { prompt_ids, options, stop, plan, lora, ctx_len, events, slot } = job;
    let opened = guarded("creating a sequence", || {
        let mut session = plan
            .session(weights, SessionOptions { ctx_len, candidates: options.sampler.candidates() })
            .map_err(|e| format!("creating the sequence: {e}"))?;
        if let Some((adapter, scale)) = &lora {
            session.set_lora(Some(adapter.clone()), *scale).map_err(|e| format!("attaching the adapter: {e}"))?;
        }
        Ok(session)
    });
    match opened {
        Ok(session) => Some(Opened { session, chunked: plan.is_static(), prompt_ids, options, stop, events, slot }),
        Err(message) => {
            fail(&events, message);
            None
        }
    }
}

/// Start the stream of an opened job: its prefill, or the one a batched prefill ran
/// (`prefilled`: its candidates and when it started); sends `Started`. None (after sending
/// `Failed`) when that fails or the client has gone.
fn begin<'t>(tokenizer: &'t ModelTokenizer, o: Opened, prefilled: Option<(StepOutput, Instant)>) -> Option<Running<'t>> {
    let Opened { session, prompt_ids, options, stop, events, slot, .. } = o;
    let started = guarded("starting a sequence", || {
        let text = TextDecoder::new(tokenizer, &stop);
        match prefilled {
            Some((out, t0)) => TokenStream::prefilled(session, &prompt_ids, out, t0, &options, Some(text)),
            None => TokenStream::start(session, &prompt_ids, &options, Some(text)),
        }
        .map_err(|e| format!("prefill: {e}"))
    });
    let stream = match started {
        Ok(stream) => stream,
        Err(message) => {
            fail(&events, message);
            return None;
        }
    };
    let session = stream.session();
    let started = JobEvent::Started { skipped_layers: session.plan().skipped_layers(), router_probs: session.router_probs().to_vec() };
    events.send(started).ok()?;
    Some(Running { stream, events, _slot: slot })
}

/// Start `jobs`: create their sessions; those with a prompt over `chunk` tokens (and a static
/// plan) are returned to be prefilled a chunk per round; of the others, those that can
/// share a batched step (same fixed plan, no adapter: groups within the batch's capacity and
/// [`MAX_PREFILL_ROWS`]) are prefilled together, each other one alone.
fn start_all<'t>(
    weights: &Arc<GpuWeights>,
    tokenizer: &'t ModelTokenizer,
    jobs: Vec<Job>,
    batch: Option<&mut DecodeBatch>,
    chunk: usize,
    counts: &Counts,
) -> (Vec<Running<'t>>, Vec<Prefilling>) {
    let mut long = Vec::new();
    let mut opened: Vec<Option<Opened>> = Vec::new();
    for o in jobs.into_iter().filter_map(|job| open(weights, job)) {
        if o.chunked && o.prompt_ids.len() > chunk {
            long.push(Prefilling { opened: Some(o), done: 0, t0: Instant::now() });
        } else {
            opened.push(Some(o));
        }
    }
    let mut started = Vec::new();
    if let Some(b) = batch {
        // Groups (indices into `opened`) that can share a prefill.
        let mut groups: Vec<(Vec<usize>, usize)> = Vec::new();
        for (i, o) in opened.iter().enumerate() {
            let Some(o) = o else { continue };
            let rows = o.prompt_ids.len();
            if !b.can_join(&o.session) || rows > MAX_PREFILL_ROWS {
                continue;
            }
            let fits = |(g, r): &&mut (Vec<usize>, usize)| {
                g.len() < b.capacity()
                    && r + rows <= MAX_PREFILL_ROWS
                    && opened[g[0]].as_ref().is_some_and(|first| b.same_step(&first.session, &o.session))
            };
            match groups.iter_mut().find(fits) {
                Some((g, r)) => {
                    g.push(i);
                    *r += rows;
                }
                None => groups.push((vec![i], rows)),
            }
        }
        for (group, _) in groups.into_iter().filter(|(g, _)| g.len() > 1) {
            let mut members: Vec<Opened> = group.iter().filter_map(|&i| opened[i].take()).collect();
            let t0 = Instant::now();
            let prefilled = guarded("in a batched prefill", || {
                let prompts: Vec<Vec<u32>> = members.iter().map(|o| o.prompt_ids.clone()).collect();
                let prompts: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
                let mut sessions: Vec<&mut Session> = members.iter_mut().map(|o| &mut o.session).collect();
                b.prefill(&mut sessions, &prompts).map_err(|e| format!("prefill: {e}"))
            });
            match prefilled {
                Ok(outputs) => {
                    counts.batched_prefills.fetch_add(1, Ordering::SeqCst);
                    for (o, out) in members.into_iter().zip(outputs) {
                        started.extend(begin(tokenizer, o, Some((out, t0))));
                    }
                }
                Err(message) => members.iter().for_each(|o| fail(&o.events, message.clone())),
            }
        }
    }
    for o in opened.into_iter().flatten() {
        started.extend(begin(tokenizer, o, None));
    }
    (started, long)
}

/// Prompt tokens a long prompt's prefill runs per round by default (`--prefill-chunk`).
pub const PREFILL_CHUNK: usize = 128;

/// How the scheduler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerOptions {
    /// Sequences generating (or being prefilled) at once, at least 1.
    pub max_concurrent: usize,
    /// Requests that may wait beyond those.
    pub queue: usize,
    /// Batch the decode steps (and prefills) of sequences that share a plan.
    pub batch: bool,
    /// A prompt longer than this is prefilled this many tokens per round (static plans; a
    /// routed prompt is prefilled whole, its routers reading all of it): the other sequences
    /// get a decode step between its chunks, and a client that leaves stops it at the next one.
    pub prefill_chunk: usize,
}

/// A sequence whose long prompt is being prefilled a chunk per round.
struct Prefilling {
    /// The job; None once it has started.
    opened: Option<Opened>,
    /// Prompt tokens prefilled so far.
    done: usize,
    /// When its prefill started.
    t0: Instant,
}

impl Prefilling {
    /// Prefill the next `chunk` tokens: `Ok(Some(out))` after the last (the candidates for the first
    /// token), `Ok(None)` while more remain, `Err(())` when the client has gone or the prefill
    /// failed (its client told).
    fn advance(&mut self, chunk: usize) -> Result<Option<StepOutput>, ()> {
        let o = self.opened.as_mut().ok_or(())?;
        if o.events.is_closed() {
            return Err(());
        }
        let end = (self.done + chunk).min(o.prompt_ids.len());
        let chunk = guarded("prefilling a chunk", || {
            o.session.prepare_prefill(end - self.done).map_err(|e| format!("prefill: {e}"))?;
            o.session.prefill(&o.prompt_ids[self.done..end]).map_err(|e| format!("prefill: {e}"))
        });
        match chunk {
            Ok(out) => {
                self.done = end;
                Ok((end == o.prompt_ids.len()).then_some(out))
            }
            Err(message) => {
                fail(&o.events, message);
                Err(())
            }
        }
    }
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
    let stepped = guarded("in a decode step", || {
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
    });
    if let Err(message) = stepped {
        fail(&r.events, message);
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
