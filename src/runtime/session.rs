//! A session: one sequence's buffers (KV cache, activations, step uniform, logits), position
//! and layer plan over shared weights; it records, submits and reads back the steps that a
//! [`StepBuilder`] builds.
//!
//! Prefill runs all prompt tokens through the matmul kernels in one command encoding. Decode runs
//! one token per step through the matrix-vector kernels; its dispatches (pipelines, bind groups,
//! workgroup counts) are prepared once and re-recorded every step, with only the step uniform
//! (position) and the token id written by `queue.write_buffer`: no buffer or bind group is
//! created per token. A layer that the plan skips contributes no dispatch and holds no KV cache.

use std::sync::Arc;

use crate::gpu::dispatch::record_grouped;
use crate::gpu::{DType, Dispatch, GpuContext, GpuTensor, Phase};
use crate::kernels::rope::{RopeScalingParams, RopeTables};
use crate::kernels::sample::{decode_pairs, saw_non_finite};
use crate::kernels::step::{StepBuffer, StepParams};

use super::kv_cache::KvCache;
use super::lora::GpuLora;
use super::plan::PlanError;
use super::profile::Profiler;
use super::routed::Routing;
use super::step::{Activations, StepBuffers, StepBuilder};
use super::weights::GpuWeights;
use super::{LayerPlan, RuntimeError};

/// The most candidates the sampler sees per token (GPU top-k, then the CPU samples).
pub const MAX_CANDIDATES: usize = 256;

/// The next [`Session`]'s id.
static NEXT_SESSION_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Per-sequence options.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Context length: KV-cache rows per kept layer.
    pub ctx_len: usize,
    /// Candidates read back per token: 1 = greedy (argmax), else top-k (at most MAX_CANDIDATES).
    pub candidates: usize,
}

/// A step of a session, as errors name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepId {
    /// The prefill of tokens from position `pos0` on (0: the prompt; more: a later chat turn).
    Prefill {
        /// The first position of the step.
        pos0: usize,
    },
    /// The session's `n`-th decode step (1-based), at position `pos`.
    Decode {
        /// Decode steps so far in the session, this one included.
        n: usize,
        /// The position of the token the step runs.
        pos: usize,
    },
}

impl std::fmt::Display for StepId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            StepId::Prefill { pos0: 0 } => write!(f, "prefill"),
            StepId::Prefill { pos0 } => write!(f, "prefill from position {pos0}"),
            StepId::Decode { n, pos } => write!(f, "decode step {n} (position {pos})"),
        }
    }
}

/// Where a step's values first stop being finite, found by running the step again one part at
/// a time and reading the residual stream back after each part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonFiniteAt {
    /// The embedding's output: a token's embedding row holds NaN or infinity.
    Embedding,
    /// The residual stream after decoder layer `l` (0-based): the first layer whose output is
    /// not finite.
    Layer(usize),
    /// Every layer's output is finite: the final norm or the LM head made the logits non-finite.
    Tail,
    /// Not located: running the step again failed (the reason is logged).
    Unknown,
}

impl std::fmt::Display for NonFiniteAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            NonFiniteAt::Embedding => write!(f, "the embedding output is already not finite"),
            NonFiniteAt::Layer(l) => write!(f, "the first layer whose output is not finite is layer {l}"),
            NonFiniteAt::Tail => write!(f, "every layer's output is finite: the final norm or the LM head made them"),
            NonFiniteAt::Unknown => write!(f, "where they start could not be located"),
        }
    }
}

/// What one step hands back: the sampling candidates of the last position.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// (token id, logit), best first; one entry when greedy.
    pub candidates: Vec<(u32, f32)>,
}

/// One sequence over shared weights: see the module docs. Not `Sync`: one thread drives it.
pub struct Session {
    /// The model's weights, shared with other sessions.
    pub weights: Arc<GpuWeights>,
    pub(super) ctx: Arc<GpuContext>,
    pub(super) options: SessionOptions,
    pub(super) plan: LayerPlan,
    /// Tokens in the cache.
    pub(super) pos: usize,
    /// Decode steps run so far (for errors naming the step).
    pub(super) decode_steps: usize,
    /// KV cache, RoPE tables, step uniform, logits and picked candidates.
    pub(super) bufs: StepBuffers,
    pub(super) staging: wgpu::Buffer, // MAP_READ copy of `bufs.picked`
    pub(super) prefill_acts: Option<Activations>,
    pub(super) decode_acts: Activations,
    /// The prepared decode step, built on the first decode after the plan is fixed.
    decode_program: Option<Vec<Dispatch>>,
    /// A prepared prefill step and its token count ([`Session::prepare_prefill`]), used by the
    /// next prefill of that many tokens.
    prefill_program: Option<(usize, Vec<Dispatch>)>,
    /// Dispatches recorded by the last step (for tests and profiling).
    pub last_dispatch_count: usize,
    /// Routers that decide the plan during the first prefill; None once the plan is fixed.
    pub(super) routing: Option<Routing>,
    /// Each layer's router probability from the routed prefill (None: no router, or static plan).
    pub(super) probs: Vec<Option<f32>>,
    /// Times every step when set (`--profile`, `--trace`); None costs nothing.
    pub(super) profiler: Option<Profiler>,
    /// The unmerged LoRA adapter and its user scale S (the B products use S · alpha / r).
    pub(super) lora: Option<(Arc<GpuLora>, f32)>,
    /// Unique among this process's sessions: names it in a batched step's cached program.
    pub(super) id: u64,
}

impl Session {
    /// A session running the layers of `plan`, with a KV cache for each of them.
    /// Errors: `RuntimeError::Plan` when the plan's length is not the model's layer count,
    /// `RuntimeError::ZeroContext` when `ctx_len` is 0; `RuntimeError::Gpu` when a buffer cannot
    /// be allocated.
    pub fn new(weights: &Arc<GpuWeights>, options: SessionOptions, plan: LayerPlan) -> Result<Session, RuntimeError> {
        let ctx = weights.ctx.clone();
        let c = &weights.config;
        if plan.len() != c.n_layers {
            return Err(PlanError::PlanLength { plan: plan.len(), model: c.n_layers }.into());
        }
        if options.ctx_len == 0 {
            return Err(RuntimeError::ZeroContext);
        }
        let candidates = options.candidates.clamp(1, MAX_CANDIDATES);
        let options = SessionOptions { candidates, ..options };
        let mut kv = KvCache::empty(&ctx, c.n_layers, options.ctx_len, c.kv_dim())?;
        kv.fit(&ctx, &plan)?;
        let scaling = c.rope_scaling.as_ref().map(|s| RopeScalingParams {
            factor: s.factor,
            low_freq_factor: s.low_freq_factor,
            high_freq_factor: s.high_freq_factor,
            original_max_position: s.original_max_position_embeddings,
        });
        let rope = RopeTables::new(&ctx, c.head_dim, c.rope_theta, scaling.as_ref(), options.ctx_len)?;
        let picked = GpuTensor::zeros(&ctx, "picked", DType::U32, &[2 * candidates])?;
        let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("picked.readback"),
            size: (8 * candidates).max(16) as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let bufs = StepBuffers {
            kv,
            rope,
            step: StepBuffer::new(&ctx),
            final_row: GpuTensor::zeros(&ctx, "final_row", DType::F32, &[1, c.d_model])?,
            logits: GpuTensor::zeros_bound(&ctx, "logits", DType::F32, &[c.vocab_size])?,
            candidates,
            picked,
            router_probs: GpuTensor::zeros(&ctx, "router.probs", DType::F32, &[c.n_layers])?,
            lora_tmp: None,
        };
        Ok(Session {
            weights: weights.clone(),
            decode_acts: Activations::new(&ctx, weights, 1)?,
            ctx,
            options,
            plan,
            pos: 0,
            decode_steps: 0,
            bufs,
            staging,
            prefill_acts: None,
            decode_program: None,
            prefill_program: None,
            last_dispatch_count: 0,
            routing: None,
            probs: vec![None; c.n_layers],
            profiler: None,
            lora: None,
            id: NEXT_SESSION_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// A session whose plan the routers decide during its first prefill. No KV cache is
    /// allocated until a layer is known to run. Errors: `RuntimeError::Plan` when the routers
    /// do not cover the model's layers or the policy is invalid; as [`Session::new`].
    pub fn with_routers(weights: &Arc<GpuWeights>, options: SessionOptions, routing: Routing) -> Result<Session, RuntimeError> {
        let n = weights.config.n_layers;
        if routing.routers.layers.len() != n {
            return Err(PlanError::RouterCount { routers: routing.routers.layers.len(), model: n }.into());
        }
        routing.policy.validate()?;
        let mut s = Session::new(weights, options, LayerPlan::full(n))?;
        s.bufs.kv.clear();
        s.routing = Some(routing);
        Ok(s)
    }

    /// A builder of this session's steps in `phase`, over its weights, adapter, buffers and plan.
    pub(super) fn builder(&self, phase: Phase) -> StepBuilder<'_> {
        StepBuilder {
            ctx: &self.ctx,
            weights: &self.weights,
            lora: self.lora.as_ref().map(|(g, s)| (&**g, *s)),
            bufs: &self.bufs,
            plan: &self.plan,
            phase,
        }
    }

    /// Resolve the kernel choices, build the decode program (once the plan is fixed) and have
    /// the driver compile its pipelines ([`GpuContext::warm_up`]), so that neither happens
    /// inside a timed step; [`Session::prepare_prefill`] does the same for a prefill. Cheap when
    /// done already. A routed session only resolves the choices until its first prefill has
    /// fixed the plan.
    /// Errors: as [`StepBuilder::layer`]; `RuntimeError::Gpu` when the warm-up fails.
    pub fn prepare(&mut self) -> Result<(), RuntimeError> {
        if !self.build_decode_program()? {
            return Ok(());
        }
        self.warm_up_with_decode(&[], 1)
    }

    /// [`Session::warm_up`] over the built decode program and `others`, before a step of `rows`
    /// tokens (the decode program, taken out of the session meanwhile, is put back).
    fn warm_up_with_decode(&mut self, others: &[&[Dispatch]], rows: usize) -> Result<(), RuntimeError> {
        let decode = self.decode_program.take().expect("the decode program is built first");
        let mut programs: Vec<&[Dispatch]> = vec![&decode];
        programs.extend_from_slice(others);
        let warmed = self.warm_up(&programs, rows);
        self.decode_program = Some(decode);
        warmed
    }

    /// Resolve the kernel choices and build the decode program if it is not built yet (not
    /// warmed up). Returns false, building nothing, for a routed session before its plan is
    /// fixed. Errors: as [`StepBuilder::layer`].
    fn build_decode_program(&mut self) -> Result<bool, RuntimeError> {
        self.weights.choose_kernels(self.lora.as_ref().map(|(g, _)| &**g));
        if self.routing.is_some() {
            return Ok(false);
        }
        if self.decode_program.is_none() {
            let acts = &self.decode_acts;
            self.decode_program = Some(self.builder(Phase::Decode).step(1, acts, |_| acts)?);
        }
        Ok(true)
    }

    /// [`Session::prepare`], then build the program of a prefill of `rows` tokens at the current
    /// position (kept for the next [`Session::prefill`] of that many tokens) and have the driver
    /// compile its pipelines, so that the prefill's time is its own. Does nothing more when the
    /// prefill would be refused (no tokens, or more than the context holds: the prefill reports
    /// it). A routed session (its plan is decided during the prefill) has the pipelines of its
    /// routed prefill compiled instead.
    /// Errors: as [`Session::prepare`]; `RuntimeError::Gpu` when the activation buffers cannot
    /// be allocated.
    pub fn prepare_prefill(&mut self, rows: usize) -> Result<(), RuntimeError> {
        let refused = rows == 0 || self.pos + rows > self.options.ctx_len;
        if refused || self.routing.is_some() || self.prefill_program.as_ref().is_some_and(|(r, _)| *r == rows) {
            self.prepare()?;
            return match self.routing.clone() {
                Some(routing) if !refused => self.prepare_routed_prefill(rows, &routing),
                _ => Ok(()),
            };
        }
        self.build_decode_program()?;
        self.ensure_prefill_acts(rows)?;
        let acts = self.prefill_acts.as_ref().expect("allocated above");
        let program = self.builder(Phase::Prefill).step(rows, acts, |_| acts)?;
        // One warm-up for both programs, so that their pipelines compile together (on two
        // devices where the compile helper runs), at the prefill's positions: the decode
        // program's single workgroups write KV-cache rows that the prefill writes again.
        self.warm_up_with_decode(&[&program], rows)?;
        self.prefill_program = Some((rows, program));
        Ok(())
    }

    /// Have the driver compile the pipelines of the decode step and of prefills of each of
    /// `lengths` tokens in one warm-up (on two devices where the compile helper runs: see
    /// [`GpuContext::warm_up`]), so that none compiles inside a later step; for a server
    /// preparing the prefill lengths its requests will have. The prepared prefill programs are
    /// not kept (the next [`Session::prefill`] builds its own, from warm pipelines). Lengths
    /// that the context cannot hold from the current position are left out; a routed session
    /// prepares each length in turn ([`Session::prepare_prefill`]).
    /// Errors: as [`Session::prepare_prefill`].
    pub fn prepare_prefills(&mut self, lengths: &[usize]) -> Result<(), RuntimeError> {
        let fits: Vec<usize> = lengths.iter().copied().filter(|&r| r > 0 && self.pos + r <= self.options.ctx_len).collect();
        let Some(&longest) = fits.iter().max() else {
            return self.prepare();
        };
        if self.routing.is_some() {
            return fits.iter().try_for_each(|&rows| self.prepare_prefill(rows));
        }
        self.build_decode_program()?;
        self.ensure_prefill_acts(longest)?;
        let acts = self.prefill_acts.as_ref().expect("allocated above");
        let b = self.builder(Phase::Prefill);
        let programs = fits.iter().map(|&rows| b.step(rows, acts, |_| acts)).collect::<Result<Vec<_>, _>>()?;
        let programs: Vec<&[Dispatch]> = programs.iter().map(Vec::as_slice).collect();
        // The longest prefill's positions: every warm-up dispatch writes within them.
        self.warm_up_with_decode(&programs, longest)
    }

    /// The routed half of [`Session::prepare_prefill`]: the plan is only known inside the
    /// prefill, but every layer runs the same pipelines, so warming the embedding, one router,
    /// layer 0 and the tail for `rows` tokens compiles everything the routed prefill (and a
    /// budget's second prefill) dispatches. Layer 0's KV cache is made for it if the session
    /// has none yet; the prefill drops it again if its plan skips layer 0.
    fn prepare_routed_prefill(&mut self, rows: usize, routing: &Routing) -> Result<(), RuntimeError> {
        self.ensure_prefill_acts(rows)?;
        self.bufs.kv.ensure(&self.ctx, 0)?;
        let acts = self.prefill_acts.as_ref().expect("allocated above");
        let b = self.builder(Phase::Prefill);
        let mut program = b.head(acts, rows)?;
        if let Some((l, router)) = routing.routers.layers.iter().enumerate().find_map(|(l, r)| r.as_ref().map(|r| (l, r))) {
            program.extend(b.router(acts, rows, l, router)?);
        }
        program.extend(b.layer(acts, rows, 0)?);
        program.extend(b.tail(acts, rows)?);
        self.warm_up(&[&program], rows)
    }

    /// Allocate the prefill activation buffers when they hold fewer than `rows` tokens (a
    /// prepared prefill program over the old ones is dropped).
    pub(super) fn ensure_prefill_acts(&mut self, rows: usize) -> Result<(), RuntimeError> {
        if self.prefill_acts.as_ref().is_none_or(|a| a.rows < rows) {
            self.prefill_program = None;
            self.prefill_acts = Some(Activations::new(&self.ctx, &self.weights, rows)?);
        }
        Ok(())
    }

    /// [`GpuContext::warm_up`] over `programs`, before a step of `rows` tokens at the current
    /// position, when one of their pipelines has not run yet. The step uniform is first set as
    /// that step will set it, so that the warm-up writes only KV-cache rows that the step writes
    /// again (a decode program warmed with a prefill's `rows` writes the first of them).
    fn warm_up(&self, programs: &[&[Dispatch]], rows: usize) -> Result<(), RuntimeError> {
        let all = || programs.iter().flat_map(|p| p.iter());
        if !all().any(Dispatch::is_cold) || self.pos + rows > self.options.ctx_len {
            return Ok(());
        }
        let (pos0, n) = (self.pos as u32, rows as u32);
        self.bufs.step.write(&self.ctx, &StepParams { pos0, n_tokens: n, kv_len: pos0 + n, _pad: 0 });
        let warmed = self.ctx.warm_up(all())?;
        log::debug!("warmed {warmed} pipelines for a {rows}-token step");
        Ok(())
    }

    /// Attach a LoRA adapter (unmerged: the base weights are untouched) at user scale `scale`,
    /// replace the current one, or detach it with `None`. Steps after this call use it; the
    /// prepared decode program is rebuilt on the next decode. Tokens already in the KV cache keep
    /// what the previous adapter computed: for a clean switch mid-conversation start a new
    /// `Session` over the same weights (cheap: the weights are shared) and prefill again.
    /// Errors: an invalid scale; `LoraError::WrongModel` when the adapter was uploaded for other
    /// sizes; `RuntimeError::Gpu` when its scratch buffer cannot be allocated.
    pub fn set_lora(&mut self, lora: Option<Arc<GpuLora>>, scale: f32) -> Result<(), RuntimeError> {
        super::loaded::check_scale(scale)?;
        if let Some(g) = &lora {
            if g.dims != crate::model::lora::LoraDims::of(&self.weights.config) {
                return Err(crate::model::lora::LoraError::WrongModel {
                    dir: g.dir.clone(),
                    what: format!("uploaded for sizes {:?}, this session's model {} has others", g.dims, self.weights.config.name),
                }
                .into());
            }
            let inner = g.max_inner();
            if self.bufs.lora_tmp.as_ref().is_none_or(|t| t.shape[1] < inner) {
                self.bufs.lora_tmp = Some(GpuTensor::zeros_bound(&self.ctx, "lora.a", DType::F32, &[self.options.ctx_len, inner])?);
            }
        }
        self.lora = lora.map(|g| (g, scale));
        self.decode_program = None;
        self.prefill_program = None;
        Ok(())
    }

    /// The attached (unmerged) LoRA adapter and its user scale.
    pub fn lora(&self) -> Option<(&Arc<GpuLora>, f32)> {
        self.lora.as_ref().map(|(g, s)| (g, *s))
    }

    /// Each layer's router probability, once the routed prefill has run.
    pub fn router_probs(&self) -> &[Option<f32>] {
        &self.probs
    }

    /// True once the plan can no longer change (after the first prefill of a routed session).
    pub fn plan_fixed(&self) -> bool {
        self.routing.is_none()
    }

    /// Record `program` into one pass and submit it without waiting (a segment of the routed
    /// prefill; the step ends in `execute`).
    pub(super) fn submit(&mut self, program: &[Dispatch]) {
        let ctx = &*self.ctx;
        let mut encoder = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("prefill.segment") });
        match self.profiler.as_mut() {
            None => {
                let mut pass =
                    encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("prefill.segment"), timestamp_writes: None });
                record_grouped(&mut pass, program, |pass, d| d.record(pass));
            }
            Some(p) => {
                let t0 = std::time::Instant::now();
                p.record(&mut encoder, Phase::Prefill, "prefill.segment", program, t0);
                let clock = p.host_clock();
                let t1 = std::time::Instant::now();
                clock.span_between("encode", t0, t1);
                p.mark_submit(t1);
                ctx.queue.submit([encoder.finish()]);
                clock.span("submit", t1);
                return;
            }
        }
        ctx.queue.submit([encoder.finish()]);
    }

    /// Profile every following step with `profiler` (None: stop); returns the previous one.
    pub fn set_profiler(&mut self, profiler: Option<Profiler>) -> Option<Profiler> {
        std::mem::replace(&mut self.profiler, profiler)
    }

    /// The profiler timing this session's steps, if any.
    pub fn profiler(&self) -> Option<&Profiler> {
        self.profiler.as_ref()
    }

    /// The profiler timing this session's steps, if any, to flush or read while it runs.
    pub fn profiler_mut(&mut self) -> Option<&mut Profiler> {
        self.profiler.as_mut()
    }

    /// Tokens in the KV cache: the position the next token takes.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Forget the tokens from position `pos` on, so that the next step writes position `pos`
    /// (llama.cpp's `llama_memory_seq_rm` for one sequence): the entries past it stay in the
    /// KV cache but are never read again, because attention reads `kv_len` from the step
    /// uniform, and later steps overwrite them. The plan, fixed by the first prefill, stays.
    /// Used to score several continuations of one prompt without prefilling it again.
    /// Errors: `RewindPastEnd` when `pos` is beyond [`Session::position`].
    pub fn rewind(&mut self, pos: usize) -> Result<(), RuntimeError> {
        if pos > self.pos {
            return Err(RuntimeError::RewindPastEnd { pos, position: self.pos });
        }
        self.pos = pos;
        Ok(())
    }

    /// Context length: the most tokens the KV cache holds.
    pub fn ctx_len(&self) -> usize {
        self.options.ctx_len
    }

    /// Which layers run (for a routed session, final after its first prefill).
    pub fn plan(&self) -> &LayerPlan {
        &self.plan
    }

    /// Bytes held by this session's KV caches.
    pub fn kv_bytes(&self) -> u64 {
        self.bufs.kv.bytes()
    }

    /// Every id inside the vocabulary (`BadToken`) and room for them in the context (`ContextFull`).
    pub(super) fn check_ids(&self, ids: &[u32]) -> Result<(), RuntimeError> {
        let vocab = self.weights.config.vocab_size;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(RuntimeError::BadToken { id: bad, vocab });
        }
        if self.pos + ids.len() > self.options.ctx_len {
            return Err(RuntimeError::ContextFull { needed: self.pos + ids.len(), ctx_len: self.options.ctx_len });
        }
        Ok(())
    }

    /// Run `ids` (the prompt, or a further turn of it) through every kept layer and return the
    /// candidates for the next token. A routed session decides its plan here (the first time).
    /// Errors: `EmptyPrompt`, `BadToken` for an id outside the vocabulary, `ContextFull` when
    /// the cache cannot hold the tokens, `Gpu` for a kernel or read-back failure.
    pub fn prefill(&mut self, ids: &[u32]) -> Result<StepOutput, RuntimeError> {
        if ids.is_empty() {
            return Err(RuntimeError::EmptyPrompt);
        }
        self.check_ids(ids)?;
        let t = ids.len();
        self.ensure_prefill_acts(t)?;
        if let Some(acts) = &self.prefill_acts {
            acts.ids.write_u32(&self.ctx, ids);
        }
        self.bufs.step.write(&self.ctx, &StepParams { pos0: self.pos as u32, n_tokens: t as u32, kv_len: (self.pos + t) as u32, _pad: 0 });
        let out = if let Some(routing) = self.routing.take() {
            self.prefill_routed(ids, routing)
        } else {
            let program = match self.prefill_program.take() {
                Some((rows, program)) if rows == t => program,
                _ => {
                    let acts = self.prefill_acts.as_ref().expect("allocated above");
                    self.builder(Phase::Prefill).step(t, acts, |_| acts)?
                }
            };
            self.execute(&program, Phase::Prefill)
        };
        let out = out.map_err(|e| self.locate(e, Phase::Prefill, t))?;
        self.pos += t;
        Ok(out)
    }

    /// Run one generated token and return the candidates for the next.
    /// Errors: as [`Session::prefill`] (but never `EmptyPrompt`).
    pub fn decode(&mut self, id: u32) -> Result<StepOutput, RuntimeError> {
        self.check_ids(&[id])?;
        self.decode_steps += 1;
        if self.decode_program.is_none() {
            let acts = &self.decode_acts;
            let program = self.builder(Phase::Decode).step(1, acts, |_| acts)?;
            self.decode_program = Some(program);
        }
        self.decode_acts.ids.write_u32(&self.ctx, &[id]);
        self.bufs.step.write(&self.ctx, &StepParams { pos0: self.pos as u32, n_tokens: 1, kv_len: self.pos as u32 + 1, _pad: 0 });
        let program = self.decode_program.take().expect("built above");
        let out = self.execute(&program, Phase::Decode);
        self.decode_program = Some(program);
        let out = out.map_err(|e| self.locate(e, Phase::Decode, 1));
        self.pos += 1;
        out
    }

    /// The logits of the last position of the last step (a full `[vocab]` read-back).
    pub fn read_logits(&self) -> Result<Vec<f32>, RuntimeError> {
        Ok(self.bufs.logits.read_f32(&self.ctx)?)
    }

    /// Labels of the dispatches that one decode step records (after the first decode): the
    /// fixed part plus the per-layer part of each kept layer.
    pub fn decode_labels(&self) -> Option<Vec<&str>> {
        self.decode_program.as_ref().map(|p| p.iter().map(|d| d.label.as_str()).collect())
    }

    /// Record `program` into one pass (a debug group per layer), copy the picked candidates to
    /// the staging buffer, submit and read them back. With a profiler, the dispatches are timed
    /// and the step's host spans recorded; without one, nothing else happens.
    pub(super) fn execute(&mut self, program: &[Dispatch], phase: Phase) -> Result<StepOutput, RuntimeError> {
        let ctx = &*self.ctx;
        let label = phase.as_str();
        let mut encoder = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) });
        let t0 = self.profiler.as_ref().map(|_| std::time::Instant::now());
        match (self.profiler.as_mut(), t0) {
            (Some(p), Some(t0)) => {
                p.record(&mut encoder, phase, label, program, t0);
                p.resolve(&mut encoder);
            }
            _ => {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some(label), timestamp_writes: None });
                record_grouped(&mut pass, program, |pass, d| d.record(pass));
            }
        }
        self.copy_picked(&mut encoder);
        let t1 = t0.map(|_| std::time::Instant::now());
        if let (Some(p), Some(t1)) = (self.profiler.as_mut(), t1) {
            p.mark_submit(t1);
        }
        ctx.queue.submit([encoder.finish()]);
        let t2 = t0.map(|_| std::time::Instant::now());
        if let Some(p) = self.profiler.as_mut() {
            p.end_step()?;
        }
        self.last_dispatch_count = program.len();
        let step = match phase {
            Phase::Prefill => StepId::Prefill { pos0: self.pos },
            Phase::Decode => StepId::Decode { n: self.decode_steps, pos: self.pos },
        };
        let out = self.read_picked(step);
        if let (Some(p), Some(t0), Some(t1), Some(t2)) = (self.profiler.as_ref(), t0, t1, t2) {
            p.host_step(phase, t0, t1, t2, std::time::Instant::now());
        }
        out
    }

    /// Record the copy of this step's picked candidates (`[candidates]` (id, logit) pairs, 8
    /// bytes each) into the staging buffer; [`Session::read_picked`] reads them after submit.
    pub(super) fn copy_picked(&self, encoder: &mut wgpu::CommandEncoder) {
        let bytes = 8 * self.options.candidates;
        encoder.copy_buffer_to_buffer(&self.bufs.picked.buffer, 0, &self.staging, 0, bytes as u64);
    }

    /// Map the staging buffer that [`Session::copy_picked`] filled and decode the candidates.
    /// Errors: a failed map, or [`RuntimeError::NonFinite`] for `step` when the logits were
    /// NaN or infinite.
    pub(super) fn read_picked(&self, step: StepId) -> Result<StepOutput, RuntimeError> {
        let raw = crate::gpu::buffer::map_and_read(&self.ctx, &self.staging, 8 * self.options.candidates, "picked")?;
        let words: Vec<u32> = bytemuck::pod_collect_to_vec(&raw);
        if saw_non_finite(&words) {
            return Err(RuntimeError::NonFinite { step, at: NonFiniteAt::Unknown });
        }
        Ok(StepOutput { candidates: decode_pairs(&words) })
    }

    /// `e`, located when it is [`RuntimeError::NonFinite`] (see [`Session::locate_non_finite`]).
    fn locate(&self, e: RuntimeError, phase: Phase, rows: usize) -> RuntimeError {
        match e {
            RuntimeError::NonFinite { step, at: NonFiniteAt::Unknown } => {
                let at = self.locate_non_finite(phase, rows).unwrap_or_else(|err| {
                    log::warn!("locating the non-finite values of {step} failed: {err}");
                    NonFiniteAt::Unknown
                });
                RuntimeError::NonFinite { step, at }
            }
            other => other,
        }
    }

    /// After a step of `rows` tokens gave non-finite logits: runs it again (the same positions,
    /// so the KV-cache rows it rewrites get the same values) one part at a time, the embedding
    /// then each kept layer, reading the residual stream `[rows, d_model]` back after each, and
    /// returns the first part whose output is not finite. One submission and read-back per
    /// layer: only ever run on this error path, never on a good step.
    fn locate_non_finite(&self, phase: Phase, rows: usize) -> Result<NonFiniteAt, RuntimeError> {
        let acts = match phase {
            Phase::Prefill => self.prefill_acts.as_ref().ok_or_else(|| RuntimeError::Internal("a prefill without its buffers".into()))?,
            Phase::Decode => &self.decode_acts,
        };
        let builder = self.builder(phase);
        let len = rows * self.weights.config.d_model;
        let finite_after = |program: Vec<Dispatch>| -> Result<bool, RuntimeError> {
            self.ctx.run("locate-non-finite", &program.iter().collect::<Vec<_>>())?;
            Ok(acts.x.read_f32(&self.ctx)?[..len].iter().all(|v| v.is_finite()))
        };
        if !finite_after(builder.head(acts, rows)?)? {
            return Ok(NonFiniteAt::Embedding);
        }
        for l in (0..self.weights.config.n_layers).filter(|&l| self.plan.runs(l)) {
            if !finite_after(builder.layer(acts, rows, l)?)? {
                return Ok(NonFiniteAt::Layer(l));
            }
        }
        Ok(NonFiniteAt::Tail)
    }
}
